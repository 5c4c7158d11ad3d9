//! The conversation data model on segmented Automerge documents. Sans-IO: time is an argument and
//! nothing here does IO.
//!
//! A [`Replica`] holds one device's view: the private [`account`] document of its account and, per
//! conversation, a meta document and bounded segment documents (see [`conversation`]). Operations
//! change the local documents; the sync surface exports [`ChangeBatch`]es and applies remote ones.
//!
//! ```
//! use roamsync::ids::{AccountId, DeviceId};
//! use roamsync::model::{Draft, ModelConfig, Replica};
//!
//! let alice = AccountId::from_bytes([1; 32]);
//! let mut phone = Replica::new(alice, DeviceId::from_bytes([1; 32]), ModelConfig::default()).unwrap();
//! let mut laptop = Replica::new(alice, DeviceId::from_bytes([2; 32]), ModelConfig::default()).unwrap();
//!
//! let chat = phone.create_conversation(1_000, "notes", &[]).unwrap();
//! phone.send(1_001, &chat, &Draft::text("hello")).unwrap();
//!
//! // Ship everything the laptop lacks; a transport would carry these batches.
//! let batches: Vec<_> = phone
//!     .docs()
//!     .iter()
//!     .filter_map(|d| phone.changes_since(d, &laptop.version_vector(d)))
//!     .collect();
//! let report = laptop.apply(1_002, batches);
//! assert!(report.rejected.is_empty());
//! let page = laptop.history(&chat, None, 50).unwrap();
//! assert_eq!(page.messages[0].body.as_deref(), Some("hello"));
//! ```

pub mod account;
pub mod batch;
pub mod conversation;
pub mod doc;
pub mod error;
pub mod hlc;
pub mod limits;
pub mod message;
pub mod query;
pub mod replica;
pub mod segment;
mod validate;

#[cfg(test)]
mod tests;

pub use account::ListFlag;
pub use batch::{BatchError, ChangeBatch};
pub use doc::{DocApply, SyncedDoc, Unsaved, VersionVector};
pub use error::ModelError;
pub use message::{Attachment, Draft, Message, MessageUpdate, Reaction};
pub use query::{ConversationSummary, Cursor, MessagePreview, Page};
pub use replica::{ApplyReport, ModelConfig, Replica};
pub use segment::SegmentInfo;
pub use validate::claimed_accounts;
