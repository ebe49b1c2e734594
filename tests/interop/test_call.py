"""Issue 3: two aiortc clients make a call through the real signaling and exchange real encoded
video (VP8, then H.264) and Opus audio through the SFU; each decodes the other's media and checks
it is the other's (size, colour, tone)."""

from __future__ import annotations

import asyncio
import time

import pytest

from flows import start_call
from media import PatternVideo, ToneAudio, chroma_of, tone_of
from sbclient import ProtocolError, Room

# Who sends what: a distinct size, colour (U, V) and tone per sender.
SENDS = {
    "alice": dict(size=(640, 360), chroma=(70, 190), hz=440.0),
    "bob": dict(size=(320, 240), chroma=(190, 70), hz=1000.0),
}


@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_two_aiortc_clients_exchange_video_and_audio(server, connect, codec):
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    call_id = await start_call(alice, [bob])

    rooms, videos, tones = {}, {}, {}
    for sig in (alice, bob):
        room = Room(sig, call_id, video_codec=codec)
        rooms[sig.user_id] = room
        spec = SENDS[sig.user_id]
        videos[sig.user_id] = PatternVideo(*spec["size"], fps=15, chroma=spec["chroma"])
        tones[sig.user_id] = ToneAudio(spec["hz"])
    try:
        assert await rooms["alice"].join() == []
        others = await rooms["bob"].join()
        assert [p["user_id"] for p in others] == ["alice"], others

        answers = {}
        for user, room in rooms.items():
            answers[user] = await room.publish([videos[user], tones[user]])
        for user, sdp in answers.items():
            # The server answered the codec we offered for video, and Opus.
            assert f"{codec}/90000" in sdp, f"{user}'s publish answer lacks {codec}:\n{sdp}"
            assert "opus/48000" in sdp.lower()

        # Collect decoded content to check whose media it is.
        chromas = {u: [] for u in rooms}
        audio = {u: [] for u in rooms}
        peer = {"alice": "bob", "bob": "alice"}

        def watch(user: str) -> bool:
            """Hooks content checks on `user`'s received tracks once both have appeared."""
            got = rooms[user].tracks_from(peer[user])
            if len(got) < 2:
                return False
            for rec in got:
                if rec.inspect is None:
                    if rec.kind == "video":
                        rec.inspect = lambda f, u=user: (
                            chromas[u].append(chroma_of(f)) if len(chromas[u]) < 40 else None)
                    else:
                        rec.inspect = lambda f, u=user: (
                            audio[u].append(f) if len(audio[u]) < 150 else None)
            return True

        for user in rooms:
            await rooms[user].wait_for(lambda u=user: watch(u), 20,
                                       f"{peer[user]}'s video and audio tracks to be offered")

        def enough(user: str) -> bool:
            v = rooms[user].tracks_from(peer[user], "video")
            a = rooms[user].tracks_from(peer[user], "audio")
            return v[0].frames >= 45 and a[0].frames >= 150 and len(chromas[user]) >= 40

        for user in rooms:
            await rooms[user].wait_for(lambda u=user: enough(u), 30,
                                       f"45 video and 150 audio frames from {peer[user]}")

        for user, room in rooms.items():
            sender = peer[user]
            (v,) = room.tracks_from(sender, "video")
            (a,) = room.tracks_from(sender, "audio")
            sent_size = SENDS[sender]["size"]
            # Every decoded frame has the size the other side sent, and nothing else.
            assert [(w, h) for _, w, h in v.sizes] == [sent_size], (user, v.sizes)
            # The pixels are the other side's: its chroma, within coding error.
            u_mean = sum(c[0] for c in chromas[user]) / len(chromas[user])
            v_mean = sum(c[1] for c in chromas[user]) / len(chromas[user])
            want_u, want_v = SENDS[sender]["chroma"]
            assert abs(u_mean - want_u) < 6 and abs(v_mean - want_v) < 6, (user, u_mean, v_mean)
            # The audio is the other side's tone, decoded from Opus.
            hz, rms = tone_of(audio[user][50:])
            assert abs(hz - SENDS[sender]["hz"]) < 15, (user, hz)
            assert rms > 0.05, (user, rms)
            # The server offers subscribers every codec it knows, so the offer proves nothing;
            # the publisher could only send `codec` (its answer above), the server does not
            # transcode, and the frames decoded with the right content: `codec` went end to end.

        # Each side learnt the other's measured resolution (track_resolution, section 4).
        for user, sig in (("alice", alice), ("bob", bob)):
            sender = peer[user]
            w, h = SENDS[sender]["size"]
            ev = await sig.next_event(
                "track_resolution",
                where=lambda d, w=w, h=h: d["call_id"] == call_id and (d["width"], d["height"]) == (w, h))
            assert ev["rid"] == ""

        # The admin API shows both participants and the measured resolutions.
        info = await server.get_json(f"/v1/rooms/{call_id}")
        assert info["call_id"] == call_id
        by_user = {p["user_id"]: p for p in info["participants"]}
        assert set(by_user) == {"alice", "bob"}, info
        for user, p in by_user.items():
            kinds = sorted(t["kind"] for t in p["tracks"])
            assert kinds == ["audio", "video"], p
            (video,) = [t for t in p["tracks"] if t["kind"] == "video"]
            assert video["codec"].lower() == f"video/{codec}".lower(), video
            assert [(l["width"], l["height"]) for l in video["layers"]] == [SENDS[user]["size"]]
            assert video["layers"][0]["bitrate"] > 0
            # Each receives the other's two tracks.
            assert len(p["subscriptions"]) == 2, p
    finally:
        for room in rooms.values():
            await room.close()
        for t in (*videos.values(), *tones.values()):
            t.stop()


