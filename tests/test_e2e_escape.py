"""End to end: no process escapes its generation or its build. An app whose child calls setsid()
and forks a grandchild (the grandchild leaves the group, its parent exits) and a build that
starts `setsid sleep 1000 &` both leave processes that killing a process group does not reach;
the supervisor is their subreaper and kills them when what started them ends."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# The app: a grandchild in a session of its own binds ESCAPE_PORT (so a survivor makes the next
# generation's grandchild fail with EADDRINUSE, as on the box) and records its pid; the app
# then serves, or with CRASH=1 exits at once.
ESCAPER = r"""
import os, socket, sys, time
port = int(os.environ["ESCAPE_PORT"])
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        try:
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError as error:
            with open("escaped.failed", "a") as f:
                f.write(f"{os.getpid()} {error}\n")
            os.write(ready_w, b"e")
            os._exit(1)
        with open("escaped.pids", "a") as f:
            f.write(f"{os.getpid()}\n")
        os.write(ready_w, b"x")
        time.sleep(1000)
    os._exit(0)
os.wait()
os.read(ready_r, 1)
if os.environ.get("CRASH"):
    sys.exit(1)
import runpy
runpy.run_path("server.py", run_name="__main__")
"""


def pids_in(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def gone(pid: int) -> bool:
    """Not running: no such process, or only a zombie left for its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def escaper_config(world, **env: str) -> dict:
    (world.app / "escaper.py").write_text(ESCAPER)
    port = world.free_port()
    return {"command": [sys.executable, "escaper.py"],
            "env": {"PORT": str(world.port), "STATS_FILE": str(world.stats),
                    "ESCAPE_PORT": str(port), **env}}


def killed_pids(supervisor, event: str) -> set[int]:
    return {pid for record in supervisor.select(event) for pid in record["pids"]}


def test_five_crash_restarts_leave_no_escaped_grandchild(world):
    supervisor = world.start(app=escaper_config(world, CRASH="1"), drain=None,
                             restart={"backoff_min": "50ms", "backoff_max": "100ms"})
    pids_file = world.app / "escaped.pids"
    world.wait_until(lambda: len(pids_in(pids_file)) >= 6, 30, "six generations' grandchildren")
    mark = supervisor.mark()
    assert supervisor.stop() == 0

    # Reaping the orphans never took a generation's own exit status: each crash is exit code 1.
    crashes = supervisor.select("child.exited", where=lambda r: r["_i"] < mark)
    assert len(crashes) >= 5
    assert {r["exit_code"] for r in crashes} == {1}

    grandchildren = pids_in(pids_file)
    assert not (world.app / "escaped.failed").exists(), \
        "a grandchild found the port still held by the previous generation's"
    assert [pid for pid in grandchildren if not gone(pid)] == []
    assert set(grandchildren) <= killed_pids(supervisor, "child.escaped_killed")
    first = supervisor.select("child.escaped_killed")[0]
    assert first["names"] == ["python3"] or first["names"]  # what ran is named
    # Each generation's grandchild is killed before the machine hears the generation ended.
    for record in supervisor.select("child.escaped_killed"):
        exited = supervisor.wait_for("child.exited", pid=record["pid"])
        assert exited["_i"] > record["_i"]


def test_stop_child_and_the_supervisors_stop_kill_the_escaped_grandchild(world):
    supervisor = world.start(app=escaper_config(world), drain=None)
    supervisor.wait_for("child.started")
    world.wait_http("hello from 1", supervisor)
    pids_file = world.app / "escaped.pids"
    world.wait_until(lambda: pids_in(pids_file), 10, "the grandchild")
    first = pids_in(pids_file)[0]
    assert not gone(first)

    assert world.cli("stop-child").returncode == 0
    record = supervisor.wait_for("child.escaped_killed")
    assert first in record["pids"]
    supervisor.wait_for("child.exited", after=record)  # told once the escaped ones are gone
    assert gone(first)

    assert world.cli("start-child").returncode == 0
    world.wait_until(lambda: len(pids_in(pids_file)) == 2, 10, "the next grandchild")
    second = pids_in(pids_file)[1]
    assert not gone(second)
    assert supervisor.stop() == 0
    assert gone(second)
    assert second in killed_pids(supervisor, "child.escaped_killed")
    assert not (world.app / "escaped.failed").exists()


def test_a_builds_daemon_is_killed_when_the_build_ends_and_the_apps_is_not(world):
    daemon_file = world.tmp / "daemon.pid"
    # Version 2's build leaves a daemon in a session of its own (waiting until it is there, so
    # that it really escaped the build's group), then fails.
    build = ('test "$(cat VERSION)" = 1 && exit 0; setsid sleep 1000 & daemon=$!; '
             'until [ "$(cut -d" " -f6 /proc/$daemon/stat)" = $daemon ]; do :; done; '
             f'echo $daemon > {daemon_file}; exit 5')
    supervisor = world.start(app=escaper_config(world), drain=None,
                             build={"command": build})
    supervisor.wait_for("child.started")
    pids_file = world.app / "escaped.pids"
    world.wait_until(lambda: pids_in(pids_file), 10, "the app's grandchild")
    apps = pids_in(pids_file)[0]

    mark = supervisor.mark()
    world.release("2")
    failed = supervisor.wait_for("build.failed", after=mark)
    assert failed["reason"] == "exit code 5"
    daemon = int(daemon_file.read_text())
    record = supervisor.wait_for("build.escaped_killed", after=mark)
    assert record["pids"] == [daemon]
    assert record["names"] == ["sleep"]
    assert record["_i"] < failed["_i"]
    assert gone(daemon)
    # The app's own escaped grandchild belongs to the generation still serving: it stays.
    assert not gone(apps)
    assert apps not in killed_pids(supervisor, "child.escaped_killed")
    assert supervisor.stop() == 0
    assert gone(apps)


def test_an_orphan_that_ends_by_itself_is_reaped_not_left_a_zombie(world):
    # The grandchild exits on its own after a moment: it came back to us and must be reaped.
    script = ("import os, time\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              "    if os.fork() == 0:\n"
              "        open('orphan.pid', 'w').write(str(os.getpid()))\n"
              "        time.sleep(0.3)\n"
              "        os._exit(0)\n"
              "    os._exit(0)\n"
              "os.wait()\n"
              "import runpy\n"
              "runpy.run_path('server.py', run_name='__main__')\n")
    (world.app / "orphan.py").write_text(script)
    supervisor, _ = world.start_serving(app={"command": [sys.executable, "orphan.py"]})
    pid_file = world.app / "orphan.pid"
    world.wait_until(lambda: pid_file.exists() and pid_file.read_text(), 10, "the orphan")
    orphan = int(pid_file.read_text())
    world.wait_until(lambda: not os.path.exists(f"/proc/{orphan}"), 10,
                     "the orphan reaped (no zombie left under the supervisor)")
    assert supervisor.stop(signal.SIGTERM) == 0
