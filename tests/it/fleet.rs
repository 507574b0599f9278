//! Fleet mode against real etcd and real `veer run` processes, all on 127.0.0.1: one rollout
//! shared by several replicas (docs/fleet.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use hyper::Response;
use serde_json::Value;

use crate::common::etcd::Etcd;
use crate::common::*;

/// Lease of every replica in these tests: a dead leader is replaced within it plus a second.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// One replica: its config and its process.
struct Replica {
    node: String,
    config: ConfigFile,
    veer: Option<Veer>,
}

impl Replica {
    fn veer(&self) -> &Veer {
        self.veer.as_ref().expect("replica is running")
    }

    fn admin(&self) -> SocketAddr {
        self.veer().admin
    }

    fn http(&self) -> SocketAddr {
        self.veer().http
    }
}

/// The `[cluster]` table of `node` in a fleet on `etcd`.
fn cluster(etcd: &Etcd, node: &str) -> String {
    format!(
        "[cluster]\netcd = {:?}\nprefix = \"/veer/test\"\nnode = \"{node}\"\nlease_ttl = \"{}s\"\npublish_interval = \"50ms\"\n",
        etcd.client_urls(),
        LEASE_TTL.as_secs()
    )
}

fn replica(etcd: &Etcd, node: &str, route: &str) -> Replica {
    let config = ConfigFile::new(&format!("{}\n{route}", cluster(etcd, node)));
    let veer = Some(Veer::spawn(&config.path));
    Replica { node: node.to_string(), config, veer }
}

fn fleet(etcd: &Etcd, n: usize, route: &str) -> Vec<Replica> {
    (1..=n).map(|i| replica(etcd, &format!("n{i}"), route)).collect()
}

async fn status(client: &HttpClient, r: &Replica) -> Value {
    route_status(client, r.admin(), "web").await
}

fn weight(s: &Value) -> f64 {
    s["candidate_weight"].as_f64().expect("weight")
}

fn leader(s: &Value) -> Option<String> {
    s["fleet"]["leader"].as_str().map(str::to_string)
}

