"""Chaos soak (issue 7): the example app under a real `supervisor run`, faults picked at random
from a seeded `random.Random`, and the supervisor's promises checked after every step.

    .venv/bin/python -m tests.soak.soak --seed 1234 --minutes 30     # the long run
    .venv/bin/python -m tests.soak.soak --seed 1234 --steps 40       # replay its first 40 steps
    .venv/bin/python -m tests.soak.soak --mode releases --overlap    # release mode, overlap

One world per run, in a temporary directory: a bare remote, a developer clone that pushes, the
clone the supervisor owns, and a small tmpfs holding `app.state_dir` and the event log (so that
it can be filled). The supervisor runs the example app with a build, a [drain] with a timeout and
a [[socket]]; with `--mode releases` also [deploy] mode = "releases" and a [health] gate, and with
`--overlap` restart.style = "overlap". Each step injects one fault (FAULTS below; add one with
`@fault(...)`), waits until the supervisor has converged, and audits what happened. docs/soak.md
says what is checked.

Every process started here runs in a session of its own and carries SOAK_TOKEN in its
environment, so the soak finds what the supervisor started without looking anything up by name,
and stops all of it on the way out, Ctrl-C and errors included. Standard library only, besides
the project's free_port, the log's timestamp reader and the tests' hanging remote (one of each,
shared with the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supervisor.drivers.eventlog import parse_timestamp
from supervisor.drivers.sockets import free_port
from tests.processes import HangingServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_APP = PROJECT_ROOT / "supervisor" / "example_app"

# The config under test. Short intervals keep a step to a second or two; each one has room
# on a busy 2-core machine.
POLL_INTERVAL = 1.0  # git.poll_interval (its floor)
GIT_TIMEOUT = 3.0  # git.timeout: what a hanging remote costs per fetch
DRAIN_TIMEOUT = 3.0  # drain.timeout
STOP_TIMEOUT = 2.0  # app.stop_timeout: a stopped (SIGSTOP) app is killed after this
START_DELAY = "0.2"  # the example app waits this long before it serves: a restart window
TMPFS_SIZE = "1m"  # holds app.state_dir and the event log; log.max_bytes * (keep + 1) = 512 KiB
LOG_MAX_BYTES = "128KiB"
LOG_KEEP = 3
# Release mode: deploy.keep, and the [health] gate. A release that exits at start fails its
# probation at once; one whose /up answers 503 (an UNHEALTHY file) only at HEALTH_TIMEOUT.
DEPLOY_KEEP = 2
HEALTH_TIMEOUT = 5.0
HEALTH_INTERVAL = 0.2
HELD_KEPT = 11  # failed commits the supervisor remembers: the last one and ten before it
RELEASE_NAME = re.compile(r"^[0-9a-f]{40}$")

SETTLE_BOUND = 30.0  # seconds a step may take to converge before it counts as a violation
FINAL_BOUND = 60.0  # the same after the last fault
FD_WINDOW = 3  # samples at each end of a supervisor's life, for the fd check
FD_SLACK = 2  # fds a supervisor may hold at its last quiet moment beyond its first
MEMORY_SLACK_KB = 2048  # PSS growth allowed between a supervisor's first and last quiet moment
MIN_SAMPLES = 4  # quiet moments a supervisor needs before its fds and memory are judged
SAMPLE_EVERY = 0.1  # seconds between two scans of /proc for the app's processes
ORPHAN_GRACE = 10.0  # what a killed supervisor's git or build may take to finish by itself
GIVE_UP_AFTER = 3  # steps in a row that do not converge end the run early

START_REASONS = {"startup", "deploy", "crash restart", "restart requested", "start requested",
                 "deploy failed; back on the last good build",
                 "deploy failed; starting the tree as it is", "rollback", "deploy (overlap)",
                 "restart requested (overlap)"}
DRAIN_MARKS = ("deploy.waiting_for_drain", "drain.satisfied", "drain.timed_out",
               "drain.child_exited")


class SoakError(Exception):
    """The harness itself cannot go on (a git command failed, the supervisor never started)."""


def now() -> float:
    return time.time()


def short(sha: str | None) -> str:
    return sha[:8] if sha else "-"


# ---------------------------------------------------------------------------------------------
# Facts from /proc
# Read here, on purpose, not through supervisor.drivers.procfs: the soak must not trust the code
# it checks to say which processes are alive, whose they are and when they started.


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name; [0] is the state, [1] the ppid,
    [2] the process group, [19] the start time in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """A live process (not a zombie), and the same one if `ticks` is given. PID 1 here does not
    reap orphans, so a killed orphan stays a zombie: dead for every purpose of the soak."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return ticks is None or int(fields[19]) == ticks


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    ticks: int
    argv: tuple[str, ...]

    @property
    def kind(self) -> str:
        if self.argv[1:4] == ("-m", "supervisor", "run"):
            return "supervisor"
        # The app, or the /bin/sh that sets LISTEN_PID and execs it (the same pid).
        if self.argv and self.argv[-1] == "server.py":
            return "app"
        return "other"

    def __str__(self) -> str:
        return f"{self.pid} [{self.state} pgid {self.pgid}] {shlex.join(self.argv)[:80]}"


def token_processes(marker: bytes) -> list[Proc]:
    """Live processes whose environment holds `marker` (b"\\0SOAK_TOKEN=...\\0"): everything a
    supervisor of this run started, and the supervisors themselves."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = b"\0" + file.read()
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = tuple(a.decode(errors="replace") for a in file.read().split(b"\0")[:-1])
        except OSError:
            continue
        if marker not in environ:
            continue
        fields = stat_fields(pid)
        if fields is None or fields[0] == "Z":
            continue
        found.append(Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]), argv))
    return found


def signal_verified(pid: int, ticks: int, sig: int) -> bool:
    """Signal through a pidfd, after checking the start time: never a reused pid."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if start_ticks(pid) != ticks:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def commit_of(pid: int) -> str | None:
    """SUPERVISOR_COMMIT from the environment app process `pid` was started with."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            for item in file.read().split(b"\0"):
                if item.startswith(b"SUPERVISOR_COMMIT="):
                    return item.partition(b"=")[2].decode()
    except OSError:
        pass
    return None


def open_fds(pid: int) -> list[str]:
    targets = []
    with contextlib.suppress(OSError):
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def memory_kb(pid: int) -> dict[str, int]:
    """Pss, Rss and Private (clean + dirty) of a process, in kB, from smaps_rollup."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss", "Private_Clean", "Private_Dirty"):
                values[key] = int(rest.split()[0])
    if values:
        values["Private"] = values.pop("Private_Clean", 0) + values.pop("Private_Dirty", 0)
    return values


# ---------------------------------------------------------------------------------------------
# Counting checks and violations


@dataclass
class Violation:
    step: int
    invariant: str
    detail: str


class Checker:
    """How many times each invariant was checked, and every violation; shared by threads."""

    def __init__(self) -> None:
        self.checks: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.violations: list[Violation] = []
        self.step = 0
        self.lock = threading.Lock()

    def check(self, invariant: str, ok: bool, detail: str | Callable[[], str] = "") -> bool:
        with self.lock:
            self.checks[invariant] += 1
            if not ok:
                text = detail() if callable(detail) else detail
                self.violations.append(Violation(self.step, invariant, text))
                with contextlib.suppress(OSError):  # stdout closed: the summary still counts
                    print(f"  VIOLATION [{invariant}] step {self.step}: {text}", flush=True)
        return ok

    def skip(self, invariant: str) -> None:
        with self.lock:
            self.skipped[invariant] += 1


# ---------------------------------------------------------------------------------------------
# The event log, followed as it grows and across rotation


class EventLogReader:
    """Follows `log.file` (and FILE.1.. it rotates into) in a thread, like `tail -F`; every line
    must be one JSON object with `ts` and `event` (invariant `log_json`). Records get `_i`, their
    index, and `_seen`, when the soak read them."""

    def __init__(self, path: Path, keep: int, checker: Checker) -> None:
        self.path, self.keep, self.checker = path, keep, checker
        self.records: list[dict[str, Any]] = []
        self.lines = 0
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="log-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    # -- reading --------------------------------------------------------------------------

    def _follow(self) -> None:
        file, partial = None, b""
        while True:
            stopping = self._stop.is_set()
            if file is None:
                with contextlib.suppress(FileNotFoundError):
                    file, partial = open(self.path, "rb"), b""  # noqa: SIM115
            if file is not None:
                partial = self._feed(file.read(), partial)
                try:
                    rotated = os.stat(self.path).st_ino != os.fstat(file.fileno()).st_ino
                except FileNotFoundError:
                    rotated = True
                if rotated:
                    partial = self._feed(file.read(), partial)
                    self._end_of_file(partial)
                    self._catch_up(os.fstat(file.fileno()).st_ino)
                    file.close()
                    file, partial = None, b""
                    continue
            if stopping:
                break
            self._stop.wait(0.01)
        if file is not None:
            self._end_of_file(self._feed(file.read(), partial))
            file.close()

    def _catch_up(self, finished: int) -> None:
        """If the log rotated more than once since the last look, the files between the one
        just finished and the live one were never read: read them whole, oldest first."""
        for number in range(1, self.keep + 1):
            try:
                if os.stat(f"{self.path}.{number}").st_ino == finished:
                    break
            except FileNotFoundError:
                return
        else:
            return
        for missed in range(number - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError), open(f"{self.path}.{missed}", "rb") as f:
                self._end_of_file(self._feed(f.read(), b""))

    def _end_of_file(self, partial: bytes) -> None:
        if partial:
            self._take(partial)  # a line without its newline: torn

    def _feed(self, data: bytes, partial: bytes) -> bytes:
        if not data:
            return partial
        *lines, partial = (partial + data).split(b"\n")
        for raw in lines:
            self._take(raw)
        return partial

    def _take(self, raw: bytes) -> None:
        self.lines += 1
        record = None
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
        ok = (isinstance(record, dict) and isinstance(record.get("event"), str)
              and isinstance(record.get("ts"), str))
        self.checker.check("log_json", ok, lambda: f"not a JSON event line: {raw[:200]!r}")
        if not ok:
            return
        assert isinstance(record, dict)
        with self.cond:
            record["_i"], record["_seen"] = len(self.records), now()
            self.records.append(record)
            self.cond.notify_all()

    # -- looking ------------------------------------------------------------------------

    def mark(self) -> int:
        with self.cond:
            return len(self.records)

    def since(self, index: int) -> list[dict[str, Any]]:
        with self.cond:
            return self.records[index:]

    def wait(self, match: Callable[[dict[str, Any]], bool], after: int, timeout: float,
             give_up: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        """The first record from index `after` on that matches, waiting at most `timeout`."""
        deadline = time.monotonic() + timeout
        index = after
        with self.cond:
            while True:
                for record in self.records[index:]:
                    if match(record):
                        return record
                index = len(self.records)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or give_up():
                    return None
                self.cond.wait(min(remaining, 0.1))

    def tail(self, count: int = 12) -> str:
        with self.cond:
            records = self.records[-count:]
        return "\n".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")})[:300]
                         for r in records)


def is_transition(record: dict[str, Any]) -> bool:
    return "before" in record and "actions" in record


def lock_left_behind(lock: Path, looks: int = 10, apart: float = 0.1) -> bool:
    """True if `lock` exists at every one of `looks` looks: a lock a git holds while it works
    comes and goes; one that a killed git left stays."""
    for _ in range(looks):
        if not lock.exists():
            return False
        time.sleep(apart)
    return True


