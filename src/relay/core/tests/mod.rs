//! Deterministic tests of the relay core: a fixture drives it with messages and plays the
//! shell's part (persisting, then executing what depended on it).

use super::*;
use crate::crypto::device_log::DeviceLog;
use crate::crypto::envelope::{EnvelopeHeader, EnvelopeKind, SealedEnvelope};
use crate::crypto::group::{GroupUpdate, SealedLabel};
use crate::crypto::identity::DeviceSecret;
use crate::crypto::keys::{DocKey, KeyEpoch};
use crate::crypto::rng::SeedRng;
use crate::ids::{ConversationId, DocAddr};
use crate::relay::store::NewEnvelope;
use crate::wire::message::Subscription;

mod accounts;
mod docs;
mod forwards;
mod hostile;
mod pairing;
mod snapshots;

/// A device and the log of its account.
pub(super) struct Account {
    pub devices: Vec<DeviceSecret>,
    pub log: DeviceLog,
}

impl Account {
    /// A new account whose first device is drawn from `seed`.
    pub fn new(seed: u8) -> Self {
        let first = device(seed);
        let log = DeviceLog::create(&first, "first", "test").unwrap();
        Self {
            devices: vec![first],
            log,
        }
    }

    pub fn id(&self) -> AccountId {
        self.log.account()
    }

    /// Adds a device (drawn from `seed`) to the log, signed by the first device; returns the
    /// entry.
    pub fn add_device(&mut self, seed: u8) -> DeviceLogEntry {
        let new = device(seed);
        let entry = self
            .log
            .add_device(&self.devices[0], new.public(), "another", "test")
            .unwrap();
        self.log.append(entry.clone()).unwrap();
        self.devices.push(new);
        entry
    }

    /// Revokes device `index`, signed by the first device; returns the entry.
    pub fn revoke(&mut self, index: usize) -> DeviceLogEntry {
        let entry = self
            .log
            .revoke_device(&self.devices[0], self.devices[index].device_id())
            .unwrap();
        self.log.append(entry.clone()).unwrap();
        entry
    }
}

pub(super) fn device(seed: u8) -> DeviceSecret {
    DeviceSecret::generate(&mut SeedRng::from_seed([seed; 32]))
}

/// The group id of conversation `n`.
pub(super) fn group_id(n: u8) -> DocId {
    DocAddr::Meta(ConversationId::from_bytes([n; 16])).doc_id()
}

/// A document id that is not a group.
pub(super) fn doc_id(n: u8) -> DocId {
    DocId::from_bytes([n; 32])
}

/// A signed update of group `n`.
pub(super) fn group_update(
    signer: &DeviceSecret,
    signer_account: AccountId,
    n: u8,
    version: u32,
    members: Vec<AccountId>,
) -> GroupUpdate {
    let addr = DocAddr::Meta(ConversationId::from_bytes([n; 16]));
    let mut rng = SeedRng::from_seed([n; 32]);
    let label = SealedLabel::seal(&addr, KeyEpoch(0), &DocKey::from_bytes([7; 32]), &mut rng);
    GroupUpdate::sign(
        signer,
        signer_account,
        addr.doc_id(),
        version,
        members,
        Vec::new(),
        label,
    )
    .unwrap()
}

/// An envelope of `doc` by `author`, for changes `first_seq..=first_seq`.
pub(super) fn envelope(
    author: &DeviceSecret,
    doc: DocId,
    kind: EnvelopeKind,
    first_seq: u64,
) -> SealedEnvelope {
    let header = EnvelopeHeader {
        kind,
        doc,
        epoch: KeyEpoch(0),
        author: author.device_id(),
        first_seq,
        last_seq: first_seq,
    };
    SealedEnvelope::seal(author, &DocKey::from_bytes([7; 32]), header, b"changes").unwrap()
}

/// Drives a core like its shell would.
pub(super) struct Fx {
    pub core: RelayCore,
    pub now_ms: u64,
    /// Every persisted op, in order.
    pub persisted: Vec<PersistOp>,
    next_conn: u64,
    next_req: u32,
}

impl Fx {
    pub fn new() -> Self {
        Self::with_limits(RelayLimits::default())
    }

    pub fn with_limits(limits: RelayLimits) -> Self {
        Self {
            core: RelayCore::new(limits),
            now_ms: 1_000,
            persisted: Vec::new(),
            next_conn: 1,
            next_req: 100,
        }
    }

    /// A fresh request id.
    pub fn req(&mut self) -> u32 {
        self.next_req += 1;
        self.next_req
    }

    /// Feeds `input` and returns the outputs with every `Persist` done and replaced by its
    /// `then`, as the shell would execute them.
    pub fn input(&mut self, input: Input) -> Vec<Output> {
        let raw = self.core.handle(input, self.now_ms);
        self.flatten(raw)
    }

