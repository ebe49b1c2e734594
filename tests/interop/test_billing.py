"""Issue 4: billing end to end with real encoded video (section 5).

Three aiortc clients in one call, video only:

    ann publishes 1920x1080   receives ben + cat: 640x360 + 640x360 = 460,800 px   -> hd
                                       after ben's switch: 1280x720 + 640x360 = 1,152,000 -> full_hd
    ben publishes 640x360, then 1280x720 (its encoder restarts: a keyframe of the new size)
                              receives ann + cat: 1920x1080 + 640x360 = 2,304,000  -> 2k
    cat publishes 640x360     receives ann + ben: 1920x1080 + 640x360 = 2,304,000  -> 2k
                                       after ben's switch: 1920x1080 + 1280x720 = 2,995,200 -> 2k

Each subscriber records when it decodes the first frame of each track and of each new size; the
test ends the call and computes every (user, tier)'s milliseconds from that schedule. The admin
usage report must agree within 1% or 200 ms, whichever is larger; the ledger's rows must change
tier where ann first decoded ben's 1280x720, be contiguous and never overlap, and no row may be
longer than the 2 s checkpoint.
"""

from __future__ import annotations

import asyncio
import time

from flows import expected_ms, ledger_rows, overlaps, schedule, spans, start_call
from media import PatternVideo, ToneAudio
from sbclient import Room

CHECKPOINT_S = 2
PHASE_S = 4.5  # each phase spans two checkpoints
FPS = 10

SIZES = {"ann": (1920, 1080), "ben": (640, 360), "cat": (640, 360)}


def tolerance(ms: float) -> float:
    return max(0.01 * ms, 200.0)


