"""The test harness around the real server binary: start/kill/restart it, tokens, admin HTTP,
/metrics, a lossy UDP relay, and a patch that keeps aiortc's ICE on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import aioice.ice
import jwt

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("SWITCHBOARD_BIN", ROOT / "target" / "release" / "switchboard"))


def keep_ice_on_loopback() -> None:
    """aioice gathers host candidates on every interface except loopback; these tests use only
    127.0.0.1, so gather exactly that."""
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]


class Server:
    """One `switchboard serve` process with its own database, secret and ports (both chosen by
    the OS: port 0; the bound addresses are read from the server's JSON log)."""

    def __init__(self, workdir: Path, secret: str = "interop-secret-0123456789abcdef0123456789", **config: str):
        self.workdir = workdir
        self.db = workdir / "switchboard.db"
        self.secret = secret
        self.config = config  # extra SWITCHBOARD_* variables, e.g. BILLING_CHECKPOINT="2"
        self.proc: Optional[subprocess.Popen] = None
        self.base_url = ""
        self.udp_port = 0
        self.starts = 0
        self._admin_token: Optional[str] = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SWITCHBOARD_") and k != "RUST_LOG"}
        env.update({
            "SWITCHBOARD_STORAGE_PATH": str(self.db),
            "SWITCHBOARD_SERVER_LISTEN": "127.0.0.1:0",
            "SWITCHBOARD_MEDIA_UDP_PORT": "0",
            "SWITCHBOARD_MEDIA_TCP_PORT": "0",
            "SWITCHBOARD_MEDIA_BIND": "127.0.0.1",
            "SWITCHBOARD_AUTH_SECRET": self.secret,
            "SWITCHBOARD_LOG_FORMAT": "json",
            "SWITCHBOARD_LOG_LEVEL": "info",
            # A stop (SIGTERM) drains calls in progress; tests need not wait long for that.
            "SWITCHBOARD_SERVER_DRAIN_TIMEOUT": "1",
        })
        for key, value in self.config.items():
            env[f"SWITCHBOARD_{key.upper()}"] = str(value)
        return env

    def start(self, timeout: float = 15) -> None:
        assert BINARY.exists(), f"{BINARY} is missing: run cargo build --release"
        self.starts += 1
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(BINARY), "serve"], env=self.env(), cwd=self.workdir,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        http = udp = tcp = None
        while time.monotonic() < deadline and not (http and udp):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                http = fields.get("http", http)
                udp = fields.get("udp", udp)
                tcp = fields.get("tcp", tcp)
            time.sleep(0.02)
        if not (http and udp):
            raise RuntimeError(f"server did not report its addresses:\n{self.log_tail()}")
        self.base_url = f"http://{http}"
        self.udp_port = int(udp.rsplit(":", 1)[1])
        self.tcp_port = int(tcp.rsplit(":", 1)[1]) if tcp else 0
        while time.monotonic() < deadline:
            try:
                if self.get("/readyz", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_problems(self) -> list[str]:
        """ERROR lines and panics in every log this server wrote."""
        out = []
        for i in range(1, self.starts + 1):
            p = self.workdir / f"server-{i}.log"
            for line in p.read_text(errors="replace").splitlines():
                if '"level":"ERROR"' in line or "panicked" in line:
                    out.append(line)
        return out

    # ----- tokens -----

    def token(self, user: str, admin: bool = False, name: Optional[str] = None,
              ttl: int = 3600) -> str:
        """An HS256 token as section 1 describes it, made here with PyJWT."""
        claims = {"sub": user, "exp": int(time.time()) + ttl, "iat": int(time.time())}
        if name:
            claims["name"] = name
        if admin:
            claims["admin"] = True
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def admin_token(self) -> str:
        """An admin token printed by `switchboard token --admin` (the documented way)."""
        if self._admin_token is None:
            out = subprocess.run([str(BINARY), "token", "--user", "interop-admin", "--admin"],
                                 env=self.env(), capture_output=True, text=True, timeout=30,
                                 check=True)
            self._admin_token = out.stdout.strip().splitlines()[-1].strip()
        return self._admin_token

    # ----- HTTP -----

    def get(self, path: str, auth: bool = True, token: Optional[str] = None):
        """(status, body text) of a GET, with the admin token unless told otherwise."""
        req = urllib.request.Request(self.base_url + path)
        if auth:
            req.add_header("Authorization", f"Bearer {token or self.admin_token()}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    async def aget(self, path: str, **kw):
        return await asyncio.to_thread(self.get, path, **kw)

    async def get_json(self, path: str) -> dict:
        status, body = await self.aget(path)
        assert status == 200, f"GET {path}: {status} {body}"
        return json.loads(body)

    async def metrics(self) -> dict[str, float]:
        """/metrics as {series (name plus labels): value}, and each name's sum under the bare name."""
        status, body = await self.aget("/metrics", auth=False)
        assert status == 200, body
        out: dict[str, float] = {}
        for line in body.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if not m:
                continue
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name + labels] = value
            if labels:
                out[name] = out.get(name, 0.0) + value
        return out


class LossyRelay(asyncio.DatagramProtocol):
    """A UDP relay on 127.0.0.1 between one client and the server's media port. It forwards both
    ways and drops a fraction of the SRTP/SRTCP datagrams (first byte 128..191, RFC 7983) going
    to the client; ICE and DTLS pass untouched, so setup is not slowed by loss. With `delay` and
    `jitter` (seconds) every datagram to the client is held delay +- jitter (uniform), as
    `tc netem delay D J` does, so datagrams also arrive out of order."""

    def __init__(self, server_port: int, drop_to_client: float, seed: int = 7,
                 delay: float = 0.0, jitter: float = 0.0):
        self.server_addr = ("127.0.0.1", server_port)
        self.drop = drop_to_client
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.client_addr = None
        self.to_client = self.dropped = self.to_server = 0
        self.transport = None
        self.upstream = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0))
        relay = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                relay._from_server(data)

        self.upstream, _ = await loop.create_datagram_endpoint(
            Upstream, local_addr=("127.0.0.1", 0), remote_addr=self.server_addr)
        return self.transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):  # from the client
        self.client_addr = addr
        self.to_server += 1
        self.upstream.sendto(data)

    async def rebind(self) -> None:
        """Sends on from a new source port, as a NAT that lost its mapping does: the server sees
        the same client (same ICE credentials) at a new address; the old port is closed."""
        loop = asyncio.get_running_loop()
        relay = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                relay._from_server(data)

        old = self.upstream
        self.upstream, _ = await loop.create_datagram_endpoint(
            Upstream, local_addr=("127.0.0.1", 0), remote_addr=self.server_addr)
        if old:
            old.close()

    def _from_server(self, data: bytes) -> None:
        if self.client_addr is None:
            return
        if data and 128 <= data[0] <= 191 and self.rng.random() < self.drop:
            self.dropped += 1
            return
        self.to_client += 1
        if self.delay <= 0 and self.jitter <= 0:
            self.transport.sendto(data, self.client_addr)
            return
        hold = max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        asyncio.get_running_loop().call_later(hold, self._send_late, data, self.client_addr)

    def _send_late(self, data: bytes, addr) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport:
            self.transport.close()
        if self.upstream:
            self.upstream.close()


