//! VP9: the RFC 9628 payload descriptor and the uncompressed header of key and intra-only frames
//! (VP9 bitstream specification 6.2).
//!
//! The scalability structure (SS, the V bit) may carry per-layer sizes; they are the sender's claim and
//! are skipped, never used. The size is read from `frame_size()` of the frame's own header, which sits in
//! the first few bytes of the frame and so in its first packet (B=1).

use super::bits::BitReader;
use super::{ParseError, Resolution, resolution};

/// The parts of the RFC 9628 descriptor the SFU needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    /// P: inter-picture predicted.
    pub(crate) inter_predicted: bool,
    /// B: start of a layer frame.
    pub(crate) begin: bool,
    /// SID from the layer indices, 0 when absent.
    pub(crate) spatial_id: u8,
    /// Offset of the VP9 frame data after the descriptor.
    pub(crate) header_len: usize,
}

/// Parses `I|P|L|F|B|E|V|Z`, the picture ID (7 or 15 bits), the layer indices (plus TL0PICIDX in
/// non-flexible mode), up to three P_DIFF bytes (flexible mode with P=1), and the scalability structure.
pub(crate) fn descriptor(payload: &[u8]) -> Option<Descriptor> {
    let b0 = *payload.first()?;
    let (i, p, l, f, b, v) = (
        b0 & 0x80 != 0,
        b0 & 0x40 != 0,
        b0 & 0x20 != 0,
        b0 & 0x10 != 0,
        b0 & 0x08 != 0,
        b0 & 0x02 != 0,
    );
    let mut pos = 1usize;
    if i {
        let m = *payload.get(pos)? & 0x80 != 0;
        pos += if m { 2 } else { 1 };
    }
    let mut spatial_id = 0;
    if l {
        let layer = *payload.get(pos)?;
        spatial_id = (layer >> 1) & 0x07;
        pos += 1;
        if !f {
            pos += 1; // TL0PICIDX
        }
    }
    if f && p {
        // P_DIFF|N, at most three.
        for n in 0..3 {
            let diff = *payload.get(pos)?;
            pos += 1;
            if diff & 0x01 == 0 {
                break;
            }
            if n == 2 {
                return None; // N set on the third reference: malformed
            }
        }
    }
    if v {
        pos = skip_scalability_structure(payload, pos)?;
    }
    if payload.len() < pos {
        return None;
    }
    Some(Descriptor {
        inter_predicted: p,
        begin: b,
        spatial_id,
        header_len: pos,
    })
}

/// Skips SS: `N_S|Y|G|-|-|-`, (N_S+1) widths and heights if Y, then N_G and each picture group entry
/// `T|U|R|-|-` with its R P_DIFF bytes if G. Returns the offset after it.
fn skip_scalability_structure(payload: &[u8], mut pos: usize) -> Option<usize> {
    let ss = *payload.get(pos)?;
    pos += 1;
    let layers = usize::from(ss >> 5) + 1;
    if ss & 0x10 != 0 {
        pos += 4 * layers;
    }
    if ss & 0x08 != 0 {
        let groups = *payload.get(pos)?;
        pos += 1;
        for _ in 0..groups {
            let entry = *payload.get(pos)?;
            pos += 1 + usize::from((entry >> 2) & 0x03);
        }
    }
    (pos <= payload.len()).then_some(pos)
}

/// Frame types of the VP9 uncompressed header.
const KEY_FRAME: bool = false;
const SYNC_CODE: [u32; 3] = [0x49, 0x83, 0x42];
const CS_RGB: u32 = 7;

/// What a key or intra-only frame's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) profile: u8,
    pub(crate) bit_depth: u8,
    pub(crate) subsampling: (bool, bool),
    pub(crate) intra_only: bool,
    pub(crate) size: Resolution,
}

/// Quick look at the first header byte: `frame_marker` = 2, then the profile bits, the reserved bit of
/// profile 3, `show_existing_frame` = 0 and `frame_type` = KEY_FRAME.
fn starts_key_frame(frame: &[u8]) -> bool {
    let Some(&b) = frame.first() else {
        return false;
    };
    if b >> 6 != 0b10 {
        return false;
    }
    let profile = ((b >> 5) & 1) | (((b >> 4) & 1) << 1);
    // The bits after the profile: [reserved_zero], show_existing_frame, frame_type.
    let (show_existing, frame_type) = if profile == 3 {
        if (b >> 3) & 1 != 0 {
            return false;
        }
        ((b >> 2) & 1, (b >> 1) & 1)
    } else {
        ((b >> 3) & 1, (b >> 2) & 1)
    };
    show_existing == 0 && frame_type == 0
}

