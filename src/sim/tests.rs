//! The simulation runs of `cargo test`: fixed seeds, determinism, regressions, replay and a
//! soak for local use (see docs/TESTING.md).

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{ALL_MALICE, Config, Malice, Report, run};

/// Honest-relay seeds per test (two tests, so two cores share them).
const HONEST_SEEDS_PER_TEST: u64 = 400;
/// Seeds per malicious mode.
const MALICE_SEEDS: u64 = 40;

/// Seeds that once failed, with their mode.
const REGRESSIONS: &[(u64, Option<Malice>)] = &[
    // The simulated device dropped appends refused with `UNAUTHORISED` before the account
    // group reached the relay, losing account-document changes (a simulator bug).
    (0, None),
    // A member removed while offline is never told; its appends wait for good (finding 3 in
    // docs/TESTING.md).
    (28, None),
    // An envelope left out of the middle of an answer was moved over by the cursor; the
    // changes after it waited for dependencies for good (fixed: `Session::on_answer`).
    (9, Some(Malice::Drop)),
    (21, Some(Malice::Drop)),
    (22, Some(Malice::Drop)),
    (31, Some(Malice::Drop)),
    (34, Some(Malice::Drop)),
    // With direct links: a removed member's device kept envelopes of the group's new epoch,
    // pushed before the relay took the removal in, blocked for good and never settled (a
    // simulator bug: it now stops waiting for documents of groups its account left).
    (368, None),
    (476, None),
];

fn mode_name(m: Option<Malice>) -> String {
    m.map_or("honest".into(), |m| format!("{m:?}").to_lowercase())
}

fn mode_of(name: &str) -> Option<Malice> {
    ALL_MALICE
        .iter()
        .copied()
        .find(|m| mode_name(Some(*m)) == name.to_lowercase())
}

/// Runs one seed with a configuration.
fn run_with(seed: u64, cfg: &Config) -> Result<Report, String> {
    catch_unwind(AssertUnwindSafe(|| run(seed, cfg))).unwrap_or_else(|_| Err("panic".into()))
}

fn config(malice: Option<Malice>) -> Config {
    Config {
        malice,
        ..Config::default()
    }
}

/// Runs one seed; a failure or panic prints how to replay it.
fn run_one(seed: u64, malice: Option<Malice>) -> Result<Report, String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| run(seed, &config(malice))));
    let error = match outcome {
        Ok(Ok(report)) => return Ok(report),
        Ok(Err(e)) => e,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .map_or("panic".into(), |s| format!("panic: {s}")),
    };
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let msg = format!(
        "simulation failed at commit {commit}: {error}\n  replay: SIM_SEED={seed} SIM_MODE={} cargo test --lib sim::tests::replay -- --nocapture",
        mode_name(malice)
    );
    eprintln!("{msg}");
    Err(msg)
}

