//! A corpus of broken configuration files: each gives one precise diagnostic (line, column, key,
//! message) and never a panic, through the library and through `veer check`.

use std::path::{Path, PathBuf};
use std::process::Command;

use veer::config::{Config, Diagnostic};

/// The first diagnostic a corpus file must produce, and how many there are in all.
struct Case {
    file: &'static str,
    line: usize,
    /// `None` where the column is the TOML parser's business (its recursion limit).
    col: Option<usize>,
    /// `None` where the "key" is garbage text that happens to sit on the line.
    key: Option<&'static str>,
    message: &'static [&'static str],
    count: usize,
}

const fn case(
    file: &'static str,
    line: usize,
    col: usize,
    key: &'static str,
    message: &'static [&'static str],
) -> Case {
    Case { file, line, col: Some(col), key: Some(key), message, count: 1 }
}

const CASES: &[Case] = &[
    // Wrong types, reported by serde at the value.
    case(
        "wrong_type_string_for_number.toml",
        3,
        19,
        "server.max_connections",
        &["invalid type: string \"lots\", expected i64"],
    ),
    case(
        "wrong_type_endpoints_not_a_list.toml",
        6,
        13,
        "routes[0].stable.endpoints",
        &["invalid type: string \"127.0.0.1:9001\", expected a sequence"],
    ),
    case(
        "wrong_type_bool.toml",
        2,
        22,
        "server.expose_role_header",
        &["invalid type: string \"yes\", expected a boolean"],
    ),
    // Unknown keys and tables, missing and duplicate keys.
    case("unknown_key.toml", 3, 1, "routes[0].weight", &["unknown field `weight`", "expected one of `name`"]),
    case("unknown_table.toml", 8, 9, "routes[0].canary", &["unknown field `canary`"]),
    case("missing_required_key.toml", 4, 1, "routes[0].stable", &["missing field `version`"]),
    case("duplicate_key.toml", 3, 1, "routes[0].name", &["duplicate key"]),
    case("unclosed_string.toml", 2, 12, "routes[0].name", &["invalid basic string"]),
    // Durations.
    case(
        "bad_duration.toml",
        14,
        17,
        "routes[0].rollout.step_interval",
        &["\"5 fortnights\" is not a duration", "unknown time unit \"fortnights\"", "write e.g. \"250ms\""],
    ),
    case("zero_duration.toml", 2, 19, "server.request_timeout", &["duration must be greater than zero"]),
    case(
        "tick_not_shorter_than_window.toml",
        11,
        8,
        "routes[0].rollback.tick",
        &["tick (2s) must be shorter than the window (1s)"],
    ),
    // Steps.
    case(
        "steps_out_of_order.toml",
        13,
        18,
        "routes[0].rollout.steps",
        &["step 25 does not increase (previous step is 50); steps must be strictly increasing"],
    ),
    case("steps_not_ending_at_100.toml", 13, 20, "routes[0].rollout.steps", &["the last step must be 100"]),
    case("steps_out_of_range.toml", 13, 10, "routes[0].rollout.steps", &["step -5 is outside (0, 100]"]),
    // Routes.
    case(
        "duplicate_routes.toml",
        15,
        8,
        "routes[2].name",
        &["duplicate route name \"web\": route names must be unique"],
    ),
    case("bad_route_name.toml", 2, 8, "routes[0].name", &["\"Web Shop\" is not a valid route name"]),
    case(
        "candidate_equals_stable.toml",
        7,
        11,
        "routes[0].candidate.version",
        &["candidate version \"v1\" equals the stable version"],
    ),
    case("unknown_strategy.toml", 10, 12, "routes[0].rollout.strategy", &["unknown strategy \"yolo\""]),
    case("sticky_header_and_cookie.toml", 9, 1, "routes[0].sticky", &["set exactly one of `header` or `cookie`"]),
    case("negative_count.toml", 3, 16, "routes[0].max_inflight", &["-1 is outside [0, "]),
    Case {
        count: 2,
        ..case("rates_out_of_range.toml", 10, 18, "routes[0].rollback.max_error_rate", &["5 is not a rate in [0, 1]"])
    },
    Case {
        count: 3,
        ..case("bad_addresses.toml", 2, 10, "server.listen", &["\"localhost:8080\" is not an IP:port socket address"])
    },
    // Listeners, TLS and the admin API.
    case(
        "missing_tls_files.toml",
        4,
        12,
        "server.tls_cert",
        &["cannot load TLS certificate/key", "no-such-dir/veer.crt"],
    ),
    // A line break in a file name once split the diagnostic over two lines of `veer check`
    // output (the config_parse fuzz target checks that every diagnostic is one line).
    case(
        "tls_file_name_with_newline.toml",
        5,
        12,
        "server.tls_cert",
        &["cannot load TLS certificate/key", "no-such-dir/line\\nbreak.crt"],
    ),
    case(
        "tls_half_configured.toml",
        2,
        14,
        "server.tls_listen",
        &["tls_listen, tls_cert and tls_key must be set together"],
    ),
    case(
        "public_admin_without_token.toml",
        2,
        10,
        "admin.listen",
        &["0.0.0.0:9901 is reachable from other hosts: set admin.token_file"],
    ),
    // Empty, garbage and deeply nested files.
    case("empty.toml", 1, 1, "", &["the file is empty"]),
    case("whitespace_and_comments.toml", 1, 1, "routes", &["no [[routes]] defined"]),
    case("no_routes.toml", 1, 1, "routes", &["no [[routes]] defined"]),
    case("binary_garbage.bin", 1, 9, "", &["not UTF-8 text"]),
    Case { key: None, ..case("utf8_garbage.toml", 1, 3, "", &["key with no value, expected `=`"]) },
    Case { col: None, ..case("deeply_nested_arrays.toml", 2, 0, "steps", &["recursion"]) },
    Case { col: None, ..case("deeply_nested_inline_tables.toml", 2, 0, "server", &["recursion"]) },
    case("deeply_nested_table_header.toml", 1, 1, "", &["recursion limit"]),
];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("config_corpus")
}

