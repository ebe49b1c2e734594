//! The SFU packet path per forwarded packet, with real str0m `Rtc`s connected in memory (no
//! sockets): SRTP-decrypt one VP8 packet on the server's publisher connection, decide
//! (`Forwarder`), rewrite (`RtpRewriter`, `Vp8Munger` + str0m's `Vp8Patch`), and write and
//! SRTP-encrypt it on N subscriber connections, draining each `Rtc` as the worker does. Only
//! the server side is timed; the client publisher that encrypts the input and the client
//! subscribers are outside the measurement.
//!
//! Prints ns per input packet and per forwarded copy, and the in-process dwell (the input
//! datagram handed to the publisher `Rtc` → the last subscriber's encrypted datagram out) as
//! p50/p99. Socket syscalls are not included; see the module doc of `switchboard::sfu`.
//!
//! Left out, so a whole-server run (`switchboard loadtest`, BENCHMARKS.md) costs more per
//! packet than this: the `recvmmsg`/`sendmmsg` syscalls and the hop from the I/O thread to
//! the worker; the resolution probe, speaker detection and per-round metrics of the worker;
//! RTCP from subscribers (TWCC feedback, receiver reports), which the client subscribers here
//! never send.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use str0m::bwe::Bitrate;
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo, Ssrc, Vp8Descriptor};
use str0m::{Candidate, Event, Input, Output, Rtc};
use switchboard::sfu::forwarder::{Decision, Forwarder, MediaKind as FMediaKind, PacketInfo};
use switchboard::sfu::rewriter::{RtpIn, RtpRewriter, Vp8Munger};

struct Peer {
    rtc: Rtc,
    addr: SocketAddr,
    inbox: VecDeque<(SocketAddr, Vec<u8>)>,
}

fn peer(port: u16, rtp_mode: bool, bwe: bool, now: Instant) -> Peer {
    let mut b = Rtc::builder().set_rtp_mode(rtp_mode);
    if bwe {
        b = b.enable_bwe(Some(Bitrate::kbps(2_500)));
    }
    let mut rtc = b.build(now);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
    Peer {
        rtc,
        addr,
        inbox: VecDeque::new(),
    }
}

/// Polls to timeout; transmits go to the other side's inbox. Returns events.
fn drain(p: &mut Peer, to: &mut VecDeque<(SocketAddr, Vec<u8>)>) -> Vec<Event> {
    let mut ev = Vec::new();
    loop {
        match p.rtc.poll_output().expect("poll") {
            Output::Timeout(_) => return ev,
            Output::Transmit(t) => to.push_back((t.source, t.contents.into())),
            Output::Event(e) => ev.push(e),
        }
    }
}

fn deliver(p: &mut Peer, now: Instant) {
    while let Some((src, data)) = p.inbox.pop_front() {
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source: src,
                destination: p.addr,
                contents: data.as_slice().try_into().expect("datagram"),
            },
        );
        p.rtc.handle_input(input).expect("input");
    }
}

/// Connects two Rtcs through in-memory queues (direct API, no SDP).
fn connect(a: &mut Peer, b: &mut Peer, mut now: Instant) -> Instant {
    let ca = Candidate::host(a.addr, "udp").unwrap();
    let cb = Candidate::host(b.addr, "udp").unwrap();
    a.rtc.add_remote_candidate(cb);
    b.rtc.add_remote_candidate(ca);
    let fa = a.rtc.direct_api().local_dtls_fingerprint().clone();
    let fb = b.rtc.direct_api().local_dtls_fingerprint().clone();
    a.rtc.direct_api().set_remote_fingerprint(fb);
    b.rtc.direct_api().set_remote_fingerprint(fa);
    let ia = a.rtc.direct_api().local_ice_credentials();
    let ib = b.rtc.direct_api().local_ice_credentials();
    a.rtc.direct_api().set_remote_ice_credentials(ib);
    b.rtc.direct_api().set_remote_ice_credentials(ia);
    a.rtc.direct_api().set_ice_controlling(true);
    b.rtc.direct_api().set_ice_controlling(false);
    a.rtc.direct_api().start_dtls(true).unwrap();
    b.rtc.direct_api().start_dtls(false).unwrap();
    for _ in 0..2000 {
        a.rtc.handle_input(Input::Timeout(now)).unwrap();
        b.rtc.handle_input(Input::Timeout(now)).unwrap();
        drain(a, &mut b.inbox);
        drain(b, &mut a.inbox);
        deliver(a, now);
        deliver(b, now);
        drain(a, &mut b.inbox);
        drain(b, &mut a.inbox);
        if a.rtc.is_connected() && b.rtc.is_connected() {
            return now;
        }
        now += Duration::from_millis(5);
    }
    panic!("in-memory pair did not connect");
}

