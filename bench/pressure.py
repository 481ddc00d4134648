"""The supervisor under pressure (issue 12, section 7), measured on one tree of the code:

    output   an app writing stdout at full speed (`--app python`: numbered lines of 71 bytes;
             `--app yes`: "y" lines, which the log also collapses as repeats):
             the supervisor's share of a core over --seconds, and how much its log grew
    usr1     a flood of SIGUSR1 for --seconds: how many log lines it left, in how many files,
             whether `supervisor.started` survived, then how long a SIGTERM takes to end it

    python3 bench/pressure.py output --app yes              # this tree
    python3 bench/pressure.py usr1 --tree /path/to/other    # another checkout, for "before"

The supervisor runs on Debian's /usr/bin/python3 (what users run; --python to change), from a
temporary directory with a bare remote and a clone, `poll_interval = "1h"`. Every process started
here is stopped by its pid; a SIGTERM not honoured within 30 s is reported and followed by SIGKILL.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# Numbered lines, so that the log's collapse of identical lines does not hide what they cost.
FLOODS = {"python": ["/usr/bin/python3", "-c", "import itertools, sys\n"
                     "for n in itertools.count(): sys.stdout.write('%09d %s\\n' % (n, 'x' * 60))"],
          "yes": ["yes"]}


def setup(tree: str, command: list[str], log_file: bool) -> tuple[Path, dict[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="pressure-"))
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@a", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@a", PYTHONPATH=tree)
    for args in (["init", "-q", "--bare", "-b", "main", str(tmp / "remote.git")],
                 ["clone", "-q", str(tmp / "remote.git"), str(tmp / "app")],
                 ["-C", str(tmp / "app"), "commit", "-q", "--allow-empty", "-m", "x"],
                 ["-C", str(tmp / "app"), "push", "-q", "origin", "main"]):
        subprocess.run(["git", *args], check=True, env=env, capture_output=True, timeout=60)
    lines = [f"[app]\ncommand = {json.dumps(command)}\nstate_dir = \"{tmp}/state\"",
             f"[git]\nrepo = \"{tmp}/app\"\npoll_interval = \"1h\""]
    if log_file:
        lines.append(f"[log]\nfile = \"{tmp}/events.log\"")
    (tmp / "s.toml").write_text("\n".join(lines) + "\n")
    return tmp, env


def start(tmp: Path, env: dict[str, str], python: str, stderr: object) -> subprocess.Popen[bytes]:
    # cwd: `python -m` puts it first on sys.path, before PYTHONPATH's tree
    return subprocess.Popen([python, "-m", "supervisor", "run", "-c", str(tmp / "s.toml")],
                            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stderr=stderr)


def wait_for(path: Path, text: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not (path.exists() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text} in {path} within {limit:g}s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[bytes]) -> str:
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return "not honoured within 30s"
    return f"{time.monotonic() - started:.2f}s"


def output(args: argparse.Namespace) -> str:
    tmp, env = setup(args.tree, FLOODS[args.app], log_file=False)
    try:
        log = tmp / "stderr.log"
        with open(log, "wb") as stderr:
            process = start(tmp, env, args.python, stderr)
            wait_for(log, "child.started")
            time.sleep(1.0)  # the first lines and the first fetch
            cpu, size, began = cpu_seconds(process.pid), log.stat().st_size, time.monotonic()
            time.sleep(args.seconds)
            share = (cpu_seconds(process.pid) - cpu) / (time.monotonic() - began)
            grown = log.stat().st_size - size
            stop(process)
        return (f"{args.tree}: app {args.app}: supervisor CPU {share:.1%} of a core over "
                f"{args.seconds:g}s; its log grew {grown / 1e3:,.0f} kB")
    finally:
        shutil.rmtree(tmp)


def usr1(args: argparse.Namespace) -> str:
    tmp, env = setup(args.tree, ["sleep", "1000"], log_file=True)
    try:
        process = start(tmp, env, args.python, subprocess.DEVNULL)
        wait_for(tmp / "events.log", "child.started")
        sent, deadline = 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for _ in range(1000):
                os.kill(process.pid, signal.SIGUSR1)
            sent += 1000
        took = stop(process)
        files = sorted(p.name for p in tmp.glob("events.log*"))
        records = [json.loads(line) for name in files
                   for line in (tmp / name).read_text().splitlines()]
        kinds = collections.Counter(r["event"] for r in records).most_common(4)
        kept = any(r["event"] == "supervisor.started" for r in records)
        return (f"{args.tree}: {sent} SIGUSR1 in {args.seconds:g}s: {len(records)} log lines in "
                f"{len(files)} file(s), supervisor.started kept: {kept}; SIGTERM after it: "
                f"{took}\n  most lines: {kinds}")
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("output", "usr1"))
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent),
                        help="the checkout whose supervisor runs (default: this one)")
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--app", choices=sorted(FLOODS), default="python")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(output(args) if args.what == "output" else usr1(args))


if __name__ == "__main__":
    main()
