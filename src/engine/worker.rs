//! The engine's worker: one OS thread that owns the replica, the keys, the group chains and the
//! relay sessions. Everything that touches Automerge or SQLite runs here, off the async
//! executor. Inputs arrive on one channel (the app's calls, and what connection tasks read); the
//! worker drains what is queued, applies all envelopes of one document in one call, and sends
//! what the sessions need through each connection's queue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::crypto::device_log::{DeviceLog, EntryAction};
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::group::{GroupUpdate, SealedLabel};
use crate::crypto::identity::{DevicePublic, DeviceSecret};
use crate::crypto::keys::{DocKey, KeyEpoch, KeySource, Keyring};
use crate::crypto::pairing::PairingInvite;
use crate::crypto::rng::SeedRng;
use crate::engine::conn::Traffic;
use crate::engine::session::{
    CursorStep, FETCH_LIMIT, Pending, Session, TIER_ACCOUNT, TIER_META, TIER_NEWEST, TIER_OLDER,
    Tier,
};
use crate::engine::state::{self, Group};
use crate::engine::{
    CatchUpProgress, CatchUpStage, ConnectionState, EngineError, Event, PeerStatus, RelayStatus,
    SyncStatus, now_ms,
};
use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, DocId};
use crate::model::{ChangeBatch, MessageUpdate};
use crate::net::PeerAddr;
use crate::store::replica::StoredReplica;
use crate::wire::frame::ErrorCode;
use crate::wire::message::{
    MAX_DATAGRAM_BYTES, Message, StoredEnvelope, Subscription, decode_datagram, encode_datagram,
};

mod devices;
mod envelopes;
mod groups;
mod history;
mod local;
mod peers;
mod relays;
mod signals;
mod snapshots;

pub use peers::{PEER_ANSWER_BUDGET_MS, PEER_SNAPSHOT_AFTER_CHANGES};
pub use snapshots::{
    MAX_SNAPSHOTS_PER_TICK, SNAPSHOT_AFTER_CHANGES, SNAPSHOT_FORMAT_VERSION,
    SNAPSHOT_TICK_BUDGET_MS,
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
/// Most appends open on one relay at once (a reconnect with a large outbox sends this many,
/// then more as they are acknowledged).
pub const MAX_APPENDS_IN_FLIGHT: usize = 1_024;
/// Times a document's envelopes are fetched again after "not yet" refusals (unknown author
/// device, missing key) before they are taken as refused for good.
pub const MAX_BLOCKED_RETRIES: u32 = 3;
/// Bytes of received messages waiting for the worker, over all relays, before connection
/// tasks stop reading (QUIC flow control then holds the relay back): what bounds a catch-up's
/// memory when the network is faster than applying.
pub const MAX_RECEIVED_BYTES_QUEUED: usize = 16 << 20;
/// Bytes of received messages one worker turn takes on (a snapshot counts
/// [`SNAPSHOT_APPLY_WEIGHT`] times its size); app calls wait at most for one such turn.
pub const RECEIVED_BYTES_PER_TURN: usize = 256 << 10;
/// How much heavier than its size a snapshot is to apply (it is compressed).
pub const SNAPSHOT_APPLY_WEIGHT: usize = 16;
/// Least time between two catch-up progress events that only count more envelopes.
pub const CATCH_UP_EVENT_MS: u64 = 100;
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
    /// A message arrived (boxed: messages are large, other events small). `held` holds the
    /// message's share of the receive budget until the worker is done with it.
    Message {
        relay: usize,
        msg: Box<Message>,
        held: Received,
    },
    /// A datagram arrived.
    Datagram { relay: usize, bytes: Vec<u8> },
    /// A direct connection with another device is up (its TLS key is `device`); `link`
    /// numbers it, `out` reaches it.
    PeerConnected {
        link: u64,
        device: DeviceId,
        addr: String,
        inbound: bool,
        out: mpsc::UnboundedSender<Outgoing>,
        traffic: Arc<Traffic>,
    },
    /// A direct connection ended.
    PeerGone {
        link: u64,
        reason: String,
        /// The peer closed the connection refusing this device, for this reason.
        refused: Option<String>,
    },
    /// A message arrived on a direct connection.
    PeerMessage {
        link: u64,
        msg: Box<Message>,
        held: Received,
    },
    /// A datagram arrived on a direct connection.
    PeerDatagram { link: u64, bytes: Vec<u8> },
    /// LAN discovery heard a device of this account at `addr`.
    Discovered {
        device: DeviceId,
        addr: std::net::SocketAddr,
    },
}

