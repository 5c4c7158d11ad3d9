use super::*;
use proptest::prelude::*;

fn device(seed: u8) -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
}

const DOC: DocId = DocId::from_bytes([5; 32]);

#[test]
fn wrap_unwrap_round_trip() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let a = device(1);
    let key = DocKey::generate(&mut rng);
    let w = WrappedKey::wrap(&key, DOC, KeyEpoch(3), &a.public(), &mut rng).unwrap();
    assert_eq!(w.unwrap_with(&a).unwrap(), key);
    assert_eq!(format!("{key:?}"), "DocKey(<redacted>)");
}

#[test]
fn wrong_device_cannot_unwrap() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let (a, b) = (device(1), device(2));
    let key = DocKey::generate(&mut rng);
    let w = WrappedKey::wrap(&key, DOC, KeyEpoch(0), &a.public(), &mut rng).unwrap();
    assert_eq!(
        w.unwrap_with(&b).unwrap_err(),
        KeysError::WrongRecipient {
            recipient: a.device_id(),
            device: b.device_id()
        }
    );
    // Relabelling the recipient does not help: the AAD and the agreement key both differ.
    let mut relabelled = w.clone();
    relabelled.recipient = b.device_id();
    assert_eq!(
        relabelled.unwrap_with(&b).unwrap_err(),
        KeysError::UnwrapFailed {
            doc: DOC,
            epoch: KeyEpoch(0)
        }
    );
}

#[test]
fn wrapped_key_is_bound_to_doc_and_epoch() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let a = device(1);
    let key = DocKey::generate(&mut rng);
    let w = WrappedKey::wrap(&key, DOC, KeyEpoch(0), &a.public(), &mut rng).unwrap();
    let mut other_doc = w.clone();
    other_doc.doc = DocId::from_bytes([6; 32]);
    assert!(matches!(
        other_doc.unwrap_with(&a),
        Err(KeysError::UnwrapFailed { .. })
    ));
    let mut other_epoch = w;
    other_epoch.epoch = KeyEpoch(1);
    assert!(matches!(
        other_epoch.unwrap_with(&a),
        Err(KeysError::UnwrapFailed { .. })
    ));
}

#[test]
fn forged_or_degenerate_recipients_are_rejected() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let (a, b) = (device(1), device(2));
    let key = DocKey::generate(&mut rng);
    let mut forged = a.public();
    forged.agreement = b.agreement_public();
    assert!(matches!(
        WrappedKey::wrap(&key, DOC, KeyEpoch(0), &forged, &mut rng),
        Err(KeysError::Identity(_))
    ));
    // A device that signs a low-order agreement key gets no key wrapped to it.
    let zero = AgreementPublicKey::from_bytes([0; 32]);
    let weird = DevicePublic {
        device: a.device_id(),
        agreement: zero,
        binding: a.sign("roamsync 2026 agreement key binding", zero.as_bytes()),
    };
    assert_eq!(
        WrappedKey::wrap(&key, DOC, KeyEpoch(0), &weird, &mut rng).unwrap_err(),
        KeysError::DegenerateAgreementKey {
            device: a.device_id()
        }
    );
    // A wrapped key carrying a low-order ephemeral key is refused on unwrap.
    let mut w = WrappedKey::wrap(&key, DOC, KeyEpoch(0), &a.public(), &mut rng).unwrap();
    w.ephemeral = [0; 32];
    assert!(matches!(
        w.unwrap_with(&a),
        Err(KeysError::UnwrapFailed { .. })
    ));
}

#[test]
fn rotation_excludes_removed_devices() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let (a, b) = (device(1), device(2));
    let mut ring = Keyring::default();
    let (e0, w0) = ring
        .rotate(DOC, &[a.public(), b.public()], &mut rng)
        .unwrap();
    assert_eq!(e0, KeyEpoch(0));
    let (e1, w1) = ring.rotate(DOC, &[a.public()], &mut rng).unwrap();
    assert_eq!(e1, KeyEpoch(1));
    assert_eq!(w1.len(), 1);
    let mut bs = Keyring::default();
    for w in &w0 {
        if w.recipient == b.device_id() {
            bs.absorb(w, &b).unwrap();
        }
    }
    assert!(bs.key(&DOC, e0).is_some());
    assert!(matches!(
        bs.absorb(&w1[0], &b),
        Err(KeysError::WrongRecipient { .. })
    ));
    assert!(bs.key(&DOC, e1).is_none());
    assert_ne!(ring.key(&DOC, e0), ring.key(&DOC, e1));
    assert_eq!(ring.latest(&DOC).map(|(e, _)| e), Some(e1));
    let epochs = ring.epochs(&DOC);
    assert_eq!(
        epochs.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        vec![e0, e1]
    );
    assert_eq!(Some(&epochs[1].1), ring.key(&DOC, e1));
    assert!(ring.epochs(&DocId::from_bytes([9; 32])).is_empty());
    assert_eq!(
        ring.rotate(DOC, &[], &mut rng).unwrap_err(),
        KeysError::NoRecipients { doc: DOC }
    );
}

