//! The media engine of the load generator: one thread that owns every simulated peer
//! connection and all their sockets.
//!
//! # What is real and what is not
//!
//! Each peer connection is a full WebRTC stack, `rtc` 0.21 (webrtc-rs's sans-IO peer
//! connection; the server uses str0m, so the two sides are independent implementations). It
//! makes the offers and answers, runs ICE against the server's one UDP port, completes the
//! DTLS handshake, derives the SRTP keys and encrypts every packet a publisher sends. It is
//! driven sans-IO from this one thread: the engine owns the sockets and moves datagrams with
//! `recvmmsg`/`sendmmsg`, so hundreds of peers cost one thread and a few syscalls per batch.
//!
//! What the engine does itself, for speed, on the receiving side: every RTP datagram a
//! subscriber receives is counted from its clear RTP header (SSRC, sequence number: loss and
//! reordering per stream) and its transport-wide sequence number is recorded for TWCC
//! feedback, which the engine builds with webrtc-rs's TWCC receiver and sends through the
//! stack (SRTCP), every 100 ms, as a browser does. Only a sample of the received RTP
//! datagrams (one in `verify_every`, 1 = all) goes through the stack's SRTP decryption: those
//! are authenticated and decrypted, and their payload stamp gives the forwarding latency (send
//! time written by the publisher just before encryption, to the kernel receive timestamp of
//! the subscriber's socket, one CLOCK_REALTIME on one host). A sampled packet that fails to
//! decrypt or carries no stamp counts as a verification failure. Everything that is not RTP
//! (STUN, DTLS, RTCP) always goes through the stack.
//!
//! Why `rtc` and not str0m: the server is str0m, and the same stack on both sides would hide
//! interop bugs and share their costs. Why not SRTP by hand after the handshake: `rtc` does not
//! expose the DTLS keying material, and its per-packet cost driven this way (≈ 5.5 µs per
//! received packet with decryption, measured; see BENCHMARKS.md) is below the server's cost per
//! forwarded packet, with sampling (`verify_every`) for more headroom near saturation.
//!
//! Not done, unlike a browser: no NACKs (loss is measured, not repaired), no receiver reports,
//! no jitter buffer or decoding. Publishers answer PLI/FIR with a keyframe at once (an
//! interceptor in the publisher's chain sees the decrypted RTCP).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use rtc::interceptor::{
    AttributedPacket, Interceptor, Packet as IPacket, RTPHeaderExtension, StreamInfo,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::marshal::Unmarshal;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::oneshot;

use super::report::{SeqTracker, histogram};
use super::synth::{self, OpusSource, SynthPacket, VideoSpec, Vp8Source};
use super::udp::{self, Epoll, RecvBatch};

const VP8_PT: u8 = 96;
const RTX_PT: u8 = 97;
const OPUS_PT: u8 = 111;
const URI_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const URI_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const URI_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
const URI_TWCC: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
/// A publisher this far behind its frame schedule skips frames instead of bursting.
const MAX_LAG: Duration = Duration::from_millis(200);
/// How long the engine sleeps at most (commands are polled at least this often).
const MAX_WAIT: Duration = Duration::from_millis(5);

/// A layer to publish: its rid and, for video, its spec.
type LayerPlan = (Option<String>, Option<VideoSpec>);

/// Identifies one simulated user (chosen by the caller).
pub type UserKey = u32;

/// What a publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSpec {
    /// The video layer (the top layer with simulcast).
    pub video: Option<VideoSpec>,
    /// Three simulcast layers (quarter, half, full) instead of one.
    pub simulcast: bool,
    /// An Opus track.
    pub audio: bool,
}