/// A received message's share of [`MAX_RECEIVED_BYTES_QUEUED`]: its size, and the permits
/// that keep the connection task from reading further while the worker lags (released when
/// dropped).
#[derive(Debug)]
pub(crate) struct Received {
    pub bytes: usize,
    pub _permit: Option<tokio::sync::OwnedSemaphorePermit>,
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
    /// Close this connection, telling the other side why (a direct peer that was refused).
    Close(String),
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
    /// Nothing is queued: time for background work (one snapshot).
    Idle,
    /// Stop after this turn.
    Shutdown,
}

/// Where an invitation's code goes once its offer is registered.
pub(crate) type CodeReply = oneshot::Sender<Result<String, EngineError>>;

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
    /// The catch-up progress last told to the app, and when.
    progress: CatchUpProgress,
    progress_ms: u64,
    /// Bytes moved, counted by the connection task.
    traffic: Arc<Traffic>,
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
    /// Each envelope, with the direct connection it came from (`None`: a relay).
    envelopes: Vec<(Vec<u8>, Option<u64>)>,
    /// (relay, cursor step) to store once applied.
    steps: Vec<(usize, CursorStep)>,
    /// Each relay's cursor before this turn, to go back to if an envelope cannot be opened yet.
    before: Vec<(usize, u64)>,
}

/// The worker's state.
pub(crate) struct Worker {
    pub(crate) replica: StoredReplica,
    pub(crate) secret: DeviceSecret,
    pub(crate) log: DeviceLog,
    logs: HashMap<AccountId, DeviceLog>,
    /// The accounts whose logs list each device. Usually one; a log can list another account's
    /// device (its public keys are public), so every check asks "is it among them".
    device_account: HashMap<DeviceId, Vec<AccountId>>,
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
    /// Documents with envelopes that could not be opened yet (author's device or key not
    /// known here yet), with the attempts so far: fetched again once logs or groups arrive.
    blocked: HashMap<DocId, u32>,
    /// Documents an app call is waiting for (history reaching past what is here): they go
    /// first in the catch-up order.
    wanted: HashSet<DocId>,
    /// Whether background work (snapshots) may be due when the queue runs dry.
    idle_work: bool,
    /// History calls waiting for documents to be caught up.
    history_waiters: Vec<(HashSet<DocId>, oneshot::Sender<()>)>,
    /// Invitation codes waiting for the relay to register their offer, by rendezvous.
    offers: HashMap<[u8; 32], (String, CodeReply)>,
    /// Snapshots made, taken and distrusted.
    snapshots: snapshots::Snapshots,
    /// Whether direct sync is on: envelopes are archived to serve peers.
    direct: bool,
    /// Direct connections, by link number.
    peers: BTreeMap<u64, peers::Peer>,
    /// Envelopes accepted this turn, archived with its commit.
    archive_queue: Vec<peers::Archived>,
    /// Peers' `PeerSync`s still being answered, a slice per turn.
    peer_answers: VecDeque<peers::PeerAnswer>,
    /// What starts connections to peers (set once the engine runs), and the peers dialled.
    pub(crate) dialer: Option<Dialer>,
    dialing: HashMap<DeviceId, (String, tokio::task::JoinHandle<()>)>,
    /// What LAN discovery announces and recognises, if it runs.
    discovery: Option<tokio::sync::watch::Sender<crate::net::discovery::DiscoveryAccount>>,
    /// Accounts whose log was fetched again, at the length held then, because a group update's
    /// signer was not in it (a device linked since): fetched once per length and connection,
    /// then refused.
    logs_refetched: HashSet<(AccountId, usize)>,
    /// Group updates posted only to wrap keys to member devices that lack them
    /// (`groups.rs`, `rewrap_missing_keys`), by group and version. Unlike other updates they
    /// join the chain here only once a relay confirms them: another device may post the same
    /// version first, and the chains must not fork.
    rewraps: HashMap<(DocId, u32), GroupUpdate>,
    /// Membership changes of this device a relay refused because another update took their
    /// version, by group: made again on the relay's chain once it is fetched.
    rebase: HashMap<DocId, Vec<GroupUpdate>>,
    pub(crate) stopping: bool,
}

