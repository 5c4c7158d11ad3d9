use super::*;
use crate::crypto::keys::Keyring;
use crate::crypto::rng::SeedRng;
use proptest::prelude::*;

const DOC: DocId = DocId::from_bytes([5; 32]);

fn device(seed: u8) -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
}

fn header(author: &DeviceSecret, epoch: u32) -> EnvelopeHeader {
    EnvelopeHeader {
        kind: EnvelopeKind::Changes,
        doc: DOC,
        epoch: KeyEpoch(epoch),
        author: author.device_id(),
        first_seq: 4,
        last_seq: 9,
    }
}

fn ring_with(epoch: u32, key: [u8; 32]) -> Keyring {
    let mut ring = Keyring::default();
    ring.insert(DOC, KeyEpoch(epoch), DocKey::from_bytes(key))
        .unwrap();
    ring
}

fn anyone(_: &DeviceId, _: &DocId, _: KeyEpoch) -> bool {
    true
}

fn sealed(author: &DeviceSecret, plaintext: &[u8]) -> SealedEnvelope {
    SealedEnvelope::seal(
        author,
        &DocKey::from_bytes([1; 32]),
        header(author, 0),
        plaintext,
    )
    .unwrap()
}

#[test]
fn seal_open_round_trip_and_determinism() {
    let a = device(1);
    let env = sealed(&a, b"hello");
    let bytes = env.encode();
    assert_eq!(bytes.len(), OVERHEAD_BYTES + 5 + TAG_LEN);
    let opened = open(&bytes, &DOC, &ring_with(0, [1; 32]), anyone).unwrap();
    assert_eq!(opened.plaintext, b"hello");
    assert_eq!(opened.header, header(&a, 0));
    assert_eq!(opened.id, EnvelopeId(*blake3::hash(&bytes).as_bytes()));
    // Same input, same envelope; different plaintext, different nonce.
    assert_eq!(sealed(&a, b"hello"), env);
    assert_ne!(sealed(&a, b"hellp").nonce, env.nonce);
    // The plaintext does not appear in the bytes.
    assert!(!bytes.windows(5).any(|w| w == b"hello"));
}

#[test]
fn flipping_any_byte_is_rejected() {
    let a = device(1);
    let bytes = sealed(&a, b"some changes").encode();
    let ring = ring_with(0, [1; 32]);
    for i in 0..bytes.len() {
        for flip in [0x01, 0x80] {
            let mut m = bytes.clone();
            m[i] ^= flip;
            assert!(
                open(&m, &DOC, &ring, anyone).is_err(),
                "byte {i} flip {flip:#x}"
            );
        }
    }
}

#[test]
fn replay_into_another_doc_is_rejected() {
    let a = device(1);
    let bytes = sealed(&a, b"x").encode();
    let other = DocId::from_bytes([6; 32]);
    let mut ring = ring_with(0, [1; 32]);
    ring.insert(other, KeyEpoch(0), DocKey::from_bytes([1; 32]))
        .unwrap();
    assert_eq!(
        open(&bytes, &other, &ring, anyone).unwrap_err(),
        EnvelopeError::WrongDoc {
            expected: other,
            found: DOC
        }
    );
    // Rewriting the header's document id breaks the signature.
    let mut m = bytes.clone();
    m[2..34].copy_from_slice(other.as_bytes());
    assert!(matches!(
        open(&m, &other, &ring, anyone),
        Err(EnvelopeError::BadSignature(_))
    ));
}

#[test]
fn open_checks_in_order() {
    let (a, b) = (device(1), device(2));
    let env = sealed(&a, b"x");
    let ring = ring_with(0, [1; 32]);

    let mut forged = env.clone();
    forged.header.author = b.device_id();
    assert!(matches!(
        forged.open(&DOC, &ring, anyone),
        Err(EnvelopeError::BadSignature(
            IdentityError::BadSignature { .. }
        ))
    ));

    // A relay, without keys, makes the same author checks.
    assert!(matches!(
        forged.verify_author(anyone),
        Err(EnvelopeError::BadSignature(_))
    ));
    assert_eq!(env.verify_author(anyone), Ok(()));

    let only_b = |d: &DeviceId, _: &DocId, _: KeyEpoch| *d == b.device_id();
    assert!(matches!(
        env.verify_author(only_b),
        Err(EnvelopeError::NotAuthorised { .. })
    ));
    assert_eq!(
        env.open(&DOC, &ring, only_b).unwrap_err(),
        EnvelopeError::NotAuthorised {
            author: a.device_id(),
            doc: DOC,
            epoch: KeyEpoch(0)
        }
    );

    assert_eq!(
        env.open(&DOC, &ring_with(1, [1; 32]), anyone).unwrap_err(),
        EnvelopeError::MissingKey {
            doc: DOC,
            epoch: KeyEpoch(0)
        }
    );

    // An authorised author that seals under a key other than the one members hold.
    assert_eq!(
        env.open(&DOC, &ring_with(0, [2; 32]), anyone).unwrap_err(),
        EnvelopeError::KeyCommitmentMismatch {
            doc: DOC,
            epoch: KeyEpoch(0)
        }
    );

    // A valid commitment and signature over a corrupted ciphertext.
    let mut bad = env.clone();
    bad.ciphertext[0] ^= 1;
    bad.signature = a.sign(SIGNATURE_DOMAIN, &bad.signed_part());
    assert_eq!(
        bad.open(&DOC, &ring, anyone).unwrap_err(),
        EnvelopeError::DecryptFailed {
            doc: DOC,
            epoch: KeyEpoch(0)
        }
    );
}

