//! The records a rollout's transitions produce: the event that is journaled and POSTed to
//! webhooks, and a rollback in effect that the journal has not recorded yet.
//!
//! Plain data, defined next to the phases and event kinds they are made of, so that the
//! rollout state can hold them without depending on the journal or the status types (which
//! re-export them as `journal::Event` and `status::JournalPending`).

use serde::{Deserialize, Serialize};

use super::Phase;
use super::evidence::Evidence;
use super::machine::{Change, EventKind};

/// A journal event; also the body POSTed to webhooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 time.
    pub at: String,
    /// Route name.
    pub route: String,
    /// What happened.
    pub kind: EventKind,
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// Candidate weight after, percent.
    pub candidate_weight: f64,
    /// Why.
    pub reason: String,
    /// The figures behind the decision (rollbacks, a blue-green switch), or `null`.
    #[serde(default)]
    pub evidence: Option<Evidence>,
    /// Step after, when on one.
    #[serde(default)]
    pub step: Option<usize>,
    /// Candidate version the event is about.
    #[serde(default)]
    pub candidate_version: String,
    /// Stable version at the time.
    #[serde(default)]
    pub stable_version: String,
}

impl Event {
    /// The event of `change` of `route`'s rollout of `candidate` over `stable`, at `at`
    /// (RFC 3339): one construction for the single-replica and the fleet controllers.
    pub fn of(
        at: String,
        route: &str,
        change: &Change,
        evidence: Option<Evidence>,
        candidate: &str,
        stable: &str,
    ) -> Event {
        Event {
            at,
            route: route.to_string(),
            kind: change.kind,
            from: change.from,
            to: change.to,
            candidate_weight: f64::from(change.weight_bp) / 100.0,
            reason: change.reason.clone(),
            evidence,
            step: change.step,
            candidate_version: candidate.to_string(),
            stable_version: stable.to_string(),
        }
    }
}

/// A transition applied to traffic but not yet in the journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JournalPending {
    /// RFC 3339 time of the transition.
    pub at: String,
    /// What happened (`rolled_back`).
    pub kind: EventKind,
    /// Phase after.
    pub to: Phase,
    /// Why.
    pub reason: String,
    /// Failed attempts to record it so far.
    pub attempts: u64,
    /// The latest write error.
    pub error: String,
}
