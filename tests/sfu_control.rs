//! Simulcast layer selection, keyframes for late joiners, pause/resume and leave, through the
//! one UDP port with real `webrtc` 0.21 clients on 127.0.0.1.

mod sfu_support;

use std::time::{Duration, Instant};

use sfu_support::*;
use switchboard::client::rtc::{Received, TrackSpec};
use switchboard::ids::{CallId, TrackId};
use switchboard::sfu::{Forwarding, RtcEvent};

async fn first_track(peer: &mut Peer) -> TrackId {
    match peer
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, RtcEvent::TrackPublished { .. })
        })
        .await
    {
        Some(RtcEvent::TrackPublished { track, .. }) => track.track_id,
        other => panic!("expected track_published, got {other:?}"),
    }
}

const LAYERS: &[(Option<&str>, u16, u16)] = &[
    (Some("q"), 320, 180),
    (Some("h"), 640, 360),
    (Some("f"), 1280, 720),
];

/// The layers of the last `n` video packets.
fn last_layers(got: &[Received], n: usize) -> Vec<char> {
    let v: Vec<char> = got
        .iter()
        .filter(|p| is_video(p))
        .filter_map(layer_of)
        .collect();
    v[v.len().saturating_sub(n)..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_cap_selects_the_layer_and_switches_only_on_keyframes() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice
        .publish(&sfu, &[TrackSpec::simulcast(&["q", "h", "f"])])
        .await;
    let track = first_track(&mut bob).await;
    let pa = alice.publisher.take().unwrap();
    let pump = Pump {
        video: Some(0),
        layers: LAYERS,
        key_every: 25,
        ..Pump::default()
    };

    // Cap to 640x360 before anything flows: once the layers are measured, "h" is chosen.
    sfu.subscription(&room, &bob.user, &track, true, Some(640), Some(360))
        .await
        .unwrap();
    let mut got: Vec<Received> = Vec::new();
    let ok = pump_until(&pa, pump.clone(), Duration::from_secs(15), || {
        got.extend(bob.drain_packets());
        let l = last_layers(&got, 15);
        l.len() == 15 && l.iter().all(|c| *c == 'h')
    })
    .await;
    assert!(
        ok,
        "capped subscriber ends up on 'h': {:?}",
        last_layers(&got, 40)
    );

    // Every layer's resolution was announced.
    let mut announced = Vec::new();
    while let Some(ev) = bob
        .wait_event(Duration::from_millis(50), |e| {
            matches!(e, RtcEvent::TrackResolution { .. })
        })
        .await
    {
        if let RtcEvent::TrackResolution {
            rid, width, height, ..
        } = ev
        {
            announced.push((rid, width, height));
        }
    }
    for (rid, w, h) in LAYERS {
        assert!(
            announced.contains(&(rid.unwrap().to_string(), u32::from(*w), u32::from(*h))),
            "track_resolution for {rid:?}: {announced:?}"
        );
    }

    // Lift the cap: the subscriber moves up to "f", starting on a keyframe.
    let switch_from = got.len();
    sfu.subscription(&room, &bob.user, &track, true, None, None)
        .await
        .unwrap();
    let ok = pump_until(&pa, pump.clone(), Duration::from_secs(15), || {
        got.extend(bob.drain_packets());
        let l = last_layers(&got, 10);
        l.len() == 10 && l.iter().all(|c| *c == 'f')
    })
    .await;
    assert!(ok, "uncapped subscriber moves to 'f'");
    let after: Vec<&Received> = got[switch_from..].iter().filter(|p| is_video(p)).collect();
    let first_f = after
        .iter()
        .find(|p| layer_of(p) == Some('f'))
        .expect("an 'f' packet");
    assert!(is_key(first_f), "the switch happens on a keyframe");

    // One continuous stream: sequence numbers gap-free across both switches, one SSRC.
    let video: Vec<&Received> = got.iter().filter(|p| is_video(p)).collect();
    for w in video.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq.wrapping_add(1),
            "gap-free across switches"
        );
        assert_eq!(w[1].ssrc, w[0].ssrc, "one SSRC for the subscriber");
        assert!(
            w[1].timestamp.wrapping_sub(w[0].timestamp) < 90_000,
            "timestamps move forward: {} {:?} -> {} {:?}",
            w[0].timestamp,
            layer_of(w[0]),
            w[1].timestamp,
            layer_of(w[1])
        );
    }
    // Billing saw the switch to the measured 1280x720.
    let ups = sink.consumers.lock().unwrap().clone();
    assert!(ups.iter().any(|u| u.user_id == bob.user
        && u.forwarding
            == Forwarding::Video(switchboard::codec::Resolution {
                width: 640,
                height: 360
            })));
    assert!(ups.iter().any(|u| u.user_id == bob.user
        && u.forwarding
            == Forwarding::Video(switchboard::codec::Resolution {
                width: 1280,
                height: 720
            })));
    assert!(sfu.counters().layer_switches >= 1);

    // The admin view names the forwarded layer.
    let info = sfu.room(&room).await.expect("room info");
    let bob_info = info
        .participants
        .iter()
        .find(|p| p.user_id == bob.user)
        .unwrap();
    assert_eq!(bob_info.subscriptions[0].layer.as_deref(), Some("f"));
    let alice_info = info
        .participants
        .iter()
        .find(|p| p.user_id == alice.user)
        .unwrap();
    assert_eq!(alice_info.tracks[0].layers.len(), 3);
    assert_eq!(alice_info.tracks[0].layers[2].width, 1280);
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_a_keyframe_within_a_second() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice.publish(&sfu, &[TrackSpec::video()]).await;
    let pa = alice.publisher.take().unwrap();
    // No periodic keyframes: only the first frame and those the server asks for.
    let pump = Pump {
        video: Some(0),
        key_every: u32::MAX,
        ..Pump::default()
    };
    let mut got = Vec::new();
    assert!(
        pump_until(&pa, pump.clone(), Duration::from_secs(10), || {
            got.extend(bob.drain_packets());
            got.len() >= 20
        })
        .await
    );
    let requests_before = pa.keyframe_requests(0, None);

    let joined_at = Instant::now();
    let sfu2 = sfu.clone();
    let sink2 = sink.clone();
    let room2 = room.clone();
    let carol_task = tokio::spawn(async move { join(&sfu2, &sink2, &room2, "carol", None).await });
    // Keep sending delta frames while carol joins.
    let mut carol: Option<Peer> = None;
    let mut carol_got: Vec<Received> = Vec::new();
    let mut key_at = None;
    let mut task = Some(carol_task);
    pump_until(&pa, pump.clone(), Duration::from_secs(10), || {
        if let Some(t) = task.as_ref()
            && t.is_finished()
        {
            let t = task.take().unwrap();
            carol = Some(futures_now(t));
        }
        if let Some(c) = carol.as_mut() {
            for p in c.drain_packets() {
                if key_at.is_none() && is_key(&p) {
                    key_at = Some(joined_at.elapsed());
                }
                carol_got.push(p);
            }
        }
        key_at.is_some()
    })
    .await;
    let key_at = key_at.expect("carol got a keyframe");
    assert!(
        key_at < Duration::from_secs(1),
        "keyframe {key_at:?} after joining"
    );
    let first_video = carol_got.iter().find(|p| is_video(p)).unwrap();
    assert!(
        is_key(first_video),
        "carol's first video packet is a keyframe"
    );
    // The request is counted by the publisher's RTCP reader: give it a moment to land.
    let deadline = Instant::now() + Duration::from_secs(1);
    while pa.keyframe_requests(0, None) <= requests_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let requests_after = pa.keyframe_requests(0, None);
    assert!(
        requests_after > requests_before,
        "the server sent a PLI to the publisher ({requests_before} before carol, {requests_after} after)"
    );
    // The late joiner learned the layer's measured resolution, measured before it joined.
    let res = carol
        .as_mut()
        .unwrap()
        .wait_event(Duration::from_secs(2), |e| {
            matches!(
                e,
                RtcEvent::TrackResolution {
                    width: 640,
                    height: 360,
                    ..
                }
            )
        })
        .await;
    assert!(res.is_some(), "track_resolution for the late joiner");
    sfu.shutdown().await;
}

