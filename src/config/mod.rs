//! Configuration: parse → validate → a plain, checked [`Config`].
//!
//! The file is read with serde + toml into [`raw`] types that keep every value's position,
//! then [`validate`] turns them into the types below, which the rest of veer uses without
//! re-checking anything. A config that fails here never reaches the running proxy, so a bad
//! reload changes nothing.

pub mod error;
pub mod keys;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Diagnostic};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; relative paths inside it are resolved against its folder.
    pub source: PathBuf,
    /// Listeners and limits.
    pub server: ServerConfig,
    /// The operator API.
    pub admin: AdminConfig,
    /// Rollout state and journal location (absolute after validation).
    pub state_dir: PathBuf,
    /// Webhooks.
    pub notify: Vec<NotifyConfig>,
    /// Fleet mode, when configured: the rollouts live in etcd and are shared by every replica.
    pub cluster: Option<ClusterConfig>,
    /// Routes in declaration order.
    pub routes: Vec<RouteConfig>,
}

/// `[cluster]`: where a fleet of replicas keeps its one rollout per route.
///
/// Read once at start: a reload that changes it is refused, because a replica that moved to
/// another fleet mid-rollout would carry its state into the wrong one.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://` or `https://`).
    pub etcd: Vec<String>,
    /// Key prefix of this fleet, without a trailing `/`: one fleet per prefix.
    pub prefix: String,
    /// This replica's name, unique in the fleet (default: the host name).
    pub node: String,
    /// A replica (and the leader) counts as gone this long after it was last heard.
    pub lease_ttl: Duration,
    /// How often a replica publishes its counters.
    pub publish_interval: Duration,
    /// CA bundle that signs etcd's server certificates (TLS to etcd).
    pub ca_file: Option<PathBuf>,
    /// Client certificate for etcd (mutual TLS), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// etcd user, with `password_file`.
    pub username: Option<String>,
    /// File holding the etcd user's password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Plain HTTP/1.1 + h2c listener.
    pub listen: SocketAddr,
    /// HTTPS listener, when configured.
    pub tls: Option<TlsConfig>,
    /// Deadline for one upstream attempt to produce a response head, counted from the end of
    /// the request body (a slow uploader is bounded by `body_idle_timeout` instead).
    pub request_timeout: Duration,
    /// Longest a request or response body may go without a byte moving; the side that
    /// stalled (client or version) is the one blamed.
    pub body_idle_timeout: Duration,
    /// A client must send its whole request head within this.
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight (HTTP/1.1 keep-alive, or HTTP/2 with no
    /// open stream) is closed after this, so idle clients cannot hold `max_connections`.
    pub idle_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    /// Client connections held at once; accept pauses beyond it.
    pub max_connections: usize,
    /// Largest request head accepted, in bytes (larger gets 431).
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request.
    pub max_headers: usize,
    /// Most header fields accepted in one upstream response head; more is a 502. Upstreams
    /// are trusted more than clients, so the default matches nginx's tolerance, not veer's own.
    pub max_upstream_headers: usize,
    /// Largest upstream response head accepted, in bytes; larger is a 502.
    pub max_upstream_header_bytes: usize,
    /// Connections open to one upstream endpoint at once, across every route and version that
    /// uses it: what a flood of slow clients can make veer hold against one upstream.
    pub max_connections_per_endpoint: usize,
    /// Add `x-veer-role` to responses.
    pub expose_role_header: bool,
}

/// The HTTPS listener and its certificate.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// PEM certificate chain (absolute path).
    pub cert: PathBuf,
    /// PEM private key (absolute path).
    pub key: PathBuf,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin API.
    pub listen: SocketAddr,
    /// Bearer token file for mutating calls (absolute path).
    pub token_file: Option<PathBuf>,
    /// Admin connections held at once; accept pauses beyond it, so that a flood of admin
    /// connections cannot take the file descriptors the proxy listener needs.
    pub max_connections: usize,
    /// An admin client must send its whole request head within this.
    pub header_read_timeout: Duration,
    /// An idle admin connection is closed after this.
    pub idle_timeout: Duration,
    /// The public address operators reach the admin API at (behind a reverse proxy or a DNS
    /// name), when not loopback: its host is accepted in `Host` besides the loopback names,
    /// and links to the admin API use it.
    pub public_url: Option<http::Uri>,
}

/// `[[notify]]`.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Where to POST events.
    pub url: http::Uri,
    /// Event kinds to send; empty means all.
    pub events: Vec<String>,
}

