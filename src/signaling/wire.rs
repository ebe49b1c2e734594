//! The wire shapes of PROTOCOL.md sections 2–4: request frames and their typed arguments, replies,
//! error codes, and the events the server sends.
//!
//! Parsing is total: any text yields either a typed [`Request`] or a [`FrameError`] that carries the
//! request `id` when one could be read, so every malformed frame gets a `bad_request` reply.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{CallId, TrackId, UserId};

/// A protocol error code (PROTOCOL.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed frame, unknown op, wrong or out-of-range argument.
    BadRequest,
    /// The token does not allow this.
    Unauthorized,
    /// No such call, or the user has nothing to do with it.
    CallNotFound,
    /// The op is for an invitee.
    NotInvitee,
    /// The op is for the inviter.
    NotInviter,
    /// The call or user state does not allow the op now.
    InvalidState,
    /// The op needs an advanced-mode call.
    ModeNotSupported,
    /// The requesting user is already calling, being called or in a call.
    Busy,
    /// More invitees than allowed per invitation or in the call.
    TooManyUsers,
    /// Too many requests.
    RateLimited,
    /// The server failed.
    Internal,
    /// The change could not be stored (the database is failing): nothing was changed; try again
    /// later. An addition to the contract's codes.
    Unavailable,
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::CallNotFound => "call_not_found",
            ErrorCode::NotInvitee => "not_invitee",
            ErrorCode::NotInviter => "not_inviter",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::ModeNotSupported => "mode_not_supported",
            ErrorCode::Busy => "busy",
            ErrorCode::TooManyUsers => "too_many_users",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// An error reply: `{"code","message","details"?}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiError {
    /// The protocol code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// Only where the contract says (busy: `call_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with a message and no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// `bad_request` with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// The result of one op: the `result` object or an error.
pub type Reply = Result<Value, ApiError>;

/// Call mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// 1:1 or group invitation; the call lives while its room is in use.
    #[default]
    General,
    /// Join, quit, end and inviting during the call.
    Advanced,
}

impl Mode {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::General => "general",
            Mode::Advanced => "advanced",
        }
    }
}

/// A call user's state (PROTOCOL.md 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserState {
    /// Sent, not yet delivered.
    Inviting,
    /// Delivered to at least one live session.
    Received,
    /// No live session; delivered if one connects before the timeout.
    Offline,
    /// In the call.
    Accepted,
    /// Declined.
    Rejected,
    /// Rejected by the server's busy policy.
    Busy,
    /// The inviter withdrew the invitation (or the call ended while ringing).
    Cancelled,
    /// Nobody answered in time.
    Timeout,
    /// Left after accepting (advanced mode).
    Quit,
}

impl UserState {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            UserState::Inviting => "inviting",
            UserState::Received => "received",
            UserState::Offline => "offline",
            UserState::Accepted => "accepted",
            UserState::Rejected => "rejected",
            UserState::Busy => "busy",
            UserState::Cancelled => "cancelled",
            UserState::Timeout => "timeout",
            UserState::Quit => "quit",
        }
    }

    /// Parses the wire form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "inviting" => UserState::Inviting,
            "received" => UserState::Received,
            "offline" => UserState::Offline,
            "accepted" => UserState::Accepted,
            "rejected" => UserState::Rejected,
            "busy" => UserState::Busy,
            "cancelled" => UserState::Cancelled,
            "timeout" => UserState::Timeout,
            "quit" => UserState::Quit,
            _ => return None,
        })
    }

    /// `inviting`, `received` or `offline`.
    pub fn is_ringing(self) -> bool {
        matches!(
            self,
            UserState::Inviting | UserState::Received | UserState::Offline
        )
    }

    /// `rejected`, `busy`, `cancelled`, `timeout` or `quit`.
    pub fn is_gone(self) -> bool {
        matches!(
            self,
            UserState::Rejected
                | UserState::Busy
                | UserState::Cancelled
                | UserState::Timeout
                | UserState::Quit
        )
    }
}

/// Call state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// In progress.
    Started,
    /// Over.
    Ended,
}

impl CallState {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Started => "started",
            CallState::Ended => "ended",
        }
    }
}

