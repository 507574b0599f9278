//! Metric names, the Prometheus exporter, and log setup.
//!
//! Requests are counted on the hot path into veer's own sharded counters
//! ([`crate::stats`]), never straight into the exporter: the exporter's histogram takes a
//! timestamp and appends to a shared queue per sample, which costs more than the whole
//! outcome record and contends across cores. Instead the control plane pushes the
//! increments into metric handles resolved once per version ([`VersionMetrics::flush`]),
//! every tick and right before each scrape. Counts and bucket placement are exact; each
//! histogram bucket's new samples are recorded at their mean, so `_sum` is exact too.
//!
//! Each running proxy owns its recorder (no global recorder), so several proxies can live in
//! one process, as they do in the tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::stats::{Class, Source, Totals, buckets};

/// `veer_requests_total{route, role, version, class, source}`; `source` is `upstream` (a
/// version answered), `proxy` (veer answered itself) or `client` (the client broke the
/// exchange). Requests no route matched are counted under `route=""`, `role=""`,
/// `version=""`.
pub const REQUESTS_TOTAL: &str = "veer_requests_total";
/// `veer_request_duration_seconds{route, role, version}`.
pub const REQUEST_DURATION: &str = "veer_request_duration_seconds";
/// `veer_candidate_weight_percent{route}`.
pub const CANDIDATE_WEIGHT: &str = "veer_candidate_weight_percent";
/// `veer_rollout_phase{route, phase}`.
pub const ROLLOUT_PHASE: &str = "veer_rollout_phase";
/// `veer_rollbacks_total{route, rule}`.
pub const ROLLBACKS_TOTAL: &str = "veer_rollbacks_total";
/// `veer_judge_log_evidence{route, rule}`: the rule's `ln E`.
pub const JUDGE_EVIDENCE: &str = "veer_judge_log_evidence";
/// `veer_judge_log_threshold{route, rule}`: the `ln E` at which the rule fires.
pub const JUDGE_THRESHOLD: &str = "veer_judge_log_threshold";
/// `veer_retries_total{route, outcome}`.
pub const RETRIES_TOTAL: &str = "veer_retries_total";
/// `veer_mirrored_requests_total{route, class}`.
pub const MIRRORED_TOTAL: &str = "veer_mirrored_requests_total";
/// `veer_mirror_mismatches_total{route}`.
pub const MIRROR_MISMATCHES: &str = "veer_mirror_mismatches_total";
/// `veer_journal_pending{route}`: 1 while a rollback in effect is not in the journal yet.
pub const JOURNAL_PENDING: &str = "veer_journal_pending";
/// `veer_journal_write_failures_total{route}`: failed writes to the state dir.
pub const JOURNAL_WRITE_FAILURES: &str = "veer_journal_write_failures_total";
/// `veer_config_reloads_total{outcome}`.
pub const CONFIG_RELOADS: &str = "veer_config_reloads_total";
/// Fleet mode: 1 while this replica's etcd session is up.
pub const CLUSTER_CONNECTED: &str = "veer_cluster_connected";
/// Fleet mode: live replicas of the fleet, as this replica sees them.
pub const CLUSTER_MEMBERS: &str = "veer_cluster_members";
/// Fleet mode: 1 on the replica that leads the route's rollout.
pub const CLUSTER_LEADER: &str = "veer_cluster_leader";
/// Fleet mode: 1 while this replica's config of the route disagrees with the fleet's rollout.
pub const CLUSTER_CONFIG_MISMATCH: &str = "veer_cluster_config_mismatch";
/// Fleet mode: writes of rollout records, by outcome.
pub const CLUSTER_WRITES: &str = "veer_cluster_writes_total";

