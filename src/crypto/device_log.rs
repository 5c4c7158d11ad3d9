//! The account device log: an append-only, hash-chained list of signed entries that says which
//! devices belong to an account.
//!
//! The first entry (genesis) is self-signed by the account's first device; the [`AccountId`] is the
//! blake3 hash of its encoding. Every later entry names its position and the hash of the entry
//! before it, and is signed by a device that is current at that point (added and not yet revoked).
//! Two different entries at the same position are a fork: [`DeviceLogError::Fork`].
//!
//! ```
//! use roamsync::crypto::device_log::DeviceLog;
//! use roamsync::crypto::identity::DeviceSecret;
//! use roamsync::crypto::rng::SeedRng;
//!
//! let mut rng = SeedRng::from_seed([1; 32]);
//! let phone = DeviceSecret::generate(&mut rng);
//! let laptop = DeviceSecret::generate(&mut rng);
//! let mut log = DeviceLog::create(&phone, "phone", "android").unwrap();
//! let add = log.add_device(&phone, laptop.public(), "laptop", "linux").unwrap();
//! log.append(add).unwrap();
//! assert!(log.is_current(&laptop.device_id()));
//! ```

use std::collections::BTreeMap;
use std::fmt;

use crate::crypto::identity::{DevicePublic, DeviceSecret, IdentityError, Signature, verify};
use crate::ids::{AccountId, DeviceId};
use crate::wire::codec::{CodecError, Reader, Writer};

/// Format version of an entry.
pub const ENTRY_VERSION: u8 = 1;
/// Longest device name, in bytes of UTF-8.
pub const MAX_DEVICE_NAME_BYTES: usize = 64;
/// Longest platform label, in bytes of UTF-8.
pub const MAX_PLATFORM_BYTES: usize = 32;
/// Most entries a log may hold (bounds verification work and memory).
pub const MAX_LOG_ENTRIES: usize = 4096;
/// Largest encoded entry.
pub const MAX_ENTRY_BYTES: usize = 1
    + 1
    + 4
    + 32
    + 32
    + DevicePublic::ENCODED_LEN
    + 1
    + MAX_DEVICE_NAME_BYTES
    + 1
    + MAX_PLATFORM_BYTES
    + Signature::LEN;
/// Largest encoded list of entries (see [`DeviceLog::encode_entries`]).
pub const MAX_ENCODED_LOG_BYTES: usize = 4 + MAX_LOG_ENTRIES * (4 + MAX_ENTRY_BYTES);

/// Signature domain of entries.
const ENTRY_DOMAIN: &str = "roamsync 2026 device log entry";

const KIND_GENESIS: u8 = 0;
const KIND_ADD: u8 = 1;
const KIND_REVOKE: u8 = 2;

