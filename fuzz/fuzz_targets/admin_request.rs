//! Structured requests through `veer::admin::handle`, against one real proxy started once per
//! process (loopback, ephemeral ports, a token file, a route with a candidate and one
//! without). Commands and reloads really run, so the rollout state wanders as fuzzing goes.
//!
//! Checked on every request: no panic; no 5xx (the token file is readable, the control plane
//! runs and the state directory is writable, so nothing here excuses one); a mutating call
//! without the token or from another site never succeeds; every answer has a Content-Type and
//! JSON answers parse.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use veer::config::Config;
use veer::operations::Operations;
use veer::server::Proxy;

const TOKEN: &str = "fuzz-token";

// Variants that lead somewhere come first: arbitrary picks the first one when input runs out.
#[derive(Arbitrary, Debug)]
enum Verb {
    Post,
    Get,
    Put,
    Delete,
    Head,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum RouteName {
    Web,
    Plain,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum CommandName {
    Promote,
    Abort,
    Pause,
    Resume,
    Retry,
    Raw(String),
}

/// The admin API's endpoints, and free-form paths from known and arbitrary segments.
#[derive(Arbitrary, Debug)]
enum Target {
    Command(RouteName, CommandName),
    Reload,
    Route(RouteName),
    Report(RouteName),
    Routes,
    Events,
    Metrics,
    Healthz,
    Readyz,
    Dashboard,
    Segments(Vec<Segment>),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Empty,
    Api,
    V1,
    Routes,
    Web,
    Events,
    Report,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum QueryKey {
    Limit,
    Route,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Auth {
    Valid,
    Absent,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Origin {
    Absent,
    SameSite { https: bool },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Empty,
    Reason(String),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    verb: Verb,
    target: Target,
    trailing_slash: bool,
    query: Vec<(QueryKey, String)>,
    auth: Auth,
    host: Option<Vec<u8>>,
    origin: Origin,
    content_type: Option<Vec<u8>>,
    body: Payload,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    ops: Arc<Operations>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // Kept for the life of the process (fuzz/run.sh points TMPDIR at a folder it removes).
        let dir = tempfile::tempdir().expect("tempdir").keep();
        std::fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).expect("token file");
        // Nothing listens on the upstream ports: no data-plane traffic is sent.
        let free = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
        let (stable, candidate, plain) = (free(), free(), free());
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\
             [state]\ndir = \"state\"\n\
             [[routes]]\nname = \"web\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{stable}\"]\n\
             [routes.candidate]\nversion = \"v2\"\nendpoints = [\"{candidate}\"]\n\
             [routes.rollout]\nsteps = [10, 50, 100]\nmin_requests = 0\nstep_interval = \"1h\"\n\
             [[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\n[routes.stable]\nversion = \"v1\"\n\
             endpoints = [\"{plain}\"]\n"
        );
        let path = dir.join("veer.toml");
        std::fs::write(&path, text).expect("config file");
        let config = Config::load(&path).expect("harness config is valid");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let proxy = runtime.block_on(Proxy::start_with(config)).expect("proxy starts");
        let ops = proxy.operations().clone();
        // Dropping the proxy would stop its tasks; it lives as long as the process.
        std::mem::forget(proxy);
        Harness { runtime, ops }
    })
}

fn route(r: &RouteName) -> &str {
    match r {
        RouteName::Web => "web",
        RouteName::Plain => "plain",
        RouteName::Raw(s) => s,
    }
}

fn path(t: &Target) -> String {
    match t {
        Target::Command(r, c) => {
            let c = match c {
                CommandName::Promote => "promote",
                CommandName::Abort => "abort",
                CommandName::Pause => "pause",
                CommandName::Resume => "resume",
                CommandName::Retry => "retry",
                CommandName::Raw(s) => s,
            };
            format!("/api/v1/routes/{}/{c}", route(r))
        }
        Target::Reload => "/api/v1/reload".into(),
        Target::Route(r) => format!("/api/v1/routes/{}", route(r)),
        Target::Report(r) => format!("/api/v1/routes/{}/report", route(r)),
        Target::Routes => "/api/v1/routes".into(),
        Target::Events => "/api/v1/events".into(),
        Target::Metrics => "/metrics".into(),
        Target::Healthz => "/healthz".into(),
        Target::Readyz => "/readyz".into(),
        Target::Dashboard => "/".into(),
        Target::Segments(segments) => segments
            .iter()
            .map(|s| match s {
                Segment::Empty => "/",
                Segment::Api => "/api",
                Segment::V1 => "/v1",
                Segment::Routes => "/routes",
                Segment::Web => "/web",
                Segment::Events => "/events",
                Segment::Report => "/report",
                Segment::Raw(s) => s,
            })
            .collect(),
    }
}

/// The request, or `None` when the input spells no valid method or URI (hyper would have
/// refused it before the admin API sees it).
fn request(input: &Input) -> Option<Request<Full<Bytes>>> {
    let method = match &input.verb {
        Verb::Get => Method::GET,
        Verb::Post => Method::POST,
        Verb::Put => Method::PUT,
        Verb::Delete => Method::DELETE,
        Verb::Head => Method::HEAD,
        Verb::Other(m) => Method::from_bytes(m.as_bytes()).ok()?,
    };
    let mut uri = path(&input.target);
    if input.trailing_slash {
        uri.push('/');
    }
    if !input.query.is_empty() {
        let pairs: Vec<String> = input
            .query
            .iter()
            .map(|(k, v)| {
                let k = match k {
                    QueryKey::Limit => "limit",
                    QueryKey::Route => "route",
                    QueryKey::Raw(k) => k,
                };
                format!("{k}={v}")
            })
            .collect();
        uri = format!("{uri}?{}", pairs.join("&"));
    }
    let mut b = Request::builder().method(method).uri(uri.parse::<http::Uri>().ok()?);
    let host = input.host.as_deref().unwrap_or(b"127.0.0.1:9901");
    b = b.header(header::HOST, http::HeaderValue::from_bytes(host).ok()?);
    match &input.auth {
        Auth::Valid => b = b.header(header::AUTHORIZATION, format!("Bearer {TOKEN}")),
        Auth::Raw(v) => b = b.header(header::AUTHORIZATION, http::HeaderValue::from_bytes(v).ok()?),
        Auth::Absent => {}
    }
    match &input.origin {
        Origin::SameSite { https } => {
            let scheme = if *https { "https" } else { "http" };
            let origin = format!("{scheme}://{}", String::from_utf8_lossy(host));
            b = b.header(header::ORIGIN, http::HeaderValue::from_str(&origin).ok()?);
        }
        Origin::Raw(v) => b = b.header(header::ORIGIN, http::HeaderValue::from_bytes(v).ok()?),
        Origin::Absent => {}
    }
    if let Some(ct) = &input.content_type {
        b = b.header(header::CONTENT_TYPE, http::HeaderValue::from_bytes(ct).ok()?);
    }
    let body = match &input.body {
        Payload::Empty => Bytes::new(),
        Payload::Reason(r) => Bytes::from(serde_json::json!({ "reason": r }).to_string()),
        Payload::Raw(v) => Bytes::from(v.clone()),
    };
    b.body(Full::new(body)).ok()
}

fuzz_target!(|input: Input| {
    let Some(req) = request(&input) else { return };
    let h = harness();
    let mutating = req.method() == Method::POST;
    let bearer = format!("Bearer {TOKEN}");
    let authorized = req.headers().get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == bearer.as_bytes());
    let same_site = match req.headers().get(header::ORIGIN) {
        None => true,
        Some(o) => {
            let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
            let origin = o.to_str().ok();
            origin.zip(host).is_some_and(|(o, h)| o == format!("http://{h}") || o == format!("https://{h}"))
        }
    };
    let what = format!("{} {}", req.method(), req.uri());
    let resp = h.runtime.block_on(veer::admin::handle(&h.ops, req));
    let status = resp.status();
    assert!(!status.is_server_error(), "{what}: {status}");
    if mutating && !(authorized && same_site) {
        assert!(!status.is_success(), "{what}: {status} without a token or from another site");
    }
    if status == StatusCode::UNAUTHORIZED {
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE), "{what}: 401 without WWW-Authenticate");
    }
    let content_type = resp.headers().get(header::CONTENT_TYPE);
    assert!(content_type.is_some(), "{what}: {status} without a Content-Type");
    let json = content_type.is_some_and(|v| v == "application/json");
    let body = h.runtime.block_on(resp.into_body().collect()).expect("full body").to_bytes();
    if json && let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
        panic!("{what}: {status} answer is not JSON ({e}): {}", String::from_utf8_lossy(&body));
    }
});
