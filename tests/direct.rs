//! Direct sync between devices with no relay in between: linking over a direct connection,
//! messages both ways, offline edits merging, forwarding to a relay once the author is gone,
//! strangers refused, members limited to what they share, and convergence with a relay in any
//! order of connection. Real QUIC on loopback.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::crypto::identity::DeviceSecret;
use roamsync::crypto::rng::SeedRng;
use roamsync::engine::{
    CatchUpStage, DirectConfig, Engine, EngineConfig, Event, REFUSED_CLOSE_CODE,
};
use roamsync::ids::{ConversationId, DeviceId, DocAddr};
use roamsync::net::discovery::DiscoveryConfig;
use roamsync::net::{NetError, PeerAddr};
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::StorageKey;
use roamsync::wire::frame::{ErrorCode, Frame};
use roamsync::wire::message::{DocVersion, Message};
use support::*;

/// A device configuration in `dir` with direct sync on, listening on a free loopback port, and
/// the given relays.
fn direct_config(dir: &Path, name: &str, relays: &[PeerAddr]) -> EngineConfig {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    let mut c = EngineConfig::new(dir.join(format!("{name}.db")), key, relays.to_vec());
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.direct = Some(DirectConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers: Vec::new(),
        // Tests say whom a device meets; the LAN discovery test turns it on.
        discovery: DiscoveryConfig {
            enabled: false,
            ..DiscoveryConfig::default()
        },
    });
    c
}

/// A new account on a device with direct sync on.
async fn direct_account(dir: &Path, name: &str, relays: &[PeerAddr]) -> Engine {
    let e = Engine::create_account(direct_config(dir, name, relays), name)
        .await
        .expect("account");
    if !relays.is_empty() {
        until_live(&e).await;
    }
    e
}

/// `engine`'s direct address on loopback.
fn here(engine: &Engine) -> PeerAddr {
    engine.direct_addr("127.0.0.1").expect("listening")
}

/// A device linked directly to `inviter`, with the given relays.
async fn linked_directly(dir: &Path, name: &str, inviter: &Engine, relays: &[PeerAddr]) -> Engine {
    let invite = inviter.invite_device_direct("127.0.0.1").await.unwrap();
    // The invitation travels as text (a QR code).
    let invite = invite.to_string().parse().unwrap();
    Engine::link_direct(direct_config(dir, name, relays), &invite, name)
        .await
        .expect("link directly")
}

/// Polls until `engine` has an accepted direct connection with `device`.
async fn until_peered(engine: &Engine, device: DeviceId) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let status = engine.sync_status().await.unwrap();
        if status
            .peers
            .iter()
            .any(|p| p.device == device && p.accepted)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no direct connection with {device:?}");
}

/// Every message of a conversation as (body, recalled), oldest first.
async fn texts(engine: &Engine, c: &ConversationId) -> Vec<(Option<String>, bool)> {
    let page = engine.history(c, None, 1_000).await.unwrap();
    page.messages
        .iter()
        .map(|m| (m.body.clone(), m.recalled))
        .collect()
}

