//! History that reaches past what this device holds: the conversation's missing segments jump
//! the catch-up queue and the call waits for them (bounded by the engine's timeout); offline,
//! the page says that more exists.

use super::*;
use crate::model::{Cursor, Page};

impl Worker {
    /// A page of history. When it ends short of `limit` while segments of the conversation are
    /// still to arrive, the page is marked incomplete; if `may_wait` and a relay is connected,
    /// those segments go first in the catch-up and the receiver fires once they are in.
    pub(crate) fn history_or_fetch(
        &mut self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
        may_wait: bool,
    ) -> Result<(Page, Option<oneshot::Receiver<()>>), EngineError> {
        let (mut page, evicted) = self.replica.history_held(conversation, before, limit)?;
        let live = self.live_relays();
        if !evicted.is_empty() && may_wait && !live.is_empty() {
            // Segments dropped under the disk budget come back the way they first came.
            let mut docs = HashSet::new();
            for addr in evicted {
                self.refetch(addr)?;
                docs.insert(addr.doc_id());
            }
            let (tx, rx) = oneshot::channel();
            self.history_waiters.push((docs, tx));
            return Ok((page, Some(rx)));
        }
        if page.incomplete || page.next.is_some() || page.messages.len() >= limit {
            return Ok((page, None));
        }
        let missing = self.segments_not_held(conversation)?;
        if missing.is_empty() {
            return Ok((page, None));
        }
        page.incomplete = true;
        if !may_wait || live.is_empty() {
            return Ok((page, None));
        }
        self.wanted.extend(missing.iter().copied());
        for relay in live {
            self.send_subscriptions(relay);
        }
        let (tx, rx) = oneshot::channel();
        self.history_waiters.push((missing, tx));
        Ok((page, Some(rx)))
    }

    /// Fetches an evicted document again from sequence 0 on every relay, ahead of the rest of
    /// the catch-up: it is made an empty held document, its cursors are reset (stored at once,
    /// so a restart fetches it too), and it is subscribed again where connected.
    fn refetch(&mut self, addr: DocAddr) -> Result<(), EngineError> {
        let doc = addr.doc_id();
        self.replica.restore_evicted(&addr)?;
        let keys: Vec<[u8; 32]> = self.relays.iter().map(|r| *r.addr.key.as_bytes()).collect();
        self.replica.store().write(|tx| {
            for key in &keys {
                tx.set_cursor(key, &addr, 0)?;
            }
            Ok(())
        })?;
        // A cursor queued earlier in this turn must not undo the reset.
        self.pending_cursors.retain(|(_, a, _)| *a != addr);
        self.docs.insert(doc, addr);
        self.wanted.insert(doc);
        for relay in 0..self.relays.len() {
            self.relays[relay].session.rewind(&doc, 0);
            if self.relays[relay].out.is_some() {
                self.relays[relay].session.queue_subscriptions([doc]);
                self.send_subscriptions(relay);
            }
        }
        Ok(())
    }

    /// Segments of `conversation` this device has not caught up on: waiting or catching up on a
    /// connected relay; with no relay connected, never received (nothing held, no cursor).
    fn segments_not_held(
        &mut self,
        conversation: &ConversationId,
    ) -> Result<HashSet<DocId>, EngineError> {
        let numbers = match self.replica.segment_numbers(conversation) {
            Ok(n) => n,
            // The meta document has not arrived: there is no history to page through yet.
            Err(crate::store::replica::ReplicaStoreError::Model(_)) => return Ok(HashSet::new()),
            Err(e) => return Err(e.into()),
        };
        let live = self.live_relays();
        let mut out = HashSet::new();
        for n in numbers {
            let addr = DocAddr::Segment(*conversation, n);
            let doc = addr.doc_id();
            let missing = if live.is_empty() {
                self.relays.iter().all(|r| r.session.cursor(&doc) == 0)
                    && self.replica.version_vector(&addr)?.is_empty()
            } else {
                live.iter()
                    .any(|i| self.relays[*i].session.is_catching_up(&doc))
            };
            if missing {
                out.insert(doc);
            }
        }
        Ok(out)
    }

    /// Answers history calls whose segments are all caught up now (or that stopped waiting),
    /// and drops caught-up documents from the wanted set.
    pub(super) fn wake_history(&mut self) {
        if self.history_waiters.is_empty() && self.wanted.is_empty() {
            return;
        }
        let live = self.live_relays();
        let relays = &self.relays;
        let catching_up = |d: &DocId| live.iter().any(|i| relays[*i].session.is_catching_up(d));
        self.wanted.retain(|d| catching_up(d));
        let waiters = std::mem::take(&mut self.history_waiters);
        for (docs, tx) in waiters {
            if tx.is_closed() {
                continue;
            }
            if docs.iter().any(&catching_up) {
                self.history_waiters.push((docs, tx));
            } else {
                let _ = tx.send(());
            }
        }
    }
}
