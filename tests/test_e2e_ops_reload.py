"""End to end: SIGHUP re-reads the config of a running supervisor. A broken config changes
nothing and says why; a valid one applies what can change live (backoff, the app's environment
from its next start) and reports what needs a restart of the supervisor (repository, state dir)."""

from __future__ import annotations

import os
import signal

import pytest


def crash(supervisor, after) -> dict:
    """Kill the current child; returns the note that decides its restart."""
    started = supervisor.select("child.started")[-1]
    os.kill(started["pid"], signal.SIGKILL)
    exited = supervisor.wait_for("child.exited", pid=started["pid"], after=after)
    return supervisor.wait_for(after=exited, where=lambda r: r["event"] in (
        "child.restarting", "child.backing_off", "child.crash_looping"))


def test_a_broken_config_is_reported_and_the_old_one_keeps_working(world):
    supervisor, pid = world.start_serving(restart={"backoff_min": "200ms", "backoff_max": "2s"})
    config = supervisor.config
    good = config.read_text()

    config.write_text(good + "\n[restart\n")
    supervisor.send(signal.SIGHUP)
    failed = supervisor.wait_for("config.reload_failed")
    assert failed["config"] == str(config)
    [problem] = failed["problems"]
    assert problem.startswith(f"{config}: not valid TOML: ")
    assert "line" in problem

    # An unknown key next to a valid change: nothing of it is taken.
    config.write_text(good.replace('backoff_min = "200ms"', 'backoff_min = "1s"')
                      .replace("[restart]", "[restart]\nbackof_max = \"9s\""))
    supervisor.send(signal.SIGHUP)
    failed = supervisor.wait_for("config.reload_failed", after=failed)
    assert failed["problems"] == ["restart.backof_max: unknown key"]
    assert not supervisor.select("config.reloaded")

    # The old backoff still holds: the first crash restarts at once, the second after 200 ms.
    first = crash(supervisor, failed)
    assert (first["event"], first["delay"]) == ("child.restarting", 0.0)
    supervisor.wait_for("child.started", after=first)
    second = crash(supervisor, first)
    assert (second["event"], second["crashes"]) == ("child.backing_off", 2)
    assert second["delay"] == pytest.approx(0.2)
    restarted = supervisor.wait_for("child.started", after=second)
    world.wait_http("hello from 1", supervisor)
    assert restarted["pid"] != pid


def test_a_valid_change_is_applied_and_what_needs_a_restart_is_reported(world):
    supervisor, pid = world.start_serving(
        app={"env": {"PORT": str(world.port), "STATS_FILE": str(world.stats),
                     "GREETING": "old"}},
        restart={"backoff_min": "200ms", "backoff_max": "2s"})
    config = supervisor.config
    assert world.environ_of(pid)["GREETING"] == "old"

    world.write_config(app={"env": {"PORT": str(world.port), "STATS_FILE": str(world.stats),
                                    "GREETING": "new", "EXTRA": "1"}},
                       restart={"backoff_min": "300ms", "backoff_max": "2s"})
    supervisor.send(signal.SIGHUP)

    reloaded = supervisor.wait_for("config.reloaded")
    assert sorted(reloaded["applied"]) == ["app.env", "restart.backoff_min"]
    assert reloaded["not_applied"] == []
    assert world.environ_of(pid)["GREETING"] == "old", "the running child is left alone"
    assert world.alive(pid) and not supervisor.select("child.exited")

    first = crash(supervisor, reloaded)
    assert first["delay"] == 0.0
    started = supervisor.wait_for("child.started", after=first)
    # Read once it serves: /proc/PID/environ of a process that is gone (a zombie) is empty.
    world.wait_http("hello from 1", supervisor)
    env = world.environ_of(supervisor.select("child.started", after=first)[-1]["pid"])
    assert (env.get("GREETING"), env.get("EXTRA")) == ("new", "1"), (started, env)
    second = crash(supervisor, first)
    assert (second["event"], second["crashes"]) == ("child.backing_off", 2)
    assert second["delay"] == pytest.approx(0.3), "the new backoff_min is not in use"
    supervisor.wait_for("child.started", after=second)
    world.wait_http("hello from 1", supervisor)

    # Where the state lives and which repository: only a restart of the supervisor changes them.
    old_config = world.tmp / "old.toml"
    old_config.write_text(config.read_text())
    other_repo, other_state = world.tmp / "other-app", world.tmp / "other-state"
    world.git(world.tmp, "clone", "-q", str(world.remote), str(other_repo))
    config.write_text(config.read_text().replace(str(world.state_dir), str(other_state))
                      .replace(f'repo = "{world.app}"', f'repo = "{other_repo}"'))
    supervisor.send(signal.SIGHUP)
    kept = supervisor.wait_for("config.reloaded", after=reloaded)
    assert {"git.repo", "app.state_dir"} <= set(kept["not_applied"])
    assert not {"git.repo", "app.state_dir"} & set(kept["applied"])
    assert not other_state.exists()
    # It still answers requests in its old state dir (and none in the new one) ...
    assert world.cli("deploy").returncode == 2
    result = world.cli("deploy", config=old_config)
    assert result.stdout.startswith(f"asked supervisor {supervisor.pid} to deploy")
    checked = supervisor.wait_for("git.check_requested", after=kept)
    # ... and fetches into its own tree.
    fetched = supervisor.wait_for("git.fetched", after=checked)
    assert fetched["head"] == world.first == world.head()
    world.wait_status(lambda s: s["last_fetch"]["at"] >= fetched["ts"],
                      "the fetch in the old state dir", supervisor)
    assert not other_state.exists()


def test_a_repo_change_that_is_not_applied_does_not_move_the_app(world):
    supervisor, _ = world.start_serving()
    other_repo = world.tmp / "other-app"
    world.git(world.tmp, "clone", "-q", str(world.remote), str(other_repo))
    config = supervisor.config
    config.write_text(config.read_text().replace(f'repo = "{world.app}"',
                                                 f'repo = "{other_repo}"'))
    supervisor.send(signal.SIGHUP)
    reloaded = supervisor.wait_for("config.reloaded")
    assert reloaded["not_applied"] == ["git.repo"]

    commit = world.release("2")
    started = supervisor.wait_for("child.started", commit=commit, after=reloaded)
    assert world.head() == commit
    assert os.readlink(f"/proc/{started['pid']}/cwd") == str(world.app), (
        "the new release runs from a tree the supervisor does not update")
    world.wait_http("hello from 2", supervisor, timeout=3)


def test_a_reloaded_app_env_reaches_the_next_build_too(world):
    supervisor, _ = world.start_serving(
        app={"env": {"PORT": str(world.port), "STATS_FILE": str(world.stats),
                     "GREETING": "old"}},
        build={"command": 'sh build.sh && echo "greeting $GREETING"'})
    assert supervisor.select("build.output", line="greeting old")
    world.write_config(app={"env": {"PORT": str(world.port), "STATS_FILE": str(world.stats),
                                    "GREETING": "new"}},
                       build={"command": 'sh build.sh && echo "greeting $GREETING"'})
    supervisor.send(signal.SIGHUP)
    reloaded = supervisor.wait_for("config.reloaded")
    assert reloaded["applied"] == ["app.env"]

    commit = world.release("2")
    built = supervisor.wait_for("build.succeeded", commit=commit, after=reloaded)
    lines = [r["line"] for r in supervisor.select("build.output", after=reloaded)
             if r["_i"] < built["_i"]]
    assert lines == ["built version 2", "greeting new"]
