//! The storage thread: the one writer of the database, with group commit, and what it does when the
//! database fails.
//!
//! Jobs arrive in the core's order (the hub queues them under the core's lock). The thread takes a
//! batch, writes everything the batch changes in one transaction, and only then runs each job's
//! continuation with the outcome. A reply is sent from a continuation, so **no reply or event
//! claims a change that is not committed**.
//!
//! When a write fails (the file is locked by another process, the disk is full or failing), the
//! batch is retried with backoff for up to `[storage] write_timeout` while its clients wait. If it
//! still fails:
//! - every job of the batch that changed calls fails: its continuation gets [`Unavailable`] (the
//!   op is answered `unavailable`, its events are never sent), and the calls are put back in the core
//!   as last committed, through the [`Restorer`] the hub installs;
//! - ledger segments and webhook events not tied to a call change ([`Job::Usage`], [`Job::Events`])
//!   are kept, merged, and written with the first transaction that works again;
//! - storage is marked down ([`StoreThread::healthy`], `/readyz`, `switchboard_storage_up`): until a
//!   probe write succeeds (every [`PROBE_EVERY`]), changes to calls fail at once instead of waiting.
//!
//! Between a failed batch and the core's restore, later jobs may already be queued that were applied
//! on top of the undone changes. The calls being restored are *poisoned*: any job touching one fails
//! too (the restore undoes it as well), until the hub's [`Job::Restored`] marker, which it queues
//! under the core's lock right after restoring, says that later jobs build on the restored state.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::watch;

use super::{Store, StoreError};
use crate::billing::UsageRecord;
use crate::ids::{CallId, UserId};
use crate::metrics as m;
use crate::signaling::CallRecord;
use crate::webhooks::OutboxEvent;

/// A change was not stored: the database failed for longer than `[storage] write_timeout`, or is
/// known to be failing. Nothing of it was written, and the core no longer holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage unavailable: {0}")]
pub struct Unavailable(pub String);

/// What runs after a job's writes were committed, or were given up.
pub type Continuation = Box<dyn FnOnce(Result<(), Unavailable>) + Send>;

/// Puts calls back in the signaling core as storage last committed them, after their later changes
/// could not be stored. `None`: the call was never committed and must disappear.
pub trait Restorer: Send + Sync + 'static {
    /// Restores the calls, then queues [`Job::Restored`] with their IDs (under the same lock that
    /// orders the core's jobs).
    fn restore(&self, calls: Vec<(CallId, Option<CallRecord>)>);
}

/// Work for the storage thread.
pub enum Job {
    /// Write these calls and queue these webhook events (one transaction for the batch), then run the
    /// continuation with the outcome. On failure nothing of the job is written and the calls are
    /// restored in the core (see the module docs).
    Calls(Vec<CallRecord>, Vec<OutboxEvent>, Option<Continuation>),
    /// Ledger segments and their webhook events, written with the batch. While storage fails they
    /// are kept and written once it works again: billed time is never dropped for a failing disk.
    Usage(Vec<UsageRecord>, Vec<OutboxEvent>),
    /// Webhook events that report no call change (room events); kept like [`Job::Usage`].
    Events(Vec<OutboxEvent>),
    /// Run a closure with the store (reads; writes whose failure the closure handles), in order.
    Run(Box<dyn FnOnce(&mut Store) + Send>),
    /// The core now holds these calls as last committed: jobs queued after this build on that.
    Restored(Vec<CallId>),
    /// Finish what is queued before this, checkpoint, and stop the thread.
    Stop,
}

