//! Which version serves a request: the override header, then a sticky user's bucket, then
//! the weighted split.
//!
//! **Override.** `stable` or `candidate` in the configured header forces that version in any
//! phase — testers and smoke tests reach a candidate before any user does, even at 0% or after
//! a rollback. Forced requests are counted but never judged (they are not randomly assigned)
//! and never count toward `min_requests`.
//!
//! **Sticky users.** The user key (a header or a cookie) is hashed with the rollout's identity
//! (route and candidate version) to a bucket in [0, 10000); the user is on the candidate iff the
//! bucket is below the weight in basis points. As the weight rises users only move from stable
//! to the candidate; after a snap back (weight 0) everyone is on stable; each rollout picks a
//! different first cohort. Requests without the key use the ordinary split.
//!
//! **Judging sticky traffic.** Assignment is per user, not per request, so a heavy user would
//! otherwise weigh as much as hundreds of independent requests. Each user contributes at most one
//! judged request per tick; the rest are counted but not judged. The cap uses a lossy table of
//! 4096 recent users per route (a collision can let a user count twice in a tick — it never
//! blocks a user from counting once).

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use http::header::{self, HeaderName};

use crate::config::{RouteConfig, StickyConfig};
use crate::route_state::{Lane, Role};
use crate::snapshot::Route;
use crate::split::FULL_BP;

const CAP_SLOTS: usize = 4096;

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The version that serves it.
    pub role: Role,
    /// Judged or not.
    pub lane: Lane,
}

/// A request the route refuses to assign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    /// The override header holds something other than `stable` or `candidate`.
    #[error("{header} must be \"stable\" or \"candidate\"")]
    BadOverride {
        /// The header's name.
        header: String,
    },
    /// The override asks for a candidate the route does not have.
    #[error("{header}: candidate requested, but this route has no candidate")]
    NoCandidate {
        /// The header's name.
        header: String,
    },
}

/// Prepared assignment policy of one route.
#[derive(Debug)]
pub struct Assigner {
    override_header: Option<HeaderName>,
    sticky: Option<Sticky>,
}

#[derive(Debug)]
struct Sticky {
    key: StickyConfig,
    seed: u64,
    epoch: AtomicU64,
    seen: Box<[AtomicU64]>,
}

impl Assigner {
    /// The assignment policy of `route`.
    pub fn new(route: &RouteConfig) -> Assigner {
        let identity = format!("{}\0{}", route.name, route.candidate.as_ref().map_or("", |c| c.version.as_str()));
        Assigner {
            override_header: route.override_header.as_ref().and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            sticky: route.sticky.clone().map(|key| Sticky {
                key,
                seed: hash(0, identity.as_bytes()),
                epoch: AtomicU64::new(1),
                seen: (0..CAP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    /// Starts a new judging tick: each sticky user may contribute one judged request again.
    pub fn next_tick(&self) {
        if let Some(s) = &self.sticky {
            s.epoch.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decides the version and lane of a request to `route`.
    #[inline]
    pub fn assign(&self, route: &Route, headers: &HeaderMap) -> Result<Assignment, AssignError> {
        let Some(rollout) = route.rollout() else {
            return match self.forced(headers)? {
                Some(Role::Candidate) => Err(AssignError::NoCandidate { header: self.header_name() }),
                _ => Ok(Assignment { role: Role::Stable, lane: Lane::Judged }),
            };
        };
        if let Some(role) = self.forced(headers)? {
            return Ok(Assignment { role, lane: Lane::Side });
        }
        if let Some(s) = &self.sticky
            && let Some(user) = s.user(headers)
        {
            let h = hash(s.seed, user);
            let role =
                if ((h % u64::from(FULL_BP)) as u32) < rollout.weight_bp() { Role::Candidate } else { Role::Stable };
            let lane = if s.first_this_tick(h) { Lane::Judged } else { Lane::Side };
            return Ok(Assignment { role, lane });
        }
        let role = if rollout.pick_candidate() { Role::Candidate } else { Role::Stable };
        Ok(Assignment { role, lane: Lane::Judged })
    }

    fn header_name(&self) -> String {
        self.override_header.as_ref().map_or(String::new(), |h| h.as_str().to_string())
    }

    fn forced(&self, headers: &HeaderMap) -> Result<Option<Role>, AssignError> {
        let Some(name) = &self.override_header else { return Ok(None) };
        let Some(v) = headers.get(name) else { return Ok(None) };
        match v.as_bytes() {
            b"stable" => Ok(Some(Role::Stable)),
            b"candidate" => Ok(Some(Role::Candidate)),
            _ => Err(AssignError::BadOverride { header: name.as_str().to_string() }),
        }
    }
}

impl Sticky {
    fn user<'a>(&self, headers: &'a HeaderMap) -> Option<&'a [u8]> {
        match &self.key {
            StickyConfig::Header(h) => headers.get(h.as_str()).map(|v| v.as_bytes()).filter(|v| !v.is_empty()),
            StickyConfig::Cookie(name) => {
                headers.get_all(header::COOKIE).iter().find_map(|v| cookie(v.as_bytes(), name.as_bytes()))
            }
        }
    }

    /// True the first time this user is seen in the current tick.
    fn first_this_tick(&self, user_hash: u64) -> bool {
        let epoch = self.epoch.load(Ordering::Relaxed) & 0xFF_FFFF;
        let mark = (user_hash & !0xFF_FFFF) | epoch;
        let slot = &self.seen[(user_hash as usize) % CAP_SLOTS];
        slot.swap(mark, Ordering::Relaxed) != mark
    }
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name).then(|| pair[eq + 1..].trim_ascii()).filter(|v| !v.is_empty())
    })
}

/// FNV-1a over `bytes` from `seed`, then a 64-bit finalizer so that low bits mix well. Stable
/// across versions and platforms, so a user keeps their version across restarts and upgrades.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        assert_eq!(cookie(b"a=1; session=xyz; b=2", b"session"), Some(&b"xyz"[..]));
        assert_eq!(cookie(b"xsession=1", b"session"), None);
        assert_eq!(cookie(b"session=", b"session"), None);
    }

    #[test]
    fn buckets_are_uniform_enough() {
        let n = 100_000u64;
        let below = (0..n).filter(|i| hash(7, format!("user-{i}").as_bytes()) % 10_000 < 1000).count();
        assert!((9_500..=10_500).contains(&below), "{below}");
    }

    #[test]
    fn a_user_counts_once_per_tick() {
        let s = Sticky {
            key: StickyConfig::Header("x".into()),
            seed: 1,
            epoch: AtomicU64::new(1),
            seen: (0..CAP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        };
        let h = hash(1, b"alice");
        assert!(s.first_this_tick(h));
        assert!(!s.first_this_tick(h));
        s.epoch.fetch_add(1, Ordering::Relaxed);
        assert!(s.first_this_tick(h));
    }
}
