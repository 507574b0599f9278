//! The judge's unit tests: each rule on synthetic ticks, the budget, the baseline, the state
//! file's exact bytes.

use super::*;
use crate::split::FULL_BP;
use crate::stats::buckets;
use std::collections::VecDeque;
use std::time::Duration;

fn cfg() -> RollbackConfig {
    RollbackConfig {
        window: Duration::from_secs(30),
        max_error_rate: None,
        max_error_rate_increase: Some(0.01),
        max_p99: None,
        max_p99_ratio: None,
        confidence: 0.99,
        min_effect_ratio: 1.2,
        min_latency_delta: Duration::from_millis(1),
        tick: Duration::from_millis(100),
    }
}

#[test]
fn microsecond_latency_differences_never_roll_back() {
    let mut c = cfg();
    c.max_p99_ratio = Some(1.5);
    c.max_error_rate_increase = None;
    let mut j = Judge::new(&c);
    // 20 µs against 10 µs: twice as slow, consistently, and still nothing worth acting on.
    let mut s = Totals::default();
    s.classes[1] = 100;
    s.latency[buckets::index(10)] = 100;
    let mut k = Totals::default();
    k.classes[1] = 10;
    k.latency[buckets::index(20)] = 10;
    let mut last = Verdict::Healthy;
    for _ in 0..50 {
        last = j.evaluate(&obs(&s, &k, &s, &k));
    }
    assert!(j.figures().rules[0].ln_evidence > j.ln_threshold(), "the evidence is there");
    assert_eq!(j.figures().rules[0].state, RuleState::Suppressed);
    assert_eq!(last, Verdict::Healthy);
}

fn totals(n: u64, faults: u64, latency_ms: u64) -> Totals {
    let mut t = Totals::default();
    t.classes[1] = n;
    t.faults = faults;
    t.latency[buckets::index(latency_ms * 1000)] = n;
    t
}

fn obs<'a>(s: &'a Totals, c: &'a Totals, sw: &'a Totals, cw: &'a Totals) -> Observation<'a> {
    Observation {
        stable_tick: s,
        candidate_tick: c,
        stable_window: sw,
        candidate_window: cw,
        weight_bp: 100,
        mirror_compared: 0,
        mirror_mismatched: 0,
        stable_mirrored: false,
    }
}

#[test]
fn mixture_is_zero_without_bad_events_and_grows_with_candidate_only_errors() {
    let mut m = Mixture::default();
    m.two_sample(10, 990, 0, 0);
    assert_eq!(m.ln_evidence(), 0.0);
    m.two_sample(1, 99, 1, 0);
    assert!(m.ln_evidence() > 2.0, "{}", m.ln_evidence());
    let mut shared = Mixture::default();
    // Errors in exact proportion to traffic are evidence for nothing.
    shared.two_sample(10, 90, 1, 9);
    assert!(shared.ln_evidence() < 0.0);
}

#[test]
fn a_fully_failing_candidate_is_caught_within_five_requests() {
    let mut j = Judge::new(&cfg());
    let (mut cw, mut sw) = (Totals::default(), Totals::default());
    for i in 1..=5u64 {
        // One candidate request per tick, failing; 99 stable requests with one error.
        let (s, c) = (totals(99, 1, 5), totals(1, 1, 5));
        sw = add(&sw, &s);
        cw = add(&cw, &c);
        if let Verdict::Failing(f) = j.evaluate(&obs(&s, &c, &sw, &cw)) {
            assert_eq!(f.rule, RuleKind::ErrorRate);
            assert!(i >= 3, "the 3-error gate holds until the third error");
            return;
        }
    }
    panic!("not caught in 5 candidate requests: {:?}", j.figures());
}

