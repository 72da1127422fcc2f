//! The run's shared book-keeping: which message ids were acknowledged by the target and which
//! arrived at a sink (one flag byte per message, shared by every executor), the counters the
//! progress line and the completion checks read, and the latency histograms.
//!
//! Every executor writes here with relaxed atomics; the histograms are kept per executor and
//! merged into the shared ones every 200 ms ([`Hists::merge_into`]), so no lock is taken per
//! message.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;

/// The target acknowledged the message (250 after DATA).
const ACKED: u8 = 1;
/// A sink received it intact.
const RECEIVED: u8 = 2;
/// A sink received it more than once.
const DUPLICATE: u8 = 4;
/// A sink received a damaged copy.
const CORRUPT: u8 = 8;

/// Latency histograms of one run, in microseconds.
pub struct Hists {
    /// MAIL sent to the 250 after DATA.
    pub txn: Histogram<u64>,
    /// ETRN sent to its reply (the ETRNs that start queue runs).
    pub etrn: Histogram<u64>,
    /// ETRN sent to its reply, from the probe connections while a flush is running.
    pub probe: Histogram<u64>,
    /// Submitted (MAIL sent) to received at the sink.
    pub e2e: Histogram<u64>,
}

fn hist() -> Histogram<u64> {
    // 1 us .. 1 h at 3 significant digits
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Default for Hists {
    fn default() -> Self {
        Hists {
            txn: hist(),
            etrn: hist(),
            probe: hist(),
            e2e: hist(),
        }
    }
}

impl Hists {
    /// Adds a value in microseconds (clamped into the histogram's range).
    pub fn record(h: &mut Histogram<u64>, us: u64) {
        let _ = h.record(us.clamp(1, 3_600_000_000));
    }

    /// Adds these into `shared` and clears them.
    pub fn merge_into(&mut self, shared: &Mutex<Hists>) {
        let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        for (a, b) in [
            (&mut s.txn, &mut self.txn),
            (&mut s.etrn, &mut self.etrn),
            (&mut s.probe, &mut self.probe),
            (&mut s.e2e, &mut self.e2e),
        ] {
            if !b.is_empty() {
                let _ = a.add(&*b);
                b.reset();
            }
        }
    }
}

/// Shared state of one run against one target.
pub struct Ledger {
    /// Time zero of the run; every `*_ns` value is relative to it.
    pub epoch: Instant,
    /// Distinguishes this run's mail from stale mail of earlier runs.
    pub nonce: u64,
    /// Messages to submit.
    pub total: u64,
    /// Nodes messages are spread over (message `id` goes to node `id % nodes`).
    pub nodes: usize,
    /// Nodes `0..dialup` have a sink and an ETRN client.
    pub dialup: usize,
    next_id: AtomicU64,
    flags: Vec<AtomicU8>,
    /// Messages acknowledged.
    pub acked: AtomicU64,
    /// Octets of acknowledged messages.
    pub acked_bytes: AtomicU64,
    /// Transactions refused by the target (4xx/5xx on MAIL, RCPT, DATA or after the data).
    pub rejected: AtomicU64,
    /// Connection-level failures (connect, reset, timeout, protocol).
    pub errors: AtomicU64,
    /// Transactions started (MAIL sent).
    pub started: AtomicU64,
    /// Acknowledged per node.
    pub acked_per_node: Vec<AtomicU64>,
    /// Acknowledged messages that also arrived intact, per node (exact whatever the order of
    /// the acknowledgement and the arrival).
    pub matched_per_node: Vec<AtomicU64>,
    /// Time of the last intact arrival per node (ns).
    pub last_recv_ns: Vec<AtomicU64>,
    /// Time the flush ETRN for the node was sent (ns; `u64::MAX`: not yet).
    pub etrn_ns: Vec<AtomicU64>,
    /// Distinct intact messages received.
    pub received: AtomicU64,
    /// Octets received intact.
    pub received_bytes: AtomicU64,
    /// Second and later copies.
    pub duplicates: AtomicU64,
    /// Damaged copies.
    pub corrupt: AtomicU64,
    /// Arrived at the sink of another node than its recipient's.
    pub misrouted: AtomicU64,
    /// Ours by format but from another run (stale queue content of the target).
    pub foreign: AtomicU64,
    /// Not recognizable as a test message at all.
    pub unrecognized: AtomicU64,
    /// Time of the first and last acknowledgement (ns).
    pub first_ack_ns: AtomicU64,
    /// See `first_ack_ns`.
    pub last_ack_ns: AtomicU64,
    /// Sessions stop taking new messages.
    pub stop_submit: AtomicBool,
    /// Dial-in loops (mixed scenario) stop.
    pub stop_dial: AtomicBool,
    /// ETRN probes stop.
    pub stop_probe: AtomicBool,
    /// Shared histograms.
    pub hists: Mutex<Hists>,
    /// The first few distinct refusal replies, for the report.
    pub samples: Mutex<Vec<String>>,
}

/// Integrity of a run, from the flags.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Integrity {
    /// Acknowledged messages whose delivery was checked (recipient at a dial-up node).
    pub checked: u64,
    /// Of those, arrived intact.
    pub delivered: u64,
    /// Acknowledged, checked, never arrived.
    pub lost: u64,
    /// Extra copies.
    pub duplicates: u64,
    /// Damaged copies (any message).
    pub corrupt: u64,
    /// Delivered to the wrong node.
    pub misrouted: u64,
    /// Arrived without an acknowledgement (e.g. the connection broke after the commit).
    pub unacked_delivered: u64,
    /// Unrecognizable messages at the sinks.
    pub unrecognized: u64,
    /// Messages of earlier runs at the sinks.
    pub foreign: u64,
    /// Ids of some lost messages.
    pub lost_sample: Vec<u64>,
}

