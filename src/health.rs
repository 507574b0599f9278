//! Active HTTP health checks of upstream endpoints.
//!
//! **Why.** Passive ejection ([`crate::upstream::Endpoint::connect_failed`]) only sees
//! endpoints that refuse connections, and only when a request happens to try one. An endpoint
//! that still accepts connections but cannot serve (a dependency down, a draining process, a
//! deadlocked worker) keeps receiving its share of traffic, and an endpoint that comes back
//! is only noticed when a request probes it after its backoff. A version that sets
//! `health_path` is checked ahead of the traffic instead: every `health_interval`, veer GETs
//! `http://<endpoint><health_path>` on a fresh connection, with a timeout of
//! `min(health_interval, 2 s)`. Any 2xx passes; any other status, a connection error or the
//! timeout fails.
//!
//! **State.** The outcome lives in the endpoint itself, as one atomic flag next to the passive
//! backoff, so [`crate::upstream::Endpoint::available`] stays a couple of relaxed loads on the
//! hot path. An endpoint whose check fails is skipped by [`crate::upstream::Pool::pick`] until
//! a later check passes; traffic never re-admits it.
//!
//! **With passive ejection.** The two mechanisms are independent and either one ejects: an
//! endpoint is picked only when its check passes *and* it is not backing off after a refused
//! connection. A passing check proves the endpoint accepts connections again, so it also ends
//! the passive backoff: with checks configured, a returning endpoint is re-admitted within
//! one `health_interval` instead of after its backoff runs out.
//!
//! **Reloads.** Pools belong to a configuration generation ([`crate::snapshot::Snapshot`]), so
//! one task follows whatever generation is current: on each wake it walks the snapshot's
//! checked endpoints, probes those whose check is due, and copies the last known result into
//! endpoints a reload has just created (they start out passing). Checks are keyed by endpoint
//! address, health path and protocol, so a reload keeps each endpoint's schedule and state,
//! and an endpoint shared by several routes is probed once (on the interval of the first
//! route that lists it). Endpoints no longer configured are forgotten. The task runs in the
//! proxy's task set and stops at drain.

use crate::telemetry::error_chain;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri, Version, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::data_plane::DataPlane;
use crate::snapshot::Snapshot;
use crate::upstream::Endpoint;

/// Longest a single check may take.
const MAX_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the checker sleeps, so that a reload adding checks is noticed quickly.
const IDLE_WAKE: Duration = Duration::from_millis(250);

/// What is probed: one endpoint, one path, one protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// The configured `health_path`.
    pub path: String,
    /// Probe with cleartext HTTP/2.
    pub h2: bool,
}

#[derive(Debug)]
struct State {
    /// When the next probe may start.
    due: Instant,
    /// The result of the last probe; `None` before the first one.
    passing: Option<bool>,
    /// A probe is in flight.
    probing: bool,
    /// Seen in the current snapshot during this wake.
    seen: bool,
    /// A route and version that use it, for the logs.
    route: String,
    version: String,
}

/// The schedule and last results of every check; the network side is in [`run`].
#[derive(Debug, Default)]
pub struct Checker {
    targets: HashMap<Target, State>,
}

/// Every endpoint of `snap` whose version has a `health_path`, with its route and version.
fn checked(snap: &Snapshot) -> impl Iterator<Item = (Target, Duration, &str, &str, &Endpoint)> + '_ {
    snap.routes.iter().flat_map(|r| {
        let candidate = r.config.candidate.as_ref().zip(r.candidate.as_ref());
        std::iter::once((&r.config.stable, &r.stable)).chain(candidate).flat_map(move |(v, pool)| {
            let path = v.health_path.as_deref();
            pool.endpoints().iter().filter_map(move |ep| {
                let target = Target { addr: ep.addr.clone(), path: path?.to_string(), h2: v.h2 };
                Some((target, v.health_interval, r.config.name.as_str(), v.version.as_str(), ep))
            })
        })
    })
}

impl Checker {
    /// A checker with no history.
    pub fn new() -> Self {
        Checker::default()
    }

