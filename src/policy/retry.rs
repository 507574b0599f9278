//! Retry on stable: a request that failed on the candidate is re-sent to stable, and the user
//! gets stable's answer.
//!
//! Only requests that are safe to send twice are replayed: GET, HEAD and OPTIONS, or — when the
//! route says its upstream makes them safe (`non_idempotent = true`) — other methods, and only
//! when the body is known up front to fit `max_body_bytes` (it is buffered for the replay).
//! The candidate's failure still counts for the judge. Retries come out of a budget (tower's
//! `TpsBudget`): at most `budget` × the route's recent requests, so a failing candidate can
//! never double the load on stable. The budget is fed from the control plane each tick, so
//! the hot path only touches it on the failure path.

use std::time::Duration;

use http::{HeaderMap, Method, header};
use metrics::Counter;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::RetryConfig;
use crate::telemetry::{RETRIES_TOTAL, Telemetry};

/// How a retry ended, as `veer_retries_total{outcome}` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Stable answered (not 5xx): the user never saw the candidate's failure.
    Recovered,
    /// Stable failed too.
    Failed,
    /// The budget was spent: the candidate's failure went to the user.
    BudgetExhausted,
}

impl RetryOutcome {
    const ALL: [RetryOutcome; 3] = [RetryOutcome::Recovered, RetryOutcome::Failed, RetryOutcome::BudgetExhausted];

    fn label(self) -> &'static str {
        match self {
            RetryOutcome::Recovered => "recovered",
            RetryOutcome::Failed => "failed",
            RetryOutcome::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// A route's retry policy for one configuration generation.
#[derive(Debug)]
pub struct RetryPolicy {
    max_body_bytes: usize,
    non_idempotent: bool,
    budget: TpsBudget,
    counters: Vec<(RetryOutcome, Counter)>,
}

impl RetryPolicy {
    /// The policy of `route` from its `[routes.retry]`.
    pub fn new(route: &str, cfg: &RetryConfig, telemetry: &Telemetry) -> RetryPolicy {
        RetryPolicy {
            max_body_bytes: cfg.max_body_bytes,
            non_idempotent: cfg.non_idempotent,
            // A 10 s window; one retry a second is always allowed so a quiet route can recover.
            budget: TpsBudget::new(Duration::from_secs(10), 1, cfg.budget as f32),
            counters: RetryOutcome::ALL
                .iter()
                .map(|&o| (o, telemetry.route_counter(RETRIES_TOTAL, route, "outcome", o.label().to_string())))
                .collect(),
        }
    }

    /// Whether a request can be replayed: the method allows it and the body (if any) is
    /// known to fit the buffer. `body_is_empty` is the body's own end-of-stream flag.
    pub fn replayable(&self, method: &Method, headers: &HeaderMap, body_is_empty: bool) -> bool {
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe && !self.non_idempotent {
            return false;
        }
        if body_is_empty {
            return true;
        }
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= self.max_body_bytes)
    }

    /// The largest body buffered for a replay.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Credits the budget with `requests` served by the route (control plane, every tick).
    pub fn deposit(&self, requests: u64) {
        for _ in 0..requests {
            self.budget.deposit();
        }
    }

    /// Whether a failed candidate attempt is re-sent to stable: only when the failure is
    /// worth a second try (`retryable`: a 5xx answer, or a refusal whose
    /// [`crate::proxy::error::Refusal::retryable`] says so) and the
    /// budget has a retry left. A retryable failure the budget refuses is counted as
    /// `budget_exhausted`; one that is not retryable costs nothing.
    pub fn retries(&self, retryable: bool) -> bool {
        if !retryable {
            return false;
        }
        if !self.budget.withdraw() {
            self.count(RetryOutcome::BudgetExhausted);
            return false;
        }
        true
    }

    /// Takes one retry from the budget.
    #[cfg(test)]
    fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }

    /// Counts a retry's outcome.
    pub fn count(&self, outcome: RetryOutcome) {
        if let Some((_, c)) = self.counters.iter().find(|(o, _)| *o == outcome) {
            c.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(non_idempotent: bool, budget: f64) -> RetryPolicy {
        let cfg = RetryConfig { on_candidate_failure: true, budget, max_body_bytes: 1024, non_idempotent };
        RetryPolicy::new("web", &cfg, &Telemetry::new())
    }

    #[test]
    fn only_replayable_requests_qualify() {
        let p = policy(false, 0.2);
        let mut h = HeaderMap::new();
        assert!(p.replayable(&Method::GET, &h, true));
        assert!(!p.replayable(&Method::POST, &h, true), "POST needs non_idempotent");
        h.insert(header::CONTENT_LENGTH, "10".parse().expect("value"));
        let p = policy(true, 0.2);
        assert!(p.replayable(&Method::POST, &h, false));
        h.insert(header::CONTENT_LENGTH, "4096".parse().expect("value"));
        assert!(!p.replayable(&Method::POST, &h, false), "too big to buffer");
        h.remove(header::CONTENT_LENGTH);
        assert!(!p.replayable(&Method::POST, &h, false), "unknown length (chunked) is never buffered");
    }

    #[test]
    fn only_retryable_failures_spend_the_budget() {
        let p = policy(false, 0.0);
        // Not worth a second try: refused without touching the budget.
        assert!((0..100).all(|_| !p.retries(false)));
        // The reserve (one a second over the 10 s window) is still whole afterwards.
        let granted = (0..100).filter(|_| p.retries(true)).count();
        assert!((1..=11).contains(&granted), "{granted}");
        assert!(!p.retries(true), "spent");
    }

    #[test]
    fn the_budget_is_a_fraction_of_deposits() {
        let p = policy(false, 0.2);
        p.deposit(1000);
        let granted = (0..1000).filter(|_| p.withdraw()).count();
        // 20% of 1000 plus the 1-per-second reserve over the 10 s window.
        assert!((200..=215).contains(&granted), "{granted}");
    }
}
