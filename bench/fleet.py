"""Fleet mode (issue 15), measured: how long a rollout over five boxes takes against a deploy on
one box, how long a slot takes to pass from one box to the next, and what fleet mode costs a
supervisor in memory and in idle CPU.

    .venv/bin/python bench/fleet.py             # 5 runs each, 60 s idle; about 6 minutes
    .venv/bin/python bench/fleet.py --quick     # 2 runs each, 10 s idle; a temporary output

It needs Debian's etcd-server (`etcd` on PATH) and runs from the project's venv: the etcd members
come from tests/etcdtest.py (shared with the tests). The supervisors run on Debian's
/usr/bin/python3 (bench/.venv-debian, made and filled as bench/run.py does), each from this tree.

- **Rollout**: five boxes (five supervisors, each its own clone of one remote, its own port,
  state and releases) in one group of a three-member etcd on 127.0.0.1, release mode, a build
  (`sh build.sh`), a [drain] on `n_clients == 0`, a [health] http probe on /up every 100 ms. A
  new commit is pushed and every box is asked to fetch at once (SIGUSR1: no poll interval in
  the figure); the rollout time is from the push to the last box's `health.passed` for the
  commit. With max_parallel 1 and canary 1, then max_parallel 2 (canary 1). Against it: one box
  with the same config without [fleet], the same push, to its `health.passed`.
- **Slot handoff**: from one box's `fleet.slot_released` to the `fleet.slot_taken` of a box
  that was waiting for a slot then (its `fleet.waiting` said "a slot"), log timestamps.
- **Memory and idle CPU**: three supervisors side by side, each with one app: without [fleet],
  with [fleet] (lease_ttl 10 s, the default), with [fleet] and lease_ttl 2 s (what the tests use).
  After --idle seconds: PSS, RSS, private from /proc/PID/smaps_rollup of the supervisor process
  (not its app), and its utime+stime over the idle time (/proc/PID/stat, 10 ms ticks; and the
  threads' schedstat, in ns).

Results go to bench/results/fleet.md (and fleet.json). Every process started here runs in a
session of its own and is stopped by pid (checked against its start time), etcd members by
their Popen; a watchdog ends the run after --max-minutes. No figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from harness import (  # noqa: E402
    BENCH,
    DEBIAN_PYTHON,
    BenchError,
    DeployWorld,
    Owned,
    Supervisor,
    cpu_precise,
    cpu_seconds,
    free_port,
    machine,
    memory_kb,
    run,
    spread,
    watchdog,
    write_config,
)
from run import VENV_OURS, make_venv, pip  # noqa: E402

from tests.etcdtest import EtcdCluster  # noqa: E402

RESULTS = BENCH / "results"
BOXES = 5
ROLLOUT_WAIT = 120.0  # one rollout over five boxes; a passing run takes a few seconds


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(skip: bool) -> str:
    """Debian's python3 in bench/.venv-debian with this tree installed (as bench/run.py does),
    so the supervisors run on what a small Debian box runs."""
    if not skip:
        make_venv(VENV_OURS)
        pip(VENV_OURS, "--force-reinstall", "--no-deps", str(BENCH.parent))
        pip(VENV_OURS, str(BENCH.parent))
    return str(VENV_OURS / "bin" / "python")


class Box:
    """One box: its own clone of the world's remote, port, stats file, state and releases."""

    def __init__(self, world: DeployWorld, root: Path, name: str) -> None:
        self.name, self.root = name, root
        root.mkdir(parents=True)
        self.clone = root / "app"
        run(["git", "clone", "-q", str(world.remote), str(self.clone)], root)
        self.port = free_port()
        self.stats = root / "stats"
        self.supervisor: Supervisor | None = None

    def config(self, fleet: dict[str, Any] | None) -> Path:
        sections: list[tuple[str, dict[str, Any]]] = [
            ("[app]", {"name": "web", "command": [DEBIAN_PYTHON, "server.py"],
                       "env": {"PORT": str(self.port), "STATS_FILE": str(self.stats)},
                       "stop_timeout": "2s", "state_dir": str(self.root / "state")}),
            ("[git]", {"repo": str(self.clone), "poll_interval": "5m", "timeout": "20s"}),
            ("[build]", {"command": "sh build.sh", "timeout": "30s"}),
            ("[drain]", {"stats_file": str(self.stats), "until": "n_clients == 0",
                         "timeout": "10s"}),
            ("[deploy]", {"mode": "releases", "dir": str(self.root / "deploy"), "keep": 3}),
            ("[health]", {"http": f"http://127.0.0.1:{self.port}/up", "interval": "100ms",
                          "timeout": "20s"}),
            ("[log]", {"format": "json"}),
        ]
        if fleet is not None:
            sections.append(("[fleet]", {"box": self.name, "group": "web", **fleet}))
        return write_config(self.root / "supervisor.toml", sections)

    def start(self, python: str, owned: Owned, fleet: dict[str, Any] | None) -> Supervisor:
        self.supervisor = Supervisor(self.config(fleet), self.root, owned, python=python)
        return self.supervisor

    def ready(self, commit: str, fleet: bool) -> None:
        assert self.supervisor is not None
        self.supervisor.wait_for("health.passed", where=lambda r: r.get("commit") == commit)
        if fleet:
            self.supervisor.wait_for("fleet.started")


