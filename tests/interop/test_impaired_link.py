"""Issue 11: video keeps decoding on a link with 10% loss, 100 ms delay and 20 ms jitter toward
the subscriber, not only with uniform loss on loopback.

This machine's kernel has no `sch_netem` (tc answers "Specified qdisc kind is unknown"), so the
impairment is the UDP relay of harness.py doing what `tc netem delay 100ms 20ms loss 10%` does
to what the server sends bob: every datagram held 80..120 ms (so they also arrive out of order),
10% of the SRTP/SRTCP ones dropped. Bob's NACKs cross the delayed link, and the server's RTX
repairs are delayed and lost like the rest."""

from __future__ import annotations

import time

import pytest

from flows import start_call
from harness import LossyRelay, point_candidates_at
from media import PatternVideo
from sbclient import Room

FPS = 15
WINDOW = 8.0
SIZE = (640, 360)


# With 20 ms of jitter the datagrams arrive out of order, aiortc NACKs each reordered packet and
# repeats every one it still misses in each NACK, and str0m resends a packet each time it is asked:
# resends reach several times the media rate. With the server's resend cap (RTX_RATIO_CAP) at 0.5
# the cap cleared the queue, real losses went unrepaired, and the picture froze ~1.6 s in most runs.
@pytest.mark.parametrize("jitter", [0.0, 0.020], ids=["100ms", "100ms-20ms-jitter"])
async def test_video_decodes_through_loss_delay_and_jitter(server, connect, jitter):
    alice, bob = [await connect(server, u) for u in ("alice", "bob")]
    call_id = await start_call(alice, [bob])
    relay = LossyRelay(server.udp_port, drop_to_client=0.10, delay=0.100, jitter=jitter)
    relay_port = await relay.start()
    ra = Room(alice, call_id)
    rb = Room(bob, call_id, rewrite_offer=lambda sdp: point_candidates_at(sdp, relay_port))
    video = PatternVideo(*SIZE, fps=FPS, texture=True)
    try:
        await ra.join()
        await rb.join()
        before = await server.metrics()
        await ra.publish([video])
        await rb.wait_for(lambda: any(r.frames >= 15 for r in rb.tracks_from("alice", "video")),
                          20, "a second of video through the impaired link")
        (rec,) = rb.tracks_from("alice", "video")
        assert relay.to_client > 0 and relay.dropped > 0

        start = time.time()
        sent_at_start = video.sent
        await rb.wait_for(lambda: time.time() - start >= WINDOW, WINDOW + 5, "the window")
        end = time.time()
        sent = video.sent - sent_at_start
        arrivals = [t for t in rec.arrivals if start <= t < end]
        per_second = [sum(1 for t in arrivals if start + i <= t < start + i + 1)
                      for i in range(int(WINDOW))]
        gaps = [b - a for a, b in zip([start, *arrivals], [*arrivals, end])]
        after = await server.metrics()
        nacks = after.get("switchboard_nacks_total", 0) - before.get("switchboard_nacks_total", 0)
        rtx = (after.get("switchboard_rtx_packets_total", 0)
               - before.get("switchboard_rtx_packets_total", 0))
        print(f"impaired link: {len(arrivals)}/{sent} frames, per second {per_second}, "
              f"longest gap {max(gaps):.3f} s, nacks +{nacks:g}, rtx +{rtx:g}")
        # Frames in every second, most of them overall, no freeze, at the size sent.
        assert min(per_second) >= FPS // 3, f"frames per second: {per_second}"
        assert len(arrivals) >= 0.85 * sent, f"decoded {len(arrivals)} of {sent} frames sent"
        assert max(gaps) < 1.5, f"video froze for {max(gaps):.2f} s"
        assert rec.size == SIZE
        assert nacks > 0 and rtx > 0, (nacks, rtx)
    finally:
        await ra.close()
        await rb.close()
        video.stop()
        relay.close()
