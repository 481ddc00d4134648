"""The event log under pressure (issue 12, section 7), against a real supervisor: a log.file
deleted under it is created again, and a flood of one request leaves the history in place and
the supervisor quick to stop."""

from __future__ import annotations

import json
import os
import signal
import time


def quiet(world, log_file, **log):  # type: ignore[no-untyped-def]
    return world.start(log_file=log_file, drain=None, git={"poll_interval": "1h"},
                       log={"file": str(log_file), **log})


def test_a_deleted_log_file_is_created_again_and_says_so(world):
    log_file = world.tmp / "events.log"
    supervisor = quiet(world, log_file)
    supervisor.wait_for("child.started")
    log_file.unlink()
    mark = supervisor.mark()
    supervisor.send(signal.SIGUSR1)
    reopened = supervisor.wait_for("log.reopened", after=mark)
    assert (reopened["path"], reopened["reason"]) == (str(log_file), "deleted")
    supervisor.wait_for("git.check_requested", after=reopened)
    assert json.loads(log_file.read_text().splitlines()[0])["event"] == "log.reopened"
    assert supervisor.stop() == 0


def test_a_flood_of_one_request_does_not_rotate_the_history_away(world):
    log_file = world.tmp / "events.log"
    # Two files of 64 KiB: a few hundred lines fit, thousands would push the start out.
    supervisor = quiet(world, log_file, max_bytes="64KiB", keep=1)
    supervisor.wait_for("child.started")
    sent, deadline = 0, time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for _ in range(1000):
            os.kill(supervisor.pid, signal.SIGUSR1)
        sent += 1000
    # One request waits in the inbox for the whole flood, not one per signal: a SIGTERM after
    # it is not queued behind hundreds of thousands of them (it once took over two minutes).
    stopping = time.monotonic()
    assert supervisor.stop() == 0  # its lines end the run of repeats
    assert time.monotonic() - stopping < 3.0
    records = [json.loads(line) for name in ("events.log.1", "events.log")
               if (world.tmp / name).exists()
               for line in (world.tmp / name).read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "supervisor.started" in events, f"{sent} signals rotated the start away"
    repeated = [r for r in records if r["event"] == "log.repeated"]
    assert repeated and {r["of"] for r in repeated} <= {"git.check_requested", "git.fetched"}
    assert len(records) < 1000, f"{len(records)} lines for {sent} signals"
    # Nor does Python's own warning about a full signal wakeup socket flood stderr.
    assert not [line for line in supervisor.lines if "Exception ignored" in line]
