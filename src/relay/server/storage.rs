//! The shell's side of the store: the pipeline that hands writes to the group-commit writer in
//! the order the core emitted them, the forwarder that returns append outcomes in commit order,
//! and the readers that answer fetches and catch-ups.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use super::conn::ConnTx;
use crate::ids::AccountId;
use crate::ids::DocId;
use crate::relay::core::{CatchUpItem, ConnId, Output, PersistOp, StoreOutcome};
use crate::relay::store::{
    AppendOutcome, Fetched, MAX_FETCH_ITEMS, NewEnvelope, RelayReader, RelayStoreError,
    StoredSnapshot,
};
use crate::relay::writer::{PendingAppend, RelayWriter, WriterError};
use crate::wire::frame::ErrorCode;
use crate::wire::message::{
    MAX_ENVELOPES_PER_MESSAGE, Message, StoredEnvelope, TARGET_ENVELOPES_BYTES,
};

/// A write for the pipeline.
#[derive(Debug)]
pub(super) enum StoreOp {
    /// An envelope to append.
    Append {
        conn: ConnId,
        req: u32,
        envelope: NewEnvelope,
    },
    /// A durable write, then the outputs that wait for it.
    Persist { op: PersistOp, then: Vec<Output> },
}

/// What the store side tells the actor.
#[derive(Debug)]
pub(super) enum StoreEvent {
    /// An append's outcome.
    Stored {
        conn: ConnId,
        req: u32,
        doc: DocId,
        outcome: StoreOutcome,
    },
    /// A persist is durable: execute what waited for it.
    Then(Vec<Output>),
    /// A durable write failed: the relay must stop.
    Fatal(String),
}

type Queued = (ConnId, u32, DocId, Result<PendingAppend, WriterError>);

/// Hands writes to the writer one after another, so they take effect in the core's order.
/// A persist is awaited before anything after it is queued (persists are rare: new accounts,
/// log entries, group updates, new documents).
pub(super) async fn pipeline(
    mut ops: mpsc::UnboundedReceiver<StoreOp>,
    writer: RelayWriter,
    events: mpsc::UnboundedSender<StoreEvent>,
) {
    let (queued_tx, queued_rx) = mpsc::unbounded_channel::<Queued>();
    let forwarder = tokio::spawn(forward_outcomes(queued_rx, events.clone()));
    while let Some(op) = ops.recv().await {
        match op {
            StoreOp::Append {
                conn,
                req,
                envelope,
            } => {
                let doc = envelope.doc;
                let pending = writer.submit(envelope).await;
                // The forwarder lives as long as this sender.
                let _ = queued_tx.send((conn, req, doc, pending));
            }
            StoreOp::Persist { op, then } => {
                if let Err(e) = persist(&writer, op).await {
                    let _ = events.send(StoreEvent::Fatal(e.to_string()));
                    break;
                }
                let _ = events.send(StoreEvent::Then(then));
            }
        }
    }
    drop(queued_tx);
    let _ = forwarder.await;
}

async fn persist(writer: &RelayWriter, op: PersistOp) -> Result<(), WriterError> {
    match op {
        PersistOp::AppendLog {
            account,
            first_seq,
            entries,
        } => writer.append_log_entries(account, first_seq, entries).await,
        PersistOp::PutGroupUpdate {
            group,
            version,
            update,
        } => writer.put_group_update(group, version, update).await,
        PersistOp::CreateDocs { docs } => {
            for (doc, group) in docs {
                writer.create_doc(doc, group).await?;
            }
            Ok(())
        }
        // Whether it replaced the stored one or not, the request is done.
        PersistOp::PutSnapshot { snapshot } => writer.put_snapshot(snapshot).await.map(|_| ()),
    }
}

/// Awaits append outcomes in the order they were queued (the order the writer commits them)
/// and hands them to the actor.
async fn forward_outcomes(
    mut queued: mpsc::UnboundedReceiver<Queued>,
    events: mpsc::UnboundedSender<StoreEvent>,
) {
    while let Some((conn, req, doc, pending)) = queued.recv().await {
        let result = match pending {
            Ok(p) => p.outcome().await,
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(AppendOutcome::Stored { seq }) => StoreOutcome::Stored { seq },
            Ok(AppendOutcome::Duplicate { seq }) => StoreOutcome::Duplicate { seq },
            Ok(AppendOutcome::Conflict { existing }) => StoreOutcome::Conflict { existing },
            Ok(AppendOutcome::UnknownDoc) => StoreOutcome::Failed {
                reason: format!("document {doc} is not in the store"),
            },
            Err(e) => StoreOutcome::Failed {
                reason: e.to_string(),
            },
        };
        let stored = StoreEvent::Stored {
            conn,
            req,
            doc,
            outcome,
        };
        if events.send(stored).is_err() {
            return;
        }
    }
}

/// Reader connections, used in turn on blocking threads.
#[derive(Debug)]
pub(super) struct ReaderPool {
    readers: Vec<Mutex<RelayReader>>,
    next: AtomicUsize,
}

