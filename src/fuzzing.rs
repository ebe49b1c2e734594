//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from the docs, and nothing in
//! the server calls them). Each runs one crate-private parser of the server on arbitrary input, as
//! the network would feed it; the public parsers (`signaling::wire`, `codec`, `auth`, the billing
//! query, the RTP rewriter) are fuzzed through their own API.

use crate::sfu::{limits, net, tcp};

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

/// The ICE-TCP reader (RFC 4571 framing): `stream` fed in pieces cut where `cuts` says. Returns
/// the frames read, which are the same whatever the cuts (checked against one whole read), or
/// `None` if the stream has a frame of a bad length (which closes the connection).
pub fn tcp_frames(stream: &[u8], cuts: &[u8]) -> Option<Vec<Vec<u8>>> {
    let read = |pieces: &mut dyn Iterator<Item = &[u8]>| -> Option<Vec<Vec<u8>>> {
        let mut r = tcp::FrameReader::default();
        let mut out = Vec::new();
        for p in pieces {
            let ranges = r.push(p).ok()?;
            for (s, l) in &ranges {
                let f = r.buffer().get(*s..s + l)?.to_vec();
                assert!(!f.is_empty() && f.len() <= tcp::MAX_FRAME);
                out.push(f);
            }
            r.consume(&ranges);
        }
        Some(out)
    };
    let whole = read(&mut std::iter::once(stream));
    let mut rest = stream;
    let mut pieces = Vec::new();
    for c in cuts {
        let n = usize::from(*c).min(rest.len());
        let (a, b) = rest.split_at(n);
        pieces.push(a);
        rest = b;
    }
    pieces.push(rest);
    let cut = read(&mut pieces.into_iter());
    // All the bytes reach the reader either way, so a bad length fails both reads, and a clean
    // stream gives the same frames.
    assert_eq!(whole, cut, "cutting the stream changed the result");
    whole
}
