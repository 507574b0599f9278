//! The control plane: one thread, off the async runtime, that ticks every route.
//!
//! Each tick it reads the versions' counters (rolling windows, metric increments) and lets
//! each rollout's [`RouteController`] judge and act. Operator commands arrive on a channel and
//! are applied between ticks, so exactly one thread ever changes rollout state. Journal fsyncs
//! happen here too, never on a data-plane worker.

pub mod controller;
pub mod fleet;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio::sync::oneshot;
use tracing::error;

use crate::data_plane::DataPlane;
use crate::fleet::Fleet;
use crate::journal::Journal;
use crate::notify::Notifier;
use crate::rollout::Phase;
use crate::rollout::machine::Command;
use crate::snapshot::{Route, Snapshot};
use crate::stats::window::Reading;
use crate::status::RouteStatus;
use crate::telemetry::{CANDIDATE_WEIGHT, ROLLOUT_PHASE, Telemetry, UPKEEP_EVERY};
use controller::{CommandError, MirrorReading, Outputs, RouteController};
use fleet::FleetRoute;

/// A command for a route's rollout, with where to send the answer.
#[derive(Debug)]
pub struct CommandRequest {
    /// Route name.
    pub route: String,
    /// What to do.
    pub command: Command,
    /// Why (journaled).
    pub reason: Option<String>,
    /// The route's new status, or why not.
    pub reply: oneshot::Sender<Result<RouteStatus, CommandFailure>>,
}

/// Why a command failed, with the HTTP status the admin API answers.
#[derive(Debug, thiserror::Error)]
pub enum CommandFailure {
    /// No such route (404).
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    /// Refused (409) or not recorded (503).
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Fleet mode: etcd did not take the write (503); nothing changed.
    #[error("not applied: {0}")]
    Fleet(String),
    /// The control plane has stopped (503).
    #[error("the control plane is shutting down")]
    Stopped,
}

#[derive(Debug)]
enum Msg {
    Command(CommandRequest),
    /// Fleet mode: the fleet's view changed or a write completed.
    Wake,
    Stop,
}

/// Sends operator commands to the control-plane thread (the admin API holds one).
#[derive(Debug, Clone)]
pub struct CommandSender(mpsc::Sender<Msg>);

impl CommandSender {
    /// Sends a command and waits for its outcome.
    pub async fn command(
        &self,
        route: &str,
        command: Command,
        reason: Option<String>,
    ) -> Result<RouteStatus, CommandFailure> {
        let (reply, rx) = oneshot::channel();
        let req = CommandRequest { route: route.to_string(), command, reason, reply };
        self.0.send(Msg::Command(req)).map_err(|_| CommandFailure::Stopped)?;
        rx.await.unwrap_or(Err(CommandFailure::Stopped))
    }
}

/// Handle to the control-plane thread.
#[derive(Debug)]
pub struct ControlHandle {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl ControlHandle {
    /// A sender for commands.
    pub fn sender(&self) -> CommandSender {
        CommandSender(self.tx.clone())
    }

    /// Stops the thread after its current tick and waits for it.
    pub fn stop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

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

    /// Shows `route`'s phase and weight as they are now. Done right after anything changes
    /// them (start, tick, command), so a scrape never reads a value older than the state.
    fn set(&self, route: &Route) {
        let (phase, _, weight) = route.position();
        self.weight.set(weight);
        for (p, gauge) in &self.phases {
            gauge.set(if *p == phase { 1.0 } else { 0.0 });
        }
    }
}

/// The control plane's state: one controller per rollout, due times, metric handles.
pub struct ControlPlane {
    data: Arc<DataPlane>,
    journal: Arc<Journal>,
    notifier: Notifier,
    generation: u64,
    controllers: HashMap<String, RouteController>,
    /// Fleet mode: the rollouts the fleet shares (instead of `controllers`).
    fleet: Option<Arc<Fleet>>,
    fleet_routes: HashMap<String, FleetRoute>,
    gauges: HashMap<String, RouteGauges>,
    due: HashMap<String, Instant>,
    last_upkeep: Instant,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
}

impl ControlPlane {
    /// Takes over every rollout of the current snapshot (recovering recorded state, or in
    /// fleet mode serving stable until the fleet's record is read) before returning, so that
    /// traffic never sees a weight the journal or the fleet does not back.
    pub fn new(
        data: Arc<DataPlane>,
        journal: Arc<Journal>,
        notifier: Notifier,
        fleet: Option<Arc<Fleet>>,
    ) -> ControlPlane {
        let (tx, rx) = mpsc::channel();
        if let Some(f) = &fleet {
            let doorbell = std::sync::Mutex::new(tx.clone());
            f.set_waker(Box::new(move || {
                let _ = doorbell.lock().unwrap_or_else(|e| e.into_inner()).send(Msg::Wake);
            }));
        }
        let mut plane = ControlPlane {
            data,
            journal,
            notifier,
            generation: 0,
            controllers: HashMap::new(),
            fleet,
            fleet_routes: HashMap::new(),
            gauges: HashMap::new(),
            due: HashMap::new(),
            last_upkeep: Instant::now(),
            tx,
            rx,
        };
        plane.sync(Instant::now());
        plane
    }

