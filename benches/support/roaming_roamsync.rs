//! The roamsync side of the roaming benchmark: a relay and the devices that write the history
//! run in the parent; the new device runs in a child process ([`child_new_device`]).
//!
//! - **New device.** Account A (one device) creates `convs` conversations with account P as the
//!   other member, then writes `msgs` messages into each, round robin over the conversations,
//!   with thousands of sends in flight (a worker turn commits everything queued in one
//!   transaction and one envelope per document), and waits until the relay acknowledged every
//!   envelope. P's device goes offline once the conversations exist, so it does not compete for
//!   the two cores. A new device is then linked to A's account in a child process, which times
//!   the stages of its cold start from the moment it calls `Engine::link` ([`Link::Relay`]:
//!   the history comes from the relay) or `Engine::link_direct` ([`Link::Direct`]: it has no
//!   relay, and the history comes from A's device over a direct connection).
//! - **Offline catch-up.** Account A's second device is linked and has seen the conversations,
//!   then goes offline (`Engine::shutdown`); P writes the messages; the device reopens from its
//!   store and the time until every message is present is measured.
//!
//! Readiness is found by polling on events and at least every 20 ms, never sooner than 5 ms
//! after the previous poll. A conversation is
//! listed as ready once its list line shows its newest message; its newest page once
//! `history(c, None, 20)` returns 20 messages ending with that message; its full history once a
//! walk over its pages (500 at a time) counts every message. Each conversation's page and walk
//! are read only once its list line shows the newest message, so polls stay cheap; their cost
//! is measured and reported. At the end every conversation is read again in full and every
//! message body checked: a device that lacks a message fails the run.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use roamsync::engine::{ConnectionState, DirectConfig, DirectInvite, Engine, EngineConfig};
use roamsync::ids::ConversationId;
use roamsync::net::PeerAddr;
use roamsync::net::discovery::DiscoveryConfig;
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::StorageKey;

use crate::roaming_child::{self, Metrics, memory_kb, report, report_memory, run_child};
use crate::{body, conv_title};

/// Sends in flight at once while writing history (a worker turn takes up to 4,096 inputs).
const SEND_WINDOW: usize = 8_192;
/// Conversations created at once.
const CREATE_WINDOW: usize = 16;
/// Longest wait between two polls of the new device.
const POLL_TICK: Duration = Duration::from_millis(20);
/// Shortest pause between two polls, so a stream of events does not make polling back to back.
const POLL_GAP: Duration = Duration::from_millis(5);
/// Messages per page when walking a whole history.
const WALK_PAGE: usize = 500;
/// Messages of the newest page.
const NEWEST_PAGE: usize = 20;

/// Child role: a new device linked to the account, timing its cold start.
pub const NEW_DEVICE_ROLE: &str = "roamsync-new-device";
/// Names the [`Link`] of a new-device child.
const LINK_ENV: &str = "ROAMING_LINK";

/// How the new device joins the account and where its history comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// `Engine::link` with a pairing code, through the relay, which then serves the history.
    Relay,
    /// `Engine::link_direct` with A's device's invitation; the new device has no relay, and
    /// A's device (direct sync on since before it wrote the history) serves everything.
    Direct,
}

impl Link {
    /// Its name in the child's environment and in the printed results.
    pub fn name(self) -> &'static str {
        match self {
            Link::Relay => "relay",
            Link::Direct => "direct",
        }
    }

    fn parse(name: &str) -> Link {
        [Link::Relay, Link::Direct]
            .into_iter()
            .find(|l| l.name() == name)
            .unwrap_or_else(|| panic!("unknown {LINK_ENV} {name:?}"))
    }
}

/// The size of a roaming or catch-up run.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Conversations.
    pub convs: usize,
    /// Messages per conversation.
    pub msgs: usize,
    /// How long a device may take to get everything before the run fails.
    pub timeout: Duration,
}

impl Workload {
    /// Every message of the run.
    pub fn total(&self) -> usize {
        self.convs * self.msgs
    }
}

fn config(dir: &Path, name: &str, relays: Vec<PeerAddr>) -> EngineConfig {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    EngineConfig::new(dir.join(format!("{name}.db")), key, relays)
}

