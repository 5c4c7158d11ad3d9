//! QUIC endpoints and connections with the transport's settings.
//!
//! A relay runs a [`server_endpoint`], which can also dial out; a device that only dials uses a
//! [`client_endpoint`]. [`connect`] pins the peer's key for each connection, [`accept`] returns
//! the connecting device's id.
//!
//! ```no_run
//! # async fn run(identity: roamsync::net::Identity, relay: roamsync::net::PeerAddr)
//! #     -> Result<(), roamsync::net::NetError> {
//! use roamsync::net::{client_endpoint, connect, FramedSend};
//!
//! let endpoint = client_endpoint("0.0.0.0:0".parse().unwrap())?;
//! let conn = connect(&endpoint, &identity, &relay).await?;
//! let (send, _recv) = conn.open_bi().await?;
//! let mut send = FramedSend::new(send);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::ids::DeviceId;
use crate::net::NetError;
use crate::net::addr::PeerAddr;
use crate::net::tls::{
    self, Identity, PeerKeyError, PinnedServerVerifier, SERVER_NAME, peer_device,
};

/// Keep-alive interval. Well below the idle timeout so that a few lost keep-alives do not end
/// a connection, and below the ~30 s after which many NATs forget a silent UDP mapping.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Idle timeout, in milliseconds: a connection that hears nothing (not even the peer's
/// keep-alives, six of them) for this long is dead, e.g. a phone that left the network. It also
/// bounds how long a handshake with an unreachable peer takes to fail.
pub const MAX_IDLE_TIMEOUT_MS: u32 = 30_000;

/// Receive window of one stream. Above the largest frame (a 4 MiB envelope), so one frame never
/// waits for window updates, and enough for a 100 ms × 1 Gbit/s path.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Receive window of a whole connection: four streams at full speed. With the stream limits
/// this bounds what one peer can make the relay buffer.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// Send buffer of a whole connection, matching what the peer may receive.
pub const SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// Datagram buffers. Sync uses streams; datagrams are bounded small for future presence pings.
pub const DATAGRAM_BUFFER_BYTES: usize = 1024 * 1024;

/// Bidirectional streams a peer may have open at once: enough for parallel sync requests,
/// bounded to cap per-connection state. `open_bi` waits while the limit is reached.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 64;

/// Unidirectional streams a peer may have open at once (pushes of new envelopes).
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 64;

/// Application close code when the peer completed TLS but is not acceptable to this layer.
const CLOSE_REFUSED: u32 = 1;

/// The transport parameters of every connection, both sides.
pub fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            MAX_IDLE_TIMEOUT_MS,
        ))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES))
        .datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_UNI_STREAMS));
    config
}

/// An endpoint that accepts connections as `identity` (client certificates required) on
/// `bind`, and can also make outgoing connections with [`connect`]. Needs a tokio runtime.
pub fn server_endpoint(identity: &Identity, bind: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let crypto = QuicServerConfig::try_from(tls::server_config(identity)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let endpoint_config = quinn::EndpointConfig::new(identity.reset_key());
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime"),
    })?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
        .map_err(|source| NetError::Bind { addr: bind, source })
}

/// An endpoint that only makes outgoing connections, bound to `bind` (usually port 0). Needs a
/// tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    quinn::Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })
}

/// Connects to `peer` as `identity`, accepting only a server that proves it holds `peer.key`.
///
/// A server with another key fails the handshake with
/// [`NetError::PeerKey`]`(`[`PeerKeyError::WrongKey`]`)`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    peer: &PeerAddr,
) -> Result<quinn::Connection, NetError> {
    let addr = peer.resolve().await?;
    let verifier = Arc::new(PinnedServerVerifier::new(peer.key));
    let crypto = QuicClientConfig::try_from(tls::client_config(identity, Arc::clone(&verifier))?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let connecting = endpoint.connect_with(config, addr, SERVER_NAME)?;
    let conn = match connecting.await {
        Ok(conn) => conn,
        // The verifier knows why it refused; that beats the bare alert code.
        Err(e) => {
            return Err(verifier
                .take_rejection()
                .map_or(e.into(), NetError::PeerKey));
        }
    };
    refuse_unless(&conn, check_alpn(&conn))?;
    let found = refuse_unless(&conn, peer_device(&conn))?;
    // The verifier already checked this; a second look costs one parse.
    if found != peer.key {
        let e = PeerKeyError::WrongKey {
            expected: peer.key,
            found,
        };
        return refuse_unless(&conn, Err(e.into()));
    }
    Ok(conn)
}

/// Completes an incoming connection; returns it with the client's device id.
///
/// A failed handshake is the peer's problem: an accept loop should log it and keep accepting.
pub async fn accept(incoming: quinn::Incoming) -> Result<(quinn::Connection, DeviceId), NetError> {
    let conn = incoming.await?;
    refuse_unless(&conn, check_alpn(&conn))?;
    let device = refuse_unless(&conn, peer_device(&conn))?;
    Ok((conn, device))
}

/// Checks that the handshake negotiated [`tls::ALPN`].
fn check_alpn(conn: &quinn::Connection) -> Result<(), NetError> {
    let found = conn
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if found.as_deref() == Some(tls::ALPN) {
        Ok(())
    } else {
        Err(NetError::MissingAlpn { found })
    }
}

/// Closes `conn` if `result` is an error, so a refused peer learns it at once.
fn refuse_unless<T>(conn: &quinn::Connection, result: Result<T, NetError>) -> Result<T, NetError> {
    if result.is_err() {
        conn.close(VarInt::from_u32(CLOSE_REFUSED), b"refused");
    }
    result
}
