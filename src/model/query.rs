//! What queries return.

use crate::ids::{AccountId, ConversationId, MessageId, MessageKey};
use crate::model::hlc::Hlc;
use crate::model::message::Message;

/// A position in a conversation's history: a page asks for messages strictly before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor(pub(crate) MessageKey);

impl Cursor {
    /// The position just before `id`: a page from here starts with the message before it.
    pub fn before(id: &MessageId) -> Cursor {
        Cursor(id.key())
    }

    /// The position after every message: the newest page.
    pub fn latest() -> Option<Cursor> {
        None
    }

    /// The key the cursor points at.
    pub fn key(&self) -> MessageKey {
        self.0
    }
}

/// One page of history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Messages in conversation order (oldest first).
    pub messages: Vec<Message>,
    /// Where the page before this one starts, if there are older messages.
    pub next: Option<Cursor>,
    /// Older messages of the conversation exist that this device does not hold yet (its
    /// segments are still to arrive). The model knows only what it holds, so it sets `false`;
    /// the engine sets it when it answers without them (offline, or a fetch that timed out).
    pub incomplete: bool,
}

/// One line of the conversation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The conversation.
    pub id: ConversationId,
    /// Its title.
    pub title: String,
    /// Number of current members.
    pub member_count: usize,
    /// Whether this account is still a member.
    pub is_member: bool,
    /// Pinned by this account.
    pub pinned: bool,
    /// Muted by this account.
    pub muted: bool,
    /// Archived by this account.
    pub archived: bool,
    /// This account's draft.
    pub draft: Option<String>,
    /// The newest message not hidden by this account.
    pub last_message: Option<MessagePreview>,
    /// Time of the newest visible message, or of creation.
    pub last_activity: Hlc,
    /// Unread messages (see [`crate::model::Replica::unread_count`]).
    pub unread: u64,
}

/// What the conversation list shows of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagePreview {
    /// The message.
    pub id: MessageId,
    /// Its author account.
    pub author: AccountId,
    /// The start of its text (at most [`PREVIEW_CHARS`] characters); `None` once recalled.
    pub text: Option<String>,
    /// Number of attachments.
    pub attachments: u32,
    /// Whether it was edited.
    pub edited: bool,
    /// Whether it was recalled.
    pub recalled: bool,
}

/// Characters of a message kept in its preview.
pub const PREVIEW_CHARS: usize = 120;

impl MessagePreview {
    /// The preview of a message.
    pub fn of(m: &Message) -> MessagePreview {
        MessagePreview {
            id: m.id,
            author: m.author,
            text: m
                .body
                .as_ref()
                .map(|b| b.chars().take(PREVIEW_CHARS).collect()),
            attachments: m.attachments.len() as u32,
            edited: m.edited,
            recalled: m.recalled,
        }
    }
}

/// Sorts a conversation list: pinned first, then by last activity (newest first), then by id.
pub fn sort_conversation_list(list: &mut [ConversationSummary]) {
    list.sort_by(|a, b| {
        b.pinned
            .cmp(&a.pinned)
            .then(b.last_activity.cmp(&a.last_activity))
            .then(a.id.cmp(&b.id))
    });
}
