//! TLS 1.3 for the transport: device certificates and the verifiers that check them.
//!
//! A device is its ed25519 key, so its certificate is only a carrier for that key: self-signed,
//! the subject public key *is* the device key, no chain, no CA. Verifiers therefore ignore
//! issuers, names and validity dates and check exactly three things:
//!
//! 1. the end-entity certificate parses and its SubjectPublicKeyInfo is Ed25519 (RFC 8410: OID
//!    1.3.101.112, no parameters, a 32-byte key) and a usable point (not of small order);
//! 2. for a client checking a server, that key equals the pinned [`DeviceId`] the client meant
//!    to reach (the relay's key from its configuration, or a peer device from the device log);
//! 3. the TLS 1.3 `CertificateVerify` signature, scheme `ed25519` only, verifies under that key.
//!    This proves the peer holds the device's private key for *this* handshake.
//!
//! Servers require a client certificate and accept any ed25519 key: who may do what is decided
//! above TLS from the device id ([`peer_device`]), not by a certificate authority. TLS 1.2,
//! session resumption and 0-RTT are off, so every connection runs a full handshake through
//! these checks. Both sides offer and require the ALPN protocol [`ALPN`].
//!
//! Installing a custom server verifier goes through rustls' `dangerous()` builder; the verifier
//! is nevertheless stricter than the web PKI one, since it accepts exactly one key.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    PeerIncompatible, PeerMisbehaved, ServerConfig, SignatureScheme,
};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::identity::DeviceSecret;
use crate::ids::DeviceId;
use crate::net::NetError;

/// The ALPN protocol both sides offer and require. A new incompatible transport gets a new name.
pub const ALPN: &[u8] = b"roamsync/1";

/// The server name clients send and certificates carry. Peers are identified by key, so the
/// name is the same for every device and never checked.
pub const SERVER_NAME: &str = "roamsync";

/// The subject common name of device certificates (informational only).
const CERT_COMMON_NAME: &str = "roamsync device";

/// DER contents of the Ed25519 algorithm OID, 1.3.101.112 (RFC 8410).
const ED25519_OID: [u8; 3] = [0x2b, 0x65, 0x70];

/// PKCS#8 v2 (RFC 5958) header of an Ed25519 private key, up to the 32-byte seed:
/// `SEQUENCE { INTEGER 1, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } …`.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// PKCS#8 v2 `[1] publicKey` field header, followed by the 32-byte public key.
const PKCS8_PUBLIC_KEY_PREFIX: [u8; 3] = [0x81, 0x21, 0x00];

/// DER tags used when reading a SubjectPublicKeyInfo.
const TAG_SEQUENCE: u8 = 0x30;
const TAG_OID: u8 = 0x06;
const TAG_BIT_STRING: u8 = 0x03;

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerKeyError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("malformed certificate: {reason}")]
    MalformedCertificate {
        /// The parser's complaint.
        reason: String,
    },
    /// The certificate's SubjectPublicKeyInfo is malformed.
    #[error("malformed subject public key info: {reason}")]
    MalformedKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The certificate's key is not an Ed25519 key.
    #[error("certificate key algorithm is not Ed25519 (OID bytes {})", hex(oid))]
    NotEd25519 {
        /// DER contents of the algorithm OID found.
        oid: Vec<u8>,
    },
    /// The key is not a usable ed25519 public key (not a curve point, or of small order).
    #[error("certificate key {found} is not a usable ed25519 public key")]
    UnusableKey {
        /// The key found.
        found: DeviceId,
    },
    /// The certificate carries another device's key than the one pinned.
    #[error("expected device {expected}, peer presented {found}")]
    WrongKey {
        /// The pinned key.
        expected: DeviceId,
        /// The key presented.
        found: DeviceId,
    },
    /// The handshake signature does not verify under the certificate's key (or is not ed25519).
    #[error("handshake signature does not verify under key {key}")]
    BadSignature {
        /// The certificate's key.
        key: DeviceId,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A device's TLS identity: a self-signed certificate carrying its ed25519 key, and that key
/// loaded for signing handshakes.
///
/// The PKCS#8 encoding of the key exists only while the identity is built, in a buffer that is
/// zeroized; afterwards only the loaded signing key remains, shared by every connection.
/// `Debug` shows the device id only.
#[derive(Clone)]
pub struct Identity {
    device: DeviceId,
    certified: Arc<CertifiedKey>,
    /// Key of QUIC stateless resets, derived from the device key: a server that restarts
    /// (even after a crash) can still reset connections of its previous life, so clients
    /// notice at once instead of at their idle timeout.
    reset_key: Arc<ring::hmac::Key>,
}

impl Identity {
    /// The key of QUIC stateless resets (see the field).
    pub(crate) fn reset_key(&self) -> Arc<ring::hmac::Key> {
        Arc::clone(&self.reset_key)
    }

    /// Builds the identity of `secret`'s device.
    pub fn from_device(secret: &DeviceSecret) -> Result<Identity, NetError> {
        let device = secret.device_id();
        let (seed, _agreement) = secret.secret_bytes_for_storage();
        let pkcs8 = ed25519_pkcs8(&seed, &device);
        let key_der = PrivatePkcs8KeyDer::from(pkcs8.as_slice());

        let key_pair =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CERT_COMMON_NAME);
        let cert = params.self_signed(&key_pair)?;
        drop(key_pair);

        let signing_key = rustls::crypto::ring::sign::any_eddsa_type(&key_der)?;
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing_key);
        certified.keys_match()?;
        // The certificate must name the device, or peers would pin a key nobody holds.
        let found = device_from_certificate(cert.der())?;
        if found != device {
            return Err(PeerKeyError::WrongKey {
                expected: device,
                found,
            }
            .into());
        }
        let mut reset_seed = blake3::derive_key("roamsync 2026 quic stateless reset", &*seed);
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_seed);
        reset_seed.zeroize();
        Ok(Identity {
            device,
            certified: Arc::new(certified),
            reset_key: Arc::new(reset_key),
        })
    }

    /// The device this identity proves.
    pub fn device_id(&self) -> DeviceId {
        self.device
    }

    /// The self-signed certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        // `from_device` builds the chain with exactly one certificate.
        &self.certified.cert[0]
    }

    /// An identity from arbitrary parts, for tests of what peers refuse.
    #[cfg(test)]
    pub(crate) fn from_parts(device: DeviceId, certified: CertifiedKey) -> Identity {
        Identity {
            device,
            certified: Arc::new(certified),
            reset_key: Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                device.as_bytes(),
            )),
        }
    }

    fn resolver(&self) -> Arc<SingleCertAndKey> {
        Arc::new(SingleCertAndKey::from(Arc::clone(&self.certified)))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.device)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// PKCS#8 v2 of an Ed25519 key: the seed and, so the parser can check them against each other,
