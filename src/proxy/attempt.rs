//! One attempt at one upstream: send the prepared request, and either wrap the answer so it
//! records its outcome when it ends, or settle a failure and say what the client gets.

use crate::telemetry::error_chain;
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::body::{self, Exchange, ProxyBody, RecordingBody, Tap};
use super::{headers, local};
use crate::stats::Class;
use crate::upstream::{Clients, UpstreamBody};

/// A failed attempt: already settled as the version's error; `response` is what the client
/// gets unless the request is retried elsewhere.
pub struct Failure {
    /// 502 or 504.
    pub response: Response<ProxyBody>,
}

/// Sends `parts` + `body` through `ex`'s endpoint. A bodyless request whose connection is
/// refused moves to another endpoint of the same version (nothing was sent).
pub async fn send(
    clients: &Clients,
    ex: &mut Exchange,
    mut parts: Parts,
    body: UpstreamBody,
    timeout: Duration,
) -> Result<Response<Incoming>, Failure> {
    let pool = ex.route().pool(ex.role());
    parts.version = if pool.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let path = parts.uri.path_and_query().cloned();
    let empty = http_body::Body::is_end_stream(&body);
    let replay = (pool.endpoints().len() > 1 && empty).then(|| (parts.method.clone(), parts.headers.clone()));
    parts.uri = upstream_uri(&pool.get(ex.endpoint()).authority, path.as_ref());
    let client = clients.for_pool(pool);
    let mut result = tokio::time::timeout(timeout, client.request(Request::from_parts(parts, body))).await;

    if let (Ok(Err(e)), Some((method, headers))) = (&result, replay)
        && e.is_connect()
    {
        let failed = ex.endpoint();
        let next = {
            let pool = ex.route().pool(ex.role());
            pool.get(failed).connect_failed();
            pool.pick(Some(failed))
        };
        if let Some(next) = next {
            ex.move_to(next);
            let pool = ex.route().pool(ex.role());
            debug!(route = %ex.route().config.name, failed = %pool.get(failed).addr, next = %pool.get(next).addr, "connect failed; trying another endpoint");
            let retry = bodyless(method, headers, pool.h2, upstream_uri(&pool.get(next).authority, path.as_ref()));
            result = tokio::time::timeout(timeout, client.request(retry)).await;
        }
    }

    let pool = ex.route().pool(ex.role());
    let ep = pool.get(ex.endpoint());
    match result {
        Ok(Ok(resp)) => {
            ep.succeeded();
            Ok(resp)
        }
        Ok(Err(e)) => {
            if e.is_connect() {
                ep.connect_failed();
            }
            warn!(route = %ex.route().config.name, role = ex.role().label(), endpoint = %ep.addr, error = %error_chain(&e), "upstream request failed");
            ex.settle(Class::Error, true);
            Err(Failure { response: local(StatusCode::BAD_GATEWAY, "veer: upstream connection failed\n") })
        }
        Err(_) => {
            warn!(route = %ex.route().config.name, role = ex.role().label(), endpoint = %ep.addr, "upstream timed out");
            ex.settle(Class::Error, true);
            Err(Failure { response: local(StatusCode::GATEWAY_TIMEOUT, "veer: upstream timed out\n") })
        }
    }
}

/// A request with no body (a replay of a bodyless request).
pub fn bodyless(method: Method, headers: HeaderMap, h2: bool, uri: Uri) -> Request<UpstreamBody> {
    let mut r = Request::new(Either::Right(Full::default()));
    *r.method_mut() = method;
    *r.headers_mut() = headers;
    *r.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    *r.uri_mut() = uri;
    r
}

/// The client's response: the upstream answer, cleaned, with a body that records the outcome
/// (and reports the answer to a waiting mirror comparison) when it ends.
pub fn respond(
    mut ex: Exchange,
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    tap: Option<Tap>,
) -> Response<ProxyBody> {
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
    let body = RecordingBody::new(incoming, ex, class, fault, grpc, tap);
    Response::from_parts(parts, Either::Left(body))
}

/// `http://authority/path`.
pub fn upstream_uri(authority: &http::uri::Authority, path: Option<&http::uri::PathAndQuery>) -> Uri {
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
