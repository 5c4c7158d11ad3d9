//! Groups: the unit of access control and key distribution.
//!
//! A group is what a relay checks access against and what a key belongs to: one per
//! conversation (its meta document and all of its segments) and one per account (its private
//! account document). The group's id is the [`DocId`] of that document (the meta document or the
//! account document), so a relay sees only an opaque hash.
//!
//! A group changes through a chain of signed [`GroupUpdate`]s, numbered from 0:
//! - **version 0** creates the group: its member accounts, the first key epoch wrapped to every
//!   current device of every member, and a *label* sealed under that key which tells members
//!   which document the group is (a relay cannot read it);
//! - **each later version** replaces the member list and carries the keys that changed: all
//!   epochs for the devices of an added member (a CRDT needs its whole history), or a new epoch
//!   for the remaining devices after a removal.
//!
//! An update is signed by a device of an account that was a member at the previous version (for
//! version 0: of an account in its own member list). Whether that device is current is checked
//! by the caller against the signer account's device log; this module checks the chain.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};

use crate::crypto::device_log::DeviceLog;
use crate::crypto::identity::{DevicePublic, DeviceSecret, IdentityError, Signature, verify};
use crate::crypto::keys::{DocKey, KeyEpoch, KeySource, KeysError, WrappedKey};
use crate::crypto::rng::SeedRng;
use crate::ids::{AccountId, DeviceId, DocAddr, DocId};
use crate::wire::codec::{CodecError, Reader, Writer};

/// Format version of an encoded update.
pub const GROUP_UPDATE_VERSION: u8 = 1;
/// Most member accounts of one group.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most wrapped keys one update carries.
pub const MAX_UPDATE_KEYS: usize = 16 * 1024;
/// Largest sealed label (an encoded [`DocAddr`] plus the AEAD tag, with room to spare).
pub const MAX_LABEL_BYTES: usize = 128;
/// Largest encoded update.
pub const MAX_GROUP_UPDATE_BYTES: usize = 1
    + 32
    + 4
    + 2
    + MAX_GROUP_MEMBERS * 32
    + 4
    + MAX_UPDATE_KEYS * WrappedKey::ENCODED_LEN
    + 4
    + 24
    + 2
    + MAX_LABEL_BYTES
    + 32
    + 32
    + Signature::LEN;

const SIGNATURE_DOMAIN: &str = "roamsync group update v1";
const LABEL_AAD: &[u8] = b"roamsync group label v1";

/// Errors of group updates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The encoding is malformed.
    #[error("group update: {0}")]
    Codec(#[from] CodecError),
    /// The format version is not supported.
    #[error("unsupported group update version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// A list is longer than its limit.
    #[error("group update has {len} {field}, at most {max} allowed")]
    TooMany {
        /// Which list.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The member list is empty, unsorted or repeats an account.
    #[error("member list must be non-empty, sorted and without repeats")]
    BadMembers,
    /// The signature does not verify.
    #[error("group update signature: {0}")]
    BadSignature(IdentityError),
    /// The update does not follow the previous one.
    #[error("group {group:?}: expected version {expected}, found {found}")]
    OutOfOrder {
        /// The group.
        group: DocId,
        /// The version that would come next.
        expected: u32,
        /// The version found.
        found: u32,
    },
    /// The update names another group than the chain it extends.
    #[error("update for group {found:?} where {expected:?} was expected")]
    WrongGroup {
        /// The chain's group.
        expected: DocId,
        /// The update's group.
        found: DocId,
    },
    /// The signer's account may not change the group.
    #[error("account {account:?} is not a member of group {group:?} and may not change it")]
    NotMember {
        /// The group.
        group: DocId,
        /// The signer's account.
        account: AccountId,
    },
    /// A wrapped key is for another document than the group.
    #[error("wrapped key for {found:?} in an update of group {group:?}")]
    ForeignKey {
        /// The group.
        group: DocId,
        /// The key's document.
        found: DocId,
    },
    /// A wrapped key could not be read.
    #[error("group key: {0}")]
    Keys(#[from] KeysError),
    /// The label's key is missing.
    #[error("no key for group {group:?} at epoch {epoch:?} to open its label")]
    MissingLabelKey {
        /// The group.
        group: DocId,
        /// The label's epoch.
        epoch: KeyEpoch,
    },
    /// The label does not decrypt or does not name the group's document.
    #[error("the label of group {group:?} does not open to its document")]
    BadLabel {
        /// The group.
        group: DocId,
    },
}

/// The group's document address, encrypted under one of the group's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedLabel {
    /// The key epoch it is sealed under.
    pub epoch: KeyEpoch,
    /// The AEAD nonce.
    pub nonce: [u8; 24],
    /// The encrypted [`DocAddr`] encoding, tag included.
    pub ciphertext: Vec<u8>,
}

/// One signed step of a group's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupUpdate {
    /// The group (the `DocId` of its meta or account document).
    pub group: DocId,
    /// Position in the chain, from 0.
    pub version: u32,
    /// The member accounts after this update, sorted.
    pub members: Vec<AccountId>,
    /// Keys wrapped to devices that need them.
    pub keys: Vec<WrappedKey>,
    /// The group's document address, for members.
    pub label: SealedLabel,
    /// The signing device.
    pub signer: DeviceId,
    /// The signing device's account.
    pub signer_account: AccountId,
    /// Signature over everything above.
    pub signature: Signature,
}

