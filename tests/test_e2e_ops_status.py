"""End to end: `supervisor status` and `status --json`, run from a shell with `-c CONFIG`, during
each phase a real supervisor goes through (running, draining, building, backoff, held) and after
it stopped. The status file is written after the log line of the step that changed it, so each
check first waits for the file, then runs the real command."""

from __future__ import annotations

import json
import sys
import time

import pytest


def status(world, expected_code: int = 0) -> tuple[dict, str]:
    """(status --json, status) as a user sees them; both must agree on the exit code."""
    as_json, as_text = world.cli("status", "--json"), world.cli("status")
    assert as_json.returncode == expected_code, as_json.stderr
    assert as_text.returncode == expected_code, as_text.stderr
    assert as_json.stderr == as_text.stderr == ""
    return json.loads(as_json.stdout), as_text.stdout


def test_status_through_running_draining_building_held_and_stopped(world):
    at, gate = world.parse_ts, world.build_gate()
    supervisor, pid = world.start_serving(git={"poll_interval": "1h"},
                                          build={"command": gate.command()})

    # running: the child, its commit and uptime, the next fetch an hour after the last one
    world.wait_status(lambda s: s["phase"] == "running" and s["last_fetch"], "running",
                      supervisor)
    data, text = status(world)
    assert data["running"] is True and data["pid"] == supervisor.pid
    assert data["child"]["pid"] == pid and data["child"]["commit"] == world.first
    assert data["child"]["uptime"] >= 0
    started = supervisor.select("child.started", pid=pid)[0]
    assert abs(at(data["child"]["since"]) - at(started["ts"])) < 0.5
    assert at(data["next_fetch"]) - at(data["last_fetch"]["at"]) == pytest.approx(3600)
    assert data["last_deploy"]["commit"] == world.first
    assert data["last_deploy"]["result"] == "succeeded"
    assert data["waiting"] is None and data["target"] is None
    assert text.splitlines()[0] == f"example: running, supervisor pid {supervisor.pid}"
    assert f"app:       pid {pid}, {world.first[:12]}, up " in text
    assert f"fetch:     next at {data['next_fetch']}" in text

    # draining: a connected client holds the deploy back; status says why and since when
    client = world.idle_client()
    world.wait_stats('n_clients="1"')
    gate.shut()  # the next build waits for the test
    commit = world.release("2")
    assert world.cli("deploy").returncode == 0
    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)
    world.wait_status(
        lambda s: s["phase"] == "draining" and (s["waiting"] or {}).get("reason")
        == "draining: n_clients=1", "draining with one client", supervisor)
    data, text = status(world)
    assert data["phase"] == "draining" and data["target"] == commit
    assert data["child"]["pid"] == pid, "the old child serves while the deploy waits"
    assert abs(at(data["waiting"]["since"]) - at(waiting["ts"])) < 0.5
    assert data["waiting"]["seconds"] >= 0
    assert text.splitlines()[0] == f"example: draining, supervisor pid {supervisor.pid}"
    assert f"deploying: {commit[:12]}" in text
    assert "waiting:   draining: n_clients=1 for " in text

    # building: the client left; the build of the new commit is held at its gate
    client.release()
    supervisor.wait_for("build.started", commit=commit, after=waiting)
    world.wait_status(lambda s: s["phase"] == "building", "building", supervisor)
    data, text = status(world)
    assert data["target"] == commit and data["head"] == commit
    assert data["built"] == world.first and data["waiting"] is None
    assert data["child"]["pid"] == pid and data["child"]["commit"] == world.first
    assert text.splitlines()[0] == f"example: building, supervisor pid {supervisor.pid}"
    assert f"deploying: {commit[:12]}" in text
    gate.open()
    new = supervisor.wait_for("child.started", commit=commit, after=waiting)
    world.wait_http("hello from 2", supervisor)
    data = world.wait_status(lambda s: (s["child"] or {}).get("pid") == new["pid"],
                             "the new child", supervisor)
    assert data["phase"] == "running" and data["last_deploy"]["commit"] == commit

    # held: stop-child stops the app and status says it is not running
    assert world.cli("stop-child").returncode == 0
    supervisor.wait_for("child.exited", pid=new["pid"])
    world.wait_status(lambda s: s["phase"] == "held" and s["child"] is None, "held", supervisor)
    data, text = status(world)
    assert data["running"] is True and data["child"] is None
    assert text.splitlines()[:2] == [f"example: held, supervisor pid {supervisor.pid}",
                                     "app:       not running"]

    # stopped: exit code 3 and "not running", from the last status the supervisor left
    assert supervisor.stop() == 0
    data, text = status(world, expected_code=3)
    assert data["running"] is False and data["pid"] is None
    first_line = text.splitlines()[0]
    assert first_line == "example: not running (last: stopped)", "a dead pid is named"
    assert "supervisor pid" not in text
    assert "app:       not running" in text
    assert "fetch:" not in text


