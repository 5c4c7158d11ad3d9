//! Group commit: one OS thread owns the [`RelayStore`] and turns concurrent appends into few,
//! large transactions.
//!
//! Requests go through a bounded queue ([`QUEUE_DEPTH`]; a full queue makes submitters wait, which
//! is the relay's backpressure). The thread blocks for the first request, then takes whatever
//! else is queued, up to [`MAX_BATCH_ITEMS`] envelopes or [`MAX_BATCH_BYTES`], appends them with
//! one [`RelayStore::append_batch`] (one commit, one fsync) and answers every request. While it
//! waits for the disk, new requests queue up and form the next batch, so the batch size follows
//! the load.
//!
//! The rare other writes (device logs, group updates, new documents) go through the same queue
//! and thread, so there is one writer connection and requests take effect in the order they were
//! queued: a document created before an append is known to that append. Each is its own
//! transaction, after the envelopes queued before it are committed.
//!
//! Reads do not come here: a [`RelayReader`](super::store::RelayReader) reads on its own
//! connection.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use roamsync::crypto::envelope::EnvelopeId;
//! use roamsync::ids::{AccountId, DeviceId, DocId};
//! use roamsync::relay::store::{AppendOutcome, NewEnvelope, RelayStore, RelayStoreOptions};
//! use roamsync::relay::writer::RelayWriter;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = RelayStore::open(dir.path(), RelayStoreOptions::default()).unwrap();
//! let (writer, thread) = RelayWriter::spawn(store).unwrap();
//! let doc = DocId::from_bytes([1; 32]);
//! writer.create_doc(doc, DocId::from_bytes([2; 32])).await.unwrap();
//! let outcome = writer
//!     .append(NewEnvelope {
//!         doc,
//!         id: EnvelopeId([3; 32]),
//!         author: DeviceId::from_bytes([4; 32]),
//!         account: AccountId::from_bytes([5; 32]),
//!         first_seq: 1,
//!         last_seq: 1,
//!         bytes: b"sealed".to_vec(),
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(outcome, AppendOutcome::Stored { seq: 1 });
//! writer.shutdown().await.unwrap();
//! thread.join().unwrap();
//! # });
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::ids::{AccountId, DocId};
use crate::relay::store::{AppendOutcome, NewEnvelope, NewSnapshot, RelayStore, RelayStoreError};

/// Requests the queue holds before submitters wait.
pub const QUEUE_DEPTH: usize = 8_192;

/// Most envelopes committed in one transaction.
pub const MAX_BATCH_ITEMS: usize = 4_096;

/// Envelope bytes after which a batch is closed (the envelope that crosses it is included).
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Name of the writer thread.
pub const THREAD_NAME: &str = "relay-writer";

/// Why a write through the writer did not happen.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriterError {
    /// The store refused or failed the write. When a batch's commit fails, every request in it
    /// gets the same error and none of them was written.
    #[error(transparent)]
    Store(Arc<RelayStoreError>),
    /// The writer thread has shut down (or is shutting down) and takes no more requests.
    #[error("the relay writer has stopped")]
    Stopped,
    /// The writer thread could not be started.
    #[error("cannot start the relay writer thread: {0}")]
    Spawn(Arc<std::io::Error>),
}

type Reply<T> = oneshot::Sender<Result<T, WriterError>>;

enum Request {
    Append(NewEnvelope, Reply<AppendOutcome>),
    Other(OtherWrite),
    Shutdown(oneshot::Sender<()>),
}

/// The rare writes that are not envelope appends; each is its own transaction.
enum OtherWrite {
    AppendLog {
        account: AccountId,
        first_seq: u32,
        entries: Vec<Vec<u8>>,
        reply: Reply<()>,
    },
    GroupUpdate {
        group: DocId,
        version: u32,
        update: Vec<u8>,
        reply: Reply<()>,
    },
    CreateDoc {
        doc: DocId,
        group: DocId,
        reply: Reply<()>,
    },
    PutSnapshot {
        snapshot: NewSnapshot,
        reply: Reply<bool>,
    },
}

