//! How `veer status` draws routes: one block per route with a progress bar for the weight
//! and the plan, per-version figures, the judge's evidence, and the last transition.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use crate::rollout::fleet_status::FleetStatus;
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
            let _ = writeln!(s, "  rollback  {} by rule {}", inert(&rb.at), inert(&rb.rule));
        }
        if let Some(t) = &r.last_transition {
            let _ = writeln!(
                s,
                "  last      {} {} -> {}: {}",
                inert(&t.at),
                t.from.label(),
                t.to.label(),
                inert(&t.reason)
            );
        }
        if let Some(p) = &r.journal_pending {
            let _ = writeln!(
                s,
                "  journal   NOT RECORDED: {} at {} ({} attempts, retrying): {}",
                p.kind.label(),
                inert(&p.at),
                p.attempts,
                inert(&p.error)
            );
        }
        if let Some(f) = &r.fleet {
            fleet(&mut s, f);
        }
        s.push('\n');
    }
    s
}

/// The fleet's part of a route: leader, this replica's standing, the merged windows and one
/// line per member.
fn fleet(s: &mut String, f: &FleetStatus) {
    let link = if f.connected { "" } else { "  ETCD UNREACHABLE: serving the weights last applied" };
    let leader = f.leader.as_deref().map_or("none".to_string(), inert);
    let _ = writeln!(s, "  fleet     node {}  leader {leader}  {}{link}", inert(&f.node), f.standing.label());
    if let Some(why) = &f.reason {
        let _ = writeln!(s, "            {}", inert(why));
    }
    if let Some(rec) = &f.record {
        let step = rec.step.map(|i| format!(" step {}", i + 1)).unwrap_or_default();
        let _ = writeln!(
            s,
            "  record    rev {} epoch {}  {}{step} {:.2}%  {} over {}  written by {}",
            rec.revision,
            rec.epoch,
            rec.phase.label(),
            rec.candidate_weight,
            inert(&rec.candidate_version),
            inert(&rec.stable_version),
            inert(&rec.writer)
        );
    }
    if let Some(m) = &f.merged {
        let _ = writeln!(
            s,
            "  merged    stable {} req {:.2}% err   candidate {} req {:.2}% err   alpha {:.4} merged, {:.5} per replica",
            m.stable.requests,
            m.stable.error_rate * 100.0,
            m.candidate.requests,
            m.candidate.error_rate * 100.0,
            f.alpha.merged,
            f.alpha.local
        );
    }
    for m in &f.members {
        let agrees = if m.agrees { String::new() } else { format!("  (config names {})", inert(&m.candidate_version)) };
        let counts = match (m.candidate, m.stable) {
            (Some(c), Some(st)) => {
                format!("  candidate {} req {} err  stable {} req {} err", c.requests, c.errors, st.requests, st.errors)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "  member    {:<16} {:>6.2}%  {:<9} heard {:>5}ms ago{counts}{agrees}",
            inert(&m.node),
            m.candidate_weight,
            m.standing.label(),
            m.last_heard_ms,
        );
    }
}

/// `text` with every control character (escape sequences, carriage returns, newlines) and
/// bidirectional override shown as a `\u{..}` escape, so an operator-supplied reason cannot
/// drive the terminal or disguise what it says.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
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
    fn a_reason_cannot_drive_the_terminal() {
        assert_eq!(inert("bad\x1b[2J\r\nbuild\u{9b}\u{202e}"), "bad\\u{1b}[2J\\u{d}\\u{a}build\\u{9b}\\u{202e}");
        assert_eq!(inert("plain reason, ünïcode"), "plain reason, ünïcode");
        let mut st: RouteStatus = serde_json::from_value(serde_json::json!({
            "name": "web", "phase": "rolled_back", "step": null, "candidate_weight": 0.0,
            "stable": { "version": "v1", "endpoints": [], "window": crate::stats::window::WindowFigures::default() },
            "candidate": null, "steps": [50.0, 100.0],
            "last_transition": { "at": "2026-12-01T00:00:00Z", "from": "progressing", "to": "rolled_back",
                                 "reason": "x\x1b[2J](http://x)" },
            "rollback": { "at": "2026-12-01T00:00:00Z", "rule": "manual\x1b[31m", "evidence": null },
        }))
        .expect("status JSON");
        let out = render(std::slice::from_ref(&st), None);
        assert!(!out.contains('\x1b'), "{out:?}");
        assert!(out.contains("x\\u{1b}[2J](http://x)"), "{out}");
        st.rollback = None;
        assert!(!render(&[st], None).contains('\x1b'));
    }

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(bar(0.0), format!("[{}]", ".".repeat(BAR)));
        assert_eq!(bar(100.0), format!("[{}]", "#".repeat(BAR)));
        assert_eq!(bar(50.0).matches('#').count(), BAR / 2);
    }
}
