//! Per-shard spool I/O on glommio: the group-committing [`SpoolWriter`], the [`SegmentTable`]
//! that decides when a segment file can go, and [`SegmentFiles`], the read/state-update handles
//! a shard keeps for segments written by any shard.
//!
//! Group commit: `commit` puts the record on the shard's pending list and rings the flusher.
//! The flusher takes *everything* pending, writes it with `RWF_DSYNC` (write and `fdatasync`
//! of the range in one operation; a batch spread over several writes to a file gets plain
//! writes and one `fdatasync`), and then answers every waiter. While it syncs, new records
//! pile up for the next round, so under load one sync covers many messages and with one
//! client it costs one sync per message.
//!
//! Commit delay: a session with a mail transaction open holds an [`Incoming`] token from MAIL
//! until it commits (or the transaction ends without a message). While such sessions
//! exist, the flusher waits for them, up to the configured commit delay (0.5 ms by default,
//! counted from the oldest pending record's commit), before it syncs: a sync costs about as
//! much CPU as the rest of a small message's transaction, and on a busy machine the sessions
//! mid-transaction commit within a few client round trips, so waiting for them turns several
//! syncs into one. With nobody else in a transaction (one client, or a quiet relay) the sync
//! starts at once.
//!
//! No `RefCell` borrow is held across an `.await` here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::io::{BufferedFile, Directory, OpenOptions};

use super::{record, IdGen, SegmentId};

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment file.
    pub segment: SegmentId,
    /// Byte offset of the record.
    pub offset: u64,
    /// Record length including padding.
    pub len: u32,
}

/// A spool write failed; nothing was acknowledged. Maps to `452 4.3.1`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The file system is full.
    #[error("spool file system full")]
    Full,
    /// Any other I/O error.
    #[error("spool I/O error: {0}")]
    Io(String),
    /// The writer is shutting down.
    #[error("spool closed")]
    Closed,
}

impl From<glommio::GlommioError<()>> for SpoolError {
    fn from(e: glommio::GlommioError<()>) -> SpoolError {
        let io: std::io::Error = e.into();
        // glommio wraps the OS error with context (no raw errno then); its kind survives.
        let full = matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        );
        if full || io.raw_os_error() == Some(libc::ENOSPC) || io.raw_os_error() == Some(libc::EDQUOT) {
            SpoolError::Full
        } else {
            SpoolError::Io(io.to_string())
        }
    }
}

type Waiter = LocalSender<Result<Location, SpoolError>>;

struct Pending {
    record: Vec<u8>,
    parts: usize,
    done: Waiter,
    /// When the commit was asked for: the commit delay counts from the oldest pending record.
    at: std::time::Instant,
}

struct Active {
    id: SegmentId,
    file: Rc<SegFile>,
    pos: u64,
    /// The zero-fill in flight, if any: where it starts and its task. No record is placed at or
    /// past that offset until it has finished, so zeros never land on a record.
    zero_fill: Option<(u64, glommio::task::JoinHandle<()>)>,
}

/// A segment being appended to, and how many of its syncs have failed.
///
/// Linux reports a writeback error to only one `fdatasync` per open file: the first sync that
/// looks after the error takes it, and a later one succeeds although the pages were lost. So
/// a file's syncs run one at a time ([`SyncGate`]): the sync that covers a batch's pages is the
/// first to look after their writeback. Every batch also notes the failure count when it is
/// placed and counts as failed if it changed by the time its sync returns (a sync that ran
/// while it was being written may have taken its error); and a segment with a failed sync is
/// not appended to again.
struct SegFile {
    file: BufferedFile,
    sync_gate: SyncGate,
    /// A second handle for zero-filling: a writeback error is reported once per open file, so
    /// the fill's own `fdatasync` must not be the one that takes an error meant for a batch's.
    filler: BufferedFile,
    sync_failures: Cell<u64>,
    /// End of the zero-filled, synced region that started at the first fill (see
    /// [`ZeroFill`]); 0 until one finished.
    zeroed: Cell<u64>,
}

impl SegFile {
    /// Records that a sync of this segment failed (or may have: a write with `RWF_DSYNC` that
    /// failed): batches placed before it are not acknowledged, and nothing more is appended.
    fn sync_failed(&self) {
        self.sync_failures.set(self.sync_failures.get() + 1);
    }
}

/// Zero-filling ahead of the append position.
///
/// `fallocate` reserves a segment's blocks as *unwritten* extents. The first write into such an
/// extent converts it, so the `fdatasync` that acknowledges a batch there must also write the
/// inode's extent metadata: measured on this project's machines (ext4 on a virtio disk), 245 us
/// and 63 us of CPU per sync against 160 us and 42 us for an overwrite of blocks already
/// written. So a background task writes zeros a little ahead of the append position and syncs
/// them once (one metadata write per chunk instead of one per batch), the way databases
/// pre-fill their write-ahead logs. It costs writing each block twice; acknowledged records are
/// never touched: a record is placed in a region only after any fill there has finished, and a
/// fill starts at or past the append position.
#[derive(Debug, Clone, Copy)]
struct ZeroFill {
    /// Room left between the append position and a new fill, so that commits arriving while
    /// it runs do not wait for it.
    gap: u64,
    /// Bytes zeroed (and synced) by one fill.
    chunk: u64,
    /// A new fill starts once the zeroed region ends less than this far ahead.
    ahead: u64,
}

impl ZeroFill {
    fn for_segment(size: u64) -> ZeroFill {
        ZeroFill {
            gap: (256 << 10).min(size / 8),
            chunk: (1 << 20).min(size / 4).max(1),
            ahead: (4 << 20).min(size / 2),
        }
    }

