//! Response bodies that record the request's outcome when they end.
//!
//! A request is only finished when its response body is: latency is measured to the last
//! byte, a reset halfway through is an error of the version, and a gRPC failure may only
//! show up in the trailers. [`Exchange`] is the in-flight accounting of one proxied request;
//! [`RecordingBody`] carries it along with the upstream body and settles it exactly once,
//! at the end of the stream, on an error, or (client gone) when hyper drops the body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::policy::mirror::Answer;
use crate::runtime::{Lane, Role};
use crate::snapshot::Route;
use crate::stats::{Class, Outcome};

/// One request in flight to one endpoint; records its outcome exactly once.
#[derive(Debug)]
pub struct Exchange {
    route: Arc<Route>,
    role: Role,
    lane: Lane,
    endpoint: usize,
    counted: bool,
    start: Instant,
    settled: bool,
}

impl Exchange {
    /// Starts the accounting of a request that arrived at `start` and goes to `endpoint`.
    pub fn begin(route: Arc<Route>, role: Role, lane: Lane, endpoint: usize, start: Instant) -> Self {
        let pool = route.pool(role);
        // In-flight counts only steer the choice between several endpoints.
        let counted = pool.endpoints().len() > 1;
        if counted {
            pool.get(endpoint).begin();
        }
        Exchange { route, role, lane, endpoint, counted, start, settled: false }
    }

    /// The endpoint it went to.
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// Moves the request to another endpoint of the same version (the first one refused the
    /// connection, so nothing was sent and nothing is recorded for it).
    pub fn move_to(&mut self, endpoint: usize) {
        if self.counted {
            let pool = self.route.pool(self.role);
            pool.get(self.endpoint).end();
            pool.get(endpoint).begin();
        }
        self.endpoint = endpoint;
    }

    /// When the request arrived.
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
        &self.route
    }

    /// Records the outcome now.
    pub fn settle(&mut self, class: Class, fault: bool) {
        if !self.settled {
            self.settled = true;
            let latency = self.start.elapsed();
            self.route.version(self.role).lane(self.lane).record(Outcome { class, fault, latency });
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Dropped unsettled: the client went away before the end. Counted, never judged.
        self.settle(Class::Error, false);
        if self.counted {
            self.route.pool(self.role).get(self.endpoint).end();
        }
        self.route.release();
    }
}

/// Reports a primary answer to a mirrored copy waiting to compare with it.
#[derive(Debug)]
pub struct Tap {
    tx: oneshot::Sender<Answer>,
    crc: Option<crc32fast::Hasher>,
}

impl Tap {
    /// A tap sending to `tx`; with `digest`, the body's CRC32 is computed as it streams.
    pub fn new(tx: oneshot::Sender<Answer>, digest: bool) -> Tap {
        Tap { tx, crc: digest.then(crc32fast::Hasher::new) }
    }

    /// Reports the primary answer's class (and digest, if computed).
    pub fn finish(self, class: Class) {
        let _ = self.tx.send(Answer { class, digest: self.crc.map(|c| c.finalize()) });
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that settles its [`Exchange`] when it ends.
    pub struct RecordingBody {
        #[pin]
        inner: Incoming,
        exchange: Option<Exchange>,
        tap: Option<Tap>,
        class: Class,
        fault: bool,
        grpc: bool,
    }
}

impl RecordingBody {
    /// Wraps `inner`, the body of a response with status class `class`. `fault` is what the
    /// head already says (5xx, gRPC failure in headers); `grpc` means trailers are checked.
    pub fn new(
        inner: Incoming,
        mut exchange: Exchange,
        class: Class,
        fault: bool,
        grpc: bool,
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
        RecordingBody { inner, exchange, tap, class, fault, grpc }
    }
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
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
