"""The build step: `build.command` in the repository with a timeout that kills the whole group.
Every output line goes to the event log; a failure carries the tail. It reports, never decides.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

from supervisor import proc
from supervisor.config import BuildConfig
from supervisor.events import BuildFailed, BuildSucceeded, Event
from supervisor.statefile import StateStore


class Builder:
    def __init__(self, config: BuildConfig, repo: str, app_env: Mapping[str, str],
                 store: StateStore, post: Callable[[Event], None],
                 log: Callable[[str, dict[str, Any]], None]) -> None:
        # app.env is laid over our own environment at each build, so a reload reaches the next.
        self.config, self.repo, self.app_env, self.store = config, repo, dict(app_env), store
        self.post, self.log = post, log
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

        self.log("build.started", {"commit": commit})
        try:
            result = await proc.run(self.config.command, cwd=self.repo,
                                    env={**os.environ, **self.app_env,
                                         "SUPERVISOR_COMMIT": commit},
                                    timeout=self.config.timeout, on_line=output)
        except OSError as error:
            self.post(BuildFailed(commit=commit, reason=f"cannot start: {error}"))
            return
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

