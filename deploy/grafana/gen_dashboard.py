#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/switchboard.json, the Grafana dashboard over Switchboard's metrics.

The JSON is generated so that its panels stay uniform; edit this file and run it again:

    python3 deploy/grafana/gen_dashboard.py

tests/ops/check-deploy fails when the committed JSON differs from what this prints, when an
expression does not parse as PromQL, names a metric src/metrics.rs does not define, or when a metric
of src/metrics.rs has no panel.
"""

import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent / "dashboards" / "switchboard.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
RI = "$__rate_interval"


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


class Layout:
    """Places panels left to right in rows of 24 columns."""

    def __init__(self):
        self.panels = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def row(self, title):
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(self, panel, w, h):
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self):
        if self.x:
            self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i


def stat(title, expr, unit="short", description=""):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "", "A")],
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 0}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def series(title, targets, unit="short", description="", stack=False):
    refs = "ABCDEFGH"
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(e, legend, refs[i]) for i, (e, legend) in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def rate(metric, by=None):
    inner = f"rate({metric}{{{SEL}}}[{RI}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def hist_quantiles(metric, by=None):
    """p50/p95/p99 of a Prometheus histogram, optionally per label."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def build():
    L = Layout()

    L.row("Overview")
    L.add(stat("Up", f"sum(up{{{SEL}}})", description="Scrape targets answering."), 4, 4)
    L.add(stat("Sessions", f"sum(switchboard_sessions_connected{{{SEL}}})",
               description="WebSocket sessions connected."), 4, 4)
    L.add(stat("Users online", f"sum(switchboard_users_online{{{SEL}}})",
               description="Users with at least one live session."), 4, 4)
    L.add(stat("Active calls", f"sum(switchboard_calls_active{{{SEL}}})"), 4, 4)
    L.add(stat("Rooms", f"sum(switchboard_rooms{{{SEL}}})"), 4, 4)
    L.add(stat("Participants", f"sum(switchboard_participants{{{SEL}}})"), 4, 4)

    L.row("Signaling")
    L.add(series("Sessions and users online", [
        (f"sum(switchboard_sessions_connected{{{SEL}}})", "sessions"),
        (f"sum(switchboard_users_online{{{SEL}}})", "users online"),
        (f"sum(switchboard_calls_active{{{SEL}}})", "active calls"),
    ]), 8, 8)
    L.add(series("Calls started / ended by reason", [
        (rate("switchboard_calls_started_total"), "started"),
        (rate("switchboard_calls_ended_total", "reason"), "ended: {{reason}}"),
    ], unit="ops", description="Calls per second."), 8, 8)
    L.add(series("Invitee outcomes", [
        (rate("switchboard_invitee_outcomes_total", "state"), "{{state}}"),
    ], unit="ops", stack=True, description="Invitees reaching a final state, per second."), 8, 8)
    L.add(series("Op latency (p50 / p95 / p99)", hist_quantiles("switchboard_op_duration_seconds", "op"),
                 unit="s", description="From receiving an op to queueing its reply."), 12, 8)
    L.add(series("Error replies by code", [
        (rate("switchboard_errors_total", "code"), "{{code}}"),
    ], unit="ops", stack=True), 6, 8)
    L.add(series("Sessions closed by the server", [
        (rate("switchboard_sessions_closed_total", "reason"), "{{reason}}"),
    ], unit="ops", stack=True), 6, 8)
    L.add(series("Invitations refused by a quota", [
        (rate("switchboard_invitations_refused_total", "reason"), "{{reason}}"),
    ], unit="ops", stack=True, description="[signaling] calls_per_minute, invitations_per_minute, "
                                           "reinvite_cooldown (recently_declined) and one ringing "
                                           "invitation per inviter (already_ringing)."), 12, 8)
    L.add(series("Sessions refused at admission", [
        (rate("switchboard_sessions_refused_total", "cap"), "{{cap}}"),
    ], unit="ops", stack=True, description="WebSocket upgrades refused by a [sessions] cap or the "
                                           "upgrade rate."), 12, 8)

    L.row("Storage")
    L.add(series("Storage batch commit time", [
        (f"max by (quantile) (switchboard_storage_commit_seconds{{{SEL}, quantile=~\"0.5|0.99|1\"}})",
         "q{{quantile}}"),
        (f"sum(rate(switchboard_storage_commit_seconds_sum{{{SEL}}}[{RI}])) / "
         f"sum(rate(switchboard_storage_commit_seconds_count{{{SEL}}}[{RI}]))", "mean"),
    ], unit="s", description="SQLite commit of one batch (a summary: quantiles over the process's recent commits)."),
        6, 8)
    L.add(series("Storage commits", [
        (rate("switchboard_storage_commit_seconds_count"), "commits/s"),
    ], unit="ops"), 6, 8)
    L.add(series("Jobs per storage batch (p50 / p95 / p99)", hist_quantiles("switchboard_storage_batch_jobs"),
                 description="Ops, reads and ledger writes committed in one transaction."), 6, 8)
    L.add(series("Storage errors", [
        (rate("switchboard_storage_errors_total", "op"), "{{op}}"),
    ], unit="ops"), 6, 8)
    L.add(series("Storage up", [
        (f"min(switchboard_storage_up{{{SEL}}})", "up"),
    ], description="1 while the store takes writes; 0 while writes fail (replies are `unavailable`)."),
        8, 8)
    L.add(series("Changes undone because storage failed", [
        (rate("switchboard_storage_rollbacks_total"), "rolled back/s"),
    ], unit="ops"), 8, 8)
    L.add(series("Writes given up", [
        (rate("switchboard_storage_dropped_total", "what"), "{{what}}"),
    ], unit="ops", stack=True), 8, 8)

    L.row("Media")
    L.add(series("Rooms, participants, tracks", [
        (f"sum(switchboard_rooms{{{SEL}}})", "rooms"),
        (f"sum(switchboard_participants{{{SEL}}})", "participants"),
        (f"sum by (kind) (switchboard_tracks{{{SEL}}})", "tracks: {{kind}}"),
    ]), 8, 8)
    L.add(series("RTP packets", [
        (rate("switchboard_rtp_packets_in_total"), "in"),
        (rate("switchboard_rtp_packets_forwarded_total"), "forwarded"),
        (rate("switchboard_udp_packets_out_total"), "UDP out"),
    ], unit="pps"), 8, 8)
    L.add(series("Dropped packets by reason", [
        (rate("switchboard_rtp_packets_dropped_total", "reason"), "{{reason}}"),
    ], unit="pps", stack=True), 8, 8)
    L.add(series("Bitrate", [
        (f"8 * {rate('switchboard_rtp_bytes_in_total')}", "RTP in"),
        (f"8 * {rate('switchboard_rtp_bytes_forwarded_total')}", "RTP forwarded (payload)"),
        (f"8 * {rate('switchboard_udp_bytes_out_total')}", "UDP out"),
    ], unit="bps"), 8, 8)
    L.add(series("NACKs, keyframe requests, RTX", [
        (rate("switchboard_nacks_total"), "NACKs received"),
        (rate("switchboard_keyframe_requests_total"), "PLI/FIR sent"),
        (rate("switchboard_rtx_packets_total"), "RTX sent"),
    ], unit="ops"), 8, 8)
    L.add(series("Simulcast layer switches", [
        (rate("switchboard_layer_switches_total"), "switches/s"),
    ], unit="ops"), 8, 8)
    L.add(series("Packet dwell in the server (p50 / p95 / p99)",
                 hist_quantiles("switchboard_packet_dwell_seconds"), unit="s",
                 description="Receive to send, per forwarded packet."), 12, 8)
    L.add(series("Wait before the server works on a datagram (p50 / p99, by stage)",
                 [q for q in hist_quantiles("switchboard_packet_stage_seconds", by="stage")
                  if "0.95" not in q[0]], unit="s",
                 description="socket: in the kernel's receive queue until the I/O thread reads it "
                             "(kernel receive stamp). handoff: from that read until its worker "
                             "takes the batch. The dwell follows on from the handoff."), 12, 8)
    L.add(series("Published video layers by resolution", [
        (f"sum by (class) (switchboard_layers_by_resolution{{{SEL}}})", "{{class}}"),
    ], stack=True), 12, 8)
    L.add(series("UDP routes (source address to worker)", [
        (f"sum(switchboard_udp_routes{{{SEL}}})", "routes"),
        (rate("switchboard_udp_routes_refused_total"), "refused/s (table full)"),
        (f"sum(switchboard_tcp_connections{{{SEL}}})", "ICE-TCP connections"),
        (rate("switchboard_tcp_dropped_slow_total"), "ICE-TCP drops/s (slow client)"),
        (rate("switchboard_tcp_refused_total"), "ICE-TCP refused/s (max_tcp_connections)"),
        (rate("switchboard_ice_rebindings_total"), "NAT rebindings followed/s"),
        (rate("switchboard_udp_routes_expired_total"), "expired/s"),
    ], description="Addresses confirmed by an accepted ICE check; capped by [media] max_routes."),
          12, 8)
    L.add(series("Media signaling refused; engine panics", [
        (rate("switchboard_media_limit_rejections_total", "limit"), "{{limit}}"),
        (rate("switchboard_contained_panics_total"), "engine panic (connection closed)"),
    ], unit="ops", description="rtc_publish / rtc_answer / rtc_candidate over a [media] limit, "
                               "by limit; and connections closed after a panic in the media "
                               "engine (contained: other calls went on; see the log)."), 12, 8)

    L.row("Billing")
    L.add(series("Billed minutes per minute, by tier", [
        (rate("switchboard_billed_seconds_total", "tier"), "{{tier}}"),
    ], stack=True, description="Receiver-minutes billed per wall-clock minute (about the number of "
                               "receivers in each tier)."), 12, 8)
    L.add(series("Users in tier", [
        (f"sum by (tier) (switchboard_users_in_tier{{{SEL}}})", "{{tier}}"),
    ], stack=True), 12, 8)

    L.row("Webhooks")
    L.add(series("Webhook deliveries by result", [
        (rate("switchboard_webhook_deliveries_total", "result"), "{{result}}"),
    ], unit="ops", stack=True), 12, 8)
    L.add(series("Webhook outbox backlog", [
        (f"sum(switchboard_webhook_backlog{{{SEL}}})", "events waiting"),
        (f"sum(switchboard_webhook_dead_letters{{{SEL}}})", "dead letters kept"),
    ]), 12, 8)
    L.add(series("Webhook events given up", [
        (rate("switchboard_webhook_dead_letters_total", "reason"), "dead: {{reason}}"),
        (rate("switchboard_webhook_dropped_total"), "dropped: endpoint no longer configured"),
    ], unit="ops", stack=True, description="Events moved to dead letters after [webhooks] max_attempts "
                                           "refusals or max_age; see GET /v1/admin/webhooks/dead."), 24, 8)

    L.row("Cluster")
    L.add(stat("Live nodes", f"max(switchboard_cluster_nodes{{{SEL}}})",
               description="Nodes in the Redis registry, as each node last read it ([cluster] redis_url)."), 6, 8)
    L.add(series("Owner of the calls", [
        (f"max by (node) (switchboard_cluster_owner{{{SEL}}})", "{{node}}"),
    ], description="1 for the node that applies every call's ops and timers; it changes only when "
                   "the owner dies (or loses the database)."), 6, 8)
    L.add(series("Sessions per node", [
        (f"sum by (node) (switchboard_sessions_connected{{{SEL}}})", "{{node}}"),
    ], stack=True), 6, 8)
    L.add(series("Forwarded packets per node", [
        (rate("switchboard_rtp_packets_forwarded_total", "node"), "{{node}}"),
    ], unit="pps", stack=True), 6, 8)
    L.add(series("Messages between nodes", [
        (rate("switchboard_cluster_messages_total", "node, dir"), "{{node}} {{dir}}"),
    ], unit="ops", description="Session frames relayed to the owner, and its events and replies back."), 12, 8)
    L.add(series("Messages given up", [
        (rate("switchboard_cluster_dropped_total", "node"), "{{node}} messages"),
        (rate("switchboard_cluster_unanswered_total", "node"), "{{node}} requests answered unavailable"),
    ], unit="ops", description="A full queue, or a node unreachable for node_ttl: the receiving node "
                               "resyncs its sessions (they get the replay a reconnect gets), and "
                               "requests still waiting for a reply are answered unavailable."), 12, 8)

    L.row("HTTP")
    L.add(series("Open HTTP connections", [
        (f"sum(switchboard_http_connections{{{SEL}}})", "open"),
    ], description="Accepted TCP connections, capped by [http] max_connections."), 8, 8)
    L.add(series("HTTP connections refused", [
        (rate("switchboard_http_connections_refused_total"), "refused/s (cap)"),
    ], unit="ops"), 8, 8)
    L.add(series("HTTP connections timed out", [
        (rate("switchboard_http_timeouts_total", "kind"), "{{kind}}"),
    ], unit="ops", stack=True, description="Closed for a slow request header or idleness."), 8, 8)

    L.row("Process")
    L.add(series("CPU", [
        (f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))", "{{instance}}"),
    ], unit="percentunit", description="CPU seconds per second (1 = one core)."), 12, 8)
    L.add(series("Resident memory", [
        (f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}}"),
    ], unit="bytes"), 12, 8)

    return {
        "uid": "switchboard-overview",
        "title": "Switchboard",
        "description": "Signaling, media, billing, storage, webhooks and process metrics of Switchboard "
                       "(src/metrics.rs).",
        "tags": ["switchboard"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(switchboard_sessions_connected, instance)",
                              "refId": "instance"},
                    "definition": "label_values(switchboard_sessions_connected, instance)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                },
            ]
        },
        "panels": L.panels,
    }


def render():
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--stdout":
        sys.stdout.write(render())
    else:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(render())
        print(f"wrote {OUT}")
