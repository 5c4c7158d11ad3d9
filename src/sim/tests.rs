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
    // Found with devices linked during the runs (docs/TESTING.md, findings 4 to 7): a linked
    // device without a conversation's key; a group update refused for a stale log; a membership
    // change that lost its version to another update; an account group its revoked maker never
    // posted; envelopes waiting for good on a key that comes later, or after a removal.
    (12, None),
    (13, None),
    (24, None),
    (26, None),
    (38, None),
    (50, None),
    (68, None),
    (72, None),
    (96, None),
    (118, None),
    (463, None),
    (491, None),
    (639, None),
    (789, None),
    // With direct links: a removed member's device kept envelopes of the group's new epoch,
    // pushed before the relay took the removal in, blocked for good and never settled (a
    // simulator bug: it now stops waiting for documents of groups its account left).
    (368, None),
    (476, None),
    // With direct links and linked devices: a keeper's rewrap refused while the relay did not
    // hold the group yet (its maker shared it directly first) was not made again once it did.
    (30, None),
    (157, None),
];

/// Seeds that fail for a known reason not fixed yet: skipped by the fixed runs, run by
/// `known_failures` (docs/TESTING.md, "Findings").
const KNOWN_FAILURES: &[(u64, Option<Malice>)] = &[
    // Finding 8: a device whose only key holders are of other accounts, which have not
    // fetched its account's log since the revocation that made them its keepers.
    (595, None),
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
    let failures: Vec<String> = seeds
        .filter(|s| !KNOWN_FAILURES.contains(&(*s, malice)))
        .filter_map(|s| run_one(s, malice).err())
        .collect();
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
        .flat_map(|m| {
            (0..MALICE_SEEDS)
                .filter(move |s| !KNOWN_FAILURES.contains(&(*s, Some(*m))))
                .filter_map(move |s| run_one(s, Some(*m)).err())
        })
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
        total.pushes_dropped += s.pushes_dropped;
        total.links += s.links;
        total.revokes += s.revokes;
        total.rewraps += s.rewraps;
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
    assert!(total.pushes_dropped > 5, "{total:?}");
    assert!(total.links > 5, "{total:?}");
    assert!(total.revokes > 0, "{total:?}");
    assert!(total.rewraps > 5, "{total:?}");
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
        // Also as they were found, before pushes were dropped in the fixed seeds.
        let found = Config {
            push_drop_per_mille: 0,
            ..config(*malice)
        };
        run_with(*seed, &found).expect("a regression seed passes without push drops");
    }
}

/// A push the relay drops closes the connection (as the server does with a connection whose
/// push queue is full), so the device reconnects and catches up from its cursors, even when
/// nothing follows the dropped push — the last message of a conversation, a new group's
/// version 0, a log entry (finding 1 in docs/TESTING.md; nearly every seed failed while a
/// dropped push only disappeared).
#[test]
fn a_dropped_last_push_is_fetched_after_the_connection_closes() {
    let cfg = Config {
        push_drop_per_mille: 100,
        ..Config::default()
    };
    let mut dropped = 0;
    for seed in [0, 1, 2] {
        let report = run_with(seed, &cfg).expect("converges once the network heals");
        dropped += report.stats.pushes_dropped;
    }
    assert!(dropped > 0, "no push was dropped");
}

/// Regression: a device linked mid-run ended without the key of a conversation its account was
/// in, created by another account's device with a copy of the log from before the link and
/// posted after it (seeds 1 and 6; fixed: `crypto::group::missing_wraps`). Seed 1 also has a
/// linked device whose group update others refused with a stale log copy until they fetch it
/// again.
#[test]
fn a_linked_device_gets_the_keys_of_conversations_created_with_a_stale_log() {
    for seed in [1, 6] {
        run_one(seed, None).expect("a linked device holds its account's conversations");
    }
}

/// The seeds of `KNOWN_FAILURES`, which fail until their finding is fixed.
#[test]
#[ignore = "known failures (docs/TESTING.md, Findings)"]
fn known_failures() {
    for (seed, malice) in KNOWN_FAILURES {
        run_one(*seed, *malice).expect("passes once its finding is fixed");
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
