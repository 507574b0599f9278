//! The per-request path: route → assign a version → pick an endpoint → forward → record.
//!
//! The lifecycle of one request, in order:
//! 1. **route**: Host and path select a route of the current snapshot (none: 404);
//! 2. **admit**: the route's `max_inflight` bound (full: 503);
//! 3. **assign**: override header, sticky user, or the weighted split
//!    ([`crate::policy::assign`]); a bad override value is a 400;
//! 4. **endpoint**: power of two choices among the version's available endpoints; a candidate
//!    with none is charged the failure and stable serves the request; stable with none: 503;
//! 5. **forward**: headers rewritten, body streamed, `request_timeout` on the response head
//!    (timeout: 504, connect failure: 502) — [`attempt`];
//! 6. **shield**: a replayable request that failed on the candidate is re-sent to stable
//!    within the retry budget ([`crate::policy::retry`]); a share of stable's idempotent
//!    requests is copied to the candidate ([`crate::policy::mirror`]);
//! 7. **record**: the outcome is settled when the response body ends ([`body`]).
//!
//! Nothing here takes a lock or reads configuration except through the snapshot; the
//! policies cost nothing on routes that do not configure them.

mod attempt;
pub mod body;
pub mod error;
pub mod stall;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::data_plane::DataPlane;
use crate::headers;
use crate::policy::assign::Assignment;
use crate::policy::mirror;
use crate::policy::retry::RetryOutcome;
use crate::route_state::{Lane, Role};
use crate::snapshot::Route;
use crate::stats::{Class, Outcome, Source};
use attempt::Timeouts;
use body::{ClientBody, Exchange, ProxyBody, Tap, Upload};
use error::Refusal;

/// Response header naming the version that answered, when `expose_role_header` is on.
pub const ROLE_HEADER: &str = "x-veer-role";

/// What the proxy knows about the client connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The data plane the connection is served by.
    pub data: Arc<DataPlane>,
    /// The peer address, ready to append to `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The connection's `max_connections` slot: held as long as anything of the connection
    /// lives, an upgraded tunnel included.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// Handles one request; never fails (errors become responses, each counted).
pub async fn handle(conn: Arc<ConnInfo>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(req.headers());
    if let Some(refusal) = not_for_a_reverse_proxy(&req) {
        conn.data.telemetry.count_unrouted(refusal.source());
        return Ok(refusal.response(grpc));
    }
    let (route, expose_role, limits) = {
        let snap = conn.data.snapshot();
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host());
        let s = &snap.config.server;
        match snap.find(host, req.uri().path()) {
            Some(r) => (
                r.clone(),
                s.expose_role_header,
                Timeouts { request: s.request_timeout, body_idle: s.body_idle_timeout },
            ),
            None => {
                conn.data.telemetry.count_unrouted(Source::Proxy);
                return Ok(Refusal::NoRoute.response(grpc));
            }
        }
    };
    // Refused before a version is chosen: counted under stable, the route's own version.
    let Some(admission) = route.admit() else {
        return Ok(refuse(&route, Role::Stable, Refusal::Shed, grpc));
    };
    let assignment = match route.policy.assign.assign(&route, req.headers()) {
        Ok(a) => a,
        Err(e) => return Ok(refuse(&route, Role::Stable, Refusal::BadOverride(e.to_string()), grpc)),
    };
    let Some((role, lane, endpoint)) = endpoint_for(&route, assignment, start) else {
        return Ok(refuse(&route, Role::Stable, Refusal::NoEndpoint, grpc));
    };
    let ex = Exchange::begin(admission, role, lane, endpoint, start);
    // Not boxed here: the connection boxes each request's whole future (see
    // `connection::run`), so the forwarding state already lives only while a request does.
    let mut resp = forward(&conn, ex, req, limits, grpc).await;
    if expose_role && let Some(role) = resp.extensions().get::<Role>().copied() {
        resp.headers_mut().insert(ROLE_HEADER, HeaderValue::from_static(role.label()));
    }
    Ok(resp)
}

/// A gRPC request: its errors must be gRPC-shaped for the client to understand them.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Counts a refusal of a routed request under `role` (never judged: its source is veer or
/// the client) and answers it.
fn refuse(route: &Route, role: Role, refusal: Refusal, grpc: bool) -> Response<ProxyBody> {
    route.version(role).lane(Lane::Judged).record(Outcome::local(refusal.class(), refusal.source()));
    refusal.response(grpc)
}

