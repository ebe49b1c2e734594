//! The embedded backend: one SQLite file in WAL mode.
//!
//! Commits use `synchronous = NORMAL`: a committed transaction survives the process being killed
//! (kill -9); only a power cut can lose the last few. Commits never checkpoint: the storage thread
//! runs a checkpointer with its own connection (see [`super::writer`]), so a checkpoint's fsync
//! never holds up the replies waiting for a commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Backend, Batch, CallFilter, DeadLetter, OutboxRow, RawCall, RawUser, StoreError, decode_call,
    decode_user,
};
use crate::billing::{UsageRecord, UsageRow};
use crate::ids::{CallId, UserId};
use crate::signaling::CallRecord;
use crate::signaling::wire::EndReason;
use crate::webhooks::OutboxEvent;

/// Versioned schema scripts: entry `i` takes a database from version `i` to `i + 1`. Applied in
/// order at open, each in its own transaction with the version it reaches. Never edit a released
/// entry; add one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the schema before versioning. Every statement only creates what is missing, so it also
    // takes a database of an earlier release (once `migrate_outbox` has given its outbox the
    // dead-letter columns) to version 1.
    r#"
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
"#,
    // 2: which node runs a started call, so a node restores only its own after a restart.
    r#"
ALTER TABLE calls ADD COLUMN node TEXT NOT NULL DEFAULT '';
DROP INDEX IF EXISTS calls_started;
CREATE INDEX calls_started ON calls(node, seq) WHERE state = 'started';
"#,
];

/// The oldest ended calls, through the `calls_ended` index (no scan of the history).
pub(super) const OLD_ENDED_CALLS: &str =
    "SELECT seq FROM calls WHERE state = 'ended' AND end_time < ?1 ORDER BY end_time LIMIT ?2";

const CALL_COLUMNS: &str = "seq, call_id, caller, mode, state, extended_data, timeout_secs, \
                            create_time, end_time, end_reason";

const OUTBOX_COLUMNS: &str =
    "seq, event_id, url, body, attempts, next_attempt, refusals, created_at";

/// The SQLite database.
pub(super) struct Sqlite {
    pub(super) conn: Connection,
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
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
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut db = Self { conn };
        db.migrate()?;
        db.conn.set_prepared_statement_cache_capacity(64);
        Ok(db)
    }

    /// The schema version: the highest in `schema_version`; 0 for an empty database and for one
    /// made before versioning (version 1 only creates what is missing, so it applies to both).
    fn version(&self) -> Result<u32, StoreError> {
        let versioned: i64 = self.conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            [],
            |r| r.get(0),
        )?;
        if versioned == 1 {
            let v: Option<i64> =
                self.conn
                    .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
            return u32::try_from(v.unwrap_or(0))
                .map_err(|_| StoreError::Corrupt(format!("schema version {v:?}")));
        }
        Ok(0)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        migrate_outbox(&self.conn)?;
        let found = self.version()?;
        super::check_version(found, MIGRATIONS.len())?;
        let tx = self.conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at INTEGER NOT NULL)",
        )?;
        for (i, script) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.execute_batch(script)?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                params![(i + 1) as i64, super::wall_ms() as i64],
            )?;
            tracing::info!(version = i + 1, "SQLite schema migrated");
        }
        tx.commit()?;
        Ok(())
    }

    fn calls_where<P: rusqlite::Params>(
        &self,
        cond: &str,
        p: P,
        limit: usize,
    ) -> Result<Vec<(i64, CallRecord)>, StoreError> {
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM calls WHERE {cond} ORDER BY seq DESC LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows: Vec<(i64, CallRecord)> = stmt
            .query_map(p, |r| {
                Ok(RawCall {
                    seq: r.get(0)?,
                    call_id: r.get(1)?,
                    caller: r.get(2)?,
                    mode: r.get(3)?,
                    state: r.get(4)?,
                    extended_data: r.get(5)?,
                    timeout_secs: r.get(6)?,
                    create_time: r.get(7)?,
                    end_time: r.get(8)?,
                    end_reason: r.get(9)?,
                })
            })?
            .map(|row| decode_call(row?))
            .collect::<Result<_, StoreError>>()?;
        let mut users_stmt = self.conn.prepare_cached(
            "SELECT user_id, state, extended_data, inviter, invite_extended_data, invite_time, \
             deadline, accept_time, leave_time FROM call_users WHERE call_seq = ?1 ORDER BY idx",
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, mut rec) in rows {
            rec.users = users_stmt
                .query_map([seq], |r| {
                    Ok(RawUser {
                        user_id: r.get(0)?,
                        state: r.get(1)?,
                        extended_data: r.get(2)?,
                        inviter: r.get(3)?,
                        invite_extended_data: r.get(4)?,
                        invite_time: r.get(5)?,
                        deadline: r.get(6)?,
                        accept_time: r.get(7)?,
                        leave_time: r.get(8)?,
                    })
                })?
                .map(|row| decode_user(row?))
                .collect::<Result<Vec<_>, StoreError>>()?;
            out.push((seq, rec));
        }
        Ok(out)
    }
}

