//! The change-batch codec: every decode error, and properties over generated batches.

use automerge::{ActorId, Automerge, transaction::Transactable};
use proptest::prelude::*;
use proptest::sample::Index;

use crate::ids::{AccountId, ConversationId, DocAddr};
use crate::model::batch::{BATCH_VERSION, BatchError, ChangeBatch};
use crate::model::doc::actor_of;
use crate::model::limits::{MAX_BATCH_BYTES, MAX_BATCH_CHANGES, MAX_BODY_BYTES};

use super::device;

/// A document of `device` with one change per value.
fn changes(actor: ActorId, values: &[String]) -> Vec<automerge::Change> {
    let mut doc = Automerge::new().with_actor(actor);
    for (i, v) in values.iter().enumerate() {
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, format!("k{}", i % 3), v.as_str())
            .unwrap();
        tx.commit();
    }
    doc.get_changes(&[])
}

fn sample() -> ChangeBatch {
    ChangeBatch {
        addr: DocAddr::Segment(ConversationId::from_bytes([3; 16]), 7),
        changes: changes(actor_of(&device(1)), &["a".into(), "b".into()]),
    }
}

fn hashes(b: &ChangeBatch) -> Vec<automerge::ChangeHash> {
    b.changes.iter().map(|c| c.hash()).collect()
}

#[test]
fn decode_errors() {
    let good = sample().encode();
    assert_eq!(
        ChangeBatch::decode(&[]).unwrap_err(),
        BatchError::Truncated { offset: 0, need: 1 }
    );
    assert!(matches!(
        ChangeBatch::decode(&good[..good.len() - 1]),
        Err(BatchError::Truncated { need: 1, .. })
    ));
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0]);
    assert_eq!(
        ChangeBatch::decode(&trailing).unwrap_err(),
        BatchError::TrailingBytes(2)
    );
    let mut version = good.clone();
    version[0] = BATCH_VERSION + 1;
    assert_eq!(
        ChangeBatch::decode(&version).unwrap_err(),
        BatchError::UnsupportedVersion(BATCH_VERSION + 1)
    );
    let mut kind = good.clone();
    kind[1] = 3;
    assert_eq!(
        ChangeBatch::decode(&kind).unwrap_err(),
        BatchError::UnknownDocKind(3)
    );
    // Header of a segment batch: version, kind, 16-byte conversation, u32 number, u32 count.
    let header = 2 + 16 + 4;
    let mut count = good[..header].to_vec();
    count.extend_from_slice(&(MAX_BATCH_CHANGES as u32 + 1).to_be_bytes());
    assert_eq!(
        ChangeBatch::decode(&count).unwrap_err(),
        BatchError::TooManyChanges {
            count: MAX_BATCH_CHANGES as u64 + 1,
            max: MAX_BATCH_CHANGES
        }
    );
    let mut claims = good[..header].to_vec();
    claims.extend_from_slice(&10u32.to_be_bytes());
    claims.extend_from_slice(&[0; 8]);
    assert!(matches!(
        ChangeBatch::decode(&claims),
        Err(BatchError::Truncated { .. })
    ));
    let mut garbage = good[..header].to_vec();
    garbage.extend_from_slice(&1u32.to_be_bytes());
    garbage.extend_from_slice(&5u32.to_be_bytes());
    garbage.extend_from_slice(b"hello");
    assert!(matches!(
        ChangeBatch::decode(&garbage),
        Err(BatchError::BadChange { index: 0, .. })
    ));
    // A change whose checksum does not match its content.
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    assert!(matches!(
        ChangeBatch::decode(&flipped),
        Err(BatchError::BadChange { index: 1, .. })
    ));
    let short_actor = ChangeBatch {
        addr: DocAddr::Account(AccountId::from_bytes([1; 32])),
        changes: changes(ActorId::from(&[9u8; 5][..]), &["x".into()]),
    };
    assert_eq!(
        ChangeBatch::decode(&short_actor.encode()).unwrap_err(),
        BatchError::BadActor { index: 0, len: 5 }
    );
    let huge = vec![0u8; MAX_BATCH_BYTES + 1];
    assert_eq!(
        ChangeBatch::decode(&huge).unwrap_err(),
        BatchError::TooLarge {
            len: MAX_BATCH_BYTES + 1,
            max: MAX_BATCH_BYTES
        }
    );
}

