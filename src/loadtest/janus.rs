//! The same media load against Janus's VideoRoom plugin, through Janus's own HTTP API, for the
//! side-by-side comparison (`--target janus`).
//!
//! Per room: a session attaches `janus.plugin.videoroom` and creates the room (up to 10
//! publishers, VP8 and Opus). Every simulated user has its own Janus session (kept alive by its
//! long poll of `GET /janus/<session>`). Phase A: each publisher attaches a handle and sends
//! `joinandconfigure` as a publisher with the JSEP offer of its publisher connection; the answer
//! arrives as an event. Phase B: each subscribing user (subscribers, and in rooms with several
//! publishers the publishers too) attaches a second handle, `join`s as a subscriber to every
//! other publisher's feed (Janus 1.x multistream: one connection for all), answers Janus's offer
//! and sends `start` with the JSEP answer. The media engine is the same as for Switchboard
//! ([`super::engine`]): same synthetic media, same measurement.
//!
//! Janus has no forwarded-packet counter in this setup (its admin API is off); forwarded
//! packets are the media packets the subscribers received, and the server's CPU and memory come
//! from `/proc/<pid>/stat` (`--server-pid`). Janus does not bill, so no layers are reported as
//! measured.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::engine::{self, EngineHandle, PublishSpec, UserKey};
use super::media::{
    Failures, JoinedUserTime, MediaLoad, MediaLoadError, MediaReport, ReportInput, build_report,
    fail, mark_without_media, progress_bar, update_bar, users_with_media,
};
use super::relay::proc_sample;
use super::report::Percentiles;

/// One Janus session with its long-poll task.
struct Session {
    http: reqwest::Client,
    base: String,
    id: u64,
    events: mpsc::UnboundedReceiver<Value>,
    buffered: VecDeque<Value>,
    stop: watch::Sender<bool>,
}