/// Errors of building, decoding and verifying a device log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceLogError {
    /// The bytes are not an entry.
    #[error("device log entry: {0}")]
    Codec(#[from] CodecError),
    /// The entry has a format version this code does not know.
    #[error("unsupported device log entry version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The entry has an unknown kind byte.
    #[error("unknown device log entry kind {kind}")]
    UnknownKind {
        /// The kind byte found.
        kind: u8,
    },
    /// A name or platform label is longer than allowed.
    #[error("field `{field}` is {len} bytes, at most {max} allowed")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The log is empty.
    #[error("a device log needs a genesis entry")]
    Empty,
    /// The log has more entries than allowed.
    #[error("device log has {len} entries, at most {max} allowed")]
    TooManyEntries {
        /// Entries found (or about to be).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The genesis entry belongs to a different account.
    #[error("log is for account {found}, expected {expected}")]
    WrongAccount {
        /// The account the caller asked for.
        expected: AccountId,
        /// The account of the given genesis.
        found: AccountId,
    },
    /// The first entry is not a well-formed genesis, or a genesis appears later.
    #[error("entry {seq} is not a valid genesis position")]
    MisplacedGenesis {
        /// Position of the offending entry.
        seq: u32,
    },
    /// The genesis is not signed by the device it introduces.
    #[error("genesis is signed by {signer}, not by its device {device}")]
    GenesisNotSelfSigned {
        /// The signer.
        signer: DeviceId,
        /// The introduced device.
        device: DeviceId,
    },
    /// An entry does not follow the current head.
    #[error("entry {seq} does not extend the log (its predecessor hash does not match)")]
    BrokenChain {
        /// Position the entry claims.
        seq: u32,
    },
    /// An entry skips positions.
    #[error("entry claims position {seq} but the log has {len} entries")]
    Gap {
        /// Position the entry claims.
        seq: u32,
        /// Entries present.
        len: usize,
    },
    /// Two different entries claim the same predecessor.
    #[error("fork at position {seq}: entry {existing} vs {conflicting}")]
    Fork {
        /// The contested position.
        seq: u32,
        /// Hash of the entry already in the log.
        existing: EntryHash,
        /// Hash of the conflicting entry.
        conflicting: EntryHash,
    },
    /// The signer was never a device of this account.
    #[error("entry {seq} is signed by {signer}, which is not a device of this account")]
    UnknownSigner {
        /// Position of the entry.
        seq: u32,
        /// The signer.
        signer: DeviceId,
    },
    /// The signer had been revoked before this entry.
    #[error("entry {seq} is signed by {signer}, revoked at entry {revoked_at}")]
    SignerRevoked {
        /// Position of the entry.
        seq: u32,
        /// The signer.
        signer: DeviceId,
        /// Where it was revoked.
        revoked_at: u32,
    },
    /// An add entry names a device the log already knows (current or revoked).
    #[error("device {device} is already in the log")]
    DeviceAlreadyKnown {
        /// The device.
        device: DeviceId,
    },
    /// A revoke entry names a device that is not current.
    #[error("device {device} is not a current device")]
    NotCurrent {
        /// The device.
        device: DeviceId,
    },
    /// The revocation would leave the account without any device.
    #[error("revoking {device} would leave the account without devices")]
    LastDevice {
        /// The device.
        device: DeviceId,
    },
    /// A signature or key binding did not verify.
    #[error("entry {seq}: {source}")]
    Identity {
        /// Position of the entry.
        seq: u32,
        /// What failed.
        #[source]
        source: IdentityError,
    },
}

/// The hash of an encoded entry; each entry names its predecessor's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryHash(pub [u8; 32]);

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EntryHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// What an entry does.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryAction {
    /// Creates the account with its first device.
    Genesis(DeviceInfo),
    /// Adds a device.
    Add(DeviceInfo),
    /// Revokes a device.
    Revoke(DeviceId),
}

/// A device as described in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its public keys.
    pub keys: DevicePublic,
    /// A human-readable name ("Ana's phone").
    pub name: String,
    /// A platform label ("android", "linux").
    pub platform: String,
}

/// One signed entry of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLogEntry {
    /// Position in the log, from 0 (genesis).
    pub seq: u32,
    /// Hash of the entry at `seq - 1`; all zero for genesis.
    pub prev: EntryHash,
    /// The device that signed this entry.
    pub signer: DeviceId,
    /// What the entry does.
    pub action: EntryAction,
    /// The signer's signature over everything above.
    pub signature: Signature,
}

impl DeviceLogEntry {
    fn build(
        seq: u32,
        prev: EntryHash,
        signer: &DeviceSecret,
        action: EntryAction,
    ) -> Result<Self, DeviceLogError> {
        if let EntryAction::Genesis(info) | EntryAction::Add(info) = &action {
            check_len("name", &info.name, MAX_DEVICE_NAME_BYTES)?;
            check_len("platform", &info.platform, MAX_PLATFORM_BYTES)?;
        }
        let mut entry = Self {
            seq,
            prev,
            signer: signer.device_id(),
            action,
            signature: Signature::from_bytes([0; 64]),
        };
        entry.signature = signer.sign(ENTRY_DOMAIN, &entry.signed_part());
        Ok(entry)
    }

