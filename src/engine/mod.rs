//! The device engine: the async API an app embeds.
//!
//! An [`Engine`] owns one device's encrypted store and keeps it in sync with the account's
//! other devices and the conversations' other members through one or more relays. Every call
//! is durable when it returns and works offline: changes wait in the outbox until a relay
//! acknowledges them. Incoming changes are verified, decrypted, applied in batches per document,
//! and reported as [`Event`]s.
//!
//! Inside: a worker thread owns the replica, keys and sync sessions (Automerge and SQLite never
//! run on the async executor); one task per relay moves frames and reconnects with backoff.
//!
//! ```no_run
//! # async fn demo() -> Result<(), roamsync::engine::EngineError> {
//! use roamsync::engine::{Engine, EngineConfig};
//! use roamsync::store::seal::StorageKey;
//!
//! let relay = "6f0d…@relay.example:4433".parse().unwrap();
//! let config = EngineConfig::new("phone.db", StorageKey::from_bytes([7; 32]), vec![relay]);
//! let phone = Engine::create_account(config, "phone").await?;
//! let mut events = phone.events();
//! let chat = phone.create_conversation("notes", &[]).await?;
//! phone.send(&chat, "hello").await?;
//! while let Ok(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```

mod conn;
mod direct;
pub(crate) mod session;
mod state;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::crypto::device_log::{DeviceLog, DeviceLogError};
use crate::crypto::envelope::EnvelopeError;
use crate::crypto::group::GroupError;
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{Keyring, KeysError};
use crate::crypto::pairing::{PairingError, PairingJoin};
use crate::crypto::rng::SeedRng;
use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId};
use crate::model::{
    BatchError, ConversationSummary, Cursor, Draft, ListFlag, Message, ModelError, Page,
};
use crate::net::discovery::{DiscoveryConfig, DiscoveryHandle};
use crate::net::{FramedRecv, FramedSend, Identity, NetError, PeerAddr};
use crate::store::db::{Store, StoreError};
use crate::store::replica::{ReplicaStoreError, StoreConfig, StoredReplica};
use crate::store::seal::StorageKey;
use crate::wire::frame::{ErrorCode, Frame};
use crate::wire::message::Message as WireMessage;

pub use conn::{BACKOFF_MAX_MS, BACKOFF_START_MS, REFUSED_CLOSE_CODE, backoff_ms};
pub use session::FETCH_LIMIT;
pub use worker::{
    CATCH_UP_EVENT_MS, HEARTBEAT_MS, INVITE_TTL_MS, MAX_APPENDS_IN_FLIGHT, MAX_BLOCKED_RETRIES,
    MAX_INPUTS_PER_TURN, MAX_RECEIVED_BYTES_QUEUED, MAX_SNAPSHOTS_PER_TICK, PEER_ANSWER_BUDGET_MS,
    PEER_SNAPSHOT_AFTER_CHANGES, RECEIVED_BYTES_PER_TURN, SILENT_RELAY_MS, SNAPSHOT_AFTER_CHANGES,
    SNAPSHOT_APPLY_WEIGHT, SNAPSHOT_FORMAT_VERSION, SNAPSHOT_TICK_BUDGET_MS,
};

use worker::{Dialer, Input, Worker};

/// Events buffered per subscriber before the slowest one starts losing them (it then gets
/// `RecvError::Lagged` and should re-read state).
pub const EVENT_BUFFER: usize = 16 * 1024;
/// How long creating a conversation or changing members waits for the relay to answer with the
/// members' device logs.
pub const LOG_FETCH_TIMEOUT_MS: u64 = 30_000;
/// How long a history call waits for segments it reaches that are still to arrive.
pub const HISTORY_FETCH_TIMEOUT_MS: u64 = 10_000;
/// How long linking waits for the other device.
pub const LINK_TIMEOUT_MS: u64 = 120_000;

/// The wall clock in milliseconds since the Unix epoch: the engine is the shell, the model
/// takes time as an argument.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn os_rng() -> Result<SeedRng, EngineError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| EngineError::Randomness(e.to_string()))?;
    Ok(SeedRng::from_seed(seed))
}

/// How to open a device.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The store file.
    pub store_path: PathBuf,
    /// The key sealing the store (from the OS keystore).
    pub storage_key: StorageKey,
    /// Relays to sync through.
    pub relays: Vec<PeerAddr>,
    /// This device's platform label in the device log.
    pub platform: String,
    /// Store tunables.
    pub store: StoreConfig,
    /// Local UDP address to bind (port 0: any).
    pub bind: SocketAddr,
    /// Changes held of a document past this device's last snapshot of it on a relay after
    /// which it uploads a new one ([`SNAPSHOT_AFTER_CHANGES`] by default); `None`: never.
    pub snapshot_after_changes: Option<u64>,
    /// Direct sync with other devices, without a relay; `None` (the default): off.
    pub direct: Option<DirectConfig>,
}

