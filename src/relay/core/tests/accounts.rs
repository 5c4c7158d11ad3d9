//! Authentication, device logs and groups.

use super::*;
use crate::crypto::device_log::EntryHash;

#[test]
fn hello_authenticates_a_current_device() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let conn = fx.connect(&alice.devices[0]);
    // Unknown account: answered, not authenticated, no groups revealed.
    assert_eq!(
        fx.hello(conn, alice.id()),
        Message::HelloOk {
            req: fx.next_req,
            log_len: 0,
            log_head: EntryHash([0; 32]),
            groups: vec![],
        }
    );
    assert!(!fx.core.connection(conn).unwrap().authenticated);
    // Creating the account authenticates the connection that claimed it.
    let out = fx.msg(
        conn,
        Message::LogAppend {
            req: 1,
            account: alice.id(),
            first_seq: 0,
            entries: alice.log.entries().to_vec(),
        },
    );
    assert!(has_done(&out, conn, 1));
    assert!(matches!(
        fx.persisted.last(),
        Some(PersistOp::AppendLog { first_seq: 0, entries, .. }) if entries.len() == 1
    ));
    assert!(out.contains(&Output::Event(RelayEvent::Authenticated {
        conn,
        device: alice.devices[0].device_id(),
        account: alice.id(),
    })));
    assert!(fx.core.connection(conn).unwrap().authenticated);
    // Hello now reports the relay's log and the account's groups.
    let group = group_update(&alice.devices[0], alice.id(), 1, 0, vec![alice.id()]);
    fx.post_group(conn, group);
    match fx.hello(conn, alice.id()) {
        Message::HelloOk {
            log_len,
            log_head,
            groups,
            ..
        } => {
            assert_eq!((log_len, log_head), (1, alice.log.head()));
            assert_eq!(groups, vec![(group_id(1), 0)]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_log_fetch_and_pairing_join_before_authentication() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let stranger = device(9);
    fx.join(&alice, 0);
    let conn = fx.connect(&stranger);
    fx.hello(conn, alice.id());
    let update = group_update(&stranger, alice.id(), 1, 0, vec![alice.id()]);
    let env = envelope(&stranger, doc_id(3), EnvelopeKind::Changes, 1);
    let refused = [
        Message::PostGroup { req: 1, update },
        Message::FetchGroup {
            req: 1,
            group: group_id(1),
            from_version: 0,
        },
        Message::Subscribe {
            req: 1,
            items: vec![],
        },
        Message::Append {
            req: 1,
            group: group_id(1),
            envelope: env,
        },
        Message::Fetch {
            req: 1,
            doc: doc_id(3),
            after_seq: 0,
            limit: 10,
        },
        Message::PairOffer {
            req: 1,
            rendezvous: [4; 32],
        },
    ];
    for msg in refused {
        let out = fx.msg(conn, msg.clone());
        let (code, text) = error_to(&out, conn);
        assert_eq!(code, ErrorCode::UNAUTHORISED, "{msg:?}");
        assert!(text.contains("authenticated"), "{text}");
    }
    // Reading a log is allowed: a device checks what the relay holds before it appends.
    let out = fx.msg(
        conn,
        Message::FetchLog {
            req: 2,
            account: alice.id(),
            from_seq: 0,
        },
    );
    assert_eq!(
        messages_to(&out, conn),
        vec![Message::LogEntries {
            req: 2,
            account: alice.id(),
            first_seq: 0,
            entries: alice.log.entries().to_vec(),
        }]
    );
    // An unknown account has an empty log.
    let out = fx.msg(
        conn,
        Message::FetchLog {
            req: 3,
            account: AccountId::from_bytes([1; 32]),
            from_seq: 0,
        },
    );
    assert!(
        matches!(&messages_to(&out, conn)[0], Message::LogEntries { entries, .. } if entries.is_empty())
    );
}

#[test]
fn added_device_is_authenticated_and_other_devices_get_the_entries() {
    let mut fx = Fx::new();
    let mut alice = Account::new(1);
    let phone = fx.join(&alice, 0);
    let phone2 = fx.join(&alice, 0);
    let entry = alice.add_device(2);
    let laptop = fx.connect(&alice.devices[1]);
    assert!(matches!(
        fx.hello(laptop, alice.id()),
        Message::HelloOk { log_len: 1, .. }
    ));
    assert!(!fx.core.connection(laptop).unwrap().authenticated);
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 5,
            account: alice.id(),
            first_seq: 1,
            entries: vec![entry.clone()],
        },
    );
    assert!(has_done(&out, phone, 5));
    assert!(fx.core.connection(laptop).unwrap().authenticated);
    let push = Message::LogEntries {
        req: 0,
        account: alice.id(),
        first_seq: 1,
        entries: vec![entry.clone()],
    };
    assert_eq!(messages_to(&out, phone2), vec![push.clone()]);
    assert_eq!(messages_to(&out, laptop), vec![push]);
    // The sender is not pushed its own entries.
    assert_eq!(messages_to(&out, phone), vec![Message::Done { req: 5 }]);
    // Sending entries the relay holds already is harmless and persists nothing.
    let before = fx.persisted.len();
    let out = fx.msg(
        laptop,
        Message::LogAppend {
            req: 6,
            account: alice.id(),
            first_seq: 0,
            entries: alice.log.entries().to_vec(),
        },
    );
    assert!(has_done(&out, laptop, 6));
    assert_eq!(fx.persisted.len(), before);
}

