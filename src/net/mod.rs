//! The QUIC transport between devices and relays (quinn 0.11, rustls 0.23 with ring, TLS 1.3).
//!
//! This is the async shell's byte mover: it authenticates peers, opens streams and cuts them
//! into [`Frame`](crate::wire::frame::Frame)s. What the frames mean is decided elsewhere.
//!
//! **Identity is the device key.** Each side presents a self-signed X.509 certificate whose
//! subject public key is its ed25519 [`DeviceId`](crate::ids::DeviceId) key ([`Identity`]).
//! No certificate authority is involved: a CA could only vouch for names, and devices are not
//! names. A client *pins* the key it expects (the relay's, or a peer device's from the device
//! log) and the handshake fails unless the server proves it holds that key
//! ([`PinnedServerVerifier`]). A server requires a client certificate with an ed25519 key and
//! hands the key up as the caller's device id ([`accept`], [`peer_device`]); whether that device
//! may do anything is decided above TLS. Details in [`tls`].
//!
//! **Settings** are named constants in [`endpoint`]: keep-alive every 5 s and a 30 s idle timeout
//! (mobile peers vanish silently; NATs forget quiet mappings), stream windows above the largest
//! frame, and per-connection windows and stream counts that bound what one peer can make the
//! relay buffer.
//!
//! - [`tls`]: certificates, verifiers, rustls configs, [`peer_device`].
//! - [`endpoint`]: transport parameters, endpoints, [`connect`], [`accept`].
//! - [`addr`]: [`PeerAddr`], `<key hex>@host:port`.
//! - [`framed`]: [`FramedSend`], [`FramedRecv`].
//! - [`discovery`]: finding the account's other devices on the LAN by multicast, announcing
//!   only a rotating token.
//!
//! Byte-level facts (ALPN, certificate contents, what is verified) are in `docs/PROTOCOL.md`.

pub mod addr;
pub mod discovery;
pub mod endpoint;
mod error;
pub mod framed;
pub mod tls;

pub use addr::{PeerAddr, PeerAddrError};
pub use endpoint::{accept, client_endpoint, connect, server_endpoint, transport_config};
pub use error::NetError;
pub use framed::{FramedRecv, FramedSend};
pub use tls::{
    ALPN, Ed25519ClientVerifier, Identity, PeerKeyError, PinnedServerVerifier, peer_device,
};

#[cfg(test)]
mod tests;
