//! The ICE-TCP reader: RFC 4571 frames from a byte stream however the reads cut it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how many cut lengths follow; the rest is the stream.
    let (n, rest) = match data.split_first() {
        Some((n, rest)) => (usize::from(*n % 16).min(rest.len()), rest),
        None => return,
    };
    let (cuts, stream) = rest.split_at(n);
    let _ = switchboard::fuzzing::tcp_frames(stream, cuts);
});
