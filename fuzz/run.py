"""Run every fuzz target for a bounded time and report, per target, the executions, the new
coverage atheris found, and the failures (the target is zero). Exits 1 on any failure.

    .venv/bin/python fuzz/run.py                  # 60 s per target, as many at once as cores
    .venv/bin/python fuzz/run.py --seconds 1200 --jobs 4
    .venv/bin/python fuzz/run.py --target config --seconds 10

Failing inputs go to fuzz/crashes/ (one per distinct failure, the smallest seen, with a .txt
that has the traceback); each target's output to fuzz/out/TARGET.log and the inputs atheris
found to fuzz/out/TARGET/, which later runs start from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
TARGETS = ("stats", "condition", "config", "trigger")
GRACE = 60  # seconds past --seconds before a target that does not stop is killed


@dataclass
class Result:
    target: str
    engine: str = "?"
    executions: int = 0
    coverage: str = "-"  # libFuzzer's cov/ft at the end
    new_units: int | None = None
    failures: list[dict[str, object]] = field(default_factory=list)
    exit_code: int | None = None
    problem: str | None = None  # the process itself failed: killed, crashed, timed out

    @property
    def failed(self) -> bool:
        return bool(self.failures) or self.problem is not None


def run_target(target: str, args: argparse.Namespace) -> Result:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log, summary = out / f"{target}.log", out / f"{target}.json"
    summary.unlink(missing_ok=True)
    command = [sys.executable, str(FUZZ_DIR / f"fuzz_{target}.py"),
               "--seconds", str(args.seconds), "--crash-dir", str(args.crash_dir.resolve()),
               "--corpus-dir", str(out / target), "--summary", str(summary),
               "--sandbox", str(out / f"{target}.sandbox")]
    if args.runs:
        command += ["--runs", str(args.runs)]
    if args.seed:
        command += ["--seed", str(args.seed)]
    environ = {**os.environ, "FUZZ_ENGINE": args.engine, "PYTHONUNBUFFERED": "1"}
    result = Result(target, engine=args.engine)
    with open(log, "wb") as output:
        try:
            process = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, env=environ,
                                     timeout=args.seconds + GRACE if not args.runs else None)
            result.exit_code = process.returncode
        except subprocess.TimeoutExpired:
            result.problem = f"did not stop within {args.seconds + GRACE}s"
    text = log.read_text(errors="replace")
    if summary.exists():
        data = json.loads(summary.read_text())
        result.executions, result.failures = data["executions"], data["failures"]
    if match := re.search(r"stat::number_of_executed_units:\s+(\d+)", text):
        result.executions = int(match.group(1))  # exact; the summary may lag by a second
    if match := re.search(r"stat::new_units_added:\s+(\d+)", text):
        result.new_units = int(match.group(1))
    if coverage := re.findall(r"cov: (\d+) ft: (\d+)", text):
        result.coverage = f"{coverage[-1][0]}/{coverage[-1][1]}"
    if result.problem is None and result.exit_code != 0:
        artifact = re.search(r"Test unit written to (\S+)", text)
        result.problem = (f"exit code {result.exit_code}"
                          + (f", input in {artifact.group(1)}" if artifact else "")
                          + f"; see {log}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--runs", type=int, default=0,
                        help="stop each target after this many inputs instead")
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="only this target (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="targets run at once (default: the number of cores)")
    parser.add_argument("--engine", choices=("atheris", "mutate"),
                        default="atheris" if find_spec("atheris") else "mutate",
                        help="atheris if it is installed, else a seeded mutation fuzzer")
    parser.add_argument("--seed", type=int, default=0, help="fixed random seed (0: random)")
    parser.add_argument("--crash-dir", type=Path, default=FUZZ_DIR / "crashes")
    parser.add_argument("--out", type=Path, default=FUZZ_DIR / "out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    targets = args.target or list(TARGETS)

    started = time.monotonic()
    budget = f"{args.runs} inputs" if args.runs else f"{args.seconds}s"
    print(f"fuzzing {', '.join(targets)} for {budget} each with {args.engine}, "
          f"{args.jobs} at once", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda target: run_target(target, args), targets))

    print(f"\n{'target':<10} {'executions':>11} {'cov/ft':>10} {'new inputs':>10} "
          f"{'failures':>8}")
    for result in results:
        new = "-" if result.new_units is None else str(result.new_units)
        print(f"{result.target:<10} {result.executions:>11} {result.coverage:>10} {new:>10} "
              f"{len(result.failures):>8}")
    for result in results:
        for failure in result.failures:
            print(f"\n{result.target}: {failure['signature']} ({failure['count']} inputs)\n"
                  f"  {failure['message']}\n  smallest input: {failure['input']}")
        if result.problem:
            print(f"\n{result.target}: the fuzzer itself stopped: {result.problem}")
    print(f"\n{time.monotonic() - started:.0f}s; "
          f"{sum(len(r.failures) for r in results)} failures")
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=1))
    return 1 if any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
