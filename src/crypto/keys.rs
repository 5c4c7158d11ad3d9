//! Document keys: one 32-byte symmetric key per document and [`KeyEpoch`], wrapped to each member
//! device's X25519 key.
//!
//! Wrapping is ephemeral-static X25519: a fresh ephemeral key per wrap, the wrapping key derived
//! with blake3 `derive_key` from the ephemeral public key, the recipient's public key and the
//! shared secret, then XChaCha20-Poly1305 with associated data binding the recipient device, the
//! document and the epoch, so a wrapped key cannot be replayed as another document's or epoch's.
//!
//! A new epoch (on member removal or device revocation) is a fresh key wrapped only to the devices
//! that remain: [`Keyring::rotate`]. Old epochs stay in the keyring so current members (and newly
//! linked devices, via [`Keyring::export_to`]) can read all history.
//!
//! ```
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::keys::{KeyEpoch, Keyring};
//! use roamsync::crypto::rng::SeedRng;
//! use roamsync::ids::DocId;
//!
//! let mut rng = SeedRng::from_seed([1; 32]);
//! let alice = DeviceSecret::generate(&mut rng);
//! let doc = DocId::from_bytes([7; 32]);
//! let mut ring = Keyring::default();
//! let (epoch, wrapped) = ring.rotate(doc, &[alice.public()], &mut rng).unwrap();
//! assert_eq!(epoch, KeyEpoch(0));
//! let mut other = Keyring::default();
//! other.absorb(&wrapped[0], &alice).unwrap();
//! assert!(other.key(&doc, epoch).is_some());
//! ```

use std::collections::BTreeMap;
use std::fmt;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::identity::{AgreementPublicKey, DevicePublic, DeviceSecret, IdentityError};
use crate::crypto::rng::SeedRng;
use crate::ids::{DeviceId, DocId};
use crate::wire::codec::{CodecError, Reader, Writer};

/// KDF context of the key-wrapping key.
const WRAP_KDF_CONTEXT: &str = "roamsync 2026 document key wrap v1";
/// Prefix of the associated data of a wrapped key.
const WRAP_AAD_LABEL: &[u8] = b"roamsync wrapped document key v1";
/// Poly1305 tag length.
const TAG_LEN: usize = 16;
/// Most epochs one document may have in a keyring.
pub const MAX_EPOCHS_PER_DOC: usize = 1 << 16;
/// Format version of a wrapped key.
pub const WRAPPED_KEY_VERSION: u8 = 1;

/// Errors of document keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The wrapped key is addressed to a different device.
    #[error("wrapped key is for device {recipient}, not {device}")]
    WrongRecipient {
        /// The addressee.
        recipient: DeviceId,
        /// The device that tried to unwrap.
        device: DeviceId,
    },
    /// Decryption failed: wrong device key, or the wrapped key was altered.
    #[error("cannot unwrap the key of document {doc}, epoch {epoch}")]
    UnwrapFailed {
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// The recipient's agreement key is a low-order point.
    #[error("device {device} has a degenerate X25519 key")]
    DegenerateAgreementKey {
        /// The device.
        device: DeviceId,
    },
    /// The recipient's public record does not verify.
    #[error("recipient: {0}")]
    Identity(#[from] IdentityError),
    /// A document ran out of epochs.
    #[error("document {doc} has no epoch left")]
    EpochsExhausted {
        /// The document.
        doc: DocId,
    },
    /// A different key is already known for this document and epoch.
    #[error("conflicting keys for document {doc}, epoch {epoch}")]
    ConflictingKey {
        /// The document.
        doc: DocId,
        /// The epoch.
        epoch: KeyEpoch,
    },
    /// Rotation needs at least one recipient.
    #[error("no recipient for the new epoch of document {doc}")]
    NoRecipients {
        /// The document.
        doc: DocId,
    },
    /// A wrapped key did not decode.
    #[error("wrapped key: {0}")]
    Codec(#[from] CodecError),
    /// A wrapped key has an unknown format version.
    #[error("unsupported wrapped key version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
}

/// A numbered key generation of one document, from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyEpoch(pub u32);

impl fmt::Display for KeyEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A document key. Zeroized on drop; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DocKey([u8; 32]);

impl DocKey {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh key from `rng`.
    pub fn generate(rng: &mut SeedRng) -> Self {
        Self(rng.array())
    }

    /// The raw key bytes. Handle with care: copies are not zeroized.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DocKey(<redacted>)")
    }
}

/// A document key encrypted to one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// The device that can unwrap it.
    pub recipient: DeviceId,
    /// The document.
    pub doc: DocId,
    /// The epoch.
    pub epoch: KeyEpoch,
    /// The ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// The XChaCha20-Poly1305 nonce.
    pub nonce: [u8; 24],
    /// The encrypted key and its tag.
    pub ciphertext: [u8; DocKey::LEN + TAG_LEN],
}

