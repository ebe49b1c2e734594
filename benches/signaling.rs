//! The signaling state machine alone: invite → accept → end cycles per second on one core, with the
//! events and write-through records it produces (no IO).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard::ids::{CallId, SessionId, UserId};
use switchboard::signaling::wire::{CallArgs, InviteArgs, Mode};
use switchboard::signaling::{Rules, Signaling};

fn cycles(c: &mut Criterion) {
    let mut group = c.benchmark_group("signaling");
    group.throughput(Throughput::Elements(1));
    group.bench_function("invite_accept_end_cycle", |b| {
        let mut n = 0u64;
        let mut core = Signaling::with_id_source(
            Rules::default(),
            Box::new(move |now| {
                n += 1;
                CallId::parse(&format!("c_{n}")).unwrap_or_else(|_| CallId::generate(now))
            }),
        );
        let caller = SessionId(1);
        let callee = SessionId(2);
        let mut now = 1_800_000_000_000u64;
        core.connect(now, caller, UserId::parse("alice").expect("id"), None);
        core.connect(now, callee, UserId::parse("bob").expect("id"), None);
        b.iter(|| {
            // Six seconds apart: the caller stays within the default 10 calls per minute, so the
            // quota is checked and counted on every cycle, never refused.
            now += 6_001;
            let (out, reply) = core.call_invite(
                now,
                caller,
                InviteArgs {
                    invitees: vec!["bob".into()],
                    mode: Mode::Advanced,
                    timeout: Some(30),
                    extended_data: String::new(),
                },
            );
            black_box(out);
            let call_id: CallId = reply
                .ok()
                .and_then(|v| v["call_id"].as_str().and_then(|s| s.parse().ok()))
                .expect("invite succeeds");
            let args = CallArgs {
                call_id,
                extended_data: String::new(),
            };
            let (out, reply) = core.call_answer(now, callee, args.clone(), true);
            assert!(reply.is_ok(), "accept succeeds");
            black_box(out);
            let (out, reply) = core.call_end(now, caller, args);
            assert!(reply.is_ok(), "end succeeds");
            black_box(out);
            // Fire the eviction timers now and then so memory stays flat.
            if now.is_multiple_of(1024) {
                black_box(core.tick(now + 3_600_000));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, cycles);
criterion_main!(benches);
