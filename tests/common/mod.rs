//! Shared test harness: real upstreams and a real proxy on 127.0.0.1 ephemeral ports.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub mod etcd;

/// Body type test upstreams answer with.
pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A whole body.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A test upstream: counts requests and answers with `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream on 127.0.0.1:0 speaking HTTP/1.1 and h2c.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let handler = handler.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, hits, task }
    }

    /// An upstream that answers 200 with `text`.
    pub async fn text(text: &'static str) -> Upstream {
        Upstream::start(move |_| async move { Response::new(full(text)) }).await
    }

    /// An upstream that answers `status` with `text`.
    pub async fn status(status: u16, text: &'static str) -> Upstream {
        Upstream::start(move |_| async move {
            let mut r = Response::new(full(text));
            *r.status_mut() = StatusCode::from_u16(status).expect("status");
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops accepting (existing connections end when their tasks do).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A free loopback port that nothing listens on (bound, then released).
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A config file in its own temp dir.
pub struct ConfigFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    /// Writes `body` after a `[server]`/`[admin]` header on ephemeral loopback ports.
    pub fn new(body: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("veer.toml");
        let c = ConfigFile { dir, path };
        c.write(body);
        c
    }

    pub fn write(&self, body: &str) {
        std::fs::write(&self.path, with_listeners(body)).expect("write config");
    }

    /// Writes exactly `text` (no listener header).
    pub fn write_raw(&self, text: &str) {
        std::fs::write(&self.path, text).expect("write config");
    }
}

/// The `[server]` and `[admin]` tables on ephemeral loopback ports, with extra keys for each
/// (newline-separated TOML lines, or empty).
pub fn listeners(server_keys: &str, admin_keys: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{server_keys}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin_keys}\n")
}

/// Prefixes a config body with loopback listeners unless it has its own `[server]`.
pub fn with_listeners(body: &str) -> String {
    if body.contains("[server]") { body.to_string() } else { format!("{}\n{body}", listeners("", "")) }
}

/// The TOML of one route `web`: a stable version `v1` and, unless built with
/// [`RouteFixture::stable_only`], a candidate `v2` with a rollout plan and, when asked for,
/// rollback rules.
///
/// Tests build their route with it instead of writing the same tables out by hand, so each
/// test says only what differs from the usual route, and a renamed key is renamed once.
/// Listener tables are not part of it: [`ConfigFile::new`] (or [`listeners`]) adds them.
#[derive(Clone, Debug)]
pub struct RouteFixture {
    stable: String,
    candidate: Option<String>,
    route_keys: Vec<String>,
    stable_keys: Vec<String>,
    candidate_keys: Vec<String>,
    rollout: bool,
    steps: Option<String>,
    rollout_keys: Vec<String>,
    rollback_keys: Vec<String>,
    appended: String,
}

impl RouteFixture {
    /// Stable on `stable`, candidate on `candidate`, steps `[50, 100]`, no rollback table.
    pub fn new(stable: impl std::fmt::Display, candidate: impl std::fmt::Display) -> RouteFixture {
        RouteFixture { candidate: Some(candidate.to_string()), ..RouteFixture::stable_only(stable) }
    }

    /// Only a stable version on `stable`: no candidate, no rollout.
    pub fn stable_only(stable: impl std::fmt::Display) -> RouteFixture {
        RouteFixture {
            stable: stable.to_string(),
            candidate: None,
            route_keys: Vec::new(),
            stable_keys: Vec::new(),
            candidate_keys: Vec::new(),
            rollout: true,
            steps: Some("[50, 100]".to_string()),
            rollout_keys: Vec::new(),
            rollback_keys: Vec::new(),
            appended: String::new(),
        }
    }

    /// The rollout's `steps`, as a TOML array (`"[10, 100]"`).
    pub fn steps(mut self, steps: &str) -> RouteFixture {
        self.steps = Some(steps.to_string());
        self
    }

    /// No `steps` key, for a strategy that has none (blue-green).
    pub fn without_steps(mut self) -> RouteFixture {
        self.steps = None;
        self
    }

    /// No `[routes.rollout]` table at all, for configs that add their own.
    pub fn without_rollout(mut self) -> RouteFixture {
        self.rollout = false;
        self
    }

    /// `step_interval` of the rollout (a duration such as `"1h"`).
    pub fn step_interval(self, interval: &str) -> RouteFixture {
        self.rollout_key("step_interval", &format!("\"{interval}\""))
    }

    /// `min_requests` of the rollout.
    pub fn min_requests(self, n: u64) -> RouteFixture {
        self.rollout_key("min_requests", &n.to_string())
    }

    /// Another `[routes.rollout]` key; `value` is a TOML literal (`"\"blue-green\""`, `5`).
    pub fn rollout_key(mut self, key: &str, value: &str) -> RouteFixture {
        self.rollout_keys.push(format!("{key} = {value}"));
        self
    }

    /// A `[routes.rollback]` table with this `window` and `tick` (durations).
    pub fn rollback(self, window: &str, tick: &str) -> RouteFixture {
        self.rollback_key("window", &format!("\"{window}\"")).rollback_key("tick", &format!("\"{tick}\""))
    }

    /// Another `[routes.rollback]` key; `value` is a TOML literal.
    pub fn rollback_key(mut self, key: &str, value: &str) -> RouteFixture {
        self.rollback_keys.push(format!("{key} = {value}"));
        self
    }

    /// Another key of the route itself (after `name`); `value` is a TOML literal.
    pub fn route_key(mut self, key: &str, value: &str) -> RouteFixture {
        self.route_keys.push(format!("{key} = {value}"));
        self
    }

    /// Another key of both versions' tables (after `version`); `value` is a TOML literal.
    pub fn version_key(mut self, key: &str, value: &str) -> RouteFixture {
        self.stable_keys.push(format!("{key} = {value}"));
        self.candidate_keys.push(format!("{key} = {value}"));
        self
    }

    /// TOML appended as is after the route's last table: more keys of that table, or tables
    /// of their own (`[routes.mirror]` …).
    pub fn append(mut self, toml: &str) -> RouteFixture {
        self.appended.push_str(toml);
        self
    }

    /// The route's tables.
    pub fn toml(&self) -> String {
        let lines = |keys: &[String]| keys.iter().map(|k| format!("{k}\n")).collect::<String>();
        let mut s = format!(
            "[[routes]]\nname = \"web\"\n{}\n[routes.stable]\nversion = \"v1\"\n{}endpoints = [\"{}\"]\n",
            lines(&self.route_keys),
            lines(&self.stable_keys),
            self.stable
        );
        if let Some(c) = &self.candidate {
            s.push_str(&format!(
                "\n[routes.candidate]\nversion = \"v2\"\n{}endpoints = [\"{c}\"]\n",
                lines(&self.candidate_keys)
            ));
            if self.rollout {
                s.push_str("\n[routes.rollout]\n");
                if let Some(steps) = &self.steps {
                    s.push_str(&format!("steps = {steps}\n"));
                }
                s.push_str(&lines(&self.rollout_keys));
            }
            if !self.rollback_keys.is_empty() {
                s.push_str(&format!("\n[routes.rollback]\n{}", lines(&self.rollback_keys)));
            }
        }
        s.push_str(&self.appended);
        s
    }
}

/// One route `web` with a stable and (optionally) a candidate upstream: the usual
/// [`RouteFixture`] with these steps.
pub fn route(stable: SocketAddr, candidate: Option<SocketAddr>, steps: &str) -> String {
    match candidate {
        Some(c) => RouteFixture::new(stable, c).steps(steps).toml(),
        None => RouteFixture::stable_only(stable).toml(),
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response with its body collected.
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` and collects the answer (10 s deadline).
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Got {
    let fut = async {
        let resp = client.request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Got { status: parts.status, headers: parts.headers, body }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.expect("response within 10 s")
}

/// GET `http://{addr}{path}`.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Got {
    send(client, Request::get(format!("http://{addr}{path}")).body(Full::default()).expect("request")).await
}

