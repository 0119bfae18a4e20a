//! Seed derivation, the running hash of the event trace, and campaigns of
//! seeds on several threads.

/// The splitmix64 finaliser: a fast bijective mix of 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of a sub-generator, derived from the run's seed and a purpose tag
/// (e.g. a node slot and generation), so each stream is independent of how
/// much the others consumed.
pub(crate) fn derive_seed(seed: u64, tag: u64, index: u64) -> u64 {
    mix64(seed ^ mix64(tag ^ mix64(index)))
}

/// Order-sensitive 64-bit hash of everything the simulator processed: two
/// runs with equal hashes processed the same events at the same virtual
/// times with the same payloads. Not cryptographic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceHash(u64);

impl TraceHash {
    /// The hash so far.
    pub fn value(self) -> u64 {
        self.0
    }

    pub(crate) fn word(&mut self, word: u64) {
        self.0 = mix64(self.0.rotate_left(5) ^ word);
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.word(u64::from_le_bytes(word));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(last));
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if
/// readable.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs `run(i)` for `i` in `0..runs` on `jobs` threads (at least one);
/// results come back in order of `i`. A panic in `run` is raised again here
/// once the other workers stopped (wrap `run` in `catch_unwind` to turn it
/// into a result instead).
pub fn run_seeds<R: Send>(runs: u64, jobs: usize, run: impl Fn(u64) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicU64::new(0);
    let mut results: Vec<(u64, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= runs {
                            break;
                        }
                        mine.push((i, run(i)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_per_index_and_tag() {
        let a = derive_seed(1, 0, 0);
        assert_ne!(a, derive_seed(1, 0, 1));
        assert_ne!(a, derive_seed(1, 1, 0));
        assert_ne!(a, derive_seed(2, 0, 0));
        assert_eq!(a, derive_seed(1, 0, 0));
    }

    #[test]
    fn trace_hash_is_order_and_content_sensitive() {
        let mut a = TraceHash::default();
        a.bytes(b"hello world");
        a.word(3);
        let mut b = TraceHash::default();
        b.word(3);
        b.bytes(b"hello world");
        assert_ne!(a, b);
        let mut c = TraceHash::default();
        c.bytes(b"hello worle");
        c.word(3);
        assert_ne!(a, c);
        let mut d = TraceHash::default();
        d.bytes(b"hello world");
        d.word(3);
        assert_eq!(a, d);
    }

    #[test]
    fn peak_rss_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
