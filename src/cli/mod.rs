//! The command line: `veer run`, `check`, `status` and the rollout verbs.
//!
//! Exit codes: 0 ok, 1 refused or failed (message on stderr), 2 usage error (clap's own).

mod admin_client;
mod demo;
mod demo_etcd;
mod demo_fleet;
mod status_view;

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http::StatusCode;

use crate::config::{Config, RouteConfig, Strategy};
use crate::server::{Proxy, Signals, run_until_signalled};
use crate::status::RouteStatus;
use crate::telemetry::{LogFormat, init_logging};
use admin_client::{AdminArgs, AdminClient};

/// veer: a progressive-delivery proxy.
#[derive(Debug, Parser)]
#[command(name = "veer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(short, long, env = "VEER_CONFIG", default_value = "veer.toml")]
        config: PathBuf,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file and summarise its routes and plans.
    Check {
        /// Config file.
        file: PathBuf,
    },
    /// Show routes: phase, weights and per-version window figures.
    Status {
        /// Only this route.
        route: Option<String>,
        /// Redraw every second.
        #[arg(long)]
        watch: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Jump the candidate to 100% and finish the rollout.
    Promote(RolloutVerb),
    /// Roll the candidate back to 0% now.
    Abort(RolloutVerb),
    /// Hold the rollout at its current step.
    Pause(RolloutVerb),
    /// Continue a paused rollout.
    Resume(RolloutVerb),
    /// Restart a rolled-back rollout from its first step.
    Retry(RolloutVerb),
    /// Print the route's rollout report in Markdown.
    Report {
        /// Route name.
        route: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run a config's plan and judge against synthetic traffic in virtual time.
    Simulate(SimulateArgs),
    /// A self-contained show on loopback: a candidate goes bad and is snapped back.
    Demo {
        /// How the candidate misbehaves.
        #[arg(long, value_enum, default_value = "errors")]
        scenario: demo::DemoScenario,
        /// Three replicas in one fleet sharing the rollout through etcd (started on loopback
        /// from the `etcd` binary, unless `--etcd` names one); the candidate goes bad on one.
        #[arg(long)]
        fleet: bool,
        /// With `--fleet`: an etcd you already run (client URL); the demo's keys go under a
        /// fresh `/veer-demo/` prefix and are deleted at the end.
        #[arg(long, requires = "fleet", value_name = "URL")]
        etcd: Option<String>,
    },
}

/// `veer simulate`'s options.
#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Config file.
    file: PathBuf,
    /// Route to simulate (default: the first route with a candidate, else the first route).
    #[arg(long)]
    route: Option<String>,
    /// How the synthetic candidate behaves: healthy, fail, errors-5pct, latency-1.5x, tail-20ms.
    #[arg(long, default_value = "healthy")]
    scenario: crate::simulate::Scenario,
    /// Offered load, requests per second.
    #[arg(long, default_value_t = crate::simulate::DEFAULT_RPS)]
    rps: f64,
    /// Seed of the (first) run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many seeded rollouts and print their statistics instead of one timeline.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    runs: Option<u64>,
    /// Simulate a fleet of this many replicas sharing the traffic and one rollout: each judges
    /// its own share, the leader judges the sum of their published counters.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    replicas: u64,
    /// With --replicas above 1: how often each replica publishes its counters for the leader
    /// (default: the config's [cluster] publish_interval, else 250ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    publish_interval: Option<std::time::Duration>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RolloutVerb {
    /// Route name.
    route: String,
    /// Why (recorded in the journal).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Verb::Run { config, log_format } => run(&config, log_format),
        Verb::Check { file } => check(&file),
        Verb::Status { route, watch, json, admin } => status(route.as_deref(), watch, json, &admin),
        Verb::Promote(v) => rollout_verb("promote", &v),
        Verb::Abort(v) => rollout_verb("abort", &v),
        Verb::Pause(v) => rollout_verb("pause", &v),
        Verb::Resume(v) => rollout_verb("resume", &v),
        Verb::Retry(v) => rollout_verb("retry", &v),
        Verb::Report { route, admin } => report(&route, &admin),
        Verb::Simulate(args) => simulate(&args),
        Verb::Demo { scenario, fleet, etcd } => run_demo(scenario, fleet, etcd),
    }
}

