"""Issue 13: deploy/README.md's "Several nodes, one address", done as a new operator would on one
machine with Debian's packages: PostgreSQL (a role and a database made with the README's psql
commands), redis-server without persistence, two `switchboard serve` nodes configured through the
README's environment variables, and Debian's nginx in front with deploy/cluster/switchboard-nginx.conf
(its upstream pointed at the nodes as the README's sed does).

Through nginx's one address, alice and bob land on different nodes; alice's call rings bob, he
accepts, both join the room with aiortc and each decodes the other's video from whichever node the
room was placed on; after the call, the billing report (asked of nginx, so of either node) bills each
of them what they received, as test_billing checks on one node.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flows import expected_ms, has_state, schedule
from harness import BINARY, ROOT, Server
from media import PatternVideo
from sbclient import Room

SECRET = "walkthrough-secret-0123456789abcdef0123456789"
FPS = 10
HOLD_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str) -> str:
    """The path of a Debian package's binary; missing, the test fails under CI (scripts/test installs
    it) and is skipped elsewhere."""
    found = shutil.which(binary) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{binary}"))
         if p.exists()), None) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is missing: scripts/test installs it")
        pytest.skip(f"{binary} is not installed")
    return found


def wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Services:
    """PostgreSQL, Redis and nginx for the walkthrough, all on 127.0.0.1 or Unix sockets."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        # PostgreSQL runs as the `postgres` user, who cannot enter pytest's private tmp_path.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="switchboard-pg."))

    def postgres(self) -> str:
        """Step 1: the database server, then the README's role and database. Returns the URL the
        README gives every node (the socket directory as the host)."""
        need("psql")
        out = subprocess.run([str(ROOT / "scripts" / "pg-test-server"), "start", str(self.pg_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        superuser = out.stdout.strip().splitlines()[-1]
        for sql in ("CREATE ROLE switchboard LOGIN PASSWORD 'change-me'",
                    "CREATE DATABASE switchboard OWNER switchboard"):
            r = subprocess.run([need("psql"), superuser, "-v", "ON_ERROR_STOP=1", "-c", sql],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
        host = str(self.pg_dir).replace("/", "%2F")
        return f"postgres://switchboard:change-me@{host}/switchboard"

    def redis(self) -> str:
        """Step 1: redis-server as the README configures it: no snapshots, no append-only file."""
        port = free_port()
        log = open(self.workdir / "redis.log", "wb")
        self.procs.append(subprocess.Popen(
            [need("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT))
        log.close()
        wait_until(lambda: _connects(port), 10, "redis-server")
        return f"redis://127.0.0.1:{port}/0"

    def nginx(self, nodes: list[str]) -> str:
        """Step 3: the site from deploy/cluster, its upstream pointed at the nodes, in a minimal
        nginx.conf (Debian's includes conf.d the same way, inside its http block)."""
        nginx = need("nginx")
        site = (ROOT / "deploy" / "cluster" / "switchboard-nginx.conf").read_text()
        servers = re.findall(r"server (node-[a-z]):7880", site)
        assert servers == ["node-a", "node-b"], servers
        for name, addr in zip(servers, nodes):
            site = site.replace(f"{name}:7880", addr)  # the README's sed
        port = free_port()
        assert "listen 7880;" in site
        site = site.replace("listen 7880;", f"listen 127.0.0.1:{port};")
        d = self.workdir / "nginx"
        d.mkdir()
        (d / "switchboard.conf").write_text(site)
        temp = [f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
        (d / "nginx.conf").write_text(
            f"worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n"
            f"events {{ worker_connections 768; }}\n"
            f"http {{\n access_log {d}/access.log;\n {' '.join(temp)}\n include {d}/switchboard.conf;\n}}\n")
        r = subprocess.run([nginx, "-t", "-p", str(d), "-c", str(d / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        log = open(d / "stdout.log", "wb")
        self.procs.append(subprocess.Popen(
            [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT))
        log.close()
        wait_until(lambda: _connects(port), 10, "nginx")
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run([str(ROOT / "scripts" / "pg-test-server"), "stop", str(self.pg_dir)],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.pg_dir, ignore_errors=True)


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def node_index(session_id: str) -> int:
    """docs/architecture.md: a session ID carries its node's index above its low 40 bits."""
    return int(session_id.removeprefix("s_"), 16) >> 40


@pytest.fixture
def services(tmp_path):
    s = Services(tmp_path)
    yield s
    s.stop()


async def test_two_nodes_behind_nginx_ring_connect_and_bill_like_one(tmp_path, services, connect):
    storage_url = services.postgres()
    redis_url = services.redis()
    ports = [free_port(), free_port()]
    nodes = []
    for name, port in zip(("node-a", "node-b"), ports):
        # Step 2: the README's /etc/switchboard/switchboard.env, one per node.
        node = Server(tmp_path / name, secret=SECRET,
                      storage_url=storage_url,
                      cluster_redis_url=redis_url,
                      server_node_id=name,
                      server_listen=f"127.0.0.1:{port}",
                      cluster_advertise=f"http://127.0.0.1:{port}",
                      http_trusted_proxies='["127.0.0.1"]',
                      billing_checkpoint=2)
        node.workdir.mkdir()
        node.start(timeout=30)
        nodes.append(node)
    try:
        front = Server(tmp_path / "front", secret=SECRET)
        front.base_url = services.nginx([f"127.0.0.1:{p}" for p in ports])

        # Step 4: both nodes answer through the one address, and one owns the calls.
        def cluster_ready():
            status, body = front.get("/v1/cluster")
            if status != 200:
                return None
            c = json.loads(body)
            return c if len(c["nodes"]) == 2 and c["owner"] else None
        cluster = await asyncio.to_thread(wait_until, cluster_ready, 20, "two nodes in /v1/cluster")
        index = {n["index"]: n["node_id"] for n in cluster["nodes"]}

        # nginx spreads the WebSockets (least_conn): alice and bob end up on different nodes.
        alice = await connect(front, "alice")
        bob = await connect(front, "bob")
        extra = []
        while node_index(bob.session_id) == node_index(alice.session_id):
            assert len(extra) < 4, "nginx kept every session on one node"
            extra.append(bob)
            bob = await connect(front, "bob")
        for s in extra:
            await s.close()
        on = {u.user_id: index[node_index(u.session_id)] for u in (alice, bob)}
        assert on["alice"] != on["bob"], on

        # It rings across nodes, and the answer reaches the caller.
        r = await alice.call_invite(["bob"], mode="advanced", timeout=30)
        call_id = r["call_id"]
        assert r["error_users"] == [], r
        inv = await bob.next_event("call_invitation_received", where=lambda d: d["call_id"] == call_id)
        assert inv["caller"] == "alice", inv
        await bob.call_accept(call_id)
        await alice.next_event("call_user_state_changed",
                               where=lambda d: d["call_id"] == call_id and has_state("bob", "accepted")(d))

        # Both join the room, wherever it was placed, and each decodes the other.
        sizes = {"alice": (640, 360), "bob": (1280, 720)}
        rooms = {"alice": Room(alice, call_id), "bob": Room(bob, call_id)}
        videos = {u: PatternVideo(w, h, fps=FPS, chroma=(60 + 90 * i, 120))
                  for i, (u, (w, h)) in enumerate(sizes.items())}
        try:
            for room in rooms.values():
                await room.join()
            for u, room in rooms.items():
                await room.publish([videos[u]])
            for u, other in (("alice", "bob"), ("bob", "alice")):
                await rooms[u].wait_for(
                    lambda u=u, o=other: any(t.size == sizes[o] for t in rooms[u].tracks_from(o, "video")),
                    30, f"{u} decoding {other}'s {sizes[other]}")
            detail = await front.get_json(f"/v1/calls/{call_id}")
            assert detail["room_node"] in on.values(), detail
            assert {p["user_id"] for p in detail["room"]["participants"]} == {"alice", "bob"}, detail
            await asyncio.sleep(HOLD_S)
            end = time.time()
            await alice.call_end(call_id)
        finally:
            for room in rooms.values():
                await room.close()

        # Billed like a call on one node: each user's tier time is what they decoded (alice
        # received 1280x720 = hd, bob 640x360 = hd), within 1 % or 300 ms.
        expected = {u: expected_ms(schedule(rooms[u], end, hold=1 / FPS)) for u in rooms}
        assert all(expected[u].get("hd", 0) > HOLD_S * 1000 for u in rooms), expected

        def billed():
            report = json.loads(front.get(f"/v1/billing/usage?call_id={call_id}")[1])
            got: dict[str, dict[str, int]] = {}
            for row in report.get("calls", []):
                got.setdefault(row["user_id"], {})[row["tier"]] = row["ms"]
            close = all(abs(got.get(u, {}).get(t, 0) - ms) <= max(0.01 * ms, 300)
                        for u in rooms for t, ms in expected[u].items())
            return got if close else None
        try:
            await asyncio.to_thread(wait_until, billed, 15, "the usage report")
        except AssertionError:
            raise AssertionError(f"billed {json.loads(front.get(f'/v1/billing/usage?call_id={call_id}')[1])}, "
                                 f"schedule says {expected}") from None

        # The history is one call, seen the same from either node.
        for node in nodes:
            call = await node.get_json(f"/v1/calls/{call_id}")
            assert call["state"] == "ended" and call["caller"] == "alice", call

        # The README's load step, through nginx: calls ring, connect and carry media.
        out = await asyncio.to_thread(
            subprocess.run,
            [str(BINARY), "loadtest", "--url", front.base_url, "--rooms", "2", "--duration", "3s",
             "--json", "--quiet"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
                 "SWITCHBOARD_AUTH_SECRET": SECRET},
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout)
        assert report["latency_us"]["count"] > 100 and report["loss"] < 0.05, report
        # The room nodes measured each room's video from the bitstream.
        assert sorted((m["width"], m["height"]) for m in report["measured_layers"]) == [(1280, 720)] * 2, report
    finally:
        for node in nodes:
            node.stop()
        problems = [line for n in nodes for line in n.log_problems()]
        assert not problems, "\n".join(problems)
