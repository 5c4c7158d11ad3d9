//! A simulated device: a sans-IO client around the real [`Replica`], the crypto core and the
//! engine's [`Session`], following the device's side of the relay protocol (see
//! `docs/PROTOCOL.md`, "The device's side"), with a store modelled in memory.
//!
//! **Durability.** Everything a device keeps across a crash is in [`Stored`], written by
//! [`Device::commit`] at the end of each turn (the engine's group commit): the replica's new
//! Automerge chunks (`Replica::take_unsaved`), the buffer of changes waiting for dependencies,
//! the clock, logs, groups, keys, sealed marks, the outbox and the cursors. A crash rebuilds
//! the device from it with the same calls the real store uses to load documents.

use std::collections::{BTreeMap, BTreeSet};

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::group::GroupUpdate;
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch, KeySource, Keyring};
use crate::crypto::rng::SeedRng;
use crate::engine::session::Session;
use crate::ids::{AccountId, DeviceId, DocAddr, DocId};
use crate::model::hlc::Hlc;
use crate::model::{ModelConfig, Replica, SyncedDoc};
use crate::wire::message::Message;

/// Appends open at once (the engine's limit).
pub(crate) const MAX_APPENDS_IN_FLIGHT: usize = 1_024;
/// Outbox entries, at most (a bound the run checks).
pub(crate) const MAX_OUTBOX: usize = 4_096;
/// Open requests on a connection, at most (a bound the run checks).
pub(crate) const MAX_OPEN_REQUESTS: usize = 4_096;
/// Silence after which a device with open requests drops the connection (the engine's 5 s).
pub(crate) const SILENCE_TIMEOUT_MS: u64 = 5_000;
/// Attempts to open an envelope whose author or key is not known yet (the engine's limit).
pub(crate) const MAX_BLOCKED_RETRIES: u32 = 3;
/// After a refusal that may pass, an append is offered again this much later (the engine's
/// second).
pub(crate) const RETRY_APPEND_MS: u64 = 1_000;
/// Segment size in the simulation: small, so roll-over happens.
pub(crate) const SIM_SEGMENT_CAP: usize = 16;

/// A group's chain as a device holds it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    pub updates: Vec<GroupUpdate>,
    pub addr: Option<DocAddr>,
}

impl Group {
    pub fn latest(&self) -> Option<&GroupUpdate> {
        self.updates.last()
    }

    pub fn ever_member(&self, account: &AccountId) -> bool {
        self.updates.iter().any(|u| u.is_member(account))
    }
}

/// An envelope waiting for the relay's acknowledgement.
#[derive(Clone, Debug)]
pub(crate) struct OutItem {
    pub group: DocId,
    pub envelope: SealedEnvelope,
}

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stored {
    chunks: BTreeMap<DocAddr, Vec<Vec<u8>>>,
    pending: BTreeMap<DocAddr, Vec<u8>>,
    clock: u64,
    log: Vec<DeviceLogEntry>,
    logs: BTreeMap<AccountId, Vec<DeviceLogEntry>>,
    groups: BTreeMap<DocId, Group>,
    keys: Keyring,
    sealed: BTreeMap<DocAddr, u64>,
    outbox: BTreeMap<u64, OutItem>,
    next_outbox: u64,
    cursors: BTreeMap<DocId, u64>,
}

/// The connection's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `Hello` sent, waiting for `HelloOk`.
    Greeting,
    /// Subscribed; appends flow.
    Live,
}

