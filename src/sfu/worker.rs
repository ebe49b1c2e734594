//! A media worker: owns whole rooms and every `Rtc` in them, runs their poll loops, forwards
//! packets between them, and answers commands from the async API.
//!
//! One loop iteration: wait for a message (a command or a batch of datagrams) or the earliest
//! `Rtc` timeout; handle it; feed timeouts; process the queued `Rtc` events (this is where
//! forwarding happens); run the periodic tick (layer selection, speakers, liveness); send
//! everything the round produced with `sendmmsg`; flush counters.
//!
//! str0m's single-mutation rule is kept by construction: every mutation of an `Rtc`
//! (`handle_input`, `write_rtp`, an SDP change, a keyframe request) is followed at once by
//! [`drain`], which polls it to its timeout, queueing transmits into the round's send batch and
//! events into the worker's event queue. Events are handled after the drain, one by one, so
//! handling one (which may mutate other `Rtc`s) never re-enters a poll loop.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, PayloadParams};
use str0m::media::{Direction, KeyframeRequestKind, MediaKind as StrMediaKind, Mid, Pt, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo, Ssrc, Vp8Descriptor};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};

use super::forwarder::{Decision, DropReason, Forwarder, MediaKind, PacketInfo};
use super::keyframe::KeyframeThrottle;
use super::layers::{Cap, LayerSelector, LayerState, UPGRADE_HEADROOM, wanted};
use super::limits::{CandidateSet, LimitError, MediaLimits, candidate_key};
use super::net::{self, DatagramBatch, IoMsg};
use super::rewriter::{RtpIn, RtpRewriter, Vp8Munger};
use super::speakers::SpeakerDetector;
use super::tcp::{TcpCounters, TcpWriters};
use super::{
    Command, ConsumerUpdate, Counters, Forwarding, IceCandidateInit, JoinResult, LayerInfo,
    MediaSink, ParticipantInfo, ParticipantTracks, PcTarget, RoomInfo, RtcEvent, SfuError,
    SubscriptionInfo, Track, TrackInfo, TrackKind, WorkerMsg,
};
use crate::codec::{Resolution, ResolutionProbe, VideoCodec, is_keyframe_start};
use crate::fault::{self, Contained};
use crate::ids::{CallId, SessionId, TrackId, UserId};
use crate::metrics as m;

/// Packets kept per forwarded video stream to answer NACKs (str0m's default is 2000 over 3 s). str0m
/// keeps each as a 408-byte struct (the payload itself is shared), so this is most of a video
/// subscription's memory: 256 entries are about 100 KiB, and still a second of repair at 2 Mbit/s
/// (0.6 s at 4 Mbit/s), far more than a NACK round trip.
const RTX_CACHE_PACKETS: usize = 256;

/// The error for an SDP or candidate whose handling panicked inside str0m (contained: only that
/// connection is lost).
const ENGINE_REFUSED: &str =
    "the media engine failed on this input and closed the connection; join the room again";
/// How long a forwarded packet can still be resent.
const RTX_CACHE_AGE: Duration = Duration::from_millis(1000);
/// Above this share of a stream's bytes in the last second being resends, str0m drops every
/// queued resend. Its default, 0.15, trips often at 10% loss (each loss costs a resend, a lost
/// resend another), and then the subscriber's video freezes until a later NACK gets through
/// (seen as 1-2 s stalls in tests/interop/test_loss.py). 0.5 still froze the picture for ~1.6 s
/// under reordering (tests/interop/test_impaired_link.py, 20 ms jitter): aiortc NACKs every
/// reordered packet and repeats all it still misses in each NACK, and str0m 0.25 resends a packet
/// each time it is asked (it has no once-per-RTT suppression, str0m issue 744), so a 100 ms link
/// asks for each loss several times while the first resend is in flight. 0.8 lets resends reach
/// four times the stream's own bytes, which covers that, and still bounds what a subscriber's NACKs
/// can make the server send: at most five times the stream it chose, on its own downlink, where
/// transport-cc sees the resends too and lowers the layer (and so the bound) if they congest it.
const RTX_RATIO_CAP: Option<f32> = Some(0.8);

/// What an audio consumer counts for in the estimator's targets.
const AUDIO_BPS: u64 = 48_000;

/// Estimator targets change in steps of this, so that measured bitrates wobbling by a few
/// percent do not reconfigure it every tick.
const PROBE_STEP_BPS: u64 = 50_000;

fn quantize(bps: u64) -> u64 {
    bps.div_ceil(PROBE_STEP_BPS) * PROBE_STEP_BPS
}

/// How often layer selection, bitrate measurement, speakers and liveness run.
const TICK: Duration = Duration::from_millis(100);
/// A layer with no packet for this long is inactive.
const LAYER_IDLE: Duration = Duration::from_millis(1500);
/// A connection that received nothing for this long is dead.
const CONN_IDLE: Duration = Duration::from_secs(20);
/// A connected client's check from a new address moves the media path there (see
/// `net::promote_binding_request`) once nothing has come from the current path for this long.
const REBIND_SILENCE: Duration = Duration::from_millis(1000);
/// A connection whose ICE failed is kept this long for the client to restart ICE.
const ICE_RESTART_GRACE: Duration = Duration::from_secs(15);
/// A connection that never connected is given up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most messages handled per loop iteration before feeding timeouts and flushing.
const MAX_MSGS_PER_ROUND: usize = 32;
/// Starting bandwidth estimate for subscriber connections.
const INITIAL_BWE_KBPS: u64 = 2_500;
/// Most source addresses one connection is reached from (one per client candidate its checks
/// come from; browsers have a handful). Bounds the worker's address map and the I/O thread's
/// routes per connection: str0m still answers checks from further addresses, but they get no
/// route, so nothing but STUN from them reaches the connection.
const MAX_ADDRS_PER_CONN: usize = 16;

type ConnId = u64;

pub(crate) struct WorkerInit {
    pub idx: usize,
    pub socket: Arc<std::net::UdpSocket>,
    pub candidates: Vec<SocketAddr>,
    /// ICE-TCP passive candidates (empty with `[media] ice_tcp` off).
    pub tcp_candidates: Vec<SocketAddr>,
    pub tcp_writers: Arc<TcpWriters>,
    pub tcp_counters: Arc<TcpCounters>,
    pub restarted: Arc<net::UfragRoutes>,
    pub sink: Arc<dyn MediaSink>,
    pub io_tx: mpsc::Sender<IoMsg>,
    pub counters: Arc<Counters>,
    pub backlog: Arc<AtomicU64>,
    pub limits: MediaLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Publisher,
    Subscriber,
}

struct Conn {
    rtc: Rtc,
    room: CallId,
    user: UserId,
    role: Role,
    ufrag: String,
    /// The server ufrag of an ICE restart offered but not answered yet (routed already, so that
    /// the client's checks with it reach the connection as soon as it applies the offer).
    next_ufrag: Option<String>,
    /// Since when ICE has been disconnected (the path failed): the client may restart ICE
    /// within [`ICE_RESTART_GRACE`] before the connection is given up.
    ice_down_since: Option<Instant>,
    /// Where str0m sends this connection's media (its nominated path), and when a datagram last
    /// came from there: a check from elsewhere after [`REBIND_SILENCE`] is a NAT rebinding.
    send_to: Option<(Protocol, SocketAddr)>,
    send_to_rx: Instant,
    /// UDP source addresses this connection accepted checks from (the I/O thread routes them).
    addrs: Vec<SocketAddr>,
    /// ICE-TCP connections (by client address) this connection accepted checks on.
    tcp_addrs: Vec<SocketAddr>,
    next_timeout: Instant,
    created: Instant,
    last_rx: Instant,
    connected: bool,
    dead: bool,
    /// Publisher: SSRC → (track, layer index).
    ssrc_map: HashMap<Ssrc, (TrackId, usize)>,
    /// Subscriber: cumulative egress stats per mid, for NACK/RTX deltas.
    egress: HashMap<Mid, (u64, u64)>,
    /// The distinct remote candidates the client gave (SDP and trickled), bounded.
    candidates: CandidateSet,
}

struct Layer {
    rid: Option<Rid>,
    ssrc: Option<Ssrc>,
    probe: Option<ResolutionProbe>,
    resolution: Option<Resolution>,
    throttle: KeyframeThrottle,
    bytes: u64,
    window_start: Instant,
    bitrate: u64,
    last_at: Option<Instant>,
}

struct PubTrack {
    id: TrackId,
    owner: UserId,
    conn: ConnId,
    mid: Mid,
    kind: MediaKind,
    codec: Option<Codec>,
    video_codec: Option<VideoCodec>,
    clock_rate: u32,
    pt_params: Vec<(Pt, PayloadParams)>,
    layers: Vec<Layer>,
}

impl PubTrack {
    fn wire(&self) -> Track {
        Track {
            track_id: self.id.clone(),
            user_id: self.owner.clone(),
            kind: match self.kind {
                MediaKind::Audio => TrackKind::Audio,
                MediaKind::Video => TrackKind::Video,
            },
            mid: self.mid.to_string(),
            rids: self
                .layers
                .iter()
                .filter_map(|l| l.rid.map(|r| r.to_string()))
                .collect(),
        }
    }

    fn layer_states(&self, now: Instant) -> Vec<LayerState> {
        self.layers
            .iter()
            .map(|l| LayerState {
                width: l.resolution.map_or(0, |r| r.width),
                height: l.resolution.map_or(0, |r| r.height),
                bitrate: l.bitrate,
                active: l
                    .last_at
                    .is_some_and(|t| now.saturating_duration_since(t) < LAYER_IDLE),
            })
            .collect()
    }

