//! Hand-built headers for fields and modes the encoder fixtures do not exercise.

use crate::codec::bits::BitWriter;
use crate::codec::{
    ParseError, Resolution, ResolutionProbe, VideoCodec, Vp8Scaling, is_keyframe_start,
};

fn res(width: u32, height: u32) -> Resolution {
    Resolution { width, height }
}

// ---------------------------------------------------------------- VP8

fn vp8_key_payload(w: u16, h: u16) -> Vec<u8> {
    let mut p = vec![0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a];
    p.extend(w.to_le_bytes());
    p.extend(h.to_le_bytes());
    p.extend([0u8; 8]);
    p
}

#[test]
fn vp8_reports_the_14_bit_size_and_keeps_the_scaling_bits_apart() {
    let mut probe = ResolutionProbe::new(VideoCodec::Vp8);
    let payload = vp8_key_payload(640 | (2 << 14), 480 | (3 << 14));
    assert!(is_keyframe_start(VideoCodec::Vp8, &payload));
    assert_eq!(probe.push(1, false, &payload), Some(res(640, 480)));
    assert_eq!(
        probe.vp8_scaling(),
        Some(Vp8Scaling {
            horizontal: 2,
            vertical: 3
        })
    );
    // Every keyframe reports, not only changes.
    assert_eq!(probe.push(2, true, &payload), Some(res(640, 480)));
    assert_eq!(ResolutionProbe::new(VideoCodec::Vp9).vp8_scaling(), None);
}

#[test]
fn vp8_ignores_inter_frames_continuations_bad_start_codes_and_zero_sizes() {
    let mut probe = ResolutionProbe::new(VideoCodec::Vp8);
    let mut inter = vp8_key_payload(640, 480);
    inter[1] |= 1; // frame tag P bit
    assert!(!is_keyframe_start(VideoCodec::Vp8, &inter));
    assert_eq!(probe.push(1, false, &inter), None);
    let mut continuation = vp8_key_payload(640, 480);
    continuation[0] = 0x00; // S = 0
    assert!(!is_keyframe_start(VideoCodec::Vp8, &continuation));
    assert_eq!(probe.push(2, false, &continuation), None);
    let mut other_partition = vp8_key_payload(640, 480);
    other_partition[0] = 0x11; // S = 1, PID = 1
    assert!(!is_keyframe_start(VideoCodec::Vp8, &other_partition));
    let mut bad = vp8_key_payload(640, 480);
    bad[5] = 0x02;
    assert_eq!(probe.push(3, false, &bad), None);
    assert_eq!(probe.push(4, false, &vp8_key_payload(0, 480)), None);
    // X set but the extension byte missing.
    assert!(!is_keyframe_start(VideoCodec::Vp8, &[0x90]));
    assert_eq!(probe.push(5, false, &[0x90]), None);
    // Header cut after the start code.
    assert_eq!(probe.push(6, false, &vp8_key_payload(640, 480)[..9]), None);
}

// ---------------------------------------------------------------- VP9

const SYNC: u64 = 0x49_83_42;

fn vp9_payload(descriptor: u8, header: &BitWriter) -> Vec<u8> {
    let mut p = vec![descriptor];
    p.extend(&header.bytes);
    p.extend([0u8; 4]);
    p
}

fn vp9_profile(w: &mut BitWriter, profile: u64) {
    w.put(2, 2); // frame_marker
    w.put(1, profile & 1);
    w.put(1, profile >> 1);
    if profile == 3 {
        w.put(1, 0);
    }
}

