//! The judge's rules, one file each, all behind [`Rule`].
//!
//! A rule's evidence lives in [`JudgeState`] (so a restart keeps it and a state file keeps its
//! shape); the rule itself is a stateless unit struct that knows which of those e-processes
//! are its own, how a tick and a batch move them, and how to read the window's gates. The
//! judge loops over [`RULES`]: every rule keeps its evidence current whether it is armed or
//! not (a reload that arms it finds the evidence there), only armed rules take a share of α
//! and are judged.

mod error_rate;
mod latency;
mod max_error_rate;
mod max_p99;
mod mirror_mismatch;

use super::batch::{Batch, PairWindow};
use super::{Baseline, JudgeState, Observation, RuleFigures, RuleKind, RuleState};
use crate::config::RollbackConfig;
use crate::split::FULL_BP;
use crate::stats::Totals;
use crate::stats::window::Latency;

/// A rule needs at least this many bad events in the window to fire.
const MIN_BAD_EVENTS: u64 = 3;

/// Every rule, in the order the judge reports them ([`RuleKind::ALL`]).
pub(super) const RULES: [&dyn Rule; 5] = [
    &error_rate::ErrorRate,
    &latency::LatencyRule,
    &max_error_rate::MaxErrorRate,
    &max_p99::MaxP99,
    &mirror_mismatch::MirrorMismatch,
];

/// What a rule reads of the configuration.
#[derive(Debug, Clone)]
pub(super) struct RuleSettings {
    /// The route's `rollback` table.
    pub(super) rollback: RollbackConfig,
    /// `mirror.max_mismatch_rate`, which arms `mirror_mismatch`.
    pub(super) max_mismatch_rate: Option<f64>,
}

/// One rule: an e-process (or a few) plus the gates that decide whether its evidence acts.
pub(super) trait Rule: Sync {
    /// Which rule this is.
    fn kind(&self) -> RuleKind;

    /// True when the configuration arms the rule: it then takes its share of α and is judged.
    fn armed(&self, settings: &RuleSettings) -> bool;

    /// Adds one tick's one-sample evidence (guards, and the baseline comparison while baking).
    fn observe(&self, _settings: &RuleSettings, _state: &mut JudgeState, _tick: &Tick<'_>) {}

    /// Adds a closed batch's two-sample evidence.
    fn weigh(&self, _state: &mut JudgeState, _batch: &Batch) {}

    /// The rule's figures and state for the window; `None` when it is not armed.
    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures>;
}

/// One tick, as the one-sample updates read it.
pub(super) struct Tick<'a> {
    /// Candidate requests in the tick.
    pub(super) n_c: u64,
    /// Candidate errors in the tick.
    pub(super) x_c: u64,
    /// The candidate's latency in the tick.
    pub(super) latency: Latency<'a>,
    /// Mirrored answers compared with stable's.
    pub(super) mirror_compared: u64,
    /// Of those, the ones that differed.
    pub(super) mirror_mismatched: u64,
    /// Stable's frozen figures, when baking with no concurrent stable answers: the
    /// comparative rules then go on one-sample against them.
    pub(super) baseline: Option<Baseline>,
}

impl<'a> Tick<'a> {
    /// The tick of `o`; `baseline` is the judge's, if any.
    pub(super) fn of(o: &Observation<'a>, baseline: Option<&Baseline>) -> Tick<'a> {
        Tick {
            n_c: o.candidate_tick.requests(),
            x_c: o.candidate_tick.faults,
            latency: Latency(&o.candidate_tick.latency),
            mirror_compared: o.mirror_compared,
            mirror_mismatched: o.mirror_mismatched,
            baseline: baseline.filter(|_| alone(o)).cloned(),
        }
    }
}

/// At 100% with no concurrent stable answers there is nothing to compare with.
fn alone(o: &Observation<'_>) -> bool {
    o.weight_bp >= FULL_BP && !o.stable_mirrored
}

/// The window as the rules judge it.
pub(super) struct RuleWindow<'a> {
    /// The evidence.
    pub(super) state: &'a JudgeState,
    /// Mirrored pairs in the window.
    pub(super) pairs: &'a PairWindow,
    /// `ln(k/α)`.
    pub(super) ln_threshold: f64,
    /// Candidate traffic in the window.
    pub(super) cw: &'a Totals,
    /// Stable traffic in the window.
    pub(super) sw: &'a Totals,
    /// At 100% with no concurrent stable answers.
    pub(super) alone: bool,
    /// Baking without them: the comparative rules read stable's figures from before the
    /// switch.
    pub(super) baseline: Option<&'a Baseline>,
    /// The candidate's error rate in the window.
    pub(super) rc: f64,
    /// Stable's error rate in the window.
    pub(super) rs: f64,
}

impl<'a> RuleWindow<'a> {
    /// The window of `o`, judged on `state` against `ln_threshold`.
    pub(super) fn of(o: &Observation<'a>, state: &'a JudgeState, pairs: &'a PairWindow, ln_threshold: f64) -> Self {
        let rate = |t: &Totals| if t.requests() == 0 { 0.0 } else { t.faults as f64 / t.requests() as f64 };
        let alone = alone(o);
        RuleWindow {
            state,
            pairs,
            ln_threshold,
            cw: o.candidate_window,
            sw: o.stable_window,
            alone,
            baseline: state.baseline.as_ref().filter(|_| alone),
            rc: rate(o.candidate_window),
            rs: rate(o.stable_window),
        }
    }

    /// A quiet figure of `rule` with evidence `e`, over the window's requests.
    pub(super) fn figure(&self, rule: RuleKind, e: f64, candidate: f64, stable: f64) -> RuleFigures {
        RuleFigures {
            rule,
            state: RuleState::Quiet,
            ln_evidence: e,
            ln_threshold: self.ln_threshold,
            candidate,
            stable,
            candidate_requests: self.cw.requests(),
            stable_requests: self.sw.requests(),
            note: None,
        }
    }

    /// True when a comparative rule has nothing to compare with: at full weight with neither
    /// concurrent stable answers nor a baseline, its evidence is frozen and its gates would
    /// read an empty stable window.
    pub(super) fn nothing_to_compare(&self) -> bool {
        self.alone && self.baseline.is_none()
    }
}

/// `f`, marked as not applicable at full weight (it stays quiet).
fn not_applicable(mut f: RuleFigures) -> RuleFigures {
    f.note = Some("no stable traffic to compare with at 100%".into());
    f
}

/// The events gate: `count` bad events (described by `what`) are enough to act on.
fn enough_events(count: u64, what: &str) -> Result<(), String> {
    if count >= MIN_BAD_EVENTS { Ok(()) } else { Err(format!("{count} {what} (need {MIN_BAD_EVENTS})")) }
}

/// Sets a rule's state from its evidence and gates. Too few events holds (more data will
/// come); too small an effect lets the rollout go on.
fn classify(mut f: RuleFigures, events: Result<(), String>, effect: Result<(), String>) -> RuleFigures {
    let (e, thr) = (f.ln_evidence, f.ln_threshold);
    f.state = if e >= thr {
        match (effect, events) {
            (Err(why), _) => {
                f.note = Some(why);
                RuleState::Suppressed
            }
            (Ok(()), Err(why)) => {
                f.note = Some(why);
                RuleState::Watching
            }
            (Ok(()), Ok(())) => RuleState::Fired,
        }
    } else if e >= thr / 2.0 {
        RuleState::Watching
    } else {
        RuleState::Quiet
    };
    f
}
