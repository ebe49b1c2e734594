//! A big-endian bit reader over a byte slice, shared by the codec header parsers.
//!
//! Every read is bounds-checked and returns [`ParseError::Truncated`] past the end: the parsers run on
//! bytes from the network and must never panic. Reads of more than 32 bits at once are refused.

use super::ParseError;

/// Reads bits most-significant first, as the VP8/VP9/H.264/AV1 specifications write them.
#[derive(Debug, Clone)]
pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    /// Position in bits from the start of `data`.
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// Bits not yet read.
    pub(crate) fn remaining(&self) -> usize {
        (self.data.len() * 8).saturating_sub(self.pos)
    }

    /// One bit, `f(1)` / `u(1)`.
    pub(crate) fn bit(&mut self) -> Result<bool, ParseError> {
        let byte = *self.data.get(self.pos / 8).ok_or(ParseError::Truncated)?;
        let bit = (byte >> (7 - (self.pos % 8))) & 1;
        self.pos += 1;
        Ok(bit == 1)
    }

    /// `n` bits (0 to 32) as an unsigned number, `f(n)` / `u(n)`.
    pub(crate) fn bits(&mut self, n: u32) -> Result<u32, ParseError> {
        if n > 32 {
            return Err(ParseError::Invalid("read of more than 32 bits"));
        }
        if self.remaining() < n as usize {
            return Err(ParseError::Truncated);
        }
        let mut value: u64 = 0;
        for _ in 0..n {
            value = (value << 1) | u64::from(self.bit()?);
        }
        // n <= 32, so the value fits.
        u32::try_from(value).map_err(|_| ParseError::Invalid("bit count"))
    }

    /// Skips `n` bits.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), ParseError> {
        if self.remaining() < n {
            return Err(ParseError::Truncated);
        }
        self.pos += n;
        Ok(())
    }

    /// Unsigned exp-Golomb, `ue(v)` (H.264 9.1). Values up to 2^32 - 2; longer prefixes are invalid.
    pub(crate) fn ue(&mut self) -> Result<u32, ParseError> {
        let mut leading_zeros = 0u32;
        while !self.bit()? {
            leading_zeros += 1;
            if leading_zeros > 31 {
                return Err(ParseError::Invalid("exp-Golomb code longer than 32 bits"));
            }
        }
        let suffix = self.bits(leading_zeros)?;
        // (1 << lz) - 1 + suffix <= 2^32 - 2 for lz <= 31.
        let base = (1u64 << leading_zeros) - 1;
        u32::try_from(base + u64::from(suffix))
            .map_err(|_| ParseError::Invalid("exp-Golomb overflow"))
    }

    /// Signed exp-Golomb, `se(v)`.
    pub(crate) fn se(&mut self) -> Result<i32, ParseError> {
        let k = i64::from(self.ue()?);
        let v = if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) };
        i32::try_from(v).map_err(|_| ParseError::Invalid("signed exp-Golomb overflow"))
    }

    /// AV1 `uvlc()` (AV1 spec 4.10.3): 32 or more leading zeros give 2^32 - 1.
    pub(crate) fn uvlc(&mut self) -> Result<u32, ParseError> {
        let mut leading_zeros = 0u32;
        while !self.bit()? {
            leading_zeros += 1;
            if leading_zeros > 64 {
                return Err(ParseError::Invalid("uvlc prefix too long"));
            }
        }
        if leading_zeros >= 32 {
            return Ok(u32::MAX);
        }
        let suffix = self.bits(leading_zeros)?;
        let base = (1u64 << leading_zeros) - 1;
        u32::try_from(base + u64::from(suffix)).map_err(|_| ParseError::Invalid("uvlc overflow"))
    }
}

/// Reads an unsigned LEB128 number (AV1 spec 4.10.5) from the start of `data`: at most 8 bytes, value
/// below 2^32 as the spec requires. Returns the value and the number of bytes it took.
pub(crate) fn leb128(data: &[u8]) -> Option<(u32, usize)> {
    let mut value: u64 = 0;
    for i in 0..8 {
        let byte = *data.get(i)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v, i + 1));
        }
    }
    None
}

/// Copies an H.264 NAL unit's bytes into `out` with the emulation-prevention bytes (the `03` of each
/// `00 00 03`) removed, stopping when `out` is full. Returns how many bytes were written. Header fields
/// that matter here sit near the start, so a NAL unit longer than `out` loses only its tail.
pub(crate) fn unescape_rbsp(nal: &[u8], out: &mut [u8]) -> usize {
    let mut written = 0;
    let mut zeros = 0u8;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        let Some(slot) = out.get_mut(written) else {
            break;
        };
        *slot = b;
        written += 1;
        zeros = if b == 0 { zeros.saturating_add(1) } else { 0 };
    }
    written
}

