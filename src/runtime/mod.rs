//! The thread-per-core runtime: one glommio executor per shard, the [`ShardRouter`] that maps a
//! node to its owning shard, the typed cross-shard messages and their bounded inboxes, and
//! start-up (spool lock, recovery scan, distribution of the recovered queues).
//!
//! Cross-shard traffic is one-way: a sender reserves a slot in the receiver's inbox
//! ([`Inbox::reserve`]) *before* it does work whose result must be delivered, so a full inbox
//! becomes a 4xx reply up front and never a blocked executor or an unbounded queue. Nothing
//! here awaits another shard.

pub mod shard;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

use crate::config::{Config, NodeName, Placement};
use crate::queue::{NodeIdx, QueueEntry};
use crate::spool::{self, SegmentId, SpoolDir};

pub use shard::ShardCtx;

/// Maps nodes to shards with a stable hash (FNV-1a), the same in every process and release, so
/// a restart with the same shard count routes exactly as before.
#[derive(Debug, Clone, Copy)]
pub struct ShardRouter {
    shards: usize,
}

impl ShardRouter {
    /// A router over `shards` shards.
    pub fn new(shards: usize) -> ShardRouter {
        ShardRouter { shards: shards.max(1) }
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard that owns `node`'s queue.
    pub fn shard_for(&self, node: &NodeName) -> usize {
        (fnv1a(node.as_str().as_bytes()) % self.shards as u64) as usize
    }

    /// The shard that keeps the live-part count of a segment found at start-up.
    pub fn shard_for_segment(&self, seg: SegmentId) -> usize {
        (fnv1a(&seg.0.to_le_bytes()) % self.shards as u64) as usize
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A message from one shard to another.
#[derive(Debug)]
pub enum ShardMsg {
    /// Newly spooled parts for nodes this shard owns, gathered by the sending shard during one
    /// pass of its executor ([`ShardCtx::enqueue`]). Takes one inbox slot however many parts
    /// it carries.
    Enqueue(Vec<(NodeIdx, QueueEntry)>),
    /// Parts of messages in a segment this shard accounts for are finished.
    PartsDone {
        /// The segment.
        seg: SegmentId,
        /// How many parts.
        parts: usize,
    },
    /// A segment file was removed: close any handle to it (its disk space is freed only when
    /// the last handle goes).
    SegmentRemoved(SegmentId),
    /// An ETRN for nodes this shard owns.
    Etrn(crate::etrn::EtrnRequest),
}

/// The bounded inbox of one shard. The channel itself is unbounded; the bound is enforced by
/// `permits`, which senders take with [`Inbox::reserve`] before they commit to sending.
#[derive(Clone)]
pub struct Inbox {
    tx: async_channel::Sender<ShardMsg>,
    used: Arc<AtomicUsize>,
    capacity: usize,
}

impl Inbox {
    /// Creates an inbox and its receiving end.
    pub fn new(capacity: usize) -> (Inbox, InboxReceiver) {
        let (tx, rx) = async_channel::unbounded();
        let used = Arc::new(AtomicUsize::new(0));
        (
            Inbox {
                tx,
                used: used.clone(),
                capacity,
            },
            InboxReceiver { rx, used },
        )
    }

    /// Takes `n` slots; false (and nothing taken) when the inbox is too full.
    pub fn reserve(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.capacity {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Gives back slots taken with `reserve` that will not be used.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Sends using a slot taken earlier with `reserve`. Never blocks.
    pub fn send_reserved(&self, msg: ShardMsg) {
        if self.tx.try_send(msg).is_err() {
            // Only when the receiving shard is gone (shutdown); give the slot back.
            self.release(1);
        }
    }

    /// Reserves one slot and sends; gives the message back when the inbox is full.
    pub fn try_send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        if !self.reserve(1) {
            return Err(msg);
        }
        self.send_reserved(msg);
        Ok(())
    }
}

/// The receiving end of an [`Inbox`].
pub struct InboxReceiver {
    rx: async_channel::Receiver<ShardMsg>,
    used: Arc<AtomicUsize>,
}

impl InboxReceiver {
    /// Waits for the next message (None when every sender is gone).
    pub async fn recv(&self) -> Option<ShardMsg> {
        let m = self.rx.recv().await.ok()?;
        self.used.fetch_sub(1, Ordering::AcqRel);
        Some(m)
    }
}

/// Everything one shard starts with, prepared by the main thread.
#[derive(Default)]
pub struct ShardInit {
    /// Recovered queue entries for nodes this shard owns.
    pub entries: Vec<(NodeIdx, QueueEntry)>,
    /// Recovered live-part counts of segments this shard accounts for.
    pub segments: Vec<(SegmentId, usize)>,
    /// Recovered bounces to senders outside every node, with the sender's domain.
    pub outbound: Vec<(QueueEntry, String)>,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Spool could not be opened or is locked.
    #[error(transparent)]
    Spool(#[from] spool::OpenError),
    /// Recovery scan failed.
    #[error("spool recovery scan failed: {0}")]
    Scan(std::io::Error),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The executors could not start.
    #[error("cannot start executors: {0}")]
    Executor(String),
}

/// The classifier the recovery scan uses: a recipient's class is its node's index.
pub fn node_classifier(cfg: &Config) -> impl Fn(&[u8]) -> Option<u32> + '_ {
    move |rcpt: &[u8]| {
        let at = memchr::memrchr(b'@', rcpt)?;
        let domain = std::str::from_utf8(&rcpt[at + 1..]).ok()?;
        cfg.node_index_for_domain(domain).map(|i| i as u32)
    }
}

/// Distributes a recovery scan over the shards.
pub fn distribute(cfg: &Config, router: ShardRouter, scan: &spool::ScanResult) -> Vec<ShardInit> {
    let mut inits: Vec<ShardInit> = (0..router.shards()).map(|_| ShardInit::default()).collect();
    let mut parts_per_segment: std::collections::HashMap<SegmentId, usize> = Default::default();
    for m in &scan.messages {
        let mut by_node: Vec<(NodeIdx, Vec<u16>)> = Vec::new();
        for &(idx, class) in &m.pending {
            let n = NodeIdx(class);
            match by_node.iter_mut().find(|(k, _)| *k == n) {
                Some((_, v)) => v.push(idx),
                None => by_node.push((n, vec![idx])),
            }
        }
        // Recipients outside every node: a bounce on its way to an outside sender (delivered
        // by `outbound`), or mail for a node since removed from the configuration (kept).
        let mut by_domain: Vec<(String, Vec<u16>)> = Vec::new();
        let mut orphan = false;
        for (idx, rcpt) in &m.unclassified {
            if !m.null_sender {
                orphan = true;
                continue;
            }
            let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d).to_ascii_lowercase();
            match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, v)) => v.push(*idx),
                None => by_domain.push((domain, vec![*idx])),
            }
        }
        if orphan {
            tracing::warn!(queue_id = %spool::queue_id(m.msg_id), "message has recipients of a node no longer configured; kept in the spool untouched");
        }
        let table_shard = router.shard_for_segment(m.location.segment);
        *parts_per_segment.entry(m.location.segment).or_default() +=
            by_node.len() + by_domain.len() + usize::from(orphan);
        let entry = |rcpts: Vec<u16>| QueueEntry {
            loc: m.location,
            msg_id: m.msg_id,
            arrival: m.arrival,
            size: m.location.len,
            rcpts,
            table_shard: table_shard as u16,
        };
        for (node, rcpts) in by_node {
            let owner = router.shard_for(&cfg.nodes[node.0 as usize].name);
            inits[owner].entries.push((node, entry(rcpts)));
        }
        for (domain, rcpts) in by_domain {
            let owner = (fnv1a(domain.as_bytes()) % router.shards() as u64) as usize;
            inits[owner].outbound.push((entry(rcpts), domain));
        }
    }
    for (seg, parts) in parts_per_segment {
        inits[router.shard_for_segment(seg)].segments.push((seg, parts));
    }
    inits
}

