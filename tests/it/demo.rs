//! `veer demo` as a user runs it (stdout not a terminal: plain progress lines).
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use crate::common::*;

fn demo(scenario: &str) -> (bool, String) {
    let child = std::process::Command::new(veer_bin())
        .args(["demo", "--scenario", scenario])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the demo");
    let out = child.wait_with_output().expect("demo output");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_a_bad_candidate_snapped_back_and_prints_the_report() {
    let (ok, out) = tokio::time::timeout(Duration::from_secs(120), tokio::task::spawn_blocking(|| demo("errors")))
        .await
        .expect("the demo ends by itself")
        .expect("join");
    assert!(ok, "{out}");
    for needle in [
        "candidate   5.0%",
        "the candidate goes bad",
        "rolled_back",
        "# Rollout report: shop",
        "## Timeline",
        "rolled back after",
    ] {
        assert!(out.contains(needle), "demo output lacks {needle:?}:\n{out}");
    }
    assert!(!out.contains("\x1b[2J"), "no screen redraws when stdout is not a terminal");
}

/// `veer demo --fleet` with `args`, PATH and the fallback directories as given: (success,
/// stdout, stderr).
fn fleet_demo(args: &[&str], path: Option<&std::path::Path>) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(veer_bin());
    cmd.args(["demo", "--fleet"]).args(args).env("RUST_LOG", "error");
    if let Some(p) = path {
        cmd.env("PATH", p).env("VEER_DEMO_ETCD_DIRS", "");
    }
    let out = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the fleet demo")
        .wait_with_output()
        .expect("fleet demo output");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The story every fleet demo that goes bad tells: three replicas following one rollout, one
/// replica's candidate going bad, every replica back at 0%, the report and the judge that
/// tripped. Returns the etcd URL the demo printed.
fn assert_fleet_story(ok: bool, out: &str, err: &str) -> String {
    assert!(ok, "{out}\n{err}");
    for needle in [
        "replica edge-1  proxy http://127.0.0.1:",
        "replica edge-2  proxy http://127.0.0.1:",
        "replica edge-3  proxy http://127.0.0.1:",
        "fleet     progressing step 1/4  candidate 5.00%",
        "replica   edge-3     5.00%  following",
        "edge-3's candidate goes bad (the other replicas' candidates stay healthy)",
        "fleet     rolled_back  candidate 0.00%",
        "# Rollout report: shop",
        "**rolled back** to 100% stable",
        "## Timeline",
        "tripped: ",
        "candidate weight at the end: edge-1 0.00%, edge-2 0.00%, edge-3 0.00%",
        "rolled back after",
    ] {
        assert!(out.contains(needle), "fleet demo output lacks {needle:?}:\n{out}\n{err}");
    }
    assert!(out.contains("  leader"), "a replica leads:\n{out}");
    assert!(!out.contains("\x1b[2J"), "no screen redraws when stdout is not a terminal");
    // Every replica of the last block is at 0%.
    let last = &out[out.rfind("fleet     rolled_back").expect("the rollback block")..];
    for node in ["edge-1", "edge-2", "edge-3"] {
        assert!(last.contains(&format!("replica   {node}     0.00%")), "{node} not at 0%:\n{last}");
    }
    let url = out.split("through etcd at ").nth(1).and_then(|r| r.lines().next()).expect("the etcd URL");
    url.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_demo_snaps_three_replicas_back_when_one_replica_s_candidate_goes_bad() {
    if find_tool("etcd").is_none() {
        skip_unless_required(
            crate::common::etcd::REQUIRE_ETCD,
            "the fleet demo",
            "no `etcd` binary (apt-get install etcd-server)",
        );
        return;
    }
    let run = tokio::task::spawn_blocking(|| fleet_demo(&["--scenario", "errors"], None));
    let (ok, out, err) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the fleet demo ends by itself")
        .expect("join");
    let url = assert_fleet_story(ok, &out, &err);
    // Its own etcd is gone with it.
    let addr = url.trim_start_matches("http://").to_string();
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the demo's etcd at {addr} still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_demo_runs_against_an_existing_etcd_and_deletes_its_keys() {
    let Some(etcd) = crate::common::etcd::Etcd::start(1).await else { return };
    let url = etcd.client_url(0);
    let args = ["--scenario".to_string(), "latency".to_string(), "--etcd".to_string(), url.clone()];
    let run =
        tokio::task::spawn_blocking(move || fleet_demo(&args.iter().map(String::as_str).collect::<Vec<_>>(), None));
    let (ok, out, err) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the fleet demo ends by itself")
        .expect("join");
    assert_eq!(assert_fleet_story(ok, &out, &err), url);
    let mut client = etcd.client().await;
    let left = client
        .get("/veer-demo/", Some(etcd_client::GetOptions::new().with_prefix().with_count_only()))
        .await
        .expect("count the demo's keys");
    assert_eq!(left.count(), 0, "the demo's keys are deleted at the end");
}

#[test]
fn the_fleet_demo_without_etcd_says_how_to_get_one_and_fails() {
    let empty = tempfile::tempdir().expect("empty PATH dir");
    let (ok, out, err) = fleet_demo(&[], Some(empty.path()));
    assert!(!ok, "exits non-zero without etcd:\n{out}\n{err}");
    for needle in ["no `etcd` binary is on PATH", "apt-get install etcd-server", "--fleet --etcd http://"] {
        assert!(err.contains(needle), "the message lacks {needle:?}:\n{err}");
    }
    assert!(!out.contains("replica edge-1"), "no replica starts without etcd:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_fleet_demo_stops_its_etcd_and_removes_its_files() {
    use std::io::BufRead;
    if find_tool("etcd").is_none() {
        skip_unless_required(
            crate::common::etcd::REQUIRE_ETCD,
            "the fleet demo",
            "no `etcd` binary (apt-get install etcd-server)",
        );
        return;
    }
    let mut child = std::process::Command::new(veer_bin())
        .args(["demo", "--fleet", "--scenario", "healthy"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the fleet demo");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    // Until the fleet shows its first block: etcd, three replicas and the traffic are running.
    // The reader keeps draining stdout afterwards, so the demo never writes to a closed pipe.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let (mut url, mut tx) = (None, Some(tx));
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(u) = line.split("through etcd at ").nth(1) {
                url = Some(u.trim().to_string());
            }
            if line.starts_with("  replica   edge-1")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(url.clone());
            }
        }
    });
    let url = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the fleet demo shows the fleet")
        .expect("the reader saw the fleet")
        .expect("the etcd URL, then the fleet");
    let dir = std::env::temp_dir().join(format!("veer-demo-fleet-{pid}"));
    assert!(dir.is_dir(), "the demo's files are in {}", dir.display());
    let sent = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().expect("run kill");
    assert!(sent.success());
    let waited =
        tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || child.wait_with_output()))
            .await
            .expect("the demo stops on Ctrl-C")
            .expect("join")
            .expect("demo exit");
    reader.join().expect("stdout reader");
    let err = String::from_utf8_lossy(&waited.stderr);
    assert!(!waited.status.success(), "an interrupted demo exits non-zero");
    assert!(err.contains("interrupted"), "{err}");
    let addr = url.trim_start_matches("http://");
    assert!(std::net::TcpStream::connect(addr).is_err(), "the demo's etcd at {addr} still answers");
    assert!(!dir.exists(), "{} is removed", dir.display());
}
