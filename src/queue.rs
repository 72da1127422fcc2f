//! Node queues: the in-memory index of which spooled messages each node is still owed.
//!
//! A shard owns the `NodeQueue`s of the nodes that hash to it (see [`crate::runtime`]). An entry
//! is small (location, id, recipient indices): the message itself stays on disk. This module
//! knows nothing of SMTP text and does no I/O.

use std::collections::{HashMap, VecDeque};

use crate::spool::Location;

/// Index of a node in `Config::nodes`; the same on every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeIdx(pub u32);

/// One message's part for one node: the recipients of that node in that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// Where the record is.
    pub loc: Location,
    /// Message id (queue id in logs).
    pub msg_id: u64,
    /// Arrival, unix seconds.
    pub arrival: u64,
    /// Record length (for the byte count of the queue listing).
    pub size: u32,
    /// Indices of this node's recipients in the record's envelope.
    pub rcpts: Vec<u16>,
    /// Shard whose `SegmentTable` counts this part.
    pub table_shard: u16,
}

/// The queue of one node.
#[derive(Debug, Default)]
pub struct NodeQueue {
    entries: VecDeque<QueueEntry>,
    bytes: u64,
}

impl NodeQueue {
    /// Appends an entry.
    pub fn push(&mut self, e: QueueEntry) {
        self.bytes += u64::from(e.size);
        self.entries.push_back(e);
    }

    /// Puts an entry back at the head (a worker that took it but could not try it).
    pub fn push_front(&mut self, e: QueueEntry) {
        self.bytes += u64::from(e.size);
        self.entries.push_front(e);
    }

    /// Takes the oldest entry.
    pub fn pop(&mut self) -> Option<QueueEntry> {
        let e = self.entries.pop_front()?;
        self.bytes -= u64::from(e.size);
        Some(e)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes waiting (record sizes).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Arrival time of the oldest entry.
    pub fn oldest(&self) -> Option<u64> {
        self.entries.iter().map(|e| e.arrival).min()
    }
}

/// All node queues one shard owns.
#[derive(Debug, Default)]
pub struct ShardQueues {
    queues: HashMap<NodeIdx, NodeQueue>,
}

impl ShardQueues {
    /// The queue of a node (created empty on first use).
    pub fn get_mut(&mut self, node: NodeIdx) -> &mut NodeQueue {
        self.queues.entry(node).or_default()
    }

    /// The queue of a node, if it has ever had mail.
    pub fn get(&self, node: NodeIdx) -> Option<&NodeQueue> {
        self.queues.get(&node)
    }

    /// Total entries over all nodes.
    pub fn total(&self) -> usize {
        self.queues.values().map(NodeQueue::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SegmentId;

    fn entry(id: u64, arrival: u64) -> QueueEntry {
        QueueEntry {
            loc: Location {
                segment: SegmentId(1),
                offset: id * 64,
                len: 64,
            },
            msg_id: id,
            arrival,
            size: 64,
            rcpts: vec![0],
            table_shard: 0,
        }
    }

    #[test]
    fn fifo_and_accounting() {
        let mut q = ShardQueues::default();
        q.get_mut(NodeIdx(1)).push(entry(1, 50));
        q.get_mut(NodeIdx(1)).push(entry(2, 40));
        q.get_mut(NodeIdx(2)).push(entry(3, 60));
        assert_eq!(q.total(), 3);
        let n1 = q.get_mut(NodeIdx(1));
        assert_eq!((n1.len(), n1.bytes(), n1.oldest()), (2, 128, Some(40)));
        assert_eq!(n1.pop().unwrap().msg_id, 1);
        assert_eq!(n1.bytes(), 64);
        assert!(q.get(NodeIdx(9)).is_none());
        let n1 = q.get_mut(NodeIdx(1));
        n1.push_front(entry(1, 50));
        assert_eq!((n1.len(), n1.bytes()), (2, 128));
        assert_eq!(n1.pop().unwrap().msg_id, 1, "put back at the head");
    }
}