/// How long the storage thread waits for more jobs before committing a batch.
const LINGER: Duration = Duration::from_micros(300);
/// The most jobs in one batch.
const MAX_BATCH: usize = 4096;
/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL frames (pages) past which the checkpointer makes the writer start the WAL over.
const WAL_RESTART_FRAMES: i64 = 4096;
/// While storage is down, how often a write is tried to see whether it works again.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// First pause between attempts at a failing write; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How long one attempt waits for a lock held by another connection (or process).
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(200);
/// Ledger segments kept while storage fails (after merging contiguous ones): about 10 MB. Past it the
/// oldest are dropped and counted (`switchboard_storage_dropped_total{what="usage"}`).
const MAX_PENDING_USAGE: usize = 100_000;
/// Webhook events kept while storage fails.
const MAX_PENDING_EVENTS: usize = 100_000;

/// One checkpoint: a PASSIVE pass copies what the WAL holds into the database without blocking
/// the writer. Under a steady write load that never catches up with the end of the WAL, and the WAL
/// only starts over once all of it is copied, so once it passes [`WAL_RESTART_FRAMES`] a RESTART
/// pass copies the few frames the writer added meanwhile (holding it for that long) and makes the
/// next commit write from the start of the file again.
fn checkpoint_round(conn: &Connection) -> rusqlite::Result<()> {
    let log: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    if log > WAL_RESTART_FRAMES {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}

/// Checkpoints `path`'s WAL every [`CHECKPOINT_EVERY`] on its own connection (see
/// [`checkpoint_round`]) until `stop` is dropped.
fn spawn_checkpointer(
    path: std::path::PathBuf,
    stop: mpsc::Receiver<()>,
) -> Option<std::thread::JoinHandle<()>> {
    let conn = match Connection::open(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the checkpointer's connection; the WAL is checkpointed at shutdown only");
            return None;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
                if let Err(e) = checkpoint_round(&conn) {
                    metrics::counter!(m::STORAGE_ERRORS, "op" => "checkpoint").increment(1);
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        })
        .ok()
}

/// The thread that owns the [`Store`].
#[derive(Clone)]
pub struct StoreThread {
    tx: mpsc::Sender<Job>,
    health: watch::Receiver<bool>,
    restorer: Arc<OnceLock<Box<dyn Restorer>>>,
}

impl std::fmt::Debug for StoreThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreThread")
    }
}

impl StoreThread {
    /// Starts the thread with the default write timeout (see [`spawn_with`](Self::spawn_with)).
    pub fn spawn(store: Store) -> (Self, std::thread::JoinHandle<()>) {
        Self::spawn_with(store, Duration::from_secs(3))
    }

    /// Starts the thread. A failing write is retried for up to `write_timeout`. The thread stops
    /// when every handle is dropped or at [`Job::Stop`], after finishing the queued jobs.
    pub fn spawn_with(
        store: Store,
        write_timeout: Duration,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let (health_tx, health) = watch::channel(true);
        metrics::gauge!(m::STORAGE_UP).set(1.0);
        let restorer: Arc<OnceLock<Box<dyn Restorer>>> = Arc::new(OnceLock::new());
        let writer = Writer {
            store,
            health: health_tx,
            restorer: Arc::clone(&restorer),
            write_timeout,
            poisoned: HashSet::new(),
            pending: Pending::default(),
        };
        let handle = std::thread::Builder::new()
            .name("storage".into())
            .spawn(move || {
                // On this thread: the PostgreSQL driver blocks, and may not on a runtime's.
                let mut writer = writer;
                writer.store.set_lock_timeout(BUSY_TIMEOUT);
                writer.run(rx)
            })
            .unwrap_or_else(|e| panic!("cannot spawn the storage thread: {e}"));
        (
            Self {
                tx,
                health,
                restorer,
            },
            handle,
        )
    }

    /// Installs what puts calls back in the core when their changes cannot be stored. Without one,
    /// a failed job only reports the failure. Only the first call takes effect.
    pub fn set_restorer(&self, r: Box<dyn Restorer>) {
        let _ = self.restorer.set(r);
    }