class UdpToTcpRelay(asyncio.DatagramProtocol):
    """Carries a UDP-only client's media to the server's ICE-TCP port: each client address gets
    one TCP connection, and every datagram travels as an RFC 4571 frame, both ways. With
    `point_candidates_at` the client's peer connection then runs over ICE-TCP on the server side
    (the server sees TCP candidates and `Protocol::Tcp`), which aiortc cannot do by itself."""

    def __init__(self, tcp_port: int):
        self.tcp_port = tcp_port
        self.transport = None
        self.conns: dict = {}
        self.frames_up = self.frames_down = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0))
        return self.transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        c = self.conns.get(addr)
        if c is None:
            c = self.conns[addr] = {"queue": [data], "writer": None}
            asyncio.get_running_loop().create_task(self._open(addr, c))
            return
        if c["writer"] is None:
            c["queue"].append(data)
            return
        self._send(c, data)

    def _send(self, c, data: bytes) -> None:
        c["writer"].write(len(data).to_bytes(2, "big") + data)
        self.frames_up += 1

    async def _open(self, addr, c) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.tcp_port)
        c["writer"] = writer
        for d in c["queue"]:
            self._send(c, d)
        c["queue"] = []
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                frame = await reader.readexactly(n)
                self.frames_down += 1
                if self.transport:
                    self.transport.sendto(frame, addr)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def close(self) -> None:
        for c in self.conns.values():
            if c["writer"]:
                c["writer"].close()
        if self.transport:
            self.transport.close()


