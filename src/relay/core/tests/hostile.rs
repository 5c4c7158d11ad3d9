//! Limits, garbage, arbitrary input sequences, and restarting from a snapshot.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::wire::message::encode_datagram;

#[test]
fn rate_limit_refuses_requests_over_the_bucket() {
    let mut fx = Fx::with_limits(RelayLimits {
        rate_per_s: 10,
        burst: 5,
        ..RelayLimits::default()
    });
    let alice = Account::new(1);
    let conn = fx.connect(&alice.devices[0]);
    let fetch = |req| Message::FetchLog {
        req,
        account: alice.id(),
        from_seq: 0,
    };
    for req in 1..=5 {
        let out = fx.msg(conn, fetch(req));
        assert!(matches!(
            &messages_to(&out, conn)[..],
            [Message::LogEntries { .. }]
        ));
    }
    let out = fx.msg(conn, fetch(6));
    let (code, text) = error_to(&out, conn);
    assert_eq!(code, ErrorCode::RATE_LIMITED);
    assert!(text.contains("10 a second"), "{text}");
    // Another connection has its own bucket; this one refills with time.
    let other = fx.connect(&alice.devices[0]);
    assert!(matches!(
        &messages_to(&fx.msg(other, fetch(7)), other)[..],
        [Message::LogEntries { .. }]
    ));
    fx.now_ms += 100;
    assert!(matches!(
        &messages_to(&fx.msg(conn, fetch(8)), conn)[..],
        [Message::LogEntries { .. }]
    ));
    assert!(matches!(
        &messages_to(&fx.msg(conn, fetch(9)), conn)[..],
        [Message::Error { .. }]
    ));
    assert_eq!(fx.core.stats().rate_limited, 2);
}

#[test]
fn connection_and_subscription_limits() {
    let mut fx = Fx::with_limits(RelayLimits {
        max_connections: 2,
        max_subscriptions_per_conn: 2,
        ..RelayLimits::default()
    });
    let alice = Account::new(1);
    let a = fx.join(&alice, 0);
    fx.post_group(
        a,
        group_update(&alice.devices[0], alice.id(), 1, 0, vec![alice.id()]),
    );
    fx.connect(&device(5));
    let out = fx.core.handle(
        Input::Connected {
            conn: ConnId(99),
            device: device(6).device_id(),
        },
        fx.now_ms,
    );
    assert!(closes(&out, ConnId(99)));
    assert!(fx.core.connection(ConnId(99)).is_none());
    fx.subscribe(a, doc_id(1), group_id(1), 0);
    fx.subscribe(a, doc_id(2), group_id(1), 0);
    // Subscribing again to a held document adds nothing.
    let out = fx.subscribe(a, doc_id(2), group_id(1), 0);
    assert!(has_done(&out, a, fx.next_req));
    let out = fx.subscribe(a, doc_id(3), group_id(1), 0);
    assert_eq!(error_to(&out, a).0, ErrorCode::TOO_LARGE);
}

#[test]
fn relay_messages_and_stray_inputs_are_refused_without_panicking() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let a = fx.join(&alice, 0);
    for msg in [
        Message::Done { req: 3 },
        Message::Ack {
            req: 3,
            doc: doc_id(1),
            seq: 1,
            prev: 0,
            duplicate: false,
        },
        Message::HelloOk {
            req: 3,
            log_len: 0,
            log_head: crate::crypto::device_log::EntryHash([0; 32]),
            groups: vec![],
        },
    ] {
        let out = fx.msg(a, msg);
        let (code, text) = error_to(&out, a);
        assert_eq!(code, ErrorCode::MALFORMED);
        assert!(text.contains("not a request"), "{text}");
    }
    // An error from the device is not answered.
    let out = fx.msg(
        a,
        Message::Error {
            req: 0,
            code: ErrorCode::INTERNAL,
            text: "oops".into(),
        },
    );
    assert!(out.is_empty());
    // Inputs naming unknown connections or appends.
    let ghost = ConnId(1234);
    assert!(fx.msg(ghost, Message::Done { req: 1 }).is_empty());
    assert!(
        fx.input(Input::Datagram {
            conn: ghost,
            bytes: vec![1]
        })
        .is_empty()
    );
    assert!(fx.input(Input::Disconnected { conn: ghost }).is_empty());
    assert!(
        fx.stored(a, 42, doc_id(1), StoreOutcome::Stored { seq: 1 })
            .is_empty()
    );
    // A connection announced twice keeps its first state.
    assert!(
        fx.input(Input::Connected {
            conn: a,
            device: device(9).device_id(),
        })
        .is_empty()
    );
    assert!(fx.core.connection(a).unwrap().authenticated);
    assert_eq!(fx.core.stats().unexpected_inputs, 4);
    assert_eq!(fx.core.stats().datagrams_dropped, 1);
}

