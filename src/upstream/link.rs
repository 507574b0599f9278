//! The connections veer keeps to one endpoint, and sending a request over them.
//!
//! HTTP/1.1: a stack of idle connections, the most recently used on top (it is the one
//! most likely still open and warm). A request takes the top one, or opens a new one under
//! the endpoint's cap; its response body gives the connection back when it ends, right
//! there in the client's task, so a keep-alive request costs no pool lookup by key and no
//! extra task. A connection the endpoint closed while idle is noticed when it is taken (and
//! by the periodic sweep); a request that found its connection closed before a byte of it
//! was written goes out on another one.
//!
//! Cleartext HTTP/2: one shared connection per endpoint, multiplexed, reopened when it
//! closes (GOAWAY, reset, idle close by the upstream).
//!
//! Idle HTTP/1.1 connections are closed after [`IDLE_TIMEOUT`] unused; there are never more
//! of them than `server.max_connections_per_endpoint`, which bounds every connection to the
//! endpoint, idle or busy.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::UpstreamBody;
use super::connect::{self, ConnectionCapFull, Settings, UpstreamError};

/// How long an idle HTTP/1.1 connection is kept for reuse.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections past the idle timeout (or closed by the endpoint) are swept, at
/// most: a third of the idle timeout when that is shorter.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

type H1 = http1::SendRequest<UpstreamBody>;
type H2 = http2::SendRequest<UpstreamBody>;

/// Everything veer holds towards one upstream address: its idle HTTP/1.1 connections, its
/// shared HTTP/2 connection, and the permits that bound how many connections are open to it
/// at once.
pub struct Link {
    addr: String,
    settings: Settings,
    h1_builder: http1::Builder,
    h2_builder: http2::Builder<TokioExecutor>,
    idle: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection, numbered so a request can tell whether the one that
    /// failed it has been replaced already.
    h2: Mutex<Option<(u64, H2)>>,
    h2_opened: AtomicU64,
    /// Held while the shared HTTP/2 connection is being opened, so concurrent requests wait
    /// for one connection instead of each opening their own.
    h2_opening: tokio::sync::Mutex<()>,
    permits: Arc<Semaphore>,
    /// Requests waiting for a connection while the cap is full; a connection given back
    /// goes to one of them.
    waiting: AtomicUsize,
    returned: Notify,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).field("open", &self.open_connections()).finish()
    }
}

/// An idle HTTP/1.1 connection and when it went idle.
struct Idle {
    tx: H1,
    since: Instant,
}

impl Link {
    pub(super) fn new(addr: &str, s: &Settings) -> Link {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(s.max_header_bytes.max(8192));
        if s.max_headers != 100 {
            // Only when it differs from hyper's default: setting it at all moves every
            // response's header parsing to the heap.
            h1.max_headers(s.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
        Link {
            addr: addr.to_string(),
            settings: *s,
            h1_builder: h1,
            h2_builder: h2,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_opened: AtomicU64::new(0),
            h2_opening: tokio::sync::Mutex::new(()),
            permits: Arc::new(Semaphore::new(s.max_connections)),
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
            sweeping: AtomicBool::new(false),
        }
    }

    /// True while every connection permit is taken: a request that has no connection yet
    /// is waiting for veer's own cap, not for the upstream.
    pub fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Connections open to the endpoint right now (or being opened).
    pub fn open_connections(&self) -> usize {
        self.settings.max_connections - self.permits.available_permits()
    }

    /// Sends `req` over HTTP/1.1 or cleartext HTTP/2 and waits for the response head.
    /// `connected` is set once the request has a connection, so a caller that gives up
    /// waiting can tell a full cap from a slow upstream.
    ///
    /// The request's URI goes out as it is: origin-form (`/path?query`) for HTTP/1.1, with
    /// scheme and authority for HTTP/2 (they become `:scheme` and `:authority`).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamBody>,
        h2: bool,
        connected: &AtomicBool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if h2 { self.send_h2(req, connected).await } else { self.send_h1(req, connected).await }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        connected: &AtomicBool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (mut tx, reused) = self.checkout_h1().await?;
            connected.store(true, Ordering::Relaxed);
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease { link: self.clone(), tx };
                    return Ok(resp.map(|body| PooledBody::new(body, Some(lease))));
                }
                Err(mut e) => match e.take_message() {
                    // The endpoint closed the idle connection before a byte of this request
                    // was written: nothing was sent, so it may go out on another.
                    Some(unsent) if reused => {
                        debug!(endpoint = %self.addr, "pooled connection was closed; resending on another");
                        req = unsent;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        connected: &AtomicBool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // The shared connection may have closed under the request; the second try is on a
        // connection opened for it (or by another request meanwhile), and the last.
        let mut retried = false;
        loop {
            let (id, mut tx) = match self.shared_h2() {
                Some(shared) => shared,
                None => self.open_h2().await?,
            };
            connected.store(true, Ordering::Relaxed);
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| PooledBody::new(body, None))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        debug!(endpoint = %self.addr, "shared HTTP/2 connection was closed; reopening");
                        self.forget_h2(id);
                        req = unsent;
                        retried = true;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    /// An idle connection (true), or a new one (false) when the cap allows it. At the cap,
    /// waits up to `request_timeout` for whichever comes first: a connection given back, or
    /// a slot freed by a connection closing.
    async fn checkout_h1(&self) -> Result<(H1, bool), UpstreamError> {
        if let Some(tx) = self.take_idle() {
            return Ok((tx, true));
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok((self.open_h1(permit).await?, false));
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        let deadline = tokio::time::Instant::now() + self.settings.queue_timeout;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            // Checked after registering, so a connection given back in between is not missed.
            if let Some(tx) = self.take_idle() {
                return Ok((tx, true));
            }
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| self.cap_full())?;
                    return Ok((self.open_h1(permit).await?, false));
                }
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => return Err(self.cap_full()),
            }
        }
    }

