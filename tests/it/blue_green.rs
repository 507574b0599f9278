//! Blue-green rollouts end to end through real sockets: preview on mirrored traffic, the
//! switch to 100%, the bake judged against stable's answers to mirrored copies (or, without
//! them, against stable from before the switch), and the `mirror_mismatch` rule.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::{Method, Response, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;
use veer::server::Proxy;

/// A blue-green route `web` with 100% mirroring and fast phases; `extra` is appended.
fn blue_green(stable: SocketAddr, cand: SocketAddr, preview: &str, bake: &str, extra: &str) -> String {
    let route = RouteFixture::new(stable, cand)
        .steps("[100]")
        .rollout_key("strategy", "\"blue-green\"")
        .rollout_key("preview", &format!("\"{preview}\""))
        .rollout_key("bake", &format!("\"{bake}\""))
        .min_requests(5)
        .rollback("5s", "50ms")
        .append(&format!("\n[routes.mirror]\npercent = 100\n{extra}"));
    format!("{}{}", listeners("expose_role_header = true", ""), route.toml())
}

/// `workers` clients sending GETs, each pausing `gap` between requests, until `stop` is set or
/// `limit` passes. Counts the answers that did not come from stable.
fn load(
    addr: SocketAddr,
    workers: usize,
    gap: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicUsize>, Vec<JoinHandle<()>>) {
    let not_stable = Arc::new(AtomicUsize::new(0));
    let handles = (0..workers)
        .map(|_| {
            let (stop, not_stable, c) = (stop.clone(), not_stable.clone(), client());
            tokio::spawn(async move {
                let deadline = Instant::now() + limit;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let got = get(&c, addr, "/").await;
                    if got.headers.get("x-veer-role").is_none_or(|r| r != "stable") {
                        not_stable.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(gap).await;
                }
            })
        })
        .collect();
    (not_stable, handles)
}

async fn finish(stop: &AtomicBool, loops: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
}

async fn status(c: &HttpClient, proxy: &Proxy) -> Value {
    route_status(c, proxy.admin_addr(), "web").await
}

async fn events(c: &HttpClient, proxy: &Proxy) -> Vec<Value> {
    let got = get(c, proxy.admin_addr(), "/api/v1/events?route=web").await;
    serde_json::from_slice::<Vec<Value>>(&got.body).expect("events JSON")
}

fn kinds(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
}

