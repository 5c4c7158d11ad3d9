//! Roaming: a new device's cold start over a large history, an offline device's catch-up, and
//! samod (the Rust automerge-repo) syncing the same history to a new peer, in one run, with a
//! real relay on loopback.
//!
//! - **New device** (`support/roaming_roamsync.rs`): `ROAMING_CONVS` conversations (default
//!   200) × `ROAMING_MSGS` messages (default 1,000) written by one device of account A, with
//!   account P as the other member; then a new device linked to A in a child process, timed
//!   from the call to `Engine::link` (and from its return) until the conversation list, the
//!   newest page of every conversation, and every message are present; its peak memory
//!   (`VmHWM`), and the bytes it received from the relay.
//! - **Direct link** (same file, part `direct`): the same history, with A's device having
//!   direct sync on from the start; the new device has no relay and is linked to A's device
//!   with `Engine::link_direct`, which serves the whole history. Measured like the relay link,
//!   in turns with it against the same history when both parts run.
//! - **Offline catch-up**: a linked device goes offline while `CATCHUP_MSGS` messages (default
//!   50,000) arrive over `CATCHUP_CONVS` conversations (default 50); then it reopens.
//! - **samod** (`support/roaming_samod.rs`): the same conversations as documents, synced to a
//!   new, empty peer in a child process.
//!
//! `ROAMING_REPEAT` (default 3) repeats each new-device measurement against the same history and
//! prints the medians. `ROAMING_PARTS` (default `roamsync,direct,catchup,samod`) selects parts.
//! `cargo bench --bench roaming -- --test` runs a tiny version as a smoke test; every run fails
//! if a device does not end up with every message.

#[path = "support/samod_net.rs"]
mod samod_net;

#[path = "support/roaming_child.rs"]
mod roaming_child;

#[path = "support/roaming_roamsync.rs"]
mod roaming_roamsync;

#[path = "support/roaming_samod.rs"]
mod roaming_samod;

use std::time::Duration;

use roaming_child::{Metrics, ROLE_ENV};
use roaming_roamsync::{Link, Workload};

/// Length of every message body, like the live benchmark's.
const BODY_BYTES: usize = 130;

/// Syllables of the made-up words message bodies are written in.
const SYLLABLES: [&str; 16] = [
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "jo", "bu", "xe", "gi", "fa", "wu",
];
/// Words in the vocabulary.
const VOCABULARY: u64 = 4_096;

/// Title of conversation `c` (a new device finds conversations by title).
pub fn conv_title(c: usize) -> String {
    format!("conversation {c}")
}

/// Word `rank` of the vocabulary: frequent words are short (one syllable for the 16 most
/// frequent, two for the next 240, three for the rest).
fn word(rank: u64, out: &mut String) {
    let syllables = match rank {
        0..16 => 1,
        16..256 => 2,
        _ => 3,
    };
    let mut r = rank;
    for _ in 0..syllables {
        out.push_str(SYLLABLES[(r % 16) as usize]);
        r /= 16;
    }
}

/// Body of message `i` of conversation `c`: the tag `c<c> m<i>`, then words cut to
/// [`BODY_BYTES`]. Words are drawn with Zipf-like frequencies (rank = 4096^u - 1, u uniform)
/// by a generator seeded with `c` and `i`, so bodies compress about like English text (deflate
/// takes a run of them to ~44 B per 130 B body, as it does the GPL's text), not like one
/// repeated sentence (which would flatter any format that compresses).
pub fn body(c: usize, i: usize) -> String {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut x = splitmix((c as u64) << 32 | i as u64);
    let mut s = format!("c{c} m{i} ");
    while s.len() < BODY_BYTES {
        x = x.wrapping_add(GOLDEN);
        let u = (splitmix(x) >> 11) as f64 / (1u64 << 53) as f64;
        let rank = ((VOCABULARY as f64).powf(u) as u64).saturating_sub(1) % VOCABULARY;
        word(rank, &mut s);
        s.push(' ');
    }
    s.truncate(BODY_BYTES);
    s
}

/// The splitmix64 finaliser: a well-mixed 64-bit value from any seed.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive number, not {v:?}")),
        Err(_) => default,
    }
}

