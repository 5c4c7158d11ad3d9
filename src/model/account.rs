//! The account document: private state shared by one account's devices only.
//!
//! Flat keys at the root, so two devices never create the same object:
//!
//! ```text
//! "pin/<conversation>":                bool
//! "mute/<conversation>":               bool
//! "archive/<conversation>":            bool
//! "draft/<conversation>":              str    deleted when cleared
//! "read/<conversation>/<device>":      str    message key; each device writes only its own
//! "hide/<conversation>/<message key>": true   "delete for me"
//! ```
//!
//! The account's read position in a conversation is the furthest of its devices' positions: each
//! device only ever moves its own forward, so the maximum converges without conflicts.

use automerge::{ReadDoc, ScalarValueRef, ValueRef, transaction::Transactable};

use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageKey};
use crate::model::conversation::prefix_range;
use crate::model::doc::SyncedDoc;
use crate::model::error::ModelError;
use crate::model::message;

/// A conversation-list flag kept in the account document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ListFlag {
    /// Shown at the top of the list.
    Pinned,
    /// No notifications.
    Muted,
    /// Moved out of the main list.
    Archived,
}

impl ListFlag {
    fn prefix(self) -> &'static str {
        match self {
            ListFlag::Pinned => "pin",
            ListFlag::Muted => "mute",
            ListFlag::Archived => "archive",
        }
    }
}

/// The account document of one account.
#[derive(Debug)]
pub struct AccountDoc {
    doc: SyncedDoc,
}

impl AccountDoc {
    /// An empty account document written by `me`.
    pub fn new(account: AccountId, me: DeviceId) -> AccountDoc {
        AccountDoc {
            doc: SyncedDoc::new(DocAddr::Account(account), me),
        }
    }

    /// Wraps a loaded document.
    pub fn from_doc(doc: SyncedDoc) -> AccountDoc {
        AccountDoc { doc }
    }

    /// The document.
    pub fn doc(&self) -> &SyncedDoc {
        &self.doc
    }

    /// The document, for applying remote changes.
    pub fn doc_mut(&mut self) -> &mut SyncedDoc {
        &mut self.doc
    }

    /// Sets a list flag.
    pub fn set_flag(
        &mut self,
        conversation: &ConversationId,
        flag: ListFlag,
        on: bool,
    ) -> Result<(), ModelError> {
        if self.flag(conversation, flag) == on {
            return Ok(());
        }
        let key = format!("{}/{conversation}", flag.prefix());
        self.doc.write(|tx| {
            tx.put(automerge::ROOT, key, on)?;
            Ok(())
        })
    }

    /// Reads a list flag.
    pub fn flag(&self, conversation: &ConversationId, flag: ListFlag) -> bool {
        message::flag(
            self.doc.doc(),
            &automerge::ROOT,
            &format!("{}/{conversation}", flag.prefix()),
        )
    }

