//! Real-encoder fixtures (made by `scripts/make-codec-fixtures`) packetized into RTP payloads and
//! measured. Each fixture's expected display size is in its file name.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rtc_rtp::codec::av1::Av1Payloader;
use rtc_rtp::codec::h264::H264Payloader;
use rtc_rtp::codec::vp8::Vp8Payloader;
use rtc_rtp::codec::vp9::Vp9Payloader;
use rtc_rtp::packetizer::Payloader;

use crate::codec::{Resolution, ResolutionProbe, VideoCodec, is_keyframe_start};

/// One RTP payload with what the probe is fed besides it.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub(crate) seq: u64,
    pub(crate) marker: bool,
    pub(crate) payload: Vec<u8>,
    /// Index of the encoded frame (access unit, temporal unit) it belongs to.
    pub(crate) frame: usize,
}

pub(crate) fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codec")
}

/// Fixture files whose name starts with `prefix`, sorted.
pub(crate) fn fixtures(prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures named {prefix}*");
    v
}

/// The `WxH` at the end of a fixture's file stem.
pub(crate) fn expected_size(path: &Path) -> Resolution {
    let stem = path.file_stem().and_then(|s| s.to_str()).expect("stem");
    let dims = stem.rsplit('_').next().expect("size suffix");
    let (w, h) = dims.split_once('x').expect("WxH");
    Resolution {
        width: w.parse().expect("width"),
        height: h.parse().expect("height"),
    }
}

/// Frames of an IVF file: a 32-byte header, then per frame a u32 LE size, a u64 pts and the data.
pub(crate) fn ivf_frames(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).expect("read fixture");
    assert_eq!(&data[..4], b"DKIF", "{path:?} is not IVF");
    let header_len = usize::from(u16::from_le_bytes([data[6], data[7]]));
    let mut pos = header_len;
    let mut frames = Vec::new();
    while pos + 12 <= data.len() {
        let size = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        pos += 12;
        frames.push(data[pos..pos + size].to_vec());
        pos += size;
    }
    assert_eq!(pos, data.len(), "{path:?}: trailing bytes");
    frames
}

/// NAL units of an Annex B byte stream (start codes removed).
pub(crate) fn annexb_nals(data: &[u8]) -> Vec<Vec<u8>> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::new();
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
        // A 4-byte start code leaves a zero before the next 3-byte one.
        while k + 1 < starts.len() && end > s && data[end - 1] == 0 {
            end -= 1;
        }
        nals.push(data[s..end].to_vec());
    }
    nals
}

/// Access units of an Annex B stream: a new one starts at an AUD, SPS, or at a VCL NAL whose
/// first_mb_in_slice is 0 (its first slice-data bit is 1, ue(v) = 0) after a VCL NAL.
pub(crate) fn h264_access_units(path: &Path) -> Vec<Vec<Vec<u8>>> {
    let data = std::fs::read(path).expect("read fixture");
    let mut units: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut seen_vcl = false;
    for nal in annexb_nals(&data) {
        let t = nal[0] & 0x1f;
        let vcl = matches!(t, 1 | 5);
        let first_slice = vcl && nal.get(1).is_some_and(|b| b & 0x80 != 0);
        if units.is_empty() || (seen_vcl && (matches!(t, 7 | 9) || first_slice || !vcl)) {
            units.push(Vec::new());
            seen_vcl = false;
        }
        seen_vcl |= vcl;
        units.last_mut().expect("unit").push(nal);
    }
    units
}

/// Numbers payloads from a start near the 16-bit wrap (the probe sees extended numbers) and marks the
/// last packet of each frame.
pub(crate) fn number(frames: Vec<Vec<Vec<u8>>>) -> Vec<Packet> {
    let mut out = Vec::new();
    let mut seq = 65_530u64;
    for (frame, payloads) in frames.into_iter().enumerate() {
        let n = payloads.len();
        for (i, payload) in payloads.into_iter().enumerate() {
            out.push(Packet {
                seq,
                marker: i + 1 == n,
                payload,
                frame,
            });
            seq += 1;
        }
    }
    out
}

fn with_payloader(frames: &[Vec<u8>], mut p: impl Payloader, mtu: usize) -> Vec<Packet> {
    number(
        frames
            .iter()
            .map(|f| {
                p.payload(mtu, &Bytes::copy_from_slice(f))
                    .expect("payloader")
                    .into_iter()
                    .map(|b| b.to_vec())
                    .collect()
            })
            .collect(),
    )
}

