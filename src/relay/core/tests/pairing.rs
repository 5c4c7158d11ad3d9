//! Pairing rendezvous.

use super::*;
use crate::crypto::keys::Keyring;
use crate::crypto::pairing::{MAX_PAIRING_TTL_MS, PairingInvite, PairingJoin};

#[test]
fn pairing_forwards_request_and_answer() {
    let mut fx = Fx::new();
    let mut alice = Account::new(1);
    let bob = Account::new(2);
    let phone = fx.join(&alice, 0);
    let b = fx.join(&bob, 0);
    let mut rng = SeedRng::from_seed([5; 32]);
    let mut invite = PairingInvite::new(&mut rng, fx.now_ms, 60_000).unwrap();
    let rendezvous = invite.rendezvous();
    let out = fx.msg(phone, Message::PairOffer { req: 1, rendezvous });
    assert_eq!(messages_to(&out, phone), vec![Message::Done { req: 1 }]);
    // Bob cannot take over the rendezvous.
    let out = fx.msg(b, Message::PairOffer { req: 2, rendezvous });
    assert_eq!(error_to(&out, b).0, ErrorCode::REJECTED);
    // The new device, not yet in any log, joins.
    let laptop = device(2);
    let joiner = fx.connect(&laptop);
    let (mut join, request) = PairingJoin::start(
        &invite.code(),
        &laptop,
        "laptop",
        "linux",
        fx.now_ms,
        60_000,
    )
    .unwrap();
    let out = fx.msg(
        joiner,
        Message::PairJoin {
            req: 3,
            rendezvous,
            request: request.clone(),
        },
    );
    assert_eq!(messages_to(&out, joiner), vec![Message::Done { req: 3 }]);
    assert_eq!(
        messages_to(&out, phone),
        vec![Message::PairRequested {
            rendezvous,
            request: request.clone(),
        }]
    );
    // A second joiner is refused.
    let other = fx.connect(&device(3));
    let out = fx.msg(
        other,
        Message::PairJoin {
            req: 4,
            rendezvous,
            request: request.clone(),
        },
    );
    assert_eq!(error_to(&out, other).0, ErrorCode::REJECTED);
    // Only the inviter answers.
    let response = invite
        .handle_request(
            &request,
            fx.now_ms,
            &alice.devices[0],
            &mut alice.log,
            &Keyring::default(),
            &mut rng,
        )
        .unwrap();
    let out = fx.msg(
        b,
        Message::PairAnswer {
            req: 5,
            rendezvous,
            response: response.clone(),
        },
    );
    assert_eq!(error_to(&out, b).0, ErrorCode::UNAUTHORISED);
    let out = fx.msg(
        phone,
        Message::PairAnswer {
            req: 6,
            rendezvous,
            response: response.clone(),
        },
    );
    assert_eq!(messages_to(&out, phone), vec![Message::Done { req: 6 }]);
    let answered = messages_to(&out, joiner);
    assert_eq!(
        answered,
        vec![Message::PairAnswered {
            rendezvous,
            response: response.clone(),
        }]
    );
    let joined = join.handle_response(&response, fx.now_ms, &laptop).unwrap();
    // The rendezvous is over.
    let out = fx.msg(
        joiner,
        Message::PairJoin {
            req: 7,
            rendezvous,
            request,
        },
    );
    assert_eq!(error_to(&out, joiner).0, ErrorCode::REJECTED);
    // The joiner uploads the log it received and is authenticated.
    let out = fx.msg(
        joiner,
        Message::LogAppend {
            req: 8,
            account: alice.id(),
            first_seq: 0,
            entries: joined.log.entries().to_vec(),
        },
    );
    assert!(has_done(&out, joiner, 8));
    assert!(matches!(
        fx.hello(joiner, alice.id()),
        Message::HelloOk { .. }
    ));
    assert!(fx.core.connection(joiner).unwrap().authenticated);
}

#[test]
fn rendezvous_expire_and_end_with_the_inviter() {
    let mut fx = Fx::new();
    let alice = Account::new(1);
    let phone = fx.join(&alice, 0);
    let joiner = fx.connect(&device(2));
    let mut rng = SeedRng::from_seed([5; 32]);
    let invite = PairingInvite::new(&mut rng, fx.now_ms, 60_000).unwrap();
    let (_, request) = PairingJoin::start(
        &invite.code(),
        &device(2),
        "laptop",
        "linux",
        fx.now_ms,
        60_000,
    )
    .unwrap();
    let join = |fx: &mut Fx, rendezvous| {
        fx.msg(
            joiner,
            Message::PairJoin {
                req: 9,
                rendezvous,
                request: request.clone(),
            },
        )
    };
    fx.msg(
        phone,
        Message::PairOffer {
            req: 1,
            rendezvous: [1; 32],
        },
    );
    fx.now_ms += MAX_PAIRING_TTL_MS;
    let out = join(&mut fx, [1; 32]);
    assert_eq!(error_to(&out, joiner).0, ErrorCode::REJECTED);
    fx.msg(
        phone,
        Message::PairOffer {
            req: 2,
            rendezvous: [2; 32],
        },
    );
    fx.input(Input::Disconnected { conn: phone });
    let out = join(&mut fx, [2; 32]);
    assert_eq!(error_to(&out, joiner).0, ErrorCode::REJECTED);
    // At most a few offers per connection.
    let phone = fx.join(&alice, 0);
    for i in 0..crate::relay::limits::MAX_PAIRING_OFFERS_PER_CONN {
        let out = fx.msg(
            phone,
            Message::PairOffer {
                req: 3,
                rendezvous: [10 + i as u8; 32],
            },
        );
        assert!(has_done(&out, phone, 3));
    }
    let out = fx.msg(
        phone,
        Message::PairOffer {
            req: 4,
            rendezvous: [99; 32],
        },
    );
    assert_eq!(error_to(&out, phone).0, ErrorCode::RATE_LIMITED);
    // A joiner that leaves frees the rendezvous for another.
    let out = join(&mut fx, [10; 32]);
    assert!(has_done(&out, joiner, 9));
    fx.input(Input::Disconnected { conn: joiner });
    let again = fx.connect(&device(2));
    let out = fx.msg(
        again,
        Message::PairJoin {
            req: 5,
            rendezvous: [10; 32],
            request,
        },
    );
    assert!(has_done(&out, again, 5));
}
