use super::*;

const GROUP: DocId = DocId::from_bytes([0x60; 32]);
const OTHER_GROUP: DocId = DocId::from_bytes([0x61; 32]);
const DOC: DocId = DocId::from_bytes([0xd0; 32]);
const DOC_2: DocId = DocId::from_bytes([0xd1; 32]);
const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);
const BOB: AccountId = AccountId::from_bytes([0xb0; 32]);
const PHONE: DeviceId = DeviceId::from_bytes([1; 32]);
const LAPTOP: DeviceId = DeviceId::from_bytes([2; 32]);

fn open(dir: &Path) -> RelayStore {
    RelayStore::open(dir, RelayStoreOptions::default()).unwrap()
}

/// An envelope of `len` bytes; its id is the hash of its bytes, like a real one.
fn envelope(
    doc: DocId,
    author: DeviceId,
    account: AccountId,
    first: u64,
    len: usize,
) -> NewEnvelope {
    let mut bytes = vec![0u8; len];
    let seed =
        blake3::hash(&[doc.as_bytes(), author.as_bytes(), &first.to_be_bytes()[..]].concat());
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = seed.as_bytes()[i % 32] ^ (i as u8);
    }
    NewEnvelope {
        doc,
        id: EnvelopeId(*blake3::hash(&bytes).as_bytes()),
        author,
        account,
        first_seq: first,
        last_seq: first,
        bytes,
    }
}

fn stored(seqs: impl IntoIterator<Item = u64>) -> Vec<AppendOutcome> {
    seqs.into_iter()
        .map(|seq| AppendOutcome::Stored { seq })
        .collect()
}

/// A store with `DOC` in `GROUP` holding `n` envelopes of `len` bytes by the phone.
fn store_with(dir: &Path, n: u64, len: usize) -> RelayStore {
    let mut store = open(dir);
    store.create_doc(&DOC, &GROUP).unwrap();
    let batch: Vec<_> = (1..=n)
        .map(|i| envelope(DOC, PHONE, ALICE, i, len))
        .collect();
    assert_eq!(store.append_batch(&batch).unwrap(), stored(1..=n));
    store
}

#[test]
fn every_table_round_trips_through_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = envelope(DOC, PHONE, ALICE, 1, 10);
    let b = envelope(DOC_2, LAPTOP, BOB, 7, 20);
    {
        let mut store = open(dir.path());
        store
            .append_log_entries(&ALICE, 0, &[b"genesis".to_vec(), b"add laptop".to_vec()])
            .unwrap();
        store
            .append_log_entries(&ALICE, 2, &[b"rename".to_vec()])
            .unwrap();
        store
            .append_log_entries(&BOB, 0, &[b"bob genesis".to_vec()])
            .unwrap();
        store.put_group_update(&GROUP, 0, b"members v0").unwrap();
        store.put_group_update(&GROUP, 1, b"members v1").unwrap();
        store.create_doc(&DOC, &GROUP).unwrap();
        store.create_doc(&DOC_2, &OTHER_GROUP).unwrap();
        assert_eq!(
            store.append_batch(&[a.clone(), b.clone()]).unwrap(),
            stored(1..=2)
        );
    }
    let store = open(dir.path());
    let reader = RelayReader::open(dir.path()).unwrap();
    let logs = vec![
        (
            ALICE,
            vec![
                b"genesis".to_vec(),
                b"add laptop".to_vec(),
                b"rename".to_vec(),
            ],
        ),
        (BOB, vec![b"bob genesis".to_vec()]),
    ];
    assert_eq!(store.device_logs().unwrap(), logs);
    assert_eq!(reader.device_logs().unwrap(), logs);
    let groups = vec![
        (GROUP, vec![b"members v0".to_vec(), b"members v1".to_vec()]),
        (OTHER_GROUP, vec![]),
    ];
    assert_eq!(store.groups().unwrap(), groups);
    assert_eq!(reader.groups().unwrap(), groups);
    let docs = vec![
        DocRow {
            doc: DOC,
            group: GROUP,
            last_seq: 1,
        },
        DocRow {
            doc: DOC_2,
            group: OTHER_GROUP,
            last_seq: 2,
        },
    ];
    assert_eq!(store.docs().unwrap(), docs);
    assert_eq!(reader.docs().unwrap(), docs);
    let usage = vec![(ALICE, 10), (BOB, 20)];
    assert_eq!(store.usage().unwrap(), usage);
    assert_eq!(reader.usage().unwrap(), usage);
    assert_eq!(
        store.fetch(&DOC, 0, 10, 1000).unwrap().items,
        [(1, a.bytes)]
    );
    assert_eq!(
        reader.fetch(&DOC_2, 0, 10, 1000).unwrap().items,
        [(2, b.bytes)]
    );
    assert_eq!(store.last_seq(), 2);
    assert_eq!(reader.last_seq().unwrap(), 2);
}

