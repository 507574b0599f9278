//! The controller of one rollout: feeds the judge, drives the machine, and applies every
//! transition in the one order that is safe — journal first, then traffic.
//!
//! A snap back stores weight 0 in the same tick the judge fails the candidate; in-flight
//! candidate requests finish. If the state directory cannot be written, the controller holds
//! (no step forward, loud logs) but still serves, and still rolls back: a broken disk never
//! keeps a bad candidate in front of users. A rollback the journal could not record stays
//! pending: it goes into the route's pre-allocated rollback marker (and the state file, if that
//! can be written), is retried every tick, and nothing else is recorded before it, so a
//! restart never undoes it.
//!
//! In a blue-green preview the judge reads the candidate's mirrored traffic. While the
//! candidate bakes at 100%, stable's side is its answers to copies of the candidate's requests,
//! so the bake stays a comparison of the two versions at the same time. At the switch the
//! controller also freezes stable's window into the judge's baseline (saved with the evidence,
//! and in the switch event): the fallback when no such stable answers arrive.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge};
use tracing::{error, info, warn};

use crate::config::RouteConfig;
use crate::journal::{Event, Journal, JournalError, Recovered, RouteRecord, timestamp};
use crate::notify::Notifier;
use crate::rollout::evidence::{Cause, Evidence, Traffic, VersionEvidence};
use crate::rollout::judge::{Baseline, Judge, JudgeState, Observation, RuleKind, Verdict};
use crate::rollout::machine::{Change, Command, EventKind, Machine, Plan};
use crate::rollout::{Phase, RolloutState};
use crate::route_state::{RouteRuntime, VersionRuntime};
use crate::stats::Totals;
use crate::stats::window::{Reading, WindowFigures};
use crate::status::JournalPending;
use crate::telemetry::{
    JOURNAL_PENDING, JOURNAL_WRITE_FAILURES, JUDGE_EVIDENCE, JUDGE_THRESHOLD, ROLLBACKS_TOTAL, Telemetry,
};

/// Mirrored traffic as read at one tick.
#[derive(Debug, Clone)]
pub struct MirrorReading {
    /// The candidate's mirror lane: its answers to copies of stable's requests.
    pub reading: Reading,
    /// Stable's mirror lane: its answers to copies of the candidate's requests (a blue-green
    /// bake), stable's side of the comparison at 100%.
    pub stable: Reading,
    /// Mirrored answers compared with stable's so far (monotone).
    pub compared: u64,
    /// Of those, the ones that differed (monotone).
    pub mismatched: u64,
}

impl MirrorReading {
    /// Ticks both versions' mirror windows and reads the pair counters.
    pub fn of(stable: &VersionRuntime, candidate: &VersionRuntime, now: Instant, window: Duration) -> MirrorReading {
        MirrorReading {
            reading: candidate.tick_mirror(now, window),
            stable: stable.tick_mirror(now, window),
            compared: candidate.mirror_pairs.compared.load(Ordering::Relaxed),
            mismatched: candidate.mirror_pairs.mismatched.load(Ordering::Relaxed),
        }
    }

    /// The pair counters alone, for a route that does not mirror (its mirror window is not
    /// worth a tick).
    pub fn counters(candidate: &VersionRuntime) -> MirrorReading {
        let zero = Totals::default;
        MirrorReading {
            reading: Reading { window: zero(), tick: zero(), total: zero() },
            stable: Reading { window: zero(), tick: zero(), total: zero() },
            compared: candidate.mirror_pairs.compared.load(Ordering::Relaxed),
            mismatched: candidate.mirror_pairs.mismatched.load(Ordering::Relaxed),
        }
    }
}

/// The judge of a route: its rollback rules plus the mirror rule when configured.
fn judge_of(config: &RouteConfig, state: JudgeState) -> Judge {
    Judge::restore(&config.rollback, state).with_mirror_limit(config.mirror.as_ref().and_then(|m| m.max_mismatch_rate))
}

/// Why a command did not apply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The transition is not allowed now (409).
    #[error("{0}")]
    Refused(String),
    /// The state directory could not record it (503).
    #[error("not applied: {0}")]
    Journal(#[from] JournalError),
    /// A rollback: in effect, but the journal could not record it; retried every tick (503).
    #[error("applied, not recorded (retrying every tick): {0}")]
    NotRecorded(JournalError),
}

/// A rollback in effect that the journal has not recorded yet.
#[derive(Debug, Clone)]
struct Unrecorded {
    event: Event,
    attempts: u64,
    error: String,
}

