"""Memory and idle CPU of a running supervisor with one child (the example app, drain configured).

    python bench/memory.py [--python /usr/bin/python3] [--idle 60]

Sets up a bare remote and a clone in a temporary directory, starts `supervisor run` with the given
interpreter (which must have this package installed, e.g. a venv made from Debian's python3),
waits until the child answers, stays idle for --idle seconds, then reads the supervisor's
/proc/PID/smaps_rollup (Pss, Rss, private) and its CPU time. Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "supervisor" / "example_app"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smaps(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    data = Path(f"/proc/{pid}/stat").read_text()
    fields = data[data.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_up(root: Path, port: int) -> Path:
    git("init", "-q", "--bare", "-b", "main", "remote.git", cwd=root)
    dev = root / "dev"
    git("clone", "-q", str(root / "remote.git"), str(dev), cwd=root)
    for name in ("server.py", "VERSION"):
        shutil.copy(APP / name, dev / name)
    git("add", "-A", cwd=dev)
    git("commit", "-qm", "v1", cwd=dev)
    git("push", "-q", "origin", "main", cwd=dev)
    app = root / "app"
    git("clone", "-q", str(root / "remote.git"), str(app), cwd=root)
    config = root / "supervisor.toml"
    config.write_text(f"""
[app]
command = ["{sys.executable}", "server.py"]
state_dir = "{root / 'state'}"
env = {{ PORT = "{port}", STATS_FILE = "{root / 'stats'}" }}
[git]
repo = "{app}"
poll_interval = "5m"
[build]
command = "true"
[drain]
stats_file = "{root / 'stats'}"
until = "n_clients == 0"
""")
    return config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default=sys.executable, help="interpreter running supervisor")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds idle before measuring")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="supervisor-bench-") as tmp:
        root, port = Path(tmp), free_port()
        config = set_up(root, port)
        supervisor = subprocess.Popen([args.python, "-m", "supervisor", "run", "-c", str(config)],
                                      stderr=subprocess.DEVNULL, cwd=root)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the example app never answered") from None
                    time.sleep(0.1)
            cpu_before = cpu_seconds(supervisor.pid)
            time.sleep(args.idle)
            cpu_idle = cpu_seconds(supervisor.pid) - cpu_before
            memory = smaps(supervisor.pid)
            threads = len(os.listdir(f"/proc/{supervisor.pid}/task"))
        finally:
            supervisor.send_signal(signal.SIGTERM)
            supervisor.wait(timeout=30)
    python = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                            capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "python": f"{args.python} ({python})", "idle_seconds": args.idle,
        "pss_kb": memory["Pss"], "rss_kb": memory["Rss"],
        "private_kb": memory["Private_Clean"] + memory["Private_Dirty"],
        "threads": threads, "idle_cpu_seconds": round(cpu_idle, 3),
        "idle_cpu_seconds_per_hour": round(cpu_idle * 3600 / args.idle, 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