    /// Layer indices ordered lowest quality first: by measured pixels, then publisher order.
    fn quality_order(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.layers.len()).collect();
        let all_measured = self.layers.iter().all(|l| l.resolution.is_some());
        if all_measured {
            idx.sort_by_key(|&i| {
                self.layers
                    .get(i)
                    .and_then(|l| l.resolution)
                    .map_or(0, |r| u64::from(r.width) * u64::from(r.height))
            });
        }
        idx
    }
}

struct Consumer {
    track: TrackId,
    mid: Mid,
    ssrc: Option<Ssrc>,
    pt_map: Vec<(Pt, Option<Pt>)>,
    forwarder: Forwarder,
    rewriter: Option<RtpRewriter>,
    vp8: Vp8Munger,
    selector: LayerSelector,
    enabled: bool,
    cap: Cap,
    /// What billing was last told.
    reported: Forwarding,
    written: u64,
    last_layer: Option<usize>,
}

struct Participant {
    user: UserId,
    session: SessionId,
    publisher: Option<ConnId>,
    subscriber: Option<ConnId>,
    pending_offer: Option<SdpPendingOffer>,
    renegotiate: bool,
    /// The subscriber connection has had an answer accepted (see `renegotiate`).
    sub_answered: bool,
    /// An ICE restart of the subscriber connection was asked for and not offered yet.
    ice_restart: bool,
    consumers: HashMap<TrackId, Consumer>,
    bwe: Option<u64>,
    /// The (minimum, desired) bitrates last given to the subscriber connection's estimator.
    probe_target: (u64, u64),
    joined_seq: u64,
}

struct Room {
    id: CallId,
    participants: HashMap<UserId, Participant>,
    tracks: HashMap<TrackId, PubTrack>,
    speakers: SpeakerDetector<UserId>,
    /// The room is being closed: participants go one by one, and nobody is re-offered.
    closing: bool,
}

/// Per-round counters, flushed to metrics and [`Counters`] once per loop iteration.
#[derive(Default)]
struct RoundStats {
    packets_in: u64,
    bytes_in: u64,
    forwarded: u64,
    bytes_forwarded: u64,
    dropped: [u64; 5],
    keyframe_requests: u64,
    nacks: u64,
    rtx: u64,
    layer_switches: u64,
    dwell: Vec<Instant>,
}

const DROP_LABELS: [&str; 5] = [
    "paused",
    "other_layer",
    "waiting_keyframe",
    "duplicate",
    "not_negotiated",
];

fn drop_index(r: DropReason) -> usize {
    match r {
        DropReason::Paused => 0,
        DropReason::OtherLayer => 1,
        DropReason::WaitingForKeyframe => 2,
    }
}

pub(crate) struct Worker {
    idx: usize,
    socket: Arc<std::net::UdpSocket>,
    candidates: Vec<SocketAddr>,
    tcp_candidates: Vec<SocketAddr>,
    tcp_writers: Arc<TcpWriters>,
    tcp_counters: Arc<TcpCounters>,
    restarted: Arc<net::UfragRoutes>,
    sink: Arc<dyn MediaSink>,
    io_tx: mpsc::Sender<IoMsg>,
    counters: Arc<Counters>,
    backlog: Arc<AtomicU64>,
    limits: MediaLimits,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    by_addr: HashMap<(Protocol, SocketAddr), ConnId>,
    by_ufrag: HashMap<String, ConnId>,
    rooms: HashMap<CallId, Room>,
    out: Outbox,
    events: VecDeque<(ConnId, Event)>,
    stats: RoundStats,
    next_tick: Instant,
    join_seq: u64,
    epoch: (Instant, u64),
    /// One DTLS certificate for every connection of this worker: generating a key pair per
    /// connection costs milliseconds of CPU on each join.
    dtls_cert: Option<str0m::config::DtlsCert>,
}

/// What a round sends: UDP datagrams (one `sendmmsg`) and ICE-TCP packets (onto their
/// connections' queues).
#[derive(Default)]
struct Outbox {
    udp: Vec<(SocketAddr, Vec<u8>)>,
    tcp: Vec<(SocketAddr, Vec<u8>)>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.udp.is_empty() && self.tcp.is_empty()
    }
}

/// After a panic inside one of `conn`'s str0m calls ([`fault::contain`]): its `Rtc` can no longer
/// be trusted, so it is marked closed (nothing calls into it again: [`drain`] and `close_conn`
/// look at `is_alive` first, timers skip dead connections) and the participant is removed at the
/// end of the round, as for a connection that died.
fn poisoned(conn: &mut Conn) {
    tracing::warn!(user = %conn.user, room = %conn.room, "closing a media connection whose engine panicked");
    conn.rtc.disconnect();
    conn.dead = true;
}

/// Polls `rtc` until its timeout: transmits go to `out`, events to `events`.
fn drain(id: ConnId, conn: &mut Conn, out: &mut Outbox, events: &mut VecDeque<(ConnId, Event)>) {
    loop {
        if !conn.rtc.is_alive() {
            conn.dead = true;
            return;
        }
        let Ok(output) = fault::contain(|| conn.rtc.poll_output()) else {
            poisoned(conn);
            return;
        };
        match output {
            Ok(Output::Timeout(t)) => {
                conn.next_timeout = t;
                return;
            }
            Ok(Output::Transmit(t)) => match t.proto {
                // Media (not STUN, whose responses go wherever a check came from) shows the path.
                _ if !net::is_stun(&t.contents)
                    && conn.send_to != Some((t.proto, t.destination)) =>
                {
                    conn.send_to = Some((t.proto, t.destination));
                    conn.send_to_rx = Instant::now();
                    match t.proto {
                        Protocol::Udp => out.udp.push((t.destination, t.contents.into())),
                        _ => out.tcp.push((t.destination, t.contents.into())),
                    }
                }
                Protocol::Udp => out.udp.push((t.destination, t.contents.into())),
                _ => out.tcp.push((t.destination, t.contents.into())),
            },
            Ok(Output::Event(e)) => events.push_back((id, e)),
            Err(e) => {
                tracing::debug!(error = %e, user = %conn.user, "rtc failed");
                conn.dead = true;
                conn.rtc.disconnect();
                return;
            }
        }
    }
}

fn random_token(n: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn video_codec_of(c: Codec) -> Option<VideoCodec> {
    match c {
        Codec::Vp8 => Some(VideoCodec::Vp8),
        Codec::Vp9 => Some(VideoCodec::Vp9),
        Codec::H264 => Some(VideoCodec::H264),
        Codec::Av1 => Some(VideoCodec::Av1),
        _ => None,
    }
}

fn mime_of(kind: MediaKind, c: Codec) -> String {
    let k = match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    };
    format!("{k}/{c}")
}

