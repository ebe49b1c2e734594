//! Shared harness for the SFU integration tests: a collecting `MediaSink`, a participant agent
//! that answers the server's subscriber offers with a real `webrtc` client, and fake VP8/Opus
//! payloads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::client::rtc::{Outgoing, Publisher, Received, Subscriber, TrackSpec};
use switchboard::config::MediaConfig;
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::sfu::{ConsumerUpdate, MediaSink, RtcEvent, Sfu, SfuError};
use tokio::sync::mpsc;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Routes events to per-session channels; records billing updates and room counts.
#[derive(Default)]
pub struct Collector {
    sessions: Mutex<HashMap<SessionId, mpsc::UnboundedSender<RtcEvent>>>,
    pub consumers: Mutex<Vec<ConsumerUpdate>>,
    pub rooms: Mutex<Vec<(CallId, usize)>>,
}

impl MediaSink for Collector {
    fn deliver(&self, session: SessionId, event: RtcEvent) {
        if let Some(tx) = self.sessions.lock().unwrap().get(&session) {
            let _ = tx.send(event);
        }
    }
    fn room_changed(&self, room: &CallId, participants: usize, _at_ms: u64) {
        self.rooms
            .lock()
            .unwrap()
            .push((room.clone(), participants));
    }
    fn consumer_changed(&self, update: ConsumerUpdate) {
        self.consumers.lock().unwrap().push(update);
    }
}

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn start(workers: usize) -> (Sfu, Arc<Collector>) {
    init_log();
    let cfg = MediaConfig {
        udp_port: 0,
        tcp_port: 0,
        bind: LOCALHOST,
        public_ips: vec![],
        workers,
        ..MediaConfig::default()
    };
    let sink = Arc::new(Collector::default());
    let sfu = Sfu::start(&cfg, sink.clone()).expect("sfu starts");
    (sfu, sink)
}

/// One test participant: its events (after the agent answered offers) and received packets.
pub struct Peer {
    pub user: UserId,
    pub session: SessionId,
    pub room: CallId,
    pub events: mpsc::UnboundedReceiver<RtcEvent>,
    pub packets: mpsc::UnboundedReceiver<Received>,
    pub publisher: Option<Publisher>,
    /// Offers the agent answered.
    pub offers_answered: Arc<Mutex<u32>>,
}

static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Registers a session, joins the room, and starts an agent that answers subscriber offers.
/// `offer_filter` may rewrite each server offer before the client sees it (e.g. to point the
/// client at a relay).
pub async fn join(
    sfu: &Sfu,
    sink: &Arc<Collector>,
    room: &CallId,
    user: &str,
    offer_filter: Option<Arc<dyn Fn(String) -> String + Send + Sync>>,
) -> Peer {
    let user = UserId::parse(user).unwrap();
    let session = SessionId(NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    sink.sessions.lock().unwrap().insert(session, ev_tx);
    let (out_tx, events) = mpsc::unbounded_channel();
    let (pkt_tx, packets) = mpsc::unbounded_channel();
    let mut sub = Subscriber::new(LOCALHOST).await.expect("subscriber pc");
    let offers_answered = Arc::new(Mutex::new(0));
    let answered = offers_answered.clone();
    let (sfu2, room2, user2) = (sfu.clone(), room.clone(), user.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = ev_rx.recv() => {
                    let Some(ev) = ev else { return };
                    let offer = match &ev { RtcEvent::RtcOffer { sdp, .. } => Some(sdp.clone()), _ => None };
                    // Pass the event on first, so the test sees events in server order.
                    if out_tx.send(ev).is_err() { return; }
                    if let Some(sdp) = offer {
                        let sdp = match &offer_filter { Some(f) => f(sdp), None => sdp };
                        let answer = sub.accept_offer(sdp).await.expect("client accepts offer");
                        match sfu2.answer(&room2, &user2, answer).await {
                            Ok(()) => *answered.lock().unwrap() += 1,
                            // The engine stopped or the participant left meanwhile.
                            Err(SfuError::Unavailable | SfuError::NotJoined) => return,
                            Err(e) => panic!("server refused the answer: {e}"),
                        }
                    }
                }
                p = sub.next() => {
                    let Some(p) = p else { return };
                    if pkt_tx.send(p).is_err() { return; }
                }
            }
        }
    });
    sfu.join(room.clone(), user.clone(), session)
        .await
        .expect("join");
    Peer {
        user,
        session,
        room: room.clone(),
        events,
        packets,
        publisher: None,
        offers_answered,
    }
}

impl Peer {
    /// Publishes these tracks and waits until the publisher connection is up.
    pub async fn publish(&mut self, sfu: &Sfu, specs: &[TrackSpec]) {
        let mut p = Publisher::new(LOCALHOST, self.user.as_str(), specs)
            .await
            .expect("publisher pc");
        let offer = p.offer().await.expect("offer");
        let answer = sfu
            .publish(&self.room, &self.user, offer)
            .await
            .expect("server answers");
        p.set_answer(answer).await.expect("client takes answer");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("publisher connects");
        self.publisher = Some(p);
    }

