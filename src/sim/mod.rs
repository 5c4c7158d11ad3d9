//! A seeded, deterministic simulation of devices, a relay and a hostile network (in the
//! spirit of FoundationDB's simulation testing and TigerBeetle's VOPR).
//!
//! One run is a pure function of its seed and [`Config`]: a virtual clock advances in steps of
//! [`STEP_MS`]; every random choice comes from one [`Rng`](rng::Rng); the relay is the real
//! [`RelayCore`](crate::relay::core::RelayCore) over an in-memory store model
//! ([`relay`]); each device is a sans-IO client around the real `Replica`, crypto core and the
//! engine's `Session` ([`device`], [`proto`]); every message between them is encoded and
//! decoded with the real wire codec. A run has a chaos phase (workload and faults), then a heal
//! phase (no faults, until nothing moves), then the checks ([`check`]). Devices also sync
//! directly over links that bypass the relay ([`direct`] for the links, [`peers`] for the
//! engine's peer protocol on the device); a relay partition leaves those links up, a full
//! partition cuts them too, and a run may make the relay unreachable for a stretch
//! ([`Config::relay_outage`]) so that only they carry the traffic. The trace hash (blake3
//! over every delivered message and every operation) must be the same for the same seed.
//!
//! See `docs/TESTING.md` for the fault model, how to replay a seed and what is not covered.

mod check;
mod device;
mod devices;
mod direct;
mod malice;
mod ops;
mod peers;
mod proto;
mod relay;
mod rng;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::crypto::group::{GroupUpdate, SealedLabel};
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::Keyring;
use crate::ids::{AccountId, DocAddr};
use crate::relay::core::{ConnId, Input};
use crate::wire::message::Message;

use device::{Device, Group};
use devices::Revoked;
use ops::Done;
pub(crate) use relay::{ALL_MALICE, Malice};
use relay::{NetOut, RelayNode};
use rng::Rng;

/// One step of virtual time.
pub(crate) const STEP_MS: u64 = 10;
/// The virtual clock's start (a plausible wall-clock time, so timestamps look real).
const START_MS: u64 = 1_780_000_000_000;
/// Most steps of the heal phase before a run counts as stuck.
const MAX_HEAL_STEPS: u64 = 20_000;
/// Messages in flight on one link, at most (a bound the run checks).
const MAX_IN_FLIGHT: usize = 100_000;

/// What a run simulates.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// Accounts.
    pub accounts: usize,
    /// Devices per account.
    pub devices_per_account: usize,
    /// Steps of the chaos phase.
    pub chaos_steps: u64,
    /// Per-mille chance, per step, of an application operation.
    pub op_per_mille: u64,
    /// Per-mille chance, per step, of each kind of fault.
    pub fault_per_mille: u64,
    /// Per-mille chance that the relay drops a push, which closes the connection (as the server
    /// does with a connection whose push queue is full).
    pub push_drop_per_mille: u64,
    /// A malicious relay mode, if any.
    pub malice: Option<Malice>,
    /// Check convergence and loss even in a mode where they are not expected.
    pub strict: bool,
    /// Per-mille chance that a workload operation links a new device.
    pub link_per_mille: u64,
    /// Per-mille chance, per step of the chaos phase, that a direct link is dialled
    /// ([`direct`]).
    pub direct_per_mille: u64,
    /// Steps of the chaos phase (from, to) during which the relay is unreachable.
    pub relay_outage: Option<(u64, u64)>,
    /// Revoked devices keep their direct links and dial others. Off in the fixed seeds: a
    /// peer that does not know of the revocation yet accepts the revoked device's changes,
    /// which the relay refuses when they are passed on (see docs/TESTING.md, "Findings").
    pub direct_revoked: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            accounts: 3,
            devices_per_account: 2,
            chaos_steps: 200,
            op_per_mille: 250,
            fault_per_mille: 12,
            push_drop_per_mille: 20,
            malice: None,
            strict: false,
            link_per_mille: devices::LINK_PER_MILLE,
            direct_per_mille: direct::DIRECT_PER_MILLE,
            relay_outage: None,
            direct_revoked: false,
        }
    }
}

/// What a run counted, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub delivered: u64,
    pub ops: u64,
    pub sends: u64,
    pub device_crashes: u64,
    pub relay_crashes: u64,
    pub links_cut: u64,
    pub partitions: u64,
    pub pushes_dropped: u64,
    pub links: u64,
    pub revokes: u64,
    /// Group updates posted only to wrap keys again.
    pub rewraps: u64,
    /// Membership changes made again after losing their version.
    pub rebased: u64,
    pub heal_steps: u64,
    /// Direct links dialled.
    pub direct_links: u64,
    /// Direct links cut by a fault.
    pub direct_cut: u64,
    /// Envelopes sent over direct links.
    pub direct_envelopes: u64,
}

