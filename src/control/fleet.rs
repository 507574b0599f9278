//! The controller of one route's rollout in fleet mode: the record in etcd is the rollout's
//! one state, and this replica follows it, brakes on its own evidence, and — while it leads
//! the route — judges the fleet's merged traffic and takes the steps.
//!
//! - **Follow.** Every replica applies the weight of the route's record, and nothing else,
//!   except its own brake (which only lowers it to 0). Until it has read a record for the
//!   rollout its config names it serves stable only: a replica that starts while etcd is
//!   unreachable, and one whose config names another rollout, never guess.
//! - **Brake.** Every replica judges its own traffic each tick, with its share of the fleet's
//!   false-rollback budget ([`FleetConfidence`]). When that judge fails the candidate the
//!   replica sets its own weight to 0 in the same tick, journals the rollback locally and
//!   writes `rolled_back` to the record (compare-and-swap on the revision it read), retrying
//!   until the record says rolled back or moves to another epoch (a `retry` or a new version).
//! - **Lead.** The leader of the route (a lease-guarded key, see `fleet`) sums every member's
//!   cumulative counters into merged windows, feeds the real judge with them, drives the real
//!   machine, and writes each transition as a transaction that also compares its leadership,
//!   so a deposed leader's write fails. It starts a new rollout once a majority of the live
//!   members run a config with it.
//! - **Operators** act on the record from any replica (compare-and-swap, no leadership).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use metrics::Gauge;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::controller::{MirrorReading, Outputs};
use super::{CommandFailure, controller::CommandError};
use crate::config::RouteConfig;
use crate::fleet::counters::{Counters, FleetSum};
use crate::fleet::record::{Identity, RolloutRecord, RouteCheckpoint};
use crate::fleet::{Fleet, FleetView, Versioned, Write, WriteError, Written};
use crate::journal::{Event, timestamp};
use crate::rollout::evidence::{Cause, Evidence, FleetDecider, VersionEvidence};
use crate::rollout::fleet_status::{
    FleetAlpha, FleetMember, FleetRecord, FleetStatus, MemberFigures, MergedWindows, Standing,
};
use crate::rollout::judge::{FleetConfidence, Judge, JudgeState, Observation, RuleKind, Verdict};
use crate::rollout::machine::{Change, Command, EventKind, Machine, MachineState, Plan};
use crate::rollout::{Phase, RolloutState};
use crate::route_state::RouteRuntime;
use crate::stats::Totals;
use crate::stats::window::{Reading, Window, WindowFigures};
use crate::status::RouteStatus;
use crate::telemetry::{CLUSTER_CONFIG_MISMATCH, CLUSTER_LEADER, ROLLBACKS_TOTAL};

/// The answer an operator waits for while the command's write is in flight.
pub type Reply = oneshot::Sender<Result<RouteStatus, CommandFailure>>;

/// A write of this route's record that has not come back yet: one at a time.
struct Inflight {
    token: u64,
    /// A leader's write: its machine and judge already are the state it writes.
    as_leader: bool,
    /// An operator's command waiting for its outcome.
    reply: Option<Reply>,
}

/// A rollback this replica decided, held until the record has it.
#[derive(Debug, Clone)]
struct Brake {
    epoch: u64,
    event: Event,
    /// When the record was last asked to take it: a failed write is retried, but not faster
    /// than [`BRAKE_RETRY`], so an unreachable etcd costs nothing.
    sent: Instant,
}

/// How often a brake the record does not have yet is written again.
const BRAKE_RETRY: Duration = Duration::from_millis(200);

/// How many of a route's newest journal events a starting replica looks through for a brake
/// of its own the fleet's record may not have.
const REMEMBERED_EVENTS: usize = 50;

/// The newest rollback this replica (`node`) decided for `identity`'s candidate, from its
/// journal: a brake pulled while etcd was unreachable must survive a crash. It is sent at
/// once; [`FleetRoute::follow`] drops it when the record already has it or has moved on to
/// another epoch.
fn remembered_brake(recent: &[Event], identity: &Identity, node: &str) -> Option<Brake> {
    let event = recent.iter().rev().find(|e| {
        e.kind == EventKind::RolledBack
            && e.candidate_version == identity.candidate
            && e.evidence.as_ref().and_then(|x| x.fleet.as_ref()).is_some_and(|f| f.node == node)
    })?;
    let epoch = event.evidence.as_ref()?.fleet.as_ref()?.epoch?;
    let sent = Instant::now().checked_sub(BRAKE_RETRY).unwrap_or_else(Instant::now);
    Some(Brake { epoch, event: event.clone(), sent })
}

