//! veer scraped by a real Prometheus: Debian's `prometheus` on a loopback ephemeral port, a 1 s
//! scrape of veer's admin port and a 1 s evaluation of `deploy/prometheus/rules.yml`. Traffic
//! goes through a real proxy, the rollout is aborted, and Prometheus' HTTP API must show both
//! versions' request rates before, the candidate weight at 0 after, and the
//! `VeerCandidateRolledBack` alert pending or firing.
//!
//! Without a `prometheus` binary the test says loudly that it skipped; with
//! `VEER_REQUIRE_PROMETHEUS=1` (set by `.ci/run`) it fails instead.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;
use serde_json::Value;
use veer::server::Proxy;

/// The `prometheus` binary to run: `$PROMETHEUS`, else `prometheus` on the PATH.
fn prometheus_bin() -> Result<PathBuf, String> {
    let bin = std::env::var_os("PROMETHEUS").map_or_else(|| PathBuf::from("prometheus"), PathBuf::from);
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(bin),
        Ok(o) => Err(format!("{} --version failed: {}", bin.display(), String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("{} cannot be run ({e}); apt-get install prometheus", bin.display())),
    }
}

/// A running Prometheus, killed and reaped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `bin` scraping `target`'s `/metrics` every second with veer's rules loaded, and
    /// waits until it is ready. A port taken between choosing and binding it is retried.
    async fn start(bin: &Path, target: SocketAddr) -> Prometheus {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
        let client = client();
        'attempt: for attempt in 1..=3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = dir.path().join("prometheus.yml");
            std::fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                     rule_files:\n  - {rules:?}\n\
                     scrape_configs:\n  - job_name: veer\n    metrics_path: /metrics\n    static_configs:\n      \
                     - targets: [\"{target}\"]\n"
                ),
            )
            .expect("write prometheus.yml");
            // A free port: bound to 127.0.0.1:0 and released.
            let addr = refused_addr();
            let log = dir.path().join("prometheus.log");
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn prometheus");
            let mut p = Prometheus { child, addr, log, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = p.child.try_wait().expect("wait") {
                    let log = p.log_text();
                    if log.contains("address already in use") && attempt < 3 {
                        continue 'attempt; // the port was taken meanwhile: another one
                    }
                    panic!("prometheus exited ({status}) before it was ready:\n{log}");
                }
                let req =
                    http::Request::get(format!("http://{addr}/-/ready")).body(Default::default()).expect("request");
                let ready = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await;
                if matches!(ready, Ok(Ok(ref r)) if r.status() == StatusCode::OK) {
                    return p;
                }
                assert!(Instant::now() < deadline, "prometheus was not ready within 30 s:\n{}", p.log_text());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` → the `data` of a successful answer.
    async fn api(&self, client: &HttpClient, path: &str) -> Value {
        let got = get(client, self.addr, &format!("/api/v1/{path}")).await;
        assert_eq!(got.status, StatusCode::OK, "GET /api/v1/{path}: {}", got.text());
        let v: Value = serde_json::from_slice(&got.body).expect("Prometheus API answers JSON");
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }

    /// An instant query: each series' value, keyed by the value of `by` (or "" without it).
    async fn query(&self, client: &HttpClient, promql: &str, by: &str) -> BTreeMap<String, f64> {
        let data = self.api(client, &format!("query?query={}", encode(promql))).await;
        let series = data["result"].as_array().cloned().unwrap_or_default();
        series
            .iter()
            .map(|s| {
                let key = s["metric"][by].as_str().unwrap_or("").to_string();
                let value = s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (key, value)
            })
            .collect()
    }

    /// The states of the active `alertname` alerts for route `web`.
    async fn alert_states(&self, client: &HttpClient, alertname: &str) -> Vec<String> {
        let data = self.api(client, "alerts").await;
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["labels"]["alertname"] == alertname && a["labels"]["route"] == "web")
            .map(|a| a["state"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `check` every 250 ms until it returns `Ok`, failing with its last `Err` after `within`.
async fn until<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}; last: {last}")
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_both_versions_and_sees_the_rollback() {
    let bin = match prometheus_bin() {
        Ok(b) => b,
        Err(why) => {
            skip_unless_required(
                "VEER_REQUIRE_PROMETHEUS",
                "prometheus_scrapes_both_versions_and_sees_the_rollback",
                &why,
            );
            return;
        }
    };

    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("candidate").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), "[50, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (http, admin) = (proxy.http_addr(), proxy.admin_addr());
    let client = client();

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = background_traffic(http, Duration::from_millis(5), stop.clone());

    let prom = Prometheus::start(&bin, admin).await;
    let p = &prom;
    let c = &client;

    // Before: Prometheus sees requests to both versions, from the raw counters and from the
    // recording rule, the candidate at 50%, and no rollback alert.
    let before = until(Duration::from_secs(60), "both versions' request rates in Prometheus", || async move {
        let raw = p.query(c, r#"sum by (role) (rate(veer_requests_total{job="veer",route="web"}[5s]))"#, "role").await;
        let recorded = p.query(c, r#"route_version:veer_requests:rate1m{route="web"}"#, "role").await;
        let weight = p.query(c, r#"veer_candidate_weight_percent{job="veer",route="web"}"#, "").await;
        let both =
            |m: &BTreeMap<String, f64>| ["stable", "candidate"].iter().all(|r| m.get(*r).is_some_and(|v| *v > 0.0));
        if both(&raw) && both(&recorded) && weight.get("") == Some(&50.0) {
            Ok((raw, recorded))
        } else {
            Err(format!("rate {raw:?}, recorded {recorded:?}, weight {weight:?}"))
        }
    })
    .await;
    eprintln!("before the abort: req/s by role {:?}, recorded {:?}", before.0, before.1);
    let up = p.query(c, r#"up{job="veer"}"#, "").await;
    assert_eq!(up.get(""), Some(&1.0), "the scrape target is up");
    assert!(p.alert_states(c, "VeerCandidateRolledBack").await.is_empty(), "no rollback alert before the abort");

    let aborted = post(&client, admin, "/api/v1/routes/web/abort", &[]).await;
    assert_eq!(aborted.status, StatusCode::OK, "{}", aborted.text());

    // After: the weight reads 0 and the rollback alert is active.
    let states = until(Duration::from_secs(60), "weight 0 and VeerCandidateRolledBack in Prometheus", || async move {
        let weight = p.query(c, r#"veer_candidate_weight_percent{job="veer",route="web"}"#, "").await;
        let phase = p.query(c, r#"veer_rollout_phase{job="veer",route="web",phase="rolled_back"}"#, "").await;
        let states = p.alert_states(c, "VeerCandidateRolledBack").await;
        let active = !states.is_empty() && states.iter().all(|s| s == "pending" || s == "firing");
        if weight.get("") == Some(&0.0) && phase.get("") == Some(&1.0) && active {
            Ok(states)
        } else {
            Err(format!("weight {weight:?}, rolled_back phase {phase:?}, alert states {states:?}"))
        }
    })
    .await;
    eprintln!("after the abort: weight 0, VeerCandidateRolledBack {states:?}");

    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    drop(prom);
    proxy.drain().await;
}
