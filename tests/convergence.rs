//! Convergence of the data model under random operations and a faulty delivery order.
//!
//! Several devices of two accounts edit conversations while a random schedule exports change
//! batches between them: batches are delivered late, out of order, twice or never, sometimes only
//! in part, sometimes through the wire encoding, and devices go offline for stretches. After a
//! final exchange of everything, every device must show the same state (see the invariants in
//! `check_converged`), and a new device fed every change in a shuffled order must agree with them.
//!
//! A second test rolls two offline devices over to the same new segment and checks, object by
//! object, that no two devices ever created the same Automerge object concurrently.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ObjId, ObjType, ReadDoc, Value};
use proptest::prelude::*;
use proptest::sample::Index;

use roamsync::ids::{AccountId, ConversationId, DeviceId, DocAddr, MessageId};
use roamsync::model::{
    Attachment, ChangeBatch, Cursor, Draft, ListFlag, Message, ModelConfig, ModelError, Replica,
};

const BASE_MS: u64 = 1_800_000_000_000;
const STEP_MS: u64 = 5;
const PAGE: usize = 7;
const EMOJI: [&str; 3] = ["👍", "❤", "😂"];
const DRAFTS: [&str; 3] = ["", "draft one", "draft two"];
const FLAGS: [ListFlag; 3] = [ListFlag::Pinned, ListFlag::Muted, ListFlag::Archived];

// ---- helpers shared with the roll-over test ------------------------------------------------

fn account(n: u8) -> AccountId {
    AccountId::from_bytes([n; 32])
}

fn device(n: u8) -> DeviceId {
    let mut b = [n; 32];
    b[31] = 0xd0;
    DeviceId::from_bytes(b)
}

/// Walks every object of `doc` and fails if any map key or list element holds more than one
/// value of which one is an object: that would mean two devices created the same object
/// concurrently and one of them is silently hidden.
fn assert_no_object_conflicts(doc: &automerge::Automerge, what: &str) {
    let mut stack: Vec<ObjId> = vec![automerge::ROOT];
    while let Some(obj) = stack.pop() {
        let values: Vec<(String, Vec<(Value<'_>, ObjId)>)> = match doc.object_type(&obj) {
            Ok(ObjType::Map) | Ok(ObjType::Table) => doc
                .keys(&obj)
                .map(|k| {
                    let all = doc.get_all(&obj, k.as_str()).expect("key exists");
                    (k, all)
                })
                .collect(),
            Ok(ObjType::List) => (0..doc.length(&obj))
                .map(|i| (i.to_string(), doc.get_all(&obj, i).expect("index exists")))
                .collect(),
            Ok(ObjType::Text) | Err(_) => Vec::new(),
        };
        for (key, all) in values {
            let objects = all
                .iter()
                .filter(|(v, _)| matches!(v, Value::Object(_)))
                .count();
            assert!(
                all.len() == 1 || objects == 0,
                "{what}: key {key:?} holds {} concurrent values, {objects} of them objects",
                all.len()
            );
            for (v, id) in all {
                if matches!(v, Value::Object(_)) {
                    stack.push(id);
                }
            }
        }
    }
}

/// Every message of a conversation, oldest first, by walking history pages with the cursor.
fn full_history(r: &Replica, c: &ConversationId) -> Vec<Message> {
    history_in_pages(r, c, PAGE)
}

/// Every message of a conversation, oldest first, by walking pages of `limit`.
fn history_in_pages(r: &Replica, c: &ConversationId, limit: usize) -> Vec<Message> {
    let mut pages: Vec<Vec<Message>> = Vec::new();
    let mut before: Option<Cursor> = None;
    loop {
        let page = r
            .history(c, before, limit)
            .expect("history of a held conversation");
        assert!(page.messages.len() <= limit);
        pages.push(page.messages);
        match page.next {
            Some(next) => {
                assert!(
                    before.is_none_or(|b| next < b),
                    "the cursor must move backwards"
                );
                before = Some(next);
            }
            None => break,
        }
        assert!(pages.len() < 10_000, "history paging does not terminate");
    }
    pages.into_iter().rev().flatten().collect()
}

// ---- the simulated world -------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Create {
        with_other: bool,
        title: u8,
    },
    Send {
        conv: Index,
        reply: Option<Index>,
        body: u8,
        attach: bool,
    },
    Edit {
        conv: Index,
        msg: Index,
        body: u8,
    },
    Recall {
        conv: Index,
        msg: Index,
    },
    React {
        conv: Index,
        msg: Index,
        emoji: usize,
        on: bool,
    },
    MarkRead {
        conv: Index,
        msg: Index,
    },
    SetDraft {
        conv: Index,
        text: usize,
    },
    SetFlag {
        conv: Index,
        flag: usize,
        on: bool,
    },
    Hide {
        conv: Index,
        msg: Index,
    },
    SetTitle {
        conv: Index,
        title: u8,
    },
    SetSetting {
        conv: Index,
        value: u8,
    },
    Member {
        conv: Index,
        add: bool,
        own: bool,
    },
}

