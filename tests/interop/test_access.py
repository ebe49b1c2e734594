"""Issue 3, done-means 2: only users `accepted` in a started call take part in its room (section 4).

A user who is ringing, rejected, quit, a stranger to the call, or in a call that ended cannot
`rtc_join`, publish, answer, trickle or subscribe, and receives no media: the ops fail with the
documented codes, no media event about the room reaches them, and a user who was receiving stops
receiving while the others go on.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from flows import accept, has_state, invite, start_call
from media import PatternVideo
from sbclient import ProtocolError, Room, Signal

MEDIA_EVENTS = ("rtc_offer", "rtc_candidate", "participant_joined", "participant_left",
                "track_published", "track_unpublished", "active_speakers", "track_resolution",
                "billing_tier")

A_CANDIDATE = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
               "sdpMid": "0", "sdpMLineIndex": 0}


async def real_offer() -> str:
    """A genuine publisher offer from aiortc (video, all candidates in it)."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = PatternVideo(320, 240)
    pc.addTransceiver(track, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def assert_every_rtc_op_fails(sig: Signal, call_id: str, track_id: str, code: str) -> None:
    """Each media op, with well-formed arguments, fails with `code`."""
    offer = await real_offer()
    attempts = {
        "rtc_join": dict(call_id=call_id),
        "rtc_publish": dict(call_id=call_id, sdp=offer),
        "rtc_answer": dict(call_id=call_id, sdp=offer.replace("a=setup:actpass", "a=setup:active")),
        "rtc_candidate": dict(call_id=call_id, target="publisher", candidate=A_CANDIDATE),
        "rtc_subscription": dict(call_id=call_id, track_id=track_id, enabled=True),
        "rtc_leave": dict(call_id=call_id),
    }
    for op, args in attempts.items():
        try:
            result = await sig.request(op, **args)
        except ProtocolError as e:
            # doc: rtc_leave of a user outside the room is not specified; Switchboard answers
            # invalid_state like the other ops, or call_not_found for a stranger.
            assert e.code == code, f"{sig.user_id} {op}: {e.code} ({e.message}), wanted {code}"
        else:
            raise AssertionError(f"{sig.user_id} {op} succeeded: {result}")


def media_events(sig: Signal, call_id: str) -> list[str]:
    return [e.name for e in sig.events
            if e.name in MEDIA_EVENTS and e.data.get("call_id") == call_id]


async def media_flowing(receiver: Room, sender: str, frames: int = 10, timeout: float = 20) -> None:
    await receiver.wait_for(
        lambda: any(r.frames >= frames for r in receiver.tracks_from(sender, "video")),
        timeout, f"{frames} video frames from {sender}")


async def watch_window(seconds: float) -> tuple[float, float]:
    """An observation window: absence of media cannot be waited for, only watched for a while."""
    start = time.time()
    await asyncio.sleep(seconds)
    return start, time.time()


async def room_gone(server, call_id: str) -> bool:
    status, _ = await server.aget(f"/v1/rooms/{call_id}")
    return status == 404


async def wait_until_async(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def frames_between(room: Room, sender: str, start: float, end: float) -> int:
    return sum(1 for r in room.tracks_from(sender, "video") for t in r.arrivals if start <= t < end)


async def test_ringing_rejected_and_strangers_get_nothing(server, connect):
    alice, bob, carol, dave = [await connect(server, u) for u in ("alice", "bob", "carol", "dave")]
    call_id = await invite(alice, [bob, carol])
    await accept(call_id, alice, bob)  # carol keeps ringing; dave was never invited

    ra, rb = Room(alice, call_id), Room(bob, call_id)
    video = PatternVideo(320, 240, fps=15)
    try:
        await ra.join()
        await rb.join()
        await ra.publish([video])
        await media_flowing(rb, "alice")
        track_id = rb.tracks_from("alice", "video")[0].track_id

        # Ringing: the call is started and carol is in it, but not accepted.
        await assert_every_rtc_op_fails(carol, call_id, track_id, "invalid_state")
        # A stranger who holds the call ID: the call is not theirs.
        await assert_every_rtc_op_fails(dave, call_id, track_id, "call_not_found")

        # Rejected.
        await carol.call_reject(call_id)
        await alice.next_event("call_user_state_changed",
                               where=lambda d: d["call_id"] == call_id and has_state("carol", "rejected")(d))
        await assert_every_rtc_op_fails(carol, call_id, track_id, "invalid_state")

        # Media kept flowing to bob all along, and the room never had carol or dave.
        await media_flowing(rb, "alice", frames=rb.tracks_from("alice", "video")[0].frames + 10)
        info = await server.get_json(f"/v1/rooms/{call_id}")
        assert sorted(p["user_id"] for p in info["participants"]) == ["alice", "bob"], info
        assert media_events(carol, call_id) == [], carol.events
        assert media_events(dave, call_id) == [], dave.events
    finally:
        await ra.close()
        await rb.close()
        video.stop()


async def test_quit_user_stops_receiving_and_cannot_come_back(server, connect):
    alice, bob, carol = [await connect(server, u) for u in ("alice", "bob", "carol")]
    call_id = await start_call(alice, [bob, carol], mode="advanced")
    rooms = {s.user_id: Room(s, call_id) for s in (alice, bob, carol)}
    video = PatternVideo(320, 240, fps=15)
    try:
        for r in rooms.values():
            await r.join()
        await rooms["alice"].publish([video])
        await media_flowing(rooms["bob"], "alice")
        await media_flowing(rooms["carol"], "alice")
        track_id = rooms["bob"].tracks_from("alice", "video")[0].track_id

        quit_reply = await bob.call_quit(call_id)
        quit_at = time.time()
        assert quit_reply["call_id"] == call_id
        await assert_every_rtc_op_fails(bob, call_id, track_id, "invalid_state")

        # The others learn bob left the room.
        left = await alice.next_event("participant_left",
                                      where=lambda d: d["call_id"] == call_id and d["user_id"] == "bob")
        assert left
        # Bob receives nothing from 0.5 s after his quit (frames already in flight may land),
        # while carol goes on receiving alice's video over the same window.
        start, end = await watch_window(2.5)
        late = frames_between(rooms["bob"], "alice", quit_at + 0.5, end)
        assert late == 0, f"bob decoded {late} frames after quitting"
        assert frames_between(rooms["carol"], "alice", quit_at + 0.5, end) >= 20
        info = await server.get_json(f"/v1/rooms/{call_id}")
        assert sorted(p["user_id"] for p in info["participants"]) == ["alice", "carol"], info
    finally:
        for r in rooms.values():
            await r.close()
        video.stop()


async def test_after_call_end_nobody_joins_or_receives(server, connect):
    alice, bob = [await connect(server, u) for u in ("alice", "bob")]
    call_id = await start_call(alice, [bob], mode="advanced")
    rooms = {s.user_id: Room(s, call_id) for s in (alice, bob)}
    videos = {"alice": PatternVideo(320, 240, fps=15), "bob": PatternVideo(320, 240, fps=15)}
    try:
        for user, r in rooms.items():
            await r.join()
        for user, r in rooms.items():
            await r.publish([videos[user]])
        await media_flowing(rooms["bob"], "alice")
        await media_flowing(rooms["alice"], "bob")
        track_id = rooms["bob"].tracks_from("alice", "video")[0].track_id

        await alice.call_end(call_id)
        ended_at = time.time()
        ended = await bob.next_event("call_invitation_ended", where=lambda d: d["call_id"] == call_id)
        assert ended["reason"] == "ended" and ended["operated_user_id"] == "alice", ended

        for sig in (alice, bob):
            await assert_every_rtc_op_fails(sig, call_id, track_id, "invalid_state")
        start, end = await watch_window(2.0)
        for user, sender in (("alice", "bob"), ("bob", "alice")):
            late = frames_between(rooms[user], sender, ended_at + 0.5, end)
            assert late == 0, f"{user} decoded {late} frames from {sender} after call_end"
        status, body = await server.aget(f"/v1/rooms/{call_id}")
        assert status == 404, (status, body)
    finally:
        for r in rooms.values():
            await r.close()
        for v in videos.values():
            v.stop()


async def test_no_offer_arrives_for_a_call_that_ended(server, connect):
    alice, bob = [await connect(server, u) for u in ("alice", "bob")]
    call_id = await start_call(alice, [bob], mode="advanced")
    ra, rb = Room(alice, call_id), Room(bob, call_id)
    videos = [PatternVideo(320, 240, fps=15), PatternVideo(320, 240, fps=15)]
    try:
        await ra.join()
        await rb.join()
        # Both publish: whichever the server removes first, the other is left to be re-offered.
        await ra.publish([videos[0]])
        await rb.publish([videos[1]])
        await media_flowing(rb, "alice")
        await media_flowing(ra, "bob")

        marks = {sig.user_id: len(sig.events) for sig in (alice, bob)}
        await alice.call_end(call_id)
        await bob.next_event("call_invitation_ended", where=lambda d: d["call_id"] == call_id)
        # The room closes after the call ends. Once the admin API no longer has it, a ping on
        # each session is a barrier: its reply is queued after every event of the closing.
        await wait_until_async(lambda: room_gone(server, call_id), 10, "the room to close")
        for sig in (alice, bob):
            await sig.request("ping")
        after_end = {sig.user_id: [e.name for e in sig.events[marks[sig.user_id]:]
                                   if e.data.get("call_id") == call_id]
                     for sig in (alice, bob)}
        assert not any("rtc_offer" in names for names in after_end.values()), after_end
    finally:
        await ra.close()
        await rb.close()
        for v in videos:
            v.stop()
