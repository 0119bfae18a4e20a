//! The piggyback queue: updates waiting to ride on outgoing packets.
//!
//! At most one update per member is queued (a newer one replaces the older:
//! it carries everything the older said). Updates are taken least-transmitted
//! first, newest first among equals, and retired after the retransmit limit.
//! Every operation is O(log n) in the queue length; filling a packet looks at
//! a bounded number of entries.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::hash::SlotMap;

/// Queue key: (times transmitted, newest first).
type Key = (u32, Reverse<u64>);

#[derive(Debug)]
struct Entry {
    slot: u32,
    bytes: Box<[u8]>,
}

/// Entries examined at most when filling one packet.
const MAX_EXAMINED: usize = 256;
/// Smallest message worth trying to fit.
const MIN_MESSAGE: usize = 4;

#[derive(Debug, Default)]
pub(crate) struct Broadcasts {
    order: BTreeMap<Key, Entry>,
    by_slot: SlotMap<Key>,
    next_id: u64,
    chosen: Vec<Key>,
}

impl Broadcasts {
    /// Queues an encoded update about the member in `slot`, replacing any
    /// update about it still queued.
    pub(crate) fn push(&mut self, slot: u32, bytes: Vec<u8>) {
        self.remove(slot);
        let key = (0, Reverse(self.next_id));
        self.next_id += 1;
        self.order.insert(
            key,
            Entry {
                slot,
                bytes: bytes.into_boxed_slice(),
            },
        );
        self.by_slot.insert(slot, key);
    }

    /// Drops the update about `slot`, if any.
    pub(crate) fn remove(&mut self, slot: u32) {
        if let Some(key) = self.by_slot.remove(&slot) {
            self.order.remove(&key);
        }
    }

    /// Whether an update about `slot` is queued.
    pub(crate) fn contains(&self, slot: u32) -> bool {
        self.by_slot.contains_key(&slot)
    }

    /// Updates queued.
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Appends to `buf` as many queued updates as fit within `max_len` bytes
    /// in total, counts one transmission for each, and retires those that
    /// reached `limit`. Returns how many were appended.
    pub(crate) fn fill(&mut self, buf: &mut Vec<u8>, max_len: usize, limit: u32) -> usize {
        self.chosen.clear();
        let mut room = max_len.saturating_sub(buf.len());
        for (examined, (key, entry)) in self.order.iter().enumerate() {
            if room < MIN_MESSAGE || examined >= MAX_EXAMINED {
                break;
            }
            if entry.bytes.len() <= room {
                buf.extend_from_slice(&entry.bytes);
                room -= entry.bytes.len();
                self.chosen.push(*key);
            }
        }
        for key in &self.chosen {
            let Some(entry) = self.order.remove(key) else {
                continue;
            };
            let transmits = key.0.saturating_add(1);
            if transmits >= limit {
                self.by_slot.remove(&entry.slot);
            } else {
                let new_key = (transmits, key.1);
                self.by_slot.insert(entry.slot, new_key);
                self.order.insert(new_key, entry);
            }
        }
        self.chosen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_least_transmitted_first_and_retired_at_limit() {
        let mut q = Broadcasts::default();
        q.push(1, vec![1; 10]);
        q.push(2, vec![2; 10]);
        let mut buf = Vec::new();
        // Room for one: the newest (slot 2) goes first.
        assert_eq!(q.fill(&mut buf, 10, 3), 1);
        assert_eq!(buf, vec![2; 10]);
        // Now slot 1 has fewer transmissions.
        buf.clear();
        assert_eq!(q.fill(&mut buf, 10, 3), 1);
        assert_eq!(buf, vec![1; 10]);
        // Both fit; each reaches 2 transmissions.
        buf.clear();
        assert_eq!(q.fill(&mut buf, 100, 3), 2);
        assert_eq!(q.len(), 2);
        // Third transmission retires both.
        buf.clear();
        assert_eq!(q.fill(&mut buf, 100, 3), 2);
        assert!(q.is_empty());
        assert!(!q.contains(1) && !q.contains(2));
    }

    #[test]
    fn newer_update_replaces_older_for_same_member() {
        let mut q = Broadcasts::default();
        q.push(7, vec![1; 5]);
        q.push(7, vec![2; 5]);
        assert_eq!(q.len(), 1);
        let mut buf = Vec::new();
        q.fill(&mut buf, 100, 10);
        assert_eq!(buf, vec![2; 5]);
        q.remove(7);
        assert!(q.is_empty());
    }

    #[test]
    fn skips_updates_that_do_not_fit() {
        let mut q = Broadcasts::default();
        q.push(1, vec![1; 8]);
        q.push(2, vec![2; 50]);
        let mut buf = vec![0; 10];
        assert_eq!(q.fill(&mut buf, 30, 5), 1);
        assert_eq!(buf.len(), 18);
    }

    #[test]
    fn packet_bound_holds_with_many_updates() {
        let mut q = Broadcasts::default();
        for slot in 0..10_000 {
            q.push(slot, vec![0; 37]);
        }
        let mut buf = vec![0; 40];
        let n = q.fill(&mut buf, 1150, 20);
        assert!(buf.len() <= 1150);
        assert_eq!(n, (1150 - 40) / 37);
        assert_eq!(q.len(), 10_000);
    }
}
