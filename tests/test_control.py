"""The shell's side channel to a running supervisor: lock, requests, status. Real files, a real
second process holding the lock, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from supervisor.core.display import duration
from supervisor.drivers.eventlog import EventLog, priority, timestamp
from supervisor.loop import control

HOLD_LOCK = """
import sys, time
from supervisor.loop import control
control.acquire_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A real process that holds the app's lock, as a running supervisor would."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_the_lock_admits_one_supervisor_and_names_the_holder(tmp_path, holder):
    with pytest.raises(control.LockHeld) as held:
        control.acquire_lock(str(tmp_path))
    assert held.value.pid == holder.pid
    assert control.running_pid(str(tmp_path)) == holder.pid


def test_the_lock_is_free_again_when_its_holder_dies_however_it_dies(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert control.running_pid(str(tmp_path)) is None
    lock = control.acquire_lock(str(tmp_path))
    try:
        assert control.running_pid(str(tmp_path)) == os.getpid()
        assert all(os.get_inheritable(fd) is False for fd in lock.fds)  # a child never keeps it
    finally:
        lock.release()


def test_requests_reach_the_holder_once_in_order_and_junk_is_dropped(tmp_path, holder):
    control.make_control_dir(str(tmp_path))
    holder.send_signal(signal.SIGSTOP)  # SIGUSR2 would end this stand-in: keep it pending
    try:
        for request in ("restart", "stop-child", "start-child", "deploy"):
            assert control.send_request(str(tmp_path), request) == holder.pid
        (tmp_path / "control" / "0000-1-rm -rf").write_text("x")
        assert control.take_requests(str(tmp_path)) == [
            "restart", "stop-child", "start-child", "deploy"]
        assert os.listdir(tmp_path / "control") == []
    finally:
        holder.kill()


def test_take_requests_keeps_order_and_ignores_unknown_words(tmp_path):
    directory = tmp_path / "control"
    directory.mkdir()
    for name in ("00000000000000000002-7-stop-child", "00000000000000000001-7-restart",
                 "00000000000000000003-7-reboot", ".00000000000000000004-7-deploy"):
        (directory / name).write_text("")
    assert control.take_requests(str(tmp_path)) == ["restart", "stop-child"]
    assert sorted(os.listdir(directory)) == [".00000000000000000004-7-deploy"]  # half-written
    assert control.take_requests(str(tmp_path)) == []


def test_a_request_with_no_supervisor_running_says_so(tmp_path):
    with pytest.raises(control.NotRunning):
        control.send_request(str(tmp_path), "restart")
    with pytest.raises(ValueError):
        control.send_request(str(tmp_path), "reboot")


def test_status_durations_are_brought_up_to_the_moment_of_reading(tmp_path):
    now = time.time()
    status = {"app": "web", "pid": 1, "phase": "draining",
              "child": {"pid": 5, "commit": "a" * 40, "since": timestamp(now - 725), "uptime": 0},
              "waiting": {"reason": "draining: n_clients=3", "since": timestamp(now - 125),
                          "seconds": 0}, "target": "b" * 40}
    control.write_status(str(tmp_path), status)
    loaded = control.refresh(control.read_status(str(tmp_path)), running=True, now=now)
    assert 724 <= loaded["child"]["uptime"] <= 726
    assert 124 <= loaded["waiting"]["seconds"] <= 126
    text = control.describe_status(loaded)
    assert "up 12m" in text and "draining: n_clients=3 for 2m" in text
    stopped = control.refresh(json.loads(json.dumps(status)), running=False, now=now)
    assert stopped["child"] is None and stopped["target"] is None
    assert "not running" in control.describe_status(stopped)


def test_status_of_a_supervisor_that_is_gone_names_no_pid():
    """Its pid may belong to any process by now: naming it invites a `kill` of a stranger."""
    status = {"app": "web", "pid": 28948, "phase": "stopped", "child": None, "head": "a" * 40}
    gone = control.refresh(dict(status), running=False)
    text = control.describe_status(gone)
    assert text.splitlines()[0] == "web: not running (last: stopped)"
    assert "pid" not in text.splitlines()[0]
    assert gone["pid"] is None, "--json names no dead pid either: a script might kill it"
    running = control.describe_status(control.refresh(status | {"phase": "running"}, True))
    assert running.splitlines()[0] == "web: running, supervisor pid 28948"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"),
                                               (3660, "1h1m"), (90000, "1d1h")])
def test_spans_read_like_people_write_them(seconds, text):
    # One format for `supervisor status` and systemd's STATUS line (which must stay short).
    assert duration(seconds) == text


def test_under_journald_each_line_carries_its_syslog_priority():
    assert priority("child.crash_looping") == priority("driver.crashed") == 3
    assert priority("git.fetch_failed") == priority("drain.timed_out") == 4
    assert priority("child.output_suppressed") == 4 and priority("log.repeated") == 6
    assert priority("child.started") == priority("git.fetched") == 6

    import io
    stream = io.StringIO()
    log = EventLog(stream, format="text")
    log.priority_prefix = True
    log.write("build.failed", {"commit": "abc"})
    log.write("build.succeeded", {"commit": "abc"})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>") and lines[1].startswith("<6>")


def test_the_status_file_changes_with_facts_not_with_the_clock():
    from supervisor.loop.status import facts

    status = {"updated": "t1", "phase": "draining",
              "child": {"pid": 5, "commit": "a", "since": "s", "uptime": 10.0},
              "waiting": {"reason": "draining: n_clients=1", "since": "s", "seconds": 3.0}}
    later = json.loads(json.dumps(status))
    later["updated"], later["child"]["uptime"], later["waiting"]["seconds"] = "t2", 11.0, 4.0
    assert facts(status) == facts(later)
    later["waiting"]["reason"] = "draining: n_clients=0"
    assert facts(status) != facts(later)
    later = json.loads(json.dumps(status))
    later["child"]["pid"] = 6
    assert facts(status) != facts(later)


def test_release_mode_status_names_the_live_and_the_good_releases():
    status = {"app": "web", "pid": 1, "phase": "running", "child": None, "head": "b" * 40,
              "good": ["a" * 40, "b" * 40], "failed": "c" * 40}
    text = control.describe_status(status)
    assert f"release:   {'b' * 12} live; good: {'b' * 12}, {'a' * 12}" in text
    assert "tree:" not in text and "held back" in text
    assert "good: none yet" in control.describe_status(status | {"good": []})
