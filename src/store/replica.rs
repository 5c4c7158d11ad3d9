//! A replica backed by the device store: the model's operations, made durable, with a bounded
//! cache of loaded segments.
//!
//! Every operation runs against the in-memory [`Replica`]. When the model answers
//! [`ModelError::NotLoaded`] (or does not know a conversation that is stored), the document is
//! loaded from the store and the operation retried; the model guarantees that a refused operation
//! changed nothing. After the operation, everything it changed — change chunks, the segment key
//! ranges, the summaries of the conversations it touched, the clock — is written in one
//! transaction. Only then does the call return, so a returned operation is durable.
//!
//! Memory is bounded by a budget for loaded segments: after each call the least recently used
//! segments are dropped from memory until the estimate fits. The conversation list is read from
//! stored summaries, so it opens without loading any conversation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use automerge::Change;

use crate::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId};
use crate::model::hlc::Hlc;
use crate::model::{
    ApplyReport, ChangeBatch, ConversationSummary, Cursor, Draft, ListFlag, Message, ModelConfig,
    ModelError, Page, Replica, SegmentInfo, SyncedDoc,
};
use crate::store::db::{Durability, Store, StoreError, StoreTx, StoredDoc};
use crate::store::seal::StorageKey;
use crate::store::summary::{self, SummaryError};

/// Estimated memory of one loaded message, in bytes: Automerge holds 250–1,200 B per message
/// once loaded (see `docs/PERFORMANCE.md`), plus the key index.
pub const BYTES_PER_LOADED_MESSAGE: usize = 1_024;
/// Estimated fixed memory of one loaded segment, in bytes.
pub const BYTES_PER_LOADED_SEGMENT: usize = 16 * 1024;
/// Default memory budget for loaded segments.
pub const DEFAULT_CACHE_BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// Writes between two checks of the disk budget: measuring the stored content is a query over
/// every document, too much for every send.
pub const DISK_CHECK_EVERY_WRITES: u64 = 64;
/// Loads one operation may trigger before it is refused: enough to page across every segment of
/// a very long conversation, small enough to stop a loop on a store that keeps failing.
pub const MAX_LOADS_PER_OPERATION: usize = 4_096;

/// Settings of a stored replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The data model's tunables.
    pub model: ModelConfig,
    /// Memory budget for loaded segment documents, estimated (see [`BYTES_PER_LOADED_MESSAGE`]).
    pub cache_budget_bytes: usize,
    /// How hard each commit waits for the disk.
    pub durability: Durability,
    /// Optional budget for stored content, in bytes. Past it, the segments holding the oldest
    /// messages are dropped from the disk and marked evicted, until the content fits or only
    /// what must stay is left (account and meta documents, each conversation's newest segment,
    /// segments in memory). Reading an evicted segment fails with [`ReplicaStoreError::Evicted`]
    /// until it is fetched again; its version vector is cleared so that a sync offers it again.
    /// Checked every [`DISK_CHECK_EVERY_WRITES`] writes, so the content may exceed the budget by
    /// what those writes add.
    pub disk_budget_bytes: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            model: ModelConfig::default(),
            cache_budget_bytes: DEFAULT_CACHE_BUDGET_BYTES,
            durability: Durability::Full,
            disk_budget_bytes: None,
        }
    }
}

/// Errors of a stored replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaStoreError {
    /// The model refused the operation.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored summary is malformed.
    #[error("stored conversation summary: {0}")]
    Summary(#[from] SummaryError),
    /// The document was evicted from the disk budget; it must be fetched from a relay again.
    #[error("{0:?} was evicted from local storage and must be fetched again")]
    Evicted(DocAddr),
    /// The store belongs to another account or device.
    #[error("this store belongs to account {account} device {device:?}")]
    IdentityMismatch {
        /// The store's account.
        account: AccountId,
        /// The store's device.
        device: DeviceId,
    },
    /// [`StoredReplica::adopt`] needs an empty store.
    #[error("the store already holds documents")]
    NotEmpty,
    /// An operation needed more document loads than allowed.
    #[error("operation needed more than {max} document loads")]
    TooManyLoads {
        /// The limit.
        max: usize,
    },
    /// The cache budget cannot hold even one full segment.
    #[error(
        "cache budget {budget} bytes is below the minimum {min} for segments of {cap} messages"
    )]
    BudgetTooSmall {
        /// The configured budget.
        budget: usize,
        /// The minimum.
        min: usize,
        /// The segment cap.
        cap: usize,
    },
}

