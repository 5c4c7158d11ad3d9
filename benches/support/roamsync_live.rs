//! The roamsync side of the live benchmark: two devices of two accounts and a relay on
//! loopback, over real QUIC, the relay on its embedded SQLite storage with `synchronous=FULL`,
//! both devices on their own encrypted stores.
//!
//! Latency is measured from just before `send` is called on A (so it includes A's durable
//! local commit, sealing and signing) to the `MessageReceived` event on B (after B verified,
//! decrypted, applied and stored the change). Sends are paced by an absolute schedule and not
//! awaited one by one, as an app's UI would not; sends queued together are committed together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roamsync::engine::{ConnectionState, Engine, EngineConfig, Event};
use roamsync::ids::MessageId;
use roamsync::net::PeerAddr;
use roamsync::relay::server::{Relay, RelayConfig};
use roamsync::store::{Durability, StorageKey};

use super::samod_live::{LiveConfig, LiveResult};

/// How long B may take after the last send before missing messages count as lost.
const DRAIN: Duration = Duration::from_secs(10);
/// Sends of the history prefill in flight at once.
const PREFILL_WINDOW: usize = 1_000;

fn config(
    dir: &std::path::Path,
    name: &str,
    relay: &PeerAddr,
    durability: Durability,
) -> EngineConfig {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    let mut c = EngineConfig::new(dir.join(format!("{name}.db")), key, vec![relay.clone()]);
    c.store.durability = durability;
    c
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

fn body(i: u32, len: usize) -> String {
    let mut s = format!("message {i} ");
    while s.len() < len {
        s.push('x');
    }
    s
}

/// Runs the workload on roamsync and reports what B saw. `durability` applies to both devices
/// and the relay: `Full` waits for the disk at every commit (the default and the honest
/// figure), `Normal` does not (durable across a process crash, not a power loss) and shows
/// what the protocol costs without the disk.
pub fn run_roamsync_live(cfg: &LiveConfig, durability: Durability) -> LiveResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(run(*cfg, durability))
}

async fn run(cfg: LiveConfig, durability: Durability) -> LiveResult {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut relay_config =
        RelayConfig::new(dir.path().join("relay"), "127.0.0.1:0".parse().unwrap());
    relay_config.durability = durability;
    let relay = Relay::start(relay_config).await.expect("relay");
    let addr = relay.addr();
    let a = Arc::new(
        Engine::create_account(config(dir.path(), "a", &addr, durability), "a")
            .await
            .expect("a"),
    );
    let b = Engine::create_account(config(dir.path(), "b", &addr, durability), "b")
        .await
        .expect("b");
    until_live(&a).await;
    until_live(&b).await;
    let mut events = b.events();
    let chat = a
        .create_conversation("live", &[b.account()])
        .await
        .expect("conversation");

    // History, synced to B before measuring.
    let mut sent_history = 0u32;
    while sent_history < cfg.history {
        let n = (cfg.history - sent_history).min(PREFILL_WINDOW as u32);
        let sends = (0..n).map(|i| {
            let a = a.clone();
            let text = body(sent_history + i, cfg.body_bytes);
            tokio::spawn(async move { a.send(&chat, &text).await.expect("send") })
        });
        for s in sends.collect::<Vec<_>>() {
            s.await.expect("task");
        }
        sent_history += n;
    }
    // Every history message is unread on B (it never reads): the count says when B has them all.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = b.unread_count(&chat).await.unwrap_or(0);
        if n >= u64::from(cfg.history) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history never reached B ({n}/{})",
            cfg.history
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Events of the history are not part of the measurement.
    while events.try_recv().is_ok() {}

    // Measured run.
    let received: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let want = cfg.messages as usize;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = {
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(Event::MessageReceived { id, .. }) => {
                            received.lock().expect("lock").insert(id, Instant::now());
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            panic!("the benchmark's event reader lagged by {n}")
                        }
                        Err(_) => return,
                    },
                    _ = &mut stop_rx => return,
                }
            }
        })
    };
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(cfg.rate_per_s));
    let mut sends = Vec::with_capacity(want);
    for i in 0..cfg.messages {
        tokio::time::sleep_until((start + interval * i).into()).await;
        let a = a.clone();
        let text = body(cfg.history + i, cfg.body_bytes);
        sends.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let id = a.send(&chat, &text).await.expect("send");
            (id, t0, t0.elapsed())
        }));
    }
    let mut sent = Vec::with_capacity(want);
    let mut send_times = Vec::with_capacity(want);
    for s in sends {
        let (id, t0, took) = s.await.expect("task");
        sent.push((id, t0));
        send_times.push(took);
    }
    send_times.sort();
    if let Some(median) = send_times.get(send_times.len() / 2) {
        eprintln!(
            "roamsync live: the durable send call took {median:?} (median) at {} msg/s",
            cfg.rate_per_s
        );
    }
    let last_send = Instant::now();
    // Wait until B holds every measured message, or the drain window ends.
    while last_send.elapsed() < DRAIN {
        let done = {
            let r = received.lock().expect("lock");
            sent.iter().all(|(id, _)| r.contains_key(id))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop_tx.send(());
    listener.await.expect("the event reader");
    let received = received.lock().expect("lock").clone();
    let latencies: Vec<Option<u64>> = sent
        .iter()
        .map(|(id, t0)| {
            received
                .get(id)
                .map(|t| t.saturating_duration_since(*t0).as_micros() as u64)
        })
        .collect();
    let bounds: Vec<u64> = sent
        .iter()
        .map(|(_, t0)| {
            (last_send + DRAIN)
                .saturating_duration_since(*t0)
                .as_micros() as u64
        })
        .collect();
    let end = received
        .values()
        .max()
        .copied()
        .unwrap_or(last_send + DRAIN);
    let result =
        LiveResult::from_latencies(&latencies, &bounds, end.saturating_duration_since(start));
    if let Ok(a) = Arc::try_unwrap(a) {
        a.shutdown().await;
    }
    b.shutdown().await;
    relay.shutdown().await;
    result
}
