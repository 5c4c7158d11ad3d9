//! The transport's error type.

use std::io;
use std::net::SocketAddr;

use crate::net::addr::PeerAddrError;
use crate::net::tls::PeerKeyError;
use crate::wire::frame::WireError;

/// Errors of the QUIC transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// rustls refused a configuration or a key this side built.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// The device certificate could not be generated.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The TLS configuration lacks the cipher suite QUIC needs for its initial packets.
    #[error("QUIC crypto configuration: {0}")]
    QuicCrypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The peer's certificate does not carry an acceptable key, or not the expected one.
    #[error("peer certificate: {0}")]
    PeerKey(#[from] PeerKeyError),
    /// The handshake completed without the `roamsync/1` application protocol.
    #[error("peer did not negotiate ALPN `roamsync/1` (negotiated {found:?})")]
    MissingAlpn {
        /// The protocol that was negotiated, if any.
        found: Option<Vec<u8>>,
    },
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP socket to {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// The endpoint refused to start a connection (bad address, endpoint closed, …).
    #[error("cannot start connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (handshake failure, timeout, peer close, …).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream was already finished or reset.
    #[error("stream already closed: {0}")]
    StreamClosed(#[from] quinn::ClosedStream),
    /// The peer sent bytes that are not valid frames.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    TruncatedFrame {
        /// Bytes of the incomplete frame.
        buffered: usize,
    },
    /// A peer address did not parse.
    #[error("bad peer address: {0}")]
    BadAddress(#[from] PeerAddrError),
    /// Name resolution failed.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// Name resolution returned no address.
    #[error("{host} resolved to no address")]
    NoAddress {
        /// The host name.
        host: String,
    },
}
