//! The hub: the thin async shell around the signaling core.
//!
//! It owns the core behind one mutex (one order for every call), the registry of live sessions, the
//! timer that fires the core's deadlines, and the hand-off to storage. Every input to the core follows
//! the same path:
//!
//! 1. lock the core, apply the input with `now`, and, still under the lock, queue one storage job with
//!    the records to write and a continuation;
//! 2. the storage thread commits the batch, then runs the continuation, which pushes the events to the
//!    sessions' outbound queues and then the reply.
//!
//! Queuing under the lock makes the storage order the core's order, so every session sees events in the
//! order the core produced them, each reply after the events its request caused, and nothing is sent
//! before it is durable.
//!
//! When storage gives up on a job (see `storage::writer`), its continuation sends no event and no
//! effect; the op is answered `unavailable`, and the storage thread has the hub put the calls back
//! in the core as last committed ([`Restorer`]). A session whose connect could not be stored is
//! closed (1011) so that it reconnects and replays. Timers wait while storage is down: a timeout
//! that cannot be stored would otherwise fire again at once, for ever.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::auth::Identity;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::ids::{CallId, SessionId, UserId};
use crate::metrics as m;
use crate::signaling::wire::{
    ApiError, CallState, EndReason, ErrorCode, Event, QueryCallListArgs, QueryUsersArgs, Reply,
    reply_frame,
};
use crate::signaling::{Applied, Effect, Notice, Op, Output, Request, Signaling};
use crate::storage::{Job, Restorer, StoreThread, Unavailable};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a session's writer sends next.
#[derive(Debug)]
pub enum Outbound {
    /// A signaling event; the writer numbers it.
    Event(Arc<Event>),
    /// An event serialized elsewhere (media): its name and its `data` as JSON text.
    Raw(&'static str, Arc<str>),
    /// A reply frame, complete.
    Reply(String),
    /// An event serialized on another node, `{"event":…,"data":…}`; the writer numbers it.
    Frame(String),
    /// Close the socket with this code and reason.
    Close(u16, &'static str),
}

impl From<Outbound> for crate::cluster::Out {
    /// What a session is sent, for the wire between nodes.
    fn from(out: Outbound) -> Self {
        use crate::cluster::Out;
        match out {
            Outbound::Event(ev) => Out::Event(serde_json::to_string(&*ev).unwrap_or_default()),
            Outbound::Raw(name, data) => {
                Out::Event(format!("{{\"event\":\"{name}\",\"data\":{data}}}"))
            }
            Outbound::Frame(body) => Out::Event(body),
            Outbound::Reply(text) => Out::Reply(text),
            Outbound::Close(code, reason) => Out::Close(code, reason.to_owned()),
        }
    }
}

struct SessionEntry {
    user: UserId,
    /// The display name from the session's token.
    name: Option<String>,
    /// The session's outbound queue, bounded by `[sessions] outbound_queue`.
    tx: mpsc::Sender<Outbound>,
    /// Told when the queue overflows: the session closes (its client reads too slowly).
    overflow: Arc<Notify>,
    /// Request IDs this node relayed to another node and has no reply for yet, oldest first (a
    /// client may reuse an ID: the replies come back in order). At most [`MAX_RELAYED`].
    relayed: VecDeque<u64>,
    /// Relayed requests answered here because their node went away
    /// ([`Hub::answer_relayed_in_flight`]): a late reply to one is dropped. At most [`MAX_RELAYED`].
    abandoned: VecDeque<u64>,
}

/// Most requests of one session waiting for another node's reply; beyond it a request is
/// answered `unavailable` here, unrun.
pub const MAX_RELAYED: usize = 256;

impl SessionEntry {
    /// Whether a reply (a frame with the request's `id`) is to be sent: `false` for a late reply
    /// to a relayed request the client already had answered. Settles the request either way.
    fn settle_reply(&mut self, reply: &str) -> bool {
        #[derive(serde::Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        let Some(id) = serde_json::from_str::<IdOnly>(reply)
            .ok()
            .and_then(|r| r.id)
        else {
            return true;
        };
        if let Some(i) = self.relayed.iter().position(|r| *r == id) {
            self.relayed.remove(i);
            return true;
        }
        match self.abandoned.iter().position(|r| *r == id) {
            Some(i) => {
                self.abandoned.remove(i);
                false
            }
            None => true,
        }
    }

    /// Queues a frame; a full queue closes the session instead of growing.
    fn send(&self, out: Outbound) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(out) {
            self.overflow.notify_one();
        }
    }
}

/// Hooks the hub calls when the core asks for media-room changes. The media plane implements it; with
/// none installed, rooms don't exist and rtc ops fail `internal`.
pub trait RoomControl: Send + Sync + 'static {
    /// Take the user out of the call's room.
    fn leave(&self, call_id: CallId, user_id: UserId);
    /// Close the call's room.
    fn close(&self, call_id: CallId);
}