/// Parses the uncompressed header up to `frame_size()` of a key frame or an intra-only frame. Anything
/// else (inter frames, `show_existing_frame`) is [`ParseError::NotKeyframe`].
pub(crate) fn parse_frame_header(frame: &[u8]) -> Result<FrameHeader, ParseError> {
    let mut r = BitReader::new(frame);
    if r.bits(2)? != 2 {
        return Err(ParseError::Invalid("frame_marker"));
    }
    let low = r.bits(1)?;
    let high = r.bits(1)?;
    let profile = (high << 1 | low) as u8;
    if profile == 3 && r.bit()? {
        return Err(ParseError::Invalid("reserved_zero after profile"));
    }
    if r.bit()? {
        // show_existing_frame: frame_to_show_map_idx only, no size here.
        return Err(ParseError::NotKeyframe);
    }
    let frame_type = r.bit()?;
    let show_frame = r.bit()?;
    let error_resilient = r.bit()?;
    let mut header = FrameHeader {
        profile,
        bit_depth: 8,
        subsampling: (true, true),
        intra_only: false,
        size: Resolution {
            width: 0,
            height: 0,
        },
    };
    if frame_type == KEY_FRAME {
        frame_sync_code(&mut r)?;
        color_config(&mut r, &mut header)?;
    } else {
        let intra_only = if show_frame { false } else { r.bit()? };
        if !intra_only {
            return Err(ParseError::NotKeyframe);
        }
        header.intra_only = true;
        if !error_resilient {
            r.skip(2)?; // reset_frame_context
        }
        frame_sync_code(&mut r)?;
        if profile > 0 {
            color_config(&mut r, &mut header)?;
        }
        r.skip(8)?; // refresh_frame_flags
    }
    let width = r.bits(16)? + 1;
    let height = r.bits(16)? + 1;
    // render_size(): read so a truncated header is not taken for a whole one; the render size is a
    // display hint and is not what is billed.
    if r.bit()? {
        r.skip(32)?;
    }
    header.size = resolution(width, height)?;
    Ok(header)
}

fn frame_sync_code(r: &mut BitReader<'_>) -> Result<(), ParseError> {
    for expected in SYNC_CODE {
        if r.bits(8)? != expected {
            return Err(ParseError::Invalid("frame_sync_code"));
        }
    }
    Ok(())
}

/// `color_config()`: bit depth (profiles 2 and 3), color space, range, and the subsampling with its
/// reserved bit (profiles 1 and 3). 4:2:0 is not allowed in profiles 1 and 3, nor RGB in 0 and 2.
fn color_config(r: &mut BitReader<'_>, h: &mut FrameHeader) -> Result<(), ParseError> {
    if h.profile >= 2 {
        h.bit_depth = if r.bit()? { 12 } else { 10 };
    }
    let color_space = r.bits(3)?;
    let odd_profile = h.profile == 1 || h.profile == 3;
    if color_space != CS_RGB {
        r.skip(1)?; // color_range
        if odd_profile {
            let ss_x = r.bit()?;
            let ss_y = r.bit()?;
            if r.bit()? {
                return Err(ParseError::Invalid("reserved_zero in color_config"));
            }
            if ss_x && ss_y {
                return Err(ParseError::Invalid("4:2:0 in profile 1 or 3"));
            }
            h.subsampling = (ss_x, ss_y);
        }
    } else {
        if !odd_profile {
            return Err(ParseError::Invalid("RGB in profile 0 or 2"));
        }
        h.subsampling = (false, false);
        if r.bit()? {
            return Err(ParseError::Invalid("reserved_zero in color_config"));
        }
    }
    Ok(())
}

/// The first packet of a key frame of the base spatial layer.
pub(crate) fn is_keyframe_start(payload: &[u8]) -> bool {
    match descriptor(payload) {
        Some(d) if d.begin && !d.inter_predicted && d.spatial_id == 0 => {
            payload.get(d.header_len..).is_some_and(starts_key_frame)
        }
        _ => false,
    }
}

/// The VP9 probe: stateless, since the header is in the first packet of each layer frame.
#[derive(Debug)]
pub(crate) struct Vp9Probe;

impl Vp9Probe {
    pub(crate) fn push(&mut self, payload: &[u8]) -> Option<Resolution> {
        let d = descriptor(payload)?;
        if !d.begin {
            return None;
        }
        let frame = payload.get(d.header_len..)?;
        // Cheap pre-check on the first header byte before the full parse.
        if !may_be_intra(*frame.first()?) {
            return None;
        }
        parse_frame_header(frame).ok().map(|h| h.size)
    }
}

/// From the first header byte alone: `frame_marker` is right and the frame is not shown-existing and
/// not a shown inter frame, so it may be a key or intra-only frame.
fn may_be_intra(b: u8) -> bool {
    if b >> 6 != 0b10 {
        return false;
    }
    // Profile 3 (both profile bits set) has a reserved bit before show_existing_frame.
    let shift = u8::from((b >> 4) & 0x03 == 0x03);
    let show_existing = (b >> (3 - shift)) & 1;
    let frame_type = (b >> (2 - shift)) & 1;
    let show_frame = (b >> (1 - shift)) & 1;
    show_existing == 0 && (frame_type == 0 || show_frame == 0)
}