fn label_cipher(key: &DocKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.as_bytes().into())
}

fn label_aad(group: &DocId, epoch: KeyEpoch) -> Vec<u8> {
    let mut w = Writer::with_capacity(LABEL_AAD.len() + 36);
    w.put(LABEL_AAD).put(group.as_bytes()).u32(epoch.0);
    w.into_bytes()
}

impl SealedLabel {
    /// Seals `addr` under `key` (the group's key at `epoch`).
    pub fn seal(addr: &DocAddr, epoch: KeyEpoch, key: &DocKey, rng: &mut SeedRng) -> Self {
        let nonce = rng.array::<24>();
        let mut plain = Vec::with_capacity(addr.encoded_len());
        addr.encode_into(&mut plain);
        let ciphertext = label_cipher(key)
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &plain,
                    aad: &label_aad(&addr.doc_id(), epoch),
                },
            )
            // A plaintext of a few dozen bytes is always within the cipher's limits.
            .unwrap_or_default();
        Self {
            epoch,
            nonce,
            ciphertext,
        }
    }

    fn open(&self, group: &DocId, keys: &impl KeySource) -> Result<DocAddr, GroupError> {
        let key = keys
            .doc_key(group, self.epoch)
            .ok_or(GroupError::MissingLabelKey {
                group: *group,
                epoch: self.epoch,
            })?;
        let bad = GroupError::BadLabel { group: *group };
        let plain = label_cipher(key)
            .decrypt(
                &self.nonce.into(),
                Payload {
                    msg: &self.ciphertext,
                    aad: &label_aad(group, self.epoch),
                },
            )
            .map_err(|_| bad.clone())?;
        let (addr, used) = DocAddr::decode_prefix(&plain).map_err(|_| bad.clone())?;
        let addressable = matches!(addr, DocAddr::Account(_) | DocAddr::Meta(_));
        if used != plain.len() || addr.doc_id() != *group || !addressable {
            return Err(bad);
        }
        Ok(addr)
    }
}