#[test]
fn a_shared_outage_is_no_evidence() {
    let mut c = cfg();
    c.max_error_rate = Some(0.05);
    let mut j = Judge::new(&c);
    let (s, k) = (totals(900, 270, 5), totals(100, 30, 5));
    for _ in 0..200 {
        assert_ne!(j.evaluate(&obs(&s, &k, &s, &k)).label(), "failing");
    }
    assert!(j.state().errors.ln_evidence() < 0.0);
    let guard = j.figures().rules.iter().find(|r| r.rule == RuleKind::MaxErrorRate).expect("guard armed");
    assert!(guard.ln_evidence > guard.ln_threshold, "the absolute test alone would fire");
    assert_eq!(guard.state, RuleState::Suppressed);
}

/// A tick at 100% weight: candidate traffic `k`, no stable traffic.
fn at_full_weight<'a>(empty: &'a Totals, k: &'a Totals) -> Observation<'a> {
    Observation {
        stable_tick: empty,
        candidate_tick: k,
        stable_window: empty,
        candidate_window: k,
        weight_bp: FULL_BP,
        mirror_compared: 0,
        mirror_mismatched: 0,
        stable_mirrored: false,
    }
}

#[test]
fn comparative_rules_rest_at_full_weight() {
    let mut j = Judge::new(&cfg());
    j.state.errors.ell = [20.0; 8];
    let empty = Totals::default();
    let k = totals(100, 10, 5);
    let o = at_full_weight(&empty, &k);
    assert_eq!(j.evaluate(&o), Verdict::Healthy, "frozen evidence neither fires nor holds at 100%");
    assert_eq!(j.figures().rules[0].state, RuleState::Quiet);
}

#[test]
fn guards_run_alone_at_full_weight() {
    let mut c = cfg();
    c.max_error_rate = Some(0.05);
    c.max_error_rate_increase = None;
    let mut j = Judge::new(&c);
    let empty = Totals::default();
    let k = totals(100, 30, 5);
    let o = at_full_weight(&empty, &k);
    assert!(matches!(j.evaluate(&o), Verdict::Failing(Breach { rule: RuleKind::MaxErrorRate, .. })));
}

#[test]
fn small_effects_are_suppressed_not_held() {
    let mut c = cfg();
    c.min_effect_ratio = 1.5;
    let mut j = Judge::new(&c);
    // Candidate 1.3x stable: real, detectable, but below what the operator cares about.
    let (s, k) = (totals(10_000, 1000, 5), totals(10_000, 1300, 5));
    let mut last = Verdict::Healthy;
    for _ in 0..500 {
        last = j.evaluate(&obs(&s, &k, &s, &k));
    }
    assert!(j.state().errors.ln_evidence() > j.ln_threshold());
    assert_eq!(last, Verdict::Healthy);
    assert_eq!(j.figures().rules[0].state, RuleState::Suppressed);
}

#[test]
fn latency_rule_uses_the_previous_window_and_catches_a_slow_candidate() {
    let mut c = cfg();
    c.max_p99_ratio = Some(1.5);
    let mut j = Judge::new(&c);
    let (s, k) = (totals(100, 0, 10), totals(10, 0, 210));
    // First tick: no τ yet, no latency evidence.
    j.evaluate(&obs(&s, &k, &s, &k));
    assert_eq!(j.state().latency[0].ln_evidence(), 0.0);
    let mut verdict = Verdict::Healthy;
    for _ in 0..5 {
        verdict = j.evaluate(&obs(&s, &k, &s, &k));
    }
    assert!(matches!(verdict, Verdict::Failing(Breach { rule: RuleKind::Latency, .. })), "{:?}", j.figures());
}