    /// Sets or clears (with an empty string) the draft of a conversation.
    pub fn set_draft(
        &mut self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<(), ModelError> {
        if self.draft(conversation).as_deref().unwrap_or("") == text {
            return Ok(());
        }
        let key = format!("draft/{conversation}");
        self.doc.write(|tx| {
            if text.is_empty() {
                tx.delete(automerge::ROOT, key)?;
            } else {
                tx.put(automerge::ROOT, key, text)?;
            }
            Ok(())
        })
    }

    /// The draft of a conversation.
    pub fn draft(&self, conversation: &ConversationId) -> Option<String> {
        message::string(
            self.doc.doc(),
            &automerge::ROOT,
            &format!("draft/{conversation}"),
        )
    }

    /// Moves `device`'s read position forward to `key`; an older key changes nothing.
    pub fn advance_read(
        &mut self,
        conversation: &ConversationId,
        device: &DeviceId,
        key: MessageKey,
    ) -> Result<bool, ModelError> {
        let slot = format!("read/{conversation}/{device}");
        let current = message::string(self.doc.doc(), &automerge::ROOT, &slot)
            .and_then(|s| MessageKey::decode(&s));
        if current.is_some_and(|c| c >= key) {
            return Ok(false);
        }
        self.doc.write(|tx| {
            tx.put(automerge::ROOT, slot, key.encode())?;
            Ok(true)
        })
    }

    /// Each device's read position in a conversation.
    pub fn read_positions(&self, conversation: &ConversationId) -> Vec<(DeviceId, MessageKey)> {
        let prefix = format!("read/{conversation}/");
        self.doc
            .doc()
            .map_range(automerge::ROOT, prefix_range(&prefix))
            .filter_map(|item| {
                let device = DeviceId::parse_hex(&item.key[prefix.len()..]).ok()?;
                let ValueRef::Scalar(ScalarValueRef::Str(k)) = item.value else {
                    return None;
                };
                Some((device, MessageKey::decode(&k)?))
            })
            .collect()
    }

    /// The account's read position in every conversation that has one.
    pub fn all_read_positions(&self) -> std::collections::BTreeMap<ConversationId, MessageKey> {
        let mut out = std::collections::BTreeMap::new();
        for item in self
            .doc
            .doc()
            .map_range(automerge::ROOT, prefix_range("read/"))
        {
            // "read/<32 hex conversation>/<64 hex device>"
            let Some(conv) = item
                .key
                .get(5..37)
                .and_then(|h| ConversationId::parse_hex(h).ok())
            else {
                continue;
            };
            let ValueRef::Scalar(ScalarValueRef::Str(k)) = item.value else {
                continue;
            };
            if let Some(key) = MessageKey::decode(&k) {
                let e = out.entry(conv).or_insert(key);
                *e = (*e).max(key);
            }
        }
        out
    }

    /// Per conversation, what of this document a conversation summary depends on: the account's
    /// read position and the number of hidden messages. Two digests that differ for a conversation
    /// mean its unread count or last message may have changed.
    pub fn digest(&self) -> std::collections::BTreeMap<ConversationId, (Option<MessageKey>, u32)> {
        let mut out: std::collections::BTreeMap<ConversationId, (Option<MessageKey>, u32)> = self
            .all_read_positions()
            .into_iter()
            .map(|(c, k)| (c, (Some(k), 0)))
            .collect();
        for item in self
            .doc
            .doc()
            .map_range(automerge::ROOT, prefix_range("hide/"))
        {
            // "hide/<32 hex conversation>/<key>"
            if let Some(conv) = item
                .key
                .get(5..37)
                .and_then(|h| ConversationId::parse_hex(h).ok())
            {
                out.entry(conv).or_insert((None, 0)).1 += 1;
            }
        }
        out
    }

    /// The account's read position: the furthest of its devices'.
    pub fn read_position(&self, conversation: &ConversationId) -> Option<MessageKey> {
        self.read_positions(conversation)
            .into_iter()
            .map(|(_, k)| k)
            .max()
    }

    /// Hides a message on this account's devices ("delete for me").
    pub fn hide(
        &mut self,
        conversation: &ConversationId,
        key: &MessageKey,
    ) -> Result<(), ModelError> {
        if self.is_hidden(conversation, key) {
            return Ok(());
        }
        let slot = hide_key(conversation, key);
        self.doc.write(|tx| {
            tx.put(automerge::ROOT, slot, true)?;
            Ok(())
        })
    }

    /// Whether a message is hidden for this account.
    pub fn is_hidden(&self, conversation: &ConversationId, key: &MessageKey) -> bool {
        message::flag(
            self.doc.doc(),
            &automerge::ROOT,
            &hide_key(conversation, key),
        )
    }
}

fn hide_key(conversation: &ConversationId, key: &MessageKey) -> String {
    format!("hide/{conversation}/{}", key.encode())
}
