"""sd_notify on real AF_UNIX datagram sockets: a socket bound here plays systemd's part, reads
each datagram with the sender's credentials (as systemd checks NotifyAccess=) and closes any file
descriptor passed along (as systemd does with systemd-notify's barrier). No mocks; every wait is
bounded.
"""

from __future__ import annotations

import array
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.core.machine import Phase
from supervisor.drivers.sdnotify import Notifier, status_line, watchdog_interval

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # generous: a passing test never waits this long


@dataclass(frozen=True)
class Datagram:
    data: bytes
    pid: int | None  # the sender, from SCM_CREDENTIALS
    fds: int  # file descriptors it carried, already closed

    @property
    def fields(self) -> dict[str, str]:
        """KEY=value lines, as systemd parses them."""
        return dict(line.partition("=")[::2] for line in self.data.decode().split("\n") if line)


class Manager:
    """The service manager's end: a bound datagram socket that records what arrives."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = WAIT) -> Datagram:
        self.sock.settimeout(timeout)
        ancillary_space = socket.CMSG_SPACE(struct.calcsize("3i")) + socket.CMSG_SPACE(16 * 4)
        data, ancillary, _, _ = self.sock.recvmsg(4096, ancillary_space)
        pid, fds = None, 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                passed = array.array("i")
                passed.frombytes(payload[:len(payload) - len(payload) % passed.itemsize])
                for fd in passed:
                    os.close(fd)
                fds += len(passed)
        return Datagram(data, pid, fds)

    def receive_all(self, count: int) -> list[Datagram]:
        return [self.receive() for _ in range(count)]

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path):
    manager = Manager(str(tmp_path / "notify"))
    try:
        yield manager
    finally:
        manager.close()


def notifier_for(path: Path | str) -> Notifier:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier is not None
    return notifier


def monotonic_usec() -> int:
    return time.monotonic_ns() // 1000


# ---------------------------------------------------------------------------------------------
# The datagrams


def test_messages_arrive_in_order_with_exact_payloads(manager):
    notifier = notifier_for(manager.address)
    before = monotonic_usec()
    assert notifier.status("starting")
    assert notifier.ready()
    assert notifier.status("running abc1234, next fetch in 5m")
    assert notifier.reloading()
    after = monotonic_usec()
    assert notifier.ready()
    assert notifier.stopping()
    assert notifier.watchdog()
    assert notifier.send(STATUS="draining", ERRNO=0)

    received = manager.receive_all(8)
    assert [d.data for d in received[:3]] == [
        b"STATUS=starting", b"READY=1", b"STATUS=running abc1234, next fetch in 5m"]
    reloading = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", received[3].data)
    assert reloading, received[3].data
    assert before <= int(reloading[1]) <= after
    assert [d.data for d in received[4:]] == [
        b"READY=1", b"STOPPING=1", b"WATCHDOG=1", b"STATUS=draining\nERRNO=0"]
    assert {d.pid for d in received} == {os.getpid()}
    assert manager.nothing_waiting()


def test_a_newline_in_a_value_cannot_make_a_field_of_its_own(manager):
    notifier = notifier_for(manager.address)
    notifier.status("deploy of abc failed: bad commit message\nREADY=1")
    datagram = manager.receive()
    assert datagram.fields == {"STATUS": "deploy of abc failed: bad commit message READY=1"}


def test_a_status_equal_to_the_last_one_is_not_sent_again(manager):
    notifier = notifier_for(manager.address)
    for text in ("running abc1234", "running abc1234", "draining", "running abc1234"):
        notifier.status(text)
    assert [d.data for d in manager.receive_all(3)] == [
        b"STATUS=running abc1234", b"STATUS=draining", b"STATUS=running abc1234"]
    assert manager.nothing_waiting()


def test_an_abstract_socket_name_starts_with_at():
    name = f"supervisor-test-{os.getpid()}-{secrets.token_hex(4)}"
    manager = Manager(b"\0" + name.encode())
    try:
        notifier = notifier_for("@" + name)
        assert notifier.ready()
        assert manager.receive().data == b"READY=1"
    finally:
        manager.close()


@pytest.mark.parametrize("environ", [
    {},
    {"NOTIFY_SOCKET": ""},
    {"NOTIFY_SOCKET": "@"},
    {"NOTIFY_SOCKET": "relative/notify"},
    {"NOTIFY_SOCKET": "vsock:2:1234"},
])
def test_without_a_usable_notify_socket_there_is_no_notifier(environ):
    assert Notifier.from_environ(environ) is None


def open_fds() -> set[int]:
    """Our open fds, less the one that listed them (closed by now, so it cannot be read)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        fds.add(int(name))
    return fds