/// What the worker needs to start a direct connection task.
pub(crate) struct Dialer {
    pub runtime: tokio::runtime::Handle,
    pub identity: Arc<crate::net::Identity>,
    pub endpoint: quinn::Endpoint,
    pub worker: mpsc::UnboundedSender<Input>,
    pub queue: Arc<tokio::sync::Semaphore>,
    pub stop: tokio::sync::watch::Receiver<bool>,
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
/// With `archive`, they are also archived to serve peers.
fn write_sealed(
    tx: &mut crate::store::StoreTx<'_>,
    sealed: &[Sealed],
    archive: bool,
) -> Result<Vec<i64>, crate::store::StoreError> {
    let mut ids = Vec::new();
    for (addr, own, envelopes) in sealed {
        for (_, env) in envelopes {
            let bytes = env.encode();
            ids.push(tx.push_outbox(&bytes)?);
            if archive {
                let h = &env.header;
                tx.archive(addr, &h.author, (h.first_seq, h.last_seq), &bytes)?;
            }
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
            blocked: HashMap::new(),
            wanted: HashSet::new(),
            idle_work: true,
            history_waiters: Vec::new(),
            offers: HashMap::new(),
            snapshots: snapshots::Snapshots::default(),
            direct: false,
            peers: BTreeMap::new(),
            archive_queue: Vec::new(),
            peer_answers: VecDeque::new(),
            dialer: None,
            dialing: HashMap::new(),
            discovery: None,
            logs_refetched: HashSet::new(),
            rewraps: HashMap::new(),
            rebase: HashMap::new(),
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
                progress: CatchUpProgress::default(),
                progress_ms: 0,
                traffic: Arc::default(),
            });
        }
        let relay_keys: Vec<[u8; 32]> = w.relays.iter().map(|r| *r.addr.key.as_bytes()).collect();
        let doc_ids: Vec<DocId> = addrs.iter().map(DocAddr::doc_id).collect();
        w.snapshots = snapshots::Snapshots::load(w.replica.store(), &relay_keys, &doc_ids)?;
        // Changes made before a crash between storing them and sealing them are sealed now.
        w.seal_new(addrs.into_iter().collect())?;
        Ok(w)
    }

    fn index_devices(&mut self) {
        let mut map: HashMap<DeviceId, Vec<AccountId>> = HashMap::new();
        for log in self.logs.values().chain(std::iter::once(&self.log)) {
            for e in log.entries() {
                if let EntryAction::Genesis(info) | EntryAction::Add(info) = &e.action {
                    let accounts = map.entry(info.keys.device).or_default();
                    if !accounts.contains(&log.account()) {
                        accounts.push(log.account());
                    }
                }
            }
        }
        self.device_account = map;
    }

    /// The accounts whose logs list `device`.
    pub(crate) fn accounts_of(&self, device: &DeviceId) -> &[AccountId] {
        self.device_account.get(device).map_or(&[], Vec::as_slice)
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
        // App calls (and ticks) go first in every turn; network input follows in arrival order,
        // up to `RECEIVED_BYTES_PER_TURN`, so a long catch-up delays a call by one turn at most.
        // What waits here is bounded by the receive budget the connection tasks hold to.
        let mut calls: VecDeque<Input> = VecDeque::new();
        let mut net: VecDeque<Input> = VecDeque::new();
        fn sort(input: Input, calls: &mut VecDeque<Input>, net: &mut VecDeque<Input>) {
            match input {
                Input::Net(_) => net.push_back(input),
                other => calls.push_back(other),
            }
        }
        loop {
            if calls.is_empty() && net.is_empty() {
                if let Ok(input) = rx.try_recv() {
                    sort(input, &mut calls, &mut net);
                } else if self.idle_work {
                    // Idle: one piece of background work, then look at the queue again.
                    self.turn(vec![Input::Idle]);
                    if self.stopping {
                        break;
                    }
                    continue;
                } else {
                    match rx.blocking_recv() {
                        Some(input) => sort(input, &mut calls, &mut net),
                        None => break,
                    }
                }
                // New input may make background work due again.
                self.idle_work = true;
            }
            while let Ok(input) = rx.try_recv() {
                sort(input, &mut calls, &mut net);
            }
            let inputs = next_turn(&mut calls, &mut net);
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
                Input::Net(NetEvent::Message { relay, msg, .. })
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
                Input::Net(NetEvent::PeerMessage { link, msg, .. })
                    if matches!(*msg, Message::Envelopes { .. }) =>
                {
                    if let Message::Envelopes { doc, items, .. } = *msg {
                        self.gather_direct(link, doc, items, &mut arrivals);
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
                        Input::Tick => {
                            self.check_silent_relays(now_ms());
                            self.make_snapshots(MAX_SNAPSHOTS_PER_TICK, SNAPSHOT_TICK_BUDGET_MS);
                        }
                        Input::Idle => {
                            self.idle_work = self.make_snapshots(1, SNAPSHOT_TICK_BUDGET_MS) > 0
                                || !self.peer_answers.is_empty();
                        }
                        Input::Shutdown => self.stopping = true,
                    }
                }
            }
        }
        if !arrivals.is_empty() {
            self.apply_arrivals(arrivals);
        }
        self.commit_turn();
        self.wake_history();
        if !self.peer_answers.is_empty() && self.answer_peers(PEER_ANSWER_BUDGET_MS) {
            // More to answer: the loop comes back to it when nothing else is queued.
            self.idle_work = true;
        }
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
        let archived = std::mem::take(&mut self.archive_queue);
        let mut archive_done = Vec::new();
        let direct = self.direct;
        let failed = self
            .replica
            .flush_with(|tx| {
                ids = write_sealed(tx, &sealed, direct)?;
                for (relay, addr, seq) in &cursors {
                    tx.set_cursor(relay, addr, *seq)?;
                }
                archive_done.clear();
                for a in &archived {
                    let added = tx.archive(&a.addr, &a.author, a.range, &a.bytes)?;
                    // What a peer gave and this device did not hold goes to the relays too,
                    // so it survives its author.
                    let outbox = if added && a.from.is_some() {
                        Some(tx.push_outbox(&a.bytes)?)
                    } else {
                        None
                    };
                    archive_done.push((added, outbox));
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
            let done = archived
                .into_iter()
                .zip(archive_done)
                .map(|(a, (added, outbox))| (a, added, outbox))
                .collect();
            self.after_archived(done);
            self.record_sealed(sealed, ids);
            if let Err(e) = self.after_local() {
                tracing::error!(error = %e, "sealing local changes failed");
            }
        }
        for reply in std::mem::take(&mut self.replies) {
            reply(failed.as_deref());
        }
    }

    // ---- status ------------------------------------------------------------------------------

    /// The byte counters of each relay, in the order of the configuration, for its connection
    /// task.
    pub(crate) fn relay_traffic(&self) -> Vec<Arc<Traffic>> {
        self.relays.iter().map(|r| r.traffic.clone()).collect()
    }

    pub(crate) fn status(&self) -> SyncStatus {
        SyncStatus {
            relays: self
                .relays
                .iter()
                .map(|r| RelayStatus {
                    relay: r.addr.to_string(),
                    state: r.state,
                    catch_up: r.progress,
                    bytes_received: r.traffic.received(),
                    bytes_sent: r.traffic.sent(),
                })
                .collect(),
            peers: self.peer_statuses(),
            pending_uploads: self.outbox.len(),
            snapshots_taken: self.snapshots.taken,
            snapshots_distrusted: self.snapshots.distrusted,
            snapshots_made: self.snapshots.made,
        }
    }

    fn emit_status(&self) {
        self.emit(Event::Sync(self.status()));
    }
}

