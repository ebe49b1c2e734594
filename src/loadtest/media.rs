//! The media load run against Switchboard: rooms of publishers and subscribers going through
//! the real flow, and the report.
//!
//! Per room: every user connects its signaling WebSocket (tokens minted with the server's
//! secret); the first publisher invites the others in advanced mode and each accepts. Then, in
//! two phases so the server's memory can be attributed: (A) every publisher of every room
//! sends `rtc_join` and `rtc_publish` with its offer; (B) every subscriber sends `rtc_join`.
//! Each user answers the server's `rtc_offer`s for its subscriber connection with
//! `rtc_answer`. The server's resident memory is read from `/metrics` before A, after A and
//! after B. Once every subscribing user receives media, the measured window opens: server CPU
//! and forwarded-packet counters are read from `/metrics` at its start and end, and the media
//! engine ([`super::engine`]) counts what was sent, received, lost and how late. At the end the
//! caller ends each call (`call_end`), and the layers the server measured are read from
//! `GET /v1/rooms/{call_id}` (admin token) for the report.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::engine::{self, EngineHandle, EngineResults, PublishSpec, UserKey};
use super::report::{
    Percentiles, ServerSample, bytes_per, cpu_share, cpu_us_per_packet, histogram, loss_fraction,
};
use super::synth::VideoSpec;
use crate::auth::TokenAuthority;
use crate::client::signal::SignalClient;
use crate::ids::UserId;

/// What to run.
#[derive(Debug, Clone)]
pub struct MediaLoad {
    /// `http://host:port` of the server.
    pub url: String,
    /// Whose `/metrics` give the server's CPU, memory and forwarded packets: `url`, or in a
    /// cluster the node the rooms are on.
    pub metrics_url: String,
    /// The server's token secret.
    pub secret: String,
    /// Rooms (calls).
    pub rooms: usize,
    /// Publishers per room (each also subscribes to the other publishers).
    pub publishers: usize,
    /// Subscribe-only participants per room.
    pub subscribers: usize,
    /// Video each publisher sends (None: no video).
    pub video: Option<VideoSpec>,
    /// Three simulcast layers per video track.
    pub simulcast: bool,
    /// An Opus track per publisher.
    pub audio: bool,
    /// How long to measure.
    pub duration: Duration,
    /// Over how long to spread the joins of each phase.
    pub ramp: Duration,
    /// Decrypt and time one received packet in this many (1 = every packet).
    pub verify_every: u32,
    /// Address the simulated peers bind (the server must reach it).
    pub bind_ip: IpAddr,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Why a run could not start (failures of single users are counted in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum MediaLoadError {
    /// A room needs more users than a call allows, or none.
    #[error("bad scenario: {0}")]
    Scenario(String),
    /// The media engine could not start.
    #[error("media engine: {0}")]
    Engine(String),
    /// The server's /metrics could not be read.
    #[error("cannot read {0}/metrics: is the server running?")]
    Metrics(String),
}

/// One layer as the server measured it (from `GET /v1/rooms/{call_id}`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MeasuredLayer {
    /// The room.
    pub call_id: String,
    /// The publisher.
    pub user_id: String,
    /// The rid ("" without simulcast).
    pub rid: String,
    /// Measured width.
    pub width: u32,
    /// Measured height.
    pub height: u32,
    /// Measured bitrate, bit/s.
    pub bitrate: u64,
}

/// Server-side figures from `/metrics`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ServerFigures {
    /// Packets the server forwarded in the window (its counter's delta).
    pub forwarded_packets: u64,
    /// Per second.
    pub forwarded_pps: f64,
    /// Server CPU (user + system) per forwarded packet, µs.
    pub cpu_us_per_packet: Option<f64>,
    /// Share of one core the server used.
    pub cpu_share: Option<f64>,
    /// RSS before any media join, after the publishers joined, after the subscribers joined.
    pub rss_bytes: [u64; 3],
    /// Published video layers (phase A).
    pub video_layers: u64,
    /// Subscriptions (forwarded tracks) created in phase B.
    pub subscriptions: u64,
    /// (RSS after A − before) / video layers: includes the publishers' sessions, connections
    /// and audio tracks, and in rooms with several publishers their subscriptions to each other.
    pub bytes_per_video_layer: Option<f64>,
    /// (RSS after B − after A) / subscriptions: includes the subscribers' sessions and
    /// subscriber connections.
    pub bytes_per_subscription: Option<f64>,
}

/// The generator's own cost.
#[derive(Debug, Clone, Serialize, Default)]
pub struct GeneratorFigures {
    /// Share of one core the media engine thread used in the window.
    pub engine_cpu_share: f64,
    /// Share of one core the whole generator process used in the window.
    pub process_cpu_share: f64,
    /// Engine CPU per received media packet, µs.
    pub engine_us_per_received_packet: Option<f64>,
    /// Frames skipped because the engine fell behind (0 = it kept up).
    pub frames_skipped: u64,
}

