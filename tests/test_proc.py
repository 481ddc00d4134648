"""The process helper against real processes: exit learned from a pidfd, whole groups killed at a
timeout, on cancellation and when the leader exits, and bounded output.

"Gone" is checked with a pidfd of our own: it becomes readable when the process has exited
(reaped or a zombie waiting for its new parent), so no test polls or sleeps.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from supervisor.drivers import proc
from supervisor.drivers.proc import describe_returncode
from tests.processes import kill_if_ours, run

SH = "/bin/sh"




def is_gone(pid: int, within: float = 2.0) -> bool:
    """True once `pid` has exited (or was reaped), waiting at most `within` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], within)
        return bool(readable)
    finally:
        os.close(fd)


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def kill_escapee(pid: int) -> None:
    """Clean up a process a test deliberately let escape its group (only if it is our sleep)."""
    kill_if_ours(pid, b"sleep")


# ---------------------------------------------------------------------------------------------
# run()


def test_run_returns_output_and_exit_code(tmp_path: Path) -> None:
    result = run(proc.run([SH, "-c", "echo out; echo err >&2; exit 3"], cwd=tmp_path, env=None,
                          timeout=10))
    assert result.returncode == 3 and not result.ok and not result.timed_out
    assert result.output.splitlines() == ["out", "err"]
    ok = run(proc.run([SH, "-c", "pwd"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                      timeout=10))
    assert ok.ok and ok.returncode == 0 and ok.output == str(tmp_path)


def test_run_passes_lines_to_the_callback_as_they_come(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run(proc.run([SH, "-c", "printf 'a\\nb\\r\\nno newline'"], cwd=tmp_path, env=None,
                          timeout=10, on_line=lines.append))
    assert lines == ["a", "b", "no newline"]
    assert result.output == "a\nb\nno newline"


def test_run_gives_the_child_an_empty_stdin_and_no_terminal(tmp_path: Path) -> None:
    result = run(proc.run([SH, "-c", "cat; test -t 0 || echo no-tty; exec </dev/tty"],
                          cwd=tmp_path, env=None, timeout=5))
    assert result.output.startswith("no-tty")
    assert result.returncode != 0  # /dev/tty cannot be opened: nothing can prompt
    assert not result.timed_out


def test_run_raises_for_a_missing_program(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(proc.run([str(tmp_path / "no-such-program")], cwd=tmp_path, env=None, timeout=5))


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    script = "echo $$ > leader; sleep 60 & echo $! > child; echo started; wait"
    started = time.monotonic()
    result = run(proc.run([SH, "-c", script], cwd=tmp_path, env=None, timeout=0.5))
    elapsed = time.monotonic() - started
    assert result.timed_out and result.returncode is None and not result.ok
    assert result.output == "started"
    assert 0.5 <= elapsed < 1.5
    assert is_gone(read_pid(tmp_path / "leader"))
    assert is_gone(read_pid(tmp_path / "child")), "the background grandchild survived"


# A process that left the group with setsid (so no group kill reaches it) and keeps the pipe
# open for 30 s; the script waits until it has left before going on.
ESCAPE = ("setsid sh -c 'echo $$ > escaped.tmp; mv escaped.tmp escaped; exec sleep 30' & "
          "while [ ! -e escaped ]; do :; done; ")


def run_with_escapee(tmp_path: Path, script: str) -> tuple[proc.Result, float]:
    try:
        started = time.monotonic()
        result = run(proc.run([SH, "-c", ESCAPE + script], cwd=tmp_path, env=None, timeout=0.2))
        elapsed = time.monotonic() - started
        assert not is_gone(read_pid(tmp_path / "escaped"), within=0), "nothing escaped"
    finally:
        if (tmp_path / "escaped").exists():
            kill_escapee(read_pid(tmp_path / "escaped"))
    return result, elapsed


def test_an_escaped_process_holding_stdout_does_not_hang_run(tmp_path: Path) -> None:
    result, elapsed = run_with_escapee(tmp_path, "echo done")
    assert result.returncode == 0 and result.output == "done"
    assert elapsed < 0.2 + 1.5


def test_an_escaped_process_does_not_stretch_a_timeout(tmp_path: Path) -> None:
    result, elapsed = run_with_escapee(tmp_path, "echo waiting; sleep 30")
    assert result.timed_out and result.output == "waiting"
    assert 0.2 <= elapsed < 0.2 + 1.5


def test_output_keeps_only_the_last_tail_lines(tmp_path: Path) -> None:
    seen = 0

    def count(_line: str) -> None:
        nonlocal seen
        seen += 1

    result = run(proc.run(["seq", "100000"], cwd=tmp_path, env=None, timeout=10,
                          on_line=count, tail_lines=10))
    assert result.ok
    assert seen == 100000
    assert result.output.splitlines() == [str(n) for n in range(99991, 100001)]


def test_a_huge_line_is_capped_at_line_limit(tmp_path: Path) -> None:
    script = "head -c 3000000 /dev/zero | tr '\\0' a; echo; echo END"
    result = run(proc.run([SH, "-c", script], cwd=tmp_path, env=None, timeout=10,
                          tail_lines=5, line_limit=100))
    lines = result.output.splitlines()
    assert lines[-1] == "END"
    assert all(len(line) <= 100 for line in lines)
    assert len(result.output) <= 5 * 101


def test_a_huge_line_is_one_line_in_the_tail(tmp_path: Path) -> None:
    # A build that dumps one 3 MB line (minified output, a base64 blob) must not push the lines
    # that explain a failure out of the tail, nor reach on_line as dozens of fake lines.
    script = ("echo 'error: the useful part'; head -c 3000000 /dev/zero | tr '\\0' a; echo; "
              "echo END")
    lines: list[str] = []
    result = run(proc.run([SH, "-c", script], cwd=tmp_path, env=None, timeout=10,
                          on_line=lines.append, tail_lines=5, line_limit=100))
    assert result.output.splitlines() == ["error: the useful part", "a" * 100, "END"]
    assert lines == ["error: the useful part", "a" * 100, "END"]


def test_cancelling_the_caller_kills_the_group(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        pids: asyncio.Queue[int] = asyncio.Queue()
        task = asyncio.create_task(proc.run(
            [SH, "-c", "echo $$; sleep 60 & echo $!; wait"], cwd=tmp_path, env=None,
            timeout=60, on_line=lambda line: pids.put_nowait(int(line))))
        leader, child = await pids.get(), await pids.get()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [leader, child]

    started = time.monotonic()
    leader, child = run(scenario(), limit=10)
    assert time.monotonic() - started < 5
    assert is_gone(leader)
    assert is_gone(child), "the grandchild outlived the cancelled caller"


# ---------------------------------------------------------------------------------------------
# spawn() and Process


def test_exit_code_is_learned_at_once(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float, bool]:
        process = proc.spawn([SH, "-c", "exit 7"], cwd=tmp_path, env=None)
        code = await process.exited
        return code, time.monotonic() - process.started_at, process.running

    code, delay, running = run(scenario(), limit=5)
    assert code == 7 and not running
    assert describe_returncode(code) == (7, None)
    assert delay < 0.5


def test_a_signal_death_is_negative_and_named(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float, bool]:
        process = proc.spawn(["sleep", "30"], cwd=tmp_path, env=None)
        assert process.running
        sent = time.monotonic()
        assert process.signal_group(signal.SIGTERM)
        code = await process.exited
        delay = time.monotonic() - sent
        return code, delay, process.signal_group(signal.SIGTERM)

    code, delay, signalled_again = run(scenario(), limit=5)
    print(f"SIGTERM -> exited resolved in {delay * 1000:.1f} ms")
    assert code == -signal.SIGTERM
    assert describe_returncode(code) == (None, "SIGTERM")
    assert delay < 0.2
    assert signalled_again is False  # after exit the group is not ours any more


def test_describe_returncode() -> None:
    assert describe_returncode(0) == (0, None)
    assert describe_returncode(-signal.SIGKILL) == (None, "SIGKILL")
    assert describe_returncode(-200) == (None, "signal 200")


def test_leftovers_in_the_group_die_with_the_leader(tmp_path: Path) -> None:
    async def scenario() -> int:
        process = proc.spawn([SH, "-c", "sleep 60 & echo $! > worker; exit 0"],
                             cwd=tmp_path, env=None)
        return await process.exited

    assert run(scenario(), limit=5) == 0
    assert is_gone(read_pid(tmp_path / "worker")), "the leader's worker was left running"


def test_spawn_runs_in_its_own_session_with_cwd_and_env(tmp_path: Path) -> None:
    script = "import os; print(os.getsid(0) == os.getpid(), os.getcwd(), os.environ['MARK'])"

    async def scenario() -> tuple[int, bytes]:
        read_end, write_end = os.pipe()
        try:
            process = proc.spawn([sys.executable, "-c", script], cwd=tmp_path,
                                 env={"MARK": "m1"}, stdout=write_end)
        finally:
            os.close(write_end)
        code = await process.exited
        with os.fdopen(read_end, "rb") as pipe:
            return code, pipe.read()

    code, output = run(scenario(), limit=10)
    assert code == 0
    assert output.decode().split() == ["True", str(tmp_path), "m1"]
