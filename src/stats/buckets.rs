//! The latency bucket layout shared by the hot-path counters and the window reader.
//!
//! Log-linear buckets over microseconds: exact below 32 µs, then 32 buckets per power of
//! two (≤ 3.2% relative width) up to 2^37 µs (~38 hours). The index is a couple of shifts,
//! so recording costs one increment into a fixed array and needs no lock.

/// Number of latency buckets.
pub const COUNT: usize = 1056;
const SUB: u64 = 32;
const MAX_US: u64 = (1 << 37) - 1;

/// Bucket index of a latency in microseconds.
#[inline]
pub fn index(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let us = us.min(MAX_US);
    let e = 63 - u64::from(us.leading_zeros());
    ((e - 4) * SUB + ((us >> (e - 5)) - SUB)) as usize
}

/// Smallest latency (µs) that falls into bucket `i`.
pub fn lower(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let e = i / SUB + 4;
    (i % SUB + SUB) << (e - 5)
}

/// Largest latency (µs) that falls into bucket `i`.
pub fn upper(i: usize) -> u64 {
    if i + 1 >= COUNT { MAX_US } else { lower(i + 1) - 1 }
}

/// Upper bounds (seconds) of the Prometheus histogram buckets of
/// `veer_request_duration_seconds`; requests slower than the last go to `+Inf`.
pub const PROM_BOUNDS_S: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const PROM_BOUNDS_US: [u64; 14] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000,
];
/// Prometheus buckets including the `+Inf` one.
pub const PROM_COUNT: usize = PROM_BOUNDS_US.len() + 1;

/// Prometheus bucket (`le`) index of a latency in microseconds.
#[inline]
pub fn prom_index(us: u64) -> usize {
    PROM_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(PROM_BOUNDS_US.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        assert_eq!(index(0), 0);
        assert_eq!(index(31), 31);
        assert_eq!(index(32), 32);
        assert_eq!(index(MAX_US), COUNT - 1);
        assert_eq!(index(u64::MAX), COUNT - 1);
        for i in 1..COUNT {
            assert_eq!(lower(i), upper(i - 1) + 1, "bucket {i}");
            assert_eq!(index(lower(i)), i);
            assert_eq!(index(upper(i)), i);
        }
    }

    #[test]
    fn relative_width_is_small() {
        for i in SUB as usize..COUNT - 1 {
            let w = (upper(i) - lower(i) + 1) as f64 / lower(i) as f64;
            assert!(w <= 1.0 / 31.0, "bucket {i} is {w} wide");
        }
    }

    #[test]
    fn prom_buckets_are_inclusive() {
        assert_eq!(prom_index(0), 0);
        assert_eq!(prom_index(1_000), 0);
        assert_eq!(prom_index(1_001), 1);
        assert_eq!(prom_index(u64::MAX), PROM_COUNT - 1);
        assert_eq!(PROM_BOUNDS_S.len(), PROM_BOUNDS_US.len());
    }
}
