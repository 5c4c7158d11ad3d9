//! Identifiers: newtypes for accounts, devices, conversations, documents and messages.
//!
//! Every id is a fixed-size byte string with a lowercase hex `Display`. Ids are public values, not
//! secrets: they appear in envelopes the relay sees (see `docs/SECURITY.md`).

use std::fmt;

use crate::model::hlc::Hlc;

/// Writes `bytes` as lowercase hex.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Parses exactly `N` bytes of lowercase or uppercase hex.
fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], IdParseError> {
    if s.len() != 2 * N {
        return Err(IdParseError::Length {
            len: s.len(),
            expected: 2 * N,
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0])?;
        let lo = hex_digit(pair[1])?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_digit(c: u8) -> Result<u8, IdParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(IdParseError::NotHex { byte: c }),
    }
}

/// Why a textual id did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdParseError {
    /// The text has the wrong number of characters.
    #[error("id has {len} hex characters, expected {expected}")]
    Length {
        /// Characters found.
        len: usize,
        /// Characters expected.
        expected: usize,
    },
    /// A character is not a hex digit.
    #[error("id contains the non-hex byte 0x{byte:02x}")]
    NotHex {
        /// The offending byte.
        byte: u8,
    },
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parses the hex form produced by `Display`.
            pub fn parse_hex(s: &str) -> Result<Self, IdParseError> {
                parse_hex::<$len>(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // A short prefix is enough to tell ids apart in logs and test output.
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(f, &self.0[..4])?;
                write!(f, "…)")
            }
        }
    };
}

byte_id!(
    /// An account: the blake3 hash of its device log's genesis entry.
    AccountId,
    32
);
byte_id!(
    /// A device: its ed25519 public key. Also the device's Automerge actor id.
    DeviceId,
    32
);
byte_id!(
    /// A conversation, chosen by its creator (see [`ConversationId::derive`]).
    ConversationId,
    16
);
byte_id!(
    /// A document as the relay sees it: a hash of its [`DocAddr`], so the relay cannot tell a
    /// conversation's metadata from its segments or from an account document.
    DocId,
    32
);

impl DeviceId {
    /// The first eight bytes as a big-endian integer: the device part of a message key.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl ConversationId {
    /// A fresh conversation id, derived without randomness from the creating device and a
    /// timestamp that device has never used before (its HLC is strictly monotonic), so two
    /// devices can never derive the same id.
    pub fn derive(creator: &DeviceId, at: Hlc) -> Self {
        let mut h = blake3::Hasher::new_derive_key("roamsync 2026 conversation id");
        h.update(creator.as_bytes());
        h.update(&at.as_u64().to_be_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(out)
    }
}

/// Where a document lives in the data model. The [`DocId`] the relay sees is its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DocAddr {
    /// The private document of one account: conversation list, drafts, read positions.
    Account(AccountId),
    /// A conversation's meta document: title, members, settings, segment index.
    Meta(ConversationId),
    /// Segment `n` (from 0) of a conversation's messages.
    Segment(ConversationId, u32),
}

impl DocAddr {
    /// The opaque id under which the relay stores this document.
    pub fn doc_id(&self) -> DocId {
        let mut h = blake3::Hasher::new_derive_key("roamsync 2026 document id");
        match self {
            DocAddr::Account(a) => {
                h.update(&[0]);
                h.update(a.as_bytes());
            }
            DocAddr::Meta(c) => {
                h.update(&[1]);
                h.update(c.as_bytes());
            }
            DocAddr::Segment(c, n) => {
                h.update(&[2]);
                h.update(c.as_bytes());
                h.update(&n.to_be_bytes());
            }
        }
        DocId(*h.finalize().as_bytes())
    }

    /// Length of the encoded form: a kind byte, then the ids.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            DocAddr::Account(_) => AccountId::LEN,
            DocAddr::Meta(_) => ConversationId::LEN,
            DocAddr::Segment(..) => ConversationId::LEN + 4,
        }
    }

    /// Appends the encoded form: `u8 kind (0 account, 1 meta, 2 segment) | id | [u32 BE segment]`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            DocAddr::Account(a) => {
                out.push(0);
                out.extend_from_slice(a.as_bytes());
            }
            DocAddr::Meta(c) => {
                out.push(1);
                out.extend_from_slice(c.as_bytes());
            }
            DocAddr::Segment(c, n) => {
                out.push(2);
                out.extend_from_slice(c.as_bytes());
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    /// Decodes [`DocAddr::encode_into`]'s output from the start of `bytes`; returns the address
    /// and the bytes it used.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(DocAddr, usize), DocAddrError> {
        let (&kind, rest) = bytes.split_first().ok_or(DocAddrError::Truncated)?;
        let addr = match kind {
            0 => DocAddr::Account(AccountId(take(rest)?)),
            1 => DocAddr::Meta(ConversationId(take(rest)?)),
            2 => {
                let c = ConversationId(take(rest)?);
                let n: [u8; 4] = take(&rest[ConversationId::LEN..])?;
                DocAddr::Segment(c, u32::from_be_bytes(n))
            }
            k => return Err(DocAddrError::UnknownKind(k)),
        };
        Ok((addr, addr.encoded_len()))
    }

    /// The conversation this document belongs to, if any.
    pub fn conversation(&self) -> Option<ConversationId> {
        match self {
            DocAddr::Account(_) => None,
            DocAddr::Meta(c) | DocAddr::Segment(c, _) => Some(*c),
        }
    }
}

