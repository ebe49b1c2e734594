//! AV1: the RTP aggregation header and OBU elements (AV1 RTP specification 4), the sequence header OBU
//! (AV1 5.5) and the start of the uncompressed frame header (AV1 5.9) of intra frames.
//!
//! Which size is reported: a sequence header gives the largest frame size of the coded video sequence
//! (`max_frame_{width,height}_minus_1`). If the frame header that follows the sequence header in the same
//! temporal unit can be reached and belongs to an intra frame (key or intra-only), its `frame_size()` is
//! reported instead: with `frame_size_override_flag` it is the frame's own size (as in spatial-layer
//! streams, or after an encoder lowers its resolution within the sequence's maximum); the width is the
//! superres upscaled width. The render size is read but not reported: it is a display hint a sender can
//! set freely without changing the pixels it sends. When the frame header is unreachable (lost, cut,
//! malformed) the sequence header's maximum is reported when the temporal unit ends (marker bit) or the
//! next temporal unit begins.
//!
//! Buffers: a sequence header or frame header OBU cut across packets is reassembled in one buffer
//! capped at [`OBU_CAP`] bytes (a frame OBU is only kept up to the cap: its header is at the start),
//! dropped on a sequence-number gap.

use super::bits::{BitReader, leb128};
use super::{ParseError, Resolution, resolution};

const OBU_SEQUENCE_HEADER: u8 = 1;
const OBU_FRAME_HEADER: u8 = 3;
const OBU_FRAME: u8 = 6;

/// Most bytes of one OBU kept while reassembling it. A sequence header with 32 operating points and a
/// decoder model is under 300 bytes; an intra frame header up to `frame_size()` is far smaller.
pub(crate) const OBU_CAP: usize = 512;

const SELECT_SCREEN_CONTENT_TOOLS: u32 = 2;
const SELECT_INTEGER_MV: u32 = 2;
const KEY_FRAME: u32 = 0;
const INTRA_ONLY_FRAME: u32 = 2;
const SWITCH_FRAME: u32 = 3;

/// The aggregation header `Z|Y|W|N|-|-|-`.
#[derive(Debug, Clone, Copy)]
struct Aggregation {
    /// Z: the first element continues an OBU from the previous packet.
    continues: bool,
    /// Y: the last element continues in the next packet.
    continued: bool,
    /// W: number of elements (0 = every element has a length field).
    count: u8,
    /// N: first packet of a coded video sequence.
    new_sequence: bool,
}

fn aggregation(b: u8) -> Aggregation {
    Aggregation {
        continues: b & 0x80 != 0,
        continued: b & 0x40 != 0,
        count: (b >> 4) & 0x03,
        new_sequence: b & 0x08 != 0,
    }
}

/// Iterates the OBU elements of a payload (after the aggregation header). With W = 1..3 the last of the
/// W elements has no length field and runs to the end; with W = 0 every element has one. A length that
/// runs past the end stops the iteration.
fn elements(payload: &[u8], count: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = payload;
    let mut index = 0u8;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        index = index.saturating_add(1);
        if count != 0 && index == count {
            let element = rest;
            rest = &[];
            return Some(element);
        }
        if count != 0 && index > count {
            rest = &[];
            return None;
        }
        let Some((len, used)) = leb128(rest) else {
            rest = &[];
            return None;
        };
        let Some(element) = usize::try_from(len)
            .ok()
            .and_then(|len| rest.get(used..used.checked_add(len)?))
        else {
            rest = &[];
            return None;
        };
        rest = rest.get(used + element.len()..).unwrap_or_default();
        Some(element)
    })
}

/// A packet starts a keyframe when N=1, or when one of its elements begins a sequence header OBU.
pub(crate) fn is_keyframe_start(payload: &[u8]) -> bool {
    let Some((&head, rest)) = payload.split_first() else {
        return false;
    };
    let agg = aggregation(head);
    if agg.new_sequence {
        return true;
    }
    elements(rest, agg.count).enumerate().any(|(i, e)| {
        !(i == 0 && agg.continues)
            && e.first()
                .is_some_and(|&h| obu_type(h) == OBU_SEQUENCE_HEADER)
    })
}

