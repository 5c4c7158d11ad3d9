//! One task per relay: connect, greet through the worker, move frames both ways, and reconnect
//! with exponential backoff and jitter when the connection ends. It holds no sync state: the
//! worker's session does, so a reconnect resumes from stored cursors and the outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use crate::engine::worker::{Input, MAX_RECEIVED_BYTES_QUEUED, NetEvent, Outgoing, Received};
use crate::net::{FramedRecv, FramedSend, Identity, NetError, PeerAddr, connect};
use crate::wire::frame::Frame;

/// First delay before a reconnect.
pub const BACKOFF_START_MS: u64 = 100;
/// Longest delay between reconnects.
pub const BACKOFF_MAX_MS: u64 = 10_000;
/// A connection that lasted this long resets the backoff; one that ended sooner (a relay that
/// refuses this device right after the handshake, say) keeps backing off.
pub const BACKOFF_RESET_AFTER_MS: u64 = 10_000;
/// QUIC application close code of a connection refused by the other side (its reason is the
/// close frame's text).
pub const REFUSED_CLOSE_CODE: u32 = 1;
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// The delay before reconnect attempt `attempt` (0-based): doubling from
/// [`BACKOFF_START_MS`] up to [`BACKOFF_MAX_MS`], then scaled by a jitter factor in [0.5, 1.5)
/// taken from `jitter` (a uniform u32), so devices that lost the same relay do not all come
/// back at once.
pub fn backoff_ms(attempt: u32, jitter: u32) -> u64 {
    let base = BACKOFF_START_MS
        .saturating_mul(1u64 << attempt.min(20))
        .min(BACKOFF_MAX_MS);
    let factor_per_mille = 500 + u64::from(jitter) * 1000 / (u64::from(u32::MAX) + 1);
    base * factor_per_mille / 1000
}

/// Bytes moved to and from one relay since the engine started, over all its connections: whole
/// frames (header included) and datagrams, not QUIC's own packet overhead. The connection task
/// counts; the worker reads the counts into [`crate::engine::RelayStatus`].
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    received: AtomicU64,
    sent: AtomicU64,
}

impl Traffic {
    /// Bytes received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes sent so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub(crate) fn jitter() -> u32 {
    let mut b = [0u8; 4];
    // Jitter needs no secrecy; a failure leaves it at zero (the shortest delay of the range).
    let _ = getrandom::fill(&mut b);
    u32::from_be_bytes(b)
}

