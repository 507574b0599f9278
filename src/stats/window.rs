//! The rolling window the rules read, kept by the control plane.
//!
//! The hot path never rotates anything: its counters only grow. Every tick the control plane
//! sums them ([`Totals`]) and keeps one such sum per time slice (a tenth of the window) in a
//! short ring. The window's figures are the current sum minus the oldest sum still inside
//! the window, i.e. the last `window` of traffic to within one slice; the increment since
//! the previous tick is what a sequential test consumes. The monotone totals since the
//! version appeared come for free.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Totals, buckets};

/// Slices per window.
const SLICES: u32 = 10;

/// A version's rolling window.
#[derive(Debug)]
pub struct Window {
    window: Duration,
    slice: Duration,
    ring: VecDeque<(Instant, Totals)>,
    last: Totals,
}

/// What one tick of the window yields.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Traffic inside the window.
    pub window: Totals,
    /// Traffic since the previous tick.
    pub tick: Totals,
    /// Everything since the version appeared.
    pub total: Totals,
}

impl Window {
    /// A window of length `window` starting at `now`, from counters currently at `start`.
    pub fn new(window: Duration, now: Instant, start: Totals) -> Self {
        let mut ring = VecDeque::with_capacity(SLICES as usize + 2);
        ring.push_back((now, start.clone()));
        Window { window, slice: window / SLICES, ring, last: start }
    }

    /// Advances to `now` with the counters at `current`.
    pub fn tick(&mut self, now: Instant, current: Totals) -> Reading {
        let tick = current.since(&self.last);
        if self.ring.back().is_none_or(|(t, _)| now.duration_since(*t) >= self.slice) {
            self.ring.push_back((now, current.clone()));
        }
        let horizon = now.checked_sub(self.window);
        while self.ring.len() >= 2 && horizon.is_some_and(|h| self.ring[1].0 <= h) {
            self.ring.pop_front();
        }
        let window = current.since(&self.ring.front().expect("ring is never empty").1);
        self.last = current.clone();
        Reading { window, tick, total: current }
    }
}

/// A latency distribution over [`buckets`].
pub struct Latency<'a>(pub &'a [u64]);

impl Latency<'_> {
    /// Requests in the distribution.
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile in microseconds (bucket midpoint), or `None` when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some((buckets::lower(i) + buckets::upper(i)) / 2);
            }
        }
        None
    }

    /// Requests slower than `us` (counting whole buckets above the one `us` falls in).
    pub fn count_above(&self, us: u64) -> u64 {
        self.0[buckets::index(us) + 1..].iter().sum()
    }
}

/// Window figures as the admin API and CLI show them.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct WindowFigures {
    /// Requests in the window.
    pub requests: u64,
    /// Requests the version is to blame for.
    pub errors: u64,
    /// `errors / requests` (0 when idle).
    pub error_rate: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Requests since the version appeared.
    pub total_requests: u64,
    /// Errors since the version appeared.
    pub total_errors: u64,
    /// Answers veer made itself in the window (no endpoint, `max_inflight`, local
    /// exhaustion): not in `requests`, never judged.
    #[serde(default)]
    pub proxy_answers: u64,
    /// Requests the client broke in the window (bad or stalled body, hang-up): not in
    /// `requests`, never judged.
    #[serde(default)]
    pub client_faults: u64,
}

impl WindowFigures {
    /// Figures of a reading.
    pub fn of(r: &Reading) -> Self {
        let requests = r.window.requests();
        let lat = Latency(&r.window.latency);
        let ms = |q| lat.quantile_us(q).map(|us| us as f64 / 1000.0);
        WindowFigures {
            requests,
            errors: r.window.faults,
            error_rate: if requests == 0 { 0.0 } else { r.window.faults as f64 / requests as f64 },
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            total_requests: r.total.requests(),
            total_errors: r.total.faults,
            proxy_answers: r.window.by_source(super::Source::Proxy).iter().sum(),
            client_faults: r.window.by_source(super::Source::Client).iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Class, Outcome, VersionStats};

    fn hit(s: &VersionStats, n: usize, fault: bool, ms: u64) {
        for _ in 0..n {
            let class = if fault { Class::ServerError } else { Class::Success };
            s.record(Outcome {
                class,
                fault,
                latency: Duration::from_millis(ms),
                source: crate::stats::Source::Upstream,
            });
        }
    }

    #[test]
    fn old_traffic_leaves_the_window() {
        let s = VersionStats::new();
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), t0, s.totals());
        hit(&s, 100, true, 5);
        let r = w.tick(t0 + Duration::from_secs(1), s.totals());
        assert_eq!((r.window.requests(), r.tick.requests()), (100, 100));
        for sec in 2..=11 {
            hit(&s, 10, false, 5);
            w.tick(t0 + Duration::from_secs(sec), s.totals());
        }
        let r = w.tick(t0 + Duration::from_secs(12), s.totals());
        assert_eq!(r.tick.requests(), 0);
        assert_eq!(r.window.faults, 0, "the failing second is more than a window ago");
        assert!((90..=100).contains(&r.window.requests()), "{}", r.window.requests());
        assert_eq!(r.total.requests(), 200);
        assert_eq!(r.total.faults, 100);
    }

    #[test]
    fn quantiles_within_bucket_precision() {
        let s = VersionStats::new();
        hit(&s, 98, false, 10);
        hit(&s, 2, false, 400);
        let t = s.totals();
        let lat = Latency(&t.latency);
        let p50 = lat.quantile_us(0.5).expect("non-empty") as f64;
        let p99 = lat.quantile_us(0.99).expect("non-empty") as f64;
        assert!((p50 - 10_000.0).abs() / 10_000.0 < 0.02, "{p50}");
        assert!((p99 - 400_000.0).abs() / 400_000.0 < 0.02, "{p99}");
        assert_eq!(lat.count_above(100_000), 2);
        assert_eq!(Latency(&[0; buckets::COUNT]).quantile_us(0.5), None);
    }
}
