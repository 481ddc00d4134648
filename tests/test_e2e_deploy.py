"""End to end: a pushed commit travels fetch -> drain -> tree update -> build -> restart, through a
real supervisor process, real git repositories and the example app answering HTTP."""

from __future__ import annotations

import os
import signal


def test_a_push_is_deployed(world):
    supervisor, old_pid = world.start_serving()

    commit = world.release("2", nudge=False)  # found by the poll, nothing asked

    fetched = supervisor.wait_for("git.fetched", relation="behind", upstream=commit)
    updated = supervisor.wait_for("git.tree_updated", commit=commit, after=fetched)
    built = supervisor.wait_for("build.succeeded", commit=commit, after=updated)
    exited = supervisor.wait_for("child.exited", pid=old_pid, after=built)
    started = supervisor.wait_for("child.started", commit=commit, after=exited)
    assert supervisor.select("build.output", commit=commit, line="built version 2")
    assert started["pid"] != old_pid
    world.wait_http("hello from 2", supervisor)
    assert world.head() == commit
    assert not world.alive(old_pid)


def test_a_push_waits_for_the_connected_client_then_deploys_within_a_second(world):
    supervisor, old_pid = world.start_serving()
    held = world.hold(seconds=2)
    world.wait_stats('n_clients="1"')

    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)

    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)
    busy = supervisor.wait_for("stats.read", after=waiting,
                               values=lambda v: v and v.get("n_clients") == "1")
    assert not supervisor.select(action="stop_child"), "stopped the child under a client"
    assert not supervisor.select("build.started", commit=commit), "built before the drain"
    drained = supervisor.wait_for("stats.read", after=busy,
                                  values=lambda v: v and v.get("n_clients") == "0")
    stop = supervisor.wait_for(action="stop_child", after=drained)

    held.join()
    assert held.body == "hello from 1\n", f"the held client was cut off: {held.error!r}"
    assert supervisor.action(stop, "stop_child")["pid"] == old_pid
    delay = supervisor.seconds_between(drained, stop)
    seen = stop["_t"] - held.answered_at
    print(f"\n[drain] stats n_clients=\"0\" -> stop_child: {delay * 1000:.0f} ms by the log's "
          f"clock; held client answered -> stop_child seen by the test: {seen * 1000:.0f} ms")
    assert delay < 1.0
    supervisor.wait_for("child.started", commit=commit, after=stop)
    world.wait_http("hello from 2", supervisor)


def test_sigusr1_fetches_at_once(world):
    supervisor, _ = world.start_serving(git={"poll_interval": "1h"})
    commit = world.release("2")
    mark = supervisor.mark()

    supervisor.send(signal.SIGUSR1)

    requested = supervisor.wait_for("git.check_requested", after=mark)
    fetched = supervisor.wait_for("git.fetched", after=requested, upstream=commit,
                                  relation="behind")
    supervisor.wait_for("child.started", commit=commit, after=fetched, timeout=10)
    world.wait_http("hello from 2", supervisor)
    assert len(supervisor.select("git.fetched")) == 2, "fetched without being asked"


def test_drain_timeout_lets_the_deploy_proceed(world):
    supervisor, old_pid = world.start_serving(drain={"timeout": "1s"})
    held = world.hold(seconds=60)
    world.wait_stats('n_clients="1"')

    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)

    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)
    timed_out = supervisor.wait_for("drain.timed_out", after=waiting)
    assert 0.9 <= supervisor.seconds_between(waiting, timed_out) < 10  # "< 10": it came
    assert not supervisor.select("stats.read", after=waiting,
                                 values=lambda v: v and v.get("n_clients") == "0")
    stop = supervisor.wait_for(action="stop_child", after=timed_out)
    assert "drain timed out" in supervisor.action(stop, "stop_child")["reason"]
    supervisor.wait_for("child.exited", pid=old_pid, after=stop)
    supervisor.wait_for("child.started", commit=commit, after=stop)
    world.wait_http("hello from 2", supervisor)
    held.join()


