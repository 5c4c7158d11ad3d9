//! The wire format: a length-checked byte codec and versioned, length-prefixed frames.

pub mod codec;
pub mod frame;
