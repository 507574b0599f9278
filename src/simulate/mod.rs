//! `veer simulate`: a route's real step plan, judge and rolling window, run in virtual time
//! against synthetic traffic.
//!
//! The judge's promises are statistical (a healthy candidate is rolled back with probability
//! at most `α = 1 − confidence`; a dead one is caught within a handful of requests), so they
//! can only be checked by running many seeded rollouts. Operators also want to see what a plan
//! costs in time and exposure before trying it on users. This module runs the same
//! [`Machine`], [`Judge`] and [`Window`] the controller uses, ticking every `rollback.tick`
//! on a clock that is plain `Instant` arithmetic: nothing sleeps, and an hour of rollout takes
//! milliseconds.
//!
//! # Traffic model
//!
//! - Arrivals per tick are Poisson with mean `rps × tick`.
//! - Each request is assigned by the proxy's own error-diffusion [`Splitter`] (one pick per
//!   request, starting at a seeded random phase), so at 1% the candidate gets exactly one
//!   request in every hundred, as it would in production.
//! - Stable fails at [`BACKGROUND_ERROR_RATE`]; its latency is lognormal with median
//!   [`MEDIAN_LATENCY`] and σ = [`LATENCY_SIGMA`]. The candidate behaves as its [`Scenario`]
//!   says.
//! - Faults per tick and version are one binomial draw. Latencies are drawn per request, and
//!   only when a latency rule (`max_p99_ratio` or `max_p99`) is armed: otherwise nothing reads
//!   them. Nothing is allocated per request.
//!
//! - Blue-green plans are simulated with their mirroring: in preview the route's
//!   `mirror.percent` of stable's requests are copied to the candidate (what it is judged
//!   on), and while it bakes the same share of the candidate's requests is copied to stable
//!   (stable's side of the comparison), picked by a [`Splitter`] as the proxy picks them.
//!   Copies to stable are not dropped for lack of slots, and the outcomes of a copy and its
//!   primary are drawn independently. Canary plans are simulated without mirroring.
//!
//! Simulated plans always auto-promote: with `auto_promote = false` the promotion stands for
//! the operator's `veer promote` at the earliest moment the plan allows.
//!
//! One proxy serves everything and its judge drives the machine; [`fleet`] simulates `N`
//! replicas sharing the traffic and one rollout (`veer simulate --replicas N`).
//!
//! [`Window`]: crate::stats::window::Window
//! [`Splitter`]: crate::split::Splitter

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Binomial, Distribution, LogNormal, Poisson};
use serde::Serialize;

use crate::config::{RollbackConfig, RouteConfig, Strategy};
use crate::rollout::Phase;
use crate::rollout::judge::{Judge, RuleKind, RuleState, Verdict};
use crate::rollout::machine::{Change, EventKind, Machine, Plan};
use crate::split::FULL_BP;
use crate::stats::{Class, Totals, buckets};
use replica::Replica;

pub mod flagger;
pub mod fleet;
mod replica;

/// Stable's fault rate, and every candidate's unless its scenario says otherwise: a real
/// service is never error-free, and the judge must not mistake shared noise for a regression.
pub const BACKGROUND_ERROR_RATE: f64 = 0.01;
/// Median of the synthetic latency distribution, a typical API call.
pub const MEDIAN_LATENCY: Duration = Duration::from_millis(50);
/// Shape (σ of the log) of the synthetic latency distribution: p99 ≈ 3.2 × median.
pub const LATENCY_SIGMA: f64 = 0.5;
/// What the `tail-20ms` scenario adds to its slowest 2% of requests.
pub const TAIL_EXTRA: Duration = Duration::from_millis(20);
/// Requests per second when the caller does not say.
pub const DEFAULT_RPS: f64 = 1000.0;
/// Standard normal quantile of 0.98: where the `tail-20ms` slow tail begins.
const Z_98: f64 = 2.053_748_910_631_823;
/// Both versions' fault rate once the `env-shift` scenarios' environment has shifted.
pub const ENV_SHIFT_ERROR_RATE: f64 = 0.03;
/// How many times slower both versions answer once the `env-shift` scenarios' environment
/// has shifted.
pub const ENV_SHIFT_LATENCY: f64 = 1.6;
/// The `env-shift-bad` candidate's fault rate after the shift.
pub const ENV_SHIFT_BAD_ERROR_RATE: f64 = 0.10;
/// How many times slower than stable the `env-shift-bad` candidate answers after the shift.
pub const ENV_SHIFT_BAD_LATENCY: f64 = 1.5;
/// A run that neither promotes nor rolls back stops after this many plan durations...
const CAP_FACTOR: u32 = 10;
/// ... but never before this much virtual time.
const MIN_CAP: Duration = Duration::from_secs(30 * 60);