/// What the leader keeps between ticks.
struct Lead {
    machine: Machine,
    judge: Judge,
    /// The record revision `machine` and `judge` continue from.
    basis: i64,
}

/// The fleet's counters of one route, summed, and their windows.
#[derive(Default)]
struct Merged {
    stable: FleetSum,
    candidate: FleetSum,
    mirror_stable: FleetSum,
    mirror_candidate: FleetSum,
    pairs: HashMap<(String, i64), (u64, u64)>,
    pair_total: (u64, u64),
    /// Mirrored pairs compared (and mismatched) fleet-wide since the previous feed.
    pair_tick: (u64, u64),
    windows: Option<[Window; 4]>,
    last: Option<(Reading, Reading, MirrorReading)>,
    /// Each member's counts as last read.
    members: Vec<(String, MemberFigures, MemberFigures)>,
}

/// A member's counts of one version, for status.
fn figures(c: &Counters) -> MemberFigures {
    MemberFigures { requests: c.requests(), errors: c.faults }
}

impl Merged {
    /// Feeds every live member's report of `route` and ticks the merged windows.
    fn feed(&mut self, view: &FleetView, route: &str, identity: &Identity, now: Instant, window: Duration) {
        let before = self.pair_total;
        let mut live = Vec::new();
        self.members.clear();
        for (node, c) in &view.counters {
            let Some(r) = c.report.route(route, identity) else { continue };
            let who = (node.as_str(), c.lease);
            live.push((node.clone(), c.lease));
            self.members.push((node.clone(), figures(&r.stable), figures(&r.candidate)));
            self.stable.feed(who, &r.stable);
            self.candidate.feed(who, &r.candidate);
            let zero = Counters::default();
            let (ms, mc, pairs) = r
                .mirror
                .as_ref()
                .map_or((&zero, &zero, (0, 0)), |m| (&m.stable, &m.candidate, (m.compared, m.mismatched)));
            self.mirror_stable.feed(who, ms);
            self.mirror_candidate.feed(who, mc);
            let key = (node.clone(), c.lease);
            if let Some(before) = self.pairs.get(&key) {
                self.pair_total.0 += pairs.0.saturating_sub(before.0);
                self.pair_total.1 += pairs.1.saturating_sub(before.1);
            }
            self.pairs.insert(key, pairs);
        }
        self.members.sort_by(|a, b| a.0.cmp(&b.0));
        let alive = |k: &(String, i64)| live.contains(k);
        for sum in [&mut self.stable, &mut self.candidate, &mut self.mirror_stable, &mut self.mirror_candidate] {
            sum.retain(alive);
        }
        self.pairs.retain(|k, _| alive(k));
        self.pair_tick = (self.pair_total.0 - before.0, self.pair_total.1 - before.1);
        let windows =
            self.windows.get_or_insert_with(|| std::array::from_fn(|_| Window::new(window, now, Totals::default())));
        let [s, c, ms, mc] = windows;
        let mirror = MirrorReading {
            stable: ms.tick(now, self.mirror_stable.total().clone()),
            reading: mc.tick(now, self.mirror_candidate.total().clone()),
            compared: self.pair_total.0,
            mismatched: self.pair_total.1,
        };
        self.last =
            Some((s.tick(now, self.stable.total().clone()), c.tick(now, self.candidate.total().clone()), mirror));
    }
}

/// The next write's token, shared by every route's controller.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// One route's rollout in fleet mode.
pub struct FleetRoute {
    fleet: Arc<Fleet>,
    rollout: Arc<RolloutState>,
    config: RouteConfig,
    identity: Identity,
    node: String,
    /// This replica's judge of its own traffic, the most live members seen in this rollout
    /// (the judge's share of the false-rollback budget is cut for them), and the rollout's epoch.
    local: (Judge, usize, u64),
    merged: Merged,
    lead: Option<Lead>,
    brake: Option<Brake>,
    inflight: Option<Inflight>,
    standing: Standing,
    reason: Option<String>,
    /// The newest event of the record already in the local journal.
    journaled: Option<(String, EventKind)>,
    leader_gauge: Gauge,
    mismatch_gauge: Gauge,
    last_pairs: (u64, u64),
}

impl std::fmt::Debug for FleetRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetRoute").field("route", &self.config.name).field("standing", &self.standing).finish()
    }
}

