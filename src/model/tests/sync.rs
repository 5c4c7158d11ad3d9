//! The sync surface: version vectors, heads, buffering of out-of-order changes, duplicates.

use super::{T0, account, device, replica, sync};
use crate::ids::DocAddr;
use crate::model::{ChangeBatch, Draft, VersionVector};

#[test]
fn out_of_order_changes_wait_for_their_dependencies() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "order", &[account(2)]).unwrap();
    let sent: Vec<_> = (0..3)
        .map(|i| {
            a.send(T0 + 1 + i, &c, &Draft::text(format!("{i}")))
                .unwrap()
        })
        .collect();
    let segment = DocAddr::Segment(c, 0);
    let batch = a.changes_since(&segment, &VersionVector::new()).unwrap();
    assert_eq!(batch.changes.len(), 3);
    let one = |i: usize| ChangeBatch {
        addr: segment,
        changes: vec![batch.changes[i].clone()],
    };
    for (i, waiting) in [(2, 1), (1, 2)] {
        let report = b.apply(T0 + 10, vec![one(i)]);
        assert_eq!(report.docs[0].1.applied, 0);
        assert_eq!(report.docs[0].1.pending, waiting);
        assert!(report.new_messages.is_empty());
        assert_eq!(b.version_vector(&segment), VersionVector::new());
    }
    let report = b.apply(T0 + 10, vec![one(0)]);
    assert_eq!(report.docs[0].1.applied, 3);
    assert_eq!(report.docs[0].1.pending, 0);
    let new: Vec<_> = report.new_messages.iter().map(|(_, m)| *m).collect();
    assert_eq!(new, sent, "new messages are reported in conversation order");
    assert_eq!(b.version_vector(&segment), a.version_vector(&segment));
    assert_eq!(b.heads(&segment), a.heads(&segment));
    // The meta document has not arrived: the conversation is not listed yet, history works.
    assert!(b.conversation_list().unwrap().is_empty());
    assert_eq!(b.history(&c, None, 10).unwrap().messages.len(), 3);
    sync(&a, &mut b, T0 + 11);
    assert_eq!(b.conversation_list().unwrap().len(), 1);
}

#[test]
fn duplicates_are_ignored() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "dup", &[account(2)]).unwrap();
    let m = a.send(T0 + 1, &c, &Draft::text("once")).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let batch = a.changes_since(&segment, &VersionVector::new()).unwrap();
    // The same change twice in one call, and the whole batch again later.
    let report = b.apply(T0 + 2, vec![batch.clone(), batch.clone()]);
    assert_eq!(report.docs[0].1.applied, 1);
    assert_eq!(report.docs[0].1.duplicates, 1);
    assert_eq!(report.new_messages, vec![(c, m)]);
    let report = b.apply(T0 + 3, vec![batch]);
    assert_eq!(report.docs[0].1.applied, 0);
    assert_eq!(report.docs[0].1.duplicates, 1);
    assert!(report.new_messages.is_empty());
    assert_eq!(b.history(&c, None, 10).unwrap().messages.len(), 1);
}

#[test]
fn version_vectors_and_heads_summarise_what_is_held() {
    let mut a1 = replica(1, 1, 16);
    let mut a2 = replica(1, 2, 16);
    let c = a1.create_conversation(T0, "vv", &[]).unwrap();
    a1.send(T0 + 1, &c, &Draft::text("x")).unwrap();
    sync(&a1, &mut a2, T0 + 2);
    a2.send(T0 + 3, &c, &Draft::text("y")).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let v1 = a1.version_vector(&segment);
    let v2 = a2.version_vector(&segment);
    assert_eq!((v2.seq(&device(1)), v2.seq(&device(2))), (1, 1));
    assert!(v2.dominates(&v1) && !v1.dominates(&v2));
    // Exactly the missing change, whether asked by version vector or by heads.
    let by_vv = a2.changes_since(&segment, &v1).unwrap();
    let by_heads = a2
        .changes_since_heads(&segment, &a1.heads(&segment))
        .unwrap();
    assert_eq!(by_vv.changes.len(), 1);
    let hashes = |b: &ChangeBatch| b.changes.iter().map(|c| c.hash()).collect::<Vec<_>>();
    assert_eq!(hashes(&by_vv), hashes(&by_heads));
    a1.apply(T0 + 4, vec![by_heads]);
    assert_eq!(a1.version_vector(&segment), v2);
    assert!(a2.changes_since(&segment, &v2).is_none());
    assert!(
        a2.changes_since_heads(&segment, &a2.heads(&segment))
            .is_none()
    );
    // Documents that are not held have empty summaries.
    let elsewhere = DocAddr::Segment(c, 9);
    assert_eq!(a1.version_vector(&elsewhere), VersionVector::new());
    assert!(a1.heads(&elsewhere).is_empty());
    assert!(
        a1.changes_since(&elsewhere, &VersionVector::new())
            .is_none()
    );
}

