//! What a decision was based on, as it is journaled, written to the fleet's record, POSTed to
//! webhooks and rendered in the report.
//!
//! Typed, so that everyone who reads it back (status, report, the rollback marker, the
//! recovery of a blue-green bake) reads fields instead of looking up string keys; the JSON is
//! the one journals written before it already hold, and unknown keys are ignored.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::judge::{Baseline, JudgeFigures, RuleKind};
use crate::stats::window::WindowFigures;

/// Why the candidate was rolled back: an operator, or a rule of the judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// `veer abort` (or the admin API's abort).
    Manual,
    /// A judge's rule tripped.
    Rule(RuleKind),
    /// A rule this build does not know (a journal written by a newer veer): kept as written,
    /// so that its rollback still reads back and still holds.
    Other(String),
}

impl Cause {
    /// The `rule` label: the rule's name, or `manual`.
    pub fn label(&self) -> &str {
        match self {
            Cause::Manual => "manual",
            Cause::Rule(r) => r.label(),
            Cause::Other(label) => label,
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl Serialize for Cause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

impl<'de> Deserialize<'de> for Cause {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cause, D::Error> {
        let label = String::deserialize(d)?;
        if label == Cause::Manual.label() {
            return Ok(Cause::Manual);
        }
        Ok(RuleKind::ALL.into_iter().find(|r| r.label() == label).map_or(Cause::Other(label), Cause::Rule))
    }
}

/// Traffic a version's figures came from, when it is not users' own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// Copies of users' requests whose answers were thrown away (preview, bake).
    Mirrored,
}

/// One version's side of the evidence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionEvidence {
    /// Version label.
    pub version: String,
    /// Its rolling window at the decision (`null` when none was at hand).
    #[serde(default)]
    pub window: Option<WindowFigures>,
    /// Set when the figures are of mirrored copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

impl VersionEvidence {
    /// `version`'s figures `window`, of users' traffic.
    pub fn of(version: &str, window: Option<WindowFigures>) -> VersionEvidence {
        VersionEvidence { version: version.to_string(), window, traffic: None }
    }
}

/// Which judge of a fleet decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetDecider {
    /// `local` (the replica's own traffic) or `merged` (the leader's sum of the fleet's).
    pub judge: String,
    /// The replica that decided.
    pub node: String,
    /// The fleet rollout (the record's epoch) it decided about: a replica that braked while
    /// etcd was unreachable and then crashed finds its brake in its journal and still writes
    /// it, unless the fleet has moved on to another epoch meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// The figures behind a transition: a rollback's (rule, judge, both windows) or a blue-green
/// switch's (stable's baseline). Every part is optional because each kind of event carries
/// only some of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// What rolled the candidate back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Cause>,
    /// The judge's figures at the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeFigures>,
    /// Fleet mode: which judge, on which replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetDecider>,
    /// Fleet mode: the replica an operator's abort was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Stable's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<VersionEvidence>,
    /// The candidate's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<VersionEvidence>,
    /// Stable's figures frozen at a blue-green switch (absent when stable had no traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// RFC 3339 time the judge decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<String>,
}

impl Evidence {
    /// The rule label of a rollback with this evidence (`manual` when none is named).
    pub fn rule_label(evidence: Option<&Evidence>) -> &str {
        evidence.and_then(|e| e.rule.as_ref()).map_or("manual", Cause::label)
    }

    /// The window of `role` (`stable` or `candidate`) at the decision.
    pub fn window(&self, candidate: bool) -> Option<&WindowFigures> {
        let side = if candidate { &self.candidate } else { &self.stable };
        side.as_ref().and_then(|v| v.window.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_as_earlier_journals_wrote_it_reads_back_typed() {
        let rollback = r#"{"rule":"error_rate","judge":{"verdict":"failing","alpha":0.01,"rules":[]},
            "fleet":{"judge":"local","node":"n1"},
            "stable":{"version":"v1","window":{"requests":10,"errors":0,"error_rate":0.0,"p50_ms":1.0,"p90_ms":1.0,
              "p99_ms":1.0,"total_requests":10,"total_errors":0}},
            "candidate":{"version":"v2","window":null,"traffic":"mirrored"},"detected_at":"2026-11-01T00:00:00Z"}"#;
        let e: Evidence = serde_json::from_str(rollback).expect("rollback evidence");
        assert_eq!(e.rule, Some(Cause::Rule(RuleKind::ErrorRate)));
        assert_eq!(e.fleet.as_ref().map(|f| f.node.as_str()), Some("n1"));
        assert_eq!(e.window(false).map(|w| w.requests), Some(10));
        assert_eq!(e.candidate.as_ref().and_then(|c| c.traffic), Some(Traffic::Mirrored));
        assert!(e.window(true).is_none());
        let switch: Evidence = serde_json::from_str(r#"{"baseline":null,"stable":{"version":"v1","window":null}}"#)
            .expect("switch evidence");
        assert_eq!((switch.rule, switch.baseline), (None, None));
        let manual: Evidence = serde_json::from_str(r#"{"rule":"manual","node":"n2"}"#).expect("abort");
        assert_eq!(Evidence::rule_label(Some(&manual)), "manual");
        assert_eq!(Evidence::rule_label(None), "manual");
        // And back: the same keys, so webhooks and the admin API see what they saw.
        let again = serde_json::to_value(&e).expect("json");
        assert_eq!(again["rule"], "error_rate");
        assert_eq!(again["candidate"]["traffic"], "mirrored");
        let newer: Evidence = serde_json::from_str(r#"{"rule":"smoke"}"#).expect("a rule of a newer veer");
        assert_eq!(serde_json::to_value(&newer).expect("json")["rule"], "smoke");
    }
}
