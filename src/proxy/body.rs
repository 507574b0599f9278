//! Response bodies that record the request's outcome when they end.
//!
//! A request is only finished when its response body is: latency is measured to the last
//! byte, a reset halfway through is an error of the version, and a gRPC failure may only
//! show up in the trailers. [`Exchange`] is the in-flight accounting of one proxied request;
//! [`RecordingBody`] carries it along with the upstream body and settles it exactly once,
//! at the end of the stream, on an error, or (client gone) when hyper drops the body.
//! [`ClientBody`] goes the other way: it carries the client's request body upstream and
//! reports to an [`Upload`] how far it got and whether the client broke it, so that a
//! failure of the client is never taken for one of the version.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use crate::upstream::PooledBody;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::error::{self, Refusal};
use crate::policy::mirror::Fingerprint;
use crate::route_state::{Lane, Role};
use crate::snapshot::{Admission, Route};
use crate::stats::{Class, Outcome, Source};

/// One request in flight to one endpoint; records its outcome exactly once.
#[derive(Debug)]
pub struct Exchange {
    admission: Admission,
    role: Role,
    lane: Lane,
    endpoint: usize,
    counted: bool,
    start: Instant,
    upload: Option<Arc<Upload>>,
    settled: bool,
}

impl Exchange {
    /// Starts the accounting of a request that arrived at `start` and goes to `endpoint`,
    /// holding the route slot `admission` until it ends.
    pub fn begin(admission: Admission, role: Role, lane: Lane, endpoint: usize, start: Instant) -> Self {
        let pool = admission.route().pool(role);
        // In-flight counts only steer the choice between several endpoints.
        let counted = pool.endpoints().len() > 1;
        if counted {
            pool.get(endpoint).begin();
        }
        Exchange { admission, role, lane, endpoint, counted, start, upload: None, settled: false }
    }

    /// Measures latency from the end of `upload` (the client's streamed body) rather than
    /// from the request's arrival.
    pub fn watch_upload(&mut self, upload: Arc<Upload>) {
        self.upload = Some(upload);
    }

    /// The client's streamed body, when it is followed.
    pub fn upload(&self) -> Option<&Arc<Upload>> {
        self.upload.as_ref()
    }

    /// Measures latency from `at` (a buffered body was read in full then).
    pub fn measure_from(&mut self, at: Instant) {
        self.start = self.start.max(at);
    }

    /// The endpoint it went to.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// Moves the request to another endpoint of the same version (the first one refused the
    /// connection, so nothing was sent and nothing is recorded for it).
    pub fn move_to(&mut self, endpoint: usize) {
        if self.counted {
            let pool = self.route().pool(self.role);
            pool.get(self.endpoint).end();
            pool.get(endpoint).begin();
        }
        self.endpoint = endpoint;
    }

    /// When latency is measured from: the request's arrival, or the end of its buffered
    /// body.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Which counters it goes to.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Which version served it.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The route it belongs to.
    pub fn route(&self) -> &Arc<Route> {
        self.admission.route()
    }

    /// Records the version's answer now. Latency runs from the end of the request body.
    pub fn settle(&mut self, class: Class, fault: bool) {
        if !self.settled {
            self.settled = true;
            let from = self.upload.as_ref().map_or(self.start, |u| u.last_byte().max(self.start));
            let latency = from.elapsed();
            let outcome = Outcome { class, fault, latency, source: Source::Upstream };
            self.route().version(self.role).lane(self.lane).record(outcome);
        }
    }

    /// Records an end that is not the version's doing (veer's or the client's): counted
    /// under `source`, never judged.
    pub fn settle_local(&mut self, class: Class, source: Source) {
        if !self.settled {
            self.settled = true;
            self.route().version(self.role).lane(self.lane).record(Outcome::local(class, source));
        }
    }

