//! The meter on a virtual clock.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::codec::Resolution;

const HD: Resolution = Resolution {
    width: 1280,
    height: 720,
};
const FULL_HD: Resolution = Resolution {
    width: 1920,
    height: 1080,
};
const QVGA: Resolution = Resolution {
    width: 320,
    height: 180,
};
const UHD: Resolution = Resolution {
    width: 3840,
    height: 2160,
};

fn call(s: &str) -> CallId {
    CallId::parse(s).expect("call id")
}
fn user(s: &str) -> UserId {
    UserId::parse(s).expect("user id")
}
fn track(s: &str) -> TrackId {
    TrackId::parse(s).expect("track id")
}

fn ev(at_ms: u64, u: &str, t: &str, forwarding: Forwarding) -> ConsumerUpdate {
    ConsumerUpdate {
        at_ms,
        call_id: call("c1"),
        user_id: user(u),
        track_id: track(t),
        forwarding,
    }
}

fn meter() -> TierMeter {
    TierMeter::new(&BillingConfig::default())
}

/// (user, tier, start, end) of each record.
fn rows(records: &[UsageRecord]) -> Vec<(String, String, u64, u64)> {
    records
        .iter()
        .map(|r| (r.user_id.to_string(), r.tier.clone(), r.start_ms, r.end_ms))
        .collect()
}

fn row(u: &str, tier: &str, start: u64, end: u64) -> (String, String, u64, u64) {
    (u.to_owned(), tier.to_owned(), start, end)
}

/// Applies events in order, collecting every closed segment.
fn run(m: &mut TierMeter, events: Vec<ConsumerUpdate>) -> Vec<UsageRecord> {
    events.into_iter().flat_map(|e| m.apply(e)).collect()
}

#[test]
fn tiers_follow_the_aggregate_through_every_threshold() {
    let m = meter();
    for (pixels, tier) in [
        (0, "audio"),
        (1, "hd"),
        (921_600, "hd"),
        (921_601, "full_hd"),
        (2_073_600, "full_hd"),
        (2_073_601, "2k"),
        (3_686_400, "2k"),
        (8_847_360, "4k"),
        (8_847_361, "4k_plus"),
        (u64::MAX, "4k_plus"),
    ] {
        assert_eq!(m.tier_for_pixels(pixels), tier, "{pixels}");
    }
}

#[test]
fn audio_only_is_metered_in_the_audio_tier() {
    let mut m = meter();
    assert!(run(&mut m, vec![ev(1_000, "bob", "a1", Forwarding::Audio)]).is_empty());
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("audio"));
    let closed = m.apply(ev(4_500, "bob", "a1", Forwarding::Stopped));
    assert_eq!(rows(&closed), vec![row("bob", "audio", 1_000, 4_500)]);
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), None);
    assert_eq!(m.receiving(), 0);
}

#[test]
fn a_tier_change_closes_the_segment_and_starts_the_next_at_the_same_instant() {
    let mut m = meter();
    let closed = run(
        &mut m,
        vec![
            ev(0, "bob", "a1", Forwarding::Audio),
            ev(2_000, "bob", "v1", Forwarding::Video(QVGA)),
            ev(5_000, "bob", "v1", Forwarding::Video(FULL_HD)),
        ],
    );
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "audio", 0, 2_000),
            row("bob", "hd", 2_000, 5_000)
        ]
    );
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("full_hd"));
    assert_eq!(
        rows(&m.flush(6_000)),
        vec![row("bob", "full_hd", 5_000, 6_000)]
    );
}

#[test]
fn two_streams_sum_across_a_threshold() {
    let mut m = meter();
    let closed = run(
        &mut m,
        vec![
            ev(0, "bob", "v1", Forwarding::Video(HD)),
            // 1280x720 + 1280x720 = 1,843,200: full_hd.
            ev(1_000, "bob", "v2", Forwarding::Video(HD)),
            // 1920x1080 + 1280x720 = 2,995,200: 2k.
            ev(3_000, "bob", "v1", Forwarding::Video(FULL_HD)),
            // v2 stops: v1 alone, 1920x1080, is full_hd.
            ev(7_000, "bob", "v2", Forwarding::Stopped),
        ],
    );
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "hd", 0, 1_000),
            row("bob", "full_hd", 1_000, 3_000),
            row("bob", "2k", 3_000, 7_000),
        ]
    );
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("full_hd"));
}