def test_commits_pushed_during_a_drain_coalesce_into_one_deploy_of_the_newest(world):
    supervisor, old_pid = world.start_serving()
    client = world.idle_client()
    world.wait_stats('n_clients="1"')

    second = world.release("2")
    supervisor.send(signal.SIGUSR1)
    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=second)
    third = world.release("3")
    supervisor.send(signal.SIGUSR1)
    supervisor.wait_for("git.fetched", upstream=third, after=waiting)
    client.release()

    started = supervisor.wait_for("child.started", after=waiting)
    world.wait_http("hello from 3", supervisor)
    assert started["commit"] == third
    assert [r["pid"] for r in supervisor.select("child.exited")] == [old_pid]
    assert len(supervisor.select("child.started")) == 2  # the first release, then the third
    assert not supervisor.select("build.started", commit=second)
    assert not supervisor.select(action="update_tree",
                                 where=lambda r: supervisor.action(r, "update_tree")["commit"]
                                 == second)
    assert len(supervisor.select("build.started", commit=third)) == 1


def test_a_failing_build_leaves_the_old_child_serving_until_a_good_commit(world):
    supervisor, old_pid = world.start_serving()

    broken = world.commit({"build.sh": 'echo "server.py:3: syntax error" >&2\nexit 1\n'},
                          version="2", message="broken build")
    world.push()

    failed = supervisor.wait_for("build.failed", commit=broken)
    assert failed["exit_code"] == 1
    assert "server.py:3: syntax error" in failed["tail"]
    deploy_failed = supervisor.wait_for("deploy.failed", commit=broken, after=failed)
    assert deploy_failed["reason"].startswith("build failed")
    # A few more fetches: the broken commit is not built again and the old child keeps serving.
    # Asked for with kill -USR1 (the poll's own step, taken at once) instead of waiting 1 s a
    # poll.
    later = deploy_failed
    for _ in range(3):
        supervisor.send(signal.SIGUSR1)
        later = supervisor.wait_for("git.fetched", after=later, upstream=broken)
    assert len(supervisor.select("build.started", commit=broken)) == 1
    assert not supervisor.select(action="stop_child")
    assert world.http() == "hello from 1"
    assert world.listens_on(old_pid, world.port)

    fixed = world.commit({"build.sh": "exit 0\n"}, version="3", message="fix the build")
    world.push()
    supervisor.wait_for("build.succeeded", commit=fixed, after=deploy_failed)
    supervisor.wait_for("child.exited", pid=old_pid, after=deploy_failed)
    supervisor.wait_for("child.started", commit=fixed, after=deploy_failed)
    world.wait_http("hello from 3", supervisor)


def push_a_broken_build(world, supervisor):
    broken = world.commit({"build.sh": 'echo "server.py:3: syntax error" >&2\nexit 1\n'},
                          version="2-broken", message="broken build")
    world.push()
    return broken, supervisor.wait_for("deploy.failed", commit=broken)


def restart_after_a_broken_build(world):
    """A broken build is pushed and fails; the supervisor is stopped and started again."""
    first, _ = world.start_serving()
    broken, _ = push_a_broken_build(world, first)
    assert first.stop() == 0
    return world.start(config=first.config), broken


def test_after_a_failed_build_a_crash_restart_runs_the_last_good_commit(world):
    supervisor, old_pid = world.start_serving()
    broken, failed = push_a_broken_build(world, supervisor)

    os.kill(old_pid, signal.SIGKILL)

    started = supervisor.wait_for("child.started", after=failed)
    assert started["commit"] != broken, "restarted into the commit whose build failed"
    world.wait_http("hello from 1", supervisor)


def test_after_a_failed_build_a_restarted_supervisor_serves_the_last_good_commit(world):
    second, broken = restart_after_a_broken_build(world)

    started = second.wait_for("child.started")
    assert started["commit"] != broken, "a restart brought up the commit whose build failed"
    world.wait_http("hello from 1", second)


