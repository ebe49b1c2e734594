//! H.264: RFC 6184 packetization (single NAL unit, STAP-A, FU-A) and the sequence parameter set
//! (H.264 7.3.2.1.1), read far enough for the cropped picture size.
//!
//! WebRTC senders put the SPS in front of every IDR, either alone, aggregated with the PPS in a STAP-A,
//! or (rarely, with a small MTU or a large SPS) fragmented with FU-A; the probe reassembles only FU-A
//! fragments of an SPS, in one capped buffer, and drops them on a sequence gap. STAP-B and MTAP (not
//! used by WebRTC) are ignored.

use super::bits::{BitReader, unescape_rbsp};
use super::{ParseError, Resolution, resolution};

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

/// The most SPS bytes kept (escaped, with the NAL header). The fields up to frame cropping fit in far
/// less, even with every scaling list present; a longer SPS loses only its tail (VUI), which is not read.
pub(crate) const SPS_CAP: usize = 2048;

/// Does this packet carry an SPS or the start of an IDR slice?
pub(crate) fn is_keyframe_start(payload: &[u8]) -> bool {
    let Some(&header) = payload.first() else {
        return false;
    };
    if header & 0x80 != 0 {
        return false; // forbidden_zero_bit
    }
    match header & 0x1f {
        t @ 1..=23 => t == NAL_IDR || t == NAL_SPS,
        NAL_STAP_A => stap_a_units(payload).any(|nal| {
            nal.first()
                .is_some_and(|h| matches!(h & 0x1f, NAL_IDR | NAL_SPS))
        }),
        NAL_FU_A => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && matches!(fu & 0x1f, NAL_IDR | NAL_SPS)),
        _ => false,
    }
}

/// The NAL units of a STAP-A payload (after its one-byte header), each prefixed by a 16-bit size. Stops
/// at the first size that runs past the end.
fn stap_a_units(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = payload.get(1..).unwrap_or_default();
    std::iter::from_fn(move || {
        let (&[hi, lo], tail) = rest.split_first_chunk::<2>()?;
        let size = usize::from(u16::from_be_bytes([hi, lo]));
        if size == 0 || size > tail.len() {
            rest = &[];
            return None;
        }
        let (nal, next) = tail.split_at(size);
        rest = next;
        Some(nal)
    })
}

/// What the SPS says about the picture, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sps {
    pub(crate) profile_idc: u8,
    pub(crate) chroma_format_idc: u32,
    pub(crate) bit_depth_luma: u32,
    pub(crate) pic_order_cnt_type: u32,
    pub(crate) frame_mbs_only: bool,
    pub(crate) scaling_matrix_present: bool,
    /// Before cropping.
    pub(crate) coded: Resolution,
    /// After cropping: what is reported.
    pub(crate) size: Resolution,
}

