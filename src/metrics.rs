//! Every metric name and label in one place (as LiveKit's `telemetry/prometheus` does).
//!
//! Code elsewhere records through these constants only, so the set of series an operator can scrape is
//! reviewable here. No metric carries a per-user or per-call label: label values are bounded enums
//! (reason, state, code, op, tier, kind).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution.
    Histogram,
}

macro_rules! metrics {
    ($($kind:ident $name:ident = $value:literal, $help:literal;)*) => {
        $(#[doc = concat!(stringify!($kind), ": ", $help)]
        pub const $name: &str = $value;)*
        /// Every metric the registry exports: kind, name and help text (`# HELP`).
        pub const ALL: &[(Kind, &str, &str)] = &[$((Kind::$kind, $value, $help)),*];
    };
}

metrics! {
    // Signaling.
    Gauge SESSIONS_CONNECTED = "switchboard_sessions_connected", "WebSocket sessions currently connected.";
    Gauge USERS_ONLINE = "switchboard_users_online", "Users with at least one live session.";
    Counter CALLS_STARTED = "switchboard_calls_started_total", "Calls created.";
    Counter CALLS_ENDED = "switchboard_calls_ended_total", "Calls ended, label `reason`.";
    Gauge CALLS_ACTIVE = "switchboard_calls_active", "Calls currently started.";
    Counter INVITEE_OUTCOMES = "switchboard_invitee_outcomes_total", "Invitees reaching a final state, label `state` (accepted, rejected, busy, cancelled, timeout).";
    Counter INVITATIONS_REFUSED = "switchboard_invitations_refused_total", "Invitations not sent because of a [signaling] quota, label `reason` (calls_per_minute, invitations_per_minute: the op was refused; recently_declined, already_ringing: that invitee was left out).";
    Histogram OP_LATENCY = "switchboard_op_duration_seconds", "Seconds from receiving an op to queueing its reply, label `op`.";
    Counter ERRORS = "switchboard_errors_total", "Error replies, label `code`.";
    Counter SESSIONS_CLOSED = "switchboard_sessions_closed_total", "Sessions closed by the server, label `reason` (heartbeat, oversize, binary, invalid_utf8, protocol_error, shutdown, write_failed, write_timeout, slow_reader, flood).";
    Counter SESSIONS_REFUSED = "switchboard_sessions_refused_total", "WebSocket upgrades refused (429) by a `[sessions]` cap, label `cap` (total, user, ip, rate).";
    // HTTP.
    Gauge HTTP_CONNECTIONS = "switchboard_http_connections", "TCP connections open on the HTTP listener, WebSocket sessions included.";
    Counter HTTP_CONNECTIONS_REFUSED = "switchboard_http_connections_refused_total", "Connections refused (503 and closed) because [http] max_connections were open.";
    Counter HTTP_TIMEOUTS = "switchboard_http_timeouts_total", "HTTP connections closed by a timer, label `kind` (header: no complete request head within [http] header_read_timeout; idle: no byte moved for [http] idle_timeout).";
    // Storage.
    Histogram STORAGE_COMMIT = "switchboard_storage_commit_seconds", "Seconds per storage batch commit.";
    Histogram STORAGE_BATCH = "switchboard_storage_batch_jobs", "Jobs (ops, reads, ledger writes) per storage batch; one transaction per batch.";
    Counter STORAGE_ERRORS = "switchboard_storage_errors_total", "Storage failures, label `op` (commit: a failed write attempt; probe: a write tried while storage is down; checkpoint, prune_history, ...).";
    Gauge STORAGE_UP = "switchboard_storage_up", "1 while database writes work; 0 from a write given up (after [storage] write_timeout) until a probe write works again.";
    Counter STORAGE_ROLLBACKS = "switchboard_storage_rollbacks_total", "Calls whose changes could not be stored and were undone (their ops answered `unavailable`).";
    Counter STORAGE_DROPPED = "switchboard_storage_dropped_total", "Ledger segments or webhook events dropped after storage failed for so long that the memory kept for them was full, label `what` (usage, webhook_event).";
    // Media.
    Gauge ROOMS = "switchboard_rooms", "Rooms open.";
    Gauge PARTICIPANTS = "switchboard_participants", "Participants joined in rooms.";
    Gauge TRACKS = "switchboard_tracks", "Tracks published, label `kind`.";
    Counter PACKETS_IN = "switchboard_rtp_packets_in_total", "RTP packets received from publishers.";
    Counter BYTES_IN = "switchboard_rtp_bytes_in_total", "RTP bytes received from publishers.";
    Counter PACKETS_FORWARDED = "switchboard_rtp_packets_forwarded_total", "RTP packets written to subscribers (forwarded).";
    Counter BYTES_FORWARDED = "switchboard_rtp_bytes_forwarded_total", "RTP payload bytes written to subscribers.";
    Counter PACKETS_OUT = "switchboard_udp_packets_out_total", "UDP datagrams sent.";
    Counter BYTES_OUT = "switchboard_udp_bytes_out_total", "UDP bytes sent.";
    Counter PACKETS_DROPPED = "switchboard_rtp_packets_dropped_total", "RTP packets dropped, label `reason`.";
    Counter NACKS = "switchboard_nacks_total", "NACKs received from subscribers.";
    Counter PLIS = "switchboard_keyframe_requests_total", "Keyframe requests (PLI/FIR) sent to publishers.";
    Counter RTX = "switchboard_rtx_packets_total", "RTX retransmissions sent.";
    Counter LAYER_SWITCHES = "switchboard_layer_switches_total", "Simulcast layer switches.";
    Histogram PACKET_DWELL = "switchboard_packet_dwell_seconds", "Seconds a packet spends inside the server, receive to send.";
    Histogram PACKET_STAGE = "switchboard_packet_stage_seconds", "Seconds a received datagram waits before the server works on it, label `stage`: `socket` (in the kernel's receive queue until the I/O thread reads it, from the kernel's receive stamp), `handoff` (from that read until its worker takes the batch). The dwell histogram follows on from the handoff.";
    Gauge UDP_ROUTES = "switchboard_udp_routes", "Source addresses the media I/O thread routes to a worker, each confirmed by a connection's ICE check (at most [media] max_routes).";
    Counter UDP_ROUTES_REFUSED = "switchboard_udp_routes_refused_total", "Confirmed media source addresses not routed because the table was full ([media] max_routes).";
    Counter ICE_REBINDINGS = "switchboard_ice_rebindings_total", "Media paths moved to a client's new address after its NAT rebound (a check from a new address while the old path was silent).";
    Gauge TCP_CONNECTIONS = "switchboard_tcp_connections", "ICE-TCP connections open now (at most [media] max_tcp_connections).";
    Counter TCP_REFUSED = "switchboard_tcp_refused_total", "ICE-TCP connections closed at accept because [media] max_tcp_connections were open.";
    Counter TCP_DROPPED_SLOW = "switchboard_tcp_dropped_slow_total", "Packets to ICE-TCP clients dropped because the client's queue was full (it reads too slowly).";
    Counter UDP_ROUTES_EXPIRED = "switchboard_udp_routes_expired_total", "Media routes dropped after 30 s without traffic.";
    Counter MEDIA_LIMIT_REJECTIONS = "switchboard_media_limit_rejections_total", "rtc_publish, rtc_answer and rtc_candidate refused by a [media] limit, label `limit` (sdp_bytes, mlines, tracks, candidates, payload_type).";
    Counter CONTAINED_PANICS = "switchboard_contained_panics_total", "Panics inside the media engine's calls for one connection (a str0m bug reached by a client's input): that connection was closed, the server went on.";
    // Billing.
    Counter BILLED_SECONDS = "switchboard_billed_seconds_total", "Billed seconds, label `tier`.";
    Gauge USERS_IN_TIER = "switchboard_users_in_tier", "Users currently metered in each tier, label `tier`.";
    Gauge LAYERS_BY_CLASS = "switchboard_layers_by_resolution", "Published video layers by resolution class, label `class`.";
    // Webhooks.
    Counter WEBHOOK_DELIVERIES = "switchboard_webhook_deliveries_total", "Webhook deliveries, label `result` (ok, retry).";
    Gauge WEBHOOK_BACKLOG = "switchboard_webhook_backlog", "Events waiting in the webhook outbox.";
    Counter WEBHOOK_DEAD_LETTERS = "switchboard_webhook_dead_letters_total", "Webhook events given up on and moved to the dead letters, label `reason` (max_attempts, max_age).";
    Gauge WEBHOOK_DEAD = "switchboard_webhook_dead_letters", "Webhook events in the dead letters (GET /v1/admin/webhooks/dead).";
    Gauge CLUSTER_NODES = "switchboard_cluster_nodes", "Live nodes in the cluster's registry, as this node last read it.";
    Gauge CLUSTER_OWNER = "switchboard_cluster_owner", "1 while this node owns the cluster's calls.";
    Counter CLUSTER_MESSAGES = "switchboard_cluster_messages_total", "Messages between nodes, by direction (in, out).";
    Counter CLUSTER_UNANSWERED = "switchboard_cluster_unanswered_total", "Requests relayed to another node that were answered `unavailable` here instead, because the owner of the calls changed (or messages were lost) before their reply came.";
    Counter CLUSTER_DROPPED = "switchboard_cluster_dropped_total", "Messages to other nodes given up on (queue full, or the node unreachable for node_ttl).";
    Counter WEBHOOK_DROPPED = "switchboard_webhook_dropped_total", "Outbox rows dropped at start because their receiver is no longer in [webhooks] urls.";
}

