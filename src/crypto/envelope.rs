//! Sealed envelopes: the only thing the relay stores. A batch of Automerge changes (or a
//! snapshot) of one document, encrypted under the document's key for one epoch, committed to that
//! key and signed by its author device.
//!
//! The header (format version, kind, document, epoch, author, the author's change sequence range)
//! is the AEAD associated data, so it cannot be moved to another ciphertext. The signature covers
//! header, key commitment, nonce and ciphertext. The byte layout is in `docs/PROTOCOL.md`.
//!
//! **Nonces** are derived, not drawn: the first 24 bytes of blake3, keyed with a key derived from
//! the document key, over header and plaintext. Sealing is then deterministic and needs no RNG
//! (the core is sans-IO), resealing the same batch yields the same envelope and so the same
//! [`EnvelopeId`] (the relay deduplicates it), and a nonce repeats only when header and plaintext
//! both repeat, in which case the ciphertext is the identical envelope and reveals nothing new.
//!
//! **Key commitment**: blake3 keyed by the document key over a fixed label and the header. AEADs
//! like XChaCha20-Poly1305 are not key-committing; without this, a malicious member could craft
//! one ciphertext that opens to different plaintexts under two keys.
//!
//! ```
//! use roamsync::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::keys::{DocKey, KeyEpoch, Keyring};
//! use roamsync::crypto::rng::SeedRng;
//! use roamsync::ids::DocId;
//!
//! let mut rng = SeedRng::from_seed([1; 32]);
//! let author = DeviceSecret::generate(&mut rng);
//! let doc = DocId::from_bytes([2; 32]);
//! let mut ring = Keyring::default();
//! let (epoch, _) = ring.rotate(doc, &[author.public()], &mut rng).unwrap();
//! let header = EnvelopeHeader {
//!     kind: EnvelopeKind::Changes,
//!     doc,
//!     epoch,
//!     author: author.device_id(),
//!     first_seq: 1,
//!     last_seq: 3,
//! };
//! let sealed = SealedEnvelope::seal(&author, ring.key(&doc, epoch).unwrap(), header, b"changes")
//!     .unwrap();
//! let bytes = sealed.encode();
//! let opened = SealedEnvelope::decode(&bytes)
//!     .unwrap()
//!     .open(&doc, &ring, |_: &_, _: &_, _| true)
//!     .unwrap();
//! assert_eq!(opened.plaintext, b"changes");
//! ```

use std::fmt;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use zeroize::Zeroize;

use crate::crypto::identity::{DeviceSecret, IdentityError, Signature, verify};
use crate::crypto::keys::{DocKey, KeyEpoch, KeySource};
use crate::ids::{DeviceId, DocId};
use crate::wire::codec::{CodecError, Reader, Writer};

/// Current envelope format version.
pub const ENVELOPE_VERSION: u8 = 1;
/// Largest encoded envelope.
pub const MAX_ENVELOPE_BYTES: usize = 4 * 1024 * 1024;
/// Encoded header length: version, kind, doc, epoch, author, first and last seq.
pub const HEADER_LEN: usize = 1 + 1 + 32 + 4 + 32 + 8 + 8;
/// Key commitment length.
pub const COMMITMENT_LEN: usize = 32;
/// Nonce length.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Bytes of an envelope that are not ciphertext.
pub const OVERHEAD_BYTES: usize = HEADER_LEN + COMMITMENT_LEN + NONCE_LEN + 4 + Signature::LEN;
/// Largest plaintext that fits in an envelope.
pub const MAX_PLAINTEXT_BYTES: usize = MAX_ENVELOPE_BYTES - OVERHEAD_BYTES - TAG_LEN;

/// Signature domain of envelopes.
const SIGNATURE_DOMAIN: &str = "roamsync 2026 envelope";
/// Label of the key commitment.
const COMMITMENT_LABEL: &[u8] = b"roamsync 2026 envelope key commitment";
/// KDF context of the nonce-derivation key.
const NONCE_KDF_CONTEXT: &str = "roamsync 2026 envelope nonce v1";