#[test]
fn split_keeps_every_batch_decodable() {
    // What a segment of a few hundred messages with the largest body lacks on a new device:
    // well under the default segment cap, and too large to decode as one batch.
    let big = changes(actor_of(&device(1)), &["x".repeat(MAX_BODY_BYTES)]).remove(0);
    let count = MAX_BATCH_BYTES / MAX_BODY_BYTES + 1;
    let addr = DocAddr::Segment(ConversationId::from_bytes([3; 16]), 0);
    let batch = ChangeBatch {
        addr,
        changes: vec![big; count],
    };
    assert!(matches!(
        ChangeBatch::decode(&batch.encode()),
        Err(BatchError::TooLarge { .. })
    ));
    let all = hashes(&batch);
    let parts = batch.split();
    assert_eq!(parts.len(), 2);
    let mut again = Vec::new();
    for part in &parts {
        let bytes = part.encode();
        assert!(bytes.len() <= MAX_BATCH_BYTES);
        let decoded = ChangeBatch::decode(&bytes).unwrap();
        assert_eq!(decoded.addr, addr);
        again.extend(hashes(&decoded));
    }
    assert_eq!(again, all, "every change once, in order");
}

#[test]
fn split_respects_the_change_count() {
    let small = changes(actor_of(&device(1)), &["x".into()]).remove(0);
    let batch = ChangeBatch {
        addr: DocAddr::Meta(ConversationId::from_bytes([4; 16])),
        changes: vec![small; MAX_BATCH_CHANGES + 1],
    };
    let parts = batch.split();
    let sizes: Vec<usize> = parts.iter().map(|p| p.changes.len()).collect();
    assert_eq!(sizes, vec![MAX_BATCH_CHANGES, 1]);
    assert!(parts.iter().all(|p| p.encoded_len() <= MAX_BATCH_BYTES));
    let empty = ChangeBatch {
        addr: DocAddr::Meta(ConversationId::from_bytes([4; 16])),
        changes: Vec::new(),
    };
    assert!(empty.split().is_empty());
}

fn addr_strategy() -> impl Strategy<Value = DocAddr> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|a| DocAddr::Account(AccountId::from_bytes(a))),
        any::<[u8; 16]>().prop_map(|c| DocAddr::Meta(ConversationId::from_bytes(c))),
        (any::<[u8; 16]>(), any::<u32>())
            .prop_map(|(c, n)| DocAddr::Segment(ConversationId::from_bytes(c), n)),
    ]
}

fn batch_strategy() -> impl Strategy<Value = ChangeBatch> {
    (
        addr_strategy(),
        1u8..=255,
        proptest::collection::vec(".{0,40}", 0..6),
    )
        .prop_map(|(addr, d, values)| ChangeBatch {
            addr,
            changes: changes(actor_of(&device(d)), &values),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(batch in batch_strategy()) {
        let bytes = batch.encode();
        prop_assert_eq!(bytes.len(), batch.encoded_len());
        let back = ChangeBatch::decode(&bytes).unwrap();
        prop_assert_eq!(back.addr, batch.addr);
        prop_assert_eq!(hashes(&back), hashes(&batch));
        prop_assert_eq!(back.encode(), bytes);
        // A batch within the limits splits into itself (or into nothing if it is empty).
        let parts = batch.clone().split();
        prop_assert_eq!(parts.len(), usize::from(!batch.changes.is_empty()));
        for part in parts {
            prop_assert_eq!(part.encode(), batch.encode());
        }
    }

    #[test]
    fn truncated_input_is_an_error(batch in batch_strategy(), cut in any::<Index>()) {
        let bytes = batch.encode();
        let cut = cut.index(bytes.len());
        prop_assert!(ChangeBatch::decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn mutated_input_never_panics(
        batch in batch_strategy(),
        flips in proptest::collection::vec((any::<Index>(), 1u8..=255), 1..8),
    ) {
        let mut bytes = batch.encode();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Ok(decoded) = ChangeBatch::decode(&bytes) {
            // Whatever decodes is a valid batch: it encodes back to the same bytes.
            prop_assert_eq!(decoded.encoded_len(), bytes.len());
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(decoded) = ChangeBatch::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }
}
