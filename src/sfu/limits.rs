//! What one participant's media signaling may make the engine hold: SDP size, m-lines per offer,
//! published tracks, remote ICE candidates per connection (`[media]` keys, PROTOCOL.md section 4
//! and docs/protocol.md). Pure: the checks read SDP text before str0m parses it, and a refused
//! offer, answer or candidate changes nothing.
//!
//! - Size: an `rtc_publish` offer or `rtc_answer` answer over `max_sdp_bytes` is refused unread.
//! - m-lines: an offer with more than `max_mlines_per_offer` media sections is refused, whatever
//!   their state (stopped and inactive sections are still parsed and kept by str0m).
//! - Tracks: a publisher offer is the whole description of the connection, so its audio and
//!   video sections in which the client sends (`sendrecv`/`sendonly`, port not 0 unless
//!   `bundle-only`) are exactly the participant's tracks after the negotiation. More than
//!   `max_tracks_per_participant` is refused.
//! - Candidates: each connection remembers the distinct remote candidates (component, transport,
//!   address, port) it was given, in SDP or trickled; one that would make more than
//!   `max_remote_candidates` is refused. Repeating a known candidate (renegotiation offers carry
//!   them again) costs nothing.
//! - Payload types: one payload type number means one codec configuration in the whole SDP
//!   (RFC 8843 section 9.1: bundled m-lines share one RTP session). An SDP that describes the
//!   same number twice differently (`a=rtpmap`, `a=fmtp`) is refused before str0m reads it:
//!   str0m 0.25 asserts on it ("Pt locked multiple times", found by the `worker_sdp` fuzz
//!   target), and a panicking worker aborts the server.

use std::collections::HashSet;

use crate::config::MediaConfig;

/// The limits, from `[media]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MediaLimits {
    pub max_sdp_bytes: usize,
    pub max_mlines: usize,
    pub max_tracks: usize,
    pub max_candidates: usize,
}

impl MediaLimits {
    pub(crate) fn from_config(cfg: &MediaConfig) -> Self {
        Self {
            max_sdp_bytes: cfg.max_sdp_bytes,
            max_mlines: cfg.max_mlines_per_offer,
            max_tracks: cfg.max_tracks_per_participant,
            max_candidates: cfg.max_remote_candidates,
        }
    }
}

/// Which limit refused something; `Display` is the protocol error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitError {
    /// The SDP is larger than `max_sdp_bytes`.
    #[error("the SDP is {got} bytes; at most {max} are allowed (media.max_sdp_bytes)")]
    SdpBytes { got: usize, max: usize },
    /// The offer has more media sections than `max_mlines_per_offer`.
    #[error("the offer has {got} m-lines; at most {max} are allowed (media.max_mlines_per_offer)")]
    Mlines { got: usize, max: usize },
    /// The offer publishes more tracks than `max_tracks_per_participant`.
    #[error(
        "the offer publishes {got} tracks; at most {max} are allowed per participant \
         (media.max_tracks_per_participant)"
    )]
    Tracks { got: usize, max: usize },
    /// The connection would have more remote candidates than `max_remote_candidates`.
    #[error(
        "{got} remote ICE candidates for this connection; at most {max} are allowed \
         (media.max_remote_candidates)"
    )]
    Candidates { got: usize, max: usize },
    /// One payload type number is described twice with different codec configurations.
    #[error(
        "payload type {pt} is described twice with different codecs or parameters; a payload \
         type means one codec configuration across the bundled m-lines (RFC 8843 section 9.1)"
    )]
    PayloadType { pt: u8 },
}

impl LimitError {
    /// The `limit` label of the rejection metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::SdpBytes { .. } => "sdp_bytes",
            Self::Mlines { .. } => "mlines",
            Self::Tracks { .. } => "tracks",
            Self::Candidates { .. } => "candidates",
            Self::PayloadType { .. } => "payload_type",
        }
    }
}

