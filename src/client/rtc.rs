//! A small WebRTC client on the `webrtc` 0.21 crate (the async layer over the sans-IO `rtc`
//! stack), for the SFU's integration tests and the load generator.
//!
//! It talks SDP strings only, so it does not care how signaling travels. Two halves, matching
//! the server's two connections per participant:
//!
//! - [`Publisher`]: offers. Built with a list of [`TrackSpec`]s (Opus audio; VP8 video with
//!   optional simulcast rids). [`Publisher::write`] sends an RTP packet the caller describes;
//!   the client fills in the SSRC, payload type, sequence number and the negotiated header
//!   extensions (mid, rid, audio level). `webrtc` 0.21.1 silently drops packets whose SSRC,
//!   payload type or extension IDs were not negotiated, which is why the caller does not set
//!   them. Keyframe requests (PLI/FIR) from the server are counted per track and layer.
//! - [`Subscriber`]: answers the server's offers (again and again as tracks come and go) and
//!   yields every received RTP packet with its track's msid (`<stream id> <track id>`, which
//!   the server sets to `<user_id> <track_id>`). RTX is negotiated and repaired packets arrive
//!   with their original sequence number, so a receiver sees a complete sequence after recovery.
//!
//! Both bind one UDP socket each on the given IP (tests use 127.0.0.1) and put their candidates
//! in the SDP (no trickle): [`Publisher::offer`] and [`Subscriber::accept_offer`] wait for ICE
//! gathering to complete.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::interceptor::{Interceptor, Packet as IPacket, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::{
    RTCConfiguration, RTCConfigurationBuilder, RTCIceServer, RTCIceTransportPolicy,
};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState,
};
use webrtc::rtp_transceiver::RtpSender;

/// Payload type the client registers for VP8.
pub const VP8_PT: u8 = 96;
/// Payload type the client registers for VP8's RTX.
pub const RTX_PT: u8 = 97;
/// Payload type the client registers for Opus.
pub const OPUS_PT: u8 = 111;

const URI_MID: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const URI_RID: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const URI_AUDIO_LEVEL: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebRTC stack refused an operation.
    #[error("webrtc: {0}")]
    Webrtc(#[from] webrtc::error::Error),
    /// No such track or layer.
    #[error("no track {0}")]
    NoTrack(String),
    /// A wait timed out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opus.
    Audio,
    /// VP8.
    Video,
}

/// A track to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackSpec {
    /// Audio (Opus) or video (VP8).
    pub kind: Kind,
    /// Simulcast rids, lowest quality first; empty for one layer.
    pub rids: Vec<String>,
}

impl TrackSpec {
    /// An Opus track.
    pub fn audio() -> Self {
        Self {
            kind: Kind::Audio,
            rids: Vec::new(),
        }
    }

    /// A single-layer VP8 track.
    pub fn video() -> Self {
        Self {
            kind: Kind::Video,
            rids: Vec::new(),
        }
    }

    /// A VP8 track with simulcast layers.
    pub fn simulcast(rids: &[&str]) -> Self {
        Self {
            kind: Kind::Video,
            rids: rids.iter().map(|r| r.to_string()).collect(),
        }
    }
}

/// One RTP packet to send; the client fills in the rest.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// RTP timestamp.
    pub timestamp: u32,
    /// Marker bit (last packet of a video frame).
    pub marker: bool,
    /// Payload.
    pub payload: Bytes,
    /// Audio level in -dBov (audio tracks only).
    pub audio_level: Option<u8>,
}

struct Handler {
    state: watch::Sender<RTCPeerConnectionState>,
    gathered: watch::Sender<bool>,
    tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(tx) = &self.tracks {
            let _ = tx.send(track);
        }
    }
}