#[test]
fn revocation_closes_every_connection_of_the_device() {
    let mut fx = Fx::new();
    let mut alice = Account::new(1);
    alice.add_device(2);
    let phone = fx.join(&alice, 0);
    let laptop_a = fx.join(&alice, 1);
    let laptop_b = fx.join(&alice, 1);
    let revoke = alice.revoke(1);
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 7,
            account: alice.id(),
            first_seq: 2,
            entries: vec![revoke],
        },
    );
    assert!(has_done(&out, phone, 7));
    for conn in [laptop_a, laptop_b] {
        let (code, text) = error_to(&out, conn);
        assert_eq!(code, ErrorCode::UNAUTHORISED);
        assert!(text.contains("device revoked"), "{text}");
        assert!(closes(&out, conn));
        assert!(!fx.core.connection(conn).unwrap().authenticated);
    }
    assert!(out.contains(&Output::Event(RelayEvent::DeviceRevoked {
        account: alice.id(),
        device: alice.devices[1].device_id(),
        closed: 2,
    })));
    assert!(!closes(&out, phone));
    // A closing connection gets nothing more, whatever it sends.
    assert!(
        fx.msg(
            laptop_a,
            Message::FetchLog {
                req: 8,
                account: alice.id(),
                from_seq: 0
            }
        )
        .is_empty()
    );
    // A new connection of the revoked device is refused and closed at Hello.
    let again = fx.connect(&alice.devices[1]);
    let req = fx.req();
    let out = fx.msg(
        again,
        Message::Hello {
            req,
            account: alice.id(),
            log_len: 3,
            log_head: alice.log.head(),
        },
    );
    assert_eq!(error_to(&out, again).0, ErrorCode::UNAUTHORISED);
    assert!(closes(&out, again));
}

#[test]
fn forks_gaps_and_foreign_logs_are_rejected() {
    let mut fx = Fx::new();
    let mut alice = Account::new(1);
    let phone = fx.join(&alice, 0);
    let base = alice.log.clone();
    let entry = alice.add_device(2);
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 1,
            account: alice.id(),
            first_seq: 1,
            entries: vec![entry],
        },
    );
    assert!(has_done(&out, phone, 1));
    // Another entry at position 1: a fork.
    let rival = base
        .add_device(&alice.devices[0], device(3).public(), "rival", "test")
        .unwrap();
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 2,
            account: alice.id(),
            first_seq: 1,
            entries: vec![rival],
        },
    );
    let (code, text) = error_to(&out, phone);
    assert_eq!(code, ErrorCode::REJECTED);
    assert!(text.contains("fork"), "{text}");
    // Entries whose positions do not match first_seq.
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 3,
            account: alice.id(),
            first_seq: 5,
            entries: alice.log.entries()[1..].to_vec(),
        },
    );
    assert_eq!(error_to(&out, phone).0, ErrorCode::REJECTED);
    // An unknown account must start at genesis.
    let bob = Account::new(4);
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 4,
            account: bob.id(),
            first_seq: 1,
            entries: vec![],
        },
    );
    assert_eq!(error_to(&out, phone).0, ErrorCode::REJECTED);
    // A genesis under another account's id.
    let out = fx.msg(
        phone,
        Message::LogAppend {
            req: 5,
            account: AccountId::from_bytes([9; 32]),
            first_seq: 0,
            entries: bob.log.entries().to_vec(),
        },
    );
    assert_eq!(error_to(&out, phone).0, ErrorCode::REJECTED);
    // Nothing of it changed the relay's log.
    let out = fx.msg(
        phone,
        Message::FetchLog {
            req: 6,
            account: alice.id(),
            from_seq: 0,
        },
    );
    assert!(
        matches!(&messages_to(&out, phone)[0], Message::LogEntries { entries, .. } if *entries == alice.log.entries())
    );
}

#[test]
fn hello_for_another_account_after_authentication_is_refused() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let bob = Account::new(2);
    fx.join(&bob, 0);
    let conn = fx.join(&alice, 0);
    assert!(matches!(
        fx.hello(conn, bob.id()),
        Message::Error {
            code: ErrorCode::REJECTED,
            ..
        }
    ));
    assert_eq!(fx.core.connection(conn).unwrap().account, Some(alice.id()));
}