/// What became of a transition that reached traffic.
enum Applied {
    /// Journaled.
    Recorded,
    /// A rollback in effect that the journal could not record (kept pending).
    Unrecorded(JournalError),
}

/// Where the controller sends what it decided.
pub struct Outputs<'a> {
    /// The journal.
    pub journal: &'a Journal,
    /// Webhooks.
    pub notifier: &'a Notifier,
    /// Metric registry.
    pub telemetry: &'a Telemetry,
}

/// The controller of one route's rollout.
pub struct RouteController {
    rollout: Arc<RolloutState>,
    config: RouteConfig,
    machine: Machine,
    judge: Judge,
    stable_version: String,
    evidence_gauges: Vec<(RuleKind, Gauge, Gauge)>,
    last_event: Option<Event>,
    last_checkpoint: Instant,
    /// The mirror pair counters at the previous tick, to feed the judge increments.
    last_pairs: (u64, u64),
    /// A rollback in effect that the journal has not recorded yet.
    unrecorded: Option<Unrecorded>,
    pending_gauge: Gauge,
    write_failures: Counter,
}

/// How often the judge's evidence is saved between transitions, so a crash loses at most
/// this much of it.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for RouteController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteController")
            .field("route", &self.config.name)
            .field("phase", &self.machine.phase())
            .finish()
    }
}

impl RouteController {
    /// Takes over `rollout`: restores its recorded state when the journal has one for this
    /// candidate version, otherwise starts the plan. The weight is set before this returns.
    pub fn new(
        rollout: Arc<RolloutState>,
        config: &RouteConfig,
        runtime: &RouteRuntime,
        out: &Outputs<'_>,
        now: Instant,
    ) -> Self {
        let plan = Plan::of(&config.rollout);
        let write_failures = out.telemetry.route_total(JOURNAL_WRITE_FAILURES, &config.name);
        if let Err(e) = out.journal.prepare_marker(&config.name) {
            write_failures.increment(1);
            warn!(route = %config.name, error = %e, "cannot pre-allocate the rollback marker");
        }
        let recovered = out.journal.recover(&config.name, rollout.candidate_version());
        let last_event = recovered.as_ref().map(|r| r.record.last_event.clone());
        let unrecorded = recovered.as_ref().filter(|r| r.unrecorded).map(|r| Unrecorded {
            event: r.record.last_event.clone(),
            attempts: 0,
            error: "recovered from the rollback marker or state file; not in the journal yet".into(),
        });
        let (machine, judge) = match recovered {
            Some(Recovered { record: rec, .. }) => {
                info!(route = %config.name, candidate = rollout.candidate_version(), phase = rec.machine.phase.label(), step = rec.machine.step, "rollout state recovered");
                let rollback = (rec.machine.phase == Phase::RolledBack).then(|| rec.last_event.clone());
                rollout.set_view(|v| {
                    v.last_transition = Some(rec.last_event.clone());
                    v.rollback = rollback;
                });
                let mut judge = judge_of(config, rec.judge);
                if rec.machine.phase == Phase::Baking && judge.baseline().is_none() {
                    // A crash between the journal line and the state file: the switch event
                    // carries the baseline too.
                    judge.set_baseline(rec.last_event.evidence.as_ref().and_then(|e| e.baseline.clone()));
                }
                (Machine::restore(plan, rec.machine, now), judge)
            }
            None => (Machine::new(plan, now), judge_of(config, JudgeState::default())),
        };
        let last_pairs = runtime.candidate.as_ref().map_or((0, 0), |(_, v)| {
            (v.mirror_pairs.compared.load(Ordering::Relaxed), v.mirror_pairs.mismatched.load(Ordering::Relaxed))
        });
        let evidence_gauges = RuleKind::ALL
            .into_iter()
            .map(|k| {
                let g = |name| out.telemetry.route_gauge_with(name, &config.name, "rule", k.label());
                (k, g(JUDGE_EVIDENCE), g(JUDGE_THRESHOLD))
            })
            .collect();
        let mut c = RouteController {
            rollout,
            config: config.clone(),
            machine,
            judge,
            stable_version: runtime.stable.version.clone(),
            evidence_gauges,
            last_event,
            last_checkpoint: now,
            last_pairs,
            unrecorded,
            pending_gauge: out.telemetry.route_gauge(JOURNAL_PENDING, &config.name),
            write_failures,
        };
        c.publish_unrecorded();
        // A recovered rollout resumes at its recorded weight; a new one stays at 0 until its
        // start is journaled.
        c.rollout.set_weight_bp(c.machine.weight_bp());
        c.publish();
        c.try_start(now, out);
        c
    }

