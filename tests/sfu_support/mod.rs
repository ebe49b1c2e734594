//! Shared harness for the SFU integration tests: a collecting `MediaSink`, a participant agent
//! that answers the server's subscriber offers with a real `webrtc` client, and fake VP8/Opus
//! payloads.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::client::{Outgoing, Publisher, Received, Subscriber, TrackSpec};
use switchboard::config::MediaConfig;
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::sfu::{ConsumerUpdate, MediaSink, RtcEvent, Sfu};
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
        bind: LOCALHOST,
        public_ips: vec![],
        workers,
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
                    if let RtcEvent::RtcOffer { sdp, .. } = &ev {
                        let sdp = match &offer_filter { Some(f) => f(sdp.clone()), None => sdp.clone() };
                        let answer = sub.accept_offer(sdp).await.expect("client accepts offer");
                        sfu2.answer(&room2, &user2, answer).await.expect("server accepts answer");
                        *answered.lock().unwrap() += 1;
                    }
                    if out_tx.send(ev).is_err() { return; }
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

/// Sends video frames (one packet each; a keyframe every `key_every`) and audio packets on a
/// publisher's tracks until `done` says stop or `timeout` passes. `layers` lists the rids to send
/// on track 0 (empty: single layer) with their sizes. Returns whether `done` fired.
pub async fn pump_until(
    publisher: &Publisher,
    video_track: Option<usize>,
    audio_track: Option<usize>,
    layers: &[(Option<&str>, u16, u16)],
    key_every: u32,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    let mut frame: u32 = 0;
    while start.elapsed() < timeout {
        if let Some(vt) = video_track {
            for (rid, w, h) in layers {
                let key = frame % key_every == 0;
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
        if let Some(at) = audio_track {
            let tag = format!("a:{frame}");
            publisher
                .write(
                    at,
                    None,
                    Outgoing {
                        timestamp: frame.wrapping_mul(960),
                        marker: false,
                        payload: Bytes::from(tag.into_bytes()),
                        audio_level: Some(30),
                    },
                )
                .await
                .expect("write audio");
        }
        frame += 1;
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
