"""The process: one asyncio loop that runs every app's Service (each its own machine), and what
exists once per process: the signals, systemd's notifications, the event log, the webhook and
the limits the apps share. It routes; every decision about an app stays in that app's machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import replace
from typing import Any

from supervisor.core.config import Config, ConfigError
from supervisor.core.events import Action, CheckRequested, Event, StopRequested
from supervisor.core.hostconfig import HostConfig
from supervisor.core.machine import Phase
from supervisor.drivers.diskwriter import DiskWriter
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.sdnotify import Notifier, watchdog_interval, watchdog_pings
from supervisor.drivers.signals import SignalRoutes
from supervisor.loop.limits import BuildQueue, FetchGate, stagger
from supervisor.loop.service import Service
from supervisor.loop.startup import Claim, StartupError, claim, start_trigger
from supervisor.loop.tasks import DriverTasks, describe

# systemd's variables are for us alone: an app or a build that inherited NOTIFY_SOCKET could
# report READY=1 or STOPPING=1 in our name.
SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_REFRESH = 30.0  # seconds between STATUS= lines while nothing changes
DRAIN_REFRESH = 1.0  # ... while an app drains: the line counts the seconds it waits
# How long the exit waits for the writer thread to put the last state and lines on disk, beyond
# the drain it awaits (a disk that never answers must not keep a stopped supervisor alive).
WRITER_STOP = 10.0


class AppLog:
    """One app's view of the shared event log: every line it writes carries `app` (None for the
    lines about the whole process) and, during a deploy, that app's deploy id."""

    def __init__(self, log: EventLog, app: str | None) -> None:
        self.log, self.app = log, app
        self.context: dict[str, Any] = {}

    @property
    def format(self) -> str:
        return self.log.format

    @format.setter
    def format(self, value: str) -> None:
        self.log.format = value

    def write(self, event: str, facts: dict[str, Any]) -> None:
        self.log.write(event, facts, {"app": self.app, **self.context})

    def transition(self, event: Event, before: str, after: str, actions: list[Action]) -> None:
        self.log.transition(event, before, after, actions, {"app": self.app, **self.context})


