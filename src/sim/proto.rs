//! What a simulated device does with each message from the relay: the checks and bookkeeping
//! of the engine (`src/engine/worker/{relays,envelopes,groups}.rs`), sans-IO.

use crate::crypto::device_log::DeviceLog;
use crate::crypto::envelope::{EnvelopeError, EnvelopeKind, SealedEnvelope};
use crate::crypto::group::GroupUpdate;
use crate::crypto::keys::KeyEpoch;
use crate::engine::session::Pending;
use crate::ids::{AccountId, DeviceId, DocAddr, DocId};
use crate::model::ChangeBatch;
use crate::wire::frame::ErrorCode;
use crate::wire::message::{Message, StoredEnvelope};

use crate::crypto::group::take_off_own;

use super::device::{Device, GroupKeys, MAX_BLOCKED_RETRIES, Stage, group_of};

/// Why an envelope was not applied.
pub(super) enum OpenError {
    /// The author's log or the epoch's key may still arrive.
    NotYet(String),
    /// Refused for good.
    Refused(String),
    /// Its key's epoch is wrapped to other devices of the group, not yet to this one.
    AwaitsRewrap,
    /// Sealed under a key made after this account's removal.
    AfterRemoval,
}

impl Device {
    /// Handles one message from the relay, then commits the turn.
    pub fn handle(&mut self, msg: Message, now_ms: u64) {
        self.last_heard_ms = now_ms;
        // An error closing the connection (a revoked device) keeps the backoff growing.
        if !matches!(msg, Message::Error { req: 0, .. }) {
            self.attempt = 0;
        }
        match msg {
            Message::HelloOk {
                req,
                log_len,
                groups,
                ..
            } => {
                self.session.finish(req);
                self.on_hello_ok(log_len, &groups);
            }
            Message::Done { req } => self.on_done(req),
            Message::Ack {
                req,
                doc,
                seq,
                prev,
                duplicate,
            } => {
                if let Some(Pending::Append { outbox }) = self.session.finish(req) {
                    self.outbox.remove(&(outbox as u64));
                }
                if !duplicate {
                    let step = self.session.on_pushed(doc, seq, prev);
                    if let Some(after) = step.fetch_after {
                        self.fetch(doc, after);
                    }
                }
            }
            Message::Envelopes {
                req,
                doc,
                items,
                more,
            } => self.on_envelopes(req, doc, items, more, now_ms),
            Message::LogEntries {
                req,
                account,
                first_seq,
                entries,
            } => {
                if req != 0 {
                    self.session.finish(req);
                }
                self.on_log_entries(account, first_seq, entries);
            }
            Message::GroupUpdates {
                req,
                group,
                updates,
            } => {
                let answer =
                    req != 0 && matches!(self.session.pending(req), Some(Pending::FetchGroup(_)));
                self.on_group_updates(group, updates);
                if answer {
                    self.retry_blocked();
                }
            }
            Message::Error { req, code, text } => self.on_error(req, code, text),
            other => self.refused.push(format!("unexpected message {other:?}")),
        }
        self.commit();
    }

    fn on_hello_ok(&mut self, relay_len: u32, groups: &[(DocId, u32)]) {
        let ours = self.log.len() as u32;
        let account = self.account();
        if relay_len < ours {
            let entries = self.log.entries()[relay_len as usize..].to_vec();
            let req = self.session.request(Pending::LogAppendThenHello);
            self.out.push(Message::LogAppend {
                req,
                account,
                first_seq: relay_len,
                entries,
            });
            return;
        }
        if relay_len > ours {
            let req = self.session.request(Pending::FetchLog(account));
            self.out.push(Message::FetchLog {
                req,
                account,
                from_seq: ours,
            });
        }
        self.set_relay_groups(groups);
        self.stage = Stage::Live;
        self.subscribe_new();
        self.send_outbox();
        self.rewrap_all();
    }

