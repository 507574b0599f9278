//! `veer simulate --replicas N`: one rollout shared by a fleet of replicas, in virtual time.
//!
//! A fleet's promise is that splitting the traffic over `N` replicas neither raises the false
//! rollback rate above the budget nor slows detection down much: the leader judges the sum of
//! every replica's counters, so it needs about as many candidate requests in all as one proxy
//! seeing everything, and each replica's local judge is a brake on a blatant regression.
//! Those are statistical claims; this module checks them with the same [`Judge`],
//! [`Window`](crate::stats::window) and [`Machine`](crate::rollout::machine::Machine) the
//! controller uses.
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
use super::{Decision, Moment, Proxies, Run, RunResult, Scenario, Traffic, judge_for, run_many_with, time_cap};
use crate::config::RouteConfig;
use crate::rollout::judge::{FleetConfidence, Judge, Verdict};
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
    let ending = run.drive(time_cap(route));
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::rollout::Phase;
    use crate::rollout::machine::EventKind;
    use crate::simulate::Ending;

    /// The route `web` (stable v1, candidate v2) with these `rollout`, `rollback` (and more)
    /// tables.
    fn route_with(tables: &str) -> RouteConfig {
        let src = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[[routes]]\nname = \"web\"\n\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9001\"]\n\n[routes.candidate]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9002\"]\n\n{tables}"
        );
        Config::parse(Path::new("fleet.toml"), &src).expect("valid config").routes.remove(0)
    }

    /// Five steps of 10 s, a 100 ms tick, the error rule only: a short plan, cheap to run.
    fn route() -> RouteConfig {
        let mut r = route_with(
            "[routes.rollout]\nsteps = [1, 5, 25, 50, 100]\nstep_interval = \"10s\"\nmin_requests = 10\n\n[routes.rollback]\nwindow = \"30s\"\ntick = \"100ms\"\nconfidence = 0.99\n",
        );
        r.rollback.max_p99_ratio = None;
        r
    }

    /// A blue-green route: 5 s preview, 20 s bake, 10% mirrored.
    fn blue_green() -> RouteConfig {
        route_with(
            "[routes.rollout]\nstrategy = \"blue-green\"\npreview = \"5s\"\nbake = \"20s\"\nmin_requests = 10\n\n[routes.rollback]\nwindow = \"30s\"\ntick = \"100ms\"\n\n[routes.mirror]\npercent = 10\n",
        )
    }

    fn requests(sides: &Sides) -> u64 {
        sides.stable.totals.requests() + sides.candidate.totals.requests()
    }

    #[test]
    fn publishes_keep_to_their_schedule_however_late_the_tick() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_after(t0, t0, ms(250)), t0 + ms(250));
        assert_eq!(next_after(t0, t0 + ms(100), ms(250)), t0 + ms(250));
        assert_eq!(next_after(t0, t0 + ms(250), ms(250)), t0 + ms(500));
        assert_eq!(next_after(t0, t0 + ms(1010), ms(250)), t0 + ms(1250), "missed dues are skipped, not bunched");
    }

    #[test]
    fn the_leader_sees_each_replica_as_of_its_last_publish() {
        let route = route();
        let tick = route.rollback.tick;
        let options = FleetOptions { replicas: 3, publish_interval: Duration::from_secs(1) };
        let t0 = Instant::now();
        // Each replica's share of 300 rps.
        let mut traffic = Traffic::new(&route, Scenario::Healthy, 100.0, 11, false);
        let mut fleet = Fleet::new(&route, options, &mut traffic, t0);
        // served[i][k]: replica i's requests after tick k; last[i]: the tick of its last publish.
        let mut served = vec![vec![0u64]; 3];
        let mut last = [0usize; 3];
        let mut publishes = [0u32; 3];
        for k in 1..=50usize {
            let now = t0 + tick * k as u32;
            let due: Vec<bool> = fleet.members.iter().map(|m| m.next_publish <= now).collect();
            let at = Moment {
                now,
                t_s: (tick * k as u32).as_secs_f64(),
                weight_bp: 5000,
                phase: Phase::Progressing,
                faulty: false,
            };
            let d = fleet.tick(&mut traffic, &at);
            assert_eq!(d.tripped_by, None);
            for (i, m) in fleet.members.iter().enumerate() {
                served[i].push(requests(&m.replica.sides));
                if due[i] {
                    (last[i], publishes[i]) = (k, publishes[i] + 1);
                }
                assert!(
                    k - last[i] < 10 || last[i] == 0 && k < 10,
                    "replica {i} published at tick {} and not since",
                    last[i]
                );
                let seen = m.published[0].requests() + m.published[1].requests();
                assert_eq!(seen, served[i][last[i]], "replica {i} at tick {k}: the leader sees its last publish");
            }
            let seen: u64 = fleet.members.iter().map(|m| m.published[0].requests() + m.published[1].requests()).sum();
            assert_eq!(requests(&fleet.merged), seen, "the leader's sums are the published counters");
        }
        assert_eq!(publishes, [5, 5, 5], "one publish a second each over 5 s");
        // Each replica got about a third of the 300 rps × 5 s.
        for s in &served {
            let n = *s.last().expect("ticks") as f64;
            assert!((n - 500.0).abs() < 100.0, "{n}");
        }
    }

    #[test]
    fn with_nothing_published_a_dead_candidate_is_braked_by_a_local_judge() {
        // The first publish lies far beyond the rollout: the leader never sees a request.
        let options = FleetOptions { replicas: 3, publish_interval: Duration::from_secs(1_000_000) };
        let run = run_once(&route(), Scenario::Fail, 1000.0, 5, options);
        let Some(Tripped::Local { replica }) = run.fleet.as_ref().and_then(|f| f.tripped_by) else {
            panic!("{run:?}");
        };
        assert!((1..=3).contains(&replica));
        assert_eq!(run.ending, Ending::RolledBack);
        let last = run.timeline.last().expect("a timeline");
        assert_eq!(last.reason, format!("rule error_rate tripped in the local judge of replica {replica}"));
        assert!(
            run.render().contains(&format!("(rule error_rate, local judge of replica {replica})")),
            "{}",
            run.render()
        );
        // Three replicas each need their own few failures: more than one proxy would serve.
        assert!(run.candidate_requests >= 3, "{run:?}");
    }

    #[test]
    fn local_judges_never_advance_the_plan() {
        let route = route();
        let options = FleetOptions { replicas: 3, publish_interval: Duration::from_secs(1_000_000) };
        let mut run = Run::new(&route, Scenario::Healthy, 600.0, 200.0, 9, |traffic, t0| {
            Fleet::new(&route, options, traffic, t0)
        });
        // Four step intervals: every local judge is satisfied long before, the leader has no
        // candidate requests towards `min_requests`.
        assert_eq!(run.drive(Duration::from_secs(40)), Ending::TimedOut);
        let kinds: Vec<EventKind> = run.timeline.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [EventKind::Started]);
        assert!(run.candidate_requests > 100, "the candidate was served: {}", run.candidate_requests);
    }

    #[test]
    fn a_blue_green_fleet_previews_on_mirrored_copies_switches_and_bakes() {
        let r = blue_green();
        let run = run_once(&r, Scenario::Healthy, 600.0, 7, FleetOptions::new(3));
        let path: Vec<(EventKind, u32)> = run.timeline.iter().map(|t| (t.kind, t.weight_bp)).collect();
        assert_eq!(
            path,
            [(EventKind::Started, 0), (EventKind::Step, 10_000), (EventKind::Promoted, 10_000)],
            "{run:?}"
        );
        assert!(run.timeline[1].at_s >= 5.0 && run.seconds >= run.timeline[1].at_s + 20.0, "{run:?}");
        // A dead candidate is caught in preview, on every replica's copies: no user saw it.
        let dead = run_once(&r, Scenario::Fail, 600.0, 7, FleetOptions::new(3));
        assert_eq!((dead.ending, dead.candidate_requests), (Ending::RolledBack, 0), "{dead:?}");
    }

    #[test]
    fn the_merged_judge_is_named_when_it_trips_first() {
        // Published every tick, the leader sees three times what any replica sees.
        let options = FleetOptions { replicas: 3, publish_interval: Duration::ZERO };
        let run = run_once(&route(), Scenario::Fail, 1000.0, 5, options);
        assert_eq!(run.fleet.as_ref().and_then(|f| f.tripped_by), Some(Tripped::Merged), "{run:?}");
        let last = run.timeline.last().expect("a timeline");
        assert_eq!(last.reason, "rule error_rate tripped in the merged judge");
        let f = run.fleet.as_ref().expect("a fleet run");
        let split = FleetConfidence::split(0.99, 3);
        assert_eq!((f.replicas, f.merged_confidence, f.local_confidence), (3, split.merged, split.local));
    }

    #[test]
    fn fleet_runs_are_reproducible_and_say_so_in_json() {
        let route = route();
        let options = FleetOptions::new(3);
        let many = run_many(&route, Scenario::Errors5Pct, 1000.0, 40, 3, options);
        for (i, run) in many.iter().enumerate() {
            assert_eq!(*run, run_once(&route, Scenario::Errors5Pct, 1000.0, 40 + i as u64, options));
        }
        let v = serde_json::to_value(&many[0]).expect("serialises");
        assert_eq!(v["fleet"]["replicas"], 3);
        assert_eq!(v["fleet"]["publish_interval_s"], 0.25);
        let by = &v["fleet"]["tripped_by"];
        assert!(by["judge"] == "merged" || by["judge"] == "local" && by["replica"].is_u64(), "{by}");
        let summary = serde_json::to_value(super::super::aggregate(&many)).expect("serialises");
        let f = &summary["fleet"];
        let total =
            f["merged_rollback_rate"].as_f64().expect("rate") + f["local_rollback_rate"].as_f64().expect("rate");
        assert_eq!(total, summary["rollback_rate"].as_f64().expect("rate"), "{summary}");
        let q = |k: &str| summary[k].as_f64().expect("a quantile");
        assert!(q("detect_requests_p50") <= q("detect_requests_p90"), "{summary}");
        assert!(q("detect_requests_p90") <= q("detect_requests_p95"), "{summary}");
        // One proxy's results keep their shape.
        let single =
            serde_json::to_value(super::super::run_once(&route, Scenario::Fail, 1000.0, 1)).expect("serialises");
        assert!(single.get("fleet").is_none(), "{single}");
    }
}