/// Why a call ended (PROTOCOL.md 3.3, plus `server_shutdown` for a drain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// General mode: the invitation is over and the room stayed empty.
    Completed,
    /// `call_end`.
    Ended,
    /// Every invitee was cancelled before anyone accepted.
    Cancelled,
    /// Nobody accepted; the last invitee rejected (or was busy).
    Rejected,
    /// Nobody accepted; the last invitee timed out.
    Timeout,
    /// The caller went away before anyone accepted.
    CallerGone,
    /// Advanced mode: nobody accepted or ringing is left.
    Empty,
    /// An operator ended it.
    Admin,
    /// A server drain ended it.
    ServerShutdown,
}

impl EndReason {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::Ended => "ended",
            EndReason::Cancelled => "cancelled",
            EndReason::Rejected => "rejected",
            EndReason::Timeout => "timeout",
            EndReason::CallerGone => "caller_gone",
            EndReason::Empty => "empty",
            EndReason::Admin => "admin",
            EndReason::ServerShutdown => "server_shutdown",
        }
    }

    /// Parses the wire form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "completed" => EndReason::Completed,
            "ended" => EndReason::Ended,
            "cancelled" => EndReason::Cancelled,
            "rejected" => EndReason::Rejected,
            "timeout" => EndReason::Timeout,
            "caller_gone" => EndReason::CallerGone,
            "empty" => EndReason::Empty,
            "admin" => EndReason::Admin,
            "server_shutdown" => EndReason::ServerShutdown,
            _ => return None,
        })
    }
}

/// `CallUser` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallUserView {
    /// The user.
    pub user_id: UserId,
    /// Their state.
    pub state: UserState,
    /// What they attached to their last answer (accept, reject, join, quit), or "".
    pub extended_data: String,
}

/// `CallInfo` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallInfo {
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
    /// Milliseconds since the epoch.
    pub create_time: u64,
    /// Milliseconds since the epoch; 0 while started.
    pub end_time: u64,
    /// Why it ended (absent while started). An addition to the contract's CallInfo.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub end_reason: Option<EndReason>,
    /// Call users in order, the caller first.
    pub users: Vec<CallUserView>,
}

/// `error_users` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorUser {
    /// The user ID as the client sent it.
    pub user_id: String,
    /// `self`, `invalid_user_id`, `already_in_call`, `not_pending`, `recently_declined` or
    /// `already_ringing`.
    pub reason: &'static str,
}

/// Events the server sends (PROTOCOL.md 1 and 3.3; media events are the SFU's).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// The first frame of every session.
    Session {
        /// This session.
        session_id: String,
        /// Whose it is.
        user_id: UserId,
        /// Server clock, ms since the epoch.
        server_time: u64,
        /// Keepalive interval the server expects, seconds.
        heartbeat: u64,
    },
    /// An invitation for this user.
    CallInvitationReceived {
        /// The call.
        call_id: CallId,
        /// Who created the call.
        caller: UserId,
        /// Who sent this invitation (the caller, or a participant's `calling_invite`).
        inviter: UserId,
        /// Call mode.
        mode: Mode,
        /// Seconds left to answer.
        timeout: u64,
        /// The invitation's extended data.
        extended_data: String,
        /// When the call was created.
        create_time: u64,
        /// Every call user and state.
        users: Vec<CallUserView>,
    },
    /// This user created a call from another session.
    CallInvitationCreated {
        /// The call.
        call_id: CallId,
        /// Call mode.
        mode: Mode,
        /// Seconds the invitation rings.
        timeout: u64,
        /// The invitation's extended data.
        extended_data: String,
        /// When the call was created.
        create_time: u64,
    },
    /// Call users whose state changed.
    CallUserStateChanged {
        /// The call.
        call_id: CallId,
        /// Those that changed (or, on reconnect, all).
        users: Vec<CallUserView>,
    },
    /// The invitation to this user was withdrawn.
    CallInvitationCancelled {
        /// The call.
        call_id: CallId,
        /// Who withdrew it.
        inviter: UserId,
        /// The cancel's extended data.
        extended_data: String,
        /// Call mode.
        mode: Mode,
    },
    /// The invitation to this user timed out.
    CallInvitationTimeout {
        /// The call.
        call_id: CallId,
        /// Call mode.
        mode: Mode,
    },
    /// The call ended.
    CallInvitationEnded {
        /// The call.
        call_id: CallId,
        /// Who created it.
        caller: UserId,
        /// Who ended it: the user whose op ended it, or the caller when a rule did.
        operated_user_id: UserId,
        /// The ending op's extended data, or "".
        extended_data: String,
        /// Call mode.
        mode: Mode,
        /// When it ended.
        end_time: u64,
        /// Why.
        reason: EndReason,
    },
}

