//! The state machine on a virtual clock: every op in every relevant state, both modes, both busy
//! policies, multi-device, offline delivery, going away, limits and races; and property tests over
//! random op sequences.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::core::{CallRecord, Effect, Output, Rules, Signaling};
use super::wire::{CallState, EndReason, ErrorCode, Event, Mode, Reply, UserState, parse_request};
use super::{Applied, Notice};
use crate::config::BusyPolicy;
use crate::ids::{CallId, SessionId, UserId};

const T0: u64 = 1_800_000_000_000;

struct H {
    core: Signaling,
    now: u64,
    next_session: u64,
    inbox: HashMap<SessionId, Vec<Event>>,
    /// What storage holds: the last record of each call whose write "committed".
    records: HashMap<CallId, CallRecord>,
    effects: Vec<Effect>,
    /// Storage is failing: outputs are not committed (no events, no effects) and the calls they
    /// wrote are collected in `unstored` for [`H::undo`].
    failing: bool,
    unstored: Vec<CallId>,
}

fn uid(s: &str) -> UserId {
    UserId::parse(s).expect("valid id")
}

fn rules() -> Rules {
    Rules::default()
}

impl H {
    fn new() -> Self {
        Self::with(rules())
    }

    fn with(rules: Rules) -> Self {
        let mut n = 0u64;
        let core = Signaling::with_id_source(
            rules,
            Box::new(move |_now| {
                n += 1;
                CallId::parse(&format!("c_{n}")).expect("valid")
            }),
        );
        Self {
            core,
            now: T0,
            next_session: 0,
            inbox: HashMap::new(),
            records: HashMap::new(),
            effects: Vec::new(),
            failing: false,
            unstored: Vec::new(),
        }
    }

    fn absorb(&mut self, out: Output) {
        if self.failing {
            // As the shell does when a commit fails: nothing is delivered or carried out.
            for e in out.effects {
                if let Effect::Persist(r) = e
                    && !self.unstored.contains(&r.call_id)
                {
                    self.unstored.push(r.call_id);
                }
            }
            return;
        }
        for d in out.deliveries {
            self.inbox
                .entry(d.session)
                .or_default()
                .push((*d.event).clone());
        }
        for e in out.effects {
            if let Effect::Persist(r) = &e {
                self.records.insert(r.call_id.clone(), r.clone());
            }
            self.effects.push(e);
        }
    }

    fn connect(&mut self, user: &str) -> SessionId {
        self.next_session += 1;
        let s = SessionId(self.next_session);
        let out = self.core.connect(self.now, s, uid(user), None);
        self.absorb(out);
        s
    }

    fn disconnect(&mut self, s: SessionId) {
        let out = self.core.disconnect(self.now, s);
        self.absorb(out);
    }

    fn op(&mut self, s: SessionId, op: &str, args: Value) -> Reply {
        let text = json!({"id": 1, "op": op, "args": args}).to_string();
        let req = match parse_request(&text) {
            Ok(r) => r,
            Err(e) => return Err(e.error),
        };
        match self.core.apply(self.now, s, req.op) {
            Applied::Done(out, reply) => {
                self.absorb(out);
                reply
            }
            Applied::NotMine(_) => panic!("{op} is not a core op"),
        }
    }

    fn ok(&mut self, s: SessionId, op: &str, args: Value) -> Value {
        match self.op(s, op, args) {
            Ok(v) => v,
            Err(e) => panic!("{op} failed: {e:?}"),
        }
    }

    fn fails(&mut self, s: SessionId, op: &str, args: Value, code: ErrorCode) {
        match self.op(s, op, args) {
            Ok(v) => panic!("{op} succeeded with {v}, expected {code:?}"),
            Err(e) => assert_eq!(e.code, code, "{op}: {}", e.message),
        }
    }

    /// Advances the clock by `ms`, firing timers at their deadlines in order.
    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while let Some(d) = self.core.next_deadline() {
            if d > end {
                break;
            }
            self.now = self.now.max(d);
            let out = self.core.tick(self.now);
            self.absorb(out);
        }
        self.now = end;
    }

    /// Storage gave up on what was written while `failing`: the shell puts those calls back as
    /// last committed (or forgets them), as the storage thread's restorer does.
    fn undo(&mut self) {
        self.failing = false;
        for id in std::mem::take(&mut self.unstored) {
            let committed = self
                .records
                .get(&id)
                .filter(|r| r.state == CallState::Started)
                .cloned();
            self.core.rollback(self.now, &id, committed);
        }
    }

    /// Runs `f` with storage failing, then undoes what it changed.
    fn unstored<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.failing = true;
        let r = f(self);
        self.undo();
        r
    }

    fn take(&mut self, s: SessionId) -> Vec<Event> {
        self.inbox.remove(&s).unwrap_or_default()
    }

    fn names(&mut self, s: SessionId) -> Vec<&'static str> {
        self.take(s).iter().map(Event::name).collect()
    }

    fn clear(&mut self) {
        self.inbox.clear();
        self.effects.clear();
    }

    fn state(&self, call: &str, user: &str) -> UserState {
        let r = &self.records[&CallId::parse(call).expect("valid")];
        r.users
            .iter()
            .find(|u| u.user_id.as_str() == user)
            .map(|u| u.state)
            .expect("user in call")
    }

    fn record(&self, call: &str) -> &CallRecord {
        &self.records[&CallId::parse(call).expect("valid")]
    }

    fn invite(&mut self, s: SessionId, invitees: &[&str], mode: &str) -> String {
        let r = self.ok(
            s,
            "call_invite",
            json!({"invitees": invitees, "mode": mode, "timeout": 60}),
        );
        r["call_id"].as_str().expect("call_id").to_owned()
    }

    fn room(&mut self, call: &str, n: usize) {
        let out = self
            .core
            .room_changed(self.now, &CallId::parse(call).expect("valid"), n);
        self.absorb(out);
    }
}

fn ended_reason(events: &[Event]) -> Option<EndReason> {
    events.iter().find_map(|e| match e {
        Event::CallInvitationEnded { reason, .. } => Some(*reason),
        _ => None,
    })
}

fn states_in(events: &[Event]) -> Vec<(String, UserState)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CallUserStateChanged { users, .. } => Some(users),
            _ => None,
        })
        .flatten()
        .map(|u| (u.user_id.to_string(), u.state))
        .collect()
}

// ----- call_invite -----

#[test]
fn invite_rings_online_invitees_and_reports_states_before_the_reply() {
    let mut h = H::new();
    let a = h.connect("alice");
    let a2 = h.connect("alice");
    let b = h.connect("bob");
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": ["bob", "carol"], "timeout": 30, "extended_data": "{\"type\":1}"}),
    );
    assert_eq!(r["call_id"], "c_1");
    assert_eq!(r["timeout"], 30);
    assert_eq!(r["error_users"], json!([]));

    let bob = h.take(b);
    assert_eq!(bob[0].name(), "call_invitation_received");
    let Event::CallInvitationReceived {
        caller,
        inviter,
        timeout,
        extended_data,
        users,
        mode,
        ..
    } = &bob[0]
    else {
        panic!("not an invitation")
    };
    assert_eq!(caller.as_str(), "alice");
    assert_eq!(inviter.as_str(), "alice");
    assert_eq!(*timeout, 30);
    assert_eq!(extended_data, "{\"type\":1}");
    assert_eq!(*mode, Mode::General);
    assert_eq!(users.len(), 3);

    // The caller learns every invitee's state at once.
    let alice = h.take(a);
    assert_eq!(
        states_in(&alice),
        vec![
            ("bob".into(), UserState::Received),
            ("carol".into(), UserState::Offline)
        ]
    );
    // The caller's other session is told the call was created.
    assert_eq!(
        h.names(a2),
        vec!["call_invitation_created", "call_user_state_changed"]
    );
    assert_eq!(h.record("c_1").state, CallState::Started);
    assert!(h.effects.iter().any(|e| matches!(
        e,
        Effect::Notice(Notice::InviteeOffline { user_id, .. }) if user_id.as_str() == "carol"
    )));
}

