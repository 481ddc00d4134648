"""Release mode against in place, under load (issue 3, "Done when"): how long the example app is
unavailable during a good deploy in each mode, and how long a bad release takes to be rolled
back, seen from outside by a separate load process, with the same app, on the same machine, in
one run:

    in-place    the default: drain, move the tree, build in it, restart
    releases    [deploy] mode = "releases": check out and build releases/<commit> beside the
                live release, drain, switch `current`, restart, then probation with an HTTP
                probe on /up (every 50 ms); a release that fails it is rolled back

In both modes the app binds its own port (PORT, no [[socket]]), the build is the same
(`sleep 1 && sh build.sh`), and so is the [drain] (`n_clients == 0` on the app's stats file).
A deploy is: commit a new VERSION, push, `kill -USR1` the supervisor (poll_interval is long),
wait until the deploy is over (release mode: `health.passed` for the commit; in place:
`child.started` for it) and the load client has had an answer from the new version.

The load client is this file run with --client in its own process: every 5 ms it opens a new
connection to 127.0.0.1:PORT and sends `GET /` (`Connection: close`), without waiting for the
requests before it, and writes one line per request: when it was sent, when it ended, how
(ok, refused, reset, timeout, EOF, http, other) and the version that answered. Its clock is the
wall clock, the one the supervisor's `ts` stamps use, so log lines and requests can be compared.

Rollback (release mode only, same supervisor, after the good deploys): a commit whose app exits
at start (a CRASH file: `health.failed` when it exits) and one whose /up answers 503 (an
UNHEALTHY file: `health.failed` at the deadline, health.timeout = 2 s), each followed by a good
commit that puts things right. Rollback time: from the `health.failed` line's `ts` to the first
answer from the old version after it, as the load client saw it.

    python3 bench/releases.py                      # 10 deploys per mode, 5 of each bad kind
    python3 bench/releases.py --deploys 3 --bad 2  # a quick run

Writes bench/results/releases.md and prints the same. Needs `git`. Every process started here
runs in its own session and is stopped by pid (checked against its start time); nothing is found
or killed by name; all traffic is on 127.0.0.1; every wait is bounded, and a watchdog ends the
run after --max-minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import platform
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from harness import (
    BENCH,
    REPO,
    STEP_WAIT,
    BenchError,
    DeployWorld,
    Owned,
    Supervisor,
    log,
    machine,
    run,
    run_benchmark,
    wait_answer,
    write_config,
)

RESULTS = BENCH / "results" / "releases.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
KINDS = ("refused", "reset", "timeout", "EOF", "http", "other")
MODES = ("in-place", "releases")
BAD_KINDS = ("crash", "unhealthy")
WAIT = STEP_WAIT


# --- the load client (runs in its own process: --client) -----------------------------------------

class _Request:
    __slots__ = ("buffer", "deadline", "reading", "sent", "sock")

    def __init__(self, sock: socket.socket, sent: float, deadline: float) -> None:
        self.sock, self.sent, self.deadline = sock, sent, deadline
        self.reading = False
        self.buffer = b""


def _error_kind(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return "reset"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return "other"


def _answer(buffer: bytes) -> tuple[str, str] | None:
    """(kind, version) once `buffer` holds a whole answer, else None."""
    head, sep, body = buffer.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            with contextlib.suppress(ValueError):
                length = int(value.strip())
    if len(body) < length:
        return None
    status = lines[0].split()
    if len(status) < 2 or status[1] != "200":
        return "http", "-"
    text = body[:length].decode("utf-8", "replace").strip()
    return "ok", text.removeprefix("hello from ").replace(" ", "_") or "-"


def client_main(port: int, interval: float, timeout: float) -> int:
    """GET / on a new connection every `interval` seconds, never waiting for earlier requests;
    one line per request on stdout: `SENT DONE KIND VERSION` (wall clock, seconds). Ends on
    SIGTERM or SIGINT, or when stdin reaches EOF (the parent is gone)."""
    stopping = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
               f"\r\n").encode()
    address = ("127.0.0.1", port)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, None)
    live: dict[int, _Request] = {}
    lines: list[str] = []

    def done(req: _Request, kind: str, version: str = "-") -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(req.sock)
        live.pop(req.sock.fileno(), None)
        req.sock.close()
        lines.append(f"{req.sent:.6f} {time.time():.6f} {kind} {version}\n")

    def launch() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        req = _Request(sock, time.time(), time.monotonic() + timeout)
        code = sock.connect_ex(address)
        live[sock.fileno()] = req
        if code in (0, errno.EINPROGRESS):
            selector.register(sock, selectors.EVENT_WRITE, req)
        else:
            done(req, _error_kind(code))

    def step(req: _Request) -> None:
        if not req.reading:
            code = req.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                done(req, _error_kind(code))
                return
            try:
                req.sock.send(request)
            except OSError as error:
                done(req, _error_kind(error.errno or 0))
                return
            req.reading = True
            selector.modify(req.sock, selectors.EVENT_READ, req)
            return
        try:
            data = req.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as error:
            done(req, _error_kind(error.errno or 0))
            return
        req.buffer += data
        answer = _answer(req.buffer)
        if answer is not None:
            done(req, *answer)
        elif not data:
            done(req, "EOF")

    next_tick = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if now >= next_tick:
            if now - next_tick > 0.1:  # starved of CPU for a while: no burst to catch up
                next_tick = now
            launch()
            next_tick += interval
        wait = next_tick - time.monotonic()
        if live:
            wait = min(wait, min(r.deadline for r in live.values()) - time.monotonic())
        for key, _mask in selector.select(max(0.0, wait)):
            if key.data is None:
                if not os.read(0, 4096):
                    stopping = True
            else:
                step(key.data)
        now = time.monotonic()
        for req in [r for r in live.values() if r.deadline <= now]:
            done(req, "timeout")
        if lines:
            os.write(1, "".join(lines).encode())
            lines.clear()
    for req in list(live.values()):  # in flight at the end: not counted
        req.sock.close()
    return 0


def supervisor_python() -> str:
    """The project's venv if there is one (it has watchfiles, the stats watcher's fallback)."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def stops(record: dict[str, Any]) -> bool:
    return any(a.get("action") == "stop_child" for a in record.get("actions") or ())