impl Event {
    /// The event's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Session { .. } => "session",
            Event::CallInvitationReceived { .. } => "call_invitation_received",
            Event::CallInvitationCreated { .. } => "call_invitation_created",
            Event::CallUserStateChanged { .. } => "call_user_state_changed",
            Event::CallInvitationCancelled { .. } => "call_invitation_cancelled",
            Event::CallInvitationTimeout { .. } => "call_invitation_timeout",
            Event::CallInvitationEnded { .. } => "call_invitation_ended",
        }
    }
}

/// `call_invite` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct InviteArgs {
    /// User IDs as sent; validated by the core so bad ones land in `error_users`.
    pub invitees: Vec<String>,
    /// Defaults to general.
    #[serde(default)]
    pub mode: Mode,
    /// Seconds, 1..600; the configured default when absent.
    #[serde(default)]
    pub timeout: Option<u32>,
    /// At most `max_extended_data` bytes.
    #[serde(default)]
    pub extended_data: String,
}

/// `calling_invite` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct CallingInviteArgs {
    /// The call.
    pub call_id: CallId,
    /// User IDs as sent.
    pub invitees: Vec<String>,
    /// Extended data for the invitation.
    #[serde(default)]
    pub extended_data: String,
}

/// `call_cancel` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct CancelArgs {
    /// The call.
    pub call_id: CallId,
    /// Empty or absent: every invitee of the requester still ringing.
    #[serde(default)]
    pub invitees: Vec<String>,
    /// Extended data for the cancelled invitees.
    #[serde(default)]
    pub extended_data: String,
}

/// Arguments of ops that name a call and may carry extended data.
#[derive(Debug, Clone, Deserialize)]
pub struct CallArgs {
    /// The call.
    pub call_id: CallId,
    /// Extended data.
    #[serde(default)]
    pub extended_data: String,
}

/// `query_call_list` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct QueryCallListArgs {
    /// 1..100, default 20.
    #[serde(default)]
    pub count: Option<u32>,
    /// The `next_flag` of the previous page, or 0 / absent for the first.
    #[serde(default)]
    pub next_flag: Option<u64>,
}

/// `query_users` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct QueryUsersArgs {
    /// User IDs, at most 100.
    pub user_ids: Vec<String>,
}

/// `rtc_join` and `rtc_leave` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct RtcCallArgs {
    /// The call whose room it is.
    pub call_id: CallId,
}

/// `rtc_publish` and `rtc_answer` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct RtcSdpArgs {
    /// The call.
    pub call_id: CallId,
    /// An SDP offer (publish) or answer (answer).
    pub sdp: String,
}

/// Which connection and the candidate itself are the media plane's types (PROTOCOL.md section 4).
pub use crate::sfu::{IceCandidateInit, PcTarget};

/// `rtc_candidate` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct RtcCandidateArgs {
    /// The call.
    pub call_id: CallId,
    /// Which connection.
    pub target: PcTarget,
    /// The candidate.
    pub candidate: IceCandidateInit,
}

/// `rtc_subscription` arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct RtcSubscriptionArgs {
    /// The call.
    pub call_id: CallId,
    /// The track.
    pub track_id: TrackId,
    /// Receive it or not.
    pub enabled: bool,
    /// Largest width wanted.
    #[serde(default)]
    pub max_width: Option<u32>,
    /// Largest height wanted.
    #[serde(default)]
    pub max_height: Option<u32>,
}

/// A parsed op.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create a call.
    CallInvite(InviteArgs),
    /// Invite more users into an advanced call.
    CallingInvite(CallingInviteArgs),
    /// Withdraw invitations.
    CallCancel(CancelArgs),
    /// Accept an invitation.
    CallAccept(CallArgs),
    /// Decline an invitation.
    CallReject(CallArgs),
    /// Join an advanced call by ID.
    CallJoin(CallArgs),
    /// Leave an advanced call.
    CallQuit(CallArgs),
    /// End an advanced call for everyone.
    CallEnd(CallArgs),
    /// The user's calls, newest first.
    QueryCallList(QueryCallListArgs),
    /// Names and presence of users.
    QueryUsers(QueryUsersArgs),
    /// Keepalive.
    Ping,
    /// Join a call's room.
    RtcJoin(RtcCallArgs),
    /// Offer the publisher connection.
    RtcPublish(RtcSdpArgs),
    /// Answer the subscriber connection.
    RtcAnswer(RtcSdpArgs),
    /// Trickle a candidate.
    RtcCandidate(RtcCandidateArgs),
    /// Pause, resume or cap a track.
    RtcSubscription(RtcSubscriptionArgs),
    /// Leave a call's room.
    RtcLeave(RtcCallArgs),
    /// Restart ICE on the subscriber connection (a new `rtc_offer` follows).
    RtcIceRestart(RtcCallArgs),
}