impl GroupUpdate {
    /// Builds and signs an update. `members` is sorted and deduplicated here.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        signer: &DeviceSecret,
        signer_account: AccountId,
        group: DocId,
        version: u32,
        mut members: Vec<AccountId>,
        keys: Vec<WrappedKey>,
        label: SealedLabel,
    ) -> Result<Self, GroupError> {
        members.sort();
        members.dedup();
        let mut update = Self {
            group,
            version,
            members,
            keys,
            label,
            signer: signer.device_id(),
            signer_account,
            signature: Signature::from_bytes([0; 64]),
        };
        update.check_shape()?;
        update.signature = signer.sign(SIGNATURE_DOMAIN, &update.signed_part());
        Ok(update)
    }

    fn check_shape(&self) -> Result<(), GroupError> {
        let too_many = |field, len, max| {
            if len > max {
                Err(GroupError::TooMany { field, len, max })
            } else {
                Ok(())
            }
        };
        too_many("members", self.members.len(), MAX_GROUP_MEMBERS)?;
        too_many("keys", self.keys.len(), MAX_UPDATE_KEYS)?;
        too_many("label bytes", self.label.ciphertext.len(), MAX_LABEL_BYTES)?;
        if self.members.is_empty() || self.members.windows(2).any(|w| w[0] >= w[1]) {
            return Err(GroupError::BadMembers);
        }
        if let Some(k) = self.keys.iter().find(|k| k.doc != self.group) {
            return Err(GroupError::ForeignKey {
                group: self.group,
                found: k.doc,
            });
        }
        Ok(())
    }

    fn signed_part(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(
            128 + self.members.len() * 32 + self.keys.len() * WrappedKey::ENCODED_LEN,
        );
        w.u8(GROUP_UPDATE_VERSION)
            .put(self.group.as_bytes())
            .u32(self.version);
        // Bounded by MAX_GROUP_MEMBERS and MAX_UPDATE_KEYS (checked in check_shape).
        w.u16(self.members.len() as u16);
        for m in &self.members {
            w.put(m.as_bytes());
        }
        w.u32(self.keys.len() as u32);
        for k in &self.keys {
            w.put(&k.encode());
        }
        w.u32(self.label.epoch.0)
            .put(&self.label.nonce)
            .u16(self.label.ciphertext.len() as u16)
            .put(&self.label.ciphertext)
            .put(self.signer.as_bytes())
            .put(self.signer_account.as_bytes());
        w.into_bytes()
    }

    /// The encoding: the signed part, then the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.signed_part();
        bytes.extend_from_slice(self.signature.as_bytes());
        bytes
    }

    /// Decodes [`GroupUpdate::encode`]'s output and checks its shape (not its signature).
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        let mut r = Reader::new(bytes);
        let out = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(out)
    }

    /// Reads one update from `r`.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, GroupError> {
        let version = r.u8()?;
        if version != GROUP_UPDATE_VERSION {
            return Err(GroupError::UnsupportedVersion { version });
        }
        let group = DocId::from_bytes(r.array()?);
        let chain_version = r.u32()?;
        let n_members = usize::from(r.u16()?);
        if n_members > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooMany {
                field: "members",
                len: n_members,
                max: MAX_GROUP_MEMBERS,
            });
        }
        let members = (0..n_members)
            .map(|_| r.array().map(AccountId::from_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let n_keys = r.u32()? as usize;
        if n_keys > MAX_UPDATE_KEYS {
            return Err(GroupError::TooMany {
                field: "keys",
                len: n_keys,
                max: MAX_UPDATE_KEYS,
            });
        }
        let keys = (0..n_keys)
            .map(|_| WrappedKey::decode_from(r))
            .collect::<Result<Vec<_>, _>>()?;
        let epoch = KeyEpoch(r.u32()?);
        let nonce = r.array()?;
        let label_len = usize::from(r.u16()?);
        if label_len > MAX_LABEL_BYTES {
            return Err(GroupError::TooMany {
                field: "label bytes",
                len: label_len,
                max: MAX_LABEL_BYTES,
            });
        }
        let ciphertext = r.take(label_len)?.to_vec();
        let update = Self {
            group,
            version: chain_version,
            members,
            keys,
            label: SealedLabel {
                epoch,
                nonce,
                ciphertext,
            },
            signer: DeviceId::from_bytes(r.array()?),
            signer_account: AccountId::from_bytes(r.array()?),
            signature: Signature::from_bytes(r.array()?),
        };
        update.check_shape()?;
        Ok(update)
    }

    /// Checks the signature.
    pub fn verify_signature(&self) -> Result<(), GroupError> {
        verify(
            &self.signer,
            SIGNATURE_DOMAIN,
            &self.signed_part(),
            &self.signature,
        )
        .map_err(GroupError::BadSignature)
    }

    /// Checks that this update may follow `prev` (None: it must create the group): same group,
    /// next version, and a signer account that was a member before (or, at creation, is one).
    /// The caller checks separately that `signer` is a device of `signer_account`.
    pub fn check_follows(&self, prev: Option<&GroupUpdate>) -> Result<(), GroupError> {
        let (expected, members) = match prev {
            None => (0, &self.members),
            Some(p) => {
                if p.group != self.group {
                    return Err(GroupError::WrongGroup {
                        expected: p.group,
                        found: self.group,
                    });
                }
                (p.version.saturating_add(1), &p.members)
            }
        };
        if self.version != expected {
            return Err(GroupError::OutOfOrder {
                group: self.group,
                expected,
                found: self.version,
            });
        }
        if members.binary_search(&self.signer_account).is_err() {
            return Err(GroupError::NotMember {
                group: self.group,
                account: self.signer_account,
            });
        }
        Ok(())
    }

    /// Whether `account` is a member after this update.
    pub fn is_member(&self, account: &AccountId) -> bool {
        self.members.binary_search(account).is_ok()
    }

    /// The keys wrapped to `device`.
    pub fn keys_for<'a>(&'a self, device: &'a DeviceId) -> impl Iterator<Item = &'a WrappedKey> {
        self.keys.iter().filter(move |k| k.recipient == *device)
    }

    /// Opens the label with `keys` (after the caller absorbed the keys addressed to it) and
    /// returns the group's document address, checked to hash to the group id.
    pub fn open_label(&self, keys: &impl KeySource) -> Result<DocAddr, GroupError> {
        self.label.open(&self.group, keys)
    }
}

