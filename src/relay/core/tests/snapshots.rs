//! `PutSnapshot` and snapshots in a subscription's catch-up.

use super::docs::{Chat, chat};
use super::*;

/// A snapshot of `doc` by `author` covering `covers`.
fn snapshot(author: &DeviceSecret, doc: DocId, covers: u64) -> SealedEnvelope {
    envelope(author, doc, EnvelopeKind::Snapshot, covers)
}

/// Chat with document 5 holding one envelope at sequence number 9; Alice's connection is
/// subscribed to it.
fn chat_with_doc() -> Chat {
    let mut t = chat();
    t.fx.subscribe(t.a, doc_id(5), group_id(1), 0);
    let env = envelope(&t.alice.devices[0], doc_id(5), EnvelopeKind::Changes, 1);
    let (req, _) = t.fx.append(t.a, group_id(1), env);
    t.fx.stored(t.a, req, doc_id(5), StoreOutcome::Stored { seq: 9 });
    t
}

fn put(t: &mut Chat, conn: ConnId, group: DocId, envelope: SealedEnvelope) -> Vec<Output> {
    let req = t.fx.req();
    t.fx.msg(
        conn,
        Message::PutSnapshot {
            req,
            group,
            envelope,
        },
    )
}

fn subscribe_for_snapshot(t: &mut Chat, conn: ConnId, after_seq: u64) -> Vec<Output> {
    let req = t.fx.req();
    t.fx.msg(
        conn,
        Message::Subscribe {
            req,
            items: vec![Subscription {
                doc: doc_id(5),
                group: group_id(1),
                after_seq,
                snapshot: true,
            }],
        },
    )
}