/// Feeds every packet to a fresh probe; returns what it reported, by packet index.
pub(crate) fn measure(codec: VideoCodec, packets: &[Packet]) -> Vec<(usize, Resolution)> {
    let mut probe = ResolutionProbe::new(codec);
    packets
        .iter()
        .enumerate()
        .filter_map(|(i, p)| probe.push(p.seq, p.marker, &p.payload).map(|r| (i, r)))
        .collect()
}

/// The fixture's first frame is a keyframe and the rest are not: exactly one report, exactly the
/// expected size, on a packet of frame 0; the keyframe flag on frame 0's first packet and on no packet
/// of a later frame.
fn assert_measured(codec: VideoCodec, path: &Path, packets: &[Packet]) {
    let want = expected_size(path);
    let got = measure(codec, packets);
    assert_eq!(got.len(), 1, "{path:?}: reports {got:?}");
    let (at, size) = got[0];
    assert_eq!(size, want, "{path:?}");
    assert_eq!(
        packets[at].frame, 0,
        "{path:?}: reported outside the keyframe"
    );
    assert!(
        is_keyframe_start(codec, &packets[0].payload),
        "{path:?}: first packet not a keyframe start"
    );
    for p in packets.iter().filter(|p| p.frame > 0) {
        assert!(
            !is_keyframe_start(codec, &p.payload),
            "{path:?}: packet {} of inter frame {} flagged keyframe",
            p.seq,
            p.frame
        );
    }
    assert!(
        packets.iter().any(|p| p.frame > 0),
        "{path:?}: fixture has no inter frame"
    );
}

// ---------------------------------------------------------------- VP8

/// RFC 7741 packetizer with every descriptor extension: X, I (7- or 15-bit picture ID), L, T and K.
fn vp8_packetize(frames: &[Vec<u8>], mtu: usize, long_picture_id: bool) -> Vec<Packet> {
    let mut picture_id: u16 = 0x7f0;
    number(
        frames
            .iter()
            .enumerate()
            .map(|(n, frame)| {
                let mut descriptor = vec![0x80, 0xf0]; // X; I, L, T, K
                if long_picture_id {
                    descriptor.extend([0x80 | (picture_id >> 8) as u8, picture_id as u8]);
                } else {
                    descriptor.push((picture_id & 0x7f) as u8);
                }
                descriptor.push(n as u8); // TL0PICIDX
                descriptor.push(0b0110_0011); // TID 1, Y 1, KEYIDX 3
                picture_id = (picture_id + 1) & 0x7fff;
                frame
                    .chunks(mtu - descriptor.len())
                    .enumerate()
                    .map(|(i, chunk)| {
                        let mut p = descriptor.clone();
                        if i == 0 {
                            p[0] |= 0x10; // S, PID 0
                        }
                        p.extend_from_slice(chunk);
                        p
                    })
                    .collect()
            })
            .collect(),
    )
}

#[test]
fn vp8_fixtures_measure_exactly_through_the_rtc_payloader() {
    for path in fixtures("vp8_") {
        let frames = ivf_frames(&path);
        for mtu in [1200, 300] {
            let plain = with_payloader(&frames, Vp8Payloader::default(), mtu);
            assert_measured(VideoCodec::Vp8, &path, &plain);
            let mut with_pid = Vp8Payloader::default();
            with_pid.enable_picture_id = true;
            assert_measured(
                VideoCodec::Vp8,
                &path,
                &with_payloader(&frames, with_pid, mtu),
            );
        }
    }
}

#[test]
fn vp8_fixtures_measure_exactly_with_every_descriptor_extension() {
    for path in fixtures("vp8_") {
        let frames = ivf_frames(&path);
        for long in [false, true] {
            let packets = vp8_packetize(&frames, 1000, long);
            assert_measured(VideoCodec::Vp8, &path, &packets);
        }
    }
}

#[test]
fn vp8_libvpx_keyframes_have_no_scaling() {
    let path = fixture_dir().join("vp8_640x360.ivf");
    let packets = vp8_packetize(&ivf_frames(&path), 1000, true);
    let mut probe = ResolutionProbe::new(VideoCodec::Vp8);
    assert_eq!(probe.vp8_scaling(), None);
    for p in &packets {
        probe.push(p.seq, p.marker, &p.payload);
    }
    assert_eq!(
        probe.vp8_scaling(),
        Some(crate::codec::Vp8Scaling {
            horizontal: 0,
            vertical: 0
        })
    );
}

// ---------------------------------------------------------------- VP9

