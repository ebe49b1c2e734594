//! The forwarding decision for one consumer (LiveKit's `Forwarder::GetTranslationParams`): a
//! pure function of the consumer's state and one incoming packet, tested without a network.
//!
//! A consumer forwards one layer of its producer track at a time (`current`) and may be asked to
//! move to another (`target`, chosen by the layer selector or set to the only layer). Rules:
//!
//! - A paused consumer (or one with no target) forwards nothing.
//! - Video starts, resumes and switches layer only on a packet that starts a keyframe of the
//!   target layer; until then it keeps forwarding the current layer (if any) and drops the
//!   rest. While it waits, [`Decision::Drop`] says [`DropReason::WaitingForKeyframe`] so the
//!   shell can ask the publisher for one (throttled by [`super::keyframe::KeyframeThrottle`]).
//! - Audio has one layer and needs no keyframe: it starts or resumes on any packet.
//!
//! [`Decision::Forward`] with `switched: true` tells the shell to re-base the rewriter on this
//! packet and to report the new forwarding state for billing.

/// What is being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// One layer, no keyframes.
    Audio,
    /// One or more simulcast layers; switching needs a keyframe.
    Video,
}

/// What the shell knows about an incoming packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Index of the layer (producer) the packet belongs to.
    pub layer: usize,
    /// Whether the packet is the first packet of a keyframe.
    pub keyframe_start: bool,
}

/// The decision for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Forward {
        /// This packet begins a new source (start, resume or layer switch): re-base the
        /// rewriter on it.
        switched: bool,
    },
    /// Do not forward it.
    Drop(DropReason),
}

/// Why a packet is not forwarded (also the `reason` label of the dropped-packets metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber paused the track, or no layer is selected.
    Paused,
    /// The packet belongs to a layer this consumer does not forward.
    OtherLayer,
    /// The target layer is selected but its next keyframe has not arrived.
    WaitingForKeyframe,
}

impl DropReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::OtherLayer => "other_layer",
            Self::WaitingForKeyframe => "waiting_keyframe",
        }
    }
}

/// The forwarding state of one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarder {
    kind: MediaKind,
    paused: bool,
    current: Option<usize>,
    target: Option<usize>,
}

impl Forwarder {
    /// A consumer that starts unpaused, targeting `target` (normally the layer selector's pick).
    pub fn new(kind: MediaKind, target: Option<usize>) -> Self {
        Self {
            kind,
            paused: false,
            current: None,
            target,
        }
    }

    /// The layer being forwarded now, if any.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// The layer the consumer wants to forward.
    pub fn target(&self) -> Option<usize> {
        self.target
    }

    /// Whether the subscriber paused the track.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Whether the consumer is waiting for a keyframe of its target layer (start, resume or
    /// switch pending).
    pub fn needs_keyframe(&self) -> bool {
        self.kind == MediaKind::Video
            && !self.paused
            && self.target.is_some()
            && self.target != self.current
    }

    /// Chooses the layer to move to. Returns true when this starts a pending switch (the shell
    /// should request a keyframe of the new target).
    pub fn set_target(&mut self, target: Option<usize>) -> bool {
        if self.target == target {
            return false;
        }
        self.target = target;
        if target.is_none() {
            self.current = None;
        }
        self.needs_keyframe()
    }

    /// Pauses or resumes. Pausing stops forwarding at once; resuming waits for the target's
    /// next keyframe (video) or the next packet (audio). Returns true when forwarding stopped.
    pub fn set_paused(&mut self, paused: bool) -> bool {
        if self.paused == paused {
            return false;
        }
        self.paused = paused;
        let was_forwarding = self.current.is_some();
        self.current = None;
        paused && was_forwarding
    }

