"""End to end, release mode: each commit is checked out into releases/<commit> and built there
while the live release serves; `current` is switched in one rename; a new release is on
probation until healthy, and a release that fails it is rolled back by itself. Real git, real
processes, the example app answering HTTP."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest


def releases(world: Any, health: dict[str, Any] | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Overrides for world.start: release mode under tmp/deploy, a short health gate."""
    return {"deploy": {"mode": "releases", "dir": str(world.tmp / "deploy"), "keep": 2},
            "health": {"grace": "300ms", "timeout": "5s", **(health or {})}, **overrides}


def current(world: Any) -> str:
    return os.path.basename(os.readlink(world.tmp / "deploy" / "current"))


def serving(world: Any, **overrides: Any) -> tuple[Any, int]:
    supervisor, pid = world.start_serving(**releases(world, **overrides))
    supervisor.wait_for("health.passed", commit=world.first)
    return supervisor, pid


class LinkWatcher:
    """Reads `current` as fast as it can while a deploy runs: it must never be missing."""

    def __init__(self, link: Path) -> None:
        self.link, self.reads, self.missing, self.seen = link, 0, 0, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.add(os.readlink(self.link))
            except FileNotFoundError:
                self.missing += 1
            self.reads += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def test_a_good_commit_is_built_beside_the_live_release_then_switched(world):
    gate = world.build_gate()
    supervisor, old_pid = serving(world, build={"command": gate.command()})
    assert current(world) == world.first
    watcher = LinkWatcher(world.tmp / "deploy" / "current")
    gate.shut()

    commit = world.release("2")
    building = supervisor.wait_for("build.started", commit=commit)
    # The build runs in its own release while the old one keeps serving from its own.
    assert (world.tmp / "deploy" / "releases" / commit / "VERSION").read_text() == "2\n"
    # A real checkout of its commit (a detached worktree), so a build may ask git about it.
    assert world.git(world.tmp / "deploy" / "releases" / commit, "rev-parse", "HEAD") == commit
    world.wait_http("hello from 1", supervisor)
    assert world.alive(old_pid)
    assert not supervisor.select(action="stop_child", after=building)
    gate.open()

    started = supervisor.wait_for("child.started", commit=commit, after=building)
    supervisor.wait_for("health.passed", commit=commit, after=started,
                        new_good_release=True)
    world.wait_http("hello from 2", supervisor)
    watcher.close()
    assert current(world) == commit
    assert watcher.missing == 0 and watcher.reads > 100, (watcher.missing, watcher.reads)
    assert watcher.seen == {f"releases/{world.first}", f"releases/{commit}"}
    assert world.head() == world.first, "release mode moved the repository's own tree"
    state = json.loads((world.state_dir / "state.json").read_text())
    assert state["good"] == [world.first, commit]


def test_the_live_release_is_restarted_each_time_it_dies_during_a_build(world):
    """Issue 12, section 8: its release is untouched by the build beside it, so it never
    waits for the build (it once stayed down after a second death until the build ended)."""
    gate = world.build_gate()
    supervisor, pid = serving(world, build={"command": gate.command()},
                              restart={"backoff_min": "200ms", "backoff_max": "1s"})
    gate.shut()
    commit = world.release("2")
    building = supervisor.wait_for("build.started", commit=commit)
    for _ in range(3):
        os.kill(pid, signal.SIGKILL)
        exited = supervisor.wait_for("child.exited", pid=pid, after=building)
        restarted = supervisor.wait_for("child.started", commit=world.first, after=exited)
        pid = restarted["pid"]
        world.wait_http("hello from 1", supervisor)
    assert not supervisor.select("build.succeeded", after=building), "the build still runs"
    gate.open()
    started = supervisor.wait_for("child.started", commit=commit, after=restarted)
    supervisor.wait_for("health.passed", commit=commit, after=started)
    world.wait_http("hello from 2", supervisor)


def test_a_release_that_crashes_at_start_is_rolled_back_and_not_retried(world):
    supervisor, _ = serving(world)

    bad = world.commit({"CRASH": "on purpose\n"}, version="2", message="crashes")
    world.push()
    failed = supervisor.wait_for("health.failed", commit=bad, rollback_to=world.first)
    assert "exit code 3" in failed["reason"]
    assert "CRASH file found" in failed["tail"]
    rolled = supervisor.wait_for("release.rolling_back", after=failed, to=world.first)
    back = supervisor.wait_for("child.started", commit=world.first, after=rolled)
    world.wait_http("hello from 1", supervisor)
    supervisor.wait_for("health.passed", commit=world.first, after=back)
    print(f"\n[rollback] bad release detected -> old release started: "
          f"{supervisor.seconds_between(failed, back) * 1000:.0f} ms by the log's clock")
    assert current(world) == world.first
    assert (world.tmp / "deploy" / "failed" / bad / "CRASH").exists()
    assert not (world.tmp / "deploy" / "releases" / bad).exists()

    # The next polls see the same bad commit upstream: it is not deployed again.
    skipped = supervisor.wait_for("deploy.skipped", upstream=bad, after=back)
    supervisor.wait_for("git.fetched", upstream=bad, after=skipped)
    assert len(supervisor.select("deploy.started", commit=bad)) == 1

    # A newer good commit goes out as usual.
    world.git(world.dev, "rm", "-q", "CRASH")
    fixed = world.release("3")
    supervisor.wait_for("health.passed", commit=fixed, new_good_release=True)
    world.wait_http("hello from 3", supervisor)


