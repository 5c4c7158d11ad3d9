//! Peer addresses: a device key and where to reach it, written `<key hex>@host:port`.
//!
//! ```
//! use roamsync::net::PeerAddr;
//!
//! let text = format!("{}@[::1]:4433", "ab".repeat(32));
//! let addr: PeerAddr = text.parse().unwrap();
//! assert_eq!(addr.host, "::1");
//! assert_eq!(addr.port, 4433);
//! assert_eq!(addr.to_string(), text);
//! ```

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::ids::{DeviceId, IdParseError};
use crate::net::NetError;

/// Longest host part accepted: the longest DNS name.
pub const MAX_HOST_LEN: usize = 253;

/// A device to connect to: its key (pinned during the handshake) and its network location.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The device's ed25519 key; the connection fails unless the peer proves it holds it.
    pub key: DeviceId,
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    /// The UDP port.
    pub port: u16,
}

/// Why text is not a [`PeerAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerAddrError {
    /// There is no `@` between key and location.
    #[error("missing `@` between key and host (expected `<key hex>@host:port`)")]
    MissingAt,
    /// The key is not 64 hex digits.
    #[error("bad key: {0}")]
    Key(#[from] IdParseError),
    /// The location has no `:port`.
    #[error("missing `:port`")]
    MissingPort,
    /// The port is not a number in 1..=65535.
    #[error("bad port `{port}`")]
    BadPort {
        /// The text found.
        port: String,
    },
    /// The host is empty.
    #[error("empty host")]
    EmptyHost,
    /// The host is longer than [`MAX_HOST_LEN`].
    #[error("host of {len} bytes, at most {max} allowed")]
    HostTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The host contains a character no host name or address has.
    #[error("host contains invalid character {ch:?}")]
    InvalidHostChar {
        /// The character.
        ch: char,
    },
    /// An IPv6 address without brackets (`::1:4433` is ambiguous).
    #[error("IPv6 addresses need brackets: `[addr]:port`")]
    UnbracketedIpv6,
    /// A `[` without its `]`, or something between `]` and `:port`.
    #[error("unterminated or malformed `[…]` host")]
    BadBrackets,
    /// The text in brackets is not an IPv6 address.
    #[error("`{host}` in brackets is not an IPv6 address")]
    BadIpv6 {
        /// The text in brackets.
        host: String,
    },
}

impl FromStr for PeerAddr {
    type Err = PeerAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, location) = s.split_once('@').ok_or(PeerAddrError::MissingAt)?;
        let key = DeviceId::parse_hex(key)?;
        let (host, port) = split_host_port(location)?;
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(PeerAddrError::BadPort {
                    port: port.to_owned(),
                });
            }
        };
        Ok(PeerAddr {
            key,
            host: host.to_owned(),
            port,
        })
    }
}

/// Splits `host:port` or `[ipv6]:port` and checks the host.
fn split_host_port(location: &str) -> Result<(&str, &str), PeerAddrError> {
    if let Some(bracketed) = location.strip_prefix('[') {
        let (host, rest) = bracketed
            .split_once(']')
            .ok_or(PeerAddrError::BadBrackets)?;
        let port = match rest.strip_prefix(':') {
            Some(port) => port,
            None if rest.is_empty() => return Err(PeerAddrError::MissingPort),
            None => return Err(PeerAddrError::BadBrackets),
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(PeerAddrError::BadIpv6 {
                host: host.to_owned(),
            });
        }
        return Ok((host, port));
    }
    let (host, port) = location
        .rsplit_once(':')
        .ok_or(PeerAddrError::MissingPort)?;
    check_host(host)?;
    Ok((host, port))
}

/// Checks an unbracketed host: a DNS name or an IPv4 address.
fn check_host(host: &str) -> Result<(), PeerAddrError> {
    if host.is_empty() {
        return Err(PeerAddrError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(PeerAddrError::HostTooLong {
            len: host.len(),
            max: MAX_HOST_LEN,
        });
    }
    if host.contains(':') {
        return Err(PeerAddrError::UnbracketedIpv6);
    }
    match host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        Some(ch) => Err(PeerAddrError::InvalidHostChar { ch }),
        None => Ok(()),
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.key, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.key, self.host, self.port)
        }
    }
}

impl PeerAddr {
    /// The first socket address the host resolves to (IP literals resolve without a lookup).
    pub async fn resolve(&self) -> Result<SocketAddr, NetError> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| NetError::Resolve {
                host: self.host.clone(),
                source,
            })?;
        addrs.next().ok_or_else(|| NetError::NoAddress {
            host: self.host.clone(),
        })
    }
}
