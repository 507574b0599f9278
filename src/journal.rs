//! The rollout journal: every transition, on disk before it reaches traffic.
//!
//! Files of a state directory:
//! - `events.jsonl`: one JSON event per line, appended and fsynced — the history that reports
//!   and post-mortems read, and the truth on restart. When an append would take it past
//!   [`ROTATE_BYTES`], it becomes `events.1.jsonl` (the older ones shift to `events.2.jsonl`
//!   … `events.{KEEP_ROTATED}.jsonl`, the oldest is deleted), so the journal never holds more
//!   than `(KEEP_ROTATED + 1) × ROTATE_BYTES` plus one event;
//! - `routes/<route>.json`: the route's current state (phase, step, the judge's evidence),
//!   replaced atomically (write a temp file, fsync, rename, fsync the directory);
//! - `<route>.rollback`: the rollback marker (see [`marker`]), pre-allocated, holding a
//!   rollback that the journal could not record yet.
//!
//! A crash can leave a torn last line; readers skip any line that does not parse (with a
//! warning) and the next append starts on a fresh line, so one bad write never hides the rest.
//! Readers walk the files backwards ([`tail`]), so the newest events cost only their bytes.
//!
//! Recovery on start ([`Journal::recover`]) takes the newest of three sources, and a rollback
//! is never lost to an older one:
//! 1. the rollback marker, when it holds an event the journal does not have;
//! 2. the state file, when its event is not in the journal and is newer than the journal's
//!    newest event for the route (the append failed but the state file was written);
//! 3. otherwise the journal's newest event for the route (the state file still supplies the
//!    judge's evidence).

mod marker;
mod tail;

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::rollout::judge::JudgeState;
use crate::rollout::machine::{EventKind, MachineState};
use tail::Tail;

/// `events.jsonl` is rotated when an append would take it past this size.
pub const ROTATE_BYTES: u64 = 4 * 1024 * 1024;

/// How many rotated files (`events.1.jsonl` …) are kept.
pub const KEEP_ROTATED: usize = 4;

pub use crate::rollout::event::Event;

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
    appended: bool,
}

impl JournalError {
    /// True when the event did reach `events.jsonl` and only the state file failed: the
    /// transition is recorded (recovery reads the journal first).
    pub fn event_appended(&self) -> bool {
        self.appended
    }
}

/// A recovered route state, and whether the journal itself still lacks its last event.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// The state to resume from.
    pub record: RouteRecord,
    /// The last event came from the rollback marker or a state file newer than the journal:
    /// it still has to be appended.
    pub unrecorded: bool,
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

/// What a backwards scan of the journal found.
struct Scan {
    /// Matching events, newest first.
    events: Vec<Event>,
    /// Bytes read from disk.
    bytes_read: u64,
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

