//! Where a rollout's history is read back from: one seam with two stores behind it.
//!
//! A single veer keeps its history in the local journal; a replica in fleet mode reads the
//! fleet's, which lives in etcd (each replica's journal holds only what that replica saw).
//! The admin API's events and report endpoints ask a [`RolloutHistory`] and never which one
//! it is. Writes stay with each controller, because their guarantees differ: the journal is an
//! fsync'd append answered at once, the fleet's record a compare-and-swap answered later by
//! the agent (see `docs/fleet.md`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::fleet::{Fleet, KEEP_EVENTS};
use crate::journal::{Event, Journal};
use crate::rollout::machine::EventKind;

/// Why the history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The store cannot be reached now (etcd without quorum, the fleet agent stopped): 503.
    #[error("{0}")]
    Unavailable(String),
    /// Reading failed on this replica: 500.
    #[error("reading the journal failed: {0}")]
    Failed(String),
}

/// A history read in progress.
pub type Reading<'a> = Pin<Box<dyn Future<Output = Result<Vec<Event>, HistoryError>> + Send + 'a>>;

/// A store of rollout events, read oldest first.
pub trait RolloutHistory: Send + Sync {
    /// The newest `limit` events of `route` (of every route when `None`).
    fn events(&self, route: Option<&str>, limit: usize) -> Reading<'_>;

    /// The history of the rollout of `candidate` of `route`: from its newest `started` event
    /// on, as far as the store keeps it.
    fn rollout_events(&self, route: &str, candidate: &str) -> Reading<'_>;
}

/// The local journal: file reads and parsing run off the proxy's runtime.
impl RolloutHistory for Arc<Journal> {
    fn events(&self, route: Option<&str>, limit: usize) -> Reading<'_> {
        let (journal, route) = (self.clone(), route.map(str::to_string));
        blocking(move || Journal::events(&journal, route.as_deref(), Some(limit)))
    }

    fn rollout_events(&self, route: &str, candidate: &str) -> Reading<'_> {
        let (journal, route, candidate) = (self.clone(), route.to_string(), candidate.to_string());
        blocking(move || Journal::rollout_events(&journal, &route, &candidate))
    }
}

fn blocking(read: impl FnOnce() -> Vec<Event> + Send + 'static) -> Reading<'static> {
    Box::pin(async move { tokio::task::spawn_blocking(read).await.map_err(|e| HistoryError::Failed(e.to_string())) })
}

/// The fleet's history in etcd, whichever replica is asked.
impl RolloutHistory for Arc<Fleet> {
    fn events(&self, route: Option<&str>, limit: usize) -> Reading<'_> {
        let route = route.map(str::to_string);
        Box::pin(async move {
            Fleet::events(self, route.as_deref(), limit).await.map_err(|e| HistoryError::Unavailable(e.to_string()))
        })
    }

    fn rollout_events(&self, route: &str, candidate: &str) -> Reading<'_> {
        let (route, candidate) = (route.to_string(), candidate.to_string());
        Box::pin(async move {
            // etcd keeps the newest KEEP_EVENTS of a route: all of them is one bounded read.
            let all = usize::try_from(KEEP_EVENTS).unwrap_or(usize::MAX);
            let mut events =
                Fleet::events(self, Some(&route), all).await.map_err(|e| HistoryError::Unavailable(e.to_string()))?;
            let since = events.iter().rposition(|e| e.kind == EventKind::Started && e.candidate_version == candidate);
            Ok(events.split_off(since.unwrap_or(0)))
        })
    }
}
