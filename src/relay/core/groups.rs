//! Groups: `PostGroup` (creating and changing a group's membership) and `FetchGroup`.

use std::collections::BTreeSet;

use crate::crypto::group::GroupUpdate;
use crate::ids::{AccountId, DocId};
use crate::relay::limits::TARGET_UPDATES_BYTES;
use crate::wire::message::{MAX_UPDATES_PER_MESSAGE, Message};

use super::{ConnId, GroupChain, Output, PersistOp, RelayCore, RelayEvent, RequestError};

impl RelayCore {
    /// `PostGroup`: checks the update (signed by this connection's device for its account,
    /// following the group's chain), persists it, confirms it and pushes it to the members before
    /// and after. Posting the group's latest update again is confirmed without effect.
    pub(super) fn handle_post_group(
        &mut self,
        conn: ConnId,
        req: u32,
        update: GroupUpdate,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let (device, account) = self.authenticated(conn, "PostGroup")?;
        if update.signer != device {
            return Err(RequestError::SignerNotConnection {
                signer: update.signer,
                device,
            });
        }
        if update.signer_account != account {
            return Err(RequestError::SignerAccountMismatch {
                signer_account: update.signer_account,
                account,
            });
        }
        let group = update.group;
        let chain = self.groups.get(&group);
        if chain.is_some_and(|c| c.updates.get(update.version as usize) == Some(&update)) {
            out.push(Output::Send {
                conn,
                msg: Message::Done { req },
            });
            return Ok(());
        }
        update.verify_signature().map_err(RequestError::Group)?;
        update
            .check_follows(chain.map(GroupChain::latest))
            .map_err(RequestError::Group)?;
        if let Some(doc) = self.docs.get(&group) {
            if doc.group != group {
                return Err(RequestError::DocInOtherGroup {
                    doc: group,
                    group: doc.group,
                    requested: group,
                });
            }
        }
        let before: BTreeSet<AccountId> = chain
            .map(|c| c.latest().members.iter().copied().collect())
            .unwrap_or_default();
        let after: BTreeSet<AccountId> = update.members.iter().copied().collect();
        for removed in before.difference(&after) {
            self.leave_group(removed, &group);
        }
        for added in after.difference(&before) {
            self.member_of.entry(*added).or_default().insert(group);
        }
        let mut then = vec![Output::Send {
            conn,
            msg: Message::Done { req },
        }];
        for member in before.union(&after) {
            for other in self.authenticated_conns(member) {
                if other != conn {
                    then.push(Output::Push {
                        conn: other,
                        msg: Message::GroupUpdates {
                            req: 0,
                            group,
                            updates: vec![update.clone()],
                        },
                    });
                }
            }
        }
        let version = update.version;
        let op = PersistOp::PutGroupUpdate {
            group,
            version,
            update: update.encode(),
        };
        match self.groups.get_mut(&group) {
            Some(chain) => chain.updates.push(update),
            None => {
                self.groups.insert(
                    group,
                    GroupChain {
                        updates: vec![update],
                    },
                );
            }
        }
        out.push(Output::Event(RelayEvent::GroupUpdated { group, version }));
        out.push(Output::Persist { op, then });
        Ok(())
    }

    /// `account` is no longer a member of `group`: its connections lose their subscriptions
    /// to the group's documents.
    fn leave_group(&mut self, account: &AccountId, group: &DocId) {
        super::remove_from_index(&mut self.member_of, account, group);
        let conns: Vec<ConnId> = self
            .by_account
            .get(account)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for id in conns {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let docs = &self.docs;
            let dropped: Vec<DocId> = c
                .subs
                .iter()
                .filter(|d| docs.get(d).is_some_and(|s| s.group == *group))
                .copied()
                .collect();
            for doc in dropped {
                c.subs.remove(&doc);
                super::remove_from_index(&mut self.subscribers, &doc, &id);
            }
        }
    }

    /// `FetchGroup`: the group's updates from `from_version`, in messages of at most
    /// [`MAX_UPDATES_PER_MESSAGE`] updates and about [`TARGET_UPDATES_BYTES`], then `Done`. A
    /// member gets every update from there; a former member gets them up to the one that
    /// removed it (see [`Self::fetchable_updates`]).
    pub(super) fn handle_fetch_group(
        &mut self,
        conn: ConnId,
        req: u32,
        group: DocId,
        from_version: u32,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let (_, account) = self.authenticated(conn, "FetchGroup")?;
        let updates = self.fetchable_updates(&group, &account, from_version)?;
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        for update in updates {
            let len = update.encode().len();
            let full = chunk.len() >= MAX_UPDATES_PER_MESSAGE
                || (!chunk.is_empty() && chunk_bytes + len > TARGET_UPDATES_BYTES);
            if full {
                out.push(Output::Send {
                    conn,
                    msg: Message::GroupUpdates {
                        req,
                        group,
                        updates: std::mem::take(&mut chunk),
                    },
                });
                chunk_bytes = 0;
            }
            chunk.push(update.clone());
            chunk_bytes += len;
        }
        if !chunk.is_empty() {
            out.push(Output::Send {
                conn,
                msg: Message::GroupUpdates {
                    req,
                    group,
                    updates: chunk,
                },
            });
        }
        out.push(Output::Send {
            conn,
            msg: Message::Done { req },
        });
        Ok(())
    }

    /// The updates of `group` from `from_version` that `account` may read. A current member
    /// reads all of them. An account that is no longer a member but was one at the version
    /// before `from_version` (or at version 0 when asking from 0) reads up to and including the
    /// first update that no longer lists it, the one that removed it, and nothing after: that
    /// is how a device removed while it was offline learns of its removal. Any other account
    /// is refused, as a never-member always was.
    fn fetchable_updates(
        &self,
        group: &DocId,
        account: &AccountId,
        from_version: u32,
    ) -> Result<&[GroupUpdate], RequestError> {
        let not_member = || RequestError::NotMember {
            account: *account,
            group: *group,
        };
        let from = from_version as usize;
        if self.is_member(group, account) {
            return Ok(self
                .groups
                .get(group)
                .and_then(|c| c.updates.get(from..))
                .unwrap_or_default());
        }
        let chain = self.groups.get(group).ok_or_else(not_member)?;
        let held = chain
            .updates
            .get(from.saturating_sub(1))
            .ok_or_else(not_member)?;
        if !held.is_member(account) {
            return Err(not_member());
        }
        // The latest update does not list the account, so a removal follows `held`.
        let removal = chain.updates[from..]
            .iter()
            .position(|u| !u.is_member(account))
            .map_or(chain.updates.len(), |i| from + i + 1);
        Ok(&chain.updates[from..removal])
    }
}
