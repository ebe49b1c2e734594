//! NACK recovery: a lossy UDP relay on 127.0.0.1 drops 10% of the video packets the SFU sends
//! one subscriber; the subscriber NACKs, the SFU answers from its RTX cache, and the subscriber
//! ends up with every packet.

mod sfu_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use sfu_support::*;
use switchboard::client::rtc::TrackSpec;
use switchboard::ids::CallId;
use tokio::net::UdpSocket;

/// Relays between one client and the SFU; drops every tenth RTP packet of payload type
/// `drop_pt` (learned from the offer) on the way to the client. Returns the client-facing address and the drop count.
async fn lossy_relay(sfu: SocketAddr, drop_pt: Arc<AtomicU8>) -> (SocketAddr, Arc<AtomicU64>) {
    let client_side = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_side = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = client_side.local_addr().unwrap();
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut a = [0u8; 2048];
        let mut b = [0u8; 2048];
        let mut seen = 0u64;
        loop {
            tokio::select! {
                r = client_side.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    let _ = server_side.send_to(&a[..n], sfu).await;
                }
                r = server_side.recv_from(&mut b) => {
                    let Ok((n, _)) = r else { return };
                    let Some(to) = client else { continue };
                    let pkt = &b[..n];
                    let is_rtp = n > 12 && (0x80..0xc0).contains(&pkt[0]) && !(64..96).contains(&(pkt[1] & 0x7f));
                    if is_rtp && pkt[1] & 0x7f == drop_pt.load(Ordering::Relaxed) {
                        seen += 1;
                        if seen % 10 == 5 {
                            d.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    let _ = client_side.send_to(pkt, to).await;
                }
            }
        }
    });
    (addr, dropped)
}

fn vp8_pt(sdp: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        l.strip_prefix("a=rtpmap:")?
            .strip_suffix(" VP8/90000")?
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_are_recovered_through_nack_and_rtx() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    alice.publish(&sfu, &[TrackSpec::video()]).await;

    // Carol's subscriber connection goes through the relay: the filter rewrites the server's
    // host candidate in each offer to the relay's address.
    let port = sfu.local_addr().port();
    let drop_pt = Arc::new(AtomicU8::new(255));
    let (relay_addr, dropped) = lossy_relay(sfu.local_addr(), drop_pt.clone()).await;
    let filter = Arc::new(move |sdp: String| {
        if let Some(pt) = vp8_pt(&sdp) {
            drop_pt.store(pt, Ordering::Relaxed);
        }
        sdp.replace(
            &format!(" {port} typ host"),
            &format!(" {} typ host", relay_addr.port()),
        )
    });
    let mut carol = join(&sfu, &sink, &room, "carol", Some(filter)).await;

    let pa = alice.publisher.take().unwrap();
    let mut got: BTreeMap<u16, bytes::Bytes> = BTreeMap::new();
    let mut order = Vec::new();
    let pump = Pump {
        video: Some(0),
        key_every: 50,
        ..Pump::default()
    };
    let ok = pump_until(&pa, pump.clone(), Duration::from_secs(20), || {
        for p in carol.drain_packets() {
            if is_video(&p) {
                order.push(p.seq);
                got.insert(p.seq, p.payload);
            }
        }
        dropped.load(Ordering::Relaxed) >= 15 && got.len() >= 200
    })
    .await;
    assert!(
        ok,
        "relay dropped {} and carol got {}",
        dropped.load(Ordering::Relaxed),
        got.len()
    );
    // Stop sending; let the last NACKs and retransmissions land.
    let mut quiet = 0;
    while quiet < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut any = false;
        for p in carol.drain_packets() {
            if is_video(&p) {
                order.push(p.seq);
                got.insert(p.seq, p.payload);
                any = true;
            }
        }
        quiet = if any { 0 } else { quiet + 1 };
    }

    // Complete from the first to the last packet, though the relay dropped some.
    let first = *order.first().unwrap();
    let span: Vec<u16> = got
        .keys()
        .map(|s| s.wrapping_sub(first))
        .collect::<std::collections::BTreeSet<u16>>()
        .into_iter()
        .collect();
    let missing: Vec<u16> = (0..=*span.last().unwrap())
        .filter(|i| span.binary_search(i).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "missing {} packets (offsets {:?}) after recovery; relay dropped {}",
        missing.len(),
        &missing[..missing.len().min(20)],
        dropped.load(Ordering::Relaxed)
    );
    // Some arrived out of order: the retransmissions.
    assert!(
        order.windows(2).any(|w| w[1] != w[0].wrapping_add(1)),
        "recovered packets arrived late"
    );
    // Recovered payloads are the original ones (the frame tags rise with the sequence).
    let tags: Vec<u32> = got
        .values()
        .filter_map(|p| {
            let body = vp8_body(p);
            let i = body.windows(4).position(|w| w == b"v:-:")?;
            std::str::from_utf8(&body[i + 4..]).ok()?.parse().ok()
        })
        .collect();
    assert_eq!(tags.len(), got.len());

    // The engine counted the NACKs and the retransmissions (stats arrive once a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let c = sfu.counters();
        if c.nacks > 0 && c.rtx > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "counters: {c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sfu.shutdown().await;
}
