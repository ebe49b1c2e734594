//! End-to-end forwarding through the one UDP port with real `webrtc` 0.21 clients on 127.0.0.1.

mod sfu_support;

use std::collections::HashMap;
use std::time::Duration;

use sfu_support::*;
use switchboard::client::rtc::TrackSpec;
use switchboard::ids::CallId;
use switchboard::sfu::{Forwarding, RtcEvent, TrackKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants_receive_each_others_vp8_and_opus_intact() {
    let (sfu, sink) = start(2);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    assert!(
        alice
            .wait_event(Duration::from_secs(5), |e| matches!(e, RtcEvent::ParticipantJoined { user_id, .. } if user_id.as_str() == "bob"))
            .await
            .is_some(),
        "alice hears bob join"
    );

    alice
        .publish(&sfu, &[TrackSpec::audio(), TrackSpec::video()])
        .await;
    bob.publish(&sfu, &[TrackSpec::audio(), TrackSpec::video()])
        .await;

    // Each learns the other's two tracks.
    let mut tracks_of: HashMap<String, Vec<(String, TrackKind)>> = HashMap::new();
    for peer in [&mut alice, &mut bob] {
        for _ in 0..2 {
            let ev = peer
                .wait_event(Duration::from_secs(5), |e| {
                    matches!(e, RtcEvent::TrackPublished { .. })
                })
                .await
                .expect("track_published");
            if let RtcEvent::TrackPublished { track, .. } = ev {
                assert_ne!(
                    track.user_id, peer.user,
                    "own tracks are not announced to oneself"
                );
                tracks_of
                    .entry(track.user_id.to_string())
                    .or_default()
                    .push((track.track_id.to_string(), track.kind));
            }
        }
    }
    assert_eq!(tracks_of["alice"].len(), 2);
    assert_eq!(tracks_of["bob"].len(), 2);

    let mut got_a: Vec<_> = Vec::new();
    let mut got_b: Vec<_> = Vec::new();
    let enough = |v: &Vec<switchboard::client::rtc::Received>| {
        v.iter()
            .filter(|p| p.payload.first() == Some(&0x90))
            .count()
            >= 20
            && v.iter().filter(|p| p.payload.starts_with(b"a:")).count() >= 20
    };
    let pa = alice.publisher.take().unwrap();
    let pb = bob.publisher.take().unwrap();
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
                enough(&got_b)
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
                enough(&got_a)
            }
        ),
    );
    assert!(ok_a, "bob received alice's media: {} packets", got_b.len());
    assert!(ok_b, "alice received bob's media: {} packets", got_a.len());

    // msid maps to the right user and track, and payloads are intact.
    for (got, from) in [(&got_b, "alice"), (&got_a, "bob")] {
        let ids = &tracks_of[from];
        for p in got.iter() {
            assert_eq!(p.stream_id, from, "msid stream is the publisher's user id");
            let kind = ids
                .iter()
                .find(|(t, _)| *t == p.track_id)
                .map(|(_, k)| *k)
                .expect("msid track id is a published track id");
            match kind {
                TrackKind::Video => {
                    let body = vp8_body(&p.payload);
                    assert!(
                        body.windows(4).any(|w| w == b"v:-:"),
                        "video payload intact after the descriptor: {:?}",
                        p.payload
                    );
                    assert_eq!(p.payload_type, switchboard::client::rtc::VP8_PT);
                }
                TrackKind::Audio => {
                    assert!(p.payload.starts_with(b"a:"), "audio payload intact");
                    assert_eq!(p.payload_type, switchboard::client::rtc::OPUS_PT);
                }
            }
        }
        // Video sequence numbers are consecutive as received in order (no loss on loopback; the
        // client delivers each number once, so the RTX copies the server pads with do not show).
        let seqs: Vec<u16> = got
            .iter()
            .filter(|p| p.payload.first() == Some(&0x90))
            .map(|p| p.seq)
            .collect();
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0].wrapping_add(1), "gap-free video sequence");
        }
    }

    // Video starts on a keyframe: the first video packet each side got is one.
    for got in [&got_a, &got_b] {
        let first = got
            .iter()
            .find(|p| p.payload.first() == Some(&0x90))
            .unwrap();
        assert_eq!(
            first.payload.get(4).map(|b| b & 1),
            Some(0),
            "first video packet is a keyframe"
        );
    }

    // Billing saw both consumers start: audio and video with the measured size.
    let updates = sink.consumers.lock().unwrap().clone();
    assert!(updates.iter().any(|u| u.user_id.as_str() == "bob"
        && u.forwarding
            == Forwarding::Video(switchboard::codec::Resolution {
                width: 640,
                height: 360
            })));
    assert!(
        updates
            .iter()
            .any(|u| u.user_id.as_str() == "alice" && u.forwarding == Forwarding::Audio)
    );

    // Alice talks on at -30 dBov, Bob has stopped: Bob hears that Alice alone is speaking (Bob's own
    // voice from the exchange above fades from the set first).
    let mut speakers = None;
    let spoke = pump_until(
        &pa,
        Pump {
            audio: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(5),
        || {
            while let Ok(e) = bob.events.try_recv() {
                if let RtcEvent::ActiveSpeakers { user_ids, .. } = e {
                    speakers = Some(user_ids);
                }
            }
            speakers
                .as_ref()
                .is_some_and(|s| s.len() == 1 && s[0].as_str() == "alice")
        },
    )
    .await;
    assert!(
        spoke,
        "active_speakers from the audio level: last {speakers:?}"
    );

    let counters = sfu.counters();
    assert!(counters.packets_forwarded >= 80, "{counters:?}");
    sfu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_learns_who_is_speaking_at_once() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut bob = join(&sfu, &sink, &room, "bob", None).await;
    alice.publish(&sfu, &[TrackSpec::audio()]).await;
    let pa = alice.publisher.take().unwrap();
    let mut heard = false;
    let spoke = pump_until(
        &pa,
        Pump {
            audio: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(5),
        || {
            while let Ok(e) = bob.events.try_recv() {
                if let RtcEvent::ActiveSpeakers { user_ids, .. } = e {
                    heard = user_ids.first().is_some_and(|u| u.as_str() == "alice");
                }
            }
            heard
        },
    )
    .await;
    assert!(spoke, "bob hears alice speak");
    // Carol joins while Alice talks: she is told straight away, before the set changes again.
    let mut carol = join(&sfu, &sink, &room, "carol", None).await;
    let ev = carol
        .wait_event(Duration::from_millis(500), |e| {
            matches!(e, RtcEvent::ActiveSpeakers { .. })
        })
        .await;
    match ev {
        Some(RtcEvent::ActiveSpeakers { user_ids, .. }) => {
            assert_eq!(
                user_ids.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
                ["alice"]
            );
        }
        other => panic!("carol was not told who speaks: {other:?}"),
    }
    sfu.shutdown().await;
}