    fn on_done(&mut self, req: u32) {
        match self.session.finish(req) {
            Some(Pending::Subscribe(docs)) => {
                self.session.subscription_ended(req);
                for (doc, after) in self.session.end_catch_up(&docs) {
                    self.fetch(doc, after);
                }
            }
            Some(Pending::LogAppendThenHello) => {
                let (account, log_len, log_head) =
                    (self.account(), self.log.len() as u32, self.log.head());
                let req = self.session.request(Pending::Hello);
                self.out.push(Message::Hello {
                    req,
                    account,
                    log_len,
                    log_head,
                });
            }
            Some(Pending::FetchGroup(group)) => {
                self.rebase_group(group);
                self.rewrap_missing_keys(group);
                self.retry_blocked();
                self.subscribe_new();
            }
            Some(Pending::PostGroup { group, version }) => {
                self.on_group_posted(group, version);
                self.subscribe_new();
            }
            _ => self.subscribe_new(),
        }
    }

    fn on_error(&mut self, req: u32, code: ErrorCode, text: String) {
        if req == 0 {
            // The connection as a whole (e.g. this device was revoked).
            self.drop_link = true;
            return;
        }
        match self.session.finish(req) {
            Some(Pending::Append { outbox }) => {
                // Refused for good: an equivocation, or the write of a member removed
                // meanwhile. Anything else is offered again a second later.
                let group = self.outbox.get(&(outbox as u64)).map(|o| o.group);
                let account = self.account();
                // Another device's envelope passed on from a peer whose author the relay does not
                // accept (revoked, or never a member as the relay knows): never taken.
                let forwarded = self
                    .outbox
                    .get(&(outbox as u64))
                    .is_some_and(|o| o.envelope.header.author != self.device());
                let removed = forwarded
                    || group.is_some_and(|g| {
                        self.groups
                            .get(&g)
                            .and_then(|g| g.latest())
                            .is_some_and(|u| !u.is_member(&account))
                    });
                if code == ErrorCode::REJECTED || (code == ErrorCode::UNAUTHORISED && removed) {
                    self.outbox.remove(&(outbox as u64));
                    self.refused.push(format!("append refused: {text}"));
                } else {
                    // As the engine: an append refused `UNAUTHORISED` asks for the group's
                    // later updates (once at a time), which bring a removal the relay knows of.
                    if let Some(g) = group
                        .filter(|g| code == ErrorCode::UNAUTHORISED && self.groups.contains_key(g))
                    {
                        let asking = self
                            .session
                            .any_pending(|p| matches!(p, Pending::FetchGroup(f) if *f == g));
                        if !asking {
                            let from = self.groups[&g].updates.len() as u32;
                            self.fetch_group(g, from);
                        }
                    }
                    self.defer_append(outbox as u64);
                }
            }
            Some(Pending::Subscribe(docs)) => {
                // A group changed under the subscription: learn it, subscribe again later.
                self.session.subscription_ended(req);
                self.session.end_catch_up(&docs);
                for d in &docs {
                    self.subscribed_mut().remove(d);
                }
                let groups: Vec<(DocId, u32)> = self
                    .groups
                    .iter()
                    .map(|(g, c)| (*g, c.updates.len() as u32))
                    .collect();
                for (g, from) in groups {
                    self.fetch_group(g, from);
                }
            }
            Some(Pending::Fetch(doc)) => self.session.fetch_failed(&doc),
            Some(Pending::PostGroup { group, version }) if code == ErrorCode::REJECTED => {
                // A rewrap that lost to another update of its version is taken back.
                if self.rewraps.remove(&(group, version)).is_some() {
                    // Checked again once the chain is fetched, as in the engine.
                    let from = self
                        .groups
                        .get(&group)
                        .map_or(0, |g| g.updates.len() as u32);
                    self.fetch_group(group, from);
                } else if !self.take_off_refused_changes(group, version) {
                    self.refused.push(format!("group update refused: {text}"));
                }
            }
            _ => {}
        }
    }

