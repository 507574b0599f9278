//! Upstream endpoints: choosing one, skipping the ones that refuse connections, and the
//! pooled HTTP clients that talk to them.
//!
//! Within a version, load is spread by power of two choices on in-flight requests: pick two
//! endpoints at random and use the less busy one. That keeps a slow endpoint from gathering
//! a queue without any shared state beyond one counter per endpoint. An endpoint that refuses
//! a connection is skipped for a backoff that doubles with each consecutive failure (100 ms
//! up to 10 s); after it, one request probes it again. An endpoint whose active health check
//! fails ([`crate::health`]) is skipped until a later check passes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::proxy::body::ClientBody;
use bytes::Bytes;
use http::Uri;
use http::uri::Authority;
use http_body_util::{Either, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;

use crate::config::ServerConfig;

/// One upstream `host:port`.
#[derive(Debug)]
pub struct Endpoint {
    /// As configured.
    pub addr: String,
    /// Pre-parsed for building request URIs.
    pub authority: Authority,
    inflight: AtomicUsize,
    down_until_ms: AtomicU64,
    failures: AtomicU32,
    /// Set while the active health check fails; only the checker writes it.
    check_failed: AtomicBool,
    /// The clients towards this address, attached on first use.
    link: OnceLock<Arc<Link>>,
}

fn millis_now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Endpoint {
    /// An endpoint for a validated `host:port`.
    pub fn new(addr: &str) -> Result<Self, http::uri::InvalidUri> {
        Ok(Endpoint {
            addr: addr.to_string(),
            authority: addr.parse()?,
            inflight: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            check_failed: AtomicBool::new(false),
            link: OnceLock::new(),
        })
    }

    /// The clients towards this endpoint. The first call of a generation looks the address up
    /// in `clients` (taking its lock once); [`crate::snapshot::Snapshot::attach`] makes that
    /// call before the generation serves.
    #[inline]
    pub fn link(&self, clients: &Clients) -> &Link {
        self.link.get_or_init(|| clients.link(&self.addr))
    }

    /// Requests currently in flight to this endpoint.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// False while the endpoint is in its backoff after refusing connections, or while its
    /// active health check fails.
    #[inline]
    pub fn available(&self) -> bool {
        if self.check_failed.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || millis_now() >= until
    }

    /// False while the active health check fails (always true without one).
    pub fn check_passing(&self) -> bool {
        !self.check_failed.load(Ordering::Relaxed)
    }

    /// Records the outcome of an active health check; true when that changed the endpoint's
    /// check state. Writes only on a change, so repeated results cost the hot path nothing.
    pub fn set_check_passing(&self, passing: bool) -> bool {
        if self.check_failed.load(Ordering::Relaxed) != passing {
            return false;
        }
        self.check_failed.store(!passing, Ordering::Relaxed);
        true
    }

    /// Counts a request starting; pair with [`Endpoint::end`].
    pub fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request ending.
    pub fn end(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The endpoint refused or failed a connection: skip it for a while.
    pub fn connect_failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(7);
        let backoff = (100u64 << n).min(10_000);
        self.down_until_ms.store(millis_now() + backoff, Ordering::Relaxed);
    }

    /// A request got a response: the endpoint is fine again.
    #[inline]
    pub fn succeeded(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

/// The endpoints of one version.
#[derive(Debug)]
pub struct Pool {
    endpoints: Box<[Endpoint]>,
    /// Talk h2c to these endpoints.
    pub h2: bool,
}

impl Pool {
    /// A pool over validated endpoints.
    pub fn new(addrs: &[String], h2: bool) -> Result<Self, http::uri::InvalidUri> {
        Ok(Pool { endpoints: addrs.iter().map(|a| Endpoint::new(a)).collect::<Result<_, _>>()?, h2 })
    }

    /// All endpoints.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Endpoint `i`.
    pub fn get(&self, i: usize) -> &Endpoint {
        &self.endpoints[i]
    }

    /// Addresses of the endpoints [`Pool::pick`] skips right now (backing off or failing
    /// their health check).
    pub fn unavailable(&self) -> Vec<String> {
        self.endpoints.iter().filter(|e| !e.available()).map(|e| e.addr.clone()).collect()
    }

    /// The endpoint for the next request, or `None` when every endpoint is backing off.
    /// `except` excludes one endpoint (the one that just failed).
    pub fn pick(&self, except: Option<usize>) -> Option<usize> {
        let n = self.endpoints.len();
        let ok = |i: usize| Some(i) != except && self.endpoints[i].available();
        if n == 1 {
            return ok(0).then_some(0);
        }
        let a = fastrand::usize(0..n);
        let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
        match (ok(a), ok(b)) {
            (true, true) => Some(if self.endpoints[b].inflight() < self.endpoints[a].inflight() { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => (0..n).map(|k| (a + k) % n).find(|&i| ok(i)),
        }
    }
}

/// What veer sends upstream: the client's streamed body, or a body veer holds in memory
/// (an empty one when a bodyless request is re-sent to another endpoint).
pub type UpstreamBody = Either<ClientBody, Full<Bytes>>;

/// A pooled client whose connections all go to one endpoint.
pub type EndpointClient = Client<EndpointConnector, UpstreamBody>;

/// The per-endpoint clients, shared by every configuration generation (so that a reload
/// keeps warm connections) and by every route and version that names the same address (so
/// that [`Link`]'s connection cap holds for the endpoint as a whole).
#[derive(Debug, Clone)]
pub struct Clients {
    registry: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    settings: Settings,
    links: Mutex<HashMap<String, Weak<Link>>>,
}

/// What every upstream connection is built with; read from `[server]` at start.
#[derive(Debug, Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    queue_timeout: Duration,
    max_connections: usize,
    max_headers: usize,
    max_header_bytes: usize,
}

impl Clients {
    /// Clients built from the `[server]` limits: connection attempts give up after
    /// `request_timeout` (at most 5 s), a request waits at most `request_timeout` for a
    /// connection when its endpoint is at `max_connections_per_endpoint`.
    pub fn new(server: &ServerConfig) -> Self {
        let settings = Settings {
            connect_timeout: server.request_timeout.min(Duration::from_secs(5)),
            queue_timeout: server.request_timeout,
            max_connections: server.max_connections_per_endpoint,
            max_headers: server.max_upstream_headers,
            max_header_bytes: server.max_upstream_header_bytes,
        };
        Clients { registry: Arc::new(Registry { settings, links: Mutex::new(HashMap::new()) }) }
    }

    /// The link to `addr`, shared with every other user of the same address. Takes a lock:
    /// called once per endpoint and configuration generation, never per request.
    pub fn link(&self, addr: &str) -> Arc<Link> {
        let mut links = self.registry.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(addr).and_then(Weak::upgrade) {
            return l;
        }
        links.retain(|_, l| l.strong_count() > 0);
        let link = Arc::new(Link::new(addr, &self.registry.settings));
        links.insert(addr.to_string(), Arc::downgrade(&link));
        link
    }
}

/// Everything veer holds towards one upstream address: its pooled clients and the permits
/// that bound how many connections are open to it at once.
#[derive(Debug)]
pub struct Link {
    h1: EndpointClient,
    h2: EndpointClient,
    permits: Arc<Semaphore>,
    cap: usize,
}

impl Link {
    fn new(addr: &str, s: &Settings) -> Link {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(s.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let permits = Arc::new(Semaphore::new(s.max_connections));
        let connector = EndpointConnector {
            http,
            dst: format!("http://{addr}").parse().ok(),
            permits: permits.clone(),
            cap: s.max_connections,
            queue_timeout: s.queue_timeout,
        };
        let build = |h2: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .set_host(false)
                .http1_max_headers(s.max_headers)
                .http1_max_buf_size(s.max_header_bytes.max(8192))
                .http2_max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
                .http2_only(h2);
            b.build(connector.clone())
        };
        Link { h1: build(false), h2: build(true), permits, cap: s.max_connections }
    }

    /// The HTTP/1.1 or the cleartext HTTP/2 client.
    #[inline]
    pub fn client(&self, h2: bool) -> &EndpointClient {
        if h2 { &self.h2 } else { &self.h1 }
    }

    /// True while every connection permit is taken: a request that has no connection yet
    /// is waiting for veer's own cap, not for the upstream.
    pub fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Connections open to the endpoint right now (or being opened).
    pub fn open_connections(&self) -> usize {
        self.cap - self.permits.available_permits()
    }
}

/// A connection attempt waited the whole request timeout for a free connection slot.
#[derive(Debug, thiserror::Error)]
#[error("{cap} connections to this endpoint are open already (server.max_connections_per_endpoint)")]
pub struct ConnectionCapFull {
    cap: usize,
}

/// The endpoint's address does not form a URI (validation normally prevents it).
#[derive(Debug, thiserror::Error)]
#[error("endpoint address does not form a URI")]
struct BadAddress;

/// Connects to one endpoint's address whatever the request URI says (an HTTP/2 request's URI
/// carries the client's Host as its authority), holding one of the endpoint's connection
/// permits for the connection's whole life.
#[derive(Debug, Clone)]
pub struct EndpointConnector {
    http: HttpConnector,
    dst: Option<Uri>,
    permits: Arc<Semaphore>,
    cap: usize,
    queue_timeout: Duration,
}

impl Service<Uri> for EndpointConnector {
    type Response = Capped;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Capped, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let (dst, permits, cap, wait) = (self.dst.clone(), self.permits.clone(), self.cap, self.queue_timeout);
        Box::pin(async move {
            let dst = dst.ok_or(BadAddress)?;
            let permit = match tokio::time::timeout(wait, permits.acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => return Err(ConnectionCapFull { cap }.into()),
            };
            let io = http.call(dst).await?;
            Ok(Capped { io, _permit: permit })
        })
    }
}

/// A TCP connection to an endpoint together with the permit it holds; dropping it (the
/// pool closes it) frees the permit.
#[derive(Debug)]
pub struct Capped {
    io: TokioIo<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl Connection for Capped {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// True when `e` (or what caused it) is veer's own connection cap being full.
pub fn is_cap_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<ConnectionCapFull>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_skip_backing_off_endpoints() {
        let p = Pool::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into(), "127.0.0.1:3".into()], false).expect("valid");
        p.get(1).connect_failed();
        for _ in 0..200 {
            assert_ne!(p.pick(None), Some(1));
        }
        p.get(0).connect_failed();
        p.get(2).connect_failed();
        assert_eq!(p.pick(None), None);
        p.get(2).succeeded();
        assert_eq!(p.pick(None), Some(2));
        assert_eq!(p.pick(Some(2)), None);
    }

    #[test]
    fn a_failing_health_check_ejects_until_a_check_passes() {
        let p = Pool::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], false).expect("valid");
        let e = p.get(0);
        assert!(e.check_passing() && e.available());
        assert!(e.set_check_passing(false), "a change is reported");
        assert!(!e.set_check_passing(false), "a repeated result is not");
        assert!(!e.available() && !e.check_passing());
        assert!((0..200).all(|_| p.pick(None) == Some(1)));
        assert_eq!(p.unavailable(), vec!["127.0.0.1:1".to_string()]);
        // Traffic does not re-admit it: only a passing check does.
        e.succeeded();
        assert!(!e.available());
        assert!(e.set_check_passing(true));
        assert!(e.available() && p.unavailable().is_empty());
        // Each mechanism ejects on its own; both must clear.
        e.connect_failed();
        e.set_check_passing(false);
        assert!(!e.available());
        e.set_check_passing(true);
        assert!(!e.available(), "still backing off after the refused connection");
        e.succeeded();
        assert!(e.available());
    }

    #[test]
    fn two_choices_prefer_the_idle_endpoint() {
        let p = Pool::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], false).expect("valid");
        for _ in 0..10 {
            p.get(0).begin();
        }
        assert!((0..100).all(|_| p.pick(None) == Some(1)));
    }
}
