//! The per-request path: route → pick version → pick endpoint → forward → record.
//!
//! The lifecycle of one request, in order:
//! 1. **route**: Host and path select a route of the current snapshot (none: 404);
//! 2. **admit**: the route's `max_inflight` bound (full: 503);
//! 3. **split**: the rollout's weight picks stable or candidate;
//! 4. **endpoint**: power of two choices among the version's available endpoints
//!    (none: the candidate's share falls back to stable; stable has none: 503);
//! 5. **forward**: headers rewritten, body streamed, `request_timeout` on the response head
//!    (timeout: 504, connect failure: 502, after one more endpoint for bodyless requests);
//! 6. **record**: the outcome is settled when the response body ends ([`body`]).
//!
//! Nothing here takes a lock or reads configuration except through the snapshot.

pub mod body;
pub mod headers;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::runtime::{Lane, Role};
use crate::server::Shared;
use crate::snapshot::Route;
use crate::stats::Class;
use body::{Exchange, ProxyBody, RecordingBody};

/// Response header naming the version that answered, when `expose_role_header` is on.
pub const ROLE_HEADER: &str = "x-veer-role";

/// What the proxy knows about the client connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    /// Shared proxy state.
    pub shared: Arc<Shared>,
    /// The peer address, ready to append to `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// Handles one request; never fails (errors become responses).
pub async fn handle(conn: Arc<ConnInfo>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let (route, expose_role, timeout) = {
        let snap = conn.shared.snapshot();
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host());
        match snap.find(host, req.uri().path()) {
            Some(r) => (r.clone(), snap.config.server.expose_role_header, snap.config.server.request_timeout),
            None => return Ok(local(StatusCode::NOT_FOUND, "veer: no route for this host and path\n")),
        }
    };
    if !route.admit() {
        return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "veer: route is at max_inflight\n"));
    }
    let (role, endpoint) = match pick(&route) {
        Some(p) => p,
        None => {
            route.release();
            return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "veer: no healthy endpoint\n"));
        }
    };
    let exchange = Exchange::begin(route, role, Lane::Judged, endpoint, start);
    let mut resp = forward(&conn, exchange, req, timeout).await;
    if expose_role {
        resp.headers_mut().insert(ROLE_HEADER, HeaderValue::from_static(role.label()));
    }
    Ok(resp)
}

/// Split, then an endpoint of the chosen version.
#[inline]
fn pick(route: &Route) -> Option<(Role, usize)> {
    if let Some(rollout) = route.rollout()
        && rollout.pick_candidate()
        && let Some(i) = route.pool(Role::Candidate).pick(None)
    {
        return Some((Role::Candidate, i));
    }
    route.stable.pick(None).map(|i| (Role::Stable, i))
}

async fn forward(
    conn: &ConnInfo,
    mut ex: Exchange,
    mut req: Request<Incoming>,
    timeout: std::time::Duration,
) -> Response<ProxyBody> {
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let pool = ex.route().pool(ex.role());
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let host = parts.headers.get(header::HOST).cloned();
    headers::set_forwarded(&mut parts.headers, &conn.client_ip, conn.proto, host.as_ref());
    parts.version = if pool.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let path = parts.uri.path_and_query().cloned();
    // A bodyless request that hits a refusing endpoint can go to another one: nothing was sent.
    let replay = (pool.endpoints().len() > 1 && http_body::Body::is_end_stream(&body))
        .then(|| (parts.method.clone(), parts.headers.clone()));

    let mut endpoint = ex.endpoint();
    parts.uri = upstream_uri(&pool.get(endpoint).authority, path.as_ref());
    let client = conn.shared.clients.for_pool(pool);
    let mut result =
        tokio::time::timeout(timeout, client.request(Request::from_parts(parts, Either::Left(body)))).await;

    if let (Ok(Err(e)), Some((method, headers))) = (&result, replay)
        && e.is_connect()
    {
        let failed = endpoint;
        let next = {
            let pool = ex.route().pool(ex.role());
            pool.get(failed).connect_failed();
            pool.pick(Some(failed))
        };
        if let Some(next) = next {
            ex.move_to(next);
            endpoint = next;
            let pool = ex.route().pool(ex.role());
            debug!(route = %ex.route().config.name, failed = %pool.get(failed).addr, next = %pool.get(next).addr, "connect failed; trying another endpoint");
            let mut retry = Request::new(Either::Right(Full::default()));
            *retry.method_mut() = method;
            *retry.headers_mut() = headers;
            *retry.version_mut() = if pool.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
            *retry.uri_mut() = upstream_uri(&pool.get(next).authority, path.as_ref());
            result = tokio::time::timeout(timeout, client.request(retry)).await;
        }
    }

    let pool = ex.route().pool(ex.role());
    let mut resp = match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            let ep = pool.get(endpoint);
            if e.is_connect() {
                ep.connect_failed();
            }
            warn!(route = %ex.route().config.name, role = ex.role().label(), endpoint = %ep.addr, error = %error_chain(&e), "upstream request failed");
            ex.settle(Class::Error, true);
            return local(StatusCode::BAD_GATEWAY, "veer: upstream connection failed\n");
        }
        Err(_) => {
            warn!(route = %ex.route().config.name, role = ex.role().label(), endpoint = %pool.get(endpoint).addr, "upstream timed out");
            ex.settle(Class::Error, true);
            return local(StatusCode::GATEWAY_TIMEOUT, "veer: upstream timed out\n");
        }
    };
    pool.get(endpoint).succeeded();

    let status = resp.status();
    let class = Class::of_status(status);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(splice(client_upgrade, upstream_upgrade));
    }
    let grpc = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let fault = class == Class::ServerError || (grpc && body::grpc_fault(resp.headers()));
    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    if switching {
        // The upgraded stream is the client's now; the exchange ends with the switch.
        ex.settle(class, false);
    }
    let body = RecordingBody::new(incoming, ex, class, fault, grpc);
    Response::from_parts(parts, Either::Left(body))
}

fn upstream_uri(authority: &http::uri::Authority, path: Option<&http::uri::PathAndQuery>) -> Uri {
    let mut p = http::uri::Parts::default();
    p.scheme = Some(http::uri::Scheme::HTTP);
    p.authority = Some(authority.clone());
    p.path_and_query = Some(path.cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    Uri::from_parts(p).expect("scheme, authority and path are set")
}

/// Joins the two halves of an upgraded connection until either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = hyper_util::rt::TokioIo::new(c);
            let mut u = hyper_util::rt::TokioIo::new(u);
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(error = %e, "protocol upgrade failed"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A short plain-text response generated by veer.
pub fn local(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(body::local_body(text));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
