//! The checks after a run: convergence, nothing lost, nothing shown twice, nothing read after a
//! removal, nothing forged, bounded queues.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ReadDoc;

use crate::ids::{AccountId, ConversationId, DocAddr, MessageId};
use crate::model::{Message, Replica};

use super::ops::Done;
use super::relay::Malice;
use super::{Device, World};

/// Whether, for this mode, the devices must converge once the relay is honest again: a relay
/// that drops, reorders or replays envelopes, or forges log entries, costs at most fetches;
/// one that truncates history (rewriting `prev`) or serves another document's envelopes moves
/// cursors over envelopes the device never applied, which only a fetch from 0 repairs (see
/// docs/SECURITY.md).
pub(crate) fn converges_after(malice: Option<Malice>) -> bool {
    !matches!(malice, Some(Malice::Truncate | Malice::WrongDoc))
}

pub(super) fn after_run(w: &World) -> Result<(), String> {
    no_forgery(w)?;
    if w.cfg.malice.is_none() {
        for d in &w.devices {
            let bad: Vec<&String> = d
                .refused
                .iter()
                .filter(|r| !r.starts_with("append refused"))
                .collect();
            if !bad.is_empty() {
                return Err(format!("device {} refused honest input: {bad:?}", d.idx));
            }
        }
    }
    if !converges_after(w.cfg.malice) && !w.cfg.strict {
        return Ok(());
    }
    convergence(w, false)?;
    no_loss(w)?;
    Ok(())
}

/// After a relay outage healed over direct links only: every current device of an account
/// holds the same account document, and the member devices that know a conversation's group
/// (if one device of an account knows it, all must) hold the same chain and the same
/// conversation. A conversation whose group never reached an account cannot reach it without
/// the relay (a device refuses a peer of an account it shares nothing with), so those
/// accounts are left out, and so is a device holding no key of the group (its keeper's rewrap
/// needs a relay).
pub(super) fn after_direct_heal(w: &World) -> Result<(), String> {
    no_forgery(w)?;
    convergence(w, true)
}

/// Every message of a conversation on a device, oldest first.
fn all_messages(r: &Replica, c: &ConversationId) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = r
            .history(c, before, crate::model::limits::MAX_PAGE)
            .map_err(|e| format!("history: {e}"))?;
        let mut msgs = page.messages;
        msgs.extend(out);
        out = msgs;
        match page.next {
            Some(next) => before = Some(next),
            None => return Ok(out),
        }
    }
}

/// The final members of each conversation: the longest chain any device not revoked holds (a
/// revoked device's unsent group updates never leave it).
fn final_members(w: &World) -> BTreeMap<ConversationId, (usize, Vec<AccountId>)> {
    let mut out: BTreeMap<ConversationId, (usize, Vec<AccountId>)> = BTreeMap::new();
    for d in w.devices.iter().filter(|d| !w.revoked.contains_key(&d.idx)) {
        for g in d.groups.values() {
            let (Some(DocAddr::Meta(c)), Some(latest)) = (g.addr, g.latest()) else {
                continue;
            };
            let e = out.entry(c).or_default();
            if g.updates.len() > e.0 {
                *e = (g.updates.len(), latest.members.clone());
            }
        }
    }
    out
}

/// The devices of `account` the checks cover: current and not revoked.
fn devices_of<'a>(w: &'a World, account: &AccountId) -> impl Iterator<Item = &'a Device> {
    let account = *account;
    w.devices
        .iter()
        .filter(move |d| d.account() == account && w.is_live_device(d.idx))
}

/// Whether `c` was created by a device revoked before any of its documents left it: its group
/// reached the relay, its documents never did, and no device but the revoked one holds them.
fn orphaned(w: &World, c: &ConversationId) -> bool {
    let group = DocAddr::Meta(*c).doc_id();
    let creator_revoked = w.devices.iter().any(|d| {
        d.groups
            .get(&group)
            .and_then(|g| g.updates.first())
            .is_some_and(|u| {
                w.devices
                    .iter()
                    .any(|r| r.device() == u.signer && w.revoked.contains_key(&r.idx))
            })
    });
    creator_revoked
        && !w
            .devices
            .iter()
            .any(|d| !w.revoked.contains_key(&d.idx) && d.replica.has_meta(c))
}