def test_the_socket_is_made_on_first_send_and_is_not_inherited(manager):
    before = open_fds()
    notifier = notifier_for(manager.address)
    assert open_fds() == before, "a socket before anything was sent"
    notifier.ready()
    new = open_fds() - before - {manager.sock.fileno()}
    assert len(new) == 1, new
    assert not os.get_inheritable(new.pop())
    notifier.watchdog()
    assert len(open_fds() - before) == 1, "one socket for every message"
    notifier.close()
    assert open_fds() == before


def test_a_vanished_manager_is_ignored_and_a_new_one_is_heard(tmp_path):
    path = tmp_path / "notify"
    notifier = notifier_for(path)
    assert not notifier.ready()  # never existed
    manager = Manager(str(path))
    assert notifier.status("running")
    assert manager.receive().data == b"STATUS=running"
    manager.close()
    assert not notifier.watchdog()  # bound path left behind, nobody listening: ECONNREFUSED
    path.unlink()
    assert not notifier.watchdog()  # gone: ENOENT
    assert not notifier.status("draining")
    path.write_text("not a socket")
    assert not notifier.stopping()
    path.unlink()
    manager = Manager(str(path))  # systemd re-executed itself: the same path, a new socket
    try:
        assert notifier.status("draining")  # not sent before, so not deduplicated away
        assert manager.receive().data == b"STATUS=draining"
    finally:
        manager.close()


def test_a_manager_that_does_not_read_never_blocks_the_sender(manager):
    notifier = notifier_for(manager.address)
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(notifier.watchdog()
                                                            for _ in range(2000)))
    try:
        sender.start()
        sender.join(WAIT)
        assert not sender.is_alive(), "sending blocked on a full socket"
    finally:
        manager.close()  # wakes a blocked sender, if it ever was
        sender.join(WAIT)
    assert results[0] and not results[-1], "the queue filled up; later messages were dropped"


# ---------------------------------------------------------------------------------------------
# The watchdog


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "200000"}, 0.1),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OURS"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_PID": "OURS"}, None),
])
def test_watchdog_interval(environ, expected):
    environ = {k: str(os.getpid()) if v == "OURS" else v for k, v in environ.items()}
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_for_a_given_pid():
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}
    assert watchdog_interval(environ, pid=4242) == 0.5
    assert watchdog_interval(environ, pid=4243) is None


# The program under test: pings from its event loop, then a callback that blocks the loop for
# BLOCK seconds, bracketed by two marker datagrams. Datagrams on one socket keep their order, so
# the markers tell exactly which pings were sent while the loop was blocked.
WATCHDOG_PROGRAM = """
import asyncio, os, time
from supervisor.drivers.sdnotify import Notifier, watchdog_interval, watchdog_pings

BEFORE, BLOCK, AFTER = 0.6, 1.0, 0.5

async def main():
    notifier = Notifier.from_environ(os.environ)
    interval = watchdog_interval(os.environ)
    notifier.send(X_INTERVAL=interval)
    loop = asyncio.get_running_loop()
    pings = loop.create_task(watchdog_pings(notifier, interval))
    unblocked = asyncio.Event()

    def block():
        notifier.send(X_LOOP="blocked")
        time.sleep(BLOCK)
        notifier.send(X_LOOP="unblocked")
        unblocked.set()

    loop.call_later(BEFORE, block)
    await unblocked.wait()
    await asyncio.sleep(AFTER)
    pings.cancel()
    notifier.stopping()

asyncio.run(main())
"""