/// Takes the output of a finished task.
fn futures_now<T: Send + 'static>(t: tokio::task::JoinHandle<T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(t)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_the_stream_and_resume_restarts_it_on_a_keyframe() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice.publish(&sfu, &[TrackSpec::video()]).await;
    let track = first_track(&mut bob).await;
    let pa = alice.publisher.take().unwrap();
    let pump = Pump {
        video: Some(0),
        key_every: u32::MAX,
        ..Pump::default()
    };
    let mut got = Vec::new();
    assert!(
        pump_until(&pa, pump.clone(), Duration::from_secs(10), || {
            got.extend(bob.drain_packets());
            got.len() >= 10
        })
        .await
    );

    sfu.subscription(&room, &bob.user, &track, false, None, None)
        .await
        .unwrap();
    // Let in-flight packets land, then nothing more may arrive while paused.
    pump_until(&pa, pump.clone(), Duration::from_millis(300), || false).await;
    got.extend(bob.drain_packets());
    let paused_at = got.len();
    pump_until(&pa, pump.clone(), Duration::from_secs(1), || false).await;
    got.extend(bob.drain_packets());
    assert_eq!(got.len(), paused_at, "no packets while paused");
    assert!(
        sink.consumers
            .lock()
            .unwrap()
            .iter()
            .any(|u| u.user_id == bob.user && u.forwarding == Forwarding::Stopped),
        "billing told the consumer stopped"
    );

    sfu.subscription(&room, &bob.user, &track, true, None, None)
        .await
        .unwrap();
    assert!(
        pump_until(&pa, pump.clone(), Duration::from_secs(5), || {
            got.extend(bob.drain_packets());
            got.len() >= paused_at + 10
        })
        .await,
        "packets flow again after resume"
    );
    let resumed = &got[paused_at];
    assert!(is_key(resumed), "resume starts on a keyframe");
    assert_eq!(
        resumed.seq,
        got[paused_at - 1].seq.wrapping_add(1),
        "no sequence gap across the pause"
    );
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_unpublishes_and_tells_the_others() {
    let (sfu, sink) = start(2);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice
        .publish(&sfu, &[TrackSpec::audio(), TrackSpec::video()])
        .await;
    let t1 = first_track(&mut bob).await;
    let t2 = first_track(&mut bob).await;
    let pa = alice.publisher.take().unwrap();
    let mut n = 0;
    assert!(
        pump_until(
            &pa,
            Pump {
                video: Some(1),
                audio: Some(0),
                ..Pump::default()
            },
            Duration::from_secs(10),
            || {
                n += bob.drain_packets().len();
                n >= 20
            }
        )
        .await
    );
    let joined = sfu.room(&room).await.unwrap();
    assert_eq!(joined.participants.len(), 2);

    sfu.leave(&room, &alice.user).await.unwrap();
    // Events caused by the leave precede its reply (the agent passes them on in order).
    let mut unpublished = Vec::new();
    let mut left = false;
    while unpublished.len() < 2 || !left {
        match bob.wait_event(Duration::from_secs(5), |_| true).await {
            Some(RtcEvent::TrackUnpublished { track, .. }) => unpublished.push(track.track_id),
            Some(RtcEvent::ParticipantLeft { user_id, .. }) if user_id == alice.user => {
                assert_eq!(
                    unpublished.len(),
                    2,
                    "tracks are unpublished before the leave"
                );
                left = true
            }
            Some(_) => {}
            None => break,
        }
    }
    unpublished.sort();
    let mut want = vec![t1.clone(), t2.clone()];
    want.sort();
    assert_eq!(unpublished, want);
    assert!(left, "participant_left reached bob");
    let info = sfu.room(&room).await.unwrap();
    assert_eq!(info.participants.len(), 1);
    assert!(info.participants[0].tracks.is_empty());
    assert!(info.participants[0].subscriptions.is_empty());
    let ups = sink.consumers.lock().unwrap().clone();
    for t in [&t1, &t2] {
        assert_eq!(
            ups.iter()
                .rev()
                .find(|u| u.user_id == bob.user && u.track_id == *t)
                .map(|u| u.forwarding),
            Some(Forwarding::Stopped),
            "bob's consumer of {t} ended"
        );
    }
    assert_eq!(sink.rooms.lock().unwrap().last().map(|(_, n)| *n), Some(1));
    assert_eq!(
        sfu.leave(&room, &alice.user).await,
        Err(switchboard::sfu::SfuError::NotJoined)
    );
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_connection_dies_is_removed() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice.publish(&sfu, &[TrackSpec::audio()]).await;
    first_track(&mut bob).await;
    // Alice's client goes away without rtc_leave: its DTLS close reaches the server.
    alice.publisher.take().unwrap().close().await;
    let left = bob
        .wait_event(Duration::from_secs(30), |e| {
            matches!(e, RtcEvent::ParticipantLeft { user_id, .. } if user_id.as_str() == "alice")
        })
        .await;
    assert!(left.is_some(), "participant_left after the connection died");
    let info = sfu.room(&room).await.unwrap();
    assert_eq!(info.participants.len(), 1);
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_join_of_the_same_user_replaces_the_first() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut first = join(&sfu, &sink, &room, "dave@example.com", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    first.publish(&sfu, &[TrackSpec::video()]).await;
    first_track(&mut bob).await;

    let mut second = join(&sfu, &sink, &room, "dave@example.com", None).await;
    let kicked = first
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, RtcEvent::ParticipantLeft { user_id, .. } if user_id.as_str() == "dave@example.com")
        })
        .await;
    assert!(kicked.is_some(), "the replaced session is told it left");
    // Bob sees the old participant's track go, then the user join again.
    let mut seen = Vec::new();
    while let Some(ev) = bob.wait_event(Duration::from_secs(2), |_| true).await {
        if ev.name() != "rtc_offer" {
            seen.push(ev.name());
        }
        if ev.name() == "participant_joined" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "track_unpublished",
            "participant_left",
            "participant_joined"
        ]
    );
    let info = sfu.room(&room).await.unwrap();
    assert_eq!(info.participants.len(), 2);
    assert_eq!(info.participants[1].session_id, second.session.to_string());

    // The new session receives bob's track.
    bob.publish(&sfu, &[TrackSpec::video()]).await;
    let pb = bob.publisher.take().unwrap();
    let mut got = Vec::new();
    assert!(
        pump_until(
            &pb,
            Pump {
                video: Some(0),
                ..Pump::default()
            },
            Duration::from_secs(10),
            || {
                got.extend(second.drain_packets());
                !got.is_empty()
            }
        )
        .await
    );
    assert_eq!(got[0].stream_id, "bob");

    // And bob receives the new session's track with msid naming the user exactly, '@' included.
    second.publish(&sfu, &[TrackSpec::video()]).await;
    let ps = second.publisher.take().unwrap();
    let mut got = Vec::new();
    assert!(
        pump_until(
            &ps,
            Pump {
                video: Some(0),
                ..Pump::default()
            },
            Duration::from_secs(10),
            || {
                got.extend(bob.drain_packets());
                !got.is_empty()
            }
        )
        .await
    );
    assert_eq!(got[0].stream_id, "dave@example.com");
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_protocol_errors_and_change_nothing() {
    use switchboard::sfu::{IceCandidateInit, PcTarget, SfuError};
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let stranger = switchboard::ids::UserId::parse("mallory").unwrap();

    let e = sfu
        .publish(&room, &stranger, "v=0".into())
        .await
        .unwrap_err();
    assert_eq!(
        (e.clone(), e.code()),
        (SfuError::NotJoined, "invalid_state")
    );
    let e = sfu
        .publish(&room, &alice.user, "not sdp at all".into())
        .await
        .unwrap_err();
    assert!(matches!(e, SfuError::BadSdp(_)) && e.code() == "bad_request");
    let e = sfu
        .answer(&room, &alice.user, "v=0".into())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_state", "no offer outstanding: {e}");
    let e = sfu
        .subscription(&room, &alice.user, &TrackId::random(), true, None, None)
        .await
        .unwrap_err();
    assert_eq!(e, SfuError::UnknownTrack);

    alice.publish(&sfu, &[TrackSpec::audio()]).await;
    let good = IceCandidateInit {
        candidate: "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host".into(),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
        username_fragment: None,
    };
    sfu.candidate(&room, &alice.user, PcTarget::Publisher, good)
        .await
        .expect("trickled candidate accepted");
    let bad = IceCandidateInit {
        candidate: "candidate:garbage".into(),
        ..Default::default()
    };
    let e = sfu
        .candidate(&room, &alice.user, PcTarget::Publisher, bad)
        .await
        .unwrap_err();
    assert!(matches!(e, SfuError::BadCandidate(_)) && e.code() == "bad_request");
    // Random datagrams at the media port are dropped without harm.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u8 {
        let mut d = vec![i; (i as usize % 60) + 1];
        d[0] = i % 4; // looks like STUN to the demultiplexer
        junk.send_to(&d, sfu.local_addr()).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = sfu.room(&room).await.expect("engine still answers");
    assert_eq!(info.participants.len(), 1);
    assert_eq!(info.participants[0].tracks.len(), 1);
    sfu.shutdown().await;
}