class Host:
    """Runs the apps of one config. A single-app file is a host of one app, with today's
    behaviour; a main file with [supervisor] runs many, each isolated from the others'
    trouble: one loop, but no step of one app ever waits on another's."""

    def __init__(self, config: HostConfig, log: EventLog, claims: Mapping[str, Claim],
                 log_format_forced: bool = False,
                 environ: MutableMapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.config, self.log = config, log
        log.context = {"app": None}  # the log's own lines (log.repeated...) are the process's
        self.own_log = AppLog(log, None)
        self.notifier = Notifier.from_environ(environ)
        self.watchdog_interval = watchdog_interval(environ)
        for name in SYSTEMD_ONLY:
            environ.pop(name, None)
        self.builds = BuildQueue(config.limits.max_builds)
        self.fetches = FetchGate(config.limits.max_fetches) if config.main else None
        self.log_format_forced = log_format_forced
        self.services: dict[str, Service] = {}
        self.tasks: dict[str, asyncio.Task[int]] = {}
        self.claims = dict(claims)
        self.drivers = DriverTasks(self.own_log.write)
        self.signals: SignalRoutes | None = None
        self.trigger: Any = None
        self.ready_sent = False
        self.stopping = False
        self.stopping_sent = False
        self.removing: set[str] = set()  # apps whose files are gone, stopping
        self.reload_problems: list[str] = []
        self.writer: DiskWriter | None = None  # while run() runs
        self._wake = asyncio.Event()
        self._phases: dict[str, Phase] = {}
        self.fleet: Any = None  # fleet mode: the agent, made with the first app in a group
        self.running = False
        for app in config.apps:
            if app.app.name in self.claims:
                self._add(app, self.claims[app.app.name])

    def _add(self, config: Config, taken: Claim) -> Service:
        name = config.app.name
        service = Service(config, AppLog(self.log, name), taken,  # type: ignore[arg-type]
                          log_format_forced=self.log_format_forced, host=self)
        if self.fetches is not None:
            service.repo.gate = self.fetches
            index = len(self.services)
            service.repo.offset = stagger(index, max(len(self.config.apps), 1),
                                          config.git.poll_interval)
        service.store.writer = self.writer
        self.services[name] = service
        if config.fleet is not None and self.config.fleet is not None:
            agent = self._fleet_agent(self.config.fleet)
            service.attach_fleet(agent.join(name, config.fleet, service.inbox.put_nowait,
                                            service.log.write))
        return service

    def _fleet_agent(self, config: Any) -> Any:
        """Only a box with apps in a fleet group imports the etcd client and the agent."""
        if self.fleet is None:
            from supervisor.drivers.fleet import FleetAgent

            self.fleet = FleetAgent(config, self.own_log.write)
            if self.running:
                self._start_fleet()
        return self.fleet

    def _start_fleet(self) -> None:
        self.drivers.start("fleet", self.fleet.work)
        self.drivers.start("fleet_lease", self.fleet.keep_alive)

    # -----------------------------------------------------------------------------------------
    # The run

    async def run(self) -> int:
        """Serve until every app has stopped; the writer thread's queue is on disk before this
        returns or raises, the last state and `supervisor.stopped` included."""
        self._start_writer()
        try:
            return await self._serve()
        finally:
            await self._stop_writer()

    def _start_writer(self) -> None:
        self.writer = DiskWriter(asyncio.get_running_loop(), self._writer_failed)
        self.log.writer = self.writer
        for service in self.services.values():
            service.store.writer = self.writer

    async def _stop_writer(self) -> None:
        writer = self.writer
        assert writer is not None
        try:
            async with asyncio.timeout(WRITER_STOP):
                await writer.drain()
        except TimeoutError:
            pass
        finally:
            # Only once the thread has ended may the loop write the same files itself.
            if writer.stop(WRITER_STOP if writer.done == writer.submitted else 0.0):
                self.log.writer = None
                for service in self.services.values():
                    service.store.writer = None
                self.writer = None

    def _writer_failed(self, error: BaseException) -> None:
        """A job that raised (a bug): the thread itself goes on with the next one."""
        text, where = describe(error)
        self.own_log.write("driver.crashed", {"driver": "writer", "error": text, "at": where,
                                              "restart_in": 0})

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._add_signal_handlers(loop)
        self._start_systemd_drivers()
        # A stop that came while an app was being claimed waits in its inbox (Service.prepare).
        self.stopping = any(taken.stop_signals for taken in self.claims.values())
        try:
            await self._prepare_all()
        except BaseException:
            self._remove_signal_handlers(loop)
            await self.drivers.close()
            raise
        for name, service in self.services.items():
            self.tasks[name] = loop.create_task(service.serve())
        self.running = True
        if self.fleet is not None:
            self._start_fleet()
        try:
            while self.tasks:
                done, _ = await asyncio.wait(list(self.tasks.values()),
                                             return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in self.tasks.items() if t in done]:
                    self._ended(name)
        finally:
            if self.trigger is not None:
                self.trigger.close()
            self._remove_signal_handlers(loop)
            await self.drivers.close()  # the watchdog last: a slow shutdown is still alive
            if self.fleet is not None:
                await self.fleet.close()  # the lease revoked: our records and slots go now
        self.own_log.write("supervisor.stopped", {"pid": os.getpid()})
        return 0

    async def _prepare_all(self) -> None:
        """Every app gets ready (its repository, its state); one that cannot is reported and
        set aside. Only a supervisor with no app left to run fails to start."""
        for app in self.config.broken:
            self.own_log.write("app.config_failed", {"app_name": app.name, "config": app.path,
                                                     "problems": list(app.problems)})
        for name, service in list(self.services.items()):
            try:
                await service.prepare()
            except StartupError as error:
                if not self.config.main:
                    raise
                self.own_log.write("app.start_failed", {"app_name": name, "error": str(error)})
                service.release()
                self._leave_fleet(service)
                del self.services[name]
        if not self.services:
            raise StartupError("no app could start (see the log)")
        if self.config.main and self.config.trigger is not None:
            await self._start_trigger()

    async def _start_trigger(self) -> None:
        """The webhook of a main file: a push wakes the apps whose remote it names (each
        fetches its own branch and deploys only if it moved), or every app when it names none
        of theirs. A single app's webhook is its Service's, as always."""
        assert self.config.trigger is not None
        for service in self.services.values():
            service.remote_address = await service.repo.remote_url()
        self.trigger = await start_trigger(self.config.trigger, self._on_push, self.own_log.write)

    def _on_push(self) -> None:
        from supervisor.drivers.trigger import names_repository

        named = self.trigger.last_repositories
        services = list(self.services.values())
        chosen = [s for s in services if s.remote_address and named
                  and names_repository(named, s.remote_address)]
        self.own_log.write("trigger.routed", {
            "repositories": list(named), "apps": [s.config.app.name for s in chosen or services],
            "matched": bool(chosen)})
        for service in chosen or services:
            service.check()

    def _ended(self, name: str) -> None:
        task = self.tasks.pop(name)
        service = self.services.pop(name, None)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self.own_log.write("app.crashed", {"app_name": name, "error": repr(error)})
        if service is not None and (name in self.removing or error is not None):
            self._leave_fleet(service)
        if service is not None and name in self.removing:
            self.removing.discard(name)
            self.own_log.write("app.removed", {"app_name": name})
        self.changed()

    def _leave_fleet(self, service: Service) -> None:
        if self.fleet is not None and service.fleet is not None:
            self.fleet.leave(service.fleet)

    # -----------------------------------------------------------------------------------------
    # Signals: each becomes an event for every app (SIGHUP: a reload of the config)

    def _add_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        # Through SignalRoutes: a flood of one signal can neither lose another one (a SIGTERM
        # after 10 s of SIGUSR1 once went unhandled) nor fill stderr with warnings.
        self.signals = SignalRoutes(loop, {
            signal.SIGTERM: lambda: self.stop("SIGTERM"),
            signal.SIGINT: lambda: self.stop("SIGINT"),
            signal.SIGUSR1: lambda: self._each(lambda s: s.check()),
            signal.SIGUSR2: lambda: self._each(lambda s: s.take_requests()),
            signal.SIGHUP: lambda: self.reload() and None})

    def _remove_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.signals is not None:
            self.signals.close()

    def _each(self, act: Callable[[Service], None]) -> None:
        for service in list(self.services.values()):
            act(service)

    def stop(self, signal_name: str = "SIGTERM") -> None:
        """Every app stops; systemd hears STOPPING=1 once the first has decided to (changed)."""
        self.stopping = True
        self._each(lambda s: s.inbox.put_nowait(StopRequested(signal=signal_name)))

    def check_all(self) -> None:
        self._each(lambda s: s.inbox.put_nowait(CheckRequested()))

    # -----------------------------------------------------------------------------------------
    # Reload: the apps whose files appeared start, those whose files are gone stop, changed
    # ones apply their changes, and untouched ones are left alone

    def reload(self) -> list[str]:
        """SIGHUP or `supervisor reload`: the problems found (none: applied)."""
        from supervisor.core.hostconfig import load_host
        from supervisor.loop.footprint import forget_startup_modules

        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = load_host(self.config.path)
        except ConfigError as error:
            self.reload_problems = list(error.problems)
            self.own_log.write("config.reload_failed", {"problems": error.problems,
                                                        "config": self.config.path})
            new = None
        finally:
            forget_startup_modules()
        if new is not None:
            self.reload_problems = []
            if new.fleet != self.config.fleet and self.fleet is not None:
                # The agent's connection and name are the box's identity in its groups.
                self.own_log.write("fleet.reload_not_applied", {
                    "reason": "the main file's [fleet] changed: restart the supervisor"})
                new = replace(new, fleet=self.config.fleet)
            self._reconcile(new)
        if self.notifier is not None:
            self.notifier.ready()
        self.changed()
        broken = [f"{b.path}: {p}" for b in (new.broken if new else ()) for p in b.problems]
        return self.reload_problems + broken

    def _reconcile(self, new: HostConfig) -> None:
        if not new.main:  # a single app: its changes, as always
            (app,) = new.apps
            service = next(iter(self.services.values()), None)
            if service is not None:
                service.reload(app)
            return
        wanted = {app.app.name: app for app in new.apps}
        for app in new.broken:
            self.own_log.write("config.reload_failed", {"app_name": app.name, "config": app.path,
                                                        "problems": list(app.problems)})
        broken = {app.name for app in new.broken}
        for name, service in list(self.services.items()):
            if name not in wanted and name not in broken:
                self.own_log.write("app.removing", {"app_name": name})
                self.removing.add(name)
                service.inbox.put_nowait(StopRequested(signal="SIGHUP"))
            elif name in wanted and wanted[name] != service.config:
                service.reload(wanted[name])
        self.config = new
        for name, app in wanted.items():
            if name not in self.services:
                asyncio.get_running_loop().create_task(self._start_new(app))

    async def _start_new(self, app: Config) -> None:
        name = app.app.name
        if self.writer is not None:
            # An app of that name that just ended may have a write in flight to the state
            # file the claim below reads and writes.
            try:
                async with asyncio.timeout(WRITER_STOP):
                    await self.writer.drain()
            except TimeoutError:
                pass  # a disk that never answers: that write will not finish either
        try:
            taken = claim(app, os.environ, place_sockets=False)
        except StartupError as error:
            self.own_log.write("app.start_failed", {"app_name": name, "error": str(error)})
            return
        if self.stopping:  # a stop came while its lock was taken: it never starts
            taken.lock.release()
            return
        service = self._add(app, taken)
        try:
            await service.prepare()
        except StartupError as error:
            self.own_log.write("app.start_failed", {"app_name": name, "error": str(error)})
            service.release()
            self._leave_fleet(service)
            self.services.pop(name, None)
            return
        self.own_log.write("app.added", {"app_name": name, "config": app.path})
        self.tasks[name] = asyncio.get_running_loop().create_task(service.serve())
        if self.stopping:
            service.inbox.put_nowait(StopRequested(signal="SIGTERM"))

    # -----------------------------------------------------------------------------------------
    # systemd: READY=1 once every app has started its first child (or settled without one),
    # STATUS= a line for one app, a summary for many; the watchdog pings from the loop itself

    def _start_systemd_drivers(self) -> None:
        if self.notifier is None:
            return
        notifier = self.notifier
        if self.watchdog_interval:
            interval = self.watchdog_interval
            self.drivers.start("watchdog", lambda: watchdog_pings(notifier, interval),
                               restart=False)
        self.drivers.start("refresher", self._refresh_status)

    def changed(self) -> None:
        """An app's state changed: tell systemd, and let the refresher pick its pace."""
        if self.notifier is None:
            return
        if self.stopping and not self.stopping_sent:
            self.notifier.stopping()
            self.stopping_sent = True
        if not self.ready_sent and not self.stopping and self.services and all(
                s.settled for s in self.services.values()):
            self.notifier.ready()  # `systemctl start` may return
            self.ready_sent = True
        self.notifier.status(self.status_line(time.time()))
        phases = {name: s.state.phase for name, s in self.services.items()}
        if phases != self._phases:
            self._phases = phases
            self._wake.set()

    async def _refresh_status(self) -> None:
        """Keep the STATUS line true between changes: "next fetch in 4m" counts down, a drain
        counts its seconds, client counts come from the stats files (bounded reads)."""
        while True:
            draining = any(s.state.phase == Phase.DRAINING for s in self.services.values())
            self._wake.clear()
            try:
                async with asyncio.timeout(DRAIN_REFRESH if draining else STATUS_REFRESH):
                    await self._wake.wait()
            except TimeoutError:
                pass
            for service in list(self.services.values()):
                service.refresh_stats()
            if self.notifier is not None:
                self.notifier.status(self.status_line(time.time()))

    def status_line(self, now: float) -> str:
        if self.reload_problems:
            return f"reload failed: {self.reload_problems[0]}"
        services = list(self.services.values())
        if not self.config.main and len(services) == 1:
            return services[0].status.line(services[0].state, now)
        return summary_line(services, now)


def summary_line(services: list[Service], now: float) -> str:
    """"3 apps: 2 running, 1 draining: web n_clients=3": the phases counted, then what each
    app that is not simply running is doing."""
    counts: dict[str, int] = {}
    for service in services:
        counts[str(service.state.phase)] = counts.get(str(service.state.phase), 0) + 1
    word = "app" if len(services) == 1 else "apps"
    line = f"{len(services)} {word}: " + ", ".join(f"{n} {p}" for p, n in counts.items())
    busy = [f"{s.config.app.name} {s.status.line(s.state, now)}" for s in services
            if s.state.phase != Phase.RUNNING]
    return line + (": " + "; ".join(busy) if busy else "")