#[test]
fn low_traffic_ticks_are_batched_so_a_failing_candidate_is_still_caught() {
    // One request per tick, as at 10 requests per second: a candidate tick has no stable
    // request to compare with, so only batching across ticks can weigh it.
    let mut j = Judge::new(&cfg());
    let (mut cw, mut sw) = (Totals::default(), Totals::default());
    let (none, s1, c1) = (Totals::default(), totals(1, 0, 5), totals(1, 1, 5));
    for i in 0..400u64 {
        let candidate_tick = i % 20 == 0;
        let (s, c) = if candidate_tick { (&none, &c1) } else { (&s1, &none) };
        sw = add(&sw, s);
        cw = add(&cw, c);
        if let Verdict::Failing(_) = j.evaluate(&obs(s, c, &sw, &cw)) {
            assert!(cw.requests() <= 6, "caught after {} candidate requests", cw.requests());
            return;
        }
    }
    panic!("never caught: {:?}", j.figures());
}

#[test]
fn budget_is_split_among_armed_rules() {
    let mut c = cfg();
    assert!((Judge::new(&c).ln_threshold() - 100f64.ln()).abs() < 1e-9);
    c.max_p99_ratio = Some(1.5);
    c.max_error_rate = Some(0.1);
    assert!((Judge::new(&c).ln_threshold() - 300f64.ln()).abs() < 1e-9);
    let j = Judge::new(&c).with_mirror_limit(Some(0.01));
    assert!((j.ln_threshold() - 400f64.ln()).abs() < 1e-9, "mirror_mismatch takes its share");
    assert!((Judge::new(&c).with_mirror_limit(None).ln_threshold() - 300f64.ln()).abs() < 1e-9);
}

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Binomial, Distribution, LogNormal};

/// `n` requests of a version failing at rate `p` with lognormal latency (median
/// `median_ms`, σ = 0.5).
fn draw(rng: &mut StdRng, n: u64, p: f64, median_ms: f64) -> Totals {
    let mut t = Totals::default();
    let faults = Binomial::new(n, p).expect("binomial").sample(rng);
    (t.classes[1], t.classes[4], t.faults) = (n - faults, faults, faults);
    let lat = LogNormal::new(median_ms.ln(), 0.5).expect("lognormal");
    for _ in 0..n {
        let ms: f64 = lat.sample(rng);
        t.latency[buckets::index((ms * 1000.0) as u64)] += 1;
    }
    t
}

fn bake_cfg() -> RollbackConfig {
    RollbackConfig { max_p99_ratio: Some(1.5), max_error_rate: Some(0.05), ..cfg() }
}

/// A judge baking against a baseline of 10,000 stable requests at 1% errors and a 20 ms
/// median, fed `ticks` ticks of 50 candidate requests at `p` errors and `median_ms`;
/// returns the first failing verdict and the tick it came in.
fn bake(seed: u64, p: f64, median_ms: f64, ticks: usize) -> (Judge, Option<(usize, Breach)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut j = Judge::new(&bake_cfg());
    let baseline = Baseline::of(&draw(&mut rng, 10_000, 0.01, 20.0)).expect("a baseline");
    j.set_baseline(Some(baseline));
    let empty = Totals::default();
    let mut window: std::collections::VecDeque<Totals> = Default::default();
    for i in 0..ticks {
        let tick = draw(&mut rng, 50, p, median_ms);
        window.push_back(tick.clone());
        if window.len() > 300 {
            window.pop_front();
        }
        let cw = window.iter().fold(Totals::default(), |a, t| add(&a, t));
        let o = Observation {
            stable_tick: &empty,
            candidate_tick: &tick,
            stable_window: &empty,
            candidate_window: &cw,
            weight_bp: FULL_BP,
            mirror_compared: 0,
            mirror_mismatched: 0,
            stable_mirrored: false,
        };
        if let Verdict::Failing(f) = j.evaluate(&o) {
            return (j, Some((i, f)));
        }
    }
    (j, None)
}

