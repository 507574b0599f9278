//! Fleet mode: many veer replicas, one rollout per route, the shared state in etcd.
//!
//! Each replica runs an agent ([`agent`]) on its own thread and runtime, away from the data
//! plane. It holds an etcd session (a lease kept alive), watches the fleet's keys ([`keys`])
//! into a [`FleetView`] that the control plane reads without waiting, publishes the replica's
//! cumulative counters every `publish_interval` under its lease, campaigns for the leadership
//! of the routes the control plane says it may lead, and performs the control plane's writes
//! of rollout records as compare-and-swap transactions. etcd does the consensus: nothing here
//! talks to another replica.
//!
//! What the control plane does with it (who judges what, the brake, config disagreement) is in
//! `control::fleet`; the user's view of it in `docs/fleet.md`.

mod agent;
pub mod counters;
mod keys;
pub mod record;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::ClusterConfig;
use crate::rollout::event::Event;
pub use keys::KEEP_EVENTS;
use record::{Checkpoint, CounterReport, MemberReport, RolloutRecord, RouteCheckpoint, Standing};

/// A rollout record and the etcd `mod_revision` it was read at: the revision a write must
/// compare against.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The record.
    pub record: RolloutRecord,
    /// Its `mod_revision`.
    pub revision: i64,
}

/// A live replica as the watch last saw it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its latest report.
    pub report: MemberReport,
    /// The lease its key is on: a restarted replica comes back under another one.
    pub lease: i64,
    /// When this replica received the report.
    pub seen: Instant,
}

/// A replica's counters as a leader last read them.
#[derive(Debug, Clone)]
pub struct Counted {
    /// The counters.
    pub report: CounterReport,
    /// The lease of the key: a restarted replica counts from zero under another one.
    pub lease: i64,
}

/// The holder of a route's leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Node name.
    pub node: String,
    /// `create_revision` of the leader key: what the leader's writes compare, so a deposed
    /// leader's writes fail.
    pub revision: i64,
}

/// What this replica knows of the fleet, as of the latest watch event.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// The etcd session is up.
    pub connected: bool,
    /// The records have been read at least once since start: until then every route serves
    /// stable only, because no weight may be applied that was not read from a record.
    pub synced: bool,
    /// Rollout records by route.
    pub records: HashMap<String, Arc<Versioned>>,
    /// Live replicas by node.
    pub members: HashMap<String, Arc<Member>>,
    /// Route leaders by route.
    pub leaders: HashMap<String, Leader>,
    /// Leaders' evidence checkpoints by node.
    pub checkpoints: HashMap<String, Arc<Checkpoint>>,
    /// Every member's counters by node, read every `publish_interval` while this replica
    /// leads a route (empty otherwise).
    pub counters: HashMap<String, Arc<Counted>>,
}

impl FleetView {
    /// The latest checkpoint of `route` by its current leader.
    pub fn leader_checkpoint(&self, route: &str) -> Option<&RouteCheckpoint> {
        let leader = self.leaders.get(route)?;
        self.checkpoints.get(&leader.node)?.routes.iter().find(|r| r.route == route)
    }

    /// The newest checkpoint of `route` taken at record revision `revision`.
    pub fn checkpoint(&self, route: &str, revision: i64) -> Option<&RouteCheckpoint> {
        self.checkpoints
            .values()
            .filter_map(|c| c.routes.iter().find(|r| r.route == route && r.revision == revision).map(|r| (c.at_ms, r)))
            .max_by_key(|(at, _)| *at)
            .map(|(_, r)| r)
    }
}

/// A write of a rollout record, performed by the agent as one etcd transaction.
#[derive(Debug)]
pub struct Write {
    /// Route.
    pub route: String,
    /// The `mod_revision` it replaces; `None` when the route has no record yet.
    pub base: Option<i64>,
    /// The new record.
    pub record: RolloutRecord,
    /// Only while this replica leads the route (the leader key's `create_revision` is part of
    /// the comparison). Brakes and operators' commands are not.
    pub as_leader: bool,
    /// The transition, appended to the route's history and sent to webhooks once written.
    pub event: Option<Event>,
    /// Matches the outcome to the write.
    pub token: u64,
}

/// Why a write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The record (or the leadership) changed since it was read: nothing was written.
    #[error("the fleet's rollout changed meanwhile; nothing was written")]
    Conflict,
    /// etcd could not be reached or did not answer in time.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
}

/// What became of a [`Write`].
#[derive(Debug)]
pub struct Written {
    /// Route.
    pub route: String,
    /// The write's token.
    pub token: u64,
    /// The record's new `mod_revision`, or why not.
    pub outcome: Result<i64, WriteError>,
}

/// Why the fleet's history could not be read from etcd (the admin API sees it as
/// [`crate::history::HistoryError::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[error("reading the fleet's history from etcd failed: {0}")]
pub struct EtcdHistoryError(String);

