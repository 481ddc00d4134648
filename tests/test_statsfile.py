"""The stats file: parsed as data and never executed, read with a bound and without blocking,
and watched with reports that follow a change within about 100 ms.
"""

from __future__ import annotations

import asyncio
import os
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.core.condition import parse_condition
from supervisor.drivers.statsfile import MAX_BYTES, Stats, StatsWatcher, parse_stats, read_stats

DRAINED = parse_condition("n_clients == 0")

# ---------------------------------------------------------------------------------------------
# parse_stats


@pytest.mark.parametrize(("text", "values"), [
    ('n_clients="9"\nn_authed="2"\n', {"n_clients": "9", "n_authed": "2"}),  # the seed's format
    ("n_clients=0\n", {"n_clients": "0"}),
    ("n_clients='0'\n", {"n_clients": "0"}),
    ('msg="two words # not a comment"\n', {"msg": "two words # not a comment"}),
    ("msg='say \"hi\"'\n", {"msg": 'say "hi"'}),
    ('  n_clients="1"   # trailing comment\n', {"n_clients": "1"}),
    ("n_clients=3 # comment\n", {"n_clients": "3"}),
    ("empty=\nquoted_empty=''\n", {"empty": "", "quoted_empty": ""}),
    ("n=1\nn=2\n", {"n": "2"}),  # the last assignment wins, as when the shell sourced it
    ("a=1\r\nb=2\r\n", {"a": "1", "b": "2"}),
    ("# only a comment\n\n   \n", {}),
    ("", {}),
    ("_private=x\nKey_2=y\n", {"_private": "x", "Key_2": "y"}),
])
def test_parse_values(text: str, values: dict[str, str]) -> None:
    stats = parse_stats(text.encode())
    assert stats == Stats(values)


@pytest.mark.parametrize(("text", "ignored", "first"), [
    ("garbage\nn_clients=0\n", 1, "garbage"),
    ("n_clients = 0\n", 1, "n_clients = 0"),
    ("2bad=1\n-x=1\nexport n_clients=0\n", 3, "2bad=1"),
    ('unterminated="abc\n', 1, 'unterminated="abc'),
    ("n_clients=0 1\n", 1, "n_clients=0 1"),
    ("x" * 500 + "\n", 1, "x" * 80),
])
def test_garbage_lines_are_counted_and_ignored(text: str, ignored: int, first: str) -> None:
    stats = parse_stats(text.encode())
    assert stats.ignored_lines == ignored
    assert stats.first_ignored == first
    assert stats.problem is None and stats.values is not None


def test_binary_data_with_nuls_does_not_hurt() -> None:
    data = b"n_clients=0\x00rm\n\x00\x01\x02\xff\xfe\n" + bytes(range(256)) + b"\nn_authed=2\n"
    stats = parse_stats(data)
    assert stats.values is not None and "n_clients" not in stats.values
    assert stats.values.get("n_authed") == "2"
    assert stats.ignored_lines >= 2
    assert all("\x00" not in key + value for key, value in stats.values.items())


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    stats = parse_stats(b"name=caf\xe9\nn_clients=\xff\xfe\nok=1\n")
    assert stats.values is not None
    assert stats.values == {"name": "caf\ufffd", "n_clients": "\ufffd\ufffd", "ok": "1"}
    assert not DRAINED.holds(stats.values)
    assert not parse_condition("n_clients >= 0").holds(stats.values)


def test_a_byte_order_mark_does_not_hide_the_first_line() -> None:
    # Some editors and runtimes write UTF-8 with a BOM; the first key must still count.
    stats = parse_stats(b"\xef\xbb\xbfn_clients=0\nn_authed=1\n")
    assert stats.values == {"n_clients": "0", "n_authed": "1"}


SHELL_CODE = [
    "n_clients=0; touch {marker}",
    "n_clients=0 && touch {marker}",
    "n_clients=$(touch {marker})",
    "n_clients=`touch {marker}`",
    "n_clients=0`touch {marker}`",
    "n_clients='0'; touch {marker}",
    'n_clients="0" | touch {marker}',
    "touch {marker}",
    ". {marker}",
    "n_clients=0\\\ntouch {marker}",
    "n_clients=${{x:-0}}",
    "n_clients=$x",
    "eval n_clients=0",
    "n_clients=0 touch {marker}",
]


