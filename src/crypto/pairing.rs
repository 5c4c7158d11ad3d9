//! Linking a new device to an account: protocol messages and two sans-IO state machines.
//!
//! A current device (the *inviter*) opens a [`PairingInvite`] and shows its code as text or QR.
//! The new device (the *joiner*) reads the code and sends a [`PairRequest`] with its public keys;
//! the inviter appends the joiner to the device log and answers with a [`PairResponse`]: the whole
//! log and every document key it holds, wrapped to the joiner's X25519 key.
//!
//! **Authentication.** The code is a 128-bit random secret. Both messages carry a MAC (blake3
//! keyed hash) under a key derived from it: the request MAC covers the joiner's keys, name and
//! platform; the response MAC covers the request and everything in the response. Because the
//! secret has far more than 80 bits of entropy, an attacker can neither guess it online nor brute
//! force it offline from an observed MAC, so no PAKE is needed. (A short numeric code would need
//! one.) Invites are single-use, expire at a time the caller sets, and lock after
//! [`MAX_PAIRING_ATTEMPTS`] bad MACs.
//!
//! The messages travel over whatever channel the shell has (the relay, or a direct connection);
//! they need no confidentiality of their own: the keys inside are already wrapped.
//!
//! ```
//! use roamsync::crypto::device_log::DeviceLog;
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::keys::Keyring;
//! use roamsync::crypto::pairing::{PairingInvite, PairingJoin};
//! use roamsync::crypto::rng::SeedRng;
//!
//! let mut rng = SeedRng::from_seed([1; 32]);
//! let phone = DeviceSecret::generate(&mut rng);
//! let mut log = DeviceLog::create(&phone, "phone", "android").unwrap();
//! let keyring = Keyring::default();
//! let mut invite = PairingInvite::new(&mut rng, 1_000, 60_000).unwrap();
//!
//! let laptop = DeviceSecret::generate(&mut rng);
//! let (mut join, request) =
//!     PairingJoin::start(&invite.code(), &laptop, "laptop", "linux", 1_500, 60_000).unwrap();
//! let response = invite
//!     .handle_request(&request, 2_000, &phone, &mut log, &keyring, &mut rng)
//!     .unwrap();
//! let joined = join.handle_response(&response, 2_500, &laptop).unwrap();
//! assert_eq!(joined.log.account(), log.account());
//! assert!(joined.log.is_current(&laptop.device_id()));
//! ```

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::device_log::{
    DeviceLog, DeviceLogEntry, DeviceLogError, MAX_DEVICE_NAME_BYTES, MAX_ENTRY_BYTES,
    MAX_LOG_ENTRIES, MAX_PLATFORM_BYTES,
};
use crate::crypto::identity::{DevicePublic, DeviceSecret, IdentityError};
use crate::crypto::keys::{Keyring, KeysError, WrappedKey};
use crate::crypto::rng::SeedRng;
use crate::ids::DeviceId;
use crate::wire::codec::{CodecError, Reader, Writer};

/// Length of the pairing secret: 128 bits.
pub const PAIRING_SECRET_LEN: usize = 16;
/// Longest time an invite may stay open.
pub const MAX_PAIRING_TTL_MS: u64 = 10 * 60 * 1000;
/// Bad MACs an invite tolerates before it locks.
pub const MAX_PAIRING_ATTEMPTS: u32 = 3;
/// Most wrapped keys a pairing response may carry.
pub const MAX_PAIRING_KEYS: usize = 16 * 1024;
/// Largest encoded pairing request.
pub const MAX_REQUEST_BYTES: usize =
    DevicePublic::ENCODED_LEN + 1 + MAX_DEVICE_NAME_BYTES + 1 + MAX_PLATFORM_BYTES + MAC_LEN;
/// Largest encoded pairing response.
pub const MAX_RESPONSE_BYTES: usize = DeviceId::LEN
    + 4
    + MAX_LOG_ENTRIES * (4 + MAX_ENTRY_BYTES)
    + 4
    + MAX_PAIRING_KEYS * WrappedKey::ENCODED_LEN
    + MAC_LEN;

