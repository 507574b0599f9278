//! Under load: reloads, crashes and a drain while traffic flows.
//!
//! - reload: ~1,000 requests/s for 20 s while the config is reloaded 20 times (valid and
//!   invalid files): no request fails, the rollout keeps its phase, step and measurements;
//! - crash: 30 seeded runs of the binary killed with SIGKILL at a random moment of a quickly
//!   advancing rollout, restarted on the same state dir: the journal always parses, replays
//!   without a skipped step, matches the restored state, and a rolled-back candidate gets no
//!   ordinary traffic;
//! - drain: SIGTERM during a loop of slow requests: every request on a connection accepted
//!   before the signal completes with 200, and the process exits 0.
//!
//! The tests take turns (one lock), so that each has the machine's two cores to itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use veer::server::Proxy;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One request through the pooled client: status and body, or why it failed. Never panics.
async fn try_get(c: &HttpClient, addr: SocketAddr, headers: &[(&str, &str)]) -> Result<(StatusCode, Bytes), String> {
    let mut b = Request::get(format!("http://{addr}/"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::default()).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = c.request(req).await.map_err(|e| format!("request: {e:?}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

// ---------------------------------------------------------------------------------------------
// Reload under load.

/// The route `web` of the reload test: stable on `stable`, the override header named `header`.
fn reload_config(stable: SocketAddr, cand: SocketAddr, header: &str, interval: &str) -> String {
    RouteFixture::new(stable, cand)
        .steps("[5, 10, 50, 100]")
        .step_interval(interval)
        .min_requests(0)
        .rollback("5s", "50ms")
        .rollback_key("max_p99_ratio", "1000.0")
        .append(&format!("\n[routes.override]\nheader = \"{header}\"\n"))
        .toml()
}

/// Broken files for the reload test: the text, and what the first error must mention.
fn broken(i: usize, good: &str) -> (String, String) {
    match i % 5 {
        0 => (good.replace("steps = [5, 10, 50, 100]", "steps = [5, 50, 10, 100]"), "strictly increasing".into()),
        1 => {
            (good.replace("min_requests = 0", "min_requests = 0\nwarp_speed = 9"), "unknown field `warp_speed`".into())
        }
        2 => (good.replace("window = \"5s\"", "window = \"5 parsecs\""), "is not a duration".into()),
        3 => (good.replace("name = \"web\"", "name = \"web"), "invalid basic string".into()),
        _ => (
            format!("{good}\n{}", route("127.0.0.1:1".parse().expect("addr"), None, "")),
            "duplicate route name".into(),
        ),
    }
}

#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().expect("lock");
        if f.len() < 10 {
            f.push(why);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_keeps_the_rollout() {
    let _turn = SERIAL.lock().await;
    let a = Upstream::text("a").await;
    let b = Upstream::text("b").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&reload_config(a.addr, cand.addr, "x-veer-a", "1s"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (addr, admin) = (proxy.http_addr(), proxy.admin_addr());
    let c = client();

    // Four clients at 250 requests/s each, until the 20 reloads are done (about 20 s; 45 s at
    // most).
    const CLIENTS: usize = 4;
    const LOAD_FOR: Duration = Duration::from_secs(45);
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loops: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (c, load, stop) = (c.clone(), load.clone(), stop.clone());
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(Duration::from_millis(4));
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for _ in 0..12_000 {
                    pace.tick().await;
                    if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_FOR {
                        break;
                    }
                    match try_get(&c, addr, &[]).await {
                        Ok((StatusCode::OK, body)) if [&b"a"[..], b"b", b"cand"].contains(&&body[..]) => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, body)) => load.fail(format!("{status}: {body:?}")),
                        Err(e) => load.fail(e),
                    }
                }
            })
        })
        .collect();

    let status = |c: HttpClient| async move { route_status(&c, admin, "web").await };
    let kinds = |c: HttpClient| async move {
        let got = get(&c, admin, "/api/v1/events?route=web").await;
        let events: Vec<Value> = serde_json::from_slice(&got.body).expect("events");
        events.iter().map(|e| e["kind"].as_str().unwrap_or("?").to_string()).collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "load flows and the rollout reaches step 1", || async {
        load.ok.load(Ordering::Relaxed) > 200 && status(c.clone()).await["step"].as_u64() >= Some(1)
    })
    .await;

    // Reload 0 holds the rollout where it is (a one-hour dwell); the rest must not move it.
    let (mut stable_is_a, mut header) = (true, "x-veer-a");
    let mut good = reload_config(a.addr, cand.addr, header, "1h");
    cfg.write(&good);
    let summary = proxy.reload().await.expect("reload 0");
    assert_eq!(summary.changed, ["web"]);
    // The control plane takes the new plan on its next tick; from then on the step is fixed.
    eventually(Duration::from_secs(5), "reload 0 is journaled", || async {
        kinds(c.clone()).await.contains(&"reloaded".to_string())
    })
    .await;
    let st = status(c.clone()).await;
    let step = st["step"].as_u64().expect("on a step");
    let weight = [5.0, 10.0, 50.0, 100.0][step as usize];
    let mut generation = summary.generation;
    let mut valid = 1;
    let mut last_totals = (0, 0);
    let mut pace = tokio::time::interval(Duration::from_millis(900));
    pace.tick().await;
    for i in 1..20 {
        pace.tick().await;
        let via_api = i % 2 == 0;
        // Every fourth reload is a broken file; the others change stable's endpoint, the
        // override header, or both.
        let invalid = i % 4 == 3;
        let (text, expected_error) = if invalid {
            broken(i / 4, &good)
        } else {
            let flip_stable = i % 3 != 2;
            let flip_header = i % 3 != 1;
            stable_is_a ^= flip_stable;
            if flip_header {
                header = if header == "x-veer-a" { "x-veer-b" } else { "x-veer-a" };
            }
            let stable = if stable_is_a { a.addr } else { b.addr };
            good = reload_config(stable, cand.addr, header, "1h");
            (good.clone(), String::new())
        };
        let before = (a.hits(), b.hits());
        cfg.write(&text);
        let outcome: Result<u64, String> = if via_api {
            let got = post(&c, admin, "/api/v1/reload", &[]).await;
            let body: Value = serde_json::from_slice(&got.body).expect("reload answer is JSON");
            match got.status {
                StatusCode::OK => {
                    assert_eq!(body["changed"], serde_json::json!(["web"]), "reload {i}: {body}");
                    Ok(body["generation"].as_u64().expect("generation"))
                }
                StatusCode::BAD_REQUEST => Err(body["errors"][0].as_str().expect("errors listed").to_string()),
                other => panic!("reload {i}: {other} {body}"),
            }
        } else {
            match proxy.reload().await {
                Ok(s) => {
                    assert_eq!(
                        (s.changed.as_slice(), s.new_rollouts.len()),
                        (&["web".to_string()][..], 0),
                        "reload {i}"
                    );
                    Ok(s.generation)
                }
                Err(e) => Err(e.to_string()),
            }
        };
        match (invalid, outcome) {
            (false, Ok(g)) => {
                generation += 1;
                valid += 1;
                assert_eq!(g, generation, "reload {i}: one generation per applied reload");
            }
            (true, Err(e)) => {
                assert!(e.contains("veer.toml:") && e.contains(&expected_error), "reload {i}: {e}");
                assert_eq!(proxy.operations().snapshot().generation, generation, "reload {i}: nothing was published");
            }
            (invalid, outcome) => panic!("reload {i} (invalid: {invalid}): {outcome:?}"),
        }
        // The rollout is where it was, with every measurement kept.
        let st = status(c.clone()).await;
        assert_eq!(
            (st["phase"].as_str(), st["step"].as_u64(), st["candidate_weight"].as_f64()),
            (Some("progressing"), Some(step), Some(weight)),
            "reload {i}: {st}"
        );
        let totals = (
            st["stable"]["window"]["total_requests"].as_u64().expect("stable total"),
            st["candidate"]["window"]["total_requests"].as_u64().expect("candidate total"),
        );
        assert!(totals.0 >= last_totals.0 && totals.1 >= last_totals.1, "reload {i}: {last_totals:?} -> {totals:?}");
        last_totals = totals;
        if !invalid {
            eventually(Duration::from_secs(5), &format!("reload {i} is journaled once"), || async {
                kinds(c.clone()).await.iter().filter(|k| *k == "reloaded").count() == valid
            })
            .await;
            // Traffic reaches the new stable endpoint, and the new override header works.
            let (to, hits_before) = if stable_is_a { (&a, before.0) } else { (&b, before.1) };
            eventually(Duration::from_secs(5), &format!("reload {i}: the new stable endpoint serves"), || async {
                to.hits() > hits_before + 20
            })
            .await;
            let forced = try_get(&c, addr, &[(header, "candidate")]).await.expect("override request");
            assert_eq!(forced, (StatusCode::OK, Bytes::from("cand")), "reload {i}: {header} forces the candidate");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("load loop");
    }

    let (ok, failed) = (load.ok.load(Ordering::Relaxed), load.failed.load(Ordering::Relaxed));
    eprintln!("reload under load: {ok} requests in {:?}, {valid} valid reloads", started.elapsed());
    assert_eq!(failed, 0, "failed requests: {:?}", load.failures.lock().expect("lock"));
    assert!(ok >= 4_000, "only {ok} requests were served: the load did not run");
    let kinds = kinds(c.clone()).await;
    let mut want = vec!["started".to_string()];
    want.extend(std::iter::repeat_n("step".to_string(), step as usize));
    want.extend(std::iter::repeat_n("reloaded".to_string(), valid));
    assert_eq!(kinds, want, "the journal holds the rollout and one event per applied reload, nothing else");
    assert!(cand.hits() > 0 && a.hits() > 0 && b.hits() > 0);
    proxy.drain().await;
}

// ---------------------------------------------------------------------------------------------
// Crash under load.

const PLAN: [f64; 6] = [5.0, 10.0, 20.0, 40.0, 70.0, 100.0];

fn crash_config(stable: SocketAddr, cand: SocketAddr) -> String {
    RouteFixture::new(stable, cand)
        .steps("[5, 10, 20, 40, 70, 100]")
        .step_interval("100ms")
        .min_requests(0)
        .rollback("2s", "50ms")
        .rollback_key("max_p99_ratio", "1000.0")
        .toml()
}

/// Replays the journal against the plan: each event continues from the previous one, steps go
/// up one at a time, promotion comes at the end of the plan, and only `retried` leaves
/// `rolled_back`. Returns the phase and step the journal ends in.
fn replay(events: &[Value]) -> (String, Option<u64>) {
    let mut phase = "pending".to_string();
    let mut step: Option<u64> = None;
    let last = PLAN.len() as u64 - 1;
    for (i, e) in events.iter().enumerate() {
        let (kind, from, to) = (e["kind"].as_str(), e["from"].as_str(), e["to"].as_str().expect("to"));
        let (weight, estep) = (e["candidate_weight"].as_f64().expect("weight"), e["step"].as_u64());
        assert_eq!(from, Some(phase.as_str()), "event {i} does not continue from the one before it: {e}");
        let ok = match kind.expect("kind") {
            "started" => phase == "pending" && to == "progressing" && estep == Some(0) && weight == PLAN[0],
            "step" => {
                let next = step.map(|s| s + 1);
                phase == "progressing"
                    && to == "progressing"
                    && estep == next
                    && next.is_some_and(|n| n <= last && weight == PLAN[n as usize])
            }
            "promoted" => phase == "progressing" && step == Some(last) && to == "promoted" && weight == 100.0,
            "rolled_back" => phase != "rolled_back" && to == "rolled_back" && weight == 0.0,
            "retried" => phase == "rolled_back" && to == "progressing" && estep == Some(0) && weight == PLAN[0],
            _ => false,
        };
        assert!(ok, "event {i} is not a legal transition from {phase} step {step:?}: {e}");
        phase = to.to_string();
        step = estep;
    }
    (phase, step)
}

/// Candidate hits by `x-probe` tag.
type Tags = Arc<Mutex<HashMap<String, usize>>>;

fn hits_tagged(tags: &Tags, tag: &str) -> usize {
    tags.lock().expect("lock").get(tag).copied().unwrap_or(0)
}

async fn events_of(c: &HttpClient, admin: SocketAddr) -> Vec<Value> {
    let got = get(c, admin, "/api/v1/events?route=web&limit=100000").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    serde_json::from_slice(&got.body).expect("the journal parses")
}

async fn command(c: &HttpClient, admin: SocketAddr, verb: &str) -> StatusCode {
    post(c, admin, &format!("/api/v1/routes/web/{verb}"), &[]).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_skips_a_step_or_revives_a_rolled_back_candidate() {
    let _turn = SERIAL.lock().await;
    const RUNS: u64 = 30;
    let stable = Upstream::text("stable").await;
    let tags: Tags = Arc::default();
    let seen = tags.clone();
    let cand = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let tag = req.headers().get("x-probe").and_then(|v| v.to_str().ok()).unwrap_or("untagged").to_string();
        *seen.lock().expect("lock").entry(tag).or_default() += 1;
        async { Response::new(full("cand")) }
    })
    .await;
    let cfg = ConfigFile::new(&crash_config(stable.addr, cand.addr));
    let journal_file = cfg.dir.path().join("state").join("events.jsonl");
    let c = client();
    let started = Instant::now();
    let (mut stable_only, mut aborts, mut restarted_rolled_back) = (Vec::<String>::new(), 0, 0);
    let mut observed_before_kill = Vec::<Value>::new();
    let mut before_kill: Option<(String, Option<u64>)> = None;

    for run in 0..RUNS {
        let mut rng = fastrand::Rng::with_seed(0x7EE2_0000 + run);
        let path = cfg.path.clone();
        let mut v = tokio::task::spawn_blocking(move || Veer::spawn(&path)).await.expect("spawn");

        // The journal parses, keeps everything seen before the kill, and replays legally to
        // exactly the state the restarted process restored (read between two identical
        // journal reads, so that no transition slips in between).
        let mut consistent = None;
        for _ in 0..20 {
            let events = events_of(&c, v.admin).await;
            let st = route_status(&c, v.admin, "web").await;
            let again = events_of(&c, v.admin).await;
            let (phase, step) = replay(&events);
            if events == again && (st["phase"].as_str(), st["step"].as_u64()) == (Some(phase.as_str()), step) {
                consistent = Some((events, phase, step));
                break;
            }
        }
        let Some((events, phase, step)) = consistent else {
            panic!(
                "run {run}: the restored state never matched the journal: {}",
                route_status(&c, v.admin, "web").await
            )
        };
        assert!(
            events.len() >= observed_before_kill.len()
                && events[..observed_before_kill.len()] == observed_before_kill[..],
            "run {run}: the journal lost or rewrote events seen before the kill"
        );
        let text = std::fs::read_to_string(&journal_file).expect("journal file");
        for (n, line) in text.split_inclusive('\n').filter(|l| l.ends_with('\n') && !l.trim().is_empty()).enumerate() {
            assert!(serde_json::from_str::<Value>(line).is_ok(), "run {run}: journal line {} is torn: {line:?}", n + 1);
        }
        if let Some((was, was_step)) = &before_kill {
            let undone = events[observed_before_kill.len()..]
                .iter()
                .any(|e| matches!(e["kind"].as_str(), Some("rolled_back" | "retried")));
            if was == "progressing" && phase == "progressing" && !undone {
                assert!(step >= *was_step, "run {run}: step went back from {was_step:?} to {step:?}");
            }
        }

        // A rolled-back candidate gets no ordinary traffic after the restart, until a retry.
        match phase.as_str() {
            "rolled_back" => {
                restarted_rolled_back += 1;
                let tag = format!("{run}:restarted");
                for _ in 0..20 {
                    let got = try_get(&c, v.http, &[("x-probe", &tag)]).await.expect("request");
                    assert_eq!(got, (StatusCode::OK, Bytes::from("stable")), "run {run}");
                }
                assert_eq!(hits_tagged(&tags, &tag), 0, "run {run}: the rolled-back candidate received traffic");
                if rng.u8(0..4) != 0 {
                    assert_eq!(command(&c, v.admin, "retry").await, StatusCode::OK, "run {run}: retry");
                }
            }
            // An operator's undo of a promotion, so that the plan can run again.
            "promoted" => {
                assert_eq!(command(&c, v.admin, "abort").await, StatusCode::OK, "run {run}: abort");
                aborts += 1;
            }
            _ => {}
        }

        // Light traffic, an abort in some runs, and a SIGKILL at a seeded moment. Requests are
        // tagged with the run and an epoch that turns 1 once the candidate is rolled back: from
        // then on none may reach it.
        let epoch = Arc::new(AtomicU64::new(0));
        if route_status(&c, v.admin, "web").await["phase"] == "rolled_back" {
            epoch.store(1, Ordering::SeqCst);
            stable_only.push(format!("{run}:1"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (c, epoch, stop, addr) = (c.clone(), epoch.clone(), stop.clone(), v.http);
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(Duration::from_millis(10));
                for _ in 0..500 {
                    pace.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let tag = format!("{run}:{}", epoch.load(Ordering::SeqCst));
                    // Requests fail once the process is killed; that is expected here.
                    let _ = tokio::time::timeout(Duration::from_secs(2), try_get(&c, addr, &[("x-probe", &tag)])).await;
                }
            })
        };
        let t0 = Instant::now();
        let kill_at = Duration::from_millis(rng.u64(50..700));
        if rng.u8(0..10) < 3 {
            tokio::time::sleep(kill_at.mul_f64(rng.f64())).await;
            let answer = command(&c, v.admin, "abort").await;
            let now = route_status(&c, v.admin, "web").await;
            assert!(
                answer == StatusCode::OK || (answer == StatusCode::CONFLICT && now["phase"] == "rolled_back"),
                "run {run}: abort answered {answer}: {now}"
            );
            aborts += usize::from(answer == StatusCode::OK);
            assert_eq!(now["candidate_weight"], 0.0, "run {run}: {now}");
            // Requests built from here on must all stay on stable.
            epoch.store(1, Ordering::SeqCst);
            stable_only.push(format!("{run}:1"));
        }
        tokio::time::sleep(kill_at.saturating_sub(t0.elapsed())).await;
        observed_before_kill = events_of(&c, v.admin).await;
        let st = route_status(&c, v.admin, "web").await;
        before_kill = Some((st["phase"].as_str().unwrap_or("?").to_string(), st["step"].as_u64()));
        v.signal("KILL");
        let exit = tokio::task::spawn_blocking(move || v.wait_exit(Duration::from_secs(10))).await.expect("join");
        assert!(!exit.success(), "run {run}: killed, not exited");
        stop.store(true, Ordering::Relaxed);
        traffic.await.expect("traffic task");
        for tag in &stable_only {
            assert_eq!(
                hits_tagged(&tags, tag),
                0,
                "run {run}: requests sent after the rollback ({tag}) reached the candidate"
            );
        }
    }

    let path = cfg.path.clone();
    let v = tokio::task::spawn_blocking(move || Veer::spawn(&path)).await.expect("spawn");
    let events = events_of(&c, v.admin).await;
    replay(&events);
    let count = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    eprintln!(
        "crash under load: {RUNS} kills in {:?}; {} steps, {} promotions, {} rollbacks ({} aborts), {} retries, {} restarts rolled back, {} candidate hits",
        started.elapsed(),
        count("step"),
        count("promoted"),
        count("rolled_back"),
        aborts,
        count("retried"),
        restarted_rolled_back,
        cand.hits()
    );
    assert!(aborts >= 3 && restarted_rolled_back >= 3, "the seeds must exercise aborts and rolled-back restarts");
    assert!(count("step") >= 5 && count("retried") >= 1 && cand.hits() > 0, "the rollout must have moved");
}

