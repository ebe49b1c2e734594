//! Invitation quotas: what keeps one caller from holding other people busy.
//!
//! Pure: no clock and no IO; `now` (ms) comes in. The rules, as a phone user would find them fair:
//!
//! - A caller creates at most `calls_per_minute` calls and sends at most `invitations_per_minute`
//!   invitations (each invitee of `call_invite` and `calling_invite` counts) in any 60 seconds; an op
//!   over either is refused whole with `rate_limited` and `details.retry_after` (seconds).
//! - After a callee rejects a caller's invitation, that caller may not ring them again for
//!   `reinvite_cooldown`: the callee is listed in `error_users` with reason `recently_declined`.
//!   The callee may still call the caller; a cancelled or unanswered invitation starts no cooldown.
//! - A callee has at most one invitation ringing from one inviter; another is listed in
//!   `error_users` with reason `already_ringing` (the core checks that against its calls).
//!
//! A limit of 0 turns that rule off. Memory is bounded by the rates: a caller keeps at most one
//! timestamp per call and per invitation of the last minute, and each decline is kept for the
//! cooldown; [`Quota::prune`] forgets what has expired.

use std::collections::{HashMap, VecDeque};

use crate::ids::UserId;

/// The window the per-minute limits count over.
const WINDOW_MS: u64 = 60_000;

/// The quota limits, from `[signaling]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRules {
    /// Calls one caller may create per minute (0: no limit).
    pub calls_per_minute: u32,
    /// Invitations one user may send per minute (0: no limit).
    pub invitations_per_minute: u32,
    /// Milliseconds after a rejection before the same inviter may ring that callee again (0: none).
    pub reinvite_cooldown_ms: u64,
}

impl QuotaRules {
    /// No limits.
    pub const UNLIMITED: QuotaRules = QuotaRules {
        calls_per_minute: 0,
        invitations_per_minute: 0,
        reinvite_cooldown_ms: 0,
    };
}

/// Why an op was refused whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// `calls_per_minute`.
    Calls {
        /// When the caller may create a call again, ms.
        retry_at: u64,
    },
    /// `invitations_per_minute`.
    Invitations {
        /// When the inviter may send this many invitations again, ms.
        retry_at: u64,
    },
}

