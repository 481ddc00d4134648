"""The long-lived driver tasks under watch (supervisor.loop.tasks): a driver that dies of a bug is a
`driver.crashed` line and, where that is safe, runs again after a growing delay; shutdown waits
for none of them forever. Real coroutines first, then a real supervisor in this process (real
git remote, real app) whose git driver, given through Service's `repo` argument, hits a bug on
its first fetch: the log says so and fetching resumes, so a push is still deployed."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any

from supervisor.core.config import load_config
from supervisor.core.events import Event, StopRequested
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.gitrepo import GitRepo
from supervisor.loop.service import Service
from supervisor.loop.startup import claim
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
    assert first["at"].startswith("test_drivers_supervised.py:") and first["at"].endswith(
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


class Lines:
    """The event log as the test reads it: each line parsed the moment it is written."""

    def __init__(self, on_record: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.on_record = on_record

    def write(self, text: str) -> None:
        for line in text.splitlines():
            record = json.loads(line)
            self.records.append(record)
            self.on_record(record)
        self.changed.set()

    def flush(self) -> None:
        pass

    async def wait_for(self, event: str, **facts: Any) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                for record in self.records:
                    if record["event"] == event and all(record.get(k) == v
                                                        for k, v in facts.items()):
                        return record
                self.changed.clear()
                await self.changed.wait()


class GitRepoWithABug(GitRepo):
    """The real git driver, except that its first fetch hits a bug, as a driver's code might."""

    fetches = 0

    async def fetch(self) -> Event:
        self.fetches += 1
        if self.fetches == 1:
            raise RuntimeError("a bug in the poller")
        return await super().fetch()


def test_a_poller_that_dies_of_a_bug_is_logged_and_fetching_resumes(world):
    config = load_config(str(world.write_config()))

    def adopt(record: dict[str, Any]) -> None:
        if record["event"] == "child.started":
            world.children.adopt(record["pid"])  # stopped at the end even if the test fails

    async def scenario() -> None:
        lines = Lines(adopt)
        taken = claim(config, dict(os.environ))
        try:
            repo = GitRepoWithABug(config.git, compare=not config.releases)
            service = Service(config, EventLog(lines, "json"), taken, repo=repo)  # type: ignore[arg-type]
            running = asyncio.get_running_loop().create_task(service.run())
            crashed = await lines.wait_for("driver.crashed", driver="poller")
            assert crashed["error"] == "RuntimeError: a bug in the poller"
            assert crashed["at"].endswith(" in fetch"), crashed["at"]
            assert crashed["restart_in"] == 1.0

            commit = world.release("2")  # pushed after the crash: only a live poller finds it
            await lines.wait_for("child.started", commit=commit)
            assert repo.fetches >= 2
            service.inbox.put_nowait(StopRequested(signal="SIGTERM"))
            async with asyncio.timeout(WAIT):
                assert await running == 0
            assert lines.records[-1]["event"] == "supervisor.stopped"
            assert [r["driver"] for r in lines.records if r["event"] == "driver.crashed"] == [
                "poller"]
        finally:
            os.close(taken.lock_fd)

    asyncio.run(scenario())
