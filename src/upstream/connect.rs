//! Opening one connection to an endpoint: a permit of the endpoint's connection cap, then
//! TCP within the connect timeout. The stream and the permit travel together ([`Capped`]),
//! so a connection holds its slot for exactly as long as it is open, whoever closes it.
//!
//! This is the layer a TLS handshake would wrap: everything above it speaks HTTP over any
//! `hyper::rt::Read + Write`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

/// What every upstream connection is built with; read from `[server]` at start.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub connect_timeout: Duration,
    pub queue_timeout: Duration,
    pub max_connections: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// How long an idle HTTP/1.1 connection is kept for reuse.
    pub idle_timeout: Duration,
}

/// A request waited the whole request timeout for a free connection slot.
#[derive(Debug, thiserror::Error)]
#[error("{cap} connections to this endpoint are open already (server.max_connections_per_endpoint)")]
pub struct ConnectionCapFull {
    pub(super) cap: usize,
}

/// Why a request to an endpoint got no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// veer's own per-endpoint cap stayed full: never the endpoint's fault.
    #[error(transparent)]
    CapFull(#[from] ConnectionCapFull),
    /// The TCP connection could not be opened (refused, unreachable, out of descriptors).
    #[error("connecting to the endpoint failed")]
    Connect(#[source] io::Error),
    /// The TCP connection did not open within the connect timeout.
    #[error("connecting to the endpoint timed out")]
    ConnectTimeout,
    /// The connection opened but the HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with the endpoint failed")]
    Handshake(#[source] hyper::Error),
    /// The request was sent (or its connection broke) and no valid response head came back.
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
}

impl UpstreamError {
    /// True when no connection to the endpoint was obtained, so nothing of the request
    /// reached it (it may go to another endpoint).
    pub fn is_connect(&self) -> bool {
        !matches!(self, UpstreamError::Request(_))
    }

    /// True when the failure is veer's own connection cap being full.
    pub fn is_cap_full(&self) -> bool {
        matches!(self, UpstreamError::CapFull(_))
    }

    /// True when hyper refused the upstream's response head for its size.
    pub fn is_too_large(&self) -> bool {
        matches!(self, UpstreamError::Request(e) if e.is_parse_too_large())
    }
}

/// Opens a connection to `addr` that holds `permit` for its life.
pub(super) async fn open(addr: &str, s: &Settings, permit: OwnedSemaphorePermit) -> Result<Capped, UpstreamError> {
    let stream = match tokio::time::timeout(s.connect_timeout, tcp(addr)).await {
        Ok(r) => r.map_err(UpstreamError::Connect)?,
        Err(_) => return Err(UpstreamError::ConnectTimeout),
    };
    Ok(Capped { io: TokioIo::new(stream), _permit: permit })
}

/// TCP to the first address of `addr` that accepts, with Nagle off (requests and responses
/// are written whole) and keep-alive probes on. An IP address is used as it is; a name is
/// resolved by the system resolver on each new connection.
async fn tcp(addr: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match tcp_to(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the endpoint's name has no address")))
}

async fn tcp_to(a: SocketAddr) -> io::Result<TcpStream> {
    let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_keepalive(true)?;
    socket.set_nodelay(true)?;
    socket.connect(a).await
}

/// A TCP connection to an endpoint together with the permit it holds; dropping it (when
/// either side closes the connection) frees the permit.
#[derive(Debug)]
pub struct Capped {
    io: TokioIo<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl hyper::rt::Read for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
