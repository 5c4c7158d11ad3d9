//! Bodies of the fuzz targets in `fuzz/`, public so that `tests/fuzz_corpus.rs` can replay every
//! corpus file as an ordinary test. Each function must never panic on any input; the assertions
//! inside check properties that hold for every input a decoder accepts.
//!
//! The envelope and device-log targets check against a fixed fixture (one author device, one
//! document, keys for two epochs), so that seeds built from the same fixture pass every check and
//! the fuzzer can mutate its way into the later stages of opening.

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch, Keyring};
use crate::crypto::pairing::{PairRequest, PairResponse, PairingInvite, PairingJoin};
use crate::crypto::rng::SeedRng;
use crate::ids::{AccountId, DeviceId, DocId};
use crate::wire::frame::{Frame, FrameDecoder, decode_frame};

/// The fixture's document.
pub const FIXTURE_DOC: DocId = DocId::from_bytes([0x5d; 32]);
/// Epochs the fixture keyring holds keys for.
pub const FIXTURE_EPOCHS: u32 = 2;

/// The fixture's devices: the author (first) and a second device of the same account.
pub fn fixture_devices() -> [DeviceSecret; 2] {
    let mut rng = SeedRng::from_seed([0xf0; 32]);
    [
        DeviceSecret::generate(&mut rng),
        DeviceSecret::generate(&mut rng),
    ]
}

/// The fixture's keyring: a fixed key for each of [`FIXTURE_EPOCHS`] epochs of [`FIXTURE_DOC`].
pub fn fixture_keyring() -> Keyring {
    let mut ring = Keyring::default();
    for e in 0..FIXTURE_EPOCHS {
        let mut key = [0xa0; 32];
        key[0] = e as u8;
        // Distinct epochs, fresh keyring: insertion cannot conflict.
        let _ = ring.insert(FIXTURE_DOC, KeyEpoch(e), DocKey::from_bytes(key));
    }
    ring
}

/// Decodes `data` as a stream of frames, whole and in two chunks, and checks that every decoded
/// frame re-encodes to the bytes it came from.
pub fn frame_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, consumed))) = decode_frame(rest) {
        assert!(consumed <= rest.len());
        assert_eq!(frame.encode(), rest[..consumed], "frames re-encode exactly");
        rest = &rest[consumed..];
    }
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut decoder = FrameDecoder::default();
    for chunk in [&data[..split], &data[split..]] {
        if decoder.push(chunk).is_err() {
            return;
        }
        while let Ok(Some(frame)) = decoder.poll_frame() {
            assert!(!frame.encode().is_empty());
        }
    }
}

/// Decodes `data` as a protocol message, a datagram and a group update, and checks that whatever
/// decodes re-encodes to the same bytes (one encoding per value: no ambiguity a peer could use).
pub fn message_decode(data: &[u8]) {
    use crate::crypto::group::GroupUpdate;
    use crate::wire::message::{Message, decode_datagram, encode_datagram};
    if let Ok(msg) = Message::decode(data) {
        assert_eq!(msg.encode(), data, "messages re-encode exactly");
    }
    if let Ok((group, envelope)) = decode_datagram(data) {
        assert_eq!(
            encode_datagram(&group, &envelope),
            data,
            "datagrams re-encode"
        );
    }
    if let Ok(update) = GroupUpdate::decode(data) {
        assert_eq!(update.encode(), data, "group updates re-encode exactly");
        let _ = update.verify_signature();
    }
}

/// Opens `data` as an envelope of the fixture document, authorising only the fixture's author.
pub fn envelope_open(data: &[u8]) {
    let [author, _] = fixture_devices();
    let author = author.device_id();
    let ring = fixture_keyring();
    let only_author = |d: &DeviceId, _: &DocId, _: KeyEpoch| *d == author;
    if let Ok(env) = SealedEnvelope::decode(data) {
        assert_eq!(env.encode(), data, "envelopes re-encode exactly");
        if let Ok(opened) = env.open(&FIXTURE_DOC, &ring, only_author) {
            assert_eq!(opened.header.author, author);
            assert_eq!(opened.id, env.id());
        }
    }
}

