//! Direct links between devices in the simulated network: dialling, delivery, faults and the
//! check that a revoked device is served nothing over them.
//!
//! A direct link joins two devices without the relay (a LAN or a reachable address). Each
//! direction is ordered and every message takes the same delays as on a relay link. Links are
//! dialled at random between two current devices of the same account or of two accounts that
//! share a conversation as the dialling device knows it (so the other side may still refuse
//! it), at most [`MAX_DIRECT_LINKS`] at once and one per pair; a cut link is dialled again the
//! same way. A link is cut by a link fault, a crash of either device, or a *full partition* of
//! either device (cut off the relay and the LAN for 0.1–3 s; no link is dialled to it
//! meanwhile). The other partition, of the relay only, leaves direct links alone: a device on
//! a LAN whose internet is down. A relay outage ([`Config::relay_outage`]) makes the relay
//! unreachable for a stretch of the run while direct links carry the traffic.

use std::collections::{BTreeMap, VecDeque};

use crate::wire::message::Message;

use super::peers::PeerOut;
use super::{START_MS, STEP_MS, World};

/// Direct links open at once, at most.
pub(crate) const MAX_DIRECT_LINKS: usize = 4;
/// Per-mille chance, per step, that a direct link is dialled (the default).
pub(crate) const DIRECT_PER_MILLE: u64 = 20;

/// One direct link: `a` dialled `b`.
#[derive(Debug, Default)]
pub(super) struct DirectLink {
    a: usize,
    b: usize,
    to_b: VecDeque<(u64, Vec<u8>)>,
    to_a: VecDeque<(u64, Vec<u8>)>,
    last_to_b: u64,
    last_to_a: u64,
    /// A side closed it: nothing more is queued; it ends once both directions drained.
    closing: bool,
}

/// The direct part of the network.
#[derive(Debug, Default)]
pub(super) struct Direct {
    links: BTreeMap<u64, DirectLink>,
    next: u64,
    /// Devices cut off the relay and the LAN, until when.
    isolated_until: BTreeMap<usize, u64>,
}

impl Direct {
    /// Whether no message is in flight on any direct link.
    pub fn idle(&self) -> bool {
        self.links
            .values()
            .all(|l| l.to_a.is_empty() && l.to_b.is_empty())
    }
}

impl World {
    /// The relay outage: at its first step every relay link is cut and the relay stays
    /// unreachable until its end.
    pub(super) fn relay_outage(&mut self) {
        let step = (self.now - START_MS) / STEP_MS;
        let Some((from, to)) = self.cfg.relay_outage else {
            return;
        };
        if step == from {
            self.relay_down_until = self.relay_down_until.max(START_MS + to * STEP_MS);
            let ids: Vec<u64> = self.links.keys().copied().collect();
            for id in ids {
                self.cut(id);
            }
        }
    }

    fn isolated(&self, d: usize) -> bool {
        self.direct
            .isolated_until
            .get(&d)
            .is_some_and(|t| self.now < *t)
    }

    /// Whether `a`, as it knows, may sync directly with `b`.
    fn may_dial(&self, a: usize, b: usize) -> bool {
        let (da, db) = (&self.devices[a], &self.devices[b]);
        da.account() == db.account() || !da.shared_groups(&db.account()).is_empty()
    }