/// Receives the core's notices (metrics are recorded by the hub itself).
pub trait NoticeSink: Send + Sync + 'static {
    /// Called in core order, after the records the notice describes are committed.
    fn notice(&self, now: u64, notice: &Notice);
}

/// The signaling shell.
pub struct Hub {
    core: Mutex<Signaling>,
    sessions: DashMap<SessionId, SessionEntry>,
    store: StoreThread,
    next_session: AtomicU64,
    timer_wake: Notify,
    /// The deadline the timer task sleeps towards (ms), or u64::MAX.
    armed: AtomicU64,
    config: Arc<Config>,
    rooms: std::sync::RwLock<Option<Arc<dyn RoomControl>>>,
    notices: std::sync::RwLock<Vec<Arc<dyn NoticeSink>>>,
    draining: std::sync::atomic::AtomicBool,
    /// The other nodes, when this node is one of several.
    cluster: std::sync::OnceLock<Arc<Cluster>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Hub {
    /// A hub over a core (already restored) and a storage thread. The hub installs itself as the
    /// storage thread's [`Restorer`].
    pub fn new(core: Signaling, store: StoreThread, config: Arc<Config>) -> Arc<Self> {
        let hub = Arc::new(Self {
            core: Mutex::new(core),
            sessions: DashMap::new(),
            store,
            next_session: AtomicU64::new(1),
            timer_wake: Notify::new(),
            armed: AtomicU64::new(u64::MAX),
            config,
            rooms: std::sync::RwLock::new(None),
            notices: std::sync::RwLock::new(Vec::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            cluster: std::sync::OnceLock::new(),
        });
        hub.store
            .set_restorer(Box::new(CoreRestorer(Arc::downgrade(&hub))));
        hub
    }

    /// Joins this hub to a cluster: its sessions are numbered under the node's index, and until
    /// the node owns the calls their frames go to the owner. Call before any session connects.
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        self.next_session.store(
            crate::cluster::first_session(cluster.index()),
            Ordering::Relaxed,
        );
        let _ = self.cluster.set(cluster);
    }

    /// The cluster, when this node is one of several.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Where this node's sessions' frames go: `None` when this hub applies them (a single node, or
    /// the owner); `Some(None)` while no owner is known.
    pub fn relay_to(&self) -> Option<Option<u32>> {
        self.cluster.get().and_then(|c| c.relay_to())
    }

    /// Sends a message to another node.
    pub fn send_to_node(&self, node: u32, msg: crate::cluster::Msg) {
        if let Some(c) = self.cluster.get() {
            c.send(node, msg);
        }
    }

    /// Puts `core` in place of the (empty) core of a node that did not own the calls, and arms its
    /// timers: the takeover of a cluster's calls.
    pub fn replace_core(&self, core: Signaling) {
        // What this node relayed to the former owner will not be answered by it.
        self.answer_relayed_in_flight();
        let mut guard = self.core();
        *guard = core;
        if self.draining() && self.cluster.get().is_none() {
            guard.set_draining(true);
        }
        self.armed.store(u64::MAX, Ordering::Release);
        self.rearm(&guard);
        drop(guard);
        self.init_gauges();
    }

    /// Notes that request `id` of session `sid` went to another node for its reply. `false`: the
    /// session has [`MAX_RELAYED`] waiting already (or is gone), and the request must not go.
    pub fn track_relayed(&self, sid: SessionId, id: u64) -> bool {
        let Some(mut e) = self.sessions.get_mut(&sid) else {
            return false;
        };
        if e.relayed.len() >= MAX_RELAYED {
            return false;
        }
        e.relayed.push_back(id);
        true
    }

    /// Answers every request relayed to another node that has not replied, `unavailable` with an
    /// outcome the client must check: called when the owner of the calls changed or messages
    /// between nodes were lost, when such a reply may never come. The request may have been
    /// applied before its node stopped, so nothing is claimed either way; a late reply is dropped.
    pub fn answer_relayed_in_flight(&self) {
        let mut answered = 0u64;
        for mut e in self.sessions.iter_mut() {
            let e = e.value_mut();
            while let Some(id) = e.relayed.pop_front() {
                let err = ApiError::new(
                    ErrorCode::Unavailable,
                    "the node that owns the calls changed before this request was answered: it may or may not have been applied; check the call (query_call_list) before trying again",
                );
                // Straight to the session: send_to would take it for the late reply.
                e.send(Outbound::Reply(reply_frame(Some(id), &Err(err))));
                if e.abandoned.len() >= MAX_RELAYED {
                    e.abandoned.pop_front();
                }
                e.abandoned.push_back(id);
                answered += 1;
            }
        }
        if answered > 0 {
            metrics::counter!(m::CLUSTER_UNANSWERED).increment(answered);
            metrics::counter!(m::ERRORS, "code" => ErrorCode::Unavailable.as_str())
                .increment(answered);
        }
    }

    /// Registers this node's sessions again where frames now go: with the core here (this node just
    /// took the calls over) or with the owner (it changed, or messages may have been lost). Each gets
    /// the replay a reconnect gets.
    pub fn resync_sessions(self: &Arc<Self>) {
        self.answer_relayed_in_flight();
        let local: Vec<(SessionId, UserId, Option<String>)> = self
            .sessions
            .iter()
            .filter(|e| self.is_local(*e.key()))
            .map(|e| (*e.key(), e.user.clone(), e.name.clone()))
            .collect();
        match self.relay_to() {
            None => {
                for (sid, user, name) in local {
                    if self.core().session_user(sid).is_none() {
                        self.register_in_core(now_ms(), sid, user, name);
                    }
                }
            }
            Some(Some(owner)) => {
                self.send_to_node(
                    owner,
                    crate::cluster::Msg::Live {
                        sids: local.iter().map(|(sid, _, _)| sid.0).collect(),
                    },
                );
                for (sid, user, name) in local {
                    self.send_to_node(
                        owner,
                        crate::cluster::Msg::Connect {
                            sid: sid.0,
                            user: user.as_str().to_owned(),
                            name,
                        },
                    );
                }
            }
            Some(None) => {}
        }
    }

    /// Registers a session with the core (its replay follows, as its first events); a session
    /// whose registration cannot be stored is closed.
    fn register_in_core(
        self: &Arc<Self>,
        now: u64,
        sid: SessionId,
        user: UserId,
        name: Option<String>,
    ) {
        let mut core = self.core();
        let was_online = core.is_online(&user);
        let out = core.connect(now, sid, user, name);
        if !was_online {
            metrics::gauge!(m::USERS_ONLINE).increment(1.0);
        }
        self.commit(&mut core, now, out, Answer::CloseOnFailure(sid));
    }

    /// Whether the session's WebSocket is on this node.
    fn is_local(&self, sid: SessionId) -> bool {
        self.cluster
            .get()
            .is_none_or(|c| crate::cluster::node_of(sid) == c.index())
    }

    /// Registers a session whose WebSocket is on another node (this node owns the calls): like
    /// [`connect`](Self::connect), but with the session ID that node gave it, and without the
    /// `session` event (that node sent it). `tx` carries what the session is sent back there.
    pub fn connect_remote(
        self: &Arc<Self>,
        sid: SessionId,
        user: UserId,
        name: Option<String>,
        tx: mpsc::Sender<Outbound>,
        overflow: Arc<Notify>,
    ) {
        self.sessions.insert(
            sid,
            SessionEntry {
                user: user.clone(),
                name: name.clone(),
                tx,
                overflow,
                relayed: VecDeque::new(),
                abandoned: VecDeque::new(),
            },
        );
        let now = now_ms();
        self.register_in_core(now, sid, user.clone(), name.clone());
        let _ = self.store.submit(Job::Run(Box::new(move |s| {
            if let Err(e) = s.remember_user(&user, name.as_deref(), now) {
                tracing::warn!(error = %e, "remembering user failed");
            }
        })));
    }

    /// A remote session registers again (its node resynced): it gets the replay a reconnect gets.
    pub fn connect_remote_again(
        self: &Arc<Self>,
        sid: SessionId,
        user: UserId,
        name: Option<String>,
    ) {
        let now = now_ms();
        let mut core = self.core();
        let out = core.connect(now, sid, user, name);
        self.commit(&mut core, now, out, Answer::CloseOnFailure(sid));
    }

    /// Sessions registered here whose WebSocket is on node `index`.
    pub fn sessions_on(&self, index: u32) -> Vec<SessionId> {
        self.sessions
            .iter()
            .map(|e| *e.key())
            .filter(|sid| crate::cluster::node_of(*sid) == index)
            .collect()
    }

    /// Installs (or, with `None`, removes) the media plane's room hooks.
    pub fn set_room_control(&self, rooms: Option<Arc<dyn RoomControl>>) {
        if let Ok(mut r) = self.rooms.write() {
            *r = rooms;
        }
    }

    /// Adds a receiver of notices (billing).
    pub fn add_notice_sink(&self, sink: Arc<dyn NoticeSink>) {
        if let Ok(mut n) = self.notices.write() {
            n.push(sink);
        }
    }

    /// Removes every notice receiver (shutdown).
    pub fn clear_notice_sinks(&self) {
        if let Ok(mut n) = self.notices.write() {
            n.clear();
        }
    }

    /// Starts a drain: no new calls, joins or answers.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.core().set_draining(true);
    }