/// Counters of the writer's work, for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Envelope batches committed (or failed).
    pub batches: u64,
    /// Envelopes in those batches.
    pub envelopes: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    envelopes: AtomicU64,
}

/// A handle to the writer thread. Cloning it gives another handle to the same thread; the thread
/// exits after [`RelayWriter::shutdown`] or once every handle is dropped, in both cases after
/// finishing every request already queued.
#[derive(Clone)]
pub struct RelayWriter {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for RelayWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayWriter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// An append that is queued; its outcome arrives once its batch committed.
#[derive(Debug)]
pub struct PendingAppend(oneshot::Receiver<Result<AppendOutcome, WriterError>>);

impl PendingAppend {
    /// Waits for the commit. `Ok(AppendOutcome::Stored { .. })` means durable.
    pub async fn outcome(self) -> Result<AppendOutcome, WriterError> {
        self.0.await.unwrap_or(Err(WriterError::Stopped))
    }

    /// [`PendingAppend::outcome`] for threads outside an async runtime.
    pub fn blocking_outcome(self) -> Result<AppendOutcome, WriterError> {
        self.0.blocking_recv().unwrap_or(Err(WriterError::Stopped))
    }
}

impl RelayWriter {
    /// Starts the writer thread, which owns `store` until it exits. Join the handle to know
    /// that the store is closed.
    pub fn spawn(store: RelayStore) -> Result<(RelayWriter, JoinHandle<()>), WriterError> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let handle = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || run(store, rx, &thread_counters))
            .map_err(|e| WriterError::Spawn(Arc::new(e)))?;
        Ok((RelayWriter { tx, counters }, handle))
    }

    /// Queues an envelope, waiting while the queue is full. Awaiting the returned
    /// [`PendingAppend`] gives its outcome; a caller may queue many before awaiting any.
    pub async fn submit(&self, envelope: NewEnvelope) -> Result<PendingAppend, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Append(envelope, reply))
            .await
            .map_err(|_| WriterError::Stopped)?;
        Ok(PendingAppend(rx))
    }

    /// [`RelayWriter::submit`] for threads outside an async runtime.
    pub fn blocking_submit(&self, envelope: NewEnvelope) -> Result<PendingAppend, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Request::Append(envelope, reply))
            .map_err(|_| WriterError::Stopped)?;
        Ok(PendingAppend(rx))
    }

    /// Appends an envelope and waits until it is committed.
    pub async fn append(&self, envelope: NewEnvelope) -> Result<AppendOutcome, WriterError> {
        self.submit(envelope).await?.outcome().await
    }

    /// [`RelayStore::append_log_entries`], through the writer thread.
    pub async fn append_log_entries(
        &self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<Vec<u8>>,
    ) -> Result<(), WriterError> {
        self.request(|reply| OtherWrite::AppendLog {
            account,
            first_seq,
            entries,
            reply,
        })
        .await
    }

    /// [`RelayStore::put_group_update`], through the writer thread.
    pub async fn put_group_update(
        &self,
        group: DocId,
        version: u32,
        update: Vec<u8>,
    ) -> Result<(), WriterError> {
        self.request(|reply| OtherWrite::GroupUpdate {
            group,
            version,
            update,
            reply,
        })
        .await
    }

    /// [`RelayStore::create_doc`], through the writer thread.
    pub async fn create_doc(&self, doc: DocId, group: DocId) -> Result<(), WriterError> {
        self.request(|reply| OtherWrite::CreateDoc { doc, group, reply })
            .await
    }

    /// [`RelayStore::put_snapshot`], through the writer thread: whether it was stored.
    pub async fn put_snapshot(&self, snapshot: NewSnapshot) -> Result<bool, WriterError> {
        self.request(|reply| OtherWrite::PutSnapshot { snapshot, reply })
            .await
    }

    /// Stops the writer: requests queued before this call are carried out, later ones are
    /// refused with [`WriterError::Stopped`]. Returns once the store is closed.
    pub async fn shutdown(&self) -> Result<(), WriterError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Shutdown(reply)).await.is_err() {
            // The thread has already stopped: what was queued was carried out.
            return Ok(());
        }
        // The thread answers after it has finished; if it dropped the reply instead, it has
        // exited all the same.
        let _ = rx.await;
        Ok(())
    }

    /// Batches and envelopes committed so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            envelopes: self.counters.envelopes.load(Ordering::Relaxed),
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> OtherWrite,
    ) -> Result<T, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Other(make(reply)))
            .await
            .map_err(|_| WriterError::Stopped)?;
        rx.await.unwrap_or(Err(WriterError::Stopped))
    }
}

