//! One client connection: which protocol it speaks, and serving it until it ends or the proxy
//! drains.
//!
//! The protocol is decided before hyper sees a byte, so that each connection holds only the
//! state of the protocol it speaks: over TLS, ALPN says; in plain text, the first bytes are
//! *peeked* (not read) and compared with the HTTP/2 preface. (hyper's auto-detecting server
//! reads those bytes instead and hands them back through a wrapper, which costs every
//! HTTP/1.1 connection a doubled read buffer for its lifetime.)
//! The hyper settings are built once per configuration generation
//! ([`ConnSettings`], carried in the snapshot), not per connection.
//!
//! A watchdog bounds what a client may hold without doing anything: a connection with no
//! request in flight for `idle_timeout` is closed (HTTP/2: GOAWAY), and an HTTP/2 connection
//! whose client has begun a header block but not finished it within `header_read_timeout` is
//! cut (hyper bounds that for HTTP/1.1 itself, and only for HTTP/1.1). The admin listener
//! serves its connections the same way ([`serve_admin`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::conn_settings::ConnSettings;
use crate::data_plane::DataPlane;
use crate::proxy::error::Refusal;
use crate::proxy::stall::WriteStall;
use crate::proxy::{self, ConnInfo};
use crate::stats::Source;

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

/// Serves one accepted client connection to its end (or the end of a drain). The connection
/// permit lives in the connection's [`ConnInfo`], so an upgraded tunnel, which outlives the
/// HTTP connection, keeps holding it.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    data: Arc<DataPlane>,
    permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = data.snapshot().conn.clone();
    let client_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP address is a valid header value");
    let info = Arc::new(ConnInfo { data, client_ip, proto: if tls { "https" } else { "http" }, permit });
    let deadline = Instant::now() + settings.header_read_timeout;
    let max_headers = settings.max_headers;
    let handler = move |req: Request<Incoming>| {
        let info = info.clone();
        async move {
            // hyper's HTTP/2 server has no field-count limit: the one HTTP/1.1 gets is kept here.
            if req.version() == Version::HTTP_2 && req.headers().len() > max_headers {
                info.data.telemetry.count_unrouted(Source::Client);
                return Refusal::TooManyHeaders.response(proxy::is_grpc(req.headers()));
            }
            match proxy::handle(info, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    };
    match (tls, &settings.tls) {
        (false, _) => {
            let Some(protocol) = sniff(&stream, deadline, &mut shutdown).await else { return };
            let stream = WriteStall::new(stream, settings.body_idle_timeout);
            run(&settings, protocol, stream, handler, shutdown).await
        }
        // Boxed: a TLS session is large, and plain connections should not carry its room.
        (true, Some(acceptor)) => {
            Box::pin(serve_tls(acceptor, stream, peer, deadline, &settings, handler, shutdown)).await
        }
        (true, None) => debug!(%peer, "TLS connection without a TLS configuration"),
    }
}

/// Serves one admin connection with the admin listener's limits. The admin API is never
/// drained (it answers `/readyz` with 503 while the proxy drains): its owner aborts it.
pub(crate) async fn serve_admin<H, F>(stream: TcpStream, settings: &ConnSettings, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<http_body_util::Full<Bytes>>> + Send + 'static,
{
    let (_never, mut shutdown) = watch::channel(false);
    let deadline = Instant::now() + settings.header_read_timeout;
    let Some(protocol) = sniff(&stream, deadline, &mut shutdown).await else { return };
    run(settings, protocol, stream, handler, shutdown).await
}

/// The TLS handshake (within `header_read_timeout`), then the protocol ALPN chose.
async fn serve_tls<H, F, B>(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    settings: &ConnSettings,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            // HTTP/2 over TLS is negotiated with ALPN or not spoken (RFC 9113, 3.2).
            let protocol = if s.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
            let s = WriteStall::new(s, settings.body_idle_timeout);
            run(settings, protocol, s, handler, shutdown).await
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
async fn run<I, H, F, B>(
    settings: &ConnSettings,
    protocol: Protocol,
    io: I,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let seen = activity.clone();
    let svc = service_fn(move |req| {
        // Taken before the request is handled and released when its response body is done
        // with (or dropped): while any is held, the connection is not idle.
        let busy = Busy::enter(&seen);
        let fut = handler(req);
        // Boxed: hyper's HTTP/1.1 connection keeps a slot the size of this future allocated
        // for the connection's whole life, idle or not; boxed, the slot is one pointer and the
        // request's state lives only while the request does (one allocation per request).
        Box::pin(async move { Ok::<_, Infallible>(fut.await.map(|body| Tracked { body, _busy: busy })) })
    });
    let grace = settings.header_read_timeout.min(FIRST_REQUEST_GRACE);
    let watch = Watch { activity: &activity, idle: settings.idle_timeout, head: settings.header_read_timeout, grace };
    // The connection is pinned here and lent to `drive`: a future passed by value to an async
    // fn is stored twice in its state (the argument and the pinned local), and hyper's
    // connection is the largest thing a connection's task holds.
    if protocol == Protocol::Http2 {
        let io = TokioIo::new(FrameWatch { io, scan: FrameScan::default(), activity: activity.clone() });
        Box::pin(async move {
            let conn = std::pin::pin!(settings.h2.serve_connection(io, svc));
            drive(conn, watch, shutdown).await
        })
        .await
    } else {
        let conn = std::pin::pin!(settings.h1.serve_connection(TokioIo::new(io), svc).with_upgrades());
        drive(conn, watch, shutdown).await
    }
}

/// "Never" in the millisecond clocks of [`Activity`].
const NEVER: u64 = u64::MAX;

/// What a connection's watchdog reads: requests in flight, since when none has been, and
/// since when a request head has been arriving without being complete (HTTP/2 only). Times
/// are milliseconds since the connection was accepted.
struct Activity {
    born: Instant,
    active: AtomicUsize,
    idle_since: AtomicU64,
    head_since: AtomicU64,
    /// Told when a header block starts: the head deadline may be nearer than the one armed.
    head_started: Notify,
    /// Set (and told) when the first request arrives (see `drive`).
    first_seen: AtomicBool,
    first: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NEVER),
            head_started: Notify::new(),
            first_seen: AtomicBool::new(false),
            first: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }
}

/// One request in flight on a connection.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(a: &Arc<Activity>) -> Busy {
        a.active.fetch_add(1, Ordering::Relaxed);
        if !a.first_seen.load(Ordering::Relaxed) {
            a.first_seen.store(true, Ordering::Relaxed);
            a.first.notify_one();
        }
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        if a.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is done with.
    struct Tracked<B> {
        #[pin]
        body: B,
        _busy: Busy,
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Follows the HTTP/2 frames a client sends, only as far as telling whether it is in the
/// middle of a header block (or of any frame header): hyper's HTTP/2 server has no
/// header-read deadline, and a client that opens a HEADERS frame and stops would otherwise
/// hold its connection for as long as it likes.
#[derive(Debug)]
struct FrameScan {
    /// Bytes of the connection preface still to come.
    preface_left: u8,
    /// The frame header being read, and how much of it has arrived.
    head: [u8; 9],
    head_len: u8,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// The current frame carries a header block fragment.
    header_frame: bool,
    /// A header block has begun and its END_HEADERS frame has not been seen yet.
    block_open: bool,
}

impl Default for FrameScan {
    fn default() -> FrameScan {
        FrameScan {
            preface_left: PREFACE.len() as u8,
            head: [0; 9],
            head_len: 0,
            payload_left: 0,
            header_frame: false,
            block_open: false,
        }
    }
}

/// Frame types that carry a header block fragment (RFC 9113, 6.2, 6.6, 6.10) and the
/// END_HEADERS flag.
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

impl FrameScan {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = bytes.len().min(usize::from(self.preface_left));
                self.preface_left -= n as u8;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
            } else {
                let at = usize::from(self.head_len);
                let n = bytes.len().min(9 - at);
                self.head[at..at + n].copy_from_slice(&bytes[..n]);
                self.head_len += n as u8;
                bytes = &bytes[n..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    let h = self.head;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    self.header_frame = matches!(h[3], HEADERS | PUSH_PROMISE | CONTINUATION);
                    if self.header_frame {
                        self.block_open = h[4] & END_HEADERS == 0;
                    }
                }
            }
        }
    }

    /// The client is in the middle of a preface, a frame header or a header block.
    fn pending(&self) -> bool {
        (self.preface_left > 0 && usize::from(self.preface_left) < PREFACE.len())
            || self.head_len > 0
            || (self.header_frame && self.payload_left > 0)
            || self.block_open
    }
}

