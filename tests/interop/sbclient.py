"""A Switchboard client in Python, written from docs/protocol.md alone.

This is what a third-party client author would write: signaling over one WebSocket (sections 1-3),
and media with two aiortc peer connections per room (section 4): a *publisher* connection that this
client offers (`rtc_publish`), and a *subscriber* connection that the server offers (`rtc_offer`
event, answered with `rtc_answer`).

Two classes:

- `Signal`: one signaling session. `request(op, **args)` sends a request and returns its `result`,
  or raises `ProtocolError` with the error's `code`. Events are kept in arrival order;
  `next_event(name, where=...)` waits for the next one not yet taken. Every event also goes to
  listeners added with `on_event`. The session checks the protocol's own promises as it reads
  (the first event is `session`, `seq` counts from 1 with no gaps, every reply carries the id of a
  request we sent) and lists every breach in `violations`.
- `Room`: one participant's media in one call's room. `join()`, `publish(tracks)`, and the
  subscriber side runs by itself: each `rtc_offer` is answered in order, and every track the server
  forwards is recorded in `received`, keyed by the `(user_id, track_id)` read from its `msid`.

Nothing here knows the server's internals; where the document left a question open, the choice made
is commented with "doc:" and listed in the interop report.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import websockets
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp


class ProtocolError(Exception):
    """A request answered `ok: false`."""

    def __init__(self, op: str, code: str, message: str, details: Optional[dict] = None):
        super().__init__(f"{op}: {code}: {message}")
        self.op = op
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass
class Event:
    name: str
    seq: int
    data: dict
    at: float  # time.time() when it was read


class Signal:
    """One signaling session: `GET /v1/signal` with a bearer token (section 1)."""

    def __init__(self, ws, session: dict):
        self._ws = ws
        self.session_id: str = session["session_id"]
        self.user_id: str = session["user_id"]
        self.heartbeat: int = session.get("heartbeat", 30)
        self.events: list[Event] = []
        self.violations: list[str] = []
        self._taken: set[int] = set()
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._last_id = 0
        self._listeners: list[Callable[[Event], None]] = []
        self._last_seq = 1
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        self._keepalive = asyncio.create_task(self._ping())

    @classmethod
    async def connect(cls, base_url: str, token: str) -> "Signal":
        """Opens a session. The first frame must be the `session` event (section 1)."""
        url = base_url.replace("http://", "ws://", 1) + "/v1/signal"
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            ping_interval=None,  # we keep the session alive ourselves, from `heartbeat`
            max_size=2**20,
        )
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if first.get("event") != "session" or first.get("seq") != 1:
            await ws.close()
            raise AssertionError(f"first frame is not the session event: {first}")
        return cls(ws, first["data"])

    # ----- requests -----

    async def request(self, op: str, reply_within: float = 10, **args: Any) -> dict:
        """Sends `{"id","op","args"}` and returns the reply's `result` (section 2). `args` are the
        op's own arguments (`timeout` among them for call_invite); `reply_within` is how long to
        wait for the reply."""
        rid = next(self._ids)
        self._last_id = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = (op, fut)
        await self._ws.send(json.dumps({"id": rid, "op": op, "args": args}))
        try:
            reply = await asyncio.wait_for(fut, reply_within)
        finally:
            self._pending.pop(rid, None)
        if reply.get("ok"):
            return reply.get("result", {})
        err = reply.get("error", {})
        raise ProtocolError(op, err.get("code", "?"), err.get("message", ""), err.get("details"))

    # Call invitation (section 3.2), thin wrappers that name the arguments.
    async def call_invite(self, invitees, mode="general", timeout=60, extended_data=""):
        return await self.request(
            "call_invite", invitees=list(invitees), mode=mode, timeout=timeout,
            extended_data=extended_data,
        )

    async def call_accept(self, call_id, extended_data=""):
        return await self.request("call_accept", call_id=call_id, extended_data=extended_data)

    async def call_reject(self, call_id, extended_data=""):
        return await self.request("call_reject", call_id=call_id, extended_data=extended_data)

    async def call_quit(self, call_id, extended_data=""):
        return await self.request("call_quit", call_id=call_id, extended_data=extended_data)

    async def call_end(self, call_id, extended_data=""):
        return await self.request("call_end", call_id=call_id, extended_data=extended_data)

    # ----- events -----

    def on_event(self, listener: Callable[[Event], None]) -> None:
        """Calls `listener(event)` for every event from now on (in the reader task)."""
        self._listeners.append(listener)

    async def next_event(
        self,
        name: str,
        where: Optional[Callable[[dict], bool]] = None,
        timeout: float = 10,
    ) -> dict:
        """The data of the first event called `name` (matching `where`) not taken before; waits
        for it up to `timeout` seconds."""

        def find():
            for i, e in enumerate(self.events):
                if i not in self._taken and e.name == name and (where is None or where(e.data)):
                    self._taken.add(i)
                    return e.data
            return None

        async def wait():
            async with self._changed:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self.closed.done():
                        raise ConnectionError(f"session closed while waiting for {name}")
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            seen = [e.name for e in self.events]
            raise AssertionError(
                f"{self.user_id}: no {name} event within {timeout}s; events so far: {seen}"
            ) from None

    # ----- the socket -----

    async def _read(self) -> None:
        try:
            async for text in self._ws:
                if isinstance(text, bytes):
                    self.violations.append("server sent a binary frame")
                    continue
                msg = json.loads(text)
                if "event" in msg:
                    seq = msg.get("seq")
                    if seq != self._last_seq + 1:
                        self.violations.append(f"event seq {seq} after {self._last_seq}")
                    self._last_seq = seq if isinstance(seq, int) else self._last_seq
                    ev = Event(msg["event"], seq, msg.get("data", {}), time.time())
                    async with self._changed:
                        self.events.append(ev)
                        self._changed.notify_all()
                    for listener in list(self._listeners):
                        listener(ev)
                elif "id" in msg and msg["id"] in self._pending:
                    _, fut = self._pending[msg["id"]]
                    if not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg.get("id"), int) and 0 < msg["id"] <= self._last_id:
                    pass  # a reply nobody waits for any more (the waiter was cancelled)
                else:
                    self.violations.append(f"unexpected frame: {text[:200]}")
        except websockets.ConnectionClosed:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result(self._ws.close_code)
            for _, fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("signaling session closed"))
            async with self._changed:
                self._changed.notify_all()

    async def _ping(self) -> None:
        """Keeps the session alive: a WebSocket ping at a third of `heartbeat` (section 1)."""
        try:
            while True:
                await asyncio.sleep(max(1.0, self.heartbeat / 3))
                await self._ws.ping()
        except (websockets.ConnectionClosed, asyncio.CancelledError):
            pass

    async def close(self) -> None:
        self._keepalive.cancel()
        await self._ws.close()
        await asyncio.gather(self._reader, self._keepalive, return_exceptions=True)


# ======================================================================================
# Media (section 4)
# ======================================================================================


def split_candidates(sdp: str) -> tuple[str, list[dict]]:
    """The SDP without its candidate lines, and those candidates as RTCIceCandidateInit objects
    (`candidate`, `sdpMid`, `sdpMLineIndex`), each once (a BUNDLE repeats them per m-section),
    for a client that trickles (section 4)."""
    lines = sdp.split("\r\n")
    mids, index = {}, -1
    for line in lines:
        if line.startswith("m="):
            index += 1
        elif line.startswith("a=mid:"):
            mids[index] = line[len("a=mid:"):]
    kept, found, seen, index = [], [], set(), -1
    for line in lines:
        if line.startswith("m="):
            index += 1
        if line.startswith("a=candidate:"):
            if line not in seen:
                seen.add(line)
                found.append({"candidate": line[2:], "sdpMid": mids.get(index),
                              "sdpMLineIndex": index})
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept), found


def sdp_msids(sdp: str) -> dict[str, str]:
    """mid -> msid value of every m-section of an SDP that has both."""
    out: dict[str, str] = {}
    for section in sdp.split("\r\nm=")[1:]:
        mid = msid = None
        for line in section.split("\r\n"):
            if line.startswith("a=mid:"):
                mid = line[len("a=mid:"):].strip()
            elif line.startswith("a=msid:"):
                msid = line[len("a=msid:"):].strip()
        if mid is not None and msid is not None:
            out[mid] = msid
    return out


@dataclass
class Received:
    """One forwarded track as this subscriber decodes it."""

    user_id: str
    track_id: str
    kind: str
    mid: str
    frames: int = 0
    first_at: Optional[float] = None
    last_at: Optional[float] = None
    # (time.time() of the first frame of a size, width, height), in order; video only
    sizes: list[tuple[float, int, int]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    # Every frame goes here too, for checks of the content (colour, tone); set by the test.
    inspect: Optional[Callable[[Any], None]] = None
    ended: bool = False

    @property
    def size(self) -> Optional[tuple[int, int]]:
        return (self.sizes[-1][1], self.sizes[-1][2]) if self.sizes else None


class Room:
    """A participant's media in the room named by `call_id` (section 4)."""

    def __init__(self, signal: Signal, call_id: str, video_codec: Optional[str] = None,
                 rewrite_offer: Optional[Callable[[str], str]] = None, trickle: bool = False,
                 relay_only: bool = False):
        """`video_codec` ("VP8", "H264") restricts what the publisher offers. `rewrite_offer`
        lets a test change the server's subscriber offer before it is applied (the loss test
        points the server's candidate at a relay). `trickle`: send our candidates with
        rtc_candidate after the offer/answer instead of inside it. `relay_only`: gather only relay
        candidates, through the TURN servers rtc_join hands out (ice_servers)."""
        self.signal = signal
        self.call_id = call_id
        self.video_codec = video_codec
        self.rewrite_offer = rewrite_offer
        self.trickle = trickle
        # The TURN servers come with rtc_join (ice_servers); the connections are made again then,
        # before either has offered or answered anything.
        self.relay_only = relay_only
        self.ice_servers: list[dict] = []
        self._joined = asyncio.Event()
        self.publisher = RTCPeerConnection(self._config())
        self.subscriber = RTCPeerConnection(self._config())
        self.received: dict[tuple[str, str], Received] = {}
        self.offers_answered = 0
        self.participants: list[dict] = []
        self._offers: asyncio.Queue = asyncio.Queue()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._answering = asyncio.create_task(self._answer_offers())
        signal.on_event(self._on_event)
        self.errors: list[BaseException] = []

    def _config(self) -> RTCConfiguration:
        servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                                credential=s.get("credential")) for s in self.ice_servers]
        policy = RTCIceTransportPolicy.RELAY if self.relay_only else RTCIceTransportPolicy.ALL
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)

    def _on_event(self, ev: Event) -> None:
        if self._closing or ev.data.get("call_id") != self.call_id:
            return
        if ev.name == "rtc_offer":
            self._offers.put_nowait(ev.data["sdp"])
        elif ev.name == "rtc_candidate":
            self._tasks.append(asyncio.create_task(self._add_candidate(ev.data)))

    async def _add_candidate(self, data: dict) -> None:
        # doc: the server says it never trickles, but the event exists; handle it as a browser
        # would. The candidate is an RTCIceCandidateInit: {candidate, sdpMid, sdpMLineIndex}.
        init = data["candidate"]
        line = init.get("candidate", "")
        if not line:
            return
        cand = candidate_from_sdp(line.removeprefix("candidate:"))
        cand.sdpMid = init.get("sdpMid")
        cand.sdpMLineIndex = init.get("sdpMLineIndex")
        pc = self.publisher if data.get("target") == "publisher" else self.subscriber
        await pc.addIceCandidate(cand)

    # ----- ops -----

    async def join(self) -> list[dict]:
        """`rtc_join`: enters the room; returns the other participants with their tracks."""
        try:
            result = await self.signal.request("rtc_join", call_id=self.call_id)
            self.participants = result["participants"]
            self.ice_servers = result["ice_servers"]
            if self.ice_servers:
                await self.publisher.close()
                await self.subscriber.close()
                self.publisher = RTCPeerConnection(self._config())
                self.subscriber = RTCPeerConnection(self._config())
        finally:
            # Offers that overtook the reply wait for the connections made with ice_servers.
            self._joined.set()
        return self.participants

    async def publish(self, tracks: list[MediaStreamTrack]) -> str:
        """Offers the publisher connection with `tracks` (send-only) and applies the answer.
        Returns the answer SDP.

        doc: the answer is all the result carries: the document gives no way to learn the
        track IDs the server chose for our own tracks (others hear track_published; we don't).
        Nor does it list the codecs the server accepts (Opus, VP8, VP9, H.264, AV1 in practice)."""
        for track in tracks:
            transceiver = self.publisher.addTransceiver(track, direction="sendonly")
            if track.kind == "video" and self.video_codec:
                wanted = {f"video/{self.video_codec}".lower(), "video/rtx"}
                codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs
                          if c.mimeType.lower() in wanted]
                transceiver.setCodecPreferences(codecs)
        offer = await self.publisher.createOffer()
        # aiortc gathers every candidate here, so the offer carries them all (no trickle).
        await self.publisher.setLocalDescription(offer)
        sdp, candidates = split_candidates(self.publisher.localDescription.sdp)
        if not self.trickle:
            sdp, candidates = self.publisher.localDescription.sdp, []
        result = await self.signal.request("rtc_publish", call_id=self.call_id, sdp=sdp)
        await self.publisher.setRemoteDescription(
            RTCSessionDescription(sdp=result["sdp"], type="answer")
        )
        await self._send_candidates("publisher", candidates)
        return result["sdp"]

    async def _send_candidates(self, target: str, candidates: list[dict]) -> None:
        if not self.trickle:
            return
        for c in candidates:
            await self.signal.request("rtc_candidate", call_id=self.call_id, target=target,
                                      candidate=c)
        # doc: the end of candidates is not described; a browser sends an empty candidate.
        await self.signal.request("rtc_candidate", call_id=self.call_id, target=target,
                                  candidate={"candidate": "", "sdpMid": None,
                                             "sdpMLineIndex": None})

    async def subscription(self, track_id: str, enabled: bool = True,
                           max_width: Optional[int] = None,
                           max_height: Optional[int] = None) -> None:
        """`rtc_subscription`: pause/resume one forwarded track, or cap its resolution."""
        args: dict[str, Any] = dict(call_id=self.call_id, track_id=track_id, enabled=enabled)
        if max_width is not None:
            args["max_width"] = max_width
        if max_height is not None:
            args["max_height"] = max_height
        await self.signal.request("rtc_subscription", **args)

    async def leave(self) -> None:
        await self.signal.request("rtc_leave", call_id=self.call_id)

    async def close(self) -> None:
        # The answering loop also stops on a None offer: Python 3.11's wait_for (inside
        # request) can swallow a cancellation that races with a reply, so cancel alone may not
        # stop it, and close must not wait forever.
        self._closing = True
        self._offers.put_nowait(None)
        self._answering.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.wait([self._answering, *self._tasks], timeout=5)
        await self.publisher.close()
        await self.subscriber.close()

    # ----- the subscriber connection -----

    async def _answer_offers(self) -> None:
        """Answers the server's offers one at a time, in the order they came (section 4).

        doc: the document does not say when the first rtc_offer comes (here: once another
        participant has published, which may be never), nor that the server waits for each answer
        before it offers again; answering strictly in order is safe either way."""
        while not self._closing:
            sdp = await self._offers.get()
            if sdp is None:
                return
            await self._joined.wait()
            try:
                if self.rewrite_offer:
                    sdp = self.rewrite_offer(sdp)
                await self.subscriber.setRemoteDescription(
                    RTCSessionDescription(sdp=sdp, type="offer")
                )
                self._track_new_receivers(sdp)
                answer = await self.subscriber.createAnswer()
                await self.subscriber.setLocalDescription(answer)
                sdp, candidates = split_candidates(self.subscriber.localDescription.sdp)
                if not self.trickle:
                    sdp, candidates = self.subscriber.localDescription.sdp, []
                await self.signal.request("rtc_answer", call_id=self.call_id, sdp=sdp)
                await self._send_candidates("subscriber", candidates)
                self.offers_answered += 1
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # keep answering; the test sees the error
                self.errors.append(e)

    def _track_new_receivers(self, offer_sdp: str) -> None:
        """Starts recording each newly offered track, named by its msid `<user_id> <track_id>`.

        doc: a Track's `mid` (in rtc_join and track_published) is not the subscriber connection's
        mid; the document does not say so, and a client that maps transceivers by it gets the
        wrong track. The msid is the only reliable key."""
        msids = sdp_msids(offer_sdp)
        for transceiver in self.subscriber.getTransceivers():
            track = transceiver.receiver.track
            if track is None or transceiver.mid not in msids:
                continue
            parts = msids[transceiver.mid].split()
            if len(parts) != 2:
                self.errors.append(AssertionError(f"msid {msids[transceiver.mid]!r} is not "
                                                  "'<user_id> <track_id>'"))
                continue
            key = (parts[0], parts[1])
            if key in self.received:
                continue
            rec = Received(parts[0], parts[1], track.kind, transceiver.mid)
            self.received[key] = rec
            self._tasks.append(asyncio.create_task(self._consume(track, rec)))

    async def _consume(self, track: MediaStreamTrack, rec: Received) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                rec.ended = True
                return
            now = time.time()
            rec.frames += 1
            rec.last_at = now
            rec.arrivals.append(now)
            if rec.first_at is None:
                rec.first_at = now
            if rec.kind == "video":
                if not rec.sizes or (rec.sizes[-1][1], rec.sizes[-1][2]) != (frame.width, frame.height):
                    rec.sizes.append((now, frame.width, frame.height))
            if rec.inspect:
                rec.inspect(frame)

    # ----- waiting -----

    def tracks_from(self, user_id: str, kind: Optional[str] = None) -> list[Received]:
        return [r for r in self.received.values()
                if r.user_id == user_id and (kind is None or r.kind == kind)]

    async def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `cond` every 20 ms until it holds; fails after `timeout` seconds naming `what`."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.errors:
                raise AssertionError(f"{self.signal.user_id}: {self.errors[0]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.signal.user_id}: timed out waiting for {what}; "
                                     f"received: {self.describe()}")
            await asyncio.sleep(0.02)

    def describe(self) -> str:
        return ", ".join(f"{r.user_id}/{r.kind}:{r.frames}f{'@%dx%d' % r.size if r.size else ''}"
                         for r in self.received.values()) or "nothing"

