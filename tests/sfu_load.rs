//! A load measurement through the real server (ignored by default; run it in release):
//! `cargo test --release --test sfu_load -- --ignored --nocapture`.
//!
//! One publisher sends ~1 KB VP8 packets at 500 packets/s to eight subscribers over 127.0.0.1.
//! It reports the CPU time of the SFU's own threads (`sfu-io`, `sfu-worker-*`, read from
//! /proc) per forwarded packet, SRTP both ways and the syscalls included, and the server-side
//! dwell distribution. The clients run in the same process but on their own threads.

mod sfu_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use sfu_support::*;
use switchboard::client::rtc::{Outgoing, TrackSpec};
use switchboard::ids::CallId;

/// CPU seconds of this process's threads whose name starts with `sfu-`.
fn sfu_cpu() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with("sfu-") {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (ut + st) / ticks;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load measurement; run in release with --ignored --nocapture"]
async fn one_publisher_eight_subscribers() {
    let (sfu, sink) = start(1);
    let room = CallId::generate(0);
    let mut alice = join(&sfu, &sink, &room, "alice", None).await;
    let mut subs = Vec::new();
    for i in 0..8 {
        subs.push(join(&sfu, &sink, &room, &format!("sub{i}"), None).await);
    }
    alice.publish(&sfu, &[TrackSpec::video()]).await;
    let pa = alice.publisher.take().unwrap();
    // Warm up until every subscriber receives.
    let mut ready = vec![false; subs.len()];
    let warm = pump_until(
        &pa,
        Pump {
            video: Some(0),
            key_every: 10,
            ..Pump::default()
        },
        Duration::from_secs(20),
        || {
            for (i, s) in subs.iter_mut().enumerate() {
                if !s.drain_packets().is_empty() {
                    ready[i] = true;
                }
            }
            ready.iter().all(|r| *r)
        },
    )
    .await;
    assert!(warm, "all subscribers receive");

    let before = sfu.counters();
    let cpu0 = sfu_cpu();
    let start = Instant::now();
    let mut n: u32 = 0;
    let body = vec![0x42u8; 1000];
    while start.elapsed() < Duration::from_secs(5) {
        for _ in 0..10 {
            let mut p = vp8(n.is_multiple_of(250), (n % 30000) as u16, 1280, 720, b"");
            let mut v = p.to_vec();
            v.extend_from_slice(&body);
            p = Bytes::from(v);
            pa.write(
                0,
                None,
                Outgoing {
                    timestamp: n.wrapping_mul(900),
                    marker: true,
                    payload: p,
                    audio_level: None,
                },
            )
            .await
            .unwrap();
            n += 1;
        }
        for s in subs.iter_mut() {
            s.drain_packets();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = sfu_cpu() - cpu0;
    let after = sfu.counters();
    let fwd = after.packets_forwarded - before.packets_forwarded;
    let mut d = after;
    for (i, b) in d.dwell.iter_mut().enumerate() {
        *b -= before.dwell[i];
    }
    println!(
        "sfu_load: {} packets in, {} forwarded in {:.1}s; SFU threads {:.3} s CPU = {:.2} µs per \
         forwarded packet; dwell p50 <= {:?}, p99 <= {:?}; buckets {:?}",
        after.packets_in - before.packets_in,
        fwd,
        start.elapsed().as_secs_f64(),
        cpu,
        cpu * 1e6 / fwd.max(1) as f64,
        d.dwell_quantile(0.5),
        d.dwell_quantile(0.99),
        d.dwell
    );
    assert!(fwd > 0);
    sfu.shutdown().await;
}
