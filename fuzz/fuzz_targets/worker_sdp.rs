//! SDP offer and candidate handling in a running media engine: the media-signaling limits, then
//! str0m's parser and negotiation in a worker thread. Input: an offer, then after a NUL byte
//! trickled candidate lines. Each run joins a fresh participant, publishes, trickles and leaves.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::sfu::{IceCandidateInit, PcTarget, Sfu};

fn engine() -> &'static (tokio::runtime::Runtime, Sfu) {
    static E: OnceLock<(tokio::runtime::Runtime, Sfu)> = OnceLock::new();
    E.get_or_init(|| {
        let rt = switchboard_fuzz::runtime();
        let cfg = switchboard_fuzz::one_worker();
        let sfu = rt
            .block_on(async { Sfu::start(&cfg, std::sync::Arc::new(switchboard_fuzz::Quiet)) })
            .expect("engine starts on 127.0.0.1");
        (rt, sfu)
    })
}

static N: AtomicU64 = AtomicU64::new(1);

fuzz_target!(|data: &[u8]| {
    let (rt, sfu) = engine();
    let text = String::from_utf8_lossy(data);
    let (offer, trickled) = text.split_once('\0').unwrap_or((&text, ""));
    let n = N.fetch_add(1, Ordering::Relaxed);
    let room = CallId::generate(n);
    let user = UserId::parse("fuzz").expect("id");
    rt.block_on(async {
        sfu.join(room.clone(), user.clone(), SessionId(n))
            .await
            .expect("join");
        let _ = sfu.publish(&room, &user, offer.to_owned()).await;
        for line in trickled.lines().take(64) {
            let c = IceCandidateInit {
                candidate: line.to_owned(),
                sdp_mid: Some("0".into()),
                sdp_m_line_index: Some(0),
                username_fragment: None,
            };
            let _ = sfu.candidate(&room, &user, PcTarget::Publisher, c).await;
            let _ = sfu
                .candidate(&room, &user, PcTarget::Subscriber, line_init(line))
                .await;
        }
        sfu.close_room(&room).await;
    });
});

fn line_init(line: &str) -> IceCandidateInit {
    IceCandidateInit {
        candidate: line.to_owned(),
        sdp_mid: None,
        sdp_m_line_index: None,
        username_fragment: None,
    }
}
