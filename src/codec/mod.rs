//! Video resolution measured from the bitstream.
//!
//! The SFU forwards each published video layer's RTP payloads untouched; billing charges by the pixels a
//! subscriber receives, so the server measures each layer's size itself from the keyframe headers in
//! those payloads and never trusts what a client claims (SDP, VP9 scalability structure, AV1 render size).
//!
//! Place in the flow: `sfu` calls [`is_keyframe_start`] on every packet (to switch a subscriber between
//! layers) and feeds every payload of a layer to that layer's [`ResolutionProbe`]; the sizes go to the
//! layer's `track_resolution` event and, through the forwarding events, to the billing meter.
//!
//! Invariants:
//! - Nothing here panics on any input: every read is bounds-checked ([`bits::BitReader`], `get`), every
//!   size is computed with checked arithmetic, and a malformed header gives no resolution, never a wrong
//!   one from half-read fields.
//! - The per-packet path (a packet that does not start a keyframe) reads a few descriptor bytes and
//!   allocates nothing. Only H.264 (an SPS fragmented with FU-A) and AV1 (a sequence header or frame
//!   header fragmented across packets) buffer bytes, each in one capped buffer per probe that is dropped
//!   on a sequence-number gap.
//! - A probe is pure: no clock, no IO. It depends only on the payloads, sequence numbers and marker bits
//!   it is fed, in order.

mod av1;
pub(crate) mod bits;
mod h264;
mod vp8;
mod vp9;

#[cfg(test)]
mod tests;

pub use vp8::Vp8Scaling;

/// A video codec whose payloads the SFU can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// VP8 (RFC 6386), RTP payload format RFC 7741.
    Vp8,
    /// VP9, RTP payload format RFC 9628.
    Vp9,
    /// H.264 (ITU-T H.264), RTP payload format RFC 6184.
    H264,
    /// AV1, RTP payload format of the AOM "RTP Payload Format For AV1".
    Av1,
}

impl VideoCodec {
    /// The codec for an SDP/WebRTC MIME type such as `video/VP8`; case-insensitive. `None` for audio and
    /// for video codecs the SFU cannot measure.
    pub fn from_mime(mime: &str) -> Option<Self> {
        const TABLE: [(&str, VideoCodec); 4] = [
            ("video/vp8", VideoCodec::Vp8),
            ("video/vp9", VideoCodec::Vp9),
            ("video/h264", VideoCodec::H264),
            ("video/av1", VideoCodec::Av1),
        ];
        TABLE
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(mime.trim()))
            .map(|&(_, codec)| codec)
    }
}

/// A decoded picture size in pixels, as the bitstream gives it (H.264: after the SPS frame cropping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Resolution {
    /// `width × height`, the quantity billing sums.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// Why a header could not be read. Internal: the public API answers `Option`, and tests assert these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// The header ends before a field it needs.
    #[error("truncated header")]
    Truncated,
    /// A field has a value the specification forbids (or a size that cannot be real).
    #[error("invalid header: {0}")]
    Invalid(&'static str),
    /// The payload is well-formed but is not what this parser reads (e.g. an inter frame).
    #[error("not a keyframe header")]
    NotKeyframe,
}

/// Largest width or height accepted from any bitstream: larger values are treated as corrupt. AV1 and VP9
/// headers can code up to 65536, H.264 SPS far more; no real encoder sends more than 16K.
pub(crate) const MAX_DIMENSION: u32 = 16_384;

/// A checked resolution: both sides in `1..=MAX_DIMENSION`.
pub(crate) fn resolution(width: u32, height: u32) -> Result<Resolution, ParseError> {
    if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
        return Err(ParseError::Invalid("picture size out of range"));
    }
    Ok(Resolution { width, height })
}

/// Cheap check on one RTP payload (descriptor bytes only, no allocation): does this packet start a
/// keyframe (a decoder can start here; an SFU may switch a subscriber to this layer here)?
///
/// Per codec: VP8, the first packet of a frame (S=1, PID=0) whose frame tag says key frame. VP9, the
/// first packet of a picture's base spatial layer (B=1, P=0, SID=0) whose uncompressed header says
/// `KEY_FRAME` (the header's first byte is read as well, since some packetizers leave P at 0 on every
/// frame). H.264, a packet carrying an SPS or the start of an IDR slice (single NAL, STAP-A, or the first
/// FU-A fragment). AV1, N=1 (a new coded video sequence) or a sequence header OBU in the packet.
pub fn is_keyframe_start(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => vp8::is_keyframe_start(payload),
        VideoCodec::Vp9 => vp9::is_keyframe_start(payload),
        VideoCodec::H264 => h264::is_keyframe_start(payload),
        VideoCodec::Av1 => av1::is_keyframe_start(payload),
    }
}

/// One per published layer. Fed every RTP payload of that layer (header stripped, padding removed) in
/// arrival order with its extended sequence number and marker bit.
#[derive(Debug)]
pub struct ResolutionProbe {
    state: ProbeState,
}

#[derive(Debug)]
enum ProbeState {
    Vp8(vp8::Vp8Probe),
    Vp9(vp9::Vp9Probe),
    H264(h264::H264Probe),
    Av1(av1::Av1Probe),
}

impl ResolutionProbe {
    /// A probe for one layer of `codec`.
    pub fn new(codec: VideoCodec) -> Self {
        let state = match codec {
            VideoCodec::Vp8 => ProbeState::Vp8(vp8::Vp8Probe::default()),
            VideoCodec::Vp9 => ProbeState::Vp9(vp9::Vp9Probe),
            VideoCodec::H264 => ProbeState::H264(h264::H264Probe::default()),
            VideoCodec::Av1 => ProbeState::Av1(av1::Av1Probe::default()),
        };
        Self { state }
    }

    /// The codec this probe reads.
    pub fn codec(&self) -> VideoCodec {
        match self.state {
            ProbeState::Vp8(_) => VideoCodec::Vp8,
            ProbeState::Vp9(_) => VideoCodec::Vp9,
            ProbeState::H264(_) => VideoCodec::H264,
            ProbeState::Av1(_) => VideoCodec::Av1,
        }
    }

    /// Returns Some(resolution) each time a keyframe (or VP9 intra-only frame) header gives one — on every
    /// keyframe, not only on change (the caller compares). None otherwise.
    ///
    /// Where the size comes from: VP8, the 14-bit width/height of the key frame header (the scaling bits
    /// are in [`ResolutionProbe::vp8_scaling`]). VP9, `frame_size()` of a key or intra-only frame's
    /// uncompressed header. H.264, every SPS (single NAL, STAP-A, or reassembled from FU-A), after frame
    /// cropping. AV1, a sequence header's maximum frame size, unless the frame header that follows it in
    /// the same temporal unit is reachable and is an intra frame, whose `frame_size()` (including
    /// `frame_size_override_flag` and the superres upscaled width) is then reported instead.
    pub fn push(&mut self, seq: u64, marker: bool, payload: &[u8]) -> Option<Resolution> {
        match &mut self.state {
            ProbeState::Vp8(p) => p.push(payload),
            ProbeState::Vp9(p) => p.push(payload),
            ProbeState::H264(p) => p.push(seq, payload),
            ProbeState::Av1(p) => p.push(seq, marker, payload),
        }
    }

    /// VP8 only: the horizontal and vertical scaling modes (RFC 6386 9.2) of the last key frame measured.
    /// They ask the receiver to upscale on display; billing counts the coded size, not this.
    pub fn vp8_scaling(&self) -> Option<Vp8Scaling> {
        match &self.state {
            ProbeState::Vp8(p) => p.scaling,
            _ => None,
        }
    }
}