/// The median of what every run reported as `name`.
fn median(runs: &[Metrics], name: &str) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(|m| m.get(name)).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn secs(ms: f64) -> String {
    format!("{:.2} s", ms / 1e3)
}

fn mb(bytes: f64) -> String {
    if bytes < 1e6 {
        format!("{:.1} kB", bytes / 1e3)
    } else {
        format!("{:.1} MB", bytes / 1e6)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The new-device rows: roamsync linked through the relay and directly, and samod.
struct NewDevice {
    relay: Vec<Metrics>,
    direct: Vec<Metrics>,
    samod: Vec<Metrics>,
}

fn print_roaming(w: &Workload, runs: &NewDevice) {
    let total = w.total() as f64;
    println!();
    println!(
        "new device: {} conversations x {} messages = {} messages of {BODY_BYTES} B, {} run(s), medians",
        w.convs,
        w.msgs,
        w.total(),
        runs.relay
            .len()
            .max(runs.direct.len())
            .max(runs.samod.len())
    );
    println!(
        "{:<9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>12} {:>8}",
        "impl",
        "linked",
        "list",
        "pages",
        "1st full",
        "full",
        "peak RSS",
        "end RSS",
        "received",
        "B/msg"
    );
    let row = |name: &str, runs: &[Metrics], has_list: bool| {
        let opt = |metric: &str| {
            if has_list {
                secs(median(runs, metric))
            } else {
                "-".to_owned()
            }
        };
        println!(
            "{:<9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>12} {:>8.1}",
            name,
            if has_list {
                secs(median(runs, "link_ms"))
            } else {
                secs(median(runs, "connect_ms"))
            },
            opt("list_ms"),
            opt("pages_ms"),
            secs(median(runs, "first_full_ms")),
            secs(median(runs, "full_ms")),
            mb(median(runs, "peak_rss_kb") * 1024.0),
            mb(median(runs, "end_rss_kb") * 1024.0),
            mb(median(runs, "bytes_received")),
            median(runs, "bytes_received") / total
        );
    };
    let ours = [(Link::Relay, &runs.relay), (Link::Direct, &runs.direct)];
    for (link, runs) in ours.iter().filter(|(_, r)| !r.is_empty()) {
        row(link.name(), runs, true);
    }
    if !runs.samod.is_empty() {
        row("samod", &runs.samod, false);
    }
    println!(
        "(roamsync times from the call to Engine::link (relay) or Engine::link_direct (direct), \
         samod's from the peer's start; \"linked\" is when link returned / the peer connected; \
         plaintext body {BODY_BYTES} B per message)"
    );
    for (link, runs) in ours.iter().filter(|(_, r)| !r.is_empty()) {
        print_roamsync_details(link.name(), runs, total);
    }
    let ratios = |what: &str, over: &[Metrics], under: &[Metrics]| {
        if over.is_empty() || under.is_empty() {
            return;
        }
        let ratio = |name: &str| median(over, name) / median(under, name).max(1e-9);
        println!(
            "ratio {what}: list {}, first full {:.2}x, full {:.2}x, bytes {:.2}x, peak RSS {:.2}x",
            if over.first().is_some_and(|m| m.0.contains_key("list_ms")) {
                format!("{:.2}x", ratio("list_ms"))
            } else {
                "-".to_owned()
            },
            ratio("first_full_ms"),
            ratio("full_ms"),
            ratio("bytes_received"),
            ratio("peak_rss_kb")
        );
    };
    ratios("direct/relay", &runs.direct, &runs.relay);
    ratios("samod/relay", &runs.samod, &runs.relay);
    if !runs.samod.is_empty() {
        println!("samod set-up {:.1} s", median(&runs.samod, "setup_s"));
    }
}

/// What roamsync's new device reported beyond the table, linked by `name`, and the targets.
fn print_roamsync_details(name: &str, runs: &[Metrics], total: f64) {
    println!(
        "{name} after link returned: list {}, pages {}, full {}; polls {} (median {:.1} ms, \
         max {:.1} ms, total {}); sent {}; snapshots taken {}; peak RSS after the final check \
         {}; set-up {:.1} s",
        secs(median(runs, "list_ms_after_link")),
        secs(median(runs, "pages_ms_after_link")),
        secs(median(runs, "full_ms_after_link")),
        median(runs, "polls"),
        median(runs, "poll_median_ms"),
        median(runs, "poll_max_ms"),
        secs(median(runs, "poll_total_ms")),
        mb(median(runs, "bytes_sent")),
        median(runs, "snapshots_taken"),
        mb(median(runs, "peak_rss_after_verify_kb") * 1024.0),
        median(runs, "setup_s")
    );
    let per_msg = median(runs, "bytes_received") / total;
    let peak_mb = median(runs, "peak_rss_kb") * 1024.0 / 1e6;
    println!("{name} targets:");
    for (what, ok) in [
        ("list ready <= 0.5 s", median(runs, "list_ms") <= 500.0),
        (
            "newest page of every conversation <= 1 s",
            median(runs, "pages_ms") <= 1_000.0,
        ),
        ("full history <= 2 s", median(runs, "full_ms") <= 2_000.0),
        ("peak memory <= 100 MB", peak_mb <= 100.0),
        ("<= 60 B per message", per_msg <= 60.0),
    ] {
        println!("  {what}: {}", verdict(ok));
    }
}

fn print_catchup(w: &Workload, m: &Metrics) {
    let ms = m.get("catchup_ms");
    println!();
    println!(
        "offline catch-up: {} messages over {} conversations: every message present {} after \
         reopening ({:.0} msg/s); open returned {}, list {}; received {} ({:.1} B/msg); polls {}; \
         set-up {:.1} s",
        w.total(),
        w.convs,
        secs(ms),
        w.total() as f64 / (ms / 1e3),
        secs(m.get("open_ms")),
        secs(m.get("list_ms")),
        mb(m.get("bytes_received")),
        m.get("bytes_received") / w.total() as f64,
        secs(m.get("poll_total_ms")),
        m.get("setup_s")
    );
}

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok(roaming_roamsync::NEW_DEVICE_ROLE) => return roaming_roamsync::child_new_device(),
        Ok(roaming_samod::NEW_PEER_ROLE) => return roaming_samod::child_new_peer(),
        Ok(other) => panic!("unknown {ROLE_ENV} {other:?}"),
        Err(_) => {}
    }
    let smoke = std::env::args().any(|a| a == "--test");
    let timeout = Duration::from_secs(if smoke { 60 } else { 1_800 });
    let (roaming, catchup, repeat) = if smoke {
        (
            Workload {
                convs: 3,
                msgs: 20,
                timeout,
            },
            Workload {
                convs: 4,
                msgs: 50,
                timeout,
            },
            1,
        )
    } else {
        let catchup_convs = env_usize("CATCHUP_CONVS", 50);
        (
            Workload {
                convs: env_usize("ROAMING_CONVS", 200),
                msgs: env_usize("ROAMING_MSGS", 1_000),
                timeout,
            },
            Workload {
                convs: catchup_convs,
                msgs: env_usize("CATCHUP_MSGS", 50_000).div_ceil(catchup_convs),
                timeout,
            },
            env_usize("ROAMING_REPEAT", 3),
        )
    };
    let parts =
        std::env::var("ROAMING_PARTS").unwrap_or_else(|_| "roamsync,direct,catchup,samod".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    let links: Vec<Link> = [("roamsync", Link::Relay), ("direct", Link::Direct)]
        .into_iter()
        .filter(|(name, _)| part(name))
        .map(|(_, link)| link)
        .collect();
    let mut ours = roaming_roamsync::run_new_device(roaming, repeat, &links).into_iter();
    let mut next = |link: Link| {
        if links.contains(&link) {
            ours.next().expect("runs of every link")
        } else {
            Vec::new()
        }
    };
    let runs = NewDevice {
        relay: next(Link::Relay),
        direct: next(Link::Direct),
        samod: if part("samod") {
            roaming_samod::run_new_peer(roaming, repeat)
        } else {
            Vec::new()
        },
    };
    let caught_up = part("catchup").then(|| roaming_roamsync::run_catchup(catchup));
    if !runs.relay.is_empty() || !runs.direct.is_empty() || !runs.samod.is_empty() {
        print_roaming(&roaming, &runs);
    }
    if let Some(m) = &caught_up {
        print_catchup(&catchup, m);
    }
}
