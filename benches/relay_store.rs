//! Relay store benchmark: durable envelope appends per second, through the group-commit writer
//! and, for context, through `RelayStore::append_batch` directly.
//!
//! `cargo bench --bench relay_store` runs the full measurement (several runs each, medians
//! printed); `cargo bench --bench relay_store -- --test` runs a tiny smoke version.
//!
//! Every run starts from an empty store in a fresh temporary directory. Envelopes (300 bytes of
//! pseudo-random data, ids the blake3 hash of the bytes) are built before the clock starts.

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::crypto::envelope::EnvelopeId;
use roamsync::ids::{AccountId, DeviceId, DocId};
use roamsync::relay::store::{
    AppendOutcome, Durability, NewEnvelope, RelayStore, RelayStoreOptions,
};
use roamsync::relay::writer::RelayWriter;

const ENVELOPE_BYTES: usize = 300;
const BATCH: usize = 1_000;
const DOCS: u64 = 100;
const DEVICES: u64 = 64;
const ACCOUNTS: u64 = 16;

struct Scale {
    batches: usize,
    batch: usize,
    runs: usize,
}

const FULL: Scale = Scale {
    batches: 50,
    batch: BATCH,
    runs: 7,
};

const SMOKE: Scale = Scale {
    batches: 3,
    batch: 10,
    runs: 1,
};

fn id32(tag: u8, n: u64) -> [u8; 32] {
    *blake3::hash(&[&[tag][..], &n.to_le_bytes()].concat()).as_bytes()
}

fn doc(n: u64) -> DocId {
    DocId::from_bytes(id32(1, n))
}

/// `count` envelopes starting at `start`: spread over the documents, each device writing its
/// own increasing change numbers.
fn envelopes(start: u64, count: usize) -> Vec<NewEnvelope> {
    let mut state = start.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (start..start + count as u64)
        .map(|n| {
            let mut bytes = vec![0u8; ENVELOPE_BYTES];
            for chunk in bytes.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            let device = n % DEVICES;
            NewEnvelope {
                doc: doc(n % DOCS),
                id: EnvelopeId(*blake3::hash(&bytes).as_bytes()),
                author: DeviceId::from_bytes(id32(2, device)),
                account: AccountId::from_bytes(id32(3, device % ACCOUNTS)),
                first_seq: n,
                last_seq: n,
                bytes,
            }
        })
        .collect()
}

fn open(dir: &Path, durability: Durability) -> RelayStore {
    let mut store = RelayStore::open(dir, RelayStoreOptions { durability }).unwrap();
    for d in 0..DOCS {
        store.create_doc(&doc(d), &doc(1_000_000)).unwrap();
    }
    store
}

struct Run {
    per_s: f64,
    /// Mean envelopes per commit.
    batch_size: f64,
    /// Median time of one commit (direct runs only).
    commit: Option<Duration>,
}

fn direct(scale: &Scale, durability: Durability) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), durability);
    let batches: Vec<_> = (0..scale.batches)
        .map(|b| envelopes((b * scale.batch) as u64, scale.batch))
        .collect();
    let mut commits = Vec::with_capacity(batches.len());
    let start = Instant::now();
    for batch in &batches {
        let t = Instant::now();
        let outcomes = store.append_batch(batch).unwrap();
        commits.push(t.elapsed());
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, AppendOutcome::Stored { .. }))
        );
    }
    let elapsed = start.elapsed();
    commits.sort();
    Run {
        per_s: (scale.batches * scale.batch) as f64 / elapsed.as_secs_f64(),
        batch_size: scale.batch as f64,
        commit: Some(commits[commits.len() / 2]),
    }
}

/// `clients` tasks, each queueing windows of `scale.batch` envelopes and waiting for each
/// window's outcomes before queueing the next, like connections pushing their outboxes.
fn through_writer(scale: &Scale, clients: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Durability::Full);
    let (writer, thread) = RelayWriter::spawn(store).unwrap();
    let windows_per_client = scale.batches.div_ceil(clients);
    let work: Vec<Vec<Vec<NewEnvelope>>> = (0..clients)
        .map(|c| {
            (0..windows_per_client)
                .map(|w| {
                    let start = ((c * windows_per_client + w) * scale.batch) as u64;
                    envelopes(start, scale.batch)
                })
                .collect()
        })
        .collect();
    let total = clients * windows_per_client * scale.batch;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let start = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = work
            .into_iter()
            .map(|windows| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    for window in windows {
                        let mut pending = Vec::with_capacity(window.len());
                        for envelope in window {
                            pending.push(writer.submit(envelope).await.unwrap());
                        }
                        for p in pending {
                            let outcome = p.outcome().await.unwrap();
                            assert!(matches!(outcome, AppendOutcome::Stored { .. }));
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = start.elapsed();
    let stats = writer.stats();
    runtime.block_on(writer.shutdown()).unwrap();
    thread.join().unwrap();
    Run {
        per_s: total as f64 / elapsed.as_secs_f64(),
        batch_size: stats.envelopes as f64 / stats.batches as f64,
        commit: None,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn report(name: &str, runs: Vec<Run>) {
    let rates: Vec<f64> = runs.iter().map(|r| r.per_s).collect();
    let (min, max) = (
        rates.iter().copied().fold(f64::INFINITY, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
    );
    let batch = median(runs.iter().map(|r| r.batch_size).collect());
    let commit = runs
        .iter()
        .filter_map(|r| r.commit)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect::<Vec<_>>();
    let commit = if commit.is_empty() {
        String::from("-")
    } else {
        format!("{:.2} ms", median(commit))
    };
    println!(
        "{name:<36} {:>9.0} envelopes/s (min {min:.0}, max {max:.0}; {} runs)  mean commit size {batch:.0}  median commit {commit}",
        median(rates),
        runs.len(),
    );
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let scale = if smoke { &SMOKE } else { &FULL };
    println!(
        "relay store: {} runs of {} x {} envelopes of {ENVELOPE_BYTES} B, {DOCS} documents, {DEVICES} devices",
        scale.runs, scale.batches, scale.batch
    );
    let runs = |f: &dyn Fn() -> Run| (0..scale.runs).map(|_| f()).collect::<Vec<_>>();
    let n = scale.batch;
    report(
        &format!("writer, 1 client x {n} window, FULL"),
        runs(&|| through_writer(scale, 1)),
    );
    report(
        &format!("writer, 4 clients x {n} window, FULL"),
        runs(&|| through_writer(scale, 4)),
    );
    report(
        &format!("append_batch({n}), FULL"),
        runs(&|| direct(scale, Durability::Full)),
    );
    report(
        &format!("append_batch({n}), NORMAL"),
        runs(&|| direct(scale, Durability::Normal)),
    );
}