fn run_demo(scenario: demo::DemoScenario, fleet: bool, etcd: Option<String>) -> ExitCode {
    init_logging(LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::from(1);
        }
    };
    let told = if fleet { rt.block_on(demo_fleet::run(scenario, etcd)) } else { rt.block_on(demo::run(scenario)) };
    match told {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer: demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn simulate(a: &SimulateArgs) -> ExitCode {
    use crate::simulate;
    let config = match Config::load(&a.file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let route = match simulated_route(&config, a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::from(1);
        }
    };
    // One replica is the single-proxy simulation, whose judge alone spends the budget.
    let fleet = (a.replicas > 1).then(|| simulate::fleet::FleetOptions {
        replicas: usize::try_from(a.replicas).unwrap_or(usize::MAX),
        publish_interval: a
            .publish_interval
            .or(config.cluster.as_ref().map(|c| c.publish_interval))
            .unwrap_or(simulate::fleet::DEFAULT_PUBLISH_INTERVAL),
    });
    let out = match (a.runs, fleet) {
        (Some(n), None) => {
            let summary = simulate::aggregate(&simulate::run_many(route, a.scenario, a.rps, a.seed, n));
            if a.json { json(&summary) } else { summary.render() }
        }
        (Some(n), Some(f)) => {
            let summary = simulate::aggregate(&simulate::fleet::run_many(route, a.scenario, a.rps, a.seed, n, f));
            if a.json { json(&summary) } else { summary.render() }
        }
        (None, None) => {
            let run = simulate::run_once(route, a.scenario, a.rps, a.seed);
            if a.json { json(&run) } else { run.render() }
        }
        (None, Some(f)) => {
            let run = simulate::fleet::run_once(route, a.scenario, a.rps, a.seed, f);
            if a.json { json(&run) } else { run.render() }
        }
    };
    if !a.json {
        print!("{}", simulate::describe(route, a.scenario, a.rps));
        if let Some(f) = fleet {
            print!("{}", simulate::fleet::describe(route, f));
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// The route `veer simulate` runs: `--route`, else the first with a candidate, else the first.
fn simulated_route<'a>(config: &'a Config, a: &SimulateArgs) -> Result<&'a RouteConfig, String> {
    let route = match &a.route {
        Some(name) => config.route(name),
        None => config.routes.iter().find(|r| r.candidate.is_some()).or(config.routes.first()),
    };
    let route =
        route.ok_or_else(|| format!("no route {} in {}", a.route.as_deref().unwrap_or("at all"), a.file.display()))?;
    if route.rollout.strategy == Strategy::BlueGreen && route.mirror.as_ref().is_none_or(|m| m.percent <= 0.0) {
        return Err(format!(
            "route {} is blue-green without [routes.mirror]: its preview is judged on mirrored copies, \
             so simulate needs mirror.percent above 0",
            route.name
        ));
    }
    if !(a.rps.is_finite() && a.rps > 0.0) {
        return Err(format!("--rps must be a positive number, not {}", a.rps));
    }
    Ok(route)
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).map_or_else(|e| format!("{{\"error\": \"{e}\"}}\n"), |s| s + "\n")
}

fn run(path: &Path, log_format: LogFormat) -> ExitCode {
    init_logging(log_format);
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.server.workers > 0 {
        rt.worker_threads(config.server.workers);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veer: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async {
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
        match Proxy::start_with(config).await {
            Ok(proxy) => {
                run_until_signalled(proxy, signals).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veer: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            print!("{}", summary(&c));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The one-screen summary `veer check` prints.
pub fn summary(c: &Config) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}: OK, {} route(s)", c.source.display(), c.routes.len());
    let tls = c.server.tls.as_ref().map(|t| format!(", https {}", t.listen)).unwrap_or_default();
    let _ = writeln!(s, "  listen {}{tls}; admin {}; state {}", c.server.listen, c.admin.listen, c.state_dir.display());
    for r in &c.routes {
        let hosts = if r.hosts.is_empty() { "any host".to_string() } else { r.hosts.join(",") };
        let _ = writeln!(s, "  route {} ({hosts}, {})", r.name, r.path_prefix);
        let _ = writeln!(s, "    stable    {} -> {}", r.stable.version, r.stable.endpoints.join(", "));
        match &r.candidate {
            Some(cand) => {
                let _ = writeln!(s, "    candidate {} -> {}", cand.version, cand.endpoints.join(", "));
                let _ = writeln!(s, "    plan      {}", plan(r));
                let _ = writeln!(s, "    rollback  {}", rules(r));
            }
            None => {
                let _ = writeln!(s, "    no candidate: 100% stable");
            }
        }
    }
    s
}

fn plan(r: &RouteConfig) -> String {
    let ro = &r.rollout;
    let promote = if ro.auto_promote { "auto-promote" } else { "hold at last step for `veer promote`" };
    match ro.strategy {
        Strategy::Canary => {
            let steps: Vec<String> = ro.steps_bp.iter().map(|&b| format!("{}%", f64::from(b) / 100.0)).collect();
            format!(
                "canary {}, at least {} and {} candidate requests per step, {promote}",
                steps.join(" -> "),
                humantime::format_duration(ro.step_interval),
                ro.min_requests
            )
        }
        Strategy::BlueGreen => format!(
            "blue-green: preview {}, then 100%, bake {}, {promote}",
            humantime::format_duration(ro.preview),
            humantime::format_duration(ro.bake)
        ),
    }
}

fn rules(r: &RouteConfig) -> String {
    let rb = &r.rollback;
    let mut parts = vec![format!("window {}", humantime::format_duration(rb.window))];
    if let Some(x) = rb.max_error_rate {
        parts.push(format!("error rate <= {}%", x * 100.0));
    }
    if let Some(x) = rb.max_error_rate_increase {
        parts.push(format!("error rate <= stable + {}%", x * 100.0));
    }
    if let Some(x) = rb.max_p99 {
        parts.push(format!("p99 <= {}", humantime::format_duration(x)));
    }
    if let Some(x) = rb.max_p99_ratio {
        parts.push(format!("p99 <= {x}x stable"));
    }
    if let Some(x) = r.mirror.as_ref().and_then(|m| m.max_mismatch_rate) {
        parts.push(format!("mirror mismatches <= {}%", x * 100.0));
    }
    parts.push(format!("confidence {}", rb.confidence));
    parts.join(", ")
}

/// Runs an admin-talking command on a small runtime; errors go to stderr with exit 1.
fn with_admin<F, Fut>(args: &AdminArgs, f: F) -> ExitCode
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let client = match AdminClient::new(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f(client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer: {e}");
            ExitCode::from(1)
        }
    }
}

fn rollout_verb(verb: &str, v: &RolloutVerb) -> ExitCode {
    let body = v.reason.as_ref().map(|r| serde_json::json!({ "reason": r }).to_string());
    with_admin(&v.admin, |client| async move {
        let answer = client.post(&format!("/api/v1/routes/{}/{verb}", v.route), body).await?;
        if answer.status != StatusCode::OK {
            return Err(format!("{verb} {}: {} ({})", v.route, answer.error_message(), answer.status));
        }
        let status: RouteStatus = serde_json::from_str(&answer.body).map_err(|e| format!("unexpected answer: {e}"))?;
        print!("{}", status_view::render(&[status], None));
        Ok(())
    })
}

fn report(route: &str, admin: &AdminArgs) -> ExitCode {
    with_admin(admin, |client| async move {
        let answer = client.get(&format!("/api/v1/routes/{route}/report")).await?;
        if answer.status != StatusCode::OK {
            return Err(format!("report {route}: {} ({})", answer.error_message(), answer.status));
        }
        print!("{}", answer.body);
        Ok(())
    })
}

fn status(route: Option<&str>, watch: bool, json: bool, admin: &AdminArgs) -> ExitCode {
    let path = route.map_or("/api/v1/routes".to_string(), |r| format!("/api/v1/routes/{r}"));
    with_admin(admin, |client| async move {
        let mut rates = status_view::Rates::default();
        loop {
            let fetched = client.get(&path).await.and_then(|a| {
                if a.status == StatusCode::OK {
                    Ok(a.body)
                } else {
                    Err(format!("{} ({})", a.error_message(), a.status))
                }
            });
            let text = match fetched {
                Ok(body) if json => body,
                Ok(body) => {
                    let routes: Vec<RouteStatus> = serde_json::from_str(&body)
                        .or_else(|_| serde_json::from_str::<RouteStatus>(&body).map(|r| vec![r]))
                        .map_err(|e| format!("unexpected answer: {e}"))?;
                    status_view::render(&routes, watch.then_some(&mut rates))
                }
                // A watcher survives the admin server restarting: it says so and keeps polling.
                Err(e) if watch => format!("admin API unreachable ({e}); retrying...\n"),
                Err(e) => return Err(e),
            };
            if !watch {
                print!("{text}");
                return Ok(());
            }
            print!("\x1b[2J\x1b[H{text}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}
