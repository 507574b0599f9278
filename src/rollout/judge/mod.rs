//! The judge: is the candidate worse than stable, with what confidence? Pure code, fed one
//! [`Observation`] per tick, answering a [`Verdict`] and the [`JudgeFigures`] behind it.
//!
//! Each rule (`error_rate`, `latency`, `max_error_rate`, `max_p99`, `mirror_mismatch`) is an
//! e-process behind the small `Rule` trait in `rules/`, one file per rule: how a tick and a
//! closed batch move its evidence, whether the configuration arms it, and the gates that
//! decide whether its evidence acts. The judge loops over the rules; the false-rollback budget
//! `α = 1 − confidence` is split evenly among the armed ones. The evidence of every rule lives
//! in [`JudgeState`], the part a restart must not lose. The mixture maths (the e-process
//! itself) is in `mixture.rs`, the batching of low-traffic ticks and the mirrored-pair window
//! in `batch.rs`.
//!
//! See `docs/judge.md` for the statistics: why the rules are e-processes, the comparative
//! mixture, the absolute guards, the gates, blue-green and what the guarantee assumes.
#![deny(clippy::disallowed_methods)]

mod batch;
mod mixture;
mod rules;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use batch::MIN_BATCH_STABLE;
pub use mixture::{Mixture, THETAS};

use crate::config::RollbackConfig;
use crate::stats::Totals;
use crate::stats::window::Latency;
use batch::{Batch, PairWindow};
use rules::{RULES, RuleSettings, RuleWindow, Tick};

/// The rules the judge knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Candidate error rate worse than stable's.
    ErrorRate,
    /// Candidate latency distribution worse than stable's.
    Latency,
    /// Candidate error rate above `max_error_rate`.
    MaxErrorRate,
    /// Candidate p99 above `max_p99`.
    MaxP99,
    /// Mirrored answers differing from stable's more often than `max_mismatch_rate`.
    MirrorMismatch,
}

impl RuleKind {
    /// Every rule, in the order the judge reports them.
    pub const ALL: [RuleKind; 5] =
        [RuleKind::ErrorRate, RuleKind::Latency, RuleKind::MaxErrorRate, RuleKind::MaxP99, RuleKind::MirrorMismatch];

    /// The `rule` label.
    pub fn label(self) -> &'static str {
        match self {
            RuleKind::ErrorRate => "error_rate",
            RuleKind::Latency => "latency",
            RuleKind::MaxErrorRate => "max_error_rate",
            RuleKind::MaxP99 => "max_p99",
            RuleKind::MirrorMismatch => "mirror_mismatch",
        }
    }
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A rule that tripped: what a rollback is blamed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    /// Which rule.
    pub rule: RuleKind,
    /// Its evidence, `ln E`.
    pub ln_evidence: f64,
    /// The threshold it crossed, `ln(k/α)`.
    pub ln_threshold: f64,
}

/// The judge's answer for one tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No rule is near its threshold: the rollout may advance.
    Healthy,
    /// Evidence is building or events are too few to act: hold, never advance, never roll back.
    Inconclusive,
    /// A rule tripped: snap back.
    Failing(Breach),
}

impl Verdict {
    /// `healthy`, `inconclusive` or `failing`.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Failing(_) => "failing",
        }
    }

    /// The verdict the rules' figures add up to: the first rule that fired, else a hold if
    /// any rule is watching, else healthy.
    fn of(rules: &[RuleFigures]) -> Verdict {
        if let Some(f) = rules.iter().find(|r| r.state == RuleState::Fired) {
            Verdict::Failing(Breach { rule: f.rule, ln_evidence: f.ln_evidence, ln_threshold: f.ln_threshold })
        } else if rules.iter().any(|r| r.state == RuleState::Watching) {
            Verdict::Inconclusive
        } else {
            Verdict::Healthy
        }
    }
}

/// Where a rule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleState {
    /// Evidence below half the threshold.
    Quiet,
    /// Evidence above half the threshold, or above it with too few bad events: hold.
    Watching,
    /// Evidence above the threshold but the effect is smaller than worth a rollback.
    Suppressed,
    /// Tripped.
    Fired,
}

impl RuleState {
    /// The state's name, as the admin API spells it.
    pub fn label(self) -> &'static str {
        match self {
            RuleState::Quiet => "quiet",
            RuleState::Watching => "watching",
            RuleState::Suppressed => "suppressed",
            RuleState::Fired => "fired",
        }
    }
}

