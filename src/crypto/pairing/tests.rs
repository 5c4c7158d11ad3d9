use super::*;
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::keys::KeyEpoch;
use crate::ids::{DocAddr, DocId};
use proptest::prelude::*;

const T0: u64 = 1_000_000;
const TTL: u64 = 60_000;

struct World {
    rng: SeedRng,
    phone: DeviceSecret,
    laptop: DeviceSecret,
    log: DeviceLog,
    keyring: Keyring,
}

fn world() -> World {
    let mut rng = SeedRng::from_seed([42; 32]);
    let phone = DeviceSecret::generate(&mut rng);
    let laptop = DeviceSecret::generate(&mut rng);
    let log = DeviceLog::create(&phone, "phone", "android").unwrap();
    World {
        rng,
        phone,
        laptop,
        log,
        keyring: Keyring::default(),
    }
}

fn pair(w: &mut World) -> (PairingInvite, PairingJoin, PairRequest) {
    let invite = PairingInvite::new(&mut w.rng, T0, TTL).unwrap();
    let (join, req) =
        PairingJoin::start(&invite.code(), &w.laptop, "laptop", "linux", T0, TTL).unwrap();
    (invite, join, req)
}

fn respond(w: &mut World, invite: &mut PairingInvite, req: &PairRequest) -> PairResponse {
    invite
        .handle_request(req, T0 + 1, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
        .unwrap()
}

#[test]
fn linked_device_can_open_every_epoch_of_its_account() {
    let mut w = world();
    let account_doc = DocAddr::Account(w.log.account()).doc_id();
    let chat = DocId::from_bytes([8; 32]);
    let me = [w.phone.public()];
    let mut sealed = Vec::new();
    for (doc, epochs) in [(account_doc, 1), (chat, 3)] {
        for _ in 0..epochs {
            let (epoch, _) = w.keyring.rotate(doc, &me, &mut w.rng).unwrap();
            let header = EnvelopeHeader {
                kind: EnvelopeKind::Changes,
                doc,
                epoch,
                author: w.phone.device_id(),
                first_seq: u64::from(epoch.0),
                last_seq: u64::from(epoch.0),
            };
            let key = w.keyring.key(&doc, epoch).unwrap();
            sealed.push(SealedEnvelope::seal(&w.phone, key, header, b"history").unwrap());
        }
    }
    let (mut invite, mut join, req) = pair(&mut w);
    let resp = respond(&mut w, &mut invite, &req);
    let joined = join.handle_response(&resp, T0 + 2, &w.laptop).unwrap();
    assert_eq!(joined.log.account(), w.log.account());
    assert_eq!(joined.log.head(), w.log.head());
    assert!(joined.log.is_current(&w.laptop.device_id()));
    let log = &joined.log;
    let authorised = |d: &DeviceId, _: &DocId, _: KeyEpoch| log.is_current(d);
    for env in &sealed {
        let opened = env
            .open(&env.header.doc, &joined.keyring, authorised)
            .unwrap();
        assert_eq!(opened.plaintext, b"history");
    }
    assert_eq!(
        joined.keyring.key(&chat, KeyEpoch(2)),
        w.keyring.key(&chat, KeyEpoch(2))
    );
    // The state machines are single-use.
    assert_eq!(
        join.handle_response(&resp, T0 + 3, &w.laptop).unwrap_err(),
        PairingError::AlreadyUsed
    );
    assert_eq!(
        invite
            .handle_request(&req, T0 + 3, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::AlreadyUsed
    );
}

#[test]
fn wrong_code_fails_and_locks_the_invite() {
    let mut w = world();
    let mut invite = PairingInvite::new(&mut w.rng, T0, TTL).unwrap();
    let wrong = PairingSecret([0; PAIRING_SECRET_LEN]).to_code();
    let (_, bad) = PairingJoin::start(&wrong, &w.laptop, "l", "p", T0, TTL).unwrap();
    for _ in 0..MAX_PAIRING_ATTEMPTS {
        assert_eq!(
            invite
                .handle_request(&bad, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
                .unwrap_err(),
            PairingError::BadCode
        );
    }
    let (_, good) = PairingJoin::start(&invite.code(), &w.laptop, "l", "p", T0, TTL).unwrap();
    assert_eq!(
        invite
            .handle_request(&good, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::TooManyAttempts {
            attempts: MAX_PAIRING_ATTEMPTS
        }
    );
    assert_eq!(w.log.len(), 1, "nothing appended");
}

#[test]
fn tampered_requests_fail_the_mac() {
    let mut w = world();
    let (mut invite, _, mut req) = pair(&mut w);
    req.name = "mallory".into();
    assert_eq!(
        invite
            .handle_request(&req, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::BadCode
    );
}

#[test]
fn expired_codes_fail_on_both_sides() {
    let mut w = world();
    let (mut invite, mut join, req) = pair(&mut w);
    assert_eq!(invite.expires_at_ms(), T0 + TTL);
    assert_eq!(
        invite
            .handle_request(&req, T0 + TTL, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::Expired {
            now_ms: T0 + TTL,
            expires_at_ms: T0 + TTL
        }
    );
    let resp = respond(&mut w, &mut invite, &req);
    assert_eq!(
        join.handle_response(&resp, T0 + TTL + 5, &w.laptop)
            .unwrap_err(),
        PairingError::Expired {
            now_ms: T0 + TTL + 5,
            expires_at_ms: T0 + TTL
        }
    );
    assert_eq!(
        PairingInvite::new(&mut w.rng, T0, MAX_PAIRING_TTL_MS + 1).unwrap_err(),
        PairingError::TtlTooLong {
            ttl_ms: MAX_PAIRING_TTL_MS + 1,
            max_ms: MAX_PAIRING_TTL_MS
        }
    );
    assert!(matches!(
        PairingJoin::start(&invite.code(), &w.laptop, "l", "p", T0, u64::MAX),
        Err(PairingError::TtlTooLong { .. })
    ));
}

#[test]
fn forged_or_altered_responses_are_rejected() {
    let mut w = world();
    let (mut invite, mut join, req) = pair(&mut w);
    let resp = respond(&mut w, &mut invite, &req);
    let mut altered = resp.clone();
    altered.log.truncate(1);
    assert_eq!(
        join.handle_response(&altered, T0 + 2, &w.laptop)
            .unwrap_err(),
        PairingError::BadCode
    );
    // A response that carries a valid MAC but a log without the joiner.
    let mut no_join = resp.clone();
    no_join.log.truncate(1);
    no_join.mac = response_mac(&join.secret.mac_key(), &join.request_body, &no_join.body());
    assert_eq!(
        join.handle_response(&no_join, T0 + 2, &w.laptop)
            .unwrap_err(),
        PairingError::NotAdded {
            device: w.laptop.device_id()
        }
    );
    let mut stranger = resp.clone();
    stranger.inviter = DeviceId::from_bytes([3; 32]);
    stranger.mac = response_mac(&join.secret.mac_key(), &join.request_body, &stranger.body());
    assert_eq!(
        join.handle_response(&stranger, T0 + 2, &w.laptop)
            .unwrap_err(),
        PairingError::InviterNotCurrent {
            device: DeviceId::from_bytes([3; 32])
        }
    );
    let mut empty = resp.clone();
    empty.log.clear();
    empty.mac = response_mac(&join.secret.mac_key(), &join.request_body, &empty.body());
    assert_eq!(
        join.handle_response(&empty, T0 + 2, &w.laptop).unwrap_err(),
        PairingError::DeviceLog(DeviceLogError::Empty)
    );
    // Keys wrapped to someone else.
    let mut other_keys = resp.clone();
    let doc = DocId::from_bytes([1; 32]);
    let mut ring = Keyring::default();
    let (_, wrapped) = ring.rotate(doc, &[w.phone.public()], &mut w.rng).unwrap();
    other_keys.keys = wrapped;
    other_keys.mac = response_mac(
        &join.secret.mac_key(),
        &join.request_body,
        &other_keys.body(),
    );
    assert!(matches!(
        join.handle_response(&other_keys, T0 + 2, &w.laptop)
            .unwrap_err(),
        PairingError::Keys(KeysError::WrongRecipient { .. })
    ));
    // The genuine response still works afterwards.
    assert!(join.handle_response(&resp, T0 + 2, &w.laptop).is_ok());
}

#[test]
fn inviter_must_be_current_and_joiner_valid() {
    let mut w = world();
    let third = DeviceSecret::generate(&mut w.rng);
    let add = w
        .log
        .add_device(&w.phone, third.public(), "t", "p")
        .unwrap();
    w.log.append(add).unwrap();
    let revoke = w.log.revoke_device(&third, w.phone.device_id()).unwrap();
    w.log.append(revoke).unwrap();
    let (mut invite, _, req) = pair(&mut w);
    assert_eq!(
        invite
            .handle_request(&req, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::InviterNotCurrent {
            device: w.phone.device_id()
        }
    );

    let mut w = world();
    let mut invite = PairingInvite::new(&mut w.rng, T0, TTL).unwrap();
    let mut keys = w.laptop.public();
    keys.agreement = w.phone.agreement_public();
    let mut req = PairRequest {
        device: keys,
        name: "l".into(),
        platform: "p".into(),
        mac: [0; MAC_LEN],
    };
    req.mac = invite.secret.mac_key().mac(REQUEST_LABEL, &[&req.body()]);
    assert!(matches!(
        invite
            .handle_request(&req, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::Identity(_)
    ));
    // A device already in the log cannot be added again.
    let mut req2 = PairRequest {
        device: w.phone.public(),
        name: "l".into(),
        platform: "p".into(),
        mac: [0; MAC_LEN],
    };
    req2.mac = invite.secret.mac_key().mac(REQUEST_LABEL, &[&req2.body()]);
    assert!(matches!(
        invite
            .handle_request(&req2, T0, &w.phone, &mut w.log, &w.keyring, &mut w.rng)
            .unwrap_err(),
        PairingError::DeviceLog(DeviceLogError::DeviceAlreadyKnown { .. })
    ));
}

#[test]
fn codes_parse_and_reject_garbage() {
    let s = PairingSecret::generate(&mut SeedRng::from_seed([1; 32]));
    let code = s.to_code();
    assert_eq!(code.len(), 32 + 7);
    assert_eq!(PairingSecret::parse_code(&code).unwrap(), s);
    let loose = code.to_uppercase().replace('-', " ");
    assert_eq!(PairingSecret::parse_code(&loose).unwrap(), s);
    assert_eq!(
        PairingSecret::parse_code("abc").unwrap_err(),
        PairingError::MalformedCode {
            digits: 3,
            expected: 32
        }
    );
    assert_eq!(
        PairingSecret::parse_code("zz").unwrap_err(),
        PairingError::MalformedCode {
            digits: 0,
            expected: 32
        }
    );
    assert_eq!(
        PairingSecret::parse_code(&"a".repeat(33)).unwrap_err(),
        PairingError::MalformedCode {
            digits: 33,
            expected: 32
        }
    );
    assert_eq!(format!("{s:?}"), "PairingSecret(<redacted>)");
    let mut rng = SeedRng::from_seed([1; 32]);
    let d = DeviceSecret::generate(&mut rng);
    assert!(matches!(
        PairingJoin::start(&code, &d, &"n".repeat(MAX_DEVICE_NAME_BYTES + 1), "p", 0, 1),
        Err(PairingError::DeviceLog(DeviceLogError::FieldTooLong { .. }))
    ));
}

#[test]
fn message_decode_errors() {
    assert!(matches!(
        PairRequest::decode(&vec![0; MAX_REQUEST_BYTES + 1]),
        Err(PairingError::TooLarge { .. })
    ));
    assert!(matches!(
        PairResponse::decode(&vec![0; MAX_RESPONSE_BYTES + 1]),
        Err(PairingError::TooLarge { .. })
    ));
    let mut w = Writer::default();
    w.put(&[0; 32]).u32(0).u32(u32::MAX);
    assert_eq!(
        PairResponse::decode(w.as_slice()).unwrap_err(),
        PairingError::TooManyKeys {
            len: u32::MAX as usize,
            max: MAX_PAIRING_KEYS
        }
    );
    let mut w = Writer::default();
    w.put(&[0; 32]).u32(u32::MAX);
    assert!(matches!(
        PairResponse::decode(w.as_slice()).unwrap_err(),
        PairingError::DeviceLog(DeviceLogError::TooManyEntries { .. })
    ));
    assert!(matches!(
        PairRequest::decode(&[0; 10]).unwrap_err(),
        PairingError::Codec(CodecError::Truncated { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn messages_round_trip_and_survive_mutation(idx: usize, flip in 1u8.., cut: usize) {
        let mut w = world();
        w.keyring.rotate(DocId::from_bytes([1; 32]), &[w.phone.public()], &mut w.rng).unwrap();
        let (mut invite, mut join, req) = pair(&mut w);
        let resp = respond(&mut w, &mut invite, &req);
        let req_bytes = req.encode();
        prop_assert_eq!(PairRequest::decode(&req_bytes), Ok(req.clone()));
        let resp_bytes = resp.encode();
        prop_assert_eq!(PairResponse::decode(&resp_bytes), Ok(resp.clone()));
        prop_assert!(PairRequest::decode(&req_bytes[..cut % req_bytes.len()]).is_err());
        prop_assert!(PairResponse::decode(&resp_bytes[..cut % resp_bytes.len()]).is_err());
        let mut m = resp_bytes.clone();
        let i = idx % m.len();
        m[i] ^= flip;
        if let Ok(mutated) = PairResponse::decode(&m) {
            prop_assert!(join.handle_response(&mutated, T0 + 2, &w.laptop).is_err());
        }
        prop_assert!(join.handle_response(&resp, T0 + 2, &w.laptop).is_ok());
    }

    #[test]
    fn codes_round_trip(bytes: [u8; PAIRING_SECRET_LEN], upper: bool) {
        let s = PairingSecret(bytes);
        let code = s.to_code();
        let typed = if upper { code.to_uppercase() } else { code.clone() };
        prop_assert_eq!(PairingSecret::parse_code(&typed), Ok(s));
    }

    #[test]
    fn arbitrary_codes_never_panic(code in "\\PC{0,48}") {
        let _ = PairingSecret::parse_code(&code);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = PairRequest::decode(&data);
        let _ = PairResponse::decode(&data);
    }
}
