"""The stats file the child writes: parsed as `KEY=value` data, never executed, read with a size
bound, and watched with watchfiles only while a drain waits on it (an idle supervisor watches
nothing). The watcher reports what it read; whether that is "drained" is the machine's call.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_BYTES = 64 * 1024
_LINE = re.compile(
    r"""^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=
        (?:"(?P<double>[^"]*)"|'(?P<single>[^']*)'|(?P<bare>[^\s"'\#]*))
        \s*(?:\#.*)?$""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Stats:
    """What one read found: `values` is None when the file is missing or unusable."""

    values: dict[str, str] | None
    problem: str | None = None
    ignored_lines: int = 0
    first_ignored: str | None = None


def parse_stats(data: bytes) -> Stats:
    """Parse `KEY=value`, `KEY="value"`, `KEY='value'` lines and `#` comments; ignore the rest."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    values: dict[str, str] = {}
    ignored, first = 0, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line) if "\x00" not in line else None
        if match is None:
            ignored += 1
            first = first or line[:80]
            continue
        value = match.group("double")
        if value is None:
            value = match.group("single")
        if value is None:
            value = match.group("bare")
        values[match.group("key")] = value
    return Stats(values, ignored_lines=ignored, first_ignored=first)


def read_stats(path: str, limit: int = MAX_BYTES) -> Stats:
    """Read at most `limit` bytes of a regular file without ever blocking on it.

    O_NONBLOCK keeps a FIFO planted at the path from hanging the loop; a file over the limit is
    rejected whole, since its first part may be a half-truth.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Stats(None, problem="missing")
    except OSError as error:
        return Stats(None, problem=f"cannot open: {error.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Stats(None, problem="not a regular file")
        data = os.read(fd, limit + 1)
    except OSError as error:
        return Stats(None, problem=f"cannot read: {error.strerror}")
    finally:
        os.close(fd)
    if len(data) > limit:
        return Stats(None, problem=f"larger than {limit} bytes")
    return parse_stats(data)


def load_rust_notify() -> type:
    """watchfiles' Rust backend, without running the package's __init__, which imports anyio
    and watchfiles' whole Python API: about 1 MB that a tiny box would keep for good after the
    first drain. Falls back to the plain import if the layout is not what we expect."""
    name = "watchfiles._rust_notify"
    if name not in sys.modules:
        try:
            import importlib.machinery
            import importlib.util

            package = importlib.util.find_spec("watchfiles")  # finds it without importing it
            locations = package.submodule_search_locations if package else None
            finder = importlib.machinery.FileFinder(
                (locations or [""])[0],
                (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
            spec = finder.find_spec(name)
            if spec is None or spec.loader is None:
                raise ImportError(name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        except ImportError:
            pass
    if name in sys.modules:
        return sys.modules[name].RustNotify  # type: ignore[no-any-return]
    from watchfiles._rust_notify import RustNotify

    return RustNotify


class StatsWatcher:
    """Watches the stats file's directory (the file itself is deleted and recreated) in one
    thread while started; `report` is called on the event loop with each fresh read."""

    DEBOUNCE_MS = 100  # a write storm yields at most ~10 reads a second
    STEP_MS = 20  # a single write is read ~20 ms after it lands

    def __init__(self, path: str, report: Callable[[Stats], None]) -> None:
        self.path = os.path.abspath(path)
        self._report = report
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(loop, self._stop), name="stats-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self._stop, self._thread = None, None

    def _post(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        stats = read_stats(self.path)
        if not stop.is_set():
            loop.call_soon_threadsafe(self._deliver, stop, stats)

    def _deliver(self, stop: threading.Event, stats: Stats) -> None:
        if not stop.is_set():  # a read that raced with stop() must not count
            self._report(stats)

    def _watch(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        # RustNotify (watchfiles' documented backend) starts watching when it is created, so
        # the first read below cannot miss a write; `watch()` would only arm on first use.
        RustNotify = load_rust_notify()

        directory, name = os.path.split(self.path)
        try:
            with RustNotify([directory], False, False, 300, False, False) as notify:
                self._post(loop, stop)
                last_read = time.monotonic()
                while not stop.is_set():
                    changes = notify.watch(self.DEBOUNCE_MS, self.STEP_MS, 0, stop)
                    if isinstance(changes, set) and any(
                        os.path.basename(path) == name for _kind, path in changes
                    ):
                        # RustNotify returns as soon as its set of (kind, path) stops growing,
                        # which for one file rewritten in a loop is every other step: pace here.
                        pause = last_read + self.DEBOUNCE_MS / 1000 - time.monotonic()
                        if pause > 0 and stop.wait(pause):
                            break
                        self._post(loop, stop)
                        last_read = time.monotonic()
        except Exception as error:
            if not stop.is_set():
                loop.call_soon_threadsafe(
                    self._deliver, stop, Stats(None, problem=f"watch failed: {error}"))
