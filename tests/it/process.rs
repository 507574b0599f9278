//! The `veer` binary as a subprocess: streaming with bounded memory, SIGHUP reload, and
//! graceful drain on SIGTERM.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use futures_util::StreamExt;
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const MIB: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;

fn chunks(
    total: usize,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    futures_util::stream::iter((0..total / CHUNK).map(move |_| Ok(Frame::data(chunk.clone()))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_each_way_stream_with_bounded_proxy_memory() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        if req.method() == http::Method::POST {
            let mut body = req.into_body().into_data_stream();
            let mut n = 0;
            while let Some(c) = body.next().await {
                n += c.expect("upload chunk").len();
            }
            Response::new(full(n.to_string()))
        } else {
            Response::new(BodyExt::boxed(StreamBody::new(chunks(50 * MIB))))
        }
    })
    .await;
    let cfg = ConfigFile::new(&route(up.addr, None, ""));
    let veer = Veer::spawn(&cfg.path);
    let baseline = veer.peak_rss();

    let c = client();
    let resp = c.get(format!("http://{}/big", veer.http).parse().expect("uri")).await.expect("download");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body().into_data_stream();
    let mut got = 0;
    while let Some(c) = tokio::time::timeout(Duration::from_secs(30), body.next()).await.expect("download progresses") {
        got += c.expect("chunk").len();
    }
    assert_eq!(got, 50 * MIB);

    let uploader: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{}/upload", veer.http))
        .body(StreamBody::new(chunks(50 * MIB)))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(60), uploader.request(req))
        .await
        .expect("upload in time")
        .expect("upload");
    let n = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(n, (50 * MIB).to_string());

    let peak = veer.peak_rss();
    eprintln!("veer peak RSS: {} KiB before, {} KiB after 100 MiB streamed", baseline / 1024, peak / 1024);
    // Buffering either body whole would add 50 MiB; streaming adds socket and frame buffers.
    assert!(peak < baseline + 24 * MIB, "peak RSS grew from {} MiB to {} MiB", baseline / MIB, peak / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let a = Upstream::text("a").await;
    let b = Upstream::text("b").await;
    let cfg = ConfigFile::new(&route(a.addr, None, ""));
    let veer = Veer::spawn(&cfg.path);
    let c = client();
    assert_eq!(get(&c, veer.http, "/").await.text(), "a");
    // Keep the listeners: the config names port 0, which a reload must not try to rebind.
    cfg.write(&route(b.addr, None, ""));
    veer.signal("HUP");
    eventually(Duration::from_secs(10), "the reloaded route serves b", || async {
        get(&c, veer.http, "/").await.text() == "b"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let slow = Upstream::start(move |_| {
        let mut rx = release_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
            Response::new(full("finished"))
        }
    })
    .await;
    let cfg = ConfigFile::new(&route(slow.addr, None, ""));
    let mut veer = Veer::spawn(&cfg.path);
    let c = client();
    let http = veer.http;
    let c1 = c.clone();
    let in_flight = tokio::spawn(async move { get(&c1, http, "/slow").await });
    eventually(Duration::from_secs(10), "the slow request reached the upstream", || async { slow.hits() == 1 }).await;

    veer.signal("TERM");
    eventually(Duration::from_secs(10), "readyz turns 503 while draining", || async {
        get(&c, veer.admin, "/readyz").await.status == 503
    })
    .await;
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "no new connections while draining");
    assert!(veer.child.try_wait().expect("wait").is_none(), "veer waits for the in-flight request");

    release_tx.send(true).expect("release");
    let got = in_flight.await.expect("in-flight task");
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "finished");
    let status = tokio::task::spawn_blocking(move || veer.wait_exit(Duration::from_secs(20))).await.expect("join");
    assert!(status.success(), "exit status {status:?}");
}
