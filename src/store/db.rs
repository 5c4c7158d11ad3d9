//! The SQLite device store: documents as a snapshot plus incremental change chunks, conversation
//! summaries, sync bookkeeping and key material — every content blob sealed (see [`super::seal`]).
//!
//! One connection, one writer. Every write goes through [`Store::write`], one SQLite transaction,
//! so a caller batches as much as it likes into one commit. With [`Durability::Full`] (the default)
//! a commit is on disk (WAL + fsync) when `write` returns.
//!
//! Rows are found by keyed hashes ([`Sealer::lookup`]) of document addresses and conversation ids,
//! never by the ids themselves, and the associated data of every sealed blob names its row, so a
//! blob moved to another row fails to open.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use zeroize::{Zeroize, Zeroizing};

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch};
use crate::ids::{ConversationId, DeviceId, DocAddr, DocAddrError, DocId};
use crate::store::seal::{SealError, Sealer, StorageKey};

/// Schema version this code writes; older files are migrated on open.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Change chunks of one document after which [`Store::needs_compaction`] says yes.
pub const COMPACT_AFTER_CHUNKS: u64 = 256;

const KEY_CHECK_PLAINTEXT: &[u8] = b"roamsync storage key check v1";

/// The schema, as migrations: entry `i` moves a store from version `i` to `i + 1`. A store is
/// created by running all of them and upgraded by running those past its version.
pub const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE settings (
         name  TEXT PRIMARY KEY,
         value BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE docs (
         id       INTEGER PRIMARY KEY,
         lookup   BLOB NOT NULL UNIQUE,
         conv     BLOB,
         addr     BLOB NOT NULL,
         snapshot BLOB,
         evicted  INTEGER NOT NULL DEFAULT 0,
         info     BLOB,
         pending  BLOB
     );
     CREATE INDEX docs_by_conv ON docs(conv);
     CREATE TABLE chunks (
         doc  INTEGER NOT NULL REFERENCES docs(id),
         seq  INTEGER NOT NULL,
         data BLOB NOT NULL,
         PRIMARY KEY (doc, seq)
     ) WITHOUT ROWID;
     CREATE TABLE summaries (
         conv BLOB PRIMARY KEY,
         data BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE outbox (
         id   INTEGER PRIMARY KEY,
         data BLOB NOT NULL
     );
     CREATE TABLE received (
         id   INTEGER PRIMARY KEY,
         data BLOB NOT NULL
     );
     CREATE TABLE cursors (
         relay BLOB NOT NULL,
         doc   BLOB NOT NULL,
         seq   INTEGER NOT NULL,
         PRIMARY KEY (relay, doc)
     ) WITHOUT ROWID;",
    // 1 -> 2: document keys, one row per (document, epoch).
    "CREATE TABLE doc_keys (
         doc   BLOB NOT NULL,
         epoch INTEGER NOT NULL,
         key   BLOB NOT NULL,
         PRIMARY KEY (doc, epoch)
     ) WITHOUT ROWID;",
    // 2 -> 3: each document's version vector, so a sync can start without loading documents.
    "ALTER TABLE docs ADD COLUMN vv BLOB;",
    // 3 -> 4: sealed envelopes kept to serve devices met directly, one row per (document,
    // author device, first change). The author is a keyed lookup; the range is in the clear so
    // that "what comes after n" is an index scan.
    "CREATE TABLE archive (
         doc    BLOB NOT NULL,
         author BLOB NOT NULL,
         first  INTEGER NOT NULL,
         last   INTEGER NOT NULL,
         data   BLOB NOT NULL,
         PRIMARY KEY (doc, author, first)
     ) WITHOUT ROWID;",
];

