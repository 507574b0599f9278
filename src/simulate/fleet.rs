//! `veer simulate --replicas N`: one rollout shared by a fleet of replicas, in virtual time.
//!
//! A fleet's promise is that splitting the traffic over `N` replicas neither raises the false
//! rollback rate nor slows detection down: the leader judges the sum of every replica's
//! counters, so it needs about as many candidate requests as one proxy seeing everything,
//! and each replica's local judge is a brake on a blatant regression. Those are statistical
//! claims; this module checks them with the same [`Judge`], [`Window`](crate::stats::window)
//! and [`Machine`](crate::rollout::machine::Machine) the controller uses.
//!
//! # Model
//!
//! - Every request goes to a uniformly random replica: each replica's arrivals per tick are an
//!   independent Poisson draw with mean `rps × tick / N` (the thinning of the fleet's Poisson
//!   stream). Each replica splits its own requests with its own error-diffusion splitter,
//!   starting at its own random phase, as N proxies would.
//! - Every replica judges its own traffic every tick with its own windows, at confidence
//!   [`FleetConfidence::split`]`(confidence, N).local`. When one fails the candidate, the
//!   fleet rolls back in the same tick (the brake). Local verdicts never drive steps.
//! - Every replica publishes its cumulative counters every `publish_interval`, its first
//!   publish at a uniformly random offset within the first interval (replicas are not in
//!   step). Traffic is served in whole ticks, so a publish due between two ticks happens at
//!   the next one, after that tick's traffic. The leader (itself a replica, whose own counters
//!   also go through a publish) sums the counters as last published, so it sees each replica
//!   up to one publish interval late, and judges the sum at confidence `.merged` with its own
//!   windows. Its verdict and the published candidate request count drive the one machine.
//! - A weight the leader sets applies on every replica from the next tick on (a watch on the
//!   rollout record takes milliseconds, far less than a tick).
//! - When the merged judge and a local one trip in the same tick, the merged one is named;
//!   among local judges, the lowest-numbered replica. Replicas are numbered `1..=N`.
//!
//! Not simulated: the etcd round trips and their failures, leader election and hand-over,
//! lease expiry, replicas joining or leaving (`N` is fixed), replicas' ticks out of step.

use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use super::replica::{Replica, Sides};
use super::{Decision, Ending, Moment, Proxies, Run, RunResult, Traffic, judge_for, run_many_with, time_cap};
use crate::config::RouteConfig;
use crate::rollout::judge::{FleetConfidence, Judge, Verdict};
use crate::simulate::Scenario;
use crate::stats::Totals;

/// How often a replica publishes its counters when the caller does not say.
pub const DEFAULT_PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// The shape of a simulated fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetOptions {
    /// Replicas sharing the traffic and the rollout (at least one).
    pub replicas: usize,
    /// How often each replica publishes its counters for the leader. Zero: every tick.
    pub publish_interval: Duration,
}

impl FleetOptions {
    /// `replicas` replicas publishing every [`DEFAULT_PUBLISH_INTERVAL`].
    pub fn new(replicas: usize) -> FleetOptions {
        FleetOptions { replicas: replicas.max(1), publish_interval: DEFAULT_PUBLISH_INTERVAL }
    }
}

/// Which judge rolled a fleet back: what an operator asks first after a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "judge", rename_all = "snake_case")]
pub enum Tripped {
    /// The leader's judge of the fleet's merged traffic.
    Merged,
    /// One replica's judge of its own traffic (the brake).
    Local {
        /// The replica, `1..=N`.
        replica: usize,
    },
}

impl fmt::Display for Tripped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tripped::Merged => f.write_str("merged judge"),
            Tripped::Local { replica } => write!(f, "local judge of replica {replica}"),
        }
    }
}

/// A fleet run's own facts, beside the figures every run has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetRun {
    /// Replicas.
    pub replicas: usize,
    /// Seconds between two publishes of one replica.
    pub publish_interval_s: f64,
    /// Confidence of the leader's merged judge.
    pub merged_confidence: f64,
    /// Confidence of each replica's local judge.
    pub local_confidence: f64,
    /// The judge that rolled back, when one did.
    pub tripped_by: Option<Tripped>,
}

/// What many fleet runs add up to, beside the [`Summary`](super::Summary) every scenario has.
/// Rates are fractions of all runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetSummary {
    /// Replicas.
    pub replicas: usize,
    /// Runs the merged judge rolled back.
    pub merged_rollback_rate: f64,
    /// Runs a local judge rolled back.
    pub local_rollback_rate: f64,
}

/// The fleet figures of `runs`, `None` when they are not fleet runs.
pub(super) fn summarise(runs: &[RunResult]) -> Option<FleetSummary> {
    let replicas = runs.first()?.fleet.as_ref()?.replicas;
    let rate = |f: fn(&Tripped) -> bool| {
        let n = runs.iter().filter(|r| r.fleet.as_ref().and_then(|x| x.tripped_by.as_ref()).is_some_and(f)).count();
        n as f64 / runs.len() as f64
    };
    Some(FleetSummary {
        replicas,
        merged_rollback_rate: rate(|t| *t == Tripped::Merged),
        local_rollback_rate: rate(|t| matches!(t, Tripped::Local { .. })),
    })
}

/// One replica: its proxy, its local judge, and its counters as the leader last saw them.
struct Member {
    replica: Replica,
    judge: Judge,
    /// Every side's counters at the last publish, in [`Sides::all`] order.
    published: Vec<Totals>,
    next_publish: Instant,
}

/// The replicas of one rollout and the leader's view of their sums.
struct Fleet {
    members: Vec<Member>,
    /// The sums of the published counters, with the leader's windows.
    merged: Sides,
    /// The leader's judge, which drives the machine.
    judge: Judge,
    options: FleetOptions,
    confidence: FleetConfidence,
}

