"""End to end: the supervisor under a stand-in for systemd's notify socket — a real AF_UNIX
datagram socket bound in the test's directory, named in NOTIFY_SOCKET with WATCHDOG_USEC. Each
datagram is received with the sender's credentials (SO_PASSCRED), so we know who sent it."""

from __future__ import annotations

import array
import itertools
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Datagram:
    at: float  # when the test received it, time.time()
    pid: int  # the sender's, from SCM_CREDENTIALS
    fields: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return "\n".join(f"{key}={value}" for key, value in self.fields)

    def get(self, key: str) -> str | None:
        return dict(self.fields).get(key)


class Manager:
    """What systemd does with $NOTIFY_SOCKET: receive datagrams, note who sent them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.received: list[Datagram] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        fds = array.array("i")
        while not self.closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(UCRED.size) + socket.CMSG_SPACE(16 * fds.itemsize))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = UCRED.unpack(payload[:UCRED.size])[0]
            fields = tuple(tuple(line.split("=", 1)) for line in data.decode().split("\n")
                           if line)
            with self.cond:
                self.received.append(Datagram(time.time(), pid, fields))  # type: ignore[arg-type]
                self.cond.notify_all()

    def select(self, key: str, value: str | None = None, after: int = 0) -> list[int]:
        """Indexes of datagrams holding `key` (with `value`, or any) from index `after` on."""
        with self.cond:
            return [i for i, d in enumerate(self.received) if i >= after and d.get(key)
                    is not None and (value is None or d.get(key) == value)]

    def wait(self, key: str, predicate=lambda value: True, after: int = 0,
             timeout: float = 15.0) -> int:
        """Index of the first datagram from `after` on whose `key` satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.received)):
                    value = self.received[i].get(key)
                    if value is not None and predicate(value):
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    texts = [d.text for d in self.received if d.get("WATCHDOG") is None]
                    pytest.fail(f"no {key}= datagram as expected within {timeout}s; got {texts}")
                self.cond.wait(remaining)

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def manager(tmp_path):
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    manager = Manager(path)
    try:
        yield manager
    finally:
        manager.close()


