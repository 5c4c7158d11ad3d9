//! Direct sync with other devices (no relay in between): who a peer is and what it may see,
//! version-vector exchange, answers from the envelope archive (or, to this account's own
//! devices, a snapshot), live forwarding, and linking a new device over a direct connection.
//!
//! A peer is trusted for exactly what a relay would let it read: a current device of this
//! account sees every document; a current device of another account sees the documents of the
//! conversations both accounts are current members of, and nothing else. Everything a peer
//! sends passes the same checks as what a relay sends (signatures, authors, membership), so a
//! peer can withhold but not forge.

use super::*;
use crate::crypto::device_log::DeviceLogEntry;
use crate::net::discovery::{DiscoveryAccount, DiscoveryKey};
use crate::wire::message::{
    DocVersion, MAX_SYNC_DOCS, MAX_UPDATES_PER_MESSAGE, MAX_VERSION_ENTRIES,
    TARGET_ENVELOPES_BYTES, TARGET_SYNC_BYTES,
};

/// Changes of a document a peer of this account holds nothing of, past which it gets a
/// snapshot (installed whole) instead of the archived envelopes.
pub const PEER_SNAPSHOT_AFTER_CHANGES: u64 = 64;

/// One direct connection as the worker sees it.
pub(crate) struct Peer {
    /// The device on the other end (its TLS key).
    pub device: DeviceId,
    /// Its network address, for status and logs.
    pub addr: String,
    /// Whether it connected to this device.
    pub inbound: bool,
    out: mpsc::UnboundedSender<Outgoing>,
    pub traffic: Arc<Traffic>,
    /// Its account, once its hello verified; until then it may only ask to link.
    pub account: Option<AccountId>,
    next_req: u32,
    /// `PeerSync` requests open: the documents each asked about.
    syncs: HashMap<u32, Vec<DocId>>,
    /// Documents asked about on this connection (each once).
    asked: HashSet<DocId>,
    pub progress: CatchUpProgress,
    progress_ms: u64,
    /// Whether it told why it refused this device (an `Error` before closing).
    heard_refusal: bool,
}

/// A `PeerSync` being answered: the documents still to answer.
pub(super) struct PeerAnswer {
    link: u64,
    req: u32,
    docs: VecDeque<DocVersion>,
}

/// Worker time per turn spent answering peers' `PeerSync`s (documents are answered whole).
pub const PEER_ANSWER_BUDGET_MS: u64 = 50;

/// An envelope accepted this turn, archived with the turn's commit (and forwarded once it is
/// stored, if it is new here).
pub(super) struct Archived {
    pub addr: DocAddr,
    pub group: DocId,
    pub author: DeviceId,
    pub range: (u64, u64),
    pub bytes: Vec<u8>,
    /// The direct connection it came from, if any: such an envelope also goes to the relays.
    pub from: Option<u64>,
}

/// Of an author's archived change ranges (sorted by first change, each reaching past
/// `after`), how many continue a peer's sequence `1..=after` without a gap, and the last change
/// they reach.
fn continuing(after: u64, ranges: &[(u64, u64)]) -> (usize, u64) {
    let mut reached = after;
    let mut usable = 0;
    for (first, last) in ranges {
        if *first > reached + 1 {
            break;
        }
        reached = reached.max(*last);
        usable += 1;
    }
    (usable, reached)
}

/// Why a peer was turned away (sent to it, and reported to the app).
fn refusal(what: impl std::fmt::Display) -> String {
    format!("refused: {what}")
}

impl Worker {
    // ---- connection ----------------------------------------------------------------------------

    /// Turns direct sync on: envelopes are archived from now on, peers are accepted and dialled.
    pub(crate) fn enable_direct(&mut self, dialer: Dialer) {
        self.direct = true;
        self.dialer = Some(dialer);
    }

    pub(super) fn on_peer_connected(
        &mut self,
        link: u64,
        device: DeviceId,
        addr: String,
        inbound: bool,
        out: mpsc::UnboundedSender<Outgoing>,
        traffic: Arc<Traffic>,
    ) {
        if !self.direct {
            let _ = out.send(Outgoing::Close(refusal("direct sync is off")));
            return;
        }
        let hello = Message::PeerHello {
            account: self.account(),
            entries: self.log.entries().to_vec(),
        };
        let _ = out.send(Outgoing::Message(Box::new(hello)));
        tracing::debug!(link, %addr, inbound, "direct connection up");
        self.peers.insert(
            link,
            Peer {
                device,
                addr,
                inbound,
                out,
                traffic,
                account: None,
                next_req: 0,
                syncs: HashMap::new(),
                asked: HashSet::new(),
                progress: CatchUpProgress::default(),
                progress_ms: 0,
                heard_refusal: false,
            },
        );
        self.emit_status();
    }

