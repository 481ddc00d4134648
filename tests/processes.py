"""Helpers shared by the tests of processes (and by the soak): bounded runs, cleaning up what
escaped, and a remote that hangs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def kill_if_ours(pid: int, marker: bytes) -> None:
    """SIGKILL `pid` through a pidfd, only if its command line holds `marker`: a test cleans up
    what it let escape, never a process that happens to have reused the pid."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def run(coro: Coroutine[Any, Any, Any], limit: float = 20) -> Any:
    """asyncio.run with a bound: a test that hangs fails instead of stalling the suite."""
    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro
    return asyncio.run(bounded())


class HangingServer:
    """A TCP listener that accepts and never answers: a remote that hangs git forever."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        threading.Thread(target=self._accept, name="hanging-remote", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.release()

    def wait_closed_by_peer(self, conn: socket.socket, timeout: float) -> bool:
        """Drain what the peer sent; True once it closed its end (EOF or reset)."""
        conn.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not conn.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.close()
