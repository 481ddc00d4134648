"""The writer thread: state files and log lines written off the loop, in order, with errors told
on the loop, drained at exit, and safe for the children forked beside it. Real files, a real
thread, real child processes."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from supervisor.drivers.childlog import RotatingFile
from supervisor.drivers.diskwriter import DiskWriter
from supervisor.drivers.eventlog import EventLog
from supervisor.drivers.statefile import ChildRecord, StateStore


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test, run in a loop of its own (the writer reports to a running loop)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def on_disk(directory: Path) -> dict:
    return json.loads((directory / "state.json").read_text())


def block(writer: DiskWriter) -> threading.Event:
    """Hold the thread in a job until the returned event is set: what is queued behind it
    waits, as behind a slow fsync on an SD card."""
    release = threading.Event()
    writer.submit(lambda: release.wait(10) and None)
    return release


@in_loop
async def test_durable_saves_wait_for_the_thread_and_land_coalesced_with_the_latest(tmp_path):
    writer = DiskWriter(asyncio.get_running_loop())
    store = StateStore(tmp_path)
    store.save(built="a" * 40)  # inline: no writer yet
    store.writer = writer
    release = block(writer)
    for n in range(5):
        store.save(failed=f"{n:040x}")
        assert store.current.failed == f"{n:040x}", "callers read their change back at once"
    assert on_disk(tmp_path)["failed"] is None, "nothing durable is written on the loop"
    assert writer.submitted == 2, "five pending saves of one file are one job"
    release.set()
    await writer.drain()
    assert on_disk(tmp_path)["failed"] == f"{4:040x}" and on_disk(tmp_path)["built"] == "a" * 40
    assert writer.stop(5)


@in_loop
async def test_a_child_record_is_on_disk_at_once_even_while_the_writer_is_busy(tmp_path):
    """The kill -9 window: the record of a just-started child must not wait behind another
    app's fsync; a durable write of its own file still queued is not overtaken by an older
    state, since it writes the latest one when it runs."""
    writer = DiskWriter(asyncio.get_running_loop())
    store = StateStore(tmp_path)
    store.writer = writer
    release = block(writer)
    store.save(built="b" * 40)  # queued behind the blocked job
    store.save(child=ChildRecord(42, 4200, "boot", "b" * 40))
    assert on_disk(tmp_path)["child"]["pid"] == 42, "written inline, no fsync"
    release.set()
    await writer.drain()
    assert on_disk(tmp_path)["child"]["pid"] == 42 and on_disk(tmp_path)["built"] == "b" * 40
    assert writer.stop(5)


class SlowDisk(StateStore):
    """A store whose writes wait at `gate`, as behind an SD card's fsync: the one stand-in in
    this file, since no real file system here can be made slow on demand. It writes for real."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate, self.entered = threading.Event(), threading.Event()

    def _write(self, state, durable):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.gate.wait(10)
        return super()._write(state, durable)


@in_loop
async def test_a_child_record_saved_while_its_file_is_being_written_goes_ahead_of_the_queue(
        tmp_path):
    """It cannot be written on the loop then (the two writes share the spare copy), so the
    thread writes it right after, before other apps' queued fsyncs; a durable save made
    meanwhile is fsync'd later, behind them."""
    writer = DiskWriter(asyncio.get_running_loop())
    store = SlowDisk(tmp_path / "a")
    other = StateStore(tmp_path / "b")
    store.writer = other.writer = writer
    store.save(built="a" * 40)
    assert store.entered.wait(5), "the thread is writing the file now"
    other.save(failed="b" * 40)  # another app's fsync, queued
    seen: list[dict] = []
    writer.submit(lambda: seen.append(on_disk(tmp_path / "a")))  # runs after that one
    store.save(child=ChildRecord(7, 70, "boot"))
    store.save(failed="c" * 40)
    assert not (tmp_path / "a" / "state.json").exists(), "nothing written on the loop"
    store.gate.set()
    await writer.drain()
    assert seen[0]["child"]["pid"] == 7 and seen[0]["built"] == "a" * 40
    assert on_disk(tmp_path / "a")["failed"] == "c" * 40 and on_disk(tmp_path / "b")["failed"]
    assert writer.stop(5)


