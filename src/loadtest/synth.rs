//! Synthetic media for the load generator: VP8 frames packetized as RFC 7741 payloads, and
//! Opus-sized audio packets. Pure: no clock, no IO; the caller says when a frame is due.
//!
//! What makes it look like a real encoder's output to an SFU:
//!
//! - Every VP8 packet starts with the descriptor a browser sends without temporal layers:
//!   X=1, S on a frame's first packet, PID=0; I=1 with a 15-bit picture ID that counts frames.
//! - A frame's first packet carries the RFC 6386 frame tag (key or inter, show_frame=1, the
//!   first partition size); a keyframe's also carries the start code `9d 01 2a` and the 14-bit
//!   width and height, so the server measures (and bills) the chosen resolution.
//! - Frame sizes follow the target bitrate: a keyframe every [`KEYFRAME_INTERVAL`] (or on
//!   request), [`KEYFRAME_RATIO`] times the size of an average inter frame, inter frames within
//!   ±20 % of their average. A frame is split into equal packets of at most
//!   [`MAX_PAYLOAD`] bytes; the marker bit is set on the last.
//! - Opus packets every 20 ms of 80 to 160 bytes (a TOC byte for 20 ms CELT fullband), with an
//!   audio level that alternates between speech (-30 dBov) and silence (-127) every few seconds.
//!
//! Every payload ends with a [`STAMP_LEN`]-byte stamp the generator fills just before sending:
//! a magic, a 32-bit generator sequence number and the send time in nanoseconds. The receiver
//! reads it back from the end of the decrypted payload to measure forwarding latency. The bytes
//! between the headers and the stamp are filler.

use std::time::Duration;

/// Largest RTP payload produced (descriptor and stamp included).
pub const MAX_PAYLOAD: usize = 1200;
/// Keyframe period.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(2500);
/// Size of a keyframe relative to an average inter frame.
pub const KEYFRAME_RATIO: usize = 6;
/// Bytes of the latency stamp at the end of every payload.
pub const STAMP_LEN: usize = 16;
/// The stamp's magic (b"SBLT").
pub const STAMP_MAGIC: u32 = 0x5342_4c54;
/// VP8 payload descriptor length: X, I with a 15-bit picture ID.
const DESCRIPTOR_LEN: usize = 4;
/// Audio packet period.
pub const AUDIO_PTIME: Duration = Duration::from_millis(20);

/// Why a `--video` spec could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not of the form `WxH@FPS:BITRATE`.
    #[error("invalid video spec {0:?}: expected e.g. 1280x720@30:1500k")]
    Format(String),
    /// A number out of range.
    #[error(
        "video spec {0:?} out of range: width and height 16..=16383, fps 1..=120, bitrate 10k..=50M"
    )]
    Range(String),
}

/// A video layer to synthesize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VideoSpec {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Target bitrate, bits per second.
    pub bitrate: u64,
}

impl VideoSpec {
    /// Parses `1280x720@30:1500k` (bitrate suffix `k` or `M`, or plain bits per second).
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Format(s.to_owned());
        let (dims, rest) = s.trim().split_once('@').ok_or_else(bad)?;
        let (w, h) = dims.split_once('x').ok_or_else(bad)?;
        let (fps, rate) = rest.split_once(':').ok_or_else(bad)?;
        let (num, mult) = if let Some(n) = rate.strip_suffix(['k', 'K']) {
            (n, 1_000)
        } else if let Some(n) = rate.strip_suffix('M') {
            (n, 1_000_000)
        } else {
            (rate, 1)
        };
        let width: u32 = w.parse().map_err(|_| bad())?;
        let height: u32 = h.parse().map_err(|_| bad())?;
        let fps: u32 = fps.parse().map_err(|_| bad())?;
        let bitrate = num
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(mult)
            .ok_or_else(bad)?;
        let spec = Self {
            width,
            height,
            fps,
            bitrate,
        };
        let ok = (16..=16383).contains(&width)
            && (16..=16383).contains(&height)
            && (1..=120).contains(&fps)
            && (10_000..=50_000_000).contains(&bitrate);
        if ok {
            Ok(spec)
        } else {
            Err(SpecError::Range(s.to_owned()))
        }
    }

    /// The simulcast ladder a browser would send for this top layer: quarter, half and full
    /// resolution at 1/8, 1/4 and 5/8 of the bitrate (lowest first), like Chrome's defaults.
    pub fn simulcast_ladder(&self) -> [VideoSpec; 3] {
        let scaled = |div: u32, num: u64, den: u64| VideoSpec {
            width: (self.width / div).max(16),
            height: (self.height / div).max(16),
            fps: self.fps,
            bitrate: (self.bitrate * num / den).max(10_000),
        };
        [scaled(4, 1, 8), scaled(2, 1, 4), scaled(1, 5, 8)]
    }

    /// Time between frames.
    pub fn frame_interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.fps.max(1)))
    }

    /// Frames between periodic keyframes.
    pub fn keyframe_every(&self) -> u64 {
        (KEYFRAME_INTERVAL.as_millis() as u64 * u64::from(self.fps) / 1000).max(1)
    }

    /// Average inter frame size in bytes so that one keyframe period carries the bitrate.
    pub fn inter_frame_bytes(&self) -> usize {
        let k = self.keyframe_every();
        let period_bytes = self.bitrate / 8 * k / u64::from(self.fps.max(1));
        let units = k + KEYFRAME_RATIO as u64 - 1;
        (period_bytes / units).max(64) as usize
    }
}

