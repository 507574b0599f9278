//! Hot reload: re-read, validate, build the next generation, publish it in one store.
//!
//! The file is fully validated and the new snapshot fully built before anything changes; on
//! any error the running generation is untouched and the error is logged and returned.
//! Settings that belong to bound sockets or the runtime (listen addresses, workers,
//! max_connections) need a restart; a reload that changes them says so in its summary.

use std::sync::Arc;

use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::operations::Operations;
use crate::snapshot::{BuildError, Snapshot};
use crate::telemetry::CONFIG_RELOADS;
use crate::tls::TlsError;

/// What a reload changed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The generation now serving.
    pub generation: u64,
    /// Routes that are new.
    pub added: Vec<String>,
    /// Routes that are gone.
    pub removed: Vec<String>,
    /// Routes whose candidate version changed: a new rollout starts.
    pub new_rollouts: Vec<String>,
    /// Routes whose settings changed but keep their rollout state.
    pub changed: Vec<String>,
    /// Settings that changed but only apply after a restart.
    pub restart_required: Vec<String>,
}

/// Why a reload was rejected. The old configuration keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The snapshot could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// `[cluster]` changed: a replica moving to another fleet (or in or out of fleet mode)
    /// mid-rollout would carry its state into the wrong one, so that takes a restart.
    #[error("[cluster] changed: fleet settings take a restart, the running configuration is unchanged")]
    Cluster,
    /// The new certificate could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Re-reads `ops.config_path` and applies it if valid.
pub async fn reload(ops: &Operations) -> Result<ReloadSummary, ReloadError> {
    let _serial = ops.reload_guard().await;
    let outcome = apply(ops);
    match &outcome {
        Ok(s) => {
            info!(generation = s.generation, added = ?s.added, removed = ?s.removed, new_rollouts = ?s.new_rollouts, changed = ?s.changed, "configuration reloaded");
            if !s.restart_required.is_empty() {
                warn!(settings = ?s.restart_required, "these settings changed but only apply after a restart");
            }
            ops.telemetry().counter(CONFIG_RELOADS, "outcome", "applied").increment(1);
        }
        Err(e) => {
            error!("configuration reload rejected, the running configuration is unchanged:\n{e}");
            ops.telemetry().counter(CONFIG_RELOADS, "outcome", "rejected").increment(1);
        }
    }
    outcome
}

fn apply(ops: &Operations) -> Result<ReloadSummary, ReloadError> {
    let config = Arc::new(Config::load(&ops.config_path)?);
    if config.cluster != ops.snapshot().config.cluster {
        return Err(ReloadError::Cluster);
    }
    let tls = config.server.tls.as_ref().map(|t| crate::tls::acceptor(&t.cert, &t.key)).transpose()?;
    let old = ops.snapshot();
    let next = Snapshot::build(config.clone(), Some(&old), ops.telemetry(), old.generation + 1, tls)?;
    let summary = diff(&old.config, &config, next.generation);
    ops.data().publish(next);
    Ok(summary)
}

fn diff(old: &Config, new: &Config, generation: u64) -> ReloadSummary {
    let mut s = ReloadSummary {
        generation,
        added: vec![],
        removed: vec![],
        new_rollouts: vec![],
        changed: vec![],
        restart_required: vec![],
    };
    for r in &new.routes {
        match old.route(&r.name) {
            None => s.added.push(r.name.clone()),
            Some(o) if o.candidate.as_ref().map(|c| &c.version) != r.candidate.as_ref().map(|c| &c.version) => {
                s.new_rollouts.push(r.name.clone())
            }
            Some(o) if format!("{o:?}") != format!("{r:?}") => s.changed.push(r.name.clone()),
            Some(_) => {}
        }
    }
    s.removed = old.routes.iter().filter(|r| new.route(&r.name).is_none()).map(|r| r.name.clone()).collect();
    let (a, b) = (&old.server, &new.server);
    let checks = [
        ("server.listen", a.listen != b.listen),
        ("server.tls_listen", a.tls.as_ref().map(|t| t.listen) != b.tls.as_ref().map(|t| t.listen)),
        ("server.workers", a.workers != b.workers),
        ("server.max_connections", a.max_connections != b.max_connections),
        ("server.max_upstream_headers", a.max_upstream_headers != b.max_upstream_headers),
        ("server.max_upstream_header_bytes", a.max_upstream_header_bytes != b.max_upstream_header_bytes),
        ("server.max_connections_per_endpoint", a.max_connections_per_endpoint != b.max_connections_per_endpoint),
        ("admin.listen", old.admin.listen != new.admin.listen),
        ("state.dir", old.state_dir != new.state_dir),
    ];
    s.restart_required = checks.iter().filter(|(_, changed)| *changed).map(|(k, _)| k.to_string()).collect();
    s
}