/// The judge of `config` with the confidence of its share of the budget.
fn judge_at(config: &RouteConfig, confidence: f64, state: JudgeState) -> Judge {
    let mut rollback = config.rollback.clone();
    rollback.confidence = confidence;
    Judge::restore(&rollback, state).with_mirror_limit(config.mirror.as_ref().and_then(|m| m.max_mismatch_rate))
}

/// Live members that serve `route`, and how many of them run each rollout of it.
fn census<'a>(view: &'a FleetView, route: &str) -> (usize, HashMap<&'a Identity, usize>) {
    let mut counts = HashMap::new();
    let mut live = 0;
    for m in view.members.values() {
        if let Some(r) = m.report.route(route) {
            live += 1;
            *counts.entry(&r.identity).or_insert(0) += 1;
        }
    }
    (live, counts)
}

/// The rollout run by more than half of the live members serving `route`.
fn majority<'a>(view: &'a FleetView, route: &str) -> Option<&'a Identity> {
    let (live, counts) = census(view, route);
    counts.into_iter().find(|(_, n)| n * 2 > live).map(|(id, _)| id)
}

fn judging(phase: Phase) -> bool {
    matches!(phase, Phase::Progressing | Phase::Paused | Phase::Preview | Phase::Baking)
}

impl FleetRoute {
    /// Takes over `rollout` in fleet mode: stable only until the fleet's record is read.
    pub fn new(
        rollout: Arc<RolloutState>,
        config: &RouteConfig,
        runtime: &RouteRuntime,
        fleet: &Arc<Fleet>,
        out: &Outputs<'_>,
    ) -> FleetRoute {
        let identity = Identity::of(config).expect("a route with a rollout has a candidate");
        rollout.set_weight_bp(0);
        let recent = out.journal.events(Some(&config.name), Some(REMEMBERED_EVENTS));
        let journaled = recent.last().map(|e| (e.at.clone(), e.kind));
        let brake = remembered_brake(&recent, &identity, fleet.node());
        let last_pairs = runtime.candidate.as_ref().map_or((0, 0), |(_, v)| {
            (v.mirror_pairs.compared.load(Ordering::Relaxed), v.mirror_pairs.mismatched.load(Ordering::Relaxed))
        });
        let confidence = FleetConfidence::split(config.rollback.confidence, 1).local;
        let mut r = FleetRoute {
            fleet: fleet.clone(),
            rollout,
            identity,
            node: fleet.node().to_string(),
            local: (judge_at(config, confidence, JudgeState::default()), 1, 0),
            merged: Merged::default(),
            lead: None,
            brake,
            inflight: None,
            standing: Standing::Waiting,
            reason: Some("the fleet's record has not been read yet".into()),
            journaled,
            leader_gauge: out.telemetry.route_gauge(CLUSTER_LEADER, &config.name),
            mismatch_gauge: out.telemetry.route_gauge(CLUSTER_CONFIG_MISMATCH, &config.name),
            last_pairs,
            config: config.clone(),
        };
        r.follow(&fleet.view(), out);
        r
    }

    /// The rollout this controller drives.
    pub fn rollout(&self) -> &Arc<RolloutState> {
        &self.rollout
    }

    /// The leader's evidence of this route, for the fleet's checkpoint.
    pub fn checkpoint(&self) -> Option<RouteCheckpoint> {
        let lead = self.lead.as_ref()?;
        Some(RouteCheckpoint {
            route: self.config.name.clone(),
            revision: lead.basis,
            judge: lead.judge.state().clone(),
            step_requests: lead.machine.step_requests(),
            merged: self.merged_windows(),
            members: self.merged.members.clone(),
        })
    }

    fn merged_windows(&self) -> Option<MergedWindows> {
        self.merged
            .last
            .as_ref()
            .map(|(s, c, _)| MergedWindows { stable: WindowFigures::of(s), candidate: WindowFigures::of(c) })
    }

    /// Where this replica stands with the route.
    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// Takes a changed configuration of the same candidate.
    pub fn reconfigure(&mut self, config: &RouteConfig, out: &Outputs<'_>) {
        if *config == self.config {
            return;
        }
        self.config = config.clone();
        self.identity = Identity::of(config).expect("a route with a rollout has a candidate");
        self.lead = None;
        // The new settings, the same evidence and the same share of the budget.
        let state = self.local.0.state().clone();
        self.local.0 = judge_at(&self.config, self.local_share(self.local.1), state);
        self.follow(&self.fleet.view(), out);
    }