    /// Records the end `refusal` says: a failure of the version is judged against it (as an
    /// error, whatever the status), veer's and the client's are counted under their source
    /// with the class of the answer the client gets, never judged. Gives `refusal` back, to
    /// be answered.
    pub fn settle_refusal(&mut self, refusal: Refusal) -> Refusal {
        if refusal.source() == Source::Upstream {
            self.settle(Class::Error, true);
        } else {
            self.settle_local(refusal.class(), refusal.source());
        }
        refusal
    }

    /// Ends the accounting (settled already) and hands the route slot on, to a retry.
    pub fn into_admission(mut self) -> Admission {
        self.settle_local(Class::Error, Source::Client);
        let route = self.route().clone();
        // A placeholder that frees nothing takes the slot's place in the dropped exchange.
        std::mem::replace(&mut self.admission, Admission::unbounded(route))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Dropped unsettled: the client went away before the end. Counted, never judged.
        self.settle_local(Class::Error, Source::Client);
        if self.counted {
            self.route().pool(self.role).get(self.endpoint).end();
        }
    }
}

/// How the client's streamed request body is going, shared between the body veer forwards
/// ([`ClientBody`]) and the attempt waiting for the upstream's answer, which reads it to tell
/// a client that failed from an upstream that did.
#[derive(Debug)]
pub struct Upload {
    origin: Instant,
    /// Microseconds from `origin` to the last byte received (or the end).
    last_us: AtomicU64,
    state: AtomicU8,
    /// The body is waiting for the client (rather than the upstream waiting on veer).
    waiting: AtomicBool,
}

const SENDING: u8 = 0;
const DONE: u8 = 1;
const MALFORMED: u8 = 2;
const GONE: u8 = 3;

impl Upload {
    /// A body that started arriving at `origin`.
    pub fn new(origin: Instant) -> Arc<Upload> {
        Arc::new(Upload {
            origin,
            last_us: AtomicU64::new(0),
            state: AtomicU8::new(SENDING),
            waiting: AtomicBool::new(false),
        })
    }

    /// When the last byte of the body arrived (the end, once it is done).
    pub fn last_byte(&self) -> Instant {
        self.origin + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }

    /// The whole body has been received.
    pub fn done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }

    /// The body was read while the upstream was still willing to take it, but the client
    /// sent nothing.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The client's failure, when the body failed on the client's side.
    pub fn failure(&self) -> Option<Refusal> {
        match self.state.load(Ordering::Acquire) {
            MALFORMED => Some(Refusal::BadBody),
            GONE => Some(Refusal::ClientGone),
            _ => None,
        }
    }

    fn progress(&self, state: u8) {
        let us = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
        if state != SENDING {
            self.state.store(state, Ordering::Release);
        }
    }
}

pin_project_lite::pin_project! {
    /// The client's request body on its way upstream, reporting its progress and its
    /// failures to an [`Upload`].
    #[derive(Debug)]
    pub struct ClientBody {
        #[pin]
        inner: Incoming,
        upload: Arc<Upload>,
    }
}

