#!/usr/bin/env bash
# Container health check for veer: exit 0 iff GET /healthz on the admin port answers 200.
# Plain bash (/dev/tcp), so the runtime image needs no curl.
#   VEER_HEALTH_HOST  default 127.0.0.1
#   VEER_HEALTH_PORT  default 9901 (admin.listen's port)
set -u
host=${VEER_HEALTH_HOST:-127.0.0.1}
port=${VEER_HEALTH_PORT:-9901}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$host" "$port" >&3 || exit 1
IFS= read -r -t 2 status <&3 || exit 1
exec 3<&-
case $status in
    "HTTP/1."[01]" 200 "*) exit 0 ;;
    *) echo "veer /healthz answered: ${status%$'\r'}" >&2; exit 1 ;;
esac
