"""Issue 11: TURN. The server hands out time-limited TURN REST credentials in `rtc_join`
(`ice_servers`); a client that may only use relay candidates gets media through a real coturn that
checks those credentials with `use-auth-secret`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from flows import start_call
from harness import Coturn
from media import PatternVideo, ToneAudio
from sbclient import Room

SECRET = "turn-shared-secret-for-the-interop-test"


@pytest.fixture
def coturn(tmp_path):
    t = Coturn(tmp_path, SECRET)
    t.start()
    yield t
    t.stop()


async def test_a_relay_only_client_gets_media_through_coturn(start_server, connect, coturn):
    server = start_server(turn_urls=coturn.url, turn_secret=SECRET, turn_ttl=600)
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    call_id = await start_call(alice, [bob])
    rooms = {"alice": Room(alice, call_id), "bob": Room(bob, call_id, relay_only=True)}
    try:
        before = int(time.time())
        for user, room in rooms.items():
            await room.join()
        # The credential is TURN REST: "<expiry>:<user_id>", base64(HMAC-SHA1(secret, username)).
        (ice,) = rooms["bob"].ice_servers
        assert ice["urls"] == [coturn.url], ice
        expiry, user = ice["username"].split(":", 1)
        assert user == "bob" and before + 600 <= int(expiry) <= int(time.time()) + 600, ice
        want = base64.b64encode(hmac.new(SECRET.encode(), ice["username"].encode(),
                                         hashlib.sha1).digest()).decode()
        assert ice["credential"] == want, ice

        for user, room in rooms.items():
            await room.publish([PatternVideo(320, 240, fps=15), ToneAudio(440.0)])
        for user, peer in (("alice", "bob"), ("bob", "alice")):
            await rooms[user].wait_for(
                lambda u=user, p=peer: all(r.frames >= 20 for r in rooms[u].tracks_from(p))
                and len(rooms[u].tracks_from(p)) == 2,
                40, f"20 frames of each of {peer}'s tracks")

        # Bob gathered relay candidates only, so everything he sent and received went through
        # coturn: both of his connections hold an allocation there, made with his credential.
        for pc in (rooms["bob"].publisher, rooms["bob"].subscriber):
            (transport,) = {t.receiver.transport.transport for t in pc.getTransceivers()}
            kinds = {c.type for c in transport.iceGatherer.getLocalCandidates()}
            assert kinds == {"relay"}, kinds
        log = coturn.log()
        assert log.count(f"user <{ice['username']}>") >= 2, log[-3000:]
    finally:
        for room in rooms.values():
            await room.close()
