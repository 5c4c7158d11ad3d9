//! Snapshots of documents: making them for the relays, taking them when catching up, and
//! watching what follows a taken snapshot for signs that it left something out.
//!
//! **Making.** Every tick, for each live relay, a document whose held changes grew by
//! [`SNAPSHOT_AFTER_CHANGES`] since this device's last snapshot of it there (relay sequence
//! numbers are global, so the count of changes held stands in for the count of envelopes), whose
//! cursor is settled (no catch-up, fetch or known gap) and whose model buffer holds no change
//! waiting for dependencies, is saved, sealed as a `Snapshot` envelope covering the cursor and
//! uploaded with `PutSnapshot`; at most [`MAX_SNAPSHOTS_PER_TICK`] a tick, within
//! [`SNAPSHOT_TICK_BUDGET_MS`] of worker time. What each relay
//! acknowledged is remembered in the settings (`snapshot/<relay>/<doc>`), so a restart does not
//! upload it again.
//!
//! **Taking.** A document with cursor 0 is subscribed with the snapshot flag. A snapshot must be
//! signed by a current device of this device's own account, open under the group's key, be of
//! this document, and its changes pass the checks envelopes pass (actors are devices of accounts
//! that are or were members; in a segment, messages and reactions name their actor's account);
//! then they are applied in one call and the cursor moves to what it covers. A refused snapshot
//! is reported (`Event::Refused`) and the document is fetched from its cursor instead.
//!
//! **Distrust.** A snapshot can lie by leaving changes out. If, once the catch-up ends (or later
//! while the cursor is settled), the document has changes waiting for dependencies, or an
//! envelope's changes conflict with what the snapshot held (equivocation), the document is
//! marked "no snapshot" (`nosnap/<doc>`, for good) and fetched again from sequence number 0.

use automerge::Automerge;

use super::*;
use crate::model::ModelError;
use crate::store::StoreError;
use crate::store::db::Store;

/// Changes held of a document, past those of this device's last snapshot of it on a relay,
/// after which it makes a new one.
pub const SNAPSHOT_AFTER_CHANGES: u64 = 256;
/// Most snapshots made in one tick (each saves and seals a whole document).
pub const MAX_SNAPSHOTS_PER_TICK: usize = 32;
/// Worker time one tick may spend making snapshots; the tick stops making them once it is
/// spent, so app calls wait for it at most this long.
pub const SNAPSHOT_TICK_BUDGET_MS: u64 = 50;
/// Version of a snapshot's plaintext format.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;

/// What this device made and took of snapshots.
#[derive(Debug)]
pub(crate) struct Snapshots {
    /// Changes past the last snapshot after which one is made; `None`: never make any.
    after_changes: Option<u64>,
    /// Documents whose snapshots are not taken (one was found to leave changes out).
    pub(super) no_snapshot: HashSet<DocId>,
    /// Per relay key and document: this device's last snapshot there.
    marks: HashMap<([u8; 32], DocId), Mark>,
    /// Documents whose state came from a snapshot in this run, with the relay that served it.
    seeded: HashMap<DocId, usize>,
    /// Per relay and document: the cursor when it was last considered for a snapshot.
    checked: HashMap<(usize, DocId), u64>,
    /// Snapshots taken, distrusted and made (acknowledged) since start.
    pub(super) taken: u64,
    pub(super) distrusted: u64,
    pub(super) made: u64,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            after_changes: Some(SNAPSHOT_AFTER_CHANGES),
            no_snapshot: HashSet::new(),
            marks: HashMap::new(),
            seeded: HashMap::new(),
            checked: HashMap::new(),
            taken: 0,
            distrusted: 0,
            made: 0,
        }
    }
}

/// A snapshot this device made on a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    /// The relay sequence number it covered.
    covers: u64,
    /// The changes held of the document when it was made.
    changes: u64,
}

fn mark_setting(relay: &[u8; 32], doc: &DocId) -> String {
    let hex: String = relay.iter().map(|b| format!("{b:02x}")).collect();
    format!("snapshot/{hex}/{doc}")
}

fn no_snapshot_setting(doc: &DocId) -> String {
    format!("nosnap/{doc}")
}