/// The device that wraps key epoch `epoch` of `group` to `device` (of `log`'s account) when no
/// update of `chain` does, as seen from `logs`, the logs of the group's member accounts. It is
/// chosen among the current devices the chain shows holding that epoch's key (wrapped to them):
/// - the device that added `device` to its log;
/// - otherwise the one of `device`'s account with the smallest id;
/// - otherwise the one of another member account with the smallest id.
///
/// One device answers for each, so that devices do not race to do it (a race is resolved by
/// the relay taking one update of a version), and it is one that holds the key.
pub fn key_keeper(
    logs: &[&DeviceLog],
    chain: &[GroupUpdate],
    group: DocId,
    epoch: KeyEpoch,
    log: &DeviceLog,
    device: &DeviceId,
) -> Option<DeviceId> {
    let record = log.device(device)?;
    let holds = |d: &DeviceId| {
        chain.iter().any(|u| {
            u.keys
                .iter()
                .any(|k| k.recipient == *d && k.doc == group && k.epoch == epoch)
        })
    };
    let inviter = log
        .entries()
        .get(record.added_at as usize)
        .map(|e| e.signer)
        .filter(|s| s != device && log.is_current(s) && holds(s));
    let smallest = |logs: &mut dyn Iterator<Item = &DeviceLog>| {
        logs.flat_map(|l| l.current_devices().map(|r| r.info.keys.device))
            .filter(|d| d != device && holds(d))
            .min()
    };
    inviter
        .or_else(|| smallest(&mut std::iter::once(log)))
        .or_else(|| {
            smallest(
                &mut logs
                    .iter()
                    .copied()
                    .filter(|l| l.account() != log.account()),
            )
        })
}

