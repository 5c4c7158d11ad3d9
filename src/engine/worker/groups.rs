//! Groups: verifying and absorbing updates, creating conversations, adding and removing members.

use super::*;

impl Worker {
    // ---- groups ------------------------------------------------------------------------------

    pub(super) fn save_groups(&mut self) -> Result<(), EngineError> {
        let blob = state::encode_groups(&self.groups);
        self.replica
            .store()
            .write(|tx| tx.put_setting(state::GROUPS_SETTING, &blob))?;
        Ok(())
    }

    /// Absorbs updates of `group` from a relay (`Some(index)`: what is missing is asked of it)
    /// or a peer (`None`: a peer sends whole chains; a gap waits for the next).
    pub(super) fn on_group_updates(
        &mut self,
        relay: Option<usize>,
        group: DocId,
        updates: Vec<GroupUpdate>,
    ) -> Result<(), EngineError> {
        let me = self.device();
        let my_account = self.log.account();
        let mut new_docs = Vec::new();
        let mut missing_logs = Vec::new();
        let mut removed = false;
        for update in updates {
            if update.group != group {
                continue;
            }
            let have = self.groups.get(&group).map_or(0, |g| g.updates.len());
            if (update.version as usize) < have {
                continue;
            }
            if update.version as usize > have {
                // A push after updates this device has not seen (added to an existing group,
                // or a dropped push): fetch the chain from where it stands.
                if let Some(relay) = relay {
                    self.fetch_group(relay, group);
                }
                break;
            }
            let g = self.groups.entry(group).or_default();
            update.check_follows(g.latest())?;
            update.verify_signature()?;
            let signer_ok = self
                .logs
                .get(&update.signer_account)
                .or((update.signer_account == self.log.account()).then_some(&self.log))
                .map(|log| log.device(&update.signer).is_some());
            match signer_ok {
                Some(true) => {}
                Some(false) => {
                    return Err(EngineError::Mismatch {
                        what: "group update signer and its account",
                    });
                }
                None => {
                    // The signer's log is needed first; fetch it and the update again later.
                    missing_logs.push(update.signer_account);
                    break;
                }
            }
            let mut new_keys = Vec::new();
            for k in update.keys_for(&me) {
                let key = k.unwrap_with(&self.secret)?;
                if self.keyring.key(&k.doc, k.epoch).is_none() {
                    self.keyring.insert(k.doc, k.epoch, key.clone())?;
                    new_keys.push((k.doc, k.epoch, key));
                }
            }
            if !new_keys.is_empty() {
                self.replica.store().write(|tx| {
                    for (doc, epoch, key) in &new_keys {
                        tx.put_doc_key(doc, *epoch, key)?;
                    }
                    Ok(())
                })?;
            }
            let addr = update.open_label(&self.keyring).ok();
            let g = self.groups.entry(group).or_default();
            if g.addr.is_none() {
                g.addr = addr;
                if let Some(a) = addr {
                    new_docs.push(a);
                }
            }
            let members: Vec<AccountId> = update.members.clone();
            if self.direct {
                self.forward_group_to_peers(&update, None);
            }
            let g = self.groups.entry(group).or_default();
            let was_member = g.latest().is_some_and(|u| u.is_member(&my_account));
            removed |= was_member && !update.is_member(&my_account);
            g.updates.push(update);
            for m in members {
                if m != self.log.account() && !self.logs.contains_key(&m) {
                    missing_logs.push(m);
                }
            }
        }
        self.save_groups()?;
        if removed {
            self.on_removed(group)?;
        }
        missing_logs.sort();
        missing_logs.dedup();
        for account in missing_logs {
            let Some(relay) = relay else {
                break;
            };
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq: 0,
            });
            // Once the log is in, the rest of the chain is fetched again.
            self.fetch_group(relay, group);
        }
        for addr in &new_docs {
            self.docs.insert(addr.doc_id(), *addr);
            if let DocAddr::Meta(c) = addr {
                let seg = DocAddr::Segment(*c, 0);
                self.docs.insert(seg.doc_id(), seg);
                self.emit(Event::ConversationAdded { conversation: *c });
            }
        }
        let mut subscribe = new_docs.clone();
        for addr in &new_docs {
            if let DocAddr::Meta(c) = addr {
                subscribe.push(DocAddr::Segment(*c, 0));
            }
        }
        self.subscribe_everywhere(&subscribe);
        // Local changes waiting for a key (none usually) can be sealed now. Operations of this
        // turn are stored first: nothing is sealed (and sent) before it is durable.
        self.replica.flush()?;
        let all: BTreeSet<DocAddr> = self.docs.values().copied().collect();
        self.seal_new(all)
    }

    /// This account was removed from `group`: the relays will never take an envelope of it from
    /// this account, so the outbox rows of the group are dropped (stored at once) and reported
    /// with the removal, rather than offered for ever.
    fn on_removed(&mut self, group: DocId) -> Result<(), EngineError> {
        let rows: Vec<i64> = self
            .outbox
            .iter()
            .filter(|(_, it)| it.group == group)
            .map(|(id, _)| *id)
            .collect();
        if !rows.is_empty() {
            self.replica.store().write(|tx| {
                for id in &rows {
                    tx.ack_outbox(*id)?;
                }
                Ok(())
            })?;
            for id in &rows {
                self.outbox.remove(id);
            }
        }
        let conversation = match self.groups.get(&group).and_then(|g| g.addr) {
            Some(DocAddr::Meta(c)) => Some(c),
            _ => None,
        };
        tracing::info!(%group, dropped = rows.len(), "this account was removed from a group");
        if let Some(conversation) = conversation {
            self.emit(Event::RemovedFromConversation { conversation });
            if !rows.is_empty() {
                let envelopes = u32::try_from(rows.len()).unwrap_or(u32::MAX);
                self.emit(Event::NotDelivered {
                    conversation,
                    envelopes,
                });
            }
        }
        self.emit_status();
        Ok(())
    }

    /// Asks `relay` for the updates of `group` after the ones this device holds.
    pub(super) fn fetch_group(&mut self, relay: usize, group: DocId) {
        let from_version = self
            .groups
            .get(&group)
            .map_or(0, |g| g.updates.len() as u32);
        self.request(relay, Pending::FetchGroup(group), |req| {
            Message::FetchGroup {
                req,
                group,
                from_version,
            }
        });
    }

    /// Records a group update made here and posts it to connected relays.
    pub(super) fn publish_group(
        &mut self,
        update: GroupUpdate,
        addr: DocAddr,
    ) -> Result<(), EngineError> {
        let group = update.group;
        let version = update.version;
        let g = self.groups.entry(group).or_default();
        g.addr = Some(addr);
        g.updates.push(update.clone());
        self.save_groups()?;
        if self.direct {
            self.forward_group_to_peers(&update, None);
        }
        for relay in self.live_relays() {
            let update = update.clone();
            self.request(relay, Pending::PostGroup { group, version }, |req| {
                Message::PostGroup { req, update }
            });
        }
        Ok(())
    }

    pub(super) fn store_new_key(
        &mut self,
        group: DocId,
        epoch: KeyEpoch,
    ) -> Result<(), EngineError> {
        if let Some(key) = self.keyring.key(&group, epoch).cloned() {
            self.replica
                .store()
                .write(|tx| tx.put_doc_key(&group, epoch, &key))?;
        }
        Ok(())
    }

    /// Creates the account document's group (at account creation).
    pub(crate) fn create_account_group(&mut self) -> Result<(), EngineError> {
        let addr = DocAddr::Account(self.account());
        let group = addr.doc_id();
        if self.groups.contains_key(&group) {
            return Ok(());
        }
        let recipients = vec![self.secret.public()];
        self.create_group(addr, vec![self.account()], &recipients)
    }

    /// Makes version 0 of the group of `addr`: a fresh key wrapped to `recipients`, the label
    /// sealed under it, signed by this device; records and posts it.
    fn create_group(
        &mut self,
        addr: DocAddr,
        members: Vec<AccountId>,
        recipients: &[DevicePublic],
    ) -> Result<(), EngineError> {
        let group = addr.doc_id();
        let (epoch, wrapped) = self.keyring.rotate(group, recipients, &mut self.rng)?;
        self.store_new_key(group, epoch)?;
        let key = self
            .keyring
            .key(&group, epoch)
            .cloned()
            .ok_or(EngineError::Mismatch {
                what: "a key just made",
            })?;
        let label = SealedLabel::seal(&addr, epoch, &key, &mut self.rng);
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            0,
            members,
            wrapped,
            label,
        )?;
        self.docs.insert(group, addr);
        self.publish_group(update, addr)
    }

    /// Creates a conversation with `others` (whose device logs must be known) and its group.
    pub(crate) fn create_conversation(
        &mut self,
        title: &str,
        others: &[AccountId],
    ) -> Result<ConversationId, EngineError> {
        let mut members: Vec<AccountId> = others.to_vec();
        members.push(self.account());
        members.sort();
        members.dedup();
        let recipients = self.current_devices(&members)?;
        let c = self.replica.create_conversation(now_ms(), title, others)?;
        let addr = DocAddr::Meta(c);
        self.create_group(addr, members, &recipients)?;
        let seg = DocAddr::Segment(c, 0);
        self.docs.insert(seg.doc_id(), seg);
        self.subscribe_everywhere(&[addr, seg]);
        self.after_local()?;
        Ok(c)
    }

    /// Adds `account` (whose device log must be known) to a conversation: every epoch's key is
    /// wrapped to its devices, since a CRDT needs its whole history.
    pub(crate) fn add_member(
        &mut self,
        c: &ConversationId,
        account: AccountId,
    ) -> Result<(), EngineError> {
        let addr = DocAddr::Meta(*c);
        let group = addr.doc_id();
        let latest = self.latest_update(c)?;
        if latest.is_member(&account) {
            return Ok(());
        }
        let devices = self.current_devices(&[account])?;
        self.replica.add_member(now_ms(), c, &account)?;
        let mut wrapped = Vec::new();
        let epochs: Vec<(KeyEpoch, DocKey)> = self
            .keyring
            .iter()
            .filter(|(d, _, _)| **d == group)
            .map(|(_, e, k)| (e, k.clone()))
            .collect();
        for d in &devices {
            for (epoch, key) in &epochs {
                wrapped.push(crate::crypto::keys::WrappedKey::wrap(
                    key,
                    group,
                    *epoch,
                    d,
                    &mut self.rng,
                )?);
            }
        }
        let mut members = latest.members.clone();
        members.push(account);
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            latest.version + 1,
            members,
            wrapped,
            latest.label.clone(),
        )?;
        self.publish_group(update, addr)?;
        self.after_local()
    }

    /// Removes `account` from a conversation and starts a new key epoch for the remaining
    /// members' devices: the removed account cannot read what is written afterwards.
    pub(crate) fn remove_member(
        &mut self,
        c: &ConversationId,
        account: AccountId,
    ) -> Result<(), EngineError> {
        let addr = DocAddr::Meta(*c);
        let group = addr.doc_id();
        let latest = self.latest_update(c)?;
        if !latest.is_member(&account) {
            return Ok(());
        }
        self.replica.remove_member(c, &account)?;
        let members: Vec<AccountId> = latest
            .members
            .iter()
            .copied()
            .filter(|m| *m != account)
            .collect();
        let recipients = self.current_devices(&members)?;
        let (epoch, wrapped) = self.keyring.rotate(group, &recipients, &mut self.rng)?;
        self.store_new_key(group, epoch)?;
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            latest.version + 1,
            members,
            wrapped,
            latest.label.clone(),
        )?;
        self.publish_group(update, addr)?;
        self.after_local()
    }

    /// The latest update of a conversation's group.
    fn latest_update(&self, c: &ConversationId) -> Result<GroupUpdate, EngineError> {
        self.groups
            .get(&DocAddr::Meta(*c).doc_id())
            .and_then(|g| g.latest().cloned())
            .ok_or(EngineError::UnknownConversation(*c))
    }

    /// Member accounts of every group, for checks.
    pub(crate) fn group_members(&self, group: &DocId) -> Option<Vec<AccountId>> {
        self.groups
            .get(group)
            .and_then(|g| g.latest())
            .map(|u| u.members.clone())
    }
}