    fn rotated_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("events.{n}.jsonl"))
    }

    fn record_path(&self, route: &str) -> PathBuf {
        self.dir.join("routes").join(format!("{route}.json"))
    }

    fn fail(&self, source: io::Error) -> JournalError {
        JournalError { dir: self.dir.clone(), source, appended: false }
    }

    /// Appends `event` (fsynced), then replaces the route's state file atomically. Callers
    /// change traffic only after this returns.
    pub fn record(&self, event: &Event, record: &RouteRecord) -> Result<(), JournalError> {
        self.append(event).map_err(|e| self.fail(e))?;
        self.write_record(record).map_err(|e| JournalError { appended: true, ..self.fail(e) })
    }

    /// Appends `event` alone (fsynced).
    pub fn append_event(&self, event: &Event) -> Result<(), JournalError> {
        self.append(event).map_err(|e| self.fail(e))
    }

    fn append(&self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let written = self.append_locked(&mut guard, &line);
        if written.is_err() {
            // Reopen next time: the handle may be unusable (disk replaced, permissions changed).
            *guard = None;
        }
        written
    }

    fn append_locked(&self, guard: &mut Option<File>, line: &[u8]) -> io::Result<()> {
        // A handle to a file that is no longer `events.jsonl` (moved or deleted by someone
        // else) would write into the void.
        if let Some(f) = guard.as_ref()
            && !same_file(f, &self.events_path())
        {
            *guard = None;
        }
        if let Some(f) = guard.as_ref()
            && f.metadata()?.len() + line.len() as u64 > ROTATE_BYTES
        {
            *guard = None;
            if let Err(e) = self.rotate() {
                warn!(dir = %self.dir.display(), error = %e, "cannot rotate the journal; appending to the current file");
            }
        }
        if guard.is_none() {
            *guard = Some(self.open_for_append()?);
        }
        let file = guard.as_mut().expect("opened above");
        file.write_all(line)?;
        file.sync_data()
    }

    /// `events.jsonl` becomes `events.1.jsonl`, each older file moves up one, the oldest kept
    /// one is deleted.
    fn rotate(&self) -> io::Result<()> {
        let ignore_missing = |r: io::Result<()>| match r {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        };
        ignore_missing(fs::remove_file(self.rotated_path(KEEP_ROTATED)))?;
        for n in (1..KEEP_ROTATED).rev() {
            ignore_missing(fs::rename(self.rotated_path(n), self.rotated_path(n + 1)))?;
        }
        fs::rename(self.events_path(), self.rotated_path(1))?;
        sync_dir(&self.dir)
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

    /// Pre-allocates the rollback marker of `route` while there is room on the disk.
    pub fn prepare_marker(&self, route: &str) -> Result<(), JournalError> {
        marker::prepare(&self.dir, route).map_err(|e| self.fail(e))
    }

    /// Keeps a rollback the journal could not record in the route's marker (in place, so it
    /// works on a full disk).
    pub fn mark_unrecorded(&self, event: &Event) -> Result<(), JournalError> {
        marker::write(&self.dir, event).map_err(|e| self.fail(e))
    }

    /// Empties the route's marker once the journal has its rollback.
    pub fn clear_marker(&self, route: &str) -> Result<(), JournalError> {
        marker::clear(&self.dir, route).map_err(|e| self.fail(e))
    }

    /// The journal's files, newest first (missing ones are skipped by the readers).
    fn files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        std::iter::once(self.events_path()).chain((1..=KEEP_ROTATED).map(|n| self.rotated_path(n)))
    }

    /// Walks the journal backwards, keeping the events of `route` (all with `None`) for which
    /// `keep` holds, until `done` says so given the events kept so far (newest first).
    fn scan(
        &self,
        route: Option<&str>,
        mut keep: impl FnMut(&Event) -> bool,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> Scan {
        let mut scan = Scan { events: Vec::new(), bytes_read: 0 };
        // Cheap pre-filter: a line of another route does not even mention this one.
        let needle = route.map(|r| serde_json::to_vec(r).expect("a string serializes"));
        for path in self.files() {
            if done(&scan.events) {
                break;
            }
            let mut tail = match File::open(&path).and_then(Tail::new) {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read the journal");
                    continue;
                }
            };
            loop {
                let line = match tail.prev_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot read the journal");
                        break;
                    }
                };
                if line.iter().all(u8::is_ascii_whitespace) || needle.as_ref().is_some_and(|n| !contains(&line, n)) {
                    continue;
                }
                match serde_json::from_slice::<Event>(&line) {
                    Ok(e) if route.is_none_or(|r| r == e.route) && keep(&e) => {
                        scan.events.push(e);
                        if done(&scan.events) {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "skipping an unreadable journal line")
                    }
                }
            }
            if tail.skipped() > 0 {
                warn!(path = %path.display(), lines = tail.skipped(), "skipping over-long journal lines");
            }
            scan.bytes_read += tail.bytes_read();
        }
        scan
    }

    /// Events, oldest first, optionally of one route, at most the newest `limit`.
    ///
    /// Reads the journal backwards and stops at `limit`: the cost is the bytes of the events
    /// returned (plus those of other routes in between), not the journal's size. Blocking:
    /// async callers run it with `spawn_blocking`.
    pub fn events(&self, route: Option<&str>, limit: Option<usize>) -> Vec<Event> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut events = self.scan(route, |_| true, |got| got.len() >= limit).events;
        events.reverse();
        events
    }

    /// The events of `route`'s current rollout of `candidate_version`, oldest first: back to
    /// its newest `started` (or as far as the journal goes). What `veer report` tells.
    pub fn rollout_events(&self, route: &str, candidate_version: &str) -> Vec<Event> {
        let started = |e: &Event| e.kind == EventKind::Started && e.candidate_version == candidate_version;
        let mut events = self.scan(Some(route), |_| true, |got| got.last().is_some_and(started)).events;
        events.reverse();
        events
    }

    /// The recorded state of `route` for `candidate_version`, if any (see the module
    /// documentation for the order of the sources).
    pub fn recover(&self, route: &str, candidate_version: &str) -> Option<Recovered> {
        let file: Option<RouteRecord> = match fs::read(self.record_path(route)) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(route, error = %e, "unreadable route state file; recovering from the journal");
                    None
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                warn!(route, error = %e, "cannot read the route state file; recovering from the journal");
                None
            }
        };
        let file = file.filter(|r| r.candidate_version == candidate_version);
        let mark = marker::read(&self.dir, route).filter(|e| e.candidate_version == candidate_version);
        // Scan back until both the state file's and the marker's events are found (the usual
        // case: the newest line is the state file's event and there is no marker).
        let probes: Vec<&Event> = file.iter().map(|f| &f.last_event).chain(mark.iter()).collect();
        let mut found = vec![false; probes.len()];
        let newest = self
            .scan(
                Some(route),
                |e| e.candidate_version == candidate_version,
                |got| {
                    if let Some(e) = got.last() {
                        for (p, f) in probes.iter().zip(found.iter_mut()) {
                            *f |= *p == e;
                        }
                    }
                    !got.is_empty() && found.iter().all(|f| *f)
                },
            )
            .events
            .into_iter()
            .next();
        let (file_in_journal, mark_in_journal) = match (&file, &mark) {
            (Some(_), Some(_)) => (found[0], found[1]),
            (Some(_), None) => (found[0], false),
            (None, Some(_)) => (false, found[0]),
            (None, None) => (false, false),
        };
        let judge = file.as_ref().map(|f| f.judge.clone()).unwrap_or_default();
        let from_event = |e: Event, unrecorded: bool| Recovered {
            record: RouteRecord {
                route: route.to_string(),
                candidate_version: candidate_version.to_string(),
                machine: machine_of(&e),
                judge: judge.clone(),
                last_event: e,
            },
            unrecorded,
        };
        if let Some(m) = mark {
            if !mark_in_journal {
                warn!(route, "the rollback marker holds a rollback the journal lacks; honouring it");
                return Some(from_event(m, true));
            }
            // Recorded, but the marker was not emptied (a crash in between): empty it now, or
            // once the journal rotates the rollback out, the marker would look unrecorded.
            if let Err(e) = marker::clear(&self.dir, route) {
                warn!(route, error = %e, "cannot empty a stale rollback marker");
            }
        }
        match (file, newest) {
            (Some(f), Some(e)) if f.last_event == e => Some(Recovered { record: f, unrecorded: false }),
            (Some(f), Some(e)) if !file_in_journal && is_newer(&f.last_event, &e) => {
                warn!(route, "the state file is newer than the journal; honouring it");
                Some(Recovered { record: f, unrecorded: true })
            }
            (_, Some(e)) => Some(from_event(e, false)),
            // No event of the route in the journal: rotated out long ago, or the journal was
            // lost. The state file is all there is (an unrecorded rollback has its marker).
            (Some(f), None) => Some(Recovered { record: f, unrecorded: false }),
            (None, None) => None,
        }
    }
}

