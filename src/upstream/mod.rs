//! Upstream endpoints: choosing one, skipping the ones that refuse connections, and the
//! connection pools that talk to them ([`Link`]).
//!
//! Within a version, load is spread by power of two choices on in-flight requests: pick two
//! endpoints at random and use the less busy one. That keeps a slow endpoint from gathering
//! a queue without any shared state beyond one counter per endpoint. An endpoint that refuses
//! a connection is skipped for a backoff that doubles with each consecutive failure (100 ms
//! up to 10 s); after it, one request probes it again. An endpoint whose active health check
//! fails ([`crate::health`]) is skipped until a later check passes.

mod connect;
mod link;

pub use connect::{ConnectionCapFull, UpstreamError};
pub use link::{Link, PooledBody};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::proxy::body::ClientBody;
use bytes::Bytes;
use http::uri::Authority;
use http_body_util::{Either, Full};

use crate::config::ServerConfig;
use connect::Settings;

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
    /// The connections towards this address, attached on first use.
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

    /// The connections towards this endpoint. The first call of a generation looks the
    /// address up in `clients` (taking its lock once); [`crate::snapshot::Snapshot::attach`]
    /// makes that call before the generation serves.
    #[inline]
    pub fn link(&self, clients: &Clients) -> &Arc<Link> {
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

/// The request target as the upstream gets it: `/path?query` over HTTP/1.1 (origin-form,
/// RFC 9112 §3.2.1), `http://authority/path?query` over HTTP/2 (hyper turns scheme and
/// authority into `:scheme` and `:authority`).
pub fn request_target(h2: bool, authority: &http::uri::Authority, path: Option<&http::uri::PathAndQuery>) -> http::Uri {
    let mut p = http::uri::Parts::default();
    if h2 {
        p.scheme = Some(http::uri::Scheme::HTTP);
        p.authority = Some(authority.clone());
    }
    p.path_and_query = Some(path.cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    http::Uri::from_parts(p).expect("a path alone, or scheme, authority and path, form a URI")
}

/// The per-endpoint links, shared by every configuration generation (so that a reload keeps
/// warm connections) and by every route and version that names the same address (so that
/// [`Link`]'s connection cap holds for the endpoint as a whole).
#[derive(Debug, Clone)]
pub struct Clients {
    registry: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    settings: Settings,
    links: Mutex<HashMap<String, Weak<Link>>>,
}

impl Clients {
    /// Links built from the `[server]` limits: connection attempts give up after
    /// `request_timeout` (at most 5 s), a request waits at most `request_timeout` for a
    /// connection when its endpoint is at `max_connections_per_endpoint`.
    pub fn new(server: &ServerConfig) -> Self {
        let settings = Settings {
            connect_timeout: server.request_timeout.min(Duration::from_secs(5)),
            queue_timeout: server.request_timeout,
            max_connections: server.max_connections_per_endpoint,
            max_headers: server.max_upstream_headers,
            max_header_bytes: server.max_upstream_header_bytes,
            idle_timeout: link::IDLE_TIMEOUT,
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