#[test]
fn log_appends_must_follow_the_stored_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert!(matches!(
        store.append_log_entries(&ALICE, 1, &[b"x".to_vec()]),
        Err(RelayStoreError::LogSeqMismatch {
            expected: 0,
            found: 1,
            ..
        })
    ));
    store
        .append_log_entries(&ALICE, 0, &[b"a".to_vec()])
        .unwrap();
    assert!(matches!(
        store.append_log_entries(&ALICE, 0, &[b"again".to_vec()]),
        Err(RelayStoreError::LogSeqMismatch {
            expected: 1,
            found: 0,
            ..
        })
    ));
    drop(store);
    // The count survives a reopen.
    let mut store = open(dir.path());
    assert!(matches!(
        store.append_log_entries(&ALICE, 0, &[b"again".to_vec()]),
        Err(RelayStoreError::LogSeqMismatch { expected: 1, .. })
    ));
    store
        .append_log_entries(&ALICE, 1, &[b"b".to_vec()])
        .unwrap();
    assert_eq!(
        store.device_logs().unwrap(),
        [(ALICE, vec![b"a".to_vec(), b"b".to_vec()])]
    );
}

#[test]
fn group_updates_must_come_in_version_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert!(matches!(
        store.put_group_update(&GROUP, 1, b"v1"),
        Err(RelayStoreError::GroupVersionMismatch {
            expected: 0,
            found: 1,
            ..
        })
    ));
    store.put_group_update(&GROUP, 0, b"v0").unwrap();
    assert!(matches!(
        store.put_group_update(&GROUP, 0, b"v0 again"),
        Err(RelayStoreError::GroupVersionMismatch { expected: 1, .. })
    ));
    drop(store);
    let mut store = open(dir.path());
    store.put_group_update(&GROUP, 1, b"v1").unwrap();
    assert_eq!(
        store.groups().unwrap(),
        [(GROUP, vec![b"v0".to_vec(), b"v1".to_vec()])]
    );
}

#[test]
fn a_document_stays_in_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.create_doc(&DOC, &GROUP).unwrap();
    store.create_doc(&DOC, &GROUP).unwrap();
    assert!(matches!(
        store.create_doc(&DOC, &OTHER_GROUP),
        Err(RelayStoreError::DocInOtherGroup {
            existing: GROUP,
            requested: OTHER_GROUP,
            ..
        })
    ));
    drop(store);
    let mut store = open(dir.path());
    assert!(matches!(
        store.create_doc(&DOC, &OTHER_GROUP),
        Err(RelayStoreError::DocInOtherGroup { .. })
    ));
    store.create_doc(&DOC, &GROUP).unwrap();
    assert_eq!(store.docs().unwrap().len(), 1);
}

