"""End to end in a real memory cgroup of 128 MB, as on the box: an app holding 45 MB must survive
a build that wants 300 MB and a build of three 35 MB workers (the OOM killer takes the build,
which is `build.failed` with the reason "out of memory"); build.min_free counts the cgroup's
limit, not the host's MemAvailable; build.memory_max caps a build in a cgroup of its own."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.drivers import cgroup

MiB = 1 << 20
# The app: 45 MB of touched memory, then the example server.
BALLAST = ('import runpy\nballast = b"\\1" * (45 << 20)\n'
           'runpy.run_path("server.py", run_name="__main__")\n')
PYTHON = sys.executable


class MemoryCgroup:
    """A memory cgroup of our own under the test's own one, limited to `limit` bytes. Whatever
    runs in it was started by this test; it is killed and the cgroup removed, pass or fail."""

    def __init__(self, limit: int) -> None:
        hierarchy = cgroup.memory_hierarchy()
        if hierarchy is None or not os.access(hierarchy.path, os.W_OK):
            pytest.skip("no writable memory cgroup on this machine")
        self.version = hierarchy.version
        self.path = Path(hierarchy.path) / f"tiny-supervisor-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / limit_file).write_text(str(limit))

    def wrapper(self, directory: Path) -> str:
        """An executable that joins the cgroup, then runs this Python: the supervisor started
        through it, and everything it starts, live in the cgroup from their first instruction."""
        script = directory / "python-in-cgroup"
        script.write_text(f'#!/bin/sh\necho $$ > {self.path}/cgroup.procs || exit 99\n'
                          f'exec {PYTHON} "$@"\n')
        script.chmod(0o755)
        return str(script)

    def procs(self) -> list[int]:
        pids = []
        for directory in [self.path, *[p for p in self.path.iterdir() if p.is_dir()]]:
            pids += [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
        return pids

    def oom_kills(self) -> int:
        return cgroup.oom_kills_above(cgroup.Hierarchy(self.version, str(self.path),
                                                       str(self.path)))

    def remove(self) -> None:
        import select

        for _ in range(20):
            pids = self.procs()
            if not pids:
                break
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    select.select([fd], [], [], 5.0)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        for child in [p for p in self.path.iterdir() if p.is_dir()]:
            child.rmdir()
        self.path.rmdir()


@pytest.fixture
def box() -> Iterator[MemoryCgroup]:
    group = MemoryCgroup(128 * MiB)
    try:
        yield group
    finally:
        group.remove()


def start_in(world, box: MemoryCgroup, monkeypatch, build: str, **build_keys):
    (world.app / "ballast.py").write_text(BALLAST)
    monkeypatch.setattr(sys, "executable", box.wrapper(world.tmp))
    supervisor = world.start(app={"command": [PYTHON, "ballast.py"]}, drain=None,
                             build={"command": build, "timeout": "60s", **build_keys})
    started = supervisor.wait_for("child.started", timeout=30)
    world.wait_http("hello from 1", supervisor)
    app = started["pid"]
    assert app in box.procs() and supervisor.pid in box.procs()
    return supervisor, app


def only_for_version_2(command: str) -> str:
    return f'test "$(cat VERSION)" = 1 && exit 0; {command}'


THREE_WORKERS = only_for_version_2(
    # Three workers of 35 MB each, alive at once; the build fails if any of them does.
    " ".join(f'{PYTHON} -c "import time; b = b\'\\\\1\' * (35 << 20); time.sleep(3)" & p{i}=$!;'
             for i in (1, 2, 3)) + ' wait $p1 && wait $p2 && wait $p3')


@pytest.mark.parametrize("build", [
    only_for_version_2(f"{PYTHON} -c \"b = b'\\\\1' * (300 << 20)\""),
    THREE_WORKERS,
], ids=["300MB", "3x35MB"])
def test_the_app_survives_a_build_that_does_not_fit(world, box, monkeypatch, build):
    supervisor, app = start_in(world, box, monkeypatch, build)
    kills = box.oom_kills()
    mark = supervisor.mark()

    world.release("2")
    failed = supervisor.wait_for("build.failed", after=mark, timeout=60)

    assert failed["reason"] == "out of memory", failed
    assert box.oom_kills() > kills, "the OOM killer really ran"
    assert supervisor.select("child.exited", after=mark) == [], "the app was not killed"
    assert world.alive(app)
    world.wait_http("hello from 1", supervisor)
    supervisor.wait_for("deploy.failed", after=failed)
    assert supervisor.stop() == 0


def test_memory_max_caps_the_build_in_a_cgroup_of_its_own(world, box, monkeypatch):
    supervisor, app = start_in(world, box, monkeypatch, THREE_WORKERS, memory_max="60MiB")
    mark = supervisor.mark()
    box_kills = box.oom_kills()

    world.release("2")
    failed = supervisor.wait_for("build.failed", after=mark, timeout=60)

    assert failed["reason"] == "out of memory", failed
    assert supervisor.select("build.uncapped") == []
    assert world.alive(app)
    world.wait_http("hello from 1", supervisor)
    # The cap was the build's cgroup's, not the box's: our 128 MB cgroup saw no OOM kill.
    assert box.oom_kills() == box_kills
    assert [p.name for p in box.path.iterdir() if p.is_dir()] == [], "its cgroup is removed"
    assert supervisor.stop() == 0


def test_min_free_counts_the_cgroups_limit_not_the_hosts_memory(world, box, monkeypatch):
    supervisor, _ = start_in(world, box, monkeypatch, only_for_version_2("true"))
    # From now on (the start-up build had to run first): a build waits for 200 MiB.
    world.write_config(app={"command": [PYTHON, "ballast.py"]}, drain=None,
                       build={"command": only_for_version_2("true"), "timeout": "60s",
                              "min_free": "200MiB"})
    mark = supervisor.mark()
    supervisor.send(signal.SIGHUP)
    supervisor.wait_for("config.reloaded", after=mark)

    world.release("2")
    waiting = supervisor.wait_for("build.waiting_for_memory", after=mark)

    assert waiting["available"] < 128 * MiB
    assert supervisor.select("build.started", after=mark) == []
    assert supervisor.stop() == 0


def test_available_memory_is_the_lower_of_the_host_and_the_cgroup(box, tmp_path: Path):
    import subprocess

    script = ("from supervisor.drivers import procfs; "
              "print(procfs.available_memory(), procfs.host_available_memory())")
    output = subprocess.run([box.wrapper(tmp_path), "-c", script], capture_output=True,
                            text=True, timeout=30, check=True).stdout.split()
    available, host = int(output[0]), int(output[1])
    assert available < 128 * MiB < host
    assert available > 64 * MiB  # an interpreter and its imports use the rest


def test_the_build_is_first_for_the_oom_killer_and_the_app_gets_its_own_score(world):
    # The supervisor may not lower its own score here (no CAP_SYS_RESOURCE); either way the
    # build runs at 1000 (its workers inherit it) and the app at app.oom_score_adj.
    supervisor = world.start(app={"oom_score_adj": 300}, drain=None,
                             build={"command": "echo build $(cat /proc/self/oom_score_adj); sh "
                                               "-c 'echo worker $(cat /proc/self/oom_score_adj)'"})
    started = supervisor.wait_for("child.started")
    # Two different lines: identical ones would be collapsed into one log.repeated line.
    lines = [r["line"] for r in supervisor.select("build.output")]
    assert lines == ["build 1000", "worker 1000"]
    assert Path(f"/proc/{started['pid']}/oom_score_adj").read_text().strip() == "300"
    supervisor_score = int(Path(f"/proc/{supervisor.pid}/oom_score_adj").read_text())
    refused = supervisor.select("supervisor.oom_protection_refused")
    assert supervisor_score == -900 or (refused and refused[0]["kept"] == supervisor_score)
    assert supervisor.stop() == 0