    /// The rollout this controller drives.
    pub fn rollout(&self) -> &Arc<RolloutState> {
        &self.rollout
    }

    fn try_start(&mut self, now: Instant, out: &Outputs<'_>) {
        let before = self.machine.clone();
        if let Some(change) = self.machine.start(now)
            && self.apply(change, None, out).is_err()
        {
            self.machine = before;
        }
    }

    /// Takes a changed configuration of the same rollout (same candidate version).
    pub fn reconfigure(&mut self, config: &RouteConfig, runtime: &RouteRuntime, out: &Outputs<'_>, now: Instant) {
        if *config == self.config && runtime.stable.version == self.stable_version {
            return;
        }
        self.config = config.clone();
        self.stable_version = runtime.stable.version.clone();
        self.machine = Machine::restore(Plan::of(&config.rollout), self.machine.state().clone(), now);
        self.judge = judge_of(config, self.judge.state().clone());
        let change = Change {
            kind: EventKind::Reloaded,
            from: self.machine.phase(),
            to: self.machine.phase(),
            step: self.machine.step(),
            weight_bp: self.machine.weight_bp(),
            reason: "configuration reloaded".into(),
        };
        let _ = self.apply(change, None, out);
    }

    /// One tick with the versions' readings and the candidate's mirrored traffic.
    pub fn tick(
        &mut self,
        now: Instant,
        stable: &Reading,
        candidate: &Reading,
        mirror: &MirrorReading,
        out: &Outputs<'_>,
    ) {
        let pairs =
            (mirror.compared.saturating_sub(self.last_pairs.0), mirror.mismatched.saturating_sub(self.last_pairs.1));
        self.last_pairs = (mirror.compared, mirror.mismatched);
        let _ = self.retry_unrecorded(out);
        if self.machine.phase() == Phase::Pending {
            self.try_start(now, out);
            return;
        }
        if !self.machine.judging() {
            return;
        }
        // In preview the candidate has no judged traffic of its own: its mirrored answers are
        // what it is judged on, and what counts toward `min_requests`. While baking, stable has
        // none: its answers to copies of the candidate's requests are its side, whenever the
        // window holds some (otherwise the judge falls back to the baseline).
        let preview = self.machine.phase() == Phase::Preview;
        let stable_mirrored = self.machine.phase() == Phase::Baking && mirror.stable.window.requests() > 0;
        let judged = if preview { &mirror.reading } else { candidate };
        let stable = if stable_mirrored { &mirror.stable } else { stable };
        let obs = Observation {
            stable_tick: &stable.tick,
            candidate_tick: &judged.tick,
            stable_window: &stable.window,
            candidate_window: &judged.window,
            weight_bp: self.rollout.weight_bp(),
            mirror_compared: pairs.0,
            mirror_mismatched: pairs.1,
            stable_mirrored,
        };
        let verdict = self.judge.evaluate(&obs);
        self.publish_judge();
        self.checkpoint(now, out);
        let before = (self.machine.clone(), self.judge.baseline().cloned());
        let Some(change) = self.machine.observe(now, judged.tick.requests(), &verdict) else { return };
        let mut evidence = match &verdict {
            Verdict::Failing(f) => {
                Some(self.evidence(Cause::Rule(f.rule), WindowFigures::of(stable), WindowFigures::of(judged), now))
            }
            _ => None,
        };
        if let Some(e) = evidence.as_mut() {
            for (side, mirrored) in [(&mut e.candidate, preview), (&mut e.stable, stable_mirrored)] {
                if let Some(v) = side.as_mut().filter(|_| mirrored) {
                    v.traffic = Some(Traffic::Mirrored);
                }
            }
        }
        if change.to == Phase::Baking {
            // Stable as it was right before the switch: what the bake is judged against while
            // no stable answers to mirrored copies arrive.
            let baseline = Baseline::of(&stable.window);
            if baseline.is_none() && self.config.mirror.is_none() {
                warn!(route = %self.config.name, "no stable traffic in the window at the switch: the bake runs the absolute guards only");
            }
            let candidate = VersionEvidence {
                traffic: Some(Traffic::Mirrored),
                ..VersionEvidence::of(self.rollout.candidate_version(), Some(WindowFigures::of(judged)))
            };
            evidence = Some(Evidence {
                baseline: baseline.clone(),
                stable: Some(VersionEvidence::of(&self.stable_version, Some(WindowFigures::of(stable)))),
                candidate: Some(candidate),
                ..Evidence::default()
            });
            self.judge.set_baseline(baseline);
        }
        if self.apply(change, evidence, out).is_err() {
            // Hold: the step forward waits until the state dir can record it.
            self.machine = before.0;
            self.judge.set_baseline(before.1);
        }
    }

