//! A replica: everything one device holds of its account's data, with the operations an app calls,
//! the queries it reads, and the sync surface a transport drives.
//!
//! Sans-IO: every call that needs the time takes `now_ms`; nothing here reads a clock, touches the
//! network or the disk, or draws randomness.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ChangeHash, ScalarValue, transaction::Transactable};

use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId, MessageKey};
use crate::model::account::{AccountDoc, ListFlag};
use crate::model::batch::ChangeBatch;
use crate::model::conversation::{Conversation, member_key, setting_key};
use crate::model::doc::{DocApply, SyncedDoc, Unsaved, VersionVector};
use crate::model::error::ModelError;
use crate::model::hlc::{HlcError, HybridClock, MAX_CLOCK_SKEW_MS};
use crate::model::limits::*;
use crate::model::message::{self, Draft, Message, MessageUpdate, check_len, check_reaction};
use crate::model::query::{
    ConversationSummary, Cursor, MessagePreview, Page, sort_conversation_list,
};
use crate::model::segment::{Segment, SegmentInfo};

/// Tunables of the data model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Messages per segment before a device opens the next one.
    pub segment_cap: usize,
    /// How far ahead of local time a received timestamp may be.
    pub max_clock_skew_ms: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            segment_cap: DEFAULT_SEGMENT_CAP,
            max_clock_skew_ms: MAX_CLOCK_SKEW_MS,
        }
    }
}

/// What applying remote batches did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Per document: changes applied, duplicates ignored, changes still waiting.
    pub docs: Vec<(DocAddr, DocApply)>,
    /// Messages that appeared, per conversation, in conversation order.
    pub new_messages: Vec<(ConversationId, MessageId)>,
    /// Messages that existed and were edited, recalled or reacted to, once per (message, kind).
    pub updated_messages: Vec<(ConversationId, MessageId, MessageUpdate)>,
    /// Documents whose batch was refused, and why. Other documents were still applied.
    pub rejected: Vec<(DocAddr, ModelError)>,
    /// Messages stamped too far in the future: they are shown (every replica must show the same
    /// state), but the local clock did not follow them.
    pub clock_skew: Vec<(MessageId, HlcError)>,
}

/// One device's replica of its account's documents and conversations.
#[derive(Debug)]
pub struct Replica {
    account: AccountId,
    device: DeviceId,
    config: ModelConfig,
    clock: HybridClock,
    account_doc: AccountDoc,
    conversations: BTreeMap<ConversationId, Conversation>,
}

impl Replica {
    /// An empty replica for `device` of `account`.
    pub fn new(
        account: AccountId,
        device: DeviceId,
        config: ModelConfig,
    ) -> Result<Replica, ModelError> {
        if !(MIN_SEGMENT_CAP..=MAX_SEGMENT_CAP).contains(&config.segment_cap) {
            return Err(ModelError::BadConfig {
                field: "segment_cap",
                value: config.segment_cap,
                min: MIN_SEGMENT_CAP,
                max: MAX_SEGMENT_CAP,
            });
        }
        Ok(Replica {
            account,
            device,
            config,
            clock: HybridClock::new(config.max_clock_skew_ms),
            account_doc: AccountDoc::new(account, device),
            conversations: BTreeMap::new(),
        })
    }

    /// This replica's account.
    pub fn account(&self) -> AccountId {
        self.account
    }

    /// This replica's device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The configuration.
    pub fn config(&self) -> ModelConfig {
        self.config
    }

    /// The device clock.
    pub fn clock(&self) -> &HybridClock {
        &self.clock
    }

    /// The device clock, to resume it after a restart.
    pub fn clock_mut(&mut self) -> &mut HybridClock {
        &mut self.clock
    }

    // ---- conversations -------------------------------------------------------------------

    /// Creates a conversation with this account and `others` as members.
    pub fn create_conversation(
        &mut self,
        now_ms: u64,
        title: &str,
        others: &[AccountId],
    ) -> Result<ConversationId, ModelError> {
        check_len("title", title, MAX_TITLE_BYTES)?;
        let mut members: Vec<AccountId> = others.to_vec();
        members.push(self.account);
        members.sort();
        members.dedup();
        if members.len() > MAX_MEMBERS {
            return Err(ModelError::TooLarge {
                field: "members",
                len: members.len(),
                max: MAX_MEMBERS,
            });
        }
        let at = self.clock.tick(now_ms)?;
        let id = ConversationId::derive(&self.device, at);
        if self.conversations.contains_key(&id) {
            return Err(ModelError::ConversationExists(id));
        }
        let mut conversation = Conversation::empty(id, self.device);
        conversation.create(at, title, &members)?;
        self.conversations.insert(id, conversation);
        Ok(id)
    }

