"""Processes we start: each in its own session and process group, its exit learned at once from
a pidfd on the event loop (no thread, no polling, no `ps`). Signals go only to groups we started,
and only while their leader is not yet reaped, so its pid and group id cannot have been reused.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# Children a Process will reap. Any other child of ours is an orphan that came back to us as
# its subreaper (drivers/orphans.py), which reaps it: never one of these.
WAITED: set[int] = set()


class Process:
    """A started process whose exit is a future of its returncode (negative: killed by signal)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(self.pid)
        WAITED.add(self.pid)
        loop.add_reader(self._pidfd, self._on_exit, loop)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def signal_group(self, sig: int) -> bool:
        """Signal the whole group, as long as the leader is unreaped (its ids still ours)."""
        if self.exited.done():
            return False
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _on_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        # The leader is a zombie now: its group id cannot be reused yet, so whatever it left
        # behind in its group (workers, a wrapper's children) can be killed without risk.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self._popen.wait()
        WAITED.discard(self.pid)
        if not self.exited.done():
            self.exited.set_result(code)


def spawn(argv: Sequence[str], *, cwd: str | os.PathLike[str], env: Mapping[str, str] | None,
          stdout: int | None = None, stderr: int | None = None,
          pass_fds: Sequence[int] = ()) -> Process:
    """Start argv in a new session (no controlling terminal, so nothing can prompt), stdin empty.
    Only `pass_fds` and the standard streams reach it, at fds 3, 4, ... in that order (the
    socket-activation protocol's numbers), wherever they are in the supervisor."""
    if tuple(pass_fds) == tuple(range(3, 3 + len(pass_fds))):
        popen = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds))
    else:
        # close_fds would run after the move and close fds 3.. again. Every fd the supervisor
        # opens is close-on-exec (PEP 446), so exec itself drops all but the moved ones.
        popen = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, start_new_session=True, close_fds=False,
            preexec_fn=_fds_from_three(tuple(pass_fds)))
    return Process(popen)


def seal_inherited_fds() -> None:
    """Make every fd this process inherited (beyond 0-2) close-on-exec, as those it opens itself
    already are, so that no app or build ever gets one: a shell's or a service manager's open
    files are not the app's business. The [[socket]] fds are then handed on explicitly."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own fd, closed by now


def _fds_from_three(fds: tuple[int, ...]) -> Callable[[], None]:
    """In the child, between fork and exec: move `fds` to 3, 4, ... Only dups and closes run
    there (no allocation-heavy Python, no locks): one supervisor for many apps holds each app's
    sockets wherever they were bound, but each app expects its own at 3.. (sd_listen_fds)."""
    targets = tuple(range(3, 3 + len(fds)))
    above = max((*fds, *targets)) + 1

    def move() -> None:
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]  # out of the way
        for fd, target in zip(parked, targets, strict=True):
            os.dup2(fd, target)  # inheritable: exec keeps it, and only it

    return move


def describe_returncode(code: int) -> tuple[int | None, str | None]:
    """(exit code, signal name) for the event log."""
    if code < 0:
        try:
            return None, signal.Signals(-code).name
        except ValueError:
            return None, f"signal {-code}"
    return code, None


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int | None  # None when killed at the timeout
    output: str
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class _OutputReader:
    """Collects a pipe's output without blocking: whole lines go to `on_line`, the last
    `tail_lines` are kept, and `limit` caps how much one line or the tail may hold."""

    def __init__(self, fd: int, on_line: Callable[[str], None] | None, tail_lines: int,
                 limit: int) -> None:
        self.fd, self.on_line, self.limit = fd, on_line, limit
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.partial = b""
        self.overlong = False  # the current line passed `limit`: drop the rest of it
        self.closed = asyncio.get_running_loop().create_future()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        *lines, partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            if self.overlong:  # the end of a line already passed on, capped
                self.overlong = False
            else:
                self._line(line)
        if self.overlong and not lines:
            partial = b""
        elif len(partial) > self.limit:
            self._line(partial)  # capped to `limit` by _line; the rest is dropped
            self.overlong, partial = True, b""
        self.partial = partial

    def _line(self, raw: bytes) -> None:
        line = raw[: self.limit].decode("utf-8", errors="replace").rstrip("\r")
        self.tail.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def close(self) -> None:
        if self.closed.done():
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        if self.partial:
            self._line(self.partial)
            self.partial = b""
        self.closed.set_result(None)


async def run(argv: Sequence[str], *, cwd: str | os.PathLike[str], env: Mapping[str, str] | None,
              timeout: float, on_line: Callable[[str], None] | None = None,
              tail_lines: int = 40, line_limit: int = 4096,
              on_spawn: Callable[[int], None] | None = None) -> Result:
    """Run to completion with stdout and stderr merged; at the timeout the whole group is killed.

    Cancelling the caller kills the group too: nothing we start outlives the reason we started it.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        process = spawn(argv, cwd=cwd, env=env, stdout=write_end, stderr=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    reader = _OutputReader(read_end, on_line, tail_lines, line_limit)
    if on_spawn is not None:
        on_spawn(process.pid)
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(process.exited)
        except TimeoutError:
            timed_out = True
            process.signal_group(signal.SIGKILL)
            await process.exited
        # Everything in the group is dead once the leader is reaped; a grandchild that left the
        # group may still hold the pipe, so the rest of the output gets only a moment.
        try:
            async with asyncio.timeout(1.0):
                await asyncio.shield(reader.closed)
        except TimeoutError:
            pass
    finally:
        if process.running:
            process.signal_group(signal.SIGKILL)
        reader.close()
    code = process.exited.result() if process.exited.done() else None
    return Result(None if timed_out else code, "\n".join(reader.tail), timed_out,
                  time.monotonic() - process.started_at)
