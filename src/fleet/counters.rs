//! A version's cumulative counters as a replica publishes them, and their fleet-wide sum.
//!
//! Replicas publish what they have counted since the version appeared, never increments: a
//! write that is lost or overtaken loses nothing, because the next one carries it too. Whoever
//! sums them keeps, per member, the counters it last saw and adds only the difference, so a
//! member that joins late or is seen for the first time adds nothing it did not count since.
//! A member that restarts starts again from zero under a new lease and is a new member.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::stats::{Totals, buckets};

/// What the judge reads of a version's [`Totals`]: answers by class, faults, latency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Answers by status class ([`crate::stats::Class`] order).
    #[serde(rename = "c")]
    pub classes: [u64; 6],
    /// Answers the version is to blame for.
    #[serde(rename = "f")]
    pub faults: u64,
    /// `(bucket, count)` of the non-empty latency buckets, ascending: most of the 1,056 are
    /// empty, and a replica's key is written several times a second.
    #[serde(rename = "l")]
    pub latency: Vec<(u16, u64)>,
}

impl Counters {
    /// The judged part of `t`.
    pub fn of(t: &Totals) -> Counters {
        let latency = t
            .latency
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (u16::try_from(i).unwrap_or(u16::MAX), *n))
            .collect();
        Counters { classes: t.classes, faults: t.faults, latency }
    }

    /// Requests answered.
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// Adds `self − earlier` to `into` (field by field, never below zero).
    pub fn add_since(&self, earlier: &Counters, into: &mut Totals) {
        for (acc, (now, then)) in into.classes.iter_mut().zip(self.classes.iter().zip(&earlier.classes)) {
            *acc += now.saturating_sub(*then);
        }
        into.faults += self.faults.saturating_sub(earlier.faults);
        let mut then = earlier.latency.iter().peekable();
        for &(i, n) in &self.latency {
            while then.next_if(|(j, _)| *j < i).is_some() {}
            let before = then.next_if(|(j, _)| *j == i).map_or(0, |(_, m)| *m);
            if let Some(slot) = into.latency.get_mut(usize::from(i).min(buckets::COUNT - 1)) {
                *slot += n.saturating_sub(before);
            }
        }
    }
}

/// The fleet-wide cumulative sum of one version's counters, fed member by member.
#[derive(Debug, Default)]
pub struct FleetSum {
    /// What each member (node and lease) published when last seen.
    seen: HashMap<(String, i64), Counters>,
    total: Totals,
}

impl FleetSum {
    /// Adds what `member` counted since it was last seen; the first sighting only sets the
    /// baseline. Returns the fleet's running total.
    pub fn feed(&mut self, member: (&str, i64), now: &Counters) {
        let key = (member.0.to_string(), member.1);
        if let Some(before) = self.seen.get(&key) {
            now.add_since(before, &mut self.total);
        }
        self.seen.insert(key, now.clone());
    }

    /// Forgets members no longer live, so their lease's successors start a fresh baseline.
    pub fn retain(&mut self, live: impl Fn(&(String, i64)) -> bool) {
        self.seen.retain(|k, _| live(k));
    }

    /// Everything the fleet counted since this sum began.
    pub fn total(&self) -> &Totals {
        &self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Class;

    fn totals(ok: u64, bad: u64, lat: &[(usize, u64)]) -> Totals {
        let mut t = Totals::default();
        t.classes[Class::Success as usize] = ok;
        t.classes[Class::ServerError as usize] = bad;
        t.faults = bad;
        for &(i, n) in lat {
            t.latency[i] = n;
        }
        t
    }

    #[test]
    fn published_counters_keep_what_the_judge_reads() {
        let t = totals(7, 3, &[(4, 2), (900, 8)]);
        let c = Counters::of(&t);
        assert_eq!(c.latency, vec![(4, 2), (900, 8)]);
        let mut back = Totals::default();
        c.add_since(&Counters::default(), &mut back);
        assert_eq!((back.classes, back.faults, back.latency), (t.classes, t.faults, t.latency));
    }

    #[test]
    fn the_sum_adds_differences_and_a_first_sighting_is_a_baseline() {
        let mut sum = FleetSum::default();
        sum.feed(("a", 1), &Counters::of(&totals(100, 0, &[(10, 100)])));
        assert_eq!(sum.total().requests(), 0, "what a member counted before it was seen is not counted");
        sum.feed(("a", 1), &Counters::of(&totals(150, 5, &[(10, 140), (20, 15)])));
        sum.feed(("b", 9), &Counters::of(&totals(40, 0, &[(10, 40)])));
        sum.feed(("b", 9), &Counters::of(&totals(60, 2, &[(10, 55), (30, 7)])));
        let t = sum.total();
        assert_eq!((t.requests(), t.faults), (50 + 5 + 20 + 2, 7));
        assert_eq!((t.latency[10], t.latency[20], t.latency[30]), (40 + 15, 15, 7));
        // A lost or repeated write changes nothing: the same cumulative figures add zero.
        sum.feed(("b", 9), &Counters::of(&totals(60, 2, &[(10, 55), (30, 7)])));
        assert_eq!(sum.total().requests(), 77);
        // A restarted member (new lease) starts from a baseline again.
        sum.retain(|k| k.0 != "b");
        sum.feed(("b", 10), &Counters::of(&totals(3, 0, &[(10, 3)])));
        assert_eq!(sum.total().requests(), 77);
    }
}
