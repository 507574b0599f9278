//! A route's rollout: the candidate's current weight and the state that owns it.
//!
//! The weight is the one value that changes at tick speed, so it lives in an atomic here,
//! outside the configuration snapshot: the data plane reads it with one relaxed load per
//! request, and the state survives a reload as long as the candidate version is unchanged.

pub mod judge;
pub mod machine;

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::split::{FULL_BP, Splitter};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The route has no candidate.
    Stable,
    /// A candidate exists and has not started receiving traffic.
    Pending,
    /// The candidate receives its step's share.
    Progressing,
    /// Held at the current step by an operator.
    Paused,
    /// The candidate serves everything.
    Promoted,
    /// Snapped back to 100% stable.
    RolledBack,
    /// Blue-green: the candidate gets only override and mirrored traffic.
    Preview,
    /// Blue-green: the candidate serves everything with every rule still armed.
    Baking,
}

impl Phase {
    /// Every phase, in the order `veer_rollout_phase` lists them.
    pub const ALL: [Phase; 6] =
        [Phase::Stable, Phase::Pending, Phase::Progressing, Phase::Paused, Phase::Promoted, Phase::RolledBack];

    /// The `phase` label / JSON value.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Stable => "stable",
            Phase::Pending => "pending",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
            Phase::Preview => "preview",
            Phase::Baking => "baking",
        }
    }
}

/// The live state of one candidate's rollout.
#[derive(Debug)]
pub struct RolloutState {
    candidate_version: String,
    weight_bp: AtomicU32,
    splitter: Splitter,
}

impl RolloutState {
    /// A rollout of `candidate_version` starting at `weight_bp`.
    pub fn new(candidate_version: &str, weight_bp: u32) -> Self {
        RolloutState {
            candidate_version: candidate_version.to_string(),
            weight_bp: AtomicU32::new(weight_bp.min(FULL_BP)),
            splitter: Splitter::new(),
        }
    }

    /// The candidate version this rollout is about.
    pub fn candidate_version(&self) -> &str {
        &self.candidate_version
    }

    /// Current candidate weight in basis points.
    #[inline]
    pub fn weight_bp(&self) -> u32 {
        self.weight_bp.load(Ordering::Relaxed)
    }

    /// Changes the candidate weight; the next request sees it.
    pub fn set_weight_bp(&self, bp: u32) {
        self.weight_bp.store(bp.min(FULL_BP), Ordering::Relaxed);
    }

    /// True when this request goes to the candidate.
    #[inline]
    pub fn pick_candidate(&self) -> bool {
        self.splitter.pick_candidate(self.weight_bp())
    }
}
