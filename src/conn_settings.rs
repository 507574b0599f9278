//! How the client connections of one configuration generation are served: the TLS acceptor
//! and the hyper builders with the `[server]` (or `[admin]`) limits.
//!
//! Built off the hot path when a generation is built and carried inside the
//! [`Snapshot`](crate::snapshot::Snapshot), so that one store publishes the routes and the
//! connection settings together; [`crate::connection`] reads them once per connection.

use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::TlsAcceptor;

use crate::config::{AdminConfig, ServerConfig};

/// What every client connection of one configuration generation is served with: the TLS
/// acceptor and the hyper builders, built when the generation is published.
pub struct ConnSettings {
    /// The HTTPS listener's acceptor, when one is configured.
    pub tls: Option<TlsAcceptor>,
    pub(crate) h1: http1::Builder,
    pub(crate) h2: http2::Builder<TokioExecutor>,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// Header fields allowed in one HTTP/2 request (hyper's h2 server has no such limit).
    pub(crate) max_headers: usize,
    /// A write to the client blocked this long closes the connection (a client that stopped
    /// reading).
    pub(crate) body_idle_timeout: Duration,
}

/// hyper keeps up to this many request headers on the stack; asking for a limit, even the
/// same one, moves them to the heap on every request.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// How often an HTTP/2 client connection is pinged, and how long the answer may take before
/// the connection is considered dead and closed. Pings find peers that vanished without a
/// FIN; idle-but-alive clients are closed by `idle_timeout` instead.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl ConnSettings {
    /// The settings for a generation's `[server]` table.
    pub fn new(s: &ServerConfig, tls: Option<TlsAcceptor>) -> ConnSettings {
        let limits = Limits {
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            body_idle_timeout: s.body_idle_timeout,
        };
        ConnSettings::with(&limits, tls)
    }

    /// The settings for the admin listener's connections (`[admin]`).
    pub fn admin(a: &AdminConfig) -> ConnSettings {
        let limits = Limits {
            header_read_timeout: a.header_read_timeout,
            idle_timeout: a.idle_timeout,
            max_header_bytes: 64 * 1024,
            max_headers: HYPER_DEFAULT_MAX_HEADERS,
            body_idle_timeout: a.idle_timeout,
        };
        ConnSettings::with(&limits, None)
    }

    fn with(l: &Limits, tls: Option<TlsAcceptor>) -> ConnSettings {
        let mut h1 = http1::Builder::new();
        // hyper starts this timer as soon as a keep-alive connection goes idle, so it also
        // bounds the keep-alive idle time of HTTP/1.1 connections (with `idle_timeout`).
        h1.timer(TokioTimer::new())
            .header_read_timeout(l.header_read_timeout)
            .max_header_size(l.max_header_bytes)
            .max_buf_size(l.max_header_bytes.max(8192));
        if l.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(l.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        ConnSettings {
            tls,
            h1,
            h2,
            header_read_timeout: l.header_read_timeout,
            idle_timeout: l.idle_timeout,
            max_headers: l.max_headers,
            body_idle_timeout: l.body_idle_timeout,
        }
    }
}

/// The limits a listener's connections are served with.
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    body_idle_timeout: Duration,
}

impl std::fmt::Debug for ConnSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSettings").field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}