#[test]
fn group_create_update_and_membership() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let bob = Account::new(2);
    let carol = Account::new(3);
    let a = fx.join(&alice, 0);
    let a2 = fx.join(&alice, 0);
    let b = fx.join(&bob, 0);
    let c = fx.join(&carol, 0);
    let v0 = group_update(
        &alice.devices[0],
        alice.id(),
        1,
        0,
        vec![alice.id(), bob.id()],
    );
    let out = fx.post_group(a, v0.clone());
    let push0 = Message::GroupUpdates {
        req: 0,
        group: group_id(1),
        updates: vec![v0.clone()],
    };
    assert_eq!(messages_to(&out, b), vec![push0.clone()]);
    assert_eq!(messages_to(&out, a2), vec![push0]);
    assert!(messages_to(&out, c).is_empty());
    assert!(
        matches!(fx.hello(b, bob.id()), Message::HelloOk { groups, .. } if groups == vec![(group_id(1), 0)])
    );
    // Bob fetches; Carol may not.
    let out = fx.msg(
        b,
        Message::FetchGroup {
            req: 9,
            group: group_id(1),
            from_version: 0,
        },
    );
    assert_eq!(
        messages_to(&out, b),
        vec![
            Message::GroupUpdates {
                req: 9,
                group: group_id(1),
                updates: vec![v0.clone()],
            },
            Message::Done { req: 9 },
        ]
    );
    let out = fx.msg(
        c,
        Message::FetchGroup {
            req: 9,
            group: group_id(1),
            from_version: 0,
        },
    );
    assert_eq!(error_to(&out, c).0, ErrorCode::UNAUTHORISED);
    // Bob removes himself and adds Carol: both are told, Bob is no longer a member.
    let doc = doc_id(5);
    fx.subscribe(b, doc, group_id(1), 0);
    assert_eq!(fx.core.connection(b).unwrap().subscriptions, 1);
    let v1 = group_update(
        &bob.devices[0],
        bob.id(),
        1,
        1,
        vec![alice.id(), carol.id()],
    );
    let out = fx.post_group(b, v1.clone());
    for conn in [a, a2, c] {
        assert_eq!(messages_to(&out, conn).len(), 1, "{conn:?}");
    }
    assert!(matches!(
        fx.persisted.last(),
        Some(PersistOp::PutGroupUpdate { version: 1, .. })
    ));
    assert_eq!(fx.core.connection(b).unwrap().subscriptions, 0);
    // As a former member, Bob reads up to his removal.
    let out = fx.msg(
        b,
        Message::FetchGroup {
            req: 10,
            group: group_id(1),
            from_version: 0,
        },
    );
    assert_eq!(
        messages_to(&out, b),
        vec![
            Message::GroupUpdates {
                req: 10,
                group: group_id(1),
                updates: vec![v0.clone(), v1.clone()],
            },
            Message::Done { req: 10 },
        ]
    );
    assert!(matches!(fx.hello(b, bob.id()), Message::HelloOk { groups, .. } if groups.is_empty()));
    let out = fx.msg(
        c,
        Message::FetchGroup {
            req: 11,
            group: group_id(1),
            from_version: 1,
        },
    );
    assert_eq!(
        messages_to(&out, c),
        vec![
            Message::GroupUpdates {
                req: 11,
                group: group_id(1),
                updates: vec![v1],
            },
            Message::Done { req: 11 },
        ]
    );
}

