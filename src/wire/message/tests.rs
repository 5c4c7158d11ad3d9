use super::*;
use crate::crypto::device_log::DeviceLog;
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind};
use crate::crypto::group::SealedLabel;
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch, Keyring};
use crate::crypto::pairing::{PairingInvite, PairingJoin};
use crate::crypto::rng::SeedRng;
use crate::ids::{ConversationId, DocAddr};
use proptest::prelude::*;

fn samples() -> Vec<Message> {
    static SAMPLES: std::sync::OnceLock<Vec<Message>> = std::sync::OnceLock::new();
    SAMPLES.get_or_init(build_samples).clone()
}

fn build_samples() -> Vec<Message> {
    let mut rng = SeedRng::from_seed([5; 32]);
    let a = DeviceSecret::generate(&mut rng);
    let mut log = DeviceLog::create(&a, "phone", "android").unwrap();
    let account = log.account();
    let doc = DocId::from_bytes([3; 32]);
    let header = EnvelopeHeader {
        kind: EnvelopeKind::Changes,
        doc,
        epoch: KeyEpoch(0),
        author: a.device_id(),
        first_seq: 1,
        last_seq: 3,
    };
    let env = SealedEnvelope::seal(&a, &DocKey::from_bytes([9; 32]), header, b"changes").unwrap();
    let snapshot_header = EnvelopeHeader {
        kind: EnvelopeKind::Snapshot,
        first_seq: 41,
        last_seq: 41,
        ..header
    };
    let snapshot =
        SealedEnvelope::seal(&a, &DocKey::from_bytes([9; 32]), snapshot_header, b"save").unwrap();
    let addr = DocAddr::Meta(ConversationId::from_bytes([6; 16]));
    let mut ring = Keyring::default();
    let (epoch, wrapped) = ring.rotate(addr.doc_id(), &[a.public()], &mut rng).unwrap();
    let label = SealedLabel::seal(
        &addr,
        epoch,
        ring.key(&addr.doc_id(), epoch).unwrap(),
        &mut rng,
    );
    let update =
        GroupUpdate::sign(&a, account, addr.doc_id(), 0, vec![account], wrapped, label).unwrap();
    let joiner = DeviceSecret::generate(&mut rng);
    let mut invite = PairingInvite::new(&mut rng, 0, 1000).unwrap();
    let (_, request) = PairingJoin::start(&invite.code(), &joiner, "tab", "ios", 0, 1000).unwrap();
    let response = invite
        .handle_request(&request, 1, &a, &mut log, &ring, &mut rng)
        .unwrap();
    let rendezvous = [8; RENDEZVOUS_LEN];
    vec![
        Message::Hello {
            req: 1,
            account,
            log_len: 2,
            log_head: log.head(),
        },
        Message::LogAppend {
            req: 2,
            account,
            first_seq: 0,
            entries: log.entries().to_vec(),
        },
        Message::FetchLog {
            req: 3,
            account,
            from_seq: 1,
        },
        Message::PostGroup {
            req: 4,
            update: update.clone(),
        },
        Message::FetchGroup {
            req: 5,
            group: addr.doc_id(),
            from_version: 0,
        },
        Message::Subscribe {
            req: 6,
            items: vec![
                Subscription {
                    doc,
                    group: addr.doc_id(),
                    after_seq: 0,
                    snapshot: false,
                },
                Subscription {
                    doc: addr.doc_id(),
                    group: addr.doc_id(),
                    after_seq: u64::MAX,
                    snapshot: true,
                },
            ],
        },
        Message::Append {
            req: 7,
            group: addr.doc_id(),
            envelope: env.clone(),
        },
        Message::PutSnapshot {
            req: 12,
            group: addr.doc_id(),
            envelope: snapshot.clone(),
        },
        Message::Snapshot {
            req: 6,
            doc,
            envelope: snapshot.encode(),
        },
        Message::Fetch {
            req: 8,
            doc,
            after_seq: 10,
            limit: 500,
        },
        Message::PairOffer { req: 9, rendezvous },
        Message::PairJoin {
            req: 10,
            rendezvous,
            request: request.clone(),
        },
        Message::PairAnswer {
            req: 11,
            rendezvous,
            response: response.clone(),
        },
        Message::HelloOk {
            req: 1,
            log_len: 1,
            log_head: log.head(),
            groups: vec![(addr.doc_id(), 3), (doc, 0)],
        },
        Message::Done { req: 6 },
        Message::Ack {
            req: 7,
            doc,
            seq: 99,
            prev: 0,
            duplicate: true,
        },
        Message::Envelopes {
            req: 0,
            doc,
            items: vec![
                StoredEnvelope {
                    seq: 5,
                    prev: 2,
                    envelope: env.encode(),
                },
                StoredEnvelope {
                    seq: 9,
                    prev: 5,
                    envelope: env.encode(),
                },
            ],
            more: true,
        },
        Message::LogEntries {
            req: 0,
            account,
            first_seq: 1,
            entries: log.entries()[1..].to_vec(),
        },
        Message::GroupUpdates {
            req: 5,
            group: addr.doc_id(),
            updates: vec![update],
        },
        Message::PairRequested {
            rendezvous,
            request,
        },
        Message::PairAnswered {
            rendezvous,
            response,
        },
        Message::PeerHello {
            account,
            entries: log.entries().to_vec(),
        },
        Message::PeerSync {
            req: 9,
            docs: vec![
                DocVersion {
                    doc,
                    held: vec![(a.device_id(), 3), (joiner.device_id(), u64::MAX)],
                },
                DocVersion {
                    doc: addr.doc_id(),
                    held: Vec::new(),
                },
            ],
        },
        Message::Error {
            req: 7,
            code: ErrorCode::UNAUTHORISED,
            text: "not a member of the document's group".into(),
        },
    ]
}