    /// Queues a job. Fails only after shutdown.
    pub fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.tx.send(job).map_err(|_| StoreError::Closed)
    }

    /// Runs `f` on the storage thread and awaits its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Run(Box::new(move |s| {
            let _ = tx.send(f(s));
        })))?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Whether the last write worked (false from a write given up until a probe write works).
    pub fn healthy(&self) -> bool {
        *self.health.borrow()
    }

    /// Watches [`healthy`](Self::healthy).
    pub fn health(&self) -> watch::Receiver<bool> {
        self.health.clone()
    }
}

/// Ledger segments and webhook events kept while storage fails.
#[derive(Default)]
struct Pending {
    usage: Vec<UsageRecord>,
    /// Index in `usage` of the last segment of each (call, user, tier), to merge the next one in.
    last: HashMap<(CallId, UserId, String), usize>,
    events: Vec<OutboxEvent>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.usage.is_empty() && self.events.is_empty()
    }

    /// Keeps segments, merging each into the previous one of its (call, user, tier) when they are
    /// contiguous (checkpoints of one running interval), so a long outage costs one segment per
    /// tier change, not one per checkpoint.
    fn add_usage(&mut self, rows: Vec<UsageRecord>) {
        for r in rows {
            let key = (r.call_id.clone(), r.user_id.clone(), r.tier.clone());
            if let Some(&i) = self.last.get(&key)
                && let Some(prev) = self.usage.get_mut(i)
                && prev.end_ms == r.start_ms
            {
                prev.end_ms = r.end_ms;
                continue;
            }
            self.last.insert(key, self.usage.len());
            self.usage.push(r);
        }
        if self.usage.len() > MAX_PENDING_USAGE {
            let excess = self.usage.len() - MAX_PENDING_USAGE;
            self.usage.drain(..excess);
            metrics::counter!(m::STORAGE_DROPPED, "what" => "usage").increment(excess as u64);
            tracing::error!(
                segments = excess,
                "storage has failed for long: dropped the oldest unwritten ledger segments"
            );
            self.last = self
                .usage
                .iter()
                .enumerate()
                .map(|(i, r)| ((r.call_id.clone(), r.user_id.clone(), r.tier.clone()), i))
                .collect();
        }
    }

    fn add_events(&mut self, events: Vec<OutboxEvent>) {
        self.events.extend(events);
        if self.events.len() > MAX_PENDING_EVENTS {
            let excess = self.events.len() - MAX_PENDING_EVENTS;
            self.events.drain(..excess);
            metrics::counter!(m::STORAGE_DROPPED, "what" => "webhook_event")
                .increment(excess as u64);
            tracing::error!(
                events = excess,
                "storage has failed for long: dropped the oldest unwritten webhook events"
            );
        }
    }

    fn take(&mut self) -> (Vec<UsageRecord>, Vec<OutboxEvent>) {
        self.last.clear();
        (
            std::mem::take(&mut self.usage),
            std::mem::take(&mut self.events),
        )
    }
}

