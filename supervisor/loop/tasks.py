"""The long-lived driver tasks (the git poller, the status refresher, the watchdog pinger), each
under watch: one that dies of a bug is a `driver.crashed` line in the log and, where running it
again is safe, runs again after a backoff. It decides nothing about the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Report = Callable[[str, dict[str, object]], None]


class DriverTasks:
    """Like a task group whose members are restarted instead of taking the others down: a poller
    that stops fetching because of a bug must not go unnoticed, nor stop the supervisor."""

    STEADY = 60.0  # a driver that ran this long before it failed starts again from the short delay

    def __init__(self, report: Report, backoff_min: float = 1.0,
                 backoff_max: float = 60.0) -> None:
        self.report = report
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]], restart: bool = True) -> None:
        """Run `run()` until it is cancelled; `restart=False` for a driver whose death must stay
        visible to someone else (the watchdog pinger: systemd then restarts us whole)."""
        self.tasks[name] = asyncio.get_running_loop().create_task(
            self._watch(name, run, restart), name=f"driver {name}")

    async def _watch(self, name: str, run: Callable[[], Awaitable[None]], restart: bool) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        delay = self.backoff_min
        while True:
            began = loop.time()
            try:
                await run()
                error, where = "returned, though it should run until cancelled", None
            except Exception as crash:  # any bug in a driver: reported here, never raised
                error, where = describe(crash)
            if me is not None and me.cancelling():
                return  # told to stop, and the driver swallowed it: stopping is what was asked
            if loop.time() - began >= self.STEADY:
                delay = self.backoff_min
            self.report("driver.crashed", {"driver": name, "error": error, "at": where,
                                           "restart_in": delay if restart else None})
            if not restart:
                return
            # The delay bounds what a driver that fails at once can cost: one try a minute.
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def close(self, *names: str, timeout: float = 5.0) -> None:
        """Cancel the named driver tasks (all without names) and wait for them, `timeout` seconds
        at most: one that ignores its cancellation is left behind, never waited for forever."""
        tasks = [self.tasks.pop(name) for name in (names or list(self.tasks))
                 if name in self.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def describe(error: BaseException) -> tuple[str, str | None]:
    """The last line of the traceback ("KeyError: 'x'") and where it was raised
    ("gitrepo.py:142 in fetch"), read from the frames without the traceback module, which a
    healthy run never needs to load."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    trace = error.__traceback__
    if trace is None:
        return text, None
    while trace.tb_next is not None:
        trace = trace.tb_next
    code = trace.tb_frame.f_code
    return text, f"{code.co_filename.rsplit('/', 1)[-1]}:{trace.tb_lineno} in {code.co_name}"
