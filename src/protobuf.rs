//! A small hand-written protobuf encoder and decoder.
//!
//! Codex writes its manifest and proofs by hand, field by field, with every listed scalar
//! present (zeros included). Writing them the same way here keeps manifest CIDs identical,
//! which a generated encoder (that skips default values) would not.

use crate::error::{Error, Result};

pub const WIRE_VARINT: u8 = 0;
pub const WIRE_FIXED64: u8 = 1;
pub const WIRE_LEN: u8 = 2;
pub const WIRE_FIXED32: u8 = 5;

/// Appends fields to a byte buffer.
#[derive(Default, Debug, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn varint_field(&mut self, field: u32, value: u64) -> &mut Self {
        self.tag(field, WIRE_VARINT);
        put_varint(&mut self.buf, value);
        self
    }

    pub fn bool_field(&mut self, field: u32, value: bool) -> &mut Self {
        self.varint_field(field, value as u64)
    }

    pub fn bytes_field(&mut self, field: u32, value: &[u8]) -> &mut Self {
        put_len_header(&mut self.buf, field, value.len());
        self.buf.extend_from_slice(value);
        self
    }

    pub fn message_field(&mut self, field: u32, message: &Writer) -> &mut Self {
        self.bytes_field(field, &message.buf)
    }

    fn tag(&mut self, field: u32, wire: u8) {
        put_varint(&mut self.buf, ((field as u64) << 3) | wire as u64);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
}

/// Bytes a varint takes.
pub fn varint_len(value: u64) -> usize {
    (64 - value.max(1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes a length-delimited field with a `payload`-byte value takes.
pub fn len_field_size(field: u32, payload: usize) -> usize {
    varint_len(((field as u64) << 3) | WIRE_LEN as u64) + varint_len(payload as u64) + payload
}

/// Appends the tag and length of a length-delimited field; its value follows.
pub fn put_len_header(buf: &mut Vec<u8>, field: u32, payload: usize) {
    put_varint(buf, ((field as u64) << 3) | WIRE_LEN as u64);
    put_varint(buf, payload as u64);
}

pub fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Reads an unsigned LEB128 varint from the front of `bytes`, returning it and its length.
pub fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let part = (b & 0x7f) as u64;
        if i == 9 && part > 1 {
            return None; // overflows 64 bits
        }
        value |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// One decoded field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed64(u64),
    Fixed32(u32),
}

/// Iterates over the fields of one message; a truncated or malformed field ends the
/// iteration with an error.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the message in errors ("manifest", "proof", …).
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { rest: bytes, what }
    }

    fn err(&self, reason: &str) -> Error {
        Error::malformed(self.what, reason)
    }

    fn varint(&mut self) -> Result<u64> {
        let (v, n) = get_varint(self.rest).ok_or_else(|| self.err("bad varint"))?;
        self.rest = &self.rest[n..];
        Ok(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(self.err("truncated field"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || field > u32::MAX as u64 >> 3 {
            return Err(self.err("bad field number"));
        }
        let value = match (key & 7) as u8 {
            WIRE_VARINT => Value::Varint(self.varint()?),
            WIRE_FIXED64 => {
                let b = self.take(8)?;
                Value::Fixed64(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            WIRE_LEN => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| self.err("length too large"))?;
                Value::Bytes(self.take(len)?)
            }
            WIRE_FIXED32 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            other => return Err(self.err(&format!("unsupported wire type {other}"))),
        };
        Ok(Some((field as u32, value)))
    }
}

impl<'a> Value<'a> {
    pub fn as_u64(&self, what: &'static str, field: &str) -> Result<u64> {
        match *self {
            Value::Varint(v) => Ok(v),
            _ => Err(Error::malformed(
                what,
                format!("field {field} is not a varint"),
            )),
        }
    }

    pub fn as_bytes(&self, what: &'static str, field: &str) -> Result<&'a [u8]> {
        match *self {
            Value::Bytes(b) => Ok(b),
            _ => Err(Error::malformed(
                what,
                format!("field {field} is not length-delimited"),
            )),
        }
    }

    pub fn as_str(&self, what: &'static str, field: &str) -> Result<&'a str> {
        std::str::from_utf8(self.as_bytes(what, field)?)
            .map_err(|_| Error::malformed(what, format!("field {field} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 0xCD01, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(get_varint(&b), Some((v, b.len())));
        }
        assert_eq!(get_varint(&[0x80]), None);
        assert_eq!(get_varint(&[0xff; 11]), None);
    }

    #[test]
    fn fields_round_trip_and_truncation_fails() {
        let mut w = Writer::new();
        w.varint_field(1, 5)
            .bytes_field(2, b"abc")
            .bool_field(3, true);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes, "test");
        assert_eq!(r.next_field().unwrap(), Some((1, Value::Varint(5))));
        assert_eq!(r.next_field().unwrap(), Some((2, Value::Bytes(b"abc"))));
        assert_eq!(r.next_field().unwrap(), Some((3, Value::Varint(1))));
        assert_eq!(r.next_field().unwrap(), None);
        let mut r = Reader::new(&bytes[..bytes.len() - 3], "test");
        r.next_field().unwrap();
        assert!(r.next_field().is_err());
    }
}
