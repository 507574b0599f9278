//! How a fleet shares a route's rollout, as this replica sees it: plain data that the control
//! plane publishes with the rollout's view and `veer status` prints, defined here (next to the
//! view that holds it) so that the rollout state depends on neither the fleet agent nor the
//! status types.

use serde::{Deserialize, Serialize};

use super::Phase;
use crate::stats::window::WindowFigures;

/// Where a replica stands with a route's fleet rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Applies the record's weight.
    Following,
    /// Has not read a record of its rollout yet (starting, etcd unreachable since start, or
    /// the fleet has not started it): serves stable only.
    Waiting,
    /// Its config names another rollout than the fleet's record: serves stable only.
    Mismatch,
    /// A judge failed the candidate and the rollback is not in the record yet: serves stable
    /// only for this rollout.
    Braked,
}

impl Standing {
    /// The label in status and logs.
    pub fn label(self) -> &'static str {
        match self {
            Standing::Following => "following",
            Standing::Waiting => "waiting",
            Standing::Mismatch => "mismatch",
            Standing::Braked => "braked",
        }
    }
}

/// A route's fleet rollout from one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// This replica.
    pub node: String,
    /// The etcd session is up.
    pub connected: bool,
    /// The replica leading this route's rollout, when one does.
    pub leader: Option<String>,
    /// Where this replica stands.
    pub standing: Standing,
    /// Why, when not simply following.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The fleet's record, as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<FleetRecord>,
    /// Live replicas that serve the route.
    pub members: Vec<FleetMember>,
    /// The fleet's merged windows (what the leader judges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<MergedWindows>,
    /// The false-rollback budget of the merged judge and of each local judge.
    pub alpha: FleetAlpha,
}

/// The fleet's record of the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    /// etcd `mod_revision`.
    pub revision: i64,
    /// Rollouts and retries of the route so far.
    pub epoch: u64,
    /// Phase.
    pub phase: Phase,
    /// Step, when on one.
    pub step: Option<usize>,
    /// Candidate weight, percent.
    pub candidate_weight: f64,
    /// Stable version.
    pub stable_version: String,
    /// Candidate version.
    pub candidate_version: String,
    /// Hash of the plan's settings.
    pub plan: String,
    /// Node that wrote it last.
    pub writer: String,
}

/// One live replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetMember {
    /// Node name.
    pub node: String,
    /// Milliseconds since it last wrote its report or (while a rollout is judged, as the
    /// leader sees it) its counters.
    pub last_heard_ms: u64,
    /// Candidate weight it applies, percent.
    pub candidate_weight: f64,
    /// Where it stands.
    pub standing: Standing,
    /// Its config names the fleet's rollout.
    pub agrees: bool,
    /// Candidate version its config names.
    pub candidate_version: String,
    /// Stable requests and errors it answered since its start, as the leader last read them
    /// (while the rollout is judged).
    pub stable: Option<MemberFigures>,
    /// Candidate requests and errors.
    pub candidate: Option<MemberFigures>,
}

/// A member's counts of one version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberFigures {
    /// Requests answered.
    pub requests: u64,
    /// Of which the version is to blame for.
    pub errors: u64,
}

/// The fleet's windows, summed over its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergedWindows {
    /// Stable.
    pub stable: WindowFigures,
    /// Candidate.
    pub candidate: WindowFigures,
}

/// How the false-rollback budget is split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FleetAlpha {
    /// The merged judge's.
    pub merged: f64,
    /// Each local judge's.
    pub local: f64,
}
