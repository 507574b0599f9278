//! The shipped example `config/veer.toml` and the reference `docs/configuration.md` show every
//! key the parser accepts, and no key it does not.
//!
//! The key set comes from the parser's own types ([`veer::config::keys::key_paths`]), so a new
//! field in the parser fails these tests until both files describe it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use veer::config::Config;
use veer::config::keys::{KeyKind, key_paths};

fn repo_file(rel: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (path, text)
}

fn known() -> BTreeMap<String, KeyKind> {
    key_paths().into_iter().collect()
}

/// A `[name]` or `[[name]]` header on its own (a trailing comment allowed), or `None`.
fn header(line: &str) -> Option<(String, KeyKind)> {
    let (kind, open, close) = if line.starts_with("[[") {
        (KeyKind::TableArray, "[[", "]]")
    } else if line.starts_with('[') {
        (KeyKind::Table, "[", "]")
    } else {
        return None;
    };
    let inner = &line[open.len()..];
    let end = inner.find(close)?;
    let (name, rest) = (inner[..end].trim(), inner[end + close.len()..].trim_start());
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    (name_ok && (rest.is_empty() || rest.starts_with('#'))).then(|| (name.to_string(), kind))
}

/// The key of a `key = value` line starting in column 0, or `None`.
fn key(line: &str) -> Option<&str> {
    let end = line.find(|c: char| !(c.is_ascii_alphanumeric() || "_-.".contains(c))).unwrap_or(line.len());
    let rest = line[end..].trim_start();
    (end > 0 && rest.starts_with('=') && !rest[1..].trim().is_empty()).then(|| &line[..end])
}

/// What one TOML line declares, with its line number.
#[derive(Debug)]
struct Declared {
    line: usize,
    path: String,
    kind: KeyKind,
}

/// Headers and keys of `text`, commented (`# `) or not, with keys under their section.
fn declared_in_toml(text: &str) -> Vec<Declared> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.strip_prefix("# ").unwrap_or(raw);
        if let Some((name, kind)) = header(line) {
            section = name.clone();
            out.push(Declared { line: i + 1, path: name, kind });
        } else if let Some(k) = key(line) {
            let path = if section.is_empty() { k.to_string() } else { format!("{section}.{k}") };
            out.push(Declared { line: i + 1, path, kind: KeyKind::Value });
        }
    }
    out
}

/// Compares what a file declares with the parser's keys: unknown or mis-kinded entries (with
/// their line), and parser keys the file never shows.
fn compare(file: &str, declared: &[Declared]) -> Vec<String> {
    let known = known();
    let mut problems = Vec::new();
    for d in declared {
        match known.get(&d.path) {
            None => problems.push(format!("{file}:{}: `{}` is not a key the parser knows", d.line, d.path)),
            Some(k) if *k != d.kind => problems.push(format!(
                "{file}:{}: `{}` is written as a {:?} but the parser reads a {k:?}",
                d.line, d.path, d.kind
            )),
            Some(_) => {}
        }
    }
    let shown: BTreeSet<&str> = declared.iter().map(|d| d.path.as_str()).collect();
    let missing: Vec<&str> = known.keys().map(String::as_str).filter(|p| !shown.contains(p)).collect();
    if !missing.is_empty() {
        problems.push(format!("{file} does not show these keys the parser knows: {}", missing.join(", ")));
    }
    problems
}

#[test]
fn the_parser_knows_a_plausible_set_of_keys() {
    // Guards the checks below against an empty key list passing them trivially.
    let known = known();
    assert!(known.len() > 60, "only {} key paths traced: {known:?}", known.len());
    for path in ["server.idle_timeout", "routes.rollout.steps", "routes.stable.endpoints", "notify.events"] {
        assert_eq!(known.get(path), Some(&KeyKind::Value), "{path}");
    }
}

