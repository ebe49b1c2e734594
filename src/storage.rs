//! The durable store: call history, the billing ledger and the webhook outbox.
//!
//! Two backends hold it: an embedded SQLite file (the default: `switchboard serve` needs nothing else
//! running; [`sqlite`]) and a PostgreSQL database several nodes share (`[storage] url`; [`postgres`]).
//! All SQL of the server is in those two modules. [`Store`] is the synchronous interface the rest of
//! the server uses, the same for both; it keeps what does not depend on the backend (which parts of a
//! call changed since it was last written, the webhook receivers, the node's name).
//!
//! The server owns the store on one thread, [`StoreThread`], which takes jobs in order, writes a
//! whole batch of them in one transaction (group commit), and only then runs each job's
//! continuation. Continuations deliver the events and replies of the ops that caused the writes, so
//! nothing a client sees can be lost to a crash: a reply is sent after its change is committed.
//!
//! Each backend's schema is a table of versioned scripts applied at open; a database whose version
//! is newer than this build knows is refused ([`StoreError::SchemaTooNew`]).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::billing::{UsageRecord, UsageRow};
use crate::ids::{CallId, UserId};
use crate::signaling::wire::{CallState, EndReason, Mode, UserState};
use crate::signaling::{CallRecord, CallUserRecord};
use crate::webhooks::OutboxEvent;

mod postgres;
mod sqlite;
mod writer;
pub use postgres::OwnerLock;
pub use writer::{Continuation, Job, PROBE_EVERY, Restorer, StoreThread, Unavailable};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused, or could not be reached.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// `[storage] url` is not one this build can open.
    #[error("storage.url: {0}")]
    Url(String),
    /// The database was migrated by a newer release: this one would misread it.
    #[error(
        "the database schema is at version {found}, newer than this build knows ({known}): run the release that migrated it, or restore a backup"
    )]
    SchemaTooNew {
        /// The database's version.
        found: u32,
        /// The newest this build knows.
        known: u32,
    },
    /// The database directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A stored value is not one this version understands.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The storage thread is gone.
    #[error("storage is shut down")]
    Closed,
    /// Another node took the cluster's calls over (ownership epoch `epoch`): this node may no
    /// longer write them.
    #[error("another node owns the calls now (ownership epoch {epoch})")]
    Fenced {
        /// The epoch in force.
        epoch: i64,
    },
}

/// One page of a user's call history.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPage {
    /// Calls, newest first.
    pub calls: Vec<CallRecord>,
    /// Cursor for the next page; 0 when there is none.
    pub next_flag: u64,
}

/// A filter for the admin call list.
#[derive(Debug, Clone, Default)]
pub struct CallFilter {
    /// Only calls in this state.
    pub state: Option<CallState>,
    /// Only calls this user appears in.
    pub user_id: Option<UserId>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// A webhook event waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Row ID: the order events were enqueued in.
    pub seq: i64,
    /// Unique event ID receivers de-duplicate on.
    pub event_id: String,
    /// The receiver.
    pub url: String,
    /// The JSON body.
    pub body: String,
    /// Deliveries tried so far.
    pub attempts: u32,
    /// Attempts the receiver refused (answered other than 2xx, or not in time).
    pub refusals: u32,
    /// When it was queued, ms.
    pub created_ms: u64,
    /// Not before this time, ms.
    pub next_attempt_ms: u64,
}

/// A webhook event given up on (`GET /v1/admin/webhooks/dead`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Order of death.
    pub seq: i64,
    /// The event's ID.
    pub event_id: String,
    /// The receiver that did not take it.
    pub url: String,
    /// The event, as it would have been delivered.
    #[serde(serialize_with = "raw_json")]
    pub body: String,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts the receiver refused.
    pub refusals: u32,
    /// When it was queued, ms.
    pub created_at: u64,
    /// When it was given up on, ms.
    pub dead_at: u64,
    /// `max_attempts` or `max_age`.
    pub reason: String,
}

/// The event body as JSON (it was stored as the JSON text delivered); as a string if it is not JSON.
fn raw_json<S: serde::Serializer>(body: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(body),
    }
}

/// Most dead letters kept; the oldest go first.
pub const MAX_DEAD_LETTERS: i64 = 10_000;

/// A call to write, with what changed since this store last wrote it.
pub(crate) struct CallWrite<'a> {
    pub(crate) rec: &'a CallRecord,
    /// The call's row ID, when its row needs no write (only some of its users changed).
    pub(crate) seq: Option<i64>,
    /// Indexes in `rec.users` of the users to write.
    pub(crate) users: Vec<usize>,
}

/// One transaction's worth of writes.
pub(crate) struct Batch<'a> {
    pub(crate) calls: Vec<CallWrite<'a>>,
    pub(crate) events: &'a [OutboxEvent],
    /// Each event gets one outbox row per receiver.
    pub(crate) urls: &'a [String],
    pub(crate) usage: &'a [UsageRecord],
    pub(crate) now_ms: u64,
    /// The node that runs these calls.
    pub(crate) node: &'a str,
}

