//! The admin API: health, readiness, metrics, route status and reload, and the dashboard page.
//!
//! A small hyper service routed with a plain `match` on method and path. It only reads state
//! and sends commands (a reload); it never changes the data plane by itself. Loopback by
//! default. When `admin.token_file` is set, mutating calls need `Authorization: Bearer
//! <token>`, compared in constant time.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::conn_settings::ConnSettings;
use crate::connection;
use crate::control::CommandFailure;
use crate::control::controller::CommandError;
use crate::history::HistoryError;
use crate::operations::Operations;
use crate::reload::{self, ReloadError};
use crate::report;
use crate::rollout::machine::Command;
use crate::status::RouteStatus;

type AdminResponse = Response<Full<Bytes>>;

/// Accepts admin connections until shutdown completes (the owner aborts this task). At most
/// `max_connections` are served at once; beyond that, accepting pauses and further clients
/// wait in the listen backlog, so that they never take file descriptors from the proxy
/// listener. Each connection has `[admin]`'s header and idle timeouts (as of start).
pub async fn serve(listener: TcpListener, ops: Arc<Operations>, max_connections: usize) {
    let settings = Arc::new(ConnSettings::admin(&ops.snapshot().config.admin));
    let limit = Arc::new(Semaphore::new(max_connections));
    // Connections live in this task's set: when the proxy stops the admin server, its
    // keep-alive connections stop with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ops = ops.clone();
        let settings = settings.clone();
        connections.spawn(async move {
            let handler = move |req| {
                let ops = ops.clone();
                async move { handle(&ops, req).await }
            };
            connection::serve_admin(stream, &settings, handler).await;
            debug!(%peer, "admin connection closed");
            drop(permit);
        });
    }
}

/// Answers one admin request. Generic over the body so that the fuzz target (`fuzz/`) can drive
/// it with in-memory requests; the server passes hyper's `Incoming`.
pub async fn handle<B>(ops: &Operations, req: Request<B>) -> AdminResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if let Some(resp) = misdirected(ops, &req) {
        return resp;
    }
    let mutating = req.method() == Method::POST;
    if mutating && let Some(resp) = cross_site(&req).or_else(|| refusal(ops, &req)) {
        return resp;
    }
    match (req.method(), segments.as_slice()) {
        (&Method::GET, [] | ["index.html"]) => dashboard(),
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["readyz"]) if ops.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        (&Method::GET, ["readyz"]) => readyz(ops),
        (&Method::GET, ["metrics"]) => {
            ops.snapshot().flush_metrics();
            let mut r = Response::new(Full::new(Bytes::from(ops.telemetry().render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, ["api", "v1", "routes"]) => {
            let snap = ops.snapshot();
            let all: Vec<RouteStatus> = snap.routes.iter().map(|r| RouteStatus::of(r)).collect();
            json(StatusCode::OK, &all)
        }
        (&Method::GET, ["api", "v1", "routes", name]) => match ops.snapshot().route(name) {
            Some(r) => json(StatusCode::OK, &RouteStatus::of(r)),
            None => error(StatusCode::NOT_FOUND, format!("no route named {name:?}")),
        },
        (&Method::POST, ["api", "v1", "reload"]) => match reload::reload(ops).await {
            Ok(summary) => json(StatusCode::OK, &summary),
            Err(e) => reload_error(&e),
        },
        (&Method::POST, ["api", "v1", "routes", name, verb]) => match Command::parse(verb) {
            Some(cmd) => {
                let name = name.to_string();
                command(ops, &name, cmd, req).await
            }
            None => error(
                StatusCode::NOT_FOUND,
                format!("unknown rollout command {verb:?}; expected promote, abort, pause, resume or retry"),
            ),
        },
        (&Method::GET, ["api", "v1", "events"]) => {
            let query = Query::parse(req.uri().query());
            let limit = match query.get("limit").map(str::parse::<usize>) {
                Some(Ok(n)) => n,
                Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be a non-negative integer".into()),
                None => 1000,
            };
            match ops.history().events(query.get("route"), limit).await {
                Ok(events) => json(StatusCode::OK, &events),
                Err(e) => history_error(&e),
            }
        }
        (&Method::GET, ["api", "v1", "routes", name, "report"]) => match ops.snapshot().route(name) {
            Some(r) => {
                let status = RouteStatus::of(r);
                let history = ops.history();
                let read = match &status.candidate {
                    Some(c) => history.rollout_events(name, &c.version).await,
                    None => history.events(Some(name), REPORT_EVENTS).await,
                };
                let events = match read {
                    Ok(events) => events,
                    Err(e) => return history_error(&e),
                };
                let mut resp = Response::new(Full::new(Bytes::from(report::render(&status, &events))));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/markdown; charset=utf-8"));
                resp
            }
            None => error(StatusCode::NOT_FOUND, format!("no route named {name:?}")),
        },
        (_, [] | ["index.html" | "healthz" | "readyz" | "metrics"]) | (_, ["api", "v1", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method()))
        }
        _ => error(StatusCode::NOT_FOUND, format!("no admin endpoint at {path}")),
    }
}

