//! Errors of the data model.

use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId};
use crate::model::hlc::HlcError;

/// Everything the data model can refuse, each with the context to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// No conversation with this id is known to this replica.
    #[error("unknown conversation {0}")]
    UnknownConversation(ConversationId),
    /// The conversation has no message with this id.
    #[error("conversation {conversation} has no message {message:?}")]
    UnknownMessage {
        /// The conversation searched.
        conversation: ConversationId,
        /// The missing message.
        message: MessageId,
    },
    /// Only the author account may edit or recall a message.
    #[error("message {message:?} was written by account {author}, not by {caller}")]
    NotAuthor {
        /// The message.
        message: MessageId,
        /// Its author account.
        author: AccountId,
        /// The account that tried.
        caller: AccountId,
    },
    /// The message was recalled: it can no longer be edited or reacted to.
    #[error("message {0:?} was recalled")]
    Recalled(MessageId),
    /// This account is not a member of the conversation.
    #[error("account {account} is not a member of conversation {conversation}")]
    NotMember {
        /// The conversation.
        conversation: ConversationId,
        /// The account.
        account: AccountId,
    },
    /// A conversation with this id already exists.
    #[error("conversation {0} already exists")]
    ConversationExists(ConversationId),
    /// A text field is longer than its limit.
    #[error("{field} is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field that must not be empty is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A configuration value is out of range.
    #[error("{field} = {value} is outside {min}..={max}")]
    BadConfig {
        /// Which setting.
        field: &'static str,
        /// The value given.
        value: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The clock refused a timestamp.
    #[error(transparent)]
    Clock(#[from] HlcError),
    /// A batch for another account's private document.
    #[error("account document of {got} offered to a replica of account {expected}")]
    ForeignAccount {
        /// This replica's account.
        expected: AccountId,
        /// The batch's account.
        got: AccountId,
    },
    /// A change whose Automerge actor is not a 32-byte device id.
    #[error("change actor is {len} bytes, a device actor is 32")]
    BadActor {
        /// The actor's length.
        len: usize,
    },
    /// A device sent two different changes with the same sequence number.
    #[error("device {device:?} reused sequence number {seq} in {doc:?}")]
    Equivocation {
        /// The document.
        doc: DocAddr,
        /// The device.
        device: DeviceId,
        /// The reused sequence number.
        seq: u64,
    },
    /// A remote change does not fit the shape of roamsync's documents (see `model::validate`).
    #[error("change {seq} for {doc:?} refused: {reason}")]
    MalformedChange {
        /// The document.
        doc: DocAddr,
        /// The change's sequence number.
        seq: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Too many remote changes are waiting for their dependencies.
    #[error("more than {max} changes wait for dependencies in {doc:?}")]
    PendingOverflow {
        /// The document.
        doc: DocAddr,
        /// The limit.
        max: usize,
    },
    /// An encoded batch is malformed.
    #[error(transparent)]
    Batch(#[from] crate::model::batch::BatchError),
    /// The operation needs a document that is stored but not loaded; load it and retry. Nothing
    /// was changed.
    #[error("{0:?} is not loaded")]
    NotLoaded(DocAddr),
    /// A document cannot be dropped from memory: it has changes not yet taken for storage.
    #[error("{0:?} has changes that were not stored")]
    Unsaved(DocAddr),
    /// A document was offered where another kind was expected.
    #[error("{addr:?} is not the expected kind of document")]
    WrongDocument {
        /// The document.
        addr: DocAddr,
    },
    /// Automerge refused a change or a document.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}