/// The storage thread's state.
struct Writer {
    store: Store,
    health: watch::Sender<bool>,
    restorer: Arc<OnceLock<Box<dyn Restorer>>>,
    write_timeout: Duration,
    /// Calls being restored in the core: jobs touching them fail until [`Job::Restored`].
    poisoned: HashSet<CallId>,
    pending: Pending,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let checkpointer = self
            .store
            .path()
            .and_then(|path| spawn_checkpointer(path, stopped));
        let mut stop = false;
        while !stop {
            let first = if self.up() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(PROBE_EVERY) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut batch = vec![first];
            // Group commit: once a job arrives, sleep LINGER and take what else arrived, so a burst
            // of ops shares one transaction (one set of WAL pages) instead of one each. Sleeping
            // rather than waiting on the channel means senders meanwhile wake nobody: one context
            // switch per batch, not one per job.
            std::thread::sleep(LINGER);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            if let Some(i) = batch.iter().position(|j| matches!(j, Job::Stop)) {
                // Jobs queued after the stop are dropped: nothing may be queued after it.
                batch.truncate(i);
                stop = true;
            }
            // A restore marker splits the batch: jobs before it may be doomed by the poison it
            // lifts, jobs after it are not.
            let mut rest = batch;
            while let Some(i) = rest.iter().position(|j| matches!(j, Job::Restored(_))) {
                let tail = rest.split_off(i + 1);
                if let Some(Job::Restored(ids)) = rest.pop() {
                    self.run_batch(rest);
                    for id in &ids {
                        self.poisoned.remove(id);
                    }
                }
                rest = tail;
            }
            self.run_batch(rest);
        }
        if !self.pending.is_empty() {
            // A last chance for what a failing disk held back; what still fails is lost with the
            // process, and said so.
            self.probe();
            if !self.pending.is_empty() {
                tracing::error!(
                    segments = self.pending.usage.len(),
                    events = self.pending.events.len(),
                    "stopping with ledger segments and webhook events that could not be stored"
                );
            }
        }
        drop(stop_checkpoints);
        if let Some(t) = checkpointer {
            let _ = t.join();
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
    }

    fn up(&self) -> bool {
        *self.health.borrow()
    }

