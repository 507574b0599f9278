//! The configuration file exactly as TOML spells it.
//!
//! These types only describe the shape of the file: serde rejects unknown keys and wrong
//! types here, with the file position toml reports. Everything that needs judgement (ranges,
//! durations, addresses, cross-field rules) happens in [`super::validate`], which keeps the
//! spans below so that its errors can point at the offending key too.

use serde::Deserialize;
use toml::Spanned;

/// A string or number as written, with its position in the file.
pub type Sp<T> = Spanned<T>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub notify: Vec<RawNotify>,
    pub cluster: Option<RawCluster>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `[cluster]`: fleet mode, one rollout shared by every replica through etcd.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub etcd: Sp<Vec<Sp<String>>>,
    pub prefix: Sp<String>,
    pub node: Option<Sp<String>>,
    pub lease_ttl: Option<Sp<String>>,
    pub publish_interval: Option<Sp<String>>,
    pub ca_file: Option<Sp<String>>,
    pub cert_file: Option<Sp<String>>,
    pub key_file: Option<Sp<String>>,
    pub username: Option<Sp<String>>,
    pub password_file: Option<Sp<String>>,
}

/// `[server]`: listeners and connection limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Sp<String>>,
    pub tls_listen: Option<Sp<String>>,
    pub tls_cert: Option<Sp<String>>,
    pub tls_key: Option<Sp<String>>,
    pub request_timeout: Option<Sp<String>>,
    pub header_read_timeout: Option<Sp<String>>,
    pub idle_timeout: Option<Sp<String>>,
    pub body_idle_timeout: Option<Sp<String>>,
    pub drain_timeout: Option<Sp<String>>,
    pub workers: Option<Sp<i64>>,
    pub max_connections: Option<Sp<i64>>,
    pub max_header_bytes: Option<Sp<i64>>,
    pub max_headers: Option<Sp<i64>>,
    pub max_upstream_headers: Option<Sp<i64>>,
    pub max_upstream_header_bytes: Option<Sp<i64>>,
    pub max_connections_per_endpoint: Option<Sp<i64>>,
    pub expose_role_header: Option<bool>,
}

/// `[admin]`: the operator's API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Sp<String>>,
    pub token_file: Option<Sp<String>>,
    pub max_connections: Option<Sp<i64>>,
    pub header_read_timeout: Option<Sp<String>>,
    pub idle_timeout: Option<Sp<String>>,
    pub public_url: Option<Sp<String>>,
}

/// `[state]`: where rollout state and the journal live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<Sp<String>>,
}

/// `[[notify]]`: a webhook.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub url: Sp<String>,
    pub events: Option<Vec<Sp<String>>>,
}

/// `[[routes]]`: one service behind veer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Sp<String>,
    pub hosts: Option<Vec<Sp<String>>>,
    pub path_prefix: Option<Sp<String>>,
    pub max_inflight: Option<Sp<i64>>,
    pub upgrades: Option<Vec<Sp<String>>>,
    pub stable: RawVersion,
    pub candidate: Option<RawVersion>,
    #[serde(default)]
    pub rollout: RawRollout,
    #[serde(default)]
    pub rollback: RawRollback,
    pub sticky: Option<Sp<RawSticky>>,
    #[serde(rename = "override")]
    pub override_: Option<RawOverride>,
    pub retry: Option<RawRetry>,
    pub mirror: Option<RawMirror>,
}

/// `[routes.stable]` / `[routes.candidate]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVersion {
    pub version: Sp<String>,
    pub endpoints: Sp<Vec<Sp<String>>>,
    pub h2: Option<bool>,
    pub health_path: Option<Sp<String>>,
    pub health_interval: Option<Sp<String>>,
}

/// `[routes.rollout]`: the plan.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub strategy: Option<Sp<String>>,
    pub steps: Option<Sp<Vec<Sp<f64>>>>,
    pub step_interval: Option<Sp<String>>,
    pub min_requests: Option<Sp<i64>>,
    pub auto_promote: Option<bool>,
    pub preview: Option<Sp<String>>,
    pub bake: Option<Sp<String>>,
}

/// `[routes.rollback]`: when to snap back.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollback {
    pub window: Option<Sp<String>>,
    pub max_error_rate: Option<Sp<f64>>,
    pub max_error_rate_increase: Option<Sp<f64>>,
    pub max_p99: Option<Sp<String>>,
    pub max_p99_ratio: Option<Sp<f64>>,
    pub confidence: Option<Sp<f64>>,
    pub min_effect_ratio: Option<Sp<f64>>,
    pub min_latency_delta: Option<Sp<String>>,
    pub tick: Option<Sp<String>>,
}

/// `[routes.sticky]`: keep a user on one version.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub header: Option<Sp<String>>,
    pub cookie: Option<Sp<String>>,
}

/// `[routes.override]`: let testers choose a version.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub header: Sp<String>,
}

/// `[routes.retry]`: shield users from a failing candidate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub on_candidate_failure: Option<bool>,
    pub budget: Option<Sp<f64>>,
    pub max_body_bytes: Option<Sp<i64>>,
    pub non_idempotent: Option<bool>,
}

/// `[routes.mirror]`: shadow traffic.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub percent: Option<Sp<f64>>,
    pub compare_body: Option<bool>,
    pub max_mismatch_rate: Option<Sp<f64>>,
}
