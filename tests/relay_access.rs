//! The relay's access checks and input handling, driven by raw protocol clients over real QUIC,
//! and a scan of its database for plaintext.

mod support;

use std::time::Duration;

use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::rng::SeedRng;
use roamsync::engine::Event;
use roamsync::ids::DocAddr;
use roamsync::wire::frame::{ErrorCode, Frame};
use roamsync::wire::message::{Message, Subscription};
use support::raw::Client as Raw;
use support::*;

fn error_code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_can_neither_read_nor_write_a_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    let chat = a
        .create_conversation("private", &[b.account()])
        .await
        .unwrap();
    until_listed(&b, &chat).await;
    a.send(&chat, "for members only").await.unwrap();
    until_uploaded(&a).await;

    let mut mallory = Raw::connect(&addr, 66).await;
    mallory.sign_in().await;
    let group = DocAddr::Meta(chat).doc_id();
    let segment = DocAddr::Segment(chat, 0).doc_id();
    let answer = mallory
        .request(Message::Subscribe {
            req: 3,
            items: vec![Subscription {
                doc: segment,
                group,
                after_seq: 0,
                snapshot: false,
            }],
        })
        .await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UNAUTHORISED),
        "{answer:?}"
    );
    let answer = mallory
        .request(Message::Fetch {
            req: 4,
            doc: segment,
            after_seq: 0,
            limit: 100,
        })
        .await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UNAUTHORISED),
        "{answer:?}"
    );
    let answer = mallory
        .request(Message::FetchGroup {
            req: 5,
            group,
            from_version: 0,
        })
        .await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UNAUTHORISED),
        "{answer:?}"
    );
    // Nor can it write, even with a well-formed envelope signed by itself.
    let secret = DeviceSecret::generate(&mut SeedRng::from_seed([66; 32]));
    let header = roamsync::crypto::envelope::EnvelopeHeader {
        kind: roamsync::crypto::envelope::EnvelopeKind::Changes,
        doc: segment,
        epoch: roamsync::crypto::keys::KeyEpoch(0),
        author: secret.device_id(),
        first_seq: 1,
        last_seq: 1,
    };
    let envelope = roamsync::crypto::envelope::SealedEnvelope::seal(
        &secret,
        &roamsync::crypto::keys::DocKey::from_bytes([1; 32]),
        header,
        b"forged",
    )
    .unwrap();
    let answer = mallory
        .request(Message::Append {
            req: 6,
            group,
            envelope,
        })
        .await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UNAUTHORISED),
        "{answer:?}"
    );
    // The members still talk.
    let mut b_events = b.events();
    let m = a.send(&chat, "still fine").await.unwrap();
    wait_for(
        &mut b_events,
        "message",
        |e| matches!(e, Event::MessageReceived { id, .. } if *id == m),
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let mut honest = Raw::connect(&addr, 1).await;
    honest.sign_in().await;

    // Garbage: an error reply or a closed stream, then the connection goes away.
    let mut garbage = Raw::connect(&addr, 2).await;
    garbage.send.send_encoded(&[0xff; 64]).await.unwrap();
    let outcome = tokio::time::timeout(WAIT, garbage.recv.recv())
        .await
        .expect("an answer");
    match outcome {
        Ok(Some(Frame::Message(Message::Error { code, .. }))) => {
            assert_eq!(code, ErrorCode::MALFORMED)
        }
        Ok(None) | Err(_) => {}
        Ok(Some(other)) => panic!("garbage got {other:?}"),
    }
    tokio::time::timeout(WAIT, garbage.conn.closed())
        .await
        .expect("closed");

    // A header claiming a frame far over the limit.
    let mut big = Raw::connect(&addr, 3).await;
    let mut header = vec![1u8, 0x06];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    big.send.send_encoded(&header).await.unwrap();
    let outcome = tokio::time::timeout(WAIT, big.recv.recv())
        .await
        .expect("an answer");
    if let Ok(Some(Frame::Message(m))) = &outcome {
        assert_eq!(error_code(m), Some(ErrorCode::TOO_LARGE), "{m:?}");
    }
    tokio::time::timeout(WAIT, big.conn.closed())
        .await
        .expect("closed");

    // The honest client is still served.
    let account = honest.log.account();
    let answer = honest
        .request(Message::FetchLog {
            req: 9,
            account,
            from_seq: 0,
        })
        .await;
    assert!(
        matches!(answer, Message::LogEntries { req: 9, .. }),
        "{answer:?}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_database_holds_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    let markers = [
        "PLAINTEXT-TITLE-7f3a",
        "PLAINTEXT-BODY-91c2",
        "PLAINTEXT-EDIT-55d0",
        "PLAINTEXT-DRAFT-0b8e",
        "PLAINTEXT-REACTION-c4",
    ];
    let chat = a
        .create_conversation(markers[0], &[b.account()])
        .await
        .unwrap();
    until_listed(&b, &chat).await;
    let m = a.send(&chat, markers[1]).await.unwrap();
    a.edit(&chat, &m, markers[2]).await.unwrap();
    a.set_draft(&chat, markers[3]).await.unwrap();
    // B reacts to a message it holds.
    until_history(&b, &chat, 1).await;
    b.react(&chat, &m, markers[4], true).await.unwrap();
    a.set_typing(&chat, true).await.unwrap();
    until_uploaded(&a).await;
    until_uploaded(&b).await;
    a.shutdown().await;
    b.shutdown().await;
    relay.shutdown().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut scanned = 0;
    for entry in std::fs::read_dir(dir.path().join("relay")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        for marker in markers {
            let found = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
            assert!(!found, "{marker} found in {}", path.display());
        }
        // The conversation id (private to members) never appears either: only hashes of it.
        let id = chat.as_bytes();
        assert!(
            !bytes.windows(id.len()).any(|w| w == id),
            "conversation id in {}",
            path.display()
        );
    }
    assert!(
        scanned > 10_000,
        "the relay stored something ({scanned} bytes)"
    );
}
