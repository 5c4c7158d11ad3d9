use super::*;
use crate::crypto::rng::SeedRng;
use proptest::prelude::*;

fn device(seed: u8) -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
}

/// A log with devices 1 (genesis), 2 and 3.
fn three_device_log() -> (DeviceLog, [DeviceSecret; 3]) {
    let devs = [device(1), device(2), device(3)];
    let mut log = DeviceLog::create(&devs[0], "phone", "android").unwrap();
    let e = log
        .add_device(&devs[0], devs[1].public(), "laptop", "linux")
        .unwrap();
    log.append(e).unwrap();
    let e = log
        .add_device(&devs[1], devs[2].public(), "tablet", "ios")
        .unwrap();
    log.append(e).unwrap();
    (log, devs)
}

#[test]
fn whole_log_verifies_and_account_is_genesis_hash() {
    let (log, devs) = three_device_log();
    assert_eq!(
        log.account(),
        AccountId::from_bytes(*blake3::hash(&log.entries()[0].encode()).as_bytes())
    );
    let again = DeviceLog::verify(&log.account(), log.entries().to_vec()).unwrap();
    assert_eq!(again.head(), log.head());
    assert_eq!(again.current_devices().count(), 3);
    for d in &devs {
        assert!(again.is_current(&d.device_id()));
    }
    assert_eq!(again.len(), 3);
    assert!(!again.is_empty());
}

#[test]
fn log_for_another_account_is_rejected() {
    let (log, _) = three_device_log();
    let other = DeviceLog::create(&device(9), "x", "y").unwrap();
    assert_eq!(
        DeviceLog::verify(&other.account(), log.entries().to_vec()).unwrap_err(),
        DeviceLogError::WrongAccount {
            expected: other.account(),
            found: log.account()
        }
    );
    assert_eq!(
        DeviceLog::verify(&log.account(), vec![]).unwrap_err(),
        DeviceLogError::Empty
    );
}

#[test]
fn fork_is_detected() {
    let (mut log, devs) = three_device_log();
    let base = DeviceLog::verify(&log.account(), log.entries()[..2].to_vec()).unwrap();
    // Another entry built on the same predecessor as entry 2.
    let rival = base
        .add_device(&devs[0], device(4).public(), "other", "web")
        .unwrap();
    assert!(matches!(
        log.append(rival.clone()),
        Err(DeviceLogError::Fork { seq: 2, .. })
    ));
    // The same fork, presented as one list.
    let mut list = log.entries().to_vec();
    list.push(rival);
    assert!(matches!(
        DeviceLog::verify(&log.account(), list),
        Err(DeviceLogError::Fork { seq: 2, .. })
    ));
}

#[test]
fn duplicates_are_idempotent_but_not_in_a_list() {
    let (mut log, _) = three_device_log();
    let e = log.entries()[1].clone();
    assert_eq!(log.append(e.clone()), Ok(AppendOutcome::AlreadyPresent));
    let mut list = log.entries().to_vec();
    list.push(e);
    assert!(matches!(
        DeviceLog::verify(&log.account(), list),
        Err(DeviceLogError::BrokenChain { .. })
    ));
}

#[test]
fn revoked_device_cannot_sign_later_entries() {
    let (mut log, devs) = three_device_log();
    let revoke = log.revoke_device(&devs[0], devs[1].device_id()).unwrap();
    log.append(revoke).unwrap();
    assert!(!log.is_current(&devs[1].device_id()));
    assert_eq!(
        log.device(&devs[1].device_id()).unwrap().revoked_at,
        Some(3)
    );
    let late = log
        .add_device(&devs[1], device(5).public(), "evil", "x")
        .unwrap();
    assert_eq!(
        log.append(late).unwrap_err(),
        DeviceLogError::SignerRevoked {
            seq: 4,
            signer: devs[1].device_id(),
            revoked_at: 3
        }
    );
    // A revoked device cannot come back either.
    let back = log
        .add_device(&devs[0], devs[1].public(), "again", "x")
        .unwrap();
    assert_eq!(
        log.append(back).unwrap_err(),
        DeviceLogError::DeviceAlreadyKnown {
            device: devs[1].device_id()
        }
    );
    let twice = log.revoke_device(&devs[0], devs[1].device_id()).unwrap();
    assert_eq!(
        log.append(twice).unwrap_err(),
        DeviceLogError::NotCurrent {
            device: devs[1].device_id()
        }
    );
}