/// An HTTP/2 client connection's byte stream, with its incoming frames followed by a
/// [`FrameScan`] that reports to the connection's [`Activity`].
struct FrameWatch<I> {
    io: I,
    scan: FrameScan,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for FrameWatch<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            let was = this.scan.pending();
            this.scan.feed(&buf.filled()[before..]);
            match (was, this.scan.pending()) {
                (false, true) => {
                    this.activity.head_since.store(this.activity.now_ms(), Ordering::Relaxed);
                    this.activity.head_started.notify_one();
                }
                (true, false) => this.activity.head_since.store(NEVER, Ordering::Relaxed),
                _ => {}
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FrameWatch<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the watchdog of one connection enforces.
struct Watch<'a> {
    activity: &'a Activity,
    idle: Duration,
    head: Duration,
    /// How long a drain waits for a first request already on its way.
    grace: Duration,
}

/// The watchdog's finding.
enum WatchFinding {
    /// A header block has been arriving for longer than `header_read_timeout`.
    Cut,
    /// No request has been in flight for `idle_timeout`.
    Idle,
    /// Nothing due: look again then.
    Until(Instant),
}

impl Watch<'_> {
    fn finding(&self) -> WatchFinding {
        let a = self.activity;
        let now = Instant::now();
        let head_since = a.head_since.load(Ordering::Relaxed);
        let head_due = (head_since != NEVER).then(|| a.at(head_since) + self.head);
        if head_due.is_some_and(|due| due <= now) {
            return WatchFinding::Cut;
        }
        let idle_due = if a.active.load(Ordering::Relaxed) == 0 {
            let due = a.at(a.idle_since.load(Ordering::Relaxed)) + self.idle;
            if due <= now {
                return WatchFinding::Idle;
            }
            due
        } else {
            // Busy now; it can become idle no sooner than this.
            now + self.idle
        };
        WatchFinding::Until(head_due.map_or(idle_due, |h| h.min(idle_due)))
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

/// How long an idle connection that was told to close (HTTP/2: GOAWAY) may take to do so
/// before it is cut, when no request raced the GOAWAY.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Lets an idle connection that was asked to close finish: a client that ignores its GOAWAY
/// (and the ping that follows it) is cut after [`IDLE_CLOSE_GRACE`]; a request that raced the
/// GOAWAY gets up to `header_read_timeout` more.
async fn close_idle<C: Graceful>(mut conn: Pin<&mut C>, watch: &Watch<'_>) {
    let start = Instant::now();
    let grace = start + IDLE_CLOSE_GRACE.min(watch.head);
    if tokio::time::timeout_at(grace, conn.as_mut()).await.is_ok() {
        return;
    }
    if watch.activity.active.load(Ordering::Relaxed) > 0
        && tokio::time::timeout_at(start + watch.head, conn.as_mut()).await.is_ok()
    {
        return;
    }
    debug!("idle client connection cut: it did not close when asked to");
}

/// Runs `conn` to its end, under the watchdog; when the proxy drains, lets in-flight requests
/// finish first.
async fn drive<C: Graceful>(mut conn: Pin<&mut C>, watch: Watch<'_>, mut shutdown: watch::Receiver<bool>) {
    let first = Instant::now();
    let timer = tokio::time::sleep_until(first + watch.head.min(watch.idle));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { debug!(error = %e, "client connection ended with an error") }
                return;
            }
            // Mapped to `()`: the guard `wait_for` returns must not live across the awaits below.
            () = async { let _ = shutdown.wait_for(|draining| *draining).await; } => break,
            _ = &mut timer => match watch.finding() {
                WatchFinding::Cut => {
                    debug!("client connection cut: its request head took longer than header_read_timeout");
                    return;
                }
                WatchFinding::Idle => {
                    debug!("closing an idle client connection");
                    conn.as_mut().shutdown();
                    close_idle(conn.as_mut(), &watch).await;
                    return;
                }
                WatchFinding::Until(at) => timer.as_mut().reset(at),
            },
            _ = watch.activity.head_started.notified() => {
                if let WatchFinding::Until(at) = watch.finding()
                    && at < timer.deadline()
                {
                    timer.as_mut().reset(at);
                }
            }
        }
    }
    // hyper drops a connection whose first bytes it has not read yet, although the client,
    // whose connection was accepted, may have sent its request already: give it a moment.
    let a = watch.activity;
    if !a.first_seen.load(Ordering::Relaxed) {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { debug!(error = %e, "client connection ended with an error while draining") }
                return;
            }
            _ = tokio::time::timeout(watch.grace, a.first.notified()) => {}
        }
    }
    conn.as_mut().shutdown();
    // In-flight requests finish (the drain bounds them); a client with none that does not
    // close when told to (HTTP/2: ignores its GOAWAY) is cut instead of holding the drain.
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r { debug!(error = %e, "client connection ended with an error while draining") }
                return;
            }
            _ = tokio::time::sleep(IDLE_CLOSE_GRACE) => {
                if a.active.load(Ordering::Relaxed) == 0 {
                    debug!("idle client connection cut while draining: it did not close when asked to");
                    return;
                }
            }
        }
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

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_header_block_is_pending_until_its_end_headers_frame_is_whole() {
        let mut s = FrameScan::default();
        assert!(!s.pending(), "nothing sent yet is idle, not a head under way");
        s.feed(&PREFACE[..5]);
        assert!(s.pending(), "a partial preface");
        s.feed(&PREFACE[5..]);
        s.feed(&frame(4, 0, &[]));
        assert!(!s.pending(), "preface and SETTINGS: idle");
        let headers = frame(HEADERS, END_HEADERS, &[0x82; 20]);
        s.feed(&headers[..4]);
        assert!(s.pending(), "a partial frame header");
        s.feed(&headers[4..15]);
        assert!(s.pending(), "a partial HEADERS payload");
        s.feed(&headers[15..]);
        assert!(!s.pending(), "a complete header block");
        s.feed(&frame(HEADERS, 0, &[0x82; 3]));
        assert!(s.pending(), "HEADERS without END_HEADERS: the block goes on");
        s.feed(&frame(CONTINUATION, 0, &[0x82; 3]));
        assert!(s.pending());
        s.feed(&frame(CONTINUATION, END_HEADERS, &[0x82; 3]));
        assert!(!s.pending(), "the block ends with END_HEADERS");
        let data = frame(0, 0, &[0; 100]);
        s.feed(&data[..50]);
        assert!(!s.pending(), "a body under way is not a head");
        s.feed(&data[50..]);
        assert!(!s.pending());
    }
}