    /// Starts a drain of this node of a cluster: it refuses new room joins and reports not ready,
    /// but the calls (the cluster's) go on taking changes.
    pub fn start_node_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether a drain is under way.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// How many calls are in progress (someone accepted, or someone is in the room).
    pub fn calls_in_progress(&self) -> usize {
        self.core().calls_in_progress().len()
    }

    /// Ends the calls in progress (the end of a drain); calls that only ring survive the restart.
    pub fn end_in_progress(self: &Arc<Self>, reason: EndReason) {
        let now = now_ms();
        let mut core = self.core();
        let out = core.end_in_progress(now, reason);
        self.commit(&mut core, now, out, Answer::None);
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The storage thread.
    pub fn store(&self) -> &StoreThread {
        &self.store
    }

    /// Locks the core. A panic while it was held would be a bug in the core; the lock is recovered
    /// rather than taking every session down with it.
    pub fn core(&self) -> MutexGuard<'_, Signaling> {
        self.core
            .lock()
            .unwrap_or_else(|_| crate::fault::core_poisoned())
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sends to one session, if it is live: here, or on its own node (a room's node sends its
    /// media events and replies straight there).
    pub fn send_to(&self, session: SessionId, out: Outbound) {
        if let Some(s) = self.sessions.get(&session) {
            let settles = matches!(out, Outbound::Reply(_))
                && !(s.relayed.is_empty() && s.abandoned.is_empty());
            if !settles {
                s.send(out);
                return;
            }
            drop(s);
            if let Some(mut s) = self.sessions.get_mut(&session) {
                if let Outbound::Reply(text) = &out
                    && !s.settle_reply(text)
                {
                    tracing::debug!(%session, "a late reply to a request answered here dropped");
                    return;
                }
                s.send(out);
            }
            return;
        }
        if let Some(c) = self.cluster.get() {
            let node = crate::cluster::node_of(session);
            if node != c.index() {
                c.send(
                    node,
                    crate::cluster::Msg::Deliver {
                        sid: session.0,
                        out: crate::cluster::Out::from(out),
                    },
                );
            }
        }
    }

    /// Sends an event serialized elsewhere to every live session of a user.
    pub fn send_to_user(&self, user: &UserId, name: &'static str, data: Arc<str>) {
        let sessions: Vec<SessionId> = self.core().sessions_of(user).to_vec();
        for s in sessions {
            self.send_to(s, Outbound::Raw(name, Arc::clone(&data)));
        }
    }

    /// Registers a new session: queues the `session` event first, then the core's replay.
    pub fn connect(
        self: &Arc<Self>,
        identity: &Identity,
        tx: mpsc::Sender<Outbound>,
        overflow: Arc<Notify>,
    ) -> SessionId {
        let sid = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let now = now_ms();
        let _ = tx.try_send(Outbound::Event(Arc::new(Event::Session {
            session_id: sid.to_string(),
            user_id: identity.user_id.clone(),
            server_time: now,
            heartbeat: self.config.signaling.heartbeat,
        })));
        self.sessions.insert(
            sid,
            SessionEntry {
                user: identity.user_id.clone(),
                name: identity.name.clone(),
                tx,
                overflow,
                relayed: VecDeque::new(),
                abandoned: VecDeque::new(),
            },
        );
        metrics::gauge!(m::SESSIONS_CONNECTED).increment(1.0);
        let user = identity.user_id.clone();
        let name = identity.name.clone();
        match self.relay_to() {
            None => {}
            // Another node owns the calls: register there (or, with no owner yet, when one is
            // known: see `resync_sessions`).
            Some(owner) => {
                if let Some(owner) = owner {
                    self.send_to_node(
                        owner,
                        crate::cluster::Msg::Connect {
                            sid: sid.0,
                            user: user.as_str().to_owned(),
                            name,
                        },
                    );
                }
                return sid;
            }
        }
        // The replay is this session's start: without it the session would miss invitations.
        self.register_in_core(now, sid, user.clone(), name.clone());
        let _ = self.store.submit(Job::Run(Box::new(move |s| {
            if let Err(e) = s.remember_user(&user, name.as_deref(), now) {
                tracing::warn!(error = %e, "remembering user failed");
            }
        })));
        sid
    }

    /// A session ended.
    pub fn disconnect(self: &Arc<Self>, sid: SessionId) {
        if self.sessions.remove(&sid).is_none() {
            return;
        }
        let local = self.is_local(sid);
        if local {
            metrics::gauge!(m::SESSIONS_CONNECTED).decrement(1.0);
        }
        if local && let Some(relay) = self.relay_to() {
            if let Some(owner) = relay {
                self.send_to_node(owner, crate::cluster::Msg::Disconnect { sid: sid.0 });
            }
            return;
        }
        let now = now_ms();
        let mut core = self.core();
        let user = core.session_user(sid).cloned();
        let out = core.disconnect(now, sid);
        if let Some(u) = user
            && !core.is_online(&u)
        {
            metrics::gauge!(m::USERS_ONLINE).decrement(1.0);
        }
        self.commit(&mut core, now, out, Answer::None);
    }

    /// Handles one request frame's parsed form. Media ops are returned for the caller to run.
    pub fn handle(
        self: &Arc<Self>,
        sid: SessionId,
        req: Request,
        started: Instant,
    ) -> Option<Request> {
        let id = req.id;
        let op_name = req.op.name();
        match req.op {
            Op::Ping => {
                self.reply_in_order(
                    sid,
                    id,
                    op_name,
                    started,
                    Ok(json!({"server_time": now_ms()})),
                );
                None
            }
            Op::QueryCallList(args) => {
                self.query_call_list(sid, id, started, args);
                None
            }
            Op::QueryUsers(args) => {
                self.query_users(sid, id, started, args);
                None
            }
            op => {
                let now = now_ms();
                let mut core = self.core();
                match core.apply(now, sid, op) {
                    Applied::Done(out, reply) => {
                        self.commit(
                            &mut core,
                            now,
                            out,
                            Answer::Reply {
                                sid,
                                id,
                                op: op_name,
                                started,
                                reply,
                            },
                        );
                        None
                    }
                    Applied::NotMine(op) => Some(Request { id, op }),
                }
            }
        }
    }

    /// Queues a reply behind everything already queued for storage, so a session's replies keep the
    /// order of its requests.
    pub fn reply_in_order(
        self: &Arc<Self>,
        sid: SessionId,
        id: u64,
        op: &'static str,
        started: Instant,
        reply: Reply,
    ) {
        let hub = Arc::clone(self);
        let _ = self.store.submit(Job::Run(Box::new(move |_| {
            hub.send_reply(sid, Some(id), op, started, &reply);
        })));
    }

    /// Sends a reply now and records its metrics.
    pub fn send_reply(
        &self,
        sid: SessionId,
        id: Option<u64>,
        op: &'static str,
        started: Instant,
        reply: &Reply,
    ) {
        if let Err(e) = reply {
            metrics::counter!(m::ERRORS, "code" => e.code.as_str()).increment(1);
        }
        metrics::histogram!(m::OP_LATENCY, "op" => op).record(started.elapsed().as_secs_f64());
        self.send_to(sid, Outbound::Reply(reply_frame(id, reply)));
    }

    fn query_call_list(
        self: &Arc<Self>,
        sid: SessionId,
        id: u64,
        started: Instant,
        args: QueryCallListArgs,
    ) {
        let count = args.count.unwrap_or(20);
        if !(1..=100).contains(&count) {
            let e = ApiError::bad_request("count must be 1..100");
            self.reply_in_order(sid, id, "query_call_list", started, Err(e));
            return;
        }
        let Some(user) = self.sessions.get(&sid).map(|s| s.user.clone()) else {
            return;
        };
        let hub = Arc::clone(self);
        let _ = self.store.submit(Job::Run(Box::new(move |s| {
            let reply = match s.user_calls(&user, count as usize, args.next_flag.unwrap_or(0)) {
                Ok(page) => Ok(json!({
                    "calls": page.calls.iter().map(|c| c.info()).collect::<Vec<_>>(),
                    "next_flag": page.next_flag,
                })),
                Err(e) => {
                    tracing::error!(error = %e, "query_call_list failed");
                    Err(ApiError::new(ErrorCode::Internal, "history is unavailable"))
                }
            };
            hub.send_reply(sid, Some(id), "query_call_list", started, &reply);
        })));
    }

    fn query_users(
        self: &Arc<Self>,
        sid: SessionId,
        id: u64,
        started: Instant,
        args: QueryUsersArgs,
    ) {
        let parsed: Result<Vec<UserId>, ApiError> = if args.user_ids.len() > 100 {
            Err(ApiError::bad_request("at most 100 user_ids"))
        } else {
            args.user_ids
                .iter()
                .map(|s| {
                    UserId::parse(s)
                        .map_err(|e| ApiError::bad_request(format!("user_id {s:?}: {e}")))
                })
                .collect()
        };
        let users = match parsed {
            Ok(u) => u,
            Err(e) => return self.reply_in_order(sid, id, "query_users", started, Err(e)),
        };
        let live: Vec<(UserId, bool, Option<String>)> = {
            let core = self.core();
            users
                .iter()
                .map(|u| {
                    (
                        u.clone(),
                        core.is_online(u),
                        core.name_of(u).map(str::to_owned),
                    )
                })
                .collect()
        };
        let hub = Arc::clone(self);
        let _ = self.store.submit(Job::Run(Box::new(move |s| {
            let ids: Vec<UserId> = live.iter().map(|(u, _, _)| u.clone()).collect();
            let known = s.user_names(&ids).unwrap_or_default();
            let list: Vec<Value> = live
                .iter()
                .map(|(u, online, name)| {
                    json!({
                        "user_id": u,
                        "user_name": name.clone().or_else(|| known.get(u).cloned()).unwrap_or_default(),
                        "online": online,
                    })
                })
                .collect();
            hub.send_reply(sid, Some(id), "query_users", started, &Ok(json!({ "users": list })));
        })));
    }

    /// Carries out one core output: queues its writes, and after the commit its events, effects and
    /// the answer. If storage gives up on the writes, none of that happens: the answer says so (see
    /// [`Answer`]) and the core is restored by the storage thread. Must be called with the core
    /// locked (the guard proves it) so storage order is core order.
    fn commit(
        self: &Arc<Self>,
        core: &mut MutexGuard<'_, Signaling>,
        now: u64,
        out: Output,
        answer: Answer,
    ) {
        let Output {
            deliveries,
            effects,
        } = out;
        let mut records = Vec::new();
        let mut rest = Vec::new();
        let mut events = Vec::new();
        let webhooks = !self.config.webhooks.urls.is_empty();
        for e in effects {
            match e {
                Effect::Persist(r) => records.push(r),
                Effect::Notice(n) => {
                    // Webhook events are queued in the same transaction as the change they report.
                    if webhooks {
                        events.extend(crate::webhooks::from_notice(now, &n));
                    }
                    rest.push(Effect::Notice(n));
                }
                other => rest.push(other),
            }
        }
        if deliveries.is_empty() && rest.is_empty() && records.is_empty() && answer.is_none() {
            self.rearm(core);
            return;
        }
        let hub = Arc::clone(self);
        let continuation = Box::new(move |stored: Result<(), Unavailable>| {
            if stored.is_ok() {
                for d in deliveries {
                    hub.send_to(d.session, Outbound::Event(d.event));
                }
                for e in rest {
                    hub.carry_out(now, e);
                }
            }
            match (answer, stored) {
                (Answer::None, _) | (Answer::CloseOnFailure(_), Ok(())) => {}
                (
                    Answer::Reply {
                        sid,
                        id,
                        op,
                        started,
                        reply,
                    },
                    stored,
                ) => {
                    let reply = match stored {
                        Ok(()) => reply,
                        Err(_) => Err(unavailable()),
                    };
                    hub.send_reply(sid, Some(id), op, started, &reply);
                }
                (Answer::Waiter(tx), stored) => {
                    let _ = tx.send(stored);
                }
                (Answer::CloseOnFailure(sid), Err(_)) => {
                    metrics::counter!(m::SESSIONS_CLOSED, "reason" => "storage_unavailable")
                        .increment(1);
                    hub.send_to(
                        sid,
                        Outbound::Close(close::STORAGE_UNAVAILABLE, "storage unavailable"),
                    );
                }
            }
        });
        if self
            .store
            .submit(Job::Calls(records, events, Some(continuation)))
            .is_err()
        {
            tracing::error!("storage is closed; an op's results were dropped");
        }
        self.rearm(core);
    }

    fn carry_out(&self, now: u64, effect: Effect) {
        match effect {
            Effect::Persist(_) => {}
            Effect::LeaveRoom { call_id, user_id } => {
                if let Some(r) = self.rooms.read().ok().and_then(|r| r.clone()) {
                    r.leave(call_id, user_id);
                }
            }
            Effect::CloseRoom { call_id } => {
                if let Some(r) = self.rooms.read().ok().and_then(|r| r.clone()) {
                    r.close(call_id);
                }
            }
            Effect::Notice(n) => {
                record_notice(&n);
                if let Ok(sinks) = self.notices.read() {
                    for s in sinks.iter() {
                        s.notice(now, &n);
                    }
                }
            }
        }
    }

    /// Wakes the timer task if the core's next deadline moved earlier than the one it sleeps towards.
    fn rearm(&self, core: &MutexGuard<'_, Signaling>) {
        let next = core.next_deadline().unwrap_or(u64::MAX);
        if next < self.armed.load(Ordering::Acquire) {
            self.armed.store(next, Ordering::Release);
            self.timer_wake.notify_one();
        }
    }

    /// The media plane reports a room's participant count (to the owner of the calls, from a
    /// room on another node).
    pub fn room_changed(self: &Arc<Self>, call_id: &CallId, participants: usize, at_ms: u64) {
        if let Some(Some(owner)) = self.relay_to() {
            self.send_to_node(
                owner,
                crate::cluster::Msg::RoomChanged {
                    call: call_id.as_str().to_owned(),
                    participants,
                    at: at_ms,
                },
            );
            return;
        }
        let mut core = self.core();
        let out = core.room_changed(at_ms, call_id, participants);
        self.commit(&mut core, at_ms, out, Answer::None);
    }

    /// A user hung up (`rtc_leave`) or joined a call's room again.
    pub fn hung_up(&self, call_id: &CallId, user: &UserId, hung_up: bool) {
        if let Some(Some(owner)) = self.relay_to() {
            self.send_to_node(
                owner,
                crate::cluster::Msg::HungUp {
                    call: call_id.as_str().to_owned(),
                    user: user.as_str().to_owned(),
                    hung_up,
                },
            );
            return;
        }
        self.core().hung_up(call_id, user, hung_up);
    }

    /// Ends a call on the server's authority (admin), once the end is stored.
    pub async fn end_call(
        self: &Arc<Self>,
        call_id: &CallId,
        reason: EndReason,
    ) -> Result<(), ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let now = now_ms();
            let mut core = self.core();
            let out = core.end_by_server(now, call_id, reason)?;
            self.commit(&mut core, now, out, Answer::Waiter(tx));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(ApiError::new(ErrorCode::Internal, "storage is shut down")),
        }
    }

