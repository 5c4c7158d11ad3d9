//! Messages as the app sees them, and how they are laid out in a segment document.
//!
//! A message is a map under its [`MessageKey`] at the root of a segment document, created once by
//! its author device, so no two devices ever create the same object:
//!
//! ```text
//! "<hlc:16 hex><device prefix:16 hex>": {
//!     "acct":     bytes[32]   author account
//!     "body":     str         plain string, absent once recalled
//!     "reply":    bytes[40]   optional: replied-to message (hlc u64 BE, device id)
//!     "att":      [ { "hash": bytes[32], "size": uint, "mime": str, "name": str } ]  optional
//!     "edited":   true        once edited
//!     "recalled": true        once recalled
//!     "rx/<account hex>/<reaction>": true    one key per (account, reaction)
//! }
//! ```
//!
//! The author device is not stored: it is the Automerge actor of the operation that created the
//! map, which the envelope signature later authenticates. A map whose key names another device
//! than its creator is ignored.

use automerge::{
    ObjId, ObjType, ReadDoc, ScalarValue, ScalarValueRef, Value, ValueRef,
    transaction::Transactable,
};

use crate::ids::{AccountId, ConversationId, DeviceId, MessageId, MessageKey};
use crate::model::error::ModelError;
use crate::model::hlc::Hlc;
use crate::model::limits::{
    MAX_ATTACHMENT_NAME_BYTES, MAX_ATTACHMENTS, MAX_BODY_BYTES, MAX_MIME_BYTES, MAX_REACTION_BYTES,
};

pub(crate) const ACCT: &str = "acct";
pub(crate) const BODY: &str = "body";
pub(crate) const REPLY: &str = "reply";
pub(crate) const ATTACHMENTS: &str = "att";
pub(crate) const EDITED: &str = "edited";
pub(crate) const RECALLED: &str = "recalled";
pub(crate) const REACTION_PREFIX: &str = "rx/";

/// What a remote change did to a message that existed before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageUpdate {
    /// Its text or attachments changed.
    Edited,
    /// It was recalled.
    Recalled,
    /// Its reactions changed.
    Reactions,
}

/// A file attached to a message: metadata only, the bytes travel elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// blake3 hash of the content.
    pub hash: [u8; 32],
    /// Size in bytes.
    pub size: u64,
    /// MIME type.
    pub mime: String,
    /// File name.
    pub name: String,
}

/// What the app asks to send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Draft {
    /// Message text.
    pub body: String,
    /// The message this one answers.
    pub reply_to: Option<MessageId>,
    /// Attached files.
    pub attachments: Vec<Attachment>,
}

impl Draft {
    /// A text message.
    pub fn text(body: impl Into<String>) -> Draft {
        Draft {
            body: body.into(),
            ..Draft::default()
        }
    }

    /// Checks every limit.
    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        check_len("body", &self.body, MAX_BODY_BYTES)?;
        if self.attachments.len() > MAX_ATTACHMENTS {
            return Err(ModelError::TooLarge {
                field: "attachments",
                len: self.attachments.len(),
                max: MAX_ATTACHMENTS,
            });
        }
        for a in &self.attachments {
            check_len("attachment name", &a.name, MAX_ATTACHMENT_NAME_BYTES)?;
            check_len("attachment mime type", &a.mime, MAX_MIME_BYTES)?;
        }
        if self.body.is_empty() && self.attachments.is_empty() {
            return Err(ModelError::Empty { field: "message" });
        }
        Ok(())
    }
}

/// Who reacted with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaction {
    /// The reaction, usually one emoji.
    pub reaction: String,
    /// The accounts that reacted with it, in id order.
    pub accounts: Vec<AccountId>,
}

/// A message as the current state of its conversation shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The conversation.
    pub conversation: ConversationId,
    /// Its id: HLC and author device.
    pub id: MessageId,
    /// The author account.
    pub author: AccountId,
    /// The text; `None` once recalled.
    pub body: Option<String>,
    /// The message it answers.
    pub reply_to: Option<MessageId>,
    /// Attached files; empty once recalled.
    pub attachments: Vec<Attachment>,
    /// Whether the text was edited.
    pub edited: bool,
    /// Whether the author recalled it (deleted it for everyone).
    pub recalled: bool,
    /// Reactions, in reaction order.
    pub reactions: Vec<Reaction>,
}

