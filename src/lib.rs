//! roamsync: multi-device sync and message roaming for instant messaging.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crypto;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod model;
pub mod net;
pub mod relay;
#[cfg(test)]
mod sim;
pub mod store;
pub mod wire;