/// Inputs for the arbitrary-sequence test: a fixed alphabet of messages, valid and not.
struct Alphabet {
    devices: Vec<DeviceSecret>,
    messages: Vec<Message>,
    datagrams: Vec<Vec<u8>>,
    accounts: Vec<AccountId>,
}

fn alphabet() -> Alphabet {
    let mut alice = Account::new(1);
    let bob = Account::new(2);
    let add = alice.add_device(3);
    let revoke = alice.revoke(1);
    let genesis = alice.log.entries()[0].clone();
    let devices = vec![device(1), device(2), device(3), device(4)];
    let v0 = group_update(&devices[0], alice.id(), 1, 0, vec![alice.id(), bob.id()]);
    let v1 = group_update(&devices[1], bob.id(), 1, 1, vec![bob.id()]);
    let mut messages = vec![
        Message::LogAppend {
            req: 1,
            account: alice.id(),
            first_seq: 0,
            entries: vec![genesis],
        },
        Message::LogAppend {
            req: 2,
            account: alice.id(),
            first_seq: 1,
            entries: vec![add],
        },
        Message::LogAppend {
            req: 3,
            account: alice.id(),
            first_seq: 2,
            entries: vec![revoke],
        },
        Message::LogAppend {
            req: 4,
            account: bob.id(),
            first_seq: 0,
            entries: bob.log.entries().to_vec(),
        },
        Message::PostGroup { req: 5, update: v0 },
        Message::PostGroup { req: 6, update: v1 },
        Message::FetchGroup {
            req: 7,
            group: group_id(1),
            from_version: 0,
        },
        Message::Done { req: 8 },
    ];
    for account in [alice.id(), bob.id()] {
        messages.push(Message::Hello {
            req: 9,
            account,
            log_len: 1,
            log_head: crate::crypto::device_log::EntryHash([0; 32]),
        });
        messages.push(Message::FetchLog {
            req: 10,
            account,
            from_seq: 1,
        });
    }
    let mut datagrams = vec![vec![], vec![1; 40]];
    for (i, author) in devices.iter().enumerate() {
        for doc in [doc_id(5), group_id(1)] {
            for kind in [EnvelopeKind::Changes, EnvelopeKind::Ephemeral] {
                let env = envelope(author, doc, kind, i as u64);
                datagrams.push(encode_datagram(&group_id(1), &env));
                messages.push(Message::Append {
                    req: 11 + i as u32,
                    group: group_id(1),
                    envelope: env,
                });
            }
        }
        messages.push(Message::Subscribe {
            req: 20,
            items: vec![Subscription {
                doc: doc_id(5 + i as u8 % 2),
                group: group_id(1),
                after_seq: 0,
                snapshot: false,
            }],
        });
    }
    for rendezvous in [[1; 32], [2; 32]] {
        messages.push(Message::PairOffer {
            req: 30,
            rendezvous,
        });
    }
    messages.push(Message::Fetch {
        req: 31,
        doc: doc_id(5),
        after_seq: 0,
        limit: u32::MAX,
    });
    Alphabet {
        devices,
        messages,
        datagrams,
        accounts: vec![alice.id(), bob.id()],
    }
}

fn pick<'a, T>(rng: &mut SeedRng, items: &'a [T]) -> &'a T {
    let [b0, b1] = rng.array::<2>();
    &items[usize::from(u16::from_be_bytes([b0, b1])) % items.len()]
}

