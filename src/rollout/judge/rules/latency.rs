//! `latency`: the candidate's latency distribution is worse than stable's (armed by
//! `max_p99_ratio`).

use super::{Rule, RuleSettings, RuleWindow, Tick, classify, enough_events, not_applicable};
use crate::rollout::judge::batch::Batch;
use crate::rollout::judge::mixture::log_mean_exp;
use crate::rollout::judge::{JudgeState, QUANTILES, RuleFigures, RuleKind};
use crate::stats::window::Latency;

/// Bad event: slower than τ, for τ = stable's p50, p90 and p99 from the previous tick's
/// window; the three e-processes ([`JudgeState::latency`]) are averaged.
pub(super) struct LatencyRule;

impl Rule for LatencyRule {
    fn kind(&self) -> RuleKind {
        RuleKind::Latency
    }

    fn armed(&self, settings: &RuleSettings) -> bool {
        settings.rollback.max_p99_ratio.is_some()
    }

    fn observe(&self, _settings: &RuleSettings, state: &mut JudgeState, tick: &Tick<'_>) {
        if let Some(base) = &tick.baseline {
            // Counting whole buckets above τ, a candidate like stable exceeds τ_q at most a
            // share 1 − q of the time.
            for ((m, tau), q) in state.latency.iter_mut().zip(base.quantiles_us).zip(QUANTILES) {
                m.one_sample(1.0 - q, tick.n_c, tick.latency.count_above(tau));
            }
        }
    }

    fn weigh(&self, state: &mut JudgeState, b: &Batch) {
        for (i, m) in state.latency.iter_mut().enumerate() {
            m.two_sample(b.n_c, b.n_s, b.slow_c[i], b.slow_s[i]);
        }
    }

    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures> {
        let min_ratio = settings.rollback.max_p99_ratio?;
        let e = log_mean_exp(&w.state.latency.map(|m| m.ln_evidence()));
        if w.nothing_to_compare() {
            return Some(not_applicable(w.figure(self.kind(), e, 0.0, min_ratio)));
        }
        let (cl, sl) = (Latency(&w.cw.latency), Latency(&w.sw.latency));
        // Stable's quantiles now, or frozen at the switch while baking.
        let stable_q = match w.baseline {
            Some(b) => b.quantiles_us.map(Some),
            None => QUANTILES.map(|q| sl.quantile_us(q)),
        };
        // Per quantile: how many times slower, and by how much. A 2× ratio of 10 µs is
        // scheduling noise, not a regression: both must clear their bar.
        let min_delta = settings.rollback.min_latency_delta.as_micros() as u64;
        let mut per_q = [None; 3];
        for ((slot, q), s) in per_q.iter_mut().zip(QUANTILES).zip(stable_q) {
            *slot =
                cl.quantile_us(q).zip(s).map(|(c, s)| (c as f64 / s.max(1) as f64, c.saturating_sub(s) >= min_delta));
        }
        let ratio = per_q.iter().flatten().map(|(r, _)| *r).fold(0.0, f64::max);
        let worth_it = per_q.iter().flatten().any(|(r, big)| *r >= min_ratio && *big);
        let mut f = w.figure(self.kind(), e, ratio, min_ratio);
        if let Some(b) = w.baseline {
            f.stable_requests = b.requests;
        }
        let slow = stable_q[2].map_or(0, |p99| cl.count_above(p99));
        let events = enough_events(slow, "candidate requests slower than stable's p99");
        let effect = if worth_it {
            Ok(())
        } else if ratio >= min_ratio {
            Err(format!(
                "latency ratio {ratio:.2} is only a few µs: below min_latency_delta {:?}",
                settings.rollback.min_latency_delta
            ))
        } else {
            Err(format!("latency ratio {ratio:.2} is below max_p99_ratio {min_ratio}"))
        };
        Some(classify(f, events, effect))
    }
}
