"""The loop that connects drivers to the machine: take an event, `decide`, log the step, carry out
the actions. Long work (fetch, tree update, build, drain) runs as tasks or threads that post
their outcome later, so the loop itself never blocks.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import Any

from supervisor.core.config import Config
from supervisor.core.display import short_commit
from supervisor.core.events import (
    AcquireSlot,
    Action,
    AwaitFleet,
    BuildFailed,
    BuildSucceeded,
    CancelTimer,
    CheckOverlap,
    CheckRequested,
    ChildStartFailed,
    Event,
    Fetch,
    KillChild,
    Note,
    NoteName,
    OverlapChecked,
    ProbeHealth,
    PruneReleases,
    ReleaseSlot,
    ReportFleet,
    RestartRequested,
    RollbackRequested,
    SaveState,
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
from supervisor.core.fleet import rollout_id
from supervisor.core.machine import DEPLOYING, Phase, State, decide, initial_state
from supervisor.core.settings import settings_from
from supervisor.drivers.build import Builder
from supervisor.drivers.child import Child
from supervisor.drivers.childlog import open_sink
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.gitrepo import GitError, GitRepo
from supervisor.drivers.sockets import close_all, describe
from supervisor.drivers.statefile import Persisted, StateStore
from supervisor.drivers.statsfile import Stats, StatsWatcher, read_stats
from supervisor.loop import control
from supervisor.loop.limits import BuildQueue
from supervisor.loop.startup import Claim, StartupError, start_trigger
from supervisor.loop.status import StatusBoard, facts
from supervisor.loop.tasks import DriverTasks

SERVING_PROVEN = frozenset({Phase.RUNNING, Phase.UPDATING, Phase.BUILDING, Phase.DRAINING,
                            Phase.AWAITING_SLOT})
REQUEST_EVENTS = {"deploy": CheckRequested, "restart": RestartRequested,
                  "stop-child": StopChildRequested, "start-child": StartChildRequested,
                  "rollback": RollbackRequested}


class Service:
    """One app's loop: the drivers post events to `inbox`, `_handle` decides and acts. What it
    must own before it runs (the lock, the sockets) is given to it, already claimed."""

    def __init__(self, config: Config, log: EventLog, claim: Claim,
                 log_format_forced: bool = False, repo: GitRepo | None = None,
                 host: Any = None) -> None:
        """`claim`: the lock, the sockets and the early notes of startup.claim(). `repo`: the
        git driver, made from the config unless given (a test gives one that fails). `host`:
        the process that runs this app among others (its build queue; told of every change),
        or None for an app on its own."""
        self.config, self.log, self.claim = config, log, claim
        self.listeners, self.listeners_inherited = claim.listeners, claim.inherited
        self.check_queued = False  # a CheckRequested from SIGUSR1 waits in the inbox
        self.asked: dict[int, tuple[str, Event]] = {}  # requests from the shell, by event
        self.remote_address: str | None = None  # its remote's URL, when a webhook routes
        self.log_format_forced = log_format_forced  # --log-format outlives a reload
        self.host = host
        self.builds = host.builds if host is not None else BuildQueue(1)
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._make_drivers(config, repo)
        self.drivers = DriverTasks(self.log.write)
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.tree_update: asyncio.Task[None] | None = None
        self.tree_restore: asyncio.Task[None] | None = None
        self.state: State = initial_state(settings_from(config))
        self.status = StatusBoard(config.app.name, config.git.poll_interval,
                                  tuple(c.key for c in config.drain.until.comparisons)
                                  if config.drain else (),
                                  health_gate=config.health is not None)
        self._last_status: dict[str, Any] | None = None
        self.run_id = os.urandom(3).hex()  # with the deploy count: the log's correlation id
        self.fleet: Any = None  # fleet mode: this app's member of its group (attach_fleet)

    def attach_fleet(self, member: Any) -> None:
        """Fleet mode: the Host's agent answers this app's AwaitFleet and AcquireSlot."""
        self.fleet = member
        member.on_change = self._fleet_changed
        self.status.fleet_group = member.policy.group

    def _fleet_changed(self) -> None:
        self.status.fleet_reason = self.fleet.waiting
        self._publish()

    def _make_drivers(self, config: Config, repo: GitRepo | None) -> None:
        self.store = StateStore(config.app.state_dir, report=self.log.write)
        self.repo = repo or GitRepo(config.git, compare=not config.releases, log=self.log.write)
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
                           output=self.output, sockets=config.sockets,
                           socket_fds=[listener.fileno() for listener in self.listeners])
        self.child.report = self.log.write  # escaped processes killed, OOM protection refused
        self.builder = (Builder(config.build, config.git.repo, config.app.env,
                                self.store, self.inbox.put_nowait, self.log.write,
                                cwd_for=self.releases.path if self.releases else None)
                        if config.build else None)
        self.prober: Any = None
        if config.health is not None and config.health.probe is not None:
            from supervisor.drivers.health import Prober  # only a configured probe pays for it

            self.prober = Prober(config.health, self.inbox.put_nowait)
        self.watcher = StatsWatcher(stats_file, self._on_stats) if stats_file else None
        self.trigger: Any = None

    async def _prepare(self) -> None:
        """Everything that must hold before the first child starts; failures are StartupError.
        The lock is held and what a killed run left is stopped already (startup.claim)."""
        self._check_paths()
        live = self._set_up_releases()
        self._listen_for_notify()
        try:
            # A tree an earlier run left half-updated goes back to its last build first.
            head = await self.repo.prepare(
                built=self.store.load().built if self.config.build and not self.releases else None)
        except GitError as error:
            raise StartupError(str(error)) from None
        persisted = self.store.load()
        self._log_start(head, live, persisted)
        built = persisted.built if self.config.build else None
        good: tuple[str, ...] = ()
        if self.releases is not None:  # a release whose directory is gone cannot be run
            good = tuple(c for c in persisted.good if os.path.isdir(self.releases.path(c)))
        self.state = initial_state(settings_from(self.config), built=built,
                                   failed=persisted.failed, live=live, good=good,
                                   held=persisted.held)
        if self.config.trigger is not None:
            await self._start_trigger()

    def _check_paths(self) -> None:
        """The directories the app needs were checked by startup.claim already."""
        config = self.config
        if config.log.child == "file":
            try:
                self.output.file.open()  # type: ignore[union-attr]
            except OSError as error:
                raise StartupError(f"log.child_file: cannot open {config.log.child_file}: "
                                   f"{error.strerror}") from None

    def _set_up_releases(self) -> str | None:
        """The live release in release mode (None in place)."""
        if self.releases is None:
            return None
        try:
            self.releases.setup()
        except OSError as error:
            raise StartupError(f"deploy.dir: cannot create releases in "
                               f"{self.config.deploy.dir}: {error.strerror}") from None
        return self.releases.live()

    def _listen_for_notify(self) -> None:
        if self.prober is None or not (self.config.health and self.config.health.notify):
            return
        from supervisor.drivers.health import NotifyListener

        path = os.path.join(self.config.app.state_dir, "notify.sock")
        try:
            self.prober.notify = NotifyListener(path, self.inbox.put_nowait)
        except OSError as error:
            raise StartupError(f"health.notify: cannot listen on {path}: "
                               f"{error.strerror or error}") from None

    def _log_start(self, head: str, live: str | None, persisted: Persisted) -> None:
        """supervisor.started, then what happened before the log existed, then the sockets."""
        self.log.write("supervisor.started", {
            "pid": os.getpid(), "repo": str(self.config.git.repo),
            "remote": self.repo.remote, "branch": self.repo.branch, "head": head,
            "built": persisted.built, "failed": persisted.failed,
            "config": str(self.config.path),
        } | ({"live": live, "good": list(persisted.good)} if self.releases else {}))
        for name, what in self.claim.notes:
            self.log.write(name, what)
        for listener, socket_config in zip(self.listeners, self.config.sockets, strict=True):
            self.log.write("socket.listening", {
                "listen": describe(listener), "name": socket_config.name,
                "fd": listener.fileno(), "from_systemd": self.listeners_inherited})

    async def _start_trigger(self) -> None:
        assert self.config.trigger is not None
        self.trigger = await start_trigger(
            self.config.trigger, lambda: self.inbox.put_nowait(CheckRequested()), self.log.write)

    async def run(self) -> int:
        """The app on its own (the Host runs prepare() and serve() for each of its apps)."""
        await self.prepare()
        code = await self.serve()
        self.log.write("supervisor.stopped", {"pid": os.getpid()})
        return code

    async def prepare(self) -> None:
        """Everything that must hold before the first child starts; failures are StartupError.
        A stop requested meanwhile (during the claim too) is waiting in the inbox."""
        for name in self.claim.stop_signals:
            self.inbox.put_nowait(StopRequested(signal=name))
        await self._prepare()

    async def serve(self) -> int:
        """Decide events until the machine has stopped; then the drivers are shut down."""
        self.drivers.start("poller", lambda: self.repo.poll(self.inbox.put_nowait))
        self.take_requests(stale=True)
        try:
            while self.state.phase != Phase.STOPPED:
                event = await self.inbox.get()
                if isinstance(event, CheckRequested):
                    self.check_queued = False
                self._handle(event)
        finally:
            await self._shut_down_drivers()
            await self.drivers.close()
        return 0

    def release(self) -> None:
        """An app that could not start gives back what it claimed: its lock and its sockets."""
        self._close_listeners()
        self.claim.lock.release()

    def check(self) -> None:
        """SIGUSR1: fetch now. Signals that come while one such request still waits in the
        inbox are that same request: a flood of them (hundreds of thousands in seconds) must
        not queue an event each, tens of MB, with a SIGTERM waiting behind them all."""
        if not self.check_queued:
            self.check_queued = True
            self.inbox.put_nowait(CheckRequested())

    @property
    def settled(self) -> bool:
        """Through its start: a first child started, or it rests without one (nothing to run,
        backing off, held, stopped). systemd hears READY=1 once every app is settled."""
        return self.state.generation is not None or self.state.phase in (
            Phase.BACKOFF, Phase.HELD, Phase.STOPPED) or (
            self.state.phase == Phase.RUNNING and self.state.deploy is None)

    def take_requests(self, stale: bool = False) -> None:
        """SIGUSR2: `supervisor deploy | restart | stop-child | start-child` left word for us.
        With `stale`, at start-up, what a previous run left behind is only cleared away."""
        try:
            requests = control.take_named_requests(self.config.app.state_dir)
        except OSError as error:
            self.log.write("control.failed", {"error": error.strerror})
            return
        if stale:
            return
        for name, request in requests:
            if request == "reload":  # the whole process's: the config file is read again
                self._reload_requested(name)
                continue
            event = REQUEST_EVENTS[request]()
            self.asked[id(event)] = (name, event)  # answered once decided (see _answer)
            self.inbox.put_nowait(event)

    def _reload_requested(self, name: str) -> None:
        """`supervisor reload`: as SIGHUP, answered with what the reload found wrong."""
        problems = self.host.reload() if self.host is not None else ["not under a host"]
        self._reply(name, "; ".join(problems) or None)

    def _answer(self, event: Event, actions: list[Action]) -> None:
        """The command that sent a request waits for this: refused (and why) or accepted."""
        name, _ = self.asked.pop(id(event))
        self._reply(name, next((a.facts.get("reason") for a in actions if isinstance(a, Note)
                                and a.event == NoteName.CONTROL_IGNORED), None))

    def _reply(self, name: str, refusal: object) -> None:
        facts: dict[str, Any] = {"ok": refusal is None, "phase": str(self.state.phase)}
        if refusal is not None:
            facts["reason"] = refusal
        try:
            control.answer(self.config.app.state_dir, name, facts)
        except OSError as error:
            self.log.write("control.failed", {"error": error.strerror})

    def reload(self, new: Config) -> None:
        """SIGHUP re-read this app's config: apply what can change live, report what cannot."""
        from supervisor.loop.reload import merge

        merged, applied, not_applied = merge(self.config, new)
        self._apply(merged)
        self.inbox.put_nowait(SettingsChanged(settings=settings_from(merged),
                                              applied=applied, not_applied=not_applied))

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
        if self.fleet is not None and config.fleet is not None:
            self.fleet.policy = config.fleet  # the next slot taken, the next go asked
        if not self.log_format_forced:
            self.log.format = config.log.format

    def _handle(self, first: Event) -> None:
        """Decide one event, then any events its actions answered at once (ChildStarted)."""
        queue = deque([first])
        while queue:
            event = queue.popleft()
            before = self.state
            self.state, actions = decide(before, event)
            if id(event) in self.asked:
                self._answer(event, actions)
            if before.phase in DEPLOYING or self.state.phase in DEPLOYING:
                # Every line of one deploy attempt carries its id, build output included.
                self.log.context = {"deploy": f"{self.run_id}.{self.state.deploys}"}
            if self.fleet is not None:
                self._fleet_context(before)
            self.log.transition(event, before.phase, self.state.phase, actions)
            self.status.observe(event, actions, time.time())
            if isinstance(event, BuildSucceeded | BuildFailed):
                self.builds.done(self.config.app.name)  # the next app's build may start
            for action in actions:
                queue.extend(self._perform(action))
        if self.state.phase not in DEPLOYING:
            self.log.context = {}
        if self.fleet is not None:
            self._fleet_context()
        self._publish()

    def _rollout(self, state: State | None = None) -> str | None:
        """Fleet mode: the rollout this app takes part in, the same id on every box."""
        state = state or self.state
        commit = state.target or (state.awaiting.commit if state.awaiting else None)
        if commit is None and state.phase in DEPLOYING:
            commit = state.child_commit  # restarted into it: on probation, or rolling back
        return rollout_id(self.fleet.policy.group, commit) if commit else None

    def _fleet_context(self, before: State | None = None) -> None:
        """The step that ends a rollout (health.passed) still carries its id."""
        rollout = self._rollout() or (self._rollout(before) if before is not None else None)
        if rollout is not None:
            self.log.context = {**self.log.context, "rollout": rollout}
        else:
            self.log.context.pop("rollout", None)

    def refresh_stats(self) -> None:
        """For the STATUS line between changes: the client count from the stats file (a bounded
        read, no watcher) while no drain watches it."""
        if self.config.drain is not None and not self.state.draining:
            self.status.stats = read_stats(self.config.drain.stats_file).values

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
        if self.fleet is not None:
            state = self.state
            # Serving a release that passed its gate: while a new one builds, drains or waits
            # for a slot the old one still serves.
            healthy = state.child is not None and state.phase in SERVING_PROVEN
            self.fleet.publish(str(state.phase), state.child_commit, healthy, self._rollout())
        if self.host is not None:
            self.host.changed()

    def _check_overlap(self, pid: int) -> Event:
        """The facts the machine weighs before starting a second generation beside `pid`."""
        from supervisor.drivers.procfs import available_memory

        return OverlapChecked(available=available_memory(),
                              needed=self.child.resident_bytes(pid))

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
                return ChildStartFailed(error=f"cannot point current at {short_commit(commit)}: "
                                              f"{error.strerror or error}")
        elif commit is not None:
            # In place, the app runs only from a tree whose HEAD is the commit built there:
            # never from one a git cut short, one a git is still writing, or one moved by hand.
            problem = self.repo.tree_problem(commit)
            if problem is not None:
                self._restore_tree(commit)
                return ChildStartFailed(error=f"the tree is not {commit[:12]} as built: "
                                              f"{problem}; putting it back first")
        extra = {}
        if self.prober is not None and self.prober.notify is not None:
            extra["NOTIFY_SOCKET"] = self.prober.notify.path
        return self.child.start(commit, cwd=self._child_directory(), extra_env=extra)

    def _perform(self, action: Action) -> list[Event]:
        """Carry out one action; the events that answer it at once go back to `decide`."""
        match action:
            case StartChild(commit=commit):
                return [self._start_child(commit)]
            case CheckOverlap(pid=pid):
                return [self._check_overlap(pid)]
            case SaveState(failed=failed, held=held, good=good):
                self.store.save(failed=failed, held=held, good=good)
            case StopChild(pid=pid):
                self.child.stop(pid)
            case KillChild(pid=pid):
                self.child.kill(pid)
            case Fetch():
                self.repo.check_now()
            case UpdateTree(commit=commit, reset=reset, reuse=reuse):
                self.tree_update = asyncio.get_running_loop().create_task(
                    self._update_tree(commit, reset, reuse))
            case StartBuild(commit=commit) if self.builder is not None:
                self._start_build(commit)
            case SetAside() | PruneReleases() | SwitchRelease() if self.releases is not None:
                self._release_action(action)
            case ProbeHealth() | StopProbe() | WatchStats() | UnwatchStats():
                self._watch_action(action)
            case StartTimer() | CancelTimer():
                self._timer_action(action)
            case Note(event=name, facts=facts):
                self.log.write(name, facts)
            case AwaitFleet() | AcquireSlot() | ReleaseSlot() | ReportFleet():
                self._fleet_action(action)
        return []  # Exit: the loop ends once the machine reaches STOPPED

    def _fleet_action(self, action: Action) -> None:
        """Handed to the agent, which carries it out in order and answers with events."""
        if self.fleet is None:
            return  # no [fleet] in the main file: the config refused this app already
        match action:
            case AwaitFleet(commit=commit):
                self.fleet.await_go(commit)
            case AcquireSlot(commit=commit):
                self.fleet.acquire(commit)
            case ReleaseSlot(commit=commit):
                self.fleet.release(commit)
            case ReportFleet(commit=commit, healthy=healthy, reason=reason):
                self.fleet.record_outcome(commit, healthy, reason)

    def _release_action(self, action: Action) -> None:
        assert self.releases is not None
        match action:
            case SetAside(commit=commit):
                self.releases.set_aside(commit)
            case PruneReleases(keep=keep):
                self.releases.prune(keep)
            case SwitchRelease(commit=commit):
                try:
                    self.releases.switch(commit)
                except OSError as error:
                    self.log.write("release.switch_failed", {"commit": commit,
                                                             "error": error.strerror})

    def _watch_action(self, action: Action) -> None:
        """The probes of a generation on probation, and the stats watcher of a drain."""
        match action:
            case ProbeHealth(pid=pid) if self.prober is not None:
                self.prober.start(pid, self._child_directory(),
                                  {**os.environ, **self.config.app.env})
            case StopProbe() if self.prober is not None:
                self.prober.stop()
            case WatchStats() if self.watcher is not None:
                self.watcher.start()
            case UnwatchStats() if self.watcher is not None:
                self.watcher.stop()

    def _timer_action(self, action: Action) -> None:
        match action:
            case StartTimer(timer=name, seconds=seconds, serial=serial):
                self._cancel_timer(name)
                self.timers[name] = asyncio.get_running_loop().call_later(
                    seconds, self.inbox.put_nowait, TimerFired(timer=name, serial=serial))
            case CancelTimer(timer=name):
                self._cancel_timer(name)

    def _start_build(self, commit: str) -> None:
        """At most `max_builds` builds run at once across the apps; this one may wait its turn."""
        builder = self.builder
        assert builder is not None
        position = self.builds.request(self.config.app.name, lambda: builder.start(commit))
        if position is not None:
            self.log.write("build.queued", {"commit": commit, "position": position})

    def _restore_tree(self, commit: str) -> None:
        """Put the tree back at `commit` in the background; the crash rules retry the start,
        which finds the tree whole by then (or still refuses, and says why)."""
        if self.tree_restore is not None and not self.tree_restore.done():
            return

        async def restore() -> None:
            try:
                await self.repo.restore(commit)
            except GitError:
                pass  # restore() logged git.restore_failed: the next start says why again

        self.tree_restore = asyncio.get_running_loop().create_task(restore())

    async def _update_tree(self, commit: str, reset: bool, reuse: bool) -> None:
        if self.releases is not None:
            self.inbox.put_nowait(await self.releases.prepare(commit, (commit,) if reuse else ()))
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

    async def _shut_down_drivers(self) -> None:
        """Kill what can be killed (fetch, build); let a tree update finish, since a git
        checkout cut in half would leave a broken tree behind."""
        await self.drivers.close("poller")
        self.builds.cancel(self.config.app.name)
        self.builds.done(self.config.app.name)
        for name in list(self.timers):
            self._cancel_timer(name)
        self._close_listeners()
        if self.builder is not None:
            self.builder.cancel()
        waiting: list[asyncio.Future[None]] = []
        if self.releases is not None:
            for chore in list(self.releases.chores):  # an rm -rf can be redone next time
                chore.cancel()
                waiting.append(chore)
        if self.builder is not None and self.builder.task is not None:
            waiting.append(self.builder.task)
        for chore in (self.tree_update, self.tree_restore):  # a tree cut in half is worse
            if chore is not None:
                waiting.append(chore)
        await asyncio.gather(*waiting, return_exceptions=True)

    def _close_listeners(self) -> None:
        """Everything that could still bring news in: the webhook, sockets, output, watchers."""
        if self.trigger is not None:
            self.trigger.close()
        close_all(self.listeners, self.config.sockets, bound_here=not self.listeners_inherited)
        if self.output is not None:
            self.output.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.prober is not None:
            self.prober.stop()
            if self.prober.notify is not None:
                self.prober.notify.close()