impl Worker {
    pub(crate) fn new(init: WorkerInit) -> Self {
        let now = Instant::now();
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            idx: init.idx,
            socket: init.socket,
            candidates: init.candidates,
            tcp_candidates: init.tcp_candidates,
            tcp_writers: init.tcp_writers,
            tcp_counters: init.tcp_counters,
            restarted: init.restarted,
            sink: init.sink,
            io_tx: init.io_tx,
            counters: init.counters,
            backlog: init.backlog,
            limits: init.limits,
            conns: HashMap::new(),
            next_conn: 1,
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            rooms: HashMap::new(),
            out: Outbox {
                udp: Vec::with_capacity(256),
                tcp: Vec::new(),
            },
            events: VecDeque::with_capacity(256),
            stats: RoundStats::default(),
            next_tick: now + TICK,
            join_seq: 0,
            epoch: (now, epoch_ms),
            dtls_cert: str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate(),
        }
    }

    fn epoch_ms(&self, at: Instant) -> u64 {
        let (base, ms) = self.epoch;
        if at >= base {
            ms + at.duration_since(base).as_millis() as u64
        } else {
            ms.saturating_sub(base.duration_since(at).as_millis() as u64)
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<WorkerMsg>) {
        loop {
            let now = Instant::now();
            let deadline = self
                .conns
                .values()
                .map(|c| c.next_timeout)
                .fold(self.next_tick, Instant::min);
            let wait = deadline.saturating_duration_since(now);
            let first = if wait.is_zero() {
                rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
                })
            } else {
                rx.recv_timeout(wait)
            };
            let mut msg = match first {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.shutdown();
                    return;
                }
            };
            let mut handled = 0;
            while let Some(m) = msg.take() {
                match m {
                    WorkerMsg::Shutdown => {
                        self.shutdown();
                        self.flush();
                        return;
                    }
                    WorkerMsg::Command(c) => self.command(c),
                    WorkerMsg::Datagrams(b) => {
                        self.backlog.fetch_sub(1, Ordering::Relaxed);
                        self.datagrams(b);
                    }
                }
                handled += 1;
                if handled < MAX_MSGS_PER_ROUND {
                    msg = rx.try_recv().ok();
                }
            }
            let now = Instant::now();
            // Forward what arrived, then feed the round's time to every due connection: this
            // fires timers and makes str0m release the packets just written to subscribers,
            // so they leave in this round's sendmmsg.
            self.process_events();
            self.timeouts(now);
            self.process_events();
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.tick(now);
                self.process_events();
            }
            self.reap();
            self.flush();
        }
    }

    // ---------------------------------------------------------------- I/O

    fn datagrams(&mut self, b: DatagramBatch) {
        let proto = b.proto;
        metrics::histogram!(m::PACKET_STAGE, "stage" => "handoff").record_many(
            Instant::now().saturating_duration_since(b.at).as_secs_f64(),
            b.items.len(),
        );
        // str0m takes input only as arriving on one of its local candidates.
        let local = if proto == Protocol::Tcp {
            self.tcp_candidates.first()
        } else {
            self.candidates.first()
        };
        let Some(destination) = local.copied() else {
            return;
        };
        for (src, start, len) in b.items {
            let Some(data) = b.buf.get(start..start + len) else {
                continue;
            };
            let Ok(contents) = data.try_into() else {
                continue;
            };
            let input = Input::Receive(
                b.at,
                Receive {
                    proto,
                    source: src,
                    destination,
                    contents,
                },
            );
            // A binding request names its connection by ufrag, wherever it comes from (the I/O
            // thread routed it that way too); everything else is known by its source address.
            let request_ufrag = if net::is_stun(data) {
                net::stun_local_ufrag(data)
            } else {
                None
            };
            let id = match request_ufrag {
                Some(u) => self.by_ufrag.get(u).copied(),
                None => self.by_addr.get(&(proto, src)).copied(),
            };
            let Some(id) = id else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            if conn.send_to == Some((proto, src)) {
                conn.send_to_rx = b.at;
            }
            // For a binding request this checks the ufrags and the MESSAGE-INTEGRITY against
            // the connection's password: only a peer that was given the credentials passes.
            if conn.dead {
                continue;
            }
            // `accepts` reads the datagram (`&self`: a panic in it leaves the `Rtc` intact).
            if !fault::contain(|| conn.rtc.accepts(&input)).unwrap_or(false) {
                continue;
            }
            // A NAT rebinding: the client's checks now come from a new address and nothing has
            // come from the path in use for a while. Present the check as a top-priority
            // nomination so that str0m moves the path at once (see promote_binding_request).
            // UDP only: that is where NATs rebind; a TCP path cannot change its address, and a
            // check on another transport is the client's own backup path, not a rebinding.
            let promoted = if request_ufrag.is_some()
                && conn.connected
                && proto == Protocol::Udp
                && conn
                    .send_to
                    .is_some_and(|(p, a)| p == Protocol::Udp && a != src)
                && b.at.saturating_duration_since(conn.send_to_rx) >= REBIND_SILENCE
            {
                let pass = conn.rtc.direct_api().local_ice_credentials().pass;
                net::promote_binding_request(data, pass.as_bytes())
            } else {
                None
            };
            let input = match promoted.as_deref().map(|p| p.try_into()) {
                Some(Ok(contents)) => {
                    tracing::debug!(user = %conn.user, from = %src, "following a NAT rebinding");
                    count(m::ICE_REBINDINGS, 1);
                    Input::Receive(
                        b.at,
                        Receive {
                            proto,
                            source: src,
                            destination,
                            contents,
                        },
                    )
                }
                _ => input,
            };
            match fault::contain(|| conn.rtc.handle_input(input)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "rtc input failed");
                    conn.dead = true;
                    continue;
                }
                Err(Contained) => {
                    poisoned(conn);
                    continue;
                }
            }
            conn.last_rx = b.at;
            if request_ufrag.is_some() {
                let known = match self.by_addr.entry((proto, src)) {
                    std::collections::hash_map::Entry::Occupied(_) => true,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        if conn.addrs.len() + conn.tcp_addrs.len() < MAX_ADDRS_PER_CONN {
                            e.insert(id);
                            if proto == Protocol::Tcp {
                                conn.tcp_addrs.push(src);
                            } else {
                                conn.addrs.push(src);
                            }
                            true
                        } else {
                            false
                        }
                    }
                };
                // Confirm (or refresh) the route before the response leaves in this round's
                // sendmmsg, so the peer's next datagrams find it. An ICE-TCP connection is
                // routed by the TCP plane itself.
                if known && proto == Protocol::Udp {
                    let _ = self.io_tx.send(IoMsg::Learn {
                        worker: self.idx,
                        addr: src,
                    });
                }
            }
            drain(id, conn, &mut self.out, &mut self.events);
        }
    }

    fn timeouts(&mut self, now: Instant) {
        for (id, conn) in self.conns.iter_mut() {
            if conn.next_timeout <= now && !conn.dead {
                match fault::contain(|| conn.rtc.handle_input(Input::Timeout(now))) {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        conn.dead = true;
                        continue;
                    }
                    Err(Contained) => {
                        poisoned(conn);
                        continue;
                    }
                }
                drain(*id, conn, &mut self.out, &mut self.events);
            }
        }
    }

    fn flush(&mut self) {
        let forwarded_at = if self.out.is_empty() {
            None
        } else {
            let (mut n, mut bytes) = crate::mmsg::send_batch(
                std::os::fd::AsRawFd::as_raw_fd(&*self.socket),
                &self.out.udp,
            );
            self.out.udp.clear();
            for (dest, packet) in self.out.tcp.drain(..) {
                if super::tcp::send(&self.tcp_writers, &self.tcp_counters, dest, &packet) {
                    n += 1;
                    bytes += packet.len() as u64;
                }
            }
            count(m::PACKETS_OUT, n);
            count(m::BYTES_OUT, bytes);
            self.counters.datagrams_out.fetch_add(n, Ordering::Relaxed);
            Some(Instant::now())
        };
        let s = &mut self.stats;
        if let Some(sent) = forwarded_at {
            let h = metrics::histogram!(m::PACKET_DWELL);
            let mut buckets = [0u64; super::DWELL_BUCKETS];
            for at in s.dwell.drain(..) {
                let d = sent.saturating_duration_since(at);
                h.record(d.as_secs_f64());
                let us = d.as_micros() as u64;
                let i = super::DWELL_BOUNDS_US
                    .iter()
                    .position(|b| us <= *b)
                    .unwrap_or(super::DWELL_BUCKETS - 1);
                if let Some(b) = buckets.get_mut(i) {
                    *b += 1;
                }
            }
            for (i, n) in buckets.iter().enumerate() {
                if *n > 0
                    && let Some(a) = self.counters.dwell.get(i)
                {
                    a.fetch_add(*n, Ordering::Relaxed);
                }
            }
        }
        s.dwell.clear();
        let c = &self.counters;
        if s.packets_in > 0 {
            count(m::PACKETS_IN, s.packets_in);
            count(m::BYTES_IN, s.bytes_in);
            c.packets_in.fetch_add(s.packets_in, Ordering::Relaxed);
        }
        if s.forwarded > 0 {
            count(m::PACKETS_FORWARDED, s.forwarded);
            count(m::BYTES_FORWARDED, s.bytes_forwarded);
            c.packets_forwarded
                .fetch_add(s.forwarded, Ordering::Relaxed);
        }
        for (i, n) in s.dropped.iter().enumerate() {
            if *n > 0 {
                metrics::counter!(m::PACKETS_DROPPED, "reason" => DROP_LABELS[i]).increment(*n);
                c.packets_dropped.fetch_add(*n, Ordering::Relaxed);
            }
        }
        if s.keyframe_requests > 0 {
            count(m::PLIS, s.keyframe_requests);
            c.keyframe_requests
                .fetch_add(s.keyframe_requests, Ordering::Relaxed);
        }
        if s.nacks > 0 {
            count(m::NACKS, s.nacks);
            c.nacks.fetch_add(s.nacks, Ordering::Relaxed);
        }
        if s.rtx > 0 {
            count(m::RTX, s.rtx);
            c.rtx.fetch_add(s.rtx, Ordering::Relaxed);
        }
        if s.layer_switches > 0 {
            count(m::LAYER_SWITCHES, s.layer_switches);
            c.layer_switches
                .fetch_add(s.layer_switches, Ordering::Relaxed);
        }
        let dwell = std::mem::take(&mut s.dwell);
        *s = RoundStats {
            dwell,
            ..RoundStats::default()
        };
    }

    // ---------------------------------------------------------------- connections

    fn new_conn(&mut self, room: &CallId, user: &UserId, role: Role) -> ConnId {
        let now = Instant::now();
        let ufrag = format!("{:04x}{}", self.idx, random_token(12));
        let creds = IceCreds {
            ufrag: ufrag.clone(),
            pass: random_token(24),
        };
        let mut builder = Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .set_local_ice_credentials(creds)
            .set_stats_interval(Some(Duration::from_secs(1)))
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_vp9(true)
            .enable_h264(true)
            .enable_av1(true);
        if role == Role::Subscriber {
            builder = builder.enable_bwe(Some(Bitrate::kbps(INITIAL_BWE_KBPS)));
        }
        if let Some(cert) = &self.dtls_cert {
            builder = builder.set_dtls_cert(cert.clone());
        }
        let mut rtc = builder.build(now);
        for addr in &self.candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "bad host candidate"),
            }
        }
        // After the UDP ones: str0m gives TCP host candidates a lower type preference (90
        // against 126), so a client uses TCP only where UDP fails.
        for addr in &self.tcp_candidates {
            match Candidate::builder()
                .tcp()
                .host(*addr)
                .tcptype(TcpType::Passive)
                .build()
            {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "bad ICE-TCP host candidate"),
            }
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.by_ufrag.insert(ufrag.clone(), id);
        self.conns.insert(
            id,
            Conn {
                rtc,
                room: room.clone(),
                user: user.clone(),
                role,
                ufrag,
                next_ufrag: None,
                ice_down_since: None,
                send_to: None,
                send_to_rx: now,
                addrs: Vec::new(),
                tcp_addrs: Vec::new(),
                next_timeout: now,
                created: now,
                last_rx: now,
                connected: false,
                dead: false,
                ssrc_map: HashMap::new(),
                egress: HashMap::new(),
                candidates: CandidateSet::default(),
            },
        );
        id
    }

    fn close_conn(&mut self, id: ConnId) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if conn.rtc.is_alive() && conn.rtc.close().is_ok() {
            // Let the close output (DTLS close_notify, BYE) go out; drop any events.
            let mut ev = VecDeque::new();
            drain(id, &mut conn, &mut self.out, &mut ev);
        }
        self.by_ufrag.remove(&conn.ufrag);
        self.restarted.remove(&conn.ufrag);
        if let Some(u) = &conn.next_ufrag {
            self.by_ufrag.remove(u);
            self.restarted.remove(u);
        }
        for a in &conn.addrs {
            self.by_addr.remove(&(Protocol::Udp, *a));
        }
        for a in &conn.tcp_addrs {
            self.by_addr.remove(&(Protocol::Tcp, *a));
            // Closes that TCP connection (its queue's only sender goes).
            self.tcp_writers.remove(a);
        }
        if !conn.addrs.is_empty() {
            let _ = self.io_tx.send(IoMsg::Forget {
                worker: self.idx,
                addrs: conn.addrs,
            });
        }
    }

    // ---------------------------------------------------------------- commands

    fn command(&mut self, c: Command) {
        match c {
            Command::Join {
                room,
                user,
                session,
                reply,
            } => {
                crate::fault::worker_join(&user);
                let r = self.join(room, user, session);
                self.process_events();
                let _ = reply.send(r);
            }
            Command::Publish {
                room,
                user,
                offer,
                reply,
            } => {
                let r = self.publish(&room, &user, &offer);
                self.process_events();
                let _ = reply.send(r);
            }
            Command::Answer {
                room,
                user,
                answer,
                reply,
            } => {
                let r = self.answer(&room, &user, &answer);
                self.process_events();
                let _ = reply.send(r);
            }
            Command::Candidate {
                room,
                user,
                target,
                candidate,
                reply,
            } => {
                let r = self.candidate(&room, &user, target, &candidate);
                let _ = reply.send(r);
            }
            Command::Subscription {
                room,
                user,
                track,
                enabled,
                max_width,
                max_height,
                reply,
            } => {
                let cap = Cap {
                    max_width,
                    max_height,
                };
                let r = self.subscription(&room, &user, &track, enabled, cap);
                self.process_events();
                let _ = reply.send(r);
            }
            Command::IceRestart { room, user, reply } => {
                let r = match self
                    .rooms
                    .get_mut(&room)
                    .and_then(|r| r.participants.get_mut(&user))
                {
                    // Nothing to restart before the first subscriber offer.
                    Some(p) => {
                        p.ice_restart = p.subscriber.is_some();
                        Ok(())
                    }
                    None => Err(SfuError::NotJoined),
                };
                if r.is_ok() {
                    self.renegotiate(&room, &user);
                }
                self.process_events();
                let _ = reply.send(r);
            }
            Command::Leave { room, user, reply } => {
                let r = if self
                    .rooms
                    .get(&room)
                    .is_some_and(|r| r.participants.contains_key(&user))
                {
                    self.remove_participant(&room, &user, false);
                    Ok(())
                } else {
                    Err(SfuError::NotJoined)
                };
                self.process_events();
                let _ = reply.send(r);
            }
            Command::CloseRoom { room, reply } => {
                self.close_room(&room);
                let _ = reply.send(());
            }
            Command::Rooms { reply } => {
                let now = Instant::now();
                let v = self
                    .rooms
                    .values()
                    .map(|r| self.room_info(r, now))
                    .collect();
                let _ = reply.send(v);
            }
            Command::Room { room, reply } => {
                let now = Instant::now();
                let v = self.rooms.get(&room).map(|r| self.room_info(r, now));
                let _ = reply.send(v);
            }
        }
    }

    fn join(
        &mut self,
        room_id: CallId,
        user: UserId,
        session: SessionId,
    ) -> Result<JoinResult, SfuError> {
        if self
            .rooms
            .get(&room_id)
            .is_some_and(|r| r.participants.contains_key(&user))
        {
            self.remove_participant(&room_id, &user, true);
        }
        if !self.rooms.contains_key(&room_id) {
            self.rooms.insert(
                room_id.clone(),
                Room {
                    id: room_id.clone(),
                    participants: HashMap::new(),
                    tracks: HashMap::new(),
                    speakers: SpeakerDetector::default(),
                    closing: false,
                },
            );
            metrics::gauge!(m::ROOMS).increment(1.0);
        }
        self.join_seq += 1;
        let seq = self.join_seq;
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return Err(SfuError::Internal);
        };
        let mut others: Vec<&Participant> = room.participants.values().collect();
        others.sort_by_key(|p| p.joined_seq);
        let participants = others
            .iter()
            .map(|p| {
                let mut tracks: Vec<Track> = room
                    .tracks
                    .values()
                    .filter(|t| t.owner == p.user)
                    .map(PubTrack::wire)
                    .collect();
                tracks.sort_by(|a, b| a.mid.cmp(&b.mid));
                ParticipantTracks {
                    user_id: p.user.clone(),
                    tracks,
                }
            })
            .collect();
        let joined = RtcEvent::ParticipantJoined {
            call_id: room_id.clone(),
            user_id: user.clone(),
        };
        for p in room.participants.values() {
            self.sink.deliver(p.session, joined.clone());
        }
        self.sink.room_event(&joined);
        room.participants.insert(
            user.clone(),
            Participant {
                user: user.clone(),
                session,
                publisher: None,
                subscriber: None,
                pending_offer: None,
                renegotiate: false,
                sub_answered: false,
                consumers: HashMap::new(),
                bwe: None,
                probe_target: (0, 0),
                ice_restart: false,
                joined_seq: seq,
            },
        );
        // Layers measured before this join: tell the newcomer what the others already know.
        for t in room.tracks.values() {
            for l in &t.layers {
                if let Some(res) = l.resolution {
                    self.sink.deliver(
                        session,
                        RtcEvent::TrackResolution {
                            call_id: room_id.clone(),
                            track_id: t.id.clone(),
                            rid: l.rid.map(|r| r.to_string()).unwrap_or_default(),
                            width: res.width,
                            height: res.height,
                        },
                    );
                }
            }
        }
        // And who is speaking right now, as the others were last told.
        let speaking = room.speakers.last_reported();
        if !speaking.is_empty() {
            self.sink.deliver(
                session,
                RtcEvent::ActiveSpeakers {
                    call_id: room_id.clone(),
                    user_ids: speaking.to_vec(),
                },
            );
        }
        let count = room.participants.len();
        metrics::gauge!(m::PARTICIPANTS).increment(1.0);
        let now_ms = self.epoch_ms(Instant::now());
        self.sink.room_changed(&room_id, count, now_ms);
        self.renegotiate(&room_id, &user);
        Ok(JoinResult { participants })
    }

    fn publish(
        &mut self,
        room_id: &CallId,
        user: &UserId,
        offer: &str,
    ) -> Result<String, SfuError> {
        let existing = self
            .rooms
            .get(room_id)
            .and_then(|r| r.participants.get(user))
            .ok_or(SfuError::NotJoined)?
            .publisher;
        let known = existing
            .and_then(|id| self.conns.get(&id))
            .map(|c| &c.candidates);
        let summary = self.limits.check_offer(offer, known).map_err(refused)?;
        let offer =
            SdpOffer::from_sdp_string(offer).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self.new_conn(room_id, user, Role::Publisher);
                if let Some(p) = self
                    .rooms
                    .get_mut(room_id)
                    .and_then(|r| r.participants.get_mut(user))
                {
                    p.publisher = Some(id);
                }
                id
            }
        };
        let conn = self.conns.get_mut(&id).ok_or(SfuError::Internal)?;
        let answer = match fault::contain(|| {
            fault::engine_offer(user);
            conn.rtc.sdp_api().accept_offer(offer)
        }) {
            Ok(r) => r.map_err(|e| SfuError::BadSdp(e.to_string()))?,
            Err(Contained) => {
                poisoned(conn);
                return Err(SfuError::BadSdp(ENGINE_REFUSED.into()));
            }
        };
        conn.candidates.add(summary.candidates);
        drain(id, conn, &mut self.out, &mut self.events);
        // An offer with new ICE credentials restarted ICE: str0m answered with fresh ones.
        self.sync_ufrag(id);
        Ok(answer.to_sdp_string())
    }

    /// Follows an ICE restart: if str0m's local ufrag for `id` changed, routes the new one (in
    /// this worker and, since it does not carry the worker's prefix, in [`net::UfragRoutes`]) and
    /// forgets the old.
    fn sync_ufrag(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let now = conn.rtc.direct_api().local_ice_credentials().ufrag;
        if let Some(next) = conn.next_ufrag.take()
            && next != now
        {
            self.by_ufrag.remove(&next);
            self.restarted.remove(&next);
        }
        if now == conn.ufrag {
            return;
        }
        let old = std::mem::replace(&mut conn.ufrag, now.clone());
        self.by_ufrag.remove(&old);
        self.restarted.remove(&old);
        self.by_ufrag.insert(now.clone(), id);
        self.restarted.insert(now, self.idx);
    }

    fn answer(&mut self, room_id: &CallId, user: &UserId, answer: &str) -> Result<(), SfuError> {
        let room = self.rooms.get_mut(room_id).ok_or(SfuError::NotJoined)?;
        let p = room.participants.get_mut(user).ok_or(SfuError::NotJoined)?;
        let sub = p.subscriber.ok_or(SfuError::NoOfferPending)?;
        if p.pending_offer.is_none() {
            return Err(SfuError::NoOfferPending);
        }
        let conn = self.conns.get_mut(&sub).ok_or(SfuError::Internal)?;
        // Over a limit, the offer stays outstanding: the client may answer again.
        let summary = self
            .limits
            .check_answer(answer, &conn.candidates)
            .map_err(refused)?;
        let pending = p.pending_offer.take().ok_or(SfuError::NoOfferPending)?;
        let parsed = match SdpAnswer::from_sdp_string(answer) {
            Ok(a) => a,
            Err(e) => {
                // Keep the offer outstanding: the client may retry with a valid answer.
                p.pending_offer = Some(pending);
                return Err(SfuError::BadSdp(e.to_string()));
            }
        };
        let Ok(accepted) = fault::contain(|| conn.rtc.sdp_api().accept_answer(pending, parsed))
        else {
            poisoned(conn);
            return Err(SfuError::BadSdp(ENGINE_REFUSED.into()));
        };
        let result = match accepted {
            Ok(()) => {
                conn.candidates.add(summary.candidates);
                p.sub_answered = true;
                for c in p.consumers.values_mut() {
                    if c.ssrc.is_none() {
                        let mut api = conn.rtc.direct_api();
                        if let Some(stream) = api.stream_tx_by_mid(c.mid, None) {
                            // Forwarded packets leave at once: they were paced by their sender
                            // already, and holding them here only adds delay (a keyframe burst
                            // would wait tens of milliseconds behind the pacer). BWE still runs
                            // on transport-cc feedback and drives layer selection.
                            stream.set_unpaced(true);
                            // NACKs are answered from a cache sized for repair, not for history.
                            stream.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, RTX_RATIO_CAP);
                            c.ssrc = Some(stream.ssrc());
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                // The offered m-lines are void; offer them again.
                p.consumers.retain(|_, c| c.ssrc.is_some());
                p.renegotiate = true;
                Err(SfuError::BadSdp(e.to_string()))
            }
        };
        drain(sub, conn, &mut self.out, &mut self.events);
        let again = std::mem::take(&mut p.renegotiate);
        self.sync_ufrag(sub);
        if again {
            self.renegotiate(room_id, user);
        }
        self.select_layers(room_id, Some(user), Instant::now());
        result
    }

    fn candidate(
        &mut self,
        room_id: &CallId,
        user: &UserId,
        target: PcTarget,
        cand: &IceCandidateInit,
    ) -> Result<(), SfuError> {
        let p = self
            .rooms
            .get(room_id)
            .and_then(|r| r.participants.get(user))
            .ok_or(SfuError::NotJoined)?;
        let id = match target {
            PcTarget::Publisher => p.publisher,
            PcTarget::Subscriber => p.subscriber,
        }
        .ok_or_else(|| SfuError::BadCandidate("no such connection yet".into()))?;
        let line = cand.candidate.trim();
        let line = line.strip_prefix("a=").unwrap_or(line);
        if line.is_empty() {
            // End-of-candidates marker.
            return Ok(());
        }
        let conn = self.conns.get_mut(&id).ok_or(SfuError::Internal)?;
        let key = candidate_key(line);
        if let Some(k) = &key {
            conn.candidates
                .check(std::slice::from_ref(k), self.limits.max_candidates)
                .map_err(refused)?;
        }
        let c =
            Candidate::from_sdp_string(line).map_err(|e| SfuError::BadCandidate(e.to_string()))?;
        conn.candidates.add(key);
        if fault::contain(|| conn.rtc.add_remote_candidate(c)).is_err() {
            poisoned(conn);
            return Err(SfuError::BadCandidate(ENGINE_REFUSED.into()));
        }
        drain(id, conn, &mut self.out, &mut self.events);
        Ok(())
    }

    fn subscription(
        &mut self,
        room_id: &CallId,
        user: &UserId,
        track: &TrackId,
        enabled: bool,
        cap: Cap,
    ) -> Result<(), SfuError> {
        let now = Instant::now();
        let at_ms = self.epoch_ms(now);
        let room = self.rooms.get_mut(room_id).ok_or(SfuError::NotJoined)?;
        let p = room.participants.get_mut(user).ok_or(SfuError::NotJoined)?;
        if !room.tracks.contains_key(track) {
            return Err(SfuError::UnknownTrack);
        }
        let Some(c) = p.consumers.get_mut(track) else {
            // The caller's own track, or not offered yet: nothing to change.
            return if room.tracks.get(track).is_some_and(|t| t.owner == *user) {
                Err(SfuError::UnknownTrack)
            } else {
                Ok(())
            };
        };
        c.cap = cap;
        if c.enabled != enabled {
            c.enabled = enabled;
            let stopped = c.forwarder.set_paused(!enabled);
            if stopped {
                report(&*self.sink, room_id, user, c, Forwarding::Stopped, at_ms);
            }
        }
        self.select_layers(room_id, Some(user), now);
        Ok(())
    }

    fn close_room(&mut self, room_id: &CallId) {
        let users: Vec<UserId> = match self.rooms.get_mut(room_id) {
            Some(r) => {
                r.closing = true;
                r.participants.keys().cloned().collect()
            }
            None => Vec::new(),
        };
        for u in users {
            self.remove_participant(room_id, &u, false);
        }
        if self.rooms.remove(room_id).is_some() {
            metrics::gauge!(m::ROOMS).decrement(1.0);
        }
        self.events.clear();
    }

    fn shutdown(&mut self) {
        let rooms: Vec<CallId> = self.rooms.keys().cloned().collect();
        for r in rooms {
            self.close_room(&r);
        }
    }

    /// Removes a participant: stops its consumers, unpublishes its tracks, closes its
    /// connections, tells the others. `replaced`: a newer join of the same user; the old session
    /// is told it left.
    fn remove_participant(&mut self, room_id: &CallId, user: &UserId, replaced: bool) {
        let now = Instant::now();
        let at_ms = self.epoch_ms(now);
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let Some(mut p) = room.participants.remove(user) else {
            return;
        };
        metrics::gauge!(m::PARTICIPANTS).decrement(1.0);
        for c in p.consumers.values_mut() {
            report(&*self.sink, room_id, user, c, Forwarding::Stopped, at_ms);
        }
        let owned: Vec<TrackId> = room
            .tracks
            .values()
            .filter(|t| t.owner == *user)
            .map(|t| t.id.clone())
            .collect();
        room.speakers.remove(user);
        if replaced {
            self.sink.deliver(
                p.session,
                RtcEvent::ParticipantLeft {
                    call_id: room_id.clone(),
                    user_id: user.clone(),
                },
            );
        }
        for t in owned {
            self.unpublish(room_id, &t, at_ms);
        }
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let left = RtcEvent::ParticipantLeft {
            call_id: room_id.clone(),
            user_id: user.clone(),
        };
        for o in room.participants.values() {
            self.sink.deliver(o.session, left.clone());
        }
        self.sink.room_event(&left);
        let count = room.participants.len();
        self.sink.room_changed(room_id, count, at_ms);
        for id in [p.publisher, p.subscriber].into_iter().flatten() {
            self.close_conn(id);
        }
        // Drop queued events of the closed connections.
        let conns = &self.conns;
        self.events.retain(|(id, _)| conns.contains_key(id));
    }

    fn unpublish(&mut self, room_id: &CallId, track_id: &TrackId, at_ms: u64) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let Some(track) = room.tracks.remove(track_id) else {
            return;
        };
        metrics::gauge!(m::TRACKS, "kind" => kind_label(track.kind)).decrement(1.0);
        if let Some(conn) = self.conns.get_mut(&track.conn) {
            conn.ssrc_map.retain(|_, (t, _)| t != track_id);
        }
        let wire = track.wire();
        let mut others = Vec::new();
        for p in room.participants.values_mut() {
            if p.user == track.owner {
                continue;
            }
            if let Some(c) = p.consumers.get_mut(track_id) {
                report(&*self.sink, room_id, &p.user, c, Forwarding::Stopped, at_ms);
            }
            self.sink.deliver(
                p.session,
                RtcEvent::TrackUnpublished {
                    call_id: room_id.clone(),
                    track: wire.clone(),
                },
            );
            others.push(p.user.clone());
        }
        self.sink.room_event(&RtcEvent::TrackUnpublished {
            call_id: room_id.clone(),
            track: wire,
        });
        for u in others {
            self.renegotiate(room_id, &u);
        }
    }

    /// Brings the participant's subscriber connection in line with the room's tracks: one
    /// negotiation in flight at a time, the next queued until the answer.
    fn renegotiate(&mut self, room_id: &CallId, user: &UserId) {
        let Some(room) = self.rooms.get_mut(room_id).filter(|r| !r.closing) else {
            return;
        };
        let Some(p) = room.participants.get_mut(user) else {
            return;
        };
        if p.pending_offer.is_some() {
            p.renegotiate = true;
            return;
        }
        let mut wanted: Vec<&PubTrack> = room
            .tracks
            .values()
            .filter(|t| t.owner != *user && !p.consumers.contains_key(&t.id))
            .collect();
        wanted.sort_by(|a, b| (&a.owner, a.mid.to_string()).cmp(&(&b.owner, b.mid.to_string())));
        // The first offer on a subscriber connection carries at most one track of each kind;
        // the rest follow in the next offer, once it is answered. aiortc (1.16, default
        // "balanced" bundle policy) ties the second track of the kind that is not first in the
        // offer to a transport it then discards when it applies BUNDLE: a late joiner offered
        // two publishers' audio and video at once never connected. Once the first answer is in,
        // every transceiver sits on the bundled transport and later offers may hold any number.
        let mut held_back = false;
        if !p.sub_answered {
            let (mut audio, mut video) = (false, false);
            wanted.retain(|t| {
                let seen = match t.kind {
                    MediaKind::Audio => &mut audio,
                    MediaKind::Video => &mut video,
                };
                let keep = !*seen;
                *seen = true;
                held_back |= !keep;
                keep
            });
        }
        let gone: Vec<TrackId> = p
            .consumers
            .keys()
            .filter(|t| !room.tracks.contains_key(*t))
            .cloned()
            .collect();
        if wanted.is_empty() && gone.is_empty() && !p.ice_restart {
            return;
        }
        let sub = match p.subscriber {
            Some(id) => id,
            None => {
                if wanted.is_empty() {
                    return;
                }
                let id = self.new_conn(room_id, user, Role::Subscriber);
                if let Some(p) = self
                    .rooms
                    .get_mut(room_id)
                    .and_then(|r| r.participants.get_mut(user))
                {
                    p.subscriber = Some(id);
                }
                return self.renegotiate(room_id, user);
            }
        };
        let Some(conn) = self.conns.get_mut(&sub) else {
            return;
        };
        let mut api = conn.rtc.sdp_api();
        for t in &wanted {
            let kind = match t.kind {
                MediaKind::Audio => StrMediaKind::Audio,
                MediaKind::Video => StrMediaKind::Video,
            };
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(t.owner.to_string()),
                Some(t.id.to_string()),
                None,
            );
            let target = if t.kind == MediaKind::Audio {
                Some(0)
            } else {
                None
            };
            p.consumers.insert(
                t.id.clone(),
                Consumer {
                    track: t.id.clone(),
                    mid,
                    ssrc: None,
                    pt_map: Vec::new(),
                    forwarder: Forwarder::new(t.kind, target),
                    rewriter: None,
                    vp8: Vp8Munger::default(),
                    selector: LayerSelector::default(),
                    enabled: true,
                    cap: Cap::default(),
                    reported: Forwarding::Stopped,
                    written: 0,
                    last_layer: None,
                },
            );
        }
        for t in &gone {
            if let Some(c) = p.consumers.remove(t) {
                // Inactive rather than stopped: an offer whose m-lines are all stopped has no
                // BUNDLE group, and str0m then refuses the (group-less) answer.
                api.set_direction(c.mid, Direction::Inactive);
            }
        }
        let restart_ufrag = if std::mem::take(&mut p.ice_restart) {
            Some(api.ice_restart(true).ufrag)
        } else {
            None
        };
        if !api.has_changes() {
            return;
        }
        if let Some((offer, pending)) = api.apply() {
            if let Some(u) = restart_ufrag {
                // Route the new ufrag now: the client checks with it as soon as it applies the
                // offer, perhaps before its answer reaches us. The old one goes with the answer.
                self.by_ufrag.insert(u.clone(), sub);
                self.restarted.insert(u.clone(), self.idx);
                if let Some(old) = conn.next_ufrag.replace(u) {
                    self.by_ufrag.remove(&old);
                    self.restarted.remove(&old);
                }
            }
            p.pending_offer = Some(pending);
            p.renegotiate |= held_back;
            let mut sdp = offer.to_sdp_string();
            // str0m keeps only RFC 8830 token characters in msid; user IDs may also contain
            // '@'. Put the exact `<user_id> <track_id>` back (the track ID is all token chars).
            for c in p.consumers.values() {
                let Some(owner) = room.tracks.get(&c.track).map(|t| t.owner.as_str()) else {
                    continue;
                };
                if owner.contains('@') {
                    let clean: String = owner.chars().filter(|ch| *ch != '@').collect();
                    sdp = sdp.replace(
                        &format!("msid:{clean} {}", c.track),
                        &format!("msid:{owner} {}", c.track),
                    );
                }
            }
            self.sink.deliver(
                p.session,
                RtcEvent::RtcOffer {
                    call_id: room_id.clone(),
                    sdp,
                },
            );
        }
        drain(sub, conn, &mut self.out, &mut self.events);
    }

    // ---------------------------------------------------------------- events

    fn process_events(&mut self) {
        while let Some((id, ev)) = self.events.pop_front() {
            self.event(id, ev);
        }
    }

    fn event(&mut self, id: ConnId, ev: Event) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let role = conn.role;
        match ev {
            Event::Connected => conn.connected = true,
            // A failed path is not the end: the client may restart ICE (or its NAT rebinding
            // may be nominated) within ICE_RESTART_GRACE; liveness gives up after that.
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                conn.ice_down_since.get_or_insert(Instant::now());
            }
            Event::IceConnectionStateChange(_) => conn.ice_down_since = None,
            Event::Closed => conn.dead = true,
            Event::RtpPacket(pkt) if role == Role::Publisher => self.rtp(id, pkt),
            Event::MediaAdded(added)
                if role == Role::Publisher && added.direction.is_receiving() =>
            {
                let rids: Vec<Rid> = added
                    .simulcast
                    .map(|s| {
                        if s.recv.is_empty() {
                            s.send.into_iter().map(|l| l.rid).collect()
                        } else {
                            s.recv.into_iter().map(|l| l.rid).collect()
                        }
                    })
                    .unwrap_or_default();
                let kind = if added.kind == StrMediaKind::Audio {
                    MediaKind::Audio
                } else {
                    MediaKind::Video
                };
                self.add_track(id, added.mid, kind, rids);
            }
            Event::MediaChanged(changed) if role == Role::Publisher => {
                let (room_id, user) = (conn.room.clone(), conn.user.clone());
                let existing = self.rooms.get(&room_id).and_then(|r| {
                    r.tracks
                        .values()
                        .find(|t| t.conn == id && t.mid == changed.mid)
                        .map(|t| t.id.clone())
                });
                match (existing, changed.direction.is_receiving()) {
                    (Some(t), false) => {
                        let at_ms = self.epoch_ms(Instant::now());
                        self.unpublish(&room_id, &t, at_ms);
                    }
                    (None, true) => {
                        let kind = self
                            .conns
                            .get(&id)
                            .and_then(|c| c.rtc.media(changed.mid))
                            .map(|md| md.kind());
                        let rids: Vec<Rid> = self
                            .conns
                            .get(&id)
                            .and_then(|c| c.rtc.media(changed.mid))
                            .map(|md| match md.rids_rx() {
                                str0m::media::Rids::Specific(v) => v.clone(),
                                _ => Vec::new(),
                            })
                            .unwrap_or_default();
                        let kind = if kind == Some(StrMediaKind::Audio) {
                            MediaKind::Audio
                        } else {
                            MediaKind::Video
                        };
                        let _ = user;
                        self.add_track(id, changed.mid, kind, rids);
                    }
                    _ => {}
                }
            }
            Event::KeyframeRequest(req) if role == Role::Subscriber => {
                let (room_id, user) = (conn.room.clone(), conn.user.clone());
                let layer_track = self.rooms.get(&room_id).and_then(|r| {
                    let p = r.participants.get(&user)?;
                    let c = p.consumers.values().find(|c| c.mid == req.mid)?;
                    Some((
                        c.track.clone(),
                        c.forwarder.current().or(c.forwarder.target())?,
                    ))
                });
                if let Some((t, layer)) = layer_track {
                    self.request_keyframe(&room_id, &t, layer, Instant::now());
                }
            }
            Event::EgressBitrateEstimate(kind) if role == Role::Subscriber => {
                let bps = match kind {
                    BweKind::Twcc { estimate, .. } | BweKind::Remb { estimate, .. } => {
                        estimate.as_u64()
                    }
                    _ => return,
                };
                let (room_id, user) = (conn.room.clone(), conn.user.clone());
                if let Some(p) = self
                    .rooms
                    .get_mut(&room_id)
                    .and_then(|r| r.participants.get_mut(&user))
                {
                    p.bwe = Some(bps);
                }
            }
            Event::MediaEgressStats(s) if role == Role::Subscriber => {
                let (nacks, packets) = (s.nacks, s.packets);
                let prev = conn.egress.insert(s.mid, (nacks, packets));
                let (pn, _) = prev.unwrap_or((0, 0));
                self.stats.nacks += nacks.saturating_sub(pn);
                // RTX estimate: packets str0m sent on this m-line beyond those we wrote.
                let (room_id, user) = (conn.room.clone(), conn.user.clone());
                if let Some(c) = self
                    .rooms
                    .get(&room_id)
                    .and_then(|r| r.participants.get(&user))
                    .and_then(|p| p.consumers.values().find(|c| c.mid == s.mid))
                {
                    let extra = packets.saturating_sub(c.written);
                    let prev_extra = prev.map_or(0, |(_, pp)| pp.saturating_sub(c.written));
                    self.stats.rtx += extra.saturating_sub(prev_extra);
                }
            }
            _ => {}
        }
    }

    fn add_track(&mut self, conn_id: ConnId, mid: Mid, kind: MediaKind, rids: Vec<Rid>) {
        let Some(conn) = self.conns.get(&conn_id) else {
            return;
        };
        let (room_id, owner) = (conn.room.clone(), conn.user.clone());
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if room
            .tracks
            .values()
            .any(|t| t.conn == conn_id && t.mid == mid)
        {
            return;
        }
        let now = Instant::now();
        let layer = |rid: Option<Rid>| Layer {
            rid,
            ssrc: None,
            probe: None,
            resolution: None,
            throttle: KeyframeThrottle::default(),
            bytes: 0,
            window_start: now,
            bitrate: 0,
            last_at: None,
        };
        let layers: Vec<Layer> = if rids.is_empty() {
            vec![layer(None)]
        } else {
            rids.into_iter().map(|r| layer(Some(r))).collect()
        };
        let track = PubTrack {
            id: TrackId::random(),
            owner: owner.clone(),
            conn: conn_id,
            mid,
            kind,
            codec: None,
            video_codec: None,
            clock_rate: if kind == MediaKind::Audio {
                48_000
            } else {
                90_000
            },
            pt_params: Vec::new(),
            layers,
        };
        metrics::gauge!(m::TRACKS, "kind" => kind_label(kind)).increment(1.0);
        let wire = track.wire();
        room.tracks.insert(track.id.clone(), track);
        let mut others = Vec::new();
        for p in room.participants.values() {
            if p.user == owner {
                continue;
            }
            self.sink.deliver(
                p.session,
                RtcEvent::TrackPublished {
                    call_id: room_id.clone(),
                    track: wire.clone(),
                },
            );
            others.push(p.user.clone());
        }
        self.sink.room_event(&RtcEvent::TrackPublished {
            call_id: room_id.clone(),
            track: wire,
        });
        for u in others {
            self.renegotiate(&room_id, &u);
        }
    }

    fn request_keyframe(&mut self, room_id: &CallId, track: &TrackId, layer: usize, now: Instant) {
        let Some(t) = self
            .rooms
            .get_mut(room_id)
            .and_then(|r| r.tracks.get_mut(track))
        else {
            return;
        };
        if t.kind != MediaKind::Video {
            return;
        }
        let Some(l) = t.layers.get_mut(layer) else {
            return;
        };
        let Some(ssrc) = l.ssrc else {
            return;
        };
        if !l.throttle.allow(now) {
            return;
        }
        let conn_id = t.conn;
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if let Some(rx) = conn.rtc.direct_api().stream_rx(&ssrc) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.stats.keyframe_requests += 1;
        }
        drain(conn_id, conn, &mut self.out, &mut self.events);
    }

    /// The packet path: one RTP packet from a publisher, fanned out to its consumers.
    fn rtp(&mut self, conn_id: ConnId, pkt: RtpPacket) {
        let Worker {
            conns,
            rooms,
            stats,
            sink,
            epoch,
            ..
        } = self;
        let Some(conn) = conns.get_mut(&conn_id) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let room_id = conn.room.clone();
        let Some(room) = rooms.get_mut(&room_id) else {
            return;
        };
        // Resolve SSRC → (track, layer) once per stream.
        let (track_id, li) = match conn.ssrc_map.get(&ssrc) {
            Some(v) => v.clone(),
            None => {
                let Some((mid, rid)) = conn
                    .rtc
                    .direct_api()
                    .stream_rx(&ssrc)
                    .map(|s| (s.mid(), s.rid()))
                else {
                    return;
                };
                let Some(t) = room
                    .tracks
                    .values()
                    .find(|t| t.conn == conn_id && t.mid == mid)
                else {
                    return;
                };
                let li = match rid {
                    Some(r) => t.layers.iter().position(|l| l.rid == Some(r)),
                    None => (t.layers.len() == 1).then_some(0),
                };
                let Some(li) = li else {
                    return;
                };
                conn.ssrc_map.insert(ssrc, (t.id.clone(), li));
                (t.id.clone(), li)
            }
        };
        let Some(track) = room.tracks.get_mut(&track_id) else {
            return;
        };
        let now = pkt.timestamp;
        let at_ms = {
            let (base, ms) = *epoch;
            ms + now.saturating_duration_since(base).as_millis() as u64
        };
        stats.packets_in += 1;
        stats.bytes_in += pkt.payload.len() as u64;

        // Codec, once per payload type.
        let pt = pkt.header.payload_type;
        let params = match track.pt_params.iter().find(|(p, _)| *p == pt) {
            Some((_, params)) => *params,
            None => {
                let Some(params) = conn.rtc.codec_config().find(|p| p.pt() == pt).copied() else {
                    return;
                };
                track.pt_params.push((pt, params));
                params
            }
        };
        let codec = params.spec().codec;
        if track.codec != Some(codec) {
            track.codec = Some(codec);
            track.video_codec = video_codec_of(codec);
            track.clock_rate = params.spec().clock_rate.get();
            if let Some(vc) = track.video_codec {
                for l in &mut track.layers {
                    l.probe = Some(ResolutionProbe::new(vc));
                }
            }
        }
        let Some(layer) = track.layers.get_mut(li) else {
            return;
        };
        layer.ssrc = Some(ssrc);
        layer.last_at = Some(now);
        layer.bytes += pkt.payload.len() as u64;

        // Measured resolution: tell the room, and billing for consumers on this layer.
        if let Some(probe) = layer.probe.as_mut()
            && let Some(res) = probe.push(*pkt.seq_no, pkt.header.marker, &pkt.payload)
            && layer.resolution != Some(res)
        {
            layer.resolution = Some(res);
            let rid = layer.rid.map(|r| r.to_string()).unwrap_or_default();
            for p in room.participants.values_mut() {
                sink.deliver(
                    p.session,
                    RtcEvent::TrackResolution {
                        call_id: room_id.clone(),
                        track_id: track_id.clone(),
                        rid: rid.clone(),
                        width: res.width,
                        height: res.height,
                    },
                );
                if let Some(c) = p.consumers.get_mut(&track_id)
                    && c.forwarder.current() == Some(li)
                {
                    report(&**sink, &room_id, &p.user, c, Forwarding::Video(res), at_ms);
                }
            }
            sink.room_event(&RtcEvent::TrackResolution {
                call_id: room_id.clone(),
                track_id: track_id.clone(),
                rid,
                width: res.width,
                height: res.height,
            });
        }
        let resolution = layer.resolution;
        let keyframe_start = track
            .video_codec
            .is_some_and(|vc| is_keyframe_start(vc, &pkt.payload));
        if track.kind == MediaKind::Audio
            && let Some(level) = pkt.header.ext_vals.audio_level
        {
            room.speakers.observe(&track.owner, level, now);
        }
        let vp8 = if track.video_codec == Some(VideoCodec::Vp8) {
            Vp8Descriptor::parse(&pkt.payload).ok()
        } else {
            None
        };
        let exts = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            ..ExtensionValues::default()
        };
        let kind = track.kind;
        let clock_rate = track.clock_rate;
        let owner = track.owner.clone();
        let mut want_keyframe: Option<usize> = None;
        let rtp_in = RtpIn {
            seq: *pkt.seq_no,
            ts: pkt.time.numer(),
            arrival: now,
        };

        for p in room.participants.values_mut() {
            if p.user == owner {
                continue;
            }
            let Some(c) = p.consumers.get_mut(&track_id) else {
                continue;
            };
            let (Some(tx_ssrc), Some(sub_id)) = (c.ssrc, p.subscriber) else {
                stats.dropped[4] += 1;
                continue;
            };
            let decision = c.forwarder.decide(PacketInfo {
                layer: li,
                keyframe_start,
            });
            if c.forwarder.needs_keyframe() {
                want_keyframe = c.forwarder.target();
            }
            let switched = match decision {
                Decision::Drop(r) => {
                    stats.dropped[drop_index(r)] += 1;
                    continue;
                }
                Decision::Forward { switched } => switched,
            };
            let Some(sub) = conns.get_mut(&sub_id) else {
                continue;
            };
            // Subscriber PT for this codec, once per publisher PT.
            let out_pt = match c.pt_map.iter().find(|(p, _)| *p == pt) {
                Some((_, o)) => *o,
                None => {
                    let o = sub
                        .rtc
                        .codec_config()
                        .match_params(params)
                        .map(|p| p.pt())
                        .filter(|o| {
                            sub.rtc
                                .media(c.mid)
                                .is_some_and(|md| md.remote_pts().contains(o))
                        });
                    c.pt_map.push((pt, o));
                    o
                }
            };
            let Some(out_pt) = out_pt else {
                stats.dropped[4] += 1;
                continue;
            };
            let rewriter = c.rewriter.get_or_insert_with(|| {
                let mut r = rand::rng();
                RtpRewriter::new(clock_rate, r.random_range(0..0x4000), r.random())
            });
            let rewritten = if switched {
                let o = rewriter.switch_to(rtp_in);
                if let Some(d) = &vp8 {
                    c.vp8.switch_to(d.picture_id(), d.tl0_pic_idx());
                }
                if c.last_layer.is_some_and(|l| l != li) {
                    stats.layer_switches += 1;
                }
                c.last_layer = Some(li);
                let f = match kind {
                    MediaKind::Audio => Forwarding::Audio,
                    MediaKind::Video => Forwarding::Video(resolution.unwrap_or(Resolution {
                        width: 0,
                        height: 0,
                    })),
                };
                report(&**sink, &room_id, &p.user, c, f, at_ms);
                Ok(o)
            } else {
                rewriter.rewrite(rtp_in)
            };
            let Ok(o) = rewritten else {
                stats.dropped[3] += 1;
                continue;
            };
            let mut w = RtpWrite::new(out_pt, SeqNo::from(o.seq), o.ts, now, pkt.payload.clone())
                .marker(pkt.header.marker)
                .ext_vals(exts.clone())
                .nackable(kind == MediaKind::Video);
            if let Some(d) = &vp8 {
                let (pic, tl0) = c.vp8.rewrite(d.picture_id(), d.tl0_pic_idx());
                let mut b = d.patch();
                if let Some(pic) = pic {
                    b = b.picture_id(pic);
                }
                if let Some(t) = tl0 {
                    b = b.tl0_pic_idx(t);
                }
                if let Some(k) = d.key_idx() {
                    b = b.key_idx(k);
                }
                match b.build() {
                    Ok(patch) => w = w.vp8_patch(patch),
                    Err(_) => {
                        // A 7-bit picture ID cannot carry the rewritten value: send as is.
                    }
                }
            }
            let mut api = sub.rtc.direct_api();
            let Some(stream) = api.stream_tx(&tx_ssrc) else {
                stats.dropped[4] += 1;
                continue;
            };
            stream.write_rtp(w);
            c.written += 1;
            stats.forwarded += 1;
            stats.bytes_forwarded += pkt.payload.len() as u64;
            stats.dwell.push(now);
            // str0m releases the packet when next fed time: the round's timeout pass does that
            // for every connection due, so mark this one due instead of polling it per packet.
            sub.next_timeout = sub.next_timeout.min(now);
        }
        if let Some(layer) = want_keyframe {
            self.request_keyframe(&room_id, &track_id, layer, now);
        }
    }

    // ---------------------------------------------------------------- periodic

    fn tick(&mut self, now: Instant) {
        // Layer bitrates over one-second windows.
        for room in self.rooms.values_mut() {
            for t in room.tracks.values_mut() {
                for l in &mut t.layers {
                    let el = now.saturating_duration_since(l.window_start);
                    if el >= Duration::from_secs(1) {
                        l.bitrate = (l.bytes * 8 * 1000) / (el.as_millis().max(1) as u64);
                        l.bytes = 0;
                        l.window_start = now;
                    }
                }
            }
        }
        let ids: Vec<CallId> = self.rooms.keys().cloned().collect();
        for r in &ids {
            self.select_layers(r, None, now);
            if let Some(room) = self.rooms.get_mut(r)
                && let Some(list) = room.speakers.poll(now)
            {
                for p in room.participants.values() {
                    self.sink.deliver(
                        p.session,
                        RtcEvent::ActiveSpeakers {
                            call_id: r.clone(),
                            user_ids: list.clone(),
                        },
                    );
                }
            }
        }
        // Liveness.
        for c in self.conns.values_mut() {
            let idle = now.saturating_duration_since(c.last_rx);
            if (c.connected && idle > CONN_IDLE)
                || (!c.connected && now.saturating_duration_since(c.created) > CONNECT_TIMEOUT)
                || c.ice_down_since
                    .is_some_and(|t| now.saturating_duration_since(t) > ICE_RESTART_GRACE)
            {
                c.dead = true;
            }
        }
    }

    /// Runs the layer selector for the consumers of one participant (or everyone) and asks for
    /// keyframes where a start or switch is pending.
    fn select_layers(&mut self, room_id: &CallId, only: Option<&UserId>, now: Instant) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let mut requests: Vec<(TrackId, usize)> = Vec::new();
        let mut probes: Vec<(ConnId, u64, u64)> = Vec::new();
        for p in room.participants.values_mut() {
            if only.is_some_and(|u| *u != p.user) {
                continue;
            }
            let bwe = p.bwe;
            let (mut minimum, mut desired) = (0u64, 0u64);
            for c in p.consumers.values_mut() {
                if c.ssrc.is_none() {
                    continue;
                }
                let Some(t) = room.tracks.get(&c.track) else {
                    continue;
                };
                let target = match t.kind {
                    MediaKind::Audio => {
                        if c.enabled {
                            minimum += AUDIO_BPS;
                            desired += AUDIO_BPS;
                        }
                        Some(0)
                    }
                    MediaKind::Video => {
                        let order = t.quality_order();
                        let states = t.layer_states(now);
                        let ordered: Vec<LayerState> = order
                            .iter()
                            .map(|&i| states.get(i).copied().unwrap_or_default())
                            .collect();
                        let picked = c.selector.select(&ordered, bwe, c.cap, now);
                        if c.enabled {
                            let w = wanted(&ordered, c.cap, picked);
                            minimum += w.next;
                            desired += (w.best as f64 * UPGRADE_HEADROOM) as u64;
                        }
                        picked.and_then(|k| order.get(k).copied())
                    }
                };
                if let Some(tg) = target
                    && c.forwarder.target() != target
                {
                    c.forwarder.set_target(Some(tg));
                }
                if c.forwarder.needs_keyframe()
                    && let Some(tg) = c.forwarder.target()
                {
                    requests.push((c.track.clone(), tg));
                }
            }
            // Probe for what the subscriber's layers would need: padding sustains the next layer
            // up (capped by the estimate, so it cannot congest a link the estimate knows is
            // full), and the estimator probes toward the best layers. Without this a subscriber
            // moved down by congestion would never see its estimate grow back once the link
            // clears, since the low layer alone never tests the capacity.
            let target = (quantize(minimum.min(desired)), quantize(desired));
            if let Some(sub) = p.subscriber
                && p.probe_target != target
            {
                p.probe_target = target;
                probes.push((sub, target.0, target.1));
            }
        }
        for (id, minimum, desired) in probes {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.rtc
                    .bwe()
                    .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired));
            }
        }
        for (t, l) in requests {
            self.request_keyframe(room_id, &t, l, now);
        }
    }

    /// Removes participants whose connections died.
    fn reap(&mut self) {
        let dead: Vec<(CallId, UserId)> = self
            .conns
            .values()
            .filter(|c| c.dead)
            .map(|c| (c.room.clone(), c.user.clone()))
            .collect();
        for (room, user) in dead {
            tracing::info!(%room, %user, "media connection died; removing participant");
            self.remove_participant(&room, &user, false);
            // A dead connection whose participant is already gone.
        }
        let orphans: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.dead)
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            self.close_conn(id);
        }
    }

    // ---------------------------------------------------------------- admin

    fn room_info(&self, room: &Room, now: Instant) -> RoomInfo {
        let mut ps: Vec<&Participant> = room.participants.values().collect();
        ps.sort_by_key(|p| p.joined_seq);
        RoomInfo {
            call_id: room.id.clone(),
            participants: ps
                .into_iter()
                .map(|p| {
                    let mut tracks: Vec<TrackInfo> = room
                        .tracks
                        .values()
                        .filter(|t| t.owner == p.user)
                        .map(|t| {
                            let states = t.layer_states(now);
                            TrackInfo {
                                track: t.wire(),
                                codec: t.codec.map(|c| mime_of(t.kind, c)),
                                layers: t
                                    .layers
                                    .iter()
                                    .zip(states)
                                    .map(|(l, s)| LayerInfo {
                                        rid: l.rid.map(|r| r.to_string()).unwrap_or_default(),
                                        width: s.width,
                                        height: s.height,
                                        bitrate: if s.active { l.bitrate } else { 0 },
                                    })
                                    .collect(),
                            }
                        })
                        .collect();
                    tracks.sort_by(|a, b| a.track.mid.cmp(&b.track.mid));
                    let mut subscriptions: Vec<SubscriptionInfo> = p
                        .consumers
                        .values()
                        .map(|c| SubscriptionInfo {
                            track_id: c.track.clone(),
                            enabled: c.enabled,
                            max_width: c.cap.max_width,
                            max_height: c.cap.max_height,
                            layer: c.forwarder.current().and_then(|l| {
                                room.tracks.get(&c.track).and_then(|t| {
                                    t.layers
                                        .get(l)
                                        .map(|l| l.rid.map(|r| r.to_string()).unwrap_or_default())
                                })
                            }),
                        })
                        .collect();
                    subscriptions.sort_by(|a, b| a.track_id.cmp(&b.track_id));
                    ParticipantInfo {
                        user_id: p.user.clone(),
                        session_id: p.session.to_string(),
                        tracks,
                        subscriptions,
                        bandwidth_estimate: p.bwe,
                    }
                })
                .collect(),
        }
    }
}

/// A request refused by a `[media]` limit: counted, and answered `bad_request` with the limit's
/// name in the message.
fn refused(e: LimitError) -> SfuError {
    metrics::counter!(m::MEDIA_LIMIT_REJECTIONS, "limit" => e.label()).increment(1);
    SfuError::Limit(e.to_string())
}

fn count(name: &'static str, n: u64) {
    metrics::counter!(name).increment(n);
}

fn kind_label(k: MediaKind) -> &'static str {
    match k {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    }
}

/// Tells billing what a consumer forwards now, if that changed.
fn report(
    sink: &dyn MediaSink,
    room: &CallId,
    user: &UserId,
    c: &mut Consumer,
    f: Forwarding,
    at_ms: u64,
) {
    if c.reported == f {
        return;
    }
    c.reported = f;
    sink.consumer_changed(ConsumerUpdate {
        at_ms,
        call_id: room.clone(),
        user_id: user.clone(),
        track_id: c.track.clone(),
        forwarding: f,
    });
}
