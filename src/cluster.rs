//! Several nodes as one service: the node registry, ownership of the calls, and messages between
//! nodes. Built on existing engines only: Redis (registry, routing, messages) and the shared
//! PostgreSQL store (who owns the calls).
//!
//! - **Registry.** Each node writes `sb:node:<node_id>` (its [`NodeInfo`]: address, load, drain)
//!   with a time to live of `[cluster] node_ttl` and renews it five times in that span, so a dead
//!   node disappears within `node_ttl`. `sb:nodes` (a sorted set by last heartbeat) lists them.
//! - **Ownership.** One node at a time owns every call: it applies their ops and timers in one
//!   order, as a single node does, so busy state, multi-device rules and accept/cancel races hold
//!   across nodes exactly as on one. It holds a PostgreSQL advisory lock on a connection of its own
//!   ([`OwnerLock`]); when it dies the database frees the lock and another node, polling every
//!   half second, takes the calls over from the store and resumes their timers, as a restart does.
//!   Each takeover raises an epoch that fences the store against a former owner's writes. The
//!   owner advertises itself in `sb:owner`.
//! - **Messages.** Each node subscribes to `sb:n:<index>`; any node sends to any other by
//!   publishing there. A sessions' frames go from the node holding its WebSocket to the owner, and
//!   the owner's events and replies come back. Messages to one node keep their order (one sender
//!   task per destination, batches numbered); a publish that no subscriber took (the peer is
//!   reconnecting to Redis) is retried for up to `node_ttl`. A receiver that sees a gap in the
//!   numbers, or that had to subscribe again, asks for a resync ([`Inbox::resync`]): its sessions
//!   register with the owner again and get the replay a reconnect gets.
//!
//! A node's index (from a PostgreSQL sequence, never reused) is the top bits of the session IDs it
//! hands out ([`node_of`]), so an event for a session is routed without a lookup.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::ids::SessionId;
use crate::storage::{OwnerLock, StoreError};

/// Session IDs carry their node's index above this many bits.
pub const SESSION_BITS: u32 = 40;

/// The node whose session this is (0 on a single node).
pub fn node_of(sid: SessionId) -> u32 {
    (sid.0 >> SESSION_BITS) as u32
}

/// The first session ID a node with this index hands out.
pub fn first_session(index: u32) -> u64 {
    (u64::from(index) << SESSION_BITS) | 1
}

/// Most messages waiting for one destination; beyond it new ones are dropped (and counted), and
/// the receiver will see the gap and resync.
const OUTBOX: usize = 65_536;
/// Most messages in one published batch.
const BATCH: usize = 256;
/// How often a node not owning the calls tries to take them.
const OWNER_POLL: Duration = Duration::from_millis(500);

/// Why the cluster link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis refused or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The PostgreSQL store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another live node already uses this node's name.
    #[error("node_id {0:?} is in use by a live node: give each node its own [server] node_id")]
    DuplicateNode(String),
}

/// The owner of the calls, as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Its name.
    pub node_id: String,
    /// Its index (where to send).
    pub index: u32,
    /// The ownership epoch it holds.
    pub epoch: i64,
}

/// What a node publishes about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (`[server] node_id`).
    pub node_id: String,
    /// Its index.
    pub index: u32,
    /// Its HTTP address for clients and nodes.
    pub advertise: String,
    /// Its media UDP address.
    pub media: String,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// Whether it takes no new rooms (a drain).
    pub draining: bool,
    /// Whether rooms may be placed on it at all (`[cluster] takes_rooms`).
    #[serde(default = "yes")]
    pub takes_rooms: bool,
    /// Whether it owns the calls.
    pub owner: bool,
    /// Its load at the last heartbeat.
    pub load: Load,
}

fn yes() -> bool {
    true
}

/// A node's load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// WebSocket sessions connected to it.
    pub sessions: u64,
    /// Media rooms on it.
    pub rooms: u64,
    /// Participants in those rooms.
    pub participants: u64,
    /// RTP packets forwarded per second (since the last heartbeat).
    pub packets_per_s: f64,
    /// CPU used by the process since the last heartbeat, in cores.
    pub cpu: f64,
}

