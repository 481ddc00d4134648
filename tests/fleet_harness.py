"""Boxes of a fleet for the end-to-end tests (issue 15): N supervisors, each with its own clone of
one remote, its own port, state and releases, and a [fleet] naming a real etcd cluster (through
a TCP proxy of the test's own, so a box can be cut off). A prober thread asks every box's app
for its answer every few milliseconds, so "never more than max_parallel out" is checked
continuously, not sampled once.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import GIT_ENV, Supervisor, World, _toml, wait_until
from tests.etcdtest import EtcdCluster, TcpProxy


class Box:
    def __init__(self, fleet: Fleet, index: int, name: str) -> None:
        self.fleet, self.index, self.name = fleet, index, name
        self.dir = fleet.world.tmp / name
        self.dir.mkdir()
        self.app = self.dir / "app"
        subprocess.run(["git", "clone", "-q", str(fleet.world.remote), str(self.app)],
                       env=GIT_ENV, check=True, capture_output=True, timeout=60)
        self.port = World.free_port()
        self.stats = self.dir / "stats"
        self.state_dir = self.dir / "state"
        self.proxies = [TcpProxy("127.0.0.1", int(e.rsplit(":", 1)[1]))
                        for e in fleet.etcd.endpoints]
        self.supervisor: Supervisor | None = None

    def cut_off(self, mode: str = "blackhole") -> None:
        for proxy in self.proxies:
            proxy.mode = mode

    def reconnect(self) -> None:
        for proxy in self.proxies:
            proxy.mode = "pass"

    def config(self, **overrides: dict[str, Any]) -> Path:
        world = self.fleet.world
        sections: dict[str, dict[str, Any]] = world.config_sections()
        sections["app"] |= {"name": "web", "state_dir": str(self.state_dir),
                            "env": {"PORT": str(self.port), "STATS_FILE": str(self.stats)}}
        sections["git"]["repo"] = str(self.app)
        sections["drain"]["stats_file"] = str(self.stats)
        sections["deploy"] = {"mode": "releases", "dir": str(self.dir / "deploy"), "keep": 3}
        sections["health"] = {"grace": "300ms", "timeout": "5s"}
        sections["fleet"] = {"endpoints": [f"http://{p.address}" for p in self.proxies],
                             "box": self.name, "lease_ttl": "2s", "group": "web",
                             "prefix": self.fleet.prefix,
                             **self.fleet.policy}
        for section, values in overrides.items():
            sections[section] = {**sections.get(section, {}), **values}
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
            lines.append("")
        path = self.dir / "supervisor.toml"
        path.write_text("\n".join(lines))
        return path

    def start(self, **overrides: dict[str, Any]) -> Supervisor:
        world = self.fleet.world
        self.supervisor = Supervisor(self.config(**overrides), self.dir, world.children)
        world.supervisors.append(self.supervisor)
        return self.supervisor

    def http(self, timeout: float = 0.5) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/",
                                        timeout=timeout) as response:
                return response.read().decode().strip()
        except (urllib.error.URLError, OSError):
            return None

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()


class Prober:
    """Asks every box in turn, over and over, and keeps for each box the spans in which its app
    did not answer "hello from ...": from the first failed answer of a run of failures to the
    last one. Boxes whose spans overlap were out at the same time."""

    def __init__(self, boxes: list[Box]) -> None:
        self.boxes = boxes
        self.rounds = 0
        self.spans: list[tuple[float, float, str]] = []
        self._open: dict[str, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fleet-prober")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for box in self.boxes:
                asked = time.time()
                answer = box.http(timeout=1.0)
                if answer is not None and answer.startswith("hello from"):
                    if box.name in self._open:
                        first, last = self._open.pop(box.name)
                        with self._lock:
                            self.spans.append((first, last, box.name))
                else:
                    first, _ = self._open.get(box.name, (asked, asked))
                    self._open[box.name] = (first, asked)
            self.rounds += 1
            time.sleep(0.005)

    def take(self) -> list[tuple[float, float, str]]:
        """The spans closed since the last take (the soak checks them step by step); a span
        still open stays for the next take."""
        with self._lock:
            spans, self.spans = self.spans, []
        return spans

    def close(self) -> list[tuple[float, float, str]]:
        """Every span of every box, those still open included."""
        self._stop.set()
        self._thread.join(5)
        return self.spans + [(first, last, name) for name, (first, last) in self._open.items()]


class Fleet:
    def __init__(self, world: World, etcd: EtcdCluster, size: int, prefix: str,
                 **policy: Any) -> None:
        self.world, self.etcd = world, etcd
        self.prefix = "/" + "".join(c if c.isalnum() or c in "/-_" else "_"
                                    for c in prefix.strip("/"))
        self.policy = {"max_parallel": 1, "canary": 1, **policy}
        self.boxes = [Box(self, i, f"box-{i}") for i in range(size)]
        world.cleanups.append(self.close)

    def start(self, **overrides: dict[str, Any]) -> None:
        for box in self.boxes:
            box.start(**overrides)
        for box in self.boxes:
            assert box.supervisor is not None
            box.supervisor.wait_for("health.passed", commit=self.world.first)
            box.supervisor.wait_for("fleet.started")

    def serving(self, version: str, timeout: float = 30.0) -> None:
        wait_until(lambda: all(b.http() == f"hello from {version}" for b in self.boxes),
                   timeout, f"every box to serve {version}",
                   lambda: "\n".join(f"{b.name}: {b.http()}" for b in self.boxes) + "\n"
                   + "\n".join(b.supervisor.tail(25) for b in self.boxes if b.supervisor))

    def out_intervals(self, commit: str) -> list[tuple[float, float, str]]:
        """From each box's own log: when it stopped its app for `commit` until the new release
        passed its health gate (or the box rolled back)."""
        intervals = []
        for box in self.boxes:
            assert box.supervisor is not None
            log = box.supervisor
            for stop in log.select(action="stop_child",
                                   where=lambda r: any(a.get("reason", "").startswith(
                                       f"deploy {commit}") for a in r.get("actions", []))):
                end = log.select("health.passed", after=stop) or log.select(
                    "release.rolling_back", after=stop)
                finish = World.parse_ts(end[0]["ts"]) if end else float("inf")
                intervals.append((World.parse_ts(stop["ts"]), finish, box.name))
        return intervals

    def close(self) -> None:
        for box in self.boxes:
            with contextlib.suppress(Exception):
                box.close()


def most_at_once(intervals: list[tuple[float, float, str]]) -> int:
    """The largest number of intervals that overlap at one instant."""
    edges = sorted([(start, 1) for start, _, _ in intervals]
                   + [(end, -1) for _, end, _ in intervals], key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most