/// Decodes `data` as a list of device-log entries and verifies it as the log of the account its
/// first entry names, and of the fixture account.
pub fn device_log_verify(data: &[u8]) {
    let Ok(entries) = DeviceLog::decode_entries(data) else {
        return;
    };
    assert_eq!(
        DeviceLog::encode_entries(&entries),
        data,
        "logs re-encode exactly"
    );
    if let Some(first) = entries.first() {
        let account = AccountId::from_bytes(first.hash().0);
        if let Ok(log) = DeviceLog::verify(&account, entries.clone()) {
            assert_eq!(log.len(), entries.len());
            assert!(log.current_devices().count() >= 1);
        }
    }
    let _ = DeviceLog::verify(&fixture_account(), entries);
}

/// Everything both sides of a pairing hold before the exchange.
struct PairingFixture {
    inviter: DeviceSecret,
    joiner: DeviceSecret,
    log: DeviceLog,
    ring: Keyring,
    invite: PairingInvite,
    join: PairingJoin,
    request: PairRequest,
    rng: SeedRng,
}

/// Time at which the fixture's pairing starts, and how long it stays open.
const PAIRING_T0_MS: u64 = 1_000;
const PAIRING_TTL_MS: u64 = 60_000;

fn pairing_fixture() -> Option<PairingFixture> {
    let [inviter, _] = fixture_devices();
    let mut rng = SeedRng::from_seed([0xf2; 32]);
    let joiner = DeviceSecret::generate(&mut rng);
    let log = DeviceLog::from_genesis(fixture_genesis()).ok()?;
    let invite = PairingInvite::new(&mut rng, PAIRING_T0_MS, PAIRING_TTL_MS).ok()?;
    let (join, request) = PairingJoin::start(
        &invite.code(),
        &joiner,
        "joiner",
        "test",
        PAIRING_T0_MS,
        PAIRING_TTL_MS,
    )
    .ok()?;
    Some(PairingFixture {
        inviter,
        joiner,
        log,
        ring: fixture_keyring(),
        invite,
        join,
        request,
        rng,
    })
}

/// Feeds `data` to both pairing state machines of a fresh fixture: as a request to the inviter
/// and as a response to the joiner.
pub fn pairing_handle(data: &[u8]) {
    let Some(mut f) = pairing_fixture() else {
        return;
    };
    let now = PAIRING_T0_MS + 1;
    if let Ok(request) = PairRequest::decode(data) {
        assert_eq!(request.encode(), data, "requests re-encode exactly");
        let before = f.log.len();
        match f
            .invite
            .handle_request(&request, now, &f.inviter, &mut f.log, &f.ring, &mut f.rng)
        {
            Ok(response) => {
                assert_eq!(f.log.len(), before + 1);
                assert!(f.log.is_current(&request.device.device));
                assert_eq!(response.keys.len(), FIXTURE_EPOCHS as usize);
            }
            Err(_) => assert_eq!(f.log.len(), before, "a failed request appends nothing"),
        }
    }
    if let Ok(response) = PairResponse::decode(data) {
        assert_eq!(response.encode(), data, "responses re-encode exactly");
        if let Ok(joined) = f.join.handle_response(&response, now, &f.joiner) {
            assert!(joined.log.is_current(&f.joiner.device_id()));
        }
    }
}

fn fixture_genesis() -> DeviceLogEntry {
    let [a, _] = fixture_devices();
    // Fixed, short name and platform: within the limits.
    DeviceLogEntry::genesis(&a, "fixture", "test").unwrap_or_else(|_| unreachable!())
}

fn fixture_account() -> AccountId {
    AccountId::from_bytes(fixture_genesis().hash().0)
}

