//! Protocols through the proxy: WebSocket upgrade, cleartext HTTP/2, HTTPS with ALPN.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;
use veer::server::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through() {
    let up = ws_echo().await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let tcp = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/chat", proxy.http_addr()), tcp)
        .await
        .expect("websocket handshake through veer");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let echoed = ws.next().await.expect("a reply").expect("a message");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    ws.close(None).await.expect("close");
    // An open tunnel holds its connection slot, and a drain waits for it.
    drop(ws);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_is_served() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        // The upstream speaks HTTP/1.1 to veer; report what it saw.
        let host = req.headers().get("host").map(|h| h.to_str().unwrap_or("").to_string()).unwrap_or_default();
        Response::new(full(format!("{:?} host={host}", req.version())))
    })
    .await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    // Connect by address and send an authority of our choosing, as an h2 client behind DNS would.
    let stream = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2c handshake");
    tokio::spawn(conn);
    let req =
        http::Request::get("http://app.example/x").version(Version::HTTP_2).body(Empty::<Bytes>::new()).expect("req");
    let resp = send.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "HTTP/1.1 host=app.example", "the :authority becomes the upstream Host");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_preface_that_arrives_in_pieces_is_still_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    s.write_all(&preface[..10]).await.expect("first piece");
    // A pause, not a synchronisation: it lets the first piece arrive on its own, so that veer
    // sees a prefix of the preface that cannot tell the protocol yet.
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&preface[10..]).await.expect("second piece");
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.expect("settings");
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await.expect("answer in time").expect("read");
    assert_eq!(head[3], 4, "veer answers with an HTTP/2 SETTINGS frame, not an HTTP/1.1 error: {head:?}");
    drop(s);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_h2_and_http1() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let proto =
            req.headers().get("x-forwarded-proto").map(|v| v.to_str().unwrap_or("").to_string()).unwrap_or_default();
        Response::new(full(proto))
    })
    .await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).expect("write key");
    let body = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        route(up.addr, None, "")
    );
    let path = dir.path().join("veer.toml");
    std::fs::write(&path, body).expect("write config");
    let proxy = Proxy::start(&path).await.expect("start");
    let tls_addr = proxy.tls_addr().expect("tls listener");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("trust the test certificate");
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(tls_addr).await.expect("connect");
        let tls =
            connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = TokioIo::new(tls);
        let resp = if alpn == b"h2" {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2");
            tokio::spawn(conn);
            send.send_request(http::Request::get("https://localhost/").body(Full::<Bytes>::default()).expect("req"))
                .await
                .expect("h2 request")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
            tokio::spawn(conn);
            send.send_request(
                http::Request::get("/").header("host", "localhost").body(Full::<Bytes>::default()).expect("req"),
            )
            .await
            .expect("h1 request")
        };
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "https", "X-Forwarded-Proto says https");
    }
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_rewritten() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let mut seen: Vec<String> =
            req.headers().iter().map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?"))).collect();
        seen.sort();
        let mut r = Response::new(full(seen.join("\n")));
        r.headers_mut().insert("keep-alive", "timeout=5".parse().expect("value"));
        r.headers_mut().insert("x-app", "yes".parse().expect("value"));
        r
    })
    .await;
    let body = format!("{}{}", listeners("expose_role_header = true", ""), route(up.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let req = http::Request::get(format!("http://{}/h", proxy.http_addr()))
        .header("host", "shop.example")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-authorization", "Basic abc")
        .header("x-forwarded-for", "10.9.9.9")
        .body(Full::<Bytes>::default())
        .expect("req");
    let got = send(&client(), req).await;
    let seen = got.text();
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"host=shop.example"), "{seen}");
    assert!(lines.contains(&"x-forwarded-for=10.9.9.9, 127.0.0.1"), "{seen}");
    assert!(lines.contains(&"x-forwarded-host=shop.example"), "{seen}");
    assert!(lines.contains(&"x-forwarded-proto=http"), "{seen}");
    assert!(!seen.contains("x-private") && !seen.contains("proxy-authorization"), "{seen}");
    assert_eq!(got.headers["x-veer-role"], "stable");
    assert_eq!(got.headers["x-app"], "yes");
    assert!(!got.headers.contains_key("keep-alive"), "hop-by-hop response headers are stripped");
    proxy.drain().await;
}

/// Reads one HTTP/1.1 response with a `content-length` from `s`, keeping what follows it in
/// `buf`; returns its status line and body.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return (head.lines().next().unwrap_or("").to_string(), body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("a response in time").expect("read");
        assert!(n > 0, "the connection closed mid-response: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A keep-alive connection gives back its buffers whenever it waits for the next request
/// (see `vendor/README.md`): requests after such a wait, a head that arrives in pieces and
/// outgrows the first buffer, and pipelined requests are all still read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_reads_every_request_after_waiting_between_them() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let big = req.headers().get("x-big").map_or(0, |v| v.len());
        Response::new(full(format!("{} {big}", req.uri().path())))
    })
    .await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let mut buf = Vec::new();
    for i in 0..3 {
        s.write_all(format!("GET /plain{i} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes()).await.expect("write");
        let (status, body) = read_response(&mut s, &mut buf).await;
        assert_eq!((status.as_str(), body), ("HTTP/1.1 200 OK", format!("/plain{i} 0")));
    }
    // A 12 KiB head, sent in two pieces: more than the 8 KiB a released buffer starts with.
    let big = "b".repeat(12 * 1024);
    let head = format!("GET /big HTTP/1.1\r\nHost: app\r\nx-big: {big}\r\n\r\n");
    let (first, rest) = head.as_bytes().split_at(5000);
    s.write_all(first).await.expect("write");
    s.flush().await.expect("flush");
    tokio::task::yield_now().await;
    s.write_all(rest).await.expect("write");
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status.as_str(), body), ("HTTP/1.1 200 OK", format!("/big {}", big.len())));
    // Two pipelined requests in one write.
    s.write_all(b"GET /p1 HTTP/1.1\r\nHost: app\r\n\r\nGET /p2 HTTP/1.1\r\nHost: app\r\n\r\n").await.expect("write");
    for path in ["/p1", "/p2"] {
        let (status, body) = read_response(&mut s, &mut buf).await;
        assert_eq!((status.as_str(), body), ("HTTP/1.1 200 OK", format!("{path} 0")));
    }
    drop(s);
    proxy.drain().await;
}
