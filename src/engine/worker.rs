//! The engine's worker: one OS thread that owns the replica, the keys, the group chains and the
//! relay sessions. Everything that touches Automerge or SQLite runs here, off the async
//! executor. Inputs arrive on one channel (the app's calls, and what connection tasks read); the
//! worker drains what is queued, applies all envelopes of one document in one call, and sends
//! what the sessions need through each connection's queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::crypto::device_log::{DeviceLog, EntryAction};
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::group::{GroupUpdate, SealedLabel};
use crate::crypto::identity::{DevicePublic, DeviceSecret};
use crate::crypto::keys::{DocKey, KeyEpoch, KeySource, Keyring};
use crate::crypto::pairing::PairingInvite;
use crate::crypto::rng::SeedRng;
use crate::engine::session::{CursorStep, FETCH_LIMIT, Pending, Session};
use crate::engine::state::{self, Group};
use crate::engine::{ConnectionState, EngineError, Event, RelayStatus, SyncStatus, now_ms};
use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, DocId};
use crate::model::{ChangeBatch, MessageUpdate};
use crate::net::PeerAddr;
use crate::store::replica::StoredReplica;
use crate::wire::frame::ErrorCode;
use crate::wire::message::{
    MAX_DATAGRAM_BYTES, Message, StoredEnvelope, Subscription, decode_datagram, encode_datagram,
};

/// Most inputs handled in one turn of the worker before it stores and answers.
pub const MAX_INPUTS_PER_TURN: usize = 4_096;
/// How long a device-link invitation stays valid.
pub const INVITE_TTL_MS: u64 = 5 * 60 * 1000;
/// How long a relay may stay silent while requests to it are open before the connection is
/// taken for dead and made again (QUIC alone would wait for its idle timeout).
pub const SILENT_RELAY_MS: u64 = 5_000;
/// After this long without hearing from a relay, an idle device asks it something small (its
/// own device log's tail), so a dead connection is found by [`SILENT_RELAY_MS`].
pub const HEARTBEAT_MS: u64 = 5_000;
/// Plaintext of a typing signal: conversation id (16) + account (32) + flag (1).
const TYPING_LEN: usize = 16 + 32 + 1;

/// What a connection task sends to the worker.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A connection is up; `out` reaches it.
    Connected {
        relay: usize,
        out: mpsc::UnboundedSender<Outgoing>,
    },
    /// The connection ended; the task retries after `retry_in_ms`.
    Disconnected {
        relay: usize,
        reason: String,
        retry_in_ms: u64,
    },
    /// A message arrived (boxed: messages are large, other events small).
    Message { relay: usize, msg: Box<Message> },
    /// A datagram arrived.
    Datagram { relay: usize, bytes: Vec<u8> },
}

/// What the worker sends to a connection task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A message on the connection's stream (boxed: messages are large, datagrams small).
    Message(Box<Message>),
    /// A datagram.
    Datagram(Vec<u8>),
    /// Drop this connection and make a new one.
    Reconnect,
}

/// A call from the app, run on the worker.
pub(crate) type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// The answer to a local operation, sent once the turn's group commit is done: `None` if it
/// is durable, else why not.
pub(crate) type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

/// Everything the worker receives.
pub(crate) enum Input {
    /// An app call.
    Run(Job),
    /// Network input.
    Net(NetEvent),
    /// A second passed.
    Tick,
    /// Stop after this turn.
    Shutdown,
}

/// Someone waiting for device logs of accounts.
struct LogWaiter {
    /// Accounts whose answer has not arrived yet.
    accounts: Vec<AccountId>,
    /// Every account asked for.
    asked: Vec<AccountId>,
    done: oneshot::Sender<Result<(), EngineError>>,
}

/// One relay as the worker sees it.
struct Relay {
    addr: PeerAddr,
    session: Session,
    out: Option<mpsc::UnboundedSender<Outgoing>>,
    state: ConnectionState,
    /// When the relay last sent anything.
    heard_ms: u64,
}

/// An envelope waiting for a relay's acknowledgement.
struct OutboxItem {
    group: DocId,
    envelope: SealedEnvelope,
    /// Relays that acknowledged it (bit per relay index).
    acked: u64,
}

/// Envelopes of one document gathered in a turn.
#[derive(Default)]
struct Arrivals {
    envelopes: Vec<Vec<u8>>,
    /// (relay, cursor step) to store once applied.
    steps: Vec<(usize, CursorStep)>,
}