const MAC_LEN: usize = 32;
const MAC_KDF_CONTEXT: &str = "roamsync 2026 pairing mac v1";
const REQUEST_LABEL: &[u8] = b"roamsync pairing request";
const RENDEZVOUS_KDF_CONTEXT: &str = "roamsync 2026 pairing rendezvous v1";
const RESPONSE_LABEL: &[u8] = b"roamsync pairing response";
/// Hex digits per group in the displayed code.
const CODE_GROUP: usize = 4;

/// Errors of pairing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// The code is not 32 hex digits (dashes and spaces aside).
    #[error("pairing code has {digits} hex digits, expected {expected}")]
    MalformedCode {
        /// Hex digits found, or the position of the first non-hex character.
        digits: usize,
        /// Digits expected.
        expected: usize,
    },
    /// The requested lifetime is longer than allowed.
    #[error("pairing lifetime of {ttl_ms} ms, at most {max_ms} ms allowed")]
    TtlTooLong {
        /// The requested lifetime.
        ttl_ms: u64,
        /// The limit.
        max_ms: u64,
    },
    /// The invite (or the joiner's wait) has expired.
    #[error("pairing expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired {
        /// The current time.
        now_ms: u64,
        /// When it expired.
        expires_at_ms: u64,
    },
    /// The MAC does not match: the peer does not hold the same code.
    #[error("pairing code mismatch")]
    BadCode,
    /// Too many bad codes; the invite is locked.
    #[error("pairing locked after {attempts} bad codes")]
    TooManyAttempts {
        /// Bad attempts seen.
        attempts: u32,
    },
    /// The invite or join has already completed.
    #[error("pairing already completed")]
    AlreadyUsed,
    /// The inviting device is not a current device of the account.
    #[error("inviting device {device} is not current in the account's log")]
    InviterNotCurrent {
        /// The inviter.
        device: DeviceId,
    },
    /// The response's log does not include the joiner as a current device.
    #[error("the response does not add device {device} to the account")]
    NotAdded {
        /// The joiner.
        device: DeviceId,
    },
    /// A response carries more keys than allowed.
    #[error("pairing response carries {len} keys, at most {max} allowed")]
    TooManyKeys {
        /// Keys found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A message is larger than allowed.
    #[error("pairing message of {len} bytes, at most {max} allowed")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The joiner's key binding does not verify.
    #[error("joiner: {0}")]
    Identity(#[from] IdentityError),
    /// The device log rejected the change, or the response's log does not verify.
    #[error("device log: {0}")]
    DeviceLog(#[from] DeviceLogError),
    /// Wrapping or unwrapping keys failed.
    #[error("keys: {0}")]
    Keys(#[from] KeysError),
    /// A message did not decode.
    #[error("pairing message: {0}")]
    Codec(#[from] CodecError),
}

/// The shared pairing secret. Zeroized on drop; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PairingSecret([u8; PAIRING_SECRET_LEN]);

impl PairingSecret {
    /// Fresh secret from `rng`.
    pub fn generate(rng: &mut SeedRng) -> Self {
        Self(rng.array())
    }

    /// The code to show: 32 lowercase hex digits in dash-separated groups of four.
    pub fn to_code(&self) -> String {
        let hex: Vec<String> = self.0.iter().map(|b| format!("{b:02x}")).collect();
        hex.concat()
            .as_bytes()
            .chunks(CODE_GROUP)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    /// Parses a code as shown or typed: hex digits in either case, dashes and spaces ignored.
    pub fn parse_code(code: &str) -> Result<Self, PairingError> {
        let expected = 2 * PAIRING_SECRET_LEN;
        let mut out = [0u8; PAIRING_SECRET_LEN];
        let mut digits = 0usize;
        for c in code.chars().filter(|c| *c != '-' && !c.is_whitespace()) {
            let v = c
                .to_digit(16)
                .ok_or(PairingError::MalformedCode { digits, expected })?;
            if digits >= expected {
                return Err(PairingError::MalformedCode {
                    digits: digits + 1,
                    expected,
                });
            }
            // `to_digit(16)` is below 16, so the cast is lossless.
            out[digits / 2] |= (v as u8) << if digits % 2 == 0 { 4 } else { 0 };
            digits += 1;
        }
        if digits != expected {
            return Err(PairingError::MalformedCode { digits, expected });
        }
        Ok(Self(out))
    }

    /// Where inviter and joiner meet on a relay: derived from the secret with a separate key
    /// derivation, so it reveals nothing about the MAC key.
    pub fn rendezvous(&self) -> [u8; 32] {
        blake3::derive_key(RENDEZVOUS_KDF_CONTEXT, &self.0)
    }

    fn mac_key(&self) -> MacKey {
        MacKey(blake3::derive_key(MAC_KDF_CONTEXT, &self.0))
    }
}

impl fmt::Debug for PairingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingSecret(<redacted>)")
    }
}

#[derive(Zeroize, ZeroizeOnDrop)]
struct MacKey([u8; 32]);

impl MacKey {
    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }
}

/// Constant-time comparison of MACs.
fn mac_eq(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    // blake3::Hash compares in constant time.
    blake3::Hash::from_bytes(*a) == blake3::Hash::from_bytes(*b)
}

/// The joiner's first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairRequest {
    /// The joiner's public keys.
    pub device: DevicePublic,
    /// The name it will have in the log.
    pub name: String,
    /// Its platform label.
    pub platform: String,
    /// MAC over the above under the pairing secret.
    pub mac: [u8; MAC_LEN],
}

impl PairRequest {
    fn body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.device.encode_into(&mut w);
        w.str_u8(&self.name).str_u8(&self.platform);
        w.into_bytes()
    }

    /// Encodes the request: device keys, name, platform, MAC.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.body();
        bytes.extend_from_slice(&self.mac);
        bytes
    }

    /// Decodes [`PairRequest::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, PairingError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(PairingError::TooLarge {
                len: bytes.len(),
                max: MAX_REQUEST_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let out = Self {
            device: DevicePublic::decode_from(&mut r)?,
            name: r.str_u8("name", MAX_DEVICE_NAME_BYTES)?.to_owned(),
            platform: r.str_u8("platform", MAX_PLATFORM_BYTES)?.to_owned(),
            mac: r.array()?,
        };
        r.finish()?;
        Ok(out)
    }
}

