//! What the engine keeps beside the replica, and how it is stored: known device logs of other
//! accounts, group chains, how far this device's changes were sealed into the outbox.
//!
//! These live in the device store's settings table (sealed at rest like everything else):
//! `logs` and `groups` are whole-list blobs rewritten on change (both are small and change
//! rarely), `sealed/<doc id>` is one row per document (it changes on every send).

use std::collections::HashMap;

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::group::GroupUpdate;
use crate::ids::{AccountId, DocAddr, DocId};
use crate::store::db::{Store, StoreError};
use crate::wire::codec::{Reader, Writer};

const LOGS: &str = "logs";
const GROUPS: &str = "groups";
/// Most bytes of one stored group chain or log list entry.
const MAX_STORED_ITEM_BYTES: usize = 64 * 1024 * 1024;

/// A group's chain as this device knows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    /// The group's document, once its label opened.
    pub addr: Option<DocAddr>,
    /// Updates in version order, each verified.
    pub updates: Vec<GroupUpdate>,
}

impl Group {
    /// The latest version, if any.
    pub fn latest(&self) -> Option<&GroupUpdate> {
        self.updates.last()
    }

    /// Whether `account` was a member at some version: its envelopes from that time stay
    /// readable history.
    pub fn ever_member(&self, account: &AccountId) -> bool {
        self.updates.iter().any(|u| u.is_member(account))
    }
}

fn malformed(what: &'static str) -> StoreError {
    StoreError::Malformed { what }
}

/// Reads the device logs of other accounts.
pub(crate) fn load_logs(store: &Store) -> Result<HashMap<AccountId, DeviceLog>, StoreError> {
    let mut out = HashMap::new();
    let Some(bytes) = store.setting(LOGS)? else {
        return Ok(out);
    };
    let mut r = Reader::new(&bytes);
    let n = r.u32().map_err(|_| malformed("logs"))?;
    for _ in 0..n {
        let account = AccountId::from_bytes(r.array().map_err(|_| malformed("logs"))?);
        let entries: Vec<DeviceLogEntry> = DeviceLog::decode_entries(
            r.bytes_u32("log", MAX_STORED_ITEM_BYTES)
                .map_err(|_| malformed("logs"))?,
        )
        .map_err(|_| malformed("logs"))?;
        let log = DeviceLog::verify(&account, entries).map_err(|_| malformed("logs"))?;
        out.insert(account, log);
    }
    Ok(out)
}

/// Encodes the device logs of other accounts for [`save_logs`].
pub(crate) fn encode_logs(logs: &HashMap<AccountId, DeviceLog>) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(logs.len() as u32);
    for (account, log) in logs {
        w.put(account.as_bytes())
            .bytes_u32(&DeviceLog::encode_entries(log.entries()));
    }
    w.into_bytes()
}

/// Reads the group chains.
pub(crate) fn load_groups(store: &Store) -> Result<HashMap<DocId, Group>, StoreError> {
    let mut out = HashMap::new();
    let Some(bytes) = store.setting(GROUPS)? else {
        return Ok(out);
    };
    let bad = || malformed("groups");
    let mut r = Reader::new(&bytes);
    let n = r.u32().map_err(|_| bad())?;
    for _ in 0..n {
        let id = DocId::from_bytes(r.array().map_err(|_| bad())?);
        let addr = match r.u8().map_err(|_| bad())? {
            0 => None,
            _ => {
                let raw = r.bytes_u32("addr", 64).map_err(|_| bad())?;
                Some(DocAddr::decode_prefix(raw).map_err(|_| bad())?.0)
            }
        };
        let count = r.u32().map_err(|_| bad())?;
        let mut updates = Vec::new();
        for _ in 0..count {
            let raw = r
                .bytes_u32("update", MAX_STORED_ITEM_BYTES)
                .map_err(|_| bad())?;
            updates.push(GroupUpdate::decode(raw).map_err(|_| bad())?);
        }
        out.insert(id, Group { addr, updates });
    }
    Ok(out)
}

/// Encodes the group chains for the `groups` setting.
pub(crate) fn encode_groups(groups: &HashMap<DocId, Group>) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(groups.len() as u32);
    for (id, g) in groups {
        w.put(id.as_bytes());
        match &g.addr {
            None => {
                w.u8(0);
            }
            Some(addr) => {
                let mut raw = Vec::new();
                addr.encode_into(&mut raw);
                w.u8(1).bytes_u32(&raw);
            }
        }
        w.u32(g.updates.len() as u32);
        for u in &g.updates {
            w.bytes_u32(&u.encode());
        }
    }
    w.into_bytes()
}

/// The settings names of the two blobs.
pub(crate) const LOGS_SETTING: &str = LOGS;
/// See [`LOGS_SETTING`].
pub(crate) const GROUPS_SETTING: &str = GROUPS;

/// The setting that records how far this device's changes to `doc` are sealed.
pub(crate) fn sealed_setting(doc: &DocId) -> String {
    format!("sealed/{doc}")
}

/// Reads how far this device's changes to `doc` are sealed into the outbox.
pub(crate) fn load_sealed(store: &Store, doc: &DocId) -> Result<u64, StoreError> {
    match store.setting(&sealed_setting(doc))? {
        None => Ok(0),
        Some(bytes) => {
            let b: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| malformed("sealed"))?;
            Ok(u64::from_be_bytes(b))
        }
    }
}