/// How hard a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// fsync on every commit: a write that returned survives power loss.
    #[default]
    Full,
    /// fsync at WAL checkpoints only: a write that returned survives a crash of the process, not
    /// of the machine. For tests and benchmarks that say so.
    Normal,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage key does not open this store.
    #[error("the storage key does not open this store")]
    WrongStorageKey,
    /// A sealed blob failed to open although the key is right: the file is corrupted.
    #[error("corrupted {what}: {source}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        source: SealError,
    },
    /// A row's content is not what this code wrote.
    #[error("malformed {what}")]
    Malformed {
        /// What was being read.
        what: &'static str,
    },
    /// The file is not an SQLite database (truncated or overwritten).
    #[error("not a roamsync store: {0}")]
    NotADatabase(rusqlite::Error),
    /// SQLite found the database file damaged (truncated or overwritten pages).
    #[error("store file is damaged: {0}")]
    DatabaseCorrupt(rusqlite::Error),
    /// The file was written by a newer version.
    #[error("store schema version {found} is newer than the supported {supported}")]
    SchemaTooNew {
        /// The file's version.
        found: i64,
        /// This code's version.
        supported: i64,
    },
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => StoreError::NotADatabase(e),
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => StoreError::DatabaseCorrupt(e),
            _ => StoreError::Sqlite(e),
        }
    }
}

impl From<DocAddrError> for StoreError {
    fn from(_: DocAddrError) -> Self {
        StoreError::Malformed {
            what: "document address",
        }
    }
}

/// A stored segment of a conversation: its number and recorded info, if any.
pub type SegmentRow = (u32, Option<Vec<u8>>);

/// A stored document's address, bytes of content and recorded info.
pub type DocSize = (DocAddr, u64, Option<Vec<u8>>);

/// A stored document: its address and recorded info, if any.
type DocRow = (DocAddr, Option<Vec<u8>>);

/// Everything stored about one document, opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// The last snapshot (`Automerge::save` output), if any.
    pub snapshot: Option<Vec<u8>>,
    /// Change chunks written after the snapshot, in order.
    pub chunks: Vec<Vec<u8>>,
    /// Whether the document was evicted from the disk budget and must be fetched again.
    pub evicted: bool,
    /// Remote changes that were waiting for dependencies (an encoded change batch).
    pub pending: Option<Vec<u8>>,
}