def test_watchdog_pings_come_at_the_interval_and_stop_while_the_loop_is_blocked(manager):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "NOTIFY_SOCKET": str(manager.address),
           "WATCHDOG_USEC": "200000"}
    # WATCHDOG_PID is the program's own pid, as systemd sets it: `exec` keeps the shell's pid.
    program = subprocess.Popen(
        ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" -c "$1"', sys.executable, WATCHDOG_PROGRAM],
        env=env, stdin=subprocess.DEVNULL)
    try:
        received = []
        deadline = time.monotonic() + WAIT
        while not received or received[-1].fields != {"STOPPING": "1"}:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no STOPPING=1; got {[d.data for d in received]}"
            received.append(manager.receive(remaining))
        assert program.wait(WAIT) == 0
    finally:
        program.kill()
        program.wait()

    assert {d.pid for d in received} == {program.pid}  # what NotifyAccess=main checks
    kinds = ["ping" if d.data == b"WATCHDOG=1" else d.data.decode() for d in received]
    assert kinds[0] == "X_INTERVAL=0.1"
    blocked, unblocked = kinds.index("X_LOOP=blocked"), kinds.index("X_LOOP=unblocked")
    before, during, after = (kinds[1:blocked], kinds[blocked + 1:unblocked],
                             kinds[unblocked + 1:-1])
    assert during == [], "pinged while the loop was blocked"
    # 0.6 s at one ping per 0.1 s is about 7 pings, 0.5 s about 6: wide bounds, since a loaded
    # machine may delay a ping but the count still shows the interval is seconds, not usec.
    assert set(before) == {"ping"} and 3 <= len(before) <= 12, kinds
    assert set(after) == {"ping"} and 2 <= len(after) <= 10, kinds


# ---------------------------------------------------------------------------------------------
# systemd's own client, to check our reading of the protocol against it


