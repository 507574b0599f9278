//! `error_rate`: the candidate fails more often than stable (armed by
//! `max_error_rate_increase`).

use super::{Rule, RuleSettings, RuleWindow, Tick, classify, enough_events, not_applicable};
use crate::rollout::judge::batch::Batch;
use crate::rollout::judge::{JudgeState, RuleFigures, RuleKind};

/// Bad event: an error the version is to blame for. Evidence: [`JudgeState::errors`].
pub(super) struct ErrorRate;

impl Rule for ErrorRate {
    fn kind(&self) -> RuleKind {
        RuleKind::ErrorRate
    }

    fn armed(&self, settings: &RuleSettings) -> bool {
        settings.rollback.max_error_rate_increase.is_some()
    }

    fn observe(&self, _settings: &RuleSettings, state: &mut JudgeState, tick: &Tick<'_>) {
        if let Some(base) = &tick.baseline {
            state.errors.one_sample(base.error_rate(), tick.n_c, tick.x_c);
        }
    }

    fn weigh(&self, state: &mut JudgeState, b: &Batch) {
        state.errors.two_sample(b.n_c, b.n_s, b.x_c, b.x_s);
    }

    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures> {
        let min_increase = settings.rollback.max_error_rate_increase?;
        let e = w.state.errors.ln_evidence();
        if w.nothing_to_compare() {
            return Some(not_applicable(w.figure(self.kind(), e, w.rc, w.rs)));
        }
        let rc = w.rc;
        let (rs, sn) = w.baseline.map_or((w.rs, w.sw.requests()), |b| (b.error_rate(), b.requests));
        let mut f = w.figure(self.kind(), e, rc, rs);
        f.stable_requests = sn;
        let events = enough_events(w.cw.faults, "candidate errors in the window");
        let min_ratio = settings.rollback.min_effect_ratio;
        let effect = if rs > 0.0 && rc / rs < min_ratio {
            Err(format!("error-rate ratio {:.2} is below min_effect_ratio {min_ratio}", rc / rs))
        } else if rc - rs < min_increase {
            Err(format!("error-rate increase {:.4} is below max_error_rate_increase {min_increase}", rc - rs))
        } else {
            Ok(())
        };
        Some(classify(f, events, effect))
    }
}