/// The device store.
pub struct Store {
    conn: Connection,
    sealer: Sealer,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, migrating its schema, and checks the storage key.
    pub fn open(
        path: &Path,
        key: &StorageKey,
        durability: Durability,
    ) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Full => "FULL",
                Durability::Normal => "NORMAL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store {
            conn,
            sealer: Sealer::new(key),
        };
        store.migrate()?;
        store.check_key()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", from as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// A new store records a sealed check value; an existing one must open it.
    fn check_key(&mut self) -> Result<(), StoreError> {
        let aad = b"settings/key_check";
        let existing: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM settings WHERE name = 'key_check'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            None => {
                let sealed = self.sealer.seal(aad, KEY_CHECK_PLAINTEXT);
                self.conn.execute(
                    "INSERT INTO settings (name, value) VALUES ('key_check', ?1)",
                    params![sealed],
                )?;
                Ok(())
            }
            Some(sealed) => match self.sealer.open(aad, &sealed) {
                Ok(p) if p == KEY_CHECK_PLAINTEXT => Ok(()),
                Ok(_) => Err(StoreError::Malformed { what: "key check" }),
                Err(SealError::Unauthentic) => Err(StoreError::WrongStorageKey),
                Err(source) => Err(StoreError::Corrupt {
                    what: "key check",
                    source,
                }),
            },
        }
    }

    /// Runs `f` in one transaction: all of its writes commit together, durably, or none do.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&mut StoreTx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let mut stx = StoreTx {
            tx,
            sealer: &self.sealer,
        };
        let out = f(&mut stx)?;
        stx.tx.commit()?;
        Ok(out)
    }

    /// Whether a document was evicted from the disk budget (without reading its content).
    pub fn is_evicted(&self, addr: &DocAddr) -> Result<bool, StoreError> {
        let lookup = doc_lookup(&self.sealer, addr);
        let evicted: Option<bool> = self
            .conn
            .prepare_cached("SELECT evicted FROM docs WHERE lookup = ?1")?
            .query_row(params![lookup], |r| r.get(0))
            .optional()?;
        Ok(evicted.unwrap_or(false))
    }

    /// Reads a document: its snapshot and the chunks after it. `None` if never stored.
    pub fn load_doc(&self, addr: &DocAddr) -> Result<Option<StoredDoc>, StoreError> {
        let lookup = doc_lookup(&self.sealer, addr);
        type Row = (i64, Option<Vec<u8>>, bool, Option<Vec<u8>>);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT id, snapshot, evicted, pending FROM docs WHERE lookup = ?1",
                params![lookup],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, snapshot, evicted, pending)) = row else {
            return Ok(None);
        };
        let pending = pending
            .map(|p| open(&self.sealer, "pending changes", &pending_aad(&lookup), &p))
            .transpose()?;
        let snapshot = snapshot
            .map(|s| {
                open(
                    &self.sealer,
                    "document snapshot",
                    &snapshot_aad(&lookup),
                    &s,
                )
            })
            .transpose()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, data FROM chunks WHERE doc = ?1 ORDER BY seq")?;
        let mut chunks = Vec::new();
        let mut rows = stmt.query(params![id])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let data: Vec<u8> = r.get(1)?;
            chunks.push(open(
                &self.sealer,
                "change chunk",
                &chunk_aad(&lookup, seq),
                &data,
            )?);
        }
        Ok(Some(StoredDoc {
            snapshot,
            chunks,
            evicted,
            pending,
        }))
    }

    /// Stored documents (of one conversation, or all), with their lookup key and sealed info.
    fn doc_rows(&self, conv: Option<[u8; 32]>) -> Result<Vec<DocRow>, StoreError> {
        let mut stmt = match conv {
            Some(_) => self
                .conn
                .prepare_cached("SELECT lookup, addr, info FROM docs WHERE conv = ?1")?,
            None => self
                .conn
                .prepare_cached("SELECT lookup, addr, info FROM docs")?,
        };
        let mut rows = match conv {
            Some(c) => stmt.query(params![c])?,
            None => stmt.query([])?,
        };
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let lookup: Vec<u8> = r.get(0)?;
            let sealed: Vec<u8> = r.get(1)?;
            let info: Option<Vec<u8>> = r.get(2)?;
            let addr = open_addr(&self.sealer, &lookup, &sealed)?;
            let info = info
                .map(|i| open(&self.sealer, "document info", &info_aad(&lookup), &i))
                .transpose()?;
            out.push((addr, info));
        }
        out.sort();
        Ok(out)
    }

    /// Addresses of every stored document of a conversation.
    pub fn conversation_docs(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<DocAddr>, StoreError> {
        let conv = conv_lookup(&self.sealer, conversation);
        Ok(self
            .doc_rows(Some(conv))?
            .into_iter()
            .map(|(a, _)| a)
            .collect())
    }

    /// Stored segment documents of a conversation with their recorded info (see
    /// [`StoreTx::put_info`]), in segment order.
    pub fn conversation_segments(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<SegmentRow>, StoreError> {
        let conv = conv_lookup(&self.sealer, conversation);
        Ok(self
            .doc_rows(Some(conv))?
            .into_iter()
            .filter_map(|(addr, info)| match addr {
                DocAddr::Segment(_, n) => Some((n, info)),
                _ => None,
            })
            .collect())
    }

    /// Bytes of content (snapshots, change chunks) stored per document that is not evicted, with
    /// its recorded info.
    pub fn doc_sizes(&self) -> Result<Vec<DocSize>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT docs.lookup, docs.addr, docs.info,
                    coalesce(length(docs.snapshot), 0)
                    + coalesce((SELECT sum(length(data)) FROM chunks WHERE chunks.doc = docs.id), 0)
             FROM docs WHERE docs.evicted = 0",
        )?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let lookup: Vec<u8> = r.get(0)?;
            let sealed: Vec<u8> = r.get(1)?;
            let info: Option<Vec<u8>> = r.get(2)?;
            let size: i64 = r.get(3)?;
            let addr = open_addr(&self.sealer, &lookup, &sealed)?;
            let info = info
                .map(|i| open(&self.sealer, "document info", &info_aad(&lookup), &i))
                .transpose()?;
            out.push((addr, size.max(0) as u64, info));
        }
        Ok(out)
    }

    /// Addresses of every stored document.
    pub fn all_docs(&self) -> Result<Vec<DocAddr>, StoreError> {
        Ok(self.doc_rows(None)?.into_iter().map(|(a, _)| a).collect())
    }

    /// Number of change chunks stored after the snapshot of a document.
    pub fn chunk_count(&self, addr: &DocAddr) -> Result<u64, StoreError> {
        let lookup = doc_lookup(&self.sealer, addr);
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM chunks JOIN docs ON docs.id = chunks.doc WHERE docs.lookup = ?1",
            params![lookup],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Whether a document has enough chunks that a new snapshot would pay off.
    pub fn needs_compaction(&self, addr: &DocAddr) -> Result<bool, StoreError> {
        Ok(self.chunk_count(addr)? >= COMPACT_AFTER_CHUNKS)
    }

    /// Every conversation summary (opaque bytes to this layer), in no particular order.
    pub fn summaries(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT conv, data FROM summaries")?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let conv: Vec<u8> = r.get(0)?;
            let data: Vec<u8> = r.get(1)?;
            out.push(open(
                &self.sealer,
                "conversation summary",
                &summary_aad(&conv),
                &data,
            )?);
        }
        Ok(out)
    }

    /// A named setting.
    pub fn setting(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        sealed
            .map(|s| open(&self.sealer, "setting", &setting_aad(name), &s))
            .transpose()
    }

    /// Envelopes waiting for the relay's acknowledgement, oldest first, with their outbox ids.
    pub fn outbox(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.queue("outbox")
    }

    /// Envelopes received and kept for forwarding to peers, oldest first.
    pub fn received(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.queue("received")
    }

    fn queue(&self, table: &'static str) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT id, data FROM {table} ORDER BY id"))?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let data: Vec<u8> = r.get(1)?;
            out.push((id, open(&self.sealer, table, &queue_aad(table, id), &data)?));
        }
        Ok(out)
    }

    /// The cursor (relay sequence number) of a document on a relay.
    pub fn cursor(&self, relay: &[u8], addr: &DocAddr) -> Result<Option<u64>, StoreError> {
        let relay = self.sealer.lookup("relay", relay);
        let doc = doc_lookup(&self.sealer, addr);
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM cursors WHERE relay = ?1 AND doc = ?2",
                params![relay, doc],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.map(|s| s as u64))
    }

    /// The recorded version vector of a document (what this device holds of it), if any.
    pub fn version_vector(&self, addr: &DocAddr) -> Result<Option<Vec<u8>>, StoreError> {
        let lookup = doc_lookup(&self.sealer, addr);
        let sealed: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT vv FROM docs WHERE lookup = ?1",
                params![lookup],
                |r| r.get(0),
            )
            .optional()?;
        sealed
            .flatten()
            .map(|v| open(&self.sealer, "version vector", &vv_aad(&lookup), &v))
            .transpose()
    }

    /// Archived envelopes of `author`'s changes to `addr` that reach past `after` (its last
    /// change number another device holds), in change order: `(first, last, envelope)`.
    pub fn archived_after(
        &self,
        addr: &DocAddr,
        author: &DeviceId,
        after: u64,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let doc = doc_lookup(&self.sealer, addr);
        let who = author_lookup(&self.sealer, author);
        let mut stmt = self.conn.prepare_cached(
            "SELECT first, last, data FROM archive
             WHERE doc = ?1 AND author = ?2 AND last > ?3 ORDER BY first",
        )?;
        let mut rows = stmt.query(params![doc, who, after as i64])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let (first, last): (i64, i64) = (r.get(0)?, r.get(1)?);
            let data: Vec<u8> = r.get(2)?;
            let aad = archive_aad(&doc, &who, first);
            out.push((
                first as u64,
                last as u64,
                open(&self.sealer, "archived envelope", &aad, &data)?,
            ));
        }
        Ok(out)
    }

    /// Every stored document key: document, epoch and key.
    pub fn doc_keys(&self) -> Result<Vec<(DocId, KeyEpoch, DocKey)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT doc, epoch, key FROM doc_keys")?;
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let doc: Vec<u8> = r.get(0)?;
            let epoch: i64 = r.get(1)?;
            let sealed: Vec<u8> = r.get(2)?;
            let plain = Zeroizing::new(open(
                &self.sealer,
                "document key",
                &key_aad(&doc, epoch),
                &sealed,
            )?);
            if plain.len() != 64 {
                return Err(StoreError::Malformed {
                    what: "document key",
                });
            }
            let mut id = [0u8; 32];
            id.copy_from_slice(&plain[..32]);
            let mut key = [0u8; 32];
            key.copy_from_slice(&plain[32..]);
            let epoch =
                u32::try_from(epoch).map_err(|_| StoreError::Malformed { what: "key epoch" })?;
            out.push((
                DocId::from_bytes(id),
                KeyEpoch(epoch),
                DocKey::from_bytes(key),
            ));
            key.zeroize();
        }
        Ok(out)
    }

    /// This device's secret keys, if stored.
    pub fn device_secret(&self) -> Result<Option<DeviceSecret>, StoreError> {
        let Some(plain) = self.setting("device_secret")?.map(Zeroizing::new) else {
            return Ok(None);
        };
        if plain.len() != 64 {
            return Err(StoreError::Malformed {
                what: "device secret",
            });
        }
        let mut signing = Zeroizing::new([0u8; 32]);
        let mut agreement = Zeroizing::new([0u8; 32]);
        signing.copy_from_slice(&plain[..32]);
        agreement.copy_from_slice(&plain[32..]);
        Ok(Some(DeviceSecret::from_secret_bytes(&signing, &agreement)))
    }

    /// The account's device log as stored (not verified: the caller verifies it against the
    /// account id it expects).
    pub fn device_log(&self) -> Result<Option<Vec<DeviceLogEntry>>, StoreError> {
        self.setting("device_log")?
            .map(|bytes| {
                DeviceLog::decode_entries(&bytes)
                    .map_err(|_| StoreError::Malformed { what: "device log" })
            })
            .transpose()
    }

    /// Runs SQLite's own consistency check; `Ok(())` if the file is sound.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Malformed {
                what: "database file",
            })
        }
    }
}