#[test]
fn a_baking_candidate_like_the_baseline_stays_quiet() {
    // 100,000 candidate requests per seed, each seed with its own baseline estimate.
    for seed in 1..=5 {
        let (j, failed) = bake(seed, 0.01, 20.0, 2000);
        assert_eq!(failed, None, "seed {seed}: {:?}", j.figures());
        for rule in [RuleKind::ErrorRate, RuleKind::Latency] {
            let f = j.figures().rules.iter().find(|r| r.rule == rule).expect("armed");
            assert!(f.ln_evidence < f.ln_threshold / 2.0, "seed {seed}, {rule}: {f:?}");
            assert_eq!(f.state, RuleState::Quiet, "seed {seed}: {f:?}");
            assert_eq!(f.stable_requests, 10_000, "read against the baseline");
        }
        let err = j.figures().rules.iter().find(|r| r.rule == RuleKind::ErrorRate).expect("armed");
        assert!((err.stable - j.baseline().expect("kept").error_rate()).abs() < 1e-12);
    }
}

#[test]
fn a_baking_candidate_clearly_worse_than_the_baseline_fires() {
    let (j, failed) = bake(11, 0.10, 20.0, 200);
    let (tick, f) = failed.unwrap_or_else(|| panic!("10% errors against 1% never fired: {:?}", j.figures()));
    assert_eq!(f.rule, RuleKind::ErrorRate, "{:?}", j.figures());
    assert!(tick < 10, "fired only at tick {tick}");
    let (j, failed) = bake(13, 0.01, 40.0, 200);
    let (tick, f) = failed.unwrap_or_else(|| panic!("2x slower never fired: {:?}", j.figures()));
    assert_eq!(f.rule, RuleKind::Latency, "{:?}", j.figures());
    assert!(tick < 10, "fired only at tick {tick}");
}

/// A judge baking after a switch at which the environment changed: the baseline is stable
/// before it (1% errors, 20 ms median), and from then on both versions fail more and answer
/// slower. `ticks` ticks of 50 candidate requests at `candidate` (error rate, median ms) and
/// 5 stable answers to mirrored copies (a 10% share) at `stable`; `None` for `stable` feeds
/// no copies, so the judge holds the candidate to the baseline. The first failing tick.
fn shifted_bake(
    seed: u64,
    candidate: (f64, f64),
    stable: Option<(f64, f64)>,
    ticks: usize,
) -> (Judge, Option<(usize, Breach)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut j = Judge::new(&bake_cfg());
    j.set_baseline(Baseline::of(&draw(&mut rng, 10_000, 0.01, 20.0)));
    let (mut cwin, mut swin) = (VecDeque::new(), VecDeque::new());
    let (mut cw, mut sw) = (Totals::default(), Totals::default());
    for i in 0..ticks {
        let tick = draw(&mut rng, 50, candidate.0, candidate.1);
        let copies = stable.map_or_else(Totals::default, |(p, ms)| draw(&mut rng, 5, p, ms));
        for (w, sum, t) in [(&mut cwin, &mut cw, &tick), (&mut swin, &mut sw, &copies)] {
            // A 30 s window of 100 ms ticks, kept as a running sum.
            *sum = add(sum, t);
            w.push_back(t.clone());
            if w.len() > 300
                && let Some(old) = w.pop_front()
            {
                *sum = sub(sum, &old);
            }
        }
        let o = Observation {
            stable_tick: &copies,
            candidate_tick: &tick,
            stable_window: &sw,
            candidate_window: &cw,
            weight_bp: FULL_BP,
            mirror_compared: 0,
            mirror_mismatched: 0,
            stable_mirrored: sw.requests() > 0,
        };
        if let Verdict::Failing(f) = j.evaluate(&o) {
            return (j, Some((i, f)));
        }
    }
    (j, None)
}

#[test]
fn a_bake_judged_against_stable_s_concurrent_answers_is_immune_to_a_shared_shift() {
    // After the switch both versions fail 3% and answer 1.6 times slower.
    let shifted = (0.03, 32.0);
    for seed in 1..=5 {
        let (j, failed) = shifted_bake(seed, shifted, None, 300);
        assert!(failed.is_some(), "seed {seed}: the frozen baseline blames the candidate: {:?}", j.figures());
        let (j, failed) = shifted_bake(seed, shifted, Some(shifted), 2000);
        assert_eq!(failed, None, "seed {seed}: {:?}", j.figures());
        for rule in [RuleKind::ErrorRate, RuleKind::Latency] {
            let f = j.figures().rules.iter().find(|r| r.rule == rule).expect("armed");
            assert_ne!(f.state, RuleState::Fired, "seed {seed}: {f:?}");
            assert!(f.stable_requests > 0 && f.stable_requests < 10_000, "the copies, not the baseline: {f:?}");
        }
    }
}