def test_a_release_that_fails_its_http_health_check_is_rolled_back(world):
    supervisor, _ = serving(world, health={
        "http": f"http://127.0.0.1:{world.port}/up", "interval": "100ms", "timeout": "2s"})

    bad = world.commit({"UNHEALTHY": "yes\n"}, version="2", message="unhealthy")
    world.push()
    started = supervisor.wait_for("child.started", commit=bad)
    probe = supervisor.wait_for("health.probe_failed", pid=started["pid"], after=started,
                                error="HTTP 503")
    failed = supervisor.wait_for("health.failed", commit=bad, after=probe)
    assert "not healthy within 2s" in failed["reason"] and "HTTP 503" in failed["reason"]
    stop = supervisor.wait_for(action="stop_child", after=probe)
    assert supervisor.action(stop, "stop_child")["pid"] == started["pid"]
    rolled = supervisor.wait_for("release.rolling_back", to=world.first, after=failed)
    assert "tail" in rolled
    supervisor.wait_for("child.started", commit=world.first, after=rolled)
    world.wait_http("hello from 1", supervisor)
    supervisor.wait_for("health.passed", commit=world.first, after=rolled)
    assert current(world) == world.first
    assert not world.alive(started["pid"])


def test_the_rollback_command_goes_back_and_holds_the_release(world):
    supervisor, _ = serving(world)
    second = world.release("2")
    supervisor.wait_for("health.passed", commit=second)
    world.wait_http("hello from 2", supervisor)

    result = world.cli("rollback", config=supervisor.config)
    assert result.returncode == 0, result.stderr
    asked = supervisor.wait_for("release.rollback_requested", to=world.first)
    assert asked["from"] == second
    started = supervisor.wait_for("child.started", commit=world.first, after=asked)
    assert not supervisor.select("build.started", after=asked), "rebuilt a good release"
    world.wait_http("hello from 1", supervisor)
    supervisor.wait_for("health.passed", commit=world.first, after=started)
    supervisor.wait_for("deploy.skipped", upstream=second, after=started)
    status = world.cli("status", "--json", config=supervisor.config)
    assert json.loads(status.stdout)["failed"] == second

    # Nothing older is good now: a second rollback has nowhere to go, and the command says so.
    result = world.cli("rollback", config=supervisor.config)
    assert result.returncode == 1 and "no earlier good release" in result.stderr, result
    supervisor.wait_for("control.ignored", request="rollback", reason="no earlier good release")


def test_rollback_is_refused_in_place(world):
    supervisor, _ = world.start_serving()
    world.cli("rollback", config=supervisor.config)
    supervisor.wait_for("control.ignored", request="rollback",
                        reason='needs deploy.mode = "releases"')


@pytest.mark.parametrize("probe", ["tcp", "command", "notify"])
def test_each_probe_lets_a_healthy_release_through(world, probe):
    health = {"tcp": {"tcp": f"127.0.0.1:{world.port}"},
              "command": {"command": f"test -s VERSION && nc -z 127.0.0.1 {world.port} "
                                     f"|| {_python_connect(world.port)}"},
              "notify": {"notify": True}}[probe]
    supervisor, pid = serving(world, health={**health, "interval": "50ms"})
    passed = supervisor.select("health.probe_passed", pid=pid)
    assert passed, supervisor.tail()
    expected = {"tcp": "connected", "command": "exit code 0", "notify": "READY=1"}[probe]
    assert passed[0]["detail"] == expected
    if probe == "notify":
        assert world.environ_of(pid)["NOTIFY_SOCKET"] == str(world.state_dir / "notify.sock")


def _python_connect(port: int) -> str:
    import sys
    return (f"{sys.executable} -c 'import socket; "
            f"socket.create_connection((\"127.0.0.1\", {port}), 1)'")