    /// An operator's command.
    pub fn command(
        &mut self,
        cmd: Command,
        reason: Option<&str>,
        windows: Option<(WindowFigures, WindowFigures)>,
        out: &Outputs<'_>,
        now: Instant,
    ) -> Result<(), CommandError> {
        let before = (self.machine.clone(), self.judge.clone());
        let change = self.machine.command(cmd, now, reason).map_err(|r| CommandError::Refused(r.0))?;
        if cmd == Command::Retry {
            self.judge = judge_of(&self.config, JudgeState::default());
        }
        let evidence = match (cmd, windows) {
            (Command::Abort, Some((s, c))) => Some(self.evidence(Cause::Manual, s, c, now)),
            _ => None,
        };
        match self.apply(change, evidence, out) {
            Ok(Applied::Recorded) => Ok(()),
            Ok(Applied::Unrecorded(e)) => Err(CommandError::NotRecorded(e)),
            Err(e) => {
                (self.machine, self.judge) = before;
                Err(e.into())
            }
        }
    }

    fn record(&self, last_event: Event) -> RouteRecord {
        RouteRecord {
            route: self.config.name.clone(),
            candidate_version: self.rollout.candidate_version().to_string(),
            machine: self.machine.state().clone(),
            judge: self.judge.state().clone(),
            last_event,
        }
    }

    fn checkpoint(&mut self, now: Instant, out: &Outputs<'_>) {
        if now.saturating_duration_since(self.last_checkpoint) < CHECKPOINT_EVERY {
            return;
        }
        self.last_checkpoint = now;
        if let Some(e) = &self.last_event
            && let Err(err) = out.journal.checkpoint(&self.record(e.clone()))
        {
            self.write_failures.increment(1);
            warn!(route = %self.config.name, error = %err, "cannot save the judge's evidence");
        }
    }

    fn evidence(&self, cause: Cause, stable: WindowFigures, candidate: WindowFigures, now: Instant) -> Evidence {
        let detected = SystemTime::now() - now.elapsed();
        Evidence {
            rule: Some(cause),
            judge: Some(self.judge.figures().clone()),
            stable: Some(VersionEvidence::of(&self.stable_version, Some(stable))),
            candidate: Some(VersionEvidence::of(self.rollout.candidate_version(), Some(candidate))),
            detected_at: Some(timestamp(detected)),
            ..Evidence::default()
        }
    }

    /// Journal, then traffic, then everyone else. A rollback goes to traffic even when the
    /// journal fails (and stays pending until it is recorded); anything else is held, also
    /// while an earlier rollback is still unrecorded.
    fn apply(
        &mut self,
        change: Change,
        evidence: Option<Evidence>,
        out: &Outputs<'_>,
    ) -> Result<Applied, JournalError> {
        let candidate = self.rollout.candidate_version().to_string();
        let event = Event::of(
            timestamp(SystemTime::now()),
            &self.config.name,
            &change,
            evidence,
            &candidate,
            &self.stable_version,
        );
        let rollback = change.kind == EventKind::RolledBack;
        let recorded = match self.retry_unrecorded(out) {
            // Nothing is recorded after an unrecorded rollback: on restart it would win.
            Err(e) if !rollback => Err(e),
            _ => match out.journal.record(&event, &self.record(event.clone())) {
                Err(e) if e.event_appended() => {
                    self.write_failures.increment(1);
                    warn!(route = %self.config.name, error = %e, "the journal has the transition but the state file is stale");
                    Ok(())
                }
                Err(e) => {
                    self.write_failures.increment(1);
                    Err(e)
                }
                Ok(()) => Ok(()),
            },
        };
        let applied = match recorded {
            Ok(()) => Applied::Recorded,
            Err(e) if !rollback => {
                error!(route = %self.config.name, kind = change.kind.label(), error = %e, "cannot record the transition; holding the rollout until the state dir is writable");
                return Err(e);
            }
            Err(e) => {
                error!(route = %self.config.name, error = %e, "cannot record the rollback; rolling back anyway and retrying the record every tick");
                Applied::Unrecorded(e)
            }
        };
        self.rollout.set_weight_bp(change.weight_bp);
        self.last_event = Some(event.clone());
        if let Applied::Unrecorded(e) = &applied {
            self.keep_unrecorded(&event, e, out);
        }
        if change.kind == EventKind::RolledBack {
            let rule = Evidence::rule_label(event.evidence.as_ref());
            warn!(route = %self.config.name, candidate = self.rollout.candidate_version(), %rule, "candidate rolled back to 0%");
            out.telemetry.route_counter(ROLLBACKS_TOTAL, &self.config.name, "rule", rule.to_string()).increment(1);
        } else {
            info!(route = %self.config.name, kind = change.kind.label(), phase = change.to.label(), weight = event.candidate_weight, "rollout transition");
        }
        self.rollout.set_view(|v| {
            v.last_transition = Some(event.clone());
            v.rollback = (change.to == Phase::RolledBack).then(|| event.clone());
        });
        self.publish();
        out.notifier.notify(&event);
        Ok(applied)
    }

