//! The per-consumer RTP rewriter (mediasoup's `SeqManager`, LiveKit's `rtpmunger`).
//!
//! A consumer forwards packets from one producer (a simulcast layer) at a time, and may switch
//! to another. The subscriber must see one continuous stream: its sequence numbers go up by one
//! per forwarded packet with no gap and no reuse across a switch, and its timestamps keep moving
//! forward. The rewriter keeps an offset per current source:
//!
//! - `out_seq = in_seq + seq_offset`, where the offset is chosen at the switch so that the first
//!   packet of the new source gets `last_out_seq + 1`;
//! - `out_ts = in_ts + ts_offset`, chosen so the first timestamp of the new source lies after
//!   the last one sent by the wall-clock time elapsed between the two packets (at least 1 tick).
//!
//! Input sequence numbers and timestamps are *extended* (64-bit, as str0m delivers them), so the
//! arithmetic never has to reason about 16-bit or 32-bit rollover; the output sequence number is
//! extended too (str0m derives the SRTP rollover counter from it) and starts below 65 536, as
//! str0m requires without out-of-band ROC signalling. The output timestamp is truncated to the
//! 32 bits of the RTP header.
//!
//! Invariants: a packet older than the switch point of its source is dropped (its output number
//! would collide with the previous source's); a duplicate (an input sequence number already
//! forwarded within the last [`DUP_WINDOW`] packets) is dropped; a packet older than that window
//! is dropped. Out-of-order packets inside the window are forwarded with their own mapped number,
//! so the subscriber sees the same reordering the publisher's network produced.
//!
//! Pure: time is passed in.

use std::time::Instant;

/// How many input sequence numbers behind the highest one are remembered for duplicate
/// detection; older packets are dropped.
pub const DUP_WINDOW: u64 = 128;

/// One packet as it enters the rewriter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpIn {
    /// Extended input sequence number.
    pub seq: u64,
    /// Extended input timestamp, in the codec's clock rate.
    pub ts: u64,
    /// When the packet arrived.
    pub arrival: Instant,
}

/// The rewritten numbers of one forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpOut {
    /// Extended output sequence number (low 16 bits go on the wire).
    pub seq: u64,
    /// Output RTP timestamp.
    pub ts: u32,
}

/// Why the rewriter refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteDrop {
    /// The packet precedes the point where the consumer switched to its source.
    BeforeSwitch,
    /// The same input sequence number was already forwarded.
    Duplicate,
    /// The packet is older than the duplicate window.
    TooOld,
    /// No source has been started yet (the forwarder has not chosen a starting packet).
    NotStarted,
}

#[derive(Debug, Clone)]
struct Source {
    seq_offset: u64,
    ts_offset: u64,
    first_in_seq: u64,
    highest_in_seq: u64,
    /// Bit `i` set: input `highest_in_seq - i` was forwarded.
    seen: u128,
}

/// Rewrites sequence numbers and timestamps for one consumer.
#[derive(Debug, Clone)]
pub struct RtpRewriter {
    clock_rate: u32,
    next_seq: u64,
    last_out_ts: Option<u64>,
    last_arrival: Option<Instant>,
    source: Option<Source>,
}

