//! `mirror_mismatch`: mirrored answers differ from stable's too often (armed by
//! `mirror.max_mismatch_rate`).

use super::{Rule, RuleSettings, RuleWindow, Tick, classify, enough_events};
use crate::rollout::judge::{JudgeState, RuleFigures, RuleKind};

/// A one-sample mixture of the differing mirrored answers against the limit
/// ([`JudgeState::mismatch`]); it fires only with a window mismatch rate above the limit.
pub(super) struct MirrorMismatch;

impl Rule for MirrorMismatch {
    fn kind(&self) -> RuleKind {
        RuleKind::MirrorMismatch
    }

    fn armed(&self, settings: &RuleSettings) -> bool {
        settings.max_mismatch_rate.is_some()
    }

    fn observe(&self, settings: &RuleSettings, state: &mut JudgeState, tick: &Tick<'_>) {
        if let Some(p0) = settings.max_mismatch_rate {
            state.mismatch.one_sample(p0, tick.mirror_compared, tick.mirror_mismatched);
        }
    }

    fn judge(&self, settings: &RuleSettings, w: &RuleWindow<'_>) -> Option<RuleFigures> {
        let limit = settings.max_mismatch_rate?;
        let (n, x) = w.pairs.sums();
        let rate = if n == 0 { 0.0 } else { x as f64 / n as f64 };
        let mut f = w.figure(self.kind(), w.state.mismatch.ln_evidence(), rate, limit);
        (f.candidate_requests, f.stable_requests) = (n, n);
        let events = enough_events(x, "mismatched mirrored answers in the window");
        let effect = if rate > limit {
            Ok(())
        } else {
            Err(format!("window mismatch rate {rate:.4} is within max_mismatch_rate"))
        };
        Some(classify(f, events, effect))
    }
}
