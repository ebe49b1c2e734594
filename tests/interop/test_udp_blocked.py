"""Issue 11: a client whose network drops all UDP to the server still calls. Bob's aiortc runs as
its own process inside a network namespace whose nftables drop every UDP datagram toward the
server's address; aiortc has no ICE-TCP, so he relays through a real coturn over TCP, with the
credentials `rtc_join` hands out (`ice_servers`). Alice, on the host, uses plain UDP. Each decodes
the other's video and audio. (The browser counterpart, Chromium over ICE-TCP, is the `udp-blocked`
scenario of tests/browser.)"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows import has_state
from harness import Coturn, Netns
from media import PatternVideo, ToneAudio
from sbclient import Room

SECRET = "turn-shared-secret-for-the-udp-blocked-test"
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not Netns.available(),
                                reason="needs root, ip and nft for a network namespace")


@pytest.fixture
def netns():
    ns = Netns("udp")
    try:
        yield ns.create()
    finally:
        ns.destroy()


async def read_json(proc, want, timeout: float, what: str) -> dict:
    """The first line of `proc`'s stdout for which `want(obj)` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while loop.time() < deadline:
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline),
                                      max(0.1, deadline - loop.time()))
        if not line:
            break
        obj = json.loads(line)
        seen.append(obj)
        if want(obj):
            return obj
    raise AssertionError(f"bob's process never reported {what}; last: {seen[-3:]}")


async def test_aiortc_with_udp_blocked_calls_through_coturn_over_tcp(start_server, connect,
                                                                      netns, tmp_path):
    netns.block_udp_to(netns.host_ip)
    coturn = Coturn(tmp_path, SECRET, ip=netns.host_ip, tcp=True)
    coturn.start()
    server = start_server(server_listen=f"{netns.host_ip}:0", media_bind=netns.host_ip,
                          turn_urls=coturn.url, turn_secret=SECRET, turn_ttl=600)
    bob = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, str(HERE / "ns_peer.py"),
         server.base_url, server.token("bob")],
        cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "bob.log", "w"),
        text=True)
    alice = await connect(server, "alice")
    room = Room(alice, "")
    try:
        await read_json(bob, lambda o: o.get("ready"), 20, "signing in")
        r = await alice.call_invite(["bob"], mode="general", timeout=60)
        call_id = r["call_id"]
        await alice.next_event("call_user_state_changed",
                               where=lambda d: d["call_id"] == call_id and has_state("bob", "accepted")(d),
                               timeout=20)
        joined = await read_json(bob, lambda o: "joined" in o, 20, "joining")
        assert [s["urls"] for s in joined["ice_servers"]] == [[coturn.url]], joined
        room = Room(alice, call_id)
        await room.join()
        await room.publish([PatternVideo(320, 240, fps=15), ToneAudio(440.0)])
        report = await read_json(
            bob, lambda o: o.get("frames", {}).get("alice", {}).get("video", 0) >= 20
            and o["frames"]["alice"].get("audio", 0) >= 20, 60, "20 frames of alice's video and audio")
        # Only relay candidates: everything bob sent and got went through coturn, over TCP.
        assert report["candidates"] == ["relay"], report
        await room.wait_for(lambda: len(room.tracks_from("bob")) == 2
                            and all(t.frames >= 20 for t in room.tracks_from("bob")),
                            40, "20 frames of each of bob's tracks")
        # The block is real: a datagram from the namespace to the media port is dropped (the
        # output hook's drop makes sendto fail with EPERM).
        probe = (f"import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                 f".sendto(b'probe', ('{netns.host_ip}', {server.udp_port}))\nexcept OSError:\n    pass\n")
        netns.exec(sys.executable, "-c", probe)
        assert netns.udp_dropped() >= 1, "UDP from the namespace to the server is not blocked"
        assert coturn.log().count("user <") >= 2, coturn.log()[-3000:]
        assert "TCP" in coturn.log(), coturn.log()[-3000:]
    finally:
        await room.close()
        if bob.poll() is None:
            bob.stdin.close()
            try:
                bob.wait(10)
            except subprocess.TimeoutExpired:
                bob.kill()
        coturn.stop()
