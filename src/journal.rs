//! The rollout journal: every transition, on disk before it reaches traffic.
//!
//! Two files per state directory:
//! - `events.jsonl`: one JSON event per line, appended and fsynced — the history that reports
//!   and post-mortems read, and the truth on restart;
//! - `routes/<route>.json`: the route's current state (phase, step, the judge's evidence),
//!   replaced atomically (write a temp file, fsync, rename, fsync the directory).
//!
//! A crash can leave a torn last line; readers skip any line that does not parse (with a
//! warning) and the next append starts on a fresh line, so one bad write never hides the rest.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::rollout::Phase;
use crate::rollout::judge::JudgeState;
use crate::rollout::machine::{EventKind, MachineState};

/// A journal event; also the body POSTed to webhooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 time.
    pub at: String,
    /// Route name.
    pub route: String,
    /// What happened.
    pub kind: EventKind,
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// Candidate weight after, percent.
    pub candidate_weight: f64,
    /// Why.
    pub reason: String,
    /// The judge's figures behind the decision (rollbacks), or `null`.
    #[serde(default)]
    pub evidence: serde_json::Value,
    /// Step after, when on one.
    #[serde(default)]
    pub step: Option<usize>,
    /// Candidate version the event is about.
    #[serde(default)]
    pub candidate_version: String,
    /// Stable version at the time.
    #[serde(default)]
    pub stable_version: String,
}

/// The state file of one route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// Route name.
    pub route: String,
    /// The candidate this state belongs to; a different configured version starts afresh.
    pub candidate_version: String,
    /// Phase and step.
    pub machine: MachineState,
    /// The judge's evidence, carried across restarts.
    pub judge: JudgeState,
    /// The event that produced this state.
    pub last_event: Event,
}

/// Why the journal could not record something.
#[derive(Debug, thiserror::Error)]
#[error("state dir {}: {source}", dir.display())]
pub struct JournalError {
    dir: PathBuf,
    source: io::Error,
}

/// The journal of one state directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    append: Mutex<Option<File>>,
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl Journal {
    /// A journal in `dir`; nothing is created until the first write.
    pub fn new(dir: &Path) -> Journal {
        Journal { dir: dir.to_path_buf(), append: Mutex::new(None) }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn events_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    fn record_path(&self, route: &str) -> PathBuf {
        self.dir.join("routes").join(format!("{route}.json"))
    }

    fn fail(&self, source: io::Error) -> JournalError {
        JournalError { dir: self.dir.clone(), source }
    }

    /// Appends `event` (fsynced), then replaces the route's state file atomically. Callers
    /// change traffic only after this returns.
    pub fn record(&self, event: &Event, record: &RouteRecord) -> Result<(), JournalError> {
        self.append(event).map_err(|e| self.fail(e))?;
        self.write_record(record).map_err(|e| self.fail(e))
    }

    fn append(&self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(self.open_for_append()?);
        }
        let file = guard.as_mut().expect("opened above");
        let written = file.write_all(&line).and_then(|()| file.sync_data());
        if written.is_err() {
            // Reopen next time: the handle may be unusable (disk replaced, permissions changed).
            *guard = None;
        }
        written
    }

    fn open_for_append(&self) -> io::Result<File> {
        fs::create_dir_all(&self.dir)?;
        let path = self.events_path();
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        if len > 0 {
            // A torn last line (crash mid-write) must not swallow the next event.
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                warn!(path = %path.display(), "journal ends with a torn line; starting a fresh one");
                file.write_all(b"\n")?;
            }
        }
        sync_dir(&self.dir)?;
        Ok(file)
    }

    /// Rewrites the route's state file alone (the judge's evidence between transitions).
    pub fn checkpoint(&self, record: &RouteRecord) -> Result<(), JournalError> {
        self.write_record(record).map_err(|e| self.fail(e))
    }

    fn write_record(&self, record: &RouteRecord) -> io::Result<()> {
        let path = self.record_path(&record.route);
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.json.tmp", record.route));
        let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    }

    /// Events, oldest first, optionally of one route, at most the newest `limit`.
    pub fn events(&self, route: Option<&str>, limit: Option<usize>) -> Vec<Event> {
        let path = self.events_path();
        let Ok(file) = File::open(&path) else { return Vec::new() };
        let mut out = Vec::new();
        for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
            let Ok(line) = line else { break };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Event>(&line) {
                Ok(e) if route.is_none_or(|r| r == e.route) => out.push(e),
                Ok(_) => {}
                Err(e) => {
                    warn!(path = %path.display(), line = n + 1, error = %e, "skipping an unreadable journal line")
                }
            }
        }
        if let Some(limit) = limit
            && out.len() > limit
        {
            out.drain(..out.len() - limit);
        }
        out
    }

    /// The recorded state of `route` for `candidate_version`, if any.
    ///
    /// The journal is the truth: if its newest event for the route is newer than the state
    /// file (a crash between the two writes), the phase and step come from the event and the
    /// judge's evidence from the file.
    pub fn recover(&self, route: &str, candidate_version: &str) -> Option<RouteRecord> {
        let file: Option<RouteRecord> = fs::read(self.record_path(route))
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(route, error = %e, "unreadable route state file; recovering from the journal");
                    None
                }
            })
            .filter(|r: &RouteRecord| r.candidate_version == candidate_version);
        let last = self.events(Some(route), None).into_iter().rev().find(|e| e.candidate_version == candidate_version);
        match (file, last) {
            (Some(f), Some(e)) if f.last_event != e => {
                Some(RouteRecord { machine: machine_of(&e), last_event: e, ..f })
            }
            (Some(f), _) => Some(f),
            (None, Some(e)) => Some(RouteRecord {
                route: route.to_string(),
                candidate_version: candidate_version.to_string(),
                machine: machine_of(&e),
                judge: JudgeState::default(),
                last_event: e,
            }),
            (None, None) => None,
        }
    }
}