#[derive(Clone, Debug)]
enum Step {
    Op {
        node: Index,
        op: Op,
    },
    /// `from` exports what it thinks `to` lacks; the batches go into the network (or straight to
    /// `to`), possibly only in part, possibly twice, possibly through the wire encoding.
    Export {
        from: Index,
        to: Index,
        docs: Option<u32>,
        by_heads: bool,
        subset: Option<u64>,
        twice: bool,
        encode: bool,
        direct: bool,
    },
    /// Delivers up to `count` batches waiting for one device, in one `apply` call.
    Deliver {
        pick: Index,
        count: usize,
    },
    Drop {
        pick: Index,
    },
    ToggleOffline {
        node: Index,
    },
}

struct Node {
    replica: Replica,
    skew_ms: u64,
    offline: bool,
    /// Messages this device has shown: sent here or reported new by `apply`.
    seen: BTreeSet<MessageId>,
}

struct Conv {
    id: ConversationId,
    /// Accounts that are or were members: only their devices receive the conversation.
    ever: BTreeSet<AccountId>,
    /// Messages whose `send` returned `Ok`, in send order.
    sent: Vec<MessageId>,
}

struct World {
    nodes: Vec<Node>,
    convs: Vec<Conv>,
    /// Messages each account successfully hid, per conversation.
    hidden: BTreeMap<(AccountId, ConversationId), BTreeSet<MessageId>>,
    net: Vec<(usize, ChangeBatch)>,
    step: u64,
}

impl World {
    fn new(a_devices: usize, b_devices: usize, cap: usize, skews: &[u64]) -> World {
        let config = ModelConfig {
            segment_cap: cap,
            ..ModelConfig::default()
        };
        let mut nodes = Vec::new();
        for i in 0..a_devices + b_devices {
            let acct = if i < a_devices {
                account(1)
            } else {
                account(2)
            };
            nodes.push(Node {
                replica: Replica::new(acct, device(i as u8 + 1), config).expect("valid config"),
                skew_ms: skews[i % skews.len()],
                offline: false,
                seen: BTreeSet::new(),
            });
        }
        let mut w = World {
            nodes,
            convs: Vec::new(),
            hidden: BTreeMap::new(),
            net: Vec::new(),
            step: 0,
        };
        // Every run starts with one conversation between the two accounts that every device
        // already holds.
        w.op(
            0,
            &Op::Create {
                with_other: true,
                title: 0,
            },
        );
        w.settle();
        w
    }

    fn now(&self, node: usize) -> u64 {
        BASE_MS + self.step * STEP_MS + self.nodes[node].skew_ms
    }

    fn allowed(&self, to: usize, addr: &DocAddr) -> bool {
        let account = self.nodes[to].replica.account();
        match addr {
            DocAddr::Account(a) => *a == account,
            DocAddr::Meta(c) | DocAddr::Segment(c, _) => self
                .convs
                .iter()
                .any(|conv| conv.id == *c && conv.ever.contains(&account)),
            _ => false,
        }
    }

    fn other_account(&self, node: usize) -> AccountId {
        if self.nodes[node].replica.account() == account(1) {
            account(2)
        } else {
            account(1)
        }
    }

    fn note_members(&mut self, conv: usize, node: usize) {
        let id = self.convs[conv].id;
        if let Ok(members) = self.nodes[node].replica.members(&id) {
            self.convs[conv].ever.extend(members);
        }
    }

