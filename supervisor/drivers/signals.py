"""Signals as callbacks on the event loop that a flood cannot lose. It owns the handlers of the
signals it is given and nothing else; what a signal means is the service's business.

asyncio learns of a signal from one byte in its wakeup socket; when a flood (hundreds of thousands
of SIGUSR1) fills that socket, the byte of a SIGTERM that follows is dropped and the SIGTERM is
never handled. The interpreter's own per-signal flag is never dropped, so each signal here also
has a Python-level handler that schedules its callback; the socket still wakes the loop.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


class SignalRoutes:
    """Each signal of `routes` runs its callback on the loop, once per burst of that signal,
    however many other signals crowd the wakeup socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 routes: dict[signal.Signals, Callable[[], None]]) -> None:
        self.loop, self.routes = loop, dict(routes)
        self.pending: set[int] = set()
        for sig in self.routes:
            loop.add_signal_handler(sig, self._dispatch, sig)  # sets the wakeup socket
            signal.signal(sig, self._noted)
            signal.siginterrupt(sig, False)
        quiet_wakeup()

    def _noted(self, signum: int, frame: object) -> None:
        """Run by the interpreter in the main thread, from its own flag: never missed."""
        self.pending.add(signum)
        self.loop.call_soon_threadsafe(self._dispatch, signum)

    def _dispatch(self, signum: int) -> None:
        """Reached twice for most signals (the socket's byte and the flag); runs the callback
        once for what is pending."""
        if signum in self.pending:
            self.pending.discard(signum)
            self.routes[signal.Signals(signum)]()

    def close(self) -> None:
        for sig in self.routes:
            self.loop.remove_signal_handler(sig)  # the default handler again
        self.pending.clear()


def quiet_wakeup() -> None:
    """A full wakeup socket is expected in a flood, not worth a 5-line warning on stderr per
    signal. asyncio turns the warning back on with each add_signal_handler: hence add_handler."""
    signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)


def add_handler(loop: asyncio.AbstractEventLoop, sig: int,
                callback: Callable[..., object], *args: object) -> None:
    """loop.add_signal_handler, keeping the wakeup socket quiet (see quiet_wakeup)."""
    loop.add_signal_handler(sig, callback, *args)
    quiet_wakeup()