    fn set_up(&self, up: bool) {
        let changed = self.health.send_if_modified(|h| {
            let changed = *h != up;
            *h = up;
            changed
        });
        if changed {
            metrics::gauge!(m::STORAGE_UP).set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("storage works again");
            }
        }
    }

    /// While down: one attempt at writing what is pending (or, with nothing pending, a probe row).
    fn probe(&mut self) {
        let (usage, events) = self.pending.take();
        let now = now_ms();
        let result = if usage.is_empty() && events.is_empty() {
            self.store.probe(now)
        } else {
            self.store
                .write_batch(std::iter::empty(), &events, &usage, now)
        };
        match result {
            Ok(()) => self.set_up(true),
            Err(e) => {
                metrics::counter!(m::STORAGE_ERRORS, "op" => "probe").increment(1);
                tracing::debug!(error = %e, "storage still fails");
                self.pending.add_usage(usage);
                self.pending.add_events(events);
            }
        }
    }

    /// One write, retried with backoff for up to the write timeout.
    fn write_retrying(
        &mut self,
        latest: &HashMap<CallId, CallRecord>,
        events: &[OutboxEvent],
        usage: &[UsageRecord],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let start = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .store
                .write_batch(latest.values(), events, usage, now_ms)
            {
                Ok(()) => return Ok(()),
                Err(e) => {
                    metrics::counter!(m::STORAGE_ERRORS, "op" => "commit").increment(1);
                    if let StoreError::Fenced { epoch } = e {
                        // No retry can succeed: another node owns the calls now.
                        tracing::error!(
                            epoch,
                            "storage write refused: another node owns the calls"
                        );
                        return Err(e);
                    }
                    if start.elapsed() + backoff >= self.write_timeout {
                        tracing::error!(error = %e, attempt, "storage write failed; giving up on the batch");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, attempt, "storage write failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Writes what the batch changes in one transaction (the last record of a call wins), then runs
    /// the continuations and closures in the order they were queued.
    fn run_batch(&mut self, mut batch: Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        metrics::histogram!(m::STORAGE_BATCH).record(batch.len() as f64);
        // Which call jobs fail without trying: all of them while storage is down, and those that
        // touch a call being restored, with every other job touching a call such a job touched.
        let touched: Vec<Vec<CallId>> = batch
            .iter()
            .map(|j| match j {
                Job::Calls(records, _, _) => records.iter().map(|r| r.call_id.clone()).collect(),
                _ => Vec::new(),
            })
            .collect();
        let mut doomed = vec![false; batch.len()];
        let mut doomed_calls: HashSet<CallId> = HashSet::new();
        let down = !self.up();
        for (i, calls) in touched.iter().enumerate() {
            if !calls.is_empty() && (down || calls.iter().any(|c| self.poisoned.contains(c))) {
                doomed[i] = true;
                doomed_calls.extend(calls.iter().cloned());
            }
        }
        spread(&touched, &mut doomed, &mut doomed_calls);

        let mut latest: HashMap<CallId, CallRecord> = HashMap::new();
        let mut events: Vec<OutboxEvent> = Vec::new();
        let mut usage: Vec<UsageRecord> = Vec::new();
        let mut kept: Vec<OutboxEvent> = Vec::new();
        for (i, job) in batch.iter_mut().enumerate() {
            match job {
                Job::Calls(records, evs, _) if !doomed[i] => {
                    for r in records.drain(..) {
                        latest.insert(r.call_id.clone(), r);
                    }
                    events.append(evs);
                }
                Job::Usage(rows, evs) => {
                    usage.append(rows);
                    kept.append(evs);
                }
                Job::Events(evs) => kept.append(evs),
                _ => {}
            }
        }
        if down {
            self.pending.add_usage(usage);
            self.pending.add_events(kept);
        } else {
            let (mut held_usage, mut held_events) = self.pending.take();
            held_usage.append(&mut usage);
            held_events.append(&mut kept);
            let (usage, kept) = (held_usage, held_events);
            events.extend(kept.iter().cloned());
            if !latest.is_empty() || !events.is_empty() || !usage.is_empty() {
                let start = Instant::now();
                let now = now_ms();
                let result = self.write_retrying(&latest, &events, &usage, now);
                metrics::histogram!(m::STORAGE_COMMIT).record(start.elapsed().as_secs_f64());
                if result.is_err() {
                    self.set_up(false);
                    for (i, calls) in touched.iter().enumerate() {
                        if !calls.is_empty() {
                            doomed[i] = true;
                            doomed_calls.extend(calls.iter().cloned());
                        }
                    }
                    self.pending.add_usage(usage);
                    self.pending.add_events(kept);
                }
            }
        }
        self.restore(&doomed_calls);
        let failure = Unavailable("the database is failing; nothing was changed".into());
        for (i, job) in batch.into_iter().enumerate() {
            match job {
                Job::Calls(_, _, Some(k)) => k(if doomed[i] {
                    Err(failure.clone())
                } else {
                    Ok(())
                }),
                Job::Run(f) => f(&mut self.store),
                Job::Calls(_, _, None)
                | Job::Usage(..)
                | Job::Events(_)
                | Job::Restored(_)
                | Job::Stop => {}
            }
        }
    }

    /// Has the core put back the calls whose changes were given up (those not already being
    /// restored), as last committed.
    fn restore(&mut self, doomed: &HashSet<CallId>) {
        let Some(restorer) = self.restorer.get() else {
            return;
        };
        let fresh: Vec<(CallId, Option<CallRecord>)> = doomed
            .iter()
            .filter(|id| !self.poisoned.contains(*id))
            .map(|id| (id.clone(), self.store.committed(id).cloned()))
            .collect();
        if fresh.is_empty() {
            return;
        }
        metrics::counter!(m::STORAGE_ROLLBACKS).increment(fresh.len() as u64);
        tracing::warn!(
            calls = fresh.len(),
            "changes to calls could not be stored; they are undone and their ops answered unavailable"
        );
        self.poisoned.extend(fresh.iter().map(|(id, _)| id.clone()));
        restorer.restore(fresh);
    }
}

/// Dooms every job that touches a doomed call, until nothing changes.
fn spread(touched: &[Vec<CallId>], doomed: &mut [bool], calls: &mut HashSet<CallId>) {
    loop {
        let mut changed = false;
        for (i, t) in touched.iter().enumerate() {
            if !doomed[i] && t.iter().any(|c| calls.contains(c)) {
                doomed[i] = true;
                for c in t {
                    changed |= calls.insert(c.clone());
                }
            }
        }
        if !changed {
            return;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