impl RtpRewriter {
    /// A rewriter whose first output sequence number is `initial_seq` and whose first output
    /// timestamp is `initial_ts`. `clock_rate` is the codec's RTP clock (90 000 for video).
    pub fn new(clock_rate: u32, initial_seq: u16, initial_ts: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1),
            next_seq: u64::from(initial_seq),
            last_out_ts: Some(u64::from(initial_ts)),
            last_arrival: None,
            source: None,
        }
    }

    /// The next output sequence number (one past the last one handed out).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Starts forwarding a new source (first packet, a layer switch, or a resume) with `pkt`,
    /// which the forwarder chose (normally the first packet of a keyframe), and rewrites it.
    pub fn switch_to(&mut self, pkt: RtpIn) -> RtpOut {
        let out_seq = self.next_seq;
        let out_ts = match (self.last_out_ts, self.last_arrival) {
            (Some(last_ts), Some(last_at)) => {
                let elapsed = pkt.arrival.saturating_duration_since(last_at);
                let ticks = (elapsed.as_micros() as u64).saturating_mul(u64::from(self.clock_rate))
                    / 1_000_000;
                last_ts.wrapping_add(ticks.max(1))
            }
            // First packet ever: start at the initial timestamp.
            (Some(initial), None) => initial,
            (None, _) => pkt.ts,
        };
        self.source = Some(Source {
            seq_offset: out_seq.wrapping_sub(pkt.seq),
            ts_offset: out_ts.wrapping_sub(pkt.ts),
            first_in_seq: pkt.seq,
            highest_in_seq: pkt.seq,
            seen: 1,
        });
        self.next_seq = out_seq + 1;
        self.last_out_ts = Some(out_ts);
        self.last_arrival = Some(pkt.arrival);
        RtpOut {
            seq: out_seq,
            ts: out_ts as u32,
        }
    }

    /// Rewrites a packet of the current source.
    pub fn rewrite(&mut self, pkt: RtpIn) -> Result<RtpOut, RewriteDrop> {
        let Some(src) = self.source.as_mut() else {
            return Err(RewriteDrop::NotStarted);
        };
        if pkt.seq < src.first_in_seq {
            return Err(RewriteDrop::BeforeSwitch);
        }
        let newest = pkt.seq > src.highest_in_seq;
        if newest {
            let shift = pkt.seq - src.highest_in_seq;
            src.seen = if shift >= 128 { 0 } else { src.seen << shift };
            src.seen |= 1;
            src.highest_in_seq = pkt.seq;
        } else {
            let back = src.highest_in_seq - pkt.seq;
            if back >= DUP_WINDOW {
                return Err(RewriteDrop::TooOld);
            }
            let bit = 1u128 << back;
            if src.seen & bit != 0 {
                return Err(RewriteDrop::Duplicate);
            }
            src.seen |= bit;
        }
        let out_seq = pkt.seq.wrapping_add(src.seq_offset);
        let out_ts = pkt.ts.wrapping_add(src.ts_offset);
        if out_seq >= self.next_seq {
            self.next_seq = out_seq + 1;
        }
        if newest {
            self.last_out_ts = Some(out_ts);
            self.last_arrival = Some(pkt.arrival);
        }
        Ok(RtpOut {
            seq: out_seq,
            ts: out_ts as u32,
        })
    }
}

/// Rewrites VP8 picture IDs (15-bit) and TL0PICIDX (8-bit) across source switches, so a decoder
/// never sees them jump backwards or repeat when the consumer changes simulcast layer.
#[derive(Debug, Clone, Default)]
pub struct Vp8Munger {
    pic_offset: u16,
    tl0_offset: u8,
    last_pic: Option<u16>,
    last_tl0: Option<u8>,
}

impl Vp8Munger {
    /// Re-bases the offsets so the switching packet's picture follows the last one sent.
    pub fn switch_to(&mut self, picture_id: Option<u16>, tl0: Option<u8>) {
        if let Some(p) = picture_id {
            let want = self.last_pic.map_or(p, |l| l.wrapping_add(1) & 0x7fff);
            self.pic_offset = want.wrapping_sub(p) & 0x7fff;
        }
        if let Some(t) = tl0 {
            let want = self.last_tl0.map_or(t, |l| l.wrapping_add(1));
            self.tl0_offset = want.wrapping_sub(t);
        }
    }

    /// The rewritten picture ID and TL0PICIDX for a packet of the current source.
    pub fn rewrite(
        &mut self,
        picture_id: Option<u16>,
        tl0: Option<u8>,
    ) -> (Option<u16>, Option<u8>) {
        let pic = picture_id.map(|p| p.wrapping_add(self.pic_offset) & 0x7fff);
        let t = tl0.map(|t| t.wrapping_add(self.tl0_offset));
        if pic.is_some() {
            self.last_pic = pic;
        }
        if t.is_some() {
            self.last_tl0 = t;
        }
        (pic, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn pkt(seq: u64, ts: u64, arrival: Instant) -> RtpIn {
        RtpIn { seq, ts, arrival }
    }

    #[test]
    fn first_packet_starts_at_initial_numbers_and_then_follows_input_deltas() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000, 1000, 5000);
        assert_eq!(rw.rewrite(pkt(7, 70, t0)), Err(RewriteDrop::NotStarted));
        let a = rw.switch_to(pkt(40_000, 1_000_000, t0));
        assert_eq!(
            a,
            RtpOut {
                seq: 1000,
                ts: 5000
            }
        );
        let b = rw.rewrite(pkt(40_001, 1_003_000, at(t0, 33))).unwrap();
        assert_eq!(
            b,
            RtpOut {
                seq: 1001,
                ts: 8000
            }
        );
    }

