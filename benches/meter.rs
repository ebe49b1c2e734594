//! Throughput of the tier meter: consumer updates applied per second, for a room-sized population
//! (200 calls × 4 subscribers × 3 consumers) with layer switches, stops and restarts, plus a
//! checkpoint tick every 10 simulated seconds.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::billing::{ConsumerUpdate, Forwarding, TierMeter};
use switchboard::codec::Resolution;
use switchboard::config::BillingConfig;
use switchboard::ids::{CallId, TrackId, UserId};

const SIZES: [Resolution; 3] = [
    Resolution {
        width: 320,
        height: 180,
    },
    Resolution {
        width: 640,
        height: 360,
    },
    Resolution {
        width: 1280,
        height: 720,
    },
];

/// A deterministic event stream: 10 ms apart, cycling over consumers; every seventh update stops the
/// consumer, every third is audio, the rest switch video layers.
fn events(n: usize) -> Vec<ConsumerUpdate> {
    let calls: Vec<CallId> = (0..200)
        .map(|i| CallId::parse(&format!("c{i}")).expect("id"))
        .collect();
    let users: Vec<UserId> = (0..4)
        .map(|i| UserId::parse(&format!("u{i}")).expect("id"))
        .collect();
    let tracks: Vec<TrackId> = (0..3)
        .map(|i| TrackId::parse(&format!("t{i}")).expect("id"))
        .collect();
    (0..n)
        .map(|i| {
            let forwarding = if i % 7 == 0 {
                Forwarding::Stopped
            } else if i % 3 == 0 {
                Forwarding::Audio
            } else {
                Forwarding::Video(SIZES[(i / 5) % 3])
            };
            ConsumerUpdate {
                at_ms: 1_000_000 + 10 * i as u64,
                call_id: calls[i % 200].clone(),
                user_id: users[(i / 200) % 4].clone(),
                track_id: tracks[(i / 800) % 3].clone(),
                forwarding,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    const N: usize = 20_000;
    let stream = events(N);
    let config = BillingConfig::default();
    let mut g = c.benchmark_group("meter");
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("apply_with_ticks", |b| {
        b.iter_batched(
            || stream.clone(),
            |events| {
                let mut m = TierMeter::new(&config);
                let mut records = 0usize;
                for e in events {
                    let at = e.at_ms;
                    records += m.apply(e).len();
                    if at % 10_000 == 0 {
                        records += m.tick(at).len();
                    }
                }
                records + m.flush(u64::MAX).len()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
