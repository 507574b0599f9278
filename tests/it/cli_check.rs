//! `veer check` and the CLI's exit codes, through the built binary.
//!
//! These tests only look at what an operator sees: the exit code, the summary on stdout and
//! the `FILE:LINE:COL: key: message` lines on stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::RouteFixture;
use tempfile::NamedTempFile;

/// The `[server]` table of [`base`]: `veer check` never binds it.
const SERVER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n\n";

/// A valid config, one two-version route without a rollout table; broken configs below are
/// built by appending to it.
fn base() -> String {
    format!("{SERVER}{}", base_route())
}

/// The route of [`base`] on its own.
fn base_route() -> String {
    RouteFixture::new("127.0.0.1:9001", "127.0.0.1:9002").without_rollout().toml()
}

/// Runs the binary from the repository root with `args`.
fn veer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("VEER_CONFIG")
        .env_remove("VEER_ADMIN")
        .env_remove("VEER_TOKEN")
        .output()
        .expect("run the veer binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn assert_no_panic(o: &Output) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "veer panicked:\n{err}");
}

/// Writes `bytes` to a fresh `.toml` file.
fn config_file(bytes: &[u8]) -> NamedTempFile {
    let mut f = tempfile::Builder::new().prefix("veer-check-").suffix(".toml").tempfile().expect("create temp file");
    f.write_all(bytes).expect("write temp file");
    f.flush().expect("flush temp file");
    f
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp path is UTF-8")
}

/// Runs `veer check` on `src` and returns the file (kept alive) and the output.
fn check_bytes(bytes: &[u8]) -> (NamedTempFile, Output) {
    let f = config_file(bytes);
    let out = veer(&["check", path_str(f.path())]);
    assert_no_panic(&out);
    (f, out)
}