    /// The region to fill next, if one is due: `[start, end)` with `start >= pos`.
    fn next(&self, pos: u64, zeroed: u64, size: u64) -> Option<(u64, u64)> {
        if zeroed >= pos + self.ahead {
            return None;
        }
        let start = zeroed.max(pos + self.gap);
        let end = (start + self.chunk).min(size);
        (start < end).then_some((start, end))
    }
}

/// Live-message accounting per segment, owned by one shard. A segment is removed when its last
/// pending part is done and it is sealed (no longer appended to).
#[derive(Default)]
pub struct SegmentTable {
    live: RefCell<HashMap<SegmentId, (usize, bool)>>,
    dir: PathBuf,
}

impl SegmentTable {
    /// A table for segments in `dir`.
    pub fn new(dir: PathBuf) -> SegmentTable {
        SegmentTable {
            live: RefCell::new(HashMap::new()),
            dir,
        }
    }

    /// Adds `parts` pending parts (one per node queue holding the message) to a segment.
    pub fn add_parts(&self, seg: SegmentId, parts: usize, sealed: bool) {
        let mut live = self.live.borrow_mut();
        let e = live.entry(seg).or_insert((0, sealed));
        e.0 += parts;
        e.1 |= sealed;
    }

    /// Marks a segment sealed; returns true if it is now removable.
    pub fn seal(&self, seg: SegmentId) -> bool {
        let mut live = self.live.borrow_mut();
        let e = live.entry(seg).or_insert((0, true));
        e.1 = true;
        e.0 == 0
    }

    /// `parts` parts of messages in `seg` are finished; returns true if the segment is now
    /// removable.
    pub fn parts_done(&self, seg: SegmentId, parts: usize) -> bool {
        let mut live = self.live.borrow_mut();
        match live.get_mut(&seg) {
            Some(e) => {
                e.0 = e.0.saturating_sub(parts);
                e.0 == 0 && e.1
            }
            None => false,
        }
    }

    /// Number of segments tracked.
    pub fn len(&self) -> usize {
        self.live.borrow().len()
    }

    /// True when no segment is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes a segment file (after [`SegmentTable::parts_done`] or [`SegmentTable::seal`]
    /// returned true).
    pub async fn remove(&self, seg: SegmentId) {
        self.live.borrow_mut().remove(&seg);
        let path = self.dir.join(seg.file_name());
        match glommio::executor()
            .spawn_blocking(move || release_segment_file(&path))
            .await
        {
            Ok(()) => tracing::debug!(segment = %seg.file_name(), "segment fully delivered, removed"),
            Err(e) => tracing::warn!(segment = %seg.file_name(), error = %e, "could not remove delivered segment"),
        }
    }
}

/// How much of a removed segment's space [`release_segment_file`] gives back per call.
const RELEASE_STEP: u64 = 1 << 20;

/// Removes a segment file and gives its blocks back a step at a time. Blocking: runs on
/// glommio's blocking thread, never on a shard.
///
/// Freeing a whole segment's extents in one go (a preallocated 32 MiB segment; on a file
/// system mounted with `discard` every freed extent is a synchronous discard) took 6-7 ms of
/// kernel time on the development VM. Whichever thread drops the last reference to the inode
/// pays it, and that could be a shard closing its read handle: a shard stalled that long
/// answers nothing, ETRN included. So this thread keeps a handle of its own, unlinks the name
/// first (a crash from here on leaves nothing for recovery to find, exactly as a plain
/// `unlink`), and shrinks the now nameless file from the end in [`RELEASE_STEP`]s, each a
/// fraction of a millisecond the scheduler can interleave with the shard. The last close,
/// wherever it happens, then frees nothing.
pub fn release_segment_file(path: &std::path::Path) -> std::io::Result<()> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        // Out of descriptors, say: removing the name matters more than the stall.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return std::fs::remove_file(path),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(path)?;
    let mut len = file.metadata()?.len();
    while len > 0 {
        len = len.saturating_sub(RELEASE_STEP);
        file.set_len(len)?;
    }
    Ok(())
}

/// The shard's appender. Cheap to clone (an `Rc`).
#[derive(Clone)]
pub struct SpoolWriter {
    inner: Rc<Inner>,
}

struct Inner {
    pending: RefCell<Vec<Pending>>,
    /// Sessions with a transaction they will commit here ([`Incoming`]).
    incoming: Cell<usize>,
    /// Longest a sync waits for them: bounds what a slow client mid-transaction costs the
    /// other commits of the shard.
    commit_delay: std::time::Duration,
    /// Batches written and synced so far.
    batches: Cell<u64>,
    bell: LocalSender<()>,
    segment_size: u64,
    closed: Cell<bool>,
    flusher: RefCell<Option<glommio::task::JoinHandle<()>>>,
}

impl SpoolWriter {
    /// Starts the writer (and its flusher task) for one shard. `commit_delay` bounds how long
    /// a sync waits for announced commits ([`SpoolWriter::incoming`]); zero never waits.
    pub fn start(
        dir: PathBuf,
        shard: usize,
        segment_size: u64,
        commit_delay: std::time::Duration,
        table: Rc<SegmentTable>,
    ) -> SpoolWriter {
        let (bell, ring) = local_channel::new_bounded(1);
        let inner = Rc::new(Inner {
            pending: RefCell::new(Vec::new()),
            incoming: Cell::new(0),
            commit_delay,
            batches: Cell::new(0),
            bell,
            segment_size,
            closed: Cell::new(false),
            flusher: RefCell::new(None),
        });
        let flusher = Flusher {
            inner: inner.clone(),
            dir,
            ids: RefCell::new(IdGen::new(shard)),
            active: RefCell::new(None),
            table,
            zero_fill: ZeroFill::for_segment(segment_size),
            fills: Rc::new(glommio::sync::Semaphore::new(1)),
        };
        let handle = glommio::spawn_local(flusher.run(ring)).detach();
        *inner.flusher.borrow_mut() = Some(handle);
        SpoolWriter { inner }
    }

