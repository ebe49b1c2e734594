//! The plain UDP relay: the near-physical limit of forwarding on this machine, for comparison.
//!
//! The server ([`serve`]) is one UDP socket on one thread: `recvmmsg` up to 64 datagrams, look
//! up each source's room, and `sendmmsg` a copy to every subscriber of that room. No SRTP, no
//! RTP parsing, no rewriting, no feedback: whatever an SFU does beyond this is its own cost.
//! Peers announce themselves with a text datagram `JOIN <room> pub` or `JOIN <room> sub`.
//!
//! The client side ([`run`]) is the media load generator's plain twin: the same synthetic
//! VP8/Opus payloads ([`super::synth`]) in plain RTP from one socket per publisher to the relay,
//! one socket per subscriber, one thread, batched IO and kernel receive timestamps. Every
//! received packet is timed (nothing to decrypt). The relay's CPU and memory come from
//! `/proc/<pid>/stat` (`--server-pid`); its forwarded packets are what the subscribers received.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::engine::EngineResults;
use super::media::{JoinedUserTime, MediaLoad, MediaReport, ReportInput, build_report};
use super::report::{Percentiles, SeqTracker, ServerSample, histogram};
use super::synth::{self, OpusSource, SynthPacket, Vp8Source};
use super::udp::{self, Epoll, RecvBatch};

/// Runs the relay on `addr` until `stop` is set. Returns the datagrams forwarded.
pub fn serve(addr: SocketAddr, stop: &AtomicBool) -> std::io::Result<u64> {
    let socket = udp::bind(addr)?;
    let fd = socket.as_raw_fd();
    let mut ep = Epoll::new()?;
    ep.add(fd, 0)?;
    let mut rooms: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut route: HashMap<SocketAddr, String> = HashMap::new();
    let mut batch = RecvBatch::default();
    let mut ready = Vec::new();
    let mut out: Vec<(SocketAddr, usize)> = Vec::with_capacity(1024);
    let mut forwarded = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = batch.recv(fd)?;
        if n == 0 {
            ep.wait(Duration::from_millis(100), &mut ready);
            continue;
        }
        out.clear();
        for i in 0..n {
            let Some((data, from, _)) = batch.get(i) else {
                continue;
            };
            if let Some(rest) = data.strip_prefix(b"JOIN ") {
                let text = String::from_utf8_lossy(rest);
                let mut parts = text.split_whitespace();
                if let (Some(room), Some(role)) = (parts.next(), parts.next()) {
                    if role == "sub" {
                        let subs = rooms.entry(room.to_owned()).or_default();
                        if !subs.contains(&from) {
                            subs.push(from);
                        }
                    } else {
                        route.insert(from, room.to_owned());
                    }
                }
                continue;
            }
            if let Some(subs) = route.get(&from).and_then(|r| rooms.get(r)) {
                out.extend(subs.iter().map(|s| (*s, i)));
            }
        }
        let refs: Vec<(SocketAddr, &[u8])> = out
            .iter()
            .filter_map(|(to, i)| batch.get(*i).map(|(d, _, _)| (*to, d)))
            .collect();
        forwarded += udp::send_batch(fd, &refs) as u64;
    }
    Ok(forwarded)
}

/// CPU seconds (utime + stime) and resident bytes of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Some(((utime + stime) / ticks.max(1.0), rss_pages * page))
}

/// A server sample from /proc, with `forwarded` supplied by the caller (what subscribers got).
pub fn proc_sample(pid: u32, forwarded: u64) -> ServerSample {
    let (cpu, rss) = proc_usage(pid).unwrap_or((0.0, 0));
    ServerSample {
        cpu_seconds: cpu,
        forwarded,
        rss_bytes: rss,
    }
}

struct Pub {
    socket: UdpSocket,
    video: Option<(Vp8Source, u16, u32, Instant, Duration)>,
    audio: Option<(OpusSource, u16, u32, Instant)>,
}

struct Sub {
    socket: UdpSocket,
    streams: HashMap<u32, SeqTracker>,
    first: Option<Instant>,
}

fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, p: &SynthPacket, gen_seq: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + p.payload.len());
    v.push(0x80);
    v.push(pt | if p.marker { 0x80 } else { 0 });
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&ts.to_be_bytes());
    v.extend_from_slice(&ssrc.to_be_bytes());
    v.extend_from_slice(&p.payload);
    synth::stamp(&mut v, gen_seq, udp::realtime_ns());
    v
}

