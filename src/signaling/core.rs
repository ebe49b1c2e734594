//! The call-invitation state machine (PROTOCOL.md section 3), a pure core.
//!
//! Inputs are client ops, session connect/disconnect, room occupancy from the media plane and timer
//! expiry, each with `now` (milliseconds since the epoch) passed in. Outputs ([`Output`]) are the events
//! to deliver per session, in order, and [`Effect`]s for the shell: records to write through to storage,
//! rooms to leave or close, notices for metrics and webhooks. [`Signaling::next_deadline`] says when to
//! call [`Signaling::tick`] next. Nothing here reads a clock, spawns a task or touches a socket.
//!
//! Invariants:
//! - One order: the shell calls in with `&mut self`, so ops on a call are applied one at a time. When an
//!   accept races a cancel or a timeout, whichever is applied first wins and the other gets
//!   `invalid_state`.
//! - Every state change is reported in `call_user_state_changed` to every user ringing or `accepted` in
//!   the call and to the users who changed, and written through as a whole-call [`CallRecord`].
//! - A started call's users appear in their presence's `calls` index; an ended call's do not. Ended calls
//!   stay in memory for `ended_retention_ms` so late answers get `invalid_state`, then only in storage.
//! - Timers are lazily invalidated: a fired timer re-checks that its condition still holds.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::json;

use super::quota::{Exceeded, Quota, QuotaRules};
use super::wire::{
    ApiError, CallArgs, CallInfo, CallState, CallUserView, CallingInviteArgs, CancelArgs,
    EndReason, ErrorCode, ErrorUser, Event, InviteArgs, Mode, Reply, UserState,
};
use crate::config::{BusyPolicy, SignalingConfig};
use crate::ids::{CallId, SessionId, UserId};

/// The rules the core enforces, from `[signaling]`.
#[derive(Debug, Clone)]
pub struct Rules {
    /// What to do with busy users.
    pub busy_policy: BusyPolicy,
    /// Seconds an invitation rings by default.
    pub default_timeout: u32,
    /// Most invitees per invitation.
    pub max_invitees: usize,
    /// Most users per call.
    pub max_call_users: usize,
    /// Most bytes of extended data.
    pub max_extended_data: usize,
    /// Milliseconds without a live session before a user counts as gone.
    pub disconnect_grace_ms: u64,
    /// Milliseconds a general-mode room may stay empty once nobody rings.
    pub room_empty_timeout_ms: u64,
    /// Milliseconds an ended call stays in memory.
    pub ended_retention_ms: u64,
    /// Per-caller invitation quotas ([`super::quota`]).
    pub quota: QuotaRules,
}

impl Rules {
    /// The rules of a `[signaling]` section.
    pub fn from_config(c: &SignalingConfig) -> Self {
        Self {
            busy_policy: c.busy_policy,
            default_timeout: c.default_timeout,
            max_invitees: c.max_invitees,
            max_call_users: c.max_call_users,
            max_extended_data: c.max_extended_data,
            disconnect_grace_ms: c.disconnect_grace * 1000,
            room_empty_timeout_ms: c.room_empty_timeout * 1000,
            ended_retention_ms: 10 * 60 * 1000,
            quota: QuotaRules {
                calls_per_minute: c.calls_per_minute,
                invitations_per_minute: c.invitations_per_minute,
                reinvite_cooldown_ms: c.reinvite_cooldown * 1000,
            },
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self::from_config(&SignalingConfig::default())
    }
}

/// One user of a call, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallUserRecord {
    /// The user.
    pub user_id: UserId,
    /// Their state.
    pub state: UserState,
    /// What they attached to their last answer, or "".
    pub extended_data: String,
    /// Who invited them (the caller invites themself).
    pub inviter: UserId,
    /// The invitation's extended data.
    pub invite_extended_data: String,
    /// When they were (last) invited or joined, ms.
    pub invite_time: u64,
    /// When their invitation times out, ms; 0 when not ringing.
    pub deadline: u64,
    /// When they last accepted or joined, ms; 0 if never.
    pub accept_time: u64,
    /// When they left the ringing or accepted state, ms; 0 while in it.
    pub leave_time: u64,
}

/// A call, as written through to storage after every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// The call.
    pub call_id: CallId,
    /// Who created it.
    pub caller: UserId,
    /// Its mode.
    pub mode: Mode,
    /// started or ended.
    pub state: CallState,
    /// The creating invitation's extended data.
    pub extended_data: String,
    /// Seconds each invitation of this call rings.
    pub timeout_secs: u32,
    /// ms.
    pub create_time: u64,
    /// ms; 0 while started.
    pub end_time: u64,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
    /// Users in order, the caller first.
    pub users: Vec<CallUserRecord>,
}

impl CallRecord {
    fn user(&self, u: &UserId) -> Option<&CallUserRecord> {
        self.users.iter().find(|x| &x.user_id == u)
    }

    fn user_mut(&mut self, u: &UserId) -> Option<&mut CallUserRecord> {
        self.users.iter_mut().find(|x| &x.user_id == u)
    }

    fn any_ringing(&self) -> bool {
        self.users.iter().any(|u| u.state.is_ringing())
    }

    /// Whether an invitee (not the caller) has ever accepted.
    fn invitee_accepted(&self) -> bool {
        self.users
            .iter()
            .any(|u| u.user_id != self.caller && u.accept_time > 0)
    }

    fn views(&self) -> Vec<CallUserView> {
        self.users.iter().map(view).collect()
    }

    /// The wire `CallInfo`.
    pub fn info(&self) -> CallInfo {
        CallInfo {
            call_id: self.call_id.clone(),
            caller: self.caller.clone(),
            mode: self.mode,
            state: self.state,
            extended_data: self.extended_data.clone(),
            create_time: self.create_time,
            end_time: self.end_time,
            end_reason: self.end_reason,
            users: self.views(),
        }
    }
}

fn view(u: &CallUserRecord) -> CallUserView {
    CallUserView {
        user_id: u.user_id.clone(),
        state: u.state,
        extended_data: u.extended_data.clone(),
    }
}

/// An event for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The session.
    pub session: SessionId,
    /// The event, shared by every session it goes to.
    pub event: Arc<Event>,
}

/// Something the shell does on the core's behalf.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write this call through to storage.
    Persist(CallRecord),
    /// Take this user out of the call's media room.
    LeaveRoom {
        /// The call.
        call_id: CallId,
        /// The user.
        user_id: UserId,
    },
    /// Close the call's media room.
    CloseRoom {
        /// The call.
        call_id: CallId,
    },
    /// For metrics, logs and webhooks.
    Notice(Notice),
}

/// What happened, for operators.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A call was created.
    CallStarted {
        /// The call.
        call_id: CallId,
        /// Its caller.
        caller: UserId,
        /// Its mode.
        mode: Mode,
    },
    /// A call ended.
    CallEnded {
        /// The call.
        call_id: CallId,
        /// Why.
        reason: EndReason,
        /// Everyone who was ever in it.
        users: Vec<UserId>,
    },
    /// An invitee reached an answer or a final state.
    InviteeOutcome {
        /// The call.
        call_id: CallId,
        /// The invitee.
        user_id: UserId,
        /// accepted, rejected, busy, cancelled or timeout.
        state: UserState,
    },
    /// An invitation was not sent because of a quota ([`super::quota`]): `reason` is
    /// `calls_per_minute`, `invitations_per_minute` (the whole op was refused), `recently_declined`
    /// or `already_ringing` (that invitee was left out).
    InvitationRefused {
        /// Who tried to invite.
        inviter: UserId,
        /// Which rule.
        reason: &'static str,
    },
    /// An invitee had no live session when invited: the operator may push a notification.
    InviteeOffline {
        /// The call.
        call_id: CallId,
        /// The invitee.
        user_id: UserId,
        /// Who invited them.
        inviter: UserId,
        /// The invitation's extended data.
        extended_data: String,
    },
}