/// All devices that should hold a document hold the same changes and show the same thing;
/// with `known_only`, only the accounts some of whose devices know the conversation's group.
fn convergence(w: &World, known_only: bool) -> Result<(), String> {
    for account in &w.accounts {
        let addr = DocAddr::Account(*account);
        let mut heads = BTreeSet::new();
        for d in devices_of(w, account) {
            heads.insert(d.replica.heads(&addr));
        }
        if heads.len() > 1 {
            let detail: Vec<String> = devices_of(w, account)
                .map(|d| {
                    format!(
                        "device {}: {:?} cursor {:?} subscribed {}",
                        d.idx,
                        d.replica.version_vector(&addr),
                        d.session.doc_cursor(&addr.doc_id()),
                        d.is_subscribed(&addr.doc_id()),
                    )
                })
                .collect();
            return Err(format!(
                "account document of {account:?} diverged: {detail:#?}"
            ));
        }
    }
    for (c, (len, members)) in final_members(w) {
        if orphaned(w, &c) {
            continue;
        }
        let mut views: Vec<(usize, String)> = Vec::new();
        let group = DocAddr::Meta(c).doc_id();
        let knows = |d: &Device| d.groups.get(&group).is_some_and(|g| !g.updates.is_empty());
        for account in &members {
            if known_only && !devices_of(w, account).any(knows) {
                continue;
            }
            for d in devices_of(w, account) {
                // Over direct links alone, a device the chain wraps no key to (linked after the
                // group's maker copied its log) waits for its keeper's rewrap, which only a
                // relay takes.
                if known_only && d.keyring.latest(&group).is_none() {
                    continue;
                }
                let held = d
                    .groups
                    .get(&DocAddr::Meta(c).doc_id())
                    .map_or(0, |g| g.updates.len());
                if held != len {
                    return Err(format!(
                        "device {} holds {held} of {len} updates of the group of {c:?} ({:?})",
                        d.idx,
                        DocAddr::Meta(c).doc_id()
                    ));
                }
                if !d.replica.has_meta(&c) {
                    let group = DocAddr::Meta(c).doc_id();
                    return Err(format!(
                        "device {} lacks conversation {c:?} (group {group:?}, group key {}, cursor {:?}, blocked {:?})",
                        d.idx,
                        d.keyring.latest(&group).is_some(),
                        d.session.doc_cursor(&group),
                        d.refused,
                    ));
                }
                let segments = d.replica.segment_numbers(&c).map_err(|e| e.to_string())?;
                let mut state = format!("{:?}", d.replica.heads(&DocAddr::Meta(c)));
                for n in &segments {
                    let addr = DocAddr::Segment(c, *n);
                    let doc = d.replica.synced_doc(&addr);
                    if doc.is_some_and(|s| s.pending_len() > 0) {
                        return Err(format!(
                            "device {} has changes of {addr:?} waiting for dependencies",
                            d.idx
                        ));
                    }
                    state.push_str(&format!(" {n}:{:?}", d.replica.heads(&addr)));
                }
                let msgs = all_messages(&d.replica, &c)?;
                let ids: BTreeSet<MessageId> = msgs.iter().map(|m| m.id).collect();
                if ids.len() != msgs.len() {
                    return Err(format!("device {} shows a message twice in {c:?}", d.idx));
                }
                let members = d.replica.members(&c).map_err(|e| e.to_string())?;
                state.push_str(&format!(" {members:?} {msgs:?}"));
                views.push((d.idx, state));
            }
        }
        if let Some((first, rest)) = views.split_first() {
            for v in rest {
                if v.1 != first.1 {
                    return Err(format!(
                        "conversation {c:?} diverged between devices {} and {}",
                        first.0, v.0
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every operation that returned is everywhere it should be; a removed account reads nothing
/// written after its removal.
fn no_loss(w: &World) -> Result<(), String> {
    let members = final_members(w);
    for (author, done) in &w.done {
        let author_account = w.devices[*author].account();
        match done {
            Done::Sent { conversation, .. } if orphaned(w, conversation) => {}
            Done::Sent {
                conversation,
                id,
                excluded,
            } => {
                let Some((_, m)) = members.get(conversation) else {
                    if w.revoked.contains_key(author) {
                        continue;
                    }
                    return Err(format!("message {id:?} in a conversation nobody holds"));
                };
                // A revoked device's unsent messages are never taken from it.
                if m.contains(&author_account) && !w.revoked.contains_key(author) {
                    for account in m {
                        for d in devices_of(w, account) {
                            if d.replica.message(conversation, id).is_err() {
                                return Err(format!(
                                    "device {} lacks message {id:?} sent by device {author}",
                                    d.idx
                                ));
                            }
                        }
                    }
                }
                for account in excluded {
                    for d in devices_of(w, account) {
                        if d.replica.message(conversation, id).is_ok() {
                            return Err(format!(
                                "removed device {} reads message {id:?} written after the removal",
                                d.idx
                            ));
                        }
                    }
                }
            }
            Done::Created { .. } if w.revoked.contains_key(author) => {}
            Done::Created { conversation } => {
                let Some((_, m)) = members.get(conversation) else {
                    return Err(format!("created conversation {conversation:?} lost"));
                };
                for account in m {
                    for d in devices_of(w, account) {
                        if !d.replica.has_meta(conversation) {
                            return Err(format!(
                                "device {} lacks conversation {conversation:?}",
                                d.idx
                            ));
                        }
                    }
                }
            }
            Done::Other(_) => {}
        }
    }
    Ok(())
}

/// Nothing a device holds was forged: every change is one its author device made (the same
/// hash in the author's own replica), in the same document; every log is the account's own.
fn no_forgery(w: &World) -> Result<(), String> {
    let by_device: BTreeMap<crate::ids::DeviceId, &Device> =
        w.devices.iter().map(|d| (d.device(), d)).collect();
    for d in &w.devices {
        for addr in d.replica.docs() {
            let Some(doc) = d.replica.synced_doc(&addr) else {
                continue;
            };
            for change in doc.doc().get_changes(&[]) {
                let actor = crate::ids::DeviceId::from_bytes(
                    change
                        .actor_id()
                        .to_bytes()
                        .try_into()
                        .map_err(|_| "an actor that is not a device id".to_string())?,
                );
                let Some(author) = by_device.get(&actor) else {
                    return Err(format!("device {} holds a change by a stranger", d.idx));
                };
                let genuine = author
                    .replica
                    .synced_doc(&addr)
                    .is_some_and(|a| a.doc().get_change_by_hash(&change.hash()).is_some());
                if !genuine {
                    return Err(format!(
                        "device {} holds a change of {addr:?} its author device {} does not",
                        d.idx, author.idx
                    ));
                }
            }
        }
        // Every copy of a log is a prefix of the account's log as its devices wrote it.
        let own = std::iter::once((d.account(), &d.log));
        for (account, log) in own.chain(d.logs.iter().map(|(a, l)| (*a, l))) {
            let genuine = w.logs.get(&account).map_or(&[][..], Vec::as_slice);
            if !genuine.starts_with(log.entries()) {
                return Err(format!("device {} accepted a forged log entry", d.idx));
            }
        }
    }
    Ok(())
}
