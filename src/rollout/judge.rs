//! The judge: is the candidate worse than stable, with what confidence? Pure code.
//!
//! # Method
//!
//! Every rule is an *e-process*: a running likelihood ratio that stays small while the
//! candidate is as good as stable and grows when it is worse. Because an e-process is a
//! nonnegative supermartingale under the null, Ville's inequality bounds the chance that it
//! *ever* crosses `1/α`, however often it is looked at — so veer can peak ten times a second
//! and still keep its false-rollback promise. (A fixed-sample test looked at that often would
//! roll back healthy candidates all the time.)
//!
//! **Comparative rules** use the conditional-binomial mixture of Lindon & Malek ("Anytime-Valid
//! Inference for Multinomial Count Data", NeurIPS 2022). Given that a bad event (an error, or a
//! request slower than τ) happened during a tick in which the candidate served a share
//! `q = n_c / (n_c + n_s)` of the judged requests, it belongs to the candidate with probability
//! `q` when both versions are equally good, and `ρ = θq / (θq + 1 − q)` when the candidate's
//! rate is θ times stable's. Each alternative θ ∈ {1.5, 2, 3, 5, 10, 30, 100, 1000} keeps its
//! log-likelihood ratio ℓ_θ; the evidence is their average, `ln E = logsumexp(ℓ) − ln|Θ|`.
//! Using the *observed* share makes the test immune to whatever both versions have in common:
//! a shared outage or a high background error rate moves both counts and no evidence.
//!
//! - `error_rate`: bad event = an error the version is to blame for.
//! - `latency`: bad event = slower than τ, for τ = stable's p50, p90 and p99 from the previous
//!   tick's window (never from the current tick's data); the three e-processes are averaged,
//!   which still is an e-process. A tail-only regression moves the p99 process strongly even
//!   when means barely change.
//!
//! **Absolute guards** (`max_error_rate`, `max_p99`, where p99 ≤ T means "at most 1% of
//! requests slower than T") are one-sample mixtures of the candidate against the limit. They
//! fire only when the comparative test on the same events fires too, so a problem stable has as
//! well never rolls the candidate back; at 100% weight, with no stable traffic left to compare
//! against, they run alone.
//!
//! **Budget.** `α = 1 − confidence` is for the whole rollout, split evenly among the armed
//! rules: each fires at `ln E ≥ ln(k/α)`. Evidence carries across steps and is only reset when
//! a rollout starts over (`retry`, or a new candidate version).
//!
//! **Gates** can only suppress an alarm: a candidate must have at least 3 bad events in the
//! window, and the observed effect must be worth a rollback (`min_effect_ratio`,
//! `max_error_rate_increase`, `max_p99_ratio`). A rule that fired but lacks events holds the
//! rollout (`Inconclusive`); one whose effect is too small to matter does not.
//!
//! **Blue-green.** In preview the candidate's side of every rule is its answers to mirrored
//! copies (a random share of stable's own requests), compared with stable's judged traffic.
//! While the candidate bakes at 100% the roles swap: the same share of the candidate's
//! requests is copied to stable, and stable's side is its answers to those copies
//! ([`Observation::stable_mirrored`]). The comparison stays concurrent, so whatever changes
//! after the switch for both versions alike (machine load, the traffic mix, a slow
//! dependency) moves both sides and no evidence; the gates and the absolute guards read the
//! two windows exactly as during a canary step. Only when there are no such stable answers
//! (a route that does not mirror, or no idempotent request to copy) do the comparative rules
//! fall back to stable's window frozen at the switch, a [`Baseline`]: one-sample e-processes
//! of the candidate against it (errors against stable's rate, latency against "at most
//! 50/10/1% slower than stable's p50/p90/p99"), the gates read against the baseline, and the
//! absolute guards run alone. That fallback charges any later change of the environment to
//! the candidate. Each rule keeps one e-process for the whole rollout, so the budget is
//! unchanged.
//!
//! **`mirror_mismatch`** (armed by `mirror.max_mismatch_rate`): a one-sample mixture of the
//! mirrored answers that differ from stable's, against that rate. It fires only with at least 3
//! mismatches in the window and a window mismatch rate above the limit.
//!
//! **Validity.** The guarantee assumes each request was assigned to a version independently of
//! its outcome (the weighted split does this). Requests forced by an override header or copied
//! by mirroring are not fed to the comparison, except in a blue-green rollout: in preview,
//! mirrored copies of a random share of stable's requests are all the candidate has, and
//! while baking, stable's answers to copies of a random share of the candidate's requests
//! are all stable has. A copy and its primary are the same request, so their outcomes can go
//! together; the test treats them as independent draws. While baking the candidate holds the
//! larger share (`q ≥ ½` for a mirrored share up to 100%), where a pair in which both answers
//! are bad lowers every ℓ_θ: such pairs weigh against a regression, never for one.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::config::RollbackConfig;
use crate::split::FULL_BP;
use crate::stats::Totals;
use crate::stats::window::Latency;

/// The alternatives of the mixture: candidate-to-stable rate ratios.
pub const THETAS: [f64; 8] = [1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0];
const MIN_BAD_EVENTS: u64 = 3;

/// Log-likelihood ratios of one e-process, one per alternative θ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Mixture {
    /// ℓ_θ for θ in [`THETAS`].
    pub ell: [f64; 8],
}

impl Mixture {
    /// Adds a tick of a two-sample comparison: `x_c` of `n_c` candidate and `x_s` of `n_s`
    /// stable requests were bad.
    pub fn two_sample(&mut self, n_c: u64, n_s: u64, x_c: u64, x_s: u64) {
        if n_c == 0 || n_s == 0 || x_c + x_s == 0 {
            return;
        }
        let q = n_c as f64 / (n_c + n_s) as f64;
        for (l, theta) in self.ell.iter_mut().zip(THETAS) {
            let rho = theta * q / (theta * q + 1.0 - q);
            *l += x_c as f64 * (rho / q).ln() + x_s as f64 * ((1.0 - rho) / (1.0 - q)).ln();
        }
    }

