//! One client connection: which protocol it speaks, and serving it until it ends or the proxy
//! drains.
//!
//! The protocol is decided before hyper sees a byte, so that each connection holds only the
//! state of the protocol it speaks: over TLS, ALPN says; in plain text, the first bytes are
//! *peeked* (not read) and compared with the HTTP/2 preface. (hyper's auto-detecting server
//! reads those bytes instead and hands them back through a wrapper, which costs every
//! HTTP/1.1 connection a doubled read buffer for its lifetime.)
//! The hyper settings are built once per configuration generation ([`ConnSettings`]), not per
//! connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::config::ServerConfig;
use crate::proxy::{self, ConnInfo};
use crate::server::Shared;

/// What every client connection of one configuration generation is served with: the TLS
/// acceptor and the hyper builders, built when the generation is published.
pub struct ConnSettings {
    /// The HTTPS listener's acceptor, when one is configured.
    pub tls: Option<TlsAcceptor>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

/// hyper keeps up to this many request headers on the stack; asking for a limit, even the
/// same one, moves them to the heap on every request.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

impl ConnSettings {
    /// The settings for a generation's `[server]` table.
    pub fn new(s: &ServerConfig, tls: Option<TlsAcceptor>) -> ConnSettings {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_header_size(s.max_header_bytes)
            .max_buf_size(s.max_header_bytes.max(8192));
        if s.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(s.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256);
        ConnSettings { tls, h1, h2, header_read_timeout: s.header_read_timeout }
    }
}

impl std::fmt::Debug for ConnSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSettings").field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// A prefix of the HTTP/2 preface: too few bytes to tell yet.
    Partial,
}

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the bytes a client sent first say about its protocol.
fn classify(first: &[u8]) -> Protocol {
    let n = first.len().min(PREFACE.len());
    if n == 0 || first[..n] != PREFACE[..n] {
        Protocol::Http1
    } else if n == PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Partial
    }
}

/// How long a drain waits for the first request of a connection accepted before it (at most
/// `header_read_timeout`).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves one accepted client connection to its end (or the end of a drain).
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = shared.conn_settings();
    let client_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP address is a valid header value");
    let info = Arc::new(ConnInfo { shared, client_ip, proto: if tls { "https" } else { "http" } });
    let deadline = Instant::now() + settings.header_read_timeout;
    match (tls, &settings.tls) {
        (false, _) => {
            let Some(protocol) = sniff(&stream, deadline, &mut shutdown).await else { return };
            run(&settings, protocol, TokioIo::new(stream), info, shutdown).await
        }
        // Boxed: a TLS session is large, and plain connections should not carry its room.
        (true, Some(acceptor)) => {
            Box::pin(serve_tls(acceptor, stream, peer, deadline, &settings, info, shutdown)).await
        }
        (true, None) => debug!(%peer, "TLS connection without a TLS configuration"),
    }
}

/// The TLS handshake (within `header_read_timeout`), then the protocol ALPN chose.
async fn serve_tls(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    settings: &ConnSettings,
    info: Arc<ConnInfo>,
    shutdown: watch::Receiver<bool>,
) {
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            // HTTP/2 over TLS is negotiated with ALPN or not spoken (RFC 9113, 3.2).
            let protocol = if s.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
            run(settings, protocol, TokioIo::new(s), info, shutdown).await
        }
        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

/// Waits for the client's first bytes (without consuming them) and classifies them. `None`:
/// the client sent nothing it could be served on in time, or closed, or the proxy is draining
/// and the client has not spoken within the grace.
async fn sniff(stream: &TcpStream, deadline: Instant, shutdown: &mut watch::Receiver<bool>) -> Option<Protocol> {
    let classified = async {
        let mut first = [0u8; PREFACE.len()];
        // A preface cut short by the network (rare: clients send it in one write) is peeked
        // again, after a pause that grows, until it is whole or tells HTTP/1.1 apart.
        let mut pause = Duration::from_millis(1);
        loop {
            match stream.peek(&mut first).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => match classify(&first[..n]) {
                    Protocol::Partial => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(100));
                    }
                    protocol => return Some(protocol),
                },
            }
        }
    };
    tokio::pin!(classified);
    tokio::select! {
        p = &mut classified => return p,
        _ = tokio::time::sleep_until(deadline) => return None,
        _ = shutdown.wait_for(|draining| *draining) => {}
    }
    // Accepted before the drain: a request already on its way is still served.
    let grace = deadline.min(Instant::now() + FIRST_REQUEST_GRACE);
    tokio::time::timeout_at(grace, classified).await.ok().flatten()
}

/// Serves `io` with the builder for `protocol`. Only an HTTP/1.1 connection lives inline in
/// the connection task: HTTP/2's is boxed, so that the task of every HTTP/1.1 connection
/// (nearly all of them) is no larger than it needs.
async fn run<I>(
    settings: &ConnSettings,
    protocol: Protocol,
    io: I,
    info: Arc<ConnInfo>,
    shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // Set when the first request arrives (see `drive`).
    let first = Arc::new((AtomicBool::new(false), Notify::new()));
    let seen = first.clone();
    let svc = service_fn(move |req| {
        if !seen.0.load(Ordering::Relaxed) {
            seen.0.store(true, Ordering::Relaxed);
            seen.1.notify_one();
        }
        proxy::handle(info.clone(), req)
    });
    let grace = settings.header_read_timeout.min(FIRST_REQUEST_GRACE);
    if protocol == Protocol::Http2 {
        Box::pin(drive(settings.h2.serve_connection(io, svc), &first, grace, shutdown)).await
    } else {
        drive(settings.h1.serve_connection(io, svc).with_upgrades(), &first, grace, shutdown).await
    }
}

/// A hyper server connection that can be asked to finish its in-flight requests and stop.
trait Graceful: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Runs `conn` to its end; when the proxy drains, lets in-flight requests finish first.
async fn drive<C: Graceful>(
    conn: C,
    first: &(AtomicBool, Notify),
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r { debug!(error = %e, "client connection ended with an error") }
            return;
        }
        _ = shutdown.wait_for(|draining| *draining) => {}
    }
    // hyper drops a connection whose first bytes it has not read yet, although the client,
    // whose connection was accepted, may have sent its request already: give it a moment.
    if !first.0.load(Ordering::Relaxed) {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { debug!(error = %e, "client connection ended with an error while draining") }
                return;
            }
            _ = tokio::time::timeout(grace, first.1.notified()) => {}
        }
    }
    conn.as_mut().shutdown();
    if let Err(e) = conn.await {
        debug!(error = %e, "client connection ended with an error while draining")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_and_its_prefixes_are_told_apart_from_http1() {
        assert_eq!(classify(PREFACE), Protocol::Http2);
        assert_eq!(classify(b"PRI * HT"), Protocol::Partial);
        assert_eq!(classify(b"P"), Protocol::Partial);
        assert_eq!(classify(b"POST / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n"), Protocol::Http1);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"), Protocol::Http1);
    }
}
