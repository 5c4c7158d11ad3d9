//! The relay's durable storage: one SQLite file ([`RELAY_DB_FILE`]) in WAL mode holding device
//! logs, access-control groups, documents and the global envelope log.
//!
//! The relay stores opaque bytes plus routing metadata, nothing else: encoded device-log entries,
//! encoded group membership updates, and sealed envelopes with the header fields it routes by
//! (document, author device and account, the author's change range) and their id.
//!
//! **Every 32-byte id is stored once**, in a small table that maps it to an integer row id; the
//! envelope log refers to those integers. Random 32-byte keys scattered through B-tree indexes
//! are what makes an append log slow, so envelopes carry only integers in their indexes: the
//! sequence number is the table's integer primary key, fetches walk an index on (document,
//! sequence) and deduplication uses a unique index on (document, author, first change). The maps
//! from ids to integers are loaded into memory at open.
//!
//! **A write that returned is durable.** Each write method is one transaction; with
//! [`Durability::Full`] (the default) its commit is fsynced before the method returns.
//! [`RelayStore::append_batch`] commits any number of envelopes with one fsync; the
//! [`writer`](super::writer) builds those batches from concurrent requests.
//!
//! One [`RelayStore`] writes a file at a time (it keeps the id maps and the sequence counter in
//! memory). Any number of [`RelayReader`]s read it concurrently on their own connections: WAL lets
//! them read the last commit while the writer writes.
//!
//! ```
//! use roamsync::crypto::envelope::EnvelopeId;
//! use roamsync::ids::{AccountId, DeviceId, DocId};
//! use roamsync::relay::store::{AppendOutcome, NewEnvelope, RelayStore, RelayStoreOptions};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut store = RelayStore::open(dir.path(), RelayStoreOptions::default()).unwrap();
//! let (doc, group) = (DocId::from_bytes([1; 32]), DocId::from_bytes([2; 32]));
//! store.create_doc(&doc, &group).unwrap();
//! let envelope = NewEnvelope {
//!     doc,
//!     id: EnvelopeId([3; 32]),
//!     author: DeviceId::from_bytes([4; 32]),
//!     account: AccountId::from_bytes([5; 32]),
//!     first_seq: 1,
//!     last_seq: 1,
//!     bytes: b"sealed".to_vec(),
//! };
//! let outcomes = store.append_batch(&[envelope.clone(), envelope]).unwrap();
//! assert_eq!(
//!     outcomes,
//!     [AppendOutcome::Stored { seq: 1 }, AppendOutcome::Duplicate { seq: 1 }]
//! );
//! let fetched = store.fetch(&doc, 0, 100, 1 << 20).unwrap();
//! assert_eq!(fetched.items, [(1, b"sealed".to_vec())]);
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};

use crate::crypto::envelope::EnvelopeId;
use crate::ids::{AccountId, DeviceId, DocId};

pub use crate::store::Durability;

mod read;

pub use read::RelayReader;
use read::{device_logs, docs, fetch, groups, max_seq, snapshot, usage};

/// Name of the database file inside the relay's directory.
pub const RELAY_DB_FILE: &str = "relay.sqlite3";

/// Schema version this code writes; older files are migrated on open.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Most envelopes one fetch returns, whatever the caller asks for.
pub const MAX_FETCH_ITEMS: usize = 10_000;

/// How long a connection waits for a lock held by another connection before failing.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