def actions_named(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [a for a in record.get("actions") or () if a.get("action") == name]


# ---------------------------------------------------------------------------------------------
# Watching the app's processes all the time


class Sampler:
    """Scans /proc every SAMPLE_EVERY seconds for the processes of this run: there must never
    be two app processes at once (invariant `one_child`), whatever is going on; with overlap,
    never three, and two only in a step that started an overlap. Overlaps seen during a step
    become one violation at its end (`report`). It also keeps every app process group it saw,
    for the final check that none outlives the supervisor.

    In release mode (`deploy_dir`) each scan also looks at the disk: once `current` exists it
    must always be a link to releases/COMMIT, a directory (`current_valid`); releases/ may
    hold at most deploy.keep + 2 releases (`releases_bounded`), failed/ at most deploy.keep + 1
    (one more until the oldest is removed in the background: `failed_bounded`)."""

    def __init__(self, marker: bytes, checker: Checker, deploy_dir: Path | None = None,
                 keep: int = DEPLOY_KEEP) -> None:
        self.marker, self.checker = marker, checker
        self.deploy_dir, self.keep = deploy_dir, keep
        self.app_groups: dict[int, int] = {}  # pgid -> its leader's start ticks
        self.scans = 0
        self.overlaps: list[str] = []
        self.most_apps = 0  # the most app processes seen at once since the last report
        self.current_seen = False
        self.disk_problems: dict[str, list[str]] = defaultdict(list)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.scan()

    def scan(self) -> list[Proc]:
        processes = token_processes(self.marker)
        apps = [p for p in processes if p.kind == "app"]
        problems = self.look_at_disk() if self.deploy_dir is not None else {}
        with self.lock:
            for app in apps:
                if app.pid == app.pgid:
                    self.app_groups.setdefault(app.pgid, app.ticks)
            self.scans += 1
            if len(apps) > 1:
                self.overlaps.append("; ".join(map(str, apps)))
                self.most_apps = max(self.most_apps, len(apps))
            for invariant, problem in problems.items():
                self.disk_problems[invariant].append(problem)
        return processes

    def look_at_disk(self) -> dict[str, str]:
        """What is wrong with deploy.dir right now (release mode), by invariant."""
        assert self.deploy_dir is not None
        problems: dict[str, str] = {}
        current = self.deploy_dir / "current"
        for _ in range(3):  # a switch between reading the link and looking at its target
            try:
                target = os.readlink(current)
            except OSError as error:
                if self.current_seen:
                    problems["current_valid"] = f"current: {error.strerror}"
                break
            self.current_seen = True
            name = target.rstrip("/").rpartition("/")[2]
            if target != f"releases/{name}" or not RELEASE_NAME.match(name):
                problems["current_valid"] = f"current -> {target!r}: not releases/COMMIT"
                break
            if (self.deploy_dir / "releases" / name).is_dir():
                problems.pop("current_valid", None)
                break
            with contextlib.suppress(OSError):
                if os.readlink(current) != target:
                    continue
            problems["current_valid"] = f"current -> {target}, which is not a directory"
            break
        for folder, bound, invariant in (("releases", self.keep + 2, "releases_bounded"),
                                         ("failed", self.keep + 1, "failed_bounded")):
            with contextlib.suppress(OSError):
                names = sorted(n for n in os.listdir(self.deploy_dir / folder)
                               if RELEASE_NAME.match(n))
                if len(names) > bound:
                    problems[invariant] = (f"{len(names)} releases in {folder}/ (at most "
                                           f"{bound}): {[short(n) for n in names]}")
        return problems

    def report(self, overlap_started: bool = False) -> None:
        """One `one_child` check per step: were two app processes ever seen at once? With
        `overlap_started` (the step started a new generation beside the old one) two are
        allowed, never three. In release mode, one check per step of each disk invariant."""
        with self.lock:
            overlaps, self.overlaps = self.overlaps, []
            most, self.most_apps = self.most_apps, 0
            problems, self.disk_problems = self.disk_problems, defaultdict(list)
        allowed = 2 if overlap_started else 1
        self.checker.check("one_child", not overlaps or most <= allowed,
                           lambda: f"{most} app processes at once (at most {allowed}), in "
                                   f"{len(overlaps)} scan(s) of /proc; first: {overlaps[0]}; "
                                   f"last: {overlaps[-1]}")
        if self.deploy_dir is None:
            return
        for invariant in ("current_valid", "releases_bounded", "failed_bounded"):
            seen = problems.get(invariant, [])
            self.checker.check(invariant, not seen,
                               lambda seen=seen: f"in {len(seen)} scan(s): first: {seen[0]}; "
                                                 f"last: {seen[-1]}")


# ---------------------------------------------------------------------------------------------
# The world: remote, clones, tmpfs, config, clients


@dataclass(frozen=True)
class Commit:
    sha: str
    kind: str  # "good", "buildfail" (its build fails), "crash" (its app exits at start) or
    # "unhealthy" (it serves, but its /up answers 503: a failed health check in release mode)
    version: str  # what the app answers over HTTP: "hello from VERSION"

    def __str__(self) -> str:
        return f"{self.kind} {self.version} {short(self.sha)}"


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "SOAK_")) and k not in ("SSH_ASKPASS",)}
    env.update(GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
               GIT_AUTHOR_NAME="Soak", GIT_AUTHOR_EMAIL="soak@example.invalid",
               GIT_COMMITTER_NAME="Soak", GIT_COMMITTER_EMAIL="soak@example.invalid")
    return env


GIT_ENV = _git_env()
CRASH_PREFIX = ('import sys\nprint("soak: this release crashes at start", file=sys.stderr, '
                'flush=True)\nsys.exit(3)\n\n')
BUILD_FAILS = 'echo "soak: this build fails on purpose" >&2\nexit 1\n'
# An app that leaves a grandchild in a session of its own before it serves (setsid, then its
# parent exits): killing the app's process group does not reach it. Its argv names the app.
ESCAPED = "soak-escaped"
ESCAPE_PREFIX = (
    "import os, sys\n"
    # posix_spawn, not fork: no second process that looks like the app, even for a moment.
    "os.waitpid(os.posix_spawn(sys.executable, [sys.executable, '-c', 'import os, time\\n"
    "os.setsid()\\nif os.fork(): os._exit(0)\\ntime.sleep(100000)', '" + ESCAPED + "', "
    "str(os.getpid())], os.environ), 0)\n\n")
# A build that wants far more than build.memory_max: the OOM killer ends it in its cgroup.
BUILD_MEMORY_MAX = "64MiB"
HUNGRY_BUILD = (f'{shlex.quote(sys.executable)} -c "b = b\'\\\\1\' * (256 << 20)"\n'
                'echo "soak: this build got its memory" >&2\nexit 1\n')


