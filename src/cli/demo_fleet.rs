//! `veer demo --fleet`: the demo's story told by a fleet — three replicas in this process
//! sharing one rollout through etcd.
//!
//! Each replica is a real [`Proxy`] with the single demo's route and plan plus a `[cluster]`
//! table (same prefix, its own node name and ports), and its own candidate upstream. The
//! built-in traffic is spread over the three. After [`GOES_BAD_AFTER`] the candidate upstream
//! of ONE replica goes bad (`--scenario errors` or `latency`): that replica's local judge, or
//! the leader's judge of the merged traffic, trips, and every replica snaps back together,
//! because they all follow the one record in etcd. `--scenario healthy` promotes fleet-wide.
//! The view shows each replica's weight, standing and leadership, the fleet's record and the
//! merged windows; the end shows the report (history read from the fleet, through a replica's
//! admin API) and which judge tripped.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::admin_client::{AdminArgs, AdminClient};
use super::demo::{DemoScenario, GOES_BAD_AFTER, RPS, WORKERS, config_text, load, tempfile_dir, upstream};
use super::demo_etcd::DemoEtcd;
use super::status_view::inert;
use crate::rollout::Phase;
use crate::rollout::event::Event;
use crate::rollout::evidence::Cause;
use crate::rollout::fleet_status::{FleetRecord, MergedWindows};
use crate::rollout::machine::EventKind;
use crate::server::Proxy;
use crate::status::RouteStatus;

/// The replicas' node names; the last one's candidate goes bad.
const NODES: [&str; 3] = ["edge-1", "edge-2", "edge-3"];

/// The whole fleet demo ends by then, whatever happens.
const LIMIT: Duration = Duration::from_secs(60);

/// The demo's route.
const ROUTE: &str = "shop";

/// One replica of the demo fleet.
struct Replica {
    node: &'static str,
    proxy: Proxy,
}

/// What one look at the fleet saw.
struct Look {
    /// Each replica's status of the route, in [`NODES`] order.
    statuses: Vec<Option<RouteStatus>>,
}

/// Runs the fleet demo against `etcd` (a URL of an existing etcd), or an etcd of its own.
pub async fn run(scenario: DemoScenario, etcd: Option<String>) -> Result<(), String> {
    let dir = Scratch(tempfile_dir("veer-demo-fleet")?);
    let work = async {
        let etcd = match etcd {
            Some(url) => DemoEtcd::existing(url),
            None => DemoEtcd::start(&dir.0.join("etcd")).await.map_err(|e| e.to_string())?,
        };
        let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let prefix = format!("/veer-demo/{}-{millis}", std::process::id());
        let told = story(scenario, &etcd, &prefix, &dir.0).await;
        etcd.clean(&prefix).await;
        told
    };
    // On Ctrl-C or SIGTERM the story is dropped: the proxies stop and etcd is killed; the
    // scratch directory goes when `dir` does.
    tokio::select! {
        told = work => told,
        () = interrupted() => Err("interrupted; the demo's etcd and files are removed".into()),
    }
}

/// Removes the demo's scratch directory (configs, state, etcd's data) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Resolves on Ctrl-C or SIGTERM (never, when neither can be listened for).
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    let int = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = term => {}
        () = int => {}
    }
}