    /// Whether this replica may lead the route: it runs the rollout a majority of the live
    /// members run, or — when no rollout has a majority — the one in the record.
    pub fn eligible(&self, view: &FleetView) -> bool {
        match majority(view, &self.config.name) {
            Some(id) => *id == self.identity,
            None => view.records.get(&self.config.name).is_some_and(|v| v.record.identity == self.identity),
        }
    }

    fn leading(&self, view: &FleetView) -> bool {
        view.connected && view.leaders.get(&self.config.name).is_some_and(|l| l.node == self.node)
    }

    /// Applies the record: weight, phase, standing, the local journal; re-sends a brake the
    /// record does not have yet.
    pub fn follow(&mut self, view: &FleetView, out: &Outputs<'_>) {
        let route = self.config.name.clone();
        let record = view.records.get(&route).filter(|_| view.synced).cloned();
        let (standing, reason, weight) = match &record {
            None if !view.synced => (Standing::Waiting, "the fleet's record has not been read yet".to_string(), 0),
            None => (Standing::Waiting, "the fleet has not started a rollout of this route yet".to_string(), 0),
            Some(v) if v.record.identity != self.identity => {
                let (f, m) = (&v.record.identity, &self.identity);
                let why = format!(
                    "this replica's config names candidate {} over {} (plan {}), the fleet's rollout is candidate {} over {} (plan {}): serving stable only",
                    m.candidate, m.stable, m.plan, f.candidate, f.stable, f.plan
                );
                (Standing::Mismatch, why, 0)
            }
            Some(v) => {
                let rec = &v.record;
                if self.brake.as_ref().is_some_and(|b| b.epoch != rec.epoch || rec.machine.phase == Phase::RolledBack) {
                    self.brake = None;
                }
                if self.local.2 != rec.epoch {
                    // A new rollout or a retry: the local evidence starts afresh.
                    let (live, _) = census(view, &self.config.name);
                    let members = live.max(1);
                    self.local =
                        (judge_at(&self.config, self.local_share(members), JudgeState::default()), members, rec.epoch);
                }
                match &self.brake {
                    Some(b) => (Standing::Braked, b.event.reason.clone(), 0),
                    None => (Standing::Following, String::new(), rec.weight_bp),
                }
            }
        };
        if standing != self.standing {
            match standing {
                Standing::Following => info!(route = %route, "fleet: following the fleet's rollout"),
                _ => warn!(route = %route, standing = standing.label(), reason = %reason, "fleet: serving stable only"),
            }
        }
        self.standing = standing;
        self.reason = (!reason.is_empty()).then_some(reason);
        self.mismatch_gauge.set(if standing == Standing::Mismatch { 1.0 } else { 0.0 });
        self.leader_gauge.set(if self.leading(view) { 1.0 } else { 0.0 });
        let following = record.as_ref().filter(|_| matches!(standing, Standing::Following | Standing::Braked));
        self.rollout.set_view(|rv| match following {
            Some(v) => {
                let braked = standing == Standing::Braked;
                rv.phase = if braked { Phase::RolledBack } else { v.record.machine.phase };
                rv.step = matches!(rv.phase, Phase::Progressing | Phase::Paused).then_some(v.record.machine.step);
                rv.last_transition = Some(v.record.last_event.clone());
                rv.rollback =
                    if braked { self.brake.as_ref().map(|b| b.event.clone()) } else { v.record.rollback.clone() };
            }
            None => {
                rv.phase = Phase::Pending;
                rv.step = None;
            }
        });
        // Status first, then traffic: whoever reads the new weight also reads the record it
        // came from. The local journal (a file write) comes last.
        self.publish_status(view);
        if self.rollout.weight_bp() != weight {
            info!(route = %route, weight = f64::from(weight) / 100.0, standing = standing.label(), "fleet: candidate weight applied");
        }
        self.rollout.set_weight_bp(weight);
        if let Some(v) = record.as_ref().filter(|_| standing != Standing::Mismatch) {
            self.journal(&v.record.last_event, out);
        }
        if standing == Standing::Braked
            && self.inflight.is_none()
            && let (Some(v), Some(b)) = (&record, self.brake.as_mut())
            && b.sent.elapsed() >= BRAKE_RETRY
        {
            b.sent = Instant::now();
            let event = b.event.clone();
            self.write_rollback(v, event);
        }
    }

