"""The fleet's chaos soak, short (issue 15): a fixed seed for a few steps against five real
supervisors and a real three-member etcd; zero violations expected. The long run, and what each
invariant means, are in docs/soak.md ("A fleet"): `.venv/bin/python -m tests.soak.fleet`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.etcdtest import need_etcd

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Seed 212's 5 steps (about 32 s with the start and the final rollout): a bad commit pushed and
# a box killed -9 while it rolls out, the canary cut off from etcd (black hole) and its app
# crashed meanwhile, the etcd leader killed -9 mid-rollout, a rollout, an app crashed
# mid-rollout; then a last good commit everywhere and a SIGTERM to every box.
SEED, STEPS = 212, 5


def test_a_short_fleet_soak_keeps_every_promise(tmp_path: Path) -> None:
    need_etcd()
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.soak.fleet", "--seed", str(SEED), "--steps", str(STEPS),
         "--json", str(summary), "--dir", str(tmp_path / "runs"), "--quiet"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    report = run.stdout + run.stderr
    assert summary.exists(), report
    result = json.loads(summary.read_text())
    assert result["exit_code"] == run.returncode == 0, report
    assert result["violation_count"] == 0, report
    assert result["steps"] == STEPS
    assert sum(result["faults"].values()) == STEPS
    for invariant in ("converged", "max_parallel_prober", "max_parallel_log",
                      "no_stop_for_held", "bad_on_canaries_only", "supervisor_alive",
                      "no_traceback", "no_driver_crashed", "etcd_members_alive", "clean_exit"):
        assert result["checks"].get(invariant, 0) > 0, f"{invariant} never checked\n{report}"
    assert result["commits"]["bad"] >= 1 and result["fleet_events"].get("fleet.held_for_group")
    assert result["prober_rounds"] > 100
