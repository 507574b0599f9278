//! Per-thread shards for hot-path counters.
//!
//! A counter that every core increments bounces its cache line between cores and stops
//! scaling. Hot-path state (split accumulators, outcome counters, latency buckets) is kept as
//! one copy per shard, and each thread writes the shard it was given the first time it asked.
//! Readers (the control plane, a few times a second) sum the shards.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Aligns a value to its own pair of cache lines so that neighbouring shards never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// How many shards hot-path structures have: the core count rounded up to a power of two,
/// at most 16 (beyond that the memory grows faster than contention falls).
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.next_power_of_two().min(16)
    })
}

thread_local! {
    static INDEX: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) & (count() - 1)
    };
}

/// The shard the calling thread writes to.
#[inline]
pub fn index() -> usize {
    INDEX.with(|i| *i)
}

/// One `T` per shard.
pub fn per_shard<T>(mut make: impl FnMut() -> T) -> Box<[Padded<T>]> {
    (0..count()).map(|_| Padded(make())).collect()
}