fn tx() -> String {
    format!("{:x}", rand::random::<u64>())
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> Result<Value, String> {
    let v: Value = http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if v.get("janus").and_then(Value::as_str) == Some("error") {
        return Err(format!("janus error: {}", v["error"]));
    }
    Ok(v)
}

impl Session {
    async fn create(http: &reqwest::Client, base: &str) -> Result<Self, String> {
        let v = post(http, base, json!({"janus": "create", "transaction": tx()})).await?;
        let id = v
            .pointer("/data/id")
            .and_then(Value::as_u64)
            .ok_or("create: no session id")?;
        let (etx, events) = mpsc::unbounded_channel();
        let (stop, mut stop_rx) = watch::channel(false);
        let poll_url = format!("{base}/{id}?maxev=10");
        let h = http.clone();
        tokio::spawn(async move {
            loop {
                let req = h.get(&poll_url).send();
                let r = tokio::select! {
                    _ = stop_rx.changed() => return,
                    r = req => r,
                };
                let Ok(r) = r else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(v) = r.json::<Value>().await else {
                    continue;
                };
                let list = match v {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for e in list {
                    if etx.send(e).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self {
            http: http.clone(),
            base: base.to_owned(),
            id,
            events,
            buffered: VecDeque::new(),
            stop,
        })
    }

    async fn attach(&self) -> Result<u64, String> {
        let v = post(
            &self.http,
            &format!("{}/{}", self.base, self.id),
            json!({"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": tx()}),
        )
        .await?;
        v.pointer("/data/id")
            .and_then(Value::as_u64)
            .ok_or_else(|| "attach: no handle id".to_owned())
    }

    /// Sends a plugin message; returns the synchronous reply (`success` with plugindata, or
    /// `ack` when the result comes as an event).
    async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value, String> {
        let mut m = json!({"janus": "message", "transaction": tx(), "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        post(
            &self.http,
            &format!("{}/{}/{handle}", self.base, self.id),
            m,
        )
        .await
    }

    /// Waits for a plugin event from `handle` (an `event` carrying `plugindata`).
    async fn event(&mut self, handle: u64, timeout: Duration) -> Result<Value, String> {
        let is_ours = |e: &Value| {
            e.get("janus").and_then(Value::as_str) == Some("event")
                && e.get("sender").and_then(Value::as_u64) == Some(handle)
        };
        if let Some(i) = self.buffered.iter().position(is_ours) {
            return self
                .buffered
                .remove(i)
                .ok_or_else(|| "lost event".to_owned());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if is_ours(&e) => return Ok(e),
                Ok(Some(e)) => {
                    if e.get("janus").and_then(Value::as_str) == Some("event") {
                        self.buffered.push_back(e);
                    }
                }
                Ok(None) => return Err("session poll ended".into()),
                Err(_) => return Err("timed out waiting for a janus event".into()),
            }
        }
    }

    async fn destroy(self) {
        let _ = self.stop.send(true);
        let _ = post(
            &self.http,
            &format!("{}/{}", self.base, self.id),
            json!({"janus": "destroy", "transaction": tx()}),
        )
        .await;
    }
}

fn plugin_error(v: &Value) -> Option<String> {
    v.pointer("/plugindata/data/error")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

struct JanusUser {
    key: UserKey,
    room: u64,
    publisher: bool,
    session: Session,
    feed: Option<u64>,
    joined_at: Instant,
}

/// Runs the media load against Janus at `cfg.url` (`http://127.0.0.1:8088/janus`).
pub async fn run(cfg: MediaLoad, server_pid: Option<u32>) -> Result<MediaReport, MediaLoadError> {
    let per_room = cfg.publishers + cfg.subscribers;
    if cfg.rooms == 0 || cfg.publishers == 0 || per_room < 2 {
        return Err(MediaLoadError::Scenario(
            "need at least one room with one publisher and one other participant".into(),
        ));
    }
    let http = reqwest::Client::new();
    let base = cfg.url.trim_end_matches('/').to_owned();
    let received = |e: &EngineHandle| e.live.received.load(Ordering::Relaxed);
    let sample = |fwd: u64| server_pid.map(|p| proc_sample(p, fwd)).unwrap_or_default();
    let failures: Failures = Arc::new(Mutex::new(BTreeMap::new()));
    let engine = EngineHandle::start(cfg.bind_ip, cfg.verify_every)
        .map_err(|e| MediaLoadError::Engine(e.to_string()))?;
    let mut rss = [sample(0).rss_bytes, 0, 0];
    let spec = PublishSpec {
        video: cfg.video,
        simulcast: cfg.simulcast,
        audio: cfg.audio,
    };

    // Rooms.
    let admin = Session::create(&http, &base)
        .await
        .map_err(|e| MediaLoadError::Engine(format!("janus: {e}")))?;
    let admin_handle = admin
        .attach()
        .await
        .map_err(|e| MediaLoadError::Engine(format!("janus: {e}")))?;
    let room_base = u64::from(rand::random::<u32>() >> 4) * 100;
    let mut room_ids = Vec::new();
    for r in 0..cfg.rooms {
        let room = room_base + r as u64;
        let v = admin
            .message(
                admin_handle,
                json!({"request": "create", "room": room, "publishers": 10,
                       "audiocodec": "opus", "videocodec": "vp8", "bitrate": 0,
                       "notify_joining": false, "admin_key": "bench-compare"}),
                None,
            )
            .await
            .map_err(|e| MediaLoadError::Engine(format!("janus create room: {e}")))?;
        if let Some(e) = plugin_error(&v) {
            return Err(MediaLoadError::Engine(format!("janus create room: {e}")));
        }
        room_ids.push(room);
    }

    // Users and their sessions.
    let mut users: Vec<JanusUser> = Vec::new();
    for (r, room) in room_ids.iter().enumerate() {
        for i in 0..per_room {
            match Session::create(&http, &base).await {
                Ok(session) => users.push(JanusUser {
                    key: (r * per_room + i) as UserKey,
                    room: *room,
                    publisher: i < cfg.publishers,
                    session,
                    feed: None,
                    joined_at: Instant::now(),
                }),
                Err(e) => fail(&failures, format!("janus session: {e}")),
            }
        }
    }

    // Phase A: publishers.
    let mut video_layers = 0u64;
    for u in users.iter_mut().filter(|u| u.publisher) {
        u.joined_at = Instant::now();
        match publish(u, &engine, spec).await {
            Ok(feed) => {
                u.feed = Some(feed);
                video_layers += match (cfg.video.is_some(), cfg.simulcast) {
                    (false, _) => 0,
                    (true, false) => 1,
                    (true, true) => 3,
                };
            }
            Err(e) => fail(&failures, e),
        }
        if !cfg.ramp.is_zero() {
            tokio::time::sleep(cfg.ramp / 2 / (cfg.rooms * cfg.publishers).max(1) as u32).await;
        }
    }
    settle(&engine, users.iter().filter(|u| u.feed.is_some()).count()).await;
    rss[1] = sample(received(&engine)).rss_bytes;

    // Phase B: subscriptions.
    let feeds: HashMap<u64, Vec<(UserKey, u64)>> = users.iter().fold(HashMap::new(), |mut m, u| {
        if let Some(f) = u.feed {
            m.entry(u.room).or_default().push((u.key, f));
        }
        m
    });
    let tracks_per_feed = u64::from(cfg.video.is_some()) + u64::from(cfg.audio);
    let mut subscriptions = 0u64;
    let mut subscribing = 0usize;
    let mut should_receive: Vec<UserKey> = Vec::new();
    let n_users = users.len().max(1) as u32;
    for u in users.iter_mut() {
        let others: Vec<u64> = feeds
            .get(&u.room)
            .map(|v| {
                v.iter()
                    .filter(|(k, _)| *k != u.key)
                    .map(|(_, f)| *f)
                    .collect()
            })
            .unwrap_or_default();
        if others.is_empty() {
            continue;
        }
        if !u.publisher {
            u.joined_at = Instant::now();
        }
        match subscribe(u, &engine, &others).await {
            Ok(()) => {
                subscribing += 1;
                should_receive.push(u.key);
                subscriptions += others.len() as u64 * tracks_per_feed;
            }
            Err(e) => fail(&failures, e),
        }
        if !cfg.ramp.is_zero() {
            tokio::time::sleep(cfg.ramp / 2 / n_users).await;
        }
    }
    let want = users.iter().filter(|u| u.feed.is_some()).count() + subscribing;
    settle(&engine, want).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && users_with_media(&engine) < subscribing {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    rss[2] = sample(received(&engine)).rss_bytes;

    // Keep the sessions' long polls running while measuring.
    let start = sample(received(&engine));
    let cpu0 = engine::process_cpu_seconds();
    engine.start_window();
    let t0 = Instant::now();
    let bar = cfg.progress.then(|| progress_bar(cfg.duration));
    let mut last = (Instant::now(), 0u64, 0u64);
    while t0.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(250).min(cfg.duration)).await;
        if let Some(b) = &bar {
            last = update_bar(b, &engine, users.len(), t0, last);
        }
    }
    let end = sample(received(&engine));
    let window = t0.elapsed().as_secs_f64();
    let cpu1 = engine::process_cpu_seconds();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let join_times: Vec<JoinedUserTime> = users
        .iter()
        .map(|u| JoinedUserTime {
            key: u.key,
            joined_at: u.joined_at,
            invited_at: None,
        })
        .collect();
    let n = users.len();
    for u in users {
        engine.close(u.key);
        u.session.destroy().await;
    }
    for room in &room_ids {
        let _ = admin
            .message(
                admin_handle,
                json!({"request": "destroy", "room": room, "admin_key": "bench-compare"}),
                None,
            )
            .await;
    }
    admin.destroy().await;
    let mut res = engine
        .stop()
        .ok_or_else(|| MediaLoadError::Engine("media thread panicked".into()))?;
    mark_without_media(&mut res, &should_receive);
    // Subscribers' received media is what Janus forwarded; the window's share of it is exact.
    let mut end = end;
    end.forwarded = start.forwarded + res.received_packets;
    if let Ok(mut m) = failures.lock() {
        for (_, why) in &res.failures {
            *m.entry(why.clone()).or_default() += 1;
        }
    }
    let failures = failures.lock().map(|m| m.clone()).unwrap_or_default();
    let mut report = build_report(ReportInput {
        cfg: &cfg,
        target: "janus",
        users: cfg.rooms * per_room,
        setup_ms: Percentiles::default(),
        join_times: &join_times,
        res,
        start,
        end,
        window,
        generator_cpu: cpu1 - cpu0,
        rss,
        video_layers,
        subscriptions,
        failures,
        measured_layers: Vec::new(),
        server_bwe_bps: None,
    });
    if n < report.users {
        report.users_connected = report.users_connected.min(n);
    }
    Ok(report)
}

async fn settle(engine: &EngineHandle, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let c = engine.live.connected.load(Ordering::Relaxed) as usize;
        let f = engine.live.failed.load(Ordering::Relaxed) as usize;
        if c + f >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn publish(
    u: &mut JanusUser,
    engine: &EngineHandle,
    spec: PublishSpec,
) -> Result<u64, String> {
    let handle = u
        .session
        .attach()
        .await
        .map_err(|e| format!("attach: {e}"))?;
    let offer = engine
        .publish(u.key, spec)
        .await
        .map_err(|e| format!("publish offer: {e}"))?;
    let r = u
        .session
        .message(
            handle,
            json!({"request": "joinandconfigure", "room": u.room, "ptype": "publisher",
                   "display": format!("u{}", u.key), "audio": true, "video": true}),
            Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
        )
        .await
        .map_err(|e| format!("joinandconfigure: {e}"))?;
    if let Some(e) = plugin_error(&r) {
        return Err(format!("joinandconfigure: {e}"));
    }
    let ev = u
        .session
        .event(handle, Duration::from_secs(10))
        .await
        .map_err(|e| format!("joinandconfigure: {e}"))?;
    if let Some(e) = plugin_error(&ev) {
        return Err(format!("joinandconfigure: {e}"));
    }
    let feed = ev
        .pointer("/plugindata/data/id")
        .and_then(Value::as_u64)
        .ok_or("joinandconfigure: no publisher id")?;
    let answer = ev
        .pointer("/jsep/sdp")
        .and_then(Value::as_str)
        .ok_or("joinandconfigure: no answer")?;
    engine
        .publish_answer(u.key, answer.to_owned())
        .await
        .map_err(|e| format!("publish answer: {e}"))?;
    Ok(feed)
}

async fn subscribe(u: &mut JanusUser, engine: &EngineHandle, feeds: &[u64]) -> Result<(), String> {
    let handle = u
        .session
        .attach()
        .await
        .map_err(|e| format!("attach: {e}"))?;
    let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
    let r = u
        .session
        .message(
            handle,
            json!({"request": "join", "room": u.room, "ptype": "subscriber", "streams": streams}),
            None,
        )
        .await
        .map_err(|e| format!("subscriber join: {e}"))?;
    if let Some(e) = plugin_error(&r) {
        return Err(format!("subscriber join: {e}"));
    }
    let ev = u
        .session
        .event(handle, Duration::from_secs(10))
        .await
        .map_err(|e| format!("subscriber join: {e}"))?;
    if let Some(e) = plugin_error(&ev) {
        return Err(format!("subscriber join: {e}"));
    }
    let offer = ev
        .pointer("/jsep/sdp")
        .and_then(Value::as_str)
        .ok_or("subscriber join: no offer")?;
    let answer = engine
        .subscribe_offer(u.key, offer.to_owned())
        .await
        .map_err(|e| format!("subscriber answer: {e}"))?;
    let r = u
        .session
        .message(
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer, "trickle": false})),
        )
        .await
        .map_err(|e| format!("start: {e}"))?;
    if let Some(e) = plugin_error(&r) {
        return Err(format!("start: {e}"));
    }
    Ok(())
}
