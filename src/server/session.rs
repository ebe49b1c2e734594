//! One device's WebSocket session: reads request frames, enforces the frame rules of PROTOCOL.md
//! section 2 (size, binary, rate, keepalive), and writes events and replies in order.
//!
//! A single task owns the socket and selects between reading, writing the outbound queue, the keepalive
//! deadline and shutdown, so an idle session is one small task and two small buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch};
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

/// Runs a session until the socket closes, the server shuts down or a rule closes it.
pub async fn run(
    app: AppState,
    mut socket: WebSocket,
    identity: Identity,
    mut shutdown: watch::Receiver<bool>,
) {
    let hub = Arc::clone(&app.hub);
    let cfg = &hub.config().signaling;
    let silence = Duration::from_secs(cfg.heartbeat * 2);
    let mut limiter = RateLimiter::new(cfg.rate, cfg.burst, Instant::now());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sid = hub.connect(&identity, tx);
    let mut seq: u64 = 0;
    let mut deadline = TokioInstant::now() + silence;
    let keepalive = sleep_until(deadline);
    tokio::pin!(keepalive);

    let reason: &'static str = loop {
        tokio::select! {
            biased;
            out = rx.recv() => {
                let Some(out) = out else { break "closed" };
                // Queue this and whatever else is waiting, then flush once: one write for a burst.
                let mut next = Some(out);
                let mut ok = true;
                while let Some(item) = next.take() {
                    if !feed(&mut socket, item, &mut seq).await {
                        ok = false;
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                if !ok || socket.flush().await.is_err() {
                    break "write_failed";
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
                        on_text(&app, sid, &text, &mut limiter).await;
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
    hub.disconnect(sid);
}

async fn on_text(app: &AppState, sid: SessionId, text: &str, limiter: &mut RateLimiter) {
    let started = Instant::now();
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
    if !limiter.allow(started) {
        let e = ApiError::new(ErrorCode::RateLimited, "too many requests");
        hub.reply_in_order(sid, req.id, req.op.name(), started, Err(e));
        return;
    }
    if let Some(media_req) = hub.handle(sid, req, started) {
        let id = media_req.id;
        let name = media_req.op.name();
        let reply = app.media.handle(sid, media_req.op).await;
        hub.reply_in_order(sid, id, name, started, reply);
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

async fn close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
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
