//! Nothing a sender puts in a payload may panic the probe or the keyframe check, and whatever size is
//! reported stays within the accepted range.

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;

use super::fixtures::corpus;
use crate::codec::{MAX_DIMENSION, Resolution, ResolutionProbe, VideoCodec, is_keyframe_start};

const CODECS: [VideoCodec; 4] = [
    VideoCodec::Vp8,
    VideoCodec::Vp9,
    VideoCodec::H264,
    VideoCodec::Av1,
];

fn real_packets() -> &'static [(VideoCodec, Vec<u8>)] {
    static CORPUS: OnceLock<Vec<(VideoCodec, Vec<u8>)>> = OnceLock::new();
    CORPUS.get_or_init(corpus)
}

fn sane(r: Option<Resolution>) -> bool {
    r.is_none_or(|r| {
        (1..=MAX_DIMENSION).contains(&r.width) && (1..=MAX_DIMENSION).contains(&r.height)
    })
}

#[test]
fn every_truncation_of_every_real_keyframe_packet_is_safe() {
    let mut keyframe_packets = 0;
    for (codec, payload) in real_packets() {
        if !is_keyframe_start(*codec, payload) {
            continue;
        }
        keyframe_packets += 1;
        let mut probe = ResolutionProbe::new(*codec);
        for (seq, len) in (0..=payload.len()).enumerate() {
            let cut = &payload[..len];
            let _ = is_keyframe_start(*codec, cut);
            assert!(sane(probe.push(seq as u64, len % 3 == 0, cut)));
        }
    }
    assert!(keyframe_packets > 40, "{keyframe_packets} keyframe packets");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn random_payloads_never_panic_any_codec(
        codec in prop::sample::select(CODECS.to_vec()),
        packets in prop::collection::vec(
            (0u64..8, any::<bool>(), prop::collection::vec(any::<u8>(), 0..96)), 1..24),
    ) {
        let mut probe = ResolutionProbe::new(codec);
        let mut seq = u64::MAX - 10;
        for (step, marker, payload) in packets {
            let _ = is_keyframe_start(codec, &payload);
            seq = seq.wrapping_add(step);
            prop_assert!(sane(probe.push(seq, marker, &payload)));
        }
    }

    #[test]
    fn truncated_and_bit_flipped_real_packets_never_panic(
        start in any::<Index>(),
        run in 1usize..24,
        cuts in prop::collection::vec(any::<Index>(), 24),
        flips in prop::collection::vec((any::<Index>(), 0u8..8), 0..8),
        keep_whole in any::<bool>(),
    ) {
        let all = real_packets();
        let first = start.index(all.len());
        let codec = all[first].0;
        let mut probe = ResolutionProbe::new(codec);
        let run: Vec<&Vec<u8>> = all[first..]
            .iter()
            .take_while(|(c, _)| *c == codec)
            .take(run)
            .map(|(_, p)| p)
            .collect();
        for (i, original) in run.iter().enumerate() {
            let mut p: Vec<u8> = original.to_vec();
            if !p.is_empty() {
                for (at, bit) in &flips {
                    let at = at.index(p.len().min(64));
                    p[at] ^= 1 << bit;
                }
            }
            if !keep_whole {
                let len = cuts[i].index(p.len() + 1);
                p.truncate(len);
            }
            let _ = is_keyframe_start(codec, &p);
            prop_assert!(sane(probe.push(1000 + i as u64, i + 1 == run.len(), &p)));
        }
    }
}
