"""Issue 11: a third aiortc participant who joins an ongoing advanced call late decodes both
others, and both others decode the late joiner.

The late joiner's first subscriber offer already holds four m-sections (two publishers, audio and
video each), which the two-party tests never exercise."""

from __future__ import annotations

import pytest

from flows import start_call
from media import PatternVideo, ToneAudio, chroma_of
from sbclient import Room

SENDS = {
    "alice": dict(size=(320, 240), chroma=(70, 190), hz=440.0),
    "bob": dict(size=(320, 180), chroma=(190, 70), hz=1000.0),
    "carol": dict(size=(352, 288), chroma=(100, 100), hz=700.0),
}


def media_for(user: str):
    spec = SENDS[user]
    return [PatternVideo(*spec["size"], fps=15, chroma=spec["chroma"]), ToneAudio(spec["hz"])]


@pytest.mark.parametrize("codec", ["VP8"])
async def test_a_late_joiner_gets_everyones_media_and_they_get_hers(server, connect, codec):
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    carol = await connect(server, "carol")
    call_id = await start_call(alice, [bob], mode="advanced")

    rooms = {}
    try:
        for sig in (alice, bob):
            rooms[sig.user_id] = Room(sig, call_id, video_codec=codec)
            await rooms[sig.user_id].join()
            await rooms[sig.user_id].publish(media_for(sig.user_id))
        # The first two see each other before carol arrives.
        for user, peer in (("alice", "bob"), ("bob", "alice")):
            await rooms[user].wait_for(
                lambda u=user, p=peer: any(r.frames >= 10 for r in rooms[u].tracks_from(p, "video")),
                30, f"{peer}'s video")

        # Carol joins the call late (advanced mode: anyone holding the call ID), then the room.
        joined = await carol.request("call_join", call_id=call_id)
        assert {u["user_id"] for u in joined["users"]} >= {"alice", "bob", "carol"}, joined
        rooms["carol"] = Room(carol, call_id, video_codec=codec)
        others = await rooms["carol"].join()
        assert sorted(p["user_id"] for p in others) == ["alice", "bob"], others
        # Both others' tracks are listed in rtc_join already.
        assert all(len(p["tracks"]) == 2 for p in others), others
        await rooms["carol"].publish(media_for("carol"))

        everyone = ("alice", "bob", "carol")

        def decoding(user: str, sender: str) -> bool:
            v = rooms[user].tracks_from(sender, "video")
            a = rooms[user].tracks_from(sender, "audio")
            return bool(v) and bool(a) and v[0].frames >= 30 and a[0].frames >= 100

        for user in everyone:
            for sender in everyone:
                if sender != user:
                    await rooms[user].wait_for(lambda u=user, s=sender: decoding(u, s), 30,
                                               f"30 video and 100 audio frames from {sender}")

        # What carol decodes is each sender's own picture: its size and its colour.
        for sender in ("alice", "bob"):
            (v,) = rooms["carol"].tracks_from(sender, "video")
            assert [(w, h) for _, w, h in v.sizes] == [SENDS[sender]["size"]], (sender, v.sizes)
        chromas = []
        (v,) = rooms["alice"].tracks_from("carol", "video")
        v.inspect = lambda f: chromas.append(chroma_of(f)) if len(chromas) < 20 else None
        await rooms["alice"].wait_for(lambda: len(chromas) >= 20, 10, "20 of carol's frames")
        u_mean = sum(c[0] for c in chromas) / len(chromas)
        v_mean = sum(c[1] for c in chromas) / len(chromas)
        assert abs(u_mean - 100) < 6 and abs(v_mean - 100) < 6, (u_mean, v_mean)

        # Carol was not dropped as a dead connection: she is still in the room.
        info = await server.get_json(f"/v1/rooms/{call_id}")
        assert {p["user_id"] for p in info["participants"]} == set(everyone), info
    finally:
        for room in rooms.values():
            await room.close()
