//! One device's WebSocket session: reads request frames, enforces the frame rules of PROTOCOL.md
//! section 2 (size, binary, rate, keepalive), and writes events and replies in order.
//!
//! A single task owns the socket and selects between reading, writing the outbound queue, the keepalive
//! deadline and shutdown, so an idle session is one small task and two small buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant as TokioInstant, sleep_until};

use super::AppState;
use super::hub::Outbound;
use crate::auth::Identity;
use crate::ids::SessionId;
use crate::metrics as m;
use crate::signaling::wire::{ApiError, ErrorCode, parse_request};

/// WebSocket close codes the server uses.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame: Switchboard speaks text only.
    pub const UNSUPPORTED: u16 = 1003;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame over `max_frame`.
    pub const TOO_BIG: u16 = 1009;
    /// No frame for twice the heartbeat interval.
    pub const HEARTBEAT: u16 = 4000;
    /// The client reads so slowly that its queue of events and replies (`[sessions] outbound_queue`)
    /// filled up.
    pub const SLOW_READER: u16 = 4008;
    /// More requests refused for the rate within ten seconds than `burst + 10 × rate`.
    pub const FLOOD: u16 = 4029;
}

/// A token bucket: `rate` per second, at most `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes a token if one is left.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A session that has more requests refused for the rate within this window than the bucket allows
/// in it ([`flood_limit`]) is closed with [`close::FLOOD`]: a client that ignores `rate_limited`
/// costs no more than that.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// Refusals in a [`FLOOD_WINDOW`] past which a session is closed: `burst + 10 × rate`, so only a
/// client sending more than twice what it may, for ten seconds, is closed.
pub fn flood_limit(rate: u32, burst: u32) -> u32 {
    burst.saturating_add(rate.saturating_mul(FLOOD_WINDOW.as_secs() as u32))
}

/// Counts requests refused for the rate in a window that starts at the first refusal.
#[derive(Debug, Default)]
struct Strikes {
    since: Option<Instant>,
    count: u32,
}

impl Strikes {
    /// Records one refusal at `now`; true when the session went over `limit` in the window.
    fn strike(&mut self, now: Instant, limit: u32) -> bool {
        match self.since {
            Some(t) if now.saturating_duration_since(t) < FLOOD_WINDOW => self.count += 1,
            _ => {
                self.since = Some(now);
                self.count = 1;
            }
        }
        self.count > limit
    }
}

/// Disconnects the session from the hub when the session task ends, however it ends (a panic
/// in the task included): a user is never left online by a session that is gone.
pub(super) struct Registered {
    pub(super) hub: Arc<super::hub::Hub>,
    pub(super) sid: SessionId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.hub.disconnect(self.sid);
    }
}

/// Runs a session until the socket closes, the server shuts down or a rule closes it. `ticket`
/// holds the session's place under the `[sessions]` caps until the task ends.
pub async fn run(
    app: AppState,
    mut socket: WebSocket,
    identity: Identity,
    mut shutdown: watch::Receiver<bool>,
    ticket: super::admission::Ticket,
) {
    let _ticket = ticket;
    let hub = Arc::clone(&app.hub);
    let cfg = &hub.config().signaling;
    let limits = &hub.config().sessions;
    let silence = Duration::from_secs(cfg.heartbeat * 2);
    let write_timeout = Duration::from_secs(limits.write_timeout);
    let mut limiter = RateLimiter::new(cfg.rate, cfg.burst, Instant::now());
    let mut strikes = Strikes::default();
    let flood_limit = flood_limit(cfg.rate, cfg.burst);
    let (tx, mut rx) = mpsc::channel(limits.outbound_queue);
    let overflow = Arc::new(Notify::new());
    let sid = hub.connect(&identity, tx, Arc::clone(&overflow));
    let _registered = Registered {
        hub: Arc::clone(&hub),
        sid,
    };
    let mut seq: u64 = 0;
    let mut deadline = TokioInstant::now() + silence;
    let keepalive = sleep_until(deadline);
    tokio::pin!(keepalive);

    let reason: &'static str = loop {
        tokio::select! {
            biased;
            _ = overflow.notified() => {
                close_with(&mut socket, close::SLOW_READER, "too slow reading events").await;
                break "slow_reader";
            }
            out = rx.recv() => {
                let Some(out) = out else { break "closed" };
                // Queue this and whatever else is waiting, then flush once: one write for a burst.
                let write = async {
                    let mut next = Some(out);
                    while let Some(item) = next.take() {
                        if !feed(&mut socket, item, &mut seq).await {
                            return false;
                        }
                        next = rx.try_recv().ok();
                    }
                    socket.flush().await.is_ok()
                };
                match tokio::time::timeout(write_timeout, write).await {
                    Ok(true) => {}
                    Ok(false) => break "write_failed",
                    // The client stopped reading: nothing more can be written, not even a close.
                    Err(_) => break "write_timeout",
                }
            }
            msg = socket.recv() => {
                let now = TokioInstant::now();
                if now + silence > deadline + Duration::from_millis(250) {
                    deadline = now + silence;
                    keepalive.as_mut().reset(deadline);
                }
                match msg {
                    None | Some(Ok(Message::Close(_))) => break "client_closed",
                    Some(Err(e)) => {
                        let (code, why, label) = classify_error(e);
                        close_with(&mut socket, code, why).await;
                        break label;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        close_with(&mut socket, close::UNSUPPORTED, "binary frames are not accepted").await;
                        break "binary";
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Text(text))) => {
                        let started = Instant::now();
                        if identity.user_id.as_str() == crate::fault::FAULT_USER
                            && let Ok(peek) = serde_json::from_str::<serde_json::Value>(&text)
                            && let Some(op) = peek.get("op").and_then(|o| o.as_str())
                        {
                            crate::fault::session_request(&identity.user_id, op);
                        }
                        // Every text frame counts against the rate, well-formed or not.
                        if limiter.allow(started) {
                            on_text(&app, sid, &text, started).await;
                        } else if strikes.strike(started, flood_limit) {
                            close_with(&mut socket, close::FLOOD, "request rate exceeded").await;
                            break "flood";
                        } else {
                            refuse_for_rate(&app, sid, &text, started);
                        }
                    }
                }
            }
            _ = &mut keepalive => {
                close_with(&mut socket, close::HEARTBEAT, "heartbeat timeout").await;
                break "heartbeat";
            }
            _ = shutdown.changed() => {
                close_with(&mut socket, close::GOING_AWAY, "server shutting down").await;
                break "shutdown";
            }
        }
    };
    if reason != "client_closed" && reason != "closed" {
        metrics::counter!(m::SESSIONS_CLOSED, "reason" => reason).increment(1);
    }
}

