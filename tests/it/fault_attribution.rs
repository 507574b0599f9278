//! Whose fault it was: a client's broken, stalled or abandoned upload, veer's own shortages and
//! refusals are counted under their own `source` and never judged against a version.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer::route_state::{Lane, Role};
use veer::server::Proxy;
use veer::stats::{Class, Source, Totals};

/// An upstream that reads the whole request body, then answers 200 with its length.
async fn reader() -> Upstream {
    Upstream::start(|req| async move {
        match req.into_body().collect().await {
            Ok(b) => Response::new(full(format!("read {}", b.to_bytes().len()))),
            Err(_) => Response::new(full("body failed")),
        }
    })
    .await
}

/// A route whose candidate gets all ordinary traffic (steps = [100]), with extra `[server]`
/// keys.
fn all_to_candidate(server_keys: &str, stable: SocketAddr, cand: SocketAddr) -> String {
    format!("{}{}", listeners(server_keys, ""), route(stable, Some(cand), "[100]"))
}

/// The judged counters of `role` on route `web`.
fn judged(proxy: &Proxy, role: Role) -> Totals {
    let snap = proxy.operations().snapshot();
    let route = snap.route("web").expect("route web");
    route.version(role).lane(Lane::Judged).totals()
}

/// Waits until `role` has `n` client-caused outcomes (the exchange settles when hyper drops
/// it, a moment after the client sees the end).
async fn client_faults(proxy: &Proxy, role: Role, n: u64) -> Totals {
    eventually(Duration::from_secs(10), "the client's fault is counted", || async {
        judged(proxy, role).by_source(Source::Client).iter().sum::<u64>() >= n
    })
    .await;
    judged(proxy, role)
}

