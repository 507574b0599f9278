//! One attempt at one upstream: send the prepared request, and either wrap the answer so it
//! records its outcome when it ends, or settle a failure and say what the client gets.

use crate::telemetry::error_chain;
use std::future::Future;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use tracing::{debug, warn};

use super::body::{self, Exchange, ProxyBody, RecordingBody, Tap, Upload};
use super::error::{self, Refusal};
use super::{ConnInfo, headers};
use crate::stats::Class;
use crate::upstream::{Clients, PooledBody, UpstreamBody, request_target};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How long an attempt may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the end of the request body to the response head.
    pub request: Duration,
    /// Longest the request body (or the response body) may go without a byte.
    pub body_idle: Duration,
}

/// Sends `parts` + `body` through `ex`'s endpoint. A bodyless request whose connection is
/// refused moves to another endpoint of the same version (nothing was sent).
///
/// A failure comes back already settled (as the version's error, or as the client's or
/// veer's when it was theirs); the [`Refusal`] is what the client gets unless the request is
/// retried elsewhere.
///
/// Towards an HTTP/2 endpoint the client's Host becomes the `:authority` and no `host` field
/// is sent (RFC 9113 §8.3.1); the connection still goes to the endpoint's address.
pub async fn send(
    clients: &Clients,
    ex: &mut Exchange,
    mut parts: Parts,
    body: UpstreamBody,
    limits: Timeouts,
) -> Result<Response<PooledBody>, Refusal> {
    let pool = ex.route().pool(ex.role());
    let h2 = pool.h2;
    parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let path = parts.uri.path_and_query().cloned();
    let empty = http_body::Body::is_end_stream(&body);
    // Prepared requests keep `Upgrade` only when the client asked to switch protocols.
    let asked_upgrade = parts.headers.contains_key(header::UPGRADE);
    let host = if h2 { headers::take_authority(&mut parts.headers) } else { None };
    if !h2 && !empty {
        headers::frame_unsized_body(&parts.method, &mut parts.headers, http_body::Body::size_hint(&body).exact());
    }
    let replay = (pool.endpoints().len() > 1 && empty).then(|| (parts.method.clone(), parts.headers.clone()));
    let ep = pool.get(ex.endpoint());
    parts.uri = request_target(h2, host.as_ref().unwrap_or(&ep.authority), path.as_ref());
    let upload = ex.upload().cloned();
    let req = Request::from_parts(parts, body);
    let connected = AtomicBool::new(false);
    let mut result = head(ep.link(clients).send(req, h2, &connected), upload.as_deref(), limits).await;

    if let (Waited::Done(Err(e)), Some((method, headers))) = (&result, replay)
        && e.is_connect()
        && !e.is_cap_full()
        && !error::local_exhaustion(e)
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
            let ep = pool.get(next);
            debug!(route = %ex.route().config.name, failed = %pool.get(failed).addr, next = %ep.addr, "connect failed; trying another endpoint");
            let uri = request_target(h2, host.as_ref().unwrap_or(&ep.authority), path.as_ref());
            let retry = bodyless(method, headers, h2, uri);
            connected.store(false, Ordering::Relaxed);
            result = head(ep.link(clients).send(retry, h2, &connected), None, limits).await;
        }
    }

    let pool = ex.route().pool(ex.role());
    let ep = pool.get(ex.endpoint());
    let link = ep.link(clients);
    let route = &ex.route().config.name;
    let role = ex.role().label();
    match result {
        Waited::Done(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !asked_upgrade => {
            warn!(route = %route, role, endpoint = %ep.addr, "upstream switched protocols unasked (101 to a request without Upgrade)");
            Err(ex.settle_refusal(Refusal::UnaskedSwitch))
        }
        Waited::Done(Ok(resp)) => {
            ep.succeeded();
            Ok(resp)
        }
        Waited::Done(Err(e)) if e.is_cap_full() => {
            let (addr, open) = (ep.addr.clone(), link.open_connections());
            Err(cap_full(ex, addr, open))
        }
        Waited::Done(Err(e)) => {
            if let Some(error) = upload.as_ref().and_then(|u| u.failure()) {
                // The client's body broke, not the upstream: the client's fault.
                debug!(%route, role, error = %error_chain(&e), "client request body failed");
                return Err(ex.settle_refusal(error));
            }
            if error::local_exhaustion(&e) {
                // veer's own shortage: the endpoint is fine and does not back off.
                warn!(%route, role, endpoint = %ep.addr, error = %error_chain(&e), "out of local resources reaching the upstream");
                return Err(ex.settle_refusal(Refusal::Exhausted));
            }
            if e.is_connect() {
                ep.connect_failed();
            }
            if e.is_too_large() {
                warn!(%route, role, endpoint = %ep.addr, error = %error_chain(&e), "upstream response head is larger than server.max_upstream_headers fields or server.max_upstream_header_bytes bytes");
            } else {
                warn!(%route, role, endpoint = %ep.addr, error = %error_chain(&e), "upstream request failed");
            }
            Err(ex.settle_refusal(Refusal::UpstreamFailed))
        }
        Waited::TimedOut if !connected.load(Ordering::Relaxed) && link.saturated() => {
            let (addr, open) = (ep.addr.clone(), link.open_connections());
            Err(cap_full(ex, addr, open))
        }
        Waited::TimedOut => {
            warn!(%route, role, endpoint = %ep.addr, "upstream timed out");
            Err(ex.settle_refusal(Refusal::UpstreamTimeout))
        }
        Waited::ClientStalled => {
            debug!(%route, role = ex.role().label(), "client stopped sending its request body");
            Err(ex.settle_refusal(Refusal::BodyTimeout))
        }
    }
}

