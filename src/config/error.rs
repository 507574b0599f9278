//! Config errors that point at the file, line, column and key.
//!
//! An operator who mistypes one value in a long file should be sent straight to it, the way a
//! compiler does. Every problem found while parsing or validating becomes a [`Diagnostic`];
//! all of them are collected so that one `veer check` shows every mistake at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// Dotted key path, e.g. `routes[0].rollout.steps`; empty when the file itself is at fault.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a config could not be loaded. Nothing that is running changes when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The individual problems (empty for a read error).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(d) => d,
        }
    }
}

fn render(diags: &[Diagnostic]) -> String {
    let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    lines.join("\n")
}

/// Turns byte offsets of one source text into line/column positions.
pub struct SourceMap<'a> {
    file: &'a Path,
    src: &'a str,
}

impl<'a> SourceMap<'a> {
    /// A map over `src`, which was read from `file`.
    pub fn new(file: &'a Path, src: &'a str) -> Self {
        SourceMap { file, src }
    }

    /// 1-based (line, column) of a byte offset; columns count characters, not bytes.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let before = &self.src[..floor_char_boundary(self.src, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// A diagnostic at `span` about `key`. Line breaks in the message (a file name written in
    /// the config may hold one) are escaped: `veer check` prints one diagnostic per line, each
    /// starting with its FILE:LINE:COL.
    pub fn at(&self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.position(span.start);
        let message = message.into().replace('\n', "\\n").replace('\r', "\\r");
        Diagnostic { file: self.file.to_path_buf(), line, col, key: key.into(), message }
    }

    /// A diagnostic for an error reported by the TOML parser, naming the key it sits under.
    pub fn from_toml(&self, err: &toml::de::Error) -> Diagnostic {
        // Without a span (e.g. the parser's recursion limit) the error is about the file, not
        // about whatever the first line happens to hold.
        let key = err.span().map_or_else(String::new, |s| self.key_at(s.start));
        let span = err.span().unwrap_or(0..0);
        let message = err.message().trim().replace('\n', " ");
        self.at(span, key, message)
    }

    /// Best effort dotted key for the text at `offset`: the enclosing table header (with the
    /// index of array tables such as `[[routes]]`) plus the key written on that line. The TOML
    /// parser reports positions, not key paths.
    fn key_at(&self, offset: usize) -> String {
        let offset = floor_char_boundary(self.src, offset.min(self.src.len()));
        let line_start = self.src[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.src[offset..].find('\n').map_or(self.src.len(), |i| offset + i);
        let line = self.src[line_start..line_end].trim();
        let mut table: Option<String> = None;
        let mut arrays: Vec<(String, usize)> = Vec::new();
        for l in self.src[..line_end].lines().map(str::trim).filter(|l| l.starts_with('[')) {
            if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let name = name.trim().to_string();
                match arrays.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, count)) => *count += 1,
                    None => arrays.push((name.clone(), 0)),
                }
                table = Some(name);
            } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
                table = Some(name.trim().to_string());
            }
        }
        // `routes.rollout` under the third `[[routes]]` is `routes[2].rollout`.
        let table = table.map(|t| {
            let (head, rest) = t.split_once('.').map_or((t.as_str(), ""), |(h, r)| (h, r));
            match arrays.iter().find(|(n, _)| n == head) {
                Some((_, i)) if rest.is_empty() => format!("{head}[{i}]"),
                Some((_, i)) => format!("{head}[{i}].{rest}"),
                None => t.clone(),
            }
        });
        let key =
            if line.starts_with('[') { "" } else { line.split('=').next().unwrap_or("").trim().trim_matches('"') };
        let path = match (table, key.is_empty()) {
            (Some(t), false) => format!("{t}.{key}"),
            (Some(t), true) => t,
            (None, _) => key.to_string(),
        };
        path.chars().filter(|c| !c.is_control()).collect()
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_chars() {
        let src = "a = 1\nbé = 2\n";
        let map = SourceMap::new(Path::new("f.toml"), src);
        assert_eq!(map.position(0), (1, 1));
        assert_eq!(map.position(6), (2, 1));
        assert_eq!(map.position(src.find('=').unwrap()), (1, 3));
        let second_eq = src.rfind('=').unwrap();
        assert_eq!(map.position(second_eq), (2, 4));
    }

    #[test]
    fn key_includes_enclosing_table() {
        let src = "[server]\nlisten = 5\n";
        let map = SourceMap::new(Path::new("f.toml"), src);
        assert_eq!(map.key_at(src.find('5').unwrap()), "server.listen");
    }

    #[test]
    fn key_counts_array_tables() {
        let src = "[[routes]]\nname = 1\n[[routes]]\nname = 2\n[routes.rollout]\nstepz = 3\n";
        let map = SourceMap::new(Path::new("f.toml"), src);
        assert_eq!(map.key_at(src.find('1').unwrap()), "routes[0].name");
        assert_eq!(map.key_at(src.find('2').unwrap()), "routes[1].name");
        assert_eq!(map.key_at(src.find("stepz").unwrap()), "routes[1].rollout.stepz");
        assert_eq!(map.key_at(src.find("[routes.rollout]").unwrap()), "routes[1].rollout");
    }
}