/// How the synthetic candidate behaves, so that one plan can be tried against the failures it
/// is meant to catch (and against a healthy candidate it must let through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scenario {
    /// Exactly like stable: every rollback is a false one.
    #[serde(rename = "healthy")]
    Healthy,
    /// Every candidate request fails.
    #[serde(rename = "fail")]
    Fail,
    /// 5% of candidate requests fail (stable: 1%).
    #[serde(rename = "errors-5pct")]
    Errors5Pct,
    /// Every candidate request takes 1.5 times as long.
    #[serde(rename = "latency-1.5x")]
    Latency15x,
    /// The slowest 2% of candidate requests (above the distribution's p98) take 20 ms more.
    #[serde(rename = "tail-20ms")]
    Tail20Ms,
    /// Healthy, but both versions fail 20% of requests (a noisy shared dependency).
    #[serde(rename = "healthy-shared-20pct")]
    Shared20Pct,
    /// Healthy, but a 20 s outage downstream makes both versions fail 30% of requests
    /// (from 60 s to 80 s into the rollout).
    #[serde(rename = "shared-outage")]
    SharedOutage,
    /// Healthy until the 25% step, then every candidate request fails.
    #[serde(rename = "fail-at-25pct")]
    FailAt25,
    /// Healthy, but from the first tick at 100% (a blue-green switch, a canary's last step)
    /// the environment changes for both versions: they fail [`ENV_SHIFT_ERROR_RATE`] of
    /// requests and answer [`ENV_SHIFT_LATENCY`] times slower. Machine load, a traffic mix or
    /// a slow dependency that changes after the switch is not the candidate's fault.
    #[serde(rename = "env-shift")]
    EnvShift,
    /// The `env-shift`, and from the same moment the candidate is worse than stable too: it
    /// fails [`ENV_SHIFT_BAD_ERROR_RATE`] of requests and answers [`ENV_SHIFT_BAD_LATENCY`]
    /// times slower than stable. A regression that shows only once the candidate serves
    /// everything, in a changed environment: the bake must still catch it.
    #[serde(rename = "env-shift-bad")]
    EnvShiftBad,
}

/// When the `shared-outage` scenario's outage runs, in seconds from the start.
const OUTAGE: std::ops::Range<f64> = 60.0..80.0;

impl Scenario {
    /// Every scenario, for help texts and sweeps.
    pub const ALL: [Scenario; 10] = [
        Scenario::Healthy,
        Scenario::Fail,
        Scenario::Errors5Pct,
        Scenario::Latency15x,
        Scenario::Tail20Ms,
        Scenario::Shared20Pct,
        Scenario::SharedOutage,
        Scenario::FailAt25,
        Scenario::EnvShift,
        Scenario::EnvShiftBad,
    ];

    /// The name used on the command line and in JSON.
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Fail => "fail",
            Scenario::Errors5Pct => "errors-5pct",
            Scenario::Latency15x => "latency-1.5x",
            Scenario::Tail20Ms => "tail-20ms",
            Scenario::Shared20Pct => "healthy-shared-20pct",
            Scenario::SharedOutage => "shared-outage",
            Scenario::FailAt25 => "fail-at-25pct",
            Scenario::EnvShift => "env-shift",
            Scenario::EnvShiftBad => "env-shift-bad",
        }
    }

    /// The error rate both versions share at `t_s` seconds into the rollout, once the
    /// environment has `shifted` or before.
    pub fn background_error_rate(self, t_s: f64, shifted: bool) -> f64 {
        match self {
            Scenario::EnvShift | Scenario::EnvShiftBad if shifted => ENV_SHIFT_ERROR_RATE,
            Scenario::Shared20Pct => 0.20,
            Scenario::SharedOutage if OUTAGE.contains(&t_s) => 0.30,
            _ => BACKGROUND_ERROR_RATE,
        }
    }

    /// The candidate's fault rate once its fault has begun (see [`Scenario::fault_begins`]).
    pub fn candidate_error_rate(self) -> f64 {
        match self {
            Scenario::Fail | Scenario::FailAt25 => 1.0,
            Scenario::Errors5Pct => 0.05,
            Scenario::EnvShiftBad => ENV_SHIFT_BAD_ERROR_RATE,
            _ => BACKGROUND_ERROR_RATE,
        }
    }

    /// True when the candidate's fault is under way at weight `weight_bp`: from the start for
    /// most regressions, from the 25% step for `fail-at-25pct`, never for the healthy ones.
    pub fn fault_begins(self, weight_bp: u32) -> bool {
        match self {
            Scenario::Healthy | Scenario::Shared20Pct | Scenario::SharedOutage | Scenario::EnvShift => false,
            Scenario::FailAt25 => weight_bp >= 2500,
            Scenario::EnvShiftBad => weight_bp >= FULL_BP,
            _ => true,
        }
    }

    /// True when a rollback is the right answer, which decides whether a rollback counts as a
    /// detection or a false alarm.
    pub fn is_regression(self) -> bool {
        !matches!(self, Scenario::Healthy | Scenario::Shared20Pct | Scenario::SharedOutage | Scenario::EnvShift)
    }

    /// True when the environment of both versions changes at the first tick at 100%.
    pub fn shifts_at_full_weight(self) -> bool {
        matches!(self, Scenario::EnvShift | Scenario::EnvShiftBad)
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL.into_iter().find(|k| k.label() == s).ok_or_else(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|k| k.label()).collect();
            format!("unknown scenario {s:?}; expected one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// How a simulated rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The plan completed.
    Promoted,
    /// A rule tripped.
    RolledBack,
    /// Neither within [`time_cap`]: the judge held the rollout (inconclusive) or traffic was
    /// too thin for `min_requests`.
    TimedOut,
}

impl Ending {
    /// The word used in text output.
    pub fn label(self) -> &'static str {
        match self {
            Ending::Promoted => "promoted",
            Ending::RolledBack => "rolled back",
            Ending::TimedOut => "timed out",
        }
    }
}

