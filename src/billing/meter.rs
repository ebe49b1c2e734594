//! The tier meter: a pure state machine from consumer updates to closed usage segments.
//!
//! State: for each (call, user) that receives at least one stream, its active consumers (track → audio
//! or video of a measured size) and one running segment `(tier, start_ms)`. A user is in the map exactly
//! while they have a consumer, so "receiving" and "has a running segment" are the same fact.
//!
//! Rules (PROTOCOL.md section 5):
//! - The aggregate is the sum of `width × height` of the user's active video consumers in that call; the
//!   tier is the first configured tier whose `max_pixels` is not below it (the unbounded last tier
//!   otherwise). Only audio gives aggregate 0, the first (audio) tier.
//! - A segment closes when the tier changes, when the user stops receiving anything, at checkpoints
//!   ([`TierMeter::tick`]), when the call ends ([`TierMeter::end_call`]) and at shutdown
//!   ([`TierMeter::flush`]). Zero-length segments are never emitted, so `(call, user, start_ms)` is unique.
//!
//! Time: every input carries epoch milliseconds and must come in time order. An input earlier than the
//! latest time the meter has seen is clamped to that time (it takes effect "now"), so segments never run
//! backwards or overlap; the clamp is counted in [`TierMeter::clamped_inputs`] for a metric.

use std::collections::BTreeMap;

use super::{ConsumerUpdate, Forwarding, UsageRecord};
use crate::config::{BillingConfig, TierConfig};
use crate::ids::{CallId, TrackId, UserId};

/// What one consumer contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumed {
    Audio,
    /// Video of this many pixels.
    Video(u64),
}

#[derive(Debug)]
struct Subscriber {
    /// Active consumers; a user subscribes to a handful of tracks, so a vector beats a map.
    consumers: Vec<(TrackId, Consumed)>,
    /// Index of the running segment's tier.
    tier: usize,
    /// Start of the running segment.
    start_ms: u64,
}

impl Subscriber {
    fn aggregate_pixels(&self) -> u64 {
        self.consumers
            .iter()
            .map(|(_, c)| match c {
                Consumed::Audio => 0,
                Consumed::Video(p) => *p,
            })
            .fold(0, u64::saturating_add)
    }
}

/// Meters each user's receiving time per tier. See the module docs for the rules.
#[derive(Debug)]
pub struct TierMeter {
    tiers: Vec<TierConfig>,
    checkpoint_ms: u64,
    /// The latest time seen on any input.
    now_ms: u64,
    subscribers: BTreeMap<(CallId, UserId), Subscriber>,
    /// Users whose running segment is in each tier, index-aligned with `tiers`.
    users_in_tier: Vec<usize>,
    clamped_inputs: u64,
}

impl TierMeter {
    /// A meter with the configured tiers and checkpoint. The configuration is validated when loaded; here
    /// an empty tier list falls back to the defaults and a zero checkpoint to one second, so the meter
    /// works whatever it is given.
    pub fn new(config: &BillingConfig) -> Self {
        let tiers = if config.tiers.is_empty() {
            BillingConfig::default().tiers
        } else {
            config.tiers.clone()
        };
        let users_in_tier = vec![0; tiers.len()];
        Self {
            tiers,
            checkpoint_ms: config.checkpoint.max(1).saturating_mul(1000),
            now_ms: 0,
            subscribers: BTreeMap::new(),
            users_in_tier,
            clamped_inputs: 0,
        }
    }

    /// The tier index for an aggregate pixel count.
    fn tier_index(&self, pixels: u64) -> usize {
        super::tier_index(&self.tiers, pixels)
    }

    fn tier_name(&self, index: usize) -> &str {
        self.tiers.get(index).map_or("", |t| t.name.as_str())
    }

    /// The name of the tier an aggregate of `pixels` falls in.
    pub fn tier_for_pixels(&self, pixels: u64) -> &str {
        self.tier_name(self.tier_index(pixels))
    }