/// Counts keyframe requests (PLI/FIR) by media SSRC as RTCP passes the read side of the chain.
struct KeyframeCounter {
    seen: Arc<Mutex<HashMap<u32, u64>>>,
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeCounter {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let IPacket::Rtcp(list) = &msg.message.packet
            && let Ok(mut seen) = self.seen.lock()
        {
            for p in list {
                let any = p.as_any();
                if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    *seen.entry(pli.media_ssrc).or_default() += 1;
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    for e in &fir.fir {
                        *seen.entry(e.ssrc).or_default() += 1;
                    }
                }
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeCounter {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn media_engine() -> Result<MediaEngine, ClientError> {
    let mut me = MediaEngine::default();
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PT,
        },
        RtpCodecKind::Video,
    )?;
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
    )?;
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus_codec(),
            payload_type: OPUS_PT,
        },
        RtpCodecKind::Audio,
    )?;
    for (uri, kind) in [
        (URI_MID, RtpCodecKind::Audio),
        (URI_MID, RtpCodecKind::Video),
        (URI_RID, RtpCodecKind::Video),
        (URI_AUDIO_LEVEL, RtpCodecKind::Audio),
    ] {
        me.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: uri.to_owned(),
            },
            kind,
            None,
        )?;
    }
    Ok(me)
}

struct Pc {
    pc: Arc<dyn PeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    gathered: watch::Receiver<bool>,
}

/// The ICE servers a connection uses (`rtc_join`'s `ice_servers`, docs/protocol.md) and whether it may
/// gather only relay candidates.
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    /// `(urls, username, credential)` per server.
    pub servers: Vec<(Vec<String>, String, String)>,
    /// Gather relay candidates only (every packet goes through a TURN server).
    pub relay_only: bool,
}

impl IceConfig {
    /// The servers of an `rtc_join` result (`ice_servers`), all candidate types allowed. Entries
    /// that are not `{urls, username, credential}` are skipped.
    pub fn from_join(result: &serde_json::Value) -> Self {
        let servers = result
            .get("ice_servers")
            .and_then(|v| v.as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|s| {
                        let urls = s
                            .get("urls")?
                            .as_array()?
                            .iter()
                            .filter_map(|u| u.as_str().map(str::to_owned))
                            .collect();
                        let user = s.get("username")?.as_str()?.to_owned();
                        let cred = s.get("credential")?.as_str()?.to_owned();
                        Some((urls, user, cred))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            servers,
            relay_only: false,
        }
    }

    fn configuration(&self) -> RTCConfiguration {
        let servers = self
            .servers
            .iter()
            .map(|(urls, username, credential)| RTCIceServer {
                urls: urls.clone(),
                username: username.clone(),
                credential: credential.clone(),
            })
            .collect();
        RTCConfigurationBuilder::new()
            .with_ice_servers(servers)
            .with_ice_transport_policy(if self.relay_only {
                RTCIceTransportPolicy::Relay
            } else {
                RTCIceTransportPolicy::All
            })
            .build()
    }
}

async fn build_pc(
    local: SocketAddr,
    tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
    keyframes: Option<Arc<Mutex<HashMap<u32, u64>>>>,
    ice: &IceConfig,
) -> Result<Pc, ClientError> {
    let mut me = media_engine()?;
    let mut registry = register_default_interceptors(Registry::new(), &mut me)?;
    if let Some(seen) = keyframes {
        registry = registry.with(
            Slot::from(14_000),
            KeyframeCounter {
                seen,
                read: Default::default(),
                write: Default::default(),
            },
        );
    }
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (gathered_tx, gathered) = watch::channel(false);
    let handler = Arc::new(Handler {
        state: state_tx,
        gathered: gathered_tx,
        tracks,
    });
    let pc = PeerConnectionBuilder::new()
        .with_configuration(ice.configuration())
        .with_media_engine(me)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![local.to_string()])
        .build()
        .await?;
    Ok(Pc {
        pc: Arc::new(pc),
        state,
        gathered,
    })
}

impl Pc {
    async fn local_sdp_after_gathering(&mut self) -> Result<String, ClientError> {
        tokio::time::timeout(Duration::from_secs(10), self.gathered.wait_for(|g| *g))
            .await
            .map_err(|_| ClientError::Timeout("ICE gathering"))?
            .map_err(|_| ClientError::Timeout("ICE gathering"))?;
        self.pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or(ClientError::Timeout("local description"))
    }

    async fn wait_connected(&mut self, timeout: Duration) -> Result<(), ClientError> {
        tokio::time::timeout(
            timeout,
            self.state
                .wait_for(|s| *s == RTCPeerConnectionState::Connected),
        )
        .await
        .map_err(|_| ClientError::Timeout("connection"))?
        .map_err(|_| ClientError::Timeout("connection"))?;
        Ok(())
    }
}