#[test]
fn vp9_intra_only_frames_report_their_size_but_do_not_start_a_keyframe() {
    // Profile 0: no color_config, BitDepth 8 and 4:2:0 implied.
    let mut w = BitWriter::default();
    vp9_profile(&mut w, 0);
    w.put(1, 0); // show_existing_frame
    w.put(1, 1); // frame_type NON_KEY
    w.put(1, 0); // show_frame
    w.put(1, 0); // error_resilient_mode
    w.put(1, 1); // intra_only
    w.put(2, 0); // reset_frame_context
    w.put(24, SYNC);
    w.put(8, 0x01); // refresh_frame_flags
    w.put(16, 959);
    w.put(16, 539);
    w.put(1, 0);
    let payload = vp9_payload(0x0c, &w); // B, E
    let mut probe = ResolutionProbe::new(VideoCodec::Vp9);
    assert_eq!(probe.push(1, true, &payload), Some(res(960, 540)));
    assert!(!is_keyframe_start(VideoCodec::Vp9, &payload));

    // Profile 1 with error resilience: color_config is present, reset_frame_context is not.
    let mut w = BitWriter::default();
    vp9_profile(&mut w, 1);
    w.put(4, 0b0101); // show_existing 0, NON_KEY, show_frame 0, error_resilient 1
    w.put(1, 1); // intra_only
    w.put(24, SYNC);
    w.put(3, 2); // color_space BT_709
    w.put(1, 0); // color_range
    w.put(2, 0b10); // 4:2:2
    w.put(1, 0); // reserved_zero
    w.put(8, 0xff);
    w.put(16, 351);
    w.put(16, 287);
    w.put(1, 1); // render size differs: read, not reported
    w.put(32, 0);
    let h = crate::codec::vp9::parse_frame_header(&w.bytes).expect("intra-only");
    assert!(h.intra_only);
    assert_eq!((h.size, h.subsampling), (res(352, 288), (true, false)));
    let mut probe = ResolutionProbe::new(VideoCodec::Vp9);
    assert_eq!(
        probe.push(1, true, &vp9_payload(0x0c, &w)),
        Some(res(352, 288))
    );
}

fn vp9_key(profile: u64, color: impl Fn(&mut BitWriter)) -> BitWriter {
    let mut w = BitWriter::default();
    vp9_profile(&mut w, profile);
    w.put(4, 0b0010); // show_existing 0, KEY_FRAME, show_frame 1, error_resilient 0
    w.put(24, SYNC);
    color(&mut w);
    w.put(16, 1279);
    w.put(16, 719);
    w.put(1, 0);
    w
}

#[test]
fn vp9_color_config_follows_the_profile_rules() {
    // 12-bit profile 2.
    let w = vp9_key(2, |w| {
        w.put(1, 1); // ten_or_twelve_bit
        w.put(3, 1);
        w.put(1, 0);
    });
    let h = crate::codec::vp9::parse_frame_header(&w.bytes).expect("profile 2");
    assert_eq!((h.bit_depth, h.size), (12, res(1280, 720)));
    assert!(is_keyframe_start(VideoCodec::Vp9, &vp9_payload(0x08, &w)));
    // RGB is allowed in profile 1 (with its reserved bit) ...
    let w = vp9_key(1, |w| {
        w.put(3, 7);
        w.put(1, 0);
    });
    assert_eq!(
        crate::codec::vp9::parse_frame_header(&w.bytes).map(|h| h.subsampling),
        Ok((false, false))
    );
    // ... not in profile 0.
    let w = vp9_key(0, |w| {
        w.put(3, 7);
    });
    assert!(matches!(
        crate::codec::vp9::parse_frame_header(&w.bytes),
        Err(ParseError::Invalid(_))
    ));
    // 4:2:0 is not allowed in profile 3; a set reserved bit is rejected.
    let w = vp9_key(3, |w| {
        w.put(1, 0);
        w.put(3, 1);
        w.put(1, 0);
        w.put(2, 0b11);
        w.put(1, 0);
    });
    assert!(crate::codec::vp9::parse_frame_header(&w.bytes).is_err());
    let w = vp9_key(1, |w| {
        w.put(3, 1);
        w.put(1, 0);
        w.put(2, 0b00);
        w.put(1, 1); // reserved_zero = 1
    });
    assert!(crate::codec::vp9::parse_frame_header(&w.bytes).is_err());
    let mut probe = ResolutionProbe::new(VideoCodec::Vp9);
    assert_eq!(probe.push(1, true, &vp9_payload(0x08, &w)), None);
}

