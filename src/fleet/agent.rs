//! The etcd side of fleet mode: one session at a time, on the agent's own thread.
//!
//! A session connects, grants a lease of `lease_ttl`, reads every key of the fleet, then
//! watches them from the revision it read at, so no change falls between the read and the
//! watch. While it lasts it keeps the lease alive, publishes the replica's report, campaigns
//! and resigns, and performs writes.
//!
//! The member answering "no leader" or "request timed out" (an election under way, a slow
//! quorum) or not answering in time does not end the session while its lease is still
//! valid: the failed call is retried at its next tick, a broken keep-alive or watch stream is
//! opened again (each watch from the revision after the last event it delivered, so nothing
//! is missed or seen twice), and the session goes on with its lease and its leaderships. A
//! refused connection, a rejected request, a lease etcd reports gone, or no renewal for
//! `lease_ttl` plus one call's deadline end it: the view is marked disconnected (traffic keeps the weights last
//! applied), and a new session starts after a short pause, on the next member, with a new
//! lease. Every etcd call has a deadline, so a partition never hangs the agent.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::counters::Counters;
use super::keys::{KEEP_EVENTS, Key, Keys};
use super::record::Identity as RolloutIdentity;
use super::record::{
    Checkpoint, CounterReport, CounterRoute, MemberReport, MemberRoute, MirrorCounters, RolloutRecord, Standing,
    unix_ms,
};
use super::{
    Counted, EtcdHistoryError, Fleet, FleetView, Leader, Member, Request, Versioned, Write, WriteError, Written,
};
use crate::data_plane::DataPlane;
use crate::notify::Notifier;
use crate::rollout::event::Event;
use crate::route_state::Lane;
use crate::telemetry::{CLUSTER_CONNECTED, CLUSTER_MEMBERS, CLUSTER_WRITES};

/// Deadline of one etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between a failed session and the next attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often the agent checks whether it should campaign or resign.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(100);
/// How often a leader saves its evidence: what a leader's crash loses at most.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Config(String),
    #[error("the lease expired")]
    LeaseLost,
    #[error("the lease could not be renewed for {0:?}")]
    Unrenewed(Duration),
    #[error("the lease keep-alive stream ended")]
    KeepAliveEnded,
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    #[error("the watch fell behind etcd's compaction (revision {0})")]
    Compacted(i64),
}

impl SessionError {
    /// Whether the member answered that the cluster cannot serve right now (no leader, an
    /// election, a slow quorum) or did not answer in time: worth waiting out while the lease
    /// lasts. etcd's own clients tell these apart by the same messages.
    fn transient(&self) -> bool {
        // The last one is the client's own deadline on a call (tonic's words for it).
        let busy = |m: &str| {
            ["no leader", "leader changed", "request timed out", "too many requests", "Timeout expired"]
                .iter()
                .any(|b| m.contains(b))
        };
        match self {
            SessionError::Timeout(_) | SessionError::KeepAliveEnded => true,
            SessionError::Etcd(etcd_client::Error::GRpcStatus(s)) => busy(s.message()),
            SessionError::WatchEnded(reason) => reason.is_empty() || busy(reason),
            _ => false,
        }
    }
}

async fn call<T>(f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, SessionError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SessionError::Timeout(CALL_TIMEOUT)),
    }
}

/// Runs the agent on a thread of its own until the [`Fleet`] is dropped.
pub(super) fn spawn(fleet: Arc<Fleet>, data: Arc<DataPlane>, notifier: Notifier, rx: mpsc::UnboundedReceiver<Request>) {
    let weak = Arc::downgrade(&fleet);
    let connected = data.telemetry.gauge(CLUSTER_CONNECTED);
    let members = data.telemetry.gauge(CLUSTER_MEMBERS);
    let writes = ["written", "conflict", "failed"].map(|o| data.telemetry.counter(CLUSTER_WRITES, "outcome", o));
    drop(fleet);
    std::thread::Builder::new()
        .name("veer-fleet".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("fleet runtime");
            let mut agent = Agent {
                fleet: weak,
                data,
                notifier,
                rx,
                connected,
                members,
                writes,
                stopped: false,
                session_up: false,
            };
            rt.block_on(agent.run());
        })
        .expect("spawn the fleet thread");
}

