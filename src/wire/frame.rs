//! Versioned, length-prefixed frames: the unit devices and relays exchange.
//!
//! Every frame starts with a six-byte header: format version (`u8`), frame type (`u8`) and payload
//! length (`u32`, big-endian). The types so far carry a sealed envelope, a device-log entry, an
//! error report and the two pairing messages. Each frame type has its own payload limit, checked as soon as the
//! header is in, so a peer cannot make the receiver buffer more than that type allows. Byte
//! layouts are in `docs/PROTOCOL.md`.
//!
//! Decoding is streaming: [`decode_frame`] returns `Ok(None)` while it needs more bytes, and
//! [`FrameDecoder`] buffers a byte stream. Nothing here panics on any input.
//!
//! ```
//! use roamsync::wire::frame::{ErrorCode, Frame, FrameDecoder};
//!
//! let bytes = Frame::Error { code: ErrorCode::RATE_LIMITED, message: "slow down".into() }.encode();
//! let mut decoder = FrameDecoder::default();
//! decoder.push(&bytes[..3]).unwrap();
//! assert_eq!(decoder.poll_frame().unwrap(), None);
//! decoder.push(&bytes[3..]).unwrap();
//! assert!(matches!(decoder.poll_frame().unwrap(), Some(Frame::Error { .. })));
//! ```

use std::fmt;

use crate::crypto::device_log::{DeviceLogEntry, DeviceLogError, MAX_ENTRY_BYTES};
use crate::crypto::envelope::{EnvelopeError, MAX_ENVELOPE_BYTES, SealedEnvelope};
use crate::crypto::pairing::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, PairRequest, PairResponse, PairingError,
};
use crate::ids::AccountId;
use crate::wire::codec::{CodecError, Reader, Writer};
use crate::wire::message::{MAX_MESSAGE_BYTES, Message, MessageError};

/// Current frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 1 + 1 + 4;
/// Longest message of an error frame, in bytes of UTF-8.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Largest payload of an envelope frame.
pub const MAX_ENVELOPE_FRAME_PAYLOAD: usize = MAX_ENVELOPE_BYTES;
/// Largest payload of a device-log-entry frame.
pub const MAX_LOG_ENTRY_FRAME_PAYLOAD: usize = AccountId::LEN + MAX_ENTRY_BYTES;
/// Largest payload of an error frame.
pub const MAX_ERROR_FRAME_PAYLOAD: usize = 2 + 2 + MAX_ERROR_MESSAGE_BYTES;
/// Largest payload of a pairing-request frame.
pub const MAX_PAIR_REQUEST_FRAME_PAYLOAD: usize = MAX_REQUEST_BYTES;
/// Largest payload of a pairing-response frame.
pub const MAX_PAIR_RESPONSE_FRAME_PAYLOAD: usize = MAX_RESPONSE_BYTES;
/// Largest payload of a protocol-message frame.
pub const MAX_MESSAGE_FRAME_PAYLOAD: usize = MAX_MESSAGE_BYTES;
/// Largest frame of any type, header included.
pub const MAX_FRAME_BYTES: usize = FRAME_HEADER_LEN
    + max(
        max(
            MAX_MESSAGE_FRAME_PAYLOAD,
            max(MAX_ENVELOPE_FRAME_PAYLOAD, MAX_LOG_ENTRY_FRAME_PAYLOAD),
        ),
        max(
            MAX_ERROR_FRAME_PAYLOAD,
            max(
                MAX_PAIR_REQUEST_FRAME_PAYLOAD,
                MAX_PAIR_RESPONSE_FRAME_PAYLOAD,
            ),
        ),
    );

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

// Every length fits the header's u32 length field.
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);

