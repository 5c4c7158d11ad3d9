//! Live-sync latency: two devices and a sync server on loopback, device A committing one message
//! per change at a fixed rate, device B timing each message from A's commit to its own document.
//!
//! Runs roamsync (see `support/roamsync_live.rs`) and samod, the Rust automerge-repo (see
//! `support/samod_live.rs`), under the same workload in the same run, then roamsync alone at
//! rising rates to find the highest it sustains with zero loss. `ROAMSYNC_BENCH_FULL=1` also
//! runs 1,000 msg/s over 1 M messages of history.
//!
//! `cargo bench --bench live` runs 100 and 300 msg/s over a 1 k-message document and 50 msg/s over
//! a 50 k-message document, for `LIVE_SECONDS` (default 5) seconds each.
//! `cargo bench --bench live -- --test` runs one tiny case as a smoke test.

#[path = "support/samod_net.rs"]
mod samod_net;

#[path = "support/samod_live.rs"]
mod samod_live;

#[path = "support/roamsync_live.rs"]
mod roamsync_live;

use roamsync::store::Durability;
use roamsync_live::run_roamsync_live;
use samod_live::{LiveConfig, LiveResult, run_samod_live};

/// Body length of a typical chat message.
const BODY_BYTES: usize = 130;
/// Seconds of sending per case unless `LIVE_SECONDS` says otherwise.
const DEFAULT_SECONDS: f64 = 5.0;

fn seconds() -> f64 {
    match std::env::var("LIVE_SECONDS") {
        Ok(s) => s
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .unwrap_or_else(|| panic!("LIVE_SECONDS must be a positive number, not {s:?}")),
        Err(_) => DEFAULT_SECONDS,
    }
}

fn case(rate_per_s: u32, history: u32, seconds: f64) -> LiveConfig {
    LiveConfig {
        rate_per_s,
        messages: ((f64::from(rate_per_s) * seconds).round() as u32).max(1),
        history,
        body_bytes: BODY_BYTES,
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn print_header() {
    println!(
        "{:<8} {:>7} {:>8} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "impl", "msg/s", "history", "recv/sent", "p50 ms", "p99 ms", "max ms", "elapsed"
    );
}

fn print_row(name: &str, cfg: &LiveConfig, r: &LiveResult) {
    println!(
        "{:<8} {:>7} {:>8} {:>11} {:>9.1} {:>9.1} {:>9.1} {:>8.1}s",
        name,
        cfg.rate_per_s,
        cfg.history,
        format!("{}/{}", r.received, r.sent),
        ms(r.p50_us),
        ms(r.p99_us),
        ms(r.max_us),
        r.elapsed_s
    );
}

/// Median and 90th percentile of 50 fsyncs of a 4 KiB write, to read the latencies against.
fn fsync_probe() -> String {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut f = std::fs::File::create(dir.path().join("probe")).expect("a file");
    let mut times: Vec<std::time::Duration> = (0..50)
        .map(|_| {
            f.write_all(&[7u8; 4096]).expect("write");
            let t = std::time::Instant::now();
            f.sync_data().expect("fsync");
            t.elapsed()
        })
        .collect();
    times.sort();
    format!("p50 {:?}, p90 {:?}", times[25], times[45])
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    if smoke {
        let cfg = LiveConfig {
            rate_per_s: 100,
            messages: 20,
            history: 10,
            body_bytes: BODY_BYTES,
        };
        print_header();
        for (name, result) in [
            ("samod", run_samod_live(&cfg)),
            ("roamsync", run_roamsync_live(&cfg, Durability::Full)),
        ] {
            print_row(name, &cfg, &result);
            assert_eq!(
                result.received, result.sent,
                "{name}: smoke run lost messages"
            );
        }
        return;
    }
    if std::env::var("RUST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let s = seconds();
    print_header();
    // `LIVE_CASE=<rate>,<history>` runs that one case on roamsync only.
    if let Ok(spec) = std::env::var("LIVE_CASE") {
        let parts: Vec<u32> = spec
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let [rate, history] = parts[..] else {
            panic!("LIVE_CASE must be <rate>,<history>, not {spec:?}");
        };
        let cfg = case(rate, history, s);
        print_row("roamsync", &cfg, &run_roamsync_live(&cfg, Durability::Full));
        return;
    }
    // The same workload on both, in the same run.
    for (rate, history) in [(100, 1_000), (300, 1_000), (50, 50_000)] {
        let cfg = case(rate, history, s);
        let ours = run_roamsync_live(&cfg, Durability::Full);
        print_row("roamsync", &cfg, &ours);
        let theirs = run_samod_live(&cfg);
        print_row("samod", &cfg, &theirs);
        println!(
            "         ratio samod/roamsync: p50 {:.2}x, p99 {:.2}x",
            theirs.p50_us as f64 / ours.p50_us.max(1) as f64,
            theirs.p99_us as f64 / ours.p99_us.max(1) as f64
        );
    }
    // roamsync alone: the latency target at 1,000 msg/s, then rising rates until it loses
    // messages or falls behind (p99 over one second).
    let mut histories = vec![1_000];
    if std::env::var("ROAMSYNC_BENCH_FULL").is_ok() {
        histories.push(1_000_000);
    }
    for h in histories {
        let cfg = case(1_000, h, s);
        print_row("roamsync", &cfg, &run_roamsync_live(&cfg, Durability::Full));
    }
    // The same without waiting for the disk: what the protocol itself costs.
    let cfg = case(1_000, 1_000, s);
    print_row(
        "nofsync",
        &cfg,
        &run_roamsync_live(&cfg, Durability::Normal),
    );
    println!("fsync on this disk: {}", fsync_probe());
    let mut best = 0;
    for rate in [2_000, 5_000, 10_000, 15_000, 20_000, 30_000] {
        let cfg = case(rate, 1_000, s.min(3.0));
        let r = run_roamsync_live(&cfg, Durability::Full);
        print_row("roamsync", &cfg, &r);
        if r.received < r.sent || r.p99_us > 1_000_000 {
            break;
        }
        best = rate;
    }
    println!("roamsync highest sustained rate with zero loss: {best} msg/s");
}