def test_a_restarted_supervisor_does_not_retry_a_commit_whose_build_failed(world):
    second, broken = restart_after_a_broken_build(world)

    started = second.wait_for("child.started")
    second.wait_for("git.fetched", after=started)
    assert not second.select("build.started", commit=broken), "retried a failed commit"


def test_a_hanging_build_is_killed_with_its_process_group_at_the_timeout(world):
    supervisor, old_pid = world.start_serving(build={"timeout": "1s"})
    pids = world.tmp / "pids"
    hang = (f'echo $$ > {pids}/build\n'
            f'sleep 60 &\necho $! > {pids}/grandchild\n'
            'sleep 60\n')
    pids.mkdir()

    hanging = world.commit({"build.sh": hang}, version="2", message="a build that hangs")
    world.push()

    started = supervisor.wait_for("build.started", commit=hanging)
    failed = supervisor.wait_for("build.failed", commit=hanging, after=started)
    assert "timed out" in failed["reason"]
    assert 0.9 <= supervisor.seconds_between(started, failed) < 5
    supervisor.wait_for("deploy.failed", commit=hanging, after=failed)
    build_pid = int((pids / "build").read_text())
    grandchild = int((pids / "grandchild").read_text())
    # The group was SIGKILLed before build.failed was posted; the orphaned grandchild may take
    # a moment to be reaped by init, so wait on the process state rather than assume it.
    world.wait_until(lambda: not world.alive(build_pid) and not world.alive(grandchild), 5,
                     f"build {build_pid} and its grandchild {grandchild} to be gone")
    assert world.listens_on(old_pid, world.port)
    assert world.http() == "hello from 1"


def test_startup_deploys_what_was_pushed_meanwhile_and_a_restart_does_not_rebuild(world):
    commit = world.release("2")  # pushed while no supervisor ran: the clone is behind

    first = world.start()
    started = first.wait_for("child.started")
    assert started["commit"] == commit, "started the old commit before updating"
    world.wait_http("hello from 2", first)
    assert [r["commit"] for r in first.select("build.started")] == [commit]
    assert first.stop() == 0

    second = world.start(config=first.config)
    second.wait_for("child.started", commit=commit)
    world.wait_http("hello from 2", second)
    assert not second.select("build.started"), "rebuilt a commit that was built before"


def test_a_child_that_dies_during_the_drain_is_not_waited_for(world):
    supervisor, old_pid = world.start_serving()
    world.idle_client()
    world.wait_stats('n_clients="1"')
    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)
    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)

    os.kill(old_pid, signal.SIGKILL)

    exited = supervisor.wait_for("child.exited", pid=old_pid, after=waiting)
    supervisor.wait_for("drain.child_exited", after=exited)
    started = supervisor.wait_for("child.started", after=exited)
    assert started["commit"] == commit, "restarted the old release instead of deploying"
    assert not supervisor.select("child.restarting")
    world.wait_http("hello from 2", supervisor)


def test_a_stop_during_a_build_kills_the_build_and_exits_0(world):
    supervisor, child_pid = world.start_serving(build={"timeout": "60s"})
    pids = world.tmp / "pids"
    pids.mkdir()
    hanging = world.commit({"build.sh": f"echo $$ > {pids}/build\n"
                                        f"sleep 60 &\necho $! > {pids}/grandchild\nwait\n"},
                           version="2", message="a slow build")
    world.push()
    supervisor.wait_for("build.started", commit=hanging)
    world.wait_until(lambda: (pids / "grandchild").exists(), 5, "the build to start its job")
    build_pid = int((pids / "build").read_text())
    grandchild = int((pids / "grandchild").read_text())

    assert supervisor.stop() == 0

    supervisor.wait_for("supervisor.stopped")
    assert not world.alive(child_pid)
    world.wait_until(lambda: not world.alive(build_pid) and not world.alive(grandchild), 5,
                     f"build {build_pid} and its grandchild {grandchild} to be gone")
    assert not supervisor.select("build.succeeded", commit=hanging)