#[test]
fn simulcast_layer_switches_on_one_consumer_replace_its_size() {
    let mut m = meter();
    let closed = run(
        &mut m,
        vec![
            ev(0, "bob", "v1", Forwarding::Video(QVGA)),
            ev(1_000, "bob", "v1", Forwarding::Video(HD)), // same tier: no segment
            ev(2_000, "bob", "v1", Forwarding::Video(FULL_HD)),
            ev(3_000, "bob", "v1", Forwarding::Video(QVGA)),
            ev(3_000, "bob", "v1", Forwarding::Video(UHD)), // same instant: nothing zero-length
        ],
    );
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "hd", 0, 2_000),
            row("bob", "full_hd", 2_000, 3_000)
        ]
    );
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("4k"));
    // A replaced layer is not summed with the old one: 3840x2160 alone is 4k, not 4k_plus.
    assert_eq!(rows(&m.flush(4_000)), vec![row("bob", "4k", 3_000, 4_000)]);
}

#[test]
fn a_resolution_change_mid_stream_is_a_tier_change_when_it_crosses_a_bound() {
    let mut m = meter();
    let a = Resolution {
        width: 1280,
        height: 720,
    };
    let b = Resolution {
        width: 1281,
        height: 720,
    };
    let closed = run(
        &mut m,
        vec![
            ev(10, "bob", "v1", Forwarding::Video(a)),
            ev(20, "bob", "v1", Forwarding::Video(b)),
        ],
    );
    assert_eq!(rows(&closed), vec![row("bob", "hd", 10, 20)]);
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("full_hd"));
}

#[test]
fn pause_and_resume_leave_a_gap_that_is_not_metered() {
    let mut m = meter();
    let mut closed = run(
        &mut m,
        vec![
            ev(0, "bob", "v1", Forwarding::Video(HD)),
            ev(5_000, "bob", "v1", Forwarding::Stopped),
            ev(8_000, "bob", "v1", Forwarding::Video(HD)),
        ],
    );
    closed.extend(m.flush(9_000));
    assert_eq!(
        rows(&closed),
        vec![row("bob", "hd", 0, 5_000), row("bob", "hd", 8_000, 9_000)]
    );
}

#[test]
fn a_user_leaving_and_rejoining_gets_a_new_segment_key() {
    let mut m = meter();
    let mut closed = run(
        &mut m,
        vec![
            ev(0, "bob", "a1", Forwarding::Audio),
            ev(0, "bob", "v1", Forwarding::Video(HD)),
            // Leaving: every consumer stops at the same instant.
            ev(4_000, "bob", "a1", Forwarding::Stopped),
            ev(4_000, "bob", "v1", Forwarding::Stopped),
            // Rejoining at the very instant of leaving: keys must still be unique.
            ev(4_000, "bob", "a1", Forwarding::Audio),
        ],
    );
    closed.extend(m.end_call(&call("c1"), 6_000));
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "hd", 0, 4_000),
            row("bob", "audio", 4_000, 6_000)
        ]
    );
    assert_eq!(m.receiving(), 0);
}

#[test]
fn two_subscribers_of_the_same_track_are_metered_apart() {
    let mut m = meter();
    let mut closed = run(
        &mut m,
        vec![
            ev(0, "bob", "v1", Forwarding::Video(FULL_HD)),
            ev(0, "carol", "v1", Forwarding::Video(QVGA)),
            ev(0, "carol", "a1", Forwarding::Audio),
        ],
    );
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("full_hd"));
    assert_eq!(m.current_tier(&call("c1"), &user("carol")), Some("hd"));
    let per_tier = m.users_per_tier();
    assert_eq!(
        per_tier,
        vec![
            ("audio", 0),
            ("hd", 1),
            ("full_hd", 1),
            ("2k", 0),
            ("4k", 0),
            ("4k_plus", 0)
        ]
    );
    closed.extend(m.flush(1_000));
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "full_hd", 0, 1_000),
            row("carol", "hd", 0, 1_000)
        ]
    );
    assert!(m.users_per_tier().iter().all(|(_, n)| *n == 0));
}

