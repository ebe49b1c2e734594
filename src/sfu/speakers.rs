//! Active-speaker detection from the RFC 6464 audio level (`ssrc-audio-level`) of each
//! participant's audio. Pure, time passed in.
//!
//! Each observation is the level in -dBov (0 loudest, -127 silence). Per speaker the detector keeps
//! an exponentially smoothed loudness (`127 + level`, time constant [`SMOOTHING`]); a speaker whose
//! smoothed loudness is at least [`SPEAKING_THRESHOLD`] is speaking. A speaker not heard for
//! [`SILENCE_AFTER`] counts as silent. [`SpeakerDetector::poll`] returns the speaking set, loudest
//! first, when it differs from the last one returned, and at most once per [`MIN_INTERVAL`]
//! (4 times a second).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Smoothing time constant.
pub const SMOOTHING: Duration = Duration::from_millis(300);
/// Loudness (127 + dBov) at or above which a speaker counts as speaking: -50 dBov.
pub const SPEAKING_THRESHOLD: f64 = 77.0;
/// A speaker silent (no packet with a level) this long stops speaking.
pub const SILENCE_AFTER: Duration = Duration::from_millis(600);
/// Least time between two reported changes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
struct Level {
    loudness: f64,
    at: Instant,
}

/// Detects who is speaking in one room.
#[derive(Debug, Clone)]
pub struct SpeakerDetector<K> {
    levels: HashMap<K, Level>,
    last: Vec<K>,
    last_at: Option<Instant>,
}

impl<K> Default for SpeakerDetector<K> {
    fn default() -> Self {
        Self {
            levels: HashMap::new(),
            last: Vec::new(),
            last_at: None,
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> SpeakerDetector<K> {
    /// Records one audio level, in -dBov (values above 0 are clamped).
    pub fn observe(&mut self, who: &K, level_dbov: i8, now: Instant) {
        let x = 127.0 + f64::from(level_dbov.clamp(-127, 0));
        match self.levels.get_mut(who) {
            Some(l) => {
                let dt = now.saturating_duration_since(l.at).as_secs_f64();
                let alpha = 1.0 - (-dt / SMOOTHING.as_secs_f64()).exp();
                l.loudness += (x - l.loudness) * alpha;
                l.at = l.at.max(now);
            }
            None => {
                // A new speaker starts from silence, so one loud packet is not enough.
                let mut l = Level {
                    loudness: 0.0,
                    at: now,
                };
                l.loudness += x * (1.0 - (-0.02 / SMOOTHING.as_secs_f64()).exp());
                self.levels.insert(who.clone(), l);
            }
        }
    }

    /// Forgets a speaker (left the room or unpublished audio).
    pub fn remove(&mut self, who: &K) {
        self.levels.remove(who);
    }

    /// The current speaking set, loudest first.
    pub fn speaking(&self, now: Instant) -> Vec<K> {
        let mut v: Vec<(&K, f64)> = self
            .levels
            .iter()
            .filter(|(_, l)| {
                now.saturating_duration_since(l.at) < SILENCE_AFTER
                    && l.loudness >= SPEAKING_THRESHOLD
            })
            .map(|(k, l)| (k, l.loudness))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        v.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// The speaking set if it changed since the last report and the rate limit allows.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<K>> {
        if let Some(at) = self.last_at
            && now.saturating_duration_since(at) < MIN_INTERVAL
        {
            return None;
        }
        let cur = self.speaking(now);
        if cur == self.last {
            return None;
        }
        self.last = cur.clone();
        self.last_at = Some(now);
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `who` a level every 20 ms over [from, to) ms.
    fn feed(
        d: &mut SpeakerDetector<&'static str>,
        t0: Instant,
        who: &'static str,
        lvl: i8,
        from: u64,
        to: u64,
    ) {
        let mut t = from;
        while t < to {
            d.observe(&who, lvl, t0 + Duration::from_millis(t));
            t += 20;
        }
    }

    #[test]
    fn a_steady_talker_is_reported_once_and_a_silent_one_never() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, "bob", -100, 0, 2000);
        feed(&mut d, t0, "alice", -30, 0, 60);
        assert_eq!(d.poll(ms(60)), None, "one burst is not speech yet");
        feed(&mut d, t0, "alice", -30, 60, 1000);
        assert_eq!(d.poll(ms(1000)), Some(vec!["alice"]));
        assert_eq!(d.poll(ms(1500)), None, "no change, no report");
    }

    #[test]
    fn order_is_loudest_first_and_silence_ends_speaking() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, "alice", -40, 0, 1000);
        feed(&mut d, t0, "bob", -20, 0, 1000);
        assert_eq!(d.poll(ms(1000)), Some(vec!["bob", "alice"]));
        // Bob stops sending; Alice goes on.
        feed(&mut d, t0, "alice", -40, 1000, 2000);
        assert_eq!(d.poll(ms(2000)), Some(vec!["alice"]));
        // Alice goes quiet (-90 dBov): smoothed level decays below the threshold.
        feed(&mut d, t0, "alice", -90, 2000, 3000);
        assert_eq!(d.poll(ms(3000)), Some(vec![]));
    }

    #[test]
    fn reports_are_rate_limited_to_four_a_second() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, "a", -10, 0, 500);
        assert!(d.poll(ms(500)).is_some());
        d.remove(&"a");
        assert_eq!(d.poll(ms(600)), None, "changed but within 250 ms");
        assert_eq!(d.poll(ms(750)), Some(vec![]));
    }
}