#[test]
fn invite_validates_arguments() {
    let mut h = H::new();
    let a = h.connect("alice");
    h.fails(
        a,
        "call_invite",
        json!({"invitees": []}),
        ErrorCode::BadRequest,
    );
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["bob"], "timeout": 0}),
        ErrorCode::BadRequest,
    );
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["bob"], "timeout": 601}),
        ErrorCode::BadRequest,
    );
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["bob"], "extended_data": "x".repeat(4097)}),
        ErrorCode::BadRequest,
    );
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["bob"], "mode": "solo"}),
        ErrorCode::BadRequest,
    );
    // All invitees in error_users: no call, bad_request.
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["alice", "not valid"]}),
        ErrorCode::BadRequest,
    );
    assert!(h.records.is_empty());
    // Some in error_users: the call is made and they are listed.
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": ["bob", "alice", "b c", "bob"], "timeout": 10}),
    );
    assert_eq!(
        r["error_users"],
        json!([{"user_id": "alice", "reason": "self"}, {"user_id": "b c", "reason": "invalid_user_id"}])
    );
    // Duplicates count once.
    assert_eq!(h.record("c_1").users.len(), 2);
}

#[test]
fn invite_limits_invitees_and_call_users() {
    let mut h = H::new();
    let a = h.connect("alice");
    let ten: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ten}),
        ErrorCode::TooManyUsers,
    );
    let nine: Vec<String> = (0..9).map(|i| format!("u{i}")).collect();
    let mut dup = nine.clone();
    dup.push("u0".into());
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": dup, "mode": "advanced"}),
    );
    let call = r["call_id"].as_str().expect("id").to_owned();
    assert_eq!(h.record(&call).users.len(), 10);
    // The call is full: neither calling_invite nor call_join can add an 11th.
    h.fails(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["extra"]}),
        ErrorCode::TooManyUsers,
    );
    let x = h.connect("extra");
    h.fails(
        x,
        "call_join",
        json!({"call_id": call}),
        ErrorCode::TooManyUsers,
    );

    let mut tight = rules();
    tight.max_invitees = 3;
    tight.max_call_users = 3;
    let mut h = H::with(tight);
    let a = h.connect("alice");
    h.fails(
        a,
        "call_invite",
        json!({"invitees": ["a1", "a2", "a3"]}),
        ErrorCode::TooManyUsers,
    );
    h.ok(a, "call_invite", json!({"invitees": ["a1", "a2"]}));
}

#[test]
fn default_timeout_applies_when_absent() {
    let mut h = H::new();
    let a = h.connect("alice");
    let r = h.ok(a, "call_invite", json!({"invitees": ["bob"]}));
    assert_eq!(r["timeout"], 90);
    h.advance(89_999);
    assert_eq!(h.state("c_1", "bob"), UserState::Offline);
    h.advance(1);
    assert_eq!(h.state("c_1", "bob"), UserState::Timeout);
}

// ----- accept / reject -----

#[test]
fn accept_stops_ringing_on_other_devices_and_keeps_a_general_call_started() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b1 = h.connect("bob");
    let b2 = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.clear();
    let r = h.ok(
        b1,
        "call_accept",
        json!({"call_id": call, "extended_data": "hi"}),
    );
    assert_eq!(r["call_id"], call);
    // Both of Bob's devices and Alice see the change.
    for s in [a, b1, b2] {
        let ev = h.take(s);
        assert_eq!(states_in(&ev), vec![("bob".into(), UserState::Accepted)]);
    }
    let rec = h.record(&call);
    assert_eq!(rec.state, CallState::Started);
    assert_eq!(rec.users[1].extended_data, "hi");
    // The second device can no longer answer.
    h.fails(
        b2,
        "call_reject",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    h.fails(
        b2,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
}

#[test]
fn answer_errors_name_the_wrong_side_and_unknown_calls() {
    let mut h = H::new();
    let a = h.connect("alice");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob"], "general");
    h.fails(
        a,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::NotInvitee,
    );
    h.fails(
        a,
        "call_reject",
        json!({"call_id": call}),
        ErrorCode::NotInvitee,
    );
    h.fails(
        c,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::CallNotFound,
    );
    h.fails(
        c,
        "call_accept",
        json!({"call_id": "c_999"}),
        ErrorCode::CallNotFound,
    );
    let b = h.connect("bob");
    h.fails(
        b,
        "call_cancel",
        json!({"call_id": call}),
        ErrorCode::NotInviter,
    );
}

#[test]
fn general_call_ends_rejected_when_the_last_invitee_declines() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob", "carol"], "general");
    h.ok(b, "call_reject", json!({"call_id": call}));
    assert_eq!(h.record(&call).state, CallState::Started);
    h.clear();
    h.ok(
        c,
        "call_reject",
        json!({"call_id": call, "extended_data": "sorry"}),
    );
    let rec = h.record(&call);
    assert_eq!(rec.state, CallState::Ended);
    assert_eq!(rec.end_reason, Some(EndReason::Rejected));
    let alice = h.take(a);
    assert_eq!(ended_reason(&alice), Some(EndReason::Rejected));
    // Carol is no longer ringing, so she is told of her change, not of the end.
    let carol = h.take(c);
    assert_eq!(
        states_in(&carol),
        vec![("carol".into(), UserState::Rejected)]
    );
    assert_eq!(ended_reason(&carol), None);
    assert!(
        h.effects
            .iter()
            .any(|e| matches!(e, Effect::CloseRoom { call_id } if call_id.as_str() == call))
    );
}

#[test]
fn general_call_with_an_acceptance_ends_completed_after_the_room_stays_empty() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    // Nobody joined the room: the countdown started when the invitation was over.
    h.advance(10_000);
    h.room(&call, 2);
    h.advance(120_000);
    assert_eq!(h.record(&call).state, CallState::Started);
    h.room(&call, 1);
    h.advance(120_000);
    assert_eq!(h.record(&call).state, CallState::Started);
    h.room(&call, 0);
    h.clear();
    h.advance(29_999);
    assert_eq!(h.record(&call).state, CallState::Started);
    h.advance(1);
    assert_eq!(h.record(&call).state, CallState::Ended);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Completed));
    assert_eq!(ended_reason(&h.take(a)), Some(EndReason::Completed));
    assert_eq!(ended_reason(&h.take(b)), Some(EndReason::Completed));
}

#[test]
fn a_general_call_is_not_completed_while_someone_still_rings() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.advance(59_000);
    assert_eq!(h.record(&call).state, CallState::Started);
    // Carol times out at 60 s; the room-empty countdown starts then.
    h.advance(1_000);
    assert_eq!(h.state(&call, "carol"), UserState::Timeout);
    h.advance(29_000);
    assert_eq!(h.record(&call).state, CallState::Started);
    h.advance(1_000);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Completed));
}

// ----- cancel -----