#[test]
fn a_document_split_over_batches_is_applied_in_one_call() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "split", &[account(2)]).unwrap();
    for i in 0..5 {
        a.send(T0 + i, &c, &Draft::text(format!("{i}"))).unwrap();
    }
    let segment = DocAddr::Segment(c, 0);
    let batch = a.changes_since(&segment, &VersionVector::new()).unwrap();
    // Newest first, one change per batch: only grouping them makes them applicable.
    let split: Vec<ChangeBatch> = batch
        .changes
        .iter()
        .rev()
        .map(|ch| ChangeBatch {
            addr: segment,
            changes: vec![ch.clone()],
        })
        .collect();
    let report = b.apply(T0 + 10, split);
    assert_eq!(report.docs.len(), 1);
    assert_eq!(report.docs[0].1.applied, 5);
    assert_eq!(report.docs[0].1.pending, 0);
}

#[test]
fn a_saved_document_loads_with_its_change_log() {
    use crate::model::ModelError;
    use crate::model::doc::SyncedDoc;
    use crate::model::segment::Segment;
    use automerge::{ActorId, Automerge, transaction::Transactable};

    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "save", &[account(2)]).unwrap();
    a.send(T0 + 1, &c, &Draft::text("a")).unwrap();
    sync(&a, &mut b, T0 + 2);
    b.send(T0 + 3, &c, &Draft::text("b")).unwrap();
    sync(&b, &mut a, T0 + 4);
    let addr = DocAddr::Segment(c, 0);
    let held = a.synced_doc(&addr).unwrap();
    let mut loaded = SyncedDoc::load(addr, device(1), &held.save()).unwrap();
    assert_eq!(loaded.addr(), addr);
    assert_eq!(loaded.version_vector(), held.version_vector());
    assert_eq!(loaded.heads(), held.heads());
    let hashes = |d: &SyncedDoc| {
        let mut h: Vec<_> = d
            .changes_since(&VersionVector::new())
            .iter()
            .map(|c| c.hash())
            .collect();
        h.sort();
        h
    };
    assert_eq!(hashes(&loaded), hashes(held));
    // The loaded document keeps writing as its device, continuing its sequence.
    loaded
        .write(|tx| {
            tx.put(automerge::ROOT, "x", 1)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(loaded.version_vector().seq(&device(1)), 2);
    let segment = Segment::from_doc(0, SyncedDoc::load(addr, device(1), &held.save()).unwrap());
    assert_eq!(segment.len(), 2);

    assert!(matches!(
        SyncedDoc::load(addr, device(1), b"not a document"),
        Err(ModelError::Automerge(_))
    ));
    let mut foreign = Automerge::new().with_actor(ActorId::from(&[1u8; 4][..]));
    let mut tx = foreign.transaction();
    tx.put(automerge::ROOT, "k", 1).unwrap();
    tx.commit();
    assert!(matches!(
        SyncedDoc::load(addr, device(1), &foreign.save()),
        Err(ModelError::BadActor { len: 4 })
    ));
}

#[test]
fn new_messages_are_reported_in_conversation_order_across_segments() {
    use super::batches;

    let mut a = replica(1, 1, 2);
    let mut b = replica(2, 2, 2);
    let mut c_dev = replica(2, 3, 2);
    let c = a.create_conversation(T0, "order", &[account(2)]).unwrap();
    let m0 = a.send(T0 + 1, &c, &Draft::text("m0")).unwrap();
    sync(&a, &mut b, T0 + 2);
    // a fills segment 0 and opens segment 1; b, offline, still sees room in segment 0 and
    // writes a newer message there.
    let m1 = a.send(T0 + 10, &c, &Draft::text("m1")).unwrap();
    let m2 = a.send(T0 + 30, &c, &Draft::text("m2")).unwrap();
    let m3 = b.send(T0 + 40, &c, &Draft::text("m3")).unwrap();
    let mut all = batches(&a, &c_dev);
    all.extend(batches(&b, &c_dev));
    let report = c_dev.apply(T0 + 50, all);
    assert!(report.rejected.is_empty());
    let new: Vec<_> = report.new_messages.iter().map(|(_, m)| *m).collect();
    assert_eq!(new, vec![m0, m1, m2, m3]);
    assert!(report.new_messages.iter().all(|(x, _)| *x == c));
}

/// The key index kept up to date from the keys that remote changes write equals the index a full
/// scan of the document builds, however the changes arrive.
#[test]
fn incremental_index_equals_a_full_scan() {
    use crate::model::segment::Segment;
    let mut a = replica(1, 1, 64);
    let mut b = replica(2, 2, 64);
    let mut r = replica(3, 3, 64);
    let c = a
        .create_conversation(T0, "index", &[account(2), account(3)])
        .unwrap();
    sync(&a, &mut b, T0);
    sync(&a, &mut r, T0);
    for i in 0..20u64 {
        let writer = if i % 3 == 0 { &mut b } else { &mut a };
        let id = writer
            .send(T0 + 1 + i, &c, &Draft::text(format!("{i}")))
            .unwrap();
        if i % 5 == 0 {
            writer.recall(&c, &id).unwrap();
        }
        // Deliver in small, uneven steps: some changes wait for others.
        if i % 4 == 3 {
            sync(&b, &mut r, T0 + 30);
        }
        if i % 7 == 6 {
            sync(&a, &mut r, T0 + 30);
        }
    }
    sync(&a, &mut r, T0 + 40);
    sync(&b, &mut r, T0 + 40);
    let addr = DocAddr::Segment(c, 0);
    let doc = r.synced_doc(&addr).unwrap();
    let rebuilt = Segment::from_doc(
        0,
        crate::model::SyncedDoc::load(addr, device(3), &doc.save()).unwrap(),
    );
    let seg_keys = |s: &Segment| s.keys_before(None, usize::MAX).to_vec();
    let incremental = r.history(&c, None, 100).unwrap().messages;
    assert_eq!(incremental.len(), 20);
    assert_eq!(
        incremental.iter().map(|m| m.id.key()).collect::<Vec<_>>(),
        seg_keys(&rebuilt)
    );
}

proptest::proptest! {
    #[test]
    fn version_vectors_round_trip_and_garbage_is_an_error(
        entries in proptest::collection::btree_map(proptest::prelude::any::<[u8; 32]>(), 1u64.., 0..8),
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
    ) {
        let mut vv = VersionVector::new();
        for (d, s) in &entries {
            vv.set(crate::ids::DeviceId::from_bytes(*d), *s);
        }
        let bytes = vv.encode();
        proptest::prop_assert_eq!(VersionVector::decode(&bytes).unwrap(), vv);
        if !bytes.is_empty() {
            proptest::prop_assert!(VersionVector::decode(&bytes[..bytes.len() - 1]).is_err());
        }
        let _ = VersionVector::decode(&garbage);
    }
}

#[test]
fn updates_of_existing_messages_are_reported_by_kind() {
    use crate::model::MessageUpdate;
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "updates", &[account(2)]).unwrap();
    let m = a.send(T0 + 1, &c, &Draft::text("first")).unwrap();
    let report = sync(&a, &mut b, T0 + 2);
    assert_eq!(report.new_messages, vec![(c, m)]);
    assert!(
        report.updated_messages.is_empty(),
        "a new message is not an update"
    );
    a.edit(&c, &m, "first, edited").unwrap();
    a.react(&c, &m, "👍", true).unwrap();
    let report = sync(&a, &mut b, T0 + 3);
    assert!(report.new_messages.is_empty());
    assert_eq!(
        report.updated_messages,
        vec![
            (c, m, MessageUpdate::Edited),
            (c, m, MessageUpdate::Reactions)
        ]
    );
    a.recall(&c, &m).unwrap();
    let report = sync(&a, &mut b, T0 + 4);
    assert!(
        report
            .updated_messages
            .contains(&(c, m, MessageUpdate::Recalled))
    );
}

