"""Fixtures: a real `switchboard serve` per test (temp database, OS-chosen ports), and the
signaling sessions a test opens, all closed afterwards."""

from __future__ import annotations

import asyncio
import sys

import pytest

from harness import Server, keep_ice_on_loopback
from sbclient import Signal

keep_ice_on_loopback()


@pytest.fixture
def start_server(tmp_path):
    """`start_server(**config)` starts a server with extra SWITCHBOARD_<KEY>=value settings
    (e.g. billing_checkpoint=2). It is stopped after the test; a panic in its log fails the test."""
    servers: list[Server] = []

    def start(**config) -> Server:
        s = Server(tmp_path / f"server{len(servers)}", **config)
        s.workdir.mkdir()
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
    panics = [line for s in servers for line in s.log_problems() if "panicked" in line]
    assert not panics, "server panicked:\n" + "\n".join(panics)


@pytest.fixture
def server(start_server) -> Server:
    return start_server()


@pytest.fixture
async def connect():
    """`await connect(server, user)` opens a signaling session; all are closed after the test, and
    each must have seen only well-formed frames (seq without gaps, replies to our own ids)."""
    opened: list[Signal] = []

    async def open_session(server: Server, user: str) -> Signal:
        sig = await Signal.connect(server.base_url, server.token(user))
        opened.append(sig)
        return sig

    yield open_session
    for sig in opened:
        await sig.close()
    for sig in opened:
        assert not sig.violations, f"{sig.user_id}: {sig.violations}"



@pytest.fixture(autouse=True)
async def _dump_tasks_when_stuck():
    """pytest-timeout shows threads; a stuck asyncio test needs its tasks. If a test still runs
    after two minutes, every task's stack goes to stderr (the timeout fails it at three)."""
    async def dump():
        await asyncio.sleep(120)
        for task in asyncio.all_tasks():
            print("stuck task:", task, file=sys.stderr)
            task.print_stack(file=sys.stderr)

    watchdog = asyncio.create_task(dump())
    yield
    watchdog.cancel()