#[test]
fn vp9_show_existing_frames_and_upper_spatial_layers_are_not_keyframe_starts() {
    let mut w = BitWriter::default();
    vp9_profile(&mut w, 0);
    w.put(1, 1); // show_existing_frame
    w.put(3, 2); // frame_to_show_map_idx
    let payload = vp9_payload(0x0c, &w);
    assert!(!is_keyframe_start(VideoCodec::Vp9, &payload));
    assert_eq!(
        crate::codec::vp9::parse_frame_header(&w.bytes),
        Err(ParseError::NotKeyframe)
    );
    assert_eq!(
        ResolutionProbe::new(VideoCodec::Vp9).push(1, true, &payload),
        None
    );

    // The same key frame header on spatial layer 1 (L: SID 1, D; non-flexible TL0PICIDX).
    let key = vp9_key(0, |w| {
        w.put(3, 1);
        w.put(1, 0);
    });
    let mut sid1 = vec![0x28, 0b0000_0011, 0];
    sid1.extend(&key.bytes);
    assert!(!is_keyframe_start(VideoCodec::Vp9, &sid1));
    let mut sid0 = vec![0x28, 0b0000_0000, 0];
    sid0.extend(&key.bytes);
    assert!(is_keyframe_start(VideoCodec::Vp9, &sid0));
    // P set: not a keyframe start even if the header looks like one.
    sid0[0] |= 0x40;
    assert!(!is_keyframe_start(VideoCodec::Vp9, &sid0));
}

// ---------------------------------------------------------------- H.264

struct SpsSpec {
    profile_idc: u8,
    chroma_format_idc: u32,
    separate_colour_plane: bool,
    poc_type: u32,
    width_mbs: u32,
    height_map_units: u32,
    frame_mbs_only: bool,
    crop: Option<[u32; 4]>,
}

fn sps_rbsp(s: &SpsSpec) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.put(8, 0x67);
    w.put(8, u64::from(s.profile_idc));
    w.put(8, 0); // constraint flags
    w.put(8, 0); // level_idc 0: with the above, two zero bytes that need escaping later
    w.ue(0);
    if s.profile_idc == 100 {
        w.ue(s.chroma_format_idc);
        if s.chroma_format_idc == 3 {
            w.put(1, u64::from(s.separate_colour_plane));
        }
        w.ue(0);
        w.ue(0);
        w.put(1, 0);
        w.put(1, 1); // seq_scaling_matrix_present_flag
        let lists = if s.chroma_format_idc == 3 { 12 } else { 8 };
        for i in 0..lists {
            let present = i % 3 != 2;
            w.put(1, u64::from(present));
            if present {
                let size = if i < 6 { 16 } else { 64 };
                // Lists with an even index end early (a delta to 0 at j = 5, the rest repeat); the
                // others run to the end.
                let mut last = 8i32;
                for j in 0..size {
                    if i % 2 == 0 && j == 5 {
                        w.se(-last);
                        break;
                    }
                    let delta = if j % 2 == 0 { 3 } else { -2 };
                    w.se(delta);
                    last = (last + delta + 256) % 256;
                }
            }
        }
    }
    w.ue(4); // log2_max_frame_num_minus4
    w.ue(s.poc_type);
    match s.poc_type {
        0 => w.ue(2),
        1 => {
            w.put(1, 0);
            w.se(-3);
            w.se(7);
            w.ue(3);
            // Long runs of zero bits: forces emulation prevention in the escaped form.
            for v in [-(1 << 30), 1 << 30, -5] {
                w.se(v);
            }
        }
        _ => {}
    }
    w.ue(4); // max_num_ref_frames
    w.put(1, 0);
    w.ue(s.width_mbs - 1);
    w.ue(s.height_map_units - 1);
    w.put(1, u64::from(s.frame_mbs_only));
    if !s.frame_mbs_only {
        w.put(1, 1);
    }
    w.put(1, 1);
    match s.crop {
        Some(c) => {
            w.put(1, 1);
            for v in c {
                w.ue(v);
            }
        }
        None => w.put(1, 0),
    }
    w.put(1, 0); // vui_parameters_present_flag
    w.put(1, 1); // rbsp_stop_one_bit
    w.bytes
}