impl WrappedKey {
    /// Encoded length in bytes.
    pub const ENCODED_LEN: usize = 1 + 32 + 32 + 4 + 32 + 24 + DocKey::LEN + TAG_LEN;

    fn aad(recipient: &DeviceId, doc: &DocId, epoch: KeyEpoch) -> Vec<u8> {
        let mut w = Writer::with_capacity(WRAP_AAD_LABEL.len() + 68);
        w.put(WRAP_AAD_LABEL)
            .put(recipient.as_bytes())
            .put(doc.as_bytes())
            .u32(epoch.0);
        w.into_bytes()
    }

    fn cipher(
        ephemeral: &[u8; 32],
        recipient: &AgreementPublicKey,
        shared: &x25519_dalek::SharedSecret,
    ) -> XChaCha20Poly1305 {
        let mut ikm = [0u8; 96];
        ikm[..32].copy_from_slice(ephemeral);
        ikm[32..64].copy_from_slice(recipient.as_bytes());
        ikm[64..].copy_from_slice(shared.as_bytes());
        let mut key = blake3::derive_key(WRAP_KDF_CONTEXT, &ikm);
        let cipher = XChaCha20Poly1305::new(&key.into());
        ikm.zeroize();
        key.zeroize();
        cipher
    }

    /// Wraps `key` for `recipient`, after checking its key binding.
    pub fn wrap(
        key: &DocKey,
        doc: DocId,
        epoch: KeyEpoch,
        recipient: &DevicePublic,
        rng: &mut SeedRng,
    ) -> Result<Self, KeysError> {
        recipient.verify()?;
        let secret = StaticSecret::from(rng.array::<32>());
        let ephemeral = XPublicKey::from(&secret).to_bytes();
        let shared = secret.diffie_hellman(&XPublicKey::from(*recipient.agreement.as_bytes()));
        if !shared.was_contributory() {
            return Err(KeysError::DegenerateAgreementKey {
                device: recipient.device,
            });
        }
        let nonce = rng.array::<24>();
        let aad = Self::aad(&recipient.device, &doc, epoch);
        let ct = Self::cipher(&ephemeral, &recipient.agreement, &shared)
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: key.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| KeysError::UnwrapFailed { doc, epoch })?;
        let mut ciphertext = [0u8; DocKey::LEN + TAG_LEN];
        if ct.len() != ciphertext.len() {
            // XChaCha20-Poly1305 always adds exactly one tag; this cannot happen.
            return Err(KeysError::UnwrapFailed { doc, epoch });
        }
        ciphertext.copy_from_slice(&ct);
        Ok(Self {
            recipient: recipient.device,
            doc,
            epoch,
            ephemeral,
            nonce,
            ciphertext,
        })
    }

    /// Recovers the document key with the recipient device's secret.
    pub fn unwrap_with(&self, device: &DeviceSecret) -> Result<DocKey, KeysError> {
        let me = device.device_id();
        if self.recipient != me {
            return Err(KeysError::WrongRecipient {
                recipient: self.recipient,
                device: me,
            });
        }
        let failed = KeysError::UnwrapFailed {
            doc: self.doc,
            epoch: self.epoch,
        };
        let shared = device.diffie_hellman(&AgreementPublicKey::from_bytes(self.ephemeral));
        if !shared.was_contributory() {
            return Err(failed);
        }
        let aad = Self::aad(&self.recipient, &self.doc, self.epoch);
        let mut plain = Self::cipher(&self.ephemeral, &device.agreement_public(), &shared)
            .decrypt(
                &self.nonce.into(),
                Payload {
                    msg: &self.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| failed.clone())?;
        let mut key = [0u8; 32];
        if plain.len() != key.len() {
            plain.zeroize();
            return Err(failed);
        }
        key.copy_from_slice(&plain);
        plain.zeroize();
        Ok(DocKey(key))
    }

    /// The fixed-size encoding: version, recipient, doc, epoch, ephemeral, nonce, ciphertext.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::ENCODED_LEN);
        w.u8(WRAPPED_KEY_VERSION)
            .put(self.recipient.as_bytes())
            .put(self.doc.as_bytes())
            .u32(self.epoch.0)
            .put(&self.ephemeral)
            .put(&self.nonce)
            .put(&self.ciphertext);
        w.into_bytes()
    }

    /// Decodes [`WrappedKey::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeysError> {
        let mut r = Reader::new(bytes);
        let out = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(out)
    }

    /// Reads one wrapped key from `r`.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, KeysError> {
        let version = r.u8()?;
        if version != WRAPPED_KEY_VERSION {
            return Err(KeysError::UnsupportedVersion { version });
        }
        Ok(Self {
            recipient: DeviceId::from_bytes(r.array()?),
            doc: DocId::from_bytes(r.array()?),
            epoch: KeyEpoch(r.u32()?),
            ephemeral: r.array()?,
            nonce: r.array()?,
            ciphertext: r.array()?,
        })
    }
}