/// Parses an SPS NAL unit (with its one-byte NAL header, emulation prevention still in).
pub(crate) fn parse_sps(nal: &[u8]) -> Result<Sps, ParseError> {
    let mut rbsp = [0u8; SPS_CAP];
    let len = unescape_rbsp(nal, &mut rbsp);
    let rbsp = rbsp.get(..len).ok_or(ParseError::Truncated)?;
    let (&header, body) = rbsp.split_first().ok_or(ParseError::Truncated)?;
    if header & 0x1f != NAL_SPS || header & 0x80 != 0 {
        return Err(ParseError::Invalid("not an SPS NAL unit"));
    }
    let mut r = BitReader::new(body);
    let profile_idc = r.bits(8)? as u8;
    r.skip(8)?; // constraint_set flags, reserved_zero_2bits
    r.skip(8)?; // level_idc
    if r.ue()? > 31 {
        return Err(ParseError::Invalid("seq_parameter_set_id"));
    }
    let mut chroma_format_idc = 1;
    let mut separate_colour_plane = false;
    let mut bit_depth_luma = 8;
    let mut scaling_matrix_present = false;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc > 3 {
            return Err(ParseError::Invalid("chroma_format_idc"));
        }
        if chroma_format_idc == 3 {
            separate_colour_plane = r.bit()?;
        }
        let luma = r.ue()?;
        let chroma = r.ue()?;
        if luma > 6 || chroma > 6 {
            return Err(ParseError::Invalid("bit_depth_minus8"));
        }
        bit_depth_luma = luma + 8;
        r.skip(1)?; // qpprime_y_zero_transform_bypass_flag
        scaling_matrix_present = r.bit()?;
        if scaling_matrix_present {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    if r.ue()? > 12 {
        return Err(ParseError::Invalid("log2_max_frame_num_minus4"));
    }
    let pic_order_cnt_type = r.ue()?;
    match pic_order_cnt_type {
        0 => {
            if r.ue()? > 12 {
                return Err(ParseError::Invalid("log2_max_pic_order_cnt_lsb_minus4"));
            }
        }
        1 => {
            r.skip(1)?; // delta_pic_order_always_zero_flag
            r.se()?; // offset_for_non_ref_pic
            r.se()?; // offset_for_top_to_bottom_field
            let cycle = r.ue()?;
            if cycle > 255 {
                return Err(ParseError::Invalid("num_ref_frames_in_pic_order_cnt_cycle"));
            }
            for _ in 0..cycle {
                r.se()?; // offset_for_ref_frame
            }
        }
        2 => {}
        _ => return Err(ParseError::Invalid("pic_order_cnt_type")),
    }
    r.ue()?; // max_num_ref_frames
    r.skip(1)?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()?.checked_add(1).ok_or(ParseError::Invalid("width"))?;
    let height_map_units = r
        .ue()?
        .checked_add(1)
        .ok_or(ParseError::Invalid("height"))?;
    let frame_mbs_only = r.bit()?;
    if !frame_mbs_only {
        r.skip(1)?; // mb_adaptive_frame_field_flag
    }
    r.skip(1)?; // direct_8x8_inference_flag
    let cropping = r.bit()?;
    let (mut left, mut right, mut top, mut bottom) = (0, 0, 0, 0);
    if cropping {
        left = r.ue()?;
        right = r.ue()?;
        top = r.ue()?;
        bottom = r.ue()?;
    }

    let field_factor = if frame_mbs_only { 1 } else { 2 };
    let overflow = ParseError::Invalid("picture size overflow");
    let coded_width = width_mbs.checked_mul(16).ok_or(overflow)?;
    let coded_height = height_map_units
        .checked_mul(16 * field_factor)
        .ok_or(overflow)?;
    // Crop units (H.264 7.4.2.1.1, equations 7-19 to 7-22): one sample per unit for monochrome or
    // separate colour planes (ChromaArrayType 0), else the chroma subsampling; doubled vertically when
    // the picture is coded as fields.
    let chroma_array_type = if separate_colour_plane {
        0
    } else {
        chroma_format_idc
    };
    let (unit_x, unit_y) = match chroma_array_type {
        1 => (2, 2 * field_factor),
        2 => (2, field_factor),
        _ => (1, field_factor),
    };
    let crop_x = left
        .checked_add(right)
        .and_then(|c| c.checked_mul(unit_x))
        .ok_or(overflow)?;
    let crop_y = top
        .checked_add(bottom)
        .and_then(|c| c.checked_mul(unit_y))
        .ok_or(overflow)?;
    let width = coded_width
        .checked_sub(crop_x)
        .ok_or(ParseError::Invalid("crop wider than the picture"))?;
    let height = coded_height
        .checked_sub(crop_y)
        .ok_or(ParseError::Invalid("crop taller than the picture"))?;
    Ok(Sps {
        profile_idc,
        chroma_format_idc,
        bit_depth_luma,
        pic_order_cnt_type,
        frame_mbs_only,
        scaling_matrix_present,
        coded: resolution(coded_width, coded_height)?,
        size: resolution(width, height)?,
    })
}

/// `scaling_list()` (7.3.2.1.1.1): delta-coded until a delta makes the next scale 0.
fn skip_scaling_list(r: &mut BitReader<'_>, size: usize) -> Result<(), ParseError> {
    let mut last: i32 = 8;
    let mut next: i32 = 8;
    for _ in 0..size {
        if next != 0 {
            let delta = r.se()?;
            if !(-128..=127).contains(&delta) {
                return Err(ParseError::Invalid("delta_scale"));
            }
            next = (last + delta + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

/// The H.264 probe: parses every SPS it sees; reassembles FU-A fragments of an SPS.
#[derive(Debug, Default)]
pub(crate) struct H264Probe {
    /// The SPS being reassembled from FU-A fragments (NAL header first); empty when none is.
    fu: Vec<u8>,
    /// Sequence number the next FU-A fragment must have; `None` when not reassembling.
    fu_next_seq: Option<u64>,
}

impl H264Probe {
    pub(crate) fn push(&mut self, seq: u64, payload: &[u8]) -> Option<Resolution> {
        let &header = payload.first()?;
        match header & 0x1f {
            NAL_SPS => {
                self.abandon_fu();
                parse_sps(payload).ok().map(|s| s.size)
            }
            1..=23 => {
                if self.fu_next_seq.is_some() {
                    self.abandon_fu();
                }
                None
            }
            NAL_STAP_A => {
                if self.fu_next_seq.is_some() {
                    self.abandon_fu();
                }
                // The last SPS of the packet wins (there is normally one).
                stap_a_units(payload)
                    .filter(|nal| nal.first().is_some_and(|h| h & 0x1f == NAL_SPS))
                    .filter_map(|nal| parse_sps(nal).ok())
                    .last()
                    .map(|s| s.size)
            }
            NAL_FU_A => self.push_fu_a(seq, header, payload),
            _ => None,
        }
    }

    fn push_fu_a(&mut self, seq: u64, indicator: u8, payload: &[u8]) -> Option<Resolution> {
        let &fu = payload.get(1)?;
        let fragment = payload.get(2..)?;
        let (start, end) = (fu & 0x80 != 0, fu & 0x40 != 0);
        if fu & 0x1f != NAL_SPS {
            if self.fu_next_seq.is_some() {
                self.abandon_fu();
            }
            return None;
        }
        if start {
            self.fu.clear();
            // The reconstructed NAL header: F and NRI from the indicator, type from the FU header.
            self.fu.push((indicator & 0xe0) | (fu & 0x1f));
        } else if self.fu_next_seq != Some(seq) {
            self.abandon_fu(); // lost the start or a middle fragment
            return None;
        }
        let room = SPS_CAP.saturating_sub(self.fu.len());
        self.fu
            .extend_from_slice(fragment.get(..room.min(fragment.len()))?);
        if end {
            let size = parse_sps(&self.fu).ok().map(|s| s.size);
            self.abandon_fu();
            return size;
        }
        self.fu_next_seq = seq.checked_add(1);
        None
    }

    fn abandon_fu(&mut self) {
        self.fu.clear();
        self.fu_next_seq = None;
        if self.fu.capacity() > SPS_CAP {
            self.fu.shrink_to(SPS_CAP);
        }
    }
}