    /// Ends every started call.
    pub fn end_all(self: &Arc<Self>, reason: EndReason) {
        let now = now_ms();
        let mut core = self.core();
        let out = core.end_all(now, reason);
        self.commit(&mut core, now, out, Answer::None);
    }

    /// Number of started calls.
    pub fn active_calls(&self) -> usize {
        self.core().started_calls().count()
    }

    /// Waits until every job queued so far is committed and its continuation has run.
    pub async fn flush(&self) {
        let _ = self.store.call(|_| ()).await;
    }

    /// Closes every session with `code` (shutdown).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for s in self.sessions.iter() {
            s.send(Outbound::Close(code, reason));
        }
    }

    /// Fires the core's timers; runs until `shutdown` resolves. While storage is down it waits: a
    /// timer's change that cannot be stored is undone and would fire again at once.
    pub async fn run_timers(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut health = self.store.health();
        loop {
            if !*health.borrow_and_update() {
                tokio::select! {
                    _ = health.changed() => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let next = {
                let mut core = self.core();
                let now = now_ms();
                let out = core.tick(now);
                self.commit(&mut core, now, out, Answer::None);
                let next = core.next_deadline().unwrap_or(u64::MAX);
                self.armed.store(next, Ordering::Release);
                next
            };
            let wait = if next == u64::MAX {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(next.saturating_sub(now_ms()))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.timer_wake.notified() => {}
                _ = health.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Whether the session may join the call's room.
    pub fn may_join_room(&self, sid: SessionId, call_id: &CallId) -> Result<UserId, ApiError> {
        let user = self
            .sessions
            .get(&sid)
            .map(|s| s.user.clone())
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "session not registered"))?;
        self.core().may_join_room(&user, call_id)?;
        Ok(user)
    }

    /// Every session of the users `accepted` in a call (those who may be in its room).
    pub fn room_sessions(&self, call_id: &CallId) -> Vec<SessionId> {
        let core = self.core();
        let Some(call) = core.call(call_id) else {
            return Vec::new();
        };
        call.users
            .iter()
            .filter(|u| u.state == crate::signaling::wire::UserState::Accepted)
            .flat_map(|u| core.sessions_of(&u.user_id).to_vec())
            .collect()
    }

    /// The user of a live session.
    pub fn session_user(&self, sid: SessionId) -> Option<UserId> {
        self.sessions.get(&sid).map(|s| s.user.clone())
    }

    /// Counts started calls on the gauge after a restore.
    pub fn init_gauges(&self) {
        let n = self
            .core()
            .started_calls()
            .filter(|c| c.state == CallState::Started)
            .count();
        metrics::gauge!(m::CALLS_ACTIVE).set(n as f64);
    }
}

/// Who learns the outcome of a commit, and how.
enum Answer {
    /// Nobody (timers, room occupancy, disconnects, server-side ends).
    None,
    /// A session's request: its reply, or `unavailable` if the change was not stored.
    Reply {
        sid: SessionId,
        id: u64,
        op: &'static str,
        started: Instant,
        reply: Reply,
    },
    /// An HTTP handler waiting for the outcome.
    Waiter(tokio::sync::oneshot::Sender<Result<(), Unavailable>>),
    /// A session's connect: if its replay could not be stored, the session is closed so that the
    /// client reconnects (and replays) later.
    CloseOnFailure(SessionId),
}

impl Answer {
    fn is_none(&self) -> bool {
        matches!(self, Answer::None)
    }
}

/// The reply to an op whose change could not be stored.
fn unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        "the server cannot store changes right now; nothing was changed, try again later",
    )
}