#[test]
fn key_commitment_binds_one_key() {
    let a = device(1);
    let h = header(&a, 0).encode();
    assert_ne!(
        commitment(&DocKey::from_bytes([1; 32]), &h),
        commitment(&DocKey::from_bytes([2; 32]), &h)
    );
}

#[test]
fn seal_errors() {
    let (a, b) = (device(1), device(2));
    let key = DocKey::from_bytes([1; 32]);
    assert_eq!(
        SealedEnvelope::seal(&a, &key, header(&b, 0), b"x").unwrap_err(),
        EnvelopeError::AuthorMismatch {
            header: b.device_id(),
            signer: a.device_id()
        }
    );
    let mut h = header(&a, 0);
    h.first_seq = 10;
    h.last_seq = 9;
    assert_eq!(
        SealedEnvelope::seal(&a, &key, h, b"x").unwrap_err(),
        EnvelopeError::BadSeqRange { first: 10, last: 9 }
    );
    let big = vec![0u8; MAX_PLAINTEXT_BYTES + 1];
    assert_eq!(
        SealedEnvelope::seal(&a, &key, header(&a, 0), &big).unwrap_err(),
        EnvelopeError::PlaintextTooLarge {
            len: MAX_PLAINTEXT_BYTES + 1,
            max: MAX_PLAINTEXT_BYTES
        }
    );
}

#[test]
fn largest_plaintext_seals_and_opens() {
    let a = device(1);
    let big = vec![7u8; MAX_PLAINTEXT_BYTES];
    let key = DocKey::from_bytes([1; 32]);
    let bytes = SealedEnvelope::seal(&a, &key, header(&a, 0), &big)
        .unwrap()
        .encode();
    assert_eq!(bytes.len(), MAX_ENVELOPE_BYTES);
    assert_eq!(
        open(&bytes, &DOC, &ring_with(0, [1; 32]), anyone)
            .unwrap()
            .plaintext,
        big
    );
}

#[test]
fn largest_envelope_fits_the_limit() {
    let a = device(1);
    let mut env = sealed(&a, b"");
    env.ciphertext = vec![0; MAX_PLAINTEXT_BYTES + TAG_LEN];
    let mut bytes = env.encode();
    assert_eq!(bytes.len(), MAX_ENVELOPE_BYTES);
    assert_eq!(SealedEnvelope::decode(&bytes), Ok(env));
    bytes.push(0);
    assert_eq!(
        SealedEnvelope::decode(&bytes).unwrap_err(),
        EnvelopeError::TooLarge {
            len: MAX_ENVELOPE_BYTES + 1,
            max: MAX_ENVELOPE_BYTES
        }
    );
}

