"""The build step: `build.command` in the repository (or in the release being built) with a
timeout that kills the whole group. Every output line goes to the event log; a failure carries
the tail. It runs at a lower CPU and IO priority than the live app, and waits while the box is
short of memory rather than push it into the OOM killer. It reports, never decides.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor.core.config import BuildConfig
from supervisor.core.events import BuildFailed, BuildSucceeded, Event
from supervisor.drivers import proc
from supervisor.drivers.procfs import available_memory, boot_id, start_ticks
from supervisor.drivers.statefile import ChildRecord, StateStore

MEMORY_RECHECK = 2.0  # seconds between reads of MemAvailable while a build waits for memory


def _on_path(name: str) -> bool:
    """shutil.which, without importing shutil into a process that lives for months."""
    return any(os.access(os.path.join(directory, name), os.X_OK)
               for directory in os.get_exec_path())


def lowered_priority(command: Sequence[str], niceness: int) -> tuple[str, ...]:
    """The command behind `nice` and `ionice` (best effort, lowest level), when they exist:
    set before exec, so every process the build forks inherits them."""
    if niceness <= 0:
        return tuple(command)
    prefix: list[str] = []
    if _on_path("nice"):
        prefix += ["nice", "-n", str(niceness)]
    if _on_path("ionice"):
        prefix += ["ionice", "-c", "2", "-n", "7"]
    return (*prefix, *command)


class Builder:
    def __init__(self, config: BuildConfig, repo: str, app_env: Mapping[str, str],
                 store: StateStore, post: Callable[[Event], None],
                 log: Callable[[str, dict[str, Any]], None],
                 cwd_for: Callable[[str], str] | None = None) -> None:
        # app.env is laid over our own environment at each build, so a reload reaches the next.
        self.config, self.repo, self.app_env, self.store = config, repo, dict(app_env), store
        self.post, self.log = post, log
        self.cwd_for = cwd_for  # release mode: each commit builds in its own release
        self.task: asyncio.Task[None] | None = None

    def start(self, commit: str) -> None:
        self.cancel()
        self.task = asyncio.get_running_loop().create_task(self._build(commit))

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _build(self, commit: str) -> None:
        def output(line: str) -> None:
            self.log("build.output", {"commit": commit, "line": line})

        await self._wait_for_memory(commit)
        self.log("build.started", {"commit": commit})
        cwd = self.cwd_for(commit) if self.cwd_for is not None else self.repo
        try:
            result = await proc.run(lowered_priority(self.config.command, self.config.nice),
                                    cwd=cwd,
                                    env={**os.environ, **self.app_env,
                                         "SUPERVISOR_COMMIT": commit},
                                    timeout=self.config.timeout, on_line=output,
                                    on_spawn=lambda pid: self._remember(pid, commit))
        except OSError as error:
            self.post(BuildFailed(commit=commit, reason=f"cannot start: {error}"))
            return
        finally:
            if self.store.current.build is not None:
                self.store.save(build=None)
        duration = round(result.duration, 3)
        if result.ok:
            self.store.save(built=commit)
            self.post(BuildSucceeded(commit=commit, duration=duration))
            return
        if result.timed_out:
            reason = f"timed out after {self.config.timeout:g}s; its process group was killed"
            exit_code = None
        else:
            exit_code, signal_name = proc.describe_returncode(result.returncode or 0)
            reason = f"killed by {signal_name}" if signal_name else f"exit code {exit_code}"
        self.post(BuildFailed(commit=commit, reason=reason, exit_code=exit_code,
                              duration=duration, tail=result.output))

    def _remember(self, pid: int, commit: str) -> None:
        """A supervisor killed mid-build must not leave the build running into the next one
        (which may build the same release in the same directory): the next start stops it."""
        ticks = start_ticks(pid)
        if ticks is not None:
            self.store.save(build=ChildRecord(pid, ticks, boot_id(), commit))

    async def _wait_for_memory(self, commit: str) -> None:
        """Below build.min_free the build waits, re-reading MemAvailable every few seconds
        (and build.min_free, which a reload may lower), while the live app keeps serving."""
        said = False
        while True:
            needed = self.config.min_free
            available = available_memory() if needed else None
            if available is None or available >= needed:
                if said:
                    self.log("build.memory_available", {"commit": commit,
                                                        "available": available})
                return
            if not said:
                self.log("build.waiting_for_memory", {"commit": commit, "available": available,
                                                      "min_free": needed})
                said = True
            await asyncio.sleep(MEMORY_RECHECK)

