//! Documents: `Subscribe` (with catch-up), `Append` and its stored outcome (ack and push),
//! `Fetch`, and ephemeral datagrams.

use std::collections::BTreeMap;

use crate::crypto::envelope::{EnvelopeId, EnvelopeKind, SealedEnvelope};
use crate::ids::{AccountId, DocId};
use crate::relay::limits::{
    MAX_APPEND_BYTES_IN_FLIGHT_PER_CONN, MAX_APPENDS_IN_FLIGHT_PER_CONN, MAX_FETCH_LIMIT,
};
use crate::relay::store::NewEnvelope;
use crate::wire::message::{
    MAX_DATAGRAM_BYTES, Message, StoredEnvelope, Subscription, decode_datagram,
};

use super::{
    CatchUpItem, ConnId, DocState, Output, PendingAppend, PersistOp, RelayCore, RequestError,
    StoreOutcome,
};

impl RelayCore {
    /// The group `doc` belongs to, or would be created under: `Ok(None)` if the document is new
    /// and may be created under `group`.
    pub(super) fn doc_group(
        &self,
        doc: &DocId,
        group: &DocId,
    ) -> Result<Option<DocState>, RequestError> {
        match self.docs.get(doc) {
            Some(state) if state.group != *group => Err(RequestError::DocInOtherGroup {
                doc: *doc,
                group: state.group,
                requested: *group,
            }),
            Some(state) => Ok(Some(*state)),
            // A group's own document (its meta or account document) belongs to it alone.
            None if doc != group && self.groups.contains_key(doc) => {
                Err(RequestError::DocInOtherGroup {
                    doc: *doc,
                    group: *doc,
                    requested: *group,
                })
            }
            None => Ok(None),
        }
    }