#[test]
fn decode_errors() {
    let a = device(1);
    let bytes = sealed(&a, b"x").encode();
    assert_eq!(
        SealedEnvelope::decode(&vec![0; MAX_ENVELOPE_BYTES + 1]).unwrap_err(),
        EnvelopeError::TooLarge {
            len: MAX_ENVELOPE_BYTES + 1,
            max: MAX_ENVELOPE_BYTES
        }
    );
    let mut m = bytes.clone();
    m[0] = 2;
    assert_eq!(
        SealedEnvelope::decode(&m).unwrap_err(),
        EnvelopeError::UnsupportedVersion { version: 2 }
    );
    let mut m = bytes.clone();
    m[1] = 9;
    assert_eq!(
        SealedEnvelope::decode(&m).unwrap_err(),
        EnvelopeError::UnknownKind { kind: 9 }
    );
    let mut m = bytes.clone();
    m[70..78].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        SealedEnvelope::decode(&m).unwrap_err(),
        EnvelopeError::BadSeqRange {
            first: u64::MAX,
            last: 9
        }
    );
    assert!(matches!(
        SealedEnvelope::decode(&bytes[..100]).unwrap_err(),
        EnvelopeError::Codec(CodecError::Truncated { .. })
    ));
    let mut short = Writer::default();
    header(&a, 0).encode_into(&mut short);
    short
        .put(&[0; COMMITMENT_LEN + NONCE_LEN])
        .bytes_u32(&[0; 3])
        .put(&[0; 64]);
    assert_eq!(
        SealedEnvelope::decode(short.as_slice()).unwrap_err(),
        EnvelopeError::CiphertextTooShort { len: 3 }
    );
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        SealedEnvelope::decode(&long).unwrap_err(),
        EnvelopeError::Codec(CodecError::TrailingBytes { extra: 1 })
    );
}

#[test]
fn removed_member_cannot_open_a_later_epoch() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let (a, b) = (device(1), device(2));
    let mut ring_a = Keyring::default();
    let (e0, w0) = ring_a
        .rotate(DOC, &[a.public(), b.public()], &mut rng)
        .unwrap();
    let mut ring_b = Keyring::default();
    for w in w0.iter().filter(|w| w.recipient == b.device_id()) {
        ring_b.absorb(w, &b).unwrap();
    }
    let (e1, _) = ring_a.rotate(DOC, &[a.public()], &mut rng).unwrap();
    let mut h = header(&a, e0.0);
    let old = SealedEnvelope::seal(&a, ring_a.key(&DOC, e0).unwrap(), h, b"old").unwrap();
    h.epoch = e1;
    let new = SealedEnvelope::seal(&a, ring_a.key(&DOC, e1).unwrap(), h, b"new").unwrap();
    assert_eq!(old.open(&DOC, &ring_b, anyone).unwrap().plaintext, b"old");
    assert_eq!(
        new.open(&DOC, &ring_b, anyone).unwrap_err(),
        EnvelopeError::MissingKey {
            doc: DOC,
            epoch: e1
        }
    );
    // Even a guessed or old key fails the commitment check rather than decrypting garbage.
    let mut stale = Keyring::default();
    stale
        .insert(DOC, e1, ring_b.key(&DOC, e0).unwrap().clone())
        .unwrap();
    assert_eq!(
        new.open(&DOC, &stale, anyone).unwrap_err(),
        EnvelopeError::KeyCommitmentMismatch {
            doc: DOC,
            epoch: e1
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn codec_round_trip(
        plaintext in proptest::collection::vec(any::<u8>(), 0..512),
        first in 0u64..1000, extra in 0u64..1000, snapshot: bool, epoch: u32,
    ) {
        let a = device(1);
        let h = EnvelopeHeader {
            kind: if snapshot { EnvelopeKind::Snapshot } else { EnvelopeKind::Changes },
            doc: DOC,
            epoch: KeyEpoch(epoch),
            author: a.device_id(),
            first_seq: first,
            last_seq: first + extra,
        };
        let env = SealedEnvelope::seal(&a, &DocKey::from_bytes([1; 32]), h, &plaintext).unwrap();
        let bytes = env.encode();
        // The claimed ciphertext length is the real one.
        let off = HEADER_LEN + COMMITMENT_LEN + NONCE_LEN;
        let claimed = u32::from_be_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]);
        prop_assert_eq!(claimed as usize, plaintext.len() + TAG_LEN);
        prop_assert_eq!(bytes.len(), OVERHEAD_BYTES + plaintext.len() + TAG_LEN);
        prop_assert_eq!(SealedEnvelope::decode(&bytes), Ok(env));
        let opened = open(&bytes, &DOC, &ring_with(epoch, [1; 32]), anyone).unwrap();
        prop_assert_eq!(opened.plaintext, plaintext);
    }

    #[test]
    fn mutated_or_truncated_never_opens(idx: usize, flip in 1u8.., cut: usize) {
        let a = device(1);
        let bytes = sealed(&a, b"batch of changes").encode();
        let ring = ring_with(0, [1; 32]);
        let mut m = bytes.clone();
        let i = idx % m.len();
        m[i] ^= flip;
        prop_assert!(open(&m, &DOC, &ring, anyone).is_err());
        prop_assert!(open(&bytes[..cut % bytes.len()], &DOC, &ring, anyone).is_err());
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = open(&data, &DOC, &ring_with(0, [1; 32]), anyone);
    }
}