/// What a backend does. Every method is one transaction or one read; [`Store`] holds the state that
/// is the same for both.
pub(crate) trait Backend: Send {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// Writes a batch in one transaction. Returns each call's row ID (in `calls` order) and how many
    /// ledger segments were new.
    fn write_batch(&mut self, b: &Batch<'_>) -> Result<(Vec<i64>, usize), StoreError>;
    fn prune_history(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// Started calls run by `node`, with their row IDs.
    fn started_calls(&mut self, node: &str) -> Result<Vec<(i64, CallRecord)>, StoreError>;
    /// Writes of calls commit only while the cluster's ownership epoch is `epoch` (`None`: always).
    fn set_fence(&mut self, _epoch: Option<i64>) {}
    /// Marks every started call as run by `node` (a cluster owner taking the calls over); how many.
    fn adopt_started_calls(&mut self, _node: &str) -> Result<usize, StoreError> {
        Ok(0)
    }
    fn probe(&mut self, now_ms: u64) -> Result<(), StoreError>;
    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, StoreError>;
    fn list_calls(&mut self, f: &CallFilter, limit: usize) -> Result<Vec<CallRecord>, StoreError>;
    /// Row IDs of the user's calls below `before`, newest first.
    fn user_call_seqs(
        &mut self,
        user: &UserId,
        before: i64,
        limit: usize,
    ) -> Result<Vec<i64>, StoreError>;
    fn call_by_seq(&mut self, seq: i64) -> Result<Option<CallRecord>, StoreError>;
    fn remember_user(
        &mut self,
        user: &UserId,
        name: Option<&str>,
        now: u64,
    ) -> Result<(), StoreError>;
    fn user_names(&mut self, users: &[UserId]) -> Result<HashMap<UserId, String>, StoreError>;
    fn usage(
        &mut self,
        from_ms: u64,
        to_ms: u64,
        call: Option<&CallId>,
        user: Option<&UserId>,
    ) -> Result<Vec<UsageRow>, StoreError>;
    /// The due head of each receiver's queue that this node delivers (PostgreSQL: the receivers
    /// whose delivery lock this node holds).
    fn due_webhooks_per_url(
        &mut self,
        urls: &[String],
        now: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError>;
    fn due_webhooks(&mut self, now: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    fn webhook_delivered(&mut self, seq: i64) -> Result<(), StoreError>;
    fn webhook_retry(
        &mut self,
        seq: i64,
        next_attempt_ms: u64,
        attempts: u32,
        refusals: u32,
    ) -> Result<(), StoreError>;
    #[allow(clippy::too_many_arguments)]
    fn webhook_dead(
        &mut self,
        seq: i64,
        attempts: u32,
        refusals: u32,
        reason: &str,
        now_ms: u64,
        keep: i64,
    ) -> Result<bool, StoreError>;
    fn dead_webhooks(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    fn dead_webhook_count(&mut self) -> Result<u64, StoreError>;
    fn drop_unconfigured_webhooks(&mut self, urls: &[String]) -> Result<usize, StoreError>;
    fn webhook_backlog(&mut self) -> Result<u64, StoreError>;
    fn schema_version(&mut self) -> Result<u32, StoreError>;
    /// How long one attempt waits for a lock another connection holds.
    fn set_lock_timeout(&mut self, d: std::time::Duration);
    /// The database file, for the checkpointer (SQLite on disk only).
    fn file(&self) -> Option<std::path::PathBuf>;
    /// Folds the write-ahead log into the database (SQLite, at shutdown).
    fn checkpoint(&mut self) -> Result<(), StoreError>;
}

/// The store.
pub struct Store {
    db: Box<dyn Backend>,
    /// The last record written of each started call, with its row ID.
    written: HashMap<CallId, (i64, CallRecord)>,
    /// Webhook receivers: each queued event gets one outbox row per URL.
    webhook_urls: Vec<String>,
    /// Dead letters kept ([`MAX_DEAD_LETTERS`]; smaller in tests).
    max_dead: i64,
    /// This node's name: the calls it writes are its own, and only those are restored at start.
    node: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.db.kind())
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`, migrating its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::with(Box::new(sqlite::Sqlite::open(path)?)))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user:pass@host:port/db` or
    /// `host=... dbname=...`), migrating its schema. Fails if it cannot be reached now.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let config: ::postgres::Config = url.parse().map_err(|e: ::postgres::Error| {
            StoreError::Url(format!("not a PostgreSQL connection string: {e}"))
        })?;
        Self::open_postgres_config(config)
    }

    /// [`open_postgres`](Self::open_postgres) with a parsed configuration.
    pub fn open_postgres_config(config: ::postgres::Config) -> Result<Self, StoreError> {
        Ok(Self::with(Box::new(postgres::Postgres::open(config)?)))
    }

    /// Opens what `[storage]` names: PostgreSQL when `url` is set, else the SQLite file at `path`.
    pub fn connect(config: &crate::config::StorageConfig) -> Result<Self, StoreError> {
        match backend_of(&config.url)? {
            Kind::Sqlite => Self::open(&config.path),
            Kind::Postgres => Self::open_postgres(&config.url),
        }
    }

    fn with(db: Box<dyn Backend>) -> Self {
        Self {
            db,
            written: HashMap::new(),
            webhook_urls: Vec::new(),
            max_dead: MAX_DEAD_LETTERS,
            node: String::new(),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.db.kind()
    }

    /// Names this node (see [`started_calls`](Self::started_calls)).
    pub fn set_node(&mut self, node: impl Into<String>) {
        self.node = node.into();
    }

    /// The schema version of the database.
    pub fn schema_version(&mut self) -> Result<u32, StoreError> {
        self.db.schema_version()
    }

    /// The newest schema version this build knows for its backend.
    pub fn known_schema_version(&self) -> u32 {
        match self.db.kind() {
            "postgres" => postgres::MIGRATIONS.len() as u32,
            _ => sqlite::MIGRATIONS.len() as u32,
        }
    }

    /// Writes calls (insert or update) in one transaction. Only what changed since this store last
    /// wrote a call is written: the row of a call whose state moved, and the users whose record
    /// changed. Started calls are remembered for that; an ended call is forgotten once written.
    pub fn write_calls<'a>(
        &mut self,
        calls: impl IntoIterator<Item = &'a CallRecord>,
    ) -> Result<(), StoreError> {
        self.write_batch(calls, &[], &[], 0)
    }

    /// Sets the webhook receivers (from `[webhooks] urls`).
    pub fn set_webhook_urls(&mut self, urls: Vec<String>) {
        self.webhook_urls = urls;
    }

    /// Writes calls (as [`write_calls`](Self::write_calls)), ledger segments (as
    /// [`write_usage`](Self::write_usage)) and queues webhook events, in one transaction: an event
    /// is queued if and only if the change it reports is written.
    pub fn write_batch<'a>(
        &mut self,
        calls: impl IntoIterator<Item = &'a CallRecord>,
        events: &[OutboxEvent],
        usage: &[UsageRecord],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(calls, events, usage, now_ms).map(|_| ())
    }

