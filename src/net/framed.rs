//! Frames over QUIC streams.
//!
//! [`FramedSend`] writes encoded frames; [`FramedRecv`] reads up to [`READ_CHUNK_BYTES`] at a
//! time into one reused buffer and cuts as many frames out of it as it holds, so a burst of
//! small frames costs one stream read, not one per frame. A frame's header is checked as soon
//! as its six bytes arrive: a length above the type's limit fails before any payload is
//! buffered, and the decoder never holds more than one largest frame.

use quinn::{RecvStream, SendStream};

use crate::net::NetError;
use crate::wire::frame::{Frame, FrameDecoder};

/// Most bytes one stream read asks for.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Writes frames to a QUIC send stream.
#[derive(Debug)]
pub struct FramedSend {
    stream: SendStream,
}

impl FramedSend {
    /// Wraps a send stream.
    pub fn new(stream: SendStream) -> FramedSend {
        FramedSend { stream }
    }

    /// Encodes and writes one frame; returns once QUIC has buffered it (flow control permitting).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.send_encoded(&frame.encode()).await
    }

    /// Writes bytes that are already encoded frames (one or several back to back), e.g. frames
    /// read from storage or encoded once for several peers. The caller vouches for them.
    pub async fn send_encoded(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        Ok(self.stream.write_all(bytes).await?)
    }

    /// Ends the stream after the frames written; the peer's [`FramedRecv::recv`] then returns
    /// `Ok(None)`.
    pub fn finish(&mut self) -> Result<(), NetError> {
        Ok(self.stream.finish()?)
    }

    /// The underlying stream.
    pub fn into_inner(self) -> SendStream {
        self.stream
    }
}

/// Reads frames from a QUIC receive stream.
pub struct FramedRecv {
    stream: RecvStream,
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
    /// Bytes read from the stream so far.
    received_bytes: u64,
}

impl std::fmt::Debug for FramedRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramedRecv")
            .field("stream", &self.stream)
            .field("buffered", &self.decoder.buffered())
            .field("received_bytes", &self.received_bytes)
            .finish()
    }
}

impl FramedRecv {
    /// Wraps a receive stream.
    pub fn new(stream: RecvStream) -> FramedRecv {
        FramedRecv {
            stream,
            decoder: FrameDecoder::default(),
            chunk: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            received_bytes: 0,
        }
    }

    /// Bytes read from the stream so far: the frames returned, and at most one partial frame
    /// behind them.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// The next frame; `Ok(None)` when the peer finished the stream between frames.
    ///
    /// After an error the stream has lost its framing: stop reading it.
    pub async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        loop {
            if let Some(frame) = self.decoder.poll_frame()? {
                return Ok(Some(frame));
            }
            // Never read past what the decoder may hold: it holds at most a partial frame here,
            // so there is always room for the rest of it.
            let room = FrameDecoder::MAX_BUFFERED_BYTES.saturating_sub(self.decoder.buffered());
            let want = READ_CHUNK_BYTES.min(room).max(1);
            match self.stream.read(&mut self.chunk[..want]).await? {
                Some(n) => {
                    self.decoder.push(&self.chunk[..n])?;
                    self.received_bytes += n as u64;
                }
                None => {
                    let buffered = self.decoder.buffered();
                    return if buffered == 0 {
                        Ok(None)
                    } else {
                        Err(NetError::TruncatedFrame { buffered })
                    };
                }
            }
        }
    }

    /// The underlying stream; bytes already read but not yet returned as frames are lost.
    pub fn into_inner(self) -> RecvStream {
        self.stream
    }
}
