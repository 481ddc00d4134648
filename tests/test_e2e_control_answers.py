"""End to end: a control command waits for the supervisor's answer (issue 14, rough edge 2). A
request that cannot apply now exits non-zero with the machine's reason; it once exited 0 and
only the log said `control.ignored`."""

from __future__ import annotations


def test_rollback_in_place_exits_non_zero_with_the_reason(world):
    supervisor, _ = world.start_serving()
    result = world.cli("rollback")
    assert result.returncode == 1, result
    assert 'did not rollback: needs deploy.mode = "releases"' in result.stderr
    supervisor.wait_for("control.ignored", request="rollback")


def test_stop_child_twice_says_already_stopped_the_second_time(world):
    supervisor, pid = world.start_serving()
    first = world.cli("stop-child")
    assert first.returncode == 0 and "it did (now held)" in first.stdout, first
    supervisor.wait_for("child.exited", pid=pid)
    second = world.cli("stop-child")
    assert second.returncode == 1 and "already stopped" in second.stderr, second
    started = world.cli("start-child")
    assert started.returncode == 0, started
    supervisor.wait_for("child.started", after=supervisor.select("child.exited", pid=pid)[0])