/// Blocks SIGTERM and SIGINT in every thread (the executors inherit the mask) and starts a
/// plain thread that waits for them with `sigwait` and tells each shard over a crossbeam
/// channel (the shards poll it on a timer: a plain thread never wakes an executor directly).
fn spawn_signal_thread(shards: usize) -> Vec<Option<crossbeam_channel::Receiver<()>>> {
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..shards {
        let (tx, rx) = crossbeam_channel::bounded(1);
        txs.push(tx);
        rxs.push(Some(rx));
    }
    // SAFETY: plain libc signal-mask calls on a zeroed sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("etrn-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised signal set.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(
                    signal = sig,
                    "shutting down: no new connections, finishing transactions in flight"
                );
                for tx in &txs {
                    let _ = tx.try_send(());
                }
            }
        })
        .expect("spawn signal thread");
    rxs
}

/// Opens the spool, recovers it, starts every shard and blocks until they stop.
pub fn run(mut cfg: Config) -> Result<(), StartError> {
    if cfg.dns.nameservers.is_empty() {
        // Read /etc/resolv.conf here, before the executors start: never a blocking file read
        // on a shard.
        let found = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| crate::dns::nameservers_from_resolv_conf(&t))
            .unwrap_or_default();
        cfg.dns.nameservers = if found.is_empty() {
            tracing::warn!("no nameserver in /etc/resolv.conf; using 127.0.0.1:53");
            vec![SocketAddr::from(([127, 0, 0, 1], 53))]
        } else {
            found
        };
    }
    let cfg = Arc::new(cfg);
    let tls_server = match &cfg.tls {
        Some(t) => Some(crate::tls::server_config(&t.cert, &t.key)?),
        None => None,
    };
    let spool_dir = SpoolDir::open(&cfg.spool_dir)?;
    let seg_dir = spool_dir.segments_dir();
    let t0 = std::time::Instant::now();
    let scan = spool::scan(&seg_dir, &node_classifier(&cfg)).map_err(StartError::Scan)?;
    for dead in &scan.dead_segments {
        let _ = std::fs::remove_file(seg_dir.join(dead.file_name()));
    }
    let router = ShardRouter::new(cfg.shards);
    let inits = distribute(&cfg, router, &scan);
    tracing::info!(
        messages = scan.messages.len(),
        segments = scan.live_segments.len(),
        removed_segments = scan.dead_segments.len(),
        corrupt_records = scan.corrupt_records,
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "spool recovered"
    );
    drop(scan);
    // The scan's buffers are freed on this thread, which does nothing but wait from now on, so
    // the allocator would keep their pages; give them back now. (A no-op when mimalloc is not
    // the global allocator, as in unit tests.)
    // SAFETY: mi_collect only walks and releases the calling thread's own free pages.
    unsafe { libmimalloc_sys::mi_collect(true) };
    if cfg.nodes.is_empty() {
        tracing::warn!("no [[node]] configured: this relay accepts mail for nobody until nodes are configured");
    }
    let mut inboxes = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..router.shards() {
        let (tx, rx) = Inbox::new(65_536);
        inboxes.push(tx);
        receivers.push(Some(rx));
    }
    let inboxes = Arc::new(inboxes);
    let receivers = Arc::new(Mutex::new(receivers));
    let inits = Arc::new(Mutex::new(inits.into_iter().map(Some).collect::<Vec<_>>()));
    let next_shard = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let placement = match cfg.placement {
        Placement::Pinned => PoolPlacement::MaxSpread(router.shards(), None),
        Placement::Unbound => PoolPlacement::Unbound(router.shards()),
    };
    let listen: Vec<SocketAddr> = cfg.smtp.listen.clone();
    let stops = Arc::new(Mutex::new(spawn_signal_thread(router.shards())));
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("etrn-shard")
        .io_memory(1 << 20)
        // Each shard's blocking thread (segment removal, which frees a segment's blocks, and
        // the like) goes wherever the kernel finds room. glommio's default binds every one of
        // them to the first CPU of the pool's placement: with `placement = "pinned"` that put
        // every shard's housekeeping on shard 0's CPU.
        .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
        .on_all_shards({
            let shared = shard::SharedParts {
                cfg: cfg.clone(),
                router,
                inboxes,
                seg_dir,
                connections,
                etrn: crate::etrn::EtrnState::new(),
                tls_server,
                tls_client: crate::delivery::TlsClient(crate::tls::opportunistic_client_config()),
            };
            move || async move {
                let id = next_shard.fetch_add(1, Ordering::SeqCst);
                let init = inits.lock().expect("init lock")[id].take().unwrap_or_default();
                let rx = receivers.lock().expect("rx lock")[id]
                    .take()
                    .expect("one receiver per shard");
                let stop = stops.lock().expect("stop lock")[id]
                    .take()
                    .expect("one stop channel per shard");
                let ctx = ShardCtx::new(id, shared, init);
                shard::serve(ctx, rx, listen, stop).await;
            }
        })
        .map_err(|e| StartError::Executor(e.to_string()))?;
    let _lock = spool_dir; // held until every shard has stopped
    for r in handles.join_all() {
        if let Err(e) = r {
            tracing::error!(error = %e, "shard stopped with an error");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_is_stable_and_spreads() {
        let r = ShardRouter::new(4);
        let n = NodeName::parse("node1.test").unwrap();
        assert_eq!(r.shard_for(&n), r.shard_for(&NodeName::parse("NODE1.test").unwrap()));
        // Pinned value: changing the hash would re-route every spooled queue.
        assert_eq!(fnv1a(b"node1.test"), fnv1a(b"node1.test"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        let mut counts = [0; 4];
        for i in 0..1000 {
            counts[r.shard_for(&NodeName::parse(&format!("n{i}.test")).unwrap())] += 1;
        }
        assert!(counts.iter().all(|c| *c > 150), "{counts:?}");
    }

    #[test]
    fn inbox_bound_is_enforced() {
        let (tx, _rx) = Inbox::new(2);
        assert!(tx.reserve(2));
        assert!(!tx.reserve(1));
        tx.release(1);
        assert!(tx
            .try_send(ShardMsg::PartsDone {
                seg: SegmentId(1),
                parts: 1
            })
            .is_ok());
        assert!(tx
            .try_send(ShardMsg::PartsDone {
                seg: SegmentId(1),
                parts: 1
            })
            .is_err());
    }
}
