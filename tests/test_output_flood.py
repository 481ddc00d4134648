"""An app that floods its stdout (issue 12, section 7): a per-app limit passes `burst` lines per
interval and counts the rest, every line is either passed on or counted, and the supervisor
stays responsive at a small share of a core. Real processes, real pipes, a real supervisor."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from supervisor.drivers import proc
from supervisor.drivers.childlog import ChildPipes, OutputLimit, open_sink
from tests.processes import run

LINES = 300_000
FAST = f"import sys\nfor n in range({LINES}): sys.stdout.write('line %d\\n' % n)"


class Kept:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.limit = None

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        self.lines.append(line)

    def close(self) -> None:
        pass


async def capture(argv: list[str], limit: OutputLimit, cwd: Path) -> tuple[Kept, int]:
    sink = Kept()
    pipes = ChildPipes(sink, limit=limit)
    stdout, stderr = pipes.fds_for_child()
    process = proc.spawn(argv, cwd=cwd, env=None, stdout=stdout, stderr=stderr)
    pipes.started(process.pid)
    process.exited.add_done_callback(lambda _: pipes.close())
    await process.exited
    assert pipes.closed
    return sink, process.pid


def test_past_the_burst_lines_are_counted_not_passed_on_and_none_goes_missing(tmp_path):
    reports: list[tuple[str, dict]] = []
    limit = OutputLimit(100, 600.0, lambda event, facts: reports.append((event, facts)))
    sink, pid = run(capture([sys.executable, "-c", FAST], limit, tmp_path))
    assert sink.lines[:100] == [f"line {n}" for n in range(100)]  # the burst, in order
    assert len(sink.lines) <= 102  # one more token each 6 s
    suppressed = [facts for event, facts in reports if event == "child.output_suppressed"]
    assert suppressed and all(facts["pid"] == pid for facts in suppressed)
    assert all(facts["limit"] == "100 lines per 600s" for facts in suppressed)
    assert len(sink.lines) + sum(facts["lines"] for facts in suppressed) == LINES


def test_without_a_burst_there_is_no_limit(tmp_path):
    sink = open_sink("events", lambda event, facts: None, burst=0)
    assert sink is not None and sink.limit is None
    limited = open_sink("events", lambda event, facts: None, burst=5, interval=1.0)
    assert limited is not None and limited.limit is not None


def test_the_bucket_refills_burst_lines_per_interval():
    now = [100.0]
    limit = OutputLimit(10, 5.0, lambda event, facts: None, clock=lambda: now[0])
    assert sum(limit.admit(1) for _ in range(15)) == 10
    now[0] += 2.5  # half an interval: half the burst
    assert sum(limit.admit(1) for _ in range(15)) == 5
    now[0] += 1000  # never more than the burst
    assert sum(limit.admit(1) for _ in range(15)) == 10


def test_a_long_flood_is_reported_once_per_interval():
    now = [0.0]
    reports: list[dict] = []
    limit = OutputLimit(1, 10.0, lambda event, facts: reports.append(facts), clock=lambda: now[0])
    assert limit.admit(7)
    for _ in range(25):  # 25 s of a line every second, none with a token to spare
        now[0] += 1.0
        limit.has_room()
        limit.tokens = 0.0
        limit.drop(1000, 7)
    # Each line covers 10 s from its first drop to its last: seconds 1-11, then 12-22.
    assert [(r["lines"], r["seconds"]) for r in reports] == [(11000, 10.0), (11000, 10.0)]
    limit.flush(7)  # at the child's exit: the rest
    assert [r["lines"] for r in reports] == [11000, 11000, 3000]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FLOOD = "yes flood & exec {python} server.py"


def test_a_flooding_app_leaves_the_supervisor_responsive_and_nearly_idle(world):
    # A flood that never ends is counted once per interval: 1 s (not the default 10 s) for the
    # first count, the sign that the limit is at work, to come soon.
    supervisor, child_pid = world.start_serving(
        app={"command": FLOOD.format(python=sys.executable)}, drain=None,
        git={"poll_interval": "1h"}, restart={"backoff_min": "10ms", "backoff_max": "1s"},
        log={"child_rate_limit_interval": "1s"})
    supervisor.wait_for("child.output_suppressed", timeout=30)

    # Its share of a core while `yes` writes as fast as the pipe takes it.
    before, started = cpu_seconds(supervisor.pid), time.monotonic()
    deadline = started + 3.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
    share = (cpu_seconds(supervisor.pid) - before) / (time.monotonic() - started)
    assert share < 0.15, f"the supervisor used {share:.0%} of a core"

    # Control is answered, and a crash is restarted at once, flood or not.
    mark = supervisor.mark()
    assert world.cli("deploy").returncode == 0
    supervisor.wait_for("git.check_requested", after=mark, timeout=2)
    os.kill(child_pid, signal.SIGKILL)
    exited = supervisor.wait_for("child.exited", after=mark, pid=child_pid)
    restarted = supervisor.wait_for("child.started", after=exited)
    gap = supervisor.seconds_between(exited, restarted)
    assert gap < 0.1 + 0.01, f"restarted after {gap:.3f}s"
    world.wait_http("hello from 1", supervisor)
    assert supervisor.stop() == 0


@pytest.mark.parametrize("child", ["events", "file"])
def test_the_limit_applies_whatever_the_output_goes_to(world, child):
    supervisor = world.start(app={"command": "seq 1 100000; exec sleep 60"}, drain=None,
                             git={"poll_interval": "1h"},
                             log={"child": child, "child_rate_limit_burst": 50,
                                  "child_rate_limit_interval": "1h"})
    supervisor.wait_for("child.output_suppressed", timeout=30)
    passed = len(supervisor.select("child.output")) if child == "events" else len(
        (world.state_dir / "child.log").read_text().splitlines())
    counted = sum(r["lines"] for r in supervisor.select("child.output_suppressed"))
    assert passed == 50 and passed + counted == 100000


def test_a_reload_reports_that_the_output_limit_needs_a_restart():
    """The running app's pipes hold the limit they started with: saying it was applied would
    be a lie."""
    from supervisor.core.config import parse_config
    from supervisor.loop.reload import merge

    base = {"app": {"command": "x"}}
    old = parse_config(base, "/srv/app/supervisor.toml", environ={"HOME": "/home/a"})
    new = parse_config({**base, "log": {"child_rate_limit_burst": 5,
                                        "child_rate_limit_interval": "1m"}},
                       "/srv/app/supervisor.toml", environ={"HOME": "/home/a"})
    merged, applied, kept = merge(old, new)
    assert merged.log == old.log and applied == ()
    assert kept == ("log.child_rate_limit_burst", "log.child_rate_limit_interval")
