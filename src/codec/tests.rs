//! Tests of the codec probes: real-encoder fixtures packetized as WebRTC senders do (the `rtc` crate's
//! payloaders, plus small RFC-following packetizers here for the descriptor variants and packetization
//! modes that payloader does not produce), hand-built headers for fields the fixtures do not exercise,
//! and property tests that nothing panics.

mod fixtures;
mod headers;
mod robustness;

use super::*;

#[test]
fn codecs_are_named_by_their_mime_type_in_any_case() {
    assert_eq!(VideoCodec::from_mime("video/VP8"), Some(VideoCodec::Vp8));
    assert_eq!(VideoCodec::from_mime("video/vp9"), Some(VideoCodec::Vp9));
    assert_eq!(VideoCodec::from_mime("VIDEO/H264"), Some(VideoCodec::H264));
    assert_eq!(VideoCodec::from_mime("video/AV1"), Some(VideoCodec::Av1));
    assert_eq!(VideoCodec::from_mime("audio/opus"), None);
    assert_eq!(VideoCodec::from_mime("video/H265"), None);
    assert_eq!(VideoCodec::from_mime("video/VP8X"), None);
}

#[test]
fn pixels_multiply_without_overflow() {
    let r = Resolution {
        width: u32::MAX,
        height: u32::MAX,
    };
    assert_eq!(r.pixels(), u64::from(u32::MAX) * u64::from(u32::MAX));
    assert_eq!(
        Resolution {
            width: 1920,
            height: 1080
        }
        .pixels(),
        2_073_600
    );
}

#[test]
fn a_probe_knows_its_codec() {
    for c in [
        VideoCodec::Vp8,
        VideoCodec::Vp9,
        VideoCodec::H264,
        VideoCodec::Av1,
    ] {
        assert_eq!(ResolutionProbe::new(c).codec(), c);
    }
}
