//! What can go wrong on the data plane, whose fault it is, and the answer it becomes.
//!
//! Every answer veer makes itself comes from one [`Refusal`]: the status code, the text, the
//! `source` it is counted under (a version, veer itself, or the client) and, for gRPC clients,
//! the `grpc-status` a gRPC client understands. Keeping the three together is what makes sure
//! that a client's mistake is never charged to a version, and that veer's own refusals are
//! counted at all.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, ProxyBody};
use crate::stats::{Class, Source};

/// nginx's "client closed request": the client went away before the answer.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// An exchange veer ends itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No route matches the host and path.
    #[error("no route for this host and path")]
    NoRoute,
    /// `CONNECT`: veer is not a forward proxy.
    #[error("CONNECT is not supported: this is a reverse proxy")]
    Connect,
    /// An absolute-form request line for another host than its `Host`.
    #[error("absolute-form request for another host: this is not a forward proxy")]
    ForeignHost,
    /// An HTTP/1.1 request without `Host`, or any HTTP/1 request with several.
    #[error("a request needs exactly one Host header")]
    BadHost,
    /// An HTTP/2 request with more header fields than `max_headers` (HTTP/1.1 ones are
    /// refused by hyper with the same limit).
    #[error("too many header fields")]
    TooManyHeaders,
    /// The client's assignment override is invalid.
    #[error("{0}")]
    BadOverride(String),
    /// The route holds `max_inflight` requests already.
    #[error("route is at max_inflight")]
    Shed,
    /// The version has no endpoint available (all backing off or failing their checks).
    #[error("no healthy endpoint")]
    NoEndpoint,
    /// veer ran out of a local resource (file descriptors, buffers, ports) reaching the
    /// upstream: veer's fault, not the endpoint's.
    #[error("proxy out of local resources")]
    Exhausted,
    /// Every connection `max_connections_per_endpoint` allows to the endpoint stayed busy
    /// for `request_timeout`: veer's own bound, not the endpoint's fault.
    #[error("too many connections to the upstream endpoint")]
    EndpointFull,
    /// The upstream answered 101 to a request that did not ask to switch protocols.
    #[error("upstream switched protocols unasked")]
    UnaskedSwitch,
    /// The upstream connection failed or broke before a response head.
    #[error("upstream connection failed")]
    UpstreamFailed,
    /// No response head within `request_timeout` of the end of the request body, or the
    /// upstream stopped reading the request body for `body_idle_timeout`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The client's request body is malformed (bad chunked framing, wrong length).
    #[error("malformed request body")]
    BadBody,
    /// The client sent no byte of its request body for `body_idle_timeout`.
    #[error("request body timed out")]
    BodyTimeout,
    /// The client closed or reset the connection before the answer.
    #[error("client closed the request")]
    ClientGone,
    /// veer's own state is inconsistent (should not happen).
    #[error("internal error")]
    Internal,
}

