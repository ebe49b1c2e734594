//! The whole flow through the real server: signaling over WebSockets, then media with real webrtc-0.21
//! clients through the server's one UDP port (DTLS-SRTP), then billing and the admin API.

mod common;
mod sfu_support;

use std::time::{Duration, Instant};

use common::media::MediaUser;
use common::{TestServer, WAIT};
use serde_json::{Value, json};
use sfu_support::{Pump, is_key, is_video, layer_of, pump_until};
use switchboard::client::rtc::TrackSpec;

fn enough(got: &[switchboard::client::rtc::Received]) -> bool {
    got.iter().filter(|p| is_video(p)).count() >= 20
        && got.iter().filter(|p| p.payload.starts_with(b"a:")).count() >= 20
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_accept_join_publish_and_each_receives_the_others_media_billed_by_tier() {
    let s = TestServer::start_with(|c| {
        c.signaling.room_empty_timeout = 1;
        c.billing.checkpoint = 1;
    })
    .await;
    let (a, b, call_id) = s.call("alice", "bob", "general").await;
    let (mut alice, joined) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("alice joins");
    assert_eq!(joined["participants"], json!([]));
    let (mut bob, joined) = MediaUser::join(b, "bob", &call_id)
        .await
        .expect("bob joins");
    assert_eq!(joined["participants"][0]["user_id"], "alice");
    alice
        .wait_event("participant_joined", WAIT, |d| d["user_id"] == "bob")
        .await
        .expect("alice hears bob join");

    alice
        .publish(&[TrackSpec::audio(), TrackSpec::video()])
        .await;
    bob.publish(&[TrackSpec::audio(), TrackSpec::video()]).await;
    let t = bob
        .wait_event("track_published", WAIT, |d| d["kind"] == "video")
        .await
        .expect("bob learns alice's video");
    assert_eq!(t.data["user_id"], "alice");
    let alice_video = t.data["track_id"].as_str().expect("track id").to_owned();

    let started = Instant::now();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let pa = alice.publisher.take().expect("published");
    let pb = bob.publisher.take().expect("published");
    let (ok_a, ok_b) = tokio::join!(
        pump_until(
            &pa,
            Pump {
                video: Some(1),
                audio: Some(0),
                layers: &[(None, 640, 360)],
                ..Pump::default()
            },
            Duration::from_secs(20),
            || {
                got_b.extend(bob.drain_packets());
                enough(&got_b) && started.elapsed() > Duration::from_millis(2500)
            }
        ),
        pump_until(
            &pb,
            Pump {
                video: Some(1),
                audio: Some(0),
                layers: &[(None, 320, 240)],
                ..Pump::default()
            },
            Duration::from_secs(20),
            || {
                got_a.extend(alice.drain_packets());
                enough(&got_a) && started.elapsed() > Duration::from_millis(2500)
            }
        ),
    );
    assert!(
        ok_a && ok_b,
        "media flowed both ways: {} / {} packets",
        got_b.len(),
        got_a.len()
    );
    // msid names the sender, and the first video packet each side got was a keyframe.
    assert!(got_b.iter().all(|p| p.stream_id == "alice"));
    assert!(got_a.iter().all(|p| p.stream_id == "bob"));
    assert!(got_b.iter().filter(|p| p.track_id == alice_video).count() >= 20);
    assert!(got_b.iter().find(|p| is_video(p)).is_some_and(is_key));

    // The server measured each layer from the bitstream and tells the room.
    let res = bob
        .wait_event("track_resolution", WAIT, |d| {
            d["track_id"] == alice_video.as_str()
        })
        .await
        .expect("track_resolution");
    assert_eq!(
        (res.data["width"].as_u64(), res.data["height"].as_u64()),
        (Some(640), Some(360))
    );
    // Each receiver is metered in `hd` and told so.
    let tier = bob
        .wait_event("billing_tier", WAIT, |d| d["tier"] == "hd")
        .await
        .expect("billing_tier");
    assert_eq!(tier.data["pixels"], 640 * 360);

    // The admin API shows both participants with measured layers.
    let (status, room) = s.admin_get(&format!("/v1/rooms/{call_id}")).await;
    assert_eq!(status, 200);
    let parts = room["participants"].as_array().expect("participants");
    assert_eq!(parts.len(), 2);
    let sizes: Vec<(u64, u64)> = parts
        .iter()
        .flat_map(|p| p["tracks"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| t["layers"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| Some((l["width"].as_u64()?, l["height"].as_u64()?)))
        .filter(|(w, _)| *w > 0)
        .collect();
    assert!(
        sizes.contains(&(640, 360)) && sizes.contains(&(320, 240)),
        "{sizes:?}"
    );
    // Both measured layers (640x360 and 320x240) are in the `hd` class on /metrics. (The registry is
    // shared by the tests of this binary, which may run at the same time: at least these two.)
    let metrics = reqwest::get(s.http("/metrics"))
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    let hd_layers = switchboard::loadtest::signaling::metric_value(
        &metrics.replace(
            "switchboard_layers_by_resolution{class=\"hd\"}",
            "hd_layers",
        ),
        "hd_layers",
    );
    assert!(
        hd_layers.is_some_and(|n| n >= 2.0),
        "hd layers: {hd_layers:?}"
    );
    // The media that flowed was timed in both stages before the worker: in the kernel's receive
    // queue (from its receive stamps) and in the hand-off to the worker.
    for stage in ["socket", "handoff"] {
        let series = format!("switchboard_packet_stage_seconds_count{{stage=\"{stage}\"}}");
        let count = switchboard::loadtest::signaling::metric_value(
            &metrics.replace(&series, "stage_count"),
            "stage_count",
        );
        assert!(count.is_some_and(|n| n >= 100.0), "{stage}: {count:?}");
    }
    let (_, one) = s.admin_get(&format!("/v1/calls/{call_id}")).await;
    assert_eq!(
        one["room"]["participants"].as_array().map(Vec::len),
        Some(2)
    );

    // Both hang up (general mode: rtc_leave); the empty room completes the call.
    let media_ms = started.elapsed().as_millis() as u64;
    alice
        .sig
        .request("rtc_leave", json!({"call_id": call_id}))
        .await
        .expect("leave");
    bob.sig
        .request("rtc_leave", json!({"call_id": call_id}))
        .await
        .expect("leave");
    let end = alice
        .wait_event("call_invitation_ended", WAIT, |_| true)
        .await
        .expect("completed");
    assert_eq!(end.data["reason"], "completed");

    // The ledger billed each receiver in hd for about as long as media flowed.
    let r = reqwest::Client::new()
        .get(s.http(&format!("/v1/billing/usage?call_id={call_id}&from=0")))
        .bearer_auth(s.admin_token())
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.expect("json");
    for who in ["alice", "bob"] {
        let row = report["users"]
            .as_array()
            .and_then(|u| u.iter().find(|r| r["user_id"] == who && r["tier"] == "hd"))
            .unwrap_or_else(|| panic!("{who} billed in hd: {report}"));
        let ms = row["ms"].as_u64().expect("ms");
        assert!(
            ms > media_ms / 2 && ms <= media_ms + 1000,
            "{who}: {ms} ms billed for about {media_ms} ms of media"
        );
        assert_eq!(row["billable_minutes"], 1);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_accepted_users_may_join_publish_or_receive() {
    let s = TestServer::start().await;
    let a = s.client("alice").await;
    let mut b = s.client("bob").await;
    let r = a
        .request(
            "call_invite",
            json!({"invitees": ["bob"], "mode": "advanced", "timeout": 30}),
        )
        .await
        .expect("invite");
    let call_id = r["call_id"].as_str().expect("id").to_owned();
    b.wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    // Bob still rings: he may not join.
    let e = b
        .request("rtc_join", json!({"call_id": call_id}))
        .await
        .expect_err("ringing");
    assert_eq!(e.code(), Some("invalid_state"));
    // Carol has nothing to do with the call.
    let c = s.client("carol").await;
    let e = c
        .request("rtc_join", json!({"call_id": call_id}))
        .await
        .expect_err("stranger");
    assert_eq!(e.code(), Some("call_not_found"));
    // Nor may anyone publish or answer without joining from their own session.
    let e = c
        .request("rtc_publish", json!({"call_id": call_id, "sdp": "v=0"}))
        .await
        .expect_err("not joined");
    assert_eq!(e.code(), Some("call_not_found"));
    let (mut alice, _) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("caller joins");
    alice.publish(&[TrackSpec::video()]).await;
    // Bob rejects: still no entry.
    b.request("call_reject", json!({"call_id": call_id}))
        .await
        .expect("reject");
    let e = b
        .request("rtc_join", json!({"call_id": call_id}))
        .await
        .expect_err("rejected");
    assert_eq!(e.code(), Some("invalid_state"));
    // Bob joins by call ID (advanced mode), is accepted, and may join the room.
    b.request("call_join", json!({"call_id": call_id}))
        .await
        .expect("call_join");
    let (mut bob, joined) = MediaUser::join(b, "bob", &call_id)
        .await
        .expect("accepted joins");
    assert_eq!(joined["participants"][0]["user_id"], "alice");
    // A second session of Bob's may not drive his participant.
    let b2 = s.client("bob").await;
    let e = b2
        .request("rtc_publish", json!({"call_id": call_id, "sdp": "v=0"}))
        .await
        .expect_err("other session");
    assert_eq!(e.code(), Some("invalid_state"));
    // Bob quits: he leaves the room at once and Alice hears it; he can no longer do anything there.
    bob.sig
        .request("call_quit", json!({"call_id": call_id}))
        .await
        .expect("quit");
    alice
        .wait_event("participant_left", WAIT, |d| d["user_id"] == "bob")
        .await
        .expect("alice hears bob leave");
    let e = bob
        .sig
        .request(
            "rtc_subscription",
            json!({"call_id": call_id, "track_id": "t_x", "enabled": true}),
        )
        .await
        .expect_err("quit");
    assert_eq!(e.code(), Some("invalid_state"));
    // And he receives nothing more.
    let pa = alice.publisher.take().expect("published");
    let _ = bob.drain_packets();
    pump_until(
        &pa,
        Pump {
            video: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(1),
        || false,
    )
    .await;
    assert!(
        bob.drain_packets().is_empty(),
        "a user who quit receives nothing"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layer_follows_the_subscription_cap_and_a_late_joiner_gets_a_keyframe() {
    let s = TestServer::start().await;
    let (a, b, call_id) = s.call("alice", "bob", "advanced").await;
    let (mut alice, _) = MediaUser::join(a, "alice", &call_id).await.expect("join");
    let (mut bob, _) = MediaUser::join(b, "bob", &call_id).await.expect("join");
    alice
        .publish(&[TrackSpec::simulcast(&["q", "h", "f"])])
        .await;
    let t = bob
        .wait_event("track_published", WAIT, |d| d["kind"] == "video")
        .await
        .expect("track");
    assert_eq!(t.data["rids"], json!(["q", "h", "f"]));
    let track = t.data["track_id"].as_str().expect("id").to_owned();
    bob.sig
        .request(
            "rtc_subscription",
            json!({"call_id": call_id, "track_id": track, "enabled": true, "max_width": 640, "max_height": 360}),
        )
        .await
        .expect("cap");
    let layers: &[(Option<&str>, u16, u16)] = &[
        (Some("q"), 320, 180),
        (Some("h"), 640, 360),
        (Some("f"), 1280, 720),
    ];
    let pa = alice.publisher.take().expect("published");
    let mut got = Vec::new();
    let ok = pump_until(
        &pa,
        Pump {
            video: Some(0),
            layers,
            key_every: 10,
            ..Pump::default()
        },
        Duration::from_secs(20),
        || {
            got.extend(bob.drain_packets());
            got.iter()
                .rev()
                .take(15)
                .filter(|p| layer_of(p) == Some('h'))
                .count()
                == 15
        },
    )
    .await;
    assert!(
        ok,
        "the cap selects h: {:?}",
        got.iter().rev().take(20).map(layer_of).collect::<Vec<_>>()
    );

    // Carol joins late (invited during the call) and gets a keyframe within a second.
    let c = s.client("carol").await;
    let mut c_events = s.client("carol").await;
    bob.sig
        .request(
            "calling_invite",
            json!({"call_id": call_id, "invitees": ["carol"]}),
        )
        .await
        .expect("invite more");
    c_events
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    c.request("call_accept", json!({"call_id": call_id}))
        .await
        .expect("accept");
    let (mut carol, joined) = MediaUser::join(c, "carol", &call_id).await.expect("join");
    assert_eq!(joined["participants"].as_array().map(Vec::len), Some(2));
    let joined_at = Instant::now();
    let mut first_key = None;
    let mut got_c = Vec::new();
    pump_until(
        &pa,
        Pump {
            video: Some(0),
            layers,
            key_every: 1000,
            ..Pump::default()
        },
        Duration::from_secs(10),
        || {
            got_c.extend(carol.drain_packets());
            if first_key.is_none() && got_c.iter().any(is_key) {
                first_key = Some(joined_at.elapsed());
            }
            first_key.is_some()
        },
    )
    .await;
    let after = first_key.expect("carol got a keyframe");
    eprintln!("late joiner: first keyframe {after:?} after rtc_join");
    assert!(
        got_c.iter().find(|p| is_video(p)).is_some_and(is_key),
        "the first video packet is a keyframe"
    );
    // Measured from rtc_join: the subscriber offer/answer round and ICE/DTLS are included.
    assert!(
        after < Duration::from_secs(1),
        "first keyframe {after:?} after joining"
    );
    s.stop().await;
}