#[test]
fn a_bake_against_stable_s_concurrent_answers_still_catches_a_worse_candidate() {
    // In the shifted environment the candidate fails 10% against stable's 3%...
    let (j, failed) = shifted_bake(21, (0.10, 32.0), Some((0.03, 32.0)), 600);
    let (_, f) = failed.unwrap_or_else(|| panic!("10% against 3% never fired: {:?}", j.figures()));
    assert_eq!(f.rule, RuleKind::ErrorRate, "{:?}", j.figures());
    // ... or answers twice as slowly.
    let (j, failed) = shifted_bake(23, (0.03, 64.0), Some((0.03, 32.0)), 600);
    let (_, f) = failed.unwrap_or_else(|| panic!("2x slower never fired: {:?}", j.figures()));
    assert_eq!(f.rule, RuleKind::Latency, "{:?}", j.figures());
}

#[test]
fn a_small_regression_against_the_baseline_is_suppressed_by_the_gates() {
    // 1.5% against 1%: over the ratio gate but under the 0.01 increase gate.
    let (j, failed) = bake(17, 0.015, 20.0, 1500);
    assert_eq!(failed, None, "{:?}", j.figures());
    let err = j.figures().rules.iter().find(|r| r.rule == RuleKind::ErrorRate).expect("armed");
    assert_ne!(err.state, RuleState::Fired);
}

#[test]
fn baseline_reads_a_short_or_clean_window_conservatively() {
    let b = Baseline { requests: 99, errors: 0, quantiles_us: [1, 2, 3] };
    assert!((b.error_rate() - 0.01).abs() < 1e-12, "no error in 99 counts as one in 100");
    let b = Baseline { requests: 1_000_000, errors: 0, quantiles_us: [1, 2, 3] };
    assert_eq!(b.error_rate(), MIN_BASELINE_ERROR_RATE);
    assert_eq!(Baseline::of(&Totals::default()), None, "no stable traffic, no baseline");
    let b = Baseline::of(&totals(200, 2, 10)).expect("baseline");
    assert_eq!((b.requests, b.errors), (200, 2));
    assert!(b.quantiles_us.iter().all(|&q| q > 9000 && q < 11_000), "{b:?}");
}

