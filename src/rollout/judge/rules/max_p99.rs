//! `max_p99`: an absolute guard on the candidate's p99.

use super::{Rule, RuleSettings, RuleWindow, Tick, classify, enough_events};
use crate::rollout::judge::batch::Batch;
use crate::rollout::judge::{JudgeState, RuleFigures, RuleKind};
use crate::stats::window::Latency;

/// "p99 ≤ T" read as "at most 1% of requests slower than T": a one-sample mixture of the
/// candidate against that ([`JudgeState::p99_guard`]), confirmed by a comparative companion
/// on the same events ([`JudgeState::p99_compare`]), or alone at full weight.
pub(super) struct MaxP99;

impl Rule for MaxP99 {
    fn kind(&self) -> RuleKind {
        RuleKind::MaxP99
    }

    fn armed(&self, settings: &RuleSettings) -> bool {
        settings.rollback.max_p99.is_some()
    }

    fn observe(&self, settings: &RuleSettings, state: &mut JudgeState, tick: &Tick<'_>) {
        if let Some(limit) = settings.rollback.max_p99 {
            state.p99_guard.one_sample(0.01, tick.n_c, tick.latency.count_above(limit.as_micros() as u64));
        }
    }

    fn weigh(&self, state: &mut JudgeState, b: &Batch) {
        state.p99_compare.two_sample(b.n_c, b.n_s, b.over_c, b.over_s);
    }

    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures> {
        let us = settings.rollback.max_p99?.as_micros() as u64;
        let cl = Latency(&w.cw.latency);
        let c99 = cl.quantile_us(0.99).unwrap_or(0);
        let f = w.figure(self.kind(), w.state.p99_guard.ln_evidence(), c99 as f64 / 1000.0, us as f64 / 1000.0);
        let events = enough_events(cl.count_above(us), "candidate requests slower than max_p99");
        let effect = if c99 < us {
            Err("window p99 is within max_p99".to_string())
        } else if !(w.alone || w.state.p99_compare.ln_evidence() >= w.ln_threshold) {
            Err("stable is as slow: the comparative test does not confirm".to_string())
        } else {
            Ok(())
        };
        Some(classify(f, events, effect))
    }
}
