//! The durable spool: nothing acknowledged is ever lost.
//!
//! ## Contract
//! - [`SpoolWriter::commit`] returns `Ok` only after the record is written **and**
//!   `fdatasync`ed, and the segment file's directory entry was `fsync`ed when the segment was
//!   created. The SMTP session sends `250` only after that `Ok`.
//! - A message is stored once, whatever the number of recipients and nodes; each recipient has
//!   one state octet in the record, rewritten in place when it is delivered or failed.
//! - Recovery ([`scan`]) reads every segment, checks every record's checksums, skips (and logs)
//!   torn or corrupt records, and reports each message's still-pending recipients. It does not
//!   depend on the shard count that wrote the files.
//! - A segment file is removed once none of its messages has a pending recipient and it is no
//!   longer being appended to, so the spool does not grow under steady traffic.
//!
//! ## Layout
//! `spool_dir/lock` (flock: one server per spool), `spool_dir/segments/<id>.seg`: append-only,
//! preallocated segment files of [`record`]s. Each shard appends to its own segment.
//!
//! This module knows nothing of SMTP text or of nodes: recipients are opaque byte strings.

pub mod record;
mod writer;

pub use writer::{Incoming, Location, SegmentFiles, SegmentTable, SpoolError, SpoolWriter};

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use record::{RcptState, RecordError};

/// Identity of a segment file (also its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u64);

impl SegmentId {
    /// File name inside `segments/`.
    pub fn file_name(self) -> String {
        format!("{:016x}.seg", self.0)
    }
    /// Parses a file name produced by [`SegmentId::file_name`].
    pub fn from_file_name(name: &str) -> Option<SegmentId> {
        let hex = name.strip_suffix(".seg")?;
        (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok().map(SegmentId))?
    }
}

/// Formats a message id as the queue id shown to clients and in logs.
pub fn queue_id(msg_id: u64) -> String {
    format!("{msg_id:016X}")
}

/// Unique, monotonic ids: microseconds since the epoch in the high bits, the shard in the low
/// 8 bits. Unique across shards (low bits) and across restarts (time).
#[derive(Debug)]
pub struct IdGen {
    shard: u64,
    last: u64,
}

impl IdGen {
    /// A generator for `shard` (< 256).
    pub fn new(shard: usize) -> IdGen {
        IdGen {
            shard: shard as u64 & 0xff,
            last: 0,
        }
    }
    /// The next id.
    pub fn next_id(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.last = now.max(self.last + 1);
        (self.last << 8) | self.shard
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An open spool directory, locked against a second server.
#[derive(Debug)]
pub struct SpoolDir {
    root: PathBuf,
    _lock: File,
}

/// Errors opening the spool directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the lock.
    #[error("spool {0} is locked by another etrn-relay process")]
    Locked(PathBuf),
    /// I/O error.
    #[error("spool {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: std::io::Error,
    },
}

impl SpoolDir {
    /// Creates the directories if needed and takes the exclusive lock.
    pub fn open(root: &Path) -> Result<SpoolDir, OpenError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| OpenError::Io { path, source }
        };
        std::fs::create_dir_all(root.join("segments")).map_err(io(root))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(root.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        Ok(SpoolDir {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    /// The directory holding segment files.
    pub fn segments_dir(&self) -> PathBuf {
        self.root.join("segments")
    }
}

/// One message found by the recovery scan with at least one pending recipient.
#[derive(Debug, Clone)]
pub struct RecoveredMessage {
    /// Where it is.
    pub location: Location,
    /// Message id.
    pub msg_id: u64,
    /// Arrival, unix seconds.
    pub arrival: u64,
    /// Data length (for the queue listing).
    pub data_len: u64,
    /// (recipient index, class) of each pending recipient the classifier recognised.
    pub pending: Vec<(u16, u32)>,
    /// (recipient index, address) of each pending recipient it did not.
    pub unclassified: Vec<(u16, String)>,
    /// The envelope sender is `<>` (a bounce).
    pub null_sender: bool,
}

/// Maps a recipient address to an opaque class (the runtime uses the node index), or None.
/// The spool itself knows nothing of nodes.
pub type Classifier<'a> = &'a dyn Fn(&[u8]) -> Option<u32>;

/// What the scan found.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Messages with pending recipients.
    pub messages: Vec<RecoveredMessage>,
    /// Segments that hold no pending recipient (safe to delete).
    pub dead_segments: Vec<SegmentId>,
    /// Segments that hold pending mail.
    pub live_segments: Vec<SegmentId>,
    /// Records skipped as corrupt.
    pub corrupt_records: usize,
}

/// Reads every segment in `segments_dir` with blocking I/O: called before the executors start
/// (and by the read-only `queue` command), never on an executor.
pub fn scan(segments_dir: &Path, classify: Classifier<'_>) -> std::io::Result<ScanResult> {
    let mut result = ScanResult::default();
    let mut ids: Vec<SegmentId> = std::fs::read_dir(segments_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| SegmentId::from_file_name(e.file_name().to_str()?))
        .collect();
    ids.sort();
    // One buffer for every segment, so the scan's memory is one segment, not the whole spool
    // (freed memory of many large reads is not always given back to the system).
    let mut bytes = Vec::new();
    for id in ids {
        let path = segments_dir.join(id.file_name());
        bytes.clear();
        match std::fs::File::open(&path).and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => return Err(e),
        }
        let before = result.messages.len();
        scan_segment(id, &bytes, classify, &mut result);
        if result.messages.len() > before {
            result.live_segments.push(id);
        } else {
            result.dead_segments.push(id);
        }
    }
    Ok(result)
}

