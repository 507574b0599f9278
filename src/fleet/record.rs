//! What a fleet keeps in etcd: the rollout record of each route, and what each replica
//! publishes about itself.
//!
//! The record is the fleet's one state of a rollout. Every replica applies the weight it reads
//! there (the only exception: its own brake, which only ever lowers it to 0), so the record
//! must say everything a replica that has just started, or a new leader, needs to continue:
//! the plan's identity, the machine's phase and step, when the step began, the judge's
//! evidence, and the last transition.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::RouteConfig;
use crate::rollout::event::Event;
use crate::rollout::judge::JudgeState;
use crate::rollout::machine::MachineState;

use super::counters::Counters;
pub use crate::rollout::fleet_status::Standing;
use crate::rollout::fleet_status::{MemberFigures, MergedWindows};

/// Which rollout a record (or a replica's config) is about: two replicas agree on a route only
/// when all of it is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Stable version.
    pub stable: String,
    /// Candidate version.
    pub candidate: String,
    /// A hash of the route's `rollout`, `rollback` and `mirror` settings: the plan and the
    /// rules it is judged by.
    pub plan: String,
}

impl Identity {
    /// The identity of `route`'s rollout; `None` without a candidate.
    pub fn of(route: &RouteConfig) -> Option<Identity> {
        let candidate = route.candidate.as_ref()?;
        let settings = format!("{:?}|{:?}|{:?}", route.rollout, route.rollback, route.mirror);
        Some(Identity {
            stable: route.stable.version.clone(),
            candidate: candidate.version.clone(),
            plan: format!("{:08x}", crc32fast::hash(settings.as_bytes())),
        })
    }
}

/// A route's rollout as the fleet records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Route name.
    pub route: String,
    /// The rollout this is.
    pub identity: Identity,
    /// Counts rollouts of the route, and retries within one: a replica's brake holds for the
    /// epoch it was pulled in, so a stale brake never rolls back a retried candidate.
    pub epoch: u64,
    /// Number of `last_event` in the route's history (one more with every write that has an
    /// event).
    pub seq: u64,
    /// Phase and step.
    pub machine: MachineState,
    /// The candidate's weight, basis points: what every replica applies.
    pub weight_bp: u32,
    /// The judge's evidence as of the last write (the merged judge's).
    pub judge: JudgeState,
    /// Judged candidate requests counted at the current step, as of the last write.
    #[serde(default)]
    pub step_requests: u64,
    /// The latest transition; its time is when the current step began.
    pub last_event: Event,
    /// The rollback event, while rolled back.
    #[serde(default)]
    pub rollback: Option<Event>,
    /// The node that wrote this version of the record.
    pub writer: String,
}

impl RolloutRecord {
    /// How long ago the current step began, by the recorded transition time (zero when the
    /// time cannot be read or lies in the future).
    pub fn step_age(&self, now: SystemTime) -> Duration {
        humantime::parse_rfc3339(&self.last_event.at)
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or(Duration::ZERO)
    }
}

/// One route as a replica reports it: which rollout its config names and what it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRoute {
    /// Route name.
    pub route: String,
    /// The rollout its config names.
    pub identity: Identity,
    /// The candidate weight it applies, basis points.
    pub weight_bp: u32,
    /// Where it stands.
    pub standing: Standing,
}

/// What a replica says about itself, under its own lease: small, and written only when it
/// changes, because every replica watches every member's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    /// Node name.
    pub node: String,
    /// When it was written, Unix milliseconds.
    pub at_ms: u64,
    /// Its routes with a candidate.
    pub routes: Vec<MemberRoute>,
}

impl MemberReport {
    /// The entry of `route`, when the member has one.
    pub fn route(&self, route: &str) -> Option<&MemberRoute> {
        self.routes.iter().find(|r| r.route == route)
    }
}

/// A replica's cumulative counters of one rollout being judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterRoute {
    /// Route name.
    pub route: String,
    /// The rollout they were counted for.
    pub identity: Identity,
    /// Stable's judged counters since the version appeared on this replica.
    pub stable: Counters,
    /// The candidate's.
    pub candidate: Counters,
    /// Mirrored traffic, when the route mirrors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorCounters>,
}

/// A replica's mirrored-traffic counters of one route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorCounters {
    /// The candidate's answers to copies of stable's requests.
    pub candidate: Counters,
    /// Stable's answers to copies of the candidate's requests (a blue-green bake).
    pub stable: Counters,
    /// Pairs compared with the primary answer.
    pub compared: u64,
    /// Of those, the ones that differed.
    pub mismatched: u64,
}

/// What a replica counted, under its own lease, every `publish_interval` while any of its
/// rollouts is judged: one key per replica whatever the number of routes, so etcd's write
/// rate does not grow with them. Only the replicas that lead a route read these keys; nobody
/// watches them, so their size does not multiply by the number of replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterReport {
    /// Node name.
    pub node: String,
    /// When it was written, Unix milliseconds.
    pub at_ms: u64,
    /// Its rollouts being judged.
    pub routes: Vec<CounterRoute>,
}

impl CounterReport {
    /// The counters of `route`'s rollout `identity`, when the member has them.
    pub fn route(&self, route: &str, identity: &Identity) -> Option<&CounterRoute> {
        self.routes.iter().find(|r| r.route == route && r.identity == *identity)
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A leader's evidence between transitions: what a crash of the leader would otherwise lose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteCheckpoint {
    /// Route.
    pub route: String,
    /// The record revision the evidence continues from: a checkpoint of another revision is
    /// stale (the record moved on) and is not used.
    pub revision: i64,
    /// The merged judge's evidence.
    pub judge: JudgeState,
    /// Judged candidate requests counted at the current step.
    pub step_requests: u64,
    /// The fleet's merged windows as the leader judged them, so every replica can show them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<MergedWindows>,
    /// Each member's counts, as the leader read them.
    #[serde(default)]
    pub members: Vec<(String, MemberFigures, MemberFigures)>,
}

/// The checkpoints of the routes one leader leads, in one key written once a second, so the
/// write rate does not grow with the number of routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The leader.
    pub node: String,
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// Per route.
    pub routes: Vec<RouteCheckpoint>,
}
