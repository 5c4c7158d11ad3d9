//! A segment: one bounded Automerge document holding a slice of a conversation's messages.
//!
//! Next to the document, a segment keeps a sorted index of its valid message keys. The index is
//! derived state: it is rebuilt from the document after remote changes (a key scan, bounded by the
//! segment cap) and extended in place on local sends. It lets a page be read backwards — Automerge's
//! `map_range` only iterates forwards — and lets a conversation find the segments that hold a key
//! range without opening them.

use automerge::{ObjId, ObjType, ReadDoc, ValueRef};

use crate::ids::{ConversationId, DeviceId, DocAddr, MessageId, MessageKey};
use crate::model::doc::SyncedDoc;
use crate::model::message::{self, Message, valid_object};

/// What is known of a segment without its document: enough to decide whether a query needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Number of valid messages.
    pub count: u32,
    /// Smallest key.
    pub min_key: Option<MessageKey>,
    /// Largest key.
    pub max_key: Option<MessageKey>,
}

impl SegmentInfo {
    /// Length of the encoded form.
    pub const ENCODED_LEN: usize = 4 + 2 * 17;

    /// `u32 count | (u8 present, u64 hlc, u64 device prefix) × 2`, big-endian.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..4].copy_from_slice(&self.count.to_be_bytes());
        for (i, key) in [self.min_key, self.max_key].iter().enumerate() {
            let at = 4 + 17 * i;
            if let Some(k) = key {
                out[at] = 1;
                out[at + 1..at + 9].copy_from_slice(&k.hlc.as_u64().to_be_bytes());
                out[at + 9..at + 17].copy_from_slice(&k.device_prefix.to_be_bytes());
            }
        }
        out
    }

    /// Decodes [`SegmentInfo::encode`]'s output; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<SegmentInfo> {
        let b: &[u8; Self::ENCODED_LEN] = b.try_into().ok()?;
        let key = |at: usize| -> Option<Option<MessageKey>> {
            match b[at] {
                0 => Some(None),
                1 => Some(Some(MessageKey {
                    hlc: crate::model::hlc::Hlc::from_u64(u64::from_be_bytes(
                        b[at + 1..at + 9].try_into().ok()?,
                    )),
                    device_prefix: u64::from_be_bytes(b[at + 9..at + 17].try_into().ok()?),
                })),
                _ => None,
            }
        };
        Some(SegmentInfo {
            count: u32::from_be_bytes(b[..4].try_into().ok()?),
            min_key: key(4)?,
            max_key: key(21)?,
        })
    }
}

/// One segment document and its key index.
#[derive(Debug)]
pub struct Segment {
    number: u32,
    doc: SyncedDoc,
    keys: Vec<MessageKey>,
}

impl Segment {
    /// A new, empty segment.
    pub fn new(conversation: ConversationId, number: u32, me: DeviceId) -> Segment {
        Segment {
            number,
            doc: SyncedDoc::new(DocAddr::Segment(conversation, number), me),
            keys: Vec::new(),
        }
    }

    /// Wraps a loaded document and builds its index.
    pub fn from_doc(number: u32, doc: SyncedDoc) -> Segment {
        let mut s = Segment {
            number,
            doc,
            keys: Vec::new(),
        };
        s.reindex();
        s
    }

    /// The segment number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The document.
    pub fn doc(&self) -> &SyncedDoc {
        &self.doc
    }

    /// The document, for writing and applying.
    pub fn doc_mut(&mut self) -> &mut SyncedDoc {
        &mut self.doc
    }

    /// Number of valid messages.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// What a query needs to know of this segment while it is not loaded.
    pub fn info(&self) -> SegmentInfo {
        SegmentInfo {
            count: self.keys.len() as u32,
            min_key: self.min_key(),
            max_key: self.max_key(),
        }
    }

    /// Whether the segment holds no message.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The smallest key, if any.
    pub fn min_key(&self) -> Option<MessageKey> {
        self.keys.first().copied()
    }

    /// The largest key, if any.
    pub fn max_key(&self) -> Option<MessageKey> {
        self.keys.last().copied()
    }

    /// Whether `key` is a valid message of this segment.
    pub fn contains(&self, key: &MessageKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }

