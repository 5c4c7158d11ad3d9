//! The samod side of the live-sync latency benchmark: samod (the Rust automerge-repo) under the
//! same workload as ours, so the two can be compared in one run on one machine.
//!
//! Everything runs in one process on a multi-threaded Tokio runtime created for the run: a sync
//! server and devices A and B dialing it over loopback TCP (see `samod_net.rs`), and one document
//! shared by both, laid out like our segment documents.
//!
//! A creates the document with `history` messages (one change each, as if sent one by one), the
//! server receives it, then B finds it and syncs it completely before anything is measured. A's
//! application thread then commits one message per change on an absolute schedule (message `i`
//! at `start + i / rate`, so a late send does not lower the offered rate), stamping each with its
//! commit time on a clock shared by the whole process. B listens to its document's change events
//! and, on each, reads the keys after the last one it has seen; a message's latency runs from its
//! commit on A to the moment B's document holds it.

use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use automerge::{Automerge, ROOT, ReadDoc};
use futures::{FutureExt, StreamExt};

use crate::samod_net::{SyncServer, body, connect_device, message_key, put_message, step};

/// How long B may take to receive every message after the last one is sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Device prefixes (the second half of a message key).
const DEVICE_A: u64 = 0xa1a1_a1a1_a1a1_a1a1;
const DEVICE_B: u64 = 0xb0b0_b0b0_b0b0_b0b0;
/// Wall-clock milliseconds at which the history starts (the HLC's physical part); live messages
/// continue from where the history ends.
const HISTORY_START_MS: u64 = 1_700_000_000_000;

/// The workload of one run.
#[derive(Clone, Copy, Debug)]
pub struct LiveConfig {
    /// Messages per second A commits while measuring.
    pub rate_per_s: u32,
    /// Messages A commits while measuring.
    pub messages: u32,
    /// Messages already in the document, synced to both devices, before measuring.
    pub history: u32,
    /// Length of each message body in bytes.
    pub body_bytes: usize,
}

/// What B saw of one run.
///
/// The percentiles and the maximum are over every message sent: a message B never received counts
/// as the time from its commit to the end of the drain window, a lower bound, so a run that falls
/// behind cannot look fast by losing its slowest messages. `received < sent` flags such a run.
#[derive(Clone, Copy, Debug)]
pub struct LiveResult {
    /// Messages A committed.
    pub sent: u32,
    /// Messages B held within the drain timeout after the last send.
    pub received: u32,
    /// Median latency, commit on A to visible on B, in microseconds.
    pub p50_us: u64,
    /// 99th-percentile latency in microseconds.
    pub p99_us: u64,
    /// Largest latency in microseconds.
    pub max_us: u64,
    /// Seconds from the first scheduled send to the last message B received (or to the end of the
    /// drain window if some never arrived).
    pub elapsed_s: f64,
}

