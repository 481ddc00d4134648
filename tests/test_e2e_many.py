"""End to end, many apps in one supervisor (issue 13): three apps from three remotes, each with
its own machine, sharing one process, one loop and one event log. Real git, real processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import World, _toml


class Fleet:
    """Three worlds (repository, remote, clone, port) under one main file."""

    def __init__(self, tmp: Path, names: tuple[str, ...] = ("web", "api", "crashy")) -> None:
        self.tmp = tmp
        tmp.mkdir()
        self.worlds: dict[str, World] = {}
        for name in names:
            (tmp / name).mkdir()
            self.worlds[name] = World(tmp / name)
        self.main = tmp / "supervisor.toml"
        (tmp / "apps").mkdir()
        self.main.write_text(
            '[supervisor]\napps = ["apps/*.toml"]\nstate_dir = "state"\nmax_builds = 1\n'
            '[log]\nformat = "json"\n')
        for name in names:
            self.write_app(name)

    def app_sections(self, name: str, **overrides: dict[str, Any] | None) -> dict[str, Any]:
        sections: dict[str, Any] = self.worlds[name].config_sections()
        sections["app"] = {k: v for k, v in sections["app"].items()
                           if k not in ("name", "state_dir")}  # named by file, state under main
        sections.pop("log")  # the event log is the main file's
        sections["git"]["poll_interval"] = "1s"
        for section, values in overrides.items():
            if values is None:
                sections.pop(section, None)
            else:
                sections[section] = {**(sections.get(section) or {}), **values}
        return sections

    def write_app(self, name: str, **overrides: dict[str, Any] | None) -> Path:
        lines = []
        for section, values in self.app_sections(name, **overrides).items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
        path = self.tmp / "apps" / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def state_dir(self, name: str) -> Path:
        return self.tmp / "state" / name


@pytest.fixture
def fleet(world: World) -> Any:
    """Three apps; `world` (the fixture) only lends its Supervisor runner and clean-up."""
    fleet = Fleet(world.tmp / "many")
    fleet.runner = world
    try:
        yield fleet
    finally:
        for member in fleet.worlds.values():
            member.close()


def crash_loop(fleet: Fleet) -> None:
    fleet.write_app("crashy", app={"command": [sys.executable, "-c", "raise SystemExit(3)"]},
                    drain=None, restart={"backoff_min": "100ms", "backoff_max": "200ms"})


def test_three_apps_in_one_process_deploy_drain_and_crash_loop_without_waiting_on_each_other(
        fleet):
    crash_loop(fleet)
    supervisor = fleet.runner.start(config=fleet.main)
    web, api = fleet.worlds["web"], fleet.worlds["api"]
    for name in ("web", "api"):
        supervisor.wait_for("child.started", app=name)
    web.wait_http("hello from 1", supervisor)
    api.wait_http("hello from 1", supervisor)
    supervisor.wait_for("child.backing_off", app="crashy")

    client = web.idle_client()  # web's deploy must wait for it
    web.wait_stats('n_clients="1"')
    web_commit = web.release("2")
    draining = supervisor.wait_for("deploy.waiting_for_drain", app="web", commit=web_commit)
    api_commit = api.release("2")
    started = supervisor.wait_for("child.started", app="api", commit=api_commit, after=draining)
    api.wait_http("hello from 2", supervisor)
    # Meanwhile crashy still restarts at its own pace, and web still drains.
    again = supervisor.wait_for("child.exited", app="crashy", after=draining)
    supervisor.wait_for("child.exited", app="crashy", after=again)
    assert not supervisor.select("child.started", app="web", after=draining)
    client.release()
    supervisor.wait_for("child.started", app="web", commit=web_commit, after=started)
    web.wait_http("hello from 2", supervisor)
    # Every line names its app; the lines about the process name none.
    assert all("app" in record for record in supervisor.records)
    assert {r["app"] for r in supervisor.records} >= {"web", "api", "crashy"}
    assert supervisor.stop() == 0
    assert supervisor.records[-1]["event"] == "supervisor.stopped"
    assert supervisor.records[-1]["app"] is None


def test_a_broken_app_file_is_reported_and_the_others_run(fleet):
    (fleet.tmp / "apps" / "crashy.toml").write_text("[app]\ncommand = 3\n")
    supervisor = fleet.runner.start(config=fleet.main)
    failed = supervisor.wait_for("app.config_failed", app_name="crashy")
    assert failed["app"] is None and "app.command" in failed["problems"][0]
    for name in ("web", "api"):
        supervisor.wait_for("child.started", app=name)
    status = fleet.runner.cli("status", config=fleet.main)
    lines = status.stdout.splitlines()
    assert any(line.startswith("crashy: not run, its file has problems") for line in lines)
    assert any(line.startswith("web: running") for line in lines), status.stdout
    check = fleet.runner.cli("check", config=fleet.main)
    assert check.returncode == 2 and "crashy.toml: app.command" in check.stderr


def test_status_and_control_act_on_one_app(fleet):
    supervisor = fleet.runner.start(config=fleet.main)
    for name in ("web", "api", "crashy"):
        supervisor.wait_for("child.started", app=name)
    ask = fleet.runner.cli("restart", config=fleet.main)
    assert ask.returncode == 2 and "web" in ask.stderr and "api" in ask.stderr
    mark = supervisor.mark()
    assert fleet.runner.cli("restart", "api", config=fleet.main).returncode == 0
    supervisor.wait_for("child.started", app="api", after=mark)
    assert not supervisor.select("child.started", app="web", after=mark)
    one = fleet.runner.cli("status", "web", config=fleet.main)
    assert one.returncode == 0 and one.stdout.startswith("web: running")
    data = json.loads(fleet.runner.cli("status", "--json", config=fleet.main).stdout)
    assert set(data) == {"web", "api", "crashy"} and data["api"]["phase"] == "running"


def test_reload_adds_removes_and_changes_apps_and_leaves_the_rest_alone(fleet):
    supervisor = fleet.runner.start(config=fleet.main)
    for name in ("web", "api", "crashy"):
        supervisor.wait_for("child.started", app=name)
    crashy_pid = supervisor.select("child.started", app="crashy")[-1]["pid"]
    (fleet.tmp / "apps" / "crashy.toml").unlink()
    (fleet.tmp / "docs").mkdir()
    fleet.worlds["docs"] = World(fleet.tmp / "docs")
    fleet.write_app("docs")
    fleet.write_app("api", restart={"backoff_min": "300ms"})
    mark = supervisor.mark()
    supervisor.send(signal.SIGHUP)
    supervisor.wait_for("app.removing", app_name="crashy", after=mark)
    supervisor.wait_for("child.exited", app="crashy", pid=crashy_pid, after=mark)
    supervisor.wait_for("app.added", app_name="docs", after=mark)
    supervisor.wait_for("child.started", app="docs", after=mark)
    fleet.worlds["docs"].wait_http("hello from 1", supervisor)
    reloaded = supervisor.wait_for("config.reloaded", app="api", after=mark)
    assert "restart.backoff_min" in reloaded["applied"]
    # Untouched: no restart, no drain, not even a reload line (its app may print, of course).
    assert not [r for r in supervisor.select(app="web", after=mark)
                if r["event"] != "child.output"]
    assert not supervisor.select("child.started", app="api", after=mark)


def test_a_killed_supervisor_restarted_finds_every_app_and_duplicates_none(fleet):
    first = fleet.runner.start(config=fleet.main)
    old = {name: first.wait_for("child.started", app=name)["pid"]
           for name in ("web", "api", "crashy")}
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit()
    second = fleet.runner.start(config=fleet.main)
    for name, pid in old.items():
        started = second.wait_for("child.started", app=name)
        assert not fleet.runner.alive(pid), f"{name}'s old app still runs beside the new one"
        assert started["pid"] != pid
    for name in ("web", "api", "crashy"):
        fleet.worlds[name].wait_http("hello from 1", second)


def test_the_main_files_webhook_wakes_the_app_whose_repository_the_push_names(fleet):
    import hashlib
    import hmac
    import http.client

    secret = "a-webhook-secret-of-some-length"
    port = fleet.runner.free_port()
    with open(fleet.main, "a") as main:
        main.write(f'[trigger]\nlisten = "127.0.0.1:{port}"\nsecret = "{secret}"\n')
    for name in ("web", "api", "crashy"):
        fleet.write_app(name, git={"poll_interval": "1h"})
    supervisor = fleet.runner.start(config=fleet.main)
    for name in ("web", "api", "crashy"):
        supervisor.wait_for("child.started", app=name)
    api = fleet.worlds["api"]
    commit = api.release("2")
    body = json.dumps({"ref": "refs/heads/main", "after": commit,
                       "repository": {"clone_url": f"file://{api.remote}"}}).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    mark = supervisor.mark()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", "/", body=body, headers={
            "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-1",
            "X-Hub-Signature-256": f"sha256={signature}"})
        assert connection.getresponse().status == 202
    finally:
        connection.close()
    routed = supervisor.wait_for("trigger.routed", after=mark)
    assert routed["apps"] == ["api"] and routed["matched"] is True and routed["app"] is None
    supervisor.wait_for("child.started", app="api", commit=commit, after=routed)
    api.wait_http("hello from 2", supervisor)
    assert not supervisor.select("git.check_requested", app="web", after=mark)


def test_builds_take_turns_under_max_builds(fleet):
    from tests.conftest import BuildGate

    gate = BuildGate(fleet.tmp / "build.gate")
    for name in ("web", "api", "crashy"):
        fleet.write_app(name, build={"command": gate.command()}, drain=None)
    supervisor = fleet.runner.start(config=fleet.main)
    for name in ("web", "api", "crashy"):
        supervisor.wait_for("child.started", app=name)
    gate.shut()
    mark = supervisor.mark()
    web_commit = fleet.worlds["web"].release("2")
    first = supervisor.wait_for("build.started", app="web", commit=web_commit, after=mark)
    api_commit = fleet.worlds["api"].release("2")
    queued = supervisor.wait_for("build.queued", app="api", commit=api_commit, after=mark)
    assert queued["position"] == 1
    assert not supervisor.select("build.started", app="api", after=mark), "two builds at once"
    gate.open()  # web's build ends; api's starts and finds the gate gone
    supervisor.wait_for("build.succeeded", app="web", after=first)
    second = supervisor.wait_for("build.started", app="api", commit=api_commit, after=queued)
    supervisor.wait_for("child.started", app="api", commit=api_commit, after=second)


def test_a_broken_app_file_at_reload_keeps_that_app_running_as_it_was(fleet):
    supervisor = fleet.runner.start(config=fleet.main)
    api_pid = supervisor.wait_for("child.started", app="api")["pid"]
    (fleet.tmp / "apps" / "api.toml").write_text("[app]\ncommand = 3\n")
    mark = supervisor.mark()
    supervisor.send(signal.SIGHUP)
    failed = supervisor.wait_for("config.reload_failed", app_name="api", after=mark)
    assert failed["app"] is None and "app.command" in failed["problems"][0]
    assert not supervisor.select("app.removing", after=mark), "a broken file is not a removal"
    assert fleet.runner.alive(api_pid)
    fleet.worlds["api"].wait_http("hello from 1", supervisor)
