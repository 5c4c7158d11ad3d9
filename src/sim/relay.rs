//! A simulated relay: the real [`RelayCore`] over an in-memory model of its store, with the
//! store's durability (a crash loses the writes not committed yet) and, optionally, malice.

use std::collections::{BTreeMap, VecDeque};

use crate::crypto::envelope::EnvelopeId;
use crate::ids::{AccountId, DeviceId, DocId};
use crate::relay::core::{
    ConnId, Input, Output, PersistOp, RelayCore, RelaySnapshot, StoreOutcome,
};
use crate::relay::limits::RelayLimits;
use crate::relay::store::NewEnvelope;
use crate::wire::message::{Message, StoredEnvelope};

use super::rng::Rng;

/// Envelopes per `Envelopes` message in a catch-up or fetch answer. Small on purpose, so that
/// answers come in several messages and `more` is exercised.
pub(crate) const ENVELOPES_PER_MESSAGE: usize = 8;

/// Store writes queued and not yet committed, at most (a bound the run checks).
pub(crate) const MAX_PENDING_WRITES: usize = 4_096;

/// What a malicious relay does to what it sends devices. Each is a separate run mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malice {
    /// Drops envelopes from answers and pushes.
    Drop,
    /// Reverses the order of the envelopes in a message.
    Reorder,
    /// Sends envelopes the device already had again, as pushes.
    Replay,
    /// Leaves out the oldest envelopes of an answer and rewrites `prev` to hide the gap.
    Truncate,
    /// Serves another document's envelopes under a document's id.
    WrongDoc,
    /// Pushes device-log entries it made up (signed by a key of its own).
    ForgeLog,
}

/// Every malicious mode, for the runs.
pub(crate) const ALL_MALICE: [Malice; 6] = [
    Malice::Drop,
    Malice::Reorder,
    Malice::Replay,
    Malice::Truncate,
    Malice::WrongDoc,
    Malice::ForgeLog,
];

/// What the relay does on the network.
// Messages are moved once; boxing them would cost an allocation each (as in the core).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum NetOut {
    /// Send a message on a connection; `push` if the protocol allows dropping it.
    Msg {
        conn: ConnId,
        msg: Message,
        push: bool,
    },
    /// Close the connection after what was queued before.
    Close { conn: ConnId },
}

/// A durable write waiting for the group commit.
#[derive(Debug)]
enum Write {
    Persist {
        op: PersistOp,
        then: Vec<Output>,
    },
    Append {
        conn: ConnId,
        req: u32,
        envelope: NewEnvelope,
    },
}

/// One stored envelope.
#[derive(Clone, Debug)]
struct Row {
    seq: u64,
    prev: u64,
    bytes: Vec<u8>,
}

/// The committed contents of the relay's store.
#[derive(Clone, Debug, Default)]
struct Store {
    logs: BTreeMap<AccountId, Vec<Vec<u8>>>,
    groups: BTreeMap<DocId, Vec<Vec<u8>>>,
    docs: BTreeMap<DocId, DocId>,
    envelopes: BTreeMap<DocId, Vec<Row>>,
    dedup: BTreeMap<(DocId, DeviceId, u64), (EnvelopeId, u64)>,
    usage: BTreeMap<AccountId, u64>,
    last_seq: u64,
}

impl Store {
    fn persist(&mut self, op: PersistOp) {
        match op {
            PersistOp::AppendLog {
                account,
                first_seq,
                entries,
            } => {
                let log = self.logs.entry(account).or_default();
                log.truncate(first_seq as usize);
                log.extend(entries);
            }
            PersistOp::PutGroupUpdate {
                group,
                version,
                update,
            } => {
                let chain = self.groups.entry(group).or_default();
                assert_eq!(
                    chain.len(),
                    version as usize,
                    "group writes arrive in order"
                );
                chain.push(update);
            }
            PersistOp::CreateDocs { docs } => {
                for (doc, group) in docs {
                    self.docs.entry(doc).or_insert(group);
                }
            }
            // Devices of the simulation never upload snapshots.
            PersistOp::PutSnapshot { .. } => {}
        }
    }