    /// Announces a commit to come: the caller has a mail transaction open whose message it
    /// will pass to [`SpoolWriter::commit`]. Until the token is given to `commit` or dropped,
    /// the flusher may hold a sync back (at most the commit delay) so that it covers this
    /// record too.
    pub fn incoming(&self) -> Incoming {
        self.inner.incoming.set(self.inner.incoming.get() + 1);
        Incoming {
            inner: self.inner.clone(),
        }
    }

    /// Durably appends one finished record that `parts` node queues will reference. `Ok` means
    /// written and fdatasynced. The parts are counted against the segment as soon as the record
    /// has its place, so the segment cannot be removed before the queues hold the message.
    /// `announced` is the token taken with [`SpoolWriter::incoming`], if any.
    pub async fn commit(
        &self,
        record: Vec<u8>,
        parts: usize,
        announced: Option<Incoming>,
    ) -> Result<Location, SpoolError> {
        if self.inner.closed.get() {
            return Err(SpoolError::Closed);
        }
        let (done, rx) = local_channel::new_bounded(1);
        self.inner.pending.borrow_mut().push(Pending {
            record,
            parts,
            done,
            at: std::time::Instant::now(),
        });
        // The record is pending before its token goes, so the flusher never sees this
        // transaction as finished with nothing to sync.
        drop(announced);
        let _ = self.inner.bell.try_send(());
        rx.recv().await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Batches written so far, each made durable by one sync (or one `RWF_DSYNC` write).
    pub fn batches(&self) -> u64 {
        self.inner.batches.get()
    }

    /// Stops accepting commits and waits until the flusher has written and synced everything
    /// it was given.
    pub async fn close(&self) {
        self.inner.closed.set(true);
        let _ = self.inner.bell.try_send(());
        let handle = self.inner.flusher.borrow_mut().take();
        if let Some(h) = handle {
            h.await;
        }
    }
}

/// A session with a transaction whose message it will commit ([`SpoolWriter::incoming`]).
/// Dropping it (the commit took it, or the transaction ended without one) lets the flusher go
/// on.
pub struct Incoming {
    inner: Rc<Inner>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.inner.incoming.set(self.inner.incoming.get() - 1);
        let _ = self.inner.bell.try_send(());
    }
}

/// A sync waits no longer once this many bytes are pending.
const COMMIT_DELAY_BYTES: usize = 4 << 20;

/// Largest write that consecutive records of a batch are merged into (a bigger record is
/// written alone, without a copy).
const COALESCE_LIMIT: usize = 1 << 20;

struct Flusher {
    inner: Rc<Inner>,
    dir: PathBuf,
    ids: RefCell<IdGen>,
    active: RefCell<Option<Active>>,
    table: Rc<SegmentTable>,
    zero_fill: ZeroFill,
    /// One permit: held by the running zero-fill.
    fills: Rc<glommio::sync::Semaphore>,
}

/// A record with its place assigned, ready to be written.
struct Placed {
    file: Rc<SegFile>,
    failures_at_place: u64,
    record: Vec<u8>,
    loc: Location,
    parts: usize,
    done: Waiter,
}

impl Flusher {
    /// One batch at a time: everything that arrives while a batch is written and synced
    /// becomes the next batch, so under load one sync covers many messages. (Earlier builds
    /// overlapped a batch's write with the previous batch's sync, up to 8 batches in flight;
    /// with the write and sync of a batch now one operation, overlapping would only split
    /// the next batches into more syncs.)
    async fn run(self, ring: LocalReceiver<()>) {
        while ring.recv().await.is_some() {
            loop {
                self.gather(&ring).await;
                let batch = std::mem::take(&mut *self.inner.pending.borrow_mut());
                if batch.is_empty() {
                    break;
                }
                self.inner.batches.set(self.inner.batches.get() + 1);
                let placed = self.place(batch).await;
                write_and_sync(placed, &self.table).await;
            }
            if self.inner.closed.get() && self.inner.pending.borrow().is_empty() {
                break;
            }
        }
        // Let any zero-fill finish before the writer goes away.
        let _ = self.fills.acquire(1).await;
    }

    /// The commit delay: while records are pending and sessions with open transactions may
    /// still commit, waits for them (each commit or dropped token rings the bell), up to the
    /// configured delay or [`COMMIT_DELAY_BYTES`] pending.
    async fn gather(&self, ring: &LocalReceiver<()>) {
        // From the oldest record's arrival, not from now: a record that arrived during the
        // previous batch's sync has already waited that long.
        let start = match self.inner.pending.borrow().first() {
            Some(p) => p.at,
            None => return,
        };
        loop {
            let waiting = {
                let pending = self.inner.pending.borrow();
                !pending.is_empty()
                    && self.inner.incoming.get() > 0
                    && !self.inner.closed.get()
                    && pending.iter().map(|p| p.record.len()).sum::<usize>() < COMMIT_DELAY_BYTES
            };
            let left = self.inner.commit_delay.saturating_sub(start.elapsed());
            if !waiting || left.is_zero() {
                return;
            }
            futures_lite::future::or(
                async {
                    let _ = ring.recv().await;
                },
                glommio::timer::sleep(left),
            )
            .await;
        }
    }