/// Keys of `group` for `me` (holding `keys`, the group's epochs and keys) to wrap again: for
/// each current device of the member accounts' `logs` and each epoch no update of `chain`
/// wraps to it, the key if `me` is that epoch's [`key_keeper`] for the device.
///
/// A member that signs an update with a copy of an account's log older than a link leaves the
/// new device without that key, and pairing hands over only the keys the inviter held then.
/// A device that got a key at pairing is wrapped it again at the group's next change: the chain
/// does not show that it has it.
pub fn missing_wraps(
    chain: &[GroupUpdate],
    group: DocId,
    logs: &[&DeviceLog],
    me: &DeviceId,
    keys: &[(KeyEpoch, DocKey)],
    rng: &mut SeedRng,
) -> Result<Vec<WrappedKey>, KeysError> {
    let mut wrapped = Vec::new();
    for log in logs {
        for record in log.current_devices() {
            let device = record.info.keys.device;
            if device == *me {
                continue;
            }
            for (epoch, key) in keys {
                let covered = chain.iter().any(|u| {
                    u.keys
                        .iter()
                        .any(|k| k.recipient == device && k.doc == group && k.epoch == *epoch)
                });
                if !covered && key_keeper(logs, chain, group, *epoch, log, &device) == Some(*me) {
                    wrapped.push(WrappedKey::wrap(
                        key,
                        group,
                        *epoch,
                        &record.info.keys,
                        rng,
                    )?);
                }
            }
        }
    }
    Ok(wrapped)
}

/// Takes `me`'s own updates off a chain from version `at` on, when another device's update
/// took version `at` at the relay; they are to be made again on the relay's chain
/// ([`rebase_changes`]). `None`, and the chain unchanged, if it holds nothing at `at` or an
/// update from there on is another device's (taken off already, or replaced by the relay's).
pub fn take_off_own(
    updates: &mut Vec<GroupUpdate>,
    at: usize,
    me: &DeviceId,
) -> Option<Vec<GroupUpdate>> {
    if at >= updates.len() || updates[at..].iter().any(|u| u.signer != *me) {
        return None;
    }
    Some(updates.split_off(at))
}

