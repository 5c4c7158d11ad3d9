//! Helpers shared by the end-to-end tests: devices on temporary stores, waiting for events.

#![allow(dead_code)]

pub mod raw;

use std::path::Path;
use std::time::{Duration, Instant};

use roamsync::engine::{ConnectionState, Engine, EngineConfig, Event};
use roamsync::ids::{ConversationId, MessageId};
use roamsync::net::PeerAddr;
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::StorageKey;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// A relay in `dir/relay` on a free loopback port.
pub async fn relay(dir: &Path) -> Relay {
    Relay::start(RelayConfig::new(
        dir.join("relay"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("relay starts")
}

/// A device configuration in `dir`.
pub fn config(dir: &Path, name: &str, relay: &PeerAddr) -> EngineConfig {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    EngineConfig::new(dir.join(format!("{name}.db")), key, vec![relay.clone()])
}

/// Waits until every relay of `engine` is live.
pub async fn until_live(engine: &Engine) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let status = engine.sync_status().await.expect("status");
        if status
            .relays
            .iter()
            .all(|r| r.state == ConnectionState::Live)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("engine never got live");
}

/// A new account on a new device.
pub async fn account(dir: &Path, name: &str, relay: &PeerAddr) -> Engine {
    let e = Engine::create_account(config(dir, name, relay), name)
        .await
        .expect("account");
    until_live(&e).await;
    e
}

/// A device linked to `inviter`'s account.
pub async fn linked(dir: &Path, name: &str, relay: &PeerAddr, inviter: &Engine) -> Engine {
    let code = inviter.invite_device().await.expect("invite");
    let e = Engine::link(config(dir, name, relay), &code, name)
        .await
        .expect("link");
    until_live(&e).await;
    e
}

/// Waits for an event `want` accepts.
pub async fn wait_for(events: &mut Receiver<Event>, what: &str, want: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return,
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("events ended waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

/// Polls until `engine` lists `conversation`.
pub async fn until_listed(engine: &Engine, conversation: &ConversationId) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if engine
            .conversation_list()
            .await
            .expect("list")
            .iter()
            .any(|s| s.id == *conversation)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("conversation never listed");
}

/// Polls until `engine`'s history of `conversation` holds `count` messages; returns their ids.
pub async fn until_history(
    engine: &Engine,
    conversation: &ConversationId,
    count: usize,
) -> Vec<MessageId> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ids = all_ids(engine, conversation).await;
        if ids.len() >= count || Instant::now() > deadline {
            assert_eq!(ids.len(), count, "history length");
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message id of a conversation, oldest first.
pub async fn all_ids(engine: &Engine, conversation: &ConversationId) -> Vec<MessageId> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = match engine.history(conversation, before, 500).await {
            Ok(p) => p,
            Err(_) => return out,
        };
        let mut ids: Vec<MessageId> = page.messages.iter().map(|m| m.id).collect();
        ids.extend(out);
        out = ids;
        match page.next {
            Some(n) => before = Some(n),
            None => return out,
        }
    }
}

/// Polls until `engine` has nothing left to upload.
pub async fn until_uploaded(engine: &Engine) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if engine.sync_status().await.expect("status").pending_uploads == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("uploads never finished");
}