#[test]
fn fetch_pages_by_items_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 10, 100);
    let seqs = |f: &Fetched| f.items.iter().map(|(s, _)| *s).collect::<Vec<_>>();

    let all = store.fetch(&DOC, 0, 100, 1 << 20).unwrap();
    assert_eq!(seqs(&all), (1..=10).collect::<Vec<_>>());
    assert!(!all.more);

    let page = store.fetch(&DOC, 0, 4, 1 << 20).unwrap();
    assert_eq!(seqs(&page), [1, 2, 3, 4]);
    assert!(page.more);
    let page = store.fetch(&DOC, 4, 4, 1 << 20).unwrap();
    assert_eq!(seqs(&page), [5, 6, 7, 8]);
    assert!(page.more);
    let page = store.fetch(&DOC, 8, 4, 1 << 20).unwrap();
    assert_eq!(seqs(&page), [9, 10]);
    assert!(!page.more);
    let page = store.fetch(&DOC, 10, 4, 1 << 20).unwrap();
    assert!(page.items.is_empty() && !page.more);

    // 350 bytes hold three envelopes of 100, not four.
    let page = store.fetch(&DOC, 2, 100, 350).unwrap();
    assert_eq!(seqs(&page), [3, 4, 5]);
    assert!(page.more);
    // Exactly at the budget counts as within it.
    let page = store.fetch(&DOC, 7, 100, 300).unwrap();
    assert_eq!(seqs(&page), [8, 9, 10]);
    assert!(!page.more);
    // The bytes are the stored ones.
    assert_eq!(page.items[0].1, envelope(DOC, PHONE, ALICE, 8, 100).bytes);
}

#[test]
fn fetch_returns_one_envelope_larger_than_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 3, 1000);
    let page = store.fetch(&DOC, 0, 100, 10).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].0, 1);
    assert!(page.more);
    // A zero item limit is taken as one.
    let page = store.fetch(&DOC, 1, 0, 1 << 20).unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.more);
}

#[test]
fn fetch_sees_only_its_document_and_refuses_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 2, 10);
    store.create_doc(&DOC_2, &GROUP).unwrap();
    assert_eq!(
        store
            .append_batch(&[envelope(DOC_2, PHONE, ALICE, 1, 10)])
            .unwrap(),
        stored([3])
    );
    let page = store.fetch(&DOC_2, 0, 100, 1 << 20).unwrap();
    assert_eq!(page.items.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3]);
    let page = store.fetch(&DOC, 0, 100, 1 << 20).unwrap();
    assert_eq!(
        page.items.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 2]
    );
    let unknown = DocId::from_bytes([0xee; 32]);
    assert!(matches!(
        store.fetch(&unknown, 0, 10, 10),
        Err(RelayStoreError::UnknownDoc { doc }) if doc == unknown
    ));
    assert!(matches!(
        RelayReader::open(dir.path())
            .unwrap()
            .fetch(&unknown, 0, 10, 10),
        Err(RelayStoreError::UnknownDoc { .. })
    ));
}

#[test]
fn duplicates_across_batches_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 3, 50);
    let again = envelope(DOC, PHONE, ALICE, 2, 50);
    let new = envelope(DOC, PHONE, ALICE, 4, 50);
    assert_eq!(
        store.append_batch(&[again, new]).unwrap(),
        [
            AppendOutcome::Duplicate { seq: 2 },
            AppendOutcome::Stored { seq: 4 }
        ]
    );
    assert_eq!(store.last_seq(), 4);
    assert_eq!(store.fetch(&DOC, 0, 100, 1 << 20).unwrap().items.len(), 4);
    // Only stored bytes count towards the quota.
    assert_eq!(store.usage().unwrap(), [(ALICE, 200)]);
}

#[test]
fn duplicates_inside_one_batch_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.create_doc(&DOC, &GROUP).unwrap();
    let a = envelope(DOC, PHONE, ALICE, 1, 50);
    let b = envelope(DOC, LAPTOP, ALICE, 1, 50);
    assert_eq!(
        store
            .append_batch(&[a.clone(), b.clone(), a.clone(), b])
            .unwrap(),
        [
            AppendOutcome::Stored { seq: 1 },
            AppendOutcome::Stored { seq: 2 },
            AppendOutcome::Duplicate { seq: 1 },
            AppendOutcome::Duplicate { seq: 2 },
        ]
    );
    assert_eq!(store.last_seq(), 2);
    assert_eq!(store.usage().unwrap(), [(ALICE, 100)]);
}

