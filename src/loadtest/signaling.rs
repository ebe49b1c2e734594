//! The signaling load run: caller/callee pairs cycle invite → accept → end (advanced mode) over real
//! WebSockets as fast as the server answers, and optionally thousands of idle sessions to measure the
//! server's memory per session.
//!
//! Each simulated user is one task on one socket; frames are parsed only as far as routing needs. Op
//! latency is the time from writing a request to reading its reply, recorded in an HDR histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::auth::TokenAuthority;
use crate::ids::UserId;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What to run.
#[derive(Debug, Clone)]
pub struct SignalingLoad {
    /// `http://host:port` of the server; several, comma-separated, for the nodes of a cluster: pair
    /// `i` connects its caller to node `i mod n` and its callee to node `i + 1 mod n`, so with two
    /// or more every call is between users on different nodes.
    pub url: String,
    /// The server's token secret.
    pub secret: String,
    /// Caller/callee pairs cycling concurrently.
    pub pairs: usize,
    /// Idle sessions held open while the pairs run.
    pub idle: usize,
    /// How long to measure.
    pub duration: Duration,
    /// Warm-up before measuring.
    pub warmup: Duration,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SignalingReport {
    /// Pairs that ran.
    pub pairs: usize,
    /// invite → accept → end cycles completed per second while measuring.
    pub cycles_per_sec: f64,
    /// Cycles completed while measuring.
    pub cycles: u64,
    /// Ops answered while measuring.
    pub ops: u64,
    /// Op latency percentiles, microseconds.
    pub op_latency_us: Percentiles,
    /// Idle sessions opened.
    pub idle_sessions: usize,
    /// Server resident memory before the idle sessions, bytes.
    pub rss_before: Option<u64>,
    /// Server resident memory with the idle sessions open, bytes.
    pub rss_after: Option<u64>,
    /// (after − before) / idle sessions, bytes.
    pub bytes_per_idle_session: Option<f64>,
    /// Pairs that failed.
    pub errors: u64,
    /// Requests the server answered `rate_limited` (retried after a pause).
    pub rate_limited: u64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 95th.
    pub p95: u64,
    /// 99th.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.5),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default, borrow)]
    event: Option<&'a str>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<ErrorBody<'a>>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    code: &'a str,
}

/// A reply: the result, or the error code and the whole frame.
enum Answer {
    Ok(Option<String>),
    Err(String, String),
}

#[derive(Deserialize)]
struct CallIdOnly {
    call_id: String,
}

#[derive(Deserialize)]
struct StateChange {
    users: Vec<UserState>,
}

#[derive(Deserialize)]
struct UserState {
    user_id: String,
    state: String,
}

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    cycles: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
}

fn ws_url(url: &str) -> String {
    let base = url.trim_end_matches('/');
    let base = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| base.strip_prefix("https://").map(|r| format!("wss://{r}")))
        .unwrap_or_else(|| base.to_owned());
    format!("{base}/v1/signal")
}

async fn connect(url: &str, token: &str) -> Result<Ws, LoadError> {
    let mut req = url
        .into_client_request()
        .map_err(|e| LoadError::Connect(e.to_string()))?;
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        req.headers_mut().insert("authorization", v);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
        .await
        .map_err(|e| LoadError::Connect(e.to_string()))?;
    // The first frame is the session event.
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => Err(LoadError::Protocol(format!("no session event: {other:?}"))),
    }
}

/// Reads frames until the reply to `id` (events are skipped: each task waits for the events it needs
/// explicitly).
async fn await_reply(ws: &mut Ws, id: u64) -> Result<Answer, LoadError> {
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| LoadError::Protocol("socket closed".into()))?
            .map_err(|e| LoadError::Protocol(e.to_string()))?;
        let Message::Text(text) = msg else { continue };
        let f: Frame =
            serde_json::from_str(&text).map_err(|e| LoadError::Protocol(e.to_string()))?;
        if f.event.is_some() || f.id != Some(id) {
            continue;
        }
        return Ok(match f.ok {
            Some(true) => Answer::Ok(f.result.map(|r| r.get().to_owned())),
            _ => Answer::Err(
                f.error.map(|e| e.code.to_owned()).unwrap_or_default(),
                text.to_string(),
            ),
        });
    }
}

