//! Hostile input and broken upstreams: request smuggling shapes, a reset halfway through a
//! response, and an upstream that does not speak HTTP.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer::server::Proxy;

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("veer answers and closes");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_are_refused() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    // Both framings: the chunked body wins (RFC 9112 §6.3), the connection closes after the
    // answer, and the request hidden behind it is never read.
    let both = raw(addr, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(both.contains("connection: close") && both.matches("HTTP/1.1").count() == 1, "{both:?}");
    assert_eq!(stable.hits(), 1, "only the outer request reached the upstream");
    let shapes: [&[u8]; 2] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n0\r\n\r\n",
    ];
    for shape in shapes {
        let answer = raw(addr, shape).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{:?} got {answer:?}", String::from_utf8_lossy(shape));
    }
    assert_eq!(stable.hits(), 1, "nothing ambiguous reached the upstream");
    assert_eq!(get(&client(), addr, "/").await.text(), "stable");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_is_a_truncated_response_and_an_error_of_the_version() {
    let stable = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial").await;
    let cfg = ConfigFile::new(&route(stable, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let resp = c.get(format!("http://{}/", proxy.http_addr()).parse().expect("uri")).await.expect("head arrives");
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await.expect("body ends");
    assert!(body.is_err(), "the client must see the truncation as an error, not a short success");
    eventually(Duration::from_secs(5), "the stable version is charged the error", || async {
        let st = route_status(&c, proxy.admin_addr(), "web").await;
        st["stable"]["window"]["errors"] == 1
    })
    .await;
    let metrics = get(&c, proxy.admin_addr(), "/metrics").await.text();
    assert!(
        metrics.contains(
            r#"veer_requests_total{route="web",role="stable",version="v1",class="error",source="upstream"} 1"#
        ),
        "{metrics}"
    );
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_speak_http_is_a_502() {
    let stable = raw_upstream(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let cfg = ConfigFile::new(&route(stable, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let got = get(&client(), proxy.http_addr(), "/").await;
    assert_eq!(got.status, 502);
    proxy.drain().await;
}
