//! The judge, measured: veer's anytime-valid judge and a Flagger-style fixed rule on the same
//! seeded synthetic traffic, scenario by scenario.
//!
//! Run: `cargo bench --bench judge_eval` (about two minutes on two cores). Fewer runs for a
//! quick look: `VEER_EVAL_HEALTHY_RUNS=100 VEER_EVAL_FAULTY_RUNS=50 cargo bench --bench judge_eval`.
//!
//! Plan 1 → 5 → 25 → 50 → 100%, 60 s per step, at least 50 candidate requests per step;
//! Poisson arrivals; stable latency lognormal (median 50 ms, σ 0.5) with 1% errors; rules:
//! error rate (comparative, ≥ +1 point), latency (comparative, ≥ 1.1×), confidence 0.99.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::Instant;

use veer::config::Config;
use veer::simulate::{Scenario, Summary, aggregate, flagger, run_many, run_many_with};

const CONFIG: &str = r#"
[[routes]]
name = "eval"
[routes.stable]
version = "stable"
endpoints = ["127.0.0.1:1"]
[routes.candidate]
version = "candidate"
endpoints = ["127.0.0.1:2"]
[routes.rollout]
steps = [1, 5, 25, 50, 100]
step_interval = "60s"
min_requests = 50
[routes.rollback]
window = "30s"
tick = "100ms"
confidence = 0.99
max_error_rate_increase = 0.01
max_p99_ratio = 1.1
"#;

fn runs(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.0}"))
}

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

fn cells(s: &Summary) -> String {
    let outcome = if s.scenario.is_regression() { pct(s.detect_rate) } else { pct(s.false_rollback_rate) };
    format!(
        "{outcome} | {} / {} | {} / {} | {}",
        num(s.detect_requests_p50),
        num(s.detect_requests_p95),
        secs(s.detect_seconds_p50),
        secs(s.detect_seconds_p95),
        num(s.excess_errors_p50)
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: then do a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let config = Config::parse(Path::new("judge_eval.toml"), CONFIG).expect("the evaluation config is valid");
    let route = &config.routes[0];
    let (healthy_runs, faulty_runs) =
        if smoke { (4, 2) } else { (runs("VEER_EVAL_HEALTHY_RUNS", 1000), runs("VEER_EVAL_FAULTY_RUNS", 300)) };
    let cases: [(Scenario, f64); 10] = [
        (Scenario::Healthy, 1000.0),
        (Scenario::Shared20Pct, 1000.0),
        (Scenario::SharedOutage, 1000.0),
        (Scenario::Fail, 1000.0),
        (Scenario::Errors5Pct, 1000.0),
        (Scenario::Latency15x, 1000.0),
        (Scenario::Tail20Ms, 1000.0),
        (Scenario::FailAt25, 1000.0),
        (Scenario::Healthy, 10.0),
        (Scenario::Errors5Pct, 10.0),
    ];
    println!(
        "| scenario | rps | runs | veer: false rollback / detected | veer: detect requests p50 / p95 | veer: detect s p50 / p95 | veer: excess errors p50 | fixed rule: false rollback / detected | fixed rule: detect requests p50 / p95 | fixed rule: detect s p50 / p95 | fixed rule: excess errors p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    for (scenario, rps) in cases {
        let n = if scenario.is_regression() { faulty_runs } else { healthy_runs };
        let veer = aggregate(&run_many(route, scenario, rps, 1, n));
        let fixed = aggregate(&run_many_with(flagger::run_once, route, scenario, rps, 1, n));
        println!("| {} | {rps} | {n} | {} | {} |", scenario.label(), cells(&veer), cells(&fixed));
    }
    eprintln!("evaluated in {:.0}s", started.elapsed().as_secs_f64());
}
