//! Direct connections between devices, with no relay: a listener for incoming ones and one task
//! per peer address dialled (reconnecting with the relay connections' backoff). Like `conn`, the
//! tasks hold no sync state: they authenticate the TLS key, tell the worker who is on the other
//! end, and move frames; the worker decides what the peer may see (`worker/peers.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use crate::engine::conn::{
    BACKOFF_RESET_AFTER_MS, CONNECT_TIMEOUT_MS, Meters, REFUSED_CLOSE_CODE, Traffic, backoff_ms,
    jitter, pump,
};
use crate::engine::worker::{Input, NetEvent, Outgoing};
use crate::ids::DeviceId;
use crate::net::discovery::{
    Discovered, DiscoveryAccount, DiscoveryConfig, DiscoveryHandle, spawn_discovery,
};
use crate::net::{Identity, NetError, PeerAddr, accept, connect};

/// Numbers each direct connection, so the worker tells a reconnect from the connection before.
static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

fn next_link() -> u64 {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

/// Accepts direct connections on `endpoint` until `stop` turns true: each one that completes
/// the handshake (the peer proved its device key) is handed to the worker, which refuses
/// devices it does not share anything with.
pub(crate) async fn listen(
    endpoint: quinn::Endpoint,
    worker: mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.changed() => return,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let (worker, queue, stop) = (worker.clone(), Arc::clone(&queue), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = inbound(incoming, &worker, queue, stop).await {
                tracing::debug!(error = %e, "incoming direct connection failed");
            }
        });
    }
}

async fn inbound(
    incoming: quinn::Incoming,
    worker: &mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NetError> {
    let (conn, device) = accept(incoming).await?;
    let streams = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), conn.accept_bi())
        .await
        .map_err(|_| NetError::NoAddress {
            host: format!(
                "{} (no stream in {CONNECT_TIMEOUT_MS} ms)",
                conn.remote_address()
            ),
        })?
        .map_err(NetError::Connection)?;
    let addr = conn.remote_address().to_string();
    let result = tokio::select! {
        r = session(&conn, streams, device, addr, true, worker, queue) => r,
        _ = stop.changed() => Ok(()),
    };
    conn.close(0u32.into(), b"bye");
    result
}

/// Runs one link: tells the worker it is up, pumps frames, tells the worker it ended.
async fn session(
    conn: &quinn::Connection,
    streams: (quinn::SendStream, quinn::RecvStream),
    device: DeviceId,
    addr: String,
    inbound: bool,
    worker: &mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
) -> Result<(), NetError> {
    let link = next_link();
    let traffic: Arc<Traffic> = Arc::default();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let up = NetEvent::PeerConnected {
        link,
        device,
        addr,
        inbound,
        out: out_tx,
        traffic: Arc::clone(&traffic),
    };
    if worker.send(Input::Net(up)).is_err() {
        return Ok(());
    }
    let meters = Meters { traffic, queue };
    let result = pump(
        conn,
        streams,
        out_rx,
        worker,
        &meters,
        |msg, held| {
            Input::Net(NetEvent::PeerMessage {
                link,
                msg: Box::new(msg),
                held,
            })
        },
        |bytes| Input::Net(NetEvent::PeerDatagram { link, bytes }),
    )
    .await;
    let closed = conn.close_reason();
    let refused = match &closed {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(REFUSED_CLOSE_CODE) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    };
    let reason = match (&result, closed) {
        (_, Some(closed)) => closed.to_string(),
        (Err(e), None) => e.to_string(),
        (Ok(()), None) => "closed".to_owned(),
    };
    let _ = worker.send(Input::Net(NetEvent::PeerGone {
        link,
        reason,
        refused,
    }));
    result
}

/// Keeps a direct connection to `peer` until `stop` turns true: connects (pinning its device
/// key), and after the connection ends, connects again after a backoff.
pub(crate) async fn dial(
    peer: PeerAddr,
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    worker: mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = dial_once(&peer, &identity, &endpoint, &worker, Arc::clone(&queue)) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = &result {
            tracing::debug!(peer = %peer, error = %e, "direct connection failed");
        }
        if worker.is_closed() {
            return;
        }
        if started.elapsed() >= Duration::from_millis(BACKOFF_RESET_AFTER_MS) {
            attempt = 0;
        }
        let delay = backoff_ms(attempt, jitter());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn dial_once(
    peer: &PeerAddr,
    identity: &Identity,
    endpoint: &quinn::Endpoint,
    worker: &mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
) -> Result<(), NetError> {
    let conn = tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        connect(endpoint, identity, peer),
    )
    .await
    .map_err(|_| NetError::NoAddress {
        host: format!("{} (no answer in {CONNECT_TIMEOUT_MS} ms)", peer.host),
    })??;
    let streams = conn.open_bi().await.map_err(NetError::Connection)?;
    let addr = conn.remote_address().to_string();
    let result = session(&conn, streams, peer.key, addr, false, worker, queue).await;
    conn.close(0u32.into(), b"bye");
    result
}

/// Starts LAN discovery announcing `port`; what it hears goes to the worker, which dials the
/// devices of this account it does not have a connection with. `None` (logged) if the socket
/// cannot be set up or this device does not hold the account key yet: direct sync still works
/// with addresses given to it.
pub(crate) fn discover(
    config: DiscoveryConfig,
    own: DeviceId,
    port: u16,
    accounts: watch::Receiver<DiscoveryAccount>,
    worker: mpsc::UnboundedSender<Input>,
) -> Option<DiscoveryHandle> {
    let (found_tx, mut found_rx) = mpsc::unbounded_channel::<Discovered>();
    let handle = match spawn_discovery(config, own, port, accounts, found_tx) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "LAN discovery is off");
            return None;
        }
    };
    tokio::spawn(async move {
        while let Some(d) = found_rx.recv().await {
            let found = NetEvent::Discovered {
                device: d.device,
                addr: d.addr,
            };
            if worker.send(Input::Net(found)).is_err() {
                return;
            }
        }
    });
    Some(handle)
}
