//! The relay: a store-and-forward server that holds only ciphertext plus routing metadata.
//!
//! - [`core`]: the protocol logic as a sans-IO state machine (no sockets, files or clock).
//! - [`limits`]: every limit the relay enforces, and the per-connection rate limiter.
//! - [`server`]: the async shell (tokio, QUIC): connections, the actor that owns the core,
//!   store writes in order, fetches on reader connections, graceful shutdown.
//! - [`store`]: the relay's durable storage (SQLite): device logs, access-control groups,
//!   documents and the global envelope log whose sequence numbers are the cursors devices pull
//!   "since".
//! - [`writer`]: one thread in front of the store that commits envelope appends in groups: one
//!   transaction and one fsync for everything queued.
//!
//! The device ↔ relay protocol is described in `docs/PROTOCOL.md`, what the relay checks and
//! what it cannot do in `docs/SECURITY.md`.

pub mod core;
pub mod limits;
pub mod server;
pub mod store;
pub mod writer;

pub use store::{
    AppendOutcome, DeviceLogRow, DocRow, Fetched, GroupRow, NewEnvelope, RelayReader, RelayStore,
    RelayStoreError, RelayStoreOptions,
};
pub use writer::{PendingAppend, RelayWriter, WriterError, WriterStats};
