//! The media I/O thread's STUN reader: the server ufrag (and worker) of any datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((ufrag, worker)) = switchboard::fuzzing::stun_route(data) {
        // The ufrag is a slice of the USERNAME attribute, so never longer than the datagram.
        assert!(ufrag.len() <= data.len());
        if let Some(w) = worker {
            assert!(w <= 0xffff);
        }
    }
});
