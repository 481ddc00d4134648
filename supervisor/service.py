"""The loop that connects drivers to the machine: take an event, `decide`, log the step, carry out
the actions. Long work (fetch, tree update, build, drain) runs as tasks or threads that post
their outcome later, so the loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque

from supervisor.build import Builder
from supervisor.child import Child, stop_stale_child
from supervisor.config import Config
from supervisor.eventlog import EventLog
from supervisor.events import (
    Action,
    CancelTimer,
    CheckRequested,
    Event,
    Exit,
    Fetch,
    KillChild,
    Note,
    StartBuild,
    StartChild,
    StartTimer,
    StatsRead,
    StopChild,
    StopRequested,
    TimerFired,
    UnwatchStats,
    UpdateTree,
    WatchStats,
)
from supervisor.gitrepo import GitError, GitRepo
from supervisor.machine import Phase, Settings, State, decide, initial_state
from supervisor.statefile import StateStore
from supervisor.statsfile import Stats, StatsWatcher


class StartupError(Exception):
    """The service cannot start as configured; one line for the user, exit code 2."""


def settings_from(config: Config) -> Settings:
    return Settings(
        backoff_min=config.restart.backoff_min,
        backoff_max=config.restart.backoff_max,
        reset_after=config.restart.reset_after,
        stop_timeout=config.app.stop_timeout,
        drain_condition=config.drain.until if config.drain else None,
        drain_timeout=config.drain.timeout if config.drain else 0.0,
        has_build=config.build is not None,
        reset_on_diverge=config.git.on_diverge == "reset",
    )


class Service:
    def __init__(self, config: Config, log: EventLog) -> None:
        self.config, self.log = config, log
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.store = StateStore(config.app.state_dir)
        self.repo = GitRepo(config.git)
        stats_file = config.drain.stats_file if config.drain else None
        self.child = Child(config.app, self.store, self.inbox.put_nowait, stats_file)
        self.builder = (Builder(config.build, config.git.repo, {**os.environ, **config.app.env},
                                self.store, self.inbox.put_nowait, self.log.write)
                        if config.build else None)
        self.watcher = StatsWatcher(stats_file, self._on_stats) if stats_file else None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.tree_update: asyncio.Task[None] | None = None
        self.state: State = initial_state(settings_from(config))
        self._last_stats: Stats | None = None

    async def _prepare(self) -> None:
        """Everything that must hold before the first child starts; failures are StartupError."""
        try:
            os.makedirs(self.config.app.state_dir, exist_ok=True)
        except OSError as error:
            raise StartupError(f"app.state_dir: cannot create {self.config.app.state_dir}: "
                               f"{error.strerror}") from None
        stats_directory = os.path.dirname(self.config.drain.stats_file) if self.config.drain else ""
        if self.config.drain and not os.path.isdir(stats_directory):
            raise StartupError(f"drain.stats_file: directory {stats_directory} "
                               "does not exist")
        if not os.path.isdir(self.config.app.cwd):
            raise StartupError(f"app.cwd: {self.config.app.cwd} is not a directory")
        try:
            head = await self.repo.prepare()
        except GitError as error:
            raise StartupError(str(error)) from None
        persisted = self.store.load()
        self.log.write("supervisor.started", {
            "pid": os.getpid(), "app": self.config.app.name, "repo": str(self.config.git.repo),
            "remote": self.repo.remote, "branch": self.repo.branch, "head": head,
            "built": persisted.built, "failed": persisted.failed,
            "config": str(self.config.path),
        })
        if persisted.child is not None:
            await stop_stale_child(persisted.child, self.config.app.stop_signal,
                                   self.config.app.stop_timeout, self.log.write)
            self.store.save(child=None)
        built = persisted.built if self.config.build else None
        self.state = initial_state(settings_from(self.config), built=built,
                                   failed=persisted.failed)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Signals are queued from the start, so a stop during a slow start-up (a stale child
        # being stopped) is honoured once the loop runs, instead of killing us half-way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.inbox.put_nowait, StopRequested(signal=sig.name))
        loop.add_signal_handler(signal.SIGUSR1, self.inbox.put_nowait, CheckRequested())
        loop.add_signal_handler(signal.SIGHUP, self.log.write, "supervisor.sighup_ignored",
                                {"reason": "config reload is not supported yet"})
        try:
            await self._prepare()
        except BaseException:
            self._remove_signal_handlers(loop)
            raise
        poller = loop.create_task(self.repo.poll(self.inbox.put_nowait))
        try:
            while self.state.phase != Phase.STOPPED:
                self._handle(await self.inbox.get())
        finally:
            poller.cancel()
            await self._shut_down_drivers(poller)
            self._remove_signal_handlers(loop)
        self.log.write("supervisor.stopped", {"pid": os.getpid()})
        return 0

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _handle(self, first: Event) -> None:
        """Decide one event, then any events its actions answered at once (ChildStarted)."""
        queue = deque([first])
        while queue:
            event = queue.popleft()
            before = self.state
            self.state, actions = decide(before, event)
            if self.state.failed != before.failed:
                self.store.save(failed=self.state.failed)
            self.log.transition(event, before.phase, self.state.phase, actions)
            for action in actions:
                queue.extend(self._perform(action))

    def _perform(self, action: Action) -> list[Event]:
        match action:
            case StartChild(commit=commit):
                return [self.child.start(commit)]
            case StopChild(pid=pid):
                self.child.stop(pid)
            case KillChild(pid=pid):
                self.child.kill(pid)
            case Fetch():
                self.repo.check_now()
            case UpdateTree(commit=commit, reset=reset):
                self.tree_update = asyncio.get_running_loop().create_task(
                    self._update_tree(commit, reset))
            case StartBuild(commit=commit) if self.builder is not None:
                self.builder.start(commit)
            case WatchStats() if self.watcher is not None:
                self._last_stats = None
                self.watcher.start()
            case UnwatchStats() if self.watcher is not None:
                self.watcher.stop()
            case StartTimer(timer=name, seconds=seconds, serial=serial):
                self._cancel_timer(name)
                self.timers[name] = asyncio.get_running_loop().call_later(
                    seconds, self.inbox.put_nowait, TimerFired(timer=name, serial=serial))
            case CancelTimer(timer=name):
                self._cancel_timer(name)
            case Note(event=name, facts=facts):
                self.log.write(name, facts)
            case Exit():
                pass  # the loop ends once the machine reaches STOPPED
        return []

    async def _update_tree(self, commit: str, reset: bool) -> None:
        self.inbox.put_nowait(await self.repo.update(commit, reset))

    def _cancel_timer(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _on_stats(self, stats: Stats) -> None:
        """A read identical to the previous one is dropped: it can change no decision, and a
        child that rewrites its stats file all day must not fill the log."""
        if stats == self._last_stats:
            return
        self._last_stats = stats
        if stats.ignored_lines:
            self.log.write("stats.lines_ignored", {"count": stats.ignored_lines,
                                                   "first": stats.first_ignored})
        self.inbox.put_nowait(StatsRead(values=stats.values, problem=stats.problem))

    async def _shut_down_drivers(self, poller: asyncio.Task[None]) -> None:
        """Kill what can be killed (fetch, build); let a tree update finish, since a git
        checkout cut in half would leave a broken tree behind."""
        for name in list(self.timers):
            self._cancel_timer(name)
        if self.watcher is not None:
            self.watcher.stop()
        if self.builder is not None:
            self.builder.cancel()
        waiting: list[asyncio.Future[None]] = [poller]
        if self.builder is not None and self.builder.task is not None:
            waiting.append(self.builder.task)
        if self.tree_update is not None:
            waiting.append(self.tree_update)
        await asyncio.gather(*waiting, return_exceptions=True)