/// The report of a media run.
#[derive(Debug, Clone, Serialize)]
pub struct MediaReport {
    /// What was loaded: "switchboard", "janus" or "relay".
    pub target: String,
    /// Rooms.
    pub rooms: usize,
    /// Publishers per room.
    pub publishers: usize,
    /// Subscribers per room.
    pub subscribers: usize,
    /// Video per publisher.
    pub video: Option<VideoSpec>,
    /// Simulcast.
    pub simulcast: bool,
    /// Audio.
    pub audio: bool,
    /// The measured window, seconds.
    pub window_secs: f64,
    /// Users planned.
    pub users: usize,
    /// Users whose every peer connection connected.
    pub users_connected: usize,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
    /// Call setup, invite → accepted, ms.
    pub setup_ms: Percentiles,
    /// Join, `rtc_join` → first media packet received, ms.
    pub join_ms: Percentiles,
    /// Call, `call_invite` → first media packet received, ms (Switchboard only). Subscribers
    /// join after every publisher has (so memory can be attributed), so theirs includes that.
    pub invite_to_media_ms: Percentiles,
    /// RTP packets the publishers sent.
    pub sent_packets: u64,
    /// Their payload bytes.
    pub sent_bytes: u64,
    /// Media packets the subscribers received.
    pub received_packets: u64,
    /// Their datagram bytes.
    pub received_bytes: u64,
    /// Received per second.
    pub received_pps: f64,
    /// Other RTP received (RTX, padding, probes).
    pub received_other: u64,
    /// Expected (by sequence numbers).
    pub expected: u64,
    /// Lost.
    pub lost: u64,
    /// lost / expected.
    pub loss: f64,
    /// Media packets received / (packets sent × subscribers per publisher): below 1, the
    /// server dropped or still holds packets (a server that renumbers what it forwards, as
    /// Janus does, hides drops from the sequence-number loss above). None with simulcast, where
    /// each subscriber gets one layer of several.
    pub delivered: Option<f64>,
    /// Forwarding latency, publisher send → subscriber kernel receive, µs, over the sample.
    pub latency_us: Percentiles,
    /// One packet in this many was decrypted and timed.
    pub verify_every: u32,
    /// Sampled packets that failed SRTP or had no stamp.
    pub verify_failures: u64,
    /// PLI/FIR the publishers received (whole run, joins included).
    pub keyframe_requests: u64,
    /// Server figures.
    pub server: ServerFigures,
    /// Generator figures.
    pub generator: GeneratorFigures,
    /// Layers as the server measured them.
    pub measured_layers: Vec<MeasuredLayer>,
    /// The server's bandwidth estimates of the subscribers' connections (from the TWCC
    /// feedback the generator sends), smallest and largest, bit/s.
    pub server_bwe_bps: Option<(u64, u64)>,
}

pub(crate) type Failures = Arc<Mutex<BTreeMap<String, u64>>>;

pub(crate) fn fail(f: &Failures, reason: impl Into<String>) {
    if let Ok(mut m) = f.lock() {
        *m.entry(reason.into()).or_default() += 1;
    }
}

/// Reads the server's `/metrics`.
pub async fn server_sample(http: &reqwest::Client, url: &str) -> Option<ServerSample> {
    let text = http
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    ServerSample::from_prometheus(&text)
}

pub(crate) fn ws_url(url: &str) -> String {
    let base = url.trim_end_matches('/');
    let base = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| base.strip_prefix("https://").map(|r| format!("wss://{r}")))
        .unwrap_or_else(|| base.to_owned());
    format!("{base}/v1/signal")
}

struct UserPlan {
    key: UserKey,
    id: String,
    room: usize,
}

pub(crate) struct JoinedUser {
    pub(crate) key: UserKey,
    pub(crate) joined_at: Instant,
    /// When the call that brought the user in was created (Switchboard only).
    pub(crate) invited_at: Option<Instant>,
}

