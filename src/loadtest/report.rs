//! The arithmetic of load reports, kept pure so it is tested on its own: percentiles, loss from
//! sequence numbers, and the server's CPU time per forwarded packet and memory per layer or
//! subscription from two samples of its `/metrics`.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a distribution, in the unit its histogram recorded.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 95th.
    pub p95: u64,
    /// 99th.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// Values recorded.
    pub count: u64,
}

impl Percentiles {
    /// Reads the percentiles of a histogram (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.5),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            count: h.len(),
        }
    }
}

/// A histogram for latencies from 1 to 60 s (in µs) with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; fall back to an auto-resizing one.
    // Both constructors fail only for invalid constant arguments, which these are not.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .expect("valid histogram bounds")
}

/// Counts received packets of one RTP stream and the sequence numbers they span, across 16-bit
/// wraparound, to tell how many were lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqTracker {
    first: Option<u64>,
    highest: u64,
    received: u64,
}

impl SeqTracker {
    /// Records one received sequence number. Reordered packets extend nothing; duplicates
    /// count as received (loss is then underestimated, as RTCP receiver reports do).
    pub fn push(&mut self, seq: u16) {
        self.received += 1;
        let Some(_) = self.first else {
            self.first = Some(u64::from(seq) + (1 << 16));
            self.highest = u64::from(seq) + (1 << 16);
            return;
        };
        // Extend to the candidate nearest the highest seen.
        let cycle = self.highest & !0xffff;
        let mut ext = cycle | u64::from(seq);
        if ext + 0x8000 < self.highest {
            ext += 1 << 16;
        } else if ext > self.highest + 0x8000 && ext >= 1 << 16 {
            ext -= 1 << 16;
        }
        if ext > self.highest {
            self.highest = ext;
        }
        if let Some(f) = self.first
            && ext < f
        {
            self.first = Some(ext);
        }
    }

    /// Packets the span from the first to the highest sequence number holds.
    pub fn expected(&self) -> u64 {
        self.first.map_or(0, |f| self.highest - f + 1)
    }

    /// Packets received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Expected but not received.
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }
}

/// What the load generator reads from the server's `/metrics` at one instant.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct ServerSample {
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
    /// `switchboard_rtp_packets_forwarded_total` (for other servers: packets the subscribers
    /// received, which is what they forwarded).
    pub forwarded: u64,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: u64,
}

impl ServerSample {
    /// Reads the three values from Prometheus text; a missing counter reads as 0 (the server
    /// has not forwarded anything yet), a missing process gauge as `None`.
    pub fn from_prometheus(text: &str) -> Option<Self> {
        Some(Self {
            cpu_seconds: metric_value(text, crate::metrics::PROCESS_CPU)?,
            forwarded: metric_value(text, crate::metrics::PACKETS_FORWARDED).unwrap_or(0.0) as u64,
            rss_bytes: metric_value(text, crate::metrics::PROCESS_RSS)? as u64,
        })
    }
}

