"""The benchmark suite: ours, the seed's loop and supervisord, side by side on the example app.

    python3 bench/run.py            # the full suite, about 7 minutes on 2 cores
    python3 bench/run.py --quick    # fewer repetitions and 10 s idle: a smoke test, not figures

It makes its own virtual environments from Debian's /usr/bin/python3 (bench/.venv-debian with
this repository installed, not editable; bench/.venv-supervisord with supervisor==4.3.0 from PyPI;
bench/.venv-tools with matplotlib for the chart), then measures, in one run:

1. memory of each supervisor process (PSS, RSS) after 60 s idle with one child, all three
   running at once so that shared pages are split the same way;
2. CPU time used while idle, per hour, at the real 5-minute poll;
3. crash to serving again: kill -9 of the app until it answers HTTP from a new process;
4. stats change to decision: the app writes n_clients="0" until the restart begins;
5. deploy overhead: new commit noticed until the new version answers, minus build and start-up;
6. a stats-write storm: 10,000 atomic rewrites a second for 10 s while a deploy waits.

Results go to bench/results/ (results.json, results.md, chart.png). Everything it starts runs
in a session of its own, on 127.0.0.1, and is stopped by pid when it is done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    BENCH,
    DEBIAN_PYTHON,
    REPO,
    BenchError,
    HoldClient,
    Ours,
    SeedLoop,
    Started,
    Supervisord,
    System,
    World,
    cpu_model,
    cpu_precise,
    cpu_seconds,
    memory_kb,
    parse_timestamp,
    running_executable,
    stat_fields,
    thread_cpu,
    wait_file_value,
    wait_http,
)

RESULTS = BENCH / "results"
VENV_OURS = BENCH / ".venv-debian"
VENV_SUPERVISORD = BENCH / ".venv-supervisord"
VENV_TOOLS = BENCH / ".venv-tools"
SUPERVISORD_VERSION = "4.3.0"
REAL_LONG, REAL_SHORT = 300.0, 30.0  # the seed's sleeps
BUDGET_PSS_KB, BUDGET_RSS_KB = 14 * 1024, 18 * 1024  # issue 6, on Debian's python3
HARD_LIMIT = 15 * 60  # whatever happens, nothing we started outlives this


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- environments --------------------------------------------------------------------------------

def pip(venv: Path, *args: str) -> None:
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                             "--disable-pip-version-check", *args],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"pip install {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def make_venv(venv: Path) -> None:
    if not (venv / "bin" / "python").exists():
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)


def prepare_environments() -> None:
    """Ours is reinstalled every run (not editable: an editable install adds an import hook
    that users do not have), so the suite always measures the current tree."""
    make_venv(VENV_OURS)
    pip(VENV_OURS, "--force-reinstall", str(REPO))
    check = subprocess.run([str(VENV_OURS / "bin" / "python"), "-c",
                            "import supervisor; print(supervisor.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/")
    if not check.stdout.startswith(str(VENV_OURS)):
        raise SystemExit(f"ours is not installed in {VENV_OURS}: {check.stdout}")
    supervisord = VENV_SUPERVISORD / "bin" / "supervisord"
    version = ""
    if supervisord.exists():
        version = subprocess.run([str(supervisord), "--version"], capture_output=True,
                                 text=True).stdout.strip()
    if version != SUPERVISORD_VERSION:
        make_venv(VENV_SUPERVISORD)
        pip(VENV_SUPERVISORD, f"supervisor=={SUPERVISORD_VERSION}")
    probe = subprocess.run([str(VENV_TOOLS / "bin" / "python"), "-c", "import matplotlib"],
                           capture_output=True) if (VENV_TOOLS / "bin").exists() else None
    if probe is None or probe.returncode != 0:
        make_venv(VENV_TOOLS)
        pip(VENV_TOOLS, "matplotlib")


def output_of(*argv: str) -> str:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    cpu = cpu_model("?")
    os_name = "?"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip('"')
    memory = Path("/proc/meminfo").read_text().split()[1]
    commit = output_of("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    if output_of("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                 "--", "supervisor", "pyproject.toml"):
        commit += " plus uncommitted changes"
    ours_python = VENV_OURS / "bin" / "python"
    return {
        "cpu": cpu, "cores": str(os.cpu_count()),
        "memory": f"{int(memory) // 1024} MiB", "kernel": os.uname().release, "os": os_name,
        "python_ours": f"{DEBIAN_PYTHON} " + output_of(DEBIAN_PYTHON, "-c",
                                                      "import sys; print(sys.version.split()[0])"),
        "python_harness": f"{sys.executable} {sys.version.split()[0]}",
        "ours": "tiny-supervisor " + output_of(str(ours_python), "-m", "supervisor", "--version")
                .split()[-1] + f" at {commit}, watchfiles " + output_of(
                    str(ours_python), "-c",
                    "import importlib.metadata as m; print(m.version('watchfiles'))"),
        "supervisord": "supervisord " + output_of(str(VENV_SUPERVISORD / "bin" / "supervisord"),
                                                  "--version"),
        "bash": output_of("bash", "--version").splitlines()[0],
        "git": output_of("git", "--version"),
    }


# --- measurements --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, stats_dir: Path) -> None:
        self.args, self.root, self.stats_dir = args, root, stats_dir
        self.python = VENV_OURS / "bin" / "python"
        self.rng = random.Random(6)
        self.raw: dict[str, object] = {"load": []}
        self._reference: World | None = None
        self.failures: list[str] = []

    def world(self, name: str) -> World:
        return World(self.root, self.stats_dir, name)

    def guarded(self, name: str, step: Callable[[], None]) -> None:
        """One phase; a phase that fails is reported, and the others still run."""
        say(f"{name} ...")
        started = time.monotonic()
        load = os.getloadavg()[0]
        try:
            step()
        except (BenchError, subprocess.SubprocessError, OSError) as error:
            self.failures.append(f"{name}: {error}")
            say(f"{name} FAILED: {error}")
        finally:
            for started_process in list(Started.registry):
                started_process.stop(polite=True)
        self.raw["load"].append({"phase": name, "before": load, "after": os.getloadavg()[0],
                                 "seconds": time.monotonic() - started})
        say(f"{name} done in {time.monotonic() - started:.0f} s, load average "
            f"{load:.2f} -> {os.getloadavg()[0]:.2f}")

    # 1 and 2: idle, all three at once ------------------------------------------------------------

    def idle(self) -> None:
        runs = []
        for rep in range(self.args.idle_reps):
            systems: list[System] = [
                Ours(self.world(f"idle{rep}-ours"), self.python),
                SeedLoop(self.world(f"idle{rep}-seed"), REAL_LONG, REAL_SHORT),
                Supervisord(self.world(f"idle{rep}-supervisord"), VENV_SUPERVISORD),
            ]
            try:
                for system in systems:
                    system.start()
                for system in systems:
                    system.wait_ready()
                systems[0].log.event("git.fetched", 30)
                for system in systems:
                    system.process.remember_descendants()
                time.sleep(1.0)  # let start-up work (the first fetch's reaping, logs) settle
                before = {s.key: cpu_precise(s.pid) for s in systems}
                started = time.monotonic()
                time.sleep(self.args.idle)
                elapsed = time.monotonic() - started
                ours_and_theirs = {pid for system in systems
                                   for pid in [system.pid, *system.process.remember_descendants()]}
                run = {"seconds": elapsed, "other_debian_pythons": len(
                    set(running_executable(DEBIAN_PYTHON)) - ours_and_theirs)}
                for system in systems:
                    run[system.key] = {**memory_kb(system.pid),
                                       "cpu": cpu_precise(system.pid) - before[system.key]}
                    app = system.process.app_pid()
                    run[system.key]["app_pss"] = memory_kb(app)["pss"]
                    if system.key == "seed":  # the wrapper `bash server.sh` it keeps alive
                        wrapper = int(stat_fields(app)[1])
                        run["seed"]["wrapper_pss"] = memory_kb(wrapper)["pss"]
                runs.append(run)
                say(f"  idle run {rep + 1}: " + ", ".join(
                    f"{s.key} PSS {run[s.key]['pss'] / 1024:.1f} MB RSS "
                    f"{run[s.key]['rss'] / 1024:.1f} MB CPU {run[s.key]['cpu']:.3f} s"
                    for s in systems))
            finally:
                for system in systems:
                    system.stop()
        self.raw["idle"] = runs

    # reference times: the app's own start-up, and the build ----------------------------------

    def reference(self) -> None:
        startups = [self.startup_once() for _ in range(self.args.reps)]
        builds = [self.build_once(self.reference_world()) for _ in range(self.args.reps)]
        self.raw["app_startup"] = startups
        self.raw["make_build"] = builds

    def reference_world(self) -> World:
        if self._reference is None:
            self._reference = self.world("reference")
        return self._reference

    def startup_once(self) -> float:
        """The app alone, from spawn until it answers: what a restart cannot go below. Deploys
        take one right before each run, so that load from elsewhere hits both alike."""
        world = self.reference_world()
        began = time.time()
        process = Started([DEBIAN_PYTHON, "server.py"], cwd=world.app, env=world.app_env(),
                          name="app")
        try:
            return wait_http(world.port, 10) - began
        finally:
            process.stop(polite=True)

    @staticmethod
    def build_once(world: World) -> float:
        began = time.monotonic()
        subprocess.run("make clean && make install", shell=True, cwd=world.app, check=True,
                       capture_output=True, timeout=60)
        return time.monotonic() - began

    # ours ------------------------------------------------------------------------------------

    def ours(self) -> None:
        system = Ours(self.world("ours"), self.python)
        system.start()
        system.wait_ready()
        log, port, world = system.log, system.world.port, system.world
        raw: dict[str, list] = {"cycle": [], "crash": [], "deploy": [], "drain": [], "storm": []}
        self.raw["ours"] = raw
        time.sleep(0.5)
        raw["memory_before_deploys"] = memory_kb(system.pid)
        # Poll cycle cost: a fetch that finds nothing, CPU of the supervisor and its git children.
        # /proc counts children in 10 ms ticks: each figure is the mean of a group of cycles.
        log.event("git.fetched", 30)
        for _ in range(self.args.cycle_groups):
            before = cpu_precise(system.pid)
            for _ in range(self.args.cycle_group):
                mark = log.mark()
                os.kill(system.pid, signal.SIGUSR1)
                log.event("git.fetched", 30, mark)
            raw["cycle"].append((cpu_precise(system.pid) - before) / self.args.cycle_group)
        # 3. Crash to serving. Each kill waits for the uptime timer (restart.reset_after = 1s),
        # so every one is a first crash, restarted at once as the README promises.
        for _ in range(self.args.crash_reps):
            last_start = log.last(
                lambda line: bool(line.event) and line.event.get("event") == "child.started")
            log.event("timer.fired", 15, last_start, where=lambda e: e.get("timer") == "uptime")
            app = system.process.app_pid()
            mark = log.mark()
            killed = time.time()
            system.process.kill_verified(app, signal.SIGKILL)
            answered = wait_http(port, 30)
            _, started = log.event("child.started", 10, mark)
            _, exited = log.event("child.exited", 10, mark)
            if started.event["pid"] == app:
                raise BenchError("the answer came from the killed pid")
            raw["crash"].append({"seconds": answered - killed,
                                 "exit_seen": parse_timestamp(exited.event["ts"]) - killed,
                                 "child_started": parse_timestamp(started.event["ts"]) - killed})
        # 5. Deploy overhead, no client connected.
        for _ in range(self.args.reps):
            wait_http(port, 30, f"hello from {world.version}")
            startup = self.startup_once()
            time.sleep(0.2)
            mark = log.mark()
            expect = world.push_next_version()
            os.kill(system.pid, signal.SIGUSR1)
            _, fetched = log.event("git.fetched", 30, mark,
                                   where=lambda e: e.get("relation") == "behind")
            _, built = log.event("build.succeeded", 60, mark)
            answered = wait_http(port, 30, expect)
            steps = {}
            for name in ("drain.satisfied", "git.tree_updated", "build.started",
                         "child.exited", "child.started"):
                _, line = log.event(name, 5, mark)
                steps[name] = (parse_timestamp(line.event["ts"])
                               - parse_timestamp(fetched.event["ts"]))
            steps["build.succeeded"] = (parse_timestamp(built.event["ts"])
                                        - parse_timestamp(fetched.event["ts"]))
            if not raw["deploy"]:
                time.sleep(0.5)
                raw["memory_after_first_deploy"] = memory_kb(system.pid)
            raw["deploy"].append({"seconds": answered - parse_timestamp(fetched.event["ts"]),
                                  "build": built.event["duration"], "startup": startup,
                                  "steps": steps})
        # 4. Stats change to decision: a client holds on, a deploy waits, the client leaves.
        for _ in range(self.args.reps):
            wait_http(port, 30, f"hello from {world.version}")
            hold = HoldClient(port, 1.0)
            wait_file_value(world.stats, 'n_clients="1"', 5)
            mark = log.mark()
            expect = world.push_next_version()
            os.kill(system.pid, signal.SIGUSR1)
            log.event("deploy.waiting_for_drain", 30, mark)
            left = hold.join()
            _, satisfied = log.event("drain.satisfied", 30, mark)
            _, built = log.event("build.succeeded", 60, mark)
            wait_http(port, 30, expect)
            raw["drain"].append({"read": parse_timestamp(satisfied.event["ts"]) - left,
                                 "restart": parse_timestamp(built.event["ts"]) - left,
                                 "build": built.event["duration"]})
        # 6. The storm, while a deploy waits on the drain.
        for _ in range(self.args.storm_reps):
            wait_http(port, 30, f"hello from {world.version}")
            time.sleep(0.2)
            write_stats(world.stats, 'n_clients="1"\n')
            mark = log.mark()
            expect = world.push_next_version()
            os.kill(system.pid, signal.SIGUSR1)
            log.event("deploy.waiting_for_drain", 30, mark)
            log.event("stats.read", 10, mark)
            result = self.storm(world, system.pid, children=False)
            _, satisfied = log.event("drain.satisfied", 30, mark)
            _, built = log.event("build.succeeded", 60, mark)
            reads = sum(1 for line in log.since(mark)
                        if line.event and line.event.get("event") == "stats.read")
            wait_http(port, 30, expect)
            raw["storm"].append({**result, "stats_read_lines": reads,
                                 "read": parse_timestamp(satisfied.event["ts"]) - result["final"],
                                 "restart": parse_timestamp(built.event["ts"]) - result["final"]})
        raw["memory_after_deploys"] = memory_kb(system.pid)
        system.stop()

    def storm(self, world: World, pid: int, children: bool) -> dict[str, float]:
        helper = Started([DEBIAN_PYTHON, str(BENCH / "storm.py"), str(world.stats),
                          "--seconds", str(self.args.storm_seconds)],
                         cwd=self.root, env=dict(os.environ), name="storm", stream="stdout")
        before, threads_before = cpu_seconds(pid, children), thread_cpu(pid)
        _, done = helper.log.text("storm_done", self.args.storm_seconds + 30)
        cpu = cpu_seconds(pid, children) - before
        threads: dict[str, float] = {}
        for tid, (name, seconds) in thread_cpu(pid).items():
            used = seconds - threads_before.get(tid, (name, 0.0))[1]
            threads[name] = threads.get(name, 0.0) + used
        _, final = helper.log.text("final_write", 10)
        helper.popen.wait(10)
        helper.stop(polite=False)
        facts = json.loads(done.text)
        return {"cpu": cpu, "threads": threads, "writes": facts["writes"],
                "storm_seconds": facts["seconds"],
                "final": json.loads(final.text)["final_write"]}

    # the seed's loop -------------------------------------------------------------------------

    def seed_cycle(self) -> None:
        """CPU of one pass of the loop (fetch, rev-parse, ps | grep, log, sleep), with its
        forks: a loop with very short sleeps makes many passes in a few seconds."""
        system = SeedLoop(self.world("seedcycle"), 0.25, 0.25)
        system.start()
        system.wait_ready()
        costs = []
        index, _ = system.log.text("Nothing to do, sleeping", 30, system.log.mark())
        for _ in range(self.args.cycle_groups):
            before = cpu_precise(system.pid)
            for _ in range(self.args.cycle_group):
                index, _ = system.log.text("Nothing to do, sleeping", 30, index + 1)
            costs.append((cpu_precise(system.pid) - before) / self.args.cycle_group)
        self.raw["seed_cycle"] = costs
        system.stop()

    def seed(self) -> None:
        long_sleep, short_sleep = self.args.seed_long, self.args.seed_short
        system = SeedLoop(self.world("seed"), long_sleep, short_sleep)
        system.start()
        system.wait_ready()
        log, port, world = system.log, system.world.port, system.world
        raw: dict[str, list] = {"crash": [], "deploy": [], "drain": [], "storm": []}
        self.raw["seed"] = raw
        raw_settings = {"long": long_sleep, "short": short_sleep}
        self.raw["seed_settings"] = raw_settings

        def next_sleep() -> int:
            index, _ = log.text("Nothing to do, sleeping", long_sleep + short_sleep + 30,
                                log.mark())
            return index

        # 3. Crash to serving: killed just after the loop went to sleep.
        for _ in range(self.args.seed_crash_reps):
            index = next_sleep()
            app = system.process.app_pid()
            killed = time.time()
            system.process.kill_verified(app, signal.SIGKILL)
            answered = wait_http(port, long_sleep + short_sleep + 30)
            if system.process.app_pid() == app:
                raise BenchError("the answer came from the killed pid")
            raw["crash"].append(seed_timing(system, index, killed, answered))
        # 5. Deploy overhead, no client connected.
        for _ in range(self.args.seed_reps):
            next_sleep()
            startup, build = self.startup_once(), self.build_once(world)
            mark = log.mark()
            expect = world.push_next_version()
            index, noticed = log.text("Changes found", long_sleep + 30, mark)
            log.text("Trying to start process", 30, index)
            answered = wait_http(port, long_sleep + short_sleep + 30, expect)
            timing = seed_timing(system, index, noticed.at, answered)
            timing["startup"], timing["build"] = startup, build
            timing["bind_failed"] = any("Address already in use" in line.text
                                        for line in log.since(mark))
            raw["deploy"].append(timing)
        # 4. Stats change to decision: a client holds on, the loop waits, the client leaves.
        for _ in range(self.args.seed_reps):
            index = next_sleep()
            hold = HoldClient(port, long_sleep + 0.5 + self.rng.uniform(0, short_sleep))
            wait_file_value(world.stats, 'n_clients="1"', 5)
            expect = world.push_next_version()
            left = hold.join()
            _, read = log.wait(lambda line, left=left: line.at >= left
                               and "[after] n_clients = 0" in line.text, 60, index,
                               what="a read of n_clients = 0")
            kill_index, killed = log.text("Trying to kill process", 30, index)
            log.text("Trying to start process", 30, kill_index)
            wait_http(port, long_sleep + short_sleep + 30, expect)
            timing = seed_timing(system, index, left, killed.at)
            timing["read"] = read.at - left
            raw["drain"].append(timing)
        # 6. The storm, while the loop waits for clients to leave.
        for _ in range(self.args.storm_reps):
            index = next_sleep()
            write_stats(world.stats, 'n_clients="1"\n')
            expect = world.push_next_version()
            log.text("Waiting to rebuild and reboot server", long_sleep + 30, index)
            result = self.storm(world, system.pid, children=True)
            _, read = log.wait(lambda line, final=result["final"]: line.at >= final
                               and "[after] n_clients = 0" in line.text, 60, index,
                               what="a read of n_clients = 0")
            kill_index, killed = log.text("Trying to kill process", 30, index)
            log.text("Trying to start process", 30, kill_index)
            wait_http(port, long_sleep + short_sleep + 30, expect)
            timing = seed_timing(system, index, result["final"], killed.at)
            raw["storm"].append({**result, **timing, "read": read.at - result["final"]})
        system.stop()

    # supervisord -----------------------------------------------------------------------------

    def supervisord(self) -> None:
        system = Supervisord(self.world("supervisord"), VENV_SUPERVISORD)
        system.start()
        system.wait_ready()
        log_file = system.world.root / "supervisord.log"
        crashes = []
        for _ in range(self.args.crash_reps):
            running = log_file.read_text().count("entered RUNNING state")
            deadline = time.monotonic() + 15
            while log_file.read_text().count("entered RUNNING state") < max(running, 1):
                if time.monotonic() > deadline:
                    raise BenchError("supervisord never reported RUNNING")
                time.sleep(0.05)
            app = system.process.app_pid()
            killed = time.time()
            system.process.kill_verified(app, signal.SIGKILL)
            answered = wait_http(system.world.port, 30)
            if system.process.app_pid() == app:
                raise BenchError("the answer came from the killed pid")
            crashes.append({"seconds": answered - killed})
            # startsecs=1: the new app must stay up 1 s to count as RUNNING again
            deadline = time.monotonic() + 15
            while log_file.read_text().count("entered RUNNING state") <= running:
                if time.monotonic() > deadline:
                    raise BenchError("supervisord never reported RUNNING")
                time.sleep(0.05)
        self.raw["supervisord"] = {"crash": crashes}
        system.stop()


def write_stats(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".bench.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def seed_timing(system: SeedLoop, start_index: int, begin: float, end: float) -> dict:
    """Split [begin, end] into the loop's sleeps and the rest (its own work: the overhead).

    The sleep under way at `begin` is the "residual" (at real settings a random part of it is
    left, so on average half); sleeps begun and ended inside the window are whole ones. Only
    sleeps that end inside the window delay anything."""
    residual, whole, slept = None, [], 0.0
    for sleep_begin, sleep_end, kind in system.sleeps(max(0, start_index - 5)):
        if sleep_end > end:
            continue  # still asleep at the end: it ran beside the app's start-up, delaying nothing
        overlap = min(end, sleep_end) - max(begin, sleep_begin)
        if overlap <= 0:
            continue
        slept += overlap
        if sleep_begin <= begin:
            residual = kind
        else:
            whole.append(kind)
    return {"seconds": end - begin, "overhead": end - begin - slept, "residual": residual,
            "whole": whole}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few repetitions")
    parser.add_argument("--skip-setup", action="store_true",
                        help="use the virtual environments as they are")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: redo results.md and chart.png from results.json")
    parser.add_argument("--output", type=Path, default=RESULTS, metavar="DIR",
                        help="where results.json, results.md and chart.png go (default"
                             " bench/results; give another for a --quick run)")
    args = parser.parse_args()
    output = args.output
    if args.report_only:
        from report import write_report

        results = json.loads((output / "results.json").read_text())
        print(write_report(results, output, VENV_TOOLS / "bin" / "python"))
        return 0
    args.idle, args.idle_reps = (10.0, 1) if args.quick else (60.0, 3)
    args.reps = 3 if args.quick else 9
    args.cycle_groups, args.cycle_group = (2, 3) if args.quick else (3, 8)
    args.crash_reps = 3 if args.quick else 10
    args.seed_reps = 2 if args.quick else 5
    args.seed_crash_reps = 2 if args.quick else 5
    args.storm_reps = 1 if args.quick else 2
    args.storm_seconds = 3.0 if args.quick else 10.0
    args.seed_long, args.seed_short = 2.0, 1.0

    began = time.monotonic()
    watchdog = threading.Timer(HARD_LIMIT, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.skip_setup:
        say("preparing the virtual environments (ours reinstalled from the tree) ...")
        prepare_environments()
    facts = machine()
    say(f"machine: {facts['cpu']}, {facts['cores']} cores, kernel {facts['kernel']}")
    root = Path(tempfile.mkdtemp(prefix="supervisor-bench-"))
    # The stats files live on tmpfs (like /run, or /tmp on recent Debian): on a disk
    # filesystem a Python writer cannot reach 10,000 atomic rewrites a second.
    stats_dir = Path(tempfile.mkdtemp(prefix="supervisor-bench-stats-", dir="/dev/shm"))
    bench = Bench(args, root, stats_dir)
    try:
        bench.guarded("1+2. idle memory and CPU, three side by side", bench.idle)
        bench.guarded("reference: app start-up and build", bench.reference)
        bench.guarded("ours: poll cycle, crash, deploy, drain, storm", bench.ours)
        bench.guarded("seed loop: one poll cycle", bench.seed_cycle)
        bench.guarded("seed loop: crash, deploy, drain, storm", bench.seed)
        bench.guarded("supervisord: crash", bench.supervisord)
    finally:
        Started.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(stats_dir, ignore_errors=True)
    elapsed = time.monotonic() - began
    from report import write_report

    output.mkdir(parents=True, exist_ok=True)
    args.output = str(output)  # recorded in results.json's settings
    results = {"machine": facts, "settings": vars(args), "raw": bench.raw,
               "failures": bench.failures, "seconds": round(elapsed, 1),
               "budget_kb": {"pss": BUDGET_PSS_KB, "rss": BUDGET_RSS_KB},
               "real_settings": {"long": REAL_LONG, "short": REAL_SHORT}}
    table = write_report(results, output, VENV_TOOLS / "bin" / "python")
    print(table)
    say(f"total {elapsed:.0f} s; results in {output}")
    return 1 if bench.failures else 0


def hard_stop() -> None:
    say(f"the suite ran past {HARD_LIMIT} s: stopping everything it started")
    Started.stop_all()
    os._exit(3)


if __name__ == "__main__":
    raise SystemExit(main())