def test_systemd_notify_sends_what_we_send_plus_a_barrier(manager):
    tool = "/usr/bin/systemd-notify"
    assert os.access(tool, os.X_OK), "systemd-notify is missing: apt-get install systemd"
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.address)}
    started = time.monotonic()
    process = subprocess.Popen([tool, "--ready", "--status=running abc1234"], env=env,
                               stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        message, barrier = manager.receive_all(2)
        # It waits (5 s) until the barrier's fd is closed on our side: closed at once here.
        _, errors = process.communicate(timeout=WAIT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, errors
    assert time.monotonic() - started < 4.0, "systemd-notify waited for its barrier"
    assert message.fields == {"READY": "1", "STATUS": "running abc1234"}
    assert message.fds == 0
    assert barrier.fields == {"BARRIER": "1"}
    assert barrier.fds == 1

    notifier_for(manager.address).send(READY=1, STATUS="running abc1234")
    assert manager.receive().data == message.data, "not byte for byte what systemd sends"


# ---------------------------------------------------------------------------------------------
# The STATUS line

RUNNING = {"commit": "abc1234f00d", "pid": 4321}


@pytest.mark.parametrize(("phase", "values", "expected"), [
    ("starting", {}, "starting"),
    ("running", {**RUNNING, "stats": {"n_clients": "3"}, "next_fetch": 240},
     "running abc1234f00d, 3 clients, next fetch in 4m"),
    ("running", {**RUNNING, "stats": {"n_clients": "1"}, "next_fetch": 299.9},
     "running abc1234f00d, 1 client, next fetch in 4m"),
    ("running", {**RUNNING, "next_fetch": 0}, "running abc1234f00d, fetching"),
    ("running", {**RUNNING, "next_fetch": 7200, "failed": "0123456789"},
     "running abc1234f00d, next fetch in 2h, deploy of 0123456789 failed"),
    ("running", {**RUNNING, "stats": {"n_authed": "1"}}, "running abc1234f00d"),
    ("running", {"commit": "abc1234f00d", "pid": None}, "starting abc1234f00d"),
    ("running", {"pid": 4321}, "running"),
    ("backoff", {"crashes": 5, "backoff": 8}, "backing off 8s after 5 crashes"),
    ("backoff", {"crashes": 2, "backoff": 0.5}, "backing off 0.5s after 2 crashes"),
    ("backoff", {"crashes": 1}, "backing off after 1 crash"),
    ("draining", {**RUNNING, "target": "def5678beef", "stats": {"n_clients": "3"},
                  "waiting": 720},
     "draining for def5678beef: n_clients=3 for 12m"),
    ("draining", {**RUNNING, "target": "def5678beef", "waiting": 5},
     "draining for def5678beef: no stats yet for 5s"),
    ("draining", {**RUNNING, "target": "def5678beef", "stats": {"n_clients": "2", "n_authed": "1"},
                  "waiting": 3700, "pending": "0123456789"},
     "draining for def5678beef: n_clients=2 n_authed=1 for 1h1m, 0123456789 next"),
    ("draining", {**RUNNING, "target": "def5678beef",
                  "stats": {"a": "1", "b": "2", "n_clients_connected_now": "3" * 40}},
     "draining for def5678beef: a=1 b=2 ..."),
    ("draining", {**RUNNING, "target": "def5678beef",
                  "stats": {"n_clients_connected_now": "3" * 40}},
     "draining for def5678beef: n_clients_conne~=333333333333333~"),
    ("updating", {**RUNNING, "target": "def5678beef"},
     "updating to def5678beef, abc1234f00d serving"),
    ("updating", {"target": "def5678beef"}, "updating to def5678beef"),
    ("building", {**RUNNING, "target": "def5678beef", "pending": "0123456789"},
     "building def5678beef, abc1234f00d serving, 0123456789 next"),
    ("restarting", {**RUNNING, "target": "def5678beef"}, "restarting into def5678beef"),
    ("awaiting_slot", {**RUNNING, "target": "def5678beef"},
     "waiting for a fleet slot for def5678beef, abc1234f00d serving"),
    ("probation", RUNNING, "proving healthy: abc1234f00d"),
    ("rolling_back", RUNNING, "stopping unhealthy abc1234f00d"),
    ("shutting_down", RUNNING, "stopping"),
    ("held", RUNNING, "held, stopping abc1234f00d"),
    ("held", {"commit": "abc1234f00d"}, "held, app stopped by stop-child"),
    ("stopped", {}, "stopped"),
    ("running", {**RUNNING, "next_fetch": 90000}, "running abc1234f00d, next fetch in 1d1h"),
    ("running", {**RUNNING, "next_fetch": 45.4}, "running abc1234f00d, next fetch in 45s"),
])
def test_status_line(phase, values, expected):
    assert status_line(phase, **values) == expected


def test_every_phase_has_a_short_status_line():
    values = {**RUNNING, "stats": {"n_clients": "12", "n_authed": "3", "queue": "4" * 40},
              "next_fetch": 86399, "target": "def5678beef", "pending": "0123456789",
              "waiting": 86399, "crashes": 12, "backoff": 60, "failed": "fedcba9876"}
    for phase in Phase:
        line = status_line(phase, **values)
        assert line and "\n" not in line and len(line) <= 80, (phase, line)
        assert line.split()[0].rstrip(",") in (
            "starting", "running", "backing", "draining", "updating", "building", "restarting",
            "held", "stopping", "stopped", "proving", "waiting"), line


def test_a_line_too_long_for_one_row_drops_words_not_facts():
    """Real commits are 40 characters and show as 12: the summary still fits 80 columns."""
    full = {"commit": "a" * 40, "pid": 7, "stats": {"n_clients": "12", "n_authed": "3", "q": "4"},
            "next_fetch": 86399, "target": "b" * 40, "pending": "c" * 40, "waiting": 86399,
            "failed": "d" * 40}
    assert status_line("running", **full) == (
        f"running {'a' * 12}, 12 clients, next fetch in 23h59m, {'d' * 12} failed")
    assert status_line("draining", **full) == (
        f"draining for {'b' * 12}: n_clients=12 ... for 23h59m, {'c' * 12} next")
    roomy = {**full, "stats": {"n_clients": "1"}, "next_fetch": 60}
    assert status_line("running", **roomy) == (
        f"running {'a' * 12}, 1 client, next fetch in 1m, deploy of {'d' * 12} failed")
    for phase in Phase:
        assert len(status_line(phase, **full)) <= 80, phase
