//! The malicious relay's tampering with what it sends devices (see [`Malice`]).

use crate::crypto::device_log::{DeviceLog, DeviceLogEntry};
use crate::wire::message::{Message, StoredEnvelope};

use super::relay::{Malice, NetOut, RelayNode};
use super::rng::Rng;

/// Chance, per message, that the malicious relay tampers with it.
const TAMPER_PER_MILLE: u64 = 300;

impl RelayNode {
    /// Applies the relay's malice, if any, to what it is about to send.
    pub(super) fn tamper(&mut self, net: Vec<NetOut>, rng: &mut Rng) -> Vec<NetOut> {
        let Some(malice) = self.malice else {
            return net;
        };
        let mut out = Vec::with_capacity(net.len());
        for n in net {
            let NetOut::Msg { conn, msg, push } = n else {
                out.push(n);
                continue;
            };
            if !rng.chance(TAMPER_PER_MILLE) {
                out.push(NetOut::Msg { conn, msg, push });
                continue;
            }
            match (malice, msg) {
                (
                    Malice::Drop,
                    Message::Envelopes {
                        req,
                        doc,
                        mut items,
                        more,
                    },
                ) => {
                    if !items.is_empty() {
                        items.remove(rng.below(items.len() as u64) as usize);
                    }
                    out.push(envelopes(conn, req, doc, items, more, push));
                }
                (
                    Malice::Reorder,
                    Message::Envelopes {
                        req,
                        doc,
                        mut items,
                        more,
                    },
                ) => {
                    items.reverse();
                    out.push(envelopes(conn, req, doc, items, more, push));
                }
                (Malice::Replay, msg @ Message::Envelopes { .. }) => {
                    let Message::Envelopes { doc, .. } = &msg else {
                        unreachable!("matched above")
                    };
                    let doc = *doc;
                    out.push(NetOut::Msg { conn, msg, push });
                    // The document's oldest envelopes once more, as pushes.
                    let (old, _) = self.read_any(&doc, 0, 2);
                    for it in old {
                        out.push(envelopes(conn, 0, doc, vec![it], false, true));
                    }
                }
                (
                    Malice::Truncate,
                    Message::Envelopes {
                        req,
                        doc,
                        mut items,
                        more,
                    },
                ) if req != 0 && items.len() >= 2 => {
                    // Leave out the oldest and hide the gap.
                    let cut = 1 + rng.below(items.len() as u64 - 1) as usize;
                    let prev = items[0].prev;
                    items.drain(..cut);
                    items[0].prev = prev;
                    out.push(envelopes(conn, req, doc, items, more, push));
                }
                (
                    Malice::WrongDoc,
                    Message::Envelopes {
                        req,
                        doc,
                        items,
                        more,
                    },
                ) => {
                    // Another document's envelopes, numbered as this one's would be.
                    let other = self.other_doc(&doc, rng);
                    let items = match other {
                        Some(other) => {
                            let (mut foreign, _) = self.read_any(&other, 0, items.len().max(1));
                            for (f, it) in foreign.iter_mut().zip(items.iter()) {
                                f.seq = it.seq;
                                f.prev = it.prev;
                            }
                            foreign.truncate(items.len());
                            foreign
                        }
                        None => items,
                    };
                    out.push(envelopes(conn, req, doc, items, more, push));
                }
                (Malice::ForgeLog, msg) => {
                    out.push(NetOut::Msg { conn, msg, push });
                    if let Some(forged) = self.forged_log_entry(conn) {
                        out.push(NetOut::Msg {
                            conn,
                            msg: forged,
                            push: true,
                        });
                    }
                }
                (_, msg) => out.push(NetOut::Msg { conn, msg, push }),
            }
        }
        out
    }

    /// A `LogEntries` push adding the relay's own device to the connection's account, signed
    /// by the relay's key (which is no device of the account).
    fn forged_log_entry(&self, conn: crate::relay::core::ConnId) -> Option<Message> {
        let account = self.account_of(conn)?;
        let entries: Vec<DeviceLogEntry> = self
            .stored_log(&account)?
            .iter()
            .filter_map(|e| DeviceLogEntry::decode(e).ok())
            .collect();
        let log = DeviceLog::verify(&account, entries).ok()?;
        let forged = log
            .add_device(&self.forger, self.forger.public(), "relay", "forged")
            .ok()?;
        Some(Message::LogEntries {
            req: 0,
            account,
            first_seq: log.len() as u32,
            entries: vec![forged],
        })
    }
}

fn envelopes(
    conn: crate::relay::core::ConnId,
    req: u32,
    doc: crate::ids::DocId,
    items: Vec<StoredEnvelope>,
    more: bool,
    push: bool,
) -> NetOut {
    NetOut::Msg {
        conn,
        msg: Message::Envelopes {
            req,
            doc,
            items,
            more,
        },
        push,
    }
}
