//! One Automerge document with the bookkeeping sync needs: a per-device change log (the version
//! vector) and a buffer of remote changes that wait for their dependencies.
//!
//! Every device writes with one Automerge actor, its [`DeviceId`]. Because each device's changes to
//! a document form a contiguous sequence, the map {device → number of changes} is an exact, tiny
//! summary of what a replica holds: its [`VersionVector`].
//!
//! Remote changes are applied in one Automerge call per batch, after this module has put them in
//! dependency order itself. Changes whose dependencies have not arrived wait in a bounded buffer,
//! so the set of applied changes is always known exactly.

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::{ActorId, Automerge, Change, ChangeHash, ReadDoc, transaction::Transaction};

use crate::ids::{DeviceId, DocAddr};
use crate::model::batch::ChangeBatch;
use crate::model::error::ModelError;
use crate::model::limits::MAX_PENDING_CHANGES;
use crate::model::validate;

/// What a replica holds of one document: for each device, how many of its changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionVector(BTreeMap<DeviceId, u64>);

impl VersionVector {
    /// An empty vector: nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of `device`'s changes held (its last sequence number).
    pub fn seq(&self, device: &DeviceId) -> u64 {
        self.0.get(device).copied().unwrap_or(0)
    }

    /// Records that changes up to `seq` of `device` are held.
    pub fn set(&mut self, device: DeviceId, seq: u64) {
        if seq == 0 {
            self.0.remove(&device);
        } else {
            self.0.insert(device, seq);
        }
    }

    /// Whether no device has a change here.
    pub fn is_empty(&self) -> bool {
        self.0.values().all(|n| *n == 0)
    }

    /// Devices and their sequence numbers, in device order.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &u64)> {
        self.0.iter()
    }

    /// Encodes the vector: `u32 count | count × ([32] device, u64 seq)`, big-endian, in device
    /// order.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = crate::wire::codec::Writer::with_capacity(4 + 40 * self.0.len());
        w.u32(self.0.len() as u32);
        for (device, seq) in &self.0 {
            w.put(device.as_bytes()).u64(*seq);
        }
        w.into_bytes()
    }

    /// Decodes [`VersionVector::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<VersionVector, crate::wire::codec::CodecError> {
        let mut r = crate::wire::codec::Reader::new(bytes);
        let count = r.u32()? as usize;
        let mut vv = VersionVector::new();
        for _ in 0..count {
            let device = DeviceId::from_bytes(r.array()?);
            let seq = r.u64()?;
            vv.set(device, seq);
        }
        r.finish()?;
        Ok(vv)
    }

    /// Whether this vector holds everything `other` holds.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(d, s)| self.seq(d) >= *s)
    }
}

/// Counts from applying a batch of remote changes to one document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocApply {
    /// Changes applied now (including earlier ones that were waiting for these).
    pub applied: usize,
    /// Changes already held or already waiting: ignored.
    pub duplicates: usize,
    /// Changes still waiting for dependencies after this batch.
    pub pending: usize,
    /// Changes refused because they do not fit the document's shape (or depend on one that does
    /// not): device, sequence number and reason. They are dropped.
    pub refused: Vec<(DeviceId, u64, &'static str)>,
    /// Local changes this replica wrote in response (removing text that an edit wrote back over
    /// a recall of this account's message); they are this device's own, to be sent like any other.
    pub repairs: usize,
}

/// What remote changes wrote to, from [`SyncedDoc::take_touched`].
pub(crate) struct TouchedObjects {
    /// Message maps whose text, attachments or recall flag changed.
    pub content: Vec<automerge::ObjId>,
    /// Root keys written.
    pub root_keys: Vec<String>,
    /// Messages that existed before, and what changed in them.
    pub updates: Vec<(automerge::ObjId, crate::model::message::MessageUpdate)>,
}

/// An Automerge document plus the sync bookkeeping described in the module docs.
#[derive(Debug)]
pub struct SyncedDoc {
    addr: DocAddr,
    doc: Automerge,
    /// For each device, the hashes of its changes in sequence order (`seq` = index + 1).
    log: HashMap<DeviceId, Vec<ChangeHash>>,
    /// Every applied change, for dependency checks without asking Automerge.
    known: HashSet<ChangeHash>,
    /// Remote changes waiting for dependencies.
    pending: HashMap<ChangeHash, Change>,
    /// Raw bytes of changes applied since the last [`SyncedDoc::take_unsaved`], in order.
    unsaved: Vec<u8>,
    /// Whether the pending buffer changed since the last [`SyncedDoc::take_unsaved`].
    pending_dirty: bool,
    /// What remote changes wrote to since the last [`SyncedDoc::take_touched`].
    touched: validate::Touched,
}

