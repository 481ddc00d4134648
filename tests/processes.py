"""Process helpers shared by tests that let a process escape on purpose."""

from __future__ import annotations

import os
import signal
from pathlib import Path


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