/// Direct sync listening on loopback if `listen`, dialling only the peers it is given, with LAN
/// discovery off (the benchmark says who meets whom).
fn direct_config(listen: bool) -> DirectConfig {
    DirectConfig {
        listen: listen.then(|| "127.0.0.1:0".parse().expect("an address")),
        peers: Vec::new(),
        discovery: DiscoveryConfig {
            enabled: false,
            ..DiscoveryConfig::default()
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn until_live(e: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = e.sync_status().await.expect("status");
        if s.relays.iter().all(|r| r.state == ConnectionState::Live) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("device never got live");
}

async fn until_uploaded(e: &Engine, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = e.sync_status().await.expect("status").pending_uploads;
        if pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} envelopes still not uploaded after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `e` lists every conversation in `chats`.
async fn until_listed(e: &Engine, chats: &[ConversationId], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let list = e.conversation_list().await.expect("list");
        if chats.iter().all(|c| list.iter().any(|s| s.id == *c)) {
            return;
        }
        assert!(Instant::now() < deadline, "conversations never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `n` conversations titled by [`conv_title`], from `owner` with `other` as member.
async fn create_conversations(owner: &Engine, other: &Engine, n: usize) -> Vec<ConversationId> {
    futures::stream::iter(0..n)
        .map(|c| async move {
            owner
                .create_conversation(&conv_title(c), &[other.account()])
                .await
                .expect("conversation")
        })
        .buffered(CREATE_WINDOW)
        .collect()
        .await
}

/// `writer` sends `msgs` messages into each of `chats`, round robin, many in flight, and waits
/// until the relay has them all. Returns the seconds it took.
async fn write_history(writer: &Engine, chats: &[ConversationId], w: &Workload) -> f64 {
    let start = Instant::now();
    let sends = (0..w.msgs).flat_map(|i| (0..chats.len()).map(move |c| (c, i)));
    futures::stream::iter(sends)
        .map(|(c, i)| {
            let chat = chats[c];
            async move {
                writer.send(&chat, &body(c, i)).await.expect("send");
            }
        })
        .buffer_unordered(SEND_WINDOW)
        .collect::<()>()
        .await;
    let sent = start.elapsed();
    until_uploaded(writer, w.timeout).await;
    eprintln!(
        "roamsync: wrote {} messages in {:.1} s, all uploaded after {:.1} s",
        chats.len() * w.msgs,
        sent.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    start.elapsed().as_secs_f64()
}

/// Waits until `e` has made its snapshots (a device makes them in the background, so one that
/// has been in use for a while has them): until the count stops growing for 3 s. Returns the
/// count and the seconds it took.
async fn until_snapshots_settle(e: &Engine, timeout: Duration) -> (u64, f64) {
    let start = Instant::now();
    let (mut made, mut since) = (0, Instant::now());
    loop {
        let now = e.sync_status().await.expect("status").snapshots_made;
        if now != made {
            (made, since) = (now, Instant::now());
        }
        if since.elapsed() >= Duration::from_secs(3) || start.elapsed() >= timeout {
            return (made, start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay in `dir` and two accounts on it, "a" and "p", both live; with `a_direct`, A's
/// device also has direct sync on (listening on loopback), so it archives every envelope it
/// seals and can serve a device linked to it directly.
async fn relay_and_two_accounts(dir: &Path, a_direct: bool) -> (Relay, PeerAddr, Engine, Engine) {
    let relay = Relay::start(RelayConfig::new(
        dir.join("relay"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("relay");
    let addr = relay.addr();
    let mut a_config = config(dir, "a", vec![addr.clone()]);
    a_config.direct = a_direct.then(|| direct_config(true));
    let a = Engine::create_account(a_config, "a").await.expect("a");
    let p = Engine::create_account(config(dir, "p", vec![addr.clone()]), "p")
        .await
        .expect("p");
    until_live(&a).await;
    until_live(&p).await;
    (relay, addr, a, p)
}

/// The new-device measurement: history written by A, then a new device linked in a child
/// process by each of `links`, `repeat` times against the same history (each a device of its
/// own; the links take turns, so a slow spell of the machine does not fall on one of them).
/// Returns what each child reported, plus `setup_s`, for each of `links` in order.
pub fn run_new_device(w: Workload, repeat: usize, links: &[Link]) -> Vec<Vec<Metrics>> {
    if links.is_empty() {
        return Vec::new();
    }
    runtime().block_on(async move {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let a_direct = links.contains(&Link::Direct);
        let (relay, addr, a, p) = relay_and_two_accounts(dir.path(), a_direct).await;
        let chats = create_conversations(&a, &p, w.convs).await;
        p.shutdown().await;
        let setup_s = write_history(&a, &chats, &w).await;
        let (snapshots, snapshot_s) = until_snapshots_settle(&a, w.timeout).await;
        eprintln!("roamsync: {snapshots} snapshots made, settled after {snapshot_s:.1} s");
        let mut runs = vec![Vec::new(); links.len()];
        for run in 0..repeat {
            for (&link, runs) in links.iter().zip(&mut runs) {
                let mut env = vec![
                    (LINK_ENV, link.name().to_owned()),
                    ("ROAMING_CONVS", w.convs.to_string()),
                    ("ROAMING_MSGS", w.msgs.to_string()),
                    ("ROAMING_TIMEOUT_S", w.timeout.as_secs().to_string()),
                ];
                match link {
                    Link::Relay => {
                        let code = a.invite_device().await.expect("invite");
                        env.extend([("ROAMING_RELAY", addr.to_string()), ("ROAMING_CODE", code)]);
                    }
                    Link::Direct => {
                        // The invitation travels as text (a QR code).
                        let invite = a.invite_device_direct("127.0.0.1").await.expect("invite");
                        env.push(("ROAMING_INVITE", invite.to_string()));
                    }
                }
                let mut m = tokio::task::spawn_blocking(move || run_child(NEW_DEVICE_ROLE, &env))
                    .await
                    .expect("the child's reader");
                m.0.insert("setup_s".into(), setup_s);
                eprintln!(
                    "roamsync new device, {}, run {}: {:?}",
                    link.name(),
                    run + 1,
                    m.0
                );
                runs.push(m);
            }
        }
        a.shutdown().await;
        relay.shutdown().await;
        runs
    })
}

/// What is known about one conversation on the measured device.
#[derive(Default)]
struct Progress {
    /// When its list line first showed its newest message.
    listed: Option<Instant>,
    /// When its newest page was complete.
    page: Option<Instant>,
    /// When its whole history was present.
    full: Option<Instant>,
}

/// Tracks readiness of every conversation on a device, by title.
struct Tracker {
    w: Workload,
    by_title: HashMap<String, usize>,
    progress: Vec<Progress>,
    ids: Vec<Option<ConversationId>>,
    list_ready: Option<Instant>,
    poll_times: Vec<Duration>,
}

impl Tracker {
    fn new(w: Workload) -> Tracker {
        Tracker {
            w,
            by_title: (0..w.convs).map(|c| (conv_title(c), c)).collect(),
            progress: (0..w.convs).map(|_| Progress::default()).collect(),
            ids: vec![None; w.convs],
            list_ready: None,
            poll_times: Vec::new(),
        }
    }

    fn all(&self, f: impl Fn(&Progress) -> bool) -> bool {
        self.progress.iter().all(f)
    }

    fn done(&self) -> bool {
        self.list_ready.is_some() && self.all(|p| p.full.is_some())
    }

    /// One poll: the list, then the newest page and the whole history of conversations whose
    /// list line shows their newest message.
    async fn poll(&mut self, e: &Engine) {
        let started = Instant::now();
        let last = self.w.msgs - 1;
        let newest_prefix = move |c: usize| format!("{} ", body_tag(c, last));
        let list = e.conversation_list().await.expect("list");
        let now = Instant::now();
        for s in &list {
            let Some(&c) = self.by_title.get(&s.title) else {
                continue;
            };
            self.ids[c] = Some(s.id);
            let newest = s
                .last_message
                .as_ref()
                .and_then(|m| m.text.as_deref())
                .is_some_and(|t| t.starts_with(&newest_prefix(c)));
            if newest && self.progress[c].listed.is_none() {
                self.progress[c].listed = Some(now);
            }
        }
        if self.list_ready.is_none() && self.all(|p| p.listed.is_some()) {
            self.list_ready = Some(now);
        }
        for c in 0..self.w.convs {
            let Some(id) = self.ids[c] else { continue };
            let p = &self.progress[c];
            if p.listed.is_none() || p.full.is_some() {
                continue;
            }
            if p.page.is_none() {
                let page = e.history(&id, None, NEWEST_PAGE).await.expect("page");
                let last_ok = page
                    .messages
                    .last()
                    .and_then(|m| m.body.as_deref())
                    .is_some_and(|b| b.starts_with(&newest_prefix(c)));
                if last_ok && page.messages.len() == NEWEST_PAGE.min(self.w.msgs) {
                    self.progress[c].page = Some(Instant::now());
                }
            }
            if self.progress[c].page.is_some() && count_all(e, &id).await == self.w.msgs {
                self.progress[c].full = Some(Instant::now());
            }
        }
        self.poll_times.push(started.elapsed());
    }

    fn summary(&self) -> String {
        let n = |f: fn(&Progress) -> bool| self.progress.iter().filter(|p| f(p)).count();
        format!(
            "{} of {} conversations listed with their newest message, {} newest pages, {} full",
            n(|p| p.listed.is_some()),
            self.w.convs,
            n(|p| p.page.is_some()),
            n(|p| p.full.is_some())
        )
    }

    /// Polls on every event and every [`POLL_TICK`] until everything is present.
    async fn run(&mut self, e: &Engine, start: Instant) {
        let mut events = e.events();
        let deadline = start + self.w.timeout;
        loop {
            self.poll(e).await;
            if self.done() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the device did not get every message within {:?}: {}",
                self.w.timeout,
                self.summary()
            );
            tokio::time::sleep(POLL_GAP).await;
            let _ = tokio::time::timeout(POLL_TICK - POLL_GAP, events.recv()).await;
            while events.try_recv().is_ok() {}
        }
    }

    /// Reports the stages, in milliseconds since `from`, with `suffix` on each name.
    fn report(&self, from: Instant, suffix: &str) {
        let ms = |t: Instant| t.saturating_duration_since(from).as_secs_f64() * 1e3;
        let latest = |f: fn(&Progress) -> Option<Instant>| {
            self.progress.iter().filter_map(f).max().expect("complete")
        };
        let first_full = self
            .progress
            .iter()
            .filter_map(|p| p.full)
            .min()
            .expect("complete");
        report(
            &format!("list_ms{suffix}"),
            ms(self.list_ready.expect("done")),
        );
        report(&format!("pages_ms{suffix}"), ms(latest(|p| p.page)));
        report(&format!("full_ms{suffix}"), ms(latest(|p| p.full)));
        report(&format!("first_full_ms{suffix}"), ms(first_full));
    }

    fn report_polls(&self) {
        let mut t = self.poll_times.clone();
        t.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        report("polls", t.len() as f64);
        report("poll_median_ms", ms(t[t.len() / 2]));
        report("poll_max_ms", ms(*t.last().expect("one poll")));
        report("poll_total_ms", ms(t.iter().sum()));
    }

    /// Reads every conversation in full and checks each message body: every message present,
    /// once, in order.
    async fn verify(&self, e: &Engine) {
        for (c, id) in self.ids.iter().enumerate() {
            let id = id.unwrap_or_else(|| panic!("{} never listed", conv_title(c)));
            let bodies = all_bodies(e, &id).await;
            assert_eq!(bodies.len(), self.w.msgs, "messages of {}", conv_title(c));
            for (i, b) in bodies.iter().enumerate() {
                assert!(
                    b.starts_with(&format!("{} ", body_tag(c, i))),
                    "{}: message {i} is {b:?}",
                    conv_title(c)
                );
            }
        }
    }
}

/// The tag a message body starts with (see [`body`]).
fn body_tag(c: usize, i: usize) -> String {
    format!("c{c} m{i}")
}

/// Number of messages in a conversation's history.
async fn count_all(e: &Engine, id: &ConversationId) -> usize {
    let mut n = 0;
    let mut before = None;
    loop {
        let page = e.history(id, before, WALK_PAGE).await.expect("page");
        n += page.messages.len();
        match page.next {
            Some(next) => before = Some(next),
            None => return n,
        }
    }
}

/// Every body of a conversation, oldest first.
async fn all_bodies(e: &Engine, id: &ConversationId) -> Vec<String> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = e.history(id, before, WALK_PAGE).await.expect("page");
        let next = page.next;
        pages.push(page);
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    pages
        .iter()
        .rev()
        .flat_map(|p| &p.messages)
        .map(|m| m.body.clone().unwrap_or_default())
        .collect()
}

/// Links a new device in `dir` the way [`LINK_ENV`] says, with the code or invitation the
/// parent passed: through the relay, or directly to A's device with no relay configured.
async fn link_new_device(link: Link, dir: &Path) -> Engine {
    match link {
        Link::Relay => {
            let relay: PeerAddr = roaming_child::env("ROAMING_RELAY")
                .parse()
                .expect("a relay address");
            let code = roaming_child::env("ROAMING_CODE");
            Engine::link(config(dir, "new", vec![relay]), &code, "new").await
        }
        Link::Direct => {
            let invite: DirectInvite = roaming_child::env("ROAMING_INVITE")
                .parse()
                .expect("an invitation");
            let mut c = config(dir, "new", Vec::new());
            c.direct = Some(direct_config(false));
            Engine::link_direct(c, &invite, "new").await
        }
    }
    .expect("link")
}

/// The child: links a new device with what the parent passed and times its cold start.
pub fn child_new_device() {
    let parse = |name: &str| -> usize {
        roaming_child::env(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    };
    let w = Workload {
        convs: parse("ROAMING_CONVS"),
        msgs: parse("ROAMING_MSGS"),
        timeout: Duration::from_secs(parse("ROAMING_TIMEOUT_S") as u64),
    };
    let link = Link::parse(&roaming_child::env(LINK_ENV));
    runtime().block_on(async move {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let start = Instant::now();
        let b = link_new_device(link, dir.path()).await;
        let linked = Instant::now();
        report("link_ms", (linked - start).as_secs_f64() * 1e3);
        let mut tracker = Tracker::new(w);
        tracker.run(&b, start).await;
        tracker.report(start, "");
        tracker.report(linked, "_after_link");
        tracker.report_polls();
        // The device has either a relay or a direct connection to A's device; what it got is
        // the sum over both kinds.
        let status = b.sync_status().await.expect("status");
        let relays = status
            .relays
            .iter()
            .map(|r| (r.bytes_received, r.bytes_sent));
        let peers = status
            .peers
            .iter()
            .map(|p| (p.bytes_received, p.bytes_sent));
        let (received, sent) = relays
            .chain(peers)
            .fold((0, 0), |(r, s), (r2, s2)| (r + r2, s + s2));
        report("bytes_received", received as f64);
        report("bytes_sent", sent as f64);
        report("snapshots_taken", status.snapshots_taken as f64);
        report_memory();
        tracker.verify(&b).await;
        report("peak_rss_after_verify_kb", memory_kb().0 as f64);
        b.shutdown().await;
    });
}

/// The offline catch-up: returns `catchup_ms` (reopen to every message present), `open_ms`
/// (until `Engine::open` returned), `bytes_received` and `setup_s`.
pub fn run_catchup(w: Workload) -> Metrics {
    runtime().block_on(async move {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let (relay, addr, a, p) = relay_and_two_accounts(dir.path(), false).await;
        let code = a.invite_device().await.expect("invite");
        let a2 = Engine::link(config(dir.path(), "a2", vec![addr.clone()]), &code, "a2")
            .await
            .expect("link");
        until_live(&a2).await;
        let chats = create_conversations(&a, &p, w.convs).await;
        until_listed(&a2, &chats, w.timeout).await;
        until_listed(&p, &chats, w.timeout).await;
        // The measured device goes offline; so does A's first device, which would otherwise
        // apply everything P writes on the same two cores.
        a2.shutdown().await;
        a.shutdown().await;
        let setup_s = write_history(&p, &chats, &w).await;

        let start = Instant::now();
        let a2 = Engine::open(config(dir.path(), "a2", vec![addr]))
            .await
            .expect("reopen");
        let opened = Instant::now();
        let mut tracker = Tracker::new(w);
        tracker.run(&a2, start).await;
        let full = tracker
            .progress
            .iter()
            .filter_map(|p| p.full)
            .max()
            .expect("complete");
        let poll_total: Duration = tracker.poll_times.iter().sum();
        tracker.verify(&a2).await;
        let status = a2.sync_status().await.expect("status");
        let mut m = Metrics::default();
        m.0.insert("catchup_ms".into(), (full - start).as_secs_f64() * 1e3);
        m.0.insert("open_ms".into(), (opened - start).as_secs_f64() * 1e3);
        m.0.insert(
            "list_ms".into(),
            (tracker.list_ready.expect("done") - start).as_secs_f64() * 1e3,
        );
        m.0.insert("poll_total_ms".into(), poll_total.as_secs_f64() * 1e3);
        m.0.insert(
            "bytes_received".into(),
            status.relays[0].bytes_received as f64,
        );
        m.0.insert("setup_s".into(), setup_s);
        a2.shutdown().await;
        p.shutdown().await;
        relay.shutdown().await;
        m
    })
}