    async fn new_segment(&self) -> Result<Active, SpoolError> {
        let id = SegmentId(self.ids.borrow_mut().next_id());
        let path = self.dir.join(id.file_name());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .buffered_open(&path)
            .await?;
        // Preallocate: disk-full shows up here, before any client is told 250, and the
        // extents exist so appends do not have to allocate. Then the zero-fill's own handle.
        let prepared = async {
            file.pre_allocate(self.inner.segment_size, false).await?;
            OpenOptions::new().write(true).buffered_open(&path).await
        };
        let filler = match prepared.await {
            Ok(f) => f,
            Err(e) => {
                let _ = file.close().await;
                let _ = glommio::io::remove(&path).await;
                return Err(e.into());
            }
        };
        // The new name must survive a crash before any record in it is acknowledged.
        let dir = Directory::open(&self.dir).await?;
        dir.sync().await?;
        let _ = dir.close().await;
        self.table.add_parts(id, 0, false);
        tracing::debug!(segment = %id.file_name(), "new spool segment");
        Ok(Active {
            id,
            zero_fill: None,
            file: Rc::new(SegFile {
                file,
                filler,
                sync_gate: SyncGate::default(),
                sync_failures: Cell::new(0),
                zeroed: Cell::new(0),
            }),
            pos: 0,
        })
    }

    /// Assigns each record its segment and offset (rotating segments as needed). Runs one batch
    /// at a time, so offsets never overlap. The parts are counted against the segment here,
    /// before any write, so the segment cannot be sealed and removed under the batch.
    async fn place(&self, batch: Vec<Pending>) -> Vec<Placed> {
        let mut placed = Vec::with_capacity(batch.len());
        'records: for p in batch {
            let len = p.record.len() as u64;
            // Waiting for a zero-fill is a suspension point during which a sync of the segment
            // can fail, so the segment is checked again after every wait.
            loop {
                let need_new = match &*self.active.borrow() {
                    None => true,
                    Some(a) => (a.pos > 0 && a.pos + len > self.inner.segment_size) || a.file.sync_failures.get() > 0,
                };
                if need_new {
                    let old = self.active.borrow_mut().take();
                    if let Some(old) = old {
                        if self.table.seal(old.id) {
                            self.table.remove(old.id).await;
                        }
                    }
                    match self.new_segment().await {
                        Ok(a) => *self.active.borrow_mut() = Some(a),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot create spool segment");
                            let _ = p.done.try_send(Err(e));
                            continue 'records;
                        }
                    }
                }
                // Never place a record where a zero-fill may still write.
                let fill = {
                    let mut active = self.active.borrow_mut();
                    let a = active.as_mut().expect("active segment set above");
                    match &a.zero_fill {
                        Some((start, _)) if a.pos + len > *start => a.zero_fill.take(),
                        _ => None,
                    }
                };
                match fill {
                    Some((_, task)) => {
                        task.await;
                    }
                    None => break,
                }
            }
            let mut active = self.active.borrow_mut();
            let a = active.as_mut().expect("active segment set above");
            let loc = Location {
                segment: a.id,
                offset: a.pos,
                len: len as u32,
            };
            a.pos += len;
            self.table.add_parts(a.id, p.parts, false);
            placed.push(Placed {
                file: a.file.clone(),
                failures_at_place: a.file.sync_failures.get(),
                record: p.record,
                loc,
                parts: p.parts,
                done: p.done,
            });
        }
        self.fill_ahead();
        placed
    }

    /// Starts the next zero-fill of the active segment when one is due and none is running.
    fn fill_ahead(&self) {
        let mut active = self.active.borrow_mut();
        let Some(a) = active.as_mut() else { return };
        if a.file.sync_failures.get() > 0 {
            return;
        }
        // One fill at a time per shard (this segment's, or a rotated one's still running);
        // `run` waits for it before the writer goes away.
        if self.fills.available() == 0 {
            return;
        }
        let Some((start, end)) = self.zero_fill.next(a.pos, a.file.zeroed.get(), self.inner.segment_size) else {
            a.zero_fill = None;
            return;
        };
        let Ok(permit) = self.fills.try_acquire_static_permit(1) else {
            return;
        };
        let file = a.file.clone();
        let task = glommio::spawn_local(async move {
            zero_fill(&file, start, end).await;
            drop(permit);
        })
        .detach();
        a.zero_fill = Some((start, task));
    }
}

/// Writes zeros over `[start, end)` of a segment and syncs them (see [`ZeroFill`]). A failure
/// only costs speed, except a failed sync, which is counted like a batch's: it may have taken
/// a writeback error that a batch's sync would otherwise have seen.
async fn zero_fill(file: &SegFile, start: u64, end: u64) {
    const ZEROS: usize = 256 << 10;
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(ZEROS);
        if let Err(e) = write_all(&file.filler, vec![0u8; n], at, false).await {
            tracing::warn!(error = %e, "zero-filling a spool segment failed; appends there stay slower");
            return;
        }
        at += n as u64;
    }
    match file.filler.fdatasync().await {
        Ok(()) => file.zeroed.set(file.zeroed.get().max(end)),
        Err(e) => {
            file.sync_failed();
            tracing::error!(error = %SpoolError::from(e), "spool fdatasync failed while zero-filling; the segment is retired");
        }
    }
}

/// A placed record after its write: what to answer and whom.
struct Written {
    done: Waiter,
    loc: Location,
    parts: usize,
    file: Rc<SegFile>,
    failures_at_place: u64,
    result: Result<(), SpoolError>,
}

