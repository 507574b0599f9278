//! The book's pages link to each other and into sections of each other; a renamed page or
//! heading would leave readers on a dead link. Every relative link in the Markdown docs must
//! name a file that exists and, with `#anchor`, a heading of that file that produces the anchor
//! (GitHub's slugs: lower case, punctuation dropped, spaces as `-`, `-1`, `-2` for repeats).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files a reader browses: the front door, the code map, the changelog, the
/// benchmark notes and every page of the book.
fn pages() -> Vec<PathBuf> {
    let r = root();
    let mut out: Vec<PathBuf> =
        ["README.md", "ARCHITECTURE.md", "CHANGELOG.md", "benches/README.md"].iter().map(|p| r.join(p)).collect();
    let mut book: Vec<PathBuf> = std::fs::read_dir(r.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("readable docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    book.sort();
    out.extend(book);
    out
}

/// The lines outside fenced code blocks, with their line numbers (from 1).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fence = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fence = !fence;
        } else if !fence {
            out.push((n + 1, line));
        }
    }
    out
}

fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(path: &Path) -> HashSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let mut out = HashSet::new();
    for (_, line) in prose(&text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let s = slug(line[hashes..].trim_end_matches('#'));
        let n = seen.entry(s.clone()).or_insert(0);
        out.insert(if *n == 0 { s.clone() } else { format!("{s}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of `[text](target)` links in `line`.
fn link_targets(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = &after[..end];
        if !target.contains(char::is_whitespace) {
            out.push(target);
        }
        rest = &after[end..];
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        for (n, line) in prose(&text) {
            for target in link_targets(line) {
                let scheme = target.split_once(':').is_some_and(|(s, _)| s.chars().all(|c| c.is_ascii_lowercase()));
                if scheme {
                    continue;
                }
                checked += 1;
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let dest = if file.is_empty() { page.clone() } else { page.parent().expect("a parent dir").join(file) };
                let shown = format!(
                    "{} (prose line {}): {target}",
                    page.strip_prefix(root()).unwrap_or(&page).display(),
                    n + 1
                );
                if !dest.exists() {
                    broken.push(format!("{shown}: no such file"));
                } else if !anchor.is_empty() && !anchors(&dest).contains(anchor) {
                    broken.push(format!("{shown}: no heading gives #{anchor}"));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} links found: is the scan still reading the pages?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("[routes.rollout]"), "routesrollout");
    assert_eq!(slug("The CLI and the API"), "the-cli-and-the-api");
    assert_eq!(link_targets("see [a](x.md#y) and [b](../z.md)."), vec!["x.md#y", "../z.md"]);
}
