//! What a node does with messages from the others (see `crate::cluster`).
//!
//! On the node that owns the calls, each session whose WebSocket is on another node is a task here:
//! it takes the session's frames in order, runs them as the session task runs a local session's,
//! and sends back what the session is sent (events, replies, a close). On the other nodes, what the
//! owner sends a session is written to its WebSocket.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc};

use super::AppState;
use super::hub::{Outbound, now_ms};
use super::session::{self, Registered};
use crate::cluster::{Inbox, Load, Msg, Out, node_of};
use crate::ids::{CallId, SessionId, UserId};
use crate::signaling::wire::{ApiError, ErrorCode, reply_frame};
use crate::signaling::{Rules, Signaling};

/// Most frames of one remote session waiting to run on the owner (the session's own node already
/// holds it to its request rate).
const INBOUND: usize = 64;

enum Inbound {
    Text(String, Instant),
    Refuse(Option<u64>, Instant),
}

/// This node's side of the cluster's messages.
pub struct Remote {
    app: AppState,
    /// Sessions on other nodes that this node (the owner) runs.
    sessions: DashMap<SessionId, mpsc::Sender<Inbound>>,
    /// On a room's node: each session's media ops, run in order (ops of one session depend on
    /// each other: publish, then candidates).
    media: DashMap<SessionId, mpsc::Sender<(UserId, String)>>,
    /// For the load figures: the last sample of forwarded packets and CPU time.
    last: Mutex<Option<(Instant, u64, f64)>>,
}

impl Remote {
    /// The inbox for `app`'s node.
    pub fn new(app: AppState) -> Arc<Self> {
        Arc::new(Self {
            app,
            sessions: DashMap::new(),
            media: DashMap::new(),
            last: Mutex::new(None),
        })
    }

    fn owning(&self) -> bool {
        self.app.hub.relay_to().is_none()
    }

