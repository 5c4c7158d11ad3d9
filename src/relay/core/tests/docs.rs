//! Subscriptions, appends, pushes, fetches and datagrams.

use super::*;
use crate::wire::message::{StoredEnvelope, encode_datagram};

/// Alice and Bob in group 1, Carol outside it; one connection each.
pub(super) struct Chat {
    pub fx: Fx,
    pub alice: Account,
    pub bob: Account,
    pub a: ConnId,
    pub b: ConnId,
    pub c: ConnId,
}

pub(super) fn chat() -> Chat {
    chat_with(RelayLimits::default())
}

pub(super) fn chat_with(limits: RelayLimits) -> Chat {
    let mut fx = Fx::with_limits(limits);
    let alice = Account::new(1);
    let bob = Account::new(2);
    let carol = Account::new(3);
    let a = fx.join(&alice, 0);
    let b = fx.join(&bob, 0);
    let c = fx.join(&carol, 0);
    let v0 = group_update(
        &alice.devices[0],
        alice.id(),
        1,
        0,
        vec![alice.id(), bob.id()],
    );
    fx.post_group(a, v0);
    Chat {
        fx,
        alice,
        bob,
        a,
        b,
        c,
    }
}

#[test]
fn subscribe_creates_documents_and_catches_up() {
    let mut t = chat();
    let doc = doc_id(5);
    let out = t.fx.subscribe(t.b, doc, group_id(1), 0);
    // New document: created (persisted) before the answer; nothing to catch up.
    assert!(matches!(
        t.fx.persisted.last(),
        Some(PersistOp::CreateDocs { docs }) if *docs == vec![(doc, group_id(1))]
    ));
    assert_eq!(
        messages_to(&out, t.b),
        vec![Message::Done { req: t.fx.next_req }]
    );
    let (req, new) = t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1),
    );
    t.fx.stored(t.a, req, new.doc, StoreOutcome::Stored { seq: 5 });
    // A cursor behind the document: catch-up from it.
    let out = t.fx.subscribe(t.a, doc, group_id(1), 0);
    assert_eq!(
        out,
        vec![Output::CatchUp {
            conn: t.a,
            req: t.fx.next_req,
            items: vec![CatchUpItem {
                doc,
                after_seq: 0,
                snapshot_for: None,
            }],
        }]
    );
    // Up to date: just Done.
    let out = t.fx.subscribe(t.a, doc, group_id(1), 5);
    assert_eq!(
        messages_to(&out, t.a),
        vec![Message::Done { req: t.fx.next_req }]
    );
    assert_eq!(t.fx.core.connection(t.a).unwrap().subscriptions, 1);
}

#[test]
fn subscribe_is_all_or_nothing() {
    let mut t = chat();
    let carol_group = {
        let carol = Account::new(3);
        let update = group_update(&carol.devices[0], carol.id(), 2, 0, vec![carol.id()]);
        t.fx.post_group(t.c, update);
        group_id(2)
    };
    let items = vec![
        Subscription {
            doc: doc_id(5),
            group: group_id(1),
            after_seq: 0,
            snapshot: false,
        },
        Subscription {
            doc: doc_id(6),
            group: carol_group,
            after_seq: 0,
            snapshot: false,
        },
    ];
    let persisted = t.fx.persisted.len();
    let out = t.fx.msg(t.a, Message::Subscribe { req: 1, items });
    assert_eq!(error_to(&out, t.a).0, ErrorCode::UNAUTHORISED);
    assert_eq!(t.fx.core.connection(t.a).unwrap().subscriptions, 0);
    assert_eq!(t.fx.persisted.len(), persisted);
    // A document of another group, and another group's own document, are refused.
    t.fx.subscribe(t.c, doc_id(6), carol_group, 0);
    let out = t.fx.subscribe(t.a, doc_id(6), group_id(1), 0);
    assert_eq!(error_to(&out, t.a).0, ErrorCode::REJECTED);
    let out = t.fx.subscribe(t.c, group_id(1), carol_group, 0);
    assert_eq!(error_to(&out, t.c).0, ErrorCode::REJECTED);
    // One document under two groups in one request.
    let update = group_update(&t.alice.devices[0], t.alice.id(), 3, 0, vec![t.alice.id()]);
    t.fx.post_group(t.a, update);
    let items = vec![
        Subscription {
            doc: doc_id(7),
            group: group_id(1),
            after_seq: 0,
            snapshot: false,
        },
        Subscription {
            doc: doc_id(7),
            group: group_id(3),
            after_seq: 0,
            snapshot: false,
        },
    ];
    let out = t.fx.msg(t.a, Message::Subscribe { req: 2, items });
    assert_eq!(error_to(&out, t.a).0, ErrorCode::REJECTED);
    assert_eq!(t.fx.core.connection(t.a).unwrap().subscriptions, 0);
}

