//! Picking stable or candidate for one request by weight.
//!
//! Random picks are exact only on average: at 1% a random split can send the candidate 0 or
//! 25 of the first thousand requests. veer uses an error-diffusion accumulator instead: each
//! request adds the weight (in basis points) and goes to the candidate whenever the running
//! sum crosses a multiple of 10,000. At 1% that is exactly one request in every hundred, at
//! any weight the long-run share is exact, and a weight change takes effect on the very next
//! request. Each thread shard keeps its own accumulator (no shared cache line), started at a
//! random phase so that the first candidate request of a rollout is not always the 100th.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shard::{self, Padded};

/// Full weight in basis points: 100%.
pub const FULL_BP: u32 = 10_000;

/// The weighted picker of one rollout.
#[derive(Debug)]
pub struct Splitter {
    acc: Box<[Padded<AtomicU64>]>,
}

impl Splitter {
    /// A splitter whose shards start at random phases.
    pub fn new() -> Self {
        Splitter { acc: shard::per_shard(|| AtomicU64::new(fastrand::u64(0..u64::from(FULL_BP)))) }
    }

    /// A splitter with a fixed starting phase (tests and simulations).
    pub fn with_phase(phase: u32) -> Self {
        Splitter { acc: shard::per_shard(|| AtomicU64::new(u64::from(phase % FULL_BP))) }
    }

    /// True when this request goes to the candidate at `weight_bp` basis points.
    #[inline]
    pub fn pick_candidate(&self, weight_bp: u32) -> bool {
        if weight_bp == 0 {
            return false;
        }
        if weight_bp >= FULL_BP {
            return true;
        }
        let w = u64::from(weight_bp);
        let prev = self.acc[shard::index()].fetch_add(w, Ordering::Relaxed);
        (prev + w) / u64::from(FULL_BP) != prev / u64::from(FULL_BP)
    }
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &Splitter, w: u32, n: usize) -> usize {
        (0..n).filter(|_| s.pick_candidate(w)).count()
    }

    #[test]
    fn one_percent_is_one_in_every_hundred() {
        let s = Splitter::with_phase(0);
        let picks: Vec<usize> = (0..1000).filter(|_| s.pick_candidate(100)).collect();
        assert_eq!(picks.len(), 10);
        assert!(picks.windows(2).all(|w| w[1] - w[0] == 100), "{picks:?}");
    }

    #[test]
    fn long_run_share_is_exact_for_any_weight() {
        for w in [1, 33, 100, 1000, 2500, 3333, 9999] {
            let s = Splitter::new();
            let n = 1_000_000;
            let got = count(&s, w, n) as i64;
            let want = (n as i64 * i64::from(w)) / 10_000;
            assert!((got - want).abs() <= 1, "w={w} got={got} want={want}");
        }
    }

    #[test]
    fn zero_and_full_are_absolute() {
        let s = Splitter::new();
        assert_eq!(count(&s, 0, 10_000), 0);
        assert_eq!(count(&s, FULL_BP, 10_000), 10_000);
    }

    #[test]
    fn weight_change_applies_to_the_next_request() {
        let s = Splitter::with_phase(0);
        assert_eq!(count(&s, 1000, 100), 10);
        assert_eq!(count(&s, 5000, 100), 50);
        assert_eq!(count(&s, 0, 100), 0);
    }
}
