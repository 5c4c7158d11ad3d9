//! Reading the relay store: [`RelayReader`], a connection of its own for fetches, and the
//! queries it shares with [`RelayStore`](super::RelayStore).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    DeviceLogRow, DocRow, Fetched, GroupRow, MAX_FETCH_ITEMS, RELAY_DB_FILE, RelayStoreError,
    SCHEMA_VERSION, StoredSnapshot, connect, key32, seq_u64, user_version,
};
use crate::ids::{AccountId, DocId};

/// A read-only view of a relay store on its own connection: it reads the last commit and never
/// waits for the writer (WAL).
pub struct RelayReader {
    conn: Connection,
}

impl std::fmt::Debug for RelayReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayReader").finish_non_exhaustive()
    }
}

impl RelayReader {
    /// Opens the store in `dir`, which a [`RelayStore`](super::RelayStore) must have created (and migrated).
    pub fn open(dir: &Path) -> Result<Self, RelayStoreError> {
        let path = dir.join(RELAY_DB_FILE);
        if !path.exists() {
            return Err(RelayStoreError::Missing { path });
        }
        let conn = connect(&path, false)?;
        conn.pragma_update(None, "query_only", "ON")?;
        let found = user_version(&conn)?;
        if found > SCHEMA_VERSION {
            return Err(RelayStoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            return Err(RelayStoreError::SchemaTooOld {
                found,
                expected: SCHEMA_VERSION,
            });
        }
        Ok(RelayReader { conn })
    }

    /// See [`RelayStore::fetch`](super::RelayStore::fetch).
    pub fn fetch(
        &self,
        doc: &DocId,
        after_seq: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Fetched, RelayStoreError> {
        let row: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM docs WHERE key = ?1")?
            .query_row(params![&doc.as_bytes()[..]], |r| r.get(0))
            .optional()?;
        let row = row.ok_or(RelayStoreError::UnknownDoc { doc: *doc })?;
        fetch(&self.conn, row, after_seq, max_items, max_bytes)
    }

    /// See [`RelayStore::snapshot`](super::RelayStore::snapshot).
    pub fn snapshot(
        &self,
        doc: &DocId,
        account: &AccountId,
    ) -> Result<Option<StoredSnapshot>, RelayStoreError> {
        snapshot(&self.conn, doc, account)
    }

    /// See [`RelayStore::device_logs`](super::RelayStore::device_logs).
    pub fn device_logs(&self) -> Result<Vec<DeviceLogRow>, RelayStoreError> {
        device_logs(&self.conn)
    }

    /// See [`RelayStore::groups`](super::RelayStore::groups).
    pub fn groups(&self) -> Result<Vec<GroupRow>, RelayStoreError> {
        groups(&self.conn)
    }

    /// See [`RelayStore::docs`](super::RelayStore::docs).
    pub fn docs(&self) -> Result<Vec<DocRow>, RelayStoreError> {
        docs(&self.conn)
    }

    /// See [`RelayStore::usage`](super::RelayStore::usage).
    pub fn usage(&self) -> Result<Vec<(AccountId, u64)>, RelayStoreError> {
        usage(&self.conn)
    }

    /// Sequence number of the newest committed envelope; 0 if there is none.
    pub fn last_seq(&self) -> Result<u64, RelayStoreError> {
        max_seq(&self.conn)
    }
}

pub(super) fn max_seq(conn: &Connection) -> Result<u64, RelayStoreError> {
    seq_u64(
        conn.query_row("SELECT coalesce(max(seq), 0) FROM envelopes", [], |r| {
            r.get(0)
        })?,
    )
}

pub(super) fn fetch(
    conn: &Connection,
    doc_row: i64,
    after_seq: u64,
    max_items: usize,
    max_bytes: usize,
) -> Result<Fetched, RelayStoreError> {
    let limit = max_items.clamp(1, MAX_FETCH_ITEMS);
    // Nothing is stored past i64::MAX, so a larger cursor is simply past the end.
    let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT seq, data FROM envelopes WHERE doc = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    // One row more than asked for tells whether there is more.
    let mut rows = stmt.query(params![doc_row, after, limit as i64 + 1])?;
    let mut out = Fetched::default();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let seq = seq_u64(r.get(0)?)?;
        let data = r
            .get_ref(1)?
            .as_blob()
            .map_err(|_| RelayStoreError::Malformed { what: "envelope" })?;
        let over_budget = !out.items.is_empty() && bytes.saturating_add(data.len()) > max_bytes;
        if out.items.len() == limit || over_budget {
            out.more = true;
            break;
        }
        bytes += data.len();
        out.items.push((seq, data.to_vec()));
    }
    Ok(out)
}

pub(super) fn snapshot(
    conn: &Connection,
    doc: &DocId,
    account: &AccountId,
) -> Result<Option<StoredSnapshot>, RelayStoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT snapshots.covers, snapshots.data FROM snapshots
             JOIN docs ON docs.id = snapshots.doc
             JOIN accounts ON accounts.id = snapshots.account
             WHERE docs.key = ?1 AND accounts.key = ?2",
        )?
        .query_row(params![&doc.as_bytes()[..], &account.as_bytes()[..]], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    row.map(|(covers, bytes)| {
        Ok(StoredSnapshot {
            covers: seq_u64(covers)?,
            bytes,
        })
    })
    .transpose()
}