/// The writes of one transaction.
pub struct StoreTx<'a> {
    tx: rusqlite::Transaction<'a>,
    sealer: &'a Sealer,
}

impl StoreTx<'_> {
    /// The row id of a document, created on first use.
    fn doc_row(&mut self, addr: &DocAddr) -> Result<(i64, [u8; 32]), StoreError> {
        let lookup = doc_lookup(self.sealer, addr);
        let existing: Option<i64> = self
            .tx
            .query_row(
                "SELECT id FROM docs WHERE lookup = ?1",
                params![lookup],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Ok((id, lookup));
        }
        let mut plain = Vec::with_capacity(addr.encoded_len());
        addr.encode_into(&mut plain);
        let sealed = self.sealer.seal(&addr_aad(&lookup), &plain);
        let conv = addr.conversation().map(|c| conv_lookup(self.sealer, &c));
        self.tx.execute(
            "INSERT INTO docs (lookup, conv, addr) VALUES (?1, ?2, ?3)",
            params![lookup, conv, sealed],
        )?;
        Ok((self.tx.last_insert_rowid(), lookup))
    }

    /// Appends a chunk of changes (concatenated Automerge change chunks) to a document.
    pub fn append_chunk(&mut self, addr: &DocAddr, data: &[u8]) -> Result<(), StoreError> {
        let (id, lookup) = self.doc_row(addr)?;
        let seq: i64 = self.tx.query_row(
            "SELECT coalesce(max(seq), 0) + 1 FROM chunks WHERE doc = ?1",
            params![id],
            |r| r.get(0),
        )?;
        let sealed = self.sealer.seal(&chunk_aad(&lookup, seq), data);
        self.tx
            .prepare_cached("INSERT INTO chunks (doc, seq, data) VALUES (?1, ?2, ?3)")?
            .execute(params![id, seq, sealed])?;
        self.tx
            .prepare_cached("UPDATE docs SET evicted = 0 WHERE id = ?1 AND evicted != 0")?
            .execute(params![id])?;
        Ok(())
    }

    /// Replaces a document's snapshot and deletes every chunk it covers. The snapshot must
    /// contain every change of every chunk stored so far. Both happen in this transaction, so a
    /// crash leaves either the old snapshot with its chunks or the new one.
    pub fn compact(&mut self, addr: &DocAddr, snapshot: &[u8]) -> Result<(), StoreError> {
        let (id, lookup) = self.doc_row(addr)?;
        let sealed = self.sealer.seal(&snapshot_aad(&lookup), snapshot);
        self.tx.execute(
            "UPDATE docs SET snapshot = ?1, evicted = 0 WHERE id = ?2",
            params![sealed, id],
        )?;
        self.tx
            .execute("DELETE FROM chunks WHERE doc = ?1", params![id])?;
        Ok(())
    }

    /// Records small derived facts about a document (for a segment: its count and key range), so
    /// that queries can plan without loading it.
    pub fn put_info(&mut self, addr: &DocAddr, info: &[u8]) -> Result<(), StoreError> {
        let (id, lookup) = self.doc_row(addr)?;
        let sealed = self.sealer.seal(&info_aad(&lookup), info);
        self.tx
            .prepare_cached("UPDATE docs SET info = ?1 WHERE id = ?2")?
            .execute(params![sealed, id])?;
        Ok(())
    }

    /// Records a document's version vector (opaque bytes to this layer).
    pub fn put_version_vector(&mut self, addr: &DocAddr, vv: &[u8]) -> Result<(), StoreError> {
        let (id, lookup) = self.doc_row(addr)?;
        let sealed = self.sealer.seal(&vv_aad(&lookup), vv);
        self.tx
            .prepare_cached("UPDATE docs SET vv = ?1 WHERE id = ?2")?
            .execute(params![sealed, id])?;
        Ok(())
    }

    /// Replaces (or with `None` clears) the changes of a document that wait for dependencies.
    pub fn put_pending(
        &mut self,
        addr: &DocAddr,
        pending: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let (id, lookup) = self.doc_row(addr)?;
        let sealed = pending.map(|p| self.sealer.seal(&pending_aad(&lookup), p));
        self.tx
            .prepare_cached("UPDATE docs SET pending = ?1 WHERE id = ?2")?
            .execute(params![sealed, id])?;
        Ok(())
    }

    /// Drops a document's content to free disk, keeping a mark that it must be fetched again.
    pub fn evict(&mut self, addr: &DocAddr) -> Result<(), StoreError> {
        let (id, _) = self.doc_row(addr)?;
        // The version vector goes too: this device no longer holds those changes, and a sync must
        // offer them again.
        self.tx.execute(
            "UPDATE docs SET snapshot = NULL, pending = NULL, vv = NULL, evicted = 1 WHERE id = ?1",
            params![id],
        )?;
        self.tx
            .execute("DELETE FROM chunks WHERE doc = ?1", params![id])?;
        Ok(())
    }

    /// Clears an evicted document's mark: it is held again, empty until its changes are fetched
    /// and appended. A document that is not evicted is left alone.
    pub fn unevict(&mut self, addr: &DocAddr) -> Result<(), StoreError> {
        let (id, _) = self.doc_row(addr)?;
        self.tx.execute(
            "UPDATE docs SET evicted = 0 WHERE id = ?1 AND evicted != 0",
            params![id],
        )?;
        Ok(())
    }

    /// Writes the summary of a conversation (opaque bytes to this layer).
    pub fn put_summary(
        &mut self,
        conversation: &ConversationId,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let conv = conv_lookup(self.sealer, conversation);
        let sealed = self.sealer.seal(&summary_aad(&conv), data);
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO summaries (conv, data) VALUES (?1, ?2)")?
            .execute(params![conv, sealed])?;
        Ok(())
    }

    /// Writes a named setting.
    pub fn put_setting(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let sealed = self.sealer.seal(&setting_aad(name), value);
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO settings (name, value) VALUES (?1, ?2)")?
            .execute(params![name, sealed])?;
        Ok(())
    }

    /// Queues an envelope for upload; returns its outbox id.
    pub fn push_outbox(&mut self, envelope: &[u8]) -> Result<i64, StoreError> {
        self.push_queue("outbox", envelope)
    }

    /// Removes an acknowledged envelope from the outbox. Removing twice is not an error.
    pub fn ack_outbox(&mut self, id: i64) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM outbox WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Archives an envelope of `author`'s changes `first..=last` to `addr`; `false` if one
    /// starting at `first` was archived before (it is kept as it was).
    pub fn archive(
        &mut self,
        addr: &DocAddr,
        author: &DeviceId,
        (first, last): (u64, u64),
        envelope: &[u8],
    ) -> Result<bool, StoreError> {
        let doc = doc_lookup(self.sealer, addr);
        let who = author_lookup(self.sealer, author);
        let sealed = self
            .sealer
            .seal(&archive_aad(&doc, &who, first as i64), envelope);
        let added = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO archive (doc, author, first, last, data)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![doc, who, first as i64, last as i64, sealed])?;
        Ok(added == 1)
    }

    /// Keeps a received envelope for forwarding to peers; returns its id.
    pub fn push_received(&mut self, envelope: &[u8]) -> Result<i64, StoreError> {
        self.push_queue("received", envelope)
    }

    /// Forgets a received envelope once forwarded.
    pub fn drop_received(&mut self, id: i64) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM received WHERE id = ?1", params![id])?;
        Ok(())
    }

    fn push_queue(&mut self, table: &'static str, data: &[u8]) -> Result<i64, StoreError> {
        // The row id is chosen before sealing so that the associated data can name it.
        let id: i64 = self.tx.query_row(
            &format!("SELECT coalesce(max(id), 0) + 1 FROM {table}"),
            [],
            |r| r.get(0),
        )?;
        let sealed = self.sealer.seal(&queue_aad(table, id), data);
        self.tx.execute(
            &format!("INSERT INTO {table} (id, data) VALUES (?1, ?2)"),
            params![id, sealed],
        )?;
        Ok(id)
    }

    /// Stores a document key. Storing the same (document, epoch) again replaces it.
    pub fn put_doc_key(
        &mut self,
        doc: &DocId,
        epoch: KeyEpoch,
        key: &DocKey,
    ) -> Result<(), StoreError> {
        let lookup = self.sealer.lookup("doc key", doc.as_bytes());
        let mut plain = Zeroizing::new(Vec::with_capacity(64));
        plain.extend_from_slice(doc.as_bytes());
        plain.extend_from_slice(key.as_bytes());
        let sealed = self
            .sealer
            .seal(&key_aad(&lookup, i64::from(epoch.0)), &plain);
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO doc_keys (doc, epoch, key) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![lookup, i64::from(epoch.0), sealed])?;
        Ok(())
    }

    /// Stores this device's secret keys.
    pub fn put_device_secret(&mut self, secret: &DeviceSecret) -> Result<(), StoreError> {
        let (signing, agreement) = secret.secret_bytes_for_storage();
        let mut plain = Zeroizing::new(Vec::with_capacity(64));
        plain.extend_from_slice(&*signing);
        plain.extend_from_slice(&*agreement);
        self.put_setting("device_secret", &plain)
    }

    /// Stores the account's device log (all entries; replaces the previous one).
    pub fn put_device_log(&mut self, log: &DeviceLog) -> Result<(), StoreError> {
        self.put_setting("device_log", &DeviceLog::encode_entries(log.entries()))
    }

    /// Records how far a document has been pulled from a relay.
    pub fn set_cursor(&mut self, relay: &[u8], addr: &DocAddr, seq: u64) -> Result<(), StoreError> {
        let relay = self.sealer.lookup("relay", relay);
        let doc = doc_lookup(self.sealer, addr);
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO cursors (relay, doc, seq) VALUES (?1, ?2, ?3)")?
            .execute(params![relay, doc, seq as i64])?;
        Ok(())
    }
}

