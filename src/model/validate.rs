//! Checks on remote changes before Automerge sees them.
//!
//! Automerge 0.12 panics, instead of returning an error, when a change operates on an object or
//! list element the document does not have. A member device could use that to crash its peers,
//! so every remote change is checked against the shape of roamsync's documents first:
//!
//! * operations on the root and on maps use map keys, never list positions;
//! * an operation on an existing object names an object the document has;
//! * lists (a message's attachments) are written only by the change that created them, and only
//!   at positions that change inserted; text objects, tables, counters and marks do not occur;
//! * every predecessor an operation names exists.
//!
//! The checks decode each change once; they cost a few microseconds per change.

use std::collections::HashMap;

use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
use std::collections::HashSet;

use automerge::{ActorId, Automerge, Change, ChangeHash, ObjType, ReadDoc};

use crate::model::message::MessageUpdate;

/// Kinds of objects created by the changes of one batch.
type Created = HashMap<(u64, ActorId), ObjType>;

/// Operation counters of the changes accepted so far in one batch, per actor: `start..end`.
type Accepted = HashMap<ActorId, Vec<std::ops::Range<u64>>>;

/// The result of checking a run of changes.
pub(crate) struct Checked {
    /// Changes that may be applied, in order.
    pub valid: Vec<Change>,
    /// Changes refused, with the reason; every change depending on a refused one is refused too.
    pub refused: Vec<(Change, &'static str)>,
    /// What the valid changes write to.
    pub touched: Touched,
}

/// What a run of changes writes to, for the updates that follow an apply.
#[derive(Debug, Default)]
pub(crate) struct Touched {
    /// Maps (messages) whose text, attachments or recall flag are written: object id counter
    /// and actor.
    pub messages: Vec<(u64, ActorId)>,
    /// Keys of the root map that are written (in a segment: message keys).
    pub root_keys: Vec<String>,
    /// Messages that existed before the run and what the run changed in them.
    pub updates: Vec<(u64, ActorId, MessageUpdate)>,
}

/// Splits a topologically ordered run of changes into those that may be applied and those
/// refused.
///
/// `known_actor` says whether the document holds changes of an actor: a change may name other
/// actors only if their operations exist (Automerge 0.12 panics on an unknown one).
pub(crate) fn split_valid(
    doc: &Automerge,
    changes: Vec<Change>,
    known_actor: impl Fn(&ActorId) -> bool,
) -> Checked {
    let mut created: Created = HashMap::new();
    let mut accepted: Accepted = HashMap::new();
    let mut bad: HashSet<ChangeHash> = HashSet::new();
    let mut valid = Vec::with_capacity(changes.len());
    let mut touched = Touched::default();
    let mut refused = Vec::new();
    for change in changes {
        if change.deps().iter().any(|d| bad.contains(d)) {
            bad.insert(change.hash());
            refused.push((change, "depends on a refused change"));
            continue;
        }
        // Objects this change creates count only once it is accepted.
        let mut mine: Created = HashMap::new();
        let unknown_actor = change
            .other_actor_ids()
            .iter()
            .any(|a| !known_actor(a) && !accepted.contains_key(a));
        if unknown_actor {
            bad.insert(change.hash());
            refused.push((change, "names a device the document has no change from"));
            continue;
        }
        match check_change(doc, &change, &created, &accepted, &mut mine) {
            Ok(mut writes) => {
                touched.messages.append(&mut writes.messages);
                touched.root_keys.append(&mut writes.root_keys);
                touched.updates.append(&mut writes.updates);
                created.extend(mine);
                let start = change.start_op().get();
                accepted
                    .entry(change.actor_id().clone())
                    .or_default()
                    .push(start..start + change.len() as u64);
                valid.push(change);
            }
            Err(reason) => {
                bad.insert(change.hash());
                refused.push((change, reason));
            }
        }
    }
    Checked {
        valid,
        refused,
        touched,
    }
}

fn check_change(
    doc: &Automerge,
    change: &Change,
    earlier: &Created,
    accepted: &Accepted,
    created: &mut Created,
) -> Result<Touched, &'static str> {
    let expanded = decode(change).ok_or("operations do not decode")?;
    let actor = expanded.actor_id.clone();
    let start = expanded.start_op.get();
    // Objects and list insertions made by this change, by counter.
    let mut own_lists: HashMap<u64, ()> = HashMap::new();
    let mut own_inserts: HashMap<u64, u64> = HashMap::new();
    let mut touched = Touched::default();
    let known = |id: &OpId, created: &Created| -> Option<ObjType> {
        let k = (id.0, id.1.clone());
        earlier.get(&k).or_else(|| created.get(&k)).copied()
    };
    for (i, op) in expanded.operations.iter().enumerate() {
        let counter = start + i as u64;
        for p in op.pred.iter() {
            let own = p.1 == actor && p.0 >= start && p.0 < counter;
            let in_batch = accepted
                .get(&p.1)
                .is_some_and(|ranges| ranges.iter().any(|r| r.contains(&p.0)));
            if !own && !in_batch && known(p, created).is_none() && !op_exists(doc, p) {
                return Err("predecessor does not exist");
            }
        }
        let target = match &op.obj {
            ObjectId::Root => ObjType::Map,
            ObjectId::Id(id) => match known(id, created) {
                Some(t) => t,
                None => match doc.object_type(automerge::ObjId::Id(id.0, id.1.clone(), usize::MAX))
                {
                    Ok(t) => t,
                    Err(_) => return Err("operation on an unknown object"),
                },
            },
        };
        match target {
            ObjType::Map => {
                let Key::Map(key) = &op.key else {
                    return Err("list position used on a map");
                };
                if op.insert {
                    return Err("list position used on a map");
                }
                if let ObjectId::Id(id) = &op.obj {
                    if matches!(key.as_str(), "body" | "recalled" | "att") {
                        touched.messages.push((id.0, id.1.clone()));
                    }
                    // A map made in this run is a new message, not an update of one.
                    let made_now = known(id, created).is_some();
                    let update = match key.as_str() {
                        "body" | "att" => Some(MessageUpdate::Edited),
                        "recalled" => Some(MessageUpdate::Recalled),
                        k if k.starts_with(crate::model::message::REACTION_PREFIX) => {
                            Some(MessageUpdate::Reactions)
                        }
                        _ => None,
                    };
                    if let (Some(u), false) = (update, made_now) {
                        touched.updates.push((id.0, id.1.clone(), u));
                    }
                } else {
                    touched.root_keys.push(key.to_string());
                }
            }
            ObjType::List => {
                let ObjectId::Id(list) = &op.obj else {
                    return Err("list position used on the root");
                };
                if list.1 != actor || !own_lists.contains_key(&list.0) {
                    return Err("list written outside the change that made it");
                }
                match &op.key {
                    Key::Seq(ElementId::Head) => {}
                    Key::Seq(ElementId::Id(e))
                        if e.1 == actor && own_inserts.get(&e.0) == Some(&list.0) => {}
                    _ => return Err("unknown list position"),
                }
                if !op.insert {
                    return Err("list element overwritten");
                }
                own_inserts.insert(counter, list.0);
            }
            _ => return Err("text and table objects are not used"),
        }
        match &op.action {
            OpType::Make(t @ (ObjType::Map | ObjType::List)) => {
                created.insert((counter, actor.clone()), *t);
                if *t == ObjType::List {
                    own_lists.insert(counter, ());
                }
            }
            OpType::Make(_) => return Err("text and table objects are not used"),
            OpType::Put(_) | OpType::Delete => {}
            OpType::Increment(_) => return Err("counters are not used"),
            OpType::MarkBegin(_) | OpType::MarkEnd(_) => return Err("marks are not used"),
        }
    }
    Ok(touched)
}