def test_notify_from_another_process_does_not_count(world, tmp_path):
    """Only the child's own process group may say READY=1 for it."""
    import socket as sockets

    supervisor = world.start(**releases(world, health={"notify": True, "timeout": "3s"},
                                        app={"env": {"PORT": str(world.port),
                                                     "STATS_FILE": str(world.stats),
                                                     "START_DELAY": "2"}}))
    started = supervisor.wait_for("child.started")
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", str(world.state_dir / "notify.sock"))
    passed = supervisor.wait_for("health.probe_passed", pid=started["pid"])
    assert passed["_t"] - started["_t"] > 1.5, "an outsider's READY=1 was believed"


@pytest.mark.parametrize("moment", ["during the build", "after the switch",
                                    "during probation"])
def test_a_supervisor_killed_mid_deploy_converges(world, moment):
    gate = world.build_gate()
    overrides = releases(world, build={"command": gate.command()},
                         health={"grace": "1s" if moment == "during probation" else "300ms"})
    supervisor, old_pid = world.start_serving(**overrides)
    supervisor.wait_for("health.passed", commit=world.first)
    gate.shut()
    commit = world.release("2")
    supervisor.wait_for("build.output", commit=commit)  # the build runs, at its gate
    if moment != "during the build":
        gate.open()
        started = supervisor.wait_for("child.started", commit=commit)
        if moment == "after the switch":
            assert current(world) == commit
    supervisor.send(signal.SIGKILL)
    supervisor.wait_exit()

    again = world.start(**overrides)
    if moment == "during the build":
        # The build the killed supervisor left is stopped, and the release built anew.
        again.wait_for("build.stale_stopped")
        again.wait_for("build.started", commit=commit)
        gate.open()
    if moment != "during the build":
        # The release `current` points to never proved healthy: it is on probation again.
        again.wait_for("child.stale_stopped", pid=started["pid"])
        again.wait_for("child.started", commit=commit)
    again.wait_for("health.passed", commit=commit, new_good_release=True)
    world.wait_http("hello from 2", again)
    assert current(world) == commit
    assert not world.alive(old_pid)
    assert not list((world.tmp / "deploy").glob("current.tmp"))


def test_a_supervisor_killed_during_probation_of_a_bad_release_rolls_it_back(world):
    overrides = releases(world, health={"grace": "1s", "timeout": "1.5s",
                                        "http": f"http://127.0.0.1:{world.port}/up",
                                        "interval": "100ms"})
    supervisor, _ = world.start_serving(**overrides)
    supervisor.wait_for("health.passed", commit=world.first)
    bad = world.commit({"UNHEALTHY": "yes\n"}, version="2", message="unhealthy")
    world.push()
    supervisor.wait_for("health.probe_failed", error="HTTP 503")
    supervisor.send(signal.SIGKILL)
    supervisor.wait_exit()

    again = world.start(**overrides)
    failed = again.wait_for("health.failed", commit=bad, rollback_to=world.first)
    again.wait_for("child.started", commit=world.first, after=failed)
    world.wait_http("hello from 1", again)
    assert current(world) == world.first


def test_a_build_waits_for_memory_and_goes_on_when_it_is_there(world):
    supervisor, _ = serving(world, build={"min_free": 0})
    config = supervisor.config
    config.write_text(config.read_text().replace("min_free = 0", 'min_free = "1000GiB"'))
    supervisor.send(signal.SIGHUP)
    supervisor.wait_for("config.reloaded", applied=lambda keys: "build.min_free" in keys)

    commit = world.release("2")
    waiting = supervisor.wait_for("build.waiting_for_memory", commit=commit)
    assert waiting["min_free"] == 1000 << 30 and waiting["available"] > 0
    world.wait_http("hello from 1", supervisor)  # the live release serves on

    config.write_text(config.read_text().replace('min_free = "1000GiB"', "min_free = 0"))
    supervisor.send(signal.SIGHUP)
    supervisor.wait_for("build.memory_available", commit=commit, after=waiting)
    supervisor.wait_for("health.passed", commit=commit)
    world.wait_http("hello from 2", supervisor)


def test_the_build_runs_at_a_lower_cpu_and_io_priority(world):
    command = ("echo nice=$(cut -d' ' -f19 /proc/self/stat) "
               "io=$(ionice -p $$ | tr -d ' ') && sh build.sh")
    supervisor, _ = serving(world, build={"command": command, "nice": 7})
    lines = [r["line"] for r in supervisor.select("build.output")]
    assert "nice=7 io=best-effort:prio7" in lines, lines


def test_old_releases_are_pruned_to_keep(world):
    supervisor, _ = serving(world)
    for version in ("2", "3", "4"):
        commit = world.release(version)
        supervisor.wait_for("health.passed", commit=commit, new_good_release=True)
    removed = supervisor.wait_for("release.removed")
    world.wait_until(
        lambda: sorted(p.name for p in (world.tmp / "deploy" / "releases").iterdir())
        == sorted(json.loads((world.state_dir / "state.json").read_text())["good"][-2:]),
        10, "old releases to be removed")
    assert removed["commit"] in (world.first,)
