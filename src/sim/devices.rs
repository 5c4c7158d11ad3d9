//! Workload operations on an account's set of devices: linking a new device and revoking one,
//! while the faults run.
//!
//! **Linking** uses the real pairing state machines (`crypto::pairing`): a current device of
//! the account opens a [`PairingInvite`], the new device starts a [`PairingJoin`] with its code,
//! the inviter handles the request (appending the new device to its log and wrapping every key
//! it holds to it) and the new device handles the response. The request and the response are
//! handed over directly, not through the relay's pairing rendezvous (`PairOffer`/`PairJoin`):
//! the rendezvous only moves these bytes. The new device then starts with the log and the keys
//! of the response and nothing else; it uploads its log entry at its first `Hello` and catches
//! up through the relay like any device (group chains, documents).
//!
//! **Revoking**: a current device appends `DeviceLog::revoke_device` for another device of its
//! account and uploads the entry. The relay refuses the revoked device from then on; it is never
//! told (the relay does not serve it its log), so it keeps trying with the engine's backoff.
//! Revocation rotates no keys (docs/SECURITY.md, "Revoked or stolen device"), so what is
//! checked is what the relay guarantees: once the revocation entry is in the relay's store, the
//! relay sends the revoked device nothing but the error that closes its connection.
//!
//! One log change per account at a time: an operation runs only when every device of the
//! account that is not revoked holds the same log and the relay's store holds it too. Concurrent
//! log changes fork the log, which is detected but not resolved (docs/SECURITY.md).

use crate::crypto::identity::DeviceSecret;
use crate::crypto::pairing::{PairingInvite, PairingJoin};
use crate::ids::AccountId;
use crate::wire::message::Message;

use super::device::{Device, Stage};
use super::{START_MS, World};

/// Per-mille chance that a workload operation is a device link, in the runs that link.
pub(crate) const LINK_PER_MILLE: u64 = 40;
/// Per-mille chance that a workload operation is a device revocation.
pub(crate) const REVOKE_PER_MILLE: u64 = 40;
/// Devices linked in one run, at most.
pub(crate) const MAX_LINKS_PER_RUN: usize = 2;
/// Devices revoked in one run, at most.
pub(crate) const MAX_REVOKES_PER_RUN: usize = 2;
/// How long a pairing invite and join stay valid.
const PAIRING_TTL_MS: u64 = 60_000;

/// A device revoked during the run.
#[derive(Clone, Debug)]
pub(crate) struct Revoked {
    pub account: AccountId,
    /// The revocation entry's position in the account's log.
    pub seq: u32,
    /// When the relay's store first held the entry.
    pub durable_at_ms: Option<u64>,
}

impl Device {
    /// Uploads this device's last log entry if live (the rest follows at the next `Hello`).
    pub(super) fn upload_last_log_entry(&mut self) {
        if self.stage != Stage::Live || self.link.is_none() {
            return;
        }
        let Some(entry) = self.log.entries().last().cloned() else {
            return;
        };
        let (account, first_seq) = (self.account(), entry.seq);
        let req = self
            .session
            .request(crate::engine::session::Pending::LogAppendThenHello);
        self.out.push(Message::LogAppend {
            req,
            account,
            first_seq,
            entries: vec![entry],
        });
    }
}

impl World {
    /// Whether `d` counts for the checks: its log lists it and it was not revoked.
    pub(super) fn is_live_device(&self, d: usize) -> bool {
        self.devices[d].is_current() && !self.revoked.contains_key(&d)
    }

    /// The devices of `account` not revoked, if they all hold the same log and the relay's
    /// store holds it too: only then may the log change.
    fn log_settled(&self, account: &AccountId) -> Option<Vec<usize>> {
        let devs: Vec<usize> = (0..self.devices.len())
            .filter(|d| self.devices[*d].account() == *account && !self.revoked.contains_key(d))
            .collect();
        let head = self.devices[*devs.first()?].log.head();
        let same = devs.iter().all(|d| self.devices[*d].log.head() == head);
        let stored = self.relay.stored_log(account).map_or(0, Vec::len);
        (same && stored == self.devices[devs[0]].log.len()).then_some(devs)
    }

    /// Whether the workload may have `d` sign a group update now: any current device may, even
    /// with copies of other accounts' logs that predate a link (the new device's account then
    /// wraps the keys to it) or a copy of its own log that others' copies predate (they fetch
    /// the log again).
    pub(super) fn may_sign_groups(&self, d: usize) -> bool {
        self.is_live_device(d)
    }