#[test]
fn export_gives_a_new_device_every_epoch() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let (a, n) = (device(1), device(3));
    let mut ring = Keyring::default();
    let other = DocId::from_bytes([9; 32]);
    for _ in 0..3 {
        ring.rotate(DOC, &[a.public()], &mut rng).unwrap();
    }
    ring.rotate(other, &[a.public()], &mut rng).unwrap();
    let exported = ring.export_to(&n.public(), &mut rng).unwrap();
    assert_eq!(exported.len(), 4);
    let mut ns = Keyring::default();
    for w in &exported {
        ns.absorb(w, &n).unwrap();
    }
    for e in 0..3 {
        assert_eq!(ns.key(&DOC, KeyEpoch(e)), ring.key(&DOC, KeyEpoch(e)));
    }
    assert_eq!(ns.docs().count(), 2);
    assert_eq!(ns.iter().count(), 4);
    assert!(ns.iter().all(|(d, e, k)| ring.key(d, e) == Some(k)));
}

#[test]
fn conflicting_keys_and_exhausted_epochs() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let mut ring = Keyring::default();
    ring.insert(DOC, KeyEpoch(0), DocKey::from_bytes([1; 32]))
        .unwrap();
    ring.insert(DOC, KeyEpoch(0), DocKey::from_bytes([1; 32]))
        .unwrap();
    assert_eq!(
        ring.insert(DOC, KeyEpoch(0), DocKey::from_bytes([2; 32])),
        Err(KeysError::ConflictingKey {
            doc: DOC,
            epoch: KeyEpoch(0)
        })
    );
    ring.insert(DOC, KeyEpoch(u32::MAX), DocKey::from_bytes([3; 32]))
        .unwrap();
    assert_eq!(
        ring.rotate(DOC, &[device(1).public()], &mut rng)
            .unwrap_err(),
        KeysError::EpochsExhausted { doc: DOC }
    );
    let shown = format!("{ring:?}");
    assert!(!shown.contains("0101"));
}

#[test]
fn decode_errors() {
    let mut rng = SeedRng::from_seed([0; 32]);
    let a = device(1);
    let w = WrappedKey::wrap(
        &DocKey::from_bytes([1; 32]),
        DOC,
        KeyEpoch(0),
        &a.public(),
        &mut rng,
    )
    .unwrap();
    let mut bytes = w.encode();
    bytes[0] = 2;
    assert_eq!(
        WrappedKey::decode(&bytes),
        Err(KeysError::UnsupportedVersion { version: 2 })
    );
    bytes[0] = WRAPPED_KEY_VERSION;
    bytes.push(0);
    assert_eq!(
        WrappedKey::decode(&bytes),
        Err(KeysError::Codec(CodecError::TrailingBytes { extra: 1 }))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn wrapped_key_codec(seed: [u8; 32], epoch: u32, idx: usize, flip in 1u8.., cut: usize) {
        let mut rng = SeedRng::from_seed(seed);
        let a = device(1);
        let key = DocKey::generate(&mut rng);
        let w = WrappedKey::wrap(&key, DOC, KeyEpoch(epoch), &a.public(), &mut rng).unwrap();
        let bytes = w.encode();
        prop_assert_eq!(bytes.len(), WrappedKey::ENCODED_LEN);
        prop_assert_eq!(WrappedKey::decode(&bytes), Ok(w.clone()));
        prop_assert!(WrappedKey::decode(&bytes[..cut % bytes.len()]).is_err());
        let mut m = bytes.clone();
        let i = idx % m.len();
        m[i] ^= flip;
        if let Ok(mutated) = WrappedKey::decode(&m) {
            // Any change makes unwrapping fail or yields no key at all.
            prop_assert!(mutated.unwrap_with(&a).is_err());
        }
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = WrappedKey::decode(&data);
    }
}