    fn conversation(&self, id: &ConversationId) -> Result<&Conversation, ModelError> {
        self.conversations
            .get(id)
            .ok_or(ModelError::UnknownConversation(*id))
    }

    /// A conversation this account is a member of, for writing.
    fn member_conversation(
        &mut self,
        id: &ConversationId,
    ) -> Result<&mut Conversation, ModelError> {
        let account = self.account;
        let c = self
            .conversations
            .get_mut(id)
            .ok_or(ModelError::UnknownConversation(*id))?;
        if !c.is_member(&account) {
            return Err(ModelError::NotMember {
                conversation: *id,
                account,
            });
        }
        Ok(c)
    }

    /// Renames a conversation.
    pub fn set_title(
        &mut self,
        conversation: &ConversationId,
        title: &str,
    ) -> Result<(), ModelError> {
        check_len("title", title, MAX_TITLE_BYTES)?;
        self.member_conversation(conversation)?.write_meta(|tx| {
            tx.put(automerge::ROOT, "title", title)?;
            Ok(())
        })
    }

    /// Adds a member account.
    pub fn add_member(
        &mut self,
        now_ms: u64,
        conversation: &ConversationId,
        account: &AccountId,
    ) -> Result<(), ModelError> {
        let at = self.clock.tick(now_ms)?;
        let c = self.member_conversation(conversation)?;
        if c.is_member(account) {
            return Ok(());
        }
        let count = c.members().len();
        if count >= MAX_MEMBERS {
            return Err(ModelError::TooLarge {
                field: "members",
                len: count + 1,
                max: MAX_MEMBERS,
            });
        }
        c.write_meta(|tx| {
            tx.put(
                automerge::ROOT,
                member_key(account),
                ScalarValue::Uint(at.as_u64()),
            )?;
            Ok(())
        })
    }

    /// Removes a member account (possibly this one: leaving).
    pub fn remove_member(
        &mut self,
        conversation: &ConversationId,
        account: &AccountId,
    ) -> Result<(), ModelError> {
        let c = self.member_conversation(conversation)?;
        if !c.is_member(account) {
            return Ok(());
        }
        c.write_meta(|tx| {
            tx.delete(automerge::ROOT, member_key(account))?;
            Ok(())
        })
    }

    /// Sets a conversation setting (shared by all members).
    pub fn set_setting(
        &mut self,
        conversation: &ConversationId,
        name: &str,
        value: &str,
    ) -> Result<(), ModelError> {
        if name.is_empty() {
            return Err(ModelError::Empty {
                field: "setting name",
            });
        }
        check_len("setting name", name, MAX_SETTING_BYTES)?;
        check_len("setting value", value, MAX_SETTING_BYTES)?;
        self.member_conversation(conversation)?.write_meta(|tx| {
            tx.put(automerge::ROOT, setting_key(name), value)?;
            Ok(())
        })
    }

    // ---- messages ------------------------------------------------------------------------

    /// Sends a message. Returns its id; the message is in this replica's state when this returns.
    /// Messages before one's own latest message do not count as unread (see
    /// [`Replica::unread_count`]), so sending writes nothing to the account document.
    pub fn send(
        &mut self,
        now_ms: u64,
        conversation: &ConversationId,
        draft: &Draft,
    ) -> Result<MessageId, ModelError> {
        draft.validate()?;
        let (account, device, cap) = (self.account, self.device, self.config.segment_cap);
        self.member_conversation(conversation)?;
        let hlc = self.clock.tick(now_ms)?;
        let id = MessageId { hlc, device };
        let c = self.member_conversation(conversation)?;
        c.send(cap, id.key(), &account, draft)?;
        // An own message below what a cached unread count covered (the clock did not follow a
        // message stamped too far ahead) changes that count: count again.
        if c.unread_cache().is_some_and(|u| id.key() <= u.newest) {
            c.forget_unread();
        }
        Ok(id)
    }

