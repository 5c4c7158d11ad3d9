//! LAN discovery: an account's devices find each other on the local network, with no
//! configuration, by UDP multicast, without telling anyone else who they are.
//!
//! Every device announces itself every couple of seconds to a multicast group with a 23-byte
//! [`Announcement`]: a magic, a version, a 16-byte [`Token`] and its QUIC port. The token is a
//! keyed blake3 hash, under the account's [`DiscoveryKey`], of the current epoch
//! ([`TOKEN_ROTATE_MS`], ten minutes) and the announcing device's id. A device of the same
//! account recomputes the tokens of the account's devices and so learns which device is where
//! ([`identify`]); to anyone else a token is random bytes that change every epoch. The packet
//! carries neither the account id nor the device id.
//!
//! Finding a device is not trusting it: the QUIC connection that follows pins the device key
//! from the device log, so an injected or replayed announcement can at worst make a device try
//! a connection that fails its handshake.
//!
//! The module is split like the rest of the transport: a sans-IO core ([`Discovery`]: tokens,
//! the packet codec, matching, the announcement schedule and report suppression, all with
//! `now_ms` passed in) and an async shell ([`spawn_discovery`], in [`socket`]) that owns the
//! multicast socket.
//!
//! ```
//! use roamsync::ids::DeviceId;
//! use roamsync::net::discovery::{Announcement, DiscoveryKey, identify, token};
//!
//! let key = DiscoveryKey::derive(&[7; 32]);
//! let (laptop, phone) = (DeviceId::from_bytes([1; 32]), DeviceId::from_bytes([2; 32]));
//! let now_ms = 1_700_000_000_000;
//!
//! // The laptop announces itself ...
//! let packet = Announcement { token: token(&key, &laptop, now_ms), quic_port: 4433 }.encode();
//! // ... and the phone, which knows the account's devices, recognises it.
//! let heard = Announcement::decode(&packet).unwrap();
//! assert_eq!(identify(&key, &[laptop, phone], &phone, now_ms, &heard.token), Some(laptop));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::device_log::MAX_LOG_ENTRIES;
use crate::crypto::rng::SeedRng;
use crate::ids::DeviceId;
use crate::wire::codec::{Reader, Writer};

pub mod socket;

pub use socket::{DiscoveryConfig, DiscoveryHandle, spawn_discovery};

/// The blake3 context that turns the account's shared secret into the [`DiscoveryKey`].
pub const KEY_CONTEXT: &str = "roamsync 2026 lan discovery";
/// How long a token stays the same: an epoch is `now_ms / TOKEN_ROTATE_MS`.
pub const TOKEN_ROTATE_MS: u64 = 10 * 60 * 1000;
/// Bytes of a token.
pub const TOKEN_LEN: usize = 16;
/// The first bytes of every announcement.
pub const MAGIC: [u8; 4] = *b"RSDC";
/// The announcement format this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of an announcement: magic, version, token, QUIC port.
pub const PACKET_LEN: usize = MAGIC.len() + 1 + TOKEN_LEN + 2;
/// Most devices whose tokens are matched: an account cannot have more devices than its log has
/// entries.
pub const MAX_CANDIDATES: usize = MAX_LOG_ENTRIES;
/// Most distinct addresses reported for one device within one announcement interval, so that
/// replayed announcements from many source addresses cannot flood the caller.
pub const MAX_ADDRS_PER_DEVICE: usize = 4;
/// Announcements go out up to `interval_ms / ANNOUNCE_JITTER_DIVISOR` early, so that devices
/// started together do not stay in step.
pub const ANNOUNCE_JITTER_DIVISOR: u64 = 4;
/// The shortest announcement interval; shorter configured intervals are raised to it.
pub const MIN_ANNOUNCE_INTERVAL_MS: u64 = 50;

/// Why discovery could not start, or why a packet is not an announcement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The packet does not have the length of an announcement of its version.
    #[error("announcement of {len} bytes, expected {expected}")]
    WrongLength {
        /// Bytes received.
        len: usize,
        /// Bytes an announcement has.
        expected: usize,
    },
    /// The packet does not start with [`MAGIC`].
    #[error("not an announcement: magic {found:02x?}")]
    WrongMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The announcement has a version this code does not read.
    #[error("announcement version {found}, this device reads {supported}")]
    UnsupportedVersion {
        /// The version byte.
        found: u8,
        /// The version understood.
        supported: u8,
    },
    /// The announcement names port 0, where nothing can be reached.
    #[error("announcement names QUIC port 0")]
    ZeroPort,
    /// The configured group is not an IPv4 multicast address.
    #[error("{group} is not a multicast group")]
    NotMulticast {
        /// The configured group.
        group: SocketAddrV4,
    },
    /// Discovery was started outside a Tokio runtime.
    #[error("discovery must be started within a Tokio runtime")]
    NoRuntime,
    /// Setting up the multicast socket failed.
    #[error("discovery socket for {group}: {step}: {source}")]
    Socket {
        /// The configured group.
        group: SocketAddrV4,
        /// What was being done (`"bind"`, `"join group"`, …).
        step: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
}

