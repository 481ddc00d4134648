"""Shared fixtures for the end-to-end tests: real git repositories, a real supervisor subprocess
whose JSON event log is read line by line, real HTTP clients against the example app.

Every wait is bounded and waits on something observable (a log record, an HTTP answer, a file's
content, a process's exit); a timeout fails with the tail of the supervisor's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.drivers.eventlog import parse_timestamp
from supervisor.drivers.procfs import boot_id, start_ticks, stat_fields
from supervisor.drivers.sockets import free_port
from tests.processes import HangingServer

EXAMPLE_APP = Path(__file__).resolve().parent.parent / "supervisor" / "example_app"
PROJECT_ROOT = EXAMPLE_APP.parent.parent

# No global or system git config may leak in, for the test's git and the supervisor's alike.
BASE_ENV = {
    **{k: v for k, v in os.environ.items()
       if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_ASKPASS", "SSH_ASKPASS")},
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "PYTHONPATH": str(PROJECT_ROOT),
}
GIT_ENV = {
    **BASE_ENV,
    "GIT_AUTHOR_NAME": "Dev",
    "GIT_AUTHOR_EMAIL": "dev@example.invalid",
    "GIT_COMMITTER_NAME": "Dev",
    "GIT_COMMITTER_EMAIL": "dev@example.invalid",
}

BUILD_SCRIPT = 'test -s VERSION && echo "built version $(cat VERSION)"\n'
DEFAULT_WAIT = 15.0  # generous: a loaded 2-core machine; a passing test never waits this long


# ---------------------------------------------------------------------------------------------
# Test lanes. `pytest` runs everything (the README's and CI's command); `pytest -m "not slow"` is
# the edit-test loop: the pure core, its property tests and the unit tests (under 30 s on 2 quiet
# cores). A file is slow when its tests wait on real time: a supervisor or the demo run end to
# end, the soak, the fuzzers, watchers and timers (stats, sd_notify watchdog, the viewer's
# follow), rate limits, floods of signals or output, or git and process groups at their
# timeouts. Marked here, by file.

SLOW_FILES = frozenset({
    "test_demo.py", "test_fuzz_short.py", "test_gitrepo.py", "test_proc.py", "test_replay.py",
    "test_sdnotify.py", "test_soak_short.py", "test_statsfile.py", "test_trigger.py",
    "test_viewer.py", "test_docs_quickstart.py", "test_docs_init.py", "test_docs_rough_edges.py",
    "test_etcd.py", "test_fleet_agent.py", "test_fleet_review.py",  # real etcd members
    # Real supervisors, floods and git cut short at its timeout: together 35 s of the quick
    # lane's 75 s on quiet cores.
    "test_output_flood.py", "test_log_pressure.py", "test_signals.py",
    "test_gitrepo_interrupted.py", "test_state_dir_lock.py",
})


def _slow(item: pytest.Item) -> bool:
    return item.path.name.startswith("test_e2e_") or item.path.name in SLOW_FILES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks by file, so that a new test lands in its file's lane without anyone remembering a
    mark. Orders slow files first (the soak, whose four runs take longest, before them), each
    file's tests in their own order: with `-n 2 --dist loadfile --no-loadscope-reorder` a
    worker takes the next file when it is free, so the long files start early and the many
    quick ones even out the end (xdist's own order, most tests first, left a worker alone on
    the e2e files at the end). Serial runs take as long in any order."""
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: 0 if item.path.name == "test_soak_short.py"
               else 1 if _slow(item) else 2)


# ---------------------------------------------------------------------------------------------
# Small facts about processes, sockets and time


def alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie counts as dead: it can serve nothing)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the listening TCP socket on 127.0.0.1:`port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                return True
    return False


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               on_timeout: Callable[[], str] = lambda: "") -> Any:
    """Re-check `condition` until it is truthy; for conditions nothing notifies us about
    (an HTTP answer, a file's content, a process gone that is not our child)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")
        time.sleep(0.02)


def environ_of(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with (what it inherited), from /proc."""
    with open(f"/proc/{pid}/environ", "rb") as file:
        items = file.read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def has_action(record: dict[str, Any], name: str) -> bool:
    return any(a.get("action") == name for a in record.get("actions") or ())


def action(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in record.get("actions") or () if a.get("action") == name)


# ---------------------------------------------------------------------------------------------
# The supervisor under test


class Supervisor:
    """`python -m supervisor run -c CONFIG` with its JSON event log read in a thread.

    Records are dicts as logged plus `_i` (their index) and `_t` (when the test saw them).
    """

    def __init__(self, config: Path, cwd: Path, owned: ChildRegistry,
                 env: dict[str, str] | None = None, log_file: Path | None = None) -> None:
        """`env` is added to the supervisor's environment; `log_file` names the config's
        log.file, which is then followed (across rotation) instead of stderr."""
        self.config = config
        self.owned = owned
        self.log_file = log_file
        self.records: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._stdout = open(cwd / f"supervisor-{time.monotonic_ns()}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "-c", str(config)],
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.PIPE,
            start_new_session=True, env={**BASE_ENV, **(env or {})},
        )
        self.pid = self.proc.pid
        self.polls_every_second = _polls_every_second(config)
        self._reader = threading.Thread(target=self._read, name=f"log-{self.pid}", daemon=True)
        self._reader.start()

    def _take(self, line: str) -> None:
        record = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
        with self._cond:
            self.lines.append(line)
            if isinstance(record, dict) and "event" in record:
                record["_i"], record["_t"] = len(self.records), time.time()
                self.records.append(record)
                if record["event"] in ("child.started", "child.stale_found"):
                    self.owned.adopt(record["pid"])
            self._cond.notify_all()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        if self.log_file is not None:
            follower = threading.Thread(target=self._follow, name=f"file-{self.pid}",
                                        daemon=True)
            follower.start()
        for raw in self.proc.stderr:
            self._take(raw.decode("utf-8", errors="replace").rstrip("\n"))
        if self.log_file is not None:
            follower.join()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _follow(self) -> None:
        """Read log.file as it grows, like `tail -F`: a file renamed away (rotated) is read
        to its end before the new one. Polled: nothing notifies a reader of a file's growth.
        Ends once the supervisor has exited and the file is read to its end."""
        assert self.log_file is not None
        path, file, partial = str(self.log_file), None, b""
        while True:
            exited = self.proc.poll() is not None
            if file is None:
                with contextlib.suppress(FileNotFoundError):
                    file, partial = open(path, "rb"), b""  # noqa: SIM115
            if file is not None:
                partial = self._feed(file, partial)
                try:
                    rotated = os.stat(path).st_ino != os.fstat(file.fileno()).st_ino
                except FileNotFoundError:
                    rotated = True
                if rotated:
                    partial = self._feed(file, partial)
                    file.close()
                    file = None
                    continue
            if exited:
                break
            time.sleep(0.01)
        if file is not None:
            file.close()

    def _feed(self, file: Any, partial: bytes) -> bytes:
        *lines, partial = (partial + file.read()).split(b"\n")
        for raw in lines:
            self._take(raw.decode("utf-8", errors="replace"))
        return partial

    # -- looking at the log ---------------------------------------------------------------

    has_action = staticmethod(has_action)
    action = staticmethod(action)

    @staticmethod
    def seconds_between(first: dict[str, Any], second: dict[str, Any]) -> float:
        """Time between two records by the supervisor's own clock (millisecond stamps)."""
        return parse_timestamp(second["ts"]) - parse_timestamp(first["ts"])

    @staticmethod
    def _matches(record: dict[str, Any], event: str | None, where: Callable | None,
                 fields: dict[str, Any]) -> bool:
        if event is not None and record["event"] != event:
            return False
        for key, expected in fields.items():
            if key == "action":
                if not has_action(record, expected):
                    return False
            elif callable(expected):
                if not expected(record.get(key)):
                    return False
            elif record.get(key) != expected:
                return False
        return where is None or bool(where(record))

    @staticmethod
    def _start(after: dict[str, Any] | int | None) -> int:
        if after is None:
            return 0
        return after["_i"] + 1 if isinstance(after, dict) else after

    def select(self, event: str | None = None, *, after: dict[str, Any] | int | None = None,
               where: Callable[[dict[str, Any]], Any] | None = None,
               **fields: Any) -> list[dict[str, Any]]:
        """Records so far that match: `event` name, `after` a record or index, `where` a
        predicate, `field=value` (a callable value is a predicate on that field), and
        `action=NAME` for a transition whose actions include NAME."""
        with self._cond:
            records = self.records[self._start(after):]
        return [r for r in records if self._matches(r, event, where, fields)]

    def mark(self) -> int:
        """Index for `after=`: only records logged from now on."""
        with self._cond:
            return len(self.records)

    def wait_for(self, event: str | None = None, *, timeout: float = DEFAULT_WAIT,
                 after: dict[str, Any] | int | None = None,
                 where: Callable[[dict[str, Any]], Any] | None = None,
                 **fields: Any) -> dict[str, Any]:
        """The first record matching (as for `select`), waiting for it if need be."""
        deadline = time.monotonic() + timeout
        index = self._start(after)
        with self._cond:
            while True:
                for record in self.records[index:]:
                    if self._matches(record, event, where, fields):
                        return record
                index = len(self.records)
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        wanted = ", ".join([repr(event)] + [f"{k}={v!r}" for k, v in fields.items()])
        reason = ("the supervisor's log ended" if self._eof else f"timed out after {timeout}s")
        pytest.fail(f"{reason} waiting for {wanted}\n{self.tail()}")

    def tail(self, count: int = 60) -> str:
        with self._cond:
            lines = self.lines[-count:]
        return (f"--- last {len(lines)} lines of supervisor {self.pid} "
                f"(exit {self.proc.poll()}) ---\n" + "\n".join(lines))

    # -- driving it ----------------------------------------------------------------------

    def send(self, sig: int) -> None:
        assert self.proc.poll() is None, f"supervisor already exited\n{self.tail()}"
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = DEFAULT_WAIT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"supervisor did not exit within {timeout}s\n{self.tail()}")
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEFAULT_WAIT) -> int:
        self.send(sig)
        return self.wait_exit(timeout)

    def nudge(self) -> None:
        """`kill -USR1` (fetch now: the poll's own step, taken at once) if this supervisor
        polls every second and is between its start and its stop: the push a test just made is
        then seen at once instead of up to a poll interval later, about 0.5 s a push. Before
        its start line or after its stop line, SIGUSR1 could meet the default action and kill
        it; and a test that sets its own poll_interval counts on when the fetches come."""
        if not self.polls_every_second or self.proc.poll() is not None:
            return
        with self._cond:
            events = {record["event"] for record in self.records}
        if "supervisor.started" in events and not events & {"supervisor.stop_requested",
                                                              "supervisor.stopped"}:
            os.kill(self.pid, signal.SIGUSR1)

    def close(self) -> None:
        """Finalizer: a polite stop, then SIGKILL for its group; never fails."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._stdout.close()


def _polls_every_second(config: Path) -> bool:
    """Whether a single-app config polls at World's default, 1 s (see Supervisor.nudge)."""
    try:
        git = tomllib.loads(config.read_text()).get("git")
    except (OSError, ValueError):
        return False
    return isinstance(git, dict) and git.get("poll_interval") == "1s"


class ChildRegistry:
    """Children the supervisors reported (pid from the log), held by pidfd so that cleaning up
    can never signal a process that merely inherited a pid."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.pidfds: dict[int, int] = {}
        self.lock = threading.Lock()

    def adopt(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:
            ours = os.readlink(f"/proc/{pid}/cwd").startswith(self.root)
        except OSError:
            ours = False
        with self.lock:
            if not ours or pid in self.pidfds:
                os.close(fd)
                return
            self.pidfds[pid] = fd

    def kill_leftovers(self) -> list[int]:
        killed = []
        with self.lock:
            for pid, fd in self.pidfds.items():
                if not select.select([fd], [], [], 0)[0]:  # not exited: pid and group still its
                    killed.append(pid)
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
            self.pidfds.clear()
        return killed


# ---------------------------------------------------------------------------------------------
# Clients of the example app


class HeldRequest:
    """`GET /hold?s=SECONDS` in a thread: a client that stays connected, then gets its answer."""

    def __init__(self, port: int, seconds: float) -> None:
        self.url = f"http://127.0.0.1:{port}/hold?s={seconds}"
        self.body: str | None = None
        self.error: Exception | None = None
        self.answered_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=120) as response:
                self.body = response.read().decode()
            self.answered_at = time.time()
        except Exception as error:  # the child may be stopped under it (drain timeout)
            self.error = error

    def join(self, timeout: float = DEFAULT_WAIT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"held request {self.url} still running"


class IdleClient:
    """A TCP client that connected and has sent nothing yet: the example app counts it as
    connected (its handler is waiting for the request line) until `release()` closes it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def release(self) -> None:
        self.sock.close()


class BuildGate:
    """A FIFO that a build command reads one line from while it exists: `shut()` makes the next
    build wait for the test, `open()` lets it go on. Nothing polls, nothing sleeps."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, build: str = "sh build.sh") -> str:
        return f"{build} && if [ -p {self.path} ]; then read go < {self.path}; fi"

    def shut(self) -> None:
        os.mkfifo(self.path)

    def open(self, timeout: float = DEFAULT_WAIT) -> None:
        """Once the build reads the FIFO (it opens for writing only then), send it its line."""
        def writer() -> int | None:
            try:
                return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no build reads it yet
                return None

        fd = wait_until(writer, timeout, "the build to wait at its gate")
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        self.path.unlink()


# ---------------------------------------------------------------------------------------------
# One test's world: a bare remote, a developer clone, the supervisor's clone, a port.


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


class World:
    # Facts about processes, for tests (which do not import conftest by name).
    alive = staticmethod(alive)
    listens_on = staticmethod(listens_on)
    start_ticks = staticmethod(start_ticks)
    boot_id = staticmethod(boot_id)
    wait_until = staticmethod(wait_until)
    free_port = staticmethod(free_port)
    parse_ts = staticmethod(parse_timestamp)
    environ_of = staticmethod(environ_of)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.remote = tmp / "remote.git"
        self.dev = tmp / "dev"
        self.app = tmp / "app"
        self.run_dir = tmp / "run"
        self.stats = self.run_dir / "stats"
        self.state_dir = tmp / "state"
        self.port = free_port()
        self.children = ChildRegistry(tmp)
        self.supervisors: list[Supervisor] = []
        self.cleanups: list[Callable[[], None]] = []
        self.run_dir.mkdir()
        self.git(tmp, "init", "-q", "--bare", "-b", "main", str(self.remote))
        self.git(tmp, "init", "-q", "-b", "main", str(self.dev))
        for name in ("server.py", "VERSION"):
            shutil.copy(EXAMPLE_APP / name, self.dev / name)
        (self.dev / "build.sh").write_text(BUILD_SCRIPT)
        self.first = self.commit(message="first release")
        self.git(self.dev, "remote", "add", "origin", str(self.remote))
        self.git(self.dev, "push", "-q", "-u", "origin", "main")
        self.git(tmp, "clone", "-q", str(self.remote), str(self.app))

    # -- git -----------------------------------------------------------------------------

    @staticmethod
    def git(cwd: Path, *args: str) -> str:
        result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
        return result.stdout.strip()

    def commit(self, files: dict[str, str] | None = None, *, version: str | None = None,
               message: str = "change", amend: bool = False, repo: Path | None = None) -> str:
        """Write files (and VERSION) in a clone, commit everything; returns the commit."""
        repo = repo or self.dev
        files = dict(files or {})
        if version is not None:
            files["VERSION"] = version + "\n"
        for name, text in files.items():
            (repo / name).write_text(text)
        self.git(repo, "add", "-A")
        self.git(repo, "commit", "-q", "--allow-empty", "-m", message,
                 *(["--amend"] if amend else []))
        return self.head(repo)

    def push(self, *, force: bool = False, nudge: bool = True) -> None:
        """`nudge`: each running supervisor that polls every second fetches at once
        (Supervisor.nudge); False where the poll itself is what the test is about."""
        self.git(self.dev, "push", "-q", *(["--force"] if force else []), "origin", "main")
        if nudge:
            for supervisor in self.supervisors:
                supervisor.nudge()

    def release(self, version: str, *, nudge: bool = True, **kwargs: Any) -> str:
        """Commit a new VERSION in the dev clone and push it."""
        commit = self.commit(version=version, message=f"release {version}", **kwargs)
        self.push(force=kwargs.get("amend", False), nudge=nudge)
        return commit

    def head(self, repo: Path | None = None) -> str:
        return self.git(repo or self.app, "rev-parse", "HEAD")

    # -- the supervisor ------------------------------------------------------------------

    def config_sections(self) -> dict[str, dict[str, Any] | None]:
        return {
            "app": {
                "name": "example",
                "command": [sys.executable, "server.py"],
                "env": {"PORT": str(self.port), "STATS_FILE": str(self.stats)},
                "stop_timeout": "2s",
                "state_dir": str(self.state_dir),
            },
            "git": {"repo": str(self.app), "poll_interval": "1s", "timeout": "10s"},
            "build": {"command": "sh build.sh", "timeout": "10s"},
            "drain": {"stats_file": str(self.stats), "until": "n_clients == 0"},
            "restart": {"backoff_min": "100ms", "backoff_max": "1s"},
            "log": {"format": "json"},
        }

    def write_config(self, name: str = "supervisor.toml",
                     **overrides: dict[str, Any] | None) -> Path:
        """The default config with `section={key: value}` merged in; `section=None` drops it."""
        sections = self.config_sections()
        for section, values in overrides.items():
            if values is None:
                sections.pop(section, None)
            elif isinstance(values, list):
                sections[section] = values  # an array of tables, e.g. [[socket]]
            else:
                sections[section] = {**(sections.get(section) or {}), **values}
        lines = []
        for section, values in sections.items():
            if values is None:
                continue
            if isinstance(values, list):
                for table in values:
                    lines.append(f"[[{section}]]")
                    lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
                    lines.append("")
                continue
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
            lines.append("")
        path = self.tmp / name
        path.write_text("\n".join(lines))
        return path

    def start(self, config: Path | None = None, *, env: dict[str, str] | None = None,
              log_file: Path | None = None,
              **overrides: dict[str, Any] | None) -> Supervisor:
        """`env`: more environment for the supervisor; `log_file`: follow this log.file."""
        config = config or self.write_config(**overrides)
        supervisor = Supervisor(config, self.tmp, self.children, env=env, log_file=log_file)
        self.supervisors.append(supervisor)
        return supervisor

    def start_serving(self, *, env: dict[str, str] | None = None, log_file: Path | None = None,
                      **overrides: dict[str, Any] | None) -> tuple[Supervisor, int]:
        """Start a supervisor and wait until the example app answers; returns it and the pid."""
        supervisor = self.start(env=env, log_file=log_file, **overrides)
        started = supervisor.wait_for("child.started")
        self.wait_http("hello from 1", supervisor)
        return supervisor, started["pid"]

    def cli(self, *args: str, config: Path | None = None,
            timeout: float = DEFAULT_WAIT) -> subprocess.CompletedProcess[str]:
        """`python -m supervisor ARGS -c CONFIG` (the default config path unless given), as a
        user would run it from a shell; never raises on a non-zero exit."""
        config = config or self.tmp / "supervisor.toml"
        return subprocess.run([sys.executable, "-m", "supervisor", *args, "-c", str(config)],
                              cwd=self.tmp, env=BASE_ENV, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def build_gate(self) -> BuildGate:
        return BuildGate(self.tmp / "build.gate")

    def status_file(self) -> dict[str, Any] | None:
        """The supervisor's status file as it is now, or None (missing, or being replaced)."""
        try:
            data = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def wait_status(self, condition: Callable[[dict[str, Any]], Any], what: str,
                    supervisor: Supervisor | None = None,
                    timeout: float = DEFAULT_WAIT) -> dict[str, Any]:
        """Wait until the status file satisfies `condition`: it is written after the log line
        of the step that changed it, so seeing the line is not enough."""
        def check() -> dict[str, Any] | None:
            status = self.status_file()
            return status if status is not None and condition(status) else None

        return wait_until(check, timeout, f"status file: {what}",
                          lambda: f"status: {self.status_file()}\n"
                                  + (supervisor.tail() if supervisor else ""))

    # -- the app -------------------------------------------------------------------------

    def http(self, path: str = "/", timeout: float = 2.0) -> str | None:
        """The body of GET path, or None if nothing answers yet."""
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read().decode().strip()
        except (urllib.error.URLError, OSError):
            return None

    def wait_http(self, body: str, supervisor: Supervisor | None = None,
                  timeout: float = DEFAULT_WAIT) -> None:
        wait_until(lambda: self.http() == body, timeout, f"HTTP to answer {body!r}",
                   supervisor.tail if supervisor else lambda: "")

    def hold(self, seconds: float) -> HeldRequest:
        return HeldRequest(self.port, seconds)

    def idle_client(self) -> IdleClient:
        client = IdleClient(self.port)
        self.cleanups.append(client.release)
        return client

    def stats_text(self) -> str:
        try:
            return self.stats.read_text()
        except (OSError, UnicodeDecodeError):
            return ""

    def wait_stats(self, text: str, timeout: float = DEFAULT_WAIT) -> None:
        """Wait until the app's own stats file contains `text` (e.g. 'n_clients="1"')."""
        wait_until(lambda: text in self.stats_text(), timeout, f"stats file to contain {text!r}",
                   lambda: f"stats file: {self.stats_text()!r}")

    def write_stats(self, data: bytes | None = None, *, size: int | None = None) -> None:
        """Replace the stats file atomically, as a well-behaved writer would; `size` makes a
        sparse file of that many bytes."""
        temporary = self.run_dir / ".stats.test.tmp"
        with open(temporary, "wb") as file:
            if data is not None:
                file.write(data)
            if size is not None:
                file.truncate(size)
        os.replace(temporary, self.stats)

    def spawn_unrelated(self, *argv: str) -> subprocess.Popen[bytes]:
        """A process the supervisor did not start; cleaned up by the test."""
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

        def finish() -> None:
            process.kill()
            process.wait()

        self.cleanups.append(finish)
        return process

    def close(self) -> None:
        for supervisor in self.supervisors:
            supervisor.close()
        self.children.kill_leftovers()
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    server = HangingServer()
    try:
        yield server
    finally:
        server.close()


class FullDisk:
    """A real tmpfs of 64 KiB that a test fills up and frees again: writes there fail with
    ENOSPC, as on a full SD card."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filler = directory / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as file, contextlib.suppress(OSError):
            while True:
                file.write(b"x" * 4096)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[FullDisk]:
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield FullDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
