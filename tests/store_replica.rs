//! The stored replica: operations are durable, reopening restores everything, memory stays within
//! the cache budget, nothing is readable at rest.

use std::path::Path;

use roamsync::ids::{AccountId, DeviceId, DocAddr, MessageId};
use roamsync::model::{ChangeBatch, Cursor, Draft, ListFlag, ModelConfig, ModelError, Replica};
use roamsync::store::replica::{BYTES_PER_LOADED_MESSAGE, BYTES_PER_LOADED_SEGMENT};
use roamsync::store::{ReplicaStoreError, StorageKey, StoreConfig, StoreError, StoredReplica};

const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);
const BOB: AccountId = AccountId::from_bytes([0xb0; 32]);
const PHONE: DeviceId = DeviceId::from_bytes([1; 32]);
const DESK: DeviceId = DeviceId::from_bytes([2; 32]);
const BOB_PHONE: DeviceId = DeviceId::from_bytes([3; 32]);

fn config(cap: usize, segments_in_budget: usize) -> StoreConfig {
    StoreConfig {
        model: ModelConfig {
            segment_cap: cap,
            ..ModelConfig::default()
        },
        cache_budget_bytes: segments_in_budget
            * (BYTES_PER_LOADED_SEGMENT + cap * BYTES_PER_LOADED_MESSAGE),
        ..StoreConfig::default()
    }
}

fn open(path: &Path, cfg: StoreConfig) -> StoredReplica {
    StoredReplica::open(path, &StorageKey::from_bytes([9; 32]), ALICE, PHONE, cfg).unwrap()
}

/// Every message of a conversation, oldest first, by walking pages.
fn all_messages(
    r: &mut StoredReplica,
    c: &roamsync::ids::ConversationId,
) -> Vec<roamsync::model::Message> {
    let mut out = Vec::new();
    let mut before: Option<Cursor> = None;
    loop {
        let page = r.history(c, before, 7).unwrap();
        let mut msgs = page.messages;
        msgs.extend(out);
        out = msgs;
        match page.next {
            Some(cursor) => before = Some(cursor),
            None => return out,
        }
    }
}

/// What `from` has that a replica of account `to` (whose version vectors `to_vv` gives) lacks;
/// account documents stay within their account.
fn batches_for(
    from: &Replica,
    to: AccountId,
    to_vv: impl Fn(&DocAddr) -> roamsync::model::VersionVector,
) -> Vec<ChangeBatch> {
    from.docs()
        .iter()
        .filter(|a| !matches!(a, DocAddr::Account(acc) if *acc != to))
        .filter_map(|a| from.changes_since(a, &to_vv(a)))
        .collect()
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(4, 4);
    let (chat, ids, last_hlc) = {
        let mut r = open(&path, cfg);
        let chat = r.create_conversation(1_000, "weekend", &[BOB]).unwrap();
        let mut ids = Vec::new();
        for i in 0..11u64 {
            ids.push(
                r.send(1_000 + i, &chat, &Draft::text(format!("message {i}")))
                    .unwrap(),
            );
        }
        r.edit(&chat, &ids[2], "message 2, edited").unwrap();
        r.react(&chat, &ids[3], "🎉", true).unwrap();
        r.recall(&chat, &ids[4]).unwrap();
        r.hide_message(&chat, &ids[5]).unwrap();
        r.set_flag(&chat, ListFlag::Pinned, true).unwrap();
        r.set_draft(&chat, "see you").unwrap();
        (chat, ids, r.replica().clock().last())
    };
    let vv_before = {
        let mut r = open(&path, cfg);
        let before = r.version_vector(&DocAddr::Segment(chat, 2)).unwrap();
        assert!(
            r.replica().loaded_segments().is_empty(),
            "read from the store, not loaded"
        );
        before
    };
    assert!(vv_before.seq(&PHONE) > 0);
    let mut r = open(&path, cfg);
    // The list comes from stored summaries alone.
    let list = r.conversation_list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].title, "weekend");
    assert!(list[0].pinned);
    assert_eq!(list[0].draft.as_deref(), Some("see you"));
    assert_eq!(list[0].last_message.as_ref().map(|m| m.id), Some(ids[10]));
    assert_eq!(
        r.replica().loaded_segments(),
        vec![],
        "listing loaded no segment"
    );

    let msgs = all_messages(&mut r, &chat);
    let shown: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
    let expected: Vec<MessageId> = ids.iter().copied().filter(|id| *id != ids[5]).collect();
    assert_eq!(shown, expected);
    assert_eq!(
        r.message(&chat, &ids[2]).unwrap().body.as_deref(),
        Some("message 2, edited")
    );
    assert_eq!(
        r.replica().version_vector(&DocAddr::Segment(chat, 2)),
        vv_before
    );
    assert_eq!(
        r.message(&chat, &ids[3]).unwrap().reactions[0].reaction,
        "🎉"
    );
    assert!(r.message(&chat, &ids[4]).unwrap().recalled);
    // The clock resumed: a new message sorts after everything stored.
    let next = r.send(0, &chat, &Draft::text("after reopen")).unwrap();
    assert!(next.hlc > last_hlc);
}

