//! Each codec's keyframe test and resolution probe over a sequence of RTP payloads: the first byte
//! picks the codec, then each packet is a marker bit and a 15-bit length followed by its payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::codec::{ResolutionProbe, VideoCodec, is_keyframe_start};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let codec = match pick % 4 {
        0 => VideoCodec::Vp8,
        1 => VideoCodec::Vp9,
        2 => VideoCodec::H264,
        _ => VideoCodec::Av1,
    };
    let mut probe = ResolutionProbe::new(codec);
    let mut seq = u64::from(pick) << 8;
    while rest.len() >= 2 {
        let head = u16::from_be_bytes([rest[0], rest[1]]);
        let marker = head & 0x8000 != 0;
        let len = usize::from(head & 0x7fff).min(rest.len() - 2);
        let payload = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let _ = is_keyframe_start(codec, payload);
        if let Some(r) = probe.push(seq, marker, payload) {
            // A measured resolution is never zero-sized.
            assert!(r.pixels() > 0, "{r:?}");
        }
        // Sequence gaps and reordering are part of what the network does.
        seq = seq.wrapping_add(u64::from(head & 3) + 1);
    }
    let _ = probe.vp8_scaling();
});
