//! RTP after a real handshake: a publisher (the webrtc crate, an independent stack) completes ICE,
//! DTLS and SRTP with a live engine and sends fuzzed payloads on an audio and a VP8 video track,
//! so the worker decrypts them, reads their extensions, probes the codec and forwards them to a
//! subscriber in the same room (forwarder, rewriter, VP8 munger, SRTP out). Input: packets of
//! (flags: bit 0 marker, bit 1 video; length; payload).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard::billing::ConsumerUpdate;
use switchboard::client::rtc::{Outgoing, Publisher, Subscriber, TrackSpec};
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::sfu::{MediaSink, RtcEvent, Sfu};
use tokio::sync::mpsc;

/// Passes the subscriber's offers to the task that answers them.
struct Offers(mpsc::UnboundedSender<String>);

impl MediaSink for Offers {
    fn deliver(&self, session: SessionId, event: RtcEvent) {
        if let (SessionId(2), RtcEvent::RtcOffer { sdp, .. }) = (session, event) {
            let _ = self.0.send(sdp);
        }
    }
    fn room_changed(&self, _room: &CallId, _participants: usize, _at_ms: u64) {}
    fn consumer_changed(&self, _update: ConsumerUpdate) {}
}

struct Setup {
    rt: tokio::runtime::Runtime,
    publisher: Publisher,
    _sfu: Sfu,
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let rt = switchboard_fuzz::runtime();
        let (publisher, sfu) = rt.block_on(async {
            let (tx, mut offers) = mpsc::unbounded_channel();
            let cfg = switchboard_fuzz::one_worker();
            let sfu = Sfu::start(&cfg, std::sync::Arc::new(Offers(tx))).expect("engine");
            let room = CallId::generate(1);
            let (alice, bob) = (
                UserId::parse("alice").expect("id"),
                UserId::parse("bob").expect("id"),
            );
            sfu.join(room.clone(), alice.clone(), SessionId(1))
                .await
                .expect("alice joins");
            sfu.join(room.clone(), bob.clone(), SessionId(2))
                .await
                .expect("bob joins");
            // Bob answers every subscriber offer, for as long as the run lasts.
            let (sfu2, room2) = (sfu.clone(), room.clone());
            tokio::spawn(async move {
                let mut sub = Subscriber::new(LOCAL).await.expect("subscriber");
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tokio::select! {
                        sdp = offers.recv() => {
                            let Some(sdp) = sdp else { return };
                            let Ok(answer) = sub.accept_offer(sdp).await else {
                                continue;
                            };
                            let _ = sfu2.answer(&room2, &bob, answer).await;
                        }
                        // What is forwarded is dropped here, or the harness would hold it all.
                        _ = tick.tick() => {
                            FORWARDED.fetch_add(sub.drain().len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            });
            let mut p = Publisher::new(LOCAL, "alice", &[TrackSpec::audio(), TrackSpec::video()])
                .await
                .expect("publisher");
            let offer = p.offer().await.expect("offer");
            let answer = sfu.publish(&room, &alice, offer).await.expect("answer");
            p.set_answer(answer).await.expect("client takes the answer");
            p.wait_connected(Duration::from_secs(20))
                .await
                .expect("ICE and DTLS complete");
            (p, sfu)
        });
        Setup {
            rt,
            publisher,
            _sfu: sfu,
        }
    })
}

static TS: AtomicU32 = AtomicU32::new(0);
/// Packets the subscriber received (forwarded by the engine).
static FORWARDED: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let mut rest = data;
    s.rt.block_on(async {
        let mut n = 0;
        while rest.len() >= 2 && n < 32 {
            let flags = rest[0];
            let len = usize::from(rest[1]).min(rest.len() - 2) * 4;
            let len = len.min(rest.len() - 2);
            let payload = Bytes::copy_from_slice(&rest[2..2 + len]);
            rest = &rest[2 + len..];
            let video = flags & 2 != 0;
            let ts = TS.fetch_add(
                if video { 3000 } else { 960 },
                std::sync::atomic::Ordering::Relaxed,
            );
            let _ = s
                .publisher
                .write(
                    usize::from(video),
                    None,
                    Outgoing {
                        timestamp: ts,
                        marker: flags & 1 != 0,
                        payload,
                        audio_level: (!video).then_some(flags >> 2),
                    },
                )
                .await;
            n += 1;
        }
        // Give the engine the packets before the next input.
        tokio::time::sleep(Duration::from_millis(1)).await;
    });
});