/// the public key.
pub(crate) fn ed25519_pkcs8(seed: &[u8; 32], public: &DeviceId) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(
        PKCS8_ED25519_PREFIX.len() + 32 + PKCS8_PUBLIC_KEY_PREFIX.len() + DeviceId::LEN,
    ));
    out.extend_from_slice(&PKCS8_ED25519_PREFIX);
    out.extend_from_slice(seed);
    out.extend_from_slice(&PKCS8_PUBLIC_KEY_PREFIX);
    out.extend_from_slice(public.as_bytes());
    out
}

/// The device key an end-entity certificate carries, after the checks in the module docs
/// (except the pin and the handshake signature, which need the connection).
pub fn device_from_certificate(cert: &CertificateDer<'_>) -> Result<DeviceId, PeerKeyError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|e| PeerKeyError::MalformedCertificate {
            reason: e.to_string(),
        })?;
    let spki = parsed.subject_public_key_info();
    let key = ed25519_key_from_spki(&spki)?;
    let found = DeviceId::from_bytes(key);
    match ed25519_dalek::VerifyingKey::from_bytes(&key) {
        Ok(k) if !k.is_weak() => Ok(found),
        _ => Err(PeerKeyError::UnusableKey { found }),
    }
}

/// The 32 key bytes of a DER SubjectPublicKeyInfo, if it is an RFC 8410 Ed25519 key.
fn ed25519_key_from_spki(spki: &[u8]) -> Result<[u8; 32], PeerKeyError> {
    let (body, rest) = der_read(spki, TAG_SEQUENCE)?;
    der_end(rest)?;
    let (algorithm, rest) = der_read(body, TAG_SEQUENCE)?;
    let (bits, rest) = der_read(rest, TAG_BIT_STRING)?;
    der_end(rest)?;
    let (oid, parameters) = der_read(algorithm, TAG_OID)?;
    if oid != ED25519_OID {
        return Err(PeerKeyError::NotEd25519 { oid: oid.to_vec() });
    }
    if !parameters.is_empty() {
        return Err(PeerKeyError::MalformedKey {
            reason: "Ed25519 algorithm identifier has parameters",
        });
    }
    match bits.split_first() {
        Some((0, key)) => key.try_into().map_err(|_| PeerKeyError::MalformedKey {
            reason: "Ed25519 key is not 32 bytes",
        }),
        _ => Err(PeerKeyError::MalformedKey {
            reason: "key bit string has unused bits",
        }),
    }
}

/// Reads one DER element with tag `tag`; returns its contents and the bytes after it. Accepts
/// lengths in minimal short or long form up to two length bytes, which covers every key.
fn der_read(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), PeerKeyError> {
    const TRUNCATED: PeerKeyError = PeerKeyError::MalformedKey {
        reason: "truncated DER",
    };
    const BAD_LENGTH: PeerKeyError = PeerKeyError::MalformedKey {
        reason: "unsupported or non-minimal DER length",
    };
    let (&found_tag, rest) = input.split_first().ok_or(TRUNCATED)?;
    if found_tag != tag {
        return Err(PeerKeyError::MalformedKey {
            reason: "unexpected DER tag",
        });
    }
    let (&first, rest) = rest.split_first().ok_or(TRUNCATED)?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => match rest.split_first() {
            Some((&b, rest)) if b >= 0x80 => (usize::from(b), rest),
            Some(_) => return Err(BAD_LENGTH),
            None => return Err(TRUNCATED),
        },
        0x82 => match rest {
            [hi, lo, rest @ ..] if *hi != 0 => (usize::from(*hi) << 8 | usize::from(*lo), rest),
            [_, _, ..] => return Err(BAD_LENGTH),
            _ => return Err(TRUNCATED),
        },
        _ => return Err(BAD_LENGTH),
    };
    if rest.len() < len {
        return Err(TRUNCATED);
    }
    Ok(rest.split_at(len))
}