    /// Walks `snap`: applies known results to its endpoints, forgets targets it no longer
    /// has, and returns the probes due at `now` with their timeouts. Each counts as in
    /// flight until its result is passed to [`Checker::record`].
    pub fn plan(&mut self, snap: &Snapshot, now: Instant) -> Vec<(Target, Duration)> {
        let mut due = Vec::new();
        for (target, interval, route, version, ep) in checked(snap) {
            let s = self.targets.entry(target.clone()).or_insert_with(|| State {
                due: now,
                passing: None,
                probing: false,
                seen: false,
                route: route.to_string(),
                version: version.to_string(),
            });
            if let Some(p) = s.passing {
                ep.set_check_passing(p);
            }
            if std::mem::replace(&mut s.seen, true) {
                continue;
            }
            if !s.probing && s.due <= now {
                s.probing = true;
                s.due = now + interval;
                due.push((target, interval.min(MAX_TIMEOUT)));
            }
        }
        self.targets.retain(|_, s| std::mem::take(&mut s.seen));
        due
    }

    /// Records a probe's result, logs a change, and applies it to every endpoint of `snap`
    /// it covers. A passing check also ends a passive backoff.
    pub fn record(&mut self, snap: &Snapshot, target: &Target, result: Result<(), String>) {
        let Some(s) = self.targets.get_mut(target) else { return };
        s.probing = false;
        let passing = result.is_ok();
        let (endpoint, path, route, version) = (&target.addr, &target.path, &s.route, &s.version);
        match (s.passing, &result) {
            (Some(false), Ok(())) => {
                let msg = "health check passes again; endpoint back in rotation";
                info!(%endpoint, health_path = %path, %route, %version, "{msg}");
            }
            (None | Some(true), Err(why)) => {
                let msg = "health check failed; endpoint out of rotation until a check passes";
                warn!(%endpoint, health_path = %path, %route, %version, reason = %why, "{msg}");
            }
            (_, Err(why)) => debug!(endpoint = %target.addr, reason = %why, "health check still failing"),
            (_, Ok(())) => debug!(endpoint = %target.addr, "health check passed"),
        }
        s.passing = Some(passing);
        for (t, _, _, _, ep) in checked(snap) {
            if t == *target {
                ep.set_check_passing(passing);
                if passing {
                    ep.succeeded();
                }
            }
        }
    }

    /// When the next probe falls due, or [`IDLE_WAKE`] from `now` if sooner.
    pub fn next_wake(&self, now: Instant) -> Instant {
        let idle = now + IDLE_WAKE;
        self.targets.values().filter(|s| !s.probing).map(|s| s.due).fold(idle, Instant::min)
    }
}

/// HTTP/1.1 and h2c clients for probes. No connection is kept idle, so every check opens a
/// new one, as a request after a restart or a network change would.
#[derive(Debug, Clone)]
struct Probes {
    h1: Client<HttpConnector, Empty<Bytes>>,
    h2: Client<HttpConnector, Empty<Bytes>>,
}

impl Probes {
    fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(MAX_TIMEOUT));
        let build = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_max_idle_per_host(0)
                .http2_only(h2)
                .build(connector.clone())
        };
        Probes { h1: build(false), h2: build(true) }
    }

    /// One check: `Ok` for a 2xx within `timeout`, otherwise why not.
    async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let uri: Uri = format!("http://{}{}", target.addr, target.path)
            .parse()
            .map_err(|e| format!("cannot build the check's URI: {e}"))?;
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        *req.version_mut() = if target.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        req.headers_mut().insert(header::USER_AGENT, header::HeaderValue::from_static("veer-health-check"));
        let client = if target.h2 { &self.h2 } else { &self.h1 };
        let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(error_chain(&e)),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        };
        let status = resp.status();
        // Read the body (without keeping it) so the endpoint sees a complete exchange.
        let mut body = resp.into_body();
        let _ = tokio::time::timeout_at(deadline, async { while let Some(Ok(_)) = body.frame().await {} }).await;
        if status.is_success() { Ok(()) } else { Err(format!("answered {status}")) }
    }
}

