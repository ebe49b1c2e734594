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
    assert r["error_users"] == [], r
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