/// Valid inputs for each target, to seed the corpora: `(target, bytes)`.
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let [a, b] = fixture_devices();
    let ring = fixture_keyring();
    let mut out = Vec::new();

    // Batches: a new message, an edit, a reaction, as a second device of the fixture would send.
    {
        use crate::model::{Draft, VersionVector};
        let (mut r, c) = model_fixture();
        let seg = crate::ids::DocAddr::Segment(c, 0);
        let have = r.version_vector(&seg);
        if let Ok(id) = r.send(1_010, &c, &Draft::text("seed")) {
            let _ = r.react(&c, &id, "+1", true);
        }
        for since in [have, VersionVector::new()] {
            if let Some(batch) = r.changes_since(&seg, &since) {
                out.push(("batch_apply", batch.encode()));
            }
        }
    }
    // Structured changes: each byte string steers the change builder differently.
    for seed in [
        &b"\x00\x00\x00\x00\x00\x00\x00\x00"[..],
        &[5, 7, 1, 0, 0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        &[9, 3, 2, 1, 3, 3, 4, 2, 2, 0, 1, 2, 1, 1, 6, 5, 0, 0, 3],
        &[1, 1, 1, 4, 1, 2, 0, 0, 1, 4, 3, 1, 3, 1, 0, 0],
    ] {
        out.push(("change_apply", seed.to_vec()));
    }

    let mut envelopes = Vec::new();
    for (i, (kind, plaintext)) in [
        (EnvelopeKind::Changes, &b""[..]),
        (EnvelopeKind::Changes, &b"a batch of changes"[..]),
        (EnvelopeKind::Snapshot, &b"a snapshot"[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let epoch = KeyEpoch(i as u32 % FIXTURE_EPOCHS);
        let header = EnvelopeHeader {
            kind,
            doc: FIXTURE_DOC,
            epoch,
            author: a.device_id(),
            first_seq: i as u64,
            last_seq: i as u64 + 2,
        };
        if let Some(key) = ring.key(&FIXTURE_DOC, epoch) {
            if let Ok(env) = SealedEnvelope::seal(&a, key, header, plaintext) {
                out.push(("envelope_open", env.encode()));
                envelopes.push(env);
            }
        }
    }

    let mut log = DeviceLog::from_genesis(fixture_genesis()).unwrap_or_else(|_| unreachable!());
    out.push((
        "device_log_verify",
        DeviceLog::encode_entries(log.entries()),
    ));
    if let Ok(add) = log.add_device(&a, b.public(), "second", "test") {
        let _ = log.append(add);
    }
    out.push((
        "device_log_verify",
        DeviceLog::encode_entries(log.entries()),
    ));
    if let Ok(revoke) = log.revoke_device(&b, a.device_id()) {
        let _ = log.append(revoke);
    }
    out.push((
        "device_log_verify",
        DeviceLog::encode_entries(log.entries()),
    ));

    // Protocol messages around the fixture envelopes, and a signed group update.
    {
        use crate::crypto::group::{GroupUpdate, SealedLabel};
        use crate::wire::message::{Message, StoredEnvelope, Subscription, encode_datagram};
        let account = log.account();
        let items = envelopes
            .iter()
            .enumerate()
            .map(|(i, e)| StoredEnvelope {
                seq: i as u64 + 10,
                prev: i as u64 + 9,
                envelope: e.encode(),
            })
            .collect();
        let mut messages = vec![
            Message::Hello {
                req: 1,
                account,
                log_len: log.len() as u32,
                log_head: log.head(),
            },
            Message::Subscribe {
                req: 2,
                items: vec![Subscription {
                    doc: FIXTURE_DOC,
                    group: FIXTURE_DOC,
                    after_seq: 3,
                    snapshot: false,
                }],
            },
            Message::Envelopes {
                req: 0,
                doc: FIXTURE_DOC,
                items,
                more: false,
            },
            Message::Ack {
                req: 3,
                doc: FIXTURE_DOC,
                seq: 12,
                prev: 11,
                duplicate: false,
            },
            Message::LogAppend {
                req: 4,
                account,
                first_seq: 0,
                entries: log.entries().to_vec(),
            },
        ];
        if let Some(env) = envelopes.first() {
            messages.push(Message::Append {
                req: 5,
                group: FIXTURE_DOC,
                envelope: env.clone(),
            });
            messages.push(Message::PutSnapshot {
                req: 6,
                group: FIXTURE_DOC,
                envelope: env.clone(),
            });
            messages.push(Message::Snapshot {
                req: 2,
                doc: FIXTURE_DOC,
                envelope: env.encode(),
            });
            out.push(("message_decode", encode_datagram(&FIXTURE_DOC, env)));
        }
        let addr = crate::ids::DocAddr::Account(account);
        let mut keys = Keyring::default();
        let mut rng = SeedRng::from_seed([0xf2; 32]);
        if let Ok((epoch, wrapped)) = keys.rotate(addr.doc_id(), &[a.public()], &mut rng) {
            if let Some(key) = keys.key(&addr.doc_id(), epoch) {
                let label = SealedLabel::seal(&addr, epoch, key, &mut rng);
                if let Ok(update) =
                    GroupUpdate::sign(&a, account, addr.doc_id(), 0, vec![account], wrapped, label)
                {
                    out.push(("message_decode", update.encode()));
                    messages.push(Message::PostGroup { req: 6, update });
                }
            }
        }
        for m in messages {
            out.push(("message_decode", m.encode()));
        }
    }

    let mut stream = Vec::new();
    for env in envelopes {
        let f = Frame::Envelope(env).encode();
        stream.extend_from_slice(&f);
        out.push(("frame_decode", f));
    }
    let f = Frame::DeviceLogEntry {
        account: log.account(),
        entry: log.entries()[log.len() - 1].clone(),
    }
    .encode();
    stream.extend_from_slice(&f);
    out.push(("frame_decode", f));
    let f = Frame::Error {
        code: crate::wire::frame::ErrorCode::RATE_LIMITED,
        message: "slow down".into(),
    }
    .encode();
    stream.extend_from_slice(&f);
    out.push(("frame_decode", f));

    // A pairing exchange that adds a third device.
    let mut rng = SeedRng::from_seed([0xf1; 32]);
    let joiner = DeviceSecret::generate(&mut rng);
    if let Ok(mut invite) = PairingInvite::new(&mut rng, 0, 1_000) {
        if let Ok((_, request)) =
            PairingJoin::start(&invite.code(), &joiner, "third", "test", 0, 1_000)
        {
            if let Ok(response) = invite.handle_request(&request, 1, &b, &mut log, &ring, &mut rng)
            {
                let f = Frame::PairResponse(response).encode();
                stream.extend_from_slice(&f);
                out.push(("frame_decode", f));
            }
            let f = Frame::PairRequest(request).encode();
            stream.extend_from_slice(&f);
            out.push(("frame_decode", f));
        }
    }
    out.push(("frame_decode", stream));

    if let Some(mut f) = pairing_fixture() {
        out.push(("pairing_handle", f.request.encode()));
        if let Ok(response) = f.invite.handle_request(
            &f.request,
            PAIRING_T0_MS + 1,
            &f.inviter,
            &mut f.log,
            &f.ring,
            &mut f.rng,
        ) {
            out.push(("pairing_handle", response.encode()));
        }
    }
    out
}

/// A replica holding a conversation of two messages (one with attachments), and the same state on
/// a second device of another member account, for the model targets.
fn model_fixture() -> (crate::model::Replica, crate::ids::ConversationId) {
    use crate::model::{Attachment, Draft, ModelConfig, Replica};
    let alice = AccountId::from_bytes([1; 32]);
    let bob = AccountId::from_bytes([2; 32]);
    let config = ModelConfig {
        segment_cap: 4,
        ..ModelConfig::default()
    };
    // Fixed ids and a valid configuration: these calls cannot fail.
    let mut a = Replica::new(alice, DeviceId::from_bytes([1; 32]), config).expect("valid config");
    let c = a
        .create_conversation(1_000, "fuzz", &[bob])
        .expect("fresh replica");
    a.send(1_001, &c, &Draft::text("hello")).expect("member");
    let files = vec![Attachment {
        hash: [3; 32],
        size: 3,
        mime: "text/plain".into(),
        name: "a.txt".into(),
    }];
    a.send(
        1_002,
        &c,
        &Draft {
            attachments: files,
            ..Draft::text("file")
        },
    )
    .expect("member");
    let mut b = Replica::new(bob, DeviceId::from_bytes([2; 32]), config).expect("valid config");
    let batches = a
        .docs()
        .iter()
        .filter(|d| !matches!(d, crate::ids::DocAddr::Account(_)))
        .filter_map(|d| a.changes_since(d, &b.version_vector(d)))
        .collect();
    let _ = b.apply(1_003, batches);
    (b, c)
}

/// Runs every query of the fixture conversation; none may panic.
fn query_all(r: &crate::model::Replica, c: &crate::ids::ConversationId) {
    let _ = r.conversation_list();
    let _ = r.unread_count(c);
    if let Ok(page) = r.history(c, None, 50) {
        for m in &page.messages {
            let _ = r.message(c, &m.id);
        }
    }
}

/// Lets panics raised inside Automerge's change decoder unwind to the model, which catches them
/// (see `model::validate`); every other panic still reaches the previous hook, which under
/// libFuzzer aborts and reports a crash.
fn tolerate_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_decoder = info.location().is_some_and(|l| {
                let file = l.file().replace('\\', "/");
                file.contains("/automerge-") && file.ends_with("/src/change.rs")
            });
            if !in_decoder {
                previous(info);
            }
        }));
    });
}