/// Inserts emulation-prevention bytes as an encoder does.
fn escape(rbsp: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    out
}

#[test]
fn h264_sps_with_poc_type_1_and_emulation_prevention_parses() {
    let rbsp = sps_rbsp(&SpsSpec {
        profile_idc: 77,
        chroma_format_idc: 1,
        separate_colour_plane: false,
        poc_type: 1,
        width_mbs: 80,
        height_map_units: 45,
        frame_mbs_only: true,
        crop: None,
    });
    let escaped = escape(&rbsp);
    assert!(
        escaped.len() >= rbsp.len() + 2,
        "no emulation prevention was needed"
    );
    let sps = crate::codec::h264::parse_sps(&escaped).expect("sps");
    assert_eq!((sps.pic_order_cnt_type, sps.size), (1, res(1280, 720)));
    let mut probe = ResolutionProbe::new(VideoCodec::H264);
    assert!(is_keyframe_start(VideoCodec::H264, &escaped));
    assert_eq!(probe.push(7, false, &escaped), Some(res(1280, 720)));
}

#[test]
fn h264_crop_units_depend_on_chroma_format_and_field_coding() {
    let cases = [
        // (chroma_format_idc, separate planes, frame_mbs_only, crop l r t b, expected). Frames are 45
        // macroblock rows (720 lines); field-coded pictures are 23 map units of macroblock pairs (736).
        (0, false, true, [1, 2, 3, 4], res(1280 - 3, 720 - 7)),
        (1, false, true, [0, 1, 0, 4], res(1280 - 2, 720 - 8)),
        (1, false, false, [0, 0, 0, 2], res(1280, 736 - 8)),
        (2, false, true, [1, 0, 1, 1], res(1280 - 2, 720 - 2)),
        (2, false, false, [0, 0, 1, 0], res(1280, 736 - 2)),
        (3, false, true, [1, 1, 1, 1], res(1280 - 2, 720 - 2)),
        (3, true, false, [1, 0, 0, 1], res(1280 - 1, 736 - 2)),
    ];
    for (chroma, separate, frame_mbs_only, crop, want) in cases {
        let rbsp = sps_rbsp(&SpsSpec {
            profile_idc: 100,
            chroma_format_idc: chroma,
            separate_colour_plane: separate,
            poc_type: 0,
            width_mbs: 80,
            height_map_units: if frame_mbs_only { 45 } else { 23 },
            frame_mbs_only,
            crop: Some(crop),
        });
        let sps = crate::codec::h264::parse_sps(&escape(&rbsp))
            .unwrap_or_else(|e| panic!("chroma {chroma}: {e}"));
        assert!(sps.scaling_matrix_present);
        assert_eq!(
            sps.size, want,
            "chroma {chroma} separate {separate} frames {frame_mbs_only}"
        );
    }
}

#[test]
fn h264_rejects_impossible_crops_and_sizes() {
    let too_much = sps_rbsp(&SpsSpec {
        profile_idc: 66,
        chroma_format_idc: 1,
        separate_colour_plane: false,
        poc_type: 2,
        width_mbs: 2,
        height_map_units: 2,
        frame_mbs_only: true,
        crop: Some([0, 16, 0, 0]),
    });
    assert!(crate::codec::h264::parse_sps(&escape(&too_much)).is_err());
    let huge = sps_rbsp(&SpsSpec {
        profile_idc: 66,
        chroma_format_idc: 1,
        separate_colour_plane: false,
        poc_type: 2,
        width_mbs: 5000,
        height_map_units: 2,
        frame_mbs_only: true,
        crop: None,
    });
    assert!(crate::codec::h264::parse_sps(&escape(&huge)).is_err());
}