@in_loop
async def test_saves_of_one_file_never_overlap_and_end_with_the_latest(tmp_path):
    """Durable saves through the thread and child records inline, interleaved as fast as the
    loop can go. Two writes of one file at once would fight over its spare copy (a rename of a
    spare that the other one already moved: a failed save) or leave an older state last."""
    reports: list[tuple[str, dict]] = []
    writer = DiskWriter(asyncio.get_running_loop())
    store = StateStore(tmp_path, report=lambda event, facts: reports.append((event, facts)))
    store.writer = writer
    for n in range(1, 3000):
        if n % 3:
            store.save(child=ChildRecord(n + 2, n, "boot"))
        else:
            store.save(failed=f"{n:040x}")
        if n % 7 == 0:
            await asyncio.sleep(0)  # the other apps' steps
        if n % 100 == 0:
            await writer.drain()
            assert on_disk(tmp_path)["child"]["pid"] == store.current.child.pid
            assert on_disk(tmp_path)["failed"] == store.current.failed
    await writer.drain()
    assert reports == []
    final = on_disk(tmp_path)
    assert (int(final["failed"], 16), final["child"]["pid"]) == (2997, 3001)  # the latest
    assert writer.stop(5)


@in_loop
async def test_a_failed_write_is_told_on_the_loop_thread_and_its_repair_too(full_disk):
    loop_thread = threading.get_ident()
    told: list[tuple[str, int]] = []
    writer = DiskWriter(asyncio.get_running_loop())
    store = StateStore(full_disk.directory,
                       report=lambda event, facts: told.append((event, threading.get_ident())))
    store.save(built="a" * 40)
    store.writer = writer
    full_disk.fill()
    store.save(held=tuple(f"{n:040x}" for n in range(300)))  # more than the room kept for it
    await writer.drain()
    assert told == [("state.save_failed", loop_thread)]
    full_disk.free()
    store.save(built="d" * 40)
    await writer.drain()
    assert told[-1] == ("state.saved_again", loop_thread)
    assert len(StateStore(full_disk.directory).load().held) == 300
    assert writer.stop(5)


@in_loop
async def test_log_lines_stay_in_order_across_the_writer_and_follow_logrotate(tmp_path):
    path = tmp_path / "events.log"
    log = EventLog(RotatingFile(path, 1 << 20, 2))
    log.write("supervisor.started", {"n": 0})  # inline, before the writer
    writer = DiskWriter(asyncio.get_running_loop())
    log.writer = writer
    release = block(writer)
    for n in range(1, 50):
        log.write("git.fetched", {"n": n})
    assert len(path.read_text().splitlines()) == 1, "the loop did not write them itself"
    path.rename(tmp_path / "events.log-1")  # logrotate's `create` mode
    path.touch()
    release.set()
    log.write("git.fetched", {"n": 50})
    await writer.drain()
    assert writer.stop(5)
    log.writer = None
    log.write("supervisor.stopped", {"n": 51})  # inline again, after the writer
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    old = [json.loads(line) for line in (tmp_path / "events.log-1").read_text().splitlines()]
    assert [line["event"] for line in old] == ["supervisor.started"]
    assert lines[0]["event"] == "log.reopened" and lines[0]["reason"] == "moved"
    assert [line["n"] for line in lines[1:]] == list(range(1, 52))


@in_loop
async def test_the_drain_also_waits_for_the_lines_its_reports_write(full_disk):
    """At exit: a save that fails on the thread is told on the loop, whose line goes back to the
    thread; the drain ends only once that line is in the file too."""
    path = full_disk.directory.parent / "events.log"
    log = EventLog(RotatingFile(path, 1 << 20, 2))
    writer = DiskWriter(asyncio.get_running_loop())
    log.writer = writer
    store = StateStore(full_disk.directory / "app", report=log.write)
    store.writer = writer
    log.write("supervisor.started", {})
    store.save(built="a" * 40)
    full_disk.fill()
    store.save(held=tuple(f"{n:040x}" for n in range(300)))
    await writer.drain()
    assert writer.stop(5)
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["supervisor.started", "state.save_failed"]


@in_loop
async def test_a_job_that_raises_is_told_and_the_thread_goes_on(tmp_path):
    errors: list[BaseException] = []
    writer = DiskWriter(asyncio.get_running_loop(), errors.append)
    ran = []

    def bug() -> None:
        raise RuntimeError("boom")

    writer.submit(bug)
    writer.submit(lambda: ran.append(1))
    await writer.drain()
    assert [str(e) for e in errors] == ["boom"] and ran == [1]
    assert writer.stop(5)


