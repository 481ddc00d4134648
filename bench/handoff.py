"""Socket handoff under load (issue 4, "Measured, not assumed"): steady HTTP load on the example
app over loopback, from a separate process (`hey`), while the supervisor performs N deploys; the
failed requests by kind and the latency percentiles, for each way of restarting:

    no-handoff   the app binds its own port (PORT): the seed's kill-then-start
    stop-start   [[socket]]: the supervisor holds the listening socket across generations
    overlap      [[socket]], release mode, restart.style = "overlap": the next generation starts
                 beside the old one and proves itself with READY=1 before the old one stops

Each way gets its own bare remote, dev clone and supervisor clone, a steady-state run (same load,
no deploys) and then the deploy run, with the same app, on the same machine, in one run. A deploy
is: commit a new VERSION, push, `kill -USR1` the supervisor (poll_interval is long), wait until
`GET /` answers with the new version. No [drain], `true` as the build, START_DELAY so that the
restart window is real.

    python3 bench/handoff.py                 # 50 deploys per way, about 3 minutes on 2 cores
    python3 bench/handoff.py --deploys 10    # a quick run

Writes bench/results/handoff.md and prints the same. Needs `git` and `hey` (Debian: `apt-get
install hey`). Every process started here runs in its own session and is stopped by pid (checked
against its start time); nothing is found or killed by name; all traffic is on 127.0.0.1; every
wait is bounded, and a watchdog ends the run after --max-minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    BenchError,
    DeployWorld,
    Owned,
    Supervisor,
    log,
    machine,
    run_benchmark,
    wait_answer,
    write_config,
)

RESULTS = BENCH / "results" / "handoff.md"
KINDS = ("refused", "reset", "timeout", "EOF", "other")
WAYS = ("no-handoff", "stop-start", "overlap")


# --- hey -----------------------------------------------------------------------------------------

@dataclass
class Load:
    """One hey run, parsed from its summary (it exits 0 even with errors)."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    p50: float | None = None
    p99: float | None = None
    seconds: float = 0.0
    raw_errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.ok + sum(self.failed.values())


def classify(message: str) -> str:
    text = message.lower()
    if "connection refused" in text:
        return "refused"
    if "connection reset" in text or "broken pipe" in text:
        return "reset"
    if "timeout" in text or "deadline exceeded" in text:
        return "timeout"
    if "eof" in text:
        return "EOF"
    return "other"


def parse_hey(text: str) -> Load:
    load = Load()
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not line.startswith(" "):
            section = stripped[:-1]
            continue
        if section == "Summary" and stripped.startswith("Total:"):
            load.seconds = float(stripped.split()[1])
        elif section == "Latency distribution":
            match = re.match(r"(\d+)% in ([\d.]+) secs", stripped)
            if match and match[1] == "50":
                load.p50 = float(match[2])
            elif match and match[1] == "99":
                load.p99 = float(match[2])
        elif section == "Status code distribution":
            match = re.match(r"\[(\d+)\]\s+(\d+) responses", stripped)
            if match and match[1] == "200":
                load.ok += int(match[2])
            elif match:
                load.failed["other"] += int(match[2])
                load.raw_errors.append(f"HTTP {match[1]}: {match[2]}")
        elif section == "Error distribution":
            match = re.match(r"\[(\d+)\]\s+(.*)", stripped)
            if match:
                load.failed[classify(match[2])] += int(match[1])
                load.raw_errors.append(f"{match[1]}x {match[2]}")
    return load


