//! Per-version measurement: the hot-path recorder and what the control plane reads from it.
//!
//! The data plane calls [`VersionStats::record`] exactly once per request, when the response
//! body ends or fails. Recording is a handful of relaxed increments into the calling thread's
//! shard: no lock, no allocation, no shared cache line. Counters only ever grow; the control
//! plane reads [`Totals`] a few times a second and derives everything else from differences:
//! the rolling window ([`window::Window`]), the per-tick increments the judge consumes, and the
//! deltas pushed into the Prometheus exporter.

pub mod buckets;
pub mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::shard::{self, Padded};

/// What came of one request, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    /// 1xx (a final 101 for upgrades).
    Informational,
    /// 2xx.
    Success,
    /// 3xx.
    Redirection,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
    /// No complete response: connect failure, timeout, reset, malformed answer.
    Error,
}

impl Class {
    /// Every class, in label order.
    pub const ALL: [Class; 6] = [
        Class::Informational,
        Class::Success,
        Class::Redirection,
        Class::ClientError,
        Class::ServerError,
        Class::Error,
    ];

    /// The class of an HTTP status code.
    pub fn of_status(status: http::StatusCode) -> Class {
        match status.as_u16() {
            100..=199 => Class::Informational,
            200..=299 => Class::Success,
            300..=399 => Class::Redirection,
            400..=499 => Class::ClientError,
            _ => Class::ServerError,
        }
    }

    /// The `class` label value.
    pub fn label(self) -> &'static str {
        match self {
            Class::Informational => "1xx",
            Class::Success => "2xx",
            Class::Redirection => "3xx",
            Class::ClientError => "4xx",
            Class::ServerError => "5xx",
            Class::Error => "error",
        }
    }
}

/// Who produced the answer a request got, as the `source` label of `veer_requests_total`
/// names it. Only [`Source::Upstream`] outcomes are measured for the judge: what veer answered
/// itself, and what a client broke, says nothing about a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// The version answered (or failed to: connect failure, timeout, reset, bad answer).
    Upstream,
    /// veer answered itself: no route, no endpoint, `max_inflight` full, local resource
    /// exhaustion.
    Proxy,
    /// The client broke the exchange: malformed or stalled request body, hang-up, reset,
    /// a response it stopped reading, an invalid request.
    Client,
}

impl Source {
    /// Every source, in label order.
    pub const ALL: [Source; 3] = [Source::Upstream, Source::Proxy, Source::Client];

    /// The `source` label value.
    pub fn label(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Proxy => "proxy",
            Source::Client => "client",
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Status class, or `Error` when no complete response came back.
    pub class: Class,
    /// The version is to blame: 5xx, transport failure, or a gRPC server-fault status.
    /// Client errors and client disconnects are counted but never judged.
    pub fault: bool,
    /// From the end of the request body (its arrival, when it has none) to the end of the
    /// response body: a slow uploader is not a slow version.
    pub latency: Duration,
    /// Who produced the answer; anything but [`Source::Upstream`] is counted, never judged
    /// (`fault` and `latency` are ignored for it).
    pub source: Source,
}

impl Outcome {
    /// An answer veer made without a version's part in it (`source` is not `Upstream`).
    pub fn local(class: Class, source: Source) -> Outcome {
        Outcome { class, fault: false, latency: Duration::ZERO, source }
    }
}

#[derive(Debug)]
struct Shard {
    classes: [AtomicU64; 6],
    /// Classes of the answers of [`Source::Proxy`] and [`Source::Client`].
    local: [[AtomicU64; 6]; 2],
    faults: AtomicU64,
    latency: Box<[AtomicU64]>,
    prom_count: [AtomicU64; buckets::PROM_COUNT],
    prom_sum_us: [AtomicU64; buckets::PROM_COUNT],
}

impl Shard {
    fn new() -> Shard {
        Shard {
            classes: Default::default(),
            local: Default::default(),
            faults: AtomicU64::new(0),
            latency: (0..buckets::COUNT).map(|_| AtomicU64::new(0)).collect(),
            prom_count: Default::default(),
            prom_sum_us: Default::default(),
        }
    }
}

/// The hot-path counters of one version of one route, monotone since the version appeared.
#[derive(Debug)]
pub struct VersionStats {
    shards: Box<[Padded<Shard>]>,
}

impl VersionStats {
    /// Empty counters.
    pub fn new() -> Self {
        VersionStats { shards: shard::per_shard(Shard::new) }
    }

