//! Live-sync latency: two devices and a sync server on loopback, device A committing one message
//! per change at a fixed rate, device B timing each message from A's commit to its own document.
//!
//! Runs samod (the Rust automerge-repo) under this workload; see `support/samod_live.rs`.
//!
//! `cargo bench --bench live` runs 100 and 300 msg/s over a 1 k-message document and 50 msg/s over
//! a 50 k-message document, for `LIVE_SECONDS` (default 5) seconds each.
//! `cargo bench --bench live -- --test` runs one tiny case as a smoke test.

#[path = "support/samod_live.rs"]
mod samod_live;

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

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let cases = if smoke {
        vec![LiveConfig {
            rate_per_s: 100,
            messages: 20,
            history: 10,
            body_bytes: BODY_BYTES,
        }]
    } else {
        let s = seconds();
        vec![
            case(100, 1_000, s),
            case(300, 1_000, s),
            case(50, 50_000, s),
        ]
    };
    print_header();
    for cfg in &cases {
        let result = run_samod_live(cfg);
        print_row("samod", cfg, &result);
        if smoke {
            assert_eq!(result.received, result.sent, "smoke run lost messages");
        }
    }
}