/// 1-based line and column of byte `offset` in `src` (ASCII sources only).
fn position(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Checks `src`, expects exit 1 and a `FILE:LINE:COL: key: ` line pointing at `offset`; returns
/// that line's message.
fn expect_error_at(src: &str, offset: usize, key: &str) -> String {
    let (f, out) = check_bytes(src.as_bytes());
    assert_exit(&out, 1);
    let (line, col) = position(src, offset);
    let prefix = format!("{}:{line}:{col}: {key}: ", path_str(f.path()));
    let err = stderr(&out);
    let hit = err.lines().find(|l| l.starts_with(&prefix));
    let hit = hit.unwrap_or_else(|| panic!("no line starting with {prefix:?} in stderr:\n{err}\nsource:\n{src}"));
    hit[prefix.len()..].to_string()
}

// === the shipped examples ===

fn example_checks_and_names(file: &str, routes: &[&str]) {
    let out = veer(&["check", file]);
    assert_no_panic(&out);
    assert_exit(&out, 0);
    assert!(stderr(&out).is_empty(), "check wrote to stderr:\n{}", stderr(&out));
    let summary = stdout(&out);
    let head = format!("{file}: OK, {} route(s)", routes.len());
    assert!(summary.starts_with(&head), "summary does not start with {head:?}:\n{summary}");
    for name in routes {
        let line = format!("route {name} (");
        assert!(
            summary.lines().any(|l| l.trim_start().starts_with(&line)),
            "summary does not name route {name:?}:\n{summary}"
        );
    }
}

#[test]
fn full_example_is_valid() {
    example_checks_and_names("config/veer.toml", &["checkout"]);
}

#[test]
fn blue_green_example_is_valid() {
    example_checks_and_names("config/blue-green.toml", &["billing"]);
    let summary = stdout(&veer(&["check", "config/blue-green.toml"]));
    assert!(summary.contains("blue-green"), "plan is not blue-green:\n{summary}");
}

#[test]
fn edge_example_is_valid() {
    example_checks_and_names("config/edge.toml", &["storefront", "assets", "orders", "api", "search", "lb-health"]);
    let summary = stdout(&veer(&["check", "config/edge.toml"]));
    assert!(
        summary.contains("no candidate: 100% stable"),
        "edge example should have routes without candidate:\n{summary}"
    );
}

#[test]
fn a_valid_temp_file_passes() {
    let (f, out) = check_bytes(base().as_bytes());
    assert_exit(&out, 0);
    assert!(stdout(&out).starts_with(&format!("{}: OK, 1 route(s)", path_str(f.path()))), "{}", stdout(&out));
}

// === broken configs point at the line and key ===

#[test]
fn unknown_key_names_its_line_and_key() {
    let src = format!("{}\n[routes.rollout]\nstepz = [1, 100]\n", base());
    let msg = expect_error_at(&src, src.find("stepz").unwrap(), "routes[0].rollout.stepz");
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn steps_out_of_order_point_at_the_offending_step() {
    let src = format!("{}\n[routes.rollout]\nsteps = [5, 1, 100]\n", base());
    let offset = src.find("1, 100]").unwrap();
    let msg = expect_error_at(&src, offset, "routes[0].rollout.steps");
    assert!(msg.contains("strictly increasing"), "{msg}");
}

#[test]
fn bad_duration_points_at_the_value() {
    let src = format!("{}\n[routes.rollback]\nwindow = \"30 parsecs\"\n", base());
    let msg = expect_error_at(&src, src.find("\"30 parsecs\"").unwrap(), "routes[0].rollback.window");
    assert!(msg.contains("not a duration"), "{msg}");
}

#[test]
fn duplicate_route_name_points_at_the_second_route() {
    let src = format!("{}\n{}", base(), base_route());
    let second = src.rfind("\"web\"").unwrap();
    assert_ne!(second, src.find("\"web\"").unwrap());
    let msg = expect_error_at(&src, second, "routes[1].name");
    assert!(msg.contains("duplicate route name"), "{msg}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let src = format!("{}\n[routes.rollout]\nsteps = [5, 1, 100]\n\n[routes.rollback]\nwindow = \"soon\"\n", base());
    let (f, out) = check_bytes(src.as_bytes());
    assert_exit(&out, 1);
    let err = stderr(&out);
    let file = path_str(f.path());
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with(&format!("{file}:"))).collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("routes[0].rollout.steps"), "{err}");
    assert!(lines[1].contains("routes[0].rollback.window"), "{err}");
}

// === files that are not configs at all ===

#[test]
fn empty_file_is_an_error_not_a_panic() {
    let (f, out) = check_bytes(b"");
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.starts_with(&format!("{}:1:1: ", path_str(f.path()))), "{err}");
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn binary_garbage_is_an_error_not_a_panic() {
    let not_utf8: Vec<u8> = (0..=255u8).rev().chain([0, 0xff, 0xfe, 0x80, b'[', b'[']).collect();
    let utf8_junk = b"\x01\x02[[[\x7f\x00 = = ]]\xc3\xa9\n\t\"\\u{zz}".to_vec();
    for bytes in [not_utf8, utf8_junk] {
        let (f, out) = check_bytes(&bytes);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.starts_with(&format!("{}:", path_str(f.path()))), "{err}");
        assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    }
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing: PathBuf = dir.path().join("nope.toml");
    let out = veer(&["check", path_str(&missing)]);
    assert_no_panic(&out);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
}

// === other verbs and usage errors ===

#[test]
fn admin_verbs_fail_clearly_when_no_veer_is_running() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let admin = format!("http://127.0.0.1:{port}");
    let out = veer(&["promote", "web", "--admin", &admin]);
    assert_no_panic(&out);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains(&admin), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    for args in [&["check"][..], &["no-such-verb"][..], &[][..]] {
        let out = veer(args);
        assert_no_panic(&out);
        assert_exit(&out, 2);
        assert!(!stderr(&out).is_empty(), "no usage message for {args:?}");
    }
}
