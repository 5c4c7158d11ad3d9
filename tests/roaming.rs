//! Roaming: a newly linked device reads the account's whole history, in catch-up order (the
//! conversation list, then every conversation's newest segment, then older ones), and ends up in
//! the same state as the device that wrote it; a device offline while many conversations moved
//! catches up on all of them. Real relay, real QUIC on loopback.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use roamsync::engine::{CatchUpStage, Engine, EngineConfig, Event};
use roamsync::ids::{ConversationId, MessageId};
use roamsync::model::ListFlag;
use roamsync::net::PeerAddr;
use support::*;
use tokio::sync::broadcast::error::RecvError;

/// Messages per segment on the writing device, small so conversations span several segments.
const SEGMENT_CAP: usize = 16;

fn small_segments(dir: &std::path::Path, name: &str, relay: &PeerAddr) -> EngineConfig {
    let mut c = config(dir, name, relay);
    c.store.model.segment_cap = SEGMENT_CAP;
    c
}

/// An account whose device writes small segments, live on `relay`.
async fn small_segment_account(dir: &std::path::Path, relay: &PeerAddr) -> Engine {
    let a = Engine::create_account(small_segments(dir, "a", relay), "a")
        .await
        .unwrap();
    until_live(&a).await;
    a
}

/// Collects `engine`'s events until its relay's catch-up is done (and a little after, so the
/// last applies are in).
async fn events_until_caught_up(engine: &Engine) -> Vec<Event> {
    let mut events = engine.events();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(e)) => {
                let done = matches!(
                    &e,
                    Event::CatchUp { progress, .. } if progress.stage == CatchUpStage::Done
                );
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Ok(Err(RecvError::Lagged(n))) => panic!("{n} events lost"),
            Ok(Err(e)) => panic!("events ended: {e}"),
            Err(_) => panic!("the catch-up never finished"),
        }
    }
}