/// One transition of the machine, with its virtual time: the simulated journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// Seconds since the rollout started.
    pub at_s: f64,
    /// What happened.
    pub kind: EventKind,
    /// Step after the transition, when on one.
    pub step: Option<usize>,
    /// Candidate weight after the transition, basis points.
    pub weight_bp: u32,
    /// Candidate requests served so far.
    pub candidate_requests: u64,
    /// The machine's reason.
    pub reason: String,
}

/// Everything one simulated rollout produced: the figures tests assert on and the CLI prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    /// The route simulated.
    pub route: String,
    /// The candidate's behaviour.
    pub scenario: Scenario,
    /// The seed that reproduces this run.
    pub seed: u64,
    /// Offered load.
    pub rps: f64,
    /// How it ended.
    pub ending: Ending,
    /// The rule that rolled back, if one did.
    pub rule: Option<RuleKind>,
    /// Seconds from start to the end (promotion, rollback or cap).
    pub seconds: f64,
    /// Seconds until the candidate first served 100% of traffic.
    pub full_weight_seconds: Option<f64>,
    /// Candidate requests served (before the rollback, when there was one).
    pub candidate_requests: u64,
    /// Candidate requests that failed.
    pub candidate_errors: u64,
    /// Stable requests served.
    pub stable_requests: u64,
    /// Stable requests that failed.
    pub stable_errors: u64,
    /// Candidate errors beyond what the shared background would have produced for the same
    /// requests. What users paid.
    pub excess_errors: f64,
    /// Seconds into the rollout when the candidate's fault began (`None`: it never did).
    pub fault_start_s: Option<f64>,
    /// Candidate requests served from the fault's start to the end of the run.
    pub detect_requests: Option<u64>,
    /// Every transition, in order.
    pub timeline: Vec<TimelineEntry>,
    /// For a timed-out run, the rule the judge was holding on at the end and why, from its
    /// figures: what an operator would have seen in `veer status`.
    pub held_by: Option<String>,
    /// A fleet's replicas and which judge rolled it back; absent for one proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<fleet::FleetRun>,
}

/// The maximum virtual time one run may take: ten times the plan's minimum duration (its
/// steps, or a blue-green preview and bake), and at least 30 minutes, so that a held rollout
/// ends and is reported as such instead of spinning.
pub fn time_cap(route: &RouteConfig) -> Duration {
    let ro = &route.rollout;
    let plan = match ro.strategy {
        Strategy::Canary => {
            ro.step_interval.saturating_mul(u32::try_from(ro.steps_bp.len().max(1)).unwrap_or(u32::MAX))
        }
        Strategy::BlueGreen => ro.preview.saturating_add(ro.bake),
    };
    plan.saturating_mul(CAP_FACTOR).max(MIN_CAP)
}

/// True when the judge reads latency, and so the simulation must draw it.
pub fn latency_armed(rb: &RollbackConfig) -> bool {
    rb.max_p99_ratio.is_some() || rb.max_p99.is_some()
}

/// Runs one seeded rollout of `route`'s plan against `scenario` traffic at `rps` requests per
/// second, until it promotes, rolls back or reaches [`time_cap`]. Same inputs, same result.
///
/// # Panics
///
/// When `rps` is not a positive finite number.
pub fn run_once(route: &RouteConfig, scenario: Scenario, rps: f64, seed: u64) -> RunResult {
    assert!(rps.is_finite() && rps > 0.0, "rps must be positive, not {rps}");
    let mut run = Run::new(route, scenario, rps, rps, seed, |traffic, t0| Single::new(route, traffic, t0));
    let ending = run.drive(time_cap(route));
    run.finish(route, ending)
}

/// Runs `runs` rollouts with seeds `seed, seed + 1, …` on every core and returns them in seed
/// order: the input of [`aggregate`], deterministic whatever the core count.
pub fn run_many(route: &RouteConfig, scenario: Scenario, rps: f64, seed: u64, runs: u64) -> Vec<RunResult> {
    run_many_with(run_once, route, scenario, rps, seed, runs)
}

