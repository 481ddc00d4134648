"""Helpers shared by the tests of processes: bounded runs, and cleaning up what escaped."""

from __future__ import annotations

import asyncio
import os
import signal
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
