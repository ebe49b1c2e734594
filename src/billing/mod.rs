//! Billing by resolution tier (PROTOCOL.md section 5).
//!
//! Place in the flow: the SFU emits a [`ConsumerUpdate`] whenever what it forwards to one subscriber on
//! one track changes (started, stopped, switched to a layer of another measured size). The pure
//! [`TierMeter`] turns those into closed [`UsageRecord`] segments, which the storage layer writes to the
//! usage ledger (keyed by `(call_id, user_id, start_ms)`, `INSERT OR IGNORE`). The pure [`report`]
//! functions aggregate ledger rows over a billing period for the admin API.
//!
//! Neither part reads the clock or does IO: time is passed in as epoch milliseconds.

pub mod meter;
pub mod report;

use serde::{Deserialize, Serialize};

use crate::codec::Resolution;
use crate::ids::{CallId, TrackId, UserId};

pub use meter::TierMeter;
pub use report::{CallUserTierUsage, ReportQuery, UsageReport, UsageRow, UserTierUsage};

/// The index of the tier an aggregate of `pixels` falls in: the first whose `max_pixels` is not below
/// it (the last, unbounded tier catches the rest).
pub fn tier_index(tiers: &[crate::config::TierConfig], pixels: u64) -> usize {
    tiers
        .iter()
        .position(|t| t.max_pixels.is_none_or(|max| pixels <= max))
        .unwrap_or(tiers.len().saturating_sub(1))
}

/// What the media plane now forwards to one subscriber (`user_id`) of one track in one call, from
/// `at_ms` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerUpdate {
    /// When the change took effect, epoch milliseconds.
    pub at_ms: u64,
    /// The call (and media room).
    pub call_id: CallId,
    /// The subscriber.
    pub user_id: UserId,
    /// The published track being consumed.
    pub track_id: TrackId,
    /// What is forwarded now.
    pub forwarding: Forwarding,
}

/// What a consumer forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Nothing: the consumer is gone (unsubscribed, paused, track unpublished, subscriber left).
    Stopped,
    /// An audio stream.
    Audio,
    /// The layer (with measured size) now forwarded to this subscriber.
    Video(Resolution),
}

/// One closed usage segment: a user received media in one tier during `[start_ms, end_ms)`.
///
/// `(call_id, user_id, start_ms)` is unique: the meter never emits two segments of one user in one call
/// with the same start, and never a zero-length one (`end_ms > start_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The call.
    pub call_id: CallId,
    /// The user who received.
    pub user_id: UserId,
    /// The tier's configured name.
    pub tier: String,
    /// Start, epoch milliseconds, inclusive.
    pub start_ms: u64,
    /// End, epoch milliseconds, exclusive.
    pub end_ms: u64,
}

impl UsageRecord {
    /// The segment's length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}