impl Snapshots {
    /// Reads the marks of `docs` on `relays` and the documents not to take snapshots of.
    pub(super) fn load(
        store: &Store,
        relays: &[[u8; 32]],
        docs: &[DocId],
    ) -> Result<Snapshots, StoreError> {
        let mut out = Snapshots::default();
        for doc in docs {
            if store.setting(&no_snapshot_setting(doc))?.is_some() {
                out.no_snapshot.insert(*doc);
            }
            for relay in relays {
                if let Some(bytes) = store.setting(&mark_setting(relay, doc))? {
                    let b: [u8; 16] =
                        bytes
                            .as_slice()
                            .try_into()
                            .map_err(|_| StoreError::Malformed {
                                what: "snapshot mark",
                            })?;
                    let (covers, changes) = b.split_at(8);
                    let mark = Mark {
                        covers: u64::from_be_bytes(covers.try_into().unwrap_or_default()),
                        changes: u64::from_be_bytes(changes.try_into().unwrap_or_default()),
                    };
                    out.marks.insert((*relay, *doc), mark);
                }
            }
        }
        Ok(out)
    }
}

/// The plaintext of a snapshot: format version, the document's address, its Automerge save.
pub(crate) fn encode_snapshot(addr: &DocAddr, save: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(save.len() + 64);
    out.push(SNAPSHOT_FORMAT_VERSION);
    addr.encode_into(&mut out);
    out.extend_from_slice(save);
    out
}

/// Splits [`encode_snapshot`]'s output into the address and the save.
pub(crate) fn decode_snapshot(plaintext: &[u8]) -> Result<(DocAddr, &[u8]), EngineError> {
    let (&version, rest) = plaintext.split_first().ok_or(EngineError::Mismatch {
        what: "snapshot format (empty)",
    })?;
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(EngineError::Mismatch {
            what: "snapshot format version",
        });
    }
    let (addr, used) = DocAddr::decode_prefix(rest).map_err(|_| EngineError::Mismatch {
        what: "snapshot document address",
    })?;
    Ok((addr, &rest[used..]))
}

impl Worker {
    /// Sets the number of changes after which snapshots are made (`None`: never).
    pub(crate) fn set_snapshot_after(&mut self, changes: Option<u64>) {
        self.snapshots.after_changes = changes;
    }

    // ---- making ----------------------------------------------------------------------------

    /// Makes and uploads up to `max` of the snapshots that are due, within `budget_ms` of
    /// worker time; returns how many it made.
    pub(super) fn make_snapshots(&mut self, max: usize, budget_ms: u64) -> usize {
        let Some(after) = self.snapshots.after_changes else {
            return 0;
        };
        let mut budget = max;
        let started = std::time::Instant::now();
        let spent = || started.elapsed() >= std::time::Duration::from_millis(budget_ms);
        for relay in 0..self.relays.len() {
            if self.relays[relay].state != ConnectionState::Live {
                continue;
            }
            let key = *self.relays[relay].addr.key.as_bytes();
            let mut due = Vec::new();
            for (doc, addr) in &self.docs {
                let Some(c) = self.relays[relay].session.doc_cursor(doc) else {
                    continue;
                };
                let mark = self.snapshots.marks.get(&(key, *doc)).copied();
                let settled = !c.fetching && !c.behind && !c.catching_up;
                if c.seq == 0
                    || !settled
                    || mark.is_some_and(|m| m.covers >= c.seq)
                    || self.snapshots.checked.get(&(relay, *doc)) == Some(&c.seq)
                    || self.snapshots.seeded.contains_key(doc)
                    || self.blocked.contains_key(doc)
                {
                    continue;
                }
                due.push((*doc, *addr, c.seq, mark.map_or(0, |m| m.changes)));
            }
            due.sort_by_key(|(doc, ..)| *doc);
            for (doc, addr, covers, changes_before) in due {
                if budget == 0 || spent() {
                    return max - budget;
                }
                let open = self.relays[relay]
                    .session
                    .any_pending(|p| matches!(p, Pending::PutSnapshot { doc: d, .. } if *d == doc));
                if open {
                    continue;
                }
                self.snapshots.checked.insert((relay, doc), covers);
                let changes = match self.replica.version_vector(&addr) {
                    Ok(vv) => vv.iter().map(|(_, n)| *n).sum::<u64>(),
                    Err(e) => {
                        tracing::warn!(?addr, error = %e, "reading a version vector failed");
                        continue;
                    }
                };
                if changes < changes_before.saturating_add(after) {
                    continue;
                }
                match self.put_snapshot(relay, &addr, covers, changes) {
                    Ok(true) => budget -= 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(?addr, error = %e, "making a snapshot failed"),
                }
            }
        }
        max - budget
    }