/// The inviter's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairResponse {
    /// The inviting device.
    pub inviter: DeviceId,
    /// The account's whole device log, ending with the entry that adds the joiner.
    pub log: Vec<DeviceLogEntry>,
    /// Every document key the inviter holds, wrapped to the joiner.
    pub keys: Vec<WrappedKey>,
    /// MAC over the request and all of the above under the pairing secret.
    pub mac: [u8; MAC_LEN],
}

impl PairResponse {
    fn body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.put(self.inviter.as_bytes())
            .put(&DeviceLog::encode_entries(&self.log));
        // Bounded by MAX_PAIRING_KEYS when built and decoded.
        w.u32(u32::try_from(self.keys.len()).unwrap_or(u32::MAX));
        for k in &self.keys {
            w.put(&k.encode());
        }
        w.into_bytes()
    }

    /// Encodes the response: inviter, log entries, wrapped keys, MAC.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.body();
        bytes.extend_from_slice(&self.mac);
        bytes
    }

    /// Decodes [`PairResponse::encode`]'s output. Verifies nothing.
    pub fn decode(bytes: &[u8]) -> Result<Self, PairingError> {
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(PairingError::TooLarge {
                len: bytes.len(),
                max: MAX_RESPONSE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let inviter = DeviceId::from_bytes(r.array()?);
        let count = r.u32()? as usize;
        if count > MAX_LOG_ENTRIES {
            return Err(DeviceLogError::TooManyEntries {
                len: count,
                max: MAX_LOG_ENTRIES,
            }
            .into());
        }
        let mut log = Vec::with_capacity(count.min(r.remaining() / MAX_ENTRY_BYTES + 1));
        for _ in 0..count {
            log.push(DeviceLogEntry::decode(
                r.bytes_u32("entry", MAX_ENTRY_BYTES)?,
            )?);
        }
        let keys_len = r.u32()? as usize;
        if keys_len > MAX_PAIRING_KEYS {
            return Err(PairingError::TooManyKeys {
                len: keys_len,
                max: MAX_PAIRING_KEYS,
            });
        }
        let mut keys = Vec::with_capacity(keys_len.min(r.remaining() / WrappedKey::ENCODED_LEN));
        for _ in 0..keys_len {
            keys.push(WrappedKey::decode_from(&mut r)?);
        }
        let mac = r.array()?;
        r.finish()?;
        Ok(Self {
            inviter,
            log,
            keys,
            mac,
        })
    }
}

fn response_mac(key: &MacKey, request_body: &[u8], response_body: &[u8]) -> [u8; MAC_LEN] {
    key.mac(
        RESPONSE_LABEL,
        &[blake3::hash(request_body).as_bytes(), response_body],
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InviteState {
    Open,
    Used,
    Locked,
}

/// The inviter's side of one pairing.
#[derive(Debug)]
pub struct PairingInvite {
    secret: PairingSecret,
    expires_at_ms: u64,
    failures: u32,
    state: InviteState,
}

impl PairingInvite {
    /// Opens an invite valid until `now_ms + ttl_ms`.
    pub fn new(rng: &mut SeedRng, now_ms: u64, ttl_ms: u64) -> Result<Self, PairingError> {
        if ttl_ms > MAX_PAIRING_TTL_MS {
            return Err(PairingError::TtlTooLong {
                ttl_ms,
                max_ms: MAX_PAIRING_TTL_MS,
            });
        }
        Ok(Self {
            secret: PairingSecret::generate(rng),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            failures: 0,
            state: InviteState::Open,
        })
    }

    /// The code to show to the user (as text or QR).
    pub fn code(&self) -> String {
        self.secret.to_code()
    }

    /// When the invite expires.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    /// The rendezvous id a relay forwards this invite's requests by.
    pub fn rendezvous(&self) -> [u8; 32] {
        self.secret.rendezvous()
    }

    /// Handles the joiner's request: checks it, appends the joiner to `log` (signed by
    /// `inviter`), wraps every key of `keyring` to it and returns the response to send.
    ///
    /// On error nothing is appended. The invite is single-use and locks after
    /// [`MAX_PAIRING_ATTEMPTS`] bad codes.
    pub fn handle_request(
        &mut self,
        request: &PairRequest,
        now_ms: u64,
        inviter: &DeviceSecret,
        log: &mut DeviceLog,
        keyring: &Keyring,
        rng: &mut SeedRng,
    ) -> Result<PairResponse, PairingError> {
        match self.state {
            InviteState::Used => return Err(PairingError::AlreadyUsed),
            InviteState::Locked => {
                return Err(PairingError::TooManyAttempts {
                    attempts: self.failures,
                });
            }
            InviteState::Open => {}
        }
        if now_ms >= self.expires_at_ms {
            return Err(PairingError::Expired {
                now_ms,
                expires_at_ms: self.expires_at_ms,
            });
        }
        let mac_key = self.secret.mac_key();
        let request_body = request.body();
        if !mac_eq(&mac_key.mac(REQUEST_LABEL, &[&request_body]), &request.mac) {
            self.failures += 1;
            if self.failures >= MAX_PAIRING_ATTEMPTS {
                self.state = InviteState::Locked;
            }
            return Err(PairingError::BadCode);
        }
        if !log.is_current(&inviter.device_id()) {
            return Err(PairingError::InviterNotCurrent {
                device: inviter.device_id(),
            });
        }
        request.device.verify()?;
        let entry = log.add_device(inviter, request.device, &request.name, &request.platform)?;
        let keys = keyring.export_to(&request.device, rng)?;
        if keys.len() > MAX_PAIRING_KEYS {
            return Err(PairingError::TooManyKeys {
                len: keys.len(),
                max: MAX_PAIRING_KEYS,
            });
        }
        log.append(entry)?;
        let mut response = PairResponse {
            inviter: inviter.device_id(),
            log: log.entries().to_vec(),
            keys,
            mac: [0; MAC_LEN],
        };
        response.mac = response_mac(&mac_key, &request_body, &response.body());
        self.state = InviteState::Used;
        Ok(response)
    }
}

/// What a successful join yields.
#[derive(Debug)]
pub struct Joined {
    /// The account's verified device log, with the new device current.
    pub log: DeviceLog,
    /// Every document key handed over.
    pub keyring: Keyring,
}

/// The joiner's side of one pairing.
#[derive(Debug)]
pub struct PairingJoin {
    secret: PairingSecret,
    request_body: Vec<u8>,
    device: DeviceId,
    expires_at_ms: u64,
    done: bool,
}

impl PairingJoin {
    /// The rendezvous id a relay forwards this join's request by.
    pub fn rendezvous(&self) -> [u8; 32] {
        self.secret.rendezvous()
    }

    /// Starts joining with the code the user entered; returns the state and the request to send.
    /// The joiner gives up at `now_ms + timeout_ms`.
    pub fn start(
        code: &str,
        device: &DeviceSecret,
        name: &str,
        platform: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<(Self, PairRequest), PairingError> {
        if timeout_ms > MAX_PAIRING_TTL_MS {
            return Err(PairingError::TtlTooLong {
                ttl_ms: timeout_ms,
                max_ms: MAX_PAIRING_TTL_MS,
            });
        }
        for (field, s, max) in [
            ("name", name, MAX_DEVICE_NAME_BYTES),
            ("platform", platform, MAX_PLATFORM_BYTES),
        ] {
            if s.len() > max {
                return Err(DeviceLogError::FieldTooLong {
                    field,
                    len: s.len(),
                    max,
                }
                .into());
            }
        }
        let secret = PairingSecret::parse_code(code)?;
        let mut request = PairRequest {
            device: device.public(),
            name: name.to_owned(),
            platform: platform.to_owned(),
            mac: [0; MAC_LEN],
        };
        let request_body = request.body();
        request.mac = secret.mac_key().mac(REQUEST_LABEL, &[&request_body]);
        Ok((
            Self {
                secret,
                request_body,
                device: device.device_id(),
                expires_at_ms: now_ms.saturating_add(timeout_ms),
                done: false,
            },
            request,
        ))
    }

    /// Handles the inviter's response: checks its MAC, verifies the log, checks that it adds this
    /// device and that the inviter is current, and unwraps every key.
    pub fn handle_response(
        &mut self,
        response: &PairResponse,
        now_ms: u64,
        device: &DeviceSecret,
    ) -> Result<Joined, PairingError> {
        if self.done {
            return Err(PairingError::AlreadyUsed);
        }
        if now_ms >= self.expires_at_ms {
            return Err(PairingError::Expired {
                now_ms,
                expires_at_ms: self.expires_at_ms,
            });
        }
        let expected = response_mac(&self.secret.mac_key(), &self.request_body, &response.body());
        if !mac_eq(&expected, &response.mac) {
            return Err(PairingError::BadCode);
        }
        let genesis = response.log.first().ok_or(DeviceLogError::Empty)?;
        let account = crate::ids::AccountId::from_bytes(genesis.hash().0);
        let log = DeviceLog::verify(&account, response.log.clone())?;
        if !log.is_current(&self.device) {
            return Err(PairingError::NotAdded {
                device: self.device,
            });
        }
        if !log.is_current(&response.inviter) {
            return Err(PairingError::InviterNotCurrent {
                device: response.inviter,
            });
        }
        let mut keyring = Keyring::default();
        for k in &response.keys {
            keyring.absorb(k, device)?;
        }
        self.done = true;
        Ok(Joined { log, keyring })
    }
}

#[cfg(test)]
mod tests;
