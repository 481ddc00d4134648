"""What the benchmarks measure with: /proc readings, HTTP probes on 127.0.0.1, a git world per
system, the three supervisors of bench/run.py (ours, the seed's loop, supervisord), and for
bench/handoff.py and bench/releases.py one supervisor of this tree with its JSON log read live.

Every process started here is tracked: it runs in a session we created, and it is stopped by pid
(checked against its start time, so a reused pid is never hit). Nothing is looked up or killed by
name. Standard library and this tree's own /proc, port and timestamp helpers (the ones the
supervisor and the tests use); it runs with any python3 >= 3.11.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# One reader each of /proc, free ports and the log's timestamps, shared with the supervisor and
# the tests; re-exported for the benchmark scripts.
from supervisor.drivers.eventlog import parse_timestamp as parse_timestamp  # noqa: E402
from supervisor.drivers.procfs import start_ticks as start_ticks  # noqa: E402
from supervisor.drivers.procfs import stat_fields as stat_fields  # noqa: E402
from supervisor.drivers.sockets import free_port as free_port  # noqa: E402

EXAMPLE_APP = REPO / "supervisor" / "example_app"
DEBIAN_PYTHON = "/usr/bin/python3"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null"}


class BenchError(Exception):
    """A step did not happen within its bound; the run reports it and moves on."""


# --- /proc ---------------------------------------------------------------------------------------

def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """The median (min-max) of `values` times `scale`, as every results table writes it."""
    if not values:
        return "n/a"
    values = [v * scale for v in values]
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}\u2013{max(values):.{digits}f})"


def live_start_ticks(pid: int) -> int | None:
    """start_ticks of a live process; None for a zombie too: signalling it would do nothing."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else start_ticks(pid)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime, plus cutime + cstime (children already reaped) when `children`."""
    fields = stat_fields(pid)
    if fields is None:
        raise BenchError(f"process {pid} is gone")
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def cpu_precise(pid: int) -> float:
    """CPU seconds of the live threads, in nanoseconds (/proc/PID/task/*/schedstat), plus
    the reaped children's ticks: /proc/PID/stat counts in 10 ms ticks, too coarse for a process
    that is idle. Threads that already ended are not counted: use over spans with no thread exit.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    fields = stat_fields(pid)
    if fields is None:
        raise BenchError(f"process {pid} is gone")
    return total / 1e9 + (int(fields[13]) + int(fields[14])) / CLK_TCK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread's name and CPU seconds (schedstat, nanosecond precision)."""
    threads = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            base = f"/proc/{pid}/task/{task}"
            name = "main" if int(task) == pid else Path(f"{base}/comm").read_text().strip()
            threads[int(task)] = (name,
                                  int(Path(f"{base}/schedstat").read_text().split()[0]) / 1e9)
    return threads


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def memory_kb(pid: int) -> dict[str, int]:
    values = smaps_rollup(pid)
    return {"pss": values["Pss"], "rss": values["Rss"],
            "private": values["Private_Clean"] + values["Private_Dirty"],
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def all_processes() -> dict[int, list[str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                table[int(entry)] = fields
    return table


def descendants(root: int) -> list[int]:
    table = all_processes()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def in_session(sid: int) -> list[int]:
    return [pid for pid, fields in all_processes().items() if int(fields[3]) == sid]


def running_executable(path: str) -> list[int]:
    """Processes whose program is `path`: they share its pages, and so lower each other's PSS."""
    real = os.path.realpath(path)
    found = []
    for pid in all_processes():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == real:
                found.append(pid)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


# --- HTTP on 127.0.0.1 ---------------------------------------------------------------------------

def http_get(port: int, path: str = "/", timeout: float = 2.0) -> str | None:
    """The body of one GET with Connection: close, or None if nothing answered properly."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                         .encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        return None
    return body.decode(errors="replace")


def wait_http(port: int, timeout: float, expect: str | None = None,
              interval: float = 0.002) -> float:
    """Wall time of the first answer (containing `expect`, if given); BenchError at the bound."""
    deadline = time.monotonic() + timeout
    while True:
        body = http_get(port, timeout=1.0)
        if body is not None and (expect is None or expect in body):
            return time.time()
        if time.monotonic() > deadline:
            raise BenchError(f"port {port} did not answer {expect or ''} within {timeout}s")
        time.sleep(interval)


def answer(port: int, timeout: float = 1.0) -> str | None:
    """`GET /` of the example app, stripped ("hello from 2"), or None."""
    body = http_get(port, timeout=timeout)
    return None if body is None else body.strip()


def wait_answer(port: int, body: str, timeout: float) -> float:
    """Wall time at which `GET /` first answered exactly `body`; BenchError at the bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer(port) == body:
            return time.time()
        time.sleep(0.01)
    raise BenchError(f"GET / did not answer {body!r} within {timeout}s")


class HoldClient:
    """A client that stays connected for `seconds` (the app's /hold): n_clients >= 1 meanwhile.
    `done` is the wall time its answer arrived, just before the app writes n_clients="0"."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.done: float | None = None
        self.answer: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.answer = http_get(self.port, f"/hold?s={self.seconds}", timeout=self.seconds + 30)
        self.done = time.time()

    def join(self) -> float:
        self.thread.join(self.seconds + 35)
        if self.done is None or self.answer is None:
            raise BenchError("the held client got no answer")
        return self.done


def wait_file_value(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if text in path.read_text():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{path} never said {text}")
        time.sleep(0.005)


# --- output of a process, line by line with arrival times ----------------------------------------

@dataclass
class Line:
    at: float  # wall time the line arrived here
    text: str
    event: dict[str, object] | None  # the parsed JSON line, if it was one


class LogTail:
    """Reads a pipe in a thread; lines can be awaited by predicate, from an index on."""

    def __init__(self, pipe) -> None:
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            now = time.time()
            text = raw.decode(errors="replace").rstrip("\n")
            event = None
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(text)
            with self._cond:
                self.lines.append(Line(now, text, event))
                self._cond.notify_all()
        pipe.close()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait(self, match: Callable[[Line], bool], timeout: float, start: int = 0,
             what: str = "a log line") -> tuple[int, Line]:
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    if match(self.lines[index]):
                        return index, self.lines[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {what} within {timeout}s")
                self._cond.wait(left)

    def event(self, name: str, timeout: float, start: int = 0,
              where: Callable[[dict[str, object]], bool] | None = None) -> tuple[int, Line]:
        return self.wait(lambda line: line.event is not None and line.event.get("event") == name
                         and (where is None or where(line.event)), timeout, start, what=name)

    def text(self, needle: str, timeout: float, start: int = 0) -> tuple[int, Line]:
        return self.wait(lambda line: needle in line.text, timeout, start, what=repr(needle))

    def last(self, match: Callable[[Line], bool]) -> int | None:
        with self._cond:
            for index in range(len(self.lines) - 1, -1, -1):
                if match(self.lines[index]):
                    return index
        return None

    def since(self, start: int) -> list[Line]:
        with self._cond:
            return list(self.lines[start:])


# --- processes we start --------------------------------------------------------------------------

class Started:
    """A process started in a new session; stop() ends it and everything it started."""

    registry: list[Started] = []

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str], name: str,
                 stream: str = "stderr") -> None:
        """`stream` ("stderr" or "stdout") is read line by line into `log`; the other is
        discarded."""
        self.name = name
        pipe, null = subprocess.PIPE, subprocess.DEVNULL
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=null,
            stdout=pipe if stream == "stdout" else null,
            stderr=pipe if stream == "stderr" else null,
            start_new_session=True)
        self.pid = self.popen.pid
        self.ticks = start_ticks(self.pid)
        self.log = LogTail(self.popen.stdout if stream == "stdout" else self.popen.stderr)
        self.known: dict[int, int | None] = {}  # every descendant seen, with its start time
        Started.registry.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> list[int]:
        found = descendants(self.pid) if self.alive() else []
        for pid in found:
            self.known.setdefault(pid, start_ticks(pid))
        return found

    def app_pid(self, marker: str = "server.py") -> int:
        """The example app among our descendants (verified by ancestry, never by name alone)."""
        pids = [pid for pid in self.remember_descendants()
                if cmdline(pid)[1:2] == [marker]
                and Path(cmdline(pid)[0]).name.startswith("python")]
        if len(pids) != 1:
            raise BenchError(f"{self.name}: expected one app process, found {pids}")
        return pids[0]

    def kill_verified(self, pid: int, sig: int) -> None:
        """Signal a pid we saw among our own, only if it is still that process."""
        ticks = self.known.get(pid) if pid != self.pid else self.ticks
        if ticks is None or start_ticks(pid) != ticks:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def stop(self, polite: bool, grace: float = 15.0) -> None:
        """SIGTERM and wait (polite), then SIGKILL whatever is left of what we started."""
        self.remember_descendants()
        for pid in in_session(self.pid):
            self.known.setdefault(pid, start_ticks(pid))
        if self.alive() and polite:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)
        for _ in range(3):
            leftovers = [pid for pid, ticks in self.known.items()
                         if ticks is not None and start_ticks(pid) == ticks]
            leftovers += [pid for pid in in_session(self.pid) if pid not in self.known]
            if not leftovers:
                break
            for pid in leftovers:
                self.known.setdefault(pid, start_ticks(pid))
                self.kill_verified(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self in Started.registry:
            Started.registry.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for started in list(cls.registry):
            with contextlib.suppress(Exception):
                started.stop(polite=False)


# --- the world: a bare remote, a clone to push from, a clone to deploy ------------------------

MAKEFILE = """\
# The app's build, the same for every system: compile the server, as a real build would.
all: install

install:
\t{python} -m py_compile server.py

clean:
\trm -rf __pycache__
"""


def run(argv: list[str], cwd: Path, timeout: float = 60) -> str:
    """A short command (git, mostly): its output, or BenchError with what it said."""
    result = subprocess.run(argv, cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout.strip()


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd)


class World:
    """One system's git remote, developer clone and deploy clone of the example app."""

    def __init__(self, root: Path, stats_dir: Path, name: str) -> None:
        self.root = root / name
        self.root.mkdir()
        self.port = free_port()
        self.stats = stats_dir / f"{name}.stats"
        # The seed finds its server with `ps ax | grep NAME`: a name unique to this run keeps it
        # from ever matching a process that is not ours.
        self.proc_name = f"benchapp-{name}-{os.getpid()}-{random.randrange(16**6):06x}"
        self.version = 1
        git("init", "-q", "--bare", "-b", "main", "remote.git", cwd=self.root)
        self.dev = self.root / "dev"
        git("clone", "-q", str(self.root / "remote.git"), str(self.dev), cwd=self.root)
        shutil.copy(EXAMPLE_APP / "server.py", self.dev / "server.py")
        (self.dev / "VERSION").write_text("1\n")
        (self.dev / "Makefile").write_text(MAKEFILE.format(python=DEBIAN_PYTHON))
        # The seed's wrapper script: the name on the command line is what its grep finds.
        (self.dev / "server.sh").write_text(
            f"#!/bin/bash\n{DEBIAN_PYTHON} server.py {self.proc_name}\n")
        (self.dev / ".gitignore").write_text("__pycache__/\n")
        git("add", "-A", cwd=self.dev)
        git("commit", "-qm", "v1", cwd=self.dev)
        git("push", "-q", "origin", "main", cwd=self.dev)
        self.app = self.root / "app"
        git("clone", "-q", str(self.root / "remote.git"), str(self.app), cwd=self.root)

    def push_next_version(self) -> str:
        self.version += 1
        (self.dev / "VERSION").write_text(f"{self.version}\n")
        git("commit", "-qam", f"v{self.version}", cwd=self.dev)
        git("push", "-q", "origin", "main", cwd=self.dev)
        return f"hello from {self.version}"

    def app_env(self) -> dict[str, str]:
        return {**os.environ, "PORT": str(self.port), "STATS_FILE": str(self.stats)}


# --- the three systems ---------------------------------------------------------------------------

@dataclass
class System:
    """One supervisor under test, running one app in its world."""

    key: str
    world: World
    process: Started | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> LogTail:
        assert self.process is not None and self.process.log is not None
        return self.process.log

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_http(self.world.port, timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(polite=True)
            self.process = None


class Ours(System):
    def __init__(self, world: World, python: Path, reset_after: str = "1s",
                 poll_interval: str = "5m") -> None:
        super().__init__("ours", world)
        self.python = python
        self.config = world.root / "supervisor.toml"
        self.config.write_text(f"""\
[app]
name = "bench"
command = ["{DEBIAN_PYTHON}", "server.py"]
state_dir = "{world.root / 'state'}"
env = {{ PORT = "{world.port}", STATS_FILE = "{world.stats}" }}
stop_timeout = "5s"

[git]
repo = "{world.app}"
poll_interval = "{poll_interval}"

[build]
command = "make clean && make install"

[drain]
stats_file = "{world.stats}"
until = "n_clients == 0"

[restart]
reset_after = "{reset_after}"
""")

    def start(self) -> None:
        self.process = Started([str(self.python), "-m", "supervisor", "run", "-c",
                                str(self.config)], cwd=self.world.root,
                               env={**os.environ, **GIT_ENV}, name="ours")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.log.event("child.started", timeout)
        super().wait_ready(timeout)


class SeedLoop(System):
    def __init__(self, world: World, long_sleep: float, short_sleep: float) -> None:
        super().__init__("seed", world)
        self.long_sleep, self.short_sleep = long_sleep, short_sleep

    def start(self) -> None:
        env = {**os.environ, **GIT_ENV, "SEED_PROC": self.world.proc_name,
               "SEED_STATS": str(self.world.stats), "SEED_SOURCE": str(self.world.app),
               "SEED_LONG_SLEEP": f"{self.long_sleep:g}",
               "SEED_SHORT_SLEEP": f"{self.short_sleep:g}",
               "PORT": str(self.world.port), "STATS_FILE": str(self.world.stats)}
        self.process = Started(["bash", str(BENCH / "seed_loop.sh")], cwd=self.world.app,
                               env=env, name="seed")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.log.text("Nothing to do, sleeping", timeout)
        super().wait_ready(timeout)

    def stop(self) -> None:
        # The loop has no stop of its own: killing it is what its users do. Then its server.
        if self.process is not None:
            self.process.stop(polite=False)
            self.process = None

    def sleeps(self, start: int = 0) -> list[tuple[float, float, str]]:
        """(begin, end, kind) of every sleep the loop entered, from its log lines."""
        found = []
        for line in self.log.since(start):
            if "Nothing to do, sleeping" in line.text:
                found.append((line.at, line.at + self.long_sleep, "long"))
            elif ("Failed build detected, quick reboot" in line.text
                  or "Waiting to rebuild and reboot server" in line.text):
                found.append((line.at, line.at + self.short_sleep, "short"))
        return found


class Supervisord(System):
    def __init__(self, world: World, venv: Path) -> None:
        super().__init__("supervisord", world)
        self.venv = venv
        self.config = world.root / "supervisord.conf"
        self.config.write_text(f"""\
[supervisord]
nodaemon=true
logfile={world.root / 'supervisord.log'}
pidfile={world.root / 'supervisord.pid'}
childlogdir={world.root}

[program:app]
command={DEBIAN_PYTHON} server.py
directory={world.app}
environment=PORT="{world.port}",STATS_FILE="{world.stats}"
autorestart=true
startsecs=1
stopasgroup=true
killasgroup=true
""")

    def start(self) -> None:
        self.process = Started([str(self.venv / "bin" / "supervisord"), "-n", "-c",
                                str(self.config)], cwd=self.world.root, env=dict(os.environ),
                               name="supervisord")


# --- one supervisor of this tree, for bench/handoff.py and bench/releases.py ---------------------

STEP_WAIT = 40.0  # the bound on one step of a deploy; a passing run never comes near it
BUILD_SCRIPT = 'test -s VERSION && echo "built version $(cat VERSION)"\n'


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def watchdog(minutes: float) -> Iterator[None]:
    """SIGTERM, and running over `minutes`, raise KeyboardInterrupt in the main thread, so the
    run stops what it started on the way out instead of leaving it behind."""
    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    timer = threading.Timer(minutes * 60, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def cpu_model(unknown: str = "unknown CPU") -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return unknown


def machine() -> str:
    """The CPU, cores, memory and kernel, for a report's "Machine:" line."""
    cpu = cpu_model()
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f", {kib / 1024 / 1024:.1f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores{memory}; Linux {platform.release()}"


class Owned:
    """Every process we started or that the supervisor started for us: pid and start time, so
    that a signal never reaches a reused pid."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: dict[int, int] = {}

    def adopt(self, pid: int) -> None:
        ticks = live_start_ticks(pid)
        if ticks is not None:
            with self.lock:
                self.pids[pid] = ticks

    def signal(self, pid: int, sig: int, group: bool = False) -> bool:
        """`group`: the process group it leads, if it leads one (the app, a supervisor)."""
        with self.lock:
            ticks = self.pids.get(pid)
        if ticks is None or live_start_ticks(pid) != ticks:
            return False
        with contextlib.suppress(ProcessLookupError):
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
            return True
        return False

    def kill_leftovers(self) -> list[int]:
        killed = [pid for pid in list(self.pids) if self.signal(pid, signal.SIGKILL, True)]
        with self.lock:
            self.pids.clear()
        return killed


class Supervisor:
    """`python -m supervisor run -c CONFIG` from this tree, its JSON log (stderr) read line by
    line; each record gets `_i` (its index), `_t` (when it arrived here) and `_ts` (its own
    `ts`), both wall clock, seconds since the epoch."""

    def __init__(self, config: Path, cwd: Path, owned: Owned,
                 python: str = sys.executable) -> None:
        self.owned = owned
        self.records: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [python, "-m", "supervisor", "run", "-c", str(config)], cwd=cwd,
            env={**os.environ, **GIT_ENV, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        owned.adopt(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            record = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
            if not isinstance(record, dict) or "event" not in record:
                continue
            record["_t"] = time.time()
            record["_ts"] = parse_timestamp(record.get("ts"))
            if record["event"] in ("child.started", "child.stale_found"):
                self.owned.adopt(record["pid"])
            with self.cond:
                record["_i"] = len(self.records)
                self.records.append(record)
                self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.records)

    def wait_for(self, event: str, timeout: float = STEP_WAIT, after: int = 0,
                 where: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for record in self.records[after:]:
                    if record["event"] == event and where(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(json.dumps({k: v for k, v in r.items() if k[0] != "_"})
                                     for r in self.records[-8:])
                    raise BenchError(f"no {event} within {timeout}s\n{tail}")
                self.cond.wait(left)

    def first(self, after: int, where: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self.cond:
            return next((r for r in self.records[after:] if where(r)), None)

    def phases(self, start: int, end: int) -> tuple[str, ...]:
        """The phases records[start..end] went through, from their before/after."""
        path: list[str] = []
        with self.cond:
            for record in self.records[start:end + 1]:
                for phase in (record.get("before"), record.get("after")):
                    if isinstance(phase, str) and (not path or path[-1] != phase):
                        path.append(phase)
        return tuple(path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.owned.signal(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.owned.signal(self.proc.pid, signal.SIGKILL, True)
                self.proc.wait(5)


class DeployWorld:
    """A bare remote, a dev clone that commits the example app and pushes, the clone the
    supervisor deploys from, a stats file path and a port, in `tmp`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.remote = tmp, tmp / "remote.git"
        self.dev, self.app = tmp / "dev", tmp / "app"
        self.stats = tmp / "run" / "stats"
        self.stats.parent.mkdir()
        self.port = free_port()
        self.version = 1
        run(["git", "init", "-q", "--bare", "-b", "main", str(self.remote)], tmp)
        run(["git", "init", "-q", "-b", "main", str(self.dev)], tmp)
        shutil.copy(EXAMPLE_APP / "server.py", self.dev / "server.py")
        (self.dev / "VERSION").write_text("1\n")
        (self.dev / "build.sh").write_text(BUILD_SCRIPT)
        self.first = self.commit({}, "release 1")
        run(["git", "remote", "add", "origin", str(self.remote)], self.dev)
        run(["git", "push", "-q", "-u", "origin", "main"], self.dev)
        run(["git", "clone", "-q", str(self.remote), str(self.app)], tmp)

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Write (or, for None, remove) files in the dev clone and commit them all."""
        for name, text in files.items():
            if text is None:
                (self.dev / name).unlink(missing_ok=True)
            else:
                (self.dev / name).write_text(text)
        run(["git", "add", "-A"], self.dev)
        run(["git", "commit", "-q", "-m", message], self.dev)
        return run(["git", "rev-parse", "HEAD"], self.dev)

    def release(self, extra: dict[str, str | None] | None = None) -> tuple[str, str]:
        """Commit a new VERSION (and `extra`); returns (version, commit). Not pushed yet."""
        self.version += 1
        version = str(self.version)
        commit = self.commit({**(extra or {}), "VERSION": version + "\n"}, f"release {version}")
        return version, commit

    def push(self, sup: Supervisor) -> float:
        """Push, then ask the supervisor to fetch now (its poll_interval is long); returns when
        it was asked (wall clock)."""
        run(["git", "push", "-q", "origin", "main"], self.dev)
        asked = time.time()
        sup.owned.signal(sup.proc.pid, signal.SIGUSR1)
        return asked


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def write_config(path: Path, sections: list[tuple[str, dict[str, Any]]]) -> Path:
    """`sections` as (header, values), e.g. ("[app]", {...}) or ("[[socket]]", {...})."""
    lines = []
    for header, values in sections:
        lines.append(header)
        lines += [f"{key} = {toml(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_benchmark(names: tuple[str, ...], chosen: str, args: Any,
                  measure: Callable[[str, Any, Owned], Any],
                  report: Callable[[list[Any], Any, float], str]) -> int:
    """`measure(name, args, owned)` for each of `names` that the comma-separated `chosen`
    lists, in order, under a watchdog of `args.max_minutes`; then the report, written to
    `args.output` and printed. Exit 1 when a part failed, 130 when interrupted; what was
    started is stopped either way."""
    owned = Owned()
    began = time.monotonic()
    wanted = {name.strip() for name in chosen.split(",") if name.strip()}
    results = []
    try:
        with watchdog(args.max_minutes):
            for name in names:
                if name in wanted:
                    results.append(measure(name, args, owned))
    except KeyboardInterrupt as stop:
        log(f"interrupted ({stop or 'SIGINT'}); stopping what was started")
        return 130
    finally:
        owned.kill_leftovers()
    text = report(results, args, time.monotonic() - began)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 1 if any(result.error for result in results) else 0
