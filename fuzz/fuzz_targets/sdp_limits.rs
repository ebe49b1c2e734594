//! The media-signaling limits: SDP summary (m-lines, sending sections, candidates) and trickled
//! candidate lines, read before str0m parses anything.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // After the first NUL: trickled candidate lines.
    let (sdp, trickled) = text.split_once('\0').unwrap_or((&text, ""));
    let lines: Vec<&str> = trickled.lines().collect();
    let (mlines, sending, held) = switchboard::fuzzing::sdp_limits(sdp, &lines, 32);
    assert!(sending <= mlines);
    assert!(held <= 32, "at most the cap of distinct candidates is held");
});