fn obu_type(header: u8) -> u8 {
    (header >> 3) & 0x0f
}

/// An OBU split into its header fields and payload.
#[derive(Debug, Clone, Copy)]
struct Obu<'a> {
    kind: u8,
    temporal_id: u8,
    spatial_id: u8,
    payload: &'a [u8],
}

/// Splits `obu_header()` (and the extension and `obu_size`, when present) from the OBU's payload. A
/// payload shorter than `obu_size` says is returned as it is (the tail may have been cut by the buffer
/// cap); the parsers then see a truncated header if they need the missing bytes.
fn split_obu(bytes: &[u8]) -> Result<Obu<'_>, ParseError> {
    let (&h, mut rest) = bytes.split_first().ok_or(ParseError::Truncated)?;
    if h & 0x80 != 0 {
        return Err(ParseError::Invalid("obu_forbidden_bit"));
    }
    let (mut temporal_id, mut spatial_id) = (0, 0);
    if h & 0x04 != 0 {
        let (&ext, tail) = rest.split_first().ok_or(ParseError::Truncated)?;
        temporal_id = ext >> 5;
        spatial_id = (ext >> 3) & 0x03;
        rest = tail;
    }
    if h & 0x02 != 0 {
        let (size, used) = leb128(rest).ok_or(ParseError::Truncated)?;
        rest = rest.get(used..).ok_or(ParseError::Truncated)?;
        let size = usize::try_from(size).map_err(|_| ParseError::Invalid("obu_size"))?;
        rest = rest
            .get(..size.min(rest.len()))
            .ok_or(ParseError::Truncated)?;
    }
    Ok(Obu {
        kind: obu_type(h),
        temporal_id,
        spatial_id,
        payload: rest,
    })
}

/// The sequence header fields the frame header parse and the size need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SequenceHeader {
    pub(crate) profile: u8,
    pub(crate) still_picture: bool,
    pub(crate) reduced_still_picture_header: bool,
    pub(crate) timing_info_present: bool,
    equal_picture_interval: bool,
    pub(crate) decoder_model_info_present: bool,
    buffer_removal_time_length: u32,
    frame_presentation_time_length: u32,
    /// Per operating point: `operating_point_idc` and `decoder_model_present_for_this_op`.
    operating_points: Vec<(u32, bool)>,
    frame_width_bits: u32,
    frame_height_bits: u32,
    pub(crate) max_size: Resolution,
    frame_id_numbers_present: bool,
    frame_id_length: u32,
    seq_force_screen_content_tools: u32,
    seq_force_integer_mv: u32,
    order_hint_bits: u32,
    enable_superres: bool,
}

