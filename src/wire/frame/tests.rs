use super::*;
use crate::crypto::device_log::DeviceLog;
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind};
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch, Keyring};
use crate::crypto::pairing::{PairingInvite, PairingJoin};
use crate::crypto::rng::SeedRng;
use crate::ids::DocId;
use proptest::prelude::*;

fn device() -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([1; 32]))
}

fn sample_frames() -> Vec<Frame> {
    static FRAMES: std::sync::OnceLock<Vec<Frame>> = std::sync::OnceLock::new();
    FRAMES.get_or_init(build_sample_frames).clone()
}

fn build_sample_frames() -> Vec<Frame> {
    let a = device();
    let header = EnvelopeHeader {
        kind: EnvelopeKind::Snapshot,
        doc: DocId::from_bytes([3; 32]),
        epoch: KeyEpoch(2),
        author: a.device_id(),
        first_seq: 1,
        last_seq: 1,
    };
    let env = SealedEnvelope::seal(&a, &DocKey::from_bytes([9; 32]), header, b"snap").unwrap();
    let mut log = DeviceLog::create(&a, "phone", "android").unwrap();
    let mut rng = SeedRng::from_seed([2; 32]);
    let joiner = DeviceSecret::generate(&mut rng);
    let mut invite = PairingInvite::new(&mut rng, 0, 1000).unwrap();
    let (_, request) = PairingJoin::start(&invite.code(), &joiner, "tab", "ios", 0, 1000).unwrap();
    let mut ring = Keyring::default();
    ring.rotate(DocId::from_bytes([4; 32]), &[a.public()], &mut rng)
        .unwrap();
    let response = invite
        .handle_request(&request, 1, &a, &mut log, &ring, &mut rng)
        .unwrap();
    vec![
        Frame::Envelope(env),
        Frame::DeviceLogEntry {
            account: log.account(),
            entry: log.entries()[0].clone(),
        },
        Frame::Error {
            code: ErrorCode::UNAUTHORISED,
            message: "not a member".into(),
        },
        Frame::PairRequest(request),
        Frame::PairResponse(response),
    ]
}

#[test]
fn frames_round_trip_and_stream() {
    let frames = sample_frames();
    let mut stream = Vec::new();
    for f in &frames {
        let bytes = f.encode();
        assert_eq!(decode_frame(&bytes), Ok(Some((f.clone(), bytes.len()))));
        stream.extend_from_slice(&bytes);
    }
    // Feed one byte at a time.
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b)).unwrap();
        while let Some(f) = dec.poll_frame().unwrap() {
            out.push(f);
        }
    }
    assert_eq!(out, frames);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn header_errors_are_reported_early() {
    assert_eq!(decode_frame(&[]), Ok(None));
    assert_eq!(decode_frame(&[FRAME_VERSION]), Ok(None));
    assert_eq!(decode_frame(&[FRAME_VERSION, 1, 0]), Ok(None));
    assert_eq!(
        decode_frame(&[2]),
        Err(WireError::UnsupportedVersion { version: 2 })
    );
    assert_eq!(
        decode_frame(&[FRAME_VERSION, 0x7f]),
        Err(WireError::UnknownType { frame_type: 0x7f })
    );
    assert_eq!(
        decode_frame(&[FRAME_VERSION, 3, 0xff, 0xff, 0xff, 0xff]),
        Err(WireError::FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX_ERROR_FRAME_PAYLOAD
        })
    );
    let env_too_big = (MAX_ENVELOPE_FRAME_PAYLOAD as u32 + 1).to_be_bytes();
    let mut h = vec![FRAME_VERSION, 1];
    h.extend_from_slice(&env_too_big);
    assert_eq!(
        decode_frame(&h),
        Err(WireError::FrameTooLarge {
            len: MAX_ENVELOPE_FRAME_PAYLOAD + 1,
            max: MAX_ENVELOPE_FRAME_PAYLOAD
        })
    );
}