/// Runs the connection to relay `index` until `stop` turns true.
pub(crate) async fn run(
    index: usize,
    relay: PeerAddr,
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    worker: mpsc::UnboundedSender<Input>,
    meters: Meters,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let result = tokio::select! {
            r = session(index, &relay, &identity, &endpoint, &worker, &meters, &mut attempt) => r,
            _ = stop.changed() => return,
        };
        let reason = match result {
            Ok(()) => "closed".to_owned(),
            Err(e) => e.to_string(),
        };
        let delay = backoff_ms(attempt, jitter());
        attempt = attempt.saturating_add(1);
        if worker
            .send(Input::Net(NetEvent::Disconnected {
                relay: index,
                reason,
                retry_in_ms: delay,
            }))
            .is_err()
        {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn session(
    index: usize,
    relay: &PeerAddr,
    identity: &Identity,
    endpoint: &quinn::Endpoint,
    worker: &mpsc::UnboundedSender<Input>,
    meters: &Meters,
    attempt: &mut u32,
) -> Result<(), NetError> {
    let conn = tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        connect(endpoint, identity, relay),
    )
    .await
    .map_err(|_| NetError::NoAddress {
        host: format!("{} (no answer in {CONNECT_TIMEOUT_MS} ms)", relay.host),
    })??;
    let (send, recv) = conn.open_bi().await.map_err(NetError::Connection)?;
    let connected_at = std::time::Instant::now();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outgoing>();
    if worker
        .send(Input::Net(NetEvent::Connected {
            relay: index,
            out: out_tx,
        }))
        .is_err()
    {
        return Ok(());
    }
    let result = pump(
        &conn,
        (send, recv),
        out_rx,
        worker,
        meters,
        |msg, held| {
            Input::Net(NetEvent::Message {
                relay: index,
                msg: Box::new(msg),
                held,
            })
        },
        |bytes| {
            Input::Net(NetEvent::Datagram {
                relay: index,
                bytes,
            })
        },
    )
    .await;
    if connected_at.elapsed() >= Duration::from_millis(BACKOFF_RESET_AFTER_MS) {
        *attempt = 0;
    }
    conn.close(0u32.into(), b"bye");
    result
}

/// Moves frames between one connection's stream and the worker until either side ends: what
/// the worker queues on `out_rx` is written; what arrives is handed over as `message(msg,
/// held)` (holding its share of the receive budget) and `datagram(bytes)`.
pub(crate) async fn pump(
    conn: &quinn::Connection,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    mut out_rx: mpsc::UnboundedReceiver<Outgoing>,
    worker: &mpsc::UnboundedSender<Input>,
    meters: &Meters,
    message: impl Fn(crate::wire::message::Message, Received) -> Input,
    datagram: impl Fn(Vec<u8>) -> Input,
) -> Result<(), NetError> {
    let (traffic, queue) = (&*meters.traffic, &meters.queue);
    let mut framed_send = FramedSend::new(send);
    let mut framed_recv = FramedRecv::new(recv);
    let writer_conn = conn.clone();
    let writer = async move {
        while let Some(out) = out_rx.recv().await {
            match out {
                Outgoing::Message(msg) => {
                    let bytes = Frame::Message(*msg).encode();
                    traffic.add_sent(bytes.len());
                    framed_send.send_encoded(&bytes).await?;
                }
                // A datagram that does not fit or finds no room is dropped: typing signals
                // are best effort.
                Outgoing::Datagram(bytes) => {
                    let len = bytes.len();
                    if writer_conn.send_datagram(bytes.into()).is_ok() {
                        traffic.add_sent(len);
                    }
                }
                Outgoing::Reconnect => return Ok(()),
                Outgoing::Close(reason) => {
                    // The reason travels in QUIC's CONNECTION_CLOSE, which the peer reads
                    // even if frames queued before it are lost.
                    writer_conn.close(REFUSED_CLOSE_CODE.into(), reason.as_bytes());
                    return Ok(());
                }
            }
        }
        Ok::<(), NetError>(())
    };
    let reader = async {
        let mut counted = 0;
        loop {
            let frame = framed_recv.recv().await?;
            let bytes = framed_recv.received_bytes() - counted;
            traffic.add_received(bytes);
            counted = framed_recv.received_bytes();
            match frame {
                Some(Frame::Message(msg)) => {
                    // Reading waits while the worker has the whole receive budget queued.
                    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
                    let permit = Arc::clone(queue)
                        .acquire_many_owned(queue_permits(bytes))
                        .await
                        .ok();
                    let held = Received {
                        bytes,
                        _permit: permit,
                    };
                    if worker.send(message(msg, held)).is_err() {
                        return Ok(());
                    }
                }
                Some(other) => {
                    tracing::debug!(frame = ?other.frame_type(), "ignored frame");
                }
                None => return Ok::<(), NetError>(()),
            }
        }
    };
    let datagrams = async {
        loop {
            let bytes = conn.read_datagram().await.map_err(NetError::Connection)?;
            traffic.add_received(bytes.len() as u64);
            if worker.send(datagram(bytes.to_vec())).is_err() {
                return Ok::<(), NetError>(());
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
        r = datagrams => r,
    }
}

/// Permits of the receive budget (one per KiB, see [`MAX_RECEIVED_BYTES_QUEUED`]) a message of
/// `bytes` holds; never more than the whole budget, so the largest message still gets through.
pub(crate) fn queue_permits(bytes: usize) -> u32 {
    let all = MAX_RECEIVED_BYTES_QUEUED / 1024;
    (bytes / 1024).clamp(1, all) as u32
}

/// What a connection task counts and holds to: its relay's traffic, and the receive budget all
/// of the engine's connections share.
pub(crate) struct Meters {
    /// Bytes moved to and from this relay.
    pub traffic: Arc<Traffic>,
    /// The receive budget.
    pub queue: Arc<Semaphore>,
}

/// The receive budget shared by an engine's connection tasks.
pub(crate) fn receive_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_RECEIVED_BYTES_QUEUED / 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        assert_eq!(backoff_ms(0, 0), BACKOFF_START_MS / 2);
        assert_eq!(backoff_ms(1, 0), BACKOFF_START_MS);
        assert_eq!(backoff_ms(30, 0), BACKOFF_MAX_MS / 2);
        assert!(backoff_ms(30, u32::MAX) < BACKOFF_MAX_MS * 3 / 2);
        assert!(backoff_ms(3, u32::MAX / 2) > backoff_ms(3, 0));
    }

    #[test]
    fn a_message_holds_its_share_of_the_receive_budget_and_never_more_than_all() {
        let all = (MAX_RECEIVED_BYTES_QUEUED / 1024) as u32;
        assert_eq!(queue_permits(0), 1);
        assert_eq!(queue_permits(100), 1);
        assert_eq!(queue_permits(64 * 1024), 64);
        assert_eq!(queue_permits(usize::MAX), all);
        // A full budget stops the reader until the worker drops what it holds.
        let budget = receive_budget();
        let held = Arc::clone(&budget)
            .try_acquire_many_owned(queue_permits(MAX_RECEIVED_BYTES_QUEUED))
            .expect("the whole budget");
        assert!(Arc::clone(&budget).try_acquire_many_owned(1).is_err());
        drop(held);
        assert!(Arc::clone(&budget).try_acquire_many_owned(1).is_ok());
    }
}
