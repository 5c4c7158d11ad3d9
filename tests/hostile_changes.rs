//! Remote changes that do not fit the documents' shape are refused with a typed error: Automerge
//! would panic on some of them, and no peer input may crash a device.

use std::num::NonZeroU64;

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
use automerge::{ActorId, Change, ExpandedChange, ObjType, ScalarValue};
use roamsync::ids::{AccountId, DeviceId, DocAddr};
use roamsync::model::{ChangeBatch, Draft, ModelConfig, ModelError, Replica};

fn replica(account: u8, device: u8) -> Replica {
    Replica::new(
        AccountId::from_bytes([account; 32]),
        DeviceId::from_bytes([device; 32]),
        ModelConfig::default(),
    )
    .unwrap()
}

fn sync(from: &Replica, to: &mut Replica) {
    let batches = from
        .docs()
        .iter()
        .filter(|a| !matches!(a, DocAddr::Account(x) if *x != to.account()))
        .filter_map(|a| from.changes_since(a, &to.version_vector(a)))
        .collect();
    assert!(to.apply(0, batches).rejected.is_empty());
}

fn change(attacker: &ActorId, deps: Vec<automerge::ChangeHash>, operations: Vec<Op>) -> Change {
    Change::from(ExpandedChange {
        operations,
        actor_id: attacker.clone(),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::new(1_000).unwrap(),
        time: 0,
        message: None,
        deps,
        extra_bytes: Vec::new(),
        author: None,
    })
}

fn put(obj: ObjectId, key: Key, insert: bool) -> Op {
    Op {
        action: OpType::Put(ScalarValue::Int(1)),
        obj,
        key,
        pred: SortedVec::new(),
        insert,
    }
}

#[test]
fn shape_violations_are_refused_without_panicking() {
    let mut alice = replica(1, 1);
    let c = alice
        .create_conversation(1, "x", &[AccountId::from_bytes([2; 32])])
        .unwrap();
    alice.send(2, &c, &Draft::text("hello")).unwrap();
    let seg = DocAddr::Segment(c, 0);
    let attacker = ActorId::from([9u8; 32]);
    let ghost = OpId(999, attacker.clone());
    let cases: Vec<(&str, Vec<Op>)> = vec![
        (
            "unknown object",
            vec![put(
                ObjectId::Id(ghost.clone()),
                Key::Map("k".into()),
                false,
            )],
        ),
        (
            "list key on root",
            vec![put(
                ObjectId::Root,
                Key::Seq(ElementId::Id(ghost.clone())),
                true,
            )],
        ),
        (
            "unknown predecessor",
            vec![Op {
                action: OpType::Put(ScalarValue::Int(1)),
                obj: ObjectId::Root,
                key: Key::Map("k".into()),
                pred: SortedVec::from(vec![ghost.clone()]),
                insert: false,
            }],
        ),
        (
            "counter",
            vec![Op {
                action: OpType::Increment(1),
                obj: ObjectId::Root,
                key: Key::Map("k".into()),
                pred: SortedVec::new(),
                insert: false,
            }],
        ),
        (
            "text object",
            vec![Op {
                action: OpType::Make(ObjType::Text),
                obj: ObjectId::Root,
                key: Key::Map("t".into()),
                pred: SortedVec::new(),
                insert: false,
            }],
        ),
        (
            "list insert after an unknown element",
            vec![
                Op {
                    action: OpType::Make(ObjType::List),
                    obj: ObjectId::Root,
                    key: Key::Map("l".into()),
                    pred: SortedVec::new(),
                    insert: false,
                },
                put(
                    ObjectId::Id(OpId(1_000, attacker.clone())),
                    Key::Seq(ElementId::Id(ghost.clone())),
                    true,
                ),
            ],
        ),
    ];
    for (name, ops) in cases {
        let mut bob = replica(2, 2);
        sync(&alice, &mut bob);
        let bad = change(&attacker, bob.heads(&seg), ops);
        let report = bob.apply(
            3,
            vec![ChangeBatch {
                addr: seg,
                changes: vec![bad],
            }],
        );
        assert!(
            matches!(
                report.rejected.as_slice(),
                [(_, ModelError::MalformedChange { .. })]
            ),
            "{name}: {:?}",
            report.rejected
        );
        assert_eq!(
            bob.history(&c, None, 10).unwrap().messages.len(),
            1,
            "{name}"
        );
        // The device keeps working.
        bob.send(4, &c, &Draft::text("still fine")).unwrap();
    }
}

#[test]
fn valid_changes_in_the_same_batch_still_apply() {
    let mut alice = replica(1, 1);
    let c = alice
        .create_conversation(1, "x", &[AccountId::from_bytes([2; 32])])
        .unwrap();
    let mut bob = replica(2, 2);
    sync(&alice, &mut bob);
    let seg = DocAddr::Segment(c, 0);
    let before = bob.version_vector(&seg);
    alice.send(2, &c, &Draft::text("good")).unwrap();
    let good = alice.changes_since(&seg, &before).unwrap();
    let attacker = ActorId::from([9u8; 32]);
    let bad = change(
        &attacker,
        bob.heads(&seg),
        vec![put(
            ObjectId::Id(OpId(5, attacker.clone())),
            Key::Map("k".into()),
            false,
        )],
    );
    let mut changes = good.changes;
    changes.push(bad);
    let report = bob.apply(3, vec![ChangeBatch { addr: seg, changes }]);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.new_messages.len(), 1);
    assert_eq!(
        bob.history(&c, None, 10).unwrap().messages[0]
            .body
            .as_deref(),
        Some("good")
    );
}

#[test]
fn messages_with_attachments_pass_the_checks() {
    let mut alice = replica(1, 1);
    let c = alice
        .create_conversation(1, "x", &[AccountId::from_bytes([2; 32])])
        .unwrap();
    let files = vec![
        roamsync::model::Attachment {
            hash: [1; 32],
            size: 10,
            mime: "image/png".into(),
            name: "a.png".into(),
        },
        roamsync::model::Attachment {
            hash: [2; 32],
            size: 20,
            mime: "text/plain".into(),
            name: "b.txt".into(),
        },
    ];
    let id = alice
        .send(
            2,
            &c,
            &Draft {
                attachments: files.clone(),
                ..Draft::text("two files")
            },
        )
        .unwrap();
    let mut bob = replica(2, 2);
    sync(&alice, &mut bob);
    assert_eq!(bob.message(&c, &id).unwrap().attachments, files);
}