#[test]
fn payload_errors() {
    // Error frame whose message length runs past the payload.
    let bytes = [FRAME_VERSION, 3, 0, 0, 0, 4, 0, 1, 0, 9];
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::Truncated { need: 9, have: 0 })
    );
    let bytes = [FRAME_VERSION, 3, 0, 0, 0, 6, 0, 1, 0, 2, 0xff, 0xfe];
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::Payload(CodecError::InvalidUtf8 {
            field: "message"
        }))
    );
    let bytes = [FRAME_VERSION, 3, 0, 0, 0, 5, 0, 1, 0, 0, 7];
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::Payload(CodecError::TrailingBytes { extra: 1 }))
    );
    let bytes = [FRAME_VERSION, 3, 0, 0, 0, 4, 0, 1, 0xff, 0xff];
    assert!(matches!(
        decode_frame(&bytes),
        Err(WireError::Payload(CodecError::TooLong { .. }))
    ));
    let bytes = [FRAME_VERSION, 1, 0, 0, 0, 1, 9];
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::Envelope(EnvelopeError::UnsupportedVersion {
            version: 9
        }))
    );
    let bytes = [FRAME_VERSION, 4, 0, 0, 0, 1, 9];
    assert!(matches!(
        decode_frame(&bytes),
        Err(WireError::Pairing(PairingError::Codec(
            CodecError::Truncated { .. }
        )))
    ));
    let bytes = [FRAME_VERSION, 5, 0, 0, 0, 1, 9];
    assert!(matches!(
        decode_frame(&bytes),
        Err(WireError::Pairing(PairingError::Codec(
            CodecError::Truncated { .. }
        )))
    ));
    let bytes = [FRAME_VERSION, 2, 0, 0, 0, 1, 9];
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::Truncated { need: 32, have: 1 })
    );
    let mut bytes = vec![FRAME_VERSION, 2, 0, 0, 0, 33];
    bytes.extend_from_slice(&[0; 32]);
    bytes.push(9);
    assert_eq!(
        decode_frame(&bytes),
        Err(WireError::DeviceLog(DeviceLogError::UnsupportedVersion {
            version: 9
        }))
    );
}

#[test]
fn long_error_messages_are_cut_at_a_char_boundary() {
    let message = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
    let bytes = Frame::Error {
        code: ErrorCode(999),
        message,
    }
    .encode();
    let Some((Frame::Error { code, message }, _)) = decode_frame(&bytes).unwrap() else {
        panic!("not an error frame");
    };
    assert_eq!(code, ErrorCode(999));
    assert_eq!(message.len(), MAX_ERROR_MESSAGE_BYTES);
    assert_eq!(format!("{:?}", ErrorCode(999)), "ErrorCode(999)");
    assert_eq!(format!("{:?}", ErrorCode::INTERNAL), "INTERNAL");
}

#[test]
fn many_small_frames_stream_in_linear_time() {
    let one = Frame::Error {
        code: ErrorCode::MALFORMED,
        message: String::new(),
    }
    .encode();
    let n = FrameDecoder::MAX_BUFFERED_BYTES / one.len();
    let mut dec = FrameDecoder::default();
    dec.push(&one.repeat(n)).unwrap();
    // A half frame stays buffered across compaction.
    let mut count = 0;
    while let Some(f) = dec.poll_frame().unwrap() {
        assert_eq!(f.frame_type(), FrameType::Error);
        count += 1;
        if count == n / 2 {
            dec.push(&one[..3]).unwrap();
        }
    }
    assert_eq!(count, n);
    assert_eq!(dec.buffered(), 3);
    dec.push(&one[3..]).unwrap();
    assert!(dec.poll_frame().unwrap().is_some());
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn decoder_buffer_is_bounded() {
    let mut dec = FrameDecoder::default();
    dec.push(&vec![0; FrameDecoder::MAX_BUFFERED_BYTES])
        .unwrap();
    assert_eq!(
        dec.push(&[0]),
        Err(WireError::BufferFull {
            len: FrameDecoder::MAX_BUFFERED_BYTES + 1,
            max: FrameDecoder::MAX_BUFFERED_BYTES
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn error_frames_round_trip(code: u16, message in "\\PC{0,64}") {
        let f = Frame::Error { code: ErrorCode(code), message };
        let bytes = f.encode();
        let claimed = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
        prop_assert_eq!(claimed, bytes.len() - FRAME_HEADER_LEN);
        prop_assert_eq!(decode_frame(&bytes), Ok(Some((f, bytes.len()))));
    }

    #[test]
    fn every_prefix_needs_more_bytes(which in 0usize..5, cut: usize) {
        let bytes = sample_frames()[which].encode();
        let cut = cut % bytes.len();
        prop_assert_eq!(decode_frame(&bytes[..cut]), Ok(None));
    }

    #[test]
    fn mutated_frames_never_panic(which in 0usize..5, idx: usize, flip in 1u8..) {
        let mut bytes = sample_frames()[which].encode();
        let i = idx % bytes.len();
        bytes[i] ^= flip;
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((_, consumed))) = decode_frame(&data) {
            prop_assert!(consumed <= data.len());
        }
    }
}
