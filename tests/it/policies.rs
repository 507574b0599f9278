//! Traffic policies end to end: override header, sticky users, retry on stable, mirroring,
//! and a candidate without endpoints.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use veer::server::Proxy;

fn policy_route(stable: std::net::SocketAddr, cand: std::net::SocketAddr, steps: &str, extra: &str) -> String {
    RouteFixture::new(stable, cand)
        .steps(steps)
        .step_interval("1h")
        .min_requests(10)
        .rollback("10s", "50ms")
        .append(extra)
        .toml()
}

async fn send_with(c: &HttpClient, addr: std::net::SocketAddr, method: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = http::Request::builder().method(method).uri(format!("http://{addr}/"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(c, b.body(Default::default()).expect("request")).await
}

/// Sends GETs, `gap` apart, until the route is rolled back (at most 20,000 or 15 s); returns
/// (sent, errors).
async fn until_rolled_back(c: &HttpClient, proxy: &Proxy, stable_body: &str, gap: Duration) -> (u32, u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut sent, mut errors) = (0, 0);
    while sent < 20_000 && std::time::Instant::now() < deadline {
        let got = get(c, proxy.http_addr(), "/").await;
        sent += 1;
        errors += u32::from(got.status != 200 || got.text() != stable_body);
        if !gap.is_zero() {
            // Pacing the load, not waiting for anything.
            tokio::time::sleep(gap).await;
        }
        if sent % 10 == 0 && route_status(c, proxy.admin_addr(), "web").await["phase"] == "rolled_back" {
            break;
        }
    }
    (sent, errors)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_override_header_reaches_the_candidate_at_zero_weight_and_is_not_judged() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&policy_route(
        stable.addr,
        cand.addr,
        "[10, 100]",
        "\n[routes.override]\nheader = \"x-veer-version\"\n",
    ));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    assert_eq!(post(&c, admin, "/api/v1/routes/web/abort", &[]).await.status, 200);
    assert_eq!(route_status(&c, admin, "web").await["candidate_weight"], 0.0);
    for _ in 0..10 {
        assert_eq!(send_with(&c, proxy.http_addr(), "GET", &[("x-veer-version", "candidate")]).await.text(), "cand");
        assert_eq!(send_with(&c, proxy.http_addr(), "GET", &[("x-veer-version", "stable")]).await.text(), "stable");
        assert_eq!(send_with(&c, proxy.http_addr(), "GET", &[]).await.text(), "stable");
    }
    let bad = send_with(&c, proxy.http_addr(), "GET", &[("x-veer-version", "canary")]).await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("\"stable\" or \"candidate\""), "{}", bad.text());
    let text = get(&c, admin, "/metrics").await.text();
    assert_eq!(
        metric(
            &text,
            r#"veer_requests_total{route="web",role="candidate",version="v2",class="2xx",source="upstream"}"#
        ),
        10.0,
        "overridden requests are counted"
    );
    let st = route_status(&c, admin, "web").await;
    assert_eq!(st["candidate"]["window"]["total_requests"], 0, "but never judged: {st}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_split_accurately_stay_put_and_only_move_forward() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let body = policy_route(stable.addr, cand.addr, "[10, 100]", "\n[routes.sticky]\nheader = \"x-user-id\"\n");
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let addr = proxy.http_addr();
    let mut on_candidate = HashMap::new();
    for u in 0..5000 {
        let user = format!("user-{u}");
        let got = send_with(&c, addr, "GET", &[("x-user-id", &user)]).await;
        on_candidate.insert(user, got.text() == "cand");
    }
    let share = on_candidate.values().filter(|v| **v).count() as f64 / 50.0;
    let st = route_status(&c, proxy.admin_addr(), "web").await;
    assert!((share - 10.0).abs() <= 1.5, "{share}% of 5000 users on the candidate; {st}");
    for u in 0..50 {
        let user = format!("user-{u}");
        for _ in 0..20 {
            let got = send_with(&c, addr, "GET", &[("x-user-id", &user)]).await;
            assert_eq!(got.text() == "cand", on_candidate[&user], "{user} changed version");
        }
    }
    // Raise the weight to 50% (a reload of the same candidate keeps the rollout).
    cfg.write(&body.replace("[10, 100]", "[50, 100]"));
    proxy.reload().await.expect("reload");
    eventually(Duration::from_secs(5), "the weight is 50%", || async {
        route_status(&c, proxy.admin_addr(), "web").await["candidate_weight"] == 50.0
    })
    .await;
    let mut now_candidate = 0;
    for u in 0..2000 {
        let user = format!("user-{u}");
        let cand_now = send_with(&c, addr, "GET", &[("x-user-id", &user)]).await.text() == "cand";
        assert!(cand_now || !on_candidate[&user], "{user} moved back to stable as the weight rose");
        now_candidate += usize::from(cand_now);
    }
    assert!((850..=1150).contains(&now_candidate), "{now_candidate} of 2000 users at 50%");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_hidden_from_users_by_retries_and_still_rolled_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stable = Upstream::text("stable").await;
    let fail = Arc::new(AtomicBool::new(false));
    let flag = fail.clone();
    let cand = Upstream::start(move |_| {
        let failing = flag.load(Ordering::Relaxed);
        async move {
            let mut r = http::Response::new(full(if failing { "boom" } else { "stable" }));
            if failing {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let cfg = ConfigFile::new(&policy_route(
        stable.addr,
        cand.addr,
        "[10, 100]",
        "\n[routes.retry]\non_candidate_failure = true\nbudget = 0.5\n",
    ));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let addr = proxy.http_addr();
    // Healthy traffic first: the retry budget is earned from the route's recent requests.
    eventually(Duration::from_secs(10), "the route has served traffic for a while", || async {
        for _ in 0..20 {
            get(&c, addr, "/").await;
        }
        route_status(&c, proxy.admin_addr(), "web").await["stable"]["window"]["requests"].as_u64().unwrap_or(0) >= 200
    })
    .await;
    fail.store(true, Ordering::Relaxed);
    // A POST is not replayable: when it lands on the candidate the client sees the 500.
    let mut post_failed = false;
    for _ in 0..30 {
        if send_with(&c, addr, "POST", &[]).await.status == 500 {
            post_failed = true;
            break;
        }
    }
    assert!(post_failed, "a POST reached the candidate and was not retried");
    // A few hundred requests a second: the budget is credited every tick, so a starved
    // control thread on a loaded test machine must not be what empties it.
    let (_, errors) = until_rolled_back(&c, &proxy, "stable", Duration::from_millis(2)).await;
    let metrics = get(&c, proxy.admin_addr(), "/metrics").await.text();
    let retries: Vec<&str> = metrics.lines().filter(|l| l.starts_with("veer_retries_total")).collect();
    assert_eq!(errors, 0, "clients saw candidate failures; {retries:?}");
    assert_eq!(
        route_status(&c, proxy.admin_addr(), "web").await["phase"],
        "rolled_back",
        "the judge still rolls the candidate back"
    );
    let text = get(&c, proxy.admin_addr(), "/metrics").await.text();
    assert!(metric(&text, r#"veer_retries_total{route="web",outcome="recovered"}"#) >= 1.0, "{text}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::status(503, "down").await;
    // A very high confidence keeps the candidate in place long enough to spend the budget.
    let extra = "confidence = 0.999999999\n\n[routes.retry]\nbudget = 0.1\n";
    let cfg = ConfigFile::new(&policy_route(stable.addr, cand.addr, "[50, 100]", extra));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let (sent, _) = until_rolled_back(&c, &proxy, "stable", Duration::ZERO).await;
    let text = get(&c, proxy.admin_addr(), "/metrics").await.text();
    let retried = metric(&text, r#"veer_retries_total{route="web",outcome="recovered"}"#)
        + metric(&text, r#"veer_retries_total{route="web",outcome="failed"}"#);
    let refused = metric(&text, r#"veer_retries_total{route="web",outcome="budget_exhausted"}"#);
    // 10% of the requests plus the one-per-second reserve of a 10 s window.
    let allowed = 0.1 * f64::from(sent) + 10.0;
    assert!(retried <= allowed, "{retried} retries for {sent} requests (allowed {allowed})");
    assert!(refused > 0.0, "the budget ran out: {text}");
    assert!(
        f64::from(stable.hits() as u32) <= f64::from(sent) / 2.0 + allowed + 20.0,
        "stable's extra load stays within the budget"
    );
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_traffic_is_compared_and_clients_only_see_stable() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::status(500, "boom").await;
    // 0.01%: the split itself almost never picks the candidate; the mirror copies everything.
    let body = policy_route(stable.addr, cand.addr, "[0.01, 100]", "\n[routes.mirror]\npercent = 100\n");
    let cfg = ConfigFile::new(&format!("{}{body}", listeners("expose_role_header = true", "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    let mut from_stable = 0;
    for _ in 0..50 {
        let got = get(&c, proxy.http_addr(), "/").await;
        if got.headers["x-veer-role"] == "stable" {
            assert_eq!(
                (got.status.as_u16(), got.text().as_str()),
                (200, "stable"),
                "a mirrored request still answers from stable"
            );
            from_stable += 1;
        }
    }
    eventually(Duration::from_secs(5), "copies reached the candidate and were compared", || async {
        let text = get(&c, admin, "/metrics").await.text();
        metric(&text, r#"veer_mirrored_requests_total{route="web",class="5xx"}"#) >= f64::from(from_stable)
            && metric(&text, r#"veer_mirror_mismatches_total{route="web"}"#) >= f64::from(from_stable)
    })
    .await;
    assert!(cand.hits() >= from_stable as usize);
    // The split may still send one request to the candidate: that one, and only that one, is
    // judged. Windows are read on a tick; once stable's shows all of its requests, the
    // candidate's (read in the same tick) shows whatever was judged.
    let ordinary = (cand.hits() - from_stable as usize) as u64;
    eventually(Duration::from_secs(5), "a tick has read every request into the windows", || async {
        route_status(&c, admin, "web").await["stable"]["window"]["total_requests"] == from_stable
    })
    .await;
    let st = route_status(&c, admin, "web").await;
    assert_eq!(
        st["candidate"]["window"]["total_requests"].as_u64(),
        Some(ordinary),
        "mirrored copies are not judged as ordinary traffic: {st}"
    );
    // Once rolled back, nothing is copied to the candidate any more.
    assert_eq!(post(&c, admin, "/api/v1/routes/web/abort", &[]).await.status, 200);
    let before = cand.hits();
    for _ in 0..20 {
        assert_eq!(get(&c, proxy.http_addr(), "/").await.text(), "stable");
    }
    assert_eq!(cand.hits(), before);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_without_endpoints_gives_its_share_to_stable_and_is_rolled_back() {
    let stable = Upstream::text("stable").await;
    let dead = refused_addr();
    let cfg = ConfigFile::new(&policy_route(stable.addr, dead, "[20, 100]", ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let started = std::time::Instant::now();
    let (_, errors) = until_rolled_back(&c, &proxy, "stable", Duration::ZERO).await;
    // Only a request that finds the endpoint refusing may fail: the first, then one probe each
    // time the endpoint's backoff (100 ms, doubling) runs out before the rollback lands, which
    // on a loaded machine can take more than 100 ms.
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let probes = 1 + (ms / 100.0 + 1.0).log2().floor() as u32;
    assert!(
        errors <= probes,
        "{errors} client errors in {ms:.0} ms: at most {probes} requests can have found it refusing"
    );
    let st: Value = route_status(&c, proxy.admin_addr(), "web").await;
    assert_eq!(st["phase"], "rolled_back", "{st}");
    proxy.drain().await;
}
