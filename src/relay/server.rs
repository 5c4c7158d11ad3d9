//! The relay server: the async shell around [`RelayCore`](super::core::RelayCore).
//!
//! It only moves bytes and events. One **actor** task owns the core and receives every event
//! over a channel; it executes the core's outputs. Each connection has a **reader** (frames from
//! the stream the device opens, and datagrams, into the actor's channel) and a **writer** (queued
//! answers and pushes onto the stream). Store writes go through one **pipeline** task, in the
//! order the core emitted them, to the group-commit [`RelayWriter`]; a **forwarder** task hands
//! append outcomes back to the actor in commit order. Fetches and catch-ups read through
//! [`RelayReader`] connections on blocking threads.
//!
//! **Acknowledged means durable.** An `Ack` or `Done` is only queued after the write it confirms
//! has committed, so killing the process loses nothing acknowledged.
//!
//! **Slow connections.** Answers are never dropped: a connection whose answers pile up past
//! [`ANSWER_HIGH_WATERMARK`] is simply not read until it takes some. Pushes are dropped when a
//! connection's push queue is full; the device sees the gap through `prev` and fetches.
//!
//! ```no_run
//! # async fn run() -> Result<(), roamsync::relay::server::RelayError> {
//! use roamsync::relay::server::{Relay, RelayConfig};
//!
//! let relay = Relay::start(RelayConfig::new("relay-data", "0.0.0.0:4433".parse().unwrap())).await?;
//! println!("relay at {}", relay.addr());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::net::{Identity, NetError, PeerAddr};
use crate::relay::core::{LoadError, RelayCore, RelaySnapshot};
use crate::relay::limits::{EVENT_QUEUE_DEPTH, RelayLimits};
use crate::relay::store::{RelayReader, RelayStore, RelayStoreError, RelayStoreOptions};
use crate::relay::writer::{RelayWriter, WriterError};
use crate::store::Durability;

#[cfg(doc)]
use crate::relay::limits::ANSWER_HIGH_WATERMARK;

mod actor;
mod conn;
mod key;
mod storage;

pub use key::RELAY_KEY_FILE;

/// How a relay runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Directory of the store and the relay's key; created if missing.
    pub data_dir: PathBuf,
    /// UDP address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The limits enforced.
    pub limits: RelayLimits,
    /// How hard a commit waits for the disk.
    pub durability: Durability,
}

impl RelayConfig {
    /// A relay with default limits and full durability.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            limits: RelayLimits::default(),
            durability: Durability::Full,
        }
    }
}

/// Why a relay did not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay's key file could not be read or written.
    #[error("relay key {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The relay's key file does not hold a key.
    #[error("relay key {path} is {len} bytes; a key file is exactly {expected}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The expected length.
        expected: usize,
    },
    /// The operating system gave no randomness for a new key.
    #[error("no randomness for the relay key: {0}")]
    Randomness(String),
    /// The store failed to open or load.
    #[error("relay store: {0}")]
    Store(#[from] RelayStoreError),
    /// What the store holds does not verify.
    #[error("relay store contents: {0}")]
    Load(#[from] LoadError),
    /// The store's writer failed.
    #[error("relay writer: {0}")]
    Writer(#[from] WriterError),
    /// The QUIC endpoint failed.
    #[error("relay network: {0}")]
    Net(#[from] NetError),
    /// A durable write failed while running; the relay stopped so that its memory and its
    /// disk do not diverge.
    #[error("relay storage failed, relay stopped: {reason}")]
    StorageFailed {
        /// What failed.
        reason: String,
    },
    /// A task of the relay panicked or was cancelled.
    #[error("relay task failed: {0}")]
    Task(String),
}

/// A running relay. Dropping it without [`Relay::shutdown`] leaves it running until the
/// runtime stops.
#[derive(Debug)]
pub struct Relay {
    addr: PeerAddr,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), RelayError>>>,
}

impl Relay {
    /// Opens the store in `config.data_dir`, loads the relay's key (creating `relay.key` on
    /// first start), binds `config.listen` and starts serving.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        let dir = config.data_dir.clone();
        let durability = config.durability;
        let limits = config.limits.clone();
        let (secret, store, core, readers) = tokio::task::spawn_blocking(move || {
            let secret = key::load_or_create(&dir)?;
            let store = RelayStore::open(&dir, RelayStoreOptions { durability })?;
            let snapshot = RelaySnapshot {
                logs: store.device_logs()?,
                groups: store.groups()?,
                docs: store
                    .docs()?
                    .into_iter()
                    .map(|d| (d.doc, d.group, d.last_seq))
                    .collect(),
                usage: store.usage()?,
            };
            let core = RelayCore::load(limits, snapshot)?;
            let readers = (0..crate::relay::limits::READER_CONNECTIONS)
                .map(|_| RelayReader::open(&dir))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, RelayError>((secret, store, core, readers))
        })
        .await
        .map_err(|e| RelayError::Task(e.to_string()))??;
        let identity = Identity::from_device(&secret)?;
        let endpoint = crate::net::server_endpoint(&identity, config.listen)?;
        let local_addr = endpoint.local_addr().map_err(|source| NetError::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = PeerAddr {
            key: identity.device_id(),
            host: reachable_host(local_addr.ip()).to_string(),
            port: local_addr.port(),
        };
        let (writer, writer_thread) = RelayWriter::spawn(store)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_DEPTH);
        let (alive_tx, alive_rx) = mpsc::channel::<()>(1);
        let accept = tokio::spawn(conn::accept_loop(
            endpoint.clone(),
            events_tx,
            shutdown_rx.clone(),
            alive_tx,
            Arc::new(AtomicU64::new(1)),
        ));
        let actor = actor::Actor::new(core, readers, Instant::now());
        let parts = actor::Parts {
            events: events_rx,
            shutdown: shutdown_rx,
            writer,
            writer_thread,
            endpoint,
            accept,
            alive: alive_rx,
        };
        let task = tokio::spawn(actor.run(parts));
        tracing::info!(%addr, "relay started");
        Ok(Relay {
            addr,
            local_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// The address devices use: `<relay key>@host:port`, with the loopback address when the
    /// relay listens on every interface.
    pub fn addr(&self) -> PeerAddr {
        self.addr.clone()
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the relay stops by itself (a failed durable write); returns why.
    pub async fn stopped(&mut self) -> Result<(), RelayError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        result.map_err(|e| RelayError::Task(e.to_string()))?
    }

    /// Stops gracefully: stops accepting connections and reading requests, finishes the appends
    /// in flight and sends their acknowledgements, closes every connection and flushes the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        match self.stopped().await {
            Ok(()) => tracing::info!(addr = %self.addr, "relay stopped"),
            Err(e) => tracing::error!(addr = %self.addr, error = %e, "relay stopped with an error"),
        }
    }
}

/// The host devices can reach a relay bound to `ip` at: the loopback address of the same
/// family when it is bound to every interface.
fn reachable_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}
