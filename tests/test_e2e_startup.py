"""End to end: what a run claims before its loop starts (supervisor.loop.startup). The app a
killed supervisor left behind is stopped once, under the new run's lock, before the [[socket]]s
are bound (it holds their port); a stop asked for meanwhile is honoured cleanly, not fatally."""

from __future__ import annotations

import signal
import sys

# Takes 2 s to go on SIGTERM, and says when it got it.
STALE_APP = ("import pathlib, signal, sys, time\n"
             "def going(*_):\n"
             "    pathlib.Path(sys.argv[1]).touch()\n"
             "    time.sleep(2)\n"
             "    sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, going)\n"
             "while True:\n"
             "    time.sleep(1)\n")


def test_a_stop_asked_for_while_the_stale_app_is_stopped_ends_the_run_cleanly(world):
    marker = world.tmp / "stale-got-term"
    first = world.start(socket=[{"listen": f"127.0.0.1:{world.port}", "name": "web"}],
                        app={"command": [sys.executable, "-c", STALE_APP, str(marker)],
                             "stop_timeout": "10s"},
                        drain=None)
    stale = first.wait_for("child.started")["pid"]
    first.send(signal.SIGKILL)  # the supervisor only: its app keeps the socket's port
    first.wait_exit()
    assert world.alive(stale)

    second = world.start(config=first.config)
    # The stale app has its SIGTERM and takes 2 s to go: the new run is still claiming.
    world.wait_until(marker.exists, 10, "the stale app to be asked to stop")
    second.send(signal.SIGTERM)
    assert second.wait_exit() == 0, second.tail()

    assert not world.alive(stale)
    found = second.select("child.stale_found")
    assert [r["pid"] for r in found] == [stale], "stopped once, by one piece of code"
    second.wait_for("child.stale_stopped", pid=stale, after=found[0])
    requested = second.wait_for("supervisor.stop_requested", signal="SIGTERM")
    assert requested["_i"] > found[0]["_i"]
    assert not second.select("child.started"), "a stop before the first start starts nothing"
    second.wait_for("supervisor.stopped")


def test_a_run_that_cannot_start_leaves_the_stale_app_serving(world):
    socket = [{"listen": f"127.0.0.1:{world.port}", "name": "web"}]
    first, stale = world.start_serving(socket=socket)
    first.send(signal.SIGKILL)
    first.wait_exit()

    broken = world.write_config("broken.toml", socket=socket,
                                app={"cwd": str(world.tmp / "gone")})
    second = world.start(config=broken)
    assert second.wait_exit() == 2
    assert f"app.cwd: {world.tmp / 'gone'} is not a directory" in "\n".join(second.lines)
    assert world.alive(stale), "nothing could replace it, so it was left serving"
    assert world.http() == "hello from 1"

    again = world.start(config=first.config)  # fixed: now it is replaced
    again.wait_for("child.stale_stopped", pid=stale)
    world.wait_http("hello from 1", again)