/// Runs the plain load against a relay at `cfg.url` (`udp://host:port` or `host:port`).
pub fn run(cfg: &MediaLoad, server_pid: Option<u32>) -> Result<MediaReport, String> {
    let relay: SocketAddr = cfg
        .url
        .trim_start_matches("udp://")
        .parse()
        .map_err(|e| format!("relay address {:?}: {e}", cfg.url))?;
    let bind = SocketAddr::new(cfg.bind_ip, 0);
    let mut ep = Epoll::new().map_err(|e| e.to_string())?;
    let mut pubs = Vec::new();
    let mut subs: Vec<Sub> = Vec::new();
    let sample = |fwd: u64| server_pid.map(|p| proc_sample(p, fwd)).unwrap_or_default();
    let rss0 = sample(0).rss_bytes;
    let now = Instant::now();
    let mut seed = 1u64;
    // Subscribers first (each publisher in a room also receives the others: it subscribes
    // with a second socket, as its subscriber connection would).
    let mut joined: Vec<JoinedUserTime> = Vec::new();
    let per_room = cfg.publishers + cfg.subscribers;
    for r in 0..cfg.rooms {
        for i in 0..per_room {
            let key = (r * per_room + i) as u32;
            let publisher = i < cfg.publishers;
            if publisher {
                let socket = udp::bind(bind).map_err(|e| e.to_string())?;
                socket
                    .send_to(format!("JOIN r{r} pub").as_bytes(), relay)
                    .map_err(|e| e.to_string())?;
                seed += 1;
                pubs.push(Pub {
                    socket,
                    video: cfg.video.map(|v| {
                        (
                            Vp8Source::new(v, seed),
                            rand::random(),
                            rand::random::<u32>() | 1,
                            now,
                            v.frame_interval(),
                        )
                    }),
                    audio: cfg.audio.then(|| {
                        (
                            OpusSource::new(seed),
                            rand::random(),
                            rand::random::<u32>() | 1,
                            now,
                        )
                    }),
                });
            }
            if !publisher || cfg.publishers > 1 {
                let socket = udp::bind(bind).map_err(|e| e.to_string())?;
                socket
                    .send_to(format!("JOIN r{r} sub").as_bytes(), relay)
                    .map_err(|e| e.to_string())?;
                ep.add(socket.as_raw_fd(), subs.len() as u64)
                    .map_err(|e| e.to_string())?;
                subs.push(Sub {
                    socket,
                    streams: HashMap::new(),
                    first: None,
                });
                joined.push(JoinedUserTime {
                    key,
                    joined_at: now,
                    invited_at: None,
                });
            }
        }
    }
    // A publisher also hears itself through the relay when it subscribes in its own room; the
    // relay does not filter that, so an all-publish room forwards to n, not n − 1. Counted as is.
    std::thread::sleep(Duration::from_millis(200));
    let stop_at_warm = Instant::now() + Duration::from_secs(1);
    let mut res = EngineResults {
        sent_packets: 0,
        sent_bytes: 0,
        received_packets: 0,
        received_bytes: 0,
        received_other: 0,
        expected: 0,
        lost: 0,
        latency_us: histogram(),
        verified: 0,
        verify_failures: 0,
        keyframe_requests: 0,
        frames_skipped: 0,
        engine_cpu_seconds: 0.0,
        first_media: HashMap::new(),
        connected: HashMap::new(),
        failures: Vec::new(),
    };
    let mut batch = RecvBatch::default();
    let mut ready = Vec::new();
    let mut frame = Vec::new();
    let mut window: Option<(Instant, ServerSample, f64, f64)> = None;
    let mut base = (0u64, 0u64);
    let end_at = stop_at_warm + cfg.duration;
    let mut total_received = 0u64;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= stop_at_warm {
            let (e, r) = totals(&subs);
            base = (e, r);
            res = EngineResults {
                latency_us: histogram(),
                ..res
            };
            res.sent_packets = 0;
            res.sent_bytes = 0;
            res.received_packets = 0;
            res.received_bytes = 0;
            window = Some((
                now,
                sample(total_received),
                super::engine::thread_cpu_seconds(),
                super::engine::process_cpu_seconds(),
            ));
        }
        if now >= end_at {
            break;
        }
        let measuring = window.is_some();
        // Send what is due.
        let mut next = now + Duration::from_millis(5);
        for p in &mut pubs {
            let mut out: Vec<Vec<u8>> = Vec::new();
            if let Some((src, seq, ssrc, at, every)) = p.video.as_mut() {
                if *at <= now {
                    *at += *every;
                    src.next_frame(&mut frame);
                    for f in &frame {
                        out.push(rtp(96, *seq, f.timestamp, *ssrc, f, u32::from(*seq)));
                        *seq = seq.wrapping_add(1);
                    }
                }
                next = next.min(*at);
            }
            if let Some((src, seq, ssrc, at)) = p.audio.as_mut() {
                if *at <= now {
                    *at += synth::AUDIO_PTIME;
                    let f = src.next_packet();
                    out.push(rtp(111, *seq, f.timestamp, *ssrc, &f, u32::from(*seq)));
                    *seq = seq.wrapping_add(1);
                }
                next = next.min(*at);
            }
            if !out.is_empty() {
                let refs: Vec<(SocketAddr, &[u8])> =
                    out.iter().map(|d| (relay, d.as_slice())).collect();
                let n = udp::send_batch(p.socket.as_raw_fd(), &refs);
                if measuring {
                    res.sent_packets += n as u64;
                    res.sent_bytes += out.iter().map(|d| d.len() as u64).sum::<u64>();
                }
            }
        }
        ep.wait(next.saturating_duration_since(Instant::now()), &mut ready);
        for t in ready.clone() {
            let Some(s) = subs.get_mut(t as usize) else {
                continue;
            };
            loop {
                let n = batch.recv(s.socket.as_raw_fd()).unwrap_or_default();
                let at = Instant::now();
                for i in 0..n {
                    let Some((d, _, rx_ns)) = batch.get(i) else {
                        continue;
                    };
                    if d.len() < 12 {
                        continue;
                    }
                    let seq = u16::from_be_bytes([d[2], d[3]]);
                    let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
                    s.streams.entry(ssrc).or_default().push(seq);
                    s.first.get_or_insert(at);
                    total_received += 1;
                    if measuring {
                        res.received_packets += 1;
                        res.received_bytes += d.len() as u64;
                        match synth::read_stamp(d) {
                            Some((_, sent)) if rx_ns >= sent => {
                                let _ = res.latency_us.record(((rx_ns - sent) / 1000).max(1));
                                res.verified += 1;
                            }
                            _ => res.verify_failures += 1,
                        }
                    }
                }
                if n < udp::BATCH {
                    break;
                }
            }
        }
    }
    let (t0, start, thread0, proc0) = window.ok_or("no measured window")?;
    let end = sample(total_received);
    let secs = t0.elapsed().as_secs_f64();
    res.engine_cpu_seconds = super::engine::thread_cpu_seconds() - thread0;
    let generator_cpu = super::engine::process_cpu_seconds() - proc0;
    let (e, r) = totals(&subs);
    res.expected = e - base.0;
    res.lost = res.expected.saturating_sub(r - base.1);
    for (i, s) in subs.iter().enumerate() {
        if let (Some(f), Some(j)) = (s.first, joined.get(i)) {
            res.first_media.insert(j.key, f);
            res.connected.insert(j.key, f);
        }
    }
    for k in 0..(cfg.rooms * per_room) as u32 {
        res.connected.entry(k).or_insert(now);
    }
    let mut all_joined = joined;
    for k in 0..(cfg.rooms * per_room) as u32 {
        if !all_joined.iter().any(|j| j.key == k) {
            all_joined.push(JoinedUserTime {
                key: k,
                joined_at: now,
                invited_at: None,
            });
        }
    }
    let rss1 = end.rss_bytes;
    Ok(build_report(ReportInput {
        cfg,
        target: "relay",
        users: cfg.rooms * per_room,
        setup_ms: Percentiles::default(),
        join_times: &all_joined,
        res,
        start,
        end,
        window: secs,
        generator_cpu,
        rss: [rss0, rss1, rss1],
        video_layers: 0,
        subscriptions: 0,
        failures: Default::default(),
        measured_layers: Vec::new(),
        server_bwe_bps: None,
    }))
}

