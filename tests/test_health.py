"""The health probes against real sockets on loopback: what passes, and the few words that say
why a probe failed (they end up in health.probe_failed and in a rollback's reason)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.core.config import HealthConfig
from supervisor.core.events import HealthPassed, HealthProbeFailed
from supervisor.drivers.health import NotifyListener, ProbeFailed, Prober, probe_http, probe_tcp
from supervisor.drivers.sockets import free_port
from tests.processes import run


async def answering(reply: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("reply", "outcome"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP 200"),
    (b"HTTP/1.0 204 No Content\r\n\r\n", "HTTP 204"),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", ProbeFailed("HTTP 503")),
    (b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n\r\n", ProbeFailed("HTTP 301")),
    (b"SSH-2.0-OpenSSH\r\n", ProbeFailed("no HTTP status line")),
    (b"", ProbeFailed("closed without an answer")),
    (b"HTTP/1.1 200 " + b"x" * 10000 + b"\r\n", ProbeFailed("status line too long")),
])
def test_http_probe(reply, outcome):
    async def main() -> str:
        server, port = await answering(reply)
        async with server:
            return await probe_http(f"http://127.0.0.1:{port}/up")

    if isinstance(outcome, str):
        assert run(main()) == outcome
    else:
        with pytest.raises(ProbeFailed, match=str(outcome)):
            run(main())


def test_tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port():
    async def main() -> None:
        server, port = await answering(b"")
        async with server:
            assert await probe_tcp(f"127.0.0.1:{port}") == "connected"
        with pytest.raises(ConnectionRefusedError):
            await probe_tcp(f"127.0.0.1:{port}")

    run(main())


class Reports:
    """What a Prober posts, with a way to wait for it: every report (and every request a test
    server answers) wakes the waiters, so a test awaits the fact instead of sleeping."""

    def __init__(self) -> None:
        self.posted: list[object] = []
        self.changed = asyncio.Event()

    def post(self, event: object) -> None:
        self.posted.append(event)
        self.changed.set()

    async def until(self, condition: Callable[[], object], limit: float = 5.0) -> None:
        async with asyncio.timeout(limit):
            while not condition():
                self.changed.clear()  # no await between the check and here: nothing is missed
                await self.changed.wait()


def test_the_prober_reports_a_failure_once_per_reason_then_the_pass():
    port = free_port()
    reports = Reports()
    answer = {"status": b"503 Service Unavailable"}
    requests = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1
        reports.changed.set()
        writer.write(b"HTTP/1.0 " + answer["status"] + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        prober = Prober(HealthConfig(http=f"http://127.0.0.1:{port}/up", interval=0.02,
                                     grace=0.0), reports.post)
        prober.start(4242, "/", {})
        await reports.until(lambda: reports.posted)
        assert reports.posted == [HealthProbeFailed(pid=4242, error="connection refused")]
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            # The prober asks again only once it has taken the answer before: at the fourth
            # request, three 503s have been seen, and reported once.
            await reports.until(lambda: requests >= 4)
            assert reports.posted[1:] == [HealthProbeFailed(pid=4242, error="HTTP 503")]
            answer["status"] = b"200 OK"
            assert prober.task is not None
            async with asyncio.timeout(5):
                await prober.task
        assert reports.posted[2:] == [HealthPassed(pid=4242, detail="HTTP 200")]

    run(main())


def test_a_command_probe_says_how_it_failed(tmp_path: Path):
    reports = Reports()

    async def main() -> None:
        prober = Prober(HealthConfig(command=("/bin/sh", "-c", "echo not yet; exit 4"),
                                     interval=5.0, grace=0.0), reports.post)
        prober.start(7, str(tmp_path), dict(os.environ))
        await reports.until(lambda: reports.posted)
        prober.stop()

    run(main())
    assert reports.posted == [HealthProbeFailed(pid=7, error="exit code 4: not yet")]


def test_notify_believes_only_the_expected_process(tmp_path: Path):
    """Our own process is not in the expected child's group: its READY=1 is not believed."""
    reports = Reports()
    path = str(tmp_path / "notify.sock")

    async def main() -> None:
        listener = NotifyListener(path, reports.post)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                listener.expect(999999)
                sender.sendto(b"READY=1", path)
                await asyncio.sleep(0.05)  # an absence: nothing to wait for
                assert reports.posted == []
                listener.expect(os.getpid())
                sender.sendto(b"STATUS=warming up\nREADY=1", path)
                await reports.until(lambda: reports.posted)
        finally:
            listener.close()

    run(main())
    assert reports.posted == [HealthPassed(pid=os.getpid(), detail="READY=1")]
    assert not os.path.exists(path)