impl LiveResult {
    /// Summarises per-message latencies (`None`: never received) into a result.
    ///
    /// `lower_bounds[i]` stands in for message `i`'s latency when it was not received.
    pub fn from_latencies(
        latencies: &[Option<u64>],
        lower_bounds: &[u64],
        elapsed: Duration,
    ) -> LiveResult {
        let mut all: Vec<u64> = latencies
            .iter()
            .zip(lower_bounds)
            .map(|(l, bound)| l.unwrap_or(*bound))
            .collect();
        all.sort_unstable();
        LiveResult {
            sent: u32::try_from(latencies.len()).unwrap_or(u32::MAX),
            received: u32::try_from(latencies.iter().filter(|l| l.is_some()).count())
                .unwrap_or(u32::MAX),
            p50_us: percentile(&all, 50),
            p99_us: percentile(&all, 99),
            max_us: all.last().copied().unwrap_or(0),
            elapsed_s: elapsed.as_secs_f64(),
        }
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Runs the workload on samod and reports what B saw.
///
/// # Panics
///
/// If the runtime cannot be built, a socket cannot be bound, or setup does not finish within
/// ten minutes.
pub fn run_samod_live(cfg: &LiveConfig) -> LiveResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(*cfg));
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// A's document before measuring: `history` messages from both devices, one change each.
fn history_doc(cfg: &LiveConfig) -> (Automerge, u64) {
    let mut doc = Automerge::new();
    let mut hlc = HISTORY_START_MS << 16;
    for i in 0..i64::from(cfg.history) {
        hlc += 1 << 16;
        let (device, author) = if i % 2 == 0 {
            (DEVICE_A, [0xa1; 32])
        } else {
            (DEVICE_B, [0xb0; 32])
        };
        put_message(
            &mut doc,
            &message_key(hlc, device),
            i,
            author,
            &body(i.unsigned_abs(), cfg.body_bytes),
            0,
        )
        .expect("history message");
    }
    (doc, hlc)
}

/// What B's listener has seen so far.
struct Seen {
    /// Latency of message `i` in microseconds, once B holds it.
    latencies: Vec<Option<u64>>,
    received: usize,
    /// When B last found a new message.
    last: Option<Instant>,
}

async fn run(cfg: LiveConfig) -> LiveResult {
    let n = cfg.messages as usize;
    let epoch = Instant::now();

    // The sync server: a repo accepting every connection made to a loopback socket.
    let server = SyncServer::start().await;
    let addr = server.addr;

    // Device A creates the document with its history and hands it to the server.
    let a = connect_device(addr).await;
    let (doc, last_history_hlc) = history_doc(&cfg);
    let doc_a = step("create", a.repo.create(doc)).await.expect("created");
    step(
        "server receives the document",
        doc_a.they_have_our_changes(a.connection),
    )
    .await;

    // Device B fetches it through the server and syncs it completely.
    let b = connect_device(addr).await;
    let doc_b = step("find", b.repo.find(doc_a.document_id().clone()))
        .await
        .expect("repo running")
        .expect("document found");
    let heads_a = doc_a.with_document(|doc| doc.get_heads());
    step("B holds the history", async {
        while doc_b.with_document(|doc| doc.get_heads()) != heads_a {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    step(
        "server acknowledges B",
        doc_b.they_have_our_changes(b.connection),
    )
    .await;
    // Let any trailing sync rounds and storage writes finish before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // B's listener: on each change event, read the keys after the last one seen.
    let seen = Arc::new(Mutex::new(Seen {
        latencies: vec![None; n],
        received: 0,
        last: None,
    }));
    let mut changes = doc_b.changes();
    let listener_task = {
        let seen = Arc::clone(&seen);
        let doc_b = doc_b.clone();
        let mut after = message_key(last_history_hlc, DEVICE_B);
        tokio::spawn(async move {
            while changes.next().await.is_some() {
                // Events that queued up while the previous scan ran are covered by this one.
                while let Some(Some(_)) = changes.next().now_or_never() {}
                let done = doc_b.with_document(|doc| {
                    // The document cannot change while we hold it: everything found is there now.
                    let now = Instant::now();
                    let mut seen = seen.lock().expect("seen");
                    let range = (Bound::Excluded(after.clone()), Bound::Unbounded);
                    for item in doc.map_range(ROOT, range) {
                        after = item.key.to_string();
                        let msg = item.id();
                        let field = |name: &str| {
                            doc.get(&msg, name)
                                .ok()
                                .flatten()
                                .and_then(|(v, _)| v.as_i64())
                        };
                        let (Some(id), Some(ts)) = (field("id"), field("ts")) else {
                            continue;
                        };
                        let sent_at = epoch + Duration::from_micros(ts.unsigned_abs());
                        let latency = now.saturating_duration_since(sent_at).as_micros();
                        if let Some(slot) = usize::try_from(id).ok().and_then(|i| {
                            i.checked_sub(cfg.history as usize)
                                .and_then(|i| seen.latencies.get_mut(i))
                        }) && slot.is_none()
                        {
                            *slot = Some(u64::try_from(latency).unwrap_or(u64::MAX));
                            seen.received += 1;
                            seen.last = Some(now);
                        }
                    }
                    seen.received == n
                });
                if done {
                    break;
                }
            }
        })
    };

    // A's application thread: one message per change, on an absolute schedule.
    let start = Instant::now() + Duration::from_millis(20);
    let period = Duration::from_secs(1).as_secs_f64() / f64::from(cfg.rate_per_s.max(1));
    let sender = {
        let doc_a = doc_a.clone();
        let history = u64::from(cfg.history);
        let body_bytes = cfg.body_bytes;
        thread::spawn(move || {
            let mut hlc = last_history_hlc;
            let mut commit_times = Vec::with_capacity(n);
            let mut worst_lag = Duration::ZERO;
            for i in 0..n {
                let due = start + Duration::from_secs_f64(period * i as f64);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                worst_lag = worst_lag.max(Instant::now().saturating_duration_since(due));
                let seq = history + i as u64;
                let text = body(seq, body_bytes);
                let committed = doc_a.with_document(|doc| {
                    let now = Instant::now();
                    let ms = HISTORY_START_MS + (now - epoch).as_millis() as u64;
                    hlc = (hlc + 1).max(ms << 16);
                    let ts = i64::try_from((now - epoch).as_micros()).unwrap_or(i64::MAX);
                    put_message(
                        doc,
                        &message_key(hlc, DEVICE_A),
                        seq as i64,
                        [0xa1; 32],
                        &text,
                        ts,
                    )
                    .expect("live message");
                    now
                });
                commit_times.push(committed);
            }
            (commit_times, worst_lag)
        })
    };
    let (commit_times, worst_lag) = tokio::task::spawn_blocking(move || sender.join())
        .await
        .expect("sender joined")
        .expect("sender thread");
    if worst_lag > Duration::from_millis(10) {
        eprintln!(
            "samod live: A's sends ran up to {:.1} ms behind schedule",
            worst_lag.as_secs_f64() * 1e3
        );
    }

    // Wait for B to hold every message, or for the drain window to close.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut listener_task = listener_task;
    let drained = tokio::time::timeout_at(deadline.into(), &mut listener_task)
        .await
        .is_ok();
    listener_task.abort();

    let lower_bounds: Vec<u64> = commit_times
        .iter()
        .map(|t| u64::try_from(deadline.saturating_duration_since(*t).as_micros()).unwrap_or(0))
        .collect();
    let result = {
        let seen = seen.lock().expect("seen");
        let end = if drained {
            seen.last.unwrap_or(start)
        } else {
            deadline
        };
        LiveResult::from_latencies(
            &seen.latencies,
            &lower_bounds,
            end.saturating_duration_since(start),
        )
    };

    let stop = futures::future::join(a.repo.stop(), b.repo.stop());
    let _ = tokio::time::timeout(Duration::from_secs(5), stop).await;
    server.stop().await;
    result
}
