//! A route's rollout: the candidate's current weight and the state that owns it.
//!
//! The weight is the one value that changes at tick speed, so it lives in an atomic here,
//! outside the configuration snapshot: the data plane reads it with one relaxed load per
//! request, and the state survives a reload as long as the candidate version is unchanged.

pub mod event;
pub mod evidence;
pub mod fleet_status;
pub mod judge;
pub mod machine;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::split::{FULL_BP, Splitter};
use event::{Event, JournalPending};
use fleet_status::FleetStatus;
use judge::JudgeFigures;

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
    pub const ALL: [Phase; 8] = [
        Phase::Stable,
        Phase::Pending,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoted,
        Phase::RolledBack,
        Phase::Preview,
        Phase::Baking,
    ];

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

/// What the controller last decided, for the admin API and the CLI.
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// Current phase.
    pub phase: Phase,
    /// Current step, when on one.
    pub step: Option<usize>,
    /// The newest transition.
    pub last_transition: Option<Event>,
    /// The rollback event, while rolled back.
    pub rollback: Option<Event>,
    /// The judge's latest figures.
    pub judge: JudgeFigures,
    /// A rollback in effect that the journal has not recorded yet.
    pub journal_pending: Option<JournalPending>,
    /// How the fleet shares this rollout (fleet mode only).
    pub fleet: Option<FleetStatus>,
}

/// The live state of one candidate's rollout.
///
/// The data plane only reads the weight; the control plane (the only writer) also publishes
/// a [`RolloutView`] for readers.
#[derive(Debug)]
pub struct RolloutState {
    candidate_version: String,
    weight_bp: AtomicU32,
    splitter: Splitter,
    view: Mutex<RolloutView>,
    live: AtomicBool,
    baking: AtomicBool,
}

impl RolloutState {
    /// A pending rollout of `candidate_version`: weight 0 until the controller starts it or
    /// restores its recorded state, so a restart never sends a rolled-back candidate traffic.
    pub fn new(candidate_version: &str) -> Self {
        RolloutState {
            candidate_version: candidate_version.to_string(),
            weight_bp: AtomicU32::new(0),
            splitter: Splitter::new(),
            live: AtomicBool::new(false),
            baking: AtomicBool::new(false),
            view: Mutex::new(RolloutView {
                phase: Phase::Pending,
                step: None,
                last_transition: None,
                rollback: None,
                judge: JudgeFigures::default(),
                journal_pending: None,
                fleet: None,
            }),
        }
    }

    /// The controller's latest view.
    pub fn view(&self) -> RolloutView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes a new view (control plane only).
    pub fn set_view(&self, f: impl FnOnce(&mut RolloutView)) {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut view);
        let live = matches!(view.phase, Phase::Progressing | Phase::Paused | Phase::Preview | Phase::Baking);
        self.live.store(live, Ordering::Relaxed);
        self.baking.store(view.phase == Phase::Baking, Ordering::Relaxed);
    }

    /// True while the candidate is being rolled out (not pending, promoted or rolled back):
    /// the data plane mirrors to it only then.
    #[inline]
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// True while a blue-green candidate bakes at 100%: the data plane then mirrors the
    /// candidate's requests to stable, so the bake is judged against stable's concurrent
    /// answers rather than against stable from before the switch.
    #[inline]
    pub fn is_baking(&self) -> bool {
        self.baking.load(Ordering::Relaxed)
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

/// Phase, step index and candidate weight (percent) of a route's rollout right now; a route
/// without candidate is `stable` at 0%.
pub fn position(rollout: Option<&RolloutState>) -> (Phase, Option<usize>, f64) {
    match rollout {
        None => (Phase::Stable, None, 0.0),
        Some(r) => {
            let view = r.view();
            (view.phase, view.step, f64::from(r.weight_bp()) / 100.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bake_mirrors_the_candidate_s_requests_to_stable() {
        let r = RolloutState::new("v2");
        let at = |phase| {
            r.set_view(|v| v.phase = phase);
            (r.is_live(), r.is_baking())
        };
        assert_eq!(at(Phase::Pending), (false, false));
        assert_eq!(at(Phase::Progressing), (true, false));
        assert_eq!(at(Phase::Preview), (true, false));
        assert_eq!(at(Phase::Baking), (true, true), "the bake copies the candidate's requests to stable");
        assert_eq!(at(Phase::Promoted), (false, false), "a promoted candidate is no longer compared");
        assert_eq!(at(Phase::Baking), (true, true));
        assert_eq!(at(Phase::RolledBack), (false, false), "a rollback stops the copies at once");
    }
}