/// Checks the endpoints of the current generation for as long as it runs (it is aborted at
/// drain). Costs one wake every 250 ms when no version has a `health_path`.
pub async fn run(data: Arc<DataPlane>) {
    let probes = Probes::new();
    let mut checker = Checker::new();
    let mut running = JoinSet::new();
    loop {
        for (target, timeout) in checker.plan(&data.snapshot(), Instant::now()) {
            let probes = probes.clone();
            running.spawn(async move {
                let result = probes.probe(&target, timeout).await;
                (target, result)
            });
        }
        let wake = tokio::time::Instant::from_std(checker.next_wake(Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((target, result)) = done {
                    checker.record(&data.snapshot(), &target, result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::telemetry::Telemetry;

    /// Route `a`: stable checked every 1 s on two endpoints, candidate unchecked. Route `b`:
    /// stable checked every 5 s on an endpoint it shares with `a`.
    const CHECKED: &str = r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "a"
path_prefix = "/a"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:1", "127.0.0.1:2"]
health_path = "/healthz"
health_interval = "1s"
[routes.candidate]
version = "v2"
endpoints = ["127.0.0.1:3"]

[[routes]]
name = "b"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:1"]
health_path = "/healthz"
"#;

    fn snapshot(src: &str, previous: Option<&Snapshot>) -> Snapshot {
        let config = Config::parse(Path::new("/nonexistent/veer.toml"), src).expect("valid config");
        let generation = previous.map_or(1, |p| p.generation + 1);
        Snapshot::build(Arc::new(config), previous, &Telemetry::new(), generation, None).expect("snapshot")
    }

    fn addrs(due: &[(Target, Duration)]) -> Vec<&str> {
        let mut a: Vec<&str> = due.iter().map(|(t, _)| t.addr.as_str()).collect();
        a.sort_unstable();
        a
    }

    #[test]
    fn checked_endpoints_are_probed_once_per_interval() {
        let snap = snapshot(CHECKED, None);
        let mut c = Checker::new();
        let t0 = Instant::now();
        let due = c.plan(&snap, t0);
        assert_eq!(addrs(&due), ["127.0.0.1:1", "127.0.0.1:2"], "the unchecked candidate is left alone");
        assert!(due.iter().all(|(t, timeout)| t.path == "/healthz" && !t.h2 && *timeout == Duration::from_secs(1)));
        assert!(c.plan(&snap, t0).is_empty(), "nothing is probed twice at once");
        for (t, _) in &due {
            c.record(&snap, t, Ok(()));
        }
        assert!(c.plan(&snap, t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(c.next_wake(t0), t0 + IDLE_WAKE, "nothing due sooner than the idle wake");
        assert_eq!(c.next_wake(t0 + Duration::from_millis(900)), t0 + Duration::from_secs(1));
        assert_eq!(addrs(&c.plan(&snap, t0 + Duration::from_secs(1))), ["127.0.0.1:1", "127.0.0.1:2"]);
    }

    #[test]
    fn results_eject_and_readmit_every_endpoint_they_cover_across_reloads() {
        let snap = snapshot(CHECKED, None);
        let mut c = Checker::new();
        let t0 = Instant::now();
        let due = c.plan(&snap, t0);
        let shared = due.iter().find(|(t, _)| t.addr == "127.0.0.1:1").map(|(t, _)| t.clone()).expect("target");
        let a = |s: &Snapshot| s.route("a").map(|r| r.stable.get(0).available()).expect("route a");
        let b = |s: &Snapshot| s.route("b").map(|r| r.stable.get(0).available()).expect("route b");

        c.record(&snap, &shared, Err("answered 503 Service Unavailable".into()));
        assert!(!a(&snap) && !b(&snap), "one failing check ejects the endpoint from every route using it");
        assert!(snap.route("a").is_some_and(|r| r.stable.get(1).available()));

        // A reload builds fresh endpoints; the next wake gives them the known result.
        let next = snapshot(CHECKED, Some(&snap));
        assert!(a(&next));
        assert!(c.plan(&next, t0 + Duration::from_millis(10)).is_empty(), "the schedule survives the reload");
        assert!(!a(&next) && !b(&next));

        // A passing check re-admits it and also ends a passive backoff.
        next.route("a").expect("route a").stable.get(0).connect_failed();
        let due = c.plan(&next, t0 + Duration::from_secs(1));
        assert!(due.iter().any(|(t, _)| *t == shared));
        c.record(&next, &shared, Ok(()));
        assert!(a(&next) && b(&next));
    }

    #[test]
    fn targets_no_longer_configured_are_forgotten() {
        let snap = snapshot(CHECKED, None);
        let mut c = Checker::new();
        let t0 = Instant::now();
        let due = c.plan(&snap, t0);
        let unchecked = CHECKED.replace("health_path = \"/healthz\"\n", "");
        let next = snapshot(&unchecked, Some(&snap));
        assert!(c.plan(&next, t0 + Duration::from_secs(10)).is_empty());
        assert!(c.targets.is_empty());
        // A late result for a forgotten target changes nothing.
        c.record(&next, &due[0].0, Err("refused".into()));
        assert!(next.route("a").is_some_and(|r| r.stable.endpoints().iter().all(Endpoint::available)));
    }
}
