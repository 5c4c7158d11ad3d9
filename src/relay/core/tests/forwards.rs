//! Appends of envelopes another device wrote (forwards), and the signature check every append
//! passes.

use super::docs::{Chat, chat, chat_with};
use super::*;
use crate::wire::message::StoredEnvelope;

/// The push of one stored envelope of `doc`.
fn push(doc: DocId, seq: u64, prev: u64, bytes: &[u8]) -> Message {
    Message::Envelopes {
        req: 0,
        doc,
        items: vec![StoredEnvelope {
            seq,
            prev,
            envelope: bytes.to_vec(),
        }],
        more: false,
    }
}

/// Sends `env` from `conn` and asserts it is refused with `code` and nothing is stored, charged
/// or created; returns the error text.
fn refused(
    t: &mut Chat,
    conn: ConnId,
    group: DocId,
    env: SealedEnvelope,
    code: ErrorCode,
) -> String {
    let persisted = t.fx.persisted.len();
    let usage = [t.alice.id(), t.bob.id()].map(|a| t.fx.core.usage(&a));
    let req = t.fx.req();
    let out = t.fx.msg(
        conn,
        Message::Append {
            req,
            group,
            envelope: env,
        },
    );
    let (got, text) = error_to(&out, conn);
    assert_eq!(got, code, "{text}");
    assert!(
        !out.iter().any(|o| matches!(o, Output::Append { .. })),
        "{out:?}"
    );
    assert_eq!(t.fx.persisted.len(), persisted, "nothing is persisted");
    assert_eq!(
        [t.alice.id(), t.bob.id()].map(|a| t.fx.core.usage(&a)),
        usage,
        "nothing is charged"
    );
    text
}

/// Sends the log entries `entries` of `account` from position `first_seq`; asserts `Done`.
fn log_append(
    t: &mut Chat,
    conn: ConnId,
    account: AccountId,
    first_seq: u32,
    entries: Vec<DeviceLogEntry>,
) {
    let req = t.fx.req();
    let out = t.fx.msg(
        conn,
        Message::LogAppend {
            req,
            account,
            first_seq,
            entries,
        },
    );
    assert!(has_done(&out, conn, req), "{out:?}");
}

#[test]
fn a_forward_from_a_device_of_the_same_account_is_stored_for_its_author_acked_and_pushed() {
    let mut t = chat();
    t.alice.add_device(11);
    let a2 = t.fx.join(&t.alice, 1);
    let doc = doc_id(5);
    for conn in [t.a, t.b, a2] {
        t.fx.subscribe(conn, doc, group_id(1), 0);
    }
    // Alice's second device learned the first one's envelope directly and uploads it.
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    let bytes = env.encode();
    let (req, new) = t.fx.append(a2, group_id(1), env.clone());
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
    assert_eq!(t.fx.core.usage(&t.alice.id()), bytes.len() as u64);
    let out = t.fx.stored(a2, req, doc, StoreOutcome::Stored { seq: 4 });
    assert_eq!(
        messages_to(&out, a2),
        vec![Message::Ack {
            req,
            doc,
            seq: 4,
            prev: 0,
            duplicate: false,
        }]
    );
    // Every other subscriber gets it, the author's own connection included.
    assert_eq!(messages_to(&out, t.a), vec![push(doc, 4, 0, &bytes)]);
    assert_eq!(messages_to(&out, t.b), vec![push(doc, 4, 0, &bytes)]);
    assert_eq!(t.fx.core.usage(&t.alice.id()), bytes.len() as u64);
}

#[test]
fn a_forward_of_a_stored_envelope_is_a_duplicate_and_of_another_one_equivocation() {
    let mut t = chat();
    let doc = doc_id(5);
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    let (req, own) = t.fx.append(t.a, group_id(1), env.clone());
    t.fx.stored(t.a, req, doc, StoreOutcome::Stored { seq: 3 });
    let used = t.fx.core.usage(&t.alice.id());
    // The store is handed exactly the row of Alice's own append: same dedup key (document,
    // author, first change) and same id, which it answers as a duplicate.
    let (req, forwarded) = t.fx.append(t.b, group_id(1), env.clone());
    assert_eq!(forwarded, own);
    let out =
        t.fx.stored(t.b, req, doc, StoreOutcome::Duplicate { seq: 3 });
    assert_eq!(
        out,
        vec![Output::Send {
            conn: t.b,
            msg: Message::Ack {
                req,
                doc,
                seq: 3,
                prev: 0,
                duplicate: true,
            },
        }]
    );
    assert_eq!(t.fx.core.usage(&t.alice.id()), used);
    assert_eq!(t.fx.core.usage(&t.bob.id()), 0);
    // Another envelope Alice signed for the same changes: the same key, another id.
    let other = SealedEnvelope::seal(
        &t.alice.devices[0],
        &DocKey::from_bytes([7; 32]),
        env.header,
        b"other changes",
    )
    .unwrap();
    let (req, forwarded) = t.fx.append(t.b, group_id(1), other);
    assert_eq!(
        (forwarded.doc, forwarded.author, forwarded.first_seq),
        (own.doc, own.author, own.first_seq)
    );
    assert_ne!(forwarded.id, own.id);
    let out =
        t.fx.stored(t.b, req, doc, StoreOutcome::Conflict { existing: own.id });
    let (code, text) = error_to(&out, t.b);
    assert_eq!(code, ErrorCode::REJECTED);
    assert!(text.starts_with("equivocation"), "{text}");
    assert_eq!(t.fx.core.usage(&t.alice.id()), used);
}

