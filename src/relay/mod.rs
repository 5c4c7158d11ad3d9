//! The relay: a store-and-forward server that holds only ciphertext plus routing metadata.
//!
//! - [`core`]: the protocol logic as a sans-IO state machine (no sockets, files or clock).
//! - [`limits`]: every limit the relay enforces, and the per-connection rate limiter.
//!
//! The device ↔ relay protocol is described in `docs/PROTOCOL.md`, what the relay checks and
//! what it cannot do in `docs/SECURITY.md`.

pub mod core;
pub mod limits;