#[test]
fn append_is_acked_and_pushed_with_prev() {
    let mut t = chat();
    let doc = doc_id(5);
    let b2 = t.fx.join(&t.bob, 0);
    for conn in [t.a, t.b, b2] {
        t.fx.subscribe(conn, doc, group_id(1), 0);
    }
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    let bytes = env.encode();
    let (req, new) = t.fx.append(t.a, group_id(1), env.clone());
    assert_eq!(
        new,
        NewEnvelope {
            doc,
            id: env.id(),
            author: t.alice.devices[0].device_id(),
            account: t.alice.id(),
            first_seq: 1,
            last_seq: 1,
            bytes: bytes.clone(),
        }
    );
    let out = t.fx.stored(t.a, req, doc, StoreOutcome::Stored { seq: 7 });
    assert_eq!(
        messages_to(&out, t.a),
        vec![Message::Ack {
            req,
            doc,
            seq: 7,
            prev: 0,
            duplicate: false,
        }]
    );
    let push = |seq, prev, envelope: &[u8]| Message::Envelopes {
        req: 0,
        doc,
        items: vec![StoredEnvelope {
            seq,
            prev,
            envelope: envelope.to_vec(),
        }],
        more: false,
    };
    assert_eq!(messages_to(&out, t.b), vec![push(7, 0, &bytes)]);
    assert_eq!(messages_to(&out, b2), vec![push(7, 0, &bytes)]);
    // The next one names the one before.
    let env2 = envelope(&t.bob.devices[0], doc, EnvelopeKind::Changes, 1);
    let (req2, _) = t.fx.append(t.b, group_id(1), env2.clone());
    let out = t.fx.stored(t.b, req2, doc, StoreOutcome::Stored { seq: 9 });
    assert_eq!(messages_to(&out, t.a), vec![push(9, 7, &env2.encode())]);
    assert_eq!(messages_to(&out, b2), vec![push(9, 7, &env2.encode())]);
    // The author's ack names the predecessor too, so it counts its own envelope in.
    assert_eq!(
        messages_to(&out, t.b),
        vec![Message::Ack {
            req: req2,
            doc,
            seq: 9,
            prev: 7,
            duplicate: false,
        }]
    );
    assert_eq!(t.fx.core.stats().pushes, 4);
    // Fetch is answered by the shell from the store.
    let out = t.fx.msg(
        t.b,
        Message::Fetch {
            req: 3,
            doc,
            after_seq: 0,
            limit: 0,
        },
    );
    assert_eq!(
        out,
        vec![Output::Fetch {
            conn: t.b,
            req: 3,
            doc,
            after_seq: 0,
            limit: crate::relay::limits::MAX_FETCH_LIMIT,
        }]
    );
    let out = t.fx.msg(
        t.c,
        Message::Fetch {
            req: 4,
            doc,
            after_seq: 0,
            limit: 10,
        },
    );
    assert_eq!(error_to(&out, t.c).0, ErrorCode::UNAUTHORISED);
}

#[test]
fn append_to_a_new_document_creates_it_first() {
    let mut t = chat();
    let doc = doc_id(8);
    let req = t.fx.req();
    let raw = t.fx.core.handle(
        Input::Message {
            conn: t.a,
            msg: Message::Append {
                req,
                group: group_id(1),
                envelope: envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1),
            },
        },
        t.fx.now_ms,
    );
    assert_eq!(raw.len(), 2);
    assert!(
        matches!(&raw[0], Output::Persist { op: PersistOp::CreateDocs { docs }, then } if *docs == vec![(doc, group_id(1))] && then.is_empty())
    );
    assert!(matches!(&raw[1], Output::Append { envelope, .. } if envelope.doc == doc));
}

