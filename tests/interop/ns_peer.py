"""A Switchboard participant as a process of its own, for tests that run it inside a network
namespace (`ip netns exec NS python ns_peer.py ...`): it signs in, accepts the first call it is
invited to, joins and publishes with relay candidates only (so through the TURN servers that
`rtc_join` hands out), and reports on stdout, one JSON object per line:

    {"ready": true}                                   signed in
    {"joined": "<call_id>", "ice_servers": [...]}     in the room
    {"frames": {"<user>": {"video": n, "audio": n}}, "candidates": ["relay"]}   once a second

It stops when its stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from media import PatternVideo, ToneAudio
from sbclient import Room, Signal


def say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("token")
    args = ap.parse_args()
    sig = await Signal.connect(args.base_url, args.token)
    say({"ready": True})
    inv = await sig.next_event("call_invitation_received", timeout=60)
    call_id = inv["call_id"]
    await sig.call_accept(call_id)
    room = Room(sig, call_id, relay_only=True)
    await room.join()
    say({"joined": call_id, "ice_servers": room.ice_servers})
    await room.publish([PatternVideo(320, 240, fps=15), ToneAudio(440.0)])
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    try:
        while not stdin_closed.done():
            frames: dict = {}
            for r in room.received.values():
                frames.setdefault(r.user_id, {})[r.kind] = r.frames
            kinds = set()
            for pc in (room.publisher, room.subscriber):
                if pc is None:
                    continue
                for t in pc.getTransceivers():
                    tr = t.receiver.transport
                    if tr is not None:
                        kinds |= {c.type for c in tr.transport.iceGatherer.getLocalCandidates()}
            say({"frames": frames, "candidates": sorted(kinds)})
            await asyncio.wait([stdin_closed], timeout=1.0)
    finally:
        await room.close()
        await sig.close()


if __name__ == "__main__":
    asyncio.run(main())