/// What a store must write to make a document durable: the changes applied since the last call,
/// and, when it changed, the whole buffer of changes waiting for dependencies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unsaved {
    /// Concatenated Automerge change chunks, in application order; empty if none.
    pub applied: Vec<u8>,
    /// The encoded pending buffer (a [`crate::model::ChangeBatch`]), if it changed.
    pub pending: Option<Vec<u8>>,
}

impl Unsaved {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.pending.is_none()
    }
}

impl SyncedDoc {
    /// An empty document that `me` will write to.
    pub fn new(addr: DocAddr, me: DeviceId) -> SyncedDoc {
        SyncedDoc {
            addr,
            doc: Automerge::new().with_actor(actor_of(&me)),
            log: HashMap::new(),
            known: HashSet::new(),
            pending: HashMap::new(),
            unsaved: Vec::new(),
            pending_dirty: false,
            touched: validate::Touched::default(),
        }
    }

    /// Loads a document saved with [`SyncedDoc::save`]. The whole change log is rebuilt once here.
    pub fn load(addr: DocAddr, me: DeviceId, bytes: &[u8]) -> Result<SyncedDoc, ModelError> {
        Self::load_parts(addr, me, Some(bytes), &[], &[])
    }

    /// Loads a document from a snapshot (if any), the change chunks written after it, in order,
    /// and the changes that were waiting for dependencies.
    pub fn load_parts(
        addr: DocAddr,
        me: DeviceId,
        snapshot: Option<&[u8]>,
        chunks: &[Vec<u8>],
        pending: &[Change],
    ) -> Result<SyncedDoc, ModelError> {
        let mut doc = match snapshot {
            Some(bytes) => Automerge::load(bytes)?,
            None => Automerge::new(),
        };
        for chunk in chunks {
            doc.load_incremental(chunk)?;
        }
        SyncedDoc::from_automerge(addr, me, doc, pending)
    }

    /// A document around an Automerge document already loaded.
    fn from_automerge(
        addr: DocAddr,
        me: DeviceId,
        doc: Automerge,
        pending: &[Change],
    ) -> Result<SyncedDoc, ModelError> {
        let mut out = SyncedDoc {
            addr,
            doc: doc.with_actor(actor_of(&me)),
            log: HashMap::new(),
            known: HashSet::new(),
            pending: pending.iter().map(|c| (c.hash(), c.clone())).collect(),
            unsaved: Vec::new(),
            pending_dirty: false,
            touched: validate::Touched::default(),
        };
        let mut metas: Vec<(DeviceId, u64, ChangeHash)> = Vec::new();
        for meta in out.doc.get_changes_meta(&[]) {
            let device = device_of(&meta.actor)?;
            metas.push((device, meta.seq, meta.hash));
        }
        metas.sort_by_key(|(d, seq, _)| (*d, *seq));
        for (device, _, hash) in metas {
            out.log.entry(device).or_default().push(hash);
            out.known.insert(hash);
        }
        Ok(out)
    }

    /// A document loaded whole from a compacted save (a snapshot), with the save itself as
    /// what is to be stored: a save is a valid chunk to load incrementally.
    pub fn from_save(addr: DocAddr, me: DeviceId, save: &[u8]) -> Result<SyncedDoc, ModelError> {
        SyncedDoc::from_loaded_save(addr, me, Automerge::load(save)?, save)
    }

    /// [`SyncedDoc::from_save`] for a save the caller has loaded already (`loaded` must be
    /// `Automerge::load(save)`): saves loading it twice.
    pub fn from_loaded_save(
        addr: DocAddr,
        me: DeviceId,
        loaded: Automerge,
        save: &[u8],
    ) -> Result<SyncedDoc, ModelError> {
        let mut doc = SyncedDoc::from_automerge(addr, me, loaded, &[])?;
        doc.unsaved = save.to_vec();
        Ok(doc)
    }

    /// The document's address.
    pub fn addr(&self) -> DocAddr {
        self.addr
    }

    /// Read access to the Automerge document.
    pub fn doc(&self) -> &Automerge {
        &self.doc
    }

