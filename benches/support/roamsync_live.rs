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
use roamsync::store::StorageKey;

use super::samod_live::{LiveConfig, LiveResult};

/// How long B may take after the last send before missing messages count as lost.
const DRAIN: Duration = Duration::from_secs(10);
/// Sends of the history prefill in flight at once.
const PREFILL_WINDOW: usize = 1_000;

fn config(dir: &std::path::Path, name: &str, relay: &PeerAddr) -> EngineConfig {
    let key = StorageKey::from_bytes(*blake3::hash(name.as_bytes()).as_bytes());
    EngineConfig::new(dir.join(format!("{name}.db")), key, vec![relay.clone()])
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

/// Runs the workload on roamsync and reports what B saw.
pub fn run_roamsync_live(cfg: &LiveConfig) -> LiveResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(run(*cfg))
}

async fn run(cfg: LiveConfig) -> LiveResult {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let relay = Relay::start(RelayConfig::new(
        dir.path().join("relay"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("relay");
    let addr = relay.addr();
    let a = Arc::new(
        Engine::create_account(config(dir.path(), "a", &addr), "a")
            .await
            .expect("a"),
    );
    let b = Engine::create_account(config(dir.path(), "b", &addr), "b")
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
    let mut seen = 0u32;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < cfg.history {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Ok(Event::MessageReceived { .. })) => seen += 1,
            // Skipped events during a large prefill are (almost all) messages.
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                seen += u32::try_from(n).unwrap_or(u32::MAX)
            }
            Ok(_) => {}
            Err(_) => panic!("history never reached B ({seen}/{})", cfg.history),
        }
    }

    // Measured run.
    let received: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let want = cfg.messages as usize;
    let listener = {
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::MessageReceived { id, .. }) => {
                        let mut r = received.lock().expect("lock");
                        r.insert(id, Instant::now());
                        if r.len() >= want {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("the benchmark's event reader lagged by {n}")
                    }
                    Err(_) => return,
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
            (id, t0)
        }));
    }
    let mut sent = Vec::with_capacity(want);
    for s in sends {
        sent.push(s.await.expect("task"));
    }
    let last_send = Instant::now();
    let _ = tokio::time::timeout(DRAIN, listener).await;
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