/// How waiting for a response head ended.
enum Waited<T> {
    Done(T),
    /// No head within `request_timeout` of the end of the body, or the upstream stopped
    /// taking the body.
    TimedOut,
    /// The client sent no byte of its body for `body_idle_timeout`.
    ClientStalled,
}

/// Waits for `fut` (the response head). The clock of `request_timeout` only starts once the
/// client's body is in; while it is still coming, each byte must follow the last within
/// `body_idle_timeout`.
async fn head<F: Future>(fut: F, upload: Option<&Upload>, limits: Timeouts) -> Waited<F::Output> {
    tokio::pin!(fut);
    let sent = Instant::now();
    loop {
        let deadline = match upload {
            Some(u) if !u.done() => u.last_byte().max(sent) + limits.body_idle,
            Some(u) => u.last_byte().max(sent) + limits.request,
            None => sent + limits.request,
        };
        if let Ok(r) = tokio::time::timeout_at(deadline.into(), &mut fut).await {
            return Waited::Done(r);
        }
        match upload {
            None => return Waited::TimedOut,
            Some(u) if u.done() => {
                if Instant::now() >= u.last_byte().max(sent) + limits.request {
                    return Waited::TimedOut;
                }
            }
            Some(u) => {
                if Instant::now() >= u.last_byte().max(sent) + limits.body_idle {
                    // Who stalled: the client (veer waits for its bytes) or the upstream
                    // (it stopped reading them, so veer stopped asking).
                    return if u.waiting_on_client() { Waited::ClientStalled } else { Waited::TimedOut };
                }
            }
        }
    }
}

/// The request never got a connection because veer's own per-endpoint cap stayed full for
/// the whole request timeout: veer's answer, not the version's, so it is never judged.
fn cap_full(ex: &mut Exchange, addr: String, open: usize) -> Refusal {
    warn!(route = %ex.route().config.name, role = ex.role().label(), endpoint = %addr, open, "no upstream connection free within request_timeout (server.max_connections_per_endpoint)");
    ex.settle_refusal(Refusal::EndpointFull)
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

/// The client's response: the upstream answer, cleaned, in the client's protocol version
/// (RFC 9110 §6.2: a proxy answers with its own version, whatever the upstream spoke), with a
/// body that records the outcome (and reports the answer to a waiting mirror comparison) when
/// it ends.
pub fn respond(
    mut ex: Exchange,
    mut resp: Response<PooledBody>,
    client_version: Version,
    client_upgrade: Option<(hyper::upgrade::OnUpgrade, Arc<ConnInfo>)>,
    tap: Option<Tap>,
    body_idle: Duration,
) -> Response<ProxyBody> {
    let status = resp.status();
    let class = Class::of_status(status);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    // A switch nobody asked for never gets here: `send` made it a 502.
    if let (true, Some((client_upgrade, conn))) = (switching, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(splice(client_upgrade, upstream_upgrade, conn));
    }
    let grpc = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let fault = class == Class::ServerError || (grpc && body::grpc_fault(resp.headers()));
    let (mut parts, incoming) = resp.into_parts();
    parts.version = client_version;
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // The upstream framed the body by its chunks, which hyper decoded: a Content-Length
        // beside them is stale (RFC 9112 §6.3) and would cut the body short towards the client.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    if switching {
        // The upgraded stream is the client's now; the exchange ends with the switch.
        ex.settle(class, false);
    }
    let body = RecordingBody::new(incoming, ex, (class, fault, grpc), body_idle, tap);
    Response::from_parts(parts, Either::Left(body))
}

/// Joins the two halves of an upgraded connection until either side closes, or a drain runs
/// out of time. `conn` (with its connection permit) lives as long as the tunnel does, so that
/// tunnels count against `max_connections` and a drain waits for them.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, conn: Arc<ConnInfo>) {
    let mut cut = conn.data.tunnels_cut();
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = hyper_util::rt::TokioIo::new(c);
            let mut u = hyper_util::rt::TokioIo::new(u);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                    if let Err(e) = r {
                        debug!(error = %e, "upgraded connection ended with an error");
                    }
                }
                _ = cut.wait_for(|cut| *cut) => debug!("upgraded connection cut: drain_timeout reached"),
            }
        }
        Err(e) => debug!(error = %e, "protocol upgrade failed"),
    }
    drop(conn);
}