    fn on_log_entries(
        &mut self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<crate::crypto::device_log::DeviceLogEntry>,
    ) {
        let revokes = entries
            .iter()
            .any(|e| matches!(e.action, crate::crypto::device_log::EntryAction::Revoke(_)));
        self.absorb_log_entries(account, first_seq, entries);
        if revokes {
            self.rewrap_after_revocation(account);
        }
    }

    fn absorb_log_entries(
        &mut self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<crate::crypto::device_log::DeviceLogEntry>,
    ) {
        let own = account == self.account();
        if !own && !self.logs.contains_key(&account) {
            if first_seq == 0 {
                match DeviceLog::verify(&account, entries) {
                    Ok(log) => {
                        self.logs.insert(account, log);
                    }
                    Err(e) => self.refused.push(format!("log of {account:?}: {e}")),
                }
            }
            return;
        }
        for entry in entries {
            let log = if own {
                &mut self.log
            } else {
                self.logs.get_mut(&account).expect("checked above")
            };
            if let Err(e) = log.append(entry) {
                self.refused.push(format!("log entry of {account:?}: {e}"));
                break;
            }
        }
        if own && !self.is_current() {
            self.drop_link = true;
        }
    }

    /// Absorbs updates of `group` from the relay, which holds the group.
    fn on_group_updates(&mut self, group: DocId, updates: Vec<GroupUpdate>) {
        self.absorb_group_updates(group, updates, true);
        self.relay_groups_mut().insert(group);
        self.subscribe_new();
    }

