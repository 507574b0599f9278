//! Crash safety with the binary as a subprocess: SIGKILL mid-rollout and after a rollback,
//! and a torn journal line, never move a rollout forward or lose its history.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn config(stable: std::net::SocketAddr, cand: std::net::SocketAddr, interval: &str) -> String {
    fixture(stable, cand, interval).toml()
}

/// The route of [`config`], to change before it is written.
fn fixture(stable: std::net::SocketAddr, cand: std::net::SocketAddr, interval: &str) -> RouteFixture {
    RouteFixture::new(stable, cand)
        .steps("[10, 20, 50, 100]")
        .step_interval(interval)
        .min_requests(0)
        .rollback("5s", "50ms")
}

async fn status(c: &HttpClient, v: &Veer) -> Value {
    route_status(c, v.admin, "web").await
}

async fn kinds(c: &HttpClient, v: &Veer) -> Vec<String> {
    let got = get(c, v.admin, "/api/v1/events?route=web").await;
    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    events.iter().map(|e| e["kind"].as_str().unwrap_or("?").to_string()).collect()
}

fn kill(mut v: Veer) {
    v.signal("KILL");
    let status = v.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "killed, not exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_rollout_resumes_at_the_same_step() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, "2s"));
    let c = client();
    let v = Veer::spawn(&cfg.path);
    eventually(Duration::from_secs(15), "the rollout reaches step 1", || async { status(&c, &v).await["step"] == 1 })
        .await;
    kill(v);

    let v = Veer::spawn(&cfg.path);
    let st = status(&c, &v).await;
    assert_eq!(
        (st["phase"].as_str(), st["step"].as_u64(), st["candidate_weight"].as_f64()),
        (Some("progressing"), Some(1), Some(20.0)),
        "{st}"
    );
    assert_eq!(kinds(&c, &v).await, ["started", "step"], "nothing was skipped or repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_rollback_stays_rolled_back_with_no_candidate_traffic() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, "1h"));
    let c = client();
    let v = Veer::spawn(&cfg.path);
    let aborted = post(&c, v.admin, "/api/v1/routes/web/abort", &[]).await;
    assert_eq!(aborted.status, 200, "{}", aborted.text());
    kill(v);

    let v = Veer::spawn(&cfg.path);
    let before = cand.hits();
    for _ in 0..100 {
        assert_eq!(get(&c, v.http, "/").await.text(), "stable");
    }
    assert_eq!(cand.hits(), before, "a rolled-back candidate never receives ordinary traffic again");
    let st = status(&c, &v).await;
    assert_eq!(st["phase"], "rolled_back");
    assert_eq!(st["candidate_weight"], 0.0);
    assert_eq!(st["rollback"]["rule"], "manual", "the rollback's record survives: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_journal_line_is_skipped_and_appending_goes_on() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, "1h"));
    let c = client();
    let v = Veer::spawn(&cfg.path);
    assert_eq!(post(&c, v.admin, "/api/v1/routes/web/pause", &[]).await.status, 200);
    kill(v);

    let journal = cfg.dir.path().join("state").join("events.jsonl");
    let mut text = std::fs::read_to_string(&journal).expect("journal exists");
    text.push_str(r#"{"at":"2026-11-22T00:00:00Z","route":"web","kind":"prom"#);
    std::fs::write(&journal, text).expect("tear the last line");

    let v = Veer::spawn(&cfg.path);
    let st = status(&c, &v).await;
    assert_eq!(st["phase"], "paused", "{st}");
    assert_eq!(kinds(&c, &v).await, ["started", "paused"]);
    assert_eq!(post(&c, v.admin, "/api/v1/routes/web/resume", &[]).await.status, 200);
    assert_eq!(kinds(&c, &v).await, ["started", "paused", "resumed"], "the next event lands on its own line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_dir_holds_but_serves_and_still_rolls_back() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::status(500, "boom").await;
    let body = format!("[state]\ndir = \"blocked/state\"\n\n{}", config(stable.addr, cand.addr, "100ms"));
    let cfg = ConfigFile::new(&body);
    std::fs::write(cfg.dir.path().join("blocked"), "a file where a directory should be").expect("block");
    let c = client();
    let v = Veer::spawn(&cfg.path);
    // The rollout cannot even record its start: it holds at 0% and stable serves.
    for _ in 0..20 {
        assert_eq!(get(&c, v.http, "/").await.text(), "stable");
    }
    let st = status(&c, &v).await;
    assert_eq!((st["phase"].as_str(), st["candidate_weight"].as_f64()), (Some("pending"), Some(0.0)));
    assert_eq!(cand.hits(), 0);
    // An operator's abort still takes effect, and the answer says it is not recorded.
    let aborted = post(&c, v.admin, "/api/v1/routes/web/abort", &[]).await;
    assert_eq!(aborted.status, 503, "{}", aborted.text());
    assert!(aborted.text().contains("applied, not recorded"), "{}", aborted.text());
    assert_eq!(status(&c, &v).await["phase"], "rolled_back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judges_evidence_survives_a_crash() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stable = Upstream::text("stable").await;
    // The candidate fails its first two requests only: evidence, but not enough to act on.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let cand = Upstream::start(move |_| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut r = http::Response::new(full("cand"));
            if n < 2 {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let cfg = ConfigFile::new(&fixture(stable.addr, cand.addr, "1h").steps("[50, 100]").toml());
    let c = client();
    let v = Veer::spawn(&cfg.path);
    let evidence = |st: &Value| st["judge"]["rules"][0]["ln_evidence"].as_f64();
    // The errors are weighed once a batch holds enough stable requests, however the split
    // falls; successes afterwards leave the evidence where it is.
    send_until(&c, v.http, 20_000, Duration::from_secs(30), "the judge has weighed the two errors", || async {
        evidence(&status(&c, &v).await).is_some_and(|e| e > 0.0)
    })
    .await;
    let state_file = cfg.dir.path().join("state").join("routes").join("web.json");
    eventually(Duration::from_secs(10), "the evidence is checkpointed", || async {
        let Ok(b) = std::fs::read(&state_file) else { return false };
        let rec: Value = serde_json::from_slice(&b).expect("state file is JSON");
        rec["judge"]["errors"]["ell"][0].as_f64().is_some_and(|e| e != 0.0)
    })
    .await;
    let before = evidence(&status(&c, &v).await).expect("evidence");
    kill(v);

    let v = Veer::spawn(&cfg.path);
    eventually(Duration::from_secs(10), "the restarted judge reports", || async {
        evidence(&status(&c, &v).await).is_some()
    })
    .await;
    let after = evidence(&status(&c, &v).await).expect("evidence");
    assert!((after - before).abs() < 1e-9, "evidence before the crash {before}, after {after}");
    assert_eq!(status(&c, &v).await["phase"], "progressing");
}