class World:
    def __init__(self, root: Path, *, tmpfs: bool, socket_handoff: bool,
                 state_on_tmpfs: bool, releases: bool = False, overlap: bool = False,
                 probe: str | None = None) -> None:
        self.root = root
        # Release mode: deploy.dir beside the state directory, on the ordinary disk (a full
        # tmpfs would fail a checkout, and a failed checkout holds a good commit: rule 4).
        self.releases, self.overlap, self.probe = releases, overlap, probe
        self.deploy_dir = root / "deploy" if releases else None
        self.remote = root / "remote.git"
        self.remote_away = root / "remote.git.away"
        self.dev = root / "dev"
        self.app = root / "app"
        self.run_dir = root / "run"
        self.stats = self.run_dir / "stats"
        self.disk = root / "disk"
        self.config = root / "supervisor.toml"
        self.token = secrets.token_hex(8)
        self.marker = f"\0SOAK_TOKEN={self.token}\0".encode()
        self.port = free_port()
        self.socket_handoff = socket_handoff
        self.server_source = (EXAMPLE_APP / "server.py").read_text()
        self.branch: list[Commit] = []  # the remote branch, oldest first
        self.commits: dict[str, Commit] = {}  # every commit made, dropped ones included
        self.counter = 0
        for directory in (self.run_dir, self.disk):
            directory.mkdir()
        self.tmpfs = tmpfs and self._mount()
        self.had_tmpfs = self.tmpfs
        self.cgroup = self._make_cgroup()  # the supervisors run in it; builds get one each
        self.had_cgroup = self.cgroup is not None
        try:
            # The log in the state directory, as the README suggests; both on the small disk.
            on_tmpfs = self.tmpfs and state_on_tmpfs
            self.state_dir = (self.disk if on_tmpfs else root) / "state"
            self.state_dir.mkdir()
            self.log_file = (self.disk if self.tmpfs and not on_tmpfs
                             else self.state_dir) / "events.log"
            self.filler = self.disk / "filler"
            self.config.write_text(self.config_text())
            self.git(root, "init", "-q", "--bare", "-b", "main", str(self.remote))
            self.git(root, "init", "-q", "-b", "main", str(self.dev))
            self.commit("good", build_delay=0.0)
            self.git(self.dev, "remote", "add", "origin", str(self.remote))
            self.git(self.dev, "push", "-q", "-u", "origin", "main")
            self.git(root, "clone", "-q", str(self.remote), str(self.app))
        except BaseException:
            self.unmount()
            self.remove_cgroup()
            raise

    # -- the small disk -------------------------------------------------------------------

    def _mount(self) -> bool:
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}",
                                     "soak-tmpfs", str(self.disk)],
                                    capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"soak: no tmpfs ({error}); the disk-full fault is left out", flush=True)
            return False
        if result.returncode != 0:
            print(f"soak: no tmpfs ({result.stderr.strip()}); the disk-full fault is left out",
                  flush=True)
            return False
        return True

    def _make_cgroup(self) -> Path | None:
        """A memory cgroup of the run's own, under ours (v1's memory hierarchy, or v2's with the
        memory controller), where the supervisor may make build cgroups; None where we may not."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        own = {number_and_names.partition(":")[2]: path for number_and_names, _, path
               in (line.rpartition(":") for line in lines)}
        candidates = [Path("/sys/fs/cgroup/memory") / own[names].lstrip("/")
                      for names in own if "memory" in names.split(",")]
        with contextlib.suppress(OSError):
            if "" in own and "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text():
                candidates.append(Path("/sys/fs/cgroup") / own[""].lstrip("/"))
        for parent in candidates:
            group = parent / f"soak-{self.token}"
            try:
                group.mkdir()
            except OSError:
                continue
            print(f"soak: supervisors run in the memory cgroup {group}", flush=True)
            return group
        print("soak: no memory cgroup of our own; the hungry build fault is left out", flush=True)
        return None

    def remove_cgroup(self) -> None:
        """Everything in the run's cgroup is ours: killed; then it and the build cgroups the
        supervisors made in it are removed."""
        if self.cgroup is None:
            return
        for _ in range(50):
            groups = [g for g in self.cgroup.iterdir() if g.is_dir()] + [self.cgroup]
            pids = []
            for group in groups:
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in (group / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for group in [g for g in self.cgroup.iterdir() if g.is_dir()] + [self.cgroup]:
            try:
                group.rmdir()
            except OSError as error:
                print(f"soak: cannot remove cgroup {group}: {error.strerror}", flush=True)
        self.cgroup = None

    def unmount(self) -> None:
        if not self.tmpfs:
            return
        for attempt in range(10):  # busy while a process we killed is still going away
            result = subprocess.run(["umount", str(self.disk)], capture_output=True, timeout=10)
            if result.returncode == 0:
                self.tmpfs = False
                return
            time.sleep(0.05 * (attempt + 1))
        subprocess.run(["umount", "-l", str(self.disk)], capture_output=True, timeout=10)
        self.tmpfs = False

    def fill_disk(self) -> int:
        """Write to the tmpfs until it is full; returns the bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as file:
            for chunk in (65536, 4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        written += file.write(b"\0" * chunk)
        return written

    def free_disk(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    # -- config -----------------------------------------------------------------------------

    def config_text(self) -> str:
        q = json.dumps
        env = {"PORT": str(self.port), "STATS_FILE": str(self.stats), "START_DELAY": START_DELAY,
               "STOP_GRACE": "0.5"}
        lines = [
            "# Written by tests/soak/soak.py",
            "[app]", 'name = "soak"', f'command = [{q(sys.executable)}, "server.py"]',
            "env = { " + ", ".join(f"{k} = {q(v)}" for k, v in env.items()) + " }",
            f'stop_timeout = "{STOP_TIMEOUT:g}s"', f"state_dir = {q(str(self.state_dir))}", "",
            "[git]", f"repo = {q(str(self.app))}", f'poll_interval = "{POLL_INTERVAL * 1000:g}ms"',
            f'timeout = "{GIT_TIMEOUT:g}s"', 'on_diverge = "reset"', "",
            "[build]", 'command = "sh build.sh"', 'timeout = "20s"',
            *([f'memory_max = "{BUILD_MEMORY_MAX}"'] if self.cgroup is not None else []), "",
            "[drain]", f"stats_file = {q(str(self.stats))}", 'until = "n_clients == 0"',
            f'timeout = "{DRAIN_TIMEOUT:g}s"', "",
            "[restart]", 'backoff_min = "200ms"', 'backoff_max = "1s"', 'reset_after = "2s"', "",
            "[log]", 'format = "json"', f"file = {q(str(self.log_file))}",
            f'max_bytes = "{LOG_MAX_BYTES}"', f"keep = {LOG_KEEP}", "",
        ]
        if self.socket_handoff:
            lines += ["[[socket]]", f'listen = "127.0.0.1:{self.port}"', 'name = "web"', ""]
        if self.releases:
            lines += ["[deploy]", 'mode = "releases"', f"dir = {q(str(self.deploy_dir))}",
                      f"keep = {DEPLOY_KEEP}", "",
                      "[health]", f'timeout = "{HEALTH_TIMEOUT:g}s"',
                      f'interval = "{HEALTH_INTERVAL * 1000:g}ms"', 'probe_timeout = "1s"']
            lines += (["notify = true"] if self.probe == "notify"
                      else [f'http = "http://127.0.0.1:{self.port}/up"'])
            lines.append("")
        if self.overlap:
            lines[lines.index("[restart]") + 1:lines.index("[restart]") + 1] = [
                'style = "overlap"']
        return "\n".join(lines)

    def supervisor_env(self) -> dict[str, str]:
        return {**GIT_ENV, "PYTHONPATH": str(PROJECT_ROOT), "SOAK_TOKEN": self.token}

    # -- git --------------------------------------------------------------------------------

    @staticmethod
    def git(cwd: Path, *args: str) -> str:
        result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True,
                                text=True, timeout=60)
        if result.returncode != 0:
            raise SoakError(f"git {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def commit(self, kind: str, build_delay: float, *, escape: bool = False,
               hungry: bool = False) -> Commit:
        """A new commit in the dev clone, of `kind`; its VERSION names it uniquely. With
        `escape` its app leaves an escaped grandchild; with `hungry` (kind "buildfail") its
        build runs out of memory."""
        version = f"{kind[0]}{self.counter}"
        self.counter += 1
        server = self.server_source if kind != "crash" else CRASH_PREFIX + self.server_source
        if escape:
            server = ESCAPE_PREFIX + server
        check = (f'{shlex.quote(sys.executable)} -c "import ast; '
                 "ast.parse(open('server.py').read())\"")
        build = (HUNGRY_BUILD if hungry else BUILD_FAILS if kind == "buildfail" else
                 f'sleep {build_delay:.2f}\ntest -s VERSION && {check} && '
                 'echo "built version $(cat VERSION)"\n')
        for name, text in (("server.py", server), ("build.sh", build), ("VERSION", version + "\n")):
            (self.dev / name).write_text(text)
        unhealthy = self.dev / "UNHEALTHY"  # the example app's /up answers 503 while it exists
        if kind == "unhealthy":
            unhealthy.write_text("soak: this release fails its health check\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                unhealthy.unlink()
        self.git(self.dev, "add", "-A")
        self.git(self.dev, "commit", "-q", "--allow-empty", "-m", f"{kind} {version}")
        commit = Commit(self.git(self.dev, "rev-parse", "HEAD"), kind, version)
        self.branch.append(commit)
        self.commits[commit.sha] = commit
        return commit

    def push(self, *, force: bool = False) -> None:
        remote = str(self.remote_away) if self.remote_away.exists() else "origin"
        self.git(self.dev, "push", "-q", *(["--force"] if force else []), remote,
                 "HEAD:refs/heads/main")

    def rewind(self, count: int) -> Commit:
        del self.branch[-count:]
        self.git(self.dev, "reset", "-q", "--hard", self.branch[-1].sha)
        return self.branch[-1]

    def take_remote_away(self) -> None:
        self.remote.rename(self.remote_away)

    def bring_remote_back(self) -> None:
        if self.remote_away.exists():
            self.remote_away.rename(self.remote)

    def set_app_remote_url(self, url: str | None) -> None:
        self.git(self.app, "remote", "set-url", "origin", url or str(self.remote))

    # -- the app's side -------------------------------------------------------------------

    def release_path(self, sha: str) -> Path:
        assert self.deploy_dir is not None
        return self.deploy_dir / "releases" / sha

    def http(self, timeout: float = 1.5) -> str | None:
        try:
            url = f"http://127.0.0.1:{self.port}/"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read().decode().strip()
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def n_clients(self) -> int | None:
        """n_clients from the stats file, read the careful way (it may be a FIFO we put there)."""
        try:
            fd = os.open(self.stats, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, 65536)
        except OSError:
            return None
        finally:
            os.close(fd)
        found = re.search(rb'^n_clients="?(\d+)"?$', data, re.MULTILINE)
        return int(found.group(1)) if found else None

    def replace_stats(self, write: Callable[[Path], None]) -> None:
        temporary = self.run_dir / ".soak-stats.tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        write(temporary)
        os.replace(temporary, self.stats)


# ---------------------------------------------------------------------------------------------
# What should be running: a model as simple as the rules


@dataclass
class Model:
    """The newest pushed commit (`tip`) and what must run once things settle (`running`).

    In place: a commit that builds runs, even one that crashes (there is no rollback in place:
    it crash-loops); a commit whose build fails leaves what ran before.

    In release mode (`releases`) the rules of the README's "Rollback": the commit the live
    release runs, or one held back, changes nothing; a commit whose build fails is held and
    leaves what ran before; one that fails its probation (it exits at start, or, with the http
    probe, its /up answers 503) is held and rolled back to the newest good release (with an
    overlap: to the generation that kept serving, the live one); any other becomes good and
    runs. `good` mirrors the supervisor's good releases (oldest first, the newest deploy.keep),
    `held` its held commits (the last one failed and ten before it); `supervisor rollback`
    goes back to the newest good release other than the live one, which is held and no longer
    good."""

    tip: Commit
    running: Commit
    commits: dict[str, Commit] = field(default_factory=dict, repr=False)
    releases: bool = False
    overlap: bool = False
    http_probe: bool = False
    good: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    rollbacks: int = 0  # automatic rollbacks the model expects
    # Rollbacks to a release other than the one live before the bad deploy (after a force push
    # back to an older good release, "the newest good release" is not the one that served).
    elsewhere: list[str] = field(default_factory=list)

    def copy(self) -> Model:
        return replace(self, good=list(self.good), held=list(self.held),
                       elsewhere=list(self.elsewhere))

    def pushed(self, commit: Commit) -> None:
        self.tip = commit
        if not self.releases:
            if commit.kind != "buildfail":
                self.running = commit
            return
        if commit.sha == self.running.sha or commit.sha in self.held:
            return  # deploy.skipped, or nothing to do
        if commit.kind == "buildfail":
            self.hold(commit.sha)
        elif commit.kind == "crash" or (commit.kind == "unhealthy" and self.http_probe):
            self.failed_probation(commit)
        else:
            self.became_good(commit)

    def became_good(self, commit: Commit) -> None:
        """Proven healthy (again): it is the newest good release, the one a rollback goes to."""
        self.running = commit
        self.good = ([c for c in self.good if c != commit.sha] + [commit.sha])[-DEPLOY_KEEP:]

    def failed_probation(self, commit: Commit) -> None:
        """`commit`, a release that never proved healthy, failed its probation."""
        live = self.running
        target = live.sha if self.overlap else next(
            (c for c in reversed(self.good) if c != commit.sha), None)
        if target is None:  # no good release to go back to: the crash rules (never here)
            self.running = commit
            return
        self.hold(commit.sha)
        self.rollbacks += 1
        if target != live.sha:
            self.elsewhere.append(f"{commit} rolled back to {self.commits[target]}, not to "
                                  f"{live}, which served before it")
        self.running = self.commits[target]

    def previous_good(self) -> str | None:
        """Where `supervisor rollback` goes: the newest good release other than the live one."""
        if not self.releases:
            return None
        return next((c for c in reversed(self.good) if c != self.running.sha), None)

    def rolled_back_by_hand(self) -> None:
        previous = self.previous_good()
        assert previous is not None
        self.hold(self.running.sha)
        self.good = [c for c in self.good if c != self.running.sha]
        self.running = self.commits[previous]

    def hold(self, sha: str) -> None:
        if self.held and self.held[-1] == sha:
            return
        self.held = [c for c in self.held if c != sha][-(HELD_KEPT - 1):] + [sha]

    @property
    def serving(self) -> bool:
        return self.running.kind in ("good", "unhealthy")


@dataclass
class Hold:
    """Clients the soak kept connected to app process `pid`: the stats file said n_clients
    was at least 1 from `counted` until `released`."""

    pid: int
    clients: int
    counted: float
    released: float | None = None


@dataclass
class Stale:
    """An app process that outlived a supervisor killed with SIGKILL."""

    pid: int
    ticks: int
    commit_kind: str | None
    handled_by_soak: bool = False
    stopping: bool = False  # asked to stop before the kill: it may exit by itself
    next_run: tuple[int, int] = (0, 0)  # the next supervisor: its pid, its supervisor.started


# ---------------------------------------------------------------------------------------------
# One supervisor process


class SupervisorRun:
    def __init__(self, world: World, number: int) -> None:
        self.number = number
        self.output = world.root / f"supervisor-{number}.out"
        argv = [sys.executable, "-m", "supervisor", "run", "-c", str(world.config)]
        if world.cgroup is not None:  # joined before exec: everything it starts is in it too
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                    str(world.cgroup / "cgroup.procs"), *argv]
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=world.root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=world.supervisor_env())
        self.pid = self.proc.pid
        self.ticks = start_ticks(self.pid)
        self.first: int | None = None  # index of its supervisor.started record
        self.samples: list[dict[str, Any]] = []  # quiet moments: fds and memory
        self.first_drain: int | None = None  # index of its first watch_stats

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self, polite: bool = True) -> None:
        """A polite stop (unless not `polite`), then SIGKILL for its group; never raises."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM if polite else signal.SIGKILL)
            try:
                self.proc.wait(10 if polite else 2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# Faults. Each is a small function of the soak that injects one fault and returns a few words
# on what it did; it leaves nothing behind (clients released, remote and config restored), so
# that the step can settle. It draws every random choice from soak.rng before acting, so that a
# seed replays the same sequence. `needs` sees only the model, never timing, for the same reason.


@dataclass(frozen=True)
class Fault:
    name: str
    weight: float
    inject: Callable[[Soak], str]
    needs: Callable[[Soak], bool]


FAULTS: list[Fault] = []


def fault(name: str, weight: float,
          needs: Callable[[Soak], bool] = lambda soak: True) -> Callable[..., Any]:
    def register(inject: Callable[[Soak], str]) -> Callable[[Soak], str]:
        FAULTS.append(Fault(name, weight, inject, needs))
        return inject
    return register


def serving(soak: Soak) -> bool:
    return soak.model.serving


@fault("push_good", 10)
def push_good(soak: Soak) -> str:
    return f"pushed {soak.push('good')}"


@fault("push_build_failure", 4)
def push_build_failure(soak: Soak) -> str:
    return f"pushed {soak.push('buildfail')}"


@fault("push_crash_at_start", 3)
def push_crash_at_start(soak: Soak) -> str:
    return f"pushed {soak.push('crash')}"


def http_probe(soak: Soak) -> bool:
    return soak.model.releases and soak.model.http_probe


@fault("push_unhealthy", 3, needs=http_probe)
def push_unhealthy(soak: Soak) -> str:
    """Release mode with the http probe: a commit whose /up answers 503 (an UNHEALTHY file)
    serves, but never proves healthy: rolled back at health.timeout."""
    return f"pushed {soak.push('unhealthy')}"


@fault("force_push", 4, needs=lambda soak: len(soak.world.branch) >= 2)
def force_push(soak: Soak) -> str:
    depth = soak.rng.randint(1, min(3, len(soak.world.branch) - 1))
    rewrite = soak.rng.random() < 0.7
    kind = soak.rng.choices(["good", "buildfail", "crash"], [6, 2, 1])[0]
    delay = soak.rng.uniform(0, 0.3)
    back_to = soak.world.rewind(depth)
    if rewrite:
        commit = soak.world.commit(kind, delay)
        soak.world.push(force=True)
        soak.model.pushed(commit)
        return f"dropped {depth}, pushed {commit} over them"
    soak.world.push(force=True)
    soak.model.pushed(back_to)
    return f"dropped {depth}: back to {back_to}"


@fault("remote_unreachable", 3)
def remote_unreachable(soak: Soak) -> str:
    kind = soak.rng.choice([None, None, "good", "buildfail"])
    away_for = soak.rng.uniform(0.5, 2.0)
    mark = soak.log.mark()
    soak.world.take_remote_away()
    try:
        failed = soak.wait_log(lambda r: r["event"] == "git.fetch_failed", mark,
                               POLL_INTERVAL + GIT_TIMEOUT + 3)
        soak.checker.check("fetch_failure_reported", failed is not None,
                           "no git.fetch_failed while the remote was gone")
        pushed = f", pushed {soak.push(kind)} meanwhile" if kind else ""
        time.sleep(away_for)
    finally:
        soak.world.bring_remote_back()
    return f"remote gone for {away_for:.1f}s{pushed}"


@fault("remote_hangs", 2)
def remote_hangs(soak: Soak) -> str:
    listener = soak.hanging_remote()
    mark = soak.log.mark()
    soak.world.set_app_remote_url(f"git://127.0.0.1:{listener.port}/remote.git")
    try:
        failed = soak.wait_log(
            lambda r: r["event"] == "git.fetch_failed" and "timed out" in str(r.get("error")),
            mark, 2 * GIT_TIMEOUT + POLL_INTERVAL + 3)
        soak.checker.check("fetch_failure_reported", failed is not None,
                           "no git.fetch_failed (timed out) while the remote hung")
    finally:
        soak.world.set_app_remote_url(None)
    return "remote hung one fetch until git.timeout"


@fault("kill_child", 6, needs=serving)
def kill_child(soak: Soak) -> str:
    mode = soak.rng.choice(["once", "twice", "during_deploy"])
    delay = soak.rng.uniform(0, 1.0)
    if mode == "during_deploy":
        before = soak.model.copy()
        commit = soak.push("good")
        time.sleep(delay)
    app = soak.app_process()
    if app is None:
        return f"{mode}: no app process to kill"
    mark = soak.log.mark()
    signal_verified(app.pid, app.ticks, signal.SIGKILL)
    if mode == "during_deploy" and soak.model.releases:
        # A new release killed on probation never proved healthy: it is rolled back and held,
        # like one that crashed by itself. Only the log can tell where the kill landed.
        exited = soak.wait_log(lambda r: r["event"] == "child.exited"
                               and r.get("pid") == app.pid, mark, 5.0)
        if (exited is not None and exited.get("before") == "probation"
                and soak.commit_of_pid(app.pid) == commit.sha):
            soak.model = before
            soak.model.tip = commit
            soak.model.failed_probation(commit)
            return (f"pushed {commit}, killed {app.pid} {delay:.2f}s later, on probation: "
                    "rolled back")
    if mode == "twice":
        again = soak.wait_for_app(lambda p: p.pid != app.pid, 5.0)
        if again is not None:
            signal_verified(again.pid, again.ticks, signal.SIGKILL)
            return f"killed {app.pid}, then its successor {again.pid}"
    if mode == "during_deploy":
        return f"pushed {commit}, killed {app.pid} {delay:.2f}s later"
    return f"killed {app.pid}"


@fault("stop_child", 4, needs=serving)
def stop_child(soak: Soak) -> str:
    """SIGSTOP, then SIGCONT later; maybe with a deploy that must kill the stopped app."""
    deploy = soak.rng.random() < 0.5
    pause = soak.rng.uniform(0.5, 2.5) if not deploy else soak.rng.uniform(2.5, 4.5)
    app = soak.app_process()
    if app is None:
        return "no app process to stop"
    signal_verified(app.pid, app.ticks, signal.SIGSTOP)
    try:
        pushed = f", pushed {soak.push('good')}" if deploy else ""
        time.sleep(pause)
    finally:
        signal_verified(app.pid, app.ticks, signal.SIGCONT)
    return f"stopped {app.pid} for {pause:.1f}s{pushed}"


@fault("kill_supervisor", 4)
def kill_supervisor(soak: Soak) -> str:
    """kill -9 at a random moment: idle, or while a commit deploys. In release mode also while
    a bad release (one that crashes or, with the http probe, is unhealthy) is deployed, on
    probation or rolled back; the moment ranges over the probation too."""
    modes = ["idle", "during_deploy", "during_deploy", "during_failing_build"]
    if soak.model.releases:
        modes += ["during_bad_deploy"] * 2
    mode = soak.rng.choice(modes)
    delay = soak.rng.uniform(0, 1.2)
    down_for = soak.rng.uniform(0, 1.0)
    bad = "crash"
    if soak.model.releases:
        bad = soak.rng.choice(["crash", "unhealthy"] if soak.model.http_probe else ["crash"])
        slow = mode == "during_bad_deploy" and bad == "unhealthy"  # probation to the end
        delay = soak.rng.uniform(0, HEALTH_TIMEOUT + 1 if slow else 2.0)
    what = ""
    if mode != "idle":
        kind = {"during_deploy": "good", "during_failing_build": "buildfail"}.get(mode, bad)
        commit = soak.push(kind)
        what = f", {delay:.2f}s after pushing {commit}"
        time.sleep(delay)
    return soak.kill_and_restart(down_for) + what


@fault("hold_clients", 6, needs=serving)
def hold_clients(soak: Soak) -> str:
    count = soak.rng.randint(1, 3)
    then = soak.rng.choice(["push", "push", "restart", "nothing"])
    short_hold = soak.rng.random() < 0.5
    hold_for = (soak.rng.uniform(0.3, DRAIN_TIMEOUT - 1) if short_hold
                else soak.rng.uniform(DRAIN_TIMEOUT + 0.5, DRAIN_TIMEOUT + 2))
    with soak.clients(count) as hold:
        if hold is None:
            return f"{count} clients: the app never counted them"
        if then == "push":
            then = f"pushed {soak.push('good')}"
        elif then == "restart":
            result = soak.cli("restart")
            soak.checker.check("control_request", result.returncode == 0,
                               lambda: f"supervisor restart: {result.stdout}{result.stderr}")
        time.sleep(hold_for)
    return f"held {count} clients for {hold_for:.1f}s; {then}"


GARBAGE = ("binary", "binary_in_place", "oversized_valid", "huge_sparse", "junk_text", "no_key",
           "nul_in_line", "half_line", "fifo", "device_link")


def write_garbage(soak: Soak, variant: str) -> None:
    data = soak.rng.randbytes(soak.rng.randint(1, 4096)).replace(b"n_clients", b"x")
    world = soak.world

    def write_bytes(content: bytes) -> Callable[[Path], None]:
        return lambda path: path.write_bytes(content)

    match variant:
        case "binary":
            world.replace_stats(write_bytes(data))
        case "binary_in_place":  # a writer that truncates and writes: the worst kind
            with open(world.stats, "wb") as file:
                file.write(data)
        case "oversized_valid":  # says n_clients=0, but over 64 KiB: must count as unknown
            world.replace_stats(write_bytes(b'n_clients="0"\n' * 6000))
        case "huge_sparse":
            size = soak.rng.choice([65 * 1024 + 1, 10 << 20, 1 << 30])
            world.replace_stats(lambda path: sparse_file(path, size))
        case "junk_text":
            world.replace_stats(write_bytes(b'n_clients="many"\n== not a line ==\nversion=\n'))
        case "no_key":
            world.replace_stats(write_bytes(b'version="9"\npid=1\n'))
        case "nul_in_line":
            world.replace_stats(write_bytes(b"n_clients=0\x00\n"))
        case "half_line":
            world.replace_stats(write_bytes(b'n_clients="'))
        case "fifo":
            world.replace_stats(lambda path: os.mkfifo(path))
        case "device_link":
            world.replace_stats(lambda path: os.symlink("/dev/zero", path))


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)


@fault("garbage_stats", 4, needs=serving)
def garbage_stats(soak: Soak) -> str:
    variant = soak.rng.choice(GARBAGE)
    with_client = soak.rng.random() < 0.6
    release_after = soak.rng.uniform(0.3, DRAIN_TIMEOUT + 1.5)
    if not with_client:
        # Nobody is connected, but the file says nothing usable: the drain must wait for its
        # timeout rather than guess.
        write_garbage(soak, variant)
        return f"stats file: {variant}; pushed {soak.push('good')}"
    with soak.clients(1) as hold:
        if hold is None:
            return f"{variant}: the app never counted the client"
        mark = soak.log.mark()
        commit = soak.push("good")
        soak.wait_log(lambda r: r["event"] == "deploy.waiting_for_drain", mark, 5.0)
        write_garbage(soak, variant)
        time.sleep(release_after)
    return f"client held, pushed {commit}, stats file: {variant}, released {release_after:.1f}s on"


@fault("fill_disk", 3, needs=lambda soak: soak.world.tmpfs)
def fill_disk(soak: Soak) -> str:
    choices = ["push_good", "nothing", "sighup"] + (["kill_child"] * 2 if soak.model.serving
                                                     else [])
    inner = soak.rng.choice(choices)
    full_for = soak.rng.uniform(0.5, 2.0)
    start = now()
    written = soak.world.fill_disk()
    try:
        what = inner
        if inner == "push_good":
            what = f"pushed {soak.push('good')}"
        elif inner == "sighup":
            soak.signal_supervisor(signal.SIGHUP)
        elif inner == "kill_child":
            app = soak.app_process()
            if app is not None:
                signal_verified(app.pid, app.ticks, signal.SIGKILL)
                what = f"killed {app.pid}"
        time.sleep(full_for)
    finally:
        soak.world.free_disk()
        soak.gaps.append((start, now() + 0.5))
    # A line now, so the log shows the supervisor still writes it.
    soak.signal_supervisor(signal.SIGUSR1)
    return f"disk full ({written // 1024} KiB) for {full_for:.1f}s; {what}"


BROKEN_CONFIGS = ("syntax", "unknown_key", "wrong_type", "bad_condition", "empty", "binary",
                  "missing")


@fault("sighup_broken_config", 4)
def sighup_broken_config(soak: Soak) -> str:
    variant = soak.rng.choice(BROKEN_CONFIGS)
    blob = soak.rng.randbytes(300)
    push_meanwhile = soak.rng.random() < 0.3
    world, good = soak.world, soak.world.config_text()
    broken = {
        "syntax": good + "\n[app\n",
        "unknown_key": good.replace("[git]\n", "[git]\npoll = 1\n"),
        "wrong_type": good.replace(f'stop_timeout = "{STOP_TIMEOUT:g}s"', "stop_timeout = -5"),
        "bad_condition": good.replace('until = "n_clients == 0"', 'until = "n_clients =="'),
        "empty": "",
    }
    mark = soak.log.mark()
    try:
        if variant == "missing":
            world.config.unlink()
        elif variant == "binary":
            world.config.write_bytes(blob)
        else:
            world.config.write_text(broken[variant])
        soak.signal_supervisor(signal.SIGHUP)
        failed = soak.wait_log(lambda r: r["event"] == "config.reload_failed", mark, 5.0)
        soak.checker.check("reload_truthful", failed is not None and bool(failed.get("problems")),
                           lambda: f"SIGHUP with a {variant} config: no config.reload_failed "
                                   f"with problems: {failed}")
        pushed = f"; pushed {soak.push('good')} meanwhile" if push_meanwhile else ""
    finally:
        world.config.write_text(good)
    mark = soak.log.mark()
    soak.signal_supervisor(signal.SIGHUP)
    reloaded = soak.wait_log(lambda r: r["event"] in ("config.reloaded", "config.reload_failed"),
                             mark, 5.0)
    soak.checker.check(
        "reload_truthful", reloaded is not None and reloaded["event"] == "config.reloaded"
        and reloaded.get("applied") == [] and reloaded.get("not_applied") == [],
        lambda: f"SIGHUP with the good config again: {reloaded}")
    return f"SIGHUP with a broken config ({variant}){pushed}, then the good one"


@fault("restart_request", 2, needs=serving)
def restart_request(soak: Soak) -> str:
    result = soak.cli("restart")
    soak.checker.check("control_request", result.returncode == 0,
                       lambda: f"supervisor restart: {result.stdout}{result.stderr}")
    return "supervisor restart"


@fault("rollback_request", 3, needs=lambda soak: soak.model.previous_good() is not None)
def rollback_request(soak: Soak) -> str:
    """Release mode: `supervisor rollback`, to the newest good release other than the live one
    (the live one is held, and no longer good). Maybe with a client held, so that the rollback
    waits in its drain; maybe with a kill -9 of the supervisor while it goes back (within the
    drain, when a client is held), and another started."""
    variant = soak.rng.choice(["plain", "plain", "client", "kill", "client_kill"])
    kill_after = soak.rng.uniform(0, 1.0)
    hold_for = soak.rng.uniform(0.3, DRAIN_TIMEOUT + 1.5)
    down_for = soak.rng.uniform(0, 1.0)
    live, previous = soak.model.running, soak.model.previous_good()
    with contextlib.ExitStack() as stack:
        if variant.startswith("client"):
            hold = stack.enter_context(soak.clients(1))
            if hold is None:
                return f"{variant}: the app never counted the client"
        mark = soak.log.mark()
        result = soak.cli("rollback")
        soak.checker.check("control_request", result.returncode == 0,
                           lambda: f"supervisor rollback: {result.stdout}{result.stderr}")
        answer = soak.wait_log(
            lambda r: r["event"] == "release.rollback_requested"
            or (r["event"] == "control.ignored" and r.get("request") == "rollback"), mark, 5.0)
        if answer is None or answer["event"] == "control.ignored":
            # Busy is an honest answer at a bad moment; "no earlier good release" is not here.
            soak.checker.check("rollback_target", answer is not None and str(
                answer.get("reason")).startswith("busy"),
                lambda: f"supervisor rollback from {live} (to {short(previous)} by the model): "
                        f"answered {answer}")
            return f"supervisor rollback: {answer and answer.get('reason')}"
        soak.checker.check("rollback_target",
                           answer.get("from") == live.sha and answer.get("to") == previous,
                           lambda: f"supervisor rollback from {live}: the model expects "
                                   f"{short(previous)}, the log says {answer}")
        soak.model.rolled_back_by_hand()
        what = f"supervisor rollback from {live} to {soak.model.running}"
        if variant.endswith("kill"):
            time.sleep(kill_after)
            what += f"; {kill_after:.2f}s on, " + soak.kill_and_restart(down_for)
        elif variant == "client":
            time.sleep(hold_for)
            what += f"; a client held {hold_for:.1f}s"
    return what


@fault("push_escaping_app", 3)
def push_escaping_app(soak: Soak) -> str:
    """A good commit whose app leaves a grandchild in a session of its own (setsid), which a
    signal to the app's group does not reach: it must be gone when its generation ends (a crash
    restart, a deploy, a stop), and never make the next one fail."""
    commit = soak.world.commit("good", soak.rng.uniform(0, 0.3), escape=True)
    soak.world.push()
    soak.model.pushed(commit)
    return f"pushed {commit}, whose app leaves an escaped grandchild"


@fault("push_hungry_build", 2, needs=lambda soak: soak.world.cgroup is not None)
def push_hungry_build(soak: Soak) -> str:
    """A commit whose build wants 256 MiB, beyond build.memory_max: the OOM killer ends it in
    its own cgroup, build.failed says "out of memory", and the app serves on."""
    mark = soak.log.mark()
    commit = soak.world.commit("buildfail", soak.rng.uniform(0, 0.3), hungry=True)
    soak.world.push()
    soak.model.pushed(commit)
    failed = soak.wait_log(lambda r: r["event"] == "build.failed"
                           and r.get("commit") == commit.sha, mark, SETTLE_BOUND)
    if failed is not None:
        soak.checker.check("build_out_of_memory", failed.get("reason") == "out of memory",
                           lambda: f"build.failed for a build beyond build.memory_max: "
                                   f"reason {failed.get('reason')!r}")
    return f"pushed {commit}, whose build runs out of memory"


@fault("stop_and_start_child", 2, needs=serving)
def stop_and_start_child(soak: Soak) -> str:
    pause = soak.rng.uniform(0.3, 1.5)
    mark = soak.log.mark()
    result = soak.cli("stop-child")
    soak.checker.check("control_request", result.returncode == 0,
                       lambda: f"supervisor stop-child: {result.stdout}{result.stderr}")
    gone = soak.wait_log(lambda r: r["event"] == "child.exited" and r.get("after") == "held",
                         mark, STOP_TIMEOUT + 5)
    time.sleep(pause)
    if gone is not None:
        apps = [p for p in soak.sampler.scan() if p.kind == "app"]
        soak.checker.check("one_child", not apps,
                           lambda: "held (stop-child), yet app processes run: "
                                   + "; ".join(map(str, apps)))
    result = soak.cli("start-child")
    soak.checker.check("control_request", result.returncode == 0,
                       lambda: f"supervisor start-child: {result.stdout}{result.stderr}")
    return f"stop-child, {pause:.1f}s held, start-child"


# -- issue 12, sections 3 and 5: hooks, git killed mid-update, the stats directory swapped ---

HOOKS = ("post-merge", "post-checkout", "reference-transaction")


@fault("hanging_hook", 2)
def hanging_hook(soak: Soak) -> str:
    """Hooks in the supervisor's clone that would leave a mark and hang; a commit is pushed.
    No git the supervisor starts may run one (in place: the merge; in release mode: the
    worktree of the release)."""
    world = soak.world
    ran = world.root / "hook-ran"
    hooks = world.app / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in HOOKS:
        (hooks / name).write_text(f"#!/bin/sh\ntouch {shlex.quote(str(ran))}\nexec sleep 30\n")
        (hooks / name).chmod(0o755)
    try:
        mark = soak.log.mark()
        commit = soak.push("good")
        soak.wait_log(lambda r: r["event"] in ("git.tree_updated", "git.tree_update_failed")
                      and r.get("commit") == commit.sha, mark, GIT_TIMEOUT + DRAIN_TIMEOUT + 5)
    finally:
        for name in HOOKS:
            (hooks / name).unlink(missing_ok=True)
    soak.checker.check("no_hook_ran", not ran.exists(),
                       "a repository hook ran in a git the supervisor started")
    ran.unlink(missing_ok=True)
    return f"hooks that hang in the clone; pushed {commit}"


@fault("git_killed_mid_update", 2, needs=lambda soak: not soak.model.releases)
def git_killed_mid_update(soak: Soak) -> str:
    """In place: a commit whose checkout hangs half-way (a smudge filter configured in the
    clone, as git-lfs is, waits on a FIFO for one file written after all the others), so git
    is killed at git.timeout. The update must be rolled back before anything else runs: the
    old commit's tree whole, no lock, the app serving. Then the gate opens for good and a
    good commit is pushed."""
    world = soak.world
    gate = world.root / "gate"
    with contextlib.suppress(FileNotFoundError):
        gate.unlink()
    os.mkfifo(gate)
    quoted = shlex.quote(str(gate))
    world.git(world.app, "config", "filter.gate.smudge",
              f"test -p {quoted} && cat {quoted} >/dev/null; exec cat")
    world.git(world.app, "config", "filter.gate.clean", "cat")
    before = soak.model.running
    (world.dev / ".gitattributes").write_text("zz-slow-* filter=gate\n")
    for index in range(soak.rng.randint(20, 200)):
        (world.dev / f"many-{world.counter}-{index}.txt").write_text(f"{index}\n")
    (world.dev / f"zz-slow-{world.counter}").write_text("slow\n")
    mark = soak.log.mark()
    stuck = world.commit("good", 0.0)  # not in the model: it never gets past its checkout
    world.push()
    try:
        failed = soak.wait_log(lambda r: r["event"] == "git.tree_update_failed"
                               and r.get("commit") == stuck.sha, mark,
                               POLL_INTERVAL + DRAIN_TIMEOUT + GIT_TIMEOUT + 8)
        journal = world.app / ".git" / "supervisor-update"
        lock = world.app / ".git" / "index.lock"
        head = world.git(world.app, "rev-parse", "HEAD")
        dirty = world.git(world.app, "status", "--porcelain", "--untracked-files=all")
        # A lock left behind stays; the supervisor's next `git status` takes one for a moment
        # (it refreshes the index), so only a lock seen at every look over a second counts.
        left = lock_left_behind(lock)
        soak.checker.check(
            "half_written_rolled_back",
            failed is not None and "rolled back" in str(failed.get("error"))
            and head == before.sha and not dirty and not left and not journal.exists(),
            lambda: f"after git was killed mid-update: {failed and failed.get('error')}; HEAD "
                    f"{short(head)} (want {before}), lock {left}, journal "
                    f"{journal.exists()}, status {dirty[:200]!r}")
    finally:
        while True:  # any filter still blocked on the gate goes on (git killed takes them all)
            try:
                descriptor = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads it
                break
            os.close(descriptor)
        gate.unlink()  # the filter lets everything through from now on
    return f"pushed {stuck}, whose checkout hangs; then pushed {soak.push('good')}"


@fault("stats_dir_recreated", 2, needs=serving)
def stats_dir_recreated(soak: Soak) -> str:
    """A client is held while a deploy drains; the stats file's directory is renamed away and
    made again (as a deploy script or systemd's RuntimeDirectory would), then the client
    leaves. The app writes n_clients=0 into the new directory: the drain must see it there,
    not wait for its timeout."""
    world = soak.world
    with soak.clients(1) as hold:
        if hold is None:
            return "stats directory swap: the app never counted the client"
        mark = soak.log.mark()
        commit = soak.push("good")
        waiting = soak.wait_log(lambda r: r["event"] == "deploy.waiting_for_drain", mark, 5.0)
        old = world.run_dir.with_name("run.old")
        shutil.rmtree(old, ignore_errors=True)
        world.run_dir.rename(old)
        world.run_dir.mkdir()
        swapped = soak.log.mark()
        swapped_at = time.monotonic()
    if waiting is None:
        shutil.rmtree(old, ignore_errors=True)
        return f"pushed {commit}; no drain to swap the stats directory under"
    ended = soak.wait_log(lambda r: r["event"] in ("drain.satisfied", "drain.timed_out",
                                                    "drain.child_exited"),
                          swapped, DRAIN_TIMEOUT + 5)
    took = time.monotonic() - swapped_at
    soak.checker.check("drain_follows_path",
                       ended is not None and ended["event"] != "drain.timed_out",
                       lambda: f"the drain after the stats directory was made again ended with "
                               f"{ended and ended['event']}")
    shutil.rmtree(old, ignore_errors=True)
    return f"client held, pushed {commit}, stats directory made again; drained {took:.1f}s on"


# ---------------------------------------------------------------------------------------------
# The soak


@dataclass
class Options:
    seed: int
    minutes: float | None = None
    steps: int | None = None
    faults: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    directory: Path | None = None
    keep: bool = False
    json_path: Path | None = None
    tmpfs: bool = True
    socket_handoff: bool = True
    state_on_tmpfs: bool = True
    quiet: bool = False
    settle_bound: float = SETTLE_BOUND
    stop_on_violation: bool = False
    mode: str = "in-place"  # or "releases"
    overlap: bool = False  # restart.style = "overlap" (release mode, with the socket)
    probe: str = "http"  # release mode's [health] probe: "http" (on /up) or "notify"

    @property
    def releases(self) -> bool:
        return self.mode == "releases"


class Soak:
    def __init__(self, options: Options, root: Path) -> None:
        self.options = options
        # The seed draws which fault comes next and a seed for each step; a fault draws its
        # details from its step's own Random, so a fault that ends early (nothing to kill)
        # leaves the rest of the sequence as it was.
        self.chooser = random.Random(options.seed)
        self.rng = random.Random(self.chooser.getrandbits(64))
        self.checker = Checker()
        self.world = World(root, tmpfs=options.tmpfs, socket_handoff=options.socket_handoff,
                           state_on_tmpfs=options.state_on_tmpfs, releases=options.releases,
                           overlap=options.overlap,
                           probe=options.probe if options.releases else None)
        first = self.world.branch[0]
        self.model = Model(first, first, self.world.commits, releases=options.releases,
                           overlap=options.overlap, http_probe=options.probe == "http",
                           good=[first.sha] if options.releases else [])
        self.log = EventLogReader(self.world.log_file, LOG_KEEP, self.checker)
        self.sampler = Sampler(self.world.marker, self.checker, self.world.deploy_dir)
        self.run: SupervisorRun | None = None
        self.runs: list[SupervisorRun] = []
        self.holds: list[Hold] = []
        self.open_clients: list[socket.socket] = []
        self.stale: list[Stale] = []
        self.gaps: list[tuple[float, float]] = []  # (from, to): the log may miss lines then
        self.step_began = now()
        self.injected: Counter[str] = Counter()
        self.converge_times: list[tuple[float, int, str]] = []
        self.audit = LogAudit(self)
        self.generations: list[dict[str, Any]] = []
        self.unknown_reasons: Counter[str] = Counter()
        self._hanging: HangingServer | None = None
        self.steps_done = 0
        self.recoveries = 0
        self.escaped_after_kill = 0  # grandchildren a killed supervisor could no longer reach
        self.final_converge: float | None = None
        self.aborted: str | None = None

    # -- helpers for faults ---------------------------------------------------------------

    def push(self, kind: str) -> Commit:
        commit = self.world.commit(kind, self.rng.uniform(0, 0.3))
        self.world.push()
        self.model.pushed(commit)
        return commit

    def wait_log(self, match: Callable[[dict[str, Any]], bool], after: int,
                 timeout: float) -> dict[str, Any] | None:
        run = self.run
        return self.log.wait(match, after, timeout,
                             give_up=lambda: run is None or not run.running)

    def app_processes(self) -> list[Proc]:
        return [p for p in token_processes(self.world.marker) if p.kind == "app"]

    def app_process(self) -> Proc | None:
        apps = self.app_processes()
        return apps[0] if len(apps) == 1 else None

    def wait_for_app(self, match: Callable[[Proc], bool], timeout: float) -> Proc | None:
        """An app process that matches; /proc says nothing when one starts, so look again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app = self.app_process()
            if app is not None and match(app):
                return app
            time.sleep(0.02)
        return None

    def signal_supervisor(self, sig: int) -> None:
        if self.run is not None and self.run.running:
            os.kill(self.run.pid, sig)

    def cli(self, request: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", request, "-c", str(self.world.config)],
            cwd=self.world.root, env=self.world.supervisor_env(), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=30)

    @contextlib.contextmanager
    def clients(self, count: int) -> Iterator[Hold | None]:
        """`count` idle TCP clients the app counts in n_clients, closed on the way out. Yields
        None if the app never counted them (then nothing was held)."""
        app = self.app_process()
        sockets: list[socket.socket] = []
        hold = None
        try:
            try:
                for _ in range(count):
                    sockets.append(socket.create_connection(("127.0.0.1", self.world.port), 5))
                    self.open_clients.append(sockets[-1])
            except OSError:
                yield None
                return
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.world.n_clients() == count:
                    break
                time.sleep(0.02)
            else:
                yield None
                return
            if app is not None:
                hold = Hold(app.pid, count, now())
                self.holds.append(hold)
            yield hold
        finally:
            if hold is not None:
                hold.released = now()
            for sock in sockets:
                sock.close()
                self.open_clients.remove(sock)

    def hanging_remote(self) -> HangingServer:
        if self._hanging is None:
            self._hanging = HangingServer()
        return self._hanging

    def commit_of_pid(self, pid: int) -> str | None:
        """The commit app process `pid` runs, by the log's child.started line."""
        for record in reversed(self.log.since(0)):
            if record["event"] == "child.started" and record.get("pid") == pid:
                return record.get("commit")
        return None

    def kind_of_pid(self, pid: int) -> str | None:
        return self.kind_of_commit(self.commit_of_pid(pid))

    def describe(self, sha: str | None) -> str:
        commit = self.world.commits.get(sha or "")
        return str(commit) if commit else short(sha)

    def kind_of_commit(self, sha: str | None) -> str | None:
        commit = self.world.commits.get(sha or "")
        return commit.kind if commit else None

    # -- supervisors ------------------------------------------------------------------------

    def kill_and_restart(self, down_for: float) -> str:
        """kill -9 the supervisor, then start another after `down_for` seconds: it must stop
        the app the old one left (an app it had already asked to stop may exit by itself)."""
        old = self.run
        assert old is not None
        self.end_of_life(old)
        old.kill()
        stops = {action.get("pid") for record in self.log.since(old.first or 0)
                 for action in actions_named(record, "stop_child")}
        stale = []
        for app in (p for p in self.sampler.scan() if p.kind == "app"):
            stale.append(Stale(app.pid, app.ticks, self.kind_of_pid(app.pid),
                               stopping=app.pid in stops))
        self.kill_escaped(before=None)
        time.sleep(down_for)
        self.start_supervisor(stale)
        left = ", ".join(str(s.pid) for s in stale) or "none"
        return f"killed supervisor {old.pid}; restarted after {down_for:.1f}s (app left: {left})"

    def start_supervisor(self, stale: list[Stale]) -> None:
        """Start a supervisor and wait for its first line. A refusal to start is a violation;
        the soak then clears the way (stops what the last one left) and tries once more."""
        for attempt in (1, 2):
            mark = self.log.mark()
            run = SupervisorRun(self.world, len(self.runs) + 1)
            self.runs.append(run)
            self.run = run
            started = self.log.wait(
                lambda r, pid=run.pid: r["event"] == "supervisor.started" and r.get("pid") == pid,
                mark, 20.0, give_up=lambda run=run: not run.running)
            if started is not None:
                self.checker.check("supervisor_starts", True)
                run.first = started["_i"]
                for left in stale:
                    left.next_run = (run.pid, run.first)
                self.stale += stale
                return
            if run.running:
                run.close()
                raise SoakError(f"supervisor {run.pid} wrote no supervisor.started in 20 s:\n"
                                f"{run.output_tail()}")
            self.checker.check(
                "supervisor_starts", False,
                f"supervisor {run.pid} exited with code {run.proc.returncode} at start "
                f"(attempt {attempt}), app left running: "
                f"{[s.pid for s in stale if alive(s.pid, s.ticks)]}: {run.output_tail(3)}")
            for left in stale:  # what an operator would do to get going again
                left.handled_by_soak = signal_verified(left.pid, left.ticks, signal.SIGKILL)
            for app in self.app_processes():
                signal_verified(app.pid, app.ticks, signal.SIGKILL)
            time.sleep(0.2)
        raise SoakError("the supervisor does not start: " + self.runs[-1].output_tail())

    def end_of_life(self, run: SupervisorRun) -> None:
        """Judge fds and memory of a supervisor about to be stopped or killed: its last quiet
        moment against its first (for memory, the first after its first drain)."""
        summary: dict[str, Any] = {"pid": run.pid, "samples": len(run.samples)}
        self.generations.append(summary)
        if len(run.samples) < MIN_SAMPLES:
            self.checker.skip("fd_flat")
            self.checker.skip("memory_flat")
            return
        # A leak stays; a git or build process being spawned at the moment of a sample (a
        # pipe and /dev/null for an instant) does not: judge the fewest of the first and last
        # few samples.
        first = min(run.samples[:FD_WINDOW], key=lambda sample: len(sample["fds"]))
        last = min(run.samples[-FD_WINDOW:], key=lambda sample: len(sample["fds"]))
        summary["fds"] = (len(first["fds"]), len(last["fds"]))
        grown = Counter(last["fds"]) - Counter(first["fds"])
        self.checker.check("fd_flat", len(last["fds"]) <= len(first["fds"]) + FD_SLACK,
                           lambda: f"supervisor {run.pid} held {len(first['fds'])} fds at step "
                                   f"{first['step']}, {len(last['fds'])} at step {last['step']}; "
                                   f"new: {dict(grown)}")
        warm = [s for s in run.samples
                if run.first_drain is not None and s["index"] > run.first_drain] or run.samples
        base = warm[0]
        if base is last:
            self.checker.skip("memory_flat")
            return
        summary["pss_kb"] = (base["memory"].get("Pss"), last["memory"].get("Pss"))
        summary["private_kb"] = (base["memory"].get("Private"), last["memory"].get("Private"))
        summary["steps"] = (base["step"], last["step"])
        growth = last["memory"].get("Pss", 0) - base["memory"].get("Pss", 0)
        self.checker.check("memory_flat", growth <= MEMORY_SLACK_KB,
                           lambda: f"supervisor {run.pid}: PSS {base['memory']} at step "
                                   f"{base['step']} -> {last['memory']} at step {last['step']}")

    def sample(self, run: SupervisorRun) -> None:
        """A quiet moment (converged, the app serving): the supervisor's fds and memory."""
        if run.first_drain is None:
            for record in self.log.since(run.first or 0):
                if actions_named(record, "watch_stats"):
                    run.first_drain = record["_i"]
                    break
        run.samples.append({"step": self.checker.step, "index": self.log.mark(),
                            "fds": open_fds(run.pid), "memory": memory_kb(run.pid)})

    # -- converging -------------------------------------------------------------------------

    def fetch_saw(self, sha: str, since: int, first: int) -> bool:
        """A fetch since index `since` saw `sha`: its own git.fetched line, or a log.repeated
        line of git.fetched, which stands for more fetches exactly like the last one written
        (identical lines are collapsed into one count)."""
        last = None
        for record in self.log.since(first):
            if record["event"] == "git.fetched":
                last = record.get("upstream")
            elif not (record["event"] == "log.repeated" and record.get("of") == "git.fetched"):
                continue
            if record["_i"] >= since and last == sha:
                return True
        return False

    def settled(self, mark: int) -> tuple[bool, str]:
        """Whether the supervisor has converged since index `mark`: a fetch has seen the tip,
        no deploy is under way, the log's current child runs what the model says, and reality
        agrees (one app process, the one the log names, answering with the right version)."""
        run = self.run
        if run is None or not run.running:
            return False, "the supervisor is not running"
        tip, expected = self.model.tip, self.model.running
        if not self.fetch_saw(tip.sha, max(mark, run.first or 0), run.first or 0):
            return False, f"no fetch has seen the tip {tip} yet"
        generation = self.log.since(run.first or 0)
        phase = next((r["after"] for r in reversed(generation) if is_transition(r)), None)
        if phase not in ("running", "backoff"):
            return False, f"phase {phase}"
        started = next((r for r in reversed(generation) if r["event"] == "child.started"), None)
        kept = next((r for r in reversed(generation)
                     if r["event"] == "release.rolling_back" and r.get("kept_pid")), None)
        if started is not None and kept is not None and kept["_i"] > started["_i"]:
            # A failed overlap: the old generation, which kept serving, is the app again.
            started = {**kept, "pid": kept["kept_pid"], "commit": kept.get("to")}
        # After a full disk the log may lack the last start: then only reality can tell.
        gap_end = max((end for _, end in self.gaps), default=0.0)
        lost = started is None or parse_timestamp(started["ts"]) < gap_end
        apps = self.app_processes()
        if expected.kind == "crash":
            # Crash-looping is all it can do, but it must keep trying: a start since the step
            # began (and since the log last lost lines).
            if lost or started is None or started.get("commit") != expected.sha or not any(
                    r["event"] == "child.started" and r.get("commit") == expected.sha
                    and r["_i"] >= mark for r in generation):
                return False, f"no start of the crashing {expected} since the step began"
            return True, ""
        if not lost:
            assert started is not None
            if started.get("commit") != expected.sha:
                return False, (f"the log's child runs {short(started.get('commit'))}, the model "
                               f"expects {expected}")
            if any(r["event"] == "child.exited" and r.get("pid") == started["pid"]
                   for r in generation[started["_i"] - generation[0]["_i"]:]):
                return False, f"the log's child {started['pid']} exited"
            if [p.pid for p in apps] != [started["pid"]]:
                return False, (f"app processes {[str(p) for p in apps]}, the log says "
                               f"{started['pid']}")
        if phase != "running":
            return False, f"phase {phase}"
        if len(apps) != 1 or commit_of(apps[0].pid) != expected.sha:
            return False, (f"app processes {[str(p) for p in apps]} (commit "
                           f"{[short(commit_of(p.pid)) for p in apps]}), expected {expected}")
        body = self.world.http()
        if body != f"hello from {expected.version}":
            return False, f"HTTP answers {body!r}, expected 'hello from {expected.version}'"
        return True, ""

    def settle(self, mark: int, bound: float) -> tuple[bool, float, str]:
        start = time.monotonic()
        while True:
            ok, why = self.settled(mark)
            elapsed = time.monotonic() - start
            if ok or elapsed > bound or self.run is None or not self.run.running:
                return ok, elapsed, why
            time.sleep(0.05)

    # -- after each step ------------------------------------------------------------------

    def after_step(self, name: str, mark: int, bound: float) -> tuple[bool, float, str]:
        """Wait for convergence, then check what each step must leave true. A supervisor that
        died is a violation; it is started again (as systemd would) and must converge too."""
        converged, elapsed, why = self.settle(mark, bound)
        run = self.run
        assert run is not None
        self.checker.check("supervisor_alive", run.running,
                           lambda: f"supervisor {run.pid} exited with {run.proc.returncode}:\n"
                                   f"{run.output_tail()}")
        if not run.running:
            self.end_of_life(run)
            self.start_supervisor([Stale(p.pid, p.ticks, self.kind_of_pid(p.pid))
                                   for p in self.app_processes()])
            converged, more, why = self.settle(mark, bound)
            elapsed += more
        self.checker.check("converged", converged,
                           lambda: f"after {name}: not converged within {bound:.0f}s: {why}\n"
                                   f"--- log tail ---\n{self.log.tail()}\n"
                                   f"--- supervisor {run.pid}'s own output ---\n"
                                   f"{run.output_tail()}")
        if converged:
            self.converge_times.append((elapsed, self.checker.step, name))
        elif name != "final push":
            self.recover(mark, bound)
        run = self.run
        assert run is not None
        self.sampler.report(self.overlap_started(mark))
        self.check_stale()
        self.check_escaped(run)
        self.check_orphans(run)
        if converged and self.model.releases:
            self.check_release()
        if converged and self.model.serving:
            self.sample(run)
        self.audit.run(final=False)
        return converged, elapsed, why

    def overlap_started(self, mark: int) -> bool:
        """Whether a new generation started beside the old one since index `mark` (or may have:
        the log lost lines to a full disk during the step)."""
        if not self.options.overlap:
            return False
        if any(end >= self.step_began for _, end in self.gaps):
            return True
        return any(str(start.get("reason", "")).endswith("(overlap)")
                   for record in self.log.since(mark)
                   for start in actions_named(record, "start_child"))

    def check_release(self) -> None:
        """Converged in release mode: `current` names the release of the commit that serves,
        and the app runs from it (its cwd)."""
        expected = self.model.running
        release = self.world.release_path(expected.sha)
        assert self.world.deploy_dir is not None
        try:
            link: str | None = os.readlink(self.world.deploy_dir / "current")
        except OSError:
            link = None
        self.checker.check("current_valid", link == f"releases/{expected.sha}",
                           lambda: f"converged on {expected}, but current -> {link}")
        apps = self.app_processes()
        cwd = None
        with contextlib.suppress(OSError, IndexError):
            cwd = os.readlink(f"/proc/{apps[0].pid}/cwd")
        self.checker.check("cwd_is_current",
                           len(apps) == 1 and cwd == os.path.realpath(release),
                           lambda: f"converged on {expected}: app processes "
                                   f"{[str(p) for p in apps]} run in {cwd}, not {release}")

    def recover(self, mark: int, bound: float) -> None:
        """A supervisor stuck after a violation would turn every later step into the same
        violation: do what an operator would, kill it and start another, and go on."""
        run = self.run
        assert run is not None
        self.say(f"  recovering: kill -9 supervisor {run.pid} and start another")
        self.recoveries += 1
        self.end_of_life(run)
        run.kill()
        self.start_supervisor([Stale(p.pid, p.ticks, self.kind_of_pid(p.pid))
                               for p in self.app_processes()])
        converged, _, why = self.settle(mark, bound)
        if not converged:
            self.say(f"  recovery did not converge either: {why}")

    def check_stale(self) -> None:
        """After a supervisor was killed: the app it left is stopped by the next one, which
        says so in its log (child.stale_found)."""
        for left in self.stale:
            self.checker.check("stale_child_stopped", not alive(left.pid, left.ticks),
                               f"app {left.pid}, left by a killed supervisor, still runs")
            if left.handled_by_soak or left.stopping or left.commit_kind != "good":
                continue  # stopped by the soak, or an app that may have died alone
            # The supervisor started next (the soak may have replaced it since, see recover).
            self.checker.check(
                "stale_child_stopped",
                any(r["event"] == "child.stale_found" and r.get("pid") == left.pid
                    for r in self.log.since(left.next_run[1])),
                f"app {left.pid} outlived a killed supervisor, but supervisor "
                f"{left.next_run[0]} never logged child.stale_found for it")
        self.stale = []

    def check_escaped(self, run: SupervisorRun) -> None:
        """Converged: a grandchild that escaped its app's group (ESCAPE_PREFIX) lives only as
        long as the app that started it. One that a killed supervisor's app left is beyond any
        supervisor's reach (it lost the subreaper that held it): the soak kills it, as systemd
        does with what is left in a unit's cgroup, and counts it."""
        self.kill_escaped(before=run.ticks)
        apps = {p.pid for p in self.app_processes()}
        for process in token_processes(self.world.marker):
            if ESCAPED not in process.argv:
                continue
            app = int(process.argv[-1])
            self.checker.check("no_escaped", app in apps,
                               lambda process=process, app=app:
                               f"{process} escaped from app {app}, which is gone, and still runs")

    def kill_escaped(self, before: int | None) -> None:
        """Escaped grandchildren a killed supervisor held (all, or those older than the start
        time `before`): no supervisor can reach them any more, and one may hold the socket the
        next supervisor binds. Killed, as systemd does with what is left in a unit's cgroup
        before it starts the unit again, and counted."""
        for process in token_processes(self.world.marker):
            if (ESCAPED in process.argv and (before is None or process.ticks < before)
                    and signal_verified(process.pid, process.ticks, signal.SIGKILL)):
                self.escaped_after_kill += 1

    def check_orphans(self, run: SupervisorRun) -> None:
        """Nothing started by an earlier, killed supervisor may linger (its git or build may
        finish by itself, within ORPHAN_GRACE)."""
        deadline = time.monotonic() + ORPHAN_GRACE
        while True:
            older = [p for p in token_processes(self.world.marker)
                     if p.pid != run.pid and run.ticks is not None and p.ticks < run.ticks]
            if not older or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.checker.check("no_orphans", not older,
                           lambda: "processes of an earlier supervisor still run: "
                                   + "; ".join(map(str, older)))

    # -- the run ----------------------------------------------------------------------------

    def pick(self) -> Fault:
        enabled = [f for f in FAULTS
                   if (not self.options.faults or f.name in self.options.faults)
                   and f.name not in self.options.skip and f.needs(self)]
        if not enabled:
            enabled = [next(f for f in FAULTS if f.name == "push_good")]
        chosen = self.chooser.choices(enabled, [f.weight for f in enabled])[0]
        self.rng = random.Random(self.chooser.getrandbits(64))
        return chosen

    def say(self, text: str) -> None:
        if not self.options.quiet:
            with contextlib.suppress(OSError):
                print(text, flush=True)

    def go(self) -> None:
        self.log.start()
        self.sampler.start()
        started_at = time.monotonic()
        mark = self.log.mark()
        self.start_supervisor([])
        ok, elapsed, why = self.after_step("start", mark, self.options.settle_bound)
        if not ok:
            raise SoakError(f"the first start did not converge: {why}\n{self.log.tail()}")
        self.say(f"step 0 [{time.monotonic() - started_at:6.1f}s] start: serving "
                 f"{self.model.running} after {elapsed:.2f}s")
        failures_in_a_row = 0
        while True:
            if self.options.steps is not None and self.steps_done >= self.options.steps:
                break
            if (self.options.minutes is not None
                    and time.monotonic() - started_at > self.options.minutes * 60):
                break
            chosen = self.pick()
            self.checker.step = self.steps_done + 1
            mark, self.step_began = self.log.mark(), now()
            what = chosen.inject(self)
            self.injected[chosen.name] += 1
            self.steps_done += 1
            ok, elapsed, why = self.after_step(chosen.name, mark, self.options.settle_bound)
            state = f"converged in {elapsed:.2f}s" if ok else f"NOT CONVERGED ({why})"
            self.say(f"step {self.steps_done} [{time.monotonic() - started_at:6.1f}s] "
                     f"{chosen.name}: {what}; {state}")
            failures_in_a_row = 0 if ok else failures_in_a_row + 1
            if self.options.stop_on_violation and self.checker.violations:
                self.aborted = "stopped at the first violation (--stop-on-violation)"
                return
            if failures_in_a_row >= GIVE_UP_AFTER:
                self.aborted = f"{GIVE_UP_AFTER} steps in a row did not converge"
                break
        self.finish(started_at)

    def finish(self, started_at: float) -> None:
        """Faults stop: a last good commit must be serving within FINAL_BOUND; then a stop by
        SIGTERM must leave nothing behind."""
        self.checker.step = self.steps_done + 1
        mark, self.step_began = self.log.mark(), now()
        commit = self.push("good")
        bound = max(FINAL_BOUND, self.options.settle_bound)
        ok, elapsed, why = self.after_step("final push", mark, bound)
        self.final_converge = elapsed if ok else None
        self.say(f"final [{time.monotonic() - started_at:6.1f}s] pushed {commit}; "
                 + (f"serving it after {elapsed:.2f}s" if ok else f"NOT CONVERGED ({why})"))
        run = self.run
        assert run is not None
        self.end_of_life(run)
        mark = self.log.mark()
        os.kill(run.pid, signal.SIGTERM)
        try:
            code: int | None = run.proc.wait(STOP_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            code = None
        stopped = self.log.wait(lambda r: r["event"] == "supervisor.stopped", mark, 5.0)
        self.checker.check("clean_exit", code == 0 and stopped is not None,
                           lambda: f"SIGTERM: exit code {code}, supervisor.stopped "
                                   f"{'logged' if stopped else 'missing'}: {run.output_tail()}")
        self.check_leftovers()
        self.audit.run(final=True)

    def check_leftovers(self) -> None:
        """After the final stop nothing of the run may remain: no process with the token, no
        live process in any process group an app ever had."""
        self.sampler.stop()
        self.sampler.report()
        left = token_processes(self.world.marker)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = stat_fields(int(entry))
            if fields is None or fields[0] == "Z":
                continue
            pgid, ticks = int(fields[2]), int(fields[19])
            if (pgid in self.sampler.app_groups and ticks >= self.sampler.app_groups[pgid]
                    and all(p.pid != int(entry) for p in left)):
                left.append(Proc(int(entry), int(fields[1]), pgid, fields[0], ticks, ()))
        self.checker.check("no_leftovers", not left,
                           lambda: "still running after the supervisor stopped: "
                                   + "; ".join(map(str, left)))

    # -- cleaning up, whatever happened -------------------------------------------------

    def cleanup(self, polite: bool) -> None:
        for sock in list(self.open_clients):
            with contextlib.suppress(OSError):
                sock.close()
        if self._hanging is not None:
            self._hanging.close()
        with contextlib.suppress(Exception):
            self.world.bring_remote_back()
        with contextlib.suppress(Exception):
            self.world.set_app_remote_url(None)
        with contextlib.suppress(Exception):
            self.world.free_disk()
        for run in self.runs:
            run.close(polite)
        # Whatever is left with our token: ours, by construction; stopped by pidfd.
        for _ in range(3):
            left = token_processes(self.world.marker)
            if not left:
                break
            for process in left:
                signal_verified(process.pid, process.ticks, signal.SIGCONT)
                signal_verified(process.pid, process.ticks, signal.SIGKILL)
            time.sleep(0.1)
        self.sampler.stop()
        self.log.stop()


class LogAudit:
    """Checks over the event log, run after each step on the lines that came since: each start
    of the app has its reason, each stop for a deploy (and each start of an overlap) came after
    the drain, no stop came while the soak held a client the stats file counted, unless the
    drain timed out, a commit held back is not deployed again, and a rollback says why."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.checker = soak.checker
        self.next = 0
        self.by_deploy: dict[str, list[int]] = defaultdict(list)
        self.generation_start = 0
        self.started: set[int] = set()
        self.held: list[str] = []  # this supervisor's held commits, by its log, newest last
        self.rollbacks = 0  # release.rolling_back lines

    def in_gap(self, first_ts: str, last_ts: str | None = None) -> bool:
        """Whether the log may have lost lines between these two times (the disk was full)."""
        first, last = parse_timestamp(first_ts), parse_timestamp(last_ts or first_ts)
        return any(start - 0.5 <= last and first <= end for start, end in self.soak.gaps)

    def run(self, final: bool) -> None:
        records = self.soak.log.since(0)
        # Leave the last line for next time: the notes of a transition may not be read yet.
        upto = len(records) if final else max(self.next, len(records) - 1)
        for record in records[self.next:upto]:
            i = record["_i"]
            if record["event"] == "supervisor.started":
                self.generation_start, self.started = i, set()
                self.held = [record["failed"]] if record.get("failed") else []
            self.held_back(record)
            if record.get("deploy"):
                self.by_deploy[record["deploy"]].append(i)
            if record["event"] == "child.started":
                self.started.add(record.get("pid"))
                self.start_reason(records, i)
            elif record["event"] == "child.exited":
                if record.get("pid") in self.started:
                    self.checker.check("log_true", True)
                elif self.in_gap(records[self.generation_start]["ts"], record["ts"]):
                    self.checker.skip("log_true")  # its child.started may be lost
                else:
                    self.checker.check("log_true", False,
                                       f"child.exited for pid {record.get('pid')}, never "
                                       "started by this supervisor")
            if record["event"] == "drain.timed_out":
                self.drain_timeout_honest(records, i)
            for stop in actions_named(record, "stop_child"):
                self.stop_after_drain(records, i, stop)
            for start in actions_named(record, "start_child"):
                if str(start.get("reason", "")).endswith("(overlap)"):
                    self.stop_after_drain(records, i, start)
        self.next = upto

    def held_back(self, record: dict[str, Any]) -> None:
        """Rule 4: a commit whose deploy failed, that failed its probation or was rolled back
        by hand is not deployed again by this supervisor (it remembers the last HELD_KEPT);
        and every rollback has a reason."""
        event, held = record["event"], None
        if event == "deploy.failed":
            held = record.get("commit")
        elif event == "health.failed":
            self.checker.check("rollback_reason", bool(record.get("reason")) and isinstance(
                record.get("reason"), str), lambda: f"health.failed without a reason: {record}")
            if record.get("rollback_to") and record.get("rollback_to") != record.get("commit"):
                held = record.get("commit")
        elif event == "release.rollback_requested":
            held = record.get("from")
        elif event == "release.rolling_back":
            self.rollbacks += 1
            reason = record.get("reason")
            self.checker.check(
                "rollback_reason", isinstance(reason, str) and bool(reason.strip())
                and all(RELEASE_NAME.match(str(record.get(k))) for k in ("from", "to")),
                lambda: f"release.rolling_back without a reason, or from or to: {record}")
        elif event == "deploy.started":
            commit = record.get("commit")
            self.checker.check("held_not_redeployed", commit not in self.held,
                               lambda: f"deploy.started of {self.soak.describe(commit)} at "
                                       f"{record['ts']}, held back by this supervisor since "
                                       "its deploy failed")
        if held and (not self.held or self.held[-1] != held):
            self.held = [c for c in self.held if c != held][-(HELD_KEPT - 1):] + [held]

    def start_reason(self, records: list[dict[str, Any]], i: int) -> None:
        started = records[i]
        cause = next((r for r in reversed(records[self.generation_start:i]) if is_transition(r)),
                     None)
        if cause is None or self.in_gap(cause["ts"], started["ts"]):
            self.checker.skip("start_reason")
            return
        starts = actions_named(cause, "start_child")
        reason = starts[0].get("reason") if starts else None
        self.checker.check("start_reason",
                           bool(starts) and isinstance(reason, str) and bool(reason)
                           and starts[0].get("commit") == started.get("commit"),
                           lambda: f"child.started {started.get('pid')} at {started['ts']}: the "
                                   f"line before it ({cause['event']}) has {cause['actions']}")
        if isinstance(reason, str) and reason not in START_REASONS:
            self.soak.unknown_reasons[reason] += 1

    def drain_timeout_honest(self, records: list[dict[str, Any]], i: int) -> None:
        timed_out = records[i]
        waits = [records[j] for j in self.by_deploy.get(timed_out.get("deploy") or "", [])
                 if j < i and records[j]["event"] == "deploy.waiting_for_drain"]
        if not waits:
            self.checker.skip("drain_timeout_honest")
            return
        waited = parse_timestamp(timed_out["ts"]) - parse_timestamp(waits[0]["ts"])
        self.checker.check("drain_timeout_honest", waited >= DRAIN_TIMEOUT - 0.05,
                           f"drain.timed_out after {waited:.3f}s of waiting "
                           f"(drain.timeout {DRAIN_TIMEOUT}s), deploy {timed_out.get('deploy')}")

    def stop_after_drain(self, records: list[dict[str, Any]], i: int,
                         stop: dict[str, Any]) -> None:
        """`stop` is a stop_child action, or the start_child of an overlap (the old generation
        keeps serving, but the drain still comes first)."""
        record, reason = records[i], str(stop.get("reason"))
        if not (reason.startswith("deploy") or reason.startswith("restart requested")):
            return  # a shutdown, stop-child or kill: no drain is promised
        overlap = stop.get("action") == "start_child"
        timed = reason.endswith("(drain timed out)")
        if not overlap:
            self.client_held(record, stop, timed)
        deploy = record.get("deploy")
        if not deploy:
            self.checker.check("drain_before_stop", False,
                               f"stop_child ({reason}) at {record['ts']} outside a deploy")
            return
        mine = [records[j] for j in self.by_deploy[deploy] if j <= i]
        for follower in records[i + 1:]:
            if is_transition(follower) or follower.get("deploy") != deploy:
                break
            mine.append(follower)  # the decision notes written right after the stop's line
        if self.in_gap(mine[0]["ts"], record["ts"]):
            self.checker.skip("drain_before_stop")
            return
        marks = [r for r in mine if r["event"] in DRAIN_MARKS]
        stats = [r for r in mine if r["event"] == "stats.read" and r["_i"] <= i]
        last_mark = marks[-1]["event"] if marks else None
        if timed:
            ok = any(r["event"] == "drain.timed_out" for r in marks)
        elif overlap:
            values = stats[-1].get("values") if stats else None
            ok = any(r["event"] == "drain.timed_out" for r in marks) or (
                last_mark == "drain.satisfied" and drained(values))
        else:
            values = stats[-1].get("values") if stats else None
            ok = last_mark == "drain.satisfied" and drained(values)
        self.checker.check(
            "drain_before_stop", ok,
            lambda: f"stop_child ({reason}) at {record['ts']} in deploy {deploy}: drain marks "
                    f"{[r['event'] for r in marks]}, last stats read "
                    f"{stats[-1].get('values') if stats else None}")

    def client_held(self, record: dict[str, Any], stop: dict[str, Any], timed: bool) -> None:
        at = parse_timestamp(record["ts"])
        for hold in self.soak.holds:
            if hold.pid != stop.get("pid"):
                continue
            released = hold.released if hold.released is not None else float("inf")
            under = hold.counted + 0.05 < at < released - 0.05
            self.checker.check(
                "no_stop_under_client", not under or timed,
                f"stop_child ({stop.get('reason')}) of {hold.pid} at {record['ts']} while "
                f"{hold.clients} client(s) were connected and counted, drain not timed out")


def drained(values: object) -> bool:
    if not isinstance(values, dict):
        return False
    try:
        return float(values.get("n_clients", "x")) == 0
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Report and command line


def summarize(soak: Soak, seed: int, seconds: float) -> dict[str, Any]:
    checker = soak.checker
    longest = max(soak.converge_times, default=(0.0, 0, ""))
    summary: dict[str, Any] = {
        "seed": seed, "steps": soak.steps_done, "seconds": round(seconds, 1),
        "faults": dict(sorted(soak.injected.items())),
        "checks": dict(sorted(checker.checks.items())),
        "skipped": dict(sorted(checker.skipped.items())),
        "violations": [vars(v) for v in checker.violations],
        "violation_count": len(checker.violations),
        "longest_converge": {"seconds": round(longest[0], 3), "step": longest[1],
                             "fault": longest[2]},
        "final_converge": None if soak.final_converge is None else round(soak.final_converge, 3),
        "supervisors": soak.generations,
        "log_lines": soak.log.lines,
        "proc_scans": soak.sampler.scans,
        "unknown_start_reasons": dict(soak.unknown_reasons),
        "tmpfs": soak.world.had_tmpfs,
        "socket": soak.world.socket_handoff,
        "mode": soak.options.mode,
        "overlap": soak.options.overlap,
        "probe": soak.options.probe if soak.options.releases else None,
        "rollbacks": {"expected": soak.model.rollbacks, "logged": soak.audit.rollbacks},
        "rolled_back_elsewhere": soak.model.elsewhere,
        "aborted": soak.aborted,
        "recoveries": soak.recoveries,
        "escaped_after_kill": soak.escaped_after_kill,
        "cgroup": soak.world.cgroup is not None or soak.world.had_cgroup,
        "supervisor_processes": len(soak.runs),
    }
    return summary


def print_report(soak: Soak, summary: dict[str, Any]) -> None:
    checker, seed, seconds = soak.checker, summary["seed"], summary["seconds"]
    longest = summary["longest_converge"]
    print(f"\nsoak: seed {seed}, {soak.steps_done} steps in {seconds:.1f}s, "
          f"{len(soak.runs)} supervisor process(es), {soak.log.lines} log lines, "
          f"{soak.sampler.scans} scans of /proc")
    if soak.options.releases:
        print(f"release mode: {soak.options.probe} probe, "
              f"{'overlap' if soak.options.overlap else 'stop-start'}; automatic rollbacks: "
              f"{soak.model.rollbacks} expected by the model, {soak.audit.rollbacks} "
              "release.rolling_back lines")
    print("faults injected:")
    for name, count in sorted(soak.injected.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {count}")
    print("invariant checks (made / violated):")
    by_name = Counter(v.invariant for v in checker.violations)
    for name, count in sorted(checker.checks.items()):
        skipped = f" ({checker.skipped[name]} skipped)" if checker.skipped[name] else ""
        print(f"  {name:24} {count} / {by_name[name]}{skipped}")
    print(f"violations: {len(checker.violations)}")
    for violation in checker.violations:  # in full above, where each happened
        print(f"  step {violation.step} [{violation.invariant}] "
              f"{violation.detail.splitlines()[0][:300] if violation.detail else ''}")
    print(f"longest time to converge: {longest['seconds']:.2f}s (step {longest['step']}, "
          f"{longest['fault']})")
    if soak.final_converge is not None:
        print(f"final convergence: {soak.final_converge:.2f}s")
    for generation in soak.generations:
        if "pss_kb" in generation:
            (p0, p1), (s0, s1) = generation["pss_kb"], generation["steps"]
            (v0, v1), (f0, f1) = generation["private_kb"], generation["fds"]
            print(f"supervisor {generation['pid']}: PSS {p0 / 1024:.1f} -> {p1 / 1024:.1f} MB, "
                  f"private {v0 / 1024:.1f} -> {v1 / 1024:.1f} MB (steps {s0} -> {s1}); "
                  f"fds {f0} -> {f1}")
    if soak.unknown_reasons:
        print(f"start reasons not in docs/events.md: {dict(soak.unknown_reasons)}")
    for line in soak.model.elsewhere:
        print(f"rolled back to the newest good release, not to the one that served: {line}")
    if soak.escaped_after_kill:
        print(f"escaped grandchildren of apps whose supervisor was killed, killed by the soak: "
              f"{soak.escaped_after_kill}")
    if soak.recoveries:
        print(f"supervisors restarted by the soak after a step did not converge: "
              f"{soak.recoveries}")
    if soak.aborted:
        print(f"run ended early: {soak.aborted}")
    print(f"replay: {summary['replay']}")
    if "replay_first_violation" in summary:
        print(f"replay the first violation: {summary['replay_first_violation']}")


def parse_args(argv: list[str] | None) -> Options:
    names = [f.name for f in FAULTS]
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.soak",
        description="Chaos soak: random faults against a real supervisor, invariants checked "
                    "after every step (docs/soak.md).")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the fault sequence (default: random, printed)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="inject faults for this long (default: 5 unless --steps)")
    parser.add_argument("--steps", type=int, default=None, help="inject this many faults")
    parser.add_argument("--faults", default="", help=f"only these, comma-separated: {names}")
    parser.add_argument("--skip", default="", help="leave these faults out, comma-separated")
    parser.add_argument("--dir", type=Path, default=None,
                        help="make the run's directory in DIR (default: the temp directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's directory (it is kept anyway after a violation)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--no-tmpfs", action="store_true",
                        help="no small tmpfs, and so no disk-full fault")
    parser.add_argument("--no-socket", action="store_true", help="no [[socket]] in the config")
    parser.add_argument("--log-only-on-tmpfs", action="store_true",
                        help="keep app.state_dir off the tmpfs: only the event log fills up")
    parser.add_argument("--settle-bound", type=float, default=SETTLE_BOUND,
                        help=f"seconds a step may take to converge (default {SETTLE_BOUND:g})")
    parser.add_argument("--stop-on-violation", action="store_true",
                        help="end the run after the first step with a violation (no final "
                             "phase): the quickest way to replay a failure")
    parser.add_argument("--mode", choices=("in-place", "releases"), default="in-place",
                        help='deploy.mode: "releases" adds [deploy] and a [health] gate, '
                             "rollbacks, and the faults push_unhealthy and rollback_request")
    parser.add_argument("--overlap", action="store_true",
                        help='restart.style = "overlap" (needs --mode releases and the socket)')
    parser.add_argument("--probe", choices=("http", "notify"), default=None,
                        help="release mode's health probe: http on /up (default), or notify "
                             "(READY=1; the default, and the only choice, with --overlap)")
    parser.add_argument("--quiet", action="store_true", help="no line per step")
    args = parser.parse_args(argv)
    if args.overlap and (args.mode != "releases" or args.no_socket):
        parser.error("--overlap needs --mode releases and the socket (no --no-socket)")
    if args.overlap and args.probe == "http":
        parser.error("--overlap needs --probe notify: an http probe of the shared socket would "
                     "be answered by the old generation")
    if args.probe is not None and args.mode != "releases":
        parser.error("--probe needs --mode releases")
    probe = args.probe or ("notify" if args.overlap else "http")
    chosen = tuple(n for n in args.faults.split(",") if n)
    skipped = tuple(n for n in args.skip.split(",") if n)
    unknown = [n for n in chosen + skipped if n not in names]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {names}")
    minutes = args.minutes
    if minutes is None and args.steps is None:
        minutes = 5.0
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    return Options(seed=seed, minutes=minutes, steps=args.steps, faults=chosen, skip=skipped,
                   directory=args.dir, keep=args.keep, json_path=args.json,
                   tmpfs=not args.no_tmpfs, socket_handoff=not args.no_socket,
                   state_on_tmpfs=not args.log_only_on_tmpfs, quiet=args.quiet,
                   settle_bound=args.settle_bound, stop_on_violation=args.stop_on_violation,
                   mode=args.mode, overlap=args.overlap, probe=probe)


def replay_command(options: Options, steps: int) -> str:
    words = ["python", "-m", "tests.soak.soak", "--seed", str(options.seed), "--steps", str(steps)]
    if options.faults:
        words += ["--faults", ",".join(options.faults)]
    if options.skip:
        words += ["--skip", ",".join(options.skip)]
    if options.releases:
        words += ["--mode", "releases"] + (["--overlap"] if options.overlap else [])
        if options.probe != ("notify" if options.overlap else "http"):
            words += ["--probe", options.probe]
    for flag, on in (("--no-tmpfs", not options.tmpfs), ("--no-socket", not options.socket_handoff),
                     ("--log-only-on-tmpfs", not options.state_on_tmpfs)):
        if on:
            words.append(flag)
    if options.settle_bound != SETTLE_BOUND:
        words += ["--settle-bound", f"{options.settle_bound:g}"]
    return ".venv/bin/" + shlex.join(words)


def keep_logs(soak: Soak, root: Path) -> None:
    """Copy the event log off the tmpfs before it is unmounted."""
    target = root / "logs"
    target.mkdir(exist_ok=True)
    for path in soak.world.log_file.parent.glob(soak.world.log_file.name + "*"):
        with contextlib.suppress(OSError):
            shutil.copy(path, target / path.name)


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM ends a run the way Ctrl-C does: through the cleanup."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.directory is not None:
        options.directory.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="soak-", dir=options.directory))
    budget = [f"{options.steps} steps"] if options.steps is not None else []
    budget += [f"{options.minutes:g} minutes"] if options.minutes else []
    print(f"soak: seed {options.seed} (replay with --seed {options.seed}); "
          f"{' or '.join(budget)}; directory {root}", flush=True)
    signal.signal(signal.SIGTERM, interrupted)
    soak: Soak | None = None
    started = time.monotonic()
    code = 0
    try:
        soak = Soak(options, root)
        soak.say(f"soak: tmpfs {'yes' if soak.world.tmpfs else 'no'}, socket "
                 f"{'yes' if soak.world.socket_handoff else 'no'}, state dir "
                 f"{soak.world.state_dir}, log {soak.world.log_file}")
        if options.releases:
            soak.say(f"soak: release mode, deploy.dir {soak.world.deploy_dir}, "
                     f"{options.probe} probe, "
                     f"{'overlap' if options.overlap else 'stop-start'}")
        soak.go()
    except KeyboardInterrupt:
        code = 130
    except (SoakError, OSError, subprocess.SubprocessError):
        with contextlib.suppress(OSError):
            traceback.print_exc()
        code = 2
    finally:
        # Nothing may stop the cleanup half-way: not a second Ctrl-C, not a closed stdout.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if soak is not None:
            soak.cleanup(polite=code == 0 and soak.aborted is None)
    if soak is None:
        shutil.rmtree(root, ignore_errors=True)
        return code or 2
    if soak.checker.violations and code == 0:
        code = 1
    keep = options.keep or code != 0
    if keep:
        keep_logs(soak, root)
    soak.world.unmount()
    soak.world.remove_cgroup()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    summary = summarize(soak, options.seed, time.monotonic() - started)
    summary["replay"] = replay_command(options, soak.steps_done)
    if soak.checker.violations:
        first = max(1, soak.checker.violations[0].step)
        summary["replay_first_violation"] = (replay_command(options, min(first, soak.steps_done))
                                             + " --stop-on-violation")
    summary["exit_code"] = code
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    with contextlib.suppress(OSError):  # a reader that went away (| head) changes nothing
        if code == 130:
            print("soak: interrupted")
        print_report(soak, summary)
        if keep:
            print(f"soak: kept {root} (event log in {root / 'logs'})")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
