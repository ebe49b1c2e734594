//! Every metric name and label in one place (as LiveKit's `telemetry/prometheus` does).
//!
//! Code elsewhere records through these constants only, so the set of series an operator can scrape is
//! reviewable here. No metric carries a per-user or per-call label: label values are bounded enums
//! (reason, state, code, op, tier, kind).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// Signaling.
/// Gauge: WebSocket sessions currently connected.
pub const SESSIONS_CONNECTED: &str = "switchboard_sessions_connected";
/// Gauge: users with at least one live session.
pub const USERS_ONLINE: &str = "switchboard_users_online";
/// Counter: calls created.
pub const CALLS_STARTED: &str = "switchboard_calls_started_total";
/// Counter: calls ended, label `reason`.
pub const CALLS_ENDED: &str = "switchboard_calls_ended_total";
/// Gauge: calls currently started.
pub const CALLS_ACTIVE: &str = "switchboard_calls_active";
/// Counter: invitees reaching a final state, label `state` (accepted, rejected, busy, cancelled, timeout).
pub const INVITEE_OUTCOMES: &str = "switchboard_invitee_outcomes_total";
/// Histogram: seconds from receiving an op to queueing its reply, label `op`.
pub const OP_LATENCY: &str = "switchboard_op_duration_seconds";
/// Counter: error replies, label `code`.
pub const ERRORS: &str = "switchboard_errors_total";
/// Counter: sessions closed by the server, label `reason` (heartbeat, oversize, binary, shutdown, replaced).
pub const SESSIONS_CLOSED: &str = "switchboard_sessions_closed_total";

// Storage.
/// Histogram: seconds per storage batch commit.
pub const STORAGE_COMMIT: &str = "switchboard_storage_commit_seconds";
/// Histogram: jobs (ops, reads, ledger writes) per storage batch; one transaction per batch.
pub const STORAGE_BATCH: &str = "switchboard_storage_batch_jobs";
/// Counter: storage failures, label `op`.
pub const STORAGE_ERRORS: &str = "switchboard_storage_errors_total";

// Media.
/// Gauge: rooms open.
pub const ROOMS: &str = "switchboard_rooms";
/// Gauge: participants joined in rooms.
pub const PARTICIPANTS: &str = "switchboard_participants";
/// Gauge: tracks published, label `kind`.
pub const TRACKS: &str = "switchboard_tracks";
/// Counter: RTP packets received from publishers.
pub const PACKETS_IN: &str = "switchboard_rtp_packets_in_total";
/// Counter: RTP bytes received from publishers.
pub const BYTES_IN: &str = "switchboard_rtp_bytes_in_total";
/// Counter: RTP packets written to subscribers (forwarded).
pub const PACKETS_FORWARDED: &str = "switchboard_rtp_packets_forwarded_total";
/// Counter: RTP payload bytes written to subscribers.
pub const BYTES_FORWARDED: &str = "switchboard_rtp_bytes_forwarded_total";
/// Counter: UDP datagrams sent.
pub const PACKETS_OUT: &str = "switchboard_udp_packets_out_total";
/// Counter: UDP bytes sent.
pub const BYTES_OUT: &str = "switchboard_udp_bytes_out_total";
/// Counter: RTP packets dropped, label `reason`.
pub const PACKETS_DROPPED: &str = "switchboard_rtp_packets_dropped_total";
/// Counter: NACKs received from subscribers.
pub const NACKS: &str = "switchboard_nacks_total";
/// Counter: keyframe requests (PLI/FIR) sent to publishers.
pub const PLIS: &str = "switchboard_keyframe_requests_total";
/// Counter: RTX retransmissions sent.
pub const RTX: &str = "switchboard_rtx_packets_total";
/// Counter: simulcast layer switches.
pub const LAYER_SWITCHES: &str = "switchboard_layer_switches_total";
/// Histogram: seconds a packet spends inside the server, receive to send.
pub const PACKET_DWELL: &str = "switchboard_packet_dwell_seconds";

// Billing.
/// Counter: billed seconds, label `tier`.
pub const BILLED_SECONDS: &str = "switchboard_billed_seconds_total";
/// Gauge: users currently metered in each tier, label `tier`.
pub const USERS_IN_TIER: &str = "switchboard_users_in_tier";
/// Gauge: published video layers by resolution class, label `class`.
pub const LAYERS_BY_CLASS: &str = "switchboard_layers_by_resolution";

// Webhooks.
/// Counter: webhook deliveries, label `result` (ok, retry, failed).
pub const WEBHOOK_DELIVERIES: &str = "switchboard_webhook_deliveries_total";
/// Gauge: events waiting in the webhook outbox.
pub const WEBHOOK_BACKLOG: &str = "switchboard_webhook_backlog";

// Process.
/// Gauge: process CPU seconds (user + system), sampled at scrape time.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Gauge: resident memory in bytes, sampled at scrape time.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";

/// Buckets for sub-millisecond latencies (packet dwell): 10 µs to 50 ms.
const DWELL_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
];
/// Buckets for storage batch sizes.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];
/// Buckets for op latencies: 50 µs to 1 s.
const OP_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns a handle that renders the text format.
/// Later calls (several servers in one test process) share the first recorder.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(PACKET_DWELL.into()), DWELL_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(OP_LATENCY.into()), OP_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(STORAGE_BATCH.into()), BATCH_BUCKETS)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a test harness); the handle then
            // renders an empty registry, which is still valid text format.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Renders the registry plus process gauges read from /proc at this moment.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some((cpu, rss)) = process_usage() {
        metrics::gauge!(PROCESS_CPU).set(cpu);
        metrics::gauge!(PROCESS_RSS).set(rss as f64);
    }
    handle.render()
}

/// This process's CPU seconds (user + system) and resident bytes, from /proc/self.
pub fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Some(((utime + stime) / ticks.max(1.0), rss_pages * page))
}