    /// `Subscribe`: every item's group must exist with the account a member (otherwise nothing
    /// is registered); unknown documents are created under their group. Then what is stored
    /// past each cursor is sent (catch-up), then `Done`.
    pub(super) fn handle_subscribe(
        &mut self,
        conn: ConnId,
        req: u32,
        items: Vec<Subscription>,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let (_, account) = self.authenticated(conn, "Subscribe")?;
        // Each document once, with the smallest cursor asked for; a snapshot if any item of it
        // would take one.
        let mut wanted: BTreeMap<DocId, (DocId, u64, bool)> = BTreeMap::new();
        for item in &items {
            self.check_member(&item.group, &account)?;
            let (group, after_seq, snapshot) =
                wanted
                    .entry(item.doc)
                    .or_insert((item.group, item.after_seq, item.snapshot));
            if *group != item.group {
                return Err(RequestError::DocInOtherGroup {
                    doc: item.doc,
                    group: *group,
                    requested: item.group,
                });
            }
            *after_seq = (*after_seq).min(item.after_seq);
            *snapshot |= item.snapshot;
        }
        let mut created = Vec::new();
        for (doc, (group, _, _)) in &wanted {
            if self.doc_group(doc, group)?.is_none() {
                created.push((*doc, *group));
            }
        }
        let have = self.conns.get(&conn).map_or(0, |c| c.subs.len());
        let adding = wanted
            .keys()
            .filter(|d| self.conns.get(&conn).is_some_and(|c| !c.subs.contains(*d)))
            .count();
        let max = self.limits.max_subscriptions_per_conn;
        if have + adding > max {
            return Err(RequestError::TooManySubscriptions { have, adding, max });
        }
        for (doc, group) in &created {
            self.docs.insert(
                *doc,
                DocState {
                    group: *group,
                    last_seq: 0,
                },
            );
        }
        let mut catch_up = Vec::new();
        for (doc, (_, after_seq, snapshot)) in &wanted {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.subs.insert(*doc);
            }
            self.subscribers.entry(*doc).or_default().insert(conn);
            // A snapshot covers at most the document's last envelope, so a document with
            // nothing past the cursor has no snapshot to send either.
            if self.docs.get(doc).is_some_and(|s| s.last_seq > *after_seq) {
                catch_up.push(CatchUpItem {
                    doc: *doc,
                    after_seq: *after_seq,
                    // Only the account's own snapshot is ever served to it.
                    snapshot_for: snapshot.then_some(account),
                });
            }
        }
        let answer = if catch_up.is_empty() {
            Output::Send {
                conn,
                msg: Message::Done { req },
            }
        } else {
            Output::CatchUp {
                conn,
                req,
                items: catch_up,
            }
        };
        if created.is_empty() {
            out.push(answer);
        } else {
            out.push(Output::Persist {
                op: PersistOp::CreateDocs { docs: created },
                then: vec![answer],
            });
        }
        Ok(())
    }

    /// `Append`: checks kind, membership, the author (the connection's device, or a device it
    /// forwards for) and its signature, the document's group and the quota, then hands the
    /// envelope to the store under its author. The answer comes with
    /// [`Self::handle_envelope_stored`].
    pub(super) fn handle_append(
        &mut self,
        conn: ConnId,
        req: u32,
        group: DocId,
        envelope: SealedEnvelope,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let header = envelope.header;
        let (device, account) = self.authenticated(conn, "Append")?;
        match header.kind {
            EnvelopeKind::Changes => {}
            EnvelopeKind::Ephemeral => return Err(RequestError::EphemeralAppend),
            _ => return Err(RequestError::SnapshotAppend),
        }
        self.check_member(&group, &account)?;
        let doc = header.doc;
        let is_new = self.doc_group(&doc, &group)?.is_none();
        if self.pending.contains_key(&(conn, req)) {
            return Err(RequestError::RequestInFlight { req });
        }
        // The signature is the costly check, so it follows the ones on the request alone; the
        // quota check below needs the author's account it returns.
        let author_account = self.append_author(&group, device, account, &envelope)?;
        let bytes = envelope.encode();
        let len = bytes.len();
        if let Some(c) = self.conns.get(&conn) {
            if c.appends_in_flight >= MAX_APPENDS_IN_FLIGHT_PER_CONN
                || c.append_bytes_in_flight + len > MAX_APPEND_BYTES_IN_FLIGHT_PER_CONN
            {
                return Err(RequestError::AppendsInFlight {
                    count: c.appends_in_flight,
                    bytes: c.append_bytes_in_flight,
                });
            }
        }
        // The author's account pays, whoever uploads: its usage stays what its own devices
        // signed, as the store counts it from the rows it names, and a member cannot spend
        // another account's quota with anything but that account's own envelopes (each stored
        // once). The in-flight limits above stay the connection's: they bound what it queues.
        let used = self.usage(&author_account);
        let quota = self.limits.quota_bytes;
        if used.saturating_add(len as u64) > quota {
            return Err(RequestError::QuotaExceeded {
                account: author_account,
                used,
                adding: len as u64,
                quota,
            });
        }
        *self.usage.entry(author_account).or_default() += len as u64;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.appends_in_flight += 1;
            c.append_bytes_in_flight += len;
        }
        if is_new {
            self.docs.insert(doc, DocState { group, last_seq: 0 });
            out.push(Output::Persist {
                op: PersistOp::CreateDocs {
                    docs: vec![(doc, group)],
                },
                then: Vec::new(),
            });
        }
        self.pending.insert(
            (conn, req),
            PendingAppend {
                doc,
                account: author_account,
                bytes: bytes.clone(),
            },
        );
        out.push(Output::Append {
            conn,
            req,
            envelope: NewEnvelope {
                doc,
                id: EnvelopeId(*blake3::hash(&bytes).as_bytes()),
                author: header.author,
                account: author_account,
                first_seq: header.first_seq,
                last_seq: header.last_seq,
                bytes,
            },
        });
        Ok(())
    }

    /// The store's answer to an append: acknowledge it to the connection that sent it and, if
    /// it is new, push it to the document's other subscribers with the sequence number it
    /// follows.
    pub(super) fn handle_envelope_stored(
        &mut self,
        conn: ConnId,
        req: u32,
        doc: DocId,
        outcome: StoreOutcome,
        out: &mut Vec<Output>,
    ) {
        let Some(pending) = self.pending.remove(&(conn, req)) else {
            self.stats.unexpected_inputs += 1;
            return;
        };
        if pending.doc != doc {
            self.stats.unexpected_inputs += 1;
        }
        let doc = pending.doc;
        let len = pending.bytes.len();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.appends_in_flight = c.appends_in_flight.saturating_sub(1);
            c.append_bytes_in_flight = c.append_bytes_in_flight.saturating_sub(len);
        }
        let alive = self.conns.get(&conn).is_some_and(|c| !c.closing);
        let (answer, pushes) = match outcome {
            StoreOutcome::Stored { seq } => {
                let (prev, pushes) = self.record_stored(conn, doc, seq, &pending.bytes);
                (Ok((seq, prev, false)), pushes)
            }
            StoreOutcome::Duplicate { seq } => (Ok((seq, 0, true)), Vec::new()),
            StoreOutcome::Conflict { existing } => (
                Err(RequestError::Equivocation { doc, existing }),
                Vec::new(),
            ),
            StoreOutcome::Failed { reason } => {
                (Err(RequestError::StoreFailed { reason }), Vec::new())
            }
        };
        if !matches!(answer, Ok((_, _, false))) {
            self.refund(&pending.account, len as u64);
        }
        if alive {
            match answer {
                Ok((seq, prev, duplicate)) => out.push(Output::Send {
                    conn,
                    msg: Message::Ack {
                        req,
                        doc,
                        seq,
                        prev,
                        duplicate,
                    },
                }),
                Err(err) => self.refuse(conn, req, &err, out),
            }
        }
        out.extend(pushes);
    }

    /// Records a newly stored envelope, sent by connection `sender`, as the document's last.
    /// Returns the sequence number it follows and its push to every other subscriber that may
    /// still read the document (the author's other connections too, for a forward).
    fn record_stored(
        &mut self,
        sender: ConnId,
        doc: DocId,
        seq: u64,
        bytes: &[u8],
    ) -> (u64, Vec<Output>) {
        let Some(state) = self.docs.get_mut(&doc) else {
            self.stats.unexpected_inputs += 1;
            return (seq, Vec::new());
        };
        if seq <= state.last_seq {
            // Outcomes arrive in commit order, so this does not happen. If it did, the true
            // predecessor is unknown: no push, and a `prev` past `seq` that makes the sender
            // fetch rather than count a gap in.
            self.stats.unexpected_inputs += 1;
            return (state.last_seq, Vec::new());
        }
        let prev = std::mem::replace(&mut state.last_seq, seq);
        let group = state.group;
        let targets: Vec<ConnId> = self
            .subscribers
            .get(&doc)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| *id != sender)
            .filter(|id| {
                self.conns.get(id).is_some_and(|c| {
                    c.authenticated
                        && !c.closing
                        && c.account.is_some_and(|a| self.is_member(&group, &a))
                })
            })
            .collect();
        self.stats.pushes += targets.len() as u64;
        let pushes = targets
            .into_iter()
            .map(|id| Output::Push {
                conn: id,
                msg: Message::Envelopes {
                    req: 0,
                    doc,
                    items: vec![StoredEnvelope {
                        seq,
                        prev,
                        envelope: bytes.to_vec(),
                    }],
                    more: false,
                },
            })
            .collect();
        (prev, pushes)
    }

    fn refund(&mut self, account: &AccountId, bytes: u64) {
        if let Some(used) = self.usage.get_mut(account) {
            *used = used.saturating_sub(bytes);
        }
    }

    /// `Fetch`: stored envelopes of `doc` after `after_seq`, for members of its group. An
    /// unknown document has none.
    pub(super) fn handle_fetch(
        &mut self,
        conn: ConnId,
        req: u32,
        doc: DocId,
        after_seq: u64,
        limit: u32,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let (_, account) = self.authenticated(conn, "Fetch")?;
        let Some(state) = self.docs.get(&doc) else {
            out.push(Output::Send {
                conn,
                msg: Message::Envelopes {
                    req,
                    doc,
                    items: Vec::new(),
                    more: false,
                },
            });
            return Ok(());
        };
        self.check_member(&state.group, &account)?;
        let limit = if limit == 0 {
            MAX_FETCH_LIMIT
        } else {
            limit.min(MAX_FETCH_LIMIT)
        };
        out.push(Output::Fetch {
            conn,
            req,
            doc,
            after_seq,
            limit,
        });
        Ok(())
    }

    /// A datagram: an ephemeral envelope for a group, forwarded as is to every other
    /// authenticated connection of a member account. Anything invalid is dropped silently.
    pub(super) fn handle_datagram(
        &mut self,
        conn: ConnId,
        bytes: Vec<u8>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        match self.datagram_targets(conn, &bytes, now_ms) {
            Some(targets) => {
                self.stats.datagrams_forwarded += 1;
                for id in targets {
                    out.push(Output::SendDatagram {
                        conn: id,
                        bytes: bytes.clone(),
                    });
                }
            }
            None => self.stats.datagrams_dropped += 1,
        }
    }

    /// Where a datagram goes, or `None` if it must be dropped.
    fn datagram_targets(&mut self, conn: ConnId, bytes: &[u8], now_ms: u64) -> Option<Vec<ConnId>> {
        let limits = &self.limits;
        let c = self.conns.get_mut(&conn)?;
        let account = c.account?;
        if !c.authenticated || c.closing || !c.bucket.try_take(limits, now_ms) {
            return None;
        }
        if bytes.len() > MAX_DATAGRAM_BYTES {
            return None;
        }
        let device = c.device;
        let (group, envelope) = decode_datagram(bytes).ok()?;
        let header = envelope.header;
        if header.author != device || header.kind != EnvelopeKind::Ephemeral {
            return None;
        }
        let chain = self.groups.get(&group)?;
        if !chain.latest().is_member(&account) {
            return None;
        }
        if self.docs.get(&header.doc).is_some_and(|d| d.group != group) {
            return None;
        }
        let targets = chain
            .latest()
            .members
            .iter()
            .flat_map(|m| self.authenticated_conns(m))
            .filter(|id| *id != conn)
            .collect();
        Some(targets)
    }
}