/// The exact bytes a state file and the journal hold for the judge: a change here breaks
/// every recorded rollout.
#[test]
fn judge_state_and_breach_serialise_byte_for_byte_as_recorded() {
    let m = |v: f64| Mixture { ell: [v; 8] };
    let state = JudgeState {
        errors: m(1.0),
        latency: [m(2.0), m(3.0), m(4.0)],
        error_guard: m(5.0),
        p99_guard: m(6.0),
        p99_compare: m(7.0),
        mismatch: m(-0.5),
        baseline: Some(Baseline { requests: 500, errors: 5, quantiles_us: [10_000, 20_000, 90_000] }),
    };
    let ell = |v: &str| format!("{{\"ell\":[{}]}}", [v; 8].join(","));
    let expected = format!(
        "{{\"errors\":{},\"latency\":[{},{},{}],\"error_guard\":{},\"p99_guard\":{},\"p99_compare\":{},\
         \"mismatch\":{},\"baseline\":{{\"requests\":500,\"errors\":5,\"quantiles_us\":[10000,20000,90000]}}}}",
        ell("1.0"),
        ell("2.0"),
        ell("3.0"),
        ell("4.0"),
        ell("5.0"),
        ell("6.0"),
        ell("7.0"),
        ell("-0.5"),
    );
    assert_eq!(serde_json::to_string(&state).expect("serialise"), expected);
    assert_eq!(serde_json::from_str::<JudgeState>(&expected).expect("load"), state);
    let fresh = serde_json::to_string(&JudgeState::default()).expect("serialise");
    assert!(!fresh.contains("baseline"), "no baseline, no key: {fresh}");
    let breach = Breach { rule: RuleKind::MaxP99, ln_evidence: 9.5, ln_threshold: 6.25 };
    let json = r#"{"rule":"max_p99","ln_evidence":9.5,"ln_threshold":6.25}"#;
    assert_eq!(serde_json::to_string(&breach).expect("serialise"), json);
    assert_eq!(serde_json::from_str::<Breach>(json).expect("load"), breach);
    let figures = JudgeFigures {
        verdict: "inconclusive".into(),
        alpha: 0.01,
        rules: vec![RuleFigures {
            rule: RuleKind::MirrorMismatch,
            state: RuleState::Watching,
            ln_evidence: 5.0,
            ln_threshold: 6.0,
            candidate: 0.25,
            stable: 0.01,
            candidate_requests: 8,
            stable_requests: 8,
            note: Some("why".into()),
        }],
    };
    assert_eq!(
        serde_json::to_string(&figures).expect("serialise"),
        r#"{"verdict":"inconclusive","alpha":0.01,"rules":[{"rule":"mirror_mismatch","state":"watching","ln_evidence":5.0,"ln_threshold":6.0,"candidate":0.25,"stable":0.01,"candidate_requests":8,"stable_requests":8,"note":"why"}]}"#
    );
}

#[test]
fn judge_state_keeps_the_baseline_and_old_state_files_still_load() {
    let state = JudgeState {
        baseline: Some(Baseline { requests: 500, errors: 5, quantiles_us: [10_000, 20_000, 90_000] }),
        mismatch: Mixture { ell: [1.0; 8] },
        ..JudgeState::default()
    };
    let json = serde_json::to_value(&state).expect("serialise");
    assert_eq!(serde_json::from_value::<JudgeState>(json.clone()).expect("load"), state);
    let mut old = json;
    let map = old.as_object_mut().expect("object");
    map.remove("baseline");
    map.remove("mismatch");
    let loaded: JudgeState = serde_json::from_value(old).expect("a state file from before blue-green loads");
    assert_eq!((loaded.baseline, loaded.mismatch), (None, Mixture::default()));
}

/// A judge with only the mismatch rule armed, fed `ticks` ticks of `compared` pairs with
/// `mismatched(i)` mismatches; the first failing tick.
fn mirror_run(ticks: u64, compared: u64, mismatched: impl Fn(u64) -> u64) -> (Judge, Option<(u64, Breach)>) {
    let c = RollbackConfig { max_error_rate_increase: None, ..cfg() };
    let mut j = Judge::new(&c).with_mirror_limit(Some(0.01));
    let (s, k) = (totals(100, 0, 5), totals(10, 0, 5));
    for i in 0..ticks {
        let o = Observation { mirror_compared: compared, mirror_mismatched: mismatched(i), ..obs(&s, &k, &s, &k) };
        if let Verdict::Failing(f) = j.evaluate(&o) {
            return (j, Some((i, f)));
        }
    }
    (j, None)
}