#[test]
fn another_envelope_at_the_same_change_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 1, 50);
    let original = envelope(DOC, PHONE, ALICE, 1, 50);
    let mut forged = envelope(DOC, PHONE, ALICE, 1, 60);
    forged.last_seq = 5;
    let mut inside = envelope(DOC, PHONE, ALICE, 2, 50);
    let mut inside_forged = envelope(DOC, PHONE, ALICE, 2, 70);
    inside.last_seq = 3;
    inside_forged.last_seq = 2;
    assert_eq!(
        store
            .append_batch(&[forged, inside.clone(), inside_forged])
            .unwrap(),
        [
            AppendOutcome::Conflict {
                existing: original.id
            },
            AppendOutcome::Stored { seq: 2 },
            AppendOutcome::Conflict {
                existing: inside.id
            },
        ]
    );
    let items = store.fetch(&DOC, 0, 100, 1 << 20).unwrap().items;
    assert_eq!(items, [(1, original.bytes), (2, inside.bytes)]);
}

#[test]
fn an_unknown_document_does_not_fail_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.create_doc(&DOC, &GROUP).unwrap();
    let unknown = DocId::from_bytes([0xee; 32]);
    assert_eq!(
        store
            .append_batch(&[
                envelope(DOC, PHONE, ALICE, 1, 10),
                envelope(unknown, PHONE, ALICE, 1, 10),
                envelope(DOC, PHONE, ALICE, 2, 10),
            ])
            .unwrap(),
        [
            AppendOutcome::Stored { seq: 1 },
            AppendOutcome::UnknownDoc,
            AppendOutcome::Stored { seq: 2 },
        ]
    );
    assert_eq!(store.docs().unwrap().len(), 1);
}

#[test]
fn a_reopened_store_keeps_everything_and_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with(dir.path(), 5, 20));
    let mut store = open(dir.path());
    assert_eq!(store.last_seq(), 5);
    // Ids learnt before the reopen still deduplicate and still map to the same rows.
    assert_eq!(
        store
            .append_batch(&[
                envelope(DOC, PHONE, ALICE, 3, 20),
                envelope(DOC, PHONE, ALICE, 6, 20),
                envelope(DOC, LAPTOP, BOB, 1, 20),
            ])
            .unwrap(),
        [
            AppendOutcome::Duplicate { seq: 3 },
            AppendOutcome::Stored { seq: 6 },
            AppendOutcome::Stored { seq: 7 },
        ]
    );
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_seq(), 7);
    let items = store.fetch(&DOC, 0, 100, 1 << 20).unwrap().items;
    assert_eq!(
        items.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(store.usage().unwrap(), [(ALICE, 120), (BOB, 20)]);
    // One row per id: the phone and Alice were not inserted again.
    let devices: i64 = store
        .conn
        .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
        .unwrap();
    let accounts: i64 = store
        .conn
        .query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!((devices, accounts), (2, 2));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let conn = Connection::open(dir.path().join(RELAY_DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    assert!(matches!(
        RelayStore::open(dir.path(), RelayStoreOptions::default()),
        Err(RelayStoreError::SchemaTooNew { found, supported })
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
    ));
    assert!(matches!(
        RelayReader::open(dir.path()),
        Err(RelayStoreError::SchemaTooNew { .. })
    ));
}

#[test]
fn a_reader_needs_a_created_store() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        RelayReader::open(dir.path()),
        Err(RelayStoreError::Missing { .. })
    ));
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(RELAY_DB_FILE), vec![0x5a; 8192]).unwrap();
    assert!(matches!(
        RelayStore::open(dir.path(), RelayStoreOptions::default()),
        Err(RelayStoreError::NotADatabase(_))
    ));
}

#[test]
fn a_reader_sees_each_commit_while_the_writer_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 2, 10);
    let reader = RelayReader::open(dir.path()).unwrap();
    assert_eq!(reader.last_seq().unwrap(), 2);
    store
        .append_batch(&[envelope(DOC, PHONE, ALICE, 3, 10)])
        .unwrap();
    assert_eq!(reader.last_seq().unwrap(), 3);
    assert_eq!(reader.fetch(&DOC, 2, 10, 1000).unwrap().items.len(), 1);
}

