//! Documents written by a misbehaving member device: queries never panic, and malformed entries
//! neither hide the well-formed messages nor break paging.

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ScalarValue, transaction::Transaction};

use super::{T0, account, device, replica, sync};
use crate::ids::{DeviceId, DocAddr, MessageId};
use crate::model::doc::actor_of;
use crate::model::hlc::Hlc;
use crate::model::{ChangeBatch, Draft, Replica};

/// One change by `attacker` on top of what `victim` holds of `addr`.
fn hostile_change(
    victim: &Replica,
    addr: DocAddr,
    attacker: DeviceId,
    f: impl FnOnce(&mut Transaction<'_>),
) -> ChangeBatch {
    let mut doc = victim
        .synced_doc(&addr)
        .map_or_else(Automerge::new, |d| d.doc().fork())
        .with_actor(actor_of(&attacker));
    let mut tx = doc.transaction();
    f(&mut tx);
    tx.commit();
    ChangeBatch {
        addr,
        changes: vec![doc.get_last_local_change().expect("one change written")],
    }
}

fn key_of(attacker: DeviceId, ms: u64) -> String {
    MessageId {
        hlc: Hlc::new(ms, 0),
        device: attacker,
    }
    .key()
    .encode()
}

/// Every message id, oldest first, by walking pages of `limit`.
fn walk(r: &Replica, c: &crate::ids::ConversationId, limit: usize) -> Vec<MessageId> {
    let mut out = Vec::new();
    let mut before = None;
    for _ in 0..1_000 {
        let page = r.history(c, before, limit).unwrap();
        out.splice(0..0, page.messages.iter().map(|m| m.id));
        match page.next {
            Some(next) => before = Some(next),
            None => return out,
        }
    }
    panic!("paging does not terminate");
}

#[test]
fn malformed_messages_do_not_hide_history() {
    let mut a = replica(1, 1, 16);
    let mut b = replica(2, 2, 16);
    let c = a.create_conversation(T0, "victim", &[account(2)]).unwrap();
    let sent: Vec<MessageId> = (0..3)
        .map(|i| a.send(T0 + i, &c, &Draft::text(format!("{i}"))).unwrap())
        .collect();
    sync(&a, &mut b, T0 + 5);
    let segment = DocAddr::Segment(c, 0);
    let attacker = device(9);
    let batch = hostile_change(&a, segment, attacker, |tx| {
        // Newer than every real message: maps without an author, with a short author, a
        // scalar where a map belongs, a map that claims another device's key.
        tx.put_object(automerge::ROOT, key_of(attacker, T0 + 100), ObjType::Map)
            .unwrap();
        let short = tx
            .put_object(automerge::ROOT, key_of(attacker, T0 + 101), ObjType::Map)
            .unwrap();
        tx.put(&short, "acct", vec![1u8, 2, 3]).unwrap();
        tx.put(automerge::ROOT, key_of(attacker, T0 + 102), "scalar")
            .unwrap();
        tx.put_object(automerge::ROOT, key_of(device(1), T0 + 103), ObjType::Map)
            .unwrap();
        tx.put(automerge::ROOT, "not a key", 7).unwrap();
    });
    let report = a.apply(T0 + 6, vec![batch]);
    assert!(report.rejected.is_empty());
    for limit in [1, 2, 3, 10] {
        assert_eq!(walk(&a, &c, limit), sent, "limit {limit}");
    }
    let summary = a.conversation_summary(&c).unwrap();
    assert_eq!(summary.last_message.map(|m| m.id), Some(sent[2]));
    assert_eq!(a.unread_count(&c).unwrap(), 0);
    // Sending on top of the malformed entries still works and counts only real messages.
    let next = a.send(T0 + 200, &c, &Draft::text("after")).unwrap();
    assert_eq!(a.history(&c, None, 1).unwrap().messages[0].id, next);
}

#[test]
fn malformed_message_fields_are_ignored() {
    let mut a = replica(1, 1, 16);
    let c = a.create_conversation(T0, "fields", &[account(2)]).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let attacker = device(9);
    a.send(T0, &c, &Draft::text("first")).unwrap();
    let batch = hostile_change(&a, segment, attacker, |tx| {
        let m = tx
            .put_object(automerge::ROOT, key_of(attacker, T0 + 10), ObjType::Map)
            .unwrap();
        tx.put(&m, "acct", account(2).as_bytes().to_vec()).unwrap();
        tx.put(&m, "body", 42).unwrap();
        tx.put(&m, "reply", vec![0u8; 3]).unwrap();
        tx.put(&m, "att", "not a list").unwrap();
        tx.put(&m, "edited", "yes").unwrap();
        tx.put(&m, "rx/short", true).unwrap();
        tx.put(&m, format!("rx/{}/", account(2)), true).unwrap();
        tx.put(&m, format!("rx/{}", "g".repeat(64)), true).unwrap();
        tx.put(&m, format!("rx/{}/é", "é".repeat(40)), true)
            .unwrap();
        tx.put(&m, format!("rx/{}/ok", account(2)), ScalarValue::Int(1))
            .unwrap();
        tx.put(&m, format!("rx/{}/👍", account(2)), true).unwrap();
    });
    assert!(a.apply(T0 + 11, vec![batch]).rejected.is_empty());
    let id = MessageId {
        hlc: Hlc::new(T0 + 10, 0),
        device: attacker,
    };
    let m = a.message(&c, &id).unwrap();
    assert_eq!(m.author, account(2));
    assert_eq!(m.body.as_deref(), Some(""));
    assert_eq!(m.reply_to, None);
    assert!(m.attachments.is_empty());
    assert!(!m.edited);
    assert_eq!(m.reactions.len(), 1);
    assert_eq!(m.reactions[0].reaction, "👍");
    assert_eq!(a.unread_count(&c).unwrap(), 1);
}

#[test]
fn malformed_meta_entries_never_panic() {
    let mut a = replica(1, 1, 2);
    let c = a.create_conversation(T0, "meta", &[account(2)]).unwrap();
    let meta = DocAddr::Meta(c);
    let batch = hostile_change(&a, meta, device(9), |tx| {
        tx.put(automerge::ROOT, "member/zz", 1).unwrap();
        tx.put(automerge::ROOT, "setting/odd", 5).unwrap();
        tx.put(automerge::ROOT, "seg/zzzzzzzz", "").unwrap();
        tx.put(automerge::ROOT, "seg/1", "").unwrap();
        // The largest segment number there is: sends must not overflow past it.
        tx.put(automerge::ROOT, "seg/ffffffff", "").unwrap();
    });
    assert!(a.apply(T0 + 1, vec![batch]).rejected.is_empty());
    assert_eq!(a.members(&c).unwrap(), vec![account(1), account(2)]);
    assert!(a.settings(&c).unwrap().is_empty());
    let sent: Vec<MessageId> = (0..5)
        .map(|i| {
            a.send(T0 + 2 + i, &c, &Draft::text(format!("{i}")))
                .unwrap()
        })
        .collect();
    assert_eq!(walk(&a, &c, 2), sent);
    for id in &sent {
        assert!(a.message(&c, id).is_ok());
    }
}

/// A change by `attacker` on top of `deps` made of one raw operation.
fn raw_change(
    attacker: &DeviceId,
    deps: Vec<automerge::ChangeHash>,
    op: automerge::legacy::Op,
) -> automerge::Change {
    automerge::Change::from(automerge::ExpandedChange {
        operations: vec![op],
        actor_id: actor_of(attacker),
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::MIN.saturating_add(99),
        time: 0,
        message: None,
        deps,
        extra_bytes: Vec::new(),
        author: None,
    })
}

/// Automerge 0.12 panics (instead of returning an error) when a change refers to an object or list
/// element the document does not have; the model checks remote operations first
/// (`model::validate`), so such a change is refused and the device keeps working.
#[test]
fn operations_on_unknown_objects_are_refused_not_panics() {
    use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};

    let mut a = replica(1, 1, 16);
    let c = a.create_conversation(T0, "x", &[account(2)]).unwrap();
    a.send(T0, &c, &Draft::text("hi")).unwrap();
    let segment = DocAddr::Segment(c, 0);
    let attacker = device(9);
    let ghost = OpId(999, actor_of(&attacker));
    let ops = [
        Op {
            action: OpType::Put(ScalarValue::Int(1)),
            obj: ObjectId::Id(ghost.clone()),
            key: Key::Map("k".into()),
            pred: SortedVec::new(),
            insert: false,
        },
        Op {
            action: OpType::Put(ScalarValue::Int(1)),
            obj: ObjectId::Root,
            key: Key::Seq(ElementId::Id(ghost)),
            pred: SortedVec::new(),
            insert: true,
        },
    ];
    for op in ops {
        let mut b = replica(1, 2, 16);
        sync(&a, &mut b, T0);
        let change = raw_change(&attacker, a.heads(&segment), op);
        let report = b.apply(
            T0,
            vec![ChangeBatch {
                addr: segment,
                changes: vec![change],
            }],
        );
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(b.history(&c, None, 10).unwrap().messages.len(), 1);
    }
}
