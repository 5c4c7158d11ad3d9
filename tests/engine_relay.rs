//! End to end on loopback: device engines and a real relay over QUIC.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roamsync::engine::{ConnectionState, Engine, Event};
use roamsync::net::PeerAddr;
use roamsync::relay::server::{Relay, RelayConfig};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_reaches_every_device_of_both_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a1 = account(dir.path(), "a1", &addr).await;
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    let b1 = account(dir.path(), "b1", &addr).await;
    let b2 = linked(dir.path(), "b2", &addr, &b1).await;
    let chat = a1
        .create_conversation("chat", &[b1.account()])
        .await
        .unwrap();
    for e in [&a2, &b1, &b2] {
        until_listed(e, &chat).await;
    }
    let mut evs: Vec<_> = [&a2, &b1, &b2].iter().map(|e| e.events()).collect();
    let m = a1.send(&chat, "hello all").await.unwrap();
    for ev in evs.iter_mut() {
        wait_for(
            ev,
            "message",
            |e| matches!(e, Event::MessageReceived { id, .. } if *id == m),
        )
        .await;
    }
    // Both ways, and an edit, a recall and a reaction.
    let mut a_evs = a1.events();
    let r = b2.send(&chat, "hi from the tablet").await.unwrap();
    wait_for(
        &mut a_evs,
        "reply",
        |e| matches!(e, Event::MessageReceived { id, .. } if *id == r),
    )
    .await;
    b2.react(&chat, &m, "🎉", true).await.unwrap();
    wait_for(
        &mut a_evs,
        "reaction",
        |e| matches!(e, Event::ReactionsChanged { id, .. } if *id == m),
    )
    .await;
    a2.edit(&chat, &m, "hello everyone").await.unwrap();
    wait_for(
        &mut evs[1],
        "edit",
        |e| matches!(e, Event::MessageEdited { id, .. } if *id == m),
    )
    .await;
    a1.recall(&chat, &m).await.unwrap();
    wait_for(
        &mut evs[2],
        "recall",
        |e| matches!(e, Event::MessageRecalled { id, .. } if *id == m),
    )
    .await;
    let seen = b2.message(&chat, &m).await.unwrap();
    assert!(seen.recalled && seen.body.is_none());
    // Typing is forwarded, not stored.
    a1.set_typing(&chat, true).await.unwrap();
    wait_for(&mut evs[1], "typing", |e| {
        matches!(e, Event::Typing { typing: true, .. })
    })
    .await;
    // Every device shows the same history.
    let want = until_history(&a1, &chat, 2).await;
    for e in [&a2, &b1, &b2] {
        assert_eq!(until_history(e, &chat, 2).await, want);
    }
    for e in [a1, a2, b1, b2] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_status_counts_the_bytes_each_way() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    let chat = a.create_conversation("c", &[b.account()]).await.unwrap();
    until_listed(&b, &chat).await;
    async fn traffic(e: &Engine) -> (u64, u64) {
        let s = e.sync_status().await.unwrap();
        (s.relays[0].bytes_sent, s.relays[0].bytes_received)
    }
    let (a_sent, a_received) = traffic(&a).await;
    let (b_sent, b_received) = traffic(&b).await;
    assert!(a_sent > 0 && a_received > 0 && b_sent > 0 && b_received > 0);
    // 20,000 hex digits: at least 10,000 bytes even if the change is compressed.
    let text: String = (0..625u32)
        .map(|i| blake3::hash(&i.to_le_bytes()).to_hex().to_string())
        .collect::<String>()[..20_000]
        .to_owned();
    a.send(&chat, &text).await.unwrap();
    until_uploaded(&a).await;
    until_history(&b, &chat, 1).await;
    let (a_sent_after, _) = traffic(&a).await;
    let (_, b_received_after) = traffic(&b).await;
    assert!(
        a_sent_after - a_sent >= 10_000,
        "{a_sent} -> {a_sent_after}"
    );
    assert!(
        b_received_after - b_received >= 10_000,
        "{b_received} -> {b_received_after}"
    );
    a.shutdown().await;
    b.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_catches_up_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let b1 = account(dir.path(), "b1", &addr).await;
    let b2 = linked(dir.path(), "b2", &addr, &b1).await;
    let chat = a.create_conversation("c", &[b1.account()]).await.unwrap();
    until_listed(&b2, &chat).await;
    b2.shutdown().await;
    for i in 0..200 {
        a.send(&chat, &format!("message {i}")).await.unwrap();
    }
    b1.set_draft(&chat, "draft while b2 is away").await.unwrap();
    until_uploaded(&a).await;
    until_uploaded(&b1).await;
    let b2 = Engine::open(config(dir.path(), "b2", &addr)).await.unwrap();
    until_live(&b2).await;
    let got = until_history(&b2, &chat, 200).await;
    assert_eq!(got, until_history(&a, &chat, 200).await);
    let deadline = Instant::now() + WAIT;
    while b2.draft(&chat).await.unwrap().as_deref() != Some("draft while b2 is away") {
        assert!(Instant::now() < deadline, "draft never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b2.unread_count(&chat).await.unwrap(), 200);
    for e in [a, b1, b2] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

/// B's device is offline while A removes B from a conversation; offline, B writes to it. When
/// B comes back it is told it was removed, its offline messages are reported as not delivered
/// and leave the outbox (nothing is offered again), and it reads nothing A wrote afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_offline_is_told_and_its_offline_writes_are_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    let b_account = b.account();
    let chat = a.create_conversation("c", &[b_account]).await.unwrap();
    until_listed(&b, &chat).await;
    let before = a.send(&chat, "before").await.unwrap();
    until_history(&b, &chat, 1).await;
    b.shutdown().await;
    a.remove_member(&chat, b_account).await.unwrap();
    until_uploaded(&a).await;
    // B writes while offline: its relay address leads nowhere.
    let nowhere = PeerAddr {
        port: free_port(),
        ..addr.clone()
    };
    let b = Engine::open(config(dir.path(), "b", &nowhere))
        .await
        .unwrap();
    let offline = [
        b.send(&chat, "offline 1").await.unwrap(),
        b.send(&chat, "offline 2").await.unwrap(),
    ];
    assert!(b.sync_status().await.unwrap().pending_uploads > 0);
    b.shutdown().await;
    let after = a.send(&chat, "after the removal").await.unwrap();
    until_uploaded(&a).await;

    let b = Engine::open(config(dir.path(), "b", &addr)).await.unwrap();
    let mut events = b.events();
    wait_for(
        &mut events,
        "the removal",
        |e| matches!(e, Event::RemovedFromConversation { conversation } if *conversation == chat),
    )
    .await;
    wait_for(&mut events, "the undelivered report", |e| {
        matches!(e, Event::NotDelivered { conversation, envelopes } if *conversation == chat && *envelopes > 0)
    })
    .await;
    until_live(&b).await;
    until_uploaded(&b).await;
    // Nothing is offered again: once the first connection's answers are in, the relay
    // refuses nothing more (the outbox is offered every second).
    tokio::time::sleep(Duration::from_millis(500)).await;
    while events.try_recv().is_ok() {}
    let quiet_until = Instant::now() + Duration::from_millis(2_500);
    while let Ok(Ok(e)) = tokio::time::timeout_at(quiet_until.into(), events.recv()).await {
        assert!(!matches!(e, Event::RelayError { .. }), "{e:?}");
    }
    assert_eq!(b.sync_status().await.unwrap().pending_uploads, 0);
    // B holds what it had and wrote, and nothing A wrote after the removal.
    let held = all_ids(&b, &chat).await;
    assert!(held.contains(&before), "{held:?}");
    assert!(offline.iter().all(|m| held.contains(m)), "{held:?}");
    assert!(!held.contains(&after), "{held:?}");
    // A never got B's offline messages.
    let a_held = all_ids(&a, &chat).await;
    assert!(offline.iter().all(|m| !a_held.contains(m)), "{a_held:?}");
    for e in [a, b] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

/// B creates a conversation with A while offline, with a copy of A's device log from before A
/// linked a second device, so the group's key is wrapped to A's first device only. Once B
/// uploads it, A's first device (the new one's keeper) wraps the key to the second, which then
/// reads the conversation; before that fix it never could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_after_a_member_fetched_the_log_still_gets_the_conversation_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a1 = account(dir.path(), "a1", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    // B learns A's log (one device) through a first conversation.
    let first = b
        .create_conversation("first", &[a1.account()])
        .await
        .unwrap();
    until_listed(&a1, &first).await;
    b.shutdown().await;
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    until_listed(&a2, &first).await;
    // B, offline, creates a second conversation with its old copy of A's log.
    let nowhere = PeerAddr {
        port: free_port(),
        ..addr.clone()
    };
    let b = Engine::open(config(dir.path(), "b", &nowhere))
        .await
        .unwrap();
    let second = b
        .create_conversation("second", &[a1.account()])
        .await
        .unwrap();
    let hello = b
        .send(&second, "written before B knew of a2")
        .await
        .unwrap();
    b.shutdown().await;
    let b = Engine::open(config(dir.path(), "b", &addr)).await.unwrap();
    until_uploaded(&b).await;
    until_history(&a1, &second, 1).await;
    until_history(&a2, &second, 1).await;
    assert!(all_ids(&a2, &second).await.contains(&hello));
    // And a2 reads what is written afterwards.
    let later = b.send(&second, "and later").await.unwrap();
    until_history(&a2, &second, 2).await;
    assert!(all_ids(&a2, &second).await.contains(&later));
    for e in [a1, a2, b] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

/// A relay-node process on a fixed port, so a restart keeps the address.
struct Node {
    child: Child,
    addr: PeerAddr,
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_node(data: &std::path::Path, port: u16) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay-node"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay-node starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("relay-node printed {line:?}"));
    Node { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_loses_nothing_acknowledged_and_devices_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let port = free_port();
    let mut node = start_node(&data, port);
    let addr = node.addr.clone();
    let a = account(dir.path(), "a", &addr).await;
    let b = account(dir.path(), "b", &addr).await;
    let chat = a.create_conversation("c", &[b.account()]).await.unwrap();
    until_listed(&b, &chat).await;
    let total = 300;
    for i in 0..total {
        a.send(&chat, &format!("m{i}")).await.unwrap();
        if i == total / 2 {
            // SIGKILL mid-traffic: no graceful shutdown.
            node.child.kill().unwrap();
            node.child.wait().unwrap();
        }
    }
    let t = Instant::now();
    let restarted = start_node(&data, port);
    eprintln!("restart took {:?}", t.elapsed());
    assert_eq!(restarted.addr, addr, "the relay keeps its key and address");
    // Nobody is told: both devices reconnect by themselves, the outbox is flushed again
    // (the relay deduplicates), and B pulls what it missed.
    until_uploaded(&a).await;
    eprintln!("uploaded after {:?}", t.elapsed());
    let got = until_history(&b, &chat, total).await;
    eprintln!("b caught up after {:?}", t.elapsed());
    assert_eq!(got, until_history(&a, &chat, total).await);
    a.shutdown().await;
    b.shutdown().await;
    let mut restarted = restarted;
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a1 = account(dir.path(), "a1", &addr).await;
    let a2 = linked(dir.path(), "a2", &addr, &a1).await;
    let chat = a1.create_conversation("notes", &[]).await.unwrap();
    until_listed(&a2, &chat).await;
    let mut a2_events = a2.events();
    a1.revoke_device(a2.device()).await.unwrap();
    // The live connection is closed by the relay, and every reconnect is refused.
    wait_for(&mut a2_events, "disconnect", |e| {
        matches!(e, Event::Sync(s) if s.relays.iter().all(|r| matches!(r.state, ConnectionState::Offline { .. })))
    })
    .await;
    let sneaky = a2.send(&chat, "written after revocation").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids = all_ids(&a1, &chat).await;
    assert!(
        !ids.contains(&sneaky),
        "a revoked device's message reached the account"
    );
    let status = a2.sync_status().await.unwrap();
    assert_eq!(status.pending_uploads, 1, "nothing was accepted from it");
    assert!(
        status
            .relays
            .iter()
            .all(|r| r.state != ConnectionState::Live)
    );
    for e in [a1, a2] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinning_the_wrong_relay_key_never_connects() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let mut wrong = relay.addr();
    wrong.key = roamsync::ids::DeviceId::from_bytes(*blake3::hash(b"someone else").as_bytes());
    let secret = roamsync::crypto::identity::DeviceSecret::generate(
        &mut roamsync::crypto::rng::SeedRng::from_seed([3; 32]),
    );
    let identity = roamsync::net::Identity::from_device(&secret).unwrap();
    let endpoint = roamsync::net::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let err = tokio::time::timeout(WAIT, roamsync::net::connect(&endpoint, &identity, &wrong))
        .await
        .expect("fails fast")
        .expect_err("a wrong pinned key must not connect");
    assert!(
        matches!(
            err,
            roamsync::net::NetError::PeerKey(roamsync::net::PeerKeyError::WrongKey { .. })
        ),
        "{err}"
    );
    // An engine pinned to the wrong key stays offline.
    let e = Engine::create_account(config(dir.path(), "x", &wrong), "x")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = e.sync_status().await.unwrap();
    assert!(
        status
            .relays
            .iter()
            .all(|r| r.state != ConnectionState::Live)
    );
    e.shutdown().await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_relays_either_one_carries_the_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let r1 = Relay::start(RelayConfig::new(
        dir.path().join("r1"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let r2 = Relay::start(RelayConfig::new(
        dir.path().join("r2"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let (addr1, local1) = (r1.addr(), r1.local_addr());
    let both = |name: &str| {
        let mut c = config(dir.path(), name, &addr1);
        c.relays.push(r2.addr());
        c
    };
    let a = Engine::create_account(both("a"), "a").await.unwrap();
    let b = Engine::create_account(both("b"), "b").await.unwrap();
    until_live(&a).await;
    until_live(&b).await;
    let chat = a.create_conversation("c", &[b.account()]).await.unwrap();
    until_listed(&b, &chat).await;
    until_uploaded(&a).await;
    // Relay 1 goes away: relay 2 alone carries the next message.
    r1.shutdown().await;
    let mut b_events = b.events();
    let m = a.send(&chat, "through the other relay").await.unwrap();
    wait_for(
        &mut b_events,
        "message",
        |e| matches!(e, Event::MessageReceived { id, .. } if *id == m),
    )
    .await;
    assert_eq!(
        a.sync_status().await.unwrap().pending_uploads,
        1,
        "relay 1 has not acknowledged it yet"
    );
    // Relay 1 comes back at the same address: the outbox drains to it by itself.
    let r1 = Relay::start(RelayConfig::new(dir.path().join("r1"), local1))
        .await
        .unwrap();
    until_uploaded(&a).await;
    assert_eq!(all_ids(&b, &chat).await, vec![m]);
    a.shutdown().await;
    b.shutdown().await;
    r1.shutdown().await;
    r2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_outbox_drains_once_the_relay_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start(RelayConfig::new(
        dir.path().join("r"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let (addr, local) = (r.addr(), r.local_addr());
    let a = account(dir.path(), "a", &addr).await;
    let notes = a.create_conversation("notes", &[]).await.unwrap();
    until_uploaded(&a).await;
    r.shutdown().await;
    // More envelopes than may be in flight at once, each its own commit.
    let total = roamsync::engine::MAX_APPENDS_IN_FLIGHT + 300;
    for i in 0..total {
        a.send(&notes, &format!("offline {i}")).await.unwrap();
    }
    assert!(a.sync_status().await.unwrap().pending_uploads >= total);
    let r = Relay::start(RelayConfig::new(dir.path().join("r"), local))
        .await
        .unwrap();
    until_uploaded(&a).await;
    // Another device of the account reads them all from the relay.
    let a2 = linked(dir.path(), "a2", &addr, &a).await;
    until_history(&a2, &notes, total).await;
    a.shutdown().await;
    a2.shutdown().await;
    r.shutdown().await;
}