    fn write<'a>(
        &mut self,
        calls: impl IntoIterator<Item = &'a CallRecord>,
        events: &[OutboxEvent],
        usage: &[UsageRecord],
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        // The last record of a call wins (one upsert may not touch a row twice).
        let mut order: Vec<&'a CallRecord> = Vec::new();
        let mut at: HashMap<&CallId, usize> = HashMap::new();
        for c in calls {
            match at.get(&c.call_id) {
                Some(&i) => order[i] = c,
                None => {
                    at.insert(&c.call_id, order.len());
                    order.push(c);
                }
            }
        }
        let mut writes = Vec::new();
        for c in order {
            let before = self.written.get(&c.call_id);
            if before.is_some_and(|(_, b)| b == c) {
                continue;
            }
            let row_changed = before.is_none_or(|(_, b)| {
                b.state != c.state || b.end_time != c.end_time || b.end_reason != c.end_reason
            });
            let users = (0..c.users.len())
                .filter(|&i| !before.is_some_and(|(_, b)| b.users.get(i) == c.users.get(i)))
                .collect();
            writes.push(CallWrite {
                rec: c,
                seq: before.filter(|_| !row_changed).map(|(seq, _)| *seq),
                users,
            });
        }
        let urls: &[String] = if events.is_empty() {
            &[]
        } else {
            &self.webhook_urls
        };
        let batch = Batch {
            calls: writes,
            events,
            urls,
            usage,
            now_ms,
            node: &self.node,
        };
        let (seqs, n) = self.db.write_batch(&batch)?;
        // Remember only after the commit, so a failed transaction is retried in full.
        let done: Vec<(i64, CallRecord)> = batch
            .calls
            .iter()
            .zip(seqs)
            .map(|(w, seq)| (seq, w.rec.clone()))
            .collect();
        for (seq, c) in done {
            if c.state == CallState::Started {
                self.written.insert(c.call_id.clone(), (seq, c));
            } else {
                self.written.remove(&c.call_id);
            }
        }
        Ok(n)
    }

    /// Deletes up to `limit` calls that ended before `before_ms`, oldest first, with their users
    /// (history retention). Calls in progress are never deleted, whatever their age; the billing
    /// ledger and the webhook outbox are not touched. Returns how many calls were deleted.
    pub fn prune_history(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.db.prune_history(before_ms, limit)
    }

    /// Every started call this node runs, for the core to restore after a restart. They are
    /// remembered as committed (see [`committed`](Self::committed)).
    /// Takes over every started call for this node as the cluster's owner at `epoch`: from now on
    /// its writes of calls commit only while that epoch holds, and the calls are this node's.
    /// Returns them, as [`started_calls`](Self::started_calls) does.
    pub fn take_over(&mut self, epoch: i64) -> Result<Vec<CallRecord>, StoreError> {
        self.db.set_fence(Some(epoch));
        let node = self.node.clone();
        let n = self.db.adopt_started_calls(&node)?;
        tracing::info!(calls = n, epoch, "took the cluster's calls over");
        self.written.clear();
        self.started_calls()
    }

    /// Stops writing calls as the cluster's owner (another node took over).
    pub fn give_up_ownership(&mut self) {
        self.db.set_fence(Some(-1));
        self.written.clear();
    }

    pub fn started_calls(&mut self) -> Result<Vec<CallRecord>, StoreError> {
        let rows = self.db.started_calls(&self.node)?;
        let mut calls = Vec::with_capacity(rows.len());
        for (seq, c) in rows {
            self.written.insert(c.call_id.clone(), (seq, c.clone()));
            calls.push(c);
        }
        Ok(calls)
    }

    /// The last committed record of a started call (`None` for a call never committed, or whose
    /// end is committed), known without reading the database: it answers while the disk fails.
    pub fn committed(&self, id: &CallId) -> Option<&CallRecord> {
        self.written.get(id).map(|(_, c)| c)
    }

    /// A small write that tells whether writes work (while storage is failing).
    pub fn probe(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.db.probe(now_ms)
    }

    /// One call by ID.
    pub fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, StoreError> {
        self.db.call(id)
    }

    /// Calls for the admin API, newest first.
    pub fn list_calls(&mut self, f: &CallFilter) -> Result<Vec<CallRecord>, StoreError> {
        self.db.list_calls(f, f.limit.clamp(1, 1000))
    }

    /// A user's calls, newest first, `count` at a time. `next_flag` 0 starts at the newest.
    pub fn user_calls(
        &mut self,
        user: &UserId,
        count: usize,
        next_flag: u64,
    ) -> Result<CallPage, StoreError> {
        let before = if next_flag == 0 {
            i64::MAX
        } else {
            i64::try_from(next_flag).unwrap_or(i64::MAX)
        };
        let seqs = self.db.user_call_seqs(user, before, count + 1)?;
        let more = seqs.len() > count;
        let page: Vec<i64> = seqs.into_iter().take(count).collect();
        let mut calls = Vec::with_capacity(page.len());
        for seq in &page {
            if let Some(c) = self.db.call_by_seq(*seq)? {
                calls.push(c);
            }
        }
        let next_flag = if more {
            page.last().map_or(0, |s| *s as u64)
        } else {
            0
        };
        Ok(CallPage { calls, next_flag })
    }

    /// Remembers a user's display name.
    pub fn remember_user(
        &mut self,
        user: &UserId,
        name: Option<&str>,
        now: u64,
    ) -> Result<(), StoreError> {
        self.db.remember_user(user, name, now)
    }

    /// The last known display names of these users.
    pub fn user_names(&mut self, users: &[UserId]) -> Result<HashMap<UserId, String>, StoreError> {
        self.db.user_names(users)
    }

    /// Writes ledger intervals; an interval already written (same call, user and start) is skipped.
    pub fn write_usage(&mut self, rows: &[UsageRecord]) -> Result<usize, StoreError> {
        self.write_usage_and_events(rows, &[], 0)
    }

    /// Writes ledger intervals and queues their webhook events in one transaction.
    pub fn write_usage_and_events(
        &mut self,
        rows: &[UsageRecord],
        events: &[OutboxEvent],
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        self.write(std::iter::empty(), events, rows, now_ms)
    }

    /// Ledger intervals overlapping `[from_ms, to_ms)`, optionally for one call and/or user.
    pub fn usage(
        &mut self,
        from_ms: u64,
        to_ms: u64,
        call: Option<&CallId>,
        user: Option<&UserId>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.db.usage(from_ms, to_ms, call, user)
    }

    /// Queues webhook events (one row per receiver) in their own transaction.
    pub fn enqueue_webhooks(
        &mut self,
        events: &[OutboxEvent],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if events.is_empty() || self.webhook_urls.is_empty() {
            return Ok(());
        }
        self.write(std::iter::empty(), events, &[], now_ms)
            .map(|_| ())
    }

    /// The oldest undelivered event of each receiver that is due at `now`, at most `limit` per
    /// receiver, in queue order. An event not yet due holds back the receiver's later ones. On
    /// PostgreSQL only the receivers this node holds the delivery lock of: one node delivers a
    /// receiver's events at a time, in order.
    pub fn due_webhooks_per_url(
        &mut self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.db.due_webhooks_per_url(&self.webhook_urls, now, limit)
    }

    /// Events due for delivery at `now`, oldest first (whichever node delivers them).
    pub fn due_webhooks(&mut self, now: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.db.due_webhooks(now, limit)
    }

    /// Removes a delivered event.
    pub fn webhook_delivered(&mut self, seq: i64) -> Result<(), StoreError> {
        self.db.webhook_delivered(seq)
    }

    /// Schedules another attempt, with the counts after the one that failed.
    pub fn webhook_retry(
        &mut self,
        seq: i64,
        next_attempt_ms: u64,
        attempts: u32,
        refusals: u32,
    ) -> Result<(), StoreError> {
        self.db
            .webhook_retry(seq, next_attempt_ms, attempts, refusals)
    }

    /// Moves an event to the dead letters (counting the attempt that just failed, if any), in one
    /// transaction; keeps the newest [`MAX_DEAD_LETTERS`]. Returns whether the row was there.
    pub fn webhook_dead(
        &mut self,
        seq: i64,
        attempts: u32,
        refusals: u32,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.db
            .webhook_dead(seq, attempts, refusals, reason, now_ms, self.max_dead)
    }

    /// The newest dead letters, newest first.
    pub fn dead_webhooks(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.db.dead_webhooks(limit)
    }

    /// Dead letters kept.
    pub fn dead_webhook_count(&mut self) -> Result<u64, StoreError> {
        self.db.dead_webhook_count()
    }

    /// Deletes outbox rows for receivers no longer in [`set_webhook_urls`](Self::set_webhook_urls)
    /// (nobody would ever deliver them). Returns how many.
    pub fn drop_unconfigured_webhooks(&mut self) -> Result<usize, StoreError> {
        self.db.drop_unconfigured_webhooks(&self.webhook_urls)
    }

    /// Events waiting in the outbox.
    pub fn webhook_backlog(&mut self) -> Result<u64, StoreError> {
        self.db.webhook_backlog()
    }

    pub(crate) fn set_lock_timeout(&mut self, d: std::time::Duration) {
        self.db.set_lock_timeout(d);
    }

    /// The database file, when it is one (SQLite, not in memory).
    fn path(&self) -> Option<std::path::PathBuf> {
        self.db.file()
    }

    /// Checkpoints the WAL into the main file (SQLite, at shutdown).
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.db.checkpoint()
    }
}

/// Which backend a `[storage] url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No URL: the SQLite file at `[storage] path`.
    Sqlite,
    /// `postgres://`, `postgresql://` or a `key=value` connection string.
    Postgres,
}

/// The backend `url` names (empty: SQLite), or why it names none.
pub fn backend_of(url: &str) -> Result<Kind, StoreError> {
    let url = url.trim();
    if url.is_empty() {
        return Ok(Kind::Sqlite);
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") || url.contains('=') {
        url.parse::<::postgres::Config>()
            .map_err(|e| StoreError::Url(format!("not a PostgreSQL connection string: {e}")))?;
        return Ok(Kind::Postgres);
    }
    Err(StoreError::Url(format!(
        "{:?} is not a postgres:// URL (leave it empty for the SQLite file at storage.path)",
        url.split(':').next().unwrap_or_default()
    )))
}