    /// Dials a random direct link, sometimes.
    pub(super) fn maybe_dial(&mut self) {
        if !self.rng.chance(self.cfg.direct_per_mille)
            || self.direct.links.len() >= MAX_DIRECT_LINKS
        {
            return;
        }
        let n = self.devices.len() as u64;
        let (a, b) = (self.rng.below(n) as usize, self.rng.below(n) as usize);
        let linked = self
            .direct
            .links
            .values()
            .any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a));
        let up = |d: usize| {
            self.devices[d].is_current()
                && !self.isolated(d)
                && (self.cfg.direct_revoked || !self.revoked.contains_key(&d))
        };
        if a == b || linked || !up(a) || !up(b) || !self.may_dial(a, b) {
            return;
        }
        self.dial(a, b);
    }

    /// Dials every pair that both sides would accept and is not linked yet (the relay outage's
    /// direct heal).
    pub(super) fn dial_all(&mut self) {
        let n = self.devices.len();
        for a in 0..n {
            for b in a + 1..n {
                let linked = self
                    .direct
                    .links
                    .values()
                    .any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a));
                let up = |d: usize| self.is_live_device(d) && !self.isolated(d);
                if !linked && up(a) && up(b) && self.may_dial(a, b) && self.may_dial(b, a) {
                    self.dial(a, b);
                }
            }
        }
    }

    fn dial(&mut self, a: usize, b: usize) {
        let id = self.direct.next;
        self.direct.next += 1;
        self.direct.links.insert(
            id,
            DirectLink {
                a,
                b,
                ..DirectLink::default()
            },
        );
        self.stats.direct_links += 1;
        self.record(format!("dial {a} {b}").as_bytes());
        if self.verbose {
            eprintln!("{} d{a} dials d{b} (direct {id})", self.now - START_MS);
        }
        let (da, db) = (self.devices[a].device(), self.devices[b].device());
        // The dialling side speaks first (QUIC announces a stream with its first bytes).
        self.devices[a].on_peer_connected(id, db);
        self.flush_direct(a);
        self.devices[b].on_peer_connected(id, da);
        self.flush_direct(b);
    }

    /// Ends a direct link on both sides.
    pub(super) fn cut_direct(&mut self, id: u64) {
        let Some(l) = self.direct.links.remove(&id) else {
            return;
        };
        self.devices[l.a].on_peer_disconnected(id);
        self.devices[l.b].on_peer_disconnected(id);
    }

    /// Cuts every direct link of `d`.
    pub(super) fn cut_direct_of(&mut self, d: usize) {
        let ids: Vec<u64> = self
            .direct
            .links
            .iter()
            .filter(|(_, l)| l.a == d || l.b == d)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.cut_direct(id);
        }
    }

    /// Link faults and full partitions of the direct network.
    pub(super) fn direct_faults(&mut self) {
        let p = self.cfg.fault_per_mille;
        if self.rng.chance(p * 2) {
            let ids: Vec<u64> = self.direct.links.keys().copied().collect();
            if let Some(id) = self.rng.pick(&ids).copied() {
                self.stats.direct_cut += 1;
                self.cut_direct(id);
            }
        }
        if self.rng.chance(p / 2) {
            // Cut off everything: the relay and the LAN.
            let d = self.rng.below(self.devices.len() as u64) as usize;
            let until = self.now + self.rng.range(100, 3_000);
            self.direct.isolated_until.insert(d, until);
            let p = &mut self.partitioned_until[d];
            *p = (*p).max(until);
            self.stats.partitions += 1;
            if let Some(id) = self.devices[d].link {
                self.cut(id);
            }
            self.cut_direct_of(d);
        }
    }

    /// Unless the run lets revoked devices keep syncing directly, a device's direct links end
    /// when it is revoked, and it dials none (see docs/TESTING.md, "Findings").
    pub(super) fn cut_revoked_direct(&mut self) {
        if self.cfg.direct_revoked {
            return;
        }
        let revoked: Vec<usize> = self.revoked.keys().copied().collect();
        for d in revoked {
            self.cut_direct_of(d);
        }
    }

    /// Whether the workload may revoke `t` now: unless the run lets revoked devices sync
    /// directly, only once everything `t` made is at the relay (it is settled). What a device
    /// gave only to peers before its revocation stays on them: the relay refuses it when they
    /// pass it on, and only a group update's signer posts it (see docs/TESTING.md, "Findings").
    pub(super) fn may_revoke(&self, t: usize) -> bool {
        // Everything it wrote is at the relay (an operation writes its documents, so an empty
        // outbox also means no group update of it is only local).
        let dev = &self.devices[t];
        self.cfg.direct_revoked
            || (dev.outbox.is_empty() && dev.rewraps.is_empty() && dev.rebase.is_empty())
    }

    /// Ends the full partitions (the heal phase).
    pub(super) fn heal_direct(&mut self) {
        self.direct.isolated_until.clear();
    }

    /// Moves what device `d` queued onto its direct links, checking that it serves no device
    /// it knows revoked.
    pub(super) fn flush_direct(&mut self, d: usize) {
        let out = std::mem::take(&mut self.devices[d].direct.out);
        for (id, o) in out {
            let Some(link) = self.direct.links.get(&id) else {
                continue;
            };
            if link.closing {
                continue;
            }
            let other = if link.a == d { link.b } else { link.a };
            match o {
                PeerOut::Close => {
                    if let Some(l) = self.direct.links.get_mut(&id) {
                        l.closing = true;
                    }
                }
                PeerOut::Message(msg) => {
                    self.check_revoked_served_directly(d, other, &msg);
                    if let Message::Envelopes { items, .. } = &*msg {
                        self.stats.direct_envelopes += items.len() as u64;
                    }
                    let delay = self.delay();
                    let l = self.direct.links.get_mut(&id).expect("checked above");
                    let to_b = l.a == d;
                    let (q, last) = if to_b {
                        (&mut l.to_b, &mut l.last_to_b)
                    } else {
                        (&mut l.to_a, &mut l.last_to_a)
                    };
                    let at = (self.now + delay).max(*last);
                    *last = at;
                    q.push_back((at, msg.encode()));
                }
            }
        }
    }

    /// Delivers the direct messages that are due.
    pub(super) fn deliver_direct(&mut self) {
        let ids: Vec<u64> = self.direct.links.keys().copied().collect();
        for id in ids {
            for to_b in [true, false] {
                while let Some(l) = self.direct.links.get_mut(&id) {
                    let q = if to_b { &mut l.to_b } else { &mut l.to_a };
                    if q.front().is_none_or(|(t, _)| *t > self.now) {
                        break;
                    }
                    let (_, bytes) = q.pop_front().expect("checked");
                    let (from, to) = if to_b { (l.a, l.b) } else { (l.b, l.a) };
                    self.record(&bytes);
                    self.stats.delivered += 1;
                    let msg = Message::decode(&bytes).expect("a device sends only valid messages");
                    if self.verbose {
                        eprintln!(
                            "{} d{from} -> d{to} (direct {id}): {}",
                            self.now - START_MS,
                            super::summary(&msg)
                        );
                    }
                    self.devices[to].handle_peer(id, msg, self.now);
                    self.flush(to);
                }
            }
            if self
                .direct
                .links
                .get(&id)
                .is_some_and(|l| l.closing && l.to_a.is_empty() && l.to_b.is_empty())
            {
                self.cut_direct(id);
            }
        }
    }

    /// A device that knows another device revoked sends it nothing over a direct link but the
    /// error that closes it (or the hello, sent before the other side says who it is).
    fn check_revoked_served_directly(&mut self, d: usize, to: usize, msg: &Message) {
        if matches!(msg, Message::Error { .. } | Message::PeerHello { .. }) {
            return;
        }
        let (sender, receiver) = (&self.devices[d], &self.devices[to]);
        if !sender.knows_current(&receiver.account(), &receiver.device()) {
            self.violations.push(format!(
                "device {d} knows device {to} revoked and sent it {} over a direct link",
                super::summary(msg)
            ));
        }
    }
}

/// Steps of quiet on the direct links after which the relay outage's direct heal ends.
const DIRECT_QUIET_STEPS: u32 = 20;

impl World {
    /// The relay outage's heal: faults and workload stop and partitions end, but the relay
    /// stays unreachable; every pair of devices that would accept each other is linked, and
    /// steps run until nothing moves on the direct links for [`DIRECT_QUIET_STEPS`] steps.
    pub(super) fn direct_heal(&mut self) -> Result<(), String> {
        self.relay_down_until = u64::MAX;
        self.partitioned_until.iter_mut().for_each(|p| *p = 0);
        self.heal_direct();
        let mut quiet = 0;
        for _ in 0..super::MAX_HEAL_STEPS {
            self.dial_all();
            self.step(false)?;
            quiet = if self.direct_settled() { quiet + 1 } else { 0 };
            if quiet >= DIRECT_QUIET_STEPS {
                return Ok(());
            }
        }
        Err("the direct links did not settle while the relay was unreachable".into())
    }

    /// Whether nothing moves on the direct links: no message in flight, no `PeerSync` open.
    pub(super) fn direct_settled(&self) -> bool {
        self.direct.idle() && self.devices.iter().all(|d| d.direct.quiet())
    }
}