/// One RTP packet's worth of synthetic media.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthPacket {
    /// The RTP payload, with room for the stamp at its end.
    pub payload: Vec<u8>,
    /// Marker bit.
    pub marker: bool,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Audio level in -dBov (audio only).
    pub audio_level: Option<u8>,
    /// Whether this packet belongs to a keyframe.
    pub keyframe: bool,
}

/// A small deterministic PRNG (xorshift64*), so runs are repeatable and cheap.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded (0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// A VP8 "encoder": frame sizes and packetization for one layer.
#[derive(Debug, Clone)]
pub struct Vp8Source {
    spec: VideoSpec,
    picture_id: u16,
    frame: u64,
    since_key: u64,
    key_requested: bool,
    rng: Rng,
}

impl Vp8Source {
    /// A source for one layer; the first frame is a keyframe.
    pub fn new(spec: VideoSpec, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        Self {
            spec,
            picture_id: (rng.next_u64() & 0x7fff) as u16,
            frame: 0,
            since_key: 0,
            key_requested: true,
            rng,
        }
    }

    /// The layer's spec.
    pub fn spec(&self) -> VideoSpec {
        self.spec
    }

    /// Asks for a keyframe as the next frame (a PLI or FIR arrived).
    pub fn request_keyframe(&mut self) {
        self.key_requested = true;
    }

    /// Frames produced so far.
    pub fn frames(&self) -> u64 {
        self.frame
    }

    /// Produces the next frame's packets into `out` (cleared first).
    pub fn next_frame(&mut self, out: &mut Vec<SynthPacket>) {
        out.clear();
        let key = self.key_requested || self.since_key >= self.spec.keyframe_every();
        let avg = self.spec.inter_frame_bytes();
        let size = if key {
            avg * KEYFRAME_RATIO
        } else {
            self.rng.range(avg * 4 / 5, avg * 6 / 5)
        };
        if key {
            self.key_requested = false;
            self.since_key = 1;
        } else {
            self.since_key += 1;
        }
        let timestamp = (self.frame.wrapping_mul(90_000) / u64::from(self.spec.fps.max(1))) as u32;
        let per_packet = MAX_PAYLOAD - DESCRIPTOR_LEN - STAMP_LEN;
        let count = size.div_ceil(per_packet).max(1);
        let chunk = size.div_ceil(count);
        let mut left = size;
        for i in 0..count {
            let body = chunk.min(left).max(if i == 0 { 10 } else { 1 });
            left = left.saturating_sub(body);
            let mut p = Vec::with_capacity(DESCRIPTOR_LEN + body + STAMP_LEN);
            let s_bit = if i == 0 { 0x10 } else { 0x00 };
            p.push(0x80 | s_bit);
            p.push(0x80);
            p.extend_from_slice(&(0x8000 | self.picture_id).to_be_bytes());
            if i == 0 {
                // Frame tag: bit 0 = inter frame, bits 1-3 version 0, bit 4 show_frame, bits
                // 5-23 the first partition's size (here: a tenth of the frame).
                let first_part = (size / 10).min(0x7ffff) as u32;
                let tag = u32::from(!key) | (1 << 4) | (first_part << 5);
                p.extend_from_slice(&tag.to_le_bytes()[..3]);
                if key {
                    p.extend_from_slice(&[0x9d, 0x01, 0x2a]);
                    p.extend_from_slice(&((self.spec.width & 0x3fff) as u16).to_le_bytes());
                    p.extend_from_slice(&((self.spec.height & 0x3fff) as u16).to_le_bytes());
                }
            }
            let fill = DESCRIPTOR_LEN + body;
            let seed = self.rng.next_u64().to_le_bytes();
            let mut k = 0;
            while p.len() < fill {
                p.push(seed[k % 8] ^ (k as u8));
                k += 1;
            }
            p.extend_from_slice(&[0; STAMP_LEN]);
            out.push(SynthPacket {
                payload: p,
                marker: i + 1 == count,
                timestamp,
                audio_level: None,
                keyframe: key,
            });
        }
        self.frame += 1;
        self.picture_id = (self.picture_id + 1) & 0x7fff;
    }
}

