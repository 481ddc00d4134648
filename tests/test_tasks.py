"""The long-lived driver tasks under watch (supervisor.loop.tasks), with real coroutines: a driver
that dies of a bug is a `driver.crashed` line and, where that is safe, runs again after a growing
delay; shutdown waits for none of them forever. tests/test_e2e_driver_crash.py does it with a
real supervisor."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from supervisor.loop.tasks import DriverTasks

WAIT = 20.0


def test_a_driver_that_dies_of_a_bug_is_reported_and_runs_again_after_a_growing_delay():
    reports: list[tuple[str, dict[str, Any]]] = []
    runs: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        healthy = asyncio.Event()

        async def flaky() -> None:
            runs.append(loop.time())
            if len(runs) <= 3:
                raise KeyError("x")
            healthy.set()
            await asyncio.Event().wait()  # a driver runs until it is cancelled

        drivers = DriverTasks(lambda event, facts: reports.append((event, facts)),
                              backoff_min=0.05, backoff_max=0.1)
        drivers.start("flaky", flaky)
        async with asyncio.timeout(WAIT):
            await healthy.wait()
        await drivers.close()
        assert drivers.tasks == {}

    asyncio.run(scenario())
    assert [event for event, _ in reports] == ["driver.crashed"] * 3
    first = reports[0][1]
    assert first["driver"] == "flaky" and first["error"] == "KeyError: 'x'"
    assert first["at"].startswith("test_tasks.py:") and first["at"].endswith(
        " in flaky"), first["at"]
    assert [facts["restart_in"] for _, facts in reports] == [0.05, 0.1, 0.1]
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.1, gaps


def test_a_driver_not_to_be_restarted_is_reported_once_and_left_dead():
    reports: list[dict[str, Any]] = []
    runs = []

    async def scenario() -> None:
        async def pinger() -> None:
            runs.append(1)
            raise OSError(9, "Bad file descriptor")

        drivers = DriverTasks(lambda _, facts: reports.append(facts), backoff_min=0.01)
        drivers.start("watchdog", pinger, restart=False)
        async with asyncio.timeout(WAIT):
            await drivers.tasks["watchdog"]
        await drivers.close()

    asyncio.run(scenario())
    assert runs == [1]
    assert reports == [{"driver": "watchdog", "error": "OSError: [Errno 9] Bad file descriptor",
                        "at": reports[0]["at"], "restart_in": None}]


def test_closing_waits_a_bounded_time_for_a_driver_that_ignores_its_cancellation():
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def stubborn() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # a bug: it goes on after being told to stop

        drivers = DriverTasks(lambda *_: None)
        drivers.start("stubborn", stubborn)
        task = drivers.tasks["stubborn"]
        await asyncio.sleep(0)  # let it reach its first await
        began = loop.time()
        await drivers.close(timeout=0.2)
        waited = loop.time() - began
        assert not task.done()
        release.set()
        async with asyncio.timeout(WAIT):
            await task
        return waited

    waited = asyncio.run(scenario())
    assert 0.15 <= waited < 2.0, waited