/// One rule's live figures, so an operator can see why the judge decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleFigures {
    /// Which rule.
    pub rule: RuleKind,
    /// Where it stands.
    pub state: RuleState,
    /// `ln E`.
    pub ln_evidence: f64,
    /// `ln(k/α)`.
    pub ln_threshold: f64,
    /// The observed candidate figure in the window (error rate, worst quantile ratio, p99 ms,
    /// or mirror mismatch rate).
    pub candidate: f64,
    /// The matching stable figure (the baseline's while baking), or the configured limit for
    /// guards and `mirror_mismatch`.
    pub stable: f64,
    /// Candidate requests in the window (mirrored pairs compared, for `mirror_mismatch`).
    pub candidate_requests: u64,
    /// Stable requests in the window (in the baseline, while baking).
    pub stable_requests: u64,
    /// Why a gate held it back, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// All rules' figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JudgeFigures {
    /// `healthy`, `inconclusive` or `failing`.
    pub verdict: String,
    /// The whole rollout's false-rollback budget.
    pub alpha: f64,
    /// Per rule.
    pub rules: Vec<RuleFigures>,
}

/// The e-processes' state: what a restart must not lose.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeState {
    /// `error_rate`.
    pub errors: Mixture,
    /// `latency`, one per τ (p50, p90, p99).
    pub latency: [Mixture; 3],
    /// `max_error_rate`, one-sample.
    pub error_guard: Mixture,
    /// `max_p99`, one-sample.
    pub p99_guard: Mixture,
    /// `max_p99`'s comparative companion.
    pub p99_compare: Mixture,
    /// `mirror_mismatch`, one-sample against `max_mismatch_rate`.
    #[serde(default)]
    pub mismatch: Mixture,
    /// Stable's figures frozen at a blue-green switch: what the comparative rules hold the
    /// candidate to while it serves everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
}

/// Lowest error rate a [`Baseline`] holds the candidate to.
pub const MIN_BASELINE_ERROR_RATE: f64 = 0.001;

/// The quantiles the latency rule compares (its τ) and a [`Baseline`] keeps.
const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// Stable's window at the moment a blue-green rollout switched to the candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Stable requests in the window.
    pub requests: u64,
    /// Stable errors in the window.
    pub errors: u64,
    /// Stable's p50, p90 and p99 in the window, µs: the latency rule's τ during the bake.
    pub quantiles_us: [u64; 3],
}

impl Baseline {
    /// The baseline of stable's window `w`, or `None` when it holds no request.
    pub fn of(w: &Totals) -> Option<Baseline> {
        let lat = Latency(&w.latency);
        let quantiles_us = QUANTILES.map(|q| lat.quantile_us(q));
        (w.requests() > 0 && quantiles_us.iter().all(Option::is_some)).then(|| Baseline {
            requests: w.requests(),
            errors: w.faults,
            quantiles_us: quantiles_us.map(|q| q.unwrap_or(0)),
        })
    }

    /// The error rate the candidate is held to: `(errors + 1) / (requests + 1)`, so that a
    /// short or error-free window never sets the bar at zero, and at least
    /// [`MIN_BASELINE_ERROR_RATE`].
    pub fn error_rate(&self) -> f64 {
        ((self.errors + 1) as f64 / (self.requests + 1) as f64).max(MIN_BASELINE_ERROR_RATE)
    }
}

/// What the judge reads each tick (counts only judged, randomly assigned requests; in a
/// blue-green preview the candidate's side is its mirrored traffic).
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Stable traffic since the previous tick.
    pub stable_tick: &'a Totals,
    /// Candidate traffic since the previous tick.
    pub candidate_tick: &'a Totals,
    /// Stable traffic in the rolling window.
    pub stable_window: &'a Totals,
    /// Candidate traffic in the rolling window.
    pub candidate_window: &'a Totals,
    /// The candidate's weight during the tick.
    pub weight_bp: u32,
    /// Mirrored answers compared with stable's since the previous tick.
    pub mirror_compared: u64,
    /// Of those, the ones that differed.
    pub mirror_mismatched: u64,
    /// Stable's side is its answers to mirrored copies of candidate requests (a blue-green
    /// bake): the comparative rules compare the two concurrently even at 100% weight, instead
    /// of holding the candidate to the baseline frozen at the switch.
    pub stable_mirrored: bool,
}

/// The judge of one rollout.
#[derive(Debug, Clone)]
pub struct Judge {
    settings: RuleSettings,
    state: JudgeState,
    batch: Batch,
    taus: Option<[u64; 3]>,
    ln_threshold: f64,
    figures: JudgeFigures,
    pairs: PairWindow,
}

impl Judge {
    /// A judge with fresh evidence.
    pub fn new(cfg: &RollbackConfig) -> Judge {
        Judge::restore(cfg, JudgeState::default())
    }