    /// A genesis entry introducing `first`, self-signed.
    pub fn genesis(
        first: &DeviceSecret,
        name: &str,
        platform: &str,
    ) -> Result<Self, DeviceLogError> {
        let info = DeviceInfo {
            keys: first.public(),
            name: name.to_owned(),
            platform: platform.to_owned(),
        };
        Self::build(0, EntryHash([0; 32]), first, EntryAction::Genesis(info))
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(MAX_ENTRY_BYTES);
        let kind = match self.action {
            EntryAction::Genesis(_) => KIND_GENESIS,
            EntryAction::Add(_) => KIND_ADD,
            EntryAction::Revoke(_) => KIND_REVOKE,
        };
        w.u8(ENTRY_VERSION)
            .u8(kind)
            .u32(self.seq)
            .put(&self.prev.0)
            .put(self.signer.as_bytes());
        match &self.action {
            EntryAction::Genesis(info) | EntryAction::Add(info) => {
                info.keys.encode_into(&mut w);
                w.str_u8(&info.name).str_u8(&info.platform);
            }
            EntryAction::Revoke(device) => {
                w.put(device.as_bytes());
            }
        }
        w.into_bytes()
    }

    /// The canonical encoding: version, kind, seq, prev, signer, body, signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.signed_part();
        bytes.extend_from_slice(self.signature.as_bytes());
        bytes
    }

    /// Decodes one entry, rejecting anything but the canonical encoding. Does not verify it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeviceLogError> {
        if bytes.len() > MAX_ENTRY_BYTES {
            return Err(CodecError::TooLong {
                field: "entry",
                len: bytes.len(),
                max: MAX_ENTRY_BYTES,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != ENTRY_VERSION {
            return Err(DeviceLogError::UnsupportedVersion { version });
        }
        let kind = r.u8()?;
        let seq = r.u32()?;
        let prev = EntryHash(r.array()?);
        let signer = DeviceId::from_bytes(r.array()?);
        let action = match kind {
            KIND_GENESIS | KIND_ADD => {
                let info = DeviceInfo {
                    keys: DevicePublic::decode_from(&mut r)?,
                    name: r.str_u8("name", MAX_DEVICE_NAME_BYTES)?.to_owned(),
                    platform: r.str_u8("platform", MAX_PLATFORM_BYTES)?.to_owned(),
                };
                if kind == KIND_GENESIS {
                    EntryAction::Genesis(info)
                } else {
                    EntryAction::Add(info)
                }
            }
            KIND_REVOKE => EntryAction::Revoke(DeviceId::from_bytes(r.array()?)),
            kind => return Err(DeviceLogError::UnknownKind { kind }),
        };
        let signature = Signature::from_bytes(r.array()?);
        r.finish()?;
        Ok(Self {
            seq,
            prev,
            signer,
            action,
            signature,
        })
    }

    /// The hash of the encoded entry.
    pub fn hash(&self) -> EntryHash {
        EntryHash(*blake3::hash(&self.encode()).as_bytes())
    }

    /// Checks the signature (not whether the signer may sign; that needs the log).
    fn verify_signature(&self) -> Result<(), DeviceLogError> {
        verify(
            &self.signer,
            ENTRY_DOMAIN,
            &self.signed_part(),
            &self.signature,
        )
        .map_err(|source| DeviceLogError::Identity {
            seq: self.seq,
            source,
        })
    }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), DeviceLogError> {
    if s.len() > max {
        return Err(DeviceLogError::FieldTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// What the log says about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device as added.
    pub info: DeviceInfo,
    /// Position of the entry that added it.
    pub added_at: u32,
    /// Position of the entry that revoked it, if any.
    pub revoked_at: Option<u32>,
}

/// What [`DeviceLog::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppendOutcome {
    /// The entry extended the log.
    Appended,
    /// The log already held this exact entry; nothing changed.
    AlreadyPresent,
}

/// A verified device log: every entry in it has been checked.
#[derive(Clone, Debug)]
pub struct DeviceLog {
    account: AccountId,
    entries: Vec<DeviceLogEntry>,
    hashes: Vec<EntryHash>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
}

impl DeviceLog {
    /// A new account whose first device is `first`.
    pub fn create(
        first: &DeviceSecret,
        name: &str,
        platform: &str,
    ) -> Result<Self, DeviceLogError> {
        Self::from_genesis(DeviceLogEntry::genesis(first, name, platform)?)
    }

    /// Starts a log from a genesis entry, verifying it.
    pub fn from_genesis(genesis: DeviceLogEntry) -> Result<Self, DeviceLogError> {
        let info = match (&genesis.action, genesis.seq, genesis.prev) {
            (EntryAction::Genesis(info), 0, EntryHash(prev)) if prev == [0; 32] => info.clone(),
            _ => return Err(DeviceLogError::MisplacedGenesis { seq: genesis.seq }),
        };
        if genesis.signer != info.keys.device {
            return Err(DeviceLogError::GenesisNotSelfSigned {
                signer: genesis.signer,
                device: info.keys.device,
            });
        }
        info.keys
            .verify()
            .map_err(|source| DeviceLogError::Identity { seq: 0, source })?;
        genesis.verify_signature()?;
        let hash = genesis.hash();
        let mut devices = BTreeMap::new();
        devices.insert(
            info.keys.device,
            DeviceRecord {
                info,
                added_at: 0,
                revoked_at: None,
            },
        );
        Ok(Self {
            account: AccountId::from_bytes(hash.0),
            entries: vec![genesis],
            hashes: vec![hash],
            devices,
        })
    }

    /// Verifies a whole log and checks that it belongs to `account`.
    pub fn verify(
        account: &AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<Self, DeviceLogError> {
        if entries.len() > MAX_LOG_ENTRIES {
            return Err(DeviceLogError::TooManyEntries {
                len: entries.len(),
                max: MAX_LOG_ENTRIES,
            });
        }
        let mut it = entries.into_iter();
        let genesis = it.next().ok_or(DeviceLogError::Empty)?;
        let mut log = Self::from_genesis(genesis)?;
        if log.account != *account {
            return Err(DeviceLogError::WrongAccount {
                expected: *account,
                found: log.account,
            });
        }
        for entry in it {
            if log.append(entry)? == AppendOutcome::AlreadyPresent {
                // A list that repeats an entry is not a canonical log.
                return Err(DeviceLogError::BrokenChain {
                    seq: log.hashes.len() as u32,
                });
            }
        }
        Ok(log)
    }

    /// Verifies `entry` against the current state and appends it.
    pub fn append(&mut self, entry: DeviceLogEntry) -> Result<AppendOutcome, DeviceLogError> {
        let len = self.entries.len();
        let seq = entry.seq as usize;
        if seq < len {
            let existing = &self.entries[seq];
            if *existing == entry {
                return Ok(AppendOutcome::AlreadyPresent);
            }
            if seq > 0 && entry.prev == self.hashes[seq - 1] {
                return Err(DeviceLogError::Fork {
                    seq: entry.seq,
                    existing: self.hashes[seq],
                    conflicting: entry.hash(),
                });
            }
            return Err(DeviceLogError::BrokenChain { seq: entry.seq });
        }
        if seq > len {
            return Err(DeviceLogError::Gap {
                seq: entry.seq,
                len,
            });
        }
        if len >= MAX_LOG_ENTRIES {
            return Err(DeviceLogError::TooManyEntries {
                len: len + 1,
                max: MAX_LOG_ENTRIES,
            });
        }
        if entry.prev != self.hashes[len - 1] {
            return Err(DeviceLogError::BrokenChain { seq: entry.seq });
        }
        self.check_signer(&entry)?;
        entry.verify_signature()?;
        match &entry.action {
            EntryAction::Genesis(_) => {
                return Err(DeviceLogError::MisplacedGenesis { seq: entry.seq });
            }
            EntryAction::Add(info) => {
                if self.devices.contains_key(&info.keys.device) {
                    return Err(DeviceLogError::DeviceAlreadyKnown {
                        device: info.keys.device,
                    });
                }
                info.keys
                    .verify()
                    .map_err(|source| DeviceLogError::Identity {
                        seq: entry.seq,
                        source,
                    })?;
                self.devices.insert(
                    info.keys.device,
                    DeviceRecord {
                        info: info.clone(),
                        added_at: entry.seq,
                        revoked_at: None,
                    },
                );
            }
            EntryAction::Revoke(device) => {
                if !self.is_current(device) {
                    return Err(DeviceLogError::NotCurrent { device: *device });
                }
                if self.current_devices().count() == 1 {
                    return Err(DeviceLogError::LastDevice { device: *device });
                }
                if let Some(record) = self.devices.get_mut(device) {
                    record.revoked_at = Some(entry.seq);
                }
            }
        }
        self.hashes.push(entry.hash());
        self.entries.push(entry);
        Ok(AppendOutcome::Appended)
    }

    fn check_signer(&self, entry: &DeviceLogEntry) -> Result<(), DeviceLogError> {
        match self.devices.get(&entry.signer) {
            None => Err(DeviceLogError::UnknownSigner {
                seq: entry.seq,
                signer: entry.signer,
            }),
            Some(DeviceRecord {
                revoked_at: Some(revoked_at),
                ..
            }) => Err(DeviceLogError::SignerRevoked {
                seq: entry.seq,
                signer: entry.signer,
                revoked_at: *revoked_at,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Builds (but does not append) an entry by `signer` adding `device`.
    pub fn add_device(
        &self,
        signer: &DeviceSecret,
        device: DevicePublic,
        name: &str,
        platform: &str,
    ) -> Result<DeviceLogEntry, DeviceLogError> {
        let info = DeviceInfo {
            keys: device,
            name: name.to_owned(),
            platform: platform.to_owned(),
        };
        self.next_entry(signer, EntryAction::Add(info))
    }

    /// Builds (but does not append) an entry by `signer` revoking `device`.
    pub fn revoke_device(
        &self,
        signer: &DeviceSecret,
        device: DeviceId,
    ) -> Result<DeviceLogEntry, DeviceLogError> {
        self.next_entry(signer, EntryAction::Revoke(device))
    }

    fn next_entry(
        &self,
        signer: &DeviceSecret,
        action: EntryAction,
    ) -> Result<DeviceLogEntry, DeviceLogError> {
        let seq = self.entries.len();
        if seq >= MAX_LOG_ENTRIES {
            return Err(DeviceLogError::TooManyEntries {
                len: seq + 1,
                max: MAX_LOG_ENTRIES,
            });
        }
        // `seq < MAX_LOG_ENTRIES`, which fits in a u32.
        DeviceLogEntry::build(seq as u32, self.head(), signer, action)
    }

    /// The account this log belongs to.
    pub fn account(&self) -> AccountId {
        self.account
    }

    /// Hash of the last entry.
    pub fn head(&self) -> EntryHash {
        // A log always holds its genesis.
        self.hashes[self.hashes.len() - 1]
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a log holds at least its genesis.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, genesis first.
    pub fn entries(&self) -> &[DeviceLogEntry] {
        &self.entries
    }

    /// Whether `device` was added and not revoked.
    pub fn is_current(&self, device: &DeviceId) -> bool {
        self.devices
            .get(device)
            .is_some_and(|r| r.revoked_at.is_none())
    }

    /// What the log says about `device`.
    pub fn device(&self, device: &DeviceId) -> Option<&DeviceRecord> {
        self.devices.get(device)
    }

    /// The devices that are current now.
    pub fn current_devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values().filter(|r| r.revoked_at.is_none())
    }

    /// Encodes a list of entries: a `u32` count, then each entry with a `u32` length prefix.
    pub fn encode_entries(entries: &[DeviceLogEntry]) -> Vec<u8> {
        let mut w = Writer::default();
        // Logs never exceed MAX_LOG_ENTRIES, far below u32::MAX.
        w.u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        for e in entries {
            w.bytes_u32(&e.encode());
        }
        w.into_bytes()
    }

    /// Decodes what [`DeviceLog::encode_entries`] wrote, without verifying.
    pub fn decode_entries(bytes: &[u8]) -> Result<Vec<DeviceLogEntry>, DeviceLogError> {
        if bytes.len() > MAX_ENCODED_LOG_BYTES {
            return Err(CodecError::TooLong {
                field: "log",
                len: bytes.len(),
                max: MAX_ENCODED_LOG_BYTES,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let count = r.u32()? as usize;
        if count > MAX_LOG_ENTRIES {
            return Err(DeviceLogError::TooManyEntries {
                len: count,
                max: MAX_LOG_ENTRIES,
            });
        }
        let mut out = Vec::with_capacity(count.min(r.remaining() / MAX_ENTRY_BYTES + 1));
        for _ in 0..count {
            out.push(DeviceLogEntry::decode(
                r.bytes_u32("entry", MAX_ENTRY_BYTES)?,
            )?);
        }
        r.finish()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
