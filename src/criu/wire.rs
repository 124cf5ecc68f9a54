//! A minimal protobuf wire-format decoder: just what CRIU's image entries need.
//!
//! The wire format (protobuf's "Encoding" documentation): a message is a sequence of fields,
//! each a varint key `(field_number << 3) | wire_type` followed by a value of that wire type:
//! 0 varint, 1 64-bit little endian, 2 length-delimited (varint length, then bytes), 5 32-bit
//! little endian. Types 3 and 4 (groups) are deprecated and never used by CRIU: refused.
//!
//! Every read is bounds-checked; a malformed message gives a [`DecodeError`] naming the field
//! and the byte offset inside the message, never a panic. Unknown fields are skipped by the
//! typed readers (that is how protobuf stays compatible across versions).

use std::fmt;

/// Largest valid field number (2^29 - 1).
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;

/// The value of one field as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl Value<'_> {
    fn wire_name(&self) -> &'static str {
        match self {
            Value::Varint(_) => "varint",
            Value::Fixed64(_) => "64-bit",
            Value::Bytes(_) => "length-delimited",
            Value::Fixed32(_) => "32-bit",
        }
    }
}

/// One field of a message: its number, its value and where its key starts in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    pub number: u32,
    pub value: Value<'a>,
    pub offset: usize,
}

/// Why a message does not decode. `field` names the field being read when it is known
/// (`(number, name)`); `offset` is the byte offset inside the message, when there is one (a
/// missing required field has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The embedded messages the error is inside, outermost first (e.g. `vmas[3]`).
    pub within: Vec<String>,
    pub field: Option<(u32, &'static str)>,
    pub offset: Option<usize>,
    pub detail: String,
}

impl DecodeError {
    pub fn new(offset: usize, detail: impl Into<String>) -> DecodeError {
        DecodeError {
            within: Vec::new(),
            field: None,
            offset: Some(offset),
            detail: detail.into(),
        }
    }

    /// An error about the message as a whole (no byte offset).
    pub fn whole(detail: impl Into<String>) -> DecodeError {
        DecodeError {
            within: Vec::new(),
            field: None,
            offset: None,
            detail: detail.into(),
        }
    }

    /// Say the error is inside the embedded message `label` (e.g. `vmas[3]`).
    pub fn inside(mut self, label: String) -> DecodeError {
        self.within.insert(0, label);
        self
    }

    /// Attach the field this error is about (keeps a field set by an inner message).
    pub fn in_field(mut self, number: u32, name: &'static str) -> DecodeError {
        if self.field.is_none() {
            self.field = Some((number, name));
        }
        self
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for label in &self.within {
            write!(f, "{label}: ")?;
        }
        if let Some((number, name)) = self.field {
            write!(f, "field {name} ({number}): ")?;
        }
        if let Some(offset) = self.offset {
            write!(f, "at byte {offset}: ")?;
        }
        f.write_str(&self.detail)
    }
}

impl std::error::Error for DecodeError {}

