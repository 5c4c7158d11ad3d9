//! A deterministic random-byte generator expanded from a caller-supplied seed.
//!
//! The crypto core does no IO, so it never asks the operating system for randomness. The shell
//! draws one 32-byte seed from the OS (or a test picks a fixed one) and hands it in; everything
//! that needs fresh bytes (device keys, ephemeral keys, pairing secrets, nonces) draws them from a
//! [`SeedRng`]. Tests are therefore reproducible from their seed.
//!
//! The generator is blake3 in keyed XOF mode over a block counter. Its output is as unpredictable
//! as its seed: **a production seed must come from a CSPRNG and must never be reused**.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

const RNG_CONTEXT: &str = "roamsync 2026 seed rng v1";

/// Expands a 32-byte seed into an unbounded stream of pseudo-random bytes.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SeedRng {
    key: [u8; 32],
    block: u64,
}

impl SeedRng {
    /// A generator whose output is entirely determined by `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: blake3::derive_key(RNG_CONTEXT, &seed),
            block: 0,
        }
    }

    /// Fills `out` with fresh bytes. No two calls return overlapping output.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&self.block.to_be_bytes());
        h.finalize_xof().fill(out);
        self.block = self.block.wrapping_add(1);
    }

    /// `N` fresh bytes.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.fill(&mut out);
        out
    }
}

impl fmt::Debug for SeedRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeedRng(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_non_repeating() {
        let mut a = SeedRng::from_seed([7; 32]);
        let mut b = SeedRng::from_seed([7; 32]);
        let (a1, a2) = (a.array::<32>(), a.array::<32>());
        assert_eq!(a1, b.array::<32>());
        assert_ne!(a1, a2);
        assert_ne!(a1, SeedRng::from_seed([8; 32]).array::<32>());
        assert_eq!(format!("{a:?}"), "SeedRng(<redacted>)");
    }
}