/// An Opus-sized audio source: one packet per [`AUDIO_PTIME`].
#[derive(Debug, Clone)]
pub struct OpusSource {
    packet: u64,
    rng: Rng,
}

impl OpusSource {
    /// A new source.
    pub fn new(seed: u64) -> Self {
        Self {
            packet: 0,
            rng: Rng::new(seed),
        }
    }

    /// The next 20 ms packet.
    pub fn next_packet(&mut self) -> SynthPacket {
        // Talk for 3 s, then 2 s of silence, per participant phase.
        let phase = (self.packet / 50) % 5;
        let speaking = phase < 3;
        let len = if speaking {
            self.rng.range(120, 160)
        } else {
            self.rng.range(80, 100)
        };
        let mut p = Vec::with_capacity(len);
        // TOC: config 31 (CELT FB 20 ms), mono, one frame.
        p.push(0xf8);
        while p.len() < len - STAMP_LEN {
            p.push((self.rng.next_u64() & 0xff) as u8);
        }
        p.extend_from_slice(&[0; STAMP_LEN]);
        let timestamp = (self.packet.wrapping_mul(960)) as u32;
        self.packet += 1;
        SynthPacket {
            payload: p,
            marker: false,
            timestamp,
            audio_level: Some(if speaking { 30 } else { 127 }),
            keyframe: false,
        }
    }
}

/// Writes the latency stamp into the last [`STAMP_LEN`] bytes of `payload`.
pub fn stamp(payload: &mut [u8], seq: u32, send_ns: u64) {
    let n = payload.len();
    if let Some(tail) = payload.get_mut(n.saturating_sub(STAMP_LEN)..)
        && tail.len() == STAMP_LEN
    {
        tail[..4].copy_from_slice(&STAMP_MAGIC.to_be_bytes());
        tail[4..8].copy_from_slice(&seq.to_be_bytes());
        tail[8..].copy_from_slice(&send_ns.to_be_bytes());
    }
}