    fn append(&mut self, e: NewEnvelope) -> StoreOutcome {
        let key = (e.doc, e.author, e.first_seq);
        if let Some((id, seq)) = self.dedup.get(&key) {
            return if *id == e.id {
                StoreOutcome::Duplicate { seq: *seq }
            } else {
                StoreOutcome::Conflict { existing: *id }
            };
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let rows = self.envelopes.entry(e.doc).or_default();
        let prev = rows.last().map_or(0, |r| r.seq);
        rows.push(Row {
            seq,
            prev,
            bytes: e.bytes.clone(),
        });
        self.dedup.insert(key, (e.id, seq));
        *self.usage.entry(e.account).or_default() += e.bytes.len() as u64;
        StoreOutcome::Stored { seq }
    }

    fn snapshot(&self) -> RelaySnapshot {
        RelaySnapshot {
            logs: self.logs.iter().map(|(a, l)| (*a, l.clone())).collect(),
            groups: self.groups.iter().map(|(g, u)| (*g, u.clone())).collect(),
            docs: self
                .docs
                .iter()
                .map(|(d, g)| {
                    let last = self
                        .envelopes
                        .get(d)
                        .and_then(|r| r.last())
                        .map_or(0, |r| r.seq);
                    (*d, *g, last)
                })
                .collect(),
            usage: self.usage.iter().map(|(a, u)| (*a, *u)).collect(),
        }
    }

    /// Envelopes of `doc` after `after`, at most `limit`, and whether more follow.
    fn read(&self, doc: &DocId, after: u64, limit: usize) -> (Vec<StoredEnvelope>, bool) {
        let rows = self.envelopes.get(doc).map(Vec::as_slice).unwrap_or(&[]);
        let start = rows.partition_point(|r| r.seq <= after);
        let end = (start + limit).min(rows.len());
        let items = rows[start..end]
            .iter()
            .map(|r| StoredEnvelope {
                seq: r.seq,
                prev: r.prev,
                envelope: r.bytes.clone(),
            })
            .collect();
        (items, end < rows.len())
    }
}

/// The simulated relay.
#[derive(Debug)]
pub(crate) struct RelayNode {
    core: RelayCore,
    store: Store,
    pending: VecDeque<Write>,
    pub malice: Option<Malice>,
    /// Largest number of writes ever waiting, for the bound check.
    pub max_pending: usize,
    /// The malicious relay's own device key, for forged log entries.
    pub(super) forger: crate::crypto::identity::DeviceSecret,
}

impl RelayNode {
    pub fn new(malice: Option<Malice>, rng: &mut Rng) -> Self {
        RelayNode {
            core: RelayCore::new(RelayLimits::default()),
            store: Store::default(),
            pending: VecDeque::new(),
            malice,
            max_pending: 0,
            forger: crate::crypto::identity::DeviceSecret::generate(&mut rng.seed_rng()),
        }
    }

    /// Feeds one input to the core and runs what it returns.
    pub fn handle(&mut self, input: Input, now_ms: u64, rng: &mut Rng) -> Vec<NetOut> {
        let outputs = self.core.handle(input, now_ms);
        let mut net = Vec::new();
        self.run(outputs, &mut net);
        self.max_pending = self.max_pending.max(self.pending.len());
        assert!(
            self.pending.len() <= MAX_PENDING_WRITES,
            "relay write queue unbounded: {}",
            self.pending.len()
        );
        self.tamper(net, rng)
    }

