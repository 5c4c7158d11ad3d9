//! Connections: the accept loop, and per connection a reader (frames and datagrams into the
//! actor's channel) and a writer (queued answers and pushes onto the stream).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use quinn::VarInt;
use tokio::sync::{Notify, mpsc, watch};

use crate::ids::DeviceId;
use crate::net::{FramedRecv, FramedSend, NetError};
use crate::relay::core::{ConnId, Input};
use crate::relay::limits::{
    ANSWER_HIGH_WATERMARK, CLOSE_LINGER_MS, FIRST_STREAM_TIMEOUT_MS, PUSH_QUEUE_DEPTH,
};
use crate::wire::frame::{ErrorCode, Frame, WireError};
use crate::wire::message::Message;

/// What the connections tell the actor.
// Messages are by far the most common event and are moved once; boxing them would cost an
// allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Event {
    /// A connection opened its stream.
    Connected {
        /// Its number.
        conn: ConnId,
        /// Its device.
        device: DeviceId,
        /// Its queues.
        tx: ConnTx,
    },
    /// Anything else, for the core.
    Input(Input),
}

/// What a connection's writer does next.
// Answers are by far the most common command; see `Event`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum WriterCmd {
    /// Write an answer.
    Answer(Message),
    /// Write what was queued before, then close the connection.
    Close { code: ErrorCode, reason: String },
}

/// The sending side of one connection: its answer queue (unbounded, never dropped, with
/// backpressure on the connection's reader), its push queue (bounded; a connection that
/// overflows it is aborted) and the QUIC connection for datagrams and aborts.
#[derive(Clone, Debug)]
pub(super) struct ConnTx {
    answers: mpsc::UnboundedSender<WriterCmd>,
    pushes: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    conn: quinn::Connection,
}

impl ConnTx {
    /// Queues an answer; false if the connection's writer is gone.
    pub fn answer(&self, msg: Message) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.answers.send(WriterCmd::Answer(msg)).is_ok()
    }

    /// Queues a push; false if it was dropped (queue full or writer gone).
    pub fn push(&self, msg: Message) -> bool {
        self.pushes.try_send(msg).is_ok()
    }

    /// Sends a datagram, best effort.
    pub fn datagram(&self, bytes: Vec<u8>) {
        let _ = self.conn.send_datagram(bytes.into());
    }

    /// Closes the connection after what is queued.
    pub fn close(&self, code: ErrorCode, reason: String) {
        let _ = self.answers.send(WriterCmd::Close { code, reason });
    }

    /// Closes the QUIC connection at once, discarding what is queued or unsent. For a
    /// connection that fell behind: its writer may be blocked by flow control, so a queued
    /// close would never run.
    pub fn abort(&self, code: ErrorCode, reason: &str) {
        let reason = reason.as_bytes();
        self.conn.close(
            VarInt::from_u32(u32::from(code.0)),
            &reason[..reason.len().min(MAX_CLOSE_REASON_BYTES)],
        );
    }

    /// Waits while the connection has more than [`ANSWER_HIGH_WATERMARK`] answers queued.
    pub async fn wait_for_room(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.queued.load(Ordering::Relaxed) <= ANSWER_HIGH_WATERMARK
                || self.answers.is_closed()
            {
                return;
            }
            drained.await;
        }
    }
}

/// Accepts connections until `shutdown`; a failed handshake is logged and the loop goes on.
pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
    next_conn: Arc<AtomicU64>,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let conn = ConnId(next_conn.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(serve(
            conn,
            incoming,
            events.clone(),
            shutdown.clone(),
            alive.clone(),
        ));
    }
}

/// Serves one connection from handshake to close.
async fn serve(
    id: ConnId,
    incoming: quinn::Incoming,
    events: mpsc::Sender<Event>,
    shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let remote = incoming.remote_address();
    let (conn, device) = match crate::net::accept(incoming).await {
        Ok(accepted) => accepted,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let opened = tokio::time::timeout(
        Duration::from_millis(FIRST_STREAM_TIMEOUT_MS),
        conn.accept_bi(),
    )
    .await;
    let (send, recv) = match opened {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::info!(conn = id.0, %device, %remote, error = %e, "connection ended before its stream");
            return;
        }
        Err(_) => {
            tracing::info!(conn = id.0, %device, %remote, "no stream opened in time; closing");
            conn.close(
                VarInt::from_u32(u32::from(ErrorCode::MALFORMED.0)),
                b"no stream",
            );
            return;
        }
    };
    tracing::info!(conn = id.0, %device, %remote, "connection open");
    let (answers_tx, answers_rx) = mpsc::unbounded_channel();
    let (pushes_tx, pushes_rx) = mpsc::channel(PUSH_QUEUE_DEPTH);
    let tx = ConnTx {
        answers: answers_tx,
        pushes: pushes_tx,
        queued: Arc::new(AtomicUsize::new(0)),
        drained: Arc::new(Notify::new()),
        conn: conn.clone(),
    };
    tokio::spawn(write_loop(
        FramedSend::new(send),
        answers_rx,
        pushes_rx,
        WriterState {
            queued: Arc::clone(&tx.queued),
            drained: Arc::clone(&tx.drained),
            conn: conn.clone(),
            _alive: alive,
        },
    ));
    let connected = Event::Connected {
        conn: id,
        device,
        tx: tx.clone(),
    };
    if events.send(connected).await.is_err() {
        return;
    }
    // The connection is the core's until it is closed: a device may finish its stream and still
    // wait for answers. A shutdown closes every connection itself.
    let reading = async {
        let reason = read_frames(id, FramedRecv::new(recv), &events, &tx).await;
        tracing::debug!(conn = id.0, %reason, "stopped reading");
        conn.closed().await;
        reason
    };
    let reason = tokio::select! {
        r = reading => r,
        r = read_datagrams(id, &conn, &events) => r,
        _ = wait_for_stop(shutdown) => return,
    };
    tracing::info!(conn = id.0, %device, %reason, "connection closed");
    let _ = events
        .send(Event::Input(Input::Disconnected { conn: id }))
        .await;
}