#[test]
fn checkpoints_cut_running_segments_contiguously_and_sum_exactly() {
    let mut m = meter(); // checkpoint 10 s
    let mut closed = run(&mut m, vec![ev(1_000, "bob", "v1", Forwarding::Video(HD))]);
    assert_eq!(m.next_deadline(), Some(11_000));
    assert!(m.tick(10_999).is_empty());
    // The shell wakes at each deadline.
    while let Some(deadline) = m.next_deadline() {
        if deadline > 35_000 {
            break;
        }
        let cut = m.tick(deadline);
        assert_eq!(cut.len(), 1);
        closed.extend(cut);
    }
    closed.extend(m.apply(ev(35_000, "bob", "v1", Forwarding::Video(FULL_HD))));
    closed.extend(m.flush(37_500));
    assert_eq!(
        rows(&closed),
        vec![
            row("bob", "hd", 1_000, 11_000),
            row("bob", "hd", 11_000, 21_000),
            row("bob", "hd", 21_000, 31_000),
            row("bob", "hd", 31_000, 35_000),
            row("bob", "full_hd", 35_000, 37_500),
        ]
    );
    assert!(closed.iter().all(|r| r.duration_ms() <= 10_000));
    assert!(closed.windows(2).all(|w| w[0].end_ms == w[1].start_ms));
    assert_eq!(
        closed.iter().map(UsageRecord::duration_ms).sum::<u64>(),
        36_500
    );
    assert_eq!(m.next_deadline(), None);
}

#[test]
fn a_tier_change_resets_the_checkpoint_deadline() {
    let mut m = meter();
    m.apply(ev(0, "bob", "v1", Forwarding::Video(HD)));
    m.apply(ev(0, "carol", "v1", Forwarding::Video(HD)));
    m.apply(ev(7_000, "bob", "v1", Forwarding::Video(FULL_HD)));
    assert_eq!(m.next_deadline(), Some(10_000)); // carol's
    assert_eq!(rows(&m.tick(10_000)), vec![row("carol", "hd", 0, 10_000)]);
    assert_eq!(m.next_deadline(), Some(17_000)); // bob's
}

#[test]
fn out_of_order_inputs_are_clamped_to_the_latest_time_seen() {
    let mut m = meter();
    let mut closed = run(
        &mut m,
        vec![
            ev(5_000, "bob", "v1", Forwarding::Video(HD)),
            ev(6_000, "bob", "v2", Forwarding::Video(HD)),
            // Late: says 4 s, applied at 6 s. It must not produce a segment running backwards.
            ev(4_000, "bob", "v2", Forwarding::Stopped),
        ],
    );
    assert_eq!(m.clamped_inputs(), 1);
    assert_eq!(m.now_ms(), 6_000);
    closed.extend(m.flush(3_000)); // also clamped
    assert_eq!(m.clamped_inputs(), 2);
    assert_eq!(
        rows(&closed),
        vec![row("bob", "hd", 5_000, 6_000)],
        "the full_hd stretch is zero-length after clamping"
    );
}

#[test]
fn end_call_closes_only_that_call() {
    let mut m = meter();
    m.apply(ev(0, "bob", "v1", Forwarding::Video(HD)));
    m.apply(ConsumerUpdate {
        call_id: call("c2"),
        ..ev(0, "bob", "v9", Forwarding::Audio)
    });
    let closed = m.end_call(&call("c1"), 2_000);
    assert_eq!(rows(&closed), vec![row("bob", "hd", 0, 2_000)]);
    assert_eq!(m.current_tier(&call("c2"), &user("bob")), Some("audio"));
    assert_eq!(m.users_per_tier()[0], ("audio", 1));
    assert_eq!(m.users_per_tier()[1], ("hd", 0));
}

#[test]
fn stopping_an_unknown_consumer_changes_nothing() {
    let mut m = meter();
    assert!(m.apply(ev(5, "bob", "v1", Forwarding::Stopped)).is_empty());
    m.apply(ev(10, "bob", "v1", Forwarding::Video(HD)));
    assert!(m.apply(ev(20, "bob", "v2", Forwarding::Stopped)).is_empty());
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("hd"));
}