#[cfg(test)]
pub(crate) use tests::BitWriter;

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes bits MSB first; test-only, to build headers field by field.
    #[derive(Default)]
    pub(crate) struct BitWriter {
        pub(crate) bytes: Vec<u8>,
        len: usize,
    }

    impl BitWriter {
        pub(crate) fn put(&mut self, n: u32, value: u64) {
            for i in (0..n).rev() {
                if self.len.is_multiple_of(8) {
                    self.bytes.push(0);
                }
                let bit = ((value >> i) & 1) as u8;
                if let Some(last) = self.bytes.last_mut() {
                    *last |= bit << (7 - (self.len % 8));
                }
                self.len += 1;
            }
        }
        pub(crate) fn ue(&mut self, v: u32) {
            let x = u64::from(v) + 1;
            let len = 64 - x.leading_zeros();
            self.put(len - 1, 0);
            self.put(len, x);
        }
        pub(crate) fn se(&mut self, v: i32) {
            let k = if v > 0 {
                2 * v as i64 - 1
            } else {
                -2 * v as i64
            };
            self.ue(k as u32);
        }
    }

    #[test]
    fn reads_fixed_width_fields_msb_first_and_stops_at_the_end() {
        let mut r = BitReader::new(&[0b1010_0000, 0xff]);
        assert!(r.bit().unwrap());
        assert_eq!(r.bits(3).unwrap(), 0b010);
        assert_eq!(r.bits(12).unwrap(), 0x0ff);
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.bit(), Err(ParseError::Truncated));
        let mut r = BitReader::new(&[0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(r.bits(32).unwrap(), 0x1234_5678);
        assert_eq!(r.bits(9), Err(ParseError::Truncated));
        assert!(r.bits(33).is_err());
    }

    #[test]
    fn exp_golomb_round_trips_and_rejects_overlong_prefixes() {
        let mut w = BitWriter::default();
        let values = [0u32, 1, 2, 3, 7, 8, 254, 255, 1000, 65_535, u32::MAX - 1];
        for v in values {
            w.ue(v);
        }
        for v in [-5i32, 0, 5, -128, 127, i32::MAX] {
            w.se(v);
        }
        let mut r = BitReader::new(&w.bytes);
        for v in values {
            assert_eq!(r.ue().unwrap(), v);
        }
        for v in [-5i32, 0, 5, -128, 127, i32::MAX] {
            assert_eq!(r.se().unwrap(), v);
        }
        // 32 leading zeros cannot be a valid ue(v) here.
        let mut r = BitReader::new(&[0, 0, 0, 0, 0x80, 0, 0, 0, 0]);
        assert!(matches!(r.ue(), Err(ParseError::Invalid(_))));
    }

    #[test]
    fn uvlc_saturates_at_32_leading_zeros() {
        let mut w = BitWriter::default();
        w.ue(41); // uvlc and ue(v) share the code for small values
        w.put(32, 0);
        w.put(1, 1);
        let mut r = BitReader::new(&w.bytes);
        assert_eq!(r.uvlc().unwrap(), 41);
        assert_eq!(r.uvlc().unwrap(), u32::MAX);
    }

    #[test]
    fn leb128_reads_up_to_eight_bytes_below_2_pow_32() {
        assert_eq!(leb128(&[0x05]), Some((5, 1)));
        assert_eq!(leb128(&[0xe5, 0x8e, 0x26, 0xff]), Some((624_485, 3)));
        assert_eq!(leb128(&[0x80, 0x80]), None);
        assert_eq!(leb128(&[0xff, 0xff, 0xff, 0xff, 0x7f]), None); // 2^35 - 1
        assert_eq!(leb128(&[0x80; 9]), None);
    }

    #[test]
    fn unescape_removes_emulation_prevention_bytes_only_after_two_zeros() {
        let mut out = [0u8; 16];
        let n = unescape_rbsp(&[0x67, 0, 0, 3, 1, 0, 3, 0, 0, 3], &mut out);
        assert_eq!(&out[..n], &[0x67, 0, 0, 1, 0, 3, 0, 0]);
        let mut small = [0u8; 2];
        assert_eq!(unescape_rbsp(&[1, 2, 3, 4], &mut small), 2);
    }
}
