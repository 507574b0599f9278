//! What a client connection may hold without doing anything: idle HTTP/2 connections (h2c and
//! TLS) are closed after `idle_timeout`, a half-sent HTTP/2 header block is cut at
//! `header_read_timeout`, HTTP/2 requests obey `max_headers`, and the admin listener has its
//! own timeouts, connection limit and `Host` check.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use veer::server::Proxy;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until the peer closes (or resets) the connection, within `within`; returns what it
/// sent. Panics if the connection is still open then.
async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: the connection is still open after {within:?}");
    got
}

/// The frame types in a server's byte stream.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

const GOAWAY: u8 = 7;

async fn h2_preface_only(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(PREFACE).await.expect("preface");
    s.write_all(&SETTINGS).await.expect("settings");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connections_get_a_goaway_and_free_their_slots() {
    let up = Upstream::text("stable").await;
    let server = "max_connections = 3\nidle_timeout = \"300ms\"\nheader_read_timeout = \"2s\"";
    let cfg = ConfigFile::new(&format!("{}{}", listeners(server, ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(h2_preface_only(proxy.http_addr()).await);
    }
    // Every slot is held by an idle HTTP/2 connection; they must be closed for this to pass.
    let got = get(&client(), proxy.http_addr(), "/").await;
    assert_eq!(got.status, StatusCode::OK);
    for (i, s) in idle.iter_mut().enumerate() {
        let bytes = read_until_closed(s, Duration::from_secs(10), &format!("idle connection {i}")).await;
        assert!(frame_types(&bytes).contains(&GOAWAY), "connection {i} is told GOAWAY: {:?}", frame_types(&bytes));
    }
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_idle_after_its_request_is_closed() {
    let up = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&format!("{}{}", listeners("idle_timeout = \"300ms\"", ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let stream = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2c");
    let conn = tokio::spawn(conn);
    let req = Request::get("http://app/").version(Version::HTTP_2).body(Empty::<Bytes>::new()).expect("req");
    let resp = send.send_request(req).await.expect("request");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the idle connection is closed by veer");
    assert!(started.elapsed() >= Duration::from_millis(200), "not before idle_timeout: {:?}", started.elapsed());
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_http2_header_block_is_cut_at_header_read_timeout() {
    let up = Upstream::text("stable").await;
    // A long idle_timeout: only the header deadline can end these connections.
    let server = "idle_timeout = \"60s\"\nheader_read_timeout = \"500ms\"";
    let cfg = ConfigFile::new(&format!("{}{}", listeners(server, ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let started = Instant::now();
    // A HEADERS frame that promises 100 bytes and sends 10.
    let mut partial = h2_preface_only(proxy.http_addr()).await;
    partial.write_all(&[0, 0, 100, 1, 0x4, 0, 0, 0, 1]).await.expect("frame header");
    partial.write_all(&[0x82; 10]).await.expect("some of the block");
    // A whole HEADERS frame without END_HEADERS, and no CONTINUATION.
    let mut unfinished = h2_preface_only(proxy.http_addr()).await;
    unfinished.write_all(&[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82]).await.expect("headers");
    // Half a frame header.
    let mut torn = h2_preface_only(proxy.http_addr()).await;
    torn.write_all(&[0, 0, 1, 1]).await.expect("half a frame header");
    for (s, what) in [(&mut partial, "partial HEADERS"), (&mut unfinished, "no CONTINUATION"), (&mut torn, "torn")] {
        read_until_closed(s, Duration::from_secs(10), what).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(400), "cut too early: {:?}", started.elapsed());
    // An idle connection that sent nothing of a request is left alone (idle_timeout is long).
    let mut quiet = h2_preface_only(proxy.http_addr()).await;
    let mut buf = [0u8; 256];
    let open = tokio::time::timeout(Duration::from_millis(1200), async {
        loop {
            match quiet.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(open.is_err(), "a quiet HTTP/2 connection is not cut by header_read_timeout");
    // The drain does not wait drain_timeout for a connection that ignores its GOAWAY.
    let started = Instant::now();
    assert!(proxy.drain().await, "drained");
    assert!(started.elapsed() < Duration::from_secs(10), "the drain took {:?}", started.elapsed());
    drop(quiet);
}

async fn h2_get<I>(io: I, headers: usize) -> StatusCode
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.expect("h2");
    tokio::spawn(conn);
    let mut req = Request::get("http://app/").version(Version::HTTP_2);
    for i in 0..headers {
        req = req.header(format!("x-h{i}"), "v");
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).expect("req")).await.expect("request");
    resp.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_obey_max_headers() {
    let up = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&format!("{}{}", listeners("max_headers = 10", ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let tcp = || TcpStream::connect(proxy.http_addr());
    assert_eq!(h2_get(tcp().await.expect("connect"), 5).await, StatusCode::OK);
    assert_eq!(h2_get(tcp().await.expect("connect"), 20).await, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.hits(), 1, "the refused request never reached the upstream");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_over_tls_is_closed_too() {
    let up = Upstream::text("stable").await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    let server = "tls_listen = \"127.0.0.1:0\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1s\"";
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, format!("{}{}", listeners(server, ""), route(up.addr, None, ""))).expect("config");
    let proxy = Proxy::start(&path).await.expect("start");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("trust the test certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = || async {
        let tcp = TcpStream::connect(proxy.tls_addr().expect("tls")).await.expect("connect");
        connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("TLS handshake")
    };
    // After the preface, and mid-HEADERS (cut at header_read_timeout).
    let mut preface_only = connect().await;
    preface_only.write_all(PREFACE).await.expect("preface");
    preface_only.write_all(&SETTINGS).await.expect("settings");
    preface_only.flush().await.expect("flush");
    let mut mid_headers = connect().await;
    mid_headers.write_all(PREFACE).await.expect("preface");
    mid_headers.write_all(&SETTINGS).await.expect("settings");
    mid_headers.write_all(&[0, 0, 100, 1, 0x4, 0, 0, 0, 1, 0x82]).await.expect("partial headers");
    mid_headers.flush().await.expect("flush");
    let bytes = read_until_closed(&mut preface_only, Duration::from_secs(10), "TLS, after the preface").await;
    assert!(frame_types(&bytes).contains(&GOAWAY), "{:?}", frame_types(&bytes));
    read_until_closed(&mut mid_headers, Duration::from_secs(10), "TLS, mid-HEADERS").await;
    // After a finished request.
    let tls = connect().await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
    let conn = tokio::spawn(conn);
    let req = Request::get("https://localhost/").body(Empty::<Bytes>::new()).expect("req");
    assert_eq!(send.send_request(req).await.expect("request").status(), 200);
    assert!(tokio::time::timeout(Duration::from_secs(10), conn).await.is_ok(), "TLS, after a request");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_has_a_connection_limit_and_header_timeout() {
    let up = Upstream::text("stable").await;
    let admin = "max_connections = 2\nheader_read_timeout = \"1500ms\"";
    let cfg = ConfigFile::new(&format!("{}{}", listeners("", admin), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(proxy.admin_addr()).await.expect("connect"));
    }
    // Both admin slots are taken: a third admin client waits...
    let c = client();
    let admin_addr = proxy.admin_addr();
    let waiting = tokio::spawn(async move { get(&c, admin_addr, "/healthz").await.status });
    // ...while the proxy listener is not affected at all.
    assert_eq!(get(&client(), proxy.http_addr(), "/").await.status, StatusCode::OK);
    assert!(!waiting.is_finished(), "a third admin connection was served beyond admin.max_connections = 2");
    // The idle ones are cut at the admin header_read_timeout, and the waiting one is served.
    for (i, s) in idle.iter_mut().enumerate() {
        read_until_closed(s, Duration::from_secs(10), &format!("idle admin connection {i}")).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1300), "cut too early: {:?}", started.elapsed());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served in time");
    assert_eq!(status.expect("task"), StatusCode::OK);
    proxy.drain().await;
}

fn with_host(
    method: &str,
    addr: SocketAddr,
    path: &str,
    host: &str,
    origin: Option<&str>,
) -> Request<http_body_util::Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}")).header("host", host);
    if let Some(o) = origin {
        b = b.header("origin", o);
    }
    b.body(Default::default()).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_admin_api_answers_only_to_loopback_host_names() {
    let (stable, candidate) = (Upstream::text("stable").await, Upstream::text("candidate").await);
    let cfg = ConfigFile::new(&format!(
        "{}{}",
        listeners("", "public_url = \"https://veer.example.com/\""),
        route(stable.addr, Some(candidate.addr), "[10, 50, 100]")
    ));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (c, admin) = (client(), proxy.admin_addr());
    let port = admin.port();
    let before = route_status(&c, admin, "web").await["phase"].clone();
    // A rebinding page: its Origin matches its Host, and its name resolves to 127.0.0.1.
    let evil = format!("rebind.evil:{port}");
    let origin = format!("http://{evil}");
    let got = send(&c, with_host("POST", admin, "/api/v1/routes/web/promote", &evil, Some(&origin))).await;
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST, "{}", got.text());
    let got = send(&c, with_host("GET", admin, "/api/v1/routes", &evil, None)).await;
    assert_eq!(got.status, StatusCode::MISDIRECTED_REQUEST, "reads are refused too: {}", got.text());
    assert_eq!(route_status(&c, admin, "web").await["phase"], before, "nothing changed");
    for host in
        [format!("localhost:{port}"), format!("127.0.0.1:{port}"), "[::1]".to_string(), "veer.example.com".into()]
    {
        let got = send(&c, with_host("GET", admin, "/healthz", &host, None)).await;
        assert_eq!(got.status, StatusCode::OK, "{host}: {}", got.text());
    }
    let local = format!("localhost:{port}");
    let got =
        send(&c, with_host("POST", admin, "/api/v1/routes/web/pause", &local, Some(&format!("http://{local}")))).await;
    assert_eq!(got.status, StatusCode::OK, "a same-origin call on a loopback name works: {}", got.text());
    proxy.drain().await;
}