/// Where envelope code finds document keys.
pub trait KeySource {
    /// The key of `doc` at `epoch`, if this device has it.
    fn doc_key(&self, doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey>;
}

/// The document keys a device holds, by document and epoch.
#[derive(Clone, Default)]
pub struct Keyring {
    docs: BTreeMap<DocId, BTreeMap<KeyEpoch, DocKey>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are redacted by DocKey's Debug; show only how many epochs each document has.
        f.debug_map()
            .entries(self.docs.iter().map(|(d, e)| (d, e.len())))
            .finish()
    }
}

impl Keyring {
    /// Stores `key` as `doc`'s key at `epoch`. Storing the same key again is a no-op.
    pub fn insert(&mut self, doc: DocId, epoch: KeyEpoch, key: DocKey) -> Result<(), KeysError> {
        let epochs = self.docs.entry(doc).or_default();
        if let Some(existing) = epochs.get(&epoch) {
            return if *existing == key {
                Ok(())
            } else {
                Err(KeysError::ConflictingKey { doc, epoch })
            };
        }
        if epochs.len() >= MAX_EPOCHS_PER_DOC {
            return Err(KeysError::EpochsExhausted { doc });
        }
        epochs.insert(epoch, key);
        Ok(())
    }

    /// Unwraps `wrapped` with `device` and stores the key.
    pub fn absorb(&mut self, wrapped: &WrappedKey, device: &DeviceSecret) -> Result<(), KeysError> {
        let key = wrapped.unwrap_with(device)?;
        self.insert(wrapped.doc, wrapped.epoch, key)
    }

    /// The key of `doc` at `epoch`.
    pub fn key(&self, doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.docs.get(doc)?.get(&epoch)
    }

    /// The newest epoch of `doc` and its key.
    pub fn latest(&self, doc: &DocId) -> Option<(KeyEpoch, &DocKey)> {
        self.docs.get(doc)?.iter().next_back().map(|(e, k)| (*e, k))
    }

    /// Every epoch's key of `doc`, oldest first (what is wrapped to a device that joins it).
    pub fn epochs(&self, doc: &DocId) -> Vec<(KeyEpoch, DocKey)> {
        self.docs
            .get(doc)
            .map(|epochs| epochs.iter().map(|(e, k)| (*e, k.clone())).collect())
            .unwrap_or_default()
    }

    /// Every key, by document then epoch: what a device persists (sealed at rest).
    pub fn iter(&self) -> impl Iterator<Item = (&DocId, KeyEpoch, &DocKey)> {
        self.docs
            .iter()
            .flat_map(|(doc, epochs)| epochs.iter().map(move |(e, k)| (doc, *e, k)))
    }

    /// Documents this keyring has keys for.
    pub fn docs(&self) -> impl Iterator<Item = &DocId> {
        self.docs.keys()
    }

    /// Starts a new epoch of `doc` (epoch 0 for a new document): a fresh key, stored here and
    /// wrapped to each of `recipients`, the devices that remain members. Devices left out (removed
    /// members, revoked devices) cannot read anything sealed under the new epoch.
    pub fn rotate(
        &mut self,
        doc: DocId,
        recipients: &[DevicePublic],
        rng: &mut SeedRng,
    ) -> Result<(KeyEpoch, Vec<WrappedKey>), KeysError> {
        if recipients.is_empty() {
            return Err(KeysError::NoRecipients { doc });
        }
        let epoch = match self.latest(&doc) {
            None => KeyEpoch(0),
            Some((KeyEpoch(e), _)) => {
                KeyEpoch(e.checked_add(1).ok_or(KeysError::EpochsExhausted { doc })?)
            }
        };
        let key = DocKey::generate(rng);
        let wrapped = recipients
            .iter()
            .map(|r| WrappedKey::wrap(&key, doc, epoch, r, rng))
            .collect::<Result<Vec<_>, _>>()?;
        self.insert(doc, epoch, key)?;
        Ok((epoch, wrapped))
    }

    /// Wraps every key of every document to `recipient`: what a newly linked device of the same
    /// account receives so it can read all history.
    pub fn export_to(
        &self,
        recipient: &DevicePublic,
        rng: &mut SeedRng,
    ) -> Result<Vec<WrappedKey>, KeysError> {
        let mut out = Vec::new();
        for (doc, epochs) in &self.docs {
            for (epoch, key) in epochs {
                out.push(WrappedKey::wrap(key, *doc, *epoch, recipient, rng)?);
            }
        }
        Ok(out)
    }
}

impl KeySource for Keyring {
    fn doc_key(&self, doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.key(doc, epoch)
    }
}

#[cfg(test)]
mod tests;