#[test]
fn cancel_withdraws_all_ringing_invitations_and_ends_a_general_call() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "general");
    h.clear();
    let r = h.ok(
        a,
        "call_cancel",
        json!({"call_id": call, "extended_data": "oops"}),
    );
    assert_eq!(r["error_users"], json!([]));
    let bob = h.take(b);
    assert!(matches!(
        &bob[0],
        Event::CallInvitationCancelled { inviter, extended_data, .. }
            if inviter.as_str() == "alice" && extended_data == "oops"
    ));
    assert_eq!(h.state(&call, "bob"), UserState::Cancelled);
    assert_eq!(h.state(&call, "carol"), UserState::Cancelled);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Cancelled));
    assert_eq!(ended_reason(&h.take(a)), Some(EndReason::Cancelled));
    // Accept after cancel loses.
    h.fails(
        b,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
}

#[test]
fn cancel_of_some_invitees_lists_those_not_pending() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol", "dave"], "general");
    h.ok(b, "call_reject", json!({"call_id": call}));
    let r = h.ok(
        a,
        "call_cancel",
        json!({"call_id": call, "invitees": ["carol", "bob", "zed", "b d"]}),
    );
    assert_eq!(
        r["error_users"],
        json!([
            {"user_id": "bob", "reason": "not_pending"},
            {"user_id": "zed", "reason": "not_pending"},
            {"user_id": "b d", "reason": "invalid_user_id"}
        ])
    );
    assert_eq!(h.state(&call, "carol"), UserState::Cancelled);
    assert!(h.state(&call, "dave").is_ringing());
    assert_eq!(h.record(&call).state, CallState::Started);
    // Nothing cancellable left in the list: invalid_state.
    h.fails(
        a,
        "call_cancel",
        json!({"call_id": call, "invitees": ["bob"]}),
        ErrorCode::InvalidState,
    );
}

#[test]
fn general_cancel_after_an_answer_is_invalid() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.fails(
        a,
        "call_cancel",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    assert!(h.state(&call, "carol").is_ringing());
}

#[test]
fn advanced_cancel_after_an_answer_is_allowed() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.ok(a, "call_cancel", json!({"call_id": call}));
    assert_eq!(h.state(&call, "carol"), UserState::Cancelled);
    assert_eq!(h.record(&call).state, CallState::Started);
}

// ----- races -----

#[test]
fn accept_then_cancel_race_the_first_applied_wins() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.fails(
        a,
        "call_cancel",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    assert_eq!(h.state(&call, "bob"), UserState::Accepted);
}

#[test]
fn cancel_then_accept_race_the_first_applied_wins() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(a, "call_cancel", json!({"call_id": call}));
    h.fails(
        b,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    assert_eq!(h.state(&call, "bob"), UserState::Cancelled);
}

#[test]
fn timeout_then_accept_race_and_accept_just_before_the_deadline() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob", "carol"], "advanced");
    h.advance(59_999);
    h.ok(c, "call_accept", json!({"call_id": call}));
    h.clear();
    h.advance(1);
    let bob = h.take(b);
    assert_eq!(bob[0].name(), "call_invitation_timeout");
    assert_eq!(states_in(&bob), vec![("bob".into(), UserState::Timeout)]);
    assert_eq!(
        states_in(&h.take(a)),
        vec![("bob".into(), UserState::Timeout)]
    );
    h.fails(
        b,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    assert_eq!(h.state(&call, "carol"), UserState::Accepted);
}

#[test]
fn general_call_ends_timeout_when_nobody_answers() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.clear();
    h.advance(60_000);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Timeout));
    assert_eq!(
        h.names(b),
        vec!["call_invitation_timeout", "call_user_state_changed"]
    );
    assert_eq!(ended_reason(&h.take(a)), Some(EndReason::Timeout));
}

// ----- busy -----

#[test]
fn busy_policy_reject_marks_busy_invitees_and_refuses_busy_callers() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.clear();
    // Carol calls Bob, who is in a call.
    let call2 = h.invite(c, &["bob"], "general");
    assert_eq!(h.state(&call2, "bob"), UserState::Busy);
    let carol = h.take(c);
    assert_eq!(states_in(&carol), vec![("bob".into(), UserState::Busy)]);
    // Nobody else rang, so Carol's general call is over.
    assert_eq!(ended_reason(&carol), Some(EndReason::Rejected));
    // Bob did not ring.
    assert!(
        !h.take(b)
            .iter()
            .any(|e| e.name() == "call_invitation_received")
    );
    // Alice and Bob are busy: their own invites fail with the call ID.
    let e = h
        .op(a, "call_invite", json!({"invitees": ["dave"]}))
        .expect_err("busy");
    assert_eq!(e.code, ErrorCode::Busy);
    assert_eq!(e.details, Some(json!({"call_id": call})));
    // A ringing user is busy too.
    let d = h.connect("dave");
    let call3 = h.invite(d, &["erin"], "general");
    let e2 = h.connect("erin");
    let e = h
        .op(e2, "call_invite", json!({"invitees": ["frank"]}))
        .expect_err("ringing is busy");
    assert_eq!(e.details, Some(json!({"call_id": call3})));
    // ...and an invitation to a ringing user is busy.
    let g = h.connect("gina");
    let call4 = h.invite(g, &["erin"], "general");
    assert_eq!(h.state(&call4, "erin"), UserState::Busy);
}

#[test]
fn busy_policy_allow_lets_everything_through() {
    let mut r = rules();
    r.busy_policy = BusyPolicy::Allow;
    let mut h = H::with(r);
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    let call2 = h.invite(c, &["bob"], "general");
    assert_eq!(h.state(&call2, "bob"), UserState::Received);
    h.ok(b, "call_accept", json!({"call_id": call2}));
    h.invite(a, &["dave"], "general");
}

#[test]
fn accepting_a_second_call_while_in_one_is_busy_under_reject() {
    let mut r = rules();
    r.busy_policy = BusyPolicy::Allow;
    let mut h = H::with(r);
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call1 = h.invite(a, &["bob"], "general");
    let call2 = h.invite(c, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call1}));
    // Under allow the server lets Bob accept both.
    h.ok(b, "call_accept", json!({"call_id": call2}));
}

// ----- advanced mode -----

