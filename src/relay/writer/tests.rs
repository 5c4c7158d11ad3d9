use std::collections::BTreeSet;

use super::*;
use crate::crypto::envelope::EnvelopeId;
use crate::ids::DeviceId;
use crate::relay::store::{RelayReader, RelayStoreOptions};

const GROUP: DocId = DocId::from_bytes([0x60; 32]);
const DOC: DocId = DocId::from_bytes([0xd0; 32]);
const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);

fn envelope(doc: DocId, author: u8, first: u64) -> NewEnvelope {
    let bytes = [&[author][..], doc.as_bytes(), &first.to_be_bytes()].concat();
    NewEnvelope {
        doc,
        id: EnvelopeId(*blake3::hash(&bytes).as_bytes()),
        author: DeviceId::from_bytes([author; 32]),
        account: ALICE,
        first_seq: first,
        last_seq: first,
        bytes,
    }
}

fn spawn(dir: &std::path::Path) -> (RelayWriter, JoinHandle<()>) {
    let store = RelayStore::open(dir, RelayStoreOptions::default()).unwrap();
    RelayWriter::spawn(store).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

#[test]
fn concurrent_submitters_get_distinct_seqs_and_everything_is_fetchable() {
    const TASKS: u8 = 8;
    const PER_TASK: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    let seqs = runtime().block_on(async {
        writer.create_doc(DOC, GROUP).await.unwrap();
        let tasks: Vec<_> = (1..=TASKS)
            .map(|author| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    // Queue a window of appends, then wait for them, as a connection would.
                    let mut seqs = Vec::new();
                    for window in (1..=PER_TASK).collect::<Vec<_>>().chunks(50) {
                        let mut pending = Vec::new();
                        for first in window {
                            pending
                                .push(writer.submit(envelope(DOC, author, *first)).await.unwrap());
                        }
                        for p in pending {
                            match p.outcome().await.unwrap() {
                                AppendOutcome::Stored { seq } => seqs.push(seq),
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        writer.shutdown().await.unwrap();
        all
    });
    thread.join().unwrap();
    let total = u64::from(TASKS) * PER_TASK;
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(distinct.len() as u64, total);
    assert_eq!(distinct, (1..=total).collect());
    let stats = writer.stats();
    assert_eq!(stats.envelopes, total);
    assert!(stats.batches <= total);

    let reader = RelayReader::open(dir.path()).unwrap();
    let fetched = reader.fetch(&DOC, 0, total as usize, usize::MAX).unwrap();
    assert_eq!(fetched.items.len() as u64, total);
    assert!(!fetched.more);
    for author in 1..=TASKS {
        let first = envelope(DOC, author, 1);
        assert!(fetched.items.iter().any(|(_, b)| *b == first.bytes));
    }
}

#[test]
fn shutdown_finishes_queued_appends_and_refuses_later_ones() {
    const N: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    runtime().block_on(async {
        writer.create_doc(DOC, GROUP).await.unwrap();
        let mut pending = Vec::new();
        for first in 1..=N {
            pending.push(writer.submit(envelope(DOC, 1, first)).await.unwrap());
        }
        // Queued behind every append above: it returns once they are committed.
        writer.shutdown().await.unwrap();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(
                p.outcome().await.unwrap(),
                AppendOutcome::Stored { seq: i as u64 + 1 }
            );
        }
        assert!(matches!(
            writer.submit(envelope(DOC, 1, N + 1)).await,
            Err(WriterError::Stopped)
        ));
        assert!(matches!(
            writer.create_doc(DOC, GROUP).await,
            Err(WriterError::Stopped)
        ));
        // A second shutdown is harmless.
        writer.shutdown().await.unwrap();
    });
    thread.join().unwrap();
    let store = RelayStore::open(dir.path(), RelayStoreOptions::default()).unwrap();
    assert_eq!(store.last_seq(), N);
}

#[test]
fn dropping_every_handle_also_drains_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    let pending: Vec<_> = runtime().block_on(async {
        writer.create_doc(DOC, GROUP).await.unwrap();
        let mut pending = Vec::new();
        for first in 1..=100 {
            pending.push(writer.submit(envelope(DOC, 1, first)).await.unwrap());
        }
        pending
    });
    drop(writer);
    thread.join().unwrap();
    for p in pending {
        assert!(matches!(
            p.blocking_outcome(),
            Ok(AppendOutcome::Stored { .. })
        ));
    }
    let store = RelayStore::open(dir.path(), RelayStoreOptions::default()).unwrap();
    assert_eq!(store.last_seq(), 100);
}

#[test]
fn other_writes_take_effect_in_queue_order() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    runtime().block_on(async {
        // Queued without waiting: the append behind the creation must see the document.
        let early = writer.submit(envelope(DOC, 1, 1)).await.unwrap();
        let create = {
            let writer = writer.clone();
            tokio::spawn(async move { writer.create_doc(DOC, GROUP).await })
        };
        create.await.unwrap().unwrap();
        let late = writer.submit(envelope(DOC, 1, 2)).await.unwrap();
        assert_eq!(early.outcome().await.unwrap(), AppendOutcome::UnknownDoc);
        assert_eq!(
            late.outcome().await.unwrap(),
            AppendOutcome::Stored { seq: 1 }
        );

        writer
            .append_log_entries(ALICE, 0, vec![b"genesis".to_vec()])
            .await
            .unwrap();
        writer
            .put_group_update(GROUP, 0, b"members".to_vec())
            .await
            .unwrap();
        // A refused write comes back as the store's typed error.
        match writer.put_group_update(GROUP, 5, b"gap".to_vec()).await {
            Err(WriterError::Store(e)) => assert!(matches!(
                *e,
                RelayStoreError::GroupVersionMismatch {
                    expected: 1,
                    found: 5,
                    ..
                }
            )),
            other => panic!("unexpected {other:?}"),
        }
        writer.shutdown().await.unwrap();
    });
    thread.join().unwrap();
    let reader = RelayReader::open(dir.path()).unwrap();
    assert_eq!(
        reader.device_logs().unwrap(),
        [(ALICE, vec![b"genesis".to_vec()])]
    );
    assert_eq!(
        reader.groups().unwrap(),
        [(GROUP, vec![b"members".to_vec()])]
    );
}

#[test]
fn a_blocking_caller_can_append() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    runtime().block_on(writer.create_doc(DOC, GROUP)).unwrap();
    let pending = writer.blocking_submit(envelope(DOC, 3, 1)).unwrap();
    assert_eq!(
        pending.blocking_outcome().unwrap(),
        AppendOutcome::Stored { seq: 1 }
    );
    drop(writer);
    thread.join().unwrap();
}

#[test]
fn snapshots_are_written_in_queue_order_and_kept_only_when_they_cover_more() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, thread) = spawn(dir.path());
    let snapshot = |covers: u64| NewSnapshot {
        doc: DOC,
        account: ALICE,
        author: DeviceId::from_bytes([1; 32]),
        covers,
        bytes: vec![covers as u8; 40],
    };
    runtime().block_on(async {
        writer.create_doc(DOC, GROUP).await.unwrap();
        // Queued behind the append it covers.
        let pending = writer.submit(envelope(DOC, 1, 1)).await.unwrap();
        assert!(writer.put_snapshot(snapshot(1)).await.unwrap());
        assert_eq!(
            pending.outcome().await.unwrap(),
            AppendOutcome::Stored { seq: 1 }
        );
        assert!(!writer.put_snapshot(snapshot(1)).await.unwrap());
        // A document never created is an error, not a panic.
        let mut unknown = snapshot(2);
        unknown.doc = DocId::from_bytes([0xee; 32]);
        assert!(matches!(
            writer.put_snapshot(unknown).await,
            Err(WriterError::Store(_))
        ));
        writer.shutdown().await.unwrap();
    });
    thread.join().unwrap();
    let reader = RelayReader::open(dir.path()).unwrap();
    assert_eq!(reader.snapshot(&DOC, &ALICE).unwrap().unwrap().covers, 1);
}
