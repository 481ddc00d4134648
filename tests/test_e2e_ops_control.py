"""End to end: controlling a running supervisor from the shell with `-c CONFIG` — deploy, restart,
stop-child, start-child — what they say when no supervisor runs, and a second `supervisor run`
of the same app, which must refuse and leave the first one alone."""

from __future__ import annotations

import os
import signal

CONTROL_COMMANDS = ("deploy", "restart", "stop-child", "start-child")


def ask(world, command: str, supervisor) -> None:
    result = world.cli(command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"asked supervisor {supervisor.pid} to {command};")


def test_deploy_fetches_at_once_and_the_commit_is_deployed(world):
    supervisor, old_pid = world.start_serving(git={"poll_interval": "1h"})
    commit = world.release("2")
    mark = supervisor.mark()

    ask(world, "deploy", supervisor)

    requested = supervisor.wait_for("git.check_requested", after=mark)
    fetched = supervisor.wait_for("git.fetched", after=requested, upstream=commit,
                                  relation="behind")
    supervisor.wait_for("child.started", commit=commit, after=fetched)
    world.wait_http("hello from 2", supervisor)
    assert len(supervisor.select("git.fetched")) == 2, "fetched without being asked"
    assert not world.alive(old_pid)
    assert not os.listdir(world.state_dir / "control"), "the request was not taken"


def test_restart_drains_then_restarts_the_same_commit_without_a_build(world):
    supervisor, old_pid = world.start_serving(git={"poll_interval": "1h"})
    client = world.idle_client()
    world.wait_stats('n_clients="1"')
    mark = supervisor.mark()

    ask(world, "restart", supervisor)

    requested = supervisor.wait_for("control.restart", after=mark)
    assert requested["after"] == "draining"
    supervisor.wait_for("deploy.waiting_for_drain", after=requested, commit=world.first)
    busy = supervisor.wait_for("stats.read", after=requested,
                               values=lambda v: v and v.get("n_clients") == "1")
    assert not supervisor.select(action="stop_child", after=mark), "stopped under a client"
    client.release()
    stop = supervisor.wait_for(action="stop_child", after=busy)
    assert supervisor.action(stop, "stop_child") == {
        "action": "stop_child", "pid": old_pid, "reason": "restart requested"}
    exited = supervisor.wait_for("child.exited", pid=old_pid, after=stop)
    assert supervisor.action(exited, "start_child")["reason"] == "restart requested"
    started = supervisor.wait_for("child.started", after=exited)
    assert started["pid"] != old_pid and started["commit"] == world.first
    world.wait_http("hello from 1", supervisor)
    assert not supervisor.select("build.started", after=mark), "a restart rebuilt"
    assert not supervisor.select("git.tree_updated", after=mark)
    assert world.listens_on(started["pid"], world.port)


def test_stop_child_holds_the_app_and_start_child_brings_it_back_with_what_was_pushed(world):
    supervisor, old_pid = world.start_serving(git={"poll_interval": "1h"})
    mark = supervisor.mark()

    ask(world, "stop-child", supervisor)

    held = supervisor.wait_for("control.stop_child", after=mark)
    assert held["after"] == "held"
    exited = supervisor.wait_for("child.exited", pid=old_pid, after=held)
    # An exit in `running` is restarted at once; held, nothing starts it.
    assert exited["after"] == "held" and not supervisor.has_action(exited, "start_child")
    assert world.http() is None

    # A commit pushed while held is fetched and remembered, not started.
    commit = world.release("2")
    ask(world, "deploy", supervisor)
    fetched = supervisor.wait_for("git.fetched", after=exited, upstream=commit)
    assert fetched["after"] == "held" and fetched["actions"] == []
    status = world.wait_status(lambda s: s["pending"] == commit, "the pending commit", supervisor)
    assert status["phase"] == "held" and status["child"] is None
    # A second stop-child changes nothing, and the loop has handled everything before it; the
    # command says so and exits 1 (it cannot apply).
    refused = world.cli("stop-child")
    assert refused.returncode == 1 and "already stopped" in refused.stderr, refused
    again = supervisor.wait_for("control.stop_child", after=fetched)
    assert again["after"] == "held" and again["actions"] == []
    assert not supervisor.select("child.started", after=mark), "a held app was started"
    assert world.http() is None

    ask(world, "start-child", supervisor)

    start = supervisor.wait_for("control.start_child", after=again)
    assert supervisor.action(start, "start_child")["reason"] == "start requested"
    supervisor.wait_for("child.started", after=start, commit=world.first)
    deployed = supervisor.wait_for("child.started", after=start, commit=commit)
    world.wait_http("hello from 2", supervisor)
    assert world.listens_on(deployed["pid"], world.port)


def test_control_commands_without_a_running_supervisor_exit_2_with_one_clear_line(world):
    config = world.write_config()
    expected = f"supervisor: no supervisor is running for this app (state dir {world.state_dir})\n"

    never = world.cli("status", config=config)
    assert never.returncode == 2
    assert never.stderr == (f"supervisor: no status in {world.state_dir}: "
                            "the supervisor has never run here\n")
    for command in CONTROL_COMMANDS:
        result = world.cli(command, config=config)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", expected), command

    # Once a supervisor ran and stopped, its lock file and status file remain; still nobody runs.
    supervisor, _ = world.start_serving()
    assert supervisor.stop() == 0
    for command in CONTROL_COMMANDS:
        result = world.cli(command, config=config)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", expected), command
    assert world.cli("status", config=config).returncode == 3
    control = world.state_dir / "control"
    assert not control.exists() or not os.listdir(control), "a request was left behind"


def test_a_second_run_of_the_same_app_refuses_and_leaves_the_first_alone(world):
    supervisor, child_pid = world.start_serving(git={"poll_interval": "1h"})
    lock = (world.state_dir / "supervisor.lock").read_text()
    status_before = world.wait_status(lambda s: s["child"], "the child", supervisor)
    mark = supervisor.mark()

    second = world.cli("run")

    assert second.returncode == 2
    assert second.stdout == ""
    assert second.stderr.splitlines() == [
        f"supervisor: app.state_dir: pid {supervisor.pid} already runs a supervisor for this "
        f"app ({world.state_dir})"]
    assert supervisor.proc.poll() is None and world.alive(child_pid)
    assert world.http() == "hello from 1"
    assert (world.state_dir / "supervisor.lock").read_text() == lock
    assert world.status_file() == status_before
    # The first supervisor still obeys, and saw nothing of the second one.
    ask(world, "deploy", supervisor)
    checked = supervisor.wait_for("git.check_requested", after=mark)
    assert [r["event"] for r in supervisor.select(after=mark)][:1] == ["git.check_requested"]
    supervisor.wait_for("git.fetched", after=checked, relation="same")
    assert supervisor.stop(signal.SIGTERM) == 0
