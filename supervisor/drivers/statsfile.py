"""The stats file the child writes: parsed as `KEY=value` data, never executed, read with a size
bound, and watched only while a drain waits on it (an idle supervisor watches nothing): by the
kernel's directory notification, or with watchfiles where the kernel has none. The watcher
reports what it read; whether that is "drained" is the machine's call.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.drivers.signals import add_handler

MAX_BYTES = 64 * 1024
_LINE = re.compile(
    r"""^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=
        (?:"(?P<double>[^"]*)"|'(?P<single>[^']*)'|(?P<bare>[^\s"'\#]*))
        \s*(?:\#.*)?$""",
    # ASCII: \s is space, tab and the like, so \x1c-\x1f, \x85 and U+2028 stay in a value.
    re.VERBOSE | re.ASCII,
)
# No stats come from the kernel's own files: a root supervisor pointed at /proc/self/environ
# would write its environment into the log (`stats.lines_ignored`, `stats.read`).
SYSTEM_DIRECTORIES = ("/proc", "/sys", "/dev")
# ... but /dev/shm is an ordinary tmpfs in RAM, a good home for a stats file on an SD-card box.
ORDINARY = ("/dev/shm",)


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
    # Lines end at \n (or \r\n) only: str.splitlines() also splits at \x0b, \x1c-\x1e, \x85,
    # U+2028 and U+2029, which a value may hold, so `u="x\x1en_clients=0"` would read as two.
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").strip(" \t")
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
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return Stats(None, problem="not a regular file")
        system = _system_directory(fd, path, status)
        if system is not None:
            return Stats(None, problem=f"under {system}: not read")
        data = os.read(fd, limit + 1)
    except OSError as error:
        return Stats(None, problem=f"cannot read: {error.strerror}")
    finally:
        os.close(fd)
    if len(data) > limit:
        return Stats(None, problem=f"larger than {limit} bytes")
    return parse_stats(data)