    /// Verifies and absorbs updates of `group`, as the engine does, whoever delivers them
    /// (`from_relay`: the relay, whose chain this device's own unconfirmed changes yield to).
    pub(super) fn absorb_group_updates(
        &mut self,
        group: DocId,
        updates: Vec<GroupUpdate>,
        from_relay: bool,
    ) {
        let me = self.device();
        let my_account = self.account();
        let mut absorbed = false;
        for update in updates {
            if update.group != group {
                continue;
            }
            let have = self.groups.get(&group).map_or(0, |g| g.updates.len());
            if (update.version as usize) < have {
                // The relay's chain differs from this device's own unconfirmed changes: take
                // them off and make them again, as the engine does.
                let at = update.version as usize;
                let differs = self
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.updates[at] != update);
                let mine = match self.groups.get_mut(&group) {
                    Some(g) if from_relay && differs => take_off_own(&mut g.updates, at, &me),
                    _ => None,
                };
                let Some(mine) = mine else {
                    continue;
                };
                self.rebase.entry(group).or_default().extend(mine);
            }
            let have = self.groups.get(&group).map_or(0, |g| g.updates.len());
            if update.version as usize > have {
                self.fetch_group(group, have as u32);
                break;
            }
            let g = self.groups.entry(group).or_default();
            let checked = update
                .check_follows(g.latest())
                .and_then(|()| update.verify_signature());
            if let Err(e) = checked {
                self.refused.push(format!("group update: {e}"));
                break;
            }
            let signer_log = if update.signer_account == my_account {
                Some(&self.log)
            } else {
                self.logs.get(&update.signer_account)
            };
            match signer_log.map(|l| (l.device(&update.signer).is_some(), l.len())) {
                Some((true, _)) => {}
                Some((false, len)) => {
                    // Maybe a device linked since this copy of the log: fetch the rest once.
                    let account = update.signer_account;
                    if self
                        .session
                        .any_pending(|p| *p == Pending::FetchLog(account))
                    {
                        // Asked already: fetch the chain again after the answer.
                        self.fetch_group(group, have as u32);
                        break;
                    }
                    if self.logs_refetched.insert((account, len)) {
                        let req = self.session.request(Pending::FetchLog(account));
                        self.out.push(Message::FetchLog {
                            req,
                            account,
                            from_seq: len as u32,
                        });
                        self.fetch_group(group, have as u32);
                        break;
                    }
                    self.refused
                        .push("group update signer is not a device of its account".into());
                    break;
                }
                None => {
                    let account = update.signer_account;
                    let req = self.session.request(Pending::FetchLog(account));
                    self.out.push(Message::FetchLog {
                        req,
                        account,
                        from_seq: 0,
                    });
                    self.fetch_group(group, have as u32);
                    break;
                }
            }
            for k in update.keys_for(&me) {
                match k.unwrap_with(&self.secret) {
                    Ok(key) => {
                        if self.keyring.key(&k.doc, k.epoch).is_none() {
                            let _ = self.keyring.insert(k.doc, k.epoch, key);
                        }
                    }
                    Err(e) => self.refused.push(format!("wrapped key: {e}")),
                }
            }
            let addr = update.open_label(&self.keyring).ok();
            let g = self.groups.entry(group).or_default();
            if g.addr.is_none() {
                g.addr = addr;
            }
            let was_member = g.latest().is_some_and(|u| u.is_member(&my_account));
            let removed = was_member && !update.is_member(&my_account);
            g.updates.push(update);
            absorbed = true;
            if removed {
                self.on_removed(group);
            }
        }
        if absorbed && from_relay {
            self.rebase_group(group);
        }
        // Also when the relay sends what is held already: it may hold the group only now.
        if absorbed || from_relay {
            self.rewrap_missing_keys(group);
        }
    }

    /// Wraps the group's keys to member devices the chain misses, as the engine does
    /// (`crypto::group::missing_wraps`).
    /// After a revocation in `account`'s log: this device may now be a device's keeper.
    pub(super) fn rewrap_after_revocation(&mut self, account: AccountId) {
        let groups: Vec<DocId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.latest().is_some_and(|u| u.is_member(&account)))
            .map(|(id, _)| *id)
            .collect();
        for group in groups {
            self.rewrap_missing_keys(group);
        }
    }

    fn rewrap_missing_keys(&mut self, group: DocId) {
        let me = self.device();
        let live = self.stage == Stage::Live && self.link.is_some();
        if !live || self.rewraps.keys().any(|(g, _)| *g == group) {
            return;
        }
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        let (Some(latest), Some(_)) = (g.latest(), g.addr) else {
            return;
        };
        if !latest.is_member(&self.account()) {
            return;
        }
        let epochs = self.keyring.epochs(&group);
        let account = self.account();
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
        )
        .expect("current devices' keys verify");
        if wrapped.is_empty() {
            return;
        }
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            latest.version + 1,
            latest.members.clone(),
            wrapped,
            latest.label.clone(),
        )
        .expect("a valid update");
        let version = update.version;
        self.rewraps_posted += 1;
        self.rewraps.insert((group, version), update.clone());
        // Not `post_group`: the relay may not hold the group (it is known once it confirms).
        let req = self.session.request(Pending::PostGroup { group, version });
        self.out.push(Message::PostGroup { req, update });
    }

    /// Wraps keys again where needed in every group (once a connection's groups are known).
    pub(super) fn rewrap_all(&mut self) {
        let groups: Vec<DocId> = self.groups.keys().copied().collect();
        for group in groups {
            self.rewrap_missing_keys(group);
        }
    }

    /// A membership change of this device refused because another update took its version:
    /// takes it (and what followed it here) off the chain to make it again, as the engine
    /// does. False if the refused update is not this device's own, unconfirmed change.
    fn take_off_refused_changes(&mut self, group: DocId, version: u32) -> bool {
        let me = self.device();
        let Some(g) = self.groups.get_mut(&group) else {
            return false;
        };
        let at = version as usize;
        if version == 0 {
            return false;
        }
        // Nothing to take off: taken off already, by an earlier refusal of the same post or
        // the relay's chain fetched or pushed since.
        let Some(mine) = take_off_own(&mut g.updates, at, &me) else {
            return true;
        };
        self.rebase.entry(group).or_default().extend(mine);
        self.fetch_group(group, version);
        true
    }

    /// Makes refused changes again on the fetched chain (`crypto::group::rebase_changes`).
    fn rebase_group(&mut self, group: DocId) {
        let Some(mine) = self.rebase.remove(&group) else {
            return;
        };
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        let Some(addr) = g.addr else {
            return;
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
            .map(|a| (a, self.current_devices(&[a])))
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
        )
        .expect("member devices' keys verify");
        for update in again {
            self.rebased += 1;
            self.publish_group(update, addr);
        }
    }

    /// The relay stored a group update of this device: a rewrap joins the chain now, unless
    /// the chain moved meanwhile (then it is checked again).
    fn on_group_posted(&mut self, group: DocId, version: u32) {
        let Some(update) = self.rewraps.remove(&(group, version)) else {
            return;
        };
        self.relay_groups_mut().insert(group);
        let g = self.groups.entry(group).or_default();
        if g.updates.len() != version as usize {
            self.rewrap_missing_keys(group);
            return;
        }
        g.updates.push(update);
    }

    fn on_envelopes(
        &mut self,
        req: u32,
        doc: DocId,
        items: Vec<StoredEnvelope>,
        more: bool,
        now_ms: u64,
    ) {
        let before = self.session.cursor(&doc);
        let step = if req == 0 {
            let mut step = crate::engine::session::CursorStep::default();
            for it in &items {
                let s = self.session.on_pushed(doc, it.seq, it.prev);
                step.advanced_to = s.advanced_to.or(step.advanced_to);
                step.fetch_after = s.fetch_after.or(step.fetch_after);
            }
            step
        } else {
            let is_fetch = matches!(self.session.pending(req), Some(Pending::Fetch(_)));
            if is_fetch {
                self.session.finish(req);
            }
            let chain: Vec<(u64, u64)> = items.iter().map(|i| (i.seq, i.prev)).collect();
            let step = self.session.on_answer(doc, &chain, more && is_fetch);
            if !more && is_fetch {
                self.session.caught_up(&doc);
            }
            step
        };
        let Some(addr) = self.addr_of(&doc) else {
            self.refused.push("envelopes of an unknown document".into());
            return;
        };
        let attempts = self.blocked_mut().get(&doc).copied().unwrap_or(0);
        let mut batches = Vec::new();
        let mut opened = Vec::new();
        let mut not_yet = false;
        for it in &items {
            match self.open_changes(&addr, &it.envelope) {
                Ok(Some(batch)) => {
                    batches.push(batch);
                    opened.push(it.envelope.clone());
                }
                Ok(None) => {}
                Err(OpenError::NotYet(_)) if attempts < MAX_BLOCKED_RETRIES => not_yet = true,
                // A key the chain wraps to other devices: waits for its keeper, as the engine.
                Err(OpenError::AwaitsRewrap) => not_yet = true,
                Err(OpenError::AfterRemoval) => {}
                Err(OpenError::NotYet(e) | OpenError::Refused(e)) => {
                    self.refused.push(format!("envelope: {e}"))
                }
            }
        }
        if not_yet {
            // Keep the cursor, learn what is missing, fetch again.
            self.session.rewind(&doc, before);
            // An attempt counts only once what it lacks was asked for (not while offline, nor
            // while the same is asked already), as in the engine.
            let asked = self.refresh_group_of(&addr);
            self.blocked_mut().insert(doc, attempts + u32::from(asked));
            return;
        }
        self.blocked_mut().remove(&doc);
        if !batches.is_empty() {
            let local = self.local_ms(now_ms);
            let report = self.replica.apply(local, batches);
            if report.rejected.is_empty() {
                self.archive_accepted(&addr, opened, None);
            }
            for (addr, e) in report.rejected {
                self.refused.push(format!("batch of {addr:?}: {e}"));
            }
        }
        if let Some(after) = step.fetch_after {
            self.fetch(doc, after);
        }
        self.subscribe_new();
    }

    /// Asks for the group members' logs and the group's later updates; false if not live or
    /// asked already.
    fn refresh_group_of(&mut self, addr: &DocAddr) -> bool {
        let group = group_of(addr);
        let live = self.stage == Stage::Live && self.link.is_some();
        if !live
            || self
                .session
                .any_pending(|p| matches!(p, Pending::FetchGroup(g) if *g == group))
        {
            return false;
        }
        let members = self
            .groups
            .get(&group)
            .and_then(|g| g.latest())
            .map(|u| u.members.clone())
            .unwrap_or_default();
        for account in members {
            let from_seq = if account == self.account() {
                self.log.len() as u32
            } else {
                self.logs.get(&account).map_or(0, |l| l.len() as u32)
            };
            let req = self.session.request(Pending::FetchLog(account));
            self.out.push(Message::FetchLog {
                req,
                account,
                from_seq,
            });
        }
        let from = self
            .groups
            .get(&group)
            .map_or(0, |g| g.updates.len() as u32);
        self.fetch_group(group, from);
        true
    }

    /// The accounts whose logs list `device`.
    fn accounts_of(&self, device: &DeviceId) -> Vec<AccountId> {
        let mut out: Vec<AccountId> = self
            .logs
            .iter()
            .filter(|(_, l)| l.device(device).is_some())
            .map(|(a, _)| *a)
            .collect();
        if self.log.device(device).is_some() {
            out.push(self.account());
        }
        out
    }

    /// The engine's checks on an envelope (`worker/envelopes.rs::open_changes`).
    pub(super) fn open_changes(
        &self,
        addr: &DocAddr,
        bytes: &[u8],
    ) -> Result<Option<ChangeBatch>, OpenError> {
        let refused = |e: String| OpenError::Refused(e);
        let env = SealedEnvelope::decode(bytes).map_err(|e| refused(e.to_string()))?;
        if env.header.kind != EnvelopeKind::Changes {
            return Ok(None);
        }
        let group = group_of(addr);
        let keys = GroupKeys {
            keyring: &self.keyring,
            group,
        };
        let may_write = |author: &DeviceId, _: &DocId, _: KeyEpoch| {
            let accounts = self.accounts_of(author);
            self.groups
                .get(&group)
                .is_some_and(|g| accounts.iter().any(|a| g.ever_member(a)))
        };
        let opened = env
            .open(&addr.doc_id(), &keys, may_write)
            .map_err(|e| match e {
                EnvelopeError::MissingKey { epoch, .. }
                    if self.groups.get(&group).is_some_and(|g| {
                        g.latest().is_some_and(|u| u.is_member(&self.account()))
                            && g.updates
                                .iter()
                                .any(|u| u.keys.iter().any(|k| k.doc == group && k.epoch == epoch))
                    }) =>
                {
                    OpenError::AwaitsRewrap
                }
                // Written after this account's removal: never readable here, nothing to wait
                // for (as in the engine).
                EnvelopeError::MissingKey { .. }
                    if self
                        .groups
                        .get(&group)
                        .and_then(|g| g.latest())
                        .is_some_and(|u| !u.is_member(&self.account())) =>
                {
                    OpenError::AfterRemoval
                }
                EnvelopeError::NotAuthorised { .. } | EnvelopeError::MissingKey { .. } => {
                    OpenError::NotYet(e.to_string())
                }
                e => refused(e.to_string()),
            })?;
        let batch = ChangeBatch::decode(&opened.plaintext).map_err(|e| refused(e.to_string()))?;
        if batch.addr != *addr {
            return Err(refused("document inside the envelope".into()));
        }
        let h = opened.header;
        let expected = (h.last_seq - h.first_seq).checked_add(1);
        let own = batch.changes.iter().all(|c| {
            c.actor_id().to_bytes() == h.author.as_bytes()
                && (h.first_seq..=h.last_seq).contains(&c.seq())
        });
        if !own || Some(batch.changes.len() as u64) != expected {
            return Err(refused("changes and the envelope's author range".into()));
        }
        if let DocAddr::Segment(..) = addr {
            let accounts = self.accounts_of(&h.author);
            let claims = crate::model::claimed_accounts(&batch.changes)
                .ok_or_else(|| refused("accounts named in the changes".into()))?;
            if claims.iter().any(|c| !accounts.contains(c)) {
                return Err(refused(
                    "message account and signing device's account".into(),
                ));
            }
        }
        Ok(Some(batch))
    }
}