/// The inputs of the next turn: queued app calls first, then network input in arrival order
/// up to [`RECEIVED_BYTES_PER_TURN`] of weight, at most [`MAX_INPUTS_PER_TURN`] in all.
fn next_turn(calls: &mut VecDeque<Input>, net: &mut VecDeque<Input>) -> Vec<Input> {
    let take = calls.len().min(MAX_INPUTS_PER_TURN);
    let mut inputs: Vec<Input> = calls.drain(..take).collect();
    let mut weight = 0;
    while weight < RECEIVED_BYTES_PER_TURN && inputs.len() < MAX_INPUTS_PER_TURN {
        let Some(input) = net.pop_front() else {
            break;
        };
        weight += input_weight(&input);
        inputs.push(input);
    }
    inputs
}

/// What a network input costs a turn: a received message's size (a snapshot's several times
/// over); other events next to nothing.
fn input_weight(input: &Input) -> usize {
    match input {
        Input::Net(
            NetEvent::Message { msg, held, .. } | NetEvent::PeerMessage { msg, held, .. },
        ) => match **msg {
            Message::Snapshot { .. } => held.bytes.saturating_mul(SNAPSHOT_APPLY_WEIGHT),
            _ => held.bytes,
        },
        _ => 1,
    }
}

#[cfg(test)]
mod turn_tests {
    use super::*;