/// One user's media session: join, publish, answer offers until told to stop.
#[allow(clippy::too_many_arguments)]
async fn user_session(
    mut c: SignalClient,
    call_id: String,
    invited_at: Instant,
    key: UserKey,
    publish: Option<PublishSpec>,
    caller: bool,
    engine: Arc<EngineHandle>,
    mut stop: watch::Receiver<bool>,
    joined: oneshot::Sender<Option<JoinedUser>>,
    failures: Failures,
) {
    let t = Instant::now();
    if let Err(e) = c.request("rtc_join", json!({ "call_id": call_id })).await {
        fail(
            &failures,
            format!("rtc_join: {}", e.code().unwrap_or("error")),
        );
        let _ = joined.send(None);
        return;
    }
    if let Some(spec) = publish {
        let offer = match engine.publish(key, spec).await {
            Ok(o) => o,
            Err(e) => {
                fail(&failures, format!("publish offer: {e}"));
                let _ = joined.send(None);
                return;
            }
        };
        match c
            .request("rtc_publish", json!({ "call_id": call_id, "sdp": offer }))
            .await
        {
            Ok(r) => {
                let sdp = r
                    .get("sdp")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if let Err(e) = engine.publish_answer(key, sdp).await {
                    fail(&failures, format!("publish answer: {e}"));
                }
            }
            Err(e) => {
                fail(
                    &failures,
                    format!("rtc_publish: {}", e.code().unwrap_or("error")),
                );
                let _ = joined.send(None);
                return;
            }
        }
    }
    let _ = joined.send(Some(JoinedUser {
        key,
        joined_at: t,
        invited_at: Some(invited_at),
    }));
    let mut last_ping = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            ev = c.next_event(Duration::from_millis(500)) => match ev {
                Ok(e) if e.name == "rtc_offer" => {
                    let sdp = e.data.get("sdp").and_then(Value::as_str).unwrap_or("").to_owned();
                    match engine.subscribe_offer(key, sdp).await {
                        Ok(answer) => {
                            if let Err(e) = c
                                .request("rtc_answer", json!({ "call_id": call_id, "sdp": answer }))
                                .await
                            {
                                fail(&failures, format!("rtc_answer: {}", e.code().unwrap_or("error")));
                            }
                        }
                        Err(e) => fail(&failures, format!("subscriber answer: {e}")),
                    }
                }
                Ok(_) => {}
                Err(crate::client::signal::ClientError::Timeout(_)) => {}
                Err(_) => {
                    fail(&failures, "signaling closed");
                    break;
                }
            }
        }
        if last_ping.elapsed() > Duration::from_secs(15) {
            last_ping = Instant::now();
            let _ = c.request("ping", json!({})).await;
        }
    }
    if caller {
        let _ = c.request("call_end", json!({ "call_id": call_id })).await;
    }
    engine.close(key);
    c.close();
}