/// Steady GETs spread round robin over `addrs`, `gap` apart, until stopped (at most 120 s):
/// counts the answers by who gave them.
struct Traffic {
    targets: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    /// Where the request in flight goes.
    inflight: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    candidate_errors: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_candidate_error: Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(addrs: Vec<SocketAddr>, gap: Duration) -> Traffic {
        let targets = Arc::new(std::sync::Mutex::new(addrs));
        let inflight = Arc::new(std::sync::Mutex::new(None));
        let (t, inf) = (targets.clone(), inflight.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, candidate_errors, failed) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let first = Arc::new(std::sync::Mutex::new(None));
        let (s, o, c, f, fi) = (stop.clone(), ok.clone(), candidate_errors.clone(), failed.clone(), first.clone());
        let task = tokio::spawn(async move {
            let client = client();
            let until = Instant::now() + Duration::from_secs(120);
            let mut next = Instant::now();
            for i in 0usize.. {
                if s.load(Ordering::Relaxed) || Instant::now() > until {
                    return;
                }
                let addr = {
                    let addrs = t.lock().unwrap();
                    let addr = addrs[i % addrs.len()];
                    *inf.lock().unwrap() = Some(addr);
                    addr
                };
                let req = http::Request::get(format!("http://{addr}/"))
                    .body(http_body_util::Full::default())
                    .expect("request");
                let got = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await;
                *inf.lock().unwrap() = None;
                match got {
                    Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(resp)) if resp.status() == StatusCode::INTERNAL_SERVER_ERROR => {
                        c.fetch_add(1, Ordering::Relaxed);
                        fi.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                    _ => {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                next += gap;
                tokio::time::sleep_until(next.into()).await;
            }
        });
        Traffic { targets, inflight, stop, ok, candidate_errors, failed, first_candidate_error: first, task }
    }

    /// Stops sending to `addr` (a replica about to be killed or frozen), as a load balancer
    /// drains it, and returns once no request to it is in flight.
    async fn avoid(&self, addr: SocketAddr) {
        self.targets.lock().unwrap().retain(|a| *a != addr);
        eventually(Duration::from_secs(10), "the request in flight to the drained replica ends", || async {
            *self.inflight.lock().unwrap() != Some(addr)
        })
        .await;
    }

    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.candidate_errors.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The confidence of the healthy routes of these tests.
///
/// These tests are about coordination, and assert that a healthy candidate is never rolled
/// back: at the default confidence (0.99) the judge may spend its 1% false-rollback budget on
/// one rollout in a hundred, which is what the budget is for but would fail the test as often.
/// A budget of one in a million keeps the judges armed without that.
const HEALTHY_CONFIDENCE: f64 = 0.999_999;

/// The healthy candidate of `stable` / `candidate`, stepping every `interval`.
fn healthy_route(stable: SocketAddr, candidate: SocketAddr, steps: &str, interval: &str) -> String {
    RouteFixture::new(stable, candidate)
        .steps(steps)
        .step_interval(interval)
        .min_requests(5)
        .rollback("5s", "100ms")
        .rollback_key("confidence", &HEALTHY_CONFIDENCE.to_string())
        .toml()
}

#[tokio::test]
async fn three_replicas_promote_one_candidate_and_never_disagree_for_long() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 40, 100]", "1s");
    let replicas = fleet(&etcd, 3, &route);
    let client = client();
    // Measured from the first step on: a replica still starting serves stable until it has
    // read the record, which is not a disagreement on the step.
    all_at(&client, &replicas.iter().collect::<Vec<_>>(), 10.0, Duration::from_secs(20)).await;
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut disagree_since: Option<(Instant, Vec<_>)> = None;
    let mut longest = (Duration::ZERO, Vec::new());
    loop {
        let mut seen = Vec::new();
        for r in &replicas {
            let s = status(&client, r).await;
            seen.push((s["phase"].as_str().unwrap_or("").to_string(), s["step"].as_u64(), weight(&s)));
        }
        if seen.windows(2).all(|w| w[0] == w[1]) {
            if let Some((t, first)) = disagree_since.take()
                && t.elapsed() > longest.0
            {
                longest = (t.elapsed(), first);
            }
            if seen[0].0 == "promoted" {
                break;
            }
        } else {
            disagree_since.get_or_insert_with(|| (Instant::now(), seen.clone()));
        }
        assert!(Instant::now() < deadline, "not promoted fleet-wide within 60 s: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "no client request fails ({ok} ok)");
    if longest.0 > Duration::from_millis(200) {
        panic!(
            "replicas disagreed on the step for {:?}, from {:?}\n{}",
            longest.0,
            longest.1,
            evidence(&client, &replicas).await
        );
    }
    // One history for the fleet, the same from every replica: no step twice, none skipped.
    for r in &replicas {
        let got = get(&client, r.admin(), "/api/v1/events?route=web").await;
        let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
        let kinds: Vec<(&str, Option<u64>)> =
            events.iter().map(|e| (e["kind"].as_str().unwrap_or(""), e["step"].as_u64())).collect();
        assert_eq!(
            kinds,
            [("started", Some(0)), ("step", Some(1)), ("step", Some(2)), ("promoted", None)],
            "history read from {}",
            r.node
        );
    }
}

#[tokio::test]
async fn a_failing_candidate_is_snapped_back_on_every_replica_within_a_second() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::status(500, "v2 broken").await);
    let route = RouteFixture::new(stable.addr, candidate.addr)
        .steps("[10, 100]")
        .step_interval("1h")
        .rollback("5s", "50ms")
        .toml();
    let replicas = fleet(&etcd, 3, &route);
    let client = client();
    for r in &replicas {
        eventually(Duration::from_secs(20), "every replica follows the fleet at 10%", || async {
            weight(&status(&client, r).await) == 10.0
        })
        .await;
    }
    // 300 requests a second across the fleet: 30 a second to the candidate.
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_micros(3333));
    let mut at_zero: Vec<Option<Instant>> = vec![None; replicas.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_zero.iter().any(Option::is_none) {
        for (i, r) in replicas.iter().enumerate() {
            if at_zero[i].is_none() && weight(&status(&client, r).await) == 0.0 {
                at_zero[i] = Some(Instant::now());
            }
        }
        assert!(Instant::now() < deadline, "not every replica snapped back within 30 s: {at_zero:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = traffic.first_candidate_error.lock().unwrap().expect("the candidate failed a request");
    let (_, candidate_errors, failed) = traffic.stop().await;
    let last = at_zero.iter().flatten().max().copied().expect("all at zero");
    assert!(
        last.duration_since(first) <= Duration::from_secs(1),
        "the last replica reached 0% {:?} after the first failed candidate request",
        last.duration_since(first)
    );
    assert!(candidate_errors <= 10, "{candidate_errors} candidate errors were served before the fleet snapped back");
    assert_eq!(failed, 0);
    for r in &replicas {
        let s = status(&client, r).await;
        assert_eq!(s["phase"], "rolled_back", "{}: {s}", r.node);
        assert_eq!(s["fleet"]["record"]["phase"], "rolled_back");
    }
}

/// Waits until every replica in `replicas` applies `percent`, and returns the leader they
/// agree on.
async fn all_at(client: &HttpClient, replicas: &[&Replica], percent: f64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        let mut weights = Vec::new();
        let mut statuses = Vec::new();
        for r in replicas {
            let s = status(client, r).await;
            weights.push(weight(&s));
            leaders.push(leader(&s));
            statuses.push(s);
        }
        if weights.iter().all(|w| *w == percent)
            && leaders.windows(2).all(|w| w[0] == w[1])
            && let Some(l) = leaders[0].clone()
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "not all at {percent}% with one leader within {within:?}: {weights:?} {leaders:?}\n{}",
            replicas
                .iter()
                .zip(&statuses)
                .map(|(r, s)| format!("---- {}: {s}\n{}", r.node, r.veer().logs(60)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn when_the_leader_is_killed_mid_step_another_continues_from_the_same_step() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 30, 60, 100]", "3s");
    let mut replicas = fleet(&etcd, 3, &route);
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_millis(5));
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    let old = all_at(&client, &all, 30.0, Duration::from_secs(30)).await;
    let i = replicas.iter().position(|r| r.node == old).expect("the leader is a replica");
    traffic.avoid(replicas[i].http()).await;
    let killed = Instant::now();
    replicas[i].veer().signal("KILL");
    let _ = replicas[i].veer.take();
    let rest: Vec<&Replica> = replicas.iter().filter(|r| r.veer.is_some()).collect();
    let deadline = killed + LEASE_TTL + Duration::from_secs(1);
    let new = loop {
        let s = status(&client, rest[0]).await;
        if let Some(l) = leader(&s).filter(|l| *l != old) {
            break l;
        }
        assert!(Instant::now() < deadline, "no new leader within lease_ttl + 1 s: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(new, old);
    for r in &rest {
        assert_eq!(weight(&status(&client, r).await), 30.0, "the survivors stay at the step the fleet was on");
        // Two members are left, but each local judge keeps the share of the budget it was
        // cut for three: a member count that drops never loosens a judge mid-rollout.
        eventually(Duration::from_secs(10), "the dead replica's report expires", || async {
            status(&client, r).await["fleet"]["members"].as_array().is_some_and(|m| m.len() == 2)
        })
        .await;
        let local = status(&client, r).await["fleet"]["alpha"]["local"].as_f64().expect("local alpha");
        let cut_for_three = (1.0 - HEALTHY_CONFIDENCE) / 6.0;
        assert!((local / cut_for_three - 1.0).abs() < 1e-6, "{}'s local judge loosened to α = {local}", r.node);
    }
    let _ = all_at(&client, &rest, 100.0, Duration::from_secs(30)).await;
    let (_, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "the survivors served every request");
    let got = get(&client, rest[0].admin(), "/api/v1/events?route=web").await;
    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    let steps: Vec<Option<u64>> =
        events.iter().filter(|e| e["kind"] != "promoted").map(|e| e["step"].as_u64()).collect();
    assert_eq!(steps, [Some(0), Some(1), Some(2), Some(3)], "no step skipped or taken twice: {events:?}");
}

#[tokio::test]
async fn pause_on_one_replica_pauses_the_fleet_and_any_replica_shows_it() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 100]", "1h");
    let replicas = fleet(&etcd, 3, &route);
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    let leader = all_at(&client, &all, 10.0, Duration::from_secs(20)).await;
    let got = post(&client, replicas[1].admin(), "/api/v1/routes/web/pause", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    eventually(Duration::from_secs(5), "replica C sees the fleet paused", || async {
        status(&client, &replicas[2]).await["phase"] == "paused"
    })
    .await;
    let s = status(&client, &replicas[2]).await;
    assert_eq!(s["fleet"]["leader"], leader.as_str());
    assert_eq!(s["fleet"]["record"]["writer"], "n2", "written by the replica that got the command");
    let members: Vec<&str> =
        s["fleet"]["members"].as_array().expect("members").iter().map(|m| m["node"].as_str().unwrap()).collect();
    assert_eq!(members, ["n1", "n2", "n3"]);
    // A command the fleet's state refuses is refused on any replica, as on one.
    let again = post(&client, replicas[0].admin(), "/api/v1/routes/web/pause", &[]).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text());
    // The CLI's view of the fleet.
    let out = std::process::Command::new(veer_bin())
        .args(["status", "--admin", &format!("http://{}", replicas[2].admin())])
        .output()
        .expect("veer status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("leader {leader}")) && text.contains("member    n1"), "{text}");
}

#[tokio::test]
async fn a_replica_with_another_candidate_serves_stable_until_a_majority_runs_it() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, v2, v3) = (Upstream::text("v1").await, Upstream::text("v2").await, Upstream::text("v3").await);
    let route = healthy_route(stable.addr, v2.addr, "[20, 100]", "1h");
    let mut replicas = fleet(&etcd, 3, &route);
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    all_at(&client, &all, 20.0, Duration::from_secs(20)).await;
    let route_v3 =
        healthy_route(stable.addr, v3.addr, "[20, 100]", "1h").replace("version = \"v2\"", "version = \"v3\"");
    replicas.push(replica(&etcd, "n4", &route_v3));
    eventually(Duration::from_secs(10), "the fourth replica says it disagrees", || async {
        status(&client, &replicas[3]).await["fleet"]["standing"] == "mismatch"
    })
    .await;
    let s = status(&client, &replicas[3]).await;
    assert_eq!(weight(&s), 0.0, "it serves stable only: {s}");
    assert!(s["fleet"]["reason"].as_str().unwrap_or("").contains("v3"), "{s}");
    let metrics = get(&client, replicas[3].admin(), "/metrics").await.text();
    assert!(metrics.contains("veer_cluster_config_mismatch{route=\"web\"} 1"), "{metrics}");
    for _ in 0..20 {
        assert_eq!(get(&client, replicas[3].http(), "/").await.text(), "v1");
    }
    for r in &replicas[..3] {
        assert_eq!(weight(&status(&client, r).await), 20.0, "the fleet stays on its rollout");
    }
    // Two of the other three move to v3: with the fourth, a majority runs it.
    for r in &replicas[1..3] {
        r.config.write(&format!("{}\n{route_v3}", cluster(&etcd, &r.node)));
        let got = post(&client, r.admin(), "/api/v1/reload", &[]).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    }
    let movers: Vec<&Replica> = replicas[1..].iter().collect();
    all_at(&client, &movers, 20.0, Duration::from_secs(20)).await;
    let s = status(&client, &replicas[3]).await;
    if s["fleet"]["record"]["candidate_version"] != "v3" {
        panic!("the fleet did not move to v3: {s}\n{}", evidence(&client, &replicas).await);
    }
    assert_eq!(s["fleet"]["record"]["epoch"], 2, "one new fleet rollout: {s}");
    eventually(Duration::from_secs(10), "the replica left on v2 now disagrees and serves stable", || async {
        let s = status(&client, &replicas[0]).await;
        s["fleet"]["standing"] == "mismatch" && weight(&s) == 0.0
    })
    .await;
    let got = get(&client, replicas[3].admin(), "/api/v1/events?route=web").await;
    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    let starts = events.iter().filter(|e| e["kind"] == "started").count();
    assert_eq!(starts, 2, "one rollout of v2, one of v3: {events:?}");
}

#[tokio::test]
async fn a_restarted_replica_rejoins_at_the_fleet_s_weight_and_never_above_it() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 30, 100]", "1s");
    let mut replicas = fleet(&etcd, 3, &route);
    let traffic = Traffic::start(replicas.iter().take(2).map(Replica::http).collect(), Duration::from_millis(5));
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    all_at(&client, &all, 30.0, Duration::from_secs(30)).await;
    // Hold the fleet here so the weight the restarted replica must reach is known.
    let got = post(&client, replicas[0].admin(), "/api/v1/routes/web/pause", &[]).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    replicas[2].veer().signal("KILL");
    let _ = replicas[2].veer.take();
    replicas[2].veer = Some(Veer::spawn(&replicas[2].config.path));
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = weight(&status(&client, &replicas[2]).await);
        seen.push(w);
        if w == 30.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted replica did not rejoin at 30%: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.iter().all(|w| *w == 0.0 || *w == 30.0), "it never applied another weight: {seen:?}");
    let (_, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn a_deposed_leader_cannot_write_when_it_wakes_up() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 30, 60, 100]", "2s");
    let replicas = fleet(&etcd, 3, &route);
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_millis(5));
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    let old = all_at(&client, &all, 10.0, Duration::from_secs(20)).await;
    let stale = replicas.iter().find(|r| r.node == old).expect("leader");
    traffic.avoid(stale.http()).await;
    stale.veer().signal("STOP");
    // Revoke the frozen leader's lease: its leader key and report go, another replica leads.
    let mut etcd_client = etcd_client::Client::connect(etcd.client_urls(), None).await.expect("etcd client");
    let key = etcd_client.get("/veer/test/leaders/web", None).await.expect("get leader");
    let lease = key.kvs().first().expect("a leader key").lease();
    etcd_client.lease_revoke(lease).await.expect("revoke the leader's lease");
    let rest: Vec<&Replica> = replicas.iter().filter(|r| r.node != old).collect();
    let new = loop {
        if let Some(l) = leader(&status(&client, rest[0]).await).filter(|l| *l != old) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The new leader takes the next step while the old one is frozen past its step interval.
    all_at(&client, &rest, 30.0, Duration::from_secs(20)).await;
    stale.veer().signal("CONT");
    all_at(&client, &all, 100.0, Duration::from_secs(40)).await;
    let (_, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0);
    let got = get(&client, rest[0].admin(), "/api/v1/events?route=web").await;
    let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
    let steps: Vec<Option<u64>> =
        events.iter().filter(|e| e["kind"] != "promoted").map(|e| e["step"].as_u64()).collect();
    assert_eq!(steps, [Some(0), Some(1), Some(2), Some(3)], "no step skipped or taken twice: {events:?}");
    let record = etcd_client.get("/veer/test/rollouts/web", None).await.expect("record");
    let record: Value = serde_json::from_slice(record.kvs()[0].value()).expect("record JSON");
    assert_ne!(record["writer"], old.as_str(), "the deposed leader wrote nothing after waking (new leader {new})");
}