impl Refusal {
    /// The HTTP status of the plain answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::ForeignHost | Refusal::BadHost | Refusal::BadOverride(_) | Refusal::BadBody => {
                StatusCode::BAD_REQUEST
            }
            Refusal::Shed | Refusal::NoEndpoint | Refusal::Exhausted | Refusal::EndpointFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::TooManyHeaders => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::UpstreamFailed | Refusal::UnaskedSwitch => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::ClientGone => StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("a valid status code"),
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whose doing it is, as the `source` label counts it.
    pub fn source(&self) -> Source {
        match self {
            Refusal::UpstreamFailed | Refusal::UpstreamTimeout | Refusal::UnaskedSwitch => Source::Upstream,
            Refusal::NoRoute
            | Refusal::Shed
            | Refusal::NoEndpoint
            | Refusal::Exhausted
            | Refusal::EndpointFull
            | Refusal::Internal => Source::Proxy,
            Refusal::Connect
            | Refusal::ForeignHost
            | Refusal::BadHost
            | Refusal::TooManyHeaders
            | Refusal::BadOverride(_)
            | Refusal::BadBody
            | Refusal::BodyTimeout
            | Refusal::ClientGone => Source::Client,
        }
    }

    /// Whether the retry policy may re-send the request to stable. Only a failure of the
    /// version itself is: its connection broke, it timed out, it switched protocols unasked.
    /// veer's own shortages say nothing about the candidate (and would hit stable alike), and
    /// a client's mistake or departure is the same on any version.
    pub fn retryable(&self) -> bool {
        match self {
            Refusal::UpstreamFailed | Refusal::UpstreamTimeout | Refusal::UnaskedSwitch => true,
            Refusal::NoRoute
            | Refusal::Connect
            | Refusal::ForeignHost
            | Refusal::BadHost
            | Refusal::TooManyHeaders
            | Refusal::BadOverride(_)
            | Refusal::Shed
            | Refusal::NoEndpoint
            | Refusal::Exhausted
            | Refusal::EndpointFull
            | Refusal::BadBody
            | Refusal::BodyTimeout
            | Refusal::ClientGone
            | Refusal::Internal => false,
        }
    }

    /// The class it is counted under: that of the plain answer's status, also when a gRPC
    /// client gets it as HTTP 200.
    pub fn class(&self) -> Class {
        Class::of_status(self.status())
    }

    /// The gRPC status code a gRPC client gets instead.
    pub fn grpc_status(&self) -> u8 {
        match self {
            Refusal::ClientGone => 1, // CANCELLED
            Refusal::ForeignHost
            | Refusal::BadHost
            | Refusal::TooManyHeaders
            | Refusal::BadOverride(_)
            | Refusal::BadBody => 3, // INVALID_ARGUMENT
            Refusal::UpstreamTimeout | Refusal::BodyTimeout => 4, // DEADLINE_EXCEEDED
            Refusal::Shed | Refusal::EndpointFull => 8, // RESOURCE_EXHAUSTED
            Refusal::NoRoute | Refusal::Connect => 12, // UNIMPLEMENTED
            Refusal::Internal => 13,  // INTERNAL
            Refusal::NoEndpoint | Refusal::Exhausted | Refusal::UpstreamFailed | Refusal::UnaskedSwitch => 14, // UNAVAILABLE
        }
    }

    /// The answer: plain text, or for a gRPC request a trailers-only gRPC error (HTTP 200,
    /// `grpc-status`, `grpc-message`, no body).
    pub fn response(&self, grpc: bool) -> Response<ProxyBody> {
        if grpc {
            let mut r = Response::new(body::local_body(Bytes::new()));
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(u16::from(self.grpc_status())));
            // The messages are ASCII without '%', so they need no percent-encoding.
            if let Ok(m) = HeaderValue::from_str(&format!("veer: {self}")) {
                h.insert("grpc-message", m);
            }
            return r;
        }
        let mut r = Response::new(body::local_body(format!("veer: {self}\n")));
        *r.status_mut() = self.status();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if matches!(self, Refusal::BadBody | Refusal::BodyTimeout | Refusal::ClientGone) {
            // The rest of the request body is unread: the connection cannot carry another.
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// Whether `e` (or an error under it) says veer itself ran out of something: descriptors
/// (EMFILE, ENFILE), socket buffers (ENOBUFS), memory, local ports (EADDRNOTAVAIL). Such a
/// failure says nothing about the endpoint.
pub fn local_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return exhausted(io);
        }
        cur = err.source();
    }
    false
}

fn exhausted(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::AddrNotAvailable | ErrorKind::OutOfMemory) {
        return true;
    }
    // Linux errno values: EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL.
    cfg!(target_os = "linux") && matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 99))
}