#[test]
fn duplicates_conflicts_and_failures_are_answered() {
    let mut t = chat();
    let doc = doc_id(5);
    t.fx.subscribe(t.b, doc, group_id(1), 0);
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    let len = env.encode().len() as u64;
    let (req, _) = t.fx.append(t.a, group_id(1), env.clone());
    t.fx.stored(t.a, req, doc, StoreOutcome::Stored { seq: 3 });
    assert_eq!(t.fx.core.usage(&t.alice.id()), len);
    let (req, _) = t.fx.append(t.a, group_id(1), env.clone());
    let out =
        t.fx.stored(t.a, req, doc, StoreOutcome::Duplicate { seq: 3 });
    assert_eq!(
        out,
        vec![Output::Send {
            conn: t.a,
            msg: Message::Ack {
                req,
                doc,
                seq: 3,
                prev: 0,
                duplicate: true,
            },
        }]
    );
    assert_eq!(t.fx.core.usage(&t.alice.id()), len);
    let (req, _) = t.fx.append(t.a, group_id(1), env.clone());
    let out =
        t.fx.stored(t.a, req, doc, StoreOutcome::Conflict { existing: env.id() });
    let (code, text) = error_to(&out, t.a);
    assert_eq!(code, ErrorCode::REJECTED);
    assert!(text.starts_with("equivocation"), "{text}");
    assert!(messages_to(&out, t.b).is_empty());
    let (req, _) = t.fx.append(t.a, group_id(1), env);
    let out = t.fx.stored(
        t.a,
        req,
        doc,
        StoreOutcome::Failed {
            reason: "disk full".into(),
        },
    );
    assert_eq!(error_to(&out, t.a).0, ErrorCode::INTERNAL);
    assert_eq!(t.fx.core.usage(&t.alice.id()), len);
}

#[test]
fn appends_that_may_not_be_stored_are_refused() {
    let mut t = chat();
    let doc = doc_id(5);
    let refuse = |fx: &mut Fx, conn, group, env, code| {
        let out = fx.msg(
            conn,
            Message::Append {
                req: 50,
                group,
                envelope: env,
            },
        );
        assert_eq!(error_to(&out, conn).0, code);
        assert!(!out.iter().any(|o| matches!(o, Output::Append { .. })));
    };
    let carol = Account::new(3);
    // Not a member.
    let env = envelope(&carol.devices[0], doc, EnvelopeKind::Changes, 1);
    refuse(&mut t.fx, t.c, group_id(1), env, ErrorCode::UNAUTHORISED);
    // Forwarded, an envelope by a device of an account that is not a member.
    let env = envelope(&carol.devices[0], doc, EnvelopeKind::Changes, 1);
    refuse(&mut t.fx, t.a, group_id(1), env, ErrorCode::UNAUTHORISED);
    // Ephemeral envelopes are never stored.
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Ephemeral, 1);
    refuse(&mut t.fx, t.a, group_id(1), env, ErrorCode::REJECTED);
    // A document of another group.
    let update = group_update(&t.alice.devices[0], t.alice.id(), 2, 0, vec![t.alice.id()]);
    t.fx.post_group(t.a, update);
    t.fx.subscribe(t.a, doc, group_id(2), 0);
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    refuse(
        &mut t.fx,
        t.a,
        group_id(1),
        env.clone(),
        ErrorCode::REJECTED,
    );
    // A request id still in flight.
    let (req, _) = t.fx.append(t.a, group_id(2), env.clone());
    let out = t.fx.msg(
        t.a,
        Message::Append {
            req,
            group: group_id(2),
            envelope: env,
        },
    );
    assert_eq!(error_to(&out, t.a).0, ErrorCode::REJECTED);
    assert_eq!(t.fx.core.stats().errors, 5);
}