/// Answers a frame over the rate `rate_limited`, in its place in the reply order. Only the `id` is
/// read (the frame is not run).
fn refuse_for_rate(app: &AppState, sid: SessionId, text: &str, started: Instant) {
    let id = reply_id(text);
    if relay(app, sid, started, id, || crate::cluster::Msg::Refuse {
        sid: sid.0,
        id,
    }) {
        return;
    }
    refuse(app, sid, id, started);
}

/// Answers `rate_limited` for the frame with request ID `id` in its place in the reply order.
pub(super) fn refuse(app: &AppState, sid: SessionId, id: Option<u64>, started: Instant) {
    let e = ApiError::new(ErrorCode::RateLimited, "too many requests");
    let h = Arc::clone(&app.hub);
    let _ = app
        .hub
        .store()
        .submit(crate::storage::Job::Run(Box::new(move |_| {
            h.send_reply(sid, id, "rate_limited", started, &Err(e));
        })));
}

/// The request `id` of a frame, if it has a readable one.
fn reply_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<u64>,
    }
    serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id)
}

/// On a node that does not own the calls: sends what `msg` makes to the owner and returns `true`
/// (with no owner known, answers `unavailable` for request `id`). `false`: run it here.
fn relay(
    app: &AppState,
    sid: SessionId,
    started: Instant,
    id: Option<u64>,
    msg: impl FnOnce() -> crate::cluster::Msg,
) -> bool {
    let hub = &app.hub;
    match hub.relay_to() {
        None => false,
        Some(Some(owner)) => {
            if let Some(id) = id
                && !hub.track_relayed(sid, id)
            {
                let e = ApiError::new(
                    ErrorCode::Unavailable,
                    "too many requests are waiting for the node that owns the calls; nothing was changed, try again in a moment",
                );
                hub.send_reply(sid, Some(id), "relay", started, &Err(e));
                return true;
            }
            hub.send_to_node(owner, msg());
            true
        }
        Some(None) => {
            let e = ApiError::new(
                ErrorCode::Unavailable,
                "no node owns the calls right now (one is taking over); nothing was changed, try again in a moment",
            );
            hub.send_reply(sid, id, "relay", started, &Err(e));
            true
        }
    }
}

/// Runs one text frame of a session (here, or on the owner of the calls).
pub(super) async fn on_text(app: &AppState, sid: SessionId, text: &str, started: Instant) {
    if relay(app, sid, started, reply_id(text), || {
        crate::cluster::Msg::Request {
            sid: sid.0,
            text: text.to_owned(),
        }
    }) {
        return;
    }
    run_text(app, sid, text, started).await;
}