struct Agent {
    fleet: Weak<Fleet>,
    data: Arc<DataPlane>,
    notifier: Notifier,
    rx: mpsc::UnboundedReceiver<Request>,
    connected: metrics::Gauge,
    members: metrics::Gauge,
    writes: [metrics::Counter; 3],
    stopped: bool,
    /// Whether the current session got as far as reading and watching the fleet.
    session_up: bool,
}

/// The folders every replica watches.
const WATCHED: [&str; 4] = ["rollouts", "leaders", "members", "checkpoints"];

/// How long a route may go without a leader before a replica that leads nothing yet
/// campaigns for it. One that already leads campaigns at once, so the routes' leaderships
/// gather on one replica, and only it reads the fleet's counters.
const DEFER_CAMPAIGN: Duration = Duration::from_millis(500);

/// One etcd session's state.
struct Session {
    client: Client,
    lease: i64,
    keys: Keys,
    node: String,
    view: FleetView,
    /// The member report last written, to write it again only when it changes.
    member_written: Option<Vec<u8>>,
    /// Since when each route has had no leader, as this replica saw it.
    leaderless: HashMap<String, Instant>,
}

impl Agent {
    async fn run(&mut self) {
        let mut failures = 0u64;
        // Replicas start on different members, so the fleet's sessions spread over etcd.
        let mut attempt = u64::from(fastrand::u32(..));
        while !self.stopped {
            let Some(fleet) = self.fleet.upgrade() else { return };
            let config = fleet.config.clone();
            drop(fleet);
            attempt += 1;
            self.session_up = false;
            match self.session(&config, attempt).await {
                Ok(()) => return,
                Err(e) if self.session_up => {
                    // A session that was up ended: always worth a line, and the count of
                    // failed attempts starts again.
                    failures = 0;
                    warn!(error = %e, "fleet: the etcd session ended; serving with the weights last applied");
                }
                Err(e) => {
                    failures += 1;
                    if failures.is_power_of_two() {
                        warn!(error = %e, attempts = failures, etcd = ?config.etcd, "fleet: no etcd session; serving with the weights last applied");
                    }
                }
            }
            self.connected.set(0.0);
            if let Some(fleet) = self.fleet.upgrade() {
                fleet.view.rcu(|v| FleetView { connected: false, ..(**v).clone() });
                fleet.wake();
            }
            // Writes asked for while there is no session fail at once: the control plane
            // retries what must be retried, and an operator gets an answer.
            let pause = tokio::time::sleep(RETRY_PAUSE);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    req = self.rx.recv() => match req {
                        None => return,
                        Some(req) => self.refuse(req, "no etcd session"),
                    },
                }
            }
        }
    }

    fn refuse(&self, req: Request, why: &str) {
        match req {
            Request::Write(w) => {
                self.writes[2].increment(1);
                if let Some(fleet) = self.fleet.upgrade() {
                    fleet.finish(Written {
                        route: w.route,
                        token: w.token,
                        outcome: Err(WriteError::Unavailable(why.into())),
                    });
                }
            }
            Request::Events { reply, .. } => {
                let _ = reply.send(Err(EtcdHistoryError(why.into())));
            }
        }
    }

    /// A client of one etcd member, `endpoint` (`config.etcd[attempt % n]`): a session talks
    /// to one member and the next session to the next one. (A client balanced over every
    /// member keeps sending part of its calls to a dead one, failing them while the cluster
    /// has quorum.) Calls need the member to have a leader, so a member cut off from the
    /// quorum answers "no leader" at once instead of after etcd's own timeout; the session
    /// waits that out while its lease holds, then moves on.
    async fn connect(config: &crate::config::ClusterConfig, endpoint: &str) -> Result<Client, SessionError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT);
        if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
            let password = std::fs::read_to_string(file)
                .map_err(|e| SessionError::Config(format!("cluster.password_file {}: {e}", file.display())))?;
            opts = opts.with_user(user.clone(), password.trim_end_matches(['\n', '\r']).to_string());
        }
        if config.ca_file.is_some() || config.cert_file.is_some() {
            let read = |key: &str, p: &std::path::Path| {
                std::fs::read(p).map_err(|e| SessionError::Config(format!("{key} {}: {e}", p.display())))
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("cluster.ca_file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                tls =
                    tls.identity(Identity::from_pem(read("cluster.cert_file", cert)?, read("cluster.key_file", key)?));
            }
            opts = opts.with_tls(tls);
        }
        call(Client::connect([endpoint], Some(opts))).await
    }

    /// One session; `Ok` only when the fleet is gone (veer is stopping).
    async fn session(&mut self, config: &crate::config::ClusterConfig, attempt: u64) -> Result<(), SessionError> {
        let endpoint = &config.etcd[usize::try_from(attempt).unwrap_or(0) % config.etcd.len().max(1)];
        let mut client = Self::connect(config, endpoint).await?;
        let ttl = i64::try_from(config.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = call(client.lease_grant(ttl, None)).await?.id();
        let (keeper, alive) = call(client.lease_keep_alive(lease)).await?;
        let keys = Keys::new(&config.prefix);
        let mut s = Session {
            client,
            lease,
            keys,
            node: config.node.clone(),
            view: FleetView::default(),
            member_written: None,
            leaderless: HashMap::new(),
        };
        // One consistent read of everything watched, then watches from just after it. The
        // counters (large, written all the time) and the history are not watched.
        let reads: Vec<TxnOp> =
            WATCHED.iter().map(|k| TxnOp::get(s.keys.folder(k), Some(GetOptions::new().with_prefix()))).collect();
        let read = call(s.client.txn(Txn::new().and_then(reads))).await?;
        let revision = read.header().map_or(0, |h| h.revision());
        s.view = FleetView { connected: true, synced: true, ..FleetView::default() };
        for op in read.op_responses() {
            if let TxnOpResponse::Get(got) = op {
                for kv in got.kvs() {
                    apply_put(&mut s.view, &s.keys, kv);
                }
            }
        }
        let mut next = [revision + 1; WATCHED.len()];
        let mut watch = Some(open_watches(&mut s, &next).await?);
        info!(node = %s.node, etcd = %endpoint, lease, members = s.view.members.len(), records = s.view.records.len(), "fleet: etcd session up");
        self.connected.set(1.0);
        self.session_up = true;
        self.publish_view(&s.view);
        // The report right away, so a starting replica counts at once.
        self.publish_report(&mut s).await?;

        let mut lease_state = LeaseState { ttl: config.lease_ttl, renewed: Instant::now(), troubled: false };
        let mut keep: Option<(LeaseKeeper, LeaseKeepAliveStream)> = Some((keeper, alive));
        let mut keep_alive = tokio::time::interval((config.lease_ttl / 3).max(Duration::from_millis(200)));
        let mut publish = tokio::time::interval(config.publish_interval);
        let mut campaign = tokio::time::interval(CAMPAIGN_EVERY);
        let mut checkpoint = tokio::time::interval(CHECKPOINT_EVERY);
        for t in [&mut keep_alive, &mut publish, &mut campaign, &mut checkpoint] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = keep_alive.tick() => {
                    lease_state.check()?;
                    if keep.is_none() {
                        match call(s.client.lease_keep_alive(lease)).await {
                            Ok(k) => keep = Some(k),
                            Err(e) => lease_state.absorb(e)?,
                        }
                    }
                    if let Some((keeper, _)) = keep.as_mut()
                        && let Err(e) = call(keeper.keep_alive()).await
                    {
                        keep = None;
                        lease_state.absorb(e)?;
                    }
                    if watch.is_none() {
                        match open_watches(&mut s, &next).await {
                            Ok(w) => watch = Some(w),
                            Err(e) => lease_state.absorb(e)?,
                        }
                    }
                }
                msg = async {
                    match keep.as_mut() {
                        Some((_, alive)) => alive.message().await,
                        None => std::future::pending().await,
                    }
                } => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => lease_state.renewed(),
                    Ok(Some(_)) => return Err(SessionError::LeaseLost),
                    Ok(None) => {
                        keep = None;
                        lease_state.absorb(SessionError::KeepAliveEnded)?;
                    }
                    Err(e) => {
                        keep = None;
                        lease_state.absorb(SessionError::from(e))?;
                    }
                },
                _ = publish.tick() => {
                    if let Err(e) = self.publish_report(&mut s).await {
                        lease_state.absorb(e)?;
                    }
                }
                _ = campaign.tick() => {
                    if let Err(e) = self.campaign(&mut s).await {
                        lease_state.absorb(e)?;
                    }
                }
                _ = checkpoint.tick() => {
                    if let Err(e) = self.checkpoint(&mut s).await {
                        lease_state.absorb(e)?;
                    }
                }
                msg = async {
                    match watch.as_mut() {
                        Some(w) => w.message().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            watch = None;
                            lease_state.absorb(SessionError::WatchEnded(String::new()))?;
                            continue;
                        }
                        Err(e) => {
                            watch = None;
                            lease_state.absorb(SessionError::from(e))?;
                            continue;
                        }
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            return Err(SessionError::Compacted(resp.compact_revision()));
                        }
                        watch = None;
                        lease_state.absorb(SessionError::WatchEnded(resp.cancel_reason().to_string()))?;
                        continue;
                    }
                    for e in resp.events() {
                        let Some(kv) = e.kv() else { continue };
                        if let Some(i) = kv.key_str().ok().and_then(|k| folder_of(&s.keys, k)) {
                            next[i] = next[i].max(kv.mod_revision() + 1);
                        }
                        match e.event_type() {
                            EventType::Put => apply_put(&mut s.view, &s.keys, kv),
                            EventType::Delete => apply_delete(&mut s.view, &s.keys, kv),
                        }
                    }
                    self.publish_view(&s.view);
                }
                req = self.rx.recv() => match req {
                    None => {
                        self.stopped = true;
                        // Leaving cleanly: the leader keys and the report go at once, so
                        // another replica takes over without waiting for the lease to expire.
                        let _ = call(s.client.lease_revoke(s.lease)).await;
                        return Ok(());
                    }
                    Some(Request::Write(w)) => {
                        if let Err(e) = self.write(&mut s, *w).await {
                            lease_state.absorb(e)?;
                        }
                    }
                    Some(Request::Events { route, limit, reply }) => {
                        let _ = reply.send(history(&mut s, route.as_deref(), limit).await);
                    }
                },
            }
        }
    }

    fn publish_view(&self, view: &FleetView) {
        self.members.set(view.members.len() as f64);
        if let Some(fleet) = self.fleet.upgrade() {
            fleet.view.store(Arc::new(view.clone()));
            fleet.wake();
        }
    }

    /// Writes the member report when it changed, the counters while a rollout is judged, and
    /// — while this replica leads a route — reads every member's counters.
    async fn publish_report(&mut self, s: &mut Session) -> Result<(), SessionError> {
        let Some(fleet) = self.fleet.upgrade() else { return Ok(()) };
        let standings = fleet.standings.lock().unwrap_or_else(|e| e.into_inner()).clone();
        drop(fleet);
        let (member, counters) = reports(&self.data, &s.node, &standings);
        let member_bytes = serde_json::to_vec(&member.routes).expect("reports serialize");
        if s.member_written.as_ref() != Some(&member_bytes) {
            let value = serde_json::to_vec(&member).expect("reports serialize");
            let put = s.client.put(s.keys.member(&s.node), value, Some(PutOptions::new().with_lease(s.lease)));
            call(put).await?;
            s.member_written = Some(member_bytes);
        }
        if !counters.routes.is_empty() {
            let value = serde_json::to_vec(&counters).expect("counters serialize");
            let put = s.client.put(s.keys.counter(&s.node), value, Some(PutOptions::new().with_lease(s.lease)));
            call(put).await?;
        }
        if s.view.leaders.values().any(|l| l.node == s.node) {
            let got = call(s.client.get(s.keys.folder("counters"), Some(GetOptions::new().with_prefix()))).await?;
            s.view.counters = got
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let report: CounterReport = serde_json::from_slice(kv.value()).ok()?;
                    Some((report.node.clone(), Arc::new(Counted { report, lease: kv.lease() })))
                })
                .collect();
            self.publish_view(&s.view);
        } else if !s.view.counters.is_empty() {
            s.view.counters.clear();
            self.publish_view(&s.view);
        }
        Ok(())
    }

    async fn checkpoint(&mut self, s: &mut Session) -> Result<(), SessionError> {
        let Some(fleet) = self.fleet.upgrade() else { return Ok(()) };
        let routes = std::mem::take(&mut *fleet.checkpoint.lock().unwrap_or_else(|e| e.into_inner()));
        drop(fleet);
        if routes.is_empty() {
            return Ok(());
        }
        let c = Checkpoint { node: s.node.clone(), at_ms: unix_ms(SystemTime::now()), routes };
        let value = serde_json::to_vec(&c).expect("checkpoints serialize");
        call(s.client.put(s.keys.checkpoint(&s.node), value, None)).await?;
        Ok(())
    }

    /// Takes the leadership of the routes this replica may lead and nobody leads; gives up
    /// the ones it may no longer lead.
    async fn campaign(&mut self, s: &mut Session) -> Result<(), SessionError> {
        let Some(fleet) = self.fleet.upgrade() else { return Ok(()) };
        let eligible = fleet.eligible.lock().unwrap_or_else(|e| e.into_inner()).clone();
        drop(fleet);
        let mut changed = false;
        let leads_some = s.view.leaders.values().any(|l| l.node == s.node);
        s.leaderless.retain(|route, _| !s.view.leaders.contains_key(route));
        for route in &eligible {
            if s.view.leaders.contains_key(route) {
                continue;
            }
            let since = *s.leaderless.entry(route.clone()).or_insert_with(Instant::now);
            if !leads_some && since.elapsed() < DEFER_CAMPAIGN {
                continue;
            }
            let key = s.keys.leader(route);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, s.node.clone(), Some(PutOptions::new().with_lease(s.lease)))]);
            let resp = call(s.client.txn(txn)).await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision());
                info!(route = %route, node = %s.node, "fleet: leading the route's rollout");
                s.view.leaders.insert(route.clone(), Leader { node: s.node.clone(), revision });
                changed = true;
            }
        }
        let resign: Vec<(String, i64)> = s
            .view
            .leaders
            .iter()
            .filter(|(route, l)| l.node == s.node && !eligible.contains(*route))
            .map(|(route, l)| (route.clone(), l.revision))
            .collect();
        for (route, revision) in resign {
            let key = s.keys.leader(&route);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, revision)])
                .and_then([TxnOp::delete(key, None)]);
            call(s.client.txn(txn)).await?;
            info!(route = %route, node = %s.node, "fleet: no longer leading the route (its config is not the fleet's)");
            s.view.leaders.remove(&route);
            changed = true;
        }
        if changed {
            self.publish_view(&s.view);
        }
        Ok(())
    }

    async fn write(&mut self, s: &mut Session, w: Write) -> Result<(), SessionError> {
        let outcome = self.transact(s, &w).await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.writes[2].increment(1);
                if let Some(fleet) = self.fleet.upgrade() {
                    let err = WriteError::Unavailable(e.to_string());
                    fleet.finish(Written { route: w.route, token: w.token, outcome: Err(err) });
                }
                return Err(e);
            }
        };
        match &outcome {
            Ok(revision) => {
                self.writes[0].increment(1);
                let v = Versioned { record: w.record.clone(), revision: *revision };
                if s.view.records.get(&w.route).is_none_or(|old| old.revision < *revision) {
                    s.view.records.insert(w.route.clone(), Arc::new(v));
                }
                self.publish_view(&s.view);
                if let Some(e) = &w.event {
                    // The writer is the one replica that saw the transition committed.
                    self.notifier.notify(e);
                }
            }
            Err(_) => self.writes[1].increment(1),
        }
        if let Some(fleet) = self.fleet.upgrade() {
            fleet.finish(Written { route: w.route, token: w.token, outcome });
        }
        Ok(())
    }

    async fn transact(&mut self, s: &mut Session, w: &Write) -> Result<Result<i64, WriteError>, SessionError> {
        let key = s.keys.rollout(&w.route);
        let mut when = vec![match w.base {
            Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        }];
        if w.as_leader {
            match s.view.leaders.get(&w.route) {
                Some(l) if l.node == s.node => {
                    when.push(Compare::create_revision(s.keys.leader(&w.route), CompareOp::Equal, l.revision));
                }
                _ => return Ok(Err(WriteError::Conflict)),
            }
        }
        let value = serde_json::to_vec(&w.record).expect("records serialize");
        let mut then = vec![TxnOp::put(key, value, None)];
        if let Some(e) = &w.event {
            let seq = w.record.seq;
            then.push(TxnOp::put(s.keys.event(&w.route, seq), serde_json::to_vec(e).expect("events serialize"), None));
            if seq > KEEP_EVENTS {
                then.push(TxnOp::delete(s.keys.event(&w.route, seq - KEEP_EVENTS), None));
            }
        }
        let resp = call(s.client.txn(Txn::new().when(when).and_then(then))).await?;
        Ok(if resp.succeeded() { Ok(resp.header().map_or(0, |h| h.revision())) } else { Err(WriteError::Conflict) })
    }
}