/// Errors of sealing and opening envelopes, in the order opening checks them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {len} bytes, at most {max} allowed")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The plaintext to seal is larger than [`MAX_PLAINTEXT_BYTES`].
    #[error("plaintext is {len} bytes, at most {max} allowed")]
    PlaintextTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not an envelope.
    #[error("envelope: {0}")]
    Codec(#[from] CodecError),
    /// Unknown format version.
    #[error("unsupported envelope version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// Unknown kind byte.
    #[error("unknown envelope kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// `first_seq > last_seq`.
    #[error("empty sequence range {first}..={last}")]
    BadSeqRange {
        /// First sequence number.
        first: u64,
        /// Last sequence number.
        last: u64,
    },
    /// The ciphertext is shorter than a tag.
    #[error("ciphertext of {len} bytes is shorter than a tag")]
    CiphertextTooShort {
        /// Its length.
        len: usize,
    },
    /// The envelope is for a different document than the one being read.
    #[error("envelope is for document {found}, expected {expected}")]
    WrongDoc {
        /// The document the caller is reading.
        expected: DocId,
        /// The document in the header.
        found: DocId,
    },
    /// The author's signature does not verify.
    #[error("signature: {0}")]
    BadSignature(#[source] IdentityError),
    /// The author is not a current device of a member account for this epoch.
    #[error("device {author} may not write document {doc} at epoch {epoch}")]
    NotAuthorised {
        /// The author.
        author: DeviceId,
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// This device has no key for the document at that epoch.
    #[error("no key for document {doc} at epoch {epoch}")]
    MissingKey {
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// The key commitment does not match this device's key.
    #[error("key commitment mismatch for document {doc} at epoch {epoch}")]
    KeyCommitmentMismatch {
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// AEAD decryption failed.
    #[error("decryption failed for document {doc} at epoch {epoch}")]
    DecryptFailed {
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// Sealing with a header whose author is not the signing device.
    #[error("header names author {header}, but the signer is {signer}")]
    AuthorMismatch {
        /// The header's author.
        header: DeviceId,
        /// The signing device.
        signer: DeviceId,
    },
}

/// What an envelope carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EnvelopeKind {
    /// A batch of Automerge changes.
    Changes,
    /// A snapshot of a whole document.
    Snapshot,
    /// An ephemeral signal (typing, presence): forwarded, never stored.
    Ephemeral,
}

impl EnvelopeKind {
    fn to_byte(self) -> u8 {
        match self {
            EnvelopeKind::Changes => 0,
            EnvelopeKind::Snapshot => 1,
            EnvelopeKind::Ephemeral => 2,
        }
    }

    fn from_byte(kind: u8) -> Result<Self, EnvelopeError> {
        match kind {
            0 => Ok(EnvelopeKind::Changes),
            1 => Ok(EnvelopeKind::Snapshot),
            2 => Ok(EnvelopeKind::Ephemeral),
            kind => Err(EnvelopeError::UnknownKind { kind }),
        }
    }
}

/// The authenticated, unencrypted part of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnvelopeHeader {
    /// Changes or snapshot.
    pub kind: EnvelopeKind,
    /// The document.
    pub doc: DocId,
    /// The key epoch the ciphertext is under.
    pub epoch: KeyEpoch,
    /// The device that wrote the changes and signed the envelope.
    pub author: DeviceId,
    /// The author's first change sequence number in this envelope.
    pub first_seq: u64,
    /// The author's last change sequence number in this envelope (inclusive).
    pub last_seq: u64,
}

impl EnvelopeHeader {
    fn encode_into(&self, w: &mut Writer) {
        w.u8(ENVELOPE_VERSION)
            .u8(self.kind.to_byte())
            .put(self.doc.as_bytes())
            .u32(self.epoch.0)
            .put(self.author.as_bytes())
            .u64(self.first_seq)
            .u64(self.last_seq);
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut w = Writer::with_capacity(HEADER_LEN);
        self.encode_into(&mut w);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(w.as_slice());
        out
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, EnvelopeError> {
        let version = r.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion { version });
        }
        let kind = EnvelopeKind::from_byte(r.u8()?)?;
        let header = Self {
            kind,
            doc: DocId::from_bytes(r.array()?),
            epoch: KeyEpoch(r.u32()?),
            author: DeviceId::from_bytes(r.array()?),
            first_seq: r.u64()?,
            last_seq: r.u64()?,
        };
        header.check_range()?;
        Ok(header)
    }

    fn check_range(&self) -> Result<(), EnvelopeError> {
        if self.first_seq > self.last_seq {
            return Err(EnvelopeError::BadSeqRange {
                first: self.first_seq,
                last: self.last_seq,
            });
        }
        Ok(())
    }
}

/// The id of an envelope: the blake3 hash of its encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnvelopeId(pub [u8; 32]);

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EnvelopeId({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Decides whether `author` may write `doc` at `epoch`: a current device of a member account.
///
/// Implemented for closures, so the data model stays decoupled from envelope code.
pub trait Authoriser {
    /// Whether the author is authorised.
    fn is_authorised(&self, author: &DeviceId, doc: &DocId, epoch: KeyEpoch) -> bool;
}

impl<F: Fn(&DeviceId, &DocId, KeyEpoch) -> bool> Authoriser for F {
    fn is_authorised(&self, author: &DeviceId, doc: &DocId, epoch: KeyEpoch) -> bool {
        self(author, doc, epoch)
    }
}

/// A decoded envelope whose signature and contents have not been checked yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedEnvelope {
    /// The header.
    pub header: EnvelopeHeader,
    /// The key commitment.
    pub commitment: [u8; COMMITMENT_LEN],
    /// The AEAD nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The ciphertext, tag included.
    pub ciphertext: Vec<u8>,
    /// The author's signature.
    pub signature: Signature,
}

/// An envelope that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedEnvelope {
    /// The envelope's id.
    pub id: EnvelopeId,
    /// Its header.
    pub header: EnvelopeHeader,
    /// The decrypted changes or snapshot.
    pub plaintext: Vec<u8>,
}

fn commitment(key: &DocKey, header: &[u8; HEADER_LEN]) -> [u8; COMMITMENT_LEN] {
    let mut h = blake3::Hasher::new_keyed(key.as_bytes());
    h.update(COMMITMENT_LABEL).update(header);
    *h.finalize().as_bytes()
}

fn cipher(key: &DocKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.as_bytes().into())
}

impl SealedEnvelope {
    /// Encrypts, commits and signs `plaintext` under `key`.
    pub fn seal(
        author: &DeviceSecret,
        key: &DocKey,
        header: EnvelopeHeader,
        plaintext: &[u8],
    ) -> Result<Self, EnvelopeError> {
        if header.author != author.device_id() {
            return Err(EnvelopeError::AuthorMismatch {
                header: header.author,
                signer: author.device_id(),
            });
        }
        header.check_range()?;
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(EnvelopeError::PlaintextTooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_BYTES,
            });
        }
        let aad = header.encode();
        let mut nonce_key = blake3::derive_key(NONCE_KDF_CONTEXT, key.as_bytes());
        let mut h = blake3::Hasher::new_keyed(&nonce_key);
        nonce_key.zeroize();
        h.update(&aad).update(plaintext);
        let mut nonce = [0u8; NONCE_LEN];
        h.finalize_xof().fill(&mut nonce);
        let ciphertext = cipher(key)
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::PlaintextTooLarge {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_BYTES,
            })?;
        let mut env = Self {
            header,
            commitment: commitment(key, &aad),
            nonce,
            ciphertext,
            signature: Signature::from_bytes([0; 64]),
        };
        env.signature = author.sign(SIGNATURE_DOMAIN, &env.signed_part());
        Ok(env)
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(OVERHEAD_BYTES + self.ciphertext.len());
        self.header.encode_into(&mut w);
        w.put(&self.commitment)
            .put(&self.nonce)
            .bytes_u32(&self.ciphertext);
        w.into_bytes()
    }

    /// The encoding: header, commitment, nonce, ciphertext length and bytes, signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.signed_part();
        bytes.extend_from_slice(self.signature.as_bytes());
        bytes
    }

    /// The envelope's id.
    pub fn id(&self) -> EnvelopeId {
        EnvelopeId(*blake3::hash(&self.encode()).as_bytes())
    }

    /// Decodes an envelope, enforcing the size limit first. Checks structure only.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let header = EnvelopeHeader::decode_from(&mut r)?;
        let commitment = r.array()?;
        let nonce = r.array()?;
        let ciphertext = r
            .bytes_u32("ciphertext", MAX_PLAINTEXT_BYTES + TAG_LEN)?
            .to_vec();
        if ciphertext.len() < TAG_LEN {
            return Err(EnvelopeError::CiphertextTooShort {
                len: ciphertext.len(),
            });
        }
        let signature = Signature::from_bytes(r.array()?);
        r.finish()?;
        Ok(Self {
            header,
            commitment,
            nonce,
            ciphertext,
            signature,
        })
    }

    /// Checks the signature under the header's author key, and nothing else: what a relay
    /// checks before it stores an envelope (it decides authorisation itself).
    pub fn verify_signature(&self) -> Result<(), IdentityError> {
        verify(
            &self.header.author,
            SIGNATURE_DOMAIN,
            &self.signed_part(),
            &self.signature,
        )
    }

    /// Checks the author's signature and authorisation without any key.
    pub fn verify_author(&self, authoriser: impl Authoriser) -> Result<(), EnvelopeError> {
        let h = &self.header;
        self.verify_signature()
            .map_err(EnvelopeError::BadSignature)?;
        if !authoriser.is_authorised(&h.author, &h.doc, h.epoch) {
            return Err(EnvelopeError::NotAuthorised {
                author: h.author,
                doc: h.doc,
                epoch: h.epoch,
            });
        }
        Ok(())
    }

    /// Checks and decrypts the envelope as part of document `expected_doc`: the document, the
    /// signature, the author's authorisation, the key commitment, then decryption.
    pub fn open(
        &self,
        expected_doc: &DocId,
        keys: &impl KeySource,
        authoriser: impl Authoriser,
    ) -> Result<OpenedEnvelope, EnvelopeError> {
        let h = &self.header;
        if h.doc != *expected_doc {
            return Err(EnvelopeError::WrongDoc {
                expected: *expected_doc,
                found: h.doc,
            });
        }
        self.verify_author(authoriser)?;
        let key = keys
            .doc_key(&h.doc, h.epoch)
            .ok_or(EnvelopeError::MissingKey {
                doc: h.doc,
                epoch: h.epoch,
            })?;
        let aad = h.encode();
        if commitment(key, &aad) != self.commitment {
            return Err(EnvelopeError::KeyCommitmentMismatch {
                doc: h.doc,
                epoch: h.epoch,
            });
        }
        let plaintext = cipher(key)
            .decrypt(
                &self.nonce.into(),
                Payload {
                    msg: &self.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::DecryptFailed {
                doc: h.doc,
                epoch: h.epoch,
            })?;
        Ok(OpenedEnvelope {
            id: self.id(),
            header: *h,
            plaintext,
        })
    }
}

/// Decodes and opens `bytes` in one step; see [`SealedEnvelope::open`].
pub fn open(
    bytes: &[u8],
    expected_doc: &DocId,
    keys: &impl KeySource,
    authoriser: impl Authoriser,
) -> Result<OpenedEnvelope, EnvelopeError> {
    SealedEnvelope::decode(bytes)?.open(expected_doc, keys, authoriser)
}

#[cfg(test)]
mod tests;
