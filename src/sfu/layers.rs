//! Simulcast layer selection for one consumer: a pure function of the layers' measured state, the
//! subscriber's bandwidth estimate and its `rtc_subscription` cap, with hysteresis.
//!
//! Rules, in order:
//! 1. Only active layers (receiving packets) are candidates; none active: no selection.
//! 2. The cap (`max_width`/`max_height`) keeps the layers whose *measured* resolution fits. A layer
//!    not measured yet does not fit a cap (unless no layer is measured: then the lowest one is
//!    taken, the safe side). When nothing fits, the lowest candidate is used: a subscriber that
//!    asked for tiny video still gets video.
//! 3. Bandwidth: without an estimate, the best layer the cap allows. With one, the best layer whose
//!    measured bitrate fits the estimate; none fits: the lowest.
//! 4. Hysteresis: moving *up* for bandwidth needs the estimate to exceed the higher layer's
//!    bitrate by [`UPGRADE_HEADROOM`] continuously for [`UPGRADE_HOLD`]; moving down (bandwidth
//!    or cap) and cap-driven moves up happen at once.
//!
//! Layers are given lowest quality first.

use std::time::{Duration, Instant};

/// Estimate must exceed a higher layer's bitrate by this factor to move up.
pub const UPGRADE_HEADROOM: f64 = 1.2;
/// ...for this long.
pub const UPGRADE_HOLD: Duration = Duration::from_secs(2);

/// What the selector knows of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerState {
    /// Measured width (0: not yet measured).
    pub width: u32,
    /// Measured height (0: not yet measured).
    pub height: u32,
    /// Measured bitrate in bits per second (0: unknown).
    pub bitrate: u64,
    /// Whether packets are arriving on this layer.
    pub active: bool,
}

impl LayerState {
    fn measured(&self) -> bool {
        self.width > 0 && self.height > 0
    }
}

/// The subscriber's resolution cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap {
    /// Largest width wanted.
    pub max_width: Option<u32>,
    /// Largest height wanted.
    pub max_height: Option<u32>,
}

impl Cap {
    fn is_set(&self) -> bool {
        self.max_width.is_some() || self.max_height.is_some()
    }

    fn fits(&self, l: &LayerState) -> bool {
        l.measured()
            && self.max_width.is_none_or(|w| l.width <= w)
            && self.max_height.is_none_or(|h| l.height <= h)
    }
}

/// Layer selector state for one consumer.
#[derive(Debug, Clone, Default)]
pub struct LayerSelector {
    current: Option<usize>,
    upgrade_since: Option<(usize, Instant)>,
}

/// What a consumer wants of the subscriber's bandwidth, for the estimator's probing
/// (str0m's `Bwe::set_bitrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wanted {
    /// Bits per second of the layer one step above `current` (or `current` at the top): what
    /// padding should sustain so that the estimate can grow into the next layer.
    pub next: u64,
    /// Bits per second of the best layer the cap allows: what to probe for.
    pub best: u64,
}

/// The bitrates a consumer forwarding layer `current` of `layers` (lowest first) under `cap`
/// would move up to. Unmeasured bitrates count as 0. Pure.
pub fn wanted(layers: &[LayerState], cap: Cap, current: Option<usize>) -> Wanted {
    let active: Vec<usize> = (0..layers.len())
        .filter(|&i| layers.get(i).is_some_and(|l| l.active))
        .collect();
    let Some(&lowest) = active.first() else {
        return Wanted::default();
    };
    let rate = |i: usize| layers.get(i).map_or(0, |l| l.bitrate);
    let best = if cap.is_set() {
        active
            .iter()
            .copied()
            .rfind(|&i| layers.get(i).is_some_and(|l| cap.fits(l)))
            .unwrap_or(lowest)
    } else {
        active.last().copied().unwrap_or(lowest)
    };
    let cur = current.filter(|c| active.contains(c)).unwrap_or(lowest);
    let next = active
        .iter()
        .copied()
        .find(|&i| i > cur && i <= best)
        .unwrap_or(cur.min(best));
    Wanted {
        next: rate(next),
        best: rate(best),
    }
}