/// Close codes the hub uses (the session's own are in `session::close`).
mod close {
    /// The session's connect could not be stored (the replay of its invitations may be
    /// incomplete): reconnect later.
    pub const STORAGE_UNAVAILABLE: u16 = 1011;
}

/// Puts calls back in the core for the storage thread, and queues the marker that later jobs
/// build on the restored state, under the core's lock.
struct CoreRestorer(std::sync::Weak<Hub>);

impl Restorer for CoreRestorer {
    fn restore(&self, calls: Vec<(CallId, Option<crate::signaling::CallRecord>)>) {
        let Some(hub) = self.0.upgrade() else {
            return;
        };
        let now = now_ms();
        let mut core = hub.core();
        let ids: Vec<CallId> = calls.iter().map(|(id, _)| id.clone()).collect();
        for (id, committed) in calls {
            core.rollback(now, &id, committed);
        }
        let _ = hub.store.submit(Job::Restored(ids));
        hub.rearm(&core);
    }
}

/// Metrics and one log line per call lifecycle event (IDs only: never tokens or extended data).
fn record_notice(n: &Notice) {
    match n {
        Notice::CallStarted {
            call_id,
            caller,
            mode,
        } => {
            metrics::counter!(m::CALLS_STARTED).increment(1);
            metrics::gauge!(m::CALLS_ACTIVE).increment(1.0);
            tracing::info!(call_id = %call_id, caller = %caller, mode = mode.as_str(), "call started");
        }
        Notice::CallEnded {
            call_id,
            reason,
            users,
        } => {
            metrics::counter!(m::CALLS_ENDED, "reason" => reason.as_str()).increment(1);
            metrics::gauge!(m::CALLS_ACTIVE).decrement(1.0);
            let users: Vec<&str> = users.iter().map(UserId::as_str).collect();
            tracing::info!(call_id = %call_id, reason = reason.as_str(), users = ?users, "call ended");
        }
        Notice::InviteeOutcome {
            call_id,
            user_id,
            state,
        } => {
            metrics::counter!(m::INVITEE_OUTCOMES, "state" => state.as_str()).increment(1);
            tracing::info!(call_id = %call_id, user_id = %user_id, state = state.as_str(), "invitee answered");
        }
        Notice::InvitationRefused { inviter, reason } => {
            metrics::counter!(m::INVITATIONS_REFUSED, "reason" => *reason).increment(1);
            tracing::debug!(inviter = %inviter, reason, "invitation refused by a quota");
        }
        Notice::InviteeOffline {
            call_id,
            user_id,
            inviter,
            ..
        } => {
            tracing::info!(call_id = %call_id, user_id = %user_id, inviter = %inviter, "invitee offline");
        }
    }
}