/// How a session's lease is doing: when it was last renewed, and whether calls are failing.
struct LeaseState {
    ttl: Duration,
    renewed: Instant,
    troubled: bool,
}

impl LeaseState {
    /// Ends the session once the lease has gone `lease_ttl` plus one call's deadline without
    /// renewal. Until then it may still be valid: etcd refreshes every lease when it elects a
    /// new leader, and a keep-alive sent before the lease ran out may still be answered. A
    /// session kept too long costs nothing but time — a leader's writes are checked against
    /// its leadership by etcd — while one ended too early loses its leaderships.
    fn check(&self) -> Result<(), SessionError> {
        let since = self.renewed.elapsed();
        if since >= self.ttl + CALL_TIMEOUT { Err(SessionError::Unrenewed(since)) } else { Ok(()) }
    }

    /// Keeps the session through `e` when it is transient and the lease still holds.
    fn absorb(&mut self, e: SessionError) -> Result<(), SessionError> {
        if !e.transient() {
            return Err(e);
        }
        self.check()?;
        if !std::mem::replace(&mut self.troubled, true) {
            warn!(error = %e, "fleet: etcd cannot serve right now; keeping the session while its lease lasts");
        }
        Ok(())
    }

    fn renewed(&mut self) {
        self.renewed = Instant::now();
        if std::mem::replace(&mut self.troubled, false) {
            info!("fleet: etcd serves again; the session and its lease held");
        }
    }
}