/// A member removed while offline learns of it: `FetchGroup` from the version it holds answers
/// the updates up to and including its removal, nothing after; from a version it was not a
/// member at, or for an account never a member, it is refused.
#[test]
fn a_removed_member_fetches_up_to_its_removal_and_no_further() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let bob = Account::new(2);
    let carol = Account::new(3);
    let dave = Account::new(4);
    let a = fx.join(&alice, 0);
    let b = fx.join(&bob, 0);
    let c = fx.join(&carol, 0);
    let d = fx.join(&dave, 0);
    let members = [
        vec![alice.id(), bob.id()],
        vec![alice.id(), bob.id(), carol.id()],
        vec![alice.id(), carol.id()],
        vec![alice.id()],
    ];
    let updates: Vec<GroupUpdate> = members
        .iter()
        .enumerate()
        .map(|(v, m)| group_update(&alice.devices[0], alice.id(), 1, v as u32, m.clone()))
        .collect();
    for update in &updates {
        fx.post_group(a, update.clone());
    }
    let fetch = |fx: &mut Fx, conn, from_version| {
        let req = fx.req();
        let out = fx.msg(
            conn,
            Message::FetchGroup {
                req,
                group: group_id(1),
                from_version,
            },
        );
        if let Some(Message::Error { code, .. }) = messages_to(&out, conn).first() {
            return Err(*code);
        }
        let mut got = Vec::new();
        for msg in messages_to(&out, conn) {
            match msg {
                Message::GroupUpdates { updates, .. } => got.extend(updates),
                Message::Done { req: r } => assert_eq!(r, req),
                other => panic!("{other:?}"),
            }
        }
        Ok(got)
    };
    // Bob, removed at version 2, holding version 0 or 1: up to version 2.
    assert_eq!(fetch(&mut fx, b, 1), Ok(updates[1..3].to_vec()));
    assert_eq!(fetch(&mut fx, b, 2), Ok(updates[2..3].to_vec()));
    assert_eq!(fetch(&mut fx, b, 0), Ok(updates[0..3].to_vec()));
    // Holding his removal already, or asking past it: nothing more.
    assert_eq!(fetch(&mut fx, b, 3), Err(ErrorCode::UNAUTHORISED));
    assert_eq!(fetch(&mut fx, b, 9), Err(ErrorCode::UNAUTHORISED));
    // Carol, added at 1 and removed at 3: not from version 0 or 1 (she was not a member at
    // version 0), from 2 up to her removal.
    assert_eq!(fetch(&mut fx, c, 0), Err(ErrorCode::UNAUTHORISED));
    assert_eq!(fetch(&mut fx, c, 1), Err(ErrorCode::UNAUTHORISED));
    assert_eq!(fetch(&mut fx, c, 2), Ok(updates[2..4].to_vec()));
    // Dave never was a member.
    assert_eq!(fetch(&mut fx, d, 0), Err(ErrorCode::UNAUTHORISED));
    assert_eq!(fetch(&mut fx, d, 3), Err(ErrorCode::UNAUTHORISED));
    // Alice, a member, reads everything.
    assert_eq!(fetch(&mut fx, a, 0), Ok(updates.clone()));
}

#[test]
fn forged_stale_or_foreign_group_updates_are_refused() {
    let mut fx = Fx::new();
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
    // Alice posting an update Bob signed: the signer must be the connection's device.
    let by_bob = group_update(&bob.devices[0], bob.id(), 1, 0, vec![alice.id(), bob.id()]);
    let out = fx.msg(
        a,
        Message::PostGroup {
            req: 1,
            update: by_bob,
        },
    );
    assert_eq!(error_to(&out, a).0, ErrorCode::UNAUTHORISED);
    // Naming another account as signer account.
    let wrong_account = group_update(
        &alice.devices[0],
        bob.id(),
        1,
        0,
        vec![alice.id(), bob.id()],
    );
    let out = fx.msg(
        a,
        Message::PostGroup {
            req: 2,
            update: wrong_account,
        },
    );
    assert_eq!(error_to(&out, a).0, ErrorCode::UNAUTHORISED);
    // A tampered update.
    let mut tampered = v0.clone();
    tampered.members.pop();
    let out = fx.msg(
        a,
        Message::PostGroup {
            req: 3,
            update: tampered,
        },
    );
    let (code, text) = error_to(&out, a);
    assert_eq!(code, ErrorCode::REJECTED);
    assert!(text.contains("signature"), "{text}");
    // Creating a group one is not in.
    let outsider = group_update(&alice.devices[0], alice.id(), 2, 0, vec![bob.id()]);
    let out = fx.msg(
        a,
        Message::PostGroup {
            req: 4,
            update: outsider,
        },
    );
    assert_eq!(error_to(&out, a).0, ErrorCode::REJECTED);
    fx.post_group(a, v0.clone());
    // The same update again is confirmed and changes nothing.
    let before = fx.persisted.len();
    fx.post_group(a, v0);
    assert_eq!(fx.persisted.len(), before);
    // Another version 0 of an existing group.
    let again = group_update(&bob.devices[0], bob.id(), 1, 0, vec![bob.id()]);
    let out = fx.msg(
        b,
        Message::PostGroup {
            req: 5,
            update: again,
        },
    );
    assert_eq!(error_to(&out, b).0, ErrorCode::REJECTED);
    // A version that skips one.
    let skip = group_update(&bob.devices[0], bob.id(), 1, 2, vec![bob.id()]);
    let out = fx.msg(
        b,
        Message::PostGroup {
            req: 6,
            update: skip,
        },
    );
    assert_eq!(error_to(&out, b).0, ErrorCode::REJECTED);
    // A non-member changing the group.
    let takeover = group_update(&carol.devices[0], carol.id(), 1, 1, vec![carol.id()]);
    let out = fx.msg(
        c,
        Message::PostGroup {
            req: 7,
            update: takeover,
        },
    );
    assert_eq!(error_to(&out, c).0, ErrorCode::REJECTED);
    assert!(
        matches!(fx.hello(c, carol.id()), Message::HelloOk { groups, .. } if groups.is_empty())
    );
}