async def test_usage_per_tier_matches_what_subscribers_received(start_server, connect):
    server = start_server(billing_checkpoint=CHECKPOINT_S)
    sigs = {u: await connect(server, u) for u in SIZES}
    call_id = await start_call(sigs["ann"], [sigs["ben"], sigs["cat"]], mode="advanced")
    rooms = {u: Room(s, call_id) for u, s in sigs.items()}
    videos = {u: PatternVideo(w, h, fps=FPS, chroma=(60 + 50 * i, 120))
              for i, (u, (w, h)) in enumerate(SIZES.items())}
    try:
        for u, room in rooms.items():
            await room.join()
        for u, room in rooms.items():
            await room.publish([videos[u]])

        def receiving(user: str, sizes: dict[str, tuple[int, int]]) -> bool:
            return all(any(r.size == size for r in rooms[user].tracks_from(sender, "video"))
                       for sender, size in sizes.items())

        # Phase 1: everyone decodes both others at the sizes they send.
        for user in rooms:
            want = {s: SIZES[s] for s in rooms if s != user}
            await rooms[user].wait_for(lambda u=user, w=want: receiving(u, w), 30,
                                       f"{user} decoding {want}")
        for user, tier, px in (("ann", "hd", 460_800), ("ben", "2k", 2_304_000),
                               ("cat", "2k", 2_304_000)):
            # billing_tier is sent whenever the tier or the aggregate changes.
            ev = await sigs[user].next_event(
                "billing_tier", where=lambda d, p=px: d["call_id"] == call_id and d["pixels"] == p)
            assert ev["tier"] == tier, (user, ev)
        await asyncio.sleep(PHASE_S)  # metered time: the schedule under test

        # Phase 2: ben switches to 1280x720.
        videos["ben"].resize(1280, 720)
        for user in ("ann", "cat"):
            await rooms[user].wait_for(lambda u=user: receiving(u, {"ben": (1280, 720)}), 15,
                                       f"{user} decoding ben's 1280x720")
        ev = await sigs["ann"].next_event(
            "billing_tier", where=lambda d: d["call_id"] == call_id and d["pixels"] == 1_152_000)
        assert ev["tier"] == "full_hd", ev
        ev = await sigs["cat"].next_event(
            "billing_tier", where=lambda d: d["call_id"] == call_id and d["pixels"] == 2_995_200)
        assert ev["tier"] == "2k", ev
        await asyncio.sleep(PHASE_S)

        # Stop: the call ends for everyone at once.
        end = time.time()
        await sigs["ann"].call_end(call_id)

        # Every frame each subscriber decoded had a size its publisher sent.
        for user, room in rooms.items():
            for rec in room.tracks_from("ann") + room.tracks_from("ben") + room.tracks_from("cat"):
                sent = {(w, h) for _, w, h in videos[rec.user_id].sizes_sent}
                assert {(w, h) for _, w, h in rec.sizes} <= sent, (user, rec.user_id, rec.sizes)

        expected = {u: expected_ms(schedule(rooms[u], end, hold=1 / FPS)) for u in rooms}
        assert expected["cat"].get("2k", 0) > 2 * PHASE_S * 1000 - 1000, expected
        assert set(expected["ann"]) >= {"hd", "full_hd"}, expected

        report = await server.get_json(f"/v1/billing/usage?call_id={call_id}")
        billed: dict[str, dict[str, int]] = {}
        for row in report["calls"]:
            assert row["call_id"] == call_id
            billed.setdefault(row["user_id"], {})[row["tier"]] = row["ms"]
            assert row["billable_minutes"] == -(-row["ms"] // 60_000)
        problems = []
        for user in rooms:
            for tier in set(expected[user]) | set(billed.get(user, {})):
                want = expected[user].get(tier, 0.0)
                got = billed.get(user, {}).get(tier, 0)
                if abs(got - want) > tolerance(want):
                    problems.append(f"{user} {tier}: billed {got} ms, schedule says {want:.0f} ms")
        assert not problems, "\n".join(problems) + f"\nexpected {expected}\nbilled {billed}"

        # The per-user totals agree with the per-call rows (one call in this database).
        for row in report["users"]:
            assert billed[row["user_id"]][row["tier"]] == row["ms"], row

        rows = ledger_rows(server.db, call_id)
        assert not overlaps(rows), overlaps(rows)
        for user in rooms:
            mine = [r for r in rows if r["user_id"] == user]
            # Contiguous from the first frame to the end; checkpoints cut it at most 2 s apart.
            for a, b in zip(mine, mine[1:]):
                assert b["start_ms"] == a["end_ms"], (user, a, b)
            for r in mine:
                assert r["end_ms"] - r["start_ms"] <= CHECKPOINT_S * 1000 + 250, (user, r)
            assert abs(mine[-1]["end_ms"] - end * 1000) <= 200, (user, mine[-1], end)
        # Ann's tier changed where she first decoded ben's 1280x720.
        switch = next(t for t, w, h in rooms["ann"].tracks_from("ben", "video")[0].sizes
                      if (w, h) == (1280, 720)) - 1 / FPS
        ann = [r for r in rows if r["user_id"] == "ann"]
        first_full_hd = next(r for r in ann if r["tier"] == "full_hd")
        assert abs(first_full_hd["start_ms"] - switch * 1000) <= 200, (first_full_hd, switch)
        assert all(r["tier"] == "hd" for r in ann if r["end_ms"] <= first_full_hd["start_ms"]
                   and r["start_ms"] >= ann[0]["start_ms"] + 1000)
        print("billing:", {u: {t: round(ms) for t, ms in e.items()} for u, e in expected.items()},
              "billed:", billed)
    finally:
        for room in rooms.values():
            await room.close()
        for v in videos.values():
            v.stop()


AUDIO_HOLD = 0.08  # aiortc releases audio after 4 packets of 20 ms are buffered


async def test_paused_video_leaves_the_audio_tier_and_resuming_returns(start_server, connect):
    """A user who receives only audio is in tier `audio` (section 5). Bob receives alice's
    audio and 640x360 video (hd), pauses the video with rtc_subscription (audio), then resumes it
    (hd again on the next keyframe). The ledger follows, row by row."""
    server = start_server(billing_checkpoint=CHECKPOINT_S)
    alice, bob = await connect(server, "alice"), await connect(server, "bob")
    call_id = await start_call(alice, [bob], mode="advanced")
    ra, rb = Room(alice, call_id), Room(bob, call_id)
    video, tone = PatternVideo(640, 360, fps=FPS), ToneAudio(440.0)
    try:
        await ra.join()
        await rb.join()
        await ra.publish([video, tone])  # bob publishes nothing: he only receives
        await rb.wait_for(lambda: len(rb.tracks_from("alice")) == 2
                          and all(r.frames for r in rb.tracks_from("alice")), 20,
                          "alice's audio and video")
        (v,) = rb.tracks_from("alice", "video")
        (a,) = rb.tracks_from("alice", "audio")
        ev = await bob.next_event("billing_tier",
                                  where=lambda d: d["call_id"] == call_id and d["pixels"] == 230_400)
        assert ev["tier"] == "hd", ev
        await asyncio.sleep(2.5)

        paused_at = time.time()
        await rb.subscription(v.track_id, enabled=False)
        ev = await bob.next_event("billing_tier", where=lambda d: d["call_id"] == call_id
                                  and d["tier"] == "audio")
        assert ev["pixels"] == 0, ev
        frames_when_paused = v.frames
        await asyncio.sleep(2.5)
        # Paused means paused: at most what was in flight when the pause took effect.
        assert v.frames - frames_when_paused <= 1, "video kept coming while paused"

        resumed_at = time.time()
        await rb.subscription(v.track_id, enabled=True)
        await rb.wait_for(lambda: v.arrivals[-1] > resumed_at, 10, "video after resuming")
        first_again = next(t for t in v.arrivals if t > resumed_at)
        await bob.next_event("billing_tier", where=lambda d: d["call_id"] == call_id
                             and d["tier"] == "hd" and d["pixels"] == 230_400)
        await asyncio.sleep(2.0)
        end = time.time()
        await alice.call_end(call_id)

        changes = [(a.first_at - AUDIO_HOLD, "audio", 0),
                   (v.first_at - 1 / FPS, "video", 230_400),
                   (paused_at, "video", None),
                   (first_again - 1 / FPS, "video", 230_400)]
        expected = expected_ms(spans(changes, end))
        report = await server.get_json(f"/v1/billing/usage?call_id={call_id}&user_id=bob")
        billed = {r["tier"]: r["ms"] for r in report["calls"]}
        assert set(billed) == {"audio", "hd"}, billed
        for tier in ("audio", "hd"):
            assert abs(billed[tier] - expected[tier]) <= tolerance(expected[tier]), (billed, expected)

        # The ledger: hd, then audio from the pause, then hd from the first frame after resuming.
        rows = [r for r in ledger_rows(server.db, call_id) if r["user_id"] == "bob"]
        assert not overlaps(rows)
        audio_rows = [r for r in rows if r["tier"] == "audio" and r["start_ms"] > v.first_at * 1000]
        assert abs(audio_rows[0]["start_ms"] - paused_at * 1000) <= 200, (audio_rows, paused_at)
        back = next(r for r in rows if r["tier"] == "hd" and r["start_ms"] > paused_at * 1000)
        assert abs(back["start_ms"] - (first_again - 1 / FPS) * 1000) <= 200, (back, first_again)
        print("audio tier: expected", {t: round(ms) for t, ms in expected.items()}, "billed", billed)
    finally:
        await ra.close()
        await rb.close()
        video.stop()
        tone.stop()