impl ClientBody {
    /// Wraps the client's body; `upload` follows it.
    pub fn new(inner: Incoming, upload: Arc<Upload>) -> ClientBody {
        ClientBody { inner, upload }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let Poll::Ready(polled) = this.inner.as_mut().poll_frame(cx) else {
            this.upload.waiting.store(true, Ordering::Relaxed);
            return Poll::Pending;
        };
        this.upload.waiting.store(false, Ordering::Relaxed);
        let state = match &polled {
            Some(Ok(_)) if !http_body::Body::is_end_stream(&*this.inner) => SENDING,
            Some(Ok(_)) | None => DONE,
            Some(Err(e)) => match error::client_body_fault(e) {
                Refusal::BadBody => MALFORMED,
                _ => GONE,
            },
        };
        this.upload.progress(state);
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reports a primary answer to a mirrored copy waiting to compare with it.
#[derive(Debug)]
pub struct Tap {
    tx: oneshot::Sender<Fingerprint>,
    crc: Option<crc32fast::Hasher>,
}

impl Tap {
    /// A tap sending to `tx`; with `digest`, the body's CRC32 is computed as it streams.
    pub fn new(tx: oneshot::Sender<Fingerprint>, digest: bool) -> Tap {
        Tap { tx, crc: digest.then(crc32fast::Hasher::new) }
    }

    /// Reports the primary answer's class (and digest, if computed).
    pub fn finish(self, class: Class) {
        let _ = self.tx.send(Fingerprint { class, digest: self.crc.map(|c| c.finalize()) });
    }
}

/// Why a response body veer streams to the client ended early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The upstream's body failed (reset, malformed).
    #[error("upstream response body failed")]
    Upstream(#[from] hyper::Error),
    /// The upstream sent no byte for `body_idle_timeout` while the client waited for one.
    #[error("upstream response body stalled")]
    Stalled,
}

pin_project_lite::pin_project! {
    /// An upstream response body that settles its [`Exchange`] when it ends, and gives up
    /// on an upstream that stalls for `body_idle_timeout`.
    pub struct RecordingBody {
        #[pin]
        inner: PooledBody,
        #[pin]
        idle: Sleep,
        idle_for: Duration,
        waiting: bool,
        exchange: Option<Exchange>,
        tap: Option<Tap>,
        class: Class,
        fault: bool,
        grpc: bool,
    }
}

impl RecordingBody {
    /// Wraps `inner`, the body of a response with status class `class`. `fault` is what the
    /// head already says (5xx, gRPC failure in headers); `grpc` means trailers are checked;
    /// the upstream may keep the client waiting for a byte for at most `idle_for`.
    pub fn new(
        inner: PooledBody,
        mut exchange: Exchange,
        (class, fault, grpc): (Class, bool, bool),
        idle_for: Duration,
        mut tap: Option<Tap>,
    ) -> Self {
        let exchange = if inner.is_end_stream() {
            exchange.settle(class, fault);
            if let Some(t) = tap.take() {
                t.finish(class);
            }
            None
        } else {
            Some(exchange)
        };
        let idle = tokio::time::sleep(idle_for);
        RecordingBody { inner, idle, idle_for, waiting: false, exchange, tap, class, fault, grpc }
    }
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(p) => {
                *this.waiting = false;
                p.map(|r| r.map_err(ResponseBodyError::from))
            }
            Poll::Pending => {
                // Only a wait the client sits through counts: while the client is not reading,
                // hyper does not poll, and that time is not the upstream's.
                if !*this.waiting {
                    *this.waiting = true;
                    this.idle.as_mut().reset(tokio::time::Instant::now() + *this.idle_for);
                }
                ready!(this.idle.as_mut().poll(cx));
                Some(Err(ResponseBodyError::Stalled))
            }
        };
        let (class, fault) = match &polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(Tap { crc: Some(crc), .. })) = (frame.data_ref(), this.tap.as_mut()) {
                    crc.update(data);
                }
                if *this.grpc
                    && let Some(t) = frame.trailers_ref()
                {
                    *this.fault |= grpc_fault(t);
                }
                if !this.inner.is_end_stream() {
                    return Poll::Ready(polled);
                }
                (*this.class, *this.fault)
            }
            Some(Err(_)) => (Class::Error, true),
            None => (*this.class, *this.fault),
        };
        if let Some(mut ex) = this.exchange.take() {
            ex.settle(class, fault);
        }
        if let Some(t) = this.tap.take() {
            t.finish(class);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC status codes that mean the server failed: UNKNOWN, DEADLINE_EXCEEDED,
/// UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
pub fn grpc_fault(headers: &HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|v| matches!(v.as_bytes(), b"2" | b"4" | b"12" | b"13" | b"14" | b"15"))
}

/// What the proxy answers with: a streamed upstream body or a short local one.
pub type ProxyBody = Either<RecordingBody, Full<Bytes>>;

/// A body generated by veer (errors, refusals).
pub fn local_body(b: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(b.into()))
}