    /// Saves, seals and uploads a snapshot of `addr` covering `covers` on `relay`. `false` if
    /// the document is not ready for one (changes waiting for dependencies, no key yet).
    fn put_snapshot(
        &mut self,
        relay: usize,
        addr: &DocAddr,
        covers: u64,
        changes: u64,
    ) -> Result<bool, EngineError> {
        let Some(envelope) = self.seal_snapshot(addr, covers)? else {
            return Ok(false);
        };
        let (doc, group) = (addr.doc_id(), group_of(addr));
        self.request(
            relay,
            Pending::PutSnapshot {
                doc,
                covers,
                changes,
            },
            |req| Message::PutSnapshot {
                req,
                group,
                envelope,
            },
        );
        Ok(true)
    }

    /// Saves `addr` and seals the save as a snapshot covering `covers` (a relay sequence
    /// number; 0 for a peer). `None` if the document is not ready for one (changes waiting for
    /// dependencies, no key yet).
    pub(super) fn seal_snapshot(
        &mut self,
        addr: &DocAddr,
        covers: u64,
    ) -> Result<Option<SealedEnvelope>, EngineError> {
        let Some((save, waiting)) = self.replica.save_with_pending(addr)? else {
            return Ok(None);
        };
        if waiting > 0 {
            // A save would not hold the waiting changes, yet the cursor counts their envelopes.
            return Ok(None);
        }
        let group = group_of(addr);
        let Some((epoch, key)) = self.keyring.latest(&group) else {
            return Ok(None);
        };
        let header = EnvelopeHeader {
            kind: EnvelopeKind::Snapshot,
            doc: addr.doc_id(),
            epoch,
            author: self.device(),
            first_seq: covers,
            last_seq: covers,
        };
        let envelope =
            SealedEnvelope::seal(&self.secret, key, header, &encode_snapshot(addr, &save))?;
        Ok(Some(envelope))
    }

    /// A relay answered a `PutSnapshot`: remember what it holds (`stored`), or only in memory
    /// that this much was tried, so a refused snapshot is not made again at every tick.
    pub(super) fn on_snapshot_answered(
        &mut self,
        relay: usize,
        doc: DocId,
        covers: u64,
        changes: u64,
        stored: bool,
    ) {
        let Some(r) = self.relays.get(relay) else {
            return;
        };
        let key = *r.addr.key.as_bytes();
        let mark = Mark { covers, changes };
        self.snapshots.marks.insert((key, doc), mark);
        if !stored {
            return;
        }
        self.snapshots.made += 1;
        let mut value = covers.to_be_bytes().to_vec();
        value.extend_from_slice(&changes.to_be_bytes());
        let name = mark_setting(&key, &doc);
        if let Err(e) = self
            .replica
            .store()
            .write(|tx| tx.put_setting(&name, &value))
        {
            tracing::warn!(error = %e, "storing a snapshot mark failed");
        }
    }

    // ---- taking ----------------------------------------------------------------------------

    /// A snapshot in a subscription's catch-up.
    pub(super) fn on_snapshot(&mut self, relay: usize, req: u32, doc: DocId, envelope: Vec<u8>) {
        let asked = self
            .relays
            .get(relay)
            .and_then(|r| r.session.pending(req))
            .is_some_and(|p| matches!(p, Pending::Subscribe(docs) if docs.contains(&doc)));
        let Some(addr) = self.docs.get(&doc).copied() else {
            tracing::debug!(?doc, "snapshot of an unknown document dropped");
            return;
        };
        if !asked || self.snapshots.no_snapshot.contains(&doc) {
            tracing::debug!(?addr, "snapshot not asked for; dropped");
            return;
        }
        if let Some(r) = self.relays.get_mut(relay) {
            r.session.count_received(1, envelope.len() as u64);
        }
        if let Err(e) = self.take_snapshot(relay, &addr, &envelope) {
            tracing::warn!(?addr, error = %e, "snapshot refused; fetching the document instead");
            self.emit(Event::Refused {
                doc: addr,
                reason: format!("snapshot: {e}"),
            });
            if let Some(r) = self.relays.get_mut(relay) {
                r.session.snapshot_refused(doc);
            }
        }
    }