#[test]
fn advanced_mode_invite_more_join_quit_and_end() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let d = h.connect("dave");
    let call = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.clear();
    // Bob invites Carol during the call.
    let r = h.ok(
        b,
        "calling_invite",
        json!({"call_id": call, "invitees": ["carol", "alice", "bob"], "extended_data": "join us"}),
    );
    assert_eq!(
        r["error_users"],
        json!([{"user_id": "bob", "reason": "self"}, {"user_id": "alice", "reason": "already_in_call"}])
    );
    let carol = h.take(c);
    assert!(matches!(
        &carol[0],
        Event::CallInvitationReceived { inviter, caller, extended_data, .. }
            if inviter.as_str() == "bob" && caller.as_str() == "alice" && extended_data == "join us"
    ));
    assert_eq!(
        states_in(&h.take(a)),
        vec![("carol".into(), UserState::Received)]
    );
    // Only Bob may cancel Carol's invitation.
    h.fails(
        a,
        "call_cancel",
        json!({"call_id": call, "invitees": ["carol"]}),
        ErrorCode::InvalidState,
    );
    h.ok(c, "call_accept", json!({"call_id": call}));
    // Dave joins by call ID.
    let r = h.ok(
        d,
        "call_join",
        json!({"call_id": call, "extended_data": "hello"}),
    );
    assert_eq!(r["users"].as_array().map(Vec::len), Some(4));
    assert_eq!(r["join_time"], h.now);
    assert_eq!(h.state(&call, "dave"), UserState::Accepted);
    // Joining again is a no-op.
    h.ok(d, "call_join", json!({"call_id": call}));
    // Carol quits.
    h.clear();
    let r = h.ok(c, "call_quit", json!({"call_id": call}));
    assert_eq!(r["quit_time"], h.now);
    assert_eq!(h.state(&call, "carol"), UserState::Quit);
    assert_eq!(
        states_in(&h.take(d)),
        vec![("carol".into(), UserState::Quit)]
    );
    assert!(h.effects.iter().any(|e| matches!(
        e,
        Effect::LeaveRoom { user_id, .. } if user_id.as_str() == "carol"
    )));
    // Carol can rejoin.
    h.ok(c, "call_join", json!({"call_id": call}));
    // Dave ends it for everyone.
    h.clear();
    let r = h.ok(
        d,
        "call_end",
        json!({"call_id": call, "extended_data": "bye"}),
    );
    assert_eq!(r["end_time"], h.now);
    for s in [a, b, c, d] {
        let ev = h.take(s);
        assert!(matches!(
            ev.last(),
            Some(Event::CallInvitationEnded { reason: EndReason::Ended, operated_user_id, extended_data, .. })
                if operated_user_id.as_str() == "dave" && extended_data == "bye"
        ));
    }
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Ended));
    h.fails(
        a,
        "call_end",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    h.fails(
        a,
        "call_join",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
}

#[test]
fn advanced_call_ends_empty_when_the_last_accepted_user_quits() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.ok(a, "call_quit", json!({"call_id": call}));
    assert_eq!(h.record(&call).state, CallState::Started);
    h.clear();
    h.ok(b, "call_quit", json!({"call_id": call}));
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Empty));
    // Bob is no longer accepted, so he is told of his own change; nobody is left to be told of the end.
    assert_eq!(states_in(&h.take(b)), vec![("bob".into(), UserState::Quit)]);
}

#[test]
fn call_end_while_someone_rings_cancels_them_and_tells_them() {
    let mut h = H::new();
    let a = h.connect("alice");
    let c = h.connect("carol");
    let call = h.invite(a, &["carol"], "advanced");
    h.clear();
    h.ok(a, "call_end", json!({"call_id": call}));
    let carol = h.take(c);
    assert_eq!(
        states_in(&carol),
        vec![("carol".into(), UserState::Cancelled)]
    );
    assert_eq!(ended_reason(&carol), Some(EndReason::Ended));
}

#[test]
fn advanced_only_ops_refuse_general_calls() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    for op in ["call_quit", "call_end", "call_join"] {
        h.fails(a, op, json!({"call_id": call}), ErrorCode::ModeNotSupported);
    }
    h.fails(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["carol"]}),
        ErrorCode::ModeNotSupported,
    );
}

#[test]
fn quit_and_end_need_the_user_to_be_accepted() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "advanced");
    h.fails(
        b,
        "call_quit",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    h.fails(
        b,
        "call_end",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    h.fails(
        b,
        "calling_invite",
        json!({"call_id": call, "invitees": ["carol"]}),
        ErrorCode::InvalidState,
    );
    let z = h.connect("zed");
    h.fails(
        z,
        "call_quit",
        json!({"call_id": call}),
        ErrorCode::CallNotFound,
    );
}

#[test]
fn a_gone_invitee_can_be_invited_again_in_advanced_mode() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_reject", json!({"call_id": call}));
    assert_eq!(h.record(&call).state, CallState::Started);
    // Not at once after his rejection (the re-invite cooldown), but once it has passed.
    h.fails(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["bob"]}),
        ErrorCode::RateLimited,
    );
    h.advance(rules().quota.reinvite_cooldown_ms);
    h.ok(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["bob"]}),
    );
    assert_eq!(h.state(&call, "bob"), UserState::Received);
    h.ok(b, "call_accept", json!({"call_id": call}));
}

// ----- offline delivery, reconnect, going away -----

#[test]
fn offline_invitee_receives_the_invitation_with_the_remaining_timeout_on_connect() {
    let mut h = H::new();
    let a = h.connect("alice");
    let call = h.invite(a, &["bob"], "general");
    assert_eq!(h.state(&call, "bob"), UserState::Offline);
    h.advance(25_000);
    h.clear();
    let b = h.connect("bob");
    let bob = h.take(b);
    assert!(matches!(
        &bob[0],
        Event::CallInvitationReceived { timeout: 35, .. }
    ));
    assert_eq!(states_in(&bob), vec![("bob".into(), UserState::Received)]);
    assert_eq!(
        states_in(&h.take(a)),
        vec![("bob".into(), UserState::Received)]
    );
    assert_eq!(h.state(&call, "bob"), UserState::Received);
}

#[test]
fn a_new_device_gets_ringing_invitations_and_snapshots_of_calls_it_is_in() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call1 = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": call1}));
    let c = h.connect("carol");
    let mut r = rules();
    r.busy_policy = BusyPolicy::Allow;
    let _ = r;
    // Carol invites Bob: under reject he is busy, so use a fresh ringing call for Dave instead.
    let call2 = h.invite(c, &["dave"], "general");
    let d = h.connect("dave");
    h.clear();
    let b2 = h.connect("bob");
    let ev = h.take(b2);
    assert_eq!(ev.len(), 1);
    assert!(matches!(&ev[0], Event::CallUserStateChanged { users, .. } if users.len() == 2));
    let d2 = h.connect("dave");
    let ev = h.take(d2);
    assert!(
        matches!(&ev[0], Event::CallInvitationReceived { call_id, .. } if call_id.as_str() == call2)
    );
    // Existing sessions see nothing from a sibling connecting.
    assert!(h.take(b).is_empty());
    assert!(h.take(d).is_empty());
}

#[test]
fn caller_gone_before_any_answer_cancels_the_invitation() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.disconnect(a);
    h.advance(29_999);
    assert_eq!(h.record(&call).state, CallState::Started);
    h.clear();
    h.advance(1);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::CallerGone));
    assert_eq!(h.state(&call, "bob"), UserState::Cancelled);
    let bob = h.take(b);
    assert_eq!(bob[0].name(), "call_invitation_cancelled");
}

#[test]
fn reconnecting_within_the_grace_keeps_the_call() {
    let mut h = H::new();
    let a = h.connect("alice");
    let call = h.invite(a, &["bob"], "general");
    h.disconnect(a);
    h.advance(20_000);
    let a2 = h.connect("alice");
    h.advance(20_000);
    assert_eq!(h.record(&call).state, CallState::Started);
    // The caller's new device gets a snapshot of the call.
    assert!(
        h.take(a2)
            .iter()
            .any(|e| e.name() == "call_user_state_changed")
    );
}

#[test]
fn a_session_registering_again_gets_the_replay_and_stays_one_session() {
    // A cluster node resyncing its sessions with the owner registers each again.
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.take(b);
    let out = h.core.connect(h.now, b, uid("bob"), None);
    h.absorb(out);
    let replay = h.take(b);
    assert!(
        replay
            .iter()
            .any(|e| e.name() == "call_invitation_received"),
        "the ringing invitation is replayed: {replay:?}"
    );
    assert_eq!(h.core.sessions_of(&uid("bob")), &[b]);
    // One disconnect takes the user offline: the session was not counted twice.
    h.disconnect(b);
    assert!(!h.core.is_online(&uid("bob")));
    assert_eq!(h.state(&call, "bob"), UserState::Received);
}

