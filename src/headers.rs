//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection and must not cross the proxy (RFC 9110 §7.6.1),
//! including any header the `Connection` header names. `X-Forwarded-*` tell the upstream who
//! the client was; the `Host` header is kept as the client sent it (for HTTP/2 clients it is
//! rebuilt from the `:authority`). Upgrade requests for a protocol the route allows keep
//! `Connection: upgrade` and `Upgrade` so that WebSocket and similar protocols can pass
//! through; any other upgrade request is forwarded as a plain request without them.

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Standard hop-by-hop headers other than `Connection`, `Upgrade` and `TE`, which need care.
const HOP_BY_HOP: [HeaderName; 6] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// True when the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// True when every protocol the `Upgrade` header names is in `allowed` (lower-case names,
/// compared case-insensitively, without a `/version`). `h2c` never is: the upgraded
/// connection would be a tunnel to the upstream that skips routing, the split and
/// measurement for every request sent on it.
pub fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut any = false;
    for value in headers.get_all(header::UPGRADE) {
        let Ok(value) = value.to_str() else { return false };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let name = token.split_once('/').map_or(token, |(n, _)| n).trim();
            if name.eq_ignore_ascii_case("h2c") || !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                return false;
            }
            any = true;
        }
    }
    any
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

/// Removes hop-by-hop headers; with `upgrade`, keeps what the protocol switch needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one scan of the few names costs less than the dozen
    // hashed lookups below, twice per request.
    if !upgrade && !headers.keys().any(is_hop_by_hop_candidate) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Headers the client declared connection-specific. Rare, so the allocation is fine.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE) && n != header::TE)
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if headers.contains_key(header::TE) {
        // `TE: trailers` is how gRPC clients announce trailer support, and it must reach the
        // upstream; the transfer codings beside it are hop-by-hop.
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .any(|t| t.split(';').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers")));
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Takes the `host` field out of a request bound for an HTTP/2 upstream and returns it as the
/// authority to send instead (RFC 9113 §8.3.1: `:authority` carries it, and a `host` beside it
/// that differs makes nginx answer 400). `None` when there is no usable Host.
pub fn take_authority(headers: &mut HeaderMap) -> Option<Authority> {
    let host = headers.remove(header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// Makes a body of unknown length travel chunked to an HTTP/1.1 upstream. Left alone, hyper
/// sends a GET or HEAD whose length it does not know without its body (and then sends the
/// body bytes as if they were the next request): an HTTP/2 client's GET with a body and no
/// `content-length`, or an HTTP/1.1 one's chunked GET.
pub fn frame_unsized_body(method: &Method, headers: &mut HeaderMap, exact_len: Option<u64>) {
    if exact_len.is_none()
        && matches!(*method, Method::GET | Method::HEAD)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// A header that makes [`strip_hop_by_hop`] do something.
fn is_hop_by_hop_candidate(name: &HeaderName) -> bool {
    name == header::CONNECTION || name == header::UPGRADE || name == header::TE || HOP_BY_HOP.contains(name)
}

/// Sets `X-Forwarded-For/Proto/Host` for a request from `client_ip` over `proto`.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    match headers.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR, client_ip.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        m
    }

    #[test]
    fn strips_standard_and_nominated_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-app", "ok"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-app"]);
    }

    #[test]
    fn each_hop_by_hop_header_is_stripped_even_alone() {
        let all = ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "trailer"];
        for name in all.into_iter().chain(["transfer-encoding", "te", "upgrade", "connection"]) {
            let mut h = map(&[(name, "x"), ("x-app", "ok")]);
            strip_hop_by_hop(&mut h, false);
            let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-app"], "{name} alone");
        }
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_switching() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("te", "trailers")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_is_reduced_to_trailers_not_dropped() {
        for te in ["trailers", "gzip, trailers", "Trailers;q=1, deflate", "deflate"] {
            let mut h = map(&[("connection", "te"), ("te", te), ("x-app", "ok")]);
            strip_hop_by_hop(&mut h, false);
            let want = te.to_ascii_lowercase().contains("trailers").then_some("trailers");
            assert_eq!(h.get("te").map(|v| v.to_str().expect("ascii")), want, "TE: {te}");
            assert_eq!(h["x-app"], "ok");
            assert!(!h.contains_key("connection"));
        }
    }

    #[test]
    fn the_host_becomes_the_authority() {
        let mut h = map(&[("host", "shop.test:8080"), ("x-app", "ok")]);
        assert_eq!(take_authority(&mut h).expect("authority").as_str(), "shop.test:8080");
        assert!(!h.contains_key("host"));
        assert!(take_authority(&mut map(&[("host", "bad host")])).is_none());
    }

    #[test]
    fn an_unsized_get_body_is_chunked() {
        let mut h = HeaderMap::new();
        frame_unsized_body(&Method::GET, &mut h, None);
        assert_eq!(h["transfer-encoding"], "chunked");
        for (m, len, cl) in [(Method::GET, Some(3), false), (Method::GET, None, true), (Method::POST, None, false)] {
            let mut h = if cl { map(&[("content-length", "3")]) } else { HeaderMap::new() };
            frame_unsized_body(&m, &mut h, len);
            assert!(!h.contains_key("transfer-encoding"), "{m} {len:?} {cl}");
        }
    }

    #[test]
    fn only_listed_upgrades_are_allowed_and_never_h2c() {
        let allowed = ["websocket".to_string(), "h2c".to_string()];
        let ok = |v: &str| upgrade_allowed(&map(&[("connection", "upgrade"), ("upgrade", v)]), &allowed);
        assert!(ok("websocket"));
        assert!(ok("WebSocket"));
        assert!(ok("websocket/13"));
        assert!(!ok("h2c"), "h2c is refused even when listed");
        assert!(!ok("H2C"));
        assert!(!ok("websocket, h2c"), "every protocol offered must be allowed");
        assert!(!ok("foo"));
        assert!(!ok(" , "));
        assert!(!upgrade_allowed(&map(&[("connection", "upgrade")]), &allowed));
    }

    #[test]
    fn appends_to_an_existing_forwarded_for() {
        let ip = HeaderValue::from_static("127.0.0.9");
        let mut h = map(&[("x-forwarded-for", "10.1.1.1")]);
        set_forwarded(&mut h, &ip, "https", Some(&HeaderValue::from_static("shop")));
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &ip, "http", None);
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
    }
}
