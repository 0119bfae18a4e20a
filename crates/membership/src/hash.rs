//! A small seeded hasher for member names.
//!
//! The standard library's `RandomState` draws its keys from the operating
//! system, which a sans-IO core must not do; this hasher takes its seed from
//! the node's seeded RNG instead, so runs are reproducible. Names come from
//! authenticated members only (mutual TLS), so a fast multiplicative hash is
//! enough.

use std::hash::{BuildHasher, Hasher};

use crate::Member;

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// Builds [`NameHasher`]s sharing one seed. The default seed is 0 (for maps
/// keyed by slot numbers, which only this node chooses).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SeededState {
    seed: u64,
}

impl SeededState {
    pub(crate) fn new(seed: u64) -> Self {
        SeededState { seed }
    }

    /// Hash of one string, as the map computes it.
    pub(crate) fn hash_str(&self, name: &str) -> u64 {
        self.hash_one(name)
    }
}

impl BuildHasher for SeededState {
    type Hasher = NameHasher;

    fn build_hasher(&self) -> NameHasher {
        NameHasher { state: self.seed }
    }
}

/// Folded-multiply hasher over 8-byte words with a final avalanche.
#[derive(Debug, Clone)]
pub(crate) struct NameHasher {
    state: u64,
}

impl NameHasher {
    /// Folded multiply: the 128-bit product's halves xored, so every input
    /// bit reaches every output bit.
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(MULTIPLIER);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut word = [0u8; 8];
            word[..tail.len()].copy_from_slice(tail);
            self.mix(u64::from_le_bytes(word));
        }
        // The length keeps "ab" and "ab\0" apart.
        self.mix(bytes.len() as u64);
    }

    fn write_u8(&mut self, byte: u8) {
        self.mix(u64::from(byte) | 0x100);
    }

    fn finish(&self) -> u64 {
        // murmur3's 64-bit finaliser.
        let mut x = self.state;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

/// Seed of [`witness_rank`]: fixed, so every node ranks members alike.
const WITNESS_SEED: u64 = 0x5ee4_3a1d_0c0f_fee5;

/// A member's place in the witness order (`src/lease.rs`): the same on every
/// node and every platform (little-endian words), spread uniformly, so the
/// witnesses are neither the oldest nor the first started members.
pub(crate) fn witness_rank(name: &str, generation: u64) -> u64 {
    let mut h = SeededState::new(WITNESS_SEED).build_hasher();
    h.write(name.as_bytes());
    h.write(&generation.to_le_bytes());
    h.finish()
}

/// Name → slot index over the member table, storing only the slot (4 bytes
/// and one control byte a member; names live once, in the table).
#[derive(Debug, Clone)]
pub(crate) struct NameIndex {
    table: hashbrown::HashTable<u32>,
    hasher: SeededState,
}

/// Name of the member in `slot`, if the slot is occupied.
fn name_at(members: &[Option<Member>], slot: u32) -> Option<&str> {
    members
        .get(slot as usize)
        .and_then(Option::as_ref)
        .map(|m| &*m.name)
}

impl NameIndex {
    pub(crate) fn new(hasher: SeededState) -> Self {
        NameIndex {
            table: hashbrown::HashTable::new(),
            hasher,
        }
    }

    /// Slot of the member called `name`.
    pub(crate) fn get(&self, name: &str, members: &[Option<Member>]) -> Option<u32> {
        let hash = self.hasher.hash_str(name);
        self.table
            .find(hash, |&slot| name_at(members, slot) == Some(name))
            .copied()
    }

    /// Indexes the member already stored in `slot`.
    pub(crate) fn insert(&mut self, slot: u32, members: &[Option<Member>]) {
        let Some(name) = name_at(members, slot) else {
            return;
        };
        let hasher = self.hasher;
        self.table
            .insert_unique(hasher.hash_str(name), slot, |&other| {
                name_at(members, other).map_or(0, |n| hasher.hash_str(n))
            });
    }

    /// Forgets `slot`, indexed under `name`.
    pub(crate) fn remove(&mut self, name: &str, slot: u32) {
        let hash = self.hasher.hash_str(name);
        if let Ok(entry) = self.table.find_entry(hash, |&other| other == slot) {
            entry.remove();
        }
    }

    /// Makes room for `additional` more members without rehashing.
    pub(crate) fn reserve(&mut self, additional: usize, members: &[Option<Member>]) {
        let hasher = self.hasher;
        self.table.reserve(additional, |&other| {
            name_at(members, other).map_or(0, |n| hasher.hash_str(n))
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

/// A map keyed by member slot, with a deterministic hasher (the standard
/// `RandomState` reads the operating system's randomness).
pub(crate) type SlotMap<V> = std::collections::HashMap<u32, V, SeededState>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn distinct_names_hash_apart_and_seed_matters() {
        let a = SeededState::new(1);
        let b = SeededState::new(2);
        assert_eq!(a.hash_str("node-1"), a.hash_str("node-1"));
        assert_ne!(a.hash_str("node-1"), b.hash_str("node-1"));
        let hashes: HashSet<u64> = (0..10_000)
            .map(|i| a.hash_str(&format!("node-{i}")))
            .collect();
        assert_eq!(hashes.len(), 10_000);
        assert_ne!(a.hash_str("ab"), a.hash_str("ab\0"));
    }
}
