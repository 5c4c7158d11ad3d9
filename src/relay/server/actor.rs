//! The actor: the one task that owns the [`RelayCore`], feeds it events and executes its
//! outputs, and runs the graceful shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::RelayError;
use super::conn::{ConnTx, Event};
use super::storage::{self, ReaderPool, StoreEvent, StoreOp};
use crate::relay::core::{AuthRefusal, ConnId, Input, Output, RelayCore, RelayEvent};
use crate::relay::limits::SHUTDOWN_TIMEOUT_MS;
use crate::relay::store::RelayReader;
use crate::relay::writer::RelayWriter;
use crate::wire::frame::ErrorCode;
use crate::wire::message::Message;

/// Close code of connections closed by a shutdown: no error.
const SHUTDOWN_CLOSE_CODE: ErrorCode = ErrorCode(0);

/// What the actor runs with, besides the core.
pub(super) struct Parts {
    /// Events from connections.
    pub events: mpsc::Receiver<Event>,
    /// Turns true to stop.
    pub shutdown: watch::Receiver<bool>,
    /// The group-commit writer.
    pub writer: RelayWriter,
    /// Its thread.
    pub writer_thread: std::thread::JoinHandle<()>,
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// The accept loop.
    pub accept: JoinHandle<()>,
    /// Ends once every connection writer has.
    pub alive: mpsc::Receiver<()>,
}

/// Close reason of a connection that fell behind its pushes.
const LAGGED_REASON: &str = "lagged: the connection fell behind its pushes; reconnect and catch up";

/// The task that owns the core.
pub(super) struct Actor {
    core: RelayCore,
    conns: HashMap<ConnId, ConnTx>,
    readers: Arc<ReaderPool>,
    started: Instant,
    pipeline: Option<mpsc::UnboundedSender<StoreOp>>,
    reads: JoinSet<()>,
    /// Connections closed for falling behind their pushes (each counted once).
    lagged: u64,
}

impl Actor {
    pub fn new(core: RelayCore, readers: Vec<RelayReader>, started: Instant) -> Self {
        Self {
            core,
            conns: HashMap::new(),
            readers: Arc::new(ReaderPool::new(readers)),
            started,
            pipeline: None,
            reads: JoinSet::new(),
            lagged: 0,
        }
    }