/// [`run_many`] with another way of running one rollout (e.g. [`flagger::run_once`]).
pub fn run_many_with(
    run: impl Fn(&RouteConfig, Scenario, f64, u64) -> RunResult + Sync,
    route: &RouteConfig,
    scenario: Scenario,
    rps: f64,
    seed: u64,
    runs: u64,
) -> Vec<RunResult> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = usize::try_from(runs).unwrap_or(usize::MAX).clamp(1, cores);
    let run = &run;
    let mut all: Vec<(u64, RunResult)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    (w as u64..runs)
                        .step_by(workers)
                        .map(|i| (i, run(route, scenario, rps, seed.wrapping_add(i))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// Which request goes where, and what came of it: the synthetic service pair.
struct Traffic {
    rng: StdRng,
    arrivals: Poisson<f64>,
    /// Base latency in µs; `None` when no latency rule is armed.
    latency: Option<LogNormal<f64>>,
    scenario: Scenario,
    /// µs above which `tail-20ms` adds its delay: the base distribution's p98.
    tail_from_us: f64,
    /// The `env-shift` scenarios' environment has changed (for both versions).
    shifted: bool,
}

/// Which side of the simulated split a batch of requests went to (the simulator's own
/// stand-in for a version, without the proxy's lanes and pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Stable,
    Candidate,
}

impl Traffic {
    fn new(route: &RouteConfig, scenario: Scenario, rps: f64, seed: u64, sample_latency: bool) -> Traffic {
        let median_us = MEDIAN_LATENCY.as_micros() as f64;
        let mean = rps * route.rollback.tick.as_secs_f64();
        Traffic {
            rng: StdRng::seed_from_u64(seed),
            arrivals: Poisson::new(mean).expect("a positive finite arrival rate"),
            latency: sample_latency.then(|| LogNormal::new(median_us.ln(), LATENCY_SIGMA).expect("valid lognormal")),
            scenario,
            tail_from_us: median_us * (LATENCY_SIGMA * Z_98).exp(),
            shifted: false,
        }
    }

    /// The error rate both versions share at `t_s`.
    fn background(&self, t_s: f64) -> f64 {
        self.scenario.background_error_rate(t_s, self.shifted)
    }

    fn arrivals(&mut self) -> u64 {
        self.arrivals.sample(&mut self.rng) as u64
    }

    /// Serves `n` requests of `role` at `t_s` seconds and adds their outcomes to the
    /// cumulative `t`; `faulty` says whether the candidate's fault is under way.
    fn serve(&mut self, t: &mut Totals, n: u64, role: Arm, t_s: f64, faulty: bool) {
        let background = self.background(t_s);
        let rate = match role {
            Arm::Candidate if faulty => self.scenario.candidate_error_rate().max(background),
            _ => background,
        };
        let faults = Binomial::new(n, rate).map_or(0, |b| b.sample(&mut self.rng));
        t.classes[Class::Success as usize] += n - faults;
        t.classes[Class::ServerError as usize] += faults;
        t.faults += faults;
        if let Some(dist) = self.latency {
            let env = if self.shifted { ENV_SHIFT_LATENCY } else { 1.0 };
            for _ in 0..n {
                let base = dist.sample(&mut self.rng) * env;
                let us = if faulty { self.shape(base, role) } else { base as u64 };
                t.latency[buckets::index(us)] += 1;
            }
        }
    }

    /// Applies the scenario to one base latency.
    fn shape(&self, us: f64, role: Arm) -> u64 {
        let us = match (role, self.scenario) {
            (Arm::Candidate, Scenario::Latency15x) => us * 1.5,
            (Arm::Candidate, Scenario::EnvShiftBad) => us * ENV_SHIFT_BAD_LATENCY,
            (Arm::Candidate, Scenario::Tail20Ms) if us > self.tail_from_us => us + TAIL_EXTRA.as_micros() as f64,
            _ => us,
        };
        us as u64
    }
}

/// One tick as the proxies see it: the plan's state and the candidate's.
struct Moment {
    /// The end of the tick, when the windows are read.
    now: Instant,
    /// Seconds since the rollout started.
    t_s: f64,
    /// The candidate's weight during the tick.
    weight_bp: u32,
    /// The plan's phase during the tick (what a blue-green route mirrors).
    phase: Phase,
    /// The candidate's fault is under way.
    faulty: bool,
}

/// What a tick's judging tells the machine.
struct Decision {
    /// The verdict the machine acts on.
    verdict: Verdict,
    /// Judged candidate requests since the previous tick, towards `min_requests`.
    judged_requests: u64,
    /// Candidate requests served to users in the tick, over every proxy.
    served_candidate: u64,
    /// In a fleet, which judge a failing verdict came from.
    tripped_by: Option<fleet::Tripped>,
}

/// The proxies of one simulated rollout and the judges that decide it: one proxy whose own
/// judge drives the machine ([`Single`]), or a fleet ([`fleet::Fleet`]). [`Run`] keeps the
/// plan, the clock and the bookkeeping both share.
trait Proxies {
    /// Serves one tick of traffic, reads the windows and judges.
    fn tick(&mut self, traffic: &mut Traffic, at: &Moment) -> Decision;
    /// A blue-green route switched to the candidate: every judge freezes stable's figures (the
    /// fallback while no stable answers to copies arrive, as the controller keeps).
    fn baking(&mut self);
    /// What the versions answered, over every proxy: `(stable, candidate)`.
    fn served(&self) -> (Totals, Totals);
    /// The judge that drives the machine, for [`held_by`].
    fn driver(&self) -> &Judge;
    /// The fleet's facts for the result, `None` for one proxy.
    fn fleet(&self, tripped_by: Option<fleet::Tripped>) -> Option<fleet::FleetRun>;
}

/// One proxy, whose judge drives the machine: `veer simulate` without `--replicas`.
struct Single {
    replica: Replica,
    judge: Judge,
}

impl Single {
    fn new(route: &RouteConfig, traffic: &mut Traffic, t0: Instant) -> Single {
        Single { replica: Replica::new(route, traffic, t0), judge: judge_for(route, route.rollback.confidence) }
    }
}

impl Proxies for Single {
    fn tick(&mut self, traffic: &mut Traffic, at: &Moment) -> Decision {
        let n = traffic.arrivals();
        let served_candidate = self.replica.serve(traffic, n, at);
        let judged = self.replica.sides.judge(&mut self.judge, at);
        Decision { verdict: judged.verdict, judged_requests: judged.requests, served_candidate, tripped_by: None }
    }

    fn baking(&mut self) {
        self.judge.set_baseline(self.replica.sides.baseline());
    }

    fn served(&self) -> (Totals, Totals) {
        (self.replica.sides.stable.totals.clone(), self.replica.sides.candidate.totals.clone())
    }

    fn driver(&self) -> &Judge {
        &self.judge
    }

    fn fleet(&self, _: Option<fleet::Tripped>) -> Option<fleet::FleetRun> {
        None
    }
}

/// The route's judge at `confidence` (a fleet's judges each take a share of the budget).
fn judge_for(route: &RouteConfig, confidence: f64) -> Judge {
    let mut rollback = route.rollback.clone();
    rollback.confidence = confidence;
    // Answers are not compared (the mismatch rule gets no pairs), but the rule still takes
    // its share of the budget.
    Judge::new(&rollback).with_mirror_limit(route.mirror.as_ref().and_then(|m| m.max_mismatch_rate))
}

/// One rollout in progress.
struct Run<P> {
    machine: Machine,
    proxies: P,
    traffic: Traffic,
    t0: Instant,
    tick: Duration,
    rule: Option<RuleKind>,
    tripped_by: Option<fleet::Tripped>,
    full_weight_at: Option<Instant>,
    timeline: Vec<TimelineEntry>,
    scenario: Scenario,
    seed: u64,
    rps: f64,
    /// Candidate requests served so far, over every proxy.
    candidate_requests: u64,
    /// When the candidate's fault began, and its request count then.
    fault_start: Option<(Instant, u64)>,
    /// Candidate errors the shared background alone would have caused.
    background_errors: f64,
}

impl<P: Proxies> Run<P> {
    /// A rollout of `route` whose traffic each proxy receives at `rps_each`, with the proxies
    /// `proxies` builds from the seeded traffic.
    fn new(
        route: &RouteConfig,
        scenario: Scenario,
        rps: f64,
        rps_each: f64,
        seed: u64,
        proxies: impl FnOnce(&mut Traffic, Instant) -> P,
    ) -> Run<P> {
        let t0 = Instant::now();
        let plan = Plan { auto_promote: true, ..Plan::of(&route.rollout) };
        let mut traffic = Traffic::new(route, scenario, rps_each, seed, latency_armed(&route.rollback));
        let proxies = proxies(&mut traffic, t0);
        let mut run = Run {
            machine: Machine::new(plan, t0),
            proxies,
            traffic,
            t0,
            tick: route.rollback.tick,
            rule: None,
            tripped_by: None,
            full_weight_at: None,
            timeline: Vec::new(),
            scenario,
            seed,
            rps,
            candidate_requests: 0,
            fault_start: None,
            background_errors: 0.0,
        };
        let started = run.machine.start(t0).expect("a new machine starts");
        run.record(t0, started);
        run
    }

    /// Ticks until the rollout ends or `cap` has passed.
    fn drive(&mut self, cap: Duration) -> Ending {
        let mut now = self.t0;
        loop {
            now += self.tick;
            if let Some(change) = self.step(now) {
                let kind = change.kind;
                self.record(now, change);
                match kind {
                    EventKind::Promoted => return Ending::Promoted,
                    EventKind::RolledBack => return Ending::RolledBack,
                    _ => {}
                }
            }
            if now.duration_since(self.t0) >= cap {
                return Ending::TimedOut;
            }
        }
    }

    /// One control-plane tick: a tick's traffic at the current weight (and its mirrored
    /// copies), then windows, judges and machine, in the controller's order.
    fn step(&mut self, now: Instant) -> Option<Change> {
        let (weight_bp, phase, t_s) = (self.machine.weight_bp(), self.machine.phase(), self.seconds(now));
        self.traffic.shifted |= self.scenario.shifts_at_full_weight() && weight_bp >= FULL_BP;
        if self.fault_start.is_none() && self.scenario.fault_begins(weight_bp) {
            self.fault_start = Some((now, self.candidate_requests));
        }
        let at = Moment { now, t_s, weight_bp, phase, faulty: self.fault_start.is_some() };
        let d = self.proxies.tick(&mut self.traffic, &at);
        self.candidate_requests += d.served_candidate;
        self.background_errors += d.served_candidate as f64 * self.traffic.background(t_s);
        if let Verdict::Failing(f) = &d.verdict {
            self.rule = Some(f.rule);
            self.tripped_by = d.tripped_by;
        }
        let mut change = self.machine.observe(now, d.judged_requests, &d.verdict)?;
        if change.to == Phase::Baking {
            self.proxies.baking();
        }
        if let (EventKind::RolledBack, Some(by)) = (change.kind, d.tripped_by) {
            let _ = write!(change.reason, " in the {by}");
        }
        Some(change)
    }

    fn record(&mut self, now: Instant, change: Change) {
        if change.weight_bp >= FULL_BP && self.full_weight_at.is_none() {
            self.full_weight_at = Some(now);
        }
        self.timeline.push(TimelineEntry {
            at_s: self.seconds(now),
            kind: change.kind,
            step: change.step,
            weight_bp: change.weight_bp,
            candidate_requests: self.candidate_requests,
            reason: change.reason,
        });
    }

    fn seconds(&self, at: Instant) -> f64 {
        at.duration_since(self.t0).as_secs_f64()
    }

    fn finish(self, route: &RouteConfig, ending: Ending) -> RunResult {
        let (s, c) = self.proxies.served();
        let end = self.timeline.last().map_or(0.0, |t| t.at_s);
        let seconds = if ending == Ending::TimedOut { time_cap(route).as_secs_f64() } else { end };
        let rolled_back = ending == Ending::RolledBack;
        RunResult {
            route: route.name.clone(),
            scenario: self.scenario,
            seed: self.seed,
            rps: self.rps,
            ending,
            rule: if rolled_back { self.rule } else { None },
            seconds,
            full_weight_seconds: self.full_weight_at.map(|t| self.seconds(t)),
            candidate_requests: c.requests(),
            candidate_errors: c.faults,
            stable_requests: s.requests(),
            stable_errors: s.faults,
            excess_errors: c.faults as f64 - self.background_errors,
            fault_start_s: self.fault_start.map(|(t, _)| self.seconds(t)),
            detect_requests: self.fault_start.map(|(_, n)| c.requests() - n),
            held_by: (ending == Ending::TimedOut).then(|| held_by(self.proxies.driver())).flatten(),
            fleet: self.proxies.fleet(if rolled_back { self.tripped_by } else { None }),
            timeline: self.timeline,
        }
    }
}

/// The first rule holding the rollout, in words.
fn held_by(judge: &Judge) -> Option<String> {
    let f = judge.figures().rules.iter().find(|r| r.state == RuleState::Watching)?;
    let note = f.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default();
    Some(format!("{} watching, ln E {:.1} of {:.1}{note}", f.rule, f.ln_evidence, f.ln_threshold))
}

/// What many seeded runs of one scenario add up to: the figures that back (or refute) the
/// judge's promises. Rates are fractions of all runs; `detect_*` and `excess_*` figures are
/// over rolled-back runs, `promote_*` over promoted ones; `None` (JSON `null`) when no run
/// qualifies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The route simulated.
    pub route: String,
    /// The candidate's behaviour.
    pub scenario: Scenario,
    /// How many runs.
    pub runs: usize,
    /// Seed of the first run; the others follow it.
    pub seed: u64,
    /// Offered load.
    pub rps: f64,
    /// Runs that rolled back.
    pub rollback_rate: f64,
    /// Rollbacks of a regressed candidate (`None` for `healthy`).
    pub detect_rate: Option<f64>,
    /// Rollbacks of a healthy candidate (`None` for the regression scenarios).
    pub false_rollback_rate: Option<f64>,
    /// Runs that promoted.
    pub promote_rate: f64,
    /// Runs that hit the time cap.
    pub timeout_rate: f64,
    /// Median candidate requests served from the fault's start up to the rollback.
    pub detect_requests_p50: Option<f64>,
    /// 90th percentile of the same.
    pub detect_requests_p90: Option<f64>,
    /// 95th percentile of the same.
    pub detect_requests_p95: Option<f64>,
    /// Median seconds from the fault's start to rollback.
    pub detect_seconds_p50: Option<f64>,
    /// 95th percentile of the same.
    pub detect_seconds_p95: Option<f64>,
    /// Median excess candidate errors up to the rollback.
    pub excess_errors_p50: Option<f64>,
    /// Worst-case exposure: most candidate requests any run served before rolling back.
    pub max_candidate_requests: Option<u64>,
    /// Worst-case exposure: most candidate errors any run served before rolling back.
    pub max_candidate_errors: Option<u64>,
    /// Median seconds from start to promotion.
    pub promote_seconds_p50: Option<f64>,
    /// For fleet runs, which judges rolled back; absent for one proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<fleet::FleetSummary>,
}