/// Process CPU seconds (user + system), read from /proc at each scrape; exported as a counter.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Resident memory in bytes, read from /proc at each scrape; exported as a gauge.
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

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder once and returns a handle that renders the text format.
/// Later calls (several servers in one test process) share the first recorder.
pub fn install() -> PrometheusHandle {
    install_for("")
}

/// Like [`install`], with every series labelled `node="<node>"` when `node` is not empty (the
/// nodes of a cluster). The first call in a process decides.
pub fn install_for(node: &str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut base = PrometheusBuilder::new();
            if !node.is_empty() {
                let _ = NODE_LABELS.set(format!(
                    "{{node=\"{}\"}}",
                    node.replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n")
                ));
                base = base.add_global_label("node", node);
            }
            let builder = base
                .set_buckets_for_metric(Matcher::Full(PACKET_DWELL.into()), DWELL_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(PACKET_STAGE.into()), DWELL_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(OP_LATENCY.into()), OP_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(STORAGE_BATCH.into()), BATCH_BUCKETS)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Histogram samples wait in the recorder until they are folded into their buckets,
            // which a scrape does; without a scraper they would pile up (a sample per packet).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                });
            // Fails only if another recorder was installed first (a test harness); the handle then
            // renders an empty registry, which is still valid text format.
            let _ = metrics::set_global_recorder(recorder);
            for (kind, name, help) in ALL {
                match kind {
                    Kind::Counter => metrics::describe_counter!(*name, *help),
                    Kind::Gauge => metrics::describe_gauge!(*name, *help),
                    Kind::Histogram => metrics::describe_histogram!(*name, *help),
                }
            }
            handle
        })
        .clone()
}

/// The global `{node="…"}` label set of a cluster node's series, for the process series written
/// by hand below.
static NODE_LABELS: OnceLock<String> = OnceLock::new();

/// Renders the registry plus the process series read from /proc at this moment.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    if let Some((cpu, rss)) = process_usage() {
        use std::fmt::Write as _;
        let labels = NODE_LABELS.get().map_or("", String::as_str);
        let _ = write!(
            text,
            "# HELP {PROCESS_CPU} Total user and system CPU time spent in seconds.\n\
             # TYPE {PROCESS_CPU} counter\n{PROCESS_CPU}{labels} {cpu}\n\
             # HELP {PROCESS_RSS} Resident memory size in bytes.\n\
             # TYPE {PROCESS_RSS} gauge\n{PROCESS_RSS}{labels} {rss}\n"
        );
    }
    text
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
