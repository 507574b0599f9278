//! `RouteStatus`: what the admin API returns and the CLI prints.
//!
//! One type, serialized by the admin server and deserialized by `veer status`, so the two
//! cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::journal::Event;
use crate::rollout::Phase;
use crate::rollout::judge::JudgeFigures;
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
    /// The last rollout transition.
    pub last_transition: Option<Transition>,
    /// Why the candidate was rolled back, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// The judge's live figures.
    #[serde(default)]
    pub judge: JudgeFigures,
    /// A rollback in effect that the state dir could not record yet, retried every tick.
    /// While it is set nothing else is recorded for the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_pending: Option<JournalPending>,
    /// Fleet mode: the fleet's record, its leader and members, the merged windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

pub use crate::rollout::event::JournalPending;
use crate::rollout::evidence::Evidence;
pub use crate::rollout::fleet_status::FleetStatus;

/// The rollback that put a route in `rolled_back`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rollback {
    /// RFC 3339 time.
    pub at: String,
    /// The rule that tripped, or `manual`.
    pub rule: String,
    /// The figures behind it.
    pub evidence: Option<Evidence>,
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
    /// Endpoints skipped right now: failing their health check or backing off after a
    /// refused connection.
    #[serde(default)]
    pub unhealthy_endpoints: Vec<String>,
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
        let version = |v: &crate::route_state::VersionRuntime, endpoints: &[String]| VersionStatus {
            version: v.version.clone(),
            endpoints: endpoints.to_vec(),
            window: v.figures(),
            unhealthy_endpoints: route.pool(v.role).unavailable(),
        };
        let cfg = &route.config;
        let (phase, step, weight) = route.position();
        let view = route.rollout().map(|r| r.view());
        let transition = |e: &Event| Transition { at: e.at.clone(), from: e.from, to: e.to, reason: e.reason.clone() };
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
            last_transition: view.as_ref().and_then(|v| v.last_transition.as_ref()).map(transition),
            rollback: view.as_ref().and_then(|v| v.rollback.as_ref()).map(|e| Rollback {
                at: e.at.clone(),
                rule: Evidence::rule_label(e.evidence.as_ref()).to_string(),
                evidence: e.evidence.clone(),
            }),
            journal_pending: view.as_ref().and_then(|v| v.journal_pending.clone()),
            fleet: view.as_ref().and_then(|v| v.fleet.clone()),
            judge: view.map(|v| v.judge).unwrap_or_default(),
        }
    }
}
