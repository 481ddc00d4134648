"""Chaos soak of a fleet (issue 15): N boxes (real supervisors, each its own clone of one remote)
and a real three-member etcd, random faults from a seeded generator, the fleet's promises checked
after every step. The single-box soak (soak.py) is left as it is; this one shares its counting.

    .venv/bin/python -m tests.soak.fleet --seed 1234 --minutes 10
    .venv/bin/python -m tests.soak.fleet --seed 1234 --steps 6 --json summary.json

The boxes, their TCP proxies to etcd and the prober of their apps come from tests/fleet_harness.py
(shared with tests/test_e2e_fleet.py). Every process started here is ended on the way out, Ctrl-C
and errors included: supervisors by their Popen, apps through the harness's pidfd registry, etcd
members by their Popen. docs/soak.md ("A fleet") says what is checked and what is excused.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Supervisor, World
from tests.etcdtest import EtcdCluster, need_etcd
from tests.fleet_harness import Box, Fleet, Prober, most_at_once
from tests.soak.soak import Checker

SETTLE_BOUND = 90.0  # seconds a step may take to converge: a rollout over 5 boxes, one at a time
FINAL_BOUND = 120.0
GIVE_UP_AFTER = 3  # steps in a row that do not converge end the run
HELD_EVENTS = ("fleet.commit_held", "fleet.held_for_group")
COUNTED = ("fleet.slot_taken", "fleet.proven", "fleet.held_for_group", "fleet.commit_held",
           "fleet.unreachable", "fleet.lease_lost", "fleet.slot_lost", "fleet.solo",
           "fleet.bad_record", "child.stale_found",
           "release.rolling_back")


class SoakError(Exception):
    """The harness itself cannot go on (etcd or the first start never came up)."""


@dataclass(frozen=True)
class Commit:
    sha: str
    kind: str  # "good" | "bad" (its app exits at start)
    version: str
    pushed_at: float

    def __str__(self) -> str:
        return f"{self.kind} {self.version} {self.sha[:8]}"


@dataclass
class Excuse:
    """A box left out of the max_parallel count: for the whole step (its supervisor was killed
    on purpose), or only the outage that began with a crash of its app (at `at`)."""

    box: str
    why: str
    at: float | None = None  # None: the whole step


@dataclass
class Options:
    seed: int
    minutes: float | None
    steps: int | None
    boxes: int = 5
    max_parallel: int = 1
    canary: int = 1
    faults: tuple[str, ...] = ()
    settle_bound: float = SETTLE_BOUND
    directory: Path | None = None
    keep: bool = False
    json_path: Path | None = None
    quiet: bool = False


@dataclass
class Fault:
    name: str
    weight: float
    inject: Callable[[FleetSoak], str]


FAULTS: list[Fault] = []


def fault(name: str, weight: float) -> Callable[[Callable[[FleetSoak], str]],
                                                Callable[[FleetSoak], str]]:
    def register(inject: Callable[[FleetSoak], str]) -> Callable[[FleetSoak], str]:
        FAULTS.append(Fault(name, weight, inject))
        return inject
    return register


# ---------------------------------------------------------------------------------------------
# The faults. Each draws every random choice first, gives back what it took (a member, a box,
# a proxy) before it returns, and registers its excuses.


@fault("push_good", 4)
def push_good(soak: FleetSoak) -> str:
    return f"pushed {soak.push('good')}"


@fault("push_bad", 2)
def push_bad(soak: FleetSoak) -> str:
    return f"pushed {soak.push('bad')}"


@fault("kill_box", 3)
def kill_box(soak: FleetSoak) -> str:
    when = soak.rng.choice(["idle", "rollout", "rollout", "bad rollout"])
    target = soak.rng.choice(["slot holder", "canary", "any"])
    down = soak.rng.uniform(0.0, 3.0)
    delay = soak.rng.uniform(0.0, 1.5)
    pushed = ""
    box = soak.rng.choice(soak.fleet.boxes)
    if when == "idle":
        target = "any"
    else:
        commit = soak.push("bad" if when == "bad rollout" else "good")
        pushed = f"pushed {commit}, "
        box = soak.moment(commit, target, delay) or box
    supervisor = soak.supervisor(box)
    soak.excuse(box, "its supervisor was killed")
    supervisor.proc.kill()
    supervisor.proc.wait(10)
    soak.killed.add(supervisor.pid)
    time.sleep(down)
    soak.start_box(box)
    return f"{pushed}kill -9 of {box.name}'s supervisor ({when}, {target}), down {down:.1f}s"


def member_to_hit(soak: FleetSoak) -> tuple[int, str]:
    which = soak.rng.choice(["leader", "any"])
    index = soak.rng.randrange(soak.etcd.size)
    if which == "leader":
        with contextlib.suppress(Exception):
            index = soak.etcd.leader(timeout=5)
    return index, which


def member_in_a_rollout(soak: FleetSoak, longest: float) -> tuple[str, int, str, float]:
    """For the member faults: draws (in this order, so a seed replays) whether a rollout runs,
    how long the member is out, when in the rollout it is hit; pushes and waits for that
    moment; then picks the member. (pushed, index, which, how long)."""
    during = soak.rng.random() < 0.6
    out = soak.rng.uniform(0.5, longest)
    delay = soak.rng.uniform(0.0, 1.5)
    pushed = ""
    if during:
        commit = soak.push("good")
        pushed = f"pushed {commit}, "
        soak.moment(commit, "slot holder", delay)
    index, which = member_to_hit(soak)
    return pushed, index, which, out


@fault("kill_member", 2)
def kill_member(soak: FleetSoak) -> str:
    pushed, index, which, down = member_in_a_rollout(soak, 4.0)
    soak.etcd.kill(index)
    time.sleep(down)
    soak.etcd.restart(index)
    return f"{pushed}kill -9 of etcd member {index} ({which}), down {down:.1f}s"


@fault("stop_member", 2)
def stop_member(soak: FleetSoak) -> str:
    pushed, index, which, stopped = member_in_a_rollout(soak, 5.0)
    soak.etcd.stop(index)
    soak.stopped_members.add(index)
    try:
        time.sleep(stopped)
    finally:
        soak.etcd.cont(index)
        soak.stopped_members.discard(index)
    return f"{pushed}SIGSTOP of etcd member {index} ({which}) for {stopped:.1f}s"


@fault("partition_box", 3)
def partition_box(soak: FleetSoak) -> str:
    box = soak.rng.choice(soak.fleet.boxes)
    mode = soak.rng.choice(["blackhole", "refuse"])
    cut_for = soak.rng.uniform(0.5, 6.0)  # beyond lease_ttl (2 s) the group forgets the box
    meanwhile = soak.rng.choice(["nothing", "push good", "push bad", "crash its app"])
    crash_at = soak.rng.uniform(0.0, cut_for)
    box.cut_off(mode)
    soak.disrupted.setdefault(box.name, []).append(time.time())
    began = time.monotonic()
    what = ""
    try:
        if meanwhile == "push good":
            what = f", pushed {soak.push('good')}"
        elif meanwhile == "push bad":
            what = f", pushed {soak.push('bad')}"
        elif meanwhile == "crash its app":
            time.sleep(crash_at)
            what = ", " + soak.crash_app(box)
        time.sleep(max(0.0, cut_for - (time.monotonic() - began)))
    finally:
        box.reconnect()
    return f"{box.name} cut off ({mode}) for {cut_for:.1f}s{what}"


@fault("crash_app", 3)
def crash_app(soak: FleetSoak) -> str:
    when = soak.rng.choice(["idle", "rollout"])
    target = soak.rng.choice(["slot holder", "any"])
    delay = soak.rng.uniform(0.0, 1.5)
    box = soak.rng.choice(soak.fleet.boxes)
    pushed = ""
    if when == "idle":
        target = "any"
    else:
        commit = soak.push("good")
        pushed = f"pushed {commit}, "
        box = soak.moment(commit, target, delay) or box
    return f"{pushed}{soak.crash_app(box)} ({when}, {target})"


# ---------------------------------------------------------------------------------------------
# The soak


class FleetSoak:
    def __init__(self, options: Options, root: Path) -> None:
        self.options = options
        self.root = root
        self.checker = Checker()
        self.chooser = random.Random(options.seed)
        self.rng = random.Random(options.seed)
        self.injected: Counter[str] = Counter()
        self.steps_done = 0
        self.aborted: str | None = None
        self.converge_times: list[tuple[float, int, str]] = []
        self.final_converge: float | None = None
        self.excuses: list[Excuse] = []
        self.excused: Counter[str] = Counter()
        self.killed: set[int] = set()  # supervisor pids killed on purpose
        self.stopped_members: set[int] = set()
        self.history: dict[str, list[Supervisor]] = {}
        self.pushed: list[Commit] = []
        self.disrupted: dict[str, list[float]] = {}  # box: when it was killed or cut off
        self.bad_extra: list[str] = []
        self.bad_reported: set[str] = set()
        self.handoffs: list[float] = []
        self.versions = 0
        need_etcd()
        self.etcd = EtcdCluster(root / "etcd", 3)
        (root / "world").mkdir()
        self.world = World(root / "world")
        self.fleet = Fleet(self.world, self.etcd, options.boxes, prefix="/soak",
                           max_parallel=options.max_parallel, canary=options.canary)
        self.prober: Prober | None = None

    # -- the world -------------------------------------------------------------------------

    def supervisor(self, box: Box) -> Supervisor:
        assert box.supervisor is not None
        return box.supervisor

    def start_box(self, box: Box) -> None:
        """With an http probe: "healthy" must mean answering, or the prober sees a box that
        the group counts as back (grace alone passed) still out while the next one stops."""
        health = {"http": f"http://127.0.0.1:{box.port}/up", "interval": "100ms",
                  "grace": "300ms", "timeout": "5s"}
        self.history.setdefault(box.name, []).append(box.start(health=health))

    def push(self, kind: str) -> Commit:
        self.versions += 1
        version = f"{kind[0]}{self.versions}"
        crash = self.world.dev / "CRASH"
        if kind == "bad":
            crash.write_text("on purpose\n")
        else:
            crash.unlink(missing_ok=True)
        sha = self.world.commit(version=version, message=f"{kind} {version}")
        self.world.push()
        commit = Commit(sha, kind, version, time.time())
        self.pushed.append(commit)
        return commit

    def held_by_group(self) -> set[str]:
        """Commits some box held for the group (fleet.held_for_group): the bad ones, and a good
        one whose app was crashed on purpose while on probation (that box cannot tell)."""
        return {r["commit"] for supervisors in self.history.values() for s in supervisors
                for r in s.select("fleet.held_for_group")}

    def may_serve(self) -> set[str]:
        """The versions a box may serve once the step settles: the newest good commit the group
        did not hold; and any good one pushed after it that the group held, on the boxes that
        had already switched to it (the group's hold never moves a live release)."""
        held = self.held_by_group()
        good = [c for c in self.pushed if c.kind == "good"]
        kept = [c for c in good if c.sha not in held]
        newest = kept[-1] if kept else None
        versions = {newest.version if newest else "1"}
        versions |= {c.version for c in good if c.sha in held
                     and (newest is None or c.pushed_at > newest.pushed_at)}
        return versions

    def moment(self, commit: Commit, target: str, delay: float) -> Box | None:
        """A moment of the rollout of `commit`: once a box took a slot for it (or, for a bad
        one, once the canary started it), plus `delay`; returns the box `target` names then."""
        event = "fleet.slot_taken" if commit.kind == "good" else "child.started"
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline:
            for box in self.fleet.boxes:
                if box.supervisor and box.supervisor.select(event, commit=commit.sha):
                    first = box
                    break
            else:
                time.sleep(0.02)
        time.sleep(delay)
        if target == "canary":
            return self.fleet.boxes[0]
        if target == "slot holder":
            holders = [b for b in self.fleet.boxes if b.supervisor and self.holds_slot(b)]
            return holders[0] if holders else first
        return None

    @staticmethod
    def holds_slot(box: Box) -> bool:
        assert box.supervisor is not None
        taken = box.supervisor.select("fleet.slot_taken")
        released = box.supervisor.select("fleet.slot_released")
        return len(taken) > len(released)

    def crash_app(self, box: Box) -> str:
        """kill -9 of the app the box's supervisor says runs: through a pidfd, and only if it
        is ours (its cwd under the run's directory) and alive."""
        started = self.supervisor(box).select("child.started")
        if not started:
            return f"no app of {box.name} to crash"
        pid = started[-1]["pid"]
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return f"{box.name}'s app {pid} already gone"
        try:
            if not os.readlink(f"/proc/{pid}/cwd").startswith(str(self.root)):
                return f"{box.name}'s pid {pid} is not ours"
            at = time.time()
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            return f"{box.name}'s app {pid} already gone"
        finally:
            os.close(fd)
        self.excuse(box, "its app was crashed", at)
        return f"kill -9 of {box.name}'s app {pid}"

    def excuse(self, box: Box, why: str, at: float | None = None) -> None:
        self.excuses.append(Excuse(box.name, why, at))
        if at is None or "crash" not in why:
            self.disrupted.setdefault(box.name, []).append(time.time())

    # -- etcd, read directly (not through the boxes' proxies) -------------------------------

    def slots(self) -> list[str] | None:
        """The slot keys of the group as etcd has them, or None if no member answered."""
        prefix = f"{self.fleet.prefix}/v1/groups/web/slots/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        body = json.dumps({"key": base64.b64encode(prefix).decode(),
                           "range_end": base64.b64encode(end).decode()}).encode()
        for index in range(self.etcd.size):
            if not self.etcd.alive(index) or index in self.stopped_members:
                continue
            try:
                request = urllib.request.Request(self.etcd.endpoints[index] + "/v3/kv/range",
                                                 data=body)
                with urllib.request.urlopen(request, timeout=1.0) as response:
                    reply = json.loads(response.read())
            except (OSError, ValueError):
                continue
            return [base64.b64decode(kv["key"]).decode() for kv in reply.get("kvs", [])]
        return None

    # -- convergence -------------------------------------------------------------------------

    def knows_held(self, box: Box, sha: str) -> bool:
        return any(s.select(where=lambda r: r["event"] in HELD_EVENTS
                            or r["event"] == "deploy.failed", commit=sha)
                   for s in self.history[box.name])

    def settled(self) -> tuple[bool, str]:
        """Every box's supervisor has taken over its app (a health.passed of its own: a box
        restarted after a kill -9 stops the app its predecessor left and starts it again), and
        serves what it may; the newest commit, if the group held it, is known held by every
        box that does not run it; no slot is taken."""
        want = {f"hello from {version}" for version in self.may_serve()}
        for box in self.fleet.boxes:
            supervisor = self.supervisor(box)
            if supervisor.proc.poll() is not None:
                return False, f"{box.name}'s supervisor exited ({supervisor.proc.poll()})"
            if not supervisor.select("health.passed"):
                return False, f"{box.name}'s supervisor has not taken over its app yet"
            answer = box.http()
            if answer not in want:
                return False, f"{box.name} answers {answer!r}, not one of {sorted(want)}"
        newest = self.pushed[-1] if self.pushed else None
        if newest is not None and (newest.kind == "bad" or newest.sha in self.held_by_group()):
            for box in self.fleet.boxes:
                if box.http() != f"hello from {newest.version}" and \
                        not self.knows_held(box, newest.sha):
                    return False, f"{box.name} has not held {newest}"
        slots = self.slots()
        if slots is None:
            return False, "no etcd member answers"
        if slots:
            return False, f"slots still taken: {slots}"
        return True, ""

    def settle(self, bound: float) -> tuple[bool, float, str]:
        began = time.monotonic()
        why = ""
        while time.monotonic() - began < bound:
            ok, why = self.settled()
            if ok:
                return True, time.monotonic() - began, ""
            time.sleep(0.1)
        return False, time.monotonic() - began, why

    # -- the checks after each step ------------------------------------------------------------

    def records(self, since: float) -> dict[str, list[dict[str, Any]]]:
        """Each box's log lines (all its supervisors, oldest first) stamped at or after
        `since`."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, supervisors in self.history.items():
            out[name] = [r for s in supervisors for r in s.select()
                         if World.parse_ts(r["ts"]) >= since - 0.002]
        return out

    def check_step(self, began: float, ended: float) -> None:
        assert self.prober is not None
        rounds = self.prober.rounds
        deadline = time.monotonic() + 10
        while self.prober.rounds < rounds + 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # two full rounds after convergence: every span is closed
        spans = self.prober.take()
        whole = {e.box for e in self.excuses if e.at is None}
        kept = []
        for span in spans:
            first, last, name = span
            if name in whole:
                self.excused["spans (supervisor killed)"] += 1
                continue
            if any(e.box == name and e.at is not None and last >= e.at and first <= e.at + 1.0
                   for e in self.excuses):
                self.excused["spans (app crashed)"] += 1
                continue
            kept.append(span)
        most = most_at_once(kept)
        self.checker.check("max_parallel_prober", most <= self.options.max_parallel,
                           lambda: f"{most} boxes out at once by the prober: "
                                   + describe_spans(kept))
        records = self.records(began)
        intervals = self.out_intervals(records, ended, whole)
        most_log = most_at_once(intervals)
        self.checker.check("max_parallel_log", most_log <= self.options.max_parallel,
                           lambda: f"{most_log} boxes out at once by their logs: "
                                   + describe_spans(intervals))
        self.check_held(began)
        self.check_bad_runs()
        self.check_alive(records)
        self.handoffs += handoff_latencies(records)

    def out_intervals(self, records: dict[str, list[dict[str, Any]]], ended: float,
                      whole: set[str]) -> list[tuple[float, float, str]]:
        """From each box's log: from a stop of its app for a deploy until the new release
        passed its gate, or the box rolled back (or the step ended: a killed supervisor)."""
        intervals = []
        for name, lines in records.items():
            if name in whole:
                continue
            start = None
            for record in lines:
                if any(a.get("action") == "stop_child"
                       and str(a.get("reason", "")).startswith("deploy ")
                       for a in record.get("actions") or ()):
                    start = start or World.parse_ts(record["ts"])
                elif start is not None and record["event"] in ("health.passed",
                                                               "release.rolling_back"):
                    intervals.append((start, World.parse_ts(record["ts"]), name))
                    start = None
            if start is not None:
                intervals.append((start, ended, name))
        return intervals

    def check_held(self, since: float) -> None:
        """No box stops its app for a commit after the group held it (the first
        fleet.held_for_group of any box), nor after it noted the hold itself."""
        held_at: dict[str, float] = {}
        for supervisors in self.history.values():
            for s in supervisors:
                for r in s.select("fleet.held_for_group"):
                    t = World.parse_ts(r["ts"])
                    held_at[r["commit"]] = min(t, held_at.get(r["commit"], t))
        for name, supervisors in self.history.items():
            own: dict[str, float] = {}
            for s in supervisors:
                for r in s.select():
                    t = World.parse_ts(r["ts"])
                    if r["event"] in HELD_EVENTS and "commit" in r:
                        own.setdefault(r["commit"], t)
                    for a in r.get("actions") or ():
                        reason = str(a.get("reason", ""))
                        if a.get("action") != "stop_child" or not reason.startswith("deploy "):
                            continue
                        if t < since - 0.002:
                            continue
                        commit = reason.split()[1]
                        after = min(held_at.get(commit, float("inf")),
                                    own.get(commit, float("inf")))
                        self.checker.check(
                            "no_stop_for_held", t <= after,
                            f"{name} stopped its app for {commit[:12]} at {r['ts']}, "
                            f"{t - after:.3f}s after it was held")

    def check_bad_runs(self) -> None:
        """A bad commit runs on at most `canary` boxes. More only if a box that ran it was
        killed or cut off before the group held it: a canary the group no longer sees is
        replaced by the next name (core/fleet.py canaries), which is then excused and said."""
        for commit in (c for c in self.pushed if c.kind == "bad"):
            if commit.sha in self.bad_reported:
                continue  # said once, at the step that broke it
            ran: dict[str, float] = {}
            for name, supervisors in self.history.items():
                for s in supervisors:
                    for r in s.select("child.started", commit=commit.sha):
                        ran.setdefault(name, World.parse_ts(r["ts"]))
            if len(ran) <= self.options.canary:
                self.checker.check("bad_on_canaries_only", True)
                continue
            held = [World.parse_ts(r["ts"]) for ss in self.history.values() for s in ss
                    for r in s.select("fleet.held_for_group", commit=commit.sha)]
            first_held = min(held, default=float("inf"))
            lost = [n for n, t in ran.items()
                    if any(t <= d <= first_held for d in self.disrupted.get(n, []))]
            line = (f"{commit} ran on {sorted(ran)}; canaries lost before the hold: "
                    f"{sorted(lost)}")
            if len(ran) - len(lost) <= self.options.canary:
                if line not in self.bad_extra:
                    self.bad_extra.append(line)
                self.checker.check("bad_on_canaries_only", True)
            else:
                self.checker.check("bad_on_canaries_only", False, line)
                self.bad_reported.add(commit.sha)

    def check_alive(self, records: dict[str, list[dict[str, Any]]]) -> None:
        for name, supervisors in self.history.items():
            for s in supervisors:
                code = s.proc.poll()
                if s.pid in self.killed:
                    self.checker.check("killed_on_purpose_only", code == -signal.SIGKILL,
                                       f"{name}'s supervisor {s.pid} exited {code}")
                else:
                    self.checker.check("supervisor_alive", code is None,
                                       lambda s=s, name=name: f"{name}'s supervisor {s.pid} "
                                       f"exited {s.proc.poll()}\n{s.tail(30)}")
                with s._cond:
                    lines = list(s.lines)
                traced = [line for line in lines if "Traceback" in line]
                self.checker.check("no_traceback", not traced,
                                   lambda traced=traced, name=name: f"{name}: {traced[:3]}")
            crashed = [r for r in records.get(name, []) if r["event"] == "driver.crashed"]
            self.checker.check("no_driver_crashed", not crashed,
                               lambda crashed=crashed, name=name: f"{name}: {crashed}")
        down = [i for i in range(self.etcd.size) if not self.etcd.alive(i)]
        self.checker.check("etcd_members_alive", not down,
                           f"etcd members not running after the step: {down}")

    # -- the run ------------------------------------------------------------------------------

    def pick(self) -> Fault:
        enabled = [f for f in FAULTS if not self.options.faults or f.name in self.options.faults]
        chosen = self.chooser.choices(enabled, [f.weight for f in enabled])[0]
        self.rng = random.Random(self.chooser.getrandbits(64))
        return chosen

    def say(self, text: str) -> None:
        if not self.options.quiet:
            with contextlib.suppress(OSError):
                print(text, flush=True)

    def go(self) -> None:
        started_at = time.monotonic()
        try:
            for box in self.fleet.boxes:
                self.start_box(box)
            for box in self.fleet.boxes:
                self.supervisor(box).wait_for("fleet.started", timeout=30)
        except pytest.fail.Exception as error:
            raise SoakError(f"the fleet did not start: {error}") from None
        ok, elapsed, why = self.settle(self.options.settle_bound)
        if not ok:
            raise SoakError(f"the first start did not converge: {why}")
        self.prober = Prober(self.fleet.boxes)
        self.say(f"step 0 [{time.monotonic() - started_at:6.1f}s] start: {len(self.fleet.boxes)} "
                 f"boxes serving after {elapsed:.2f}s")
        in_a_row = 0
        while True:
            if self.options.steps is not None and self.steps_done >= self.options.steps:
                break
            if (self.options.minutes is not None
                    and time.monotonic() - started_at > self.options.minutes * 60):
                break
            chosen = self.pick()
            ok = self.step(chosen.name, chosen.inject, started_at)
            in_a_row = 0 if ok else in_a_row + 1
            if in_a_row >= GIVE_UP_AFTER:
                self.aborted = f"{GIVE_UP_AFTER} steps in a row did not converge"
                return
        self.step("final push", push_good, started_at, final=True)
        self.stop_all()

    def step(self, name: str, inject: Callable[[FleetSoak], str], started_at: float,
             final: bool = False) -> bool:
        self.checker.step = self.steps_done + 1
        self.excuses = []
        began = time.time()
        what = inject(self)
        if not final:
            self.injected[name] += 1
            self.steps_done += 1
        ended = time.time()
        bound = max(FINAL_BOUND, self.options.settle_bound) if final else \
            self.options.settle_bound
        ok, elapsed, why = self.settle(bound)
        self.checker.check("converged", ok, lambda: f"not converged within {bound:g}s after "
                           f"{name}: {why}\n" + self.tails())
        if ok:
            self.converge_times.append((elapsed, self.steps_done, name))
        if final:
            self.final_converge = elapsed if ok else None
        self.check_step(began, max(ended, time.time()))
        state = f"converged in {elapsed:.2f}s" if ok else f"NOT CONVERGED ({why})"
        label = "final" if final else f"step {self.steps_done}"
        self.say(f"{label} [{time.monotonic() - started_at:6.1f}s] {name}: {what}; {state}")
        return ok

    def tails(self) -> str:
        return "\n".join(self.supervisor(b).tail(12) for b in self.fleet.boxes)

    def stop_all(self) -> None:
        """SIGTERM to every box: each exits 0 with supervisor.stopped."""
        for box in self.fleet.boxes:
            supervisor = self.supervisor(box)
            if supervisor.proc.poll() is None:
                supervisor.proc.send_signal(signal.SIGTERM)
        for box in self.fleet.boxes:
            supervisor = self.supervisor(box)
            try:
                code: int | None = supervisor.proc.wait(20)
            except Exception:
                code = None
            stopped = supervisor.select("supervisor.stopped")
            self.checker.check("clean_exit", code == 0 and bool(stopped),
                               lambda s=supervisor, c=code, b=box: f"{b.name}: exit {c}\n"
                                                            f"{s.tail(20)}")

    def keep_logs(self) -> None:
        """Each supervisor's event log, for reading after a violation."""
        target = self.root / "logs"
        target.mkdir(exist_ok=True)
        for name, supervisors in self.history.items():
            for number, supervisor in enumerate(supervisors):
                with supervisor._cond:
                    lines = list(supervisor.lines)
                (target / f"{name}.{number}.log").write_text("\n".join(lines) + "\n")

    def cleanup(self) -> None:
        if self.prober is not None:
            self.prober.close()
        for index in range(self.etcd.size):
            self.etcd.cont(index)
        with contextlib.suppress(Exception):
            self.world.close()  # supervisors (SIGTERM, then SIGKILL), their apps, the proxies
        self.etcd.close()

    def counts(self) -> dict[str, int]:
        counted: Counter[str] = Counter()
        for supervisors in self.history.values():
            for s in supervisors:
                for r in s.select(where=lambda r: r["event"] in COUNTED):
                    counted[r["event"]] += 1
        return dict(sorted(counted.items()))