/// Consecutive records of one file, written together.
struct Run {
    file: Rc<SegFile>,
    offset: u64,
    buf: Vec<u8>,
    members: Vec<Placed>,
}

/// Merges records placed one after another in the same file into runs of at most
/// [`COALESCE_LIMIT`] bytes (a bigger record is a run of its own, without a copy): each write
/// of a buffered file is a trip through the kernel's io-wq thread pool, so n records cost one
/// trip instead of n.
fn coalesce(placed: Vec<Placed>) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut placed = placed.into_iter().peekable();
    while let Some(first) = placed.next() {
        let mut members = vec![first];
        let mut len = members[0].record.len();
        while let Some(next) = placed.peek() {
            let last = &members[members.len() - 1];
            let contiguous =
                Rc::ptr_eq(&next.file, &last.file) && next.loc.offset == last.loc.offset + u64::from(last.loc.len);
            if !contiguous || len + next.record.len() > COALESCE_LIMIT {
                break;
            }
            len += next.record.len();
            members.push(placed.next().expect("peeked"));
        }
        let buf = if members.len() == 1 {
            std::mem::take(&mut members[0].record)
        } else {
            let mut buf = Vec::with_capacity(len);
            for p in &members {
                buf.extend_from_slice(&p.record);
            }
            buf
        };
        runs.push(Run {
            file: members[0].file.clone(),
            offset: members[0].loc.offset,
            buf,
            members,
        });
    }
    runs
}

/// Writes a placed batch and makes it durable, then answers every waiter. A record whose
/// write or sync failed is answered with the error and its parts are taken back; its bytes
/// stay in the segment unacknowledged (recovery only sees them if they are intact, in which
/// case the message is delivered: at-least-once).
///
/// Records placed one after another in the same file go out in one write. A file the batch
/// touches with a single write (the usual case: one active segment, batches under
/// [`COALESCE_LIMIT`]) gets it with `RWF_DSYNC`, which writes and syncs that range in one
/// io_uring operation: buffered writes and syncs on ext4 both run on the kernel's io-wq
/// threads, so this halves the trips per batch. A file touched by several writes gets plain
/// writes and one `fdatasync` after them, since `RWF_DSYNC` syncs only its own range.
async fn write_and_sync(placed: Vec<Placed>, table: &SegmentTable) {
    let runs = coalesce(placed);
    let alone: Vec<bool> = runs
        .iter()
        .map(|run| runs.iter().filter(|other| Rc::ptr_eq(&other.file, &run.file)).count() == 1)
        .collect();
    let mut results: Vec<Written> = Vec::new();
    // Files written without a sync yet, each with the sync count of its gate once our writes
    // to it were done.
    let mut touched: Vec<(Rc<SegFile>, u64)> = Vec::new();
    for (run, alone) in runs.into_iter().zip(alone) {
        let Run {
            file,
            offset,
            buf,
            members,
        } = run;
        let res = if alone {
            let res = file
                .sync_gate
                .run_alone(|| write_all(&file.file, buf, offset, true))
                .await;
            if let Err(e) = &res {
                // Its own sync may have failed and taken a writeback error.
                file.sync_failed();
                tracing::error!(error = %e, "spool write with RWF_DSYNC failed; the batch is not acknowledged and the segment is retired");
            }
            res
        } else {
            let res = write_all(&file.file, buf, offset, false).await;
            if res.is_ok() {
                let mark = file.sync_gate.mark();
                match touched.iter_mut().find(|(f, _)| Rc::ptr_eq(f, &file)) {
                    Some((_, m)) => *m = mark,
                    None => touched.push((file.clone(), mark)),
                }
            }
            res
        };
        results.extend(members.into_iter().map(|p| Written {
            done: p.done,
            loc: p.loc,
            parts: p.parts,
            file: p.file,
            failures_at_place: p.failures_at_place,
            result: res.clone(),
        }));
    }
    for (file, mark) in touched {
        if let Err(e) = file.sync_gate.sync_after(mark, || file.file.fdatasync()).await {
            file.sync_failed();
            let e = SpoolError::from(e);
            tracing::error!(error = %e, "spool fdatasync failed; the batch is not acknowledged and the segment is retired");
        }
    }
    for Written {
        done: w,
        loc,
        parts,
        file,
        failures_at_place,
        result: mut r,
    } in results
    {
        if r.is_ok() && file.sync_failures.get() != failures_at_place {
            // Our sync, or a concurrent one on the same file, failed: our pages may be lost.
            r = Err(SpoolError::Io("a sync of this segment failed".into()));
        }
        if let Err(e) = &r {
            tracing::error!(error = %e, segment = %loc.segment.file_name(), offset = loc.offset, "spool write failed");
            if parts > 0 && table.parts_done(loc.segment, parts) {
                // Sealed (by a rotation while this write was in flight) and now holds nothing
                // acknowledged: nobody else would ever remove it.
                table.remove(loc.segment).await;
            }
        }
        let _ = w.try_send(r.map(|()| loc));
    }
}

/// One `fdatasync` at a time on a file handle, shared by everyone who wrote before it started.
///
/// A writer takes [`SyncGate::mark`] after its writes and then calls [`SyncGate::sync_after`]:
/// if a sync that started after the mark has succeeded meanwhile, its pages are already
/// durable and no sync of its own is needed; otherwise it runs one. Batches that pile up behind
/// a running sync are thus served by the next one together (group commit), and no two syncs on
/// the handle race for one writeback error.
///
/// Today the writer has one batch in flight, so the gate is never contended from the append
/// path and its permit never waits (group commit happens one level up, in the batch). It is kept
/// because it states the rule in one place: should batches ever overlap again, or another task
/// sync a segment's append handle, the rule still holds without anyone having to remember it.
struct SyncGate {
    running: glommio::sync::Semaphore,
    started: Cell<u64>,
    ok_through: Cell<u64>,
}

