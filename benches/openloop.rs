//! Load helpers for the proxy benchmark (`benches/proxy_bench.sh`), which builds and runs this
//! binary itself. Two modes:
//!
//! - `rate ADDR RATE SECONDS [CONNS] [WARMUP_SECONDS]`: an open-loop HTTP/1.1 generator. Request
//!   `i` is *scheduled* at `start + i / RATE` and handed to connection `i mod CONNS` (each
//!   connection sends at `RATE / CONNS`, as wrk2 does); its latency is measured from the
//!   scheduled time, not from when it was actually written, so a stalled proxy is charged for
//!   every request that should have gone out meanwhile (coordinated-omission correction).
//!   Prints one line: `sent= ok= errors= late= achieved_rps= p50_us= p90_us= p99_us= p999_us=
//!   max_us= sched_lag_p99_us=`. `sched_lag` is how late the generator's own timer woke up; it
//!   is part of the latencies, so it bounds the generator's error.
//! - `hold ADDR CONNS SECONDS`: opens CONNS keep-alive connections, sends one `GET /` on each,
//!   reads the answer and keeps them open and idle. Prints `ready open=N failed=M` once all
//!   are set up, then `alive=N` every second, and exits after SECONDS.
//!
//! ADDR is `IP:PORT`. Run by hand: `cargo bench --bench openloop -- rate 127.0.0.1:8080 2000 10`.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const USAGE: &str =
    "usage: openloop rate ADDR RATE SECONDS [CONNS] [WARMUP_SECONDS]\n       openloop hold ADDR CONNS SECONDS";

/// How long a request may take before it is abandoned and counted as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // `cargo bench` with no filter runs every bench binary with `--bench`: nothing to do.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.is_empty() {
        eprintln!("{USAGE}");
        return;
    }
    let result = match args[0].as_str() {
        "rate" => parse_rate(&args[1..]).and_then(|cfg| runtime().block_on(rate(cfg))),
        "hold" => parse_hold(&args[1..]).and_then(|cfg| runtime().block_on(hold(cfg))),
        _ => Err(USAGE.to_string()),
    };
    if let Err(e) = result {
        eprintln!("openloop: {e}");
        std::process::exit(1);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str, default: Option<T>) -> Result<T, String> {
    match args.get(i) {
        Some(s) => s.parse().map_err(|_| format!("{name}: cannot parse {s:?}\n{USAGE}")),
        None => default.ok_or_else(|| format!("missing {name}\n{USAGE}")),
    }
}

struct RateCfg {
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    conns: usize,
    warmup: Duration,
}

fn parse_rate(args: &[String]) -> Result<RateCfg, String> {
    let cfg = RateCfg {
        addr: arg(args, 0, "ADDR", None)?,
        rate: arg(args, 1, "RATE", None)?,
        duration: Duration::from_secs_f64(arg(args, 2, "SECONDS", None)?),
        conns: arg(args, 3, "CONNS", Some(64))?,
        warmup: Duration::from_secs_f64(arg(args, 4, "WARMUP_SECONDS", Some(1.0))?),
    };
    if cfg.rate.is_nan() || cfg.rate <= 0.0 || cfg.conns == 0 || cfg.duration.is_zero() {
        return Err(format!("RATE, CONNS and SECONDS must be positive\n{USAGE}"));
    }
    Ok(cfg)
}

struct HoldCfg {
    addr: SocketAddr,
    conns: usize,
    seconds: u64,
}

fn parse_hold(args: &[String]) -> Result<HoldCfg, String> {
    Ok(HoldCfg {
        addr: arg(args, 0, "ADDR", None)?,
        conns: arg(args, 1, "CONNS", None)?,
        seconds: arg(args, 2, "SECONDS", None)?,
    })
}

type Sender = http1::SendRequest<Empty<Bytes>>;

/// One keep-alive HTTP/1.1 client connection; its driver runs as a task that decrements
/// `alive` when the connection ends.
async fn connect(addr: SocketAddr, alive: Option<Arc<AtomicUsize>>) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    if let Some(a) = &alive {
        a.fetch_add(1, Ordering::Relaxed);
    }
    tokio::spawn(async move {
        let _ = conn.await;
        if let Some(a) = alive {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    });
    Ok(sender)
}

/// Sends `GET /` and reads the whole answer; true for a 2xx.
async fn get(sender: &mut Sender, host: &str) -> Result<bool, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get("/").header("host", host).body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(ok)
}

