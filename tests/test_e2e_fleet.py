"""End to end, a fleet (issue 15): five supervisors (five boxes), each with its own clone of one
remote, coordinated through a real three-member etcd cluster. etcd decides when a box may take
its app down, git decides what runs. Every box talks to etcd through a TCP proxy of the test's
own, so one can be cut off while the others go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import BASE_ENV
from tests.etcdtest import etcd_fixture
from tests.fleet_harness import Fleet, Prober, most_at_once

etcd = etcd_fixture(3, scope="module")


@pytest.fixture
def fleet(world, etcd, request):
    policy = getattr(request, "param", {})
    return Fleet(world, etcd, 5, prefix=f"/t/{request.node.name}", **policy)


def test_a_good_commit_rolls_out_one_box_at_a_time_and_ends_everywhere(fleet, world):
    fleet.start()
    prober = Prober(fleet.boxes)
    commit = world.release("2")
    fleet.serving("2")
    spans = prober.close()
    assert prober.rounds > 50
    assert most_at_once(spans) <= 1, f"boxes out at once: {spans}"
    assert {name for _, _, name in spans} == {b.name for b in fleet.boxes}, "each went out once"
    intervals = fleet.out_intervals(commit)
    assert sorted(name for _, _, name in intervals) == [b.name for b in fleet.boxes]
    assert most_at_once(intervals) == 1
    canary = fleet.boxes[0].supervisor
    proven = canary.wait_for("fleet.proven", commit=commit)
    # The others took the app down only once the canary had proven the commit.
    first_other = min(start for start, _, name in intervals if name != "box-0")
    assert first_other >= fleet.world.parse_ts(proven["ts"])
    for box in fleet.boxes[1:]:
        box.supervisor.wait_for("fleet.deploy.cleared", commit=commit, why="proven")
        rollout = box.supervisor.select(rollout=f"web@{commit[:12]}")
        assert len(rollout) > 5, "the rollout's lines carry its id"
    # `supervisor fleet status` from any box shows the whole group, from etcd.
    shown = fleet_status(fleet.boxes[3])
    assert shown.returncode == 0, shown.stderr
    assert "group web (here: max_parallel 1, canary 1)" in shown.stdout
    lines = {line.split()[0].lstrip("*"): line for line in shown.stdout.splitlines()[1:]
             if line.strip().startswith(("*", "box"))}
    assert set(lines) == {b.name for b in fleet.boxes} and lines["box-3"].startswith(" *")
    world.wait_until(lambda: all(
        r["commit"] == commit and r["healthy"]
        for r in json.loads(fleet_status(fleet.boxes[1], "--json").stdout)["groups"]["web"][
            "boxes"].values()), 20, "every box healthy on the new commit in fleet status")
    data = json.loads(fleet_status(fleet.boxes[1], "--json").stdout)
    group = data["groups"]["web"]
    assert data["box"] == "box-1" and len(group["boxes"]) == 5 and group["slots"] == {}
    assert commit in group["proven"]


def deploy_stops(box, commit: str) -> list:
    """Transitions where this box stopped its app for a deploy of `commit`."""
    return box.supervisor.select(action="stop_child", where=lambda r: any(
        a.get("reason", "").startswith(f"deploy {commit}") for a in r.get("actions", [])))


def test_a_bad_commit_fails_on_the_canary_only_is_held_and_the_next_good_one_rolls_out(
        fleet, world, etcd):
    fleet.start()
    etcd.put(0, f"{fleet.prefix}/v1/groups/web/boxes/intruder", "{not json")
    bad = world.commit({"CRASH": "on purpose\n"}, version="2", message="crashes at start")
    world.push()
    canary = fleet.boxes[0].supervisor
    failed = canary.wait_for("fleet.held_for_group", commit=bad)
    assert "exit" in failed["reason"]
    for box in fleet.boxes[1:]:
        box.supervisor.wait_for("fleet.commit_held", commit=bad, box="box-0")
    world.git(world.dev, "rm", "-q", "CRASH")
    good = world.release("3")
    fleet.serving("3")
    for box in fleet.boxes[1:]:
        assert deploy_stops(box, bad) == [], f"{box.name} stopped its app for the bad commit"
        assert deploy_stops(box, good)
        assert box.supervisor.select("fleet.bad_record", key=lambda k: k.endswith("intruder"))


def test_a_box_killed_holding_a_slot_frees_it_within_the_lease_and_a_leader_kill_does_not_stop_the_rollout(  # noqa: E501
        fleet, world, etcd):
    fleet.start(health={"grace": "1s"})
    commit = world.release("2")
    fleet.boxes[0].supervisor.wait_for("fleet.proven", commit=commit, timeout=30)

    def slot_holder():
        """Whichever follower took the slot first: it is killed while holding it."""
        return next((box for box in fleet.boxes[1:]
                     if box.supervisor.select("fleet.slot_taken", commit=commit)), None)

    holder = world.wait_until(slot_holder, 30, "a follower to take the slot")
    holder.supervisor.proc.kill()
    holder.supervisor.wait_exit()
    killed = world.parse_ts(holder.supervisor.select("fleet.slot_taken")[0]["ts"])
    leader = etcd.leader()
    etcd.kill(leader)
    try:
        others = [b for b in fleet.boxes[1:] if b is not holder]
        next_slot = min(
            (world.parse_ts(r["ts"]) for b in others
             for r in [b.supervisor.wait_for("fleet.slot_taken", commit=commit, timeout=30)]),
            default=None)
        assert next_slot is not None
        for box in others:
            box.supervisor.wait_for("health.passed", commit=commit, timeout=40)
        assert next_slot - killed < 2.0 + 2.0 + 2.0, "the dead box's slot came free"
    finally:
        etcd.restart(leader)


def test_a_box_cut_off_from_etcd_keeps_serving_restarts_its_app_and_deploys_once_back(
        fleet, world):
    fleet.start()
    cut = fleet.boxes[4]
    cut.cut_off("blackhole")
    cut.supervisor.wait_for("fleet.unreachable", timeout=20)
    started = cut.supervisor.select("child.started")[-1]
    os.kill(started["pid"], signal.SIGKILL)
    exited = cut.supervisor.wait_for("child.exited", pid=started["pid"])
    restarted = cut.supervisor.wait_for("child.started", after=exited)
    assert cut.supervisor.seconds_between(exited, restarted) < 1.0, "no wait for etcd"
    commit = world.release("2")
    for box in fleet.boxes[:4]:
        box.supervisor.wait_for("health.passed", commit=commit, timeout=40)
    waiting = cut.supervisor.wait_for("fleet.waiting", commit=commit)
    assert waiting["reason"].startswith("etcd, out of reach")
    assert cut.http() == "hello from 1"
    status = (cut.state_dir / "status.json").read_text()
    assert "fleet: waiting for etcd, out of reach" in status
    cut.reconnect()
    cut.supervisor.wait_for("fleet.reachable", timeout=20)
    cut.supervisor.wait_for("health.passed", commit=commit, timeout=30)
    fleet.serving("2")


def fleet_status(box, *args: str):
    return subprocess.run([sys.executable, "-m", "supervisor", "fleet", "status", *args, "-c",
                           str(box.dir / "supervisor.toml")], env=BASE_ENV, cwd=box.dir,
                          capture_output=True, text=True, timeout=30)


def test_fleet_status_without_etcd_is_one_line_and_exit_1(fleet):
    box = fleet.boxes[0]
    box.config()
    box.cut_off("refuse")
    shown = fleet_status(box)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert shown.stderr.count("\n") == 1 and "cannot read the fleet from etcd" in shown.stderr