/// `sequence_header_obu()` up to `enable_superres` (the color config and film grain flag that follow
/// are not needed for the size).
pub(crate) fn parse_sequence_header(data: &[u8]) -> Result<SequenceHeader, ParseError> {
    let mut r = BitReader::new(data);
    let profile = r.bits(3)? as u8;
    if profile > 2 {
        return Err(ParseError::Invalid("seq_profile"));
    }
    let still_picture = r.bit()?;
    let reduced = r.bit()?;
    if reduced && !still_picture {
        return Err(ParseError::Invalid(
            "reduced_still_picture_header without still_picture",
        ));
    }
    let mut h = SequenceHeader {
        profile,
        still_picture,
        reduced_still_picture_header: reduced,
        timing_info_present: false,
        equal_picture_interval: false,
        decoder_model_info_present: false,
        buffer_removal_time_length: 0,
        frame_presentation_time_length: 0,
        operating_points: Vec::new(),
        frame_width_bits: 0,
        frame_height_bits: 0,
        max_size: Resolution {
            width: 0,
            height: 0,
        },
        frame_id_numbers_present: false,
        frame_id_length: 0,
        seq_force_screen_content_tools: SELECT_SCREEN_CONTENT_TOOLS,
        seq_force_integer_mv: SELECT_INTEGER_MV,
        order_hint_bits: 0,
        enable_superres: false,
    };
    if reduced {
        r.skip(5)?; // seq_level_idx[0]
        h.operating_points.push((0, false));
    } else {
        h.timing_info_present = r.bit()?;
        let mut buffer_delay_length = 0;
        if h.timing_info_present {
            r.skip(32)?; // num_units_in_display_tick
            r.skip(32)?; // time_scale
            h.equal_picture_interval = r.bit()?;
            if h.equal_picture_interval {
                r.uvlc()?; // num_ticks_per_picture_minus_1
            }
            h.decoder_model_info_present = r.bit()?;
            if h.decoder_model_info_present {
                buffer_delay_length = r.bits(5)? + 1;
                r.skip(32)?; // num_units_in_decoding_tick
                h.buffer_removal_time_length = r.bits(5)? + 1;
                h.frame_presentation_time_length = r.bits(5)? + 1;
            }
        }
        let initial_display_delay_present = r.bit()?;
        let count = r.bits(5)? + 1;
        for _ in 0..count {
            let idc = r.bits(12)?;
            let level = r.bits(5)?;
            if level > 7 {
                r.skip(1)?; // seq_tier
            }
            let mut decoder_model_present = false;
            if h.decoder_model_info_present {
                decoder_model_present = r.bit()?;
                if decoder_model_present {
                    // decoder_buffer_delay, encoder_buffer_delay, low_delay_mode_flag
                    r.skip(2 * buffer_delay_length as usize + 1)?;
                }
            }
            if initial_display_delay_present && r.bit()? {
                r.skip(4)?; // initial_display_delay_minus_1
            }
            h.operating_points.push((idc, decoder_model_present));
        }
    }
    h.frame_width_bits = r.bits(4)? + 1;
    h.frame_height_bits = r.bits(4)? + 1;
    let max_width = r.bits(h.frame_width_bits)? + 1;
    let max_height = r.bits(h.frame_height_bits)? + 1;
    h.max_size = resolution(max_width, max_height)?;
    if !reduced {
        h.frame_id_numbers_present = r.bit()?;
    }
    if h.frame_id_numbers_present {
        let delta = r.bits(4)? + 2;
        let additional = r.bits(3)? + 1;
        h.frame_id_length = delta + additional;
    }
    r.skip(3)?; // use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
    if !reduced {
        r.skip(4)?; // interintra, masked compound, warped motion, dual filter
        let enable_order_hint = r.bit()?;
        if enable_order_hint {
            r.skip(2)?; // enable_jnt_comp, enable_ref_frame_mvs
        }
        h.seq_force_screen_content_tools = if r.bit()? {
            SELECT_SCREEN_CONTENT_TOOLS
        } else {
            u32::from(r.bit()?)
        };
        h.seq_force_integer_mv = if h.seq_force_screen_content_tools > 0 {
            if r.bit()? {
                SELECT_INTEGER_MV
            } else {
                u32::from(r.bit()?)
            }
        } else {
            SELECT_INTEGER_MV
        };
        if enable_order_hint {
            h.order_hint_bits = r.bits(3)? + 1;
        }
    }
    h.enable_superres = r.bit()?;
    r.skip(2)?; // enable_cdef, enable_restoration
    Ok(h)
}

/// What an intra frame's header says about its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameSize {
    /// `frame_size_override_flag`.
    pub(crate) overridden: bool,
    /// UpscaledWidth × FrameHeight: what is reported.
    pub(crate) size: Resolution,
    /// RenderWidth × RenderHeight (not reported).
    pub(crate) render: Resolution,
}

