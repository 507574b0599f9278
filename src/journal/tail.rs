//! Reading a journal file backwards, line by line, so the newest events cost only the bytes
//! they occupy: `GET /api/v1/events?limit=1` on a large journal reads one chunk, not the file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

/// How much is read from disk at a time.
const CHUNK: usize = 64 * 1024;

/// A line longer than this cannot be an event (corruption, or not a journal): it is skipped
/// instead of being buffered whole.
pub(crate) const MAX_LINE: usize = 1024 * 1024;

/// The lines of a file, last first.
///
/// Memory stays below `MAX_LINE + CHUNK` whatever the file holds.
pub(crate) struct Tail {
    file: File,
    /// File offset of `buf[0]`.
    pos: u64,
    /// Bytes from `pos` up to the start of the last line handed out.
    buf: Vec<u8>,
    /// Inside an over-long line: drop bytes until the newline that starts it.
    skipping: bool,
    bytes_read: u64,
    skipped: u64,
}

impl Tail {
    /// Starts at the end of `file`.
    pub(crate) fn new(mut file: File) -> io::Result<Tail> {
        let pos = file.seek(SeekFrom::End(0))?;
        Ok(Tail { file, pos, buf: Vec::new(), skipping: false, bytes_read: 0, skipped: 0 })
    }

    /// Bytes read from the file so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Lines skipped for being longer than `MAX_LINE`.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The previous line (without its newline), or `None` at the start of the file. Empty
    /// lines are returned too; callers skip them.
    pub(crate) fn prev_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(nl) = self.buf.iter().rposition(|&b| b == b'\n') {
                let line = self.buf.split_off(nl + 1);
                self.buf.truncate(nl);
                if std::mem::take(&mut self.skipping) {
                    // The tail end of an over-long line: drop it.
                    continue;
                }
                return Ok(Some(line));
            }
            if self.pos == 0 {
                if self.buf.is_empty() && !self.skipping {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buf);
                if std::mem::take(&mut self.skipping) {
                    return Ok(None);
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                if !self.skipping {
                    self.skipped += 1;
                }
                self.skipping = true;
            }
            self.read_chunk()?;
        }
    }

    /// Prepends the chunk before `pos` to `buf`.
    fn read_chunk(&mut self) -> io::Result<()> {
        let len = CHUNK.min(usize::try_from(self.pos).unwrap_or(CHUNK));
        let start = self.pos - len as u64;
        let mut chunk = vec![0u8; len + self.buf.len()];
        self.file.seek(SeekFrom::Start(start))?;
        self.file.read_exact(&mut chunk[..len])?;
        chunk[len..].copy_from_slice(&self.buf);
        self.buf = chunk;
        self.pos = start;
        self.bytes_read += len as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines_of(bytes: &[u8]) -> (Vec<Vec<u8>>, u64) {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(bytes).expect("write");
        let mut t = Tail::new(f).expect("tail");
        let mut out = Vec::new();
        while let Some(l) = t.prev_line().expect("read") {
            out.push(l);
        }
        out.reverse();
        (out, t.skipped())
    }

    #[test]
    fn yields_every_line_last_first_across_chunk_boundaries() {
        let mut text = Vec::new();
        let mut want = Vec::new();
        for i in 0..20_000 {
            let line = format!("line {i} {}", "x".repeat(i % 97));
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
            want.push(line.into_bytes());
        }
        // A torn last line without its newline comes out too.
        text.extend_from_slice(b"torn");
        want.push(b"torn".to_vec());
        let (mut got, skipped) = lines_of(&text);
        got.retain(|l| !l.is_empty());
        assert_eq!(got, want);
        assert_eq!(skipped, 0);
    }

    #[test]
    fn an_over_long_line_is_skipped_not_buffered() {
        let mut text = b"first\n".to_vec();
        text.extend(std::iter::repeat_n(b'y', 3 * MAX_LINE));
        text.extend_from_slice(b"\nlast\n");
        let (mut got, skipped) = lines_of(&text);
        got.retain(|l| !l.is_empty());
        assert_eq!(got, vec![b"first".to_vec(), b"last".to_vec()]);
        assert_eq!(skipped, 1);
    }

    #[test]
    fn the_last_line_of_a_large_file_costs_one_chunk() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let line = [b'z'; 999];
        for _ in 0..20_000 {
            f.write_all(&line).expect("write");
            f.write_all(b"\n").expect("write");
        }
        let mut t = Tail::new(f).expect("tail");
        assert_eq!(t.prev_line().expect("read"), Some(Vec::new()), "after the final newline");
        assert_eq!(t.prev_line().expect("read").map(|l| l.len()), Some(999));
        assert_eq!(t.bytes_read(), CHUNK as u64, "20 MB file, one chunk read");
    }
}
