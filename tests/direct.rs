//! Direct sync between devices with no relay in between: linking over a direct connection,
//! messages both ways, offline edits merging, forwarding to a relay once the author is gone,
//! strangers refused, members limited to what they share, and convergence with a relay in any
//! order of connection. Real QUIC on loopback.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::engine::{CatchUpStage, DirectConfig, Engine, EngineConfig, Event};
use roamsync::ids::{ConversationId, DeviceId};
use roamsync::net::PeerAddr;
use roamsync::store::StorageKey;
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
        if status.peers.iter().any(|p| p.device == device && p.accepted) {
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