/// `uncompressed_header()` of an intra frame (key or intra-only) up to `render_size()`; other frames
/// (inter, switch, show-existing) are [`ParseError::NotKeyframe`].
pub(crate) fn parse_frame_size(
    seq: &SequenceHeader,
    temporal_id: u8,
    spatial_id: u8,
    data: &[u8],
) -> Result<FrameSize, ParseError> {
    let mut r = BitReader::new(data);
    let (frame_type, show_frame) = if seq.reduced_still_picture_header {
        (KEY_FRAME, true)
    } else {
        if r.bit()? {
            return Err(ParseError::NotKeyframe); // show_existing_frame
        }
        let frame_type = r.bits(2)?;
        if frame_type != KEY_FRAME && frame_type != INTRA_ONLY_FRAME {
            return Err(ParseError::NotKeyframe);
        }
        let show_frame = r.bit()?;
        if show_frame && seq.decoder_model_info_present && !seq.equal_picture_interval {
            r.skip(seq.frame_presentation_time_length as usize)?; // temporal_point_info()
        }
        if !show_frame {
            r.skip(1)?; // showable_frame
        }
        (frame_type, show_frame)
    };
    let error_resilient = if seq.reduced_still_picture_header
        || frame_type == SWITCH_FRAME
        || (frame_type == KEY_FRAME && show_frame)
    {
        true
    } else {
        r.bit()?
    };
    r.skip(1)?; // disable_cdf_update
    let allow_screen_content_tools =
        if seq.seq_force_screen_content_tools == SELECT_SCREEN_CONTENT_TOOLS {
            r.bit()?
        } else {
            seq.seq_force_screen_content_tools == 1
        };
    if allow_screen_content_tools && seq.seq_force_integer_mv == SELECT_INTEGER_MV {
        r.skip(1)?; // force_integer_mv
    }
    if seq.frame_id_numbers_present {
        r.skip(seq.frame_id_length as usize)?; // current_frame_id
    }
    let frame_size_override = if seq.reduced_still_picture_header {
        false
    } else {
        r.bit()?
    };
    r.skip(seq.order_hint_bits as usize)?; // order_hint
    // FrameIsIntra, so primary_ref_frame is PRIMARY_REF_NONE and not coded.
    if seq.decoder_model_info_present && r.bit()? {
        // buffer_removal_time for each operating point with a decoder model that contains this frame.
        for &(idc, present) in &seq.operating_points {
            if !present {
                continue;
            }
            let in_temporal = (idc >> temporal_id) & 1 == 1;
            let in_spatial = (idc >> (u32::from(spatial_id) + 8)) & 1 == 1;
            if idc == 0 || (in_temporal && in_spatial) {
                r.skip(seq.buffer_removal_time_length as usize)?;
            }
        }
    }
    let all_frames_refreshed = frame_type == KEY_FRAME && show_frame;
    let refresh_frame_flags = if all_frames_refreshed {
        0xff
    } else {
        r.bits(8)?
    };
    if frame_type == INTRA_ONLY_FRAME && refresh_frame_flags == 0xff {
        return Err(ParseError::Invalid(
            "intra_only frame refreshing every frame",
        ));
    }
    if refresh_frame_flags != 0xff && error_resilient && seq.order_hint_bits > 0 {
        r.skip(8 * seq.order_hint_bits as usize)?; // ref_order_hint[i]
    }
    // frame_size()
    let (width, height) = if frame_size_override {
        (
            r.bits(seq.frame_width_bits)? + 1,
            r.bits(seq.frame_height_bits)? + 1,
        )
    } else {
        (seq.max_size.width, seq.max_size.height)
    };
    if width > seq.max_size.width || height > seq.max_size.height {
        return Err(ParseError::Invalid(
            "frame larger than the sequence maximum",
        ));
    }
    // superres_params(): the coded width shrinks, the upscaled width (what is shown) stays `width`.
    if seq.enable_superres && r.bit()? {
        r.skip(3)?; // coded_denom
    }
    // render_size()
    let render = if r.bit()? {
        resolution(r.bits(16)? + 1, r.bits(16)? + 1)?
    } else {
        resolution(width, height)?
    };
    Ok(FrameSize {
        overridden: frame_size_override,
        size: resolution(width, height)?,
        render,
    })
}

