//! The wire format: a length-checked byte codec, versioned, length-prefixed frames, and the
//! protocol messages they carry.

pub mod codec;
pub mod frame;
pub mod message;