/// The schema, as migrations: entry `i` moves a store from version `i` to `i + 1`. A store is
/// created by running all of them and upgraded by running those past its version.
///
/// Envelopes are never deleted: a document's sequence numbers only grow, and the next sequence
/// number is one past the largest stored. Whatever deletes envelopes one day must keep that
/// high-water mark.
pub const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE accounts (
         id  INTEGER PRIMARY KEY,
         key BLOB NOT NULL UNIQUE
     );
     CREATE TABLE devices (
         id  INTEGER PRIMARY KEY,
         key BLOB NOT NULL UNIQUE
     );
     CREATE TABLE groups (
         id  INTEGER PRIMARY KEY,
         key BLOB NOT NULL UNIQUE
     );
     CREATE TABLE docs (
         id  INTEGER PRIMARY KEY,
         key BLOB NOT NULL UNIQUE,
         grp INTEGER NOT NULL REFERENCES groups(id)
     );
     CREATE TABLE log_entries (
         account INTEGER NOT NULL REFERENCES accounts(id),
         seq     INTEGER NOT NULL,
         data    BLOB NOT NULL,
         PRIMARY KEY (account, seq)
     ) WITHOUT ROWID;
     CREATE TABLE group_updates (
         grp     INTEGER NOT NULL REFERENCES groups(id),
         version INTEGER NOT NULL,
         data    BLOB NOT NULL,
         PRIMARY KEY (grp, version)
     ) WITHOUT ROWID;
     CREATE TABLE envelopes (
         seq       INTEGER PRIMARY KEY,
         doc       INTEGER NOT NULL,
         author    INTEGER NOT NULL,
         account   INTEGER NOT NULL,
         first_seq INTEGER NOT NULL,
         last_seq  INTEGER NOT NULL,
         id        BLOB NOT NULL,
         data      BLOB NOT NULL
     );
     CREATE INDEX envelopes_by_doc ON envelopes (doc, seq);
     CREATE UNIQUE INDEX envelopes_by_author ON envelopes (doc, author, first_seq);
     CREATE TABLE usage (
         account INTEGER PRIMARY KEY REFERENCES accounts(id),
         bytes   INTEGER NOT NULL
     );",
    // 1 -> 2: the latest snapshot of each document per account (the envelope is opaque; only
    // its author's account is ever served it).
    "CREATE TABLE snapshots (
         id      INTEGER PRIMARY KEY,
         doc     INTEGER NOT NULL REFERENCES docs(id),
         account INTEGER NOT NULL REFERENCES accounts(id),
         author  INTEGER NOT NULL REFERENCES devices(id),
         covers  INTEGER NOT NULL,
         data    BLOB NOT NULL
     );
     CREATE UNIQUE INDEX snapshots_by_doc ON snapshots (doc, account);",
];

const INSERT_ACCOUNT: &str = "INSERT INTO accounts (key) VALUES (?1)";
const INSERT_DEVICE: &str = "INSERT INTO devices (key) VALUES (?1)";
const INSERT_GROUP: &str = "INSERT INTO groups (key) VALUES (?1)";
const INSERT_ENVELOPE: &str =
    "INSERT INTO envelopes (seq, doc, author, account, first_seq, last_seq, id, data)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (doc, author, first_seq) DO NOTHING";
const SELECT_BY_AUTHOR: &str =
    "SELECT seq, id FROM envelopes WHERE doc = ?1 AND author = ?2 AND first_seq = ?3";
const PUT_SNAPSHOT: &str = "INSERT INTO snapshots (doc, account, author, covers, data)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (doc, account) DO UPDATE
     SET author = excluded.author, covers = excluded.covers, data = excluded.data
     WHERE excluded.covers > snapshots.covers";
const ADD_USAGE: &str = "INSERT INTO usage (account, bytes) VALUES (?1, ?2)
     ON CONFLICT (account) DO UPDATE SET bytes = bytes + excluded.bytes";