    /// Checks a snapshot, applies its changes in one call and moves the cursor.
    fn take_snapshot(
        &mut self,
        relay: usize,
        addr: &DocAddr,
        bytes: &[u8],
    ) -> Result<(), EngineError> {
        let cursor = self
            .relays
            .get(relay)
            .map_or(0, |r| r.session.cursor(&addr.doc_id()));
        match self.apply_snapshot(addr, bytes, Some(cursor))? {
            Some(covers) => self.snapshot_taken(relay, addr.doc_id(), covers),
            None => Ok(()),
        }
    }

    /// Checks a snapshot envelope of `addr` (made by a current device of this account, its
    /// changes by devices of the group's members) and applies it: a segment held nowhere here
    /// is installed whole, anything else gets its changes in one apply call. With a relay
    /// `cursor`, a snapshot covering no more than it is skipped (`None`); else returns what it
    /// covers.
    pub(super) fn apply_snapshot(
        &mut self,
        addr: &DocAddr,
        bytes: &[u8],
        cursor: Option<u64>,
    ) -> Result<Option<u64>, EngineError> {
        let doc = addr.doc_id();
        let env = SealedEnvelope::decode(bytes)?;
        let header = env.header;
        if header.kind != EnvelopeKind::Snapshot || header.first_seq != header.last_seq {
            return Err(EngineError::Mismatch {
                what: "snapshot envelope kind or range",
            });
        }
        let covers = header.first_seq;
        if cursor.is_some_and(|c| covers <= c) {
            // Nothing this device lacks.
            return Ok(None);
        }
        let group = group_of(addr);
        let keys = GroupKeys {
            keyring: &self.keyring,
            group,
        };
        // Only a current device of this account: it holds the same keys anyway, and another
        // member's device must not speak for everyone's changes.
        let log = &self.log;
        let own = |author: &DeviceId, _: &DocId, _: KeyEpoch| log.is_current(author);
        let opened = env.open(&doc, &keys, own)?;
        let (inside, save) = decode_snapshot(&opened.plaintext)?;
        if inside != *addr {
            return Err(EngineError::Mismatch {
                what: "document inside the snapshot",
            });
        }
        let loaded = Automerge::load(save).map_err(ModelError::from)?;
        let changes = loaded.get_changes(&[]);
        self.check_snapshot_changes(addr, &group, &changes)?;
        // A segment this device holds nothing of is installed whole from the save, which is
        // several times faster than applying its changes one by one.
        if matches!(addr, DocAddr::Segment(..)) {
            self.replica.defer_writes(true);
            let installed = self
                .replica
                .install_loaded_segment(addr, Some(loaded), save);
            self.replica.defer_writes(false);
            if installed? {
                self.emit(Event::ConversationListChanged);
                return Ok(Some(covers));
            }
        }
        self.replica.defer_writes(true);
        let applied = self.replica.apply(
            now_ms(),
            vec![ChangeBatch {
                addr: *addr,
                changes,
            }],
        );
        self.replica.defer_writes(false);
        let report = applied?;
        let refused = report.rejected.iter().any(|(a, _)| a == addr);
        self.after_apply(report);
        if refused {
            return Err(EngineError::Mismatch {
                what: "snapshot changes the model accepts",
            });
        }
        Ok(Some(covers))
    }

    /// A snapshot's content is in: watch the document, count it, move the cursor.
    fn snapshot_taken(&mut self, relay: usize, doc: DocId, covers: u64) -> Result<(), EngineError> {
        self.snapshots.seeded.insert(doc, relay);
        self.snapshots.taken += 1;
        let step = match self.relays.get_mut(relay) {
            Some(r) => r.session.on_snapshot(doc, covers),
            None => return Ok(()),
        };
        self.store_cursors(vec![(relay, doc, step)]);
        Ok(())
    }

    /// The checks an envelope's changes pass, for a snapshot's: every actor is a device of an
    /// account that is or was a member of the group, and in a segment every account a message
    /// or reaction names is its actor's.
    fn check_snapshot_changes(
        &self,
        addr: &DocAddr,
        group: &DocId,
        changes: &[automerge::Change],
    ) -> Result<(), EngineError> {
        for change in changes {
            let device = crate::model::doc::device_of(change.actor_id())?;
            if !self.may_write(&device, group) {
                return Err(EngineError::Mismatch {
                    what: "snapshot change authors and the group's member devices",
                });
            }
            if let DocAddr::Segment(..) = addr {
                let accounts = self.accounts_of(&device);
                let claims = crate::model::claimed_accounts(std::slice::from_ref(change)).ok_or(
                    EngineError::Mismatch {
                        what: "accounts named in the snapshot's changes",
                    },
                )?;
                if claims.iter().any(|c| !accounts.contains(c)) {
                    return Err(EngineError::Mismatch {
                        what: "a message or reaction account in the snapshot and its author's",
                    });
                }
            }
        }
        Ok(())
    }