    /// Appends `event` to the local journal once, so each replica keeps the fleet's history
    /// of what it saw even while etcd is unreachable later.
    fn journal(&mut self, event: &Event, out: &Outputs<'_>) {
        let key = (event.at.clone(), event.kind);
        if self.journaled.as_ref() == Some(&key) {
            return;
        }
        if let Err(e) = out.journal.append_event(event) {
            warn!(route = %self.config.name, error = %e, "fleet: cannot append the fleet's transition to the local journal");
        }
        self.journaled = Some(key);
    }

    /// The local judge's confidence when its share is cut for `members` replicas.
    fn local_share(&self, members: usize) -> f64 {
        FleetConfidence::split(self.config.rollback.confidence, members).local
    }

    /// One tick with this replica's readings.
    pub fn tick(
        &mut self,
        now: Instant,
        local: (&Reading, &Reading, &MirrorReading),
        view: &FleetView,
        out: &Outputs<'_>,
    ) {
        self.follow(view, out);
        let route = self.config.name.clone();
        self.merged.feed(view, &route, &self.identity, now, self.config.rollback.window);
        let record = view.records.get(&route).filter(|v| v.record.identity == self.identity).cloned();
        let pairs =
            (local.2.compared.saturating_sub(self.last_pairs.0), local.2.mismatched.saturating_sub(self.last_pairs.1));
        self.last_pairs = (local.2.compared, local.2.mismatched);
        if let Some(v) = &record
            && self.standing == Standing::Following
            && judging(v.record.machine.phase)
        {
            // The share is cut for the most members seen live in this rollout: a count that
            // drops for a moment (etcd unreachable, a replica restarting) must not loosen a
            // judge that has been weighing evidence all along.
            let (live, _) = census(view, &route);
            let members = live.max(self.local.1).max(1);
            if self.local.1 != members {
                let state = self.local.0.state().clone();
                self.local = (judge_at(&self.config, self.local_share(members), state), members, self.local.2);
            }
            let phase = v.record.machine.phase;
            let (stable, judged, stable_mirrored) = judged_readings(phase, local.0, local.1, local.2);
            let obs = observation(stable, judged, pairs, v.record.weight_bp, stable_mirrored);
            if let Verdict::Failing(f) = self.local.0.evaluate(&obs) {
                let evidence = self.evidence(f.rule, ("local", v.record.epoch), &self.local.0, stable, judged);
                let reason = format!("rule {} tripped on {}'s own traffic", f.rule, self.node);
                self.brake(v, reason, evidence, out);
                return;
            }
        }
        if self.leading(view) && self.inflight.is_none() {
            self.lead(view, record.as_deref(), now, out);
        } else if !self.leading(view) {
            self.lead = None;
        }
        self.publish_status(view);
    }

    /// The leader's part of a tick: start the majority's rollout, or judge the merged traffic
    /// and step.
    fn lead(&mut self, view: &FleetView, record: Option<&Versioned>, now: Instant, out: &Outputs<'_>) {
        let route = self.config.name.clone();
        let Some(v) = record else {
            if majority(view, &route) == Some(&self.identity) {
                self.start(view.records.get(&route).map(|v| &**v), now);
            }
            return;
        };
        if !judging(v.record.machine.phase) {
            return;
        }
        let merged_confidence = FleetConfidence::split(self.config.rollback.confidence, 1).merged;
        if self.lead.as_ref().is_none_or(|l| l.basis != v.revision) {
            let age = v.record.step_age(SystemTime::now());
            let since = now.checked_sub(age).unwrap_or(now);
            let plan = Plan::of(&self.config.rollout);
            // The newest evidence of this revision: a dead leader's checkpoint, else the record's.
            let (state, step_requests) = match view.checkpoint(&route, v.revision) {
                Some(c) => (c.judge.clone(), c.step_requests),
                None => (v.record.judge.clone(), v.record.step_requests),
            };
            let machine = Machine::resume(plan, v.record.machine.clone(), since, step_requests);
            let judge = judge_at(&self.config, merged_confidence, state);
            self.lead = Some(Lead { machine, judge, basis: v.revision });
        }
        let Some((stable, candidate, mirror)) = self.merged.last.clone() else { return };
        let phase = v.record.machine.phase;
        let (stable_r, judged, stable_mirrored) = judged_readings(phase, &stable, &candidate, &mirror);
        let lead = self.lead.as_mut().expect("set above");
        let pairs = self.merged.pair_tick;
        let obs = observation(stable_r, judged, pairs, v.record.weight_bp, stable_mirrored);
        let verdict = lead.judge.evaluate(&obs);
        let figures = lead.judge.figures().clone();
        self.rollout.set_view(|rv| rv.judge = figures);
        if let Verdict::Failing(f) = &verdict {
            let evidence = self.evidence(
                f.rule,
                ("merged", v.record.epoch),
                &self.lead.as_ref().expect("leading").judge,
                stable_r,
                judged,
            );
            let reason = format!("rule {} tripped on the fleet's merged traffic", f.rule);
            self.brake(v, reason, evidence, out);
            return;
        }
        let Some(change) = lead.machine.observe(now, judged.tick.requests(), &verdict) else { return };
        let (state, judge, step_requests) =
            (lead.machine.state().clone(), lead.judge.state().clone(), lead.machine.step_requests());
        let mut record = self.next_record(&v.record, &change, state, judge);
        record.step_requests = step_requests;
        self.send(Some(v.revision), record, true, None);
    }