    /// The full document in Automerge's compact format.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// Runs `f` in one local transaction and commits it as one change by this device.
    /// Nothing is committed if `f` fails.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let mut tx = self.doc.transaction();
        let out = match f(&mut tx) {
            Ok(out) => out,
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        };
        // The change timestamp stays 0: Automerge's own time field is advisory and unauthenticated;
        // message time lives in the HLC keys.
        let (hash, _) =
            tx.commit_with(automerge::transaction::CommitOptions::default().with_time(0));
        if let Some(hash) = hash {
            let me = device_of(self.doc.get_actor())?;
            self.log.entry(me).or_default().push(hash);
            self.known.insert(hash);
            // The change was just committed by this actor, so Automerge has it.
            if let Some(change) = self.doc.get_last_local_change() {
                self.unsaved.extend_from_slice(change.raw_bytes());
            }
        }
        Ok(out)
    }

    /// What this replica holds: {device → last sequence number}.
    pub fn version_vector(&self) -> VersionVector {
        let mut vv = VersionVector::new();
        for (device, hashes) in &self.log {
            vv.set(*device, hashes.len() as u64);
        }
        vv
    }

    /// The current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Every held change that `have` does not cover, in an order a receiver can apply.
    pub fn changes_since(&self, have: &VersionVector) -> Vec<Change> {
        let mut devices: Vec<_> = self.log.iter().collect();
        devices.sort_by_key(|(d, _)| **d);
        let mut out = Vec::new();
        for (device, hashes) in devices {
            let from = (have.seq(device) as usize).min(hashes.len());
            for hash in &hashes[from..] {
                // Every hash in the log was applied to the document, so Automerge has it.
                if let Some(change) = self.doc.get_change_by_hash(hash) {
                    out.push(change);
                }
            }
        }
        out
    }

    /// Every held change that is not an ancestor of `heads`.
    pub fn changes_since_heads(&self, heads: &[ChangeHash]) -> Vec<Change> {
        self.doc.get_changes(heads)
    }

    /// Applies remote changes: duplicates are ignored, changes whose dependencies are missing wait,
    /// and everything that became ready is applied in one Automerge call.
    ///
    /// Checks come first, so a rejected batch changes nothing: every change must be written by a
    /// device actor, and a change that reuses a device's sequence number with different content
    /// (equivocation) is refused.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<DocApply, ModelError> {
        let mut fresh: Vec<Change> = Vec::new();
        let mut seen_now: HashSet<ChangeHash> = HashSet::new();
        // Sequence numbers already taken by waiting changes: a second, different change with one
        // of them is equivocation too, whether it waits beside the first or arrives with it.
        let mut claimed: HashSet<(DeviceId, u64)> = self
            .pending
            .values()
            .filter_map(|c| Some((device_of(c.actor_id()).ok()?, c.seq())))
            .collect();
        let mut duplicates = 0;
        for change in changes {
            let device = device_of(change.actor_id())?;
            let hash = change.hash();
            if self.known.contains(&hash)
                || self.pending.contains_key(&hash)
                || !seen_now.insert(hash)
            {
                duplicates += 1;
                continue;
            }
            let held = self.log.get(&device).map_or(0, Vec::len) as u64;
            if change.seq() == 0 || change.seq() <= held || !claimed.insert((device, change.seq()))
            {
                return Err(ModelError::Equivocation {
                    doc: self.addr,
                    device,
                    seq: change.seq(),
                });
            }
            fresh.push(change);
        }
        if self.pending.len() + fresh.len() > MAX_PENDING_CHANGES {
            return Err(ModelError::PendingOverflow {
                doc: self.addr,
                max: MAX_PENDING_CHANGES,
            });
        }
        // The pending buffer must be rewritten if it was or will be non-empty and anything moved.
        let had_pending = !self.pending.is_empty();
        let any_fresh = !fresh.is_empty();
        for change in fresh {
            self.pending.insert(change.hash(), change);
        }
        let ready = self.take_ready()?;
        let log = &self.log;
        let checked = validate::split_valid(&self.doc, ready, |actor| {
            device_of(actor).is_ok_and(|d| log.contains_key(&d))
        });
        let ready = checked.valid;
        let mut touched = checked.touched;
        self.touched.messages.append(&mut touched.messages);
        self.touched.root_keys.append(&mut touched.root_keys);
        self.touched.updates.append(&mut touched.updates);
        let refused: Vec<(DeviceId, u64, &'static str)> = checked
            .refused
            .iter()
            .map(|(c, reason)| Ok((device_of(c.actor_id())?, c.seq(), *reason)))
            .collect::<Result<_, ModelError>>()?;
        let applied = ready.len();
        if (any_fresh || applied > 0) && (had_pending || !self.pending.is_empty()) {
            self.pending_dirty = true;
        }
        if !ready.is_empty() {
            let hashes: Vec<(DeviceId, ChangeHash)> = ready
                .iter()
                .map(|c| Ok((device_of(c.actor_id())?, c.hash())))
                .collect::<Result<_, ModelError>>()?;
            for change in &ready {
                self.unsaved.extend_from_slice(change.raw_bytes());
            }
            self.doc.apply_changes(ready)?;
            for (device, hash) in hashes {
                self.log.entry(device).or_default().push(hash);
                self.known.insert(hash);
            }
        }
        Ok(DocApply {
            applied,
            duplicates,
            pending: self.pending.len(),
            refused,
            repairs: 0,
        })
    }

    /// Removes from the pending buffer every change whose dependencies are now satisfied, in
    /// dependency order (Kahn's algorithm over the pending set), and checks that each device's
    /// changes stay contiguous.
    fn take_ready(&mut self) -> Result<Vec<Change>, ModelError> {
        let mut missing: HashMap<ChangeHash, usize> = HashMap::new();
        let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
        let mut queue: Vec<ChangeHash> = Vec::new();
        for (hash, change) in &self.pending {
            let mut n = 0;
            for dep in change.deps() {
                if self.known.contains(dep) {
                    continue;
                }
                n += 1;
                dependents.entry(*dep).or_default().push(*hash);
            }
            if n == 0 {
                queue.push(*hash);
            } else {
                missing.insert(*hash, n);
            }
        }
        // Sorted so that the order of application does not depend on hash-map iteration.
        queue.sort();
        let mut next_seq: HashMap<DeviceId, u64> = HashMap::new();
        let mut ready = Vec::new();
        while let Some(hash) = queue.pop() {
            let Some(change) = self.pending.remove(&hash) else {
                continue;
            };
            let device = device_of(change.actor_id())?;
            let expect = next_seq
                .entry(device)
                .or_insert_with(|| self.log.get(&device).map_or(0, Vec::len) as u64 + 1);
            if change.seq() != *expect {
                // A change can only follow its device's previous change; a gap means the device
                // skipped a sequence number. Put it back: it is not applicable.
                self.pending.insert(hash, change);
                continue;
            }
            *expect += 1;
            if let Some(waiting) = dependents.remove(&hash) {
                for w in waiting {
                    if let Some(n) = missing.get_mut(&w) {
                        *n -= 1;
                        if *n == 0 {
                            missing.remove(&w);
                            queue.push(w);
                        }
                    }
                }
            }
            ready.push(change);
        }
        Ok(ready)
    }

    /// Takes what must be written to make this document durable (see [`Unsaved`]).
    pub fn take_unsaved(&mut self) -> Unsaved {
        let pending = self.pending_dirty.then(|| {
            let mut changes: Vec<Change> = self.pending.values().cloned().collect();
            changes.sort_by_key(|c| c.hash());
            ChangeBatch {
                addr: self.addr,
                changes,
            }
            .encode()
        });
        self.pending_dirty = false;
        Unsaved {
            applied: std::mem::take(&mut self.unsaved),
            pending,
        }
    }

    /// Takes what remote changes wrote to since the last call: the message objects whose text,
    /// attachments or recall flag changed, the root keys written, and the updates of messages
    /// that existed before.
    pub(crate) fn take_touched(&mut self) -> TouchedObjects {
        let touched = std::mem::take(&mut self.touched);
        let obj = |counter, actor| automerge::ObjId::Id(counter, actor, usize::MAX);
        TouchedObjects {
            content: touched
                .messages
                .into_iter()
                .map(|(counter, actor)| obj(counter, actor))
                .collect(),
            root_keys: touched.root_keys,
            updates: touched
                .updates
                .into_iter()
                .map(|(counter, actor, u)| (obj(counter, actor), u))
                .collect(),
        }
    }

    /// Whether anything applied or buffered has not been taken by [`SyncedDoc::take_unsaved`].
    pub fn has_unsaved(&self) -> bool {
        !self.unsaved.is_empty() || self.pending_dirty
    }

    /// The number of remote changes waiting for dependencies.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// The Automerge actor of a device.
pub(crate) fn actor_of(device: &DeviceId) -> ActorId {
    ActorId::from(device.as_bytes())
}

/// The device behind an Automerge actor; only 32-byte actors are devices.
pub(crate) fn device_of(actor: &ActorId) -> Result<DeviceId, ModelError> {
    let bytes: [u8; 32] = actor
        .to_bytes()
        .try_into()
        .map_err(|_| ModelError::BadActor {
            len: actor.to_bytes().len(),
        })?;
    Ok(DeviceId::from_bytes(bytes))
}