/// POST to `http://{addr}{path}` with optional headers.
pub async fn post(client: &HttpClient, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(Full::default()).expect("request")).await
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends GETs to `http://{addr}/` one at a time until `cond` holds, checking it after each
/// answer, so a test needs exactly as much traffic as its condition does instead of a fixed
/// count that a random split can leave one request short. Requests are paced 1 ms apart: the
/// judge and the rollout act on ticks, and a condition that waits for one must not be outrun
/// by a request count (unpaced, a loopback client sends thousands in one tick). Fails after
/// `max` requests or once `within` has passed. Returns how many requests were sent.
pub async fn send_until<F, Fut>(
    client: &HttpClient,
    addr: SocketAddr,
    max: usize,
    within: Duration,
    what: &str,
    mut cond: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    for sent in 1..=max {
        get(client, addr, "/").await;
        if cond().await {
            return sent;
        }
        assert!(Instant::now() < deadline, "after {sent} requests and {within:?}, still waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("after {max} requests, still waiting for: {what}");
}

/// The route's status JSON from the admin API.
pub async fn route_status(client: &HttpClient, admin: SocketAddr, route: &str) -> serde_json::Value {
    let got = get(client, admin, &format!("/api/v1/routes/{route}")).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    serde_json::from_slice(&got.body).expect("status JSON")
}

/// Path of the built `veer` binary.
pub fn veer_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_veer"))
}

/// A GET request with no body for hyper clients that need `Empty`.
pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// A running `veer run` child with the addresses it logged.
pub struct Veer {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the config has one.
    pub tls: Option<SocketAddr>,
    /// The JSON log lines up to and including "veer is serving".
    pub startup_logs: Vec<serde_json::Value>,
    /// Every log line after those, as it arrives (for failure messages).
    pub later_logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Veer {
    pub fn spawn(config: &std::path::Path) -> Veer {
        let child = Command::new(veer_bin())
            .args(["run", "--log-format", "json", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn veer");
        // Owned by a `Veer` from here on, so a failed start still kills and reaps the child.
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let later = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut veer = Veer {
            child,
            http: unknown,
            admin: unknown,
            tls: None,
            startup_logs: Vec::new(),
            later_logs: later.clone(),
        };
        let stderr = veer.child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Once startup is over nobody receives: keep the line for `logs` instead.
                if let Err(std::sync::mpsc::SendError(line)) = tx.send(line) {
                    later.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("veer logs that it is serving");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            veer.startup_logs.push(v.clone());
            if v["fields"]["message"] == "veer is serving" {
                let addr = |k: &str| v["fields"][k].as_str().expect("address field").parse().expect("socket address");
                (veer.http, veer.admin) = (addr("http_addr"), addr("admin_addr"));
                // Logged with `Debug`: "Some(127.0.0.1:8443)" or "None".
                veer.tls =
                    v["fields"]["tls"].as_str().and_then(|t| t.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok());
                return veer;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every JSON log line so far whose message is `message`, oldest first.
    pub fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        let later = self.later_logs.lock().unwrap_or_else(|e| e.into_inner());
        let parsed = later.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        self.startup_logs.iter().cloned().chain(parsed).filter(|v| v["fields"]["message"] == message).collect()
    }

    /// The last `n` log lines written after startup.
    pub fn logs(&self, n: usize) -> String {
        let lines = self.later_logs.lock().unwrap_or_else(|e| e.into_inner());
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill").success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kb * 1024
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "veer did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Veer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test that needs an outside tool which is missing: fails when `require_var` is `1` (CI
/// sets it), otherwise says loudly that it skipped.
///
/// libtest hides the output of a passing test, and a skipped test passes, so the skip is also
/// appended to the file named by `VEER_SKIP_LOG` when that is set: `.ci/run` sets it and prints
/// the file after the tests, so no skip goes unseen.
pub fn skip_unless_required(require_var: &str, test: &str, why: &str) {
    assert!(std::env::var(require_var).as_deref() != Ok("1"), "{require_var}=1 but {test} cannot run: {why}");
    let bar = "!".repeat(80);
    eprintln!("\n{bar}\n!!! SKIPPED {test}:\n!!! {why}\n{bar}\n");
    if let Some(log) = std::env::var_os("VEER_SKIP_LOG") {
        use std::io::Write;
        // One short `write` per line with O_APPEND: lines from tests running at once never mix.
        let line = format!("SKIPPED {test}: {} (set {require_var}=1 to require it)\n", why.replace('\n', " "));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot record the skip of {test} in VEER_SKIP_LOG={}: {e}", Path::new(&log).display());
        }
    }
}

/// Where an outside program is installed: the first `name` on `PATH`, then in `/usr/sbin` and
/// `/sbin`, where Debian puts servers such as nginx and haproxy and where a non-root `PATH`
/// often does not look.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Steady background GETs to `addr`, `gap` apart, until `stop` is set — and in any case at
/// most 100,000 requests or 120 s. Each answer must be a 200.
pub fn background_traffic(addr: SocketAddr, gap: Duration, stop: Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<()> {
    let client = client();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                return;
            }
            assert_eq!(get(&client, addr, "/").await.status, StatusCode::OK);
            tokio::time::sleep(gap).await;
        }
    })
}

/// An upstream that accepts WebSocket upgrades and echoes every message.
pub async fn ws_echo() -> Upstream {
    Upstream::start(|mut req: Request<Incoming>| async move {
        let Some(key) = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        else {
            return Response::new(full("not a websocket request"));
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = TokioIo::new(upgrade.await.expect("upgrade at upstream"));
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                io,
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut ws).await {
                if msg.is_text() || msg.is_binary() {
                    futures_util::SinkExt::send(&mut ws, msg).await.expect("echo");
                }
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", "upgrade".parse().expect("value"));
        r.headers_mut().insert("upgrade", "websocket".parse().expect("value"));
        r.headers_mut().insert("sec-websocket-accept", key.parse().expect("value"));
        r
    })
    .await
}

/// A raw TCP upstream that reads a request, writes `reply` as is and closes the connection:
/// a response cut short, a malformed one, or bytes that are not HTTP at all.
pub async fn raw_upstream(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            });
        }
    });
    addr
}