    /// A new fleet rollout of this replica's (the majority's) config.
    fn start(&mut self, previous: Option<&Versioned>, now: Instant) {
        let mut machine = Machine::new(Plan::of(&self.config.rollout), now);
        let Some(change) = machine.start(now) else { return };
        let event = self.event(&change, None);
        let record = RolloutRecord {
            route: self.config.name.clone(),
            identity: self.identity.clone(),
            epoch: previous.map_or(1, |v| v.record.epoch + 1),
            seq: previous.map_or(0, |v| v.record.seq) + 1,
            machine: machine.state().clone(),
            weight_bp: change.weight_bp,
            judge: JudgeState::default(),
            step_requests: 0,
            last_event: event,
            rollback: None,
            writer: self.node.clone(),
        };
        info!(route = %record.route, candidate = %record.identity.candidate, epoch = record.epoch, "fleet: a majority of the members run this rollout; starting it");
        self.send(previous.map(|v| v.revision), record, true, None);
    }

    /// Pulls the brake: weight 0 now, the rollback in the local journal, then in the record.
    fn brake(&mut self, v: &Versioned, reason: String, evidence: Evidence, out: &Outputs<'_>) {
        let rule = Evidence::rule_label(Some(&evidence)).to_string();
        self.rollout.set_weight_bp(0);
        let change = Change {
            kind: EventKind::RolledBack,
            from: v.record.machine.phase,
            to: Phase::RolledBack,
            step: None,
            weight_bp: 0,
            reason,
        };
        let event = self.event(&change, Some(evidence));
        warn!(route = %self.config.name, candidate = %self.identity.candidate, %rule, reason = %event.reason, "candidate rolled back to 0%");
        out.telemetry.route_counter(ROLLBACKS_TOTAL, &self.config.name, "rule", rule).increment(1);
        self.journal(&event, out);
        self.brake = Some(Brake { epoch: v.record.epoch, event: event.clone(), sent: Instant::now() });
        self.standing = Standing::Braked;
        self.reason = Some(event.reason.clone());
        self.rollout.set_view(|rv| {
            rv.phase = Phase::RolledBack;
            rv.step = None;
            rv.last_transition = Some(event.clone());
            rv.rollback = Some(event.clone());
        });
        if self.inflight.is_none() {
            self.write_rollback(v, event);
        }
    }

    fn write_rollback(&mut self, v: &Versioned, event: Event) {
        let state = MachineState { phase: Phase::RolledBack, step: v.record.machine.step };
        let mut record = v.record.clone();
        record.machine = state;
        record.weight_bp = 0;
        record.seq += 1;
        record.last_event = event.clone();
        record.rollback = Some(event);
        record.writer = self.node.clone();
        record.step_requests = 0;
        if let Some(l) = &self.lead {
            record.judge = l.judge.state().clone();
        }
        self.send(Some(v.revision), record, false, None);
    }