fn machine_of(e: &Event) -> MachineState {
    MachineState { phase: e.to, step: e.step.unwrap_or(0) }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(route: &str, kind: EventKind, to: Phase, step: Option<usize>) -> Event {
        Event {
            at: timestamp(SystemTime::now()),
            route: route.into(),
            kind,
            from: Phase::Pending,
            to,
            candidate_weight: 5.0,
            reason: "test".into(),
            evidence: serde_json::Value::Null,
            step,
            candidate_version: "v2".into(),
            stable_version: "v1".into(),
        }
    }

    fn record(e: &Event) -> RouteRecord {
        RouteRecord {
            route: e.route.clone(),
            candidate_version: "v2".into(),
            machine: machine_of(e),
            judge: JudgeState::default(),
            last_event: e.clone(),
        }
    }

    #[test]
    fn records_and_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(&dir.path().join("state"));
        let a = event("web", EventKind::Started, Phase::Progressing, Some(0));
        let b = event("web", EventKind::Step, Phase::Progressing, Some(1));
        let other = event("api", EventKind::Started, Phase::Progressing, Some(0));
        for e in [&a, &other, &b] {
            j.record(e, &record(e)).expect("record");
        }
        assert_eq!(j.events(Some("web"), None), vec![a.clone(), b.clone()]);
        assert_eq!(j.events(None, Some(1)), vec![b.clone()]);
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!(r.machine, MachineState { phase: Phase::Progressing, step: 1 });
        assert!(j.recover("web", "v3").is_none(), "another candidate version starts afresh");
    }

    #[test]
    fn torn_and_corrupt_lines_are_skipped_and_appends_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let a = event("web", EventKind::Started, Phase::Progressing, Some(0));
        j.record(&a, &record(&a)).expect("record");
        let path = dir.path().join("events.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"not json\n{\"at\":\"2026-").expect("tear");
        drop(f);
        let j = Journal::new(dir.path());
        assert_eq!(j.events(None, None), vec![a.clone()]);
        let b = event("web", EventKind::RolledBack, Phase::RolledBack, None);
        j.record(&b, &record(&b)).expect("append after a torn line");
        assert_eq!(j.events(None, None), vec![a, b]);
    }

    #[test]
    fn the_journal_wins_over_a_stale_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let a = event("web", EventKind::Step, Phase::Progressing, Some(2));
        j.record(&a, &record(&a)).expect("record");
        // Crash after the journal append, before the state file: only the event is there.
        let b = event("web", EventKind::RolledBack, Phase::RolledBack, None);
        j.append(&b).expect("append");
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!(r.machine.phase, Phase::RolledBack);
        std::fs::write(j.record_path("web"), b"{garbage").expect("corrupt");
        assert_eq!(j.recover("web", "v2").expect("from journal").machine.phase, Phase::RolledBack);
    }

    #[test]
    fn an_unwritable_dir_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let j = Journal::new(&blocker.join("state"));
        let a = event("web", EventKind::Started, Phase::Progressing, Some(0));
        let err = j.record(&a, &record(&a)).expect_err("cannot create a dir under a file");
        assert!(err.to_string().contains("state dir"), "{err}");
        assert!(j.events(None, None).is_empty());
    }
}
