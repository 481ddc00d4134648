"""Capture of the child's output against real processes, pipes and files: lines arrive with their
stream and pid, nothing buffers without bound, the rotating file keeps its cap under 50 MB of
output, a full disk (a real, small tmpfs) costs lines but never an exception, and every
descriptor is closed when the child is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.drivers import proc
from supervisor.drivers.childlog import (
    DRAIN_LIMIT,
    LINE_LIMIT,
    ChildPipes,
    EventSink,
    FileSink,
    RotatingFile,
    open_sink,
)
from supervisor.drivers.eventlog import EventLog
from tests.processes import kill_if_ours, run

SH = "/bin/sh"




class Collected:
    """A sink that keeps what it is given; `seen` is set on each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, int, str, bool]] = []
        self.seen = asyncio.Event()
        self.closed = False

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        self.lines.append((stream, pid, line, truncated))
        self.seen.set()

    def close(self) -> None:
        self.closed = True

    def texts(self, stream: str) -> list[str]:
        return [line for s, _, line, _ in self.lines if s == stream]


class Counted:
    """Passes lines on to another sink and counts them."""

    def __init__(self, sink) -> None:  # type: ignore[no-untyped-def]
        self.sink, self.count = sink, 0

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        self.count += 1
        self.sink(stream, pid, line, truncated)

    def close(self) -> None:
        self.sink.close()


async def supervise(argv: list[str], sink, cwd: Path) -> int:  # type: ignore[no-untyped-def]
    """Start argv with its output captured, as child.py does, and wait for its exit; the pipes
    are closed in the exit callback, before anything else hears of the exit."""
    pipes = ChildPipes(sink)
    stdout, stderr = pipes.fds_for_child()
    try:
        process = proc.spawn(argv, cwd=cwd, env=None, stdout=stdout, stderr=stderr)
    except BaseException:
        pipes.close()
        raise
    pipes.started(process.pid)
    process.exited.add_done_callback(lambda _: pipes.close())
    await process.exited
    assert pipes.closed
    return process.pid


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Capture


def test_lines_arrive_with_their_stream_and_pid(tmp_path: Path) -> None:
    sink = Collected()
    script = ("echo out; echo err >&2; echo 'two words'; printf 'crlf\\r\\n' >&2; "
              "printf 'no newline at the end'")
    pid = run(supervise([SH, "-c", script], sink, tmp_path))
    assert sink.texts("stdout") == ["out", "two words", "no newline at the end"]
    assert sink.texts("stderr") == ["err", "crlf"]
    assert {p for _, p, _, _ in sink.lines} == {pid}
    assert not any(truncated for *_, truncated in sink.lines)


def test_lines_arrive_while_the_child_runs(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, int, str, bool]]:
        sink = Collected()
        pipes = ChildPipes(sink)
        stdout, stderr = pipes.fds_for_child()
        process = proc.spawn([SH, "-c", "echo ready >&2; exec sleep 30"], cwd=tmp_path,
                             env=None, stdout=stdout, stderr=stderr)
        pipes.started(process.pid)
        process.exited.add_done_callback(lambda _: pipes.close())
        try:
            async with asyncio.timeout(5):
                await sink.seen.wait()
            return list(sink.lines)
        finally:
            process.signal_group(signal.SIGKILL)
            await process.exited

    assert [line[::2] for line in run(scenario())] == [("stderr", "ready")]


def test_a_new_child_gets_new_pipes_and_every_fd_is_closed_after_its_exit(tmp_path: Path) -> None:
    async def scenario() -> None:
        before = open_fds()
        for number in range(3):
            sink = Collected()
            pipes = ChildPipes(sink)
            stdout, stderr = pipes.fds_for_child()
            process = proc.spawn([SH, "-c", f"echo {number}; echo {number} >&2"], cwd=tmp_path,
                                 env=None, stdout=stdout, stderr=stderr)
            pipes.started(process.pid)
            # Only the read ends are left here: the write ends are the child's alone, or EOF
            # would never come. (The process's pidfd is the third.)
            assert len(open_fds() - before) == 3
            process.exited.add_done_callback(lambda _, pipes=pipes: pipes.close())  # type: ignore[misc]
            await process.exited
            assert pipes.closed
            assert open_fds() == before
            assert sorted(line[::2] for line in sink.lines) == [("stderr", str(number)),
                                                                 ("stdout", str(number))]

    run(scenario())