    /// An operator's command, written to the record from whichever replica got it; the answer
    /// comes once the write has.
    pub fn command(&mut self, cmd: Command, reason: Option<&str>, view: &FleetView, now: Instant, reply: Reply) {
        let refuse = |reply: Reply, why: String| {
            let _ = reply.send(Err(CommandFailure::Command(CommandError::Refused(why))));
        };
        let Some(v) = view.records.get(&self.config.name).filter(|_| view.synced).cloned() else {
            let why = if view.synced {
                "the fleet has not started a rollout of this route yet"
            } else {
                "this replica has not read the fleet's record yet (etcd unreachable?)"
            };
            return refuse(reply, why.into());
        };
        if v.record.identity != self.identity {
            return refuse(
                reply,
                self.reason
                    .clone()
                    .unwrap_or_else(|| "this replica's config disagrees with the fleet's rollout".into()),
            );
        }
        if self.inflight.is_some() {
            return refuse(reply, "another change of this rollout is being written; try again".into());
        }
        let age = v.record.step_age(SystemTime::now());
        let plan = Plan::of(&self.config.rollout);
        let mut machine = Machine::resume(
            plan,
            v.record.machine.clone(),
            now.checked_sub(age).unwrap_or(now),
            v.record.step_requests,
        );
        let change = match machine.command(cmd, now, reason) {
            Ok(c) => c,
            Err(r) => return refuse(reply, r.0),
        };
        let judge = if cmd == Command::Retry { JudgeState::default() } else { v.record.judge.clone() };
        let mut record = self.next_record(&v.record, &change, machine.state().clone(), judge);
        if change.kind == EventKind::RolledBack {
            let figures = self.merged.last.as_ref().map(|(s, c, _)| (WindowFigures::of(s), WindowFigures::of(c)));
            let (stable, candidate) = figures.unzip();
            record.last_event.evidence = Some(Evidence {
                rule: Some(Cause::Manual),
                node: Some(self.node.clone()),
                stable: Some(VersionEvidence::of(&self.identity.stable, stable)),
                candidate: Some(VersionEvidence::of(&self.identity.candidate, candidate)),
                ..Evidence::default()
            });
            record.rollback = Some(record.last_event.clone());
        }
        if cmd == Command::Retry {
            record.epoch += 1;
        }
        self.send(Some(v.revision), record, false, Some(reply));
    }

    /// The record after `change` of `record`.
    fn next_record(
        &self,
        record: &RolloutRecord,
        change: &Change,
        machine: MachineState,
        judge: JudgeState,
    ) -> RolloutRecord {
        let event = self.event(change, None);
        RolloutRecord {
            route: record.route.clone(),
            identity: record.identity.clone(),
            epoch: record.epoch,
            seq: record.seq + 1,
            machine,
            weight_bp: change.weight_bp,
            judge,
            step_requests: 0,
            rollback: (change.to == Phase::RolledBack).then(|| event.clone()),
            last_event: event,
            writer: self.node.clone(),
        }
    }

    fn event(&self, change: &Change, evidence: Option<Evidence>) -> Event {
        let (route, id) = (&self.config.name, &self.identity);
        Event::of(timestamp(SystemTime::now()), route, change, evidence, &id.candidate, &id.stable)
    }

    fn evidence(
        &self,
        rule: RuleKind,
        (judge_kind, epoch): (&str, u64),
        judge: &Judge,
        stable: &Reading,
        candidate: &Reading,
    ) -> Evidence {
        Evidence {
            rule: Some(Cause::Rule(rule)),
            judge: Some(judge.figures().clone()),
            fleet: Some(FleetDecider { judge: judge_kind.to_string(), node: self.node.clone(), epoch: Some(epoch) }),
            stable: Some(VersionEvidence::of(&self.identity.stable, Some(WindowFigures::of(stable)))),
            candidate: Some(VersionEvidence::of(&self.identity.candidate, Some(WindowFigures::of(candidate)))),
            detected_at: Some(timestamp(SystemTime::now())),
            ..Evidence::default()
        }
    }

    fn send(&mut self, base: Option<i64>, record: RolloutRecord, as_leader: bool, reply: Option<Reply>) {
        // Unique in the process: a route's controller replaced by a reload must never take
        // the answer to its predecessor's write for its own.
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let event = Some(record.last_event.clone());
        self.inflight = Some(Inflight { token, as_leader, reply });
        self.fleet.write(Write { route: self.config.name.clone(), base, record, as_leader, event, token });
    }