/// The key of an account's discovery tokens, shared by all its devices. Zeroized on drop;
/// `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DiscoveryKey([u8; 32]);

impl DiscoveryKey {
    /// Derives the key from the 32-byte secret every device of the account holds.
    pub fn derive(account_secret: &[u8; 32]) -> Self {
        Self(blake3::derive_key(KEY_CONTEXT, account_secret))
    }
}

impl fmt::Debug for DiscoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiscoveryKey(<redacted>)")
    }
}

/// What a device announces instead of its id: meaningful only under the account's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

/// The token epoch at `now_ms`.
pub fn epoch(now_ms: u64) -> u64 {
    now_ms / TOKEN_ROTATE_MS
}

/// The token `device` announces in `epoch`.
pub fn token_in_epoch(key: &DiscoveryKey, device: &DeviceId, epoch: u64) -> Token {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&epoch.to_be_bytes());
    h.update(device.as_bytes());
    let mut out = [0u8; TOKEN_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..TOKEN_LEN]);
    Token(out)
}

/// The token `device` announces at `now_ms`.
pub fn token(key: &DiscoveryKey, device: &DeviceId, now_ms: u64) -> Token {
    token_in_epoch(key, device, epoch(now_ms))
}

/// The epochs whose tokens are accepted at `now_ms`: the current one, the previous one (an
/// announcement sent just before a rotation) and the next one (a sender whose clock is ahead).
fn accepted_epochs(now_ms: u64) -> impl Iterator<Item = u64> {
    let e = epoch(now_ms);
    [e.checked_sub(1), Some(e), e.checked_add(1)]
        .into_iter()
        .flatten()
}

/// Which of `candidates` (the account's devices) made `token`, if any. `own` never matches: a
/// device hears its own announcements when multicast loops back.
///
/// This costs three hashes per candidate; [`Discovery`] keeps a table instead, so that a flood
/// of packets costs one lookup each.
pub fn identify(
    key: &DiscoveryKey,
    candidates: &[DeviceId],
    own: &DeviceId,
    now_ms: u64,
    token: &Token,
) -> Option<DeviceId> {
    candidates
        .iter()
        .take(MAX_CANDIDATES)
        .filter(|d| *d != own)
        .find(|d| accepted_epochs(now_ms).any(|e| token_in_epoch(key, d, e) == *token))
        .copied()
}

/// One announcement: `MAGIC || VERSION || token || QUIC port (u16 BE)`, [`PACKET_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The announcing device's token for the current epoch.
    pub token: Token,
    /// The UDP port of its QUIC endpoint, at the packet's source address.
    pub quic_port: u16,
}

impl Announcement {
    /// The packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(PACKET_LEN);
        w.put(&MAGIC)
            .u8(VERSION)
            .put(&self.token.0)
            .u16(self.quic_port);
        w.into_bytes()
    }

    /// Parses a packet. Magic and version are checked before the length, so that a later
    /// version may change the length and still be refused as a version.
    pub fn decode(packet: &[u8]) -> Result<Self, DiscoveryError> {
        let wrong_length = |_| DiscoveryError::WrongLength {
            len: packet.len(),
            expected: PACKET_LEN,
        };
        let mut r = Reader::new(packet);
        let magic = r.array::<4>().map_err(wrong_length)?;
        if magic != MAGIC {
            return Err(DiscoveryError::WrongMagic { found: magic });
        }
        let version = r.u8().map_err(wrong_length)?;
        if version != VERSION {
            return Err(DiscoveryError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let token = Token(r.array().map_err(wrong_length)?);
        let quic_port = r.u16().map_err(wrong_length)?;
        r.finish().map_err(wrong_length)?;
        if quic_port == 0 {
            return Err(DiscoveryError::ZeroPort);
        }
        Ok(Self { token, quic_port })
    }
}

/// What discovery needs to know about the account: the key and its devices (from the device
/// log). It changes when a device is linked or revoked.
#[derive(Clone, Debug)]
pub struct DiscoveryAccount {
    /// The account's discovery key.
    pub key: DiscoveryKey,
    /// The account's devices; this device may be among them.
    pub devices: Vec<DeviceId>,
}

/// A device of the account heard on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Discovered {
    /// Which device announced itself.
    pub device: DeviceId,
    /// The packet's source IP with the announced QUIC port.
    pub addr: SocketAddr,
}

/// The tokens of every candidate for the epochs accepted at one time, built once per epoch.
#[derive(Debug, Default)]
struct TokenTable {
    /// The epoch the table was built for; `None` until built or after a change of account.
    epoch: Option<u64>,
    tokens: HashMap<Token, DeviceId>,
}