impl Op {
    /// The op name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CallInvite(_) => "call_invite",
            Op::CallingInvite(_) => "calling_invite",
            Op::CallCancel(_) => "call_cancel",
            Op::CallAccept(_) => "call_accept",
            Op::CallReject(_) => "call_reject",
            Op::CallJoin(_) => "call_join",
            Op::CallQuit(_) => "call_quit",
            Op::CallEnd(_) => "call_end",
            Op::QueryCallList(_) => "query_call_list",
            Op::QueryUsers(_) => "query_users",
            Op::Ping => "ping",
            Op::RtcJoin(_) => "rtc_join",
            Op::RtcPublish(_) => "rtc_publish",
            Op::RtcAnswer(_) => "rtc_answer",
            Op::RtcCandidate(_) => "rtc_candidate",
            Op::RtcSubscription(_) => "rtc_subscription",
            Op::RtcLeave(_) => "rtc_leave",
            Op::RtcIceRestart(_) => "rtc_ice_restart",
        }
    }

    /// The call whose room a media op is for (`None` for the other ops).
    pub fn call_id(&self) -> Option<&CallId> {
        match self {
            Op::RtcJoin(a) | Op::RtcLeave(a) | Op::RtcIceRestart(a) => Some(&a.call_id),
            Op::RtcPublish(a) => Some(&a.call_id),
            Op::RtcAnswer(a) => Some(&a.call_id),
            Op::RtcCandidate(a) => Some(&a.call_id),
            Op::RtcSubscription(a) => Some(&a.call_id),
            _ => None,
        }
    }
}

/// A request frame.
#[derive(Debug, Clone)]
pub struct Request {
    /// Chosen by the client; echoed in the reply.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// A frame that could not be parsed into a request.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The request ID, when one could be read.
    pub id: Option<u64>,
    /// The `bad_request` error.
    pub error: ApiError,
}

/// Parses one text frame.
pub fn parse_request(text: &str) -> Result<Request, FrameError> {
    let fail = |id: Option<u64>, msg: String| FrameError {
        id,
        error: ApiError::bad_request(msg),
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| fail(None, format!("frame is not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(fail(None, "frame must be a JSON object".into()));
    };
    let id = match obj.get("id") {
        Some(v) => match v.as_u64() {
            Some(id) => id,
            None => return Err(fail(None, "id must be an unsigned integer".into())),
        },
        None => return Err(fail(None, "missing id".into())),
    };
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(fail(Some(id), "op must be a string".into())),
        None => return Err(fail(Some(id), "missing op".into())),
    };
    let args = match obj.remove("args") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(fail(Some(id), "args must be an object".into())),
    };
    fn typed<T: DeserializeOwned>(op: &str, args: Value) -> Result<T, String> {
        serde_json::from_value(args).map_err(|e| format!("{op}: invalid args: {e}"))
    }
    let parsed = match op.as_str() {
        "call_invite" => typed(&op, args).map(Op::CallInvite),
        "calling_invite" => typed(&op, args).map(Op::CallingInvite),
        "call_cancel" => typed(&op, args).map(Op::CallCancel),
        "call_accept" => typed(&op, args).map(Op::CallAccept),
        "call_reject" => typed(&op, args).map(Op::CallReject),
        "call_join" => typed(&op, args).map(Op::CallJoin),
        "call_quit" => typed(&op, args).map(Op::CallQuit),
        "call_end" => typed(&op, args).map(Op::CallEnd),
        "query_call_list" => typed(&op, args).map(Op::QueryCallList),
        "query_users" => typed(&op, args).map(Op::QueryUsers),
        "ping" => Ok(Op::Ping),
        "rtc_join" => typed(&op, args).map(Op::RtcJoin),
        "rtc_publish" => typed(&op, args).map(Op::RtcPublish),
        "rtc_answer" => typed(&op, args).map(Op::RtcAnswer),
        "rtc_candidate" => typed(&op, args).map(Op::RtcCandidate),
        "rtc_subscription" => typed(&op, args).map(Op::RtcSubscription),
        "rtc_leave" => typed(&op, args).map(Op::RtcLeave),
        "rtc_ice_restart" => typed(&op, args).map(Op::RtcIceRestart),
        other => Err(format!("unknown op {other:?}")),
    };
    parsed
        .map(|op| Request { id, op })
        .map_err(|msg| fail(Some(id), msg))
}

