//! A conversation: one meta document and the segment documents that hold its messages.
//!
//! The meta document has only flat keys at its root, so concurrent writers never create the same
//! object twice:
//!
//! ```text
//! "title":              str
//! "created":            uint   HLC of creation
//! "member/<account>":   uint   HLC at which the account was added; deleted on removal
//! "setting/<name>":     str
//! "seg/<8 hex>":        str    segment n exists; the key of the message that opened it
//! ```
//!
//! **Roll-over.** A device writes into the highest-numbered segment it knows. When that segment
//! holds `cap` messages in its view, it opens the next number: it writes `seg/<n+1>` into the meta
//! document and starts the segment document `Segment(conversation, n+1)`. Two devices that roll
//! over concurrently pick the same number and write into the same document, which is the same
//! document because its address is derived from (conversation, n); the segment root is never
//! created (it exists in every Automerge document) and each message map is created by its author
//! alone, so the merge is clean. A segment can therefore exceed `cap` by what offline devices
//! wrote into it concurrently, never more.
//!
//! **Loading.** A conversation may hold only some of its segments in memory; for the others it
//! keeps a [`SegmentInfo`] (count and key range). A query or write that needs an unloaded segment
//! fails with [`ModelError::NotLoaded`] before changing anything, naming the document to load; the
//! caller loads it and retries. That keeps this code free of IO and memory bounded by a budget.
//!
//! **Reading.** Key ranges of segments may overlap (an offline device keeps writing into an older
//! segment), so a page merges segments in the order of their newest key below the cursor and stops
//! as soon as no remaining segment can hold a key newer than the page's oldest.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ReadDoc, ScalarValue, ScalarValueRef, Value, ValueRef, transaction::Transactable};

use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageKey};
use crate::model::doc::SyncedDoc;
use crate::model::error::ModelError;
use crate::model::hlc::Hlc;
use crate::model::message::{self, Draft, Message};
use crate::model::segment::{Segment, SegmentInfo};

const TITLE: &str = "title";
const CREATED: &str = "created";
const MEMBER_PREFIX: &str = "member/";
const SETTING_PREFIX: &str = "setting/";
const SEGMENT_PREFIX: &str = "seg/";

/// The meta document and the segments of one conversation.
#[derive(Debug)]
pub struct Conversation {
    id: ConversationId,
    me: DeviceId,
    meta: SyncedDoc,
    segments: BTreeMap<u32, Segment>,
    unloaded: BTreeMap<u32, SegmentInfo>,
    /// The highest segment number in the meta index, derived from the meta document and computed
    /// again after it changes (`None`: not known). Sending needs it for every message, and a
    /// scan of the index grows with the number of segments.
    max_indexed: Option<Option<u32>>,
    /// The last unread count, so that counting again walks only what arrived since.
    unread_cache: std::cell::Cell<Option<UnreadCache>>,
}

/// An unread count and what it covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnreadCache {
    /// The read position it was counted from.
    pub read: MessageKey,
    /// The newest message key it saw.
    pub newest: MessageKey,
    /// Unread messages at or below `newest`.
    pub count: u64,
}

impl Conversation {
    /// The cached unread count, if any.
    pub(crate) fn unread_cache(&self) -> Option<UnreadCache> {
        self.unread_cache.get()
    }

    /// Records an unread count.
    pub(crate) fn set_unread_cache(&self, cache: Option<UnreadCache>) {
        self.unread_cache.set(cache);
    }

    /// Forgets the cached unread count: messages arrived below what it covered, or one it
    /// counted was recalled or hidden.
    pub(crate) fn forget_unread(&self) {
        self.unread_cache.set(None);
    }

    /// A conversation this replica knows nothing of yet.
    pub fn empty(id: ConversationId, me: DeviceId) -> Conversation {
        Conversation {
            id,
            me,
            meta: SyncedDoc::new(DocAddr::Meta(id), me),
            segments: BTreeMap::new(),
            unloaded: BTreeMap::new(),
            max_indexed: None,
            unread_cache: std::cell::Cell::new(None),
        }
    }