impl TokenTable {
    /// The device that made `token` at `now_ms`, rebuilding the table on a new epoch.
    fn lookup(
        &mut self,
        account: &DiscoveryAccount,
        own: &DeviceId,
        now_ms: u64,
        token: &Token,
    ) -> Option<DeviceId> {
        let e = epoch(now_ms);
        if self.epoch != Some(e) {
            self.build(account, own, now_ms);
        }
        self.tokens.get(token).copied()
    }

    fn build(&mut self, account: &DiscoveryAccount, own: &DeviceId, now_ms: u64) {
        self.tokens.clear();
        for device in account
            .devices
            .iter()
            .take(MAX_CANDIDATES)
            .filter(|d| *d != own)
        {
            for e in accepted_epochs(now_ms) {
                self.tokens
                    .insert(token_in_epoch(&account.key, device, e), *device);
            }
        }
        self.epoch = Some(epoch(now_ms));
    }
}

/// The sans-IO discovery state of one device: when to announce, what to announce, and which
/// heard announcements to report.
///
/// Drive it with [`poll_announcement`](Self::poll_announcement) (send what it returns to the
/// group), [`poll_timeout`](Self::poll_timeout) (when to call again),
/// [`handle_packet`](Self::handle_packet) for every datagram received and
/// [`handle_account`](Self::handle_account) when the account changes.
#[derive(Debug)]
pub struct Discovery {
    own: DeviceId,
    quic_port: u16,
    interval_ms: u64,
    account: DiscoveryAccount,
    table: TokenTable,
    next_announce_ms: u64,
    /// Per device, the addresses reported within the last interval and when.
    reported: HashMap<DeviceId, Vec<(SocketAddr, u64)>>,
    /// Draws the announcement jitter.
    rng: SeedRng,
}

impl Discovery {
    /// A device that announces `quic_port` every `interval_ms` (at least
    /// [`MIN_ANNOUNCE_INTERVAL_MS`]), first at `now_ms`.
    pub fn new(
        own: DeviceId,
        quic_port: u16,
        interval_ms: u64,
        account: DiscoveryAccount,
        rng: SeedRng,
        now_ms: u64,
    ) -> Self {
        Self {
            own,
            quic_port,
            interval_ms: interval_ms.max(MIN_ANNOUNCE_INTERVAL_MS),
            account,
            table: TokenTable::default(),
            next_announce_ms: now_ms,
            reported: HashMap::new(),
            rng,
        }
    }

    /// The announcement interval in effect.
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// Takes a new key or device list. Devices no longer listed are forgotten.
    pub fn handle_account(&mut self, account: DiscoveryAccount) {
        self.account = account;
        self.table = TokenTable::default();
        let devices = &self.account.devices;
        self.reported.retain(|d, _| devices.contains(d));
    }

    /// Handles a datagram from `from`. Returns the device to report, or `None` for another
    /// account's (or this device's own) announcement and for a device reported from that address
    /// within the last interval. A packet that is not an announcement is an error.
    pub fn handle_packet(
        &mut self,
        from: SocketAddr,
        packet: &[u8],
        now_ms: u64,
    ) -> Result<Option<Discovered>, DiscoveryError> {
        let announcement = Announcement::decode(packet)?;
        let Some(device) = self
            .table
            .lookup(&self.account, &self.own, now_ms, &announcement.token)
        else {
            return Ok(None);
        };
        let addr = SocketAddr::new(from.ip(), announcement.quic_port);
        Ok(self
            .should_report(device, addr, now_ms)
            .then_some(Discovered { device, addr }))
    }

    /// Whether `device` at `addr` is reported now; records it if so.
    fn should_report(&mut self, device: DeviceId, addr: SocketAddr, now_ms: u64) -> bool {
        let interval_ms = self.interval_ms;
        let recent = self.reported.entry(device).or_default();
        // An entry from the future (the wall clock went back) counts as expired.
        recent.retain(|&(_, at)| at <= now_ms && now_ms - at < interval_ms);
        if recent.len() >= MAX_ADDRS_PER_DEVICE || recent.iter().any(|&(a, _)| a == addr) {
            return false;
        }
        recent.push((addr, now_ms));
        true
    }

    /// The announcement to send now, if one is due; schedules the next.
    pub fn poll_announcement(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        if now_ms < self.next_announce_ms {
            return None;
        }
        let jitter_ms = self.jitter_ms();
        self.next_announce_ms = now_ms.saturating_add(self.interval_ms - jitter_ms);
        let announcement = Announcement {
            token: token(&self.account.key, &self.own, now_ms),
            quic_port: self.quic_port,
        };
        Some(announcement.encode())
    }

    /// How much earlier than a full interval the next announcement goes out.
    fn jitter_ms(&mut self) -> u64 {
        let span = self.interval_ms / ANNOUNCE_JITTER_DIVISOR + 1;
        u64::from_be_bytes(self.rng.array()) % span
    }

    /// When [`poll_announcement`](Self::poll_announcement) next has something, in ms.
    pub fn poll_timeout(&self) -> u64 {
        self.next_announce_ms
    }
}

#[cfg(test)]
mod tests;
