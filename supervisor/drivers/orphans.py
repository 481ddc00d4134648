"""Nothing the supervisor starts outlives what it was started for. As the subreaper of its
descendants, a process that left its group (setsid()) and lost its parent comes back to the
supervisor instead of PID 1; this module tells which owner (a generation of the app, a build)
may have started such an orphan, kills those whose possible owners have all ended, and reaps
them. It signals only provable descendants of ours, through pidfds, start time checked again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.drivers import proc
from supervisor.drivers.signals import add_handler

PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT = 5.0  # seconds for SIGKILLed orphans to be gone (a port they hold is free then)

_subreaper: bool | None = None
# The event loops that reap our orphans on SIGCHLD (a closed loop drops its handlers).
_reaping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class Owner:
    """What orphans may belong to: a generation or a build, by its leader."""

    pid: int
    ticks: int  # the leader's start time: nothing it started is older
    tag: int | None  # the oom_score_adj it was given; its descendants inherit it


@dataclass(frozen=True, slots=True)
class Found:
    pid: int
    ppid: int
    pgid: int
    ticks: int
    state: str
    name: str


_owners: dict[int, Owner] = {}  # live ones


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER, once per process: needs no privilege, costs one syscall."""
    global _subreaper
    if _subreaper is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper = False
    return _subreaper


def started(owner: Owner) -> None:
    _owners[owner.pid] = owner
    _reap_on_sigchld()


def _reap_on_sigchld() -> None:
    """Orphans that end by themselves come back to us as zombies: reap them as they come."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop not in _reaping:
        add_handler(loop, signal.SIGCHLD, reap)
        _reaping.add(loop)


def processes() -> dict[int, Found]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                data = file.read()
        except OSError:
            continue
        close = data.rfind(b")")
        fields = data[close + 2:].split()
        try:
            table[int(entry)] = Found(int(entry), int(fields[1]), int(fields[2]), int(fields[19]),
                                      fields[0].decode(), data[data.find(b"(") + 1:close]
                                      .decode(errors="replace"))
        except (IndexError, ValueError):
            continue
    return table


def oom_score_adj(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


def _could_own(owner: Owner, orphan: Found, tag: int | None, owners: Iterable[Owner]) -> bool:
    """Nothing an owner started is older than it; and where the orphan still carries one
    owner's oom_score_adj (a build's, say), only the owners with that value can have started
    it. Clock ticks are coarse: a tie keeps the orphan alive, never kills it early."""
    if orphan.ticks < owner.ticks:
        return False
    carried = any(other.tag == tag for other in owners)
    return owner.tag == tag or not carried


def ended(owner: Owner) -> list[Found]:
    """`owner` has ended (its leader exited): what to kill now. Orphans no live owner could
    have started, and whatever is still in the owner's group (killpg has hit it, but what it
    forked may not have come back to us yet), each with everything below it."""
    _owners.pop(owner.pid, None)
    table = processes()
    me = os.getpid()
    everyone = [*_owners.values(), owner]
    roots = []
    for found in table.values():
        if found.state in "ZX":
            continue
        if found.ppid == me and found.pid not in proc.WAITED:
            tag = oom_score_adj(found.pid)
            if not any(_could_own(live, found, tag, everyone) for live in _owners.values()):
                roots.append(found)
        elif found.pgid == owner.pid and found.ticks >= owner.ticks and found.pid != owner.pid:
            roots.append(found)
    return _below(roots, table)


def _below(roots: list[Found], table: dict[int, Found]) -> list[Found]:
    """The roots and their descendants; a child is never older than its parent, so a pid
    reused between two reads of /proc breaks the chain instead of joining it."""
    children: dict[int, list[Found]] = {}
    for found in table.values():
        children.setdefault(found.ppid, []).append(found)
    result: dict[int, Found] = {}
    stack = list(roots)
    while stack:
        found = stack.pop()
        if found.pid in result:
            continue
        result[found.pid] = found
        stack.extend(c for c in children.get(found.pid, ()) if c.ticks >= found.ticks
                     and c.state not in "ZX")
    return list(result.values())


def _still(found: Found) -> bool:
    """The same process as when it was found: same start time, same parent or group."""
    try:
        with open(f"/proc/{found.pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return False
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[19]) == found.ticks and int(fields[1]) in (found.ppid, os.getpid())


def kill(found: list[Found]) -> dict[int, int]:
    """SIGKILL each through a pidfd opened before the check; the pidfds, to wait on."""
    pidfds: dict[int, int] = {}
    for one in found:
        try:
            fd = os.pidfd_open(one.pid)
        except OSError:
            continue
        try:
            if _still(one):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                pidfds[one.pid] = fd
                continue
        except OSError:
            pass
        os.close(fd)
    return pidfds


async def gone(pidfds: dict[int, int], timeout: float = KILL_WAIT) -> None:
    """Wait (bounded) until every killed process has exited, then close the pidfds and reap
    those that are our children."""
    loop = asyncio.get_running_loop()
    waits = []
    for fd in pidfds.values():
        future: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, lambda f=future: f.done() or f.set_result(None))
        waits.append(future)
    try:
        if waits:
            await asyncio.wait(waits, timeout=timeout)
    finally:
        for fd in pidfds.values():
            loop.remove_reader(fd)
            os.close(fd)
        reap()


def gone_now(pidfds: dict[int, int], timeout: float = KILL_WAIT) -> None:
    """The same without an event loop (a cancelled build, the stale-child path)."""
    import select

    for fd in pidfds.values():
        select.select([fd], [], [], timeout)
        os.close(fd)
    reap()


def reap() -> list[int]:
    """Reap the zombies among our children that no Process waits for (orphans that came back
    to us). A peek with WNOWAIT first: most SIGCHLDs are for a Process, whose own wait must
    find its status, so nothing is reaped blindly with waitpid(-1)."""
    try:
        peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return []
    if peek is None:
        return []
    reaped = []
    me = os.getpid()
    for found in processes().values():
        if found.ppid == me and found.state == "Z" and found.pid not in proc.WAITED:
            try:
                if os.waitpid(found.pid, os.WNOHANG)[0]:
                    reaped.append(found.pid)
            except ChildProcessError:
                pass
    return reaped


def describe(found: list[Found]) -> dict[str, object]:
    """For the log line: the pids and what they ran."""
    return {"pids": sorted(f.pid for f in found),
            "names": sorted({f.name for f in found})}
