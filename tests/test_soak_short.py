"""The chaos soak, short (issue 7): fixed seeds for a few steps each, against a real supervisor,
real git and the example app; zero violations expected. The long run, and what each invariant
means, are in docs/soak.md: `.venv/bin/python -m tests.soak.soak --seed N --minutes M`.

Two bugs the soak found (now fixed) are replayed here with the seeds that found them; three more,
in release mode, are replayed as expected failures until they are fixed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A soak gets SIGTERM past its own limit (at most 120 s), then 60 s to clean up.
pytestmark = pytest.mark.timeout(300)

RUNS: dict[str, tuple[tuple[str, ...], float]] = {}  # test name: the soak's arguments, limit
Test = Callable[..., None]


def soak_run(*args: str, limit: float = 120) -> Callable[[Test], Test]:
    """The soak a test checks. The soaks of the tests selected in this file start together (the
    `soaks` fixture): each mostly waits on its supervisor, so side by side they take about as
    long as the longest of them instead of the sum."""
    def register(test: Test) -> Test:
        RUNS[test.__name__] = (args, limit)
        return test
    return register


class Soak:
    """One soak in a subprocess; its output goes to a file, so that no pipe fills while the
    test waits on another soak."""

    def __init__(self, directory: Path, args: tuple[str, ...], limit: float) -> None:
        self.summary = directory / "summary.json"
        self.output = directory / "output.txt"
        self.deadline = time.monotonic() + limit
        self.limit = limit
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.soak.soak", *args, "--json", str(self.summary),
                 "--dir", str(directory / "runs")],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)

    def result(self) -> tuple[dict[str, Any], str]:
        """Its JSON summary and everything it printed. Past its limit it gets SIGTERM, on which
        it stops everything it started and unmounts its tmpfs."""
        try:
            self.process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the soak ran over {self.limit}s\n{self.report()}")
        report = self.report()
        assert self.summary.exists(), report
        result = json.loads(self.summary.read_text())
        assert result["exit_code"] == self.process.returncode, report
        return result, report

    def report(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def soaks(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Soak]]:
    selected = {item.originalname for item in request.session.items
                if item.path == request.path}
    started = {name: Soak(tmp_path_factory.mktemp("soak"), args, limit)
               for name, (args, limit) in RUNS.items() if name in selected}
    try:
        yield started
    finally:
        for run in started.values():
            run.stop()


@pytest.fixture
def soak(soaks: dict[str, Soak], request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    """This test's soak, once it has finished: (its JSON summary, its output)."""
    return soaks[request.node.originalname].result()


@soak_run("--seed", "8", "--steps", "9")
def test_a_short_soak_with_socket_handoff_keeps_every_promise(soak) -> None:
    # Every fault; app.state_dir and the event log are on a small tmpfs the disk-full fault fills.
    result, report = soak
    assert result["violation_count"] == 0, report
    assert sum(result["faults"].values()) == 9, report
    assert result["final_converge"] is not None, report
    for invariant in ("converged", "one_child", "log_json", "start_reason", "drain_before_stop",
                      "no_leftovers", "clean_exit"):
        assert result["checks"].get(invariant, 0) > 0, f"{invariant} never checked\n{report}"


RELEASE_FAULTS = ("push_good,push_crash_at_start,push_unhealthy,push_build_failure,force_push,"
                  "kill_supervisor,kill_child,rollback_request")


@soak_run("--seed", "7", "--steps", "10", "--mode", "releases", "--faults", RELEASE_FAULTS,
          limit=90)
def test_a_short_soak_in_release_mode_keeps_every_promise(soak) -> None:
    # Release mode with the http probe on /up: seed 7 pushes a build failure, an unhealthy and a
    # crashing release (both rolled back), kills the supervisor mid-deploy and asks for a
    # rollback by hand (about 14 s).
    result, report = soak
    assert result["violation_count"] == 0, report
    assert result["mode"] == "releases" and result["probe"] == "http", report
    assert result["final_converge"] is not None, report
    assert result["rollbacks"]["expected"] >= 2, report
    assert result["rollbacks"]["logged"] >= result["rollbacks"]["expected"], report
    for fault in ("push_unhealthy", "push_crash_at_start", "rollback_request"):
        assert result["faults"].get(fault, 0) >= 1, f"{fault} never injected\n{report}"
    for invariant in ("current_valid", "cwd_is_current", "releases_bounded", "failed_bounded",
                      "held_not_redeployed", "rollback_reason", "rollback_target",
                      "converged", "one_child", "no_leftovers", "clean_exit"):
        assert result["checks"].get(invariant, 0) > 0, f"{invariant} never checked\n{report}"


@soak_run("--seed", "62", "--steps", "5", "--mode", "releases", "--overlap", "--faults",
          "kill_supervisor,rollback_request,push_good,push_crash_at_start,kill_child",
          "--stop-on-violation", limit=90)
def test_a_supervisor_killed_after_two_failed_overlaps_can_be_started_again(soak) -> None:
    """Found by the soak, fixed: two crashing releases in a row, each rolled back to the
    generation that kept serving, then kill -9 of the supervisor; the next one exited with code
    2, "Address already in use": the serving generation was recorded nowhere (seed 62)."""
    result, report = soak
    assert result["violation_count"] == 0, report


@soak_run("--seed", "2", "--steps", "1", "--faults", "kill_supervisor", "--stop-on-violation")
def test_a_supervisor_killed_with_a_socket_can_be_started_again(soak) -> None:
    """Found by the soak: the app left behind held the socket, so the new supervisor could not
    bind it and exited with code 2. Now it stops that app first (seed 2, step 1)."""
    result, report = soak
    assert result["violation_count"] == 0, report
    assert result["checks"].get("stale_child_stopped", 0) >= 1, report
