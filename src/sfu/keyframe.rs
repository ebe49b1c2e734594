//! Keyframe-request throttle: at most one PLI/FIR per published layer per interval, however many
//! subscribers ask. Pure, time passed in.

use std::time::{Duration, Instant};

/// The interval the project uses: one request per layer per 500 ms.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);

/// Throttles keyframe requests for one layer.
#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    interval: Duration,
    last: Option<Instant>,
}

impl Default for KeyframeThrottle {
    fn default() -> Self {
        Self::new(KEYFRAME_INTERVAL)
    }
}

impl KeyframeThrottle {
    /// A throttle letting one request through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// Whether a request may go to the publisher now; records it if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_per_interval_on_a_virtual_clock() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = KeyframeThrottle::default();
        assert!(t.allow(ms(0)));
        assert!(!t.allow(ms(1)));
        assert!(!t.allow(ms(499)));
        assert!(t.allow(ms(500)));
        assert!(!t.allow(ms(700)));
        assert!(t.allow(ms(1000)));
        // Twenty subscribers asking within 100 ms produce one request.
        let allowed = (0..20).filter(|i| t.allow(ms(1600 + i * 5))).count();
        assert_eq!(allowed, 1);
    }

    #[test]
    fn a_clock_that_goes_backwards_does_not_open_the_throttle() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut t = KeyframeThrottle::default();
        assert!(t.allow(t0));
        assert!(!t.allow(t0 - Duration::from_secs(5)));
    }
}