type Result<T> = std::result::Result<T, ReplicaStoreError>;

/// Writes a caller adds to the transaction of a flush.
type ExtraWrites<'a> = dyn FnMut(&mut StoreTx<'_>) -> std::result::Result<(), StoreError> + 'a;

/// A [`Replica`] whose every operation is durable in a [`Store`].
#[derive(Debug)]
pub struct StoredReplica {
    store: Store,
    replica: Replica,
    config: StoreConfig,
    /// Last use of each loaded segment.
    last_used: HashMap<(ConversationId, u32), u64>,
    tick: u64,
    /// Writes since the disk budget was last checked.
    writes_since_disk_check: u64,
    /// What conversation summaries depend on in the account document, as last stored.
    digest: BTreeMap<ConversationId, (Option<crate::ids::MessageKey>, u32)>,
    /// Documents written since the last [`StoredReplica::take_written`].
    written: BTreeSet<DocAddr>,
    /// While set, operations change memory only until [`StoredReplica::flush`].
    deferred: bool,
}

fn estimate(count: usize) -> usize {
    BYTES_PER_LOADED_SEGMENT + count * BYTES_PER_LOADED_MESSAGE
}

impl StoredReplica {
    /// Opens the store at `path` for `device` of `account`, creating it if needed. Loads only the
    /// account document.
    pub fn open(
        path: &Path,
        key: &StorageKey,
        account: AccountId,
        device: DeviceId,
        config: StoreConfig,
    ) -> Result<StoredReplica> {
        let min = 2 * estimate(config.model.segment_cap);
        if config.cache_budget_bytes < min {
            return Err(ReplicaStoreError::BudgetTooSmall {
                budget: config.cache_budget_bytes,
                min,
                cap: config.model.segment_cap,
            });
        }
        let mut store = Store::open(path, key, config.durability)?;
        let mut identity = Vec::with_capacity(64);
        identity.extend_from_slice(account.as_bytes());
        identity.extend_from_slice(device.as_bytes());
        match store.setting("identity")? {
            Some(found) if found == identity => {}
            Some(found) if found.len() == 64 => {
                return Err(ReplicaStoreError::IdentityMismatch {
                    account: AccountId::from_bytes(found[..32].try_into().expect("64 bytes")),
                    device: DeviceId::from_bytes(found[32..].try_into().expect("64 bytes")),
                });
            }
            Some(_) => return Err(StoreError::Malformed { what: "identity" }.into()),
            None => store.write(|tx| tx.put_setting("identity", &identity))?,
        }
        let mut replica = Replica::new(account, device, config.model)?;
        if let Some(clock) = store.setting("clock")? {
            let bytes: [u8; 8] = clock
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Malformed { what: "clock" })?;
            replica
                .clock_mut()
                .resume(Hlc::from_u64(u64::from_be_bytes(bytes)));
        }
        let addr = DocAddr::Account(account);
        if let Some(stored) = store.load_doc(&addr)? {
            replica.load_account(synced_doc(addr, device, stored)?)?;
        }
        let digest = replica.account_digest();
        Ok(StoredReplica {
            store,
            replica,
            config,
            last_used: HashMap::new(),
            tick: 0,
            writes_since_disk_check: 0,
            digest,
            written: BTreeSet::new(),
            deferred: false,
        })
    }

    /// The in-memory replica, for queries that need no loading (ids, clock, config).
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The store, for the sync bookkeeping (outbox, cursors) the engine keeps.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Estimated memory held by loaded segments.
    pub fn cache_bytes(&self) -> usize {
        self.replica
            .loaded_segments()
            .iter()
            .map(|(_, _, count)| estimate(*count))
            .sum()
    }

    /// Stores an in-memory replica into a new, empty store at `path`: every document becomes a
    /// snapshot, with segment ranges, conversation summaries and the clock. For a device whose
    /// history was built elsewhere (a bulk import, a migration, a test fixture).
    pub fn adopt(
        path: &Path,
        key: &StorageKey,
        replica: Replica,
        config: StoreConfig,
    ) -> Result<StoredReplica> {
        let (account, device) = (replica.account(), replica.device());
        let mut stored = StoredReplica::open(path, key, account, device, config)?;
        if !stored.store.all_docs()?.is_empty() {
            return Err(ReplicaStoreError::NotEmpty);
        }
        stored.replica = replica;
        // Everything is written from snapshots below; the change chunks are not needed.
        drop(stored.replica.take_unsaved());
        let mut summaries = Vec::new();
        for c in stored.replica.conversation_ids() {
            if stored.replica.has_meta(&c) {
                summaries.push(stored.replica.conversation_summary(&c)?);
            }
        }
        let docs = stored.replica.docs();
        let clock = stored.replica.clock().last().as_u64().to_be_bytes();
        let replica = &stored.replica;
        stored.store.write(|tx| {
            for addr in &docs {
                if let Some(snapshot) = replica.save_doc(addr) {
                    tx.compact(addr, &snapshot)?;
                    tx.put_version_vector(addr, &replica.version_vector(addr).encode())?;
                }
                if let DocAddr::Segment(c, n) = addr {
                    if let Some(info) = replica.segment_info(c, *n) {
                        tx.put_info(addr, &info.encode())?;
                    }
                }
            }
            for s in &summaries {
                tx.put_summary(&s.id, &summary::encode(s))?;
            }
            tx.put_setting("clock", &clock)
        })?;
        stored.digest = stored.replica.account_digest();
        stored.shrink_cache()?;
        Ok(stored)
    }

    // ---- loading -------------------------------------------------------------------------

    fn touch(&mut self, c: ConversationId, n: u32) {
        self.tick += 1;
        self.last_used.insert((c, n), self.tick);
    }

    /// Loads a conversation's meta document and segment infos if it is stored but not loaded.
    /// Returns whether the conversation is now loaded.
    fn ensure_conversation(&mut self, c: ConversationId) -> Result<bool> {
        if self.replica.has_conversation(&c) {
            return Ok(true);
        }
        let device = self.replica.device();
        let addr = DocAddr::Meta(c);
        let segments = self.store.conversation_segments(&c)?;
        let meta = match self.store.load_doc(&addr)? {
            Some(stored) => synced_doc(addr, device, stored)?,
            None if segments.is_empty() => return Ok(false),
            None => SyncedDoc::new(addr, device),
        };
        let mut infos = BTreeMap::new();
        let mut unknown = Vec::new();
        for (n, info) in segments {
            match info.as_deref().and_then(SegmentInfo::decode) {
                Some(i) => {
                    infos.insert(n, i);
                }
                None => unknown.push(n),
            }
        }
        self.replica.load_conversation(meta, infos)?;
        // A segment stored without its info (written before info was recorded) is loaded now so
        // that queries know its range.
        for n in unknown {
            self.load(DocAddr::Segment(c, n))?;
        }
        Ok(true)
    }

    fn load(&mut self, addr: DocAddr) -> Result<()> {
        match addr {
            DocAddr::Segment(c, n) => {
                if !self.ensure_conversation(c)? {
                    return Err(ModelError::UnknownConversation(c).into());
                }
                let doc = match self.store.load_doc(&addr)? {
                    Some(stored) if stored.evicted => return Err(ReplicaStoreError::Evicted(addr)),
                    Some(stored) => synced_doc(addr, self.replica.device(), stored)?,
                    None => SyncedDoc::new(addr, self.replica.device()),
                };
                self.replica.load_segment(doc)?;
                self.touch(c, n);
                Ok(())
            }
            DocAddr::Meta(c) => {
                self.ensure_conversation(c)?;
                Ok(())
            }
            // The account document is loaded at open.
            _ => Ok(()),
        }
    }

    /// Runs a model call, loading what it asks for, then stores what it changed.
    fn run<T>(
        &mut self,
        mut op: impl FnMut(&mut Replica) -> std::result::Result<T, ModelError>,
    ) -> Result<T> {
        let mut loads = 0;
        let out = loop {
            match op(&mut self.replica) {
                Err(ModelError::NotLoaded(addr)) if loads < MAX_LOADS_PER_OPERATION => {
                    self.load(addr)?;
                }
                Err(ModelError::UnknownConversation(c)) if loads < MAX_LOADS_PER_OPERATION => {
                    if !self.ensure_conversation(c)? {
                        break Err(ModelError::UnknownConversation(c).into());
                    }
                }
                Err(ModelError::NotLoaded(_)) | Err(ModelError::UnknownConversation(_)) => {
                    break Err(ReplicaStoreError::TooManyLoads {
                        max: MAX_LOADS_PER_OPERATION,
                    });
                }
                other => break other.map_err(ReplicaStoreError::from),
            }
            loads += 1;
        };
        // A refused operation changed nothing, but loads may have; storing is cheap when idle.
        if !self.deferred {
            self.flush()?;
        }
        out
    }

    /// Group commit: while `on`, operations change memory only, and nothing is durable until
    /// [`StoredReplica::flush`], which stores everything in one transaction. A caller must not
    /// report an operation as done before that flush returned.
    pub fn defer_writes(&mut self, on: bool) {
        self.deferred = on;
    }

    /// Stores everything changed in memory (one transaction), then trims the cache and the
    /// disk to their budgets.
    pub fn flush(&mut self) -> Result<()> {
        self.persist(None)?;
        self.shrink_cache()?;
        self.shrink_disk()
    }

    /// [`StoredReplica::flush`], with `extra` writes of the caller (its outbox, say) in the same
    /// transaction.
    pub fn flush_with(
        &mut self,
        mut extra: impl FnMut(&mut StoreTx<'_>) -> std::result::Result<(), StoreError>,
    ) -> Result<()> {
        self.persist(Some(&mut extra))?;
        // The commit is done: what follows is upkeep, and its failure must not make a caller
        // believe stored operations were lost.
        if let Err(e) = self.shrink_cache().and_then(|()| self.shrink_disk()) {
            tracing::warn!(error = %e, "cache or disk budget upkeep failed after a commit");
        }
        Ok(())
    }

    /// Documents in memory with changes not stored yet (while writes are deferred).
    pub fn unsaved_docs(&self) -> Vec<DocAddr> {
        self.replica
            .docs()
            .into_iter()
            .filter(|a| {
                self.replica
                    .synced_doc(a)
                    .is_some_and(SyncedDoc::has_unsaved)
            })
            .collect()
    }

    // ---- persisting ----------------------------------------------------------------------

    /// Writes everything changed in memory, and the summaries that depend on it, in one
    /// transaction.
    fn persist(&mut self, mut extra: Option<&mut ExtraWrites<'_>>) -> Result<()> {
        let unsaved = self.replica.take_unsaved();
        if unsaved.is_empty() {
            if let Some(extra) = extra {
                self.store.write(|tx| extra(tx))?;
            }
            return Ok(());
        }
        self.writes_since_disk_check += 1;
        self.written.extend(unsaved.iter().map(|(addr, _)| *addr));
        let mut touched: BTreeSet<ConversationId> = BTreeSet::new();
        let mut infos: Vec<(DocAddr, SegmentInfo)> = Vec::new();
        for (addr, _) in &unsaved {
            match addr {
                DocAddr::Meta(c) => {
                    touched.insert(*c);
                }
                DocAddr::Segment(c, n) => {
                    touched.insert(*c);
                    self.touch(*c, *n);
                    if let Some(info) = self.replica.segment_info(c, *n) {
                        infos.push((*addr, info));
                    }
                }
                DocAddr::Account(_) => {
                    let digest = self.replica.account_digest();
                    for (c, v) in &digest {
                        if self.digest.get(c) != Some(v) {
                            touched.insert(*c);
                        }
                    }
                    for c in self.digest.keys() {
                        if !digest.contains_key(c) {
                            touched.insert(*c);
                        }
                    }
                    self.digest = digest;
                }
            }
        }
        let mut summaries = Vec::new();
        for c in touched {
            if let Some(s) = self.fresh_summary(c)? {
                summaries.push(s);
            }
        }
        let vvs: Vec<Vec<u8>> = unsaved
            .iter()
            .map(|(addr, _)| self.replica.version_vector(addr).encode())
            .collect();
        let clock = self.replica.clock().last().as_u64().to_be_bytes();
        self.store.write(|tx| {
            for ((addr, u), vv) in unsaved.iter().zip(&vvs) {
                if !u.applied.is_empty() {
                    tx.append_chunk(addr, &u.applied)?;
                    tx.put_version_vector(addr, vv)?;
                }
                if let Some(p) = &u.pending {
                    tx.put_pending(addr, Some(p))?;
                }
            }
            for (addr, info) in &infos {
                tx.put_info(addr, &info.encode())?;
            }
            for s in &summaries {
                tx.put_summary(&s.id, &summary::encode(s))?;
            }
            tx.put_setting("clock", &clock)?;
            match extra.as_mut() {
                Some(extra) => extra(tx),
                None => Ok(()),
            }
        })?;
        // Compaction after the commit is upkeep: a failure leaves the chunks, which still load.
        if let Err(e) = self.compact(unsaved.iter().map(|(a, _)| *a).collect()) {
            tracing::warn!(error = %e, "compaction failed after a commit");
        }
        Ok(())
    }

    /// The summary of a conversation as it is now, loading what it needs; `None` while its meta
    /// document has not arrived.
    fn fresh_summary(&mut self, c: ConversationId) -> Result<Option<ConversationSummary>> {
        for _ in 0..MAX_LOADS_PER_OPERATION {
            if !self.ensure_conversation(c)? {
                return Ok(None);
            }
            if !self.replica.has_meta(&c) {
                return Ok(None);
            }
            match self.replica.conversation_summary(&c) {
                Ok(s) => return Ok(Some(s)),
                Err(ModelError::NotLoaded(addr)) => self.load(addr)?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ReplicaStoreError::TooManyLoads {
            max: MAX_LOADS_PER_OPERATION,
        })
    }

    /// Replaces the chunks of documents that have many with a fresh snapshot.
    fn compact(&mut self, addrs: Vec<DocAddr>) -> Result<()> {
        for addr in addrs {
            if !self.store.needs_compaction(&addr)? {
                continue;
            }
            if let Some(snapshot) = self.replica.save_doc(&addr) {
                self.store.write(|tx| tx.compact(&addr, &snapshot))?;
            }
        }
        Ok(())
    }

    /// Drops least recently used segments from memory until the estimate fits the budget.
    fn shrink_cache(&mut self) -> Result<()> {
        let mut loaded = self.replica.loaded_segments();
        let mut total: usize = loaded.iter().map(|(_, _, n)| estimate(*n)).sum();
        if total <= self.config.cache_budget_bytes {
            return Ok(());
        }
        loaded.sort_by_key(|(c, n, _)| self.last_used.get(&(*c, *n)).copied().unwrap_or(0));
        for (c, n, count) in loaded {
            if total <= self.config.cache_budget_bytes {
                break;
            }
            self.replica.unload_segment(&c, n)?;
            self.last_used.remove(&(c, n));
            total -= estimate(count);
        }
        Ok(())
    }

    /// Evicts the segments with the oldest messages from the disk until the stored content fits
    /// the disk budget. A conversation's newest segment and segments in memory stay.
    fn shrink_disk(&mut self) -> Result<()> {
        let Some(budget) = self.config.disk_budget_bytes else {
            return Ok(());
        };
        if self.writes_since_disk_check < DISK_CHECK_EVERY_WRITES {
            return Ok(());
        }
        self.writes_since_disk_check = 0;
        let sizes = self.store.doc_sizes()?;
        let mut total: u64 = sizes.iter().map(|(_, size, _)| *size).sum();
        if total <= budget {
            return Ok(());
        }
        let mut newest: BTreeMap<ConversationId, u32> = BTreeMap::new();
        for (addr, _, _) in &sizes {
            if let DocAddr::Segment(c, n) = addr {
                let e = newest.entry(*c).or_insert(*n);
                *e = (*e).max(*n);
            }
        }
        let mut candidates: Vec<(Option<crate::ids::MessageKey>, DocAddr, u64)> = sizes
            .into_iter()
            .filter_map(|(addr, size, info)| match addr {
                DocAddr::Segment(c, n)
                    if newest.get(&c) != Some(&n) && !self.replica.is_segment_loaded(&c, n) =>
                {
                    let max_key = info.as_deref().and_then(SegmentInfo::decode)?.max_key;
                    Some((max_key, addr, size))
                }
                _ => None,
            })
            .collect();
        candidates.sort();
        let mut evict = Vec::new();
        for (_, addr, size) in candidates {
            if total <= budget {
                break;
            }
            evict.push(addr);
            total = total.saturating_sub(size);
        }
        if !evict.is_empty() {
            self.store.write(|tx| {
                for addr in &evict {
                    tx.evict(addr)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    // ---- operations ----------------------------------------------------------------------

    /// Creates a conversation; durable when this returns.
    pub fn create_conversation(
        &mut self,
        now_ms: u64,
        title: &str,
        others: &[AccountId],
    ) -> Result<ConversationId> {
        self.run(|r| r.create_conversation(now_ms, title, others))
    }

    /// Sends a message; durable when this returns.
    pub fn send(
        &mut self,
        now_ms: u64,
        conversation: &ConversationId,
        draft: &Draft,
    ) -> Result<MessageId> {
        self.run(|r| r.send(now_ms, conversation, draft))
    }

    /// Edits one of this account's messages.
    pub fn edit(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
        body: &str,
    ) -> Result<()> {
        self.run(|r| r.edit(conversation, id, body))
    }

    /// Recalls one of this account's messages.
    pub fn recall(&mut self, conversation: &ConversationId, id: &MessageId) -> Result<()> {
        self.run(|r| r.recall(conversation, id))
    }

    /// Adds or removes a reaction.
    pub fn react(
        &mut self,
        conversation: &ConversationId,
        id: &MessageId,
        reaction: &str,
        on: bool,
    ) -> Result<()> {
        self.run(|r| r.react(conversation, id, reaction, on))
    }

    /// Marks everything up to `upto` as read on this device.
    pub fn mark_read(&mut self, conversation: &ConversationId, upto: &MessageId) -> Result<()> {
        self.run(|r| r.mark_read(conversation, upto))
    }

    /// Sets or clears a draft.
    pub fn set_draft(&mut self, conversation: &ConversationId, text: &str) -> Result<()> {
        self.run(|r| r.set_draft(conversation, text))
    }

    /// Pins, mutes or archives a conversation.
    pub fn set_flag(
        &mut self,
        conversation: &ConversationId,
        flag: ListFlag,
        on: bool,
    ) -> Result<()> {
        self.run(|r| r.set_flag(conversation, flag, on))
    }

    /// Hides a message for this account ("delete for me").
    pub fn hide_message(&mut self, conversation: &ConversationId, id: &MessageId) -> Result<()> {
        self.run(|r| r.hide_message(conversation, id))
    }

    /// Adds a member account.
    pub fn add_member(
        &mut self,
        now_ms: u64,
        conversation: &ConversationId,
        account: &AccountId,
    ) -> Result<()> {
        self.run(|r| r.add_member(now_ms, conversation, account))
    }

    /// Removes a member account.
    pub fn remove_member(
        &mut self,
        conversation: &ConversationId,
        account: &AccountId,
    ) -> Result<()> {
        self.run(|r| r.remove_member(conversation, account))
    }

    /// Renames a conversation.
    pub fn set_title(&mut self, conversation: &ConversationId, title: &str) -> Result<()> {
        self.run(|r| r.set_title(conversation, title))
    }

    /// Applies remote batches durably: the documents they address are loaded first, everything
    /// for one document goes to Automerge in one call, and the result is stored before this
    /// returns.
    pub fn apply(&mut self, now_ms: u64, batches: Vec<ChangeBatch>) -> Result<ApplyReport> {
        let addrs: BTreeSet<DocAddr> = batches.iter().map(|b| b.addr).collect();
        for addr in &addrs {
            self.ensure_loaded(addr)?;
        }
        let mut batches = Some(batches);
        self.run(|r| Ok(r.apply(now_ms, batches.take().unwrap_or_default())))
    }

    // ---- sync --------------------------------------------------------------------------

    /// Documents written (by local operations or applied remote changes) since the last call:
    /// where a sync layer looks for this device's new changes.
    pub fn take_written(&mut self) -> BTreeSet<DocAddr> {
        std::mem::take(&mut self.written)
    }

    /// The segment numbers a conversation's meta document lists, loading it if needed.
    pub fn segment_numbers(&mut self, conversation: &ConversationId) -> Result<Vec<u32>> {
        self.run(|r| r.segment_numbers(conversation))
    }

    /// Member accounts of a conversation, loading it if needed.
    pub fn members(&mut self, conversation: &ConversationId) -> Result<Vec<AccountId>> {
        self.run(|r| r.members(conversation))
    }

    /// Every document this replica holds, stored or only in memory.
    pub fn docs(&self) -> Result<Vec<DocAddr>> {
        let mut all: BTreeSet<DocAddr> = self.store.all_docs()?.into_iter().collect();
        all.extend(self.replica.docs());
        Ok(all.into_iter().collect())
    }

    /// What this replica holds of a document: from memory if it is loaded, else as recorded in
    /// the store (no load needed), else empty.
    pub fn version_vector(&mut self, addr: &DocAddr) -> Result<crate::model::VersionVector> {
        if self.replica.synced_doc(addr).is_some() {
            return Ok(self.replica.version_vector(addr));
        }
        match self.store.version_vector(addr)? {
            Some(bytes) => crate::model::VersionVector::decode(&bytes).map_err(|_| {
                StoreError::Malformed {
                    what: "version vector",
                }
                .into()
            }),
            None => Ok(crate::model::VersionVector::new()),
        }
    }

    /// The changes of a document that a replica at `have` lacks, loading the document if needed.
    pub fn changes_since(
        &mut self,
        addr: &DocAddr,
        have: &crate::model::VersionVector,
    ) -> Result<Option<ChangeBatch>> {
        self.ensure_loaded(addr)?;
        Ok(self.replica.changes_since(addr, have))
    }

    /// A document's whole save (Automerge's compact format) and the number of remote changes
    /// in it waiting for dependencies, loading it if needed; `None` if it is not held.
    pub fn save_with_pending(&mut self, addr: &DocAddr) -> Result<Option<(Vec<u8>, usize)>> {
        self.ensure_loaded(addr)?;
        Ok(self
            .replica
            .synced_doc(addr)
            .map(|d| (d.save(), d.pending_len())))
    }

    /// The number of remote changes of a document waiting for dependencies, loading it if
    /// needed (0 if it is not held).
    pub fn pending_len(&mut self, addr: &DocAddr) -> Result<usize> {
        self.ensure_loaded(addr)?;
        Ok(self
            .replica
            .synced_doc(addr)
            .map_or(0, SyncedDoc::pending_len))
    }

    fn ensure_loaded(&mut self, addr: &DocAddr) -> Result<()> {
        match addr {
            DocAddr::Meta(c) => {
                self.ensure_conversation(*c)?;
            }
            DocAddr::Segment(c, n) => {
                if self.ensure_conversation(*c)?
                    && self.replica.segment_info(c, *n).is_some()
                    && !self.replica.is_segment_loaded(c, *n)
                {
                    self.load(*addr)?;
                }
            }
            DocAddr::Account(_) => {}
        }
        Ok(())
    }

    // ---- queries -------------------------------------------------------------------------

    /// The conversation list from stored summaries, with flags and drafts from the account
    /// document: no conversation document is loaded.
    pub fn conversation_list(&self) -> Result<Vec<ConversationSummary>> {
        let mut list = Vec::new();
        for bytes in self.store.summaries()? {
            let mut s = summary::decode(&bytes)?;
            self.replica.refresh_account_fields(&mut s);
            list.push(s);
        }
        crate::model::query::sort_conversation_list(&mut list);
        Ok(list)
    }

    /// A page of history, loading the segments it spans.
    pub fn history(
        &mut self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<Page> {
        let page = self.run(|r| r.history(conversation, before, limit))?;
        self.touch_range(conversation, &page.messages);
        Ok(page)
    }

    /// A page of history from what is held here: segments evicted from the disk budget are
    /// left out (the page says so with `incomplete`) and returned, to be fetched again.
    pub fn history_held(
        &mut self,
        conversation: &ConversationId,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<(Page, Vec<DocAddr>)> {
        let mut absent = BTreeSet::new();
        loop {
            match self.run(|r| r.history_without(conversation, before, limit, &absent)) {
                Ok(page) => {
                    self.touch_range(conversation, &page.messages);
                    let evicted = absent
                        .into_iter()
                        .map(|n| DocAddr::Segment(*conversation, n))
                        .collect();
                    return Ok((page, evicted));
                }
                Err(ReplicaStoreError::Evicted(DocAddr::Segment(c, n)))
                    if c == *conversation && absent.insert(n) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `addr` is a segment evicted from the disk budget (one held in memory is not).
    pub fn is_evicted(&self, addr: &DocAddr) -> Result<bool> {
        match addr {
            DocAddr::Segment(c, n) if !self.replica.is_segment_loaded(c, *n) => {
                Ok(self.store.is_evicted(addr)?)
            }
            _ => Ok(false),
        }
    }

    /// Installs a segment whole from a compacted save when nothing of it is held here (see
    /// [`Replica::install_segment`]); stored like any applied change.
    pub fn install_segment(&mut self, addr: &DocAddr, save: &[u8]) -> Result<bool> {
        self.install_loaded_segment(addr, None, save)
    }

    /// [`Self::install_segment`] with the save already loaded (`loaded` is
    /// `Automerge::load(save)`), so it is not loaded twice.
    pub fn install_loaded_segment(
        &mut self,
        addr: &DocAddr,
        loaded: Option<automerge::Automerge>,
        save: &[u8],
    ) -> Result<bool> {
        let mut loaded = loaded;
        let installed = self.run(|r| {
            let doc = || match loaded.take() {
                Some(doc) => Ok(doc),
                None => Ok(automerge::Automerge::load(save)?),
            };
            r.install_loaded_segment(addr, doc, save)
        })?;
        if let (true, DocAddr::Segment(c, n)) = (installed, addr) {
            self.touch(*c, *n);
        }
        Ok(installed)
    }

    /// Makes an evicted document an empty one again, to be filled by fetching it from a relay
    /// (from sequence 0: the caller resets its cursors in the same breath).
    pub fn restore_evicted(&mut self, addr: &DocAddr) -> Result<()> {
        self.store.write(|tx| tx.unevict(addr))?;
        Ok(())
    }

    /// One message.
    pub fn message(&mut self, conversation: &ConversationId, id: &MessageId) -> Result<Message> {
        self.run(|r| r.message(conversation, id))
    }

    /// Unread count of one conversation.
    pub fn unread_count(&mut self, conversation: &ConversationId) -> Result<u64> {
        self.run(|r| r.unread_count(conversation))
    }

    /// The draft of a conversation.
    pub fn draft(&self, conversation: &ConversationId) -> Option<String> {
        self.replica.draft(conversation)
    }

    /// Marks the segments holding a page as recently used.
    fn touch_range(&mut self, conversation: &ConversationId, messages: &[Message]) {
        let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
            return;
        };
        let (lo, hi) = (first.id.key(), last.id.key());
        let hits: Vec<u32> = self
            .replica
            .loaded_segments()
            .iter()
            .filter(|(c, n, _)| {
                c == conversation
                    && self.replica.segment_info(c, *n).is_some_and(|i| {
                        i.min_key.is_some_and(|m| m <= hi) && i.max_key.is_some_and(|m| m >= lo)
                    })
            })
            .map(|(_, n, _)| *n)
            .collect();
        for n in hits {
            self.touch(*conversation, n);
        }
    }
}

/// Builds a document from what the store holds.
fn synced_doc(addr: DocAddr, device: DeviceId, stored: StoredDoc) -> Result<SyncedDoc> {
    let pending: Vec<Change> = match &stored.pending {
        Some(bytes) => {
            ChangeBatch::decode(bytes)
                .map_err(ModelError::from)?
                .changes
        }
        None => Vec::new(),
    };
    Ok(SyncedDoc::load_parts(
        addr,
        device,
        stored.snapshot.as_deref(),
        &stored.chunks,
        &pending,
    )?)
}