/// The operations of a change. Automerge 0.12 checks a change's checksum and columns when it
/// parses it, but not that its operations name actors from the change's own actor table, and
/// panics on one that does not while decoding. Decoding touches nothing but the change, so the
/// panic is caught and the change refused. (This needs the default `panic = "unwind"`.)
fn decode(change: &Change) -> Option<automerge::ExpandedChange> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).ok()
}

/// Whether the document has an operation with this id.
fn op_exists(doc: &Automerge, id: &OpId) -> bool {
    doc.hash_for_opid(&automerge::ObjId::Id(id.0, id.1.clone(), usize::MAX))
        .is_some()
}

/// The accounts a run of segment changes speaks for: the author account of each message it
/// writes (`acct`) and the account of each reaction key (`rx/<account>/…`). The sync layer
/// checks them against the signing device's account, so no member can write as another.
/// `None` if a change does not decode, names an account malformed, or touches `acct` other than
/// by setting it on a message map the same change creates (deleting or rewriting the author of
/// an existing message would hide it or take it over).
pub fn claimed_accounts(changes: &[Change]) -> Option<Vec<crate::ids::AccountId>> {
    use crate::ids::AccountId;
    use crate::model::message::{ACCT, REACTION_PREFIX};
    let mut out = Vec::new();
    for change in changes {
        let expanded = decode(change)?;
        let start = expanded.start_op.get();
        let end = start.saturating_add(expanded.operations.len() as u64);
        let made_here = |obj: &ObjectId| matches!(obj, ObjectId::Id(id) if id.1 == expanded.actor_id && (start..end).contains(&id.0));
        for op in &expanded.operations {
            let Key::Map(key) = &op.key else {
                continue;
            };
            if key.as_str() == ACCT {
                match &op.action {
                    OpType::Put(automerge::ScalarValue::Bytes(b)) if made_here(&op.obj) => {
                        out.push(AccountId::from_bytes(b.as_slice().try_into().ok()?));
                    }
                    _ => return None,
                }
            } else if let Some(rest) = key.strip_prefix(REACTION_PREFIX) {
                let hex = rest.split('/').next()?;
                out.push(AccountId::parse_hex(hex).ok()?);
            }
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}