/// Direct sync: devices that can reach each other (same LAN, or any address) sync with no
/// relay in between. With it on, the device keeps every envelope it accepts (sealed, in its
/// store) to serve peers, and passes what a peer gave it on to the relays.
///
/// The default listens on every interface (any free port) and finds this account's other
/// devices on the local network by itself ([`DiscoveryConfig`]).
#[derive(Clone, Debug)]
pub struct DirectConfig {
    /// Accept direct connections on this UDP address (port 0: any free port; see
    /// [`Engine::listen_addr`]). `None`: only dial out. The engine's connections to relays
    /// then leave from the same address.
    pub listen: Option<SocketAddr>,
    /// Devices to keep a direct connection with, as `<device key>@host:port`.
    pub peers: Vec<PeerAddr>,
    /// LAN discovery: announce an opaque rotating token by UDP multicast and connect to this
    /// account's devices heard announcing (needs `listen`). `enabled: false` turns it off.
    pub discovery: DiscoveryConfig,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 0))),
            peers: Vec::new(),
            discovery: DiscoveryConfig::default(),
        }
    }
}

/// An invitation to link a new device over a direct connection, for a QR code: the pairing
/// code and where the inviting device listens. Its text form is `<code>/<device key>@host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectInvite {
    /// The pairing code (as [`Engine::invite_device`] shows it).
    pub code: String,
    /// The inviting device.
    pub addr: PeerAddr,
}

impl std::fmt::Display for DirectInvite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.code, self.addr)
    }
}

impl std::str::FromStr for DirectInvite {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (code, addr) = s.trim().split_once('/').ok_or(EngineError::Mismatch {
            what: "invitation text (`<code>/<device key>@host:port`)",
        })?;
        let addr: PeerAddr = addr.parse().map_err(NetError::BadAddress)?;
        Ok(DirectInvite {
            code: code.to_owned(),
            addr,
        })
    }
}

impl EngineConfig {
    /// A configuration with default store settings.
    pub fn new(
        store_path: impl Into<PathBuf>,
        storage_key: StorageKey,
        relays: Vec<PeerAddr>,
    ) -> Self {
        EngineConfig {
            store_path: store_path.into(),
            storage_key,
            relays,
            platform: std::env::consts::OS.to_owned(),
            store: StoreConfig::default(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            snapshot_after_changes: Some(SNAPSHOT_AFTER_CHANGES),
            direct: None,
        }
    }
}

/// A connection's state, as shown to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting for the first time.
    Connecting,
    /// Connected; catching up.
    Syncing,
    /// Connected and caught up: pushes arrive as they happen.
    Live,
    /// Disconnected; the next attempt is in `retry_in_ms`.
    Offline {
        /// Delay before the next attempt.
        retry_in_ms: u64,
    },
}

/// Which part of the history a catch-up is bringing in. Stages follow the catch-up order: the
/// conversation list is complete once `Recent` starts, the newest page of every conversation
/// once `History` starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CatchUpStage {
    /// The account document and every conversation's meta document: the conversation list.
    #[default]
    Conversations,
    /// Each conversation's newest segment: its latest messages.
    Recent,
    /// Older segments.
    History,
    /// Everything subscribed is caught up; pushes arrive as they happen.
    Done,
}

/// How far a relay's catch-up has come, for a progress bar. Counted since the connection was
/// made; `docs_total` grows as segments are discovered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CatchUpProgress {
    /// What is being brought in.
    pub stage: CatchUpStage,
    /// Documents whose catch-up has finished.
    pub docs_done: u64,
    /// Documents subscribed or about to be.
    pub docs_total: u64,
    /// Envelopes received in catch-up and fetch answers.
    pub envelopes: u64,
    /// Bytes of those envelopes.
    pub bytes: u64,
}

/// One relay's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayStatus {
    /// The relay's address.
    pub relay: String,
    /// Its connection.
    pub state: ConnectionState,
    /// The current (or last) connection's catch-up.
    pub catch_up: CatchUpProgress,
    /// Bytes received from this relay since the engine opened, over all its connections:
    /// whole frames (headers included) and datagrams, without QUIC's own packet overhead.
    pub bytes_received: u64,
    /// Bytes sent to this relay since the engine opened, counted the same way.
    pub bytes_sent: u64,
}

