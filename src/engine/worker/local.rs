//! This device's changes: sealing them into envelopes and the outbox.

use super::*;

impl Worker {
    // ---- local changes -----------------------------------------------------------------------

    /// Seals what local calls wrote into the outbox and offers it to the relays.
    pub(crate) fn after_local(&mut self) -> Result<(), EngineError> {
        let written = self.replica.take_written();
        // A roll-over writes a new segment: learn it so it gets subscribed.
        let metas: Vec<ConversationId> = written
            .iter()
            .filter_map(|a| match a {
                DocAddr::Segment(c, n)
                    if !self.docs.contains_key(&DocAddr::Segment(*c, *n).doc_id()) =>
                {
                    Some(*c)
                }
                DocAddr::Meta(c) if !self.docs.contains_key(&a.doc_id()) => Some(*c),
                _ => None,
            })
            .collect();
        for a in &written {
            self.docs.entry(a.doc_id()).or_insert(*a);
        }
        for c in metas {
            self.learn_segments(&c)?;
        }
        self.seal_new(written)
    }

    pub(super) fn seal_new(&mut self, addrs: BTreeSet<DocAddr>) -> Result<(), EngineError> {
        let sealed_now = self.prepare_seal(addrs)?;
        if sealed_now.is_empty() {
            return Ok(());
        }
        let direct = self.direct;
        let ids = self
            .replica
            .store()
            .write(|tx| write_sealed(tx, &sealed_now, direct))?;
        self.record_sealed(sealed_now, ids);
        Ok(())
    }

    /// Seals this device's changes to `addrs` that are past the sealed mark.
    pub(super) fn prepare_seal(
        &mut self,
        addrs: BTreeSet<DocAddr>,
    ) -> Result<Vec<Sealed>, EngineError> {
        let me = self.device();
        let my_account = self.log.account();
        let mut sealed_now: Vec<Sealed> = Vec::new();
        for addr in addrs {
            let group = group_of(&addr);
            let removed = self
                .groups
                .get(&group)
                .and_then(|g| g.latest())
                .is_some_and(|u| !u.is_member(&my_account));
            if removed {
                // No relay takes an envelope of a group this account was removed from; what is
                // written there stays on this device.
                continue;
            }
            let vv = self.replica.version_vector(&addr)?;
            let own = vv.seq(&me);
            let done = self.sealed.get(&addr).copied().unwrap_or(0);
            if own <= done {
                continue;
            }
            let Some((epoch, key)) = self.keyring.latest(&group) else {
                // No key yet (a conversation whose group has not arrived): sealed once it has.
                continue;
            };
            let (epoch, key) = (epoch, key.clone());
            let mut have = vv.clone();
            have.set(me, done);
            let Some(batch) = self.replica.changes_since(&addr, &have)? else {
                continue;
            };
            let mut envelopes = Vec::new();
            for part in batch.split() {
                let seqs: Vec<u64> = part.changes.iter().map(|c| c.seq()).collect();
                let (Some(first), Some(last)) = (seqs.iter().min(), seqs.iter().max()) else {
                    continue;
                };
                let header = EnvelopeHeader {
                    kind: EnvelopeKind::Changes,
                    doc: addr.doc_id(),
                    epoch,
                    author: me,
                    first_seq: *first,
                    last_seq: *last,
                };
                let env = SealedEnvelope::seal(&self.secret, &key, header, &part.encode())?;
                envelopes.push((group, env));
            }
            sealed_now.push((addr, own, envelopes));
        }
        Ok(sealed_now)
    }

    /// Takes envelopes written to the outbox (rows `ids`, in order) into memory and offers
    /// them to the relays.
    pub(super) fn record_sealed(&mut self, sealed_now: Vec<Sealed>, ids: Vec<i64>) {
        let mut ids = ids.into_iter();
        let mut fresh = Vec::new();
        for (addr, own, envelopes) in sealed_now {
            self.sealed.insert(addr, own);
            for (group, envelope) in envelopes {
                if self.direct {
                    self.forward_to_peers(&addr, &envelope.encode(), None);
                }
                if let Some(id) = ids.next() {
                    fresh.push((id, group, envelope.clone()));
                    self.outbox.insert(
                        id,
                        OutboxItem {
                            group,
                            envelope,
                            acked: 0,
                        },
                    );
                }
            }
        }
        self.offer_to_relays(&fresh);
    }

    /// Offers new outbox rows (id, group, envelope) to every live relay, then tells the app.
    pub(super) fn offer_to_relays(&mut self, fresh: &[(i64, DocId, SealedEnvelope)]) {
        for relay in self.live_relays() {
            for (outbox, group, envelope) in fresh {
                let (outbox, group, envelope) = (*outbox, *group, envelope.clone());
                self.request(relay, Pending::Append { outbox }, |req| Message::Append {
                    req,
                    group,
                    envelope,
                });
            }
        }
        self.emit_status();
    }
}