#[test]
fn claimed_accounts_name_message_authors_and_reactors() {
    use crate::model::claimed_accounts;
    let mut a = replica(1, 1, 16);
    let c = a.create_conversation(T0, "claims", &[account(2)]).unwrap();
    let m = a.send(T0 + 1, &c, &Draft::text("mine")).unwrap();
    a.react(&c, &m, "👍", true).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let batch = a.changes_since(&segment, &VersionVector::new()).unwrap();
    assert_eq!(claimed_accounts(&batch.changes), Some(vec![account(1)]));
    // A device that writes as another account is visible as such: the sync layer refuses it.
    let mut forger = replica(9, 1, 16);
    let c2 = forger.create_conversation(T0, "x", &[account(2)]).unwrap();
    forger
        .send(T0 + 1, &c2, &Draft::text("as someone else"))
        .unwrap();
    let batch = forger
        .changes_since(&DocAddr::Segment(c2, 0), &VersionVector::new())
        .unwrap();
    assert_eq!(claimed_accounts(&batch.changes), Some(vec![account(9)]));
}

#[test]
fn cached_unread_counts_match_a_fresh_count_through_late_arrivals_recalls_and_hides() {
    let mut a = replica(1, 1, 4);
    let mut c2 = replica(3, 3, 4);
    let mut b = replica(2, 2, 4);
    let c = a
        .create_conversation(T0, "unread", &[account(2), account(3)])
        .unwrap();
    sync(&a, &mut c2, T0 + 1);
    sync(&a, &mut b, T0 + 1);
    let check = |b: &crate::model::Replica, step: &str| {
        let cached = b.unread_count(&c).unwrap();
        assert_eq!(cached, b.unread_count_uncached(&c), "{step}");
        cached
    };
    // C writes offline (older timestamps), A writes now; B counts A's first.
    let late: Vec<_> = (0..3)
        .map(|i| c2.send(T0 + 2 + i, &c, &Draft::text("late")).unwrap())
        .collect();
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(a.send(T0 + 100 + i, &c, &Draft::text("now")).unwrap());
    }
    sync(&a, &mut b, T0 + 200);
    assert_eq!(check(&b, "after A's messages"), 10);
    sync(&c2, &mut b, T0 + 201);
    assert_eq!(check(&b, "after late arrivals below the cached newest"), 13);
    a.recall(&c, &sent[9]).unwrap();
    sync(&a, &mut b, T0 + 202);
    assert_eq!(check(&b, "after a recall"), 12);
    b.hide_message(&c, &late[0]).unwrap();
    assert_eq!(check(&b, "after a hide"), 11);
    b.mark_read(&c, &sent[4]).unwrap();
    assert_eq!(check(&b, "after reading"), 4);
    b.send(T0 + 300, &c, &Draft::text("mine")).unwrap();
    assert_eq!(check(&b, "after own message"), 0);
    a.send(T0 + 400, &c, &Draft::text("new")).unwrap();
    sync(&a, &mut b, T0 + 401);
    assert_eq!(check(&b, "after a new message past the cache"), 1);
}

#[test]
fn rewriting_or_deleting_a_message_author_is_not_a_claim_that_passes() {
    use crate::model::claimed_accounts;
    use automerge::{ReadDoc, transaction::Transactable};
    let mut a = replica(1, 1, 16);
    let c = a.create_conversation(T0, "authors", &[account(2)]).unwrap();
    let m = a.send(T0 + 1, &c, &Draft::text("mine")).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let saved = a.save_doc(&segment).unwrap();
    for delete in [false, true] {
        let mut doc = automerge::AutoCommit::load(&saved).unwrap();
        doc.set_actor(automerge::ActorId::from(device(2).as_bytes()));
        let (_, obj) = doc
            .get(automerge::ROOT, m.key().encode())
            .unwrap()
            .expect("the message map");
        if delete {
            doc.delete(&obj, "acct").unwrap();
        } else {
            doc.put(
                &obj,
                "acct",
                automerge::ScalarValue::Bytes(account(2).as_bytes().to_vec()),
            )
            .unwrap();
        }
        let change = doc.get_last_local_change().unwrap().clone();
        assert_eq!(claimed_accounts(&[change]), None, "delete: {delete}");
    }
}