/// Runs the media load against Switchboard and returns its report.
pub async fn run(cfg: MediaLoad) -> Result<MediaReport, MediaLoadError> {
    let per_room = cfg.publishers + cfg.subscribers;
    if cfg.rooms == 0 || per_room < 2 || cfg.publishers == 0 {
        return Err(MediaLoadError::Scenario(
            "need at least one room with one publisher and one other participant".into(),
        ));
    }
    if per_room > 10 {
        return Err(MediaLoadError::Scenario(format!(
            "{per_room} users per room: a call holds at most 10 (max_call_users)"
        )));
    }
    if cfg.video.is_none() && !cfg.audio {
        return Err(MediaLoadError::Scenario(
            "nothing to publish: give --video or --audio".into(),
        ));
    }
    let http = reqwest::Client::new();
    let rss0 = server_sample(&http, &cfg.metrics_url)
        .await
        .ok_or_else(|| MediaLoadError::Metrics(cfg.metrics_url.clone()))?;
    let engine = Arc::new(
        EngineHandle::start(cfg.bind_ip, cfg.verify_every)
            .map_err(|e| MediaLoadError::Engine(e.to_string()))?,
    );
    let tokens = TokenAuthority::new(&cfg.secret);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tag = format!("{:x}", rand::random::<u32>());
    let failures: Failures = Arc::new(Mutex::new(BTreeMap::new()));
    let ws = ws_url(&cfg.url);
    let spec = PublishSpec {
        video: cfg.video,
        simulcast: cfg.simulcast,
        audio: cfg.audio,
    };

    // Plan users.
    let mut plans = Vec::new();
    for r in 0..cfg.rooms {
        for i in 0..per_room {
            plans.push(UserPlan {
                key: (r * per_room + i) as UserKey,
                id: format!("lt{tag}-r{r}-u{i}"),
                room: r,
            });
        }
    }
    let token = |id: &str| -> Option<String> {
        let u = UserId::parse(id).ok()?;
        Some(tokens.issue(&u, None, false, now_s, 24 * 3600))
    };

    // Connect, invite, accept: one task per room.
    let mut room_tasks = Vec::new();
    for r in 0..cfg.rooms {
        let users: Vec<(UserKey, String, Option<String>)> = plans
            .iter()
            .filter(|p| p.room == r)
            .map(|p| (p.key, p.id.clone(), token(&p.id)))
            .collect();
        let ws = ws.clone();
        let failures = failures.clone();
        let pubs = cfg.publishers;
        room_tasks.push(tokio::spawn(async move {
            setup_room(&ws, users, pubs, &failures).await
        }));
    }
    let mut rooms: Vec<RoomSetup> = Vec::new();
    for t in room_tasks {
        if let Ok(Some(r)) = t.await {
            rooms.push(r);
        }
    }
    let setup_ms = {
        let mut h = histogram();
        for r in &rooms {
            for ms in &r.setup_ms {
                let _ = h.record(*ms);
            }
        }
        Percentiles::of(&h)
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut joins: Vec<oneshot::Receiver<Option<JoinedUser>>> = Vec::new();
    let mut sessions = Vec::new();
    let mut expected_subscribing = 0usize;
    let mut should_receive: Vec<UserKey> = Vec::new();
    let mut video_layers = 0u64;
    let layers_per_pub = match (cfg.video.is_some(), cfg.simulcast) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => 3,
    };
    let tracks_per_pub = layers_per_pub.min(1) + u64::from(cfg.audio);
    let mut subscriptions = 0u64;
    let mut rss = [rss0.rss_bytes, 0, 0];

    for phase in [true, false] {
        let members: Vec<(usize, UserKey, bool)> = rooms
            .iter()
            .enumerate()
            .flat_map(|(ri, r)| {
                r.members
                    .iter()
                    .filter(|(_, publisher, _)| *publisher == phase)
                    .map(move |(k, _, caller)| (ri, *k, *caller))
            })
            .collect();
        let gap = if members.is_empty() {
            Duration::ZERO
        } else {
            cfg.ramp / 2 / members.len() as u32
        };
        for (ri, key, caller) in members {
            let Some(room) = rooms.get_mut(ri) else {
                continue;
            };
            let Some(client) = room.clients.remove(&key) else {
                continue;
            };
            let (jtx, jrx) = oneshot::channel();
            joins.push(jrx);
            let publish = phase.then_some(spec);
            if phase {
                video_layers += layers_per_pub;
                // Publishers subscribe to the room's other publishers.
                if room.publishers > 1 {
                    expected_subscribing += 1;
                    should_receive.push(key);
                }
            } else {
                expected_subscribing += 1;
                should_receive.push(key);
                subscriptions += room.publishers as u64 * tracks_per_pub;
            }
            sessions.push(tokio::spawn(user_session(
                client,
                room.call_id.clone(),
                room.invited_at,
                key,
                publish,
                caller,
                engine.clone(),
                stop_rx.clone(),
                jtx,
                failures.clone(),
            )));
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        // Let the phase settle: every connection up (or given up on).
        let want = if phase {
            rooms
                .iter()
                .map(|r| r.publishers * if r.publishers > 1 { 2 } else { 1 })
                .sum::<usize>()
        } else {
            rooms
                .iter()
                .map(|r| {
                    r.publishers * if r.publishers > 1 { 2 } else { 1 } + (r.size - r.publishers)
                })
                .sum::<usize>()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let c = engine
                .live
                .connected
                .load(std::sync::atomic::Ordering::Relaxed) as usize;
            let f = engine
                .live
                .failed
                .load(std::sync::atomic::Ordering::Relaxed) as usize;
            if c + f >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = server_sample(&http, &cfg.metrics_url)
            .await
            .unwrap_or_default();
        if let Some(slot) = rss.get_mut(if phase { 1 } else { 2 }) {
            *slot = s.rss_bytes;
        }
    }

    // Wait for media to reach every subscribing user.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if engine
            .live
            .received
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && users_with_media(&engine) >= expected_subscribing
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The measured window.
    let start = server_sample(&http, &cfg.metrics_url)
        .await
        .unwrap_or_default();
    let cpu0 = engine::process_cpu_seconds();
    engine.start_window();
    let t0 = Instant::now();
    let bar = cfg.progress.then(|| progress_bar(cfg.duration));
    let mut last = (Instant::now(), 0u64, 0u64);
    while t0.elapsed() < cfg.duration {
        tokio::time::sleep(Duration::from_millis(250).min(cfg.duration)).await;
        if let Some(b) = &bar {
            last = update_bar(b, &engine, plans.len(), t0, last);
        }
    }
    let end = server_sample(&http, &cfg.metrics_url)
        .await
        .unwrap_or_default();
    let window = t0.elapsed().as_secs_f64();
    let cpu1 = engine::process_cpu_seconds();
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    // What the server measured.
    let admin = UserId::parse("loadtest-admin")
        .ok()
        .map(|u| tokens.issue(&u, None, true, now_s, 3600));
    let mut measured_layers = Vec::new();
    let mut bwe: Vec<u64> = Vec::new();
    for r in &rooms {
        let (layers, estimates) = measured(&http, &cfg.url, admin.as_deref(), &r.call_id).await;
        measured_layers.extend(layers);
        bwe.extend(estimates);
    }

    let _ = stop_tx.send(true);
    let mut join_times: Vec<JoinedUser> = Vec::new();
    for j in joins {
        if let Ok(Some(u)) = j.await {
            join_times.push(u);
        }
    }
    for s in sessions {
        let _ = s.await;
    }
    let engine = Arc::try_unwrap(engine)
        .map_err(|_| MediaLoadError::Engine("engine still in use".into()))?;
    let mut res = engine
        .stop()
        .ok_or_else(|| MediaLoadError::Engine("media thread panicked".into()))?;
    mark_without_media(&mut res, &should_receive);
    if let Ok(mut m) = failures.lock() {
        for (_, why) in &res.failures {
            *m.entry(why.clone()).or_default() += 1;
        }
    }
    let failures = failures.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(build_report(ReportInput {
        cfg: &cfg,
        target: "switchboard",
        users: plans.len(),
        setup_ms,
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
        measured_layers,
        server_bwe_bps: bwe.iter().min().copied().zip(bwe.iter().max().copied()),
    }))
}

/// Counts a user who should have received media but got none as a failure.
pub(crate) fn mark_without_media(res: &mut EngineResults, should_receive: &[UserKey]) {
    for k in should_receive {
        if !res.first_media.contains_key(k) && !res.failures.iter().any(|(u, _)| u == k) {
            res.failures.push((*k, "no media received".to_owned()));
        }
    }
}

pub(crate) fn users_with_media(engine: &EngineHandle) -> usize {
    engine
        .live
        .users_with_media
        .load(std::sync::atomic::Ordering::Relaxed) as usize
}

pub(crate) struct ReportInput<'a> {
    pub cfg: &'a MediaLoad,
    pub target: &'static str,
    pub users: usize,
    pub setup_ms: Percentiles,
    pub join_times: &'a [JoinedUserTime],
    pub res: EngineResults,
    pub start: ServerSample,
    pub end: ServerSample,
    pub window: f64,
    pub generator_cpu: f64,
    pub rss: [u64; 3],
    pub video_layers: u64,
    pub subscriptions: u64,
    pub failures: BTreeMap<String, u64>,
    pub measured_layers: Vec<MeasuredLayer>,
    pub server_bwe_bps: Option<(u64, u64)>,
}

/// When a user started joining (for join time).
pub(crate) type JoinedUserTime = JoinedUser;

pub(crate) fn build_report(i: ReportInput<'_>) -> MediaReport {
    let res = i.res;
    let mut joins = histogram();
    let mut calls = histogram();
    for u in i.join_times {
        if let Some(first) = res.first_media.get(&u.key) {
            let ms = first.saturating_duration_since(u.joined_at).as_millis() as u64;
            let _ = joins.record(ms.max(1));
            if let Some(inv) = u.invited_at {
                let ms = first.saturating_duration_since(inv).as_millis() as u64;
                let _ = calls.record(ms.max(1));
            }
        }
    }
    let mut failed_users: std::collections::BTreeSet<UserKey> =
        res.failures.iter().map(|(u, _)| *u).collect();
    let joined: std::collections::BTreeSet<UserKey> = i.join_times.iter().map(|u| u.key).collect();
    let mut connected = 0;
    for k in 0..i.users as UserKey {
        if joined.contains(&k) && res.connected.contains_key(&k) && !failed_users.contains(&k) {
            connected += 1;
        } else {
            failed_users.insert(k);
        }
    }
    let forwarded = i.end.forwarded.saturating_sub(i.start.forwarded);
    let window = i.window.max(1e-9);
    MediaReport {
        target: i.target.to_owned(),
        rooms: i.cfg.rooms,
        publishers: i.cfg.publishers,
        subscribers: i.cfg.subscribers,
        video: i.cfg.video,
        simulcast: i.cfg.simulcast,
        audio: i.cfg.audio,
        window_secs: i.window,
        users: i.users,
        users_connected: connected,
        failures: i.failures,
        setup_ms: i.setup_ms,
        join_ms: Percentiles::of(&joins),
        invite_to_media_ms: Percentiles::of(&calls),
        sent_packets: res.sent_packets,
        sent_bytes: res.sent_bytes,
        received_packets: res.received_packets,
        received_bytes: res.received_bytes,
        received_pps: res.received_packets as f64 / window,
        received_other: res.received_other,
        expected: res.expected,
        lost: res.lost,
        loss: loss_fraction(res.lost, res.expected),
        delivered: {
            let fanout = (i.cfg.publishers + i.cfg.subscribers).saturating_sub(1) as f64
                + if i.target == "relay" && i.cfg.publishers > 1 {
                    1.0
                } else {
                    0.0
                };
            let want = res.sent_packets as f64 * fanout;
            (want > 0.0 && !i.cfg.simulcast).then(|| res.received_packets as f64 / want)
        },
        latency_us: Percentiles::of(&res.latency_us),
        verify_every: i.cfg.verify_every,
        verify_failures: res.verify_failures,
        keyframe_requests: res.keyframe_requests,
        server: ServerFigures {
            forwarded_packets: forwarded,
            forwarded_pps: forwarded as f64 / window,
            cpu_us_per_packet: cpu_us_per_packet(&i.start, &i.end),
            cpu_share: cpu_share(&i.start, &i.end, window),
            rss_bytes: i.rss,
            video_layers: i.video_layers,
            subscriptions: i.subscriptions,
            bytes_per_video_layer: bytes_per(i.rss[0], i.rss[1], i.video_layers),
            bytes_per_subscription: bytes_per(i.rss[1], i.rss[2], i.subscriptions),
        },
        generator: GeneratorFigures {
            engine_cpu_share: res.engine_cpu_seconds / window,
            process_cpu_share: i.generator_cpu / window,
            engine_us_per_received_packet: (res.received_packets > 0)
                .then(|| res.engine_cpu_seconds * 1e6 / res.received_packets as f64),
            frames_skipped: res.frames_skipped,
        },
        measured_layers: i.measured_layers,
        server_bwe_bps: i.server_bwe_bps,
    }
}

struct RoomSetup {
    call_id: String,
    invited_at: Instant,
    size: usize,
    publishers: usize,
    /// (user, publisher, caller)
    members: Vec<(UserKey, bool, bool)>,
    clients: std::collections::HashMap<UserKey, SignalClient>,
    setup_ms: Vec<u64>,
}

async fn setup_room(
    ws: &str,
    users: Vec<(UserKey, String, Option<String>)>,
    publishers: usize,
    failures: &Failures,
) -> Option<RoomSetup> {
    let n = users.len();
    let mut clients = Vec::new();
    for (key, id, token) in &users {
        let Some(token) = token else {
            fail(failures, "invalid user id");
            continue;
        };
        match SignalClient::connect(ws, token).await {
            Ok(c) => clients.push((*key, id.clone(), c)),
            Err(e) => fail(failures, format!("connect: {e}")),
        }
    }
    if clients.len() < 2 {
        return None;
    }
    let invitees: Vec<String> = clients
        .iter()
        .skip(1)
        .map(|(_, id, _)| id.clone())
        .collect();
    let t = Instant::now();
    let call_id = {
        let (_, _, caller) = clients.first()?;
        match caller
            .request(
                "call_invite",
                json!({ "invitees": invitees, "mode": "advanced", "timeout": 60 }),
            )
            .await
        {
            Ok(r) => r.get("call_id").and_then(Value::as_str)?.to_owned(),
            Err(e) => {
                fail(
                    failures,
                    format!("call_invite: {}", e.code().unwrap_or("error")),
                );
                return None;
            }
        }
    };
    let mut setup_ms = Vec::new();
    let mut members = Vec::new();
    let mut map = std::collections::HashMap::new();
    for (i, (key, _, mut c)) in clients.into_iter().enumerate() {
        if i > 0 {
            let rang = c
                .wait_for("call_invitation_received", Duration::from_secs(10))
                .await;
            if rang.is_err() {
                fail(failures, "invitation not received");
                continue;
            }
            if let Err(e) = c
                .request("call_accept", json!({ "call_id": call_id }))
                .await
            {
                fail(
                    failures,
                    format!("call_accept: {}", e.code().unwrap_or("error")),
                );
                continue;
            }
            setup_ms.push((t.elapsed().as_millis() as u64).max(1));
        }
        map.insert(key, c);
        members.push((key, i < publishers, i == 0));
    }
    Some(RoomSetup {
        call_id,
        invited_at: t,
        size: n,
        publishers: members.iter().filter(|(_, p, _)| *p).count(),
        members,
        clients: map,
        setup_ms,
    })
}

async fn measured(
    http: &reqwest::Client,
    url: &str,
    admin: Option<&str>,
    call_id: &str,
) -> (Vec<MeasuredLayer>, Vec<u64>) {
    let Some(admin) = admin else {
        return (Vec::new(), Vec::new());
    };
    let Ok(r) = http
        .get(format!("{}/v1/rooms/{call_id}", url.trim_end_matches('/')))
        .bearer_auth(admin)
        .send()
        .await
    else {
        return (Vec::new(), Vec::new());
    };
    let Ok(v) = r.json::<Value>().await else {
        return (Vec::new(), Vec::new());
    };
    let mut out = Vec::new();
    let mut bwe = Vec::new();
    let empty = Vec::new();
    for p in v
        .get("participants")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let user = p.get("user_id").and_then(Value::as_str).unwrap_or("");
        if let Some(b) = p.get("bandwidth_estimate").and_then(Value::as_u64) {
            bwe.push(b);
        }
        for t in p.get("tracks").and_then(Value::as_array).unwrap_or(&empty) {
            if t.get("kind").and_then(Value::as_str) != Some("video") {
                continue;
            }
            for l in t.get("layers").and_then(Value::as_array).unwrap_or(&empty) {
                let n = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
                out.push(MeasuredLayer {
                    call_id: call_id.to_owned(),
                    user_id: user.to_owned(),
                    rid: l
                        .get("rid")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    width: n("width") as u32,
                    height: n("height") as u32,
                    bitrate: n("bitrate"),
                });
            }
        }
    }
    (out, bwe)
}