#[test]
fn a_forward_by_a_member_of_another_account_is_stored_and_charged_to_the_author() {
    let env_len = envelope(&device(1), doc_id(5), EnvelopeKind::Changes, 1)
        .encode()
        .len() as u64;
    let mut t = chat_with(RelayLimits {
        quota_bytes: env_len * 2 + env_len / 2,
        ..RelayLimits::default()
    });
    let doc = doc_id(5);
    t.fx.subscribe(t.a, doc, group_id(1), 0);
    let env = envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 1);
    let (req, new) = t.fx.append(t.b, group_id(1), env.clone());
    assert_eq!(
        (new.author, new.account),
        (t.alice.devices[0].device_id(), t.alice.id())
    );
    let out = t.fx.stored(t.b, req, doc, StoreOutcome::Stored { seq: 2 });
    assert!(matches!(
        &messages_to(&out, t.b)[..],
        [Message::Ack {
            duplicate: false,
            ..
        }]
    ));
    assert_eq!(messages_to(&out, t.a), vec![push(doc, 2, 0, &env.encode())]);
    assert_eq!(t.fx.core.usage(&t.alice.id()), env_len);
    assert_eq!(t.fx.core.usage(&t.bob.id()), 0);
    // Alice's quota is what is spent: her third envelope does not fit, whoever uploads it,
    // while Bob's own still does.
    t.fx.append(
        t.b,
        group_id(1),
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 2),
    );
    let (b, third) = (
        t.b,
        envelope(&t.alice.devices[0], doc, EnvelopeKind::Changes, 3),
    );
    let text = refused(&mut t, b, group_id(1), third, ErrorCode::QUOTA_EXCEEDED);
    assert!(text.contains(&t.alice.id().to_string()), "{text}");
    t.fx.append(
        t.b,
        group_id(1),
        envelope(&t.bob.devices[0], doc, EnvelopeKind::Changes, 1),
    );
}

#[test]
fn envelopes_whose_signature_does_not_verify_are_refused_and_nothing_is_stored() {
    let mut t = chat();
    let doc = doc_id(5);
    // The same keys as Alice's and Bob's devices (drawn from the same seeds).
    let (alice, bob) = (device(1), device(2));
    assert_eq!(alice.device_id(), t.alice.devices[0].device_id());
    assert_eq!(bob.device_id(), t.bob.devices[0].device_id());
    let (a, b) = (t.a, t.b);
    let mut flipped = envelope(&alice, doc, EnvelopeKind::Changes, 1);
    flipped.ciphertext[0] ^= 1;
    let mut moved = envelope(&alice, doc, EnvelopeKind::Changes, 1);
    moved.header.first_seq = 2;
    moved.header.last_seq = 2;
    // Bob's own envelope relabelled as Alice's: what a forger would try.
    let mut relabelled = envelope(&bob, doc, EnvelopeKind::Changes, 1);
    relabelled.header.author = alice.device_id();
    for env in [flipped.clone(), moved, relabelled] {
        let text = refused(&mut t, b, group_id(1), env, ErrorCode::REJECTED);
        assert!(text.contains("does not verify"), "{text}");
    }
    // Alice's own appends are checked too.
    let text = refused(&mut t, a, group_id(1), flipped, ErrorCode::REJECTED);
    assert!(text.contains("does not verify"), "{text}");
    // The document was not created by any of them: a later append creates it.
    let (req, _) = t.fx.append(
        a,
        group_id(1),
        envelope(&alice, doc, EnvelopeKind::Changes, 1),
    );
    assert!(matches!(
        t.fx.persisted.last(),
        Some(PersistOp::CreateDocs { docs }) if *docs == vec![(doc, group_id(1))]
    ));
    t.fx.stored(a, req, doc, StoreOutcome::Stored { seq: 1 });
}

