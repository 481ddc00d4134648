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
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def soak(tmp_path: Path, *args: str, limit: float = 120) -> tuple[dict[str, Any], str]:
    """Run the soak in a subprocess; returns its JSON summary and everything it printed. Past
    `limit` it gets SIGTERM, on which it stops everything it started and unmounts its tmpfs."""
    summary = tmp_path / "summary.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.soak.soak", *args, "--json", str(summary),
         "--dir", str(tmp_path / "runs")],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        report, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.terminate()
        report, _ = process.communicate(timeout=60)
        pytest.fail(f"the soak ran over {limit}s\n{report}")
    assert summary.exists(), report
    result = json.loads(summary.read_text())
    assert result["exit_code"] == process.returncode, report
    return result, report


def test_a_short_soak_with_socket_handoff_keeps_every_promise(tmp_path: Path) -> None:
    # Every fault; app.state_dir and the event log are on a small tmpfs the disk-full fault fills.
    result, report = soak(tmp_path, "--seed", "8", "--steps", "9")
    assert result["violation_count"] == 0, report
    assert sum(result["faults"].values()) == 9, report
    assert result["final_converge"] is not None, report
    for invariant in ("converged", "one_child", "log_json", "start_reason", "drain_before_stop",
                      "no_leftovers", "clean_exit"):
        assert result["checks"].get(invariant, 0) > 0, f"{invariant} never checked\n{report}"


RELEASE_FAULTS = ("push_good,push_crash_at_start,push_unhealthy,push_build_failure,force_push,"
                  "kill_supervisor,kill_child,rollback_request")


def test_a_short_soak_in_release_mode_keeps_every_promise(tmp_path: Path) -> None:
    # Release mode with the http probe on /up: seed 7 pushes a build failure, an unhealthy and a
    # crashing release (both rolled back), kills the supervisor mid-deploy and asks for a
    # rollback by hand (about 14 s).
    result, report = soak(tmp_path, "--seed", "7", "--steps", "10", "--mode", "releases",
                          "--faults", RELEASE_FAULTS, limit=90)
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


def test_a_supervisor_killed_after_two_failed_overlaps_can_be_started_again(
        tmp_path: Path) -> None:
    """Found by the soak, fixed: two crashing releases in a row, each rolled back to the
    generation that kept serving, then kill -9 of the supervisor; the next one exited with code
    2, "Address already in use": the serving generation was recorded nowhere (seed 62)."""
    result, report = soak(tmp_path, "--seed", "62", "--steps", "5", "--mode", "releases",
                          "--overlap", "--faults", "kill_supervisor,rollback_request,push_good,"
                          "push_crash_at_start,kill_child", "--stop-on-violation", limit=90)
    assert result["violation_count"] == 0, report


def test_a_supervisor_killed_with_a_socket_can_be_started_again(tmp_path: Path) -> None:
    """Found by the soak: the app left behind held the socket, so the new supervisor could not
    bind it and exited with code 2. Now it stops that app first (seed 2, step 1)."""
    result, report = soak(tmp_path, "--seed", "2", "--steps", "1", "--faults",
                          "kill_supervisor", "--stop-on-violation")
    assert result["violation_count"] == 0, report
    assert result["checks"].get("stale_child_stopped", 0) >= 1, report
