//! The admin dashboard (`GET /` on the admin port) in a real headless Chromium.
//!
//! `tests/browser/dashboard.js` drives Debian's `/usr/bin/chromium` through playwright-core
//! against a real proxy: the page loads, shows the route, shows the admin API's 401 for a
//! command without the token, a click on "abort" (with the token typed in) rolls the route
//! back, which is then checked through the admin API, and a second "abort" shows the 409. Without Chromium, node or
//! `tests/browser/node_modules` the browser test says loudly that it skipped; with
//! `VEER_REQUIRE_BROWSER=1` (set by `.ci/run`) it fails instead.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;
use veer::server::Proxy;

const TOKEN: &str = "dashboard-test-token";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Chromium's path, or why the browser test cannot run here.
fn browser_tools() -> Result<PathBuf, String> {
    let chromium = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return Err(format!("Chromium is not installed at {} (apt-get install chromium)", chromium.display()));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed (apt-get install nodejs npm)".into());
    }
    if !browser_dir().join("node_modules/playwright-core/package.json").exists() {
        return Err("playwright-core is not installed (cd tests/browser && npm ci)".into());
    }
    Ok(chromium)
}

/// Runs `cmd` with its output captured, killing it if it outlives `within`.
fn run_bounded(mut cmd: Command, within: Duration) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"));
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {within:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out), read(&err))
}

/// The page itself, without a browser: served at `/` and `/index.html`, HTML, locked down by
/// its Content-Security-Policy, and nothing in it loads from another origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_is_served_self_contained() {
    let stable = Upstream::text("stable").await;
    let cfg = ConfigFile::new(&route(stable.addr, None, ""));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let admin = proxy.admin_addr();
    let client = client();

    let root = get(&client, admin, "/").await;
    assert_eq!(root.status, StatusCode::OK, "{}", root.text());
    assert_eq!(root.headers["content-type"], "text/html; charset=utf-8");
    let csp = root.headers["content-security-policy"].to_str().expect("ascii");
    for directive in ["default-src 'none'", "connect-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(directive), "CSP lacks {directive}: {csp}");
    }
    let page = root.text();
    assert!(page.contains("api/v1/routes"), "the page polls the routes API");
    for verb in ["pause", "resume", "promote", "abort"] {
        let button = format!("data-verb=\"{verb}\"");
        assert!(page.contains(&button) && page.contains(&format!(">{verb}</button>")), "no {verb} button");
    }
    // The only absolute URL is the SVG namespace, which is a name, not a fetch.
    let absolute: Vec<&str> = page.match_indices("http").map(|(i, _)| &page[i..(i + 40).min(page.len())]).collect();
    assert!(absolute.iter().all(|u| u.starts_with("http://www.w3.org/2000/svg")), "{absolute:?}");
    assert!(!page.contains("<script src") && !page.contains("<link rel=\"stylesheet\""));

    let index = get(&client, admin, "/index.html").await;
    assert_eq!((index.status, &index.body), (StatusCode::OK, &root.body));
    let post = post(&client, admin, "/", &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED, "{}", post.text());

    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_clicked_in_headless_chromium_rolls_the_route_back() {
    let chromium = match browser_tools() {
        Ok(c) => c,
        Err(why) => {
            skip_unless_required(
                "VEER_REQUIRE_BROWSER",
                "abort_clicked_in_headless_chromium_rolls_the_route_back",
                &why,
            );
            return;
        }
    };

    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("candidate").await;
    let body = format!(
        "{}{}",
        listeners("", "token_file = \"admin.token\""),
        RouteFixture::new(stable.addr, cand.addr).steps("[50, 100]").toml()
    );
    let cfg = ConfigFile::new(&body);
    std::fs::write(cfg.dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("token file");
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let (http, admin) = (proxy.http_addr(), proxy.admin_addr());
    let client = client();

    // Traffic for the charts while the browser looks.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = background_traffic(http, Duration::from_millis(10), stop.clone());
    eventually(Duration::from_secs(10), "the rollout is progressing", || async {
        route_status(&client, admin, "web").await["phase"] == "progressing"
    })
    .await;

    let reason = "clicked abort in the dashboard test";
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let mut cmd = Command::new("node");
    cmd.current_dir(browser_dir())
        .arg("dashboard.js")
        .args(["--url", &format!("http://{admin}/"), "--route", "web", "--token", TOKEN, "--reason", reason])
        .arg("--screenshot")
        .arg(&screenshot)
        .env("CHROMIUM", &chromium);
    let (status, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_bounded(cmd, Duration::from_secs(120))).await.expect("join");
    assert!(status.success(), "the browser script failed ({status}):\n{stderr}\n{stdout}");
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("browser saw: {seen:#}\nscreenshot: {}", screenshot.display());

    // What the page showed.
    assert_eq!(seen["ok"], true);
    assert!(seen["heading"].as_str().expect("heading").starts_with("web progressing step 1 of 2"), "{seen}");
    assert_eq!(seen["phase_before"], "progressing");
    assert_eq!(seen["version_rows"], 2, "stable and candidate rows");
    assert!(seen["connection"].as_str().expect("connection").starts_with("live"), "{seen}");
    let unauthorized = seen["unauthorized"].as_str().expect("the 401 message");
    assert!(unauthorized.contains("HTTP 401: a valid bearer token is required"), "{unauthorized}");
    assert!(seen["after_click"].as_str().expect("message").contains("rolled_back"), "{seen}");
    assert!(seen["transition"].as_str().expect("transition").contains(reason), "{seen}");
    let conflict = seen["conflict"].as_str().expect("the 409 message");
    let why = conflict.strip_prefix("abort failed, HTTP 409: ").unwrap_or_else(|| panic!("{conflict}"));
    assert!(!why.is_empty(), "the API's reason is shown: {conflict}");

    // What the proxy did: the click, and only the click, rolled the route back.
    let s = route_status(&client, admin, "web").await;
    assert_eq!(s["phase"], "rolled_back", "{s:#}");
    assert_eq!(s["candidate_weight"], 0.0, "{s:#}");
    assert_eq!(s["last_transition"]["reason"], reason, "{s:#}");
    assert_eq!(s["rollback"]["rule"], "manual", "{s:#}");
    let events = get(&client, admin, "/api/v1/events?route=web").await;
    let events: serde_json::Value = serde_json::from_slice(&events.body).expect("events JSON");
    let to_rolled_back = events.as_array().expect("events").iter().filter(|e| e["to"] == "rolled_back").count();
    assert_eq!(to_rolled_back, 1, "one rollback, from the authorised click: {events:#}");

    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("traffic task");
    proxy.drain().await;
}