impl Backend for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn write_batch(&mut self, b: &Batch<'_>) -> Result<(Vec<i64>, usize), StoreError> {
        let tx = self.conn.transaction()?;
        if !b.events.is_empty() && !b.urls.is_empty() {
            enqueue(&tx, b.events, b.urls, b.now_ms)?;
        }
        let n = insert_usage(&tx, b.usage)?;
        let mut seqs = Vec::with_capacity(b.calls.len());
        {
            let mut upsert_call = tx.prepare_cached(
                "INSERT INTO calls (call_id, caller, mode, state, extended_data, timeout_secs, \
                 create_time, end_time, end_reason, node) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10) \
                 ON CONFLICT(call_id) DO UPDATE SET state=excluded.state, end_time=excluded.end_time, \
                 end_reason=excluded.end_reason, node=excluded.node RETURNING seq",
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
            for w in &b.calls {
                let c = w.rec;
                let seq: i64 = match w.seq {
                    Some(seq) => seq,
                    None => upsert_call.query_row(
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
                            b.node,
                        ],
                        |r| r.get(0),
                    )?,
                };
                for &i in &w.users {
                    let Some(u) = c.users.get(i) else { continue };
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
                seqs.push(seq);
            }
        }
        tx.commit()?;
        Ok((seqs, n))
    }

    fn prune_history(&mut self, before_ms: u64, limit: usize) -> Result<usize, StoreError> {
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

    fn started_calls(&mut self, node: &str) -> Result<Vec<(i64, CallRecord)>, StoreError> {
        self.calls_where("state = 'started' AND node = ?1", [node], usize::MAX)
    }

    fn probe(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('probe', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute([now_ms.to_string()])?;
        Ok(())
    }

    fn call(&mut self, id: &CallId) -> Result<Option<CallRecord>, StoreError> {
        Ok(self
            .calls_where("call_id = ?1", [id.as_str()], 1)?
            .into_iter()
            .next()
            .map(|(_, c)| c))
    }

    fn list_calls(&mut self, f: &CallFilter, limit: usize) -> Result<Vec<CallRecord>, StoreError> {
        let rows = match (&f.state, &f.user_id) {
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
        }?;
        Ok(rows.into_iter().map(|(_, c)| c).collect())
    }

    fn user_call_seqs(
        &mut self,
        user: &UserId,
        before: i64,
        limit: usize,
    ) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT call_seq FROM call_users WHERE user_id = ?1 AND call_seq < ?2 \
             ORDER BY call_seq DESC LIMIT ?3",
        )?;
        let seqs = stmt
            .query_map(params![user.as_str(), before, limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(seqs)
    }

    fn call_by_seq(&mut self, seq: i64) -> Result<Option<CallRecord>, StoreError> {
        Ok(self
            .calls_where("seq = ?1", [seq], 1)?
            .into_iter()
            .next()
            .map(|(_, c)| c))
    }

    fn remember_user(
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

    fn user_names(&mut self, users: &[UserId]) -> Result<HashMap<UserId, String>, StoreError> {
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

    fn usage(
        &mut self,
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
                    from_ms.min(i64::MAX as u64) as i64,
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
                super::usage_row(&c, &u, tier, s, e)
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(rows)
    }

    fn due_webhooks_per_url(
        &mut self,
        urls: &[String],
        now: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let mut out = Vec::new();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE url = ?1 ORDER BY seq LIMIT ?2"
        ))?;
        for url in urls {
            let rows: Vec<OutboxRow> = stmt
                .query_map(params![url, limit as i64], outbox_row)?
                .collect::<Result<_, _>>()?;
            super::take_due(&mut out, rows, now);
        }
        Ok(out)
    }

    fn due_webhooks(&mut self, now: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM webhook_outbox WHERE next_attempt <= ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![now as i64, limit as i64], outbox_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn webhook_delivered(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM webhook_outbox WHERE seq = ?1")?
            .execute([seq])?;
        Ok(())
    }

    fn webhook_retry(
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

    fn webhook_dead(
        &mut self,
        seq: i64,
        attempts: u32,
        refusals: u32,
        reason: &str,
        now_ms: u64,
        keep: i64,
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
        .execute([keep])?;
        tx.commit()?;
        Ok(moved == 1)
    }

    fn dead_webhooks(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
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

    fn dead_webhook_count(&mut self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM webhook_dead", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    fn drop_unconfigured_webhooks(&mut self, urls: &[String]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS configured_urls (url TEXT PRIMARY KEY); DELETE FROM configured_urls;")?;
        for url in urls {
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

    fn webhook_backlog(&mut self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM webhook_outbox", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    fn schema_version(&mut self) -> Result<u32, StoreError> {
        self.version()
    }

    fn set_lock_timeout(&mut self, d: Duration) {
        if let Err(e) = self.conn.busy_timeout(d) {
            tracing::warn!(error = %e, "cannot set the database busy timeout");
        }
    }

    fn file(&self) -> Option<PathBuf> {
        self.conn
            .path()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    fn checkpoint(&mut self) -> Result<(), StoreError> {
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