/// A simulated device.
#[derive(Debug)]
pub(crate) struct Device {
    pub idx: usize,
    pub secret: DeviceSecret,
    pub log: DeviceLog,
    pub logs: BTreeMap<AccountId, DeviceLog>,
    pub groups: BTreeMap<DocId, Group>,
    pub keyring: Keyring,
    pub replica: Replica,
    pub sealed: BTreeMap<DocAddr, u64>,
    pub outbox: BTreeMap<u64, OutItem>,
    pub(super) next_outbox: u64,
    stored: Stored,
    /// The connection to the relay, if any (memory only).
    pub link: Option<u64>,
    pub session: Session,
    pub stage: Stage,
    /// Groups the relay is known to hold.
    relay_groups: BTreeSet<DocId>,
    subscribed: BTreeSet<DocId>,
    pub last_heard_ms: u64,
    pub attempt: u32,
    pub next_connect_ms: u64,
    blocked: BTreeMap<DocId, u32>,
    /// Outbox entries a relay refused for a while, and when to offer them again.
    deferred: BTreeMap<u64, u64>,
    /// The time of the last tick.
    now_ms: u64,
    /// Messages to send on the link, drained by the world.
    pub out: Vec<Message>,
    /// The connection should be dropped (silence, connection error).
    pub drop_link: bool,
    pub skew_ms: i64,
    pub rng: SeedRng,
    /// Refusals of what the relay sent: envelopes, batches, log entries, group updates.
    pub refused: Vec<String>,
    /// Whether the workload may have this device sign group updates.
    pub may_sign_groups: bool,
    /// Logs fetched again because a group update's signer was not in them (memory only, as in
    /// the engine).
    pub logs_refetched: BTreeSet<(AccountId, usize)>,
    /// Rewraps posted and not yet confirmed (memory only, as in the engine).
    pub rewraps: BTreeMap<(DocId, u32), GroupUpdate>,
    /// Membership changes refused for a race, made again once the chain is fetched (memory
    /// only, as in the engine).
    pub rebase: BTreeMap<DocId, Vec<GroupUpdate>>,
    /// Updates posted only to wrap keys again, and membership changes made again, counted.
    pub rewraps_posted: u64,
    pub rebased: u64,
    /// Direct sync with other devices (`sim/peers.rs`).
    pub direct: super::peers::PeerState,
}

/// The group whose key seals `addr`: a segment belongs to its conversation's meta document.
pub(crate) fn group_of(addr: &DocAddr) -> DocId {
    match addr {
        DocAddr::Account(_) | DocAddr::Meta(_) => addr.doc_id(),
        DocAddr::Segment(c, _) => DocAddr::Meta(*c).doc_id(),
    }
}

/// The keys of one group, for opening any of its documents.
pub(crate) struct GroupKeys<'a> {
    pub keyring: &'a Keyring,
    pub group: DocId,
}

impl KeySource for GroupKeys<'_> {
    fn doc_key(&self, _doc: &DocId, epoch: KeyEpoch) -> Option<&DocKey> {
        self.keyring.key(&self.group, epoch)
    }
}

pub(crate) fn model_config() -> ModelConfig {
    ModelConfig {
        segment_cap: SIM_SEGMENT_CAP,
        ..ModelConfig::default()
    }
}

