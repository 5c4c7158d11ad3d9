//! Two accounts with two devices each, syncing live through a relay over QUIC.
//!
//! The relay runs in this process on its embedded default storage (SQLite in a temporary
//! folder), exactly as `relay-node` would run it. Alice creates an account on her phone and links
//! her laptop with a code; Bob does the same with his phone and tablet. Then a message, an edit,
//! a reaction, read state and a draft reach every device that should see them, Bob's tablet goes
//! offline while Alice keeps writing, and catches up when it comes back. Last, with the relay
//! gone, Alice links a tablet directly to her laptop, which hands it the history, and the two
//! keep syncing with no relay at all.
//!
//! Every device keeps its replica in its own encrypted SQLite store; the relay only ever holds
//! sealed envelopes.
//!
//! Run with `cargo run --example quickstart`.

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::engine::{CatchUpStage, DirectConfig, Engine, EngineConfig, Event};
use roamsync::ids::ConversationId;
use roamsync::net::PeerAddr;
use roamsync::net::discovery::DiscoveryConfig;
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::StorageKey;
use tokio::sync::broadcast::Receiver;

/// How long the demo waits for anything to arrive before it calls it a failure.
const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &Path, name: &str, relay: &PeerAddr) -> EngineConfig {
    // A real app keeps the storage key in the OS keystore.
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    EngineConfig::new(dir.join(format!("{name}.db")), key, vec![relay.clone()])
}

/// Waits for the first event `want` accepts; panics (this is a demo) after [`WAIT`].
async fn wait_for(events: &mut Receiver<Event>, what: &str, want: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event stream ended while waiting for {what}: {e}"),
            Err(_) => panic!("nothing arrived for {what} within {WAIT:?}"),
        }
    }
}

/// Polls until `engine` lists `conversation`.
async fn wait_listed(engine: &Engine, conversation: &ConversationId) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let list = engine.conversation_list().await.expect("list");
        if list.iter().any(|s| s.id == *conversation) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("conversation never arrived");
}

async fn link(dir: &Path, name: &str, relay: &PeerAddr, inviter: &Engine) -> Engine {
    let code = inviter.invite_device().await.expect("invite");
    println!("  {name}: linking with code {code}");
    Engine::link(config(dir, name, relay), &code, name)
        .await
        .expect("link")
}