#[test]
fn a_forward_of_an_envelope_by_a_non_member_account_is_refused() {
    let mut t = chat();
    let carol = Account::new(3);
    let b = t.b;
    let text = refused(
        &mut t,
        b,
        group_id(1),
        envelope(&carol.devices[0], doc_id(5), EnvelopeKind::Changes, 1),
        ErrorCode::UNAUTHORISED,
    );
    assert!(text.contains("never was a member"), "{text}");
}

#[test]
fn a_forward_by_a_connection_whose_account_is_not_a_member_is_refused() {
    let mut t = chat();
    let c = t.c;
    let env = envelope(&t.alice.devices[0], doc_id(5), EnvelopeKind::Changes, 1);
    let text = refused(&mut t, c, group_id(1), env, ErrorCode::UNAUTHORISED);
    assert!(text.contains("is not a member"), "{text}");
}

#[test]
fn a_forward_of_an_unknown_or_revoked_device_is_refused() {
    let mut t = chat();
    let b = t.b;
    let stranger = device(99);
    let text = refused(
        &mut t,
        b,
        group_id(1),
        envelope(&stranger, doc_id(5), EnvelopeKind::Changes, 1),
        ErrorCode::UNAUTHORISED,
    );
    assert!(text.contains("no device log"), "{text}");
    // A device of Alice's signs, then is revoked: its envelope is refused from anyone.
    let added = t.alice.add_device(11);
    let env = envelope(&t.alice.devices[1], doc_id(5), EnvelopeKind::Changes, 1);
    let (a, alice) = (t.a, t.alice.id());
    log_append(&mut t, a, alice, 1, vec![added]);
    let revoked = t.alice.revoke(1);
    log_append(&mut t, a, alice, 2, vec![revoked]);
    for conn in [t.a, t.b] {
        let text = refused(
            &mut t,
            conn,
            group_id(1),
            env.clone(),
            ErrorCode::UNAUTHORISED,
        );
        assert!(text.contains("revoked"), "{text}");
    }
}

#[test]
fn a_forward_of_a_removed_members_envelope_is_stored_under_its_account() {
    let mut t = chat();
    let doc = doc_id(5);
    // Bob signed before Alice removed him from the conversation.
    let env = envelope(&t.bob.devices[0], doc, EnvelopeKind::Changes, 1);
    let v1 = group_update(&t.alice.devices[0], t.alice.id(), 1, 1, vec![t.alice.id()]);
    t.fx.post_group(t.a, v1);
    let b = t.b;
    refused(&mut t, b, group_id(1), env.clone(), ErrorCode::UNAUTHORISED);
    let (_, new) = t.fx.append(t.a, group_id(1), env);
    assert_eq!(
        (new.author, new.account),
        (t.bob.devices[0].device_id(), t.bob.id())
    );
    assert_eq!(t.fx.core.usage(&t.bob.id()), new.bytes.len() as u64);
    assert_eq!(t.fx.core.usage(&t.alice.id()), 0);
}

#[test]
fn a_device_several_logs_list_is_stored_under_an_account_that_is_a_member_now() {
    let mut t = chat();
    // Dave's account sorts before Alice's, so the lowest id alone would pick it.
    let mut dave = (10..)
        .map(Account::new)
        .find(|d| d.id() < t.alice.id())
        .unwrap();
    let d = t.fx.join(&dave, 0);
    // Dave was a member and is no longer.
    let mut members = vec![t.alice.id(), t.bob.id(), dave.id()];
    members.sort();
    let v1 = group_update(&t.alice.devices[0], t.alice.id(), 1, 1, members);
    t.fx.post_group(t.a, v1);
    let mut members = vec![t.alice.id(), t.bob.id()];
    members.sort();
    let v2 = group_update(&t.alice.devices[0], t.alice.id(), 1, 2, members);
    t.fx.post_group(t.a, v2);
    // Dave's log lists Alice's device too (a device's public keys are public).
    let entry = dave
        .log
        .add_device(
            &dave.devices[0],
            t.alice.devices[0].public(),
            "hers",
            "test",
        )
        .unwrap();
    dave.log.append(entry.clone()).unwrap();
    log_append(&mut t, d, dave.id(), 1, vec![entry]);
    let env = envelope(&t.alice.devices[0], doc_id(5), EnvelopeKind::Changes, 1);
    let (_, new) = t.fx.append(t.b, group_id(1), env);
    assert_eq!(new.account, t.alice.id());
    assert_eq!(t.fx.core.usage(&dave.id()), 0);
}

#[test]
fn snapshots_are_never_forwarded() {
    let mut t = chat();
    let b = t.b;
    let env = envelope(&t.alice.devices[0], doc_id(5), EnvelopeKind::Snapshot, 1);
    refused(&mut t, b, group_id(1), env, ErrorCode::REJECTED);
}