    /// The outcome of this route's write: clears it, keeps the leader's basis, and hands back
    /// an operator's reply with what to answer.
    pub fn written(&mut self, w: &Written) -> Option<(Reply, Result<(), CommandFailure>)> {
        let inflight = self.inflight.take_if(|i| i.token == w.token)?;
        if let (Ok(revision), Some(lead), true) = (&w.outcome, self.lead.as_mut(), inflight.as_leader) {
            // The leader's own write: its machine and judge already are that state.
            lead.basis = *revision;
        }
        if let Err(e) = &w.outcome {
            warn!(route = %self.config.name, error = %e, "fleet: the rollout record was not written");
            self.lead = None;
        }
        let reply = inflight.reply?;
        let answer = match &w.outcome {
            Ok(_) => Ok(()),
            Err(WriteError::Conflict) => Err(CommandFailure::Command(CommandError::Refused(
                "the fleet's rollout changed while the command was written; check `veer status` and try again".into(),
            ))),
            Err(e @ WriteError::Unavailable(_)) => Err(CommandFailure::Fleet(e.to_string())),
        };
        Some((reply, answer))
    }

    fn publish_status(&self, view: &FleetView) {
        let route = &self.config.name;
        let record = view.records.get(route).map(|v| FleetRecord {
            revision: v.revision,
            epoch: v.record.epoch,
            phase: v.record.machine.phase,
            step: matches!(v.record.machine.phase, Phase::Progressing | Phase::Paused).then_some(v.record.machine.step),
            candidate_weight: f64::from(v.record.weight_bp) / 100.0,
            stable_version: v.record.identity.stable.clone(),
            candidate_version: v.record.identity.candidate.clone(),
            plan: v.record.identity.plan.clone(),
            writer: v.record.writer.clone(),
        });
        let fleet_identity = view.records.get(route).map(|v| &v.record.identity);
        let now_ms = crate::fleet::record::unix_ms(SystemTime::now());
        // The leader reads every member's counters; the others show what it last saved.
        let checkpoint = (!self.leading(view)).then(|| view.leader_checkpoint(route)).flatten();
        let counts = match checkpoint {
            Some(c) => &c.members,
            None => &self.merged.members,
        };
        let merged = match checkpoint {
            Some(c) => c.merged.clone(),
            None => self.merged_windows(),
        };
        let mut members: Vec<FleetMember> = view
            .members
            .iter()
            .filter_map(|(node, m)| {
                let r = m.report.route(route)?;
                let heard = view.counters.get(node).map_or(m.report.at_ms, |c| c.report.at_ms.max(m.report.at_ms));
                let count = counts.iter().find(|(n, _, _)| n == node);
                Some(FleetMember {
                    node: node.clone(),
                    last_heard_ms: now_ms.saturating_sub(heard),
                    candidate_weight: f64::from(r.weight_bp) / 100.0,
                    standing: r.standing,
                    agrees: fleet_identity == Some(&r.identity),
                    candidate_version: r.identity.candidate.clone(),
                    stable: count.map(|c| c.1),
                    candidate: count.map(|c| c.2),
                })
            })
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let (live, _) = census(view, route);
        // The local judge's own share once it judges a rollout, else what it would get now.
        let cut_for = if self.local.2 == 0 { live } else { self.local.1 };
        let split = FleetConfidence::split(self.config.rollback.confidence, cut_for);
        let status = FleetStatus {
            node: self.node.clone(),
            connected: view.connected,
            leader: view.leaders.get(route).map(|l| l.node.clone()),
            standing: self.standing,
            reason: self.reason.clone(),
            record,
            members,
            merged,
            alpha: FleetAlpha { merged: 1.0 - split.merged, local: 1.0 - split.local },
        };
        self.rollout.set_view(|rv| rv.fleet = Some(status));
    }
}

/// Which readings a phase judges: in preview the candidate's mirrored answers; while baking,
/// stable's answers to copies of the candidate's requests when there are any.
fn judged_readings<'a>(
    phase: Phase,
    stable: &'a Reading,
    candidate: &'a Reading,
    mirror: &'a MirrorReading,
) -> (&'a Reading, &'a Reading, bool) {
    let stable_mirrored = phase == Phase::Baking && mirror.stable.window.requests() > 0;
    let judged = if phase == Phase::Preview { &mirror.reading } else { candidate };
    (if stable_mirrored { &mirror.stable } else { stable }, judged, stable_mirrored)
}

fn observation<'a>(
    stable: &'a Reading,
    judged: &'a Reading,
    pairs: (u64, u64),
    weight_bp: u32,
    stable_mirrored: bool,
) -> Observation<'a> {
    Observation {
        stable_tick: &stable.tick,
        candidate_tick: &judged.tick,
        stable_window: &stable.window,
        candidate_window: &judged.window,
        weight_bp,
        mirror_compared: pairs.0,
        mirror_mismatched: pairs.1,
        stable_mirrored,
    }
}