/// Commands from the signaling side.
enum Cmd {
    Publish {
        user: UserKey,
        spec: PublishSpec,
        reply: oneshot::Sender<Result<String, String>>,
    },
    PublishAnswer {
        user: UserKey,
        sdp: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SubscribeOffer {
        user: UserKey,
        sdp: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Close {
        user: UserKey,
    },
}

/// Live counters, for the progress bar (totals since start; the reader takes differences).
#[derive(Debug, Default)]
pub struct Live {
    /// Peer connections whose DTLS completed.
    pub connected: AtomicU64,
    /// Peer connections that failed.
    pub failed: AtomicU64,
    /// RTP packets sent by publishers.
    pub sent: AtomicU64,
    /// RTP media packets received by subscribers.
    pub received: AtomicU64,
    /// Expected minus received, over every stream (updated every 500 ms).
    pub lost: AtomicU64,
    /// Expected, over every stream (updated every 500 ms).
    pub expected: AtomicU64,
    /// Users whose subscriber connection received media.
    pub users_with_media: AtomicU64,
    /// Keyframe requests (PLI/FIR) publishers received.
    pub keyframe_requests: AtomicU64,
    /// Latency p50 and p99 of the last 500 ms, µs.
    pub latency_p50_us: AtomicU64,
    /// See above.
    pub latency_p99_us: AtomicU64,
}

/// What the engine measured inside the window (between [`EngineHandle::start_window`] and
/// [`EngineHandle::stop`]), plus per-user first-media times over the whole run.
#[derive(Debug, Clone)]
pub struct EngineResults {
    /// RTP packets sent by publishers.
    pub sent_packets: u64,
    /// Their RTP payload bytes.
    pub sent_bytes: u64,
    /// RTP media packets (VP8/Opus payload types) received by subscribers.
    pub received_packets: u64,
    /// Their datagram bytes.
    pub received_bytes: u64,
    /// RTP packets of other payload types received (RTX, padding, probes).
    pub received_other: u64,
    /// Media packets the received sequence numbers span.
    pub expected: u64,
    /// Expected minus received.
    pub lost: u64,
    /// Forwarding latency of the verified sample, µs.
    pub latency_us: Histogram<u64>,
    /// Sampled packets decrypted and stamped.
    pub verified: u64,
    /// Sampled packets that failed SRTP or carried no stamp.
    pub verify_failures: u64,
    /// Keyframe requests (PLI/FIR) the publishers received over the whole run.
    pub keyframe_requests: u64,
    /// Frames skipped because the engine fell behind schedule.
    pub frames_skipped: u64,
    /// CPU seconds of the engine thread in the window.
    pub engine_cpu_seconds: f64,
    /// When each user's subscriber connection received its first media packet.
    pub first_media: HashMap<UserKey, Instant>,
    /// When each user's peer connection(s) all reached `connected`.
    pub connected: HashMap<UserKey, Instant>,
    /// Users with a failed peer connection, and why.
    pub failures: Vec<(UserKey, String)>,
}

/// Handle to the engine thread.
pub struct EngineHandle {
    tx: mpsc::Sender<Cmd>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Live counters.
    pub live: Arc<Live>,
    thread: Option<std::thread::JoinHandle<EngineResults>>,
}

impl EngineHandle {
    /// Starts the engine thread. Peers bind sockets on `ip`; one received RTP packet in
    /// `verify_every` is decrypted and timed.
    pub fn start(ip: IpAddr, verify_every: u32) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Live::default());
        let mut engine = Engine {
            ip,
            verify_every: verify_every.max(1),
            rx,
            measuring: measuring.clone(),
            stop: stop.clone(),
            live: live.clone(),
            peers: Vec::new(),
            publishers: HashMap::new(),
            subscribers: HashMap::new(),
            epoll: Epoll::new()?,
            w: Window::default(),
            first_media: HashMap::new(),
            connected: HashMap::new(),
            failures: Vec::new(),
            cpu_at_start: None,
            closed_totals: (0, 0),
        };
        let thread = std::thread::Builder::new()
            .name("loadtest-media".into())
            .spawn(move || engine.run())?;
        Ok(Self {
            tx,
            measuring,
            stop,
            live,
            thread: Some(thread),
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| "media engine stopped".to_owned())?;
        rx.await.map_err(|_| "media engine stopped".to_owned())?
    }

    /// Creates `user`'s publisher connection and returns its offer (candidates included).
    pub async fn publish(&self, user: UserKey, spec: PublishSpec) -> Result<String, String> {
        self.call(|reply| Cmd::Publish { user, spec, reply }).await
    }

    /// Applies the server's answer to `user`'s publisher offer; media starts once DTLS is up.
    pub async fn publish_answer(&self, user: UserKey, sdp: String) -> Result<(), String> {
        self.call(|reply| Cmd::PublishAnswer { user, sdp, reply })
            .await
    }

    /// Applies a server offer to `user`'s subscriber connection (created on the first) and
    /// returns the answer.
    pub async fn subscribe_offer(&self, user: UserKey, sdp: String) -> Result<String, String> {
        self.call(|reply| Cmd::SubscribeOffer { user, sdp, reply })
            .await
    }

    /// Closes `user`'s connections.
    pub fn close(&self, user: UserKey) {
        let _ = self.tx.send(Cmd::Close { user });
    }

    /// Starts the measured window (counters before it are discarded).
    pub fn start_window(&self) {
        self.measuring.store(true, Ordering::SeqCst);
    }

    /// Ends the window, stops the thread and returns what it measured.
    pub fn stop(mut self) -> Option<EngineResults> {
        self.measuring.store(false, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

struct OutStream {
    sender: RTCRtpSenderId,
    ssrc: u32,
    rid: Option<String>,
    mid: String,
    seq: u16,
    next_at: Instant,
    interval: Duration,
    video: Option<Vp8Source>,
    audio: Option<OpusSource>,
    ext_mid: Option<u8>,
    ext_rid: Option<u8>,
    ext_level: Option<u8>,
    pt: u8,
}

#[derive(Default)]
struct InStats {
    seq: SeqTracker,
}

struct Peer {
    user: UserKey,
    publisher: bool,
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    deadline: Option<Instant>,
    connected: bool,
    failed: bool,
    candidate_added: bool,
    /// Touched since the last flush: its stack may have output.
    dirty: bool,
    /// Media SSRCs of keyframe requests seen by the publisher's interceptor.
    keyframes: Arc<std::sync::Mutex<Vec<u32>>>,
    // Publisher.
    streams: Vec<OutStream>,
    answered: bool,
    // Subscriber.
    media_pts: Vec<u8>,
    twcc: Option<rtc::interceptor::TwccReceiverInterceptor>,
    twcc_ext: Option<u8>,
    twcc_deadline: Option<Instant>,
    inbound: HashMap<u32, InStats>,
    rtp_seen: u64,
    pending_rx_ns: u64,
}

#[derive(Default)]
struct Window {
    sent_packets: u64,
    sent_bytes: u64,
    received_packets: u64,
    received_bytes: u64,
    received_other: u64,
    verified: u64,
    verify_failures: u64,
    frames_skipped: u64,
    latency: Option<Histogram<u64>>,
    base_expected: u64,
    base_received: u64,
}

struct Engine {
    ip: IpAddr,
    verify_every: u32,
    rx: mpsc::Receiver<Cmd>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
    peers: Vec<Option<Peer>>,
    publishers: HashMap<UserKey, usize>,
    subscribers: HashMap<UserKey, usize>,
    epoll: Epoll,
    w: Window,
    first_media: HashMap<UserKey, Instant>,
    connected: HashMap<UserKey, Instant>,
    failures: Vec<(UserKey, String)>,
    cpu_at_start: Option<f64>,
    /// Expected and received of the streams of closed peers.
    closed_totals: (u64, u64),
}

/// CPU seconds of the calling thread.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// CPU seconds of this whole process (all threads).
pub fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The RTCP feedback a browser offers for VP8 (transport-cc only where this side receives).
fn video_feedback(subscriber: bool) -> Vec<RTCPFeedback> {
    let mut v = vec![
        RTCPFeedback {
            typ: "nack".into(),
            parameter: String::new(),
        },
        RTCPFeedback {
            typ: "nack".into(),
            parameter: "pli".into(),
        },
        RTCPFeedback {
            typ: "ccm".into(),
            parameter: "fir".into(),
        },
    ];
    if subscriber {
        v.push(RTCPFeedback {
            typ: "transport-cc".into(),
            parameter: String::new(),
        });
    }
    v
}

fn media_engine(subscriber: bool) -> Result<MediaEngine, String> {
    let e = |e: rtc::shared::error::Error| e.to_string();
    let mut me = MediaEngine::default();
    let video_fb = video_feedback(subscriber);
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_VP8.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: video_fb,
            },
            payload_type: VP8_PT,
        },
        RtpCodecKind::Video,
    )
    .map_err(e)?;
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_RTX.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: format!("apt={VP8_PT}"),
                rtcp_feedback: vec![],
            },
            payload_type: RTX_PT,
        },
        RtpCodecKind::Video,
    )
    .map_err(e)?;
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: if subscriber {
                    vec![RTCPFeedback {
                        typ: "transport-cc".into(),
                        parameter: String::new(),
                    }]
                } else {
                    vec![]
                },
            },
            payload_type: OPUS_PT,
        },
        RtpCodecKind::Audio,
    )
    .map_err(e)?;
    let mut exts = vec![
        (URI_MID, RtpCodecKind::Audio),
        (URI_MID, RtpCodecKind::Video),
        (URI_RID, RtpCodecKind::Video),
        (URI_AUDIO_LEVEL, RtpCodecKind::Audio),
    ];
    if subscriber {
        exts.push((URI_TWCC, RtpCodecKind::Video));
        exts.push((URI_TWCC, RtpCodecKind::Audio));
    }
    for (uri, kind) in exts {
        me.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: uri.to_owned(),
            },
            kind,
            None,
        )
        .map_err(e)?;
    }
    Ok(me)
}

