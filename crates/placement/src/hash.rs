//! Fixed, documented hash functions.
//!
//! Everything placement hashes must come out identical on every node, every
//! platform and every Rust version, so nothing here uses std's `RandomState`
//! or `DefaultHasher` (whose algorithm is unspecified and whose keys are
//! random). The functions are:
//!
//! - [`mix64`]: the SplitMix64 finaliser (Steele, Lea and Flood, 2014), a
//!   bijection of `u64` with full avalanche;
//! - [`fnv1a64`]: 64-bit FNV-1a over bytes (offset basis `0xcbf29ce484222325`,
//!   prime `0x100000001b3`);
//! - [`datum_hash`]: `mix64(id as u64 + 0x9e3779b97f4a7c15)`, the stable mix of
//!   a datum id (sequential ids come out spread over the whole `u64` range);
//! - [`reduce`]: a hash onto `0..buckets` by multiply-shift;
//! - [`name_key`], [`partition_hash`], [`mix32`] and [`rendezvous_score`],
//!   which define the minimal-movement strategy's weights.
//!
//! The outputs are pinned by unit tests with literal values: changing any of
//! these functions changes where datums live, so it is a breaking change of
//! the placement (every node of a cluster must run the same one).

/// The SplitMix64 golden-ratio increment.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 finaliser: a bijection of `u64` whose every output bit
/// depends on every input bit.
#[inline]
#[must_use]
pub const fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a (64 bits) over `bytes`, continuing from `state` (start with
/// [`FNV_OFFSET`]).
#[inline]
#[must_use]
pub fn fnv1a64(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable mix of a datum id, used to pick its partition.
#[inline]
#[must_use]
pub const fn datum_hash(id: i64) -> u64 {
    // `as u64` reinterprets the two's complement bits: total, never panics.
    mix64((id as u64).wrapping_add(GOLDEN_GAMMA))
}

/// Maps a 64-bit hash uniformly onto `0..buckets` by its high bits
/// (multiply-shift, Lemire 2016). `buckets` must be non-zero for a
/// meaningful result; the output is always `< buckets` when it is.
#[inline]
#[must_use]
pub const fn reduce(hash: u64, buckets: u32) -> u32 {
    ((hash as u128 * buckets as u128) >> 64) as u32
}

/// A node name's rendezvous key: the high half of `mix64(fnv1a64(name))`. It
/// depends on the name only, not the generation, so a restarted node gets
/// the same partitions back.
#[inline]
#[must_use]
pub fn name_key(name: &str) -> u32 {
    (mix64(fnv1a64(FNV_OFFSET, name.as_bytes())) >> 32) as u32
}

/// A partition's hash, the first half of its rendezvous weights: the high
/// half of `mix64(partition ^ 0x5f2ea1c3d8b49e07)`.
#[inline]
#[must_use]
pub const fn partition_hash(partition: u32) -> u32 {
    (mix64((partition as u64) ^ 0x5f2e_a1c3_d8b4_9e07) >> 32) as u32
}

/// The 32-bit "lowbias32" mixer (Wellons, hash-prospector): a bijection of
/// `u32` with low avalanche bias, cheap enough to evaluate for every
/// (partition, node) pair.
#[inline]
#[must_use]
pub const fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The inverse of [`mix32`]: `unmix32(mix32(x)) == x`.
#[inline]
#[must_use]
pub const fn unmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x4302_1123); // inverse of 0x846ca68b mod 2^32
    x ^= (x >> 15) ^ (x >> 30);
    x = x.wrapping_mul(0x1d69_e2a5); // inverse of 0x7feb352d mod 2^32
    x ^ (x >> 16)
}

/// Rendezvous weight of a node (by its [`name_key`]) for a partition (by its
/// [`partition_hash`]): higher wins. [`mix32`] of the sum, the way
/// SplitMix mixes its counter, gives weights that behave as independent
/// uniform draws (the balance and movement tests check it).
#[inline]
#[must_use]
pub const fn rendezvous_score(partition_hash: u32, name_key: u32) -> u32 {
    mix32(partition_hash.wrapping_add(name_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_is_pinned() {
        // Reference values of the SplitMix64 finaliser.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(GOLDEN_GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(
            mix64(2u64.wrapping_mul(GOLDEN_GAMMA)),
            0x6e78_9e6a_a1b9_65f4
        );
    }

    #[test]
    fn fnv1a64_is_pinned() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn datum_hash_handles_extremes() {
        assert_eq!(datum_hash(0), mix64(GOLDEN_GAMMA));
        // Distinct ids never collide (mix64 is a bijection).
        assert_ne!(datum_hash(i64::MIN), datum_hash(i64::MAX));
        assert_ne!(datum_hash(-1), datum_hash(1));
    }

    #[test]
    fn rendezvous_inputs_are_pinned() {
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x6889_90c0);
        assert_eq!(name_key("node-1"), 0x1395_0d4e);
        assert_eq!(partition_hash(0), 0x3cda_ae75);
        assert_eq!(rendezvous_score(1, 2), 0x53f1_e9dd);
    }

    #[test]
    fn unmix32_inverts_mix32() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            assert_eq!(unmix32(mix32(x)), x);
            assert_eq!(mix32(unmix32(x)), x);
            x = x.wrapping_mul(0x9e37_79b9).wrapping_add(1);
        }
        for x in [0, 1, u32::MAX, 1 << 31] {
            assert_eq!(unmix32(mix32(x)), x);
        }
    }

    #[test]
    fn reduce_stays_in_range() {
        for buckets in [1u32, 2, 3, 7, 1000, u32::MAX] {
            for hash in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
                assert!(reduce(hash, buckets) < buckets);
            }
        }
        assert_eq!(reduce(u64::MAX, 4), 3);
        assert_eq!(reduce(0, 4), 0);
    }
}
