// TEMPORARY: replaced by branch codec
//! Minimal stand-in for the codec module (VP8 only) so the SFU compiles until branch `codec` lands.

/// A video codec the SFU forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// VP8.
    Vp8,
    /// VP9.
    Vp9,
    /// H.264.
    H264,
    /// AV1.
    Av1,
}

impl VideoCodec {
    /// The codec named by a MIME type such as `video/VP8` (case-insensitive).
    pub fn from_mime(mime: &str) -> Option<Self> {
        let sub = mime.rsplit('/').next()?.to_ascii_lowercase();
        match sub.as_str() {
            "vp8" => Some(Self::Vp8),
            "vp9" => Some(Self::Vp9),
            "h264" => Some(Self::H264),
            "av1" => Some(Self::Av1),
            _ => None,
        }
    }
}

/// A picture size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// VP8 payload descriptor length, or None when truncated.
fn vp8_descriptor_len(p: &[u8]) -> Option<usize> {
    let first = *p.first()?;
    let mut i = 1;
    if first & 0x80 != 0 {
        let x = *p.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            let pid = *p.get(i)?;
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    (i < p.len()).then_some(i)
}

/// Whether this RTP payload starts a keyframe.
pub fn is_keyframe_start(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => {
            let Some(first) = payload.first() else {
                return false;
            };
            if first & 0x10 == 0 || first & 0x07 != 0 {
                return false;
            }
            vp8_descriptor_len(payload)
                .and_then(|i| payload.get(i))
                .is_some_and(|b| b & 0x01 == 0)
        }
        _ => false,
    }
}

/// Measures a published layer's resolution from its keyframes.
#[derive(Debug)]
pub struct ResolutionProbe {
    codec: VideoCodec,
}

impl ResolutionProbe {
    /// A probe for one layer.
    pub fn new(codec: VideoCodec) -> Self {
        Self { codec }
    }

    /// Feeds one packet; `Some` on every keyframe whose size could be read.
    pub fn push(&mut self, _seq: u64, _marker: bool, payload: &[u8]) -> Option<Resolution> {
        if self.codec != VideoCodec::Vp8 || !is_keyframe_start(self.codec, payload) {
            return None;
        }
        let i = vp8_descriptor_len(payload)?;
        let h = payload.get(i..i + 10)?;
        if h.get(3..6)? != [0x9d, 0x01, 0x2a] {
            return None;
        }
        let w = u16::from_le_bytes([*h.get(6)?, *h.get(7)?]) & 0x3fff;
        let ht = u16::from_le_bytes([*h.get(8)?, *h.get(9)?]) & 0x3fff;
        Some(Resolution {
            width: u32::from(w),
            height: u32::from(ht),
        })
    }
}