/// The metrics registry of one running proxy.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// `veer_requests_total{route="", role="", version="", class="4xx", source}` for requests
    /// veer refused before any route was chosen: `[0]` `source="proxy"`, `[1]` `"client"`.
    unrouted: [Counter; 2],
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// A fresh registry with veer's histogram buckets and metric descriptions.
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &buckets::PROM_BOUNDS_S)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let unrouted = metrics::with_local_recorder(&recorder as &dyn Recorder, || {
            [Source::Proxy, Source::Client].map(|s| {
                let (role, version, class) = ("", "", Class::ClientError.label());
                metrics::counter!(REQUESTS_TOTAL, "route" => "", "role" => role, "version" => version, "class" => class, "source" => s.label())
            })
        });
        let t = Telemetry { recorder, handle, unrouted };
        t.with(|| {
            metrics::describe_counter!(
                REQUESTS_TOTAL,
                "Requests, by route, role, version, status class (error = no response) and source (upstream, proxy, client)."
            );
            metrics::describe_histogram!(
                REQUEST_DURATION,
                metrics::Unit::Seconds,
                "Request latency to the end of the response body."
            );
            metrics::describe_gauge!(CANDIDATE_WEIGHT, "Share of ordinary traffic sent to the candidate, percent.");
            metrics::describe_gauge!(ROLLOUT_PHASE, "1 for the route's current rollout phase.");
            metrics::describe_counter!(CONFIG_RELOADS, "Configuration reloads by outcome (applied, rejected).");
            metrics::describe_counter!(
                ROLLBACKS_TOTAL,
                "Candidates snapped back to 0%, by the rule that tripped (manual for an operator's abort)."
            );
            metrics::describe_counter!(RETRIES_TOTAL, "Failed candidate attempts re-sent to stable, by outcome.");
            metrics::describe_counter!(
                MIRRORED_TOTAL,
                "Requests copied to the candidate, by the class of its answer (dropped: queue full)."
            );
            metrics::describe_counter!(MIRROR_MISMATCHES, "Mirrored answers that differed from the primary answer.");
            metrics::describe_gauge!(
                JOURNAL_PENDING,
                "1 while a rollback in effect could not be recorded in the state dir (retried every tick)."
            );
            metrics::describe_counter!(
                JOURNAL_WRITE_FAILURES,
                "Writes to the state dir (journal, state file, rollback marker) that failed."
            );
            metrics::describe_gauge!(CLUSTER_CONNECTED, "1 while this replica's etcd session is up (fleet mode).");
            metrics::describe_gauge!(CLUSTER_MEMBERS, "Live replicas of the fleet, as this replica sees them.");
            metrics::describe_gauge!(CLUSTER_LEADER, "1 on the replica that leads the route's fleet rollout.");
            metrics::describe_gauge!(
                CLUSTER_CONFIG_MISMATCH,
                "1 while this replica's config of the route disagrees with the fleet's rollout (it serves stable only)."
            );
            metrics::describe_counter!(
                CLUSTER_WRITES,
                "Rollout record writes to etcd, by outcome (written, conflict, failed)."
            );
            metrics::describe_gauge!(JUDGE_EVIDENCE, "The judge's evidence against the candidate, ln E, per rule.");
            metrics::describe_gauge!(
                JUDGE_THRESHOLD,
                "The evidence at which the rule rolls the candidate back, ln(k/alpha)."
            );
        });
        Arc::new(t)
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder as &dyn Recorder, f)
    }

    /// Handles for one version of one route.
    pub fn version(&self, route: &str, role: &'static str, version: &str) -> VersionMetrics {
        let (r, v) = (route.to_string(), version.to_string());
        self.with(|| VersionMetrics {
            requests: Source::ALL.map(|s| Class::ALL.map(|c| metrics::counter!(REQUESTS_TOTAL, "route" => r.clone(), "role" => role, "version" => v.clone(), "class" => c.label(), "source" => s.label()))),
            duration: metrics::histogram!(REQUEST_DURATION, "route" => r.clone(), "role" => role, "version" => v.clone()),
            flushed: Mutex::new(Flushed::default()),
        })
    }

    /// Counts a request refused before routing (no route: 404 from `Proxy`; a request no route
    /// may see, such as a missing `Host`: 4xx from `Client`). Rare enough for a shared counter.
    pub fn count_unrouted(&self, source: Source) {
        let i = if source == Source::Client { 1 } else { 0 };
        self.unrouted[i].increment(1);
    }

    /// A per-route gauge.
    pub fn route_gauge(&self, name: &'static str, route: &str) -> Gauge {
        let r = route.to_string();
        self.with(|| metrics::gauge!(name, "route" => r))
    }

    /// A per-route gauge with one more label.
    pub fn route_gauge_with(&self, name: &'static str, route: &str, label: &'static str, value: &'static str) -> Gauge {
        let r = route.to_string();
        self.with(|| metrics::gauge!(name, "route" => r, label => value))
    }

    /// A per-route counter.
    pub fn route_total(&self, name: &'static str, route: &str) -> Counter {
        let r = route.to_string();
        self.with(|| metrics::counter!(name, "route" => r))
    }

    /// A per-route counter with one more label.
    pub fn route_counter(&self, name: &'static str, route: &str, label: &'static str, value: String) -> Counter {
        let r = route.to_string();
        self.with(|| metrics::counter!(name, "route" => r, label => value))
    }

    /// A gauge without labels.
    pub fn gauge(&self, name: &'static str) -> Gauge {
        self.with(|| metrics::gauge!(name))
    }

    /// A counter with one label.
    pub fn counter(&self, name: &'static str, label: &'static str, value: &'static str) -> Counter {
        self.with(|| metrics::counter!(name, label => value))
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains exporter-internal buffers; run it periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

#[derive(Debug, Default)]
struct Flushed {
    classes: [[u64; 6]; 3],
    prom_count: [u64; buckets::PROM_COUNT],
    prom_sum_us: [u64; buckets::PROM_COUNT],
}

/// Metric handles of one version, resolved once when the version appears.
pub struct VersionMetrics {
    requests: [[Counter; 6]; 3],
    duration: Histogram,
    flushed: Mutex<Flushed>,
}

impl std::fmt::Debug for VersionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VersionMetrics")
    }
}