    /// Clamps an input time to the latest seen and advances it.
    fn advance(&mut self, at_ms: u64) -> u64 {
        if at_ms < self.now_ms {
            self.clamped_inputs += 1;
        } else {
            self.now_ms = at_ms;
        }
        self.now_ms
    }

    fn record(
        &self,
        call_id: &CallId,
        user_id: &UserId,
        tier: usize,
        start_ms: u64,
        end_ms: u64,
    ) -> Option<UsageRecord> {
        (end_ms > start_ms).then(|| UsageRecord {
            call_id: call_id.clone(),
            user_id: user_id.clone(),
            tier: self.tier_name(tier).to_owned(),
            start_ms,
            end_ms,
        })
    }

    fn count(&mut self, tier: usize, delta: isize) {
        if let Some(n) = self.users_in_tier.get_mut(tier) {
            *n = n.saturating_add_signed(delta);
        }
    }

    /// Applies one update; returns the segment it closed, if any (a tier change or the end of receiving).
    pub fn apply(&mut self, update: ConsumerUpdate) -> Vec<UsageRecord> {
        let now = self.advance(update.at_ms);
        let ConsumerUpdate {
            call_id,
            user_id,
            track_id,
            forwarding,
            ..
        } = update;
        let consumed = match forwarding {
            Forwarding::Stopped => None,
            Forwarding::Audio => Some(Consumed::Audio),
            Forwarding::Video(r) => Some(Consumed::Video(r.pixels())),
        };
        let key = (call_id, user_id);
        let mut closed = Vec::new();
        match consumed {
            None => {
                let Some(sub) = self.subscribers.get_mut(&key) else {
                    return closed; // stopping what was never started
                };
                sub.consumers.retain(|(t, _)| *t != track_id);
                if sub.consumers.is_empty() {
                    let (tier, start) = (sub.tier, sub.start_ms);
                    self.subscribers.remove(&key);
                    self.count(tier, -1);
                    closed.extend(self.record(&key.0, &key.1, tier, start, now));
                    return closed;
                }
            }
            Some(c) => match self.subscribers.get_mut(&key) {
                Some(sub) => match sub.consumers.iter_mut().find(|(t, _)| *t == track_id) {
                    Some(slot) => slot.1 = c,
                    None => sub.consumers.push((track_id, c)),
                },
                None => {
                    let tier = self.tier_index(match c {
                        Consumed::Audio => 0,
                        Consumed::Video(p) => p,
                    });
                    self.count(tier, 1);
                    self.subscribers.insert(
                        key,
                        Subscriber {
                            consumers: vec![(track_id, c)],
                            tier,
                            start_ms: now,
                        },
                    );
                    return closed;
                }
            },
        }
        // The user still receives: has the tier changed?
        let Some(pixels) = self.subscribers.get(&key).map(Subscriber::aggregate_pixels) else {
            return closed;
        };
        let tier = self.tier_index(pixels);
        let Some(sub) = self.subscribers.get_mut(&key) else {
            return closed;
        };
        if sub.tier == tier {
            return closed;
        }
        let (old_tier, start) = (sub.tier, sub.start_ms);
        sub.tier = tier;
        sub.start_ms = now;
        self.count(old_tier, -1);
        self.count(tier, 1);
        closed.extend(self.record(&key.0, &key.1, old_tier, start, now));
        closed
    }

    /// Checkpoint: closes every running segment that has run at least the checkpoint interval and starts
    /// its continuation at `now_ms`, so a crash loses at most one interval of usage.
    pub fn tick(&mut self, now_ms: u64) -> Vec<UsageRecord> {
        let checkpoint = self.checkpoint_ms;
        self.close_running(now_ms, checkpoint)
    }

    /// Closes every running segment at `now_ms` and starts the next one there, whatever its age, so
    /// the ledger is complete up to now while metering goes on (a report asked for mid-call).
    pub fn checkpoint_now(&mut self, now_ms: u64) -> Vec<UsageRecord> {
        self.close_running(now_ms, 1)
    }

