//! Encryption at rest: every content blob the device store writes is sealed with
//! XChaCha20-Poly1305 under a key derived from the storage key the embedding app supplies, and
//! every lookup key that could reveal content is a keyed blake3 hash.
//!
//! The nonce is synthetic (SIV-style): a keyed hash of the associated data and the plaintext. The
//! store needs no randomness, sealing is deterministic (which makes crash tests reproducible), and
//! the only thing an observer of the file learns from it is whether two blobs at the same place
//! hold the same bytes.
//!
//! The associated data names where a blob belongs (table and row), so a blob copied to another row
//! fails to open instead of being read as something else.
//!
//! Sealed layout: `u8 version (1) | [24] nonce | ciphertext | [16] tag`.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The sealed-blob format this code writes.
pub const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// The key the embedding app supplies (typically from the OS keystore). Never printed, zeroized
/// on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct StorageKey([u8; 32]);

impl StorageKey {
    /// Wraps 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> StorageKey {
        StorageKey(bytes)
    }
}

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(<redacted>)")
    }
}

/// Why a sealed blob did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Shorter than the fixed overhead.
    #[error("sealed blob is {len} bytes, shorter than the {min}-byte overhead")]
    Truncated {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A format version this code does not read.
    #[error("sealed blob version {0} is not supported")]
    UnsupportedVersion(u8),
    /// Authentication failed: wrong storage key, a corrupted blob, or a blob moved to another row.
    #[error("sealed blob failed authentication (wrong storage key, corruption, or moved)")]
    Unauthentic,
}

/// Keys derived from the storage key: one for sealing, one for synthetic nonces, one for lookups.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Sealer {
    content: [u8; 32],
    nonce: [u8; 32],
    lookup: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    /// Derives the sealing keys.
    pub fn new(key: &StorageKey) -> Sealer {
        Sealer {
            content: blake3::derive_key("roamsync 2026 at-rest content key", &key.0),
            nonce: blake3::derive_key("roamsync 2026 at-rest nonce key", &key.0),
            lookup: blake3::derive_key("roamsync 2026 at-rest lookup key", &key.0),
        }
    }

    /// Seals `plaintext`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.nonce);
        h.update(&(aad.len() as u64).to_be_bytes());
        h.update(aad);
        h.update(plaintext);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&h.finalize().as_bytes()[..NONCE_LEN]);

        let cipher = XChaCha20Poly1305::new(&self.content.into());
        let mut buf = plaintext.to_vec();
        // Encryption with a valid key and a buffer in memory cannot fail: the only error is a
        // plaintext longer than the cipher's 256 GiB limit.
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into())
            .expect("plaintext within XChaCha20-Poly1305 limits");
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + buf.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a blob sealed with [`Sealer::seal`] under the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Truncated {
                len: sealed.len(),
                min: SEAL_OVERHEAD,
            });
        }
        if sealed[0] != SEAL_VERSION {
            return Err(SealError::UnsupportedVersion(sealed[0]));
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| SealError::Unauthentic)?;
        let body = &sealed[1 + NONCE_LEN..sealed.len() - TAG_LEN];
        let tag: [u8; TAG_LEN] = sealed[sealed.len() - TAG_LEN..]
            .try_into()
            .map_err(|_| SealError::Unauthentic)?;
        let cipher = XChaCha20Poly1305::new(&self.content.into());
        let mut buf = body.to_vec();
        cipher
            .decrypt_inout_detached(&nonce.into(), aad, buf.as_mut_slice().into(), &tag.into())
            .map_err(|_| SealError::Unauthentic)?;
        Ok(buf)
    }

    /// A lookup key for `value` in the namespace `domain`: reveals nothing of `value` without the
    /// storage key.
    pub fn lookup(&self, domain: &str, value: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.lookup);
        h.update(&(domain.len() as u64).to_be_bytes());
        h.update(domain.as_bytes());
        h.update(value);
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(b: u8) -> Sealer {
        Sealer::new(&StorageKey::from_bytes([b; 32]))
    }

    #[test]
    fn round_trip_and_overhead() {
        let s = sealer(1);
        let sealed = s.seal(b"row 1", b"hello");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(s.open(b"row 1", &sealed).unwrap(), b"hello");
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn wrong_key_moved_corrupt_truncated() {
        let s = sealer(1);
        let sealed = s.seal(b"row 1", b"hello");
        assert_eq!(
            sealer(2).open(b"row 1", &sealed),
            Err(SealError::Unauthentic)
        );
        assert_eq!(s.open(b"row 2", &sealed), Err(SealError::Unauthentic));
        for i in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                s.open(b"row 1", &bad),
                Err(SealError::Unauthentic),
                "byte {i}"
            );
        }
        let mut v = sealed.clone();
        v[0] = 9;
        assert_eq!(s.open(b"row 1", &v), Err(SealError::UnsupportedVersion(9)));
        assert_eq!(
            s.open(b"row 1", &sealed[..10]),
            Err(SealError::Truncated {
                len: 10,
                min: SEAL_OVERHEAD
            })
        );
    }

    #[test]
    fn lookups_are_keyed_and_domain_separated() {
        let (a, b) = (sealer(1), sealer(2));
        assert_ne!(a.lookup("doc", b"x"), b.lookup("doc", b"x"));
        assert_ne!(a.lookup("doc", b"x"), a.lookup("conv", b"x"));
        assert_eq!(a.lookup("doc", b"x"), a.lookup("doc", b"x"));
    }

    #[test]
    fn debug_is_redacted() {
        let k = StorageKey::from_bytes([0x42; 32]);
        assert_eq!(format!("{k:?}"), "StorageKey(<redacted>)");
        assert_eq!(format!("{:?}", Sealer::new(&k)), "Sealer(<redacted>)");
    }
}
