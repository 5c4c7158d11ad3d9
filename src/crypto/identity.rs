//! Device identity: an ed25519 signing key, whose public half is the [`DeviceId`], and an X25519
//! key-agreement key whose public half is signed by it.
//!
//! ```
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::rng::SeedRng;
//!
//! let mut rng = SeedRng::from_seed([1; 32]);
//! let device = DeviceSecret::generate(&mut rng);
//! let public = device.public();
//! public.verify().expect("a fresh binding verifies");
//! assert_eq!(public.device, device.device_id());
//! ```

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::crypto::rng::SeedRng;
use crate::ids::DeviceId;
use crate::wire::codec::{CodecError, Reader, Writer};

/// Signature domain for the binding of a device's X25519 key to its ed25519 key.
const AGREEMENT_BINDING_DOMAIN: &str = "roamsync 2026 agreement key binding";

/// Errors of identity checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The device id is not a usable ed25519 public key.
    #[error("device {device} is not a valid ed25519 public key")]
    InvalidDeviceKey {
        /// The offending id.
        device: DeviceId,
    },
    /// A signature does not verify under the device's key.
    #[error("bad signature by device {device} in domain `{domain}`")]
    BadSignature {
        /// The claimed signer.
        device: DeviceId,
        /// What was being signed.
        domain: &'static str,
    },
    /// A device's public record did not decode.
    #[error("device record: {0}")]
    Codec(#[from] CodecError),
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);

