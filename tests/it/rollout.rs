//! The rollout brain end to end through real sockets: promotion, snap back on errors and on
//! latency, operator commands, token auth, webhooks and the report.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::Response;
use serde_json::Value;
use tokio::task::JoinHandle;
use veer::server::Proxy;

/// A route `web` whose rollout moves fast enough for a test.
fn fast_route(
    stable: std::net::SocketAddr,
    cand: std::net::SocketAddr,
    steps: &str,
    interval: &str,
    extra: &str,
) -> String {
    RouteFixture::new(stable, cand)
        .steps(steps)
        .step_interval(interval)
        .min_requests(20)
        .rollback("5s", "50ms")
        .append(extra)
        .toml()
}

/// A bounded load loop: `workers` clients, each pausing `gap` between requests, until
/// `stop` is set or `limit` passes.
fn load(
    addr: std::net::SocketAddr,
    workers: usize,
    gap: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicUsize>, Vec<JoinHandle<()>>) {
    let sent = Arc::new(AtomicUsize::new(0));
    let handles = (0..workers)
        .map(|_| {
            let (stop, sent, c) = (stop.clone(), sent.clone(), client());
            tokio::spawn(async move {
                let deadline = Instant::now() + limit;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    get(&c, addr, "/").await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(gap).await;
                }
            })
        })
        .collect();
    (sent, handles)
}

async fn phase(c: &HttpClient, admin: std::net::SocketAddr) -> Value {
    route_status(c, admin, "web").await
}