fn run_range(seeds: std::ops::Range<u64>, malice: Option<Malice>) {
    let failures: Vec<String> = seeds.filter_map(|s| run_one(s, malice).err()).collect();
    assert!(
        failures.is_empty(),
        "{} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn honest_seeds_first_half() {
    run_range(0..HONEST_SEEDS_PER_TEST, None);
}

#[test]
fn honest_seeds_second_half() {
    run_range(HONEST_SEEDS_PER_TEST..2 * HONEST_SEEDS_PER_TEST, None);
}

fn run_modes(modes: &[Malice]) {
    let failures: Vec<String> = modes
        .iter()
        .flat_map(|m| (0..MALICE_SEEDS).filter_map(move |s| run_one(s, Some(*m)).err()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn malicious_relay_seeds_first_half() {
    run_modes(&ALL_MALICE[..3]);
}

#[test]
fn malicious_relay_seeds_second_half() {
    run_modes(&ALL_MALICE[3..]);
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [1, 2, 77] {
        for malice in [None, Some(Malice::Reorder)] {
            let a = run_one(seed, malice).expect("the run passes");
            let b = run_one(seed, malice).expect("the run passes");
            assert_eq!(
                a.trace, b.trace,
                "seed {seed} {malice:?} is not deterministic"
            );
            assert_eq!(a.stats, b.stats);
        }
    }
    let a = run_one(1, None).expect("passes");
    let b = run_one(2, None).expect("passes");
    assert_ne!(
        a.trace, b.trace,
        "different seeds should give different runs"
    );
}

#[test]
fn runs_exercise_the_faults() {
    let mut total = super::Stats::default();
    for seed in 0..20 {
        let s = run_one(seed, None).expect("passes").stats;
        total.sends += s.sends;
        total.device_crashes += s.device_crashes;
        total.relay_crashes += s.relay_crashes;
        total.links_cut += s.links_cut;
        total.partitions += s.partitions;
        total.direct_links += s.direct_links;
        total.direct_cut += s.direct_cut;
        total.direct_envelopes += s.direct_envelopes;
    }
    assert!(total.direct_links > 20, "{total:?}");
    assert!(total.direct_cut > 5, "{total:?}");
    assert!(total.direct_envelopes > 100, "{total:?}");
    assert!(total.sends > 100, "{total:?}");
    assert!(total.device_crashes > 5, "{total:?}");
    assert!(total.relay_crashes > 2, "{total:?}");
    assert!(total.links_cut > 5, "{total:?}");
    assert!(total.partitions > 5, "{total:?}");
}

/// Seeds of the relay outage test.
const OUTAGE_SEEDS: u64 = 8;

/// The relay is unreachable from step 20 to the end of a longer chaos phase: direct links
/// carry the traffic, and once they are quiet (the relay still unreachable) every device that
/// knows a conversation holds the same one; then the relay returns and the usual checks run.
#[test]
fn direct_links_carry_the_traffic_while_the_relay_is_unreachable() {
    let cfg = Config {
        chaos_steps: 300,
        relay_outage: Some((20, 300)),
        direct_per_mille: 150,
        ..Config::default()
    };
    let mut direct = 0;
    let mut failures = Vec::new();
    for seed in 0..OUTAGE_SEEDS {
        match run_with(seed, &cfg) {
            Ok(r) => direct += r.stats.direct_envelopes,
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        direct > 10 * OUTAGE_SEEDS,
        "{direct} envelopes over direct links"
    );
}

#[test]
fn regression_seeds() {
    for (seed, malice) in REGRESSIONS {
        run_one(*seed, *malice).expect("a regression seed passes");
    }
}

/// Known issue: a push the relay drops (the protocol allows it on a slow connection) is only
/// noticed when a later push or acknowledgement of the same document, log or group shows the
/// gap. When none follows — the last message of a conversation, a new group's version 0, a
/// log entry — the device stays behind until it reconnects.
#[test]
#[ignore = "known issue: a dropped last push is never fetched (docs/TESTING.md, Findings)"]
fn known_a_dropped_last_push_is_never_fetched() {
    let cfg = Config {
        push_drop_per_mille: 100,
        ..Config::default()
    };
    for seed in [0, 1, 2] {
        run_with(seed, &cfg).expect("converges once the network heals");
    }
}

/// Known issue: a device linked mid-run can end without the key of a conversation of its
/// account, so it never holds the conversation (seeds 1 and 6 in the honest mode, links on).
#[test]
#[ignore = "known issue: a linked device misses a conversation key (docs/TESTING.md, Findings)"]
fn known_a_linked_device_misses_a_conversation_key() {
    let cfg = Config {
        link_per_mille: super::devices::LINK_PER_MILLE,
        ..Config::default()
    };
    for seed in [1, 6] {
        run_with(seed, &cfg).expect("a linked device holds its account's conversations");
    }
}

/// Known issue: what a revoked device gave only to peers (changes, a conversation) stays on
/// them: the relay refuses the revoked author's envelopes when peers pass them on, and only a
/// group update's signer posts it (finding 7 in docs/TESTING.md). With revoked devices kept on
/// the direct network, some of these seeds end with devices that diverge.
#[test]
#[ignore = "known issue: what a revoked device gave peers stays on them (docs/TESTING.md, Findings)"]
fn known_what_a_revoked_device_gave_peers_stays_on_them() {
    let cfg = Config {
        direct_revoked: true,
        ..Config::default()
    };
    let failures: Vec<u64> = (0..40).filter(|s| run_with(*s, &cfg).is_err()).collect();
    assert!(failures.is_empty(), "seeds {failures:?} fail");
}

/// `SIM_SEED=<seed> [SIM_MODE=<mode>] cargo test --lib sim::tests::replay -- --nocapture`
/// replays one run and prints its trace hash and counts. Does nothing without `SIM_SEED`.
#[test]
fn replay() {
    let Some(seed) = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    let mode = std::env::var("SIM_MODE").unwrap_or_else(|_| "honest".into());
    let malice = mode_of(&mode);
    let report = run_one(seed, malice).expect("the replayed run passes");
    println!(
        "seed {seed} mode {mode}: trace {} {:?}",
        blake3::Hash::from(report.trace).to_hex(),
        report.stats
    );
}

/// `SIM_RUNS=<n> cargo test --lib sim::tests::soak -- --ignored --nocapture`: `n` seeds from
/// `SIM_FROM` (default 1,000,000) in every mode.
#[test]
#[ignore = "a long soak for local use"]
fn soak() {
    let runs: u64 = std::env::var("SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let from: u64 = std::env::var("SIM_FROM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut failures = 0;
    for seed in from..from + runs {
        failures += usize::from(run_one(seed, None).is_err());
        let m = ALL_MALICE[(seed % ALL_MALICE.len() as u64) as usize];
        failures += usize::from(run_one(seed, Some(m)).is_err());
    }
    assert_eq!(failures, 0);
}
