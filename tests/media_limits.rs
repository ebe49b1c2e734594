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
    let text = common::metrics_text(&s.http("/metrics")).await;
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

/// Found by the `worker_sdp` fuzz target: one payload type described as two codec configurations
/// (an H.264 rtpmap without its fmtp in the audio section, the same with an fmtp in a sendrecv
/// video section) made str0m assert ("Pt locked multiple times") in the media worker, and a worker
/// panic aborts the server. It is refused `bad_request` before str0m reads it; the same client's
/// real offer is answered right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_payload_type_described_as_two_codecs_is_refused_and_the_worker_lives() {
    let s = TestServer::start().await;
    let (a, _b, call_id) = s.call("alice", "bob", "general").await;
    let (alice, _) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("alice joins");
    let mut p = Publisher::new(
        LOCALHOST,
        "alice",
        &[TrackSpec::audio(), TrackSpec::video()],
    )
    .await
    .expect("pc");
    let offer = p.offer().await.expect("offer");
    // A payload type the offer does not use, described in both sections (not in their m= format
    // lists: str0m reads rtpmap lines all the same).
    let pt = 120;
    assert!(
        !offer.contains(&format!(":{pt} ")),
        "payload type {pt} is unused"
    );
    let video = offer.find("\r\nm=video").expect("a video section") + 2;
    let (head, video_part) = offer.split_at(video);
    assert!(head.contains("m=audio"), "audio comes first in this offer");
    let video_part = video_part.replace("a=sendonly", "a=sendrecv").replacen(
        "a=mid:",
        &format!("a=rtpmap:{pt} H264/90000\r\na=fmtp:{pt} packetization-mode=1\r\na=mid:"),
        1,
    );
    let head = head.replacen("a=mid:", &format!("a=rtpmap:{pt} H264/90000\r\na=mid:"), 1);
    let hostile = format!("{head}{video_part}");
    let publish = |sdp: String| {
        let sig = alice.sig.clone();
        let call_id = call_id.clone();
        async move {
            sig.request("rtc_publish", json!({"call_id": call_id, "sdp": sdp}))
                .await
        }
    };
    match publish(hostile).await {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "bad_request", "{message}");
            assert!(
                message.contains(&format!("payload type {pt}")),
                "{message} should name payload type {pt}"
            );
        }
        other => panic!("expected bad_request for payload type {pt}, got {other:?}"),
    }
    let r = publish(offer)
        .await
        .expect("the server still answers the client's real offer");
    assert!(r["sdp"].as_str().is_some_and(|s| s.contains("m=video")));
    let text = common::metrics_text(&s.http("/metrics")).await;
    assert!(
        text.lines()
            .any(|l| l
                .starts_with("switchboard_media_limit_rejections_total{limit=\"payload_type\"}")),
        "the rejection was counted"
    );
    s.stop().await;
}