/// A reply frame's text.
pub fn reply_frame(id: Option<u64>, reply: &Reply) -> String {
    #[derive(Serialize)]
    struct Ok<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        ok: bool,
        result: &'a Value,
    }
    #[derive(Serialize)]
    struct Err<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        ok: bool,
        error: &'a ApiError,
    }
    let text = match reply {
        Result::Ok(result) => serde_json::to_string(&Ok {
            id,
            ok: true,
            result,
        }),
        Result::Err(error) => serde_json::to_string(&Err {
            id,
            ok: false,
            error,
        }),
    };
    // Serializing a Value or plain structs of strings and numbers cannot fail.
    text.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults() {
        let r = parse_request(r#"{"id":7,"op":"call_invite","args":{"invitees":["bob"]}}"#)
            .expect("valid");
        assert_eq!(r.id, 7);
        let Op::CallInvite(a) = r.op else {
            panic!("wrong op")
        };
        assert_eq!(a.invitees, vec!["bob"]);
        assert_eq!(a.mode, Mode::General);
        assert_eq!(a.timeout, None);
        assert_eq!(a.extended_data, "");
        assert!(matches!(
            parse_request(r#"{"id":1,"op":"ping"}"#).map(|r| r.op),
            Ok(Op::Ping)
        ));
    }

    #[test]
    fn malformed_frames_are_bad_requests_with_the_id_when_readable() {
        for (text, id) in [
            ("not json", None),
            ("[1,2]", None),
            (r#"{"op":"ping"}"#, None),
            (r#"{"id":-1,"op":"ping"}"#, None),
            (r#"{"id":"7","op":"ping"}"#, None),
            (r#"{"id":3}"#, Some(3)),
            (r#"{"id":3,"op":5}"#, Some(3)),
            (r#"{"id":3,"op":"fly"}"#, Some(3)),
            (r#"{"id":3,"op":"call_invite","args":[]}"#, Some(3)),
            (
                r#"{"id":3,"op":"call_invite","args":{"invitees":"bob"}}"#,
                Some(3),
            ),
            (
                r#"{"id":3,"op":"call_invite","args":{"invitees":["b"],"mode":"x"}}"#,
                Some(3),
            ),
            (
                r#"{"id":3,"op":"call_invite","args":{"invitees":["b"],"timeout":-1}}"#,
                Some(3),
            ),
            (
                r#"{"id":3,"op":"call_accept","args":{"call_id":"bad id"}}"#,
                Some(3),
            ),
            (r#"{"id":3,"op":"call_accept","args":{}}"#, Some(3)),
        ] {
            let e = parse_request(text).expect_err(text);
            assert_eq!(e.id, id, "{text}");
            assert_eq!(e.error.code, ErrorCode::BadRequest, "{text}");
        }
    }

    #[test]
    fn events_serialize_as_the_contract_shows() {
        let e = Event::CallInvitationTimeout {
            call_id: CallId::parse("c_1").expect("valid"),
            mode: Mode::Advanced,
        };
        assert_eq!(
            serde_json::to_value(&e).expect("serializes"),
            serde_json::json!({"event":"call_invitation_timeout","data":{"call_id":"c_1","mode":"advanced"}})
        );
        assert_eq!(e.name(), "call_invitation_timeout");
    }

    #[test]
    fn reply_frames_carry_id_and_ok() {
        let ok = reply_frame(Some(4), &Ok(serde_json::json!({"x":1})));
        assert_eq!(ok, r#"{"id":4,"ok":true,"result":{"x":1}}"#);
        let err = reply_frame(None, &Err(ApiError::bad_request("nope")));
        assert_eq!(
            err,
            r#"{"ok":false,"error":{"code":"bad_request","message":"nope"}}"#
        );
    }
}