fn fu_a(nal: &[u8], size: usize) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = nal[1..].chunks(size).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut fu = nal[0] & 0x1f;
            if i == 0 {
                fu |= 0x80;
            }
            if i == last {
                fu |= 0x40;
            }
            let mut p = vec![(nal[0] & 0xe0) | 28, fu];
            p.extend_from_slice(c);
            p
        })
        .collect()
}

#[test]
fn h264_fu_a_reassembly_drops_the_sps_on_a_sequence_gap_and_recovers() {
    let sps = escape(&sps_rbsp(&SpsSpec {
        profile_idc: 66,
        chroma_format_idc: 1,
        separate_colour_plane: false,
        poc_type: 2,
        width_mbs: 40,
        height_map_units: 23,
        frame_mbs_only: true,
        crop: Some([0, 0, 0, 4]),
    }));
    let parts = fu_a(&sps, 3);
    assert!(parts.len() >= 3);
    assert!(is_keyframe_start(VideoCodec::H264, &parts[0]));
    assert!(!is_keyframe_start(VideoCodec::H264, &parts[1]));
    let mut probe = ResolutionProbe::new(VideoCodec::H264);
    // Lose fragment 1.
    for (seq, (i, p)) in (100..).zip(parts.iter().enumerate()) {
        if i != 1 {
            assert_eq!(probe.push(seq, false, p), None);
        }
    }
    // All fragments in order, with extended sequence numbers past the 16-bit wrap.
    let mut seq = 65_534;
    let mut got = Vec::new();
    for p in &parts {
        got.extend(probe.push(seq, false, p));
        seq += 1;
    }
    assert_eq!(got, vec![res(640, 360)]);
    // A start fragment whose rest never comes, then a single-NAL SPS: the latter is measured.
    assert_eq!(probe.push(seq, false, &parts[0]), None);
    assert_eq!(probe.push(seq + 1, false, &sps), Some(res(640, 360)));
}

#[test]
fn h264_stap_a_with_idr_is_a_keyframe_start_and_bad_sizes_stop_the_walk() {
    let sps = escape(&sps_rbsp(&SpsSpec {
        profile_idc: 66,
        chroma_format_idc: 1,
        separate_colour_plane: false,
        poc_type: 2,
        width_mbs: 20,
        height_map_units: 12,
        frame_mbs_only: true,
        crop: Some([0, 0, 0, 6]),
    }));
    let mut stap = vec![0x18];
    for nal in [&[0x68u8, 0xce, 0x38, 0x80][..], &sps] {
        stap.extend((nal.len() as u16).to_be_bytes());
        stap.extend_from_slice(nal);
    }
    assert!(is_keyframe_start(VideoCodec::H264, &stap));
    let mut probe = ResolutionProbe::new(VideoCodec::H264);
    assert_eq!(probe.push(1, false, &stap), Some(res(320, 180)));
    let idr_only = [0x18, 0, 2, 0x65, 0x88];
    assert!(is_keyframe_start(VideoCodec::H264, &idr_only));
    let non_idr = [0x18, 0, 2, 0x41, 0x9a, 0, 2, 0x06, 0x05];
    assert!(!is_keyframe_start(VideoCodec::H264, &non_idr));
    // A size past the end hides the SPS after it.
    let mut broken = vec![0x18, 0xff, 0xff];
    broken.extend_from_slice(&stap[1..]);
    assert!(!is_keyframe_start(VideoCodec::H264, &broken));
    assert_eq!(probe.push(2, false, &broken), None);
    // STAP-B, MTAP and FU-B are ignored; the forbidden bit voids a packet.
    for t in [25u8, 26, 27, 29] {
        assert!(!is_keyframe_start(VideoCodec::H264, &[t, 0x87, 0, 0]));
    }
    assert!(!is_keyframe_start(VideoCodec::H264, &[0xe5, 0x88]));
}

// ---------------------------------------------------------------- AV1