class Hey:
    """`hey -z LIMIT -q RATE -c CONC` in its own session, output to a file; `finish()` ends it
    early with SIGINT, on which it prints its summary as at the end of -z."""

    def __init__(self, args: argparse.Namespace, port: int, limit: float, out: Path,
                 owned: Owned) -> None:
        self.out, self.owned = out, owned
        argv = ["hey", "-z", f"{int(limit)}s", "-q", str(args.rate), "-c", str(args.conc),
                "-t", str(args.timeout)]
        if args.disable_keepalive:
            argv.append("-disable-keepalive")
        argv.append(f"http://127.0.0.1:{port}/")
        self.limit = limit
        with open(out, "wb") as file:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        owned.adopt(self.proc.pid)

    def finish(self, early: bool) -> Load:
        if early and self.proc.poll() is None:
            self.owned.signal(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(self.limit + 30)
        except subprocess.TimeoutExpired:
            self.owned.signal(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise BenchError("hey did not finish") from None
        text = self.out.read_text(errors="replace")
        if "Summary:" not in text:
            raise BenchError(f"hey printed no summary:\n{text[-2000:]}")
        return parse_hey(text)


# --- one way -------------------------------------------------------------------------------------

@dataclass
class Result:
    way: str
    steady: Load | None = None
    deploys: Load | None = None
    done: int = 0
    deploy_seconds: list[float] = field(default_factory=list)  # USR1 to new version answering
    window_seconds: list[float] = field(default_factory=list)  # old child exited to answering
    error: str | None = None


def config(world: DeployWorld, way: str, start_delay: float) -> Path:
    env = {"START_DELAY": str(start_delay)}
    if way == "no-handoff":
        env["PORT"] = str(world.port)
    sections: list[tuple[str, dict[str, Any]]] = [
        ("[app]", {"name": "handoff", "command": [sys.executable, "server.py"], "env": env,
                   "stop_timeout": "5s", "state_dir": str(world.tmp / "state")}),
        ("[git]", {"repo": str(world.app), "poll_interval": "1h", "timeout": "20s"}),
        ("[build]", {"command": "true", "timeout": "20s"}),
        ("[log]", {"format": "json"}),
    ]
    if way in ("stop-start", "overlap"):
        sections.append(("[[socket]]", {"listen": f"127.0.0.1:{world.port}", "name": "http"}))
    if way == "overlap":
        sections += [("[deploy]", {"mode": "releases", "dir": str(world.tmp / "deploy")}),
                     ("[restart]", {"style": "overlap"}),
                     ("[health]", {"notify": True, "timeout": "20s"})]
    return write_config(world.tmp / "supervisor.toml", sections)


def deploy(sup: Supervisor, world: DeployWorld, result: Result) -> None:
    version, commit = world.release()
    mark = sup.mark()
    signalled = world.push(sup)
    started = sup.wait_for("child.started", 30, mark, lambda r: r.get("commit") == commit)
    answered = wait_answer(world.port, f"hello from {version}", 30)
    exited = sup.wait_for("child.exited", 30, mark, lambda r: r.get("pid") != started["pid"])
    result.deploy_seconds.append(answered - signalled)
    if exited["_t"] <= answered:  # overlap: the old one exits only after the new one serves
        result.window_seconds.append(answered - exited["_t"])


def measure(way: str, args: argparse.Namespace, owned: Owned) -> Result:
    result = Result(way)
    tmp = Path(tempfile.mkdtemp(prefix=f"handoff-{way}-"))
    sup = None
    try:
        world = DeployWorld(tmp)
        port = world.port
        sup = Supervisor(config(world, way, args.start_delay), tmp, owned)
        sup.wait_for("child.started", 30)
        wait_answer(port, "hello from 1", 30)
        log(f"{way}: serving on 127.0.0.1:{port}; steady load for {args.steady:g}s")
        result.steady = Hey(args, port, args.steady, tmp / "hey-steady.txt",
                            owned).finish(early=False)
        log(f"{way}: {args.deploys} deploys under load")
        limit = args.deploys * 10 + 60  # a bound, never reached: hey is ended after the last
        hey = Hey(args, port, limit, tmp / "hey-deploys.txt", owned)
        try:
            time.sleep(1.0)  # the load settles before the first deploy
            for _ in range(args.deploys):
                deploy(sup, world, result)
                result.done += 1
                time.sleep(args.gap)
            time.sleep(1.0)
        finally:
            result.deploys = hey.finish(early=True)
    except BenchError as error:
        result.error = str(error)
        log(f"{way}: FAILED: {error}")
    finally:
        if sup is not None:
            sup.stop()
        leftovers = owned.kill_leftovers()
        if leftovers:
            log(f"{way}: killed leftover processes {leftovers}")
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# --- the report ----------------------------------------------------------------------------------

def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def versions() -> str:
    hey = "hey"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        hey = "hey " + subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"],
                                      capture_output=True, text=True, timeout=10).stdout
    return f"Python {platform.python_version()} ({sys.executable}); {hey}"


def report(results: list[Result], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# Socket handoff under load (issue 4)",
        "",
        f"`python3 bench/handoff.py --deploys {args.deploys}` · {time.strftime('%Y-%m-%d %H:%M')}"
        f" · run time {elapsed:.0f} s",
        "",
        f"Machine: {machine()}; {versions()}.",
        "",
        f"Load: `hey -q {args.rate} -c {args.conc} -t {args.timeout}`"
        f"{' -disable-keepalive' if args.disable_keepalive else ''} (≈{args.rate * args.conc}"
        f" requests/s offered, keep-alive {'off' if args.disable_keepalive else 'on'}) on "
        f"127.0.0.1, `GET /` of the example app, START_DELAY={args.start_delay:g} s, build "
        f"`true`, no [drain]; deploys back to back ({args.gap:g} s apart).",
        "",
        "| way | deploys | requests | failed (refused / reset / timeout / EOF / other) "
        "| p50 during deploys | p99 during deploys | steady p99 |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for result in results:
        load, steady = result.deploys, result.steady
        if load is None:
            lines.append(f"| {result.way} | {result.done} | error | | | | "
                         f"{ms(steady.p99) if steady else '-'} |")
            continue
        kinds = " / ".join(str(load.failed[k]) for k in KINDS)
        lines.append(f"| {result.way} | {result.done} | {load.requests} | "
                     f"**{sum(load.failed.values())}** ({kinds}) | {ms(load.p50)} | "
                     f"{ms(load.p99)} | {ms(steady.p99) if steady else '-'} |")
    lines += [
        "",
        "Failed: hey's errors by kind, plus answers other than 200 (as \"other\"). Latencies are"
        " of the requests that succeeded (hey's summary), so refused requests do not raise"
        " no-handoff's. hey's client (Go's net/http) silently retries a GET on a new connection"
        " when a reused keep-alive connection is closed under it, so such closes are not"
        " counted here; a client that does not retry would see them. hey's rate limit drops"
        " ticks while a worker waits, so a restart window gets fewer requests than offered and"
        " the p99 during deploys is a lower bound.",
        "",
    ]
    for result in results:
        lines.append(f"- **{result.way}**:")
        if result.deploy_seconds:
            window = (f"old child exited to new one answering median "
                      f"{ms(statistics.median(result.window_seconds))}, max "
                      f"{ms(max(result.window_seconds))}" if result.window_seconds
                      else "the old child exited only after the new one answered, every time")
            lines.append(f"  deploy (USR1 to the new version answering) median "
                         f"{ms(statistics.median(result.deploy_seconds))}, max "
                         f"{ms(max(result.deploy_seconds))}; {window}.")
        if result.steady:
            lines.append(f"  steady: {result.steady.requests} requests in "
                         f"{result.steady.seconds:.1f} s, "
                         f"{sum(result.steady.failed.values())} failed, p50 "
                         f"{ms(result.steady.p50)}, p99 {ms(result.steady.p99)}.")
        if result.deploys:
            lines.append(f"  during deploys: {result.deploys.requests} requests in "
                         f"{result.deploys.seconds:.1f} s.")
            lines += [f"  hey error: `{error}`" for error in result.deploys.raw_errors[:8]]
        if result.error:
            lines.append(f"  **error**: `{result.error.splitlines()[0]}`")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deploys", type=int, default=50, help="deploys per way (default 50)")
    parser.add_argument("--rate", type=int, default=10,
                        help="requests per second per hey worker (default 10)")
    parser.add_argument("--conc", type=int, default=10, help="hey workers (default 10)")
    parser.add_argument("--timeout", type=int, default=5, help="hey's request timeout, s")
    parser.add_argument("--steady", type=float, default=20.0,
                        help="seconds of steady load without deploys (default 20)")
    parser.add_argument("--start-delay", type=float, default=0.2,
                        help="the app's START_DELAY, seconds (default 0.2)")
    parser.add_argument("--gap", type=float, default=0.3,
                        help="seconds between one deploy answering and the next push")
    parser.add_argument("--disable-keepalive", action="store_true",
                        help="a new connection per request")
    parser.add_argument("--ways", default="no-handoff,stop-start,overlap",
                        help="comma-separated, of: no-handoff, stop-start, overlap")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="watchdog")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("handoff.py: needs hey (apt-get install hey)", file=sys.stderr)
        return 2
    if not 1 <= args.deploys <= 1000 or not 1 <= args.rate * args.conc <= 2000:
        print("handoff.py: --deploys 1..1000 and --rate * --conc 1..2000", file=sys.stderr)
        return 2

    return run_benchmark(WAYS, args.ways, args, measure, report)


if __name__ == "__main__":
    sys.exit(main())