    /// Links a new device to the account of a random device (see the module docs).
    pub(super) fn link_device(&mut self) {
        if self.linked >= MAX_LINKS_PER_RUN {
            return;
        }
        let d = self.rng.below(self.devices.len() as u64) as usize;
        let account = self.devices[d].account();
        // The inviter exports the keys it holds; the keys of group updates still on the way
        // are wrapped to the new device once they arrive (`crypto::group::missing_wraps`).
        if self.log_settled(&account).is_none() || !self.is_live_device(d) {
            return;
        }
        let idx = self.devices.len();
        let secret = DeviceSecret::generate(&mut self.rng.seed_rng());
        let now = self.now;
        let inviter = &mut self.devices[d];
        let local = inviter.local_ms(now);
        let mut invite = PairingInvite::new(&mut inviter.rng, local, PAIRING_TTL_MS)
            .expect("the simulation's invite lifetime is allowed");
        let (mut join, request) = PairingJoin::start(
            &invite.code(),
            &secret,
            &format!("linked{idx}"),
            "sim",
            now,
            PAIRING_TTL_MS,
        )
        .expect("a fresh code parses");
        let response = invite
            .handle_request(
                &request,
                local,
                &inviter.secret,
                &mut inviter.log,
                &inviter.keyring,
                &mut inviter.rng,
            )
            .expect("a current inviter answers its own invite");
        let joined = join
            .handle_response(&response, now, &secret)
            .expect("the inviter's response verifies");
        inviter.commit();
        inviter.upload_last_log_entry();
        let entry = inviter.log.entries().last().cloned();
        let others = inviter.logs.clone();
        self.logs.entry(account).or_default().extend(entry);
        let skew = self.rng.below(4_000) as i64 - 2_000;
        let crypto_rng = self.rng.seed_rng();
        let device = Device::new(
            idx,
            secret,
            joined.log,
            others,
            Default::default(),
            joined.keyring,
            crypto_rng,
            skew,
        );
        self.devices.push(device);
        self.partitioned_until.push(0);
        self.linked += 1;
        self.stats.links += 1;
        if self.verbose {
            eprintln!("{} d{d} links d{idx}", self.now - START_MS);
        }
        self.record(format!("link {d} {idx}").as_bytes());
        self.flush(d);
    }

    /// A random device revokes another device of its account (see the module docs).
    pub(super) fn revoke_device(&mut self) {
        if self.revoked.len() >= MAX_REVOKES_PER_RUN {
            return;
        }
        let d = self.rng.below(self.devices.len() as u64) as usize;
        let account = self.devices[d].account();
        let Some(devs) = self.log_settled(&account) else {
            return;
        };
        let targets: Vec<usize> = devs
            .iter()
            .copied()
            .filter(|t| *t != d && self.devices[*t].is_current() && self.may_revoke(*t))
            .collect();
        let Some(&t) = self.rng.pick(&targets) else {
            return;
        };
        if !self.is_live_device(d) {
            return;
        }
        let target = self.devices[t].device();
        let dev = &mut self.devices[d];
        let entry = dev
            .log
            .revoke_device(&dev.secret, target)
            .expect("a current device revokes another current device");
        let seq = entry.seq;
        dev.log
            .append(entry.clone())
            .expect("the entry follows the log");
        self.logs.entry(account).or_default().push(entry);
        dev.upload_last_log_entry();
        dev.rewrap_after_revocation(account);
        dev.commit();
        self.revoked.insert(
            t,
            Revoked {
                account,
                seq,
                durable_at_ms: None,
            },
        );
        self.stats.revokes += 1;
        if self.verbose {
            eprintln!("{} d{d} revokes d{t}", self.now - START_MS);
        }
        self.record(format!("revoke {d} {t}").as_bytes());
        self.flush(d);
    }

    /// Notes the revocations the relay's store now holds.
    pub(super) fn note_durable_revocations(&mut self) {
        let now = self.now;
        for r in self.revoked.values_mut() {
            if r.durable_at_ms.is_none()
                && self
                    .relay
                    .stored_log(&r.account)
                    .is_some_and(|l| l.len() > r.seq as usize)
            {
                r.durable_at_ms = Some(now);
            }
        }
    }

    /// The relay sends a device revoked durably nothing but the error closing its connection.
    pub(super) fn check_revoked_served(&mut self, device: usize, msg: &Message) {
        if self.cfg.malice.is_some() || matches!(msg, Message::Error { .. }) {
            return;
        }
        if let Some(at) = self.revoked.get(&device).and_then(|r| r.durable_at_ms) {
            self.violations.push(format!(
                "revoked device {device} (durable at {}) was sent {}",
                at - START_MS,
                super::summary(msg)
            ));
        }
    }
}