/// DNS rebinding: a page on `rebind.evil`, whose name the attacker then points at 127.0.0.1,
/// talks to a loopback admin API as a same-origin page (its `Origin` matches its `Host`). On a
/// loopback listener only loopback names — `localhost`, `127.0.0.0/8`, `[::1]`, any port — and
/// the host of `admin.public_url` are accepted in `Host`; anything else is answered 421.
/// (A request without a `Host`, or with an empty one, comes from no browser and passes.)
fn misdirected<B>(ops: &Operations, req: &Request<B>) -> Option<AdminResponse> {
    let snap = ops.snapshot();
    let admin = &snap.config.admin;
    if !admin.listen.ip().is_loopback() {
        return None;
    }
    let host = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok().map(str::to_string),
        None => Some(req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default()),
    };
    let allowed = host.as_deref().is_some_and(|h| h.is_empty() || loopback_host(h, admin.public_url.as_ref()));
    (!allowed).then(|| {
        let shown = host.unwrap_or_else(|| "(not text)".into());
        error(
            StatusCode::MISDIRECTED_REQUEST,
            format!("Host {shown:?} is not this admin API's name: use 127.0.0.1, [::1] or localhost (or set admin.public_url)"),
        )
    })
}

/// True when `host` (with or without a port) names the loopback interface or the host of
/// `public_url`.
fn loopback_host(host: &str, public_url: Option<&http::Uri>) -> bool {
    let Ok(authority) = host.parse::<http::uri::Authority>() else { return false };
    let name = authority.host();
    if name.eq_ignore_ascii_case("localhost")
        || public_url.and_then(|u| u.host()).is_some_and(|p| name.eq_ignore_ascii_case(p))
    {
        return true;
    }
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A browser on another site must not be able to abort or promote a rollout through an
/// operator's browser: a mutating call that carries an `Origin` must come from the admin
/// server's own origin. (CLI and scripts send no `Origin`.)
fn cross_site<B>(req: &Request<B>) -> Option<AdminResponse> {
    let origin = req.headers().get(header::ORIGIN)?.to_str().unwrap_or("");
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let same = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host);
    (!same).then(|| error(StatusCode::FORBIDDEN, format!("cross-site request from {origin} refused")))
}

/// The refusal for a mutating call without a valid token, if one is configured.
fn refusal<B>(ops: &Operations, req: &Request<B>) -> Option<AdminResponse> {
    let file = ops.snapshot().config.admin.token_file.clone()?;
    let token = match std::fs::read_to_string(&file) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            warn!(file = %file.display(), error = %e, "cannot read admin token file; refusing mutating calls");
            return Some(error(StatusCode::SERVICE_UNAVAILABLE, "admin token file is unreadable".into()));
        }
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        None
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required".into());
        r.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        Some(r)
    }
}