#[test]
fn a_snapshot_is_kept_for_the_authors_account_and_answered_once_durable() {
    let mut t = chat_with_doc();
    let req = t.fx.req();
    let env = snapshot(&t.alice.devices[0], doc_id(5), 9);
    let raw = t.fx.core.handle(
        Input::Message {
            conn: t.a,
            msg: Message::PutSnapshot {
                req,
                group: group_id(1),
                envelope: env.clone(),
            },
        },
        t.fx.now_ms,
    );
    // The answer waits for the write.
    match &raw[..] {
        [
            Output::Persist {
                op: PersistOp::PutSnapshot { snapshot },
                then,
            },
        ] => {
            assert_eq!(snapshot.doc, doc_id(5));
            assert_eq!(snapshot.account, t.alice.id());
            assert_eq!(snapshot.author, t.alice.devices[0].device_id());
            assert_eq!(snapshot.covers, 9);
            assert_eq!(snapshot.bytes, env.encode());
            assert_eq!(
                then,
                &vec![Output::Send {
                    conn: t.a,
                    msg: Message::Done { req }
                }]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_snapshots_are_refused_with_their_reason() {
    let mut t = chat_with_doc();
    let alice = device(1);
    let bob = device(2);
    assert_eq!(alice.device_id(), t.alice.devices[0].device_id());
    assert_eq!(bob.device_id(), t.bob.devices[0].device_id());
    let cases: Vec<(ConnId, DocId, SealedEnvelope, ErrorCode)> = vec![
        // Not a snapshot.
        (
            t.a,
            group_id(1),
            envelope(&alice, doc_id(5), EnvelopeKind::Changes, 9),
            ErrorCode::REJECTED,
        ),
        // Sealed by another device than the connection's.
        (
            t.a,
            group_id(1),
            snapshot(&bob, doc_id(5), 9),
            ErrorCode::UNAUTHORISED,
        ),
        // Covering more than the relay holds.
        (
            t.a,
            group_id(1),
            snapshot(&alice, doc_id(5), 10),
            ErrorCode::REJECTED,
        ),
        // Covering nothing.
        (
            t.a,
            group_id(1),
            snapshot(&alice, doc_id(5), 0),
            ErrorCode::REJECTED,
        ),
        // A document the relay does not know.
        (
            t.a,
            group_id(1),
            snapshot(&alice, doc_id(6), 1),
            ErrorCode::REJECTED,
        ),
        // A document of another group.
        (
            t.a,
            group_id(2),
            snapshot(&alice, doc_id(5), 9),
            ErrorCode::UNAUTHORISED,
        ),
    ];
    for (conn, group, env, code) in cases {
        let persisted = t.fx.persisted.len();
        let out = put(&mut t, conn, group, env.clone());
        assert_eq!(error_to(&out, conn).0, code, "{env:?}: {out:?}");
        assert_eq!(t.fx.persisted.len(), persisted, "nothing is stored");
    }
    // A range of sequence numbers.
    let header = EnvelopeHeader {
        kind: EnvelopeKind::Snapshot,
        doc: doc_id(5),
        epoch: KeyEpoch(0),
        author: alice.device_id(),
        first_seq: 1,
        last_seq: 9,
    };
    let env = SealedEnvelope::seal(&alice, &DocKey::from_bytes([7; 32]), header, b"s").unwrap();
    let a = t.a;
    let out = put(&mut t, a, group_id(1), env);
    assert!(error_to(&out, t.a).1.contains("first_seq"));
    // Carol is not a member.
    let carol = Account::new(3);
    let env = snapshot(&carol.devices[0], doc_id(5), 9);
    let c = t.c;
    let out = put(&mut t, c, group_id(1), env);
    assert_eq!(error_to(&out, t.c).0, ErrorCode::UNAUTHORISED);
    // Not authenticated.
    let stranger = device(40);
    let conn = t.fx.connect(&stranger);
    let out = put(&mut t, conn, group_id(1), snapshot(&stranger, doc_id(5), 9));
    assert_eq!(error_to(&out, conn).0, ErrorCode::UNAUTHORISED);
    // Snapshots do not go into the envelope log.
    let req = t.fx.req();
    let out = t.fx.msg(
        t.a,
        Message::Append {
            req,
            group: group_id(1),
            envelope: snapshot(&alice, doc_id(5), 9),
        },
    );
    assert_eq!(error_to(&out, t.a).0, ErrorCode::REJECTED);
}

#[test]
fn a_catch_up_serves_only_the_connections_own_accounts_snapshot() {
    let mut t = chat_with_doc();
    // Alice asks for a snapshot: the catch-up names her account, never another.
    let out = {
        let conn = t.a;
        subscribe_for_snapshot(&mut t, conn, 0)
    };
    match &out[..] {
        [Output::CatchUp { items, .. }] => assert_eq!(
            items,
            &vec![CatchUpItem {
                doc: doc_id(5),
                after_seq: 0,
                snapshot_for: Some(t.alice.id()),
            }]
        ),
        other => panic!("{other:?}"),
    }
    let out = {
        let conn = t.b;
        subscribe_for_snapshot(&mut t, conn, 0)
    };
    match &out[..] {
        [Output::CatchUp { items, .. }] => {
            assert_eq!(items[0].snapshot_for, Some(t.bob.id()));
        }
        other => panic!("{other:?}"),
    }
    // Without the flag, no snapshot; and nothing at all past the document's end.
    let out = t.fx.subscribe(t.a, doc_id(5), group_id(1), 3);
    assert!(matches!(&out[..], [Output::CatchUp { items, .. }] if items[0].snapshot_for.is_none()));
    let out = {
        let conn = t.a;
        subscribe_for_snapshot(&mut t, conn, 9)
    };
    assert!(matches!(
        &messages_to(&out, t.a)[..],
        [Message::Done { .. }]
    ));
    // Two items of one document: the smallest cursor, a snapshot if either asks.
    let req = t.fx.req();
    let item = |after_seq, snapshot| Subscription {
        doc: doc_id(5),
        group: group_id(1),
        after_seq,
        snapshot,
    };
    let out = t.fx.msg(
        t.a,
        Message::Subscribe {
            req,
            items: vec![item(4, false), item(2, true)],
        },
    );
    assert!(matches!(&out[..], [Output::CatchUp { items, .. }]
        if items == &vec![CatchUpItem { doc: doc_id(5), after_seq: 2, snapshot_for: Some(t.alice.id()) }]));
}
