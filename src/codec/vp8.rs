//! VP8: the RFC 7741 payload descriptor and the RFC 6386 key frame header.
//!
//! A key frame's first partition starts with a 3-byte frame tag, the start code `9d 01 2a`, then two
//! little-endian 16-bit fields: 14 bits of width or height and 2 bits of scaling. All of it is in the
//! first 10 bytes of the frame, so it is always in the frame's first packet unless the sender cut that
//! packet absurdly short (then the key frame is not measured).

use super::{ParseError, Resolution, resolution};

/// The two 2-bit scaling fields of a VP8 key frame header (RFC 6386 9.2): 0 = none, 1 = 5/4, 2 = 5/3,
/// 3 = 2 (upscale on display).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vp8Scaling {
    /// Horizontal scaling mode, 0 to 3.
    pub horizontal: u8,
    /// Vertical scaling mode, 0 to 3.
    pub vertical: u8,
}

/// The parts of the RFC 7741 descriptor the SFU needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    /// S: start of a VP8 partition.
    pub(crate) start: bool,
    /// PID: partition index.
    pub(crate) partition: u8,
    /// Offset of the VP8 payload after the descriptor.
    pub(crate) header_len: usize,
}

/// Parses the payload descriptor: X|R|N|S|R|PID, then if X: I|L|T|K|RSV, then the picture ID (1 or 2
/// bytes, by its M bit), TL0PICIDX, and TID|Y|KEYIDX, each present by its flag.
pub(crate) fn descriptor(payload: &[u8]) -> Option<Descriptor> {
    let b0 = *payload.first()?;
    let mut len = 1;
    if b0 & 0x80 != 0 {
        let x = *payload.get(1)?;
        len = 2;
        if x & 0x80 != 0 {
            let pic = *payload.get(len)?;
            len += if pic & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            len += 1;
        }
        if x & 0x30 != 0 {
            len += 1;
        }
    }
    if payload.len() < len {
        return None;
    }
    Some(Descriptor {
        start: b0 & 0x10 != 0,
        partition: b0 & 0x07,
        header_len: len,
    })
}

/// The first packet of a key frame: S=1, PID=0, and the frame tag's P bit (bit 0 of its first byte) is
/// 0. The frame tag must be present in this packet.
pub(crate) fn is_keyframe_start(payload: &[u8]) -> bool {
    match descriptor(payload) {
        Some(d) if d.start && d.partition == 0 => {
            payload.get(d.header_len).is_some_and(|tag| tag & 0x01 == 0)
        }
        _ => false,
    }
}

/// Reads a key frame header from the start of a VP8 frame (after the descriptor).
pub(crate) fn parse_keyframe(frame: &[u8]) -> Result<(Resolution, Vp8Scaling), ParseError> {
    let tag = *frame.first().ok_or(ParseError::Truncated)?;
    if tag & 0x01 != 0 {
        return Err(ParseError::NotKeyframe);
    }
    let Some(&[s0, s1, s2, w0, w1, h0, h1]) = frame.get(3..10) else {
        return Err(ParseError::Truncated);
    };
    if [s0, s1, s2] != [0x9d, 0x01, 0x2a] {
        return Err(ParseError::Invalid("missing VP8 start code"));
    }
    let w = u16::from_le_bytes([w0, w1]);
    let h = u16::from_le_bytes([h0, h1]);
    let size = resolution(u32::from(w & 0x3fff), u32::from(h & 0x3fff))?;
    let scaling = Vp8Scaling {
        horizontal: (w >> 14) as u8,
        vertical: (h >> 14) as u8,
    };
    Ok((size, scaling))
}

/// The VP8 probe: stateless apart from the last scaling bits, since the whole header is in one packet.
#[derive(Debug, Default)]
pub(crate) struct Vp8Probe {
    pub(crate) scaling: Option<Vp8Scaling>,
}

impl Vp8Probe {
    pub(crate) fn push(&mut self, payload: &[u8]) -> Option<Resolution> {
        let d = descriptor(payload)?;
        if !d.start || d.partition != 0 {
            return None;
        }
        let frame = payload.get(d.header_len..)?;
        if frame.first()? & 0x01 != 0 {
            return None;
        }
        let (size, scaling) = parse_keyframe(frame).ok()?;
        self.scaling = Some(scaling);
        Some(size)
    }
}