fn open(
    sealer: &Sealer,
    what: &'static str,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, StoreError> {
    sealer
        .open(aad, sealed)
        .map_err(|source| StoreError::Corrupt { what, source })
}

fn open_addr(sealer: &Sealer, lookup: &[u8], sealed: &[u8]) -> Result<DocAddr, StoreError> {
    let plain = open(sealer, "document address", &addr_aad(lookup), sealed)?;
    let (addr, used) = DocAddr::decode_prefix(&plain)?;
    if used != plain.len() {
        return Err(StoreError::Malformed {
            what: "document address",
        });
    }
    Ok(addr)
}

fn doc_lookup(sealer: &Sealer, addr: &DocAddr) -> [u8; 32] {
    let mut plain = Vec::with_capacity(addr.encoded_len());
    addr.encode_into(&mut plain);
    sealer.lookup("doc", &plain)
}

fn author_lookup(sealer: &Sealer, device: &DeviceId) -> [u8; 32] {
    sealer.lookup("author", device.as_bytes())
}

fn archive_aad(doc: &[u8], author: &[u8], first: i64) -> Vec<u8> {
    let mut both = doc.to_vec();
    both.extend_from_slice(author);
    tagged("archive", &both, Some(first))
}

fn conv_lookup(sealer: &Sealer, conversation: &ConversationId) -> [u8; 32] {
    sealer.lookup("conversation", conversation.as_bytes())
}

