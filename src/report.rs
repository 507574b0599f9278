//! `veer report`: a rollout's story in the shape incident reviews use.
//!
//! Built from the journal (the timeline, the evidence recorded at the moment of the decision)
//! and the route's current status, so it can be produced long after the fact and says the
//! same thing the on-call engineer would have seen.

use std::fmt::Write as _;

use crate::journal::Event;
use crate::rollout::Phase;
use crate::rollout::evidence::{Cause, Evidence};
use crate::rollout::machine::EventKind;
use crate::stats::window::WindowFigures;
use crate::status::RouteStatus;

/// The Markdown report of `status`'s route from its journal `events` (oldest first).
pub fn render(status: &RouteStatus, events: &[Event]) -> String {
    let mut s = String::new();
    let candidate = status.candidate.as_ref().map_or("(none)", |c| c.version.as_str());
    let _ = writeln!(s, "# Rollout report: {}\n", status.name);
    // The current rollout is everything since the newest `started` of this candidate.
    let start =
        events.iter().rposition(|e| e.kind == EventKind::Started && e.candidate_version == candidate).unwrap_or(0);
    let events = &events[start..];
    let rollback = events.iter().rev().find(|e| e.kind == EventKind::RolledBack);

    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| Route | `{}` |", status.name);
    let _ = writeln!(s, "| Stable | `{}` |", status.stable.version);
    let _ = writeln!(s, "| Candidate | `{candidate}` |");
    let _ = writeln!(s, "| Outcome | {} |", outcome(status.phase));
    let _ = writeln!(s, "| Candidate weight now | {}% |", status.candidate_weight);
    if let Some(first) = events.first() {
        let _ = writeln!(s, "| Rollout started | {} |", first.at);
    }
    if let Some(last) = events.last() {
        let _ = writeln!(s, "| Last transition | {} ({}) |", last.at, last.kind.label());
    }
    s.push('\n');

    match rollback {
        Some(rb) => incident(&mut s, rb, candidate),
        None => {
            let _ = writeln!(
                s,
                "## Summary\n\nNo rollback in this rollout. The candidate is **{}**.\n",
                status.phase.label()
            );
        }
    }
    impact(&mut s, status, rollback);
    timeline(&mut s, events);
    s
}

/// `text` as literal Markdown: every ASCII punctuation character backslash-escaped (so no
/// link, emphasis, table cell or HTML can be injected by an operator's `--reason`), line breaks
/// as spaces, other control characters dropped.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') => {}
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn outcome(p: Phase) -> &'static str {
    match p {
        Phase::RolledBack => "**rolled back** to 100% stable",
        Phase::Promoted => "**promoted**: the candidate serves everything",
        Phase::Stable => "no candidate",
        Phase::Paused => "paused by an operator",
        _ => "in progress",
    }
}