/// Read a varint at `*pos`, advancing it. At most 10 bytes; the 10th may only carry bit 63.
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let start = *pos;
    let mut value: u64 = 0;
    for i in 0..10 {
        let Some(&byte) = buf.get(*pos) else {
            return Err(DecodeError::new(start, "truncated varint"));
        };
        *pos += 1;
        if i == 9 && byte > 1 {
            return Err(DecodeError::new(start, "varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    // Not reached: the 10th byte either overflows or ends the varint.
    Err(DecodeError::new(start, "varint longer than 10 bytes"))
}

fn read_fixed<const N: usize>(buf: &[u8], pos: &mut usize) -> Result<[u8; N], DecodeError> {
    let bytes = pos
        .checked_add(N)
        .and_then(|end| buf.get(*pos..end))
        .ok_or_else(|| DecodeError::new(*pos, format!("truncated {}-bit value", N * 8)))?;
    *pos += N;
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    Ok(out)
}

/// The fields of one message, in wire order.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Iterate over the fields of `buf` (one encoded message).
pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields {
        buf,
        pos: 0,
        failed: false,
    }
}

impl<'a> Fields<'a> {
    fn next_field(&mut self) -> Result<Field<'a>, DecodeError> {
        let offset = self.pos;
        let key = read_varint(self.buf, &mut self.pos)?;
        let number = key >> 3;
        if number == 0 || number > MAX_FIELD_NUMBER {
            return Err(DecodeError::new(
                offset,
                format!("invalid field number {number}"),
            ));
        }
        let number = number as u32;
        let value = match key & 7 {
            0 => Value::Varint(read_varint(self.buf, &mut self.pos)?),
            1 => Value::Fixed64(u64::from_le_bytes(read_fixed(self.buf, &mut self.pos)?)),
            2 => {
                let len_at = self.pos;
                let len = read_varint(self.buf, &mut self.pos)?;
                let left = self.buf.len() - self.pos;
                if len > left as u64 {
                    return Err(DecodeError::new(
                        len_at,
                        format!(
                            "length {len} runs past the end of the message ({left} bytes left)"
                        ),
                    ));
                }
                let bytes = &self.buf[self.pos..self.pos + len as usize];
                self.pos += len as usize;
                Value::Bytes(bytes)
            }
            5 => Value::Fixed32(u32::from_le_bytes(read_fixed(self.buf, &mut self.pos)?)),
            3 | 4 => {
                return Err(DecodeError::new(
                    offset,
                    format!(
                        "field {number}: groups (wire type {}) are not supported",
                        key & 7
                    ),
                ))
            }
            t => {
                return Err(DecodeError::new(
                    offset,
                    format!("field {number}: invalid wire type {t}"),
                ))
            }
        };
        Ok(Field {
            number,
            value,
            offset,
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let item = self.next_field();
        self.failed = item.is_err();
        Some(item)
    }
}

/// Typed views of a field's value. Each checks the wire type and the range of the target type,
/// and names the field in its error.
impl<'a> Field<'a> {
    fn wrong_type(&self, name: &'static str, wanted: &str) -> DecodeError {
        DecodeError::new(
            self.offset,
            format!("expected {wanted}, found {}", self.value.wire_name()),
        )
        .in_field(self.number, name)
    }

    /// A `uint64` (varint).
    pub fn u64(&self, name: &'static str) -> Result<u64, DecodeError> {
        match self.value {
            Value::Varint(v) => Ok(v),
            _ => Err(self.wrong_type(name, "varint")),
        }
    }

    /// A `uint32` (varint that must fit 32 bits).
    pub fn u32(&self, name: &'static str) -> Result<u32, DecodeError> {
        let v = self.u64(name)?;
        u32::try_from(v).map_err(|_| {
            DecodeError::new(self.offset, format!("value {v} does not fit a uint32"))
                .in_field(self.number, name)
        })
    }

    /// An `int32` (varint; negative values are sign-extended to 64 bits on the wire).
    pub fn i32(&self, name: &'static str) -> Result<i32, DecodeError> {
        let v = self.u64(name)? as i64;
        i32::try_from(v).map_err(|_| {
            DecodeError::new(self.offset, format!("value {v} does not fit an int32"))
                .in_field(self.number, name)
        })
    }

    /// A `sint64` (zigzag-encoded varint).
    pub fn sint64(&self, name: &'static str) -> Result<i64, DecodeError> {
        let v = self.u64(name)?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// A `bool` (varint 0 or 1).
    pub fn bool(&self, name: &'static str) -> Result<bool, DecodeError> {
        match self.u64(name)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(
                DecodeError::new(self.offset, format!("value {v} is not a bool"))
                    .in_field(self.number, name),
            ),
        }
    }

    /// Length-delimited bytes (an embedded message, `bytes`).
    pub fn bytes(&self, name: &'static str) -> Result<&'a [u8], DecodeError> {
        match self.value {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.wrong_type(name, "length-delimited")),
        }
    }

    /// A `string` (UTF-8).
    pub fn string(&self, name: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(name)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            DecodeError::new(self.offset, "string is not valid UTF-8").in_field(self.number, name)
        })
    }

    /// The elements of a `repeated uint32`, whichever way it was written: one varint per field
    /// (proto2's default) or packed into one length-delimited field. Appends to `out`.
    pub fn push_u32s(&self, name: &'static str, out: &mut Vec<u32>) -> Result<(), DecodeError> {
        match self.value {
            Value::Varint(_) => out.push(self.u32(name)?),
            Value::Bytes(packed) => {
                let mut pos = 0;
                while pos < packed.len() {
                    let at = pos;
                    let v = read_varint(packed, &mut pos).map_err(|e| {
                        DecodeError::new(self.offset, format!("packed element: {}", e.detail))
                            .in_field(self.number, name)
                    })?;
                    let v = u32::try_from(v).map_err(|_| {
                        DecodeError::new(
                            self.offset,
                            format!("packed element at byte {at}: {v} does not fit a uint32"),
                        )
                        .in_field(self.number, name)
                    })?;
                    out.push(v);
                }
            }
            _ => return Err(self.wrong_type(name, "varint or packed varints")),
        }
        Ok(())
    }
}

/// `Some(v)` or the error for a required field that was not in the message.
pub fn required<T>(v: Option<T>, number: u32, name: &'static str) -> Result<T, DecodeError> {
    v.ok_or_else(|| DecodeError::whole("required field is missing").in_field(number, name))
}