impl LayerSelector {
    /// The last selection.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Picks the layer to forward now.
    pub fn select(
        &mut self,
        layers: &[LayerState],
        estimate_bps: Option<u64>,
        cap: Cap,
        now: Instant,
    ) -> Option<usize> {
        let active: Vec<usize> = (0..layers.len())
            .filter(|&i| layers.get(i).is_some_and(|l| l.active))
            .collect();
        let lowest = *active.first()?;
        let layer = |i: usize| layers.get(i).copied().unwrap_or_default();

        // 2. The best layer the cap allows.
        let cap_best = if cap.is_set() {
            active
                .iter()
                .copied()
                .rfind(|&i| cap.fits(&layer(i)))
                .unwrap_or(lowest)
        } else {
            *active.last().unwrap_or(&lowest)
        };
        let allowed: Vec<usize> = active.iter().copied().filter(|&i| i <= cap_best).collect();

        // 3. The best allowed layer the bandwidth carries.
        let fits_bw = |i: usize, factor: f64| match estimate_bps {
            None => true,
            Some(bw) => {
                let b = layer(i).bitrate;
                b == 0 || (b as f64) * factor <= bw as f64
            }
        };
        let bw_best = allowed
            .iter()
            .copied()
            .rfind(|&i| fits_bw(i, 1.0))
            .unwrap_or(lowest);

        // 4. Hysteresis on bandwidth-driven upgrades.
        let chosen = match self.current.filter(|c| allowed.contains(c)) {
            Some(cur) if bw_best > cur && estimate_bps.is_some() => {
                let up = allowed
                    .iter()
                    .copied()
                    .rfind(|&i| i > cur && fits_bw(i, UPGRADE_HEADROOM));
                match up {
                    Some(up) => match self.upgrade_since {
                        Some((cand, since)) if cand == up => {
                            if now.saturating_duration_since(since) >= UPGRADE_HOLD {
                                self.upgrade_since = None;
                                up
                            } else {
                                cur
                            }
                        }
                        _ => {
                            self.upgrade_since = Some((up, now));
                            cur
                        }
                    },
                    None => {
                        self.upgrade_since = None;
                        cur
                    }
                }
            }
            _ => {
                self.upgrade_since = None;
                bw_best
            }
        };
        self.current = Some(chosen);
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(w: u32, h: u32, kbps: u64) -> LayerState {
        LayerState {
            width: w,
            height: h,
            bitrate: kbps * 1000,
            active: true,
        }
    }

    fn three() -> Vec<LayerState> {
        vec![l(320, 180, 150), l(640, 360, 500), l(1280, 720, 1500)]
    }

    const NO_CAP: Cap = Cap {
        max_width: None,
        max_height: None,
    };

    #[test]
    fn wanted_names_the_next_layer_up_and_the_best_the_cap_allows() {
        let cap = |w, h| Cap {
            max_width: Some(w),
            max_height: Some(h),
        };
        // On the low layer, uncapped: pad toward 360p, probe for 720p.
        assert_eq!(
            wanted(&three(), NO_CAP, Some(0)),
            Wanted {
                next: 500_000,
                best: 1_500_000
            }
        );
        // At the top: nothing above.
        assert_eq!(wanted(&three(), NO_CAP, Some(2)).next, 1_500_000);
        // A 360p cap stops both at 360p.
        assert_eq!(
            wanted(&three(), cap(640, 360), Some(0)),
            Wanted {
                next: 500_000,
                best: 500_000
            }
        );
        assert_eq!(
            wanted(&three(), cap(640, 360), Some(1)),
            Wanted {
                next: 500_000,
                best: 500_000
            }
        );
        // Nothing forwarded yet counts from the lowest layer; an idle top layer is skipped.
        let mut idle_top = three();
        idle_top[2].active = false;
        assert_eq!(
            wanted(&idle_top, NO_CAP, None),
            Wanted {
                next: 500_000,
                best: 500_000
            }
        );
        assert_eq!(wanted(&[], NO_CAP, None), Wanted::default());
    }

    #[test]
    fn cap_selects_the_largest_layer_that_fits() {
        let t = Instant::now();
        let mut s = LayerSelector::default();
        let cap = |w, h| Cap {
            max_width: Some(w),
            max_height: Some(h),
        };
        assert_eq!(s.select(&three(), None, NO_CAP, t), Some(2));
        assert_eq!(s.select(&three(), None, cap(640, 360), t), Some(1));
        assert_eq!(s.select(&three(), None, cap(639, 1000), t), Some(0));
        assert_eq!(
            s.select(&three(), None, cap(100, 100), t),
            Some(0),
            "nothing fits: lowest"
        );
        let only_w = Cap {
            max_width: Some(1280),
            max_height: None,
        };
        assert_eq!(
            s.select(&three(), None, only_w, t),
            Some(2),
            "cap raise applies at once"
        );
    }

    #[test]
    fn unmeasured_layers_do_not_fit_a_cap_and_inactive_layers_are_skipped() {
        let t = Instant::now();
        let mut s = LayerSelector::default();
        let mut layers = three();
        layers[1].width = 0;
        layers[1].height = 0;
        let cap = Cap {
            max_width: Some(800),
            max_height: Some(800),
        };
        assert_eq!(s.select(&layers, None, cap, t), Some(0));
        layers[0].active = false;
        assert_eq!(
            s.select(&layers, None, cap, t),
            Some(1),
            "lowest active when nothing fits"
        );
        for x in &mut layers {
            x.active = false;
        }
        assert_eq!(s.select(&layers, None, cap, t), None);
    }

    #[test]
    fn bandwidth_drops_at_once_but_rises_only_after_a_sustained_margin() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = LayerSelector::default();
        assert_eq!(s.select(&three(), Some(3_000_000), NO_CAP, ms(0)), Some(2));
        assert_eq!(
            s.select(&three(), Some(600_000), NO_CAP, ms(100)),
            Some(1),
            "down at once"
        );
        assert_eq!(
            s.select(&three(), Some(100_000), NO_CAP, ms(200)),
            Some(0),
            "nothing fits"
        );
        // Enough for layer 2 with headroom, but it must last UPGRADE_HOLD.
        assert_eq!(
            s.select(&three(), Some(2_000_000), NO_CAP, ms(300)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(2_000_000), NO_CAP, ms(1_500)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(2_000_000), NO_CAP, ms(2_300)),
            Some(2)
        );
        // Fits without headroom only: no upgrade ever.
        let mut s = LayerSelector::default();
        assert_eq!(s.select(&three(), Some(160_000), NO_CAP, ms(0)), Some(0));
        assert_eq!(
            s.select(&three(), Some(550_000), NO_CAP, ms(5_000)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(550_000), NO_CAP, ms(9_000)),
            Some(0)
        );
    }

    #[test]
    fn an_interrupted_upgrade_starts_its_hold_again() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = LayerSelector::default();
        s.select(&three(), Some(200_000), NO_CAP, ms(0));
        assert_eq!(s.select(&three(), Some(700_000), NO_CAP, ms(100)), Some(0));
        assert_eq!(
            s.select(&three(), Some(200_000), NO_CAP, ms(1_000)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(700_000), NO_CAP, ms(1_500)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(700_000), NO_CAP, ms(2_200)),
            Some(0)
        );
        assert_eq!(
            s.select(&three(), Some(700_000), NO_CAP, ms(3_500)),
            Some(1)
        );
    }
}
