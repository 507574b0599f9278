//! A fixed-threshold canary analysis in the style of Flagger, run on the same synthetic
//! traffic as veer's judge so the two can be compared side by side.
//!
//! The rule is the one such tools are typically configured with: every `step_interval`
//! (1 minute in the evaluation) look at the candidate's last interval; the check fails if its
//! error rate is above 1%, its p99 above 200 ms, or it served no request at all. Five failed
//! checks roll back; a passing check moves to the next step; passing the last step promotes.

use std::time::{Duration, Instant};

use rand::Rng;

use super::{Arm, Ending, RunResult, Scenario, TimelineEntry, Traffic, time_cap};
use crate::config::RouteConfig;
use crate::rollout::machine::EventKind;
use crate::split::{FULL_BP, Splitter};
use crate::stats::Totals;
use crate::stats::window::Latency;

/// Error rate above which a check fails.
pub const MAX_ERROR_RATE: f64 = 0.01;
/// p99 above which a check fails.
pub const MAX_P99: Duration = Duration::from_millis(200);
/// Failed checks that roll back.
pub const THRESHOLD: u32 = 5;

/// One seeded rollout of `route`'s steps under the fixed rule (same inputs, same result).
pub fn run_once(route: &RouteConfig, scenario: Scenario, rps: f64, seed: u64) -> RunResult {
    let t0 = Instant::now();
    let tick = route.rollback.tick;
    let interval = route.rollout.step_interval;
    let steps = &route.rollout.steps_bp;
    let mut traffic = Traffic::new(route, scenario, rps, seed, true);
    let splitter = Splitter::with_phase(traffic.rng.random_range(0..FULL_BP));
    let (mut stable, mut candidate, mut this_interval) = (Totals::default(), Totals::default(), Totals::default());
    let (mut step, mut failed, mut next_check) = (0usize, 0u32, t0 + interval);
    let mut fault_start: Option<(Instant, u64)> = None;
    let mut background_errors = 0.0;
    let mut timeline = vec![TimelineEntry {
        at_s: 0.0,
        kind: EventKind::Started,
        step: Some(0),
        weight_bp: steps[0],
        candidate_requests: 0,
        reason: "rollout started".into(),
    }];
    let mut full_weight_at = (steps[0] >= FULL_BP).then_some(0.0);
    let mut now = t0;
    let ending = loop {
        now += tick;
        let t_s = now.duration_since(t0).as_secs_f64();
        let weight = steps[step];
        if fault_start.is_none() && scenario.fault_begins(weight) {
            fault_start = Some((now, candidate.requests()));
        }
        traffic.shifted |= scenario.shifts_at_full_weight() && weight >= FULL_BP;
        let n = traffic.arrivals();
        let n_c = (0..n).filter(|_| splitter.pick_candidate(weight)).count() as u64;
        traffic.serve(&mut stable, n - n_c, Arm::Stable, t_s, false);
        let before = candidate.clone();
        traffic.serve(&mut candidate, n_c, Arm::Candidate, t_s, fault_start.is_some());
        this_interval = this_interval.plus(&candidate.since(&before));
        background_errors += n_c as f64 * traffic.background(t_s);
        if now >= next_check {
            next_check += interval;
            let (kind, reason) = if check_fails(&this_interval) {
                failed += 1;
                if failed >= THRESHOLD {
                    timeline.push(transition(
                        t_s,
                        EventKind::RolledBack,
                        None,
                        0,
                        &candidate,
                        format!("{failed} failed checks"),
                    ));
                    break Ending::RolledBack;
                }
                (None, String::new())
            } else if step + 1 < steps.len() {
                step += 1;
                (Some(EventKind::Step), "check passed".to_string())
            } else {
                timeline.push(transition(
                    t_s,
                    EventKind::Promoted,
                    None,
                    FULL_BP,
                    &candidate,
                    "last check passed".into(),
                ));
                break Ending::Promoted;
            };
            if let Some(kind) = kind {
                if steps[step] >= FULL_BP && full_weight_at.is_none() {
                    full_weight_at = Some(t_s);
                }
                timeline.push(transition(t_s, kind, Some(step), steps[step], &candidate, reason));
            }
            this_interval = Totals::default();
        }
        if now.duration_since(t0) >= time_cap(route) {
            break Ending::TimedOut;
        }
    };
    let seconds = timeline.last().map_or(0.0, |t| t.at_s);
    RunResult {
        route: route.name.clone(),
        scenario,
        seed,
        rps,
        ending,
        rule: None,
        seconds,
        full_weight_seconds: full_weight_at,
        candidate_requests: candidate.requests(),
        candidate_errors: candidate.faults,
        stable_requests: stable.requests(),
        stable_errors: stable.faults,
        excess_errors: candidate.faults as f64 - background_errors,
        fault_start_s: fault_start.map(|(t, _)| t.duration_since(t0).as_secs_f64()),
        detect_requests: fault_start.map(|(_, n)| candidate.requests() - n),
        timeline,
        held_by: None,
        fleet: None,
    }
}

fn check_fails(interval: &Totals) -> bool {
    let n = interval.requests();
    if n == 0 {
        return true;
    }
    let p99_us = Latency(&interval.latency).quantile_us(0.99).unwrap_or(0);
    interval.faults as f64 / n as f64 > MAX_ERROR_RATE || p99_us > MAX_P99.as_micros() as u64
}

fn transition(
    at_s: f64,
    kind: EventKind,
    step: Option<usize>,
    weight_bp: u32,
    candidate: &Totals,
    reason: String,
) -> TimelineEntry {
    TimelineEntry { at_s, kind, step, weight_bp, candidate_requests: candidate.requests(), reason }
}
