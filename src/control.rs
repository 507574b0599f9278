//! The control-plane loop: reads every route's counters each tick, advances the rolling
//! windows, and keeps the exported metrics current.
//!
//! It runs off the hot path on its own task. Metric handles are resolved once per
//! configuration generation, not per tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Gauge;

use crate::rollout::Phase;
use crate::server::Shared;
use crate::snapshot::Snapshot;
use crate::status::position;
use crate::telemetry::{CANDIDATE_WEIGHT, ROLLOUT_PHASE, Telemetry, UPKEEP_EVERY};

struct RouteGauges {
    weight: Gauge,
    phases: Vec<(Phase, Gauge)>,
}

impl RouteGauges {
    fn new(t: &Telemetry, route: &str) -> Self {
        RouteGauges {
            weight: t.route_gauge(CANDIDATE_WEIGHT, route),
            phases: Phase::ALL
                .iter()
                .map(|&p| (p, t.route_gauge_with(ROLLOUT_PHASE, route, "phase", p.label())))
                .collect(),
        }
    }
}

/// Runs forever; the owner aborts it at shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut generation = 0;
    let mut gauges: HashMap<String, RouteGauges> = HashMap::new();
    let mut period = Duration::ZERO;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    let mut last_upkeep = Instant::now();
    loop {
        interval.tick().await;
        let snap = shared.snapshot();
        if snap.generation != generation {
            generation = snap.generation;
            gauges = snap
                .routes
                .iter()
                .map(|r| (r.config.name.clone(), RouteGauges::new(&shared.telemetry, &r.config.name)))
                .collect();
            let p = tick_period(&snap);
            if p != period {
                period = p;
                interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
        }
        tick(&snap, Instant::now(), &gauges);
        if last_upkeep.elapsed() >= UPKEEP_EVERY {
            shared.telemetry.upkeep();
            last_upkeep = Instant::now();
        }
    }
}

/// The shortest `rollback.tick` of any route.
fn tick_period(snap: &Snapshot) -> Duration {
    snap.routes.iter().map(|r| r.config.rollback.tick).min().unwrap_or(Duration::from_millis(100))
}

fn tick(snap: &Snapshot, now: Instant, gauges: &HashMap<String, RouteGauges>) {
    for route in &snap.routes {
        let window = route.config.rollback.window;
        route.runtime.stable.tick(now, window);
        if let Some((_, cand)) = &route.runtime.candidate {
            cand.tick(now, window);
        }
        if let Some(g) = gauges.get(&route.config.name) {
            let (phase, _, weight) = position(route);
            g.weight.set(weight);
            for (p, gauge) in &g.phases {
                gauge.set(if *p == phase { 1.0 } else { 0.0 });
            }
        }
    }
}

/// Pushes pending metric increments of every version (right before a scrape).
pub fn flush_metrics(snap: &Snapshot) {
    for route in &snap.routes {
        route.runtime.stable.flush_metrics();
        if let Some((_, cand)) = &route.runtime.candidate {
            cand.flush_metrics();
        }
    }
}