/// Starts the fleet, runs the traffic and the view until the rollout ends, prints the report.
async fn story(scenario: DemoScenario, etcd: &DemoEtcd, prefix: &str, dir: &Path) -> Result<(), String> {
    let bad = Arc::new(AtomicBool::new(false));
    let stable = upstream("stable v1.4.2", None, scenario).await?;
    let mut replicas = Vec::with_capacity(NODES.len());
    for (i, node) in NODES.into_iter().enumerate() {
        let goes_bad = (i + 1 == NODES.len()).then(|| bad.clone());
        let candidate = upstream("candidate v1.5.0", goes_bad, scenario).await?;
        // Each replica in a directory of its own: its own state (journal) next to its config.
        let home = dir.join(node);
        std::fs::create_dir_all(&home).map_err(|e| format!("cannot create {}: {e}", home.display()))?;
        let config = home.join("veer.toml");
        let text = format!("{}{}", config_text(stable, candidate), cluster_text(etcd.url(), prefix, node));
        std::fs::write(&config, text).map_err(|e| format!("cannot write the demo config: {e}"))?;
        let proxy = Proxy::start(&config).await.map_err(|e| format!("replica {node}: {e}"))?;
        replicas.push(Replica { node, proxy });
    }
    println!("veer demo --fleet: three replicas sharing one rollout through etcd at {}", etcd.url());
    for r in &replicas {
        println!("  replica {}  proxy http://{}  admin http://{}", r.node, r.proxy.http_addr(), r.proxy.admin_addr());
    }
    let bad_node = NODES[NODES.len() - 1];
    println!(
        "stable v1.4.2 and, per replica, its own candidate v1.5.0 upstream; {RPS} requests/s spread over the three"
    );
    match scenario {
        DemoScenario::Healthy => {
            println!("scenario: a healthy candidate walks 5% -> 25% -> 50% -> 100% and is promoted fleet-wide\n")
        }
        DemoScenario::Errors => println!(
            "scenario: after ~{}s {bad_node}'s candidate upstream starts failing 30% of its requests; \
             the others stay healthy\n",
            GOES_BAD_AFTER.as_secs()
        ),
        DemoScenario::Latency => println!(
            "scenario: after ~{}s {bad_node}'s candidate upstream gets 150 ms slower; the others stay healthy\n",
            GOES_BAD_AFTER.as_secs()
        ),
    }

    let sent = Arc::new(AtomicU64::new(0));
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.proxy.http_addr()).collect();
    let traffic: Vec<_> =
        (0..WORKERS as usize).map(|w| tokio::spawn(load(addrs[w % addrs.len()], sent.clone()))).collect();
    let outcome = watch(&replicas, scenario, &bad, bad_node).await;
    for t in traffic {
        t.abort();
    }
    let last = look(&replicas);
    let report = report(replicas[0].proxy.admin_addr()).await;
    let events = match replicas[0].proxy.operations().fleet() {
        Some(f) => f.events(Some(ROUTE), 50).await.map_err(|e| e.to_string()),
        None => Err("replica without a fleet".to_string()),
    };
    drain_all(replicas).await;
    match report {
        Ok(text) => println!("\n{text}"),
        Err(e) => println!("\n(no report: {e})"),
    }
    match events {
        Ok(events) => println!("{}", tripped(&events)),
        Err(e) => println!("(which judge tripped is unknown: {e})"),
    }
    let finals: Vec<String> = NODES
        .iter()
        .zip(&last.statuses)
        .map(|(n, s)| format!("{n} {}", s.as_ref().map_or("-".into(), |s| format!("{:.2}%", s.candidate_weight))))
        .collect();
    println!("candidate weight at the end: {}", finals.join(", "));
    println!("{outcome} ({} requests sent)", sent.load(Ordering::Relaxed));
    Ok(())
}

/// Drains every replica at once.
async fn drain_all(replicas: Vec<Replica>) {
    let drains: Vec<_> = replicas.into_iter().map(|r| tokio::spawn(r.proxy.drain())).collect();
    for d in drains {
        let _ = d.await;
    }
}

/// The `[cluster]` table of `node`: short lease and publish interval, so the demo's fleet
/// reacts within a second or two.
fn cluster_text(etcd: &str, prefix: &str, node: &str) -> String {
    format!(
        "[cluster]\netcd = [\"{etcd}\"]\nprefix = \"{prefix}\"\nnode = \"{node}\"\nlease_ttl = \"2s\"\npublish_interval = \"100ms\"\n"
    )
}

/// Every replica's status of the route, now.
fn look(replicas: &[Replica]) -> Look {
    let statuses =
        replicas.iter().map(|r| r.proxy.operations().snapshot().route(ROUTE).map(|s| RouteStatus::of(s))).collect();
    Look { statuses }
}

impl Look {
    /// The newest record any replica has read.
    fn record(&self) -> Option<&FleetRecord> {
        self.statuses.iter().flatten().filter_map(|s| s.fleet.as_ref()?.record.as_ref()).max_by_key(|r| r.revision)
    }

    /// The merged windows, from the leader when it has them, else from any replica.
    fn merged(&self) -> Option<&MergedWindows> {
        let fleets = || self.statuses.iter().flatten().filter_map(|s| s.fleet.as_ref());
        fleets()
            .find(|f| f.leader.as_deref() == Some(f.node.as_str()) && f.merged.is_some())
            .or_else(|| fleets().find(|f| f.merged.is_some()))
            .and_then(|f| f.merged.as_ref())
    }

    /// The phase every replica shows, when they all show the same one.
    fn common_phase(&self) -> Option<Phase> {
        let mut phases = self.statuses.iter().map(|s| s.as_ref().map(|s| s.phase));
        let first = phases.next()??;
        phases.all(|p| p == Some(first)).then_some(first)
    }

    /// What changes the non-terminal view prints a block for (not the ever-moving counts).
    fn key(&self) -> String {
        let mut k = self.record().map_or("-".into(), |r| format!("{:?} {:?}", r.phase, r.step));
        for s in &self.statuses {
            let _ = match s {
                Some(s) => write!(
                    k,
                    "|{:.2} {:?} {:?}",
                    s.candidate_weight,
                    s.fleet.as_ref().map(|f| f.standing),
                    s.fleet.as_ref().map(|f| f.leader.as_deref() == Some(f.node.as_str()))
                ),
                None => write!(k, "|-"),
            };
        }
        k
    }

