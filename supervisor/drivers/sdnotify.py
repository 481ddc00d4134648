"""systemd's notify protocol for `Type=notify`: READY, STATUS, RELOADING, STOPPING and WATCHDOG
datagrams to $NOTIFY_SOCKET, and the one-line STATUS summary. Sending never raises and never
blocks; without NOTIFY_SOCKET there is no Notifier at all, so nothing here costs anything.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

# `systemctl status` shows one line; systemd itself would cut a datagram at 4 KiB, mid-field.
MAX_STATUS = 400


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
    serving = f"{_short(commit)} serving" if commit and pid else None
    match phase:
        case "running" if pid is None:
            parts = [_join("starting", _short(commit))]
        case "running":
            parts = [_join("running", _short(commit)), _clients(stats)]
            if next_fetch is not None:
                parts.append("fetching" if next_fetch <= 0 else
                             f"next fetch in {_duration(next_fetch)}")
            if failed:
                parts.append(f"deploy of {_short(failed)} failed")
        case "backoff":
            delay = f" {_duration(backoff)}" if backoff is not None else ""
            parts = [f"backing off{delay} after {crashes} crash{'es' if crashes != 1 else ''}"]
        case "draining":
            since = f" for {_duration(waiting)}" if waiting is not None else ""
            parts = [f"draining for {_short(target)}: {_why(stats)}{since}"]
        case "updating":
            parts = [f"updating to {_short(target)}", serving]
        case "building":
            parts = [f"building {_short(target)}", serving]
        case "restarting":
            parts = [f"restarting into {_short(target)}"]
        case "probation":
            parts = [_join("proving healthy:", _short(commit))]
        case "rolling_back":
            parts = [f"stopping unhealthy {_short(commit)}"]
        case "held" if pid is not None:
            parts = [f"held, stopping {_short(commit)}"]
        case "held":
            parts = ["held, app stopped by stop-child"]
        case "shutting_down":
            parts = ["stopping"]
        case "starting":
            parts = [_join("starting", _short(commit))]
        case _:
            parts = [str(phase)]
    if pending and phase in ("draining", "updating", "building", "restarting"):
        parts.append(f"{_short(pending)} next")
    return ", ".join(part for part in parts if part)


def _short(commit: str | None) -> str:
    return commit[:7] if commit else "?"


def _join(word: str, commit: str) -> str:
    return word if commit == "?" else f"{word} {commit}"


def _clients(stats: dict[str, str] | None) -> str:
    """While running only the number of clients shows: the other values are not news."""
    count = (stats or {}).get("n_clients")
    if count is None:
        return ""
    return f"{_cut(count)} client{'' if count == '1' else 's'}"


def _why(stats: dict[str, str] | None) -> str:
    """While draining the values are the reason for waiting: two at most, it is one line."""
    if not stats:
        return "no stats yet"
    items = list(stats.items())
    words = [f"{_cut(key)}={_cut(value)}" for key, value in items[:2]]
    return " ".join(words + ["..."] * (len(items) > 2))


def _cut(text: str) -> str:
    return text if len(text) <= 16 else text[:15] + "~"


def _duration(seconds: float) -> str:
    """4m, 12m, 8s, 0.5s, 2h5m, 3d4h: whole units, rounded down past a minute."""
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    if seconds < 60:
        return f"{round(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        hours, minutes = int(seconds // 3600), int(seconds % 3600 // 60)
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = int(seconds // 86400), int(seconds % 86400 // 3600)
    return f"{days}d{hours}h" if hours else f"{days}d"


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