// ---------------------------------------------------------------- property

#[derive(Debug, Clone)]
enum Step {
    Update {
        dt: i64,
        call: usize,
        user: usize,
        track: usize,
        fwd: Option<Option<(u32, u32)>>,
    },
    Tick {
        dt: i64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let size = prop_oneof![
        Just((320u32, 180u32)),
        Just((1280, 720)),
        Just((1920, 1080)),
        Just((3840, 2160)),
        (1u32..4000, 1u32..2500),
    ];
    let fwd = prop_oneof![
        2 => Just(None),
        1 => Just(Some(None)),
        3 => size.prop_map(|s| Some(Some(s))),
    ];
    prop_oneof![
        4 => (-2_000i64..15_000, 0usize..2, 0usize..3, 0usize..3, fwd).prop_map(
            |(dt, call, user, track, fwd)| Step::Update { dt, call, user, track, fwd }
        ),
        1 => (0i64..25_000).prop_map(|dt| Step::Tick { dt }),
    ]
}

/// The specification, written independently: per (call, user) the active tracks, and from them the
/// maximal receiving intervals and the milliseconds per tier.
#[derive(Default)]
struct Model {
    active: BTreeMap<(usize, usize), BTreeMap<usize, u64>>,
    since: BTreeMap<(usize, usize), (u64, usize)>,
    receiving_from: BTreeMap<(usize, usize), u64>,
    intervals: BTreeMap<(usize, usize), Vec<(u64, u64)>>,
    per_tier: BTreeMap<(usize, usize, usize), u64>,
}

fn model_tier(pixels: u64) -> usize {
    let bounds = [0u64, 921_600, 2_073_600, 3_686_400, 8_847_360];
    bounds.iter().position(|&b| pixels <= b).unwrap_or(5)
}

impl Model {
    fn tier_of(&self, key: (usize, usize)) -> Option<usize> {
        let tracks = self.active.get(&key)?;
        if tracks.is_empty() {
            return None;
        }
        Some(model_tier(tracks.values().sum()))
    }

    fn set(&mut self, t: u64, key: (usize, usize), track: usize, pixels: Option<u64>) {
        let before = self.tier_of(key);
        let tracks = self.active.entry(key).or_default();
        match pixels {
            Some(p) => {
                tracks.insert(track, p);
            }
            None => {
                tracks.remove(&track);
            }
        }
        let after = self.tier_of(key);
        if before != after {
            if let Some((since, tier)) = self.since.remove(&key) {
                *self.per_tier.entry((key.0, key.1, tier)).or_default() += t - since;
            }
            if let Some(tier) = after {
                self.since.insert(key, (t, tier));
            }
        }
        match (before.is_some(), after.is_some()) {
            (false, true) => {
                self.receiving_from.insert(key, t);
            }
            (true, false) => {
                let from = self.receiving_from.remove(&key).unwrap_or(t);
                self.push_interval(key, from, t);
            }
            _ => {}
        }
    }

    fn push_interval(&mut self, key: (usize, usize), from: u64, to: u64) {
        if to <= from {
            return;
        }
        let v = self.intervals.entry(key).or_default();
        match v.last_mut() {
            Some(last) if last.1 == from => last.1 = to,
            _ => v.push((from, to)),
        }
    }