/// The relay must hold nothing but opaque bytes and routing metadata: every value in the file is
/// an integer, a 32-byte id, or the opaque bytes handed to it (log entries, group updates,
/// envelopes), in the columns meant for them.
#[test]
fn metadata_columns_hold_only_integers_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 3, 300);
    store.append_log_entries(&ALICE, 0, &[vec![7; 40]]).unwrap();
    store.put_group_update(&GROUP, 0, &[8; 50]).unwrap();
    assert!(store.put_snapshot(&new_snapshot(ALICE, 3, 400)).unwrap());
    let opaque = [
        ("log_entries", "data"),
        ("group_updates", "data"),
        ("envelopes", "data"),
        ("snapshots", "data"),
    ];
    let tables: Vec<String> = store
        .conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.len() >= 9, "{tables:?}");
    let mut checked = 0;
    for table in &tables {
        let columns: Vec<String> = store
            .conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for column in &columns {
            if opaque.contains(&(table.as_str(), column.as_str())) {
                continue;
            }
            let mut stmt = store
                .conn
                .prepare(&format!(
                    "SELECT typeof({column}), length({column}) FROM {table}"
                ))
                .unwrap();
            let mut rows = stmt.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let kind: String = r.get(0).unwrap();
                let len: i64 = r.get(1).unwrap();
                assert!(
                    kind == "integer" || (kind == "blob" && len == 32),
                    "{table}.{column} holds a {kind} of length {len}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} values checked");
}

fn new_snapshot(account: AccountId, covers: u64, len: usize) -> NewSnapshot {
    NewSnapshot {
        doc: DOC,
        account,
        author: PHONE,
        covers,
        bytes: vec![covers as u8; len],
    }
}

#[test]
fn the_latest_snapshot_per_document_and_account_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = store_with(dir.path(), 9, 10);
    assert_eq!(store.snapshot(&DOC, &ALICE).unwrap(), None);
    assert!(store.put_snapshot(&new_snapshot(ALICE, 5, 100)).unwrap());
    // Covering less or as much: kept out.
    assert!(!store.put_snapshot(&new_snapshot(ALICE, 4, 100)).unwrap());
    assert!(!store.put_snapshot(&new_snapshot(ALICE, 5, 90)).unwrap());
    let kept = store.snapshot(&DOC, &ALICE).unwrap().unwrap();
    assert_eq!((kept.covers, kept.bytes.len()), (5, 100));
    // Each account has its own.
    assert!(store.put_snapshot(&new_snapshot(BOB, 2, 30)).unwrap());
    assert!(store.put_snapshot(&new_snapshot(ALICE, 9, 120)).unwrap());
    let reader = RelayReader::open(dir.path()).unwrap();
    let alice = reader.snapshot(&DOC, &ALICE).unwrap().unwrap();
    assert_eq!((alice.covers, alice.bytes), (9, vec![9; 120]));
    assert_eq!(reader.snapshot(&DOC, &BOB).unwrap().unwrap().covers, 2);
    assert_eq!(reader.snapshot(&DOC_2, &ALICE).unwrap(), None);
    // A document never created has no snapshot to keep.
    let mut other = new_snapshot(ALICE, 1, 10);
    other.doc = DOC_2;
    assert!(matches!(
        store.put_snapshot(&other),
        Err(RelayStoreError::UnknownDoc { .. })
    ));
    // Durable across a reopen.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.snapshot(&DOC, &ALICE).unwrap().unwrap().covers, 9);
}

#[test]
fn a_version_1_store_gains_the_snapshot_table() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut conn = connect(&dir.path().join(RELAY_DB_FILE), true).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(MIGRATIONS[0]).unwrap();
        tx.pragma_update(None, "user_version", 1).unwrap();
        tx.commit().unwrap();
    }
    assert!(matches!(
        RelayReader::open(dir.path()),
        Err(RelayStoreError::SchemaTooOld { found: 1, .. })
    ));
    let mut store = open(dir.path());
    assert_eq!(user_version(&store.conn).unwrap(), SCHEMA_VERSION);
    store.create_doc(&DOC, &GROUP).unwrap();
    store
        .append_batch(&[envelope(DOC, PHONE, ALICE, 1, 10)])
        .unwrap();
    assert!(store.put_snapshot(&new_snapshot(ALICE, 1, 10)).unwrap());
}