impl Device {
    /// A device of `log`'s account, knowing `logs` of other accounts and holding `groups` and
    /// `keyring`; its first state is stored at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        idx: usize,
        secret: DeviceSecret,
        log: DeviceLog,
        logs: BTreeMap<AccountId, DeviceLog>,
        groups: BTreeMap<DocId, Group>,
        keyring: Keyring,
        rng: SeedRng,
        skew_ms: i64,
    ) -> Self {
        let replica = Replica::new(log.account(), secret.device_id(), model_config())
            .expect("the simulation's model configuration is valid");
        let mut d = Device {
            idx,
            secret,
            log,
            logs,
            groups,
            keyring,
            replica,
            sealed: BTreeMap::new(),
            outbox: BTreeMap::new(),
            next_outbox: 1,
            stored: Stored::default(),
            link: None,
            session: Session::new([]),
            stage: Stage::Greeting,
            relay_groups: BTreeSet::new(),
            subscribed: BTreeSet::new(),
            last_heard_ms: 0,
            attempt: 0,
            next_connect_ms: 0,
            blocked: BTreeMap::new(),
            deferred: BTreeMap::new(),
            now_ms: 0,
            out: Vec::new(),
            drop_link: false,
            skew_ms,
            rng,
            refused: Vec::new(),
            may_sign_groups: true,
            logs_refetched: BTreeSet::new(),
            rewraps: BTreeMap::new(),
            rebase: BTreeMap::new(),
            rewraps_posted: 0,
            rebased: 0,
            direct: Default::default(),
        };
        d.commit();
        d
    }

    pub fn account(&self) -> AccountId {
        self.log.account()
    }

    pub fn device(&self) -> DeviceId {
        self.secret.device_id()
    }

    /// This device's wall clock: the world's time with its skew.
    pub fn local_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add_signed(self.skew_ms)
    }

    /// Whether the device's own log still lists it.
    pub fn is_current(&self) -> bool {
        self.log.is_current(&self.device())
    }

    // ---- durability --------------------------------------------------------------------------

    /// The end of a turn: stores what changed, seals this device's new changes into the outbox
    /// (stored with them), and queues appends if live.
    pub fn commit(&mut self) {
        for (addr, unsaved) in self.replica.take_unsaved() {
            if !unsaved.applied.is_empty() {
                self.stored
                    .chunks
                    .entry(addr)
                    .or_default()
                    .push(unsaved.applied);
            }
            if let Some(p) = unsaved.pending {
                self.stored.pending.insert(addr, p);
            }
        }
        self.seal_new();
        self.commit_direct();
        let cursors: Vec<(crate::ids::DocId, u64)> = self
            .replica
            .docs()
            .iter()
            .map(|a| a.doc_id())
            .map(|d| (d, self.session.cursor(&d)))
            .filter(|(_, c)| *c > 0)
            .collect();
        let s = &mut self.stored;
        s.cursors.extend(cursors);
        s.clock = self.replica.clock().last().as_u64();
        s.log = self.log.entries().to_vec();
        s.logs = self
            .logs
            .iter()
            .map(|(a, l)| (*a, l.entries().to_vec()))
            .collect();
        s.groups = self.groups.clone();
        s.keys = self.keyring.clone();
        s.sealed = self.sealed.clone();
        s.outbox = self.outbox.clone();
        s.next_outbox = self.next_outbox;
        if self.stage == Stage::Live {
            self.send_outbox();
        }
    }

    /// A crash and restart: everything not stored is gone; the connection with it.
    pub fn crash(&mut self) {
        let s = self.stored.clone();
        let me = self.device();
        let account = self.account();
        let mut replica =
            Replica::new(account, me, model_config()).expect("valid model configuration");
        replica.clock_mut().resume(Hlc::from_u64(s.clock));
        let load = |addr: DocAddr| -> SyncedDoc {
            let chunks = s.chunks.get(&addr).map(Vec::as_slice).unwrap_or(&[]);
            let pending = s
                .pending
                .get(&addr)
                .map(|b| {
                    crate::model::ChangeBatch::decode(b)
                        .expect("stored pending buffers decode")
                        .changes
                })
                .unwrap_or_default();
            SyncedDoc::load_parts(addr, me, None, chunks, &pending).expect("stored chunks load")
        };
        replica
            .load_account(load(DocAddr::Account(account)))
            .expect("the account document is this account's");
        let mut conversations: BTreeMap<_, Vec<u32>> = BTreeMap::new();
        for addr in s.chunks.keys().chain(s.pending.keys()) {
            match addr {
                DocAddr::Meta(c) => {
                    conversations.entry(*c).or_default();
                }
                DocAddr::Segment(c, n) => conversations.entry(*c).or_default().push(*n),
                DocAddr::Account(_) => {}
            }
        }
        for (c, mut segments) in conversations {
            segments.sort();
            segments.dedup();
            replica
                .load_conversation(load(DocAddr::Meta(c)), BTreeMap::new())
                .expect("a stored meta document loads");
            for n in segments {
                replica
                    .load_segment(load(DocAddr::Segment(c, n)))
                    .expect("a stored segment loads");
            }
        }
        self.replica = replica;
        self.log = DeviceLog::verify(&account, s.log.clone()).expect("the stored log verifies");
        self.logs = s
            .logs
            .iter()
            .map(|(a, e)| {
                let log = DeviceLog::verify(a, e.clone()).expect("stored logs verify");
                (*a, log)
            })
            .collect();
        self.groups = s.groups.clone();
        self.keyring = s.keys.clone();
        self.sealed = s.sealed.clone();
        self.outbox = s.outbox.clone();
        self.next_outbox = s.next_outbox;
        self.crash_direct();
        self.session = Session::new(s.cursors.clone());
        self.link = None;
        self.stage = Stage::Greeting;
        self.relay_groups.clear();
        self.subscribed.clear();
        self.blocked.clear();
        self.out.clear();
        self.drop_link = false;
        self.logs_refetched.clear();
        self.rewraps.clear();
        self.rebase.clear();
    }

    /// Seals this device's changes past each document's sealed mark into the outbox.
    fn seal_new(&mut self) {
        let me = self.device();
        for addr in self.replica.docs() {
            let have = self.replica.version_vector(&addr);
            let own = have.seq(&me);
            let sealed = self.sealed.get(&addr).copied().unwrap_or(0);
            if own <= sealed {
                continue;
            }
            let group = group_of(&addr);
            // As the engine: nothing is sealed for a group this account was removed from.
            if !self.is_member_of(&group) {
                continue;
            }
            let Some((epoch, key)) = self.keyring.latest(&group) else {
                continue;
            };
            let key = key.clone();
            let mut since = have.clone();
            since.set(me, sealed);
            let Some(batch) = self.replica.changes_since(&addr, &since) else {
                continue;
            };
            for b in batch.split() {
                let (Some(first), Some(last)) = (b.changes.first(), b.changes.last()) else {
                    continue;
                };
                let header = EnvelopeHeader {
                    kind: EnvelopeKind::Changes,
                    doc: addr.doc_id(),
                    epoch,
                    author: me,
                    first_seq: first.seq(),
                    last_seq: last.seq(),
                };
                let envelope = SealedEnvelope::seal(&self.secret, &key, header, &b.encode())
                    .expect("a split batch fits an envelope");
                self.outbox
                    .insert(self.next_outbox, OutItem { group, envelope });
                self.next_outbox += 1;
            }
            self.sealed.insert(addr, own);
        }
        assert!(
            self.outbox.len() <= MAX_OUTBOX,
            "outbox unbounded: {}",
            self.outbox.len()
        );
    }

    // ---- connection --------------------------------------------------------------------------

    /// A connection was made: greet.
    pub fn on_connected(&mut self, link: u64, now_ms: u64) {
        self.link = Some(link);
        self.stage = Stage::Greeting;
        self.session.reset();
        self.relay_groups.clear();
        self.subscribed.clear();
        self.logs_refetched.clear();
        self.rewraps.clear();
        self.last_heard_ms = now_ms;
        self.hello();
    }

    /// The connection is gone: reconnect after a backoff.
    pub fn on_disconnected(&mut self, now_ms: u64, jitter: u32) {
        self.link = None;
        self.stage = Stage::Greeting;
        self.session.reset();
        self.out.clear();
        self.drop_link = false;
        self.next_connect_ms = now_ms + crate::engine::backoff_ms(self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
    }

    fn hello(&mut self) {
        let account = self.account();
        let (log_len, log_head) = (self.log.len() as u32, self.log.head());
        let req = self.session.request(crate::engine::session::Pending::Hello);
        self.out.push(Message::Hello {
            req,
            account,
            log_len,
            log_head,
        });
    }

    /// Timers: silence, heartbeat, retries.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.deferred.retain(|_, at| *at > now_ms);
        if self.link.is_none() || self.drop_link {
            return;
        }
        let silent = now_ms.saturating_sub(self.last_heard_ms);
        if silent > SILENCE_TIMEOUT_MS && self.session.open_requests() > 0 {
            self.drop_link = true;
            return;
        }
        if self.stage != Stage::Live {
            return;
        }
        if silent > SILENCE_TIMEOUT_MS {
            // The heartbeat: the device's own log from its length.
            let (account, from_seq) = (self.account(), self.log.len() as u32);
            let req = self
                .session
                .request(crate::engine::session::Pending::FetchLog(account));
            self.out.push(Message::FetchLog {
                req,
                account,
                from_seq,
            });
        }
        self.subscribe_new();
        self.send_outbox();
        assert!(
            self.session.open_requests() <= MAX_OPEN_REQUESTS,
            "open requests unbounded: {}",
            self.session.open_requests()
        );
    }

    /// Sends the outbox entries not in flight, oldest first.
    pub fn send_outbox(&mut self) {
        if self.stage != Stage::Live || self.link.is_none() {
            return;
        }
        let in_flight = self.session.appends_in_flight();
        let mut open = in_flight.len();
        let ids: Vec<u64> = self.outbox.keys().copied().collect();
        for id in ids {
            if open >= MAX_APPENDS_IN_FLIGHT {
                break;
            }
            if in_flight.contains(&(id as i64)) || self.deferred.contains_key(&id) {
                continue;
            }
            let item = self.outbox[&id].clone();
            let req = self
                .session
                .request(crate::engine::session::Pending::Append { outbox: id as i64 });
            self.out.push(Message::Append {
                req,
                group: item.group,
                envelope: item.envelope,
            });
            open += 1;
        }
    }

    /// The documents this device syncs: its account document and the documents of every
    /// conversation whose group's latest update lists its account, with their groups.
    pub fn synced_docs(&self) -> Vec<(DocAddr, DocId)> {
        let account = self.account();
        let mut out = vec![(
            DocAddr::Account(account),
            DocAddr::Account(account).doc_id(),
        )];
        for (group, g) in &self.groups {
            let Some(DocAddr::Meta(c)) = g.addr else {
                continue;
            };
            if !g.latest().is_some_and(|u| u.is_member(&account)) {
                continue;
            }
            out.push((DocAddr::Meta(c), *group));
            let segments = self.replica.segment_numbers(&c).unwrap_or_else(|_| vec![0]);
            out.extend(
                segments
                    .into_iter()
                    .map(|n| (DocAddr::Segment(c, n), *group)),
            );
        }
        out
    }

    /// The address of a synced document.
    pub fn addr_of(&self, doc: &DocId) -> Option<DocAddr> {
        self.synced_docs()
            .into_iter()
            .map(|(a, _)| a)
            .chain(self.replica.docs())
            .find(|a| a.doc_id() == *doc)
    }

    /// Subscribes the synced documents not subscribed yet whose group the relay holds.
    pub fn subscribe_new(&mut self) {
        if self.stage != Stage::Live {
            return;
        }
        let new: Vec<(DocId, DocId)> = self
            .synced_docs()
            .into_iter()
            .map(|(a, g)| (a.doc_id(), g))
            .filter(|(d, g)| self.relay_groups.contains(g) && !self.subscribed.contains(d))
            .collect();
        if new.is_empty() {
            return;
        }
        let docs: Vec<DocId> = new.iter().map(|(d, _)| *d).collect();
        let req = self
            .session
            .request(crate::engine::session::Pending::Subscribe(docs.clone()));
        self.session.start_catch_up(&docs);
        self.subscribed.extend(docs.iter().copied());
        let items = new
            .into_iter()
            .map(|(doc, group)| crate::wire::message::Subscription {
                doc,
                group,
                after_seq: self.session.cursor(&doc),
                snapshot: false,
            })
            .collect();
        self.out.push(Message::Subscribe { req, items });
    }

    /// Asks for `doc` after `after_seq`.
    pub(super) fn fetch(&mut self, doc: DocId, after_seq: u64) {
        let req = self
            .session
            .request(crate::engine::session::Pending::Fetch(doc));
        self.out.push(Message::Fetch {
            req,
            doc,
            after_seq,
            limit: crate::engine::FETCH_LIMIT,
        });
    }

    /// Fetches again the documents whose envelopes could not be opened yet (after a group's
    /// updates arrived, as the engine does).
    pub(super) fn retry_blocked(&mut self) {
        let docs: Vec<DocId> = self.blocked.keys().copied().collect();
        for doc in docs {
            if self.session.doc_cursor(&doc).is_some_and(|c| c.fetching) {
                continue;
            }
            let after = self.session.cursor(&doc);
            self.fetch(doc, after);
        }
    }

    /// Whether nothing is left to do with the relay: live, nothing open, nothing to send.
    /// Documents whose envelopes wait for a log or a key, with the attempts so far.
    pub fn blocked_docs(&self) -> Vec<(DocId, u32)> {
        self.blocked.iter().map(|(d, n)| (*d, *n)).collect()
    }

    pub fn settled(&self) -> bool {
        self.link.is_some()
            && self.stage == Stage::Live
            && self.session.open_requests() == 0
            // Every append must be taken or, for a removed member, dropped.
            && self.outbox.is_empty()
            && self.blocked.is_empty()
            && self.out.is_empty()
    }

    /// Records the relay's group list and posts what it lacks of this device's own updates.
    pub(super) fn set_relay_groups(&mut self, listed: &[(DocId, u32)]) {
        let listed: BTreeMap<DocId, u32> = listed.iter().copied().collect();
        self.relay_groups = listed.keys().copied().collect();
        let me = self.device();
        let account = self.account();
        let mut posts = Vec::new();
        let mut fetches = Vec::new();
        let mut resign = Vec::new();
        for (group, g) in &self.groups {
            let held = listed.get(group).map_or(0, |v| v + 1) as usize;
            for u in g.updates.iter().skip(held) {
                // As in the engine: an update of a device of this account revoked since is
                // signed again here.
                let revoked_own = u.signer_account == account
                    && self.log.device(&u.signer).is_some()
                    && !self.log.is_current(&u.signer);
                if revoked_own {
                    resign.push(u.clone());
                    continue;
                }
                if u.signer != me {
                    break;
                }
                posts.push(u.clone());
            }
            if held > g.updates.len() {
                fetches.push((*group, g.updates.len() as u32));
            }
            if let (Some(head), Some(v)) = (g.latest(), listed.get(group)) {
                if head.signer == me && *v >= head.version {
                    fetches.push((*group, head.version));
                }
            }
            // As the engine: a group held as a member that the relay does not list, with
            // updates by others, may have removed this account while it was offline; fetching
            // from the held version brings the removal.
            let member = g.latest().is_some_and(|u| u.is_member(&account));
            let others = g.updates.iter().any(|u| u.signer != me);
            if !listed.contains_key(group) && member && others {
                fetches.push((*group, g.updates.len() as u32));
            }
        }
        for u in resign {
            let update = GroupUpdate::sign(
                &self.secret,
                account,
                u.group,
                u.version,
                u.members.clone(),
                u.keys.clone(),
                u.label.clone(),
            )
            .expect("a valid update");
            if let Some(g) = self.groups.get_mut(&u.group) {
                g.updates[u.version as usize] = update.clone();
            }
            posts.push(update);
        }
        posts.sort_by_key(|u| (u.group, u.version));
        for group in listed.keys() {
            if !self.groups.contains_key(group) {
                fetches.push((*group, 0));
            }
        }
        for update in posts {
            self.post_group(update);
        }
        for (group, from_version) in fetches {
            self.fetch_group(group, from_version);
        }
    }

    /// Whether this account is a member of `group` as far as this device knows (a group it
    /// holds nothing of counts as one).
    pub(super) fn is_member_of(&self, group: &DocId) -> bool {
        let account = self.account();
        self.groups
            .get(group)
            .and_then(|g| g.latest())
            .is_none_or(|u| u.is_member(&account))
    }

    /// This account was removed from `group`: its outbox entries can never be accepted, so
    /// they are dropped (the engine reports them to the app as not delivered).
    pub(super) fn on_removed(&mut self, group: DocId) {
        self.outbox.retain(|_, o| o.group != group);
        self.deferred.retain(|id, _| self.outbox.contains_key(id));
        // As in the engine: nothing waits for envelopes this device can no longer open.
        let blocked: Vec<DocId> = self.blocked.keys().copied().collect();
        for d in blocked {
            if self.addr_of(&d).is_none_or(|a| group_of(&a) == group) {
                self.blocked.remove(&d);
            }
        }
    }

    pub(super) fn post_group(&mut self, update: GroupUpdate) {
        let (group, version) = (update.group, update.version);
        self.relay_groups.insert(group);
        let req = self
            .session
            .request(crate::engine::session::Pending::PostGroup { group, version });
        self.out.push(Message::PostGroup { req, update });
    }

    pub(super) fn fetch_group(&mut self, group: DocId, from_version: u32) {
        let req = self
            .session
            .request(crate::engine::session::Pending::FetchGroup(group));
        self.out.push(Message::FetchGroup {
            req,
            group,
            from_version,
        });
    }

    /// Offers an outbox entry again only after [`RETRY_APPEND_MS`].
    pub(super) fn defer_append(&mut self, id: u64) {
        self.deferred.insert(id, self.now_ms + RETRY_APPEND_MS);
    }

    /// Whether `doc` is subscribed on the current connection.
    pub fn is_subscribed(&self, doc: &DocId) -> bool {
        self.subscribed.contains(doc)
    }

    pub(super) fn blocked_mut(&mut self) -> &mut BTreeMap<DocId, u32> {
        &mut self.blocked
    }

    pub(super) fn relay_groups_mut(&mut self) -> &mut BTreeSet<DocId> {
        &mut self.relay_groups
    }

    pub(super) fn subscribed_mut(&mut self) -> &mut BTreeSet<DocId> {
        &mut self.subscribed
    }
}