/// Errors of frame decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame's format version is not supported.
    #[error("unsupported frame version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The frame type is unknown.
    #[error("unknown frame type {frame_type:#04x}")]
    UnknownType {
        /// The type byte found.
        frame_type: u8,
    },
    /// The claimed payload is larger than its type allows.
    #[error("frame payload of {len} bytes, at most {max} allowed")]
    FrameTooLarge {
        /// The claimed length.
        len: usize,
        /// The limit for the frame type.
        max: usize,
    },
    /// A payload ended before one of its fields did.
    #[error("frame payload truncated: needed {need} more bytes, {have} left")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A payload field is malformed.
    #[error("frame payload: {0}")]
    Payload(CodecError),
    /// An envelope frame's payload is not an envelope.
    #[error("envelope frame: {0}")]
    Envelope(#[from] EnvelopeError),
    /// A device-log frame's payload is not an entry.
    #[error("device log frame: {0}")]
    DeviceLog(#[from] DeviceLogError),
    /// A pairing frame's payload is not a pairing message.
    #[error("pairing frame: {0}")]
    Pairing(#[from] PairingError),
    /// A message frame's payload is not a protocol message.
    #[error("message frame: {0}")]
    Message(#[from] MessageError),
    /// The stream buffer would exceed its limit.
    #[error("receive buffer would hold {len} bytes, at most {max} allowed")]
    BufferFull {
        /// Bytes the buffer would hold.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl From<CodecError> for WireError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Truncated { need, have } => WireError::Truncated { need, have },
            other => WireError::Payload(other),
        }
    }
}

/// An error code carried by an error frame. Unknown codes are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The peer sent something this side could not decode.
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// A frame or request exceeded a limit.
    pub const TOO_LARGE: ErrorCode = ErrorCode(2);
    /// The device is not allowed to do this.
    pub const UNAUTHORISED: ErrorCode = ErrorCode(3);
    /// Too many requests; retry later.
    pub const RATE_LIMITED: ErrorCode = ErrorCode(4);
    /// The account's storage quota is used up.
    pub const QUOTA_EXCEEDED: ErrorCode = ErrorCode(5);
    /// The device log or an envelope was rejected.
    pub const REJECTED: ErrorCode = ErrorCode(6);
    /// Something failed on the sender's side.
    pub const INTERNAL: ErrorCode = ErrorCode(7);
    /// The connection fell behind its pushes and was closed; reconnect and catch up from the
    /// cursors.
    pub const LAGGED: ErrorCode = ErrorCode(8);
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            ErrorCode::MALFORMED => "MALFORMED",
            ErrorCode::TOO_LARGE => "TOO_LARGE",
            ErrorCode::UNAUTHORISED => "UNAUTHORISED",
            ErrorCode::RATE_LIMITED => "RATE_LIMITED",
            ErrorCode::QUOTA_EXCEEDED => "QUOTA_EXCEEDED",
            ErrorCode::REJECTED => "REJECTED",
            ErrorCode::INTERNAL => "INTERNAL",
            ErrorCode::LAGGED => "LAGGED",
            ErrorCode(n) => return write!(f, "ErrorCode({n})"),
        };
        f.write_str(name)
    }
}

/// The frame type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameType {
    /// A sealed envelope.
    Envelope = 0x01,
    /// One device-log entry of an account.
    DeviceLogEntry = 0x02,
    /// An error report.
    Error = 0x03,
    /// A new device's pairing request.
    PairRequest = 0x04,
    /// A current device's pairing response.
    PairResponse = 0x05,
    /// A protocol message (see [`crate::wire::message`]).
    Message = 0x06,
}

impl FrameType {
    /// Parses a type byte.
    pub fn from_byte(b: u8) -> Result<Self, WireError> {
        match b {
            0x01 => Ok(FrameType::Envelope),
            0x02 => Ok(FrameType::DeviceLogEntry),
            0x03 => Ok(FrameType::Error),
            0x04 => Ok(FrameType::PairRequest),
            0x05 => Ok(FrameType::PairResponse),
            0x06 => Ok(FrameType::Message),
            frame_type => Err(WireError::UnknownType { frame_type }),
        }
    }

    /// The largest payload this type allows.
    pub fn max_payload(self) -> usize {
        match self {
            FrameType::Envelope => MAX_ENVELOPE_FRAME_PAYLOAD,
            FrameType::DeviceLogEntry => MAX_LOG_ENTRY_FRAME_PAYLOAD,
            FrameType::Error => MAX_ERROR_FRAME_PAYLOAD,
            FrameType::PairRequest => MAX_PAIR_REQUEST_FRAME_PAYLOAD,
            FrameType::PairResponse => MAX_PAIR_RESPONSE_FRAME_PAYLOAD,
            FrameType::Message => MAX_MESSAGE_FRAME_PAYLOAD,
        }
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// A sealed envelope (decoded, not yet opened).
    Envelope(SealedEnvelope),
    /// A device-log entry for an account (decoded, not yet verified against the log).
    DeviceLogEntry {
        /// The account whose log the entry extends.
        account: AccountId,
        /// The entry.
        entry: DeviceLogEntry,
    },
    /// An error report.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail, at most [`MAX_ERROR_MESSAGE_BYTES`].
        message: String,
    },
    /// A pairing request (MAC not yet checked).
    PairRequest(PairRequest),
    /// A pairing response (MAC and log not yet checked).
    PairResponse(PairResponse),
    /// A protocol message.
    Message(Message),
}

