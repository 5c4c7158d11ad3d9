//! Groups: verifying and absorbing updates, creating conversations, adding and removing members.

use super::*;
use crate::crypto::group::take_off_own;

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
        // Logs to fetch: (account, from entry).
        let mut missing_logs: Vec<(AccountId, u32)> = Vec::new();
        let mut absorbed = false;
        let mut removed = false;
        for update in updates {
            if update.group != group {
                continue;
            }
            let have = self.groups.get(&group).map_or(0, |g| g.updates.len());
            if (update.version as usize) < have {
                // The relay's chain differs from this device's own unconfirmed changes (made
                // offline while another device changed the group): take them off and make
                // them again on the relay's chain (`rebase_group`).
                let at = update.version as usize;
                let differs = self
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.updates[at] != update);
                let mine = match (relay, self.groups.get_mut(&group)) {
                    (Some(_), Some(g)) if differs => take_off_own(&mut g.updates, at, &me),
                    _ => None,
                };
                let Some(mine) = mine else {
                    continue;
                };
                self.rebase.entry(group).or_default().extend(mine);
            }
            let have = self.groups.get(&group).map_or(0, |g| g.updates.len());
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
            let signer_log = self
                .logs
                .get(&update.signer_account)
                .or((update.signer_account == self.log.account()).then_some(&self.log));
            match signer_log.map(|log| (log.device(&update.signer).is_some(), log.len())) {
                Some((true, _)) => {}
                Some((false, len)) => {
                    // The signer may be a device linked since this copy of its account's log
                    // was fetched: fetch the rest of the log once, then the update again.
                    let account = update.signer_account;
                    let asked = relay.and_then(|r| self.relays.get(r)).is_some_and(|r| {
                        r.session.any_pending(|p| *p == Pending::FetchLog(account))
                    });
                    if let (true, Some(relay)) = (asked, relay) {
                        // Asked already: fetch the chain again after the answer.
                        self.fetch_group(relay, group);
                        break;
                    }
                    if relay.is_some() && self.logs_refetched.insert((account, len)) {
                        missing_logs.push((account, len as u32));
                        break;
                    }
                    return Err(EngineError::Mismatch {
                        what: "group update signer and its account",
                    });
                }
                None => {
                    // The signer's log is needed first; fetch it and the update again later.
                    missing_logs.push((update.signer_account, 0));
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
            absorbed = true;
            for m in members {
                if m != self.log.account() && !self.logs.contains_key(&m) {
                    missing_logs.push((m, 0));
                }
            }
        }
        self.save_groups()?;
        if removed {
            self.on_removed(group)?;
        }
        missing_logs.sort();
        missing_logs.dedup();
        for (account, from_seq) in missing_logs {
            let Some(relay) = relay else {
                break;
            };
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq,
            });
            // Once the log is in, the rest of the chain is fetched again.
            self.fetch_group(relay, group);
        }
        if absorbed && relay.is_some() {
            self.rebase_group(group)?;
        }
        // Also when a relay sends what is held already: it may hold the group only now.
        if absorbed || relay.is_some() {
            self.rewrap_missing_keys(group)?;
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

    /// Posts an update of `group` that changes nothing but wraps its keys to the member
    /// devices the chain misses and this device answers for (`crypto::group::missing_wraps`).
    /// Posted to the live relays; joins the chain when one confirms it (`on_group_posted`).
    /// Offline, or with one in flight, nothing is done: it is checked again at the next
    /// connection.
    pub(super) fn rewrap_missing_keys(&mut self, group: DocId) -> Result<(), EngineError> {
        let (me, account) = (self.device(), self.account());
        let relays = self.live_relays();
        if relays.is_empty() || self.rewraps.keys().any(|(g, _)| *g == group) {
            return Ok(());
        }
        let Some(g) = self.groups.get(&group) else {
            return Ok(());
        };
        let (Some(latest), Some(_)) = (g.latest(), g.addr) else {
            return Ok(());
        };
        if !latest.is_member(&account) {
            return Ok(());
        }
        let epochs = self.keyring.epochs(&group);
        let logs: Vec<&DeviceLog> = latest
            .members
            .iter()
            .filter_map(|m| {
                if *m == account {
                    Some(&self.log)
                } else {
                    self.logs.get(m)
                }
            })
            .collect();
        let wrapped = crate::crypto::group::missing_wraps(
            &g.updates,
            group,
            &logs,
            &me,
            &epochs,
            &mut self.rng,
        )?;
        if wrapped.is_empty() {
            return Ok(());
        }
        let version = latest.version + 1;
        tracing::info!(
            ?group,
            version,
            keys = wrapped.len(),
            "wrapping a group's keys to member devices that lack them"
        );
        let update = GroupUpdate::sign(
            &self.secret,
            account,
            group,
            version,
            latest.members.clone(),
            wrapped,
            latest.label.clone(),
        )?;
        self.rewraps.insert((group, version), update.clone());
        for relay in relays {
            let update = update.clone();
            self.request(relay, Pending::PostGroup { group, version }, |req| {
                Message::PostGroup { req, update }
            });
        }
        Ok(())
    }

    /// Wraps keys again, where needed, in every group this account is a member of (after a
    /// connection's groups are known).
    pub(super) fn rewrap_all(&mut self) -> Result<(), EngineError> {
        let mut groups: Vec<DocId> = self.groups.keys().copied().collect();
        groups.sort();
        for group in groups {
            self.rewrap_missing_keys(group)?;
        }
        Ok(())
    }

    /// A relay stored a group update this device posted: a rewrap joins the chain now, if the
    /// chain has not moved meanwhile (then it is checked again).
    pub(super) fn on_group_posted(
        &mut self,
        group: DocId,
        version: u32,
    ) -> Result<(), EngineError> {
        let Some(update) = self.rewraps.remove(&(group, version)) else {
            return Ok(());
        };
        let g = self.groups.entry(group).or_default();
        if g.updates.len() != version as usize {
            return self.rewrap_missing_keys(group);
        }
        g.updates.push(update.clone());
        self.save_groups()?;
        if self.direct {
            self.forward_group_to_peers(&update, None);
        }
        Ok(())
    }

    /// Checks every group of `account` for keys to wrap again: a revocation in its log can
    /// make this device the keeper of a device (`crypto::group::key_keeper`).
    pub(super) fn rewrap_after_revocation(
        &mut self,
        account: AccountId,
    ) -> Result<(), EngineError> {
        let groups: Vec<DocId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.latest().is_some_and(|u| u.is_member(&account)))
            .map(|(id, _)| *id)
            .collect();
        for group in groups {
            self.rewrap_missing_keys(group)?;
        }
        Ok(())
    }

    /// A `PostGroup` refused by `relay`. A rewrap that lost to another device's update of the
    /// same version is dropped and the chain fetched: the winner is absorbed, and the keys
    /// wrapped again if it does not cover them. Any other refusal is left as it is: the update
    /// stays here (docs/SECURITY.md, "Concurrent membership changes").
    pub(super) fn on_group_refused(&mut self, relay: usize, group: DocId, version: u32) {
        if self.rewraps.remove(&(group, version)).is_some() {
            // The chain is checked again once fetched (`on_done`): the winner may cover the
            // devices, and a relay that lacks the group answers with an error, not a loop.
            self.fetch_group(relay, group);
            return;
        }
        let me = self.device();
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        let at = version as usize;
        if version == 0 {
            tracing::warn!(?group, "a new group of this device was refused");
            return;
        }
        // Another device changed the group first: take this device's changes off the chain,
        // fetch the relay's chain and make them again on top of it (`rebase_group`). Nothing
        // to take off: an earlier refusal of the same post, or the relay's chain fetched or
        // pushed since (`on_group_updates`), did it.
        let Some(mine) = take_off_own(&mut g.updates, at, &me) else {
            return;
        };
        tracing::info!(
            ?group,
            version,
            n = mine.len(),
            "a membership change lost a race; making it again"
        );
        self.rebase.entry(group).or_default().extend(mine);
        self.fetch_group(relay, group);
    }

    /// Makes this device's refused membership changes of `group` again on the chain as it now
    /// stands (`crypto::group::rebase_changes`).
    pub(super) fn rebase_group(&mut self, group: DocId) -> Result<(), EngineError> {
        let Some(mine) = self.rebase.remove(&group) else {
            return Ok(());
        };
        let Some(g) = self.groups.get(&group) else {
            return Ok(());
        };
        let Some(addr) = g.addr else {
            return Ok(());
        };
        let mut accounts: Vec<AccountId> = g
            .updates
            .iter()
            .chain(&mine)
            .flat_map(|u| u.members.iter().copied())
            .collect();
        accounts.sort();
        accounts.dedup();
        let devices = accounts
            .into_iter()
            .filter_map(|a| self.current_devices(&[a]).ok().map(|d| (a, d)))
            .collect();
        let keys = self.keyring.epochs(&group);
        let again = crate::crypto::group::rebase_changes(
            &mine,
            &g.updates,
            &self.secret,
            self.log.account(),
            &keys,
            &devices,
            &mut self.rng,
        )?;
        for update in again {
            self.publish_group(update, addr)?;
        }
        Ok(())
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
        // Envelopes written after the removal can never be opened here: nothing waits for them.
        let docs = &self.docs;
        self.blocked
            .retain(|d, _| docs.get(d).is_none_or(|a| group_of(a) != group));
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
        self.fetch_group_from(relay, group, from_version);
    }

    /// Asks `relay` for the updates of `group` from `from_version`.
    pub(super) fn fetch_group_from(&mut self, relay: usize, group: DocId, from_version: u32) {
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
        let epochs = self.keyring.epochs(&group);
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
