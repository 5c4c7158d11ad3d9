//! Sealing and opening envelopes of change batches (1 and 100 changes), beside the raw primitives
//! they are made of, measured in the same run. Prints the envelope overhead in bytes per change.
//!
//! `cargo bench --bench crypto`; `cargo bench --bench crypto -- --test` runs each once.

use std::hint::black_box;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey, Verifier};
use roamsync::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::keys::{DocKey, KeyEpoch, Keyring};
use roamsync::crypto::rng::SeedRng;
use roamsync::ids::{AccountId, DocAddr, DocId};
use roamsync::model::{Draft, ModelConfig, Replica, VersionVector};

/// An encoded change batch of `n` messages of a typical length, as a device would seal it.
fn batch(n: u64) -> Vec<u8> {
    let secret = DeviceSecret::generate(&mut SeedRng::from_seed([1; 32]));
    let account = AccountId::from_bytes([1; 32]);
    let mut r = Replica::new(account, secret.device_id(), ModelConfig::default()).unwrap();
    let c = r.create_conversation(1, "bench", &[]).unwrap();
    let seg = DocAddr::Segment(c, 0);
    for i in 0..n {
        r.send(
            2 + i,
            &c,
            &Draft::text(format!("message {i}: a typical short chat line")),
        )
        .unwrap();
    }
    r.changes_since(&seg, &VersionVector::new())
        .unwrap()
        .encode()
}

fn envelopes(c: &mut Criterion) {
    let author = DeviceSecret::generate(&mut SeedRng::from_seed([1; 32]));
    let doc = DocId::from_bytes([9; 32]);
    let key = DocKey::from_bytes([7; 32]);
    let mut ring = Keyring::default();
    ring.insert(doc, KeyEpoch(0), DocKey::from_bytes([7; 32]))
        .unwrap();
    let mut group = c.benchmark_group("crypto/envelope");
    for n in [1u64, 100] {
        let plaintext = batch(n);
        let header = EnvelopeHeader {
            kind: EnvelopeKind::Changes,
            doc,
            epoch: KeyEpoch(0),
            author: author.device_id(),
            first_seq: 1,
            last_seq: n,
        };
        let sealed = SealedEnvelope::seal(&author, &key, header, &plaintext).unwrap();
        let bytes = sealed.encode();
        eprintln!(
            "batch of {n}: plaintext {} B, envelope {} B, overhead {} B ({:.1} B per change)",
            plaintext.len(),
            bytes.len(),
            bytes.len() - plaintext.len(),
            (bytes.len() - plaintext.len()) as f64 / n as f64
        );
        group.bench_function(format!("seal/{n}"), |b| {
            b.iter(|| {
                black_box(
                    SealedEnvelope::seal(&author, &key, header, &plaintext)
                        .unwrap()
                        .encode(),
                )
            })
        });
        let me = author.device_id();
        group.bench_function(format!("open/{n}"), |b| {
            b.iter(|| {
                let env = SealedEnvelope::decode(&bytes).unwrap();
                black_box(
                    env.open(&doc, &ring, |d: &_, _: &DocId, _| *d == me)
                        .unwrap(),
                )
            })
        });
    }
    group.finish();
}

fn primitives(c: &mut Criterion) {
    let mut group = c.benchmark_group("crypto/primitive");
    let signing = SigningKey::from_bytes(&[5; 32]);
    let verifying = signing.verifying_key();
    let message = [0x42u8; 200];
    let signature = signing.sign(&message);
    group.bench_function("ed25519_sign_200B", |b| {
        b.iter(|| black_box(signing.sign(black_box(&message))))
    });
    group.bench_function("ed25519_verify_200B", |b| {
        b.iter(|| verifying.verify(black_box(&message), &signature).unwrap())
    });
    let cipher = XChaCha20Poly1305::new(&[3u8; 32].into());
    for len in [200usize, 20_000] {
        let data = vec![0x17u8; len];
        group.bench_function(format!("xchacha20poly1305_seal_{len}B"), |b| {
            b.iter(|| {
                let mut buf = data.clone();
                black_box(
                    cipher
                        .encrypt_inout_detached(
                            &[1u8; 24].into(),
                            b"aad",
                            buf.as_mut_slice().into(),
                        )
                        .unwrap(),
                );
                buf
            })
        });
        group.bench_function(format!("blake3_{len}B"), |b| {
            b.iter(|| black_box(blake3::hash(black_box(&data))))
        });
    }
    group.finish();
}

criterion_group!(benches, envelopes, primitives);
criterion_main!(benches);