impl Integrity {
    /// Loss or corruption: the run fails.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.corrupt > 0 || self.unrecognized > 0 || self.misrouted > 0
    }
}

impl Ledger {
    /// A ledger for `total` messages over `nodes` nodes, `dialup` of them with sinks.
    pub fn new(total: u64, nodes: usize, dialup: usize) -> Ledger {
        let per_node = |v: u64| (0..nodes).map(|_| AtomicU64::new(v)).collect::<Vec<_>>();
        Ledger {
            epoch: Instant::now(),
            nonce: fastrand::u64(1..),
            total,
            nodes,
            dialup,
            next_id: AtomicU64::new(0),
            flags: (0..total).map(|_| AtomicU8::new(0)).collect(),
            acked: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: AtomicU64::new(0),
            acked_per_node: per_node(0),
            matched_per_node: per_node(0),
            last_recv_ns: per_node(0),
            etrn_ns: per_node(u64::MAX),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            unrecognized: AtomicU64::new(0),
            first_ack_ns: AtomicU64::new(u64::MAX),
            last_ack_ns: AtomicU64::new(0),
            stop_submit: AtomicBool::new(false),
            stop_dial: AtomicBool::new(false),
            stop_probe: AtomicBool::new(false),
            hists: Mutex::new(Hists::default()),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The node of message `id`.
    pub fn node_of(&self, id: u64) -> usize {
        (id % self.nodes as u64) as usize
    }

    /// Takes the next message id, or None when all are taken or submission was stopped.
    pub fn take_id(&self) -> Option<u64> {
        if self.stop_submit.load(Relaxed) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        (id < self.total).then_some(id)
    }

    /// Records an acknowledgement.
    pub fn ack(&self, id: u64, bytes: usize) {
        let now = self.now_ns();
        let node = self.node_of(id);
        self.acked_per_node[node].fetch_add(1, Relaxed);
        if self.flags[id as usize].fetch_or(ACKED, Relaxed) & RECEIVED != 0 {
            self.matched_per_node[node].fetch_add(1, Relaxed);
        }
        self.acked_bytes.fetch_add(bytes as u64, Relaxed);
        self.first_ack_ns.fetch_min(now, Relaxed);
        self.last_ack_ns.fetch_max(now, Relaxed);
        self.acked.fetch_add(1, Relaxed);
    }

    /// Records a refusal with the server's reply.
    pub fn reject(&self, reply: &str) {
        self.rejected.fetch_add(1, Relaxed);
        self.sample(reply);
    }

    /// Keeps a distinct reply or error text for the report (at most 10).
    pub fn sample(&self, text: &str) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 10 && !s.iter().any(|x| x == text) {
            s.push(text.to_owned());
        }
    }

    /// Records an intact arrival of `id` at the sink of node `at`. Returns false for a
    /// message of another run.
    pub fn receive(&self, nonce: u64, id: u64, at: usize, bytes: usize) -> bool {
        if nonce != self.nonce || id >= self.total {
            self.foreign.fetch_add(1, Relaxed);
            return false;
        }
        let node = self.node_of(id);
        if node != at {
            self.misrouted.fetch_add(1, Relaxed);
        }
        let prev = self.flags[id as usize].fetch_or(RECEIVED, Relaxed);
        if prev & RECEIVED != 0 {
            self.flags[id as usize].fetch_or(DUPLICATE, Relaxed);
            self.duplicates.fetch_add(1, Relaxed);
        } else {
            if prev & ACKED != 0 {
                self.matched_per_node[node].fetch_add(1, Relaxed);
            }
            self.last_recv_ns[node].fetch_max(self.now_ns(), Relaxed);
            self.received_bytes.fetch_add(bytes as u64, Relaxed);
            self.received.fetch_add(1, Relaxed);
        }
        true
    }

    /// Records a damaged copy of `id` (or of an unknown message).
    pub fn corrupt(&self, nonce: u64, id: u64) {
        self.corrupt.fetch_add(1, Relaxed);
        if nonce == self.nonce && id < self.total {
            self.flags[id as usize].fetch_or(CORRUPT, Relaxed);
        }
    }

    /// Acknowledged messages for dial-up nodes (the ones whose delivery can be checked).
    pub fn expected_deliveries(&self) -> u64 {
        self.acked_per_node[..self.dialup].iter().map(|a| a.load(Relaxed)).sum()
    }

    /// Acknowledged messages that arrived intact at dial-up nodes.
    pub fn delivered_to_dialup(&self) -> u64 {
        self.matched_per_node[..self.dialup]
            .iter()
            .map(|a| a.load(Relaxed))
            .sum()
    }

    /// Whether node `k` has received everything acknowledged for it.
    pub fn node_complete(&self, k: usize) -> bool {
        self.matched_per_node[k].load(Relaxed) >= self.acked_per_node[k].load(Relaxed)
    }

    /// Integrity over the dial-up nodes (`check_delivery`: whether their mail was expected to
    /// arrive in this run).
    pub fn integrity(&self, check_delivery: bool) -> Integrity {
        let mut i = Integrity {
            duplicates: self.duplicates.load(Relaxed),
            corrupt: self.corrupt.load(Relaxed),
            misrouted: self.misrouted.load(Relaxed),
            unrecognized: self.unrecognized.load(Relaxed),
            foreign: self.foreign.load(Relaxed),
            ..Integrity::default()
        };
        for (id, f) in self.flags.iter().enumerate() {
            let f = f.load(Relaxed);
            let dial = self.node_of(id as u64) < self.dialup;
            if f & ACKED != 0 && dial && check_delivery {
                i.checked += 1;
                if f & RECEIVED != 0 {
                    i.delivered += 1;
                } else {
                    i.lost += 1;
                    if i.lost_sample.len() < 20 {
                        i.lost_sample.push(id as u64);
                    }
                }
            }
            if f & ACKED == 0 && f & RECEIVED != 0 {
                i.unacked_delivered += 1;
            }
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_flags_and_integrity() {
        let l = Ledger::new(10, 2, 1);
        let ids: Vec<u64> = std::iter::from_fn(|| l.take_id()).collect();
        assert_eq!(ids.len(), 10);
        for id in 0..6 {
            l.ack(id, 100);
        }
        assert_eq!(l.expected_deliveries(), 3); // ids 0, 2, 4 go to node 0
        assert!(l.receive(l.nonce, 0, 0, 100));
        assert!(l.receive(l.nonce, 2, 0, 100));
        assert!(l.receive(l.nonce, 2, 0, 100)); // duplicate
        assert!(!l.receive(l.nonce ^ 1, 4, 0, 100)); // other run
        assert!(l.receive(l.nonce, 8, 0, 100)); // not acked
        l.corrupt(l.nonce, 4);
        let i = l.integrity(true);
        assert_eq!((i.checked, i.delivered, i.lost), (3, 2, 1));
        assert_eq!((i.duplicates, i.corrupt, i.foreign, i.unacked_delivered), (1, 1, 1, 1));
        assert_eq!(i.lost_sample, vec![4]);
        assert!(i.failed());
        assert!(!l.node_complete(0));
        assert_eq!(l.delivered_to_dialup(), 2);
        l.ack(8, 100); // acknowledged after it arrived
        assert_eq!(l.delivered_to_dialup(), 3);
        l.stop_submit.store(true, Relaxed);
        assert_eq!(l.take_id(), None);
    }
}