    /// A direct connection ended; `refused` holds the reason when the peer closed it refusing
    /// this device. The close can overtake the `Error` sent just before it, so the app hears
    /// of the refusal either way, once.
    pub(super) fn on_peer_gone(&mut self, link: u64, reason: &str, refused: Option<String>) {
        if let Some(p) = self.peers.remove(&link) {
            tracing::debug!(link, device = ?p.device, reason, "direct connection ended");
            if let (Some(reason), false) = (refused, p.heard_refusal) {
                self.emit(Event::PeerRefused {
                    device: p.device,
                    reason,
                });
            }
            self.emit_status();
        }
    }

    fn send_peer(&self, link: u64, msg: Message) {
        if let Some(p) = self.peers.get(&link) {
            // A closed queue means the connection just ended; the next one syncs again.
            let _ = p.out.send(Outgoing::Message(Box::new(msg)));
        }
    }

    /// Turns a peer away: it hears why, the connection closes, the app is told.
    fn refuse_peer(&mut self, link: u64, reason: String) {
        let Some(p) = self.peers.remove(&link) else {
            return;
        };
        tracing::info!(device = ?p.device, %reason, "direct peer refused");
        let _ = p.out.send(Outgoing::Message(Box::new(Message::Error {
            req: 0,
            code: ErrorCode::UNAUTHORISED,
            text: reason.clone(),
        })));
        let _ = p.out.send(Outgoing::Close(reason.clone()));
        self.emit(Event::PeerRefused {
            device: p.device,
            reason,
        });
        self.emit_status();
    }

    // ---- messages ------------------------------------------------------------------------------

    pub(super) fn on_peer_message(&mut self, link: u64, msg: Message) {
        let Some(peer) = self.peers.get(&link) else {
            return;
        };
        let known = peer.account.is_some();
        match msg {
            Message::PeerHello { account, entries } => {
                if let Err(reason) = self.on_peer_hello(link, account, entries) {
                    self.refuse_peer(link, reason);
                }
            }
            Message::PairJoin {
                req,
                rendezvous,
                request,
            } => self.on_direct_pair_join(link, req, rendezvous, request),
            Message::Error { code, text, .. } => {
                tracing::info!(link, ?code, %text, "direct peer reported an error");
                let device = peer.device;
                if let Some(p) = self.peers.get_mut(&link) {
                    p.heard_refusal = true;
                }
                self.emit(Event::PeerRefused {
                    device,
                    reason: text,
                });
            }
            _ if !known => {
                self.refuse_peer(link, refusal("nothing is accepted before the hello"));
            }
            Message::LogEntries {
                account, entries, ..
            } => {
                if let Err(e) = self.on_peer_log(link, account, entries) {
                    tracing::warn!(link, error = %e, "device log from a peer refused");
                }
            }
            Message::GroupUpdates { group, updates, .. } => {
                // Updates are verified whoever delivers them (signer, chain, keys).
                if let Err(e) = self.on_group_updates(None, group, updates) {
                    tracing::warn!(link, error = %e, "group update from a peer refused");
                }
                self.retry_blocked_on_peers();
            }
            Message::PeerSync { req, docs } => self.on_peer_sync(link, req, docs),
            Message::Snapshot { doc, envelope, .. } => self.on_peer_snapshot(link, doc, &envelope),
            Message::Done { req } => self.on_peer_done(link, req),
            other => {
                tracing::debug!(link, ?other, "unexpected message from a peer");
            }
        }
    }