fn diagnostics(path: &Path) -> Vec<Diagnostic> {
    match Config::load(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => {
            let d = e.diagnostics().to_vec();
            assert!(!d.is_empty(), "{}: an error without a diagnostic: {e}", path.display());
            d
        }
    }
}

fn check(case: &Case, diags: &[Diagnostic], path: &Path) {
    let first = &diags[0];
    let shown = diags.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n");
    assert_eq!(first.file, path, "{}", case.file);
    assert_eq!(first.line, case.line, "{}: line\n{shown}", case.file);
    if let Some(col) = case.col {
        assert_eq!(first.col, col, "{}: column\n{shown}", case.file);
    }
    if let Some(key) = case.key {
        assert_eq!(first.key, key, "{}: key\n{shown}", case.file);
    }
    for fragment in case.message {
        assert!(first.message.contains(fragment), "{}: {fragment:?} not in\n{shown}", case.file);
    }
    assert_eq!(diags.len(), case.count, "{}: number of problems\n{shown}", case.file);
    let mut sorted = diags.to_vec();
    sorted.sort_by_key(|d| (d.line, d.col));
    assert_eq!(sorted, diags, "{}: problems are listed top to bottom", case.file);
}

#[test]
fn every_corpus_file_gives_its_precise_error() {
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .expect("corpus dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f != "README.md")
        .collect();
    files.sort();
    let mut listed: Vec<String> = CASES.iter().map(|c| c.file.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "every corpus file has exactly one expectation");
    for case in CASES {
        let path = corpus().join(case.file);
        check(case, &diagnostics(&path), &path);
    }
}

/// Every prefix and every one-line deletion of each small corpus file is either a valid config
/// or a list of diagnostics that point inside the file: never a panic.
#[test]
fn truncated_and_mangled_corpus_files_never_panic_and_point_inside_the_file() {
    let mut parsed = 0;
    for case in CASES {
        let path = corpus().join(case.file);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if text.len() > 4096 {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        let mut variants: Vec<String> =
            (0..=text.len()).filter(|&i| text.is_char_boundary(i)).map(|i| text[..i].to_string()).collect();
        for skip in 0..lines.len() {
            let kept: Vec<&str> = lines.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, l)| *l).collect();
            variants.push(kept.join("\n"));
        }
        for v in variants {
            let outcome = std::panic::catch_unwind(|| Config::parse(&path, &v));
            let result = outcome.unwrap_or_else(|_| panic!("{}: parsing panicked on:\n{v}", case.file));
            if let Err(e) = result {
                let max_line = v.lines().count().max(1) + 1;
                for d in e.diagnostics() {
                    assert!(
                        (1..=max_line).contains(&d.line) && d.col >= 1,
                        "{}: {d} points outside the {max_line}-line text:\n{v}",
                        case.file
                    );
                }
            }
            parsed += 1;
        }
    }
    assert!(parsed > 5_000, "only {parsed} variants parsed");
}

/// A 10 MiB file: thousands of routes and comment lines, one mistake in the last route.
#[test]
fn a_huge_file_reports_the_one_mistake_at_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.toml");
    let mut text = String::with_capacity(11 << 20);
    text.push_str("[server]\nlisten = \"127.0.0.1:0\"\n\n");
    for i in 0..2_000 {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath_prefix = \"/r{i}\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9001\"]\n[routes.candidate]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9002\"]\n\n"
        ));
    }
    while text.len() < 10 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    text.push_str("[[routes]]\nname = \"last\"\npath_prefix = \"/last\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9001\"]\n[routes.candidate]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9002\"]\n[routes.rollout]\n");
    let line = text.lines().count() + 1;
    text.push_str("steps = [50, 10, 100]\n");
    std::fs::write(&path, &text).expect("write");
    let diags = diagnostics(&path);
    let want = Case {
        file: "huge.toml",
        line,
        col: Some(14),
        key: Some("routes[2000].rollout.steps"),
        message: &["step 10 does not increase (previous step is 50)"],
        count: 1,
    };
    check(&want, &diags, &path);
}

#[test]
fn veer_check_prints_the_same_precise_errors_and_exits_1() {
    for file in [
        "steps_out_of_order.toml",
        "binary_garbage.bin",
        "missing_tls_files.toml",
        "tls_file_name_with_newline.toml",
        "deeply_nested_arrays.toml",
    ] {
        let path = corpus().join(file);
        let out = Command::new(env!("CARGO_BIN_EXE_veer")).arg("check").arg(&path).output().expect("run veer check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
        let want: Vec<String> = diagnostics(&path).iter().map(|d| d.to_string()).collect();
        let got: Vec<&str> = stderr.lines().collect();
        assert_eq!(got, want, "{file}");
        assert!(got[0].starts_with(&format!("{}:", path.display())), "{file}: {}", got[0]);
    }
    let first = {
        let path = corpus().join("steps_out_of_order.toml");
        let out = Command::new(env!("CARGO_BIN_EXE_veer")).arg("check").arg(&path).output().expect("run veer check");
        String::from_utf8_lossy(&out.stderr).lines().next().map(str::to_string)
    };
    assert_eq!(
        first.as_deref().and_then(|l| l.split_once(".toml:")).map(|(_, rest)| rest),
        Some(
            "13:18: routes[0].rollout.steps: step 25 does not increase (previous step is 50); steps must be strictly increasing"
        )
    );
}