#[test]
fn an_accepted_user_gone_past_the_grace_quits_an_advanced_call() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.disconnect(b);
    h.advance(30_000);
    assert_eq!(h.state(&call, "bob"), UserState::Quit);
    assert!(h.effects.iter().any(|e| matches!(
        e,
        Effect::LeaveRoom { user_id, .. } if user_id.as_str() == "bob"
    )));
    h.disconnect(a);
    h.advance(30_000);
    assert_eq!(h.record(&call).end_reason, Some(EndReason::Empty));
}

#[test]
fn a_gone_user_in_a_general_call_leaves_the_room_only() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.room(&call, 2);
    h.disconnect(a);
    h.advance(30_000);
    assert_eq!(h.state(&call, "alice"), UserState::Accepted);
    assert!(h.effects.iter().any(|e| matches!(
        e,
        Effect::LeaveRoom { user_id, .. } if user_id.as_str() == "alice"
    )));
    assert_eq!(h.record(&call).state, CallState::Started);
}

#[test]
fn a_ringing_invitee_without_sessions_keeps_ringing_until_the_timeout() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.disconnect(b);
    h.advance(45_000);
    assert_eq!(h.state(&call, "bob"), UserState::Received);
    h.advance(15_000);
    assert_eq!(h.state(&call, "bob"), UserState::Timeout);
}

#[test]
fn restore_rearms_timers_and_replays_to_reconnecting_invitees() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "general");
    let saved: Vec<CallRecord> = h.records.values().cloned().collect();
    let _ = b;
    h.advance(20_000);

    // A new process restores from storage.
    let mut h2 = H::new();
    h2.now = h.now;
    h2.core.restore(saved, h2.now);
    let b2 = h2.connect("bob");
    let a2 = h2.connect("alice");
    let bob = h2.take(b2);
    assert!(matches!(
        &bob[0],
        Event::CallInvitationReceived { timeout: 40, .. }
    ));
    assert!(
        h2.take(a2)
            .iter()
            .any(|e| e.name() == "call_user_state_changed")
    );
    let c2 = h2.connect("carol");
    assert!(matches!(
        &h2.take(c2)[0],
        Event::CallInvitationReceived { .. }
    ));
    h2.advance(40_000);
    assert_eq!(h2.state(&call, "bob"), UserState::Timeout);
    assert_eq!(h2.record(&call).end_reason, Some(EndReason::Timeout));
}

#[test]
fn restore_without_the_caller_returning_ends_caller_gone() {
    let mut h = H::new();
    let a = h.connect("alice");
    let call = h.invite(a, &["bob"], "general");
    let saved: Vec<CallRecord> = h.records.values().cloned().collect();
    let mut h2 = H::new();
    h2.now = h.now + 5_000;
    h2.core.restore(saved, h2.now);
    h2.advance(30_000);
    assert_eq!(h2.record(&call).end_reason, Some(EndReason::CallerGone));
}

// ----- server-side ends, rooms, eviction -----

#[test]
fn admin_end_tells_everyone_and_closes_the_room() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.clear();
    let out = h
        .core
        .end_by_server(h.now, &CallId::parse(&call).expect("id"), EndReason::Admin)
        .expect("ends");
    h.absorb(out);
    assert_eq!(ended_reason(&h.take(a)), Some(EndReason::Admin));
    assert_eq!(ended_reason(&h.take(b)), Some(EndReason::Admin));
    assert!(
        h.core
            .end_by_server(h.now, &CallId::parse(&call).expect("id"), EndReason::Admin)
            .is_err()
    );
}

#[test]
fn room_access_needs_an_accepted_user_in_a_started_call() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob", "carol"], "advanced");
    let id = CallId::parse(&call).expect("id");
    assert!(h.core.may_join_room(&uid("alice"), &id).is_ok());
    assert_eq!(
        h.core.may_join_room(&uid("bob"), &id).map_err(|e| e.code),
        Err(ErrorCode::InvalidState)
    );
    assert_eq!(
        h.core.may_join_room(&uid("zed"), &id).map_err(|e| e.code),
        Err(ErrorCode::CallNotFound)
    );
    h.ok(b, "call_accept", json!({"call_id": call}));
    assert!(h.core.may_join_room(&uid("bob"), &id).is_ok());
    h.ok(b, "call_quit", json!({"call_id": call}));
    assert!(h.core.may_join_room(&uid("bob"), &id).is_err());
    h.ok(a, "call_end", json!({"call_id": call}));
    assert_eq!(
        h.core.may_join_room(&uid("alice"), &id).map_err(|e| e.code),
        Err(ErrorCode::InvalidState)
    );
}

#[test]
fn ended_calls_are_evicted_from_memory_after_the_retention() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_reject", json!({"call_id": call}));
    h.advance(9 * 60_000);
    h.fails(
        b,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::InvalidState,
    );
    h.advance(60_000);
    h.fails(
        b,
        "call_accept",
        json!({"call_id": call}),
        ErrorCode::CallNotFound,
    );
}

#[test]
fn end_all_ends_every_started_call_with_the_reason() {
    let mut h = H::new();
    let a = h.connect("alice");
    let c = h.connect("carol");
    let call1 = h.invite(a, &["bob"], "general");
    let call2 = h.invite(c, &["dave"], "advanced");
    let out = h.core.end_all(h.now, EndReason::ServerShutdown);
    h.absorb(out);
    assert_eq!(h.record(&call1).end_reason, Some(EndReason::ServerShutdown));
    assert_eq!(h.record(&call2).end_reason, Some(EndReason::ServerShutdown));
    assert_eq!(h.core.started_calls().count(), 0);
}

// ----- properties -----

#[derive(Debug, Clone)]
enum Step {
    Connect(usize),
    Disconnect(usize),
    Invite(usize, Vec<usize>, bool),
    CallingInvite(usize, usize, Vec<usize>),
    Cancel(usize, usize),
    Accept(usize, usize),
    Reject(usize, usize),
    Join(usize, usize),
    Quit(usize, usize),
    End(usize, usize),
    Room(usize, usize),
    Advance(u64),
}

const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];

fn step() -> impl Strategy<Value = Step> {
    let u = 0..USERS.len();
    let c = 0..6usize;
    prop_oneof![
        u.clone().prop_map(Step::Connect),
        u.clone().prop_map(Step::Disconnect),
        (
            u.clone(),
            prop::collection::vec(0..USERS.len(), 1..4),
            any::<bool>()
        )
            .prop_map(|(a, b, m)| Step::Invite(a, b, m)),
        (
            u.clone(),
            c.clone(),
            prop::collection::vec(0..USERS.len(), 1..3)
        )
            .prop_map(|(a, c, b)| Step::CallingInvite(a, c, b)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::Cancel(a, c)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::Accept(a, c)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::Reject(a, c)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::Join(a, c)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::Quit(a, c)),
        (u.clone(), c.clone()).prop_map(|(a, c)| Step::End(a, c)),
        (c, 0..3usize).prop_map(|(c, n)| Step::Room(c, n)),
        (0..70_000u64).prop_map(Step::Advance),
    ]
}

