//! The rollout state machine: pure code, time passed in by the caller.
//!
//! ```text
//! pending ─▶ progressing(step i) ⇄ paused ─▶ promoted
//!    └──────────────┴───────────────┴──────────▶ rolled_back ─(retry)─▶ progressing(0)
//! ```
//!
//! A step advances only when it has lasted `step_interval` **and** seen `min_requests`
//! candidate requests **and** the judge calls the candidate healthy: low traffic stretches a
//! step instead of promoting on thin evidence, and an inconclusive judge holds it. With
//! `auto_promote = false` the last step holds until an operator promotes. `rolled_back` is
//! sticky: only `retry` (or a new candidate version, which is a new machine) leaves it.
//!
//! A blue-green plan has no steps:
//!
//! ```text
//! pending ─▶ preview (0%) ─▶ baking (100%) ─▶ promoted
//!    └──────────┴───────────────┴──────────────────▶ rolled_back ─(retry)─▶ preview
//! ```
//!
//! `preview` gives the candidate only override-header and mirrored traffic; it switches to
//! `baking` at 100% in one step once it has lasted `preview`, the candidate answered
//! `min_requests` judged (mirrored) requests and the judge says healthy. `baking` promotes once
//! it has lasted `bake` with `min_requests` candidate requests and a healthy judge (or holds
//! for `veer promote` with `auto_promote = false`). A failing verdict in either rolls back in
//! that tick. Pause and resume are refused in both: preview holds no user traffic to hold, and
//! a bake that stops counting would keep everyone on an unproven candidate; `abort` returns
//! to stable and a reload with a longer `preview` or `bake` extends the phase. Which path a
//! rollout follows is read from its phase, so a reload that changes the strategy mid-rollout
//! finishes the current rollout the old way; `start` and `retry` use the plan's strategy.
#![deny(clippy::disallowed_methods)]

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Phase;
use super::judge::Verdict;
use crate::config::{RolloutConfig, Strategy};
use crate::split::FULL_BP;

/// The plan a machine walks: a route's `[routes.rollout]`, as validated.
pub type Plan = RolloutConfig;

impl Plan {
    /// The plan of a route's `[routes.rollout]`.
    pub fn of(c: &RolloutConfig) -> Plan {
        let mut plan = c.clone();
        if plan.steps_bp.is_empty() {
            plan.steps_bp = vec![FULL_BP];
        }
        plan
    }

    /// The phase a rollout (re)starts in: step 0, or blue-green's preview.
    pub fn first_phase(&self) -> Phase {
        match self.strategy {
            Strategy::Canary => Phase::Progressing,
            Strategy::BlueGreen => Phase::Preview,
        }
    }
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Jump to 100% and finish.
    Promote,
    /// Roll back now.
    Abort,
    /// Hold at the current step.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Start over from step 0 after a rollback.
    Retry,
}

impl Command {
    /// Parses the admin API's verb.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "promote" => Command::Promote,
            "abort" => Command::Abort,
            "pause" => Command::Pause,
            "resume" => Command::Resume,
            "retry" => Command::Retry,
            _ => return None,
        })
    }
}

/// Journal event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A rollout began.
    Started,
    /// The candidate moved to the next step.
    Step,
    /// An operator paused.
    Paused,
    /// An operator resumed.
    Resumed,
    /// The candidate serves everything.
    Promoted,
    /// Snapped back to stable.
    RolledBack,
    /// An operator restarted a rolled-back rollout.
    Retried,
    /// The route's configuration changed under a running rollout.
    Reloaded,
}

impl EventKind {
    /// The `kind` value.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Step => "step",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Promoted => "promoted",
            EventKind::RolledBack => "rolled_back",
            EventKind::Retried => "retried",
            EventKind::Reloaded => "reloaded",
        }
    }
}

/// A transition the machine made.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What happened.
    pub kind: EventKind,
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// Step after (when progressing or paused).
    pub step: Option<usize>,
    /// Candidate weight after, basis points.
    pub weight_bp: u32,
    /// Why, in words.
    pub reason: String,
}

/// Why a command was refused (HTTP 409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CommandRefused(pub String);

/// The persistent part of a machine: what the state file records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// Current phase.
    pub phase: Phase,
    /// Current step index (meaningful when progressing or paused).
    pub step: usize,
}