    /// Adds a tick of a one-sample test against a limit rate `p0`: `x` of `n` were bad.
    pub fn one_sample(&mut self, p0: f64, n: u64, x: u64) {
        if n == 0 {
            return;
        }
        let p0 = p0.clamp(1e-6, 1.0 - 1e-6);
        for (l, theta) in self.ell.iter_mut().zip(THETAS) {
            let p1 = theta * p0 / (theta * p0 + 1.0 - p0);
            *l += x as f64 * (p1 / p0).ln() + (n - x) as f64 * ((1.0 - p1) / (1.0 - p0)).ln();
        }
    }

    /// `ln E`, the log of the mixture's evidence.
    pub fn ln_evidence(&self) -> f64 {
        log_mean_exp(&self.ell)
    }
}

fn log_mean_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + (xs.iter().map(|x| (x - max).exp()).sum::<f64>() / xs.len() as f64).ln()
}

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

/// A rule that tripped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
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
    Failing(Failure),
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

/// Slices of the mismatch rule's window.
const PAIR_SLICES: usize = 10;

/// Mirrored pairs over about the rule's window: per-slice sums of tick increments, a slice
/// being a tenth of the window in ticks.
#[derive(Debug, Clone, Default)]
struct PairWindow {
    ticks_per_slice: u32,
    ticks_in_last: u32,
    slices: VecDeque<(u64, u64)>,
}

impl PairWindow {
    fn new(cfg: &RollbackConfig) -> PairWindow {
        let ticks = cfg.window.as_nanos() / cfg.tick.as_nanos().max(1);
        let per_slice = (ticks / PAIR_SLICES as u128).clamp(1, u128::from(u32::MAX)) as u32;
        PairWindow { ticks_per_slice: per_slice, ticks_in_last: 0, slices: VecDeque::new() }
    }

    fn push(&mut self, compared: u64, mismatched: u64) {
        if self.slices.is_empty() || self.ticks_in_last >= self.ticks_per_slice {
            self.slices.push_back((0, 0));
            self.ticks_in_last = 0;
            if self.slices.len() > PAIR_SLICES {
                self.slices.pop_front();
            }
        }
        let last = self.slices.back_mut().expect("a slice was just ensured");
        last.0 += compared;
        last.1 += mismatched;
        self.ticks_in_last += 1;
    }

    /// (compared, mismatched) in the window.
    fn sums(&self) -> (u64, u64) {
        self.slices.iter().fold((0, 0), |(n, x), (a, b)| (n + a, x + b))
    }
}

/// Stable requests a comparative batch needs before it is weighed.
pub const MIN_BATCH_STABLE: u64 = 20;

/// Tick increments not yet weighed by the comparative e-processes.
#[derive(Debug, Clone, Copy, Default)]
struct Batch {
    weight_bp: u32,
    stable_mirrored: bool,
    n_c: u64,
    n_s: u64,
    x_c: u64,
    x_s: u64,
    slow_c: [u64; 3],
    slow_s: [u64; 3],
    over_c: u64,
    over_s: u64,
}

/// The judge of one rollout.
#[derive(Debug, Clone)]
pub struct Judge {
    cfg: RollbackConfig,
    state: JudgeState,
    batch: Batch,
    taus: Option<[u64; 3]>,
    ln_threshold: f64,
    figures: JudgeFigures,
    mismatch_limit: Option<f64>,
    pairs: PairWindow,
}

const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

impl Judge {
    /// A judge with fresh evidence.
    pub fn new(cfg: &RollbackConfig) -> Judge {
        Judge::restore(cfg, JudgeState::default())
    }

    /// A judge continuing from recorded evidence.
    pub fn restore(cfg: &RollbackConfig, state: JudgeState) -> Judge {
        let mut j = Judge {
            cfg: cfg.clone(),
            state,
            batch: Batch::default(),
            taus: None,
            ln_threshold: 0.0,
            figures: JudgeFigures::default(),
            mismatch_limit: None,
            pairs: PairWindow::new(cfg),
        };
        j.ln_threshold = j.threshold();
        j
    }

    /// Arms the `mirror_mismatch` rule with `mirror.max_mismatch_rate` (it takes its share of
    /// the budget).
    pub fn with_mirror_limit(mut self, max_mismatch_rate: Option<f64>) -> Judge {
        self.mismatch_limit = max_mismatch_rate;
        self.ln_threshold = self.threshold();
        self
    }

