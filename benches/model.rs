//! Benchmarks of the data model's per-message operations against the history length.
//!
//! Operations, each on a conversation with a given number of messages of history:
//! - `send`: one local `Replica::send`;
//! - `apply_1` and `apply_100`: one `Replica::apply` of a batch holding 1 or 100 new messages that
//!   another member device wrote into the conversation's newest segment;
//! - `history_50`: `Replica::history(conv, None, 50)`, the newest page.
//!
//! Fixtures, each built once with the real `send` (see `docs/PERFORMANCE.md`):
//! - `seg2048/1k` and `seg2048/1M`: the default segment cap (2,048), 1,000 and 1,000,424 messages
//!   (488 full segments, then 1,000 messages in the newest, like the 1 k fixture);
//! - `single/100k`: one document holding every message (segment cap 100,000, the largest allowed,
//!   with 95,000 messages: the fixture never grows past the cap, so it stays one segment);
//! - `full_segment`: segment cap 2,048 and 1,948 messages in segment 0, for the apply of 100
//!   messages that fills the segment.
//!
//! The measured operations add messages, so a fixture may grow by a bounded number of messages
//! (its budget: 10 % at 1 k and 1 M, 5 % at 100 k, none for `full_segment`) before it is rebuilt;
//! rebuilding, producing the remote changes and dropping results are never timed.
//!
//! The 1 M fixture takes minutes and about a gigabyte, so it is only built with
//! `ROAMSYNC_BENCH_FULL=1`. `cargo bench --bench model -- --test` runs every other benchmark once,
//! as a smoke test.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use roamsync::ids::{AccountId, ConversationId, DeviceId, DocAddr};
use roamsync::model::limits::{DEFAULT_SEGMENT_CAP, MAX_SEGMENT_CAP};
use roamsync::model::{ChangeBatch, Draft, ModelConfig, Replica};

/// Environment variable that enables the 1 M-message fixture.
const FULL_ENV: &str = "ROAMSYNC_BENCH_FULL";
/// The default segment cap (2,048).
const DEFAULT_CAP: usize = DEFAULT_SEGMENT_CAP;
/// The largest segment cap (100,000): the whole single-document fixture fits in one segment.
const SINGLE_DOC_CAP: usize = MAX_SEGMENT_CAP;
/// The 1 M fixture: 488 full segments and a newest one of 1,000 messages, as in the 1 k fixture,
/// since the cost of applying remote messages depends on the size of the segment they go to.
const LARGE_HISTORY: usize = 488 * DEFAULT_CAP + 1_000;
/// A body of typical chat length.
const BODY: &str = "see you at the station at ten, I will bring the tickets";

/// One fixture: its shape and how many messages the benchmarks may add before it is rebuilt.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    history: usize,
    segment_cap: usize,
    budget: usize,
}

/// A conversation between Alice (the measured replica) and Bob (the remote writer).
struct Fixture {
    shape: Shape,
    receiver: Replica,
    sender: Replica,
    conversation: ConversationId,
    now_ms: u64,
    added: usize,
    rebuilds: usize,
    build_s: f64,
}

fn alice() -> AccountId {
    AccountId::from_bytes([0xa1; 32])
}

fn bob() -> AccountId {
    AccountId::from_bytes([0xb0; 32])
}

impl Fixture {
    /// Alice writes `shape.history` messages one `send` at a time; Bob then receives the meta
    /// document and the newest segment, as a device that has just roamed in would.
    fn build(shape: Shape) -> Fixture {
        let fixture = Fixture::build_quiet(shape);
        eprintln!(
            "fixture {}: {} messages in {} segment(s), built in {:.1} s",
            shape.name,
            shape.history,
            fixture.segments(&fixture.receiver).len(),
            fixture.build_s
        );
        fixture
    }

