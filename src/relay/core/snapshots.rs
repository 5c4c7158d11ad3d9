//! Snapshots: `PutSnapshot` keeps the latest snapshot of a document per account. Serving them
//! is part of a subscription's catch-up (see [`CatchUpItem`](super::CatchUpItem)).

use crate::crypto::envelope::{EnvelopeKind, SealedEnvelope};
use crate::ids::DocId;
use crate::relay::limits::MAX_SNAPSHOT_BYTES;
use crate::relay::store::NewSnapshot;
use crate::wire::message::Message;

use super::{ConnId, Output, PersistOp, RelayCore, RequestError};

impl RelayCore {
    /// `PutSnapshot`: the envelope is a snapshot by this connection's device, of a document of
    /// `group` (of which the account is a member), covering no more than the document's last
    /// envelope here, within the size limit. Stored for the account (replacing one that covers
    /// less), then answered `Done`.
    pub(super) fn handle_put_snapshot(
        &mut self,
        conn: ConnId,
        req: u32,
        group: DocId,
        envelope: SealedEnvelope,
        out: &mut Vec<Output>,
    ) -> Result<(), RequestError> {
        let header = envelope.header;
        let (device, account) = self.authenticated_author(conn, "PutSnapshot", header.author)?;
        if header.kind != EnvelopeKind::Snapshot {
            return Err(RequestError::NotASnapshot);
        }
        if header.first_seq != header.last_seq {
            return Err(RequestError::SnapshotRange {
                first: header.first_seq,
                last: header.last_seq,
            });
        }
        self.check_member(&group, &account)?;
        let doc = header.doc;
        let Some(state) = self.doc_group(&doc, &group)? else {
            return Err(RequestError::SnapshotOfUnknownDoc { doc });
        };
        let covers = header.first_seq;
        if covers > state.last_seq || covers == 0 {
            return Err(RequestError::SnapshotAhead {
                doc,
                covers,
                last_seq: state.last_seq,
            });
        }
        let bytes = envelope.encode();
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(RequestError::SnapshotTooLarge {
                len: bytes.len(),
                max: MAX_SNAPSHOT_BYTES,
            });
        }
        out.push(Output::Persist {
            op: PersistOp::PutSnapshot {
                snapshot: NewSnapshot {
                    doc,
                    account,
                    author: device,
                    covers,
                    bytes,
                },
            },
            then: vec![Output::Send {
                conn,
                msg: Message::Done { req },
            }],
        });
        Ok(())
    }
}
