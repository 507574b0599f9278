//! The real-etcd harness (`tests/common/etcd.rs`) checked with the client veer uses: a member
//! stores and serves data, a cluster refuses writes without a quorum and takes them again once
//! members come back, leases expire and take their keys, a hung leader is replaced, clusters
//! started at once stay apart, a start moves off a port taken before etcd bound it, and a
//! restart waits out a port taken meanwhile.
//!
//! Each test skips (loudly) where etcd is not installed, unless `VEER_REQUIRE_ETCD=1`.

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};

use crate::common::etcd::{Etcd, Timing};

async fn value(c: &mut Client, key: &str) -> Option<String> {
    let got = c.get(key, None).await.unwrap_or_else(|e| panic!("get {key}: {e}"));
    got.kvs().first().map(|kv| kv.value_str().expect("utf8").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_stores_and_serves_a_key() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let urls = etcd.client_urls();
    assert_eq!(urls.len(), 1);
    assert!(urls[0].starts_with("http://127.0.0.1:") && !urls[0].ends_with(":0"), "{urls:?}");

    let mut c = etcd.client().await;
    c.put("/veer/test/k", "v1", None).await.expect("put");
    assert_eq!(value(&mut c, "/veer/test/k").await.as_deref(), Some("v1"));
    c.put("/veer/test/k", "v2", None).await.expect("overwrite");
    assert_eq!(value(&mut c, "/veer/test/k").await.as_deref(), Some("v2"));
    assert_eq!(value(&mut c, "/veer/test/absent").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_refuse_writes_without_quorum_and_take_them_again_after_restarts() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let mut all = etcd.client().await;
    all.put("/veer/test/before", "1", None).await.expect("put with three members");

    // Member 0 alone: its answers are its own, and it cannot commit anything.
    etcd.kill(1);
    etcd.stop(2).await;
    let mut lonely = etcd.client_of(0, Duration::from_secs(1)).await;
    let started = Instant::now();
    let refused = lonely.put("/veer/test/during", "x", None).await;
    assert!(refused.is_err(), "a write without quorum succeeded: {refused:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "the 1 s request timeout did not bound the write");

    // One member back is a quorum again: writes succeed, through the member that stayed up.
    etcd.restart(1).await;
    let mut survivor = etcd.client_of(0, Duration::from_secs(5)).await;
    survivor.put("/veer/test/after", "2", None).await.expect("put with two of three members");

    // The last member rejoins and catches up on what was written while it was down.
    etcd.restart(2).await;
    let mut rejoined = etcd.client_of(2, Duration::from_secs(5)).await;
    assert_eq!(value(&mut rejoined, "/veer/test/before").await.as_deref(), Some("1"));
    assert_eq!(value(&mut rejoined, "/veer/test/after").await.as_deref(), Some("2"));
    // A write that timed out is not a write that failed: when member 0 was leader it kept the
    // entry in its log and commits it once it has a quorum again. Either outcome is etcd's.
    let during = value(&mut rejoined, "/veer/test/during").await;
    assert!(matches!(during.as_deref(), None | Some("x")), "{during:?}");
    rejoined.put("/veer/test/last", "3", None).await.expect("put through the rejoined member");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_one_second_expires_and_takes_its_key() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let mut c = etcd.client().await;
    let lease = c.lease_grant(1, None).await.expect("lease grant");
    let granted = Duration::from_secs(u64::try_from(lease.ttl()).expect("ttl"));
    let asked = Instant::now();
    // etcd raises a TTL below its minimum; the harness's timing keeps that minimum at 1 s.
    assert_eq!(granted, Timing::default().min_lease_ttl().max(Duration::from_secs(1)));
    assert_eq!(granted, Duration::from_secs(1));
    c.put("/veer/test/leased", "alive", Some(PutOptions::new().with_lease(lease.id()))).await.expect("put");
    assert_eq!(value(&mut c, "/veer/test/leased").await.as_deref(), Some("alive"));

    let deadline = asked + granted + Duration::from_secs(5);
    while value(&mut c, "/veer/test/leased").await.is_some() {
        assert!(Instant::now() < deadline, "the leased key outlived its {granted:?} lease by 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone_after = asked.elapsed();
    // Not early: the leader's lease clock started before the grant was answered, so the key
    // cannot vanish sooner than the TTL after that answer (minus the answer's own latency).
    assert!(gone_after + Duration::from_millis(200) >= granted, "gone after {gone_after:?} < {granted:?}");
    let ttl = c.lease_time_to_live(lease.id(), None).await.expect("time to live");
    assert_eq!(ttl.ttl(), -1, "the lease still exists after its key went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_rejoins_as_a_follower() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let old = etcd.leader().await;
    etcd.pause(old);
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    for &i in &others {
        etcd.wait_healthy(i).await;
    }
    let new = etcd.leader().await;
    assert_ne!(new, old, "the paused member is still leader");
    let mut c = etcd.client_of(others[0], Duration::from_secs(5)).await;
    c.put("/veer/test/while-paused", "1", None).await.expect("put while the old leader is paused");

    // With pre-vote, the resumed member cannot depose the new leader; it catches up.
    etcd.resume(old).await;
    assert_eq!(etcd.leader().await, new, "the resumed member disrupted the new leader");
    let mut back = etcd.client_of(old, Duration::from_secs(5)).await;
    assert_eq!(value(&mut back, "/veer/test/while-paused").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_started_at_once_stay_apart() {
    let (a, b) = tokio::join!(Etcd::start(3), Etcd::start(1));
    let (Some(a), Some(b)) = (a, b) else { return };
    let mut ports: Vec<String> = a.client_urls().into_iter().chain(b.client_urls()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4, "clusters share a client URL: {ports:?}");

    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.put("/veer/test/owner", "a", None).await.expect("put a");
    cb.put("/veer/test/owner", "b", None).await.expect("put b");
    assert_eq!(value(&mut ca, "/veer/test/owner").await.as_deref(), Some("a"));
    assert_eq!(value(&mut cb, "/veer/test/owner").await.as_deref(), Some("b"));
    let members = ca.member_list().await.expect("member list");
    assert_eq!(members.members().len(), 3, "cluster a has exactly its own members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_out_a_port_taken_meanwhile() {
    let Some(mut etcd) = Etcd::start(1).await else { return };
    let mut c = etcd.client().await;
    c.put("/veer/test/kept", "yes", None).await.expect("put");
    etcd.kill(0);

    // Something else listens on the member's client port while it is down.
    let squatter = std::net::TcpListener::bind(etcd.client_addr(0)).expect("take the freed client port");
    let log = etcd.log_path(0).to_path_buf();
    let before = std::fs::read_to_string(&log).expect("log").matches("address already in use").count();
    let release = async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        // The restart found the port taken at least once: only then is it given back.
        while std::fs::read_to_string(&log).expect("log").matches("address already in use").count() == before {
            assert!(Instant::now() < deadline, "etcd never tried the taken port");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(squatter);
    };
    tokio::join!(etcd.restart(0), release);

    let mut c = etcd.client().await;
    assert_eq!(value(&mut c, "/veer/test/kept").await.as_deref(), Some("yes"), "the data dir was not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_taken_port_moves_to_fresh_ports() {
    // The client port handed to the first attempt is in use; the peer port is free.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    let free = crate::common::refused_addr().port();
    let Some(etcd) = Etcd::start_first_on(1, vec![taken, free]).await else { return };
    assert_eq!(etcd.attempts(), 2, "the start did not retry after its port was taken");
    assert_ne!(etcd.client_addr(0).port(), taken);
    let mut c = etcd.client().await;
    c.put("/veer/test/moved", "yes", None).await.expect("put after moving ports");
    drop(squatter);
}
