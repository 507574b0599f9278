//! Protocol upgrades through the proxy: only the route's allowed protocols are passed on
//! (never `h2c`), and an upgraded tunnel counts against `max_connections` and drains.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use veer::server::Proxy;

/// An upstream that takes any upgrade it is offered (as an h2c-capable server would) and
/// otherwise answers `upgrade=<the Upgrade header it saw, or none>`.
async fn accepts_any_upgrade() -> Upstream {
    Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let upgrade = req.headers().get("upgrade").map(|v| v.to_str().unwrap_or("?").to_string());
        match upgrade {
            Some(proto) if proto == "h2c" || proto == "tunnel" => {
                let mut r = Response::new(full(""));
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut().insert("connection", "upgrade".parse().expect("value"));
                r.headers_mut().insert("upgrade", proto.parse().expect("value"));
                r
            }
            other => Response::new(full(format!("upgrade={}", other.as_deref().unwrap_or("none")))),
        }
    })
    .await
}

fn upgrade_request(addr: std::net::SocketAddr, proto: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}/x"))
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", proto)
        .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")
        .body(Full::default())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_never_forwarded_and_other_upgrades_only_when_listed() {
    let up = accepts_any_upgrade().await;
    let cfg = ConfigFile::new(&format!(
        "[[routes]]\nname = \"web\"\nupgrades = [\"websocket\", \"tunnel\"]\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{}\"]\n",
        up.addr
    ));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();

    let got = send(&c, upgrade_request(proxy.http_addr(), "h2c")).await;
    assert_eq!(got.status, StatusCode::OK, "an h2c upgrade is served as a plain request: {}", got.text());
    assert_eq!(got.text(), "upgrade=none", "the upstream never sees Upgrade: h2c");
    let got = send(&c, upgrade_request(proxy.http_addr(), "h2c, tunnel")).await;
    assert_eq!(got.text(), "upgrade=none", "an offer that includes h2c is not forwarded at all");
    let got = send(&c, upgrade_request(proxy.http_addr(), "other")).await;
    assert_eq!(got.text(), "upgrade=none", "a protocol the route does not list is not forwarded");

    // A listed protocol is passed on: the upstream switches, and the tunnel is the client's.
    let mut s = tokio::net::TcpStream::connect(proxy.http_addr()).await.expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: tunnel\r\n\r\n").await.expect("write");
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await.expect("answer").expect("read");
    assert_eq!(&head, b"HTTP/1.1 101", "{}", String::from_utf8_lossy(&head));
    drop(s);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_switches_protocols_unasked_is_a_502() {
    let up = Upstream::start(|_req| async move {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", "upgrade".parse().expect("value"));
        r.headers_mut().insert("upgrade", "h2c".parse().expect("value"));
        r
    })
    .await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    assert_eq!(get(&c, proxy.http_addr(), "/").await.status, StatusCode::BAD_GATEWAY);
    let got = send(&c, upgrade_request(proxy.http_addr(), "h2c")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "an h2c request must not become a tunnel either");
    proxy.drain().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open_ws(addr: std::net::SocketAddr) -> Ws {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(format!("ws://{addr}/chat"), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("websocket handshake through veer");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string())).await.expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("echo in time");
    assert_eq!(reply.expect("a reply").expect("a message").into_text().expect("text").as_str(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_tunnels_count_against_max_connections() {
    let up = ws_echo().await;
    let cfg = ConfigFile::new(&format!("{}{}", listeners("max_connections = 3", ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut tunnels = Vec::new();
    for i in 0..3 {
        let mut ws = open_ws(proxy.http_addr()).await;
        echo(&mut ws, &format!("t{i}")).await;
        tunnels.push(ws);
    }
    // Every slot is held by a tunnel: a fourth client waits in the backlog.
    let c = client();
    let addr = proxy.http_addr();
    let waiting = tokio::spawn(async move { get(&c, addr, "/").await.status });
    // A bounded wait for something that must not happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a request was served while three tunnels held every connection slot");
    let mut first = tunnels.remove(0);
    first.close(None).await.expect("close");
    while let Some(Ok(_)) = first.next().await {}
    // The tunnel (and its slot) lasts until the client's TCP connection closes.
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a tunnel ends");
    assert_eq!(status.expect("task"), StatusCode::OK);
    drop(tunnels);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_tunnels_run_until_drain_timeout_then_cuts_them() {
    let up = ws_echo().await;
    let cfg = ConfigFile::new(&format!("{}{}", listeners("drain_timeout = \"1500ms\"", ""), route(up.addr, None, "")));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    let mut ws = open_ws(addr).await;
    echo(&mut ws, "before").await;
    let started = Instant::now();
    let drain = tokio::spawn(proxy.drain());
    // The drain has begun once the listener is closed.
    eventually(Duration::from_secs(10), "the listener closes", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    echo(&mut ws, "while draining").await;
    assert!(!drain.is_finished(), "the drain must wait for the open tunnel");
    let finished = tokio::time::timeout(Duration::from_secs(20), drain).await.expect("drain ends").expect("task");
    assert!(!finished, "the drain timed out with a tunnel open");
    assert!(started.elapsed() >= Duration::from_millis(1400), "the tunnel ran until drain_timeout");
    // The tunnel is cut: the next read ends.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel is cut after drain_timeout");
}