struct Path {
    client_pub: Peer,
    server_pub: Peer,
    subs: Vec<(Peer, Peer, Ssrc, Forwarder, RtpRewriter, Vp8Munger)>,
    in_ssrc: Ssrc,
    pt: str0m::media::Pt,
    now: Instant,
    seq: u64,
    frame: u32,
}

fn setup(n: usize) -> Path {
    let mut now = Instant::now();
    let mid: Mid = "v0".into();
    let mut client_pub = peer(1000, true, false, now);
    let mut server_pub = peer(2000, true, false, now);
    now = connect(&mut client_pub, &mut server_pub, now);
    let in_ssrc: Ssrc = 1111.into();
    client_pub
        .rtc
        .direct_api()
        .declare_media(mid, MediaKind::Video);
    client_pub
        .rtc
        .direct_api()
        .declare_stream_tx(in_ssrc, None, mid, None);
    server_pub
        .rtc
        .direct_api()
        .declare_media(mid, MediaKind::Video);
    server_pub
        .rtc
        .direct_api()
        .expect_stream_rx(in_ssrc, None, mid, None);
    let pt = client_pub
        .rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| p.pt())
        .expect("vp8");
    let mut subs = Vec::new();
    for i in 0..n {
        let mut server_sub = peer(3000 + i as u16, true, true, now);
        let mut client_sub = peer(4000 + i as u16, true, false, now);
        now = connect(&mut server_sub, &mut client_sub, now);
        let out: Ssrc = (5000 + i as u32).into();
        let rtx: Ssrc = (6000 + i as u32).into();
        server_sub
            .rtc
            .direct_api()
            .declare_media(mid, MediaKind::Video);
        server_sub
            .rtc
            .direct_api()
            .declare_stream_tx(out, Some(rtx), mid, None);
        client_sub
            .rtc
            .direct_api()
            .declare_media(mid, MediaKind::Video);
        client_sub
            .rtc
            .direct_api()
            .expect_stream_rx(out, Some(rtx), mid, None);
        subs.push((
            server_sub,
            client_sub,
            out,
            Forwarder::new(FMediaKind::Video, Some(0)),
            RtpRewriter::new(90_000, 100, 0),
            Vp8Munger::default(),
        ));
    }
    Path {
        client_pub,
        server_pub,
        subs,
        in_ssrc,
        pt,
        now,
        seq: 1,
        frame: 0,
    }
}

/// Makes the next encrypted input datagram (untimed).
fn next_datagram(p: &mut Path) -> (SocketAddr, Vec<u8>) {
    p.now += Duration::from_millis(5);
    p.frame += 1;
    let key = p.frame % 100 == 1;
    let mut payload = vec![
        0x90,
        0x80,
        0x80 | ((p.frame >> 8) & 0x7f) as u8,
        p.frame as u8,
    ];
    payload.extend_from_slice(if key {
        &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01]
    } else {
        &[0x11, 0x02, 0x00, 0, 0, 0, 0, 0, 0, 0]
    });
    payload.resize(1100, 0x55);
    let w = RtpWrite::new(p.pt, SeqNo::from(p.seq), p.frame * 3000, p.now, payload)
        .marker(true)
        .nackable(true);
    p.seq += 1;
    p.client_pub
        .rtc
        .direct_api()
        .stream_tx(&p.in_ssrc)
        .expect("tx")
        .write_rtp(w);
    p.client_pub
        .rtc
        .handle_input(Input::Timeout(p.now))
        .unwrap();
    let mut q = VecDeque::new();
    drain(&mut p.client_pub, &mut q);
    // The RTP packet is the largest datagram of the round.
    q.into_iter()
        .max_by_key(|(_, d)| d.len())
        .expect("a datagram")
}

