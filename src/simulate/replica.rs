//! One simulated proxy: the split over the requests it receives, what its versions answered,
//! and the windows a judge reads from those counters.
//!
//! The single-proxy simulation has one [`Replica`] whose judge drives the machine; a fleet
//! ([`super::fleet`]) has one per replica, each with its local judge, and a leader that judges
//! the sums of their published counters through a [`Sides`] of its own.

use std::time::{Duration, Instant};

use rand::Rng;

use super::{Arm, Moment, Traffic};
use crate::config::{RouteConfig, Strategy};
use crate::rollout::Phase;
use crate::rollout::judge::{Baseline, Judge, Observation, Verdict};
use crate::split::{FULL_BP, Splitter};
use crate::stats::Totals;
use crate::stats::window::{Reading, Window};

/// One version's cumulative counters and the rolling window the controller would keep.
pub(super) struct Side {
    pub(super) totals: Totals,
    window: Window,
}

impl Side {
    fn new(window: Duration, t0: Instant) -> Side {
        Side { totals: Totals::default(), window: Window::new(window, t0, Totals::default()) }
    }

    fn read(&mut self, now: Instant) -> Reading {
        self.window.tick(now, self.totals.clone())
    }
}

/// A blue-green route's mirrored answers: the candidate's to copies of stable's requests (in
/// preview), stable's to copies of the candidate's (while baking).
pub(super) struct Mirrored {
    to_candidate: Side,
    to_stable: Side,
}

/// Everything a judge reads about one rollout: both versions and, on a mirroring blue-green
/// route, the answers to mirrored copies, each with its rolling window.
pub(super) struct Sides {
    pub(super) stable: Side,
    pub(super) candidate: Side,
    /// `None` for canary plans and routes that do not mirror.
    mirrored: Option<Mirrored>,
    /// Stable's window at the last judged tick: the baseline frozen at a blue-green switch.
    stable_window: Totals,
}

/// What a judge made of one tick.
pub(super) struct Judged {
    pub(super) verdict: Verdict,
    /// Judged candidate requests since the previous tick (in preview: mirrored copies), what
    /// the machine counts towards `min_requests`.
    pub(super) requests: u64,
}

impl Sides {
    /// Empty counters for `route` at `t0`, with mirrored sides when its plan mirrors.
    pub(super) fn new(route: &RouteConfig, t0: Instant) -> Sides {
        let window = route.rollback.window;
        Sides {
            stable: Side::new(window, t0),
            candidate: Side::new(window, t0),
            mirrored: mirror_share_bp(route)
                .map(|_| Mirrored { to_candidate: Side::new(window, t0), to_stable: Side::new(window, t0) }),
            stable_window: Totals::default(),
        }
    }

    /// Every side, in a fixed order (stable, candidate, then the mirrored ones).
    pub(super) fn all(&self) -> impl Iterator<Item = &Side> {
        let (a, b) = self.mirrored.as_ref().map(|m| (&m.to_candidate, &m.to_stable)).unzip();
        [Some(&self.stable), Some(&self.candidate), a, b].into_iter().flatten()
    }

    /// [`Sides::all`], to change.
    pub(super) fn all_mut(&mut self) -> impl Iterator<Item = &mut Side> {
        let (a, b) = self.mirrored.as_mut().map(|m| (&mut m.to_candidate, &mut m.to_stable)).unzip();
        [Some(&mut self.stable), Some(&mut self.candidate), a, b].into_iter().flatten()
    }

    /// Advances every window to `now` and feeds `judge` one tick, as the controller does: in
    /// a blue-green preview the candidate's answers to copies, while baking stable's answers
    /// to copies of the candidate's requests once there are any.
    pub(super) fn judge(&mut self, judge: &mut Judge, at: &Moment) -> Judged {
        let now = at.now;
        let (s, c) = (self.stable.read(now), self.candidate.read(now));
        let copies = self.mirrored.as_mut().map(|m| (m.to_candidate.read(now), m.to_stable.read(now)));
        let (judged, stable, stable_mirrored) = match (&copies, at.phase) {
            (Some((mc, _)), Phase::Preview) => (mc, &s, false),
            (Some((_, ms)), Phase::Baking) if ms.window.requests() > 0 => (&c, ms, true),
            _ => (&c, &s, false),
        };
        let verdict = judge.evaluate(&Observation {
            stable_tick: &stable.tick,
            candidate_tick: &judged.tick,
            stable_window: &stable.window,
            candidate_window: &judged.window,
            weight_bp: at.weight_bp,
            mirror_compared: 0,
            mirror_mismatched: 0,
            stable_mirrored,
        });
        let requests = judged.tick.requests();
        self.stable_window = s.window;
        Judged { verdict, requests }
    }

    /// Stable's figures as of the last judged tick, frozen for a blue-green bake.
    pub(super) fn baseline(&self) -> Option<Baseline> {
        Baseline::of(&self.stable_window)
    }
}

/// The share of requests a route copies, when it is a blue-green route that mirrors (canary
/// plans are simulated without mirroring).
fn mirror_share_bp(route: &RouteConfig) -> Option<u32> {
    route
        .mirror
        .as_ref()
        .map(|m| (m.percent * 100.0).round() as u32)
        .filter(|bp| *bp > 0 && route.rollout.strategy == Strategy::BlueGreen)
}

/// One proxy: its error-diffusion split (and mirror picks) over the requests it receives, and
/// what its versions answered.
pub(super) struct Replica {
    splitter: Splitter,
    /// The share mirrored and the picker that chooses the copies, when the route mirrors.
    mirror: Option<(u32, Splitter)>,
    pub(super) sides: Sides,
}

impl Replica {
    /// A proxy for `route` at `t0`, its split and mirror picker starting at random phases.
    pub(super) fn new(route: &RouteConfig, traffic: &mut Traffic, t0: Instant) -> Replica {
        let splitter = Splitter::with_phase(traffic.rng.random_range(0..FULL_BP));
        let mirror = mirror_share_bp(route).map(|bp| (bp, Splitter::with_phase(traffic.rng.random_range(0..FULL_BP))));
        Replica { splitter, mirror, sides: Sides::new(route, t0) }
    }

    /// Receives `n` requests in the tick `at` and splits them at its weight (copying some in
    /// a blue-green preview or bake). Returns the candidate requests served to users.
    pub(super) fn serve(&mut self, traffic: &mut Traffic, n: u64, at: &Moment) -> u64 {
        let Moment { weight_bp, phase, t_s, faulty, .. } = *at;
        let n_c = (0..n).filter(|_| self.splitter.pick_candidate(weight_bp)).count() as u64;
        traffic.serve(&mut self.sides.stable.totals, n - n_c, Arm::Stable, t_s, false);
        traffic.serve(&mut self.sides.candidate.totals, n_c, Arm::Candidate, t_s, faulty);
        if let (Some((share_bp, picker)), Some(m)) = (&self.mirror, &mut self.sides.mirrored) {
            let (to_candidate, to_stable) = match phase {
                Phase::Preview => ((0..n - n_c).filter(|_| picker.pick_candidate(*share_bp)).count() as u64, 0),
                Phase::Baking => (0, (0..n_c).filter(|_| picker.pick_candidate(*share_bp)).count() as u64),
                _ => (0, 0),
            };
            traffic.serve(&mut m.to_candidate.totals, to_candidate, Arm::Candidate, t_s, faulty);
            traffic.serve(&mut m.to_stable.totals, to_stable, Arm::Stable, t_s, false);
        }
        n_c
    }
}