/// Arbitrary sequences of connections, messages, datagrams, store outcomes and disconnections:
/// nothing panics, nothing is sent to a connection that is gone, no quota is exceeded.
#[test]
fn arbitrary_input_sequences_keep_the_invariants() {
    let a = alphabet();
    let quota = 3_000;
    let mut reached = (0, 0, 0);
    for seed in 0..16u8 {
        let mut rng = SeedRng::from_seed([seed; 32]);
        let mut core = RelayCore::new(RelayLimits {
            quota_bytes: quota,
            rate_per_s: 200,
            burst: 50,
            ..RelayLimits::default()
        });
        let mut open: BTreeSet<ConnId> = BTreeSet::new();
        let mut appends: BTreeMap<(ConnId, u32), DocId> = BTreeMap::new();
        let mut now_ms = 0;
        let mut seq = 0;
        let mut next_conn = 0;
        for step in 0..1000 {
            now_ms += u64::from(rng.array::<1>()[0]);
            let live: Vec<ConnId> = open.iter().copied().collect();
            // Mostly a live connection; now and then one that never was or is gone.
            let conn = match rng.array::<1>()[0] {
                0..8 => ConnId(u64::from(rng.array::<1>()[0] % 8)),
                _ if live.is_empty() => ConnId(next_conn),
                _ => *pick(&mut rng, &live),
            };
            let input = match rng.array::<1>()[0] % 100 {
                _ if live.len() < 2 => {
                    next_conn += 1;
                    Input::Connected {
                        conn: ConnId(next_conn),
                        device: pick(&mut rng, &a.devices).device_id(),
                    }
                }
                0..6 if live.len() < 6 => {
                    next_conn += 1;
                    Input::Connected {
                        conn: ConnId(next_conn),
                        device: pick(&mut rng, &a.devices).device_id(),
                    }
                }
                6..9 => Input::Disconnected { conn },
                9..20 => Input::Datagram {
                    conn,
                    bytes: pick(&mut rng, &a.datagrams).clone(),
                },
                20..35 if !appends.is_empty() => {
                    let keys: Vec<_> = appends.keys().copied().collect();
                    let (conn, req) = *pick(&mut rng, &keys);
                    let doc = appends.remove(&(conn, req)).unwrap();
                    seq += 1;
                    let outcome = match rng.array::<1>()[0] % 3 {
                        0 => StoreOutcome::Duplicate { seq: 1 },
                        _ => StoreOutcome::Stored { seq },
                    };
                    Input::EnvelopeStored {
                        conn,
                        req,
                        doc,
                        outcome,
                    }
                }
                _ => Input::Message {
                    conn,
                    msg: pick(&mut rng, &a.messages).clone(),
                },
            };
            match &input {
                Input::Connected { conn, .. } => {
                    open.insert(*conn);
                }
                Input::Disconnected { conn } => {
                    open.remove(conn);
                }
                _ => {}
            }
            let mut pending = core.handle(input, now_ms);
            while let Some(o) = pending.pop() {
                match o {
                    Output::Persist { then, .. } => {
                        // Executed late, so never a store write (which would reorder writes).
                        assert!(
                            !then.iter().any(|o| matches!(
                                o,
                                Output::Persist { .. } | Output::Append { .. }
                            )),
                            "seed {seed} step {step}: a store write waits for a persist"
                        );
                        pending.extend(then);
                    }
                    Output::Append {
                        conn,
                        req,
                        envelope,
                    } => {
                        appends.insert((conn, req), envelope.doc);
                    }
                    Output::Send { conn, .. }
                    | Output::Push { conn, .. }
                    | Output::SendDatagram { conn, .. }
                    | Output::Close { conn, .. }
                    | Output::CatchUp { conn, .. }
                    | Output::Fetch { conn, .. } => {
                        assert!(
                            open.contains(&conn),
                            "seed {seed} step {step}: output to closed {conn:?}"
                        );
                    }
                    Output::Event(_) => {}
                }
            }
            for account in &a.accounts {
                assert!(core.usage(account) <= quota, "seed {seed} step {step}");
            }
        }
        let stats = core.stats();
        reached.0 += stats.pushes;
        reached.1 += stats.datagrams_forwarded;
        reached.2 += stats.requests - stats.errors;
    }
    // The sequences get past authentication and membership, not only into refusals.
    assert!(
        reached.0 > 0 && reached.1 > 0 && reached.2 > 1000,
        "{reached:?}"
    );
}