#[test]
fn pushes_skip_members_removed_since_they_subscribed() {
    let mut t = chat();
    let doc = doc_id(5);
    t.fx.subscribe(t.b, doc, group_id(1), 0);
    let v1 = group_update(&t.alice.devices[0], t.alice.id(), 1, 1, vec![t.alice.id()]);
    t.fx.post_group(t.a, v1);
    let (req, _) = t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1),
    );
    let out = t.fx.stored(t.a, req, doc, StoreOutcome::Stored { seq: 1 });
    assert!(messages_to(&out, t.b).is_empty());
    // The outcome of an append whose connection is gone still reaches the subscribers.
    let b = t.fx.join(&t.alice, 0);
    t.fx.subscribe(b, doc, group_id(1), 1);
    let (req, _) = t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 2),
    );
    t.fx.input(Input::Disconnected { conn: t.a });
    let out = t.fx.stored(t.a, req, doc, StoreOutcome::Stored { seq: 2 });
    assert!(messages_to(&out, t.a).is_empty());
    assert!(
        matches!(&messages_to(&out, b)[..], [Message::Envelopes { items, .. }] if items[0].prev == 1)
    );
}

#[test]
fn quota_counts_stored_and_in_flight_bytes() {
    let env_len = envelope(&device(1), doc_id(5), EnvelopeKind::Changes, 1)
        .encode()
        .len() as u64;
    let mut t = chat_with(RelayLimits {
        quota_bytes: env_len * 2 + env_len / 2,
        ..RelayLimits::default()
    });
    let doc = doc_id(5);
    let (r1, _) = t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1),
    );
    let (_r2, _) = t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 2),
    );
    let out = t.fx.msg(
        t.a,
        Message::Append {
            req: 77,
            group: group_id(1),
            envelope: envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 3),
        },
    );
    let (code, text) = error_to(&out, t.a);
    assert_eq!(code, ErrorCode::QUOTA_EXCEEDED);
    assert!(text.contains("quota"), "{text}");
    // Another account has its own quota.
    t.fx.append(
        t.b,
        group_id(1),
        envelope(&t.bob.devices[0], doc, EnvelopeKind::Changes, 1),
    );
    // A duplicate frees its bytes.
    t.fx.stored(t.a, r1, doc, StoreOutcome::Duplicate { seq: 1 });
    t.fx.append(
        t.a,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 3),
    );
}

#[test]
fn datagrams_are_forwarded_to_members_only() {
    let mut t = chat();
    let a2 = t.fx.join(&t.alice, 0);
    let group = group_id(1);
    let typing = encode_datagram(
        &group,
        &envelope(&t.alice.devices[0], group, EnvelopeKind::Ephemeral, 1),
    );
    let out = t.fx.input(Input::Datagram {
        conn: t.a,
        bytes: typing.clone(),
    });
    assert_eq!(
        out,
        vec![
            Output::SendDatagram {
                conn: a2,
                bytes: typing.clone(),
            },
            Output::SendDatagram {
                conn: t.b,
                bytes: typing,
            },
        ]
    );
    let dropped = [
        // Not ephemeral.
        encode_datagram(
            &group,
            &envelope(&t.alice.devices[0], group, EnvelopeKind::Changes, 1),
        ),
        // Someone else's.
        encode_datagram(
            &group,
            &envelope(&t.bob.devices[0], group, EnvelopeKind::Ephemeral, 1),
        ),
        // A group Alice is not in.
        encode_datagram(
            &group_id(9),
            &envelope(&t.alice.devices[0], group, EnvelopeKind::Ephemeral, 1),
        ),
        // Garbage.
        vec![1, 2, 3],
        vec![],
    ];
    for bytes in dropped {
        assert!(t.fx.input(Input::Datagram { conn: t.a, bytes }).is_empty());
    }
    // From a non-member.
    let carol = Account::new(3);
    let bytes = encode_datagram(
        &group,
        &envelope(&carol.devices[0], group, EnvelopeKind::Ephemeral, 1),
    );
    assert!(t.fx.input(Input::Datagram { conn: t.c, bytes }).is_empty());
    let stats = t.fx.core.stats();
    assert_eq!((stats.datagrams_forwarded, stats.datagrams_dropped), (1, 6));
}