pub(super) fn device_logs(conn: &Connection) -> Result<Vec<DeviceLogRow>, RelayStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT accounts.key, log_entries.data FROM log_entries
         JOIN accounts ON accounts.id = log_entries.account
         ORDER BY log_entries.account, log_entries.seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut out: Vec<DeviceLogRow> = Vec::new();
    while let Some(r) = rows.next()? {
        let account = AccountId::from_bytes(key32(r.get(0)?, "account id")?);
        let data: Vec<u8> = r.get(1)?;
        match out.last_mut() {
            Some((last, entries)) if *last == account => entries.push(data),
            _ => out.push((account, vec![data])),
        }
    }
    Ok(out)
}

pub(super) fn groups(conn: &Connection) -> Result<Vec<GroupRow>, RelayStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT groups.key, group_updates.data FROM groups
         LEFT JOIN group_updates ON group_updates.grp = groups.id
         ORDER BY groups.id, group_updates.version",
    )?;
    let mut rows = stmt.query([])?;
    let mut out: Vec<GroupRow> = Vec::new();
    while let Some(r) = rows.next()? {
        let group = DocId::from_bytes(key32(r.get(0)?, "group id")?);
        let data: Option<Vec<u8>> = r.get(1)?;
        if !matches!(out.last(), Some((last, _)) if *last == group) {
            out.push((group, Vec::new()));
        }
        if let (Some(data), Some((_, updates))) = (data, out.last_mut()) {
            updates.push(data);
        }
    }
    Ok(out)
}

pub(super) fn docs(conn: &Connection) -> Result<Vec<DocRow>, RelayStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT docs.key, groups.key,
                coalesce((SELECT max(seq) FROM envelopes WHERE envelopes.doc = docs.id), 0)
         FROM docs JOIN groups ON groups.id = docs.grp
         ORDER BY docs.id",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(DocRow {
            doc: DocId::from_bytes(key32(r.get(0)?, "document id")?),
            group: DocId::from_bytes(key32(r.get(1)?, "group id")?),
            last_seq: seq_u64(r.get(2)?)?,
        });
    }
    Ok(out)
}

pub(super) fn usage(conn: &Connection) -> Result<Vec<(AccountId, u64)>, RelayStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT accounts.key, usage.bytes FROM usage
         JOIN accounts ON accounts.id = usage.account
         ORDER BY usage.account",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let account = AccountId::from_bytes(key32(r.get(0)?, "account id")?);
        let bytes = u64::try_from(r.get::<_, i64>(1)?)
            .map_err(|_| RelayStoreError::Malformed { what: "usage" })?;
        out.push((account, bytes));
    }
    Ok(out)
}
