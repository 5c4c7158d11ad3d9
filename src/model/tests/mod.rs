//! Unit tests of the data model: every operation, every typed error, and the sync rules.

mod batch;
mod errors;
mod hostile;
mod ops;
mod paging;
mod sync;

use crate::ids::{AccountId, DeviceId, DocAddr};
use crate::model::{ApplyReport, ChangeBatch, ModelConfig, Replica};

/// Wall-clock time of the tests, in milliseconds.
const T0: u64 = 1_800_000_000_000;

fn account(n: u8) -> AccountId {
    AccountId::from_bytes([n; 32])
}

fn device(n: u8) -> DeviceId {
    let mut b = [n; 32];
    b[31] = 0xd0;
    DeviceId::from_bytes(b)
}

/// A replica of account `a`, device `d`, with segments of `cap` messages.
fn replica(a: u8, d: u8, cap: usize) -> Replica {
    let config = ModelConfig {
        segment_cap: cap,
        ..ModelConfig::default()
    };
    Replica::new(account(a), device(d), config).expect("valid config")
}

/// What `from` holds that `to` may hold and lacks.
fn batches(from: &Replica, to: &Replica) -> Vec<ChangeBatch> {
    from.docs()
        .iter()
        .filter(|addr| !matches!(addr, DocAddr::Account(a) if *a != to.account()))
        .filter_map(|addr| from.changes_since(addr, &to.version_vector(addr)))
        .collect()
}

/// Delivers everything `from` holds to `to`; nothing may be refused.
fn sync(from: &Replica, to: &mut Replica, now_ms: u64) -> ApplyReport {
    let report = to.apply(now_ms, batches(from, to));
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    report
}

/// Delivers everything in both directions.
fn sync_pair(x: &mut Replica, y: &mut Replica, now_ms: u64) {
    sync(x, y, now_ms);
    sync(y, x, now_ms);
}
