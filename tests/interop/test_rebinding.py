"""Issue 11: NAT rebinding. A subscriber's datagrams start coming from a new source port (its NAT
lost the mapping), with the same ICE credentials. aiortc's consent checks (every 4-6 s) carry no
USE-CANDIDATE and a peer-reflexive priority below the old host pair's, so str0m alone would keep
sending to the dead port until that pair expired (15 s); the server follows the first check from
the new port (`switchboard_ice_rebindings_total`) and video resumes without a new rtc_join. The
browser counterpart, with a kernel NAT (conntrack flush), is the `nat-rebind` scenario."""

from __future__ import annotations

import time

from flows import start_call
from harness import LossyRelay, point_candidates_at
from media import PatternVideo
from sbclient import Room


async def test_video_resumes_after_the_client_s_nat_rebinds(server, connect):
    alice, bob = [await connect(server, u) for u in ("alice", "bob")]
    call_id = await start_call(alice, [bob])
    relay = LossyRelay(server.udp_port, drop_to_client=0.0)
    relay_port = await relay.start()
    ra = Room(alice, call_id)
    rb = Room(bob, call_id, rewrite_offer=lambda sdp: point_candidates_at(sdp, relay_port))
    try:
        await ra.join()
        await rb.join()
        # Several packets per frame: aiortc's jitter buffer gives up on the packets lost in the
        # outage only once 128 newer ones arrived, so a one-packet-per-frame stream would stay
        # frozen for 8 s after the path is back.
        await ra.publish([PatternVideo(640, 360, fps=15, texture=True)])
        await rb.wait_for(lambda: any(r.frames >= 15 for r in rb.tracks_from("alice", "video")),
                          20, "video through the relay")
        (rec,) = rb.tracks_from("alice", "video")
        before = await server.metrics()
        await relay.rebind()
        rebound_at = time.time()
        frames_at_rebind = rec.frames
        await rb.wait_for(lambda: rec.frames >= frames_at_rebind + 15, 15,
                          "15 more frames after the rebinding")
        resumed = min(t for t in rec.arrivals if t > rebound_at)
        gap = resumed - rebound_at
        after = await server.metrics()
        moved = (after.get("switchboard_ice_rebindings_total", 0)
                 - before.get("switchboard_ice_rebindings_total", 0))
        print(f"rebinding: video again {gap:.2f} s after the new port; {moved:g} paths moved")
        assert moved >= 1, "the server did not follow the rebinding"
        # One consent interval of aiortc (at most 6 s) and its jitter buffer's catching up, not
        # the 15 s of the old pair's expiry.
        assert gap < 9.0, f"video resumed {gap:.2f} s after the rebinding"
        assert len(rb.tracks_from("alice", "video")) == 1, "the same track, no new negotiation"
    finally:
        await ra.close()
        await rb.close()
        relay.close()