    /// Decides what to do with one packet.
    pub fn decide(&mut self, pkt: PacketInfo) -> Decision {
        let Some(target) = self.target.filter(|_| !self.paused) else {
            return Decision::Drop(DropReason::Paused);
        };
        if self.current == Some(pkt.layer) {
            return Decision::Forward { switched: false };
        }
        if pkt.layer != target {
            return Decision::Drop(DropReason::OtherLayer);
        }
        if self.kind == MediaKind::Video && !pkt.keyframe_start {
            // Keep forwarding `current` (if any) until the target's keyframe arrives.
            return Decision::Drop(DropReason::WaitingForKeyframe);
        }
        self.current = Some(target);
        Decision::Forward { switched: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(layer: usize, key: bool) -> PacketInfo {
        PacketInfo {
            layer,
            keyframe_start: key,
        }
    }

    const FWD: Decision = Decision::Forward { switched: false };
    const SWITCH: Decision = Decision::Forward { switched: true };

    #[test]
    fn video_starts_only_on_a_keyframe_of_the_target() {
        let mut f = Forwarder::new(MediaKind::Video, Some(1));
        assert!(f.needs_keyframe());
        assert_eq!(
            f.decide(p(1, false)),
            Decision::Drop(DropReason::WaitingForKeyframe)
        );
        assert_eq!(f.decide(p(0, true)), Decision::Drop(DropReason::OtherLayer));
        assert_eq!(f.decide(p(1, true)), SWITCH);
        assert!(!f.needs_keyframe());
        assert_eq!(f.decide(p(1, false)), FWD);
        assert_eq!(f.decide(p(2, true)), Decision::Drop(DropReason::OtherLayer));
        assert_eq!(f.current(), Some(1));
    }

    #[test]
    fn switching_layer_keeps_the_old_layer_until_the_new_one_has_a_keyframe() {
        let mut f = Forwarder::new(MediaKind::Video, Some(0));
        assert_eq!(f.decide(p(0, true)), SWITCH);
        assert!(f.set_target(Some(2)), "a switch needs a keyframe");
        assert_eq!(f.decide(p(0, false)), FWD, "old layer still flows");
        assert_eq!(
            f.decide(p(2, false)),
            Decision::Drop(DropReason::WaitingForKeyframe)
        );
        assert_eq!(f.decide(p(2, true)), SWITCH);
        assert_eq!(f.decide(p(0, true)), Decision::Drop(DropReason::OtherLayer));
        assert_eq!(f.decide(p(2, false)), FWD);
        assert!(!f.set_target(Some(2)), "same target is no change");
    }

    #[test]
    fn pause_stops_at_once_and_resume_waits_for_a_keyframe() {
        let mut f = Forwarder::new(MediaKind::Video, Some(0));
        assert!(!f.set_paused(true), "nothing was flowing yet");
        assert_eq!(f.decide(p(0, true)), Decision::Drop(DropReason::Paused));
        assert!(!f.set_paused(false));
        assert_eq!(f.decide(p(0, true)), SWITCH);
        assert!(f.set_paused(true), "forwarding stopped");
        assert_eq!(f.decide(p(0, false)), Decision::Drop(DropReason::Paused));
        assert!(!f.needs_keyframe(), "a paused consumer asks for nothing");
        f.set_paused(false);
        assert!(f.needs_keyframe());
        assert_eq!(
            f.decide(p(0, false)),
            Decision::Drop(DropReason::WaitingForKeyframe)
        );
        assert_eq!(f.decide(p(0, true)), SWITCH);
    }

    #[test]
    fn audio_needs_no_keyframe_and_resumes_on_any_packet() {
        let mut f = Forwarder::new(MediaKind::Audio, Some(0));
        assert!(!f.needs_keyframe());
        assert_eq!(f.decide(p(0, false)), SWITCH);
        assert_eq!(f.decide(p(0, false)), FWD);
        f.set_paused(true);
        assert_eq!(f.decide(p(0, false)), Decision::Drop(DropReason::Paused));
        f.set_paused(false);
        assert_eq!(f.decide(p(0, false)), SWITCH);
    }

    #[test]
    fn no_target_forwards_nothing() {
        let mut f = Forwarder::new(MediaKind::Video, None);
        assert_eq!(f.decide(p(0, true)), Decision::Drop(DropReason::Paused));
        assert!(f.set_target(Some(0)));
        assert_eq!(f.decide(p(0, true)), SWITCH);
        assert!(!f.set_target(None));
        assert_eq!(f.current(), None);
        assert_eq!(f.decide(p(0, true)), Decision::Drop(DropReason::Paused));
    }
}
