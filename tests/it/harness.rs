//! The shared test harness itself: a skip is never silent, and `send_until` sends exactly as
//! much traffic as its condition needs, within its bounds.
#![allow(clippy::disallowed_methods)]

use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;

/// Set only in the child runs below: makes `probe_skips_when_asked` skip.
const PROBE: &str = "VEER_HARNESS_SKIP_PROBE";
/// The require variable the probe names.
const PROBE_REQUIRED: &str = "VEER_REQUIRE_HARNESS_PROBE";

/// Not a check on its own: in a child run with [`PROBE`] set, it skips like a test whose tool
/// is missing. Without it, it does nothing.
#[test]
fn probe_skips_when_asked() {
    if std::env::var_os(PROBE).is_some() {
        skip_unless_required(PROBE_REQUIRED, "probe_skips_when_asked", "the probe tool is missing\non purpose");
    }
}

/// The probe's full test name: libtest names a test by its module path inside the test crate
/// (`harness::probe_skips_when_asked` in the crate of all integration tests).
fn probe_name() -> String {
    match module_path!().split_once("::") {
        Some((_crate, module)) => format!("{module}::probe_skips_when_asked"),
        None => "probe_skips_when_asked".to_string(),
    }
}

/// Runs this test binary's probe alone, with `envs`.
fn run_probe(envs: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.arg(probe_name()).args(["--exact", "--test-threads", "1"]).env(PROBE, "1").env_remove(PROBE_REQUIRED);
    cmd.env_remove("VEER_SKIP_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run the probe")
}

#[test]
fn a_skip_is_recorded_in_the_skip_log_and_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skipped.log");
    std::fs::write(&log, "SKIPPED an_earlier_test: it was here first\n").expect("seed");
    for _ in 0..2 {
        let out = run_probe(&[("VEER_SKIP_LOG", log.as_os_str())]);
        assert!(out.status.success(), "a skip passes: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(&log).expect("skip log");
    let lines: Vec<&str> = text.lines().collect();
    let want = "SKIPPED probe_skips_when_asked: the probe tool is missing on purpose \
                (set VEER_REQUIRE_HARNESS_PROBE=1 to require it)";
    assert_eq!(lines, ["SKIPPED an_earlier_test: it was here first", want, want], "appended, one line each");
}

#[test]
fn a_skip_fails_when_its_tool_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skipped.log");
    let out = run_probe(&[("VEER_SKIP_LOG", log.as_os_str()), (PROBE_REQUIRED, "1".as_ref())]);
    assert!(!out.status.success(), "a required tool that is missing fails the test");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("VEER_REQUIRE_HARNESS_PROBE=1 but probe_skips_when_asked cannot run"), "{said}");
    assert!(!log.exists(), "a failure is not a skip");
}

#[test]
fn a_skip_without_a_skip_log_still_says_so_on_stderr() {
    let out = run_probe(&[("RUST_TEST_NOCAPTURE", "1".as_ref())]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("!!! SKIPPED probe_skips_when_asked:"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_until_stops_as_soon_as_the_condition_holds() {
    let up = Upstream::text("ok").await;
    let c = client();
    let hits = up.hits.clone();
    let sent = send_until(&c, up.addr, 100, Duration::from_secs(30), "seven requests", || {
        let n = hits.load(Ordering::Relaxed);
        async move { n >= 7 }
    })
    .await;
    assert_eq!((sent, up.hits()), (7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "after 5 requests, still waiting for: never")]
async fn send_until_gives_up_after_its_request_count() {
    let up = Upstream::text("ok").await;
    let c = client();
    send_until(&c, up.addr, 5, Duration::from_secs(30), "never", || async { false }).await;
}

#[test]
fn find_tool_looks_on_path_and_in_sbin() {
    assert!(find_tool("sh").is_some_and(|p| p.is_file()), "sh is on every PATH");
    assert_eq!(find_tool("veer-no-such-tool"), None);
}
