//! What the judge accumulates between weighings: comparative tick increments (a [`Batch`])
//! and mirrored pairs over the mismatch rule's window (a [`PairWindow`]).

use std::collections::VecDeque;

use super::Observation;
use crate::config::RollbackConfig;
use crate::stats::window::Latency;

/// Stable requests a comparative batch needs before it is weighed.
pub const MIN_BATCH_STABLE: u64 = 20;

/// Tick increments not yet weighed by the comparative e-processes.
///
/// Comparative updates wait until a batch holds candidate traffic and at least
/// [`MIN_BATCH_STABLE`] stable requests: at low rates a 100 ms tick often holds one request,
/// and a tick with no stable request (or a share estimated from two requests) carries little
/// or no evidence. Batch boundaries depend only on request counts, never on outcomes, and a
/// batch never spans a weight change, so the e-process stays valid.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Batch {
    weight_bp: u32,
    stable_mirrored: bool,
    /// Candidate requests.
    pub(super) n_c: u64,
    /// Stable requests.
    pub(super) n_s: u64,
    /// Candidate errors.
    pub(super) x_c: u64,
    /// Stable errors.
    pub(super) x_s: u64,
    /// Candidate requests slower than each τ.
    pub(super) slow_c: [u64; 3],
    /// Stable requests slower than each τ.
    pub(super) slow_s: [u64; 3],
    /// Candidate requests slower than `max_p99`.
    pub(super) over_c: u64,
    /// Stable requests slower than `max_p99`.
    pub(super) over_s: u64,
}

impl Batch {
    /// True when `o` continues this batch: a batch never spans two weights (its share would
    /// mix two splits), nor a change of what stable's side is.
    pub(super) fn continues(&self, o: &Observation<'_>) -> bool {
        (o.weight_bp, o.stable_mirrored) == (self.weight_bp, self.stable_mirrored)
    }

    /// Adds one tick: its counts, its requests slower than each τ (once there are τ) and than
    /// `max_p99` (when it is set, in µs).
    pub(super) fn add(&mut self, o: &Observation<'_>, taus: Option<[u64; 3]>, max_p99_us: Option<u64>) {
        let (cl, sl) = (Latency(&o.candidate_tick.latency), Latency(&o.stable_tick.latency));
        self.n_c += o.candidate_tick.requests();
        self.n_s += o.stable_tick.requests();
        self.x_c += o.candidate_tick.faults;
        self.x_s += o.stable_tick.faults;
        if let Some(taus) = taus {
            for (i, tau) in taus.into_iter().enumerate() {
                self.slow_c[i] += cl.count_above(tau);
                self.slow_s[i] += sl.count_above(tau);
            }
        }
        if let Some(us) = max_p99_us {
            self.over_c += cl.count_above(us);
            self.over_s += sl.count_above(us);
        }
    }

    /// True when the batch may be weighed: it holds candidate traffic and enough stable
    /// requests ([`MIN_BATCH_STABLE`], or one when it is `forced` to close).
    pub(super) fn ready(&self, forced: bool) -> bool {
        self.n_c > 0 && self.n_s >= if forced { 1 } else { MIN_BATCH_STABLE }
    }

    /// Starts an empty batch for the split of `o`.
    pub(super) fn restart(&mut self, o: &Observation<'_>) {
        *self = Batch { weight_bp: o.weight_bp, stable_mirrored: o.stable_mirrored, ..Batch::default() };
    }

    /// Starts an empty batch for the same split.
    pub(super) fn clear(&mut self) {
        *self = Batch { weight_bp: self.weight_bp, stable_mirrored: self.stable_mirrored, ..Batch::default() };
    }
}

/// Slices of the mismatch rule's window.
const PAIR_SLICES: usize = 10;

/// Mirrored pairs over about the rule's window: per-slice sums of tick increments, a slice
/// being a tenth of the window in ticks.
#[derive(Debug, Clone, Default)]
pub(super) struct PairWindow {
    ticks_per_slice: u32,
    ticks_in_last: u32,
    slices: VecDeque<(u64, u64)>,
}

impl PairWindow {
    /// An empty window as long as `cfg.window`.
    pub(super) fn new(cfg: &RollbackConfig) -> PairWindow {
        let ticks = cfg.window.as_nanos() / cfg.tick.as_nanos().max(1);
        let per_slice = (ticks / PAIR_SLICES as u128).clamp(1, u128::from(u32::MAX)) as u32;
        PairWindow { ticks_per_slice: per_slice, ticks_in_last: 0, slices: VecDeque::new() }
    }

    /// Adds one tick's pairs.
    pub(super) fn push(&mut self, compared: u64, mismatched: u64) {
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
    pub(super) fn sums(&self) -> (u64, u64) {
        self.slices.iter().fold((0, 0), |(n, x), (a, b)| (n + a, x + b))
    }
}
