//! Crash safety of the device store: a child process sends messages and applies remote batches
//! in a loop and is killed with SIGKILL at random moments; after every kill the store must hold
//! every operation the child reported as returned, nothing twice, pass SQLite's integrity check,
//! and load.
//!
//! The child is this same test binary, started with `ROAMSYNC_CRASH_CHILD=<dir>` and filtered to
//! the `crash_child` test. `CRASH_RUNS` sets the number of kills (default 25).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roamsync::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId};
use roamsync::model::hlc::Hlc;
use roamsync::model::{Cursor, Draft, ModelConfig, Replica};
use roamsync::store::{StorageKey, StoreConfig, StoredReplica};

const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);
const BOB: AccountId = AccountId::from_bytes([0xb0; 32]);
const PHONE: DeviceId = DeviceId::from_bytes([1; 32]);

fn config() -> StoreConfig {
    StoreConfig {
        model: ModelConfig {
            // Small segments so that roll-overs and compactions happen during the run.
            segment_cap: 32,
            ..ModelConfig::default()
        },
        ..StoreConfig::default()
    }
}

fn open(dir: &Path) -> StoredReplica {
    StoredReplica::open(
        &dir.join("device.db"),
        &StorageKey::from_bytes([5; 32]),
        ALICE,
        PHONE,
        config(),
    )
    .expect("store opens")
}

/// The child: sends and applies until killed, printing each id once its call returned.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("ROAMSYNC_CRASH_CHILD") else {
        return;
    };
    let run: u8 = std::env::var("ROAMSYNC_CRASH_RUN")
        .unwrap()
        .parse()
        .unwrap();
    let dir = Path::new(&dir);
    let mut r = open(dir);
    let chat = match r.conversation_list().unwrap().first() {
        Some(c) => c.id,
        None => r.create_conversation(1_000, "crash", &[BOB]).unwrap(),
    };
    // A fresh remote device per run: a restarted device with the same id would reuse sequence
    // numbers.
    let mut peer_id = [0xb0; 32];
    peer_id[0] = run;
    let mut peer = Replica::new(BOB, DeviceId::from_bytes(peer_id), config().model).unwrap();
    r.unread_count(&chat).unwrap(); // loads the conversation
    let meta = r
        .replica()
        .changes_since(
            &DocAddr::Meta(chat),
            &peer.version_vector(&DocAddr::Meta(chat)),
        )
        .unwrap();
    assert!(peer.apply(0, vec![meta]).rejected.is_empty());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut now = 1_000_000 * u64::from(run);
    for i in 0u64.. {
        now += 1;
        if i % 3 == 2 {
            let id = peer
                .send(now, &chat, &Draft::text(format!("peer {run} {i}")))
                .unwrap();
            let mut batches = Vec::new();
            for addr in peer.docs() {
                if matches!(addr, DocAddr::Account(_)) {
                    continue;
                }
                if let Some(b) = peer.changes_since(&addr, &r.replica().version_vector(&addr)) {
                    batches.push(b);
                }
            }
            let report = r.apply(now, batches).unwrap();
            assert!(report.rejected.is_empty(), "{:?}", report.rejected);
            writeln!(out, "ok {}", encode(&id)).unwrap();
        } else {
            let id = r
                .send(now, &chat, &Draft::text(format!("local {run} {i}")))
                .unwrap();
            writeln!(out, "ok {}", encode(&id)).unwrap();
        }
        out.flush().unwrap();
    }
}

fn encode(id: &MessageId) -> String {
    format!("{:016x}{}", id.hlc.as_u64(), id.device)
}

fn decode(s: &str) -> MessageId {
    MessageId {
        hlc: Hlc::from_u64(u64::from_str_radix(&s[..16], 16).unwrap()),
        device: DeviceId::parse_hex(&s[16..]).unwrap(),
    }
}

/// A small deterministic generator for kill delays.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn killed_at_random_moments_loses_nothing() {
    if std::env::var("ROAMSYNC_CRASH_CHILD").is_ok() {
        return;
    }
    let runs: u8 = std::env::var("CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut acknowledged: BTreeSet<MessageId> = BTreeSet::new();
    let mut chat: Option<ConversationId> = None;
    for run in 1..=runs {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("ROAMSYNC_CRASH_CHILD", dir.path())
            .env("ROAMSYNC_CRASH_RUN", run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the child to be ready, then let it work for a random time and kill it.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("child ready");
            if line.ends_with("ready") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5 + next(&mut rng) % 120));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        let mut this_run = 0;
        while let Ok(line) = rx.try_recv() {
            if let Some(id) = line.strip_prefix("ok ") {
                acknowledged.insert(decode(id));
                this_run += 1;
            }
        }

        // Reopen and check.
        let mut r = open(dir.path());
        r.store().integrity_check().unwrap();
        let c = *chat.get_or_insert_with(|| r.conversation_list().unwrap()[0].id);
        let mut seen: Vec<MessageId> = Vec::new();
        let mut before: Option<Cursor> = None;
        loop {
            let page = r.history(&c, before, 100).unwrap();
            seen.extend(page.messages.iter().map(|m| m.id));
            match page.next {
                Some(cursor) => before = Some(cursor),
                None => break,
            }
        }
        let unique: BTreeSet<MessageId> = seen.iter().copied().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "run {run}: a message is shown twice"
        );
        let lost: Vec<&MessageId> = acknowledged.difference(&unique).collect();
        assert!(
            lost.is_empty(),
            "run {run}: {} acknowledged messages lost: {lost:?}",
            lost.len()
        );
        eprintln!(
            "run {run}: {this_run} acknowledged this run, {} stored",
            unique.len()
        );
    }
    assert!(
        acknowledged.len() > usize::from(runs),
        "the children did work before being killed"
    );
}