fn scan_segment(id: SegmentId, bytes: &[u8], classify: Classifier<'_>, result: &mut ScanResult) {
    let mut off = 0usize;
    while off + record::HEADER_LEN <= bytes.len() {
        match record::parse(&bytes[off..]) {
            Ok(v) => {
                let mut pending = Vec::new();
                let mut unclassified = Vec::new();
                for (i, (r, st)) in v.recipients.iter().zip(v.states).enumerate() {
                    if RcptState::from_byte(*st) != RcptState::Pending {
                        continue;
                    }
                    match classify(r) {
                        Some(c) => pending.push((i as u16, c)),
                        None => unclassified.push((i as u16, String::from_utf8_lossy(r).into_owned())),
                    }
                }
                if !pending.is_empty() || !unclassified.is_empty() {
                    result.messages.push(RecoveredMessage {
                        location: Location {
                            segment: id,
                            offset: off as u64,
                            len: v.total_len as u32,
                        },
                        msg_id: v.msg_id,
                        arrival: v.arrival,
                        data_len: v.data.len() as u64,
                        pending,
                        unclassified,
                        null_sender: v.sender.is_empty(),
                    });
                }
                off += v.total_len;
            }
            Err(RecordError::End) => {
                // Zeros: the unwritten tail of a preallocated segment, or a punched hole. Look
                // for a later record at the next aligned offset that is not zero.
                match bytes[off..].iter().position(|b| *b != 0) {
                    None => break,
                    Some(p) => off += p / record::ALIGN * record::ALIGN,
                }
            }
            Err(RecordError::BadData) => {
                let len = record::peek_len(&bytes[off..]).unwrap_or(record::ALIGN);
                tracing::warn!(segment = %id.file_name(), offset = off, "skipping spool record with bad data checksum (torn or corrupt write)");
                result.corrupt_records += 1;
                off += len;
            }
            Err(e @ (RecordError::BadHeader | RecordError::Truncated)) => {
                tracing::warn!(segment = %id.file_name(), offset = off, error = %e, "skipping damaged spool bytes");
                result.corrupt_records += 1;
                // Resynchronise on the next aligned magic. This can land inside the damaged
                // record's message data, but a forged record cannot hide there: a valid header
                // needs NUL octets (its length fields, checksums and reserved bytes) and the
                // SMTP layer never stores a message containing NUL (550 5.6.0).
                let mut next = off + record::ALIGN;
                while next + 4 <= bytes.len() && bytes[next..next + 4] != record::MAGIC {
                    next += record::ALIGN;
                }
                off = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use record::RecordBuilder;

    fn rec(id: u64, rcpts: &[&[u8]], body: &[u8]) -> Vec<u8> {
        let mut b = RecordBuilder::new(id, 1, b"s@x.test", rcpts, 0);
        b.data_mut().extend_from_slice(body);
        b.finish(false)
    }

    #[test]
    fn scan_skips_corrupt_and_finds_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = rec(1, &[b"a@n1.test"], b"one\r\n");
        let second_at = seg.len();
        seg.extend(rec(2, &[b"b@n1.test", b"c@n2.test"], b"two\r\n"));
        let third_at = seg.len();
        seg.extend(rec(3, &[b"d@n1.test"], b"three\r\n"));
        seg.extend(vec![0; 4096]); // preallocated tail
                                   // corrupt message 2's data, and mark message 3 delivered
        let v2 = record::parse(&seg[second_at..]).unwrap();
        let d2 = second_at + v2.data_offset;
        seg[d2] ^= 0xff;
        let s3 = third_at + record::parse(&seg[third_at..]).unwrap().state_offset;
        seg[s3] = RcptState::Delivered.to_byte();
        std::fs::write(dir.path().join(SegmentId(7).file_name()), &seg).unwrap();
        std::fs::write(
            dir.path().join(SegmentId(8).file_name()),
            rec(4, &[b"e@n1.test"], b"x\r\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join(SegmentId(9).file_name()),
            b"garbage garbage garbage garbage garbage garbage garbage",
        )
        .unwrap();
        let r = scan(dir.path(), &|_| Some(0)).unwrap();
        let ids: Vec<u64> = r.messages.iter().map(|m| m.msg_id).collect();
        assert_eq!(ids, vec![1, 4]);
        assert_eq!(r.corrupt_records, 2);
        assert_eq!(r.live_segments, vec![SegmentId(7), SegmentId(8)]);
        assert_eq!(r.dead_segments, vec![SegmentId(9)]);
    }

    #[test]
    fn torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = rec(1, &[b"a@n1.test"], b"one\r\n");
        let full = rec(2, &[b"a@n1.test"], &vec![b'x'; 5000]);
        seg.extend_from_slice(&full[..full.len() / 2]);
        seg.extend(vec![0; 8192]);
        std::fs::write(dir.path().join(SegmentId(1).file_name()), &seg).unwrap();
        let r = scan(dir.path(), &|_| Some(0)).unwrap();
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.corrupt_records, 1);
    }

    #[test]
    fn lock_refuses_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let a = SpoolDir::open(dir.path()).unwrap();
        assert!(matches!(SpoolDir::open(dir.path()), Err(OpenError::Locked(_))));
        drop(a);
        SpoolDir::open(dir.path()).unwrap();
    }

    #[test]
    fn ids_are_unique_and_ordered() {
        let mut g = IdGen::new(3);
        let a = g.next_id();
        let b = g.next_id();
        assert!(b > a);
        assert_eq!(a & 0xff, 3);
        assert_eq!(SegmentId::from_file_name(&SegmentId(a).file_name()), Some(SegmentId(a)));
    }
}