    /// The group commit: every queued write becomes durable, in order, and what waited for it
    /// runs.
    pub fn commit(&mut self, now_ms: u64, rng: &mut Rng) -> Vec<NetOut> {
        let mut net = Vec::new();
        while let Some(w) = self.pending.pop_front() {
            match w {
                Write::Persist { op, then } => {
                    self.store.persist(op);
                    self.run(then, &mut net);
                }
                Write::Append {
                    conn,
                    req,
                    envelope,
                } => {
                    let doc = envelope.doc;
                    let outcome = self.store.append(envelope);
                    let outputs = self.core.handle(
                        Input::EnvelopeStored {
                            conn,
                            req,
                            doc,
                            outcome,
                        },
                        now_ms,
                    );
                    self.run(outputs, &mut net);
                }
            }
        }
        self.tamper(net, rng)
    }

    /// A crash: writes not committed are lost, the core restarts from the store.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.core = RelayCore::load(RelayLimits::default(), self.store.snapshot())
            .expect("the simulated store holds only what the core accepted");
    }

    /// Stored envelopes of `doc` after `after` (for the malicious modes).
    pub(super) fn read_any(
        &self,
        doc: &DocId,
        after: u64,
        limit: usize,
    ) -> (Vec<StoredEnvelope>, bool) {
        self.store.read(doc, after, limit)
    }

    /// Some stored document other than `doc` that has envelopes.
    pub(super) fn other_doc(&self, doc: &DocId, rng: &mut Rng) -> Option<DocId> {
        let others: Vec<DocId> = self
            .store
            .envelopes
            .keys()
            .filter(|d| *d != doc)
            .copied()
            .collect();
        rng.pick(&others).copied()
    }

    /// The account a connection speaks for.
    pub(super) fn account_of(&self, conn: ConnId) -> Option<AccountId> {
        self.core.connection(conn)?.account
    }

    /// An account's stored log entries.
    pub(super) fn stored_log(&self, account: &AccountId) -> Option<&Vec<Vec<u8>>> {
        self.store.logs.get(account)
    }

    /// Whether writes wait for the commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn run(&mut self, outputs: Vec<Output>, net: &mut Vec<NetOut>) {
        for o in outputs {
            match o {
                Output::Send { conn, msg } => net.push(NetOut::Msg {
                    conn,
                    msg,
                    push: false,
                }),
                Output::Push { conn, msg } => net.push(NetOut::Msg {
                    conn,
                    msg,
                    push: true,
                }),
                Output::Close { conn, .. } => net.push(NetOut::Close { conn }),
                Output::Append {
                    conn,
                    req,
                    envelope,
                } => self.pending.push_back(Write::Append {
                    conn,
                    req,
                    envelope,
                }),
                Output::Persist { op, then } => self.pending.push_back(Write::Persist { op, then }),
                Output::CatchUp { conn, req, items } => {
                    for item in items {
                        let mut after = item.after_seq;
                        loop {
                            let (items, more) =
                                self.store.read(&item.doc, after, ENVELOPES_PER_MESSAGE);
                            let Some(last) = items.last() else { break };
                            after = last.seq;
                            net.push(NetOut::Msg {
                                conn,
                                msg: Message::Envelopes {
                                    req,
                                    doc: item.doc,
                                    items,
                                    more,
                                },
                                push: false,
                            });
                            if !more {
                                break;
                            }
                        }
                    }
                    net.push(NetOut::Msg {
                        conn,
                        msg: Message::Done { req },
                        push: false,
                    });
                }
                Output::Fetch {
                    conn,
                    req,
                    doc,
                    after_seq,
                    limit,
                } => {
                    let limit = (limit as usize).min(ENVELOPES_PER_MESSAGE * 4);
                    let (items, more) = self.store.read(&doc, after_seq, limit);
                    net.push(NetOut::Msg {
                        conn,
                        msg: Message::Envelopes {
                            req,
                            doc,
                            items,
                            more,
                        },
                        push: false,
                    });
                }
                // Datagrams are not simulated; events are for logs.
                _ => {}
            }
        }
    }
}