def test_a_failed_spawn_leaves_no_fd_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        before = open_fds()
        pipes = ChildPipes(Collected())
        stdout, stderr = pipes.fds_for_child()
        with pytest.raises(OSError):
            proc.spawn([str(tmp_path / "no-such-program")], cwd=tmp_path, env=None,
                       stdout=stdout, stderr=stderr)
        pipes.close()
        assert open_fds() == before

    run(scenario())


def test_close_reads_what_the_pipes_still_hold(tmp_path: Path) -> None:
    """The loop never runs between the start and the exit here, so every line is still in the
    pipes when close() comes: it must read them all, and without waiting."""

    async def scenario() -> Collected:
        sink = Collected()
        pipes = ChildPipes(sink)
        stdout, stderr = pipes.fds_for_child()
        child = subprocess.Popen([SH, "-c", "seq 1 2000; printf last >&2"], cwd=tmp_path,
                                 stdout=stdout, stderr=stderr)
        pipes.started(child.pid)
        child.wait(10)  # blocking on purpose: no reader callback gets a turn
        assert sink.lines == []
        pipes.close()
        return sink

    sink = run(scenario())
    assert sink.texts("stdout") == [str(n) for n in range(1, 2001)]
    assert sink.texts("stderr") == ["last"]


def test_close_is_bounded_when_an_escaped_process_keeps_writing(tmp_path: Path) -> None:
    pid_file = tmp_path / "escapee.pid"
    script = (f"setsid {SH} -c 'echo $$ > {pid_file}; while :; do echo spam; done' & "
              f"while [ ! -s {pid_file} ]; do sleep 0.01; done")
    sink = Counted(Collected())
    drained: list[int] = []

    async def supervise_counting_close() -> None:
        """As supervise(), but counts only what close() itself delivers: before the exit the
        loop reads the escapee's output as it comes, which is not what is bounded here."""
        pipes = ChildPipes(sink)
        stdout, stderr = pipes.fds_for_child()
        process = proc.spawn([SH, "-c", script], cwd=tmp_path, env=None, stdout=stdout,
                             stderr=stderr)
        pipes.started(process.pid)

        def close(_: object) -> None:
            before = sink.count
            pipes.close()
            drained.append(sink.count - before)

        process.exited.add_done_callback(close)
        await process.exited

    try:
        run(supervise_counting_close(), limit=10)
        # What close() read is capped; the escapee gets EPIPE (SIGPIPE) from then on.
        assert drained and drained[0] * len("spam\n") <= DRAIN_LIMIT + 2 * 65536
        escapee = int(pid_file.read_text())
        assert gone(escapee, within=5.0), "the escapee still runs: its pipe was not closed"
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError):
            kill_if_ours(int(pid_file.read_text()), b"spam")


def gone(pid: int, within: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within)[0])
    finally:
        os.close(fd)