#[test]
fn the_mismatch_rule_fires_on_a_high_mismatch_rate_only() {
    // 20% of mirrored answers differ against a 1% limit.
    let (j, failed) = mirror_run(100, 20, |_| 4);
    let (tick, f) = failed.unwrap_or_else(|| panic!("never fired: {:?}", j.figures()));
    assert_eq!(f.rule, RuleKind::MirrorMismatch);
    assert!(tick < 5, "fired only at tick {tick}");
    let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
    assert!((rule.candidate - 0.2).abs() < 1e-9 && rule.stable == 0.01, "{rule:?}");
    // 0.5%: one mismatch in every 200 pairs, for 40,000 pairs.
    let (j, failed) = mirror_run(2000, 20, |i| u64::from(i % 10 == 0));
    assert_eq!(failed, None, "{:?}", j.figures());
    let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
    assert_eq!(rule.state, RuleState::Quiet, "{rule:?}");
    // Without the limit the rule is not armed at all.
    let mut plain = Judge::new(&cfg());
    let (s, k) = (totals(100, 0, 5), totals(10, 0, 5));
    plain.evaluate(&Observation { mirror_compared: 20, mirror_mismatched: 20, ..obs(&s, &k, &s, &k) });
    assert!(plain.figures().rules.iter().all(|r| r.rule != RuleKind::MirrorMismatch));
}

#[test]
fn the_mismatch_rule_holds_with_fewer_than_three_mismatches() {
    // Two mismatches in two pairs: strong evidence, too few events to act on.
    let (j, failed) = mirror_run(1, 2, |_| 2);
    assert_eq!(failed, None);
    let rule = j.figures().rules.iter().find(|r| r.rule == RuleKind::MirrorMismatch).expect("armed");
    assert!(rule.ln_evidence > rule.ln_threshold, "{rule:?}");
    assert_eq!(rule.state, RuleState::Watching);
    assert_eq!(j.figures().verdict, "inconclusive");
}

fn sub(a: &Totals, b: &Totals) -> Totals {
    let mut t = a.clone();
    for i in 0..6 {
        t.classes[i] -= b.classes[i];
    }
    t.faults -= b.faults;
    for (x, y) in t.latency.iter_mut().zip(&b.latency) {
        *x -= y;
    }
    t
}

fn add(a: &Totals, b: &Totals) -> Totals {
    let mut t = a.clone();
    for i in 0..6 {
        t.classes[i] += b.classes[i];
    }
    t.faults += b.faults;
    for (x, y) in t.latency.iter_mut().zip(&b.latency) {
        *x += y;
    }
    t
}

#[test]
fn the_rules_are_listed_in_report_order_and_judged_exactly_when_armed() {
    assert_eq!(rules::RULES.map(|r| r.kind()), RuleKind::ALL);
    let (s, k) = (totals(100, 1, 5), totals(10, 1, 5));
    for bits in 0..32u32 {
        let on = |i: u32| bits & (1 << i) != 0;
        let c = RollbackConfig {
            max_error_rate_increase: on(0).then_some(0.01),
            max_p99_ratio: on(1).then_some(1.5),
            max_error_rate: on(2).then_some(0.05),
            max_p99: on(3).then_some(Duration::from_millis(50)),
            ..cfg()
        };
        let mut j = Judge::new(&c).with_mirror_limit(on(4).then_some(0.01));
        j.evaluate(&obs(&s, &k, &s, &k));
        let judged: Vec<RuleKind> = j.figures().rules.iter().map(|r| r.rule).collect();
        let armed: Vec<RuleKind> = rules::RULES.iter().filter(|r| r.armed(&j.settings)).map(|r| r.kind()).collect();
        assert_eq!(judged, armed, "config {bits:05b}");
        let k_armed = (bits.count_ones() as f64).max(1.0);
        assert!((j.ln_threshold() - (k_armed / 0.01).ln()).abs() < 1e-9, "config {bits:05b}");
    }
}

#[test]
fn a_fleet_s_judges_share_one_false_rollback_budget() {
    for n in [1usize, 3, 10, 100] {
        let c = FleetConfidence::split(0.99, n);
        let total = (1.0 - c.merged) + n as f64 * (1.0 - c.local);
        assert!((total - 0.01).abs() < 1e-12, "n = {n}: the judges spend {total}, not α = 0.01");
    }
    assert_eq!(FleetConfidence::split(0.99, 0), FleetConfidence::split(0.99, 1));
}
