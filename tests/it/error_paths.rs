//! What clients see when things go wrong: 404, 502, 503, 504 and malformed requests.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer::server::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let stable = Upstream::text("stable").await;
    let body = format!(
        "[[routes]]\nname = \"shop\"\nhosts = [\"shop.example\"]\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{}\"]\n",
        stable.addr
    );
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let req = |host: &str| {
        http::Request::get(format!("http://{}/", proxy.http_addr()))
            .header("host", host)
            .body(Default::default())
            .expect("req")
    };
    let got = send(&c, req("evil.example")).await;
    assert_eq!(got.status, 404);
    assert!(got.text().contains("no route"), "{}", got.text());
    assert_eq!(send(&c, req("shop.example")).await.text(), "stable");
    assert_eq!(stable.hits(), 1, "an unknown host never reaches an upstream");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_then_503_while_the_endpoint_backs_off() {
    let dead = refused_addr();
    let cfg = ConfigFile::new(&route(dead, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let first = get(&c, proxy.http_addr(), "/").await;
    assert_eq!(first.status, 502);
    assert!(first.text().contains("upstream"), "{}", first.text());
    let second = get(&c, proxy.http_addr(), "/").await;
    assert_eq!(second.status, 503);
    assert!(second.text().contains("no healthy endpoint"), "{}", second.text());
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_skipped_for_the_others() {
    let live = Upstream::text("live").await;
    let dead = refused_addr();
    let body = format!(
        "[[routes]]\nname = \"web\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{dead}\", \"{}\"]\n",
        live.addr
    );
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    for i in 0..40 {
        let got = get(&c, proxy.http_addr(), "/").await;
        assert_eq!(got.status, 200, "request {i}: bodyless requests move to a live endpoint");
    }
    assert_eq!(live.hits(), 40);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_at_request_timeout() {
    let slow = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Response::new(full("late"))
    })
    .await;
    let body = format!("{}{}", listeners("request_timeout = \"300ms\"", ""), route(slow.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let started = std::time::Instant::now();
    let got = get(&c, proxy.http_addr(), "/").await;
    assert_eq!(got.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_sheds_with_503() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let slow = Upstream::start(move |_| {
        let mut rx = release_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
            Response::new(full("done"))
        }
    })
    .await;
    let body = RouteFixture::stable_only(slow.addr).route_key("max_inflight", "1").toml();
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let addr = proxy.http_addr();
    let c1 = c.clone();
    let first = tokio::spawn(async move { get(&c1, addr, "/").await });
    eventually(Duration::from_secs(5), "first request reaches the upstream", || async { slow.hits() == 1 }).await;
    let shed = get(&c, addr, "/").await;
    assert_eq!(shed.status, 503);
    release_tx.send(true).expect("release");
    assert_eq!(first.await.expect("first").status, 200);
    assert_eq!(get(&c, addr, "/").await.status, 200, "the slot is free again");
    proxy.drain().await;
}

async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("proxy answers and closes");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    let bad_line = raw_exchange(addr, b"GARBAGE / HTTP/9.9\r\n\r\n").await;
    assert!(bad_line.starts_with("HTTP/1.1 400"), "{bad_line:?}");
    let bad_header = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n").await;
    assert!(bad_header.starts_with("HTTP/1.1 400"), "{bad_header:?}");
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "a".repeat(200 * 1024));
    let too_big = raw_exchange(addr, huge.as_bytes()).await;
    assert!(too_big.starts_with("HTTP/1.1 431"), "{:?}", &too_big[..too_big.len().min(80)]);
    assert_eq!(stable.hits(), 0);
    assert_eq!(get(&client(), addr, "/").await.text(), "stable");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_at_header_read_timeout() {
    let (text, hits) = closed_after_header_read_timeout(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert_eq!(hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_speaks_is_cut_at_header_read_timeout() {
    let (text, hits) = closed_after_header_read_timeout(b"").await;
    assert!(text.is_empty(), "{text:?}");
    assert_eq!(hits, 0);
}

/// hyper has no separate keep-alive idle timeout: `header_read_timeout` is it
/// (docs/traffic-policies.md, listeners).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_header_read_timeout() {
    let (text, hits) = closed_after_header_read_timeout(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.ends_with("stable"), "{text:?}");
    assert_eq!(hits, 1);
}

/// Sends `sent` on a fresh connection to a proxy with a 300 ms `header_read_timeout`, and
/// returns what came back once veer closed the connection (no earlier than ~the timeout)
/// and how many requests reached the upstream.
async fn closed_after_header_read_timeout(sent: &[u8]) -> (String, usize) {
    let stable = Upstream::text("stable").await;
    let body = format!("{}{}", listeners("header_read_timeout = \"300ms\"", ""), route(stable.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    s.write_all(sent).await.expect("write");
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("veer closes the connection");
    assert!(n.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", started.elapsed());
    let hits = stable.hits();
    proxy.drain().await;
    (String::from_utf8_lossy(&buf).into_owned(), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_needs_the_admin_token_when_one_is_configured() {
    let stable = Upstream::text("stable").await;
    let cfg =
        ConfigFile::new(&format!("{}{}", listeners("", "token_file = \"admin.token\""), route(stable.addr, None, "")));
    std::fs::write(cfg.dir.path().join("admin.token"), "s3cret\n").expect("token");
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let admin = proxy.admin_addr();
    assert_eq!(post(&c, admin, "/api/v1/reload", &[]).await.status, 401);
    assert_eq!(post(&c, admin, "/api/v1/reload", &[("authorization", "Bearer wrong")]).await.status, 401);
    assert_eq!(post(&c, admin, "/api/v1/reload", &[("authorization", "Bearer s3cret")]).await.status, 200);
    assert_eq!(get(&c, admin, "/api/v1/routes").await.status, 200, "reads need no token");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veer_is_never_an_open_proxy() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    let connect =
        raw_exchange(addr, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n")
            .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect:?}");
    let foreign =
        raw_exchange(addr, b"GET http://evil.example/ HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
            .await;
    assert!(foreign.starts_with("HTTP/1.1 400"), "{foreign:?}");
    let same =
        raw_exchange(addr, b"GET http://shop.example/x HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
            .await;
    assert!(same.starts_with("HTTP/1.1 200") && same.ends_with("stable"), "{same:?}");
    assert_eq!(stable.hits(), 1, "only the well-formed request reached the upstream");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_pauses_accept_instead_of_failing() {
    let stable = Upstream::text("stable").await;
    let body = format!("{}{}", listeners("max_connections = 2", ""), route(stable.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    // Two idle keep-alive connections take both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.expect("answer");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third connection is accepted by the kernel but not served while both slots are taken.
    let mut third =
        tokio::spawn(
            async move { raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await },
        );
    // A bounded look for something that must not happen.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut third).await;
    assert!(early.is_err(), "the third connection was served while two were held");
    drop(held.pop());
    let answer =
        tokio::time::timeout(Duration::from_secs(5), third).await.expect("served once a slot frees").expect("join");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    proxy.drain().await;
}
