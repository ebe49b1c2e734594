//! The RTP rewriter and the VP8 munger: a consumer's packets (sequence numbers, timestamps,
//! arrival gaps, picture IDs) with source switches, as layer changes cause them. Output sequence
//! numbers of forwarded packets never repeat.
#![no_main]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use switchboard::sfu::rewriter::{RtpIn, RtpRewriter, Vp8Munger};

fuzz_target!(|data: &[u8]| {
    let Some((&first, ops)) = data.split_first() else {
        return;
    };
    let clock = if first & 1 == 0 { 90_000 } else { 48_000 };
    let mut rw = RtpRewriter::new(clock, u16::from(first) << 8, u32::from(first) << 16);
    let mut vp8 = Vp8Munger::default();
    let t0 = Instant::now();
    let mut sent = HashSet::new();
    let mut last_switch = 0usize;
    for (i, op) in ops.chunks_exact(8).enumerate() {
        let seq = u64::from(u16::from_be_bytes([op[1], op[2]])) + (u64::from(op[0] >> 6) << 16);
        let ts = u64::from(u32::from_be_bytes([op[3], op[4], op[5], op[6]]));
        let arrival = t0 + Duration::from_millis(u64::from(op[7]) * i as u64);
        let pkt = RtpIn { seq, ts, arrival };
        let pic = (op[0] & 2 != 0).then(|| u16::from_be_bytes([op[1], op[6]]) & 0x7fff);
        let tl0 = (op[0] & 4 != 0).then_some(op[5]);
        if op[0] & 1 != 0 {
            let out = rw.switch_to(pkt);
            vp8.switch_to(pic, tl0);
            last_switch = i;
            assert!(
                sent.insert(out.seq),
                "a switch reused output seq {}",
                out.seq
            );
        } else if let Ok(out) = rw.rewrite(pkt) {
            assert!(sent.insert(out.seq), "output seq {} sent twice", out.seq);
        }
        let (p, t) = vp8.rewrite(pic, tl0);
        assert_eq!(p.is_some(), pic.is_some());
        assert_eq!(t.is_some(), tl0.is_some());
        if let Some(p) = p {
            assert!(p <= 0x7fff, "picture ID {p} has 15 bits");
        }
    }
    let _ = (rw.next_seq(), last_switch);
});
