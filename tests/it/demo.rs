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