    /// Holds `event` (a rollback in effect) until the journal takes it: in the rollback
    /// marker, which is written in place and so works on a full disk, and in the state file
    /// when that can be written.
    fn keep_unrecorded(&mut self, event: &Event, error: &JournalError, out: &Outputs<'_>) {
        if let Some(old) = &self.unrecorded {
            warn!(route = %self.config.name, at = %old.event.at, "an older unrecorded transition is superseded by a new rollback");
        }
        self.unrecorded = Some(Unrecorded { event: event.clone(), attempts: 1, error: error.to_string() });
        if let Err(e) = out.journal.mark_unrecorded(event) {
            self.write_failures.increment(1);
            error!(route = %self.config.name, error = %e, "cannot write the rollback marker either");
        }
        if let Err(e) = out.journal.checkpoint(&self.record(event.clone())) {
            self.write_failures.increment(1);
            warn!(route = %self.config.name, error = %e, "cannot write the state file of the rollback");
        }
        self.publish_unrecorded();
    }

    /// Tries to append the unrecorded rollback, if any. `Ok` when nothing is pending anymore.
    fn retry_unrecorded(&mut self, out: &Outputs<'_>) -> Result<(), JournalError> {
        let Some(pending) = &mut self.unrecorded else { return Ok(()) };
        if let Err(e) = out.journal.append_event(&pending.event) {
            pending.attempts += 1;
            pending.error = e.to_string();
            if pending.attempts.is_power_of_two() {
                warn!(route = %self.config.name, attempts = pending.attempts, error = %e, "the rollback is still not recorded");
            }
            self.write_failures.increment(1);
            self.publish_unrecorded();
            return Err(e);
        }
        let event = pending.event.clone();
        self.unrecorded = None;
        info!(route = %self.config.name, at = %event.at, "the pending rollback is recorded in the journal");
        if let Err(e) = out.journal.checkpoint(&self.record(event)) {
            self.write_failures.increment(1);
            warn!(route = %self.config.name, error = %e, "cannot update the state file after recording the rollback");
        }
        if let Err(e) = out.journal.clear_marker(&self.config.name) {
            // Harmless: the journal has the rollback, so the next start sees the marker as stale.
            warn!(route = %self.config.name, error = %e, "cannot empty the rollback marker");
        }
        self.publish_unrecorded();
        Ok(())
    }

    fn publish_unrecorded(&self) {
        self.pending_gauge.set(if self.unrecorded.is_some() { 1.0 } else { 0.0 });
        let pending = self.unrecorded.as_ref().map(|u| JournalPending {
            at: u.event.at.clone(),
            kind: u.event.kind,
            to: u.event.to,
            reason: u.event.reason.clone(),
            attempts: u.attempts,
            error: u.error.clone(),
        });
        self.rollout.set_view(|v| v.journal_pending = pending);
    }

    fn publish(&self) {
        let (phase, step) = (self.machine.phase(), self.machine.step());
        self.rollout.set_view(|v| {
            v.phase = phase;
            v.step = step;
        });
    }

    fn publish_judge(&self) {
        let figures = self.judge.figures().clone();
        for (kind, evidence, threshold) in &self.evidence_gauges {
            if let Some(r) = figures.rules.iter().find(|r| r.rule == *kind) {
                evidence.set(r.ln_evidence);
                threshold.set(r.ln_threshold);
            }
        }
        self.rollout.set_view(|v| v.judge = figures);
    }
}
