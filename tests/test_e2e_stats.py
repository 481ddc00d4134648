"""End to end: a hostile stats file during a drain. The supervisor parses it as data with a size
bound, never executes it, never crashes on it, and keeps waiting until it really says drained."""

from __future__ import annotations

import os
import signal


def test_garbage_binary_huge_or_shell_code_stats_never_crash_or_run(world):
    supervisor, old_pid = world.start_serving()
    world.idle_client()  # a connected client: the deploy must wait for the stats file
    world.wait_stats('n_clients="1"')
    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)
    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)
    supervisor.wait_for("stats.read", after=waiting,
                        values=lambda v: v and v.get("n_clients") == "1")

    def marker(name):
        return lambda values: values is not None and values.get("marker") == name

    # Each write alternates between a read with values and one without: identical reads are
    # not logged again, so every step below has its own record to wait for.
    world.write_stats(b'marker="garbage"\nwhat is this\n{"n_clients": 0}\n')
    garbage = supervisor.wait_for("stats.read", values=marker("garbage"))
    assert supervisor.select("stats.lines_ignored", count=2, first="what is this")
    assert "n_clients" not in garbage["values"]

    world.write_stats(size=100 * 1024 * 1024)  # sparse: 100 MB of zeros, no disk spent
    huge = supervisor.wait_for("stats.read", problem=lambda p: p and "larger than" in p)
    assert huge["values"] is None

    world.write_stats(b'marker="binary"\n' + bytes(range(256)) * 64 + b"\x00\xff\xfe")
    binary = supervisor.wait_for("stats.read", values=marker("binary"))
    supervisor.wait_for("stats.lines_ignored", after=huge)

    fifo = world.run_dir / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, world.stats)  # a reader that blocked on this would hang the supervisor
    supervisor.wait_for("stats.read", problem="not a regular file", after=binary)

    pwned = [world.tmp / f"pwned-{n}" for n in range(4)]
    world.write_stats(
        b'marker="shell"\n'
        + f"n_clients=0; touch {pwned[0]}\n"
          f"$(touch {pwned[1]})\n"
          f"n_clients=`touch {pwned[2]}`\n"
          f'n_clients="$(touch {pwned[3]})"\n'.encode())
    shell = supervisor.wait_for("stats.read", values=marker("shell"))
    assert shell["values"]["n_clients"] == f"$(touch {pwned[3]})"  # a string, never run

    world.stats.unlink()  # missing means "not known yet", never "drained"
    supervisor.wait_for("stats.read", problem="missing", after=shell)

    assert supervisor.proc.poll() is None
    assert not supervisor.select("drain.satisfied")
    assert not supervisor.select(action="update_tree")
    assert not supervisor.select(action="stop_child")
    assert world.listens_on(old_pid, world.port)
    assert not [path for path in pwned if path.exists()]

    # Still listening: a well-formed "drained" deploys as usual.
    world.write_stats(b'n_clients="0"\n')
    satisfied = supervisor.wait_for("drain.satisfied")
    supervisor.wait_for("child.started", commit=commit, after=satisfied)
    world.wait_http("hello from 2", supervisor)


def test_a_changed_stats_problem_is_logged(world):
    supervisor, _ = world.start_serving()
    world.idle_client()
    world.wait_stats('n_clients="1"')
    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)
    supervisor.wait_for("deploy.waiting_for_drain", commit=commit)

    world.write_stats(size=100 * 1024 * 1024)
    huge = supervisor.wait_for("stats.read", problem=lambda p: p and "larger than" in p)
    world.stats.unlink()

    supervisor.wait_for("stats.read", problem="missing", after=huge, timeout=3)


def test_numbers_left_by_a_previous_process_never_count(world):
    world.write_stats(b'n_clients="0"\n')  # as if an earlier child had written it
    supervisor = world.start(app={"command": "exec sleep 600"}, drain={"timeout": "1s"})
    supervisor.wait_for("child.started")
    assert not world.stats.exists(), "the stats file was not removed before the start"

    commit = world.release("2")
    supervisor.send(signal.SIGUSR1)

    waiting = supervisor.wait_for("deploy.waiting_for_drain", commit=commit)
    supervisor.wait_for("stats.read", problem="missing", after=waiting)
    supervisor.wait_for("drain.timed_out", after=waiting)
    supervisor.wait_for("child.started", commit=commit, after=waiting)
    assert not supervisor.select("drain.satisfied")