#[test]
fn unknown_signer_and_bad_signature_are_rejected() {
    let (mut log, devs) = three_device_log();
    let stranger = device(7);
    let e = log
        .add_device(&stranger, stranger.public(), "me", "x")
        .unwrap();
    assert_eq!(
        log.append(e).unwrap_err(),
        DeviceLogError::UnknownSigner {
            seq: 3,
            signer: stranger.device_id()
        }
    );
    let mut e = log
        .add_device(&devs[0], device(8).public(), "n", "p")
        .unwrap();
    e.signer = devs[1].device_id();
    assert!(matches!(
        log.append(e).unwrap_err(),
        DeviceLogError::Identity {
            seq: 3,
            source: IdentityError::BadSignature { .. }
        }
    ));
    // A device whose agreement key binding is forged.
    let mut keys = device(8).public();
    keys.agreement = devs[0].agreement_public();
    let e = log.add_device(&devs[0], keys, "n", "p").unwrap();
    assert!(matches!(
        log.append(e).unwrap_err(),
        DeviceLogError::Identity { seq: 3, .. }
    ));
}

#[test]
fn chain_errors() {
    let (mut log, devs) = three_device_log();
    let mut e = log
        .add_device(&devs[0], device(8).public(), "n", "p")
        .unwrap();
    e.seq = 5;
    assert_eq!(
        log.append(e).unwrap_err(),
        DeviceLogError::Gap { seq: 5, len: 3 }
    );
    let short = DeviceLog::verify(&log.account(), log.entries()[..1].to_vec()).unwrap();
    let stale = short
        .add_device(&devs[0], device(8).public(), "n", "p")
        .unwrap();
    let mut moved = stale.clone();
    moved.seq = 3;
    assert_eq!(
        log.append(moved).unwrap_err(),
        DeviceLogError::BrokenChain { seq: 3 }
    );
    // Position 1 taken, but claiming a different predecessor than entry 0.
    let mut odd = stale;
    odd.prev = EntryHash([1; 32]);
    assert_eq!(
        log.append(odd).unwrap_err(),
        DeviceLogError::BrokenChain { seq: 1 }
    );
}

#[test]
fn genesis_rules() {
    let a = device(1);
    let b = device(2);
    let mut g = DeviceLogEntry::genesis(&a, "a", "p").unwrap();
    g.seq = 1;
    assert_eq!(
        DeviceLog::from_genesis(g).unwrap_err(),
        DeviceLogError::MisplacedGenesis { seq: 1 }
    );
    let mut g = DeviceLogEntry::genesis(&a, "a", "p").unwrap();
    if let EntryAction::Genesis(info) = &mut g.action {
        info.keys = b.public();
    }
    assert_eq!(
        DeviceLog::from_genesis(g).unwrap_err(),
        DeviceLogError::GenesisNotSelfSigned {
            signer: a.device_id(),
            device: b.device_id()
        }
    );
    let log = DeviceLog::create(&a, "a", "p").unwrap();
    let mut g2 = DeviceLogEntry::genesis(&a, "a", "p").unwrap();
    g2.seq = 1;
    g2.prev = log.head();
    let mut log2 = log.clone();
    assert!(matches!(
        log2.append(g2),
        Err(DeviceLogError::Identity { .. }) | Err(DeviceLogError::MisplacedGenesis { seq: 1 })
    ));
}

#[test]
fn last_device_cannot_be_revoked() {
    let a = device(1);
    let mut log = DeviceLog::create(&a, "a", "p").unwrap();
    let e = log.revoke_device(&a, a.device_id()).unwrap();
    assert_eq!(
        log.append(e).unwrap_err(),
        DeviceLogError::LastDevice {
            device: a.device_id()
        }
    );
}

#[test]
fn field_limits() {
    let a = device(1);
    let long = "x".repeat(MAX_DEVICE_NAME_BYTES + 1);
    assert_eq!(
        DeviceLog::create(&a, &long, "p").unwrap_err(),
        DeviceLogError::FieldTooLong {
            field: "name",
            len: MAX_DEVICE_NAME_BYTES + 1,
            max: MAX_DEVICE_NAME_BYTES
        }
    );
    let too_many = vec![DeviceLogEntry::genesis(&a, "a", "p").unwrap(); MAX_LOG_ENTRIES + 1];
    assert!(matches!(
        DeviceLog::verify(&AccountId::from_bytes([0; 32]), too_many),
        Err(DeviceLogError::TooManyEntries { .. })
    ));
}