async fn until_connected(engine: &Engine) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let status = engine.sync_status().await.expect("status");
        if status
            .relays
            .iter()
            .all(|r| r.state == roamsync::engine::ConnectionState::Live)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never connected");
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let relay = Relay::start(RelayConfig::new(
        dir.path().join("relay"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("the relay starts");
    let addr = relay.addr();
    println!("relay listening on {addr}");

    println!("accounts and devices:");
    let alice_phone =
        Engine::create_account(config(dir.path(), "alice-phone", &addr), "alice-phone")
            .await
            .expect("alice's account");
    until_connected(&alice_phone).await;
    let alice_laptop = link(dir.path(), "alice-laptop", &addr, &alice_phone).await;
    let bob_phone = Engine::create_account(config(dir.path(), "bob-phone", &addr), "bob-phone")
        .await
        .expect("bob's account");
    until_connected(&bob_phone).await;
    let bob_tablet = link(dir.path(), "bob-tablet", &addr, &bob_phone).await;
    for e in [&alice_laptop, &bob_tablet] {
        until_connected(e).await;
    }
    println!(
        "  alice {} has {} devices, bob {} has {}",
        alice_phone.account(),
        alice_phone.devices().await.unwrap().len(),
        bob_phone.account(),
        bob_phone.devices().await.unwrap().len()
    );

    let chat = alice_phone
        .create_conversation("lunch", &[bob_phone.account()])
        .await
        .expect("a conversation");
    for (name, e) in [
        ("alice-laptop", &alice_laptop),
        ("bob-phone", &bob_phone),
        ("bob-tablet", &bob_tablet),
    ] {
        wait_listed(e, &chat).await;
        println!("  {name} sees the conversation");
    }

    println!("a message, live:");
    let mut others: Vec<(&str, &Engine, Receiver<Event>)> = [
        ("alice-laptop", &alice_laptop),
        ("bob-phone", &bob_phone),
        ("bob-tablet", &bob_tablet),
    ]
    .into_iter()
    .map(|(n, e)| (n, e, e.events()))
    .collect();
    let sent_at = Instant::now();
    let hello = alice_phone
        .send(&chat, "noon at the usual place?")
        .await
        .unwrap();
    for (name, _, events) in others.iter_mut() {
        wait_for(
            events,
            "the message",
            |e| matches!(e, Event::MessageReceived { id, .. } if *id == hello),
        )
        .await;
        println!("  {name} got it after {:?}", sent_at.elapsed());
    }

    println!("an edit and a reaction:");
    alice_phone
        .edit(&chat, &hello, "noon at the usual place? (the new one)")
        .await
        .unwrap();
    for (name, _, events) in others.iter_mut() {
        wait_for(
            events,
            "the edit",
            |e| matches!(e, Event::MessageEdited { id, .. } if *id == hello),
        )
        .await;
        println!("  {name} shows the edit");
    }
    let mut alice_events = alice_phone.events();
    bob_phone.react(&chat, &hello, "👍", true).await.unwrap();
    wait_for(&mut alice_events, "the reaction", |e| {
        matches!(e, Event::ReactionsChanged { .. })
    })
    .await;
    let msg = alice_phone.message(&chat, &hello).await.unwrap();
    println!(
        "  alice-phone: {:?} reactions {:?}",
        msg.body.unwrap_or_default(),
        msg.reactions
    );

    println!("read state and drafts across one account's devices:");
    println!(
        "  bob-tablet unread before: {}",
        bob_tablet.unread_count(&chat).await.unwrap()
    );
    bob_phone.mark_read(&chat, &hello).await.unwrap();
    wait_for(&mut others[2].2, "read state", |e| {
        matches!(e, Event::ReadStateChanged { .. })
    })
    .await;
    println!(
        "  bob-tablet unread after bob-phone read it: {}",
        bob_tablet.unread_count(&chat).await.unwrap()
    );
    alice_laptop.set_draft(&chat, "see you th").await.unwrap();
    let deadline = Instant::now() + WAIT;
    let draft = loop {
        let draft = alice_phone.draft(&chat).await.unwrap();
        if draft.is_some() || Instant::now() > deadline {
            break draft;
        }
        wait_for(&mut alice_events, "the draft", |e| {
            matches!(e, Event::ConversationListChanged)
        })
        .await;
    };
    println!("  alice-phone shows the draft typed on alice-laptop: {draft:?}");
    assert_eq!(draft.as_deref(), Some("see you th"));

    println!("bob-tablet goes offline; alice keeps writing:");
    drop(others);
    bob_tablet.shutdown().await;
    for text in [
        "the new one is on 5th street",
        "I booked a table",
        "for three",
    ] {
        alice_phone.send(&chat, text).await.unwrap();
    }
    let bob_tablet = Engine::open(config(dir.path(), "bob-tablet", &addr))
        .await
        .expect("reopen");
    let mut events = bob_tablet.events();
    until_connected(&bob_tablet).await;
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let page = bob_tablet.history(&chat, None, 50).await.unwrap();
        if page.messages.len() == 4 || Instant::now() > deadline {
            break page;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
    };
    println!("  bob-tablet, back online, reads:");
    for m in &page.messages {
        let who = if m.author == alice_phone.account() {
            "alice"
        } else {
            "bob"
        };
        println!("    {who}: {}", m.body.as_deref().unwrap_or("(recalled)"));
    }
    assert_eq!(page.messages.len(), 4, "the tablet caught up");
    let status = alice_phone.sync_status().await.unwrap();
    println!("alice-phone sync status: {status:?}");
    for e in [alice_phone, bob_phone, bob_tablet] {
        e.shutdown().await;
    }

    println!("no relay at all: alice's laptop turns direct sync on, the relay goes away,");
    println!("and alice links a tablet to the laptop directly:");
    relay.shutdown().await;
    alice_laptop.shutdown().await;
    let direct = |mut c: EngineConfig| {
        c.relays.clear();
        c.direct = Some(DirectConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            // The demo says whom to meet; on a LAN, devices of one account find each other.
            discovery: DiscoveryConfig {
                enabled: false,
                ..DiscoveryConfig::default()
            },
            ..DirectConfig::default()
        });
        c
    };
    let alice_laptop = Engine::open(direct(config(dir.path(), "alice-laptop", &addr)))
        .await
        .expect("reopen");
    let invite = alice_laptop
        .invite_device_direct("127.0.0.1")
        .await
        .expect("an invitation");
    println!("  alice-laptop shows a QR code of: {invite}");
    let tablet_config = direct(config(dir.path(), "alice-tablet", &addr));
    let alice_tablet = Engine::link_direct(tablet_config, &invite, "alice-tablet")
        .await
        .expect("linked directly");
    let mut events = alice_tablet.events();
    wait_for(&mut events, "the direct catch-up", |e| {
        if let Event::PeerCatchUp { progress, .. } = e {
            println!(
                "  alice-tablet: {:?}, {} of {} documents, {} bytes",
                progress.stage, progress.docs_done, progress.docs_total, progress.bytes
            );
            return progress.stage == CatchUpStage::Done && progress.docs_done >= 3;
        }
        false
    })
    .await;
    wait_listed(&alice_tablet, &chat).await;
    let page = alice_tablet.history(&chat, None, 50).await.unwrap();
    println!(
        "  alice-tablet reads {} messages of \"lunch\" with no relay",
        page.messages.len()
    );
    assert_eq!(page.messages.len(), 4, "the whole history came directly");
    let mut laptop_events = alice_laptop.events();
    let id = alice_tablet
        .send(&chat, "sent from the tablet, no relay")
        .await
        .unwrap();
    wait_for(
        &mut laptop_events,
        "the tablet's message on the laptop",
        |e| matches!(e, Event::MessageReceived { id: got, .. } if *got == id),
    )
    .await;
    println!("  alice-laptop got the tablet's message directly");
    let status = alice_laptop.sync_status().await.unwrap();
    println!(
        "  alice-laptop: {} upload(s) wait for a relay; direct peers: {:?}",
        status.pending_uploads,
        status.peers.iter().map(|p| &p.addr).collect::<Vec<_>>()
    );
    for e in [alice_laptop, alice_tablet] {
        e.shutdown().await;
    }
    println!("done");
}