    // ---- distrust --------------------------------------------------------------------------

    /// A subscription's catch-up ended: a document that took a snapshot and now has changes
    /// waiting for dependencies was given a snapshot that left changes out.
    pub(super) fn check_snapshot_catch_up(&mut self, relay: usize, docs: &[DocId]) {
        for doc in docs {
            if self.snapshots.seeded.get(doc) == Some(&relay) {
                self.check_seeded(*doc, "changes wait for dependencies after the catch-up");
            }
        }
    }

    /// After remote changes were applied: a document that took a snapshot and whose cursor is
    /// settled must have nothing waiting, and no envelope may contradict what it held.
    pub(super) fn watch_seeded(&mut self, report: &crate::model::ApplyReport) {
        if self.snapshots.seeded.is_empty() {
            return;
        }
        for (addr, e) in &report.rejected {
            let doc = addr.doc_id();
            if self.snapshots.seeded.contains_key(&doc)
                && matches!(e, ModelError::Equivocation { .. })
            {
                self.distrust(doc, "an envelope contradicts the snapshot's changes");
            }
        }
        for (addr, _) in &report.docs {
            let doc = addr.doc_id();
            let Some(relay) = self.snapshots.seeded.get(&doc).copied() else {
                continue;
            };
            let settled = self.relays.get(relay).is_some_and(|r| {
                r.session
                    .doc_cursor(&doc)
                    .is_some_and(|c| !c.fetching && !c.behind && !c.catching_up)
            });
            if settled {
                self.check_seeded(doc, "changes wait for dependencies past the snapshot");
            }
        }
    }

    fn check_seeded(&mut self, doc: DocId, why: &'static str) {
        let Some(addr) = self.docs.get(&doc).copied() else {
            return;
        };
        match self.replica.pending_len(&addr) {
            Ok(0) => {}
            Ok(_) => self.distrust(doc, why),
            Err(e) => tracing::warn!(?addr, error = %e, "reading a document failed"),
        }
    }

    /// Stops trusting the snapshot `doc` took: never take one of it again, fetch it whole.
    fn distrust(&mut self, doc: DocId, why: &'static str) {
        let Some(relay) = self.snapshots.seeded.remove(&doc) else {
            return;
        };
        let Some(addr) = self.docs.get(&doc).copied() else {
            return;
        };
        tracing::warn!(
            ?addr,
            why,
            "a snapshot left changes out; fetching the whole document"
        );
        self.emit(Event::Refused {
            doc: addr,
            reason: format!("snapshot left changes out: {why}"),
        });
        self.snapshots.no_snapshot.insert(doc);
        self.snapshots.distrusted += 1;
        let name = no_snapshot_setting(&doc);
        if let Err(e) = self.replica.store().write(|tx| tx.put_setting(&name, &[1])) {
            tracing::warn!(error = %e, "storing a no-snapshot mark failed");
        }
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        let after_seq = r.session.restart(doc);
        let key = *r.addr.key.as_bytes();
        self.pending_cursors.push((key, addr, after_seq));
        self.request(relay, Pending::Fetch(doc), |req| Message::Fetch {
            req,
            doc,
            after_seq,
            limit: FETCH_LIMIT,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_plaintext_round_trips_and_is_checked() {
        let addr = DocAddr::Segment(ConversationId::from_bytes([4; 16]), 2);
        let bytes = encode_snapshot(&addr, b"save");
        assert_eq!(bytes[0], SNAPSHOT_FORMAT_VERSION);
        let (back, save) = decode_snapshot(&bytes).unwrap();
        assert_eq!((back, save), (addr, &b"save"[..]));
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(matches!(
            decode_snapshot(&other),
            Err(EngineError::Mismatch {
                what: "snapshot format version"
            })
        ));
        assert!(decode_snapshot(&[]).is_err());
        assert!(decode_snapshot(&bytes[..3]).is_err());
    }

    #[test]
    fn marks_are_named_per_relay_and_document() {
        let doc = DocId::from_bytes([1; 32]);
        assert_ne!(mark_setting(&[1; 32], &doc), mark_setting(&[2; 32], &doc));
        assert!(mark_setting(&[0xab; 32], &doc).starts_with("snapshot/abab"));
    }
}