    fn finish(&mut self, t: u64) {
        let keys: Vec<_> = self.active.keys().copied().collect();
        for key in keys {
            let tracks: Vec<usize> = self.active[&key].keys().copied().collect();
            for track in tracks {
                self.set(t, key, track, None);
            }
        }
    }
}

const TIER_NAMES: [&str; 6] = ["audio", "hd", "full_hd", "2k", "4k", "4k_plus"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn segments_never_overlap_cover_receiving_time_exactly_and_bill_the_right_tier(
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let calls = [call("c0"), call("c1")];
        let users = [user("u0"), user("u1"), user("u2")];
        let tracks = [track("t0"), track("t1"), track("t2")];
        let mut m = meter();
        let mut model = Model::default();
        let mut records = Vec::new();
        let mut now: u64 = 0;
        let mut clock: i64 = 1_000_000;
        for s in steps {
            match s {
                Step::Update { dt, call: c, user: u, track: t, fwd } => {
                    clock += dt;
                    let at = clock.max(0) as u64;
                    now = now.max(at); // the documented clamp
                    let (forwarding, pixels) = match fwd {
                        None => (Forwarding::Stopped, None),
                        Some(None) => (Forwarding::Audio, Some(0)),
                        Some(Some((w, h))) => (
                            Forwarding::Video(Resolution { width: w, height: h }),
                            Some(u64::from(w) * u64::from(h)),
                        ),
                    };
                    records.extend(m.apply(ConsumerUpdate {
                        at_ms: at,
                        call_id: calls[c].clone(),
                        user_id: users[u].clone(),
                        track_id: tracks[t].clone(),
                        forwarding,
                    }));
                    model.set(now, (c, u), t, pixels);
                }
                Step::Tick { dt } => {
                    clock += dt;
                    now = now.max(clock.max(0) as u64);
                    let cut = m.tick(clock.max(0) as u64);
                    records.extend(cut);
                }
            }
        }
        records.extend(m.flush(now + 1));
        model.finish(now + 1);
        prop_assert_eq!(m.receiving(), 0);

        let mut by_key: BTreeMap<(usize, usize), Vec<&UsageRecord>> = BTreeMap::new();
        let mut starts = std::collections::BTreeSet::new();
        for r in &records {
            prop_assert!(r.end_ms > r.start_ms, "zero-length {:?}", r);
            prop_assert!(starts.insert((r.call_id.clone(), r.user_id.clone(), r.start_ms)), "duplicate key {:?}", r);
            let c = calls.iter().position(|x| *x == r.call_id).unwrap();
            let u = users.iter().position(|x| *x == r.user_id).unwrap();
            by_key.entry((c, u)).or_default().push(r);
        }
        let mut tier_ms: BTreeMap<(usize, usize, usize), u64> = BTreeMap::new();
        for (key, mut segs) in by_key.clone() {
            segs.sort_by_key(|r| r.start_ms);
            for w in segs.windows(2) {
                prop_assert!(w[0].end_ms <= w[1].start_ms, "overlap {:?}", w);
            }
            // Merge touching segments: the result must be exactly the receiving intervals.
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for r in &segs {
                match merged.last_mut() {
                    Some(last) if last.1 == r.start_ms => last.1 = r.end_ms,
                    _ => merged.push((r.start_ms, r.end_ms)),
                }
                let tier = TIER_NAMES.iter().position(|n| *n == r.tier).unwrap();
                *tier_ms.entry((key.0, key.1, tier)).or_default() += r.duration_ms();
            }
            let want = model.intervals.get(&key).cloned().unwrap_or_default();
            prop_assert_eq!(merged, want, "key {:?}", key);
        }
        for key in model.intervals.keys() {
            prop_assert!(by_key.contains_key(key), "no segments for receiving {:?}", key);
        }
        let model_tiers: BTreeMap<_, _> = model.per_tier.into_iter().filter(|(_, ms)| *ms > 0).collect();
        prop_assert_eq!(tier_ms, model_tiers);
    }
}

#[test]
fn checkpoint_now_closes_running_segments_and_keeps_metering() {
    let mut m = meter();
    assert!(
        m.apply(ev(1_000, "bob", "t1", Forwarding::Video(HD)))
            .is_empty()
    );
    assert_eq!(
        rows(&m.checkpoint_now(4_000)),
        vec![row("bob", "hd", 1_000, 4_000)]
    );
    // Nothing to close twice at the same instant, and metering goes on.
    assert!(m.checkpoint_now(4_000).is_empty());
    assert_eq!(m.current_tier(&call("c1"), &user("bob")), Some("hd"));
    assert_eq!(m.current_pixels(&call("c1"), &user("bob")), Some(921_600));
    assert_eq!(
        rows(&m.apply(ev(6_500, "bob", "t1", Forwarding::Stopped))),
        vec![row("bob", "hd", 4_000, 6_500)]
    );
}