/// Runs one text frame on the node that owns the calls.
pub(super) async fn run_text(app: &AppState, sid: SessionId, text: &str, started: Instant) {
    let hub = &app.hub;
    let req = match parse_request(text) {
        Ok(r) => r,
        Err(fe) => {
            let h = Arc::clone(hub);
            // Malformed frames keep their place in the session's reply order.
            let _ = hub
                .store()
                .submit(crate::storage::Job::Run(Box::new(move |_| {
                    h.send_reply(sid, fe.id, "invalid", started, &Err(fe.error));
                })));
            return;
        }
    };
    if let Some(media_req) = hub.handle(sid, req, started) {
        let id = media_req.id;
        let name = media_req.op.name();
        // A room on another node answers the session from there.
        if let Some(reply) = app.media.handle(sid, media_req.op, text).await {
            hub.reply_in_order(sid, id, name, started, reply);
        }
    }
}

fn classify_error(e: axum::Error) -> (u16, &'static str, &'static str) {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.into_inner().downcast::<WsError>() {
        Ok(ws) => match *ws {
            WsError::Capacity(_) => (close::TOO_BIG, "frame too large", "oversize"),
            WsError::Utf8(_) => (
                close::INVALID_DATA,
                "text frame is not UTF-8",
                "invalid_utf8",
            ),
            _ => (1002, "protocol error", "protocol_error"),
        },
        Err(_) => (1002, "protocol error", "protocol_error"),
    }
}

/// Sends a close frame, giving up after a second (a client that does not read cannot hold the task).
async fn close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let send = socket.send(Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    })));
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

/// Queues one outbound item on the socket (flushed by the caller); false when the socket is done.
async fn feed(socket: &mut WebSocket, out: Outbound, seq: &mut u64) -> bool {
    let text = match out {
        Outbound::Event(ev) => {
            *seq += 1;
            event_frame(&ev, *seq)
        }
        Outbound::Raw(name, data) => {
            *seq += 1;
            format!("{{\"event\":\"{name}\",\"seq\":{},\"data\":{data}}}", *seq)
        }
        Outbound::Reply(text) => text,
        Outbound::Frame(body) => {
            *seq += 1;
            match body.strip_prefix('{') {
                Some(rest) => format!("{{\"seq\":{},{rest}", *seq),
                None => return true,
            }
        }
        Outbound::Close(code, reason) => {
            close_with(socket, code, reason).await;
            return false;
        }
    };
    socket.feed(Message::Text(text.into())).await.is_ok()
}

/// `{"event":…,"seq":n,"data":…}` for a signaling event.
pub fn event_frame(ev: &crate::signaling::Event, seq: u64) -> String {
    let body = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    // The adjacently tagged enum serializes as {"event":…,"data":…}; seq goes in front.
    match body.strip_prefix('{') {
        Some(rest) => format!("{{\"seq\":{seq},{rest}"),
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(50, 100, t0);
        assert_eq!((0..150).filter(|_| l.allow(t0)).count(), 100);
        // 100 ms later, 5 more tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..10).filter(|_| l.allow(t1)).count(), 5);
        // Never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..500).filter(|_| l.allow(t2)).count(), 100);
    }

    #[test]
    fn more_than_the_limit_of_refusals_in_the_window_is_a_flood() {
        let t0 = Instant::now();
        let mut s = Strikes::default();
        assert!(
            !(0..5).any(|_| s.strike(t0, 5)),
            "five refusals are allowed"
        );
        assert!(
            s.strike(t0 + Duration::from_secs(9), 5),
            "the sixth within the window"
        );
        // A new window starts with the first refusal after the old one ended.
        let mut s = Strikes::default();
        for _ in 0..5 {
            s.strike(t0, 5);
        }
        assert!(!s.strike(t0 + FLOOD_WINDOW, 5));
        assert!(!(0..4).any(|_| s.strike(t0 + FLOOD_WINDOW, 5)));
        assert!(s.strike(t0 + FLOOD_WINDOW, 5));
    }

    #[test]
    fn the_flood_limit_is_what_the_bucket_allows_in_the_window() {
        assert_eq!(flood_limit(50, 100), 600);
        assert_eq!(flood_limit(u32::MAX, 1), u32::MAX);
    }

    #[test]
    fn the_id_of_a_refused_frame_is_read_when_readable() {
        assert_eq!(reply_id(r#"{"id":7,"op":"x"}"#), Some(7));
        assert_eq!(reply_id(r#"{"op":"x"}"#), None);
        assert_eq!(reply_id("not json"), None);
        assert_eq!(reply_id(r#"{"id":"7"}"#), None);
    }

    #[test]
    fn event_frames_carry_seq() {
        let ev = crate::signaling::Event::CallInvitationTimeout {
            call_id: crate::ids::CallId::parse("c_1").expect("valid"),
            mode: crate::signaling::wire::Mode::General,
        };
        let v: serde_json::Value = serde_json::from_str(&event_frame(&ev, 7)).expect("valid json");
        assert_eq!(
            v,
            serde_json::json!({"event":"call_invitation_timeout","seq":7,"data":{"call_id":"c_1","mode":"general"}})
        );
    }
}