/// Which state changes a call user may make.
fn allowed(from: Option<UserState>, to: UserState) -> bool {
    use UserState::*;
    match from {
        None => matches!(to, Accepted | Received | Offline | Busy),
        Some(f) if f == to => true,
        Some(Inviting | Offline) => {
            matches!(to, Received | Accepted | Rejected | Cancelled | Timeout)
        }
        Some(Received) => matches!(to, Accepted | Rejected | Cancelled | Timeout),
        Some(Accepted) => to == Quit,
        // Gone users can be invited again or join.
        Some(Rejected | Busy | Cancelled | Timeout | Quit) => {
            matches!(to, Received | Offline | Busy | Accepted)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_op_sequences_keep_the_invariants(steps in prop::collection::vec(step(), 1..60)) {
        let mut h = H::new();
        let mut sessions: Vec<Vec<SessionId>> = vec![Vec::new(); USERS.len()];
        let mut ids: Vec<String> = Vec::new();
        for st in steps {
            let before = h.records.clone();
            h.clear();
            let call = |i: usize| ids.get(i % ids.len().max(1)).cloned().unwrap_or_else(|| "c_0".into());
            let sess = |sessions: &Vec<Vec<SessionId>>, u: usize| sessions[u].last().copied();
            match st {
                Step::Connect(u) => { let s = h.connect(USERS[u]); sessions[u].push(s); }
                Step::Disconnect(u) => { if let Some(s) = sessions[u].pop() { h.disconnect(s); } }
                Step::Advance(ms) => h.advance(ms),
                Step::Room(c, n) => { let id = call(c); h.room(&id, n); }
                Step::Invite(u, inv, adv) => if let Some(s) = sess(&sessions, u) {
                    let invitees: Vec<&str> = inv.iter().map(|i| USERS[*i]).collect();
                    let mode = if adv { "advanced" } else { "general" };
                    if let Ok(r) = h.op(s, "call_invite", json!({"invitees": invitees, "mode": mode, "timeout": 30})) {
                        ids.push(r["call_id"].as_str().unwrap_or_default().to_owned());
                    }
                },
                Step::CallingInvite(u, c, inv) => if let Some(s) = sess(&sessions, u) {
                    let invitees: Vec<&str> = inv.iter().map(|i| USERS[*i]).collect();
                    let _ = h.op(s, "calling_invite", json!({"call_id": call(c), "invitees": invitees}));
                },
                Step::Cancel(u, c) | Step::Accept(u, c) | Step::Reject(u, c) | Step::Join(u, c)
                | Step::Quit(u, c) | Step::End(u, c) => if let Some(s) = sess(&sessions, u) {
                    let op = match st {
                        Step::Cancel(..) => "call_cancel",
                        Step::Accept(..) => "call_accept",
                        Step::Reject(..) => "call_reject",
                        Step::Join(..) => "call_join",
                        Step::Quit(..) => "call_quit",
                        _ => "call_end",
                    };
                    let _ = h.op(s, op, json!({"call_id": call(c)}));
                },
            }
            let live: HashMap<&str, Vec<SessionId>> = USERS
                .iter()
                .enumerate()
                .map(|(i, u)| (*u, sessions[i].clone()))
                .collect();
            for (id, rec) in &h.records {
                // One caller, first, accepted from the start; users are distinct.
                prop_assert_eq!(&rec.users[0].user_id, &rec.caller);
                prop_assert_eq!(rec.users.iter().filter(|u| u.user_id == rec.caller).count(), 1);
                let mut names: Vec<&UserId> = rec.users.iter().map(|u| &u.user_id).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), rec.users.len());
                // An ended call has nobody ringing.
                if rec.state == CallState::Ended {
                    prop_assert!(rec.users.iter().all(|u| !u.state.is_ringing()));
                    prop_assert!(rec.end_reason.is_some());
                }
                let old = before.get(id);
                for u in &rec.users {
                    let prev = old.and_then(|o| o.users.iter().find(|x| x.user_id == u.user_id)).map(|x| x.state);
                    prop_assert!(allowed(prev, u.state), "{:?} -> {:?} for {} in {}", prev, u.state, u.user_id, id);
                    // The caller's own state at creation is told by the reply and call_invitation_created.
                    if prev == Some(u.state) || (old.is_none() && u.user_id == rec.caller) {
                        continue;
                    }
                    // Every party is told: each live session of the changed user and of every user
                    // ringing or accepted in the call (before or after) got this change.
                    let mut parties: Vec<&UserId> = rec.users.iter()
                        .filter(|x| x.state.is_ringing() || x.state == UserState::Accepted)
                        .map(|x| &x.user_id)
                        .collect();
                    // Users ringing or accepted before the step who did not themselves change in it
                    // (one who left may miss later changes of the same step, as the contract says).
                    if let Some(o) = old {
                        parties.extend(o.users.iter()
                            .filter(|x| x.state.is_ringing() || x.state == UserState::Accepted)
                            .filter(|x| rec.users.iter().any(|y| y.user_id == x.user_id && y.state == x.state))
                            .map(|x| &x.user_id));
                    }
                    parties.push(&u.user_id);
                    for p in parties {
                        for s in live.get(p.as_str()).into_iter().flatten() {
                            let told = h.inbox.get(s).into_iter().flatten().any(|e| matches!(e,
                                Event::CallUserStateChanged { call_id, users }
                                    if call_id == id && users.iter().any(|x| x.user_id == u.user_id && x.state == u.state)));
                            prop_assert!(told, "{} not told that {} is {:?} in {}", p, u.user_id, u.state, id);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_drain_refuses_new_calls_and_ends_only_calls_in_progress() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let in_progress = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": in_progress}));
    let ringing = h.invite(c, &["dave"], "general");
    let g = h.connect("gina");
    // Gina's advanced call only rings too, but Gina sits in its room: it is in progress.
    let advanced = h.invite(g, &["erin"], "advanced");
    h.core.set_draining(true);
    let z = h.connect("zoe");
    h.fails(
        z,
        "call_invite",
        json!({"invitees": ["zed"]}),
        ErrorCode::InvalidState,
    );
    let e = h.connect("erin");
    h.fails(
        e,
        "call_accept",
        json!({"call_id": advanced}),
        ErrorCode::InvalidState,
    );
    h.fails(
        e,
        "call_join",
        json!({"call_id": advanced}),
        ErrorCode::InvalidState,
    );
    h.fails(
        g,
        "calling_invite",
        json!({"call_id": advanced, "invitees": ["x"]}),
        ErrorCode::InvalidState,
    );
    h.room(&advanced, 1);
    let mut ids: Vec<String> = h
        .core
        .calls_in_progress()
        .iter()
        .map(|c| c.to_string())
        .collect();
    ids.sort();
    let mut want = vec![in_progress.clone(), advanced.clone()];
    want.sort();
    assert_eq!(ids, want);
    let out = h.core.end_in_progress(h.now, EndReason::ServerShutdown);
    h.absorb(out);
    assert_eq!(
        h.record(&in_progress).end_reason,
        Some(EndReason::ServerShutdown)
    );
    assert_eq!(
        h.record(&advanced).end_reason,
        Some(EndReason::ServerShutdown)
    );
    assert_eq!(h.record(&ringing).state, CallState::Started);
    // Answers that start no media still work during a drain.
    let d = h.connect("dave");
    h.ok(d, "call_reject", json!({"call_id": ringing}));
    assert_eq!(h.record(&ringing).end_reason, Some(EndReason::Rejected));
}

#[test]
fn a_user_who_hung_up_a_general_call_is_not_busy_while_it_completes() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let c = h.connect("carol");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_accept", json!({"call_id": call}));
    h.room(&call, 2);
    let id = CallId::parse(&call).expect("id");
    // Bob hangs up: the call waits for its room to stay empty, but Bob is free at once.
    h.core.hung_up(&id, &uid("bob"), true);
    h.room(&call, 1);
    let call2 = h.invite(c, &["bob"], "general");
    assert_eq!(h.state(&call2, "bob"), UserState::Received);
    h.ok(b, "call_accept", json!({"call_id": call2}));
    // Alice is still in the room: still busy.
    let e = h
        .op(a, "call_invite", json!({"invitees": ["erin"]}))
        .expect_err("busy");
    assert_eq!(e.code, ErrorCode::Busy);
    // Joining again makes Bob part of the call again.
    h.core.hung_up(&id, &uid("bob"), false);
    assert!(h.core.may_join_room(&uid("bob"), &id).is_ok());
}

// ----- changes that storage could not keep (rollback) -----

#[test]
fn an_invite_that_was_not_stored_leaves_no_trace() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let reply = h.unstored(|h| {
        h.op(
            a,
            "call_invite",
            json!({"invitees": ["bob", "carol"], "timeout": 30}),
        )
    });
    assert!(reply.is_ok(), "the core accepted the op: {reply:?}");
    let id = CallId::parse("c_1").expect("valid");
    assert!(h.core.call(&id).is_none(), "the call was forgotten");
    assert!(h.take(b).is_empty());
    // Nobody is busy: alice can call, bob can be called, and carol's late connect replays nothing.
    let again = h.invite(a, &["bob"], "general");
    assert_eq!(h.state(&again, "bob"), UserState::Received);
    let c = h.connect("carol");
    assert!(h.take(c).is_empty(), "no invitation for carol");
    // The undone call's timer fires nothing.
    h.clear();
    h.advance(31_000);
    assert!(h.effects.iter().all(|e| match e {
        Effect::Persist(r) => r.call_id.as_str() != "c_1",
        _ => true,
    }));
}

#[test]
fn an_accept_that_was_not_stored_leaves_the_invitee_ringing_until_the_timeout() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let id = h.invite(a, &["bob"], "general");
    h.clear();
    let reply = h.unstored(|h| h.op(b, "call_accept", json!({"call_id": id})));
    assert!(reply.is_ok());
    let call = h
        .core
        .call(&CallId::parse(&id).expect("valid"))
        .expect("kept");
    assert_eq!(call, h.record(&id), "the core holds what storage holds");
    assert_eq!(h.state(&id, "bob"), UserState::Received);
    // Bob may answer again, now that storage works.
    h.ok(b, "call_accept", json!({"call_id": id}));
    assert_eq!(h.state(&id, "bob"), UserState::Accepted);

    // Without a second answer the invitation times out at its original deadline.
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let id = h.invite(a, &["bob"], "general");
    h.unstored(|h| h.op(b, "call_reject", json!({"call_id": id})))
        .expect("applied");
    assert_eq!(h.state(&id, "bob"), UserState::Received);
    h.clear();
    h.advance(59_000);
    assert_eq!(h.state(&id, "bob"), UserState::Received);
    h.advance(1_000);
    assert_eq!(h.state(&id, "bob"), UserState::Timeout);
    assert_eq!(ended_reason(&h.take(a)), Some(EndReason::Timeout));
}

#[test]
fn an_end_that_was_not_stored_keeps_the_call_and_its_room() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    let id = h.invite(a, &["bob"], "advanced");
    h.ok(b, "call_accept", json!({"call_id": id}));
    h.room(&id, 2);
    h.clear();
    h.unstored(|h| h.op(a, "call_end", json!({"call_id": id})))
        .expect("applied");
    let call = h
        .core
        .call(&CallId::parse(&id).expect("valid"))
        .expect("kept");
    assert_eq!(call.state, CallState::Started);
    assert!(
        h.take(b).is_empty(),
        "bob was not told of an end that did not happen"
    );
    // Both are still in the call (busy), and may use its room.
    h.fails(
        b,
        "call_invite",
        json!({"invitees": ["carol"]}),
        ErrorCode::Busy,
    );
    assert!(
        h.core
            .may_join_room(&uid("bob"), &CallId::parse(&id).expect("valid"))
            .is_ok()
    );
    // The room's occupancy survived: nobody left, so leaving one participant keeps the call.
    h.room(&id, 1);
    h.ok(a, "call_end", json!({"call_id": id}));
    assert_eq!(h.record(&id).state, CallState::Ended);
}

#[test]
fn a_timeout_that_was_not_stored_fires_again() {
    let mut h = H::new();
    let a = h.connect("alice");
    let _b = h.connect("bob");
    let id = h.invite(a, &["bob"], "general");
    h.unstored(|h| h.advance(60_000));
    assert_eq!(h.state(&id, "bob"), UserState::Received);
    assert!(
        h.core.next_deadline().is_some_and(|d| d <= h.now),
        "the timer is due again"
    );
    h.clear();
    h.advance(1);
    assert_eq!(h.state(&id, "bob"), UserState::Timeout);
}

#[test]
fn a_caller_gone_end_that_was_not_stored_happens_one_grace_period_later() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    // Rings longer than the test runs, so only the caller's going-away can end the call.
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": ["bob"], "timeout": 300}),
    );
    let id = r["call_id"].as_str().expect("call_id").to_owned();
    h.disconnect(a);
    h.unstored(|h| h.advance(31_000));
    assert_eq!(h.record(&id).state, CallState::Started);
    let call = h
        .core
        .call(&CallId::parse(&id).expect("valid"))
        .expect("kept");
    assert_eq!(call.state, CallState::Started);
    // The caller's grace period starts again from the undo.
    h.clear();
    h.advance(29_000);
    assert_eq!(h.record(&id).state, CallState::Started);
    h.advance(1_001);
    assert_eq!(h.record(&id).state, CallState::Ended);
    assert_eq!(h.record(&id).end_reason, Some(EndReason::CallerGone));
    assert!(h.names(b).contains(&"call_invitation_cancelled"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Whatever happens and whichever steps storage fails to keep, the core ends each step holding
    /// exactly what storage holds for every started call, and nothing for calls never stored.
    #[test]
    fn after_any_failed_writes_the_core_holds_what_storage_holds(
        steps in prop::collection::vec((step(), any::<bool>()), 1..60)
    ) {
        let mut h = H::new();
        let mut sessions: Vec<Vec<SessionId>> = vec![Vec::new(); USERS.len()];
        let mut ids: Vec<String> = Vec::new();
        for (st, fails) in steps {
            h.clear();
            // Connects and disconnects are not storage writes that can be undone in the shell
            // (a failed connect closes the session), so only ops, timers and rooms fail here.
            h.failing = fails && !matches!(st, Step::Connect(_) | Step::Disconnect(_));
            let call = |i: usize| ids.get(i % ids.len().max(1)).cloned().unwrap_or_else(|| "c_0".into());
            let sess = |sessions: &Vec<Vec<SessionId>>, u: usize| sessions[u].last().copied();
            match st {
                Step::Connect(u) => { let s = h.connect(USERS[u]); sessions[u].push(s); }
                Step::Disconnect(u) => { if let Some(s) = sessions[u].pop() { h.disconnect(s); } }
                Step::Advance(ms) => h.advance(ms),
                Step::Room(c, n) => { let id = call(c); h.room(&id, n); }
                Step::Invite(u, inv, adv) => if let Some(s) = sess(&sessions, u) {
                    let invitees: Vec<&str> = inv.iter().map(|i| USERS[*i]).collect();
                    let mode = if adv { "advanced" } else { "general" };
                    if let Ok(r) = h.op(s, "call_invite", json!({"invitees": invitees, "mode": mode, "timeout": 30})) {
                        ids.push(r["call_id"].as_str().unwrap_or_default().to_owned());
                    }
                },
                Step::CallingInvite(u, c, inv) => if let Some(s) = sess(&sessions, u) {
                    let invitees: Vec<&str> = inv.iter().map(|i| USERS[*i]).collect();
                    let _ = h.op(s, "calling_invite", json!({"call_id": call(c), "invitees": invitees}));
                },
                Step::Cancel(u, c) | Step::Accept(u, c) | Step::Reject(u, c) | Step::Join(u, c)
                | Step::Quit(u, c) | Step::End(u, c) => if let Some(s) = sess(&sessions, u) {
                    let op = match st {
                        Step::Cancel(..) => "call_cancel",
                        Step::Accept(..) => "call_accept",
                        Step::Reject(..) => "call_reject",
                        Step::Join(..) => "call_join",
                        Step::Quit(..) => "call_quit",
                        _ => "call_end",
                    };
                    let _ = h.op(s, op, json!({"call_id": call(c)}));
                },
            }
            h.undo();
            for (id, rec) in &h.records {
                if rec.state == CallState::Started {
                    prop_assert_eq!(h.core.call(id), Some(rec), "{} differs from storage", id);
                }
            }
            for id in &ids {
                let id = CallId::parse(id).expect("valid");
                if !h.records.contains_key(&id) {
                    prop_assert!(h.core.call(&id).is_none(), "{} was never stored", id);
                }
            }
            // Every started call the core holds is one storage holds.
            for c in h.core.started_calls() {
                prop_assert!(h.records.get(&c.call_id).is_some_and(|r| r == c), "{} is not stored", c.call_id);
            }
        }
    }
}

// ----- invitation quotas -----

fn refused_reasons(h: &H) -> Vec<&'static str> {
    h.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Notice(Notice::InvitationRefused { reason, .. }) => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_caller_creates_at_most_calls_per_minute_calls() {
    let mut h = H::new();
    let a = h.connect("alice");
    h.connect("bob");
    assert_eq!(rules().quota.calls_per_minute, 10, "the default");
    for _ in 0..10 {
        let call = h.invite(a, &["bob"], "general");
        h.ok(a, "call_cancel", json!({"call_id": call}));
        h.advance(1_000);
    }
    let e = h
        .op(a, "call_invite", json!({"invitees": ["bob"]}))
        .expect_err("11th call in a minute");
    assert_eq!(e.code, ErrorCode::RateLimited);
    // The first call was made at T0: one slot frees at T0 + 60 s, 50 s from now.
    assert_eq!(
        e.details,
        Some(json!({"limit": "calls_per_minute", "retry_after": 50}))
    );
    assert_eq!(refused_reasons(&h), vec!["calls_per_minute"]);
    assert_eq!(h.records.len(), 10, "the refused call was never created");
    // Another caller is not limited by Alice's calls.
    let c = h.connect("carol");
    h.invite(c, &["dave"], "general");
    h.advance(50_000);
    h.invite(a, &["bob"], "general");
}

#[test]
fn invitations_per_minute_counts_every_invitee_of_both_invite_ops() {
    let mut r = rules();
    r.quota.calls_per_minute = 0;
    r.quota.invitations_per_minute = 12;
    r.max_call_users = 20;
    let mut h = H::with(r);
    let a = h.connect("alice");
    let call = h.invite(
        a,
        &["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"],
        "advanced",
    );
    h.ok(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["u9", "u10"]}),
    );
    // Ten sent: three more are over twelve, whole op refused, nobody rung.
    let e = h
        .op(
            a,
            "calling_invite",
            json!({"call_id": call, "invitees": ["u11", "u12", "u13"]}),
        )
        .expect_err("over the minute's invitations");
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert_eq!(
        e.details.as_ref().map(|d| d["limit"].clone()),
        Some(json!("invitations_per_minute"))
    );
    assert!(
        h.record(&call)
            .users
            .iter()
            .all(|u| u.user_id.as_str() != "u11")
    );
    // Two still fit.
    h.ok(
        a,
        "calling_invite",
        json!({"call_id": call, "invitees": ["u11", "u12"]}),
    );
    assert_eq!(refused_reasons(&h), vec!["invitations_per_minute"]);
}

