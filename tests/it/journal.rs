//! The journal under a broken state dir and at size, with the binary as a subprocess: a
//! rollback that cannot be recorded survives a restart and is recorded once the dir works
//! again; a large journal does not slow the proxy down.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

fn config(stable: SocketAddr, cand: SocketAddr, extra: &str) -> String {
    RouteFixture::new(stable, cand)
        .steps("[50, 100]")
        .step_interval("1h")
        .min_requests(0)
        .rollback("5s", "50ms")
        .append(extra)
        .toml()
}

fn kill(mut v: Veer) {
    v.signal("KILL");
    assert!(!v.wait_exit(Duration::from_secs(10)).success(), "killed, not exited");
}

/// Makes the journal and the state files unwritable, for root too: a directory where
/// `events.jsonl` is, a file where `routes/` is. Only the pre-allocated rollback marker works.
fn break_state(state: &Path) {
    let events = state.join("events.jsonl");
    let _ = std::fs::remove_file(&events);
    std::fs::create_dir(&events).expect("a directory in place of the journal");
    let routes = state.join("routes");
    let _ = std::fs::remove_dir_all(&routes);
    std::fs::write(&routes, "a file where a directory should be").expect("block routes/");
}

fn repair_state(state: &Path) {
    std::fs::remove_dir(state.join("events.jsonl")).expect("unblock the journal");
    std::fs::remove_file(state.join("routes")).expect("unblock routes/");
}

async fn kinds(c: &HttpClient, admin: SocketAddr) -> Vec<String> {
    let got = get(c, admin, "/api/v1/events?route=web").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    events.iter().map(|e| e["kind"].as_str().unwrap_or("?").to_string()).collect()
}