/// This device's membership changes `mine`, refused because another device's update took their
/// version, made again on top of `chain` (the relay's chain, fetched since; it holds the prefix
/// `mine` followed): the same accounts added and removed; every epoch's key (of `keys`, the
/// group's epochs held here) wrapped to the devices of an added account; a key epoch a change
/// started wrapped to every member device after it. A change the chain made already is dropped,
/// and nothing is made once `signer_account` is no longer a member. `devices` holds the current
/// devices of the accounts involved.
///
/// Two concurrent changes that both start a key epoch number are not reconciled: each side
/// holds its own key for it (docs/SECURITY.md, "Concurrent membership changes").
pub fn rebase_changes(
    mine: &[GroupUpdate],
    chain: &[GroupUpdate],
    signer: &DeviceSecret,
    signer_account: AccountId,
    keys: &[(KeyEpoch, DocKey)],
    devices: &std::collections::BTreeMap<AccountId, Vec<DevicePublic>>,
    rng: &mut SeedRng,
) -> Result<Vec<GroupUpdate>, GroupError> {
    let Some(first) = mine.first().map(|u| u.version as usize) else {
        return Ok(Vec::new());
    };
    let (Some(prev), Some(head)) = (chain.get(first.wrapping_sub(1)), chain.last()) else {
        return Ok(Vec::new());
    };
    let epochs_before: std::collections::BTreeSet<KeyEpoch> = chain[..first]
        .iter()
        .flat_map(|u| u.keys.iter().map(|k| k.epoch))
        .collect();
    let mut before = prev.members.clone();
    let mut head = head.clone();
    let mut out = Vec::new();
    let devices_of = |accounts: &[AccountId]| -> Vec<&DevicePublic> {
        accounts
            .iter()
            .flat_map(|a| devices.get(a).into_iter().flatten())
            .collect()
    };
    for u in mine {
        let added: Vec<AccountId> = u
            .members
            .iter()
            .filter(|m| !before.contains(m))
            .copied()
            .collect();
        let removed: Vec<AccountId> = before
            .iter()
            .filter(|m| !u.members.contains(m))
            .copied()
            .collect();
        before = u.members.clone();
        if !head.is_member(&signer_account) {
            break;
        }
        let mut members: Vec<AccountId> = head
            .members
            .iter()
            .filter(|m| !removed.contains(m))
            .chain(added.iter())
            .copied()
            .collect();
        members.sort();
        members.dedup();
        if members == head.members {
            continue;
        }
        let started: std::collections::BTreeSet<KeyEpoch> = u
            .keys
            .iter()
            .map(|k| k.epoch)
            .filter(|e| !epochs_before.contains(e))
            .collect();
        let mut wrapped = Vec::new();
        let newcomers: Vec<AccountId> = added
            .iter()
            .copied()
            .filter(|a| members.contains(a))
            .collect();
        for d in devices_of(&newcomers) {
            for (epoch, key) in keys {
                wrapped.push(WrappedKey::wrap(key, head.group, *epoch, d, rng)?);
            }
        }
        for (epoch, key) in keys.iter().filter(|(e, _)| started.contains(e)) {
            for d in devices_of(&members) {
                wrapped.push(WrappedKey::wrap(key, head.group, *epoch, d, rng)?);
            }
        }
        let update = GroupUpdate::sign(
            signer,
            signer_account,
            head.group,
            head.version + 1,
            members,
            wrapped,
            head.label.clone(),
        )?;
        head = update.clone();
        out.push(update);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::device_log::DeviceLog;
    use crate::crypto::keys::Keyring;
    use crate::ids::ConversationId;

    struct Fixture {
        rng: SeedRng,
        alice: DeviceSecret,
        alice_log: DeviceLog,
        bob: DeviceSecret,
        bob_log: DeviceLog,
    }

    fn fixture() -> Fixture {
        let mut rng = SeedRng::from_seed([4; 32]);
        let alice = DeviceSecret::generate(&mut rng);
        let bob = DeviceSecret::generate(&mut rng);
        let alice_log = DeviceLog::create(&alice, "a", "test").unwrap();
        let bob_log = DeviceLog::create(&bob, "b", "test").unwrap();
        Fixture {
            rng,
            alice,
            alice_log,
            bob,
            bob_log,
        }
    }

    fn create(f: &mut Fixture, keyring: &mut Keyring) -> (DocAddr, GroupUpdate) {
        let addr = DocAddr::Meta(ConversationId::from_bytes([7; 16]));
        let group = addr.doc_id();
        let (epoch, wrapped) = keyring
            .rotate(group, &[f.alice.public(), f.bob.public()], &mut f.rng)
            .unwrap();
        let label = SealedLabel::seal(
            &addr,
            epoch,
            keyring.key(&group, epoch).unwrap(),
            &mut f.rng,
        );
        let update = GroupUpdate::sign(
            &f.alice,
            f.alice_log.account(),
            group,
            0,
            vec![f.bob_log.account(), f.alice_log.account()],
            wrapped,
            label,
        )
        .unwrap();
        (addr, update)
    }

    /// Bob links a second device after Alice made the group from his one-device log: only
    /// Bob's first device (its inviter, holding the key) wraps the key to it, once.
    #[test]
    fn the_keeper_wraps_a_key_the_chain_misses_and_only_once() {
        let mut f = fixture();
        let mut keyring = Keyring::default();
        let (_, v0) = create(&mut f, &mut keyring);
        let group = v0.group;
        let bob2 = DeviceSecret::generate(&mut f.rng);
        let mut bob_log = f.bob_log.clone();
        let entry = bob_log
            .add_device(&f.bob, bob2.public(), "b2", "test")
            .unwrap();
        bob_log.append(entry).unwrap();
        let keys: Vec<(KeyEpoch, DocKey)> =
            keyring.iter().map(|(_, e, k)| (e, k.clone())).collect();
        let logs = [&f.alice_log, &bob_log];
        let chain = vec![v0.clone()];
        let b2 = bob2.device_id();
        let epoch = keys[0].0;
        assert_eq!(
            key_keeper(&logs, &chain, group, epoch, &bob_log, &b2),
            Some(f.bob.device_id())
        );
        // Alice holds the key too, but she is not the keeper while Bob's first device is.
        let by_alice = missing_wraps(
            &chain,
            group,
            &logs,
            &f.alice.device_id(),
            &keys,
            &mut f.rng,
        )
        .unwrap();
        assert!(by_alice.is_empty());
        let by_bob =
            missing_wraps(&chain, group, &logs, &f.bob.device_id(), &keys, &mut f.rng).unwrap();
        assert_eq!(by_bob.len(), 1);
        assert_eq!(by_bob[0].recipient, b2);
        let v1 = GroupUpdate::sign(
            &f.bob,
            bob_log.account(),
            group,
            1,
            v0.members.clone(),
            by_bob,
            v0.label.clone(),
        )
        .unwrap();
        v1.check_follows(Some(&v0)).unwrap();
        let mut theirs = Keyring::default();
        for k in v1.keys_for(&b2) {
            theirs.absorb(k, &bob2).unwrap();
        }
        assert_eq!(theirs.key(&group, epoch), keyring.key(&group, epoch));
        // Covered now: nothing more to wrap.
        let chain = vec![v0, v1];
        let again =
            missing_wraps(&chain, group, &logs, &f.bob.device_id(), &keys, &mut f.rng).unwrap();
        assert!(again.is_empty());
        // With Bob's first device revoked, the keeper is Alice (the account has no other
        // holder).
        let revoke = bob_log.revoke_device(&bob2, f.bob.device_id()).unwrap();
        bob_log.append(revoke).unwrap();
        let logs = [&f.alice_log, &bob_log];
        let chain = &chain[..1];
        assert_eq!(
            key_keeper(&logs, chain, group, epoch, &bob_log, &b2),
            Some(f.alice.device_id())
        );
    }

    /// Alice removed Carol while Bob's device added Dave at the same version; Alice's change,
    /// refused, is made again on Bob's: Dave stays, Carol goes, a new epoch reaches Dave.
    #[test]
    fn a_refused_change_is_made_again_on_the_winning_chain() {
        let mut f = fixture();
        let mut keyring = Keyring::default();
        let carol = DeviceSecret::generate(&mut f.rng);
        let carol_log = DeviceLog::create(&carol, "c", "test").unwrap();
        let dave = DeviceSecret::generate(&mut f.rng);
        let dave_log = DeviceLog::create(&dave, "d", "test").unwrap();
        let (_, mut v0) = create(&mut f, &mut keyring);
        let group = v0.group;
        let (a, b, c, d) = (
            f.alice_log.account(),
            f.bob_log.account(),
            carol_log.account(),
            dave_log.account(),
        );
        v0 = GroupUpdate::sign(
            &f.alice,
            a,
            group,
            0,
            vec![a, b, c],
            v0.keys.clone(),
            v0.label.clone(),
        )
        .unwrap();
        // Bob's winning v1 adds Dave.
        let bobs_v1 = GroupUpdate::sign(
            &f.bob,
            b,
            group,
            1,
            vec![a, b, c, d],
            Vec::new(),
            v0.label.clone(),
        )
        .unwrap();
        // Alice's refused v1 removes Carol and starts epoch 1.
        let (epoch1, wrapped) = keyring
            .rotate(group, &[f.alice.public(), f.bob.public()], &mut f.rng)
            .unwrap();
        let alices_v1 =
            GroupUpdate::sign(&f.alice, a, group, 1, vec![a, b], wrapped, v0.label.clone())
                .unwrap();
        let keys: Vec<(KeyEpoch, DocKey)> =
            keyring.iter().map(|(_, e, k)| (e, k.clone())).collect();
        let devices = std::collections::BTreeMap::from([
            (a, vec![f.alice.public()]),
            (b, vec![f.bob.public()]),
            (c, vec![carol.public()]),
            (d, vec![dave.public()]),
        ]);
        // Alice's own v1 comes off her chain; Bob's never does.
        let alice_id = f.alice.device_id();
        let mut alices_chain = vec![v0.clone(), alices_v1.clone()];
        let mine = take_off_own(&mut alices_chain, 1, &alice_id).unwrap();
        assert_eq!((mine, alices_chain.len()), (vec![alices_v1.clone()], 1));
        let mut relays_chain = vec![v0.clone(), bobs_v1.clone()];
        assert!(take_off_own(&mut relays_chain, 1, &alice_id).is_none());
        assert!(take_off_own(&mut relays_chain, 2, &alice_id).is_none());
        assert_eq!(relays_chain.len(), 2);
        let chain = vec![v0.clone(), bobs_v1.clone()];
        let again = rebase_changes(
            &[alices_v1],
            &chain,
            &f.alice,
            a,
            &keys,
            &devices,
            &mut f.rng,
        )
        .unwrap();
        assert_eq!(again.len(), 1);
        let v2 = &again[0];
        v2.check_follows(Some(&bobs_v1)).unwrap();
        assert_eq!(v2.version, 2);
        let mut want = vec![a, b, d];
        want.sort();
        assert_eq!(v2.members, want);
        let to = |dev: &DeviceSecret| v2.keys_for(&dev.device_id()).any(|k| k.epoch == epoch1);
        assert!(to(&dave) && to(&f.bob) && to(&f.alice));
        assert!(!to(&carol));
        // A change the winner made already is dropped.
        let same = rebase_changes(
            std::slice::from_ref(&bobs_v1),
            &[v0.clone(), bobs_v1.clone()],
            &f.alice,
            a,
            &keys,
            &devices,
            &mut f.rng,
        )
        .unwrap();
        assert!(same.is_empty());
    }

    #[test]
    fn a_member_opens_keys_and_label() {
        let mut f = fixture();
        let mut keyring = Keyring::default();
        let (addr, update) = create(&mut f, &mut keyring);
        let decoded = GroupUpdate::decode(&update.encode()).unwrap();
        assert_eq!(decoded, update);
        decoded.verify_signature().unwrap();
        decoded.check_follows(None).unwrap();
        let mut bobs = Keyring::default();
        for k in decoded.keys_for(&f.bob.device_id()) {
            bobs.absorb(k, &f.bob).unwrap();
        }
        assert_eq!(decoded.open_label(&bobs).unwrap(), addr);
        assert!(decoded.is_member(&f.bob_log.account()));
    }

    #[test]
    fn tampering_and_wrong_chains_are_refused() {
        let mut f = fixture();
        let mut keyring = Keyring::default();
        let (_, update) = create(&mut f, &mut keyring);
        let mut forged = update.clone();
        forged.members.pop();
        assert!(matches!(
            forged.verify_signature(),
            Err(GroupError::BadSignature(_))
        ));
        let mut skip = update.clone();
        skip.version = 2;
        assert!(matches!(
            skip.check_follows(Some(&update)),
            Err(GroupError::OutOfOrder { expected: 1, .. })
        ));
        // A stranger cannot create a group it is not in, nor change one.
        let stranger = DeviceSecret::generate(&mut f.rng);
        let stranger_log = DeviceLog::create(&stranger, "s", "test").unwrap();
        let next = GroupUpdate::sign(
            &stranger,
            stranger_log.account(),
            update.group,
            1,
            vec![stranger_log.account()],
            vec![],
            update.label.clone(),
        )
        .unwrap();
        assert!(matches!(
            next.check_follows(Some(&update)),
            Err(GroupError::NotMember { .. })
        ));
        // A label copied from another group does not open.
        let other = DocAddr::Meta(ConversationId::from_bytes([8; 16])).doc_id();
        let mut moved = update.clone();
        moved.group = other;
        moved.keys.clear();
        assert!(matches!(
            moved.open_label(&keyring),
            Err(GroupError::MissingLabelKey { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut f = fixture();
        let mut keyring = Keyring::default();
        let (_, update) = create(&mut f, &mut keyring);
        let bytes = update.encode();
        for cut in 0..bytes.len() {
            assert!(GroupUpdate::decode(&bytes[..cut]).is_err());
        }
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            GroupUpdate::decode(&bad),
            Err(GroupError::UnsupportedVersion { version: 9 })
        ));
    }
}
