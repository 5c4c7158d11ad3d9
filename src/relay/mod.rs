//! The relay: a store-and-forward server that holds only opaque bytes plus routing metadata.
//!
//! This module is shell code (it does IO). [`store`] is the relay's durable storage (SQLite):
//! device logs, access-control groups, documents and the global envelope log whose sequence
//! numbers are the cursors devices pull "since". [`writer`] puts one thread in front of it that
//! commits envelope appends in groups: one transaction and one fsync for everything queued.
pub mod store;
pub mod writer;

pub use store::{
    AppendOutcome, DeviceLogRow, DocRow, Fetched, GroupRow, NewEnvelope, RelayReader, RelayStore,
    RelayStoreError, RelayStoreOptions,
};
pub use writer::{PendingAppend, RelayWriter, WriterError, WriterStats};
