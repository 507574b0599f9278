//! Traffic policies that make a canary safe for real users: who goes where (override header,
//! sticky users, the weighted split), shielding users from a failing candidate (retry on
//! stable), and shadow traffic (mirroring).
//!
//! Each route's policy state is built once per configuration generation ([`RoutePolicy::new`])
//! so the hot path only reads prepared values; a route without a policy pays one branch.

pub mod assign;
pub mod mirror;
pub mod retry;

use crate::config::RouteConfig;
use crate::telemetry::Telemetry;

/// The policy state of one route for one configuration generation.
#[derive(Debug)]
pub struct RoutePolicy {
    /// Override header and sticky assignment.
    pub assign: assign::Assigner,
    /// Retry of failed candidate attempts on stable.
    pub retry: Option<retry::RetryPolicy>,
    /// Shadow traffic to the candidate.
    pub mirror: Option<mirror::MirrorPolicy>,
}

impl RoutePolicy {
    /// Prepares `route`'s policies.
    pub fn new(route: &RouteConfig, telemetry: &Telemetry) -> RoutePolicy {
        let has_candidate = route.candidate.is_some();
        RoutePolicy {
            assign: assign::Assigner::new(route),
            retry: route
                .retry
                .as_ref()
                .filter(|r| r.on_candidate_failure && has_candidate)
                .map(|r| retry::RetryPolicy::new(&route.name, r, telemetry)),
            mirror: route
                .mirror
                .as_ref()
                .filter(|m| m.percent > 0.0 && has_candidate)
                .map(|m| mirror::MirrorPolicy::new(&route.name, m, telemetry)),
        }
    }
}