impl Fleet {
    fn new(route: &RouteConfig, options: FleetOptions, traffic: &mut Traffic, t0: Instant) -> Fleet {
        let confidence = FleetConfidence::split(route.rollback.confidence, options.replicas);
        let interval_ns = u64::try_from(options.publish_interval.as_nanos()).unwrap_or(u64::MAX).max(1);
        let members = (0..options.replicas)
            .map(|_| {
                let replica = Replica::new(route, traffic, t0);
                let published = replica.sides.all().map(|_| Totals::default()).collect();
                let offset = Duration::from_nanos(traffic.rng.random_range(0..interval_ns));
                Member { replica, judge: judge_for(route, confidence.local), published, next_publish: t0 + offset }
            })
            .collect();
        Fleet {
            members,
            merged: Sides::new(route, t0),
            judge: judge_for(route, confidence.merged),
            options,
            confidence,
        }
    }

    /// Replicas due at `now` publish: the leader's sums take in what they served since their
    /// previous publish.
    fn publish(&mut self, now: Instant) {
        let interval = self.options.publish_interval;
        for m in self.members.iter_mut().filter(|m| m.next_publish <= now) {
            for ((sum, side), seen) in self.merged.all_mut().zip(m.replica.sides.all()).zip(&mut m.published) {
                sum.totals = std::mem::take(&mut sum.totals).plus(&side.totals.since(seen));
                seen.clone_from(&side.totals);
            }
            m.next_publish = if interval.is_zero() { now } else { next_after(m.next_publish, now, interval) };
        }
    }
}

/// The first publish time after `now` on the schedule `due + k × interval`.
fn next_after(due: Instant, now: Instant, interval: Duration) -> Instant {
    let behind = now.duration_since(due).as_nanos() / interval.as_nanos();
    let steps = u32::try_from(behind + 1).unwrap_or(u32::MAX);
    due + interval.saturating_mul(steps)
}

impl Proxies for Fleet {
    fn tick(&mut self, traffic: &mut Traffic, at: &Moment) -> Decision {
        let mut served_candidate = 0;
        for m in &mut self.members {
            let n = traffic.arrivals();
            served_candidate += m.replica.serve(traffic, n, at);
        }
        // Every local judge weighs every tick, so its evidence stays current.
        let mut brake = None;
        for (i, m) in self.members.iter_mut().enumerate() {
            let local = m.replica.sides.judge(&mut m.judge, at);
            if brake.is_none() && matches!(local.verdict, Verdict::Failing(_)) {
                brake = Some((local.verdict, Tripped::Local { replica: i + 1 }));
            }
        }
        self.publish(at.now);
        let merged = self.merged.judge(&mut self.judge, at);
        let (verdict, tripped_by) = match (merged.verdict, brake) {
            (v @ Verdict::Failing(_), _) => (v, Some(Tripped::Merged)),
            (_, Some((v, by))) => (v, Some(by)),
            (v, None) => (v, None),
        };
        Decision { verdict, judged_requests: merged.requests, served_candidate, tripped_by }
    }

    fn baking(&mut self) {
        self.judge.set_baseline(self.merged.baseline());
        for m in &mut self.members {
            m.judge.set_baseline(m.replica.sides.baseline());
        }
    }

    fn served(&self) -> (Totals, Totals) {
        let sides = self.members.iter().map(|m| &m.replica.sides);
        sides.fold((Totals::default(), Totals::default()), |(s, c), x| {
            (s.plus(&x.stable.totals), c.plus(&x.candidate.totals))
        })
    }

    fn driver(&self) -> &Judge {
        &self.judge
    }

    fn fleet(&self, tripped_by: Option<Tripped>) -> Option<FleetRun> {
        Some(FleetRun {
            replicas: self.options.replicas,
            publish_interval_s: self.options.publish_interval.as_secs_f64(),
            merged_confidence: self.confidence.merged,
            local_confidence: self.confidence.local,
            tripped_by,
        })
    }
}

/// Runs one seeded rollout of `route`'s plan on a fleet shaped by `options`, the fleet
/// receiving `scenario` traffic at `rps` requests per second in all. Same inputs, same result.
///
/// # Panics
///
/// When `rps` is not a positive finite number.
pub fn run_once(route: &RouteConfig, scenario: Scenario, rps: f64, seed: u64, options: FleetOptions) -> RunResult {
    assert!(rps.is_finite() && rps > 0.0, "rps must be positive, not {rps}");
    let options = FleetOptions { replicas: options.replicas.max(1), ..options };
    let each = rps / options.replicas as f64;
    let mut run = Run::new(route, scenario, rps, each, seed, |traffic, t0| Fleet::new(route, options, traffic, t0));
    let ending: Ending = run.drive(time_cap(route));
    run.finish(route, ending)
}

/// [`run_once`] for seeds `seed, seed + 1, …` on every core, in seed order.
pub fn run_many(
    route: &RouteConfig,
    scenario: Scenario,
    rps: f64,
    seed: u64,
    runs: u64,
    options: FleetOptions,
) -> Vec<RunResult> {
    run_many_with(|r, s, rps, seed| run_once(r, s, rps, seed, options), route, scenario, rps, seed, runs)
}

/// The header line that says how the fleet was simulated.
pub fn describe(route: &RouteConfig, options: FleetOptions) -> String {
    let c = FleetConfidence::split(route.rollback.confidence, options.replicas);
    format!(
        "fleet: {} replicas, each request to a uniformly random one; counters published every {}; \
         merged judge at confidence {}, each local judge at {}\n",
        options.replicas,
        humantime::format_duration(options.publish_interval),
        c.merged,
        c.local,
    )
}