#[test]
fn remote_batches_are_durable_and_update_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(4, 4);
    let mut bob = Replica::new(BOB, BOB_PHONE, cfg.model).unwrap();
    let chat = {
        let mut r = open(&path, cfg);
        let chat = r.create_conversation(1_000, "hi", &[BOB]).unwrap();
        r.send(1_001, &chat, &Draft::text("hello bob")).unwrap();
        let to_bob = batches_for(r.replica(), BOB, |a| bob.version_vector(a));
        assert!(bob.apply(1_002, to_bob).rejected.is_empty());
        for i in 0..6 {
            bob.send(1_010 + i, &chat, &Draft::text(format!("from bob {i}")))
                .unwrap();
        }
        let to_alice = batches_for(&bob, ALICE, |a| r.replica().version_vector(a));
        let report = r.apply(1_020, to_alice).unwrap();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert_eq!(report.new_messages.len(), 6);
        chat
    };
    let mut r = open(&path, cfg);
    let list = r.conversation_list().unwrap();
    assert_eq!(list[0].unread, 6);
    assert_eq!(
        list[0]
            .last_message
            .as_ref()
            .and_then(|m| m.text.clone())
            .as_deref(),
        Some("from bob 5")
    );
    assert_eq!(all_messages(&mut r, &chat).len(), 7);
    assert_eq!(r.unread_count(&chat).unwrap(), 6);
}

#[test]
fn changes_waiting_for_dependencies_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(8, 4);
    let mut bob = Replica::new(BOB, BOB_PHONE, cfg.model).unwrap();
    let mut r = open(&path, cfg);
    let chat = r.create_conversation(1_000, "hi", &[BOB]).unwrap();
    assert!(
        bob.apply(1, batches_for(r.replica(), BOB, |a| bob.version_vector(a)))
            .rejected
            .is_empty()
    );
    let before = bob.version_vector(&DocAddr::Segment(chat, 0));
    let first = bob.send(1_010, &chat, &Draft::text("first")).unwrap();
    let mid = bob.version_vector(&DocAddr::Segment(chat, 0));
    let second = bob.send(1_011, &chat, &Draft::text("second")).unwrap();
    // Deliver the second change alone: it waits for the first.
    let only_second = bob.changes_since(&DocAddr::Segment(chat, 0), &mid).unwrap();
    let report = r.apply(1_020, vec![only_second]).unwrap();
    assert_eq!(report.docs[0].1.pending, 1);
    drop(r);
    let mut r = open(&path, cfg);
    let first_batch = bob
        .changes_since(&DocAddr::Segment(chat, 0), &before)
        .unwrap();
    let report = r.apply(1_030, vec![first_batch]).unwrap();
    assert!(report.rejected.is_empty());
    r.message(&chat, &first).unwrap();
    r.message(&chat, &second).unwrap();
}