/// Requests a reverse proxy must not pass on: `CONNECT` (veer is never an open proxy), an
/// HTTP/1.1 request without `Host` or an HTTP/1 request with several (RFC 9112 §3.2: which
/// one would pick the route?), and an absolute-form request line naming another host than its
/// `Host` header. (Conflicting body framings never get here: hyper rejects duplicate
/// `Content-Length`s, and with both `Transfer-Encoding` and `Content-Length` it reads the
/// chunked body, drops the length and closes the connection after the answer, so nothing can
/// ride along.)
fn not_for_a_reverse_proxy(req: &Request<Incoming>) -> Option<Refusal> {
    if req.method() == http::Method::CONNECT {
        return Some(Refusal::Connect);
    }
    if req.version() < Version::HTTP_2 {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let first = hosts.next();
        if hosts.next().is_some() || (first.is_none() && req.version() == Version::HTTP_11) {
            return Some(Refusal::BadHost);
        }
    }
    let absolute = req.version() < Version::HTTP_2 && req.uri().authority().is_some();
    if absolute {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(crate::router::strip_port);
        let target = req.uri().host().unwrap_or("");
        if !host.is_some_and(|h| h.eq_ignore_ascii_case(target)) {
            return Some(Refusal::ForeignHost);
        }
    }
    None
}

/// The endpoint for an assignment. A candidate with no available endpoint fails the request
/// from the judge's point of view, and stable serves it.
#[inline]
fn endpoint_for(route: &Route, a: Assignment, start: Instant) -> Option<(Role, Lane, usize)> {
    if a.role == Role::Candidate {
        if let Some(i) = route.pool(Role::Candidate).pick(None) {
            return Some((Role::Candidate, a.lane, i));
        }
        let failure = Outcome { class: Class::Error, fault: true, latency: start.elapsed(), source: Source::Upstream };
        route.version(Role::Candidate).lane(a.lane).record(failure);
        return route.stable.pick(None).map(|i| (Role::Stable, Lane::Side, i));
    }
    route.stable.pick(None).map(|i| (Role::Stable, a.lane, i))
}

async fn forward(
    conn: &Arc<ConnInfo>,
    mut ex: Exchange,
    mut req: Request<Incoming>,
    limits: Timeouts,
    grpc: bool,
) -> Response<ProxyBody> {
    let client_version = req.version();
    // An upgrade the route does not allow is forwarded as a plain request: the hop-by-hop
    // stripping below removes its `Upgrade` and `Connection` headers.
    let upgrade = client_version == Version::HTTP_11
        && headers::is_upgrade(req.headers())
        && headers::upgrade_allowed(req.headers(), &ex.route().config.upgrades);
    let client_upgrade = upgrade.then(|| (hyper::upgrade::on(&mut req), conn.clone()));
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, conn, upgrade);
    let (role, judged) = (ex.role(), ex.lane() == Lane::Judged);
    let empty = http_body::Body::is_end_stream(&body);
    let (tap, replay) = {
        // Borrowed, not cloned: most requests take neither policy.
        let route = ex.route();
        // Stable's requests are copied to a live candidate; while it bakes at 100%, its own
        // requests are copied to stable, the other side of the bake's comparison.
        let to = route.rollout().and_then(|r| match role {
            Role::Stable if r.is_live() => Some(Role::Candidate),
            Role::Candidate if r.is_baking() => Some(Role::Stable),
            _ => None,
        });
        let timeout = limits.request;
        let tap = match (&route.policy.mirror, to, judged, upgrade) {
            (Some(m), Some(to), true, false) => {
                m.copy(to, &parts.method, &parts.uri, &parts.headers, empty).map(|copy| {
                    let (tx, rx) = oneshot::channel();
                    tokio::spawn(mirror::run(route.clone(), conn.data.clients.clone(), copy, rx, timeout));
                    Tap::new(tx, m.compare_body)
                })
            }
            _ => None,
        };
        let replay = match (&route.policy.retry, role, judged, upgrade) {
            (Some(r), Role::Candidate, true, false) if r.replayable(&parts.method, &parts.headers, empty) => {
                Some(r.max_body_bytes())
            }
            _ => None,
        };
        (tap, replay)
    };

    let Some(max_body) = replay else {
        let body = if empty {
            Either::Right(Full::default())
        } else {
            // Followed, so that a failure of the client's body is told apart from the
            // upstream's, and latency is measured from its end.
            let upload = Upload::new(ex.start());
            ex.watch_upload(upload.clone());
            Either::Left(ClientBody::new(body, upload))
        };
        // The version's latency runs from here, where the request leaves for its upstream (or
        // from the end of the client's upload, if later): veer's own routing and header work
        // before it is not the version's, and a mirrored copy is timed from its send too.
        ex.measure_from(Instant::now());
        let clients = &conn.data.clients;
        return match attempt::send(clients, &mut ex, parts, body, limits).await {
            Ok(resp) => tagged(attempt::respond(ex, resp, client_version, client_upgrade, tap, limits.body_idle), role),
            Err(refusal) => {
                if let Some(t) = tap {
                    t.finish(Class::Error);
                }
                tagged(refusal.response(grpc), role)
            }
        };
    };
    let buffered = match read_body(body, max_body, limits.body_idle).await {
        Ok(b) => b,
        Err(refusal) => return ex.settle_refusal(refusal).response(grpc),
    };
    // The client's part is over: the version's latency starts now.
    ex.measure_from(Instant::now());
    // Boxed: two attempts' worth of state, which the requests of routes without a retry
    // policy should not carry.
    Box::pin(shielded(conn, ex, parts, buffered, limits, grpc)).await
}

