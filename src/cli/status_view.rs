//! How `veer status` draws routes: one block per route with a progress bar for the weight
//! and the plan, per-version figures, the judge's evidence, and the last transition.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use crate::rollout::judge::RuleState;
use crate::status::{RouteStatus, VersionStatus};

const BAR: usize = 30;

/// Request rates from successive polls of the monotone totals (`--watch`).
#[derive(Default)]
pub struct Rates {
    last: HashMap<(String, &'static str), (Instant, u64)>,
}

impl Rates {
    fn rate(&mut self, route: &str, role: &'static str, total: u64, now: Instant) -> Option<f64> {
        let prev = self.last.insert((route.to_string(), role), (now, total));
        let (t, n) = prev?;
        let secs = now.duration_since(t).as_secs_f64();
        (secs > 0.0 && total >= n).then(|| (total - n) as f64 / secs)
    }
}

/// Renders `routes`; with `rates`, adds requests per second since the previous call.
pub fn render(routes: &[RouteStatus], mut rates: Option<&mut Rates>) -> String {
    let now = Instant::now();
    let mut s = String::new();
    for r in routes {
        let step = r.step.map(|i| format!("  step {}/{}", i + 1, r.steps.len())).unwrap_or_default();
        let _ = writeln!(s, "{}  {}{step}", r.name, r.phase.label());
        if r.candidate.is_some() {
            let _ =
                writeln!(s, "  weight    {} {:>6.2}%   plan {}", bar(r.candidate_weight), r.candidate_weight, plan(r));
        }
        let mut line = |role: &'static str, v: &VersionStatus| {
            let w = &v.window;
            let rps = rates.as_deref_mut().and_then(|rt| rt.rate(&r.name, role, w.total_requests, now));
            let rps = rps.map_or(format!("{:>7} req", w.requests), |x| format!("{x:>7.1} req/s"));
            let p99 = w.p99_ms.map_or("-".to_string(), |p| format!("{p:.1}ms"));
            let _ = writeln!(s, "  {role:<9} {:<14} {rps}  {:>6.2}% err  p99 {p99}", v.version, w.error_rate * 100.0);
        };
        line("stable", &r.stable);
        if let Some(c) = &r.candidate {
            line("candidate", c);
        }
        if !r.judge.rules.is_empty() {
            let rules: Vec<String> = r
                .judge
                .rules
                .iter()
                .map(|x| {
                    let mark = match x.state {
                        RuleState::Fired => "!",
                        RuleState::Watching => "?",
                        RuleState::Suppressed => "~",
                        RuleState::Quiet => "",
                    };
                    format!("{}{mark} {:.1}/{:.1}", x.rule.label(), x.ln_evidence, x.ln_threshold)
                })
                .collect();
            let _ = writeln!(s, "  judge     {:<13} ln E/threshold: {}", r.judge.verdict, rules.join("  "));
        }
        if let Some(rb) = &r.rollback {
            let _ = writeln!(s, "  rollback  {} by rule {}", rb.at, rb.rule);
        }
        if let Some(t) = &r.last_transition {
            let _ = writeln!(s, "  last      {} {} -> {}: {}", t.at, t.from.label(), t.to.label(), t.reason);
        }
        s.push('\n');
    }
    s
}

fn bar(percent: f64) -> String {
    let filled = ((percent / 100.0) * BAR as f64).round().clamp(0.0, BAR as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR - filled))
}

fn plan(r: &RouteStatus) -> String {
    let steps: Vec<String> = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, p)| if Some(i) == r.step { format!("[{p}]") } else { p.to_string() })
        .collect();
    steps.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(bar(0.0), format!("[{}]", ".".repeat(BAR)));
        assert_eq!(bar(100.0), format!("[{}]", "#".repeat(BAR)));
        assert_eq!(bar(50.0).matches('#').count(), BAR / 2);
    }
}