/// A sequence header with timing info, a decoder model, two operating points, initial display
/// delays, frame IDs, order hints, screen content "select", superres.
fn av1_sequence_header(max_w: u64, max_h: u64) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.put(3, 0); // seq_profile
    w.put(1, 0); // still_picture
    w.put(1, 0); // reduced_still_picture_header
    w.put(1, 1); // timing_info_present_flag
    w.put(32, 1);
    w.put(32, 30);
    w.put(1, 0); // equal_picture_interval
    w.put(1, 1); // decoder_model_info_present_flag
    w.put(5, 9); // buffer_delay_length_minus_1
    w.put(32, 1);
    w.put(5, 4); // buffer_removal_time_length_minus_1
    w.put(5, 6); // frame_presentation_time_length_minus_1
    w.put(1, 1); // initial_display_delay_present_flag
    w.put(5, 1); // two operating points
    w.put(12, 0x103);
    w.put(5, 8);
    w.put(1, 0); // seq_tier
    w.put(1, 1); // decoder_model_present_for_this_op
    w.put(10, 100);
    w.put(10, 200);
    w.put(1, 0);
    w.put(1, 1);
    w.put(4, 9);
    w.put(12, 0x101);
    w.put(5, 4);
    w.put(1, 0);
    w.put(1, 0);
    w.put(4, 11); // frame_width_bits_minus_1
    w.put(4, 11);
    w.put(12, max_w - 1);
    w.put(12, max_h - 1);
    w.put(1, 1); // frame_id_numbers_present_flag
    w.put(4, 5);
    w.put(3, 2); // idLen = 7 + 3 = 10
    w.put(3, 0b011);
    w.put(4, 0b1111);
    w.put(1, 1); // enable_order_hint
    w.put(2, 0b11);
    w.put(1, 1); // seq_choose_screen_content_tools
    w.put(1, 1); // seq_choose_integer_mv
    w.put(3, 6); // order_hint_bits_minus_1
    w.put(1, 1); // enable_superres
    w.put(2, 0b11);
    w.put(16, 0); // color config etc., not read
    w.bytes
}

/// An intra frame header for the sequence above.
fn av1_intra_frame_header(key: bool, size: Option<(u64, u64)>, render_1x1: bool) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.put(1, 0); // show_existing_frame
    w.put(2, if key { 0 } else { 2 });
    let show = key;
    w.put(1, u64::from(show));
    if show {
        w.put(7, 5); // frame_presentation_time
    } else {
        w.put(1, 1); // showable_frame
        w.put(1, 0); // error_resilient_mode
    }
    w.put(1, 0); // disable_cdf_update
    w.put(1, 1); // allow_screen_content_tools
    w.put(1, 0); // force_integer_mv
    w.put(10, 77); // current_frame_id
    w.put(1, u64::from(size.is_some()));
    w.put(7, 3); // order_hint
    w.put(1, 1); // buffer_removal_time_present_flag
    w.put(5, 17); // op 0 has a model and contains layer (0, 0); op 1 has none
    if !key {
        w.put(8, 0x01); // refresh_frame_flags
    }
    if let Some((fw, fh)) = size {
        w.put(12, fw - 1);
        w.put(12, fh - 1);
    }
    w.put(1, 1); // use_superres
    w.put(3, 4);
    if render_1x1 {
        w.put(1, 1);
        w.put(32, 0);
    } else {
        w.put(1, 0);
    }
    w.put(8, 0);
    w.bytes
}

/// An OBU with an extension header (temporal 0, spatial 0) and no obu_size.
fn obu(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut o = vec![(kind << 3) | 0x04, 0x00];
    o.extend_from_slice(payload);
    o
}

#[test]
fn av1_prefers_the_keyframe_frame_size_override_over_the_sequence_maximum() {
    let seq = obu(1, &av1_sequence_header(1920, 1080));
    let frame = obu(3, &av1_intra_frame_header(true, Some((640, 360)), true));
    // N, W = 2: the sequence header with a length, the frame header without.
    let mut p = vec![0x28, seq.len() as u8];
    p.extend(&seq);
    p.extend(&frame);
    assert!(is_keyframe_start(VideoCodec::Av1, &p));
    let mut probe = ResolutionProbe::new(VideoCodec::Av1);
    // The 1x1 render size is not what is reported.
    assert_eq!(probe.push(10, false, &p), Some(res(640, 360)));
    // The rest of the temporal unit and its marker do not report again.
    assert_eq!(probe.push(11, true, &[0x10, 0x32, 0, 0]), None);
}

