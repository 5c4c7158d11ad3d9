//! The workload: random application operations on a simulated device.

use crate::crypto::group::{GroupUpdate, SealedLabel};
use crate::crypto::identity::DevicePublic;
use crate::crypto::keys::WrappedKey;
use crate::ids::{AccountId, ConversationId, DocAddr, DocId, MessageId};
use crate::model::{Draft, ListFlag};

use super::device::{Device, Group, Stage};
use super::rng::Rng;

/// An operation that returned, for the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Done {
    /// A message was sent; `excluded` are the accounts removed from the conversation before,
    /// as the sender knew it (they must never read it).
    Sent {
        conversation: ConversationId,
        id: MessageId,
        excluded: Vec<AccountId>,
    },
    /// A conversation was created.
    Created { conversation: ConversationId },
    /// Anything else (its effect is checked through convergence).
    Other(&'static str),
}

impl Device {
    /// Conversations this device's account is a current member of, as the device knows.
    fn member_conversations(&self) -> Vec<ConversationId> {
        let account = self.account();
        self.groups
            .values()
            .filter(|g| g.latest().is_some_and(|u| u.is_member(&account)))
            .filter_map(|g| match g.addr {
                Some(DocAddr::Meta(c)) if self.replica.has_meta(&c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// Current devices of `accounts`, from the logs this device holds.
    pub(super) fn current_devices(&self, accounts: &[AccountId]) -> Vec<DevicePublic> {
        let mut out = Vec::new();
        for a in accounts {
            let log = if *a == self.account() {
                Some(&self.log)
            } else {
                self.logs.get(a)
            };
            if let Some(log) = log {
                out.extend(log.current_devices().map(|r| r.info.keys));
            }
        }
        out
    }

    /// Runs one random operation; `None` if the one drawn did not apply (nothing to edit…).
    pub fn random_op(
        &mut self,
        now_ms: u64,
        rng: &mut Rng,
        accounts: &[AccountId],
    ) -> Option<Done> {
        let now = self.local_ms(now_ms);
        let convs = self.member_conversations();
        let kind = rng.below(100);
        let signs_group = convs.is_empty() || !(6..91).contains(&kind);
        if signs_group && !self.may_sign_groups {
            return None;
        }
        if convs.is_empty() || kind < 6 {
            return self.create_conversation(now, rng, accounts);
        }
        let c = *rng.pick(&convs)?;
        let page = self.replica.history(&c, None, 50).ok()?;
        let own: Vec<MessageId> = page
            .messages
            .iter()
            .filter(|m| m.author == self.account() && !m.recalled)
            .map(|m| m.id)
            .collect();
        let any: Vec<MessageId> = page.messages.iter().map(|m| m.id).collect();
        match kind {
            6..=45 => {
                let text = format!("m{}-{}", self.idx, rng.next_u64() % 10_000);
                let id = self.replica.send(now, &c, &Draft::text(text)).ok()?;
                let excluded = self.removed_accounts(&c);
                Some(Done::Sent {
                    conversation: c,
                    id,
                    excluded,
                })
            }
            46..=55 => {
                let id = *rng.pick(&own)?;
                self.replica.edit(&c, &id, "edited").ok()?;
                Some(Done::Other("edit"))
            }
            56..=60 => {
                let id = *rng.pick(&own)?;
                self.replica.recall(&c, &id).ok()?;
                Some(Done::Other("recall"))
            }
            61..=70 => {
                let id = *rng.pick(&any)?;
                let r = *rng.pick(&["👍", "❤", "😂"])?;
                self.replica.react(&c, &id, r, rng.chance(700)).ok()?;
                Some(Done::Other("react"))
            }
            71..=77 => {
                let id = *rng.pick(&any)?;
                self.replica.mark_read(&c, &id).ok()?;
                Some(Done::Other("read"))
            }
            78..=84 => {
                let text = if rng.chance(300) {
                    String::new()
                } else {
                    format!("d{}", rng.below(100))
                };
                self.replica.set_draft(&c, &text).ok()?;
                Some(Done::Other("draft"))
            }
            85..=90 => {
                self.replica
                    .set_flag(&c, ListFlag::Pinned, rng.chance(500))
                    .ok()?;
                Some(Done::Other("pin"))
            }
            91..=95 => self.add_member(now, &c, rng, accounts),
            _ => self.remove_member(&c, rng),
        }
    }

    fn removed_accounts(&self, c: &ConversationId) -> Vec<AccountId> {
        let Some(g) = self.groups.get(&DocAddr::Meta(*c).doc_id()) else {
            return Vec::new();
        };
        let Some(latest) = g.latest() else {
            return Vec::new();
        };
        let mut out: Vec<AccountId> = g
            .updates
            .iter()
            .flat_map(|u| u.members.iter().copied())
            .filter(|a| !latest.is_member(a))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn create_conversation(
        &mut self,
        now: u64,
        rng: &mut Rng,
        accounts: &[AccountId],
    ) -> Option<Done> {
        let mut members: Vec<AccountId> = accounts
            .iter()
            .copied()
            .filter(|a| *a != self.account() && rng.chance(500))
            .collect();
        members.push(self.account());
        members.sort();
        let recipients = self.current_devices(&members);
        let others: Vec<AccountId> = members
            .iter()
            .copied()
            .filter(|a| *a != self.account())
            .collect();
        let c = self
            .replica
            .create_conversation(now, "chat", &others)
            .ok()?;
        let addr = DocAddr::Meta(c);
        let group = addr.doc_id();
        let (epoch, wrapped) = self
            .keyring
            .rotate(group, &recipients, &mut self.rng)
            .expect("a new group has recipients");
        let key = self.keyring.key(&group, epoch).expect("just made").clone();
        let label = SealedLabel::seal(&addr, epoch, &key, &mut self.rng);
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            0,
            members,
            wrapped,
            label,
        )
        .expect("a valid update");
        self.publish_group(update, addr);
        Some(Done::Created { conversation: c })
    }

    /// Membership changes are made by the conversation's creator device only, while it is
    /// live and has no other group update in flight: concurrent updates of one group are not
    /// simulated (see docs/TESTING.md).
    fn may_change_members(&self, group: &DocId) -> bool {
        self.stage == Stage::Live
            && self
                .groups
                .get(group)
                .is_some_and(|g| g.updates.first().is_some_and(|u| u.signer == self.device()))
            && !self
                .session
                .any_pending(|p| matches!(p, crate::engine::session::Pending::PostGroup { .. }))
    }

    fn add_member(
        &mut self,
        now: u64,
        c: &ConversationId,
        rng: &mut Rng,
        accounts: &[AccountId],
    ) -> Option<Done> {
        let group = DocAddr::Meta(*c).doc_id();
        if !self.may_change_members(&group) {
            return None;
        }
        let g = self.groups.get(&group)?.clone();
        let latest = g.latest()?.clone();
        // Never members before: a re-added account would get every epoch back.
        let candidates: Vec<AccountId> = accounts
            .iter()
            .copied()
            .filter(|a| !g.ever_member(a))
            .collect();
        let account = *rng.pick(&candidates)?;
        let devices = self.current_devices(&[account]);
        self.replica.add_member(now, c, &account).ok()?;
        let epochs = self.keyring.epochs(&group);
        let mut wrapped = Vec::new();
        for d in &devices {
            for (epoch, key) in &epochs {
                wrapped.push(WrappedKey::wrap(key, group, *epoch, d, &mut self.rng).ok()?);
            }
        }
        let mut members = latest.members.clone();
        members.push(account);
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            latest.version + 1,
            members,
            wrapped,
            latest.label.clone(),
        )
        .ok()?;
        self.publish_group(update, DocAddr::Meta(*c));
        Some(Done::Other("add member"))
    }

    fn remove_member(&mut self, c: &ConversationId, rng: &mut Rng) -> Option<Done> {
        let group = DocAddr::Meta(*c).doc_id();
        if !self.may_change_members(&group) {
            return None;
        }
        let latest = self.groups.get(&group)?.latest()?.clone();
        let others: Vec<AccountId> = latest
            .members
            .iter()
            .copied()
            .filter(|a| *a != self.account())
            .collect();
        let account = *rng.pick(&others)?;
        self.replica.remove_member(c, &account).ok()?;
        let members: Vec<AccountId> = latest
            .members
            .iter()
            .copied()
            .filter(|m| *m != account)
            .collect();
        let recipients = self.current_devices(&members);
        let (_, wrapped) = self
            .keyring
            .rotate(group, &recipients, &mut self.rng)
            .ok()?;
        let update = GroupUpdate::sign(
            &self.secret,
            self.account(),
            group,
            latest.version + 1,
            members,
            wrapped,
            latest.label.clone(),
        )
        .ok()?;
        self.publish_group(update, DocAddr::Meta(*c));
        Some(Done::Other("remove member"))
    }

    /// Records a group update made here and posts it if live.
    pub(super) fn publish_group(&mut self, update: GroupUpdate, addr: DocAddr) {
        let g: &mut Group = self.groups.entry(update.group).or_default();
        g.addr = Some(addr);
        g.updates.push(update.clone());
        if self.stage == Stage::Live && self.link.is_some() {
            self.post_group(update);
            self.subscribe_new();
        }
    }
}
