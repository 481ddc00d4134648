"""End to end, in place: the app is only ever started from a tree whose HEAD is the commit that
was built there (issue 12, section 3). A crash restart once ran whatever the tree held."""

from __future__ import annotations

import os
import signal


def test_a_crash_restart_puts_a_tree_moved_by_hand_back_before_it_starts(world):
    supervisor, pid = world.start_serving(restart={"backoff_min": "200ms",
                                                   "backoff_max": "1s"})
    other = world.commit(version="9", message="never pushed, never built")
    world.git(world.app, "fetch", "-q", str(world.dev), "HEAD")
    world.git(world.app, "checkout", "-q", other)  # someone moved the deploy clone's HEAD
    mark = supervisor.mark()
    os.kill(pid, signal.SIGKILL)
    refused = supervisor.wait_for("child.start_failed", after=mark)
    assert "putting it back first" in refused["error"]
    supervisor.wait_for("git.tree_restored", after=mark)
    started = supervisor.wait_for("child.started", commit=world.first, after=refused)
    assert world.git(world.app, "rev-parse", "HEAD") == world.first
    world.wait_http("hello from 1", supervisor)
    assert not supervisor.select("child.started", commit=other)
    assert started["pid"] != pid


def test_a_tree_a_foreign_git_is_writing_is_not_started_until_it_is_done(world):
    supervisor, pid = world.start_serving(restart={"backoff_min": "200ms",
                                                   "backoff_max": "400ms"})
    lock = world.app / ".git" / "index.lock"
    lock.write_text("")  # a git of someone else's at work in the deploy clone
    mark = supervisor.mark()
    os.kill(pid, signal.SIGKILL)
    refused = supervisor.wait_for("child.start_failed", after=mark)
    assert "index.lock" in refused["error"]
    again = supervisor.wait_for("child.start_failed", after=refused)
    assert lock.exists(), "a lock the supervisor did not take is never removed"
    lock.unlink()
    started = supervisor.wait_for("child.started", commit=world.first, after=again)
    world.wait_http("hello from 1", supervisor)
    assert started["pid"] != pid