#[test]
fn av1_without_override_reports_the_maximum_and_intra_only_frames_report_too() {
    let seq = obu(1, &av1_sequence_header(1280, 720));
    let key = obu(6, &av1_intra_frame_header(true, None, false));
    let mut p = vec![0x28, seq.len() as u8];
    p.extend(&seq);
    p.extend(&key);
    let mut probe = ResolutionProbe::new(VideoCodec::Av1);
    assert_eq!(probe.push(1, true, &p), Some(res(1280, 720)));

    let intra = obu(3, &av1_intra_frame_header(false, Some((320, 180)), false));
    let mut p = vec![0x20, seq.len() as u8]; // no N: a repeated sequence header
    p.extend(&seq);
    p.extend(&intra);
    assert!(is_keyframe_start(VideoCodec::Av1, &p));
    assert_eq!(probe.push(2, true, &p), Some(res(320, 180)));
}

#[test]
fn av1_reports_the_maximum_at_the_marker_when_the_frame_header_is_unreachable() {
    let seq = obu(1, &av1_sequence_header(1280, 720));
    let mut first = vec![0x18];
    first.extend(&seq);
    let mut probe = ResolutionProbe::new(VideoCodec::Av1);
    assert_eq!(probe.push(1, false, &first), None);
    // The frame OBU's packet is lost; the marker packet continues a fragment we never saw.
    assert_eq!(
        probe.push(3, true, &[0x90, 0x55, 0x55]),
        Some(res(1280, 720))
    );
    // A frame larger than the sequence maximum is malformed: the maximum is reported instead.
    let big = obu(3, &av1_intra_frame_header(true, Some((1281, 720)), false));
    let mut p = vec![0x28, seq.len() as u8];
    p.extend(&seq);
    p.extend(&big);
    assert_eq!(probe.push(4, true, &p), Some(res(1280, 720)));
    // No report without a sequence header, and none for a temporal unit with only a frame.
    assert_eq!(probe.push(5, true, &[0x10, 0x32, 0x10, 0x00]), None);
}

#[test]
fn av1_sequence_header_fragment_with_a_gap_is_dropped() {
    let seq = obu(1, &av1_sequence_header(1280, 720));
    let (a, b) = seq.split_at(6);
    let mut p1 = vec![0x58]; // Y, W = 1, N
    p1.extend(a);
    let mut p2 = vec![0x90]; // Z, W = 1
    p2.extend(b);
    let mut probe = ResolutionProbe::new(VideoCodec::Av1);
    assert_eq!(probe.push(1, false, &p1), None);
    assert_eq!(probe.push(3, true, &p2), None); // seq 2 was lost
    assert_eq!(probe.push(4, false, &p1), None);
    assert_eq!(probe.push(5, true, &p2), Some(res(1280, 720)));
}

#[test]
fn av1_sequence_header_rules_are_enforced() {
    // reduced_still_picture_header without still_picture.
    let mut w = BitWriter::default();
    w.put(3, 0);
    w.put(1, 0);
    w.put(1, 1);
    w.put(32, 0);
    assert!(crate::codec::av1::parse_sequence_header(&w.bytes).is_err());
    // seq_profile 3 and above are reserved.
    let mut w = BitWriter::default();
    w.put(3, 3);
    w.put(32, 0);
    assert!(crate::codec::av1::parse_sequence_header(&w.bytes).is_err());
    let h = crate::codec::av1::parse_sequence_header(&av1_sequence_header(4096, 2160)).expect("ok");
    assert!(h.timing_info_present && h.decoder_model_info_present);
    assert_eq!(h.max_size, res(4096, 2160));
}