/// The whole history of `conversation`, oldest first.
async fn full_history(
    engine: &Engine,
    conversation: &ConversationId,
) -> Vec<roamsync::model::Message> {
    let page = engine.history(conversation, None, 1_000).await.unwrap();
    assert!(page.next.is_none());
    page.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_device_reads_all_history_newest_segments_first() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = small_segment_account(dir.path(), &addr).await;
    let b = account(dir.path(), "b", &addr).await;

    // `long`: 70 messages over five segments; `third`: 20 over two; `short`: both accounts
    // write, edit, react and recall in one segment.
    let long = a.create_conversation("long", &[]).await.unwrap();
    let third = a
        .create_conversation("third", &[b.account()])
        .await
        .unwrap();
    let short = a
        .create_conversation("short", &[b.account()])
        .await
        .unwrap();
    let mut newest: HashMap<MessageId, ConversationId> = HashMap::new();
    for (conversation, count) in [(long, 70), (third, 20)] {
        let mut ids = Vec::new();
        for i in 0..count {
            ids.push(
                a.send(&conversation, &format!("message {i}"))
                    .await
                    .unwrap(),
            );
        }
        // The writer rolls over exactly at the cap: the last `count % cap` are the newest segment.
        for id in &ids[count - count % SEGMENT_CAP..] {
            newest.insert(*id, conversation);
        }
    }
    until_listed(&b, &short).await;
    let first = a.send(&short, "hello").await.unwrap();
    let second = a.send(&short, "to recall").await.unwrap();
    let reply = b.send(&short, "hi from b").await.unwrap();
    a.edit(&short, &first, "hello, edited").await.unwrap();
    a.recall(&short, &second).await.unwrap();
    until_history(&b, &short, 3).await;
    b.react(&short, &first, "👍", true).await.unwrap();
    a.set_draft(&short, "unsent words").await.unwrap();
    a.set_flag(&third, ListFlag::Pinned, true).await.unwrap();
    until_history(&a, &short, 3).await;
    a.mark_read(&short, &reply).await.unwrap();
    for id in [first, second, reply] {
        newest.insert(id, short);
    }
    until_uploaded(&b).await;
    // The reaction has reached `a` before the history is compared.
    let deadline = Instant::now() + WAIT;
    while a
        .message(&short, &first)
        .await
        .unwrap()
        .reactions
        .is_empty()
    {
        assert!(Instant::now() < deadline, "reaction never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_uploaded(&a).await;

    let code = a.invite_device().await.unwrap();
    let a2 = Engine::link(config(dir.path(), "a2", &addr), &code, "a2")
        .await
        .unwrap();
    let events = events_until_caught_up(&a2).await;

    // Progress: stages only move forward, and the last count is complete.
    let progress: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::CatchUp { progress, .. } => Some(*progress),
            _ => None,
        })
        .collect();
    assert!(progress.windows(2).all(|w| w[0].stage <= w[1].stage));
    let stages: Vec<CatchUpStage> = progress.iter().map(|p| p.stage).collect();
    for stage in [CatchUpStage::Recent, CatchUpStage::History] {
        assert!(stages.contains(&stage), "no {stage:?} stage in {stages:?}");
    }
    let last = progress.last().unwrap();
    assert_eq!(last.docs_done, last.docs_total);
    // Account, three metas, 5 + 2 + 1 segments.
    assert!(last.docs_total >= 12, "{last:?}");
    assert!(
        last.envelopes >= 95 && last.bytes > last.envelopes * 100,
        "{last:?}"
    );

    // Order: every message of a newest segment was reported before any older one.
    let received: Vec<MessageId> = events
        .iter()
        .filter_map(|e| match e {
            Event::MessageReceived { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(received.len(), 70 + 20 + 3, "every message reported once");
    let first_older = received
        .iter()
        .position(|id| !newest.contains_key(id))
        .expect("older messages");
    assert!(
        received[first_older..]
            .iter()
            .all(|id| !newest.contains_key(id)),
        "a newest-segment message came after older history"
    );

    // Same state as the writing device.
    until_live(&a2).await;
    for c in [long, third, short] {
        assert_eq!(full_history(&a2, &c).await, full_history(&a, &c).await);
    }
    let sorted = |mut l: Vec<roamsync::model::ConversationSummary>| {
        l.sort_by_key(|s| s.id);
        l
    };
    assert_eq!(
        sorted(a2.conversation_list().await.unwrap()),
        sorted(a.conversation_list().await.unwrap())
    );
    let status = a2.sync_status().await.unwrap();
    assert_eq!(status.relays[0].catch_up.stage, CatchUpStage::Done);
    for e in [a, a2, b] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_offline_while_many_conversations_moved_catches_up_on_all() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = account(dir.path(), "a", &addr).await;
    let a2 = linked(dir.path(), "a2", &addr, &a).await;
    let mut chats = Vec::new();
    for i in 0..8 {
        chats.push(a.create_conversation(&format!("c{i}"), &[]).await.unwrap());
    }
    for c in &chats {
        until_listed(&a2, c).await;
    }
    a2.shutdown().await;
    // 8 × 150 messages while a2 is away, sent concurrently (batched by the worker).
    let sends = chats.iter().flat_map(|c| {
        let a = &a;
        (0..150).map(move |i| async move { a.send(c, &format!("{i}")).await.unwrap() })
    });
    futures::future::join_all(sends).await;
    until_uploaded(&a).await;

    let a2 = Engine::open(config(dir.path(), "a2", &addr)).await.unwrap();
    let events = events_until_caught_up(&a2).await;
    let received = events
        .iter()
        .filter(|e| matches!(e, Event::MessageReceived { .. }))
        .count();
    assert_eq!(received, 8 * 150);
    for c in &chats {
        assert_eq!(all_ids(&a2, c).await, all_ids(&a, c).await);
        assert_eq!(
            a2.unread_count(c).await.unwrap(),
            0,
            "own account's messages"
        );
    }
    for e in [a, a2] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_reaching_past_what_arrived_fetches_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let a = small_segment_account(dir.path(), &addr).await;
    // 400 messages (25 segments) in one conversation, 2,000 (125) in another: the older
    // history takes a while to arrive.
    let mut chats = Vec::new();
    for (name, count) in [("long", 400), ("other", 2_000)] {
        let c = a.create_conversation(name, &[]).await.unwrap();
        let a = &a;
        let sends = (0..count).map(|i| async move { a.send(&c, &format!("{i}")).await.unwrap() });
        futures::future::join_all(sends).await;
        chats.push(c);
    }
    until_uploaded(&a).await;
    let code = a.invite_device().await.unwrap();
    let a2 = Engine::link(config(dir.path(), "a2", &addr), &code, "a2")
        .await
        .unwrap();
    // As soon as the conversation's meta document is in, the whole history is asked for: the
    // call fetches the segments it reaches before answering.
    let deadline = Instant::now() + WAIT;
    let page = loop {
        if let Ok(page) = a2.history(&chats[0], None, 1_000).await {
            break page;
        }
        assert!(Instant::now() < deadline, "the conversation never arrived");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(!page.incomplete);
    assert_eq!(page.messages.len(), 400);
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        all_ids(&a, &chats[0]).await
    );
    until_live(&a2).await;
    assert_eq!(all_ids(&a2, &chats[1]).await, all_ids(&a, &chats[1]).await);
    for e in [a, a2] {
        e.shutdown().await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segments_evicted_under_the_disk_budget_come_back_from_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(dir.path()).await;
    let addr = relay.addr();
    let mut cfg = small_segments(dir.path(), "a", &addr);
    // Room for a few segments: older ones are dropped from the disk as the history grows.
    cfg.store.disk_budget_bytes = Some(24 * 1024);
    // Segments held in memory are never evicted: keep only a couple loaded.
    cfg.store.cache_budget_bytes =
        4 * SEGMENT_CAP * roamsync::store::replica::BYTES_PER_LOADED_MESSAGE;
    let a = Engine::create_account(cfg, "a").await.unwrap();
    until_live(&a).await;
    let c = a.create_conversation("long", &[]).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..400 {
        sent.push(a.send(&c, &format!("message number {i}")).await.unwrap());
    }
    until_uploaded(&a).await;

    // Offline, a page answers with what is held and says more exists.
    let socket = relay.local_addr();
    relay.shutdown().await;
    let page = a.history(&c, None, 1_000).await.unwrap();
    assert!(page.incomplete, "nothing was evicted");
    let held: Vec<MessageId> = page.messages.iter().map(|m| m.id).collect();
    assert!(
        !held.is_empty() && held.len() < sent.len(),
        "{}",
        held.len()
    );
    assert!(sent.ends_with(&held), "the newest messages stay");

    // Back online, the same call fetches the evicted segments again and answers whole.
    let relay = roamsync::relay::server::Relay::start(roamsync::relay::server::RelayConfig::new(
        dir.path().join("relay"),
        socket,
    ))
    .await
    .unwrap();
    until_live(&a).await;
    let page = a.history(&c, None, 1_000).await.unwrap();
    assert!(!page.incomplete);
    assert_eq!(page.messages.iter().map(|m| m.id).collect::<Vec<_>>(), sent);
    for (i, m) in page.messages.iter().enumerate() {
        assert_eq!(
            m.body.as_deref(),
            Some(format!("message number {i}").as_str())
        );
    }
    a.shutdown().await;
    relay.shutdown().await;
}