/// A rollout's state machine.
#[derive(Debug, Clone)]
pub struct Machine {
    plan: Plan,
    state: MachineState,
    step_since: Instant,
    step_requests: u64,
}

impl Machine {
    /// A machine that has not started.
    pub fn new(plan: Plan, now: Instant) -> Self {
        Machine { plan, state: MachineState { phase: Phase::Pending, step: 0 }, step_since: now, step_requests: 0 }
    }

    /// A machine resumed from a recorded state; the dwell at the current step restarts `now`.
    pub fn restore(plan: Plan, mut state: MachineState, now: Instant) -> Self {
        state.step = state.step.min(plan.steps_bp.len() - 1);
        Machine { plan, state, step_since: now, step_requests: 0 }
    }

    /// A machine continuing a fleet's recorded state: the step began at `step_since` (from the
    /// recorded transition time) with `step_requests` already counted, so a new leader neither
    /// restarts the dwell nor takes the step twice.
    pub fn resume(plan: Plan, state: MachineState, step_since: Instant, step_requests: u64) -> Self {
        let mut m = Machine::restore(plan, state, step_since);
        m.step_requests = step_requests;
        m
    }

    /// The recorded state.
    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.state.phase
    }

    /// Current step, when the candidate is on one.
    pub fn step(&self) -> Option<usize> {
        matches!(self.state.phase, Phase::Progressing | Phase::Paused).then_some(self.state.step)
    }

    /// Candidate requests seen at the current step.
    pub fn step_requests(&self) -> u64 {
        self.step_requests
    }

    /// When the current step (or phase) began.
    pub fn step_since(&self) -> Instant {
        self.step_since
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The candidate's weight in the current phase.
    pub fn weight_bp(&self) -> u32 {
        match self.state.phase {
            Phase::Progressing | Phase::Paused => self.plan.steps_bp[self.state.step],
            Phase::Promoted | Phase::Baking => FULL_BP,
            Phase::Stable | Phase::Pending | Phase::Preview | Phase::RolledBack => 0,
        }
    }

    /// True while the judge should watch the candidate.
    pub fn judging(&self) -> bool {
        matches!(self.state.phase, Phase::Progressing | Phase::Paused | Phase::Preview | Phase::Baking)
    }

    /// Begins a pending rollout at step 0 (canary) or in preview (blue-green).
    pub fn start(&mut self, now: Instant) -> Option<Change> {
        let (to, reason) = match self.plan.strategy {
            Strategy::Canary => (Phase::Progressing, "rollout started"),
            Strategy::BlueGreen => (Phase::Preview, "rollout started: preview with override and mirrored traffic"),
        };
        (self.state.phase == Phase::Pending).then(|| self.go(EventKind::Started, to, 0, now, reason.into()))
    }

    /// One tick: `candidate_requests` judged candidate requests arrived since the last tick
    /// (in preview: mirrored requests), and the judge said `verdict`.
    pub fn observe(&mut self, now: Instant, candidate_requests: u64, verdict: &Verdict) -> Option<Change> {
        if !self.judging() {
            return None;
        }
        self.step_requests += candidate_requests;
        if let Verdict::Failing(f) = verdict {
            let reason = format!("rule {} tripped", f.rule);
            return Some(self.go(EventKind::RolledBack, Phase::RolledBack, 0, now, reason));
        }
        if *verdict != Verdict::Healthy || self.step_requests < self.plan.min_requests {
            return None;
        }
        let held = now.saturating_duration_since(self.step_since);
        match self.state.phase {
            Phase::Preview if held >= self.plan.preview => {
                let reason = format!(
                    "preview held for {held:?} with {} mirrored candidate requests; switched to the candidate",
                    self.step_requests
                );
                return Some(self.go(EventKind::Step, Phase::Baking, 0, now, reason));
            }
            Phase::Baking if held >= self.plan.bake && self.plan.auto_promote => {
                let reason = format!("baked for {held:?} with {} candidate requests", self.step_requests);
                return Some(self.go(EventKind::Promoted, Phase::Promoted, 0, now, reason));
            }
            Phase::Progressing => {}
            _ => return None,
        }
        if held < self.plan.step_interval {
            return None;
        }
        let next = self.state.step + 1;
        if next < self.plan.steps_bp.len() {
            let reason = format!(
                "step {} held for {:?} with {} candidate requests",
                self.state.step,
                now.saturating_duration_since(self.step_since),
                self.step_requests
            );
            Some(self.go(EventKind::Step, Phase::Progressing, next, now, reason))
        } else if self.plan.auto_promote {
            Some(self.go(EventKind::Promoted, Phase::Promoted, 0, now, "plan completed".into()))
        } else {
            None
        }
    }

    /// Applies an operator's command, or says why it is not allowed now.
    pub fn command(&mut self, cmd: Command, now: Instant, reason: Option<&str>) -> Result<Change, CommandRefused> {
        let why = |default: &str| reason.filter(|r| !r.trim().is_empty()).map_or(default.to_string(), str::to_string);
        let phase = self.state.phase;
        let refuse = |what: &str| Err(CommandRefused(format!("cannot {what}: the rollout is {}", phase.label())));
        match (cmd, phase) {
            (_, Phase::Stable) => Err(CommandRefused("the route has no candidate".into())),
            (
                Command::Promote,
                Phase::Pending | Phase::Progressing | Phase::Paused | Phase::Preview | Phase::Baking,
            ) => Ok(self.go(EventKind::Promoted, Phase::Promoted, 0, now, why("manual promote"))),
            (Command::Promote, Phase::RolledBack) => {
                Err(CommandRefused("cannot promote: the candidate was rolled back; `retry` first".into()))
            }
            (Command::Abort, Phase::RolledBack) => refuse("abort"),
            (Command::Abort, _) => Ok(self.go(EventKind::RolledBack, Phase::RolledBack, 0, now, why("manual"))),
            (Command::Pause, Phase::Progressing) => {
                let step = self.state.step;
                Ok(self.go(EventKind::Paused, Phase::Paused, step, now, why("manual pause")))
            }
            (Command::Resume, Phase::Paused) => {
                let step = self.state.step;
                Ok(self.go(EventKind::Resumed, Phase::Progressing, step, now, why("manual resume")))
            }
            (Command::Pause | Command::Resume, Phase::Preview | Phase::Baking) => Err(CommandRefused(format!(
                "cannot {}: a blue-green rollout in {} is not paused (preview holds no user traffic, a bake \
                 must keep counting); `abort` returns to stable, a reload with a longer preview or bake extends it",
                if cmd == Command::Pause { "pause" } else { "resume" },
                phase.label()
            ))),
            (Command::Retry, Phase::RolledBack) => {
                let to = self.plan.first_phase();
                Ok(self.go(EventKind::Retried, to, 0, now, why("manual retry")))
            }
            (Command::Promote, Phase::Promoted) => refuse("promote"),
            (Command::Pause, _) => refuse("pause"),
            (Command::Resume, _) => refuse("resume"),
            (Command::Retry, _) => refuse("retry"),
        }
    }

    fn go(&mut self, kind: EventKind, to: Phase, step: usize, now: Instant, reason: String) -> Change {
        let from = self.state.phase;
        let step_changed = step != self.state.step || !matches!(from, Phase::Progressing | Phase::Paused);
        self.state = MachineState { phase: to, step };
        if step_changed || matches!(kind, EventKind::Resumed) {
            self.step_since = now;
            self.step_requests = 0;
        }
        Change { kind, from, to, step: self.step(), weight_bp: self.weight_bp(), reason }
    }
}

