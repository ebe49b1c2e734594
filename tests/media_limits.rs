//! Limits on media signaling through the real server (issue 10, defect 11): real webrtc-0.21
//! offers over `rtc_publish`, trickled `rtc_candidate`s; each limit refuses one over with
//! `bad_request` naming the `[media]` key, and a real offer at the limits is accepted and carries
//! media.

mod common;
mod sfu_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::media::{LOCALHOST, MediaUser};
use common::{TestServer, WAIT};
use serde_json::{Value, json};
use sfu_support::{Pump, is_video, pump_until};
use switchboard::client::rtc::{Publisher, TrackSpec};
use switchboard::client::signal::ClientError;

const MAX_SDP: usize = 16_384;
const MAX_CANDIDATES: usize = 4;

fn refused(r: Result<Value, ClientError>, key: &str) {
    match r {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "bad_request", "{message}");
            assert!(message.contains(key), "{message} should name {key}");
        }
        other => panic!("expected bad_request naming {key}, got {other:?}"),
    }
}

/// `sdp` with a session-level attribute inserted so that it is exactly `total` bytes.
fn padded(sdp: &str, total: usize) -> String {
    let at = sdp.find("t=0 0\r\n").expect("t= line") + "t=0 0\r\n".len();
    let frame = "a=x-pad:\r\n".len();
    let fill = total
        .checked_sub(sdp.len() + frame)
        .expect("offer smaller than the target");
    let mut out = String::with_capacity(total);
    out.push_str(&sdp[..at]);
    out.push_str("a=x-pad:");
    out.push_str(&"p".repeat(fill));
    out.push_str("\r\n");
    out.push_str(&sdp[at..]);
    assert_eq!(out.len(), total);
    out
}

fn distinct_candidates(sdp: &str) -> usize {
    sdp.lines()
        .filter_map(|l| l.strip_prefix("a=candidate:"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!(
                "{} {} {} {}",
                f.get(1)?,
                f.get(2)?,
                f.get(4)?,
                f.get(5)?
            ))
        })
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_media_limit_refuses_one_over_and_a_real_offer_at_the_limits_carries_media() {
    let s = TestServer::start_with(|c| {
        c.media.max_mlines_per_offer = 3;
        c.media.max_tracks_per_participant = 2;
        c.media.max_remote_candidates = MAX_CANDIDATES;
        c.media.max_sdp_bytes = MAX_SDP;
    })
    .await;
    let (a, b, call_id) = s.call("alice", "bob", "general").await;
    let (alice, _) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("alice joins");
    let (mut bob, _) = MediaUser::join(b, "bob", &call_id)
        .await
        .expect("bob joins");
    let publish = |sdp: String| {
        let sig = alice.sig.clone();
        let call_id = call_id.clone();
        async move {
            sig.request("rtc_publish", json!({"call_id": call_id, "sdp": sdp}))
                .await
        }
    };

    // Three tracks in three m-lines: at the m-line limit, one track over.
    let mut three = Publisher::new(
        LOCALHOST,
        "alice",
        &[TrackSpec::audio(), TrackSpec::video(), TrackSpec::video()],
    )
    .await
    .expect("pc");
    let offer3 = three.offer().await.expect("offer");
    assert_eq!(offer3.matches("\nm=").count(), 3);
    refused(publish(offer3).await, "media.max_tracks_per_participant");

    let mut p = Publisher::new(
        LOCALHOST,
        "alice",
        &[TrackSpec::audio(), TrackSpec::video()],
    )
    .await
    .expect("pc");
    let offer = p.offer().await.expect("offer");
    assert!(
        offer.len() < MAX_SDP - 100,
        "offer is {} bytes",
        offer.len()
    );
    // Four m-lines: one over (two extra stopped sections).
    let extra = "m=video 0 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=inactive\r\n";
    refused(
        publish(format!("{offer}{extra}{extra}")).await,
        "media.max_mlines_per_offer",
    );
    // One byte over the size limit, then exactly at it.
    refused(
        publish(padded(&offer, MAX_SDP + 1)).await,
        "media.max_sdp_bytes",
    );
    let r = publish(padded(&offer, MAX_SDP))
        .await
        .expect("an offer at the size and track limits is answered");
    p.set_answer(r["sdp"].as_str().expect("sdp").to_owned())
        .await
        .expect("client takes answer");
    p.wait_connected(Duration::from_secs(10))
        .await
        .expect("publisher connects");

    // Media flows from the accepted offer.
    let started = Instant::now();
    let mut got = Vec::new();
    let ok = pump_until(
        &p,
        Pump {
            video: Some(1),
            audio: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(15),
        || {
            got.extend(bob.drain_packets());
            got.iter().filter(|p| is_video(p)).count() >= 10
                && started.elapsed() > Duration::from_millis(300)
        },
    )
    .await;
    assert!(ok, "bob received {} packets", got.len());

    // Candidates: the offer brought some; trickle distinct ones up to the limit, then one more.
    let known = distinct_candidates(&offer);
    assert!(known < MAX_CANDIDATES, "offer has {known} candidates");
    let candidate = |port: u16| {
        let sig = alice.sig.clone();
        let call_id = call_id.clone();
        async move {
            sig.request(
                "rtc_candidate",
                json!({"call_id": call_id, "target": "publisher", "candidate": {
                    "candidate": format!("candidate:7 1 udp 2130706431 127.0.0.1 {port} typ host"),
                    "sdpMid": "0", "sdpMLineIndex": 0}}),
            )
            .await
        }
    };
    for i in 0..(MAX_CANDIDATES - known) {
        candidate(40_000 + i as u16)
            .await
            .expect("a candidate within the limit");
    }
    refused(candidate(41_000).await, "media.max_remote_candidates");
    // A candidate the connection already has costs nothing.
    candidate(40_000).await.expect("a known candidate again");
    // The end-of-candidates marker is not a candidate.
    alice
        .sig
        .request(
            "rtc_candidate",
            json!({"call_id": call_id, "target": "publisher", "candidate": {"candidate": ""}}),
        )
        .await
        .expect("end of candidates");
    // The rejections were counted.
    let text = reqwest::get(s.http("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for limit in ["tracks", "mlines", "sdp_bytes", "candidates"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!(
                "switchboard_media_limit_rejections_total{{limit=\"{limit}\"}}"
            ))),
            "no rejection counted for {limit}"
        );
    }
    bob.wait_event("track_published", WAIT, |d| d["user_id"] == "alice")
        .await
        .expect("bob saw alice's tracks");
    s.stop().await;
}
