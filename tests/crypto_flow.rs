//! End-to-end flow across the crypto and wire modules: two accounts share a conversation, one
//! links a second device, a member is removed, and every envelope travels as frames.

use roamsync::crypto::device_log::DeviceLog;
use roamsync::crypto::envelope::{EnvelopeError, EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::keys::{KeyEpoch, Keyring};
use roamsync::crypto::pairing::{PairingInvite, PairingJoin};
use roamsync::crypto::rng::SeedRng;
use roamsync::ids::{ConversationId, DeviceId, DocAddr, DocId};
use roamsync::wire::frame::{Frame, FrameDecoder};

/// Sends frames through a decoder in awkward chunk sizes, as a network would.
fn transmit(frames: &[Frame]) -> Vec<Frame> {
    let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
    let mut decoder = FrameDecoder::default();
    let mut out = Vec::new();
    for chunk in bytes.chunks(37) {
        decoder.push(chunk).expect("within limits");
        while let Some(frame) = decoder.poll_frame().expect("well-formed") {
            out.push(frame);
        }
    }
    out
}

fn envelope(frame: &Frame) -> &SealedEnvelope {
    match frame {
        Frame::Envelope(env) => env,
        other => panic!("expected an envelope frame, got {other:?}"),
    }
}

fn seal(author: &DeviceSecret, ring: &Keyring, doc: DocId, seq: u64, text: &[u8]) -> Frame {
    let (epoch, key) = ring.latest(&doc).expect("a key for the document");
    let header = EnvelopeHeader {
        kind: EnvelopeKind::Changes,
        doc,
        epoch,
        author: author.device_id(),
        first_seq: seq,
        last_seq: seq,
    };
    Frame::Envelope(SealedEnvelope::seal(author, key, header, text).expect("sealable"))
}

#[test]
fn conversation_with_linking_and_removal() {
    let mut rng = SeedRng::from_seed([77; 32]);
    let ana_phone = DeviceSecret::generate(&mut rng);
    let bo_phone = DeviceSecret::generate(&mut rng);
    let mut ana_log = DeviceLog::create(&ana_phone, "phone", "android").unwrap();
    let bo_log = DeviceLog::create(&bo_phone, "phone", "ios").unwrap();

    // Ana creates a conversation with Bo: epoch 0 is wrapped to both phones.
    let conv = ConversationId::from_bytes([1; 16]);
    let doc = DocAddr::Segment(conv, 0).doc_id();
    let mut ana_ring = Keyring::default();
    let (e0, wrapped) = ana_ring
        .rotate(doc, &[ana_phone.public(), bo_phone.public()], &mut rng)
        .unwrap();
    let mut bo_ring = Keyring::default();
    for w in wrapped
        .iter()
        .filter(|w| w.recipient == bo_phone.device_id())
    {
        bo_ring.absorb(w, &bo_phone).unwrap();
    }

    let first = transmit(&[
        seal(&ana_phone, &ana_ring, doc, 1, b"hi Bo"),
        seal(&bo_phone, &bo_ring, doc, 1, b"hi Ana"),
    ]);

    // Ana links a laptop; it receives Ana's log and every key.
    let laptop = DeviceSecret::generate(&mut rng);
    let mut invite = PairingInvite::new(&mut rng, 10_000, 60_000).unwrap();
    let (mut join, request) =
        PairingJoin::start(&invite.code(), &laptop, "laptop", "linux", 10_500, 60_000).unwrap();
    let request = match transmit(&[Frame::PairRequest(request)]).remove(0) {
        Frame::PairRequest(r) => r,
        other => panic!("{other:?}"),
    };
    let response = invite
        .handle_request(
            &request,
            11_000,
            &ana_phone,
            &mut ana_log,
            &ana_ring,
            &mut rng,
        )
        .unwrap();
    let response = match transmit(&[Frame::PairResponse(response)]).remove(0) {
        Frame::PairResponse(r) => r,
        other => panic!("{other:?}"),
    };
    let joined = join.handle_response(&response, 11_500, &laptop).unwrap();
    assert_eq!(joined.log.account(), ana_log.account());

    // Membership as the data model would decide it: current devices of member accounts.
    let members = |logs: &[&DeviceLog]| {
        let devices: Vec<DeviceId> = logs
            .iter()
            .flat_map(|l| l.current_devices().map(|r| r.info.keys.device))
            .collect();
        move |d: &DeviceId, _: &DocId, _: KeyEpoch| devices.contains(d)
    };

    // The laptop reads the whole history.
    for frame in &first {
        let opened = envelope(frame)
            .open(&doc, &joined.keyring, members(&[&joined.log, &bo_log]))
            .unwrap();
        assert!(opened.plaintext.starts_with(b"hi "));
    }

    // Ana removes Bo: a new epoch for Ana's two devices only.
    let (e1, wrapped) = ana_ring
        .rotate(doc, &[ana_phone.public(), laptop.public()], &mut rng)
        .unwrap();
    assert_eq!(e1, KeyEpoch(e0.0 + 1));
    let mut laptop_ring = joined.keyring;
    for w in wrapped.iter().filter(|w| w.recipient == laptop.device_id()) {
        laptop_ring.absorb(w, &laptop).unwrap();
    }
    let later = transmit(&[seal(&ana_phone, &ana_ring, doc, 2, b"Bo is gone")]);
    let env = envelope(&later[0]);

    assert_eq!(
        env.open(&doc, &laptop_ring, members(&[&ana_log]))
            .unwrap()
            .plaintext,
        b"Bo is gone"
    );
    assert_eq!(
        env.open(&doc, &bo_ring, members(&[&ana_log, &bo_log]))
            .unwrap_err(),
        EnvelopeError::MissingKey { doc, epoch: e1 }
    );
    // Bo's own writes at the new epoch are not accepted by Ana's devices.
    let bo_late = seal(&bo_phone, &bo_ring, doc, 2, b"still here?");
    assert!(matches!(
        envelope(&bo_late).open(&doc, &laptop_ring, members(&[&ana_log])),
        Err(EnvelopeError::NotAuthorised { .. })
    ));
}
