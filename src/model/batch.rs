//! Change batches: the opaque unit of sync between replicas.
//!
//! A batch carries Automerge changes of one document. Encoded, it is the plaintext that the
//! envelope layer seals; the relay never sees it.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! u8   format version (1)
//! u8   document kind: 0 account, 1 meta, 2 segment
//! [32] account id            (kind 0)
//! [16] conversation id       (kinds 1, 2)
//! u32  segment number        (kind 2)
//! u32  number of changes n
//! n × (u32 length, bytes)    Automerge change chunks
//! ```

use automerge::Change;

use crate::ids::{DocAddr, DocAddrError};
use crate::model::doc::device_of;
use crate::model::limits::{MAX_BATCH_BYTES, MAX_BATCH_CHANGES};
use crate::wire::codec::{CodecError, Reader};

/// The batch format this code writes and reads.
pub const BATCH_VERSION: u8 = 1;

/// Changes of one document, ready to send or to apply.
#[derive(Clone, Debug)]
pub struct ChangeBatch {
    /// The document the changes belong to.
    pub addr: DocAddr,
    /// Automerge changes, each checked (checksum, 32-byte device actor) when decoded.
    pub changes: Vec<Change>,
}

/// Why bytes are not a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The input ended early.
    #[error("batch truncated: need {need} more bytes at offset {offset}")]
    Truncated {
        /// Where the read started.
        offset: usize,
        /// Bytes missing.
        need: usize,
    },
    /// The batch is larger than allowed.
    #[error("batch is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too many changes.
    #[error("batch claims {count} changes, the limit is {max}")]
    TooManyChanges {
        /// The claimed count.
        count: u64,
        /// The limit.
        max: usize,
    },
    /// A format version this code does not read.
    #[error("batch format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// An unknown document kind.
    #[error("unknown document kind {0}")]
    UnknownDocKind(u8),
    /// A change chunk Automerge cannot parse.
    #[error("change {index} is not a valid Automerge change: {reason}")]
    BadChange {
        /// Its position in the batch.
        index: usize,
        /// Automerge's reason.
        reason: String,
    },
    /// A change whose actor is not a device.
    #[error("change {index} has a {len}-byte actor, a device actor is 32")]
    BadActor {
        /// Its position in the batch.
        index: usize,
        /// The actor's length.
        len: usize,
    },
    /// A field the shared codec refused.
    #[error(transparent)]
    Codec(CodecError),
    /// Bytes left after the last change.
    #[error("{0} bytes after the end of the batch")]
    TrailingBytes(usize),
}

impl ChangeBatch {
    /// Encodes the batch; the length of the result is [`ChangeBatch::encoded_len`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(BATCH_VERSION);
        self.addr.encode_into(&mut out);
        out.extend_from_slice(&(self.changes.len() as u32).to_be_bytes());
        for change in &self.changes {
            let raw = change.raw_bytes();
            out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
            out.extend_from_slice(raw);
        }
        out
    }

    /// The exact length of [`ChangeBatch::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.header_len()
            + self
                .changes
                .iter()
                .map(|c| 4 + c.raw_bytes().len())
                .sum::<usize>()
    }

    /// Bytes before the first change: version, kind, address and change count.
    fn header_len(&self) -> usize {
        1 + self.addr.encoded_len() + 4
    }

    /// Splits the batch, keeping the order of its changes, into batches that each stay within
    /// what [`ChangeBatch::decode`] accepts ([`MAX_BATCH_CHANGES`] changes, [`MAX_BATCH_BYTES`]
    /// bytes). What a document lacks can exceed those limits (a few hundred messages of the
    /// largest body already do), so a sender splits before it encodes; the receiver keeps changes
    /// whose dependencies come in a later batch until they arrive.
    ///
    /// A batch without changes splits into none. A single change too large for any batch (local
    /// changes never come close) ends up alone in a batch that the decoder refuses.
    pub fn split(self) -> Vec<ChangeBatch> {
        let header = self.header_len();
        let mut out = Vec::new();
        let mut part: Vec<Change> = Vec::new();
        let mut len = header;
        for change in self.changes {
            let size = 4 + change.raw_bytes().len();
            if !part.is_empty() && (len + size > MAX_BATCH_BYTES || part.len() == MAX_BATCH_CHANGES)
            {
                out.push(ChangeBatch {
                    addr: self.addr,
                    changes: std::mem::take(&mut part),
                });
                len = header;
            }
            len += size;
            part.push(change);
        }
        if !part.is_empty() {
            out.push(ChangeBatch {
                addr: self.addr,
                changes: part,
            });
        }
        out
    }

    /// Decodes and checks a batch. Never panics; every defect is a [`BatchError`].
    pub fn decode(bytes: &[u8]) -> Result<ChangeBatch, BatchError> {
        if bytes.len() > MAX_BATCH_BYTES {
            return Err(BatchError::TooLarge {
                len: bytes.len(),
                max: MAX_BATCH_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        let version = r.u8().map_err(|e| truncated(&r, e))?;
        if version != BATCH_VERSION {
            return Err(BatchError::UnsupportedVersion(version));
        }
        let (addr, used) = DocAddr::decode_prefix(&bytes[r.position()..]).map_err(|e| match e {
            DocAddrError::UnknownKind(k) => BatchError::UnknownDocKind(k),
            _ => BatchError::Truncated {
                offset: r.position(),
                need: 1,
            },
        })?;
        r.take(used).map_err(|e| truncated(&r, e))?;
        let count = r.u32().map_err(|e| truncated(&r, e))? as usize;
        if count > MAX_BATCH_CHANGES {
            return Err(BatchError::TooManyChanges {
                count: count as u64,
                max: MAX_BATCH_CHANGES,
            });
        }
        // Each change needs at least its 4-byte length: a count the input cannot hold is a
        // truncation, found before anything is allocated for it.
        if count.saturating_mul(4) > r.remaining() {
            return Err(BatchError::Truncated {
                offset: r.position(),
                need: count * 4 - r.remaining(),
            });
        }
        let mut changes = Vec::with_capacity(count);
        for index in 0..count {
            let len = r.u32().map_err(|e| truncated(&r, e))? as usize;
            let raw = r.take(len).map_err(|e| truncated(&r, e))?;
            let change = Change::from_bytes(raw.to_vec()).map_err(|e| BatchError::BadChange {
                index,
                reason: e.to_string(),
            })?;
            if device_of(change.actor_id()).is_err() {
                return Err(BatchError::BadActor {
                    index,
                    len: change.actor_id().to_bytes().len(),
                });
            }
            changes.push(change);
        }
        if r.remaining() > 0 {
            return Err(BatchError::TrailingBytes(r.remaining()));
        }
        Ok(ChangeBatch { addr, changes })
    }
}

/// A truncation as the batch reports it: where the read started and how many bytes are missing.
fn truncated(r: &Reader<'_>, e: CodecError) -> BatchError {
    match e {
        CodecError::Truncated { need, have } => BatchError::Truncated {
            offset: r.position(),
            need: need - have,
        },
        other => BatchError::Codec(other),
    }
}
