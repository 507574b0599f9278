//! The admin-talking CLI verbs against a running proxy.
#![allow(clippy::disallowed_methods)]

use std::process::Output;

use crate::common::*;
use veer::server::Proxy;

async fn veer(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(veer_bin()).args(&args).env_remove("VEER_TOKEN").output().expect("run veer")
    })
    .await
    .expect("join")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_verbs_and_report_through_the_cli() {
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let body = format!(
        "{}{}",
        listeners("", "token_file = \"token\""),
        RouteFixture::new(stable.addr, cand.addr).steps("[10, 100]").toml()
    );
    let cfg = ConfigFile::new(&body);
    let token = cfg.dir.path().join("token");
    std::fs::write(&token, "let-me-in").expect("token");
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let admin = format!("http://{}", proxy.admin_addr());
    let with = |verb: &[&str]| {
        let mut v: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
        v.extend(["--admin".to_string(), admin.clone(), "--token-file".to_string(), token.display().to_string()]);
        v
    };

    let out = veer(with(&["status"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("web  progressing  step 1/2") && shown.contains("candidate v2"), "{shown}");

    let out = veer(with(&["status", "web", "--json"])).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["name"], "web");

    let out = veer(with(&["pause", "web", "--reason", "investigating"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("paused"), "{}", text(&out.stdout));

    let out = veer(with(&["pause", "web"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot pause"), "{}", text(&out.stderr));

    let mut no_token = with(&["abort", "web"]);
    no_token.truncate(4); // abort web --admin URL, without the token file
    let out = veer(no_token).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));

    let out = veer(with(&["abort", "web", "--reason", "bad build"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = veer(with(&["report", "web"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("# Rollout report: web")
            && report.contains("an operator aborted")
            && report.contains("bad build"),
        "{report}"
    );

    let out = veer(with(&["report", "nope"])).await;
    assert_eq!(out.status.code(), Some(1));
    proxy.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_and_survives_the_admin_server_going_away() {
    use std::io::Read;
    let stable = Upstream::text("stable").await;
    let cand = Upstream::text("cand").await;
    let cfg = ConfigFile::new(&route(stable.addr, Some(cand.addr), "[10, 100]"));
    let proxy = Proxy::start(&cfg.path).await.expect("start");
    let admin = format!("http://{}", proxy.admin_addr());
    let mut child = std::process::Command::new(veer_bin())
        .args(["status", "--watch", "--admin", &admin])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn status --watch");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = async |needle: &str, seen: &mut String| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        while !seen.contains(needle) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(chunk)) => seen.push_str(&chunk),
                _ => panic!("no {needle:?} in the watch output:\n{seen}"),
            }
        }
    };
    wait_for("weight    [###", &mut seen).await;
    wait_for("\x1b[2J", &mut seen).await;
    proxy.drain().await;
    seen.clear();
    wait_for("admin API unreachable", &mut seen).await;
    assert!(child.try_wait().expect("wait").is_none(), "the watcher keeps going when the admin server is gone");
    let _ = child.kill();
    let _ = child.wait();
}
