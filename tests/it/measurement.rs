//! Per-version measurement seen from outside: the admin API's window figures and /metrics.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use veer::server::Proxy;

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_with_the_documented_labels() {
    let stable = Upstream::text("ok").await;
    // 4xx is the client's fault: counted, never judged, so the split stays put.
    let cand = Upstream::status(404, "nope").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), "[50, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    for _ in 0..40 {
        get(&c, proxy.http_addr(), "/").await;
    }
    let (s, k) = (stable.hits(), cand.hits());
    assert_eq!(s + k, 40);
    assert!(s > 0 && k > 0);
    let text = get(&c, proxy.admin_addr(), "/metrics").await.text();
    let expect = |series: &str, want: usize| {
        let got = metric_value(&text, series).unwrap_or_else(|| panic!("missing {series} in:\n{text}"));
        assert_eq!(got, want as f64, "{series}");
    };
    expect(r#"veer_requests_total{route="web",role="stable",version="v1",class="2xx",source="upstream"}"#, s);
    expect(r#"veer_requests_total{route="web",role="candidate",version="v2",class="4xx",source="upstream"}"#, k);
    expect(r#"veer_request_duration_seconds_count{route="web",role="stable",version="v1"}"#, s);
    expect(r#"veer_request_duration_seconds_count{route="web",role="candidate",version="v2"}"#, k);
    expect(r#"veer_request_duration_seconds_bucket{route="web",role="stable",version="v1",le="+Inf"}"#, s);
    assert!(text.contains("# TYPE veer_request_duration_seconds histogram"), "{text}");
    assert!(text.contains(r#"veer_candidate_weight_percent{route="web"} 50"#), "{text}");
    assert!(text.contains(r#"veer_rollout_phase{route="web",phase="progressing"} 1"#), "{text}");
    proxy.drain().await;
}

/// The weight and phase gauges change with the state, not at the next tick: a scrape right
/// after the start, or right after a command, reads what traffic sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_and_phase_gauges_are_current_right_after_start_and_commands() {
    let stable = Upstream::text("ok").await;
    let cand = Upstream::text("cand").await;
    // One tick at the start, the next 20 s later: only the start and the command move the state.
    let body =
        RouteFixture::new(stable.addr, cand.addr).steps("[50, 100]").step_interval("1h").rollback("60s", "20s").toml();
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (c, admin) = (client(), proxy.admin_addr());
    let gauges = |text: &str| {
        [
            r#"veer_candidate_weight_percent{route="web"}"#,
            r#"veer_rollout_phase{route="web",phase="progressing"}"#,
            r#"veer_rollout_phase{route="web",phase="rolled_back"}"#,
        ]
        .map(|series| metric_value(text, series))
    };
    let text = get(&c, admin, "/metrics").await.text();
    assert_eq!(gauges(&text), [Some(50.0), Some(1.0), Some(0.0)], "right after the start:\n{text}");
    assert_eq!(post(&c, admin, "/api/v1/routes/web/abort", &[]).await.status, 200);
    let text = get(&c, admin, "/metrics").await.text();
    assert_eq!(gauges(&text), [Some(0.0), Some(0.0), Some(1.0)], "right after the abort:\n{text}");
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_figures_show_each_versions_errors() {
    let stable = Upstream::text("ok").await;
    let cand = Upstream::status(500, "boom").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), "[25, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let c = client();
    let sent =
        send_until(&c, proxy.http_addr(), 20_000, Duration::from_secs(20), "the candidate is rolled back", || async {
            route_status(&c, proxy.admin_addr(), "web").await["phase"] == "rolled_back"
        })
        .await as u64;
    let k = cand.hits() as u64;
    eventually(Duration::from_secs(5), "window shows the traffic", || async {
        let st = route_status(&c, proxy.admin_addr(), "web").await;
        st["candidate"]["window"]["requests"] == k && st["stable"]["window"]["requests"] == sent - k
    })
    .await;
    let st = route_status(&c, proxy.admin_addr(), "web").await;
    assert!(k >= 3, "the candidate served {k} requests before being judged");
    assert_eq!(st["candidate"]["window"]["errors"], k);
    assert_eq!(st["candidate"]["window"]["error_rate"], 1.0);
    assert_eq!(st["stable"]["window"]["errors"], 0);
    assert!(st["stable"]["window"]["p99_ms"].as_f64().is_some());
    assert_eq!(st["candidate"]["version"], "v2");
    assert_eq!(st["rollback"]["rule"], "error_rate", "a candidate failing everything is snapped back");
    proxy.drain().await;
}

type GrpcBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn grpc_response(status: &'static str) -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let frames = vec![
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let mut r = Response::new(body);
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_internal_in_trailers_counts_as_a_candidate_error() {
    let stable = Upstream::start(|_| async { grpc_response("0") }).await;
    let cand = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        // Fail only the calls to the "Fail" method, so both outcomes are seen on one version.
        grpc_response(if req.uri().path().ends_with("/Fail") { "13" } else { "0" })
    })
    .await;
    let body = RouteFixture::new(stable.addr, cand.addr).steps("[100]").version_key("h2", "true").toml();
    let cfg = ConfigFile::new(&body);
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    for method in ["Fail", "Fail", "Fail", "Ok"] {
        let req = http::Request::post(format!("http://{}/svc.Echo/{method}", proxy.http_addr()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .expect("req");
        let resp = h2.request(req).await.expect("grpc call");
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().expect("trailers pass through");
        assert_eq!(trailers["grpc-status"], if method == "Fail" { "13" } else { "0" });
    }
    assert_eq!(cand.hits(), 4);
    let c = client();
    eventually(Duration::from_secs(5), "candidate window counts the gRPC failures", || async {
        let st = route_status(&c, proxy.admin_addr(), "web").await;
        st["candidate"]["window"]["requests"] == 4 && st["candidate"]["window"]["errors"] == 3
    })
    .await;
    let text = get(&c, proxy.admin_addr(), "/metrics").await.text();
    assert_eq!(
        metric_value(
            &text,
            r#"veer_requests_total{route="web",role="candidate",version="v2",class="2xx",source="upstream"}"#
        ),
        Some(4.0),
        "{text}"
    );
    proxy.drain().await;
}