#[derive(Default)]
struct ConnResult {
    /// Latencies (ns, from the scheduled send time) of the requests scheduled after warm-up.
    latencies: Vec<u64>,
    errors: u64,
}

async fn rate(cfg: RateCfg) -> Result<(), String> {
    let host = cfg.addr.to_string();
    let mut senders = Vec::with_capacity(cfg.conns);
    for _ in 0..cfg.conns {
        senders.push(connect(cfg.addr, None).await?);
    }

    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + cfg.warmup;
    let total = ((cfg.warmup + cfg.duration).as_secs_f64() * cfg.rate).round() as u64;

    let mut txs = Vec::with_capacity(cfg.conns);
    let mut workers = Vec::with_capacity(cfg.conns);
    for mut sender in senders {
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        txs.push(tx);
        let (host, addr) = (host.clone(), cfg.addr);
        workers.push(tokio::spawn(async move {
            let mut out = ConnResult::default();
            while let Some(scheduled) = rx.recv().await {
                let ok = match tokio::time::timeout(REQUEST_TIMEOUT, get(&mut sender, &host)).await {
                    Ok(Ok(ok)) => ok,
                    _ => false,
                };
                let latency = scheduled.elapsed();
                if scheduled >= measure_from {
                    out.latencies.push(latency.as_nanos() as u64);
                    out.errors += u64::from(!ok);
                }
                if !ok && sender.is_closed() {
                    // Reconnect; while that fails, the queued requests fail quickly too.
                    if let Ok(Ok(s)) = tokio::time::timeout(REQUEST_TIMEOUT, connect(addr, None)).await {
                        sender = s;
                    }
                }
            }
            out
        }));
    }

    // The schedule runs on its own thread with the OS's high-resolution sleep: tokio's timer
    // has a 1 ms granularity, far coarser than the 200 µs gap between requests at 5k/s.
    let rate = cfg.rate;
    let dispatcher = std::thread::spawn(move || {
        let mut lags = Vec::with_capacity(total as usize);
        for i in 0..total {
            let at = start + Duration::from_nanos((i as f64 * 1e9 / rate) as u64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            lags.push(at.elapsed().as_nanos() as u64);
            // A worker that has gone away has already counted its failures.
            let _ = txs[(i as usize) % txs.len()].send(at);
        }
        lags
    });

    let mut lags = tokio::task::spawn_blocking(move || dispatcher.join().expect("dispatcher thread"))
        .await
        .map_err(|e| e.to_string())?;
    let finished = Instant::now();

    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut late = 0u64;
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT * 2;
    for w in workers {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok(r)) => {
                latencies.extend(r.latencies);
                errors += r.errors;
            }
            _ => late += 1,
        }
    }
    let sent = latencies.len() as u64;
    let elapsed = finished.saturating_duration_since(measure_from).as_secs_f64().max(1e-9);
    latencies.sort_unstable();
    lags.sort_unstable();
    let us = |v: &[u64], q: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx] as f64 / 1000.0
    };
    println!(
        "sent={sent} ok={} errors={errors} late={late} achieved_rps={:.0} p50_us={:.0} p90_us={:.0} p99_us={:.0} p999_us={:.0} max_us={:.0} sched_lag_p99_us={:.0}",
        sent - errors,
        sent as f64 / elapsed,
        us(&latencies, 0.50),
        us(&latencies, 0.90),
        us(&latencies, 0.99),
        us(&latencies, 0.999),
        us(&latencies, 1.0),
        us(&lags, 0.99),
    );
    Ok(())
}

async fn hold(cfg: HoldCfg) -> Result<(), String> {
    let host = cfg.addr.to_string();
    let alive = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(cfg.conns);
    for _ in 0..cfg.conns {
        let (host, alive, limit, addr) = (host.clone(), alive.clone(), limit.clone(), cfg.addr);
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.ok()?;
            let opened = async {
                let mut s = connect(addr, Some(alive)).await?;
                get(&mut s, &host).await.map(|_| s)
            };
            tokio::time::timeout(REQUEST_TIMEOUT, opened).await.ok()?.ok()
        }));
    }
    let mut kept = Vec::with_capacity(cfg.conns);
    let mut failed = 0usize;
    for t in tasks {
        match t.await {
            Ok(Some(s)) => kept.push(s),
            _ => failed += 1,
        }
    }
    println!("ready open={} failed={failed}", kept.len());
    let end = tokio::time::Instant::now() + Duration::from_secs(cfg.seconds);
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("alive={}", alive.load(Ordering::Relaxed));
    }
    drop(kept);
    Ok(())
}