/// What a node sends another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Msg {
    /// To the owner: a session opened (or registers again after a resync).
    Connect {
        /// The session.
        sid: u64,
        /// Its user.
        user: String,
        /// The user's display name from the token.
        name: Option<String>,
    },
    /// To the owner: a session closed.
    Disconnect {
        /// The session.
        sid: u64,
    },
    /// To the owner: a text frame from a session, as the client sent it.
    Request {
        /// The session.
        sid: u64,
        /// The frame.
        text: String,
    },
    /// To the owner: a frame over the session's rate, to be answered `rate_limited` in its place.
    Refuse {
        /// The session.
        sid: u64,
        /// The frame's request ID, if it had one.
        id: Option<u64>,
    },
    /// To a session's node: something to write to it.
    Deliver {
        /// The session.
        sid: u64,
        /// What.
        out: Out,
    },
    /// To a room's node, from the owner: run this `rtc_*` frame of a session as `user` (the owner
    /// checked they may; the room's node answers the session itself).
    Media {
        /// The session.
        sid: u64,
        /// Its user.
        user: String,
        /// The frame.
        text: String,
    },
    /// To the owner, from a room's node: the room's participant count changed.
    RoomChanged {
        /// The room (call ID).
        call: String,
        /// Participants now.
        participants: usize,
        /// When (ms).
        at: u64,
    },
    /// To the owner, from a room's node: a user hung up (`rtc_leave`) or joined again.
    HungUp {
        /// The call.
        call: String,
        /// The user.
        user: String,
        /// Hung up (`true`) or joined (`false`).
        hung_up: bool,
    },
    /// To a room's node, from the owner: take the user out of the room.
    LeaveRoom {
        /// The room.
        call: String,
        /// The user.
        user: String,
    },
    /// To a room's node, from the owner: close the room.
    CloseRoom {
        /// The room.
        call: String,
    },
    /// To the owner, before a resync's `Connect`s: the sender's live sessions, all of them (any
    /// other the owner holds for that node is gone: its `Disconnect` was lost).
    Live {
        /// The sessions.
        sids: Vec<u64>,
    },
    /// To every node: the calls have a new owner.
    OwnerChanged {
        /// It.
        owner: Owner,
    },
}

/// A frame for a session on another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", content = "v", rename_all = "snake_case")]
pub enum Out {
    /// An event, `{"event":…,"data":…}`: the session's node numbers it.
    Event(String),
    /// A complete reply frame.
    Reply(String),
    /// Close the WebSocket.
    Close(u16, String),
}

/// A batch on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The sender's index.
    from: u32,
    /// Numbers the batches from `from` to this node, from 1.
    seq: u64,
    /// The sender's process instance (a restarted sender numbers from 1 again).
    boot: u64,
    msgs: Vec<Msg>,
}

/// Where the cluster link hands what arrives. Implemented by the server.
pub trait Inbox: Send + Sync + 'static {
    /// Messages from node `from`, in the order it sent them.
    fn receive(self: Arc<Self>, from: u32, msg: Msg);
    /// Messages to this node may have been lost (it subscribed again, or saw a gap), or the owner
    /// changed: register this node's sessions with the owner again.
    fn resync(&self);
    /// Node `index` is gone from the registry (dead or stopped): its sessions are gone too.
    fn node_gone(&self, index: u32);
    /// This node's load, for its heartbeat.
    fn load(&self) -> Load;
    /// The rooms open on this node (call IDs): their placement is written again with each
    /// heartbeat, so that it survives a Redis restart.
    fn rooms(&self) -> Vec<String>;
    /// This node may take the calls over now, at `epoch` (it holds the lock): restore them from the
    /// store and start applying ops. Returns once that is done (or failed: then `false`, and the
    /// lock is let go so another node may try).
    fn take_over(&self, epoch: i64) -> futures_util::future::BoxFuture<'static, bool>;
}

