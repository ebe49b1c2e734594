//! The embedded store: one SQLite file (WAL) holding call history, the billing ledger and the webhook
//! outbox. `switchboard serve` needs nothing else running.
//!
//! [`Store`] is the synchronous database. The server owns it on one thread, [`StoreThread`], which takes
//! jobs in order, writes a whole batch of them in one transaction (group commit), and only then runs each
//! job's continuation. Continuations deliver the events and replies of the ops that caused the writes,
//! so nothing a client sees can be lost to a crash: a reply is sent after its change is committed.
//! Commits use `synchronous = NORMAL`: a committed transaction survives the process being killed
//! (kill -9); only a power cut can lose the last few. Commits never checkpoint: a second thread
//! with its own connection copies the WAL into the main file (and fsyncs) in the background, so a
//! checkpoint's fsync never holds up the replies waiting for a commit.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::billing::{UsageRecord, UsageRow};
use crate::ids::{CallId, UserId};
use crate::signaling::wire::{CallState, EndReason, Mode, UserState};
use crate::signaling::{CallRecord, CallUserRecord};
use crate::webhooks::OutboxEvent;

mod writer;
pub use writer::{Continuation, Job, PROBE_EVERY, Restorer, StoreThread, Unavailable};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS calls (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id       TEXT NOT NULL UNIQUE,
    caller        TEXT NOT NULL,
    mode          TEXT NOT NULL,
    state         TEXT NOT NULL,
    extended_data TEXT NOT NULL,
    timeout_secs  INTEGER NOT NULL,
    create_time   INTEGER NOT NULL,
    end_time      INTEGER NOT NULL,
    end_reason    TEXT
);
CREATE INDEX IF NOT EXISTS calls_started ON calls(seq) WHERE state = 'started';
CREATE INDEX IF NOT EXISTS calls_ended ON calls(end_time) WHERE state = 'ended';
CREATE TABLE IF NOT EXISTS call_users (
    call_seq             INTEGER NOT NULL REFERENCES calls(seq),
    idx                  INTEGER NOT NULL,
    user_id              TEXT NOT NULL,
    state                TEXT NOT NULL,
    extended_data        TEXT NOT NULL,
    inviter              TEXT NOT NULL,
    invite_extended_data TEXT NOT NULL,
    invite_time          INTEGER NOT NULL,
    deadline             INTEGER NOT NULL,
    accept_time          INTEGER NOT NULL,
    leave_time           INTEGER NOT NULL,
    PRIMARY KEY (call_seq, user_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS call_users_by_user ON call_users(user_id, call_seq);
CREATE TABLE IF NOT EXISTS users (
    user_id   TEXT PRIMARY KEY,
    name      TEXT,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    call_id  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms   INTEGER NOT NULL,
    tier     TEXT NOT NULL,
    PRIMARY KEY (call_id, user_id, start_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_time ON usage(start_ms);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    url          TEXT NOT NULL,
    body         TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    refusals     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (event_id, url)
);
CREATE TABLE IF NOT EXISTS webhook_dead (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL,
    url        TEXT NOT NULL,
    body       TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    refusals   INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    dead_at    INTEGER NOT NULL,
    reason     TEXT NOT NULL
);
"#;

/// The oldest ended calls, through the `calls_ended` index (no scan of the history).
const OLD_ENDED_CALLS: &str =
    "SELECT seq FROM calls WHERE state = 'ended' AND end_time < ?1 ORDER BY end_time LIMIT ?2";

/// The database.
pub struct Store {
    conn: Connection,
    /// The last record written of each started call, with its row ID.
    written: HashMap<CallId, (i64, CallRecord)>,
    /// Webhook receivers: each queued event gets one outbox row per URL.
    webhook_urls: Vec<String>,
    /// Dead letters kept ([`MAX_DEAD_LETTERS`]; smaller in tests).
    max_dead: i64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // No checkpoint inside a commit: the checkpointer thread does it (see `StoreThread`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // When the WAL starts over, give back the disk a burst grew it to beyond 64 MiB.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate_outbox(&conn)?;
        conn.execute_batch(SCHEMA)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            conn,
            written: HashMap::new(),
            webhook_urls: Vec::new(),
            max_dead: MAX_DEAD_LETTERS,
        })
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
        let tx = self.conn.transaction()?;
        if !events.is_empty() && !self.webhook_urls.is_empty() {
            enqueue(&tx, events, &self.webhook_urls, now_ms)?;
        }
        insert_usage(&tx, usage)?;
        let mut written: Vec<(CallId, i64, &'a CallRecord)> = Vec::new();
        {
            let mut upsert_call = tx.prepare_cached(
                "INSERT INTO calls (call_id, caller, mode, state, extended_data, timeout_secs, \
                 create_time, end_time, end_reason) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9) \
                 ON CONFLICT(call_id) DO UPDATE SET state=excluded.state, end_time=excluded.end_time, \
                 end_reason=excluded.end_reason RETURNING seq",
            )?;
            let mut upsert_user = tx.prepare_cached(
                "INSERT INTO call_users (call_seq, idx, user_id, state, extended_data, inviter, \
                 invite_extended_data, invite_time, deadline, accept_time, leave_time) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11) \
                 ON CONFLICT(call_seq, user_id) DO UPDATE SET state=excluded.state, \
                 extended_data=excluded.extended_data, inviter=excluded.inviter, \
                 invite_extended_data=excluded.invite_extended_data, invite_time=excluded.invite_time, \
                 deadline=excluded.deadline, accept_time=excluded.accept_time, \
                 leave_time=excluded.leave_time",
            )?;
            for c in calls {
                let before = self.written.get(&c.call_id);
                if before.is_some_and(|(_, b)| b == c) {
                    continue;
                }
                let call_row_changed = before.is_none_or(|(_, b)| {
                    b.state != c.state || b.end_time != c.end_time || b.end_reason != c.end_reason
                });
                let seq: i64 = match before {
                    Some((seq, _)) if !call_row_changed => *seq,
                    _ => upsert_call.query_row(
                        params![
                            c.call_id.as_str(),
                            c.caller.as_str(),
                            c.mode.as_str(),
                            c.state.as_str(),
                            c.extended_data,
                            c.timeout_secs,
                            c.create_time as i64,
                            c.end_time as i64,
                            c.end_reason.map(EndReason::as_str),
                        ],
                        |r| r.get(0),
                    )?,
                };
                for (i, u) in c.users.iter().enumerate() {
                    if before.is_some_and(|(_, b)| b.users.get(i) == Some(u)) {
                        continue;
                    }
                    upsert_user.execute(params![
                        seq,
                        i as i64,
                        u.user_id.as_str(),
                        u.state.as_str(),
                        u.extended_data,
                        u.inviter.as_str(),
                        u.invite_extended_data,
                        u.invite_time as i64,
                        u.deadline as i64,
                        u.accept_time as i64,
                        u.leave_time as i64,
                    ])?;
                }
                written.push((c.call_id.clone(), seq, c));
            }
        }
        tx.commit()?;
        // Remember only after the commit, so a failed transaction is retried in full.
        for (id, seq, c) in written {
            if c.state == CallState::Started {
                self.written.insert(id, (seq, c.clone()));
            } else {
                self.written.remove(&id);
            }
        }
        Ok(())
    }

    /// Deletes up to `limit` calls that ended before `before_ms`, oldest first, with their users
    /// (history retention). Calls in progress are never deleted, whatever their age; the billing
    /// ledger and the webhook outbox are not touched. Returns how many calls were deleted.
    pub fn prune_history(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let seqs: Vec<i64> = {
            let mut old = tx.prepare_cached(OLD_ENDED_CALLS)?;
            old.query_map(params![before_ms as i64, limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        {
            let mut users = tx.prepare_cached("DELETE FROM call_users WHERE call_seq = ?1")?;
            let mut calls = tx.prepare_cached("DELETE FROM calls WHERE seq = ?1")?;
            for seq in &seqs {
                users.execute([seq])?;
                calls.execute([seq])?;
            }
        }
        tx.commit()?;
        Ok(seqs.len())
    }

    /// Every started call, for the core to restore after a restart. They are remembered as
    /// committed (see [`committed`](Self::committed)).
    pub fn started_calls(&mut self) -> Result<Vec<CallRecord>, StoreError> {
        let calls = self.calls_where("state = 'started'", [], usize::MAX)?;
        for c in &calls {
            if let Some(seq) = self.seq_of(&c.call_id)? {
                self.written.insert(c.call_id.clone(), (seq, c.clone()));
            }
        }
        Ok(calls)
    }

    fn seq_of(&self, id: &CallId) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT seq FROM calls WHERE call_id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?)
    }

    /// The last committed record of a started call (`None` for a call never committed, or whose
    /// end is committed), known without reading the database: it answers while the disk fails.
    pub fn committed(&self, id: &CallId) -> Option<&CallRecord> {
        self.written.get(id).map(|(_, c)| c)
    }

    /// A small write that tells whether writes work (while storage is failing).
    pub fn probe(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('probe', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute([now_ms.to_string()])?;
        Ok(())
    }

    /// One call by ID.
    pub fn call(&self, id: &CallId) -> Result<Option<CallRecord>, StoreError> {
        Ok(self
            .calls_where("call_id = ?1", [id.as_str()], 1)?
            .into_iter()
            .next())
    }

    /// Calls for the admin API, newest first.
    pub fn list_calls(&self, f: &CallFilter) -> Result<Vec<CallRecord>, StoreError> {
        let limit = f.limit.clamp(1, 1000);
        match (&f.state, &f.user_id) {
            (Some(s), Some(u)) => self.calls_where(
                "state = ?1 AND seq IN (SELECT call_seq FROM call_users WHERE user_id = ?2)",
                [s.as_str(), u.as_str()],
                limit,
            ),
            (Some(s), None) => self.calls_where("state = ?1", [s.as_str()], limit),
            (None, Some(u)) => self.calls_where(
                "seq IN (SELECT call_seq FROM call_users WHERE user_id = ?1)",
                [u.as_str()],
                limit,
            ),
            (None, None) => self.calls_where("1", [], limit),
        }
    }

    /// A user's calls, newest first, `count` at a time. `next_flag` 0 starts at the newest.
    pub fn user_calls(
        &self,
        user: &UserId,
        count: usize,
        next_flag: u64,
    ) -> Result<CallPage, StoreError> {
        let before = if next_flag == 0 {
            i64::MAX
        } else {
            i64::try_from(next_flag).unwrap_or(i64::MAX)
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT call_seq FROM call_users WHERE user_id = ?1 AND call_seq < ?2 \
             ORDER BY call_seq DESC LIMIT ?3",
        )?;
        let seqs: Vec<i64> = stmt
            .query_map(params![user.as_str(), before, (count + 1) as i64], |r| {
                r.get(0)
            })?
            .collect::<Result<_, _>>()?;
        let more = seqs.len() > count;
        let page: Vec<i64> = seqs.into_iter().take(count).collect();
        let mut calls = Vec::with_capacity(page.len());
        for seq in &page {
            if let Some(c) = self
                .calls_where("seq = ?1", [seq.to_string()], 1)?
                .into_iter()
                .next()
            {
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

    fn calls_where<P: rusqlite::Params>(
        &self,
        cond: &str,
        p: P,
        limit: usize,
    ) -> Result<Vec<CallRecord>, StoreError> {
        let sql = format!(
            "SELECT seq, call_id, caller, mode, state, extended_data, timeout_secs, create_time, \
             end_time, end_reason FROM calls WHERE {cond} ORDER BY seq DESC LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows: Vec<(i64, CallRecord)> = stmt
            .query_map(p, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    (
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, u32>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, i64>(8)?,
                        r.get::<_, Option<String>>(9)?,
                    ),
                ))
            })?
            .map(|row| {
                let (seq, (id, caller, mode, state, ext, timeout, create, end, reason)) = row?;
                let rec = CallRecord {
                    call_id: parse_id(&id)?,
                    caller: parse_id(&caller)?,
                    mode: match mode.as_str() {
                        "general" => Mode::General,
                        "advanced" => Mode::Advanced,
                        m => return Err(StoreError::Corrupt(format!("mode {m}"))),
                    },
                    state: match state.as_str() {
                        "started" => CallState::Started,
                        "ended" => CallState::Ended,
                        s => return Err(StoreError::Corrupt(format!("call state {s}"))),
                    },
                    extended_data: ext,
                    timeout_secs: timeout,
                    create_time: create as u64,
                    end_time: end as u64,
                    end_reason: match reason {
                        None => None,
                        Some(r) => Some(
                            EndReason::parse(&r)
                                .ok_or_else(|| StoreError::Corrupt(format!("reason {r}")))?,
                        ),
                    },
                    users: Vec::new(),
                };
                Ok((seq, rec))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut users_stmt = self.conn.prepare_cached(
            "SELECT user_id, state, extended_data, inviter, invite_extended_data, invite_time, \
             deadline, accept_time, leave_time FROM call_users WHERE call_seq = ?1 ORDER BY idx",
        )?;
        for (seq, mut rec) in rows {
            let users = users_stmt
                .query_map([seq], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, i64>(8)?,
                    ))
                })?
                .map(|row| {
                    let (u, st, ext, inviter, iext, it, dl, at, lt) = row?;
                    Ok(CallUserRecord {
                        user_id: parse_id(&u)?,
                        state: UserState::parse(&st)
                            .ok_or_else(|| StoreError::Corrupt(format!("user state {st}")))?,
                        extended_data: ext,
                        inviter: parse_id(&inviter)?,
                        invite_extended_data: iext,
                        invite_time: it as u64,
                        deadline: dl as u64,
                        accept_time: at as u64,
                        leave_time: lt as u64,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            rec.users = users;
            out.push(rec);
        }
        Ok(out)
    }

    /// Remembers a user's display name.
    pub fn remember_user(
        &mut self,
        user: &UserId,
        name: Option<&str>,
        now: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO users (user_id, name, last_seen) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(user_id) DO UPDATE SET name = coalesce(excluded.name, name), \
                 last_seen = excluded.last_seen",
            )?
            .execute(params![user.as_str(), name, now as i64])?;
        Ok(())
    }

    /// The last known display names of these users.
    pub fn user_names(&self, users: &[UserId]) -> Result<HashMap<UserId, String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM users WHERE user_id = ?1")?;
        let mut out = HashMap::new();
        for u in users {
            let name: Option<Option<String>> =
                stmt.query_row([u.as_str()], |r| r.get(0)).optional()?;
            if let Some(Some(n)) = name {
                out.insert(u.clone(), n);
            }
        }
        Ok(out)
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
        let tx = self.conn.transaction()?;
        if !events.is_empty() && !self.webhook_urls.is_empty() {
            enqueue(&tx, events, &self.webhook_urls, now_ms)?;
        }
        let n = insert_usage(&tx, rows)?;
        tx.commit()?;
        Ok(n)
    }

    /// Ledger intervals overlapping `[from_ms, to_ms)`, optionally for one call and/or user.
    pub fn usage(
        &self,
        from_ms: u64,
        to_ms: u64,
        call: Option<&CallId>,
        user: Option<&UserId>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT call_id, user_id, tier, start_ms, end_ms FROM usage \
             WHERE start_ms < ?2 AND end_ms > ?1 \
             AND (?3 IS NULL OR call_id = ?3) AND (?4 IS NULL OR user_id = ?4) \
             ORDER BY start_ms, call_id, user_id",
        )?;
        let rows = stmt
            .query_map(
                params![
                    from_ms as i64,
                    to_ms.min(i64::MAX as u64) as i64,
                    call.map(CallId::as_str),
                    user.map(UserId::as_str)
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )?
            .map(|row| {
                let (c, u, tier, s, e) = row?;
                Ok(UsageRow {
                    call_id: parse_id(&c)?,
                    user_id: parse_id(&u)?,
                    tier,
                    start_ms: s as u64,
                    end_ms: e as u64,
                    ms: (e - s).max(0) as u64,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(rows)
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
        let tx = self.conn.transaction()?;
        enqueue(&tx, events, &self.webhook_urls, now_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// The oldest undelivered event of each receiver that is due at `now`, at most `limit` per
    /// receiver, in queue order. An event not yet due holds back the receiver's later ones.
    pub fn due_webhooks_per_url(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut out = Vec::new();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE url = ?1 ORDER BY seq LIMIT ?2"
        ))?;
        for url in &self.webhook_urls {
            let rows: Vec<OutboxRow> = stmt
                .query_map(params![url, limit as i64], outbox_row)?
                .collect::<Result<_, _>>()?;
            for r in rows {
                if r.next_attempt_ms > now {
                    break;
                }
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Events due for delivery at `now`, oldest first.
    pub fn due_webhooks(&self, now: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE next_attempt <= ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![now as i64, limit as i64], outbox_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Removes a delivered event.
    pub fn webhook_delivered(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?
            .execute([seq])?;
        Ok(())
    }

    /// Schedules another attempt, with the counts after the one that failed.
    pub fn webhook_retry(
        &mut self,
        seq: i64,
        next_attempt_ms: u64,
        attempts: u32,
        refusals: u32,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE webhook_outbox SET attempts = ?3, refusals = ?4, next_attempt = ?2 \
                 WHERE seq = ?1",
            )?
            .execute(params![seq, next_attempt_ms as i64, attempts, refusals])?;
        Ok(())
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
        let tx = self.conn.transaction()?;
        let moved = tx
            .prepare_cached(
                "INSERT INTO webhook_dead \
                 (event_id, url, body, attempts, refusals, created_at, dead_at, reason) \
                 SELECT event_id, url, body, ?2, ?3, created_at, ?4, ?5 FROM webhook_outbox \
                 WHERE seq = ?1",
            )?
            .execute(params![seq, attempts, refusals, now_ms as i64, reason])?;
        tx.prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?
            .execute([seq])?;
        tx.prepare_cached(
            "DELETE FROM webhook_dead WHERE seq <= (SELECT max(seq) FROM webhook_dead) - ?1",
        )?
        .execute([self.max_dead])?;
        tx.commit()?;
        Ok(moved == 1)
    }

    /// The newest dead letters, newest first.
    pub fn dead_webhooks(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, event_id, url, body, attempts, refusals, created_at, dead_at, reason \
             FROM webhook_dead ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(DeadLetter {
                    seq: r.get(0)?,
                    event_id: r.get(1)?,
                    url: r.get(2)?,
                    body: r.get(3)?,
                    attempts: r.get(4)?,
                    refusals: r.get(5)?,
                    created_at: r.get::<_, i64>(6)? as u64,
                    dead_at: r.get::<_, i64>(7)? as u64,
                    reason: r.get(8)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Dead letters kept.
    pub fn dead_webhook_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM webhook_dead", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// Deletes outbox rows for receivers no longer in [`set_webhook_urls`](Self::set_webhook_urls)
    /// (nobody would ever deliver them). Returns how many.
    pub fn drop_unconfigured_webhooks(&mut self) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS configured_urls (url TEXT PRIMARY KEY); DELETE FROM configured_urls;")?;
        for url in &self.webhook_urls {
            tx.execute(
                "INSERT OR IGNORE INTO configured_urls (url) VALUES (?1)",
                [url],
            )?;
        }
        let n = tx.execute(
            "DELETE FROM webhook_outbox WHERE url NOT IN (SELECT url FROM configured_urls)",
            [],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Events waiting in the outbox.
    pub fn webhook_backlog(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM webhook_outbox", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// The database file, when it is one (not in memory).
    fn path(&self) -> Option<std::path::PathBuf> {
        self.conn
            .path()
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// Checkpoints the WAL into the main file (at shutdown).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

/// Databases made before dead letters: their outbox gains `refusals` and `created_at` (taken as the
/// row's next attempt, the closest time it knows).
fn migrate_outbox(conn: &Connection) -> Result<(), StoreError> {
    let has_table: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'webhook_outbox'",
        [],
        |r| r.get(0),
    )?;
    let has_column: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('webhook_outbox') WHERE name = 'refusals'",
        [],
        |r| r.get(0),
    )?;
    if has_table == 1 && has_column == 0 {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE webhook_outbox ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE webhook_outbox ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
             UPDATE webhook_outbox SET created_at = next_attempt;
             COMMIT;",
        )?;
    }
    Ok(())
}

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        seq: r.get(0)?,
        event_id: r.get(1)?,
        url: r.get(2)?,
        body: r.get(3)?,
        attempts: r.get(4)?,
        next_attempt_ms: r.get::<_, i64>(5)? as u64,
        refusals: r.get(6)?,
        created_ms: r.get::<_, i64>(7)? as u64,
    })
}

const OUTBOX_COLUMNS: &str =
    "seq, event_id, url, body, attempts, next_attempt, refusals, created_at";

fn enqueue(
    tx: &rusqlite::Transaction<'_>,
    events: &[OutboxEvent],
    urls: &[String],
    now_ms: u64,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO webhook_outbox (event_id, url, body, next_attempt, created_at) \
         VALUES (?1,?2,?3,?4,?4)",
    )?;
    for e in events {
        for url in urls {
            stmt.execute(params![e.id, url, e.body, now_ms as i64])?;
        }
    }
    Ok(())
}

/// Writes ledger segments; one already written (same call, user and start) is skipped, so a
/// segment retried after a failure is never billed twice. Returns how many were new.
fn insert_usage(tx: &rusqlite::Transaction<'_>, rows: &[UsageRecord]) -> Result<usize, StoreError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO usage (call_id, user_id, start_ms, end_ms, tier) \
         VALUES (?1,?2,?3,?4,?5)",
    )?;
    let mut n = 0;
    for r in rows {
        n += stmt.execute(params![
            r.call_id.as_str(),
            r.user_id.as_str(),
            r.start_ms as i64,
            r.end_ms as i64,
            r.tier
        ])?;
    }
    Ok(n)
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("id {s:?}")))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
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

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("sub/db.sqlite")).expect("opens");
        (dir, store)
    }

    #[test]
    fn calls_round_trip_and_update_in_place() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn user_history_pages_newest_first_without_gaps_or_repeats() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn admin_filters_by_state_and_user() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn usage_intervals_are_written_once() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn outbox_keeps_events_until_delivered() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn a_dead_letter_leaves_the_outbox_with_its_counts_and_the_newest_are_kept() {
        let (_d, mut s) = open();
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
        let v = serde_json::to_value(&s.dead_webhooks(1).expect("reads")[0]).expect("serialises");
        assert_eq!(v["body"]["event"], "call_started");
    }

    #[test]
    fn outbox_rows_of_receivers_taken_out_of_the_config_are_dropped() {
        let (_d, mut s) = open();
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
    }

    #[test]
    fn an_outbox_of_an_older_version_gains_the_refusal_counts_and_the_dead_letters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.sqlite");
        {
            let c = Connection::open(&path).expect("opens");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let (t, handle) = StoreThread::spawn(Store::open(&path).expect("opens"));
        let (tx, rx) = mpsc::channel();
        for i in 0..50u64 {
            let c = record(&format!("c_{i}"), "alice", &["bob"], i);
            let tx = tx.clone();
            let p = path.clone();
            t.submit(Job::Calls(
                vec![c],
                Vec::new(),
                Some(Box::new(move |stored| {
                    assert_eq!(stored, Ok(()));
                    // Another connection sees the row: it was committed before this ran.
                    let other = Store::open(&p).expect("opens");
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
    }

    /// Holds the database's write lock from another connection, as another process would.
    fn lock(path: &Path) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(path).expect("opens");
        c.busy_timeout(std::time::Duration::from_secs(5))
            .expect("busy timeout");
        c.execute_batch("BEGIN EXCLUSIVE").expect("locks");
        c
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
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let (t, handle) = StoreThread::spawn_with(
            Store::open(&path).expect("opens"),
            std::time::Duration::from_millis(600),
        );
        let (restored_tx, restored) = mpsc::channel();
        t.set_restorer(Box::new(Recorded(restored_tx)));
        assert_eq!(outcome(&t, record("c_1", "alice", &["bob"], 1)), Ok(()));

        let locker = lock(&path);
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
        let s = Store::open(&path).expect("opens");
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
    }

    #[test]
    fn ledger_segments_written_while_locked_are_kept_and_stored_once_it_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let (t, handle) = StoreThread::spawn_with(
            Store::open(&path).expect("opens"),
            std::time::Duration::from_millis(300),
        );
        let locker = lock(&path);
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
        let rows = Store::open(&path)
            .expect("opens")
            .usage(0, u64::MAX, None, None)
            .expect("reads");
        assert_eq!(
            rows.iter().map(|r| r.ms).sum::<u64>(),
            6000,
            "no billed time lost"
        );
        assert_eq!(rows.len(), 1, "contiguous segments were merged: {rows:?}");
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
        let (_dir, mut s) = open();
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
        // Finding old calls reads the index, not the whole history.
        let plan: Vec<String> = s
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {OLD_ENDED_CALLS}"))
            .expect("explains")
            .query_map(params![500, 10], |r| r.get(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            plan.iter().any(|d| d.contains("calls_ended"))
                && !plan.iter().any(|d| d.starts_with("SCAN")),
            "{plan:?}"
        );
    }
}