def describe_spans(spans: list[tuple[float, float, str]]) -> str:
    return "; ".join(f"{name} {first:.3f}-{last:.3f}" for first, last, name in sorted(spans))


def handoff_latencies(records: dict[str, list[dict[str, Any]]]) -> list[float]:
    """From one box's fleet.slot_released to the next fleet.slot_taken of another box (log
    timestamps), when that box was waiting for a slot then."""
    released = sorted((World.parse_ts(r["ts"]), n) for n, rs in records.items() for r in rs
                      if r["event"] == "fleet.slot_released")
    taken = sorted((World.parse_ts(r["ts"]), n) for n, rs in records.items() for r in rs
                   if r["event"] == "fleet.slot_taken")
    out = []
    for t, name in released:
        later = [(u, n) for u, n in taken if u >= t and n != name]
        if later and later[0][0] - t < 5.0:
            out.append(later[0][0] - t)
    return out


# ---------------------------------------------------------------------------------------------
# Report and command line


def summarize(soak: FleetSoak, seconds: float) -> dict[str, Any]:
    checker = soak.checker
    longest = max(soak.converge_times, default=(0.0, 0, ""))
    handoffs = sorted(soak.handoffs)
    return {
        "seed": soak.options.seed, "steps": soak.steps_done, "seconds": round(seconds, 1),
        "boxes": soak.options.boxes, "max_parallel": soak.options.max_parallel,
        "canary": soak.options.canary,
        "faults": dict(sorted(soak.injected.items())),
        "checks": dict(sorted(checker.checks.items())),
        "violations": [vars(v) for v in checker.violations],
        "violation_count": len(checker.violations),
        "excused": dict(soak.excused),
        "bad_beyond_canary_excused": soak.bad_extra,
        "fleet_events": soak.counts(),
        "commits": {"good": sum(c.kind == "good" for c in soak.pushed),
                    "bad": sum(c.kind == "bad" for c in soak.pushed)},
        "supervisor_processes": sum(len(v) for v in soak.history.values()),
        "longest_converge": {"seconds": round(longest[0], 3), "step": longest[1],
                             "fault": longest[2]},
        "final_converge": None if soak.final_converge is None else round(soak.final_converge, 3),
        "handoff_ms": {"count": len(handoffs),
                       "median": round(1000 * handoffs[len(handoffs) // 2], 1)
                       if handoffs else None,
                       "max": round(1000 * handoffs[-1], 1) if handoffs else None},
        "prober_rounds": soak.prober.rounds if soak.prober else 0,
        "aborted": soak.aborted,
    }


def print_report(summary: dict[str, Any]) -> None:
    print(f"\nfleet soak: seed {summary['seed']}, {summary['steps']} steps in "
          f"{summary['seconds']:.1f}s, {summary['boxes']} boxes (max_parallel "
          f"{summary['max_parallel']}, canary {summary['canary']}), "
          f"{summary['supervisor_processes']} supervisor processes, "
          f"{summary['prober_rounds']} prober rounds")
    print(f"commits pushed: {summary['commits']['good']} good, {summary['commits']['bad']} bad")
    print("faults injected:")
    for name, count in sorted(summary["faults"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:24} {count}")
    print("invariant checks (made / violated):")
    by_name = Counter(v["invariant"] for v in summary["violations"])
    for name, count in summary["checks"].items():
        print(f"  {name:24} {count} / {by_name[name]}")
    print(f"violations: {summary['violation_count']}")
    for violation in summary["violations"]:
        detail = violation["detail"].splitlines()[0][:300] if violation["detail"] else ""
        print(f"  step {violation['step']} [{violation['invariant']}] {detail}")
    if summary["excused"]:
        print(f"left out of max_parallel: {summary['excused']}")
    for line in summary["bad_beyond_canary_excused"]:
        print(f"bad commit beyond the canary, its canary lost first: {line}")
    print(f"fleet events in the logs: {summary['fleet_events']}")
    handoff = summary["handoff_ms"]
    if handoff["count"]:
        print(f"slot handoffs: {handoff['count']}, median {handoff['median']} ms, "
              f"max {handoff['max']} ms")
    longest = summary["longest_converge"]
    print(f"longest time to converge: {longest['seconds']:.2f}s (step {longest['step']}, "
          f"{longest['fault']})")
    if summary["final_converge"] is not None:
        print(f"final convergence: {summary['final_converge']:.2f}s")
    if summary["aborted"]:
        print(f"run ended early: {summary['aborted']}")
    print(f"replay: {summary['replay']}")


def parse_args(argv: list[str] | None) -> Options:
    names = [f.name for f in FAULTS]
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.fleet",
        description="Chaos soak of a fleet: N supervisors and a 3-member etcd, random faults, "
                    "the fleet's invariants checked after every step (docs/soak.md).")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None,
                        help="inject faults for this long (default: 5 unless --steps)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--max-parallel", type=int, default=1)
    parser.add_argument("--canary", type=int, default=1)
    parser.add_argument("--faults", default="", help=f"only these, comma-separated: {names}")
    parser.add_argument("--settle-bound", type=float, default=SETTLE_BOUND)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    chosen = tuple(n for n in args.faults.split(",") if n)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {names}")
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 5.0
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    return Options(seed=seed, minutes=minutes, steps=args.steps, boxes=args.boxes,
                   max_parallel=args.max_parallel, canary=args.canary, faults=chosen,
                   settle_bound=args.settle_bound, directory=args.dir, keep=args.keep,
                   json_path=args.json, quiet=args.quiet)


def replay_command(options: Options, steps: int) -> str:
    words = [".venv/bin/python", "-m", "tests.soak.fleet", "--seed", str(options.seed),
             "--steps", str(steps)]
    if options.boxes != 5:
        words += ["--boxes", str(options.boxes)]
    if options.max_parallel != 1:
        words += ["--max-parallel", str(options.max_parallel)]
    if options.canary != 1:
        words += ["--canary", str(options.canary)]
    if options.faults:
        words += ["--faults", ",".join(options.faults)]
    return " ".join(words)


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.directory is not None:
        options.directory.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fleetsoak-", dir=options.directory))
    budget = [f"{options.steps} steps"] if options.steps is not None else []
    budget += [f"{options.minutes:g} minutes"] if options.minutes else []
    print(f"fleet soak: seed {options.seed}; {' or '.join(budget)}; directory {root}",
          flush=True)
    signal.signal(signal.SIGTERM, interrupted)
    soak: FleetSoak | None = None
    started = time.monotonic()
    code = 0
    try:
        soak = FleetSoak(options, root)
        soak.go()
    except KeyboardInterrupt:
        code = 130
    except (SoakError, OSError, pytest.fail.Exception, pytest.skip.Exception):
        with contextlib.suppress(OSError):
            traceback.print_exc()
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if soak is not None:
            soak.cleanup()
    if soak is None:
        shutil.rmtree(root, ignore_errors=True)
        return code or 2
    if soak.checker.violations and code == 0:
        code = 1
    if soak.aborted and code == 0:
        code = 1
    keep = options.keep or code != 0
    if keep:
        soak.keep_logs()
    else:
        shutil.rmtree(root, ignore_errors=True)
    summary = summarize(soak, time.monotonic() - started)
    summary["replay"] = replay_command(options, soak.steps_done)
    summary["exit_code"] = code
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    with contextlib.suppress(OSError):
        if code == 130:
            print("fleet soak: interrupted")
        print_report(summary)
        if keep:
            print(f"fleet soak: kept {root}")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
