"""systemd's notify protocol for `Type=notify`: READY, STATUS, RELOADING, STOPPING and WATCHDOG
datagrams to $NOTIFY_SOCKET, and the one-line STATUS summary. Sending never raises and never
blocks; without NOTIFY_SOCKET there is no Notifier at all, so nothing here costs anything.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, NamedTuple

from supervisor.core.display import duration, short_commit

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# `systemctl status` shows one line; systemd itself would cut a datagram at 4 KiB, mid-field.
MAX_STATUS = 400
LINE_WIDTH = 80  # what the summary aims for, with 12-character commits


class Notifier:
    """One datagram per call to the service manager's socket. The socket is made on first use
    and is close-on-exec (Python's default), so neither the app nor a build inherits it."""

    __slots__ = ("_last_status", "_sock", "address")

    def __init__(self, address: bytes) -> None:
        self.address = address  # a path, or b"\0name" for an abstract socket
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """None unless $NOTIFY_SOCKET names a socket we can reach: an absolute path or an
        abstract name ('@name'). systemd 253's vsock addresses are not for us (no VM guests)."""
        name = environ.get("NOTIFY_SOCKET") or ""
        if name.startswith("@") and len(name) > 1:
            return cls(b"\0" + os.fsencode(name[1:]))
        if name.startswith("/"):
            return cls(os.fsencode(name))
        return None

    def send(self, **fields: object) -> bool:
        """Send `KEY=value` lines as one datagram; True if it left. A newline inside a value
        would start a field of its own (a commit message saying "READY=1"), so it becomes a
        space."""
        text = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            if self._sock is None:
                # Non-blocking: if the manager stops reading, a message is lost, not the loop.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode("utf-8", "replace"), self.address)
        except (OSError, ValueError):
            return False  # the manager went away (or is busy): nothing for us to do about it
        return True

    def ready(self) -> bool:
        return self.send(READY=1)

    def status(self, text: str) -> bool:
        """STATUS=text, shown by `systemctl status`. A line equal to the last one sent is not
        sent again, so calling this after every step costs nothing when nothing shows."""
        text = _one_line(text)[:MAX_STATUS]
        if text == self._last_status:
            return True
        sent = self.send(STATUS=text)
        self._last_status = text if sent else None
        return sent

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, which systemd 253+ requires to match the reload to
        the request; send `ready()` once the reload is done (or has failed)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str],
                      pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled()
    advises; None without a watchdog, or when $WATCHDOG_PID says it is meant for another
    process (a child that inherited our environment)."""
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC") or "")
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def watchdog_pings(notifier: Notifier, interval: float) -> None:
    """Ping every `interval` seconds until cancelled. It runs on the event loop, so a loop that
    is blocked (a stuck callback, a sync call that hangs) stops the pings, and systemd then
    kills and restarts us: exactly what the watchdog is for."""
    import asyncio  # the running service has it loaded already; importers of this module may not

    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The STATUS line


def status_line(phase: str, *, commit: str | None = None, pid: int | None = None,
                stats: dict[str, str] | None = None, next_fetch: float | None = None,
                target: str | None = None, pending: str | None = None,
                waiting: float | None = None, crashes: int = 0, backoff: float | None = None,
                failed: str | None = None) -> str:
    """A short summary for `systemctl status`, from plain values: `phase` (a Phase value),
    `commit` and `pid` of the running child, fresh `stats` (only what matters, e.g. the drain
    condition's keys), seconds until the `next_fetch`, the deploy `target` and a newer `pending`
    commit, seconds spent `waiting` for the drain, `crashes` in a row and the `backoff` delay,
    and the last commit whose deploy `failed`."""
    facts = _Facts(commit, pid, stats, next_fetch, target, waiting, crashes, backoff, failed)
    line = _line(phase, facts, pending)
    if len(line) > LINE_WIDTH:  # fewer words, rather than a line cut off mid-word
        line = _line(phase, facts._replace(compact=True), pending)
    return line


def _line(phase: str, facts: _Facts, pending: str | None) -> str:
    describe = _PHASES.get(phase)
    parts = describe(facts) if describe is not None else [str(phase)]
    if pending and phase in ("draining", "updating", "building", "restarting"):
        parts.append(f"{_short(pending)} next")
    return ", ".join(part for part in parts if part)


class _Facts(NamedTuple):
    commit: str | None
    pid: int | None
    stats: dict[str, str] | None
    next_fetch: float | None
    target: str | None
    waiting: float | None
    crashes: int
    backoff: float | None
    failed: str | None
    compact: bool = False

    @property
    def serving(self) -> str | None:
        return f"{_short(self.commit)} serving" if self.commit and self.pid else None


def _running(facts: _Facts) -> list[str | None]:
    if facts.pid is None:
        return [_join("starting", _short(facts.commit))]
    parts = [_join("running", _short(facts.commit)), _clients(facts.stats)]
    if facts.next_fetch is not None:
        parts.append("fetching" if facts.next_fetch <= 0 else
                     f"next fetch in {duration(facts.next_fetch)}")
    if facts.failed:
        parts.append(f"{'' if facts.compact else 'deploy of '}{_short(facts.failed)} failed")
    return parts


def _backoff(facts: _Facts) -> list[str | None]:
    delay = f" {duration(facts.backoff)}" if facts.backoff is not None else ""
    plural = "es" if facts.crashes != 1 else ""
    return [f"backing off{delay} after {facts.crashes} crash{plural}"]


def _draining(facts: _Facts) -> list[str | None]:
    since = f" for {duration(facts.waiting)}" if facts.waiting is not None else ""
    why = _why(facts.stats, 1 if facts.compact else 2)
    return [f"draining for {_short(facts.target)}: {why}{since}"]


def _held(facts: _Facts) -> list[str | None]:
    if facts.pid is not None:
        return [f"held, stopping {_short(facts.commit)}"]
    return ["held, app stopped by stop-child"]


_PHASES: dict[str, Callable[[_Facts], list[str | None]]] = {
    "running": _running,
    "backoff": _backoff,
    "draining": _draining,
    "updating": lambda f: [f"updating to {_short(f.target)}", f.serving],
    "building": lambda f: [f"building {_short(f.target)}", f.serving],
    "restarting": lambda f: [f"restarting into {_short(f.target)}"],
    "awaiting_slot": lambda f: [f"waiting for a fleet slot for {_short(f.target)}", f.serving],
    "probation": lambda f: [_join("proving healthy:", _short(f.commit))],
    "rolling_back": lambda f: [f"stopping unhealthy {_short(f.commit)}"],
    "held": _held,
    "shutting_down": lambda f: ["stopping"],
    "starting": lambda f: [_join("starting", _short(f.commit))],
}


def _short(commit: str | None) -> str:
    return short_commit(commit, missing="?")


def _join(word: str, commit: str) -> str:
    return word if commit == "?" else f"{word} {commit}"


def _clients(stats: dict[str, str] | None) -> str:
    """While running only the number of clients shows: the other values are not news."""
    count = (stats or {}).get("n_clients")
    if count is None:
        return ""
    return f"{_cut(count)} client{'' if count == '1' else 's'}"


def _why(stats: dict[str, str] | None, at_most: int) -> str:
    """While draining the values are the reason for waiting: two at most, it is one line."""
    if not stats:
        return "no stats yet"
    items = list(stats.items())
    words = [f"{_cut(key)}={_cut(value)}" for key, value in items[:at_most]]
    return " ".join(words + ["..."] * (len(items) > at_most))


def _cut(text: str) -> str:
    return text if len(text) <= 16 else text[:15] + "~"


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