#[test]
fn memory_stays_within_the_cache_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(16, 3);
    let mut r = open(&path, cfg);
    let chat = r.create_conversation(1_000, "long", &[]).unwrap();
    let mut ids = Vec::new();
    for i in 0..200u64 {
        ids.push(
            r.send(2_000 + i, &chat, &Draft::text(format!("m{i}")))
                .unwrap(),
        );
        assert!(
            r.cache_bytes() <= cfg.cache_budget_bytes,
            "after send {i}: {}",
            r.cache_bytes()
        );
    }
    drop(r);
    let mut r = open(&path, cfg);
    let mut before = None;
    let mut seen = Vec::new();
    loop {
        let page = r.history(&chat, before, 10).unwrap();
        assert!(r.cache_bytes() <= cfg.cache_budget_bytes);
        seen.extend(page.messages.iter().map(|m| m.id));
        match page.next {
            Some(c) => before = Some(c),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ids);
    // Old messages are reachable by id after their segment was dropped from memory.
    assert_eq!(
        r.message(&chat, &ids[0]).unwrap().body.as_deref(),
        Some("m0")
    );
}

#[test]
fn compaction_keeps_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(1_000, 4);
    let chat;
    {
        let mut r = open(&path, cfg);
        chat = r.create_conversation(1_000, "busy", &[]).unwrap();
        for i in 0..300u64 {
            r.send(2_000 + i, &chat, &Draft::text(format!("m{i}")))
                .unwrap();
        }
        let chunks = r.store().chunk_count(&DocAddr::Segment(chat, 0)).unwrap();
        assert!(chunks < 256, "compacted: {chunks} chunks left");
    }
    let mut r = open(&path, cfg);
    assert_eq!(all_messages(&mut r, &chat).len(), 300);
}

#[test]
fn no_plaintext_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let markers = [
        "MARKER-title-7f3a",
        "MARKER-body-91c2",
        "MARKER-draft-5e0d",
        "MARKER-edit-22aa",
    ];
    {
        let mut r = open(&path, config(4, 4));
        let chat = r.create_conversation(1_000, markers[0], &[BOB]).unwrap();
        let id = r.send(1_001, &chat, &Draft::text(markers[1])).unwrap();
        for i in 0..6 {
            r.send(
                1_002 + i,
                &chat,
                &Draft::text(format!("{} {i}", markers[1])),
            )
            .unwrap();
        }
        r.set_draft(&chat, markers[2]).unwrap();
        r.edit(&chat, &id, markers[3]).unwrap();
    }
    let mut scanned = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        scanned += bytes.len();
        for m in markers {
            assert!(
                !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
                "{m} found at rest"
            );
        }
    }
    assert!(scanned > 0);
}

#[test]
fn wrong_key_and_wrong_identity_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    drop(open(&path, config(4, 4)));
    let wrong_key = StoredReplica::open(
        &path,
        &StorageKey::from_bytes([8; 32]),
        ALICE,
        PHONE,
        config(4, 4),
    );
    assert!(matches!(
        wrong_key,
        Err(ReplicaStoreError::Store(StoreError::WrongStorageKey))
    ));
    let wrong_device = StoredReplica::open(
        &path,
        &StorageKey::from_bytes([9; 32]),
        ALICE,
        DESK,
        config(4, 4),
    );
    assert!(matches!(
        wrong_device,
        Err(ReplicaStoreError::IdentityMismatch { device: PHONE, .. })
    ));
    let tiny = StoreConfig {
        cache_budget_bytes: 1,
        ..config(4, 4)
    };
    assert!(matches!(
        StoredReplica::open(&path, &StorageKey::from_bytes([9; 32]), ALICE, PHONE, tiny),
        Err(ReplicaStoreError::BudgetTooSmall { .. })
    ));
}

#[test]
fn model_errors_pass_through_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let mut r = open(&path, config(4, 4));
    let chat = r.create_conversation(1_000, "x", &[]).unwrap();
    let missing = MessageId {
        hlc: roamsync::model::hlc::Hlc::new(5, 0),
        device: PHONE,
    };
    assert!(matches!(
        r.edit(&chat, &missing, "nope"),
        Err(ReplicaStoreError::Model(ModelError::UnknownMessage { .. }))
    ));
    let unknown = roamsync::ids::ConversationId::from_bytes([0xee; 16]);
    assert!(matches!(
        r.send(1_001, &unknown, &Draft::text("x")),
        Err(ReplicaStoreError::Model(ModelError::UnknownConversation(_)))
    ));
}