fn totals(subs: &[Sub]) -> (u64, u64) {
    subs.iter()
        .flat_map(|s| s.streams.values())
        .fold((0, 0), |(e, r), t| (e + t.expected(), r + t.received()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_relay_copies_a_publishers_datagrams_to_each_subscriber_of_its_room() {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let relay = std::thread::spawn(move || serve(addr, &s2));
        std::thread::sleep(Duration::from_millis(100));
        let publisher = UdpSocket::bind("127.0.0.1:0").unwrap();
        let subs: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in &subs {
            s.send_to(b"JOIN a sub", addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        other.send_to(b"JOIN b sub", addr).unwrap();
        other
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        publisher.send_to(b"JOIN a pub", addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        publisher.send_to(b"hello", addr).unwrap();
        let mut buf = [0u8; 64];
        for s in &subs {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"hello"[..], addr));
        }
        assert!(
            other.recv_from(&mut buf).is_err(),
            "another room hears nothing"
        );
        stop.store(true, Ordering::Relaxed);
        assert_eq!(relay.join().unwrap().unwrap(), 3);
    }

    #[test]
    fn reads_cpu_and_memory_of_a_process() {
        let (cpu, rss) = proc_usage(std::process::id()).unwrap();
        assert!(cpu >= 0.0 && rss > 0);
        assert_eq!(proc_usage(u32::MAX), None);
    }
}