/// What the limits look at in one SDP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SdpSummary {
    /// Media sections (`m=` lines).
    pub mlines: usize,
    /// Audio and video sections in which the SDP's author sends.
    pub sending: usize,
    /// Distinct candidate keys (see [`candidate_key`]).
    pub candidates: Vec<String>,
    /// The first payload type found described twice differently, if any.
    pub pt_conflict: Option<u8>,
}

/// How the m-lines of one SDP describe each payload type: its `a=rtpmap` and `a=fmtp` values per
/// media section. A section that names neither for a number does not describe it.
#[derive(Default)]
struct PayloadTypes {
    /// Per payload type (0..=127): the settled description, from the first section describing it.
    settled: Vec<Option<(Option<String>, Option<String>)>>,
    /// The current section's descriptions, settled when the section ends.
    section: Vec<(u8, Option<String>, Option<String>)>,
    conflict: Option<u8>,
}

impl PayloadTypes {
    /// Reads `a=rtpmap:<pt> <value>` or `a=fmtp:<pt> <value>`; anything else is ignored.
    fn attribute(&mut self, attr: &str) {
        let (fmtp, rest) = if let Some(r) = attr.strip_prefix("rtpmap:") {
            (false, r)
        } else if let Some(r) = attr.strip_prefix("fmtp:") {
            (true, r)
        } else {
            return;
        };
        let (pt, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let Ok(pt) = pt.trim().parse::<u8>() else {
            return;
        };
        if pt > 127 {
            return;
        }
        // Encoding names are case-insensitive (RFC 4855 section 3); compare what str0m reads.
        let value = Some(value.trim().to_ascii_lowercase());
        let entry = match self.section.iter_mut().find(|(p, _, _)| *p == pt) {
            Some(e) => e,
            None => {
                self.section.push((pt, None, None));
                let last = self.section.len() - 1;
                &mut self.section[last]
            }
        };
        let slot = if fmtp { &mut entry.2 } else { &mut entry.1 };
        if slot.is_some() && *slot != value {
            // Described twice within one section.
            self.conflict.get_or_insert(pt);
        }
        *slot = value;
    }

    /// Ends a media section: its descriptions must agree with those of earlier sections.
    fn end_section(&mut self) {
        if self.settled.is_empty() {
            self.settled.resize(128, None);
        }
        for (pt, rtpmap, fmtp) in self.section.drain(..) {
            let desc = (rtpmap, fmtp);
            match &self.settled[usize::from(pt)] {
                Some(seen) if *seen != desc => {
                    self.conflict.get_or_insert(pt);
                }
                Some(_) => {}
                None => self.settled[usize::from(pt)] = Some(desc),
            }
        }
    }
}

/// Reads the m-lines, directions and candidates of an SDP. Never fails: anything it cannot read
/// is left for str0m's parser to refuse.
pub(crate) fn summarize(sdp: &str) -> SdpSummary {
    struct Section {
        media: bool,
        port_zero: bool,
        bundle_only: bool,
        dir: Option<bool>,
    }
    let mut out = SdpSummary::default();
    let mut session_sends = true;
    let mut current: Option<Section> = None;
    let mut seen = HashSet::new();
    let mut pts = PayloadTypes::default();
    let close = |s: Option<Section>, session_sends: bool, out: &mut SdpSummary| {
        if let Some(s) = s
            && s.media
            && (!s.port_zero || s.bundle_only)
            && s.dir.unwrap_or(session_sends)
        {
            out.sending += 1;
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("m=") {
            close(current.take(), session_sends, &mut out);
            pts.end_section();
            out.mlines += 1;
            let mut f = rest.split_ascii_whitespace();
            let kind = f.next().unwrap_or("");
            let port = f.next().unwrap_or("");
            current = Some(Section {
                media: kind == "audio" || kind == "video",
                port_zero: port == "0" || port.starts_with("0/"),
                bundle_only: false,
                dir: None,
            });
            continue;
        }
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        let dir = match attr {
            "sendrecv" | "sendonly" => Some(true),
            "recvonly" | "inactive" => Some(false),
            _ => None,
        };
        match (&mut current, dir) {
            (Some(s), Some(d)) => s.dir = Some(d),
            (None, Some(d)) => session_sends = d,
            (Some(s), None) if attr == "bundle-only" => s.bundle_only = true,
            _ => {
                pts.attribute(attr);
                if attr.starts_with("candidate:")
                    && let Some(k) = candidate_key(attr)
                    && seen.insert(k.clone())
                {
                    out.candidates.push(k);
                }
            }
        }
    }
    close(current, session_sends, &mut out);
    pts.end_section();
    out.pt_conflict = pts.conflict;
    out
}

/// What makes a remote candidate distinct: component, transport, address and port. `line` may
/// start with `a=` and/or `candidate:`. `None` if it has too few fields.
pub(crate) fn candidate_key(line: &str) -> Option<String> {
    let line = line.trim();
    let line = line.strip_prefix("a=").unwrap_or(line);
    let line = line.strip_prefix("candidate:").unwrap_or(line);
    let mut f = line.split_ascii_whitespace();
    let _foundation = f.next()?;
    let component = f.next()?;
    let transport = f.next()?.to_ascii_lowercase();
    let _priority = f.next()?;
    let address = f.next()?.to_ascii_lowercase();
    let port = f.next()?;
    Some(format!("{component} {transport} {address} {port}"))
}

/// The distinct remote candidates one connection was given.
#[derive(Debug, Default)]
pub(crate) struct CandidateSet {
    keys: HashSet<String>,
}

impl CandidateSet {
    /// How many of `keys` are not known yet.
    fn new_count(&self, keys: &[String]) -> usize {
        keys.iter().filter(|k| !self.keys.contains(*k)).count()
    }

    /// Whether `keys` fit under `max` together with the known ones; changes nothing.
    pub(crate) fn check(&self, keys: &[String], max: usize) -> Result<(), LimitError> {
        let got = self.keys.len() + self.new_count(keys);
        if got > max {
            return Err(LimitError::Candidates { got, max });
        }
        Ok(())
    }

    /// Remembers `keys` (after [`CandidateSet::check`] passed and the change was applied).
    pub(crate) fn add(&mut self, keys: impl IntoIterator<Item = String>) {
        self.keys.extend(keys);
    }

    /// Distinct candidates known.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

impl MediaLimits {
    /// Checks the size of an offer or answer.
    pub(crate) fn check_size(&self, sdp: &str) -> Result<(), LimitError> {
        if sdp.len() > self.max_sdp_bytes {
            return Err(LimitError::SdpBytes {
                got: sdp.len(),
                max: self.max_sdp_bytes,
            });
        }
        Ok(())
    }

    /// Checks a publisher offer against every limit, `known` being its connection's candidates
    /// so far (empty for a new connection). Returns the summary for [`CandidateSet::add`].
    pub(crate) fn check_offer(
        &self,
        sdp: &str,
        known: Option<&CandidateSet>,
    ) -> Result<SdpSummary, LimitError> {
        self.check_size(sdp)?;
        let s = summarize(sdp);
        if let Some(pt) = s.pt_conflict {
            return Err(LimitError::PayloadType { pt });
        }
        if s.mlines > self.max_mlines {
            return Err(LimitError::Mlines {
                got: s.mlines,
                max: self.max_mlines,
            });
        }
        if s.sending > self.max_tracks {
            return Err(LimitError::Tracks {
                got: s.sending,
                max: self.max_tracks,
            });
        }
        known
            .unwrap_or(&CandidateSet::default())
            .check(&s.candidates, self.max_candidates)?;
        Ok(s)
    }

    /// Checks a subscriber answer: size and candidates (its m-lines mirror the server's offer).
    pub(crate) fn check_answer(
        &self,
        sdp: &str,
        known: &CandidateSet,
    ) -> Result<SdpSummary, LimitError> {
        self.check_size(sdp)?;
        let s = summarize(sdp);
        if let Some(pt) = s.pt_conflict {
            return Err(LimitError::PayloadType { pt });
        }
        known.check(&s.candidates, self.max_candidates)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MediaLimits = MediaLimits {
        max_sdp_bytes: 4096,
        max_mlines: 3,
        max_tracks: 2,
        max_candidates: 2,
    };

    fn section(kind: &str, port: u16, dir: &str, cands: &[u16]) -> String {
        let mut s =
            format!("m={kind} {port} UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na={dir}\r\n");
        for p in cands {
            s.push_str(&format!(
                "a=candidate:1 1 udp 2130706431 127.0.0.1 {p} typ host\r\n"
            ));
        }
        s
    }

    fn offer(sections: &[String]) -> String {
        let mut s = String::from("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
        for x in sections {
            s.push_str(x);
        }
        s
    }

    #[test]
    fn sdp_size_is_refused_just_over_the_limit_and_accepted_at_it() {
        let at = "x".repeat(LIMITS.max_sdp_bytes);
        assert_eq!(LIMITS.check_size(&at), Ok(()));
        let over = "x".repeat(LIMITS.max_sdp_bytes + 1);
        let e = LIMITS.check_size(&over).unwrap_err();
        assert_eq!(
            e,
            LimitError::SdpBytes {
                got: 4097,
                max: 4096
            }
        );
        assert!(e.to_string().contains("media.max_sdp_bytes"));
        assert!(
            LIMITS
                .check_answer(&over, &CandidateSet::default())
                .is_err()
        );
        assert!(LIMITS.check_offer(&over, None).is_err());
    }

    #[test]
    fn mlines_are_refused_just_over_the_limit_and_accepted_at_it() {
        // Inactive and stopped sections count as m-lines but not as tracks.
        let at = offer(&[
            section("audio", 9, "sendonly", &[]),
            section("video", 9, "inactive", &[]),
            section("video", 0, "sendonly", &[]),
        ]);
        let s = LIMITS
            .check_offer(&at, None)
            .expect("three m-lines are allowed");
        assert_eq!((s.mlines, s.sending), (3, 1));
        let over = offer(&[
            section("audio", 9, "recvonly", &[]),
            section("video", 9, "recvonly", &[]),
            section("application", 9, "sendrecv", &[]),
            section("video", 9, "recvonly", &[]),
        ]);
        assert_eq!(
            LIMITS.check_offer(&over, None),
            Err(LimitError::Mlines { got: 4, max: 3 })
        );
    }

    #[test]
    fn tracks_are_refused_just_over_the_limit_and_accepted_at_it() {
        let at = offer(&[
            section("audio", 9, "sendrecv", &[]),
            section("video", 9, "sendonly", &[]),
            section("application", 9, "sendrecv", &[]),
        ]);
        assert_eq!(LIMITS.check_offer(&at, None).map(|s| s.sending), Ok(2));
        let over = offer(&[
            section("audio", 9, "sendrecv", &[]),
            section("video", 9, "sendonly", &[]),
            section("video", 0, "sendonly", &[])
                .replace("a=sendonly", "a=sendonly\r\na=bundle-only"),
        ]);
        assert_eq!(
            LIMITS.check_offer(&over, None),
            Err(LimitError::Tracks { got: 3, max: 2 })
        );
        // Without a direction attribute a section is sendrecv, unless the session level says
        // otherwise.
        let bare = offer(&[
            "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".into(),
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n".into(),
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n".into(),
        ]);
        assert!(matches!(
            LIMITS.check_offer(&bare, None),
            Err(LimitError::Tracks { got: 3, .. })
        ));
        let recv = bare.replace("t=0 0\r\n", "t=0 0\r\na=recvonly\r\n");
        assert_eq!(LIMITS.check_offer(&recv, None).map(|s| s.sending), Ok(0));
    }

    #[test]
    fn remote_candidates_are_refused_just_over_the_limit_and_accepted_at_it() {
        // Two distinct candidates, one repeated in another section: two.
        let at = offer(&[
            section("audio", 9, "sendonly", &[5000, 5001]),
            section("video", 9, "sendonly", &[5000]),
        ]);
        let s = LIMITS.check_offer(&at, None).expect("two candidates");
        assert_eq!(s.candidates.len(), 2);
        let mut known = CandidateSet::default();
        known.add(s.candidates);
        // A renegotiation repeating them is fine; a third one (trickled) is not.
        assert!(LIMITS.check_offer(&at, Some(&known)).is_ok());
        let third = vec![candidate_key("candidate:2 1 UDP 1 127.0.0.1 5002 typ host").unwrap()];
        assert_eq!(
            known.check(&third, LIMITS.max_candidates),
            Err(LimitError::Candidates { got: 3, max: 2 })
        );
        let again = vec![candidate_key("a=candidate:9 1 UDP 7 127.0.0.1 5001 typ host").unwrap()];
        assert_eq!(known.check(&again, LIMITS.max_candidates), Ok(()));
        assert_eq!(known.len(), 2);
        let over = offer(&[section("audio", 9, "sendonly", &[1, 2, 3])]);
        assert!(matches!(
            LIMITS.check_offer(&over, None),
            Err(LimitError::Candidates { got: 3, max: 2 })
        ));
        assert!(matches!(
            LIMITS.check_answer(&over, &CandidateSet::default()),
            Err(LimitError::Candidates { .. })
        ));
    }

    #[test]
    fn candidate_keys_ignore_foundation_and_priority() {
        assert_eq!(
            candidate_key("candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"),
            candidate_key("a=candidate:7 1 UDP 1 127.0.0.1 5000 typ host generation 0")
        );
        assert_ne!(
            candidate_key("candidate:1 1 udp 1 127.0.0.1 5000 typ host"),
            candidate_key("candidate:1 1 udp 1 127.0.0.1 5001 typ host")
        );
        assert_eq!(candidate_key("candidate:1 1 udp"), None);
        assert_eq!(candidate_key(""), None);
    }

    #[test]
    fn one_payload_type_with_two_descriptions_is_refused_and_identical_ones_are_not() {
        let audio = |extra: &str| {
            format!("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n{extra}")
        };
        let video = |extra: &str| {
            format!(
                "m=video 9 UDP/TLS/RTP/SAVPF 96 98\r\na=rtpmap:96 VP8/90000\r\n\
                 a=rtpmap:98 H264/90000\r\na=fmtp:98 packetization-mode=1\r\n{extra}"
            )
        };
        // The fuzz find: the same number without its fmtp in another section.
        let bad = offer(&[audio("a=rtpmap:98 H264/90000\r\n"), video("")]);
        assert_eq!(
            LIMITS.check_offer(&bad, None).unwrap_err(),
            LimitError::PayloadType { pt: 98 }
        );
        assert_eq!(summarize(&bad).pt_conflict, Some(98));
        // Another codec under a number already taken, and a second fmtp in one section.
        let bad = offer(&[audio("a=rtpmap:96 H264/90000\r\n"), video("")]);
        assert_eq!(summarize(&bad).pt_conflict, Some(96));
        let bad = offer(&[video("a=fmtp:98 packetization-mode=0\r\n")]);
        assert_eq!(summarize(&bad).pt_conflict, Some(98));
        assert_eq!(
            LIMITS
                .check_answer(&bad, &CandidateSet::default())
                .unwrap_err(),
            LimitError::PayloadType { pt: 98 }
        );
        // Two video sections with the same payload types (a browser's camera and screen share),
        // the encoding name in another case, and a section that does not describe the number.
        let twin = video("").replace("H264", "h264");
        let good = offer(&[audio(""), video(""), twin]);
        assert_eq!(summarize(&good).pt_conflict, None);
        let two = offer(&[audio(""), video("")]);
        assert!(LIMITS.check_offer(&two, None).is_ok());
        assert!(
            LimitError::PayloadType { pt: 98 }
                .to_string()
                .contains("payload type 98")
        );
    }
}