impl VersionMetrics {
    /// Pushes what `totals` holds beyond the previous flush into the exporter.
    pub fn flush(&self, totals: &Totals) {
        let mut last = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        for (s, counters) in Source::ALL.into_iter().zip(&self.requests) {
            let now = totals.by_source(s);
            for (i, c) in counters.iter().enumerate() {
                let d = now[i].saturating_sub(last.classes[s as usize][i]);
                if d > 0 {
                    c.increment(d);
                }
            }
            last.classes[s as usize] = *now;
        }
        for i in 0..buckets::PROM_COUNT {
            let n = totals.prom_count[i].saturating_sub(last.prom_count[i]);
            if n == 0 {
                continue;
            }
            let sum = totals.prom_sum_us[i].saturating_sub(last.prom_sum_us[i]);
            let mean_s = sum as f64 / n as f64 / 1e6;
            self.duration.record_many(mean_s, n as usize);
        }
        last.prom_count = totals.prom_count;
        last.prom_sum_us = totals.prom_sum_us;
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process-wide `tracing` subscriber writing to stderr; `RUST_LOG` filters
/// (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// An error and its sources on one line (`outer: inner: root`), for log messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How often exporter upkeep runs.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Outcome, Source, VersionStats};

    #[test]
    fn flush_exports_exact_counts_and_sums() {
        let t = Telemetry::new();
        let m = t.version("web", "candidate", "v2");
        let s = VersionStats::new();
        for ms in [1u64, 3, 3, 40] {
            s.record(Outcome {
                class: Class::Success,
                fault: false,
                latency: Duration::from_millis(ms),
                source: Source::Upstream,
            });
        }
        s.record(Outcome {
            class: Class::ServerError,
            fault: true,
            latency: Duration::from_millis(2),
            source: Source::Upstream,
        });
        s.record(Outcome::local(Class::ServerError, Source::Proxy));
        m.flush(&s.totals());
        m.flush(&s.totals());
        let text = t.render();
        assert!(
            text.contains(
                r#"veer_requests_total{route="web",role="candidate",version="v2",class="2xx",source="upstream"} 4"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"class="5xx",source="upstream"} 1"#), "{text}");
        assert!(text.contains(r#"class="5xx",source="proxy"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"veer_request_duration_seconds_bucket{route="web",role="candidate",version="v2",le="0.001"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"le="0.0025"} 2"#), "{text}");
        assert!(text.contains(r#"le="0.005"} 4"#), "{text}");
        assert!(
            text.contains(r#"veer_request_duration_seconds_count{route="web",role="candidate",version="v2"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"veer_request_duration_seconds_sum{route="web",role="candidate",version="v2"} 0.049"#),
            "{text}"
        );
    }
}
