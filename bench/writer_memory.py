"""What the writer thread costs a running supervisor: ten idle apps in one process, a build from
another tree (before the thread) beside one from this tree (after), side by side in one run
(PSS splits shared pages, so only figures of one run compare). Reuses bench/many.py's worlds
and its ours-in-one-process system.

    python3 bench/writer_memory.py --before /path/to/a/checkout/without/the/writer

Prints PSS, RSS and private (kB, the supervisor process alone, from /proc/PID/smaps_rollup) and
its thread count (/proc/PID/status), after --idle seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, GIT_ENV, Started, memory_kb
from many import OursOne, World, hard_stop
from run import make_venv, pip


class OursFrom(OursOne):
    """Ours in one process, from the venv given (many.py's OursOne runs bench/.venv-debian)."""

    def __init__(self, worlds: list[World], root: Path, venv: Path, key: str) -> None:
        super().__init__(worlds, root)
        self.venv, self.key = venv, key

    def start(self) -> None:
        self.processes = [Started([str(self.venv / "bin" / "python"), "-m", "supervisor", "run",
                                   "-c", str(self.main)], cwd=self.root,
                                  env={**os.environ, **GIT_ENV}, name=self.key)]


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise ValueError("no Threads line")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a tree without the thread")
    parser.add_argument("--apps", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    watchdog = threading.Timer(15 * 60, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    venvs = {"before": BENCH / ".venv-writer-before", "after": BENCH / ".venv-writer-after"}
    for key, tree in (("before", args.before), ("after", BENCH.parent)):
        make_venv(venvs[key])
        pip(venvs[key], "--force-reinstall", str(tree))
    scratch = Path(tempfile.mkdtemp(prefix="supervisor-writer-"))
    stats = scratch / "stats"
    stats.mkdir()
    try:
        tools = []
        for key, venv in venvs.items():
            (scratch / key).mkdir()
            worlds = [World(scratch, stats, f"{key}{index:02d}") for index in range(args.apps)]
            tools.append(OursFrom(worlds, scratch / key, venv, key))
        for tool in tools:
            tool.start()
        for tool in tools:
            tool.wait_ready(60 + 5 * args.apps)
        for tool in tools:
            tool.settled()
        time.sleep(args.idle)
        for tool in tools:
            tool.settled()
            pid = tool.roots()[0]
            values = memory_kb(pid)
            print(f"{tool.key}: apps={args.apps} idle_s={args.idle:.0f} pss_kb={values['pss']} "
                  f"rss_kb={values['rss']} private_kb={values['private']} "
                  f"threads={threads(pid)}", flush=True)
    finally:
        Started.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