struct Layer {
    rid: Option<String>,
    ssrc: u32,
    seq: AtomicU64,
}

struct PubTrack {
    kind: Kind,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    layers: Vec<Layer>,
}

/// The publishing half of a participant: offers, then sends RTP.
pub struct Publisher {
    pc: Pc,
    tracks: Vec<PubTrack>,
    ext_ids: Mutex<HashMap<usize, HashMap<String, u8>>>,
    keyframes: Arc<Mutex<HashMap<u32, u64>>>,
}

impl Publisher {
    /// A publisher bound to `ip` with these tracks (`stream_id` becomes each track's msid
    /// stream; the server ignores it and assigns its own IDs).
    pub async fn new(
        ip: IpAddr,
        stream_id: &str,
        specs: &[TrackSpec],
    ) -> Result<Self, ClientError> {
        Self::new_at(SocketAddr::new(ip, 0), stream_id, specs).await
    }

    /// Like [`Publisher::new`], bound to this local address (port 0: any), e.g. to reuse a port a
    /// test sent other datagrams from.
    pub async fn new_at(
        local: SocketAddr,
        stream_id: &str,
        specs: &[TrackSpec],
    ) -> Result<Self, ClientError> {
        Self::with_ice(local, stream_id, specs, &IceConfig::default()).await
    }