#[test]
fn an_adopted_replica_reopens_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = config(8, 4);
    let mut mem = Replica::new(ALICE, PHONE, cfg.model).unwrap();
    let mut chats = Vec::new();
    for c in 0..3u64 {
        let chat = mem
            .create_conversation(1_000 + c, &format!("chat {c}"), &[BOB])
            .unwrap();
        for i in 0..20u64 {
            mem.send(2_000 + c * 100 + i, &chat, &Draft::text(format!("{c}/{i}")))
                .unwrap();
        }
        chats.push(chat);
    }
    mem.set_flag(&chats[1], ListFlag::Pinned, true).unwrap();
    let expected_list = mem.conversation_list().unwrap();
    let expected_pages: Vec<_> = chats
        .iter()
        .map(|c| mem.history(c, None, 50).unwrap())
        .collect();
    let last = mem.clock().last();
    drop(StoredReplica::adopt(&path, &StorageKey::from_bytes([9; 32]), mem, cfg).unwrap());

    let mut r = open(&path, cfg);
    assert_eq!(r.conversation_list().unwrap(), expected_list);
    for (c, page) in chats.iter().zip(expected_pages) {
        assert_eq!(r.history(c, None, 50).unwrap(), page);
    }
    assert!(r.send(0, &chats[0], &Draft::text("next")).unwrap().hlc > last);
    // A store that holds documents cannot adopt another replica.
    let again = StoredReplica::adopt(
        &path,
        &StorageKey::from_bytes([9; 32]),
        Replica::new(ALICE, PHONE, cfg.model).unwrap(),
        cfg,
    );
    assert!(matches!(again, Err(ReplicaStoreError::NotEmpty)));
}

#[test]
fn a_disk_budget_evicts_the_oldest_segments_and_marks_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let cfg = StoreConfig {
        disk_budget_bytes: Some(6_000),
        ..config(8, 2)
    };
    let mut r = open(&path, cfg);
    let chat = r.create_conversation(1_000, "long", &[]).unwrap();
    let mut ids = Vec::new();
    // 1 + 127 writes: the budget is checked after the 64th and the 128th.
    assert_eq!(roamsync::store::replica::DISK_CHECK_EVERY_WRITES, 64);
    for i in 0..127u64 {
        ids.push(
            r.send(
                2_000 + i,
                &chat,
                &Draft::text(format!("message {i} with some text")),
            )
            .unwrap(),
        );
    }
    drop(r);
    let mut r = open(&path, cfg);
    // Best effort: the account and meta documents, segments in memory and each conversation's
    // newest segment stay; other segments go, oldest first, until the content fits.
    let sizes = r.store().doc_sizes().unwrap();
    let kept_segments = sizes
        .iter()
        .filter(|(a, _, _)| matches!(a, DocAddr::Segment(..)))
        .count();
    assert!(kept_segments <= 3, "{kept_segments} of 16 segments kept");
    let stored: u64 = sizes.iter().map(|(_, s, _)| s).sum();
    assert!(stored <= 6_000 + 4_000, "stored {stored} bytes");
    // The newest messages are still there; the oldest were evicted and say so.
    let page = r.history(&chat, None, 5).unwrap();
    assert_eq!(page.messages.last().map(|m| m.id), ids.last().copied());
    assert!(matches!(
        r.message(&chat, &ids[0]),
        Err(ReplicaStoreError::Evicted(DocAddr::Segment(_, 0)))
    ));
    // An evicted segment's version vector is empty: a sync offers its changes again.
    assert_eq!(
        r.version_vector(&DocAddr::Segment(chat, 0)).unwrap(),
        roamsync::model::VersionVector::new()
    );
    r.store().integrity_check().unwrap();
}