/// The AV1 probe.
#[derive(Debug, Default)]
pub(crate) struct Av1Probe {
    /// The last sequence header seen.
    sequence: Option<SequenceHeader>,
    /// A sequence header arrived in this temporal unit and its size is not reported yet.
    pending: bool,
    /// An OBU being reassembled (header bytes included), at most `OBU_CAP` bytes.
    fragment: Vec<u8>,
    /// The sequence number the next fragment must have; `None` when not reassembling.
    fragment_next_seq: Option<u64>,
    /// The fragment is kept only up to the cap; further bytes are dropped.
    last_seq: Option<u64>,
}

impl Av1Probe {
    pub(crate) fn push(&mut self, seq: u64, marker: bool, payload: &[u8]) -> Option<Resolution> {
        let (&head, rest) = payload.split_first()?;
        let agg = aggregation(head);
        let gap = self
            .last_seq
            .is_some_and(|last| last.checked_add(1) != Some(seq));
        self.last_seq = Some(seq);
        let mut found = None;
        if gap || agg.new_sequence {
            // The previous temporal unit ended without its frame header being reached.
            found = self.flush_pending();
            if gap {
                self.drop_fragment();
            }
        }
        let count = elements(rest, agg.count).count();
        for (i, element) in elements(rest, agg.count).enumerate() {
            let first = i == 0;
            let last = i + 1 == count;
            if first && agg.continues {
                if self.fragment_next_seq != Some(seq) {
                    self.drop_fragment();
                    continue;
                }
                let room = OBU_CAP.saturating_sub(self.fragment.len());
                self.fragment
                    .extend_from_slice(element.get(..room.min(element.len())).unwrap_or_default());
                if last && agg.continued && self.fragment.len() < OBU_CAP {
                    self.fragment_next_seq = seq.checked_add(1);
                } else {
                    let bytes = std::mem::take(&mut self.fragment);
                    found = self.obu(&bytes).or(found);
                    self.fragment = bytes;
                    self.drop_fragment();
                }
                continue;
            }
            if first && self.fragment_next_seq.is_some() {
                self.drop_fragment(); // Z=0: the fragment we held was never finished
            }
            if last && agg.continued {
                let wanted = element.first().is_some_and(|&h| {
                    let kind = obu_type(h);
                    kind == OBU_SEQUENCE_HEADER
                        || (self.pending && (kind == OBU_FRAME || kind == OBU_FRAME_HEADER))
                });
                if wanted {
                    self.fragment.clear();
                    self.fragment.extend_from_slice(
                        element
                            .get(..OBU_CAP.min(element.len()))
                            .unwrap_or_default(),
                    );
                    if self.fragment.len() < OBU_CAP {
                        self.fragment_next_seq = seq.checked_add(1);
                    } else {
                        let bytes = std::mem::take(&mut self.fragment);
                        found = self.obu(&bytes).or(found);
                        self.fragment = bytes;
                        self.drop_fragment();
                    }
                }
                continue;
            }
            found = self.obu(element).or(found);
        }
        if marker && self.fragment_next_seq.is_none() {
            found = self.flush_pending().or(found);
        }
        found
    }

    /// Handles one whole (or capped) OBU.
    fn obu(&mut self, bytes: &[u8]) -> Option<Resolution> {
        let obu = split_obu(bytes).ok()?;
        match obu.kind {
            OBU_SEQUENCE_HEADER => {
                let header = parse_sequence_header(obu.payload).ok()?;
                self.sequence = Some(header);
                self.pending = true;
                None
            }
            OBU_FRAME | OBU_FRAME_HEADER if self.pending => {
                self.pending = false;
                let seq = self.sequence.as_ref()?;
                match parse_frame_size(seq, obu.temporal_id, obu.spatial_id, obu.payload) {
                    Ok(f) => Some(f.size),
                    Err(_) => Some(seq.max_size),
                }
            }
            _ => None,
        }
    }

    fn flush_pending(&mut self) -> Option<Resolution> {
        if !self.pending {
            return None;
        }
        self.pending = false;
        self.sequence.as_ref().map(|s| s.max_size)
    }

    fn drop_fragment(&mut self) {
        self.fragment.clear();
        self.fragment_next_seq = None;
        if self.fragment.capacity() > OBU_CAP {
            self.fragment.shrink_to(OBU_CAP);
        }
    }
}