/// Reads a stamp from the end of a payload: (generator sequence, send time ns).
pub fn read_stamp(payload: &[u8]) -> Option<(u32, u64)> {
    let tail = payload.get(payload.len().checked_sub(STAMP_LEN)?..)?;
    let magic = u32::from_be_bytes(tail.get(..4)?.try_into().ok()?);
    if magic != STAMP_MAGIC {
        return None;
    }
    let seq = u32::from_be_bytes(tail.get(4..8)?.try_into().ok()?);
    let ns = u64::from_be_bytes(tail.get(8..16)?.try_into().ok()?);
    Some((seq, ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Resolution, ResolutionProbe, VideoCodec, is_keyframe_start};

    fn hd() -> VideoSpec {
        VideoSpec::parse("1280x720@30:1500k").unwrap()
    }

    #[test]
    fn parses_video_specs() {
        assert_eq!(
            hd(),
            VideoSpec {
                width: 1280,
                height: 720,
                fps: 30,
                bitrate: 1_500_000
            }
        );
        assert_eq!(
            VideoSpec::parse("640x360@15:2M").unwrap().bitrate,
            2_000_000
        );
        assert_eq!(VideoSpec::parse("320x180@10:300000").unwrap().fps, 10);
        for bad in ["", "1280x720", "1280x720@30", "axb@1:1k", "1280*720@30:1k"] {
            assert!(
                matches!(VideoSpec::parse(bad), Err(SpecError::Format(_))),
                "{bad}"
            );
        }
        for out in [
            "8x8@30:1M",
            "1280x720@0:1M",
            "1280x720@30:1k",
            "20000x720@30:1M",
        ] {
            assert!(
                matches!(VideoSpec::parse(out), Err(SpecError::Range(_))),
                "{out}"
            );
        }
    }

    #[test]
    fn the_servers_probe_measures_the_chosen_resolution() {
        for spec in [hd(), VideoSpec::parse("1920x1080@30:3M").unwrap()] {
            let mut src = Vp8Source::new(spec, 7);
            let mut probe = ResolutionProbe::new(VideoCodec::Vp8);
            let mut out = Vec::new();
            let mut measured = None;
            let mut seq = 0u64;
            for _ in 0..3 {
                src.next_frame(&mut out);
                for p in &out {
                    if let Some(r) = probe.push(seq, p.marker, &p.payload) {
                        measured = Some(r);
                    }
                    seq += 1;
                }
            }
            assert_eq!(
                measured,
                Some(Resolution {
                    width: spec.width,
                    height: spec.height
                })
            );
        }
    }

    #[test]
    fn frames_are_packetized_like_an_encoders() {
        let spec = hd();
        let mut src = Vp8Source::new(spec, 1);
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut keyframes = 0;
        let secs = 10u64;
        let frames = secs * u64::from(spec.fps);
        for f in 0..frames {
            src.next_frame(&mut out);
            assert!(!out.is_empty());
            let key = out[0].keyframe;
            // Only the first packet of a keyframe is a keyframe start for the SFU.
            assert_eq!(
                is_keyframe_start(VideoCodec::Vp8, &out[0].payload),
                key,
                "frame {f}"
            );
            for (i, p) in out.iter().enumerate() {
                assert!(p.payload.len() <= MAX_PAYLOAD);
                assert_eq!(
                    p.marker,
                    i + 1 == out.len(),
                    "marker only on the last packet"
                );
                assert_eq!(
                    p.payload[0] & 0x10 != 0,
                    i == 0,
                    "S bit on the first packet"
                );
                assert_eq!(p.timestamp, out[0].timestamp);
                if i > 0 {
                    assert!(!is_keyframe_start(VideoCodec::Vp8, &p.payload));
                }
                total += p.payload.len();
            }
            if key {
                keyframes += 1;
                assert!(out.len() > 1, "a 720p keyframe spans several packets");
            }
        }
        // A keyframe at start, then every 2.5 s.
        assert_eq!(keyframes, (secs * 1000 / 2500) as usize);
        // The bitrate is met within 10 % (headers and stamps included).
        let bps = total as f64 * 8.0 / secs as f64;
        assert!((bps / spec.bitrate as f64 - 1.0).abs() < 0.1, "{bps} bit/s");
    }

    #[test]
    fn keyframes_are_several_times_larger_and_come_on_request() {
        let mut src = Vp8Source::new(hd(), 3);
        let mut out = Vec::new();
        src.next_frame(&mut out);
        let key: usize = out.iter().map(|p| p.payload.len()).sum();
        src.next_frame(&mut out);
        let inter: usize = out.iter().map(|p| p.payload.len()).sum();
        assert!(!out[0].keyframe);
        assert!(key > 4 * inter, "key {key} inter {inter}");
        src.request_keyframe();
        src.next_frame(&mut out);
        assert!(out[0].keyframe);
        src.next_frame(&mut out);
        assert!(!out[0].keyframe);
    }

    #[test]
    fn picture_ids_count_frames_and_wrap_at_15_bits() {
        let mut src = Vp8Source::new(hd(), 5);
        src.picture_id = 0x7ffe;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..3 {
            src.next_frame(&mut out);
            for p in &out {
                let id = u16::from_be_bytes([p.payload[2], p.payload[3]]);
                assert!(id & 0x8000 != 0, "M bit: 15-bit picture ID");
                ids.push(id & 0x7fff);
            }
        }
        assert_eq!(ids.first(), Some(&0x7ffe));
        assert_eq!(ids.last(), Some(&0x0000));
    }

    #[test]
    fn audio_packets_are_opus_sized_with_levels() {
        let mut src = OpusSource::new(9);
        let mut levels = std::collections::BTreeSet::new();
        for i in 0..500u32 {
            let p = src.next_packet();
            assert!((80..=160).contains(&p.payload.len()), "{}", p.payload.len());
            assert_eq!(p.timestamp, i * 960);
            levels.insert(p.audio_level);
        }
        assert_eq!(
            levels.into_iter().collect::<Vec<_>>(),
            vec![Some(30), Some(127)]
        );
    }

    #[test]
    fn stamps_round_trip_and_reject_foreign_payloads() {
        let mut src = Vp8Source::new(hd(), 2);
        let mut out = Vec::new();
        src.next_frame(&mut out);
        let p = &mut out[0].payload;
        assert_eq!(read_stamp(p), None, "zeroed until stamped");
        stamp(p, 42, 1_234_567_890_123);
        assert_eq!(read_stamp(p), Some((42, 1_234_567_890_123)));
        // The stamp does not disturb the headers the SFU reads.
        assert!(is_keyframe_start(VideoCodec::Vp8, p));
        assert_eq!(read_stamp(&[1, 2, 3]), None);
        let mut short = [0u8; 4];
        stamp(&mut short, 1, 1);
        assert_eq!(short, [0; 4]);
    }

    #[test]
    fn simulcast_ladder_is_lowest_first() {
        let l = hd().simulcast_ladder();
        assert_eq!((l[0].width, l[0].height), (320, 180));
        assert_eq!((l[1].width, l[1].height), (640, 360));
        assert_eq!((l[2].width, l[2].height), (1280, 720));
        assert!(l[0].bitrate < l[1].bitrate && l[1].bitrate < l[2].bitrate);
    }
}