def point_candidates_at(sdp: str, port: int) -> str:
    """Rewrites every UDP host candidate in an SDP to 127.0.0.1:`port`."""
    def fix(m: re.Match) -> str:
        return f"{m.group(1)}127.0.0.1 {port} typ host"
    return re.sub(r"(a=candidate:\S+ \d+ udp \d+ )\S+ \d+ typ host", fix, sdp, flags=re.I)


class Coturn:
    """A real TURN server (Debian's coturn, `turnserver`) on 127.0.0.1, checking TURN REST
    credentials with `use-auth-secret` and `static-auth-secret` as deploy/coturn/turnserver.conf
    does. Loopback peers are allowed, since the Switchboard media port is on 127.0.0.1 here."""

    def __init__(self, workdir: Path, secret: str, ip: str = "127.0.0.1", tcp: bool = False):
        """`ip`: the address coturn listens and relays on; `tcp`: also take TURN over TCP (for
        clients whose UDP is blocked), and hand out the `?transport=tcp` URL."""
        self.workdir = workdir
        self.secret = secret
        self.ip = ip
        self.tcp = tcp
        self.port = _free_udp_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = workdir / "turnserver.log"

    @property
    def url(self) -> str:
        return f"turn:{self.ip}:{self.port}?transport={'tcp' if self.tcp else 'udp'}"

    def start(self, timeout: float = 10) -> None:
        binary = shutil.which("turnserver")
        assert binary, "coturn is missing (apt-get install coturn; scripts/test installs it)"
        conf = self.workdir / "turnserver.conf"
        conf.write_text("\n".join([
            f"listening-ip={self.ip}",
            f"listening-port={self.port}",
            f"relay-ip={self.ip}",
            "min-port=40000",
            "max-port=40999",
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            "realm=switchboard.test",
            "fingerprint",
            "no-tls",
            "no-dtls",
            *([] if self.tcp else ["no-tcp"]),
            "no-cli",
            "allow-loopback-peers",
            "no-software-attribute",
            f"pidfile={self.workdir / 'turnserver.pid'}",
            f"log-file={self.log_path}",
            "simple-log",
            "verbose",
            "",
        ]))
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"turnserver exited: {self.log()}"
            if "listener opened on" in self.log() or "IPv4. UDP listener opened" in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"turnserver did not open its listener: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class Netns:
    """A client network namespace joined to this host by a veth pair: `host_ip` on this side,
    `ns_ip` inside (a /30 of 10.213.0.0/16 picked from the process ID). Made and removed by the
    test; needs root (ip netns, nftables)."""

    def __init__(self, tag: str):
        pid = os.getpid()
        n = pid % 250 + 1
        self.name = f"sb{tag}{pid}"
        self.host_if = f"sbp{pid % 100000}"
        self.ns_if = f"sbq{pid % 100000}"
        self.host_ip = f"10.213.{n}.5"
        self.ns_ip = f"10.213.{n}.6"
        self.created = False

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    def exec(self, *cmd: str) -> str:
        return self.run("ip", "netns", "exec", self.name, *cmd)

    def create(self) -> "Netns":
        self.run("ip", "netns", "add", self.name)
        self.created = True
        self.run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "netns", self.name)
        self.run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.run("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def block_udp_to(self, ip: str) -> None:
        """Drops (and counts) every UDP datagram the namespace sends to `ip`."""
        self.exec("nft", "add", "table", "inet", "sbblock")
        self.exec("nft", "add", "chain", "inet", "sbblock", "out",
                  "{ type filter hook output priority 0; policy accept; }")
        self.exec("nft", "add", "rule", "inet", "sbblock", "out", "ip", "daddr", ip,
                  "meta", "l4proto", "udp", "counter", "drop")

    def udp_dropped(self) -> int:
        out = self.exec("nft", "list", "table", "inet", "sbblock")
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