fn tagged(tag: &str, lookup: &[u8], n: Option<i64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + lookup.len() + 9);
    out.extend_from_slice(tag.as_bytes());
    out.push(0);
    out.extend_from_slice(lookup);
    if let Some(n) = n {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

fn addr_aad(lookup: &[u8]) -> Vec<u8> {
    tagged("docs/addr", lookup, None)
}

fn snapshot_aad(lookup: &[u8]) -> Vec<u8> {
    tagged("docs/snapshot", lookup, None)
}

fn chunk_aad(lookup: &[u8], seq: i64) -> Vec<u8> {
    tagged("chunks", lookup, Some(seq))
}

fn info_aad(lookup: &[u8]) -> Vec<u8> {
    tagged("docs/info", lookup, None)
}

fn vv_aad(lookup: &[u8]) -> Vec<u8> {
    tagged("docs/vv", lookup, None)
}

fn pending_aad(lookup: &[u8]) -> Vec<u8> {
    tagged("docs/pending", lookup, None)
}

fn summary_aad(conv: &[u8]) -> Vec<u8> {
    tagged("summaries", conv, None)
}

fn setting_aad(name: &str) -> Vec<u8> {
    tagged("settings", name.as_bytes(), None)
}

fn key_aad(lookup: &[u8], epoch: i64) -> Vec<u8> {
    tagged("doc_keys", lookup, Some(epoch))
}

fn queue_aad(table: &str, id: i64) -> Vec<u8> {
    tagged(table, &[], Some(id))
}