/// A finished run.
#[derive(Clone, Debug)]
pub(crate) struct Report {
    pub trace: [u8; 32],
    pub stats: Stats,
}

/// One connection between a device and the relay: two ordered streams (QUIC keeps order
/// within a stream; only the time of arrival varies).
#[derive(Debug, Default)]
struct Link {
    device: usize,
    up: VecDeque<(u64, Vec<u8>)>,
    down: VecDeque<(u64, Vec<u8>)>,
    up_last: u64,
    down_last: u64,
    closing: bool,
}

/// Everything of one run.
struct World {
    cfg: Config,
    now: u64,
    rng: Rng,
    relay: RelayNode,
    relay_down_until: u64,
    devices: Vec<Device>,
    accounts: Vec<AccountId>,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    partitioned_until: Vec<u64>,
    direct: direct::Direct,
    trace: blake3::Hasher,
    done: Vec<(usize, Done)>,
    stats: Stats,
    /// Every account's log as its devices wrote it (for the forgery check).
    logs: BTreeMap<AccountId, Vec<DeviceLogEntry>>,
    /// Devices linked during the run.
    linked: usize,
    /// Devices revoked during the run, by index.
    revoked: BTreeMap<usize, Revoked>,
    /// Breaches of the revocation check, found as messages are routed.
    violations: Vec<String>,
    /// Print every delivered message (`SIM_TRACE=1`), for debugging a replay.
    verbose: bool,
    /// In the chaos phase: faults, including dropped pushes, happen only then.
    chaos: bool,
}

/// A one-line summary of a message, for `SIM_TRACE`.
fn summary(msg: &Message) -> String {
    match msg {
        Message::Envelopes {
            req,
            doc,
            items,
            more,
        } => format!(
            "Envelopes req {req} doc {doc:?} more {more} items {:?}",
            items
                .iter()
                .map(|i| {
                    let h = crate::crypto::envelope::SealedEnvelope::decode(&i.envelope)
                        .map(|e| (e.header.author, e.header.first_seq, e.header.last_seq));
                    (i.seq, i.prev, h.ok())
                })
                .collect::<Vec<_>>()
        ),
        Message::Append { req, envelope, .. } => format!(
            "Append req {req} doc {:?} author {:?} {}..={}",
            envelope.header.doc,
            envelope.header.author,
            envelope.header.first_seq,
            envelope.header.last_seq
        ),
        other => {
            let s = format!("{other:?}");
            s.chars().take(200).collect()
        }
    }
}

/// Runs one simulation. `Err` carries what failed; a panic is a failure too.
pub(crate) fn run(seed: u64, cfg: &Config) -> Result<Report, String> {
    let mut w = World::new(seed, cfg.clone());
    for _ in 0..cfg.chaos_steps {
        w.step(true)?;
    }
    if cfg.relay_outage.is_some() {
        w.direct_heal()?;
        check::after_direct_heal(&w)?;
    }
    w.heal()?;
    if let Some(v) = w.violations.first() {
        return Err(v.clone());
    }
    check::after_run(&w)?;
    w.stats.rewraps = w.devices.iter().map(|d| d.rewraps_posted).sum();
    w.stats.rebased = w.devices.iter().map(|d| d.rebased).sum();
    Ok(Report {
        trace: *w.trace.finalize().as_bytes(),
        stats: w.stats.clone(),
    })
}