pub(crate) fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.len() > max {
        return Err(ModelError::TooLarge {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

pub(crate) fn check_reaction(reaction: &str) -> Result<(), ModelError> {
    if reaction.is_empty() {
        return Err(ModelError::Empty { field: "reaction" });
    }
    check_len("reaction", reaction, MAX_REACTION_BYTES)
}

pub(crate) fn reaction_key(account: &AccountId, reaction: &str) -> String {
    format!("{REACTION_PREFIX}{account}/{reaction}")
}

/// Writes a new message map at `key` inside a transaction on a segment document.
pub(crate) fn write_new(
    tx: &mut impl Transactable,
    key: &MessageKey,
    author: &AccountId,
    draft: &Draft,
) -> Result<(), ModelError> {
    let m = tx.put_object(automerge::ROOT, key.encode(), ObjType::Map)?;
    tx.put(&m, ACCT, author.as_bytes().to_vec())?;
    if !draft.body.is_empty() {
        tx.put(&m, BODY, draft.body.as_str())?;
    }
    if let Some(r) = &draft.reply_to {
        tx.put(&m, REPLY, encode_message_id(r))?;
    }
    if !draft.attachments.is_empty() {
        let list = tx.put_object(&m, ATTACHMENTS, ObjType::List)?;
        for (i, a) in draft.attachments.iter().enumerate() {
            let item = tx.insert_object(&list, i, ObjType::Map)?;
            tx.put(&item, "hash", a.hash.to_vec())?;
            tx.put(&item, "size", ScalarValue::Uint(a.size))?;
            tx.put(&item, "mime", a.mime.as_str())?;
            tx.put(&item, "name", a.name.as_str())?;
        }
    }
    Ok(())
}

fn encode_message_id(id: &MessageId) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&id.hlc.as_u64().to_be_bytes());
    out.extend_from_slice(id.device.as_bytes());
    out
}

fn decode_message_id(b: &[u8]) -> Option<MessageId> {
    if b.len() != 40 {
        return None;
    }
    let hlc = u64::from_be_bytes(b[..8].try_into().ok()?);
    let device: [u8; 32] = b[8..].try_into().ok()?;
    Some(MessageId {
        hlc: Hlc::from_u64(hlc),
        device: DeviceId::from_bytes(device),
    })
}

/// The object and author device of the message at `key`, if it is a valid message: a map created
/// by a device whose id matches the key.
pub(crate) fn locate(doc: &impl ReadDoc, key: &MessageKey) -> Option<(ObjId, DeviceId)> {
    let (value, id) = doc.get(automerge::ROOT, key.encode()).ok()??;
    valid_object(key, matches!(value, Value::Object(ObjType::Map)), &id)
}

/// Checks that `value`, found under `key`, is a message map created by the device the key names.
pub(crate) fn valid_object(
    key: &MessageKey,
    is_map: bool,
    id: &ObjId,
) -> Option<(ObjId, DeviceId)> {
    if !is_map {
        return None;
    }
    let ObjId::Id(_, actor, _) = id else {
        return None;
    };
    let device = DeviceId::from_bytes(actor.to_bytes().try_into().ok()?);
    (device.prefix_u64() == key.device_prefix).then(|| (id.clone(), device))
}

/// Reads the message at `key`, or `None` if there is no valid message there.
///
/// The message map is read in one pass over its keys: each separate lookup first has to find the
/// map among all the objects of the segment, which costs several microseconds per lookup in a
/// segment of a few thousand messages.
pub(crate) fn read(
    doc: &impl ReadDoc,
    conversation: ConversationId,
    key: &MessageKey,
) -> Option<Message> {
    let (obj, device) = locate(doc, key)?;
    let mut author = None;
    let mut body = None;
    let mut reply_to = None;
    let mut attachment_list = None;
    let mut edited = false;
    let mut recalled = false;
    let mut reacted: Vec<(String, AccountId)> = Vec::new();
    for item in doc.map_range(&obj, ..) {
        match (item.key.as_ref(), &item.value) {
            (ACCT, ValueRef::Scalar(ScalarValueRef::Bytes(b))) => {
                author = <[u8; 32]>::try_from(b.as_ref())
                    .ok()
                    .map(AccountId::from_bytes);
            }
            (BODY, ValueRef::Scalar(ScalarValueRef::Str(s))) => body = Some(s.to_string()),
            (REPLY, ValueRef::Scalar(ScalarValueRef::Bytes(b))) => reply_to = decode_message_id(b),
            (ATTACHMENTS, ValueRef::Object(ObjType::List)) => attachment_list = Some(item.id()),
            (EDITED, ValueRef::Scalar(ScalarValueRef::Boolean(true))) => edited = true,
            (RECALLED, ValueRef::Scalar(ScalarValueRef::Boolean(true))) => recalled = true,
            (k, ValueRef::Scalar(ScalarValueRef::Boolean(true))) => {
                if let Some(pair) = reaction_of(k) {
                    reacted.push(pair);
                }
            }
            _ => {}
        }
    }
    let author = author?;
    let (body, attachments) = if recalled {
        (None, Vec::new())
    } else {
        let attachments = attachment_list.map_or_else(Vec::new, |list| attachments(doc, &list));
        (Some(body.unwrap_or_default()), attachments)
    };
    Some(Message {
        conversation,
        id: MessageId {
            hlc: key.hlc,
            device,
        },
        author,
        body,
        reply_to,
        attachments,
        edited,
        recalled,
        reactions: group_reactions(reacted),
    })
}

/// Deletes a message's text and attachments. Deleting an absent key would still write an
/// operation, so only what is there is deleted.
pub(crate) fn strip_content(
    tx: &mut automerge::transaction::Transaction<'_>,
    obj: &ObjId,
) -> Result<(), ModelError> {
    for field in [BODY, ATTACHMENTS] {
        if tx.get(obj, field)?.is_some() {
            tx.delete(obj, field)?;
        }
    }
    Ok(())
}

/// Whether `obj` is a recalled message by `account` that still holds text or attachments.
pub(crate) fn recalled_with_content(doc: &impl ReadDoc, obj: &ObjId, account: &AccountId) -> bool {
    flag(doc, obj, RECALLED)
        && bytes(doc, obj, ACCT).is_some_and(|a| a.as_slice() == account.as_bytes())
        && (matches!(doc.get(obj, BODY), Ok(Some(_)))
            || matches!(doc.get(obj, ATTACHMENTS), Ok(Some(_))))
}

/// The author account of the message at `key` and whether it is recalled, without reading the
/// rest: what unread counting needs.
pub(crate) fn author_and_recalled(
    doc: &impl ReadDoc,
    key: &MessageKey,
) -> Option<(AccountId, bool)> {
    let (obj, _) = locate(doc, key)?;
    Some((author(doc, &obj)?, flag(doc, &obj, RECALLED)))
}

/// The author account of a message object, if it holds a well-formed one.
pub(crate) fn author(doc: &impl ReadDoc, obj: &ObjId) -> Option<AccountId> {
    Some(AccountId::from_bytes(
        bytes(doc, obj, ACCT)?.try_into().ok()?,
    ))
}

fn scalar(doc: &impl ReadDoc, obj: &ObjId, prop: &str) -> Option<ScalarValue> {
    match doc.get(obj, prop).ok()?? {
        (Value::Scalar(s), _) => Some(s.into_owned()),
        _ => None,
    }
}

pub(crate) fn string(doc: &impl ReadDoc, obj: &ObjId, prop: &str) -> Option<String> {
    match scalar(doc, obj, prop)? {
        ScalarValue::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

fn bytes(doc: &impl ReadDoc, obj: &ObjId, prop: &str) -> Option<Vec<u8>> {
    match scalar(doc, obj, prop)? {
        ScalarValue::Bytes(b) => Some(b),
        _ => None,
    }
}

pub(crate) fn flag(doc: &impl ReadDoc, obj: &ObjId, prop: &str) -> bool {
    matches!(scalar(doc, obj, prop), Some(ScalarValue::Boolean(true)))
}

/// The attachments in the list object `list`.
fn attachments(doc: &impl ReadDoc, list: &ObjId) -> Vec<Attachment> {
    let mut out = Vec::new();
    for i in 0..doc.length(list) {
        let Some((Value::Object(ObjType::Map), item)) = doc.get(list, i).ok().flatten() else {
            continue;
        };
        let hash = bytes(doc, &item, "hash").and_then(|b| <[u8; 32]>::try_from(b).ok());
        let size = match scalar(doc, &item, "size") {
            Some(ScalarValue::Uint(n)) => Some(n),
            _ => None,
        };
        if let (Some(hash), Some(size)) = (hash, size) {
            out.push(Attachment {
                hash,
                size,
                mime: string(doc, &item, "mime").unwrap_or_default(),
                name: string(doc, &item, "name").unwrap_or_default(),
            });
        }
    }
    out
}

/// The reaction and account of a reaction key "rx/<64 hex>/<reaction>", if it is one.
fn reaction_of(key: &str) -> Option<(String, AccountId)> {
    let rest = key.strip_prefix(REACTION_PREFIX)?;
    let (hex, reaction) = (rest.get(..64)?, rest.get(65..)?);
    if reaction.is_empty() {
        return None;
    }
    Some((reaction.to_string(), AccountId::parse_hex(hex).ok()?))
}

/// Groups (reaction, account) pairs by reaction, both in order.
fn group_reactions(mut pairs: Vec<(String, AccountId)>) -> Vec<Reaction> {
    pairs.sort();
    let mut out: Vec<Reaction> = Vec::new();
    for (reaction, account) in pairs {
        match out.last_mut() {
            Some(last) if last.reaction == reaction => last.accounts.push(account),
            _ => out.push(Reaction {
                reaction,
                accounts: vec![account],
            }),
        }
    }
    out
}