impl ReaderPool {
    pub fn new(readers: Vec<RelayReader>) -> Self {
        Self {
            readers: readers.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `read` on one of the reader connections, on a blocking thread.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&RelayReader) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let pool = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.readers.len().max(1);
            let reader = pool
                .readers
                .get(i)
                .ok_or_else(|| "no reader connection".to_owned())?
                .lock()
                // A panic while reading leaves the connection as usable as before.
                .unwrap_or_else(PoisonError::into_inner);
            read(&reader)
        });
        task.await.map_err(|e| e.to_string())?
    }

    /// The snapshot of `doc` kept for `account`, if any.
    async fn snapshot(
        self: &Arc<Self>,
        doc: DocId,
        account: AccountId,
    ) -> Result<Option<StoredSnapshot>, String> {
        self.read(move |reader| reader.snapshot(&doc, &account).map_err(|e| e.to_string()))
            .await
    }

    /// Envelopes of `doc` after `after_seq` (an unknown document has none).
    async fn fetch(
        self: &Arc<Self>,
        doc: DocId,
        after_seq: u64,
        max_items: usize,
    ) -> Result<Fetched, String> {
        self.read(move |reader| {
            match reader.fetch(&doc, after_seq, max_items, TARGET_ENVELOPES_BYTES) {
                Ok(f) => Ok(f),
                // Created in the core but not committed yet: nothing stored.
                Err(RelayStoreError::UnknownDoc { .. }) => Ok(Fetched::default()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }
}

/// Most envelopes asked of one read: what fits a message and the store's limit.
const READ_ITEMS: usize = if MAX_FETCH_ITEMS < MAX_ENVELOPES_PER_MESSAGE {
    MAX_FETCH_ITEMS
} else {
    MAX_ENVELOPES_PER_MESSAGE
};

/// An `Envelopes` answer from a read after `after_seq` (items are contiguous from it).
fn envelopes(req: u32, doc: DocId, after_seq: u64, fetched: Fetched) -> (Message, u64) {
    let mut prev = after_seq;
    let items = fetched
        .items
        .into_iter()
        .map(|(seq, envelope)| StoredEnvelope {
            seq,
            prev: std::mem::replace(&mut prev, seq),
            envelope,
        })
        .collect();
    let msg = Message::Envelopes {
        req,
        doc,
        items,
        more: fetched.more,
    };
    (msg, prev)
}

fn internal_error(req: u32, what: &str, detail: &str) -> Message {
    Message::Error {
        req,
        code: ErrorCode::INTERNAL,
        text: format!("the relay could not read {what}: {detail}"),
    }
}

/// Answers a `Fetch`: one `Envelopes` message.
pub(super) async fn fetch(
    readers: Arc<ReaderPool>,
    tx: ConnTx,
    req: u32,
    doc: DocId,
    after_seq: u64,
    limit: u32,
) {
    let max_items = (limit as usize).min(READ_ITEMS);
    let answer = match readers.fetch(doc, after_seq, max_items).await {
        Ok(fetched) => envelopes(req, doc, after_seq, fetched).0,
        Err(e) => {
            tracing::error!(%doc, error = %e, "fetch failed");
            internal_error(req, "the document", &e)
        }
    };
    tx.answer(answer);
}

/// Answers a subscription's catch-up: for each document, the account's snapshot if one was
/// asked for and covers more than the cursor, then every envelope after the cursor (or after
/// what the snapshot covers), in messages of about `TARGET_ENVELOPES_BYTES`, waiting for the
/// connection to take them; then `Done`.
pub(super) async fn catch_up(
    readers: Arc<ReaderPool>,
    tx: ConnTx,
    req: u32,
    items: Vec<CatchUpItem>,
) {
    for item in items {
        let doc = item.doc;
        let mut cursor = item.after_seq;
        if let Some(account) = item.snapshot_for {
            tx.wait_for_room().await;
            match readers.snapshot(doc, account).await {
                Ok(Some(snapshot)) if snapshot.covers > cursor => {
                    cursor = snapshot.covers;
                    let msg = Message::Snapshot {
                        req,
                        doc,
                        envelope: snapshot.bytes,
                    };
                    if !tx.answer(msg) {
                        return;
                    }
                }
                Ok(_) => {}
                // Without its snapshot the device still gets every envelope.
                Err(e) => tracing::warn!(%doc, error = %e, "reading a snapshot failed"),
            }
        }
        loop {
            tx.wait_for_room().await;
            match readers.fetch(doc, cursor, READ_ITEMS).await {
                Ok(fetched) => {
                    // A read that returns nothing cannot be continued from.
                    let more = fetched.more && !fetched.items.is_empty();
                    let (msg, last) = envelopes(req, doc, cursor, fetched);
                    cursor = last;
                    if !tx.answer(msg) {
                        return;
                    }
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(%doc, error = %e, "catch-up failed");
                    tx.answer(internal_error(req, "the document", &e));
                    return;
                }
            }
        }
    }
    tx.answer(Message::Done { req });
}