#[test]
fn decode_errors() {
    let (log, _) = three_device_log();
    let mut bytes = log.entries()[1].encode();
    bytes[0] = 9;
    assert_eq!(
        DeviceLogEntry::decode(&bytes).unwrap_err(),
        DeviceLogError::UnsupportedVersion { version: 9 }
    );
    bytes[0] = ENTRY_VERSION;
    bytes[1] = 7;
    assert_eq!(
        DeviceLogEntry::decode(&bytes).unwrap_err(),
        DeviceLogError::UnknownKind { kind: 7 }
    );
    assert!(matches!(
        DeviceLogEntry::decode(&vec![0; MAX_ENTRY_BYTES + 1]),
        Err(DeviceLogError::Codec(CodecError::TooLong { .. }))
    ));
    let mut w = Writer::default();
    w.u32(u32::MAX);
    assert!(matches!(
        DeviceLog::decode_entries(w.as_slice()),
        Err(DeviceLogError::TooManyEntries { .. })
    ));
    let mut extra = DeviceLog::encode_entries(log.entries());
    extra.push(0);
    assert_eq!(
        DeviceLog::decode_entries(&extra).unwrap_err(),
        DeviceLogError::Codec(CodecError::TrailingBytes { extra: 1 })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn entry_codec_round_trips(name in "\\PC{0,16}", platform in "[a-z]{0,32}", seed: u8) {
        let a = device(seed);
        let g = DeviceLogEntry::genesis(&a, &name, &platform).unwrap();
        let bytes = g.encode();
        prop_assert_eq!(DeviceLogEntry::decode(&bytes), Ok(g.clone()));
        let list = DeviceLog::encode_entries(std::slice::from_ref(&g));
        prop_assert_eq!(list.len(), 4 + 4 + bytes.len());
        prop_assert_eq!(DeviceLog::decode_entries(&list), Ok(vec![g]));
    }

    #[test]
    fn mutated_entries_never_panic_and_never_verify(idx: usize, flip in 1u8.., cut: usize) {
        static LOG: std::sync::OnceLock<DeviceLog> = std::sync::OnceLock::new();
        let log = LOG.get_or_init(|| three_device_log().0);
        let mut bytes = DeviceLog::encode_entries(log.entries());
        let i = idx % bytes.len();
        bytes[i] ^= flip;
        // A flipped byte anywhere must not yield the same verified log.
        if let Ok(entries) = DeviceLog::decode_entries(&bytes) {
            let verified = DeviceLog::verify(&log.account(), entries);
            prop_assert!(verified.is_err(), "flip at {} accepted", i);
        }
        let truncated = &bytes[..cut % bytes.len()];
        prop_assert!(DeviceLog::decode_entries(truncated).is_err());
    }

    #[test]
    fn random_histories_verify_and_forks_anywhere_are_caught(
        ops in proptest::collection::vec((any::<bool>(), any::<u8>(), any::<u8>()), 1..12),
        fork_at: usize,
    ) {
        let devs: Vec<DeviceSecret> = (1..=6).map(device).collect();
        let mut log = DeviceLog::create(&devs[0], "d0", "p").unwrap();
        for (add, signer, target) in ops {
            let current: Vec<usize> = (0..devs.len())
                .filter(|i| log.is_current(&devs[*i].device_id()))
                .collect();
            let signer = &devs[current[usize::from(signer) % current.len()]];
            let target = usize::from(target) % devs.len();
            let entry = if add {
                log.add_device(signer, devs[target].public(), "d", "p").unwrap()
            } else {
                log.revoke_device(signer, devs[target].device_id()).unwrap()
            };
            // Invalid operations (re-adding, revoking the last device) are refused and change
            // nothing; valid ones extend the log.
            let before = log.len();
            match log.append(entry) {
                Ok(AppendOutcome::Appended) => prop_assert_eq!(log.len(), before + 1),
                Ok(AppendOutcome::AlreadyPresent) => prop_assert!(false, "fresh entry seen before"),
                Err(_) => prop_assert_eq!(log.len(), before),
            }
            prop_assert!(log.current_devices().count() >= 1);
        }
        let again = DeviceLog::verify(&log.account(), log.entries().to_vec()).unwrap();
        prop_assert_eq!(again.head(), log.head());
        // A rival entry on top of any prefix is a fork of the full log.
        let k = fork_at % log.len();
        let prefix = DeviceLog::verify(&log.account(), log.entries()[..=k].to_vec()).unwrap();
        let signer = prefix
            .current_devices()
            .next()
            .map(|r| r.info.keys.device)
            .unwrap();
        let signer = devs.iter().find(|d| d.device_id() == signer).unwrap();
        let rival = prefix.add_device(signer, device(99).public(), "rival", "p").unwrap();
        let mut full = log.clone();
        if k + 1 < log.len() {
            let is_fork = matches!(full.append(rival), Err(DeviceLogError::Fork { .. }));
            prop_assert!(is_fork);
        } else {
            prop_assert_eq!(full.append(rival), Ok(AppendOutcome::Appended));
        }
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = DeviceLogEntry::decode(&data);
        let _ = DeviceLog::decode_entries(&data);
    }
}