@pytest.mark.parametrize("line", SHELL_CODE)
def test_shell_code_is_never_executed_nor_passes(tmp_path: Path, line: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "stats"
    path.write_text(line.format(marker=marker) + "\n")
    stats = read_stats(str(path))
    assert not marker.exists()
    assert stats.values is not None
    assert not DRAINED.holds(stats.values), f"{line!r} read as {stats.values}"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_stats_never_raises_on_bytes(data: bytes) -> None:
    stats = parse_stats(data)
    assert stats.values is not None and stats.problem is None
    for key, value in stats.values.items():
        assert key.isidentifier() and key.isascii()
        assert "\n" not in value and "\x00" not in value
    assert stats.ignored_lines >= 0
    assert (stats.first_ignored is None) == (stats.ignored_lines == 0)


_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
_SAFE_CHAR = st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: c not in "\"\x00" and len(f"a{c}b".splitlines()) == 1)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_KEYS, st.text(_SAFE_CHAR, max_size=30), max_size=10))
def test_quoted_values_round_trip(values: dict[str, str]) -> None:
    text = "".join(f'{key}="{value}"\n' for key, value in values.items())
    assert parse_stats(text.encode()).values == values


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_KEYS, st.text(string.ascii_letters + string.digits + "._-+:/",
                                      max_size=20), max_size=10))
def test_bare_values_round_trip(values: dict[str, str]) -> None:
    text = "".join(f"{key}={value}\n" for key, value in values.items())
    assert parse_stats(text.encode()).values == values


# ---------------------------------------------------------------------------------------------
# read_stats


def test_read_missing_file(tmp_path: Path) -> None:
    assert read_stats(str(tmp_path / "nope")) == Stats(None, problem="missing")


def test_read_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    path.write_text('n_clients="0"\nbad line\n')
    assert read_stats(str(path)) == Stats({"n_clients": "0"}, ignored_lines=1,
                                          first_ignored="bad line")


def _read_in_thread(path: str) -> Stats:
    """read_stats in a daemon thread, so that a blocking read fails the test instead of
    hanging the whole run."""
    box: list[Stats] = []
    thread = threading.Thread(target=lambda: box.append(read_stats(path)), daemon=True)
    thread.start()
    thread.join(timeout=2)
    assert box, "read_stats blocked"
    return box[0]


def test_a_fifo_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    os.mkfifo(path)
    started = time.monotonic()
    stats = _read_in_thread(str(path))
    assert time.monotonic() - started < 0.5
    assert stats.values is None and stats.problem == "not a regular file"


def test_a_directory_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "stats").mkdir()
    stats = _read_in_thread(str(tmp_path / "stats"))
    assert stats.values is None and stats.problem == "not a regular file"


def test_a_device_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "stats").symlink_to("/dev/zero")
    stats = _read_in_thread(str(tmp_path / "stats"))
    assert stats.values is None and stats.problem == "not a regular file"