/// The worker's state.
pub(crate) struct Worker {
    pub(crate) replica: StoredReplica,
    pub(crate) secret: DeviceSecret,
    pub(crate) log: DeviceLog,
    logs: HashMap<AccountId, DeviceLog>,
    device_account: HashMap<DeviceId, AccountId>,
    keyring: Keyring,
    groups: HashMap<DocId, Group>,
    docs: HashMap<DocId, DocAddr>,
    sealed: HashMap<DocAddr, u64>,
    outbox: BTreeMap<i64, OutboxItem>,
    relays: Vec<Relay>,
    events: broadcast::Sender<Event>,
    rng: SeedRng,
    invites: HashMap<[u8; 32], PairingInvite>,
    log_waiters: Vec<LogWaiter>,
    /// Local operations of this turn, answered after the group commit.
    replies: Vec<Reply>,
    /// Cursors that moved this turn (relay key, document, sequence number), stored with the
    /// turn's commit: never before the changes they cover.
    pending_cursors: Vec<([u8; 32], DocAddr, u64)>,
    pub(crate) stopping: bool,
}

/// Keys of a group, for envelopes of any of its documents.
struct GroupKeys<'a> {
    keyring: &'a Keyring,
    group: DocId,
}

impl KeySource for GroupKeys<'_> {
    fn doc_key(&self, _doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.keyring.key(&self.group, epoch)
    }
}

/// Envelopes sealed for one document: the document, the own sequence number they reach, and
/// each envelope with its group.
type Sealed = (DocAddr, u64, Vec<(DocId, SealedEnvelope)>);

/// Writes sealed envelopes into the outbox and moves the sealed marks; returns the outbox rows.
fn write_sealed(
    tx: &mut crate::store::StoreTx<'_>,
    sealed: &[Sealed],
) -> Result<Vec<i64>, crate::store::StoreError> {
    let mut ids = Vec::new();
    for (addr, own, envelopes) in sealed {
        for (_, env) in envelopes {
            ids.push(tx.push_outbox(&env.encode())?);
        }
        tx.put_setting(&state::sealed_setting(&addr.doc_id()), &own.to_be_bytes())?;
    }
    Ok(ids)
}

/// The group a document belongs to: the account document is its own group; a conversation's
/// meta document is the group of all its documents.
pub(crate) fn group_of(addr: &DocAddr) -> DocId {
    match addr {
        DocAddr::Account(_) | DocAddr::Meta(_) => addr.doc_id(),
        DocAddr::Segment(c, _) => DocAddr::Meta(*c).doc_id(),
    }
}

impl Worker {
    /// Builds the worker from an opened replica and the identity stored beside it.
    pub(crate) fn new(
        mut replica: StoredReplica,
        secret: DeviceSecret,
        log: DeviceLog,
        relays: Vec<PeerAddr>,
        events: broadcast::Sender<Event>,
        rng: SeedRng,
    ) -> Result<Self, EngineError> {
        let store = replica.store();
        let mut keyring = Keyring::default();
        for (doc, epoch, key) in store.doc_keys()? {
            keyring.insert(doc, epoch, key)?;
        }
        let logs = state::load_logs(store)?;
        let groups = state::load_groups(store)?;
        let mut outbox_rows = Vec::new();
        for (id, bytes) in store.outbox()? {
            outbox_rows.push((id, SealedEnvelope::decode(&bytes)?));
        }
        let mut w = Worker {
            replica,
            secret,
            log,
            logs,
            device_account: HashMap::new(),
            keyring,
            groups,
            docs: HashMap::new(),
            sealed: HashMap::new(),
            outbox: BTreeMap::new(),
            relays: Vec::new(),
            events,
            rng,
            invites: HashMap::new(),
            log_waiters: Vec::new(),
            replies: Vec::new(),
            pending_cursors: Vec::new(),
            stopping: false,
        };
        w.index_devices();
        for addr in w.replica.docs()? {
            w.docs.insert(addr.doc_id(), addr);
        }
        for g in w.groups.values() {
            if let Some(addr) = g.addr {
                w.docs.insert(addr.doc_id(), addr);
            }
        }
        w.docs.insert(
            DocAddr::Account(w.log.account()).doc_id(),
            DocAddr::Account(w.log.account()),
        );
        let mut segments = Vec::new();
        for addr in w.docs.values() {
            if let DocAddr::Meta(c) = addr {
                segments.push(*c);
            }
        }
        for c in segments {
            w.learn_segments(&c)?;
        }
        for (id, envelope) in outbox_rows {
            let group = w
                .docs
                .get(&envelope.header.doc)
                .map(group_of)
                .unwrap_or(envelope.header.doc);
            w.outbox.insert(
                id,
                OutboxItem {
                    group,
                    envelope,
                    acked: 0,
                },
            );
        }
        let addrs: Vec<DocAddr> = w.docs.values().copied().collect();
        for addr in &addrs {
            let sealed = state::load_sealed(w.replica.store(), &addr.doc_id())?;
            w.sealed.insert(*addr, sealed);
        }
        for relay in relays {
            let mut cursors = Vec::new();
            for addr in &addrs {
                if let Some(seq) = w.replica.store().cursor(relay.key.as_bytes(), addr)? {
                    cursors.push((addr.doc_id(), seq));
                }
            }
            w.relays.push(Relay {
                addr: relay,
                session: Session::new(cursors),
                out: None,
                state: ConnectionState::Connecting,
                heard_ms: 0,
            });
        }
        // Changes made before a crash between storing them and sealing them are sealed now.
        w.seal_new(addrs.into_iter().collect())?;
        Ok(w)
    }