// ---------------------------------------------------------------------------------------------
// Drain under load.

type TlsConnector = tokio_rustls::TlsConnector;

fn tls_connector(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("trust the test certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Sends one request on a fresh HTTP/1.1 connection over `io`: status and whole body.
async fn one_request<I>(io: I, id: &str) -> Result<(StatusCode, Bytes), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/slow")
        .header("host", "localhost")
        .header("x-req", id)
        .body(Full::<Bytes>::default())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("no response: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("{status} with a broken body: {e}"))?.to_bytes();
    Ok((status, body))
}

/// What one client request saw.
#[derive(Debug)]
struct Outcome {
    id: String,
    /// TLS: the handshake (so veer's accept) completed before the signal.
    accepted_before_signal: bool,
    result: Result<(StatusCode, Bytes), String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_completes_every_request_accepted_before_it_and_exits_zero() {
    let _turn = SERIAL.lock().await;
    let signalled = Arc::new(AtomicBool::new(false));
    let arrivals: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let inflight = Arc::new(AtomicUsize::new(0));
    let up = {
        let (signalled, arrivals, inflight) = (signalled.clone(), arrivals.clone(), inflight.clone());
        Upstream::start(move |req: Request<hyper::body::Incoming>| {
            let id = req.headers().get("x-req").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
            let before = !signalled.load(Ordering::SeqCst);
            arrivals.lock().expect("lock").insert(id.clone(), before);
            let inflight = inflight.clone();
            inflight.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                inflight.fetch_sub(1, Ordering::SeqCst);
                Response::new(full(format!("done {id}")))
            }
        })
        .await
    };
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let cfg = ConfigFile::new(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\ndrain_timeout = \"15s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        route(up.addr, None, "")
    ));
    std::fs::write(cfg.dir.path().join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(cfg.dir.path().join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    let path = cfg.path.clone();
    let mut veer = tokio::task::spawn_blocking(move || Veer::spawn(&path)).await.expect("spawn");
    let (http, https) = (veer.http, veer.tls.expect("TLS listener"));
    let connector = tls_connector(&cert);

    // Each client sends one slow request per fresh connection, 8 over TLS and 8 in clear text,
    // until one fails after the signal.
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let clients: Vec<_> = (0..16)
        .map(|n| {
            let (signalled, outcomes, connector) = (signalled.clone(), outcomes.clone(), connector.clone());
            tokio::spawn(async move {
                for i in 0..200 {
                    let id = format!("{n}-{i}");
                    let attempt = async {
                        let tcp = tokio::net::TcpStream::connect(if n % 2 == 0 { https } else { http })
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                        if n % 2 == 1 {
                            return Ok((false, one_request(tcp, &id).await));
                        }
                        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
                        let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
                        let accepted = !signalled.load(Ordering::SeqCst);
                        Ok::<_, String>((accepted, one_request(tls, &id).await))
                    };
                    let (accepted_before_signal, result) =
                        match tokio::time::timeout(Duration::from_secs(20), attempt).await {
                            Ok(Ok((accepted, r))) => (accepted, r),
                            Ok(Err(e)) => (false, Err(e)),
                            Err(_) => (false, Err("no answer within 20 s".into())),
                        };
                    // After the signal, keep going until veer stops taking connections.
                    let done = signalled.load(Ordering::SeqCst) && result.is_err();
                    outcomes.lock().expect("lock").push(Outcome { id, accepted_before_signal, result });
                    if done {
                        return;
                    }
                }
            })
        })
        .collect();

    eventually(Duration::from_secs(15), "a dozen slow requests are in flight", || async {
        inflight.load(Ordering::SeqCst) >= 12 && outcomes.lock().expect("lock").len() >= 48
    })
    .await;
    // One more connection, accepted before the signal, whose request is written after it.
    let late = {
        let tcp = tokio::net::TcpStream::connect(https).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        connector.connect(name, tcp).await.expect("TLS handshake")
    };
    let in_flight_at_signal = inflight.load(Ordering::SeqCst);
    signalled.store(true, Ordering::SeqCst);
    veer.signal("TERM");
    let admin = veer.admin;
    eventually(Duration::from_secs(10), "the drain has begun (readyz 503)", || async {
        get(&client(), admin, "/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let late = one_request(late, "late").await;
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client).await.expect("clients finish").expect("client task");
    }
    let exit = tokio::task::spawn_blocking(move || veer.wait_exit(Duration::from_secs(20))).await.expect("join");

    assert_eq!(late, Ok((StatusCode::OK, Bytes::from("done late"))), "a connection accepted before the signal");
    let outcomes = outcomes.lock().expect("lock");
    let arrivals = arrivals.lock().expect("lock");
    let (mut accepted, mut at_upstream, mut refused) = (0, 0, 0);
    for o in outcomes.iter() {
        let reached_upstream_before = arrivals.get(&o.id).copied().unwrap_or(false);
        accepted += usize::from(o.accepted_before_signal);
        at_upstream += usize::from(reached_upstream_before);
        match &o.result {
            Ok((status, body)) => {
                assert_eq!(*status, StatusCode::OK, "{o:?}");
                assert_eq!(body, &Bytes::from(format!("done {}", o.id)), "{o:?}");
            }
            Err(e) => {
                assert!(!e.contains("broken body"), "request {} got a response head and then a broken body: {e}", o.id);
                assert!(
                    !o.accepted_before_signal && !reached_upstream_before,
                    "request {} was accepted before the signal but failed: {e}",
                    o.id
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "drain under load: {} requests, {in_flight_at_signal} in flight at the signal; {accepted} TLS connections accepted before it, {at_upstream} requests at the upstream before it, {refused} refused after it",
        outcomes.len()
    );
    assert!(in_flight_at_signal >= 8, "only {in_flight_at_signal} requests were in flight at the signal");
    assert!(exit.success(), "exit status {exit:?}");
}