fn check_version(found: u32, known: usize) -> Result<(), StoreError> {
    let known = known as u32;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    Ok(())
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `calls` row as both backends read it.
struct RawCall {
    seq: i64,
    call_id: String,
    caller: String,
    mode: String,
    state: String,
    extended_data: String,
    timeout_secs: i64,
    create_time: i64,
    end_time: i64,
    end_reason: Option<String>,
}

/// A `call_users` row as both backends read it.
struct RawUser {
    user_id: String,
    state: String,
    extended_data: String,
    inviter: String,
    invite_extended_data: String,
    invite_time: i64,
    deadline: i64,
    accept_time: i64,
    leave_time: i64,
}

fn decode_call(r: RawCall) -> Result<(i64, CallRecord), StoreError> {
    let rec = CallRecord {
        call_id: parse_id(&r.call_id)?,
        caller: parse_id(&r.caller)?,
        mode: match r.mode.as_str() {
            "general" => Mode::General,
            "advanced" => Mode::Advanced,
            m => return Err(StoreError::Corrupt(format!("mode {m}"))),
        },
        state: match r.state.as_str() {
            "started" => CallState::Started,
            "ended" => CallState::Ended,
            s => return Err(StoreError::Corrupt(format!("call state {s}"))),
        },
        extended_data: r.extended_data,
        timeout_secs: u32::try_from(r.timeout_secs)
            .map_err(|_| StoreError::Corrupt(format!("timeout {}", r.timeout_secs)))?,
        create_time: r.create_time as u64,
        end_time: r.end_time as u64,
        end_reason: match r.end_reason {
            None => None,
            Some(x) => Some(
                EndReason::parse(&x).ok_or_else(|| StoreError::Corrupt(format!("reason {x}")))?,
            ),
        },
        users: Vec::new(),
    };
    Ok((r.seq, rec))
}

fn decode_user(r: RawUser) -> Result<CallUserRecord, StoreError> {
    Ok(CallUserRecord {
        user_id: parse_id(&r.user_id)?,
        state: UserState::parse(&r.state)
            .ok_or_else(|| StoreError::Corrupt(format!("user state {}", r.state)))?,
        extended_data: r.extended_data,
        inviter: parse_id(&r.inviter)?,
        invite_extended_data: r.invite_extended_data,
        invite_time: r.invite_time as u64,
        deadline: r.deadline as u64,
        accept_time: r.accept_time as u64,
        leave_time: r.leave_time as u64,
    })
}

fn usage_row(c: &str, u: &str, tier: String, s: i64, e: i64) -> Result<UsageRow, StoreError> {
    Ok(UsageRow {
        call_id: parse_id(c)?,
        user_id: parse_id(u)?,
        tier,
        start_ms: s as u64,
        end_ms: e as u64,
        ms: (e - s).max(0) as u64,
    })
}

/// Appends a receiver's queue head up to its first row not yet due.
fn take_due(out: &mut Vec<OutboxRow>, rows: Vec<OutboxRow>, now: u64) {
    for r in rows {
        if r.next_attempt_ms > now {
            break;
        }
        out.push(r);
    }
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("id {s:?}")))
}

/// Databases for the storage tests: a test given one by [`each`](testdb::each) runs on SQLite and,
/// when the test command started a PostgreSQL server (`SWITCHBOARD_TEST_POSTGRES`, a connection
/// string), on PostgreSQL too, each in a schema of its own. Under CI, PostgreSQL is required.
#[cfg(test)]
pub(crate) mod testdb {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use postgres::NoTls;

    use super::{Store, StoreError};

    /// The connection string of the test server (an admin role that may create schemas).
    pub(crate) const ENV: &str = "SWITCHBOARD_TEST_POSTGRES";

    /// A fresh, empty database.
    #[derive(Clone)]
    pub(crate) enum Db {
        Sqlite(Arc<tempfile::TempDir>),
        Postgres(Arc<Schema>),
    }

    /// A PostgreSQL schema made for one test, dropped after it.
    pub(crate) struct Schema {
        admin: String,
        name: String,
        config: postgres::Config,
    }