/// RFC 9628 packetizer as libwebrtc sends a single spatial layer: a 15-bit picture ID, layer indices,
/// P set on inter frames; non-flexible mode adds TL0PICIDX and sends the scalability structure (with
/// sizes that lie: the probe must not use them) on the keyframe; flexible mode sends two P_DIFFs on
/// inter frames.
fn vp9_packetize(frames: &[Vec<u8>], mtu: usize, flexible: bool) -> Vec<Packet> {
    number(
        frames
            .iter()
            .enumerate()
            .map(|(n, frame)| {
                let key = n == 0;
                let mut d = vec![0xa0u8, 0x80 | 0x12, 0x34 + n as u8]; // I, L; M, picture ID
                if !key {
                    d[0] |= 0x40; // P
                }
                d.push(0b0000_0000); // TID 0, U 0, SID 0, D 0
                if flexible {
                    d[0] |= 0x10; // F
                    if !key {
                        d.extend([(1 << 1) | 1, 2 << 1]); // P_DIFF 1 (N), P_DIFF 2
                    }
                } else {
                    d.push(n as u8); // TL0PICIDX
                    if key {
                        d[0] |= 0x02; // V
                        // N_S 0, Y, G; 4000x3000 claimed; N_G 1: T 0, U 0, R 1, P_DIFF 1.
                        d.extend([0b0001_1000, 0x0f, 0xa0, 0x0b, 0xb8, 1, 0b0000_0100, 1]);
                    }
                }
                let chunks: Vec<&[u8]> = frame.chunks(mtu - d.len()).collect();
                let last = chunks.len() - 1;
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, chunk)| {
                        let mut p = d.clone();
                        if i == 0 {
                            p[0] |= 0x08; // B
                        } else if key && !flexible {
                            p[0] &= !0x02; // SS only in the first packet
                            p.truncate(5);
                        }
                        if i == last {
                            p[0] |= 0x04; // E
                        }
                        p.extend_from_slice(chunk);
                        p
                    })
                    .collect()
            })
            .collect(),
    )
}

#[test]
fn vp9_fixtures_of_every_profile_measure_exactly_through_the_rtc_payloader() {
    let paths = fixtures("vp9_");
    for prefix in ["vp9_p0_", "vp9_p1_", "vp9_p2_", "vp9_p3_"] {
        assert!(paths.iter().any(|p| p.to_string_lossy().contains(prefix)));
    }
    for path in paths {
        let frames = ivf_frames(&path);
        for mtu in [1200, 200] {
            // This payloader leaves P at 0 on inter frames; the keyframe check reads the frame header
            // too, so inter frames are still not flagged.
            let packets = with_payloader(&frames, Vp9Payloader::default(), mtu);
            assert_measured(VideoCodec::Vp9, &path, &packets);
        }
    }
}

#[test]
fn vp9_fixtures_measure_exactly_in_flexible_and_non_flexible_mode_ignoring_the_ss_sizes() {
    for path in fixtures("vp9_") {
        let frames = ivf_frames(&path);
        for flexible in [false, true] {
            let packets = vp9_packetize(&frames, 900, flexible);
            assert_measured(VideoCodec::Vp9, &path, &packets);
        }
    }
}

#[test]
fn vp9_profiles_and_bit_depths_are_read_from_the_fixtures() {
    for (name, profile, depth, subsampling) in [
        ("vp9_p0_640x360.ivf", 0, 8, (true, true)),
        ("vp9_p1_352x288.ivf", 1, 8, (false, false)),
        ("vp9_p2_640x360.ivf", 2, 10, (true, true)),
        ("vp9_p3_352x288.ivf", 3, 10, (false, false)),
    ] {
        let frames = ivf_frames(&fixture_dir().join(name));
        let h = crate::codec::vp9::parse_frame_header(&frames[0]).expect(name);
        assert_eq!(
            (h.profile, h.bit_depth, h.subsampling, h.intra_only),
            (profile, depth, subsampling, false),
            "{name}"
        );
        assert_eq!(
            crate::codec::vp9::parse_frame_header(&frames[1]),
            Err(crate::codec::ParseError::NotKeyframe),
            "{name}: second frame"
        );
    }
}

// ---------------------------------------------------------------- H.264