    fn connect(self: &Arc<Self>, from: u32, sid: SessionId, user: &str, name: Option<String>) {
        let Ok(user) = UserId::parse(user) else {
            tracing::warn!(from, "cluster: a connect with a bad user ID dropped");
            return;
        };
        if self.sessions.contains_key(&sid) {
            // Registering again after a resync: the replay only.
            let hub = &self.app.hub;
            hub.connect_remote_again(sid, user, name);
            return;
        }
        let (tx, rx) = mpsc::channel(INBOUND);
        self.sessions.insert(sid, tx);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.run(from, sid, user, name, rx).await;
            me.sessions.remove(&sid);
        });
    }

    /// One remote session, on the owner.
    async fn run(
        &self,
        node: u32,
        sid: SessionId,
        user: UserId,
        name: Option<String>,
        mut inbound: mpsc::Receiver<Inbound>,
    ) {
        let app = &self.app;
        let hub = Arc::clone(&app.hub);
        let (tx, mut rx) = mpsc::channel(hub.config().sessions.outbound_queue);
        let overflow = Arc::new(Notify::new());
        hub.connect_remote(sid, user, name, tx, Arc::clone(&overflow));
        let _registered = Registered {
            hub: Arc::clone(&hub),
            sid,
        };
        loop {
            tokio::select! {
                biased;
                _ = overflow.notified() => {
                    let out = Out::Close(session::close::SLOW_READER, "too slow reading events".into());
                    hub.send_to_node(node, Msg::Deliver { sid: sid.0, out });
                    break;
                }
                out = rx.recv() => {
                    let Some(out) = out else { break };
                    let closing = matches!(out, Outbound::Close(..));
                    hub.send_to_node(node, Msg::Deliver { sid: sid.0, out: Out::from(out) });
                    if closing {
                        break;
                    }
                }
                req = inbound.recv() => match req {
                    None => break,
                    Some(Inbound::Text(text, started)) => session::run_text(app, sid, &text, started).await,
                    Some(Inbound::Refuse(id, started)) => session::refuse(app, sid, id, started),
                },
            }
        }
    }

    /// On a room's node: queues a media op the owner vouched for.
    fn media_op(self: &Arc<Self>, sid: SessionId, user: UserId, text: String) {
        let mut item = (user, text);
        for _ in 0..2 {
            let tx = self
                .media
                .entry(sid)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(INBOUND);
                    let me = Arc::clone(self);
                    tokio::spawn(async move { me.run_media(sid, rx).await });
                    tx
                })
                .clone();
            match tx.try_send(item) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    // The queue's task just ended (idle): start another.
                    self.media.remove_if(&sid, |_, t| t.is_closed());
                    item = back;
                }
                Err(mpsc::error::TrySendError::Full((_, text))) => {
                    let e = ApiError::new(ErrorCode::RateLimited, "too many media ops in flight");
                    let reply = reply_frame(reply_id(&text), &Err(e));
                    self.app.hub.send_to(sid, Outbound::Reply(reply));
                    return;
                }
            }
        }
    }

    /// One session's media ops on a room's node; ends after a minute without any.
    async fn run_media(&self, sid: SessionId, mut rx: mpsc::Receiver<(UserId, String)>) {
        let idle = std::time::Duration::from_secs(60);
        while let Ok(Some((user, text))) = tokio::time::timeout(idle, rx.recv()).await {
            let started = Instant::now();
            let (id, reply) = match crate::signaling::wire::parse_request(&text) {
                Ok(req) => {
                    let name = req.op.name();
                    let r = self.app.media.handle_vouched(sid, user, req.op).await;
                    metrics::histogram!(crate::metrics::OP_LATENCY, "op" => name)
                        .record(started.elapsed().as_secs_f64());
                    (Some(req.id), r)
                }
                Err(fe) => (fe.id, Err(fe.error)),
            };
            self.app
                .hub
                .send_to(sid, Outbound::Reply(reply_frame(id, &reply)));
        }
        rx.close();
        self.media.remove_if(&sid, |_, t| t.is_closed());
    }

    fn frame(&self, from: u32, sid: SessionId, frame: Inbound) {
        let refused = match self.sessions.get(&sid) {
            Some(tx) => tx.try_send(frame).err().map(|e| match e {
                mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f,
            }),
            None => Some(frame),
        };
        // Not registered here (the owner just changed, and the session's node has not resynced
        // yet), or too many frames in flight: answered at once, in the session's reply order.
        if let Some(f) = refused {
            let id = match &f {
                Inbound::Text(text, _) => reply_id(text),
                Inbound::Refuse(id, _) => *id,
            };
            let e = ApiError::new(
                ErrorCode::Unavailable,
                "the node that owns the calls does not know this session yet; nothing was changed, try again in a moment",
            );
            let out = Out::Reply(reply_frame(id, &Err(e)));
            self.app
                .hub
                .send_to_node(from, Msg::Deliver { sid: sid.0, out });
        }
    }
}

/// The request `id` of a frame, if it has a readable one.
fn reply_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<u64>,
    }
    serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id)
}

/// The close reasons the owner sends, as the static text the session writer takes.
fn close_reason(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "too slow reading events",
        "storage unavailable",
        "replaced by another session",
        "server shutting down",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("closed by the server")
}