/// The timed server part for one input datagram. Returns datagrams produced for subscribers.
fn server_path(p: &mut Path, src: SocketAddr, data: &[u8]) -> usize {
    let now = p.now;
    let input = Input::Receive(
        now,
        Receive {
            proto: Protocol::Udp,
            source: src,
            destination: p.server_pub.addr,
            contents: data.try_into().expect("datagram"),
        },
    );
    p.server_pub.rtc.handle_input(input).expect("input");
    let mut to_client = VecDeque::new();
    let events = drain(&mut p.server_pub, &mut to_client);
    let mut out = 0;
    for e in events {
        let Event::RtpPacket(pkt) = e else { continue };
        let keyframe = switchboard::codec::is_keyframe_start(
            switchboard::codec::VideoCodec::Vp8,
            &pkt.payload,
        );
        let desc = Vp8Descriptor::parse(&pkt.payload).ok();
        let rin = RtpIn {
            seq: *pkt.seq_no,
            ts: pkt.time.numer(),
            arrival: now,
        };
        for (server_sub, _client, ssrc, fwd, rw, vp8) in p.subs.iter_mut() {
            let switched = match fwd.decide(PacketInfo {
                layer: 0,
                keyframe_start: keyframe,
            }) {
                Decision::Forward { switched } => switched,
                Decision::Drop(_) => continue,
            };
            let o = if switched {
                if let Some(d) = &desc {
                    vp8.switch_to(d.picture_id(), d.tl0_pic_idx());
                }
                rw.switch_to(rin)
            } else {
                match rw.rewrite(rin) {
                    Ok(o) => o,
                    Err(_) => continue,
                }
            };
            let exts = ExtensionValues {
                audio_level: pkt.header.ext_vals.audio_level,
                video_orientation: pkt.header.ext_vals.video_orientation,
                ..ExtensionValues::default()
            };
            let mut w = RtpWrite::new(p.pt, SeqNo::from(o.seq), o.ts, now, pkt.payload.clone())
                .marker(pkt.header.marker)
                .ext_vals(exts)
                .nackable(true);
            if let Some(d) = &desc {
                let (pic, tl0) = vp8.rewrite(d.picture_id(), d.tl0_pic_idx());
                let mut b = d.patch();
                if let Some(pic) = pic {
                    b = b.picture_id(pic);
                }
                if let Some(t) = tl0 {
                    b = b.tl0_pic_idx(t);
                }
                if let Ok(patch) = b.build() {
                    w = w.vp8_patch(patch);
                }
            }
            if let Some(s) = server_sub.rtc.direct_api().stream_tx(ssrc) {
                s.write_rtp(w);
            }
            let mut q = VecDeque::new();
            drain(server_sub, &mut q);
            out += q.len();
        }
    }
    // As the worker does at the end of a round: feed the round's time to the subscriber
    // connections so str0m's pacer releases what was written.
    for (server_sub, ..) in p.subs.iter_mut() {
        server_sub
            .rtc
            .handle_input(Input::Timeout(now))
            .expect("timeout");
        let mut q = VecDeque::new();
        drain(server_sub, &mut q);
        out += q.len();
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet_path");
    for n in [1usize, 8] {
        let mut p = setup(n);
        // Warm up: the first keyframe starts every consumer.
        let mut warm = 0;
        for _ in 0..200 {
            let (src, d) = next_datagram(&mut p);
            warm += server_path(&mut p, src, &d);
        }
        assert!(
            warm >= 100 * n,
            "the path forwards ({warm} datagrams in warm-up)"
        );
        let mut dwell: Vec<Duration> = Vec::new();
        let mut outs = 0usize;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("subscribers", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (src, d) = next_datagram(&mut p);
                    let t0 = Instant::now();
                    let out = server_path(&mut p, src, &d);
                    let el = t0.elapsed();
                    total += el;
                    outs += out;
                    if out >= n {
                        dwell.push(el);
                    }
                    // Fire the server subscriber connections' timers now and then (stats,
                    // pacer). No feedback flows back: the client subscribers' output is
                    // discarded, so str0m's bandwidth estimate stays at its initial value.
                    if p.frame.is_multiple_of(50) {
                        for (s, _c, ..) in p.subs.iter_mut() {
                            s.rtc.handle_input(Input::Timeout(p.now)).unwrap();
                            let mut q = VecDeque::new();
                            drain(s, &mut q);
                        }
                    }
                }
                total
            })
        });
        println!("N={n}: {outs} datagrams out, {} full fan-outs", dwell.len());
        dwell.sort();
        if !dwell.is_empty() {
            let q = |f: f64| dwell[((dwell.len() - 1) as f64 * f) as usize];
            let mean = dwell.iter().sum::<Duration>() / dwell.len() as u32;
            println!(
                "packet_path N={n}: mean {:.0} ns per input packet, {:.0} ns per forwarded copy; \
                 in-process dwell p50 {:?} p99 {:?} ({} samples)",
                mean.as_nanos() as f64,
                mean.as_nanos() as f64 / n as f64,
                q(0.5),
                q(0.99),
                dwell.len()
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
