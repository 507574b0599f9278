//! The data-plane handle: what serving a request needs, and nothing the operator side owns.
//!
//! Connections, the proxy, mirroring and the endpoint health checker hold an
//! `Arc<DataPlane>`: the current generation (one `ArcSwap<Snapshot>`, read without a lock),
//! the upstream clients that outlive generations, the metrics registry, and the two drain
//! signals. Publishing a generation is one `store`, done by the control side (start, reload)
//! through [`DataPlane::publish`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::snapshot::Snapshot;
use crate::telemetry::Telemetry;
use crate::upstream::Clients;

/// State every request path reads: the current generation, upstream clients, metrics and
/// the drain signals.
pub struct DataPlane {
    snapshot: ArcSwap<Snapshot>,
    /// Upstream connection pools, shared by every generation.
    pub clients: Clients,
    /// This proxy's metrics registry.
    pub telemetry: Arc<Telemetry>,
    draining: AtomicBool,
    /// Set when a drain runs out of time: upgraded tunnels still open are cut.
    tunnels_cut: watch::Sender<bool>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("generation", &self.snapshot().generation)
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// A data plane serving `first`, whose endpoints are attached to `clients` here.
    pub fn new(first: Snapshot, clients: Clients, telemetry: Arc<Telemetry>) -> DataPlane {
        first.attach(&clients);
        DataPlane {
            snapshot: ArcSwap::from_pointee(first),
            clients,
            telemetry,
            draining: AtomicBool::new(false),
            tunnels_cut: watch::channel(false).0,
        }
    }

    /// The current configuration generation.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Publishes the next generation: its endpoints are attached to the clients first (so no
    /// request of it takes the registry's lock), then one atomic store makes its routes and
    /// connection settings current together.
    pub fn publish(&self, next: Snapshot) {
        next.attach(&self.clients);
        self.snapshot.store(Arc::new(next));
    }

    /// Becomes true when a drain has waited `drain_timeout` and what is left is cut.
    pub fn tunnels_cut(&self) -> watch::Receiver<bool> {
        self.tunnels_cut.subscribe()
    }

    /// Cuts the upgraded tunnels still open (a drain that ran out of time).
    pub fn cut_tunnels(&self) {
        self.tunnels_cut.send_replace(true);
    }

    /// True once shutdown has begun; `/readyz` answers 503.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the proxy as draining (its listeners are closed by then).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}