/// This node's link to the others.
pub struct Cluster {
    node_id: String,
    index: u32,
    advertise: String,
    media: String,
    started_ms: u64,
    ttl: Duration,
    client: redis::Client,
    redis: redis::aio::ConnectionManager,
    inbox: OnceLock<Arc<dyn Inbox>>,
    /// The owner as last known (ours when we own the calls).
    owner: watch::Sender<Option<Owner>>,
    /// Whether this node owns the calls.
    owning: AtomicBool,
    draining: AtomicBool,
    takes_rooms: bool,
    outboxes: DashMap<u32, mpsc::Sender<Msg>>,
    boot: u64,
    /// Live nodes at the last heartbeat, by index.
    nodes: Mutex<HashMap<u32, NodeInfo>>,
    /// The owner lock's URL (PostgreSQL).
    store_url: String,
    dropped: AtomicU64,
    /// Where sender tasks run: `send` is also called from plain threads (the storage thread runs
    /// the continuations that deliver events).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("index", &self.index)
            .finish()
    }
}

fn key_node(id: &str) -> String {
    format!("sb:node:{id}")
}
const KEY_NODES: &str = "sb:nodes";
fn key_room(call: &str) -> String {
    format!("sb:room:{call}")
}
/// How long a room's placement is kept without its room closing (a day: a placement on a node
/// that is gone is replaced at the next join anyway).
const ROOM_TTL_MS: u64 = 86_400_000;
const KEY_OWNER: &str = "sb:owner";
fn channel(index: u32) -> String {
    format!("sb:n:{index}")
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Connects to Redis, draws this node's index from the store, and checks that no live node has
    /// its name. Nothing runs until [`start`](Self::start).
    pub async fn connect(
        config: &Config,
        node_id: &str,
        media: String,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = redis::Client::open(config.cluster.redis_url.as_str())?;
        let ttl = Duration::from_secs(config.cluster.node_ttl);
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(2);
        let mut redis = client.get_connection_manager_with_config(manager).await?;
        let existing: Option<String> = redis.get(key_node(node_id)).await?;
        if let Some(text) = existing
            && serde_json::from_str::<NodeInfo>(&text).is_ok()
        {
            return Err(ClusterError::DuplicateNode(node_id.to_owned()));
        }
        let url = config.storage.url.clone();
        let index = tokio::task::spawn_blocking(move || {
            let mut lock = OwnerLock::new(&url)?;
            lock.next_node_index()
        })
        .await
        .map_err(|_| StoreError::Closed)??;
        let index = u32::try_from(index)
            .ok()
            .filter(|i| *i < 1 << (64 - SESSION_BITS))
            .ok_or(StoreError::Corrupt(format!(
                "node index {index} out of range"
            )))?;
        let advertise = if config.cluster.advertise.is_empty() {
            format!("http://{}", config.server.listen)
        } else {
            config.cluster.advertise.clone()
        };
        let (owner, _) = watch::channel(None);
        Ok(Arc::new(Self {
            node_id: node_id.to_owned(),
            index,
            advertise,
            media,
            started_ms: now_ms(),
            ttl,
            client,
            redis,
            inbox: OnceLock::new(),
            owner,
            owning: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            takes_rooms: config.cluster.takes_rooms,
            outboxes: DashMap::new(),
            boot: rand::random::<u64>() >> 1,
            nodes: Mutex::new(HashMap::new()),
            store_url: config.storage.url.clone(),
            dropped: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This node's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether this node owns the calls.
    pub fn owning(&self) -> bool {
        self.owning.load(Ordering::Acquire)
    }

    /// The owner as last known.
    pub fn owner(&self) -> Option<Owner> {
        self.owner.borrow().clone()
    }

    /// Where a session's frames go: `None` when this node applies them itself.
    pub fn relay_to(&self) -> Option<Option<u32>> {
        if self.owning() {
            return None;
        }
        Some(self.owner().map(|o| o.index))
    }

    /// Marks this node as taking no new rooms (reported in the registry).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Messages given up on since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Starts the subscriber, the heartbeat and the ownership loop; they run until `shutdown`.
    pub fn start(self: &Arc<Self>, inbox: Arc<dyn Inbox>, shutdown: watch::Receiver<bool>) {
        let _ = self.inbox.set(inbox);
        tokio::spawn(Arc::clone(self).subscribe(shutdown.clone()));
        tokio::spawn(Arc::clone(self).heartbeat(shutdown.clone()));
        tokio::spawn(Arc::clone(self).ownership(shutdown));
    }

    fn inbox(&self) -> Option<&Arc<dyn Inbox>> {
        self.inbox.get()
    }

    /// Queues a message for node `to`. Never blocks, and may be called from any thread; a full
    /// queue drops it (counted).
    pub fn send(self: &Arc<Self>, to: u32, msg: Msg) {
        let tx = match self.outboxes.get(&to) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(OUTBOX);
                self.outboxes.insert(to, tx.clone());
                self.runtime.spawn(Arc::clone(self).sender(to, rx));
                tx
            }
        };
        if tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::CLUSTER_DROPPED).increment(1);
        }
    }

    /// Sends to every live node but this one.
    pub fn broadcast(self: &Arc<Self>, msg: Msg) {
        let peers: Vec<u32> = self
            .nodes
            .lock()
            .map(|n| n.keys().copied().filter(|i| *i != self.index).collect())
            .unwrap_or_default();
        for p in peers {
            self.send(p, msg.clone());
        }
    }

    /// One destination's sender: batches what is queued, numbers it, publishes it, and retries a
    /// publish nobody received for up to `node_ttl`.
    async fn sender(self: Arc<Self>, to: u32, mut rx: mpsc::Receiver<Msg>) {
        let mut redis = self.redis.clone();
        let chan = channel(to);
        let mut seq = 0u64;
        while let Some(first) = rx.recv().await {
            let mut msgs = vec![first];
            while msgs.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            seq += 1;
            let n = msgs.len() as u64;
            let env = Envelope {
                from: self.index,
                seq,
                boot: self.boot,
                msgs,
            };
            let Ok(text) = serde_json::to_string(&env) else {
                continue;
            };
            let deadline = tokio::time::Instant::now() + self.ttl;
            let mut backoff = Duration::from_millis(20);
            loop {
                let sent: Result<i64, _> = redis.publish(&chan, &text).await;
                match sent {
                    Ok(receivers) if receivers > 0 => {
                        metrics::counter!(crate::metrics::CLUSTER_MESSAGES, "dir" => "out")
                            .increment(n);
                        break;
                    }
                    _ if tokio::time::Instant::now() + backoff > deadline => {
                        tracing::warn!(to, messages = n, "node unreachable; messages dropped");
                        self.dropped.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!(crate::metrics::CLUSTER_DROPPED).increment(n);
                        break;
                    }
                    _ => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
        }
    }

    /// Receives this node's messages; subscribes again whenever the connection drops, and then
    /// asks for a resync (what was published meanwhile is lost).
    async fn subscribe(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let chan = channel(self.index);
        let mut first = true;
        // Per sender: its boot and the last batch number seen.
        let mut last: HashMap<u32, (u64, u64)> = HashMap::new();
        loop {
            let pubsub = async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&chan).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            let ps = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(2), pubsub) => r,
                _ = shutdown.changed() => return,
            };
            let mut ps = match ps {
                Ok(Ok(ps)) => ps,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: cannot subscribe; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Err(_) => continue,
            };
            if !first {
                tracing::info!("cluster: subscribed again; resyncing sessions");
                last.clear();
                if let Some(i) = self.inbox() {
                    i.resync();
                }
            }
            first = false;
            let mut stream = ps.on_message();
            loop {
                let m = tokio::select! {
                    m = stream.next() => m,
                    _ = shutdown.changed() => return,
                };
                let Some(m) = m else { break };
                let Ok(env) = serde_json::from_slice::<Envelope>(m.get_payload_bytes()) else {
                    tracing::warn!("cluster: unreadable message dropped");
                    continue;
                };
                let gap = match last.get(&env.from) {
                    Some(&(boot, seq)) if boot == env.boot => env.seq != seq + 1,
                    // A first batch from a sender (or from its new process) starts anywhere.
                    _ => false,
                };
                last.insert(env.from, (env.boot, env.seq));
                let Some(inbox) = self.inbox() else { continue };
                if gap {
                    tracing::warn!(
                        from = env.from,
                        "cluster: messages lost; resyncing sessions"
                    );
                    inbox.resync();
                }
                metrics::counter!(crate::metrics::CLUSTER_MESSAGES, "dir" => "in")
                    .increment(env.msgs.len() as u64);
                for msg in env.msgs {
                    if let Msg::OwnerChanged { owner } = &msg {
                        self.learn_owner(Some(owner.clone()));
                        continue;
                    }
                    Arc::clone(inbox).receive(env.from, msg);
                }
            }
            tracing::warn!("cluster: subscription lost; subscribing again");
        }
    }

    /// Records the owner; a change (to another node) makes this node's sessions register there.
    fn learn_owner(&self, owner: Option<Owner>) {
        if self.owning() {
            return;
        }
        let changed = self.owner.send_if_modified(|cur| {
            let newer = match (&owner, cur.as_ref()) {
                (Some(o), Some(c)) => o.epoch > c.epoch,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if newer {
                *cur = owner.clone();
            }
            newer
        });
        if changed {
            if let Some(o) = owner {
                tracing::info!(owner = %o.node_id, epoch = o.epoch, "cluster: calls owned by another node");
            }
            if let Some(i) = self.inbox() {
                i.resync();
            }
        }
    }

    /// Publishes this node's entry (and the owner's) five times per `node_ttl`, reads the others',
    /// and reports nodes that disappeared.
    async fn heartbeat(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut redis = self.redis.clone();
        let every = self.ttl / 5;
        let ttl_ms = self.ttl.as_millis() as u64;
        let mut known: HashSet<u32> = HashSet::new();
        // Redis restarted (its run_id changed): the registry is empty until every node's next
        // heartbeat, so nobody is reported gone until a node_ttl has passed.
        let mut run_id = String::new();
        let mut grace_until = tokio::time::Instant::now();
        loop {
            let load = self.inbox().map(|i| i.load()).unwrap_or_default();
            let rooms = self.inbox().map(|i| i.rooms()).unwrap_or_default();
            let me = NodeInfo {
                node_id: self.node_id.clone(),
                index: self.index,
                advertise: self.advertise.clone(),
                media: self.media.clone(),
                started_ms: self.started_ms,
                draining: self.draining.load(Ordering::Acquire),
                takes_rooms: self.takes_rooms,
                owner: self.owning(),
                load,
            };
            let now = now_ms();
            let round = async {
                let text = serde_json::to_string(&me).unwrap_or_default();
                let mut pipe = redis::pipe();
                pipe.set_options(
                    key_node(&self.node_id),
                    text,
                    redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl_ms)),
                )
                .ignore()
                .zadd(KEY_NODES, &self.node_id, now as f64)
                .ignore()
                .zrembyscore(KEY_NODES, "-inf", (now.saturating_sub(ttl_ms * 4)) as f64)
                .ignore();
                for r in &rooms {
                    pipe.set_options(
                        key_room(r),
                        self.index,
                        redis::SetOptions::default()
                            .with_expiration(redis::SetExpiry::PX(ROOM_TTL_MS)),
                    )
                    .ignore();
                }
                if self.owning()
                    && let Some(o) = self.owner()
                {
                    pipe.set_options(
                        KEY_OWNER,
                        serde_json::to_string(&o).unwrap_or_default(),
                        redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl_ms)),
                    )
                    .ignore();
                }
                pipe.zrange(KEY_NODES, 0, -1)
                    .get(KEY_OWNER)
                    .cmd("INFO")
                    .arg("server");
                let (ids, owner, info): (Vec<String>, Option<String>, String) =
                    pipe.query_async(&mut redis).await?;
                let keys: Vec<String> = ids.iter().map(|i| key_node(i)).collect();
                let infos: Vec<Option<String>> = if keys.is_empty() {
                    Vec::new()
                } else {
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async(&mut redis)
                        .await?
                };
                Ok::<_, redis::RedisError>((infos, owner, info))
            };
            match tokio::time::timeout((self.ttl / 2).max(Duration::from_millis(500)), round).await
            {
                Ok(Ok((infos, owner, info))) => {
                    let id = info
                        .lines()
                        .find_map(|l| l.strip_prefix("run_id:"))
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    if id != run_id {
                        if !run_id.is_empty() {
                            tracing::warn!("cluster: Redis restarted; the registry fills again");
                            grace_until = tokio::time::Instant::now() + self.ttl;
                        }
                        run_id = id;
                    }
                    let live: HashMap<u32, NodeInfo> = infos
                        .into_iter()
                        .flatten()
                        .filter_map(|t| serde_json::from_str::<NodeInfo>(&t).ok())
                        .map(|n| (n.index, n))
                        .collect();
                    let mut now_known: HashSet<u32> = live.keys().copied().collect();
                    if tokio::time::Instant::now() < grace_until {
                        now_known.extend(known.iter().copied());
                    }
                    for gone in known.difference(&now_known) {
                        tracing::info!(index = gone, "cluster: node gone");
                        self.outboxes.remove(gone);
                        if let Some(i) = self.inbox() {
                            i.node_gone(*gone);
                        }
                    }
                    known = now_known;
                    if let Ok(mut n) = self.nodes.lock() {
                        *n = live;
                    }
                    metrics::gauge!(crate::metrics::CLUSTER_NODES).set(known.len() as f64);
                    let owner = owner.and_then(|t| serde_json::from_str::<Owner>(&t).ok());
                    self.learn_owner(owner);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cluster: heartbeat failed"),
                Err(_) => tracing::warn!("cluster: heartbeat timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Leave the registry at once rather than when the entry expires.
        let _: Result<(), _> = redis::pipe()
            .del(key_node(&self.node_id))
            .zrem(KEY_NODES, &self.node_id)
            .query_async(&mut redis)
            .await;
    }

    /// The node a room is on, from Redis (`sb:room:<call>`), if it was placed and that node is live.
    pub async fn room_node(&self, call: &str) -> Option<u32> {
        let mut redis = self.redis.clone();
        let got: Option<u32> = redis.get(key_room(call)).await.ok().flatten();
        got.filter(|i| self.is_live(*i))
    }

    /// Places a room on `node` unless it already is on a live one (a lock per room: the first
    /// placement wins); returns where the room is. Without Redis, `node`.
    pub async fn place_room(&self, call: &str, node: u32) -> u32 {
        let mut redis = self.redis.clone();
        let key = key_room(call);
        for _ in 0..2 {
            let set: Result<bool, _> = redis::cmd("SET")
                .arg(&key)
                .arg(node)
                .arg("NX")
                .arg("PX")
                .arg(ROOM_TTL_MS)
                .query_async(&mut redis)
                .await
                .map(|v: Option<String>| v.is_some());
            match set {
                Ok(true) | Err(_) => return node,
                Ok(false) => {
                    let cur: Option<u32> = redis.get(&key).await.ok().flatten();
                    match cur {
                        Some(c) if self.is_live(c) => return c,
                        // Placed on a node that is gone: take the key over.
                        _ => {
                            let _: Result<(), _> = redis.del(&key).await;
                        }
                    }
                }
            }
        }
        node
    }

    /// Forgets where a closed room was.
    pub async fn forget_room(&self, call: &str) {
        let mut redis = self.redis.clone();
        let _: Result<(), _> = redis.del(key_room(call)).await;
    }

    /// Whether node `index` was live at the last heartbeat (this node always is).
    pub fn is_live(&self, index: u32) -> bool {
        index == self.index || self.nodes.lock().is_ok_and(|n| n.contains_key(&index))
    }

    /// The live node that should take a new room: taking rooms, not draining, fewest participants plus rooms
    /// placed since (`placed`), then least CPU; this node when it knows no better.
    pub fn least_loaded(&self, placed: &HashMap<u32, usize>) -> u32 {
        let nodes = self.nodes.lock().map(|n| n.clone()).unwrap_or_default();
        let score = |n: &NodeInfo| {
            let extra = placed.get(&n.index).copied().unwrap_or(0) as u64;
            (
                n.load.participants + 2 * extra,
                (n.load.cpu * 1000.0) as u64,
                n.index,
            )
        };
        nodes
            .values()
            .filter(|n| !n.draining && n.takes_rooms)
            .min_by_key(|n| score(n))
            .map_or(self.index, |n| n.index)
    }

    /// The live nodes at the last heartbeat, by name.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> = self
            .nodes
            .lock()
            .map(|n| n.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    /// Tries to own the calls every [`OWNER_POLL`]; once owning, checks the lock at the same pace.
    /// Ownership ends only with the process: a node that finds another took over while it was cut
    /// off from the database exits (its supervisor starts it again, as a follower).
    async fn ownership(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<Result<Option<i64>, String>>(1);
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<Option<i64>>();
        let url = self.store_url.clone();
        let node = self.node_id.clone();
        // The driver blocks: the lock lives on a thread of its own.
        let thread = std::thread::Builder::new()
            .name("owner-lock".into())
            .spawn(move || owner_lock_thread(url, node, tx, cmd_rx));
        if thread.is_err() {
            tracing::error!("cluster: cannot start the owner-lock thread");
            return;
        }
        loop {
            let got = tokio::select! {
                r = rx.recv() => r,
                _ = shutdown.changed() => {
                    let _ = cmd_tx.send(None);
                    return;
                }
            };
            match got {
                None => return,
                // A draining node is about to stop: it does not take the calls.
                Some(Ok(Some(_))) if self.draining.load(Ordering::Acquire) && !self.owning() => {
                    let _ = cmd_tx.send(None);
                }
                Some(Ok(Some(epoch))) if !self.owning() => {
                    let Some(inbox) = self.inbox().cloned() else {
                        return;
                    };
                    tracing::info!(epoch, "cluster: taking the calls over");
                    if inbox.take_over(epoch).await {
                        let me = Owner {
                            node_id: self.node_id.clone(),
                            index: self.index,
                            epoch,
                        };
                        self.owner.send_replace(Some(me.clone()));
                        self.owning.store(true, Ordering::Release);
                        metrics::gauge!(crate::metrics::CLUSTER_OWNER).set(1.0);
                        let mut redis = self.redis.clone();
                        let _: Result<(), _> = redis
                            .set_options(
                                KEY_OWNER,
                                serde_json::to_string(&me).unwrap_or_default(),
                                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(
                                    self.ttl.as_millis() as u64,
                                )),
                            )
                            .await;
                        self.broadcast(Msg::OwnerChanged { owner: me });
                        // Sessions of this node registered with the old owner.
                        inbox.resync();
                        let _ = cmd_tx.send(Some(epoch));
                    } else {
                        tracing::error!("cluster: takeover failed; letting the calls go");
                        let _ = cmd_tx.send(None);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(why)) => {
                    tracing::error!(%why, "cluster: another node owns the calls now; exiting so that this node restarts clean");
                    crate::fault::exit_lost_ownership();
                }
            }
        }
    }
}

/// The owner lock's thread: reports `Ok(Some(epoch))` when it got the lock (then waits to hear
/// whether the takeover worked: `Some(epoch)` keep it, `None` let it go), and `Err` when a lock it
/// held turned out to be someone else's.
fn owner_lock_thread(
    url: String,
    node: String,
    tx: mpsc::Sender<Result<Option<i64>, String>>,
    cmd: std::sync::mpsc::Receiver<Option<i64>>,
) {
    let mut lock = match OwnerLock::new(&url) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cluster: owner lock");
            return;
        }
    };
    let mut held: Option<i64> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        match held {
            None => match lock.try_acquire(&node, now_ms()) {
                Ok(Some(epoch)) => {
                    if tx.blocking_send(Ok(Some(epoch))).is_err() {
                        return;
                    }
                    match cmd.recv() {
                        Ok(Some(e)) => held = Some(e),
                        _ => {
                            lock.release();
                            // Another node's turn.
                            std::thread::sleep(OWNER_POLL * 4);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "cluster: owner lock unavailable"),
            },
            Some(epoch) => {
                if let Ok(None) = cmd.try_recv() {
                    lock.release();
                    return;
                }
                match lock.still_held(epoch) {
                    Ok(true) => {}
                    Ok(false) => match lock.reacquire(&node, epoch) {
                        Ok(true) => tracing::info!(epoch, "cluster: owner lock taken back"),
                        Ok(false) => {
                            let _ = tx.blocking_send(Err(format!(
                                "the ownership epoch moved past {epoch}"
                            )));
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "cluster: owner lock lost; retrying"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cluster: owner lock check failed"),
                }
            }
        }
        std::thread::sleep(OWNER_POLL);
    }
}