fn der_end(rest: &[u8]) -> Result<(), PeerKeyError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(PeerKeyError::MalformedKey {
            reason: "trailing bytes after DER element",
        })
    }
}

/// The crypto provider of every transport config: ring.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls error a verifier returns for `e`; the typed error travels inside it.
fn rustls_error(e: PeerKeyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// TLS 1.2 is never negotiated (configs are TLS 1.3 only); refuse its signatures regardless.
fn refuse_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(PeerIncompatible::Tls13RequiredForQuic)
}

/// Checks a TLS 1.3 handshake signature: scheme ed25519 only, verified by ring under the
/// certificate's key.
fn verify_ed25519_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
}

/// A client's verifier of the server: accepts exactly one ed25519 key.
///
/// It remembers why it refused a certificate, so a failed connect can report a typed
/// [`PeerKeyError`] (with the expected and found keys) instead of a TLS alert code.
pub struct PinnedServerVerifier {
    expected: DeviceId,
    algorithms: WebPkiSupportedAlgorithms,
    rejection: Mutex<Option<PeerKeyError>>,
}

impl PinnedServerVerifier {
    /// A verifier that accepts only `expected`'s key.
    pub fn new(expected: DeviceId) -> PinnedServerVerifier {
        PinnedServerVerifier {
            expected,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            rejection: Mutex::new(None),
        }
    }

    /// The pinned key.
    pub fn expected(&self) -> DeviceId {
        self.expected
    }

    /// Why the last certificate was refused, if one was; clears the record.
    pub fn take_rejection(&self) -> Option<PeerKeyError> {
        // A poisoned lock only means a panic elsewhere; the record itself is still coherent.
        self.rejection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn reject(&self, e: PeerKeyError) -> rustls::Error {
        *self
            .rejection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.clone());
        rustls_error(e)
    }

    /// The pinned device, if `cert` carries its key.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<DeviceId, rustls::Error> {
        let found = device_from_certificate(cert).map_err(|e| self.reject(e))?;
        if found != self.expected {
            return Err(self.reject(PeerKeyError::WrongKey {
                expected: self.expected,
                found,
            }));
        }
        Ok(found)
    }
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let key = self.check(cert)?;
        verify_ed25519_tls13(message, cert, dss, &self.algorithms)
            .map_err(|_| self.reject(PeerKeyError::BadSignature { key }))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A server's verifier of clients: a certificate is mandatory and must carry a usable ed25519
/// key, which identifies the client device. Authorisation happens above TLS.
pub struct Ed25519ClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl Ed25519ClientVerifier {
    /// The verifier.
    pub fn new() -> Ed25519ClientVerifier {
        Ed25519ClientVerifier {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl Default for Ed25519ClientVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Ed25519ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519ClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for Ed25519ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        device_from_certificate(end_entity).map_err(rustls_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let key = device_from_certificate(cert).map_err(rustls_error)?;
        verify_ed25519_tls13(message, cert, dss, &self.algorithms)
            .map_err(|_| rustls_error(PeerKeyError::BadSignature { key }))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The rustls client config: TLS 1.3 only, ring, ALPN [`ALPN`], `identity` as the client
/// certificate, `verifier` pinning the server, no resumption and no early data.
pub fn client_config(
    identity: &Identity,
    verifier: Arc<PinnedServerVerifier>,
) -> Result<ClientConfig, NetError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity.resolver());
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Resumption would skip the certificate checks on later connections; a full handshake
    // costs one signature and one verification.
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

/// The rustls server config: TLS 1.3 only, ring, ALPN [`ALPN`] required, a client certificate
/// required ([`Ed25519ClientVerifier`]), no session tickets and no early data.
pub fn server_config(identity: &Identity) -> Result<ServerConfig, NetError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Ed25519ClientVerifier::new()))
        .with_cert_resolver(identity.resolver());
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.max_early_data_size = 0;
    Ok(config)
}

/// The device id of a connection's peer, read from its verified certificate.
pub fn peer_device(conn: &quinn::Connection) -> Result<DeviceId, NetError> {
    let identity = conn.peer_identity().ok_or(PeerKeyError::NoCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerKeyError::NoCertificate)?;
    let end_entity = certs.first().ok_or(PeerKeyError::NoCertificate)?;
    Ok(device_from_certificate(end_entity)?)
}