/// `[[routes]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique name, `[a-z0-9_-]+`.
    pub name: String,
    /// Lower-case host names without port; empty means any host.
    pub hosts: Vec<String>,
    /// Path prefix that selects this route.
    pub path_prefix: String,
    /// Requests in flight at once; 0 is unbounded.
    pub max_inflight: usize,
    /// `Upgrade` protocol tokens passed to the upstream (lower case, `websocket` by default;
    /// never `h2c`, which would open a tunnel past routing and measurement).
    pub upgrades: Vec<String>,
    /// The version users get today.
    pub stable: VersionConfig,
    /// The version being rolled out, if any.
    pub candidate: Option<VersionConfig>,
    /// The step plan.
    pub rollout: RolloutConfig,
    /// The snap-back rules.
    pub rollback: RollbackConfig,
    /// Sticky assignment of users.
    pub sticky: Option<StickyConfig>,
    /// Header that forces a version.
    pub override_header: Option<String>,
    /// Retry of failed candidate attempts on stable.
    pub retry: Option<RetryConfig>,
    /// Shadow traffic to the candidate.
    pub mirror: Option<MirrorConfig>,
}

/// One version of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionConfig {
    /// Label used in metrics, journal and reports.
    pub version: String,
    /// `host:port` endpoints.
    pub endpoints: Vec<String>,
    /// Speak cleartext HTTP/2 (prior knowledge) to these endpoints.
    pub h2: bool,
    /// Path of an active HTTP health check (any 2xx is healthy); none means passive only.
    pub health_path: Option<String>,
    /// How often the active health check runs.
    pub health_interval: Duration,
}

/// How the candidate is brought in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Weighted steps.
    Canary,
    /// Preview, then all at once, then bake.
    BlueGreen,
}

/// `[routes.rollout]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Canary or blue-green.
    pub strategy: Strategy,
    /// Candidate weight per step, in basis points (1% = 100), strictly increasing, last 10000.
    pub steps_bp: Vec<u32>,
    /// Minimum dwell at a step.
    pub step_interval: Duration,
    /// Candidate requests needed at a step before it may advance.
    pub min_requests: u64,
    /// Promote by itself after the last step.
    pub auto_promote: bool,
    /// Blue-green preview duration.
    pub preview: Duration,
    /// Blue-green bake duration.
    pub bake: Duration,
}

/// `[routes.rollback]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackConfig {
    /// Rolling window the rules read.
    pub window: Duration,
    /// Candidate's absolute error-rate guard.
    pub max_error_rate: Option<f64>,
    /// Smallest candidate-minus-stable error-rate difference worth a rollback.
    pub max_error_rate_increase: Option<f64>,
    /// Candidate's absolute p99 guard.
    pub max_p99: Option<Duration>,
    /// Smallest candidate/stable p99 ratio worth a rollback.
    pub max_p99_ratio: Option<f64>,
    /// 1 − false-rollback budget for the whole rollout.
    pub confidence: f64,
    /// Differences smaller than this ratio never roll back.
    pub min_effect_ratio: f64,
    /// Latency differences smaller than this never roll back, whatever their ratio.
    pub min_latency_delta: Duration,
    /// How often the judge reads the windows.
    pub tick: Duration,
}

/// Where the sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyConfig {
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
}

/// `[routes.retry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Re-send idempotent requests that failed on the candidate to stable.
    pub on_candidate_failure: bool,
    /// Retries at most this fraction of the route's requests.
    pub budget: f64,
    /// Largest request body buffered for a replay; bigger bodies are never retried.
    pub max_body_bytes: usize,
    /// Also replay POST, PUT, PATCH and DELETE requests (whose bodies fit `max_body_bytes`):
    /// only for upstreams that make them safe to repeat.
    pub non_idempotent: bool,
}

/// `[routes.mirror]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorConfig {
    /// Percent of idempotent requests copied to the candidate.
    pub percent: f64,
    /// Compare body digests too.
    pub compare_body: bool,
    /// Judge rule on mirrored mismatches.
    pub max_mismatch_rate: Option<f64>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let src = String::from_utf8(src).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let text = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
            let map = error::SourceMap::new(path, text);
            ConfigError::Invalid(vec![map.at(
                valid..valid,
                "",
                "not UTF-8 text: a config file must be UTF-8 encoded TOML",
            )])
        })?;
        Config::parse(path, &src)
    }

    /// Validates `src` as if it had been read from `path`.
    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
        validate::parse(path, src)
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }
}