/// One direct connection's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The device on the other end.
    pub device: DeviceId,
    /// Its network address.
    pub addr: String,
    /// Whether it connected to this device.
    pub inbound: bool,
    /// Whether its hello was accepted (until then it sees nothing).
    pub accepted: bool,
    /// What this device asked of it and how much has come.
    pub catch_up: CatchUpProgress,
    /// Bytes received on this connection.
    pub bytes_received: u64,
    /// Bytes sent on this connection.
    pub bytes_sent: u64,
}

/// Sync status for the app's indicator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// Each relay.
    pub relays: Vec<RelayStatus>,
    /// Each direct connection with another device.
    pub peers: Vec<PeerStatus>,
    /// Envelopes stored here that not every relay has acknowledged yet.
    pub pending_uploads: usize,
    /// Documents this device started from a relay's snapshot since it was opened.
    pub snapshots_taken: u64,
    /// Of those, the ones found to leave changes out and fetched whole instead.
    pub snapshots_distrusted: u64,
    /// Snapshots this device uploaded that a relay acknowledged since it was opened.
    pub snapshots_made: u64,
}

/// What the app hears about.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message arrived from another device.
    MessageReceived {
        /// Its conversation.
        conversation: ConversationId,
        /// The message.
        id: MessageId,
    },
    /// A message was edited on another device.
    MessageEdited {
        /// Its conversation.
        conversation: ConversationId,
        /// The message.
        id: MessageId,
    },
    /// A message was recalled on another device.
    MessageRecalled {
        /// Its conversation.
        conversation: ConversationId,
        /// The message.
        id: MessageId,
    },
    /// A message's reactions changed on another device.
    ReactionsChanged {
        /// Its conversation.
        conversation: ConversationId,
        /// The message.
        id: MessageId,
    },
    /// The read position or unread count of a conversation may have changed.
    ReadStateChanged {
        /// The conversation.
        conversation: ConversationId,
    },
    /// The conversation list (order, last message, flags, drafts) may have changed.
    ConversationListChanged,
    /// This account was added to a conversation (or this device learnt of one).
    ConversationAdded {
        /// The conversation.
        conversation: ConversationId,
    },
    /// This account was removed from a conversation: learnt when the removal arrives, or, for
    /// a device that was offline, at its next connection. Nothing written to the conversation
    /// afterwards reaches this device, and what it writes there is not sent.
    RemovedFromConversation {
        /// The conversation.
        conversation: ConversationId,
    },
    /// Changes this device made to a conversation (messages, edits, reactions…) that no relay
    /// accepted before this account was removed from it. They can never be delivered: they
    /// left the outbox and stay on this device only.
    NotDelivered {
        /// The conversation.
        conversation: ConversationId,
        /// Envelopes dropped from the outbox.
        envelopes: u32,
    },
    /// Another member is typing, or stopped.
    Typing {
        /// The conversation.
        conversation: ConversationId,
        /// Who.
        account: AccountId,
        /// Whether they are typing.
        typing: bool,
    },
    /// A device joined this account.
    DeviceLinked {
        /// The device.
        device: DeviceId,
    },
    /// A device of this account was revoked.
    DeviceRevoked {
        /// The device.
        device: DeviceId,
    },
    /// Connection or upload state changed.
    Sync(SyncStatus),
    /// A relay's catch-up moved on: a stage began or ended, documents finished, or (at most
    /// every [`CATCH_UP_EVENT_MS`]) more envelopes arrived.
    CatchUp {
        /// The relay's address.
        relay: String,
        /// Where it is.
        progress: CatchUpProgress,
    },
    /// A direct connection's catch-up moved on (the documents this device asked the peer
    /// about: stage, documents answered of those asked, envelopes and bytes received). A device
    /// linked directly follows its history arriving with these.
    PeerCatchUp {
        /// The peer device.
        device: DeviceId,
        /// Where it is.
        progress: CatchUpProgress,
    },
    /// A direct connection was refused, by this device (a stranger, a revoked device) or by the
    /// peer (its reason).
    PeerRefused {
        /// The peer device.
        device: DeviceId,
        /// Why.
        reason: String,
    },
    /// A relay refused a request.
    RelayError {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// Input from the network was refused (bad signature, not a member, malformed…); nothing
    /// of it was applied.
    Refused {
        /// The document it claimed to be for.
        doc: DocAddr,
        /// Why.
        reason: String,
    },
    /// The store failed while applying remote changes; they will be fetched again.
    StorageError {
        /// What failed.
        text: String,
    },
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The replica refused or its store failed.
    #[error(transparent)]
    Replica(#[from] ReplicaStoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The model refused the operation.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store holds no device yet: create an account or link.
    #[error("the store holds no device: create an account or link this device first")]
    NotSetUp,
    /// The store already holds a device.
    #[error("the store already holds device {device:?} of account {account}")]
    AlreadySetUp {
        /// Its account.
        account: AccountId,
        /// Its device.
        device: DeviceId,
    },
    /// No relay is connected, and the call needs one.
    #[error("no relay is connected")]
    Offline,
    /// A relay refused a request.
    #[error("relay refused: {code:?}: {text}")]
    Relay {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// An account's device log is not available.
    #[error("account {0} is unknown to the relay")]
    UnknownAccount(AccountId),
    /// A conversation is unknown here.
    #[error("conversation {0:?} is unknown here")]
    UnknownConversation(ConversationId),
    /// Something that must match did not.
    #[error("{what} does not match")]
    Mismatch {
        /// What.
        what: &'static str,
    },
    /// Device-log error.
    #[error(transparent)]
    DeviceLog(#[from] DeviceLogError),
    /// Key error.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// Group error.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// Envelope error.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// Batch error.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// Pairing error.
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// Network error.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The OS gave no randomness.
    #[error("no randomness from the OS: {0}")]
    Randomness(String),
    /// The wait was too long.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        ms: u64,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    Closed,
    /// The call needs direct sync ([`EngineConfig::direct`]), which is off.
    #[error("direct sync is off: set EngineConfig::direct")]
    DirectOff,
    /// The store could not commit the operation: it is in memory but may be lost on restart.
    #[error("the operation could not be stored: {text}")]
    NotDurable {
        /// Why.
        text: String,
    },
}

/// A running device.
pub struct Engine {
    tx: mpsc::UnboundedSender<Input>,
    events: broadcast::Sender<Event>,
    /// The subscription made before the worker started, for the first `events()` call.
    first_events: std::sync::Mutex<Option<broadcast::Receiver<Event>>>,
    account: AccountId,
    device: DeviceId,
    stop: watch::Sender<bool>,
    worker: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    listen_addr: Option<SocketAddr>,
    /// LAN discovery, while it runs (dropping it stops it).
    _discovery: Option<DiscoveryHandle>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("account", &self.account)
            .field("device", &self.device)
            .finish()
    }
}

/// Tells the worker a second passed, until stopped.
async fn tick(worker: mpsc::UnboundedSender<Input>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => {
                if worker.send(Input::Tick).is_err() {
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| EngineError::Closed)?
}

impl Engine {
    /// Creates a new account whose first device is this one, in a new store.
    pub async fn create_account(
        config: EngineConfig,
        device_name: &str,
    ) -> Result<Engine, EngineError> {
        let name = device_name.to_owned();
        let (worker, events) = blocking(move || {
            let mut rng = os_rng()?;
            let secret = DeviceSecret::generate(&mut rng);
            let log = DeviceLog::create(&secret, &name, &config.platform)?;
            let replica = Self::new_store(&config, &secret, &log, &Keyring::default())?;
            let (events, _) = broadcast::channel(EVENT_BUFFER);
            let mut worker = Worker::new(
                replica,
                secret,
                log,
                config.relays.clone(),
                events.clone(),
                rng,
            )?;
            worker.create_account_group()?;
            Ok(((worker, config), events))
        })
        .await?;
        Self::start(worker, events).await
    }

    /// Opens the device stored at `config.store_path`.
    pub async fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        let (worker, events) = blocking(move || {
            let store = Store::open(
                &config.store_path,
                &config.storage_key,
                config.store.durability,
            )?;
            let secret = store.device_secret()?.ok_or(EngineError::NotSetUp)?;
            let entries = store.device_log()?.ok_or(EngineError::NotSetUp)?;
            drop(store);
            let genesis = entries.first().ok_or(EngineError::NotSetUp)?;
            let account = AccountId::from_bytes(genesis.hash().0);
            let log = DeviceLog::verify(&account, entries)?;
            let replica = StoredReplica::open(
                &config.store_path,
                &config.storage_key,
                account,
                secret.device_id(),
                config.store,
            )?;
            let (events, _) = broadcast::channel(EVENT_BUFFER);
            let worker = Worker::new(
                replica,
                secret,
                log,
                config.relays.clone(),
                events.clone(),
                os_rng()?,
            )?;
            Ok(((worker, config), events))
        })
        .await?;
        Self::start(worker, events).await
    }

    /// Links this (new) device to an existing account: `code` is the one shown by
    /// [`Engine::invite_device`] on a current device, which must be online on the first relay
    /// of `config`. The account's device log and every key arrive over the relay, protected
    /// by the code; the history then syncs like on any device.
    pub async fn link(
        config: EngineConfig,
        code: &str,
        device_name: &str,
    ) -> Result<Engine, EngineError> {
        let relay = config.relays.first().cloned().ok_or(EngineError::Offline)?;
        Self::link_through(config, relay, code, device_name).await
    }

    /// Links this (new) device to an existing account over a direct connection with the
    /// inviting device, no relay needed: `invite` is what [`Engine::invite_device_direct`]
    /// showed. The log and every key arrive protected by the code, then the whole history
    /// comes from the inviting device directly ([`Event::PeerCatchUp`] reports its progress),
    /// and from relays, if `config` names any. Turns direct sync on, with the inviting device
    /// as a peer.
    pub async fn link_direct(
        mut config: EngineConfig,
        invite: &DirectInvite,
        device_name: &str,
    ) -> Result<Engine, EngineError> {
        let direct = config.direct.get_or_insert_with(DirectConfig::default);
        if !direct.peers.contains(&invite.addr) {
            direct.peers.push(invite.addr.clone());
        }
        Self::link_through(config, invite.addr.clone(), &invite.code, device_name).await
    }

    /// Runs the joining side of pairing through `via` (a relay forwarding to the inviter, or
    /// the inviter itself), then creates the store and starts the engine.
    async fn link_through(
        config: EngineConfig,
        via: PeerAddr,
        code: &str,
        device_name: &str,
    ) -> Result<Engine, EngineError> {
        let mut rng = os_rng()?;
        let secret = DeviceSecret::generate(&mut rng);
        let (mut join, request) = PairingJoin::start(
            code,
            &secret,
            device_name,
            &config.platform,
            now_ms(),
            LINK_TIMEOUT_MS,
        )?;
        let identity = Identity::from_device(&secret)?;
        let endpoint = crate::net::client_endpoint(config.bind)?;
        let conn = crate::net::connect(&endpoint, &identity, &via).await?;
        let (send, recv) = conn.open_bi().await.map_err(NetError::Connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        let rendezvous = join.rendezvous();
        send.send(&Frame::Message(WireMessage::PairJoin {
            req: 1,
            rendezvous,
            request,
        }))
        .await?;
        let wait = async {
            loop {
                match recv.recv().await? {
                    Some(Frame::Message(WireMessage::PairAnswered { response, .. })) => {
                        return Ok(response);
                    }
                    Some(Frame::Message(WireMessage::Error { code, text, .. })) => {
                        return Err(EngineError::Relay { code, text });
                    }
                    Some(_) => {}
                    None => return Err(EngineError::Offline),
                }
            }
        };
        let response = tokio::time::timeout(Duration::from_millis(LINK_TIMEOUT_MS), wait)
            .await
            .map_err(|_| EngineError::Timeout {
                what: "the inviting device",
                ms: LINK_TIMEOUT_MS,
            })??;
        conn.close(0u32.into(), b"linked");
        endpoint.wait_idle().await;
        let (worker, events) = blocking(move || {
            // Verifying the log and unwrapping every key is CPU work: off the executor.
            let joined = join.handle_response(&response, now_ms(), &secret)?;
            let replica = Self::new_store(&config, &secret, &joined.log, &joined.keyring)?;
            let (events, _) = broadcast::channel(EVENT_BUFFER);
            let worker = Worker::new(
                replica,
                secret,
                joined.log,
                config.relays.clone(),
                events.clone(),
                rng,
            )?;
            Ok(((worker, config), events))
        })
        .await?;
        Self::start(worker, events).await
    }

    /// Creates the store of a new device: identity, log and keys.
    fn new_store(
        config: &EngineConfig,
        secret: &DeviceSecret,
        log: &DeviceLog,
        keys: &Keyring,
    ) -> Result<StoredReplica, EngineError> {
        {
            let store = Store::open(
                &config.store_path,
                &config.storage_key,
                config.store.durability,
            )?;
            if let (Some(existing), Some(entries)) = (store.device_secret()?, store.device_log()?) {
                let account = entries.first().map_or(AccountId::from_bytes([0; 32]), |g| {
                    AccountId::from_bytes(g.hash().0)
                });
                return Err(EngineError::AlreadySetUp {
                    account,
                    device: existing.device_id(),
                });
            }
        }
        let mut replica = StoredReplica::open(
            &config.store_path,
            &config.storage_key,
            log.account(),
            secret.device_id(),
            config.store,
        )?;
        replica.store().write(|tx| {
            tx.put_device_secret(secret)?;
            tx.put_device_log(log)?;
            for (doc, epoch, key) in keys.iter() {
                tx.put_doc_key(doc, epoch, key)?;
            }
            Ok(())
        })?;
        Ok(replica)
    }

    async fn start(
        (mut worker, config): (Worker, EngineConfig),
        events: broadcast::Sender<Event>,
    ) -> Result<Engine, EngineError> {
        worker.set_snapshot_after(config.snapshot_after_changes);
        let account = worker.account();
        let device = worker.device();
        let identity = Arc::new(Identity::from_device(&worker.secret)?);
        let traffic = worker.relay_traffic();
        let listen = config.direct.as_ref().and_then(|d| d.listen);
        // A listening device's connections out (to relays, to peers) leave from the same
        // endpoint, so a peer behind the same NAT mapping can be reached back.
        let endpoint = match listen {
            Some(addr) => crate::net::server_endpoint(&identity, addr)?,
            None => crate::net::client_endpoint(config.bind)?,
        };
        let listen_addr = match listen {
            Some(_) => Some(endpoint.local_addr().map_err(|source| NetError::Bind {
                addr: listen.unwrap_or(config.bind),
                source,
            })?),
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let queue = conn::receive_budget();
        // What LAN discovery announces and listens for follows this account's device log.
        let accounts = worker.discovery_accounts();
        if let Some(direct) = &config.direct {
            worker.enable_direct(Dialer {
                runtime: tokio::runtime::Handle::current(),
                identity: Arc::clone(&identity),
                endpoint: endpoint.clone(),
                worker: tx.clone(),
                queue: Arc::clone(&queue),
                stop: stop_rx.clone(),
            });
            for peer in &direct.peers {
                worker.connect_peer(peer.clone());
            }
        }
        // Subscribed before the worker runs: the first `events()` call misses nothing.
        let first_events = std::sync::Mutex::new(Some(events.subscribe()));
        let handle = std::thread::Builder::new()
            .name("roamsync-worker".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| EngineError::Randomness(format!("cannot start the worker thread: {e}")))?;
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = config
            .relays
            .iter()
            .zip(traffic)
            .enumerate()
            .map(|(i, (relay, traffic))| {
                tokio::spawn(conn::run(
                    i,
                    relay.clone(),
                    identity.clone(),
                    endpoint.clone(),
                    tx.clone(),
                    conn::Meters {
                        traffic,
                        queue: Arc::clone(&queue),
                    },
                    stop_rx.clone(),
                ))
            })
            .collect();
        let discovery = match (&config.direct, listen_addr) {
            (Some(d), Some(at)) if d.discovery.enabled => {
                direct::discover(d.discovery.clone(), device, at.port(), accounts, tx.clone())
            }
            _ => None,
        };
        if listen.is_some() {
            tasks.push(tokio::spawn(direct::listen(
                endpoint.clone(),
                tx.clone(),
                Arc::clone(&queue),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(tick(tx.clone(), stop_rx.clone())));
        Ok(Engine {
            tx,
            events,
            first_events,
            account,
            device,
            stop,
            worker: Some(handle),
            tasks,
            endpoint,
            listen_addr,
            _discovery: discovery,
        })
    }

    /// Where this device accepts direct connections (with [`DirectConfig::listen`]), with the
    /// port actually bound.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// This device's direct address as other devices dial it, `<device key>@host:port`, with
    /// `host` the address they reach this machine at (its LAN address, typically). `None` if
    /// it does not listen.
    pub fn direct_addr(&self, host: &str) -> Option<PeerAddr> {
        self.listen_addr.map(|a| PeerAddr {
            key: self.device,
            host: host.to_owned(),
            port: a.port(),
        })
    }

    /// Keeps a direct connection with another device (reconnecting after it drops). Needs
    /// [`EngineConfig::direct`]. The peer must be a device of this account or of an account
    /// sharing a conversation with it; it sees only what it shares.
    pub async fn connect_peer(&self, peer: PeerAddr) -> Result<(), EngineError> {
        self.call(move |w| {
            if w.dialer.is_none() {
                return Err(EngineError::DirectOff);
            }
            w.connect_peer(peer);
            Ok(())
        })
        .await
    }

    /// Stops the direct connection with `device` (and dialling it).
    pub async fn forget_peer(&self, device: DeviceId) -> Result<(), EngineError> {
        self.call(move |w| {
            w.forget_peer(&device);
            Ok(())
        })
        .await
    }

    /// This device's account.
    pub fn account(&self) -> AccountId {
        self.account
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// A subscription to events. The first call's subscription holds every event since the
    /// engine started (up to [`EVENT_BUFFER`] of them; past that the oldest are dropped and the
    /// receiver reports `Lagged`), so nothing between `open`/`link` returning and the app
    /// listening is lost; later calls see events from then on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        let first = self
            .first_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        first.unwrap_or_else(|| self.events.subscribe())
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Worker) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Run(Box::new(move |w| {
                let _ = tx.send(f(w));
            })))
            .map_err(|_| EngineError::Closed)?;
        rx.await.map_err(|_| EngineError::Closed)?
    }

    /// Runs a local operation; it returns once durable. Operations queued together are
    /// committed together (one transaction, one envelope per document).
    async fn local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoredReplica) -> Result<T, ReplicaStoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Run(Box::new(move |w| {
                w.replica.defer_writes(true);
                let out = f(&mut w.replica);
                w.replica.defer_writes(false);
                match out {
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                    }
                    Ok(v) => w.defer_reply(Box::new(move |failed| {
                        let _ = tx.send(match failed {
                            None => Ok(v),
                            Some(text) => Err(EngineError::NotDurable {
                                text: text.to_owned(),
                            }),
                        });
                    })),
                }
            })))
            .map_err(|_| EngineError::Closed)?;
        rx.await.map_err(|_| EngineError::Closed)?
    }

    // ---- conversations and messages -----------------------------------------------------------

    /// Creates a conversation with `others` (other accounts; empty for notes to self). Reads
    /// the other accounts' device lists from a connected relay, so their devices get the key;
    /// with no relay, it uses the lists held here (a direct peer's is fresh from its hello) and
    /// fails with [`EngineError::Offline`] if one is missing.
    pub async fn create_conversation(
        &self,
        title: &str,
        others: &[AccountId],
    ) -> Result<ConversationId, EngineError> {
        self.fetch_logs(others.to_vec()).await?;
        let (title, others) = (title.to_owned(), others.to_vec());
        self.call(move |w| w.create_conversation(&title, &others))
            .await
    }

    /// Adds an account to a conversation; it can read the whole history.
    pub async fn add_member(
        &self,
        conversation: &ConversationId,
        account: AccountId,
    ) -> Result<(), EngineError> {
        self.fetch_logs(vec![account]).await?;
        let c = *conversation;
        self.call(move |w| w.add_member(&c, account)).await
    }

    /// Removes an account from a conversation; what is written afterwards uses a key it does
    /// not have.
    pub async fn remove_member(
        &self,
        conversation: &ConversationId,
        account: AccountId,
    ) -> Result<(), EngineError> {
        let c = *conversation;
        let members = self
            .call(move |w| Ok(w.group_members(&DocAddr::Meta(c).doc_id())))
            .await?
            .unwrap_or_default();
        self.fetch_logs(members).await?;
        self.call(move |w| w.remove_member(&c, account)).await
    }

    async fn fetch_logs(&self, accounts: Vec<AccountId>) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.call(move |w| {
            w.fetch_logs(accounts, tx);
            Ok(())
        })
        .await?;
        tokio::time::timeout(Duration::from_millis(LOG_FETCH_TIMEOUT_MS), rx)
            .await
            .map_err(|_| EngineError::Timeout {
                what: "device logs from the relay",
                ms: LOG_FETCH_TIMEOUT_MS,
            })?
            .map_err(|_| EngineError::Closed)?
    }

    /// Sends a text message; durable here when this returns, uploaded as soon as a relay is
    /// reachable.
    pub async fn send(
        &self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<MessageId, EngineError> {
        let (c, draft) = (*conversation, Draft::text(text));
        self.local(move |r| r.send(now_ms(), &c, &draft)).await
    }

    /// Sends a message with attachments or a reply.
    pub async fn send_draft(
        &self,
        conversation: &ConversationId,
        draft: Draft,
    ) -> Result<MessageId, EngineError> {
        let c = *conversation;
        self.local(move |r| r.send(now_ms(), &c, &draft)).await
    }

    /// Edits one of this account's messages.
    pub async fn edit(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
        text: &str,
    ) -> Result<(), EngineError> {
        let (c, id, text) = (*conversation, *id, text.to_owned());
        self.local(move |r| r.edit(&c, &id, &text)).await
    }

    /// Recalls one of this account's messages.
    pub async fn recall(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<(), EngineError> {
        let (c, id) = (*conversation, *id);
        self.local(move |r| r.recall(&c, &id)).await
    }

    /// Adds (`on`) or removes a reaction.
    pub async fn react(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
        reaction: &str,
        on: bool,
    ) -> Result<(), EngineError> {
        let (c, id, reaction) = (*conversation, *id, reaction.to_owned());
        self.local(move |r| r.react(&c, &id, &reaction, on)).await
    }

    /// Marks a conversation read up to a message.
    pub async fn mark_read(
        &self,
        conversation: &ConversationId,
        upto: &MessageId,
    ) -> Result<(), EngineError> {
        let (c, id) = (*conversation, *upto);
        self.local(move |r| r.mark_read(&c, &id)).await
    }

    /// Sets (or clears, with "") a conversation's draft.
    pub async fn set_draft(
        &self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<(), EngineError> {
        let (c, text) = (*conversation, text.to_owned());
        self.local(move |r| r.set_draft(&c, &text)).await
    }

    /// Pins, mutes or archives a conversation (or undoes it).
    pub async fn set_flag(
        &self,
        conversation: &ConversationId,
        flag: ListFlag,
        on: bool,
    ) -> Result<(), EngineError> {
        let c = *conversation;
        self.local(move |r| r.set_flag(&c, flag, on)).await
    }

    /// Hides a message on this account's devices ("delete for me").
    pub async fn hide_message(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<(), EngineError> {
        let (c, id) = (*conversation, *id);
        self.local(move |r| r.hide_message(&c, &id)).await
    }

    /// Tells the other members' online devices whether this account is typing (not stored).
    pub async fn set_typing(
        &self,
        conversation: &ConversationId,
        typing: bool,
    ) -> Result<(), EngineError> {
        let c = *conversation;
        self.call(move |w| w.typing(&c, typing)).await
    }

    // ---- queries ---------------------------------------------------------------------------

    /// The conversation list, ordered for display.
    pub async fn conversation_list(&self) -> Result<Vec<ConversationSummary>, EngineError> {
        self.call(|w| Ok(w.replica.conversation_list()?)).await
    }

    /// A page of history: up to `limit` messages older than `before` (the newest if `None`),
    /// in conversation order.
    ///
    /// When the page would reach past what this device holds — older segments still to arrive,
    /// e.g. just after linking — those segments are fetched ahead of the rest of the catch-up
    /// and the call answers once they are in (waiting at most [`HISTORY_FETCH_TIMEOUT_MS`]).
    /// Offline, or if that wait runs out, it answers with what is here and sets
    /// [`Page::incomplete`].
    pub async fn history(
        &self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, EngineError> {
        let c = *conversation;
        let (page, wait) = self
            .call(move |w| w.history_or_fetch(&c, before, limit, true))
            .await?;
        let Some(wait) = wait else {
            return Ok(page);
        };
        let _ = tokio::time::timeout(Duration::from_millis(HISTORY_FETCH_TIMEOUT_MS), wait).await;
        let (page, _) = self
            .call(move |w| w.history_or_fetch(&c, before, limit, false))
            .await?;
        Ok(page)
    }

    /// One message.
    pub async fn message(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<Message, EngineError> {
        let (c, id) = (*conversation, *id);
        self.call(move |w| Ok(w.replica.message(&c, &id)?)).await
    }

    /// The unread count of a conversation.
    pub async fn unread_count(&self, conversation: &ConversationId) -> Result<u64, EngineError> {
        let c = *conversation;
        self.call(move |w| Ok(w.replica.unread_count(&c)?)).await
    }

    /// The draft of a conversation.
    pub async fn draft(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<String>, EngineError> {
        let c = *conversation;
        self.call(move |w| Ok(w.replica.draft(&c))).await
    }

    /// Connection and upload state.
    pub async fn sync_status(&self) -> Result<SyncStatus, EngineError> {
        self.call(|w| Ok(w.status())).await
    }

    // ---- devices -------------------------------------------------------------------------

    /// Starts linking a new device: returns the code to enter on it. This device must stay
    /// online (on the first connected relay) until the new device has joined.
    pub async fn invite_device(&self) -> Result<String, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.call(move |w| {
            w.invite(tx);
            Ok(())
        })
        .await?;
        tokio::time::timeout(Duration::from_millis(LOG_FETCH_TIMEOUT_MS), rx)
            .await
            .map_err(|_| EngineError::Timeout {
                what: "the relay to register the invitation",
                ms: LOG_FETCH_TIMEOUT_MS,
            })?
            .map_err(|_| EngineError::Closed)?
    }

    /// Starts linking a new device over a direct connection, with no relay: returns the
    /// invitation to show (a QR code of its text, typically) for [`Engine::link_direct`] on the
    /// new device. `host` is the address the new device reaches this one at. Needs
    /// [`DirectConfig::listen`]; this device must stay running until the new one has joined.
    pub async fn invite_device_direct(&self, host: &str) -> Result<DirectInvite, EngineError> {
        let addr = self.direct_addr(host).ok_or(EngineError::DirectOff)?;
        let code = self.call(|w| w.invite_direct()).await?;
        Ok(DirectInvite { code, addr })
    }

    /// Revokes a device of this account: relays refuse it at once.
    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), EngineError> {
        self.call(move |w| w.revoke(device)).await
    }

    /// Current devices of this account.
    pub async fn devices(&self) -> Result<Vec<DeviceId>, EngineError> {
        self.call(|w| {
            Ok(w.log
                .current_devices()
                .map(|d| d.info.keys.device)
                .collect())
        })
        .await
    }

    /// Stops syncing and closes the store. Everything that returned is already durable.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let _ = self.tx.send(Input::Shutdown);
        if let Some(h) = self.worker.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = self.tx.send(Input::Shutdown);
    }
}
