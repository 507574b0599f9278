//! `RouteStatus`: what the admin API returns and the CLI prints.
//!
//! One type, serialized by the admin server and deserialized by `veer status`, so the two
//! cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::rollout::Phase;
use crate::snapshot::Route;
use crate::stats::window::WindowFigures;

/// The state of one route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteStatus {
    /// Route name.
    pub name: String,
    /// Rollout phase.
    pub phase: Phase,
    /// Index of the current step, when progressing.
    pub step: Option<usize>,
    /// Candidate weight, percent.
    pub candidate_weight: f64,
    /// The stable version.
    pub stable: VersionStatus,
    /// The candidate, if any.
    pub candidate: Option<VersionStatus>,
    /// The plan, percent per step.
    pub steps: Vec<f64>,
    /// The last rollout transition, once the rollout controller has made one.
    pub last_transition: Option<Transition>,
}

/// One version of a route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionStatus {
    /// Version label.
    pub version: String,
    /// Configured endpoints.
    pub endpoints: Vec<String>,
    /// Rolling-window figures.
    pub window: WindowFigures,
}

/// A rollout state change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Transition {
    /// RFC 3339 time.
    pub at: String,
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// Why.
    pub reason: String,
}

impl RouteStatus {
    /// The status of `route` right now.
    pub fn of(route: &Route) -> RouteStatus {
        let version = |v: &crate::runtime::VersionRuntime, endpoints: &[String]| VersionStatus {
            version: v.version.clone(),
            endpoints: endpoints.to_vec(),
            window: v.figures(),
        };
        let cfg = &route.config;
        let (phase, step, weight) = position(route);
        RouteStatus {
            name: cfg.name.clone(),
            phase,
            step,
            candidate_weight: weight,
            stable: version(&route.runtime.stable, &cfg.stable.endpoints),
            candidate: route
                .runtime
                .candidate
                .as_ref()
                .zip(cfg.candidate.as_ref())
                .map(|((_, v), c)| version(v, &c.endpoints)),
            steps: cfg.rollout.steps_bp.iter().map(|&b| f64::from(b) / 100.0).collect(),
            last_transition: None,
        }
    }
}

/// Phase, step index and candidate weight (percent) of a route right now.
pub fn position(route: &Route) -> (Phase, Option<usize>, f64) {
    match route.rollout() {
        None => (Phase::Stable, None, 0.0),
        Some(r) => {
            let bp = r.weight_bp();
            let step = route.config.rollout.steps_bp.iter().position(|&s| s == bp);
            (Phase::Progressing, step, f64::from(bp) / 100.0)
        }
    }
}