#[test]
fn load_restores_what_was_persisted() {
    let mut fx = Fx::new();
    let mut alice = Account::new(1);
    let bob = Account::new(2);
    let a = fx.join(&alice, 0);
    let b = fx.join(&bob, 0);
    let entry = alice.add_device(3);
    fx.msg(
        a,
        Message::LogAppend {
            req: 1,
            account: alice.id(),
            first_seq: 1,
            entries: vec![entry],
        },
    );
    fx.post_group(
        a,
        group_update(
            &alice.devices[0],
            alice.id(),
            1,
            0,
            vec![alice.id(), bob.id()],
        ),
    );
    fx.post_group(
        b,
        group_update(&bob.devices[0], bob.id(), 1, 1, vec![alice.id()]),
    );
    fx.subscribe(a, doc_id(5), group_id(1), 0);
    // Rebuild the store's view from the persisted writes.
    let mut snapshot = RelaySnapshot::default();
    let mut logs: BTreeMap<AccountId, Vec<Vec<u8>>> = BTreeMap::new();
    let mut groups: BTreeMap<DocId, Vec<Vec<u8>>> = BTreeMap::new();
    for op in &fx.persisted {
        match op {
            PersistOp::AppendLog {
                account,
                first_seq,
                entries,
            } => {
                let log = logs.entry(*account).or_default();
                assert_eq!(log.len(), *first_seq as usize);
                log.extend(entries.iter().cloned());
            }
            PersistOp::PutGroupUpdate { group, update, .. } => {
                groups.entry(*group).or_default().push(update.clone());
            }
            PersistOp::CreateDocs { docs } => {
                snapshot
                    .docs
                    .extend(docs.iter().map(|(doc, group)| (*doc, *group, 12)));
            }
            PersistOp::PutSnapshot { .. } => {}
        }
    }
    snapshot.logs = logs.into_iter().collect();
    snapshot.groups = groups.into_iter().collect();
    snapshot.usage = vec![(alice.id(), 500)];
    let mut fx2 = Fx::new();
    fx2.core = RelayCore::load(RelayLimits::default(), snapshot.clone()).unwrap();
    assert_eq!(fx2.core.usage(&alice.id()), 500);
    let laptop = fx2.connect(&alice.devices[1]);
    match fx2.hello(laptop, alice.id()) {
        Message::HelloOk {
            log_len, groups, ..
        } => {
            assert_eq!(log_len, 2);
            assert_eq!(groups, vec![(group_id(1), 1)]);
        }
        other => panic!("{other:?}"),
    }
    let out = fx2.subscribe(laptop, doc_id(5), group_id(1), 3);
    assert!(
        matches!(&out[..], [Output::CatchUp { items, .. }] if *items == vec![CatchUpItem { doc: doc_id(5), after_seq: 3, snapshot_for: None }])
    );
    // Device logs and group chains are known again: the laptop forwards envelopes of Bob's (a
    // member at version 0) and of Alice's phone, each stored under its author's account.
    for (author, account) in [(&bob.devices[0], bob.id()), (&alice.devices[0], alice.id())] {
        let env = envelope(author, doc_id(5), EnvelopeKind::Changes, 1);
        let (_, new) = fx2.append(laptop, group_id(1), env);
        assert_eq!(new.account, account);
    }
    let b2 = fx2.connect(&bob.devices[0]);
    fx2.hello(b2, bob.id());
    let out = fx2.subscribe(b2, doc_id(5), group_id(1), 0);
    assert_eq!(error_to(&out, b2).0, ErrorCode::UNAUTHORISED);
    // A corrupted store is reported, not trusted.
    let mut bad = snapshot.clone();
    bad.logs[0].1[0][10] ^= 1;
    assert!(matches!(
        RelayCore::load(RelayLimits::default(), bad),
        Err(LoadError::Log { .. })
    ));
    let mut bad = snapshot;
    bad.groups[0].1.swap(0, 1);
    assert!(matches!(
        RelayCore::load(RelayLimits::default(), bad),
        Err(LoadError::Group { index: 0, .. })
    ));
}
