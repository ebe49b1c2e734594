"""Server CPU per forwarded packet over ICE-TCP against UDP, in the same run (issue 11).

One aiortc publisher (VP8 640x360 at 15 fps with a changing texture, and Opus) and N aiortc
subscribers. In the UDP phase the subscribers reach the media port directly; in the TCP phase
their peer connections run over the server's ICE-TCP port, through `UdpToTcpRelay` (aiortc has no
ICE-TCP), so the server frames, routes and writes every forwarded packet through `sfu::tcp`. Each
phase measures the server process's CPU time (utime + stime from /proc) over the forwarded-packet
counter, after a warm-up. The publisher's own ingest is in both phases alike.

    .venv/bin/python tests/interop/bench_ice_tcp.py [subscribers] [seconds]

Prints one line per phase; BENCHMARKS.md records a run."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flows import start_call  # noqa: E402
from harness import Server, UdpToTcpRelay, point_candidates_at  # noqa: E402
from media import PatternVideo, ToneAudio  # noqa: E402
from sbclient import Room, Signal  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def phase(server: Server, name: str, n: int, seconds: float, tcp: bool, k: int) -> dict:
    # Fresh users per phase: a general call stays started for a while after everyone left.
    pub_id = f"pub{k}"
    users = [pub_id] + [f"sub{k}_{i}" for i in range(n)]
    sigs = {u: await Signal.connect(server.base_url, server.token(u)) for u in users}
    relays = []
    rooms = []
    try:
        call_id = await start_call(sigs[pub_id], [sigs[u] for u in users[1:]])
        pub = Room(sigs[pub_id], call_id)
        rooms.append(pub)
        await pub.join()
        for u in users[1:]:
            rewrite = None
            if tcp:
                relay = UdpToTcpRelay(server.tcp_port)
                port = await relay.start()
                relays.append(relay)
                rewrite = (lambda p: lambda sdp: point_candidates_at(sdp, p))(port)
            r = Room(sigs[u], call_id, rewrite_offer=rewrite)
            rooms.append(r)
            await r.join()
        await pub.publish([PatternVideo(640, 360, fps=15, texture=True), ToneAudio(440.0)])
        for r in rooms[1:]:
            await r.wait_for(lambda r=r: any(t.frames >= 30 for t in r.tracks_from(pub_id, "video")),
                             30, "video at every subscriber")
        before = await server.metrics()
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        after = await server.metrics()
        cpu = cpu_seconds(server.proc.pid) - cpu0
        wall = time.monotonic() - t0
        fwd = (after.get("switchboard_rtp_packets_forwarded_total", 0)
               - before.get("switchboard_rtp_packets_forwarded_total", 0))
        tcp_open = after.get("switchboard_tcp_connections", 0)
        if tcp:
            assert tcp_open >= n, f"only {tcp_open} ICE-TCP connections for {n} subscribers"
            assert all(r.frames_down > 0 for r in relays), "a relay carried nothing"
        out = {"phase": name, "subscribers": n, "seconds": round(wall, 1),
               "forwarded": int(fwd), "pps": round(fwd / wall), "cpu_s": round(cpu, 2),
               "us_per_packet": round(cpu / fwd * 1e6, 1) if fwd else None,
               "tcp_connections": int(tcp_open)}
        print(out, flush=True)
        return out
    finally:
        for r in rooms:
            await r.close()
        for s in sigs.values():
            await s.close()
        for relay in relays:
            relay.close()


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as d:
        server = Server(Path(d), secret="bench-ice-tcp-secret-0123456789abcdef0123")
        server.start()
        try:
            await phase(server, "udp", n, seconds, tcp=False, k=1)
            await phase(server, "tcp", n, seconds, tcp=True, k=2)
            await phase(server, "udp", n, seconds, tcp=False, k=3)
            await phase(server, "tcp", n, seconds, tcp=True, k=4)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
