//! The SQLite device store: round trips, typed errors on bad keys and bad files, no plaintext.

use std::path::Path;

use roamsync::ids::{AccountId, ConversationId, DeviceId, DocAddr};
use roamsync::store::{Durability, SealError, StorageKey, Store, StoreError};

fn key(b: u8) -> StorageKey {
    StorageKey::from_bytes([b; 32])
}

fn open(path: &Path, k: u8) -> Result<Store, StoreError> {
    Store::open(path, &key(k), Durability::Full)
}

const CONV: ConversationId = ConversationId::from_bytes([7; 16]);

#[test]
fn chunks_snapshots_and_eviction_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let seg = DocAddr::Segment(CONV, 3);
    let meta = DocAddr::Meta(CONV);
    let account = DocAddr::Account(AccountId::from_bytes([1; 32]));
    {
        let mut s = open(&path, 1).unwrap();
        assert_eq!(s.load_doc(&seg).unwrap(), None);
        s.write(|tx| {
            tx.append_chunk(&seg, b"one")?;
            tx.append_chunk(&seg, b"two")?;
            tx.append_chunk(&meta, b"meta")?;
            tx.append_chunk(&account, b"acct")
        })
        .unwrap();
    }
    let mut s = open(&path, 1).unwrap();
    let doc = s.load_doc(&seg).unwrap().unwrap();
    assert_eq!(doc.snapshot, None);
    assert_eq!(doc.chunks, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(s.conversation_docs(&CONV).unwrap(), vec![meta, seg]);
    assert_eq!(s.all_docs().unwrap(), vec![account, meta, seg]);

    s.write(|tx| tx.compact(&seg, b"snapshot")).unwrap();
    s.write(|tx| tx.append_chunk(&seg, b"three")).unwrap();
    let doc = s.load_doc(&seg).unwrap().unwrap();
    assert_eq!(doc.snapshot.as_deref(), Some(&b"snapshot"[..]));
    assert_eq!(doc.chunks, vec![b"three".to_vec()]);
    assert_eq!(s.chunk_count(&seg).unwrap(), 1);

    s.write(|tx| tx.evict(&seg)).unwrap();
    let doc = s.load_doc(&seg).unwrap().unwrap();
    assert!(doc.evicted);
    assert_eq!((doc.snapshot, doc.chunks.len()), (None, 0));
    s.integrity_check().unwrap();
}

#[test]
fn a_failed_transaction_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(&dir.path().join("d.db"), 1).unwrap();
    let seg = DocAddr::Segment(CONV, 0);
    let r: Result<(), StoreError> = s.write(|tx| {
        tx.append_chunk(&seg, b"lost")?;
        Err(StoreError::Malformed { what: "test" })
    });
    assert!(r.is_err());
    assert_eq!(s.load_doc(&seg).unwrap(), None);
}

#[test]
fn bookkeeping_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(&dir.path().join("d.db"), 1).unwrap();
    let seg = DocAddr::Segment(CONV, 0);
    let (a, b) = s
        .write(|tx| {
            let a = tx.push_outbox(b"env-a")?;
            let b = tx.push_outbox(b"env-b")?;
            tx.push_received(b"env-r")?;
            tx.set_cursor(b"relay-1", &seg, 42)?;
            tx.put_setting("clock", b"123")?;
            tx.put_summary(&CONV, b"summary")?;
            Ok((a, b))
        })
        .unwrap();
    assert_eq!(
        s.outbox().unwrap(),
        vec![(a, b"env-a".to_vec()), (b, b"env-b".to_vec())]
    );
    s.write(|tx| {
        tx.ack_outbox(a)?;
        tx.ack_outbox(a)
    })
    .unwrap();
    assert_eq!(s.outbox().unwrap(), vec![(b, b"env-b".to_vec())]);
    assert_eq!(s.received().unwrap().len(), 1);
    assert_eq!(s.cursor(b"relay-1", &seg).unwrap(), Some(42));
    assert_eq!(s.cursor(b"relay-2", &seg).unwrap(), None);
    assert_eq!(s.setting("clock").unwrap().as_deref(), Some(&b"123"[..]));
    assert_eq!(s.summaries().unwrap(), vec![b"summary".to_vec()]);
}