def test_status_during_a_crash_loop_shows_crashes_and_the_next_start(world):
    supervisor = world.start(app={"command": "echo boom >&2; exit 3"}, drain=None,
                             git={"poll_interval": "1h"},
                             restart={"backoff_min": "20s", "backoff_max": "60s"})
    at = world.parse_ts
    backing_off = supervisor.wait_for("child.backing_off", crashes=2, delay=20.0)
    world.wait_status(lambda s: s["phase"] == "backoff", "backoff", supervisor)

    data, text = status(world)
    assert data["crashes"] == 2 and data["child"] is None
    assert at(data["backoff_until"]) - at(backing_off["ts"]) == pytest.approx(20, abs=0.5)
    assert data["last_error"]["event"] == "child.exited"
    assert data["last_error"]["message"] == "exit code 3"
    assert text.splitlines()[0] == f"example: backoff, supervisor pid {supervisor.pid}"
    assert f"crashes:   2 in a row, next start at {data['backoff_until']}" in text
    assert "error:     child.exited: exit code 3 at " in text

    # stop-child in backoff: held, its backoff timer cancelled, so nothing starts the app
    assert world.cli("stop-child").returncode == 0
    held = supervisor.wait_for("control.stop_child", after=backing_off, before="backoff",
                               where=lambda r: r["after"] == "held")
    assert supervisor.action(held, "cancel_timer")["timer"] == "backoff"
    data = world.wait_status(lambda s: s["phase"] == "held", "held", supervisor)
    assert data["backoff_until"] is None


def test_status_uptime_grows_while_nothing_else_changes(world):
    supervisor, pid = world.start_serving(git={"poll_interval": "1h"},
                                          restart={"reset_after": "1s"})
    world.wait_status(lambda s: (s["child"] or {}).get("pid") == pid, "the child", supervisor)
    # The uptime timer fires a second after the start: time has passed, nothing else changed.
    # The file is written on changes only (not here): `status` must count the uptime itself.
    supervisor.wait_for("timer.fired", timer="uptime")

    asked = time.time()
    data, text = status(world)
    since = world.parse_ts(data["child"]["since"])
    assert asked - since >= 0.9
    assert data["child"]["uptime"] == pytest.approx(asked - since, abs=0.5)
    assert f"app:       pid {pid}, {world.first[:12]}, up 0s" not in text


def test_status_shows_no_deploy_when_none_is_under_way(world):
    supervisor = world.start(app={"command": [sys.executable, "-c", "raise SystemExit(3)"]},
                             drain=None, git={"poll_interval": "1h"},
                             restart={"backoff_min": "20s", "backoff_max": "60s"})
    supervisor.wait_for("child.backing_off")
    world.wait_status(lambda s: s["phase"] == "backoff", "backoff", supervisor)
    data, text = status(world)
    assert data["target"] is None, "nothing is being deployed during a crash loop"
    assert "deploying:" not in text

    assert supervisor.stop() == 0
    data, text = status(world, expected_code=3)
    assert data["target"] is None
    assert "deploying:" not in text