/// What a failed read of the client's request body means: bad framing (400) or a client
/// that closed or reset the connection (499).
pub fn client_body_fault(e: &hyper::Error) -> Refusal {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return match io.kind() {
                ErrorKind::InvalidData | ErrorKind::InvalidInput => Refusal::BadBody,
                _ => Refusal::ClientGone,
            };
        }
        cur = err.source();
    }
    if e.is_parse() { Refusal::BadBody } else { Refusal::ClientGone }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_is_found_under_wrappers() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Wrapper(#[source] std::io::Error);
        let emfile = Wrapper(std::io::Error::from_raw_os_error(24));
        assert!(local_exhaustion(&emfile));
        assert!(local_exhaustion(&std::io::Error::from(std::io::ErrorKind::AddrNotAvailable)));
        let refused = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!local_exhaustion(&refused));
    }

    /// Every variant once. Kept whole by `row` below: a variant missing here has a row
    /// nobody checks, so add it here when adding it there.
    fn every() -> Vec<Refusal> {
        vec![
            Refusal::NoRoute,
            Refusal::Connect,
            Refusal::ForeignHost,
            Refusal::BadHost,
            Refusal::TooManyHeaders,
            Refusal::BadOverride("bad".into()),
            Refusal::Shed,
            Refusal::NoEndpoint,
            Refusal::Exhausted,
            Refusal::EndpointFull,
            Refusal::UnaskedSwitch,
            Refusal::UpstreamFailed,
            Refusal::UpstreamTimeout,
            Refusal::BadBody,
            Refusal::BodyTimeout,
            Refusal::ClientGone,
            Refusal::Internal,
        ]
    }

    /// What each variant must be: status, source, class, grpc-status, retryable. No wildcard
    /// arm, so a new variant does not compile until all five are decided for it.
    fn row(r: &Refusal) -> (u16, Source, Class, u8, bool) {
        use Class::{ClientError as C4, ServerError as C5};
        use Source::{Client, Proxy, Upstream};
        match r {
            Refusal::NoRoute => (404, Proxy, C4, 12, false),
            Refusal::Connect => (405, Client, C4, 12, false),
            Refusal::ForeignHost => (400, Client, C4, 3, false),
            Refusal::BadHost => (400, Client, C4, 3, false),
            Refusal::TooManyHeaders => (431, Client, C4, 3, false),
            Refusal::BadOverride(_) => (400, Client, C4, 3, false),
            Refusal::Shed => (503, Proxy, C5, 8, false),
            Refusal::NoEndpoint => (503, Proxy, C5, 14, false),
            Refusal::Exhausted => (503, Proxy, C5, 14, false),
            Refusal::EndpointFull => (503, Proxy, C5, 8, false),
            Refusal::UnaskedSwitch => (502, Upstream, C5, 14, true),
            Refusal::UpstreamFailed => (502, Upstream, C5, 14, true),
            Refusal::UpstreamTimeout => (504, Upstream, C5, 4, true),
            Refusal::BadBody => (400, Client, C4, 3, false),
            Refusal::BodyTimeout => (408, Client, C4, 4, false),
            Refusal::ClientGone => (499, Client, C4, 1, false),
            Refusal::Internal => (500, Proxy, C5, 13, false),
        }
    }

    #[test]
    fn every_variant_has_all_five_decided() {
        let all = every();
        let mut seen = std::collections::HashSet::new();
        for r in &all {
            assert!(seen.insert(std::mem::discriminant(r)), "{r:?} listed twice");
            let (status, source, class, grpc, retryable) = row(r);
            assert_eq!(r.status().as_u16(), status, "{r:?} status");
            assert_eq!(r.source(), source, "{r:?} source");
            assert_eq!(r.class(), class, "{r:?} class");
            assert_eq!(r.grpc_status(), grpc, "{r:?} grpc-status");
            assert_eq!(r.retryable(), retryable, "{r:?} retryable");
            let plain = r.response(false);
            assert_eq!(plain.status().as_u16(), status, "{r:?} plain answer");
            assert_eq!(plain.headers()["content-type"], "text/plain; charset=utf-8");
            let g = r.response(true);
            assert_eq!(g.status(), 200, "{r:?} gRPC answer");
            assert_eq!(g.headers()["grpc-status"], grpc.to_string().as_str(), "{r:?} gRPC answer");
            // Only the version's own failures are worth a second try elsewhere.
            assert_eq!(retryable, source == Source::Upstream, "{r:?}");
        }
    }

    #[test]
    fn each_refusal_is_counted_where_it_belongs() {
        assert_eq!(Refusal::NoEndpoint.source(), Source::Proxy);
        assert_eq!(Refusal::Exhausted.status(), 503);
        assert_eq!(Refusal::ClientGone.status().as_u16(), 499);
        assert_eq!(Refusal::ClientGone.class(), Class::ClientError);
        assert_eq!(Refusal::BodyTimeout.source(), Source::Client);
        assert_eq!(Refusal::UpstreamTimeout.source(), Source::Upstream);
    }

    #[test]
    fn grpc_clients_get_a_trailers_only_answer() {
        let r = Refusal::Shed.response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "veer: route is at max_inflight");
        assert!(http_body::Body::is_end_stream(r.body()));
        assert_eq!(Refusal::UpstreamTimeout.response(true).headers()["grpc-status"], "4");
        assert_eq!(Refusal::NoEndpoint.response(true).headers()["grpc-status"], "14");
        assert_eq!(Refusal::NoEndpoint.response(false).status(), 503);
    }
}
