"""Issue 4: the ledger survives kill -9 (section 5: "durable across restarts and crashes, at most
`checkpoint` seconds lost").

Two aiortc clients exchange video (ann sends 1920x1080, so ben is in full_hd; ben sends 640x360,
so ann is in hd) on a server with a 2 s checkpoint. Mid-call the admin report is read once (what
was billed before the kill); later the server is killed with SIGKILL during media and restarted on
the same database. The ledger must then hold everything billed before, cover each user's
receiving time up to at most one checkpoint before the kill, never more than up to the kill, and
hold nothing twice: no overlapping rows per (call, user), and reading the report again after the
restart changes nothing.
"""

from __future__ import annotations

import asyncio
import time

from flows import ledger_rows, overlaps, start_call
from media import PatternVideo
from sbclient import Room

CHECKPOINT_S = 2
FPS = 10


async def test_kill_9_loses_at_most_one_checkpoint_and_bills_nothing_twice(start_server, connect):
    server = start_server(billing_checkpoint=CHECKPOINT_S)
    ann, ben = await connect(server, "ann"), await connect(server, "ben")
    call_id = await start_call(ann, [ben], mode="advanced")
    rooms = {"ann": Room(ann, call_id), "ben": Room(ben, call_id)}
    videos = {"ann": PatternVideo(1920, 1080, fps=FPS), "ben": PatternVideo(640, 360, fps=FPS)}
    tiers = {"ann": "hd", "ben": "full_hd"}
    peer = {"ann": "ben", "ben": "ann"}
    try:
        for r in rooms.values():
            await r.join()
        for u, r in rooms.items():
            await r.publish([videos[u]])
        for u, r in rooms.items():
            await r.wait_for(lambda r=r, u=u: any(x.frames for x in r.tracks_from(peer[u])), 30,
                             f"{u}'s first frame")
        first = {u: r.tracks_from(peer[u], "video")[0].first_at for u, r in rooms.items()}

        await asyncio.sleep(3.0)  # metered time before the mid-call report
        before = await server.get_json(f"/v1/billing/usage?call_id={call_id}")
        billed_before = {(r["user_id"], r["tier"]): r["ms"] for r in before["calls"]}
        rows_before = ledger_rows(server.db, call_id)
        for u in rooms:
            assert billed_before.get((u, tiers[u]), 0) > 2000, billed_before

        # Media goes on past a few more checkpoints, then the server dies mid-segment.
        await asyncio.sleep(2 * CHECKPOINT_S + 1.1)
        for u, r in rooms.items():
            rec = r.tracks_from(peer[u], "video")[0]
            assert time.time() - rec.last_at < 0.5, f"{u}'s media stalled before the kill"
        killed_at = time.time()
        server.kill9()
        for sig in (ann, ben):
            await asyncio.wait_for(asyncio.shield(sig.closed), 10)

        server.start()
        after = await server.get_json(f"/v1/billing/usage?call_id={call_id}")
        billed_after = {(r["user_id"], r["tier"]): r["ms"] for r in after["calls"]}
        rows_after = ledger_rows(server.db, call_id)

        # Nothing billed before the kill was lost, and no row was rewritten.
        for key, ms in billed_before.items():
            assert billed_after.get(key, 0) >= ms, (key, ms, billed_after)
        assert all(r in rows_after for r in rows_before), "rows written before the kill changed"
        # Nothing twice.
        assert not overlaps(rows_after), overlaps(rows_after)
        for u in rooms:
            mine = [r for r in rows_after if r["user_id"] == u]
            for a, b in zip(mine, mine[1:]):
                assert b["start_ms"] == a["end_ms"], f"{u}: gap or overlap between {a} and {b}"
            assert {r["tier"] for r in mine} == {tiers[u]}, mine
            covered_to = mine[-1]["end_ms"] / 1000
            # At most one checkpoint lost (plus the timer's and storage's own slack) ...
            assert covered_to >= killed_at - CHECKPOINT_S - 0.3, (u, covered_to, killed_at)
            # ... and nothing metered after the kill.
            assert covered_to <= killed_at + 0.05, (u, covered_to, killed_at)
            total = sum(r["end_ms"] - r["start_ms"] for r in mine)
            assert total >= (killed_at - first[u] - CHECKPOINT_S - 0.5) * 1000, (u, total)
            assert total <= (killed_at - first[u] + 0.3) * 1000, (u, total)
            assert sum(ms for (user, _), ms in billed_after.items() if user == u) == total

        # A second report after the restart bills the same: nothing is replayed.
        again = await server.get_json(f"/v1/billing/usage?call_id={call_id}")
        assert {(r["user_id"], r["tier"]): r["ms"] for r in again["calls"]} == billed_after
        assert ledger_rows(server.db, call_id) == rows_after
        lost = {u: round(killed_at - max(r["end_ms"] for r in rows_after if r["user_id"] == u)
                         / 1000, 3) for u in rooms}
        print("crash: seconds lost per user:", lost, "billed after restart:", billed_after)
    finally:
        for r in rooms.values():
            await r.close()
        for v in videos.values():
            v.stop()