    /// `ln(k/α)` for the `k` armed rules.
    fn threshold(&self) -> f64 {
        let c = &self.cfg;
        let armed = [
            c.max_error_rate_increase.is_some(),
            c.max_p99_ratio.is_some(),
            c.max_error_rate.is_some(),
            c.max_p99.is_some(),
            self.mismatch_limit.is_some(),
        ]
        .iter()
        .filter(|a| **a)
        .count()
        .max(1);
        (armed as f64 / (1.0 - c.confidence)).ln()
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
        let (n_c, x_c) = (o.candidate_tick.requests(), o.candidate_tick.faults);
        let (cl, sl) = (Latency(&o.candidate_tick.latency), Latency(&o.stable_tick.latency));
        if (o.weight_bp, o.stable_mirrored) != (self.batch.weight_bp, self.batch.stable_mirrored) {
            // A batch never spans two weights (its share would mix two splits), nor a change
            // of what stable's side is.
            self.close_batch(true);
            (self.batch.weight_bp, self.batch.stable_mirrored) = (o.weight_bp, o.stable_mirrored);
        }
        let b = &mut self.batch;
        b.n_c += n_c;
        b.n_s += o.stable_tick.requests();
        b.x_c += x_c;
        b.x_s += o.stable_tick.faults;
        if let Some(taus) = self.taus {
            for (i, tau) in taus.into_iter().enumerate() {
                b.slow_c[i] += cl.count_above(tau);
                b.slow_s[i] += sl.count_above(tau);
            }
        }
        if let Some(p0) = self.cfg.max_error_rate {
            self.state.error_guard.one_sample(p0, n_c, x_c);
        }
        if let Some(limit) = self.cfg.max_p99 {
            let us = limit.as_micros() as u64;
            let slow = cl.count_above(us);
            b.over_c += slow;
            b.over_s += sl.count_above(us);
            self.state.p99_guard.one_sample(0.01, n_c, slow);
        }
        if let Some(base) = self.state.baseline.as_ref().filter(|_| o.weight_bp >= FULL_BP && !o.stable_mirrored) {
            // Baking with no concurrent stable answers: the comparative e-processes go on
            // against stable's figures from before the switch. Counting whole buckets above τ,
            // a candidate like stable exceeds τ_q at most a share 1 − q of the time.
            self.state.errors.one_sample(base.error_rate(), n_c, x_c);
            for ((m, tau), q) in self.state.latency.iter_mut().zip(base.quantiles_us).zip(QUANTILES) {
                m.one_sample(1.0 - q, n_c, cl.count_above(tau));
            }
        }
        if let Some(p0) = self.mismatch_limit {
            self.state.mismatch.one_sample(p0, o.mirror_compared, o.mirror_mismatched);
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

    /// Comparative updates wait until a batch holds candidate traffic and at least
    /// [`MIN_BATCH_STABLE`] stable requests: at low rates a 100 ms tick often holds one
    /// request, and a tick with no stable request (or a share estimated from two requests)
    /// carries little or no evidence. Batch boundaries depend only on request counts, never on
    /// outcomes, and a batch never spans a weight change, so the e-process stays valid.
    fn close_batch(&mut self, force: bool) {
        let b = self.batch;
        if b.n_c == 0 || b.n_s < if force { 1 } else { MIN_BATCH_STABLE } {
            if force {
                self.batch = Batch { weight_bp: b.weight_bp, stable_mirrored: b.stable_mirrored, ..Batch::default() };
            }
            return;
        }
        self.state.errors.two_sample(b.n_c, b.n_s, b.x_c, b.x_s);
        for (i, m) in self.state.latency.iter_mut().enumerate() {
            m.two_sample(b.n_c, b.n_s, b.slow_c[i], b.slow_s[i]);
        }
        self.state.p99_compare.two_sample(b.n_c, b.n_s, b.over_c, b.over_s);
        self.batch = Batch { weight_bp: b.weight_bp, stable_mirrored: b.stable_mirrored, ..Batch::default() };
    }

    fn decide(&mut self, o: &Observation<'_>) -> Verdict {
        let thr = self.ln_threshold;
        let (cw, sw) = (o.candidate_window, o.stable_window);
        let (cn, sn) = (cw.requests(), sw.requests());
        let rate = |t: &Totals| if t.requests() == 0 { 0.0 } else { t.faults as f64 / t.requests() as f64 };
        let (rc, rs) = (rate(cw), rate(sw));
        // At 100% with no concurrent stable answers there is nothing to compare with.
        let alone = o.weight_bp >= FULL_BP && !o.stable_mirrored;
        // Baking without them: the comparative rules read stable's figures from before the
        // switch.
        let baseline = self.state.baseline.clone().filter(|_| alone);
        let mut rules = Vec::with_capacity(5);
        let figure = |rule, e: f64, candidate, stable| RuleFigures {
            rule,
            state: RuleState::Quiet,
            ln_evidence: e,
            ln_threshold: thr,
            candidate,
            stable,
            candidate_requests: cn,
            stable_requests: sn,
            note: None,
        };

        // At full weight there is no stable traffic to compare with: the comparative rules'
        // evidence is frozen and their gates would read an empty stable window.
        let not_applicable = |mut f: RuleFigures| {
            f.note = Some("no stable traffic to compare with at 100%".into());
            f
        };
        if self.cfg.max_error_rate_increase.is_some() && alone && baseline.is_none() {
            rules.push(not_applicable(figure(RuleKind::ErrorRate, self.state.errors.ln_evidence(), rc, rs)));
        } else if let Some(min_increase) = self.cfg.max_error_rate_increase {
            let (rs, sn) = baseline.as_ref().map_or((rs, sn), |b| (b.error_rate(), b.requests));
            let mut f = figure(RuleKind::ErrorRate, self.state.errors.ln_evidence(), rc, rs);
            f.stable_requests = sn;
            let events = (cw.faults >= MIN_BAD_EVENTS)
                .then_some(())
                .ok_or(format!("{} candidate errors in the window (need {MIN_BAD_EVENTS})", cw.faults));
            let effect = if rs > 0.0 && rc / rs < self.cfg.min_effect_ratio {
                Err(format!("error-rate ratio {:.2} is below min_effect_ratio {}", rc / rs, self.cfg.min_effect_ratio))
            } else if rc - rs < min_increase {
                Err(format!("error-rate increase {:.4} is below max_error_rate_increase {min_increase}", rc - rs))
            } else {
                Ok(())
            };
            classify(&mut f, events, effect);
            rules.push(f);
        }

        let latency_evidence = log_mean_exp(&self.state.latency.map(|m| m.ln_evidence()));
        if let (Some(min_ratio), true, None) = (self.cfg.max_p99_ratio, alone, &baseline) {
            rules.push(not_applicable(figure(RuleKind::Latency, latency_evidence, 0.0, min_ratio)));
        } else if let Some(min_ratio) = self.cfg.max_p99_ratio {
            let e = latency_evidence;
            let (cl, sl) = (Latency(&cw.latency), Latency(&sw.latency));
            // Stable's quantiles now, or frozen at the switch while baking.
            let stable_q = match &baseline {
                Some(b) => b.quantiles_us.map(Some),
                None => QUANTILES.map(|q| sl.quantile_us(q)),
            };
            // Per quantile: how many times slower, and by how much. A 2× ratio of 10 µs is
            // scheduling noise, not a regression: both must clear their bar.
            let min_delta = self.cfg.min_latency_delta.as_micros() as u64;
            let per_q: Vec<(f64, bool)> = QUANTILES
                .iter()
                .zip(stable_q)
                .filter_map(|(&q, s)| {
                    let (c, s) = (cl.quantile_us(q)?, s?);
                    Some((c as f64 / s.max(1) as f64, c.saturating_sub(s) >= min_delta))
                })
                .collect();
            let ratio = per_q.iter().map(|(r, _)| *r).fold(0.0, f64::max);
            let worth_it = per_q.iter().any(|(r, big)| *r >= min_ratio && *big);
            let mut f = figure(RuleKind::Latency, e, ratio, min_ratio);
            if let Some(b) = &baseline {
                f.stable_requests = b.requests;
            }
            let slow = stable_q[2].map_or(0, |p99| cl.count_above(p99));
            let events = (slow >= MIN_BAD_EVENTS)
                .then_some(())
                .ok_or(format!("{slow} candidate requests slower than stable's p99 (need {MIN_BAD_EVENTS})"));
            let effect = if worth_it {
                Ok(())
            } else if ratio >= min_ratio {
                Err(format!(
                    "latency ratio {ratio:.2} is only a few µs: below min_latency_delta {:?}",
                    self.cfg.min_latency_delta
                ))
            } else {
                Err(format!("latency ratio {ratio:.2} is below max_p99_ratio {min_ratio}"))
            };
            classify(&mut f, events, effect);
            rules.push(f);
        }

        let error_compared = alone || self.state.errors.ln_evidence() >= thr;
        if let Some(limit) = self.cfg.max_error_rate {
            let mut f = figure(RuleKind::MaxErrorRate, self.state.error_guard.ln_evidence(), rc, limit);
            let events = (cw.faults >= MIN_BAD_EVENTS)
                .then_some(())
                .ok_or(format!("{} candidate errors in the window (need {MIN_BAD_EVENTS})", cw.faults));
            let effect = if rc < limit {
                Err(format!("window error rate {rc:.4} is within max_error_rate"))
            } else if !error_compared {
                Err("stable fails the same way: the comparative error test does not confirm".to_string())
            } else {
                Ok(())
            };
            classify(&mut f, events, effect);
            rules.push(f);
        }

        if let Some(limit) = self.cfg.max_p99 {
            let us = limit.as_micros() as u64;
            let c99 = Latency(&cw.latency).quantile_us(0.99).unwrap_or(0);
            let mut f =
                figure(RuleKind::MaxP99, self.state.p99_guard.ln_evidence(), c99 as f64 / 1000.0, us as f64 / 1000.0);
            let slow = Latency(&cw.latency).count_above(us);
            let events = (slow >= MIN_BAD_EVENTS)
                .then_some(())
                .ok_or(format!("{slow} candidate requests slower than max_p99 (need {MIN_BAD_EVENTS})"));
            let effect = if c99 < us {
                Err("window p99 is within max_p99".to_string())
            } else if !(alone || self.state.p99_compare.ln_evidence() >= thr) {
                Err("stable is as slow: the comparative test does not confirm".to_string())
            } else {
                Ok(())
            };
            classify(&mut f, events, effect);
            rules.push(f);
        }

        if let Some(limit) = self.mismatch_limit {
            let (n, x) = self.pairs.sums();
            let rate = if n == 0 { 0.0 } else { x as f64 / n as f64 };
            let mut f = figure(RuleKind::MirrorMismatch, self.state.mismatch.ln_evidence(), rate, limit);
            (f.candidate_requests, f.stable_requests) = (n, n);
            let events = (x >= MIN_BAD_EVENTS)
                .then_some(())
                .ok_or(format!("{x} mismatched mirrored answers in the window (need {MIN_BAD_EVENTS})"));
            let effect = if rate > limit {
                Ok(())
            } else {
                Err(format!("window mismatch rate {rate:.4} is within max_mismatch_rate"))
            };
            classify(&mut f, events, effect);
            rules.push(f);
        }

        let verdict = if let Some(f) = rules.iter().find(|r| r.state == RuleState::Fired) {
            Verdict::Failing(Failure { rule: f.rule, ln_evidence: f.ln_evidence, ln_threshold: thr })
        } else if rules.iter().any(|r| r.state == RuleState::Watching) {
            Verdict::Inconclusive
        } else {
            Verdict::Healthy
        };
        self.figures = JudgeFigures { verdict: verdict.label().to_string(), alpha: 1.0 - self.cfg.confidence, rules };
        verdict
    }
}

/// Sets a rule's state from its evidence and gates. Too few events holds (more data will
/// come); too small an effect lets the rollout go on.
fn classify(f: &mut RuleFigures, events: Result<(), String>, effect: Result<(), String>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::buckets;
    use std::collections::VecDeque;
    use std::time::Duration;

    fn cfg() -> RollbackConfig {
        RollbackConfig {
            window: Duration::from_secs(30),
            max_error_rate: None,
            max_error_rate_increase: Some(0.01),
            max_p99: None,
            max_p99_ratio: None,
            confidence: 0.99,
            min_effect_ratio: 1.2,
            min_latency_delta: Duration::from_millis(1),
            tick: Duration::from_millis(100),
        }
    }

    #[test]
    fn microsecond_latency_differences_never_roll_back() {
        let mut c = cfg();
        c.max_p99_ratio = Some(1.5);
        c.max_error_rate_increase = None;
        let mut j = Judge::new(&c);
        // 20 µs against 10 µs: twice as slow, consistently, and still nothing worth acting on.
        let mut s = Totals::default();
        s.classes[1] = 100;
        s.latency[buckets::index(10)] = 100;
        let mut k = Totals::default();
        k.classes[1] = 10;
        k.latency[buckets::index(20)] = 10;
        let mut last = Verdict::Healthy;
        for _ in 0..50 {
            last = j.evaluate(&obs(&s, &k, &s, &k));
        }
        assert!(j.figures().rules[0].ln_evidence > j.ln_threshold(), "the evidence is there");
        assert_eq!(j.figures().rules[0].state, RuleState::Suppressed);
        assert_eq!(last, Verdict::Healthy);
    }

    fn totals(n: u64, faults: u64, latency_ms: u64) -> Totals {
        let mut t = Totals::default();
        t.classes[1] = n;
        t.faults = faults;
        t.latency[buckets::index(latency_ms * 1000)] = n;
        t
    }

    fn obs<'a>(s: &'a Totals, c: &'a Totals, sw: &'a Totals, cw: &'a Totals) -> Observation<'a> {
        Observation {
            stable_tick: s,
            candidate_tick: c,
            stable_window: sw,
            candidate_window: cw,
            weight_bp: 100,
            mirror_compared: 0,
            mirror_mismatched: 0,
            stable_mirrored: false,
        }
    }

    #[test]
    fn mixture_is_zero_without_bad_events_and_grows_with_candidate_only_errors() {
        let mut m = Mixture::default();
        m.two_sample(10, 990, 0, 0);
        assert_eq!(m.ln_evidence(), 0.0);
        m.two_sample(1, 99, 1, 0);
        assert!(m.ln_evidence() > 2.0, "{}", m.ln_evidence());
        let mut shared = Mixture::default();
        // Errors in exact proportion to traffic are evidence for nothing.
        shared.two_sample(10, 90, 1, 9);
        assert!(shared.ln_evidence() < 0.0);
    }

    #[test]
    fn a_fully_failing_candidate_is_caught_within_five_requests() {
        let mut j = Judge::new(&cfg());
        let (mut cw, mut sw) = (Totals::default(), Totals::default());
        for i in 1..=5u64 {
            // One candidate request per tick, failing; 99 stable requests with one error.
            let (s, c) = (totals(99, 1, 5), totals(1, 1, 5));
            sw = add(&sw, &s);
            cw = add(&cw, &c);
            if let Verdict::Failing(f) = j.evaluate(&obs(&s, &c, &sw, &cw)) {
                assert_eq!(f.rule, RuleKind::ErrorRate);
                assert!(i >= 3, "the 3-error gate holds until the third error");
                return;
            }
        }
        panic!("not caught in 5 candidate requests: {:?}", j.figures());
    }

    #[test]
    fn a_shared_outage_is_no_evidence() {
        let mut c = cfg();
        c.max_error_rate = Some(0.05);
        let mut j = Judge::new(&c);
        let (s, k) = (totals(900, 270, 5), totals(100, 30, 5));
        for _ in 0..200 {
            assert_ne!(j.evaluate(&obs(&s, &k, &s, &k)).label(), "failing");
        }
        assert!(j.state().errors.ln_evidence() < 0.0);
        let guard = j.figures().rules.iter().find(|r| r.rule == RuleKind::MaxErrorRate).expect("guard armed");
        assert!(guard.ln_evidence > guard.ln_threshold, "the absolute test alone would fire");
        assert_eq!(guard.state, RuleState::Suppressed);
    }

    /// A tick at 100% weight: candidate traffic `k`, no stable traffic.
    fn at_full_weight<'a>(empty: &'a Totals, k: &'a Totals) -> Observation<'a> {
        Observation {
            stable_tick: empty,
            candidate_tick: k,
            stable_window: empty,
            candidate_window: k,
            weight_bp: FULL_BP,
            mirror_compared: 0,
            mirror_mismatched: 0,
            stable_mirrored: false,
        }
    }

    #[test]
    fn comparative_rules_rest_at_full_weight() {
        let mut j = Judge::new(&cfg());
        j.state.errors.ell = [20.0; 8];
        let empty = Totals::default();
        let k = totals(100, 10, 5);
        let o = at_full_weight(&empty, &k);
        assert_eq!(j.evaluate(&o), Verdict::Healthy, "frozen evidence neither fires nor holds at 100%");
        assert_eq!(j.figures().rules[0].state, RuleState::Quiet);
    }

    #[test]
    fn guards_run_alone_at_full_weight() {
        let mut c = cfg();
        c.max_error_rate = Some(0.05);
        c.max_error_rate_increase = None;
        let mut j = Judge::new(&c);
        let empty = Totals::default();
        let k = totals(100, 30, 5);
        let o = at_full_weight(&empty, &k);
        assert!(matches!(j.evaluate(&o), Verdict::Failing(Failure { rule: RuleKind::MaxErrorRate, .. })));
    }

    #[test]
    fn small_effects_are_suppressed_not_held() {
        let mut c = cfg();
        c.min_effect_ratio = 1.5;
        let mut j = Judge::new(&c);
        // Candidate 1.3x stable: real, detectable, but below what the operator cares about.
        let (s, k) = (totals(10_000, 1000, 5), totals(10_000, 1300, 5));
        let mut last = Verdict::Healthy;
        for _ in 0..500 {
            last = j.evaluate(&obs(&s, &k, &s, &k));
        }
        assert!(j.state().errors.ln_evidence() > j.ln_threshold());
        assert_eq!(last, Verdict::Healthy);
        assert_eq!(j.figures().rules[0].state, RuleState::Suppressed);
    }

    #[test]
    fn latency_rule_uses_the_previous_window_and_catches_a_slow_candidate() {
        let mut c = cfg();
        c.max_p99_ratio = Some(1.5);
        let mut j = Judge::new(&c);
        let (s, k) = (totals(100, 0, 10), totals(10, 0, 210));
        // First tick: no τ yet, no latency evidence.
        j.evaluate(&obs(&s, &k, &s, &k));
        assert_eq!(j.state().latency[0].ln_evidence(), 0.0);
        let mut verdict = Verdict::Healthy;
        for _ in 0..5 {
            verdict = j.evaluate(&obs(&s, &k, &s, &k));
        }
        assert!(matches!(verdict, Verdict::Failing(Failure { rule: RuleKind::Latency, .. })), "{:?}", j.figures());
    }

    #[test]
    fn low_traffic_ticks_are_batched_so_a_failing_candidate_is_still_caught() {
        // One request per tick, as at 10 requests per second: a candidate tick has no stable
        // request to compare with, so only batching across ticks can weigh it.
        let mut j = Judge::new(&cfg());
        let (mut cw, mut sw) = (Totals::default(), Totals::default());
        let (none, s1, c1) = (Totals::default(), totals(1, 0, 5), totals(1, 1, 5));
        for i in 0..400u64 {
            let candidate_tick = i % 20 == 0;
            let (s, c) = if candidate_tick { (&none, &c1) } else { (&s1, &none) };
            sw = add(&sw, s);
            cw = add(&cw, c);
            if let Verdict::Failing(_) = j.evaluate(&obs(s, c, &sw, &cw)) {
                assert!(cw.requests() <= 6, "caught after {} candidate requests", cw.requests());
                return;
            }
        }
        panic!("never caught: {:?}", j.figures());
    }

    #[test]
    fn budget_is_split_among_armed_rules() {
        let mut c = cfg();
        assert!((Judge::new(&c).ln_threshold() - 100f64.ln()).abs() < 1e-9);
        c.max_p99_ratio = Some(1.5);
        c.max_error_rate = Some(0.1);
        assert!((Judge::new(&c).ln_threshold() - 300f64.ln()).abs() < 1e-9);
        let j = Judge::new(&c).with_mirror_limit(Some(0.01));
        assert!((j.ln_threshold() - 400f64.ln()).abs() < 1e-9, "mirror_mismatch takes its share");
        assert!((Judge::new(&c).with_mirror_limit(None).ln_threshold() - 300f64.ln()).abs() < 1e-9);
    }

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Binomial, Distribution, LogNormal};

    /// `n` requests of a version failing at rate `p` with lognormal latency (median
    /// `median_ms`, σ = 0.5).
    fn draw(rng: &mut StdRng, n: u64, p: f64, median_ms: f64) -> Totals {
        let mut t = Totals::default();
        let faults = Binomial::new(n, p).expect("binomial").sample(rng);
        (t.classes[1], t.classes[4], t.faults) = (n - faults, faults, faults);
        let lat = LogNormal::new(median_ms.ln(), 0.5).expect("lognormal");
        for _ in 0..n {
            let ms: f64 = lat.sample(rng);
            t.latency[buckets::index((ms * 1000.0) as u64)] += 1;
        }
        t
    }

    fn bake_cfg() -> RollbackConfig {
        RollbackConfig { max_p99_ratio: Some(1.5), max_error_rate: Some(0.05), ..cfg() }
    }

    /// A judge baking against a baseline of 10,000 stable requests at 1% errors and a 20 ms
    /// median, fed `ticks` ticks of 50 candidate requests at `p` errors and `median_ms`;
    /// returns the first failing verdict and the tick it came in.
    fn bake(seed: u64, p: f64, median_ms: f64, ticks: usize) -> (Judge, Option<(usize, Failure)>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut j = Judge::new(&bake_cfg());
        let baseline = Baseline::of(&draw(&mut rng, 10_000, 0.01, 20.0)).expect("a baseline");
        j.set_baseline(Some(baseline));
        let empty = Totals::default();
        let mut window: std::collections::VecDeque<Totals> = Default::default();
        for i in 0..ticks {
            let tick = draw(&mut rng, 50, p, median_ms);
            window.push_back(tick.clone());
            if window.len() > 300 {
                window.pop_front();
            }
            let cw = window.iter().fold(Totals::default(), |a, t| add(&a, t));
            let o = Observation {
                stable_tick: &empty,
                candidate_tick: &tick,
                stable_window: &empty,
                candidate_window: &cw,
                weight_bp: FULL_BP,
                mirror_compared: 0,
                mirror_mismatched: 0,
                stable_mirrored: false,
            };
            if let Verdict::Failing(f) = j.evaluate(&o) {
                return (j, Some((i, f)));
            }
        }
        (j, None)
    }

    #[test]
    fn a_baking_candidate_like_the_baseline_stays_quiet() {
        // 100,000 candidate requests per seed, each seed with its own baseline estimate.
        for seed in 1..=5 {
            let (j, failed) = bake(seed, 0.01, 20.0, 2000);
            assert_eq!(failed, None, "seed {seed}: {:?}", j.figures());
            for rule in [RuleKind::ErrorRate, RuleKind::Latency] {
                let f = j.figures().rules.iter().find(|r| r.rule == rule).expect("armed");
                assert!(f.ln_evidence < f.ln_threshold / 2.0, "seed {seed}, {rule}: {f:?}");
                assert_eq!(f.state, RuleState::Quiet, "seed {seed}: {f:?}");
                assert_eq!(f.stable_requests, 10_000, "read against the baseline");
            }
            let err = j.figures().rules.iter().find(|r| r.rule == RuleKind::ErrorRate).expect("armed");
            assert!((err.stable - j.baseline().expect("kept").error_rate()).abs() < 1e-12);
        }
    }

    #[test]
    fn a_baking_candidate_clearly_worse_than_the_baseline_fires() {
        let (j, failed) = bake(11, 0.10, 20.0, 200);
        let (tick, f) = failed.unwrap_or_else(|| panic!("10% errors against 1% never fired: {:?}", j.figures()));
        assert_eq!(f.rule, RuleKind::ErrorRate, "{:?}", j.figures());
        assert!(tick < 10, "fired only at tick {tick}");
        let (j, failed) = bake(13, 0.01, 40.0, 200);
        let (tick, f) = failed.unwrap_or_else(|| panic!("2x slower never fired: {:?}", j.figures()));
        assert_eq!(f.rule, RuleKind::Latency, "{:?}", j.figures());
        assert!(tick < 10, "fired only at tick {tick}");
    }

    /// A judge baking after a switch at which the environment changed: the baseline is stable
    /// before it (1% errors, 20 ms median), and from then on both versions fail more and answer
    /// slower. `ticks` ticks of 50 candidate requests at `candidate` (error rate, median ms) and
    /// 5 stable answers to mirrored copies (a 10% share) at `stable`; `None` for `stable` feeds
    /// no copies, so the judge holds the candidate to the baseline. The first failing tick.
    fn shifted_bake(
        seed: u64,
        candidate: (f64, f64),
        stable: Option<(f64, f64)>,
        ticks: usize,
    ) -> (Judge, Option<(usize, Failure)>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut j = Judge::new(&bake_cfg());
        j.set_baseline(Baseline::of(&draw(&mut rng, 10_000, 0.01, 20.0)));
        let (mut cwin, mut swin) = (VecDeque::new(), VecDeque::new());
        let (mut cw, mut sw) = (Totals::default(), Totals::default());
        for i in 0..ticks {
            let tick = draw(&mut rng, 50, candidate.0, candidate.1);
            let copies = stable.map_or_else(Totals::default, |(p, ms)| draw(&mut rng, 5, p, ms));
            for (w, sum, t) in [(&mut cwin, &mut cw, &tick), (&mut swin, &mut sw, &copies)] {
                // A 30 s window of 100 ms ticks, kept as a running sum.
                *sum = add(sum, t);
                w.push_back(t.clone());
                if w.len() > 300
                    && let Some(old) = w.pop_front()
                {
                    *sum = sub(sum, &old);
                }
            }
            let o = Observation {
                stable_tick: &copies,
                candidate_tick: &tick,
                stable_window: &sw,
                candidate_window: &cw,
                weight_bp: FULL_BP,
                mirror_compared: 0,
                mirror_mismatched: 0,
                stable_mirrored: sw.requests() > 0,
            };
            if let Verdict::Failing(f) = j.evaluate(&o) {
                return (j, Some((i, f)));
            }
        }
        (j, None)
    }

    #[test]
    fn a_bake_judged_against_stable_s_concurrent_answers_is_immune_to_a_shared_shift() {
        // After the switch both versions fail 3% and answer 1.6 times slower.
        let shifted = (0.03, 32.0);
        for seed in 1..=5 {
            let (j, failed) = shifted_bake(seed, shifted, None, 300);
            assert!(failed.is_some(), "seed {seed}: the frozen baseline blames the candidate: {:?}", j.figures());
            let (j, failed) = shifted_bake(seed, shifted, Some(shifted), 2000);
            assert_eq!(failed, None, "seed {seed}: {:?}", j.figures());
            for rule in [RuleKind::ErrorRate, RuleKind::Latency] {
                let f = j.figures().rules.iter().find(|r| r.rule == rule).expect("armed");
                assert_ne!(f.state, RuleState::Fired, "seed {seed}: {f:?}");
                assert!(f.stable_requests > 0 && f.stable_requests < 10_000, "the copies, not the baseline: {f:?}");
            }
        }
    }

    #[test]
    fn a_bake_against_stable_s_concurrent_answers_still_catches_a_worse_candidate() {
        // In the shifted environment the candidate fails 10% against stable's 3%...
        let (j, failed) = shifted_bake(21, (0.10, 32.0), Some((0.03, 32.0)), 600);
        let (_, f) = failed.unwrap_or_else(|| panic!("10% against 3% never fired: {:?}", j.figures()));
        assert_eq!(f.rule, RuleKind::ErrorRate, "{:?}", j.figures());
        // ... or answers twice as slowly.
        let (j, failed) = shifted_bake(23, (0.03, 64.0), Some((0.03, 32.0)), 600);
        let (_, f) = failed.unwrap_or_else(|| panic!("2x slower never fired: {:?}", j.figures()));
        assert_eq!(f.rule, RuleKind::Latency, "{:?}", j.figures());
    }

    #[test]
    fn a_small_regression_against_the_baseline_is_suppressed_by_the_gates() {
        // 1.5% against 1%: over the ratio gate but under the 0.01 increase gate.
        let (j, failed) = bake(17, 0.015, 20.0, 1500);
        assert_eq!(failed, None, "{:?}", j.figures());
        let err = j.figures().rules.iter().find(|r| r.rule == RuleKind::ErrorRate).expect("armed");
        assert_ne!(err.state, RuleState::Fired);
    }

    #[test]
    fn baseline_reads_a_short_or_clean_window_conservatively() {
        let b = Baseline { requests: 99, errors: 0, quantiles_us: [1, 2, 3] };
        assert!((b.error_rate() - 0.01).abs() < 1e-12, "no error in 99 counts as one in 100");
        let b = Baseline { requests: 1_000_000, errors: 0, quantiles_us: [1, 2, 3] };
        assert_eq!(b.error_rate(), MIN_BASELINE_ERROR_RATE);
        assert_eq!(Baseline::of(&Totals::default()), None, "no stable traffic, no baseline");
        let b = Baseline::of(&totals(200, 2, 10)).expect("baseline");
        assert_eq!((b.requests, b.errors), (200, 2));
        assert!(b.quantiles_us.iter().all(|&q| q > 9000 && q < 11_000), "{b:?}");
    }

    /// The exact bytes a state file and the journal hold for the judge: a change here breaks
    /// every recorded rollout.
    #[test]
    fn judge_state_and_breach_serialise_byte_for_byte_as_recorded() {
        let m = |v: f64| Mixture { ell: [v; 8] };
        let state = JudgeState {
            errors: m(1.0),
            latency: [m(2.0), m(3.0), m(4.0)],
            error_guard: m(5.0),
            p99_guard: m(6.0),
            p99_compare: m(7.0),
            mismatch: m(-0.5),
            baseline: Some(Baseline { requests: 500, errors: 5, quantiles_us: [10_000, 20_000, 90_000] }),
        };
        let ell = |v: &str| format!("{{\"ell\":[{}]}}", [v; 8].join(","));
        let expected = format!(
            "{{\"errors\":{},\"latency\":[{},{},{}],\"error_guard\":{},\"p99_guard\":{},\"p99_compare\":{},\
             \"mismatch\":{},\"baseline\":{{\"requests\":500,\"errors\":5,\"quantiles_us\":[10000,20000,90000]}}}}",
            ell("1.0"),
            ell("2.0"),
            ell("3.0"),
            ell("4.0"),
            ell("5.0"),
            ell("6.0"),
            ell("7.0"),
            ell("-0.5"),
        );
        assert_eq!(serde_json::to_string(&state).expect("serialise"), expected);
        assert_eq!(serde_json::from_str::<JudgeState>(&expected).expect("load"), state);
        let fresh = serde_json::to_string(&JudgeState::default()).expect("serialise");
        assert!(!fresh.contains("baseline"), "no baseline, no key: {fresh}");
        let breach = Failure { rule: RuleKind::MaxP99, ln_evidence: 9.5, ln_threshold: 6.25 };
        let json = r#"{"rule":"max_p99","ln_evidence":9.5,"ln_threshold":6.25}"#;
        assert_eq!(serde_json::to_string(&breach).expect("serialise"), json);
        assert_eq!(serde_json::from_str::<Failure>(json).expect("load"), breach);
        let figures = JudgeFigures {
            verdict: "inconclusive".into(),
            alpha: 0.01,
            rules: vec![RuleFigures {
                rule: RuleKind::MirrorMismatch,
                state: RuleState::Watching,
                ln_evidence: 5.0,
                ln_threshold: 6.0,
                candidate: 0.25,
                stable: 0.01,
                candidate_requests: 8,
                stable_requests: 8,
                note: Some("why".into()),
            }],
        };
        assert_eq!(
            serde_json::to_string(&figures).expect("serialise"),
            r#"{"verdict":"inconclusive","alpha":0.01,"rules":[{"rule":"mirror_mismatch","state":"watching","ln_evidence":5.0,"ln_threshold":6.0,"candidate":0.25,"stable":0.01,"candidate_requests":8,"stable_requests":8,"note":"why"}]}"#
        );
    }

    #[test]
    fn judge_state_keeps_the_baseline_and_old_state_files_still_load() {
        let state = JudgeState {
            baseline: Some(Baseline { requests: 500, errors: 5, quantiles_us: [10_000, 20_000, 90_000] }),
            mismatch: Mixture { ell: [1.0; 8] },
            ..JudgeState::default()
        };
        let json = serde_json::to_value(&state).expect("serialise");
        assert_eq!(serde_json::from_value::<JudgeState>(json.clone()).expect("load"), state);
        let mut old = json;
        let map = old.as_object_mut().expect("object");
        map.remove("baseline");
        map.remove("mismatch");
        let loaded: JudgeState = serde_json::from_value(old).expect("a state file from before blue-green loads");
        assert_eq!((loaded.baseline, loaded.mismatch), (None, Mixture::default()));
    }

    /// A judge with only the mismatch rule armed, fed `ticks` ticks of `compared` pairs with
    /// `mismatched(i)` mismatches; the first failing tick.
    fn mirror_run(ticks: u64, compared: u64, mismatched: impl Fn(u64) -> u64) -> (Judge, Option<(u64, Failure)>) {
        let c = RollbackConfig { max_error_rate_increase: None, ..cfg() };
        let mut j = Judge::new(&c).with_mirror_limit(Some(0.01));
        let (s, k) = (totals(100, 0, 5), totals(10, 0, 5));
        for i in 0..ticks {
            let o = Observation { mirror_compared: compared, mirror_mismatched: mismatched(i), ..obs(&s, &k, &s, &k) };
            if let Verdict::Failing(f) = j.evaluate(&o) {
                return (j, Some((i, f)));
            }
        }
        (j, None)
    }

    #[test]
    fn the_mismatch_rule_fires_on_a_high_mismatch_rate_only() {
        // 20% of mirrored answers differ against a 1% limit.
        let (j, failed) = mirror_run(100, 20, |_| 4);
        let (tick, f) = failed.unwrap_or_else(|| panic!("never fired: {:?}", j.figures()));
        assert_eq!(f.rule, RuleKind::MirrorMismatch);
        assert!(tick < 5, "fired only at tick {tick}");
        let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
        assert!((rule.candidate - 0.2).abs() < 1e-9 && rule.stable == 0.01, "{rule:?}");
        // 0.5%: one mismatch in every 200 pairs, for 40,000 pairs.
        let (j, failed) = mirror_run(2000, 20, |i| u64::from(i % 10 == 0));
        assert_eq!(failed, None, "{:?}", j.figures());
        let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
        assert_eq!(rule.state, RuleState::Quiet, "{rule:?}");
        // Without the limit the rule is not armed at all.
        let mut plain = Judge::new(&cfg());
        let (s, k) = (totals(100, 0, 5), totals(10, 0, 5));
        plain.evaluate(&Observation { mirror_compared: 20, mirror_mismatched: 20, ..obs(&s, &k, &s, &k) });
        assert!(plain.figures().rules.iter().all(|r| r.rule != RuleKind::MirrorMismatch));
    }

    #[test]
    fn the_mismatch_rule_holds_with_fewer_than_three_mismatches() {
        // Two mismatches in two pairs: strong evidence, too few events to act on.
        let (j, failed) = mirror_run(1, 2, |_| 2);
        assert_eq!(failed, None);
        let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
        assert!(rule.ln_evidence > rule.ln_threshold, "{rule:?}");
        assert_eq!(rule.state, RuleState::Watching);
        assert_eq!(j.figures().verdict, "inconclusive");
    }

    fn sub(a: &Totals, b: &Totals) -> Totals {
        let mut t = a.clone();
        for i in 0..6 {
            t.classes[i] -= b.classes[i];
        }
        t.faults -= b.faults;
        for (x, y) in t.latency.iter_mut().zip(&b.latency) {
            *x -= y;
        }
        t
    }

    fn add(a: &Totals, b: &Totals) -> Totals {
        let mut t = a.clone();
        for i in 0..6 {
            t.classes[i] += b.classes[i];
        }
        t.faults += b.faults;
        for (x, y) in t.latency.iter_mut().zip(&b.latency) {
            *x += y;
        }
        t
    }
}