impl World {
    fn new(seed: u64, cfg: Config) -> Self {
        let mut rng = Rng::new(seed);
        let relay = RelayNode::new(cfg.malice, &mut rng);
        let mut logs = Vec::new();
        let mut secrets = Vec::new();
        for a in 0..cfg.accounts {
            let devs: Vec<DeviceSecret> = (0..cfg.devices_per_account)
                .map(|_| DeviceSecret::generate(&mut rng.seed_rng()))
                .collect();
            let mut log =
                DeviceLog::create(&devs[0], &format!("a{a}d0"), "sim").expect("a valid genesis");
            for (i, d) in devs.iter().enumerate().skip(1) {
                let e = log
                    .add_device(&devs[0], d.public(), &format!("a{a}d{i}"), "sim")
                    .expect("a valid entry");
                log.append(e).expect("it follows");
            }
            logs.push(log);
            secrets.push(devs);
        }
        let accounts: Vec<AccountId> = logs.iter().map(DeviceLog::account).collect();
        let genuine_logs = logs
            .iter()
            .map(|l| (l.account(), l.entries().to_vec()))
            .collect();
        let mut devices = Vec::new();
        for (a, devs) in secrets.into_iter().enumerate() {
            let account = accounts[a];
            let addr = DocAddr::Account(account);
            let group = addr.doc_id();
            let mut crng = rng.seed_rng();
            let publics: Vec<_> = devs.iter().map(DeviceSecret::public).collect();
            let mut keyring = Keyring::default();
            let (epoch, wrapped) = keyring
                .rotate(group, &publics, &mut crng)
                .expect("recipients");
            let key = keyring.key(&group, epoch).expect("just made").clone();
            let label = SealedLabel::seal(&addr, epoch, &key, &mut crng);
            let update =
                GroupUpdate::sign(&devs[0], account, group, 0, vec![account], wrapped, label)
                    .expect("a valid update");
            let others: BTreeMap<AccountId, DeviceLog> = logs
                .iter()
                .filter(|l| l.account() != account)
                .map(|l| (l.account(), l.clone()))
                .collect();
            for secret in devs {
                let mut keys = Keyring::default();
                for k in update.keys_for(&secret.device_id()) {
                    let key = k.unwrap_with(&secret).expect("wrapped to it");
                    keys.insert(k.doc, k.epoch, key).expect("a new key");
                }
                let groups = BTreeMap::from([(
                    group,
                    Group {
                        updates: vec![update.clone()],
                        addr: Some(addr),
                    },
                )]);
                let skew = match rng.below(10) {
                    0 => 6 * 60_000 + rng.below(60_000) as i64,
                    1 => -(3 * 60_000 + rng.below(60_000) as i64),
                    _ => rng.below(4_000) as i64 - 2_000,
                };
                let idx = devices.len();
                let crypto_rng = rng.seed_rng();
                devices.push(Device::new(
                    idx,
                    secret,
                    logs[a].clone(),
                    others.clone(),
                    groups,
                    keys,
                    crypto_rng,
                    skew,
                ));
            }
        }
        let n = devices.len();
        World {
            cfg,
            now: START_MS,
            rng,
            relay,
            relay_down_until: 0,
            devices,
            accounts,
            links: BTreeMap::new(),
            next_link: 1,
            partitioned_until: vec![0; n],
            direct: direct::Direct::default(),
            trace: blake3::Hasher::new(),
            done: Vec::new(),
            stats: Stats::default(),
            logs: genuine_logs,
            linked: 0,
            revoked: BTreeMap::new(),
            violations: Vec::new(),
            verbose: std::env::var_os("SIM_TRACE").is_some(),
            chaos: true,
        }
    }

    /// One step of virtual time.
    fn step(&mut self, chaos: bool) -> Result<(), String> {
        self.now += STEP_MS;
        self.chaos = chaos;
        self.deliver_up();
        if self.rng.chance(700) {
            let net = self.relay.commit(self.now, &mut self.rng);
            self.route(net);
        }
        self.deliver_down();
        self.deliver_direct();
        if chaos {
            self.relay_outage();
            self.faults();
            self.direct_faults();
            self.maybe_dial();
            self.cut_revoked_direct();
            if self.rng.chance(self.cfg.op_per_mille) {
                self.operation();
            }
        }
        for d in 0..self.devices.len() {
            self.maybe_connect(d);
            self.devices[d].tick(self.now);
            self.devices[d].tick_direct();
            self.flush(d);
        }
        self.note_durable_revocations();
        for link in self.links.values() {
            if link.up.len() + link.down.len() > MAX_IN_FLIGHT {
                return Err(format!(
                    "link queue unbounded: {}",
                    link.up.len() + link.down.len()
                ));
            }
        }
        Ok(())
    }

