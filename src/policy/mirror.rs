//! Mirroring: a share of idempotent stable requests is copied to the candidate in the
//! background and the two answers are compared. While a blue-green candidate bakes at 100%
//! the direction turns: the same share of the candidate's requests is copied to stable, whose
//! answers are stable's side of the judge's comparison (there is no other stable traffic).
//!
//! The client only ever sees the primary's answer. Copies never slow the primary path: they run on
//! their own tasks, at most [`MAX_IN_FLIGHT`] at a time per route; when all slots are busy the
//! copy is dropped and counted (`class="dropped"`). Each mirrored answer is compared with the
//! primary one — status class always, and a CRC32 of the body with `compare_body` — and the
//! mismatch rate feeds the judge's `mirror_mismatch` rule. Mirrored outcomes are also what the
//! judge reads during a blue-green preview (the candidate's) and bake (stable's).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use metrics::Counter;
use tokio::sync::{Semaphore, oneshot};

use crate::config::MirrorConfig;
use crate::route_state::Role;
use crate::snapshot::Route;
use crate::split::Splitter;
use crate::stats::{Class, Outcome};
use crate::telemetry::{MIRROR_MISMATCHES, MIRRORED_TOTAL, Telemetry};
use crate::upstream::Clients;

/// Mirrored requests in flight per route at most.
pub const MAX_IN_FLIGHT: usize = 64;

/// What the mirrored copy's answer is compared on: the primary answer's status class and,
/// when bodies are compared, its body's CRC32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    /// Its status class.
    pub class: Class,
    /// CRC32 of its body, when bodies are compared.
    pub digest: Option<u32>,
}

/// A route's mirroring policy for one configuration generation.
#[derive(Debug)]
pub struct MirrorPolicy {
    weight_bp: u32,
    picker: Splitter,
    /// Compare body digests too.
    pub compare_body: bool,
    slots: Arc<Semaphore>,
    by_class: Vec<Counter>,
    dropped: Counter,
    mismatches: Counter,
}

/// A copy of a request on its way to the other version.
#[derive(Debug)]
pub struct Copy {
    to: Role,
    method: Method,
    path: Option<http::uri::PathAndQuery>,
    headers: HeaderMap,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl MirrorPolicy {
    /// The policy from `[routes.mirror]`.
    pub fn new(route: &str, cfg: &MirrorConfig, telemetry: &Telemetry) -> MirrorPolicy {
        let counter = |class: &str| telemetry.route_counter(MIRRORED_TOTAL, route, "class", class.to_string());
        MirrorPolicy {
            weight_bp: (cfg.percent * 100.0).round() as u32,
            picker: Splitter::new(),
            compare_body: cfg.compare_body,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            by_class: Class::ALL.iter().map(|c| counter(c.label())).collect(),
            dropped: counter("dropped"),
            mismatches: telemetry.route_total(MIRROR_MISMATCHES, route),
        }
    }

    /// A copy of this request for version `to`, if it is to be mirrored: an idempotent,
    /// bodyless request picked by the configured share, with a free slot (otherwise it is
    /// dropped and counted).
    pub fn copy(&self, to: Role, method: &Method, uri: &Uri, headers: &HeaderMap, body_is_empty: bool) -> Option<Copy> {
        let eligible = body_is_empty && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !(eligible && self.picker.pick_candidate(self.weight_bp)) {
            return None;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Copy {
                to,
                method: method.clone(),
                path: uri.path_and_query().cloned(),
                headers: headers.clone(),
                permit,
            }),
            Err(_) => {
                self.dropped.increment(1);
                None
            }
        }
    }
}

/// Sends `copy` to its version of `route`, records its outcome in that version's mirror
/// lane, and compares it with the primary answer when that arrives (the pair counts are the
/// candidate's either way: they measure how often the two versions disagree).
pub async fn run(
    route: Arc<Route>,
    clients: Clients,
    copy: Copy,
    primary: oneshot::Receiver<Fingerprint>,
    timeout: Duration,
) {
    let Some(policy) = route.policy.mirror.as_ref() else { return };
    let candidate = route.version(Role::Candidate).clone();
    let start = Instant::now();
    let answer = send(&route, &clients, &copy, policy.compare_body, timeout).await;
    drop(copy.permit);
    let fault = matches!(answer.class, Class::ServerError | Class::Error);
    route.version(copy.to).mirror.record(Outcome {
        class: answer.class,
        fault,
        latency: start.elapsed(),
        source: crate::stats::Source::Upstream,
    });
    policy.by_class[answer.class as usize].increment(1);
    if let Ok(Ok(primary)) = tokio::time::timeout(timeout, primary).await {
        candidate.mirror_pairs.compared.fetch_add(1, Ordering::Relaxed);
        if primary != answer {
            candidate.mirror_pairs.mismatched.fetch_add(1, Ordering::Relaxed);
            policy.mismatches.increment(1);
        }
    }
}

async fn send(route: &Route, clients: &Clients, copy: &Copy, compare_body: bool, timeout: Duration) -> Fingerprint {
    let failed = Fingerprint { class: Class::Error, digest: None };
    let pool = route.pool(copy.to);
    let Some(i) = pool.pick(None) else { return failed };
    let mut headers = copy.headers.clone();
    // As for the primary request: an HTTP/2 upstream gets the Host as `:authority`.
    let host = if pool.h2 { crate::headers::take_authority(&mut headers) } else { None };
    let uri =
        crate::upstream::request_target(pool.h2, host.as_ref().unwrap_or(&pool.get(i).authority), copy.path.as_ref());
    let mut req = Request::new(Either::Right(Full::<Bytes>::default()));
    *req.method_mut() = copy.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = if pool.h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let exchange = async {
        let connected = AtomicBool::new(false);
        let resp = pool.get(i).link(clients).send(req, pool.h2, &connected).await.ok()?;
        let class = Class::of_status(resp.status());
        let mut body = resp.into_body();
        let mut crc = crc32fast::Hasher::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.ok()?.into_data() {
                crc.update(&data);
            }
        }
        Some(Fingerprint { class, digest: compare_body.then(|| crc.finalize()) })
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten().unwrap_or(failed)
}