def _system_directory(fd: int, path: str, status: os.stat_result) -> str | None:
    """Which of /proc, /sys or /dev the open file is under, whatever the path looked like (a
    link, `..`): the kernel's name for the descriptor, or for a bind mount of /proc or /sys
    elsewhere, the file system the file is on."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
    if any(real.startswith(directory + "/") for directory in ORDINARY):
        return None
    for directory in SYSTEM_DIRECTORIES:
        if real == directory or real.startswith(directory + "/"):
            return directory
    for directory in SYSTEM_DIRECTORIES[:2]:
        try:
            if os.stat(directory).st_dev == status.st_dev:
                return directory
        except OSError:
            pass
    return None


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
    """Watches the stats file's directory (the file itself is deleted and recreated) while
    started; `report` is called on the event loop with each fresh read that differs from the
    last one reported.

    The kernel's directory notification (fcntl F_NOTIFY, "dnotify") needs neither a thread nor
    a library: armed once, it raises SIGNAL at the next change in the directory, and it is armed
    again just before each read, so no change after a read goes unseen and a write storm costs
    one signal per read. The loop takes the signal like any other (add_signal_handler). Where
    the kernel lacks it, watchfiles' Rust backend watches in a thread; that library, once
    loaded, stays mapped for good: about 1.1 MB more RSS for the rest of the process's life.

    Both watch the path, not the inode: the directory's parent is watched too, and when the
    directory at the path is another one (renamed away and made again, as a deploy script or
    systemd's RuntimeDirectory does), the watch moves to the new one.
    """

    DEBOUNCE_MS = 100  # a write storm yields at most ~10 reads a second
    STEP_MS = 20  # a single write is read ~20 ms after it lands
    SIGNAL = signal.SIGURG  # ignored by default: one that comes after stop() can do no harm
    CHANGES = fcntl.DN_MODIFY | fcntl.DN_CREATE | fcntl.DN_DELETE | fcntl.DN_RENAME
    MOVES = fcntl.DN_CREATE | fcntl.DN_DELETE | fcntl.DN_RENAME  # in the parent
    kernel_notify = True  # False: always the watchfiles thread (the tests cover both)

    def __init__(self, path: str, report: Callable[[Stats], None]) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self._report = report
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: Stats | None = None
        # the kernel's notification
        self._kernel = False
        self._fd: int | None = None  # the directory; None while no directory is at the path
        self._parent_fd: int | None = None
        self._pending: asyncio.Handle | None = None
        self._last_read = 0.0
        # watchfiles in a thread
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        self._last = None
        if self.kernel_notify and self._notified_by_kernel(loop):
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, args=(loop, self._stop), name="stats-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        for fd in (self._fd, self._parent_fd):
            if fd is not None:
                os.close(fd)  # the notification goes with the descriptor
        if self._kernel:
            _unwatched(self)
        if self._stop is not None:
            self._stop.set()
        self._loop, self._fd, self._parent_fd, self._pending = None, None, None, None
        self._stop, self._thread, self._kernel = None, None, False

    def _deliver_new(self, stats: Stats) -> None:
        if stats != self._last:
            self._last = stats
            self._report(stats)

    # the kernel's notification -------------------------------------------------------------

    def _notified_by_kernel(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Arm the notification and read soon; False where this kernel has none (EINVAL) or the
        loop cannot take signals (not the main thread): then watchfiles watches instead."""
        try:
            fd = _open_directory(self.directory)
        except OSError as error:
            self._pending = loop.call_soon(
                self._deliver_new, Stats(None, problem=f"watch failed: {error.strerror}"))
            return True
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, self.SIGNAL)
            fcntl.fcntl(fd, fcntl.F_NOTIFY, self.CHANGES)
            _watching_by_signal(loop, self)
        except (OSError, ValueError, RuntimeError):
            os.close(fd)
            return False
        self._kernel, self._fd = True, fd
        try:  # without it the watch still works, until the directory is swapped
            self._parent_fd = _open_directory(os.path.dirname(self.directory))
            fcntl.fcntl(self._parent_fd, fcntl.F_SETSIG, self.SIGNAL)
        except OSError:
            if self._parent_fd is not None:
                os.close(self._parent_fd)
            self._parent_fd = None
        self._pending = loop.call_soon(self._read)
        return True

    def _changed(self) -> None:
        """The signal came (for this directory, or another watcher's): read soon, paced."""
        if not self._kernel or self._pending is not None or self._loop is None:
            return
        delay = max(self.STEP_MS, self.DEBOUNCE_MS - (time.monotonic() - self._last_read) * 1000)
        self._pending = self._loop.call_later(delay / 1000, self._read)

    def _follow(self) -> None:
        """Watch the directory now at the path; the old one (renamed, deleted) is let go."""
        try:
            now = os.stat(self.directory)
        except OSError:
            now = None
        if self._fd is not None:
            watched = os.fstat(self._fd)
            if now is not None and (now.st_dev, now.st_ino) == (watched.st_dev, watched.st_ino):
                return
            os.close(self._fd)
            self._fd = None
        if now is None:
            return  # the parent's notification says when one appears
        try:
            fd = _open_directory(self.directory)
        except OSError:
            return
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, self.SIGNAL)
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def _read(self) -> None:
        self._pending = None
        if not self._kernel:
            return
        try:  # all armed again before reading: nothing after the read goes unseen
            if self._parent_fd is not None:
                fcntl.fcntl(self._parent_fd, fcntl.F_NOTIFY, self.MOVES)
            self._follow()
            if self._fd is not None:
                fcntl.fcntl(self._fd, fcntl.F_NOTIFY, self.CHANGES)
        except OSError as error:
            self._deliver_new(Stats(None, problem=f"watch failed: {error.strerror}"))
            return
        self._last_read = time.monotonic()
        self._deliver_new(read_stats(self.path))

    # watchfiles in a thread ----------------------------------------------------------------

    def _post(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        stats = read_stats(self.path)
        if not stop.is_set():
            loop.call_soon_threadsafe(self._deliver, stop, stats)

    def _deliver(self, stop: threading.Event, stats: Stats) -> None:
        if not stop.is_set():  # a read that raced with stop() must not count
            self._deliver_new(stats)

    def _watch(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        # RustNotify (watchfiles' documented backend) starts watching when it is created, so
        # the first read below cannot miss a write; `watch()` would only arm on first use.
        RustNotify = load_rust_notify()

        directory, name = os.path.split(self.path)
        parent = os.path.dirname(directory)
        first = True
        try:
            while not stop.is_set():
                identity = _identity(directory)
                # At the start a missing directory is an error; later it is a swap under way,
                # and the parent says when the new one is there.
                paths = [directory, parent] if identity is not None or first else [parent]
                first = False
                with RustNotify(paths, False, False, 300, False, False) as notify:
                    self._post(loop, stop)
                    last_read = time.monotonic()
                    while not stop.is_set():
                        changes = notify.watch(self.DEBOUNCE_MS, self.STEP_MS, 0, stop)
                        if not isinstance(changes, set):
                            continue
                        if _identity(directory) != identity:
                            break  # watch the directory now at the path, then read
                        if any(os.path.basename(path) == name and
                               os.path.dirname(path) == directory for _kind, path in changes):
                            # RustNotify returns as soon as its set of (kind, path) stops
                            # growing, which for one file rewritten in a loop is every other
                            # step: pace here.
                            pause = last_read + self.DEBOUNCE_MS / 1000 - time.monotonic()
                            if pause > 0 and stop.wait(pause):
                                break
                            self._post(loop, stop)
                            last_read = time.monotonic()
        except Exception as error:
            if not stop.is_set():
                loop.call_soon_threadsafe(
                    self._deliver, stop, Stats(None, problem=f"watch failed: {error}"))


def _open_directory(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


# One signal for every watcher that uses the kernel's notification (the service has one): the
# handler is installed while at least one watches, and each of them reads its own file.
_by_signal: set[StatsWatcher] = set()


def _watching_by_signal(loop: asyncio.AbstractEventLoop, watcher: StatsWatcher) -> None:
    for stale in [other for other in _by_signal if other._loop is not loop]:
        stale.stop()  # left behind by a loop that is gone: signals reach only the current one
    add_handler(loop, StatsWatcher.SIGNAL, _signalled)  # raises off the main thread
    _by_signal.add(watcher)


def _unwatched(watcher: StatsWatcher) -> None:
    _by_signal.discard(watcher)
    loop = watcher._loop
    if loop is not None and not loop.is_closed() and not any(
            other._loop is loop for other in _by_signal):
        loop.remove_signal_handler(StatsWatcher.SIGNAL)  # then SIG_DFL: SIGURG is ignored


def _signalled() -> None:
    for watcher in list(_by_signal):
        watcher._changed()