    /// Waits for an event matching `f`, returning it; other events are kept in `seen`.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&RtcEvent) -> bool,
    ) -> Option<RtcEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            if f(&ev) {
                return Some(ev);
            }
        }
    }

    pub fn drain_packets(&mut self) -> Vec<Received> {
        let mut v = Vec::new();
        while let Ok(p) = self.packets.try_recv() {
            v.push(p);
        }
        v
    }

    pub fn publisher(&self) -> &Publisher {
        self.publisher.as_ref().expect("published")
    }
}

/// A fake VP8 payload: descriptor with a 15-bit picture ID, then a frame header (keyframes carry
/// the start code and the size), then `tag` so tests can tell packets apart.
pub fn vp8(key: bool, picture_id: u16, w: u16, h: u16, tag: &[u8]) -> Bytes {
    let mut v = vec![
        0x90,
        0x80,
        0x80 | ((picture_id >> 8) as u8 & 0x7f),
        picture_id as u8,
    ];
    if key {
        // Frame tag: keyframe (P=0), version 0, show_frame=1; then start code, width, height.
        v.extend_from_slice(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]);
        v.extend_from_slice(&w.to_le_bytes());
        v.extend_from_slice(&h.to_le_bytes());
    } else {
        v.extend_from_slice(&[0x11, 0x02, 0x00]);
    }
    v.extend_from_slice(tag);
    Bytes::from(v)
}

/// The bytes after the fake VP8 payload descriptor (4 bytes), which the SFU never rewrites.
pub fn vp8_body(payload: &[u8]) -> &[u8] {
    payload.get(4..).unwrap_or(&[])
}

/// How [`pump_until`] sends.
#[derive(Clone)]
pub struct Pump<'a> {
    /// Track index of the video track, if any.
    pub video: Option<usize>,
    /// Track index of the audio track, if any.
    pub audio: Option<usize>,
    /// Video layers: rid (None for one layer), width, height.
    pub layers: &'a [(Option<&'a str>, u16, u16)],
    /// A keyframe every this many frames.
    pub key_every: u32,
    /// Send a keyframe on a layer right after the server asked for one (a PLI handler).
    pub honor_pli: bool,
    /// Audio level in -dBov.
    pub audio_level: u8,
}

impl Default for Pump<'_> {
    fn default() -> Self {
        Self {
            video: None,
            audio: None,
            layers: &[(None, 640, 360)],
            key_every: 30,
            honor_pli: true,
            audio_level: 30,
        }
    }
}

static FRAME: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sends video frames (one packet each) and audio packets every 20 ms until `done` says stop or
/// `timeout` passes. Returns whether `done` fired.
pub async fn pump_until(
    publisher: &Publisher,
    opts: Pump<'_>,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    let mut plis: HashMap<Option<String>, u64> = HashMap::new();
    while start.elapsed() < timeout {
        // One process-wide frame counter, so timestamps keep rising across calls.
        let frame = FRAME.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(vt) = opts.video {
            for (rid, w, h) in opts.layers {
                let requests = publisher.keyframe_requests(vt, *rid);
                let asked = opts.honor_pli
                    && plis.insert(rid.map(str::to_owned), requests).unwrap_or(0) < requests;
                let key = frame.is_multiple_of(opts.key_every) || asked;
                let tag = format!("v:{}:{}", rid.unwrap_or("-"), frame);
                let payload = vp8(key, (frame % 30000) as u16, *w, *h, tag.as_bytes());
                publisher
                    .write(
                        vt,
                        *rid,
                        Outgoing {
                            timestamp: frame.wrapping_mul(3000),
                            marker: true,
                            payload,
                            audio_level: None,
                        },
                    )
                    .await
                    .expect("write video");
            }
        }
        if let Some(at) = opts.audio {
            let tag = format!("a:{frame}");
            publisher
                .write(
                    at,
                    None,
                    Outgoing {
                        timestamp: frame.wrapping_mul(960),
                        marker: false,
                        payload: Bytes::from(tag.into_bytes()),
                        audio_level: Some(opts.audio_level),
                    },
                )
                .await
                .expect("write audio");
        }
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Whether a received packet is (fake) VP8.
pub fn is_video(p: &Received) -> bool {
    p.payload.first() == Some(&0x90)
}

/// Whether a received fake VP8 packet starts a keyframe.
pub fn is_key(p: &Received) -> bool {
    is_video(p) && p.payload.get(4).is_some_and(|b| b & 1 == 0)
}

/// The layer tag (`q`, `h`, `f`, `-`) of a received fake VP8 packet.
pub fn layer_of(p: &Received) -> Option<char> {
    let body = vp8_body(&p.payload);
    let i = body.windows(2).position(|w| w == b"v:")?;
    body.get(i + 2).map(|b| *b as char)
}