    fn op(&mut self, node: usize, op: &Op) {
        let now = self.now(node);
        let me = self.nodes[node].replica.account();
        let other = self.other_account(node);
        let pick_conv = |w: &World, i: &Index| -> Option<usize> {
            (!w.convs.is_empty()).then(|| i.index(w.convs.len()))
        };
        let pick_msg = |w: &World, c: usize, i: &Index| -> Option<MessageId> {
            let sent = &w.convs[c].sent;
            (!sent.is_empty()).then(|| sent[i.index(sent.len())])
        };
        let result: Result<(), ModelError> = match op {
            Op::Create { with_other, title } => {
                let others: Vec<AccountId> = if *with_other { vec![other] } else { vec![] };
                let r = &mut self.nodes[node].replica;
                match r.create_conversation(now, &format!("chat {title}"), &others) {
                    Ok(id) => {
                        let ever = r.members(&id).expect("just created").into_iter().collect();
                        self.convs.push(Conv {
                            id,
                            ever,
                            sent: Vec::new(),
                        });
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Send {
                conv,
                reply,
                body,
                attach,
            } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let reply_to = reply.as_ref().and_then(|i| pick_msg(self, c, i));
                let draft = Draft {
                    body: format!("message {body}"),
                    reply_to,
                    attachments: if *attach {
                        vec![Attachment {
                            hash: [*body; 32],
                            size: u64::from(*body) * 100,
                            mime: "image/png".into(),
                            name: format!("file{body}.png"),
                        }]
                    } else {
                        Vec::new()
                    },
                };
                let id = self.convs[c].id;
                match self.nodes[node].replica.send(now, &id, &draft) {
                    Ok(m) => {
                        assert_eq!(m.device, self.nodes[node].replica.device());
                        let got = self.nodes[node]
                            .replica
                            .message(&id, &m)
                            .expect("just sent");
                        assert_eq!(got.body.as_deref(), Some(draft.body.as_str()));
                        assert_eq!(got.reply_to, reply_to);
                        self.convs[c].sent.push(m);
                        self.nodes[node].seen.insert(m);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Edit { conv, msg, body } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let Some(m) = pick_msg(self, c, msg) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node]
                    .replica
                    .edit(&id, &m, &format!("edited {body}"))
            }
            Op::Recall { conv, msg } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let Some(m) = pick_msg(self, c, msg) else {
                    return;
                };
                let id = self.convs[c].id;
                let r = self.nodes[node].replica.recall(&id, &m);
                if r.is_ok() {
                    let shown = self.nodes[node].replica.message(&id, &m).expect("recalled");
                    assert!(shown.recalled && shown.body.is_none() && shown.attachments.is_empty());
                }
                r
            }
            Op::React {
                conv,
                msg,
                emoji,
                on,
            } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let Some(m) = pick_msg(self, c, msg) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node].replica.react(&id, &m, EMOJI[*emoji], *on)
            }
            Op::MarkRead { conv, msg } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let Some(m) = pick_msg(self, c, msg) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node].replica.mark_read(&id, &m)
            }
            Op::SetDraft { conv, text } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node].replica.set_draft(&id, DRAFTS[*text])
            }
            Op::SetFlag { conv, flag, on } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node].replica.set_flag(&id, FLAGS[*flag], *on)
            }
            Op::Hide { conv, msg } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let Some(m) = pick_msg(self, c, msg) else {
                    return;
                };
                let id = self.convs[c].id;
                let r = self.nodes[node].replica.hide_message(&id, &m);
                if r.is_ok() {
                    self.hidden.entry((me, id)).or_default().insert(m);
                }
                r
            }
            Op::SetTitle { conv, title } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node]
                    .replica
                    .set_title(&id, &format!("title {title}"))
            }
            Op::SetSetting { conv, value } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let id = self.convs[c].id;
                self.nodes[node]
                    .replica
                    .set_setting(&id, "colour", &format!("c{value}"))
            }
            Op::Member { conv, add, own } => {
                let Some(c) = pick_conv(self, conv) else {
                    return;
                };
                let id = self.convs[c].id;
                let target = if *own { me } else { other };
                let r = if *add {
                    self.nodes[node].replica.add_member(now, &id, &target)
                } else {
                    self.nodes[node].replica.remove_member(&id, &target)
                };
                if r.is_ok() {
                    self.note_members(c, node);
                }
                r
            }
        };
        if let Err(e) = result {
            assert!(
                matches!(
                    e,
                    ModelError::UnknownConversation(_)
                        | ModelError::UnknownMessage { .. }
                        | ModelError::NotAuthor { .. }
                        | ModelError::Recalled(_)
                        | ModelError::NotMember { .. }
                ),
                "{op:?} on node {node} failed with an unexpected error: {e:?}"
            );
        }
    }

    fn deliver(&mut self, to: usize, batches: Vec<ChangeBatch>) -> bool {
        let now = self.now(to);
        let addrs: BTreeSet<DocAddr> = batches.iter().map(|b| b.addr).collect();
        let held = |r: &Replica, addr: &DocAddr| -> u64 {
            r.version_vector(addr).iter().map(|(_, seq)| *seq).sum()
        };
        let before: Vec<u64> = addrs
            .iter()
            .map(|a| held(&self.nodes[to].replica, a))
            .collect();
        let report = self.nodes[to].replica.apply(now, batches);
        // What a document reports applied is exactly how far its version vector moved.
        for (addr, was) in addrs.iter().zip(before) {
            // (Plus the receiver's own repairs: removing text an edit wrote back over a recall.)
            let applied: usize = report
                .docs
                .iter()
                .filter(|(a, _)| a == addr)
                .map(|(_, d)| d.applied + d.repairs)
                .sum();
            let now_held = held(&self.nodes[to].replica, addr);
            assert_eq!(now_held - was, applied as u64, "{addr:?}");
        }
        assert!(
            report.rejected.is_empty(),
            "honest batches were rejected: {:?}",
            report.rejected
        );
        assert!(
            report.clock_skew.is_empty(),
            "skews are far below the bound: {:?}",
            report.clock_skew
        );
        // Each message is reported new exactly once, and in conversation order.
        for w in report.new_messages.windows(2) {
            assert!(
                w[0].0 != w[1].0 || w[0].1 < w[1].1,
                "new messages out of order: {:?}",
                report.new_messages
            );
        }
        for (_, m) in &report.new_messages {
            assert!(self.nodes[to].seen.insert(*m), "{m:?} reported new twice");
        }
        report.docs.iter().any(|(_, d)| d.applied > 0)
    }

    /// The batches `from` would send `to` for the documents `to` may hold.
    fn export(
        &self,
        from: usize,
        to: usize,
        docs: Option<u32>,
        by_heads: bool,
    ) -> Vec<ChangeBatch> {
        let src = &self.nodes[from].replica;
        let dst = &self.nodes[to].replica;
        src.docs()
            .into_iter()
            .enumerate()
            .filter(|(i, addr)| {
                docs.is_none_or(|mask| mask & (1 << (i % 32)) != 0) && self.allowed(to, addr)
            })
            .filter_map(|(_, addr)| {
                if by_heads {
                    src.changes_since_heads(&addr, &dst.heads(&addr))
                } else {
                    src.changes_since(&addr, &dst.version_vector(&addr))
                }
            })
            .collect()
    }

    fn step(&mut self, step: &Step) {
        self.step += 1;
        let n = self.nodes.len();
        match step {
            Step::Op { node, op } => self.op(node.index(n), op),
            Step::Export {
                from,
                to,
                docs,
                by_heads,
                subset,
                twice,
                encode,
                direct,
            } => {
                let (from, to) = (from.index(n), to.index(n));
                if from == to || self.nodes[from].offline || self.nodes[to].offline {
                    return;
                }
                let mut batches = self.export(from, to, *docs, *by_heads);
                if let Some(mask) = subset {
                    for b in &mut batches {
                        let mut k = 0;
                        b.changes.retain(|_| {
                            k += 1;
                            mask & (1 << ((k - 1) % 64)) != 0
                        });
                    }
                    batches.retain(|b| !b.changes.is_empty());
                }
                if *encode {
                    batches = batches
                        .into_iter()
                        .flat_map(ChangeBatch::split)
                        .map(|b| {
                            let bytes = b.encode();
                            assert_eq!(bytes.len(), b.encoded_len());
                            ChangeBatch::decode(&bytes).expect("an encoded batch decodes")
                        })
                        .collect();
                }
                if *direct {
                    if *twice {
                        self.deliver(to, batches.clone());
                    }
                    self.deliver(to, batches);
                } else {
                    for b in batches {
                        if *twice {
                            self.net.push((to, b.clone()));
                        }
                        self.net.push((to, b));
                    }
                }
            }
            Step::Deliver { pick, count } => {
                if self.net.is_empty() {
                    return;
                }
                let first = pick.index(self.net.len());
                let to = self.net[first].0;
                if self.nodes[to].offline {
                    return;
                }
                let mut batches = vec![self.net.remove(first).1];
                while batches.len() < *count {
                    let Some(i) = self.net.iter().position(|(t, _)| *t == to) else {
                        break;
                    };
                    batches.push(self.net.remove(i).1);
                }
                self.deliver(to, batches);
            }
            Step::Drop { pick } => {
                if !self.net.is_empty() {
                    let i = pick.index(self.net.len());
                    self.net.remove(i);
                }
            }
            Step::ToggleOffline { node } => {
                let i = node.index(n);
                self.nodes[i].offline = !self.nodes[i].offline;
            }
        }
    }

    /// Everyone online, every pair exchanges everything until nothing changes any more.
    fn settle(&mut self) {
        for node in &mut self.nodes {
            node.offline = false;
        }
        let n = self.nodes.len();
        for round in 0.. {
            assert!(round < 20, "the final exchange does not settle");
            self.step += 1;
            let mut changed = false;
            for from in 0..n {
                for to in 0..n {
                    if from != to {
                        let batches = self.export(from, to, None, false);
                        changed |= self.deliver(to, batches);
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // The version vectors of every document agree between devices that may hold it.
        for from in 0..n {
            for addr in self.nodes[from].replica.docs() {
                let vv = self.nodes[from].replica.version_vector(&addr);
                for to in 0..n {
                    if self.allowed(to, &addr) {
                        assert_eq!(self.nodes[to].replica.version_vector(&addr), vv, "{addr:?}");
                    }
                }
                let doc = self.nodes[from].replica.synced_doc(&addr).expect("listed");
                assert_eq!(doc.pending_len(), 0, "changes still wait in {addr:?}");
                // The version vector agrees with the changes Automerge holds.
                let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
                for meta in doc.doc().get_changes_meta(&[]) {
                    *counts.entry(meta.actor.to_bytes().to_vec()).or_default() += 1;
                }
                let from_vv: BTreeMap<Vec<u8>, u64> = vv
                    .iter()
                    .map(|(d, seq)| (d.as_bytes().to_vec(), *seq))
                    .collect();
                assert_eq!(counts, from_vv, "{addr:?}");
            }
        }
    }

    /// A new device of each account that receives every change one at a time, in a shuffled
    /// order with some delivered twice, ends in the same state as the devices that took part.
    fn check_fresh_device(&self, seed: u64) {
        let mut rng = seed | 1;
        let mut next = move || {
            // xorshift64: a deterministic shuffle from the generated seed.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // One account per case keeps the run short; the seed picks which.
        let k = (seed % 2) as usize;
        for reference in [account(1), account(2)].iter().skip(k).take(1) {
            let Some(node) = self
                .nodes
                .iter()
                .find(|n| n.replica.account() == *reference)
            else {
                continue;
            };
            let reference = &node.replica;
            let mut fresh = Replica::new(
                reference.account(),
                device(100 + k as u8),
                reference.config(),
            )
            .expect("valid config");
            let mut changes: Vec<(DocAddr, automerge::Change)> = Vec::new();
            for addr in reference.docs() {
                if let Some(b) = reference.changes_since(&addr, &Default::default()) {
                    changes.extend(b.changes.into_iter().map(|c| (addr, c)));
                }
            }
            for i in (1..changes.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                changes.swap(i, j);
            }
            // Local changes the new device wrote in response (an edit and a concurrent recall
            // of its account's message seen in an order where the text came back): the same
            // state, one more writer in the version vector.
            let mut repairs: std::collections::BTreeMap<DocAddr, u64> = Default::default();
            let now = BASE_MS + self.step * STEP_MS;
            let mut i = 0;
            while i < changes.len() {
                let len = 1 + (next() % 4) as usize;
                let chunk: Vec<ChangeBatch> = changes[i..(i + len).min(changes.len())]
                    .iter()
                    .map(|(addr, c)| ChangeBatch {
                        addr: *addr,
                        changes: vec![c.clone()],
                    })
                    .collect();
                if next() % 8 == 0 {
                    let report = fresh.apply(now, chunk.clone());
                    count_repairs(&mut repairs, &report);
                }
                let report = fresh.apply(now, chunk);
                assert!(report.rejected.is_empty(), "{:?}", report.rejected);
                count_repairs(&mut repairs, &report);
                i += len;
            }
            assert_eq!(fresh.docs(), reference.docs());
            assert_eq!(
                fresh.conversation_list().unwrap(),
                reference.conversation_list().unwrap()
            );
            for c in reference.conversation_ids() {
                assert_eq!(full_history(&fresh, &c), full_history(reference, &c));
                assert_eq!(
                    fresh.unread_count(&c).unwrap(),
                    reference.unread_count(&c).unwrap()
                );
                assert_eq!(fresh.read_position(&c), reference.read_position(&c));
                assert_eq!(fresh.members(&c).unwrap(), reference.members(&c).unwrap());
                assert_eq!(fresh.settings(&c).unwrap(), reference.settings(&c).unwrap());
            }
            let me = fresh.device();
            for addr in fresh.docs() {
                let vv = fresh.version_vector(&addr);
                let own = vv.seq(&me);
                assert_eq!(own, repairs.get(&addr).copied().unwrap_or(0), "{addr:?}");
                let others: Vec<_> = vv.iter().filter(|(d, _)| **d != me).collect();
                let expected = reference.version_vector(&addr);
                assert_eq!(others, expected.iter().collect::<Vec<_>>());
                assert_eq!(fresh.synced_doc(&addr).unwrap().pending_len(), 0);
            }
        }
    }

    fn check_converged(&self) {
        let n = self.nodes.len();
        // Devices of one account: identical conversation lists, drafts, flags, read positions.
        for i in 0..n {
            for j in i + 1..n {
                let (ri, rj) = (&self.nodes[i].replica, &self.nodes[j].replica);
                if ri.account() == rj.account() {
                    assert_eq!(
                        ri.conversation_list().unwrap(),
                        rj.conversation_list().unwrap(),
                        "conversation lists of nodes {i} and {j}"
                    );
                }
            }
        }
        for conv in &self.convs {
            let c = conv.id;
            let holders: Vec<usize> = (0..n)
                .filter(|i| conv.ever.contains(&self.nodes[*i].replica.account()))
                .collect();
            // Every message shown anywhere, plus every message whose send returned Ok.
            let mut all: BTreeSet<MessageId> = conv.sent.iter().copied().collect();
            let mut histories: BTreeMap<usize, Vec<Message>> = BTreeMap::new();
            for &i in &holders {
                let h = full_history(&self.nodes[i].replica, &c);
                for w in h.windows(2) {
                    assert!(
                        w[0].id < w[1].id,
                        "history order is not strictly increasing: {:?} then {:?}",
                        w[0].id,
                        w[1].id
                    );
                }
                all.extend(h.iter().map(|m| m.id));
                // The page size changes nothing but the number of pages.
                let limit = 1 + (i + h.len()) % 4;
                assert_eq!(history_in_pages(&self.nodes[i].replica, &c, limit), h);
                histories.insert(i, h);
            }
            let reference = &self.nodes[holders[0]].replica;
            let expected_messages: BTreeMap<MessageId, Message> = all
                .iter()
                .map(|id| {
                    let m = reference.message(&c, id).unwrap_or_else(|e| {
                        panic!("node {} lost message {id:?} of {c}: {e}", holders[0])
                    });
                    (*id, m)
                })
                .collect();
            for &i in &holders {
                let r = &self.nodes[i].replica;
                let me = r.account();
                assert_eq!(r.members(&c).unwrap(), reference.members(&c).unwrap());
                assert_eq!(r.settings(&c).unwrap(), reference.settings(&c).unwrap());
                let summary = r.conversation_summary(&c).unwrap();
                assert_eq!(
                    summary.title,
                    reference.conversation_summary(&c).unwrap().title
                );
                // No message is lost, and every message reads the same everywhere.
                for id in &all {
                    let m = r
                        .message(&c, id)
                        .unwrap_or_else(|e| panic!("node {i} lost message {id:?} of {c}: {e}"));
                    assert_eq!(m, expected_messages[id], "message {id:?}");
                    if m.recalled {
                        assert!(m.body.is_none() && m.attachments.is_empty());
                    }
                }
                // History shows exactly the messages this account did not hide.
                let hidden = self.hidden.get(&(me, c)).cloned().unwrap_or_default();
                let expected: Vec<MessageId> = all
                    .iter()
                    .filter(|m| !hidden.contains(m))
                    .copied()
                    .collect();
                let shown: Vec<MessageId> = histories[&i].iter().map(|m| m.id).collect();
                assert_eq!(shown, expected, "history of node {i} in {c}");
                // Unread: other accounts' messages, not recalled or hidden, after both the read
                // position and this account's own latest (visible) message.
                let read = r.read_position(&c);
                let own_last = histories[&i]
                    .iter()
                    .filter(|m| m.author == me)
                    .map(|m| m.id.key())
                    .max();
                let unread = histories[&i]
                    .iter()
                    .filter(|m| {
                        m.author != me
                            && !m.recalled
                            && read.is_none_or(|k| m.id.key() > k)
                            && own_last.is_none_or(|k| m.id.key() > k)
                    })
                    .count() as u64;
                assert_eq!(r.unread_count(&c).unwrap(), unread, "unread on node {i}");
                assert_eq!(summary.unread, unread);
                for &j in &holders {
                    let rj = &self.nodes[j].replica;
                    if rj.account() == me {
                        assert_eq!(histories[&i], histories[&j], "histories of nodes {i}, {j}");
                        assert_eq!(r.unread_count(&c).unwrap(), rj.unread_count(&c).unwrap());
                        assert_eq!(r.read_position(&c), rj.read_position(&c));
                        assert_eq!(r.draft(&c), rj.draft(&c));
                    }
                }
            }
        }
        // No two devices ever created the same object concurrently.
        for node in &self.nodes {
            for addr in node.replica.docs() {
                let doc = node.replica.synced_doc(&addr).expect("listed");
                assert_no_object_conflicts(doc.doc(), &format!("{addr:?}"));
            }
        }
    }
}

// ---- strategies ----------------------------------------------------------------------------

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (any::<bool>(), any::<u8>())
            .prop_map(|(with_other, title)| Op::Create { with_other, title }),
        20 => (any::<Index>(), proptest::option::weighted(0.3, any::<Index>()), any::<u8>(), proptest::bool::weighted(0.2))
            .prop_map(|(conv, reply, body, attach)| Op::Send { conv, reply, body, attach }),
        2 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(conv, msg, body)| Op::Edit { conv, msg, body }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(conv, msg)| Op::Recall { conv, msg }),
        3 => (any::<Index>(), any::<Index>(), 0..EMOJI.len(), any::<bool>())
            .prop_map(|(conv, msg, emoji, on)| Op::React { conv, msg, emoji, on }),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(conv, msg)| Op::MarkRead { conv, msg }),
        2 => (any::<Index>(), 0..DRAFTS.len()).prop_map(|(conv, text)| Op::SetDraft { conv, text }),
        2 => (any::<Index>(), 0..FLAGS.len(), any::<bool>())
            .prop_map(|(conv, flag, on)| Op::SetFlag { conv, flag, on }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(conv, msg)| Op::Hide { conv, msg }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(conv, title)| Op::SetTitle { conv, title }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(conv, value)| Op::SetSetting { conv, value }),
        1 => (any::<Index>(), any::<bool>(), proptest::bool::weighted(0.2))
            .prop_map(|(conv, add, own)| Op::Member { conv, add, own }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let export = (
        any::<Index>(),
        any::<Index>(),
        proptest::option::weighted(0.3, any::<u32>()),
        proptest::bool::weighted(0.3),
        proptest::option::weighted(0.2, any::<u64>()),
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.3),
    )
        .prop_map(
            |(from, to, docs, by_heads, subset, twice, encode, direct)| Step::Export {
                from,
                to,
                docs,
                by_heads,
                subset,
                twice,
                encode,
                direct,
            },
        );
    prop_oneof![
        14 => (any::<Index>(), op_strategy()).prop_map(|(node, op)| Step::Op { node, op }),
        4 => export,
        5 => (any::<Index>(), 1usize..4).prop_map(|(pick, count)| Step::Deliver { pick, count }),
        1 => any::<Index>().prop_map(|pick| Step::Drop { pick }),
        1 => any::<Index>().prop_map(|node| Step::ToggleOffline { node }),
    ]
}

/// (devices of account A, devices of account B): 3 to 5 replicas.
const TOPOLOGIES: [(usize, usize); 4] = [(2, 1), (3, 1), (2, 2), (3, 2)];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(
        topology in 0..TOPOLOGIES.len(),
        cap in 2usize..6,
        skews in proptest::collection::vec(0u64..40, 5),
        seed in any::<u64>(),
        steps in proptest::collection::vec(step_strategy(), 20..120),
    ) {
        let (a, b) = TOPOLOGIES[topology];
        let mut world = World::new(a, b, cap, &skews);
        for step in &steps {
            world.step(step);
        }
        world.settle();
        world.check_converged();
        world.check_fresh_device(seed);
    }
}

