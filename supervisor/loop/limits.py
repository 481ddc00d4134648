"""Limits shared by every app of one supervisor, so that N apps are no N-fold load on a tiny box:
at most `max_builds` builds at once (the rest wait in line, first come first served), and at
most `max_fetches` git fetches at once. They order work; they decide nothing about an app.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable


class BuildQueue:
    """Build slots. An app asks for one with the function that starts its build; it runs at
    once if a slot is free, else when one is given back. Each app has at most one build."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running: set[str] = set()
        self.waiting: OrderedDict[str, Callable[[], None]] = OrderedDict()

    def request(self, app: str, start: Callable[[], None]) -> int | None:
        """Start now (None) or wait: the 1-based place in line."""
        self.cancel(app)  # a newer build of the same app replaces one still waiting
        if len(self.running) < self.slots:
            self.running.add(app)
            start()
            return None
        self.waiting[app] = start
        return len(self.waiting)

    def done(self, app: str) -> None:
        """`app`'s build ended (or will never start): its slot goes to the next in line."""
        self.running.discard(app)
        while self.waiting and len(self.running) < self.slots:
            name, start = self.waiting.popitem(last=False)
            self.running.add(name)
            start()

    def cancel(self, app: str) -> None:
        self.waiting.pop(app, None)

    def position(self, app: str) -> int | None:
        names = list(self.waiting)
        return names.index(app) + 1 if app in self.waiting else None


class FetchGate:
    """At most `slots` fetches at once across apps: a git process costs a tiny box several MB
    and a burst of them at the same second is what a fleet of pollers would otherwise do."""

    def __init__(self, slots: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)

    async def __aenter__(self) -> None:
        await self.semaphore.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.semaphore.release()


def stagger(index: int, count: int, interval: float) -> float:
    """The offset of app `index` of `count` within one poll interval: pollers that would
    otherwise all fetch at the same second are spread evenly over it."""
    return interval * index / count if count > 1 else 0.0