#[test]
fn after_a_rejection_the_same_caller_waits_the_cooldown_but_others_and_the_callee_do_not() {
    let mut h = H::new();
    let a = h.connect("alice");
    let b = h.connect("bob");
    h.connect("carol");
    let call = h.invite(a, &["bob"], "general");
    h.ok(b, "call_reject", json!({"call_id": call}));
    h.clear();
    h.advance(1_000);
    // Alice rings Bob and Carol: only Carol rings, Bob is left out with the reason.
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": ["bob", "carol"], "timeout": 60}),
    );
    assert_eq!(
        r["error_users"],
        json!([{"user_id": "bob", "reason": "recently_declined"}])
    );
    let call2 = r["call_id"].as_str().expect("id").to_owned();
    assert!(
        h.record(&call2)
            .users
            .iter()
            .all(|u| u.user_id.as_str() != "bob")
    );
    assert!(
        h.take(b)
            .iter()
            .all(|e| e.name() != "call_invitation_received"),
        "bob was not rung"
    );
    h.ok(a, "call_cancel", json!({"call_id": call2}));
    // Bob alone: nothing to ring, so the op is refused as a quota, naming him.
    let e = h
        .op(a, "call_invite", json!({"invitees": ["bob"]}))
        .expect_err("cooling down");
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert_eq!(
        e.details,
        Some(json!({"error_users": [{"user_id": "bob", "reason": "recently_declined"}]}))
    );
    // Bob may call Alice back at once.
    let back = h.invite(b, &["alice"], "general");
    h.ok(b, "call_cancel", json!({"call_id": back}));
    // Thirty seconds after the rejection Alice may ring him again.
    h.advance(28_999);
    assert!(
        h.op(a, "call_invite", json!({"invitees": ["bob"]}))
            .is_err()
    );
    h.advance(1);
    h.invite(a, &["bob"], "general");
    assert_eq!(
        refused_reasons(&h),
        vec![
            "recently_declined",
            "recently_declined",
            "recently_declined"
        ]
    );
}

