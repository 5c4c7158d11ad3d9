//! Talking to relays: the connection sequence, answers, acks, cursors, heartbeats.

use super::*;

impl Worker {
    // ---- network input ---------------------------------------------------------------------

    /// Every second: reconnects to relays that went silent with requests open, sends a
    /// heartbeat to quiet ones, and offers each live relay what it has not acknowledged.
    pub(super) fn check_silent_relays(&mut self, now: u64) {
        let (account, from_seq) = (self.account(), self.log.len() as u32);
        for i in 0..self.relays.len() {
            let r = &mut self.relays[i];
            let Some(out) = &r.out else {
                continue;
            };
            let quiet_ms = now.saturating_sub(r.heard_ms);
            if r.session.open_requests() > 0 {
                if quiet_ms > SILENT_RELAY_MS {
                    tracing::info!(relay = %r.addr, "relay silent with requests open; reconnecting");
                    let _ = out.send(Outgoing::Reconnect);
                }
            } else if quiet_ms > HEARTBEAT_MS {
                self.request(i, Pending::FetchLog(account), |req| Message::FetchLog {
                    req,
                    account,
                    from_seq,
                });
            }
            if self.relays[i].state == ConnectionState::Live {
                self.flush_outbox(i);
            }
        }
    }

    pub(super) fn handle_net(&mut self, ev: NetEvent) {
        if let NetEvent::Message { relay, .. } | NetEvent::Connected { relay, .. } = &ev {
            if let Some(r) = self.relays.get_mut(*relay) {
                r.heard_ms = now_ms();
            }
        }
        match ev {
            NetEvent::Connected { relay, out } => self.on_connected(relay, out),
            NetEvent::Disconnected {
                relay,
                reason,
                retry_in_ms,
            } => {
                tracing::debug!(relay, %reason, "relay connection ended");
                if let Some(r) = self.relays.get_mut(relay) {
                    r.out = None;
                    r.session.reset();
                    r.state = ConnectionState::Offline { retry_in_ms };
                }
                // Whoever waits for device logs asked of this connection gets an answer.
                if self.live_relays().is_empty() {
                    for w in std::mem::take(&mut self.log_waiters) {
                        let _ = w.done.send(Err(EngineError::Offline));
                    }
                }
                self.emit_status();
            }
            NetEvent::Datagram { relay, bytes } => {
                if !self.on_datagram(&bytes) {
                    tracing::debug!(relay, len = bytes.len(), "datagram dropped");
                }
            }
            NetEvent::Message { relay, msg, .. } => {
                if let Err(e) = self.on_message(relay, *msg) {
                    tracing::warn!(relay, error = %e, "relay message not handled");
                }
            }
            NetEvent::PeerConnected {
                link,
                device,
                addr,
                inbound,
                out,
                traffic,
            } => self.on_peer_connected(link, device, addr, inbound, out, traffic),
            NetEvent::PeerGone {
                link,
                reason,
                refused,
            } => self.on_peer_gone(link, &reason, refused),
            NetEvent::PeerMessage { link, msg, .. } => self.on_peer_message(link, *msg),
            NetEvent::PeerDatagram { link, bytes } => {
                if !self.on_datagram(&bytes) {
                    tracing::debug!(link, len = bytes.len(), "datagram from a peer dropped");
                }
            }
            NetEvent::Discovered { device, addr } => self.on_discovered(device, addr),
        }
    }

    pub(super) fn send(&mut self, relay: usize, msg: Message) {
        if let Some(out) = self.relays.get(relay).and_then(|r| r.out.as_ref()) {
            // A closed queue means the connection just ended; the session resends on reconnect.
            let _ = out.send(Outgoing::Message(Box::new(msg)));
        }
    }

