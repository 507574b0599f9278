//! The weighted split, measured at the upstreams through real sockets.
#![allow(clippy::disallowed_methods)]

use crate::common::*;
use veer::server::Proxy;

async fn split_counts(weight: &str, requests: usize) -> (usize, usize) {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("candidate").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), &format!("[{weight}, 100]")));
    let proxy = Proxy::start(&cfg.path).await.expect("proxy starts");
    let c = client();
    let mut to_candidate = 0;
    for _ in 0..requests {
        let got = get(&c, proxy.http_addr(), "/").await;
        assert_eq!(got.status, 200);
        if got.text() == "candidate" {
            to_candidate += 1;
        }
    }
    assert_eq!(stable.hits() + cand.hits(), requests);
    assert_eq!(cand.hits(), to_candidate);
    proxy.drain().await;
    (to_candidate, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_over_5000_requests_is_within_one_and_a_half_points() {
    let (cand, n) = split_counts("10", 5000).await;
    let share = cand as f64 * 100.0 / n as f64;
    assert!((share - 10.0).abs() <= 1.5, "candidate got {share:.2}%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_over_1000_requests_gives_ten_plus_minus_two() {
    let (cand, _) = split_counts("1", 1000).await;
    // Each shard's accumulator is exact to within one request and a request lands on the
    // shard of whichever worker runs it, so the total is exact to within one per shard: ±2 on
    // a 2-core machine, more where there are more cores (and shards).
    let slack = veer::shard::count().max(2);
    assert!(
        (10usize.saturating_sub(slack)..=10 + slack).contains(&cand),
        "candidate got {cand} of 1000 (±{slack} allowed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_candidate_serves_only_stable() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("proxy starts");
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, proxy.http_addr(), "/x").await.text(), "stable");
    }
    let st = route_status(&c, proxy.admin_addr(), "web").await;
    assert_eq!(st["phase"], "stable");
    assert_eq!(st["candidate_weight"], 0.0);
    proxy.drain().await;
}
