//! Why the relay refused a request, and the error code each reason travels with.

use crate::crypto::device_log::DeviceLogError;
use crate::crypto::envelope::EnvelopeId;
use crate::crypto::group::GroupError;
use crate::crypto::identity::IdentityError;
use crate::ids::{AccountId, DeviceId, DocId};
use crate::wire::frame::ErrorCode;
use crate::wire::message::Message;

/// A refused request. Its `Display` is the text of the `Error` message the device receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The connection is not authenticated yet.
    #[error(
        "{what} needs an authenticated connection: send Hello for an account whose device log \
         on this relay lists this device as current (LogAppend the log first if needed)"
    )]
    NotAuthenticated {
        /// The request refused.
        what: &'static str,
    },
    /// The account is not a member of the group (or the group does not exist).
    #[error("account {account} is not a member of group {group} on this relay")]
    NotMember {
        /// The connection's account.
        account: AccountId,
        /// The group.
        group: DocId,
    },
    /// The connection already authenticated as another account.
    #[error("this connection is authenticated as account {bound}; open another for {claimed}")]
    AccountMismatch {
        /// The account the connection is bound to.
        bound: AccountId,
        /// The account claimed now.
        claimed: AccountId,
    },
    /// Log entries are not numbered from `first_seq` on.
    #[error(
        "entry {index} claims position {found}, but first_seq {first_seq} puts it at {expected}"
    )]
    LogPosition {
        /// The request's first position.
        first_seq: u32,
        /// Index of the entry in the request.
        index: usize,
        /// Its position by `first_seq`.
        expected: u64,
        /// The position it claims.
        found: u32,
    },
    /// Entries for an account the relay does not know, not starting at genesis.
    #[error(
        "this relay holds no device log of account {account}; send the log from genesis \
         (first_seq 0)"
    )]
    UnknownAccount {
        /// The account.
        account: AccountId,
    },
    /// The connection created as many accounts as it may.
    #[error("this connection already created {max} accounts, the most allowed")]
    TooManyNewAccounts {
        /// The limit.
        max: u32,
    },
    /// The entries do not verify or do not extend the relay's log.
    #[error("device log of account {account} rejected: {source}")]
    Log {
        /// The account.
        account: AccountId,
        /// Why.
        #[source]
        source: DeviceLogError,
    },
    /// The update is signed by another device than the connection's.
    #[error("group update signed by device {signer}, but this connection is device {device}")]
    SignerNotConnection {
        /// The update's signer.
        signer: DeviceId,
        /// The connection's device.
        device: DeviceId,
    },
    /// The update names another account than the connection's.
    #[error("group update names signer account {signer_account}, but this connection is {account}")]
    SignerAccountMismatch {
        /// The update's signer account.
        signer_account: AccountId,
        /// The connection's account.
        account: AccountId,
    },
    /// The group update does not verify or does not follow the group's chain.
    #[error("group update rejected: {0}")]
    Group(#[source] GroupError),
    /// The envelope's author is not the connection's device, where it must be (a snapshot).
    #[error("envelope authored by device {author}, but this connection is device {device}")]
    AuthorMismatch {
        /// The header's author.
        author: DeviceId,
        /// The connection's device.
        device: DeviceId,
    },
    /// A forwarded envelope's author is a device no device log on this relay lists.
    #[error(
        "envelope authored by device {author}, which no device log on this relay lists; \
         send its account's log (LogAppend) first"
    )]
    UnknownAuthor {
        /// The header's author.
        author: DeviceId,
    },
    /// A forwarded envelope's author is revoked in every device log on this relay that lists
    /// it.
    #[error(
        "envelope authored by device {author}, which is revoked; this relay takes a revoked \
         device's envelopes from no one"
    )]
    AuthorRevoked {
        /// The header's author.
        author: DeviceId,
    },
    /// No account of a forwarded envelope's author is or was a member of the group.
    #[error(
        "envelope authored by device {author}, whose account is not and never was a member of \
         group {group} on this relay"
    )]
    AuthorNotMember {
        /// The header's author.
        author: DeviceId,
        /// The group the request named.
        group: DocId,
    },
    /// The envelope's signature does not verify under its author's key.
    #[error("envelope of document {doc} does not verify: {source}")]
    BadSignature {
        /// The header's document.
        doc: DocId,
        /// What failed; it names the author.
        #[source]
        source: IdentityError,
    },
    /// Ephemeral envelopes are not stored.
    #[error("ephemeral envelopes are not stored; send them as datagrams")]
    EphemeralAppend,
    /// Snapshots are not part of the envelope log.
    #[error("snapshot envelopes are not appended; send them with PutSnapshot")]
    SnapshotAppend,
    /// A `PutSnapshot` whose envelope is not of kind `Snapshot`.
    #[error("PutSnapshot needs an envelope of kind Snapshot")]
    NotASnapshot,
    /// A snapshot's header must name one sequence number: what it covers.
    #[error("a snapshot's first_seq ({first}) and last_seq ({last}) must both be what it covers")]
    SnapshotRange {
        /// The header's `first_seq`.
        first: u64,
        /// The header's `last_seq`.
        last: u64,
    },
    /// A snapshot of a document the relay holds no envelope of up to what it claims to cover.
    #[error(
        "a snapshot of document {doc} covering sequence number {covers}, but this relay's \
         last envelope of it is {last_seq}"
    )]
    SnapshotAhead {
        /// The document.
        doc: DocId,
        /// What the snapshot claims to cover.
        covers: u64,
        /// The document's last sequence number on this relay.
        last_seq: u64,
    },
    /// A snapshot of a document the relay does not know.
    #[error("no document {doc} on this relay to keep a snapshot of")]
    SnapshotOfUnknownDoc {
        /// The document.
        doc: DocId,
    },
    /// A snapshot over the size limit.
    #[error("a snapshot of {len} bytes; at most {max} are kept")]
    SnapshotTooLarge {
        /// Its encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The document belongs to another group.
    #[error("document {doc} belongs to group {group}, not {requested}")]
    DocInOtherGroup {
        /// The document.
        doc: DocId,
        /// Its group.
        group: DocId,
        /// The group the request named.
        requested: DocId,
    },
    /// The account's storage quota would be exceeded.
    #[error(
        "account {account} stores {used} bytes; {adding} more would exceed its quota of {quota}"
    )]
    QuotaExceeded {
        /// The account.
        account: AccountId,
        /// Bytes stored (and in flight).
        used: u64,
        /// Bytes of this envelope.
        adding: u64,
        /// The quota.
        quota: u64,
    },
    /// The connection sent requests faster than its rate.
    #[error("too many requests: at most {rate_per_s} a second (bursts of {burst}); retry later")]
    RateLimited {
        /// The sustained rate.
        rate_per_s: u64,
        /// The burst.
        burst: u64,
    },
    /// Too many appends of this connection wait for the disk.
    #[error(
        "{count} appends ({bytes} bytes) of this connection are waiting for the disk; retry later"
    )]
    AppendsInFlight {
        /// Appends waiting.
        count: usize,
        /// Their bytes.
        bytes: usize,
    },
    /// An append with this request id is still waiting for the disk.
    #[error("request id {req} is already in use by an append in flight")]
    RequestInFlight {
        /// The request id.
        req: u32,
    },
    /// The subscriptions would exceed the connection's limit.
    #[error(
        "{have} subscriptions plus {adding} new would exceed the limit of {max} per connection"
    )]
    TooManySubscriptions {
        /// Subscriptions held.
        have: usize,
        /// New ones asked for.
        adding: usize,
        /// The limit.
        max: usize,
    },
    /// The author stored a different envelope for the same changes.
    #[error(
        "equivocation: the author already stored envelope {existing} for these changes of \
         document {doc}"
    )]
    Equivocation {
        /// The document.
        doc: DocId,
        /// The stored envelope.
        existing: EnvelopeId,
    },
    /// The store failed.
    #[error("the relay could not store the envelope: {reason}")]
    StoreFailed {
        /// Why.
        reason: String,
    },
    /// Too many pairing offers are waiting.
    #[error("too many pairing offers are waiting (at most {max}); retry later")]
    TooManyOffers {
        /// The limit that was hit.
        max: usize,
    },
    /// Another connection offered this rendezvous.
    #[error("this pairing rendezvous is already offered by another device")]
    RendezvousTaken,
    /// No live offer for this rendezvous.
    #[error("no pairing offer for this rendezvous (never offered, expired or already answered)")]
    UnknownRendezvous,
    /// Another device already joined this rendezvous.
    #[error("another device already joined this pairing rendezvous")]
    RendezvousJoined,
    /// Only the inviter may answer.
    #[error("only the device that offered this pairing rendezvous may answer it")]
    NotInviter,
    /// No joiner yet.
    #[error("no device has joined this pairing rendezvous yet")]
    NoJoiner,
    /// The device sent a message only a relay sends.
    #[error("{what} is a relay-to-device message, not a request")]
    NotARequest {
        /// The message type.
        what: &'static str,
    },
}