/// Polls until `a` and `b` show the same history of `c` with `count` messages.
async fn until_same(a: &Engine, b: &Engine, c: &ConversationId, count: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (x, y) = (texts(a, c).await, texts(b, c).await);
        if x == y && x.len() == count {
            return;
        }
        if Instant::now() > deadline {
            panic!("histories differ:\n{x:?}\n{y:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_devices_with_no_relay_link_sync_both_ways_and_merge_offline_edits() {
    let dir = tempfile::tempdir().unwrap();
    let a = direct_account(dir.path(), "a", &[]).await;
    let chat = a.create_conversation("notes", &[]).await.unwrap();
    for i in 0..100 {
        a.send(&chat, &format!("a{i}")).await.unwrap();
    }
    let first = until_history(&a, &chat, 100).await[0];

    // Linked over a direct connection: the keys and then the whole history come from `a`.
    let b = linked_directly(dir.path(), "b", &a, &[]).await;
    let mut events = b.events();
    until_peered(&b, a.device()).await;
    wait_for(&mut events, "the direct catch-up to finish", |e| {
        matches!(e, Event::PeerCatchUp { progress, .. }
            if progress.stage == CatchUpStage::Done && progress.docs_done >= 3)
    })
    .await;
    until_listed(&b, &chat).await;
    until_same(&a, &b, &chat, 100).await;

    // Live both ways.
    b.send(&chat, "from b").await.unwrap();
    a.send(&chat, "from a").await.unwrap();
    until_same(&a, &b, &chat, 102).await;

    // Apart, each edits; together again, the edits merge.
    b.forget_peer(a.device()).await.unwrap();
    a.forget_peer(b.device()).await.unwrap();
    a.edit(&chat, &first, "edited on a").await.unwrap();
    b.send(&chat, "b offline").await.unwrap();
    let b_msg = until_history(&b, &chat, 103).await[102];
    b.recall(&chat, &b_msg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(texts(&a, &chat).await.len(), 102, "a is apart from b");
    b.connect_peer(here(&a)).await.unwrap();
    until_same(&a, &b, &chat, 103).await;
    let merged = texts(&a, &chat).await;
    assert_eq!(merged[0], (Some("edited on a".to_owned()), false));
    assert!(merged.iter().any(|(t, r)| *r && t.is_none()), "{merged:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Reads what a raw peer receives until `Done { req }`, or panics after [`WAIT`].
async fn until_done(client: &mut raw::Client, req: u32) -> Vec<Message> {
    let mut seen = Vec::new();
    loop {
        let m = client.next().await;
        if m == (Message::Done { req }) {
            return seen;
        }
        seen.push(m);
    }
}

/// The reason a raw peer was refused: an `Error` message, or the text of the connection's
/// close (which can overtake the messages before it, the device's hello included).
async fn refusal(client: &mut raw::Client) -> String {
    let mut next = tokio::time::timeout(WAIT, client.recv.recv()).await;
    if let Ok(Ok(Some(Frame::Message(Message::PeerHello { .. })))) = next {
        next = tokio::time::timeout(WAIT, client.recv.recv()).await;
    }
    match next.expect("an answer in time") {
        Ok(Some(Frame::Message(Message::Error { code, text, .. }))) => {
            assert_eq!(code, ErrorCode::UNAUTHORISED);
            text
        }
        Err(NetError::Read(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(close),
        ))) => {
            assert_eq!(close.error_code, REFUSED_CLOSE_CODE.into());
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_strangers_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = direct_account(dir.path(), "a", &[]).await;
    let chat = a.create_conversation("notes", &[]).await.unwrap();
    a.send(&chat, "private").await.unwrap();
    let mut a_events = a.events();

    // An engine of another account, sharing nothing with `a`, dials it.
    let stranger = direct_account(dir.path(), "s", &[]).await;
    let mut s_events = stranger.events();
    stranger.connect_peer(here(&a)).await.unwrap();
    wait_for(&mut s_events, "the stranger hearing it is refused", |e| {
        matches!(e, Event::PeerRefused { device, reason }
            if *device == a.device() && reason.contains("no conversation is shared"))
    })
    .await;
    wait_for(
        &mut a_events,
        "a refusing the stranger",
        |e| matches!(e, Event::PeerRefused { device, .. } if *device == stranger.device()),
    )
    .await;
    assert!(stranger.conversation_list().await.unwrap().is_empty());
    let status = a.sync_status().await.unwrap();
    assert!(!status.peers.iter().any(|p| p.accepted), "{status:?}");

    // At the protocol level (the dialling side speaks first): anything before an accepted
    // hello closes the connection, and a hello of an account sharing nothing is answered with
    // an error.
    let mut raw = raw::Client::connect(&here(&a), 77).await;
    let doc = DocAddr::Meta(chat).doc_id();
    raw.send(Message::PeerSync {
        req: 1,
        docs: vec![DocVersion {
            doc,
            held: Vec::new(),
        }],
    })
    .await;
    assert!(refusal(&mut raw).await.contains("before the hello"));
    let mut raw = raw::Client::connect(&here(&a), 78).await;
    let (account, entries) = (raw.account(), raw.log.entries().to_vec());
    raw.send(Message::PeerHello { account, entries }).await;
    let why = refusal(&mut raw).await;
    assert!(why.contains("no conversation is shared"), "{why}");
    a.shutdown().await;
    stranger.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_of_one_conversation_gets_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = direct_account(dir.path(), "a", std::slice::from_ref(&addr)).await;
    // Another account's device, speaking the protocol by hand: known to the relay, so `a`
    // can add it to a conversation.
    let mut member = raw::Client::connect(&addr, 41).await;
    member.sign_in().await;
    let shared = a
        .create_conversation("shared", &[member.account()])
        .await
        .unwrap();
    let private = a.create_conversation("private", &[]).await.unwrap();
    a.send(&shared, "for both").await.unwrap();
    a.send(&private, "for a alone").await.unwrap();

    // The same device, directly to `a`.
    // (Secrets do not clone: the same seed makes the same device.)
    let secret = DeviceSecret::generate(&mut SeedRng::from_seed([41; 32]));
    assert_eq!(secret.device_id(), member.secret.device_id());
    let log = member.log.clone();
    let mut direct = raw::Client::connect_as(&here(&a), secret, log).await;
    let (account, entries) = (direct.account(), direct.log.entries().to_vec());
    direct.send(Message::PeerHello { account, entries }).await;
    assert!(matches!(direct.next().await, Message::PeerHello { .. }));

    // It asks for everything it can name: the shared conversation, the private one and the
    // account document.
    let shared_docs = [
        DocAddr::Meta(shared).doc_id(),
        DocAddr::Segment(shared, 0).doc_id(),
    ];
    let other_docs = [
        DocAddr::Meta(private).doc_id(),
        DocAddr::Segment(private, 0).doc_id(),
        DocAddr::Account(a.account()).doc_id(),
    ];
    let docs = shared_docs
        .iter()
        .chain(&other_docs)
        .map(|doc| DocVersion {
            doc: *doc,
            held: Vec::new(),
        })
        .collect();
    direct.send(Message::PeerSync { req: 9, docs }).await;
    let seen = until_done(&mut direct, 9).await;
    let mut answered = Vec::new();
    for m in &seen {
        match m {
            Message::GroupUpdates { group, .. } => assert_eq!(*group, shared_docs[0]),
            Message::Envelopes { doc, items, .. } => {
                assert!(!items.is_empty());
                answered.push(*doc);
            }
            Message::Snapshot { doc, .. } => panic!("a snapshot of {doc:?} to another account"),
            Message::LogEntries { .. } | Message::PeerSync { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(answered.contains(&shared_docs[0]), "{seen:?}");
    assert!(answered.contains(&shared_docs[1]), "{seen:?}");
    assert!(
        answered.iter().all(|d| shared_docs.contains(d)),
        "{answered:?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_learnt_directly_reaches_the_relay_after_its_author_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let relay_addr = relay.addr();
    let at = relay.local_addr();
    let relays = std::slice::from_ref(&relay_addr);
    let a = direct_account(dir.path(), "a", relays).await;
    let chat = a.create_conversation("notes", &[]).await.unwrap();
    a.send(&chat, "before").await.unwrap();
    until_uploaded(&a).await;
    let b = linked_directly(dir.path(), "b", &a, relays).await;
    until_live(&b).await;
    until_peered(&b, a.device()).await;
    until_history(&b, &chat, 1).await;

    // The relay goes away; `a` writes, `b` hears it directly; then `a` is destroyed.
    relay.shutdown().await;
    a.send(&chat, "only b heard this").await.unwrap();
    until_history(&b, &chat, 2).await;
    a.shutdown().await;
    std::fs::remove_file(dir.path().join("a.db")).unwrap();

    // The relay comes back; `b` uploads what it learnt from `a`.
    let relay = Relay::start(RelayConfig::new(dir.path().join("relay"), at))
        .await
        .expect("relay restarts");
    until_live(&b).await;
    until_uploaded(&b).await;

    // A device that only ever talks to the relay reads it.
    let c = linked(dir.path(), "c", &relay_addr, &b).await;
    until_listed(&c, &chat).await;
    until_history(&c, &chat, 2).await;
    let page = c.history(&chat, None, 10).await.unwrap();
    assert_eq!(page.messages[1].body.as_deref(), Some("only b heard this"));
    b.shutdown().await;
    c.shutdown().await;
    relay.shutdown().await;
}

/// One connection the convergence test makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// Device `a` starts using the relay.
    RelayA,
    /// Device `b` starts using the relay.
    RelayB,
    /// `a` and `b` connect directly.
    Direct,
}

/// A free UDP port on loopback (bound and released; the engine binds it again).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A device configuration listening on a fixed loopback port, so that it can be reopened at
/// the same address.
fn fixed_config(
    dir: &Path,
    name: &str,
    port: u16,
    relays: &[PeerAddr],
    peers: &[PeerAddr],
) -> EngineConfig {
    let mut c = direct_config(dir, name, relays);
    if let Some(d) = &mut c.direct {
        d.listen = Some(([127, 0, 0, 1], port).into());
        d.peers = peers.to_vec();
    }
    c
}

/// Opens a stored device, retrying while its port is still held by the engine closed before.
async fn reopen(config: EngineConfig) -> Engine {
    let deadline = Instant::now() + WAIT;
    loop {
        match Engine::open(config.clone()).await {
            Ok(e) => return e,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "reopening");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopening failed: {e}"),
        }
    }
}

/// Two devices of one account write while apart, then connect in `order` (each writing after
/// every step), and end up with the same history, whatever the order.
async fn converge_in_order(order: [Link; 3]) {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let r = [relay.addr()];
    let (pa, pb) = (free_port(), free_port());
    let a_cfg =
        |relays: &[PeerAddr], peers: &[PeerAddr]| fixed_config(dir.path(), "a", pa, relays, peers);
    let b_cfg =
        |relays: &[PeerAddr], peers: &[PeerAddr]| fixed_config(dir.path(), "b", pb, relays, peers);
    let mut a = Engine::create_account(a_cfg(&[], &[]), "a").await.unwrap();
    let chat = a.create_conversation("notes", &[]).await.unwrap();
    a.send(&chat, "a0").await.unwrap();
    let invite = a.invite_device_direct("127.0.0.1").await.unwrap();
    let b = Engine::link_direct(b_cfg(&[], &[]), &invite, "b")
        .await
        .unwrap();
    until_history(&b, &chat, 1).await;
    let b_addr = PeerAddr {
        key: b.device(),
        host: "127.0.0.1".into(),
        port: pb,
    };
    b.shutdown().await;

    // Apart: no relay, no direct connection.
    let mut b = reopen(b_cfg(&[], &[])).await;
    a.send(&chat, "a apart").await.unwrap();
    b.send(&chat, "b apart").await.unwrap();
    // Who dials whom once they are connected directly: `a` dials `b`, also after reopening.
    let mut peers: Vec<PeerAddr> = Vec::new();
    for step in order {
        match step {
            Link::RelayA => {
                a.shutdown().await;
                a = reopen(a_cfg(&r, &peers)).await;
            }
            Link::RelayB => {
                b.shutdown().await;
                b = reopen(b_cfg(&r, &[])).await;
            }
            Link::Direct => {
                peers = vec![b_addr.clone()];
                a.connect_peer(b_addr.clone()).await.unwrap();
            }
        }
        a.send(&chat, &format!("a after {step:?}")).await.unwrap();
        b.send(&chat, &format!("b after {step:?}")).await.unwrap();
    }
    until_same(&a, &b, &chat, 3 + 2 * 3).await;
    let (la, lb) = (
        a.conversation_list().await.unwrap(),
        b.conversation_list().await.unwrap(),
    );
    assert_eq!(la, lb);
    // The relay holds it all too: a device that only talks to it reads the same.
    let c = linked(dir.path(), "c", &r[0], &a).await;
    until_listed(&c, &chat).await;
    until_same(&a, &c, &chat, 3 + 2 * 3).await;
    for e in [a, b, c] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_relay_a_relay_b_direct() {
    converge_in_order([Link::RelayA, Link::RelayB, Link::Direct]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_relay_a_direct_relay_b() {
    converge_in_order([Link::RelayA, Link::Direct, Link::RelayB]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_relay_b_relay_a_direct() {
    converge_in_order([Link::RelayB, Link::RelayA, Link::Direct]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_relay_b_direct_relay_a() {
    converge_in_order([Link::RelayB, Link::Direct, Link::RelayA]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_direct_relay_a_relay_b() {
    converge_in_order([Link::Direct, Link::RelayA, Link::RelayB]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn converges_direct_relay_b_relay_a() {
    converge_in_order([Link::Direct, Link::RelayB, Link::RelayA]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_of_one_account_find_each_other_on_the_lan() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let relays = [relay.addr()];
    // A multicast group of this test's own, on loopback.
    let lan = DiscoveryConfig {
        enabled: true,
        group: std::net::SocketAddrV4::new(
            [239, 255, 77, 78].into(),
            40_000 + (std::process::id() % 20_000) as u16,
        ),
        interface: [127, 0, 0, 1].into(),
        interval_ms: 200,
    };
    let on_lan = |name: &str| {
        let mut c = direct_config(dir.path(), name, &relays);
        if let Some(d) = &mut c.direct {
            d.discovery = lan.clone();
        }
        c
    };
    let a = Engine::create_account(on_lan("a"), "a").await.unwrap();
    until_live(&a).await;
    let code = a.invite_device().await.unwrap();
    let b = Engine::link(on_lan("b"), &code, "b").await.unwrap();
    until_live(&b).await;
    // Another account on the same LAN: it hears the announcements but they are not its own.
    let other = Engine::create_account(on_lan("o"), "o").await.unwrap();

    // No addresses given: they find each other and connect directly.
    until_peered(&a, b.device()).await;
    until_peered(&b, a.device()).await;
    // With the relay gone, messages still flow.
    relay.shutdown().await;
    let chat = a.create_conversation("lan", &[]).await.unwrap();
    a.send(&chat, "over the lan").await.unwrap();
    until_listed(&b, &chat).await;
    until_history(&b, &chat, 1).await;
    let status = other.sync_status().await.unwrap();
    assert!(status.peers.is_empty(), "{status:?}");
    for e in [a, b, other] {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_of_two_accounts_chat_directly_and_see_only_what_they_share() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let relays = [relay.addr()];
    let a = direct_account(dir.path(), "a", &relays).await;
    let b = direct_account(dir.path(), "b", &relays).await;
    let shared = a
        .create_conversation("shared", &[b.account()])
        .await
        .unwrap();
    let private = a.create_conversation("a alone", &[]).await.unwrap();
    a.send(&private, "not for b").await.unwrap();
    until_listed(&b, &shared).await;

    // The relay goes away; they meet directly.
    relay.shutdown().await;
    b.connect_peer(here(&a)).await.unwrap();
    until_peered(&a, b.device()).await;
    a.send(&shared, "from a").await.unwrap();
    b.send(&shared, "from b").await.unwrap();
    until_same(&a, &b, &shared, 2).await;
    // A conversation created while they are connected reaches the member at once.
    let later = a
        .create_conversation("later", &[b.account()])
        .await
        .unwrap();
    a.send(&later, "new").await.unwrap();
    until_listed(&b, &later).await;
    until_history(&b, &later, 1).await;
    let listed: Vec<_> = b.conversation_list().await.unwrap();
    assert!(listed.iter().all(|s| s.id != private), "{listed:?}");
    assert!(b.history(&private, None, 10).await.is_err());
    a.shutdown().await;
    b.shutdown().await;
}