/// Kills two of the three etcd members and checks, for longer than a step interval, that
/// every replica keeps the weight it had, serves every request and stays ready.
/// Every replica's status and latest log lines, for a failure message.
async fn evidence(client: &HttpClient, replicas: &[Replica]) -> String {
    let mut out = String::new();
    for r in replicas {
        out += &format!("---- {}: {}\n{}\n", r.node, status(client, r).await, r.veer().logs(60));
    }
    out
}

async fn outage_holds(client: &HttpClient, etcd: &mut Etcd, replicas: &[Replica], percent: f64) {
    etcd.kill(1);
    etcd.kill(2);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(5) {
        for r in replicas {
            let s = status(client, r).await;
            if weight(&s) != percent {
                panic!("{} took a step without etcd: {s}\n{}", r.node, evidence(client, replicas).await);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(client, &replicas[0]).await;
    assert_eq!(s["fleet"]["connected"], false, "{s}");
    let ready = get(client, replicas[0].admin(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "readiness does not depend on etcd");
}

#[tokio::test]
async fn with_etcd_down_to_one_member_the_fleet_serves_holds_and_still_brakes() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let bad = Arc::new(AtomicBool::new(false));
    let b = bad.clone();
    let candidate = Upstream::start(move |_| {
        let failing = b.load(Ordering::Relaxed);
        async move {
            let mut r = Response::new(full(if failing { "v2 broken" } else { "v2" }));
            if failing {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let stable = Upstream::text("v1").await;
    let route = healthy_route(stable.addr, candidate.addr, "[20, 40, 60, 80, 100]", "2s");
    let replicas = fleet(&etcd, 3, &route);
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    all_at(&client, &all, 20.0, Duration::from_secs(20)).await;
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_millis(5));
    outage_holds(&client, &mut etcd, &replicas, 20.0).await;
    etcd.restart(1).await;
    etcd.restart(2).await;
    // Back to quorum, the rollout continues from where it held.
    all_at(&client, &all, 40.0, Duration::from_secs(20)).await;
    let (ok, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "no request failed because of etcd ({ok} ok)");
    // A second outage, and the candidate goes bad during it: every replica brakes on its own
    // traffic, without etcd.
    let held = weight(&status(&client, &replicas[0]).await);
    let traffic = Traffic::start(replicas.iter().map(Replica::http).collect(), Duration::from_millis(5));
    etcd.kill(1);
    etcd.kill(2);
    eventually(Duration::from_secs(10), "every replica sees etcd gone", || async {
        let mut gone = true;
        for r in &replicas {
            gone &= status(&client, r).await["fleet"]["connected"] == false;
        }
        gone
    })
    .await;
    bad.store(true, Ordering::Relaxed);
    for r in &replicas {
        eventually(Duration::from_secs(10), "the replica snaps back without etcd", || async {
            weight(&status(&client, r).await) == 0.0
        })
        .await;
    }
    let (_, candidate_errors, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "only the candidate's own answers failed ({candidate_errors} of them, at {held}%)");
    etcd.restart(1).await;
    etcd.restart(2).await;
    // Once etcd is back the brake is in the record, and no replica undoes it.
    for r in &replicas {
        eventually(Duration::from_secs(20), "the fleet's record says rolled back", || async {
            status(&client, r).await["fleet"]["record"]["phase"] == "rolled_back"
        })
        .await;
        assert_eq!(weight(&status(&client, r).await), 0.0);
    }
}

#[tokio::test]
async fn one_etcd_member_down_of_three_leaves_every_replica_connected() {
    let Some(mut etcd) = Etcd::start(3).await else { return };
    let (stable, candidate) = (Upstream::text("v1").await, Upstream::text("v2").await);
    let route = healthy_route(stable.addr, candidate.addr, "[10, 100]", "1h");
    let replicas = fleet(&etcd, 3, &route);
    let client = client();
    let all: Vec<&Replica> = replicas.iter().collect();
    all_at(&client, &all, 10.0, Duration::from_secs(20)).await;
    etcd.kill(1);
    let dead = etcd.client_url(1);
    let sessions = |r: &Replica| r.veer().logged("fleet: etcd session up");
    // A replica whose session was on the dead member moves to another one...
    for r in &replicas {
        eventually(Duration::from_secs(10), "the replica is connected to a live member", || async {
            let on = sessions(r).last().and_then(|v| v["fields"]["etcd"].as_str().map(str::to_string));
            on.is_some_and(|e| e != dead) && status(&client, r).await["fleet"]["connected"] == true
        })
        .await;
    }
    let before: Vec<usize> = replicas.iter().map(|r| sessions(r).len()).collect();
    // ... and stays there: the cluster has quorum (and may elect a new etcd leader meanwhile),
    // so no session is lost any more.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        for r in &replicas {
            let s = status(&client, r).await;
            assert_eq!(
                s["fleet"]["connected"],
                true,
                "{} lost its session with quorum intact: {s}\n{}",
                r.node,
                r.veer().logs(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: Vec<usize> = replicas.iter().map(|r| sessions(r).len()).collect();
    assert_eq!(before, after, "sessions were started again with quorum intact");
}

/// An upstream answering `text`, except every `every`th request, which gets a 500: errors at
/// an exact rate and in the same order however the traffic is spread over replicas, so a
/// fleet and a single replica are compared on the same evidence. Counts what it answered.
async fn fails_one_in(every: u64, text: &'static str) -> (Upstream, Arc<AtomicU64>) {
    let served = Arc::new(AtomicU64::new(0));
    let n = served.clone();
    let upstream = Upstream::start(move |_| {
        let failing = (n.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every);
        async move {
            let mut r = Response::new(full(text));
            if failing {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    (upstream, served)
}

/// Candidate requests served before `replicas` (all of a fleet, or one veer) roll a
/// candidate failing 5% of its requests back, stable failing 1%, at 100 requests a second
/// spread round robin over them: 10 a second to the candidate, so that the fleet's extra
/// path from a replica's counters to every replica's weight (a few hundred milliseconds on a
/// busy machine) costs a few requests, not the comparison.
async fn five_vs_one_detection(client: &HttpClient, replicas: &[&Veer], candidate_served: &AtomicU64) -> u64 {
    let traffic = Traffic::start(replicas.iter().map(|v| v.http).collect(), Duration::from_millis(10));
    let deadline = Instant::now() + Duration::from_secs(90);
    for v in replicas {
        loop {
            let s = route_status(client, v.admin, "web").await;
            if weight(&s) == 0.0 && s["phase"] == "rolled_back" {
                break;
            }
            assert!(Instant::now() < deadline, "5% vs 1% not rolled back within 90 s: {s}\n{}", v.logs(20));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (_, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "every answer came from stable or the candidate");
    candidate_served.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_slight_regression_is_caught_by_three_replicas_after_as_many_requests_as_by_one() {
    let Some(etcd) = Etcd::start(1).await else { return };
    let route = |stable: SocketAddr, candidate: SocketAddr| {
        RouteFixture::new(stable, candidate)
            .steps("[10, 100]")
            .step_interval("1h")
            .min_requests(5)
            .rollback("5s", "100ms")
            .toml()
    };
    let client = client();
    // One veer that sees all the traffic: the budget.
    let (stable, _) = fails_one_in(100, "v1").await;
    let (candidate, served) = fails_one_in(20, "v2").await;
    let config = ConfigFile::new(&route(stable.addr, candidate.addr));
    let single = Veer::spawn(&config.path);
    eventually(Duration::from_secs(20), "the single veer is at 10%", || async {
        weight(&route_status(&client, single.admin, "web").await) == 10.0
    })
    .await;
    let alone = five_vs_one_detection(&client, &[&single], &served).await;
    // Three replicas that each see a third of the same traffic.
    let (stable, _) = fails_one_in(100, "v1").await;
    let (candidate, served) = fails_one_in(20, "v2").await;
    let replicas = fleet(&etcd, 3, &route(stable.addr, candidate.addr));
    let all: Vec<&Replica> = replicas.iter().collect();
    all_at(&client, &all, 10.0, Duration::from_secs(20)).await;
    let veers: Vec<&Veer> = replicas.iter().map(Replica::veer).collect();
    let together = five_vs_one_detection(&client, &veers, &served).await;
    let ratio = together as f64 / alone as f64;
    let decider = status(&client, &replicas[0]).await["rollback"]["evidence"]["fleet"].clone();
    eprintln!(
        "5% vs 1%: one veer rolled back after {alone} candidate requests, three replicas after {together} ({decider})"
    );
    // Caught sooner is the local brake at work (errors can bunch on one replica's share).
    if ratio > 1.25 {
        panic!(
            "three replicas needed {together} candidate requests, one veer {alone} ({ratio:.2}×)\n{}",
            evidence(&client, &replicas).await
        );
    }
    let rollback = status(&client, &replicas[0]).await;
    assert_eq!(rollback["rollback"]["rule"], "error_rate", "{rollback}");
}

#[tokio::test]
async fn a_brake_pulled_while_etcd_is_down_survives_a_crash_of_the_replica() {
    let Some(mut etcd) = Etcd::start(1).await else { return };
    let bad = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (b, n) = (bad.clone(), served.clone());
    let candidate = Upstream::start(move |_| {
        n.fetch_add(1, Ordering::Relaxed);
        let failing = b.load(Ordering::Relaxed);
        async move {
            let mut r = Response::new(full("v2"));
            if failing {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await;
    let stable = Upstream::text("v1").await;
    let route = healthy_route(stable.addr, candidate.addr, "[20, 100]", "1h");
    let mut replicas = fleet(&etcd, 1, &route);
    let client = client();
    all_at(&client, &[&replicas[0]], 20.0, Duration::from_secs(20)).await;
    etcd.kill(0);
    eventually(Duration::from_secs(10), "the replica sees etcd gone", || async {
        status(&client, &replicas[0]).await["fleet"]["connected"] == false
    })
    .await;
    // The candidate goes bad: the replica brakes on its own traffic, with nowhere to write it
    // but its journal.
    bad.store(true, Ordering::Relaxed);
    let traffic = Traffic::start(vec![replicas[0].http()], Duration::from_millis(5));
    eventually(Duration::from_secs(10), "the replica brakes without etcd", || async {
        weight(&status(&client, &replicas[0]).await) == 0.0
    })
    .await;
    traffic.stop().await;
    // It crashes before etcd is back, and the candidate looks healthy from now on: only the
    // brake it remembers can still roll the candidate back.
    replicas[0].veer().signal("KILL");
    let _ = replicas[0].veer.take();
    bad.store(false, Ordering::Relaxed);
    let before = served.load(Ordering::Relaxed);
    replicas[0].veer = Some(Veer::spawn(&replicas[0].config.path));
    let traffic = Traffic::start(vec![replicas[0].http()], Duration::from_millis(5));
    etcd.restart(0).await;
    eventually(Duration::from_secs(20), "the remembered brake is in the fleet's record", || async {
        status(&client, &replicas[0]).await["fleet"]["record"]["phase"] == "rolled_back"
    })
    .await;
    let (ok, _, failed) = traffic.stop().await;
    assert_eq!(failed, 0, "{ok} answered");
    assert_eq!(served.load(Ordering::Relaxed), before, "the restarted replica never sent a request to the candidate");
    let s = status(&client, &replicas[0]).await;
    assert_eq!((weight(&s), s["phase"].as_str()), (0.0, Some("rolled_back")), "{s}");
}