impl Signature {
    /// Length in bytes.
    pub const LEN: usize = 64;

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 64]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signature({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// The public half of a device's X25519 key-agreement key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgreementPublicKey([u8; 32]);

impl AgreementPublicKey {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for AgreementPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AgreementPublicKey({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Builds the bytes a signature in `domain` covers: the domain, length-prefixed, then `msg`.
fn signed_bytes(domain: &str, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + domain.len() + msg.len());
    // Domains are short compile-time constants.
    out.push(u8::try_from(domain.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(domain.as_bytes());
    out.extend_from_slice(msg);
    out
}

/// Checks that `signature` by `device` covers `msg` in `domain`.
///
/// Uses strict verification (no malleable signatures, no small-order keys), so a valid message has
/// exactly one valid signature encoding per key and hashes over signed bytes are stable.
pub fn verify(
    device: &DeviceId,
    domain: &'static str,
    msg: &[u8],
    signature: &Signature,
) -> Result<(), IdentityError> {
    let key = VerifyingKey::from_bytes(device.as_bytes())
        .map_err(|_| IdentityError::InvalidDeviceKey { device: *device })?;
    if key.is_weak() {
        return Err(IdentityError::InvalidDeviceKey { device: *device });
    }
    let sig = ed25519_dalek::Signature::from_bytes(signature.as_bytes());
    key.verify_strict(&signed_bytes(domain, msg), &sig)
        .map_err(|_| IdentityError::BadSignature {
            device: *device,
            domain,
        })
}

/// A device's secret keys. Zeroized on drop (both inner keys zeroize themselves); `Debug` shows
/// only the device id.
pub struct DeviceSecret {
    signing: SigningKey,
    agreement: StaticSecret,
}

impl DeviceSecret {
    /// Fresh keys drawn from `rng`.
    pub fn generate(rng: &mut SeedRng) -> Self {
        let mut signing = rng.array::<32>();
        let mut agreement = rng.array::<32>();
        let out = Self::from_secret_bytes(&signing, &agreement);
        zeroize::Zeroize::zeroize(&mut signing);
        zeroize::Zeroize::zeroize(&mut agreement);
        out
    }

    /// Restores keys from their secret bytes (as persisted in the device's keystore).
    pub fn from_secret_bytes(signing: &[u8; 32], agreement: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(signing),
            agreement: StaticSecret::from(*agreement),
        }
    }

    /// The secret bytes (signing key, agreement key), for the device's keystore; restore them with
    /// [`DeviceSecret::from_secret_bytes`]. The copies are zeroized when dropped.
    pub fn secret_bytes_for_storage(&self) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        (
            Zeroizing::new(self.signing.to_bytes()),
            Zeroizing::new(self.agreement.to_bytes()),
        )
    }

    /// The device id: the ed25519 public key.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_bytes(self.signing.verifying_key().to_bytes())
    }

    /// The public half of the key-agreement key.
    pub fn agreement_public(&self) -> AgreementPublicKey {
        AgreementPublicKey(XPublicKey::from(&self.agreement).to_bytes())
    }

    /// The device's public record: id, agreement key and the binding signature.
    pub fn public(&self) -> DevicePublic {
        let agreement = self.agreement_public();
        let binding = self.sign(AGREEMENT_BINDING_DOMAIN, agreement.as_bytes());
        DevicePublic {
            device: self.device_id(),
            agreement,
            binding,
        }
    }

    /// Signs `msg` in `domain`; see [`verify`].
    pub fn sign(&self, domain: &str, msg: &[u8]) -> Signature {
        Signature(self.signing.sign(&signed_bytes(domain, msg)).to_bytes())
    }

    /// X25519 with a peer's public key. The caller must reject non-contributory results.
    pub(crate) fn diffie_hellman(&self, peer: &AgreementPublicKey) -> x25519_dalek::SharedSecret {
        self.agreement.diffie_hellman(&XPublicKey::from(peer.0))
    }
}

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSecret")
            .field("device", &self.device_id())
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// A device's public keys: what other devices need to verify it and to wrap keys to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DevicePublic {
    /// The ed25519 public key.
    pub device: DeviceId,
    /// The X25519 public key.
    pub agreement: AgreementPublicKey,
    /// The device's signature over `agreement`.
    pub binding: Signature,
}

impl DevicePublic {
    /// Encoded length in bytes.
    pub const ENCODED_LEN: usize = DeviceId::LEN + AgreementPublicKey::LEN + Signature::LEN;

    /// Checks that the agreement key is signed by the device key.
    pub fn verify(&self) -> Result<(), IdentityError> {
        verify(
            &self.device,
            AGREEMENT_BINDING_DOMAIN,
            self.agreement.as_bytes(),
            &self.binding,
        )
    }

    /// Appends the fixed-size encoding: device id, agreement key, binding signature.
    pub fn encode_into(&self, w: &mut Writer) {
        w.put(self.device.as_bytes())
            .put(self.agreement.as_bytes())
            .put(self.binding.as_bytes());
    }

    /// Reads the encoding written by [`DevicePublic::encode_into`]. Does not verify the binding.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            device: DeviceId::from_bytes(r.array()?),
            agreement: AgreementPublicKey(r.array()?),
            binding: Signature(r.array()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(seed: u8) -> DeviceSecret {
        DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
    }

    #[test]
    fn binding_verifies_and_rejects_swaps() {
        let (a, b) = (device(1), device(2));
        a.public().verify().unwrap();
        let mut swapped = a.public();
        swapped.agreement = b.agreement_public();
        assert_eq!(
            swapped.verify(),
            Err(IdentityError::BadSignature {
                device: a.device_id(),
                domain: AGREEMENT_BINDING_DOMAIN
            })
        );
    }

    #[test]
    fn signatures_are_domain_separated() {
        let a = device(1);
        let sig = a.sign("one", b"msg");
        assert_eq!(verify(&a.device_id(), "one", b"msg", &sig), Ok(()));
        assert!(matches!(
            verify(&a.device_id(), "two", b"msg", &sig),
            Err(IdentityError::BadSignature { .. })
        ));
        assert!(matches!(
            verify(&a.device_id(), "one", b"msh", &sig),
            Err(IdentityError::BadSignature { .. })
        ));
    }

    #[test]
    fn invalid_and_weak_keys_are_rejected() {
        let sig = device(1).sign("d", b"m");
        // The identity point is a small-order point: a valid encoding but a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = DeviceId::from_bytes(identity);
        assert_eq!(
            verify(&weak, "d", b"m", &sig),
            Err(IdentityError::InvalidDeviceKey { device: weak })
        );
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        let bad = DeviceId::from_bytes(off_curve);
        assert_eq!(
            verify(&bad, "d", b"m", &sig),
            Err(IdentityError::InvalidDeviceKey { device: bad })
        );
    }

    #[test]
    fn debug_is_redacted() {
        let mut rng = SeedRng::from_seed([3; 32]);
        let signing = rng.array::<32>();
        let agreement = rng.array::<32>();
        let d = DeviceSecret::from_secret_bytes(&signing, &agreement);
        let shown = format!("{d:?}");
        assert!(shown.contains("<redacted>"));
        let hex: String = signing.iter().take(4).map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex));
    }

    #[test]
    fn secrets_survive_storage() {
        let a = device(5);
        let (signing, agreement) = a.secret_bytes_for_storage();
        let restored = DeviceSecret::from_secret_bytes(&signing, &agreement);
        assert_eq!(restored.public(), a.public());
    }

    #[test]
    fn public_round_trip() {
        let p = device(4).public();
        let mut w = Writer::default();
        p.encode_into(&mut w);
        let bytes = w.into_bytes();
        assert_eq!(bytes.len(), DevicePublic::ENCODED_LEN);
        let mut r = Reader::new(&bytes);
        assert_eq!(DevicePublic::decode_from(&mut r), Ok(p));
        assert_eq!(r.finish(), Ok(()));
        let mut r = Reader::new(&bytes[..10]);
        assert!(matches!(
            DevicePublic::decode_from(&mut r),
            Err(CodecError::Truncated { .. })
        ));
    }
}
