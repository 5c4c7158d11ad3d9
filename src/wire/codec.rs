//! A small, length-checked byte codec shared by every binary format in the crate.
//!
//! Integers are big-endian. Variable-length fields carry a length prefix and a per-field maximum
//! that is checked *before* anything is allocated, so a hostile length can never make a decoder
//! reserve more memory than the input it was given.

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input ended before a field did.
    #[error("input truncated: needed {need} more bytes, {have} left")]
    Truncated {
        /// Bytes the field needs.
        need: usize,
        /// Bytes that were left.
        have: usize,
    },
    /// A length prefix is larger than the field allows.
    #[error("field `{field}` is {len} bytes, at most {max} allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes remain after the last field.
    #[error("{extra} trailing bytes after the last field")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// A flag byte is neither 0 nor 1.
    #[error("field `{field}` is a flag but holds {value}, not 0 or 1")]
    InvalidFlag {
        /// Which field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A text field is not UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// Which field.
        field: &'static str,
    },
}

/// Reads fields from a byte slice, front to back, never panicking.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let have = self.remaining();
        if n > have {
            return Err(CodecError::Truncated { need: n, have });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    /// A flag: one byte, 0 or 1 (any other value is refused, so each flag has one encoding).
    pub fn flag(&mut self, field: &'static str) -> Result<bool, CodecError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(CodecError::InvalidFlag { field, value }),
        }
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Bytes prefixed by a `u32` length of at most `max`.
    pub fn bytes_u32(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], CodecError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(CodecError::TooLong { field, len, max });
        }
        self.take(len)
    }

    /// UTF-8 text prefixed by a `u8` length of at most `max`.
    pub fn str_u8(&mut self, field: &'static str, max: usize) -> Result<&'a str, CodecError> {
        let len = usize::from(self.u8()?);
        if len > max {
            return Err(CodecError::TooLong { field, len, max });
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| CodecError::InvalidUtf8 { field })
    }

    /// Fails unless every byte has been read.
    pub fn finish(self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(CodecError::TrailingBytes { extra }),
        }
    }
}

/// Appends fields to a byte vector; the mirror image of [`Reader`].
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
        }
    }

    /// Appends raw bytes.
    pub fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v])
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes())
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_be_bytes())
    }

    /// Appends bytes with a `u32` length prefix. Callers check their own limits first; a slice
    /// longer than `u32::MAX` cannot be represented and is a caller bug.
    pub fn bytes_u32(&mut self, bytes: &[u8]) -> &mut Self {
        // Every caller bounds `bytes` by a limit far below 4 GiB before encoding.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.u32(len).put(bytes)
    }

    /// Appends text with a `u8` length prefix. Callers bound the text to at most 255 bytes.
    pub fn str_u8(&mut self, s: &str) -> &mut Self {
        let len = u8::try_from(s.len()).unwrap_or(u8::MAX);
        self.u8(len).put(&s.as_bytes()[..usize::from(len)])
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fields_round_trip(
            a: u8, b: u16, c: u32, d: u64,
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            text in "\\PC{0,20}",
        ) {
            prop_assume!(text.len() <= 255);
            let mut w = Writer::default();
            w.u8(a).u16(b).u32(c).u64(d).bytes_u32(&bytes).str_u8(&text);
            let out = w.into_bytes();
            // Claimed lengths are the real ones.
            prop_assert_eq!(out.len(), 1 + 2 + 4 + 8 + 4 + bytes.len() + 1 + text.len());
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.u8(), Ok(a));
            prop_assert_eq!(r.u16(), Ok(b));
            prop_assert_eq!(r.u32(), Ok(c));
            prop_assert_eq!(r.u64(), Ok(d));
            prop_assert_eq!(r.bytes_u32("b", 64), Ok(&bytes[..]));
            prop_assert_eq!(r.str_u8("t", 255), Ok(text.as_str()));
            prop_assert_eq!(r.finish(), Ok(()));
        }

        #[test]
        fn truncation_is_an_error(data in proptest::collection::vec(any::<u8>(), 0..64), cut: usize) {
            let cut = cut % (data.len() + 1);
            let mut w = Writer::default();
            w.bytes_u32(&data);
            let out = w.into_bytes();
            let mut r = Reader::new(&out[..cut.min(out.len().saturating_sub(1))]);
            prop_assert!(r.bytes_u32("d", 64).is_err());
        }
    }

    #[test]
    fn flags_have_one_encoding() {
        let mut r = Reader::new(&[0, 1, 2, 0xff]);
        assert_eq!(r.flag("a"), Ok(false));
        assert_eq!(r.flag("b"), Ok(true));
        assert_eq!(
            r.flag("c"),
            Err(CodecError::InvalidFlag {
                field: "c",
                value: 2
            })
        );
        assert_eq!(
            r.flag("d"),
            Err(CodecError::InvalidFlag {
                field: "d",
                value: 0xff
            })
        );
        assert_eq!(
            Reader::new(&[]).flag("e"),
            Err(CodecError::Truncated { need: 1, have: 0 })
        );
    }

    #[test]
    fn reader_errors() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1]);
        assert_eq!(
            r.clone().bytes_u32("f", 4),
            Err(CodecError::TooLong {
                field: "f",
                len: 9,
                max: 4
            })
        );
        assert_eq!(
            r.bytes_u32("f", 100),
            Err(CodecError::Truncated { need: 9, have: 1 })
        );
        let mut r = Reader::new(&[2, 0xff, 0xfe, 7]);
        assert_eq!(
            r.str_u8("name", 10),
            Err(CodecError::InvalidUtf8 { field: "name" })
        );
        assert_eq!(r.finish(), Err(CodecError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn writer_round_trips() {
        let mut w = Writer::default();
        w.u8(1).u16(2).u32(3).u64(4).bytes_u32(b"abc").str_u8("hé");
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.u64(), Ok(4));
        assert_eq!(r.bytes_u32("b", 3), Ok(&b"abc"[..]));
        assert_eq!(r.str_u8("s", 3), Ok("hé"));
        assert_eq!(r.finish(), Ok(()));
    }
}