def push(world: DeployWorld, boxes: list[Box], owned: Owned) -> tuple[str, float]:
    """A new version, pushed; every box asked to fetch now. Returns (commit, when pushed)."""
    _, commit = world.release()
    run(["git", "push", "-q", "origin", "main"], world.dev)
    pushed = time.time()
    for box in boxes:
        assert box.supervisor is not None
        owned.signal(box.supervisor.proc.pid, signal.SIGUSR1)
    return commit, pushed


def rollouts(python: str, owned: Owned, etcd: EtcdCluster, scratch: Path, runs: int,
             max_parallel: int, canary: int) -> dict[str, Any]:
    """`runs` rollouts over five fresh boxes; per run: push to the last box healthy, push to
    the canary healthy, and the handoffs."""
    tag = f"mp{max_parallel}"
    world_dir = scratch / tag
    world_dir.mkdir()
    world = DeployWorld(world_dir)
    boxes = [Box(world, world_dir / f"box-{i}", f"box-{i}") for i in range(BOXES)]
    fleet = {"endpoints": etcd.endpoints, "prefix": f"/bench/{tag}", "lease_ttl": "10s",
             "max_parallel": max_parallel, "canary": canary}
    out: dict[str, Any] = {"max_parallel": max_parallel, "canary": canary, "runs": []}
    try:
        for box in boxes:
            box.start(python, owned, fleet)
        for box in boxes:
            box.ready(world.first, True)
        for number in range(runs):
            marks = {box.name: box.supervisor.mark() for box in boxes if box.supervisor}
            commit, pushed = push(world, boxes, owned)
            healthy = {}
            for box in boxes:
                assert box.supervisor is not None
                record = box.supervisor.wait_for(
                    "health.passed", ROLLOUT_WAIT, marks[box.name],
                    lambda r, c=commit: r.get("commit") == c)
                healthy[box.name] = record["_ts"] - pushed
            for box in boxes:  # the last slot given back before the next push
                assert box.supervisor is not None
                if box.supervisor.first(marks[box.name],
                                        lambda r: r["event"] == "fleet.slot_taken"):
                    box.supervisor.wait_for("fleet.slot_released", 10, marks[box.name])
            records = {box.name: box.supervisor.records[marks[box.name]:]
                       for box in boxes if box.supervisor}
            result = {"rollout": max(healthy.values()), "canary": healthy["box-0"],
                      "healthy": healthy, "handoffs": handoffs(records)}
            out["runs"].append(result)
            say(f"  {tag} run {number + 1}: rollout {result['rollout']:.2f} s (canary "
                f"{result['canary']:.2f} s), handoffs "
                + ", ".join(f"{1000 * h:.0f}" for h in result["handoffs"]) + " ms")
    finally:
        for box in boxes:
            if box.supervisor is not None:
                box.supervisor.stop()
    return out


