"""End to end in this process: a real supervisor (real git remote, real app) whose git driver,
given through Service's `repo` argument, hits a bug on its first fetch. The log says so
(`driver.crashed`) and the poller runs again, so a push after the crash is still deployed."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from supervisor.core.config import load_config
from supervisor.core.events import Event, StopRequested
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.gitrepo import GitRepo
from supervisor.loop.service import Service
from supervisor.loop.startup import claim

WAIT = 20.0


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
            taken.lock.release()

    asyncio.run(scenario())