async fn wait_for_stop(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Forwards frames to the actor until the stream ends; returns why it ended.
async fn read_frames(
    id: ConnId,
    mut recv: FramedRecv,
    events: &mpsc::Sender<Event>,
    tx: &ConnTx,
) -> String {
    loop {
        tx.wait_for_room().await;
        match recv.recv().await {
            Ok(Some(Frame::Message(msg))) => {
                let input = Event::Input(Input::Message { conn: id, msg });
                if events.send(input).await.is_err() {
                    return "relay stopping".to_owned();
                }
            }
            // A device reporting an error needs no answer.
            Ok(Some(Frame::Error { code, message })) => {
                tracing::debug!(conn = id.0, ?code, %message, "device reported an error");
            }
            Ok(Some(other)) => {
                tx.answer(Message::Error {
                    req: 0,
                    code: ErrorCode::MALFORMED,
                    text: format!(
                        "frame type {:?} is not used on relay connections; send protocol messages",
                        other.frame_type()
                    ),
                });
            }
            Ok(None) => return "stream finished".to_owned(),
            Err(NetError::Wire(e)) => return refuse_frame(id, tx, code_of(&e), e.to_string()),
            Err(e @ NetError::TruncatedFrame { .. }) => {
                return refuse_frame(id, tx, ErrorCode::MALFORMED, e.to_string());
            }
            Err(e) => return e.to_string(),
        }
    }
}

/// The error code for an undecodable frame.
fn code_of(e: &WireError) -> ErrorCode {
    match e {
        WireError::FrameTooLarge { .. } | WireError::BufferFull { .. } => ErrorCode::TOO_LARGE,
        _ => ErrorCode::MALFORMED,
    }
}

/// The stream lost its framing: say why, then close the connection.
fn refuse_frame(id: ConnId, tx: &ConnTx, code: ErrorCode, detail: String) -> String {
    tracing::warn!(conn = id.0, ?code, %detail, "undecodable frame; closing the connection");
    let text = format!("undecodable frame ({detail}); closing the connection");
    tx.answer(Message::Error {
        req: 0,
        code,
        text: text.clone(),
    });
    tx.close(code, text.clone());
    text
}

/// Forwards datagrams to the actor, dropping them when it is busy (they are best effort).
async fn read_datagrams(
    id: ConnId,
    conn: &quinn::Connection,
    events: &mpsc::Sender<Event>,
) -> String {
    loop {
        match conn.read_datagram().await {
            Ok(bytes) => {
                let input = Event::Input(Input::Datagram {
                    conn: id,
                    bytes: bytes.to_vec(),
                });
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(input) {
                    return "relay stopping".to_owned();
                }
            }
            Err(e) => return e.to_string(),
        }
    }
}

/// What a connection's writer shares with its [`ConnTx`]s.
struct WriterState {
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    conn: quinn::Connection,
    /// Held while the writer runs, so a shutdown can wait for every writer.
    _alive: mpsc::Sender<()>,
}

/// Writes answers (first) and pushes until told to close or until nobody can queue more.
async fn write_loop(
    mut send: FramedSend,
    mut answers: mpsc::UnboundedReceiver<WriterCmd>,
    mut pushes: mpsc::Receiver<Message>,
    state: WriterState,
) {
    let WriterState {
        queued,
        drained,
        conn,
        _alive,
    } = state;
    loop {
        let (msg, is_answer) = tokio::select! {
            biased;
            cmd = answers.recv() => match cmd {
                Some(WriterCmd::Answer(msg)) => (msg, true),
                Some(WriterCmd::Close { code, reason }) => {
                    close(send, &conn, code, &reason).await;
                    return;
                }
                // Nobody can queue more: the connection is over.
                None => {
                    close(send, &conn, ErrorCode(0), "connection ended").await;
                    return;
                }
            },
            Some(msg) = pushes.recv() => (msg, false),
        };
        let written = send.send(&Frame::Message(msg)).await;
        if is_answer {
            queued.fetch_sub(1, Ordering::Relaxed);
            drained.notify_waiters();
        }
        if written.is_err() {
            // The connection is gone; its reader reports it.
            drained.notify_waiters();
            return;
        }
    }
}

/// Finishes the stream and closes the connection once the peer has had a moment to read what
/// was sent: a peer that reads the stream to its end closes the connection itself (closing it
/// first could discard data the peer received but had not read yet).
async fn close(mut send: FramedSend, conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    let _ = send.finish();
    let stream = send.into_inner();
    let linger = async {
        let _ = stream.stopped().await;
        conn.closed().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), linger).await;
    let reason = reason.as_bytes();
    conn.close(
        VarInt::from_u32(u32::from(code.0)),
        &reason[..reason.len().min(MAX_CLOSE_REASON_BYTES)],
    );
}

/// Longest close reason sent (it must fit in one packet).
const MAX_CLOSE_REASON_BYTES: usize = 256;
