//! Operator webhooks: what an event looks like, how it is signed, and when a failed delivery is retried.
//!
//! Pure: no IO and no clock; the shell that delivers is `server::webhooks`.
//!
//! - An event is a JSON object `{"id","event","created_at","data"}`. `id` is unique per event
//!   (`evt_` and 128 random bits in hex); receivers de-duplicate on it, since delivery is at least once.
//! - Each delivery carries `X-Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over the
//!   bytes `"<t>.<body>"` with the configured signing key. `t` is the time of that attempt, so a
//!   receiver that rejects signatures older than a few minutes is safe from replays.
//! - Events are queued durably in the store's outbox in the same transaction as the change they report,
//!   and delivered per receiver in the order they were queued; a failure holds back the events behind
//!   it (so each call's events arrive in order) and is retried with exponential backoff.
//! - An event is given up on ([`after_attempt`]) when its receiver refused it `max_attempts` times
//!   (an answer other than 2xx, or none in time) or when it is `max_age` old; it moves to the dead
//!   letters and the receiver's later events go ahead. A receiver that cannot be reached at all costs
//!   no attempts: its events wait (in order) and die only of age.

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::billing::UsageRecord;
use crate::signaling::Notice;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";
/// The event ID header.
pub const EVENT_ID_HEADER: &str = "x-switchboard-event-id";
/// The event name header.
pub const EVENT_HEADER: &str = "x-switchboard-event";

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=<secs>,v1=<hex>`.
    #[error("malformed signature header")]
    Malformed,
    /// The timestamp is too far from now.
    #[error("signature timestamp outside the tolerance")]
    Stale,
    /// The HMAC does not match.
    #[error("signature does not match")]
    Mismatch,
}

/// An event ready to queue: its ID, name and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Unique ID.
    pub id: String,
    /// Event name.
    pub name: &'static str,
    /// The whole JSON body.
    pub body: String,
}

/// Builds an event with a fresh ID.
pub fn event(name: &'static str, created_at_ms: u64, data: Value) -> OutboxEvent {
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    let id = format!("evt_{}", hex::encode(raw));
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        event: &'a str,
        created_at: u64,
        data: Value,
    }
    let body = serde_json::to_string(&Body {
        id: &id,
        event: name,
        created_at: created_at_ms,
        data,
    })
    .unwrap_or_default();
    OutboxEvent { id, name, body }
}

/// The webhook event for a signaling notice, if operators get one for it.
pub fn from_notice(now_ms: u64, notice: &Notice) -> Option<OutboxEvent> {
    Some(match notice {
        Notice::CallStarted {
            call_id,
            caller,
            mode,
        } => event(
            "call_started",
            now_ms,
            json!({"call_id": call_id, "caller": caller, "mode": mode}),
        ),
        Notice::CallEnded {
            call_id,
            reason,
            users,
        } => event(
            "call_ended",
            now_ms,
            json!({"call_id": call_id, "reason": reason, "users": users}),
        ),
        Notice::InviteeOffline {
            call_id,
            user_id,
            inviter,
            extended_data,
        } => event(
            "invitation_unanswered",
            now_ms,
            json!({"call_id": call_id, "user_id": user_id, "inviter": inviter,
                   "extended_data": extended_data}),
        ),
        Notice::InviteeOutcome { .. } | Notice::InvitationRefused { .. } => return None,
    })
}

/// The `usage_recorded` event for a closed billing segment.
pub fn from_usage(now_ms: u64, r: &UsageRecord) -> OutboxEvent {
    event(
        "usage_recorded",
        now_ms,
        json!({"call_id": r.call_id, "user_id": r.user_id, "tier": r.tier,
               "start_ms": r.start_ms, "end_ms": r.end_ms, "ms": r.duration_ms()}),
    )
}

/// `t=<secs>,v1=<hex>` for `body` at `t_secs`.
pub fn sign(key: &[u8], t_secs: u64, body: &[u8]) -> String {
    format!("t={t_secs},v1={}", hex::encode(mac(key, t_secs, body)))
}

fn mac(key: &[u8], t_secs: u64, body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(t_secs.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Checks a signature header for `body`, accepting timestamps within `tolerance_secs` of `now_secs`.
/// Receivers (and the tests) use this.
pub fn verify(
    key: &[u8],
    header: &str,
    body: &[u8],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_secs.abs_diff(t) > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let want = mac(key, t, body);
    // Constant-time comparison through the MAC type.
    let ok = sigs.iter().any(|s| {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        s.len() == want.len() && m.verify_slice(s).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Delay before attempt `attempts + 1` after `attempts` failures: 1 s doubling to at most 5 minutes.
pub fn backoff_ms(attempts: u32) -> u64 {
    const MAX: u64 = 5 * 60 * 1000;
    1000u64
        .checked_shl(attempts.min(20))
        .map_or(MAX, |d| d.min(MAX))
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// The receiver was reached and did not take the event: an answer other than 2xx (a redirect
    /// included: they are not followed), or no answer within the request timeout.
    Refused,
    /// The receiver could not be reached (connection refused, no route, connect timeout). Says
    /// nothing about the event: it costs no attempt, only time.
    Unreachable,
}

/// Why an event was given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The receiver refused it `[webhooks] max_attempts` times.
    MaxAttempts,
    /// It was still undelivered `[webhooks] max_age` after it was queued.
    MaxAge,
}

impl DeadReason {
    /// The name in the admin API and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MaxAttempts => "max_attempts",
            DeadReason::MaxAge => "max_age",
        }
    }
}

/// When the outbox gives up on an event (`[webhooks] max_attempts`, `max_age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveUp {
    /// Refusals after which an event is dead-lettered.
    pub max_attempts: u32,
    /// Age in ms after which an undelivered event is dead-lettered.
    pub max_age_ms: u64,
}

