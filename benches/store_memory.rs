//! Peak memory while paging through a long conversation with a 64 MiB cache budget.
//!
//! `cargo bench --bench store_memory` builds a store holding one conversation of 100,000
//! messages, then starts itself again to measure in a fresh process: it opens the store, pages
//! from the newest message to the oldest in pages of 50, and reports the peak resident set size
//! (VmHWM) against the resident size right after opening. It fails if the growth exceeds the
//! budget plus `SLACK_BYTES`. With `--test` (CI's smoke run) the conversation has 5,000 messages.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use roamsync::ids::{AccountId, DeviceId};
use roamsync::model::{Cursor, Draft, ModelConfig, Replica};
use roamsync::store::{StorageKey, StoreConfig, StoredReplica};

const ALICE: AccountId = AccountId::from_bytes([0xa1; 32]);
const PHONE: DeviceId = DeviceId::from_bytes([1; 32]);
const KEY: [u8; 32] = [7; 32];
const BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// What the process may hold beyond the cache budget: the allocator's retained pages, SQLite's
/// page cache (2 MiB by default) and the page being read.
const SLACK_BYTES: usize = 48 * 1024 * 1024;

fn status_kib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn config() -> StoreConfig {
    StoreConfig {
        cache_budget_bytes: BUDGET_BYTES,
        ..StoreConfig::default()
    }
}

fn measure(dir: &Path) {
    let start_kib = status_kib("VmRSS:");
    let mut r = StoredReplica::open(
        &dir.join("device.db"),
        &StorageKey::from_bytes(KEY),
        ALICE,
        PHONE,
        config(),
    )
    .unwrap();
    let opened_kib = status_kib("VmRSS:");
    let chat = r.conversation_list().unwrap()[0].id;
    let base_kib = status_kib("VmRSS:");
    println!(
        "RSS at start {:.1} MiB, after opening the store {:.1} MiB, after listing {:.1} MiB",
        start_kib as f64 / 1024.0,
        opened_kib as f64 / 1024.0,
        base_kib as f64 / 1024.0
    );
    let started = Instant::now();
    let mut before: Option<Cursor> = None;
    let (mut seen, mut pages, mut max_cache) = (0usize, 0usize, 0usize);
    loop {
        let page = r.history(&chat, before, 50).unwrap();
        seen += page.messages.len();
        pages += 1;
        max_cache = max_cache.max(r.cache_bytes());
        match page.next {
            Some(c) => before = Some(c),
            None => break,
        }
    }
    let peak_kib = status_kib("VmHWM:");
    let growth = peak_kib.saturating_sub(base_kib) * 1024;
    println!(
        "paged {seen} messages in {pages} pages in {:.2} s; RSS after open {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB; \
         cache estimate peak {:.1} MiB; budget {:.0} MiB + slack {:.0} MiB",
        started.elapsed().as_secs_f64(),
        base_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        growth as f64 / (1024.0 * 1024.0),
        max_cache as f64 / (1024.0 * 1024.0),
        BUDGET_BYTES as f64 / (1024.0 * 1024.0),
        SLACK_BYTES as f64 / (1024.0 * 1024.0),
    );
    assert!(
        max_cache <= BUDGET_BYTES,
        "cache estimate exceeded the budget"
    );
    assert!(
        growth <= BUDGET_BYTES + SLACK_BYTES,
        "memory grew past budget + slack"
    );
}

fn main() {
    if let Ok(dir) = std::env::var("ROAMSYNC_MEMORY_CHILD") {
        measure(Path::new(&dir));
        return;
    }
    let smoke = std::env::args().any(|a| a == "--test");
    let messages: u64 = if smoke { 5_000 } else { 100_000 };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut mem = Replica::new(ALICE, PHONE, ModelConfig::default()).unwrap();
    let chat = mem.create_conversation(1, "long", &[]).unwrap();
    for i in 0..messages {
        mem.send(
            2 + i,
            &chat,
            &Draft::text(format!("message number {i}, a typical short chat line")),
        )
        .unwrap();
    }
    drop(
        StoredReplica::adopt(
            &dir.path().join("device.db"),
            &StorageKey::from_bytes(KEY),
            mem,
            config(),
        )
        .unwrap(),
    );
    println!(
        "fixture: {messages} messages stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = Command::new(std::env::current_exe().unwrap())
        .env("ROAMSYNC_MEMORY_CHILD", dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "measurement failed");
}