/// Sums up runs of one scenario (as [`run_many`] returns them).
pub fn aggregate(runs: &[RunResult]) -> Summary {
    let first = runs.first();
    let scenario = first.map_or(Scenario::Healthy, |r| r.scenario);
    let rate = |e: Ending| runs.iter().filter(|r| r.ending == e).count() as f64 / runs.len().max(1) as f64;
    let rolled: Vec<&RunResult> = runs.iter().filter(|r| r.ending == Ending::RolledBack).collect();
    let detect_requests = sorted(rolled.iter().map(|r| r.detect_requests.unwrap_or(r.candidate_requests) as f64));
    let detect_seconds = sorted(rolled.iter().map(|r| r.seconds - r.fault_start_s.unwrap_or(0.0)));
    let excess = sorted(rolled.iter().map(|r| r.excess_errors));
    let promote_seconds = sorted(runs.iter().filter(|r| r.ending == Ending::Promoted).map(|r| r.seconds));
    let rollback_rate = rate(Ending::RolledBack);
    Summary {
        route: first.map(|r| r.route.clone()).unwrap_or_default(),
        scenario,
        runs: runs.len(),
        seed: first.map_or(0, |r| r.seed),
        rps: first.map_or(0.0, |r| r.rps),
        rollback_rate,
        detect_rate: scenario.is_regression().then_some(rollback_rate),
        false_rollback_rate: (!scenario.is_regression()).then_some(rollback_rate),
        promote_rate: rate(Ending::Promoted),
        timeout_rate: rate(Ending::TimedOut),
        detect_requests_p50: quantile(&detect_requests, 0.5),
        detect_requests_p90: quantile(&detect_requests, 0.9),
        detect_requests_p95: quantile(&detect_requests, 0.95),
        detect_seconds_p50: quantile(&detect_seconds, 0.5),
        detect_seconds_p95: quantile(&detect_seconds, 0.95),
        excess_errors_p50: quantile(&excess, 0.5),
        max_candidate_requests: rolled.iter().map(|r| r.candidate_requests).max(),
        max_candidate_errors: rolled.iter().map(|r| r.candidate_errors).max(),
        promote_seconds_p50: quantile(&promote_seconds, 0.5),
        fleet: fleet::summarise(runs),
    }
}