def handoffs(records: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Seconds from a fleet.slot_released to the fleet.slot_taken of another box that was
    waiting for a slot at that moment."""
    released = sorted((r["_ts"], name) for name, rs in records.items() for r in rs
                      if r["event"] == "fleet.slot_released")
    out = []
    for name, rs in records.items():
        for taken in (r for r in rs if r["event"] == "fleet.slot_taken"):
            waited = [r for r in rs if r["event"] == "fleet.waiting"
                      and r["_ts"] <= taken["_ts"]
                      and str(r.get("reason", "")).startswith("a slot")]
            before = [t for t, other in released if other != name and t <= taken["_ts"]]
            if waited and before and before[-1] >= waited[-1]["_ts"]:
                out.append(taken["_ts"] - before[-1])
    return sorted(out)


def single(python: str, owned: Owned, scratch: Path, runs: int) -> dict[str, Any]:
    """The same app and config on one box, without [fleet]: push to health.passed."""
    world_dir = scratch / "single"
    world_dir.mkdir()
    world = DeployWorld(world_dir)
    box = Box(world, world_dir / "box", "box")
    out: dict[str, Any] = {"runs": []}
    try:
        supervisor = box.start(python, owned, None)
        box.ready(world.first, False)
        for number in range(runs):
            mark = supervisor.mark()
            commit, pushed = push(world, [box], owned)
            record = supervisor.wait_for("health.passed", ROLLOUT_WAIT, mark,
                                         lambda r, c=commit: r.get("commit") == c)
            out["runs"].append(record["_ts"] - pushed)
            say(f"  single box run {number + 1}: {out['runs'][-1]:.2f} s")
    finally:
        if box.supervisor is not None:
            box.supervisor.stop()
    return out


def idle(python: str, owned: Owned, etcd: EtcdCluster, scratch: Path, seconds: float,
         rep: int) -> dict[str, Any]:
    """Three supervisors at once, one app each: no [fleet], [fleet] at lease_ttl 10 s, at 2 s;
    memory and CPU of each supervisor process after `seconds` idle."""
    kinds: dict[str, dict[str, Any] | None] = {
        "without": None,
        "fleet": {"endpoints": etcd.endpoints, "prefix": f"/bench/idle{rep}",
                  "lease_ttl": "10s"},
        "fleet_ttl2": {"endpoints": etcd.endpoints, "prefix": f"/bench/idle{rep}t",
                       "lease_ttl": "2s"},
    }
    boxes: dict[str, Box] = {}
    first: dict[str, str] = {}
    out: dict[str, Any] = {}
    try:
        for key, fleet in kinds.items():
            where = scratch / f"idle{rep}-{key}"
            where.mkdir()
            world = DeployWorld(where)
            boxes[key], first[key] = Box(world, where / "box", f"idle-{key}"), world.first
            boxes[key].start(python, owned, fleet)
        for key, box in boxes.items():
            box.ready(first[key], kinds[key] is not None)
        time.sleep(2.0)  # the start-up's last writes and the first keep-alive done
        before = {}
        for key, box in boxes.items():
            assert box.supervisor is not None
            pid = box.supervisor.proc.pid
            before[key] = (cpu_seconds(pid, children=False), cpu_precise(pid), time.monotonic())
        time.sleep(seconds)
        for key, box in boxes.items():
            assert box.supervisor is not None
            pid = box.supervisor.proc.pid
            ticks0, precise0, t0 = before[key]
            elapsed = time.monotonic() - t0
            out[key] = {**memory_kb(pid),
                        "cpu_ticks_s": cpu_seconds(pid, children=False) - ticks0,
                        "cpu_precise_s": cpu_precise(pid) - precise0, "over_s": elapsed}
        say(f"  idle run {rep + 1}: " + ", ".join(
            f"{key} {v['pss'] / 1024:.2f} MB PSS, {1000 * v['cpu_precise_s']:.0f} ms CPU"
            for key, v in out.items()))
    finally:
        for box in boxes.values():
            if box.supervisor is not None:
                box.supervisor.stop()
    return out


# --- the report -----------------------------------------------------------------------------------



def report(results: dict[str, Any]) -> str:
    command = results["command"]
    out = ["# Fleet mode: rollout time, slot handoff, memory and idle CPU", "",
           f"Command: `{command}` ({results['seconds']:.0f} s; {results['runs']} runs per "
           f"figure, {results['idle']:g} s idle). Machine: {results['machine']}; load average "
           f"before {' / '.join(f'{x:.2f}' for x in results['load_before'])}, after "
           f"{' / '.join(f'{x:.2f}' for x in results['load_after'])} (shared with other work).",
           f"Versions: ours at {results['commit']}; supervisors on {results['python']}; "
           f"{results['etcd']} (three members on 127.0.0.1).", ""]
    single_runs = results["single"]["runs"] if results.get("single") else []
    out += ["## Rollout over five boxes against a deploy on one", "",
            "Push (and SIGUSR1 to every box: no poll interval counted) to the last box's "
            "`health.passed` for the commit; median (min\u2013max) in seconds. Release mode, "
            "build `sh build.sh`, drain on `n_clients == 0` (no client held), health http "
            "probe on /up every 100 ms; the apps are the example app on Debian's python3.", "",
            "| setup | runs | push to last box healthy | push to the canary healthy |",
            "|---|---:|---:|---:|",
            f"| one box, no [fleet] | {len(single_runs)} | {spread(single_runs)} | \u2013 |"]
    for setup in results["rollouts"]:
        rollout = [r["rollout"] for r in setup["runs"]]
        canary = [r["canary"] for r in setup["runs"]]
        out.append(f"| 5 boxes, max_parallel {setup['max_parallel']}, canary "
                   f"{setup['canary']} | {len(rollout)} | {spread(rollout)} | "
                   f"{spread(canary)} |")
    out += ["", f"Command for every figure of this table: `{command}`.", ""]
    out += ["## Slot handoff", "",
            "From one box's `fleet.slot_released` to the `fleet.slot_taken` of a box that was "
            "waiting for a slot then (its `fleet.waiting` said \"a slot\"), from the log lines' "
            "millisecond timestamps, over every such handoff of the runs.", "",
            "| setup | handoffs | median ms | max ms |", "|---|---:|---:|---:|"]
    for setup in results["rollouts"]:
        values = [h for r in setup["runs"] for h in r["handoffs"]]
        median = f"{1000 * statistics.median(values):.0f}" if values else "n/a"
        most = f"{1000 * max(values):.0f}" if values else "n/a"
        out.append(f"| max_parallel {setup['max_parallel']} | {len(values)} | {median} | "
                   f"{most} |")
    out += ["", f"Command: `{command}`.", ""]
    labels = {"without": "one app, no [fleet]", "fleet": "one app, [fleet] lease_ttl 10 s",
              "fleet_ttl2": "one app, [fleet] lease_ttl 2 s"}
    out += ["## Memory and idle CPU of the supervisor process", "",
            f"Three supervisors at once, one app each, after {results['idle']:g} s idle; the "
            "supervisor process only (not its app). MB is MiB (kB from smaps_rollup / 1024); "
            "median (min\u2013max) over the runs. CPU: utime+stime over the idle time "
            "(/proc/PID/stat, 10 ms ticks) and the threads' schedstat (ns).", "",
            "| supervisor | PSS MB | RSS MB | private MB | threads | CPU ms (ticks) | "
            "CPU ms (schedstat) | per hour |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in labels.items():
        rows = [r[key] for r in results["idle_runs"] if key in r]
        if not rows:
            continue
        per_hour = [3600 * r["cpu_precise_s"] / r["over_s"] for r in rows]
        out.append(f"| {label} | {spread([r['pss'] for r in rows], 1 / 1024)} | "
                   f"{spread([r['rss'] for r in rows], 1 / 1024)} | "
                   f"{spread([r['private'] for r in rows], 1 / 1024)} | "
                   f"{statistics.median(r['threads'] for r in rows):g} | "
                   f"{spread([r['cpu_ticks_s'] for r in rows], 1000, 0)} | "
                   f"{spread([r['cpu_precise_s'] for r in rows], 1000, 0)} | "
                   f"{spread(per_hour, 1, 2)} s |")
    rows = results["idle_runs"]
    if rows and all("fleet" in r and "without" in r for r in rows):
        extra = {field: [r["fleet"][field] - r["without"][field] for r in rows]
                 for field in ("pss", "rss", "private")}
        out += ["", "Fleet mode's extra memory (lease_ttl 10 s, same run, per run then median): "
                f"PSS {spread(extra['pss'], 1 / 1024)} MB, RSS "
                f"{spread(extra['rss'], 1 / 1024)} MB, private "
                f"{spread(extra['private'], 1 / 1024)} MB."]
    out += ["", f"Command: `{command}`.", ""]
    out += ["## Notes", "",
            "- Every figure is measured; none is asserted by a test. The machine's 2 cores were "
            "shared with other work (the load averages above): the rollout times move with it "
            "from run to run.",
            "- A rollout is the canary's deploy (its fetch, the group's go, build, drain, a slot, "
            "restart, health), then the other boxes, cleared once the canary's `fleet.proven` "
            "reaches them, build at once and restart `max_parallel` at a time. Each restart is "
            "mostly the example app's Python start-up, which is CPU: on two busy cores two "
            "restarts at once each take longer, so max_parallel 2 may gain less than half.",
            "- The absolute memory figures are for this config (release mode, an http health "
            "probe, the tree on PYTHONPATH as bench/harness.py runs it); fleet mode's cost is the "
            "difference between rows measured side by side in one run. Its idle CPU is the "
            "lease keep-alive (every lease_ttl / 3) and the group's watch stream.",
            ""]
    if results["failures"]:
        out += ["## What failed", ""] + [f"- {f}" for f in results["failures"]] + [""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 runs each, 10 s idle, a temporary output directory")
    parser.add_argument("--runs", type=int, default=None, help="rollouts per setup (default 5)")
    parser.add_argument("--idle", type=float, default=None, help="idle seconds (default 60)")
    parser.add_argument("--idle-runs", type=int, default=None, help="default 3")
    parser.add_argument("--skip-setup", action="store_true",
                        help="use bench/.venv-debian as it is (this tree not reinstalled)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR")
    parser.add_argument("--max-minutes", type=float, default=25.0)
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: redo fleet.md from fleet.json in --output")
    args = parser.parse_args()
    if args.report_only:
        output = args.output or RESULTS
        text = report(json.loads((output / "fleet.json").read_text()))
        (output / "fleet.md").write_text(text)
        print(text)
        return 0
    runs = args.runs or (2 if args.quick else 5)
    idle_s = args.idle or (10.0 if args.quick else 60.0)
    idle_runs = args.idle_runs or (1 if args.quick else 3)
    output = args.output or (Path(tempfile.mkdtemp(prefix="supervisor-fleet-"))
                             if args.quick else RESULTS)
    command = ".venv/bin/python bench/fleet.py" + " ".join([""] + sys.argv[1:])
    if shutil.which("etcd") is None:
        say("etcd is not installed (Debian: apt-get install etcd-server)")
        return 2
    began, load_before = time.monotonic(), os.getloadavg()
    owned = Owned()
    failures: list[str] = []
    results: dict[str, Any] = {"rollouts": [], "idle_runs": [], "single": None}
    scratch = Path(tempfile.mkdtemp(prefix="supervisor-fleet-"))
    try:
        with watchdog(args.max_minutes):
            say("preparing bench/.venv-debian ...")
            python = prepare(args.skip_setup)
            with EtcdCluster(scratch / "etcd", 3) as etcd:
                for name, step in (
                        ("single", lambda: results.__setitem__(
                            "single", single(python, owned, scratch, runs))),
                        ("max_parallel 1", lambda: results["rollouts"].append(
                            rollouts(python, owned, etcd, scratch, runs, 1, 1))),
                        ("max_parallel 2", lambda: results["rollouts"].append(
                            rollouts(python, owned, etcd, scratch, runs, 2, 1))),
                        *((f"idle {rep + 1}", lambda rep=rep: results["idle_runs"].append(
                            idle(python, owned, etcd, scratch, idle_s, rep)))
                          for rep in range(idle_runs))):
                    say(f"{name} ...")
                    try:
                        step()
                    except (BenchError, subprocess.SubprocessError, OSError) as error:
                        failures.append(f"{name}: {error}")
                        say(f"{name} FAILED: {error}")
    except KeyboardInterrupt as stop:
        say(f"interrupted ({stop or 'SIGINT'}); stopping what was started")
        return 130
    finally:
        owned.kill_leftovers()
        shutil.rmtree(scratch, ignore_errors=True)
    etcd_version = "etcd ?"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                                      timeout=10).stdout.splitlines()[0]
    results.update({
        "command": command, "machine": machine(), "runs": runs, "idle": idle_s,
        "commit": run(["git", "rev-parse", "--short", "HEAD"], BENCH.parent),
        "python": "Debian's python3 " + subprocess.run(
            [python, "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True, text=True, timeout=30).stdout.strip() + f" ({python})",
        "etcd": etcd_version, "load_before": load_before, "load_after": os.getloadavg(),
        "seconds": time.monotonic() - began, "failures": failures})
    output.mkdir(parents=True, exist_ok=True)
    (output / "fleet.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (output / "fleet.md").write_text(text)
    print(text)
    say(f"total {results['seconds']:.0f} s; results in {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
