"""Issue 3: 10% packet loss toward one subscriber. A UDP relay on 127.0.0.1 sits between bob's
aiortc subscriber connection and the server (bob applies the server's offer with its candidate
pointed at the relay), and drops 10% of the SRTP/SRTCP datagrams going to bob. Video keeps
decoding through the whole window, because bob's NACKs are answered with RTX retransmissions: the
server's NACK and RTX counters in /metrics rise."""

from __future__ import annotations

import time

from flows import start_call
from harness import LossyRelay, point_candidates_at
from media import PatternVideo
from sbclient import Room

FPS = 15
WINDOW = 8.0  # seconds of video watched under loss
SIZE = (640, 360)


async def test_video_survives_ten_percent_loss_with_nack_and_rtx(server, connect):
    alice, bob = [await connect(server, u) for u in ("alice", "bob")]
    call_id = await start_call(alice, [bob])

    relay = LossyRelay(server.udp_port, drop_to_client=0.10)
    relay_port = await relay.start()
    ra = Room(alice, call_id)
    rb = Room(bob, call_id, rewrite_offer=lambda sdp: point_candidates_at(sdp, relay_port))
    # Textured, so the encoder spends its bitrate as a camera would (~250 packets/s here).
    video = PatternVideo(*SIZE, fps=FPS, texture=True)
    try:
        await ra.join()
        await rb.join()
        before = await server.metrics()
        await ra.publish([video])
        await rb.wait_for(lambda: any(r.frames > 0 for r in rb.tracks_from("alice", "video")),
                          20, "the first frame through the lossy relay")
        (rec,) = rb.tracks_from("alice", "video")
        # Bob's media really goes through the relay.
        assert relay.to_server > 0 and relay.to_client > 0

        start = time.time()
        sent_at_start = video.sent
        dropped_at_start = relay.dropped
        await rb.wait_for(lambda: time.time() - start >= WINDOW, WINDOW + 5, "the loss window")
        end = time.time()
        sent = video.sent - sent_at_start

        # The relay did drop about 10% of what went to bob.
        dropped = relay.dropped - dropped_at_start
        assert dropped >= 20, f"only {dropped} datagrams dropped"
        share = relay.dropped / (relay.dropped + relay.to_client)
        assert 0.05 < share < 0.15, share

        # Video kept decoding: frames in every second of the window, and most of them overall.
        arrivals = [t for t in rec.arrivals if start <= t < end]
        per_second = [sum(1 for t in arrivals if start + i <= t < start + i + 1)
                      for i in range(int(WINDOW))]
        # About 16 packets a frame: without repair, 80% of frames would lose a packet, and VP8
        # delta frames would stop decoding until the next keyframe.
        assert min(per_second) >= FPS // 3, f"frames per second under loss: {per_second}"
        assert len(arrivals) >= 0.9 * sent, f"decoded {len(arrivals)} of {sent} frames sent"
        # No freeze: a lost packet is repaired within a round trip or two, not seconds later
        # (typically < 0.3 s here; a busy machine stretches it, a dropped resend queue makes it
        # 1-2 s).
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert max(gaps) < 1.0, f"video froze for {max(gaps):.2f} s under loss"
        assert rec.size == SIZE

        # The server saw bob's NACKs and retransmitted.
        after = await server.metrics()
        nacks = after.get("switchboard_nacks_total", 0) - before.get("switchboard_nacks_total", 0)
        rtx = (after.get("switchboard_rtx_packets_total", 0)
               - before.get("switchboard_rtx_packets_total", 0))
        assert nacks > 0, "switchboard_nacks_total did not rise"
        assert rtx > 0, "switchboard_rtx_packets_total did not rise"
        print(f"loss: dropped {dropped} datagrams, {len(arrivals)}/{sent} frames, "
              f"per second {per_second}, longest gap {max(gaps):.3f} s, nacks +{nacks:g}, rtx +{rtx:g}")
    finally:
        await ra.close()
        await rb.close()
        video.stop()
        relay.close()
