"""What a run claims before its event loop starts, in this order: the app's lock, the processes a
killed supervisor left running (stopped, once, under that lock), and the [[socket]]s at fds 3...
It never signals a process it cannot prove it started, and decides nothing about the app.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.config import Config, TriggerConfig
from supervisor.drivers.sockets import FIRST_FD
from supervisor.loop import control

Notes = list[tuple[str, dict[str, object]]]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupError(Exception):
    """The service cannot start as configured; one line for the user, exit code 2."""


@dataclass
class Claim:
    lock: control.Lock
    listeners: list[socket.socket] = field(default_factory=list)
    inherited: bool = False  # the sockets came from systemd (their files are systemd's)
    notes: Notes = field(default_factory=list)  # what happened before the log existed
    stop_signals: list[str] = field(default_factory=list)  # to honour once the loop runs


def claim(config: Config, environ: MutableMapping[str, str],
          place_sockets: bool = True) -> Claim:
    """Take everything this run needs to itself, or raise StartupError. The lock comes first, so
    nothing a running supervisor owns is ever touched; then the directories the app needs, so a
    run that cannot start leaves the app a killed run left serving; the sockets come last, once
    that app no longer holds their ports. `place_sockets`: at fds 3.. (one app per process, or
    from systemd's socket activation); many apps' sockets stay where they are bound, and each
    app gets its own at 3.. when it starts."""
    lock = _lock(config, above=FIRST_FD + len(config.sockets) * place_sockets)
    taken = Claim(lock=lock, notes=list(lock.notes))
    try:
        _check_directories(config)  # a run that cannot start leaves a stale app serving
        with _stops_held(taken.stop_signals):
            stop_left_behind(config, taken.notes)
        if config.sockets:
            from supervisor.drivers.sockets import SocketError, open_sockets

            try:
                taken.listeners, taken.inherited = open_sockets(config.sockets, environ,
                                                                place=place_sockets)
            except SocketError as error:
                raise StartupError(str(error)) from None
    except BaseException:
        lock.release()
        raise
    return taken


def _lock(config: Config, above: int) -> control.Lock:
    """The app's lock (the state directory itself, and the repository's), its fds moved above
    the ones the sockets must take (3..): flock belongs to the open file, so the copy holds it."""
    state_dir = config.app.state_dir
    try:
        os.makedirs(state_dir, mode=0o711, exist_ok=True)  # closed to others: see control
        lock = control.acquire_lock(state_dir, config.git.repo)
    except control.LockHeld as held:
        who = f"pid {held.pid}" if held.pid else "another process"
        if held.repository is not None:
            raise StartupError(f"git.repo: {who} already runs a supervisor on this "
                               f"repository ({held.repository})") from None
        raise StartupError(f"app.state_dir: {who} already runs a supervisor for this app "
                           f"({state_dir})") from None
    except OSError as error:
        raise StartupError(f"app.state_dir: cannot take {state_dir} for this supervisor: "
                           f"{error.strerror or error}") from None
    try:
        lock.fds = [_moved(fd, above) for fd in lock.fds]
    except OSError as error:
        lock.release()
        raise StartupError(f"app.state_dir: cannot use {state_dir}: "
                           f"{error.strerror or error}") from None
    return lock


def _moved(fd: int, above: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above)
    finally:
        os.close(fd)


def _check_directories(config: Config) -> None:
    stats_directory = os.path.dirname(config.drain.stats_file) if config.drain else ""
    if config.drain and not os.path.isdir(stats_directory):
        raise StartupError(f"drain.stats_file: directory {stats_directory} does not exist")
    if not os.path.isdir(config.app.cwd):
        raise StartupError(f"app.cwd: {config.app.cwd} is not a directory")


def stop_left_behind(config: Config, notes: Notes) -> bool:
    """Stop what state.json says a killed supervisor left running (both generations after an
    overlap, and a build), each only if it provably is that process; True if one was stopped.
    The records are cleared: a record naming a process that is gone protects nothing."""
    from supervisor.drivers.child import stop_stale_child
    from supervisor.drivers.statefile import StateStore

    def report(event: str, facts: dict[str, object]) -> None:
        notes.append((event, facts))

    store = StateStore(config.app.state_dir, report=report)
    persisted = store.load()
    app = config.app
    stopped = False
    for record in (persisted.old_child, persisted.child):
        if record is not None:
            stopped |= stop_stale_child(record, app.stop_signal, app.stop_timeout, report)
    if persisted.build is not None:  # its output goes nowhere now: no grace period
        stopped |= stop_stale_child(persisted.build, signal.SIGKILL, 5.0, report, kind="build")
    if (persisted.child, persisted.old_child, persisted.build) != (None, None, None):
        store.save(child=None, old_child=None, build=None)
    return stopped


@contextmanager
def _stops_held(received: list[str]) -> Iterator[None]:
    """A stop asked for while a stale app is being stopped (up to its stop_timeout) is kept for
    the loop, which then shuts down cleanly, instead of killing us half-way."""
    previous = {sig: signal.signal(sig, lambda number, _frame: received.append(
        signal.Signals(number).name)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def start_trigger(config: TriggerConfig, on_push: Callable[[], None],
                        log: Callable[[str, dict[str, Any]], None]) -> Any:
    """The push webhook, listening, or StartupError in one line. Imported only by configs
    with [trigger] (a single app's, or a main file's for all its apps)."""
    from supervisor.drivers.trigger import Trigger

    trigger = Trigger(config.secret, on_push, log, path=config.path, burst=config.burst,
                      refill=config.refill)
    try:
        await trigger.start(config.listen)
    except OSError as error:
        # asyncio rewords bind errors around a Python tuple: give the plain reason.
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise StartupError(f"trigger.listen: cannot listen on {config.listen}: "
                           f"{reason}") from None
    return trigger