    /// Steps without faults or workload until nothing moves.
    fn heal(&mut self) -> Result<(), String> {
        // A malicious relay turns honest, and every device connects again (subscribing from
        // its cursors): what is checked then is what its malice left behind.
        if self.relay.malice.take().is_some() {
            let ids: Vec<u64> = self.links.keys().copied().collect();
            for id in ids {
                self.cut(id);
            }
        }
        self.partitioned_until.iter_mut().for_each(|p| *p = 0);
        self.heal_direct();
        self.relay_down_until = 0;
        let mut quiet = 0;
        for i in 0..MAX_HEAL_STEPS {
            self.step(false)?;
            let net = self.relay.commit(self.now, &mut self.rng);
            self.route(net);
            let settled = (0..self.devices.len())
                .all(|d| !self.is_live_device(d) || self.devices[d].settled())
                && self
                    .links
                    .values()
                    .all(|l| l.up.is_empty() && l.down.is_empty())
                && self.direct_settled()
                && !self.relay.has_pending();
            quiet = if settled { quiet + 1 } else { 0 };
            if quiet >= 3 {
                self.stats.heal_steps = i;
                return Ok(());
            }
        }
        let stuck: Vec<String> = self
            .devices
            .iter()
            .filter(|d| self.is_live_device(d.idx) && !d.settled())
            .map(|d| {
                format!(
                    "device {}: link {:?} stage {:?} open {} outbox {} blocked {:?}",
                    d.idx,
                    d.link,
                    d.stage,
                    d.session.open_requests(),
                    d.outbox.len(),
                    d.blocked_docs()
                )
            })
            .collect();
        Err(format!(
            "the network healed but the run did not settle: {stuck:?}"
        ))
    }

    fn record(&mut self, what: &[u8]) {
        self.trace.update(&self.now.to_be_bytes());
        self.trace.update(&(what.len() as u64).to_be_bytes());
        self.trace.update(what);
    }