    impl Schema {
        /// The configuration the tests' stores connect with.
        pub(crate) fn config(&self) -> &postgres::Config {
            &self.config
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.admin, NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
            }
        }
    }

    /// Holds the write locks of the database as another process would, until dropped.
    pub(crate) enum Locker {
        Sqlite(#[allow(dead_code)] rusqlite::Connection),
        Postgres(#[allow(dead_code)] postgres::Client),
    }

    impl Db {
        pub(crate) fn try_open(&self) -> Result<Store, StoreError> {
            match self {
                Db::Sqlite(dir) => Store::open(&dir.path().join("sub/db.sqlite")),
                Db::Postgres(s) => Store::open_postgres_config(s.config.clone()),
            }
        }

        pub(crate) fn open(&self) -> Store {
            self.try_open().expect("the test database opens")
        }

        /// Runs SQL on a connection of its own, as an operator or another program would.
        pub(crate) fn exec(&self, sql: &str) {
            match self {
                Db::Sqlite(dir) => rusqlite::Connection::open(dir.path().join("sub/db.sqlite"))
                    .expect("opens")
                    .execute_batch(sql)
                    .expect("runs"),
                Db::Postgres(s) => {
                    let mut c = s.config.connect(NoTls).expect("connects");
                    c.batch_execute(sql).expect("runs");
                }
            }
        }

        pub(crate) fn lock(&self) -> Locker {
            match self {
                Db::Sqlite(dir) => {
                    let c = rusqlite::Connection::open(dir.path().join("sub/db.sqlite"))
                        .expect("opens");
                    c.busy_timeout(std::time::Duration::from_secs(5))
                        .expect("busy timeout");
                    c.execute_batch("BEGIN EXCLUSIVE").expect("locks");
                    Locker::Sqlite(c)
                }
                Db::Postgres(s) => {
                    let mut c = s.config.connect(NoTls).expect("connects");
                    c.batch_execute(
                        "BEGIN; LOCK TABLE calls, call_users, usage, webhook_outbox, meta \
                         IN ACCESS EXCLUSIVE MODE",
                    )
                    .expect("locks");
                    Locker::Postgres(c)
                }
            }
        }
    }

    /// The test server, if there is one; under CI there must be.
    pub(crate) fn postgres_url() -> Option<String> {
        match std::env::var(ENV) {
            Ok(u) if !u.is_empty() => Some(u),
            _ => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{ENV} is not set: CI runs every storage test on PostgreSQL too (scripts/test starts one)"
                );
                None
            }
        }
    }

    /// A fresh schema on the test server.
    pub(crate) fn postgres() -> Option<Db> {
        let admin = postgres_url()?;
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = postgres::Client::connect(&admin, NoTls).expect("the test PostgreSQL answers");
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .expect("creates a schema");
        let mut config: postgres::Config = admin.parse().expect("a connection string");
        config.options(&format!("-c search_path={name}"));
        Some(Db::Postgres(Arc::new(Schema {
            admin,
            name,
            config,
        })))
    }

    /// Runs `f` on a fresh SQLite database, then on a fresh PostgreSQL schema if there is a server.
    pub(crate) fn each(f: impl Fn(&Db)) {
        println!("backend: sqlite");
        f(&Db::Sqlite(Arc::new(tempfile::tempdir().expect("tempdir"))));
        if let Some(pg) = postgres() {
            println!("backend: postgres");
            f(&pg);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, mpsc};
    use std::time::Instant;

    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid")
    }

    fn record(id: &str, caller: &str, others: &[&str], t: u64) -> CallRecord {
        let mut users = vec![user(caller, caller, UserState::Accepted)];
        users.extend(others.iter().map(|o| user(o, caller, UserState::Received)));
        CallRecord {
            call_id: CallId::parse(id).expect("valid"),
            caller: uid(caller),
            mode: Mode::General,
            state: CallState::Started,
            extended_data: "x".into(),
            timeout_secs: 30,
            create_time: t,
            end_time: 0,
            end_reason: None,
            users,
        }
    }

    fn user(u: &str, inviter: &str, state: UserState) -> CallUserRecord {
        CallUserRecord {
            user_id: uid(u),
            state,
            extended_data: String::new(),
            inviter: uid(inviter),
            invite_extended_data: "x".into(),
            invite_time: 1,
            deadline: 2,
            accept_time: 0,
            leave_time: 0,
        }
    }

    use testdb::each;

    #[test]
    fn calls_round_trip_and_update_in_place() {
        each(|db| {
            let mut s = db.open();
            let mut c = record("c_1", "alice", &["bob", "carol"], 100);
            s.write_calls([&c]).expect("writes");
            assert_eq!(s.call(&c.call_id).expect("reads"), Some(c.clone()));
            c.users[1].state = UserState::Accepted;
            c.state = CallState::Ended;
            c.end_time = 200;
            c.end_reason = Some(EndReason::Completed);
            s.write_calls([&c]).expect("writes");
            assert_eq!(s.call(&c.call_id).expect("reads"), Some(c.clone()));
            assert!(s.started_calls().expect("reads").is_empty());
        });
    }

    #[test]
    fn user_history_pages_newest_first_without_gaps_or_repeats() {
        each(|db| {
            let mut s = db.open();
            let calls: Vec<CallRecord> = (0..25)
                .map(|i| record(&format!("c_{i}"), "alice", &["bob"], i))
                .collect();
            for c in &calls {
                s.write_calls([c]).expect("writes");
            }
            s.write_calls([&record("c_other", "carol", &["dave"], 99)])
                .expect("writes");
            let mut seen = Vec::new();
            let mut flag = 0;
            loop {
                let page = s.user_calls(&uid("bob"), 10, flag).expect("reads");
                seen.extend(page.calls.iter().map(|c| c.call_id.to_string()));
                if page.next_flag == 0 {
                    break;
                }
                flag = page.next_flag;
            }
            let want: Vec<String> = (0..25).rev().map(|i| format!("c_{i}")).collect();
            assert_eq!(seen, want);
            assert_eq!(
                s.user_calls(&uid("alice"), 100, 0)
                    .expect("reads")
                    .calls
                    .len(),
                25
            );
            assert!(
                s.user_calls(&uid("zed"), 5, 0)
                    .expect("reads")
                    .calls
                    .is_empty()
            );
        });
    }

    #[test]
    fn admin_filters_by_state_and_user() {
        each(|db| {
            let mut s = db.open();
            let mut ended = record("c_e", "alice", &["bob"], 1);
            ended.state = CallState::Ended;
            ended.end_reason = Some(EndReason::Rejected);
            s.write_calls([&ended, &record("c_s", "carol", &["bob"], 2)])
                .expect("writes");
            let f = |state, user: Option<&str>| CallFilter {
                state,
                user_id: user.map(uid),
                limit: 10,
            };
            assert_eq!(s.list_calls(&f(None, None)).expect("reads").len(), 2);
            let started = s
                .list_calls(&f(Some(CallState::Started), None))
                .expect("reads");
            assert_eq!(started[0].call_id.as_str(), "c_s");
            assert_eq!(
                s.list_calls(&f(None, Some("alice"))).expect("reads").len(),
                1
            );
            assert_eq!(
                s.list_calls(&f(Some(CallState::Ended), Some("bob")))
                    .expect("reads")[0]
                    .call_id
                    .as_str(),
                "c_e"
            );
        });
    }

    #[test]
    fn usage_intervals_are_written_once() {
        each(|db| {
            let mut s = db.open();
            let row = UsageRecord {
                call_id: CallId::parse("c_1").expect("valid"),
                user_id: uid("bob"),
                tier: "hd".into(),
                start_ms: 1000,
                end_ms: 11_000,
            };
            assert_eq!(
                s.write_usage(std::slice::from_ref(&row)).expect("writes"),
                1
            );
            assert_eq!(
                s.write_usage(std::slice::from_ref(&row)).expect("writes"),
                0
            );
            assert_eq!(
                s.usage(0, 2000, None, None).expect("reads"),
                vec![UsageRow::from(&row)]
            );
            assert!(
                s.usage(11_000, 20_000, None, None)
                    .expect("reads")
                    .is_empty()
            );
            assert!(
                s.usage(0, 20_000, None, Some(&uid("x")))
                    .expect("reads")
                    .is_empty()
            );
        });
    }

    #[test]
    fn outbox_keeps_events_until_delivered() {
        each(|db| {
            let mut s = db.open();
            s.set_webhook_urls(vec!["http://a".into()]);
            let e1 = crate::webhooks::event("call_started", 10, serde_json::json!({}));
            let e2 = crate::webhooks::event("call_ended", 10, serde_json::json!({}));
            s.enqueue_webhooks(&[e1.clone(), e2], 10).expect("enqueues");
            // The same event is queued once.
            s.enqueue_webhooks(&[e1], 10).expect("enqueues");
            let due = s.due_webhooks(10, 10).expect("reads");
            assert_eq!(due.len(), 2);
            s.webhook_retry(due[0].seq, 1000, 1, 1).expect("updates");
            s.webhook_delivered(due[1].seq).expect("deletes");
            assert!(s.due_webhooks(999, 10).expect("reads").is_empty());
            let again = s.due_webhooks(1000, 10).expect("reads");
            assert_eq!(again[0].attempts, 1);
            assert_eq!(s.webhook_backlog().expect("counts"), 1);
        });
    }

    #[test]
    fn a_dead_letter_leaves_the_outbox_with_its_counts_and_the_newest_are_kept() {
        each(|db| {
            let mut s = db.open();
            s.max_dead = 3;
            s.set_webhook_urls(vec!["http://a".into()]);
            let events: Vec<_> = (0..5)
                .map(|i| crate::webhooks::event("call_started", i, serde_json::json!({ "n": i })))
                .collect();
            s.enqueue_webhooks(&events, 10).expect("enqueues");
            let due = s.due_webhooks(10, 10).expect("reads");
            assert_eq!(due.len(), 5);
            assert!(
                s.webhook_dead(due[0].seq, 4, 3, "max_attempts", 50)
                    .expect("moves")
            );
            // A row already gone is not moved twice.
            assert!(
                !s.webhook_dead(due[0].seq, 4, 3, "max_attempts", 50)
                    .expect("runs")
            );
            let dead = s.dead_webhooks(10).expect("reads");
            assert_eq!(dead.len(), 1);
            assert_eq!(
                (
                    dead[0].attempts,
                    dead[0].refusals,
                    dead[0].created_at,
                    dead[0].dead_at
                ),
                (4, 3, 10, 50)
            );
            assert_eq!(dead[0].reason, "max_attempts");
            assert_eq!(dead[0].event_id, due[0].event_id);
            assert_eq!(s.webhook_backlog().expect("counts"), 4);
            for r in &due[1..] {
                s.webhook_dead(r.seq, 1, 0, "max_age", 60).expect("moves");
            }
            // Only the newest three are kept, newest first.
            assert_eq!(s.dead_webhook_count().expect("counts"), 3);
            let kept: Vec<String> = s
                .dead_webhooks(10)
                .expect("reads")
                .into_iter()
                .map(|d| d.event_id)
                .collect();
            let want: Vec<String> = due[2..].iter().rev().map(|r| r.event_id.clone()).collect();
            assert_eq!(kept, want);
            assert_eq!(s.webhook_backlog().expect("counts"), 0);
            // The body serialises as the JSON delivered, not as a string.
            let v =
                serde_json::to_value(&s.dead_webhooks(1).expect("reads")[0]).expect("serialises");
            assert_eq!(v["body"]["event"], "call_started");
        });
    }

    #[test]
    fn outbox_rows_of_receivers_taken_out_of_the_config_are_dropped() {
        each(|db| {
            let mut s = db.open();
            s.set_webhook_urls(vec!["http://a".into(), "http://b".into()]);
            let e = crate::webhooks::event("call_started", 1, serde_json::json!({}));
            s.enqueue_webhooks(&[e], 10).expect("enqueues");
            assert_eq!(s.webhook_backlog().expect("counts"), 2);
            s.set_webhook_urls(vec!["http://b".into()]);
            assert_eq!(s.drop_unconfigured_webhooks().expect("drops"), 1);
            let left = s.due_webhooks(10, 10).expect("reads");
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].url, "http://b");
            // Nothing configured: everything goes.
            s.set_webhook_urls(Vec::new());
            assert_eq!(s.drop_unconfigured_webhooks().expect("drops"), 1);
            assert_eq!(s.webhook_backlog().expect("counts"), 0);
        });
    }

    #[test]
    fn an_outbox_of_an_older_version_gains_the_refusal_counts_and_the_dead_letters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.sqlite");
        {
            let c = rusqlite::Connection::open(&path).expect("opens");
            c.execute_batch(
                "CREATE TABLE webhook_outbox (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,
                    url TEXT NOT NULL, body TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL,
                    UNIQUE (event_id, url));
                 INSERT INTO webhook_outbox (event_id, url, body, attempts, next_attempt)
                 VALUES ('e1', 'http://a', '{}', 2, 777);",
            )
            .expect("old schema");
        }
        let mut s = Store::open(&path).expect("migrates");
        s.set_webhook_urls(vec!["http://a".into()]);
        let due = s.due_webhooks(1000, 10).expect("reads");
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].attempts, due[0].refusals), (2, 0));
        // Its age counts from when it was first due.
        assert!(
            s.webhook_dead(due[0].seq, 3, 0, "max_age", 900)
                .expect("moves")
        );
        assert_eq!(s.dead_webhooks(1).expect("reads")[0].created_at, 777);
    }

    #[test]
    fn the_thread_commits_before_continuations_run_in_order() {
        each(|db| {
            let (t, handle) = StoreThread::spawn(db.open());
            let (tx, rx) = mpsc::channel();
            for i in 0..50u64 {
                let c = record(&format!("c_{i}"), "alice", &["bob"], i);
                let tx = tx.clone();
                let db = db.clone();
                t.submit(Job::Calls(
                    vec![c],
                    Vec::new(),
                    Some(Box::new(move |stored| {
                        assert_eq!(stored, Ok(()));
                        // Another connection sees the row: it was committed before this ran.
                        let mut other = db.open();
                        let found = other
                            .call(&CallId::parse(&format!("c_{i}")).expect("valid"))
                            .expect("reads")
                            .is_some();
                        let _ = tx.send((i, found));
                    })),
                ))
                .expect("queued");
            }
            drop(t);
            handle.join().expect("thread ends");
            let got: Vec<(u64, bool)> = rx.try_iter().collect();
            assert_eq!(got.len(), 50);
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, (j, found))| *j == i as u64 && *found)
            );
        });
    }

    struct Recorded(mpsc::Sender<Vec<(CallId, Option<CallRecord>)>>);

    impl Restorer for Recorded {
        fn restore(&self, calls: Vec<(CallId, Option<CallRecord>)>) {
            let _ = self.0.send(calls);
        }
    }

    fn outcome(t: &StoreThread, c: CallRecord) -> Result<(), Unavailable> {
        let (tx, rx) = mpsc::channel();
        t.submit(Job::Calls(
            vec![c],
            Vec::new(),
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        ))
        .expect("queued");
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("answered")
    }

    #[test]
    fn a_write_to_a_locked_database_fails_after_the_timeout_and_is_restored() {
        each(|db| {
            let (t, handle) =
                StoreThread::spawn_with(db.open(), std::time::Duration::from_millis(600));
            let (restored_tx, restored) = mpsc::channel();
            t.set_restorer(Box::new(Recorded(restored_tx)));
            assert_eq!(outcome(&t, record("c_1", "alice", &["bob"], 1)), Ok(()));

            let locker = db.lock();
            let started = Instant::now();
            let mut changed = record("c_1", "alice", &["bob"], 1);
            changed.state = CallState::Ended;
            let fresh = record("c_2", "alice", &["carol"], 2);
            assert!(
                outcome(&t, changed).is_err(),
                "an unstored change is not ok"
            );
            assert!(
                started.elapsed() >= std::time::Duration::from_millis(500),
                "retried first"
            );
            assert!(!t.healthy());
            // The core is told to put c_1 back as committed (started).
            let back = restored
                .recv_timeout(std::time::Duration::from_secs(1))
                .expect("restore");
            assert_eq!(back.len(), 1);
            assert_eq!(back[0].0.as_str(), "c_1");
            assert_eq!(
                back[0].1.as_ref().map(|r| r.state),
                Some(CallState::Started)
            );
            t.submit(Job::Restored(vec![back[0].0.clone()]))
                .expect("queued");
            // While down, a change fails at once, and a call never committed is to be forgotten.
            let quick = Instant::now();
            assert!(outcome(&t, fresh.clone()).is_err());
            assert!(
                quick.elapsed() < std::time::Duration::from_millis(400),
                "fails fast while down"
            );
            let back = restored
                .recv_timeout(std::time::Duration::from_secs(1))
                .expect("restore");
            assert_eq!(back[0].0.as_str(), "c_2");
            assert!(back[0].1.is_none());
            t.submit(Job::Restored(vec![back[0].0.clone()]))
                .expect("queued");

            drop(locker);
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while !t.healthy() {
                assert!(
                    Instant::now() < deadline,
                    "a probe write finds storage working again"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(outcome(&t, fresh), Ok(()));
            drop(t);
            handle.join().expect("thread ends");
            let mut s = db.open();
            let c1 = s
                .call(&CallId::parse("c_1").expect("valid"))
                .expect("reads");
            assert_eq!(
                c1.map(|c| c.state),
                Some(CallState::Started),
                "the failed end was not written"
            );
            assert!(
                s.call(&CallId::parse("c_2").expect("valid"))
                    .expect("reads")
                    .is_some()
            );
        });
    }

    #[test]
    fn ledger_segments_written_while_locked_are_kept_and_stored_once_it_works() {
        each(|db| {
            let (t, handle) =
                StoreThread::spawn_with(db.open(), std::time::Duration::from_millis(300));
            let locker = db.lock();
            let seg = |s: u64, e: u64| UsageRecord {
                call_id: CallId::parse("c_1").expect("valid"),
                user_id: uid("bob"),
                tier: "hd".into(),
                start_ms: s,
                end_ms: e,
            };
            // Checkpoints of one interval while the database is locked.
            for i in 0..5 {
                t.submit(Job::Usage(vec![seg(1000 * i, 1000 * (i + 1))], Vec::new()))
                    .expect("queued");
            }
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while t.healthy() {
                assert!(
                    Instant::now() < deadline,
                    "the failed write marks storage down"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            t.submit(Job::Usage(vec![seg(5000, 6000)], Vec::new()))
                .expect("queued");
            drop(locker);
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while !t.healthy() {
                assert!(Instant::now() < deadline, "storage recovers");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            drop(t);
            handle.join().expect("thread ends");
            let rows = db.open().usage(0, u64::MAX, None, None).expect("reads");
            assert_eq!(
                rows.iter().map(|r| r.ms).sum::<u64>(),
                6000,
                "no billed time lost"
            );
            assert_eq!(rows.len(), 1, "contiguous segments were merged: {rows:?}");
        });
    }

    #[test]
    fn the_wal_is_checkpointed_in_the_background_while_the_thread_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).expect("opens");
        // Switching to WAL wrote the header page; the schema and everything after is in the WAL.
        let opened_len = std::fs::metadata(&path).expect("file").len();
        let (t, handle) = StoreThread::spawn(store);
        for i in 0..20u64 {
            let c = record(&format!("c_{i}"), "alice", &["bob"], i);
            t.submit(Job::Calls(vec![c], Vec::new(), None))
                .expect("queued");
        }
        // Commits never checkpoint (wal_autocheckpoint = 0), so the database file grows only when
        // the checkpointer copies the WAL into it.
        let main_file_len = || std::fs::metadata(&path).map_or(0, |m| m.len());
        let until = Instant::now() + std::time::Duration::from_secs(10);
        while main_file_len() <= opened_len && Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let len = main_file_len();
        drop(t);
        handle.join().expect("thread ends");
        assert!(
            len > opened_len,
            "the checkpointer never wrote the database file ({len} bytes)"
        );
        let calls = Store::open(&path)
            .expect("opens")
            .list_calls(&CallFilter {
                limit: 100,
                ..CallFilter::default()
            })
            .expect("reads");
        assert_eq!(calls.len(), 20);
    }

    #[test]
    fn pruning_deletes_only_calls_that_ended_before_the_cutoff() {
        each(|db| {
            let mut s = db.open();
            let ended = |id: &str, end: u64| {
                let mut c = record(id, "alice", &["bob"], end - 10);
                c.state = CallState::Ended;
                c.end_time = end;
                c.end_reason = Some(EndReason::Ended);
                c
            };
            let old_running = record("c_running", "alice", &["carol"], 5);
            s.write_calls(&[
                ended("c_old1", 100),
                ended("c_old2", 200),
                ended("c_old3", 300),
                ended("c_new", 1_000),
                old_running,
            ])
            .expect("writes");
            s.write_usage(&[UsageRecord {
                call_id: CallId::parse("c_old1").expect("valid"),
                user_id: uid("bob"),
                start_ms: 90,
                end_ms: 100,
                tier: "hd".into(),
            }])
            .expect("usage");

            // At most `limit` at a time, oldest first.
            assert_eq!(s.prune_history(500, 2).expect("prunes"), 2);
            let id = |i: &str| CallId::parse(i).expect("valid");
            assert!(s.call(&id("c_old1")).expect("reads").is_none());
            assert!(s.call(&id("c_old2")).expect("reads").is_none());
            assert!(s.call(&id("c_old3")).expect("reads").is_some());
            assert_eq!(s.prune_history(500, 100).expect("prunes"), 1);
            assert_eq!(s.prune_history(500, 100).expect("prunes"), 0);

            // Newer calls and calls in progress stay, whatever their age; so do their users.
            let new = s.call(&id("c_new")).expect("reads").expect("kept");
            assert_eq!(new.users.len(), 2);
            let running = s.call(&id("c_running")).expect("reads").expect("kept");
            assert_eq!(running.state, CallState::Started);
            // The users of deleted calls are gone: bob's history holds only the call that is left.
            let bob = s
                .user_calls(&uid("bob"), 100, 0)
                .expect("reads")
                .calls
                .into_iter()
                .map(|c| c.call_id.as_str().to_owned())
                .collect::<Vec<_>>();
            assert_eq!(bob, vec!["c_new".to_owned()]);
            // The billing ledger is not history: it stays.
            assert_eq!(s.usage(0, u64::MAX, None, None).expect("reads").len(), 1);
        });
    }

    #[test]
    fn finding_old_calls_reads_the_index_not_the_whole_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        drop(Store::open(&path).expect("opens"));
        let conn = rusqlite::Connection::open(&path).expect("opens");
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", sqlite::OLD_ENDED_CALLS))
            .expect("explains")
            .query_map(rusqlite::params![500, 10], |r| r.get(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            plan.iter().any(|d| d.contains("calls_ended"))
                && !plan.iter().any(|d| d.starts_with("SCAN")),
            "{plan:?}"
        );
    }

    #[test]
    fn a_database_of_a_release_before_versioning_migrates_and_keeps_its_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.sqlite");
        {
            // Version 1's tables as a release before schema versions made them, with a call.
            let c = rusqlite::Connection::open(&path).expect("opens");
            c.execute_batch(sqlite::MIGRATIONS[0]).expect("old schema");
            c.execute_batch(
                "INSERT INTO calls (call_id, caller, mode, state, extended_data, timeout_secs, \
                 create_time, end_time) VALUES ('c_old', 'alice', 'general', 'started', '', 30, 5, 0);",
            )
            .expect("old row");
        }
        let mut s = Store::open(&path).expect("migrates");
        assert_eq!(
            s.schema_version().expect("reads"),
            sqlite::MIGRATIONS.len() as u32
        );
        let started = s.started_calls().expect("reads");
        assert_eq!(started.len(), 1, "a single node takes back its calls");
        assert_eq!(started[0].call_id.as_str(), "c_old");
    }

    #[test]
    fn a_node_restores_only_its_own_started_calls() {
        each(|db| {
            let mut a = db.open();
            a.set_node("node-a");
            let mut b = db.open();
            b.set_node("node-b");
            a.write_calls([&record("c_a", "alice", &["bob"], 1)])
                .expect("writes");
            b.write_calls([&record("c_b", "carol", &["dave"], 2)])
                .expect("writes");
            let mut again = db.open();
            again.set_node("node-a");
            let mine: Vec<String> = again
                .started_calls()
                .expect("reads")
                .into_iter()
                .map(|c| c.call_id.as_str().to_owned())
                .collect();
            assert_eq!(mine, vec!["c_a".to_owned()]);
            // The history is shared: either node reads the other's call.
            assert!(
                again
                    .call(&CallId::parse("c_b").expect("valid"))
                    .expect("reads")
                    .is_some()
            );
        });
    }

    #[test]
    fn a_database_migrated_by_a_newer_release_is_refused() {
        each(|db| {
            let mut s = db.open();
            let known = s.known_schema_version();
            assert_eq!(s.schema_version().expect("reads"), known);
            drop(s);
            // Opening again applies nothing twice.
            let mut s = db.open();
            assert_eq!(s.schema_version().expect("reads"), known);
            drop(s);
            db.exec(&format!(
                "INSERT INTO schema_version (version, applied_at) VALUES ({}, 0)",
                known + 1
            ));
            match db.try_open() {
                Err(StoreError::SchemaTooNew { found, known: k }) => {
                    assert_eq!((found, k), (known + 1, known));
                }
                other => panic!("a newer schema was not refused: {other:?}"),
            }
        });
    }

    #[test]
    fn two_writers_of_the_same_ledger_segments_bill_them_once() {
        each(|db| {
            let rows: Vec<UsageRecord> = (0..200u64)
                .map(|i| UsageRecord {
                    call_id: CallId::parse(&format!("c_{}", i % 7)).expect("valid"),
                    user_id: uid("bob"),
                    tier: "hd".into(),
                    start_ms: i * 1000,
                    end_ms: i * 1000 + 1000,
                })
                .collect();
            let written: usize = std::thread::scope(|scope| {
                let writers: Vec<_> = (0..2)
                    .map(|_| {
                        let rows = &rows;
                        let mut s = db.open();
                        scope.spawn(move || {
                            rows.chunks(20)
                                .map(|chunk| s.write_usage(chunk).expect("writes"))
                                .sum::<usize>()
                        })
                    })
                    .collect();
                writers.into_iter().map(|w| w.join().expect("writer")).sum()
            });
            assert_eq!(written, 200, "each segment is new to exactly one writer");
            let stored = db.open().usage(0, u64::MAX, None, None).expect("reads");
            assert_eq!(stored.len(), 200);
            assert_eq!(stored.iter().map(|r| r.ms).sum::<u64>(), 200_000);
        });
    }

    #[test]
    fn one_node_at_a_time_delivers_a_receivers_webhooks_in_order() {
        let Some(db) = testdb::postgres() else {
            return;
        };
        let urls = vec!["http://a".to_owned(), "http://b".to_owned()];
        let mut first = db.open();
        first.set_webhook_urls(urls.clone());
        let mut second = db.open();
        second.set_webhook_urls(urls.clone());
        let events: Vec<_> = (0..3)
            .map(|i| crate::webhooks::event("call_started", i, serde_json::json!({ "n": i })))
            .collect();
        second.enqueue_webhooks(&events, 10).expect("enqueues");
        let got = first.due_webhooks_per_url(10, 10).expect("reads");
        assert_eq!(got.len(), 6, "both receivers' queues, whoever queued them");
        for url in &urls {
            let ids: Vec<&str> = got
                .iter()
                .filter(|r| &r.url == url)
                .map(|r| r.event_id.as_str())
                .collect();
            let want: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, want, "queue order for {url}");
        }
        assert!(
            second
                .due_webhooks_per_url(10, 10)
                .expect("reads")
                .is_empty(),
            "the other node delivers none while the first holds the receivers"
        );
        // The first node goes away (its connection ends): the second takes the receivers over.
        drop(first);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let n = second.due_webhooks_per_url(10, 10).expect("reads").len();
            if n == 6 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the receivers were not handed over"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A TCP relay to the test PostgreSQL's Unix socket that can be cut, as a network can.
    struct Relay {
        port: u16,
        cut: Arc<std::sync::atomic::AtomicBool>,
        open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    }

    impl Relay {
        fn start(socket: std::path::PathBuf) -> Relay {
            use std::sync::atomic::Ordering;
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
            let port = l.local_addr().expect("addr").port();
            let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let open = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (c, o) = (Arc::clone(&cut), Arc::clone(&open));
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(tcp) = conn else { continue };
                    if c.load(Ordering::SeqCst) {
                        let _ = tcp.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    let Ok(unix) = std::os::unix::net::UnixStream::connect(&socket) else {
                        continue;
                    };
                    let (Ok(tcp2), Ok(unix2)) = (tcp.try_clone(), unix.try_clone()) else {
                        continue;
                    };
                    if let Ok(t) = tcp.try_clone() {
                        o.lock().expect("lock").push(t);
                    }
                    let (mut r1, mut w1) = (tcp, unix);
                    let (mut r2, mut w2) = (unix2, tcp2);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r1, &mut w1);
                        let _ = w1.shutdown(std::net::Shutdown::Both);
                    });
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r2, &mut w2);
                        let _ = w2.shutdown(std::net::Shutdown::Both);
                    });
                }
            });
            Relay { port, cut, open }
        }

        /// Breaks every connection and refuses new ones (until `resume`).
        fn cut(&self) {
            self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
            for s in self.open.lock().expect("lock").drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }

        fn resume(&self) {
            self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn while_postgres_is_unreachable_changes_are_refused_and_it_reconnects_when_back() {
        let Some(db) = testdb::postgres() else {
            return;
        };
        let testdb::Db::Postgres(schema) = &db else {
            unreachable!("postgres() gives a PostgreSQL database")
        };
        let direct = schema.config();
        let socket = match direct.get_hosts().first() {
            Some(::postgres::config::Host::Unix(dir)) => dir.join(format!(
                ".s.PGSQL.{}",
                direct.get_ports().first().copied().unwrap_or(5432)
            )),
            other => panic!("the test server is reached over a Unix socket, not {other:?}"),
        };
        let relay = Relay::start(socket);
        let mut via = ::postgres::Config::new();
        via.host("127.0.0.1")
            .port(relay.port)
            .user(direct.get_user().unwrap_or("postgres"))
            .dbname(direct.get_dbname().unwrap_or("postgres"))
            .options(direct.get_options().unwrap_or(""));
        let (t, handle) = StoreThread::spawn_with(
            Store::open_postgres_config(via).expect("connects through the relay"),
            std::time::Duration::from_millis(600),
        );
        let (restored_tx, restored) = mpsc::channel();
        t.set_restorer(Box::new(Recorded(restored_tx)));
        assert_eq!(outcome(&t, record("c_1", "alice", &["bob"], 1)), Ok(()));

        relay.cut();
        let mut ended = record("c_1", "alice", &["bob"], 1);
        ended.state = CallState::Ended;
        let started = Instant::now();
        assert!(
            outcome(&t, ended).is_err(),
            "a change the database never got is not ok"
        );
        // Each attempt fails at once (the connection is refused), so the backoff alone spaces them:
        // 25 + 50 + 100 + 200 ms before the next pause would pass the 600 ms timeout.
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(300),
            "retried first"
        );
        assert!(!t.healthy());
        let back = restored
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("restore");
        assert_eq!(back[0].0.as_str(), "c_1");
        t.submit(Job::Restored(vec![back[0].0.clone()]))
            .expect("queued");
        // Billed time while it is down is kept, and written once it is back.
        t.submit(Job::Usage(
            vec![UsageRecord {
                call_id: CallId::parse("c_1").expect("valid"),
                user_id: uid("bob"),
                tier: "hd".into(),
                start_ms: 0,
                end_ms: 5000,
            }],
            Vec::new(),
        ))
        .expect("queued");

        relay.resume();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !t.healthy() {
            assert!(Instant::now() < deadline, "the store reconnects");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(outcome(&t, record("c_2", "alice", &["carol"], 2)), Ok(()));
        drop(t);
        handle.join().expect("thread ends");
        let mut s = db.open();
        assert_eq!(
            s.call(&CallId::parse("c_1").expect("valid"))
                .expect("reads")
                .map(|c| c.state),
            Some(CallState::Started),
            "the refused end was not written"
        );
        assert!(
            s.call(&CallId::parse("c_2").expect("valid"))
                .expect("reads")
                .is_some()
        );
        assert_eq!(
            s.usage(0, u64::MAX, None, None)
                .expect("reads")
                .iter()
                .map(|r| r.ms)
                .sum::<u64>(),
            5000
        );
    }

    #[test]
    fn a_postgres_url_is_told_apart_from_nonsense() {
        assert_eq!(backend_of("").expect("empty"), Kind::Sqlite);
        assert_eq!(
            backend_of("postgres://sb:pw@127.0.0.1:5432/sb").expect("url"),
            Kind::Postgres
        );
        assert_eq!(
            backend_of("host=/run/postgresql dbname=sb").expect("key=value"),
            Kind::Postgres
        );
        let e = backend_of("mysql://x").expect_err("not postgres");
        assert!(e.to_string().contains("postgres://"), "{e}");
        assert!(backend_of("postgres://sb@host:notaport/db").is_err());
    }

    #[test]
    fn an_unreachable_postgres_fails_to_open_with_a_clear_error() {
        // A port nothing listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("binds")
            .local_addr()
            .expect("addr")
            .port();
        let e = Store::open_postgres(&format!("postgres://sb@127.0.0.1:{port}/sb"))
            .expect_err("nothing listens");
        assert!(matches!(e, StoreError::Postgres(_)), "{e:?}");
    }
}
