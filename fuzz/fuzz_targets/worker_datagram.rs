//! The media plane's datagram path: the I/O thread's demultiplexing and STUN routing, then a
//! worker's STUN, DTLS, SRTP and RTCP input. Setup (once): a running engine with a participant
//! whose publisher offer was accepted, so its ICE credentials exist. Each input is sent as UDP
//! datagrams from 127.0.0.1 to the engine's port: first byte 0xff splits it into several. A
//! datagram that starts as a binding request gets the participant's real server ufrag put into
//! its USERNAME, so fuzzed checks reach the worker's connection and not only the router.
#![no_main]

use std::net::UdpSocket;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::sfu::Sfu;

const OFFER: &str = include_str!("../seeds/worker_sdp/chrome_audio_video.sdp");

struct Setup {
    _rt: tokio::runtime::Runtime,
    sfu: Sfu,
    sock: UdpSocket,
    ufrag: String,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let rt = switchboard_fuzz::runtime();
        let cfg = switchboard_fuzz::one_worker();
        let sfu = rt
            .block_on(async { Sfu::start(&cfg, std::sync::Arc::new(switchboard_fuzz::Quiet)) })
            .expect("engine starts on 127.0.0.1");
        let room = CallId::generate(1);
        let user = UserId::parse("fuzz").expect("id");
        let answer = rt.block_on(async {
            sfu.join(room.clone(), user.clone(), SessionId(1))
                .await
                .expect("join");
            let offer = OFFER.split_once('\0').map_or(OFFER, |(o, _)| o);
            sfu.publish(&room, &user, offer.replace('\n', "\r\n"))
                .await
                .expect("the seed offer is accepted")
        });
        let ufrag = answer
            .lines()
            .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
            .expect("server ufrag")
            .to_owned();
        let sock = UdpSocket::bind("127.0.0.1:0").expect("client socket");
        sock.connect(sfu.local_addr()).expect("connect");
        Setup {
            _rt: rt,
            sfu,
            sock,
            ufrag,
        }
    })
}

/// Puts `ufrag:x` into the USERNAME attribute of a binding request, if the datagram is one with
/// room for it.
fn with_ufrag(d: &[u8], ufrag: &str) -> Vec<u8> {
    let mut d = d.to_vec();
    if d.len() >= 20 && d[0] == 0 && d[1] == 1 {
        d[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        let user = format!("{ufrag}:fuzz");
        let mut attr = vec![0x00, 0x06];
        attr.extend_from_slice(&(user.len() as u16).to_be_bytes());
        attr.extend_from_slice(user.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut out = d[..20].to_vec();
        out.extend_from_slice(&attr);
        out.extend_from_slice(&d[20..]);
        let len = (out.len() - 20) as u16;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        d = out;
    }
    d
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    for part in data.split(|b| *b == 0xff).take(16) {
        if part.is_empty() {
            continue;
        }
        let d = with_ufrag(part, &s.ufrag);
        let _ = s.sock.send(&d);
    }
    // Let the engine take them before the next input; it must still answer a query.
    std::thread::sleep(Duration::from_micros(200));
    let _ = s.sfu.counters();
});
