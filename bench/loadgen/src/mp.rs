//! A minimal msgpack reader and writer for the tsmsg adapter: it reads frames in place
//! (no tree of values, no allocation per field), which keeps the load generator's cost per
//! delivered event low. Only what PROTOCOL.md section 2 allows on the wire is handled; an
//! ext type or a reserved byte is an error.

use anyhow::{bail, Result};

/// A cursor over one msgpack value (a frame body).
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

/// A scalar read where any type may appear; containers are skipped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    /// An array of `n` elements; the reader is positioned at its first element.
    Array(usize),
    /// A map of `n` entries; the reader is positioned at its first key.
    Map(usize),
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.buf.len() {
            bail!("msgpack value cut short");
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
    }

    /// Read the next value's header (and a scalar's payload).
    pub fn next(&mut self) -> Result<Val<'a>> {
        let m = self.take(1)?[0];
        Ok(match m {
            0x00..=0x7f => Val::Int(m as i128),
            0x80..=0x8f => Val::Map((m & 0x0f) as usize),
            0x90..=0x9f => Val::Array((m & 0x0f) as usize),
            0xa0..=0xbf => Val::Str(self.take((m & 0x1f) as usize)?),
            0xc0 => Val::Nil,
            0xc2 => Val::Bool(false),
            0xc3 => Val::Bool(true),
            0xc4..=0xc6 => {
                let n = self.be(1 << (m - 0xc4))? as usize;
                Val::Bin(self.take(n)?)
            }
            0xca => Val::Float(f32::from_bits(self.be(4)? as u32) as f64),
            0xcb => Val::Float(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Val::Int(self.be(1 << (m - 0xcc))? as i128),
            0xd0 => Val::Int(self.be(1)? as u8 as i8 as i128),
            0xd1 => Val::Int(self.be(2)? as u16 as i16 as i128),
            0xd2 => Val::Int(self.be(4)? as u32 as i32 as i128),
            0xd3 => Val::Int(self.be(8)? as i64 as i128),
            0xd9..=0xdb => {
                let n = self.be(1 << (m - 0xd9))? as usize;
                Val::Str(self.take(n)?)
            }
            0xdc => Val::Array(self.be(2)? as usize),
            0xdd => Val::Array(self.be(4)? as usize),
            0xde => Val::Map(self.be(2)? as usize),
            0xdf => Val::Map(self.be(4)? as usize),
            0xe0..=0xff => Val::Int((m as i8) as i128),
            _ => bail!("msgpack byte {m:#04x} (ext or reserved) is not part of the wire format"),
        })
    }

    /// Skip the rest of a value whose header `v` was just read.
    pub fn skip_rest(&mut self, v: Val<'a>) -> Result<()> {
        let n = match v {
            Val::Array(n) => n,
            Val::Map(n) => 2 * n,
            _ => return Ok(()),
        };
        for _ in 0..n {
            self.skip()?;
        }
        Ok(())
    }

    /// Skip one whole value.
    pub fn skip(&mut self) -> Result<()> {
        let v = self.next()?;
        self.skip_rest(v)
    }
}

impl<'a> Val<'a> {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Val::Int(i) if (0..=u64::MAX as i128).contains(&i) => Some(i as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Val::Int(i) if (i64::MIN as i128..=i64::MAX as i128).contains(&i) => Some(i as i64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            Val::Str(s) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Writer helpers: each appends one msgpack value (smallest encoding) to `out`.
pub fn map(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else {
        out.push(0xde);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
}

pub fn str(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 256 {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n < 65536 {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s);
}

pub fn int(out: &mut Vec<u8>, v: i64) {
    if (0..128).contains(&v) {
        out.push(v as u8);
    } else if (-32..0).contains(&v) {
        out.push(v as i8 as u8);
    } else if v >= 0 {
        out.push(0xcf);
        out.extend_from_slice(&(v as u64).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Start a frame: 4 placeholder length bytes; [`finish`] fills them in.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

pub fn finish(out: &mut [u8], at: usize) {
    let n = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&n.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_example_send_bytes() {
        // PROTOCOL.md section 18, "Example: send".
        let mut out = Vec::new();
        let at = begin(&mut out);
        map(&mut out, 5);
        str(&mut out, b"t");
        str(&mut out, b"send");
        str(&mut out, b"rid");
        int(&mut out, 3);
        str(&mut out, b"channel");
        str(&mut out, b"room-1");
        str(&mut out, b"cid");
        str(&mut out, b"6f1c2a9e");
        str(&mut out, b"text");
        str(&mut out, b"hi");
        finish(&mut out, at);
        let hex = "00000031 85a174a473656e64a3726964 03a76368616e6e656ca6726f6f6d2d31\
                   a3636964a83666316332613965 a474657874a26869";
        let want: Vec<u8> = hex
            .split_whitespace()
            .collect::<String>()
            .as_bytes()
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn reads_uint64_timestamp_and_skips() {
        // {"ts": cf 00 00 01 9b 76 da a8 fa, "x": [1, {"a": nil}]}
        let b = [
            0x82, 0xa2, b't', b's', 0xcf, 0, 0, 1, 0x9b, 0x76, 0xda, 0xa8, 0xfa, 0xa1, b'x', 0x92,
            1, 0x81, 0xa1, b'a', 0xc0,
        ];
        let mut r = Reader::new(&b);
        assert_eq!(r.next().unwrap(), Val::Map(2));
        assert_eq!(r.next().unwrap().as_str(), Some("ts"));
        assert_eq!(r.next().unwrap().as_u64(), Some(1767225600250));
        r.skip().unwrap();
        r.skip().unwrap();
        assert_eq!(r.pos, b.len());
    }
}