#[test]
fn shipped_example_shows_every_key_and_only_known_keys() {
    let (_, text) = repo_file("config/veer.toml");
    let problems = compare("config/veer.toml", &declared_in_toml(&text));
    assert!(problems.is_empty(), "config/veer.toml is out of step with the parser:\n{}", problems.join("\n"));
}

#[test]
fn shipped_example_loads() {
    let (path, _) = repo_file("config/veer.toml");
    if let Err(e) = Config::load(&path) {
        panic!("config/veer.toml does not load:\n{e}");
    }
}

#[test]
fn shipped_example_is_valid_toml_with_every_comment_taken_out() {
    // Each commented-out key must be well-formed where it stands, so uncommenting any of them
    // gives a file the TOML parser reads (whether the values make sense together is up to the
    // user: a certificate must exist, sticky takes only one of header and cookie).
    let (_, text) = repo_file("config/veer.toml");
    let uncommented: String = text
        .lines()
        .map(|raw| match raw.strip_prefix("# ") {
            Some(line) if header(line).is_some() || key(line).is_some() => line,
            _ => raw,
        })
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = toml::from_str::<toml::Table>(&uncommented) {
        panic!("config/veer.toml with its commented keys uncommented is not TOML:\n{e}");
    }
}

/// Section headings (`## [server]`, `### [routes.rollout]`) and the `` `key` `` in the first
/// column of table rows under them.
fn declared_in_reference(text: &str) -> Vec<Declared> {
    let mut section: Option<String> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            let title = line.trim_start_matches('#').trim();
            section = header(title).map(|(name, kind)| {
                out.push(Declared { line: i + 1, path: name.clone(), kind });
                name
            });
            continue;
        }
        let Some(row) = line.strip_prefix('|') else { continue };
        let first = row.split('|').next().unwrap_or("").trim();
        let Some(k) = first.strip_prefix('`').and_then(|f| f.strip_suffix('`')) else { continue };
        match &section {
            Some(s) => out.push(Declared { line: i + 1, path: format!("{s}.{k}"), kind: KeyKind::Value }),
            None => out.push(Declared { line: i + 1, path: k.to_string(), kind: KeyKind::Value }),
        }
    }
    out
}

#[test]
fn reference_page_documents_every_key_under_its_section() {
    let (_, text) = repo_file("docs/configuration.md");
    let problems = compare("docs/configuration.md", &declared_in_reference(&text));
    assert!(problems.is_empty(), "docs/configuration.md is out of step with the parser:\n{}", problems.join("\n"));
}

#[test]
fn reference_page_names_no_unknown_key_path_in_its_prose() {
    // Full paths written in prose (`server.idle_timeout`, `routes.retry.budget`) must be real.
    let (_, text) = repo_file("docs/configuration.md");
    let known = known();
    let tops: BTreeSet<&str> = known.keys().filter_map(|p| p.split('.').next()).collect();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for code in line.split('`').skip(1).step_by(2) {
            let is_path = code.contains('.')
                && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.".contains(&b))
                && code.split('.').next().is_some_and(|top| tops.contains(top));
            if is_path && !known.contains_key(code) {
                problems.push(format!("docs/configuration.md:{}: `{code}` is not a key the parser knows", i + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_catch_a_missing_and_an_unknown_key() {
    // The comparison itself, on a file with a key taken out and a misspelt one added.
    let (_, text) = repo_file("config/veer.toml");
    // The first `idle_timeout` is the one in [server]; [admin] keeps its own.
    let broken = text.replacen("\nidle_timeout = \"60s\"\n", "\nidle_timeout_typo = \"60s\"\n", 1);
    assert_ne!(broken, text, "the replaced line moved; adjust this test");
    let problems = compare("veer.toml", &declared_in_toml(&broken)).join("\n");
    assert!(problems.contains("`server.idle_timeout_typo` is not a key the parser knows"), "{problems}");
    assert!(problems.contains("does not show these keys the parser knows: server.idle_timeout"), "{problems}");
}