/// Relay store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayStoreError {
    /// The store's directory could not be created.
    #[error("cannot create the relay store directory {dir}: {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A reader was opened where no relay store has been created.
    #[error("no relay store at {path}")]
    Missing {
        /// The database file that does not exist.
        path: PathBuf,
    },
    /// The file is not an SQLite database (truncated or overwritten).
    #[error("not a relay store: {0}")]
    NotADatabase(rusqlite::Error),
    /// SQLite found the database file damaged.
    #[error("relay store file is damaged: {0}")]
    DatabaseCorrupt(rusqlite::Error),
    /// The file was written by a newer version.
    #[error("relay store schema version {found} is newer than the supported {supported}")]
    SchemaTooNew {
        /// The file's version.
        found: i64,
        /// This code's version.
        supported: i64,
    },
    /// A reader found a schema older than this code's: the writer migrates it at open.
    #[error(
        "relay store schema version {found} is older than {expected}; open it for writing to migrate"
    )]
    SchemaTooOld {
        /// The file's version.
        found: i64,
        /// This code's version.
        expected: i64,
    },
    /// A row's content is not what this code wrote.
    #[error("malformed {what} in the relay store")]
    Malformed {
        /// What was being read.
        what: &'static str,
    },
    /// Device-log entries must be appended right after the stored ones.
    #[error(
        "device log of account {account} holds {expected} entries; an append at {found} does not follow"
    )]
    LogSeqMismatch {
        /// The account.
        account: AccountId,
        /// Entries stored: the only acceptable `first_seq`.
        expected: u64,
        /// The `first_seq` given.
        found: u32,
    },
    /// Group updates must be stored in version order without gaps.
    #[error("group {group} holds {expected} updates; version {found} does not follow")]
    GroupVersionMismatch {
        /// The group.
        group: DocId,
        /// Updates stored: the only acceptable version.
        expected: u64,
        /// The version given.
        found: u32,
    },
    /// A document belongs to one group for good.
    #[error("document {doc} belongs to group {existing}, not {requested}")]
    DocInOtherGroup {
        /// The document.
        doc: DocId,
        /// Its group.
        existing: DocId,
        /// The group asked for.
        requested: DocId,
    },
    /// The document was never created.
    #[error("unknown document {doc}")]
    UnknownDoc {
        /// The document.
        doc: DocId,
    },
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for RelayStoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => RelayStoreError::NotADatabase(e),
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => RelayStoreError::DatabaseCorrupt(e),
            _ => RelayStoreError::Sqlite(e),
        }
    }
}

/// Settings of a relay store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStoreOptions {
    /// How hard a commit waits for the disk; [`Durability::Full`] by default.
    pub durability: Durability,
}

/// An envelope to append, with the routing metadata the relay read from its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEnvelope {
    /// The document it belongs to.
    pub doc: DocId,
    /// Its id (the blake3 hash of `bytes`).
    pub id: EnvelopeId,
    /// The author device.
    pub author: DeviceId,
    /// The author's account, charged for the bytes.
    pub account: AccountId,
    /// First of the author's changes it carries.
    pub first_seq: u64,
    /// Last of the author's changes it carries.
    pub last_seq: u64,
    /// The sealed envelope, opaque to the relay.
    pub bytes: Vec<u8>,
}

/// What became of one envelope of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppendOutcome {
    /// Stored under this sequence number.
    Stored {
        /// Its place in the global log.
        seq: u64,
    },
    /// The same envelope was stored before (or earlier in the batch); nothing was written.
    Duplicate {
        /// The sequence number of the stored copy.
        seq: u64,
    },
    /// The author already stored a different envelope starting at the same change of this
    /// document: equivocation. Nothing was written.
    Conflict {
        /// The id of the stored envelope.
        existing: EnvelopeId,
    },
    /// The document was never created ([`RelayStore::create_doc`]); nothing was written.
    UnknownDoc,
}

/// A document snapshot to keep for the devices of one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSnapshot {
    /// The document.
    pub doc: DocId,
    /// The account whose devices may be served it (the author's).
    pub account: AccountId,
    /// The device that sealed it.
    pub author: DeviceId,
    /// The relay sequence number up to which it holds every envelope of the document.
    pub covers: u64,
    /// The sealed snapshot envelope, opaque to the relay.
    pub bytes: Vec<u8>,
}

/// A stored snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The relay sequence number it covers.
    pub covers: u64,
    /// The sealed snapshot envelope.
    pub bytes: Vec<u8>,
}

