//! Datums, interned datum types, and the deterministic hasher of the hot maps.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use shoal_placement::hash::mix64;

use crate::error::RegistryError;

/// An interned datum type name (the seed's `Type()` string), valid for the
/// [`Handoff`](crate::Handoff) that interned it.
///
/// Per-datum state stores this 4-byte index, never the name: a million datums
/// of one type cost one string.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatumType(u32);

impl DatumType {
    /// The index of the type in its registry (dense, from 0, in interning order).
    #[must_use]
    pub const fn index(self) -> u32 {
        self.0
    }
}

/// A datum: a piece of application state identified by its type and an
/// integer id. Placement looks only at `id`; `(ty, id)` identifies the datum.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Datum {
    /// The interned type name.
    pub ty: DatumType,
    /// The datum's id, the input of placement.
    pub id: i64,
}

impl Datum {
    /// A datum of an interned type.
    #[must_use]
    pub const fn new(ty: DatumType, id: i64) -> Datum {
        Datum { ty, id }
    }
}

impl fmt::Display for Datum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}:{}", self.ty.0, self.id)
    }
}

/// Interning of datum type names: bounded count and length.
#[derive(Debug, Default)]
pub(crate) struct TypeRegistry {
    names: Vec<Box<str>>,
    index: HashMap<Box<str>, u32, DetState>,
}

impl TypeRegistry {
    /// Longest accepted type name, in bytes (also the wire limit).
    pub(crate) const MAX_NAME_LEN: usize = 255;
    /// Most distinct types one node interns.
    pub(crate) const MAX_TYPES: usize = 1 << 16;

    pub(crate) fn intern(&mut self, name: &str) -> Result<DatumType, RegistryError> {
        if let Some(&i) = self.index.get(name) {
            return Ok(DatumType(i));
        }
        if name.is_empty() || name.len() > Self::MAX_NAME_LEN {
            return Err(RegistryError::BadTypeName { len: name.len() });
        }
        if self.names.len() >= Self::MAX_TYPES {
            return Err(RegistryError::TooManyTypes {
                max: Self::MAX_TYPES,
            });
        }
        let i = u32::try_from(self.names.len()).map_err(|_| RegistryError::TooManyTypes {
            max: Self::MAX_TYPES,
        })?;
        self.names.push(name.into());
        self.index.insert(name.into(), i);
        Ok(DatumType(i))
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<DatumType> {
        self.index.get(name).map(|&i| DatumType(i))
    }

    pub(crate) fn name(&self, ty: DatumType) -> Option<&str> {
        self.names.get(ty.0 as usize).map(|s| &**s)
    }
}

/// A fast, deterministic hasher for the per-datum maps.
///
/// Deterministic on purpose: the same inputs give the same iteration order,
/// so a simulation run is reproducible from its seed (std's `RandomState`
/// would draw from global randomness). Keys come from the application or,
/// for the bounded parking map, from authenticated peers.
///
/// Public so that a driver can key its own per-datum map with it: the
/// relinquish jobs of a view come out in the order of the state machine's
/// own table of datums, and a map of the same size hashed the same way is
/// then walked in that order too, instead of at random.
#[derive(Default, Clone, Copy, Debug)]
pub struct DetHasher(u64);

impl Hasher for DetHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            if let Some(dst) = buf.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(23) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// `BuildHasher` of [`DetHasher`].
pub type DetState = BuildHasherDefault<DetHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_bounded() {
        let mut t = TypeRegistry::default();
        let a = t.intern("series").unwrap();
        let b = t.intern("rollup").unwrap();
        assert_eq!(t.intern("series").unwrap(), a);
        assert_ne!(a, b);
        assert_eq!(t.name(b), Some("rollup"));
        assert_eq!(t.lookup("rollup"), Some(b));
        assert_eq!(t.lookup("nope"), None);
        assert!(matches!(
            t.intern(""),
            Err(RegistryError::BadTypeName { len: 0 })
        ));
        let long = "x".repeat(256);
        assert!(t.intern(&long).is_err());
        assert_eq!(t.name(DatumType(99)), None);
    }

    #[test]
    fn hasher_is_deterministic_and_spreads_sequential_ids() {
        use std::hash::BuildHasher;
        let s = DetState::default();
        let h = |d: Datum| s.hash_one(d);
        let ty = DatumType(0);
        assert_eq!(h(Datum::new(ty, 5)), h(Datum::new(ty, 5)));
        let mut low_bits = std::collections::HashSet::new();
        for id in 0..1024 {
            low_bits.insert(h(Datum::new(ty, id)) & 1023);
        }
        assert!(low_bits.len() > 600, "poor spread: {}", low_bits.len());
    }
}
