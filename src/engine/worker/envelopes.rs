//! Incoming envelopes: gathering per document, checking, applying in one call, events.

use super::*;

impl Worker {
    // ---- envelopes -------------------------------------------------------------------------

    pub(super) fn gather(
        &mut self,
        relay: usize,
        req: u32,
        doc: DocId,
        items: Vec<StoredEnvelope>,
        more: bool,
        arrivals: &mut BTreeMap<DocId, Arrivals>,
    ) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        let before = r.session.cursor(&doc);
        let step = if req == 0 {
            // A push: one envelope with its predecessor.
            let mut step = CursorStep::default();
            for it in &items {
                let s = r.session.on_pushed(doc, it.seq, it.prev);
                step.advanced_to = s.advanced_to.or(step.advanced_to);
                step.fetch_after = s.fetch_after.or(step.fetch_after);
            }
            step
        } else {
            // An answer to a fetch or a subscription's catch-up; the request stays open for a
            // catch-up until its `Done`.
            let is_fetch = matches!(r.session.pending(req), Some(Pending::Fetch(_)));
            if is_fetch {
                r.session.finish(req);
            }
            let step = r
                .session
                .on_answer(doc, &answer_items(&items), more && is_fetch);
            // Only a fetch that reached the end clears a gap a push showed: a catch-up ending
            // says nothing of pushes dropped meanwhile (`end_catch_up` fetches for those).
            if !more && is_fetch {
                r.session.caught_up(&doc);
            }
            step
        };
        if req != 0 {
            let bytes: usize = items.iter().map(|i| i.envelope.len()).sum();
            r.session.count_received(items.len() as u64, bytes as u64);
        }
        let a = arrivals.entry(doc).or_default();
        a.envelopes
            .extend(items.into_iter().map(|i| (i.envelope, None)));
        a.steps.push((relay, step));
        if !a.before.iter().any(|(r, _)| *r == relay) {
            a.before.push((relay, before));
        }
    }

    /// Opens, checks and applies everything gathered, one apply call for all documents, then
    /// stores the cursors and tells the app.
    pub(super) fn apply_arrivals(&mut self, arrivals: BTreeMap<DocId, Arrivals>) {
        let now = now_ms();
        let mut batches = Vec::new();
        let mut steps = Vec::new();
        for (doc, a) in arrivals {
            let Some(addr) = self.docs.get(&doc).copied() else {
                tracing::debug!(?doc, "envelopes of an unknown document dropped");
                continue;
            };
            // A segment evicted from the disk budget takes nothing until it is fetched again
            // from the start; its cursor still moves (the relay keeps what it skips).
            match self.replica.is_evicted(&addr) {
                Ok(true) => {
                    steps.extend(a.steps.into_iter().map(|(r, s)| (r, doc, s)));
                    continue;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(?addr, error = %e, "reading the eviction mark failed"),
            }
            let attempts = self.blocked.get(&doc).copied().unwrap_or(0);
            let mut not_yet = false;
            for (bytes, from) in &a.envelopes {
                match self.open_changes(&addr, bytes) {
                    Ok(Some(batch)) => {
                        if self.direct {
                            self.queue_archive(&addr, bytes, *from);
                        }
                        batches.push(batch)
                    }
                    Ok(None) => {}
                    // Sealed under a key made after this account's removal: never readable
                    // here, and nothing to wait for.
                    Err(e) if self.after_removal(&addr, &e) => {}
                    Err(e)
                        if is_not_yet(&e)
                            && (attempts < MAX_BLOCKED_RETRIES
                                || self.awaits_rewrap(&addr, &e)) =>
                    {
                        tracing::debug!(?addr, error = %e, "envelope waits for a log or a key");
                        not_yet = true;
                    }
                    Err(e) => {
                        tracing::warn!(?addr, error = %e, "envelope refused");
                        self.emit(Event::Refused {
                            doc: addr,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            if not_yet {
                // Keep the cursors where they were, learn what is missing, fetch again.
                for (relay, before) in &a.before {
                    if let Some(r) = self.relays.get_mut(*relay) {
                        r.session.rewind(&doc, *before);
                    }
                }
                // An attempt counts only once what it lacks was asked for: not while offline,
                // nor while the same is asked already.
                let asked = self.refresh_group_of(&addr);
                self.blocked.insert(doc, attempts + u32::from(asked));
                continue;
            }
            self.blocked.remove(&doc);
            steps.extend(a.steps.into_iter().map(|(r, s)| (r, doc, s)));
        }
        if !batches.is_empty() {
            // The app hears about the changes as soon as they are applied in memory; they are
            // stored right after. The cursors move only once that store is done, so a crash in
            // between means the envelopes are fetched again, never that they are skipped.
            self.replica.defer_writes(true);
            let applied = self.replica.apply(now, batches);
            self.replica.defer_writes(false);
            match applied {
                Ok(report) => {
                    self.watch_seeded(&report);
                    self.after_apply(report)
                }
                Err(e) => {
                    tracing::error!(error = %e, "applying remote changes failed");
                    self.emit(Event::StorageError {
                        text: e.to_string(),
                    });
                    return;
                }
            }
        }
        let relays: BTreeSet<usize> = steps.iter().map(|(r, _, _)| *r).collect();
        // Stored with the changes at the end of the turn (`commit_turn`).
        self.store_cursors(steps);
        for relay in relays {
            self.update_live(relay);
        }
    }

    /// Queues an accepted envelope for the turn's archive.
    fn queue_archive(&mut self, addr: &DocAddr, bytes: &[u8], from: Option<u64>) {
        let Ok(env) = SealedEnvelope::decode(bytes) else {
            return;
        };
        let h = env.header;
        self.archive_queue.push(peers::Archived {
            addr: *addr,
            group: group_of(addr),
            author: h.author,
            range: (h.first_seq, h.last_seq),
            bytes: bytes.to_vec(),
            from,
        });
    }

    /// Asks a relay for what opening envelopes of `addr` may lack: the device logs of the
    /// group's members and the group's later updates. `retry_blocked` fetches again after.
    /// False if no relay is connected or the group is asked for already.
    fn refresh_group_of(&mut self, addr: &DocAddr) -> bool {
        let group = group_of(addr);
        let Some(relay) = self.live_relays().first().copied() else {
            return false;
        };
        let asked = self.relays[relay]
            .session
            .any_pending(|p| matches!(p, Pending::FetchGroup(g) if *g == group));
        if asked {
            return false;
        }
        let members = self.group_members(&group).unwrap_or_default();
        for account in members {
            let from_seq = if account == self.account() {
                self.log.len() as u32
            } else {
                self.logs.get(&account).map_or(0, |l| l.len() as u32)
            };
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq,
            });
        }
        self.fetch_group(relay, group);
        true
    }

    /// Fetches again the documents whose envelopes could not be opened yet.
    pub(super) fn retry_blocked(&mut self) {
        let docs: Vec<DocId> = self.blocked.keys().copied().collect();
        for relay in self.live_relays() {
            for doc in &docs {
                let doc = *doc;
                let after_seq = self.relays[relay].session.cursor(&doc);
                self.request(relay, Pending::Fetch(doc), |req| Message::Fetch {
                    req,
                    doc,
                    after_seq,
                    limit: FETCH_LIMIT,
                });
            }
        }
    }

    /// Checks an envelope of `addr` and returns its changes. `None` for a snapshot (not
    /// applied by this version) .
    pub(super) fn open_changes(
        &self,
        addr: &DocAddr,
        bytes: &[u8],
    ) -> Result<Option<ChangeBatch>, EngineError> {
        let env = SealedEnvelope::decode(bytes)?;
        if env.header.kind != EnvelopeKind::Changes {
            return Ok(None);
        }
        let group = group_of(addr);
        let keys = GroupKeys {
            keyring: &self.keyring,
            group,
        };
        let authorised = |author: &DeviceId, _: &DocId, _: KeyEpoch| self.may_write(author, &group);
        let opened = env.open(&addr.doc_id(), &keys, authorised)?;
        let batch = ChangeBatch::decode(&opened.plaintext)?;
        if batch.addr != *addr {
            return Err(EngineError::Mismatch {
                what: "document inside the envelope",
            });
        }
        // The changes must be the author's own, exactly the range the header names: this is
        // what ties an Automerge actor to a signing device.
        let author = opened.header.author;
        // `decode` checked first <= last; a range of 2^64 changes cannot match any batch.
        let expected = (opened.header.last_seq - opened.header.first_seq).checked_add(1);
        let own = batch.changes.iter().all(|c| {
            c.actor_id().to_bytes() == author.as_bytes()
                && (opened.header.first_seq..=opened.header.last_seq).contains(&c.seq())
        });
        if !own || Some(batch.changes.len() as u64) != expected {
            return Err(EngineError::Mismatch {
                what: "changes and the envelope's author range",
            });
        }
        // Messages and reactions name an account; it must be the signing device's.
        if let DocAddr::Segment(..) = addr {
            let accounts = self.accounts_of(&author);
            let claims =
                crate::model::claimed_accounts(&batch.changes).ok_or(EngineError::Mismatch {
                    what: "accounts named in the changes",
                })?;
            if claims.iter().any(|c| !accounts.contains(c)) {
                return Err(EngineError::Mismatch {
                    what: "the message or reaction account and the signing device's account",
                });
            }
        }
        Ok(Some(batch))
    }

    /// Whether `author` is a device of an account that is, or was, a member of `group`.
    pub(super) fn may_write(&self, author: &DeviceId, group: &DocId) -> bool {
        let accounts = self.accounts_of(author);
        self.groups
            .get(group)
            .is_some_and(|g| accounts.iter().any(|a| g.ever_member(a)))
    }

    pub(super) fn after_apply(&mut self, report: crate::model::ApplyReport) {
        let mut list_changed = false;
        let mut read_changed = BTreeSet::new();
        let mut new_meta = Vec::new();
        for (addr, stats) in &report.docs {
            if stats.applied == 0 {
                continue;
            }
            match addr {
                DocAddr::Account(_) => {
                    list_changed = true;
                    read_changed.extend(self.replica.replica().read_positions().into_keys());
                }
                DocAddr::Meta(c) => {
                    list_changed = true;
                    new_meta.push(*c);
                }
                DocAddr::Segment(..) => list_changed = true,
            }
        }
        for (addr, e) in &report.rejected {
            self.emit(Event::Refused {
                doc: *addr,
                reason: e.to_string(),
            });
        }
        for (conversation, id) in &report.new_messages {
            self.emit(Event::MessageReceived {
                conversation: *conversation,
                id: *id,
            });
        }
        for (conversation, id, update) in &report.updated_messages {
            let (conversation, id) = (*conversation, *id);
            self.emit(match update {
                MessageUpdate::Edited => Event::MessageEdited { conversation, id },
                MessageUpdate::Recalled => Event::MessageRecalled { conversation, id },
                _ => Event::ReactionsChanged { conversation, id },
            });
        }
        for conversation in read_changed {
            self.emit(Event::ReadStateChanged { conversation });
        }
        if list_changed {
            self.emit(Event::ConversationListChanged);
        }
        for c in new_meta {
            if let Err(e) = self.learn_segments(&c) {
                tracing::warn!(error = %e, "reading segment list failed");
            }
        }
    }

    /// Adds the segment documents a meta document lists to the synced documents, subscribing
    /// where new.
    pub(super) fn learn_segments(&mut self, c: &ConversationId) -> Result<(), EngineError> {
        let numbers = match self.replica.segment_numbers(c) {
            Ok(n) => n,
            // The meta document has not arrived yet.
            Err(crate::store::replica::ReplicaStoreError::Model(_)) => vec![0],
            Err(e) => return Err(e.into()),
        };
        let mut new = Vec::new();
        for n in numbers {
            let addr = DocAddr::Segment(*c, n);
            if self.docs.insert(addr.doc_id(), addr).is_none() {
                self.sealed.entry(addr).or_insert(0);
                new.push(addr);
            }
        }
        self.subscribe_everywhere(&new);
        Ok(())
    }
}

impl Worker {
    /// Whether `e` is a missing key of a group this account is no longer a member of.
    fn after_removal(&self, addr: &DocAddr, e: &EngineError) -> bool {
        let account = self.account();
        matches!(
            e,
            EngineError::Envelope(crate::crypto::envelope::EnvelopeError::MissingKey { .. })
        ) && self
            .groups
            .get(&group_of(addr))
            .and_then(|g| g.latest())
            .is_some_and(|u| !u.is_member(&account))
    }

    /// Whether `e` is a key missing for an epoch the group's chain wraps to other devices while
    /// this account is a member: a keeper wraps it to this device too (`crypto::group::missing_wraps`), so the envelope
    /// waits for it however long that takes, rather than being refused after a few attempts.
    fn awaits_rewrap(&self, addr: &DocAddr, e: &EngineError) -> bool {
        let EngineError::Envelope(crate::crypto::envelope::EnvelopeError::MissingKey {
            epoch, ..
        }) = e
        else {
            return false;
        };
        let group = group_of(addr);
        let account = self.account();
        self.groups.get(&group).is_some_and(|g| {
            g.latest().is_some_and(|u| u.is_member(&account))
                && g.updates
                    .iter()
                    .any(|u| u.keys.iter().any(|k| k.doc == group && k.epoch == *epoch))
        })
    }
}

/// Each item's sequence number and `prev`, for the cursor.
fn answer_items(items: &[StoredEnvelope]) -> Vec<(u64, u64)> {
    items.iter().map(|i| (i.seq, i.prev)).collect()
}

/// Whether opening failed only for what this device does not know yet: the author's device
/// (its account's log not fetched) or the key of the envelope's epoch (its group update not
/// arrived).
fn is_not_yet(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Envelope(
            crate::crypto::envelope::EnvelopeError::NotAuthorised { .. }
                | crate::crypto::envelope::EnvelopeError::MissingKey { .. }
        )
    )
}