/// The value of the `name{route="web"}` sample, if exported.
async fn metric(c: &HttpClient, admin: SocketAddr, name: &str) -> Option<f64> {
    let text = get(c, admin, "/metrics").await.text();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("route=\"web\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn assert_rolled_back_and_stable_only(c: &HttpClient, v: &Veer, cand: &Upstream) {
    let st = route_status(c, v.admin, "web").await;
    assert_eq!((st["phase"].as_str(), st["candidate_weight"].as_f64()), (Some("rolled_back"), Some(0.0)), "{st}");
    let before = cand.hits();
    for _ in 0..50 {
        assert_eq!(get(c, v.http, "/").await.text(), "stable");
    }
    assert_eq!(cand.hits(), before, "a rolled-back candidate gets no ordinary traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecordable_abort_survives_a_restart_and_is_recorded_once_the_dir_works() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, ""));
    let state = cfg.dir.path().join("state");
    let c = client();
    let v = Veer::spawn(&cfg.path);
    eventually(Duration::from_secs(10), "the rollout starts at 50%", || async {
        route_status(&c, v.admin, "web").await["candidate_weight"] == 50.0
    })
    .await;
    break_state(&state);

    let body = r#"{"reason":"bad build"}"#;
    let req = http::Request::post(format!("http://{}/api/v1/routes/web/abort", v.admin))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let got = send(&c, req).await;
    assert_eq!(got.status, 503, "{}", got.text());
    let answer: Value = serde_json::from_slice(&got.body).expect("JSON");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("applied, not recorded")), "{answer}");
    assert_eq!(answer["applied"], true);
    assert_eq!(answer["status"]["phase"], "rolled_back");
    assert_rolled_back_and_stable_only(&c, &v, &cand).await;
    let st = route_status(&c, v.admin, "web").await;
    assert_eq!(st["journal_pending"]["kind"], "rolled_back", "{st}");
    let ready = get(&c, v.admin, "/readyz").await;
    assert_eq!(ready.status, 200, "traffic is right; readiness holds");
    assert!(ready.text().contains("route web has an unrecorded rolled_back"), "{}", ready.text());
    assert_eq!(metric(&c, v.admin, "veer_journal_pending").await, Some(1.0));
    assert!(metric(&c, v.admin, "veer_journal_write_failures_total").await.is_some_and(|n| n >= 1.0));
    kill(v);

    // Restarted with the dir still broken: the marker alone keeps the candidate at 0%.
    let v = Veer::spawn(&cfg.path);
    assert_rolled_back_and_stable_only(&c, &v, &cand).await;
    let st = route_status(&c, v.admin, "web").await;
    assert_eq!(st["journal_pending"]["kind"], "rolled_back", "still unrecorded: {st}");
    assert_eq!(st["rollback"]["rule"], "manual", "{st}");
    assert_eq!(st["last_transition"]["reason"], "bad build", "{st}");

    // The dir works again: a later tick records the rollback.
    repair_state(&state);
    eventually(Duration::from_secs(10), "the pending rollback is recorded", || async {
        kinds(&c, v.admin).await == ["rolled_back"]
    })
    .await;
    eventually(Duration::from_secs(10), "nothing is pending anymore", || async {
        route_status(&c, v.admin, "web").await.get("journal_pending").is_none()
    })
    .await;
    assert_eq!(metric(&c, v.admin, "veer_journal_pending").await, Some(0.0));
    assert_eq!(get(&c, v.admin, "/readyz").await.text(), "ready\n");
    kill(v);

    // And from the journal alone, it stays rolled back.
    let v = Veer::spawn(&cfg.path);
    assert_rolled_back_and_stable_only(&c, &v, &cand).await;
    assert!(route_status(&c, v.admin, "web").await.get("journal_pending").is_none());
    assert_eq!(kinds(&c, v.admin).await, ["rolled_back"], "recorded once, not again on each start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judges_rollback_under_a_broken_journal_survives_a_restart() {
    let stable = Upstream::text("stable").await;
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let cand = Upstream::start(move |_| {
        let ok = flag.load(Ordering::Relaxed);
        async move {
            let mut r = http::Response::new(full("cand"));
            if !ok {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, "max_error_rate = 0.05\n"));
    let state = cfg.dir.path().join("state");
    let c = client();
    let v = Veer::spawn(&cfg.path);
    eventually(Duration::from_secs(10), "the rollout starts at 50%", || async {
        route_status(&c, v.admin, "web").await["candidate_weight"] == 50.0
    })
    .await;
    break_state(&state);
    healthy.store(false, Ordering::Relaxed);
    eventually(Duration::from_secs(20), "the judge rolls the failing candidate back", || async {
        for _ in 0..10 {
            get(&c, v.http, "/").await;
        }
        route_status(&c, v.admin, "web").await["phase"] == "rolled_back"
    })
    .await;
    let st = route_status(&c, v.admin, "web").await;
    assert_eq!(st["journal_pending"]["kind"], "rolled_back", "{st}");
    assert_eq!(metric(&c, v.admin, "veer_journal_pending").await, Some(1.0));
    kill(v);

    healthy.store(true, Ordering::Relaxed);
    let v = Veer::spawn(&cfg.path);
    assert_rolled_back_and_stable_only(&c, &v, &cand).await;
    let rule = route_status(&c, v.admin, "web").await["rollback"]["rule"].clone();
    assert!(rule.as_str().is_some_and(|r| r != "manual"), "the judge's rule is kept: {rule}");
}

/// Writes a journal of about `bytes` bytes of events of route `web` (candidate `v2`).
fn large_journal(state: &Path, bytes: usize) {
    std::fs::create_dir_all(state).expect("state dir");
    let mut out = std::io::BufWriter::new(std::fs::File::create(state.join("events.jsonl")).expect("journal"));
    let pad = "r".repeat(800);
    let mut written = 0;
    let mut n = 0u64;
    while written < bytes {
        let line = format!(
            "{{\"at\":\"2026-11-01T00:00:00.000Z\",\"route\":\"web\",\"kind\":\"reloaded\",\"from\":\"paused\",\"to\":\"paused\",\"candidate_weight\":50.0,\"reason\":\"reload {n} {pad}\",\"evidence\":null,\"step\":0,\"candidate_version\":\"v2\",\"stable_version\":\"v1\"}}\n"
        );
        std::io::Write::write_all(&mut out, line.as_bytes()).expect("write");
        written += line.len();
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_pollers_of_a_20mb_journal_do_not_slow_the_proxy_or_bloat_it() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&config(stable.addr, cand.addr, ""));
    large_journal(&cfg.dir.path().join("state"), 20 * 1024 * 1024);
    let c = client();
    let v = Veer::spawn(&cfg.path);
    // Recovered from the tail: the journal's last event says paused at step 0.
    let st = route_status(&c, v.admin, "web").await;
    assert_eq!((st["phase"].as_str(), st["candidate_weight"].as_f64()), (Some("paused"), Some(50.0)), "{st}");
    let rss_before = v.peak_rss();

    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let pollers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, polls, c, admin) = (stop.clone(), polls.clone(), client(), v.admin);
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let got = get(&c, admin, "/api/v1/events?limit=1").await;
                    assert_eq!(got.status, 200);
                    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
                    assert_eq!(events.len(), 1);
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The proxy keeps answering while the pollers run; every answer within the 10 s of `get`.
    for _ in 0..200 {
        assert_eq!(get(&c, v.http, "/").await.status, 200);
    }
    eventually(Duration::from_secs(30), "the pollers got answers", || async { polls.load(Ordering::Relaxed) >= 80 })
        .await;
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.await.expect("poller");
    }
    // Reading the whole journal per poll took hundreds of MB; the tail costs a few chunks.
    let grown = v.peak_rss().saturating_sub(rss_before);
    assert!(grown < 64 * 1024 * 1024, "peak RSS grew by {} MB", grown / (1024 * 1024));
    // The report reads back to the rollout's start only, and a report still renders.
    let report = get(&c, v.admin, "/api/v1/routes/web/report").await;
    assert_eq!(report.status, 200);
}
