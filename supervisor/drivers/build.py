"""The build step: `build.command` in the repository (or in the release being built) with a
timeout that kills the whole group. Every output line goes to the event log; a failure carries
the tail. It runs at a lower CPU and IO priority than the live app, first in line for the OOM
killer, in a capped cgroup of its own where it can be, and waits while the box is short of
memory. Whatever it started is gone when it ends. It reports, never decides.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from supervisor.core.config import BuildConfig
from supervisor.core.events import BuildFailed, BuildSucceeded, Event
from supervisor.drivers import cgroup, orphans, proc
from supervisor.drivers.procfs import available_memory, boot_id, start_ticks
from supervisor.drivers.statefile import ChildRecord, StateStore

MEMORY_RECHECK = 2.0  # seconds between reads of MemAvailable while a build waits for memory
# Inherited by every process of the build: when memory runs out, the kernel kills a build
# (which can be run again) before the app that serves (which cannot be got back).
BUILD_OOM_SCORE_ADJ = 1000
OUT_OF_MEMORY = "out of memory"


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
        orphans.become_subreaper()
        self.hierarchy: cgroup.Hierarchy | None = None
        self.cgroup_problem: str | None = None
        if config.memory_max:
            # cgroup v2: the supervisor moves into a leaf now, before it starts any app.
            self._cgroup_hierarchy()

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
        capped = self._cgroup(commit)
        kills_before = _oom_kills()
        owner: list[orphans.Owner] = []  # this build's, whatever the next build does meanwhile
        command = cgroup.join_command(capped.procs if capped else None, BUILD_OOM_SCORE_ADJ,
                                      lowered_priority(self.config.command, self.config.nice))
        try:
            result = await proc.run(command, cwd=cwd,
                                    env={**os.environ, **self.app_env,
                                         "SUPERVISOR_COMMIT": commit},
                                    timeout=self.config.timeout, on_line=output,
                                    on_spawn=lambda pid: self._remember(pid, commit, owner))
        except OSError as error:
            self.post(BuildFailed(commit=commit, reason=f"cannot start: {error}"))
            return
        finally:
            if self.store.current.build is not None:
                self.store.save(build=None)
            await self._clean_up(commit, owner[0] if owner else None, capped)
        duration = round(result.duration, 3)
        if result.ok:
            self.store.save(built=commit)
            self.post(BuildSucceeded(commit=commit, duration=duration))
            return
        if capped.out_of_memory() if capped is not None else _oom_kills() > kills_before:
            # The OOM killer took the build or one of its workers (the build is first in its
            # line), whatever exit the build made of that.
            reason = OUT_OF_MEMORY
            exit_code = (None if result.timed_out
                         else proc.describe_returncode(result.returncode or 0)[0])
        elif result.timed_out:
            reason = f"timed out after {self.config.timeout:g}s; its process group was killed"
            exit_code = None
        else:
            exit_code, signal_name = proc.describe_returncode(result.returncode or 0)
            reason = f"killed by {signal_name}" if signal_name else f"exit code {exit_code}"
        self.post(BuildFailed(commit=commit, reason=reason, exit_code=exit_code,
                              duration=duration, tail=result.output))

    def _remember(self, pid: int, commit: str, owner: list[orphans.Owner]) -> None:
        """A supervisor killed mid-build must not leave the build running into the next one
        (which may build the same release in the same directory): the next start stops it."""
        ticks = start_ticks(pid)
        if ticks is not None:
            self.store.save(build=ChildRecord(pid, ticks, boot_id(), commit))
            owner.append(orphans.Owner(pid, ticks, BUILD_OOM_SCORE_ADJ))
            orphans.started(owner[0])

    async def _clean_up(self, commit: str, owner: orphans.Owner | None,
                        capped: cgroup.BuildCgroup | None) -> None:
        """The build has ended: what it started and left behind (a daemon it put in a session
        of its own, a worker still in its cgroup) is killed, named in the log, and waited for;
        its cgroup is removed."""
        found = orphans.ended(owner) if owner is not None else []
        pidfds = orphans.kill(found)
        escaped = [f for f in found if f.pid in pidfds and (owner is None or f.pgid != owner.pid)]
        if capped is not None:
            known = {f.pid for f in escaped}
            for pid in capped.kill():
                if pid not in known:
                    escaped.append(orphans.Found(pid, 0, 0, 0, "", _name(pid)))
                    try:
                        pidfds[pid] = os.pidfd_open(pid)
                    except OSError:
                        pass
        if escaped:
            self.log("build.escaped_killed", {"commit": commit, **orphans.describe(escaped)})
        await orphans.gone(pidfds)
        if capped is not None and not capped.remove():
            self.log("build.cgroup_left", {"commit": commit, "cgroup": capped.path})

    def _cgroup_hierarchy(self) -> cgroup.Hierarchy | None:
        if self.hierarchy is None and self.cgroup_problem is None:
            found = cgroup.memory_hierarchy()
            if found is None:
                self.cgroup_problem = "no memory cgroup controller is mounted for us"
                return None
            try:
                self.hierarchy = cgroup.prepare_v2_siblings(found)
            except cgroup.CgroupError as error:
                self.cgroup_problem = str(error)
        return self.hierarchy

    def _cgroup(self, commit: str) -> cgroup.BuildCgroup | None:
        """A cgroup capped at build.memory_max for this build, where we may make one; else the
        build runs uncapped, and the log says why."""
        if not self.config.memory_max:
            return None
        hierarchy = self._cgroup_hierarchy()
        problem = self.cgroup_problem
        if hierarchy is not None:
            try:
                return cgroup.BuildCgroup(hierarchy, self.config.memory_max)
            except cgroup.CgroupError as error:
                problem = str(error)
        self.log("build.uncapped", {"commit": commit, "memory_max": self.config.memory_max,
                                    "error": problem})
        return None

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


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as file:
            return file.read().strip()
    except OSError:
        return ""


def _oom_kills() -> int:
    """OOM kills so far where they would hit the build without a cgroup of its own: in our
    memory cgroup and those above it, else on the whole host."""
    hierarchy = cgroup.memory_hierarchy()
    if hierarchy is None:
        try:
            with open("/proc/vmstat") as file:
                for line in file:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0
    return cgroup.oom_kills_above(hierarchy)
