//! A simulated device's direct sync with other devices, sans-IO: the protocol of
//! `engine/worker/peers.rs` (see `docs/PROTOCOL.md`, "Device ↔ device") with the real wire
//! messages.
//!
//! Each side sends `PeerHello` with its account's whole log; the receiver refuses a device of
//! an account that shares no conversation with it (`Error` `UNAUTHORISED`, then close), merges
//! the log (a known log must be a prefix of it, or it of the known one) and accepts the device
//! only if the log lists it as current. It then sends the logs of the other accounts the peer
//! needs, the chains of the groups the peer may see and a `PeerSync` with its version vector
//! of every document the peer may see. A `PeerSync` is answered from the device's **archive**
//! of every envelope it sealed or accepted: per writer, the envelopes past the asker's count
//! that continue its sequence, then `Done`. The simulation has no snapshots, so the archive
//! has no gaps and an own-account peer never gets a snapshot instead.
//!
//! Live: an envelope new to the archive goes to every accepted peer that may see its document
//! except the one it came from (so copies die out); one learnt from a peer also joins the
//! outbox for the relay, which accepts another member device's envelope. New group updates go
//! to the peers sharing the group, a changed own log to the peers of the account. A peer no
//! longer current in the device's copy of its log is refused and disconnected, and a device
//! that learns its own revocation closes every direct link.

use std::collections::{BTreeMap, BTreeSet};

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::envelope::SealedEnvelope;
use crate::ids::{AccountId, DeviceId, DocAddr, DocId};
use crate::wire::frame::ErrorCode;
use crate::wire::message::{
    DocVersion, MAX_SYNC_DOCS, MAX_UPDATES_PER_MESSAGE, Message, StoredEnvelope,
    TARGET_ENVELOPES_BYTES,
};

use super::device::{Device, OutItem, group_of};
use super::proto::OpenError;

/// One archived envelope: its writer's last change and its bytes, keyed by writer and first
/// change.
type Archive = BTreeMap<DocId, BTreeMap<(DeviceId, u64), (u64, Vec<u8>)>>;

/// What a device sends on a direct link.
#[derive(Debug)]
pub(crate) enum PeerOut {
    Message(Box<Message>),
    /// Close the link once what was queued before is delivered.
    Close,
}

/// One direct link as the device sees it.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The device on the other end (the key the transport authenticated).
    pub device: DeviceId,
    /// Its account, once its hello was accepted.
    pub account: Option<AccountId>,
    next_req: u32,
    /// `PeerSync` requests not answered with `Done` yet.
    syncs: BTreeSet<u32>,
    /// Documents asked about on this link.
    asked: BTreeSet<DocId>,
}

/// A device's direct sync state. The archive is durable (written with the turn's commit); the
/// links are memory only.
#[derive(Debug, Default)]
pub(crate) struct PeerState {
    pub peers: BTreeMap<u64, Peer>,
    archive: Archive,
    stored_archive: Archive,
    /// Archived this turn, stored at the commit.
    unstored: Vec<(DocId, DeviceId, u64, u64, Vec<u8>)>,
    /// Messages for the world to put on the links.
    pub out: Vec<(u64, PeerOut)>,
    /// New envelopes to pass on at the end of the turn: the document and the link it came from.
    forward: Vec<(DocAddr, Vec<u8>, Option<u64>)>,
    /// Outbox entries already archived (this device's own envelopes are archived as sealed).
    outbox_mark: u64,
    /// Group updates already passed on to peers, per group.
    announced: BTreeMap<DocId, usize>,
    /// Own log entries already passed on to peers.
    announced_log: usize,
    /// Documents whose envelopes from a peer could not be opened yet, and what the device
    /// knew then (logs and groups): asked again once that changed.
    blocked: BTreeSet<DocId>,
    blocked_mark: usize,
    /// What the device knew (logs, groups, documents) when it last asked its peers: nothing
    /// new to ask about while it is the same.
    synced_mark: usize,
    /// Counters for the report: envelopes received over direct links, peers refused.
    pub envelopes_received: u64,
    pub refusals: u64,
}

impl PeerState {
    /// Whether no `PeerSync` of this device is open.
    pub fn quiet(&self) -> bool {
        self.peers.values().all(|p| p.syncs.is_empty()) && self.out.is_empty()
    }
}