    #[test]
    fn output_is_gap_free_across_a_switch_and_timestamps_advance_by_elapsed_time() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000, 65_530, 4_294_967_000);
        rw.switch_to(pkt(100, 9_000, t0));
        for i in 1..10u64 {
            rw.rewrite(pkt(100 + i, 9_000 + i * 3000, at(t0, i * 33)))
                .unwrap();
        }
        // Last out: seq 65_539 (wrapped past 16 bits), ts base + 27000.
        assert_eq!(rw.next_seq(), 65_540);
        // Switch to a source with unrelated numbers 10 ms after the last packet.
        let s = rw.switch_to(pkt(5, 777_777, at(t0, 9 * 33 + 10)));
        assert_eq!(s.seq, 65_540);
        assert_eq!(s.seq as u16, 4, "16-bit wire value wraps");
        let expected_ts = (4_294_967_000u64 + 27_000 + 900) as u32;
        assert_eq!(
            s.ts, expected_ts,
            "ts advances by 10 ms at 90 kHz across the 32-bit wrap"
        );
        let n = rw.rewrite(pkt(6, 780_777, at(t0, 9 * 33 + 43))).unwrap();
        assert_eq!(n.seq, 65_541);
        assert_eq!(n.ts, expected_ts.wrapping_add(3000));
    }

    #[test]
    fn input_sequence_and_timestamp_wraparound_is_continuous() {
        // str0m extends numbers, so a 16-bit wrap on input is seq 65_535 -> 65_536.
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(48_000, 10, 0);
        rw.switch_to(pkt(65_534, (1u64 << 32) - 960, t0));
        let a = rw.rewrite(pkt(65_535, 1u64 << 32, at(t0, 20))).unwrap();
        let b = rw
            .rewrite(pkt(65_536, (1u64 << 32) + 960, at(t0, 40)))
            .unwrap();
        assert_eq!((a.seq, b.seq), (11, 12));
        assert_eq!((a.ts, b.ts), (960, 1920));
    }

    #[test]
    fn out_of_order_packets_keep_their_own_numbers_and_duplicates_are_dropped() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000, 0, 0);
        rw.switch_to(pkt(500, 0, t0));
        assert_eq!(rw.rewrite(pkt(502, 0, t0)).unwrap().seq, 2);
        assert_eq!(
            rw.rewrite(pkt(501, 0, t0)).unwrap().seq,
            1,
            "late packet fills its slot"
        );
        assert_eq!(rw.rewrite(pkt(501, 0, t0)), Err(RewriteDrop::Duplicate));
        assert_eq!(rw.rewrite(pkt(502, 0, t0)), Err(RewriteDrop::Duplicate));
        assert_eq!(rw.rewrite(pkt(500, 0, t0)), Err(RewriteDrop::Duplicate));
        assert_eq!(rw.rewrite(pkt(499, 0, t0)), Err(RewriteDrop::BeforeSwitch));
        assert_eq!(rw.next_seq(), 3);
        // Far ahead, then something older than the window.
        assert_eq!(rw.rewrite(pkt(800, 0, t0)).unwrap().seq, 300);
        assert_eq!(rw.rewrite(pkt(600, 0, t0)), Err(RewriteDrop::TooOld));
        assert_eq!(rw.rewrite(pkt(700, 0, t0)).unwrap().seq, 200);
    }

    #[test]
    fn a_late_packet_of_the_old_source_cannot_collide_after_a_switch() {
        let t0 = Instant::now();
        let mut rw = RtpRewriter::new(90_000, 0, 0);
        rw.switch_to(pkt(10, 0, t0));
        rw.rewrite(pkt(11, 0, t0)).unwrap();
        let s = rw.switch_to(pkt(9000, 0, at(t0, 5)));
        assert_eq!(s.seq, 2);
        // A reordered packet of the new source from before its switch point is refused.
        assert_eq!(rw.rewrite(pkt(8999, 0, t0)), Err(RewriteDrop::BeforeSwitch));
    }

    #[test]
    fn vp8_picture_ids_continue_across_switches_and_wrap_at_15_bits() {
        let mut m = Vp8Munger::default();
        m.switch_to(Some(32_766), Some(255));
        assert_eq!(
            m.rewrite(Some(32_766), Some(255)),
            (Some(32_766), Some(255))
        );
        assert_eq!(m.rewrite(Some(32_767), Some(0)), (Some(32_767), Some(0)));
        m.switch_to(Some(100), Some(7));
        assert_eq!(m.rewrite(Some(100), Some(7)), (Some(0), Some(1)));
        assert_eq!(m.rewrite(Some(101), Some(8)), (Some(1), Some(2)));
        assert_eq!(m.rewrite(None, None), (None, None));
    }

    proptest::proptest! {
        #[test]
        fn output_sequence_never_repeats_for_in_order_sources(
            starts in proptest::collection::vec((0u64..200_000, 1usize..50), 1..8),
            init in 0u16..=u16::MAX,
        ) {
            let t0 = Instant::now();
            let mut rw = RtpRewriter::new(90_000, init, 0);
            let mut outs = Vec::new();
            for (k, (start, len)) in starts.iter().enumerate() {
                let t = at(t0, k as u64 * 100);
                outs.push(rw.switch_to(pkt(*start, 0, t)).seq);
                for i in 1..*len as u64 {
                    outs.push(rw.rewrite(pkt(start + i, 0, t)).unwrap().seq);
                }
            }
            for w in outs.windows(2) {
                proptest::prop_assert_eq!(w[1], w[0] + 1);
            }
        }
    }
}
