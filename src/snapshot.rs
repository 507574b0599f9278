//! One immutable configuration generation, as the data plane sees it.
//!
//! Built off the hot path from a validated [`Config`] and published with a single
//! `ArcSwap::store`, so a request sees either the old generation or the new one, never a
//! mix. Rollout state and measurements are carried over from the previous generation by
//! route name and version (see [`crate::route_state`]). The connection settings (TLS acceptor,
//! hyper builders) are part of the generation too, so one store publishes both.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_rustls::TlsAcceptor;

use crate::config::{Config, RouteConfig, VersionConfig};
use crate::conn_settings::ConnSettings;
use crate::policy::RoutePolicy;
use crate::rollout::RolloutState;
use crate::route_state::{Role, RouteRuntime, VersionRuntime};
use crate::router::Router;
use crate::telemetry::Telemetry;
use crate::upstream::Pool;

/// A configuration generation.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one per applied reload.
    pub generation: u64,
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Routes in declaration order.
    pub routes: Vec<Arc<Route>>,
    /// How this generation's client connections are served (its TLS acceptor among them).
    /// Shared so that a connection keeps its settings without keeping the whole generation.
    pub conn: Arc<ConnSettings>,
    router: Router,
}

/// A route of one generation.
#[derive(Debug)]
pub struct Route {
    /// Its configuration.
    pub config: RouteConfig,
    /// State carried across generations.
    pub runtime: Arc<RouteRuntime>,
    /// Stable endpoints.
    pub stable: Pool,
    /// Candidate endpoints.
    pub candidate: Option<Pool>,
    /// Traffic policies prepared for this generation.
    pub policy: RoutePolicy,
    inflight: AtomicUsize,
}

/// Why a snapshot could not be built (validation normally prevents all of these).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An endpoint did not parse as a URI authority.
    #[error("route {route}: endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// Route name.
        route: String,
        /// The endpoint.
        endpoint: String,
        /// Parse error.
        source: http::uri::InvalidUri,
    },
}

impl Snapshot {
    /// Builds generation `generation` from `config`, reusing state from `previous`; `tls` is
    /// the HTTPS listener's acceptor for this generation's certificate, if one is configured.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        telemetry: &Telemetry,
        generation: u64,
        tls: Option<TlsAcceptor>,
    ) -> Result<Snapshot, BuildError> {
        let mut routes = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            let old = previous.and_then(|p| p.route(&rc.name)).map(|r| &r.runtime);
            let runtime = Arc::new(carry_over(rc, old, telemetry));
            let pool = |v: &VersionConfig| {
                Pool::new(&v.endpoints, v.h2).map_err(|source| BuildError::Endpoint {
                    route: rc.name.clone(),
                    endpoint: v.endpoints.join(","),
                    source,
                })
            };
            routes.push(Arc::new(Route {
                config: rc.clone(),
                runtime,
                stable: pool(&rc.stable)?,
                candidate: rc.candidate.as_ref().map(pool).transpose()?,
                policy: RoutePolicy::new(rc, telemetry),
                inflight: AtomicUsize::new(0),
            }));
        }
        let conn = Arc::new(ConnSettings::new(&config.server, tls));
        Ok(Snapshot { generation, router: Router::new(&config.routes), conn, config, routes })
    }

    /// Attaches every endpoint to its clients in `clients` now, so that no request of this
    /// generation takes the registry's lock.
    pub fn attach(&self, clients: &crate::upstream::Clients) {
        for r in &self.routes {
            for pool in std::iter::once(&r.stable).chain(r.candidate.as_ref()) {
                for e in pool.endpoints() {
                    e.link(clients);
                }
            }
        }
    }

    /// The route serving `host` and `path`.
    #[inline]
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.router.find(host, path).map(|i| &self.routes[i])
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.config.name == name)
    }

    /// Pushes pending metric increments of every version, so that a scrape reads counts as
    /// recent as the hot-path counters (the control plane otherwise pushes them each tick).
    pub fn flush_metrics(&self) {
        for route in &self.routes {
            route.runtime.stable.flush_metrics();
            if let Some((_, cand)) = &route.runtime.candidate {
                cand.flush_metrics();
            }
        }
    }
}

/// Keeps the previous generation's state for every version that is still the same.
fn carry_over(rc: &RouteConfig, old: Option<&Arc<RouteRuntime>>, telemetry: &Telemetry) -> RouteRuntime {
    let stable = match old {
        Some(o) if o.stable.version == rc.stable.version => o.stable.clone(),
        _ => Arc::new(VersionRuntime::new(telemetry, &rc.name, Role::Stable, &rc.stable.version)),
    };
    let candidate = rc.candidate.as_ref().map(|c| match old.and_then(|o| o.candidate.as_ref()) {
        Some((rollout, rt)) if rt.version == c.version => (rollout.clone(), rt.clone()),
        _ => (
            Arc::new(RolloutState::new(&c.version)),
            Arc::new(VersionRuntime::new(telemetry, &rc.name, Role::Candidate, &c.version)),
        ),
    });
    RouteRuntime { stable, candidate }
}

impl Route {
    /// The endpoints of `role` (stable when the route has no candidate).
    pub fn pool(&self, role: Role) -> &Pool {
        match (role, &self.candidate) {
            (Role::Candidate, Some(p)) => p,
            _ => &self.stable,
        }
    }

    /// The measurement state of `role`.
    pub fn version(&self, role: Role) -> &Arc<VersionRuntime> {
        match (role, &self.runtime.candidate) {
            (Role::Candidate, Some((_, v))) => v,
            _ => &self.runtime.stable,
        }
    }

    /// The rollout, when the route has a candidate.
    pub fn rollout(&self) -> Option<&Arc<RolloutState>> {
        self.runtime.candidate.as_ref().map(|(r, _)| r)
    }

    /// Phase, step index and candidate weight (percent) right now.
    pub fn position(&self) -> (crate::rollout::Phase, Option<usize>, f64) {
        crate::rollout::position(self.rollout().map(Arc::as_ref))
    }

    /// Admits one more request under `max_inflight`; `None` means shed it. The slot is held
    /// by the returned [`Admission`] and freed exactly once, when it drops, whichever way
    /// the request ends (a retry on stable takes the same slot along). Unbounded routes
    /// count nothing, so they touch no shared counter.
    #[inline]
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let counted = self.config.max_inflight != 0;
        if counted {
            let before = self.inflight.fetch_add(1, Ordering::Relaxed);
            if before >= self.config.max_inflight {
                self.inflight.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
        }
        Some(Admission { route: self.clone(), counted })
    }

    /// Requests currently holding a `max_inflight` slot (0 on unbounded routes).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// One request's `max_inflight` slot on a route; dropping it frees the slot. It is not
/// `Clone`, so a slot can only be freed once, and it moves with the request from its first
/// attempt to a retry.
#[derive(Debug)]
pub struct Admission {
    route: Arc<Route>,
    counted: bool,
}

impl Admission {
    /// The route the slot belongs to.
    #[inline]
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// A stand-in that holds no slot and frees nothing, for a holder whose slot moved on.
    pub fn unbounded(route: Arc<Route>) -> Admission {
        Admission { route, counted: false }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.counted {
            self.route.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