/// What one input produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    /// Events, in order.
    pub deliveries: Vec<Delivery>,
    /// Effects, in order.
    pub effects: Vec<Effect>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Invite(CallId, UserId),
    Gone(UserId),
    RoomEmpty(CallId),
    Evict(CallId),
}

#[derive(Debug, Default)]
struct Presence {
    sessions: Vec<SessionId>,
    name: Option<String>,
    /// When the last session closed; None while any is live.
    offline_since: Option<u64>,
    /// Started calls the user appears in.
    calls: Vec<CallId>,
}

#[derive(Debug, Default)]
struct Room {
    participants: usize,
    /// Since when a general-mode call's room has been empty with nobody ringing.
    empty_since: Option<u64>,
    /// Users who hung up (left the room with `rtc_leave`) in a general-mode call: they stay
    /// `accepted` until the call completes, but are not busy.
    hung_up: Vec<UserId>,
}

/// The state machine.
pub struct Signaling {
    rules: Rules,
    calls: HashMap<CallId, CallRecord>,
    rooms: HashMap<CallId, Room>,
    users: HashMap<UserId, Presence>,
    sessions: HashMap<SessionId, UserId>,
    timers: BTreeSet<(u64, Timer)>,
    new_call_id: Box<dyn FnMut(u64) -> CallId + Send>,
    /// A drain is under way: no new calls, joins or answers that start media.
    draining: bool,
    /// Invitation quotas.
    quota: Quota,
    /// When the quotas were last pruned, ms.
    quota_pruned: u64,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling")
            .field("calls", &self.calls.len())
            .field("users", &self.users.len())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Signaling {
    /// A core with time-ordered random call IDs ([`CallId::generate`]).
    pub fn new(rules: Rules) -> Self {
        Self::with_id_source(rules, Box::new(CallId::generate))
    }

    /// A core that takes call IDs from `ids`, given the creation time in ms (tests use a counter).
    pub fn with_id_source(rules: Rules, ids: Box<dyn FnMut(u64) -> CallId + Send>) -> Self {
        Self {
            quota: Quota::new(rules.quota),
            quota_pruned: 0,
            rules,
            calls: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            sessions: HashMap::new(),
            timers: BTreeSet::new(),
            new_call_id: ids,
            draining: false,
        }
    }

    /// Starts (or stops) a drain: `call_invite`, `calling_invite`, `call_join` and `call_accept` are
    /// refused with `invalid_state` while it lasts; everything else goes on.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    fn refuse_if_draining(&self) -> Result<(), ApiError> {
        if self.draining {
            return Err(err(
                ErrorCode::InvalidState,
                "the server is draining for a restart; try again in a moment",
            ));
        }
        Ok(())
    }

    /// Started calls that are in progress: an invitee accepted, or someone is in the room. (A call
    /// that only rings is not: it survives a restart and rings again.)
    pub fn calls_in_progress(&self) -> Vec<CallId> {
        self.started_calls()
            .filter(|c| {
                c.invitee_accepted()
                    || self
                        .rooms
                        .get(&c.call_id)
                        .is_some_and(|r| r.participants > 0)
            })
            .map(|c| c.call_id.clone())
            .collect()
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Loads started calls after a restart. Every user counts as disconnected at `now`: ringing
    /// invitations ring again for the rest of their timeout when the invitee reconnects, and users who
    /// don't come back within the grace period are gone.
    pub fn restore(&mut self, calls: Vec<CallRecord>, now: u64) {
        for call in calls {
            if call.state == CallState::Started {
                self.install(call, now);
            }
        }
    }

    /// Puts a started call in memory with its indexes and timers: every user's `calls` index,
    /// the ringing users' timeouts, the going-away timer of users without a live session (who
    /// count as offline since `now` unless known to be offline since earlier), and the empty-room
    /// countdown. Timers already armed are not duplicated (they are a set).
    fn install(&mut self, call: CallRecord, now: u64) {
        let id = call.call_id.clone();
        for u in &call.users {
            let p = self.users.entry(u.user_id.clone()).or_default();
            if !p.calls.contains(&id) {
                p.calls.push(id.clone());
            }
            if p.sessions.is_empty() {
                let since = *p.offline_since.get_or_insert(now);
                self.timers.insert((
                    since + self.rules.disconnect_grace_ms,
                    Timer::Gone(u.user_id.clone()),
                ));
            }
            if u.state.is_ringing() {
                self.timers
                    .insert((u.deadline, Timer::Invite(id.clone(), u.user_id.clone())));
            }
        }
        self.rooms.entry(id.clone()).or_default();
        self.calls.insert(id.clone(), call);
        self.maybe_start_empty_countdown(&id, now);
    }

    /// Undoes what happened to a call since storage last committed it: the shell could not store
    /// the changes, so none of the events or replies about them were sent, and the call must be
    /// what storage holds. `committed` is that record, or `None` if the call was never committed
    /// (it is forgotten). Presence and the room's media state are kept; timers are re-armed from
    /// the record (one whose deadline passed fires at the next tick). A user without a live
    /// session whose going-away the undone change carried out counts as offline from `now`: their
    /// grace period starts again.
    pub fn rollback(&mut self, now: u64, id: &CallId, committed: Option<CallRecord>) {
        if let Some(current) = self.calls.remove(id) {
            for u in &current.users {
                if let Some(p) = self.users.get_mut(&u.user_id) {
                    p.calls.retain(|c| c != id);
                    if p.sessions.is_empty() && p.calls.is_empty() {
                        self.users.remove(&u.user_id);
                    }
                }
            }
        }
        match committed {
            Some(call) if call.state == CallState::Started && call.call_id == *id => {
                self.install(call, now);
            }
            _ => {
                self.rooms.remove(id);
            }
        }
    }

    /// When [`tick`](Self::tick) should next be called.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Whether the user has a live session.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.users.get(user).is_some_and(|p| !p.sessions.is_empty())
    }

    /// The display name from the user's live session's token, if any.
    pub fn name_of(&self, user: &UserId) -> Option<&str> {
        self.users.get(user).and_then(|p| p.name.as_deref())
    }

    /// The user's live sessions.
    pub fn sessions_of(&self, user: &UserId) -> &[SessionId] {
        self.users.get(user).map_or(&[], |p| p.sessions.as_slice())
    }

    /// Number of users with a live session.
    pub fn users_online(&self) -> usize {
        self.users
            .values()
            .filter(|p| !p.sessions.is_empty())
            .count()
    }

    /// A call still in memory (started, or recently ended).
    pub fn call(&self, id: &CallId) -> Option<&CallRecord> {
        self.calls.get(id)
    }

    /// Started calls.
    pub fn started_calls(&self) -> impl Iterator<Item = &CallRecord> {
        self.calls
            .values()
            .filter(|c| c.state == CallState::Started)
    }

    /// The user a session belongs to.
    pub fn session_user(&self, s: SessionId) -> Option<&UserId> {
        self.sessions.get(&s)
    }