/// RFC 6184 packetizer in non-interleaved mode: each NAL unit alone when it fits, else FU-A. With a
/// tiny MTU the SPS itself is fragmented.
fn h264_packetize(units: &[Vec<Vec<u8>>], mtu: usize) -> Vec<Packet> {
    number(
        units
            .iter()
            .map(|nals| {
                let mut out = Vec::new();
                for nal in nals {
                    if nal.len() <= mtu {
                        out.push(nal.clone());
                        continue;
                    }
                    let (header, body) = (nal[0], &nal[1..]);
                    let chunks: Vec<&[u8]> = body.chunks(mtu - 2).collect();
                    let last = chunks.len() - 1;
                    for (i, chunk) in chunks.into_iter().enumerate() {
                        let mut fu = (header & 0x1f)
                            | if i == 0 { 0x80 } else { 0 }
                            | if i == last { 0x40 } else { 0 };
                        if i == 0 && i == last {
                            fu = (header & 0x1f) | 0xc0;
                        }
                        let mut p = vec![(header & 0xe0) | 28, fu];
                        p.extend_from_slice(chunk);
                        out.push(p);
                    }
                }
                out
            })
            .collect(),
    )
}

fn assert_h264(path: &Path, packets: &[Packet]) {
    let want = expected_size(path);
    let got = measure(VideoCodec::H264, packets);
    assert!(!got.is_empty(), "{path:?}: no SPS measured");
    for (at, size) in &got {
        assert_eq!(*size, want, "{path:?}");
        assert_eq!(packets[*at].frame, 0, "{path:?}");
    }
    assert!(
        packets
            .iter()
            .filter(|p| p.frame == 0)
            .any(|p| is_keyframe_start(VideoCodec::H264, &p.payload))
    );
    for p in packets.iter().filter(|p| p.frame > 0) {
        assert!(
            !is_keyframe_start(VideoCodec::H264, &p.payload),
            "{path:?}: non-IDR frame {} flagged",
            p.frame
        );
    }
}

#[test]
fn h264_fixtures_measure_exactly_with_single_nal_units() {
    for path in fixtures("h264_") {
        let units = h264_access_units(&path);
        assert!(units.len() >= 2, "{path:?}: {} access units", units.len());
        let packets = h264_packetize(&units, 1200);
        // The SPS went alone, as a single NAL unit packet.
        assert!(packets.iter().any(|p| p.payload[0] & 0x1f == 7));
        assert_h264(&path, &packets);
    }
}

#[test]
fn h264_fixtures_measure_exactly_with_the_sps_fragmented_by_fu_a() {
    for path in fixtures("h264_") {
        let units = h264_access_units(&path);
        let packets = h264_packetize(&units, 8);
        let sps_fragments = packets
            .iter()
            .filter(|p| p.payload[0] & 0x1f == 28 && p.payload[1] & 0x1f == 7)
            .count();
        assert!(sps_fragments >= 2, "{path:?}: SPS not fragmented");
        assert_h264(&path, &packets);
    }
}

#[test]
fn h264_fixtures_measure_exactly_through_the_rtc_payloader_stap_a() {
    for path in fixtures("h264_") {
        let units = h264_access_units(&path);
        let annexb: Vec<Vec<u8>> = units
            .iter()
            .map(|nals| {
                nals.iter()
                    .flat_map(|n| [&[0u8, 0, 0, 1][..], n].concat())
                    .collect()
            })
            .collect();
        for mtu in [1200, 500] {
            let packets = with_payloader(&annexb, H264Payloader::default(), mtu);
            assert!(
                packets.iter().any(|p| p.payload[0] & 0x1f == 24),
                "{path:?}: no STAP-A"
            );
            assert_h264(&path, &packets);
        }
    }
}

#[test]
fn h264_sps_fields_are_read_from_the_fixtures() {
    use crate::codec::h264::parse_sps;
    let sps_of = |name: &str| {
        let units = h264_access_units(&fixture_dir().join(name));
        let nal = units[0]
            .iter()
            .find(|n| n[0] & 0x1f == 7)
            .expect("SPS")
            .clone();
        parse_sps(&nal).expect(name)
    };
    let s = sps_of("h264_baseline_1920x1080.h264");
    assert_eq!((s.profile_idc, s.pic_order_cnt_type), (66, 2));
    assert_eq!(
        (s.coded.width, s.coded.height, s.size.height),
        (1920, 1088, 1080)
    );
    let s = sps_of("h264_high_1920x1080.h264");
    assert_eq!(
        (s.profile_idc, s.chroma_format_idc, s.pic_order_cnt_type),
        (100, 1, 0)
    );
    let s = sps_of("h264_high444_638x358.h264");
    assert_eq!((s.profile_idc, s.chroma_format_idc), (244, 3));
    assert_eq!((s.coded.width, s.coded.height), (640, 368));
    let s = sps_of("h264_high422_638x358.h264");
    assert_eq!((s.profile_idc, s.chroma_format_idc), (122, 2));
    let s = sps_of("h264_high10_1366x768.h264");
    assert_eq!((s.profile_idc, s.bit_depth_luma), (110, 10));
    let s = sps_of("h264_interlaced_1920x1080.h264");
    assert!(!s.frame_mbs_only);
    assert_eq!((s.coded.height, s.size.height), (1088, 1080));
}

