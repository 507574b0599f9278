//! Endpoint health end to end: passive ejection of endpoints that refuse connections, active
//! HTTP health checks, and re-admission when an endpoint recovers.
#![allow(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use veer::server::Proxy;

/// An upstream started on a given address (the harness's upstreams bind port 0): answers
/// 200 with `text` to everything and counts requests other than health checks.
struct Revived {
    served: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Revived {
    /// `None` when the address is taken.
    async fn start_on(addr: SocketAddr, text: &'static str) -> Option<Revived> {
        let listener = TcpListener::bind(addr).await.ok()?;
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        if req.uri().path() != "/healthz" {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        async move { Ok::<_, Infallible>(Response::new(full(text))) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Some(Revived { served, task })
    }
}

impl Drop for Revived {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn web(endpoints: &[SocketAddr], health: &str) -> String {
    let list = endpoints.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!("[[routes]]\nname = \"web\"\n\n[routes.stable]\nversion = \"v1\"\nendpoints = [{list}]\n{health}")
}

async fn unhealthy(c: &HttpClient, proxy: &Proxy) -> Vec<String> {
    let status = route_status(c, proxy.admin_addr(), "web").await;
    let list = status["stable"]["unhealthy_endpoints"].as_array().cloned().unwrap_or_default();
    list.iter().filter_map(Value::as_str).map(str::to_string).collect()
}

/// A GET through the proxy that must succeed; returns the body.
async fn ok(c: &HttpClient, proxy: &Proxy) -> String {
    let got = get(c, proxy.http_addr(), "/").await;
    assert_eq!(got.status, StatusCode::OK, "bodyless GETs never fail while a healthy endpoint is left: {}", got.text());
    got.text()
}

/// One run of the refuse-then-recover scenario; false when the released port was taken by
/// someone else before the endpoint could come back on it.
async fn refused_then_back(health: &str) -> bool {
    let live = Upstream::text("live").await;
    let dead = refused_addr();
    let cfg = ConfigFile::new(&web(&[dead, live.addr], health));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let dead_s = dead.to_string();
    let active = !health.is_empty();
    if active {
        eventually(Duration::from_secs(5), "the check ejects the endpoint before any traffic", || async {
            unhealthy(&c, &proxy).await == [dead_s.clone()]
        })
        .await;
    }

    for _ in 0..40 {
        assert_eq!(ok(&c, &proxy).await, "live");
    }
    eventually(Duration::from_secs(5), "the refusing endpoint is reported unhealthy", || async {
        assert_eq!(ok(&c, &proxy).await, "live");
        unhealthy(&c, &proxy).await == [dead_s.clone()]
    })
    .await;

    let Some(back) = Revived::start_on(dead, "back").await else {
        proxy.drain().await;
        return false;
    };
    if active {
        eventually(Duration::from_secs(5), "the check re-admits the endpoint without traffic", || async {
            unhealthy(&c, &proxy).await.is_empty()
        })
        .await;
    }
    // Passive backoff tops out at 10 s; an active check re-admits within its interval.
    eventually(Duration::from_secs(15), "the endpoint is back in rotation", || async {
        assert!(["live", "back"].contains(&ok(&c, &proxy).await.as_str()));
        back.served.load(Ordering::Relaxed) > 0
    })
    .await;
    eventually(Duration::from_secs(5), "no endpoint is reported unhealthy", || async {
        unhealthy(&c, &proxy).await.is_empty()
    })
    .await;
    let before = back.served.load(Ordering::Relaxed);
    for _ in 0..40 {
        assert!(["live", "back"].contains(&ok(&c, &proxy).await.as_str()));
    }
    assert!(back.served.load(Ordering::Relaxed) > before, "the recovered endpoint takes its share again");
    proxy.drain().await;
    true
}

async fn refused_endpoint_is_ejected_and_readmitted(health: &str) {
    for attempt in 1..=5 {
        if refused_then_back(health).await {
            return;
        }
        eprintln!("attempt {attempt}: the released port was taken meanwhile; trying another port");
    }
    panic!("the released port was taken five times in a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_ejected_then_readmitted_by_traffic() {
    refused_endpoint_is_ejected_and_readmitted("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_ejected_then_readmitted_by_its_health_check() {
    refused_endpoint_is_ejected_and_readmitted("health_path = \"/healthz\"\nhealth_interval = \"100ms\"\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_takes_an_endpoint_out_until_it_passes_again() {
    let health = Arc::new(AtomicU16::new(200));
    let served = Arc::new(AtomicUsize::new(0));
    let (h, s) = (health.clone(), served.clone());
    let flaky = Upstream::start(move |req| {
        let (h, s) = (h.clone(), s.clone());
        async move {
            if req.uri().path() == "/healthz" {
                let mut r = Response::new(full("health"));
                *r.status_mut() = StatusCode::from_u16(h.load(Ordering::Relaxed)).expect("status");
                return r;
            }
            s.fetch_add(1, Ordering::Relaxed);
            Response::new(full("flaky"))
        }
    })
    .await;
    let steady = Upstream::text("steady").await;
    let cfg =
        ConfigFile::new(&web(&[flaky.addr, steady.addr], "health_path = \"/healthz\"\nhealth_interval = \"100ms\"\n"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();

    eventually(Duration::from_secs(5), "both endpoints serve", || async {
        ok(&c, &proxy).await;
        served.load(Ordering::Relaxed) > 0 && steady.hits() > 1
    })
    .await;
    eventually(Duration::from_secs(5), "health checks reach the endpoint", || async {
        flaky.hits() > served.load(Ordering::Relaxed)
    })
    .await;

    health.store(503, Ordering::Relaxed);
    let flaky_s = flaky.addr.to_string();
    eventually(Duration::from_secs(5), "the failing endpoint is reported unhealthy", || async {
        ok(&c, &proxy).await;
        unhealthy(&c, &proxy).await == [flaky_s.clone()]
    })
    .await;
    let before = served.load(Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(ok(&c, &proxy).await, "steady");
    }
    assert_eq!(served.load(Ordering::Relaxed), before, "no proxied request reaches an endpoint failing its check");

    health.store(200, Ordering::Relaxed);
    eventually(Duration::from_secs(5), "the endpoint is back in rotation", || async {
        ok(&c, &proxy).await;
        served.load(Ordering::Relaxed) > before
    })
    .await;
    assert!(unhealthy(&c, &proxy).await.is_empty());
    proxy.drain().await;
}