    /// The most recently used idle connection that is still open; drops closed and expired
    /// ones on the way.
    fn take_idle(&self) -> Option<H1> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.since.elapsed() >= self.settings.idle_timeout {
                // Everything below it went idle earlier still.
                idle.clear();
                return None;
            }
            if c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    /// Puts a connection whose exchange is over back on the idle stack.
    fn give_back(self: &Arc<Self>, tx: H1) {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= self.settings.max_connections {
                idle.remove(0);
            }
            idle.push(Idle { tx, since: Instant::now() });
        }
        // Ordered by the idle lock against a waiter's check of the stack (see checkout_h1).
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
        // Read first: the swap would write the shared line on every request.
        if !self.sweeping.load(Ordering::Relaxed) && !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    async fn open_h1(&self, permit: OwnedSemaphorePermit) -> Result<H1, UpstreamError> {
        let io = connect::open(&self.addr, &self.settings, permit).await?;
        let (tx, conn) = self.h1_builder.handshake(io).await.map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// veer's own cap stayed full for the whole wait.
    fn cap_full(&self) -> UpstreamError {
        ConnectionCapFull { cap: self.settings.max_connections }.into()
    }

    /// The shared HTTP/2 connection and its number, unless it has closed.
    fn shared_h2(&self) -> Option<(u64, H2)> {
        let shared = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        shared.as_ref().filter(|(_, tx)| !tx.is_closed()).map(|(id, tx)| (*id, tx.clone()))
    }

    /// Drops shared connection number `id` if it is still the shared one (another request
    /// may have replaced it already).
    fn forget_h2(&self, id: u64) {
        let mut shared = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if shared.as_ref().is_some_and(|(current, _)| *current == id) {
            *shared = None;
        }
    }

    async fn open_h2(&self) -> Result<(u64, H2), UpstreamError> {
        let _opening = self.h2_opening.lock().await;
        if let Some(shared) = self.shared_h2() {
            return Ok(shared);
        }
        let permit = match tokio::time::timeout(self.settings.queue_timeout, self.permits.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            _ => return Err(self.cap_full()),
        };
        let io = connect::open(&self.addr, &self.settings, permit).await?;
        let handshake = self.h2_builder.handshake(io);
        let (tx, conn) = match tokio::time::timeout(self.settings.connect_timeout, handshake).await {
            Ok(r) => r.map_err(UpstreamError::Handshake)?,
            Err(_) => return Err(UpstreamError::ConnectTimeout),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        let id = self.h2_opened.fetch_add(1, Ordering::Relaxed);
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, tx.clone()));
        Ok((id, tx))
    }
}