    /// Checks that `user` may be in the call's media room: the call is started and they are `accepted`.
    pub fn may_join_room(&self, user: &UserId, call_id: &CallId) -> Result<(), ApiError> {
        let call = self
            .calls
            .get(call_id)
            .filter(|c| c.user(user).is_some())
            .ok_or_else(|| err(ErrorCode::CallNotFound, "no such call"))?;
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        match call.user(user).map(|u| u.state) {
            Some(UserState::Accepted) => Ok(()),
            _ => Err(err(
                ErrorCode::InvalidState,
                "only users who accepted may join the room",
            )),
        }
    }

    // ----- sessions -----

    /// A session opened. The output starts with what the session must see first: every invitation still
    /// ringing for the user, then a state snapshot of every call they are `accepted` in. (The shell
    /// sends the `session` event before these.)
    pub fn connect(
        &mut self,
        now: u64,
        session: SessionId,
        user: UserId,
        name: Option<String>,
    ) -> Output {
        let mut out = Output::default();
        // A session that registers again (a cluster node resyncing its sessions) only gets the
        // replay; one that changed users (never, from the shell) is first taken out.
        let again = self.sessions.get(&session) == Some(&user);
        if !again && self.sessions.contains_key(&session) {
            let _ = self.disconnect(now, session);
        }
        self.sessions.insert(session, user.clone());
        let p = self.users.entry(user.clone()).or_default();
        if !again {
            p.sessions.push(session);
        }
        p.offline_since = None;
        if name.is_some() {
            p.name = name;
        }
        let calls = p.calls.clone();
        // Replay to this session first, before any broadcast it takes part in.
        let mut delivered_now = Vec::new();
        for id in &calls {
            let Some(call) = self.calls.get(id) else {
                continue;
            };
            let Some(me) = call.user(&user) else { continue };
            if me.state.is_ringing() {
                let ev = invitation_event(call, me, now);
                out.deliveries.push(Delivery {
                    session,
                    event: Arc::new(ev),
                });
                if me.state != UserState::Received {
                    delivered_now.push(id.clone());
                }
            } else if me.state == UserState::Accepted {
                out.deliveries.push(Delivery {
                    session,
                    event: Arc::new(Event::CallUserStateChanged {
                        call_id: id.clone(),
                        users: call.views(),
                    }),
                });
            }
        }
        // Invitations delivered now for the first time become `received`, and everyone is told.
        for id in delivered_now {
            if let Some(call) = self.calls.get_mut(&id) {
                if let Some(me) = call.user_mut(&user) {
                    me.state = UserState::Received;
                }
                self.state_changed(&mut out, &id, std::slice::from_ref(&user));
                self.persist(&mut out, &id);
            }
        }
        out
    }

    /// A session closed. If it was the user's last, the grace period starts.
    pub fn disconnect(&mut self, now: u64, session: SessionId) -> Output {
        let out = Output::default();
        let Some(user) = self.sessions.remove(&session) else {
            return out;
        };
        if let Some(p) = self.users.get_mut(&user) {
            p.sessions.retain(|s| *s != session);
            if p.sessions.is_empty() {
                p.offline_since = Some(now);
                if p.calls.is_empty() {
                    self.users.remove(&user);
                } else {
                    self.timers
                        .insert((now + self.rules.disconnect_grace_ms, Timer::Gone(user)));
                }
            }
        }
        out
    }

    // ----- ops -----