    fn flatten(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        let mut flat = Vec::new();
        for o in outputs {
            match o {
                Output::Persist { op, then } => {
                    self.persisted.push(op);
                    flat.extend(self.flatten(then));
                }
                other => flat.push(other),
            }
        }
        flat
    }

    pub fn connect(&mut self, device: &DeviceSecret) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let out = self.input(Input::Connected {
            conn,
            device: device.device_id(),
        });
        assert!(out.is_empty(), "{out:?}");
        conn
    }

    pub fn msg(&mut self, conn: ConnId, msg: Message) -> Vec<Output> {
        self.input(Input::Message { conn, msg })
    }

    /// Uploads `account`'s log and says hello as device `index`; returns the connection,
    /// authenticated.
    pub fn join(&mut self, account: &Account, index: usize) -> ConnId {
        let conn = self.connect(&account.devices[index]);
        let req = self.req();
        let out = self.msg(
            conn,
            Message::LogAppend {
                req,
                account: account.id(),
                first_seq: 0,
                entries: account.log.entries().to_vec(),
            },
        );
        assert!(has_done(&out, conn, req), "{out:?}");
        self.hello(conn, account.id());
        assert!(self.core.connection(conn).unwrap().authenticated);
        conn
    }

    /// Sends `Hello` and returns the `HelloOk` fields.
    pub fn hello(&mut self, conn: ConnId, account: AccountId) -> Message {
        let req = self.req();
        let out = self.msg(
            conn,
            Message::Hello {
                req,
                account,
                log_len: 0,
                log_head: crate::crypto::device_log::EntryHash([0; 32]),
            },
        );
        messages_to(&out, conn)
            .into_iter()
            .find(|m| matches!(m, Message::HelloOk { .. } | Message::Error { .. }))
            .unwrap()
    }

    /// Posts a group update from `conn`; asserts it was accepted.
    pub fn post_group(&mut self, conn: ConnId, update: GroupUpdate) -> Vec<Output> {
        let req = self.req();
        let out = self.msg(conn, Message::PostGroup { req, update });
        assert!(has_done(&out, conn, req), "{out:?}");
        out
    }

    /// Subscribes `conn` to `doc` of group `group`; returns the outputs.
    pub fn subscribe(&mut self, conn: ConnId, doc: DocId, group: DocId, after: u64) -> Vec<Output> {
        let req = self.req();
        self.msg(
            conn,
            Message::Subscribe {
                req,
                items: vec![Subscription {
                    doc,
                    group,
                    after_seq: after,
                    snapshot: false,
                }],
            },
        )
    }

    /// Appends `env` from `conn`, expecting it to reach the store; returns the request id and
    /// the store request.
    pub fn append(
        &mut self,
        conn: ConnId,
        group: DocId,
        env: SealedEnvelope,
    ) -> (u32, NewEnvelope) {
        let req = self.req();
        let out = self.msg(
            conn,
            Message::Append {
                req,
                group,
                envelope: env,
            },
        );
        let appends: Vec<NewEnvelope> = out
            .into_iter()
            .filter_map(|o| match o {
                Output::Append { envelope, .. } => Some(envelope),
                _ => None,
            })
            .collect();
        assert_eq!(appends.len(), 1);
        (req, appends.into_iter().next().unwrap())
    }

    /// Reports an append's outcome.
    pub fn stored(
        &mut self,
        conn: ConnId,
        req: u32,
        doc: DocId,
        outcome: StoreOutcome,
    ) -> Vec<Output> {
        self.input(Input::EnvelopeStored {
            conn,
            req,
            doc,
            outcome,
        })
    }
}

/// Messages sent or pushed to `conn`, in order.
pub(super) fn messages_to(out: &[Output], conn: ConnId) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, msg } | Output::Push { conn: c, msg } if *c == conn => {
                Some(msg.clone())
            }
            _ => None,
        })
        .collect()
}

/// Whether `conn` got `Done { req }`.
pub(super) fn has_done(out: &[Output], conn: ConnId, req: u32) -> bool {
    messages_to(out, conn).contains(&Message::Done { req })
}

/// The single error `conn` got: its code and text.
pub(super) fn error_to(out: &[Output], conn: ConnId) -> (ErrorCode, String) {
    let errors: Vec<(ErrorCode, String)> = messages_to(out, conn)
        .into_iter()
        .filter_map(|m| match m {
            Message::Error { code, text, .. } => Some((code, text)),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{out:?}");
    errors.into_iter().next().unwrap()
}

/// Whether `conn` is told to close.
pub(super) fn closes(out: &[Output], conn: ConnId) -> bool {
    out.iter()
        .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn))
}