    fn build_quiet(shape: Shape) -> Fixture {
        let started = Instant::now();
        let config = ModelConfig {
            segment_cap: shape.segment_cap,
            ..ModelConfig::default()
        };
        let mut receiver = Replica::new(alice(), DeviceId::from_bytes([0xa1; 32]), config)
            .expect("the segment caps used here are within the allowed range");
        let sender = Replica::new(bob(), DeviceId::from_bytes([0xb0; 32]), config)
            .expect("the segment caps used here are within the allowed range");
        let mut now_ms = 1_700_000_000_000;
        let conversation = receiver
            .create_conversation(now_ms, "bench", &[bob()])
            .expect("a fresh replica accepts a conversation");
        let draft = Draft::text(BODY);
        for i in 0..shape.history {
            if i > 0 && i % 100_000 == 0 {
                eprintln!(
                    "fixture {}: {i} messages after {:.0} s",
                    shape.name,
                    started.elapsed().as_secs_f64()
                );
            }
            now_ms += 1;
            receiver
                .send(now_ms, &conversation, &draft)
                .expect("the fixture's sends are valid");
        }
        let mut fixture = Fixture {
            shape,
            receiver,
            sender,
            conversation,
            now_ms,
            added: 0,
            rebuilds: 0,
            build_s: 0.0,
        };
        fixture.refresh_sender();
        fixture.build_s = started.elapsed().as_secs_f64();
        fixture
    }

    /// Segment documents of the conversation that `replica` holds.
    fn segments(&self, replica: &Replica) -> Vec<DocAddr> {
        replica
            .docs()
            .into_iter()
            .filter(|d| matches!(d, DocAddr::Segment(c, _) if *c == self.conversation))
            .collect()
    }

    /// Gives Bob what Alice wrote since he last heard from her: the meta document, the segments he
    /// holds and Alice's newest segment. Bob's next messages then depend on Alice's current heads.
    fn refresh_sender(&mut self) {
        let mut addrs: BTreeSet<DocAddr> = BTreeSet::new();
        addrs.insert(DocAddr::Meta(self.conversation));
        addrs.extend(self.segments(&self.sender));
        addrs.extend(self.segments(&self.receiver).last().copied());
        let batches: Vec<ChangeBatch> = addrs
            .iter()
            .filter_map(|a| {
                self.receiver
                    .changes_since(a, &self.sender.version_vector(a))
            })
            .collect();
        if !batches.is_empty() {
            let report = self.sender.apply(self.now_ms, batches);
            assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        }
    }

    /// Bob sends `count` messages; returns the batches Alice lacks, exported against her version
    /// vectors, as a transport would carry them.
    fn remote_batches(&mut self, count: usize) -> Vec<ChangeBatch> {
        self.refresh_sender();
        let draft = Draft::text(BODY);
        for _ in 0..count {
            self.now_ms += 1;
            self.sender
                .send(self.now_ms, &self.conversation, &draft)
                .expect("Bob is a member");
        }
        let mut addrs = vec![DocAddr::Meta(self.conversation)];
        addrs.extend(self.segments(&self.sender));
        addrs
            .iter()
            .filter_map(|a| {
                self.sender
                    .changes_since(a, &self.receiver.version_vector(a))
            })
            .collect()
    }

    /// Messages in Alice's newest segment: each message is one change, so the sum of the segment's
    /// version vector.
    fn newest_fill(&self) -> u64 {
        self.segments(&self.receiver).last().map_or(0, |a| {
            self.receiver
                .version_vector(a)
                .iter()
                .map(|(_, seq)| *seq)
                .sum()
        })
    }

    /// Makes room for `count` more messages, rebuilding the fixture if its budget is spent.
    fn reserve(&mut self, count: usize) {
        if self.added + count > self.shape.budget {
            let rebuilds = self.rebuilds + 1;
            *self = Fixture::build_quiet(self.shape);
            self.rebuilds = rebuilds;
        }
        self.added += count;
    }
}

/// Times `iters` local sends.
fn time_send(fixture: &mut Fixture, iters: u64) -> Duration {
    let draft = Draft::text(BODY);
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        fixture.reserve(1);
        fixture.now_ms += 1;
        let now_ms = fixture.now_ms;
        let started = Instant::now();
        let id = fixture.receiver.send(now_ms, &fixture.conversation, &draft);
        total += started.elapsed();
        black_box(id.expect("Alice is a member"));
    }
    total
}

/// Times `iters` applies of a batch of `count` remote messages; only the `apply` call is timed.
/// `fills` collects the least and most messages the newest segment held before an apply.
fn time_apply(
    fixture: &mut Fixture,
    count: usize,
    iters: u64,
    fills: &mut Option<(u64, u64)>,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        fixture.reserve(count);
        let batches = fixture.remote_batches(count);
        let fill = fixture.newest_fill();
        *fills = Some(fills.map_or((fill, fill), |(lo, hi)| (lo.min(fill), hi.max(fill))));
        let now_ms = fixture.now_ms;
        let started = Instant::now();
        let report = fixture.receiver.apply(now_ms, batches);
        total += started.elapsed();
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert_eq!(report.new_messages.len(), count);
        drop(black_box(report));
    }
    total
}