fn envelope_items(bytes: Vec<u8>) -> StoredEnvelope {
    StoredEnvelope {
        seq: 0,
        prev: 0,
        envelope: bytes,
    }
}

impl Device {
    // ---- links -----------------------------------------------------------------------------

    /// A direct link to `device` is up: say who this device is.
    pub fn on_peer_connected(&mut self, link: u64, device: DeviceId) {
        if !self.is_current() {
            self.direct.out.push((link, PeerOut::Close));
            return;
        }
        let hello = Message::PeerHello {
            account: self.account(),
            entries: self.log.entries().to_vec(),
        };
        self.direct
            .out
            .push((link, PeerOut::Message(Box::new(hello))));
        self.direct.peers.insert(
            link,
            Peer {
                device,
                account: None,
                next_req: 0,
                syncs: BTreeSet::new(),
                asked: BTreeSet::new(),
            },
        );
    }

    /// The link is gone (either side closed it, a fault, a crash).
    pub fn on_peer_disconnected(&mut self, link: u64) {
        self.direct.peers.remove(&link);
        self.direct.out.retain(|(l, _)| *l != link);
    }

    fn send_peer(&mut self, link: u64, msg: Message) {
        if self.direct.peers.contains_key(&link) {
            self.direct
                .out
                .push((link, PeerOut::Message(Box::new(msg))));
        }
    }

    /// Turns a peer away: what was queued for it is dropped, it hears why, the link closes.
    fn refuse_peer(&mut self, link: u64, reason: &str) {
        if self.direct.peers.remove(&link).is_none() {
            return;
        }
        self.direct.refusals += 1;
        self.direct.out.retain(|(l, _)| *l != link);
        let msg = Message::Error {
            req: 0,
            code: ErrorCode::UNAUTHORISED,
            text: format!("refused: {reason}"),
        };
        self.direct
            .out
            .push((link, PeerOut::Message(Box::new(msg))));
        self.direct.out.push((link, PeerOut::Close));
    }

    fn live_peers(&self) -> Vec<u64> {
        self.direct
            .peers
            .iter()
            .filter(|(_, p)| p.account.is_some())
            .map(|(l, _)| *l)
            .collect()
    }

    fn peer_account(&self, link: u64) -> Option<AccountId> {
        self.direct.peers.get(&link).and_then(|p| p.account)
    }

    /// Whether `device` is current in this device's copy of `account`'s log.
    pub fn knows_current(&self, account: &AccountId, device: &DeviceId) -> bool {
        if *account == self.account() {
            self.log.is_current(device)
        } else {
            self.logs.get(account).is_some_and(|l| l.is_current(device))
        }
    }

