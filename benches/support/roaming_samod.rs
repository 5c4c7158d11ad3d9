//! The samod side of the roaming benchmark: the same history in samod (the Rust automerge-repo),
//! one document per conversation, synced to a new, empty peer in a child process.
//!
//! The parent runs a sync server and peer A on loopback TCP (see `samod_net.rs`). A creates
//! `convs` documents of `msgs` messages each, one change per message (as if sent one by one),
//! with the same keys, fields and bodies as the roamsync run, and waits until the server has
//! every document. The child starts an empty in-memory repo, dials the server, asks for every
//! document at once, and reports when the first and the last are complete (every message
//! present), the bytes its socket read and wrote, and its memory. A document that does not
//! arrive complete within the timeout fails the run.

use std::time::{Duration, Instant};

use automerge::{Automerge, ROOT, ReadDoc};
use futures::StreamExt;
use samod::DocumentId;

use crate::body;
use crate::roaming_child::{self, Metrics, report, report_memory, run_child};
use crate::roaming_roamsync::Workload;
use crate::samod_net::{SyncServer, connect_device, message_key, put_message, step};

/// Child role: a new, empty samod peer syncing every document.
pub const NEW_PEER_ROLE: &str = "samod-new-peer";
/// Device prefix of the writer (the second half of a message key).
const DEVICE_A: u64 = 0xa1a1_a1a1_a1a1_a1a1;
/// Wall-clock milliseconds at which the history starts (the HLC's physical part).
const HISTORY_START_MS: u64 = 1_700_000_000_000;
/// Longest wait between two looks at a document that is not complete yet.
const POLL_TICK: Duration = Duration::from_millis(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Document `d`: `msgs` messages from A, one change each.
fn history_doc(d: usize, msgs: usize) -> Automerge {
    let mut doc = Automerge::new();
    let mut hlc = HISTORY_START_MS << 16;
    for i in 0..msgs {
        hlc += 1 << 16;
        put_message(
            &mut doc,
            &message_key(hlc, DEVICE_A),
            i as i64,
            [0xa1; 32],
            &body(d, i),
            0,
        )
        .expect("history message");
    }
    doc
}

/// Writes the history on peer A, then syncs it to a new peer in a child process, `repeat`
/// times against the same server. Returns what each child reported, plus `setup_s`.
pub fn run_new_peer(w: Workload, repeat: usize) -> Vec<Metrics> {
    let rt = runtime();
    let runs = rt.block_on(async move {
        let server = SyncServer::start().await;
        let a = connect_device(server.addr).await;
        let start = Instant::now();
        let mut handles = Vec::with_capacity(w.convs);
        for d in 0..w.convs {
            let doc = tokio::task::spawn_blocking(move || history_doc(d, w.msgs))
                .await
                .expect("history");
            handles.push(step("create", a.repo.create(doc)).await.expect("created"));
        }
        for h in &handles {
            step(
                "server receives the document",
                h.they_have_our_changes(a.connection),
            )
            .await;
        }
        let setup_s = start.elapsed().as_secs_f64();
        eprintln!(
            "samod: wrote {} documents of {} messages, server has them after {setup_s:.1} s",
            w.convs, w.msgs
        );
        let ids: Vec<String> = handles
            .iter()
            .map(|h| h.document_id().to_string())
            .collect();
        let mut runs = Vec::new();
        for run in 0..repeat {
            let env = vec![
                ("SAMOD_SERVER", server.addr.to_string()),
                ("SAMOD_DOCS", ids.join(",")),
                ("ROAMING_MSGS", w.msgs.to_string()),
                ("ROAMING_TIMEOUT_S", w.timeout.as_secs().to_string()),
            ];
            let mut m = tokio::task::spawn_blocking(move || run_child(NEW_PEER_ROLE, &env))
                .await
                .expect("the child's reader");
            m.0.insert("setup_s".into(), setup_s);
            eprintln!("samod new peer, run {}: {:?}", run + 1, m.0);
            runs.push(m);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), a.repo.stop()).await;
        server.stop().await;
        runs
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    runs
}

/// Checks a synced document: `msgs` messages whose ids are 0.. in key order and whose bodies
/// are the ones written.
fn verify(doc: &Automerge, d: usize, msgs: usize) {
    let mut n = 0;
    for (i, item) in doc.map_range(ROOT, ..).enumerate() {
        let msg = item.id();
        let id = doc
            .get(&msg, "id")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.as_i64());
        let text = doc
            .get(&msg, "body")
            .ok()
            .flatten()
            .and_then(|(v, _)| v.as_str().map(str::to_owned));
        assert_eq!(id, Some(i as i64), "document {d}: message {i}");
        assert_eq!(text, Some(body(d, i)), "document {d}: body of message {i}");
        n += 1;
    }
    assert_eq!(n, msgs, "document {d}: messages");
}

/// The child: an empty peer that syncs every document and times it.
pub fn child_new_peer() {
    let msgs: usize = roaming_child::env("ROAMING_MSGS")
        .parse()
        .expect("ROAMING_MSGS");
    let timeout = Duration::from_secs(
        roaming_child::env("ROAMING_TIMEOUT_S")
            .parse()
            .expect("ROAMING_TIMEOUT_S"),
    );
    let addr: std::net::SocketAddr = roaming_child::env("SAMOD_SERVER")
        .parse()
        .expect("SAMOD_SERVER");
    let ids: Vec<DocumentId> = roaming_child::env("SAMOD_DOCS")
        .split(',')
        .map(|s| s.parse().expect("a document id"))
        .collect();
    let rt = runtime();
    rt.block_on(async move {
        let start = Instant::now();
        let peer = connect_device(addr).await;
        report("connect_ms", start.elapsed().as_secs_f64() * 1e3);
        let complete = ids.iter().map(|id| {
            let repo = peer.repo.clone();
            let id = id.clone();
            async move {
                let h = repo
                    .find(id)
                    .await
                    .expect("repo running")
                    .expect("document found");
                let mut changes = h.changes();
                loop {
                    if h.with_document(|d| d.length(ROOT)) >= msgs {
                        return (Instant::now(), h);
                    }
                    let _ = tokio::time::timeout(POLL_TICK, changes.next()).await;
                }
            }
        });
        let done = tokio::time::timeout(timeout, futures::future::join_all(complete))
            .await
            .unwrap_or_else(|_| panic!("samod: not every document complete within {timeout:?}"));
        let ms = |t: Instant| t.saturating_duration_since(start).as_secs_f64() * 1e3;
        let first = done.iter().map(|(t, _)| *t).min().expect("a document");
        let last = done.iter().map(|(t, _)| *t).max().expect("a document");
        report("first_full_ms", ms(first));
        report("full_ms", ms(last));
        report("bytes_received", peer.traffic.received() as f64);
        report("bytes_sent", peer.traffic.sent() as f64);
        report_memory();
        for (d, (_, h)) in done.iter().enumerate() {
            h.with_document(|doc| verify(doc, d, msgs));
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), peer.repo.stop()).await;
    });
    rt.shutdown_timeout(Duration::from_secs(2));
}