    /// A peer's hello: its account's device log must verify and list its TLS key as a current
    /// device, and the account must be this one or share a conversation with it.
    fn on_peer_hello(
        &mut self,
        link: u64,
        account: AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<(), String> {
        let device = self.peers.get(&link).map(|p| p.device).ok_or("gone")?;
        if self.peers.get(&link).is_some_and(|p| p.account.is_some()) {
            return Err(refusal("a second hello"));
        }
        if account != self.account() && self.shared_groups(&account).is_empty() {
            return Err(refusal("no conversation is shared with this account"));
        }
        self.merge_log(account, entries)
            .map_err(|e| refusal(format!("device log: {e}")))?;
        if !self.is_current_device(&account, &device) {
            return Err(refusal("not a current device of its account"));
        }
        if let Some(p) = self.peers.get_mut(&link) {
            p.account = Some(account);
        }
        tracing::info!(
            link,
            ?device,
            own = account == self.account(),
            "direct peer accepted"
        );
        self.greet_peer(link);
        self.emit_status();
        Ok(())
    }

    /// Groups this account and `account` are both current members of.
    fn shared_groups(&self, account: &AccountId) -> Vec<DocId> {
        let me = self.account();
        self.groups
            .iter()
            .filter(|(_, g)| {
                g.latest()
                    .is_some_and(|u| u.is_member(&me) && u.is_member(account))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn is_current_device(&self, account: &AccountId, device: &DeviceId) -> bool {
        if *account == self.account() {
            self.log.is_current(device)
        } else {
            self.logs.get(account).is_some_and(|l| l.is_current(device))
        }
    }

    /// Whether the peer on `link` may see `addr`.
    fn peer_shares(&self, link: u64, addr: &DocAddr) -> bool {
        let Some(p) = self.peers.get(&link) else {
            return false;
        };
        let Some(account) = p.account else {
            return false;
        };
        if !self.is_current_device(&account, &p.device) {
            return false;
        }
        if account == self.account() {
            return true;
        }
        let me = self.account();
        self.groups
            .get(&group_of(addr))
            .and_then(|g| g.latest())
            .is_some_and(|u| u.is_member(&me) && u.is_member(&account))
    }

    /// Takes an account's whole device log as a peer sent it: a log this device knows must be
    /// a prefix of it (or it of that), and what is new is appended after the usual checks.
    fn merge_log(
        &mut self,
        account: AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<(), EngineError> {
        let known: Option<&DeviceLog> = if account == self.account() {
            Some(&self.log)
        } else {
            self.logs.get(&account)
        };
        let Some(known) = known else {
            return self.on_log_entries(account, 0, entries);
        };
        let mismatch = EngineError::Mismatch {
            what: "the peer's device log and the one held here",
        };
        let held = known.len();
        if entries.is_empty() {
            return Err(mismatch);
        }
        if entries.len() <= held {
            let same =
                known.entries()[entries.len() - 1].hash() == entries[entries.len() - 1].hash();
            return if same { Ok(()) } else { Err(mismatch) };
        }
        if held == 0 || entries[held - 1].hash() != known.head() {
            return Err(mismatch);
        }
        let first_seq = held as u32;
        let new = entries[held..].to_vec();
        self.on_log_entries(account, first_seq, new)
    }

    /// A device log a peer passes on: its own account's from a device of it, any member's
    /// from a device of this account.
    fn on_peer_log(
        &mut self,
        link: u64,
        account: AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<(), EngineError> {
        let Some(from) = self.peers.get(&link).and_then(|p| p.account) else {
            return Ok(());
        };
        if from != self.account() && from != account {
            return Ok(());
        }
        self.merge_log(account, entries)?;
        self.retry_blocked_on_peers();
        Ok(())
    }

    /// What a peer needs to open what it will get: device logs, then group chains, then what
    /// this device holds of each shared document.
    fn greet_peer(&mut self, link: u64) {
        let Some(account) = self.peers.get(&link).and_then(|p| p.account) else {
            return;
        };
        let own = account == self.account();
        let groups: Vec<DocId> = if own {
            self.groups.keys().copied().collect()
        } else {
            self.shared_groups(&account)
        };
        let mut accounts: BTreeSet<AccountId> = BTreeSet::new();
        for g in &groups {
            accounts.extend(self.group_members(g).unwrap_or_default());
        }
        accounts.remove(&self.account());
        accounts.remove(&account);
        for a in accounts {
            if let Some(log) = self.logs.get(&a) {
                let msg = Message::LogEntries {
                    req: 0,
                    account: a,
                    first_seq: 0,
                    entries: log.entries().to_vec(),
                };
                self.send_peer(link, msg);
            }
        }
        for group in &groups {
            self.send_group_chain(link, group);
        }
        let addrs: Vec<DocAddr> = self.docs.values().copied().collect();
        self.sync_with_peer(link, &addrs);
    }

    fn send_group_chain(&self, link: u64, group: &DocId) {
        let Some(g) = self.groups.get(group) else {
            return;
        };
        for chunk in g.updates.chunks(MAX_UPDATES_PER_MESSAGE) {
            self.send_peer(
                link,
                Message::GroupUpdates {
                    req: 0,
                    group: *group,
                    updates: chunk.to_vec(),
                },
            );
        }
    }

    /// Asks a peer for what this device lacks of `addrs` (those it shares with it and has not
    /// asked about on this connection), telling it what is held of each.
    pub(super) fn sync_with_peer(&mut self, link: u64, addrs: &[DocAddr]) {
        let mut wanted = Vec::new();
        for addr in addrs {
            let doc = addr.doc_id();
            let asked = self.peers.get(&link).is_none_or(|p| p.asked.contains(&doc));
            if asked || !self.peer_shares(link, addr) {
                continue;
            }
            // An evicted segment comes back from a relay, from the start.
            if self.replica.is_evicted(addr).unwrap_or(false) {
                continue;
            }
            let held = match self.replica.version_vector(addr) {
                Ok(vv) => vv.iter().map(|(d, n)| (*d, *n)).collect::<Vec<_>>(),
                Err(e) => {
                    tracing::warn!(?addr, error = %e, "reading a version vector failed");
                    continue;
                }
            };
            if held.len() > MAX_VERSION_ENTRIES {
                tracing::warn!(?addr, "too many writers to ask a peer about");
                continue;
            }
            wanted.push(DocVersion { doc, held });
        }
        if wanted.is_empty() {
            return;
        }
        // Account document and metas first: they make the conversation list.
        let tiers = self.catch_up_tiers();
        wanted.sort_by_key(|d| tiers.get(&d.doc).copied().unwrap_or(TIER_OLDER));
        let mut batch: Vec<DocVersion> = Vec::new();
        let mut bytes = 0;
        let mut batches = Vec::new();
        for d in wanted {
            bytes += d.encoded_len();
            batch.push(d);
            if batch.len() == MAX_SYNC_DOCS || bytes >= TARGET_SYNC_BYTES {
                batches.push(std::mem::take(&mut batch));
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        let now = now_ms();
        for docs in batches {
            let Some(p) = self.peers.get_mut(&link) else {
                return;
            };
            p.next_req = p.next_req.wrapping_add(1).max(1);
            let req = p.next_req;
            let ids: Vec<DocId> = docs.iter().map(|d| d.doc).collect();
            p.asked.extend(ids.iter().copied());
            p.progress.docs_total += ids.len() as u64;
            p.syncs.insert(req, ids);
            self.send_peer(link, Message::PeerSync { req, docs });
        }
        self.peer_progress(link, now, true);
    }

    /// Newly known documents (a conversation, a segment) are asked of every peer sharing them.
    pub(super) fn sync_with_peers(&mut self, addrs: &[DocAddr]) {
        let links: Vec<u64> = self.live_peers();
        for link in links {
            self.sync_with_peer(link, addrs);
        }
    }

    /// Peers whose hello was accepted.
    pub(super) fn live_peers(&self) -> Vec<u64> {
        self.peers
            .iter()
            .filter(|(_, p)| p.account.is_some())
            .map(|(l, _)| *l)
            .collect()
    }

    /// Documents whose envelopes waited for a log or a key are asked of the peers again.
    pub(super) fn retry_blocked_on_peers(&mut self) {
        let blocked: Vec<DocAddr> = self
            .blocked
            .keys()
            .filter_map(|d| self.docs.get(d).copied())
            .collect();
        if blocked.is_empty() {
            return;
        }
        for link in self.live_peers() {
            if let Some(p) = self.peers.get_mut(&link) {
                for a in &blocked {
                    p.asked.remove(&a.doc_id());
                }
            }
            self.sync_with_peer(link, &blocked);
        }
    }

    /// A peer asks what it lacks: queued, and answered a slice of documents per turn
    /// ([`Self::answer_peers`]) so a large request does not hold up the app's calls.
    fn on_peer_sync(&mut self, link: u64, req: u32, docs: Vec<DocVersion>) {
        self.peer_answers.push_back(PeerAnswer {
            link,
            req,
            docs: docs.into(),
        });
        self.idle_work = true;
    }

    /// Answers queued `PeerSync`s for up to `budget_ms`: for each document the peer may see,
    /// the archived envelopes past its version vector, or, to a device of this account that
    /// lacks more than the archive holds (or holds nothing of a large document), a snapshot.
    /// A request's `Done` follows its last document. Returns whether any are left.
    pub(super) fn answer_peers(&mut self, budget_ms: u64) -> bool {
        let started = std::time::Instant::now();
        let budget = std::time::Duration::from_millis(budget_ms);
        while let Some(mut answer) = self.peer_answers.pop_front() {
            if !self.peers.contains_key(&answer.link) {
                // The connection ended; the next one asks again.
                continue;
            }
            let own = self
                .peers
                .get(&answer.link)
                .and_then(|p| p.account)
                .is_some_and(|a| a == self.account());
            while let Some(d) = answer.docs.pop_front() {
                self.answer_peer_sync_doc(answer.link, answer.req, d, own);
                if started.elapsed() >= budget {
                    break;
                }
            }
            if answer.docs.is_empty() {
                self.send_peer(answer.link, Message::Done { req: answer.req });
            } else {
                self.peer_answers.push_front(answer);
                return true;
            }
            if started.elapsed() >= budget {
                break;
            }
        }
        !self.peer_answers.is_empty()
    }

    fn answer_peer_sync_doc(&mut self, link: u64, req: u32, d: DocVersion, own: bool) {
        let Some(addr) = self.docs.get(&d.doc).copied() else {
            return;
        };
        if !self.peer_shares(link, &addr) {
            tracing::debug!(link, ?addr, "peer asked for a document it does not share");
            return;
        }
        if let Err(e) = self.answer_peer_doc(link, req, &addr, &d.held, own) {
            tracing::warn!(link, ?addr, error = %e, "answering a peer failed");
        }
    }

    fn answer_peer_doc(
        &mut self,
        link: u64,
        req: u32,
        addr: &DocAddr,
        held: &[(DeviceId, u64)],
        own: bool,
    ) -> Result<(), EngineError> {
        let theirs: HashMap<DeviceId, u64> = held.iter().copied().collect();
        let mine = self.replica.version_vector(addr)?;
        // For each writer the peer lacks changes of: from which change, up to which.
        let lacks: Vec<(DeviceId, u64, u64)> = mine
            .iter()
            .filter_map(|(author, n)| {
                let after = theirs.get(author).copied().unwrap_or(0);
                (*n > after).then_some((*author, after, *n))
            })
            .collect();
        let lacking: u64 = lacks.iter().map(|(_, after, n)| n - after).sum();
        if lacking == 0 {
            return Ok(());
        }
        // A device of this account that holds nothing of a large document: a snapshot, without
        // reading the archive first.
        let fresh = held.is_empty() && lacking >= PEER_SNAPSHOT_AFTER_CHANGES;
        if own && fresh && self.send_snapshot_to_peer(link, req, addr)? {
            return Ok(());
        }
        let mut envelopes: Vec<Vec<u8>> = Vec::new();
        let mut complete = true;
        for (author, after, n) in &lacks {
            let rows = self.replica.store().archived_after(addr, author, *after)?;
            let ranges: Vec<(u64, u64)> = rows.iter().map(|(f, l, _)| (*f, *l)).collect();
            let (usable, reached) = continuing(*after, &ranges);
            complete &= reached >= *n;
            envelopes.extend(rows.into_iter().take(usable).map(|(_, _, bytes)| bytes));
        }
        if own && !complete && self.send_snapshot_to_peer(link, req, addr)? {
            return Ok(());
        }
        self.send_envelopes_to_peer(link, req, addr, envelopes);
        Ok(())
    }

    /// Sends a peer of this account a snapshot of `addr`; `false` if none can be made now.
    fn send_snapshot_to_peer(
        &mut self,
        link: u64,
        req: u32,
        addr: &DocAddr,
    ) -> Result<bool, EngineError> {
        let Some(env) = self.seal_snapshot(addr, 0)? else {
            return Ok(false);
        };
        let msg = Message::Snapshot {
            req,
            doc: addr.doc_id(),
            envelope: env.encode(),
        };
        self.send_peer(link, msg);
        Ok(true)
    }

    fn send_envelopes_to_peer(&self, link: u64, req: u32, addr: &DocAddr, all: Vec<Vec<u8>>) {
        let mut items = Vec::new();
        let mut bytes = 0;
        let flush = |items: &mut Vec<StoredEnvelope>| {
            let msg = Message::Envelopes {
                req,
                doc: addr.doc_id(),
                items: std::mem::take(items),
                more: false,
            };
            self.send_peer(link, msg);
        };
        for envelope in all {
            bytes += envelope.len();
            items.push(StoredEnvelope {
                seq: 0,
                prev: 0,
                envelope,
            });
            if bytes >= TARGET_ENVELOPES_BYTES {
                flush(&mut items);
                bytes = 0;
            }
        }
        if !items.is_empty() {
            flush(&mut items);
        }
    }

    /// Envelopes from a peer join the turn's arrivals (checked and applied like a relay's).
    pub(super) fn gather_direct(
        &mut self,
        link: u64,
        doc: DocId,
        items: Vec<StoredEnvelope>,
        arrivals: &mut BTreeMap<DocId, Arrivals>,
    ) {
        let Some(addr) = self.docs.get(&doc).copied() else {
            tracing::debug!(link, ?doc, "envelopes of an unknown document from a peer");
            return;
        };
        if !self.peer_shares(link, &addr) {
            tracing::debug!(
                link,
                ?addr,
                "envelopes of a document the peer does not share"
            );
            return;
        }
        let bytes: usize = items.iter().map(|i| i.envelope.len()).sum();
        if let Some(p) = self.peers.get_mut(&link) {
            p.progress.envelopes += items.len() as u64;
            p.progress.bytes += bytes as u64;
        }
        let a = arrivals.entry(doc).or_default();
        a.envelopes
            .extend(items.into_iter().map(|i| (i.envelope, Some(link))));
        self.peer_progress(link, now_ms(), false);
    }

    fn on_peer_snapshot(&mut self, link: u64, doc: DocId, envelope: &[u8]) {
        let Some(addr) = self.docs.get(&doc).copied() else {
            return;
        };
        let own = self
            .peers
            .get(&link)
            .and_then(|p| p.account)
            .is_some_and(|a| a == self.account());
        if !own {
            tracing::debug!(
                link,
                ?addr,
                "snapshot from another account's device dropped"
            );
            return;
        }
        if let Some(p) = self.peers.get_mut(&link) {
            p.progress.envelopes += 1;
            p.progress.bytes += envelope.len() as u64;
        }
        match self.apply_snapshot(&addr, envelope, None) {
            Ok(_) => self.snapshots.taken += 1,
            Err(e) => {
                tracing::warn!(?addr, error = %e, "snapshot from a peer refused");
                self.emit(Event::Refused {
                    doc: addr,
                    reason: format!("snapshot: {e}"),
                });
            }
        }
    }

    fn on_peer_done(&mut self, link: u64, req: u32) {
        let Some(p) = self.peers.get_mut(&link) else {
            return;
        };
        if let Some(docs) = p.syncs.remove(&req) {
            p.progress.docs_done += docs.len() as u64;
        }
        self.peer_progress(link, now_ms(), true);
    }

    /// Reports a peer's catch-up: at once when `now_or_never` (a stage or a document count
    /// changed), else at most every [`CATCH_UP_EVENT_MS`].
    fn peer_progress(&mut self, link: u64, now: u64, at_once: bool) {
        let tiers = if self.peers.get(&link).is_some_and(|p| !p.syncs.is_empty()) {
            self.catch_up_tiers()
        } else {
            HashMap::new()
        };
        let Some(p) = self.peers.get_mut(&link) else {
            return;
        };
        let open_tier = p
            .syncs
            .values()
            .flatten()
            .map(|d| tiers.get(d).copied().unwrap_or(TIER_OLDER))
            .min();
        let stage = match open_tier {
            None => CatchUpStage::Done,
            Some(t) if t <= TIER_META => CatchUpStage::Conversations,
            Some(t) if t == TIER_NEWEST => CatchUpStage::Recent,
            Some(_) => CatchUpStage::History,
        };
        let changed = stage != p.progress.stage;
        p.progress.stage = stage;
        if !(at_once || changed) && now.saturating_sub(p.progress_ms) < CATCH_UP_EVENT_MS {
            return;
        }
        p.progress_ms = now;
        let event = Event::PeerCatchUp {
            device: p.device,
            progress: p.progress,
        };
        self.emit(event);
    }

    // ---- forwarding ----------------------------------------------------------------------------

    /// An envelope new here goes on to every peer that shares its document, but the one it came
    /// from. (An envelope a device already holds is not passed on again, so copies die out.)
    pub(super) fn forward_to_peers(&self, addr: &DocAddr, bytes: &[u8], except: Option<u64>) {
        for link in self.live_peers() {
            if Some(link) == except || !self.peer_shares(link, addr) {
                continue;
            }
            let msg = Message::Envelopes {
                req: 0,
                doc: addr.doc_id(),
                items: vec![StoredEnvelope {
                    seq: 0,
                    prev: 0,
                    envelope: bytes.to_vec(),
                }],
                more: false,
            };
            self.send_peer(link, msg);
        }
    }

    /// A group update made or learnt here goes to the peers sharing the group.
    pub(super) fn forward_group_to_peers(&self, update: &GroupUpdate, except: Option<u64>) {
        for link in self.live_peers() {
            let Some(account) = self.peers.get(&link).and_then(|p| p.account) else {
                continue;
            };
            let shares = account == self.account() || update.is_member(&account);
            if Some(link) == except || !shares {
                continue;
            }
            let msg = Message::GroupUpdates {
                req: 0,
                group: update.group,
                updates: vec![update.clone()],
            };
            self.send_peer(link, msg);
        }
    }

    /// What LAN discovery announces and recognises: a key derived from the account document's
    /// first key (which every device of the account holds, and no one else) and the account's
    /// current devices. Updated as the log changes.
    pub(crate) fn discovery_accounts(&mut self) -> tokio::sync::watch::Receiver<DiscoveryAccount> {
        let (tx, rx) = tokio::sync::watch::channel(self.discovery_account());
        self.discovery = Some(tx);
        rx
    }

    fn discovery_account(&self) -> DiscoveryAccount {
        let group = DocAddr::Account(self.account()).doc_id();
        // Before the account key is here (it always is, from creation or linking) nothing
        // matches: a key of zeros under another context would be guessable.
        let secret = self
            .keyring
            .key(&group, KeyEpoch(0))
            .map_or([0; 32], |k| *k.as_bytes());
        DiscoveryAccount {
            key: DiscoveryKey::derive(&secret),
            devices: if secret == [0; 32] {
                Vec::new()
            } else {
                self.log
                    .current_devices()
                    .map(|d| d.info.keys.device)
                    .collect()
            },
        }
    }

    /// This account's device log changed: its peers hear at once.
    pub(super) fn share_own_log(&self) {
        if let Some(tx) = &self.discovery {
            let _ = tx.send(self.discovery_account());
        }
        for link in self.live_peers() {
            let own = self
                .peers
                .get(&link)
                .and_then(|p| p.account)
                .is_some_and(|a| a == self.account());
            if own {
                let msg = Message::LogEntries {
                    req: 0,
                    account: self.account(),
                    first_seq: 0,
                    entries: self.log.entries().to_vec(),
                };
                self.send_peer(link, msg);
            }
        }
    }

    /// Closes direct connections of devices no longer current in their account's log.
    pub(super) fn drop_revoked_peers(&mut self) {
        let revoked: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.account
                    .is_some_and(|a| !self.is_current_device(&a, &p.device))
            })
            .map(|(l, _)| *l)
            .collect();
        for link in revoked {
            self.refuse_peer(link, refusal("the device was revoked"));
        }
    }

    /// LAN discovery heard a device of this account: connect unless already connected (the
    /// device with the smaller key dials, so two devices make one connection).
    pub(super) fn on_discovered(&mut self, device: DeviceId, addr: std::net::SocketAddr) {
        if device == self.device() || !self.log.is_current(&device) || device < self.device() {
            return;
        }
        if self.peers.values().any(|p| p.device == device) {
            return;
        }
        let peer = PeerAddr {
            key: device,
            host: addr.ip().to_string(),
            port: addr.port(),
        };
        tracing::info!(%peer, "device of this account found on the local network");
        self.connect_peer(peer);
    }

    /// Keeps a direct connection to `peer` (dialled again after it drops). A second call for
    /// the same device and address does nothing; another address replaces the first.
    pub(crate) fn connect_peer(&mut self, peer: PeerAddr) {
        let Some(d) = &self.dialer else {
            return;
        };
        let text = peer.to_string();
        if self.dialing.get(&peer.key).is_some_and(|(a, _)| *a == text) {
            return;
        }
        let task = d.runtime.spawn(crate::engine::direct::dial(
            peer.clone(),
            Arc::clone(&d.identity),
            d.endpoint.clone(),
            d.worker.clone(),
            Arc::clone(&d.queue),
            d.stop.clone(),
        ));
        if let Some((_, old)) = self.dialing.insert(peer.key, (text, task)) {
            old.abort();
        }
    }

    /// Stops dialling `device` and closes its connections.
    pub(crate) fn forget_peer(&mut self, device: &DeviceId) {
        if let Some((_, task)) = self.dialing.remove(device) {
            task.abort();
        }
        let links: Vec<u64> = self
            .peers
            .iter()
            .filter(|(_, p)| p.device == *device)
            .map(|(l, _)| *l)
            .collect();
        for link in links {
            if let Some(p) = self.peers.remove(&link) {
                let _ = p.out.send(Outgoing::Close("forgotten".into()));
            }
        }
        self.emit_status();
    }

    /// After the turn's commit: envelopes archived for the first time are passed on to peers,
    /// and those that came directly from a peer join the outbox for the relays.
    pub(super) fn after_archived(&mut self, done: Vec<(Archived, bool, Option<i64>)>) {
        let mut fresh = Vec::new();
        for (a, added, outbox) in done {
            if !added {
                continue;
            }
            self.forward_to_peers(&a.addr, &a.bytes, a.from);
            if let Some(id) = outbox {
                match SealedEnvelope::decode(&a.bytes) {
                    Ok(envelope) => {
                        fresh.push((id, a.group, envelope.clone()));
                        self.outbox.insert(
                            id,
                            OutboxItem {
                                group: a.group,
                                envelope,
                                acked: 0,
                            },
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "archived envelope does not decode"),
                }
            }
        }
        if !fresh.is_empty() {
            self.offer_to_relays(&fresh);
        }
    }

    // ---- linking over a direct connection ------------------------------------------------------

    /// A device with this device's invitation code asks to join, directly: answered on the same
    /// connection, and the new device's entry goes to relays and peers.
    fn on_direct_pair_join(
        &mut self,
        link: u64,
        req: u32,
        rendezvous: [u8; 32],
        request: crate::crypto::pairing::PairRequest,
    ) {
        let inbound = self.peers.get(&link).is_some_and(|p| p.inbound);
        if !inbound || !self.invites.contains_key(&rendezvous) {
            self.refuse_peer(link, refusal("no invitation matches"));
            return;
        }
        match self.answer_pairing(rendezvous, &request) {
            Ok(response) => {
                self.send_peer(
                    link,
                    Message::PairAnswered {
                        rendezvous,
                        response,
                    },
                );
                let _ = req;
            }
            Err(e) => {
                self.send_peer(
                    link,
                    Message::Error {
                        req,
                        code: ErrorCode::REJECTED,
                        text: e.to_string(),
                    },
                );
            }
        }
    }

    /// Starts an invitation answered over a direct connection: no relay is involved; the code
    /// and this device's address go to the new device (a QR code, typically).
    pub(crate) fn invite_direct(&mut self) -> Result<String, EngineError> {
        let invite = PairingInvite::new(&mut self.rng, now_ms(), INVITE_TTL_MS)?;
        let code = invite.code();
        self.invites.insert(invite.rendezvous(), invite);
        Ok(code)
    }

    /// Peer statuses for the app.
    pub(super) fn peer_statuses(&self) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| PeerStatus {
                device: p.device,
                addr: p.addr.clone(),
                inbound: p.inbound,
                accepted: p.account.is_some(),
                catch_up: p.progress,
                bytes_received: p.traffic.received(),
                bytes_sent: p.traffic.sent(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::continuing;

    #[test]
    fn archived_ranges_answer_up_to_the_first_gap() {
        // Nothing archived: the peer's own point.
        assert_eq!(continuing(4, &[]), (0, 4));
        // Contiguous from the start, and from the middle of a range the peer partly holds.
        assert_eq!(continuing(0, &[(1, 3), (4, 4), (5, 9)]), (3, 9));
        assert_eq!(continuing(5, &[(4, 6), (7, 7)]), (2, 7));
        // A gap (history that arrived in a snapshot is not archived) stops the answer.
        assert_eq!(continuing(0, &[(3, 5), (6, 8)]), (0, 0));
        assert_eq!(continuing(2, &[(3, 5), (7, 8)]), (1, 5));
    }
}
