"""The log is a replayable trace: a real run's JSON log, fed back through `decide`, leads through
exactly the phases the log recorded. This is what lets an incident become a unit test."""

from __future__ import annotations

import os
import signal

from supervisor.cli.replay import replay
from supervisor.core.config import load_config
from supervisor.core.events import BuildFailed, ChildExited, event_from_record
from supervisor.core.settings import settings_from


def test_a_real_run_replays_through_the_machine_phase_for_phase(world):
    supervisor, _ = world.start_serving()
    held = world.hold(seconds=1)
    world.wait_stats('n_clients="1"')
    good = world.release("2")
    supervisor.wait_for("child.started", commit=good)
    held.join()
    broken = world.commit({"build.sh": "exit 1\n"}, version="3", message="broken build")
    world.push()
    failed = supervisor.wait_for("deploy.reverted", after=supervisor.wait_for(
        "deploy.failed", commit=broken))
    os.kill(supervisor.wait_for("child.started", commit=good)["pid"], signal.SIGKILL)
    supervisor.wait_for("child.started", after=failed)
    assert supervisor.stop() == 0

    settings = settings_from(load_config(supervisor.config))
    transitions = [r for r in supervisor.records if event_from_record(r) is not None]
    assert len(transitions) > 15
    assert any(isinstance(event_from_record(r), BuildFailed) for r in transitions)
    assert list(replay(supervisor.records, settings)) == []

    # The check can fail: a log that lies about one transition is caught.
    crash = next(r for r in supervisor.records if isinstance(event_from_record(r), ChildExited)
                 and r["after"] == "running" and r["before"] == "running")
    forged = [dict(r, after="backoff") if r is crash else r for r in supervisor.records]
    assert len(list(replay(forged, settings))) >= 1
