//! Smoke tests of the relay server over real QUIC on loopback, with raw protocol clients: the
//! account, group, subscribe, append and push flow; bad frames; restart from disk; the binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use roamsync::ids::{ConversationId, DocAddr, DocId};
use roamsync::net::PeerAddr;
use roamsync::wire::frame::{ErrorCode, Frame};
use roamsync::wire::message::{Message, Subscription};

mod support;

use support::WAIT;
use support::raw::Client;

fn group() -> DocId {
    DocAddr::Meta(ConversationId::from_bytes([7; 16])).doc_id()
}

fn segment() -> DocId {
    DocAddr::Segment(ConversationId::from_bytes([7; 16]), 0).doc_id()
}

/// Alice and Bob signed in, members of `group()` (Bob told of it), both subscribed to
/// `segment()`.
async fn two_members(addr: &PeerAddr) -> (Client, Client) {
    let alice = Client::connect(addr, 1).await;
    let bob = Client::connect(addr, 2).await;
    join(alice, bob).await
}

/// Signs in `alice` and `bob`, makes both members of `group()` and subscribes both to
/// `segment()`.
async fn join(mut alice: Client, mut bob: Client) -> (Client, Client) {
    alice.sign_in().await;
    bob.sign_in().await;
    let update = alice.update(0, vec![alice.account(), bob.account()]);
    let done = alice
        .request(Message::PostGroup {
            req: 3,
            update: update.clone(),
        })
        .await;
    assert_eq!(done, Message::Done { req: 3 });
    // Bob is told about the group he was added to.
    assert_eq!(
        bob.next().await,
        Message::GroupUpdates {
            req: 0,
            group: group(),
            updates: vec![update],
        }
    );
    for client in [&mut alice, &mut bob] {
        let done = client
            .request(Message::Subscribe {
                req: 4,
                items: vec![Subscription {
                    doc: segment(),
                    group: group(),
                    after_seq: 0,
                    snapshot: false,
                }],
            })
            .await;
        assert_eq!(done, Message::Done { req: 4 });
    }
    (alice, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_is_acknowledged_and_pushed_to_the_other_member() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    assert_eq!(addr.host, "127.0.0.1");
    let (mut alice, mut bob) = two_members(&addr).await;
    let envelope = alice.envelope(segment(), 1);
    let ack = alice
        .request(Message::Append {
            req: 5,
            group: group(),
            envelope: envelope.clone(),
        })
        .await;
    let Message::Ack {
        req: 5,
        doc,
        seq,
        prev: 0,
        duplicate: false,
    } = ack
    else {
        panic!("{ack:?}");
    };
    assert_eq!(doc, segment());
    match bob.next().await {
        Message::Envelopes {
            req: 0,
            doc,
            items,
            more: false,
        } => {
            assert_eq!(doc, segment());
            assert_eq!(items.len(), 1);
            assert_eq!((items[0].seq, items[0].prev), (seq, 0));
            assert_eq!(items[0].envelope, envelope.encode());
        }
        other => panic!("{other:?}"),
    }
    // The same envelope again is a duplicate; a fetch returns what is stored.
    let again = alice
        .request(Message::Append {
            req: 6,
            group: group(),
            envelope,
        })
        .await;
    assert!(
        matches!(again, Message::Ack { seq: s, duplicate: true, .. } if s == seq),
        "{again:?}"
    );
    let fetched = bob
        .request(Message::Fetch {
            req: 7,
            doc: segment(),
            after_seq: 0,
            limit: 10,
        })
        .await;
    assert!(
        matches!(&fetched, Message::Envelopes { req: 7, items, more: false, .. } if items.len() == 1),
        "{fetched:?}"
    );
    relay.shutdown().await;
}

/// Bob stops reading while Alice appends more than his push queue and receive window hold: the
/// relay closes his connection at once with `LAGGED` rather than dropping pushes he would
/// never notice missing, and when he reconnects his subscription from his cursor brings every
/// envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_behind_its_pushes_is_closed_lagged_and_catches_up() {
    // More than the push queue (1,024) plus what an 8 KiB window lets through.
    const APPENDS: u64 = 1_536;
    const BATCH: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    let alice = Client::connect(&addr, 1).await;
    let bob = Client::connect_with_window(&addr, 2, 8 * 1024).await;
    let (mut alice, bob) = join(alice, bob).await;
    let started = std::time::Instant::now();
    for first in (1..=APPENDS).step_by(BATCH as usize) {
        let last = (first + BATCH - 1).min(APPENDS);
        for seq in first..=last {
            let envelope = alice.envelope(segment(), seq);
            alice
                .send(Message::Append {
                    req: 100 + seq as u32,
                    group: group(),
                    envelope,
                })
                .await;
        }
        for _ in first..=last {
            let ack = alice.next().await;
            assert!(
                matches!(
                    ack,
                    Message::Ack {
                        duplicate: false,
                        ..
                    }
                ),
                "{ack:?}"
            );
        }
    }
    let closed = tokio::time::timeout(WAIT, bob.conn.closed())
        .await
        .expect("the relay closes the lagging connection");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, u32::from(ErrorCode::LAGGED.0).into());
        }
        other => panic!("closed for another reason: {other:?}"),
    }
    // Alice is not affected.
    let ack = alice
        .request(Message::Append {
            req: 1,
            group: group(),
            envelope: alice.envelope(segment(), APPENDS + 1),
        })
        .await;
    assert!(matches!(ack, Message::Ack { req: 1, .. }), "{ack:?}");

    // Bob had taken none of them: he reconnects and subscribes from cursor 0.
    let mut bob = Client::connect_as(&addr, bob.secret, bob.log).await;
    bob.hello(2).await;
    bob.send(Message::Subscribe {
        req: 3,
        items: vec![Subscription {
            doc: segment(),
            group: group(),
            after_seq: 0,
            snapshot: false,
        }],
    })
    .await;
    let mut cursor = 0;
    let mut received = 0;
    loop {
        match bob.next().await {
            Message::Envelopes { doc, items, .. } => {
                assert_eq!(doc, segment());
                for item in items {
                    assert_eq!(item.prev, cursor, "the catch-up is one chain");
                    cursor = item.seq;
                    received += 1;
                }
            }
            Message::Done { req: 3 } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(received, APPENDS + 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    relay.shutdown().await;
}

/// Bob uploads an envelope he learned from Alice directly: it is stored as hers and pushed to
/// her, and her own upload of it afterwards is a duplicate. A tampered copy is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_envelope_is_stored_as_its_authors() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    let (mut alice, mut bob) = two_members(&addr).await;
    let envelope = alice.envelope(segment(), 1);
    let mut tampered = envelope.clone();
    tampered.ciphertext[0] ^= 1;
    let refused = bob
        .request(Message::Append {
            req: 5,
            group: group(),
            envelope: tampered,
        })
        .await;
    assert!(
        matches!(
            refused,
            Message::Error {
                req: 5,
                code: ErrorCode::REJECTED,
                ..
            }
        ),
        "{refused:?}"
    );
    let ack = bob
        .request(Message::Append {
            req: 6,
            group: group(),
            envelope: envelope.clone(),
        })
        .await;
    let Message::Ack {
        req: 6,
        seq,
        prev: 0,
        duplicate: false,
        ..
    } = ack
    else {
        panic!("{ack:?}");
    };
    match alice.next().await {
        Message::Envelopes { req: 0, items, .. } => {
            assert_eq!(items.len(), 1);
            assert_eq!(
                (items[0].seq, &items[0].envelope),
                (seq, &envelope.encode())
            );
        }
        other => panic!("{other:?}"),
    }
    let again = alice
        .request(Message::Append {
            req: 7,
            group: group(),
            envelope,
        })
        .await;
    assert!(
        matches!(again, Message::Ack { seq: s, duplicate: true, .. } if s == seq),
        "{again:?}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    let mut honest = Client::connect(&addr, 1).await;
    honest.sign_in().await;

    let mut garbage = Client::connect(&addr, 2).await;
    garbage.send.send_encoded(&[0xff; 64]).await.unwrap();
    assert!(matches!(
        garbage.next().await,
        Message::Error {
            req: 0,
            code: ErrorCode::MALFORMED,
            ..
        }
    ));
    tokio::time::timeout(WAIT, garbage.conn.closed())
        .await
        .expect("closed");

    let mut big = Client::connect(&addr, 3).await;
    let mut header = vec![1u8, 0x06];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    big.send.send_encoded(&header).await.unwrap();
    assert!(matches!(
        big.next().await,
        Message::Error {
            req: 0,
            code: ErrorCode::TOO_LARGE,
            ..
        }
    ));
    tokio::time::timeout(WAIT, big.conn.closed())
        .await
        .expect("closed");

    // A well-framed message the relay does not take is refused, and the connection stays.
    let refused = honest.request(Message::Done { req: 8 }).await;
    assert!(matches!(
        refused,
        Message::Error {
            req: 8,
            code: ErrorCode::MALFORMED,
            ..
        }
    ));
    let account = honest.account();
    let answer = honest
        .request(Message::FetchLog {
            req: 9,
            account,
            from_seq: 0,
        })
        .await;
    assert!(
        matches!(&answer, Message::LogEntries { req: 9, entries, .. } if entries.len() == 1),
        "{answer:?}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_reach_a_device_that_finished_its_stream() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let mut client = Client::connect(&relay.addr(), 5).await;
    client.sign_in().await;
    let account = client.account();
    client
        .send(Message::FetchLog {
            req: 3,
            account,
            from_seq: 0,
        })
        .await;
    client.send.finish().unwrap();
    assert!(matches!(
        client.next().await,
        Message::LogEntries { req: 3, .. }
    ));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_keeps_its_key_and_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    let mut alice = Client::connect(&addr, 1).await;
    alice.sign_in().await;
    let update = alice.update(0, vec![alice.account()]);
    alice.request(Message::PostGroup { req: 3, update }).await;
    // Many appends in flight at once; each is acknowledged after its commit.
    for seq in 1..=200u64 {
        alice
            .send(Message::Append {
                req: 100 + seq as u32,
                group: group(),
                envelope: alice.envelope(segment(), seq),
            })
            .await;
    }
    let mut last = 0;
    for _ in 0..200 {
        match alice.next().await {
            Message::Ack {
                seq,
                prev,
                duplicate: false,
                ..
            } => {
                assert_eq!(prev, last, "acks arrive in commit order");
                last = seq;
            }
            other => panic!("{other:?}"),
        }
    }
    relay.shutdown().await;

    let relay = support::relay(dir.path()).await;
    assert_eq!(relay.addr().key, addr.key, "the relay keeps its key");
    let mut again = Client::connect(&relay.addr(), 1).await;
    let hello = again
        .request(Message::Hello {
            req: 1,
            account: again.account(),
            log_len: 1,
            log_head: again.log.head(),
        })
        .await;
    assert!(
        matches!(&hello, Message::HelloOk { log_len: 1, groups, .. } if *groups == vec![(group(), 0)]),
        "{hello:?}"
    );
    let done = again
        .request(Message::Subscribe {
            req: 2,
            items: vec![Subscription {
                doc: segment(),
                group: group(),
                after_seq: 0,
                snapshot: false,
            }],
        })
        .await;
    let Message::Envelopes { items, .. } = done else {
        panic!("expected the catch-up, got {done:?}");
    };
    let mut got = items.len();
    loop {
        match again.next().await {
            Message::Envelopes { items, .. } => got += items.len(),
            Message::Done { req: 2 } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 200);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_acknowledges_every_append_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let relay = support::relay(dir.path()).await;
    let addr = relay.addr();
    let mut alice = Client::connect(&addr, 1).await;
    alice.sign_in().await;
    let update = alice.update(0, vec![alice.account()]);
    alice.request(Message::PostGroup { req: 3, update }).await;
    let total = 2_000u64;
    for seq in 1..=total {
        alice
            .send(Message::Append {
                req: 100 + seq as u32,
                group: group(),
                envelope: alice.envelope(segment(), seq),
            })
            .await;
    }
    // Stop while appends are in flight.
    assert!(matches!(alice.next().await, Message::Ack { .. }));
    let stopping = tokio::spawn(relay.shutdown());
    let mut acked = 1;
    loop {
        match tokio::time::timeout(WAIT, alice.recv.recv()).await {
            Ok(Ok(Some(Frame::Message(Message::Ack { .. })))) => acked += 1,
            Ok(Ok(None)) | Ok(Err(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    stopping.await.unwrap();
    // Everything stored was acknowledged, and everything acknowledged was stored.
    let relay = support::relay(dir.path()).await;
    let mut again = Client::connect(&relay.addr(), 1).await;
    let account = again.account();
    again
        .request(Message::Hello {
            req: 1,
            account,
            log_len: 1,
            log_head: again.log.head(),
        })
        .await;
    let mut stored = 0;
    let mut after_seq = 0;
    loop {
        match again
            .request(Message::Fetch {
                req: 2,
                doc: segment(),
                after_seq,
                limit: 0,
            })
            .await
        {
            Message::Envelopes { items, more, .. } => {
                stored += items.len();
                after_seq = items.last().map_or(after_seq, |i| i.seq);
                if !more {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored, acked);
    relay.shutdown().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_node_prints_its_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay-node"))
        .args([
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "normal",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay-node starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: PeerAddr = line
        .trim()
        .strip_prefix("relay-node listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("relay-node printed {line:?}"));
    let mut client = Client::connect(&addr, 4).await;
    client.sign_in().await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(dir.path().join("data").join("relay.key").exists());
}