impl Frame {
    /// This frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Envelope(_) => FrameType::Envelope,
            Frame::DeviceLogEntry { .. } => FrameType::DeviceLogEntry,
            Frame::Error { .. } => FrameType::Error,
            Frame::PairRequest(_) => FrameType::PairRequest,
            Frame::PairResponse(_) => FrameType::PairResponse,
            Frame::Message(_) => FrameType::Message,
        }
    }

    /// Encodes header and payload. An error message longer than the limit is cut at a character
    /// boundary so the frame always decodes.
    pub fn encode(&self) -> Vec<u8> {
        let payload = match self {
            Frame::Envelope(env) => env.encode(),
            Frame::DeviceLogEntry { account, entry } => {
                let mut w = Writer::default();
                w.put(account.as_bytes()).put(&entry.encode());
                w.into_bytes()
            }
            Frame::Error { code, message } => {
                let mut end = message.len().min(MAX_ERROR_MESSAGE_BYTES);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let mut w = Writer::default();
                // `end <= MAX_ERROR_MESSAGE_BYTES`, which fits in a u16.
                w.u16(code.0)
                    .u16(end as u16)
                    .put(&message.as_bytes()[..end]);
                w.into_bytes()
            }
            Frame::PairRequest(req) => req.encode(),
            Frame::PairResponse(resp) => resp.encode(),
            Frame::Message(msg) => msg.encode(),
        };
        let mut w = Writer::with_capacity(FRAME_HEADER_LEN + payload.len());
        // Payloads are bounded by their type's limit, far below u32::MAX.
        w.u8(FRAME_VERSION)
            .u8(self.frame_type() as u8)
            .bytes_u32(&payload);
        w.into_bytes()
    }

    fn decode_payload(frame_type: FrameType, payload: &[u8]) -> Result<Self, WireError> {
        match frame_type {
            FrameType::Envelope => Ok(Frame::Envelope(SealedEnvelope::decode(payload)?)),
            FrameType::DeviceLogEntry => {
                let mut r = Reader::new(payload);
                let account = AccountId::from_bytes(r.array()?);
                let entry = DeviceLogEntry::decode(r.take(r.remaining())?)?;
                Ok(Frame::DeviceLogEntry { account, entry })
            }
            FrameType::Error => {
                let mut r = Reader::new(payload);
                let code = ErrorCode(r.u16()?);
                let len = usize::from(r.u16()?);
                if len > MAX_ERROR_MESSAGE_BYTES {
                    return Err(CodecError::TooLong {
                        field: "message",
                        len,
                        max: MAX_ERROR_MESSAGE_BYTES,
                    }
                    .into());
                }
                let message = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| CodecError::InvalidUtf8 { field: "message" })?
                    .to_owned();
                r.finish()?;
                Ok(Frame::Error { code, message })
            }
            FrameType::PairRequest => Ok(Frame::PairRequest(PairRequest::decode(payload)?)),
            FrameType::PairResponse => Ok(Frame::PairResponse(PairResponse::decode(payload)?)),
            FrameType::Message => Ok(Frame::Message(Message::decode(payload)?)),
        }
    }
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` if `buf` holds only part of a frame, or `Ok(Some((frame, consumed)))`.
/// Version, type and length are checked as soon as their bytes are present.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != FRAME_VERSION {
        return Err(WireError::UnsupportedVersion { version });
    }
    let Some(&type_byte) = buf.get(1) else {
        return Ok(None);
    };
    let frame_type = FrameType::from_byte(type_byte)?;
    let Some(len_bytes) = buf.get(2..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let mut r = Reader::new(len_bytes);
    let len = r.u32()? as usize;
    let max = frame_type.max_payload();
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    let Some(payload) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = Frame::decode_payload(frame_type, payload)?;
    Ok(Some((frame, FRAME_HEADER_LEN + len)))
}

/// Buffers a byte stream and cuts it into frames.
///
/// After an error the stream has lost its framing; the caller should send an error frame and
/// close the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already returned as frames. They are dropped lazily, once they make up half
    /// the buffer, so that cutting many small frames out of a large buffer stays linear.
    start: usize,
}

impl FrameDecoder {
    /// Most bytes the decoder will buffer: one largest frame.
    pub const MAX_BUFFERED_BYTES: usize = MAX_FRAME_BYTES;

    /// Adds received bytes. Fails if the buffer would exceed [`Self::MAX_BUFFERED_BYTES`]; poll
    /// frames out before pushing more.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let len = self.buffered().saturating_add(bytes.len());
        if len > Self::MAX_BUFFERED_BYTES {
            return Err(WireError::BufferFull {
                len,
                max: Self::MAX_BUFFERED_BYTES,
            });
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete frame, if one is buffered.
    pub fn poll_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match decode_frame(&self.buf[self.start..])? {
            None => Ok(None),
            Some((frame, consumed)) => {
                self.start += consumed;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests;