@in_loop
async def test_an_idle_writer_sleeps_in_the_kernel(tmp_path):
    """No polling timeout: once its queue is empty the thread is woken by nothing."""
    writer = DiskWriter(asyncio.get_running_loop())
    writer.submit(lambda: None)
    await writer.drain()
    tid = next(t.native_id for t in threading.enumerate() if t.name == "supervisor-writer")
    status = Path(f"/proc/self/task/{tid}/status")

    def switches() -> int:
        line = next(x for x in status.read_text().splitlines()
                    if x.startswith("voluntary_ctxt_switches"))
        return int(line.split()[1])

    before = switches()
    await asyncio.sleep(0.5)  # time passing is the point: nothing may wake the thread
    # One switch at most: the thread may have been on its way into the queue's wait (a poll
    # with a timeout, even of 0.1 s, would show five).
    assert switches() <= before + 1
    assert writer.stop(5)


@in_loop
async def test_children_forked_beside_a_busy_writer_start_and_inherit_none_of_its_files(
        tmp_path):
    """proc.spawn moves sockets to fds 3.. in a preexec_fn, which runs between fork and exec
    while the writer may be in the middle of a write: the child must neither hang there nor
    keep a file the writer had open."""
    from supervisor.drivers import proc

    writer = DiskWriter(asyncio.get_running_loop())
    stores = [StateStore(tmp_path / f"app{n}") for n in range(4)]
    for store in stores:
        store.writer = writer
    # A socket fd far from 3, so that spawn takes the preexec_fn path.
    read_end, write_end = os.pipe()
    parked = os.dup2(write_end, 40, inheritable=False)
    os.close(write_end)
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    try:
        for n in range(60):
            for store in stores:
                store.save(failed=f"{n:040x}")  # keeps the thread writing and fsyncing
            child = proc.spawn(["/bin/sh", "-c", "ls -l /proc/self/fd/"], cwd=tmp_path,
                               env={"PATH": "/usr/bin:/bin"}, stdout=out_write,
                               pass_fds=(parked,))
            async with asyncio.timeout(10):
                assert await child.exited == 0
        os.close(out_write)
        out_write = -1
        listing = b""
        while chunk := os.read(out_read, 65536):
            listing += chunk
    finally:
        if out_write >= 0:
            os.close(out_write)
        os.close(out_read)
        os.close(read_end)
        os.close(parked)
        await writer.drain()
        assert writer.stop(5)
    assert listing.count(b" 3 -> pipe:") == 60, "each child got the socket at fd 3"
    assert b"state.json" not in listing and str(tmp_path).encode() not in listing


@in_loop
async def test_a_pipe_that_journald_drains_slowly_does_not_hold_up_the_loop():
    """Under systemd the log goes to a pipe: when it is full, the thread waits, not the loop."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    log = EventLog(stream)
    writer = DiskWriter(asyncio.get_running_loop())
    log.writer = writer
    try:
        for n in range(2000):  # far more than a pipe holds (64 KiB)
            log.write("child.output", {"line": "x" * 200, "n": n})
        assert writer.done < writer.submitted, "the pipe is full and nobody reads it"
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, _read_all, read_end)
        await writer.drain()
    finally:
        assert writer.stop(5)
        stream.close()
    data = await reading
    numbers = [json.loads(line)["n"] for line in data.splitlines()]
    assert numbers == list(range(2000))


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


@in_loop
async def test_a_log_stream_that_stops_taking_lines_costs_a_bounded_queue_and_loses_nothing():
    """A journald that stops reading its pipe: at most MAX_QUEUED_LINES wait, then the loop
    waits for room (as it waited for each write before the thread), and no line is lost."""
    from supervisor.drivers.diskwriter import MAX_QUEUED_LINES

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    log = EventLog(stream)
    writer = DiskWriter(asyncio.get_running_loop())
    log.writer = writer
    total = MAX_QUEUED_LINES + 2000  # more than the pipe and the queue hold together
    read: list[bytes] = []
    # Starts reading only once the loop has had to wait: the loop itself is blocked then.
    reader = threading.Timer(0.5, lambda: read.append(_read_all(read_end)))
    reader.start()
    longest = 0
    try:
        for n in range(total):
            log.write("child.output", {"line": "x" * 200, "n": n})
            longest = max(longest, writer.submitted - writer.done)
        await writer.drain()
    finally:
        assert writer.stop(5)
        stream.close()
        reader.join(10)
    assert longest <= MAX_QUEUED_LINES
    numbers = [json.loads(line)["n"] for line in read[0].splitlines()]
    assert numbers == list(range(total))