/// An upstream answering `body` with 200, or 500 once `fail` is set; counts the requests that
/// are not GETs (never mirrored, so only ordinary traffic reaches it with them).
async fn candidate(fail: Arc<AtomicBool>, body: &'static str, not_get: Arc<AtomicUsize>) -> Upstream {
    Upstream::start(move |req| {
        if req.method() != Method::GET {
            not_get.fetch_add(1, Ordering::Relaxed);
        }
        let fail = fail.load(Ordering::Relaxed);
        async move {
            let mut r = Response::new(full(if fail { "boom" } else { body }));
            if fail {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_candidate_is_previewed_switched_baked_and_promoted() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "300ms", "300ms", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loops) = load(proxy.http_addr(), 4, Duration::from_millis(2), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(20), "the candidate is promoted", || async {
        status(&c, &proxy).await["phase"] == "promoted"
    })
    .await;
    finish(&stop, loops).await;

    let evs = events(&c, &proxy).await;
    assert_eq!(kinds(&evs), ["started", "step", "promoted"], "{evs:?}");
    let path: Vec<(&str, f64)> =
        evs.iter().map(|e| (e["to"].as_str().unwrap_or(""), e["candidate_weight"].as_f64().unwrap_or(-1.0))).collect();
    assert_eq!(path, [("preview", 0.0), ("baking", 100.0), ("promoted", 100.0)]);
    let switch = &evs[1];
    assert_eq!(switch["from"], "preview");
    assert!(switch["reason"].as_str().is_some_and(|r| r.contains("mirrored")), "{switch}");
    let baseline = &switch["evidence"]["baseline"];
    assert!(baseline["requests"].as_u64().is_some_and(|n| n > 0), "stable's window is frozen at the switch: {switch}");
    assert_eq!(baseline["errors"], 0);

    let st = status(&c, &proxy).await;
    assert_eq!(st["candidate_weight"], 100.0);
    let before = cand.hits();
    for _ in 0..10 {
        assert_eq!(get(&c, proxy.http_addr(), "/").await.text(), "cand");
    }
    assert_eq!(cand.hits(), before + 10);
    proxy.drain().await;
}

/// An upstream answering `body` after sleeping `delay_ms` (shared, so both versions can slow
/// down together).
async fn delayed(body: &'static str, delay_ms: Arc<AtomicU64>) -> Upstream {
    Upstream::start(move |_req| {
        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Response::new(full(body))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_versions_slowing_down_together_at_the_switch_do_not_roll_back_a_healthy_candidate() {
    // The same server twice; at the switch both get 25 ms slower, as when the machine gets
    // loaded or a shared dependency slows down. Judged against stable from before the switch,
    // the candidate's latency looks many times worse.
    let delay_ms = Arc::new(AtomicU64::new(0));
    let stable = delayed("stable", delay_ms.clone()).await;
    let cand = delayed("cand", delay_ms.clone()).await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "500ms", "3s", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loops) = load(proxy.http_addr(), 4, Duration::from_millis(2), Duration::from_secs(40), stop.clone());
    eventually(Duration::from_secs(20), "the candidate bakes at 100%", || async {
        status(&c, &proxy).await["phase"] != "preview"
    })
    .await;
    delay_ms.store(25, Ordering::Relaxed);
    let at_shift = stable.hits();
    let st = status(&c, &proxy).await;
    assert_eq!(st["phase"], "baking", "switched, not rolled back: {st}");
    eventually(Duration::from_secs(30), "the bake ends", || async { status(&c, &proxy).await["phase"] != "baking" })
        .await;
    finish(&stop, loops).await;

    let st = status(&c, &proxy).await;
    assert_eq!(st["phase"], "promoted", "a healthy candidate in a slower environment: {st}");
    let evs = events(&c, &proxy).await;
    assert_eq!(kinds(&evs), ["started", "step", "promoted"], "{evs:?}");
    assert!(stable.hits() > at_shift + 20, "stable answered copies of the candidate's requests during the bake");
    let latency = st["judge"]["rules"].as_array().and_then(|r| r.iter().find(|r| r["rule"] == "latency")).cloned();
    let latency = latency.expect("the latency rule is armed");
    // Against stable's concurrent answers the two are about as fast; against stable from
    // before the switch the candidate would read dozens of times slower.
    assert!(latency["candidate"].as_f64().is_some_and(|r| r < 3.0), "latency ratio read the copies: {latency}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_during_the_bake_is_snapped_back_within_a_second() {
    let stable = Upstream::text("stable").await;
    let fail = Arc::new(AtomicBool::new(false));
    let cand = candidate(fail.clone(), "cand", Arc::default()).await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "300ms", "1h", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    // About 200 requests per second: 2 clients, one request every ~10 ms each.
    let (_, loops) = load(proxy.http_addr(), 2, Duration::from_millis(10), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(15), "the candidate bakes at 100%", || async {
        let st = status(&c, &proxy).await;
        st["phase"] == "baking" && st["candidate_weight"] == 100.0
    })
    .await;
    let at_switch = cand.hits();
    eventually(Duration::from_secs(10), "the candidate serves ordinary traffic", || async {
        cand.hits() > at_switch + 20
    })
    .await;
    let st = status(&c, &proxy).await;
    assert_eq!(st["phase"], "baking", "a healthy bake holds for an hour: {st}");
    let err = st["judge"]["rules"].as_array().and_then(|r| r.iter().find(|r| r["rule"] == "error_rate")).cloned();
    let err = err.expect("the error rule stays armed while baking");
    assert!(err["note"].is_null(), "judged against the baseline, not resting: {err}");
    assert!(err["stable_requests"].as_u64().is_some_and(|n| n > 0), "{err}");

    fail.store(true, Ordering::Relaxed);
    let flipped = Instant::now();
    let took = loop {
        if status(&c, &proxy).await["candidate_weight"] == 0.0 {
            break flipped.elapsed();
        }
        assert!(flipped.elapsed() < Duration::from_secs(5), "the candidate weight never read 0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(took < Duration::from_secs(1), "snap back took {took:?}");

    let hits_after = cand.hits();
    for _ in 0..20 {
        let got = get(&c, proxy.http_addr(), "/").await;
        assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "stable"));
    }
    finish(&stop, loops).await;
    assert!(cand.hits() <= hits_after + 2, "only requests already in flight may still reach it");
    let st = status(&c, &proxy).await;
    assert_eq!(st["phase"], "rolled_back");
    assert_eq!(st["rollback"]["rule"], "error_rate", "{st}");
    assert_eq!(st["last_transition"]["from"], "baking", "{st}");
    let evs = events(&c, &proxy).await;
    assert_eq!(kinds(&evs), ["started", "step", "rolled_back"]);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_failing_on_mirrored_traffic_never_gets_ordinary_traffic() {
    let stable = Upstream::text("stable").await;
    let not_get = Arc::new(AtomicUsize::new(0));
    let cand = candidate(Arc::new(AtomicBool::new(true)), "cand", not_get.clone()).await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "300ms", "300ms", "max_mismatch_rate = 0.05\n"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (not_stable, loops) =
        load(proxy.http_addr(), 2, Duration::from_millis(5), Duration::from_secs(30), stop.clone());
    // POSTs are never mirrored: if one reached the candidate, the switch happened.
    let mut posts = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&c, &proxy).await["phase"] != "rolled_back" {
        assert!(Instant::now() < deadline, "the failing preview was never rolled back");
        let got = post(&c, proxy.http_addr(), "/", &[]).await;
        assert_eq!((got.status.as_u16(), got.text().as_str()), (200, "stable"));
        posts += 1;
    }
    // Let the load run on past the preview's time: the candidate must stay switched off.
    let now_hits = cand.hits();
    for _ in 0..20 {
        let got = post(&c, proxy.http_addr(), "/", &[]).await;
        assert_eq!(got.headers["x-veer-role"], "stable");
        posts += 1;
    }
    finish(&stop, loops).await;
    assert!(posts > 20);
    assert_eq!(not_get.load(Ordering::Relaxed), 0, "the candidate received ordinary traffic");
    assert_eq!(not_stable.load(Ordering::Relaxed), 0, "a client was answered by the candidate");
    assert!(cand.hits() >= 3, "mirrored copies reached the candidate");
    assert!(cand.hits() <= now_hits + 2, "only copies already in flight may still reach it");

    let st = status(&c, &proxy).await;
    assert_eq!(st["candidate_weight"], 0.0);
    assert_eq!(st["candidate"]["window"]["total_requests"], 0, "no judged ordinary traffic: {st}");
    assert_eq!(st["last_transition"]["from"], "preview", "{st}");
    let rule = st["rollback"]["rule"].as_str().unwrap_or("");
    assert!(["error_rate", "mirror_mismatch"].contains(&rule), "{st}");
    assert_eq!(st["rollback"]["evidence"]["candidate"]["traffic"], "mirrored", "{st}");
    let evs = events(&c, &proxy).await;
    assert_eq!(kinds(&evs), ["started", "rolled_back"], "never switched: {evs:?}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_differ_from_stable_trip_the_mirror_mismatch_rule() {
    let stable = Upstream::text("stable").await;
    // 404 is the client's problem, not an error: only the comparison with stable catches it.
    let cand = Upstream::status(404, "gone").await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "1h", "1h", "max_mismatch_rate = 0.05\n"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (not_stable, loops) =
        load(proxy.http_addr(), 2, Duration::from_millis(5), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(15), "the mismatching candidate is rolled back", || async {
        status(&c, &proxy).await["phase"] == "rolled_back"
    })
    .await;
    finish(&stop, loops).await;
    assert_eq!(not_stable.load(Ordering::Relaxed), 0);
    let st = status(&c, &proxy).await;
    assert_eq!(st["rollback"]["rule"], "mirror_mismatch", "{st}");
    let rules = st["judge"]["rules"].as_array().expect("rules");
    let mismatch = rules.iter().find(|r| r["rule"] == "mirror_mismatch").expect("the rule is reported");
    assert_eq!(mismatch["state"], "fired", "{mismatch}");
    assert_eq!(mismatch["stable"], 0.05);
    let error = rules.iter().find(|r| r["rule"] == "error_rate").expect("error rule");
    assert_ne!(error["state"], "fired", "a 404 is not an error: {error}");
    let metrics = get(&c, proxy.admin_addr(), "/metrics").await.text();
    assert!(metrics.contains(r#"veer_judge_log_evidence{route="web",rule="mirror_mismatch"}"#), "{metrics}");
    assert!(metrics.contains(r#"veer_rollbacks_total{route="web",rule="mirror_mismatch"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"veer_rollout_phase{route="web",phase="preview"} 0"#), "{metrics}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_bake_keeps_baking_against_the_same_baseline() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&blue_green(stable.addr, cand.addr, "300ms", "1h", ""));
    let c = client();
    let mut v = Veer::spawn(&cfg.path);
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loops) = load(v.http, 2, Duration::from_millis(5), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(15), "the candidate bakes", || async {
        route_status(&c, v.admin, "web").await["phase"] == "baking"
    })
    .await;
    finish(&stop, loops).await;
    let got = get(&c, v.admin, "/api/v1/events?route=web").await;
    let evs: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    let baseline = evs.iter().find(|e| e["to"] == "baking").expect("the switch")["evidence"]["baseline"].clone();
    let frozen = baseline["requests"].as_u64().expect("baseline requests");
    v.signal("KILL");
    assert!(!v.wait_exit(Duration::from_secs(10)).success(), "killed, not exited");

    let v = Veer::spawn(&cfg.path);
    let st = route_status(&c, v.admin, "web").await;
    assert_eq!((st["phase"].as_str(), st["candidate_weight"].as_f64()), (Some("baking"), Some(100.0)), "{st}");
    // Stable's window is empty after the restart; the rules still read the frozen baseline.
    eventually(Duration::from_secs(10), "the bake is judged against the recorded baseline", || async {
        let st = route_status(&c, v.admin, "web").await;
        let rules = st["judge"]["rules"].as_array().cloned().unwrap_or_default();
        rules.iter().any(|r| r["rule"] == "error_rate" && r["stable_requests"] == frozen && r["note"].is_null())
    })
    .await;
    assert_eq!(st["stable"]["window"]["requests"], 0);
    for _ in 0..5 {
        assert_eq!(get(&c, v.http, "/").await.text(), "cand");
    }
}