    /// Runs the plane on its own thread.
    pub fn spawn(self) -> ControlHandle {
        let tx = self.tx.clone();
        let thread = std::thread::Builder::new()
            .name("veer-control".into())
            .spawn(move || self.run())
            .expect("spawn the control thread");
        ControlHandle { tx, thread: Some(thread) }
    }

    fn run(mut self) {
        loop {
            let now = Instant::now();
            let next = self.due.values().min().copied().unwrap_or(now + Duration::from_millis(100));
            match self.rx.recv_timeout(next.saturating_duration_since(now)) {
                Ok(Msg::Command(req)) => self.command(req),
                Ok(Msg::Wake) => self.fleet_changed(),
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.tick(Instant::now());
        }
    }

    /// Fleet mode: applies the fleet's new view at once (a weight change reaches traffic
    /// without waiting for a tick) and answers the commands whose writes completed.
    fn fleet_changed(&mut self) {
        let Some(fleet) = self.fleet.clone() else { return };
        let view = fleet.view();
        let (journal, notifier, telemetry) = self.outputs();
        let out = Outputs { journal: &journal, notifier: &notifier, telemetry: &telemetry };
        let mut replies = Vec::new();
        for w in fleet.take_results() {
            if let Some(r) = self.fleet_routes.get_mut(&w.route).and_then(|fr| fr.written(&w)) {
                replies.push((w.route.clone(), r));
            }
        }
        for fr in self.fleet_routes.values_mut() {
            fr.follow(&view, &out);
        }
        let snap = self.data.snapshot();
        for (route, (reply, answer)) in replies {
            let status = snap.route(&route).map(|r| RouteStatus::of(r));
            let _ = reply.send(answer.and_then(|()| status.ok_or(CommandFailure::UnknownRoute(route))));
        }
        self.share_standings(&fleet);
        for route in &snap.routes {
            if let Some(g) = self.gauges.get(&route.config.name) {
                g.set(route);
            }
        }
    }

    /// Tells the agent where this replica stands with each route and which it may lead.
    fn share_standings(&self, fleet: &Fleet) {
        let view = fleet.view();
        fleet.set_standings(self.fleet_routes.iter().map(|(n, fr)| (n.clone(), fr.standing())).collect());
        fleet.set_checkpoint(self.fleet_routes.values().filter_map(FleetRoute::checkpoint).collect());
        fleet.set_eligible(
            self.fleet_routes.iter().filter(|(_, fr)| fr.eligible(&view)).map(|(n, _)| n.clone()).collect(),
        );
    }

    fn outputs(&self) -> (Arc<Journal>, Notifier, Arc<Telemetry>) {
        (self.journal.clone(), self.notifier.clone(), self.data.telemetry.clone())
    }

    /// Follows the current snapshot: new rollouts get a controller, changed ones are told,
    /// removed ones are dropped.
    fn sync(&mut self, now: Instant) {
        let snap = self.data.snapshot();
        if snap.generation == self.generation {
            return;
        }
        self.generation = snap.generation;
        let (journal, notifier, telemetry) = self.outputs();
        let out = Outputs { journal: &journal, notifier: &notifier, telemetry: &telemetry };
        let mut controllers = HashMap::new();
        let mut fleet_routes = HashMap::new();
        for route in &snap.routes {
            let name = route.config.name.clone();
            self.gauges.entry(name.clone()).or_insert_with(|| RouteGauges::new(&telemetry, &name));
            self.due.entry(name.clone()).or_insert(now);
            let Some(rollout) = route.rollout() else { continue };
            if let Some(fleet) = &self.fleet {
                let fr = match self.fleet_routes.remove(&name) {
                    Some(mut fr) if Arc::ptr_eq(fr.rollout(), rollout) => {
                        fr.reconfigure(&route.config, &out);
                        fr
                    }
                    _ => FleetRoute::new(rollout.clone(), &route.config, &route.runtime, fleet, &out),
                };
                fleet_routes.insert(name, fr);
                continue;
            }
            let c = match self.controllers.remove(&name) {
                Some(mut c) if Arc::ptr_eq(c.rollout(), rollout) => {
                    c.reconfigure(&route.config, &route.runtime, &out, now);
                    c
                }
                _ => RouteController::new(rollout.clone(), &route.config, &route.runtime, &out, now),
            };
            controllers.insert(name, c);
        }
        self.controllers = controllers;
        self.fleet_routes = fleet_routes;
        if let Some(fleet) = &self.fleet {
            self.share_standings(fleet);
        }
        self.gauges.retain(|name, _| snap.route(name).is_some());
        self.due.retain(|name, _| snap.route(name).is_some());
        for route in &snap.routes {
            if let Some(g) = self.gauges.get(&route.config.name) {
                g.set(route);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        self.sync(now);
        let snap = self.data.snapshot();
        let (journal, notifier, telemetry) = self.outputs();
        let out = Outputs { journal: &journal, notifier: &notifier, telemetry: &telemetry };
        for route in &snap.routes {
            let name = &route.config.name;
            if self.due.get(name).is_some_and(|d| *d > now) {
                continue;
            }
            self.due.insert(name.clone(), now + route.config.rollback.tick);
            let readings = read(route, now);
            route.policy.assign.next_tick();
            if let (Some(retry), Some((stable, candidate, _))) = (&route.policy.retry, &readings) {
                retry.deposit(stable.tick.requests() + candidate.tick.requests());
            }
            if let (Some(c), Some((stable, candidate, mirror))) = (self.controllers.get_mut(name), &readings) {
                c.tick(now, stable, candidate, mirror, &out);
            }
            if let (Some(fr), Some(fleet), Some((stable, candidate, mirror))) =
                (self.fleet_routes.get_mut(name), &self.fleet, &readings)
            {
                fr.tick(now, (stable, candidate, mirror), &fleet.view(), &out);
            }
            if let Some(g) = self.gauges.get(name) {
                g.set(route);
            }
        }
        if let Some(fleet) = &self.fleet {
            self.share_standings(fleet);
        }
        if self.last_upkeep.elapsed() >= UPKEEP_EVERY {
            telemetry.upkeep();
            self.last_upkeep = Instant::now();
        }
    }

    fn command(&mut self, req: CommandRequest) {
        let now = Instant::now();
        self.sync(now);
        if let (Some(fleet), Some(fr)) = (&self.fleet, self.fleet_routes.get_mut(&req.route)) {
            // Answered once the record's write completes.
            fr.command(req.command, req.reason.as_deref(), &fleet.view(), now, req.reply);
            return;
        }
        let snap = self.data.snapshot();
        let result = self.apply_command(&snap, &req, now);
        if let (Some(route), Some(g)) = (snap.route(&req.route), self.gauges.get(&req.route)) {
            g.set(route);
        }
        let _ = req.reply.send(result);
    }

    fn apply_command(
        &mut self,
        snap: &Snapshot,
        req: &CommandRequest,
        now: Instant,
    ) -> Result<RouteStatus, CommandFailure> {
        let route = snap.route(&req.route).ok_or_else(|| CommandFailure::UnknownRoute(req.route.clone()))?;
        let (journal, notifier, telemetry) = self.outputs();
        let Some(c) = self.controllers.get_mut(&req.route) else {
            return Err(CommandError::Refused("the route has no candidate".into()).into());
        };
        let figures = route.runtime.candidate.as_ref().map(|(_, v)| (route.runtime.stable.figures(), v.figures()));
        let out = Outputs { journal: &journal, notifier: &notifier, telemetry: &telemetry };
        c.command(req.command, req.reason.as_deref(), figures, &out, now).inspect_err(|e| {
            if matches!(e, CommandError::Journal(_)) {
                error!(route = %req.route, error = %e, "command not applied");
            }
        })?;
        Ok(RouteStatus::of(route))
    }
}

/// Ticks both versions' windows, and their mirror windows when the route mirrors;
/// `None` for routes without candidate.
fn read(route: &Route, now: Instant) -> Option<(Reading, Reading, MirrorReading)> {
    let window = route.config.rollback.window;
    let stable = route.runtime.stable.tick(now, window);
    let (_, cand) = route.runtime.candidate.as_ref()?;
    let mirror = match route.policy.mirror {
        Some(_) => MirrorReading::of(&route.runtime.stable, cand, now, window),
        None => MirrorReading::counters(cand),
    };
    Some((stable, cand.tick(now, window), mirror))
}