/// Sends an op (`args` is its JSON arguments) and returns its result and the latency of the attempt
/// that succeeded. A `rate_limited` answer is retried after a pause and counted: the server's
/// per-session rate limit is doing its job.
async fn call(
    ws: &mut Ws,
    id: &mut u64,
    op: &str,
    args: &str,
    shared: &Shared,
) -> Result<(Option<String>, Duration), LoadError> {
    loop {
        *id += 1;
        let t = Instant::now();
        send(ws, format!(r#"{{"id":{id},"op":"{op}","args":{args}}}"#)).await?;
        match await_reply(ws, *id).await? {
            Answer::Ok(r) => return Ok((r, t.elapsed())),
            Answer::Err(code, _) if code == "rate_limited" => {
                shared.rate_limited.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Answer::Err(_, frame) => {
                return Err(LoadError::Protocol(format!("{op} failed: {frame}")));
            }
        }
    }
}

/// Waits for an event; returns its data.
async fn await_event(
    ws: &mut Ws,
    name: &str,
    pred: impl Fn(&RawValue) -> bool,
) -> Result<String, LoadError> {
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| LoadError::Protocol("socket closed".into()))?
            .map_err(|e| LoadError::Protocol(e.to_string()))?;
        let Message::Text(text) = msg else { continue };
        let f: Frame =
            serde_json::from_str(&text).map_err(|e| LoadError::Protocol(e.to_string()))?;
        if f.event == Some(name)
            && let Some(d) = f.data
            && pred(d)
        {
            return Ok(d.get().to_owned());
        }
    }
}

async fn send(ws: &mut Ws, text: String) -> Result<(), LoadError> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| LoadError::Protocol(e.to_string()))
}

async fn run_pair(
    url: String,
    callee_url: String,
    caller_token: String,
    callee_token: String,
    callee: String,
    shared: Arc<Shared>,
    hist: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> Result<(), LoadError> {
    let mut a = connect(&url, &caller_token).await?;
    let mut b = connect(&callee_url, &callee_token).await?;
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| LoadError::Protocol(e.to_string()))?;
    let mut id = 0u64;
    let mut id_b = 0u64;
    let mut ops = 0u64;
    let mut cycles = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let measuring = shared.measuring.load(Ordering::Relaxed);
        // Invite.
        let args = format!(r#"{{"invitees":["{callee}"],"mode":"advanced","timeout":30}}"#);
        let (result, lat_invite) = call(&mut a, &mut id, "call_invite", &args, &shared).await?;
        let call_id = result
            .and_then(|r| serde_json::from_str::<CallIdOnly>(&r).ok())
            .map(|c| c.call_id)
            .ok_or_else(|| LoadError::Protocol("invite without call_id".into()))?;
        let by_call = format!(r#"{{"call_id":"{call_id}"}}"#);
        // The callee rings and accepts.
        await_event(&mut b, "call_invitation_received", |_| true).await?;
        let (_, lat_accept) = call(&mut b, &mut id_b, "call_accept", &by_call, &shared).await?;
        // The caller sees the acceptance, then ends the call.
        let callee_ref = callee.as_str();
        await_event(&mut a, "call_user_state_changed", |d| {
            serde_json::from_str::<StateChange>(d.get()).is_ok_and(|s| {
                s.users
                    .iter()
                    .any(|u| u.user_id == callee_ref && u.state == "accepted")
            })
        })
        .await?;
        let (_, lat_end) = call(&mut a, &mut id, "call_end", &by_call, &shared).await?;
        await_event(&mut b, "call_invitation_ended", |_| true).await?;
        if measuring && shared.measuring.load(Ordering::Relaxed) {
            for l in [lat_invite, lat_accept, lat_end] {
                let _ = local.record(l.as_micros().max(1) as u64);
            }
            ops += 3;
            cycles += 1;
        }
    }
    shared.cycles.fetch_add(cycles, Ordering::Relaxed);
    shared.ops.fetch_add(ops, Ordering::Relaxed);
    if let Ok(mut h) = hist.lock() {
        let _ = h.add(&local);
    }
    let _ = a.close(None).await;
    let _ = b.close(None).await;
    Ok(())
}

/// Reads the server's resident memory from its /metrics.
pub async fn server_rss(url: &str) -> Option<u64> {
    let text = reqwest::get(format!("{}/metrics", url.trim_end_matches('/')))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_value(&text, crate::metrics::PROCESS_RSS).map(|v| v as u64)
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Runs the load and returns its report.
pub async fn run(cfg: SignalingLoad) -> Result<SignalingReport, LoadError> {
    let urls: Vec<String> = cfg
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(ws_url)
        .collect();
    let first = cfg.url.split(',').next().unwrap_or("").trim().to_owned();
    let url = urls.first().cloned().unwrap_or_default();
    let tokens = TokenAuthority::new(&cfg.secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let token = |u: &str| -> Result<String, LoadError> {
        let id = UserId::parse(u).map_err(|e| LoadError::Protocol(e.to_string()))?;
        Ok(tokens.issue(&id, None, false, now, 24 * 3600))
    };
    let run_tag = now % 100_000;

    // Idle sessions first, to measure memory per session.
    let rss_before = server_rss(&first).await;
    let mut idle = Vec::with_capacity(cfg.idle);
    for chunk in (0..cfg.idle).collect::<Vec<_>>().chunks(256) {
        let conns = futures_util::future::join_all(chunk.iter().map(|i| {
            let url = url.clone();
            let t = token(&format!("idle{run_tag}-{i}"));
            async move { connect(&url, &t?).await }
        }))
        .await;
        for c in conns {
            idle.push(c?);
        }
    }
    let rss_after = if cfg.idle > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        server_rss(&first).await
    } else {
        None
    };

    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        cycles: AtomicU64::new(0),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        rate_limited: AtomicU64::new(0),
    });
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| LoadError::Protocol(e.to_string()))?,
    ));
    let mut tasks = Vec::with_capacity(cfg.pairs);
    for p in 0..cfg.pairs {
        let caller = format!("caller{run_tag}-{p}");
        let callee = format!("callee{run_tag}-{p}");
        let (ct, et) = (token(&caller)?, token(&callee)?);
        let n = urls.len().max(1);
        let caller_url = urls.get(p % n).cloned().unwrap_or_else(|| url.clone());
        let callee_url = urls
            .get((p + 1) % n)
            .cloned()
            .unwrap_or_else(|| url.clone());
        let (shared, hist) = (Arc::clone(&shared), Arc::clone(&hist));
        tasks.push(tokio::spawn(async move {
            let s = Arc::clone(&shared);
            if let Err(e) = run_pair(caller_url, callee_url, ct, et, callee, shared, hist).await {
                s.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("switchboard loadtest: a pair failed: {e}");
            }
        }));
    }
    tokio::time::sleep(cfg.warmup).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(cfg.duration).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    drop(idle);
    let cycles = shared.cycles.load(Ordering::Relaxed);
    let h = hist.lock().map(|h| h.clone()).ok();
    Ok(SignalingReport {
        pairs: cfg.pairs,
        cycles_per_sec: cycles as f64 / elapsed.as_secs_f64(),
        cycles,
        ops: shared.ops.load(Ordering::Relaxed),
        op_latency_us: h.as_ref().map(Percentiles::of).unwrap_or_default(),
        idle_sessions: cfg.idle,
        rss_before,
        rss_after,
        bytes_per_idle_session: match (rss_before, rss_after) {
            (Some(b), Some(a)) if cfg.idle > 0 => Some((a as f64 - b as f64) / cfg.idle as f64),
            _ => None,
        },
        errors: shared.errors.load(Ordering::Relaxed),
        rate_limited: shared.rate_limited.load(Ordering::Relaxed),
    })
}

