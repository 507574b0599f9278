//! The fleet's key layout under `[cluster] prefix`.
//!
//! - `rollouts/<route>`: the rollout record, written only by compare-and-swap transactions;
//! - `leaders/<route>`: the node leading the route's rollout, on the leader's lease;
//! - `members/<node>`: each replica's report (what it runs and applies), on its own lease;
//! - `counters/<node>`: each replica's cumulative counters, on its own lease, read by leaders
//!   only (not watched);
//! - `events/<route>/<seq>`: the route's history, the newest [`KEEP_EVENTS`] kept;
//! - `checkpoints/<node>`: the judge's evidence of the routes a leader leads, saved every
//!   second and not on a lease, so that the next leader resumes from it.

/// How many of a route's events the fleet keeps in etcd; older ones are deleted in the same
/// transaction that adds a new one. Each replica's own journal keeps what it saw for longer.
pub const KEEP_EVENTS: u64 = 500;

/// Builds the keys of one fleet.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    /// A rollout record.
    Rollout(&'a str),
    /// A route's leader.
    Leader(&'a str),
    /// A replica's report.
    Member(&'a str),
    /// A replica's counters.
    Counter(&'a str),
    /// A history entry (ignored by the watcher).
    Event,
    /// A leader's evidence checkpoint.
    Checkpoint(&'a str),
}

impl Keys {
    /// The keys under `prefix` (no trailing `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: format!("{prefix}/") }
    }

    /// `rollouts/<route>`.
    pub fn rollout(&self, route: &str) -> String {
        format!("{}rollouts/{route}", self.prefix)
    }

    /// `leaders/<route>`.
    pub fn leader(&self, route: &str) -> String {
        format!("{}leaders/{route}", self.prefix)
    }

    /// `members/<node>`.
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.prefix)
    }

    /// `counters/<node>`.
    pub fn counter(&self, node: &str) -> String {
        format!("{}counters/{node}", self.prefix)
    }

    /// The folder of `kind` (`rollouts`, `leaders`, `members`, `counters`, `checkpoints`).
    pub fn folder(&self, kind: &str) -> String {
        format!("{}{kind}/", self.prefix)
    }

    /// `checkpoints/<node>`.
    pub fn checkpoint(&self, node: &str) -> String {
        format!("{}checkpoints/{node}", self.prefix)
    }

    /// `events/<route>/`, or `events/` for every route.
    pub fn events(&self, route: Option<&str>) -> String {
        match route {
            Some(r) => format!("{}events/{r}/", self.prefix),
            None => format!("{}events/", self.prefix),
        }
    }

    /// `events/<route>/<seq>`, zero-padded so keys sort by number.
    pub fn event(&self, route: &str, seq: u64) -> String {
        format!("{}events/{route}/{seq:012}", self.prefix)
    }

    /// What `key` is, when it belongs to this fleet.
    pub fn parse<'a>(&self, key: &'a str) -> Option<Key<'a>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "rollouts" => Some(Key::Rollout(name)),
            "leaders" => Some(Key::Leader(name)),
            "members" => Some(Key::Member(name)),
            "counters" => Some(Key::Counter(name)),
            "events" => Some(Key::Event),
            "checkpoints" => Some(Key::Checkpoint(name)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_other_fleets_are_not_ours() {
        let k = Keys::new("/veer/edge");
        assert_eq!(k.parse(&k.rollout("checkout")), Some(Key::Rollout("checkout")));
        assert_eq!(k.parse(&k.leader("checkout")), Some(Key::Leader("checkout")));
        assert_eq!(k.parse(&k.member("edge-1")), Some(Key::Member("edge-1")));
        assert_eq!(k.parse(&k.counter("edge-1")), Some(Key::Counter("edge-1")));
        assert_eq!(k.folder("members"), "/veer/edge/members/");
        assert_eq!(k.parse(&k.event("checkout", 7)), Some(Key::Event));
        assert_eq!(k.parse(&k.checkpoint("edge-1")), Some(Key::Checkpoint("edge-1")));
        assert_eq!(k.event("checkout", 7), "/veer/edge/events/checkout/000000000007");
        assert_eq!(k.parse("/veer/edge-2/rollouts/checkout"), None);
    }
}
