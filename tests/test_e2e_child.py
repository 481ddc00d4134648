"""End to end: the child's life — a crash, a crash loop, shutdown by signal, and a child left
behind by a supervisor that was killed."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest


def test_a_killed_child_is_back_within_a_second(world):
    supervisor, old_pid = world.start_serving()
    mark = supervisor.mark()

    killed_at = time.time()
    os.kill(old_pid, signal.SIGKILL)

    exited = supervisor.wait_for("child.exited", pid=old_pid, after=mark)
    assert exited["signal"] == "SIGKILL"
    supervisor.wait_for("child.restarting", after=exited, delay=0.0, crashes=1)
    started = supervisor.wait_for("child.started", after=exited)
    new_pid = started["pid"]
    delay = supervisor.seconds_between(exited, started)
    seen = started["_t"] - killed_at
    print(f"\n[restart] child.exited -> child.started: {delay * 1000:.0f} ms by the log's clock; "
          f"kill -9 -> child.started seen by the test: {seen * 1000:.0f} ms")
    assert delay < 1.0
    assert seen < 1.0
    world.wait_http("hello from 1", supervisor)
    assert new_pid != old_pid
    assert world.listens_on(new_pid, world.port)
    assert not world.alive(old_pid)


def test_a_crash_loop_backs_off_up_to_the_cap_and_keeps_trying(world):
    supervisor = world.start(app={"command": "exit 3"}, drain=None,
                             restart={"backoff_min": "100ms", "backoff_max": "400ms"})

    first_cap = supervisor.wait_for("child.crash_looping")
    supervisor.wait_for("child.crash_looping", after=first_cap)  # it never gives up

    notes = supervisor.select(where=lambda r: r["event"] in (
        "child.restarting", "child.backing_off", "child.crash_looping"))
    history = [(r["event"], r["crashes"], r["delay"]) for r in notes[:5]]
    assert history == [
        ("child.restarting", 1, 0.0),
        ("child.backing_off", 2, pytest.approx(0.1)),
        ("child.backing_off", 3, pytest.approx(0.2)),
        ("child.crash_looping", 4, pytest.approx(0.4)),
        ("child.crash_looping", 5, pytest.approx(0.4)),
    ]
    assert all(r["reason"] == "exit code 3" for r in notes)
    # The waits really happen: each start comes no sooner than the delay after the exit.
    for note in notes[1:4]:
        exited = [r for r in supervisor.select("child.exited") if r["_i"] < note["_i"]][-1]
        restarted = supervisor.wait_for("child.started", after=note)
        assert supervisor.seconds_between(exited, restarted) >= note["delay"] - 0.01


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_child_and_exits_0(world, sig):
    supervisor, child_pid = world.start_serving()

    assert supervisor.stop(sig) == 0

    requested = supervisor.wait_for("supervisor.stop_requested", signal=sig.name)
    assert supervisor.action(requested, "stop_child")["pid"] == child_pid
    exited = supervisor.wait_for("child.exited", pid=child_pid, after=requested)
    assert exited["exit_code"] == 0, "the example app stops cleanly on SIGTERM"
    supervisor.wait_for("supervisor.stopped", after=exited)
    assert not world.alive(child_pid)
    assert world.http() is None


def test_a_child_left_by_a_killed_supervisor_is_replaced_not_duplicated(world):
    first, stale_pid = world.start_serving()
    os.kill(first.pid, signal.SIGKILL)  # the supervisor only, not its child's group
    first.wait_exit()
    assert world.alive(stale_pid), "the child outlives its killed supervisor"

    second = world.start(config=first.config)

    found = second.wait_for("child.stale_found", pid=stale_pid)
    second.wait_for("child.stale_stopped", pid=stale_pid, after=found)
    started = second.wait_for("child.started", after=found)
    world.wait_http("hello from 1", second)
    world.wait_until(lambda: not world.alive(stale_pid), 5, f"stale child {stale_pid} to die")
    assert started["pid"] != stale_pid
    assert world.listens_on(started["pid"], world.port)
    assert [r["pid"] for r in second.select("child.started")] == [started["pid"]]


@pytest.mark.parametrize("mismatch", ["start_ticks", "boot_id"])
def test_a_stale_record_naming_an_unrelated_process_never_kills_it(world, mismatch):
    bystander = world.spawn_unrelated("sleep", "60")
    record = {"pid": bystander.pid, "start_ticks": world.start_ticks(bystander.pid),
              "boot_id": world.boot_id(), "commit": world.first}
    record[mismatch] = record[mismatch] + 1 if mismatch == "start_ticks" else "another-boot"
    world.state_dir.mkdir()
    (world.state_dir / "state.json").write_text(json.dumps({"built": None, "child": record}))

    supervisor, _ = world.start_serving()

    assert not supervisor.select("child.stale_found")
    assert bystander.poll() is None and world.alive(bystander.pid)


def test_a_child_that_ignores_the_stop_signal_is_killed_after_stop_timeout(world):
    worker = world.tmp / "worker.pid"
    supervisor = world.start(
        app={"command": f"trap '' TERM; sleep 60 & echo $! > {worker}; wait",
             "stop_timeout": "1s"},
        drain=None)
    started = supervisor.wait_for("child.started")
    # The shell makes the file before it writes the pid: wait for the whole line.
    world.wait_until(lambda: worker.exists() and worker.read_text().endswith("\n"), 5,
                     "the child to start its worker")
    worker_pid = int(worker.read_text())

    assert supervisor.stop() == 0

    requested = supervisor.wait_for("supervisor.stop_requested")
    kill = supervisor.wait_for(action="kill_child", after=requested)
    assert supervisor.action(kill, "kill_child")["pid"] == started["pid"]
    # Not before stop_timeout; the upper bound only says "it came", on a busy machine too.
    assert 0.9 <= supervisor.seconds_between(requested, kill) < 10
    exited = supervisor.wait_for("child.exited", pid=started["pid"], after=kill)
    assert exited["signal"] == "SIGKILL"
    assert not world.alive(started["pid"])
    world.wait_until(lambda: not world.alive(worker_pid), 5, "the child's worker to be gone")


def test_a_push_that_fixes_a_crash_loop_is_deployed_without_waiting_out_the_backoff(world):
    broken = world.commit({"run.sh": "echo crashing >&2; exit 3\n"}, message="crash at start")
    world.push()
    supervisor = world.start(
        app={"command": "sh run.sh", "env": {"PORT": str(world.port), "PYTHON": sys.executable}},
        drain=None, restart={"backoff_min": "20s", "backoff_max": "60s"})
    backing_off = supervisor.wait_for("child.backing_off", delay=20.0)
    assert supervisor.select("child.started", commit=broken)

    fixed = world.commit({"run.sh": 'exec "$PYTHON" server.py\n'}, version="2",
                         message="fix the crash")
    world.push()
    pushed_at = time.time()
    supervisor.send(signal.SIGUSR1)

    started = supervisor.wait_for("child.started", commit=fixed, after=backing_off)
    assert started["_t"] - pushed_at < 5, "waited for the backoff timer"
    world.wait_http("hello from 2", supervisor)