pub(crate) fn progress_bar(d: Duration) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(d.as_millis() as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

pub(crate) fn update_bar(
    b: &indicatif::ProgressBar,
    engine: &EngineHandle,
    users: usize,
    t0: Instant,
    last: (Instant, u64, u64),
) -> (Instant, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let l = &engine.live;
    let now = Instant::now();
    let (sent, recv) = (l.sent.load(Relaxed), l.received.load(Relaxed));
    let dt = now
        .saturating_duration_since(last.0)
        .as_secs_f64()
        .max(1e-3);
    let expected = l.expected.load(Relaxed);
    let loss = loss_fraction(l.lost.load(Relaxed), expected) * 100.0;
    b.set_position(t0.elapsed().as_millis() as u64);
    b.set_message(format!(
        "{} users, {} receiving media, {} connections up | send {:.0} pkt/s | recv {:.0} pkt/s | loss {:.2}% | latency p50 {} µs p99 {} µs",
        users,
        users_with_media(engine).min(users),
        l.connected.load(Relaxed),
        (sent.saturating_sub(last.1)) as f64 / dt,
        (recv.saturating_sub(last.2)) as f64 / dt,
        loss,
        l.latency_p50_us.load(Relaxed),
        l.latency_p99_us.load(Relaxed),
    ));
    (now, sent, recv)
}

impl MediaReport {
    /// The report as text.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let video = self
            .video
            .map(|v| {
                format!(
                    "{}x{}@{} {} kbit/s{}",
                    v.width,
                    v.height,
                    v.fps,
                    v.bitrate / 1000,
                    if self.simulcast { " simulcast" } else { "" }
                )
            })
            .unwrap_or_else(|| "no video".into());
        s.push_str(&format!(
            "media load on {}: {} rooms × ({} publishers + {} subscribers), {}{}; {:.1} s measured\n",
            self.target,
            self.rooms,
            self.publishers,
            self.subscribers,
            video,
            if self.audio { " + opus" } else { "" },
            self.window_secs
        ));
        s.push_str(&format!(
            "  users: {}/{} connected; failures: {}\n",
            self.users_connected,
            self.users,
            if self.failures.is_empty() {
                "none".to_owned()
            } else {
                self.failures
                    .iter()
                    .map(|(k, v)| format!("{k} ×{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        s.push_str(&format!(
            "  setup (invite→accepted) ms: p50 {} p99 {}; join (rtc_join→first media) ms: p50 {} p99 {}; invite→first media ms: p50 {} p99 {}\n",
            self.setup_ms.p50,
            self.setup_ms.p99,
            self.join_ms.p50,
            self.join_ms.p99,
            self.invite_to_media_ms.p50,
            self.invite_to_media_ms.p99
        ));
        s.push_str(&format!(
            "  sent: {} packets, {:.1} MB; forwarded by server: {} ({:.0}/s); received: {} ({:.0}/s, {:.1} MB), other RTP {}\n",
            self.sent_packets,
            self.sent_bytes as f64 / 1e6,
            self.server.forwarded_packets,
            self.server.forwarded_pps,
            self.received_packets,
            self.received_pps,
            self.received_bytes as f64 / 1e6,
            self.received_other
        ));
        s.push_str(&format!(
            "  loss: {} of {} ({:.3}%); delivered {} of sent × fan-out; keyframe requests received by publishers: {}\n",
            self.lost,
            self.expected,
            self.loss * 100.0,
            self.delivered
                .map_or("n/a (simulcast)".to_owned(), |d| format!("{:.1}%", d * 100.0)),
            self.keyframe_requests
        ));
        s.push_str(&format!(
            "  forwarding latency µs (1 in {} packets, {} timed, {} failed verification): p50 {} p95 {} p99 {} max {}\n",
            self.verify_every,
            self.latency_us.count,
            self.verify_failures,
            self.latency_us.p50,
            self.latency_us.p95,
            self.latency_us.p99,
            self.latency_us.max
        ));
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.2} {unit}"));
        s.push_str(&format!(
            "  server CPU: {} per forwarded packet, {} of a core\n",
            opt(self.server.cpu_us_per_packet, "µs"),
            opt(self.server.cpu_share.map(|c| c * 100.0), "%")
        ));
        s.push_str(&format!(
            "  server RSS MiB: {:.1} → {:.1} (publishers) → {:.1} (subscribers); {} per video layer, {} per subscription\n",
            self.server.rss_bytes[0] as f64 / 1048576.0,
            self.server.rss_bytes[1] as f64 / 1048576.0,
            self.server.rss_bytes[2] as f64 / 1048576.0,
            opt(self.server.bytes_per_video_layer.map(|b| b / 1024.0), "KiB"),
            opt(self.server.bytes_per_subscription.map(|b| b / 1024.0), "KiB"),
        ));
        s.push_str(&format!(
            "  generator: media thread {:.1}% of a core ({} per received packet), process {:.1}%; frames skipped {}\n",
            self.generator.engine_cpu_share * 100.0,
            opt(self.generator.engine_us_per_received_packet, "µs"),
            self.generator.process_cpu_share * 100.0,
            self.generator.frames_skipped
        ));
        if !self.measured_layers.is_empty() {
            let mut seen: BTreeMap<(u32, u32, String), usize> = BTreeMap::new();
            for l in &self.measured_layers {
                *seen.entry((l.width, l.height, l.rid.clone())).or_default() += 1;
            }
            let list: Vec<String> = seen
                .iter()
                .map(|((w, h, rid), n)| {
                    if rid.is_empty() {
                        format!("{w}x{h} ×{n}")
                    } else {
                        format!("{rid}:{w}x{h} ×{n}")
                    }
                })
                .collect();
            s.push_str(&format!("  server-measured layers: {}\n", list.join(", ")));
        }
        if self.generator.frames_skipped > 0 {
            s.push_str(&format!(
                "  WARNING: the generator fell behind its schedule and skipped {} frames (was its core busy?): the figures above understate the load\n",
                self.generator.frames_skipped
            ));
        }
        if let Some((lo, hi)) = self.server_bwe_bps {
            s.push_str(&format!(
                "  server bandwidth estimates of subscriber connections: {} to {} kbit/s\n",
                lo / 1000,
                hi / 1000
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg() -> MediaLoad {
        MediaLoad {
            url: String::new(),
            metrics_url: String::new(),
            secret: String::new(),
            rooms: 1,
            publishers: 1,
            subscribers: 2,
            video: VideoSpec::parse("640x360@15:300k").ok(),
            simulcast: false,
            audio: false,
            duration: Duration::from_secs(2),
            ramp: Duration::ZERO,
            verify_every: 1,
            bind_ip: "127.0.0.1".parse().expect("ip"),
            progress: false,
        }
    }

    fn results(t0: Instant) -> EngineResults {
        let mut h = histogram();
        for us in [100, 200, 300, 400] {
            let _ = h.record(us);
        }
        EngineResults {
            sent_packets: 100,
            sent_bytes: 100_000,
            received_packets: 150,
            received_bytes: 160_000,
            received_other: 0,
            expected: 160,
            lost: 10,
            latency_us: h,
            verified: 4,
            verify_failures: 0,
            keyframe_requests: 1,
            frames_skipped: 0,
            engine_cpu_seconds: 0.1,
            // User 1 got media 250 ms after joining; user 2 got none.
            first_media: HashMap::from([(1, t0 + Duration::from_millis(250))]),
            connected: HashMap::from([(0, t0), (1, t0), (2, t0)]),
            failures: Vec::new(),
        }
    }

    #[test]
    fn the_report_adds_up() {
        let t0 = Instant::now();
        let mut res = results(t0);
        mark_without_media(&mut res, &[1, 2]);
        assert_eq!(res.failures, vec![(2, "no media received".to_owned())]);
        let joined: Vec<JoinedUserTime> = (0..3)
            .map(|key| JoinedUserTime {
                key,
                joined_at: t0,
                invited_at: Some(t0 - Duration::from_millis(100)),
            })
            .collect();
        let start = ServerSample {
            cpu_seconds: 1.0,
            forwarded: 1_000,
            rss_bytes: 10 << 20,
        };
        let end = ServerSample {
            cpu_seconds: 1.002,
            forwarded: 1_200,
            rss_bytes: 12 << 20,
        };
        let r = build_report(ReportInput {
            cfg: &cfg(),
            target: "switchboard",
            users: 3,
            setup_ms: Percentiles::default(),
            join_times: &joined,
            res,
            start,
            end,
            window: 2.0,
            generator_cpu: 0.2,
            rss: [10 << 20, 11 << 20, 12 << 20],
            video_layers: 1,
            subscriptions: 2,
            failures: BTreeMap::new(),
            measured_layers: Vec::new(),
            server_bwe_bps: None,
        });
        assert_eq!(
            r.users_connected, 2,
            "the user without media is not counted"
        );
        assert_eq!(r.join_ms.count, 1);
        assert_eq!(r.join_ms.p50, 250);
        assert_eq!(r.invite_to_media_ms.p50, 350);
        assert_eq!(r.server.forwarded_packets, 200);
        assert!((r.server.forwarded_pps - 100.0).abs() < 1e-9);
        // 2 ms of CPU for 200 packets.
        assert!((r.server.cpu_us_per_packet.unwrap_or(0.0) - 10.0).abs() < 1e-6);
        assert_eq!(r.server.bytes_per_video_layer, Some(1_048_576.0));
        assert_eq!(r.server.bytes_per_subscription, Some(524_288.0));
        assert!((r.loss - 10.0 / 160.0).abs() < 1e-12);
        // 150 received of 100 sent × 2 subscribers.
        assert_eq!(r.delivered, Some(0.75));
        assert_eq!(r.latency_us.p50, 200);
        assert!((r.generator.engine_cpu_share - 0.05).abs() < 1e-9);
    }
}
