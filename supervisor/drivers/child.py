"""The one child process: start it in its own group, report its exit at once, stop it with the
configured signal or SIGKILL, and kill what it started that escaped its group (we are their
subreaper). It also recognises a child left behind by a supervisor that was killed, by pid
*and* start time *and* boot, so it never signals a process it did not start.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from supervisor.core.config import AppConfig, SocketConfig
from supervisor.core.events import ChildExited, ChildStarted, ChildStartFailed, Event
from supervisor.drivers import orphans, proc
from supervisor.drivers.childlog import ChildPipes, Sink
from supervisor.drivers.procfs import boot_id, group_members, start_ticks, stat_fields
from supervisor.drivers.sockets import child_environment, passed_fds, wrap
from supervisor.drivers.statefile import ChildRecord, StateStore

TAIL_LINES = 10  # of the app's output, carried by child.exited: why a release failed
# The supervisor's own oom_score_adj, where it may lower it (root, CAP_SYS_RESOURCE): it is
# small, and without it nothing restarts the app the OOM killer took.
SUPERVISOR_OOM_SCORE_ADJ = -900

Report = Callable[[str, dict[str, object]], None]


class _Tail:
    """Passes the app's lines on to the sink and keeps the last few, for child.exited."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        self.lines.append(line[:500])
        self.sink(stream, pid, line, truncated)

    def close(self) -> None:
        pass  # the sink outlives every child


