//! Protocol correctness towards upstreams, and the bound on connections to one endpoint: real
//! upstreams (a real nginx for HTTP/2, raw TCP servers for answers hyper would never write).
#![allow(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use veer::server::Proxy;

/// The proxy over one stable upstream with extra `[server]` keys.
async fn proxy_for(stable: SocketAddr, server_keys: &str, version_keys: &str) -> (ConfigFile, Proxy) {
    let body = format!(
        "{}\n[[routes]]\nname = \"web\"\n\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"{stable}\"]\n{version_keys}\n",
        listeners(server_keys, "")
    );
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    (cfg, proxy)
}

/// The stable version's errors once at least `requests` requests have been recorded for it.
async fn faults_after(proxy: &Proxy, requests: u64) -> u64 {
    let (c, deadline) = (client(), Instant::now() + Duration::from_secs(10));
    loop {
        let w = &route_status(&c, proxy.admin_addr(), "web").await["stable"]["window"];
        if w["total_requests"].as_u64().unwrap_or(0) >= requests {
            return w["total_errors"].as_u64().expect("total_errors");
        }
        assert!(Instant::now() < deadline, "{requests} requests were not recorded in 10 s: {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 upstreams: a real nginx speaking h2c.
// ---------------------------------------------------------------------------------------------

/// nginx started by the test, in its own temp dir; killed on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_bin() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| std::path::Path::new(p).exists())
}

/// (major, minor) of the installed nginx.
fn nginx_version(bin: &str) -> (u32, u32) {
    let out = Command::new(bin).arg("-v").output().expect("nginx -v");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = text.split("nginx/").nth(1).unwrap_or("0.0").trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// An h2c (prior knowledge) nginx on a loopback port that answers with the Host it saw.
async fn start_nginx(bin: &str) -> Nginx {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = refused_addr();
    let (listen, http2_on) =
        if nginx_version(bin) >= (1, 25) { (format!("{addr}"), "http2 on;") } else { (format!("{addr} http2"), "") };
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen {listen};\n    {http2_on}\n    server_name _;\n\
         location / {{ return 200 \"host=$host proto=$server_protocol\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx");
    let nginx = Nginx { child, addr, _dir: dir };
    eventually(Duration::from_secs(10), "nginx accepts connections", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    nginx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_gets_the_clients_host_as_authority_and_no_host_field() {
    let Some(bin) = nginx_bin() else {
        skip_unless_required("VEER_REQUIRE_NGINX", "upstream_protocol h2 authority", "nginx is not installed");
        return;
    };
    let nginx = start_nginx(bin).await;
    let (_cfg, proxy) = proxy_for(nginx.addr, "", "h2 = true").await;
    let c = client();
    for host in ["shop.test", "shop.test:8080"] {
        let req = Request::get(format!("http://{}/", proxy.http_addr()))
            .header("host", host)
            .body(Full::default())
            .expect("request");
        let got = send(&c, req).await;
        assert_eq!(got.status, StatusCode::OK, "nginx refused what veer sent for Host {host}: {}", got.text());
        let want_host = host.split(':').next().expect("host");
        assert_eq!(got.text(), format!("host={want_host} proto=HTTP/2.0\n"));
    }
    assert_eq!(faults_after(&proxy, 2).await, 0);
    proxy.drain().await;
}

// ---------------------------------------------------------------------------------------------
// What the upstream answers with.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstream_is_answered_in_the_clients_version() {
    let up = raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let (_cfg, proxy) = proxy_for(up, "", "").await;
    let c = client();
    for _ in 0..2 {
        let resp = c.get(format!("http://{}/", proxy.http_addr()).parse().expect("uri")).await.expect("response");
        assert_eq!(resp.version(), Version::HTTP_11, "veer answers in its own version");
        assert!(resp.headers().get("connection").is_none_or(|v| v != "close"), "{:?}", resp.headers());
        assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
    }
    proxy.drain().await;
}

fn with_headers(n: usize) -> Response<TestBody> {
    let mut r = Response::new(full("many"));
    for i in 0..n {
        r.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).expect("name"),
            http::HeaderValue::from_static("v"),
        );
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_heads_up_to_the_configured_limits_pass() {
    let up = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        let n = req.uri().path().trim_start_matches('/').parse().unwrap_or(0);
        with_headers(n)
    })
    .await;
    let (_cfg, proxy) = proxy_for(up.addr, "", "").await;
    let c: HttpClient = Client::builder(TokioExecutor::new()).http1_max_headers(1000).build_http();
    let got = get(&c, proxy.http_addr(), "/140").await;
    assert_eq!(got.status, StatusCode::OK, "140 fields are within the default of 150: {}", got.text());
    assert_eq!(got.headers.keys().filter(|k| k.as_str().starts_with("x-h-")).count(), 140);
    assert_eq!(get(&c, proxy.http_addr(), "/200").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(faults_after(&proxy, 2).await, 1, "a head over the limit is the version's error");
    proxy.drain().await;

    let (_cfg, proxy) = proxy_for(up.addr, "max_upstream_headers = 300", "").await;
    assert_eq!(get(&c, proxy.http_addr(), "/200").await.status, StatusCode::OK, "the limit is configurable");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_101_is_a_502_and_the_versions_error() {
    let up =
        raw_upstream(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").await;
    let (_cfg, proxy) = proxy_for(up, "", "").await;
    let got = get(&client(), proxy.http_addr(), "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert_eq!(faults_after(&proxy, 1).await, 1, "the 101 is the version's error");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_win_over_a_stale_content_length() {
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let (_cfg, proxy) = proxy_for(up, "", "").await;
    let got = get(&client(), proxy.http_addr(), "/").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "hello world", "the whole chunked body, never cut to the stale length");
    assert!(got.headers.get("content-length").is_none_or(|v| v == "11"), "{:?}", got.headers);
    proxy.drain().await;
}

// ---------------------------------------------------------------------------------------------
// What veer sends upstream.
// ---------------------------------------------------------------------------------------------

/// An upstream answering with the body it received and its `te` field.
async fn echo() -> Upstream {
    Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        let te = req.headers().get("te").map(|v| v.to_str().unwrap_or("?").to_string()).unwrap_or_default();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let mut r = Response::new(full(body));
        r.headers_mut().insert("x-te", http::HeaderValue::from_str(&te).expect("value"));
        r
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_get_body_without_length_reaches_an_http1_upstream() {
    let up = echo().await;
    let (_cfg, proxy) = proxy_for(up.addr, "", "").await;
    type Unsized = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
    let h2: Client<_, Unsized> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"abc"))), Ok(Frame::data(Bytes::from_static(b"def")))];
    let req = Request::get(format!("http://{}/", proxy.http_addr()))
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("request");
    let resp =
        tokio::time::timeout(Duration::from_secs(10), h2.request(req)).await.expect("in time").expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-te"], "trailers", "te: trailers is kept for gRPC");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "abcdef", "the body reached the upstream");
    assert_eq!(faults_after(&proxy, 1).await, 0);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_is_reduced_to_trailers() {
    let up = echo().await;
    let (_cfg, proxy) = proxy_for(up.addr, "", "").await;
    let req = Request::post(format!("http://{}/", proxy.http_addr()))
        .header("connection", "te")
        .header("te", "trailers, deflate")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    let got = send(&client(), req).await;
    assert_eq!(got.headers["x-te"], "trailers");
    assert_eq!(got.text(), "x");
    proxy.drain().await;
}

// ---------------------------------------------------------------------------------------------
// The per-endpoint connection cap.
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream that counts the connections it accepted. `/slow` answers after
/// 100 ms; `/hold` sends its head at once and its body when the test releases it.
struct Counting {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections that have ended (closed by veer or broken).
    closed: Arc<AtomicUsize>,
    release: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
}

async fn counting_upstream() -> Counting {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let release: Arc<Mutex<Vec<oneshot::Sender<()>>>> = Arc::default();
    let (a, r, cl) = (accepted.clone(), release.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (r, cl) = (r.clone(), cl.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move {
                        let body: TestBody = match req.uri().path() {
                            "/hold" => {
                                let (tx, rx) = oneshot::channel::<()>();
                                r.lock().expect("lock").push(tx);
                                let once = futures_util::stream::once(async move {
                                    let _ = rx.await;
                                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from("held")))
                                });
                                StreamBody::new(once).boxed()
                            }
                            "/slow" => {
                                // Simulated work, not synchronisation: the requests must overlap.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                full("slow")
                            }
                            _ => full("ok"),
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                cl.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Counting { addr, accepted, closed, release }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_slow_requests_never_open_more_than_the_cap() {
    let up = counting_upstream().await;
    let (_cfg, proxy) = proxy_for(up.addr, "max_connections_per_endpoint = 3\nrequest_timeout = \"30s\"", "").await;
    let addr = proxy.http_addr();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        tasks.push(tokio::spawn(async move { get(&client(), addr, "/slow").await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK, "queued requests are served, not refused");
    }
    let accepted = up.accepted.load(Ordering::SeqCst);
    assert!(accepted <= 3, "the upstream saw {accepted} connections; the cap is 3");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(faults_after(&proxy, 24).await, 0);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cap_is_a_503_of_veer_not_the_versions_error() {
    let up = counting_upstream().await;
    let (_cfg, proxy) = proxy_for(up.addr, "max_connections_per_endpoint = 1\nrequest_timeout = \"500ms\"", "").await;
    let addr = proxy.http_addr();
    let c = client();
    // The only connection is busy streaming a body the upstream holds back.
    let held = c.get(format!("http://{addr}/hold").parse().expect("uri")).await.expect("head of the held response");
    assert_eq!(held.status(), StatusCode::OK);
    let got = get(&client(), addr, "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{}", got.text());
    assert!(got.text().contains("too many connections"), "{}", got.text());
    // Counted as veer's own answer, never as a request or an error of the version.
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let w = loop {
        let w = route_status(&c, proxy.admin_addr(), "web").await["stable"]["window"].clone();
        if w["proxy_answers"].as_u64().unwrap_or(0) >= 1 {
            break w;
        }
        assert!(Instant::now() < deadline, "the 503 was not counted as veer's answer in 10 s: {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(w["total_errors"], 0, "veer's own limit is not held against the version: {w}");
    // Released, the connection serves the next request.
    for tx in up.release.lock().expect("lock").drain(..) {
        let _ = tx.send(());
    }
    assert_eq!(held.into_body().collect().await.expect("held body").to_bytes(), "held");
    assert_eq!(get(&client(), addr, "/").await.status, StatusCode::OK);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    proxy.drain().await;
}

// ---------------------------------------------------------------------------------------------
// Connection reuse.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_upstream_connection() {
    let up = counting_upstream().await;
    let (_cfg, proxy) = proxy_for(up.addr, "", "").await;
    let (c, addr) = (client(), proxy.http_addr());
    for i in 0..30 {
        // Bodyless answers (HEAD) give the connection back at the head, the others at the
        // body's end.
        let method = if i % 3 == 0 { http::Method::HEAD } else { http::Method::GET };
        let req =
            Request::builder().method(method).uri(format!("http://{addr}/")).body(Full::default()).expect("request");
        assert_eq!(send(&c, req).await.status, StatusCode::OK);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "every request reused the first upstream connection");
    assert_eq!(faults_after(&proxy, 30).await, 0);
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_abandons_never_lends_its_connection_to_the_next_request() {
    let up = counting_upstream().await;
    let (_cfg, proxy) = proxy_for(up.addr, "", "").await;
    let addr = proxy.http_addr();
    let held =
        client().get(format!("http://{addr}/hold").parse().expect("uri")).await.expect("head of the held response");
    assert_eq!(held.status(), StatusCode::OK);
    // The client goes away with the body unread and unfinished: veer closes the upstream
    // connection rather than pool one with half a response left on it.
    drop(held);
    let closed = up.closed.clone();
    eventually(Duration::from_secs(10), "veer closes the abandoned upstream connection", || {
        let closed = closed.clone();
        async move { closed.load(Ordering::SeqCst) == 1 }
    })
    .await;
    for _ in 0..5 {
        let got = get(&client(), addr, "/").await;
        assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        2,
        "the abandoned connection was closed, one new one serves the rest"
    );
    proxy.drain().await;
}

/// A raw upstream that answers one request per connection and then closes it, without
/// saying so (no `Connection: close`): what an upstream with a short keep-alive timeout
/// does to an idle pooled connection. Returns its address and the connections it accepted.
async fn one_answer_per_connection() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_idle_connections_fails_no_request() {
    let (up, accepted) = one_answer_per_connection().await;
    let (_cfg, proxy) = proxy_for(up, "", "").await;
    let c = client();
    for i in 0..40 {
        let got = get(&c, proxy.http_addr(), "/").await;
        assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "ok"), "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 40, "each request needed a connection of its own");
    assert_eq!(faults_after(&proxy, 40).await, 0, "a closed pooled connection is never the version's error");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http2_requests_share_one_upstream_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    // Simulated work, not synchronisation: the requests must overlap.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, Infallible>(Response::new(full("h2")))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let (_cfg, proxy) = proxy_for(up, "", "h2 = true").await;
    let addr = proxy.http_addr();
    let tasks: Vec<_> = (0..16).map(|_| tokio::spawn(async move { get(&client(), addr, "/").await })).collect();
    for t in tasks {
        let got = t.await.expect("task");
        assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "h2"));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "sixteen concurrent requests, one multiplexed connection");
    assert_eq!(faults_after(&proxy, 16).await, 0);
    proxy.drain().await;
}
