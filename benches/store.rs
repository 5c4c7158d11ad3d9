//! Device-store benchmarks: durable send, cold open + conversation list, cold open + newest page.
//!
//! `cargo bench --bench store` runs them at the sizes of the issue (200 conversations × 1,000
//! messages); `ROAMSYNC_BENCH_SMALL=1` shrinks the fixture for a quick run, and
//! `cargo bench --bench store -- --test` runs each once (CI's smoke run, small fixture).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use roamsync::ids::{AccountId, ConversationId, DeviceId};
use roamsync::model::{Draft, ModelConfig, Replica};
use roamsync::store::{Durability, StorageKey, StoreConfig, StoredReplica};

const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);
const PHONE: DeviceId = DeviceId::from_bytes([1; 32]);
const KEY: [u8; 32] = [7; 32];

fn small() -> bool {
    std::env::var_os("ROAMSYNC_BENCH_SMALL").is_some() || std::env::args().any(|a| a == "--test")
}

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        durability,
        ..StoreConfig::default()
    }
}

fn open(path: &Path) -> StoredReplica {
    StoredReplica::open(
        path,
        &StorageKey::from_bytes(KEY),
        ALICE,
        PHONE,
        config(Durability::Full),
    )
    .unwrap()
}

/// A store of `conversations` × `messages`, each conversation with a few messages from another
/// account so that unread counts are not all zero. Built in memory, then adopted by the store.
fn fixture(dir: &Path, conversations: u64, messages: u64) -> Vec<ConversationId> {
    let bob = AccountId::from_bytes([0xb0; 32]);
    let mut mem = Replica::new(ALICE, PHONE, ModelConfig::default()).unwrap();
    let mut bob_phone =
        Replica::new(bob, DeviceId::from_bytes([2; 32]), ModelConfig::default()).unwrap();
    let mut ids = Vec::new();
    let mut now = 1_700_000_000_000u64;
    for c in 0..conversations {
        now += 1;
        let chat = mem
            .create_conversation(now, &format!("conversation {c}"), &[bob])
            .unwrap();
        for i in 0..messages.saturating_sub(3) {
            now += 1;
            mem.send(
                now,
                &chat,
                &Draft::text(format!(
                    "message {i} of conversation {c}, a typical short line"
                )),
            )
            .unwrap();
        }
        // Three messages from Bob: unread on this device.
        let docs = mem.docs();
        let batches = docs
            .iter()
            .filter(|a| a.conversation() == Some(chat))
            .filter_map(|a| mem.changes_since(a, &bob_phone.version_vector(a)))
            .collect();
        bob_phone.apply(now, batches);
        for i in 0..3 {
            now += 1;
            bob_phone
                .send(now, &chat, &Draft::text(format!("reply {i}")))
                .unwrap();
        }
        let back = bob_phone
            .docs()
            .iter()
            .filter(|a| a.conversation() == Some(chat))
            .filter_map(|a| bob_phone.changes_since(a, &mem.version_vector(a)))
            .collect();
        mem.apply(now, back);
        ids.push(chat);
    }
    drop(
        StoredReplica::adopt(
            &dir.join("device.db"),
            &StorageKey::from_bytes(KEY),
            mem,
            config(Durability::Full),
        )
        .unwrap(),
    );
    ids
}

fn durable_send(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/durable_send");
    for (name, durability) in [
        ("fsync_every_commit", Durability::Full),
        ("fsync_at_checkpoint", Durability::Normal),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.db");
        let mut r = StoredReplica::open(
            &path,
            &StorageKey::from_bytes(KEY),
            ALICE,
            PHONE,
            config(durability),
        )
        .unwrap();
        let chat = r.create_conversation(1, "bench", &[]).unwrap();
        for i in 0..1_000 {
            r.send(2 + i, &chat, &Draft::text("warm-up history"))
                .unwrap();
        }
        let mut now = 10_000;
        group.bench_function(name, |b| {
            b.iter(|| {
                now += 1;
                black_box(
                    r.send(
                        now,
                        &chat,
                        &Draft::text("hello, a typical short chat message"),
                    )
                    .unwrap(),
                )
            })
        });
    }
    group.finish();
}

fn cold_open(c: &mut Criterion) {
    let (conversations, messages) = if small() { (20, 100) } else { (200, 1_000) };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let chats = fixture(dir.path(), conversations, messages);
    eprintln!(
        "fixture: {conversations} conversations × {messages} messages built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let path = dir.path().join("device.db");
    let mut group = c.benchmark_group(format!("store/{conversations}x{messages}"));
    group.sample_size(20);
    group.bench_function("open_and_list_conversations", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let r = open(&path);
                let list = r.conversation_list().unwrap();
                total += t.elapsed();
                assert_eq!(list.len(), chats.len());
                assert!(
                    list.iter()
                        .all(|s| s.unread == 3 && s.last_message.is_some())
                );
            }
            total
        })
    });
    let newest = chats[chats.len() / 2];
    group.bench_function("open_and_read_newest_page_of_50", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut r = open(&path);
                let page = r.history(&newest, None, 50).unwrap();
                total += t.elapsed();
                assert_eq!(page.messages.len(), 50.min(messages as usize));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, durable_send, cold_open);
criterion_main!(benches);