    /// A conversation from its stored meta document, with none of its segments loaded.
    pub fn from_parts(
        meta: SyncedDoc,
        unloaded: BTreeMap<u32, SegmentInfo>,
        me: DeviceId,
    ) -> Result<Conversation, ModelError> {
        let DocAddr::Meta(id) = meta.addr() else {
            return Err(ModelError::WrongDocument { addr: meta.addr() });
        };
        Ok(Conversation {
            id,
            me,
            meta,
            segments: BTreeMap::new(),
            unloaded,
            max_indexed: None,
            unread_cache: std::cell::Cell::new(None),
        })
    }

    /// Writes the initial meta state of a new conversation.
    pub fn create(
        &mut self,
        at: Hlc,
        title: &str,
        members: &[AccountId],
    ) -> Result<(), ModelError> {
        self.max_indexed = None;
        self.meta.write(|tx| {
            tx.put(automerge::ROOT, TITLE, title)?;
            tx.put(automerge::ROOT, CREATED, ScalarValue::Uint(at.as_u64()))?;
            for m in members {
                tx.put(
                    automerge::ROOT,
                    member_key(m),
                    ScalarValue::Uint(at.as_u64()),
                )?;
            }
            tx.put(automerge::ROOT, segment_key(0), "")?;
            Ok(())
        })
    }

    /// The conversation id.
    pub fn id(&self) -> ConversationId {
        self.id
    }

    /// The meta document.
    pub fn meta(&self) -> &SyncedDoc {
        &self.meta
    }

    /// The meta document, for writing and applying.
    pub fn meta_mut(&mut self) -> &mut SyncedDoc {
        self.max_indexed = None;
        &mut self.meta
    }

    /// Whether the meta document has arrived (its creation is known).
    pub fn has_meta(&self) -> bool {
        self.created().is_some()
    }