/// Times `iters` reads of the newest page of 50.
fn time_history(fixture: &Fixture, iters: u64) -> Duration {
    let started = Instant::now();
    for _ in 0..iters {
        let page = fixture
            .receiver
            .history(&fixture.conversation, None, 50)
            .expect("the conversation exists");
        assert_eq!(page.messages.len(), 50);
        black_box(page);
    }
    started.elapsed()
}

/// Runs the four operations on one fixture. The fixture is built when the first of them runs, so
/// a filtered run builds only the fixtures it needs.
fn bench_fixture(group: &mut BenchmarkGroup<'_, WallTime>, shape: Shape) -> Option<Fixture> {
    let mut fixture: Option<Fixture> = None;
    let name = shape.name;
    // Sends come last: they add the most messages, and the applies should find the newest segment
    // as the fixture built it.
    group.bench_function(format!("history_50/{name}"), |b| {
        let f = fixture.get_or_insert_with(|| Fixture::build(shape));
        b.iter_custom(|iters| time_history(f, iters))
    });
    for count in [1, 100] {
        let mut fills: Option<(u64, u64)> = None;
        group.bench_function(format!("apply_{count}/{name}"), |b| {
            let f = fixture.get_or_insert_with(|| Fixture::build(shape));
            b.iter_custom(|iters| time_apply(f, count, iters, &mut fills));
        });
        if let Some((least, most)) = fills {
            eprintln!(
                "apply_{count}/{name}: the newest segment held {least} to {most} messages before an apply"
            );
        }
    }
    group.bench_function(format!("send/{name}"), |b| {
        let f = fixture.get_or_insert_with(|| Fixture::build(shape));
        b.iter_custom(|iters| time_send(f, iters))
    });
    if let Some(f) = &fixture {
        eprintln!(
            "fixture {name} after its benchmarks: {} rebuilds, {} segment(s) held by the measured replica",
            f.rebuilds,
            f.segments(&f.receiver).len()
        );
    }
    fixture
}

fn full_run() -> bool {
    std::env::var(FULL_ENV).is_ok_and(|v| v == "1")
}

fn model(c: &mut Criterion) {
    let mut group = c.benchmark_group("model");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let small = Shape {
        name: "seg2048/1k",
        history: 1_000,
        segment_cap: DEFAULT_CAP,
        budget: 100,
    };
    bench_fixture(&mut group, small);
    if full_run() {
        let large = bench_fixture(
            &mut group,
            Shape {
                name: "seg2048/1M",
                history: LARGE_HISTORY,
                segment_cap: DEFAULT_CAP,
                budget: 100_000,
            },
        );
        // A control: the 1 k fixture again while the 1 M one is still in memory, so that a
        // difference between the two sizes can be told apart from the machine's load drifting
        // during the run and from the process holding a heap of about a gigabyte.
        bench_fixture(
            &mut group,
            Shape {
                name: "seg2048/1k_beside_1M",
                ..small
            },
        );
        drop(large);
    } else {
        eprintln!("skipping the 1 M-message fixture; set {FULL_ENV}=1 to run it");
    }
    bench_fixture(
        &mut group,
        Shape {
            name: "single/100k",
            history: 95_000,
            segment_cap: SINGLE_DOC_CAP,
            budget: 5_000,
        },
    );

    // Bob fills Alice's segment 0 from 1,948 to 2,048 messages; every iteration starts again from
    // a segment of 1,948.
    let full = Shape {
        name: "full_segment",
        history: DEFAULT_CAP - 100,
        segment_cap: DEFAULT_CAP,
        budget: 100,
    };
    let mut fixture: Option<Fixture> = None;
    let mut fills: Option<(u64, u64)> = None;
    group.bench_function("apply_100/full_segment", |b| {
        let f = fixture.get_or_insert_with(|| Fixture::build(full));
        b.iter_custom(|iters| time_apply(f, 100, iters, &mut fills))
    });
    if let Some((least, most)) = fills {
        eprintln!(
            "apply_100/full_segment: the newest segment held {least} to {most} messages before an apply"
        );
    }
    group.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
