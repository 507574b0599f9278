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
    /// Hot-path counters.
    pub stats: VersionStats,
    metrics: VersionMetrics,
    window: Mutex<Option<Window>>,
    figures: Mutex<WindowFigures>,
}

impl VersionRuntime {
    /// Fresh state for `version` of `route`.
    pub fn new(telemetry: &Telemetry, route: &str, role: Role, version: &str) -> Self {
        VersionRuntime {
            role,
            version: version.to_string(),
            stats: VersionStats::new(),
            metrics: telemetry.version(route, role.label(), version),
            window: Mutex::new(None),
            figures: Mutex::new(WindowFigures::default()),
        }
    }

    /// Reads the counters, advances the window and pushes metric increments.
    pub fn tick(&self, now: Instant, window_len: std::time::Duration) -> Reading {
        let totals = self.stats.totals();
        self.metrics.flush(&totals);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = w.get_or_insert_with(|| Window::new(window_len, now, Default::default()));
        let reading = w.tick(now, totals);
        *self.figures.lock().unwrap_or_else(|e| e.into_inner()) = WindowFigures::of(&reading);
        reading
    }

    /// Pushes metric increments without touching the window (before a scrape).
    pub fn flush_metrics(&self) {
        self.metrics.flush(&self.stats.totals());
    }

    /// The figures of the last tick.
    pub fn figures(&self) -> WindowFigures {
        self.figures.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The state of a route that survives reloads.
#[derive(Debug)]
pub struct RouteRuntime {
    /// Stable version's measurements.
    pub stable: Arc<VersionRuntime>,
    /// Candidate's rollout and measurements.
    pub candidate: Option<(Arc<RolloutState>, Arc<VersionRuntime>)>,
}