    /// Records a key written locally.
    pub fn note_local(&mut self, key: MessageKey) {
        if let Err(at) = self.keys.binary_search(&key) {
            self.keys.insert(at, key);
        }
    }

    /// Rebuilds the key index from the document and returns the ids of the new messages that
    /// [`Segment::message`] can read.
    ///
    /// The scan already yields each message map and the device that created it, so a new message
    /// costs one more lookup (its author account), not a full read.
    pub fn reindex(&mut self) -> Vec<MessageId> {
        let doc = self.doc.doc();
        let mut found: Vec<(MessageKey, ObjId, DeviceId)> =
            Vec::with_capacity(self.keys.len() + 16);
        for item in doc.map_range(automerge::ROOT, ..) {
            let Some(key) = MessageKey::decode(&item.key) else {
                continue;
            };
            if let Some((obj, device)) = valid_object(
                &key,
                matches!(item.value, ValueRef::Object(ObjType::Map)),
                &item.id(),
            ) {
                found.push((key, obj, device));
            }
        }
        // Only messages that can be read are indexed: a map without a well-formed author (a
        // misbehaving device can write one) would otherwise take a place in history pages and in
        // the segment count while showing nothing, and could hide older messages. Indexed keys
        // were checked when they arrived, so only new ones cost an author lookup.
        let mut added = Vec::new();
        let mut unreadable = Vec::new();
        for (key, obj, device) in sorted_difference(&found, &self.keys) {
            if message::author(doc, obj).is_some() {
                added.push(MessageId {
                    hlc: key.hlc,
                    device: *device,
                });
            } else {
                unreadable.push(*key);
            }
        }
        self.keys = found
            .into_iter()
            .map(|(key, _, _)| key)
            .filter(|key| unreadable.binary_search(key).is_err())
            .collect();
        added
    }

    /// Updates the key index for the root keys that remote changes wrote, and returns the ids of
    /// the new readable messages in key order. Costs one lookup per key written, not a scan of the
    /// segment; gives the same index as [`Segment::reindex`].
    pub fn reindex_keys(&mut self, written: &[String]) -> Vec<MessageId> {
        let doc = self.doc.doc();
        let mut keys: Vec<MessageKey> = written
            .iter()
            .filter_map(|k| MessageKey::decode(k))
            .collect();
        keys.sort();
        keys.dedup();
        let mut added = Vec::new();
        for key in keys {
            let found = match doc.get(automerge::ROOT, key.encode()) {
                Ok(Some((value, id))) => valid_object(
                    &key,
                    matches!(value, automerge::Value::Object(ObjType::Map)),
                    &id,
                )
                .filter(|(obj, _)| message::author(doc, obj).is_some()),
                _ => None,
            };
            match (found, self.keys.binary_search(&key)) {
                (Some((_, device)), Err(at)) => {
                    self.keys.insert(at, key);
                    added.push(MessageId {
                        hlc: key.hlc,
                        device,
                    });
                }
                (None, Ok(at)) => {
                    self.keys.remove(at);
                }
                _ => {}
            }
        }
        added
    }

    /// Up to `limit` keys strictly before `before` (all keys if `None`), newest last.
    pub fn keys_before(&self, before: Option<MessageKey>, limit: usize) -> &[MessageKey] {
        let end = match before {
            Some(b) => self.keys.partition_point(|k| *k < b),
            None => self.keys.len(),
        };
        &self.keys[end.saturating_sub(limit)..end]
    }

    /// Keys strictly after `after`.
    pub fn keys_after(&self, after: MessageKey) -> &[MessageKey] {
        let start = self.keys.partition_point(|k| *k <= after);
        &self.keys[start..]
    }

    /// Reads one message.
    pub fn message(&self, conversation: ConversationId, key: &MessageKey) -> Option<Message> {
        message::read(self.doc.doc(), conversation, key)
    }
}

/// Entries of sorted `a` whose keys are not in sorted `b`.
fn sorted_difference<'a>(
    a: &'a [(MessageKey, ObjId, DeviceId)],
    b: &'a [MessageKey],
) -> impl Iterator<Item = &'a (MessageKey, ObjId, DeviceId)> {
    let mut j = 0;
    a.iter().filter(move |(k, _, _)| {
        while j < b.len() && b[j] < *k {
            j += 1;
        }
        j >= b.len() || b[j] != *k
    })
}