fn sorted(xs: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// The header of the text output: the route's plan and the traffic model, so a printed
/// result says what it was measured against.
pub fn describe(route: &RouteConfig, scenario: Scenario, rps: f64) -> String {
    let ro = &route.rollout;
    let rb = &route.rollback;
    let steps: Vec<String> = ro.steps_bp.iter().map(|&b| percent(b)).collect();
    let plan = match ro.strategy {
        Strategy::Canary => format!(
            "steps {}, {} and {} candidate requests per step",
            steps.join(" -> "),
            humantime::format_duration(ro.step_interval),
            ro.min_requests
        ),
        Strategy::BlueGreen => format!(
            "blue-green: preview {} then bake {} at 100%, {} judged candidate requests each; {}% mirrored \
             (stable's requests to the candidate in preview, the candidate's to stable while baking)",
            humantime::format_duration(ro.preview),
            humantime::format_duration(ro.bake),
            ro.min_requests,
            route.mirror.as_ref().map_or(0.0, |m| m.percent),
        ),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "route {}: {plan}; tick {}, window {}, confidence {}",
        route.name,
        humantime::format_duration(rb.tick),
        humantime::format_duration(rb.window),
        rb.confidence,
    );
    let latency = if latency_armed(rb) { "sampled" } else { "not sampled (no latency rule armed)" };
    let _ = writeln!(
        s,
        "traffic: {rps} rps Poisson, error-diffusion split; stable {}% errors, lognormal latency \
         (median {}, sigma {LATENCY_SIGMA}) {latency}; candidate {scenario}",
        BACKGROUND_ERROR_RATE * 100.0,
        humantime::format_duration(MEDIAN_LATENCY),
    );
    s
}

/// A weight in basis points as an operator reads it.
fn percent(bp: u32) -> String {
    format!("{}%", f64::from(bp) / 100.0)
}

impl TimelineEntry {
    /// `+60.0s step 1 (5%)`: one timeline line.
    pub fn render(&self) -> String {
        let at = format!("+{:.1}s", self.at_s);
        let what = match (self.kind, self.step) {
            (EventKind::RolledBack, _) => format!("rolled back ({})", self.reason),
            (EventKind::Started, Some(i)) => format!("started at step {i} ({})", percent(self.weight_bp)),
            (EventKind::Step, Some(i)) => format!("step {i} ({})", percent(self.weight_bp)),
            (kind, _) => format!("{} ({})", kind.label(), percent(self.weight_bp)),
        };
        format!("{at:>9}  {what}  [{} candidate requests]", self.candidate_requests)
    }
}

impl RunResult {
    /// The text report of one run: timeline, outcome and exposure.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for t in &self.timeline {
            let _ = writeln!(s, "  {}", t.render());
        }
        let _ = writeln!(s, "outcome: {} after {:.1}s{}", self.ending.label(), self.seconds, self.detail());
        if let Some(full) = self.full_weight_seconds {
            let _ = writeln!(s, "full rollout (100%) reached at {full:.1}s");
        }
        let _ = writeln!(
            s,
            "exposure: {} candidate requests, {} candidate errors ({:.2} in excess of stable's {}% rate); \
             stable served {} with {} errors",
            self.candidate_requests,
            self.candidate_errors,
            self.excess_errors,
            BACKGROUND_ERROR_RATE * 100.0,
            self.stable_requests,
            self.stable_errors,
        );
        s
    }

    fn detail(&self) -> String {
        match (self.ending, self.rule) {
            (Ending::RolledBack, Some(rule)) => match self.fleet.as_ref().and_then(|f| f.tripped_by) {
                Some(by) => format!(" (rule {rule}, {by})"),
                None => format!(" (rule {rule})"),
            },
            (Ending::TimedOut, _) => match &self.held_by {
                Some(why) => format!(" (time cap; held by {why})"),
                None => " (time cap: traffic too thin for min_requests)".to_string(),
            },
            _ => String::new(),
        }
    }
}