fn incident(s: &mut String, rb: &Event, candidate: &str) {
    let none = Evidence::default();
    let ev = rb.evidence.as_ref().unwrap_or(&none);
    let rule = Evidence::rule_label(Some(ev));
    let automatic = ev.rule.as_ref().is_some_and(|c| *c != Cause::Manual);
    let _ = writeln!(s, "## Incident\n");
    if automatic {
        let _ = writeln!(
            s,
            "At {} veer rolled candidate `{candidate}` back to 0% because rule `{rule}` tripped: the candidate was worse than stable with the configured confidence.\n",
            rb.at
        );
    } else {
        let _ =
            writeln!(s, "At {} an operator aborted candidate `{candidate}` (reason: {}).\n", rb.at, inert(&rb.reason));
    }

    let _ = writeln!(s, "## Root-cause signal\n");
    if let Some(judge) = &ev.judge {
        let _ = writeln!(
            s,
            "| rule | state | evidence ln E | threshold | candidate | stable / limit |\n|---|---|---|---|---|---|"
        );
        for r in &judge.rules {
            let _ = writeln!(
                s,
                "| `{}` | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
                r.rule.label(),
                r.state.label(),
                r.ln_evidence,
                r.ln_threshold,
                r.candidate,
                r.stable
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "Both versions over the rolling window at the decision:\n");
    let _ = writeln!(s, "| version | requests | errors | error rate | p50 ms | p99 ms |\n|---|---|---|---|---|---|");
    for (role, side) in [("stable", &ev.stable), ("candidate", &ev.candidate)] {
        let w = side.as_ref().and_then(|v| v.window.as_ref());
        let int = |f: fn(&WindowFigures) -> u64| w.map_or("-".into(), |w| f(w).to_string());
        let num = |f: fn(&WindowFigures) -> Option<f64>, scale: f64| {
            w.and_then(f).map_or("-".into(), |x| format!("{:.2}", x * scale))
        };
        let version = side.as_ref().map_or(role, |v| v.version.as_str());
        let _ = writeln!(
            s,
            "| {role} `{version}` | {} | {} | {}% | {} | {} |",
            int(|w| w.requests),
            int(|w| w.errors),
            num(|w| Some(w.error_rate), 100.0),
            num(|w| w.p50_ms, 1.0),
            num(|w| w.p99_ms, 1.0)
        );
    }
    s.push('\n');

    let _ = writeln!(s, "## Resolution\n");
    let detected = ev.detected_at.as_deref();
    let delay = detected.and_then(|d| {
        Some(humantime::parse_rfc3339(&rb.at).ok()?.duration_since(humantime::parse_rfc3339(d).ok()?).ok()?.as_millis())
    });
    match (automatic, detected, delay) {
        (true, Some(d), Some(ms)) => {
            let _ = writeln!(
                s,
                "Automatic rollback at {}, {ms} ms after the failing tick ({d}). The candidate has received no ordinary traffic since; it stays at 0% until `veer retry` or a new candidate version.\n",
                rb.at
            );
        }
        (true, _, _) => {
            let _ = writeln!(s, "Automatic rollback at {}.\n", rb.at);
        }
        (false, _, _) => {
            let _ = writeln!(
                s,
                "Manual abort at {}. The candidate stays at 0% until `veer retry` or a new candidate version.\n",
                rb.at
            );
        }
    }
}

fn impact(s: &mut String, status: &RouteStatus, rollback: Option<&Event>) {
    let _ = writeln!(s, "## Impact\n");
    let figures = |candidate: bool| rollback.and_then(|rb| rb.evidence.as_ref()?.window(candidate));
    let cand = figures(true).or_else(|| status.candidate.as_ref().map(|c| &c.window));
    let stable = figures(false).unwrap_or(&status.stable.window);
    let Some(cand) = cand else {
        let _ = writeln!(s, "No candidate traffic.\n");
        return;
    };
    let (n, e) = (cand.total_requests as f64, cand.total_errors as f64);
    let stable_rate = stable.error_rate;
    let excess = (e - n * stable_rate).max(0.0);
    let _ = writeln!(s, "- Candidate requests served during the rollout: **{n}**, of which **{e}** failed.");
    let _ = writeln!(s, "- Stable's error rate over the same window: {:.3}%.", stable_rate * 100.0);
    let _ = writeln!(s, "- Excess errors over what stable would have served: **{excess:.0}**.\n");
}

fn timeline(s: &mut String, events: &[Event]) {
    let _ = writeln!(s, "## Timeline\n");
    if events.is_empty() {
        let _ = writeln!(s, "No transitions recorded.");
        return;
    }
    let _ = writeln!(s, "| time | event | phase | candidate weight | reason |\n|---|---|---|---|---|");
    for e in events {
        let _ = writeln!(
            s,
            "| {} | {} | {} → {} | {}% | {} |",
            e.at,
            e.kind.label(),
            e.from.label(),
            e.to.label(),
            e.candidate_weight,
            inert(&e.reason)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_cannot_inject_markdown_or_escape_sequences() {
        let hostile = "oops\x1b[2J](http://x) <b>*x*</b> | cell\nnext";
        let got = inert(hostile);
        assert_eq!(got, "oops\\[2J\\]\\(http\\:\\/\\/x\\) \\<b\\>\\*x\\*\\<\\/b\\> \\| cell next");
        assert!(!got.contains('\x1b') && !got.contains("](") && !got.contains('\n'));
        assert_eq!(inert("plain words"), "plain words");
    }

    #[test]
    fn the_report_escapes_journal_reasons() {
        let status: RouteStatus = serde_json::from_value(serde_json::json!({
            "name": "web", "phase": "rolled_back", "step": null, "candidate_weight": 0.0,
            "stable": { "version": "v1", "endpoints": [], "window": crate::stats::window::WindowFigures::default() },
            "candidate": null, "steps": [50.0, 100.0], "last_transition": null,
        }))
        .expect("status JSON");
        let event = |kind: &str, to: &str| -> Event {
            serde_json::from_value(serde_json::json!({
                "at": "2026-12-01T00:00:00.000Z", "route": "web", "kind": kind, "from": "progressing", "to": to,
                "candidate_weight": 0.0, "reason": "bad\x1b[2J](http://x)", "evidence": { "rule": "manual" },
                "step": null, "candidate_version": "(none)", "stable_version": "v1",
            }))
            .expect("event JSON")
        };
        let out = render(&status, &[event("started", "progressing"), event("rolled_back", "rolled_back")]);
        assert!(!out.contains('\x1b'), "{out:?}");
        assert!(!out.contains("](http"), "{out}");
        assert!(out.contains("reason: bad\\[2J\\]\\(http\\:\\/\\/x\\)"), "{out}");
    }
}