    /// Serves until shutdown (or a failed durable write), then stops gracefully.
    pub async fn run(mut self, parts: Parts) -> Result<(), RelayError> {
        let Parts {
            mut events,
            mut shutdown,
            writer,
            writer_thread,
            endpoint,
            accept,
            mut alive,
        } = parts;
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (store_tx, mut store_rx) = mpsc::unbounded_channel();
        let pipeline = tokio::spawn(storage::pipeline(ops_rx, writer.clone(), store_tx));
        self.pipeline = Some(ops_tx);
        let mut failure = None;
        loop {
            tokio::select! {
                biased;
                ev = store_rx.recv() => match ev {
                    Some(ev) => {
                        if let Some(reason) = self.handle_store(ev) {
                            failure = Some(reason);
                            break;
                        }
                    }
                    None => {
                        failure = Some("the storage pipeline stopped".to_owned());
                        break;
                    }
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.handle_event(ev),
                    None => break,
                },
            }
            while self.reads.try_join_next().is_some() {}
        }

        // Graceful stop: no new connections or requests; appends in flight finish and are
        // acknowledged; then connections close and the store is flushed.
        tracing::info!(
            connections = self.conns.len(),
            stats = ?self.core.stats(),
            lagged_connections = self.lagged,
            "relay shutting down"
        );
        accept.abort();
        // Requests already read are still served; connections can queue no more.
        events.close();
        if failure.is_none() {
            while let Ok(ev) = events.try_recv() {
                self.handle_event(ev);
            }
        }
        drop(events);
        self.pipeline = None;
        while let Some(ev) = store_rx.recv().await {
            if let Some(reason) = self.handle_store(ev) {
                failure.get_or_insert(reason);
            }
        }
        let _ = pipeline.await;
        self.reads.abort_all();
        for (_, tx) in self.conns.drain() {
            tx.close(SHUTDOWN_CLOSE_CODE, "relay shutting down".to_owned());
        }
        let timeout = Duration::from_millis(SHUTDOWN_TIMEOUT_MS);
        if tokio::time::timeout(timeout, alive.recv()).await.is_err() {
            tracing::warn!("connections did not take their last answers in time");
        }
        if let Err(e) = writer.shutdown().await {
            failure.get_or_insert(e.to_string());
        }
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        endpoint.close(0u32.into(), b"relay shutting down");
        let _ = tokio::time::timeout(timeout, endpoint.wait_idle()).await;
        match failure {
            None => Ok(()),
            Some(reason) => Err(RelayError::StorageFailed { reason }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn handle_event(&mut self, ev: Event) {
        let input = match ev {
            Event::Connected { conn, device, tx } => {
                self.conns.insert(conn, tx);
                Input::Connected { conn, device }
            }
            Event::Input(input) => {
                if let Input::Disconnected { conn } = &input {
                    self.conns.remove(conn);
                }
                input
            }
        };
        let now_ms = self.now_ms();
        let outputs = self.core.handle(input, now_ms);
        self.execute(outputs);
    }

    /// Handles what the store side reports; returns why the relay must stop, if it must.
    fn handle_store(&mut self, ev: StoreEvent) -> Option<String> {
        match ev {
            StoreEvent::Stored {
                conn,
                req,
                doc,
                outcome,
            } => {
                let now_ms = self.now_ms();
                let input = Input::EnvelopeStored {
                    conn,
                    req,
                    doc,
                    outcome,
                };
                let outputs = self.core.handle(input, now_ms);
                self.execute(outputs);
                None
            }
            StoreEvent::Then(outputs) => {
                self.execute(outputs);
                None
            }
            StoreEvent::Fatal(reason) => {
                tracing::error!(%reason, "a durable write failed; stopping the relay");
                Some(reason)
            }
        }
    }

    fn execute(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { conn, msg } => {
                    if let Message::Error { req, code, text } = &msg {
                        tracing::debug!(conn = conn.0, req, ?code, %text, "request refused");
                    }
                    if let Some(tx) = self.conns.get(&conn) {
                        tx.answer(msg);
                    }
                }
                Output::Push { conn, msg } => {
                    let dropped = self.conns.get(&conn).is_some_and(|tx| !tx.push(msg));
                    if dropped {
                        self.close_lagged(conn);
                    }
                }
                Output::SendDatagram { conn, bytes } => {
                    if let Some(tx) = self.conns.get(&conn) {
                        tx.datagram(bytes);
                    }
                }
                Output::Close { conn, code, reason } => {
                    tracing::info!(conn = conn.0, ?code, %reason, "closing connection");
                    if let Some(tx) = self.conns.get(&conn) {
                        tx.close(code, reason);
                    }
                }
                Output::Append {
                    conn,
                    req,
                    envelope,
                } => self.send_to_pipeline(StoreOp::Append {
                    conn,
                    req,
                    envelope,
                }),
                Output::Persist { op, then } => {
                    self.send_to_pipeline(StoreOp::Persist { op, then })
                }
                Output::CatchUp { conn, req, items } => {
                    if let Some(tx) = self.conns.get(&conn) {
                        let task =
                            storage::catch_up(Arc::clone(&self.readers), tx.clone(), req, items);
                        self.reads.spawn(task);
                    }
                }
                Output::Fetch {
                    conn,
                    req,
                    doc,
                    after_seq,
                    limit,
                } => {
                    if let Some(tx) = self.conns.get(&conn) {
                        let task = storage::fetch(
                            Arc::clone(&self.readers),
                            tx.clone(),
                            req,
                            doc,
                            after_seq,
                            limit,
                        );
                        self.reads.spawn(task);
                    }
                }
                Output::Event(event) => log_event(&event),
            }
        }
    }

    /// Closes a connection whose push was dropped: a dropped push that nothing follows would
    /// leave its device behind with no gap to notice, while a closed connection makes it
    /// reconnect and catch up from its cursors. The connection is forgotten at once (its
    /// reader still reports the disconnect to the core), so it is counted and logged once.
    fn close_lagged(&mut self, conn: ConnId) {
        let Some(tx) = self.conns.remove(&conn) else {
            return;
        };
        self.lagged += 1;
        tracing::info!(
            conn = conn.0,
            "the connection fell behind its pushes; closing it (the device catches up when it reconnects)"
        );
        tx.abort(ErrorCode::LAGGED, LAGGED_REASON);
    }

    fn send_to_pipeline(&mut self, op: StoreOp) {
        match &self.pipeline {
            Some(pipeline) if pipeline.send(op).is_ok() => {}
            _ => tracing::warn!("a store write arrived after the relay stopped writing"),
        }
    }
}

fn log_event(event: &RelayEvent) {
    match event {
        RelayEvent::Authenticated {
            conn,
            device,
            account,
        } => tracing::info!(conn = conn.0, %device, %account, "authenticated"),
        RelayEvent::AuthRefused {
            conn,
            device,
            account,
            reason: AuthRefusal::Revoked,
        } => tracing::warn!(conn = conn.0, %device, %account, "a revoked device tried to connect"),
        RelayEvent::AuthRefused {
            conn,
            device,
            account,
            reason,
        } => tracing::info!(conn = conn.0, %device, %account, ?reason, "not authenticated"),
        RelayEvent::AccountCreated { account } => tracing::info!(%account, "account created"),
        RelayEvent::DeviceRevoked {
            account,
            device,
            closed,
        } => tracing::info!(%account, %device, closed, "device revoked"),
        RelayEvent::GroupUpdated { group, version } => {
            tracing::debug!(%group, version, "group updated");
        }
    }
}
