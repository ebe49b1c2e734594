//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from the docs, and nothing in
//! the server calls them). Each runs one crate-private parser of the server on arbitrary input, as
//! the network would feed it; the public parsers (`signaling::wire`, `codec`, `auth`, the billing
//! query, the RTP rewriter) are fuzzed through their own API.

use crate::sfu::{limits, net};

/// The STUN path of the media I/O thread: the server ufrag of a binding request and the worker
/// it names.
pub fn stun_route(datagram: &[u8]) -> Option<(String, Option<usize>)> {
    let is_stun = net::is_stun(datagram);
    let ufrag = net::stun_local_ufrag(datagram)?;
    debug_assert!(is_stun, "a binding request is STUN");
    Some((ufrag.to_owned(), net::worker_of_ufrag(ufrag)))
}

/// The media-signaling limits on one SDP and trickled candidate lines: what the worker reads
/// before str0m parses anything. Returns the m-line count, the sending sections and the distinct
/// candidates held after all of them, which never exceed `max_candidates`.
pub fn sdp_limits(sdp: &str, trickled: &[&str], max_candidates: usize) -> (usize, usize, usize) {
    let summary = limits::summarize(sdp);
    assert!(
        summary.sending <= summary.mlines,
        "only media sections can send"
    );
    let mut set = limits::CandidateSet::default();
    if set.check(&summary.candidates, max_candidates).is_ok() {
        set.add(summary.candidates.clone());
    }
    for line in trickled {
        if let Some(k) = limits::candidate_key(line) {
            let keys = [k];
            if set.check(&keys, max_candidates).is_ok() {
                set.add(keys);
            }
        }
        assert!(set.len() <= max_candidates, "the candidate cap holds");
    }
    (summary.mlines, summary.sending, set.len())
}