    /// Like [`Publisher::new_at`], with ICE servers (TURN) and policy.
    pub async fn with_ice(
        local: SocketAddr,
        stream_id: &str,
        specs: &[TrackSpec],
        ice: &IceConfig,
    ) -> Result<Self, ClientError> {
        let keyframes = Arc::new(Mutex::new(HashMap::new()));
        let pc = build_pc(local, None, Some(keyframes.clone()), ice).await?;
        let mut tracks = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let (codec, kind) = match spec.kind {
                Kind::Audio => (opus_codec(), RtpCodecKind::Audio),
                Kind::Video => (vp8_codec(), RtpCodecKind::Video),
            };
            let rids: Vec<Option<String>> = if spec.rids.is_empty() {
                vec![None]
            } else {
                spec.rids.iter().cloned().map(Some).collect()
            };
            let layers: Vec<Layer> = rids
                .into_iter()
                .map(|rid| Layer {
                    rid,
                    ssrc: rand::random::<u32>() | 1,
                    seq: AtomicU64::new(u64::from(rand::random::<u16>())),
                })
                .collect();
            let codings = layers
                .iter()
                .map(|l| RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: l.rid.clone().unwrap_or_default(),
                        ssrc: Some(l.ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                })
                .collect();
            let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                stream_id.to_owned(),
                format!("{stream_id}-track{i}"),
                format!("track{i}"),
                kind,
                codings,
            )));
            let sender = pc
                .pc
                .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
                .await?;
            tracks.push(PubTrack {
                kind: spec.kind,
                track,
                sender,
                layers,
            });
        }
        Ok(Self {
            pc,
            tracks,
            ext_ids: Mutex::new(HashMap::new()),
            keyframes,
        })
    }

    /// Creates the offer, waits for ICE gathering, returns the SDP (with candidates).
    pub async fn offer(&mut self) -> Result<String, ClientError> {
        let offer = self.pc.pc.create_offer(None).await?;
        self.pc.pc.set_local_description(offer).await?;
        self.pc.local_sdp_after_gathering().await
    }

    /// Applies the server's answer.
    pub async fn set_answer(&self, sdp: String) -> Result<(), ClientError> {
        self.pc
            .pc
            .set_remote_description(RTCSessionDescription::answer(sdp)?)
            .await?;
        self.ext_ids.lock().map(|mut m| m.clear()).ok();
        Ok(())
    }

    /// Waits until DTLS is up.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.pc.wait_connected(timeout).await
    }

    /// The SSRC of a track's layer (`rid` None for a single-layer track).
    pub fn ssrc(&self, track: usize, rid: Option<&str>) -> Option<u32> {
        let t = self.tracks.get(track)?;
        t.layers
            .iter()
            .find(|l| l.rid.as_deref() == rid)
            .map(|l| l.ssrc)
    }

    /// Keyframe requests (PLI/FIR) received so far for a track's layer.
    pub fn keyframe_requests(&self, track: usize, rid: Option<&str>) -> u64 {
        let Some(ssrc) = self.ssrc(track, rid) else {
            return 0;
        };
        self.keyframes
            .lock()
            .map(|m| m.get(&ssrc).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    async fn ext_ids(&self, track: usize) -> Result<HashMap<String, u8>, ClientError> {
        if let Some(ids) = self
            .ext_ids
            .lock()
            .ok()
            .and_then(|m| m.get(&track).cloned())
        {
            return Ok(ids);
        }
        let t = self
            .tracks
            .get(track)
            .ok_or_else(|| ClientError::NoTrack(track.to_string()))?;
        let params = t.sender.get_parameters().await?;
        let ids: HashMap<String, u8> = params
            .rtp_parameters
            .header_extensions
            .iter()
            .map(|e| (e.uri.clone(), e.id as u8))
            .collect();
        if let Ok(mut m) = self.ext_ids.lock() {
            m.insert(track, ids.clone());
        }
        Ok(ids)
    }

    /// The negotiated mid of a track.
    pub async fn mid(&self, track: usize) -> Option<String> {
        for t in self.pc.pc.get_transceivers().await {
            if let Ok(Some(s)) = t.sender().await
                && self
                    .tracks
                    .get(track)
                    .is_some_and(|pt| Arc::ptr_eq(&(s as Arc<dyn RtpSender>), &pt.sender))
            {
                return t.mid().await.ok().flatten();
            }
        }
        None
    }

    /// Sends one RTP packet on a track's layer; returns its sequence number.
    pub async fn write(
        &self,
        track: usize,
        rid: Option<&str>,
        pkt: Outgoing,
    ) -> Result<u16, ClientError> {
        let ids = self.ext_ids(track).await?;
        let t = self
            .tracks
            .get(track)
            .ok_or_else(|| ClientError::NoTrack(track.to_string()))?;
        let layer = t
            .layers
            .iter()
            .find(|l| l.rid.as_deref() == rid)
            .ok_or_else(|| ClientError::NoTrack(format!("{track}/{rid:?}")))?;
        let seq = layer.seq.fetch_add(1, Ordering::Relaxed) as u16;
        let mut header = rtc::rtp::Header {
            version: 2,
            marker: pkt.marker,
            payload_type: match t.kind {
                Kind::Audio => OPUS_PT,
                Kind::Video => VP8_PT,
            },
            sequence_number: seq,
            timestamp: pkt.timestamp,
            ssrc: layer.ssrc,
            ..Default::default()
        };
        if let Some(mid) = self.mid(track).await
            && let Some(id) = ids.get(URI_MID)
        {
            header.set_extension(*id, Bytes::from(mid.into_bytes()))?;
        }
        if let (Some(rid), Some(id)) = (&layer.rid, ids.get(URI_RID)) {
            header.set_extension(*id, Bytes::from(rid.clone().into_bytes()))?;
        }
        if let (Some(level), Some(id)) = (pkt.audio_level, ids.get(URI_AUDIO_LEVEL)) {
            header.set_extension(*id, Bytes::from(vec![0x80 | (level & 0x7f)]))?;
        }
        t.track
            .write_rtp(rtc::rtp::Packet {
                header,
                payload: pkt.payload,
            })
            .await?;
        Ok(seq)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.pc.pc.close().await;
    }
}

/// Remembers the last [`DupFilter::WINDOW`] sequence numbers of one track, to drop repeats.
#[derive(Debug, Default)]
struct DupFilter {
    ssrc: Option<u32>,
    seen: std::collections::HashSet<u16>,
    order: std::collections::VecDeque<u16>,
}

impl DupFilter {
    const WINDOW: usize = 1024;

    /// Whether `seq` of `ssrc` is new (and remembers it). A new SSRC starts afresh.
    fn first(&mut self, ssrc: u32, seq: u16) -> bool {
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.seen.clear();
            self.order.clear();
        }
        if !self.seen.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > Self::WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

/// One received RTP packet.
#[derive(Debug, Clone)]
pub struct Received {
    /// The msid stream ID of its track (the publisher's user ID on Switchboard).
    pub stream_id: String,
    /// The msid track ID (the server's track ID).
    pub track_id: String,
    /// RTP SSRC.
    pub ssrc: u32,
    /// Payload type.
    pub payload_type: u8,
    /// Sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Marker bit.
    pub marker: bool,
    /// Payload.
    pub payload: Bytes,
}

/// The receiving half of a participant: answers the server's offers, yields RTP.
pub struct Subscriber {
    pc: Pc,
    packets: mpsc::UnboundedReceiver<Received>,
}

impl Subscriber {
    /// A subscriber bound to `ip`.
    pub async fn new(ip: IpAddr) -> Result<Self, ClientError> {
        Self::with_ice(ip, &IceConfig::default()).await
    }

    /// Like [`Subscriber::new`], with ICE servers (TURN) and policy.
    pub async fn with_ice(ip: IpAddr, ice: &IceConfig) -> Result<Self, ClientError> {
        let (track_tx, mut track_rx) = mpsc::unbounded_channel::<Arc<dyn TrackRemote>>();
        let (pkt_tx, packets) = mpsc::unbounded_channel();
        let pc = build_pc(SocketAddr::new(ip, 0), Some(track_tx), None, ice).await?;
        tokio::spawn(async move {
            while let Some(track) = track_rx.recv().await {
                let tx = pkt_tx.clone();
                tokio::spawn(async move {
                    let stream_id = track.stream_id().await;
                    let track_id = track.track_id().await;
                    let mut dups = DupFilter::default();
                    while let Some(ev) = track.poll().await {
                        match ev {
                            TrackRemoteEvent::OnRtpPacket(p) => {
                                // A packet can come twice: a resend of one that was late, not
                                // lost, or the server's bandwidth probing, which pads with RTX
                                // copies of packets already sent. Deliver each number once.
                                if !dups.first(p.header.ssrc, p.header.sequence_number) {
                                    continue;
                                }
                                let r = Received {
                                    stream_id: stream_id.clone(),
                                    track_id: track_id.clone(),
                                    ssrc: p.header.ssrc,
                                    payload_type: p.header.payload_type,
                                    seq: p.header.sequence_number,
                                    timestamp: p.header.timestamp,
                                    marker: p.header.marker,
                                    payload: p.payload,
                                };
                                if tx.send(r).is_err() {
                                    return;
                                }
                            }
                            TrackRemoteEvent::OnEnded => return,
                            _ => {}
                        }
                    }
                });
            }
        });
        Ok(Self { pc, packets })
    }

    /// Applies a server offer and returns the answer (with candidates).
    pub async fn accept_offer(&mut self, sdp: String) -> Result<String, ClientError> {
        self.pc
            .pc
            .set_remote_description(RTCSessionDescription::offer(sdp)?)
            .await?;
        let answer = self.pc.pc.create_answer(None).await?;
        self.pc.pc.set_local_description(answer).await?;
        self.pc.local_sdp_after_gathering().await
    }

    /// Waits until DTLS is up.
    pub async fn wait_connected(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.pc.wait_connected(timeout).await
    }

    /// The next received packet, or None after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.packets.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next received packet (None once the connection is gone).
    pub async fn next(&mut self) -> Option<Received> {
        self.packets.recv().await
    }

    /// Every packet already received, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut v = Vec::new();
        while let Ok(p) = self.packets.try_recv() {
            v.push(p);
        }
        v
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.pc.pc.close().await;
    }
}

#[cfg(test)]
mod dup_tests {
    use super::DupFilter;

    #[test]
    fn repeats_within_the_window_are_dropped_and_old_numbers_come_back() {
        let mut f = DupFilter::default();
        assert!(f.first(1, 10));
        assert!(f.first(1, 11));
        assert!(!f.first(1, 10), "a repeat");
        assert!(f.first(2, 10), "another SSRC starts afresh");
        for s in 0..DupFilter::WINDOW as u16 + 1 {
            f.first(2, 1000 + s);
        }
        assert!(
            f.first(2, 10),
            "forgotten past the window (the numbers wrap)"
        );
    }
}
