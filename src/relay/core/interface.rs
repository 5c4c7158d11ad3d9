//! The core's interface: the inputs the shell feeds in and the outputs it executes.

use crate::crypto::envelope::EnvelopeId;
use crate::ids::{AccountId, DeviceId, DocId};
use crate::relay::store::{NewEnvelope, NewSnapshot};
use crate::wire::frame::ErrorCode;
use crate::wire::message::Message;

/// A connection, numbered by the shell. Numbers are never reused while the relay runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What the store did with an [`Output::Append`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreOutcome {
    /// Durable under this sequence number.
    Stored {
        /// The relay sequence number.
        seq: u64,
    },
    /// The same envelope was already stored under this sequence number.
    Duplicate {
        /// The stored copy's sequence number.
        seq: u64,
    },
    /// The author already stored a different envelope for the same changes: equivocation.
    Conflict {
        /// The stored envelope's id.
        existing: EnvelopeId,
    },
    /// The write failed; nothing was stored.
    Failed {
        /// Why, for the device and the logs.
        reason: String,
    },
}

/// An event the shell feeds in.
// Messages are by far the most common input and are moved once; boxing them would cost an
// allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// A connection completed its handshake; `device` is its TLS key.
    Connected {
        /// The connection.
        conn: ConnId,
        /// The device the handshake authenticated.
        device: DeviceId,
    },
    /// A message arrived on a connection.
    Message {
        /// The connection.
        conn: ConnId,
        /// The decoded message.
        msg: Message,
    },
    /// A datagram arrived on a connection (not decoded yet).
    Datagram {
        /// The connection.
        conn: ConnId,
        /// The datagram's bytes.
        bytes: Vec<u8>,
    },
    /// A connection is gone.
    Disconnected {
        /// The connection.
        conn: ConnId,
    },
    /// The store finished an [`Output::Append`].
    EnvelopeStored {
        /// The appending connection (it may be gone by now).
        conn: ConnId,
        /// The append's request id.
        req: u32,
        /// The document.
        doc: DocId,
        /// What the store did.
        outcome: StoreOutcome,
    },
}

/// A durable write the shell performs before the outputs that depend on it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PersistOp {
    /// Append entries to an account's device log (creating the account at `first_seq = 0`).
    AppendLog {
        /// The account.
        account: AccountId,
        /// Position of the first entry.
        first_seq: u32,
        /// The encoded entries.
        entries: Vec<Vec<u8>>,
    },
    /// Store a group's next update.
    PutGroupUpdate {
        /// The group.
        group: DocId,
        /// The update's version.
        version: u32,
        /// The encoded update.
        update: Vec<u8>,
    },
    /// Create documents, each under its group.
    CreateDocs {
        /// `(doc, group)` pairs.
        docs: Vec<(DocId, DocId)>,
    },
    /// Keep a document's snapshot for an account, unless one covering as much or more is
    /// stored.
    PutSnapshot {
        /// The snapshot.
        snapshot: NewSnapshot,
    },
}

/// One document of a subscription's catch-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUpItem {
    /// The document.
    pub doc: DocId,
    /// The device's cursor.
    pub after_seq: u64,
    /// If set, the device would take a snapshot: when the store holds one of `doc` for this
    /// account covering more than `after_seq`, send it first (`Snapshot { req, .. }`) and the
    /// envelopes after what it covers.
    pub snapshot_for: Option<AccountId>,
}

/// Something for the shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Send an answer on the connection. Never dropped (a connection that cannot take its
    /// answers is closed).
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: Message,
    },
    /// Send a push on the connection. A connection too slow to take its pushes (its push
    /// queue is full) is closed at once with `ErrorCode::LAGGED` instead: a dropped push that
    /// nothing follows would leave the device behind without a gap to notice. The device
    /// reconnects and catches up from its cursors.
    Push {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: Message,
    },
    /// Send a datagram on the connection (best effort).
    SendDatagram {
        /// The connection.
        conn: ConnId,
        /// The datagram.
        bytes: Vec<u8>,
    },
    /// Close the connection after the messages queued before this.
    Close {
        /// The connection.
        conn: ConnId,
        /// Why, as an error code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Queue an envelope for the group-commit writer; feed the result back as
    /// [`Input::EnvelopeStored`] with this `conn`, `req` and the envelope's document.
    Append {
        /// The appending connection.
        conn: ConnId,
        /// The request id.
        req: u32,
        /// The envelope.
        envelope: NewEnvelope,
    },
    /// For each item, the account's snapshot if it asks for one and one covers more than the
    /// cursor (see [`CatchUpItem`]); then everything stored after the cursor (or after what
    /// the snapshot covers) as `Envelopes { req, .. }` messages of at most
    /// [`TARGET_ENVELOPES_BYTES`](crate::wire::message::TARGET_ENVELOPES_BYTES) of envelopes
    /// (a larger single envelope goes alone), `more` telling whether more of that document
    /// follow in this catch-up; then `Done { req }`.
    CatchUp {
        /// The connection.
        conn: ConnId,
        /// The request id.
        req: u32,
        /// The documents, each once.
        items: Vec<CatchUpItem>,
    },
    /// Answer with one `Envelopes { req, .. }` message: at most `limit` envelopes of `doc` after
    /// `after_seq`, and at most `TARGET_ENVELOPES_BYTES` of them (a larger single envelope is
    /// sent alone), `more` telling whether more are stored.
    Fetch {
        /// The connection.
        conn: ConnId,
        /// The request id.
        req: u32,
        /// The document.
        doc: DocId,
        /// The cursor.
        after_seq: u64,
        /// Most envelopes (already capped by the core).
        limit: u32,
    },
    /// Make `op` durable (after the store writes emitted before it), then execute `then`.
    Persist {
        /// The write.
        op: PersistOp,
        /// What depends on it: sends, pushes, closes and reads, never store writes (so executing
        /// them late cannot reorder writes).
        then: Vec<Output>,
    },
    /// Something worth logging.
    Event(RelayEvent),
}

/// Why a connection is not authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthRefusal {
    /// The relay holds no log for the account.
    UnknownAccount,
    /// The account's log does not name the device.
    NotInLog,
    /// The account's log revoked the device.
    Revoked,
}

/// Things that happened, for the shell's logs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// A connection became authenticated as a current device of an account.
    Authenticated {
        /// The connection.
        conn: ConnId,
        /// Its device.
        device: DeviceId,
        /// The account.
        account: AccountId,
    },
    /// A `Hello` did not authenticate the connection.
    AuthRefused {
        /// The connection.
        conn: ConnId,
        /// Its device.
        device: DeviceId,
        /// The account it claimed.
        account: AccountId,
        /// Why.
        reason: AuthRefusal,
    },
    /// A new account's log was accepted.
    AccountCreated {
        /// The account.
        account: AccountId,
    },
    /// A device was revoked; its connections were closed.
    DeviceRevoked {
        /// The account.
        account: AccountId,
        /// The device.
        device: DeviceId,
        /// How many connections were closed.
        closed: usize,
    },
    /// A group was created or changed.
    GroupUpdated {
        /// The group.
        group: DocId,
        /// Its new version.
        version: u32,
    },
}
