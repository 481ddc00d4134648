"""End to end: what the remote and the working tree can throw at the supervisor — rewritten
history, local changes, a remote that is gone or that hangs."""

from __future__ import annotations

import signal
import time

import pytest


def assert_untouched(world, supervisor, pid, head=None):
    assert not supervisor.select(action="update_tree")
    assert not supervisor.select(action="stop_child")
    assert world.listens_on(pid, world.port)
    assert world.http() == "hello from 1"
    assert world.head() == (head or world.first)


@pytest.mark.parametrize("how", ["force_push", "local_commit"])
def test_diverged_history_is_reported_and_the_child_left_alone(world, how):
    supervisor, pid = world.start_serving()
    if how == "force_push":
        upstream = world.release("1-rewritten", amend=True)
        expected = {"relation": "diverged", "upstream": upstream}
        local = world.first
    else:
        local = world.commit(version="1-local", message="a fix made on the server",
                             repo=world.app)
        expected = {"relation": "ahead", "upstream": world.first}

    note = supervisor.wait_for("git.diverged", head=local, **expected)
    supervisor.send(signal.SIGUSR1)  # the next fetch, at once rather than a poll later
    supervisor.wait_for("git.diverged", after=note, **expected)  # and again at the next fetch
    assert_untouched(world, supervisor, pid, head=local)


def test_on_diverge_reset_deploys_a_force_pushed_history(world):
    supervisor, old_pid = world.start_serving(git={"on_diverge": "reset"})

    rewritten = world.release("1-rewritten", amend=True)

    fetched = supervisor.wait_for("git.fetched", relation="diverged", upstream=rewritten)
    update = supervisor.wait_for(action="update_tree", after=fetched)
    assert supervisor.action(update, "update_tree") == {
        "action": "update_tree", "commit": rewritten, "reset": True, "reuse": False}
    supervisor.wait_for("child.exited", pid=old_pid, after=update)
    supervisor.wait_for("child.started", commit=rewritten, after=update)
    world.wait_http("hello from 1-rewritten", supervisor)
    assert world.head() == rewritten
    assert not supervisor.select("git.diverged")


def test_local_changes_are_reported_and_kept(world):
    supervisor, pid = world.start_serving(git={"on_diverge": "reset"})
    tweaked = world.app / "build.sh"
    tweaked.write_text(tweaked.read_text() + "# tuned on the server by hand\n")

    pushed = world.release("2")

    note = supervisor.wait_for("git.dirty", upstream=pushed, head=world.first)
    supervisor.send(signal.SIGUSR1)  # the next fetch, at once rather than a poll later
    supervisor.wait_for("git.dirty", after=note, upstream=pushed)  # and again at the next fetch
    assert_untouched(world, supervisor, pid)
    assert tweaked.read_text().endswith("# tuned on the server by hand\n")


def test_an_unreachable_remote_is_reported_then_recovers(world):
    supervisor, pid = world.start_serving()
    away = world.tmp / "remote-moved-away.git"

    world.remote.rename(away)
    failed = supervisor.wait_for("git.fetch_failed")
    # It keeps trying: the next poll (1 s on) fails again. The log writes that identical line
    # only in a log.repeated summary (10 s later, or before the next different line: checked
    # below), so the status file, written at each fetch, tells it at once. Its stamp of the
    # first failure may be a millisecond past the log line's: half a poll tells them apart.
    def failed_again(status: dict) -> bool:
        last = status.get("last_fetch") or {}
        return (last.get("ok") is False
                and world.parse_ts(last["at"]) - world.parse_ts(failed["ts"]) > 0.5)

    world.wait_status(failed_again, "a second failed fetch", supervisor)
    assert_untouched(world, supervisor, pid)

    away.rename(world.remote)
    commit = world.release("2")
    fetched = supervisor.wait_for("git.fetched", relation="behind", upstream=commit,
                                  after=failed)
    assert supervisor.select("log.repeated", of="git.fetch_failed", after=failed,
                             where=lambda r: r["_i"] < fetched["_i"]), supervisor.tail()
    supervisor.wait_for("child.started", commit=commit, after=failed)
    world.wait_http("hello from 2", supervisor)


def test_a_hanging_remote_times_out_and_the_supervisor_keeps_going(world, hanging_server):
    world.git(world.app, "remote", "set-url", "origin",
              f"git://127.0.0.1:{hanging_server.port}/app.git")

    supervisor, pid = world.start_serving(git={"timeout": "1s"})

    failed = supervisor.wait_for("git.fetch_failed")
    assert "timed out" in failed["error"]
    assert hanging_server.connections, "git never reached the hanging remote"
    assert hanging_server.wait_closed_by_peer(hanging_server.connections[0], timeout=5), \
        "the timed-out git fetch is still connected"
    again = supervisor.wait_for("git.fetch_failed", after=failed)
    assert "timed out" in again["error"]
    assert supervisor.proc.poll() is None
    assert world.listens_on(pid, world.port)

    stopping = time.monotonic()
    assert supervisor.stop() == 0  # even in the middle of a hanging fetch
    assert time.monotonic() - stopping < 5