# --- the load client, from the parent's side -----------------------------------------------------

class Sample(NamedTuple):
    sent: float
    done: float
    kind: str
    version: str


class LoadClient:
    """This file with --client, in its own session; its lines read as they come."""

    def __init__(self, port: int, args: argparse.Namespace, owned: Owned, tmp: Path) -> None:
        self.owned = owned
        self.samples: list[Sample] = []
        self.cond = threading.Condition()
        self.stderr = open(tmp / "client.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", str(port),
             "--interval", str(args.interval), "--request-timeout", str(args.request_timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            start_new_session=True)
        owned.adopt(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            parts = raw.decode("ascii", "replace").split()
            if len(parts) != 4:
                continue
            with contextlib.suppress(ValueError):
                sample = Sample(float(parts[0]), float(parts[1]), parts[2], parts[3])
                with self.cond:
                    self.samples.append(sample)
                    self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.samples)

    def wait_ok(self, version: str | None, after: float, start: int = 0,
                timeout: float = WAIT) -> Sample:
        """The first answer (from `version`, or any) that ended after `after` (wall clock)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for sample in self.samples[start:]:
                    if sample.kind == "ok" and sample.done >= after and (
                            version is None or sample.version == version):
                        return sample
                start = len(self.samples)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BenchError(f"the load client saw no answer from version {version} "
                                     f"within {timeout}s")
                self.cond.wait(left)

    def stop(self) -> list[Sample]:
        if self.proc.poll() is None:
            self.owned.signal(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.owned.signal(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        time.sleep(0.2)  # the reader takes the last lines
        self.stderr.close()
        with self.cond:
            return sorted(self.samples)


# --- the config --------------------------------------------------------------------------------

def config(world: DeployWorld, mode: str, args: argparse.Namespace) -> Path:
    tmp = world.tmp
    sections: list[tuple[str, dict[str, Any]]] = [
        ("[app]", {"name": "releases-bench", "command": [sys.executable, "server.py"],
                   "env": {"PORT": str(world.port), "STATS_FILE": str(world.stats)},
                   "stop_timeout": "5s", "state_dir": str(tmp / "state")}),
        ("[git]", {"repo": str(world.app), "poll_interval": "1h", "timeout": "20s"}),
        ("[build]", {"command": build_command(args), "timeout": "30s"}),
        ("[drain]", {"stats_file": str(world.stats), "until": "n_clients == 0",
                     "timeout": "10s"}),
        ("[restart]", {"backoff_min": "100ms", "backoff_max": "1s"}),
        ("[log]", {"format": "json"}),
    ]
    if mode == "releases":
        sections += [
            ("[deploy]", {"mode": "releases", "dir": str(tmp / "deploy"), "keep": 3}),
            ("[health]", {"http": f"http://127.0.0.1:{world.port}/up", "interval": "50ms",
                          "grace": args.grace, "timeout": args.health_timeout}),
        ]
    return write_config(tmp / "supervisor.toml", sections)


def build_command(args: argparse.Namespace) -> str:
    return f"sleep {args.build_seconds:g} && sh build.sh"


# --- deploys -------------------------------------------------------------------------------------

@dataclass
class Deploy:
    """One good deploy; times are wall clock (seconds since the epoch)."""

    version: str
    pushed: float  # USR1 sent, right after the push
    finished: float  # health.passed (releases) or child.started (in place), by the log
    answered: float  # the load client's first answer from the new version
    build: tuple[float, float] | None = None  # build.started, build.succeeded
    stop_asked: float | None = None  # the line whose actions stop the old app
    old_exited: float | None = None
    new_started: float | None = None
    drain: float | None = None  # deploy.waiting_for_drain to drain.satisfied
    phases: tuple[str, ...] = ()  # the phases it went through, from the log's before/after
    end: float = 0.0  # the end of its window: just before the next push


@dataclass
class BadDeploy:
    kind: str
    version: str  # of the bad release
    old: str  # the version rolled back to
    pushed: float
    detected: float  # health.failed's ts
    old_started: float  # child.started of the old release, by the log
    old_passed: float  # health.passed of the old release, by the log
    back: float  # the load client's first answer from the old version after `detected`
    reason: str = ""
    end: float = 0.0


@dataclass
class Result:
    mode: str
    deploys: list[Deploy] = field(default_factory=list)
    bad: list[BadDeploy] = field(default_factory=list)
    fixes: list[Deploy] = field(default_factory=list)  # the good commit after each bad one
    samples: list[Sample] = field(default_factory=list)
    began: float = 0.0  # load client running, before the first deploy
    ended: float = 0.0
    error: str | None = None


def good_deploy(mode: str, world: DeployWorld, sup: Supervisor, client: LoadClient,
                extra: dict[str, str | None] | None = None) -> Deploy:
    version, commit = world.release(extra)
    mark, seen = sup.mark(), client.mark()
    pushed = world.push(sup)
    is_new: Callable[[dict[str, Any]], bool] = lambda r: r.get("commit") == commit  # noqa: E731
    started = sup.wait_for("child.started", WAIT, mark, is_new)
    finished = (sup.wait_for("health.passed", WAIT, started["_i"], is_new)
                if mode == "releases" else started)
    answered = client.wait_ok(version, pushed, seen)
    deploy = Deploy(version, pushed, finished["_ts"], answered.done, new_started=started["_ts"])
    building = sup.first(mark, lambda r: r["event"] == "build.started" and is_new(r))
    built = sup.first(mark, lambda r: r["event"] == "build.succeeded" and is_new(r))
    if building and built:
        deploy.build = (building["_ts"], built["_ts"])
    deploy.phases = sup.phases(mark, finished["_i"])
    waiting = sup.first(mark, lambda r: r["event"] == "deploy.waiting_for_drain")
    satisfied = sup.first(mark, lambda r: r["event"] == "drain.satisfied")
    if waiting and satisfied and satisfied["_i"] <= finished["_i"]:
        deploy.drain = satisfied["_ts"] - waiting["_ts"]
    stop = sup.first(mark, stops)
    if stop is not None:
        deploy.stop_asked = stop["_ts"]
        exited = sup.first(stop["_i"], lambda r: r["event"] == "child.exited")
        deploy.old_exited = exited["_ts"] if exited else None
    return deploy


def bad_deploy(kind: str, world: DeployWorld, sup: Supervisor, client: LoadClient,
               old: tuple[str, str]) -> BadDeploy:
    old_version, old_commit = old
    marker = "CRASH" if kind == "crash" else "UNHEALTHY"
    version, commit = world.release({marker: "on purpose\n"})
    mark, seen = sup.mark(), client.mark()
    pushed = world.push(sup)
    failed = sup.wait_for("health.failed", WAIT, mark, lambda r: r.get("commit") == commit)
    if failed.get("rollback_to") != old_commit:
        raise BenchError(f"health.failed rolls back to {failed.get('rollback_to')}, "
                         f"not {old_commit}")
    is_old: Callable[[dict[str, Any]], bool] = (  # noqa: E731
        lambda r: r.get("commit") == old_commit)
    started = sup.wait_for("child.started", WAIT, failed["_i"], is_old)
    passed = sup.wait_for("health.passed", WAIT, started["_i"], is_old)
    back = client.wait_ok(old_version, failed["_ts"], seen)
    return BadDeploy(kind, version, old_version, pushed, failed["_ts"], started["_ts"],
                     passed["_ts"], back.done, reason=str(failed.get("reason", "")))


def measure(mode: str, args: argparse.Namespace, owned: Owned) -> Result:
    result = Result(mode)
    tmp = Path(tempfile.mkdtemp(prefix=f"releases-{mode}-"))
    sup = client = None
    try:
        world = DeployWorld(tmp)
        sup = Supervisor(config(world, mode, args), tmp, owned, python=supervisor_python())
        started = sup.wait_for("child.started", WAIT)
        if mode == "releases":
            sup.wait_for("health.passed", WAIT, started["_i"])
        wait_answer(world.port, "hello from 1", WAIT)
        client = LoadClient(world.port, args, owned, tmp)
        result.began = client.wait_ok("1", 0, 0, 10).sent
        time.sleep(1.0)  # the load settles before the first deploy
        log(f"{mode}: serving on 127.0.0.1:{world.port}; {args.deploys} deploys under load")
        for _ in range(args.deploys):
            deploy = good_deploy(mode, world, sup, client)
            time.sleep(args.gap)
            deploy.end = time.time()
            result.deploys.append(deploy)
        if mode == "releases":
            last = (result.deploys[-1].version, run(["git", "rev-parse", "HEAD"], world.dev))
            for kind in BAD_KINDS:
                log(f"{mode}: {args.bad} bad releases ({kind}), each followed by a good one")
                for _ in range(args.bad):
                    bad = bad_deploy(kind, world, sup, client, last)
                    time.sleep(args.gap)
                    bad.end = time.time()
                    result.bad.append(bad)
                    fix = good_deploy(mode, world, sup, client,
                                      {"CRASH": None, "UNHEALTHY": None})
                    time.sleep(args.gap)
                    fix.end = time.time()
                    result.fixes.append(fix)
                    last = (fix.version, run(["git", "rev-parse", "HEAD"], world.dev))
        result.ended = time.time()
    except BenchError as error:
        result.error = str(error)
        log(f"{mode}: FAILED: {error}")
    finally:
        if client is not None:
            result.samples = client.stop()
        if sup is not None:
            sup.stop()
        leftovers = owned.kill_leftovers()
        if leftovers:
            log(f"{mode}: killed leftover processes {leftovers}")
        shutil.rmtree(tmp, ignore_errors=True)
    if not result.ended:
        result.ended = time.time()
    return result


# --- analysis ------------------------------------------------------------------------------------

@dataclass
class Window:
    """The requests sent in [start, end): failures by kind and runs of consecutive failures."""

    requests: int = 0
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    runs: list[float] = field(default_factory=list)  # seconds each run lasted

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    @property
    def longest(self) -> float:
        return max(self.runs, default=0.0)


def window(samples: list[Sample], start: float, end: float) -> Window:
    """A run lasts from its first failed request's sending to the sending of the first request
    that succeeded after it (or, at the window's end, its last failure's end)."""
    found = Window()
    run_from = run_last = None
    for sample in samples:
        if sample.sent < start:
            continue
        if sample.sent >= end:
            break
        found.requests += 1
        if sample.kind == "ok":
            if run_from is not None:
                found.runs.append(sample.sent - run_from)
                run_from = None
            continue
        found.failed[sample.kind if sample.kind in found.failed else "other"] += 1
        if run_from is None:
            run_from = sample.sent
        run_last = sample.done
    if run_from is not None and run_last is not None:
        found.runs.append(run_last - run_from)
    return found


def merged(windows: list[Window]) -> Window:
    total = Window()
    for one in windows:
        total.requests += one.requests
        for kind, count in one.failed.items():
            total.failed[kind] += count
        total.runs += one.runs
    return total


def deploy_windows(result: Result) -> list[Window]:
    return [window(result.samples, d.pushed, d.end) for d in result.deploys]


def outside(result: Result) -> Window:
    """Requests sent while no deploy ran: before the first, and in the gaps none covers."""
    spans = sorted([(d.pushed, d.end) for d in result.deploys + result.fixes]
                   + [(b.pushed, b.end) for b in result.bad])
    total, cursor = [], result.began
    for start, end in spans:
        total.append(window(result.samples, cursor, start))
        cursor = max(cursor, end)
    total.append(window(result.samples, cursor, result.ended))
    return merged(total)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def med_max(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{ms(statistics.median(values))} / {ms(max(values))}"


def med(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return ms(statistics.median(present)) if present else "-"


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def served_by(samples: list[Sample], version: str) -> tuple[int, float | None]:
    """How many answers came from `version`, and from its first answer to its last."""
    answers = [s for s in samples if s.kind == "ok" and s.version == version]
    if not answers:
        return 0, None
    return len(answers), answers[-1].done - answers[0].done


# --- the report ----------------------------------------------------------------------------------

def versions() -> str:
    """The Pythons, git, the load and the tree measured, after the machine()."""
    load = ""
    with contextlib.suppress(OSError):
        load = f"; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    git = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = "; " + subprocess.run(["git", "--version"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        if commit and changed.strip():
            commit += f" with uncommitted changes to {len(changed.splitlines())} files"
    return (f"Python {platform.python_version()} (the app and the load client: "
            f"{sys.executable}; the supervisor: {supervisor_python()}){git}{load}; "
            f"this tree at {commit or 'unknown commit'}")


def report(results: list[Result], args: argparse.Namespace, elapsed: float) -> str:
    by_mode = {r.mode: r for r in results}
    command = shlex.join(["python3", "bench/releases.py", *sys.argv[1:]])
    rate = 1 / args.interval
    lines = [
        "# Release mode against in place: unavailability and rollback (issue 3)",
        "",
        f"`{command}` · {time.strftime('%Y-%m-%d %H:%M')} · run time {elapsed:.0f} s",
        "",
        f"Machine: {machine()}; {versions()}.",
        "",
        f"Load: a separate process opens a new connection every {args.interval * 1000:g} ms"
        f" (≈{rate:.0f} requests/s offered, each on its own connection, `Connection: close`,"
        f" timeout {args.request_timeout:g} s) and sends `GET /` to the example app on"
        f" 127.0.0.1; it never waits for earlier requests. Both modes: the app binds its own"
        f" port (no `[[socket]]`), build `{build_command(args)}`, `[drain]` until"
        f" `n_clients == 0`, START_DELAY 0. Release mode: `[health]` http on /up every 50 ms,"
        f" grace {args.grace}, timeout {args.health_timeout}. Deploys one after another, each"
        f" {args.gap:g} s after the one before is over.",
        "",
        "## 1. A good deploy",
        "",
        "| mode | deploys | requests during deploys | failed (refused / reset / timeout / EOF"
        " / http / other) | longest failure window per deploy: median / max | push to new"
        " version answering: median / max |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for mode in MODES:
        result = by_mode.get(mode)
        if result is None:
            continue
        windows = deploy_windows(result)
        total = merged(windows)
        kinds = " / ".join(str(total.failed[k]) for k in KINDS)
        lines.append(
            f"| {mode} | {len(result.deploys)} | {total.requests} | **{total.failures}**"
            f" ({kinds}) | **{med_max([w.longest for w in windows])}** |"
            f" {med_max([d.answered - d.pushed for d in result.deploys])} |")
    lines += [
        "",
        "Where the time goes (medians; from the supervisor's log, `ts`, except the last column"
        " but one, which is the load client's):",
        "",
        "| mode | build, old app serving | failed requests during the builds | drain wait"
        " | stop asked to old app exited | old exited to new started | new started to answering"
        " | push to deploy over (health.passed / child.started) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        result = by_mode.get(mode)
        if result is None:
            continue
        during = sum(window(result.samples, *d.build).failures for d in result.deploys
                     if d.build)
        lines.append(
            f"| {mode} | {med([diff(*d.build) if d.build else None for d in result.deploys])}"
            f" | {during} | {med([d.drain for d in result.deploys])}"
            f" | {med([diff(d.stop_asked, d.old_exited) for d in result.deploys])}"
            f" | {med([diff(d.old_exited, d.new_started) for d in result.deploys])}"
            f" | {med([diff(d.new_started, d.answered) for d in result.deploys])}"
            f" | {med([d.finished - d.pushed for d in result.deploys])} |")
    lines += ["", "The phases each deploy went through (the log's `before` and `after`):", ""]
    for mode in MODES:
        result = by_mode.get(mode)
        if result is None or not result.deploys:
            continue
        paths = Counter(d.phases for d in result.deploys).most_common()
        lines.append(f"- {mode}: " + "; ".join(
            f"{count} of {len(result.deploys)} `{' -> '.join(path)}`" for path, count in paths))
    releases = by_mode.get("releases")
    if releases is not None and releases.bad:
        lines += [
            "",
            "## 2. A bad release, rolled back (release mode)",
            "",
            "| bad release | n | push to detected (health.failed) | detected to old release"
            " answering: median / max | detected to old release started (log) | outage per"
            " bad deploy (sum of failure windows): median / max | failed requests per bad"
            " deploy: median | the bad release answered GET / for: median |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in BAD_KINDS:
            bads = [b for b in releases.bad if b.kind == kind]
            if not bads:
                continue
            windows = [window(releases.samples, b.pushed, b.end) for b in bads]
            served = [served_by(window_samples(releases.samples, b.pushed, b.end), b.version)
                      for b in bads]
            name = ("exits at start (CRASH)" if kind == "crash"
                    else f"/up answers 503 (UNHEALTHY), deadline {args.health_timeout}")
            lines.append(
                f"| {name} | {len(bads)} | {med([b.detected - b.pushed for b in bads])}"
                f" | **{med_max([b.back - b.detected for b in bads])}**"
                f" | {med([b.old_started - b.detected for b in bads])}"
                f" | **{med_max([sum(w.runs) for w in windows])}**"
                f" | {statistics.median([w.failures for w in windows]):g}"
                f" | {med([s[1] if s[0] else 0.0 for s in served])} |")
        fixes = [window(releases.samples, f.pushed, f.end) for f in releases.fixes]
        if fixes:
            lines += [
                "",
                f"The {len(fixes)} good commits pushed after the bad ones (each a deploy from"
                f" the release rolled back to): longest failure window median / max"
                f" {med_max([w.longest for w in fixes])}, "
                f"{merged(fixes).failures} failed requests in all.",
            ]
    lines += ["", "## Notes", ""]
    lines += notes(results, args)
    lines.append("")
    return "\n".join(lines)


def window_samples(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.sent < end]


def notes(results: list[Result], args: argparse.Namespace) -> list[str]:
    by_mode = {r.mode: r for r in results}
    out = [
        "- A failure window is a run of consecutive failed requests (in the order they were"
        " sent): from the sending of its first to the sending of the first request that"
        " succeeded after it, so it is exact to about one request interval"
        f" ({args.interval * 1000:g} ms). A deploy's window of requests runs from its push to"
        " just before the next push.",
        "- \"Push\" is the moment the supervisor was sent SIGUSR1, right after `git push`:"
        " push to answering includes the fetch, the checkout, the build"
        f" ({args.build_seconds:g} s of sleep), the drain and the restart.",
        "- Rollback: \"detected\" is the `ts` of the `health.failed` line (millisecond stamps,"
        " wall clock); \"old release answering\" is when the load client's first request"
        " answered by the old version after it ended (the same clock). For the crash, the app"
        " exits at start and the failure is known when it exits; for the 503, only at"
        f" health.timeout ({args.health_timeout}) after the start. Meanwhile the unhealthy"
        " release answers `GET /` with 200 and its own version: that time is in the last"
        " column, and is not counted as an outage.",
    ]
    inplace, rel = by_mode.get("in-place"), by_mode.get("releases")
    if inplace and rel and inplace.deploys and rel.deploys:
        a = statistics.median([w.longest for w in deploy_windows(inplace)])
        b = statistics.median([w.longest for w in deploy_windows(rel)])
        builds = [sum(window(r.samples, *d.build).failures for d in r.deploys if d.build)
                  for r in (inplace, rel)]
        similar = abs(a - b) <= max(0.3 * max(a, b), 2 * args.interval)
        out.append(
            f"- Unavailability during a good deploy: median {ms(a)} in place, {ms(b)} in"
            f" release mode: {'about the same' if similar else 'not the same'}. In both modes"
            f" the old app keeps serving during the build ({builds[0]} and {builds[1]} failed"
            " requests during the builds), because in place too the supervisor builds before"
            " it stops the old app (`draining -> updating -> building -> restarting`; release"
            " mode: `updating -> building -> draining -> restarting`). What users lose is the"
            " restart in both: the old app stops, then the new one starts and binds the port"
            " (the \"where the time goes\" table). Release mode does not shorten that window"
            " without a socket handoff; what it changes is that the build never touches the"
            " files the live app runs from, and that a bad release is rolled back (part 2).")
    for result in results:
        other = outside(result)
        if other.failures:
            out.append(f"- {result.mode}: {other.failures} of {other.requests} requests sent"
                       " outside any deploy failed: "
                       + ", ".join(f"{k} {v}" for k, v in other.failed.items() if v) + ".")
        elapsed = (result.ended - result.began) if result.began else 0
        if elapsed > 0:
            out.append(f"- {result.mode}: the load client sent {len(result.samples)} requests"
                       f" in {elapsed:.0f} s ({len(result.samples) / elapsed:.0f}/s of"
                       f" {1 / args.interval:.0f}/s offered).")
        if result.error:
            out.append(f"- {result.mode}: **error**: `{result.error.splitlines()[0]}`")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=10, help="good deploys per mode")
    parser.add_argument("--bad", type=int, default=5, help="bad releases of each kind")
    parser.add_argument("--interval", type=float, default=0.005,
                        help="seconds between the load client's requests (default 0.005)")
    parser.add_argument("--request-timeout", type=float, default=1.0,
                        help="the load client's timeout per request, seconds")
    parser.add_argument("--build-seconds", type=float, default=1.0,
                        help="the build's sleep before `sh build.sh` (default 1)")
    parser.add_argument("--grace", default="300ms", help="health.grace in release mode")
    parser.add_argument("--health-timeout", default="2s", help="health.timeout in release mode")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="seconds between one deploy being over and the next push")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: "
                        + ", ".join(MODES))
    parser.add_argument("--max-minutes", type=float, default=3.75, help="watchdog")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        return client_main(args.client, args.interval, args.request_timeout)
    if not 1 <= args.deploys <= 200 or not 0 <= args.bad <= 50 or args.interval < 0.001:
        print("releases.py: --deploys 1..200, --bad 0..50, --interval at least 0.001",
              file=sys.stderr)
        return 2
    if shutil.which("git") is None:
        print("releases.py: needs git", file=sys.stderr)
        return 2

    return run_benchmark(MODES, args.modes, args, measure, report)


if __name__ == "__main__":
    sys.exit(main())