impl Summary {
    /// The text report of many runs.
    pub fn render(&self) -> String {
        let f = |x: Option<f64>, digits: usize| x.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let pct = |x: f64| format!("{:.2}%", x * 100.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} runs of scenario {}, seeds {}..={}",
            self.runs,
            self.scenario,
            self.seed,
            self.seed.wrapping_add(self.runs.saturating_sub(1) as u64)
        );
        let kind = if self.scenario.is_regression() { "detection rate" } else { "false rollback rate" };
        let _ = writeln!(s, "  rolled back   {} ({kind})", pct(self.rollback_rate));
        let _ = writeln!(s, "  promoted      {}", pct(self.promote_rate));
        let _ = writeln!(s, "  timed out     {}", pct(self.timeout_rate));
        let _ = writeln!(
            s,
            "  to detection  candidate requests p50 {} p90 {} p95 {}; seconds p50 {} p95 {}",
            f(self.detect_requests_p50, 0),
            f(self.detect_requests_p90, 0),
            f(self.detect_requests_p95, 0),
            f(self.detect_seconds_p50, 1),
            f(self.detect_seconds_p95, 1),
        );
        let _ = writeln!(s, "  excess errors p50 {}", f(self.excess_errors_p50, 2));
        let worst = |x: Option<u64>| x.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  worst-case exposure before rollback: {} candidate requests, {} candidate errors",
            worst(self.max_candidate_requests),
            worst(self.max_candidate_errors),
        );
        let _ = writeln!(s, "  to promotion  seconds p50 {}", f(self.promote_seconds_p50, 1));
        if let Some(fleet) = &self.fleet {
            let _ = writeln!(
                s,
                "  tripped by    merged judge {}, local judges {} (of {} replicas)",
                pct(fleet.merged_rollback_rate),
                pct(fleet.local_rollback_rate),
                fleet.replicas,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::window::Latency;

    fn traffic(scenario: Scenario) -> Traffic {
        let median_us = MEDIAN_LATENCY.as_micros() as f64;
        Traffic {
            rng: StdRng::seed_from_u64(7),
            arrivals: Poisson::new(100.0).expect("valid"),
            latency: Some(LogNormal::new(median_us.ln(), LATENCY_SIGMA).expect("valid")),
            scenario,
            tail_from_us: median_us * (LATENCY_SIGMA * Z_98).exp(),
            shifted: false,
        }
    }

    fn served(scenario: Scenario, role: Arm, n: u64) -> Totals {
        let mut t = Totals::default();
        traffic(scenario).serve(&mut t, n, role, 0.0, true);
        t
    }

    fn ms(t: &Totals, q: f64) -> f64 {
        Latency(&t.latency).quantile_us(q).expect("non-empty") as f64 / 1000.0
    }

    #[test]
    fn stable_has_the_background_error_rate_and_lognormal_latency() {
        let t = served(Scenario::Fail, Arm::Stable, 200_000);
        assert_eq!(t.requests(), 200_000);
        let rate = t.faults as f64 / 200_000.0;
        assert!((rate - BACKGROUND_ERROR_RATE).abs() < 0.001, "{rate}");
        assert!((ms(&t, 0.5) - 50.0).abs() < 2.0, "median {}", ms(&t, 0.5));
        // p99 of lognormal(ln 50ms, 0.5) = 50 · e^(0.5 · 2.326) ≈ 160 ms.
        assert!((ms(&t, 0.99) - 160.0).abs() < 8.0, "p99 {}", ms(&t, 0.99));
    }

    #[test]
    fn candidate_error_rates_follow_the_scenario() {
        let n = 100_000;
        assert_eq!(served(Scenario::Fail, Arm::Candidate, n).faults, n);
        let five = served(Scenario::Errors5Pct, Arm::Candidate, n).faults as f64 / n as f64;
        assert!((five - 0.05).abs() < 0.003, "{five}");
        let healthy = served(Scenario::Healthy, Arm::Candidate, n).faults as f64 / n as f64;
        assert!((healthy - BACKGROUND_ERROR_RATE).abs() < 0.002, "{healthy}");
    }

    #[test]
    fn latency_scenarios_shift_the_right_part_of_the_distribution() {
        let n = 200_000;
        let base = served(Scenario::Healthy, Arm::Candidate, n);
        let slow = served(Scenario::Latency15x, Arm::Candidate, n);
        assert!((ms(&slow, 0.5) / ms(&base, 0.5) - 1.5).abs() < 0.06);
        let tail = served(Scenario::Tail20Ms, Arm::Candidate, n);
        assert!((ms(&tail, 0.5) - ms(&base, 0.5)).abs() < 2.0, "the body is untouched");
        assert!((ms(&tail, 0.99) - ms(&base, 0.99) - 20.0).abs() < 8.0, "the tail moves by 20 ms");
        // The stable side never changes with the scenario.
        assert_eq!(served(Scenario::Tail20Ms, Arm::Stable, 1000), served(Scenario::Healthy, Arm::Stable, 1000));
    }

    #[test]
    fn the_env_shift_moves_both_versions_and_the_bad_candidate_further() {
        let n = 100_000;
        let shifted = |scenario, role| {
            let mut t = Totals::default();
            let mut traffic = traffic(scenario);
            traffic.shifted = true;
            traffic.serve(&mut t, n, role, 0.0, scenario.fault_begins(FULL_BP));
            t
        };
        let base = served(Scenario::Healthy, Arm::Stable, n);
        for role in [Arm::Stable, Arm::Candidate] {
            let t = shifted(Scenario::EnvShift, role);
            let rate = t.faults as f64 / n as f64;
            assert!((rate - ENV_SHIFT_ERROR_RATE).abs() < 0.003, "{role:?}: {rate}");
            assert!((ms(&t, 0.5) / ms(&base, 0.5) - ENV_SHIFT_LATENCY).abs() < 0.06, "{role:?}");
        }
        assert!(!Scenario::EnvShift.fault_begins(FULL_BP) && !Scenario::EnvShift.is_regression());
        let stable = shifted(Scenario::EnvShiftBad, Arm::Stable);
        let bad = shifted(Scenario::EnvShiftBad, Arm::Candidate);
        assert!((bad.faults as f64 / n as f64 - ENV_SHIFT_BAD_ERROR_RATE).abs() < 0.005);
        assert!((ms(&bad, 0.5) / ms(&stable, 0.5) - ENV_SHIFT_BAD_LATENCY).abs() < 0.06);
        assert!(!Scenario::EnvShiftBad.fault_begins(FULL_BP - 1), "healthy until it serves everything");
    }

    #[test]
    fn scenarios_parse_their_labels() {
        for s in Scenario::ALL {
            assert_eq!(s.label().parse::<Scenario>(), Ok(s));
        }
        assert!("slow".parse::<Scenario>().expect_err("unknown").contains("errors-5pct"));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), Some(2.0));
        assert_eq!(quantile(&v, 0.95), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