#[test]
fn wrong_storage_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    drop(open(&path, 1).unwrap());
    assert!(matches!(open(&path, 2), Err(StoreError::WrongStorageKey)));
    // And the right key still opens it afterwards.
    open(&path, 1).unwrap();
}

#[test]
fn corrupted_or_moved_blobs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let seg = DocAddr::Segment(CONV, 0);
    {
        let mut s = open(&path, 1).unwrap();
        s.write(|tx| {
            tx.append_chunk(&seg, b"first")?;
            tx.append_chunk(&seg, b"second")
        })
        .unwrap();
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    // Move: chunk 1's blob copied over chunk 2.
    raw.execute(
        "UPDATE chunks SET data = (SELECT data FROM chunks WHERE seq = 1) WHERE seq = 2",
        [],
    )
    .unwrap();
    let s = open(&path, 1).unwrap();
    assert!(matches!(
        s.load_doc(&seg),
        Err(StoreError::Corrupt {
            what: "change chunk",
            source: SealError::Unauthentic
        })
    ));
    // Overwrite with zeros.
    raw.execute("UPDATE chunks SET data = zeroblob(60) WHERE seq = 1", [])
        .unwrap();
    assert!(matches!(s.load_doc(&seg), Err(StoreError::Corrupt { .. })));
    // Truncated blob.
    raw.execute("UPDATE chunks SET data = x'01' WHERE seq = 1", [])
        .unwrap();
    assert!(matches!(
        s.load_doc(&seg),
        Err(StoreError::Corrupt {
            source: SealError::Truncated { .. },
            ..
        })
    ));
}

#[test]
fn truncated_or_foreign_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    drop(open(&path, 1).unwrap());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len().min(50)]).unwrap();
    let _ = std::fs::remove_file(dir.path().join("d.db-wal"));
    let _ = std::fs::remove_file(dir.path().join("d.db-shm"));
    let r = open(&path, 1);
    assert!(matches!(r, Err(StoreError::DatabaseCorrupt(_))), "{r:?}");

    let other = dir.path().join("text.db");
    std::fs::write(&other, [b'x'; 4096]).unwrap();
    let r = open(&other, 1);
    assert!(matches!(r, Err(StoreError::NotADatabase(_))), "{r:?}");
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    drop(open(&path, 1).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        open(&path, 1),
        Err(StoreError::SchemaTooNew {
            found: 99,
            supported: 4
        })
    ));
}

#[test]
fn no_plaintext_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let marker = b"MARKER-plaintext-must-not-appear";
    let seg = DocAddr::Segment(CONV, 0);
    let mut s = open(&path, 1).unwrap();
    s.write(|tx| {
        tx.append_chunk(&seg, marker)?;
        tx.put_summary(&CONV, marker)?;
        tx.push_outbox(marker)?;
        tx.archive(&seg, &DeviceId::from_bytes([0x5a; 32]), (1, 2), marker)?;
        tx.put_setting("x", marker)
    })
    .unwrap();
    let mut scanned = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        scanned += bytes.len();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        // Ids are not stored in the clear either: only keyed hashes of them.
        assert!(!bytes.windows(16).any(|w| w == CONV.as_bytes()));
        assert!(!bytes.windows(32).any(|w| w == [0x5a; 32]));
    }
    assert!(scanned > 4096, "the scan read the database and its WAL");
}