impl RequestError {
    /// The error code the device receives.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::NotAuthenticated { .. }
            | RequestError::NotMember { .. }
            | RequestError::SignerNotConnection { .. }
            | RequestError::SignerAccountMismatch { .. }
            | RequestError::AuthorMismatch { .. }
            | RequestError::UnknownAuthor { .. }
            | RequestError::AuthorRevoked { .. }
            | RequestError::AuthorNotMember { .. }
            | RequestError::NotInviter => ErrorCode::UNAUTHORISED,
            RequestError::QuotaExceeded { .. } => ErrorCode::QUOTA_EXCEEDED,
            RequestError::RateLimited { .. }
            | RequestError::AppendsInFlight { .. }
            | RequestError::TooManyOffers { .. } => ErrorCode::RATE_LIMITED,
            RequestError::TooManySubscriptions { .. } | RequestError::SnapshotTooLarge { .. } => {
                ErrorCode::TOO_LARGE
            }
            RequestError::StoreFailed { .. } => ErrorCode::INTERNAL,
            RequestError::NotARequest { .. } => ErrorCode::MALFORMED,
            RequestError::AccountMismatch { .. }
            | RequestError::LogPosition { .. }
            | RequestError::UnknownAccount { .. }
            | RequestError::TooManyNewAccounts { .. }
            | RequestError::Log { .. }
            | RequestError::Group(_)
            | RequestError::BadSignature { .. }
            | RequestError::EphemeralAppend
            | RequestError::SnapshotAppend
            | RequestError::NotASnapshot
            | RequestError::SnapshotRange { .. }
            | RequestError::SnapshotAhead { .. }
            | RequestError::SnapshotOfUnknownDoc { .. }
            | RequestError::DocInOtherGroup { .. }
            | RequestError::RequestInFlight { .. }
            | RequestError::Equivocation { .. }
            | RequestError::RendezvousTaken
            | RequestError::UnknownRendezvous
            | RequestError::RendezvousJoined
            | RequestError::NoJoiner => ErrorCode::REJECTED,
        }
    }

    /// The `Error` message answering request `req`.
    pub fn to_message(&self, req: u32) -> Message {
        Message::Error {
            req,
            code: self.code(),
            text: self.to_string(),
        }
    }
}