// ---- concurrent roll-over ------------------------------------------------------------------

/// Sends everything `from` holds that `to` may hold and lacks.
fn push_all(from: &Replica, to: &mut Replica, now_ms: u64) {
    let batches: Vec<ChangeBatch> = from
        .docs()
        .iter()
        .filter(|addr| !matches!(addr, DocAddr::Account(a) if *a != to.account()))
        .filter_map(|addr| from.changes_since(addr, &to.version_vector(addr)))
        .collect();
    let report = to.apply(now_ms, batches);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
}

#[test]
fn concurrent_offline_roll_over_creates_no_object_twice() {
    let config = ModelConfig {
        segment_cap: 2,
        ..ModelConfig::default()
    };
    let mut a = Replica::new(account(1), device(1), config).unwrap();
    let mut b = Replica::new(account(2), device(2), config).unwrap();
    let c = a
        .create_conversation(BASE_MS, "pair", &[account(2)])
        .unwrap();
    let mut sent = vec![a.send(BASE_MS + 1, &c, &Draft::text("a0")).unwrap()];
    push_all(&a, &mut b, BASE_MS + 2);
    sent.push(b.send(BASE_MS + 3, &c, &Draft::text("b0")).unwrap());
    push_all(&b, &mut a, BASE_MS + 4);
    // Segment 0 is full on both sides. Offline, each device fills segment 1 and opens segment 2.
    for i in 0..3u64 {
        sent.push(
            a.send(BASE_MS + 10 + i, &c, &Draft::text(format!("a{}", i + 1)))
                .unwrap(),
        );
        sent.push(
            b.send(BASE_MS + 10 + i, &c, &Draft::text(format!("b{}", i + 1)))
                .unwrap(),
        );
    }
    let expected_docs = vec![
        DocAddr::Account(account(1)),
        DocAddr::Meta(c),
        DocAddr::Segment(c, 0),
        DocAddr::Segment(c, 1),
        DocAddr::Segment(c, 2),
    ];
    assert_eq!(a.docs(), expected_docs);
    push_all(&a, &mut b, BASE_MS + 20);
    push_all(&b, &mut a, BASE_MS + 21);

    for addr in [DocAddr::Segment(c, 1), DocAddr::Segment(c, 2)] {
        // Both devices wrote into the same segment document.
        let vv = a.version_vector(&addr);
        assert!(vv.seq(&device(1)) > 0 && vv.seq(&device(2)) > 0, "{addr:?}");
        assert_eq!(vv, b.version_vector(&addr));
        // Every message map has exactly one creator.
        let doc = a.synced_doc(&addr).unwrap().doc();
        let keys: Vec<String> = doc.keys(automerge::ROOT).collect();
        assert!(keys.len() >= 2, "{addr:?} holds {keys:?}");
        for key in keys {
            let all = doc.get_all(automerge::ROOT, key.as_str()).unwrap();
            assert_eq!(all.len(), 1, "{addr:?} key {key}");
            assert!(matches!(all[0].0, Value::Object(ObjType::Map)));
        }
    }
    // The meta index entries of the new segments conflict, but only as scalars, and both
    // replicas resolve them to the same value.
    for n in [1u32, 2] {
        let key = format!("seg/{n:08x}");
        let meta_a = a.synced_doc(&DocAddr::Meta(c)).unwrap().doc();
        let meta_b = b.synced_doc(&DocAddr::Meta(c)).unwrap().doc();
        let all = meta_a.get_all(automerge::ROOT, key.as_str()).unwrap();
        assert_eq!(all.len(), 2, "both devices opened segment {n}");
        assert!(all.iter().all(|(v, _)| matches!(v, Value::Scalar(_))));
        assert_eq!(
            meta_a.get(automerge::ROOT, key.as_str()).unwrap(),
            meta_b.get(automerge::ROOT, key.as_str()).unwrap()
        );
    }
    for r in [&a, &b] {
        for addr in r.docs() {
            assert_no_object_conflicts(r.synced_doc(&addr).unwrap().doc(), &format!("{addr:?}"));
        }
        for id in &sent {
            r.message(&c, id).unwrap();
        }
    }
    let history = full_history(&a, &c);
    assert_eq!(history, full_history(&b, &c));
    let mut ids = sent.clone();
    ids.sort();
    assert_eq!(history.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
}

/// Adds the recall repairs an apply wrote, per document.
fn count_repairs(
    repairs: &mut std::collections::BTreeMap<DocAddr, u64>,
    report: &roamsync::model::ApplyReport,
) {
    for (addr, stats) in &report.docs {
        *repairs.entry(*addr).or_default() += stats.repairs as u64;
    }
}
