//! Every limit of the data model, in one place.

/// Default number of messages after which a device starts a new segment.
///
/// Applying 100 remote changes to an Automerge document of 2 k messages takes about 2 ms here, and
/// a full scan of its keys about 0.3 ms (see `docs/PERFORMANCE.md`), so a segment of this size keeps
/// every per-message operation well inside its budget while a conversation of 1 M messages needs
/// only about 500 segments.
pub const DEFAULT_SEGMENT_CAP: usize = 2_048;
/// Smallest allowed segment cap.
pub const MIN_SEGMENT_CAP: usize = 2;
/// Largest allowed segment cap.
pub const MAX_SEGMENT_CAP: usize = 100_000;
/// Largest message body, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest number of attachments on one message.
pub const MAX_ATTACHMENTS: usize = 32;
/// Largest attachment file name, in bytes.
pub const MAX_ATTACHMENT_NAME_BYTES: usize = 255;
/// Largest attachment MIME type, in bytes.
pub const MAX_MIME_BYTES: usize = 127;
/// Largest reaction, in bytes (one emoji, possibly a long ZWJ sequence).
pub const MAX_REACTION_BYTES: usize = 64;
/// Largest conversation title, in bytes.
pub const MAX_TITLE_BYTES: usize = 512;
/// Largest draft, in bytes.
pub const MAX_DRAFT_BYTES: usize = MAX_BODY_BYTES;
/// Largest setting name and value, in bytes.
pub const MAX_SETTING_BYTES: usize = 1024;
/// Largest number of member accounts in one conversation.
pub const MAX_MEMBERS: usize = 10_000;
/// Largest history page.
pub const MAX_PAGE: usize = 1_000;
/// Remote changes that may wait for dependencies, per document.
pub const MAX_PENDING_CHANGES: usize = 100_000;
/// Changes in one encoded batch.
pub const MAX_BATCH_CHANGES: usize = 100_000;
/// Bytes of one encoded batch.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