impl Exceeded {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Exceeded::Calls { .. } => "calls_per_minute",
            Exceeded::Invitations { .. } => "invitations_per_minute",
        }
    }

    /// When to try again, ms.
    pub fn retry_at(self) -> u64 {
        match self {
            Exceeded::Calls { retry_at } | Exceeded::Invitations { retry_at } => retry_at,
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    /// Creation times of the caller's calls in the last minute, oldest first.
    calls: VecDeque<u64>,
    /// One entry per invitation in the last minute, oldest first.
    invitations: VecDeque<u64>,
}

impl Usage {
    fn expire(&mut self, now: u64) {
        for q in [&mut self.calls, &mut self.invitations] {
            while q.front().is_some_and(|&t| t + WINDOW_MS <= now) {
                q.pop_front();
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.invitations.is_empty()
    }
}

/// The quota state of every caller.
#[derive(Debug)]
pub struct Quota {
    rules: QuotaRules,
    usage: HashMap<UserId, Usage>,
    /// (inviter, callee) -> until when the inviter may not ring the callee, ms.
    declined: HashMap<(UserId, UserId), u64>,
}

impl Quota {
    /// Empty quotas under `rules`.
    pub fn new(rules: QuotaRules) -> Self {
        Self {
            rules,
            usage: HashMap::new(),
            declined: HashMap::new(),
        }
    }

    /// The limits.
    pub fn rules(&self) -> QuotaRules {
        self.rules
    }

    /// Whether `inviter` may create a call (`new_call`) and send `invitations` invitations at
    /// `now`. Records nothing: call [`record`](Self::record) once the op went through.
    pub fn check(
        &mut self,
        inviter: &UserId,
        new_call: bool,
        invitations: usize,
        now: u64,
    ) -> Result<(), Exceeded> {
        static NONE: VecDeque<u64> = VecDeque::new();
        let (calls, sent) = match self.usage.get_mut(inviter) {
            Some(u) => {
                u.expire(now);
                (&u.calls, &u.invitations)
            }
            None => (&NONE, &NONE),
        };
        let calls_limit = self.rules.calls_per_minute as usize;
        if new_call && calls_limit > 0 && calls.len() >= calls_limit {
            let oldest = calls[calls.len() - calls_limit];
            return Err(Exceeded::Calls {
                retry_at: oldest + WINDOW_MS,
            });
        }
        let limit = self.rules.invitations_per_minute as usize;
        if limit > 0 && sent.len() + invitations > limit {
            let retry_at = if invitations > limit {
                // More than a minute's worth at once: never, at this limit.
                u64::MAX
            } else {
                // The entry whose expiry makes room for all of them.
                sent[sent.len() + invitations - limit - 1] + WINDOW_MS
            };
            return Err(Exceeded::Invitations { retry_at });
        }
        Ok(())
    }

    /// Counts an op that went through: a call created (`new_call`) and `invitations` sent.
    pub fn record(&mut self, inviter: &UserId, new_call: bool, invitations: usize, now: u64) {
        let r = self.rules;
        if r.calls_per_minute == 0 && r.invitations_per_minute == 0 {
            return;
        }
        let u = self.usage.entry(inviter.clone()).or_default();
        u.expire(now);
        if new_call && r.calls_per_minute > 0 {
            u.calls.push_back(now);
        }
        if r.invitations_per_minute > 0 {
            // Never more than the limit is kept: older entries cannot matter any more.
            for _ in 0..invitations {
                u.invitations.push_back(now);
            }
            while u.invitations.len() > r.invitations_per_minute as usize {
                u.invitations.pop_front();
            }
        }
        while u.calls.len() > r.calls_per_minute as usize {
            u.calls.pop_front();
        }
    }

    /// `callee` rejected an invitation from `inviter` at `now`.
    pub fn declined(&mut self, inviter: &UserId, callee: &UserId, now: u64) {
        if self.rules.reinvite_cooldown_ms == 0 || inviter == callee {
            return;
        }
        self.declined.insert(
            (inviter.clone(), callee.clone()),
            now.saturating_add(self.rules.reinvite_cooldown_ms),
        );
    }

    /// Whether `inviter` must not ring `callee` at `now` because the callee declined recently.
    pub fn cooling_down(&self, inviter: &UserId, callee: &UserId, now: u64) -> bool {
        if self.declined.is_empty() {
            return false;
        }
        self.declined
            .get(&(inviter.clone(), callee.clone()))
            .is_some_and(|&until| now < until)
    }

    /// Forgets what no longer limits anybody at `now`.
    pub fn prune(&mut self, now: u64) {
        self.usage.retain(|_, u| {
            u.expire(now);
            !u.is_empty()
        });
        self.declined.retain(|_, &mut until| now < until);
    }

    /// Entries held (callers with recent activity, and declines), for tests and bounds.
    pub fn entries(&self) -> usize {
        self.usage.len() + self.declined.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    fn rules(calls: u32, invitations: u32, cooldown_ms: u64) -> QuotaRules {
        QuotaRules {
            calls_per_minute: calls,
            invitations_per_minute: invitations,
            reinvite_cooldown_ms: cooldown_ms,
        }
    }

    #[test]
    fn calls_per_minute_refuses_the_next_call_until_the_oldest_leaves_the_window() {
        let mut q = Quota::new(rules(3, 0, 0));
        let a = uid("a");
        for t in [0, 1_000, 2_000] {
            assert_eq!(q.check(&a, true, 1, t), Ok(()));
            q.record(&a, true, 1, t);
        }
        assert_eq!(
            q.check(&a, true, 1, 30_000),
            Err(Exceeded::Calls { retry_at: 60_000 })
        );
        // Inviting more users into an existing call is not a new call.
        assert_eq!(q.check(&a, false, 1, 30_000), Ok(()));
        // Another caller is not affected.
        assert_eq!(q.check(&uid("b"), true, 1, 30_000), Ok(()));
        assert!(q.check(&a, true, 1, 59_999).is_err());
        assert_eq!(q.check(&a, true, 1, 60_000), Ok(()));
    }

    #[test]
    fn invitations_per_minute_counts_every_invitee() {
        let mut q = Quota::new(rules(0, 10, 0));
        let a = uid("a");
        q.record(&a, true, 9, 0);
        assert_eq!(q.check(&a, false, 1, 5_000), Ok(()));
        q.record(&a, false, 1, 5_000);
        // Two more must wait for the first nine (all sent at 0) to leave the window.
        assert_eq!(
            q.check(&a, true, 2, 10_000),
            Err(Exceeded::Invitations { retry_at: 60_000 })
        );
        // After the first nine expire, the one at 5 s is all that is left.
        assert_eq!(q.check(&a, true, 9, 60_000), Ok(()));
        assert!(q.check(&a, true, 10, 60_000).is_err());
        // More than the limit at once can never go through.
        assert_eq!(
            q.check(&uid("b"), true, 11, 0),
            Err(Exceeded::Invitations { retry_at: u64::MAX })
        );
    }

    #[test]
    fn a_rejection_holds_back_that_inviter_for_the_cooldown_only() {
        let mut q = Quota::new(rules(0, 0, 30_000));
        let (a, v) = (uid("a"), uid("victim"));
        q.declined(&a, &v, 1_000);
        assert!(q.cooling_down(&a, &v, 1_000));
        assert!(q.cooling_down(&a, &v, 30_999));
        assert!(!q.cooling_down(&a, &v, 31_000));
        // The callee may call back, and others may ring them.
        assert!(!q.cooling_down(&v, &a, 2_000));
        assert!(!q.cooling_down(&uid("c"), &v, 2_000));
    }

    #[test]
    fn zero_turns_each_rule_off() {
        let mut q = Quota::new(QuotaRules::UNLIMITED);
        let a = uid("a");
        for t in 0..1000 {
            assert_eq!(q.check(&a, true, 9, t), Ok(()));
            q.record(&a, true, 9, t);
        }
        q.declined(&a, &uid("v"), 0);
        assert!(!q.cooling_down(&a, &uid("v"), 1));
        assert_eq!(q.entries(), 0, "nothing is held without limits");
    }

    #[test]
    fn memory_is_bounded_by_the_limits_and_pruned_after_the_window() {
        let mut q = Quota::new(rules(10, 30, 30_000));
        let a = uid("a");
        for t in 0..10_000u64 {
            q.record(&a, true, 9, t);
        }
        let u = q.usage.get(&a).expect("tracked");
        assert!(u.calls.len() <= 10 && u.invitations.len() <= 30);
        for i in 0..100 {
            q.declined(&a, &uid(&format!("v{i}")), 10_000);
        }
        assert_eq!(q.entries(), 101);
        q.prune(40_000);
        assert_eq!(
            q.entries(),
            1,
            "declines expired, the caller's minute has not"
        );
        q.prune(70_000);
        assert_eq!(q.entries(), 0);
    }
}