def test_a_huge_line_without_newline_is_capped_and_memory_stays_small(tmp_path: Path) -> None:
    sink = Collected()
    script = ("head -c 20000000 /dev/zero | tr '\\0' x; printf '\\nafter\\n'; "
              "head -c 50000 /dev/zero")
    tracemalloc.start()
    try:
        run(supervise([SH, "-c", script], sink, tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{peak} bytes held for a 20 MB line"
    (stream, _, first, cut), second, third = sink.lines
    assert (stream, first, cut) == ("stdout", "x" * LINE_LIMIT, True)
    assert second[2:] == ("after", False)
    # A line that is still too long when the child exits is passed on capped, too.
    assert third[2:] == ("\x00" * LINE_LIMIT, True)


# ---------------------------------------------------------------------------------------------
# Sinks


def test_the_event_sink_writes_child_output_lines_to_the_event_log(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with open(path, "w") as stream:
        sink = EventSink(EventLog(stream).write)
        pid = run(supervise([SH, "-c", "echo hello; printf '\\303\\251t\\351\\n' >&2"], sink,
                            tmp_path))
    records = sorted(json_lines(path), key=lambda r: str(r["stream"]))
    assert [(r["event"], r["stream"], r["pid"], r["line"]) for r in records] == [
        ("child.output", "stderr", pid, "\u00e9t\ufffd"),  # invalid UTF-8 is replaced
        ("child.output", "stdout", pid, "hello"),
    ]
    assert all("truncated" not in r for r in records)
    assert path.read_bytes().isascii()


def test_open_sink_by_mode(tmp_path: Path) -> None:
    def log(event: str, facts: dict[str, object]) -> None:
        pass

    assert isinstance(open_sink("events", log), EventSink)
    assert isinstance(open_sink("file", log, tmp_path / "child.log", 4096, 1), FileSink)
    assert open_sink("inherit", log) is None


def test_50_mb_through_the_file_sink_stay_under_the_cap(tmp_path: Path) -> None:
    path, max_bytes, keep = tmp_path / "child.log", 1 << 20, 3
    reports: list[tuple[str, dict[str, object]]] = []
    sink = Counted(FileSink(RotatingFile(path, max_bytes, keep),
                            lambda event, facts: reports.append((event, facts))))
    # 1000-byte lines, half on each stream: 50,000 lines, 50 MB.
    line = "$(printf '%0999d' 0)"
    script = (f'yes "{line}" | head -c 25000000 & yes "{line}" | head -c 25000000 >&2; wait')
    pid = run(supervise([SH, "-c", script], sink, tmp_path), limit=60)
    sink.close()

    assert sink.count == 50_000
    files = [path] + [Path(f"{path}.{n}") for n in range(1, keep + 1)]
    assert all(f.exists() for f in files) and not Path(f"{path}.{keep + 1}").exists()
    sizes = [f.stat().st_size for f in files]
    assert all(size <= max_bytes for size in sizes), sizes
    assert sum(sizes) <= (keep + 1) * max_bytes
    for f in files:
        for record in json_lines(f):
            assert set(record) == {"ts", "stream", "pid", "line"}
            assert record["pid"] == pid and record["line"] == "0" * 999
    assert reports == []


def test_a_line_too_long_is_marked_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "child.log"
    sink = FileSink(RotatingFile(path, 1 << 20, 1), lambda event, facts: None)
    run(supervise([SH, "-c", "head -c 100000 /dev/zero | tr '\\0' y; echo; echo ok"], sink,
                  tmp_path))
    sink.close()
    long, short = json_lines(path)
    assert long["line"] == "y" * LINE_LIMIT and long["truncated"] is True
    assert short["line"] == "ok" and "truncated" not in short


# ---------------------------------------------------------------------------------------------
# The rotating file


def test_rotation_keeps_the_newest_lines_in_keep_plus_one_files(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    file = RotatingFile(path, max_bytes=100, keep=2)
    for number in range(1000):
        assert file.write_line(f"{number:04d}")  # 5 bytes each: 20 lines a file
    file.close()
    assert not Path(f"{path}.3").exists()
    lines = []
    for name in (f"{path}.2", f"{path}.1", path):
        content = Path(name).read_text()
        assert len(content) == 100
        lines += content.splitlines()
    assert lines == [f"{n:04d}" for n in range(940, 1000)]


def test_keep_zero_keeps_one_file_and_a_huge_line_gets_a_file_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    file = RotatingFile(path, max_bytes=50, keep=0)
    for number in range(100):
        file.write_line(f"line {number}")
    assert path.stat().st_size <= 50
    assert file.write_line("z" * 200)
    assert path.read_text() == "z" * 200 + "\n"
    assert file.write_line("next")
    assert path.read_text() == "next\n"
    file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.log"]


def test_an_existing_file_is_appended_to_and_counts_toward_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    path.write_text("old\n" * 30)  # 120 bytes: over the cap already
    file = RotatingFile(path, max_bytes=100, keep=1)
    file.write_line("new")
    file.close()
    assert Path(f"{path}.1").read_text() == "old\n" * 30
    assert path.read_text() == "new\n"


def test_writes_to_a_missing_directory_are_dropped_and_counted(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    file = RotatingFile(directory / "out.log", max_bytes=1000, keep=1)
    assert not file.write_line("lost 1")
    assert not file.write_line("lost 2")
    assert file.take_dropped() == (2, "No such file or directory")
    directory.mkdir()
    assert file.write_line("kept")
    assert file.take_dropped() == (0, None)
    file.close()
    assert (directory / "out.log").read_text() == "kept\n"


def test_open_reports_at_start_why_the_file_cannot_be_written(tmp_path: Path) -> None:
    file = RotatingFile(tmp_path / "missing" / "out.log", max_bytes=1000, keep=1)
    with pytest.raises(FileNotFoundError):
        file.open()
    file = RotatingFile(tmp_path / "out.log", max_bytes=1000, keep=1)
    file.open()
    assert (tmp_path / "out.log").exists()
    file.close()


def test_an_event_log_can_write_to_a_rotating_file(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    file = RotatingFile(path, max_bytes=2000, keep=1)
    log = EventLog(file)  # type: ignore[arg-type]
    for number in range(100):
        log.write("child.restarting", {"reason": "test", "crashes": number, "delay": 0.0})
    file.close()
    records = json_lines(Path(f"{path}.1")) + json_lines(path)
    assert records[-1]["crashes"] == 99
    assert [r["crashes"] for r in records] == list(range(100 - len(records), 100))
    assert path.stat().st_size <= 2000 and Path(f"{path}.1").stat().st_size <= 2000


# ---------------------------------------------------------------------------------------------
# A full disk: a real tmpfs of 256 KiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                             str(mount_point)], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10)


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk is full."""
    with open(path, "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 4096)


def test_a_full_disk_drops_lines_without_an_exception_and_reports_them_once(
        small_disk: Path, tmp_path: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (192 << 10))  # 64 KiB left
    path = small_disk / "child.log"
    reports: list[tuple[str, dict[str, object]]] = []
    file = RotatingFile(path, max_bytes=1 << 20, keep=1)
    sink = Counted(FileSink(file, lambda event, facts: reports.append((event, facts))))
    try:
        # ~1000 records of ~140 bytes: about twice what fits.
        run(supervise([SH, "-c", "seq 1 1000 | sed 's/$/ padding padding padding padding/'"],
                      sink, tmp_path))
        kept = json_lines(path)  # every line whole: a short write was cut off again
        assert 0 < len(kept) < 1000
        assert file.dropped == 1000 - len(kept)
        assert reports == []  # nothing worked since the first drop: nothing to report yet

        filler.unlink()
        run(supervise([SH, "-c", "echo back"], sink, tmp_path))
        assert reports == [("child.output_dropped", {
            "count": 1000 - len(kept), "file": str(path), "error": "No space left on device"})]
        assert json_lines(path)[-1]["line"] == "back"
        sink.close()
        assert len(reports) == 1  # reported once
    finally:
        file.close()


def test_drops_still_pending_are_reported_at_close(small_disk: Path, tmp_path: Path) -> None:
    fill(small_disk / "filler")
    reports: list[tuple[str, dict[str, object]]] = []
    file = RotatingFile(small_disk / "child.log", max_bytes=1 << 20, keep=1)
    sink = FileSink(file, lambda event, facts: reports.append((event, facts)))
    run(supervise([SH, "-c", "seq 1 100"], sink, tmp_path))
    sink.close()
    assert [(event, facts["count"]) for event, facts in reports] == [
        ("child.output_dropped", 100)]