async fn events(c: &HttpClient, admin: std::net::SocketAddr) -> Vec<Value> {
    let got = get(c, admin, "/api/v1/events?route=web").await;
    serde_json::from_slice::<Vec<Value>>(&got.body).expect("events JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_candidate_walks_every_step_and_is_promoted() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&fast_route(stable.addr, cand.addr, "[10, 50, 100]", "300ms", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loops) = load(proxy.http_addr(), 4, Duration::from_millis(2), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(30), "the candidate is promoted", || async {
        phase(&c, proxy.admin_addr()).await["phase"] == "promoted"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
    let st = phase(&c, proxy.admin_addr()).await;
    assert_eq!(st["candidate_weight"], 100.0);
    let kinds: Vec<String> =
        events(&c, proxy.admin_addr()).await.iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(kinds, ["started", "step", "step", "promoted"]);
    let weights: Vec<f64> =
        events(&c, proxy.admin_addr()).await.iter().map(|e| e["candidate_weight"].as_f64().unwrap_or(-1.0)).collect();
    assert_eq!(weights, [10.0, 50.0, 100.0, 100.0]);
    let before = cand.hits();
    for _ in 0..20 {
        assert_eq!(get(&c, proxy.http_addr(), "/").await.text(), "cand");
    }
    assert_eq!(cand.hits(), before + 20);
    proxy.drain().await;
}

/// An upstream that answers 200 until `fail` is set, then 500.
async fn flipping(fail: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |_| {
        let fail = fail.load(Ordering::Relaxed);
        async move {
            let mut r = Response::new(full(if fail { "boom" } else { "cand" }));
            if fail {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_starts_failing_is_snapped_back_within_a_second() {
    let stable = Upstream::text("stable").await;
    let fail = Arc::new(AtomicBool::new(false));
    let cand = flipping(fail.clone()).await;
    let cfg = ConfigFile::new(&fast_route(stable.addr, cand.addr, "[10, 100]", "1h", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    // About 200 requests per second: 2 clients, one request every ~10 ms each.
    let (_, loops) = load(proxy.http_addr(), 2, Duration::from_millis(10), Duration::from_secs(20), stop.clone());
    eventually(Duration::from_secs(10), "healthy candidate traffic", || async { cand.hits() > 20 }).await;
    assert_eq!(phase(&c, proxy.admin_addr()).await["phase"], "progressing");

    fail.store(true, Ordering::Relaxed);
    let flipped = Instant::now();
    let took = loop {
        if phase(&c, proxy.admin_addr()).await["candidate_weight"] == 0.0 {
            break flipped.elapsed();
        }
        assert!(flipped.elapsed() < Duration::from_secs(5), "the candidate weight never read 0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(took < Duration::from_secs(1), "snap back took {took:?}");

    let hits_after = cand.hits();
    tokio::time::sleep(Duration::from_millis(300)).await; // let the load run on: nothing may reach the candidate
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
    assert!(cand.hits() <= hits_after + 2, "only requests already in flight may still reach it");
    let st = phase(&c, proxy.admin_addr()).await;
    assert_eq!(st["phase"], "rolled_back");
    assert_eq!(st["rollback"]["rule"], "error_rate");
    assert!(st["rollback"]["evidence"]["candidate"]["window"]["errors"].as_u64().expect("errors") >= 3);
    let metrics = get(&c, proxy.admin_addr(), "/metrics").await.text();
    assert!(metrics.contains(r#"veer_rollbacks_total{route="web",rule="error_rate"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"veer_rollout_phase{route="web",phase="rolled_back"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"veer_judge_log_evidence{route="web",rule="error_rate"}"#), "{metrics}");

    let report = get(&c, proxy.admin_addr(), "/api/v1/routes/web/report").await;
    assert_eq!(report.headers["content-type"], "text/markdown; charset=utf-8");
    let text = report.text();
    for needle in [
        "# Rollout report: web",
        "## Incident",
        "rule `error_rate` tripped",
        "## Root-cause signal",
        "## Resolution",
        "Automatic rollback at",
        "## Impact",
        "## Timeline",
        "| rolled_back |",
    ] {
        assert!(text.contains(needle), "report lacks {needle:?}:\n{text}");
    }
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_200ms_slower_is_rolled_back() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Response::new(full("slow"))
    })
    .await;
    let cfg = ConfigFile::new(&fast_route(stable.addr, cand.addr, "[20, 100]", "1h", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (_, loops) = load(proxy.http_addr(), 8, Duration::from_millis(5), Duration::from_secs(30), stop.clone());
    eventually(Duration::from_secs(25), "the slow candidate is rolled back", || async {
        phase(&c, proxy.admin_addr()).await["phase"] == "rolled_back"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
    let st = phase(&c, proxy.admin_addr()).await;
    assert_eq!(st["rollback"]["rule"], "latency", "{st}");
    assert_eq!(st["candidate_weight"], 0.0);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_and_refusals() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&fast_route(stable.addr, cand.addr, "[10, 50, 100]", "1h", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    let cmd = |verb: &str| format!("/api/v1/routes/web/{verb}");
    let expect = |got: Got, status: u16, phase: &str| {
        assert_eq!(got.status, status, "{}", got.text());
        let v: Value = serde_json::from_slice(&got.body).expect("json");
        if status == 200 {
            assert_eq!(v["phase"], phase, "{v}");
        } else {
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        }
        v
    };
    expect(post(&c, admin, &cmd("pause"), &[]).await, 200, "paused");
    expect(post(&c, admin, &cmd("pause"), &[]).await, 409, "");
    expect(post(&c, admin, &cmd("retry"), &[]).await, 409, "");
    expect(post(&c, admin, &cmd("resume"), &[]).await, 200, "progressing");
    let promoted = expect(post(&c, admin, &cmd("promote"), &[]).await, 200, "promoted");
    assert_eq!(promoted["candidate_weight"], 100.0);
    expect(post(&c, admin, &cmd("promote"), &[]).await, 409, "");
    let req = http::Request::post(format!("http://{admin}{}", cmd("abort")))
        .body(r#"{"reason":"bad deploy"}"#.into())
        .expect("req");
    let aborted = expect(send(&c, req).await, 200, "rolled_back");
    assert_eq!(aborted["candidate_weight"], 0.0);
    assert_eq!(aborted["rollback"]["rule"], "manual");
    assert_eq!(aborted["last_transition"]["reason"], "bad deploy");
    expect(post(&c, admin, &cmd("abort"), &[]).await, 409, "");
    let refused = expect(post(&c, admin, &cmd("promote"), &[]).await, 409, "");
    assert!(refused["error"].as_str().expect("error").contains("retry"), "{refused}");
    let hits = cand.hits();
    for _ in 0..30 {
        assert_eq!(get(&c, proxy.http_addr(), "/").await.text(), "stable");
    }
    assert_eq!(cand.hits(), hits, "a rolled-back candidate gets no traffic");
    let retried = expect(post(&c, admin, &cmd("retry"), &[]).await, 200, "progressing");
    assert_eq!((retried["step"].as_u64(), retried["candidate_weight"].as_f64()), (Some(0), Some(10.0)));
    assert_eq!(post(&c, admin, "/api/v1/routes/nope/pause", &[]).await.status, 404);
    assert_eq!(post(&c, admin, &cmd("explode"), &[]).await.status, 404);
    let kinds: Vec<String> =
        events(&c, admin).await.iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(kinds, ["started", "paused", "resumed", "promoted", "rolled_back", "retried"]);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_need_the_token_when_one_is_configured() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let body = with_listeners(&fast_route(stable.addr, cand.addr, "[10, 100]", "1h", ""))
        .replace("[admin]\nlisten = \"127.0.0.1:0\"", "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"t\"");
    assert!(body.contains("token_file"));
    let cfg = ConfigFile::new(&body);
    std::fs::write(cfg.dir.path().join("t"), "tok\n").expect("token");
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    assert_eq!(post(&c, admin, "/api/v1/routes/web/pause", &[]).await.status, 401);
    assert_eq!(post(&c, admin, "/api/v1/routes/web/pause", &[("authorization", "Bearer tok2")]).await.status, 401);
    assert_eq!(post(&c, admin, "/api/v1/routes/web/pause", &[("authorization", "Bearer tok")]).await.status, 200);
    assert_eq!(phase(&c, admin).await["phase"], "paused");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receives_the_rollback_with_its_evidence() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let hook = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            use http_body_util::BodyExt;
            let body = req.into_body().collect().await.expect("hook body").to_bytes();
            let _ = tx.send(serde_json::from_slice(&body).expect("event JSON"));
            Response::new(full("ok"))
        }
    })
    .await;
    let stable = Upstream::text("stable").await;
    let cand = Upstream::status(500, "boom").await;
    let hooks = format!("\n[[notify]]\nurl = \"http://{}/hooks/veer\"\nevents = [\"rolled_back\"]\n", hook.addr);
    let cfg = ConfigFile::new(&(fast_route(stable.addr, cand.addr, "[50, 100]", "1h", "") + &hooks));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    send_until(
        &c,
        proxy.http_addr(),
        20_000,
        Duration::from_secs(30),
        "the failing candidate is rolled back",
        || async { phase(&c, proxy.admin_addr()).await["phase"] == "rolled_back" },
    )
    .await;
    let event =
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("webhook within 10 s").expect("an event");
    assert_eq!(event["kind"], "rolled_back");
    assert_eq!(event["route"], "web");
    assert_eq!(event["to"], "rolled_back");
    assert_eq!(event["candidate_weight"], 0.0);
    assert_eq!(event["evidence"]["rule"], "error_rate");
    assert!(event["evidence"]["judge"]["rules"].as_array().is_some_and(|r| !r.is_empty()), "{event}");
    assert!(event["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_commands_are_refused() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&fast_route(stable.addr, cand.addr, "[10, 100]", "1h", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    let evil = post(&c, admin, "/api/v1/routes/web/abort", &[("origin", "http://evil.example")]).await;
    assert_eq!(evil.status, 403, "{}", evil.text());
    assert_eq!(phase(&c, admin).await["phase"], "progressing");
    let own = format!("http://{admin}");
    assert_eq!(
        post(&c, admin, "/api/v1/routes/web/pause", &[("origin", &own)]).await.status,
        200,
        "the dashboard's own origin is fine"
    );
    proxy.drain().await;
}