/// True when `a` happened after `b` by their timestamps.
fn is_newer(a: &Event, b: &Event) -> bool {
    match (humantime::parse_rfc3339(&a.at), humantime::parse_rfc3339(&b.at)) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// True when the open `file` is still the one at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
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
    use crate::rollout::Phase;
    use crate::rollout::evidence::{Cause, Evidence};
    use crate::rollout::judge::RuleKind;

    /// Evidence of `bytes` bytes or so, padded in its detection time.
    fn padded(cause: Option<Cause>, bytes: usize) -> Option<Evidence> {
        Some(Evidence { rule: cause, detected_at: Some("x".repeat(bytes)), ..Evidence::default() })
    }

    fn event(route: &str, kind: EventKind, to: Phase, step: Option<usize>) -> Event {
        Event {
            at: timestamp(SystemTime::now()),
            route: route.into(),
            kind,
            from: Phase::Pending,
            to,
            candidate_weight: 5.0,
            reason: "test".into(),
            evidence: None,
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
        assert!(!r.unrecorded);
        assert_eq!(r.record.machine, MachineState { phase: Phase::Progressing, step: 1 });
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
        assert_eq!((r.record.machine.phase, r.unrecorded), (Phase::RolledBack, false));
        std::fs::write(j.record_path("web"), b"{garbage").expect("corrupt");
        assert_eq!(j.recover("web", "v2").expect("from journal").record.machine.phase, Phase::RolledBack);
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

    fn later(mut e: Event, ms: u64) -> Event {
        let t = humantime::parse_rfc3339(&e.at).expect("time") + std::time::Duration::from_millis(ms);
        e.at = timestamp(t);
        e
    }

    /// `events.jsonl` replaced by a directory: appends fail even for root.
    fn break_events(dir: &Path) {
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir(&path).expect("mkdir in place of the journal");
    }

    #[test]
    fn a_state_file_newer_than_the_journal_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let a = event("web", EventKind::Step, Phase::Progressing, Some(2));
        j.record(&a, &record(&a)).expect("record");
        // The append of the rollback failed, the state file was written.
        let b = later(event("web", EventKind::RolledBack, Phase::RolledBack, None), 10);
        j.checkpoint(&record(&b)).expect("state file");
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!((r.record.machine.phase, r.unrecorded), (Phase::RolledBack, true));
        // Once appended, it is an ordinary recorded state.
        j.append_event(&b).expect("append");
        assert!(!j.recover("web", "v2").expect("recovered").unrecorded);
    }

    #[test]
    fn the_rollback_marker_wins_when_nothing_else_can_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let a = event("web", EventKind::Step, Phase::Progressing, Some(2));
        j.record(&a, &record(&a)).expect("record");
        j.prepare_marker("web").expect("prepare");
        // Neither the journal nor the state file can be written.
        break_events(dir.path());
        std::fs::remove_dir_all(dir.path().join("routes")).expect("rm routes");
        std::fs::write(dir.path().join("routes"), b"x").expect("block routes");
        let b = later(event("web", EventKind::RolledBack, Phase::RolledBack, None), 10);
        assert!(j.record(&b, &record(&b)).is_err());
        j.mark_unrecorded(&b).expect("the pre-allocated marker is written in place");
        let j = Journal::new(dir.path());
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!((r.record.machine.phase, r.unrecorded), (Phase::RolledBack, true));
        assert_eq!(r.record.last_event, b);
        assert!(j.recover("web", "v3").is_none(), "another candidate is not rolled back by it");
        // The journal works again: the rollback is appended and the marker emptied.
        std::fs::remove_dir(dir.path().join("events.jsonl")).expect("unbreak");
        j.append_event(&b).expect("append");
        j.clear_marker("web").expect("clear");
        assert!(marker::read(dir.path(), "web").is_none());
        let len = std::fs::metadata(marker::path(dir.path(), "web")).expect("marker").len();
        assert_eq!(len, marker::MARKER_LEN as u64, "kept for the next time");
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!((r.record.machine.phase, r.unrecorded), (Phase::RolledBack, false));
    }

    #[test]
    fn a_recorded_rollback_left_in_the_marker_is_emptied_on_recovery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let b = event("web", EventKind::RolledBack, Phase::RolledBack, None);
        j.mark_unrecorded(&b).expect("marker");
        j.record(&b, &record(&b)).expect("record");
        // A crash before the marker was emptied; a retry came after.
        let c = later(event("web", EventKind::Retried, Phase::Progressing, Some(0)), 10);
        j.record(&c, &record(&c)).expect("record");
        let r = j.recover("web", "v2").expect("recovered");
        assert_eq!((r.record.machine.phase, r.unrecorded), (Phase::Progressing, false));
        assert!(marker::read(dir.path(), "web").is_none(), "stale marker emptied");
    }

    #[test]
    fn an_oversized_rollback_keeps_its_rule_in_the_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        j.prepare_marker("web").expect("prepare");
        let mut b = event("web", EventKind::RolledBack, Phase::RolledBack, None);
        let cause = Some(Cause::Rule(RuleKind::ErrorRate));
        b.evidence = padded(cause.clone(), 2 * marker::MARKER_LEN);
        j.mark_unrecorded(&b).expect("marker");
        let got = marker::read(dir.path(), "web").expect("marker holds it");
        assert_eq!(got.evidence, Some(Evidence { rule: cause, ..Evidence::default() }));
        assert_eq!(got.to, Phase::RolledBack);
    }

    #[test]
    fn the_journal_rotates_and_stays_bounded_with_history_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let mut first = event("web", EventKind::Started, Phase::Progressing, Some(0));
        first.candidate_version = "v2".into();
        j.append_event(&first).expect("append");
        // Large events of another route push the journal through several rotations.
        let mut big = event("api", EventKind::Step, Phase::Progressing, Some(1));
        big.evidence = padded(None, 64 * 1024);
        let per_file = ROTATE_BYTES / (64 * 1024) + 1;
        for _ in 0..per_file * 2 {
            j.append_event(&big).expect("append");
        }
        let last = event("web", EventKind::Step, Phase::Progressing, Some(1));
        j.append_event(&last).expect("append");
        assert!(dir.path().join("events.1.jsonl").exists(), "rotated");
        assert_eq!(j.rollout_events("web", "v2"), vec![first.clone(), last.clone()], "history spans files");
        assert_eq!(j.events(None, Some(1)), vec![last.clone()]);
        for _ in 0..per_file * (KEEP_ROTATED as u64 + 2) {
            j.append_event(&big).expect("append");
        }
        let total: u64 = j.files().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
        let bound = (KEEP_ROTATED as u64 + 1) * ROTATE_BYTES;
        assert!(total <= bound, "journal holds {total} bytes, bound {bound}");
        assert!(!dir.path().join(format!("events.{}.jsonl", KEEP_ROTATED + 1)).exists());
        // Recovery reads across the rotated files.
        j.append_event(&last).expect("append");
        assert_eq!(j.recover("web", "v2").expect("recovered").record.last_event, last);
    }

    #[test]
    fn the_newest_event_of_a_large_journal_costs_a_chunk_not_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let mut e = event("web", EventKind::Reloaded, Phase::Progressing, Some(1));
        e.evidence = padded(None, 900);
        let mut line = serde_json::to_vec(&e).expect("json");
        line.push(b'\n');
        let mut f = File::create(dir.path().join("events.jsonl")).expect("create");
        let mut written = 0;
        while written < 20 * 1024 * 1024 {
            f.write_all(&line).expect("write");
            written += line.len();
        }
        drop(f);
        let scan = j.scan(None, |_| true, |got| !got.is_empty());
        assert_eq!(scan.events, vec![e.clone()]);
        assert!(scan.bytes_read <= 128 * 1024, "read {} bytes of a 20 MB journal for one event", scan.bytes_read);
        let scan = j.scan(Some("web"), |_| true, |got| got.len() >= 10);
        assert_eq!(scan.events.len(), 10);
        assert!(scan.bytes_read <= 128 * 1024, "read {} bytes for ten events", scan.bytes_read);
    }

    #[test]
    fn an_append_to_a_journal_moved_away_reopens_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(dir.path());
        let a = event("web", EventKind::Started, Phase::Progressing, Some(0));
        j.append_event(&a).expect("append");
        break_events(dir.path());
        assert!(j.append_event(&a).is_err(), "the cached handle must not write to the removed file");
    }
}