/// An account's device log: its encoded entries, in order.
pub type DeviceLogRow = (AccountId, Vec<Vec<u8>>);

/// A group's encoded membership updates, in version order.
pub type GroupRow = (DocId, Vec<Vec<u8>>);

/// A stored document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocRow {
    /// The document.
    pub doc: DocId,
    /// The group whose members may read and write it.
    pub group: DocId,
    /// Sequence number of its newest envelope; 0 if it has none.
    pub last_seq: u64,
}

/// A page of a document's envelopes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Sequence numbers and envelopes, in sequence order.
    pub items: Vec<(u64, Vec<u8>)>,
    /// Whether the document has envelopes after the last one returned.
    pub more: bool,
}

struct AccountEntry {
    row: i64,
    log_len: u64,
}

struct GroupEntry {
    row: i64,
    versions: u64,
}

struct DocEntry {
    row: i64,
    group: DocId,
}

/// The relay's store, opened for writing. See the module documentation.
pub struct RelayStore {
    conn: Connection,
    accounts: HashMap<AccountId, AccountEntry>,
    devices: HashMap<DeviceId, i64>,
    groups: HashMap<DocId, GroupEntry>,
    docs: HashMap<DocId, DocEntry>,
    last_seq: u64,
}

impl std::fmt::Debug for RelayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStore")
            .field("docs", &self.docs.len())
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl RelayStore {
    /// Opens or creates the store in `dir` (creating the directory), in WAL mode, migrating its
    /// schema, and loads the id maps.
    pub fn open(dir: &Path, options: RelayStoreOptions) -> Result<Self, RelayStoreError> {
        std::fs::create_dir_all(dir).map_err(|source| RelayStoreError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut conn = connect(&dir.join(RELAY_DB_FILE), true)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match options.durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        let mut store = RelayStore {
            conn,
            accounts: HashMap::new(),
            devices: HashMap::new(),
            groups: HashMap::new(),
            docs: HashMap::new(),
            last_seq: 0,
        };
        store.load()?;
        Ok(store)
    }

    /// Fills the id maps and the sequence counter from the file.
    fn load(&mut self) -> Result<(), RelayStoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, key, (SELECT count(*) FROM log_entries WHERE account = accounts.id)
             FROM accounts",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key = AccountId::from_bytes(key32(r.get(1)?, "account id")?);
            let log_len = count(r.get(2)?)?;
            self.accounts.insert(
                key,
                AccountEntry {
                    row: r.get(0)?,
                    log_len,
                },
            );
        }
        let mut stmt = self.conn.prepare("SELECT id, key FROM devices")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key = DeviceId::from_bytes(key32(r.get(1)?, "device id")?);
            self.devices.insert(key, r.get(0)?);
        }
        let mut stmt = self.conn.prepare(
            "SELECT id, key, (SELECT count(*) FROM group_updates WHERE grp = groups.id)
             FROM groups",
        )?;
        let mut rows = stmt.query([])?;
        let mut group_keys = HashMap::new();
        while let Some(r) = rows.next()? {
            let row: i64 = r.get(0)?;
            let key = DocId::from_bytes(key32(r.get(1)?, "group id")?);
            let versions = count(r.get(2)?)?;
            group_keys.insert(row, key);
            self.groups.insert(key, GroupEntry { row, versions });
        }
        let mut stmt = self.conn.prepare("SELECT id, key, grp FROM docs")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key = DocId::from_bytes(key32(r.get(1)?, "document id")?);
            let grp: i64 = r.get(2)?;
            let group = *group_keys.get(&grp).ok_or(RelayStoreError::Malformed {
                what: "document group",
            })?;
            self.docs.insert(
                key,
                DocEntry {
                    row: r.get(0)?,
                    group,
                },
            );
        }
        self.last_seq = max_seq(&self.conn)?;
        Ok(())
    }

    fn begin(&mut self) -> Result<Transaction<'_>, RelayStoreError> {
        // Immediate: take the write lock at the start, so a transaction never has to upgrade
        // a read snapshot that another writer made stale.
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// Every account's device log (encoded entries, in order), for loading at start.
    pub fn device_logs(&self) -> Result<Vec<DeviceLogRow>, RelayStoreError> {
        device_logs(&self.conn)
    }

    /// Appends entries to an account's device log in one transaction. `first_seq` must be the
    /// number of entries stored so far.
    pub fn append_log_entries(
        &mut self,
        account: &AccountId,
        first_seq: u32,
        entries: &[Vec<u8>],
    ) -> Result<(), RelayStoreError> {
        let expected = self.accounts.get(account).map_or(0, |a| a.log_len);
        if u64::from(first_seq) != expected {
            return Err(RelayStoreError::LogSeqMismatch {
                account: *account,
                expected,
                found: first_seq,
            });
        }
        if entries.is_empty() {
            return Ok(());
        }
        let known = self.accounts.get(account).map(|a| a.row);
        let tx = self.begin()?;
        let row = match known {
            Some(row) => row,
            None => insert_key(&tx, INSERT_ACCOUNT, account.as_bytes())?,
        };
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO log_entries (account, seq, data) VALUES (?1, ?2, ?3)",
            )?;
            for (seq, entry) in (expected..).zip(entries) {
                stmt.execute(params![row, seq as i64, entry])?;
            }
        }
        tx.commit()?;
        let entry = self
            .accounts
            .entry(*account)
            .or_insert(AccountEntry { row, log_len: 0 });
        entry.log_len += entries.len() as u64;
        Ok(())
    }

    /// Every group's membership updates (encoded, in version order). A group that documents
    /// name but that has no update yet comes with an empty list.
    pub fn groups(&self) -> Result<Vec<GroupRow>, RelayStoreError> {
        groups(&self.conn)
    }

    /// Stores a group's membership update. `version` must be the number of updates stored so
    /// far.
    pub fn put_group_update(
        &mut self,
        group: &DocId,
        version: u32,
        update: &[u8],
    ) -> Result<(), RelayStoreError> {
        let expected = self.groups.get(group).map_or(0, |g| g.versions);
        if u64::from(version) != expected {
            return Err(RelayStoreError::GroupVersionMismatch {
                group: *group,
                expected,
                found: version,
            });
        }
        let known = self.groups.get(group).map(|g| g.row);
        let tx = self.begin()?;
        let row = match known {
            Some(row) => row,
            None => insert_key(&tx, INSERT_GROUP, group.as_bytes())?,
        };
        tx.prepare_cached("INSERT INTO group_updates (grp, version, data) VALUES (?1, ?2, ?3)")?
            .execute(params![row, i64::from(version), update])?;
        tx.commit()?;
        self.groups
            .entry(*group)
            .or_insert(GroupEntry { row, versions: 0 })
            .versions += 1;
        Ok(())
    }

    /// Every document with its group and newest sequence number.
    pub fn docs(&self) -> Result<Vec<DocRow>, RelayStoreError> {
        docs(&self.conn)
    }

    /// Creates a document in a group. Creating it again in the same group does nothing; in
    /// another group it is refused.
    pub fn create_doc(&mut self, doc: &DocId, group: &DocId) -> Result<(), RelayStoreError> {
        if let Some(existing) = self.docs.get(doc) {
            if existing.group == *group {
                return Ok(());
            }
            return Err(RelayStoreError::DocInOtherGroup {
                doc: *doc,
                existing: existing.group,
                requested: *group,
            });
        }
        let known = self.groups.get(group).map(|g| g.row);
        let tx = self.begin()?;
        let group_row = match known {
            Some(row) => row,
            None => insert_key(&tx, INSERT_GROUP, group.as_bytes())?,
        };
        tx.prepare_cached("INSERT INTO docs (key, grp) VALUES (?1, ?2)")?
            .execute(params![&doc.as_bytes()[..], group_row])?;
        let doc_row = tx.last_insert_rowid();
        tx.commit()?;
        self.groups.entry(*group).or_insert(GroupEntry {
            row: group_row,
            versions: 0,
        });
        self.docs.insert(
            *doc,
            DocEntry {
                row: doc_row,
                group: *group,
            },
        );
        Ok(())
    }

    /// Appends envelopes in one transaction with one commit (one fsync under
    /// [`Durability::Full`]). Returns one outcome per envelope, in order; an envelope that is a
    /// duplicate, a conflict or for an unknown document does not fail the others. When this
    /// returns `Ok`, every [`AppendOutcome::Stored`] is durable; on `Err` nothing was written.
    ///
    /// An envelope's id is a hash over its header, which names document, author and first
    /// change, so a stored envelope with the same (document, author, first change) is either the
    /// same envelope (same id: a duplicate) or an equivocation (another id: a conflict).
    pub fn append_batch(
        &mut self,
        batch: &[NewEnvelope],
    ) -> Result<Vec<AppendOutcome>, RelayStoreError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // Ids first seen in this batch get their rows inside the transaction; the maps learn
        // them only once it committed.
        let mut new_devices: HashMap<DeviceId, i64> = HashMap::new();
        let mut new_accounts: HashMap<AccountId, i64> = HashMap::new();
        let mut usage: HashMap<i64, u64> = HashMap::new();
        let mut next_seq = self.last_seq;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(INSERT_ENVELOPE)?;
            let mut existing = tx.prepare_cached(SELECT_BY_AUTHOR)?;
            for env in batch {
                let Some(doc) = self.docs.get(&env.doc) else {
                    outcomes.push(AppendOutcome::UnknownDoc);
                    continue;
                };
                let author = match self.devices.get(&env.author) {
                    Some(row) => *row,
                    None => match new_devices.get(&env.author) {
                        Some(row) => *row,
                        None => {
                            let row = insert_key(&tx, INSERT_DEVICE, env.author.as_bytes())?;
                            new_devices.insert(env.author, row);
                            row
                        }
                    },
                };
                let account = match self.accounts.get(&env.account) {
                    Some(a) => a.row,
                    None => match new_accounts.get(&env.account) {
                        Some(row) => *row,
                        None => {
                            let row = insert_key(&tx, INSERT_ACCOUNT, env.account.as_bytes())?;
                            new_accounts.insert(env.account, row);
                            row
                        }
                    },
                };
                let seq = next_seq + 1;
                // Change numbers are stored bit for bit as SQLite's signed integers; only their
                // equality matters here.
                let (first, last) = (env.first_seq as i64, env.last_seq as i64);
                let inserted = insert.execute(params![
                    seq as i64,
                    doc.row,
                    author,
                    account,
                    first,
                    last,
                    &env.id.0[..],
                    &env.bytes,
                ])?;
                if inserted == 1 {
                    next_seq = seq;
                    *usage.entry(account).or_default() += env.bytes.len() as u64;
                    outcomes.push(AppendOutcome::Stored { seq });
                    continue;
                }
                let (stored_seq, stored_id): (i64, Vec<u8>) = existing
                    .query_row(params![doc.row, author, first], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                let stored_id = EnvelopeId(key32(stored_id, "envelope id")?);
                outcomes.push(if stored_id == env.id {
                    AppendOutcome::Duplicate {
                        seq: seq_u64(stored_seq)?,
                    }
                } else {
                    AppendOutcome::Conflict {
                        existing: stored_id,
                    }
                });
            }
            let mut add_usage = tx.prepare_cached(ADD_USAGE)?;
            for (account, bytes) in &usage {
                add_usage.execute(params![account, *bytes as i64])?;
            }
        }
        tx.commit()?;
        self.last_seq = next_seq;
        self.devices.extend(new_devices);
        for (account, row) in new_accounts {
            self.accounts
                .insert(account, AccountEntry { row, log_len: 0 });
        }
        Ok(outcomes)
    }

    /// Keeps `snapshot` as the document's snapshot for its account, unless a snapshot that
    /// covers as much or more is stored. Returns whether it was stored. One transaction,
    /// durable when this returns.
    pub fn put_snapshot(&mut self, snapshot: &NewSnapshot) -> Result<bool, RelayStoreError> {
        let doc = self
            .docs
            .get(&snapshot.doc)
            .ok_or(RelayStoreError::UnknownDoc { doc: snapshot.doc })?
            .row;
        let covers = i64::try_from(snapshot.covers).map_err(|_| RelayStoreError::Malformed {
            what: "snapshot sequence number",
        })?;
        let known_device = self.devices.get(&snapshot.author).copied();
        let known_account = self.accounts.get(&snapshot.account).map(|a| a.row);
        let tx = self.begin()?;
        let author = match known_device {
            Some(row) => row,
            None => insert_key(&tx, INSERT_DEVICE, snapshot.author.as_bytes())?,
        };
        let account = match known_account {
            Some(row) => row,
            None => insert_key(&tx, INSERT_ACCOUNT, snapshot.account.as_bytes())?,
        };
        let stored = tx.prepare_cached(PUT_SNAPSHOT)?.execute(params![
            doc,
            account,
            author,
            covers,
            &snapshot.bytes
        ])? == 1;
        tx.commit()?;
        self.devices.insert(snapshot.author, author);
        self.accounts
            .entry(snapshot.account)
            .or_insert(AccountEntry {
                row: account,
                log_len: 0,
            });
        Ok(stored)
    }

    /// The snapshot of `doc` kept for `account`, if any.
    pub fn snapshot(
        &self,
        doc: &DocId,
        account: &AccountId,
    ) -> Result<Option<StoredSnapshot>, RelayStoreError> {
        snapshot(&self.conn, doc, account)
    }

    /// A document's envelopes after `after_seq`, in order: at most `max_items` (clamped to
    /// 1..=[`MAX_FETCH_ITEMS`]) and at most `max_bytes` of envelopes, except that the first
    /// envelope is returned even if it alone is larger.
    pub fn fetch(
        &self,
        doc: &DocId,
        after_seq: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Fetched, RelayStoreError> {
        let entry = self
            .docs
            .get(doc)
            .ok_or(RelayStoreError::UnknownDoc { doc: *doc })?;
        fetch(&self.conn, entry.row, after_seq, max_items, max_bytes)
    }

    /// Bytes of stored envelopes per author account, for quotas.
    pub fn usage(&self) -> Result<Vec<(AccountId, u64)>, RelayStoreError> {
        usage(&self.conn)
    }

    /// Sequence number of the newest envelope; 0 if there is none.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

fn connect(path: &Path, create: bool) -> Result<Connection, RelayStoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
    Ok(conn)
}

fn user_version(conn: &Connection) -> Result<i64, RelayStoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

fn migrate(conn: &mut Connection) -> Result<(), RelayStoreError> {
    let found = user_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(RelayStoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Inserts a 32-byte id into one of the id tables and returns its row.
fn insert_key(tx: &Transaction<'_>, sql: &str, key: &[u8; 32]) -> Result<i64, RelayStoreError> {
    tx.prepare_cached(sql)?.execute(params![&key[..]])?;
    Ok(tx.last_insert_rowid())
}

fn key32(bytes: Vec<u8>, what: &'static str) -> Result<[u8; 32], RelayStoreError> {
    bytes
        .try_into()
        .map_err(|_| RelayStoreError::Malformed { what })
}

fn seq_u64(seq: i64) -> Result<u64, RelayStoreError> {
    u64::try_from(seq).map_err(|_| RelayStoreError::Malformed {
        what: "sequence number",
    })
}

fn count(n: i64) -> Result<u64, RelayStoreError> {
    u64::try_from(n).map_err(|_| RelayStoreError::Malformed { what: "row count" })
}

#[cfg(test)]
mod tests;