async fn command<B>(ops: &Operations, route: &str, cmd: Command, req: Request<B>) -> AdminResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    #[derive(serde::Deserialize, Default)]
    struct Body {
        reason: Option<String>,
    }
    let body = match http_body_util::Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "command body is too large".into()),
    };
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Body>(&body) {
            Ok(b) => b.reason,
            Err(e) => {
                return error(StatusCode::BAD_REQUEST, format!("body must be JSON like {{\"reason\": \"...\"}}: {e}"));
            }
        }
    };
    let Some(sender) = ops.commands() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the control plane is not running".into());
    };
    match sender.command(route, cmd, reason).await {
        Ok(status) => json(StatusCode::OK, &status),
        Err(CommandFailure::Command(e @ CommandError::NotRecorded(_))) => {
            // In effect (weight 0 already), but a restart could not prove it without retrying.
            let status = ops.snapshot().route(route).map(|r| RouteStatus::of(r));
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": e.to_string(), "applied": true, "status": status }),
            )
        }
        Err(e @ CommandFailure::UnknownRoute(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(CommandFailure::Command(CommandError::Refused(why))) => error(StatusCode::CONFLICT, why),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// How many of a route's newest events a report of a route without candidate shows.
const REPORT_EVENTS: usize = 1000;

/// The answer when the history cannot be read: 503 while its store is unreachable.
fn history_error(e: &HistoryError) -> AdminResponse {
    let status = match e {
        HistoryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        HistoryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// 200 while serving, 503 while draining. Rollbacks the state dir has not recorded yet are
/// listed in the body but do not fail readiness: traffic is right (the candidate is at 0%),
/// and pulling every instance of a fleet whose disks filled up would hurt more.
fn readyz(ops: &Operations) -> AdminResponse {
    let snap = ops.snapshot();
    let mut body = String::from("ready\n");
    for route in &snap.routes {
        if let Some(p) = route.rollout().and_then(|r| r.view().journal_pending) {
            body.push_str(&format!(
                "journal: route {} has an unrecorded {} from {} ({} attempts): {}\n",
                route.config.name,
                p.kind.label(),
                p.at,
                p.attempts,
                p.error
            ));
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// `key=value&…` query parameters (no percent-decoding is needed for route names and numbers).
struct Query<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Query<'a> {
    fn parse(q: Option<&'a str>) -> Self {
        Query(q.unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')).collect())
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

fn reload_error(e: &ReloadError) -> AdminResponse {
    #[derive(Serialize)]
    struct Body {
        error: String,
        errors: Vec<String>,
    }
    let errors = match e {
        ReloadError::Config(c) if !c.diagnostics().is_empty() => {
            c.diagnostics().iter().map(|d| d.to_string()).collect()
        }
        other => vec![other.to_string()],
    };
    json(
        StatusCode::BAD_REQUEST,
        &Body { error: "configuration rejected; the running configuration is unchanged".into(), errors },
    )
}

/// The dashboard page: one self-contained HTML file (inline CSS and JS, nothing fetched from
/// elsewhere) that polls `/api/v1/routes` and posts the rollout commands.
fn dashboard() -> AdminResponse {
    const PAGE: &str = include_str!("admin/dashboard.html");
    const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                       connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, http::HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    r
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    let body = serde_json::to_vec_pretty(value).expect("status types serialize");
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: String) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::control::{ControlHandle, ControlPlane};
    use crate::data_plane::DataPlane;
    use crate::journal::Journal;
    use crate::notify::Notifier;
    use crate::snapshot::Snapshot;
    use crate::telemetry::Telemetry;
    use crate::upstream::Clients;

    /// One route with a candidate; its endpoints are never contacted (no request is proxied
    /// and no health check is configured).
    const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "shop"
path_prefix = "/"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:1"]
[routes.candidate]
version = "v2"
endpoints = ["127.0.0.1:2"]
"#;

    /// The operations handle of a proxy built in memory from [`CONFIG`], with its state in
    /// `dir`: no listener is bound. The control plane runs (on its own thread) when `control`
    /// is set; its handle must live as long as the test.
    fn operations(dir: &Path, control: bool) -> (Arc<Operations>, Option<ControlHandle>) {
        let src = format!("[state]\ndir = {:?}\n{CONFIG}", dir.display().to_string());
        let config = Arc::new(Config::parse(&dir.join("veer.toml"), &src).expect("valid config"));
        let telemetry = Telemetry::new();
        let snap = Snapshot::build(config.clone(), None, &telemetry, 1, None).expect("snapshot");
        let data = Arc::new(DataPlane::new(snap, Clients::new(&config.server), telemetry));
        let journal = Arc::new(Journal::new(&config.state_dir));
        let ops = Arc::new(Operations::new(data.clone(), config.source.clone(), journal.clone()));
        let handle = control.then(|| {
            let handle = ControlPlane::new(data, journal, Notifier::spawn(vec![]), None).spawn();
            ops.connect_control(handle.sender());
            handle
        });
        (ops, handle)
    }

    fn request(method: Method, path: &str, host: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    async fn call(ops: &Operations, req: Request<Full<Bytes>>) -> (StatusCode, String) {
        let resp = handle(ops, req).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("in-memory body").to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("utf-8 body"))
    }

    #[tokio::test]
    async fn route_status_is_answered_without_a_listener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ops, _control) = operations(dir.path(), false);
        let (status, body) = call(&ops, request(Method::GET, "/api/v1/routes/shop", "127.0.0.1:9901")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let route: RouteStatus = serde_json::from_str(&body).expect("a RouteStatus");
        assert_eq!(route.name, "shop");
        assert_eq!(route.candidate.map(|c| c.version).as_deref(), Some("v2"));
        let (status, _) = call(&ops, request(Method::GET, "/api/v1/routes/nope", "127.0.0.1:9901")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn readyz_turns_503_once_the_data_plane_drains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ops, _control) = operations(dir.path(), false);
        assert_eq!(call(&ops, request(Method::GET, "/readyz", "localhost")).await, (StatusCode::OK, "ready\n".into()));
        ops.data().start_draining();
        let (status, body) = call(&ops, request(Method::GET, "/readyz", "localhost")).await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
    }

    #[tokio::test]
    async fn a_foreign_host_is_misdirected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ops, _control) = operations(dir.path(), false);
        let (status, body) = call(&ops, request(Method::GET, "/healthz", "rebind.evil:9901")).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
        assert_eq!(call(&ops, request(Method::GET, "/healthz", "[::1]:9901")).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_command_goes_through_the_control_plane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (idle, _none) = operations(dir.path(), false);
        let (status, body) = call(&idle, request(Method::POST, "/api/v1/routes/shop/abort", "127.0.0.1")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "no control plane runs: {body}");

        let (ops, _control) = operations(dir.path(), true);
        let (status, body) = call(&ops, request(Method::POST, "/api/v1/routes/shop/abort", "127.0.0.1")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let route: RouteStatus = serde_json::from_str(&body).expect("a RouteStatus");
        assert_eq!(route.phase, crate::rollout::Phase::RolledBack);
        assert_eq!(ops.snapshot().route("shop").and_then(|r| r.rollout()).map(|r| r.weight_bp()), Some(0));
        let (status, body) = call(&ops, request(Method::POST, "/api/v1/routes/shop/abort", "127.0.0.1")).await;
        assert_eq!(status, StatusCode::CONFLICT, "a rolled-back rollout cannot be aborted again: {body}");
    }

    #[test]
    fn only_loopback_names_and_the_public_host_are_this_admin_api() {
        for ok in ["127.0.0.1", "127.0.0.1:9901", "127.8.9.10:1", "[::1]", "[::1]:9901", "localhost", "LOCALHOST:80"] {
            assert!(loopback_host(ok, None), "{ok}");
        }
        for bad in
            ["rebind.evil", "rebind.evil:9901", "10.0.0.1", "[::2]:9901", "localhost.evil", "127.0.0.1.evil", "a b"]
        {
            assert!(!loopback_host(bad, None), "{bad}");
        }
        let public: http::Uri = "https://veer.example.com:8443/".parse().expect("uri");
        assert!(loopback_host("veer.example.com", Some(&public)));
        assert!(loopback_host("Veer.Example.com:443", Some(&public)));
        assert!(!loopback_host("rebind.evil", Some(&public)));
    }
}