def test_sd_notify_datagrams_on_a_real_socket(world, manager):
    gate, build_env = world.build_gate(), world.tmp / "build.env"
    gate.shut()  # the first build waits for the test: READY=1 must wait for the child
    supervisor = world.start(env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "200000"},
                             build={"command": gate.command(f"sh build.sh && env > {build_env}")})

    building = manager.wait("STATUS", lambda v: v.startswith("building "))
    assert manager.received[building].get("STATUS") == f"building {world.first[:12]}"
    supervisor.wait_for("build.started")
    manager.wait("WATCHDOG", after=building + 1)  # time passes with the build still blocked
    assert not manager.select("READY"), "READY=1 before the first child is up"
    gate.open()

    started = supervisor.wait_for("child.started")
    ready = manager.wait("READY")
    assert manager.received[ready].get("READY") == "1"
    assert manager.received[ready].at >= world.parse_ts(started["ts"]), "READY before the child"
    running = manager.wait("STATUS", lambda v: v.startswith("running "), after=building)
    assert running > ready
    assert manager.received[running].get("STATUS").startswith(f"running {world.first[:12]}")

    # The watchdog: WATCHDOG=1 every WATCHDOG_USEC/2 = 100 ms, from the supervisor's loop.
    first_ping = manager.wait("WATCHDOG", after=ready)
    manager.wait("WATCHDOG", after=manager.select("WATCHDOG", after=first_ping)[0] + 1)
    for _ in range(8):
        manager.wait("WATCHDOG", after=manager.select("WATCHDOG")[-1] + 1)
    pings = [manager.received[i].at for i in manager.select("WATCHDOG", "1")]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert len(pings) >= 10
    assert 0.07 <= gaps[len(gaps) // 2] <= 0.2, f"median gap {gaps[len(gaps) // 2]:.3f}s"
    assert gaps[-1] < 0.8, f"a gap of {gaps[-1]:.3f}s between pings"

    # Neither the app nor the build may speak for us: they never see systemd's variables.
    child_env = world.environ_of(started["pid"])
    assert not set(SYSTEMD_ONLY) & set(child_env), sorted(set(SYSTEMD_ONLY) & set(child_env))
    assert child_env["PORT"] == str(world.port)
    build_vars = dict(line.split("=", 1) for line in build_env.read_text().splitlines()
                      if "=" in line)
    assert not set(SYSTEMD_ONLY) & set(build_vars)
    assert "SUPERVISOR_COMMIT" in build_vars

    # STATUS follows the phases: a drain says what it waits for.
    client = world.idle_client()
    world.wait_stats('n_clients="1"')
    commit = world.release("2")
    mark = len(manager.received)
    supervisor.send(signal.SIGUSR1)
    draining = manager.wait("STATUS", lambda v: v.startswith(f"draining for {commit[:12]}: "
                                                             "n_clients=1"), after=mark)
    client.release()
    supervisor.wait_for("child.started", commit=commit)
    back = manager.wait("STATUS", lambda v: v.startswith(f"running {commit[:12]}"),
                        after=draining)
    statuses = [manager.received[i].get("STATUS") for i in manager.select("STATUS", after=mark)
                if i <= back]
    assert any(s.startswith(f"building {commit[:12]}") for s in statuses), statuses
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 once the config is read.
    mark = len(manager.received)
    supervisor.send(signal.SIGHUP)
    supervisor.wait_for("config.reloaded")
    reloading = manager.wait("RELOADING", after=mark)
    assert manager.received[reloading].get("MONOTONIC_USEC").isdigit()
    usec = int(manager.received[reloading].get("MONOTONIC_USEC"))
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
    assert manager.wait("READY", after=reloading) > reloading

    # SIGTERM: STOPPING=1 while the supervisor still runs, and nothing claims readiness after.
    mark = len(manager.received)
    assert supervisor.stop() == 0
    stopping = manager.wait("STOPPING", after=mark, timeout=2)
    assert manager.received[stopping].get("STOPPING") == "1"
    assert manager.wait("STATUS", lambda v: v == "stopping", after=mark) > stopping
    assert not manager.select("READY", after=stopping)
    assert len(manager.select("STOPPING")) == 1
    requested = supervisor.select("supervisor.stop_requested")[0]
    assert manager.received[stopping].at >= world.parse_ts(requested["ts"])

    # Every datagram came from the supervisor itself, none from the child or the build.
    senders = {d.pid for d in manager.received}
    assert senders == {supervisor.pid}, senders
    assert len(manager.select("READY")) == 2  # at start-up and after the reload


def test_the_drain_status_counts_the_seconds_it_waits(world, manager):
    """While a client holds the deploy back nothing else happens (no fetch for an hour), yet
    `systemctl status` must not say "for 0s" all along: the line is refreshed each second."""
    supervisor, _ = world.start_serving(env={"NOTIFY_SOCKET": str(manager.path)},
                                        git={"poll_interval": "1h"})
    client = world.idle_client()
    world.wait_stats('n_clients="1"')
    commit = world.release("2")
    mark = len(manager.received)
    supervisor.send(signal.SIGUSR1)
    prefix = f"draining for {commit[:12]}: n_clients=1 for "

    def waited(value: str) -> float:
        return float(value.removeprefix(prefix).split(",")[0].removesuffix("s"))

    first = manager.wait("STATUS", lambda v: v.startswith(prefix), after=mark)
    assert waited(manager.received[first].get("STATUS")) < 1
    later = manager.wait("STATUS", lambda v: v.startswith(prefix) and waited(v) >= 2,
                         after=first + 1, timeout=6)
    assert manager.received[later].at - manager.received[first].at < 4
    client.release()
    supervisor.wait_for("child.started", commit=commit)


def test_a_failed_reload_shows_in_the_status_line_until_a_good_one(world, manager):
    """Issue 14, rough edge 4: `systemctl reload` with a broken config once left `systemctl
    status` saying nothing; only the journal had config.reload_failed."""
    supervisor, _ = world.start_serving(env={"NOTIFY_SOCKET": str(manager.path)})
    config = world.tmp / "supervisor.toml"
    good = config.read_text()
    config.write_text(good.replace("[restart]", "[restart]\nbackof_max = \"9s\""))
    command = world.cli("reload")
    assert command.returncode == 2 and "restart.backof_max: unknown key" in command.stderr
    mark = len(manager.received)
    supervisor.send(signal.SIGHUP)
    failed = manager.wait("STATUS", lambda v: v.startswith("reload failed: "), after=mark)
    assert "restart.backof_max" in manager.received[failed].get("STATUS")
    config.write_text(good)
    result = world.cli("reload")
    assert result.returncode == 0 and "it did" in result.stdout, result
    manager.wait("STATUS", lambda v: not v.startswith("reload failed"), after=failed + 1)
