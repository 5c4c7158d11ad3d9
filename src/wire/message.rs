//! Protocol messages between a device and a relay (or another device), carried in frames of
//! type [`FrameType::Message`](crate::wire::frame::FrameType::Message).
//!
//! A message is a tag byte and the message's fields. Requests carry a request id (`req`, chosen
//! by the sender, never 0) that the answer repeats; messages the relay sends unasked (pushes)
//! carry `req = 0`. Every list has a named limit checked before anything is allocated, and
//! decoding never panics. Ephemeral signals (typing, presence) travel in QUIC datagrams, encoded
//! by [`encode_datagram`]. Byte layouts are in `docs/PROTOCOL.md`.
//!
//! ```
//! use roamsync::wire::message::Message;
//! use roamsync::ids::DocId;
//!
//! let msg = Message::Fetch { req: 7, doc: DocId::from_bytes([1; 32]), after_seq: 41, limit: 100 };
//! let bytes = msg.encode();
//! assert_eq!(Message::decode(&bytes).unwrap(), msg);
//! ```

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry, DeviceLogError, EntryHash};
use crate::crypto::envelope::{EnvelopeError, MAX_ENVELOPE_BYTES, SealedEnvelope};
use crate::crypto::group::{GroupError, GroupUpdate, MAX_GROUP_UPDATE_BYTES};
use crate::crypto::pairing::{PairRequest, PairResponse, PairingError};
use crate::ids::{AccountId, DeviceId, DocId};
use crate::wire::codec::{CodecError, Reader, Writer};
use crate::wire::frame::ErrorCode;

/// Largest encoded message: one largest group update or envelope, plus room for framing fields.
pub const MAX_MESSAGE_BYTES: usize = max(MAX_ENVELOPE_BYTES, MAX_GROUP_UPDATE_BYTES) + 64 * 1024;
/// Most subscriptions in one `Subscribe`.
pub const MAX_SUBSCRIPTIONS: usize = 32 * 1024;
/// Most envelopes in one `Envelopes` message.
pub const MAX_ENVELOPES_PER_MESSAGE: usize = 16 * 1024;
/// Most envelope bytes a sender packs into one `Envelopes` message (a single larger envelope is
/// sent alone).
pub const TARGET_ENVELOPES_BYTES: usize = 1024 * 1024;
/// Most groups listed in a `HelloOk`.
pub const MAX_GROUPS_PER_HELLO: usize = 64 * 1024;
/// Most updates in one `GroupUpdates` message.
pub const MAX_UPDATES_PER_MESSAGE: usize = 256;
/// Longest error text.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// Largest datagram payload a sender produces (fits a QUIC datagram on a 1,280-byte path MTU).
pub const MAX_DATAGRAM_BYTES: usize = 1150;
/// Length of a pairing rendezvous id.
pub const RENDEZVOUS_LEN: usize = 32;
/// Most documents in one `PeerSync`.
pub const MAX_SYNC_DOCS: usize = 4 * 1024;
/// Most devices in one document's version vector in a `PeerSync` (devices that ever wrote to
/// the document).
pub const MAX_VERSION_ENTRIES: usize = 1024;
/// Most version-vector bytes a sender packs into one `PeerSync` (more documents go in further
/// messages).
pub const TARGET_SYNC_BYTES: usize = 256 * 1024;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

const DATAGRAM_VERSION: u8 = 1;