    /// Closes the running segments at least `min_age_ms` old and restarts them at now.
    fn close_running(&mut self, now_ms: u64, min_age_ms: u64) -> Vec<UsageRecord> {
        let now = self.advance(now_ms);
        let mut closed = Vec::new();
        let tiers = &self.tiers;
        for ((call_id, user_id), sub) in &mut self.subscribers {
            if now.saturating_sub(sub.start_ms) >= min_age_ms {
                closed.push(UsageRecord {
                    call_id: call_id.clone(),
                    user_id: user_id.clone(),
                    tier: tiers
                        .get(sub.tier)
                        .map_or("", |t| t.name.as_str())
                        .to_owned(),
                    start_ms: sub.start_ms,
                    end_ms: now,
                });
                sub.start_ms = now;
            }
        }
        closed
    }

    /// When [`TierMeter::tick`] next has something to close: the earliest running segment's start plus
    /// the checkpoint interval. `None` when nobody is receiving.
    pub fn next_deadline(&self) -> Option<u64> {
        self.subscribers
            .values()
            .map(|s| s.start_ms.saturating_add(self.checkpoint_ms))
            .min()
    }

    /// Closes every running segment at `now_ms` and forgets all consumers (shutdown).
    pub fn flush(&mut self, now_ms: u64) -> Vec<UsageRecord> {
        let now = self.advance(now_ms);
        let subscribers = std::mem::take(&mut self.subscribers);
        self.users_in_tier.iter_mut().for_each(|n| *n = 0);
        subscribers
            .into_iter()
            .filter_map(|((c, u), s)| self.record(&c, &u, s.tier, s.start_ms, now))
            .collect()
    }

    /// Closes the running segments of every user in `call_id` at `now_ms` and forgets the call's
    /// consumers (the call ended or its room closed).
    pub fn end_call(&mut self, call_id: &CallId, now_ms: u64) -> Vec<UsageRecord> {
        let now = self.advance(now_ms);
        let keys: Vec<(CallId, UserId)> = self
            .subscribers
            .keys()
            .filter(|(c, _)| c == call_id)
            .cloned()
            .collect();
        let mut closed = Vec::new();
        for key in keys {
            if let Some(s) = self.subscribers.remove(&key) {
                self.count(s.tier, -1);
                closed.extend(self.record(&key.0, &key.1, s.tier, s.start_ms, now));
            }
        }
        closed
    }

    /// The tier a user is metered in now, `None` when they receive nothing in that call.
    pub fn current_tier(&self, call_id: &CallId, user_id: &UserId) -> Option<&str> {
        self.subscribers
            .get(&(call_id.clone(), user_id.clone()))
            .map(|s| self.tier_name(s.tier))
    }

    /// The aggregate pixels a user receives now in a call, `None` when they receive nothing.
    pub fn current_pixels(&self, call_id: &CallId, user_id: &UserId) -> Option<u64> {
        self.subscribers
            .get(&(call_id.clone(), user_id.clone()))
            .map(Subscriber::aggregate_pixels)
    }

    /// How many (call, user) pairs are metered in each tier now, in configured tier order, zeros
    /// included (for the `switchboard_users_in_tier` gauge).
    pub fn users_per_tier(&self) -> Vec<(&str, usize)> {
        self.tiers
            .iter()
            .zip(&self.users_in_tier)
            .map(|(t, &n)| (t.name.as_str(), n))
            .collect()
    }

    /// How many (call, user) pairs receive something now.
    pub fn receiving(&self) -> usize {
        self.subscribers.len()
    }

    /// The latest time the meter has seen.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// How many inputs came earlier than the latest time seen and were clamped to it.
    pub fn clamped_inputs(&self) -> u64 {
        self.clamped_inputs
    }
}

#[cfg(test)]
mod tests;