    /// Records one outcome into the calling thread's shard.
    #[inline]
    pub fn record(&self, o: Outcome) {
        let s = &self.shards[shard::index()];
        if o.source != Source::Upstream {
            s.local[o.source as usize - 1][o.class as usize].fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.classes[o.class as usize].fetch_add(1, Ordering::Relaxed);
        if o.fault {
            s.faults.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(o.latency.as_micros()).unwrap_or(u64::MAX);
        s.latency[buckets::index(us)].fetch_add(1, Ordering::Relaxed);
        let p = buckets::prom_index(us);
        s.prom_count[p].fetch_add(1, Ordering::Relaxed);
        s.prom_sum_us[p].fetch_add(us, Ordering::Relaxed);
    }

    /// Sums the shards. Reads are relaxed: a request recorded concurrently may be seen in one
    /// counter and not yet in another, which the next read corrects.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in self.shards.iter() {
            for (acc, c) in t.classes.iter_mut().zip(&s.classes) {
                *acc += c.load(Ordering::Relaxed);
            }
            for (acc, c) in t.local.iter_mut().flatten().zip(s.local.iter().flatten()) {
                *acc += c.load(Ordering::Relaxed);
            }
            t.faults += s.faults.load(Ordering::Relaxed);
            for (acc, c) in t.latency.iter_mut().zip(s.latency.iter()) {
                *acc += c.load(Ordering::Relaxed);
            }
            for i in 0..buckets::PROM_COUNT {
                t.prom_count[i] += s.prom_count[i].load(Ordering::Relaxed);
                t.prom_sum_us[i] += s.prom_sum_us[i].load(Ordering::Relaxed);
            }
        }
        t
    }
}

impl Default for VersionStats {
    fn default() -> Self {
        Self::new()
    }
}

/// A point-in-time sum of a version's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Requests a version answered, by [`Class`]: what the judge and the window read.
    pub classes: [u64; 6],
    /// Requests veer answered itself (`[0]`, [`Source::Proxy`]) or the client broke (`[1]`,
    /// [`Source::Client`]), by [`Class`]. Counted for metrics and status, never judged.
    pub local: [[u64; 6]; 2],
    /// Requests the version is to blame for.
    pub faults: u64,
    /// Requests per latency bucket ([`buckets`]).
    pub latency: Vec<u64>,
    /// Requests per Prometheus bucket.
    pub prom_count: [u64; buckets::PROM_COUNT],
    /// Summed latency (µs) per Prometheus bucket.
    pub prom_sum_us: [u64; buckets::PROM_COUNT],
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            classes: [0; 6],
            local: [[0; 6]; 2],
            faults: 0,
            latency: vec![0; buckets::COUNT],
            prom_count: [0; buckets::PROM_COUNT],
            prom_sum_us: [0; buckets::PROM_COUNT],
        }
    }
}

impl Totals {
    /// All requests a version answered (the judge's denominator).
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// Requests answered by `source`, by [`Class`].
    pub fn by_source(&self, source: Source) -> &[u64; 6] {
        match source {
            Source::Upstream => &self.classes,
            Source::Proxy => &self.local[0],
            Source::Client => &self.local[1],
        }
    }

    /// `self + other`: two sets of counters as one.
    pub fn plus(mut self, other: &Totals) -> Totals {
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.classes, &other.classes);
        add(self.local.as_flattened_mut(), other.local.as_flattened());
        self.faults += other.faults;
        add(&mut self.latency, &other.latency);
        add(&mut self.prom_count, &other.prom_count);
        add(&mut self.prom_sum_us, &other.prom_sum_us);
        self
    }

    /// `self − earlier`, saturating (counters are monotone, so this is the traffic in between).
    pub fn since(&self, earlier: &Totals) -> Totals {
        let sub = |a: &[u64], b: &[u64], out: &mut [u64]| {
            for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                *o = x.saturating_sub(*y);
            }
        };
        let mut d = Totals::default();
        sub(&self.classes, &earlier.classes, &mut d.classes);
        sub(self.local.as_flattened(), earlier.local.as_flattened(), d.local.as_flattened_mut());
        d.faults = self.faults.saturating_sub(earlier.faults);
        sub(&self.latency, &earlier.latency, &mut d.latency);
        sub(&self.prom_count, &earlier.prom_count, &mut d.prom_count);
        sub(&self.prom_sum_us, &earlier.prom_sum_us, &mut d.prom_sum_us);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(class: Class, fault: bool, ms: u64) -> Outcome {
        Outcome { class, fault, latency: Duration::from_millis(ms), source: Source::Upstream }
    }

    #[test]
    fn local_answers_are_counted_apart_and_never_judged() {
        let s = VersionStats::new();
        s.record(outcome(Class::Success, false, 1));
        s.record(Outcome::local(Class::ServerError, Source::Proxy));
        s.record(Outcome { source: Source::Client, ..outcome(Class::ClientError, true, 9000) });
        let t = s.totals();
        assert_eq!(t.requests(), 1, "only the version's answers are judged");
        assert_eq!(t.faults, 0);
        assert_eq!(t.latency.iter().sum::<u64>(), 1);
        assert_eq!(t.by_source(Source::Proxy)[Class::ServerError as usize], 1);
        assert_eq!(t.by_source(Source::Client)[Class::ClientError as usize], 1);
        let d = s.totals().plus(&t).since(&t);
        assert_eq!(d.by_source(Source::Proxy)[Class::ServerError as usize], 1);
    }

    #[test]
    fn records_sum_across_threads() {
        let stats = std::sync::Arc::new(VersionStats::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = stats.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        s.record(outcome(
                            if i % 10 == 0 { Class::ServerError } else { Class::Success },
                            i % 10 == 0,
                            5,
                        ));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("recorder thread");
        }
        let t = stats.totals();
        assert_eq!(t.requests(), 4000);
        assert_eq!(t.faults, 400);
        assert_eq!(t.classes[Class::ServerError as usize], 400);
        assert_eq!(t.latency[buckets::index(5000)], 4000);
        assert_eq!(t.prom_count[buckets::prom_index(5000)], 4000);
        assert_eq!(t.prom_sum_us.iter().sum::<u64>(), 4000 * 5000);
    }

    #[test]
    fn since_is_the_traffic_in_between() {
        let s = VersionStats::new();
        s.record(outcome(Class::Success, false, 1));
        let a = s.totals();
        s.record(outcome(Class::Error, true, 2));
        let d = s.totals().since(&a);
        assert_eq!(d.requests(), 1);
        assert_eq!(d.faults, 1);
        assert_eq!(d.classes[Class::Error as usize], 1);
    }
}