#[test]
fn every_message_round_trips() {
    for msg in samples() {
        let bytes = msg.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), msg, "{msg:?}");
        let frame = crate::wire::frame::Frame::Message(msg.clone()).encode();
        let (decoded, used) = crate::wire::frame::decode_frame(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(decoded, crate::wire::frame::Frame::Message(msg));
    }
}

#[test]
fn truncation_and_trailing_bytes_are_errors() {
    for msg in samples() {
        let bytes = msg.encode();
        for cut in 0..bytes.len() {
            assert!(
                Message::decode(&bytes[..cut]).is_err(),
                "{msg:?} cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Message::decode(&long).is_err());
    }
}

#[test]
fn request_ids_and_lists_are_checked() {
    let bytes = Message::Done { req: 1 }.encode();
    let mut zero = bytes.clone();
    zero[1..5].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(Message::decode(&zero), Err(MessageError::ZeroRequestId));
    // A subscription count far past the limit is refused before any allocation.
    let mut w = Writer::default();
    w.u8(tag::SUBSCRIBE).u32(1).u32(u32::MAX);
    assert!(matches!(
        Message::decode(&w.into_bytes()),
        Err(MessageError::TooMany {
            field: "subscriptions",
            ..
        })
    ));
    // So is a version vector longer than any document has.
    let mut w = Writer::default();
    w.u8(tag::PEER_SYNC)
        .u32(1)
        .u32(1)
        .put(&[0; 32])
        .u32(MAX_VERSION_ENTRIES as u32 + 1);
    assert!(matches!(
        Message::decode(&w.into_bytes()),
        Err(MessageError::TooMany {
            field: "version entries",
            ..
        })
    ));
    assert!(matches!(
        Message::decode(&[0xee]),
        Err(MessageError::UnknownTag { tag: 0xee })
    ));
}

#[test]
fn the_snapshot_flag_has_one_encoding() {
    let msg = Message::Subscribe {
        req: 3,
        items: vec![Subscription {
            doc: DocId::from_bytes([1; 32]),
            group: DocId::from_bytes([2; 32]),
            after_seq: 7,
            snapshot: true,
        }],
    };
    let mut bytes = msg.encode();
    assert_eq!(bytes.len(), 1 + 4 + 4 + SUBSCRIPTION_BYTES);
    let last = bytes.len() - 1;
    assert_eq!(bytes[last], 1);
    bytes[last] = 2;
    assert_eq!(
        Message::decode(&bytes),
        Err(MessageError::Codec(CodecError::InvalidFlag {
            field: "snapshot",
            value: 2
        }))
    );
}

#[test]
fn datagrams_round_trip() {
    let Message::Append {
        group, envelope, ..
    } = samples()[6].clone()
    else {
        panic!("sample 6 is an append");
    };
    let bytes = encode_datagram(&group, &envelope);
    assert_eq!(decode_datagram(&bytes).unwrap(), (group, envelope));
    assert!(matches!(
        decode_datagram(&[9, 1, 2]),
        Err(MessageError::DatagramVersion { version: 9 })
    ));
}

proptest! {
    #[test]
    fn mutated_messages_never_panic(idx in 0usize..24, pos in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = samples()[idx].encode();
        let p = pos % bytes.len();
        bytes[p] = byte;
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(&bytes);
        let _ = decode_datagram(&bytes);
    }
}
