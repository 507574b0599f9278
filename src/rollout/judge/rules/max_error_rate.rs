//! `max_error_rate`: an absolute guard on the candidate's error rate.

use super::{Rule, RuleSettings, RuleWindow, Tick, classify, enough_events};
use crate::rollout::judge::{JudgeState, RuleFigures, RuleKind};

/// A one-sample mixture of the candidate against the limit ([`JudgeState::error_guard`]);
/// it fires only when `error_rate`'s comparative evidence confirms, or at full weight alone.
pub(super) struct MaxErrorRate;

impl Rule for MaxErrorRate {
    fn kind(&self) -> RuleKind {
        RuleKind::MaxErrorRate
    }

    fn armed(&self, settings: &RuleSettings) -> bool {
        settings.rollback.max_error_rate.is_some()
    }

    fn observe(&self, settings: &RuleSettings, state: &mut JudgeState, tick: &Tick<'_>) {
        if let Some(p0) = settings.rollback.max_error_rate {
            state.error_guard.one_sample(p0, tick.n_c, tick.x_c);
        }
    }

    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures> {
        let limit = settings.rollback.max_error_rate?;
        let error_compared = w.alone || w.state.errors.ln_evidence() >= w.ln_threshold;
        let f = w.figure(self.kind(), w.state.error_guard.ln_evidence(), w.rc, limit);
        let events = enough_events(w.cw.faults, "candidate errors in the window");
        let effect = if w.rc < limit {
            Err(format!("window error rate {:.4} is within max_error_rate", w.rc))
        } else if !error_compared {
            Err("stable fails the same way: the comparative error test does not confirm".to_string())
        } else {
            Ok(())
        };
        Some(classify(f, events, effect))
    }
}
