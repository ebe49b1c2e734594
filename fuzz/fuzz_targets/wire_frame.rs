//! The signaling frame parser: any text a WebSocket client sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::signaling::wire::parse_request;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(text) {
        Ok(req) => {
            // A parsed op names itself; its debug form is total.
            let _ = format!("{:?}", req.op);
        }
        Err(e) => {
            // A refusal is a protocol error with a message, never empty.
            assert!(!e.error.message.is_empty());
        }
    }
});