/// Why bytes are not a [`DocAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocAddrError {
    /// The input ended inside the address.
    #[error("document address truncated")]
    Truncated,
    /// An unknown document kind byte.
    #[error("unknown document kind {0}")]
    UnknownKind(u8),
}

/// The first `N` bytes of `bytes`.
fn take<const N: usize>(bytes: &[u8]) -> Result<[u8; N], DocAddrError> {
    bytes
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or(DocAddrError::Truncated)
}

/// A message: the HLC timestamp its author device gave it, and that device.
///
/// Ordering is the conversation order: by timestamp, then by device. The pair is unique because a
/// device's clock never repeats a timestamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    /// When the author device sent it.
    pub hlc: Hlc,
    /// The author device.
    pub device: DeviceId,
}

impl MessageId {
    /// The position of this message in conversation order, as stored in segment documents.
    pub fn key(&self) -> MessageKey {
        MessageKey {
            hlc: self.hlc,
            device_prefix: self.device.prefix_u64(),
        }
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({:?}, {:?})", self.hlc, self.device)
    }
}

/// The sort key of a message inside a segment document: its HLC and the first eight bytes of its
/// author device id, written as 32 hex digits so that string order is conversation order and
/// Automerge's `map_range` pages through history.
///
/// A device prefix rather than the whole id keeps keys short; a collision would need two devices
/// of one conversation whose ed25519 keys share 64 bits *and* the same timestamp, and a key whose
/// prefix does not match the actor that created it is ignored (see `model::segment`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MessageKey {
    /// The message timestamp.
    pub hlc: Hlc,
    /// First eight bytes of the author device id, big-endian.
    pub device_prefix: u64,
}

impl MessageKey {
    /// Length of the textual form.
    pub const TEXT_LEN: usize = 32;

    /// The smallest key: before every message.
    pub const MIN: MessageKey = MessageKey {
        hlc: Hlc::ZERO,
        device_prefix: 0,
    };

    /// The textual form used as an Automerge map key.
    pub fn encode(&self) -> String {
        format!("{:016x}{:016x}", self.hlc.as_u64(), self.device_prefix)
    }

    /// Parses [`MessageKey::encode`]'s output; anything else is `None`.
    pub fn decode(s: &str) -> Option<MessageKey> {
        if s.len() != Self::TEXT_LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let hlc = u64::from_str_radix(&s[..16], 16).ok()?;
        let device_prefix = u64::from_str_radix(&s[16..], 16).ok()?;
        Some(MessageKey {
            hlc: Hlc::from_u64(hlc),
            device_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let a = AccountId::from_bytes([0xab; 32]);
        assert_eq!(AccountId::parse_hex(&a.to_string()), Ok(a));
        assert_eq!(
            AccountId::parse_hex("abc"),
            Err(IdParseError::Length {
                len: 3,
                expected: 64
            })
        );
        let bad = "zz".repeat(32);
        assert_eq!(
            AccountId::parse_hex(&bad),
            Err(IdParseError::NotHex { byte: b'z' })
        );
    }

    #[test]
    fn doc_ids_differ_by_kind() {
        let c = ConversationId::from_bytes([1; 16]);
        let a = AccountId::from_bytes([1; 32]);
        let ids = [
            DocAddr::Meta(c).doc_id(),
            DocAddr::Segment(c, 0).doc_id(),
            DocAddr::Segment(c, 1).doc_id(),
            DocAddr::Account(a).doc_id(),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j]);
            }
        }
    }

    #[test]
    fn key_rejects_garbage() {
        assert_eq!(MessageKey::decode(""), None);
        assert_eq!(MessageKey::decode(&"g".repeat(32)), None);
        assert_eq!(MessageKey::decode(&"A".repeat(32)), None);
    }

    proptest! {
        #[test]
        fn key_order_is_message_order(h1: u64, d1: u64, h2: u64, d2: u64) {
            let k1 = MessageKey { hlc: Hlc::from_u64(h1), device_prefix: d1 };
            let k2 = MessageKey { hlc: Hlc::from_u64(h2), device_prefix: d2 };
            prop_assert_eq!(k1.cmp(&k2), k1.encode().cmp(&k2.encode()));
            prop_assert_eq!(MessageKey::decode(&k1.encode()), Some(k1));
        }
    }
}