    /// Groups this account and `account` are both current members of, as this device knows.
    pub fn shared_groups(&self, account: &AccountId) -> Vec<DocId> {
        let me = self.account();
        self.groups
            .iter()
            .filter(|(_, g)| {
                g.latest()
                    .is_some_and(|u| u.is_member(&me) && u.is_member(account))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether the peer on `link` may see `addr`.
    fn peer_shares(&self, link: u64, addr: &DocAddr) -> bool {
        let Some(p) = self.direct.peers.get(&link) else {
            return false;
        };
        let Some(account) = p.account else {
            return false;
        };
        if !self.knows_current(&account, &p.device) {
            return false;
        }
        if account == self.account() {
            return true;
        }
        let me = self.account();
        self.groups
            .get(&group_of(addr))
            .and_then(|g| g.latest())
            .is_some_and(|u| u.is_member(&me) && u.is_member(&account))
    }

    // ---- messages --------------------------------------------------------------------------

    /// Handles one message from a peer, then commits the turn.
    pub fn handle_peer(&mut self, link: u64, msg: Message, now_ms: u64) {
        let Some(known) = self.direct.peers.get(&link).map(|p| p.account.is_some()) else {
            // The link was closed on this side; what was in flight is dropped.
            return;
        };
        match msg {
            Message::PeerHello { account, entries } => {
                if let Err(reason) = self.on_peer_hello(link, account, entries) {
                    self.refuse_peer(link, &reason);
                }
            }
            Message::Error { .. } => {
                // The other side refused this device; it closes the link.
            }
            _ if !known => self.refuse_peer(link, "nothing is accepted before the hello"),
            Message::LogEntries {
                account, entries, ..
            } => self.on_peer_log(link, account, entries),
            Message::GroupUpdates { group, updates, .. } => {
                self.absorb_group_updates(group, updates, false);
            }
            Message::PeerSync { req, docs } => self.on_peer_sync(link, req, docs),
            Message::Envelopes { doc, items, .. } => {
                self.on_peer_envelopes(link, doc, items, now_ms)
            }
            Message::Done { req } => {
                if let Some(p) = self.direct.peers.get_mut(&link) {
                    p.syncs.remove(&req);
                }
            }
            other => self
                .refused
                .push(format!("unexpected message from a peer {other:?}")),
        }
        self.commit();
    }

    fn on_peer_hello(
        &mut self,
        link: u64,
        account: AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<(), String> {
        let device = self.direct.peers[&link].device;
        if self.direct.peers[&link].account.is_some() {
            return Err("a second hello".into());
        }
        if account != self.account() && self.shared_groups(&account).is_empty() {
            return Err("no conversation is shared with this account".into());
        }
        self.merge_log(account, entries)
            .map_err(|e| format!("device log: {e}"))?;
        if !self.knows_current(&account, &device) {
            return Err("not a current device of its account".into());
        }
        if let Some(p) = self.direct.peers.get_mut(&link) {
            p.account = Some(account);
        }
        self.greet_peer(link);
        Ok(())
    }

    /// Takes an account's whole log as a peer sent it (the engine's `merge_log`).
    fn merge_log(
        &mut self,
        account: AccountId,
        entries: Vec<DeviceLogEntry>,
    ) -> Result<(), String> {
        let own = account == self.account();
        let known = if own {
            Some(&self.log)
        } else {
            self.logs.get(&account)
        };
        let Some(known) = known else {
            let log = DeviceLog::verify(&account, entries).map_err(|e| e.to_string())?;
            self.logs.insert(account, log);
            return Ok(());
        };
        let mismatch = || "the peer's device log and the one held here".to_string();
        let held = known.len();
        let (Some(last), false) = (entries.last(), held == 0) else {
            return Err(mismatch());
        };
        if entries.len() <= held {
            let same = known.entries()[entries.len() - 1].hash() == last.hash();
            return if same { Ok(()) } else { Err(mismatch()) };
        }
        if entries[held - 1].hash() != known.head() {
            return Err(mismatch());
        }
        let log = if own {
            &mut self.log
        } else {
            self.logs.get_mut(&account).expect("known above")
        };
        for e in entries.into_iter().skip(held) {
            log.append(e).map_err(|e| e.to_string())?;
        }
        if own && !self.is_current() {
            self.drop_link = true;
        }
        Ok(())
    }

    /// A log a peer passes on: its own account's from any peer, any account's from a device of
    /// this account.
    fn on_peer_log(&mut self, link: u64, account: AccountId, entries: Vec<DeviceLogEntry>) {
        let Some(from) = self.peer_account(link) else {
            return;
        };
        if from != self.account() && from != account {
            return;
        }
        if let Err(e) = self.merge_log(account, entries) {
            self.refused
                .push(format!("log of {account:?} from a peer: {e}"));
        }
    }

    /// Logs, then group chains, then what this device holds of each shared document.
    fn greet_peer(&mut self, link: u64) {
        let Some(account) = self.peer_account(link) else {
            return;
        };
        let groups: Vec<DocId> = if account == self.account() {
            self.groups.keys().copied().collect()
        } else {
            self.shared_groups(&account)
        };
        let mut accounts: BTreeSet<AccountId> = BTreeSet::new();
        for g in &groups {
            if let Some(u) = self.groups.get(g).and_then(|g| g.latest()) {
                accounts.extend(u.members.iter().copied());
            }
        }
        accounts.remove(&self.account());
        accounts.remove(&account);
        for a in accounts {
            if let Some(log) = self.logs.get(&a) {
                let msg = Message::LogEntries {
                    req: 0,
                    account: a,
                    first_seq: 0,
                    entries: log.entries().to_vec(),
                };
                self.send_peer(link, msg);
            }
        }
        for group in groups {
            let updates = self.groups[&group].updates.clone();
            for chunk in updates.chunks(MAX_UPDATES_PER_MESSAGE) {
                let msg = Message::GroupUpdates {
                    req: 0,
                    group,
                    updates: chunk.to_vec(),
                };
                self.send_peer(link, msg);
            }
        }
        self.sync_with_peer(link);
    }

    /// Asks a peer about the synced documents it may see and was not asked about on this link.
    fn sync_with_peer(&mut self, link: u64) {
        let Some(p) = self.direct.peers.get(&link) else {
            return;
        };
        let asked = p.asked.clone();
        let mut wanted: Vec<DocVersion> = Vec::new();
        for (addr, _) in self.synced_docs() {
            let doc = addr.doc_id();
            if asked.contains(&doc) || !self.peer_shares(link, &addr) {
                continue;
            }
            let held = self
                .replica
                .version_vector(&addr)
                .iter()
                .map(|(d, n)| (*d, *n))
                .collect();
            wanted.push(DocVersion { doc, held });
        }
        for docs in wanted.chunks(MAX_SYNC_DOCS) {
            let Some(p) = self.direct.peers.get_mut(&link) else {
                return;
            };
            p.next_req = p.next_req.wrapping_add(1).max(1);
            let req = p.next_req;
            p.asked.extend(docs.iter().map(|d| d.doc));
            p.syncs.insert(req);
            self.send_peer(
                link,
                Message::PeerSync {
                    req,
                    docs: docs.to_vec(),
                },
            );
        }
    }

    /// Answers a `PeerSync` at once: per document the peer may see, the archived envelopes
    /// past its vector that continue each writer's sequence, then `Done`.
    fn on_peer_sync(&mut self, link: u64, req: u32, docs: Vec<DocVersion>) {
        let addrs: BTreeMap<DocId, DocAddr> = self
            .synced_docs()
            .into_iter()
            .map(|(a, _)| (a.doc_id(), a))
            .collect();
        for d in docs {
            let Some(addr) = addrs.get(&d.doc).copied() else {
                continue;
            };
            if !self.peer_shares(link, &addr) {
                continue;
            }
            let theirs: BTreeMap<DeviceId, u64> = d.held.iter().copied().collect();
            let mut all = Vec::new();
            if let Some(rows) = self.direct.archive.get(&d.doc) {
                let mut reached: BTreeMap<DeviceId, u64> = BTreeMap::new();
                for ((author, first), (last, bytes)) in rows {
                    let at = reached
                        .entry(*author)
                        .or_insert_with(|| theirs.get(author).copied().unwrap_or(0));
                    if *last <= *at || *first > *at + 1 {
                        // Held by the peer, or past a gap (none in the simulation).
                        continue;
                    }
                    *at = *last;
                    all.push(bytes.clone());
                }
            }
            self.send_envelopes(link, req, d.doc, all);
        }
        self.send_peer(link, Message::Done { req });
    }

    fn send_envelopes(&mut self, link: u64, req: u32, doc: DocId, all: Vec<Vec<u8>>) {
        let mut items = Vec::new();
        let mut bytes = 0;
        for envelope in all {
            bytes += envelope.len();
            items.push(envelope_items(envelope));
            if bytes >= TARGET_ENVELOPES_BYTES {
                let items = std::mem::take(&mut items);
                self.send_peer(
                    link,
                    Message::Envelopes {
                        req,
                        doc,
                        items,
                        more: false,
                    },
                );
                bytes = 0;
            }
        }
        if !items.is_empty() {
            self.send_peer(
                link,
                Message::Envelopes {
                    req,
                    doc,
                    items,
                    more: false,
                },
            );
        }
    }

    /// Envelopes from a peer: checked and applied like a relay's; the new ones are archived,
    /// passed on and queued for the relay.
    fn on_peer_envelopes(&mut self, link: u64, doc: DocId, items: Vec<StoredEnvelope>, now: u64) {
        let Some(addr) = self.addr_of(&doc) else {
            // A document this device does not know yet: asked about once it does.
            return;
        };
        if !self.peer_shares(link, &addr) {
            return;
        }
        self.direct.envelopes_received += items.len() as u64;
        let mut batches = Vec::new();
        let mut opened = Vec::new();
        for it in items {
            if self.archived(&doc, &it.envelope) {
                // Held already (the same bytes): nothing to open or pass on.
                continue;
            }
            match self.open_changes(&addr, &it.envelope) {
                Ok(Some(batch)) => {
                    batches.push(batch);
                    opened.push(it.envelope);
                }
                Ok(None) => {}
                Err(OpenError::NotYet(_) | OpenError::AwaitsRewrap) => {
                    self.direct.blocked.insert(doc);
                }
                Err(OpenError::AfterRemoval) => {}
                Err(OpenError::Refused(e)) => {
                    self.refused.push(format!("envelope from a peer: {e}"));
                }
            }
        }
        if batches.is_empty() {
            return;
        }
        let report = self.replica.apply(self.local_ms(now), batches);
        if !report.rejected.is_empty() {
            for (addr, e) in report.rejected {
                self.refused
                    .push(format!("batch of {addr:?} from a peer: {e}"));
            }
            return;
        }
        self.archive_accepted(&addr, opened, Some(link));
    }

    /// Archives envelopes accepted from a relay (`from` `None`) or a peer; those new here are
    /// passed on to the other peers and, if they came from a peer, queued for the relay.
    pub(super) fn archive_accepted(
        &mut self,
        addr: &DocAddr,
        envelopes: Vec<Vec<u8>>,
        from: Option<u64>,
    ) {
        for bytes in envelopes {
            let Ok(env) = SealedEnvelope::decode(&bytes) else {
                continue;
            };
            if !self.archive(addr, &env, &bytes) {
                continue;
            }
            self.direct.forward.push((*addr, bytes, from));
            if from.is_some() {
                let id = self.next_outbox;
                self.next_outbox += 1;
                let group = group_of(addr);
                self.outbox.insert(
                    id,
                    OutItem {
                        group,
                        envelope: env,
                    },
                );
            }
        }
    }

    /// Whether exactly these envelope bytes are archived.
    fn archived(&self, doc: &DocId, bytes: &[u8]) -> bool {
        let Ok(env) = SealedEnvelope::decode(bytes) else {
            return false;
        };
        let h = &env.header;
        self.direct
            .archive
            .get(doc)
            .and_then(|rows| rows.get(&(h.author, h.first_seq)))
            .is_some_and(|(_, b)| b == bytes)
    }

    /// Adds an envelope to the archive; whether it was new.
    fn archive(&mut self, addr: &DocAddr, env: &SealedEnvelope, bytes: &[u8]) -> bool {
        let h = &env.header;
        let rows = self.direct.archive.entry(addr.doc_id()).or_default();
        if rows.contains_key(&(h.author, h.first_seq)) {
            return false;
        }
        rows.insert((h.author, h.first_seq), (h.last_seq, bytes.to_vec()));
        self.direct.unstored.push((
            addr.doc_id(),
            h.author,
            h.first_seq,
            h.last_seq,
            bytes.to_vec(),
        ));
        true
    }

    // ---- the turn's end --------------------------------------------------------------------

    /// Part of the commit: archives this device's newly sealed envelopes, drops revoked peers,
    /// passes on new group updates, a changed own log and new envelopes, stores the archive.
    pub(super) fn commit_direct(&mut self) {
        let me = self.device();
        let sealed: Vec<(u64, OutItem)> = self
            .outbox
            .range(self.direct.outbox_mark..)
            .filter(|(_, o)| o.envelope.header.author == me)
            .map(|(id, o)| (*id, o.clone()))
            .collect();
        for (_, o) in sealed {
            let Some(addr) = self.addr_of(&o.envelope.header.doc) else {
                continue;
            };
            let bytes = o.envelope.encode();
            if self.archive(&addr, &o.envelope, &bytes) {
                self.direct.forward.push((addr, bytes, None));
            }
        }
        self.direct.outbox_mark = self.next_outbox;
        self.forget_blocked_of_left_groups();
        self.drop_revoked_peers();
        self.announce_groups();
        self.announce_own_log();
        let forward = std::mem::take(&mut self.direct.forward);
        for (addr, bytes, except) in forward {
            for link in self.live_peers() {
                if Some(link) == except || !self.peer_shares(link, &addr) {
                    continue;
                }
                let msg = Message::Envelopes {
                    req: 0,
                    doc: addr.doc_id(),
                    items: vec![envelope_items(bytes.clone())],
                    more: false,
                };
                self.send_peer(link, msg);
            }
        }
        for (doc, author, first, last, bytes) in self.direct.unstored.drain(..) {
            self.direct
                .stored_archive
                .entry(doc)
                .or_default()
                .insert((author, first), (last, bytes));
        }
    }

    /// A crash: the links are gone, the archive is what was stored.
    pub(super) fn crash_direct(&mut self) {
        let d = &mut self.direct;
        d.peers.clear();
        d.out.clear();
        d.forward.clear();
        d.unstored.clear();
        d.blocked.clear();
        d.archive = d.stored_archive.clone();
        d.outbox_mark = self.next_outbox;
    }

    /// Documents of a group this account is no longer a member of are not waited for: their
    /// envelopes (of an epoch after the removal, pushed before the relay took the removal in)
    /// will never open. Without this a removed member's device kept them blocked for good and
    /// never counted as settled.
    fn forget_blocked_of_left_groups(&mut self) {
        let account = self.account();
        let left: Vec<DocId> = self
            .blocked_mut()
            .keys()
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|doc| {
                // A meta document's id is its group's; a segment's group is its meta document's.
                let group = if self.groups.contains_key(doc) {
                    Some(*doc)
                } else {
                    self.addr_of(doc).map(|a| group_of(&a))
                };
                group
                    .and_then(|g| self.groups.get(&g))
                    .and_then(|g| g.latest())
                    .is_some_and(|u| !u.is_member(&account))
            })
            .collect();
        for doc in left {
            self.blocked_mut().remove(&doc);
        }
    }

    /// Peers no longer current in this device's copies of the logs are refused; a device no
    /// longer current itself closes every link.
    fn drop_revoked_peers(&mut self) {
        let me_current = self.is_current();
        let revoked: Vec<u64> = self
            .direct
            .peers
            .iter()
            .filter(|(_, p)| {
                !me_current
                    || p.account
                        .is_some_and(|a| !self.knows_current(&a, &p.device))
            })
            .map(|(l, _)| *l)
            .collect();
        for link in revoked {
            self.refuse_peer(link, "the device was revoked");
        }
    }

    /// Group updates made or learnt since the last turn go to the peers sharing the group.
    fn announce_groups(&mut self) {
        let links = self.live_peers();
        let mut sends = Vec::new();
        for (group, g) in &self.groups {
            let from = self.direct.announced.get(group).copied().unwrap_or(0);
            if g.updates.len() <= from {
                continue;
            }
            for link in &links {
                let Some(account) = self.peer_account(*link) else {
                    continue;
                };
                let new: Vec<_> = g.updates[from..]
                    .iter()
                    .filter(|u| account == self.account() || u.is_member(&account))
                    .cloned()
                    .collect();
                if !new.is_empty() {
                    sends.push((*link, *group, new));
                }
            }
            self.direct.announced.insert(*group, g.updates.len());
        }
        for (link, group, updates) in sends {
            let msg = Message::GroupUpdates {
                req: 0,
                group,
                updates,
            };
            self.send_peer(link, msg);
        }
    }

    /// A changed own log goes to the peers of this account.
    fn announce_own_log(&mut self) {
        if self.log.len() <= self.direct.announced_log {
            return;
        }
        self.direct.announced_log = self.log.len();
        let own = self.account();
        for link in self.live_peers() {
            if self.peer_account(link) == Some(own) {
                let msg = Message::LogEntries {
                    req: 0,
                    account: own,
                    first_seq: 0,
                    entries: self.log.entries().to_vec(),
                };
                self.send_peer(link, msg);
            }
        }
    }

    /// Timers: documents learnt since (a conversation, a segment) are asked of every peer, and
    /// blocked ones again once a log or a group changed.
    pub fn tick_direct(&mut self) {
        if self.direct.peers.is_empty() {
            return;
        }
        let mark = self.logs.values().map(DeviceLog::len).sum::<usize>()
            + self.log.len()
            + self.groups.values().map(|g| g.updates.len()).sum::<usize>();
        let synced = mark + self.replica.docs().len();
        let retry = !self.direct.blocked.is_empty() && mark != self.direct.blocked_mark;
        if !retry && synced == self.direct.synced_mark {
            return;
        }
        self.direct.synced_mark = synced;
        if retry {
            self.direct.blocked_mark = mark;
            let blocked = std::mem::take(&mut self.direct.blocked);
            for p in self.direct.peers.values_mut() {
                p.asked.retain(|d| !blocked.contains(d));
            }
        }
        for link in self.live_peers() {
            self.sync_with_peer(link);
        }
    }
}