    fn index_devices(&mut self) {
        let mut map = HashMap::new();
        for log in self.logs.values().chain(std::iter::once(&self.log)) {
            for e in log.entries() {
                if let EntryAction::Genesis(info) | EntryAction::Add(info) = &e.action {
                    map.insert(info.keys.device, log.account());
                }
            }
        }
        self.device_account = map;
    }

    pub(crate) fn account(&self) -> AccountId {
        self.log.account()
    }

    pub(crate) fn device(&self) -> DeviceId {
        self.secret.device_id()
    }

    fn emit(&self, event: Event) {
        // No receiver is not an error: the app may not listen.
        let _ = self.events.send(event);
    }

    // ---- the loop --------------------------------------------------------------------------

    /// Runs until shutdown or until every sender is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        while let Some(first) = rx.blocking_recv() {
            let mut inputs = vec![first];
            while inputs.len() < MAX_INPUTS_PER_TURN {
                match rx.try_recv() {
                    Ok(i) => inputs.push(i),
                    Err(_) => break,
                }
            }
            self.turn(inputs);
            if self.stopping {
                break;
            }
        }
    }

    fn turn(&mut self, inputs: Vec<Input>) {
        let mut arrivals: BTreeMap<DocId, Arrivals> = BTreeMap::new();
        for input in inputs {
            match input {
                Input::Net(NetEvent::Message { relay, msg })
                    if matches!(*msg, Message::Envelopes { .. }) =>
                {
                    if let Message::Envelopes {
                        req,
                        doc,
                        items,
                        more,
                    } = *msg
                    {
                        self.gather(relay, req, doc, items, more, &mut arrivals);
                    }
                }
                other => {
                    // Keep order: what came before this input is applied first.
                    if !arrivals.is_empty() {
                        self.apply_arrivals(std::mem::take(&mut arrivals));
                    }
                    match other {
                        Input::Run(job) => job(self),
                        Input::Net(ev) => self.handle_net(ev),
                        Input::Tick => self.check_silent_relays(now_ms()),
                        Input::Shutdown => self.stopping = true,
                    }
                }
            }
        }
        if !arrivals.is_empty() {
            self.apply_arrivals(arrivals);
        }
        self.commit_turn();
    }

    /// Queues the answer to a local operation until the turn's commit.
    pub(crate) fn defer_reply(&mut self, reply: Reply) {
        self.replies.push(reply);
    }

    /// Group commit of the turn's local operations: one transaction for all of them, one
    /// envelope per document, then the answers.
    fn commit_turn(&mut self) {
        let changed = !self.replica.unsaved_docs().is_empty();
        if self.replies.is_empty() && !changed && self.pending_cursors.is_empty() {
            return;
        }
        // The new changes are sealed first and go into the outbox in the same transaction as
        // the changes themselves: one commit (one fsync) for the whole turn.
        let pending: BTreeSet<DocAddr> = self.replica.unsaved_docs().into_iter().collect();
        let sealed = match self.prepare_seal(pending) {
            Ok(s) => s,
            Err(e) => {
                // The operations are still stored; what was not sealed is sealed at next start.
                tracing::error!(error = %e, "sealing local changes failed");
                Vec::new()
            }
        };
        let mut ids = Vec::new();
        let cursors = std::mem::take(&mut self.pending_cursors);
        let failed = self
            .replica
            .flush_with(|tx| {
                ids = write_sealed(tx, &sealed)?;
                for (relay, addr, seq) in &cursors {
                    tx.set_cursor(relay, addr, *seq)?;
                }
                Ok(())
            })
            .err()
            .map(|e| e.to_string());
        if let Some(e) = &failed {
            // Nothing of the turn is stored: remote changes and their cursors come again.
            tracing::error!(error = %e, "storing the turn failed");
            self.emit(Event::StorageError { text: e.clone() });
        }
        if failed.is_none() {
            self.record_sealed(sealed, ids);
            if let Err(e) = self.after_local() {
                tracing::error!(error = %e, "sealing local changes failed");
            }
        }
        for reply in std::mem::take(&mut self.replies) {
            reply(failed.as_deref());
        }
    }

    // ---- network input ---------------------------------------------------------------------

    /// Reconnects to relays that went silent with requests open.
    fn check_silent_relays(&mut self, now: u64) {
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
        }
    }

    fn handle_net(&mut self, ev: NetEvent) {
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
                self.emit_status();
            }
            NetEvent::Datagram { relay, bytes } => {
                if !self.on_datagram(&bytes) {
                    tracing::debug!(relay, len = bytes.len(), "datagram dropped");
                }
            }
            NetEvent::Message { relay, msg } => {
                if let Err(e) = self.on_message(relay, *msg) {
                    tracing::warn!(relay, error = %e, "relay message not handled");
                }
            }
        }
    }

    fn send(&mut self, relay: usize, msg: Message) {
        if let Some(out) = self.relays.get(relay).and_then(|r| r.out.as_ref()) {
            // A closed queue means the connection just ended; the session resends on reconnect.
            let _ = out.send(Outgoing::Message(Box::new(msg)));
        }
    }

    fn request(&mut self, relay: usize, what: Pending, build: impl FnOnce(u32) -> Message) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.out.is_none() {
            return;
        }
        let req = r.session.request(what);
        self.send(relay, build(req));
    }

    fn live_relays(&self) -> Vec<usize> {
        (0..self.relays.len())
            .filter(|i| self.relays[*i].out.is_some())
            .collect()
    }

    fn on_connected(&mut self, relay: usize, out: mpsc::UnboundedSender<Outgoing>) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        r.out = Some(out);
        r.session.reset();
        r.state = ConnectionState::Syncing;
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

    fn on_message(&mut self, relay: usize, msg: Message) -> Result<(), EngineError> {
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
            } => self.on_log_entries(account, first_seq, entries),
            Message::GroupUpdates { group, updates, .. } => {
                self.on_group_updates(relay, group, updates)
            }
            Message::Done { .. } => self.on_done(relay, pending),
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
                self.on_error(relay, pending, code, text);
                Ok(())
            }
            other => {
                tracing::debug!(relay, ?other, "unexpected message from relay");
                Ok(())
            }
        }
    }

    fn on_hello_ok(
        &mut self,
        relay: usize,
        relay_log_len: u32,
        groups: Vec<(DocId, u32)>,
    ) -> Result<(), EngineError> {
        let account = self.account();
        let ours = self.log.len() as u32;
        if relay_log_len < ours {
            let entries = self.log.entries()[relay_log_len as usize..].to_vec();
            self.request(relay, Pending::LogAppend, |req| Message::LogAppend {
                req,
                account,
                first_seq: relay_log_len,
                entries,
            });
            // The relay authenticates this connection once it has the entries; say hello again.
            let (log_len, log_head) = (ours, self.log.head());
            self.request(relay, Pending::Hello, |req| Message::Hello {
                req,
                account,
                log_len,
                log_head,
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
        let mut missing: Vec<GroupUpdate> = Vec::new();
        for (id, g) in &self.groups {
            let still_member = g.latest().is_some_and(|u| u.is_member(&me));
            if g.addr.is_none() || !still_member {
                continue;
            }
            let from = relay_has.get(id).map_or(0, |v| *v as usize + 1);
            missing.extend(g.updates.iter().skip(from).cloned());
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
            if version + 1 > have {
                self.request(relay, Pending::FetchGroup(group), |req| {
                    Message::FetchGroup {
                        req,
                        group,
                        from_version: have,
                    }
                });
            }
        }
        let docs: Vec<DocAddr> = self.docs.values().copied().collect();
        self.subscribe(relay, &docs);
        self.flush_outbox(relay);
        Ok(())
    }

    fn subscribe(&mut self, relay: usize, addrs: &[DocAddr]) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.out.is_none() || addrs.is_empty() {
            return;
        }
        let items: Vec<Subscription> = addrs
            .iter()
            .filter(|a| self.groups.contains_key(&group_of(a)))
            .map(|a| Subscription {
                doc: a.doc_id(),
                group: group_of(a),
                after_seq: r.session.cursor(&a.doc_id()),
            })
            .collect();
        if items.is_empty() {
            return;
        }
        for chunk in items.chunks(crate::wire::message::MAX_SUBSCRIPTIONS) {
            let docs: Vec<DocId> = chunk.iter().map(|s| s.doc).collect();
            r.session.start_catch_up(&docs);
            let req = r.session.request(Pending::Subscribe(docs));
            if let Some(out) = &r.out {
                let _ = out.send(Outgoing::Message(Box::new(Message::Subscribe {
                    req,
                    items: chunk.to_vec(),
                })));
            }
        }
    }

    fn subscribe_everywhere(&mut self, addrs: &[DocAddr]) {
        for relay in self.live_relays() {
            self.subscribe(relay, addrs);
        }
    }

    fn flush_outbox(&mut self, relay: usize) {
        let bit = 1u64 << relay.min(63);
        let items: Vec<(i64, DocId, SealedEnvelope)> = self
            .outbox
            .iter()
            .filter(|(_, it)| it.acked & bit == 0)
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

    fn on_done(&mut self, relay: usize, pending: Option<Pending>) -> Result<(), EngineError> {
        if let Some(Pending::Subscribe(docs)) = pending {
            let fetch = match self.relays.get_mut(relay) {
                Some(r) => r.session.end_catch_up(&docs),
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
            self.update_live(relay);
        }
        Ok(())
    }

    fn update_live(&mut self, relay: usize) {
        if let Some(r) = self.relays.get_mut(relay) {
            if r.out.is_some() && r.state != ConnectionState::Live {
                r.state = ConnectionState::Live;
                self.emit_status();
            }
        }
    }

    fn on_error(&mut self, relay: usize, pending: Option<Pending>, code: ErrorCode, text: String) {
        tracing::warn!(relay, ?code, %text, ?pending, "relay refused a request");
        match pending {
            Some(Pending::Append { outbox }) if code == ErrorCode::REJECTED => {
                // The relay will never take it (e.g. an equivocation): keep it locally for
                // other relays, but stop offering it to this one.
                if let Some(it) = self.outbox.get_mut(&outbox) {
                    it.acked |= 1u64 << relay.min(63);
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
            Some(Pending::Subscribe(docs)) => {
                if let Some(r) = self.relays.get_mut(relay) {
                    r.session.end_catch_up(&docs);
                }
            }
            _ => {}
        }
        self.emit(Event::RelayError { code, text });
    }

    fn on_ack(
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
    fn store_cursors(&mut self, steps: Vec<(usize, DocId, CursorStep)>) {
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

    // ---- envelopes -------------------------------------------------------------------------

    fn gather(
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
                .on_fetched(doc, items.last().map(|i| i.seq), more && is_fetch);
            if !more {
                r.session.caught_up(&doc);
            }
            step
        };
        let a = arrivals.entry(doc).or_default();
        a.envelopes.extend(items.into_iter().map(|i| i.envelope));
        a.steps.push((relay, step));
    }

    /// Opens, checks and applies everything gathered, one apply call for all documents, then
    /// stores the cursors and tells the app.
    fn apply_arrivals(&mut self, arrivals: BTreeMap<DocId, Arrivals>) {
        let now = now_ms();
        let mut batches = Vec::new();
        let mut steps = Vec::new();
        for (doc, a) in arrivals {
            let Some(addr) = self.docs.get(&doc).copied() else {
                tracing::debug!(?doc, "envelopes of an unknown document dropped");
                continue;
            };
            for bytes in &a.envelopes {
                match self.open_changes(&addr, bytes) {
                    Ok(Some(batch)) => batches.push(batch),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(?addr, error = %e, "envelope refused");
                        self.emit(Event::Refused {
                            doc: addr,
                            reason: e.to_string(),
                        });
                    }
                }
            }
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
                Ok(report) => self.after_apply(report),
                Err(e) => {
                    tracing::error!(error = %e, "applying remote changes failed");
                    self.emit(Event::StorageError {
                        text: e.to_string(),
                    });
                    return;
                }
            }
        }
        // Stored with the changes at the end of the turn (`commit_turn`).
        self.store_cursors(steps);
    }

    /// Checks an envelope of `addr` and returns its changes. `None` for a snapshot (not
    /// applied by this version) .
    fn open_changes(
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
        let expected = opened.header.last_seq - opened.header.first_seq + 1;
        let own = batch.changes.iter().all(|c| {
            c.actor_id().to_bytes() == author.as_bytes()
                && (opened.header.first_seq..=opened.header.last_seq).contains(&c.seq())
        });
        if !own || batch.changes.len() as u64 != expected {
            return Err(EngineError::Mismatch {
                what: "changes and the envelope's author range",
            });
        }
        // Messages and reactions name an account; it must be the signing device's.
        if let DocAddr::Segment(..) = addr {
            let account = self.device_account.get(&author);
            let claims =
                crate::model::claimed_accounts(&batch.changes).ok_or(EngineError::Mismatch {
                    what: "accounts named in the changes",
                })?;
            if claims.iter().any(|c| Some(c) != account) {
                return Err(EngineError::Mismatch {
                    what: "the message or reaction account and the signing device's account",
                });
            }
        }
        Ok(Some(batch))
    }

    /// Whether `author` is a device of an account that is, or was, a member of `group`.
    fn may_write(&self, author: &DeviceId, group: &DocId) -> bool {
        let Some(account) = self.device_account.get(author) else {
            return false;
        };
        self.groups
            .get(group)
            .is_some_and(|g| g.ever_member(account))
    }

    fn after_apply(&mut self, report: crate::model::ApplyReport) {
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
    fn learn_segments(&mut self, c: &ConversationId) -> Result<(), EngineError> {
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

    fn seal_new(&mut self, addrs: BTreeSet<DocAddr>) -> Result<(), EngineError> {
        let sealed_now = self.prepare_seal(addrs)?;
        if sealed_now.is_empty() {
            return Ok(());
        }
        let ids = self
            .replica
            .store()
            .write(|tx| write_sealed(tx, &sealed_now))?;
        self.record_sealed(sealed_now, ids);
        Ok(())
    }

    /// Seals this device's changes to `addrs` that are past the sealed mark.
    fn prepare_seal(&mut self, addrs: BTreeSet<DocAddr>) -> Result<Vec<Sealed>, EngineError> {
        let me = self.device();
        let mut sealed_now: Vec<Sealed> = Vec::new();
        for addr in addrs {
            let group = group_of(&addr);
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
    fn record_sealed(&mut self, sealed_now: Vec<Sealed>, ids: Vec<i64>) {
        let mut ids = ids.into_iter();
        let mut fresh = Vec::new();
        for (addr, own, envelopes) in sealed_now {
            self.sealed.insert(addr, own);
            for (group, envelope) in envelopes {
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
        for relay in self.live_relays() {
            for (outbox, group, envelope) in &fresh {
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

    // ---- device logs -------------------------------------------------------------------------

    fn on_log_entries(
        &mut self,
        account: AccountId,
        first_seq: u32,
        entries: Vec<crate::crypto::device_log::DeviceLogEntry>,
    ) -> Result<(), EngineError> {
        if entries.is_empty() {
            self.wake_log_waiters(&account);
            return Ok(());
        }
        if account == self.account() {
            let before: HashSet<DeviceId> = self
                .log
                .current_devices()
                .map(|d| d.info.keys.device)
                .collect();
            for e in entries {
                self.log.append(e)?;
            }
            let log = self.log.clone();
            self.replica.store().write(|tx| tx.put_device_log(&log))?;
            let after: HashSet<DeviceId> = self
                .log
                .current_devices()
                .map(|d| d.info.keys.device)
                .collect();
            for d in after.difference(&before) {
                self.emit(Event::DeviceLinked { device: *d });
            }
            for d in before.difference(&after) {
                self.emit(Event::DeviceRevoked { device: *d });
            }
            if !self.log.is_current(&self.device()) {
                tracing::warn!("this device was revoked");
            }
        } else if first_seq == 0 && !self.logs.contains_key(&account) {
            let log = match self.logs.remove(&account) {
                Some(mut known) => {
                    for e in entries {
                        known.append(e)?;
                    }
                    known
                }
                None => DeviceLog::verify(&account, entries)?,
            };
            self.logs.insert(account, log);
        } else if let Some(known) = self.logs.get_mut(&account) {
            for e in entries {
                known.append(e)?;
            }
        } else {
            self.wake_log_waiters(&account);
            return Ok(());
        }
        self.index_devices();
        let blob = state::encode_logs(&self.logs);
        self.replica
            .store()
            .write(|tx| tx.put_setting(state::LOGS_SETTING, &blob))?;
        self.wake_log_waiters(&account);
        Ok(())
    }

    /// Asks the relays for the device logs of `accounts` this device lacks; `done` fires once
    /// all are known, or with an error if no relay is connected.
    pub(crate) fn fetch_logs(
        &mut self,
        accounts: Vec<AccountId>,
        done: oneshot::Sender<Result<(), EngineError>>,
    ) {
        // Known logs are refreshed too: a device added since they were fetched must get keys.
        let mut asked: Vec<AccountId> = accounts
            .into_iter()
            .filter(|a| *a != self.account())
            .collect();
        asked.sort();
        asked.dedup();
        if asked.is_empty() {
            let _ = done.send(Ok(()));
            return;
        }
        let live = self.live_relays();
        let Some(relay) = live.first().copied() else {
            let _ = done.send(Err(EngineError::Offline));
            return;
        };
        for account in &asked {
            let account = *account;
            let from_seq = self.logs.get(&account).map_or(0, |l| l.len() as u32);
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq,
            });
        }
        self.log_waiters.push(LogWaiter {
            accounts: asked.clone(),
            asked,
            done,
        });
    }

    fn wake_log_waiters(&mut self, answered: &AccountId) {
        let waiters = std::mem::take(&mut self.log_waiters);
        for mut w in waiters {
            w.accounts.retain(|a| a != answered);
            if !w.accounts.is_empty() {
                self.log_waiters.push(w);
                continue;
            }
            let result = match w.asked.iter().find(|a| !self.logs.contains_key(a)) {
                Some(a) => Err(EngineError::UnknownAccount(*a)),
                None => Ok(()),
            };
            let _ = w.done.send(result);
        }
    }

    fn fail_log_waiters(&mut self, account: &AccountId, code: ErrorCode, text: &str) {
        let waiters = std::mem::take(&mut self.log_waiters);
        for w in waiters {
            if w.accounts.contains(account) {
                let _ = w.done.send(Err(EngineError::Relay {
                    code,
                    text: text.to_owned(),
                }));
            } else {
                self.log_waiters.push(w);
            }
        }
    }

    /// Current devices of `accounts` (this account's from its own log).
    fn current_devices(&self, accounts: &[AccountId]) -> Result<Vec<DevicePublic>, EngineError> {
        let mut out = Vec::new();
        for a in accounts {
            let log = if *a == self.account() {
                &self.log
            } else {
                self.logs.get(a).ok_or(EngineError::UnknownAccount(*a))?
            };
            out.extend(log.current_devices().map(|d| d.info.keys));
        }
        Ok(out)
    }

    // ---- groups ------------------------------------------------------------------------------

    fn save_groups(&mut self) -> Result<(), EngineError> {
        let blob = state::encode_groups(&self.groups);
        self.replica
            .store()
            .write(|tx| tx.put_setting(state::GROUPS_SETTING, &blob))?;
        Ok(())
    }

    fn on_group_updates(
        &mut self,
        relay: usize,
        group: DocId,
        updates: Vec<GroupUpdate>,
    ) -> Result<(), EngineError> {
        let me = self.device();
        let mut new_docs = Vec::new();
        let mut missing_logs = Vec::new();
        for update in updates {
            if update.group != group {
                continue;
            }
            let g = self.groups.entry(group).or_default();
            if (update.version as usize) < g.updates.len() {
                continue;
            }
            update.check_follows(g.latest())?;
            update.verify_signature()?;
            match self.device_account.get(&update.signer) {
                Some(a) if *a == update.signer_account => {}
                Some(_) => {
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
            g.updates.push(update);
            for m in members {
                if m != self.log.account() && !self.logs.contains_key(&m) {
                    missing_logs.push(m);
                }
            }
        }
        self.save_groups()?;
        missing_logs.sort();
        missing_logs.dedup();
        for account in missing_logs {
            self.request(relay, Pending::FetchLog(account), |req| Message::FetchLog {
                req,
                account,
                from_seq: 0,
            });
            // Once the log is in, the rest of the chain is fetched again.
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
        // Local changes waiting for a key (none usually) can be sealed now.
        let all: BTreeSet<DocAddr> = self.docs.values().copied().collect();
        self.seal_new(all)
    }

    /// Records a group update made here and posts it to connected relays.
    fn publish_group(&mut self, update: GroupUpdate, addr: DocAddr) -> Result<(), EngineError> {
        let group = update.group;
        let version = update.version;
        let g = self.groups.entry(group).or_default();
        g.addr = Some(addr);
        g.updates.push(update.clone());
        self.save_groups()?;
        for relay in self.live_relays() {
            let update = update.clone();
            self.request(relay, Pending::PostGroup { group, version }, |req| {
                Message::PostGroup { req, update }
            });
        }
        Ok(())
    }

    fn store_new_key(&mut self, group: DocId, epoch: KeyEpoch) -> Result<(), EngineError> {
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
        let (epoch, wrapped) = self.keyring.rotate(group, &recipients, &mut self.rng)?;
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
            vec![self.account()],
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
        let group = addr.doc_id();
        let (epoch, wrapped) = self.keyring.rotate(group, &recipients, &mut self.rng)?;
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
        let seg = DocAddr::Segment(c, 0);
        self.docs.insert(seg.doc_id(), seg);
        self.publish_group(update, addr)?;
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
        let latest = self
            .groups
            .get(&group)
            .and_then(|g| g.latest().cloned())
            .ok_or(EngineError::UnknownConversation(*c))?;
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
        let latest = self
            .groups
            .get(&group)
            .and_then(|g| g.latest().cloned())
            .ok_or(EngineError::UnknownConversation(*c))?;
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

    /// Member accounts of every group, for checks.
    pub(crate) fn group_members(&self, group: &DocId) -> Option<Vec<AccountId>> {
        self.groups
            .get(group)
            .and_then(|g| g.latest())
            .map(|u| u.members.clone())
    }

    // ---- linking and revocation --------------------------------------------------------------

    /// Starts a device-link invitation on the first connected relay; returns the code.
    pub(crate) fn invite(&mut self) -> Result<String, EngineError> {
        let relay = self
            .live_relays()
            .first()
            .copied()
            .ok_or(EngineError::Offline)?;
        let invite = PairingInvite::new(&mut self.rng, now_ms(), INVITE_TTL_MS)?;
        let code = invite.code();
        let rendezvous = invite.rendezvous();
        self.invites.insert(rendezvous, invite);
        self.request(relay, Pending::PairOffer, |req| Message::PairOffer {
            req,
            rendezvous,
        });
        Ok(code)
    }

    fn on_pair_requested(
        &mut self,
        relay: usize,
        rendezvous: [u8; 32],
        request: crate::crypto::pairing::PairRequest,
    ) -> Result<(), EngineError> {
        let Some(invite) = self.invites.get_mut(&rendezvous) else {
            return Ok(());
        };
        let before = self.log.len() as u32;
        let response = invite.handle_request(
            &request,
            now_ms(),
            &self.secret,
            &mut self.log,
            &self.keyring,
            &mut self.rng,
        )?;
        self.invites.remove(&rendezvous);
        let log = self.log.clone();
        self.replica.store().write(|tx| tx.put_device_log(&log))?;
        self.index_devices();
        let entries = self.log.entries()[before as usize..].to_vec();
        let account = self.account();
        for r in self.live_relays() {
            let entries = entries.clone();
            self.request(r, Pending::LogAppend, |req| Message::LogAppend {
                req,
                account,
                first_seq: before,
                entries,
            });
        }
        self.request(relay, Pending::PairAnswer, |req| Message::PairAnswer {
            req,
            rendezvous,
            response,
        });
        self.emit(Event::DeviceLinked {
            device: request.device.device,
        });
        Ok(())
    }

    /// Revokes a device of this account and tells the relays, which refuse it at once.
    pub(crate) fn revoke(&mut self, device: DeviceId) -> Result<(), EngineError> {
        let before = self.log.len() as u32;
        let entry = self.log.revoke_device(&self.secret, device)?;
        self.log.append(entry.clone())?;
        let log = self.log.clone();
        self.replica.store().write(|tx| tx.put_device_log(&log))?;
        let account = self.account();
        for r in self.live_relays() {
            let entries = vec![entry.clone()];
            self.request(r, Pending::LogAppend, |req| Message::LogAppend {
                req,
                account,
                first_seq: before,
                entries,
            });
        }
        self.emit(Event::DeviceRevoked { device });
        Ok(())
    }

    // ---- ephemeral signals -------------------------------------------------------------------

    /// Tells the other members' online devices whether this account is typing.
    pub(crate) fn typing(&mut self, c: &ConversationId, on: bool) -> Result<(), EngineError> {
        let group = DocAddr::Meta(*c).doc_id();
        let (epoch, key) = self
            .keyring
            .latest(&group)
            .map(|(e, k)| (e, k.clone()))
            .ok_or(EngineError::UnknownConversation(*c))?;
        let mut plain = Vec::with_capacity(TYPING_LEN);
        plain.extend_from_slice(c.as_bytes());
        plain.extend_from_slice(self.account().as_bytes());
        plain.push(u8::from(on));
        let header = EnvelopeHeader {
            kind: EnvelopeKind::Ephemeral,
            doc: group,
            epoch,
            author: self.device(),
            first_seq: 0,
            last_seq: 0,
        };
        let env = SealedEnvelope::seal(&self.secret, &key, header, &plain)?;
        let bytes = encode_datagram(&group, &env);
        if bytes.len() > MAX_DATAGRAM_BYTES {
            return Err(EngineError::Mismatch {
                what: "typing signal size",
            });
        }
        for r in self.live_relays() {
            if let Some(out) = &self.relays[r].out {
                let _ = out.send(Outgoing::Datagram(bytes.clone()));
            }
        }
        Ok(())
    }

    /// Handles a typing signal; false if it was dropped (malformed, forged, not a member).
    fn on_datagram(&mut self, bytes: &[u8]) -> bool {
        let Ok((group, env)) = decode_datagram(bytes) else {
            return false;
        };
        if env.header.kind != EnvelopeKind::Ephemeral || env.header.doc != group {
            return false;
        }
        let keys = GroupKeys {
            keyring: &self.keyring,
            group,
        };
        let authorised = |author: &DeviceId, _: &DocId, _: KeyEpoch| self.may_write(author, &group);
        let Ok(opened) = env.open(&group, &keys, authorised) else {
            return false;
        };
        let p = &opened.plaintext;
        if p.len() != TYPING_LEN {
            return false;
        }
        let Ok(c) = <[u8; 16]>::try_from(&p[..16]) else {
            return false;
        };
        let Ok(a) = <[u8; 32]>::try_from(&p[16..48]) else {
            return false;
        };
        let conversation = ConversationId::from_bytes(c);
        let account = AccountId::from_bytes(a);
        // The signal must come from that account and be about this group.
        let author_account = self.device_account.get(&opened.header.author);
        if DocAddr::Meta(conversation).doc_id() != group || author_account != Some(&account) {
            return false;
        }
        if account != self.account() {
            self.emit(Event::Typing {
                conversation,
                account,
                typing: p[48] != 0,
            });
        }
        true
    }

    // ---- status ------------------------------------------------------------------------------

    pub(crate) fn status(&self) -> SyncStatus {
        SyncStatus {
            relays: self
                .relays
                .iter()
                .map(|r| RelayStatus {
                    relay: r.addr.to_string(),
                    state: r.state,
                })
                .collect(),
            pending_uploads: self.outbox.len(),
        }
    }

    fn emit_status(&self) {
        self.emit(Event::Sync(self.status()));
    }
}