    /// The fleet's record, one line per replica, the merged windows.
    fn render(&self, bad_node: Option<&str>) -> String {
        let mut s = String::new();
        match self.record() {
            Some(r) => {
                let steps = self.statuses.iter().flatten().next().map_or(0, |s| s.steps.len());
                let step = r.step.map(|i| format!(" step {}/{steps}", i + 1)).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  fleet     {}{step}  candidate {:.2}%  (record rev {}, written by {})",
                    r.phase.label(),
                    r.candidate_weight,
                    r.revision,
                    inert(&r.writer)
                );
            }
            None => {
                let _ = writeln!(s, "  fleet     no record yet: every replica serves stable only");
            }
        }
        for (node, st) in NODES.iter().zip(&self.statuses) {
            let Some(st) = st else {
                let _ = writeln!(s, "  replica   {node:<8} (route missing)");
                continue;
            };
            let (standing, leads) = st
                .fleet
                .as_ref()
                .map_or(("-", false), |f| (f.standing.label(), f.leader.as_deref() == Some(f.node.as_str())));
            let mut line = format!("  replica   {node:<8} {:>6.2}%  {standing:<9}", st.candidate_weight);
            if leads {
                line.push_str("  leader");
            }
            if bad_node == Some(*node) {
                line.push_str("  (its candidate upstream has gone bad)");
            }
            let _ = writeln!(s, "{}", line.trim_end());
        }
        if let Some(m) = self.merged() {
            let p99 = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1}ms"));
            let _ = writeln!(
                s,
                "  merged    stable {} req {:.2}% err p99 {}   candidate {} req {:.2}% err p99 {}",
                m.stable.requests,
                m.stable.error_rate * 100.0,
                p99(m.stable.p99_ms),
                m.candidate.requests,
                m.candidate.error_rate * 100.0,
                p99(m.candidate.p99_ms)
            );
        }
        s
    }
}

/// Redraws (or prints a block per change) until every replica shows the rollout's end, or the
/// time limit passes.
async fn watch(replicas: &[Replica], scenario: DemoScenario, bad: &AtomicBool, bad_node: &str) -> String {
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last_key = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let elapsed = started.elapsed().as_secs_f64();
        if scenario != DemoScenario::Healthy && !bad.load(Ordering::Relaxed) && started.elapsed() >= GOES_BAD_AFTER {
            bad.store(true, Ordering::Relaxed);
            if !tty {
                println!(
                    "+{elapsed:>5.1}s  {bad_node}'s candidate goes bad (the other replicas' candidates stay healthy)"
                );
            }
        }
        let now = look(replicas);
        let gone_bad = bad.load(Ordering::Relaxed).then_some(bad_node);
        if tty {
            print!("\x1b[2J\x1b[Hveer demo --fleet: {ROUTE} on three replicas, one rollout\n{}", now.render(gone_bad));
            println!("  elapsed {elapsed:.0}s");
        } else {
            let key = now.key();
            if key != last_key {
                print!("+{elapsed:>5.1}s\n{}", now.render(gone_bad));
                last_key = key;
            }
        }
        let settled = |w: f64| now.statuses.iter().flatten().all(|s| s.candidate_weight == w);
        match now.common_phase() {
            Some(Phase::RolledBack) if settled(0.0) => return format!("rolled back after {elapsed:.1}s"),
            Some(Phase::Promoted) if settled(100.0) => return format!("promoted after {elapsed:.1}s"),
            _ if started.elapsed() > LIMIT => return "time limit reached".into(),
            _ => {}
        }
    }
}

/// The route's report from a replica's admin API (its history read from the fleet).
async fn report(admin: SocketAddr) -> Result<String, String> {
    let client = AdminClient::new(&AdminArgs { admin: format!("http://{admin}"), token_file: None })?;
    let answer = client.get(&format!("/api/v1/routes/{ROUTE}/report")).await?;
    if answer.status != http::StatusCode::OK {
        return Err(format!("{} ({})", answer.error_message(), answer.status));
    }
    Ok(answer.body)
}

/// Which judge failed the candidate, from the fleet's last rollback.
fn tripped(events: &[Event]) -> String {
    let Some(e) = events.iter().rev().find(|e| e.kind == EventKind::RolledBack) else {
        return if events.iter().any(|e| e.kind == EventKind::Promoted) {
            "no judge tripped: the candidate was promoted on every replica".into()
        } else {
            "no judge tripped".into()
        };
    };
    let evidence = e.evidence.clone().unwrap_or_default();
    let rule = evidence.rule.as_ref().map_or("?", Cause::label);
    let node = evidence.fleet.as_ref().map_or("?", |f| f.node.as_str());
    match evidence.fleet.as_ref().map(|f| f.judge.as_str()) {
        Some("local") => format!(
            "tripped: {}'s local judge (rule {}) on its own traffic; the fleet followed its rollback",
            inert(node),
            inert(rule)
        ),
        Some("merged") => {
            format!("tripped: the leader {}'s judge of the fleet's merged traffic (rule {})", inert(node), inert(rule))
        }
        _ => format!("rolled back: {}", inert(&e.reason)),
    }
}
