//! Per-packet cost of the codec probes: `is_keyframe_start` and `ResolutionProbe::push` on a keyframe's
//! first packet (header parsed) and on an inter frame's first packet (the per-packet fast path), for
//! each codec, on real fixtures packetized by the `rtc` crate's payloaders.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use rtc_rtp::codec::av1::Av1Payloader;
use rtc_rtp::codec::h264::H264Payloader;
use rtc_rtp::codec::vp8::Vp8Payloader;
use rtc_rtp::codec::vp9::Vp9Payloader;
use rtc_rtp::packetizer::Payloader;
use switchboard::codec::{ResolutionProbe, VideoCodec, is_keyframe_start};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/codec")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// IVF frames: 32-byte file header, then (u32 LE size, u64 pts, data) per frame.
fn ivf_frames(data: &[u8]) -> Vec<Vec<u8>> {
    let mut pos = 32;
    let mut out = Vec::new();
    while pos + 12 <= data.len() {
        let size =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        out.push(data[pos + 12..pos + 12 + size].to_vec());
        pos += 12 + size;
    }
    out
}

/// Access units of an Annex B stream, split before each slice with first_mb_in_slice = 0 that follows
/// another slice (enough for these single-slice fixtures).
fn annexb_access_units(data: &[u8]) -> Vec<Vec<u8>> {
    let mut units: Vec<Vec<u8>> = vec![Vec::new()];
    let mut seen_slice = false;
    let mut i = 0;
    let mut starts = Vec::new();
    while i + 3 <= data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
        let nal = &data[s..end];
        let t = nal[0] & 0x1f;
        if seen_slice && matches!(t, 1 | 5) {
            units.push(Vec::new());
        }
        seen_slice |= matches!(t, 1 | 5);
        let unit = units.last_mut().expect("unit");
        unit.extend([0, 0, 0, 1]);
        unit.extend_from_slice(nal);
    }
    units
}

/// (keyframe first packet, inter frame first packet).
fn packets(frames: &[Vec<u8>], mut p: impl Payloader) -> (Vec<u8>, Vec<u8>) {
    let mut firsts = frames.iter().map(|f| {
        p.payload(1200, &Bytes::copy_from_slice(f))
            .expect("payload")[0]
            .to_vec()
    });
    let key = firsts.next().expect("keyframe");
    let inter = firsts.next().expect("inter frame");
    (key, inter)
}

fn bench(c: &mut Criterion) {
    let cases = [
        (
            VideoCodec::Vp8,
            "vp8",
            packets(
                &ivf_frames(&fixture("vp8_1280x720.ivf")),
                Vp8Payloader::default(),
            ),
        ),
        (
            VideoCodec::Vp9,
            "vp9",
            packets(
                &ivf_frames(&fixture("vp9_p0_1280x720.ivf")),
                Vp9Payloader::default(),
            ),
        ),
        (VideoCodec::H264, "h264", {
            let units = annexb_access_units(&fixture("h264_high_1280x720.h264"));
            packets(&units, H264Payloader::default())
        }),
        (
            VideoCodec::Av1,
            "av1",
            packets(
                &ivf_frames(&fixture("av1_1280x720.ivf")),
                Av1Payloader::default(),
            ),
        ),
    ];
    let mut g = c.benchmark_group("codec");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    for (codec, name, (key, inter)) in &cases {
        assert!(is_keyframe_start(*codec, key), "{name}: keyframe packet");
        assert!(!is_keyframe_start(*codec, inter), "{name}: inter packet");
        g.bench_function(format!("{name}/is_keyframe_start/keyframe"), |b| {
            b.iter(|| is_keyframe_start(*codec, black_box(key)))
        });
        g.bench_function(format!("{name}/is_keyframe_start/inter"), |b| {
            b.iter(|| is_keyframe_start(*codec, black_box(inter)))
        });
        let mut probe = ResolutionProbe::new(*codec);
        let mut seq = 0u64;
        g.bench_function(format!("{name}/push/keyframe"), |b| {
            b.iter(|| {
                seq += 1;
                probe.push(seq, true, black_box(key))
            })
        });
        g.bench_function(format!("{name}/push/inter"), |b| {
            b.iter(|| {
                seq += 1;
                probe.push(seq, false, black_box(inter))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