    pub(super) fn request(
        &mut self,
        relay: usize,
        what: Pending,
        build: impl FnOnce(u32) -> Message,
    ) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.out.is_none() {
            return;
        }
        let req = r.session.request(what);
        self.send(relay, build(req));
    }

    pub(super) fn live_relays(&self) -> Vec<usize> {
        (0..self.relays.len())
            .filter(|i| self.relays[*i].out.is_some())
            .collect()
    }

    pub(super) fn on_connected(&mut self, relay: usize, out: mpsc::UnboundedSender<Outgoing>) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        r.out = Some(out);
        r.session.reset();
        r.state = ConnectionState::Syncing;
        // A log asked for again on a connection that ended may be asked again on this one,
        // and rewraps without an answer are made again once the groups are known.
        self.logs_refetched.clear();
        self.rewraps.clear();
        let (account, log_len, log_head) =
            (self.log.account(), self.log.len() as u32, self.log.head());
        self.request(relay, Pending::Hello, |req| Message::Hello {
            req,
            account,
            log_len,
            log_head,
        });
        self.emit_status();
    }

    pub(super) fn on_message(&mut self, relay: usize, msg: Message) -> Result<(), EngineError> {
        if let Message::Snapshot { req, doc, envelope } = msg {
            // Part of a catch-up: the subscription stays open until its `Done`.
            self.on_snapshot(relay, req, doc, envelope);
            return Ok(());
        }
        let req = msg.req();
        let pending = if req == 0 {
            None
        } else {
            self.relays
                .get_mut(relay)
                .and_then(|r| r.session.finish(req))
        };
        match msg {
            Message::HelloOk {
                log_len,
                log_head: _,
                groups,
                ..
            } => self.on_hello_ok(relay, log_len, groups),
            Message::LogEntries {
                account,
                first_seq,
                entries,
                ..
            } => {
                let done = self.on_log_entries(account, first_seq, entries);
                if let Err(e) = &done {
                    // A log that does not verify still answers whoever waits for it.
                    self.fail_log_waiters(&account, ErrorCode::REJECTED, &e.to_string());
                }
                self.update_live(relay);
                done
            }
            Message::GroupUpdates { group, updates, .. } => {
                let done = self.on_group_updates(Some(relay), group, updates);
                if matches!(pending, Some(Pending::FetchGroup(_))) {
                    self.retry_blocked();
                    self.update_live(relay);
                }
                done
            }
            Message::Done { .. } => {
                let setup = matches!(pending, Some(Pending::FetchGroup(_) | Pending::FetchLog(_)));
                if matches!(pending, Some(Pending::FetchGroup(_))) {
                    self.retry_blocked();
                }
                let done = self.on_done(relay, req, pending);
                if setup {
                    self.update_live(relay);
                }
                done
            }
            Message::Ack {
                doc,
                seq,
                prev,
                duplicate,
                ..
            } => {
                if let Some(Pending::Append { outbox }) = pending {
                    self.on_ack(relay, outbox, doc, seq, prev, duplicate)?;
                }
                Ok(())
            }
            Message::PairRequested {
                rendezvous,
                request,
            } => self.on_pair_requested(relay, rendezvous, request),
            Message::Error { code, text, .. } => {
                let setup = matches!(pending, Some(Pending::FetchGroup(_) | Pending::FetchLog(_)));
                self.on_error(relay, req, pending, code, text);
                if setup {
                    self.update_live(relay);
                }
                Ok(())
            }
            other => {
                tracing::debug!(relay, ?other, "unexpected message from relay");
                Ok(())
            }
        }
    }

    pub(super) fn on_hello_ok(
        &mut self,
        relay: usize,
        relay_log_len: u32,
        groups: Vec<(DocId, u32)>,
    ) -> Result<(), EngineError> {
        let account = self.account();
        let ours = self.log.len() as u32;
        if relay_log_len < ours {
            let entries = self.log.entries()[relay_log_len as usize..].to_vec();
            // The relay authenticates this connection once it has the entries: hello again
            // when it says they are stored (`on_done`), not before, so a refusal cannot loop.
            self.request(relay, Pending::LogAppendThenHello, |req| {
                Message::LogAppend {
                    req,
                    account,
                    first_seq: relay_log_len,
                    entries,
                }
            });
            return Ok(());
        }
        if relay_log_len > ours {
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq: ours,
            });
        }
        // Updates this relay lacks (made here while offline, or while it was down) go first, so
        // it knows the groups before their documents. A relay lists the groups this account is
        // a member of with their latest version.
        let relay_has: HashMap<DocId, u32> = groups.iter().copied().collect();
        let me = self.account();
        let my_device = self.device();
        let mut missing: Vec<GroupUpdate> = Vec::new();
        // Groups this relay will accept subscriptions for: those it lists, and those whose
        // missing updates this device signed (it accepts only a connection's own updates).
        let mut known: HashSet<DocId> = relay_has.keys().copied().collect();
        // Lacking updates signed by a device of this account revoked since (it can no longer
        // post them) are signed again here, unchanged otherwise.
        let mut resigned: Vec<GroupUpdate> = Vec::new();
        // Groups whose latest update this device signed and the relay has that version of:
        // fetched from it, in case the relay's is another device's (`on_group_updates`).
        let mut check: Vec<(DocId, u32)> = Vec::new();
        // Groups this device holds as a member that the relay does not list for this account,
        // with updates by others: the account may have been removed while this device was
        // offline. Fetching from the held version brings the removal if so.
        let mut unlisted: Vec<DocId> = Vec::new();
        for (id, g) in &self.groups {
            let still_member = g.latest().is_some_and(|u| u.is_member(&me));
            if g.addr.is_none() || !still_member {
                continue;
            }
            let from = relay_has.get(id).map_or(0, |v| *v as usize + 1);
            if let (Some(head), Some(v)) = (g.latest(), relay_has.get(id)) {
                if head.signer == my_device && *v >= head.version {
                    check.push((*id, head.version));
                }
            }
            let lacking: Vec<GroupUpdate> = g.updates.iter().skip(from).cloned().collect();
            let postable = |u: &GroupUpdate| {
                u.signer == my_device
                    || (u.signer_account == me
                        && self.log.device(&u.signer).is_some()
                        && !self.log.is_current(&u.signer))
            };
            if lacking.iter().all(postable) {
                known.insert(*id);
                for u in lacking {
                    if u.signer == my_device {
                        missing.push(u);
                    } else {
                        resigned.push(u);
                    }
                }
            } else if !relay_has.contains_key(id) {
                unlisted.push(*id);
            }
        }
        for u in resigned {
            let update = GroupUpdate::sign(
                &self.secret,
                me,
                u.group,
                u.version,
                u.members.clone(),
                u.keys.clone(),
                u.label.clone(),
            )?;
            if let Some(g) = self.groups.get_mut(&u.group) {
                g.updates[u.version as usize] = update.clone();
            }
            missing.push(update);
        }
        self.save_groups()?;
        for (group, version) in check {
            self.fetch_group_from(relay, group, version);
        }
        for group in unlisted {
            self.fetch_group(relay, group);
        }
        missing.sort_by_key(|u| u.version);
        for update in missing {
            let (group, version) = (update.group, update.version);
            self.request(relay, Pending::PostGroup { group, version }, |req| {
                Message::PostGroup { req, update }
            });
        }
        for (group, version) in groups {
            let have = self
                .groups
                .get(&group)
                .map_or(0, |g| g.updates.len() as u32);
            if u64::from(version) + 1 > u64::from(have) {
                self.fetch_group(relay, group);
            }
        }
        let docs: Vec<DocAddr> = self
            .docs
            .values()
            .copied()
            .filter(|a| known.contains(&group_of(a)))
            .collect();
        self.subscribe(relay, &docs);
        self.flush_outbox(relay);
        // With nothing to catch up, the relay is live at once.
        self.update_live(relay);
        // Keys a rewrap posted on an earlier connection did not get to their devices.
        self.rewrap_all()
    }

    /// Queues `addrs` for subscription on `relay` (documents of groups this account is a
    /// member of) and sends what the catch-up order allows now.
    pub(super) fn subscribe(&mut self, relay: usize, addrs: &[DocAddr]) {
        let me = self.log.account();
        let docs: Vec<DocId> = addrs
            .iter()
            .filter(|a| {
                self.groups
                    .get(&group_of(a))
                    .and_then(|g| g.latest())
                    .is_some_and(|u| u.is_member(&me))
            })
            .map(DocAddr::doc_id)
            .collect();
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.out.is_none() || docs.is_empty() {
            return;
        }
        r.session.queue_subscriptions(docs);
        self.send_subscriptions(relay);
    }

    /// Sends the queued subscriptions the catch-up order allows: the most urgent tier, once no
    /// subscription of a more urgent one is still catching up.
    pub(super) fn send_subscriptions(&mut self, relay: usize) {
        let tiers = self.catch_up_tiers();
        let tier_of = |d: &DocId| tiers.get(d).copied().unwrap_or(TIER_OLDER);
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        let Some(out) = r.out.clone() else {
            return;
        };
        while let Some((tier, docs)) = r.session.next_subscriptions(tier_of) {
            for chunk in docs.chunks(crate::wire::message::MAX_SUBSCRIPTIONS) {
                let items: Vec<Subscription> = chunk
                    .iter()
                    .filter_map(|d| self.docs.get(d))
                    .map(|a| Subscription {
                        doc: a.doc_id(),
                        group: group_of(a),
                        after_seq: r.session.cursor(&a.doc_id()),
                        // A document held nowhere yet may start from a snapshot.
                        snapshot: r.session.cursor(&a.doc_id()) == 0
                            && !self.snapshots.no_snapshot.contains(&a.doc_id()),
                    })
                    .collect();
                if items.is_empty() {
                    continue;
                }
                let docs: Vec<DocId> = items.iter().map(|s| s.doc).collect();
                r.session.start_catch_up(&docs);
                let req = r.session.request(Pending::Subscribe(docs));
                r.session.subscribed(req, tier);
                let _ = out.send(Outgoing::Message(Box::new(Message::Subscribe {
                    req,
                    items,
                })));
            }
        }
    }

    /// The catch-up tier of every known document: the account document, meta documents, each
    /// conversation's newest known segment, older segments.
    pub(super) fn catch_up_tiers(&self) -> HashMap<DocId, Tier> {
        let mut newest: HashMap<ConversationId, u32> = HashMap::new();
        for addr in self.docs.values() {
            if let DocAddr::Segment(c, n) = addr {
                let top = newest.entry(*c).or_insert(*n);
                *top = (*top).max(*n);
            }
        }
        self.docs
            .iter()
            .map(|(id, addr)| {
                let tier = match addr {
                    // An app call is waiting for it.
                    _ if self.wanted.contains(id) => TIER_ACCOUNT,
                    DocAddr::Account(_) => TIER_ACCOUNT,
                    DocAddr::Meta(_) => TIER_META,
                    DocAddr::Segment(c, n) if newest.get(c) == Some(n) => TIER_NEWEST,
                    DocAddr::Segment(..) => TIER_OLDER,
                };
                (*id, tier)
            })
            .collect()
    }

    pub(super) fn subscribe_everywhere(&mut self, addrs: &[DocAddr]) {
        for relay in self.live_relays() {
            self.subscribe(relay, addrs);
        }
        self.sync_with_peers(addrs);
    }

    /// Offers a relay the outbox envelopes it has not acknowledged and that are not in flight,
    /// oldest first, up to [`MAX_APPENDS_IN_FLIGHT`] open at once: on connection, every second
    /// (appends refused for a while, e.g. rate limited, go again), and as acks free room.
    pub(super) fn flush_outbox(&mut self, relay: usize) {
        let bit = 1u64 << relay.min(63);
        let Some(r) = self.relays.get(relay) else {
            return;
        };
        if r.out.is_none() {
            return;
        }
        let in_flight = r.session.appends_in_flight();
        let room = MAX_APPENDS_IN_FLIGHT.saturating_sub(in_flight.len());
        let items: Vec<(i64, DocId, SealedEnvelope)> = self
            .outbox
            .iter()
            .filter(|(id, it)| it.acked & bit == 0 && !in_flight.contains(id))
            .take(room)
            .map(|(id, it)| (*id, it.group, it.envelope.clone()))
            .collect();
        for (outbox, group, envelope) in items {
            self.request(relay, Pending::Append { outbox }, |req| Message::Append {
                req,
                group,
                envelope,
            });
        }
    }

    pub(super) fn on_done(
        &mut self,
        relay: usize,
        req: u32,
        pending: Option<Pending>,
    ) -> Result<(), EngineError> {
        if let Some(Pending::PairOffer(rendezvous)) = &pending {
            if let Some((code, done)) = self.offers.remove(rendezvous) {
                let _ = done.send(Ok(code));
            }
        }
        if let Some(Pending::PostGroup { group, version }) = pending {
            self.on_group_posted(group, version)?;
        }
        if let Some(Pending::FetchGroup(group)) = pending {
            self.rebase_group(group)?;
            self.rewrap_missing_keys(group)?;
        }
        if let Some(Pending::LogAppendThenHello) = pending {
            let account = self.account();
            let (log_len, log_head) = (self.log.len() as u32, self.log.head());
            self.request(relay, Pending::Hello, |req| Message::Hello {
                req,
                account,
                log_len,
                log_head,
            });
        }
        if let Some(Pending::PutSnapshot {
            doc,
            covers,
            changes,
        }) = pending
        {
            self.on_snapshot_answered(relay, doc, covers, changes, true);
        }
        if let Some(Pending::Subscribe(docs)) = pending {
            self.check_snapshot_catch_up(relay, &docs);
            let fetch = match self.relays.get_mut(relay) {
                Some(r) => {
                    r.session.subscription_ended(req);
                    r.session.end_catch_up(&docs)
                }
                None => return Ok(()),
            };
            for (doc, after_seq) in fetch {
                self.request(relay, Pending::Fetch(doc), |req| Message::Fetch {
                    req,
                    doc,
                    after_seq,
                    limit: FETCH_LIMIT,
                });
            }
            self.send_subscriptions(relay);
            self.update_live(relay);
        }
        Ok(())
    }

    /// Tells the app how the catch-up goes, and marks the relay live once nothing is waiting
    /// or catching up.
    pub(super) fn update_live(&mut self, relay: usize) {
        let tiers = self.catch_up_tiers();
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.out.is_none() {
            return;
        }
        // Until the greeting, logs and group updates are in, the documents to catch up on are
        // not all known.
        let tier = if r.session.setting_up() {
            Some(TIER_ACCOUNT)
        } else {
            r.session
                .catching_up_tier(|d| tiers.get(d).copied().unwrap_or(TIER_OLDER))
        };
        let stage = match tier {
            Some(TIER_ACCOUNT | TIER_META) => CatchUpStage::Conversations,
            Some(TIER_NEWEST) => CatchUpStage::Recent,
            Some(_) => CatchUpStage::History,
            None => CatchUpStage::Done,
        };
        let c = r.session.counts();
        let progress = CatchUpProgress {
            stage,
            docs_done: c.docs_done,
            docs_total: c.docs_total,
            envelopes: c.envelopes,
            bytes: c.bytes,
        };
        // Counting envelopes alone is told at most every `CATCH_UP_EVENT_MS`.
        let now = now_ms();
        let moved = r.progress.stage != progress.stage
            || r.progress.docs_done != progress.docs_done
            || r.progress.docs_total != progress.docs_total;
        let counted = r.progress != progress && now >= r.progress_ms + CATCH_UP_EVENT_MS;
        let changed = moved || counted;
        if changed {
            r.progress = progress;
            r.progress_ms = now;
        }
        let live = stage == CatchUpStage::Done && r.state != ConnectionState::Live;
        if live {
            r.state = ConnectionState::Live;
        }
        if changed {
            let relay = r.addr.to_string();
            self.emit(Event::CatchUp { relay, progress });
        }
        if live {
            self.emit_status();
        }
    }

    pub(super) fn on_error(
        &mut self,
        relay: usize,
        req: u32,
        pending: Option<Pending>,
        code: ErrorCode,
        text: String,
    ) {
        tracing::warn!(relay, ?code, %text, ?pending, "relay refused a request");
        match pending {
            Some(Pending::Append { outbox })
                if code == ErrorCode::REJECTED
                    || (code == ErrorCode::UNAUTHORISED && self.is_forwarded(outbox)) =>
            {
                // The relay will never take it (an equivocation; another device's envelope
                // whose author it does not accept, e.g. revoked since): keep it locally for
                // other relays, but stop offering it to this one.
                if let Some(it) = self.outbox.get_mut(&outbox) {
                    it.acked |= 1u64 << relay.min(63);
                }
            }
            Some(Pending::Append { outbox }) if code == ErrorCode::UNAUTHORISED => {
                // Perhaps this account was removed from the group and the relay knows it: ask
                // for the group's later updates (once at a time). If they remove it, the
                // group's rows leave the outbox; if not (say the group has not reached the
                // relay yet), the row is offered again later.
                let group = self.outbox.get(&outbox).map(|it| it.group);
                let asking = |group: DocId| {
                    self.relays.get(relay).is_some_and(|r| {
                        r.session
                            .any_pending(|p| matches!(p, Pending::FetchGroup(g) if *g == group))
                    })
                };
                if let Some(group) = group.filter(|g| self.groups.contains_key(g) && !asking(*g)) {
                    self.fetch_group(relay, group);
                }
            }
            Some(Pending::Fetch(doc)) => {
                if let Some(r) = self.relays.get_mut(relay) {
                    r.session.fetch_failed(&doc);
                }
            }
            Some(Pending::FetchLog(account)) => {
                self.fail_log_waiters(&account, code, &text);
            }
            Some(Pending::PairOffer(rendezvous)) => {
                self.invites.remove(&rendezvous);
                if let Some((_, done)) = self.offers.remove(&rendezvous) {
                    let _ = done.send(Err(EngineError::Relay {
                        code,
                        text: text.clone(),
                    }));
                }
            }
            Some(Pending::Subscribe(docs)) => {
                if let Some(r) = self.relays.get_mut(relay) {
                    r.session.subscription_ended(req);
                    r.session.end_catch_up(&docs);
                }
                self.send_subscriptions(relay);
                self.update_live(relay);
            }
            Some(Pending::PutSnapshot {
                doc,
                covers,
                changes,
            }) => self.on_snapshot_answered(relay, doc, covers, changes, false),
            Some(Pending::PostGroup { group, version }) if code == ErrorCode::REJECTED => {
                self.on_group_refused(relay, group, version);
            }
            _ => {}
        }
        self.emit(Event::RelayError { code, text });
    }

    /// Whether outbox row `outbox` holds another device's envelope, learnt directly.
    fn is_forwarded(&self, outbox: i64) -> bool {
        self.outbox
            .get(&outbox)
            .is_some_and(|it| it.envelope.header.author != self.device())
    }

    pub(super) fn on_ack(
        &mut self,
        relay: usize,
        outbox: i64,
        doc: DocId,
        seq: u64,
        prev: u64,
        duplicate: bool,
    ) -> Result<(), EngineError> {
        let all = if self.relays.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.relays.len()) - 1
        };
        let done = match self.outbox.get_mut(&outbox) {
            Some(it) => {
                it.acked |= 1u64 << relay.min(63);
                it.acked & all == all
            }
            None => false,
        };
        if done {
            self.outbox.remove(&outbox);
            self.replica.store().write(|tx| tx.ack_outbox(outbox))?;
            self.emit_status();
        }
        // A backlog (after a reconnect) drains as acks come, half a window at a time.
        let in_flight = self
            .relays
            .get(relay)
            .map_or(0, |r| r.session.appends_in_flight().len());
        if in_flight == MAX_APPENDS_IN_FLIGHT / 2 {
            self.flush_outbox(relay);
        }
        if !duplicate {
            let step = match self.relays.get_mut(relay) {
                Some(r) => r.session.on_pushed(doc, seq, prev),
                None => return Ok(()),
            };
            self.store_cursors(vec![(relay, doc, step)]);
        }
        Ok(())
    }

    /// Queues moved cursors for the turn's commit, then asks for what a gap showed.
    pub(super) fn store_cursors(&mut self, steps: Vec<(usize, DocId, CursorStep)>) {
        for (relay, doc, step) in &steps {
            if let (Some(seq), Some(addr), Some(r)) = (
                step.advanced_to,
                self.docs.get(doc),
                self.relays.get(*relay),
            ) {
                self.pending_cursors
                    .push((*r.addr.key.as_bytes(), *addr, seq));
            }
        }
        for (relay, doc, step) in steps {
            if let Some(after_seq) = step.fetch_after {
                self.request(relay, Pending::Fetch(doc), |req| Message::Fetch {
                    req,
                    doc,
                    after_seq,
                    limit: FETCH_LIMIT,
                });
            }
        }
    }
}