impl Inbox for Remote {
    fn receive(self: Arc<Self>, from: u32, msg: Msg) {
        // A node speaks only for its own sessions.
        let mine = |sid: u64| node_of(SessionId(sid)) == from;
        match msg {
            Msg::Connect { sid, user, name } if mine(sid) && self.owning() => {
                self.connect(from, SessionId(sid), &user, name);
            }
            Msg::Live { sids } => {
                let live: std::collections::HashSet<u64> = sids.into_iter().collect();
                self.sessions
                    .retain(|sid, _| node_of(*sid) != from || live.contains(&sid.0));
            }
            Msg::Disconnect { sid } if mine(sid) => {
                self.sessions.remove(&SessionId(sid));
            }
            Msg::Request { sid, text } if mine(sid) => {
                self.frame(from, SessionId(sid), Inbound::Text(text, Instant::now()));
            }
            Msg::Refuse { sid, id } if mine(sid) => {
                self.frame(from, SessionId(sid), Inbound::Refuse(id, Instant::now()));
            }
            Msg::Media { sid, user, text } => match UserId::parse(&user) {
                Ok(user) => self.media_op(SessionId(sid), user, text),
                Err(_) => tracing::warn!(from, "cluster: a media op with a bad user ID dropped"),
            },
            Msg::RoomChanged {
                call,
                participants,
                at,
            } if self.owning() => {
                if let Ok(call) = CallId::parse(&call) {
                    self.app.hub.room_changed(&call, participants, at);
                }
            }
            Msg::HungUp {
                call,
                user,
                hung_up,
            } if self.owning() => {
                if let (Ok(call), Ok(user)) = (CallId::parse(&call), UserId::parse(&user)) {
                    self.app.hub.hung_up(&call, &user, hung_up);
                }
            }
            Msg::LeaveRoom { call, user } => {
                if let (Ok(call), Ok(user)) = (CallId::parse(&call), UserId::parse(&user)) {
                    self.app.media.leave_here(call, user);
                }
            }
            Msg::CloseRoom { call } => {
                if let Ok(call) = CallId::parse(&call) {
                    self.app.media.close_here(call);
                }
            }
            Msg::Deliver { sid, out } => {
                let sid = SessionId(sid);
                let hub = &self.app.hub;
                if hub.cluster().is_none_or(|c| node_of(sid) != c.index()) {
                    return;
                }
                let out = match out {
                    Out::Event(body) => Outbound::Frame(body),
                    Out::Reply(text) => Outbound::Reply(text),
                    Out::Close(code, reason) => Outbound::Close(code, close_reason(&reason)),
                };
                hub.send_to(sid, out);
            }
            other => {
                tracing::debug!(from, msg = ?std::mem::discriminant(&other), "cluster: message not for this node dropped");
            }
        }
    }

    fn resync(&self) {
        self.app.hub.resync_sessions();
    }

    fn node_gone(&self, index: u32) {
        // Its sessions' tasks end, and disconnect them from the core.
        self.sessions.retain(|sid, _| node_of(*sid) != index);
        // Rooms on it are gone: their participants join again, and the join places the room anew.
        if self.owning() {
            for call in self.app.media.rooms_lost(index) {
                tracing::warn!(call_id = %call, node = index, "room lost with its node; participants told to join again");
                let data: Arc<str> = Arc::from(
                    serde_json::json!({"call_id": call, "reason": "media_node_lost"}).to_string(),
                );
                for sid in self.app.hub.room_sessions(&call) {
                    self.app
                        .hub
                        .send_to(sid, Outbound::Raw("rtc_restart", Arc::clone(&data)));
                }
            }
        }
    }

    fn load(&self) -> Load {
        let app = &self.app;
        let index = app.hub.cluster().map_or(0, |c| c.index());
        let forwarded = app.media.sfu().counters().packets_forwarded;
        let cpu = crate::metrics::process_usage().map_or(0.0, |(cpu, _)| cpu);
        let now = Instant::now();
        let (packets_per_s, cpu_cores) = match self.last.lock() {
            Ok(mut last) => {
                let rates = match *last {
                    Some((t, p, c)) => {
                        let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                        (
                            forwarded.saturating_sub(p) as f64 / dt,
                            (cpu - c).max(0.0) / dt,
                        )
                    }
                    None => (0.0, 0.0),
                };
                *last = Some((now, forwarded, cpu));
                rates
            }
            Err(_) => (0.0, 0.0),
        };
        Load {
            sessions: app.hub.sessions_on(index).len() as u64,
            rooms: app.media.room_count() as u64,
            participants: app.media.participant_count() as u64,
            packets_per_s,
            cpu: cpu_cores,
        }
    }

    fn rooms(&self) -> Vec<String> {
        self.app.media.room_ids()
    }

    fn take_over(&self, epoch: i64) -> BoxFuture<'static, bool> {
        let hub = Arc::clone(&self.app.hub);
        async move {
            match hub.store().call(move |s| s.take_over(epoch)).await {
                Ok(Ok(calls)) => {
                    let n = calls.len();
                    let mut core = Signaling::new(Rules::from_config(&hub.config().signaling));
                    core.restore(calls, now_ms());
                    hub.replace_core(core);
                    tracing::info!(calls = n, epoch, "cluster: this node owns the calls");
                    true
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cluster: takeover failed");
                    false
                }
                Err(_) => false,
            }
        }
        .boxed()
    }
}
