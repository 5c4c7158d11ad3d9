//! A replayed envelope (the same sealed bytes delivered again, by a relay or anyone) opens, since
//! it is authentic, but changes nothing: every change in it is recognised as already held.

use roamsync::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::keys::{DocKey, KeyEpoch, Keyring};
use roamsync::crypto::rng::SeedRng;
use roamsync::ids::{AccountId, DeviceId, DocAddr, DocId};
use roamsync::model::{ChangeBatch, Draft, ModelConfig, Replica, VersionVector};

#[test]
fn a_replayed_envelope_is_recognised_and_changes_nothing() {
    let author = DeviceSecret::generate(&mut SeedRng::from_seed([1; 32]));
    let alice = AccountId::from_bytes([1; 32]);
    let bob = AccountId::from_bytes([2; 32]);
    let mut sender = Replica::new(alice, author.device_id(), ModelConfig::default()).unwrap();
    let c = sender.create_conversation(1, "replay", &[bob]).unwrap();
    sender.send(2, &c, &Draft::text("once")).unwrap();
    let mut receiver =
        Replica::new(bob, DeviceId::from_bytes([2; 32]), ModelConfig::default()).unwrap();
    let meta = sender
        .changes_since(&DocAddr::Meta(c), &VersionVector::new())
        .unwrap();
    receiver.apply(3, vec![meta]);

    let seg = DocAddr::Segment(c, 0);
    let doc: DocId = seg.doc_id();
    let batch = sender.changes_since(&seg, &VersionVector::new()).unwrap();
    let header = EnvelopeHeader {
        kind: EnvelopeKind::Changes,
        doc,
        epoch: KeyEpoch(0),
        author: author.device_id(),
        first_seq: 1,
        last_seq: batch.changes.len() as u64,
    };
    let key = [7u8; 32];
    let wire = SealedEnvelope::seal(&author, &DocKey::from_bytes(key), header, &batch.encode())
        .unwrap()
        .encode();
    let mut ring = Keyring::default();
    ring.insert(doc, KeyEpoch(0), DocKey::from_bytes(key))
        .unwrap();
    let member = |d: &DeviceId, _: &DocId, _: KeyEpoch| *d == author.device_id();

    let mut deliver = |bytes: &[u8]| {
        let env = SealedEnvelope::decode(bytes).unwrap();
        let opened = env.open(&doc, &ring, member).unwrap();
        let batch = ChangeBatch::decode(&opened.plaintext).unwrap();
        receiver.apply(4, vec![batch])
    };
    let first = deliver(&wire);
    assert_eq!(first.new_messages.len(), 1);
    assert_eq!(first.docs[0].1.applied, 1);
    let replay = deliver(&wire);
    assert!(replay.new_messages.is_empty());
    assert_eq!(replay.docs[0].1.applied, 0);
    assert_eq!(replay.docs[0].1.duplicates, 1);
    assert_eq!(receiver.history(&c, None, 10).unwrap().messages.len(), 1);
}