async def test_second_device_takes_over_the_media(server, connect):
    """Several devices per user (section 1): bob joins the room from a second session; the server
    moves his media there. His first session is told it left (participant_left with its own user
    ID), stops receiving, and may no longer drive the participant."""
    alice = await connect(server, "alice")
    bob1 = await connect(server, "bob")
    bob2 = await connect(server, "bob")
    call_id = await start_call(alice, [bob1])
    # The other device stops ringing: it hears bob accepted.
    await bob2.next_event("call_user_state_changed", where=lambda d: d["call_id"] == call_id
                          and any(u["user_id"] == "bob" and u["state"] == "accepted"
                                  for u in d["users"]))
    ra, r1, r2 = Room(alice, call_id), Room(bob1, call_id), Room(bob2, call_id)
    video = PatternVideo(320, 240, fps=15)
    try:
        await ra.join()
        await r1.join()
        await ra.publish([video])
        await r1.wait_for(lambda: any(r.frames >= 5 for r in r1.tracks_from("alice", "video")),
                          20, "bob's first device receiving")

        others = await r2.join()
        taken_at = time.time()
        assert [(p["user_id"], [t["kind"] for t in p["tracks"]]) for p in others] == \
            [("alice", ["video"])], others
        await bob1.next_event("participant_left",
                              where=lambda d: d["call_id"] == call_id and d["user_id"] == "bob")
        await r2.wait_for(lambda: any(r.frames >= 5 for r in r2.tracks_from("alice", "video")),
                          20, "bob's second device receiving")
        (on2,) = r2.tracks_from("alice", "video")
        assert on2.size == (320, 240)

        with pytest.raises(ProtocolError) as e:
            await bob1.request("rtc_subscription", call_id=call_id, track_id=on2.track_id,
                               enabled=False)
        assert e.value.code == "invalid_state"

        await asyncio.sleep(2.0)  # observation window: bob's first device must stay silent
        late = sum(1 for r in r1.tracks_from("alice", "video") for t in r.arrivals
                   if t > taken_at + 0.5)
        assert late == 0, f"bob's first device decoded {late} frames after the takeover"
        assert sum(1 for t in on2.arrivals if t > taken_at + 0.5) >= 15
        info = await server.get_json(f"/v1/rooms/{call_id}")
        (bob,) = [p for p in info["participants"] if p["user_id"] == "bob"]
        assert bob["session_id"] == bob2.session_id, (bob, bob2.session_id)
    finally:
        for r in (ra, r1, r2):
            await r.close()
        video.stop()


async def test_clients_that_trickle_their_candidates(server, connect):
    """Section 4: clients may trickle candidates instead of putting them in the SDP. Both aiortc
    clients send offers and answers without candidates, then each candidate with rtc_candidate
    (publisher and subscriber), then an empty one: every rtc_candidate is accepted and media
    flows both ways. (The server is ICE-lite and answers checks from any address, so this cannot
    show that it used the candidates, only that trickling clients work.)"""
    alice, bob = await connect(server, "alice"), await connect(server, "bob")
    call_id = await start_call(alice, [bob])
    rooms = {s.user_id: Room(s, call_id, trickle=True) for s in (alice, bob)}
    videos = {u: PatternVideo(*SENDS[u]["size"], fps=15, chroma=SENDS[u]["chroma"])
              for u in rooms}
    try:
        for room in rooms.values():
            await room.join()
        for u, room in rooms.items():
            answer = await room.publish([videos[u]])
            assert "a=candidate:" in answer  # the server's own candidates are in its SDP
        for u, peer in (("alice", "bob"), ("bob", "alice")):
            await rooms[u].wait_for(
                lambda r=rooms[u], p=peer: any(x.frames >= 10 for x in r.tracks_from(p, "video")),
                20, f"{u} decoding {peer}'s video")
            (v,) = rooms[u].tracks_from(peer, "video")
            assert v.size == SENDS[peer]["size"]
    finally:
        for room in rooms.values():
            await room.close()
        for v in videos.values():
            v.stop()