/// Notes the media SSRCs of PLI/FIR as decrypted RTCP passes the read side of a publisher's
/// interceptor chain. (The stack routes a compound RTCP packet by its first packet's
/// destination, which for a send-only connection finds no track, so keyframe requests never
/// reach `poll_read`.)
struct KeyframeWatch {
    seen: Arc<std::sync::Mutex<Vec<u32>>>,
    read: std::collections::VecDeque<rtc::interceptor::TaggedPacket>,
    write: std::collections::VecDeque<rtc::interceptor::TaggedPacket>,
}

impl Protocol<rtc::interceptor::TaggedPacket, rtc::interceptor::TaggedPacket, ()>
    for KeyframeWatch
{
    type Rout = rtc::interceptor::TaggedPacket;
    type Wout = rtc::interceptor::TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        if let IPacket::Rtcp(list) = &msg.message.packet
            && let Ok(mut seen) = self.seen.lock()
        {
            for p in list {
                let any = p.as_any();
                if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    seen.push(pli.media_ssrc);
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    seen.extend(fir.fir.iter().map(|e| e.ssrc));
                }
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: rtc::interceptor::TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<rtc::interceptor::TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeWatch {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

fn new_pc(
    subscriber: bool,
    keyframes: Option<Arc<std::sync::Mutex<Vec<u32>>>>,
) -> Result<RTCPeerConnection, String> {
    let mut b = RTCPeerConnectionBuilder::new().with_media_engine(media_engine(subscriber)?);
    if let Some(seen) = keyframes {
        b = b.with_interceptor_registry(rtc::interceptor::Registry::new().with(
            rtc::interceptor::Slot::from(14_000),
            KeyframeWatch {
                seen,
                read: Default::default(),
                write: Default::default(),
            },
        ));
    }
    b.build(Instant::now()).map_err(|e| e.to_string())
}

fn add_host_candidate(pc: &mut RTCPeerConnection, local: SocketAddr) -> Result<(), String> {
    let c = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: local.ip().to_string(),
            port: local.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .map_err(|e| e.to_string())?;
    let init = RTCIceCandidate::from(&c)
        .to_json()
        .map_err(|e| e.to_string())?;
    pc.add_local_candidate(init).map_err(|e| e.to_string())
}

/// Reads `a=extmap:ID URI` lines of an SDP.
fn extmap_id(sdp: &str, uri: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=extmap:")?;
        let (id, u) = rest.split_once(' ')?;
        let u = u.split_whitespace().next()?;
        if u == uri {
            id.split('/').next()?.parse().ok()
        } else {
            None
        }
    })
}

/// Payload types whose `a=rtpmap` names one of `codecs` (case-insensitive).
fn payload_types(sdp: &str, codecs: &[&str]) -> Vec<u8> {
    let mut v: Vec<u8> = sdp
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("a=rtpmap:")?;
            let (pt, name) = rest.split_once(' ')?;
            let codec = name.split('/').next()?;
            codecs
                .iter()
                .any(|c| c.eq_ignore_ascii_case(codec))
                .then(|| pt.parse().ok())
                .flatten()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The `a=mid` values of an SDP, in m-line order.
fn mids(sdp: &str) -> Vec<String> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=mid:").map(str::to_owned))
        .collect()
}

/// Whether a datagram is RTP (not RTCP) per RFC 5761/7983.
fn is_rtp(d: &[u8]) -> bool {
    matches!(d.first(), Some(b) if (128..=191).contains(b))
        && d.get(1).is_some_and(|pt| !(192..=223).contains(pt))
        && d.len() >= 12
}

impl Engine {
    fn run(&mut self) -> EngineResults {
        let mut batch = RecvBatch::default();
        let mut ready = Vec::new();
        let mut next_live = Instant::now() + Duration::from_millis(500);
        let mut live_hist = histogram();
        let mut was_measuring = false;
        let mut cpu_window = 0.0;
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(c) = self.rx.try_recv() {
                self.command(c);
            }
            let measuring = self.measuring.load(Ordering::Relaxed);
            if measuring && !was_measuring {
                self.open_window();
            }
            was_measuring = measuring;
            let now = Instant::now();
            self.send_due(now);
            self.timeouts(now);
            self.flush_all();
            // Sleep until the next frame, timer or datagram.
            let wake = self.next_wake(now);
            let wait = wake.saturating_duration_since(Instant::now()).min(MAX_WAIT);
            self.epoll.wait(wait, &mut ready);
            for token in ready.clone() {
                self.receive(token as usize, &mut batch, &mut live_hist);
            }
            self.flush_all();
            let now = Instant::now();
            if now >= next_live {
                next_live = now + Duration::from_millis(500);
                self.update_live(&mut live_hist);
            }
        }
        if let Some(start) = self.cpu_at_start {
            cpu_window = thread_cpu_seconds() - start;
        }
        self.results(cpu_window)
    }

    fn open_window(&mut self) {
        let (expected, received) = self.stream_totals();
        self.w = Window {
            latency: Some(histogram()),
            base_expected: expected,
            base_received: received,
            ..Window::default()
        };
        self.cpu_at_start = Some(thread_cpu_seconds());
    }

    fn stream_totals(&self) -> (u64, u64) {
        let (mut e, mut r) = self.closed_totals;
        for p in self.peers.iter().flatten() {
            for s in p.inbound.values() {
                e += s.seq.expected();
                r += s.seq.received();
            }
        }
        (e, r)
    }

    fn results(&mut self, cpu: f64) -> EngineResults {
        let (expected, received) = self.stream_totals();
        let w = std::mem::take(&mut self.w);
        let expected = expected.saturating_sub(w.base_expected);
        let received_seq = received.saturating_sub(w.base_received);
        EngineResults {
            sent_packets: w.sent_packets,
            sent_bytes: w.sent_bytes,
            received_packets: w.received_packets,
            received_bytes: w.received_bytes,
            received_other: w.received_other,
            expected,
            lost: expected.saturating_sub(received_seq),
            latency_us: w.latency.unwrap_or_else(histogram),
            verified: w.verified,
            verify_failures: w.verify_failures,
            keyframe_requests: self.live.keyframe_requests.load(Ordering::Relaxed),
            frames_skipped: w.frames_skipped,
            engine_cpu_seconds: cpu,
            first_media: std::mem::take(&mut self.first_media),
            connected: std::mem::take(&mut self.connected),
            failures: std::mem::take(&mut self.failures),
        }
    }

    fn update_live(&self, hist: &mut Histogram<u64>) {
        let (e, r) = self.stream_totals();
        self.live.expected.store(e, Ordering::Relaxed);
        self.live.lost.store(e.saturating_sub(r), Ordering::Relaxed);
        if !hist.is_empty() {
            self.live
                .latency_p50_us
                .store(hist.value_at_quantile(0.5), Ordering::Relaxed);
            self.live
                .latency_p99_us
                .store(hist.value_at_quantile(0.99), Ordering::Relaxed);
        }
        hist.reset();
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + MAX_WAIT;
        for p in self.peers.iter().flatten() {
            if let Some(d) = p.deadline {
                wake = wake.min(d);
            }
            if let Some(d) = p.twcc_deadline {
                wake = wake.min(d);
            }
            if p.connected {
                for s in &p.streams {
                    wake = wake.min(s.next_at);
                }
            }
        }
        wake
    }

    fn add_peer(&mut self, peer: Peer) -> Result<usize, String> {
        let idx = self
            .peers
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.peers.len());
        self.epoll
            .add(peer.socket.as_raw_fd(), idx as u64)
            .map_err(|e| e.to_string())?;
        if idx == self.peers.len() {
            self.peers.push(Some(peer));
        } else if let Some(slot) = self.peers.get_mut(idx) {
            *slot = Some(peer);
        }
        Ok(idx)
    }

    fn new_peer(&self, user: UserKey, publisher: bool) -> Result<Peer, String> {
        let socket = udp::bind(SocketAddr::new(self.ip, 0)).map_err(|e| e.to_string())?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        let keyframes = Arc::new(std::sync::Mutex::new(Vec::new()));
        Ok(Peer {
            user,
            publisher,
            pc: new_pc(!publisher, publisher.then(|| keyframes.clone()))?,
            keyframes,
            socket,
            local,
            deadline: Some(Instant::now()),
            connected: false,
            failed: false,
            candidate_added: false,
            dirty: true,
            streams: Vec::new(),
            answered: false,
            media_pts: Vec::new(),
            twcc: None,
            twcc_ext: None,
            twcc_deadline: None,
            inbound: HashMap::new(),
            rtp_seen: 0,
            pending_rx_ns: 0,
        })
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Publish { user, spec, reply } => {
                let r = self.publish(user, spec);
                let _ = reply.send(r);
            }
            Cmd::PublishAnswer { user, sdp, reply } => {
                let r = self.publish_answer(user, sdp);
                let _ = reply.send(r);
            }
            Cmd::SubscribeOffer { user, sdp, reply } => {
                let r = self.subscribe_offer(user, sdp);
                let _ = reply.send(r);
            }
            Cmd::Close { user } => {
                for idx in [
                    self.publishers.remove(&user),
                    self.subscribers.remove(&user),
                ]
                .into_iter()
                .flatten()
                {
                    if let Some(mut p) = self.peers.get_mut(idx).and_then(Option::take) {
                        for st in p.inbound.values() {
                            self.closed_totals.0 += st.seq.expected();
                            self.closed_totals.1 += st.seq.received();
                        }
                        let _ = p.pc.close();
                        flush(&mut p);
                        self.epoll.remove(p.socket.as_raw_fd());
                    }
                }
            }
        }
    }

    fn publish(&mut self, user: UserKey, spec: PublishSpec) -> Result<String, String> {
        let mut peer = self.new_peer(user, true)?;
        let e = |e: rtc::shared::error::Error| e.to_string();
        let now = Instant::now();
        let stream_id = format!("u{user}");
        let mut plans: Vec<(RtpCodecKind, Vec<LayerPlan>)> = Vec::new();
        if let Some(v) = spec.video {
            let layers = if spec.simulcast {
                let ladder = v.simulcast_ladder();
                ["q", "h", "f"]
                    .iter()
                    .zip(ladder)
                    .map(|(r, s)| (Some((*r).to_owned()), Some(s)))
                    .collect()
            } else {
                vec![(None, Some(v))]
            };
            plans.push((RtpCodecKind::Video, layers));
        }
        if spec.audio {
            plans.push((RtpCodecKind::Audio, vec![(None, None)]));
        }
        let mut seed = u64::from(user).wrapping_mul(0x9e37_79b9) + 1;
        for (i, (kind, layers)) in plans.into_iter().enumerate() {
            let codec = match kind {
                RtpCodecKind::Audio => RTCRtpCodec {
                    mime_type: MIME_TYPE_OPUS.to_owned(),
                    clock_rate: 48_000,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                    rtcp_feedback: vec![],
                },
                _ => RTCRtpCodec {
                    mime_type: MIME_TYPE_VP8.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: String::new(),
                    rtcp_feedback: video_feedback(false),
                },
            };
            let ssrcs: Vec<u32> = layers.iter().map(|_| rand::random::<u32>() | 1).collect();
            let codings = layers
                .iter()
                .zip(&ssrcs)
                .map(|((rid, _), ssrc)| RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: rid.clone().unwrap_or_default(),
                        ssrc: Some(*ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                })
                .collect();
            let track = MediaStreamTrack::new(
                stream_id.clone(),
                format!("{stream_id}-t{i}"),
                format!("t{i}"),
                kind,
                codings,
            );
            let sender = peer.pc.add_track(track).map_err(e)?;
            for ((rid, video), ssrc) in layers.into_iter().zip(ssrcs) {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let (video, audio, interval, pt) = match video {
                    Some(v) => (
                        Some(Vp8Source::new(v, seed)),
                        None,
                        v.frame_interval(),
                        VP8_PT,
                    ),
                    None => (
                        None,
                        Some(OpusSource::new(seed)),
                        synth::AUDIO_PTIME,
                        OPUS_PT,
                    ),
                };
                peer.streams.push(OutStream {
                    sender,
                    ssrc,
                    rid,
                    mid: String::new(),
                    seq: rand::random(),
                    next_at: now,
                    interval,
                    video,
                    audio,
                    ext_mid: None,
                    ext_rid: None,
                    ext_level: None,
                    pt,
                });
            }
        }
        add_host_candidate(&mut peer.pc, peer.local)?;
        peer.candidate_added = true;
        let offer = peer.pc.create_offer(None).map_err(e)?;
        peer.pc.set_local_description(now, offer).map_err(e)?;
        let sdp = peer
            .pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or("no local description")?;
        // Tracks were added in order, so the i-th m-line is the i-th track.
        let m = mids(&sdp);
        let mut track_idx = 0;
        let mut last_sender = None;
        for s in &mut peer.streams {
            if last_sender.is_some_and(|l| l != s.sender) {
                track_idx += 1;
            }
            last_sender = Some(s.sender);
            s.mid = m.get(track_idx).cloned().unwrap_or_default();
        }
        let old = self.publishers.remove(&user);
        if let Some(o) = old.and_then(|i| self.peers.get_mut(i).and_then(Option::take)) {
            self.epoll.remove(o.socket.as_raw_fd());
        }
        let idx = self.add_peer(peer)?;
        self.publishers.insert(user, idx);
        Ok(sdp)
    }

    fn publish_answer(&mut self, user: UserKey, sdp: String) -> Result<(), String> {
        let idx = *self.publishers.get(&user).ok_or("no publisher")?;
        let p = self
            .peers
            .get_mut(idx)
            .and_then(Option::as_mut)
            .ok_or("no publisher")?;
        let desc = RTCSessionDescription::answer(sdp).map_err(|e| e.to_string())?;
        p.pc.set_remote_description(Instant::now(), desc)
            .map_err(|e| e.to_string())?;
        // Negotiated extension IDs and payload types, per sender.
        for s in &mut p.streams {
            let Some(mut sender) = p.pc.rtp_sender(s.sender) else {
                continue;
            };
            let params = sender.get_parameters();
            for h in &params.rtp_parameters.header_extensions {
                let id = Some(h.id as u8);
                match h.uri.as_str() {
                    URI_MID => s.ext_mid = id,
                    URI_RID => s.ext_rid = id,
                    URI_AUDIO_LEVEL => s.ext_level = id,
                    _ => {}
                }
            }
            let want = if s.video.is_some() {
                MIME_TYPE_VP8
            } else {
                MIME_TYPE_OPUS
            };
            if let Some(c) = params
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(want))
            {
                s.pt = c.payload_type;
            }
        }
        p.answered = true;
        p.dirty = true;
        p.deadline = Some(Instant::now());
        Ok(())
    }

    fn subscribe_offer(&mut self, user: UserKey, sdp: String) -> Result<String, String> {
        let idx = match self.subscribers.get(&user) {
            Some(i) => *i,
            None => {
                let peer = self.new_peer(user, false)?;
                let i = self.add_peer(peer)?;
                self.subscribers.insert(user, i);
                i
            }
        };
        let p = self
            .peers
            .get_mut(idx)
            .and_then(Option::as_mut)
            .ok_or("no subscriber")?;
        let e = |e: rtc::shared::error::Error| e.to_string();
        let now = Instant::now();
        p.media_pts = payload_types(&sdp, &["VP8", "opus"]);
        if let Some(id) = extmap_id(&sdp, URI_TWCC)
            && p.twcc_ext != Some(id)
        {
            {
                let mut t = rtc::interceptor::TwccReceiverBuilder::new()
                    .with_interval(Duration::from_millis(100))
                    .build();
                t.bind_remote_stream(&StreamInfo {
                    rtp_header_extensions: vec![RTPHeaderExtension {
                        uri: URI_TWCC.to_owned(),
                        id: u16::from(id),
                    }],
                    ..Default::default()
                });
                p.twcc = Some(t);
                p.twcc_ext = Some(id);
            }
        }
        let desc = RTCSessionDescription::offer(sdp).map_err(e)?;
        p.pc.set_remote_description(now, desc).map_err(e)?;
        if !p.candidate_added {
            add_host_candidate(&mut p.pc, p.local)?;
            p.candidate_added = true;
        }
        let answer = p.pc.create_answer(None).map_err(e)?;
        p.pc.set_local_description(now, answer).map_err(e)?;
        let sdp =
            p.pc.local_description()
                .map(|d| d.sdp)
                .ok_or("no local description")?;
        p.deadline = Some(now);
        p.dirty = true;
        Ok(sdp)
    }

    fn send_due(&mut self, now: Instant) {
        let measuring = self.measuring.load(Ordering::Relaxed);
        let mut frame: Vec<SynthPacket> = Vec::new();
        for p in self.peers.iter_mut().flatten() {
            if !p.publisher || !p.connected || p.failed {
                continue;
            }
            for si in 0..p.streams.len() {
                let Some(s) = p.streams.get_mut(si) else {
                    continue;
                };
                if s.next_at > now {
                    continue;
                }
                if now.saturating_duration_since(s.next_at) > MAX_LAG {
                    let behind = now.saturating_duration_since(s.next_at);
                    let skip = (behind.as_nanos() / s.interval.as_nanos().max(1)) as u32;
                    s.next_at += s.interval * skip;
                    if measuring {
                        self.w.frames_skipped += u64::from(skip);
                    }
                }
                s.next_at += s.interval;
                frame.clear();
                if let Some(v) = s.video.as_mut() {
                    v.next_frame(&mut frame);
                } else if let Some(a) = s.audio.as_mut() {
                    frame.push(a.next_packet());
                }
                for pkt in frame.drain(..) {
                    let mut header = rtc::rtp::Header {
                        version: 2,
                        marker: pkt.marker,
                        payload_type: s.pt,
                        sequence_number: s.seq,
                        timestamp: pkt.timestamp,
                        ssrc: s.ssrc,
                        ..Default::default()
                    };
                    s.seq = s.seq.wrapping_add(1);
                    if let Some(id) = s.ext_mid {
                        let _ = header.set_extension(id, Bytes::from(s.mid.clone().into_bytes()));
                    }
                    if let (Some(id), Some(rid)) = (s.ext_rid, &s.rid) {
                        let _ = header.set_extension(id, Bytes::from(rid.clone().into_bytes()));
                    }
                    if let (Some(id), Some(level)) = (s.ext_level, pkt.audio_level) {
                        let _ = header.set_extension(id, Bytes::from(vec![0x80 | (level & 0x7f)]));
                    }
                    let mut payload = pkt.payload;
                    let len = payload.len() as u64;
                    synth::stamp(&mut payload, u32::from(s.seq), udp::realtime_ns());
                    let sender = s.sender;
                    let ok = p.pc.rtp_sender(sender).is_some_and(|mut snd| {
                        snd.write_rtp(
                            now,
                            rtc::rtp::Packet {
                                header,
                                payload: Bytes::from(payload),
                            },
                        )
                        .is_ok()
                    });
                    p.dirty = true;
                    if ok {
                        self.live.sent.fetch_add(1, Ordering::Relaxed);
                        if measuring {
                            self.w.sent_packets += 1;
                            self.w.sent_bytes += len;
                        }
                    }
                }
            }
        }
    }

    fn timeouts(&mut self, now: Instant) {
        for p in self.peers.iter_mut().flatten() {
            if p.deadline.is_some_and(|d| d <= now) {
                let _ = p.pc.handle_timeout(now);
                p.dirty = true;
            }
            if p.twcc_deadline.is_some_and(|d| d <= now)
                && let Some(t) = p.twcc.as_mut()
            {
                let _ = t.handle_timeout(now);
                let mut fb = Vec::new();
                while let Some(m) = t.poll_write() {
                    if let IPacket::Rtcp(list) = m.message.packet {
                        fb.extend(list);
                    }
                }
                p.twcc_deadline = t.poll_timeout();
                let receiver = p.pc.get_receivers().next();
                if !fb.is_empty()
                    && let Some(rid) = receiver
                    && let Some(mut r) = p.pc.rtp_receiver(rid)
                {
                    let _ = r.write_rtcp(now, fb);
                    p.dirty = true;
                }
            }
        }
    }

    /// Drains every peer's stack: events, reads, writes (sent with one `sendmmsg` per peer).
    fn flush_all(&mut self) {
        for p in self.peers.iter_mut().flatten() {
            if !p.dirty {
                continue;
            }
            p.dirty = false;
            while let Some(ev) = p.pc.poll_event() {
                if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                    match s {
                        RTCPeerConnectionState::Connected if !p.connected => {
                            p.connected = true;
                            self.live.connected.fetch_add(1, Ordering::Relaxed);
                            self.connected.insert(p.user, Instant::now());
                        }
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                            if !p.failed =>
                        {
                            p.failed = true;
                            if s == RTCPeerConnectionState::Failed {
                                self.live.failed.fetch_add(1, Ordering::Relaxed);
                                let what = if p.publisher {
                                    "publisher"
                                } else {
                                    "subscriber"
                                };
                                self.failures
                                    .push((p.user, format!("{what} connection failed")));
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Decrypted RTP is read (and timed) right after its datagram is fed in
            // `receive`; anything else the stack surfaces here is not needed.
            while p.pc.poll_read().is_some() {}
            if p.publisher {
                let ssrcs: Vec<u32> = p
                    .keyframes
                    .lock()
                    .map(|mut v| std::mem::take(&mut *v))
                    .unwrap_or_default();
                for ssrc in ssrcs {
                    if let Some(s) = p.streams.iter_mut().find(|s| s.ssrc == ssrc)
                        && let Some(v) = s.video.as_mut()
                    {
                        v.request_keyframe();
                        self.live.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            flush(p);
        }
    }

    fn receive(&mut self, idx: usize, batch: &mut RecvBatch, live_hist: &mut Histogram<u64>) {
        let measuring = self.measuring.load(Ordering::Relaxed);
        let verify_every = u64::from(self.verify_every);
        let Some(p) = self.peers.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let fd = p.socket.as_raw_fd();
        // A few batches at most, so one busy socket cannot starve the others.
        for _ in 0..4 {
            let n = batch.recv(fd).unwrap_or_default();
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let now_ns = udp::realtime_ns();
            for i in 0..n {
                let Some((data, from, rx_ns)) = batch.get(i) else {
                    continue;
                };
                // The kernel's arrival time as an Instant, for TWCC.
                let arrived = now
                    .checked_sub(Duration::from_nanos(now_ns.saturating_sub(rx_ns)))
                    .unwrap_or(now);
                let feed = if !p.publisher && p.connected && is_rtp(data) {
                    let pt = data.get(1).map_or(0, |b| b & 0x7f);
                    let seq = u16::from_be_bytes([data[2], data[3]]);
                    let ssrc = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
                    // TWCC: header only, no decryption needed.
                    if let Some(t) = p.twcc.as_mut()
                        && let Ok(header) = rtc::rtp::Header::unmarshal(&mut &data[..])
                    {
                        let _ = t.handle_read(rtc::interceptor::TaggedPacket {
                            now: arrived,
                            transport: TransportContext::default(),
                            message: AttributedPacket::new(IPacket::Rtp(rtc::rtp::Packet {
                                header,
                                payload: Bytes::new(),
                            })),
                        });
                        while t.poll_read().is_some() {}
                        if p.twcc_deadline.is_none() {
                            p.twcc_deadline = t.poll_timeout();
                        }
                    }
                    if !p.media_pts.contains(&pt) {
                        if measuring {
                            self.w.received_other += 1;
                        }
                        false
                    } else {
                        p.inbound.entry(ssrc).or_default().seq.push(seq);
                        self.live.received.fetch_add(1, Ordering::Relaxed);
                        if measuring {
                            self.w.received_packets += 1;
                            self.w.received_bytes += data.len() as u64;
                        }
                        if let std::collections::hash_map::Entry::Vacant(e) =
                            self.first_media.entry(p.user)
                        {
                            e.insert(now);
                            self.live.users_with_media.fetch_add(1, Ordering::Relaxed);
                        }
                        p.rtp_seen += 1;
                        p.rtp_seen % verify_every == 0
                    }
                } else {
                    true
                };
                if !feed {
                    continue;
                }
                p.dirty = true;
                p.pending_rx_ns = if rx_ns > 0 { rx_ns } else { udp::realtime_ns() };
                let msg = TaggedBytesMut {
                    now,
                    transport: TransportContext {
                        local_addr: p.local,
                        peer_addr: from,
                        ecn: None,
                        transport_protocol: TransportProtocol::UDP,
                    },
                    message: BytesMut::from(data),
                };
                if p.pc.handle_read(msg).is_err() && is_rtp(data) && measuring {
                    self.w.verify_failures += 1;
                }
                // Read the decrypted packet now, while its receive time is at hand.
                while let Some(m) = p.pc.poll_read() {
                    if let RTCMessage::RtpPacket(_, pkt) = m.message {
                        match synth::read_stamp(&pkt.payload) {
                            Some((_, sent_ns)) if p.pending_rx_ns >= sent_ns => {
                                let us = ((p.pending_rx_ns - sent_ns) / 1000).max(1);
                                let _ = live_hist.record(us);
                                if measuring {
                                    self.w.verified += 1;
                                    if let Some(h) = self.w.latency.as_mut() {
                                        let _ = h.record(us);
                                    }
                                }
                            }
                            _ => {
                                if measuring {
                                    self.w.verify_failures += 1;
                                }
                            }
                        }
                    }
                }
            }
            p.deadline = p.pc.poll_timeout();
            if n < udp::BATCH {
                break;
            }
        }
    }
}

/// Sends what the peer's stack queued, with one `sendmmsg`.
fn flush(p: &mut Peer) {
    let mut out: Vec<(SocketAddr, BytesMut)> = Vec::new();
    while let Some(w) = p.pc.poll_write() {
        out.push((w.transport.peer_addr, w.message));
    }
    if !out.is_empty() {
        let refs: Vec<(SocketAddr, &[u8])> = out.iter().map(|(a, b)| (*a, &b[..])).collect();
        udp::send_batch(p.socket.as_raw_fd(), &refs);
    }
    p.deadline = p.pc.poll_timeout();
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97 98\r\na=mid:0\r\n\
        a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n\
        a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
        a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=rtpmap:98 VP9/90000\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=rtpmap:111 opus/48000/2\r\n";

    #[test]
    fn reads_what_it_needs_from_a_server_offer() {
        assert_eq!(extmap_id(OFFER, URI_TWCC), Some(3));
        assert_eq!(extmap_id(OFFER, URI_MID), Some(4));
        assert_eq!(extmap_id(OFFER, URI_RID), None);
        assert_eq!(payload_types(OFFER, &["VP8", "opus"]), vec![96, 111]);
        assert_eq!(mids(OFFER), vec!["0", "1"]);
    }

    #[test]
    fn tells_rtp_from_rtcp_and_the_rest() {
        let mut rtp = [0u8; 12];
        rtp[0] = 0x80;
        rtp[1] = 96;
        assert!(is_rtp(&rtp));
        rtp[1] = 200; // SR
        assert!(!is_rtp(&rtp));
        assert!(!is_rtp(&[0x16, 0xfe, 0xfd]), "DTLS");
        assert!(!is_rtp(&[0x00, 0x01, 0, 0]), "STUN");
        assert!(!is_rtp(&[0x80, 96]), "too short");
    }
}