class Child:
    """Starts and stops the child; exits are posted as ChildExited events."""

    def __init__(self, config: AppConfig, store: StateStore, post: Callable[[Event], None],
                 stats_file: str | None, environ: Mapping[str, str] | None = None,
                 output: Sink | None = None, sockets: Sequence[SocketConfig] = (),
                 socket_fds: Sequence[int] | None = None) -> None:
        self.config, self.store, self.post = config, store, post
        self.sockets = tuple(sockets)  # handed to every generation at fds 3..
        # Where the supervisor holds them: at 3.. already, unless it runs other apps too.
        self.socket_fds = tuple(socket_fds) if socket_fds is not None \
            else passed_fds(len(self.sockets))
        self.stats_file = stats_file
        self.output = output  # None: the app writes to our own stdout and stderr
        self.environ = dict(os.environ if environ is None else environ)
        # Oldest first. Two only while an overlap runs the next generation beside this one.
        self.processes: dict[int, proc.Process] = {}
        self.owners: dict[int, orphans.Owner] = {}
        self.report: Report | None = None  # the event log, once the service has one
        self.refused: set[int] = set()  # app.oom_score_adj values refused us, said once each
        self.protection_refused = False  # the supervisor's own -900, said once
        self.sweeps: set[asyncio.Task[None]] = set()
        orphans.become_subreaper()

    @property
    def process(self) -> proc.Process | None:
        """The newest generation."""
        return next(reversed(self.processes.values()), None)

    def start(self, commit: str | None, cwd: str | None = None,
              extra_env: Mapping[str, str] | None = None) -> Event:
        """`cwd` replaces app.cwd (release mode runs the app from `current`); `extra_env` is
        what the supervisor itself gives the app (its NOTIFY_SOCKET)."""
        if len(self.processes) >= 2:
            # Rules 1 and 7 of the machine make this unreachable; refusing keeps it true.
            return ChildStartFailed(error=f"refused: children {sorted(self.processes)} "
                                          "are still running")
        if self.stats_file is not None and not self.processes:
            # Numbers written by a previous process must never count for this one. (In an
            # overlap the previous generation still writes them; see _on_exit.)
            try:
                _unlink_if_any(self.stats_file)
            except OSError as error:
                return ChildStartFailed(error=f"cannot remove stats file: {error.strerror}")
        command, env = self._command_and_env(commit, extra_env)
        spawned = self._spawn(command, cwd or self.config.cwd, env)
        if isinstance(spawned, ChildStartFailed):
            return spawned
        process, pipes, tail = spawned
        if pipes is not None:
            pipes.started(process.pid)
        self.processes[process.pid] = process
        self._remember(process.pid, commit)
        process.exited.add_done_callback(
            lambda future: self._on_exit(process, pipes, tail, future))
        return ChildStarted(pid=process.pid, commit=commit)

    def _command_and_env(self, commit: str | None, extra_env: Mapping[str, str] | None
                         ) -> tuple[tuple[str, ...], dict[str, str]]:
        env = {**self.environ, **self.config.env, **(extra_env or {})}
        if commit:
            env["SUPERVISOR_COMMIT"] = commit
        command = self.config.command
        if self.sockets:
            env.update(child_environment(self.sockets))
            command = wrap(command)
        return command, env

    def _spawn(self, command: tuple[str, ...], cwd: str, env: dict[str, str]
               ) -> tuple[proc.Process, ChildPipes | None, _Tail | None] | ChildStartFailed:
        pipes = tail = None
        try:
            tail = _Tail(self.output) if self.output is not None else None
            pipes = (ChildPipes(tail, limit=self.output.limit)  # type: ignore[union-attr]
                     if tail is not None else None)
            stdout, stderr = pipes.fds_for_child() if pipes else (None, None)
            process = proc.spawn(command, cwd=cwd, env=env, stdout=stdout,
                                 stderr=stderr, pass_fds=self.socket_fds)
        except OSError as error:
            if pipes is not None:
                pipes.close()
            return ChildStartFailed(error=f"{self.config.command[0]}: {error.strerror or error}")
        return process, pipes, tail

    def _remember(self, pid: int, commit: str | None) -> None:
        """Owner of what the child starts, and the record that lets a restarted supervisor
        recognise it; a child already gone has no start time, so nothing to recognise."""
        ticks = start_ticks(pid)
        if ticks is None:
            return
        owner = orphans.Owner(pid, ticks, self._set_oom_score_adj(pid))
        self.owners[pid] = owner
        orphans.started(owner)
        older = self.store.current.child if len(self.processes) > 1 else None
        self.store.save(child=ChildRecord(pid, ticks, boot_id(), commit), old_child=older)

    def _on_exit(self, process: proc.Process, pipes: ChildPipes | None, tail: _Tail | None,
                 future: asyncio.Future[int]) -> None:
        if pipes is not None:
            pipes.close()  # its last lines belong before the child.exited line
        self._forget(process.pid)
        exit_code, signal_name = proc.describe_returncode(future.result())
        exited = ChildExited(pid=process.pid, exit_code=exit_code, signal=signal_name,
                             tail="\n".join(tail.lines) if tail is not None else "")
        owner = self.owners.pop(process.pid, None)
        found = orphans.ended(owner) if owner is not None else []
        if not found:
            self.post(exited)
            return
        # What the generation started is gone before anyone hears that it ended: the next one
        # must not meet a port or a lock still held by the last one's escaped daemon.
        pidfds = orphans.kill(found)
        escaped = [f for f in found if f.pgid != process.pid and f.pid in pidfds]
        if escaped and self.report is not None:
            self.report("child.escaped_killed", {"pid": process.pid,
                                                 **orphans.describe(escaped)})
        sweep = asyncio.get_running_loop().create_task(self._post_when_gone(pidfds, exited))
        self.sweeps.add(sweep)
        sweep.add_done_callback(self.sweeps.discard)

    def _forget(self, pid: int) -> None:
        """The exited generation leaves the records, and its stats file if another runs on."""
        was_oldest = next(iter(self.processes), None) == pid
        self.processes.pop(pid, None)
        records = self.store.current
        if records.child and records.child.pid == pid:
            # A failed overlap: the older generation, still running, is the one to recognise.
            self.store.save(child=records.old_child, old_child=None)
        elif records.old_child and records.old_child.pid == pid:
            self.store.save(old_child=None)
        if was_oldest and self.processes and self.stats_file is not None:
            # The previous generation is gone after an overlap: what it wrote last must not
            # count for the one that replaced it, which rewrites the file at its next change.
            try:
                os.unlink(self.stats_file)
            except OSError:
                pass

    async def _post_when_gone(self, pidfds: dict[int, int], exited: ChildExited) -> None:
        try:
            await orphans.gone(pidfds)
        finally:
            self.post(exited)

    def _set_oom_score_adj(self, pid: int) -> int | None:
        """app.oom_score_adj, written as soon as the app exists (an app forks its workers after
        it has started up, by then they inherit it); the supervisor protects itself first, so
        the app never keeps the supervisor's protection by mistake."""
        self._protect_supervisor()
        wanted = self.config.oom_score_adj
        error = _write_oom_score_adj(pid, wanted)
        if error and wanted not in self.refused and self.report is not None:
            self.refused.add(wanted)
            self.report("child.oom_score_adj_refused", {"pid": pid, "wanted": wanted,
                                                        "error": error})
        return orphans.oom_score_adj(pid)

    def _protect_supervisor(self) -> None:
        if self.protection_refused:
            return
        current = orphans.oom_score_adj(os.getpid())
        if current is not None and current <= SUPERVISOR_OOM_SCORE_ADJ:
            return
        error = _write_oom_score_adj(os.getpid(), SUPERVISOR_OOM_SCORE_ADJ)
        if error:
            self.protection_refused = True  # said once: lowering needs privilege
            if self.report is not None:
                self.report("supervisor.oom_protection_refused", {
                    "wanted": SUPERVISOR_OOM_SCORE_ADJ, "kept": current, "error": error})

    def signal(self, pid: int, sig: int) -> bool:
        process = self.processes.get(pid)
        if process is None:
            return False
        return process.signal_group(sig)

    def resident_bytes(self, pid: int) -> int | None:
        """What a generation holds in RAM: the resident set of its whole process group."""
        process = self.processes.get(pid)
        if process is None:
            return None
        ticks = start_ticks(pid) or 0
        total = 0
        page = os.sysconf("SC_PAGE_SIZE")
        for member in group_members(pid, ticks) or [pid]:
            try:
                with open(f"/proc/{member}/statm", "rb") as file:
                    total += int(file.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        return total

    def stop(self, pid: int) -> bool:
        return self.signal(pid, self.config.stop_signal)

    def kill(self, pid: int) -> bool:
        return self.signal(pid, signal.SIGKILL)


def _write_oom_score_adj(pid: int, value: int) -> str | None:
    """None once `pid` has `value`; else why not (lowering needs CAP_SYS_RESOURCE)."""
    if orphans.oom_score_adj(pid) == value:
        return None
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as file:
            file.write(str(value))
    except OSError as error:
        return error.strerror or str(error)
    return None


def _claim(record: ChildRecord) -> int | None:
    """A pidfd for the process `record` names, if it provably is that process (same boot, same
    start time, checked again with the pidfd held: from then on the pid cannot be reused)."""
    if record.boot_id != boot_id() or start_ticks(record.pid) != record.start_ticks:
        return None
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return None
    if start_ticks(record.pid) != record.start_ticks:
        os.close(pidfd)
        return None
    return pidfd


def _signal_group(record: ChildRecord, sig: int) -> None:
    for member in group_members(record.pid, record.start_ticks) or [record.pid]:
        _signal_verified(member, record.pid, record.start_ticks, sig)


def _report(report: Callable[[str, dict[str, object]], None], kind: str, found: bool,
            record: ChildRecord) -> None:
    if found:
        facts = {"pid": record.pid, "commit": record.commit}
        if kind == "build":
            report("build.stale_found", facts)
        else:
            report("child.stale_found", facts)
    elif kind == "build":
        report("build.stale_stopped", {"pid": record.pid})
    else:
        report("child.stale_stopped", {"pid": record.pid})


def stop_stale_child(record: ChildRecord, stop_signal: int, stop_timeout: float,
                     report: Callable[[str, dict[str, object]], None],
                     kind: str = "child") -> bool:
    """Stop a child (or a build: `kind`) a killed supervisor left running, if it provably is
    that process, with its whole group; True if there was one to stop. Synchronous, since it
    runs before any event loop exists: the app we left may hold the socket we are about to bind."""
    import select

    pidfd = _claim(record)
    if pidfd is None:
        return False
    try:
        _report(report, kind, True, record)
        for sig, grace in ((stop_signal, stop_timeout), (signal.SIGKILL, 5.0)):
            _signal_group(record, sig)
            if select.select([pidfd], [], [], grace)[0]:
                break
        for member in group_members(record.pid, record.start_ticks):
            _signal_verified(member, record.pid, record.start_ticks, signal.SIGKILL)
        _report(report, kind, False, record)
    finally:
        os.close(pidfd)
    return True


def _unlink_if_any(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _signal_verified(pid: int, pgid: int, not_before: int, sig: int) -> None:
    """Signal through a pidfd, after checking again that it is the process we mean."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return
    try:
        fields = stat_fields(pid)
        if fields and int(fields[2]) == pgid and int(fields[19]) >= not_before:
            signal.pidfd_send_signal(fd, sig)
    except (ProcessLookupError, OSError):
        pass
    finally:
        os.close(fd)