def test_a_100_mb_file_is_rejected_whole(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    path.write_bytes(b"n_clients=0\n")
    os.truncate(path, 100 * 1024 * 1024)  # sparse: costs no disk
    started = time.monotonic()
    stats = read_stats(str(path))
    assert time.monotonic() - started < 0.5
    assert stats.values is None and stats.problem == f"larger than {MAX_BYTES} bytes"


def test_a_file_exactly_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    head = b"n_clients=0\n"
    path.write_bytes(head + b"#" * (MAX_BYTES - len(head)))
    assert path.stat().st_size == MAX_BYTES
    assert read_stats(str(path)).values == {"n_clients": "0"}
    with path.open("ab") as file:
        file.write(b"\n")
    assert read_stats(str(path)).problem == f"larger than {MAX_BYTES} bytes"


def test_the_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "stats"
    path.write_bytes(b"n=1\n")
    assert read_stats(str(path), limit=4).values == {"n": "1"}
    assert read_stats(str(path), limit=3).problem == "larger than 3 bytes"


# ---------------------------------------------------------------------------------------------
# StatsWatcher: a real directory, a real loop, reports awaited with a bound


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.rename(path)


async def next_matching(queue: asyncio.Queue[Stats], predicate: Callable[[Stats], bool],
                        limit: float = 2.0) -> Stats:
    async with asyncio.timeout(limit):
        while True:
            stats = await queue.get()
            if predicate(stats):
                return stats


async def quiet(queue: asyncio.Queue[Stats], period: float, limit: float) -> None:
    """Wait until no report has come for `period` seconds, at most `limit` seconds in all."""
    async with asyncio.timeout(limit):
        while True:
            try:
                async with asyncio.timeout(period):
                    await queue.get()
            except TimeoutError:
                return


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stats-watcher"]


@pytest.fixture(params=["kernel", "watchfiles"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each watcher test runs with the kernel's notification and with the watchfiles thread,
    the fallback where the kernel has none."""
    monkeypatch.setattr(StatsWatcher, "kernel_notify", request.param == "kernel")
    return str(request.param)


def test_watcher_reports_the_initial_read_writes_deletes_and_recreates(tmp_path: Path,
                                                                       backend: str) -> None:
    path = tmp_path / "stats"
    delays: dict[str, float] = {}

    async def change(label: str, queue: asyncio.Queue[Stats], action: Callable[[], None],
                     predicate: Callable[[Stats], bool]) -> Stats:
        started = time.monotonic()
        action()
        stats = await next_matching(queue, predicate)
        delays[label] = time.monotonic() - started
        return stats

    async def scenario() -> None:
        queue: asyncio.Queue[Stats] = asyncio.Queue()
        watcher = StatsWatcher(str(path), queue.put_nowait)
        watcher.start()
        try:
            assert watcher.running
            initial = await next_matching(queue, lambda s: True)
            assert initial == Stats(None, problem="missing")
            await change("create (rename)", queue,
                         lambda: write_atomically(path, 'n_clients="3"\n'),
                         lambda s: s.values == {"n_clients": "3"})
            await change("rewrite (rename)", queue,
                         lambda: write_atomically(path, 'n_clients="0"\n'),
                         lambda s: s.values == {"n_clients": "0"})
            await change("write in place", queue,
                         lambda: path.write_text('n_clients="5"\nn_authed="1"\n'),
                         lambda s: s.values == {"n_clients": "5", "n_authed": "1"})
            deleted = await change("delete", queue, path.unlink, lambda s: s.values is None)
            assert deleted.problem == "missing"
            await change("recreate", queue, lambda: path.write_text("n_clients=0\n"),
                         lambda s: s.values == {"n_clients": "0"})
            # A write elsewhere in the directory is no reason to read.
            (tmp_path / "other").write_text("x")
            with pytest.raises(TimeoutError):
                await next_matching(queue, lambda s: True, limit=0.3)
        finally:
            watcher.stop()
        assert not watcher.running

        path.write_text("n_clients=7\n")
        with pytest.raises(TimeoutError):  # nothing may arrive after stop()
            await next_matching(queue, lambda s: True, limit=0.4)

    asyncio.run(scenario())
    print(f"{backend}: write -> report delays: " + ", ".join(
        f"{label} {seconds * 1000:.0f} ms" for label, seconds in delays.items()))
    for label, seconds in delays.items():
        assert seconds < 0.5, f"{label} took {seconds:.3f}s"
    for thread in watcher_threads():
        thread.join(timeout=2)
    assert watcher_threads() == [], "the watcher thread outlived stop()"


def test_watcher_reads_a_file_that_already_exists(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "stats"
    path.write_text('n_clients="4"\n')

    async def scenario() -> Stats:
        queue: asyncio.Queue[Stats] = asyncio.Queue()
        watcher = StatsWatcher(str(path), queue.put_nowait)
        watcher.start()
        try:
            return await next_matching(queue, lambda s: True)
        finally:
            watcher.stop()

    assert asyncio.run(scenario()) == Stats({"n_clients": "4"})


def test_watcher_of_a_missing_directory_reports_the_failure(tmp_path: Path, backend: str) -> None:
    async def scenario() -> Stats:
        queue: asyncio.Queue[Stats] = asyncio.Queue()
        watcher = StatsWatcher(str(tmp_path / "no-dir" / "stats"), queue.put_nowait)
        watcher.start()
        try:
            return await next_matching(queue, lambda s: True)
        finally:
            watcher.stop()

    stats = asyncio.run(scenario())
    assert stats.values is None
    assert stats.problem is not None and stats.problem.startswith("watch failed")


def test_a_write_storm_gives_bounded_reports_ending_with_the_final_content(
        tmp_path: Path, backend: str) -> None:
    path = tmp_path / "stats"
    storm_seconds = 1.0

    def storm() -> int:
        writes, deadline = 0, time.monotonic() + storm_seconds
        while time.monotonic() < deadline:
            writes += 1
            if writes % 2:
                path.write_text(f'n_clients="{writes}"\n')
            else:
                write_atomically(path, f'n_clients="{writes}"\n')
        path.write_text('n_clients="final"\n')
        return writes

    async def scenario() -> tuple[int, list[Stats], float]:
        reports: list[Stats] = []
        queue: asyncio.Queue[Stats] = asyncio.Queue()

        def report(stats: Stats) -> None:
            reports.append(stats)
            queue.put_nowait(stats)

        watcher = StatsWatcher(str(path), report)
        watcher.start()
        try:
            await next_matching(queue, lambda s: True)  # the initial read
            started = time.monotonic()
            writes = await asyncio.to_thread(storm)
            await next_matching(queue, lambda s: s.values == {"n_clients": "final"})
            elapsed = time.monotonic() - started
            await quiet(queue, 0.4, limit=2.0)  # and then it settles
        finally:
            watcher.stop()
        return writes, reports[1:], elapsed

    writes, reports, elapsed = asyncio.run(scenario())
    print(f"{backend}: write storm: {writes} writes in {elapsed:.2f}s -> {len(reports)} reports")
    assert writes > 100
    assert len(reports) <= 15 * elapsed + 2
    assert reports[-1].values == {"n_clients": "final"}


# ---------------------------------------------------------------------------------------------
# garbage stays garbage (issue 12)

SEPARATORS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_a_line_ends_only_at_a_newline(separator: str) -> None:
    # A value the app copies from a client (a user name) must not make a second line.
    quoted = parse_stats(f'last_user="x{separator}n_clients=0"\nn_clients=3\n'.encode())
    assert quoted.values == {"last_user": f"x{separator}n_clients=0", "n_clients": "3"}
    alone = parse_stats(f'n_clients=3\nlast_user="x{separator}n_clients=0"\n'.encode())
    assert alone.values == {"n_clients": "3", "last_user": f"x{separator}n_clients=0"}
    bare = parse_stats(f"n_clients=3\nlast_user=x{separator}n_clients=0\n".encode())
    assert bare.values is not None and bare.values["n_clients"] == "3"
    for stats in (quoted, alone, bare):
        assert not DRAINED.holds(stats.values or {})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, st.text(st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: c not in "\"\x00\n"), max_size=30), max_size=10))
def test_any_quoted_value_without_newline_or_quote_round_trips(values: dict[str, str]) -> None:
    text = "".join(f'{key}="{value}"\r\n' for key, value in values.items())
    assert parse_stats(text.encode()).values == values


@pytest.mark.parametrize("path", ["/proc/self/environ", "/proc/self/status", "/proc/cmdline",
                                  "/sys/kernel/uevent_seqnum",
                                  "/sys/kernel/mm/transparent_hugepage/enabled"])
def test_kernel_files_are_never_read(tmp_path: Path, path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is not on this machine")
    for name in (path, str(tmp_path / "stats")):
        if name != path:
            os.symlink(path, name)
        stats = read_stats(name)
        assert stats.values is None and stats.ignored_lines == 0 and stats.first_ignored is None
        assert stats.problem == f"under /{path.split('/')[1]}: not read"


def test_dev_shm_is_an_ordinary_tmpfs_for_stats_files(tmp_path: Path) -> None:
    """The bench and many users keep stats files in RAM there; the rest of /dev is refused."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path("/dev/shm") / f"supervisor-test-{os.getpid()}"
    path.write_text('n_clients="0"\n')
    try:
        assert read_stats(str(path)).values == {"n_clients": "0"}
        os.symlink(path, tmp_path / "stats")
        assert read_stats(str(tmp_path / "stats")).values == {"n_clients": "0"}
    finally:
        path.unlink()
    assert read_stats("/dev/stdin").values is None


def test_a_bind_mount_of_proc_elsewhere_is_recognised(tmp_path: Path) -> None:
    mount = tmp_path / "p"
    mount.mkdir()
    if os.geteuid() != 0 or os.system(f"mount --bind /proc {mount} 2>/dev/null") != 0:
        pytest.skip("needs root and mount --bind")
    try:
        assert read_stats(str(mount / "self" / "environ")).problem == "under /proc: not read"
    finally:
        os.system(f"umount {mount}")


def test_the_watcher_follows_a_directory_renamed_and_made_again(tmp_path: Path,
                                                                 backend: str) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    path = directory / "stats"
    path.write_text("n_clients=2\n")

    async def scenario() -> list[Stats]:
        queue: asyncio.Queue[Stats] = asyncio.Queue()
        watcher = StatsWatcher(str(path), queue.put_nowait)
        watcher.start()
        seen = []
        try:
            seen.append(await next_matching(queue, lambda s: s.values == {"n_clients": "2"}))
            directory.rename(tmp_path / "run.old")
            (tmp_path / "run.old" / "stats").write_text("n_clients=9\n")  # the old one: no use
            directory.mkdir()
            seen.append(await next_matching(queue, lambda s: s.problem == "missing"))
            path.write_text("n_clients=1\n")
            seen.append(await next_matching(queue, lambda s: s.values == {"n_clients": "1"}))
            write_atomically(path, "n_clients=0\n")
            seen.append(await next_matching(queue, lambda s: s.values == {"n_clients": "0"}))
            # and again, the new directory made before the old one goes
            (tmp_path / "run.new").mkdir()
            (tmp_path / "run.new" / "stats").write_text("n_clients=4\n")
            directory.rename(tmp_path / "run.older")
            (tmp_path / "run.new").rename(directory)
            seen.append(await next_matching(queue, lambda s: s.values == {"n_clients": "4"}))
        finally:
            watcher.stop()
        return seen

    assert len(asyncio.run(scenario())) == 5
    for thread in watcher_threads():
        thread.join(timeout=2)