#[test]
fn a_callee_has_at_most_one_invitation_ringing_from_one_inviter() {
    let mut r = rules();
    r.busy_policy = BusyPolicy::Allow;
    let mut h = H::with(r);
    let a = h.connect("alice");
    let b = h.connect("bob");
    h.invite(a, &["bob"], "general");
    let r = h.ok(
        a,
        "call_invite",
        json!({"invitees": ["bob", "carol"], "timeout": 60}),
    );
    assert_eq!(
        r["error_users"],
        json!([{"user_id": "bob", "reason": "already_ringing"}])
    );
    let rings = h
        .take(b)
        .iter()
        .filter(|e| e.name() == "call_invitation_received")
        .count();
    assert_eq!(rings, 1, "bob rings once");
    // Someone else may still ring him.
    let c = h.connect("carol");
    let r = h.ok(
        c,
        "call_invite",
        json!({"invitees": ["bob"], "timeout": 60}),
    );
    assert_eq!(r["error_users"], json!([]));
    assert_eq!(refused_reasons(&h), vec!["already_ringing"]);
}

#[test]
fn quota_memory_is_pruned_as_time_passes() {
    let mut h = H::new();
    let mut sessions = Vec::new();
    for i in 0..50 {
        sessions.push(h.connect(&format!("caller{i}")));
    }
    h.connect("target");
    for (i, s) in sessions.iter().enumerate() {
        let call = h.invite(*s, &[&format!("v{i}")], "general");
        h.ok(*s, "call_cancel", json!({"call_id": call}));
    }
    assert_eq!(h.core.quota_entries(), 50);
    h.advance(70_000);
    // The next op prunes what expired.
    let call = h.invite(sessions[0], &["target"], "general");
    h.ok(sessions[0], "call_cancel", json!({"call_id": call}));
    assert_eq!(h.core.quota_entries(), 1);
}