// ---------------------------------------------------------------- AV1

/// OBUs of a low-overhead temporal unit (every OBU has obu_size).
fn av1_obus(tu: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < tu.len() {
        let h = tu[pos];
        assert!(h & 0x02 != 0, "OBU without size in IVF");
        let ext = usize::from(h & 0x04 != 0);
        let (size, used) = crate::codec::bits::leb128(&tu[pos + 1 + ext..]).expect("obu_size");
        let end = pos + 1 + ext + used + size as usize;
        out.push(tu[pos..end].to_vec());
        pos = end;
    }
    out
}

fn leb128(mut v: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// AV1 RTP packetizer variant the rtc payloader does not produce: W = 0 (every element has a length),
/// OBUs keep their own obu_size fields and the temporal delimiter, one packet per temporal unit.
fn av1_packetize_w0(frames: &[Vec<u8>]) -> Vec<Packet> {
    number(
        frames
            .iter()
            .map(|tu| {
                let obus = av1_obus(tu);
                let new_sequence = obus.iter().any(|o| (o[0] >> 3) & 0x0f == 1);
                let mut p = vec![if new_sequence { 0x08 } else { 0 }];
                for o in obus {
                    p.extend(leb128(o.len()));
                    p.extend(o);
                }
                vec![p]
            })
            .collect(),
    )
}

#[test]
fn av1_fixtures_measure_exactly_through_the_rtc_payloader() {
    for path in fixtures("av1_") {
        let frames = ivf_frames(&path);
        if frames.len() == 1 {
            continue; // the still picture has no inter frame; tested below
        }
        for mtu in [1200, 300] {
            let packets = with_payloader(&frames, Av1Payloader::default(), mtu);
            assert_measured(VideoCodec::Av1, &path, &packets);
        }
    }
}

#[test]
fn av1_fixtures_measure_exactly_with_tiny_packets_that_fragment_the_headers() {
    for path in fixtures("av1_") {
        let frames = ivf_frames(&path);
        if frames.len() == 1 {
            continue;
        }
        let packets = with_payloader(&frames, Av1Payloader::default(), 6);
        // The sequence header is cut across packets: its first packet has Y set.
        let seq_start = packets
            .iter()
            .position(|p| {
                // Z = 0 and W = 1: the packet's only element starts an OBU, header at byte 1.
                p.payload[0] & 0xb0 == 0x10 && (p.payload[1] >> 3) & 0x0f == 1
            })
            .expect("sequence header packet");
        assert!(packets[seq_start].payload[0] & 0x40 != 0, "{path:?}");
        assert_measured(VideoCodec::Av1, &path, &packets);
    }
}

#[test]
fn av1_fixtures_measure_exactly_with_length_fields_and_obu_sizes() {
    for path in fixtures("av1_") {
        let frames = ivf_frames(&path);
        if frames.len() == 1 {
            continue;
        }
        assert_measured(VideoCodec::Av1, &path, &av1_packetize_w0(&frames));
    }
}

#[test]
fn av1_still_picture_with_reduced_header_measures_exactly() {
    let path = fixture_dir().join("av1_still_320x180.ivf");
    let frames = ivf_frames(&path);
    let obus = av1_obus(&frames[0]);
    let seq = obus
        .iter()
        .find(|o| (o[0] >> 3) & 0x0f == 1)
        .expect("sequence header");
    let header = crate::codec::av1::parse_sequence_header(&seq[2..]).expect("parse");
    assert!(header.still_picture && header.reduced_still_picture_header);
    for packets in [
        with_payloader(&frames, Av1Payloader::default(), 1200),
        av1_packetize_w0(&frames),
    ] {
        assert_eq!(
            measure(VideoCodec::Av1, &packets)
                .into_iter()
                .map(|(_, r)| r)
                .collect::<Vec<_>>(),
            vec![expected_size(&path)]
        );
        assert!(is_keyframe_start(VideoCodec::Av1, &packets[0].payload));
    }
}

#[test]
fn av1_fixture_frame_headers_are_reached_and_not_overridden() {
    // libaom's single-layer keyframes take the sequence maximum (no frame_size_override); the size is
    // reported from the frame header path, which these tests reach (not from the end-of-unit fallback).
    let path = fixture_dir().join("av1_637x359.ivf");
    let frames = ivf_frames(&path);
    let obus = av1_obus(&frames[0]);
    let seq = crate::codec::av1::parse_sequence_header(&obus[1][2..]).expect("seq");
    let frame = obus
        .iter()
        .find(|o| matches!((o[0] >> 3) & 0x0f, 3 | 6))
        .expect("frame");
    let ext = usize::from(frame[0] & 0x04 != 0);
    let (_, used) = crate::codec::bits::leb128(&frame[1 + ext..]).expect("size");
    let f =
        crate::codec::av1::parse_frame_size(&seq, 0, 0, &frame[1 + ext + used..]).expect("frame");
    assert!(!f.overridden);
    assert_eq!(f.size, expected_size(&path));
    assert_eq!(f.render, expected_size(&path));
}

/// All real packets of every fixture, for the robustness tests.
pub(crate) fn corpus() -> Vec<(VideoCodec, Vec<u8>)> {
    let mut out = Vec::new();
    for path in fixtures("vp8_") {
        let frames = ivf_frames(&path);
        out.extend(
            vp8_packetize(&frames, 600, true)
                .into_iter()
                .map(|p| (VideoCodec::Vp8, p.payload)),
        );
    }
    for path in fixtures("vp9_") {
        let frames = ivf_frames(&path);
        out.extend(
            vp9_packetize(&frames, 600, false)
                .into_iter()
                .map(|p| (VideoCodec::Vp9, p.payload)),
        );
    }
    for path in fixtures("h264_") {
        let units = h264_access_units(&path);
        out.extend(
            h264_packetize(&units, 600)
                .into_iter()
                .map(|p| (VideoCodec::H264, p.payload)),
        );
        out.extend(
            h264_packetize(&units, 16)
                .into_iter()
                .take(20)
                .map(|p| (VideoCodec::H264, p.payload)),
        );
    }
    for path in fixtures("av1_") {
        let frames = ivf_frames(&path);
        out.extend(
            with_payloader(&frames, Av1Payloader::default(), 600)
                .into_iter()
                .map(|p| (VideoCodec::Av1, p.payload)),
        );
        out.extend(
            av1_packetize_w0(&frames)
                .into_iter()
                .map(|p| (VideoCodec::Av1, p.payload)),
        );
    }
    out
}

/// Writes the seed corpus of the `codecs` fuzz target (fuzz/fuzz_targets/codecs.rs) from the real
/// fixtures: per file, a codec byte then the first packets as (marker bit | 15-bit length, payload).
/// Run by `scripts/fuzz seeds`.
#[test]
#[ignore = "writes fuzz/seeds/codecs; run by scripts/fuzz seeds"]
fn write_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/codecs");
    std::fs::create_dir_all(&dir).expect("seed dir");
    let mut sets: Vec<(String, u8, Vec<Packet>)> = Vec::new();
    for path in fixtures("vp8_") {
        let frames = ivf_frames(&path);
        sets.push((name(&path), 0, vp8_packetize(&frames, 600, true)));
    }
    for path in fixtures("vp9_") {
        let frames = ivf_frames(&path);
        sets.push((name(&path), 1, vp9_packetize(&frames, 600, false)));
    }
    for path in fixtures("h264_") {
        let units = h264_access_units(&path);
        sets.push((name(&path), 2, h264_packetize(&units, 600)));
    }
    for path in fixtures("av1_") {
        let frames = ivf_frames(&path);
        sets.push((
            name(&path),
            3,
            with_payloader(&frames, Av1Payloader::default(), 600),
        ));
    }
    for (name, codec, packets) in sets {
        let mut seed = vec![codec];
        for p in packets.iter().take(24) {
            let len = p.payload.len().min(0x7fff);
            if seed.len() + 2 + len > 16_384 {
                break;
            }
            let head = (u16::from(p.marker) << 15) | len as u16;
            seed.extend_from_slice(&head.to_be_bytes());
            seed.extend_from_slice(&p.payload[..len]);
        }
        std::fs::write(dir.join(format!("{name}.bin")), seed).expect("write seed");
    }

    fn name(path: &Path) -> String {
        path.file_stem()
            .and_then(|s| s.to_str())
            .expect("stem")
            .to_owned()
    }
}
