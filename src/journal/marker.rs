//! The rollback marker: one pre-allocated file per route that holds a rollback the journal
//! could not record.
//!
//! When the disk is full, appending to `events.jsonl` or creating the temp file of a state
//! file needs new blocks and fails. Overwriting bytes of a file whose blocks were written while
//! there was room does not: the marker (`<route>.rollback`, [`MARKER_LEN`] bytes of zeros) is
//! written when the route's controller starts, and a rollback that cannot be journaled is
//! written into it in place and fsynced. Once the journal has the rollback, the marker is
//! zeroed again (also in place). Zeros mean "nothing pending".

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Event;
use crate::rollout::evidence::Evidence;

/// Size of a marker file: a rollback event with its evidence fits with room to spare.
pub(crate) const MARKER_LEN: usize = 16 * 1024;

/// The marker file of `route` in `dir`.
pub(crate) fn path(dir: &Path, route: &str) -> PathBuf {
    dir.join(format!("{route}.rollback"))
}

/// Creates the marker (zeros, fsynced) if it is missing or short, so that the space is
/// taken while there is some.
pub(crate) fn prepare(dir: &Path, route: &str) -> io::Result<()> {
    let path = path(dir, route);
    if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() >= MARKER_LEN as u64) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let f = OpenOptions::new().create(true).write(true).truncate(false).open(&path)?;
    let len = f.metadata()?.len();
    if len < MARKER_LEN as u64 {
        // Real zeros, not a hole or `set_len`: the blocks must exist now.
        let zeros = vec![0u8; MARKER_LEN - len as usize];
        f.write_all_at(&zeros, len)?;
    }
    f.sync_all()?;
    File::open(dir)?.sync_all()
}

/// Writes `event` into the marker in place and fsyncs it. An event too large for the
/// marker keeps only the rule of its evidence.
pub(crate) fn write(dir: &Path, event: &Event) -> io::Result<()> {
    let mut body = serde_json::to_vec(event).map_err(io::Error::other)?;
    if body.len() >= MARKER_LEN {
        let rule = event.evidence.as_ref().and_then(|e| e.rule.clone());
        let slim = Event { evidence: Some(Evidence { rule, ..Evidence::default() }), ..event.clone() };
        body = serde_json::to_vec(&slim).map_err(io::Error::other)?;
    }
    if body.len() >= MARKER_LEN {
        return Err(io::Error::new(ErrorKind::InvalidInput, "rollback event does not fit the marker"));
    }
    body.resize(MARKER_LEN, 0);
    let path = path(dir, &event.route);
    let f = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        // Never prepared (the disk was already broken at start): creating it may still work.
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            File::open(dir)?.sync_all()?;
            f
        }
        Err(e) => return Err(e),
    };
    f.write_all_at(&body, 0)?;
    f.sync_data()
}

/// Zeroes the marker in place (the journal has the rollback now).
pub(crate) fn clear(dir: &Path, route: &str) -> io::Result<()> {
    let f = match OpenOptions::new().write(true).open(path(dir, route)) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(f.metadata()?.len()).unwrap_or(MARKER_LEN).min(MARKER_LEN);
    f.write_all_at(&vec![0u8; len], 0)?;
    f.sync_data()
}

/// The rollback held in the marker of `route`, if any.
pub(crate) fn read(dir: &Path, route: &str) -> Option<Event> {
    let bytes = match fs::read(path(dir, route)) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(route, error = %e, "cannot read the rollback marker");
            return None;
        }
    };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let body = &bytes[..end];
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice(body) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(route, error = %e, "unreadable rollback marker; ignoring it");
            None
        }
    }
}