    fn deliver_up(&mut self) {
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            while let Some(link) = self.links.get_mut(&id) {
                if link.up.front().is_none_or(|(t, _)| *t > self.now) {
                    break;
                }
                let (_, bytes) = link.up.pop_front().expect("checked");
                self.record(&bytes);
                self.stats.delivered += 1;
                let msg = Message::decode(&bytes).expect("a device sends only valid messages");
                if self.verbose {
                    let d = self.links[&id].device;
                    eprintln!(
                        "{} d{d} -> relay (link {id}): {}",
                        self.now - START_MS,
                        summary(&msg)
                    );
                }
                let net = self.relay.handle(
                    Input::Message {
                        conn: ConnId(id),
                        msg,
                    },
                    self.now,
                    &mut self.rng,
                );
                self.route(net);
            }
        }
    }

    fn deliver_down(&mut self) {
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            while let Some(link) = self.links.get_mut(&id) {
                let due = link.down.front().is_some_and(|(t, _)| *t <= self.now);
                if !due {
                    if link.closing && link.down.is_empty() {
                        self.cut(id);
                    }
                    break;
                }
                let (_, bytes) = link.down.pop_front().expect("checked");
                let d = link.device;
                self.record(&bytes);
                self.stats.delivered += 1;
                match Message::decode(&bytes) {
                    Ok(msg) => {
                        if self.verbose {
                            eprintln!(
                                "{} relay -> d{d} (link {id}): {}",
                                self.now - START_MS,
                                summary(&msg)
                            );
                        }
                        self.devices[d].handle(msg, self.now)
                    }
                    Err(e) => self.devices[d].refused.push(format!("undecodable: {e}")),
                }
                self.flush(d);
            }
        }
    }

    /// Puts what the relay produced on the links.
    fn route(&mut self, net: Vec<NetOut>) {
        for n in net {
            match n {
                NetOut::Msg { conn, msg, push } => {
                    // As the server does when a connection's push queue is full: the push is
                    // dropped and the connection closed at once (`LAGGED`), losing what was in
                    // flight; the device reconnects and catches up from its cursors.
                    if push
                        && self.chaos
                        && self.links.contains_key(&conn.0)
                        && self.rng.chance(self.cfg.push_drop_per_mille)
                    {
                        self.stats.pushes_dropped += 1;
                        self.cut(conn.0);
                        continue;
                    }
                    if let Some(d) = self.links.get(&conn.0).map(|l| l.device) {
                        self.check_revoked_served(d, &msg);
                    }
                    let delay = self.delay();
                    let Some(link) = self.links.get_mut(&conn.0) else {
                        continue;
                    };
                    if link.closing {
                        continue;
                    }
                    let at = (self.now + delay).max(link.down_last);
                    link.down_last = at;
                    link.down.push_back((at, msg.encode()));
                }
                NetOut::Close { conn } => {
                    if let Some(link) = self.links.get_mut(&conn.0) {
                        link.closing = true;
                    }
                }
            }
        }
    }

    fn delay(&mut self) -> u64 {
        if self.rng.chance(50) {
            self.rng.range(200, 2_000)
        } else {
            self.rng.range(1, 60)
        }
    }

    /// Moves what a device queued onto its link, and drops the link if it asked to.
    fn flush(&mut self, d: usize) {
        self.flush_direct(d);
        let out = std::mem::take(&mut self.devices[d].out);
        if let Some(id) = self.devices[d].link {
            for msg in out {
                let delay = self.delay();
                let Some(link) = self.links.get_mut(&id) else {
                    break;
                };
                let at = (self.now + delay).max(link.up_last);
                link.up_last = at;
                link.up.push_back((at, msg.encode()));
            }
            if self.devices[d].drop_link {
                self.cut(id);
            }
        }
    }

    /// Ends a connection on both sides.
    fn cut(&mut self, id: u64) {
        let Some(link) = self.links.remove(&id) else {
            return;
        };
        let net = self.relay.handle(
            Input::Disconnected { conn: ConnId(id) },
            self.now,
            &mut self.rng,
        );
        self.route(net);
        let jitter = self.rng.next_u64() as u32;
        let d = &mut self.devices[link.device];
        if d.link == Some(id) {
            d.on_disconnected(self.now, jitter);
        }
    }

    fn maybe_connect(&mut self, d: usize) {
        let dev = &self.devices[d];
        if dev.link.is_some() || !dev.is_current() || self.now < dev.next_connect_ms {
            return;
        }
        if self.now < self.partitioned_until[d] || self.now < self.relay_down_until {
            let jitter = self.rng.next_u64() as u32;
            self.devices[d].on_disconnected(self.now, jitter);
            return;
        }
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(
            id,
            Link {
                device: d,
                ..Link::default()
            },
        );
        let device = self.devices[d].device();
        let net = self.relay.handle(
            Input::Connected {
                conn: ConnId(id),
                device,
            },
            self.now,
            &mut self.rng,
        );
        self.route(net);
        self.devices[d].on_connected(id, self.now);
        self.flush(d);
    }

    fn faults(&mut self) {
        let p = self.cfg.fault_per_mille;
        let n = self.devices.len() as u64;
        if self.rng.chance(p * 2) {
            // A connection lost (packet loss the transport could not hide).
            let ids: Vec<u64> = self.links.keys().copied().collect();
            if let Some(id) = self.rng.pick(&ids).copied() {
                self.stats.links_cut += 1;
                self.cut(id);
            }
        }
        if self.rng.chance(p) {
            // A partition: a device cut off for a while.
            let d = self.rng.below(n) as usize;
            self.partitioned_until[d] = self.now + self.rng.range(100, 3_000);
            self.stats.partitions += 1;
            if let Some(id) = self.devices[d].link {
                self.cut(id);
            }
        }
        if self.rng.chance(p) {
            let d = self.rng.below(n) as usize;
            self.crash_device(d);
        }
        if self.rng.chance(p / 2) {
            self.stats.relay_crashes += 1;
            if self.verbose {
                eprintln!("{} relay crashes", self.now - START_MS);
            }
            self.record(b"relay crash");
            let ids: Vec<u64> = self.links.keys().copied().collect();
            for id in ids {
                let link = self.links.remove(&id).expect("listed");
                let jitter = self.rng.next_u64() as u32;
                self.devices[link.device].on_disconnected(self.now, jitter);
            }
            self.relay.crash();
            let until = self.now + self.rng.range(10, 1_000);
            self.relay_down_until = self.relay_down_until.max(until);
        }
    }

    fn crash_device(&mut self, d: usize) {
        if self.verbose {
            eprintln!("{} d{d} crashes", self.now - START_MS);
        }
        self.stats.device_crashes += 1;
        self.record(format!("crash {d}").as_bytes());
        if let Some(id) = self.devices[d].link {
            self.cut(id);
        }
        self.cut_direct_of(d);
        self.devices[d].crash();
        self.devices[d].next_connect_ms = self.now + self.rng.range(10, 500);
    }

    fn operation(&mut self) {
        if self.rng.chance(self.cfg.link_per_mille) {
            self.link_device();
            return;
        }
        if self.rng.chance(devices::REVOKE_PER_MILLE) {
            self.revoke_device();
            return;
        }
        let d = self.rng.below(self.devices.len() as u64) as usize;
        if !self.devices[d].is_current() {
            return;
        }
        let accounts = self.accounts.clone();
        self.devices[d].may_sign_groups = self.may_sign_groups(d);
        let done = self.devices[d].random_op(self.now, &mut self.rng, &accounts);
        let Some(done) = done else { return };
        if self.rng.chance(30) {
            // The device dies before the operation is stored: it never returned.
            self.crash_device(d);
            return;
        }
        self.devices[d].commit();
        self.record(format!("op {d} {done:?}").as_bytes());
        self.stats.ops += 1;
        if matches!(done, Done::Sent { .. }) {
            self.stats.sends += 1;
        }
        self.done.push((d, done));
        self.flush(d);
    }
}
