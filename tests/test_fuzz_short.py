"""A short run of every byte-level fuzz target in fuzz/ (the long one is `fuzz/run.py`):
atheris for about 3 s each, all four at once, or where atheris is not installed, the seeded
mutation fuzzer for a fixed number of inputs, which is deterministic. Zero failures expected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "fuzz" / "run.py"
TARGETS = {"stats", "condition", "config", "trigger"}


def test_every_fuzz_target_runs_briefly_without_a_failure(tmp_path: Path) -> None:
    if find_spec("atheris") is not None:
        budget = ["--engine", "atheris", "--seconds", "3"]
    else:
        budget = ["--engine", "mutate", "--runs", "1500"]
    results = tmp_path / "results.json"
    process = subprocess.run(
        [sys.executable, str(RUN), *budget, "--seed", "1", "--jobs", "4",
         "--out", str(tmp_path / "out"), "--crash-dir", str(tmp_path / "crashes"),
         "--json", str(results)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    report = process.stdout + process.stderr
    assert process.returncode == 0, report
    by_target = {result["target"]: result for result in json.loads(results.read_text())}
    assert set(by_target) == TARGETS, report
    for target, result in by_target.items():
        assert result["failures"] == [] and result["problem"] is None, report
        assert result["executions"] >= 100, f"{target} barely ran\n{report}"