/// Writes `head` then reads the answer until the proxy closes (10 s at most).
async fn read_answer(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn post_head(addr: SocketAddr, framing: &str) -> String {
    format!("POST /upload HTTP/1.1\r\nHost: {addr}\r\n{framing}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_a_400_of_the_client() {
    let (stable, cand) = (reader().await, reader().await);
    let cfg = ConfigFile::new(&all_to_candidate("", stable.addr, cand.addr));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let mut req = post_head(proxy.http_addr(), "Transfer-Encoding: chunked\r\n");
    req.push_str("5\r\nhello\r\nzz-not-hex\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let t = client_faults(&proxy, Role::Candidate, 1).await;
    assert_eq!(t.faults, 0, "a client's bad framing is never the version's error");
    assert_eq!(t.requests(), 0, "nor is it one of the version's answers");
    assert_eq!(t.by_source(Source::Client)[Class::ClientError as usize], 1);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_mid_upload_are_never_held_against_the_version() {
    let (stable, cand) = (reader().await, reader().await);
    let cfg = ConfigFile::new(&all_to_candidate("", stable.addr, cand.addr));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    for i in 0..10 {
        let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
        let req = post_head(proxy.http_addr(), "Content-Length: 100000\r\n");
        s.write_all(req.as_bytes()).await.expect("write head");
        s.write_all(&[b'x'; 1000]).await.expect("write part");
        // The body has reached the upstream before the client leaves.
        eventually(Duration::from_secs(10), "upload reaches the upstream", || async { cand.hits() > i }).await;
        drop(s);
    }
    let t = client_faults(&proxy, Role::Candidate, 10).await;
    assert_eq!(t.faults, 0, "hang-ups are the client's: {t:?}");
    assert_eq!(t.requests(), 0);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_past_body_idle_timeout_is_a_408_of_the_client() {
    let (stable, cand) = (reader().await, reader().await);
    // request_timeout is longer than the stall: only body_idle_timeout can end it in time.
    let keys = "body_idle_timeout = \"300ms\"\nrequest_timeout = \"20s\"";
    let cfg = ConfigFile::new(&all_to_candidate(keys, stable.addr, cand.addr));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    let req = post_head(proxy.http_addr(), "Content-Length: 100\r\n");
    s.write_all(req.as_bytes()).await.expect("write head");
    s.write_all(b"0123456789").await.expect("write part");
    let started = Instant::now();
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
    let t = client_faults(&proxy, Role::Candidate, 1).await;
    assert_eq!((t.faults, t.requests()), (0, 0), "{t:?}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_complete_upload_is_not_the_versions_latency() {
    let (stable, cand) = (reader().await, reader().await);
    // Each piece comes well within body_idle_timeout, the whole upload takes longer than
    // request_timeout: neither may end it, and the version answers at once when it is in.
    let keys = "body_idle_timeout = \"5s\"\nrequest_timeout = \"400ms\"";
    let cfg = ConfigFile::new(&all_to_candidate(keys, stable.addr, cand.addr));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let pieces = 6;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
    let body = http_body_util::StreamBody::new(tokio_stream(rx));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{}/upload", proxy.http_addr()))
        .header("content-length", (pieces * 10).to_string())
        .body(body)
        .expect("request");
    let feeder = tokio::spawn(async move {
        for _ in 0..pieces {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"0123456789")))).await.is_err() {
                return;
            }
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
        .await
        .expect("answer within 15 s")
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&text[..], b"read 60");
    feeder.await.expect("feeder");
    let t = judged(&proxy, Role::Candidate);
    assert_eq!((t.requests(), t.faults), (1, 0), "{t:?}");
    let p99 = veer::stats::window::Latency(&t.latency).quantile_us(0.99).expect("one latency");
    assert!(p99 < 400_000, "the version's latency is counted from the end of the upload: {p99} µs");
    proxy.drain().await;
}

/// A stream of frames from a channel (no extra crate for one adapter).
fn tokio_stream<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_veer_makes_itself_are_counted_with_source_proxy() {
    let dead = refused_addr();
    let body = format!(
        "{}\n[[routes]]\nname = \"shop\"\nhosts = [\"shop.example\"]\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{dead}\"]\n",
        listeners("", "")
    );
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let req = |host: &str| {
        http::Request::get(format!("http://{}/", proxy.http_addr()))
            .header("host", host)
            .body(Full::default())
            .expect("req")
    };
    assert_eq!(send(&c, req("shop.example")).await.status, 502, "the endpoint refuses");
    for _ in 0..5 {
        assert_eq!(send(&c, req("shop.example")).await.status, 503, "it backs off: veer answers");
    }
    assert_eq!(send(&c, req("nowhere.example")).await.status, 404);
    let text = get(&c, proxy.admin_addr(), "/metrics").await.text();
    let has = |line: &str| assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    has(r#"veer_requests_total{route="shop",role="stable",version="v1",class="error",source="upstream"} 1"#);
    has(r#"veer_requests_total{route="shop",role="stable",version="v1",class="5xx",source="proxy"} 5"#);
    has(r#"veer_requests_total{route="",role="",version="",class="4xx",source="proxy"} 1"#);
    let c2 = c.clone();
    let admin = proxy.admin_addr();
    eventually(Duration::from_secs(10), "status shows veer's own answers apart", || {
        let c = c2.clone();
        async move {
            let w = route_status(&c, admin, "shop").await["stable"]["window"].clone();
            w["proxy_answers"] == 5 && w["errors"] == 1 && w["requests"] == 1
        }
    })
    .await;
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_frees_its_max_inflight_slot_once() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::status(500, "boom").await;
    let body = RouteFixture::new(stable.addr, cand.addr)
        .steps("[100]")
        .route_key("max_inflight", "1")
        .append("\n[routes.retry]\non_candidate_failure = true\nbudget = 1.0\n")
        .toml();
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    for i in 0..4 {
        let got = get(&c, proxy.http_addr(), "/").await;
        assert_eq!(got.status, 200, "request {i}: {}", got.text());
        assert_eq!(got.text(), "stable");
    }
    let snap = proxy.operations().snapshot();
    let route = snap.route("web").expect("route");
    eventually(Duration::from_secs(5), "every slot is free", || async { route.inflight() == 0 }).await;
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_grpc_shaped_errors() {
    let dead = refused_addr();
    let cfg = ConfigFile::new(&route(dead, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let call = || {
        http::Request::post(format!("http://{}/pkg.Svc/Call", proxy.http_addr()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("req")
    };
    let first = send(&h2, call()).await;
    assert_eq!(first.status, 200, "gRPC errors travel as HTTP 200");
    assert_eq!(first.headers["content-type"], "application/grpc");
    assert_eq!(first.headers["grpc-status"], "14", "502: UNAVAILABLE");
    assert!(first.headers["grpc-message"].to_str().expect("ascii").contains("upstream"));
    assert!(first.body.is_empty(), "trailers-only");
    let second = send(&h2, call()).await;
    assert_eq!(second.headers["grpc-status"], "14", "503 no endpoint: UNAVAILABLE");
    // Plain clients still get plain answers.
    assert_eq!(get(&client(), proxy.http_addr(), "/").await.status, 503);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_need_exactly_one_host() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let addr = proxy.http_addr();
    let exchange = |bytes: &'static [u8]| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        read_answer(&mut s).await
    };
    let none = exchange(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none:?}");
    let two = exchange(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n").await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two:?}");
    let old = exchange(b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(old.contains(" 200 OK") && old.ends_with("stable"), "HTTP/1.0 may omit Host: {old:?}");
    let one = exchange(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one:?}");
    assert_eq!(stable.hits(), 2);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_veers_503_and_no_endpoint_backs_off() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let Some(veer) = spawn_limited(&cfg.path, 64) else {
        skip_unless_required("VEER_REQUIRE_PRLIMIT", "running_out_of_descriptors", "prlimit is not installed");
        return;
    };
    let pid = veer.pid();
    // Descriptors numbered below the limit (inherited ones above it leave no room).
    let fds = || {
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("proc fd");
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter(|&fd| fd < 64).count()
    };
    // Idle client connections take descriptors until veer has none left.
    let mut held = Vec::new();
    let mut last = fds();
    for _ in 0..200 {
        if last >= 64 {
            break;
        }
        held.push(TcpStream::connect(veer.http).await.expect("connect"));
        let before = last;
        // Accepted, or stuck in the backlog because accept failed: either way, settled.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fds() == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        last = fds();
    }
    assert!(last >= 64, "veer should be out of descriptors, has {last}");
    // The first held connection was accepted: its request needs an upstream connection veer
    // cannot open.
    let mut s = held.remove(0);
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", stable.addr).as_bytes())
        .await
        .expect("write");
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("out of local resources"), "{answer:?}");
    drop(s);
    drop(held);
    // Descriptors back: the endpoint never backed off, so the very next request reaches it.
    eventually(Duration::from_secs(10), "veer has descriptors again", || async { fds() < 32 }).await;
    let c = client();
    let got = get(&c, veer.http, "/").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let text = get(&c, veer.admin, "/metrics").await.text();
    assert!(
        text.contains(r#"veer_requests_total{route="web",role="stable",version="v1",class="5xx",source="proxy"} 1"#),
        "{text}"
    );
    assert!(!text.contains(r#"class="error",source="upstream"} 1"#), "not the version's error: {text}");
}

/// Spawns veer, then lowers its `RLIMIT_NOFILE` to `limit` (with `prlimit`); `None` when
/// prlimit is missing.
fn spawn_limited(config: &std::path::Path, limit: u32) -> Option<Veer> {
    let have = std::process::Command::new("prlimit").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        return None;
    }
    let veer = Veer::spawn(config);
    let set = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", veer.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(set.success(), "prlimit failed");
    Some(veer)
}

static CHUNK: [u8; 65536] = [b'x'; 65536];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_not_held_against_the_version() {
    // 64 MiB, produced only as fast as it is read: far more than the sockets can buffer.
    let big = Upstream::start(|_| async {
        let frames = (0..1024).map(|_| Ok(http_body::Frame::data(Bytes::from_static(&CHUNK))));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        Response::new(BodyExt::boxed(body))
    })
    .await;
    let body = format!("{}{}", listeners("body_idle_timeout = \"300ms\"", ""), route(big.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let mut s = TcpStream::connect(proxy.http_addr()).await.expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.http_addr()).as_bytes()).await.expect("write");
    // The client reads nothing: veer gives up on it after body_idle_timeout of blocked writes.
    let t = client_faults(&proxy, Role::Stable, 1).await;
    assert_eq!((t.faults, t.requests()), (0, 0), "{t:?}");
    drop(s);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_body_stalls_is_cut_off_and_charged() {
    let stalls = Upstream::start(|_| async {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(
            b"0123456789",
        )))]);
        let body =
            http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, futures_util::stream::pending()));
        let mut r = Response::new(BodyExt::boxed(BodyExt::map_err(body, |e| Box::new(e) as _)));
        r.headers_mut().insert("content-length", http::HeaderValue::from_static("1000"));
        r
    })
    .await;
    let body = format!("{}{}", listeners("body_idle_timeout = \"300ms\"", ""), route(stalls.addr, None, ""));
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let resp = client().get(format!("http://{}/", proxy.http_addr()).parse().expect("uri")).await.expect("head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(8), resp.into_body().collect()).await.expect("cut off in time");
    assert!(body.is_err(), "the client sees the truncation");
    eventually(Duration::from_secs(5), "the version is charged", || async { judged(&proxy, Role::Stable).faults == 1 })
        .await;
    proxy.drain().await;
}
