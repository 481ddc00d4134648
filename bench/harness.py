"""What bench/run.py measures with: /proc readings, HTTP probes on 127.0.0.1, a git world per
system, and the three supervisors under test (ours, the seed's loop, supervisord).

Every process started here is tracked: it runs in a session we created, and it is stopped by pid
(checked against its start time, so a reused pid is never hit). Nothing is looked up or killed by
name. Standard library only; it runs with any python3.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXAMPLE_APP = REPO / "supervisor" / "example_app"
DEBIAN_PYTHON = "/usr/bin/python3"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}


class BenchError(Exception):
    """A step did not happen within its bound; the run reports it and moves on."""


# --- /proc ---------------------------------------------------------------------------------------

def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name; index 0 is the state (field 3)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


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

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


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


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


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