#[cfg(test)]
// The tests are the callers: they pick the instant the machine is handed.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::rollout::judge::{Breach, RuleKind};
    use std::time::Duration;

    fn plan(auto: bool) -> Plan {
        Plan {
            strategy: Strategy::Canary,
            steps_bp: vec![100, 1000, 10_000],
            step_interval: Duration::from_secs(10),
            min_requests: 50,
            auto_promote: auto,
            preview: Duration::from_secs(300),
            bake: Duration::from_secs(600),
        }
    }

    fn blue_green(auto: bool) -> Plan {
        Plan { strategy: Strategy::BlueGreen, ..plan(auto) }
    }

    /// A blue-green machine in preview since `t0`.
    fn previewing(auto: bool) -> (Machine, Instant) {
        let t0 = Instant::now();
        let mut m = Machine::new(blue_green(auto), t0);
        let c = m.start(t0).expect("starts");
        assert_eq!(
            (c.kind, c.from, c.to, c.step, c.weight_bp),
            (EventKind::Started, Phase::Pending, Phase::Preview, None, 0)
        );
        assert!(c.reason.contains("preview"), "{}", c.reason);
        assert!(m.judging());
        (m, t0)
    }

    /// A blue-green machine baking since `t0 + 300 s`.
    fn baking(auto: bool) -> (Machine, Instant) {
        let (mut m, t0) = previewing(auto);
        m.observe(t0 + Duration::from_secs(300), 50, &Verdict::Healthy).expect("switches");
        assert_eq!(m.phase(), Phase::Baking);
        (m, t0 + Duration::from_secs(300))
    }

    #[test]
    fn blue_green_preview_switches_to_full_weight_after_its_time_traffic_and_a_healthy_judge() {
        let (mut m, t0) = previewing(true);
        let s = Duration::from_secs;
        assert_eq!(m.observe(t0 + s(100), 500, &Verdict::Healthy), None, "preview time not over");
        assert_eq!(m.weight_bp(), 0, "preview sends no ordinary traffic");
        assert_eq!(m.observe(t0 + s(300), 0, &Verdict::Inconclusive), None, "inconclusive holds");
        let c = m.observe(t0 + s(301), 0, &Verdict::Healthy).expect("switches");
        assert_eq!(
            (c.kind, c.from, c.to, c.step, c.weight_bp),
            (EventKind::Step, Phase::Preview, Phase::Baking, None, FULL_BP)
        );
        assert!(c.reason.contains("mirrored") && c.reason.contains("switched"), "{}", c.reason);
        assert_eq!(m.weight_bp(), FULL_BP);
        assert_eq!(m.step_requests(), 0, "the bake counts its own requests");
        assert_eq!(m.step_since(), t0 + s(301), "the bake's time starts at the switch");
    }

    #[test]
    fn blue_green_preview_needs_min_requests() {
        let (mut m, t0) = previewing(true);
        for i in 1..=12 {
            let at = t0 + Duration::from_secs(300 + i);
            assert_eq!(m.observe(at, 4, &Verdict::Healthy), None, "only {} mirrored requests", 4 * i);
        }
        assert_eq!(m.phase(), Phase::Preview);
        assert!(m.observe(t0 + Duration::from_secs(400), 2, &Verdict::Healthy).is_some(), "50 now");
    }

    #[test]
    fn blue_green_bake_promotes_after_its_time_and_traffic() {
        let (mut m, t1) = baking(true);
        let s = Duration::from_secs;
        assert_eq!(m.observe(t1 + s(599), 1000, &Verdict::Healthy), None, "bake not over");
        assert_eq!(m.observe(t1 + s(600), 0, &Verdict::Inconclusive), None, "inconclusive holds");
        let c = m.observe(t1 + s(600), 0, &Verdict::Healthy).expect("promotes");
        assert_eq!(
            (c.kind, c.from, c.to, c.step, c.weight_bp),
            (EventKind::Promoted, Phase::Baking, Phase::Promoted, None, FULL_BP)
        );
        assert!(c.reason.contains("baked"), "{}", c.reason);
        assert_eq!(m.observe(t1 + s(700), 10, &failing()), None, "a promoted candidate is no longer judged");

        let (mut m, t1) = baking(true);
        assert_eq!(m.observe(t1 + s(900), 49, &Verdict::Healthy), None, "thin traffic stretches the bake");
        assert!(m.observe(t1 + s(901), 1, &Verdict::Healthy).is_some());
    }

    #[test]
    fn blue_green_bake_holds_for_an_operator_without_auto_promote() {
        let (mut m, t1) = baking(false);
        assert_eq!(m.observe(t1 + Duration::from_secs(5000), 5000, &Verdict::Healthy), None);
        assert_eq!((m.phase(), m.weight_bp()), (Phase::Baking, FULL_BP));
        let c = m.command(Command::Promote, t1 + Duration::from_secs(5001), Some("green is good")).expect("promote");
        assert_eq!((c.from, c.to, c.reason.as_str()), (Phase::Baking, Phase::Promoted, "green is good"));
    }

    #[test]
    fn blue_green_failing_rolls_back_from_preview_and_from_baking_in_that_tick() {
        let (mut m, t0) = previewing(true);
        let c = m.observe(t0, 1, &failing()).expect("rolls back");
        assert_eq!((c.kind, c.from, c.to, c.weight_bp), (EventKind::RolledBack, Phase::Preview, Phase::RolledBack, 0));
        assert_eq!(m.observe(t0 + Duration::from_secs(900), 1000, &Verdict::Healthy), None, "sticky");
        let (mut m, t1) = baking(true);
        let c = m.observe(t1 + Duration::from_millis(100), 1, &failing()).expect("rolls back");
        assert_eq!((c.kind, c.from, c.to, c.weight_bp), (EventKind::RolledBack, Phase::Baking, Phase::RolledBack, 0));
        assert!(c.reason.contains("error_rate"), "{}", c.reason);
        assert_eq!(m.weight_bp(), 0);
    }

    #[test]
    fn blue_green_commands_and_refusals() {
        use Command::*;
        let t = Instant::now();
        let at = |phase: Phase| Machine::restore(blue_green(true), MachineState { phase, step: 0 }, t);
        let table = [
            (Promote, Phase::Pending, Some(Phase::Promoted)),
            (Promote, Phase::Preview, Some(Phase::Promoted)),
            (Promote, Phase::Baking, Some(Phase::Promoted)),
            (Promote, Phase::Promoted, None),
            (Promote, Phase::RolledBack, None),
            (Abort, Phase::Pending, Some(Phase::RolledBack)),
            (Abort, Phase::Preview, Some(Phase::RolledBack)),
            (Abort, Phase::Baking, Some(Phase::RolledBack)),
            (Abort, Phase::Promoted, Some(Phase::RolledBack)),
            (Abort, Phase::RolledBack, None),
            (Pause, Phase::Preview, None),
            (Pause, Phase::Baking, None),
            (Resume, Phase::Preview, None),
            (Resume, Phase::Baking, None),
            (Retry, Phase::Preview, None),
            (Retry, Phase::Baking, None),
            (Retry, Phase::RolledBack, Some(Phase::Preview)),
        ];
        for (cmd, phase, want) in table {
            let mut m = at(phase);
            match (m.command(cmd, t, None), want) {
                (Ok(c), Some(to)) => {
                    assert_eq!((c.from, c.to), (phase, to), "{cmd:?} in {phase:?}");
                    assert_eq!(c.weight_bp, m.weight_bp());
                }
                (Err(r), None) => assert!(!r.0.is_empty(), "{cmd:?} in {phase:?} needs a reason"),
                (got, want) => panic!("{cmd:?} in {phase:?}: got {got:?}, want {want:?}"),
            }
        }
        let refused = at(Phase::Baking).command(Pause, t, None).expect_err("refused");
        assert!(refused.0.contains("blue-green") && refused.0.contains("abort"), "{}", refused.0);
    }

    #[test]
    fn blue_green_abort_then_retry_restarts_the_preview_with_fresh_counts() {
        let (mut m, t1) = baking(true);
        m.observe(t1 + Duration::from_secs(1), 30, &Verdict::Healthy);
        let c = m.command(Command::Abort, t1 + Duration::from_secs(2), None).expect("abort");
        assert_eq!((c.to, c.weight_bp, c.reason.as_str()), (Phase::RolledBack, 0, "manual"));
        let c = m.command(Command::Retry, t1 + Duration::from_secs(3), None).expect("retry");
        assert_eq!((c.kind, c.to, c.step, c.weight_bp), (EventKind::Retried, Phase::Preview, None, 0));
        assert_eq!((m.step_requests(), m.step_since()), (0, t1 + Duration::from_secs(3)));
        assert_eq!(m.observe(t1 + Duration::from_secs(200), 100, &Verdict::Healthy), None, "a whole new preview");
        assert!(m.observe(t1 + Duration::from_secs(303), 0, &Verdict::Healthy).is_some());
    }

    #[test]
    fn blue_green_restore_keeps_the_phase_and_restarts_its_time() {
        let t0 = Instant::now();
        let m = Machine::restore(blue_green(true), MachineState { phase: Phase::Baking, step: 0 }, t0);
        assert_eq!((m.phase(), m.step(), m.weight_bp(), m.step_since()), (Phase::Baking, None, FULL_BP, t0));
        let m = Machine::restore(blue_green(true), MachineState { phase: Phase::Preview, step: 0 }, t0);
        assert_eq!((m.phase(), m.weight_bp()), (Phase::Preview, 0));
        // A rollout that was progressing when the strategy changed finishes its steps.
        let mut m = Machine::restore(blue_green(true), MachineState { phase: Phase::Progressing, step: 1 }, t0);
        let c = m.observe(t0 + Duration::from_secs(10), 50, &Verdict::Healthy).expect("next step");
        assert_eq!((c.to, c.step), (Phase::Progressing, Some(2)));
    }

    fn failing() -> Verdict {
        Verdict::Failing(Breach { rule: RuleKind::ErrorRate, ln_evidence: 9.0, ln_threshold: 6.0 })
    }

    fn started(auto: bool) -> (Machine, Instant) {
        let t0 = Instant::now();
        let mut m = Machine::new(plan(auto), t0);
        assert_eq!(m.weight_bp(), 0);
        let c = m.start(t0).expect("starts");
        assert_eq!(
            (c.kind, c.from, c.to, c.step, c.weight_bp),
            (EventKind::Started, Phase::Pending, Phase::Progressing, Some(0), 100)
        );
        (m, t0)
    }

    #[test]
    fn walks_every_step_then_promotes() {
        let (mut m, t0) = started(true);
        let s = Duration::from_secs;
        assert_eq!(m.observe(t0 + s(5), 100, &Verdict::Healthy), None, "dwell not reached");
        let c = m.observe(t0 + s(10), 0, &Verdict::Healthy).expect("advances");
        assert_eq!((c.kind, c.step, c.weight_bp), (EventKind::Step, Some(1), 1000));
        let c = m.observe(t0 + s(20), 60, &Verdict::Healthy).expect("advances");
        assert_eq!((c.step, c.weight_bp), (Some(2), 10_000));
        let c = m.observe(t0 + s(30), 60, &Verdict::Healthy).expect("promotes");
        assert_eq!((c.kind, c.to, c.weight_bp, c.step), (EventKind::Promoted, Phase::Promoted, 10_000, None));
        assert_eq!(m.observe(t0 + s(40), 60, &failing()), None, "a promoted candidate is no longer judged");
    }

    #[test]
    fn thin_traffic_stretches_the_step() {
        let (mut m, t0) = started(true);
        for i in 1..=10 {
            assert_eq!(
                m.observe(t0 + Duration::from_secs(10 * i), 4, &Verdict::Healthy),
                None,
                "only {} requests",
                4 * i
            );
        }
        assert_eq!(m.step_requests(), 40);
        let c = m.observe(t0 + Duration::from_secs(200), 10, &Verdict::Healthy).expect("enough now");
        assert_eq!(c.step, Some(1));
        assert_eq!(m.step_requests(), 0, "each step counts its own requests");
    }

    #[test]
    fn inconclusive_holds_and_never_rolls_back() {
        let (mut m, t0) = started(true);
        assert_eq!(m.observe(t0 + Duration::from_secs(60), 500, &Verdict::Inconclusive), None);
        assert_eq!(m.phase(), Phase::Progressing);
        assert!(m.observe(t0 + Duration::from_secs(61), 0, &Verdict::Healthy).is_some());
    }

    #[test]
    fn failing_rolls_back_from_progressing_and_paused_and_sticks() {
        let (mut m, t0) = started(true);
        let c = m.observe(t0, 1, &failing()).expect("rolls back");
        assert_eq!(
            (c.kind, c.from, c.to, c.weight_bp),
            (EventKind::RolledBack, Phase::Progressing, Phase::RolledBack, 0)
        );
        assert!(c.reason.contains("error_rate"));
        for _ in 0..3 {
            assert_eq!(m.observe(t0 + Duration::from_secs(100), 1000, &Verdict::Healthy), None);
        }
        assert_eq!(m.weight_bp(), 0);
        let (mut m, t0) = started(true);
        m.command(Command::Pause, t0, None).expect("pause");
        assert_eq!(m.observe(t0, 1, &failing()).expect("rolls back").from, Phase::Paused);
    }

    #[test]
    fn manual_hold_at_last_step_without_auto_promote() {
        let (mut m, t0) = started(false);
        let s = Duration::from_secs;
        m.observe(t0 + s(10), 50, &Verdict::Healthy).expect("step 1");
        m.observe(t0 + s(20), 50, &Verdict::Healthy).expect("step 2");
        assert_eq!(m.observe(t0 + s(300), 5000, &Verdict::Healthy), None, "holds at 100%");
        assert_eq!(m.weight_bp(), 10_000);
        let c = m.command(Command::Promote, t0 + s(301), Some("looks good")).expect("promote");
        assert_eq!((c.to, c.reason.as_str()), (Phase::Promoted, "looks good"));
    }

    #[test]
    fn every_command_in_every_phase() {
        use Command::*;
        let t = Instant::now();
        let at = |phase: Phase| {
            let mut m = Machine::restore(plan(true), MachineState { phase, step: 1 }, t);
            m.state.phase = phase;
            m
        };
        let allowed = [
            (Promote, Phase::Pending, Some(Phase::Promoted)),
            (Promote, Phase::Progressing, Some(Phase::Promoted)),
            (Promote, Phase::Paused, Some(Phase::Promoted)),
            (Promote, Phase::Promoted, None),
            (Promote, Phase::RolledBack, None),
            (Abort, Phase::Pending, Some(Phase::RolledBack)),
            (Abort, Phase::Progressing, Some(Phase::RolledBack)),
            (Abort, Phase::Paused, Some(Phase::RolledBack)),
            (Abort, Phase::Promoted, Some(Phase::RolledBack)),
            (Abort, Phase::RolledBack, None),
            (Pause, Phase::Pending, None),
            (Pause, Phase::Progressing, Some(Phase::Paused)),
            (Pause, Phase::Paused, None),
            (Pause, Phase::Promoted, None),
            (Pause, Phase::RolledBack, None),
            (Resume, Phase::Progressing, None),
            (Resume, Phase::Paused, Some(Phase::Progressing)),
            (Resume, Phase::RolledBack, None),
            (Retry, Phase::Progressing, None),
            (Retry, Phase::Promoted, None),
            (Retry, Phase::RolledBack, Some(Phase::Progressing)),
        ];
        for (cmd, phase, want) in allowed {
            let mut m = at(phase);
            match (m.command(cmd, t, None), want) {
                (Ok(c), Some(to)) => assert_eq!((c.from, c.to), (phase, to), "{cmd:?} in {phase:?}"),
                (Err(r), None) => assert!(!r.0.is_empty(), "{cmd:?} in {phase:?} needs a reason"),
                (got, want) => panic!("{cmd:?} in {phase:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(at(Phase::Stable).command(Abort, t, None).is_err());
    }

    #[test]
    fn abort_reason_defaults_to_manual_and_retry_restarts_at_step_zero() {
        let (mut m, t0) = started(true);
        m.observe(t0 + Duration::from_secs(10), 50, &Verdict::Healthy).expect("step 1");
        let c = m.command(Command::Abort, t0, None).expect("abort");
        assert_eq!(c.reason, "manual");
        let c = m.command(Command::Retry, t0, None).expect("retry");
        assert_eq!((c.step, c.weight_bp), (Some(0), 100));
    }

    #[test]
    fn pause_keeps_the_weight_and_resume_restarts_the_dwell() {
        let (mut m, t0) = started(true);
        let s = Duration::from_secs;
        m.command(Command::Pause, t0 + s(1), None).expect("pause");
        assert_eq!(m.weight_bp(), 100);
        assert_eq!(m.observe(t0 + s(100), 1000, &Verdict::Healthy), None, "paused does not advance");
        m.command(Command::Resume, t0 + s(100), None).expect("resume");
        assert_eq!(m.observe(t0 + s(105), 100, &Verdict::Healthy), None, "dwell restarted at resume");
        assert!(m.observe(t0 + s(110), 0, &Verdict::Healthy).is_some());
    }

    #[test]
    fn restore_resumes_the_same_step_with_a_fresh_dwell() {
        let t0 = Instant::now();
        let m = Machine::restore(plan(true), MachineState { phase: Phase::Progressing, step: 1 }, t0);
        assert_eq!((m.phase(), m.step(), m.weight_bp()), (Phase::Progressing, Some(1), 1000));
        let m = Machine::restore(plan(true), MachineState { phase: Phase::RolledBack, step: 2 }, t0);
        assert_eq!(m.weight_bp(), 0);
        let m = Machine::restore(plan(true), MachineState { phase: Phase::Paused, step: 9 }, t0);
        assert_eq!(m.step(), Some(2), "a shorter plan clamps the step");
    }
}