    /// A judge continuing from recorded evidence.
    pub fn restore(cfg: &RollbackConfig, state: JudgeState) -> Judge {
        let settings = RuleSettings { rollback: cfg.clone(), max_mismatch_rate: None };
        Judge {
            ln_threshold: threshold(&settings),
            settings,
            state,
            batch: Batch::default(),
            taus: None,
            figures: JudgeFigures::default(),
            pairs: PairWindow::new(cfg),
        }
    }

    /// Arms the `mirror_mismatch` rule with `mirror.max_mismatch_rate` (it takes its share of
    /// the budget).
    pub fn with_mirror_limit(mut self, max_mismatch_rate: Option<f64>) -> Judge {
        self.settings.max_mismatch_rate = max_mismatch_rate;
        self.ln_threshold = threshold(&self.settings);
        self
    }

    /// Freezes stable's figures for a blue-green bake (or forgets them with `None`).
    pub fn set_baseline(&mut self, baseline: Option<Baseline>) {
        self.state.baseline = baseline;
    }

    /// The frozen stable figures, while baking.
    pub fn baseline(&self) -> Option<&Baseline> {
        self.state.baseline.as_ref()
    }

    /// The evidence, for the state file.
    pub fn state(&self) -> &JudgeState {
        &self.state
    }

    /// The last tick's figures.
    pub fn figures(&self) -> &JudgeFigures {
        &self.figures
    }

    /// `ln(k/α)`.
    pub fn ln_threshold(&self) -> f64 {
        self.ln_threshold
    }

    /// Feeds one tick and returns the verdict.
    pub fn evaluate(&mut self, o: &Observation<'_>) -> Verdict {
        if !self.batch.continues(o) {
            self.close_batch(true);
            self.batch.restart(o);
        }
        let max_p99_us = self.settings.rollback.max_p99.map(|limit| limit.as_micros() as u64);
        self.batch.add(o, self.taus, max_p99_us);
        let tick = Tick::of(o, self.state.baseline.as_ref());
        for rule in RULES {
            rule.observe(&self.settings, &mut self.state, &tick);
        }
        self.pairs.push(o.mirror_compared, o.mirror_mismatched);
        self.close_batch(false);
        // τ for the next tick comes from this window, so no tick is judged by its own data.
        let sw = Latency(&o.stable_window.latency);
        if sw.count() > 0 {
            self.taus = Some(QUANTILES.map(|q| sw.quantile_us(q).unwrap_or(0)));
        }
        self.decide(o)
    }

    /// Weighs the batch when it is ready (see [`Batch`]); a `forced` close (the split
    /// changed) always starts a new one.
    fn close_batch(&mut self, forced: bool) {
        let ready = self.batch.ready(forced);
        if ready {
            for rule in RULES {
                rule.weigh(&mut self.state, &self.batch);
            }
        }
        if ready || forced {
            self.batch.clear();
        }
    }

    /// Judges every armed rule on the window and keeps their figures.
    fn decide(&mut self, o: &Observation<'_>) -> Verdict {
        let w = RuleWindow::of(o, &self.state, &self.pairs, self.ln_threshold);
        let rules: Vec<RuleFigures> = RULES.iter().filter_map(|rule| rule.judge(&self.settings, &w)).collect();
        let verdict = Verdict::of(&rules);
        let alpha = 1.0 - self.settings.rollback.confidence;
        self.figures = JudgeFigures { verdict: verdict.label().to_string(), alpha, rules };
        verdict
    }
}

/// `ln(k/α)` for the `k` armed rules: each takes an even share of the budget.
fn threshold(settings: &RuleSettings) -> f64 {
    let armed = RULES.iter().filter(|rule| rule.armed(settings)).count().max(1);
    (armed as f64 / (1.0 - settings.rollback.confidence)).ln()
}

/// The confidences of a fleet's judges, so that its false-rollback budget `α = 1 − confidence`
/// holds for the whole fleet, not once per replica.
///
/// A fleet rolls a healthy candidate back when the leader's judge of the merged traffic, or
/// any one replica's judge of its own traffic, trips. The merged judge takes `α/2`; the local
/// judges share the other half, `α/(2n)` each for `n` live members. By the union bound the
/// chance that any of them trips on a healthy candidate stays below `α`, whatever `n` is.
/// The merged judge sees all the traffic, so it is the one that catches a slight regression;
/// a local judge's job is the brake on a blatant one, which needs little evidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetConfidence {
    /// For the leader's judge of the fleet's merged traffic.
    pub merged: f64,
    /// For each replica's judge of its own traffic.
    pub local: f64,
}

impl FleetConfidence {
    /// The split of `confidence` over `members` live replicas (at least one).
    pub fn split(confidence: f64, members: usize) -> FleetConfidence {
        let alpha = 1.0 - confidence;
        let n = members.max(1) as f64;
        FleetConfidence { merged: 1.0 - alpha / 2.0, local: 1.0 - alpha / (2.0 * n) }
    }
}