/// Reads a request body of at most `max` bytes (as its `Content-Length` promised) into
/// memory; the client may pause at most `idle` between bytes. Failures are the client's.
async fn read_body(mut body: Incoming, max: usize, idle: Duration) -> Result<Bytes, Refusal> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(Refusal::BodyTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(error::client_body_fault(&e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max {
                        return Err(Refusal::BadBody);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

/// A candidate attempt whose failure is re-sent to stable within the budget.
async fn shielded(
    conn: &ConnInfo,
    mut ex: Exchange,
    parts: Parts,
    body: Bytes,
    limits: Timeouts,
    grpc: bool,
) -> Response<ProxyBody> {
    let route = ex.route().clone();
    let Some(policy) = route.policy.retry.as_ref() else {
        return ex.settle_refusal(Refusal::Internal).response(grpc);
    };
    let clients = &conn.data.clients;
    let replay = (parts.method.clone(), parts.uri.clone(), parts.headers.clone());
    let client_version = parts.version;
    let idle = limits.body_idle;
    match attempt::send(clients, &mut ex, parts, Either::Right(Full::new(body.clone())), limits).await {
        // Not a 5xx, or the budget is spent: the candidate's answer is the user's.
        Ok(resp) if !policy.retries(resp.status().is_server_error()) => {
            return tagged(attempt::respond(ex, resp, client_version, None, None, idle), Role::Candidate);
        }
        Ok(resp) => {
            // The candidate answered 5xx: it is judged for it, and the user gets stable's answer.
            ex.settle(Class::of_status(resp.status()), true);
            drop(resp);
        }
        // Not worth a second try (veer ran short, or the client failed), or the budget is spent.
        Err(refusal) if !policy.retries(refusal.retryable()) => {
            return tagged(refusal.response(grpc), Role::Candidate);
        }
        Err(_) => {}
    }
    let start = ex.start();
    // The request keeps its one `max_inflight` slot for the retry.
    let admission = ex.into_admission();
    let Some(endpoint) = route.stable.pick(None) else {
        policy.count(RetryOutcome::Failed);
        return refuse(&route, Role::Stable, Refusal::NoEndpoint, grpc);
    };
    let mut stable = Exchange::begin(admission, Role::Stable, Lane::Side, endpoint, start);
    let (method, uri, headers) = replay;
    let mut req = Request::new(Either::Right(Full::new(body)));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let (parts, body) = req.into_parts();
    match attempt::send(clients, &mut stable, parts, body, limits).await {
        Ok(resp) => {
            policy.count(if resp.status().is_server_error() { RetryOutcome::Failed } else { RetryOutcome::Recovered });
            tagged(attempt::respond(stable, resp, client_version, None, None, idle), Role::Stable)
        }
        Err(refusal) => {
            policy.count(RetryOutcome::Failed);
            tagged(refusal.response(grpc), Role::Stable)
        }
    }
}

/// Rewrites the request head for the upstream: Host kept (or rebuilt from the HTTP/2
/// authority), hop-by-hop headers removed, `X-Forwarded-*` set.
fn prepare(parts: &mut Parts, conn: &ConnInfo, upgrade: bool) {
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let host = parts.headers.get(header::HOST).cloned();
    headers::set_forwarded(&mut parts.headers, &conn.client_ip, conn.proto, host.as_ref());
}

/// Marks which version answered (for `x-veer-role`).
fn tagged(mut r: Response<ProxyBody>, role: Role) -> Response<ProxyBody> {
    r.extensions_mut().insert(role);
    r
}