impl Default for SyncGate {
    fn default() -> Self {
        SyncGate {
            running: glommio::sync::Semaphore::new(1),
            started: Cell::new(0),
            ok_through: Cell::new(0),
        }
    }
}

impl SyncGate {
    /// Runs `op`, a write that carries its own sync of just its range (`RWF_DSYNC`), while no
    /// other sync of the handle runs, so the two cannot race for one writeback error. It does
    /// not count as a sync of the file ([`SyncGate::sync_after`] never relies on it): it
    /// covers nobody else's writes.
    async fn run_alone<F, Fut>(&self, op: F) -> Result<(), SpoolError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), SpoolError>>,
    {
        let _running = self.running.acquire_permit(1).await.map_err(SpoolError::from)?;
        op().await
    }

    /// The syncs started so far: a sync numbered above it starts after this call.
    fn mark(&self) -> u64 {
        self.started.get()
    }

    /// Returns once everything written before `mark` is durable by a sync that began after
    /// it: one that already succeeded, or `sync` run now.
    async fn sync_after<F, Fut>(&self, mark: u64, sync: F) -> Result<(), glommio::GlommioError<()>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), glommio::GlommioError<()>>>,
    {
        let _running = self.running.acquire_permit(1).await?;
        if self.ok_through.get() > mark {
            return Ok(());
        }
        let n = self.started.get() + 1;
        self.started.set(n);
        sync().await?;
        self.ok_through.set(n);
        Ok(())
    }
}

/// Writes a whole record. A short write on a regular file means the device is failing or full
/// (the segment is preallocated, so it should not happen); the record is then not acknowledged.
/// With `dsync` the write carries `RWF_DSYNC`: `Ok` means the bytes are also durable.
async fn write_all(file: &BufferedFile, buf: Vec<u8>, pos: u64, dsync: bool) -> Result<(), SpoolError> {
    let n = buf.len();
    let written = if dsync {
        file.write_at_dsync(buf, pos).await?
    } else {
        file.write_at(buf, pos).await?
    };
    if written < n {
        return Err(SpoolError::Io(format!("short write ({written} of {n} bytes)")));
    }
    Ok(())
}

/// Read and state-update handles for segment files, opened on demand, per shard. Segments may
/// have been written by another shard; the files are shared through the file system.
pub struct SegmentFiles {
    dir: PathBuf,
    open: RefCell<HashMap<SegmentId, Rc<BufferedFile>>>,
}

impl SegmentFiles {
    /// Handles for segments in `dir`.
    pub fn new(dir: PathBuf) -> SegmentFiles {
        SegmentFiles {
            dir,
            open: RefCell::new(HashMap::new()),
        }
    }