    /// `call_invite`.
    pub fn call_invite(
        &mut self,
        now: u64,
        session: SessionId,
        args: InviteArgs,
    ) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_invite(now, session, args, &mut out);
        (out, reply)
    }

    fn requester(&self, session: SessionId) -> Result<UserId, ApiError> {
        self.sessions
            .get(&session)
            .cloned()
            .ok_or_else(|| err(ErrorCode::Internal, "session not registered"))
    }

    fn check_ext(&self, ext: &str) -> Result<(), ApiError> {
        if ext.len() > self.rules.max_extended_data {
            return Err(ApiError::bad_request(format!(
                "extended_data is longer than {} bytes",
                self.rules.max_extended_data
            )));
        }
        Ok(())
    }

    /// A started call (other than `except`) in which the user rings or is `accepted`, not counting a
    /// general-mode call they hung up on.
    fn busy_call(&self, user: &UserId, except: Option<&CallId>) -> Option<CallId> {
        let p = self.users.get(user)?;
        p.calls
            .iter()
            .filter(|id| Some(*id) != except)
            .find(|id| {
                self.calls.get(*id).is_some_and(|c| {
                    c.state == CallState::Started
                        && c.user(user).is_some_and(|u| {
                            u.state.is_ringing()
                                || (u.state == UserState::Accepted
                                    && !self
                                        .rooms
                                        .get(*id)
                                        .is_some_and(|r| r.hung_up.contains(user)))
                        })
                })
            })
            .cloned()
    }

    /// The media plane reports that a user left a call's room by hanging up (`rtc_leave`), or joined
    /// it again. In a general-mode call a user who hung up is no longer busy while the call waits for
    /// its room to stay empty.
    pub fn hung_up(&mut self, call_id: &CallId, user: &UserId, hung_up: bool) {
        let general = self
            .calls
            .get(call_id)
            .is_some_and(|c| c.mode == Mode::General);
        let Some(room) = self.rooms.get_mut(call_id) else {
            return;
        };
        room.hung_up.retain(|u| u != user);
        if hung_up && general {
            room.hung_up.push(user.clone());
        }
    }

    fn busy_error(call_id: CallId) -> ApiError {
        ApiError {
            code: ErrorCode::Busy,
            message: "already in a call".into(),
            details: Some(json!({ "call_id": call_id })),
        }
    }

    /// Sorts raw invitee strings into valid distinct users and `error_users`.
    fn classify_invitees(&self, me: &UserId, raw: &[String]) -> (Vec<UserId>, Vec<ErrorUser>) {
        let mut ok: Vec<UserId> = Vec::new();
        let mut bad: Vec<ErrorUser> = Vec::new();
        for s in raw {
            match UserId::parse(s) {
                Ok(u) if &u == me => {
                    if !bad.iter().any(|b| b.user_id == *s) {
                        bad.push(ErrorUser {
                            user_id: s.clone(),
                            reason: "self",
                        });
                    }
                }
                Ok(u) => {
                    if !ok.contains(&u) {
                        ok.push(u);
                    }
                }
                Err(_) => {
                    if !bad.iter().any(|b| b.user_id == *s) {
                        bad.push(ErrorUser {
                            user_id: s.clone(),
                            reason: "invalid_user_id",
                        });
                    }
                }
            }
        }
        (ok, bad)
    }

    fn distinct_count(raw: &[String]) -> usize {
        let mut v: Vec<&String> = raw.iter().collect();
        v.sort();
        v.dedup();
        v.len()
    }

    fn do_invite(
        &mut self,
        now: u64,
        session: SessionId,
        args: InviteArgs,
        out: &mut Output,
    ) -> Reply {
        let me = self.requester(session)?;
        self.refuse_if_draining()?;
        self.check_ext(&args.extended_data)?;
        let timeout = match args.timeout {
            None => self.rules.default_timeout,
            Some(t) if (1..=600).contains(&t) => t,
            Some(t) => {
                return Err(ApiError::bad_request(format!(
                    "timeout must be 1..600 seconds, got {t}"
                )));
            }
        };
        if args.invitees.is_empty() {
            return Err(ApiError::bad_request("invitees must not be empty"));
        }
        let distinct = Self::distinct_count(&args.invitees);
        if distinct > self.rules.max_invitees {
            return Err(err(
                ErrorCode::TooManyUsers,
                format!("at most {} invitees", self.rules.max_invitees),
            ));
        }
        let (invitees, error_users) = self.classify_invitees(&me, &args.invitees);
        if invitees.len() + 1 > self.rules.max_call_users {
            return Err(err(
                ErrorCode::TooManyUsers,
                format!("at most {} users in a call", self.rules.max_call_users),
            ));
        }
        if self.rules.busy_policy == BusyPolicy::Reject
            && let Some(c) = self.busy_call(&me, None)
        {
            return Err(Self::busy_error(c));
        }
        let mut error_users = error_users;
        let invitees = self.apply_quota(now, &me, true, invitees, &mut error_users, out)?;
        if invitees.is_empty() {
            let reasons: Vec<String> = error_users
                .iter()
                .map(|e| format!("{}: {}", e.user_id, e.reason))
                .collect();
            return Err(ApiError::bad_request(format!(
                "no invitee can be invited ({})",
                reasons.join(", ")
            )));
        }

        let call_id = (self.new_call_id)(now);
        let deadline = now + u64::from(timeout) * 1000;
        let mut users = vec![CallUserRecord {
            user_id: me.clone(),
            state: UserState::Accepted,
            extended_data: String::new(),
            inviter: me.clone(),
            invite_extended_data: args.extended_data.clone(),
            invite_time: now,
            deadline: 0,
            accept_time: now,
            leave_time: 0,
        }];
        for u in &invitees {
            let state = self.initial_state(u, None);
            users.push(CallUserRecord {
                user_id: u.clone(),
                state,
                extended_data: String::new(),
                inviter: me.clone(),
                invite_extended_data: args.extended_data.clone(),
                invite_time: now,
                deadline: if state.is_ringing() { deadline } else { 0 },
                accept_time: 0,
                leave_time: if state.is_ringing() { 0 } else { now },
            });
        }
        let call = CallRecord {
            call_id: call_id.clone(),
            caller: me.clone(),
            mode: args.mode,
            state: CallState::Started,
            extended_data: args.extended_data.clone(),
            timeout_secs: timeout,
            create_time: now,
            end_time: 0,
            end_reason: None,
            users,
        };
        self.calls.insert(call_id.clone(), call);
        self.rooms.insert(call_id.clone(), Room::default());
        self.index_user(&me, &call_id);
        out.effects.push(Effect::Notice(Notice::CallStarted {
            call_id: call_id.clone(),
            caller: me.clone(),
            mode: args.mode,
        }));

        // The caller's other sessions learn of the call.
        let created = Arc::new(Event::CallInvitationCreated {
            call_id: call_id.clone(),
            mode: args.mode,
            timeout: u64::from(timeout),
            extended_data: args.extended_data.clone(),
            create_time: now,
        });
        self.deliver_user_except(out, &me, Some(session), &created);

        self.ring(now, &call_id, &invitees, out);
        self.after_change(now, &call_id, EndReason::Rejected, &me, "", out);
        self.persist(out, &call_id);
        Ok(json!({
            "call_id": call_id,
            "timeout": timeout,
            "error_users": error_users,
        }))
    }

    /// The quota rules for an invitation from `me` to `invitees` ([`super::quota`]): leaves out
    /// (into `error_users`) callees who declined `me` recently or have an invitation from `me`
    /// ringing already, then refuses the whole op with `rate_limited` if `me` is over a per-minute
    /// limit, or counts it. Returns the invitees to ring.
    fn apply_quota(
        &mut self,
        now: u64,
        me: &UserId,
        new_call: bool,
        invitees: Vec<UserId>,
        error_users: &mut Vec<ErrorUser>,
        out: &mut Output,
    ) -> Result<Vec<UserId>, ApiError> {
        self.prune_quota(now);
        let mut kept = Vec::with_capacity(invitees.len());
        let mut left_out = false;
        for u in invitees {
            let reason = if self.quota.cooling_down(me, &u, now) {
                Some("recently_declined")
            } else if self.ringing_from(me, &u) {
                Some("already_ringing")
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    left_out = true;
                    out.effects.push(Effect::Notice(Notice::InvitationRefused {
                        inviter: me.clone(),
                        reason,
                    }));
                    error_users.push(ErrorUser {
                        user_id: u.to_string(),
                        reason,
                    });
                }
                None => kept.push(u),
            }
        }
        if kept.is_empty() {
            if left_out {
                let reasons: Vec<String> = error_users
                    .iter()
                    .map(|e| format!("{}: {}", e.user_id, e.reason))
                    .collect();
                let mut error = err(
                    ErrorCode::RateLimited,
                    format!("no invitee can be invited now ({})", reasons.join(", ")),
                );
                error.details = Some(json!({ "error_users": error_users }));
                return Err(error);
            }
            return Ok(kept);
        }
        if let Err(e) = self.quota.check(me, new_call, kept.len(), now) {
            out.effects.push(Effect::Notice(Notice::InvitationRefused {
                inviter: me.clone(),
                reason: e.as_str(),
            }));
            let (what, limit) = match e {
                Exceeded::Calls { .. } => ("calls", self.rules.quota.calls_per_minute),
                Exceeded::Invitations { .. } => {
                    ("invitations", self.rules.quota.invitations_per_minute)
                }
            };
            let retry_after = e.retry_at().saturating_sub(now).div_ceil(1000);
            let mut error = err(
                ErrorCode::RateLimited,
                format!("at most {limit} {what} per minute"),
            );
            error.details = Some(if e.retry_at() == u64::MAX {
                json!({ "limit": e.as_str() })
            } else {
                json!({ "limit": e.as_str(), "retry_after": retry_after })
            });
            return Err(error);
        }
        self.quota.record(me, new_call, kept.len(), now);
        Ok(kept)
    }

    /// Forgets expired quota entries, at most every 10 s (they are bounded by the rates anyway).
    fn prune_quota(&mut self, now: u64) {
        if now >= self.quota_pruned.saturating_add(10_000) {
            self.quota.prune(now);
            self.quota_pruned = now;
        }
    }

    /// Quota entries held (tests check they stay bounded).
    pub fn quota_entries(&self) -> usize {
        self.quota.entries()
    }

    /// Whether `callee` has an invitation from `inviter` ringing in any call.
    fn ringing_from(&self, inviter: &UserId, callee: &UserId) -> bool {
        let Some(p) = self.users.get(callee) else {
            return false;
        };
        p.calls.iter().any(|id| {
            self.calls
                .get(id)
                .and_then(|c| c.user(callee))
                .is_some_and(|r| r.state.is_ringing() && &r.inviter == inviter)
        })
    }

    /// The state a newly invited user starts in.
    fn initial_state(&self, u: &UserId, call: Option<&CallId>) -> UserState {
        if self.rules.busy_policy == BusyPolicy::Reject && self.busy_call(u, call).is_some() {
            UserState::Busy
        } else if self.is_online(u) {
            UserState::Received
        } else {
            UserState::Offline
        }
    }

    /// Delivers invitations to `invitees` (whose records are already in the call) and reports their
    /// states.
    fn ring(&mut self, now: u64, call_id: &CallId, invitees: &[UserId], out: &mut Output) {
        let Some(call) = self.calls.get(call_id) else {
            return;
        };
        let mut invited = Vec::new();
        for u in invitees {
            let Some(rec) = call.user(u) else { continue };
            match rec.state {
                UserState::Received => {
                    let ev = Arc::new(invitation_event(call, rec, now));
                    invited.push((u.clone(), Some(ev), rec.deadline));
                }
                UserState::Offline => {
                    out.effects.push(Effect::Notice(Notice::InviteeOffline {
                        call_id: call_id.clone(),
                        user_id: u.clone(),
                        inviter: rec.inviter.clone(),
                        extended_data: rec.invite_extended_data.clone(),
                    }));
                    invited.push((u.clone(), None, rec.deadline));
                }
                UserState::Busy => {
                    out.effects.push(Effect::Notice(Notice::InviteeOutcome {
                        call_id: call_id.clone(),
                        user_id: u.clone(),
                        state: UserState::Busy,
                    }));
                }
                _ => {}
            }
        }
        for u in invitees {
            self.index_user(u, call_id);
        }
        for (u, ev, deadline) in invited {
            if let Some(ev) = ev {
                self.deliver_user(out, &u, &ev);
            }
            self.timers
                .insert((deadline, Timer::Invite(call_id.clone(), u.clone())));
        }
        self.state_changed(out, call_id, invitees);
    }

    /// `calling_invite`.
    pub fn calling_invite(
        &mut self,
        now: u64,
        session: SessionId,
        args: CallingInviteArgs,
    ) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_calling_invite(now, session, args, &mut out);
        (out, reply)
    }

    fn do_calling_invite(
        &mut self,
        now: u64,
        session: SessionId,
        args: CallingInviteArgs,
        out: &mut Output,
    ) -> Reply {
        let me = self.requester(session)?;
        self.refuse_if_draining()?;
        self.check_ext(&args.extended_data)?;
        let call = self.member_call(&args.call_id, &me)?;
        if call.mode != Mode::Advanced {
            return Err(err(
                ErrorCode::ModeNotSupported,
                "calling_invite needs an advanced-mode call",
            ));
        }
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        if call.user(&me).map(|u| u.state) != Some(UserState::Accepted) {
            return Err(err(
                ErrorCode::InvalidState,
                "only users in the call may invite",
            ));
        }
        if args.invitees.is_empty() {
            return Err(ApiError::bad_request("invitees must not be empty"));
        }
        if Self::distinct_count(&args.invitees) > self.rules.max_invitees {
            return Err(err(
                ErrorCode::TooManyUsers,
                format!("at most {} invitees", self.rules.max_invitees),
            ));
        }
        let (candidates, mut error_users) = self.classify_invitees(&me, &args.invitees);
        let mut invitees = Vec::new();
        for u in candidates {
            match call.user(&u).map(|r| r.state) {
                Some(s) if s.is_ringing() || s == UserState::Accepted => {
                    error_users.push(ErrorUser {
                        user_id: u.to_string(),
                        reason: "already_in_call",
                    });
                }
                _ => invitees.push(u),
            }
        }
        let present = call.users.len();
        let new_users = invitees.iter().filter(|u| call.user(u).is_none()).count();
        if present + new_users > self.rules.max_call_users {
            return Err(err(
                ErrorCode::TooManyUsers,
                format!("at most {} users in a call", self.rules.max_call_users),
            ));
        }
        let timeout_secs = call.timeout_secs;
        let invitees = self.apply_quota(now, &me, false, invitees, &mut error_users, out)?;
        if invitees.is_empty() {
            return Err(ApiError::bad_request(
                "no invitee can be invited (see the reasons per user)",
            ));
        }
        let deadline = now + u64::from(timeout_secs) * 1000;
        let states: Vec<(UserId, UserState)> = invitees
            .iter()
            .map(|u| (u.clone(), self.initial_state(u, Some(&args.call_id))))
            .collect();
        let Some(call) = self.calls.get_mut(&args.call_id) else {
            return Err(err(ErrorCode::CallNotFound, "no such call"));
        };
        for (u, state) in states {
            let rec = CallUserRecord {
                user_id: u.clone(),
                state,
                extended_data: String::new(),
                inviter: me.clone(),
                invite_extended_data: args.extended_data.clone(),
                invite_time: now,
                deadline: if state.is_ringing() { deadline } else { 0 },
                accept_time: 0,
                leave_time: if state.is_ringing() { 0 } else { now },
            };
            match call.user_mut(&u) {
                Some(existing) => {
                    // A gone user invited again keeps their accept history.
                    let accept_time = existing.accept_time;
                    *existing = CallUserRecord { accept_time, ..rec };
                }
                None => call.users.push(rec),
            }
        }
        let id = args.call_id.clone();
        self.ring(now, &id, &invitees, out);
        self.persist(out, &id);
        Ok(json!({ "call_id": id, "error_users": error_users }))
    }

    /// The call, if `user` appears in it; `call_not_found` otherwise.
    fn member_call(&self, id: &CallId, user: &UserId) -> Result<&CallRecord, ApiError> {
        self.calls
            .get(id)
            .filter(|c| c.user(user).is_some())
            .ok_or_else(|| err(ErrorCode::CallNotFound, "no such call"))
    }

    /// `call_cancel`.
    pub fn call_cancel(
        &mut self,
        now: u64,
        session: SessionId,
        args: CancelArgs,
    ) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_cancel(now, session, args, &mut out);
        (out, reply)
    }

    fn do_cancel(
        &mut self,
        now: u64,
        session: SessionId,
        args: CancelArgs,
        out: &mut Output,
    ) -> Reply {
        let me = self.requester(session)?;
        self.check_ext(&args.extended_data)?;
        let call = self.member_call(&args.call_id, &me)?;
        let invited_any = call
            .users
            .iter()
            .any(|u| u.inviter == me && u.user_id != me);
        if !invited_any {
            return Err(err(
                ErrorCode::NotInviter,
                "only the user who sent an invitation may cancel it",
            ));
        }
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        if call.mode == Mode::General && call.invitee_accepted() {
            return Err(err(
                ErrorCode::InvalidState,
                "an invitee has already accepted",
            ));
        }
        let mine_ringing =
            |u: &CallUserRecord| u.inviter == me && u.user_id != me && u.state.is_ringing();
        let mut error_users = Vec::new();
        let targets: Vec<UserId> = if args.invitees.is_empty() {
            call.users
                .iter()
                .filter(|u| mine_ringing(u))
                .map(|u| u.user_id.clone())
                .collect()
        } else {
            let mut t: Vec<UserId> = Vec::new();
            for s in &args.invitees {
                match UserId::parse(s) {
                    Err(_) => error_users.push(ErrorUser {
                        user_id: s.clone(),
                        reason: "invalid_user_id",
                    }),
                    Ok(u) if u == me => error_users.push(ErrorUser {
                        user_id: s.clone(),
                        reason: "self",
                    }),
                    Ok(u) => {
                        if t.contains(&u) {
                            continue;
                        }
                        if call.user(&u).is_some_and(mine_ringing) {
                            t.push(u);
                        } else {
                            error_users.push(ErrorUser {
                                user_id: s.clone(),
                                reason: "not_pending",
                            });
                        }
                    }
                }
            }
            t
        };
        if targets.is_empty() {
            return Err(err(
                ErrorCode::InvalidState,
                "no invitation of yours is still ringing",
            ));
        }
        let mode = call.mode;
        let id = args.call_id.clone();
        self.cancel_users(now, &id, &targets, &me, &args.extended_data, mode, out);
        self.after_change(
            now,
            &id,
            EndReason::Cancelled,
            &me,
            &args.extended_data,
            out,
        );
        self.persist(out, &id);
        Ok(json!({ "call_id": id, "error_users": error_users }))
    }

    #[allow(clippy::too_many_arguments)]
    fn cancel_users(
        &mut self,
        now: u64,
        id: &CallId,
        targets: &[UserId],
        inviter: &UserId,
        ext: &str,
        mode: Mode,
        out: &mut Output,
    ) {
        if let Some(call) = self.calls.get_mut(id) {
            for u in targets {
                if let Some(r) = call.user_mut(u) {
                    r.state = UserState::Cancelled;
                    r.deadline = 0;
                    r.leave_time = now;
                }
            }
        }
        let ev = Arc::new(Event::CallInvitationCancelled {
            call_id: id.clone(),
            inviter: inviter.clone(),
            extended_data: ext.to_owned(),
            mode,
        });
        for u in targets {
            self.deliver_user(out, u, &ev);
            out.effects.push(Effect::Notice(Notice::InviteeOutcome {
                call_id: id.clone(),
                user_id: u.clone(),
                state: UserState::Cancelled,
            }));
        }
        self.state_changed(out, id, targets);
    }

    /// `call_accept` and `call_reject`.
    pub fn call_answer(
        &mut self,
        now: u64,
        session: SessionId,
        args: CallArgs,
        accept: bool,
    ) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_answer(now, session, args, accept, &mut out);
        (out, reply)
    }

    fn do_answer(
        &mut self,
        now: u64,
        session: SessionId,
        args: CallArgs,
        accept: bool,
        out: &mut Output,
    ) -> Reply {
        let me = self.requester(session)?;
        self.check_ext(&args.extended_data)?;
        let call = self.member_call(&args.call_id, &me)?;
        if call.caller == me {
            return Err(err(
                ErrorCode::NotInvitee,
                "the caller cannot answer their own call",
            ));
        }
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        let state = call.user(&me).map(|u| u.state);
        if !state.is_some_and(|s| s.is_ringing()) {
            return Err(err(
                ErrorCode::InvalidState,
                format!(
                    "the invitation is no longer ringing (state {})",
                    state.map_or("none", |s| s.as_str())
                ),
            ));
        }
        if accept {
            self.refuse_if_draining()?;
        }
        if accept
            && self.rules.busy_policy == BusyPolicy::Reject
            && let Some(c) = self.busy_call(&me, Some(&args.call_id))
        {
            return Err(Self::busy_error(c));
        }
        let id = args.call_id.clone();
        let new_state = if accept {
            UserState::Accepted
        } else {
            UserState::Rejected
        };
        if let Some(call) = self.calls.get_mut(&id)
            && let Some(r) = call.user_mut(&me)
        {
            r.state = new_state;
            r.extended_data = args.extended_data.clone();
            r.deadline = 0;
            if accept {
                r.accept_time = now;
            } else {
                r.leave_time = now;
                self.quota.declined(&r.inviter, &me, now);
            }
        }
        if !accept {
            self.prune_quota(now);
        }
        out.effects.push(Effect::Notice(Notice::InviteeOutcome {
            call_id: id.clone(),
            user_id: me.clone(),
            state: new_state,
        }));
        self.state_changed(out, &id, std::slice::from_ref(&me));
        self.after_change(now, &id, EndReason::Rejected, &me, &args.extended_data, out);
        self.persist(out, &id);
        Ok(json!({ "call_id": id }))
    }

    /// `call_join`.
    pub fn call_join(&mut self, now: u64, session: SessionId, args: CallArgs) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_join(now, session, args, &mut out);
        (out, reply)
    }

    fn do_join(&mut self, now: u64, session: SessionId, args: CallArgs, out: &mut Output) -> Reply {
        let me = self.requester(session)?;
        self.refuse_if_draining()?;
        self.check_ext(&args.extended_data)?;
        let call = self
            .calls
            .get(&args.call_id)
            .ok_or_else(|| err(ErrorCode::CallNotFound, "no such call"))?;
        if call.mode != Mode::Advanced {
            return Err(err(
                ErrorCode::ModeNotSupported,
                "call_join needs an advanced-mode call",
            ));
        }
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        let current = call.user(&me).map(|u| u.state);
        if current != Some(UserState::Accepted) {
            if current.is_none() && call.users.len() + 1 > self.rules.max_call_users {
                return Err(err(
                    ErrorCode::TooManyUsers,
                    format!("at most {} users in a call", self.rules.max_call_users),
                ));
            }
            if self.rules.busy_policy == BusyPolicy::Reject
                && let Some(c) = self.busy_call(&me, Some(&args.call_id))
            {
                return Err(Self::busy_error(c));
            }
        }
        let id = args.call_id.clone();
        let Some(call) = self.calls.get_mut(&id) else {
            return Err(err(ErrorCode::CallNotFound, "no such call"));
        };
        if current != Some(UserState::Accepted) {
            match call.user_mut(&me) {
                Some(r) => {
                    r.state = UserState::Accepted;
                    r.extended_data = args.extended_data.clone();
                    r.deadline = 0;
                    r.accept_time = now;
                    r.leave_time = 0;
                }
                None => call.users.push(CallUserRecord {
                    user_id: me.clone(),
                    state: UserState::Accepted,
                    extended_data: args.extended_data.clone(),
                    inviter: me.clone(),
                    invite_extended_data: String::new(),
                    invite_time: now,
                    deadline: 0,
                    accept_time: now,
                    leave_time: 0,
                }),
            }
            self.index_user(&me, &id);
            self.state_changed(out, &id, std::slice::from_ref(&me));
            self.persist(out, &id);
        }
        let Some(call) = self.calls.get(&id) else {
            return Err(err(ErrorCode::CallNotFound, "no such call"));
        };
        let join_time = call.user(&me).map_or(now, |u| u.accept_time);
        Ok(json!({
            "call_id": id,
            "users": call.views(),
            "create_time": call.create_time,
            "join_time": join_time,
        }))
    }

    /// `call_quit`.
    pub fn call_quit(&mut self, now: u64, session: SessionId, args: CallArgs) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_quit(now, session, args, &mut out);
        (out, reply)
    }

    fn advanced_accepted(&self, me: &UserId, id: &CallId, op: &str) -> Result<u64, ApiError> {
        let call = self.member_call(id, me)?;
        if call.mode != Mode::Advanced {
            return Err(err(
                ErrorCode::ModeNotSupported,
                format!("{op} needs an advanced-mode call"),
            ));
        }
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has ended"));
        }
        match call.user(me) {
            Some(u) if u.state == UserState::Accepted => Ok(call.create_time),
            _ => Err(err(
                ErrorCode::InvalidState,
                format!("{op} needs you to be in the call"),
            )),
        }
    }

    fn do_quit(&mut self, now: u64, session: SessionId, args: CallArgs, out: &mut Output) -> Reply {
        let me = self.requester(session)?;
        self.check_ext(&args.extended_data)?;
        let create_time = self.advanced_accepted(&me, &args.call_id, "call_quit")?;
        let id = args.call_id.clone();
        let accept_time = self.quit_user(now, &id, &me, &args.extended_data, out);
        self.persist(out, &id);
        Ok(json!({
            "call_id": id,
            "create_time": create_time,
            "accept_time": accept_time,
            "quit_time": now,
        }))
    }

    /// Moves an accepted user to `quit`, takes them out of the room, and ends the call if it is empty.
    /// Returns their accept time.
    fn quit_user(
        &mut self,
        now: u64,
        id: &CallId,
        user: &UserId,
        ext: &str,
        out: &mut Output,
    ) -> u64 {
        let mut accept_time = 0;
        if let Some(call) = self.calls.get_mut(id)
            && let Some(r) = call.user_mut(user)
        {
            r.state = UserState::Quit;
            r.extended_data = ext.to_owned();
            r.leave_time = now;
            accept_time = r.accept_time;
        }
        out.effects.push(Effect::LeaveRoom {
            call_id: id.clone(),
            user_id: user.clone(),
        });
        self.state_changed(out, id, std::slice::from_ref(user));
        self.after_change(now, id, EndReason::Empty, user, ext, out);
        accept_time
    }

    /// `call_end`.
    pub fn call_end(&mut self, now: u64, session: SessionId, args: CallArgs) -> (Output, Reply) {
        let mut out = Output::default();
        let reply = self.do_end(now, session, args, &mut out);
        (out, reply)
    }

    fn do_end(&mut self, now: u64, session: SessionId, args: CallArgs, out: &mut Output) -> Reply {
        let me = self.requester(session)?;
        self.check_ext(&args.extended_data)?;
        let create_time = self.advanced_accepted(&me, &args.call_id, "call_end")?;
        let id = args.call_id.clone();
        let accept_time = self
            .calls
            .get(&id)
            .and_then(|c| c.user(&me))
            .map_or(0, |u| u.accept_time);
        self.end_call(now, &id, EndReason::Ended, &me, &args.extended_data, out);
        Ok(json!({
            "call_id": id,
            "create_time": create_time,
            "accept_time": accept_time,
            "end_time": now,
        }))
    }

    /// Ends a call for an operator (`POST /v1/calls/{id}/end`) or a drain.
    pub fn end_by_server(
        &mut self,
        now: u64,
        id: &CallId,
        reason: EndReason,
    ) -> Result<Output, ApiError> {
        let call = self
            .calls
            .get(id)
            .ok_or_else(|| err(ErrorCode::CallNotFound, "no such call"))?;
        if call.state != CallState::Started {
            return Err(err(ErrorCode::InvalidState, "the call has already ended"));
        }
        let caller = call.caller.clone();
        let mut out = Output::default();
        self.end_call(now, id, reason, &caller, "", &mut out);
        Ok(out)
    }

    // ----- room occupancy -----

    /// The media plane reports how many participants the call's room has.
    pub fn room_changed(&mut self, now: u64, id: &CallId, participants: usize) -> Output {
        let out = Output::default();
        let Some(room) = self.rooms.get_mut(id) else {
            return out;
        };
        room.participants = participants;
        if participants > 0 {
            room.empty_since = None;
        } else {
            self.maybe_start_empty_countdown(id, now);
        }
        out
    }

    /// In general mode, once nobody rings and somebody accepted, an empty room counts down to `completed`.
    fn maybe_start_empty_countdown(&mut self, id: &CallId, now: u64) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        if call.mode != Mode::General
            || call.state != CallState::Started
            || call.any_ringing()
            || !call.invitee_accepted()
        {
            return;
        }
        let Some(room) = self.rooms.get_mut(id) else {
            return;
        };
        if room.participants == 0 && room.empty_since.is_none() {
            room.empty_since = Some(now);
            self.timers.insert((
                now + self.rules.room_empty_timeout_ms,
                Timer::RoomEmpty(id.clone()),
            ));
        }
    }

    // ----- timers -----

    /// Fires every timer due at `now`.
    pub fn tick(&mut self, now: u64) -> Output {
        let mut out = Output::default();
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let Some((at, timer)) = self.timers.pop_first() else {
                break;
            };
            match timer {
                Timer::Invite(id, user) => self.fire_invite_timeout(now, at, &id, &user, &mut out),
                Timer::Gone(user) => self.fire_gone(now, &user, &mut out),
                Timer::RoomEmpty(id) => self.fire_room_empty(now, &id, &mut out),
                Timer::Evict(id) => {
                    if self
                        .calls
                        .get(&id)
                        .is_some_and(|c| c.state == CallState::Ended)
                    {
                        self.calls.remove(&id);
                        self.rooms.remove(&id);
                    }
                }
            }
        }
        out
    }

    fn fire_invite_timeout(
        &mut self,
        now: u64,
        at: u64,
        id: &CallId,
        user: &UserId,
        out: &mut Output,
    ) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        if call.state != CallState::Started {
            return;
        }
        let mode = call.mode;
        let caller = call.caller.clone();
        let Some(r) = call.user_mut(user) else { return };
        if !r.state.is_ringing() || r.deadline != at {
            return;
        }
        r.state = UserState::Timeout;
        r.deadline = 0;
        r.leave_time = now;
        out.effects.push(Effect::Notice(Notice::InviteeOutcome {
            call_id: id.clone(),
            user_id: user.clone(),
            state: UserState::Timeout,
        }));
        let ev = Arc::new(Event::CallInvitationTimeout {
            call_id: id.clone(),
            mode,
        });
        self.deliver_user(out, user, &ev);
        self.state_changed(out, id, std::slice::from_ref(user));
        self.after_change(now, id, EndReason::Timeout, &caller, "", out);
        self.persist(out, id);
    }

    fn fire_gone(&mut self, now: u64, user: &UserId, out: &mut Output) {
        let Some(p) = self.users.get(user) else {
            return;
        };
        let Some(since) = p.offline_since else {
            return;
        };
        if !p.sessions.is_empty() || since + self.rules.disconnect_grace_ms > now {
            return;
        }
        for id in p.calls.clone() {
            let Some(call) = self.calls.get(&id) else {
                continue;
            };
            if call.state != CallState::Started {
                continue;
            }
            let Some(me) = call.user(user) else { continue };
            let my_ringing: Vec<UserId> = call
                .users
                .iter()
                .filter(|u| u.inviter == *user && u.user_id != *user && u.state.is_ringing())
                .map(|u| u.user_id.clone())
                .collect();
            if call.caller == *user && !call.invitee_accepted() && !my_ringing.is_empty() {
                // The caller went away before anyone answered: the invitation is withdrawn.
                let mode = call.mode;
                self.cancel_users(now, &id, &my_ringing, user, "", mode, out);
                self.end_call(now, &id, EndReason::CallerGone, user, "", out);
            } else if me.state == UserState::Accepted {
                match call.mode {
                    Mode::Advanced => {
                        self.quit_user(now, &id, user, "", out);
                        self.persist(out, &id);
                    }
                    Mode::General => out.effects.push(Effect::LeaveRoom {
                        call_id: id.clone(),
                        user_id: user.clone(),
                    }),
                }
            }
        }
        if let Some(p) = self.users.get(user)
            && p.sessions.is_empty()
            && p.calls.is_empty()
        {
            self.users.remove(user);
        }
    }

    fn fire_room_empty(&mut self, now: u64, id: &CallId, out: &mut Output) {
        let Some(room) = self.rooms.get(id) else {
            return;
        };
        let Some(since) = room.empty_since else {
            return;
        };
        if room.participants > 0 || since + self.rules.room_empty_timeout_ms > now {
            return;
        }
        let Some(call) = self.calls.get(id) else {
            return;
        };
        if call.state != CallState::Started || call.any_ringing() {
            return;
        }
        let caller = call.caller.clone();
        self.end_call(now, id, EndReason::Completed, &caller, "", out);
    }

    // ----- shared transitions -----

    /// After a change to a started call: general mode ends when nobody rings and nobody accepted
    /// (`fallback` says why), or starts the empty-room countdown; advanced mode ends when nobody is
    /// accepted or ringing.
    fn after_change(
        &mut self,
        now: u64,
        id: &CallId,
        fallback: EndReason,
        operator: &UserId,
        ext: &str,
        out: &mut Output,
    ) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        if call.state != CallState::Started {
            return;
        }
        match call.mode {
            Mode::General => {
                if call.any_ringing() {
                    return;
                }
                if call.invitee_accepted() {
                    self.maybe_start_empty_countdown(id, now);
                } else {
                    let caller = call.caller.clone();
                    let op = if fallback == EndReason::Cancelled {
                        operator.clone()
                    } else {
                        caller
                    };
                    self.end_call(now, id, fallback, &op, ext, out);
                }
            }
            Mode::Advanced => {
                let live = call
                    .users
                    .iter()
                    .any(|u| u.state.is_ringing() || u.state == UserState::Accepted);
                if !live {
                    self.end_call(now, id, EndReason::Empty, operator, ext, out);
                }
            }
        }
    }

    /// Ends a call: users still ringing are cancelled, everyone ringing or `accepted` is told, the room
    /// closes and the record is written.
    fn end_call(
        &mut self,
        now: u64,
        id: &CallId,
        reason: EndReason,
        operator: &UserId,
        ext: &str,
        out: &mut Output,
    ) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        if call.state != CallState::Started {
            return;
        }
        let recipients: Vec<UserId> = call
            .users
            .iter()
            .filter(|u| u.state.is_ringing() || u.state == UserState::Accepted)
            .map(|u| u.user_id.clone())
            .collect();
        let mut stopped_ringing = Vec::new();
        for u in call.users.iter_mut() {
            if u.state.is_ringing() {
                u.state = UserState::Cancelled;
                u.deadline = 0;
                u.leave_time = now;
                stopped_ringing.push(u.user_id.clone());
            } else if u.state == UserState::Accepted {
                u.leave_time = now;
            }
        }
        call.state = CallState::Ended;
        call.end_time = now;
        call.end_reason = Some(reason);
        let caller = call.caller.clone();
        let mode = call.mode;
        let everyone: Vec<UserId> = call.users.iter().map(|u| u.user_id.clone()).collect();
        if !stopped_ringing.is_empty() {
            let changed = Arc::new(Event::CallUserStateChanged {
                call_id: id.clone(),
                users: call
                    .users
                    .iter()
                    .filter(|u| stopped_ringing.contains(&u.user_id))
                    .map(view)
                    .collect(),
            });
            for u in &recipients {
                self.deliver_user(out, u, &changed);
            }
            for u in &stopped_ringing {
                out.effects.push(Effect::Notice(Notice::InviteeOutcome {
                    call_id: id.clone(),
                    user_id: u.clone(),
                    state: UserState::Cancelled,
                }));
            }
        }
        let ended = Arc::new(Event::CallInvitationEnded {
            call_id: id.clone(),
            caller,
            operated_user_id: operator.clone(),
            extended_data: ext.to_owned(),
            mode,
            end_time: now,
            reason,
        });
        for u in &recipients {
            self.deliver_user(out, u, &ended);
        }
        for u in &everyone {
            if let Some(p) = self.users.get_mut(u) {
                p.calls.retain(|c| c != id);
                if p.sessions.is_empty() && p.calls.is_empty() {
                    self.users.remove(u);
                }
            }
        }
        // The room's entry stays until the call is evicted: if this end cannot be stored and is
        // undone (`rollback`), the room's occupancy is still known.
        out.effects.push(Effect::CloseRoom {
            call_id: id.clone(),
        });
        out.effects.push(Effect::Notice(Notice::CallEnded {
            call_id: id.clone(),
            reason,
            users: everyone,
        }));
        self.persist(out, id);
        self.timers.insert((
            now + self.rules.ended_retention_ms,
            Timer::Evict(id.clone()),
        ));
    }

    /// Ends every call in progress (the end of a drain); calls that only ring are kept.
    pub fn end_in_progress(&mut self, now: u64, reason: EndReason) -> Output {
        let mut out = Output::default();
        for id in self.calls_in_progress() {
            let caller = self.calls.get(&id).map(|c| c.caller.clone());
            if let Some(caller) = caller {
                self.end_call(now, &id, reason, &caller, "", &mut out);
            }
        }
        out
    }

    /// Ends every started call.
    pub fn end_all(&mut self, now: u64, reason: EndReason) -> Output {
        let mut out = Output::default();
        let ids: Vec<CallId> = self.started_calls().map(|c| c.call_id.clone()).collect();
        for id in ids {
            let caller = self.calls.get(&id).map(|c| c.caller.clone());
            if let Some(caller) = caller {
                self.end_call(now, &id, reason, &caller, "", &mut out);
            }
        }
        out
    }

    fn index_user(&mut self, user: &UserId, id: &CallId) {
        let p = self.users.entry(user.clone()).or_default();
        if !p.calls.contains(id) {
            p.calls.push(id.clone());
        }
    }

    fn persist(&self, out: &mut Output, id: &CallId) {
        if let Some(c) = self.calls.get(id) {
            // One write per call per input is enough: the last snapshot supersedes earlier ones.
            out.effects
                .retain(|e| !matches!(e, Effect::Persist(r) if r.call_id == *id));
            out.effects.push(Effect::Persist(c.clone()));
        }
    }

    /// Reports `changed` users' states to everyone ringing or accepted in the call and to the changed.
    fn state_changed(&self, out: &mut Output, id: &CallId, changed: &[UserId]) {
        let Some(call) = self.calls.get(id) else {
            return;
        };
        let ev = Arc::new(Event::CallUserStateChanged {
            call_id: id.clone(),
            users: call
                .users
                .iter()
                .filter(|u| changed.contains(&u.user_id))
                .map(view)
                .collect(),
        });
        for u in &call.users {
            if u.state.is_ringing()
                || u.state == UserState::Accepted
                || changed.contains(&u.user_id)
            {
                self.deliver_user(out, &u.user_id, &ev);
            }
        }
    }

    fn deliver_user(&self, out: &mut Output, user: &UserId, ev: &Arc<Event>) {
        self.deliver_user_except(out, user, None, ev);
    }

    fn deliver_user_except(
        &self,
        out: &mut Output,
        user: &UserId,
        except: Option<SessionId>,
        ev: &Arc<Event>,
    ) {
        if let Some(p) = self.users.get(user) {
            for s in &p.sessions {
                if Some(*s) != except {
                    out.deliveries.push(Delivery {
                        session: *s,
                        event: Arc::clone(ev),
                    });
                }
            }
        }
    }
}

fn invitation_event(call: &CallRecord, me: &CallUserRecord, now: u64) -> Event {
    Event::CallInvitationReceived {
        call_id: call.call_id.clone(),
        caller: call.caller.clone(),
        inviter: me.inviter.clone(),
        mode: call.mode,
        timeout: me.deadline.saturating_sub(now).div_ceil(1000),
        extended_data: me.invite_extended_data.clone(),
        create_time: call.create_time,
        users: call.views(),
    }
}