    fn received(msg: Message, bytes: usize) -> Input {
        Input::Net(NetEvent::Message {
            relay: 0,
            msg: Box::new(msg),
            held: Received {
                bytes,
                _permit: None,
            },
        })
    }

    fn envelopes(bytes: usize) -> Input {
        received(Message::Done { req: 1 }, bytes)
    }

    #[test]
    fn app_calls_go_first_and_network_input_is_taken_by_weight() {
        let mut calls: VecDeque<Input> = VecDeque::from([Input::Tick, Input::Tick]);
        // Ten answers of 100 KiB queued before the calls.
        let mut net: VecDeque<Input> = (0..10).map(|_| envelopes(100 << 10)).collect();
        let turn = next_turn(&mut calls, &mut net);
        assert!(
            matches!(turn[..2], [Input::Tick, Input::Tick]),
            "calls first"
        );
        // 256 KiB of weight: the third 100 KiB message crosses it and is the last taken.
        assert_eq!(turn.len(), 2 + 3);
        assert_eq!(net.len(), 7);
        assert!(calls.is_empty());
        // A snapshot weighs several times its size: one alone fills a turn.
        let snapshot = Message::Snapshot {
            req: 1,
            doc: DocId::from_bytes([1; 32]),
            envelope: Vec::new(),
        };
        let mut net: VecDeque<Input> =
            VecDeque::from([received(snapshot, 20 << 10), envelopes(1 << 10)]);
        assert_eq!(next_turn(&mut calls, &mut net).len(), 1);
        assert_eq!(net.len(), 1);
        // Many calls are split over turns.
        let mut calls: VecDeque<Input> =
            (0..MAX_INPUTS_PER_TURN + 5).map(|_| Input::Tick).collect();
        assert_eq!(next_turn(&mut calls, &mut net).len(), MAX_INPUTS_PER_TURN);
        assert_eq!((calls.len(), net.len()), (5, 1));
    }
}
