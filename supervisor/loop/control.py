"""How the shell talks to a running supervisor, through its state directory only (no listener):
an instance lock naming its pid, a control directory of one-word requests signalled with
SIGUSR2, and a status file it replaces atomically on every change.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import time
from typing import Any

from supervisor.core.display import duration, short_commit

REQUESTS = ("deploy", "restart", "stop-child", "start-child", "rollback")
LOCK_NAME = "supervisor.lock"
STATUS_NAME = "status.json"
CONTROL_DIR = "control"


class LockHeld(Exception):
    """Another supervisor runs this app; `pid` is its pid when known."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.pid = pid


def acquire_lock(state_dir: str) -> int:
    """Take the app's lock for the life of this process; raise LockHeld if it is taken.

    flock, not a pid file: the kernel drops it when we die, however we die. Close-on-exec, so
    a child can never keep it after we are gone."""
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockHeld(_read_pid(path)) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as file:
            text = file.read(32).strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def running_pid(state_dir: str) -> int | None:
    """The pid of the supervisor holding the app's lock, or None if none runs."""
    path = os.path.join(state_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_pid(path)  # held: a supervisor runs
    finally:
        os.close(fd)  # also releases the probe's own lock
    return None


def send_request(state_dir: str, request: str) -> int:
    """Leave a request for the running supervisor and signal it; returns its pid.

    Raises LookupError when no supervisor runs for this state directory."""
    if request not in REQUESTS:
        raise ValueError(request)
    pid = running_pid(state_dir)
    if pid is None:
        raise LookupError(state_dir)
    # The supervisor makes this directory at start-up, owned by its user: a request from root
    # then leaves a file the supervisor may still remove (removal needs the directory's rights).
    directory = os.path.join(state_dir, CONTROL_DIR)
    name = f"{time.time_ns():020d}-{os.getpid()}-{request}"
    temporary = os.path.join(directory, "." + name)
    with open(temporary, "w") as file:
        file.write(request + "\n")
    os.replace(temporary, os.path.join(directory, name))
    os.kill(pid, signal.SIGUSR2)
    return pid


def make_control_dir(state_dir: str) -> None:
    os.makedirs(os.path.join(state_dir, CONTROL_DIR), exist_ok=True)


def take_requests(state_dir: str) -> list[str]:
    """Requests waiting in the control directory, oldest first; each is taken once.

    Only the known words count: whatever else is there is removed and ignored."""
    directory = os.path.join(state_dir, CONTROL_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []
    requests = []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # taken already
        parts = name.split("-", 2)  # TIME-PID-REQUEST, and a request may hold a "-"
        request = parts[2] if len(parts) == 3 else ""
        if request in REQUESTS:
            requests.append(request)
    return requests


def write_status(state_dir: str, status: dict[str, Any]) -> None:
    """Replace the status file in one rename. No fsync: it is rewritten on every change and
    only describes the present, so it should not wear out an SD card."""
    path = os.path.join(state_dir, STATUS_NAME)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(status, file, default=str)
    os.replace(temporary, path)


def read_status(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state_dir, STATUS_NAME), "rb") as file:
            data = json.loads(file.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _seconds_since(stamp: object, now: float) -> float:
    """Seconds from an RFC 3339 UTC stamp of the event log to `now`."""
    import calendar

    try:
        whole, _, fraction = str(stamp).rstrip("Z").partition(".")
        then = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        return max(0.0, now - then - float("0." + (fraction or "0")))
    except ValueError:
        return 0.0


def refresh(status: dict[str, Any], running: bool, now: float | None = None) -> dict[str, Any]:
    """Bring the durations up to the moment of reading: the file is written on changes only."""
    now = time.time() if now is None else now
    status["running"] = running
    if not running:
        for key in ("pid", "child", "target", "waiting", "next_fetch", "backoff_until"):
            status[key] = None
        return status
    if status.get("child"):
        status["child"]["uptime"] = round(_seconds_since(status["child"].get("since"), now), 1)
    if status.get("waiting"):
        status["waiting"]["seconds"] = round(_seconds_since(status["waiting"].get("since"), now),
                                             1)
    return status


def describe_status(status: dict[str, Any]) -> str:
    """The status file for people, one fact per line."""
    running = status.get("running", True)
    lines = [_headline(status, running), _app_line(status, running), _tree_line(status)]
    lines += _deploy_lines(status) + _trouble_lines(status, running)
    return "\n".join(lines)


def _headline(status: dict[str, Any], running: bool) -> str:
    """A supervisor that is gone has no pid worth naming: it may belong to anything by now."""
    if not running:
        return f"{status.get('app')}: not running (last: {status.get('phase')})"
    return f"{status.get('app')}: {status.get('phase')}, supervisor pid {status.get('pid')}"


def _app_line(status: dict[str, Any], running: bool) -> str:
    child = status.get("child")
    if not (child and running):
        return "app:       not running"
    return (f"app:       pid {child.get('pid')}, {short_commit(child.get('commit'))}, "
            f"up {duration(float(child.get('uptime') or 0))} (since {child.get('since')})")


def _tree_line(status: dict[str, Any]) -> str:
    good = status.get("good")
    if good is None:
        return (f"tree:      {short_commit(status.get('head'))}, "
                f"built {short_commit(status.get('built'))}")
    # release mode: `head` is the release `current` points to
    return (f"release:   {short_commit(status.get('head'))} live; good: "
            + (", ".join(short_commit(c) for c in reversed(good)) or "none yet"))


def _deploy_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    if status.get("target"):
        lines.append(f"deploying: {short_commit(status.get('target'))}")
    waiting = status.get("waiting")
    if waiting:
        lines.append(f"waiting:   {waiting.get('reason')} for "
                     f"{duration(waiting.get('seconds') or 0)}")
    if status.get("pending"):
        lines.append(f"next:      {short_commit(status.get('pending'))} (after this deploy)")
    deploy = status.get("last_deploy")
    if deploy:
        why = f": {deploy.get('reason')}" if deploy.get("reason") else ""
        lines.append(f"deployed:  {short_commit(deploy.get('commit'))} {deploy.get('result')} "
                     f"at {deploy.get('at')}{why}")
    return lines


def _trouble_lines(status: dict[str, Any], running: bool) -> list[str]:
    lines = []
    if status.get("failed"):
        lines.append(f"held back: {short_commit(status.get('failed'))} (failed; waits for a "
                     "newer commit)")
    if status.get("next_fetch") and running:
        lines.append(f"fetch:     next at {status.get('next_fetch')}")
    if status.get("crashes"):
        until = status.get("backoff_until")
        lines.append(f"crashes:   {status.get('crashes')} in a row"
                     + (f", next start at {until}" if until else ""))
    error = status.get("last_error")
    if error:
        lines.append(f"error:     {error.get('event')}: {error.get('message')} "
                     f"at {error.get('at')}")
    return lines