/// The envelopes of the batch being formed and whom to answer.
#[derive(Default)]
struct Batch {
    envelopes: Vec<NewEnvelope>,
    replies: Vec<Reply<AppendOutcome>>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, envelope: NewEnvelope, reply: Reply<AppendOutcome>) {
        self.bytes = self.bytes.saturating_add(envelope.bytes.len());
        self.envelopes.push(envelope);
        self.replies.push(reply);
    }

    fn is_full(&self) -> bool {
        self.envelopes.len() >= MAX_BATCH_ITEMS || self.bytes >= MAX_BATCH_BYTES
    }

    /// Commits the batch and answers its requests.
    fn commit(&mut self, store: &mut RelayStore, counters: &Counters) {
        if self.envelopes.is_empty() {
            return;
        }
        let result = store.append_batch(&self.envelopes);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .envelopes
            .fetch_add(self.envelopes.len() as u64, Ordering::Relaxed);
        let replies = std::mem::take(&mut self.replies);
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A submitter that stopped waiting does not concern the others.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(WriterError::Store(Arc::clone(&e))));
                }
            }
        }
        self.envelopes.clear();
        self.bytes = 0;
    }
}

fn run(mut store: RelayStore, mut rx: mpsc::Receiver<Request>, counters: &Counters) {
    let mut batch = Batch::default();
    let mut stopping = Vec::new();
    // After `close`, `blocking_recv` still yields what was queued before, then `None`.
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Append(envelope, reply) => batch.push(envelope, reply),
                Request::Shutdown(reply) => {
                    stopping.push(reply);
                    rx.close();
                }
                Request::Other(write) => {
                    // Earlier appends first, so that requests take effect in queue order.
                    batch.commit(&mut store, counters);
                    handle_other(&mut store, write);
                }
            }
            if batch.is_full() {
                break;
            }
            next = rx.try_recv().ok();
        }
        batch.commit(&mut store, counters);
    }
    drop(store);
    for reply in stopping {
        let _ = reply.send(());
    }
}

fn handle_other(store: &mut RelayStore, write: OtherWrite) {
    fn answer<T>(reply: Reply<T>, result: Result<T, RelayStoreError>) {
        let _ = reply.send(result.map_err(|e| WriterError::Store(Arc::new(e))));
    }
    match write {
        OtherWrite::AppendLog {
            account,
            first_seq,
            entries,
            reply,
        } => answer(
            reply,
            store.append_log_entries(&account, first_seq, &entries),
        ),
        OtherWrite::GroupUpdate {
            group,
            version,
            update,
            reply,
        } => answer(reply, store.put_group_update(&group, version, &update)),
        OtherWrite::CreateDoc { doc, group, reply } => {
            answer(reply, store.create_doc(&doc, &group));
        }
        OtherWrite::PutSnapshot { snapshot, reply } => {
            answer(reply, store.put_snapshot(&snapshot));
        }
    }
}

#[cfg(test)]
mod tests;