    /// When it was created, once the meta document has arrived.
    pub fn created(&self) -> Option<Hlc> {
        match self.meta.doc().get(automerge::ROOT, CREATED).ok()?? {
            (Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Uint(n) => Some(Hlc::from_u64(*n)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The title.
    pub fn title(&self) -> String {
        message::string(self.meta.doc(), &automerge::ROOT, TITLE).unwrap_or_default()
    }

    /// Current member accounts, in id order.
    pub fn members(&self) -> Vec<AccountId> {
        let doc = self.meta.doc();
        doc.map_range(automerge::ROOT, prefix_range(MEMBER_PREFIX))
            .filter_map(|item| AccountId::parse_hex(&item.key[MEMBER_PREFIX.len()..]).ok())
            .collect()
    }

    /// Whether `account` is a current member.
    pub fn is_member(&self, account: &AccountId) -> bool {
        matches!(
            self.meta.doc().get(automerge::ROOT, member_key(account)),
            Ok(Some(_))
        )
    }

    /// Settings, in name order.
    pub fn settings(&self) -> Vec<(String, String)> {
        let doc = self.meta.doc();
        doc.map_range(automerge::ROOT, prefix_range(SETTING_PREFIX))
            .filter_map(|item| match item.value {
                ValueRef::Scalar(ScalarValueRef::Str(v)) => {
                    Some((item.key[SETTING_PREFIX.len()..].to_string(), v.to_string()))
                }
                _ => None,
            })
            .collect()
    }

    /// Writes to the meta document.
    pub fn write_meta(
        &mut self,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        self.max_indexed = None;
        self.meta.write(f)
    }

    /// Segment numbers listed in the meta index.
    pub fn indexed_segments(&self) -> Vec<u32> {
        self.meta
            .doc()
            .map_range(automerge::ROOT, prefix_range(SEGMENT_PREFIX))
            .filter_map(|item| {
                let hex = &item.key[SEGMENT_PREFIX.len()..];
                (hex.len() == 8)
                    .then(|| u32::from_str_radix(hex, 16).ok())
                    .flatten()
            })
            .collect()
    }

    /// The segment a new message goes to, opening the next one when the current one is full.
    fn writable_segment(&mut self, cap: usize, opener: &MessageKey) -> Result<u32, ModelError> {
        let indexed = match self.max_indexed {
            Some(known) => known,
            None => self.indexed_segments().into_iter().max(),
        };
        self.max_indexed = Some(indexed);
        let held = self.segments.keys().next_back().copied();
        let stored = self.unloaded.keys().next_back().copied();
        let current = indexed.max(held).max(stored).unwrap_or(0);
        if self.unloaded.contains_key(&current) {
            return Err(self.not_loaded(current));
        }
        let full = self.segments.get(&current).is_some_and(|s| s.len() >= cap);
        // Segment numbers come from peers too: a misbehaving member can index or write the last
        // number there is, and counting past it must not overflow. The last segment just grows.
        let n = if full {
            current.saturating_add(1)
        } else {
            current
        };
        if indexed.is_none_or(|i| i < n) {
            let opened = opener.encode();
            self.meta.write(|tx| {
                tx.put(automerge::ROOT, segment_key(n), opened)?;
                Ok(())
            })?;
            self.max_indexed = Some(Some(n));
        }
        Ok(n)
    }

    fn not_loaded(&self, n: u32) -> ModelError {
        ModelError::NotLoaded(DocAddr::Segment(self.id, n))
    }

    /// A segment, created empty if this replica does not hold it at all.
    pub fn segment_mut(&mut self, n: u32) -> Result<&mut Segment, ModelError> {
        if self.unloaded.contains_key(&n) {
            return Err(self.not_loaded(n));
        }
        let (id, me) = (self.id, self.me);
        Ok(self
            .segments
            .entry(n)
            .or_insert_with(|| Segment::new(id, n, me)))
    }

    /// A loaded segment.
    pub fn segment(&self, n: u32) -> Option<&Segment> {
        self.segments.get(&n)
    }

    /// Loaded segments in number order.
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.segments.values()
    }

    /// Segments known but not in memory, with what is known of them.
    pub fn unloaded(&self) -> &BTreeMap<u32, SegmentInfo> {
        &self.unloaded
    }

    /// Installs a segment loaded from storage.
    pub fn insert_segment(&mut self, segment: Segment) {
        self.unloaded.remove(&segment.number());
        self.segments.insert(segment.number(), segment);
    }

    /// Drops a loaded segment from memory, keeping its [`SegmentInfo`]. Refused while the segment
    /// has changes that were not taken for storage.
    pub fn unload(&mut self, n: u32) -> Result<Option<SegmentInfo>, ModelError> {
        let Some(segment) = self.segments.get(&n) else {
            return Ok(None);
        };
        if segment.doc().has_unsaved() {
            return Err(ModelError::Unsaved(DocAddr::Segment(self.id, n)));
        }
        let info = segment.info();
        self.segments.remove(&n);
        self.unloaded.insert(n, info);
        Ok(Some(info))
    }

    /// Writes a new message; returns the segment it went to.
    pub fn send(
        &mut self,
        cap: usize,
        key: MessageKey,
        author: &AccountId,
        draft: &Draft,
    ) -> Result<u32, ModelError> {
        let n = self.writable_segment(cap, &key)?;
        let segment = self.segment_mut(n)?;
        segment
            .doc_mut()
            .write(|tx| message::write_new(tx, &key, author, draft))?;
        segment.note_local(key);
        Ok(n)
    }

    /// The segment holding the message at `key`, if any.
    pub fn locate(&self, key: &MessageKey) -> Result<Option<u32>, ModelError> {
        let in_range = |lo: Option<MessageKey>, hi: Option<MessageKey>| {
            lo.is_some_and(|lo| lo <= *key) && hi.is_some_and(|hi| *key <= hi)
        };
        let loaded = self
            .segments
            .values()
            .find(|s| in_range(s.min_key(), s.max_key()) && s.contains(key));
        if let Some(s) = loaded {
            return Ok(Some(s.number()));
        }
        match self
            .unloaded
            .iter()
            .find(|(_, i)| in_range(i.min_key, i.max_key))
        {
            Some((n, _)) => Err(self.not_loaded(*n)),
            None => Ok(None),
        }
    }

    /// Reads one message.
    pub fn message(&self, key: &MessageKey) -> Result<Option<Message>, ModelError> {
        let Some(n) = self.locate(key)? else {
            return Ok(None);
        };
        Ok(self.segments.get(&n).and_then(|s| s.message(self.id, key)))
    }

    /// Up to `limit` keys strictly before `before` for which `visible` holds, newest first, with
    /// the segment of each.
    pub fn page_keys(
        &self,
        before: Option<MessageKey>,
        limit: usize,
        visible: impl Fn(&MessageKey) -> bool,
    ) -> Result<Vec<(MessageKey, u32)>, ModelError> {
        Ok(self
            .page_keys_without(before, limit, visible, &BTreeSet::new())?
            .0)
    }

    /// [`Self::page_keys`] with the segments in `absent` treated as empty (not held here); also
    /// says whether one of them lies within the page's range, i.e. whether the page may lack
    /// messages.
    pub fn page_keys_without(
        &self,
        before: Option<MessageKey>,
        limit: usize,
        visible: impl Fn(&MessageKey) -> bool,
        absent: &BTreeSet<u32>,
    ) -> Result<(Vec<(MessageKey, u32)>, bool), ModelError> {
        let mut gap = false;
        // Each segment's newest key below the cursor (for an unloaded segment, an upper bound of
        // it), newest first.
        let mut order: Vec<(MessageKey, u32, Option<&Segment>)> = self
            .segments
            .values()
            .filter_map(|s| {
                let top = s.keys_before(before, 1).first()?;
                Some((*top, s.number(), Some(s)))
            })
            .collect();
        for (n, info) in &self.unloaded {
            let (Some(lo), Some(hi)) = (info.min_key, info.max_key) else {
                continue;
            };
            match before {
                Some(b) if lo >= b => {}
                Some(b) => order.push((hi.min(b), *n, None)),
                None => order.push((hi, *n, None)),
            }
        }
        order.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut page: Vec<(MessageKey, u32)> = Vec::with_capacity(limit);
        for (top, n, segment) in order {
            if page.len() >= limit && page.last().is_some_and(|(oldest, _)| top < *oldest) {
                break;
            }
            if absent.contains(&n) {
                gap = true;
                continue;
            }
            let Some(segment) = segment else {
                return Err(self.not_loaded(n));
            };
            let mut added = 0;
            for key in segment.keys_before(before, segment.len()).iter().rev() {
                if added >= limit {
                    break;
                }
                if visible(key) {
                    page.push((*key, segment.number()));
                    added += 1;
                }
            }
            page.sort_by_key(|e| std::cmp::Reverse(e.0));
            page.truncate(limit);
        }
        Ok((page, gap))
    }

    /// Whether any message is older than `key` (visible or not).
    pub fn has_older(&self, key: &MessageKey) -> bool {
        self.segments
            .values()
            .any(|s| s.min_key().is_some_and(|lo| lo < *key))
            || self
                .unloaded
                .values()
                .any(|i| i.min_key.is_some_and(|lo| lo < *key))
    }

    /// Visits the keys strictly after `after`, newest first across segments, until `visit`
    /// returns `false`. An unloaded segment is asked for only when its keys would come next.
    pub fn visit_after_desc(
        &self,
        after: MessageKey,
        mut visit: impl FnMut(&MessageKey, &Segment) -> bool,
    ) -> Result<(), ModelError> {
        let mut cursors: Vec<(&Segment, &[MessageKey])> = self
            .segments
            .values()
            .map(|s| (s, s.keys_after(after)))
            .filter(|(_, keys)| !keys.is_empty())
            .collect();
        let unloaded = self
            .unloaded
            .iter()
            .filter_map(|(n, i)| i.max_key.filter(|hi| *hi > after).map(|hi| (hi, *n)))
            .max();
        loop {
            let next = cursors
                .iter()
                .enumerate()
                .filter_map(|(i, (_, keys))| keys.last().map(|k| (*k, i)))
                .max();
            match (next, unloaded) {
                (next, Some((hi, n))) if next.is_none_or(|(k, _)| hi > k) => {
                    return Err(self.not_loaded(n));
                }
                (Some((key, i)), _) => {
                    let (segment, keys) = &mut cursors[i];
                    *keys = &keys[..keys.len() - 1];
                    if !visit(&key, segment) {
                        return Ok(());
                    }
                }
                (None, _) => return Ok(()),
            }
        }
    }
}

pub(crate) fn member_key(account: &AccountId) -> String {
    format!("{MEMBER_PREFIX}{account}")
}

pub(crate) fn setting_key(name: &str) -> String {
    format!("{SETTING_PREFIX}{name}")
}

fn segment_key(n: u32) -> String {
    format!("{SEGMENT_PREFIX}{n:08x}")
}

/// The range of map keys that start with `prefix` (which must end in '/': '0' follows '/').
pub(crate) fn prefix_range(prefix: &str) -> std::ops::Range<String> {
    debug_assert!(prefix.ends_with('/'));
    let mut end = prefix[..prefix.len() - 1].to_string();
    end.push('0');
    prefix.to_string()..end
}