/// Closes idle connections past the idle timeout and forgets the ones the endpoint closed,
/// for as long as the link is in use.
async fn sweep(link: Weak<Link>) {
    let Some(idle_timeout) = link.upgrade().map(|l| l.settings.idle_timeout) else { return };
    let mut every = tokio::time::interval(SWEEP_EVERY.min(idle_timeout / 3));
    every.tick().await;
    loop {
        every.tick().await;
        let Some(link) = link.upgrade() else { return };
        let mut idle = link.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| c.since.elapsed() < idle_timeout && !c.tx.is_closed());
    }
}

/// Counts a request waiting at the cap for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP/1.1 connection lent to one exchange.
struct Lease {
    link: Arc<Link>,
    tx: H1,
}

impl Lease {
    /// The response has ended: the connection is free for the next request once hyper has
    /// finished with this one (normally already; otherwise a small task waits for it).
    fn release(self) {
        let Lease { link, mut tx } = self;
        if tx.is_ready() {
            link.give_back(tx);
        } else if !tx.is_closed() {
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    link.give_back(tx);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that gives its HTTP/1.1 connection back to the endpoint's
    /// pool when it ends. Dropped before its end, the connection is closed with it (the
    /// rest of the response is not worth reading).
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        lease: Option<Lease>,
    }
}

impl PooledBody {
    fn new(inner: Incoming, lease: Option<Lease>) -> PooledBody {
        let mut body = PooledBody { inner, lease };
        if body.inner.is_end_stream()
            && let Some(lease) = body.lease.take()
        {
            lease.release();
        }
        body
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => {
                *this.lease = None;
                false
            }
        };
        if ended && let Some(lease) = this.lease.take() {
            lease.release();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either, Full};
    use tokio::net::TcpListener;

    fn settings(idle_timeout: Duration) -> Settings {
        Settings {
            connect_timeout: Duration::from_secs(5),
            queue_timeout: Duration::from_secs(5),
            max_connections: 4,
            max_headers: 100,
            max_header_bytes: 16 * 1024,
            idle_timeout,
        }
    }

    /// An HTTP/1.1 upstream on loopback; each connection's end is reported on `closed`.
    async fn upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (closed, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    });
                    let io = hyper_util::rt::TokioIo::new(s);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                    let _ = closed.send(());
                });
            }
        });
        (addr, rx)
    }

    async fn get(link: &Arc<Link>) -> Bytes {
        let req = Request::get("/").body(Either::Right(Full::default())).expect("request");
        let resp = link.send(req, false, &AtomicBool::new(false)).await.expect("response");
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_then_closed_after_the_idle_timeout() {
        let (addr, mut closed) = upstream().await;
        let link = Arc::new(Link::new(&addr, &settings(Duration::from_millis(300))));
        assert_eq!(get(&link).await, "ok");
        assert_eq!(get(&link).await, "ok");
        assert_eq!(link.open_connections(), 1, "the second request reused the first connection");
        let idle_since = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), closed.recv()).await;
        assert!(ended.is_ok(), "the idle connection was not closed within 10 s");
        assert!(idle_since.elapsed() >= Duration::from_millis(300), "closed before the idle timeout");
        let deadline = Instant::now() + Duration::from_secs(10);
        while link.open_connections() != 0 {
            assert!(Instant::now() < deadline, "the closed connection still holds its slot");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The next request opens a fresh connection.
        assert_eq!(get(&link).await, "ok");
        assert_eq!(link.open_connections(), 1);
    }

    #[tokio::test]
    async fn a_body_cut_short_yields_its_bytes_then_the_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            // Head, part of the body, and the end of the connection, all at once.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial").await;
        });
        let link = Arc::new(Link::new(&addr, &settings(Duration::from_secs(5))));
        let req = Request::get("/").body(Either::Right(Full::default())).expect("request");
        let resp = link.send(req, false, &AtomicBool::new(false)).await.expect("response head");
        let mut body = resp.into_body();
        let within = Duration::from_secs(10);
        let first = tokio::time::timeout(within, body.frame()).await.expect("a frame in time").expect("a frame");
        let first = first.expect("data");
        assert_eq!(first.into_data().expect("data"), "partial");
        let second = tokio::time::timeout(within, body.frame()).await.expect("a frame in time");
        assert!(second.expect("the failure").is_err(), "the cut is an error");
        assert_eq!(link.open_connections(), 0, "the broken connection is gone, not pooled");
    }
}