/// Decodes `data` as a change batch; one that decodes re-encodes to the same bytes and is applied
/// to a replica, which must stay usable.
pub fn batch_apply(data: &[u8]) {
    tolerate_decoder_panics();
    use crate::model::ChangeBatch;
    let Ok(batch) = ChangeBatch::decode(data) else {
        return;
    };
    assert_eq!(batch.encode(), data, "batches re-encode exactly");
    assert_eq!(batch.encoded_len(), data.len());
    let (mut r, c) = model_fixture();
    let _ = r.apply(2_000, vec![batch]);
    query_all(&r, &c);
}

/// Builds one Automerge change from `data` — operations on the fixture's real objects, on made-up
/// ones, with real or made-up predecessors and list positions — applies it to the fixture's
/// segment, and checks that the replica stays usable. Automerge panics on some such changes; the
/// model must refuse them first.
pub fn change_apply(data: &[u8]) {
    tolerate_decoder_panics();
    use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
    use automerge::{ActorId, ObjType, ReadDoc, ScalarValue};

    use crate::ids::DocAddr;
    use crate::model::ChangeBatch;

    let (mut r, c) = model_fixture();
    let seg = DocAddr::Segment(c, 0);
    let Some(doc) = r.synced_doc(&seg) else {
        return;
    };
    let doc = doc.doc();
    // Real operation ids of the fixture: message maps and their fields.
    let mut real: Vec<OpId> = Vec::new();
    for item in doc.map_range(automerge::ROOT, ..) {
        let obj = item.id();
        if let automerge::ObjId::Id(ctr, actor, _) = &obj {
            real.push(OpId(*ctr, actor.clone()));
        }
        for field in doc.map_range(&obj, ..) {
            if let automerge::ObjId::Id(ctr, actor, _) = field.id() {
                real.push(OpId(ctr, actor));
            }
        }
    }
    let attacker = ActorId::from([0xee; 32]);
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let start = 1 + u64::from(next()) * 3;
    let mut ops = Vec::new();
    let count = usize::from(next() % 8) + 1;
    for i in 0..count {
        let pick_id = |b: u8| -> OpId {
            match b % 4 {
                0 if !real.is_empty() => real[usize::from(b / 4) % real.len()].clone(),
                1 => OpId(start + u64::from(b / 4) % (i as u64 + 1), attacker.clone()),
                _ => OpId(900 + u64::from(b), attacker.clone()),
            }
        };
        let obj = match next() % 3 {
            0 => ObjectId::Root,
            _ => ObjectId::Id(pick_id(next())),
        };
        let key = match next() % 4 {
            0 => Key::Map("body".into()),
            1 => Key::Map(format!("k{}", next() % 4).into()),
            2 => Key::Seq(ElementId::Head),
            _ => Key::Seq(ElementId::Id(pick_id(next()))),
        };
        let action = match next() % 7 {
            0 => OpType::Put(ScalarValue::Str("x".into())),
            1 => OpType::Put(ScalarValue::Boolean(true)),
            2 => OpType::Delete,
            3 => OpType::Make(ObjType::Map),
            4 => OpType::Make(ObjType::List),
            5 => OpType::Make(ObjType::Text),
            _ => OpType::Increment(1),
        };
        let pred = match next() % 3 {
            0 => SortedVec::new(),
            _ => SortedVec::from(vec![pick_id(next())]),
        };
        ops.push(Op {
            action,
            obj,
            key,
            pred,
            insert: next() % 2 == 0,
        });
    }
    let change = automerge::Change::from(automerge::ExpandedChange {
        operations: ops,
        actor_id: attacker,
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::new(start).unwrap_or(std::num::NonZeroU64::MIN),
        time: 0,
        message: None,
        deps: doc.get_heads(),
        extra_bytes: Vec::new(),
        author: None,
    });
    let _ = r.apply(
        2_000,
        vec![ChangeBatch {
            addr: seg,
            changes: vec![change],
        }],
    );
    query_all(&r, &c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_every_check() {
        let seeds = seed_inputs();
        assert_eq!(seeds.len(), 2 + 4 + 3 + 3 + 10 + 2 + 9);
        let [a, _] = fixture_devices();
        let ring = fixture_keyring();
        for (target, bytes) in &seeds {
            match *target {
                "envelope_open" => {
                    let ok = |d: &DeviceId, _: &DocId, _: KeyEpoch| *d == a.device_id();
                    SealedEnvelope::decode(bytes)
                        .unwrap()
                        .open(&FIXTURE_DOC, &ring, ok)
                        .unwrap();
                    envelope_open(bytes);
                }
                "device_log_verify" => {
                    let entries = DeviceLog::decode_entries(bytes).unwrap();
                    DeviceLog::verify(&fixture_account(), entries).unwrap();
                    device_log_verify(bytes);
                }
                "frame_decode" => {
                    assert!(decode_frame(bytes).unwrap().is_some());
                    frame_decode(bytes);
                }
                "pairing_handle" => pairing_handle(bytes),
                "batch_apply" => {
                    assert!(crate::model::ChangeBatch::decode(bytes).is_ok());
                    batch_apply(bytes);
                }
                "change_apply" => change_apply(bytes),
                "message_decode" => {
                    // Every seed decodes as one of the three kinds.
                    let decodes = crate::wire::message::Message::decode(bytes).is_ok()
                        || crate::wire::message::decode_datagram(bytes).is_ok()
                        || crate::crypto::group::GroupUpdate::decode(bytes).is_ok();
                    assert!(decodes, "a message_decode seed that decodes as nothing");
                    message_decode(bytes);
                }
                other => panic!("unknown target {other}"),
            }
        }
    }

    #[test]
    fn garbage_is_harmless() {
        for data in [&[][..], &[1][..], &[1, 1, 0, 0, 0, 0][..], &[0xff; 64][..]] {
            frame_decode(data);
            envelope_open(data);
            device_log_verify(data);
            pairing_handle(data);
            batch_apply(data);
            change_apply(data);
            message_decode(data);
        }
    }

    #[test]
    fn pairing_seeds_complete_the_exchange() {
        let mut f = pairing_fixture().unwrap();
        let response = f
            .invite
            .handle_request(
                &f.request,
                PAIRING_T0_MS + 1,
                &f.inviter,
                &mut f.log,
                &f.ring,
                &mut f.rng,
            )
            .unwrap();
        // A fresh fixture's joiner accepts the response built from the same fixture.
        let mut g = pairing_fixture().unwrap();
        let joined = g
            .join
            .handle_response(&response, PAIRING_T0_MS + 1, &g.joiner)
            .unwrap();
        assert_eq!(joined.keyring.docs().count(), 1);
    }
}
