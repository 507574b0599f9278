//! `veer demo`: the whole story on loopback in about a minute.
//!
//! Built-in stable and candidate upstreams, built-in traffic, and the real proxy, controller
//! and judge (no shortcuts): the candidate walks its plan, goes bad partway through (errors or
//! latency, `--scenario`), is snapped back, and the report is printed. `--scenario healthy`
//! shows a full promotion. On a terminal the view redraws; otherwise it prints a line per
//! transition. `veer demo --fleet` (in `demo_fleet`) tells the same story across three
//! replicas sharing one rollout through etcd, with the upstreams and traffic defined here.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::status_view;
use crate::rollout::Phase;
use crate::server::Proxy;
use crate::status::RouteStatus;

/// How the candidate misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoScenario {
    /// 30% of its requests fail with 500.
    Errors,
    /// Every request gets 150 ms slower.
    Latency,
    /// It stays healthy and is promoted.
    Healthy,
}

/// Requests per second of built-in traffic, over all workers.
pub(super) const RPS: u64 = 300;
/// Traffic workers (each sends `RPS / WORKERS` per second).
pub(super) const WORKERS: u64 = 6;
const LIMIT: Duration = Duration::from_secs(90);
/// When the candidate goes bad, counted from the start of the traffic.
pub(super) const GOES_BAD_AFTER: Duration = Duration::from_secs(10);

/// Runs the demo; returns an error message when something could not start.
pub async fn run(scenario: DemoScenario) -> Result<(), String> {
    let bad = Arc::new(AtomicBool::new(false));
    let stable = upstream("stable v1.4.2", None, scenario).await?;
    let candidate = upstream("candidate v1.5.0", Some(bad.clone()), scenario).await?;
    let dir = tempfile_dir("veer-demo")?;
    let config = dir.join("veer.toml");
    std::fs::write(&config, config_text(stable, candidate))
        .map_err(|e| format!("cannot write the demo config: {e}"))?;
    let proxy = Proxy::start(&config).await.map_err(|e| e.to_string())?;
    println!(
        "veer demo: proxy on http://{}, admin on http://{} (state in {})",
        proxy.http_addr(),
        proxy.admin_addr(),
        dir.display()
    );
    println!("stable v1.4.2 and candidate v1.5.0 on loopback; {RPS} requests/s of built-in traffic");
    match scenario {
        DemoScenario::Healthy => {
            println!("scenario: a healthy candidate walks 5% -> 25% -> 50% -> 100% and is promoted\n")
        }
        DemoScenario::Errors => println!(
            "scenario: after ~{}s the candidate starts failing 30% of its requests\n",
            GOES_BAD_AFTER.as_secs()
        ),
        DemoScenario::Latency => {
            println!("scenario: after ~{}s the candidate gets 150 ms slower\n", GOES_BAD_AFTER.as_secs())
        }
    }

    let sent = Arc::new(AtomicU64::new(0));
    let traffic: Vec<_> = (0..WORKERS).map(|_| tokio::spawn(load(proxy.http_addr(), sent.clone()))).collect();
    let outcome = watch(&proxy, scenario, &bad).await;
    for t in traffic {
        t.abort();
    }
    let status = proxy.operations().snapshot().route("shop").map(|r| RouteStatus::of(r));
    let events = proxy.operations().journal.events(Some("shop"), None);
    proxy.drain().await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(s) = status {
        println!("\n{}", crate::report::render(&s, &events));
    }
    println!("{outcome} ({} requests sent)", sent.load(Ordering::Relaxed));
    Ok(())
}

/// Redraws (or prints transitions) until the rollout ends or the time limit passes.
async fn watch(proxy: &Proxy, scenario: DemoScenario, bad: &AtomicBool) -> String {
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut rates = status_view::Rates::default();
    let mut last_phase = None;
    let mut last_step = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if scenario != DemoScenario::Healthy && !bad.load(Ordering::Relaxed) && started.elapsed() >= GOES_BAD_AFTER {
            bad.store(true, Ordering::Relaxed);
            if !tty {
                println!("+{:>5.1}s  the candidate goes bad", started.elapsed().as_secs_f64());
            }
        }
        let Some(status) = proxy.operations().snapshot().route("shop").map(|r| RouteStatus::of(r)) else {
            return "the demo route disappeared".into();
        };
        if tty {
            print!("\x1b[2J\x1b[H{}", status_view::render(std::slice::from_ref(&status), Some(&mut rates)));
            println!(
                "elapsed {:.0}s{}",
                started.elapsed().as_secs_f64(),
                if bad.load(Ordering::Relaxed) { "   (the candidate has gone bad)" } else { "" }
            );
        } else if last_phase != Some(status.phase) || last_step != status.step {
            println!(
                "+{:>5.1}s  {:<12} candidate {:>5.1}%  {}",
                started.elapsed().as_secs_f64(),
                status.phase.label(),
                status.candidate_weight,
                status.last_transition.as_ref().map_or("", |t| t.reason.as_str())
            );
        }
        (last_phase, last_step) = (Some(status.phase), status.step);
        match status.phase {
            Phase::RolledBack => return format!("rolled back after {:.1}s", started.elapsed().as_secs_f64()),
            Phase::Promoted => return format!("promoted after {:.1}s", started.elapsed().as_secs_f64()),
            _ if started.elapsed() > LIMIT => return "time limit reached".into(),
            _ => {}
        }
    }
}

/// The demo's config: one route `shop`, the plan and the rules the demos are judged by.
pub(super) fn config_text(stable: SocketAddr, candidate: SocketAddr) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[routes]]
name = "shop"
[routes.stable]
version = "v1.4.2"
endpoints = ["{stable}"]
[routes.candidate]
version = "v1.5.0"
endpoints = ["{candidate}"]
[routes.rollout]
steps = [5, 25, 50, 100]
step_interval = "6s"
min_requests = 50
[routes.rollback]
window = "10s"
max_error_rate = 0.05
max_p99 = "500ms"
"#
    )
}

/// A fresh directory `<tmp>/<name>-<pid>` for the demo's configs and state.
pub(super) fn tempfile_dir(name: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A small upstream: a few milliseconds of work per request; the candidate misbehaves once
/// `bad` is set.
pub(super) async fn upstream(
    name: &'static str,
    bad: Option<Arc<AtomicBool>>,
    scenario: DemoScenario,
) -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("cannot start the {name} upstream: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bad = bad.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let is_bad = bad.as_ref().is_some_and(|b| b.load(Ordering::Relaxed));
                    async move {
                        let mut work = Duration::from_millis(2 + fastrand::u64(0..6));
                        if is_bad && scenario == DemoScenario::Latency {
                            work += Duration::from_millis(150);
                        }
                        tokio::time::sleep(work).await;
                        let fail = is_bad && scenario == DemoScenario::Errors && fastrand::u8(0..10) < 3;
                        let mut r = Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
                        if fail {
                            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

/// One traffic worker: `RPS / WORKERS` requests per second, bounded by the demo's limit.
pub(super) async fn load(proxy: SocketAddr, sent: Arc<AtomicU64>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut every = tokio::time::interval(Duration::from_micros(1_000_000 * WORKERS / RPS));
    let uri: http::Uri = format!("http://{proxy}/checkout").parse().expect("valid URI");
    let deadline = Instant::now() + LIMIT + Duration::from_secs(5);
    while Instant::now() < deadline {
        every.tick().await;
        if let Ok(resp) = client.get(uri.clone()).await {
            let _ = resp.into_body().collect().await;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
}