#[test]
fn key_material_and_device_log_round_trip_sealed() {
    use roamsync::crypto::device_log::DeviceLog;
    use roamsync::crypto::identity::DeviceSecret;
    use roamsync::crypto::keys::{DocKey, KeyEpoch};
    use roamsync::crypto::rng::SeedRng;
    use roamsync::ids::DocId;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let mut rng = SeedRng::from_seed([3; 32]);
    let secret = DeviceSecret::generate(&mut rng);
    let log = DeviceLog::create(&secret, "phone", "test").unwrap();
    let doc = DocId::from_bytes([4; 32]);
    let key0 = [0x51; 32];
    let key1 = [0x52; 32];
    {
        let mut s = open(&path, 1).unwrap();
        assert!(s.device_secret().unwrap().is_none());
        assert!(s.device_log().unwrap().is_none());
        s.write(|tx| {
            tx.put_device_secret(&secret)?;
            tx.put_device_log(&log)?;
            tx.put_doc_key(&doc, KeyEpoch(0), &DocKey::from_bytes(key0))?;
            tx.put_doc_key(&doc, KeyEpoch(1), &DocKey::from_bytes(key1))
        })
        .unwrap();
    }
    let s = open(&path, 1).unwrap();
    assert_eq!(
        s.device_secret().unwrap().unwrap().device_id(),
        secret.device_id()
    );
    let entries = s.device_log().unwrap().unwrap();
    let verified = DeviceLog::verify(&log.account(), entries).unwrap();
    assert_eq!(verified.head(), log.head());
    let mut keys: Vec<_> = s
        .doc_keys()
        .unwrap()
        .into_iter()
        .map(|(d, e, k)| (d, e.0, *k.as_bytes()))
        .collect();
    keys.sort();
    assert_eq!(keys, vec![(doc, 0, key0), (doc, 1, key1)]);
    // Nothing of it is readable in the files.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for needle in [&key0[..], &key1[..], b"phone"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
}

#[test]
fn an_older_schema_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    {
        // A store as the first schema version left it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(roamsync::store::db::MIGRATIONS[0])
            .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let mut s = open(&path, 1).unwrap();
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, roamsync::store::db::SCHEMA_VERSION);
    s.write(|tx| {
        tx.put_doc_key(
            &roamsync::ids::DocId::from_bytes([1; 32]),
            roamsync::crypto::keys::KeyEpoch(0),
            &roamsync::crypto::keys::DocKey::from_bytes([2; 32]),
        )
    })
    .unwrap();
    assert_eq!(s.doc_keys().unwrap().len(), 1);
}

#[test]
fn archived_envelopes_are_kept_once_and_read_past_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.db");
    let seg = DocAddr::Segment(CONV, 0);
    let meta = DocAddr::Meta(CONV);
    let (a, b) = (DeviceId::from_bytes([1; 32]), DeviceId::from_bytes([2; 32]));
    {
        let mut s = open(&path, 1).unwrap();
        let added = s
            .write(|tx| {
                Ok([
                    tx.archive(&seg, &a, (4, 6), b"a4-6")?,
                    tx.archive(&seg, &a, (1, 3), b"a1-3")?,
                    tx.archive(&seg, &a, (7, 7), b"a7")?,
                    tx.archive(&seg, &b, (1, 1), b"b1")?,
                    tx.archive(&meta, &a, (1, 1), b"meta")?,
                    // The same start again: kept as it was.
                    tx.archive(&seg, &a, (4, 6), b"other")?,
                ])
            })
            .unwrap();
        assert_eq!(added, [true, true, true, true, true, false]);
    }
    let s = open(&path, 1).unwrap();
    let firsts = |after| -> Vec<(u64, u64, Vec<u8>)> { s.archived_after(&seg, &a, after).unwrap() };
    assert_eq!(
        firsts(0),
        vec![
            (1, 3, b"a1-3".to_vec()),
            (4, 6, b"a4-6".to_vec()),
            (7, 7, b"a7".to_vec())
        ]
    );
    // An envelope reaching past the version is included even if it starts before it.
    assert_eq!(
        firsts(5).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![4, 7]
    );
    assert!(firsts(7).is_empty());
    assert_eq!(s.archived_after(&seg, &b, 0).unwrap().len(), 1);
    assert_eq!(s.archived_after(&meta, &a, 0).unwrap()[0].2, b"meta");
    // Another storage key finds nothing it can open.
    drop(s);
    assert!(matches!(open(&path, 2), Err(StoreError::WrongStorageKey)));
}
