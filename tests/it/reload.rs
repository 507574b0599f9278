//! Hot reload: valid changes apply under load without a failed request; invalid files change
//! nothing; rollout state survives when the candidate version is unchanged.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use veer::server::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_reload_under_load_fails_no_request() {
    let old = Upstream::text("old").await;
    let new = Upstream::text("new").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&route(old.addr, Some(cand.addr), "[10, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let addr = proxy.http_addr();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (c, stop, ok, failed) = (c.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let got = get(&c, addr, "/").await;
                    if got.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();

    eventually(Duration::from_secs(10), "load is flowing", || async { ok.load(Ordering::Relaxed) > 200 }).await;
    let before = route_status(&c, proxy.admin_addr(), "web").await["candidate"]["window"]["total_requests"]
        .as_u64()
        .expect("total");
    // Move stable to a new endpoint; the candidate version stays, so its rollout state stays.
    cfg.write(&route(new.addr, Some(cand.addr), "[10, 100]"));
    let summary = post(&c, proxy.admin_addr(), "/api/v1/reload", &[]).await;
    assert_eq!(summary.status, 200, "{}", summary.text());
    assert!(summary.text().contains("\"changed\""), "{}", summary.text());
    let at_reload = ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "traffic reaches the new stable endpoint", || async {
        new.hits() > 100 && ok.load(Ordering::Relaxed) > at_reload + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during reload");
    let st = route_status(&c, proxy.admin_addr(), "web").await;
    assert_eq!(st["candidate_weight"], 10.0);
    assert!(
        st["candidate"]["window"]["total_requests"].as_u64().expect("total") >= before,
        "candidate totals survived the reload"
    );
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_is_rejected_with_its_line_and_old_routes_keep_serving() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let good = std::fs::read_to_string(&cfg.path).expect("read");
    cfg.write_raw(&format!("{good}\n[routes.rollout]\nsteps = [50, 10]\n"));
    let line = good.lines().count() + 3;
    let got = post(&c, proxy.admin_addr(), "/api/v1/reload", &[]).await;
    assert_eq!(got.status, 400, "{}", got.text());
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
    let first = body["errors"][0].as_str().expect("errors listed");
    assert!(first.contains(&format!("veer.toml:{line}:")), "{first}");
    assert!(first.contains("routes[0].rollout.steps"), "{first}");
    let err = proxy.reload().await.expect_err("library reload is rejected too");
    assert!(err.to_string().contains("strictly increasing"), "{err}");
    assert_eq!(get(&c, proxy.http_addr(), "/").await.text(), "stable");
    assert_eq!(proxy.operations().snapshot().generation, 1, "nothing was published");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_candidate_version_starts_a_new_rollout() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), "[50, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    for _ in 0..20 {
        get(&c, proxy.http_addr(), "/").await;
    }
    // Each thread shard splits exactly, so the total is 10 ± 1: compare with what arrived.
    let hits = cand.hits() as u64;
    assert!((9..=11).contains(&hits), "{hits} of 20 at 50%");
    eventually(Duration::from_secs(5), "candidate traffic counted", || async {
        route_status(&c, proxy.admin_addr(), "web").await["candidate"]["window"]["total_requests"] == hits
    })
    .await;
    assert_eq!(post(&c, proxy.admin_addr(), "/api/v1/routes/web/promote", &[]).await.status, 200);
    cfg.write(&route(stable.addr, Some(cand.addr), "[50, 100]").replace("\"v2\"", "\"v3\""));
    let summary = proxy.reload().await.expect("reload");
    assert_eq!(summary.new_rollouts, ["web"]);
    eventually(Duration::from_secs(5), "the new rollout starts at its first step", || async {
        let st = route_status(&c, proxy.admin_addr(), "web").await;
        st["candidate"]["version"] == "v3" && st["phase"] == "progressing" && st["candidate_weight"] == 50.0
    })
    .await;
    let st = route_status(&c, proxy.admin_addr(), "web").await;
    assert_eq!(st["candidate"]["window"]["total_requests"], 0, "measurements start afresh");
    proxy.drain().await;
}
