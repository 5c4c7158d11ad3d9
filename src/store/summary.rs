//! The stored form of a conversation summary: what the conversation list shows, kept current on
//! every write so the list opens without loading any conversation document.
//!
//! Layout (big-endian, inside a sealed blob):
//!
//! ```text
//! u8 version (1) | [16] conversation | u32 len, title | u32 member count | u8 flags
//! (1 member, 2 pinned, 4 muted, 8 archived, 16 has draft, 32 has last message)
//! [u32 len, draft] | u64 last activity | u64 unread
//! [last message: u64 hlc | [32] device | [32] author | u8 (1 has text, 2 edited, 4 recalled)
//!  | [u32 len, text] | u32 attachments]
//! ```

use crate::ids::{AccountId, ConversationId, DeviceId, MessageId};
use crate::model::hlc::Hlc;
use crate::model::limits::{MAX_DRAFT_BYTES, MAX_TITLE_BYTES};
use crate::model::{ConversationSummary, MessagePreview};
use crate::wire::codec::{CodecError, Reader, Writer};

const VERSION: u8 = 1;
/// Largest preview text: the preview keeps 120 characters of at most 4 bytes each.
const MAX_PREVIEW_BYTES: usize = 4 * crate::model::query::PREVIEW_CHARS;

/// Encodes a summary for the store.
pub fn encode(s: &ConversationSummary) -> Vec<u8> {
    let mut w = Writer::with_capacity(128);
    w.u8(VERSION)
        .put(s.id.as_bytes())
        .bytes_u32(s.title.as_bytes());
    w.u32(s.member_count as u32);
    let flags = u8::from(s.is_member)
        | u8::from(s.pinned) << 1
        | u8::from(s.muted) << 2
        | u8::from(s.archived) << 3
        | u8::from(s.draft.is_some()) << 4
        | u8::from(s.last_message.is_some()) << 5;
    w.u8(flags);
    if let Some(d) = &s.draft {
        w.bytes_u32(d.as_bytes());
    }
    w.u64(s.last_activity.as_u64()).u64(s.unread);
    if let Some(m) = &s.last_message {
        w.u64(m.id.hlc.as_u64())
            .put(m.id.device.as_bytes())
            .put(m.author.as_bytes());
        let mflags =
            u8::from(m.text.is_some()) | u8::from(m.edited) << 1 | u8::from(m.recalled) << 2;
        w.u8(mflags);
        if let Some(t) = &m.text {
            w.bytes_u32(t.as_bytes());
        }
        w.u32(m.attachments);
    }
    w.into_bytes()
}

/// Why stored summary bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SummaryError {
    /// A format version this code does not read.
    #[error("summary version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The bytes are malformed.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

fn text(r: &mut Reader<'_>, field: &'static str, max: usize) -> Result<String, CodecError> {
    let b = r.bytes_u32(field, max)?;
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::InvalidUtf8 { field })
}

/// Decodes [`encode`]'s output.
pub fn decode(bytes: &[u8]) -> Result<ConversationSummary, SummaryError> {
    let mut r = Reader::new(bytes);
    let v = r.u8()?;
    if v != VERSION {
        return Err(SummaryError::UnsupportedVersion(v));
    }
    let id = ConversationId::from_bytes(r.array()?);
    let title = text(&mut r, "title", MAX_TITLE_BYTES)?;
    let member_count = r.u32()? as usize;
    let flags = r.u8()?;
    let draft = if flags & 16 != 0 {
        Some(text(&mut r, "draft", MAX_DRAFT_BYTES)?)
    } else {
        None
    };
    let last_activity = Hlc::from_u64(r.u64()?);
    let unread = r.u64()?;
    let last_message = if flags & 32 != 0 {
        let hlc = Hlc::from_u64(r.u64()?);
        let device = DeviceId::from_bytes(r.array()?);
        let author = AccountId::from_bytes(r.array()?);
        let mflags = r.u8()?;
        let text = if mflags & 1 != 0 {
            Some(text(&mut r, "preview", MAX_PREVIEW_BYTES)?)
        } else {
            None
        };
        Some(MessagePreview {
            id: MessageId { hlc, device },
            author,
            text,
            attachments: r.u32()?,
            edited: mflags & 2 != 0,
            recalled: mflags & 4 != 0,
        })
    } else {
        None
    };
    r.finish()?;
    Ok(ConversationSummary {
        id,
        title,
        member_count,
        is_member: flags & 1 != 0,
        pinned: flags & 2 != 0,
        muted: flags & 4 != 0,
        archived: flags & 8 != 0,
        draft,
        last_message,
        last_activity,
        unread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn summary() -> impl Strategy<Value = ConversationSummary> {
        let preview = (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            proptest::option::of(".{0,20}"),
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(h, d, a, text, attachments, edited, recalled)| MessagePreview {
                    id: MessageId {
                        hlc: Hlc::from_u64(h),
                        device: DeviceId::from_bytes(d),
                    },
                    author: AccountId::from_bytes(a),
                    text,
                    attachments,
                    edited,
                    recalled,
                },
            );
        (
            any::<[u8; 16]>(),
            ".{0,30}",
            0usize..1000,
            any::<[bool; 4]>(),
            proptest::option::of(".{0,30}"),
            proptest::option::of(preview),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(id, title, member_count, f, draft, last_message, act, unread)| {
                    ConversationSummary {
                        id: ConversationId::from_bytes(id),
                        title,
                        member_count,
                        is_member: f[0],
                        pinned: f[1],
                        muted: f[2],
                        archived: f[3],
                        draft,
                        last_message,
                        last_activity: Hlc::from_u64(act),
                        unread,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(s in summary()) {
            prop_assert_eq!(decode(&encode(&s)).unwrap(), s);
        }

        #[test]
        fn truncated_or_mutated_never_panics(s in summary(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let bytes = encode(&s);
            let cut = cut % bytes.len();
            prop_assert!(decode(&bytes[..cut]).is_err());
            let mut m = bytes.clone();
            let i = flip.0 % m.len();
            m[i] ^= flip.1 | 1;
            let _ = decode(&m);
        }
    }
}
