//! Property tests: the split's proportions over any weight schedule, sticky users' monotonicity,
//! and the canary state machine under any sequence of ticks, verdicts, commands and restarts.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use veer::config::{Config, Strategy as RolloutStrategy};
use veer::rollout::Phase;
use veer::rollout::judge::{Breach, RuleKind, Verdict};
use veer::rollout::machine::{Change, Command, EventKind, Machine, Plan};
use veer::route_state::Role;
use veer::snapshot::Snapshot;
use veer::split::{FULL_BP, Splitter};
use veer::telemetry::Telemetry;

const N: i128 = FULL_BP as i128;

/// Weights as the controller stores them: 0, 100%, the small first steps, anything between.
fn weight() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        1 => Just(FULL_BP),
        2 => 1u32..=100,
        4 => 1u32..FULL_BP,
    ]
}

/// A schedule: (weight, requests at that weight) segments.
fn schedule() -> impl Strategy<Value = Vec<(u32, usize)>> {
    vec((weight(), 0usize..2_500), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Error diffusion carries its accumulator across weight changes, so after every request the
    /// candidate count is the floor of (phase + Σ w) / 10000 over the fractional-weight requests,
    /// plus every request at 100%: within 1 (strictly) of the exact share Σ n_i·w_i / 10000.
    #[test]
    fn split_count_is_the_exact_share_within_one_after_every_request(phase in 0u32..FULL_BP, plan in schedule()) {
        let s = Splitter::with_phase(phase);
        let (mut got, mut share_bp, mut fractional, mut full) = (0i128, 0i128, 0i128, 0i128);
        for (i, &(w, n)) in plan.iter().enumerate() {
            for r in 0..n {
                let picked = s.pick_candidate(w);
                got += i128::from(picked);
                share_bp += i128::from(w);
                match w {
                    0 => prop_assert!(!picked, "weight 0 sent a request to the candidate"),
                    FULL_BP => {
                        prop_assert!(picked, "weight 100% kept a request on stable");
                        full += 1;
                    }
                    _ => fractional += i128::from(w),
                }
                prop_assert!(
                    (got * N - share_bp).abs() < N,
                    "segment {i} request {r}: {got} candidate requests, exact share {}",
                    share_bp as f64 / N as f64
                );
            }
        }
        prop_assert_eq!(got, (i128::from(phase) + fractional) / N + full);
    }

    /// The same bound from a random starting phase, as the proxy builds its splitters.
    #[test]
    fn split_from_a_random_phase_stays_within_one(plan in schedule()) {
        let s = Splitter::new();
        let (mut got, mut share_bp) = (0i128, 0i128);
        for &(w, n) in &plan {
            for _ in 0..n {
                got += i128::from(s.pick_candidate(w));
                share_bp += i128::from(w);
            }
            prop_assert!((got * N - share_bp).abs() < N, "{got} vs {}", share_bp as f64 / N as f64);
        }
    }
}

/// Two sticky routes (by header and by cookie) of a real snapshot, assigned through the
/// route's own policy, as the proxy does per request.
struct StickyRoutes {
    snapshot: Snapshot,
}

impl StickyRoutes {
    fn new() -> StickyRoutes {
        let src = r#"
[[routes]]
name = "web"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
[routes.candidate]
version = "v2"
endpoints = ["127.0.0.1:9002"]
[routes.sticky]
header = "x-user"

[[routes]]
name = "shop"
path_prefix = "/shop"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
[routes.candidate]
version = "v7"
endpoints = ["127.0.0.1:9002"]
[routes.sticky]
cookie = "session"
"#;
        let config = Config::parse(Path::new("sticky.toml"), src).expect("valid config");
        let snapshot = Snapshot::build(Arc::new(config), None, &Telemetry::new(), 1, None).expect("snapshot");
        StickyRoutes { snapshot }
    }

    /// The role of `user` on `route` at `weight_bp`.
    fn role(&self, route: &str, user: &str, weight_bp: u32) -> Role {
        let route = self.snapshot.route(route).expect("route");
        route.rollout().expect("a rollout").set_weight_bp(weight_bp);
        let mut headers = http::HeaderMap::new();
        let value = if route.config.name == "shop" { format!("theme=dark; session={user}") } else { user.to_string() };
        let name = if route.config.name == "shop" { "cookie" } else { "x-user" };
        headers.insert(name, value.parse().expect("header value"));
        route.policy.assign.assign(route, &headers).expect("assigned").role
    }
}

#[test]
fn sticky_users_only_ever_move_from_stable_to_the_candidate_as_the_weight_rises() {
    let routes = StickyRoutes::new();
    proptest!(ProptestConfig::with_cases(300), |(
        user in "[!-:<-~]{1,48}",
        weights in btree_set(0u32..=FULL_BP, 1..24),
    )| {
        for route in ["web", "shop"] {
            prop_assert_eq!(routes.role(route, &user, 0), Role::Stable, "weight 0 is everyone on stable");
            prop_assert_eq!(routes.role(route, &user, FULL_BP), Role::Candidate, "100% is everyone on the candidate");
            // Ascending weights: stable, ..., stable, candidate, ..., candidate.
            let mut on_candidate_at: Option<u32> = None;
            for &w in &weights {
                let role = routes.role(route, &user, w);
                prop_assert_eq!(role, routes.role(route, &user, w), "a user's version is constant at a given weight");
                match (role, on_candidate_at) {
                    (Role::Candidate, None) => on_candidate_at = Some(w),
                    (Role::Stable, Some(first)) => {
                        prop_assert!(false, "{route}: user {user:?} on the candidate at {first} bp, back on stable at {w} bp")
                    }
                    _ => {}
                }
            }
            // And back down: the same threshold read from above.
            for &w in weights.iter().rev() {
                let want = if on_candidate_at.is_some_and(|first| w >= first) { Role::Candidate } else { Role::Stable };
                prop_assert_eq!(routes.role(route, &user, w), want, "weight {} on the way down", w);
            }
        }
    });
}

/// One step of a scenario the control plane could produce.
#[derive(Debug, Clone)]
enum Op {
    /// The controller starts a pending rollout.
    Start,
    /// A tick `after_ms` later with `requests` judged candidate requests and a verdict.
    Tick { after_ms: u64, requests: u64, verdict: Judged },
    /// An operator's command.
    Cmd(Command),
    /// The process restarts `after_ms` later and restores the recorded state.
    Restart { after_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Judged {
    Healthy,
    Inconclusive,
    Failing,
}

fn op() -> impl Strategy<Value = Op> {
    let verdict = prop_oneof![6 => Just(Judged::Healthy), 2 => Just(Judged::Inconclusive), 1 => Just(Judged::Failing)];
    let cmd = prop_oneof![
        Just(Command::Promote),
        Just(Command::Abort),
        Just(Command::Pause),
        Just(Command::Resume),
        Just(Command::Retry),
    ];
    prop_oneof![
        1 => Just(Op::Start),
        12 => (0u64..3_000, 0u64..40, verdict).prop_map(|(after_ms, requests, verdict)| Op::Tick { after_ms, requests, verdict }),
        3 => cmd.prop_map(Op::Cmd),
        1 => (0u64..3_000).prop_map(|after_ms| Op::Restart { after_ms }),
    ]
}

fn canary_plan() -> impl Strategy<Value = Plan> {
    (btree_set(1u32..FULL_BP, 0..6), 1u64..3_000, 0u64..80, any::<bool>()).prop_map(
        |(steps, interval_ms, min_requests, auto_promote)| {
            let mut steps_bp: Vec<u32> = steps.into_iter().collect();
            steps_bp.push(FULL_BP);
            Plan {
                strategy: RolloutStrategy::Canary,
                steps_bp,
                step_interval: Duration::from_millis(interval_ms),
                min_requests,
                auto_promote,
                preview: Duration::from_secs(300),
                bake: Duration::from_secs(600),
            }
        },
    )
}

/// An independent reading of the documented rules: what the machine must do next.
#[derive(Debug, Clone)]
struct Model {
    phase: Phase,
    step: usize,
    since: Duration,
    requests: u64,
}

/// What a transition must look like: (kind, from, to, step, weight).
type Expect = (EventKind, Phase, Phase, Option<usize>, u32);

impl Model {
    fn weight(&self, plan: &Plan) -> u32 {
        match self.phase {
            Phase::Progressing | Phase::Paused => plan.steps_bp[self.step],
            Phase::Promoted => FULL_BP,
            _ => 0,
        }
    }

    fn go(&mut self, plan: &Plan, kind: EventKind, to: Phase, step: usize, restart_dwell: Option<Duration>) -> Expect {
        let from = self.phase;
        self.phase = to;
        self.step = step;
        if let Some(t) = restart_dwell {
            self.since = t;
            self.requests = 0;
        }
        let on_step = matches!(to, Phase::Progressing | Phase::Paused).then_some(step);
        (kind, from, to, on_step, self.weight(plan))
    }

    fn start(&mut self, plan: &Plan, t: Duration) -> Option<Expect> {
        (self.phase == Phase::Pending).then(|| self.go(plan, EventKind::Started, Phase::Progressing, 0, Some(t)))
    }

    fn tick(&mut self, plan: &Plan, t: Duration, requests: u64, verdict: Judged) -> Option<Expect> {
        if !matches!(self.phase, Phase::Progressing | Phase::Paused) {
            return None;
        }
        self.requests += requests;
        match verdict {
            Judged::Failing => return Some(self.go(plan, EventKind::RolledBack, Phase::RolledBack, 0, None)),
            Judged::Inconclusive => return None,
            Judged::Healthy => {}
        }
        if self.phase != Phase::Progressing || self.requests < plan.min_requests || t - self.since < plan.step_interval
        {
            return None;
        }
        if self.step + 1 < plan.steps_bp.len() {
            Some(self.go(plan, EventKind::Step, Phase::Progressing, self.step + 1, Some(t)))
        } else if plan.auto_promote {
            Some(self.go(plan, EventKind::Promoted, Phase::Promoted, 0, None))
        } else {
            None
        }
    }

    fn command(&mut self, plan: &Plan, cmd: Command, t: Duration) -> Option<Expect> {
        let step = self.step;
        match (cmd, self.phase) {
            (Command::Promote, Phase::Pending | Phase::Progressing | Phase::Paused) => {
                Some(self.go(plan, EventKind::Promoted, Phase::Promoted, 0, None))
            }
            (Command::Abort, p) if p != Phase::RolledBack => {
                Some(self.go(plan, EventKind::RolledBack, Phase::RolledBack, 0, None))
            }
            (Command::Pause, Phase::Progressing) => Some(self.go(plan, EventKind::Paused, Phase::Paused, step, None)),
            (Command::Resume, Phase::Paused) => {
                Some(self.go(plan, EventKind::Resumed, Phase::Progressing, step, Some(t)))
            }
            (Command::Retry, Phase::RolledBack) => {
                Some(self.go(plan, EventKind::Retried, Phase::Progressing, 0, Some(t)))
            }
            _ => None,
        }
    }
}

fn failing() -> Verdict {
    Verdict::Failing(Breach { rule: RuleKind::ErrorRate, ln_evidence: 9.0, ln_threshold: 6.0 })
}

fn summary(c: &Change) -> Expect {
    (c.kind, c.from, c.to, c.step, c.weight_bp)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// No sequence of ticks, verdicts, commands and restarts on a monotone clock reaches an
    /// illegal state: the weight is always the plan's weight for the phase and step, steps only
    /// advance one at a time on a healthy verdict after their dwell and traffic, `rolled_back`
    /// is left only by `retry`, and `promoted` is reached only at the end of the plan (with
    /// `auto_promote`) or by `promote`. Every transition matches an independent model.
    #[test]
    fn canary_machine_never_reaches_an_illegal_state(plan in canary_plan(), ops in vec(op(), 1..80)) {
        let t0 = Instant::now();
        let mut t = Duration::ZERO;
        let mut m = Machine::new(plan.clone(), t0);
        let mut model = Model { phase: Phase::Pending, step: 0, since: Duration::ZERO, requests: 0 };
        let last = plan.steps_bp.len() - 1;
        for (i, op) in ops.iter().enumerate() {
            let before = (m.phase(), m.step());
            let (got, want) = match *op {
                Op::Start => (m.start(t0 + t).map(|c| summary(&c)), model.start(&plan, t)),
                Op::Tick { after_ms, requests, verdict } => {
                    t += Duration::from_millis(after_ms);
                    let v = match verdict {
                        Judged::Healthy => Verdict::Healthy,
                        Judged::Inconclusive => Verdict::Inconclusive,
                        Judged::Failing => failing(),
                    };
                    (m.observe(t0 + t, requests, &v).map(|c| summary(&c)), model.tick(&plan, t, requests, verdict))
                }
                Op::Cmd(cmd) => {
                    let got = m.command(cmd, t0 + t, None);
                    if let Err(refusal) = &got {
                        prop_assert!(!refusal.0.is_empty(), "op {i}: a refusal says why");
                    }
                    (got.ok().map(|c| summary(&c)), model.command(&plan, cmd, t))
                }
                Op::Restart { after_ms } => {
                    t += Duration::from_millis(after_ms);
                    m = Machine::restore(plan.clone(), m.state().clone(), t0 + t);
                    model.since = t;
                    model.requests = 0;
                    (None, None)
                }
            };
            prop_assert_eq!(got, want, "op {} {:?} from {:?}", i, op, before);

            // The state is legal whatever the op was.
            let phase = m.phase();
            prop_assert!(
                matches!(phase, Phase::Pending | Phase::Progressing | Phase::Paused | Phase::Promoted | Phase::RolledBack),
                "op {i}: a canary plan reached {phase:?}"
            );
            let want_weight = match phase {
                Phase::Progressing | Phase::Paused => plan.steps_bp[m.step().expect("on a step")],
                Phase::Promoted => FULL_BP,
                _ => 0,
            };
            prop_assert_eq!(m.weight_bp(), want_weight, "op {}: weight for {:?} step {:?}", i, phase, m.step());
            prop_assert_eq!(m.step().is_some(), matches!(phase, Phase::Progressing | Phase::Paused));
            prop_assert!(m.step().is_none_or(|s| s <= last));
            if matches!(phase, Phase::Progressing | Phase::Paused) {
                prop_assert_eq!(m.step_since(), t0 + model.since, "op {}: the dwell started when the step did", i);
                prop_assert_eq!(m.step_requests(), model.requests);
            }
            if let Some((kind, from, to, step, weight)) = got {
                prop_assert_eq!((from, to, step, weight), (before.0, phase, m.step(), m.weight_bp()));
                if kind == EventKind::Step {
                    prop_assert_eq!(step, before.1.map(|s| s + 1), "op {}: a step is never skipped", i);
                }
            }
            if before.0 == Phase::RolledBack && phase != Phase::RolledBack {
                prop_assert!(matches!(op, Op::Cmd(Command::Retry)), "op {i}: {op:?} left rolled_back");
            }
            if before.0 != Phase::Promoted && phase == Phase::Promoted {
                let by_plan = matches!(op, Op::Tick { verdict: Judged::Healthy, .. })
                    && before == (Phase::Progressing, Some(last))
                    && plan.auto_promote;
                prop_assert!(by_plan || matches!(op, Op::Cmd(Command::Promote)), "op {i}: {op:?} promoted");
            }
            prop_assert_eq!((m.phase(), m.step()), (model.phase, (matches!(model.phase, Phase::Progressing | Phase::Paused)).then_some(model.step)));
        }
    }
}