    /// The segment holding a message, checked to be by this account and not recalled.
    fn own_message(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<(&mut Conversation, u32), ModelError> {
        let account = self.account;
        let c = self.member_conversation(conversation)?;
        let (n, msg) = find_message(c, id)?;
        if msg.author != account {
            return Err(ModelError::NotAuthor {
                message: *id,
                author: msg.author,
                caller: account,
            });
        }
        if msg.recalled {
            return Err(ModelError::Recalled(*id));
        }
        Ok((c, n))
    }

    /// Replaces the text of one of this account's messages.
    pub fn edit(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
        body: &str,
    ) -> Result<(), ModelError> {
        check_len("body", body, MAX_BODY_BYTES)?;
        if body.is_empty() {
            return Err(ModelError::Empty { field: "body" });
        }
        let (c, n) = self.own_message(conversation, id)?;
        let key = id.key();
        c.segment_mut(n)?.doc_mut().write(|tx| {
            let (obj, _) = message::locate(tx, &key).ok_or(unknown_message(conversation, id))?;
            tx.put(&obj, message::BODY, body)?;
            tx.put(&obj, message::EDITED, true)?;
            Ok(())
        })
    }

    /// Recalls (deletes for everyone) one of this account's messages: its text and attachments
    /// are removed from the current state of every replica. Recalling twice is not an error.
    pub fn recall(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<(), ModelError> {
        let (c, n) = match self.own_message(conversation, id) {
            Err(ModelError::Recalled(_)) => return Ok(()),
            other => other?,
        };
        let key = id.key();
        c.segment_mut(n)?.doc_mut().write(|tx| {
            let (obj, _) = message::locate(tx, &key).ok_or(unknown_message(conversation, id))?;
            message::strip_content(tx, &obj)?;
            tx.put(&obj, message::RECALLED, true)?;
            Ok(())
        })
    }

    /// Adds (`on`) or removes this account's `reaction` on a message.
    pub fn react(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
        reaction: &str,
        on: bool,
    ) -> Result<(), ModelError> {
        check_reaction(reaction)?;
        let account = self.account;
        let c = self.member_conversation(conversation)?;
        let key = id.key();
        let (n, msg) = find_message(c, id)?;
        if msg.recalled && on {
            return Err(ModelError::Recalled(*id));
        }
        let present = msg
            .reactions
            .iter()
            .any(|r| r.reaction == reaction && r.accounts.contains(&account));
        if present == on {
            return Ok(());
        }
        let slot = message::reaction_key(&account, reaction);
        c.segment_mut(n)?.doc_mut().write(|tx| {
            let (obj, _) = message::locate(tx, &key).ok_or(unknown_message(conversation, id))?;
            if on {
                tx.put(&obj, slot, true)?;
            } else {
                tx.delete(&obj, slot)?;
            }
            Ok(())
        })
    }

    // ---- account state -------------------------------------------------------------------

    /// Marks everything up to and including `upto` as read on this device.
    pub fn mark_read(
        &mut self,
        conversation: &ConversationId,
        upto: &MessageId,
    ) -> Result<(), ModelError> {
        self.conversation(conversation)?;
        let device = self.device;
        self.account_doc
            .advance_read(conversation, &device, upto.key())
            .map(|_| ())
    }

    /// Sets or clears (empty text) the draft of a conversation; synced to this account's devices.
    pub fn set_draft(
        &mut self,
        conversation: &ConversationId,
        text: &str,
    ) -> Result<(), ModelError> {
        check_len("draft", text, MAX_DRAFT_BYTES)?;
        self.conversation(conversation)?;
        self.account_doc.set_draft(conversation, text)
    }

    /// Pins, mutes or archives a conversation (or undoes it) on all of this account's devices.
    pub fn set_flag(
        &mut self,
        conversation: &ConversationId,
        flag: ListFlag,
        on: bool,
    ) -> Result<(), ModelError> {
        self.conversation(conversation)?;
        self.account_doc.set_flag(conversation, flag, on)
    }

    /// Hides a message on all of this account's devices ("delete for me").
    pub fn hide_message(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<(), ModelError> {
        let c = self.conversation(conversation)?;
        if c.locate(&id.key())?.is_none() {
            return Err(unknown_message(conversation, id));
        }
        c.forget_unread();
        self.account_doc.hide(conversation, &id.key())
    }

    // ---- queries -------------------------------------------------------------------------

    /// Ids of every conversation this replica holds, in id order.
    pub fn conversation_ids(&self) -> Vec<ConversationId> {
        self.conversations.keys().copied().collect()
    }

    /// Whether this replica holds a conversation (its meta document is loaded).
    pub fn has_conversation(&self, conversation: &ConversationId) -> bool {
        self.conversations.contains_key(conversation)
    }

    /// Whether a conversation's meta document has arrived (it is listed only then).
    pub fn has_meta(&self, conversation: &ConversationId) -> bool {
        self.conversations
            .get(conversation)
            .is_some_and(Conversation::has_meta)
    }

    /// The conversation list: pinned first, then by last activity (newest first), then by id.
    /// Conversations whose meta document has not arrived yet are left out.
    pub fn conversation_list(&self) -> Result<Vec<ConversationSummary>, ModelError> {
        let mut list = self
            .conversations
            .values()
            .filter(|c| c.has_meta())
            .map(|c| self.summary(c))
            .collect::<Result<Vec<_>, _>>()?;
        sort_conversation_list(&mut list);
        Ok(list)
    }

    fn summary(&self, c: &Conversation) -> Result<ConversationSummary, ModelError> {
        let id = c.id();
        let last = c.page_keys(None, 1, |k| !self.account_doc.is_hidden(&id, k))?;
        let last_message = last
            .first()
            .and_then(|(k, n)| c.segment(*n)?.message(id, k))
            .map(|m| MessagePreview::of(&m));
        let created = c.created().unwrap_or_default();
        Ok(ConversationSummary {
            id,
            title: c.title(),
            member_count: c.members().len(),
            is_member: c.is_member(&self.account),
            pinned: self.account_doc.flag(&id, ListFlag::Pinned),
            muted: self.account_doc.flag(&id, ListFlag::Muted),
            archived: self.account_doc.flag(&id, ListFlag::Archived),
            draft: self.account_doc.draft(&id),
            last_activity: last_message
                .as_ref()
                .map_or(created, |m| m.id.hlc.max(created)),
            unread: self.unread_in(c)?,
            last_message,
        })
    }

    /// One conversation's summary, as in the list.
    pub fn conversation_summary(
        &self,
        conversation: &ConversationId,
    ) -> Result<ConversationSummary, ModelError> {
        self.summary(self.conversation(conversation)?)
    }

    /// The list flags and draft of a conversation, from the account document alone: what a
    /// stored summary must be refreshed with, since they change without the conversation.
    pub fn refresh_account_fields(&self, summary: &mut ConversationSummary) {
        let id = summary.id;
        summary.pinned = self.account_doc.flag(&id, ListFlag::Pinned);
        summary.muted = self.account_doc.flag(&id, ListFlag::Muted);
        summary.archived = self.account_doc.flag(&id, ListFlag::Archived);
        summary.draft = self.account_doc.draft(&id);
    }

    /// The segment documents a conversation's meta document lists (segment 0 is always one).
    pub fn segment_numbers(&self, conversation: &ConversationId) -> Result<Vec<u32>, ModelError> {
        let c = self.conversation(conversation)?;
        let mut numbers = c.indexed_segments();
        if !numbers.contains(&0) {
            numbers.insert(0, 0);
        }
        Ok(numbers)
    }

    /// Current members of a conversation.
    pub fn members(&self, conversation: &ConversationId) -> Result<Vec<AccountId>, ModelError> {
        Ok(self.conversation(conversation)?.members())
    }

    /// Settings of a conversation, in name order.
    pub fn settings(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<(String, String)>, ModelError> {
        Ok(self.conversation(conversation)?.settings())
    }

    /// Messages from other accounts that are neither recalled nor hidden, after both the
    /// account's read position and this account's own latest message (writing implies having
    /// read what came before).
    pub fn unread_count(&self, conversation: &ConversationId) -> Result<u64, ModelError> {
        self.unread_in(self.conversation(conversation)?)
    }

    /// The unread count computed from scratch, ignoring the cache: what tests compare with.
    #[cfg(test)]
    pub(crate) fn unread_count_uncached(&self, conversation: &ConversationId) -> u64 {
        let c = self
            .conversation(conversation)
            .expect("a known conversation");
        let saved = c.unread_cache();
        c.forget_unread();
        let n = self.unread_in(c).expect("loaded");
        c.set_unread_cache(saved);
        n
    }

    fn unread_in(&self, c: &Conversation) -> Result<u64, ModelError> {
        let id = c.id();
        let read = self
            .account_doc
            .read_position(&id)
            .unwrap_or(MessageKey::MIN);
        // Newest first, stopping at this account's own latest message: whoever writes has read
        // what came before. That keeps sending free of account-document writes and makes the
        // count cost proportional to the unread messages, not to the history.
        // A count cached from the same read position covers everything up to its newest key:
        // only what arrived since is walked (arrivals below it, recalls and hides drop the
        // cache, see `apply_doc` and `hide_message`).
        let cached = c.unread_cache().filter(|u| u.read == read);
        let from = cached.map_or(read, |u| u.newest);
        let mut unread = 0u64;
        let mut own = false;
        let mut newest = None;
        c.visit_after_desc(from, |k, s| {
            newest.get_or_insert(*k);
            if self.account_doc.is_hidden(&id, k) {
                return true;
            }
            match message::author_and_recalled(s.doc().doc(), k) {
                Some((author, _)) if author == self.account => {
                    own = true;
                    false
                }
                Some((_, false)) => {
                    unread += 1;
                    true
                }
                _ => true,
            }
        })?;
        if !own {
            unread += cached.map_or(0, |u| u.count);
        }
        c.set_unread_cache(Some(crate::model::conversation::UnreadCache {
            read,
            newest: newest.unwrap_or(from),
            count: unread,
        }));
        Ok(unread)
    }

    /// The account's read position in a conversation (the furthest of its devices').
    pub fn read_position(&self, conversation: &ConversationId) -> Option<MessageKey> {
        self.account_doc.read_position(conversation)
    }

    /// Read positions of every conversation mentioned in the account document.
    pub fn read_positions(&self) -> BTreeMap<ConversationId, MessageKey> {
        self.account_doc.all_read_positions()
    }

    /// What conversation summaries depend on in the account document (see
    /// [`AccountDoc::digest`]).
    pub fn account_digest(&self) -> BTreeMap<ConversationId, (Option<MessageKey>, u32)> {
        self.account_doc.digest()
    }

    /// Whether a segment is in memory.
    pub fn is_segment_loaded(&self, conversation: &ConversationId, n: u32) -> bool {
        self.conversations
            .get(conversation)
            .is_some_and(|c| c.segment(n).is_some())
    }

    /// Loaded segments: conversation, number and message count.
    pub fn loaded_segments(&self) -> Vec<(ConversationId, u32, usize)> {
        self.conversations
            .values()
            .flat_map(|c| c.segments().map(move |s| (c.id(), s.number(), s.len())))
            .collect()
    }

    /// The draft of a conversation.
    pub fn draft(&self, conversation: &ConversationId) -> Option<String> {
        self.account_doc.draft(conversation)
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) messages older than `before` (the newest if `None`),
    /// in conversation order, without the ones this account hid; and a cursor for the page before.
    pub fn history(
        &self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, ModelError> {
        self.history_without(conversation, before, limit, &BTreeSet::new())
    }

    /// [`Self::history`] with the segments numbered in `absent` left out (not held here, e.g.
    /// evicted from the disk); the page is marked incomplete when one of them lies within its
    /// range.
    pub fn history_without(
        &self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
        absent: &BTreeSet<u32>,
    ) -> Result<Page, ModelError> {
        if limit > MAX_PAGE {
            return Err(ModelError::TooLarge {
                field: "page limit",
                len: limit,
                max: MAX_PAGE,
            });
        }
        let c = self.conversation(conversation)?;
        let (keys, gap) = c.page_keys_without(
            before.map(|b| b.0),
            limit,
            |k| !self.account_doc.is_hidden(conversation, k),
            absent,
        )?;
        let mut messages: Vec<Message> = keys
            .iter()
            .filter_map(|(k, n)| c.segment(*n)?.message(*conversation, k))
            .collect();
        messages.reverse();
        let next = match messages.first() {
            Some(oldest) if keys.len() == limit && c.has_older(&oldest.id.key()) => {
                Some(Cursor(oldest.id.key()))
            }
            _ => None,
        };
        Ok(Page {
            messages,
            next,
            incomplete: gap,
        })
    }

    /// One message, hidden or not.
    pub fn message(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<Message, ModelError> {
        let c = self.conversation(conversation)?;
        c.message(&id.key())?
            .filter(|m| m.id == *id)
            .ok_or(unknown_message(conversation, id))
    }

    // ---- sync surface --------------------------------------------------------------------

    /// Every document loaded in memory (the account document, every loaded conversation's meta
    /// document and its loaded segments).
    pub fn docs(&self) -> Vec<DocAddr> {
        let mut out = vec![DocAddr::Account(self.account)];
        for c in self.conversations.values() {
            out.push(DocAddr::Meta(c.id()));
            out.extend(c.segments().map(|s| DocAddr::Segment(c.id(), s.number())));
        }
        out
    }

    /// A held document, for inspection (tests, diagnostics, persistence).
    pub fn synced_doc(&self, addr: &DocAddr) -> Option<&SyncedDoc> {
        self.synced(addr)
    }

    fn synced(&self, addr: &DocAddr) -> Option<&SyncedDoc> {
        match addr {
            DocAddr::Account(a) if *a == self.account => Some(self.account_doc.doc()),
            DocAddr::Account(_) => None,
            DocAddr::Meta(c) => Some(self.conversations.get(c)?.meta()),
            DocAddr::Segment(c, n) => Some(self.conversations.get(c)?.segment(*n)?.doc()),
        }
    }

    fn synced_mut(&mut self, addr: &DocAddr) -> Option<&mut SyncedDoc> {
        match addr {
            DocAddr::Account(a) if *a == self.account => Some(self.account_doc.doc_mut()),
            DocAddr::Account(_) => None,
            DocAddr::Meta(c) => Some(self.conversations.get_mut(c)?.meta_mut()),
            DocAddr::Segment(c, n) => Some(
                self.conversations
                    .get_mut(c)?
                    .segment_mut(*n)
                    .ok()?
                    .doc_mut(),
            ),
        }
    }

    /// Takes, for every loaded document with changes not yet stored, what a store must write
    /// (see [`Unsaved`]). A store calls this after each operation or apply and writes the result
    /// in one transaction: only then is the operation durable.
    pub fn take_unsaved(&mut self) -> Vec<(DocAddr, Unsaved)> {
        let mut out = Vec::new();
        for addr in self.docs() {
            if let Some(doc) = self.synced_mut(&addr) {
                if doc.has_unsaved() {
                    out.push((addr, doc.take_unsaved()));
                }
            }
        }
        out
    }

    /// The whole document in Automerge's compact format, if it is loaded.
    pub fn save_doc(&self, addr: &DocAddr) -> Option<Vec<u8>> {
        self.synced(addr).map(SyncedDoc::save)
    }

    /// What is known of a segment: loaded or not.
    pub fn segment_info(&self, conversation: &ConversationId, n: u32) -> Option<SegmentInfo> {
        let c = self.conversations.get(conversation)?;
        c.segment(n)
            .map(Segment::info)
            .or_else(|| c.unloaded().get(&n).copied())
    }

    /// Installs the account document loaded from storage, replacing the empty one.
    pub fn load_account(&mut self, doc: SyncedDoc) -> Result<(), ModelError> {
        if doc.addr() != DocAddr::Account(self.account) {
            return Err(ModelError::WrongDocument { addr: doc.addr() });
        }
        self.account_doc = AccountDoc::from_doc(doc);
        Ok(())
    }

    /// Installs a conversation loaded from storage: its meta document and what is known of its
    /// segments, none of them loaded.
    pub fn load_conversation(
        &mut self,
        meta: SyncedDoc,
        segments: BTreeMap<u32, SegmentInfo>,
    ) -> Result<ConversationId, ModelError> {
        let c = Conversation::from_parts(meta, segments, self.device)?;
        let id = c.id();
        self.conversations.insert(id, c);
        Ok(id)
    }

    /// Installs a segment whole from a compacted save (a snapshot), instead of applying its
    /// changes one by one — several times faster — when this replica holds none of the
    /// segment's changes. Returns `false` (and changes nothing) if it holds some: then the
    /// changes must be applied. The save is stored as the segment's first chunk. The caller
    /// checks the changes first; no per-message report is made (the conversation's unread
    /// count is recounted).
    pub fn install_segment(&mut self, addr: &DocAddr, save: &[u8]) -> Result<bool, ModelError> {
        self.install_loaded_segment(addr, || Ok(automerge::Automerge::load(save)?), save)
    }

    /// [`Self::install_segment`] with the save's loaded document from `loaded` (called only
    /// when the segment is installed), so a caller that loaded it already does not load it
    /// twice.
    pub fn install_loaded_segment(
        &mut self,
        addr: &DocAddr,
        loaded: impl FnOnce() -> Result<automerge::Automerge, ModelError>,
        save: &[u8],
    ) -> Result<bool, ModelError> {
        let DocAddr::Segment(c, n) = *addr else {
            return Err(ModelError::WrongDocument { addr: *addr });
        };
        let me = self.device;
        let conversation = self
            .conversations
            .get_mut(&c)
            .ok_or(ModelError::UnknownConversation(c))?;
        if !conversation
            .segment_mut(n)?
            .doc()
            .version_vector()
            .is_empty()
        {
            return Ok(false);
        }
        let doc = SyncedDoc::from_loaded_save(*addr, me, loaded()?, save)?;
        conversation.insert_segment(Segment::from_doc(n, doc));
        conversation.forget_unread();
        Ok(true)
    }

    /// Installs a segment loaded from storage.
    pub fn load_segment(&mut self, doc: SyncedDoc) -> Result<(), ModelError> {
        let DocAddr::Segment(c, n) = doc.addr() else {
            return Err(ModelError::WrongDocument { addr: doc.addr() });
        };
        let conversation = self
            .conversations
            .get_mut(&c)
            .ok_or(ModelError::UnknownConversation(c))?;
        conversation.insert_segment(Segment::from_doc(n, doc));
        Ok(())
    }

    /// Drops a segment from memory (it must have nothing unsaved); `None` if it was not loaded.
    pub fn unload_segment(
        &mut self,
        conversation: &ConversationId,
        n: u32,
    ) -> Result<Option<SegmentInfo>, ModelError> {
        self.conversations
            .get_mut(conversation)
            .ok_or(ModelError::UnknownConversation(*conversation))?
            .unload(n)
    }

    /// What this replica holds of a document: {device → last sequence number}.
    pub fn version_vector(&self, addr: &DocAddr) -> VersionVector {
        self.synced(addr)
            .map(SyncedDoc::version_vector)
            .unwrap_or_default()
    }

    /// The heads of a document (empty if not held).
    pub fn heads(&self, addr: &DocAddr) -> Vec<ChangeHash> {
        self.synced(addr).map(SyncedDoc::heads).unwrap_or_default()
    }

    /// The changes of a document that a replica at `have` lacks, or `None` if there are none.
    /// The batch can exceed what one encoded batch may hold: split it with
    /// [`ChangeBatch::split`] before encoding.
    pub fn changes_since(&self, addr: &DocAddr, have: &VersionVector) -> Option<ChangeBatch> {
        let changes = self.synced(addr)?.changes_since(have);
        (!changes.is_empty()).then_some(ChangeBatch {
            addr: *addr,
            changes,
        })
    }

    /// The changes of a document that are not ancestors of `heads`, or `None` if there are none.
    /// As with [`Replica::changes_since`], split the batch before encoding.
    pub fn changes_since_heads(&self, addr: &DocAddr, heads: &[ChangeHash]) -> Option<ChangeBatch> {
        let changes = self.synced(addr)?.changes_since_heads(heads);
        (!changes.is_empty()).then_some(ChangeBatch {
            addr: *addr,
            changes,
        })
    }

    /// Applies remote batches: all the changes for one document go to Automerge in one call,
    /// whatever the number of batches they came in. A refused document does not stop the others.
    pub fn apply(&mut self, now_ms: u64, batches: Vec<ChangeBatch>) -> ApplyReport {
        let mut grouped: BTreeMap<DocAddr, Vec<automerge::Change>> = BTreeMap::new();
        for b in batches {
            grouped.entry(b.addr).or_default().extend(b.changes);
        }
        let mut report = ApplyReport::default();
        for (addr, changes) in grouped {
            match self.apply_doc(now_ms, addr, changes, &mut report) {
                Ok(stats) => {
                    for (_, seq, reason) in &stats.refused {
                        report.rejected.push((
                            addr,
                            ModelError::MalformedChange {
                                doc: addr,
                                seq: *seq,
                                reason,
                            },
                        ));
                    }
                    report.docs.push((addr, stats));
                }
                Err(e) => report.rejected.push((addr, e)),
            }
        }
        // Each segment lists its own new messages in order, but the key ranges of segments
        // overlap when devices wrote offline, so the whole list is put in conversation order.
        report.new_messages.sort();
        report
    }

    fn apply_doc(
        &mut self,
        now_ms: u64,
        addr: DocAddr,
        changes: Vec<automerge::Change>,
        report: &mut ApplyReport,
    ) -> Result<DocApply, ModelError> {
        let me = self.device;
        match addr {
            DocAddr::Account(a) => {
                if a != self.account {
                    return Err(ModelError::ForeignAccount {
                        expected: self.account,
                        got: a,
                    });
                }
                // Read positions and hidden messages may have changed.
                for c in self.conversations.values() {
                    c.forget_unread();
                }
                self.account_doc.doc_mut().apply(changes)
            }
            DocAddr::Meta(c) => self
                .conversations
                .entry(c)
                .or_insert_with(|| Conversation::empty(c, me))
                .meta_mut()
                .apply(changes),
            DocAddr::Segment(c, n) => {
                let conversation = self
                    .conversations
                    .entry(c)
                    .or_insert_with(|| Conversation::empty(c, me));
                let segment = conversation.segment_mut(n)?;
                let stats = segment.doc_mut().apply(changes)?;
                if stats.applied == 0 {
                    return Ok(stats);
                }
                let touched = segment.doc_mut().take_touched();
                let new_ids = segment.reindex_keys(&touched.root_keys);
                // A cached unread count stays right only if nothing arrived below what it
                // covered and nothing it covered was recalled.
                if let Some(cache) = conversation.unread_cache() {
                    let recalled = touched
                        .updates
                        .iter()
                        .any(|(_, u)| *u == MessageUpdate::Recalled);
                    if recalled || new_ids.iter().any(|id| id.key() <= cache.newest) {
                        conversation.forget_unread();
                    }
                }
                let segment = conversation.segment_mut(n)?;
                for id in new_ids {
                    if let Err(e) = self.clock.observe(id.hlc, now_ms) {
                        report.clock_skew.push((id, e));
                    }
                    report.new_messages.push((c, id));
                }
                // An edit concurrent with a recall writes the text back. The author's devices
                // remove it again, so that a recalled text leaves the current state everywhere
                // once they have seen both.
                let account = self.account;
                for (obj, update) in &touched.updates {
                    if let Some(id) = message_at(segment.doc().doc(), obj) {
                        let entry = (c, id, *update);
                        if !report.updated_messages.contains(&entry) {
                            report.updated_messages.push(entry);
                        }
                    }
                }
                let stale: Vec<automerge::ObjId> = touched
                    .content
                    .into_iter()
                    .filter(|obj| {
                        message::recalled_with_content(segment.doc().doc(), obj, &account)
                    })
                    .collect();
                let mut stats = stats;
                if !stale.is_empty() {
                    segment.doc_mut().write(|tx| {
                        for obj in &stale {
                            message::strip_content(tx, obj)?;
                        }
                        Ok(())
                    })?;
                    stats.repairs += 1;
                }
                Ok(stats)
            }
        }
    }
}

/// The id of the message stored in map `obj` at the root of a segment document.
fn message_at(doc: &automerge::Automerge, obj: &automerge::ObjId) -> Option<MessageId> {
    use automerge::ReadDoc;
    let parent = doc.parents(obj).ok()?.next()?;
    let automerge::Prop::Map(key) = parent.prop else {
        return None;
    };
    let key = MessageKey::decode(&key)?;
    let (_, device) = message::locate(doc, &key)?;
    let id = MessageId {
        hlc: key.hlc,
        device,
    };
    (id.key() == key).then_some(id)
}

/// The error for a message a conversation does not have.
fn unknown_message(conversation: &ConversationId, id: &MessageId) -> ModelError {
    ModelError::UnknownMessage {
        conversation: *conversation,
        message: *id,
    }
}

/// The segment and current state of a message.
fn find_message(c: &Conversation, id: &MessageId) -> Result<(u32, Message), ModelError> {
    let key = id.key();
    let n = c.locate(&key)?;
    let msg = c.message(&key)?;
    match (n, msg) {
        (Some(n), Some(msg)) if msg.id == *id => Ok((n, msg)),
        _ => Err(unknown_message(&c.id(), id)),
    }
}
