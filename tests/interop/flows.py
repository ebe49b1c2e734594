"""Call set-up steps shared by the tests, in the protocol's own terms."""

from __future__ import annotations

from sbclient import Signal


def has_state(user_id: str, state: str):
    """A `call_user_state_changed` filter: `user_id` is now `state`."""
    return lambda d: any(u["user_id"] == user_id and u["state"] == state for u in d["users"])


async def invite(caller: Signal, invitees: list[Signal], mode: str = "general",
                 timeout: int = 60) -> str:
    """`call_invite`; every invitee sees `call_invitation_received`. Returns the call ID."""
    r = await caller.call_invite([s.user_id for s in invitees], mode=mode, timeout=timeout)
    call_id = r["call_id"]
    assert r["error_users"] == [] and r["timeout"] == timeout, r
    for s in invitees:
        inv = await s.next_event("call_invitation_received", where=lambda d: d["call_id"] == call_id)
        assert inv["caller"] == caller.user_id and inv["mode"] == mode, inv
    return call_id


async def accept(call_id: str, caller: Signal, invitee: Signal) -> None:
    """`call_accept`, and the caller learns of it (section 3.4)."""
    await invitee.call_accept(call_id)
    await caller.next_event(
        "call_user_state_changed",
        where=lambda d: d["call_id"] == call_id and has_state(invitee.user_id, "accepted")(d))


async def start_call(caller: Signal, invitees: list[Signal], mode: str = "general") -> str:
    """Invite, and every invitee accepts."""
    call_id = await invite(caller, invitees, mode)
    for s in invitees:
        await accept(call_id, caller, s)
    return call_id


# ----- billing (section 5) -----

# The default tiers: (name, max_pixels), the last unbounded.
DEFAULT_TIERS = [("audio", 0), ("hd", 921_600), ("full_hd", 2_073_600), ("2k", 3_686_400),
                 ("4k", 8_847_360), ("4k_plus", None)]


def tier_of(pixels: int, tiers=DEFAULT_TIERS) -> str:
    """The first tier whose max_pixels is not below the aggregate (section 5)."""
    for name, most in tiers:
        if most is None or pixels <= most:
            return name
    return tiers[-1][0]


def spans(changes: list[tuple], end: float) -> list[tuple[float, float, int]]:
    """`(start, end, aggregate pixels)` spans while anything is received, from `(time, consumer,
    pixels)` changes: pixels is 0 for audio, width x height for video, None when it stops."""
    out, current = [], {}
    changes = sorted((c for c in changes if c[0] < end), key=lambda c: c[0])
    for i, (t, key, px) in enumerate(changes):
        if px is None:
            current.pop(key, None)
        else:
            current[key] = px
        nxt = changes[i + 1][0] if i + 1 < len(changes) else end
        if nxt > t and current:
            out.append((t, nxt, sum(current.values())))
    return out


def schedule(room, end: float, hold: float = 0.0) -> list[tuple[float, float, int]]:
    """What this subscriber received, as seen by its decoder: spans from its first decoded video
    frame to `end`. A track counts from its first decoded frame, a new size from the first decoded
    frame of that size, each taken `hold` seconds earlier: aiortc's jitter buffer releases a video
    frame only when the next frame's first packet arrives, so a decoded frame reached the client
    one frame interval before it is seen here."""
    return spans([(t - hold, key, w * h) for key, rec in room.received.items()
                  if rec.kind == "video" for t, w, h in rec.sizes], end)


def expected_ms(schedule_spans, tiers=DEFAULT_TIERS) -> dict[str, float]:
    """Milliseconds per tier of a schedule."""
    out: dict[str, float] = {}
    for start, end, px in schedule_spans:
        tier = tier_of(px, tiers)
        out[tier] = out.get(tier, 0.0) + (end - start) * 1000
    return out


def ledger_rows(db_path, call_id: str) -> list[dict]:
    """The usage ledger's rows for a call, read straight from the server's SQLite file (read-only).
    doc: the ledger's rows are not in the protocol; the admin API reports only sums."""
    import sqlite3
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        cur = con.execute("SELECT user_id, tier, start_ms, end_ms FROM usage WHERE call_id = ? "
                          "ORDER BY user_id, start_ms", (call_id,))
        return [dict(user_id=u, tier=t, start_ms=s, end_ms=e) for u, t, s, e in cur]
    finally:
        con.close()


def overlaps(rows: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of rows of the same user that overlap in time."""
    bad = []
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    for rs in by_user.values():
        rs.sort(key=lambda r: r["start_ms"])
        for a, b in zip(rs, rs[1:]):
            if b["start_ms"] < a["end_ms"]:
                bad.append((a, b))
    return bad
