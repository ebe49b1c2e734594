//! Spoofed STUN against the real server's one UDP port (issue 10, defect 3): binding requests from
//! thousands of local sources with valid-looking ufrags leave no route behind, and one sent from the
//! very address a real client is about to use does not send that client's checks to the wrong
//! worker. The route table's size is read from `/metrics`.
//!
//! One test in this file: the metrics registry is process-wide, so a second server in the same
//! process would write the same gauge.

mod common;
mod sfu_support;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::media::MediaUser;
use common::{TestServer, WAIT};
use serde_json::json;
use sfu_support::{Pump, is_video, pump_until};
use switchboard::client::rtc::{Publisher, TrackSpec};

/// The worker a room lives on: the server hashes the call ID with FNV-1a (src/sfu/mod.rs).
fn room_worker(call_id: &str, workers: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in call_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % workers
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_stun_flood_leaves_no_routes_and_cannot_misroute_a_real_client() {
    let udp = free_udp_port();
    let s = TestServer::start_with(|c| {
        c.media.workers = 2;
        c.media.udp_port = udp;
    })
    .await;
    let media = SocketAddr::from(([127, 0, 0, 1], udp));
    let (a, b, call_id) = s.call("alice", "bob", "general").await;
    let wrong = 1 - room_worker(&call_id, 2);

    // A spoofer gets to the address alice's publisher will use first, with a valid-looking ufrag
    // of the other worker.
    let trap = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let trap_addr = trap.local_addr().expect("addr");
    trap.send_to(
        &common::binding_request(&format!("{wrong:04x}abcdefghijkl:spoof")),
        media,
    )
    .expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Then a flood from 20,000 distinct sources, ufrags naming each worker and none.
    let flood = tokio::task::spawn_blocking(move || {
        let mut sent = 0;
        for i in 0..20_000u32 {
            let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
                continue;
            };
            let user = format!("{:04x}{i:012}:x", i % 3);
            if sock.send_to(&common::binding_request(&user), media).is_ok() {
                sent += 1;
            }
            if i % 500 == 0 {
                // Let the server read rather than the kernel drop.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sent
    });
    let sent = flood.await.expect("flood");
    assert!(sent > 19_000, "sent {sent}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.metric("switchboard_udp_routes").await,
        Some(0.0),
        "spoofed binding requests created routes"
    );
    drop(trap);

    // The real clients connect, alice's publisher from the spoofed address, and media flows.
    let (mut alice, _) = MediaUser::join(a, "alice", &call_id)
        .await
        .expect("alice joins");
    let (mut bob, _) = MediaUser::join(b, "bob", &call_id)
        .await
        .expect("bob joins");
    alice
        .wait_event("participant_joined", WAIT, |d| d["user_id"] == "bob")
        .await
        .expect("bob joined");
    let mut p = Publisher::new_at(
        trap_addr,
        "alice",
        &[TrackSpec::audio(), TrackSpec::video()],
    )
    .await
    .expect("publisher on the spoofed address");
    let offer = p.offer().await.expect("offer");
    let r = alice
        .sig
        .request("rtc_publish", json!({"call_id": call_id, "sdp": offer}))
        .await
        .expect("answer");
    let answer = r["sdp"].as_str().expect("sdp").to_owned();
    // The server's real ufrag for alice's publisher connection: a spoofer may learn it (it is in
    // the SDP), but not the password that signs a valid check.
    let real_ufrag = answer
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .expect("ufrag in the answer")
        .to_owned();
    p.set_answer(answer).await.expect("client takes answer");
    p.wait_connected(Duration::from_secs(10))
        .await
        .expect("alice's publisher connects from the address the spoofer used first");

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
            got.iter().filter(|p| is_video(p)).count() >= 20
                && started.elapsed() > Duration::from_millis(500)
        },
    )
    .await;
    assert!(ok, "bob received {} packets from alice", got.len());

    // Only real connections hold routes: alice's publisher and bob's subscriber (one address
    // each), whatever the flood did.
    let routes = s.metric("switchboard_udp_routes").await.expect("gauge");
    assert!((2.0..=4.0).contains(&routes), "routes = {routes}");
    // And the spoofer still creates none while the call runs.
    let late = UdpSocket::bind("127.0.0.1:0").expect("bind");
    for i in 0..200 {
        let _ = late.send_to(
            &common::binding_request(&format!("{:04x}late{i:08}:x", i % 2)),
            media,
        );
    }
    // Nor with the connection's real ufrag but no valid MESSAGE-INTEGRITY, from many sources.
    for i in 0..200 {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let _ = sock.send_to(
            &common::binding_request(&format!("{real_ufrag}:spoof{i}")),
            media,
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.metric("switchboard_udp_routes").await, Some(routes));
    s.stop().await;
}
