//! End-to-end cryptography: device identity, the account device log, document keys and sealed
//! envelopes, and linking a new device. Sans-IO: no clock, no OS randomness; callers pass `now_ms`
//! and a seeded [`rng::SeedRng`].

pub mod device_log;
pub mod envelope;
pub mod identity;
pub mod keys;
pub mod pairing;
pub mod rng;