/// What to do with an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Delivered: remove it.
    Remove,
    /// Try again at `at_ms`, with the new counts (`attempts` drives the backoff, `refusals` the
    /// give-up); the receiver's later events wait behind it.
    Retry {
        /// When.
        at_ms: u64,
        /// Attempts made, reachable or not.
        attempts: u32,
        /// Attempts the receiver refused.
        refusals: u32,
    },
    /// Move it to the dead letters; the receiver's later events go ahead.
    Dead(DeadReason),
}

/// An event queued at `created_ms` that is still undelivered at `now_ms`, if it is too old to try.
pub fn expired(created_ms: u64, now_ms: u64, give_up: GiveUp) -> Option<DeadReason> {
    (now_ms.saturating_sub(created_ms) >= give_up.max_age_ms).then_some(DeadReason::MaxAge)
}

/// The fate of an event after an attempt at `now_ms` ended with `outcome`, given the counts before it.
pub fn after_attempt(
    outcome: Outcome,
    attempts: u32,
    refusals: u32,
    created_ms: u64,
    now_ms: u64,
    give_up: GiveUp,
) -> Next {
    let attempts = attempts.saturating_add(1);
    let refusals = match outcome {
        Outcome::Delivered => return Next::Remove,
        Outcome::Refused => refusals.saturating_add(1),
        Outcome::Unreachable => refusals,
    };
    if refusals >= give_up.max_attempts {
        return Next::Dead(DeadReason::MaxAttempts);
    }
    let at_ms = now_ms.saturating_add(backoff_ms(attempts - 1));
    if let Some(reason) = expired(created_ms, at_ms, give_up) {
        // The next attempt would be past the event's age: give up now rather than wait for it.
        return Next::Dead(reason);
    }
    Next::Retry {
        at_ms,
        attempts,
        refusals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GiveUp = GiveUp {
        max_attempts: 3,
        max_age_ms: 3_600_000,
    };

    #[test]
    fn a_refused_event_is_retried_with_backoff_then_dead_lettered_after_max_attempts() {
        let t0 = 1_000_000;
        let n1 = after_attempt(Outcome::Refused, 0, 0, t0, t0, G);
        assert_eq!(
            n1,
            Next::Retry {
                at_ms: t0 + 1000,
                attempts: 1,
                refusals: 1
            }
        );
        let n2 = after_attempt(Outcome::Refused, 1, 1, t0, t0 + 1000, G);
        assert_eq!(
            n2,
            Next::Retry {
                at_ms: t0 + 3000,
                attempts: 2,
                refusals: 2
            }
        );
        assert_eq!(
            after_attempt(Outcome::Refused, 2, 2, t0, t0 + 3000, G),
            Next::Dead(DeadReason::MaxAttempts)
        );
        assert_eq!(
            after_attempt(Outcome::Delivered, 2, 2, t0, t0 + 3000, G),
            Next::Remove
        );
    }

    #[test]
    fn an_unreachable_receiver_costs_no_attempts_and_its_events_die_of_age() {
        let t0 = 0;
        // Far more failures than max_attempts: still retried, with a growing backoff.
        let mut attempts = 0;
        let mut now = t0;
        let mut last_gap = 0;
        loop {
            match after_attempt(Outcome::Unreachable, attempts, 0, t0, now, G) {
                Next::Retry {
                    at_ms,
                    attempts: a,
                    refusals,
                } => {
                    assert_eq!(refusals, 0);
                    assert!(at_ms - now >= last_gap, "backoff does not shrink");
                    last_gap = at_ms - now;
                    attempts = a;
                    now = at_ms;
                }
                Next::Dead(reason) => {
                    assert_eq!(reason, DeadReason::MaxAge);
                    break;
                }
                Next::Remove => panic!("not delivered"),
            }
        }
        assert!(attempts > G.max_attempts, "{attempts} attempts");
        assert!(
            now <= G.max_age_ms,
            "given up by its age, not later ({now})"
        );
        assert_eq!(last_gap, 300_000, "the backoff is capped at 5 minutes");
        assert_eq!(expired(t0, G.max_age_ms - 1, G), None);
        assert_eq!(expired(t0, G.max_age_ms, G), Some(DeadReason::MaxAge));
    }

    #[test]
    fn signatures_verify_and_refuse_tampering_staleness_and_other_keys() {
        let body = br#"{"id":"evt_1"}"#;
        let h = sign(b"key", 1_800_000_000, body);
        assert!(h.starts_with("t=1800000000,v1="));
        assert_eq!(verify(b"key", &h, body, 1_800_000_100, 300), Ok(()));
        assert_eq!(
            verify(b"key", &h, b"{\"id\":\"evt_2\"}", 1_800_000_000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", &h, body, 1_800_000_000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"key", &h, body, 1_800_000_301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"key", "v1=abcd", body, 1_800_000_000, 300),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(b"key", "t=1,v1=zz", body, 1, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn events_have_unique_ids_and_the_documented_shape() {
        let a = event("call_started", 5, json!({"call_id": "c_1"}));
        let b = event("call_started", 5, json!({"call_id": "c_1"}));
        assert_ne!(a.id, b.id);
        let v: Value = serde_json::from_str(&a.body).expect("json");
        assert_eq!(v["id"], a.id.as_str());
        assert_eq!(v["event"], "call_started");
        assert_eq!(v["created_at"], 5);
        assert_eq!(v["data"]["call_id"], "c_1");
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff_ms(0), 1000);
        assert_eq!(backoff_ms(1), 2000);
        assert_eq!(backoff_ms(5), 32_000);
        assert_eq!(backoff_ms(9), 300_000);
        assert_eq!(backoff_ms(u32::MAX), 300_000);
    }
}
