//! Per-route state that outlives a configuration generation.
//!
//! A reload builds a new snapshot, but a route whose candidate version is unchanged must keep
//! its weight and its measurements. These types hold exactly that state; [`crate::snapshot`]
//! looks them up by route name and version when it builds the next generation.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::rollout::RolloutState;
use crate::stats::VersionStats;
use crate::stats::window::{Reading, Window, WindowFigures};
use crate::telemetry::{Telemetry, VersionMetrics};

/// Which side of the split a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The version users get today.
    Stable,
    /// The version being rolled out.
    Candidate,
}

impl Role {
    /// The `role` label / header value.
    pub fn label(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Candidate => "candidate",
        }
    }
}

/// Measurement state of one version of one route.
#[derive(Debug)]
pub struct VersionRuntime {
    /// Stable or candidate.
    pub role: Role,
    /// Version label.
    pub version: String,
    /// Requests assigned by the weighted split: the only ones the judge compares.
    pub stats: VersionStats,
    /// Requests that reached this version for another reason (override header, retry on
    /// stable, a sticky user's extra requests): counted in metrics, never judged.
    pub side: VersionStats,
    /// Outcomes of mirrored copies: the candidate's are judged in a blue-green preview,
    /// stable's (copies of the candidate's requests) while the candidate bakes; both are
    /// compared with the primary answers.
    pub mirror: VersionStats,
    /// Mirrored pairs compared with the primary answer, and how many differed.
    pub mirror_pairs: MirrorPairs,
    metrics: VersionMetrics,
    window: Mutex<Option<Window>>,
    mirror_window: Mutex<Option<Window>>,
    figures: Mutex<WindowFigures>,
}

/// Counts of mirrored answers compared with the primary (stable) answer to the same request.
/// Monotone; mirroring is a small share of traffic, so plain shared atomics are fine here.
#[derive(Debug, Default)]
pub struct MirrorPairs {
    /// Pairs compared.
    pub compared: std::sync::atomic::AtomicU64,
    /// Pairs whose status class (or body digest, with `compare_body`) differed.
    pub mismatched: std::sync::atomic::AtomicU64,
}

/// Which counters a request's outcome goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Randomly assigned by the split: judged.
    Judged,
    /// Forced or re-sent: counted, not judged.
    Side,
    /// A mirrored copy.
    Mirror,
}

impl VersionRuntime {
    /// Fresh state for `version` of `route`.
    pub fn new(telemetry: &Telemetry, route: &str, role: Role, version: &str) -> Self {
        VersionRuntime {
            role,
            version: version.to_string(),
            stats: VersionStats::new(),
            side: VersionStats::new(),
            mirror: VersionStats::new(),
            mirror_pairs: MirrorPairs::default(),
            metrics: telemetry.version(route, role.label(), version),
            window: Mutex::new(None),
            mirror_window: Mutex::new(None),
            figures: Mutex::new(WindowFigures::default()),
        }
    }

    /// The counters of `lane`.
    #[inline]
    pub fn lane(&self, lane: Lane) -> &VersionStats {
        match lane {
            Lane::Judged => &self.stats,
            Lane::Side => &self.side,
            Lane::Mirror => &self.mirror,
        }
    }

    /// Reads the judged counters, advances the window and pushes metric increments.
    pub fn tick(&self, now: Instant, window_len: std::time::Duration) -> Reading {
        let totals = self.stats.totals();
        self.metrics.flush(&totals.clone().plus(&self.side.totals()));
        let reading = advance(&self.window, now, window_len, totals);
        *self.figures.lock().unwrap_or_else(|e| e.into_inner()) = WindowFigures::of(&reading);
        reading
    }

    /// Advances the window of mirrored outcomes.
    pub fn tick_mirror(&self, now: Instant, window_len: std::time::Duration) -> Reading {
        advance(&self.mirror_window, now, window_len, self.mirror.totals())
    }

    /// Pushes metric increments without touching the window (before a scrape).
    pub fn flush_metrics(&self) {
        self.metrics.flush(&self.stats.totals().plus(&self.side.totals()));
    }

    /// The figures of the last tick.
    pub fn figures(&self) -> WindowFigures {
        self.figures.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn advance(
    window: &Mutex<Option<Window>>,
    now: Instant,
    len: std::time::Duration,
    totals: crate::stats::Totals,
) -> Reading {
    let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
    w.get_or_insert_with(|| Window::new(len, now, Default::default())).tick(now, totals)
}

/// The state of a route that survives reloads.
#[derive(Debug)]
pub struct RouteRuntime {
    /// Stable version's measurements.
    pub stable: Arc<VersionRuntime>,
    /// Candidate's rollout and measurements.
    pub candidate: Option<(Arc<RolloutState>, Arc<VersionRuntime>)>,
}