/// The watches of every [`WATCHED`] folder, each from its revision in `next`.
async fn open_watches(s: &mut Session, next: &[i64; WATCHED.len()]) -> Result<WatchStream, SessionError> {
    let from = |rev| Some(WatchOptions::new().with_prefix().with_start_revision(rev));
    let mut stream = call(s.client.watch(s.keys.folder(WATCHED[0]), from(next[0]))).await?;
    for (k, rev) in WATCHED.iter().zip(next).skip(1) {
        call(stream.watch(s.keys.folder(k), from(*rev))).await?;
    }
    Ok(stream)
}

/// Which of the [`WATCHED`] folders `key` is in.
fn folder_of(keys: &Keys, key: &str) -> Option<usize> {
    let kind = match keys.parse(key)? {
        Key::Rollout(_) => "rollouts",
        Key::Leader(_) => "leaders",
        Key::Member(_) => "members",
        Key::Checkpoint(_) => "checkpoints",
        Key::Counter(_) | Key::Event => return None,
    };
    WATCHED.iter().position(|w| *w == kind)
}

/// The fleet's newest `limit` events, oldest first.
async fn history(s: &mut Session, route: Option<&str>, limit: usize) -> Result<Vec<Event>, EtcdHistoryError> {
    let mut opts = GetOptions::new().with_prefix();
    if route.is_some() {
        opts = opts.with_sort(SortTarget::Key, SortOrder::Descend).with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    let resp =
        call(s.client.get(s.keys.events(route), Some(opts))).await.map_err(|e| EtcdHistoryError(e.to_string()))?;
    let mut events: Vec<Event> = resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
    events.sort_by(|a, b| a.at.cmp(&b.at));
    let skip = events.len().saturating_sub(limit);
    Ok(events.split_off(skip))
}

fn apply_put(view: &mut FleetView, keys: &Keys, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    match keys.parse(key) {
        Some(Key::Rollout(route)) => match serde_json::from_slice::<RolloutRecord>(kv.value()) {
            // The agent's own write is in the view before its watch event; an event of an
            // older revision arriving after it must not bring an older record back.
            Ok(record) if view.records.get(route).is_none_or(|v| v.revision <= kv.mod_revision()) => {
                view.records.insert(route.to_string(), Arc::new(Versioned { record, revision: kv.mod_revision() }));
            }
            Ok(_) => {}
            Err(e) => warn!(key, error = %e, "fleet: a rollout record that does not parse is ignored"),
        },
        Some(Key::Leader(route)) => {
            let node = String::from_utf8_lossy(kv.value()).into_owned();
            view.leaders.insert(route.to_string(), Leader { node, revision: kv.create_revision() });
        }
        Some(Key::Member(node)) => match serde_json::from_slice::<MemberReport>(kv.value()) {
            Ok(report) => {
                let m = Member { report, lease: kv.lease(), seen: Instant::now() };
                view.members.insert(node.to_string(), Arc::new(m));
            }
            Err(e) => warn!(key, error = %e, "fleet: a member report that does not parse is ignored"),
        },
        Some(Key::Checkpoint(node)) => match serde_json::from_slice::<Checkpoint>(kv.value()) {
            Ok(c) => {
                view.checkpoints.insert(node.to_string(), Arc::new(c));
            }
            Err(e) => warn!(key, error = %e, "fleet: a checkpoint that does not parse is ignored"),
        },
        Some(Key::Event | Key::Counter(_)) | None => {}
    }
}

fn apply_delete(view: &mut FleetView, keys: &Keys, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    match keys.parse(key) {
        Some(Key::Rollout(route)) => {
            view.records.remove(route);
        }
        Some(Key::Leader(route)) => {
            view.leaders.remove(route);
        }
        Some(Key::Member(node)) => {
            view.members.remove(node);
        }
        Some(Key::Checkpoint(node)) => {
            view.checkpoints.remove(node);
        }
        Some(Key::Event | Key::Counter(_)) | None => {}
    }
}

/// This replica's report (its routes with a candidate: the rollout each names, the weight it
/// applies, where it stands) and its counters of the rollouts being judged.
fn reports(data: &DataPlane, node: &str, standings: &HashMap<String, Standing>) -> (MemberReport, CounterReport) {
    let snap = data.snapshot();
    let mut member = Vec::new();
    let mut counted = Vec::new();
    for route in &snap.routes {
        let Some(identity) = RolloutIdentity::of(&route.config) else { continue };
        let Some((rollout, cand)) = route.runtime.candidate.as_ref() else { continue };
        let name = route.config.name.clone();
        let standing = standings.get(&name).copied().unwrap_or(Standing::Waiting);
        member.push(MemberRoute {
            route: name.clone(),
            identity: identity.clone(),
            weight_bp: rollout.weight_bp(),
            standing,
        });
        if !rollout.is_live() {
            continue;
        }
        let stable = &route.runtime.stable;
        let mirror = route.policy.mirror.as_ref().map(|_| MirrorCounters {
            candidate: Counters::of(&cand.lane(Lane::Mirror).totals()),
            stable: Counters::of(&stable.lane(Lane::Mirror).totals()),
            compared: cand.mirror_pairs.compared.load(std::sync::atomic::Ordering::Relaxed),
            mismatched: cand.mirror_pairs.mismatched.load(std::sync::atomic::Ordering::Relaxed),
        });
        counted.push(CounterRoute {
            route: name,
            identity,
            stable: Counters::of(&stable.lane(Lane::Judged).totals()),
            candidate: Counters::of(&cand.lane(Lane::Judged).totals()),
            mirror,
        });
    }
    let at_ms = unix_ms(SystemTime::now());
    (
        MemberReport { node: node.to_string(), at_ms, routes: member },
        CounterReport { node: node.to_string(), at_ms, routes: counted },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> SessionError {
        SessionError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(code, message)))
    }

    #[test]
    fn an_election_or_a_slow_quorum_is_waited_out_and_a_dead_member_is_not() {
        for busy in ["etcdserver: no leader", "etcdserver: leader changed", "etcdserver: request timed out"] {
            assert!(status(tonic::Code::Unavailable, busy).transient(), "{busy}");
        }
        assert!(SessionError::Timeout(CALL_TIMEOUT).transient());
        assert!(status(tonic::Code::Cancelled, "Timeout expired").transient(), "the client's own call deadline");
        assert!(SessionError::WatchEnded("etcdserver: no leader".into()).transient());
        assert!(!status(tonic::Code::Unavailable, "tcp connect error: Connection refused").transient());
        assert!(!status(tonic::Code::NotFound, "etcdserver: requested lease not found").transient());
        assert!(!status(tonic::Code::PermissionDenied, "etcdserver: permission denied").transient());
        assert!(!SessionError::LeaseLost.transient());
        assert!(!SessionError::Compacted(7).transient());
    }

    #[test]
    fn a_lease_unrenewed_for_its_ttl_ends_the_session_even_through_transient_errors() {
        let mut fresh = LeaseState { ttl: Duration::from_secs(5), renewed: Instant::now(), troubled: false };
        assert!(fresh.absorb(SessionError::Timeout(CALL_TIMEOUT)).is_ok());
        assert!(fresh.troubled);
        assert!(fresh.absorb(SessionError::LeaseLost).is_err(), "not transient");
        fresh.renewed();
        assert!(!fresh.troubled);
        let past = Instant::now().checked_sub(Duration::from_secs(5) + CALL_TIMEOUT).expect("an instant in the past");
        let mut stale = LeaseState { ttl: Duration::from_secs(5), renewed: past, troubled: false };
        assert!(matches!(stale.absorb(SessionError::Timeout(CALL_TIMEOUT)), Err(SessionError::Unrenewed(_))));
        assert!(stale.check().is_err());
    }

    #[test]
    fn each_watched_folder_resumes_from_its_own_events() {
        let keys = Keys::new("/veer/edge");
        assert_eq!(folder_of(&keys, &keys.rollout("web")), Some(0));
        assert_eq!(folder_of(&keys, &keys.leader("web")), Some(1));
        assert_eq!(folder_of(&keys, &keys.member("n1")), Some(2));
        assert_eq!(folder_of(&keys, &keys.checkpoint("n1")), Some(3));
        assert_eq!(folder_of(&keys, &keys.counter("n1")), None, "counters are not watched");
        assert_eq!(folder_of(&keys, "/other/rollouts/web"), None);
    }
}