enum Request {
    Write(Box<Write>),
    Events { route: Option<String>, limit: usize, reply: oneshot::Sender<Result<Vec<Event>, EtcdHistoryError>> },
}

/// This replica's link to the fleet: shared by the control plane, the admin API and the agent.
pub struct Fleet {
    config: ClusterConfig,
    view: ArcSwap<FleetView>,
    requests: mpsc::UnboundedSender<Request>,
    results: Mutex<Vec<Written>>,
    /// Where the control plane stands with each route, for the report.
    standings: Mutex<HashMap<String, Standing>>,
    /// Routes this replica may lead (it runs the fleet's or the majority's rollout of them).
    eligible: Mutex<HashSet<String>>,
    /// The evidence of the routes it leads, saved every second.
    checkpoint: Mutex<Vec<RouteCheckpoint>>,
    waker: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("node", &self.config.node).field("prefix", &self.config.prefix).finish()
    }
}

impl Fleet {
    /// This replica's node name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The `[cluster]` settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The latest view, without waiting.
    pub fn view(&self) -> Arc<FleetView> {
        self.view.load_full()
    }

    /// Calls `wake` whenever the view changes or a write completes (the control plane's
    /// doorbell, so a fleet change reaches traffic without waiting for a tick).
    pub fn set_waker(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.waker.set(wake);
    }

    fn wake(&self) {
        if let Some(w) = self.waker.get() {
            w();
        }
    }

    /// Queues a write; its outcome comes back through [`Fleet::take_results`].
    pub fn write(&self, w: Write) {
        if let Err(mpsc::error::SendError(Request::Write(w))) = self.requests.send(Request::Write(Box::new(w))) {
            self.finish(Written {
                route: w.route,
                token: w.token,
                outcome: Err(WriteError::Unavailable("the fleet agent has stopped".into())),
            });
        }
    }

    fn finish(&self, w: Written) {
        self.results.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        self.wake();
    }

    /// The outcomes of completed writes since the last call.
    pub fn take_results(&self) -> Vec<Written> {
        std::mem::take(&mut *self.results.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Says where this replica stands with each route (published in its report).
    pub fn set_standings(&self, standings: HashMap<String, Standing>) {
        *self.standings.lock().unwrap_or_else(|e| e.into_inner()) = standings;
    }

    /// Says which routes this replica may lead; it campaigns for those and resigns the rest.
    pub fn set_eligible(&self, routes: HashSet<String>) {
        *self.eligible.lock().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    /// Hands over the evidence of the routes this replica leads, for the next checkpoint.
    pub fn set_checkpoint(&self, routes: Vec<RouteCheckpoint>) {
        *self.checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    /// The fleet's newest `limit` events (of `route`, or of every route), oldest first.
    pub async fn events(&self, route: Option<&str>, limit: usize) -> Result<Vec<Event>, EtcdHistoryError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Events { route: route.map(str::to_string), limit, reply };
        self.requests.send(req).map_err(|_| EtcdHistoryError("the fleet agent has stopped".into()))?;
        rx.await.map_err(|_| EtcdHistoryError("the fleet agent has stopped".into()))?
    }
}

/// Starts the agent of `config` on its own thread; it reads the replica's counters from
/// `data` and sends webhooks through `notifier` for the transitions it writes.
pub fn start(
    config: ClusterConfig,
    data: Arc<crate::data_plane::DataPlane>,
    notifier: crate::notify::Notifier,
) -> Arc<Fleet> {
    let (tx, rx) = mpsc::unbounded_channel();
    let fleet = Arc::new(Fleet {
        config,
        view: ArcSwap::from_pointee(FleetView::default()),
        requests: tx,
        results: Mutex::new(Vec::new()),
        standings: Mutex::new(HashMap::new()),
        eligible: Mutex::new(HashSet::new()),
        checkpoint: Mutex::new(Vec::new()),
        waker: OnceLock::new(),
    });
    agent::spawn(fleet.clone(), data, notifier, rx);
    fleet
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::judge::JudgeState;

    #[test]
    fn a_new_leader_takes_the_newest_checkpoint_of_the_record_s_revision_only() {
        let cp = |node: &str, at_ms, revision, step_requests| {
            let route = RouteCheckpoint {
                route: "web".into(),
                revision,
                judge: JudgeState::default(),
                step_requests,
                merged: None,
                members: vec![],
            };
            (node.to_string(), Arc::new(Checkpoint { node: node.into(), at_ms, routes: vec![route] }))
        };
        let view = FleetView {
            checkpoints: [cp("a", 10, 7, 1), cp("b", 30, 7, 3), cp("c", 50, 6, 9)].into_iter().collect(),
            ..FleetView::default()
        };
        assert_eq!(view.checkpoint("web", 7).map(|c| c.step_requests), Some(3), "the newest of revision 7");
        assert_eq!(view.checkpoint("web", 8), None, "a checkpoint of another revision is stale");
        assert_eq!(view.checkpoint("api", 7), None);
    }
}
