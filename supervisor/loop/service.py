"""The loop that connects drivers to the machine: take an event, `decide`, log the step, carry out
the actions. Long work (fetch, tree update, build, drain) runs as tasks or threads that post
their outcome later, so the loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from supervisor.core.config import Config
from supervisor.core.events import (
    Action,
    CancelTimer,
    CheckOverlap,
    CheckRequested,
    ChildStartFailed,
    Event,
    Exit,
    Fetch,
    KillChild,
    Note,
    OverlapChecked,
    ProbeHealth,
    RestartRequested,
    RollbackRequested,
    SetAside,
    SettingsChanged,
    StartBuild,
    StartChild,
    StartChildRequested,
    StartTimer,
    StatsRead,
    StopChild,
    StopChildRequested,
    StopProbe,
    StopRequested,
    SwitchRelease,
    TimerFired,
    UnwatchStats,
    UpdateTree,
    WatchStats,
)
from supervisor.core.machine import Phase, State, decide, initial_state
from supervisor.core.settings import settings_from
from supervisor.drivers.build import Builder
from supervisor.drivers.child import Child, stop_stale_child
from supervisor.drivers.childlog import open_sink
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.gitrepo import GitError, GitRepo
from supervisor.drivers.sdnotify import Notifier, watchdog_interval, watchdog_pings
from supervisor.drivers.sockets import close_all, describe
from supervisor.drivers.statefile import StateStore
from supervisor.drivers.statsfile import Stats, StatsWatcher, read_stats
from supervisor.loop import control
from supervisor.loop.signals import SignalRoutes
from supervisor.loop.status import StatusBoard, facts

# systemd's variables are for us alone: an app or a build that inherited NOTIFY_SOCKET could
# report READY=1 or STOPPING=1 in our name.
SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
DEPLOY_PHASES = (Phase.DRAINING, Phase.UPDATING, Phase.BUILDING, Phase.RESTARTING,
                 Phase.PROBATION, Phase.ROLLING_BACK)
REQUEST_EVENTS = {"deploy": CheckRequested, "restart": RestartRequested,
                  "stop-child": StopChildRequested, "start-child": StartChildRequested,
                  "rollback": RollbackRequested}


class StartupError(Exception):
    """The service cannot start as configured; one line for the user, exit code 2."""


class Service:
    def __init__(self, config: Config, log: EventLog, log_format_forced: bool = False,
                 listeners: Sequence[socket.socket] = (), inherited: bool = False,
                 early_notes: Sequence[tuple[str, dict[str, object]]] = ()) -> None:
        # What happened before the log existed (an app left behind, stopped to free a socket).
        self.early_notes = list(early_notes)
        self.config, self.log = config, log
        self.listeners, self.listeners_inherited = list(listeners), inherited
        self.log_format_forced = log_format_forced  # --log-format outlives a reload
        self.notifier = Notifier.from_environ(os.environ)
        self.watchdog_interval = watchdog_interval(os.environ)
        for name in SYSTEMD_ONLY:
            os.environ.pop(name, None)
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.store = StateStore(config.app.state_dir, report=self.log.write)
        self.repo = GitRepo(config.git, compare=not config.releases)
        self.releases = None
        if config.releases:
            from supervisor.drivers.releases import Releases  # only release mode pays for it

            self.releases = Releases(config.deploy.dir, self.repo, config.deploy.keep,
                                     self.log.write)
        stats_file = config.drain.stats_file if config.drain else None
        self.output = open_sink(config.log.child, self.log.write, config.log.child_file,
                                config.log.max_bytes, config.log.keep,
                                config.log.child_rate_limit_burst,
                                config.log.child_rate_limit_interval)
        self.child = Child(config.app, self.store, self.inbox.put_nowait, stats_file,
                           output=self.output, sockets=config.sockets)
        self.builder = (Builder(config.build, config.git.repo, config.app.env,
                                self.store, self.inbox.put_nowait, self.log.write,
                                cwd_for=self.releases.path if self.releases else None)
                        if config.build else None)
        self.prober: Any = None
        if config.health is not None and config.health.probe is not None:
            from supervisor.drivers.health import Prober  # only a configured probe pays for it

            self.prober = Prober(config.health, self.inbox.put_nowait)
        self.watcher = StatsWatcher(stats_file, self._on_stats) if stats_file else None
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.tree_update: asyncio.Task[None] | None = None
        self.state: State = initial_state(settings_from(config))
        self.status = StatusBoard(config.app.name, config.git.poll_interval,
                                  tuple(c.key for c in config.drain.until.comparisons)
                                  if config.drain else (),
                                  health_gate=config.health is not None)
        self._last_status: dict[str, Any] | None = None
        self.run_id = os.urandom(3).hex()  # with the deploy count: the log's correlation id
        self.lock: control.Lock | None = None
        self.trigger: Any = None
        self.ready_sent = False
        self.check_queued = False  # a CheckRequested from SIGUSR1 waits in the inbox
        self.signals: SignalRoutes | None = None

    async def _prepare(self) -> None:
        """Everything that must hold before the first child starts; failures are StartupError."""
        try:
            os.makedirs(self.config.app.state_dir, mode=0o711, exist_ok=True)  # see control
        except OSError as error:
            raise StartupError(f"app.state_dir: cannot create {self.config.app.state_dir}: "
                               f"{error.strerror}") from None
        try:
            self.lock = control.acquire_lock(self.config.app.state_dir, self.config.git.repo)
        except control.LockHeld as held:
            who = f"pid {held.pid}" if held.pid else "another process"
            if held.repository is not None:
                raise StartupError(f"git.repo: {who} already runs a supervisor on this "
                                   f"repository ({held.repository})") from None
            raise StartupError(f"app.state_dir: {who} already runs a supervisor for this app "
                               f"({self.config.app.state_dir})") from None
        except OSError as error:
            raise StartupError(f"app.state_dir: cannot take {self.config.app.state_dir} for "
                               f"this supervisor: {error.strerror}") from None
        self.early_notes[:0] = self.lock.notes
        if self.config.log.child == "file":
            try:
                self.output.file.open()  # type: ignore[union-attr]
            except OSError as error:
                raise StartupError(f"log.child_file: cannot open {self.config.log.child_file}: "
                                   f"{error.strerror}") from None
        stats_directory = os.path.dirname(self.config.drain.stats_file) if self.config.drain else ""
        if self.config.drain and not os.path.isdir(stats_directory):
            raise StartupError(f"drain.stats_file: directory {stats_directory} "
                               "does not exist")
        if not os.path.isdir(self.config.app.cwd):
            raise StartupError(f"app.cwd: {self.config.app.cwd} is not a directory")
        live = None
        if self.releases is not None:
            try:
                self.releases.setup()
            except OSError as error:
                raise StartupError(f"deploy.dir: cannot create releases in "
                                   f"{self.config.deploy.dir}: {error.strerror}") from None
            live = self.releases.live()
        if self.prober is not None and self.config.health and self.config.health.notify:
            from supervisor.drivers.health import NotifyListener

            path = os.path.join(self.config.app.state_dir, "notify.sock")
            try:
                self.prober.notify = NotifyListener(path, self.inbox.put_nowait)
            except OSError as error:
                raise StartupError(f"health.notify: cannot listen on {path}: "
                                   f"{error.strerror or error}") from None
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
        } | ({"live": live, "good": list(persisted.good)} if self.releases else {}))
        for name, what in self.early_notes:
            self.log.write(name, what)
        for listener, socket_config in zip(self.listeners, self.config.sockets, strict=True):
            self.log.write("socket.listening", {
                "listen": describe(listener), "name": socket_config.name,
                "fd": listener.fileno(), "from_systemd": self.listeners_inherited})
        if persisted.child is not None:
            await stop_stale_child(persisted.child, self.config.app.stop_signal,
                                   self.config.app.stop_timeout, self.log.write)
            self.store.save(child=None)
        if persisted.old_child is not None:
            await stop_stale_child(persisted.old_child, self.config.app.stop_signal,
                                   self.config.app.stop_timeout, self.log.write)
            self.store.save(old_child=None)
        if persisted.build is not None:
            await stop_stale_child(persisted.build, signal.SIGKILL, 5.0, self.log.write,
                                   kind="build")
            self.store.save(build=None)
        built = persisted.built if self.config.build else None
        good: tuple[str, ...] = ()
        if self.releases is not None:  # a release whose directory is gone cannot be run
            good = tuple(c for c in persisted.good if os.path.isdir(self.releases.path(c)))
        self.state = initial_state(settings_from(self.config), built=built,
                                   failed=persisted.failed, live=live, good=good,
                                   held=persisted.held)
        if self.config.trigger is not None:
            await self._start_trigger()

    async def _start_trigger(self) -> None:
        from supervisor.drivers.trigger import Trigger  # only configs with [trigger] pay for it

        trigger = self.config.trigger
        assert trigger is not None
        self.trigger = Trigger(trigger.secret, lambda: self.inbox.put_nowait(CheckRequested()),
                               self.log.write, path=trigger.path, burst=trigger.burst,
                               refill=trigger.refill)
        try:
            await self.trigger.start(trigger.listen)
        except OSError as error:
            # asyncio rewords bind errors around a Python tuple: give the plain reason.
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise StartupError(f"trigger.listen: cannot listen on {trigger.listen}: "
                               f"{reason}") from None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Signals are queued from the start, so a stop during a slow start-up (a stale child
        # being stopped) is honoured once the loop runs, instead of killing us half-way.
        # Through SignalRoutes: a flood of one signal can neither lose another one (a SIGTERM
        # after 10 s of SIGUSR1 went unhandled) nor fill stderr with warnings.
        self.signals = SignalRoutes(loop, {
            signal.SIGTERM: lambda: self.inbox.put_nowait(StopRequested(signal="SIGTERM")),
            signal.SIGINT: lambda: self.inbox.put_nowait(StopRequested(signal="SIGINT")),
            signal.SIGUSR1: self._check_requested,
            signal.SIGUSR2: self._take_requests,
            signal.SIGHUP: self._reload})
        watchdog = refresher = None
        if self.notifier is not None and self.watchdog_interval:
            # On the loop itself: a blocked loop stops the pings, and systemd steps in.
            watchdog = loop.create_task(watchdog_pings(self.notifier, self.watchdog_interval))
        if self.notifier is not None:
            refresher = loop.create_task(self._refresh_status())
        try:
            await self._prepare()
        except BaseException:
            self._remove_signal_handlers()
            for task in (watchdog, refresher):
                if task is not None:
                    task.cancel()
            raise
        poller = loop.create_task(self.repo.poll(self.inbox.put_nowait))
        self._take_requests(stale=True)
        try:
            while self.state.phase != Phase.STOPPED:
                event = await self.inbox.get()
                if isinstance(event, CheckRequested):
                    self.check_queued = False
                self._handle(event)
        finally:
            poller.cancel()
            await self._shut_down_drivers(poller)
            self._remove_signal_handlers()
            for task in (watchdog, refresher):
                if task is not None:
                    task.cancel()
        self.log.write("supervisor.stopped", {"pid": os.getpid()})
        return 0

    def _check_requested(self) -> None:
        """SIGUSR1: fetch now. Signals that come while one such request still waits in the
        inbox are that same request: a flood of them (hundreds of thousands in seconds) must
        not queue an event each, tens of MB, with a SIGTERM waiting behind them all."""
        if not self.check_queued:
            self.check_queued = True
            self.inbox.put_nowait(CheckRequested())

    def _remove_signal_handlers(self) -> None:
        if self.signals is not None:
            self.signals.close()

    def _take_requests(self, stale: bool = False) -> None:
        """SIGUSR2: `supervisor deploy | restart | stop-child | start-child` left word for us.
        With `stale`, at start-up, what a previous run left behind is only cleared away."""
        try:
            requests = control.take_requests(self.config.app.state_dir)
        except OSError as error:
            self.log.write("control.failed", {"error": error.strerror})
            return
        if stale:
            return
        for request in requests:
            self.inbox.put_nowait(REQUEST_EVENTS[request]())

    def _reload(self) -> None:
        """SIGHUP: re-read the config; apply what can change live, report what cannot."""
        from supervisor.core.config import ConfigError, load_config
        from supervisor.loop.footprint import forget_startup_modules
        from supervisor.loop.reload import merge

        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as error:
            self.log.write("config.reload_failed", {"problems": error.problems,
                                                    "config": self.config.path})
            new = None
        finally:
            forget_startup_modules()
        if new is not None:
            merged, applied, not_applied = merge(self.config, new)
            self._apply(merged)
            self.inbox.put_nowait(SettingsChanged(settings=settings_from(merged),
                                                  applied=applied, not_applied=not_applied))
        if self.notifier is not None:
            self.notifier.ready()

    def _apply(self, config: Config) -> None:
        """Hand the live parts of a reloaded config to the drivers; each uses it from its next
        step on (the next fetch, build or start)."""
        self.config = config
        self.repo.config = config.git
        self.repo.check_now()  # the poller picks up a new interval after one more fetch
        self.child.config = config.app
        if self.builder is not None and config.build is not None:
            self.builder.config = config.build
            self.builder.app_env = dict(config.app.env)
        self.status.poll_interval = config.git.poll_interval
        if not self.log_format_forced:
            self.log.format = config.log.format

    def _handle(self, first: Event) -> None:
        """Decide one event, then any events its actions answered at once (ChildStarted)."""
        queue = deque([first])
        while queue:
            event = queue.popleft()
            before = self.state
            self.state, actions = decide(before, event)
            if self.state.failed != before.failed or self.state.held != before.held:
                self.store.save(failed=self.state.failed, held=self.state.held)
            if self.state.good != before.good:
                self._keep_releases()
            if before.phase in DEPLOY_PHASES or self.state.phase in DEPLOY_PHASES:
                # Every line of one deploy attempt carries its id, build output included.
                self.log.context = {"deploy": f"{self.run_id}.{self.state.deploys}"}
            self.log.transition(event, before.phase, self.state.phase, actions)
            self.status.observe(event, actions, time.time())
            if isinstance(event, StopRequested) and before.phase != Phase.SHUTTING_DOWN \
                    and self.notifier is not None:
                self.notifier.stopping()
            for action in actions:
                queue.extend(self._perform(action))
        if self.state.phase not in DEPLOY_PHASES:
            self.log.context = {}
        self._publish()

    STATUS_REFRESH = 30.0  # seconds; only under systemd, which shows the line on request

    async def _refresh_status(self) -> None:
        """Keep systemd's STATUS line true between state changes: "next fetch in 4m" counts
        down, and the client count comes from the stats file (a bounded read, no watcher)."""
        while True:
            await asyncio.sleep(self.STATUS_REFRESH)
            if self.config.drain is not None and not self.state.draining:
                self.status.stats = read_stats(self.config.drain.stats_file).values
            if self.notifier is not None:
                self.notifier.status(self.status.line(self.state, time.time()))

    def _publish(self) -> None:
        """Status for `supervisor status` and systemd, written only when something changed."""
        now = time.time()
        snapshot = self.status.snapshot(self.state, now)
        stable = facts(snapshot)
        if stable != self._last_status:
            self._last_status = stable
            try:
                control.write_status(self.config.app.state_dir, snapshot)
            except OSError as error:
                self.log.write("status.write_failed", {"error": error.strerror})
        if self.notifier is not None:
            if not self.ready_sent and self.state.child is not None:
                # The first child is up: `systemctl start` may return.
                self.notifier.ready()
                self.ready_sent = True
            self.notifier.status(self.status.line(self.state, now))

    def _keep_releases(self) -> None:
        """Durably record the good releases, then delete those no longer worth keeping."""
        self.store.save(good=self.state.good)
        if self.releases is None:
            return
        state = self.state
        keep = {*state.good, state.head, state.target, state.pending}
        self.releases.prune(c for c in keep if c is not None)

    def _check_overlap(self, pid: int) -> Event:
        """A second generation fits if MemAvailable covers what the running one holds, with
        restart.overlap_reserve to spare (a tiny box must not swap or OOM for a restart)."""
        from supervisor.drivers.procfs import available_memory

        needed = self.child.resident_bytes(pid)
        available = available_memory()
        fits = (needed is not None and available is not None
                and available - needed >= self.config.restart.overlap_reserve)
        return OverlapChecked(fits=fits, available=available, needed=needed)

    def _child_directory(self) -> str:
        """Release mode runs the app from `current` (app.cwd's place inside the release)."""
        config = self.config
        if self.releases is None:
            return config.app.cwd
        inside = os.path.relpath(config.app.cwd, config.git.repo)
        if inside.startswith(".."):
            return config.app.cwd
        return os.path.normpath(os.path.join(self.releases.current, inside))

    def _start_child(self, commit: str | None) -> Event:
        if self.releases is not None and commit is not None:
            try:
                self.releases.switch(commit)
            except OSError as error:
                return ChildStartFailed(error=f"cannot point current at {commit[:12]}: "
                                              f"{error.strerror or error}")
        extra = {}
        if self.prober is not None and self.prober.notify is not None:
            extra["NOTIFY_SOCKET"] = self.prober.notify.path
        return self.child.start(commit, cwd=self._child_directory(), extra_env=extra)

    def _perform(self, action: Action) -> list[Event]:
        match action:
            case StartChild(commit=commit):
                return [self._start_child(commit)]
            case ProbeHealth(pid=pid) if self.prober is not None:
                self.prober.start(pid, self._child_directory(),
                                  {**os.environ, **self.config.app.env})
            case StopProbe() if self.prober is not None:
                self.prober.stop()
            case SetAside(commit=commit) if self.releases is not None:
                self.releases.set_aside(commit)
            case CheckOverlap(pid=pid):
                return [self._check_overlap(pid)]
            case SwitchRelease(commit=commit) if self.releases is not None:
                try:
                    self.releases.switch(commit)
                except OSError as error:
                    self.log.write("release.switch_failed", {"commit": commit,
                                                             "error": error.strerror})
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
        if self.releases is not None:
            keep = (*self.state.good, self.state.head)
            self.inbox.put_nowait(await self.releases.prepare(commit, (c for c in keep if c)))
            return
        self.inbox.put_nowait(await self.repo.update(commit, reset))

    def _cancel_timer(self, name: str) -> None:
        handle = self.timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _on_stats(self, stats: Stats) -> None:
        """The watcher passes on only a read that differs from the previous one: a child that
        rewrites its stats file all day must not fill the log."""
        if stats.ignored_lines:
            self.log.write("stats.lines_ignored", {"count": stats.ignored_lines,
                                                   "first": stats.first_ignored})
        self.inbox.put_nowait(StatsRead(values=stats.values, problem=stats.problem))

    async def _shut_down_drivers(self, poller: asyncio.Task[None]) -> None:
        """Kill what can be killed (fetch, build); let a tree update finish, since a git
        checkout cut in half would leave a broken tree behind."""
        for name in list(self.timers):
            self._cancel_timer(name)
        if self.trigger is not None:
            self.trigger.close()
        close_all(self.listeners, self.config.sockets, bound_here=not self.listeners_inherited)
        if self.output is not None:
            self.output.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.builder is not None:
            self.builder.cancel()
        if self.prober is not None:
            self.prober.stop()
            if self.prober.notify is not None:
                self.prober.notify.close()
        waiting: list[asyncio.Future[None]] = [poller]
        if self.releases is not None:
            for chore in list(self.releases.chores):  # an rm -rf can be redone next time
                chore.cancel()
                waiting.append(chore)
        if self.builder is not None and self.builder.task is not None:
            waiting.append(self.builder.task)
        if self.tree_update is not None:
            waiting.append(self.tree_update)
        await asyncio.gather(*waiting, return_exceptions=True)