/// Errors of message decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A field is malformed or truncated.
    #[error("message: {0}")]
    Codec(#[from] CodecError),
    /// The tag is unknown.
    #[error("unknown message tag {tag:#04x}")]
    UnknownTag {
        /// The tag found.
        tag: u8,
    },
    /// A list is longer than its limit.
    #[error("message {field}: {len} items, at most {max} allowed")]
    TooMany {
        /// Which list.
        field: &'static str,
        /// Its claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The whole message is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes, at most {max} allowed")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A request id of 0 (reserved for pushes).
    #[error("request id 0 in a request")]
    ZeroRequestId,
    /// An envelope field is malformed.
    #[error("envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    /// A device-log field is malformed.
    #[error("device log: {0}")]
    DeviceLog(#[from] DeviceLogError),
    /// A group update is malformed.
    #[error("group update: {0}")]
    Group(#[from] GroupError),
    /// A pairing field is malformed.
    #[error("pairing: {0}")]
    Pairing(#[from] PairingError),
    /// The datagram's version is not supported.
    #[error("unsupported datagram version {version}")]
    DatagramVersion {
        /// The version found.
        version: u8,
    },
}

/// One document a device subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The document.
    pub doc: DocId,
    /// The group it belongs to (the relay creates the document under it if it is new).
    pub group: DocId,
    /// The device's cursor: it holds every envelope of `doc` up to this relay sequence number.
    pub after_seq: u64,
    /// Whether the device would take a snapshot of `doc`: if the relay holds one made by a
    /// device of the connection's account that covers more than `after_seq`, the catch-up
    /// starts with it (a `Snapshot` message) and continues after the sequence number it covers.
    pub snapshot: bool,
}

/// Size of one encoded [`Subscription`]: doc, group, cursor, snapshot flag.
const SUBSCRIPTION_BYTES: usize = 32 + 32 + 8 + 1;

/// One stored envelope as the relay sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// The relay's sequence number for it.
    pub seq: u64,
    /// The sequence number of the document's previous envelope on this relay (0 if none). In
    /// a fetch answer the items are contiguous from the cursor asked for; in a push `prev` lets
    /// the device see whether it missed something.
    pub prev: u64,
    /// The encoded sealed envelope, decoded and checked by the device.
    pub envelope: Vec<u8>,
}

/// One document in a [`Message::PeerSync`]: what the asking device holds of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocVersion {
    /// The document.
    pub doc: DocId,
    /// Its version vector: for each device that wrote to it, the number of that device's
    /// changes held (changes of one device form a contiguous sequence from 1).
    pub held: Vec<(DeviceId, u64)>,
}

impl DocVersion {
    /// Encoded size: doc, count, entries.
    pub fn encoded_len(&self) -> usize {
        32 + 4 + self.held.len() * 40
    }
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Device → relay, first message: who the device is. The device itself is the TLS key.
    Hello {
        /// Request id.
        req: u32,
        /// The device's account.
        account: AccountId,
        /// Entries the device holds of its account's device log.
        log_len: u32,
        /// Hash of the last of them.
        log_head: EntryHash,
    },
    /// Device → relay: entries of an account's device log, from `first_seq` (creates the
    /// account when it starts at genesis).
    LogAppend {
        /// Request id.
        req: u32,
        /// The account.
        account: AccountId,
        /// Position of the first entry.
        first_seq: u32,
        /// The entries, in order.
        entries: Vec<DeviceLogEntry>,
    },
    /// Device → relay: an account's device log from `from_seq`.
    FetchLog {
        /// Request id.
        req: u32,
        /// The account.
        account: AccountId,
        /// First entry wanted.
        from_seq: u32,
    },
    /// Device → relay: a signed group update (creation or membership change).
    PostGroup {
        /// Request id.
        req: u32,
        /// The update.
        update: GroupUpdate,
    },
    /// Device → relay: a group's updates from `from_version`.
    FetchGroup {
        /// Request id.
        req: u32,
        /// The group.
        group: DocId,
        /// First version wanted.
        from_version: u32,
    },
    /// Device → relay: push new envelopes of these documents, after sending what is stored
    /// past each cursor.
    Subscribe {
        /// Request id.
        req: u32,
        /// The documents.
        items: Vec<Subscription>,
    },
    /// Device → relay: store an envelope; answered by `Ack` once durable.
    Append {
        /// Request id.
        req: u32,
        /// The document's group (the relay creates the document under it if it is new).
        group: DocId,
        /// The envelope.
        envelope: SealedEnvelope,
    },
    /// Device → relay: stored envelopes of `doc` after `after_seq`.
    Fetch {
        /// Request id.
        req: u32,
        /// The document.
        doc: DocId,
        /// The cursor.
        after_seq: u64,
        /// Most envelopes wanted.
        limit: u32,
    },
    /// Device → relay: keep this snapshot of a document for the devices of this connection's
    /// account. The envelope is of kind `Snapshot`, and its header's `first_seq == last_seq` is
    /// the relay sequence number up to which it holds every envelope of the document on this
    /// relay (`covers`). Answered by `Done` once durable.
    PutSnapshot {
        /// Request id.
        req: u32,
        /// The document's group.
        group: DocId,
        /// The sealed snapshot.
        envelope: SealedEnvelope,
    },
    /// Inviting device → relay: forward pairing requests for this rendezvous to me.
    PairOffer {
        /// Request id.
        req: u32,
        /// Derived from the pairing code by both sides.
        rendezvous: [u8; RENDEZVOUS_LEN],
    },
    /// Joining device → relay: forward this request to the inviter of `rendezvous`.
    PairJoin {
        /// Request id.
        req: u32,
        /// The rendezvous.
        rendezvous: [u8; RENDEZVOUS_LEN],
        /// The request.
        request: PairRequest,
    },
    /// Inviting device → relay: forward this response to the joiner of `rendezvous`.
    PairAnswer {
        /// Request id.
        req: u32,
        /// The rendezvous.
        rendezvous: [u8; RENDEZVOUS_LEN],
        /// The response.
        response: PairResponse,
    },
    /// Device → device, first message on a direct connection, both ways: who the sender is.
    /// The sender's device is the TLS key; `entries` are its account's whole device log, which
    /// the other side verifies and checks the device is current in.
    PeerHello {
        /// The sender's account.
        account: AccountId,
        /// The account's device log from genesis.
        entries: Vec<DeviceLogEntry>,
    },
    /// Device → device: what the sender holds of these documents. The other side answers with
    /// `Envelopes` (and, to a device of its own account, `Snapshot`s) carrying what the sender
    /// lacks of the documents it shares with it, then `Done`; documents it does not share are
    /// left out of the answer.
    PeerSync {
        /// Request id.
        req: u32,
        /// The documents.
        docs: Vec<DocVersion>,
    },
    /// Relay → device: answer to `Hello`.
    HelloOk {
        /// Request id.
        req: u32,
        /// Entries the relay holds of the account's log.
        log_len: u32,
        /// Hash of the relay's last entry (all zero if it has none).
        log_head: EntryHash,
        /// Groups the account is a member of, with their latest version.
        groups: Vec<(DocId, u32)>,
    },
    /// Relay → device: the request is complete.
    Done {
        /// Request id.
        req: u32,
    },
    /// Relay → device: an append is durable.
    Ack {
        /// Request id.
        req: u32,
        /// The document.
        doc: DocId,
        /// The envelope's relay sequence number.
        seq: u64,
        /// The document's previous sequence number on this relay (as in a push), so the author
        /// can count its own envelope into its cursor; 0 for a duplicate.
        prev: u64,
        /// Whether the relay already held it.
        duplicate: bool,
    },
    /// Relay → device: stored envelopes of one document (a fetch answer, or a push with req 0).
    Envelopes {
        /// Request id, or 0 for a push.
        req: u32,
        /// The document.
        doc: DocId,
        /// The envelopes, in sequence order.
        items: Vec<StoredEnvelope>,
        /// Whether more are stored after the last one.
        more: bool,
    },
    /// Relay → device: in a subscription's catch-up, the snapshot a device of the connection's
    /// account made of `doc`, sent before the document's envelopes after the sequence number it
    /// covers (its header's `first_seq`).
    Snapshot {
        /// The subscription's request id.
        req: u32,
        /// The document.
        doc: DocId,
        /// The encoded sealed snapshot, decoded and checked by the device.
        envelope: Vec<u8>,
    },
    /// Relay → device: entries of a device log (an answer, or a push with req 0).
    LogEntries {
        /// Request id, or 0 for a push.
        req: u32,
        /// The account.
        account: AccountId,
        /// Position of the first entry.
        first_seq: u32,
        /// The entries.
        entries: Vec<DeviceLogEntry>,
    },
    /// Relay → device: updates of a group (an answer, or a push with req 0).
    GroupUpdates {
        /// Request id, or 0 for a push.
        req: u32,
        /// The group.
        group: DocId,
        /// The updates, in version order.
        updates: Vec<GroupUpdate>,
    },
    /// Relay → inviting device: a joiner's request.
    PairRequested {
        /// The rendezvous.
        rendezvous: [u8; RENDEZVOUS_LEN],
        /// The request.
        request: PairRequest,
    },
    /// Relay → joining device: the inviter's response.
    PairAnswered {
        /// The rendezvous.
        rendezvous: [u8; RENDEZVOUS_LEN],
        /// The response.
        response: PairResponse,
    },
    /// Either way: a request failed (req 0: the connection as a whole).
    Error {
        /// Request id, or 0.
        req: u32,
        /// What went wrong.
        code: ErrorCode,
        /// Detail for logs.
        text: String,
    },
}

mod tag {
    pub const HELLO: u8 = 0x10;
    pub const LOG_APPEND: u8 = 0x11;
    pub const FETCH_LOG: u8 = 0x12;
    pub const POST_GROUP: u8 = 0x13;
    pub const FETCH_GROUP: u8 = 0x14;
    pub const SUBSCRIBE: u8 = 0x15;
    pub const APPEND: u8 = 0x16;
    pub const FETCH: u8 = 0x17;
    pub const PAIR_OFFER: u8 = 0x18;
    pub const PAIR_JOIN: u8 = 0x19;
    pub const PAIR_ANSWER: u8 = 0x1a;
    pub const PUT_SNAPSHOT: u8 = 0x1b;
    pub const PEER_SYNC: u8 = 0x1c;
    pub const PEER_HELLO: u8 = 0x1d;
    pub const HELLO_OK: u8 = 0x30;
    pub const DONE: u8 = 0x31;
    pub const ACK: u8 = 0x32;
    pub const ENVELOPES: u8 = 0x33;
    pub const LOG_ENTRIES: u8 = 0x34;
    pub const GROUP_UPDATES: u8 = 0x35;
    pub const PAIR_REQUESTED: u8 = 0x36;
    pub const PAIR_ANSWERED: u8 = 0x37;
    pub const ERROR: u8 = 0x38;
    pub const SNAPSHOT: u8 = 0x39;
}

fn count(r: &mut Reader<'_>, field: &'static str, max: usize) -> Result<usize, MessageError> {
    let len = r.u32()? as usize;
    if len > max {
        return Err(MessageError::TooMany { field, len, max });
    }
    Ok(len)
}

fn request_id(r: &mut Reader<'_>) -> Result<u32, MessageError> {
    match r.u32()? {
        0 => Err(MessageError::ZeroRequestId),
        req => Ok(req),
    }
}

// List lengths are bounded by the limits above, far below u32::MAX; `as u32` cannot truncate
// for anything that decodes.
fn put_len(w: &mut Writer, len: usize) {
    w.u32(u32::try_from(len).unwrap_or(u32::MAX));
}

impl Message {
    /// The request id this message carries (0 for pushes).
    pub fn req(&self) -> u32 {
        match self {
            Message::Hello { req, .. }
            | Message::LogAppend { req, .. }
            | Message::FetchLog { req, .. }
            | Message::PostGroup { req, .. }
            | Message::FetchGroup { req, .. }
            | Message::Subscribe { req, .. }
            | Message::Append { req, .. }
            | Message::Fetch { req, .. }
            | Message::PairOffer { req, .. }
            | Message::PairJoin { req, .. }
            | Message::PairAnswer { req, .. }
            | Message::PutSnapshot { req, .. }
            | Message::PeerSync { req, .. }
            | Message::Snapshot { req, .. }
            | Message::HelloOk { req, .. }
            | Message::Done { req }
            | Message::Ack { req, .. }
            | Message::Envelopes { req, .. }
            | Message::LogEntries { req, .. }
            | Message::GroupUpdates { req, .. }
            | Message::Error { req, .. } => *req,
            Message::PairRequested { .. }
            | Message::PairAnswered { .. }
            | Message::PeerHello { .. } => 0,
        }
    }

    /// Encodes the message (tag, then fields).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.size_hint());
        match self {
            Message::Hello {
                req,
                account,
                log_len,
                log_head,
            } => {
                w.u8(tag::HELLO)
                    .u32(*req)
                    .put(account.as_bytes())
                    .u32(*log_len)
                    .put(&log_head.0);
            }
            Message::LogAppend {
                req,
                account,
                first_seq,
                entries,
            } => {
                w.u8(tag::LOG_APPEND)
                    .u32(*req)
                    .put(account.as_bytes())
                    .u32(*first_seq)
                    .put(&DeviceLog::encode_entries(entries));
            }
            Message::FetchLog {
                req,
                account,
                from_seq,
            } => {
                w.u8(tag::FETCH_LOG)
                    .u32(*req)
                    .put(account.as_bytes())
                    .u32(*from_seq);
            }
            Message::PostGroup { req, update } => {
                w.u8(tag::POST_GROUP).u32(*req).bytes_u32(&update.encode());
            }
            Message::FetchGroup {
                req,
                group,
                from_version,
            } => {
                w.u8(tag::FETCH_GROUP)
                    .u32(*req)
                    .put(group.as_bytes())
                    .u32(*from_version);
            }
            Message::Subscribe { req, items } => {
                w.u8(tag::SUBSCRIBE).u32(*req);
                put_len(&mut w, items.len());
                for s in items {
                    w.put(s.doc.as_bytes())
                        .put(s.group.as_bytes())
                        .u64(s.after_seq)
                        .u8(u8::from(s.snapshot));
                }
            }
            Message::Append {
                req,
                group,
                envelope,
            } => {
                w.u8(tag::APPEND)
                    .u32(*req)
                    .put(group.as_bytes())
                    .bytes_u32(&envelope.encode());
            }
            Message::Fetch {
                req,
                doc,
                after_seq,
                limit,
            } => {
                w.u8(tag::FETCH)
                    .u32(*req)
                    .put(doc.as_bytes())
                    .u64(*after_seq)
                    .u32(*limit);
            }
            Message::PutSnapshot {
                req,
                group,
                envelope,
            } => {
                w.u8(tag::PUT_SNAPSHOT)
                    .u32(*req)
                    .put(group.as_bytes())
                    .bytes_u32(&envelope.encode());
            }
            Message::Snapshot { req, doc, envelope } => {
                w.u8(tag::SNAPSHOT)
                    .u32(*req)
                    .put(doc.as_bytes())
                    .bytes_u32(envelope);
            }
            Message::PairOffer { req, rendezvous } => {
                w.u8(tag::PAIR_OFFER).u32(*req).put(rendezvous);
            }
            Message::PairJoin {
                req,
                rendezvous,
                request,
            } => {
                w.u8(tag::PAIR_JOIN)
                    .u32(*req)
                    .put(rendezvous)
                    .bytes_u32(&request.encode());
            }
            Message::PairAnswer {
                req,
                rendezvous,
                response,
            } => {
                w.u8(tag::PAIR_ANSWER)
                    .u32(*req)
                    .put(rendezvous)
                    .bytes_u32(&response.encode());
            }
            Message::PeerHello { account, entries } => {
                w.u8(tag::PEER_HELLO)
                    .put(account.as_bytes())
                    .put(&DeviceLog::encode_entries(entries));
            }
            Message::PeerSync { req, docs } => {
                w.u8(tag::PEER_SYNC).u32(*req);
                put_len(&mut w, docs.len());
                for d in docs {
                    w.put(d.doc.as_bytes());
                    put_len(&mut w, d.held.len());
                    for (device, n) in &d.held {
                        w.put(device.as_bytes()).u64(*n);
                    }
                }
            }
            Message::HelloOk {
                req,
                log_len,
                log_head,
                groups,
            } => {
                w.u8(tag::HELLO_OK).u32(*req).u32(*log_len).put(&log_head.0);
                put_len(&mut w, groups.len());
                for (g, v) in groups {
                    w.put(g.as_bytes()).u32(*v);
                }
            }
            Message::Done { req } => {
                w.u8(tag::DONE).u32(*req);
            }
            Message::Ack {
                req,
                doc,
                seq,
                prev,
                duplicate,
            } => {
                w.u8(tag::ACK)
                    .u32(*req)
                    .put(doc.as_bytes())
                    .u64(*seq)
                    .u64(*prev)
                    .u8(u8::from(*duplicate));
            }
            Message::Envelopes {
                req,
                doc,
                items,
                more,
            } => {
                w.u8(tag::ENVELOPES)
                    .u32(*req)
                    .put(doc.as_bytes())
                    .u8(u8::from(*more));
                put_len(&mut w, items.len());
                for it in items {
                    w.u64(it.seq).u64(it.prev).bytes_u32(&it.envelope);
                }
            }
            Message::LogEntries {
                req,
                account,
                first_seq,
                entries,
            } => {
                w.u8(tag::LOG_ENTRIES)
                    .u32(*req)
                    .put(account.as_bytes())
                    .u32(*first_seq)
                    .put(&DeviceLog::encode_entries(entries));
            }
            Message::GroupUpdates {
                req,
                group,
                updates,
            } => {
                w.u8(tag::GROUP_UPDATES).u32(*req).put(group.as_bytes());
                put_len(&mut w, updates.len());
                for u in updates {
                    w.bytes_u32(&u.encode());
                }
            }
            Message::PairRequested {
                rendezvous,
                request,
            } => {
                w.u8(tag::PAIR_REQUESTED)
                    .put(rendezvous)
                    .bytes_u32(&request.encode());
            }
            Message::PairAnswered {
                rendezvous,
                response,
            } => {
                w.u8(tag::PAIR_ANSWERED)
                    .put(rendezvous)
                    .bytes_u32(&response.encode());
            }
            Message::Error { req, code, text } => {
                let mut end = text.len().min(MAX_ERROR_TEXT_BYTES);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                w.u8(tag::ERROR).u32(*req).u16(code.0);
                w.bytes_u32(&text.as_bytes()[..end]);
            }
        }
        w.into_bytes()
    }

    fn size_hint(&self) -> usize {
        match self {
            Message::Append { envelope, .. } | Message::PutSnapshot { envelope, .. } => {
                128 + envelope.ciphertext.len()
            }
            Message::Snapshot { envelope, .. } => 64 + envelope.len(),
            Message::Envelopes { items, .. } => {
                64 + items.iter().map(|i| 20 + i.envelope.len()).sum::<usize>()
            }
            Message::Subscribe { items, .. } => 16 + items.len() * SUBSCRIPTION_BYTES,
            Message::PeerSync { docs, .. } => {
                16 + docs.iter().map(DocVersion::encoded_len).sum::<usize>()
            }
            _ => 256,
        }
    }

    /// Decodes one message; the whole of `bytes` must be used.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let msg = match r.u8()? {
            tag::HELLO => Message::Hello {
                req: request_id(&mut r)?,
                account: AccountId::from_bytes(r.array()?),
                log_len: r.u32()?,
                log_head: EntryHash(r.array()?),
            },
            tag::LOG_APPEND => Message::LogAppend {
                req: request_id(&mut r)?,
                account: AccountId::from_bytes(r.array()?),
                first_seq: r.u32()?,
                entries: DeviceLog::decode_entries(r.take(r.remaining())?)?,
            },
            tag::FETCH_LOG => Message::FetchLog {
                req: request_id(&mut r)?,
                account: AccountId::from_bytes(r.array()?),
                from_seq: r.u32()?,
            },
            tag::POST_GROUP => Message::PostGroup {
                req: request_id(&mut r)?,
                update: GroupUpdate::decode(r.bytes_u32("update", MAX_GROUP_UPDATE_BYTES)?)?,
            },
            tag::FETCH_GROUP => Message::FetchGroup {
                req: request_id(&mut r)?,
                group: DocId::from_bytes(r.array()?),
                from_version: r.u32()?,
            },
            tag::SUBSCRIBE => {
                let req = request_id(&mut r)?;
                let n = count(&mut r, "subscriptions", MAX_SUBSCRIPTIONS)?;
                let mut items = Vec::with_capacity(n.min(r.remaining() / SUBSCRIPTION_BYTES));
                for _ in 0..n {
                    items.push(Subscription {
                        doc: DocId::from_bytes(r.array()?),
                        group: DocId::from_bytes(r.array()?),
                        after_seq: r.u64()?,
                        snapshot: r.flag("snapshot")?,
                    });
                }
                Message::Subscribe { req, items }
            }
            tag::APPEND => Message::Append {
                req: request_id(&mut r)?,
                group: DocId::from_bytes(r.array()?),
                envelope: SealedEnvelope::decode(r.bytes_u32("envelope", MAX_ENVELOPE_BYTES)?)?,
            },
            tag::FETCH => Message::Fetch {
                req: request_id(&mut r)?,
                doc: DocId::from_bytes(r.array()?),
                after_seq: r.u64()?,
                limit: r.u32()?,
            },
            tag::PUT_SNAPSHOT => Message::PutSnapshot {
                req: request_id(&mut r)?,
                group: DocId::from_bytes(r.array()?),
                envelope: SealedEnvelope::decode(r.bytes_u32("envelope", MAX_ENVELOPE_BYTES)?)?,
            },
            tag::SNAPSHOT => Message::Snapshot {
                req: request_id(&mut r)?,
                doc: DocId::from_bytes(r.array()?),
                envelope: r.bytes_u32("envelope", MAX_ENVELOPE_BYTES)?.to_vec(),
            },
            tag::PAIR_OFFER => Message::PairOffer {
                req: request_id(&mut r)?,
                rendezvous: r.array()?,
            },
            tag::PAIR_JOIN => Message::PairJoin {
                req: request_id(&mut r)?,
                rendezvous: r.array()?,
                request: PairRequest::decode(r.bytes_u32("request", MAX_MESSAGE_BYTES)?)?,
            },
            tag::PAIR_ANSWER => Message::PairAnswer {
                req: request_id(&mut r)?,
                rendezvous: r.array()?,
                response: PairResponse::decode(r.bytes_u32("response", MAX_MESSAGE_BYTES)?)?,
            },
            tag::PEER_HELLO => Message::PeerHello {
                account: AccountId::from_bytes(r.array()?),
                entries: DeviceLog::decode_entries(r.take(r.remaining())?)?,
            },
            tag::PEER_SYNC => {
                let req = request_id(&mut r)?;
                let n = count(&mut r, "documents", MAX_SYNC_DOCS)?;
                let mut docs = Vec::with_capacity(n.min(r.remaining() / 36));
                for _ in 0..n {
                    let doc = DocId::from_bytes(r.array()?);
                    let m = count(&mut r, "version entries", MAX_VERSION_ENTRIES)?;
                    let mut held = Vec::with_capacity(m.min(r.remaining() / 40));
                    for _ in 0..m {
                        held.push((DeviceId::from_bytes(r.array()?), r.u64()?));
                    }
                    docs.push(DocVersion { doc, held });
                }
                Message::PeerSync { req, docs }
            }
            tag::HELLO_OK => {
                let req = request_id(&mut r)?;
                let log_len = r.u32()?;
                let log_head = EntryHash(r.array()?);
                let n = count(&mut r, "groups", MAX_GROUPS_PER_HELLO)?;
                let mut groups = Vec::with_capacity(n.min(r.remaining() / 36));
                for _ in 0..n {
                    groups.push((DocId::from_bytes(r.array()?), r.u32()?));
                }
                Message::HelloOk {
                    req,
                    log_len,
                    log_head,
                    groups,
                }
            }
            tag::DONE => Message::Done {
                req: request_id(&mut r)?,
            },
            tag::ACK => Message::Ack {
                req: request_id(&mut r)?,
                doc: DocId::from_bytes(r.array()?),
                seq: r.u64()?,
                prev: r.u64()?,
                duplicate: r.flag("duplicate")?,
            },
            tag::ENVELOPES => {
                let req = r.u32()?;
                let doc = DocId::from_bytes(r.array()?);
                let more = r.flag("more")?;
                let n = count(&mut r, "envelopes", MAX_ENVELOPES_PER_MESSAGE)?;
                let mut items = Vec::with_capacity(n.min(r.remaining() / 20));
                for _ in 0..n {
                    items.push(StoredEnvelope {
                        seq: r.u64()?,
                        prev: r.u64()?,
                        envelope: r.bytes_u32("envelope", MAX_ENVELOPE_BYTES)?.to_vec(),
                    });
                }
                Message::Envelopes {
                    req,
                    doc,
                    items,
                    more,
                }
            }
            tag::LOG_ENTRIES => Message::LogEntries {
                req: r.u32()?,
                account: AccountId::from_bytes(r.array()?),
                first_seq: r.u32()?,
                entries: DeviceLog::decode_entries(r.take(r.remaining())?)?,
            },
            tag::GROUP_UPDATES => {
                let req = r.u32()?;
                let group = DocId::from_bytes(r.array()?);
                let n = count(&mut r, "updates", MAX_UPDATES_PER_MESSAGE)?;
                let mut updates = Vec::with_capacity(n.min(16));
                for _ in 0..n {
                    updates.push(GroupUpdate::decode(
                        r.bytes_u32("update", MAX_GROUP_UPDATE_BYTES)?,
                    )?);
                }
                Message::GroupUpdates {
                    req,
                    group,
                    updates,
                }
            }
            tag::PAIR_REQUESTED => Message::PairRequested {
                rendezvous: r.array()?,
                request: PairRequest::decode(r.bytes_u32("request", MAX_MESSAGE_BYTES)?)?,
            },
            tag::PAIR_ANSWERED => Message::PairAnswered {
                rendezvous: r.array()?,
                response: PairResponse::decode(r.bytes_u32("response", MAX_MESSAGE_BYTES)?)?,
            },
            tag::ERROR => {
                let req = r.u32()?;
                let code = ErrorCode(r.u16()?);
                let text = std::str::from_utf8(r.bytes_u32("text", MAX_ERROR_TEXT_BYTES)?)
                    .map_err(|_| CodecError::InvalidUtf8 { field: "text" })?
                    .to_owned();
                Message::Error { req, code, text }
            }
            tag => return Err(MessageError::UnknownTag { tag }),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Encodes an ephemeral signal for a QUIC datagram: version, the group whose members receive
/// it, and an envelope of kind `Ephemeral`.
pub fn encode_datagram(group: &DocId, envelope: &SealedEnvelope) -> Vec<u8> {
    let mut w = Writer::with_capacity(64 + envelope.ciphertext.len() + 300);
    w.u8(DATAGRAM_VERSION)
        .put(group.as_bytes())
        .put(&envelope.encode());
    w.into_bytes()
}

/// Decodes [`encode_datagram`]'s output.
pub fn decode_datagram(bytes: &[u8]) -> Result<(DocId, SealedEnvelope), MessageError> {
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != DATAGRAM_VERSION {
        return Err(MessageError::DatagramVersion { version });
    }
    let group = DocId::from_bytes(r.array()?);
    let envelope = SealedEnvelope::decode(r.take(r.remaining())?)?;
    Ok((group, envelope))
}

#[cfg(test)]
mod tests;