    async fn file(&self, seg: SegmentId) -> std::io::Result<Rc<BufferedFile>> {
        if let Some(f) = self.open.borrow().get(&seg) {
            return Ok(f.clone());
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .buffered_open(self.dir.join(seg.file_name()))
            .await
            .map_err(std::io::Error::from)?;
        let f = Rc::new(f);
        self.open.borrow_mut().insert(seg, f.clone());
        Ok(f)
    }

    /// Reads a whole record.
    pub async fn read(&self, loc: Location) -> std::io::Result<glommio::io::ReadResult> {
        let f = self.file(loc.segment).await?;
        let r = f
            .read_at(loc.offset, loc.len as usize)
            .await
            .map_err(std::io::Error::from)?;
        if r.len() < loc.len as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read of spool record",
            ));
        }
        Ok(r)
    }

    /// Rewrites recipient state octets (`state_offset` is relative to the record). Not synced
    /// here: call [`SegmentFiles::sync`] after a batch. A crash before the sync can only cause a
    /// redelivery.
    pub async fn set_states(
        &self,
        loc: Location,
        state_offset: usize,
        updates: &[(u16, record::RcptState)],
    ) -> std::io::Result<()> {
        let f = self.file(loc.segment).await?;
        for (idx, st) in updates {
            let pos = loc.offset + state_offset as u64 + u64::from(*idx);
            f.write_at(vec![st.to_byte()], pos)
                .await
                .map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// fdatasyncs a segment's state updates.
    pub async fn sync(&self, seg: SegmentId) -> std::io::Result<()> {
        let f = self.file(seg).await?;
        f.fdatasync().await.map_err(std::io::Error::from)
    }

    /// Closes the handle of a removed segment.
    pub fn forget(&self, seg: SegmentId) {
        self.open.borrow_mut().remove(&seg);
    }

    /// Closes every handle, so removed segments release their disk space. Called when the
    /// shard has no queue run going.
    pub fn close_all(&self) {
        self.open.borrow_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::{release_segment_file, SegmentTable, SpoolWriter, SyncGate, COALESCE_LIMIT, RELEASE_STEP};
    use crate::spool::record::RecordBuilder;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    fn run<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> T
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(f)
            .expect("spawn executor")
            .join()
            .expect("executor thread")
    }

    /// A fake fdatasync: counts calls and the most running at once, takes 5 ms, fails on the
    /// calls listed.
    #[derive(Default)]
    struct FakeSync {
        calls: Cell<u32>,
        running: Cell<u32>,
        most: Cell<u32>,
        fail_on: Vec<u32>,
    }

    async fn fake_sync(s: Rc<FakeSync>) -> Result<(), glommio::GlommioError<()>> {
        s.calls.set(s.calls.get() + 1);
        let call = s.calls.get();
        s.running.set(s.running.get() + 1);
        s.most.set(s.most.get().max(s.running.get()));
        glommio::timer::sleep(Duration::from_millis(5)).await;
        s.running.set(s.running.get() - 1);
        if s.fail_on.contains(&call) {
            return Err(std::io::Error::other("EIO").into());
        }
        Ok(())
    }

    /// Five writers finishing their writes at about the same time: one sync at a time, and the
    /// four that waited behind the first share the second.
    #[test]
    fn one_sync_at_a_time_and_waiters_share_the_next() {
        let (calls, most, ok) = run(|| {
            async {
                let gate = Rc::new(SyncGate::default());
                let fake = Rc::new(FakeSync::default());
                let mut tasks = Vec::new();
                for i in 0..5u64 {
                    let (gate, fake) = (gate.clone(), fake.clone());
                    tasks.push(glommio::spawn_local(async move {
                        // Writer 0 is done first; the others finish while its sync runs.
                        glommio::timer::sleep(Duration::from_millis(if i == 0 { 0 } else { 2 })).await;
                        let mark = gate.mark();
                        gate.sync_after(mark, || fake_sync(fake.clone())).await.is_ok()
                    }));
                }
                let mut ok = 0;
                for t in tasks {
                    ok += usize::from(t.await);
                }
                (fake.calls.get(), fake.most.get(), ok)
            }
        });
        assert_eq!((calls, most, ok), (2, 1, 5));
    }

    /// A sync that started before a writer's writes were done never counts for it, and a failed
    /// sync serves nobody: the next writer runs its own.
    #[test]
    fn only_a_later_successful_sync_covers_a_write() {
        let calls = run(|| {
            async {
                let gate = SyncGate::default();
                let fake = Rc::new(FakeSync {
                    fail_on: vec![2],
                    ..FakeSync::default()
                });
                let m0 = gate.mark();
                assert!(gate.sync_after(m0, || fake_sync(fake.clone())).await.is_ok());
                // Written after sync 1 started: needs sync 2, which fails.
                let m1 = gate.mark();
                assert!(gate.sync_after(m1, || fake_sync(fake.clone())).await.is_err());
                // Same mark again (the batch behind a failed sync): it must sync itself.
                assert!(gate.sync_after(m1, || fake_sync(fake.clone())).await.is_ok());
                // Already covered by sync 3, which started after m1: no new call.
                assert!(gate.sync_after(m1, || fake_sync(fake.clone())).await.is_ok());
                fake.calls.get()
            }
        });
        assert_eq!(calls, 3);
    }

    /// A write that syncs its own range never runs beside a sync of the same handle, and it
    /// does not count as a sync of the file: a writer whose mark predates it still syncs.
    #[test]
    fn a_dsync_write_runs_alone_and_covers_nobody_else() {
        let (calls, most) = run(|| async {
            let gate = Rc::new(SyncGate::default());
            let fake = Rc::new(FakeSync::default());
            let m0 = gate.mark();
            let (g, f) = (gate.clone(), fake.clone());
            let alone = glommio::spawn_local(async move {
                g.run_alone(|| async { fake_sync(f).await.map_err(super::SpoolError::from) })
                    .await
            });
            let (g, f) = (gate.clone(), fake.clone());
            let synced = glommio::spawn_local(async move { g.sync_after(m0, || fake_sync(f)).await });
            assert!(alone.await.is_ok());
            assert!(synced.await.is_ok());
            (fake.calls.get(), fake.most.get())
        });
        // Both ran (the DSYNC write did not stand in for the sync), one at a time.
        assert_eq!((calls, most), (2, 1));
    }

    /// A writer in a fresh directory with the given commit delay, and the directory.
    fn delayed_writer(delay: Duration) -> (SpoolWriter, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().to_path_buf();
        let table = Rc::new(SegmentTable::new(seg_dir.clone()));
        (SpoolWriter::start(seg_dir, 0, 1 << 20, delay, table), dir)
    }

    /// Commits a record in a task of its own; the task sets `done` when the commit returns.
    fn commit_in_background(
        w: &SpoolWriter,
        id: u64,
        announced: Option<super::Incoming>,
        done: Rc<Cell<bool>>,
    ) -> glommio::task::JoinHandle<()> {
        let w = w.clone();
        glommio::spawn_local(async move {
            w.commit(record(id, 100), 1, announced).await.expect("committed");
            done.set(true);
        })
        .detach()
    }

    /// A sync waits for a transaction that announced its commit, and then covers both records.
    #[test]
    fn a_sync_waits_for_an_announced_commit_and_covers_it() {
        let (batches, waited) = run(|| async {
            let (w, _dir) = delayed_writer(Duration::from_secs(30));
            let announced = w.incoming();
            let first = Rc::new(Cell::new(false));
            let t = commit_in_background(&w, 1, None, first.clone());
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let waited = !first.get();
            w.commit(record(2, 100), 1, Some(announced)).await.expect("committed");
            t.await;
            (w.batches(), waited)
        });
        assert!(
            waited,
            "the first commit was synced without waiting for the announced one"
        );
        assert_eq!(batches, 1);
    }

    /// A transaction that ends without a commit (its token dropped) releases the waiting sync
    /// at once, and with nothing announced a sync does not wait at all.
    #[test]
    fn a_dropped_announcement_or_none_does_not_hold_a_sync() {
        let elapsed = run(|| async {
            let (w, _dir) = delayed_writer(Duration::from_secs(30));
            let t0 = std::time::Instant::now();
            w.commit(record(1, 100), 1, None).await.expect("committed");
            let announced = w.incoming();
            let done = Rc::new(Cell::new(false));
            let t = commit_in_background(&w, 2, None, done.clone());
            glommio::timer::sleep(Duration::from_millis(20)).await;
            assert!(!done.get(), "did not wait for the announced commit");
            drop(announced);
            t.await;
            t0.elapsed()
        });
        assert!(elapsed < Duration::from_secs(10), "a sync waited {elapsed:?}");
    }

    /// The wait is bounded by the configured delay: a transaction that never commits holds
    /// other commits back that long and no longer.
    #[test]
    fn the_commit_delay_is_bounded() {
        let elapsed = run(|| async {
            let (w, _dir) = delayed_writer(Duration::from_millis(200));
            let _never = w.incoming();
            let t0 = std::time::Instant::now();
            w.commit(record(1, 100), 1, None).await.expect("committed");
            t0.elapsed()
        });
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    }

    /// The delay counts from the record's commit, not from when the flusher gets to it: a
    /// record that waited while its shard was busy (here: the executor blocked for 300 ms,
    /// as a batch's sync or other sessions' work would hold the flusher back) has waited out
    /// its 200 ms and is synced at once (counted from the flusher, it would be 500 ms).
    #[test]
    fn the_commit_delay_counts_from_the_commit() {
        let elapsed = run(|| async {
            let (w, _dir) = delayed_writer(Duration::from_millis(200));
            let _never = w.incoming();
            let t0 = std::time::Instant::now();
            let mut commit = std::pin::pin!(w.commit(record(1, 100), 1, None));
            // One poll makes the record pending; the flusher cannot run before this task yields.
            assert!(futures_lite::future::poll_once(commit.as_mut()).await.is_none());
            std::thread::sleep(Duration::from_millis(300));
            commit.await.expect("committed");
            t0.elapsed()
        });
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_millis(450),
            "the delay started again when the flusher ran: {elapsed:?}"
        );
    }

    fn record(id: u64, body_len: usize) -> Vec<u8> {
        let mut b = RecordBuilder::new(id, 1, b"s@x.test", &[b"r@n1.test"], body_len);
        let body: Vec<u8> = (0..body_len).map(|i| b'a' + (i % 26) as u8).collect();
        b.data_mut().extend_from_slice(&body);
        b.data_mut().extend_from_slice(b"\r\n");
        b.finish(false)
    }

    /// Both durability paths on a real file: a batch of small records (one write per file,
    /// `RWF_DSYNC`) and a batch of two records too big to merge (two writes to one file, then
    /// `fdatasync`). Every acknowledged record is in the segment, intact, at its location.
    #[test]
    fn committed_records_are_in_the_segment_on_both_sync_paths() {
        let dir = tempfile::tempdir().unwrap();
        let seg_dir = dir.path().to_path_buf();
        let big = COALESCE_LIMIT / 2 + 4096;
        let locations = run(move || async move {
            let table = Rc::new(SegmentTable::new(seg_dir.clone()));
            let writer = SpoolWriter::start(seg_dir, 0, 8 << 20, std::time::Duration::ZERO, table);
            let mut tasks = Vec::new();
            // Ids 1-20 small, committed together; then 21-22 big, committed together.
            for (ids, len) in [(1..=20u64, 900usize), (21..=22, big)] {
                let mut batch = Vec::new();
                for id in ids {
                    let w = writer.clone();
                    batch.push(glommio::spawn_local(async move {
                        (id, w.commit(record(id, len), 1, None).await)
                    }));
                }
                for t in batch {
                    tasks.push(t.await);
                }
            }
            writer.close().await;
            tasks
                .into_iter()
                .map(|(id, r)| (id, r.expect("committed")))
                .collect::<Vec<_>>()
        });
        let scan = crate::spool::scan(dir.path(), &|_| Some(0)).unwrap();
        let mut ids: Vec<u64> = scan.messages.iter().map(|m| m.msg_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=22).collect::<Vec<_>>());
        assert_eq!(scan.corrupt_records, 0);
        for (id, loc) in locations {
            let bytes = std::fs::read(dir.path().join(loc.segment.file_name())).unwrap();
            let at = &bytes[loc.offset as usize..(loc.offset + u64::from(loc.len)) as usize];
            let len = if id <= 20 { 900 } else { big };
            assert_eq!(at, &record(id, len)[..], "record {id}");
        }
    }

    #[test]
    fn a_segment_that_cannot_be_opened_is_still_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        // A socket's name: open(2) fails with ENXIO, unlink(2) works.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(std::fs::OpenOptions::new().write(true).open(&path).is_err());
        release_segment_file(&path).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_released_segment_is_gone_and_empty_even_while_a_reader_holds_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        // Not a multiple of the step, so the last step is a partial one.
        let size = 3 * RELEASE_STEP + 12_345;
        std::fs::write(&path, vec![7u8; size as usize]).unwrap();
        // A shard's read handle, still open when the segment goes.
        let reader = std::fs::File::open(&path).unwrap();
        release_segment_file(&path).unwrap();
        assert!(!path.exists(), "the name is gone");
        // The reader's close frees nothing: the blocks were given back already.
        assert_eq!(reader.metadata().unwrap().len(), 0);
        assert_eq!(reader.metadata().unwrap().blocks(), 0);
        let err = release_segment_file(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