/// The value of an unlabelled metric in Prometheus text (or of its first series, when the server
/// labels every series, as a cluster's nodes do with `node`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let v = match rest.strip_prefix('{') {
            Some(labels) => labels.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Server CPU microseconds per forwarded packet between two samples (None when nothing was
/// forwarded or the counters went backwards, e.g. a restart).
pub fn cpu_us_per_packet(start: &ServerSample, end: &ServerSample) -> Option<f64> {
    let packets = end.forwarded.checked_sub(start.forwarded)?;
    let cpu = end.cpu_seconds - start.cpu_seconds;
    if packets == 0 || cpu < 0.0 {
        return None;
    }
    Some(cpu * 1e6 / packets as f64)
}

/// Share of one core the server used between two samples `secs` apart.
pub fn cpu_share(start: &ServerSample, end: &ServerSample, secs: f64) -> Option<f64> {
    let cpu = end.cpu_seconds - start.cpu_seconds;
    (secs > 0.0 && cpu >= 0.0).then(|| cpu / secs)
}

/// Resident memory added per item between two samples (signed: the allocator may return
/// memory), None for zero items.
pub fn bytes_per(before: u64, after: u64, items: u64) -> Option<f64> {
    (items > 0).then(|| (after as f64 - before as f64) / items as f64)
}

/// `lost / expected` as a fraction (0 when nothing was expected).
pub fn loss_fraction(lost: u64, expected: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        lost as f64 / expected as f64
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_metric_is_read_with_or_without_a_node_label() {
        let text = "# HELP x y\nswitchboard_a_total 3\nswitchboard_b_total{node=\"n1\"} 7\n";
        assert_eq!(super::metric_value(text, "switchboard_a_total"), Some(3.0));
        assert_eq!(super::metric_value(text, "switchboard_b_total"), Some(7.0));
        assert_eq!(super::metric_value(text, "switchboard_b"), None);
    }

    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p95, 950);
        assert_eq!(p.p99, 990);
        assert_eq!(p.max, 1000);
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn cpu_per_packet_from_two_metrics_samples() {
        let a = ServerSample::from_prometheus(
            "# HELP process_cpu_seconds_total cpu\n# TYPE process_cpu_seconds_total gauge\n\
             process_cpu_seconds_total 10.5\nprocess_resident_memory_bytes 1000000\n\
             switchboard_rtp_packets_forwarded_total 1000\n\
             switchboard_rtp_packets_forwarded_total_other 5\n",
        )
        .unwrap();
        let b = ServerSample::from_prometheus(
            "switchboard_rtp_packets_forwarded_total 201000\nprocess_cpu_seconds_total 11.5\n\
             process_resident_memory_bytes 3000000\n",
        )
        .unwrap();
        assert_eq!(a.forwarded, 1000);
        assert_eq!(b.rss_bytes, 3_000_000);
        // 1 s of CPU for 200,000 packets: 5 µs each.
        let us = cpu_us_per_packet(&a, &b).unwrap();
        assert!((us - 5.0).abs() < 1e-9, "{us}");
        assert!((cpu_share(&a, &b, 2.0).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(cpu_us_per_packet(&b, &a), None, "counters went backwards");
        assert_eq!(cpu_us_per_packet(&a, &a), None, "nothing forwarded");
        assert_eq!(bytes_per(1_000_000, 3_000_000, 4), Some(500_000.0));
        assert_eq!(bytes_per(1, 2, 0), None);
    }

    #[test]
    fn a_server_that_forwarded_nothing_yet_reads_zero() {
        let s = ServerSample::from_prometheus(
            "process_cpu_seconds_total 1\nprocess_resident_memory_bytes 2\n",
        )
        .unwrap();
        assert_eq!(s.forwarded, 0);
        assert_eq!(ServerSample::from_prometheus("nothing 1\n"), None);
    }

    #[test]
    fn loss_counts_gaps_across_wraparound() {
        let mut t = SeqTracker::default();
        for s in (65_530u16..=65_535).chain(0..10) {
            if s != 2 && s != 65_533 {
                t.push(s);
            }
        }
        assert_eq!(t.expected(), 16);
        assert_eq!(t.received(), 14);
        assert_eq!(t.lost(), 2);
        assert!((loss_fraction(t.lost(), t.expected()) - 0.125).abs() < 1e-12);
        assert_eq!(loss_fraction(0, 0), 0.0);
    }

    #[test]
    fn reordering_is_not_loss() {
        let mut t = SeqTracker::default();
        for s in [10u16, 12, 11, 13, 9] {
            t.push(s);
        }
        assert_eq!((t.expected(), t.lost()), (5, 0));
        let mut w = SeqTracker::default();
        for s in [1u16, 0, 65_535, 2] {
            w.push(s);
        }
        assert_eq!((w.expected(), w.lost()), (4, 0));
    }
}