impl SignalingReport {
    /// The report as text.
    pub fn text(&self) -> String {
        let mut s = format!(
            "signaling load: {} pairs\n  cycles (invite→accept→end): {} in total, {:.0}/s\n  ops: {}\n  op latency µs: p50 {} p95 {} p99 {} max {}\n  errors: {}\n",
            self.pairs,
            self.cycles,
            self.cycles_per_sec,
            self.ops,
            self.op_latency_us.p50,
            self.op_latency_us.p95,
            self.op_latency_us.p99,
            self.op_latency_us.max,
            self.errors
        );
        if self.rate_limited > 0 {
            s.push_str(&format!(
                "  rate limited: {} requests (retried). Each simulated user sends as fast as it is \
                 answered; to measure throughput, raise the server's [signaling] rate and burst \
                 (SWITCHBOARD_SIGNALING_RATE, SWITCHBOARD_SIGNALING_BURST) and turn off the \
                 invitation quotas (SWITCHBOARD_SIGNALING_CALLS_PER_MINUTE=0, \
                 ..._INVITATIONS_PER_MINUTE=0).\n",
                self.rate_limited
            ));
        }
        if let Some(b) = self.bytes_per_idle_session {
            s.push_str(&format!(
                "  idle sessions: {}, server RSS {} → {} MiB, {:.0} bytes ({:.1} KiB) per session\n",
                self.idle_sessions,
                self.rss_before.unwrap_or(0) >> 20,
                self.rss_after.unwrap_or(0) >> 20,
                b,
                b / 1024.0
            ));
        }
        s
    }
}
