"""The child's stdout and stderr, read line by line on the event loop (no thread), and where the
lines go: the event log, or a file of their own that rotates by size under a fixed total. A
per-app limit drops (and counts) lines past a rate and caps the bytes read, so that an app
flooding its stdout cannot take the supervisor's CPU. Nothing here holds more than one line per
stream, and no write here ever raises.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from supervisor.drivers.eventlog import timestamp

# One line keeps at most this many bytes; the rest of a longer line is dropped. It matches
# eventlog.MAX_TEXT, so a captured line is never cut a second time by the event log.
LINE_LIMIT = 8192
READ_SIZE = 65536
# What close() reads from one pipe at most: the pipe's contents when the child exits, and no
# more, so that a writer that escaped the child's group cannot keep us reading.
DRAIN_LIMIT = 1 << 20

# While an app's lines are being dropped, its pipes are not read on every write but polled:
# every FLOOD_TICK, at most FLOOD_READ bytes. That caps both the wake-ups (an app writing 8 KiB
# at a time would otherwise wake the loop thousands of times a second) and the bytes copied, at
# about 1% of a core; an app writing faster waits on its full pipe, as it would with journald.
FLOOD_TICK = 0.05  # seconds
FLOOD_READ = 1 << 19  # bytes per tick: 10 MiB/s

Log = Callable[[str, dict[str, Any]], None]


class OutputLimit:
    """One app's allowance, shared by all its generations: `burst` lines at once, refilled at
    `burst` per `interval` (a token bucket, as journald's per-unit limit); lines past it are
    dropped without being decoded, and counted in one `child.output_suppressed` line when the
    flood ends, when the child's pipes close, or every `interval` while it lasts."""

    def __init__(self, burst: int, interval: float, log: Log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("a limit needs burst >= 1 and interval > 0")
        self.burst, self.interval, self.log, self.clock = burst, interval, log, clock
        self.tokens, self.stamp = float(burst), clock()
        self.dropped = 0
        self.since = 0.0  # when the lines now being counted began to be dropped
        self.total = 0  # every line ever dropped: tells whether a flood goes on

    def has_room(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst),
                          self.tokens + (now - self.stamp) * self.burst / self.interval)
        self.stamp = now
        return self.tokens >= 1

    def admit(self, pid: int) -> bool:
        """Take one line's token; False if the line is to be dropped."""
        if self.has_room():
            self.tokens -= 1
            return True
        self.drop(1, pid)
        return False

    def drop(self, count: int, pid: int) -> None:
        if count <= 0:
            return
        if not self.dropped:
            self.since = self.stamp
        self.dropped += count
        self.total += count
        if self.stamp - self.since >= self.interval:
            self.flush(pid)

    def flush(self, pid: int) -> None:
        if self.dropped:
            self.log("child.output_suppressed", {
                "pid": pid, "lines": self.dropped,
                "seconds": round(self.clock() - self.since, 1),
                "limit": f"{self.burst} lines per {self.interval:g}s"})
            self.dropped = 0
            self.since = self.clock()


class Sink(Protocol):
    """Where captured lines go. Called on the event loop; must not raise. `limit` is the app's
    output limit, shared by the pipes of each of its generations."""

    limit: OutputLimit | None

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None: ...

    def close(self) -> None: ...


class _Stream:
    __slots__ = ("fd", "name", "overlong", "partial", "reading")

    def __init__(self, name: str, fd: int) -> None:
        self.name, self.fd = name, fd
        self.partial = b""
        self.overlong = False  # the current line passed the limit: drop the rest of it
        self.reading = False


class ChildPipes:
    """The two pipes of one child: it writes, the loop reads, lines go to `sink`.

    A new child gets new pipes. Usage: `fds_for_child()` for spawn, then `started(pid)` (or
    `close()` if the spawn failed), and `close()` when the child has exited.
    """

    def __init__(self, sink: Sink, line_limit: int = LINE_LIMIT,
                 limit: OutputLimit | None = None) -> None:
        self.sink, self.line_limit, self.limit = sink, line_limit, limit
        self.pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._streams: list[_Stream] = []
        self._write_fds: list[int] = []
        try:
            for name in ("stdout", "stderr"):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                self._streams.append(_Stream(name, read_end))
                self._write_fds.append(write_end)
        except OSError:
            self.close()
            raise

    def fds_for_child(self) -> tuple[int, int]:
        """(stdout, stderr) to pass to proc.spawn; dup2 in the child clears their CLOEXEC."""
        return self._write_fds[0], self._write_fds[1]

    def after_spawn(self) -> None:
        """Close our copies of the write ends, so that EOF comes when the child's are gone."""
        while self._write_fds:
            os.close(self._write_fds.pop())

    def started(self, pid: int) -> None:
        self.pid = pid
        self.after_spawn()
        self._loop = loop = asyncio.get_running_loop()
        for stream in self._streams:
            os.set_blocking(stream.fd, False)
            loop.add_reader(stream.fd, self._on_readable, stream)
            stream.reading = True

    @property
    def closed(self) -> bool:
        return not self._write_fds and all(stream.fd < 0 for stream in self._streams)

    def close(self) -> None:
        """Read what the pipes still hold (without waiting), pass it on, close everything.

        Call it once the child has exited: proc kills what was left in its group, so what the
        group wrote is in the pipes by then. A process that escaped the group and still writes
        gets EPIPE from now on."""
        self.after_spawn()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for stream in self._streams:
            if stream.fd < 0:
                continue
            os.set_blocking(stream.fd, False)
            drained = 0
            while drained < DRAIN_LIMIT:
                chunk = self._read(stream)
                if not chunk:
                    break
                drained += len(chunk)
                self._feed(stream, chunk)
            self._close_stream(stream)
        if self.limit is not None:
            self.limit.flush(self.pid)  # what this child lost, before its child.exited

    def _on_readable(self, stream: _Stream) -> None:
        chunk = self._read(stream)
        if chunk is None:
            return
        if not chunk:
            self._close_stream(stream)  # EOF: every writer is gone
            return
        dropped = self.limit.total if self.limit is not None else 0
        self._feed(stream, chunk)
        if self.limit is not None and self.limit.total != dropped:
            self._poll_later()

    def _poll_later(self) -> None:
        """A flood: stop waking on every write; read on a timer instead (see FLOOD_TICK).
        The pipes grow to hold a tick's worth, so the app is held back only past FLOOD_READ
        (the kernel fills the pages only as they are written)."""
        assert self._loop is not None
        for stream in self._streams:
            if stream.reading:
                self._loop.remove_reader(stream.fd)
                stream.reading = False
                try:
                    fcntl.fcntl(stream.fd, fcntl.F_SETPIPE_SZ, FLOOD_READ)
                except OSError:
                    pass  # above /proc/sys/fs/pipe-max-size: the app waits a little more
        if self._resume is None:
            self._resume = self._loop.call_later(FLOOD_TICK, self._poll)

    def _poll(self) -> None:
        """Read what the pipes hold, up to FLOOD_READ; poll again while lines are still
        dropped or the pipes still full, else go back to waking on each write."""
        self._resume = None
        assert self._loop is not None and self.limit is not None
        dropped, budget = self.limit.total, FLOOD_READ
        for stream in self._streams:
            while stream.fd >= 0 and budget > 0:
                chunk = self._read(stream)
                if chunk is None:
                    break
                if not chunk:
                    self._close_stream(stream)
                    break
                budget -= len(chunk)
                self._feed(stream, chunk)
        if self.limit.total != dropped or budget <= 0:
            self._resume = self._loop.call_later(FLOOD_TICK, self._poll)
            return
        self.limit.flush(self.pid)  # the flood is over: how much it cost
        for stream in self._streams:
            if stream.fd >= 0 and not stream.reading:
                self._loop.add_reader(stream.fd, self._on_readable, stream)
                stream.reading = True

    @staticmethod
    def _read(stream: _Stream) -> bytes | None:
        """A chunk; b"" at EOF (or on an error, which ends the stream too); None for nothing yet."""
        try:
            return os.read(stream.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _close_stream(self, stream: _Stream) -> None:
        if stream.reading and self._loop is not None:
            self._loop.remove_reader(stream.fd)
            stream.reading = False
        os.close(stream.fd)
        stream.fd = -1
        if stream.partial:
            self._emit(stream, stream.partial, truncated=False)
            stream.partial = b""
        stream.overlong = False

    def _feed(self, stream: _Stream, chunk: bytes) -> None:
        limit = self.limit
        if limit is not None and not limit.has_room():
            # Over the limit: whole lines are only counted, never split or decoded.
            last = chunk.rfind(b"\n")
            if last >= 0:
                ended = chunk.count(b"\n", 0, last + 1)
                limit.drop(ended - (1 if stream.overlong else 0), self.pid)
                stream.partial, stream.overlong = b"", False
                chunk = chunk[last + 1:]
                if not chunk:
                    return
        *lines, partial = (stream.partial + chunk).split(b"\n")
        for index, line in enumerate(lines):
            if stream.overlong:  # the end of a line already passed on, capped
                stream.overlong = False
            elif limit is not None and not limit.has_room():
                limit.drop(len(lines) - index, self.pid)  # the rest, without a loop
                break
            else:
                self._emit(stream, line, truncated=False)
        if stream.overlong and not lines:
            partial = b""
        elif len(partial) > self.line_limit:
            # Passed on now rather than when its newline comes (if ever): the memory held
            # stays at one line, and a child that never ends its line is still seen.
            self._emit(stream, partial, truncated=True)
            stream.overlong, partial = True, b""
        stream.partial = partial

    def _emit(self, stream: _Stream, raw: bytes, truncated: bool) -> None:
        if self.limit is not None and not self.limit.admit(self.pid):
            return
        if len(raw) > self.line_limit:
            raw, truncated = raw[: self.line_limit], True
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self.sink(stream.name, self.pid, line, truncated)


# ---------------------------------------------------------------------------------------------
# Sinks


class EventSink:
    """Each line becomes a `child.output` line of the event log."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.limit: OutputLimit | None = None

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        facts: dict[str, Any] = {"stream": stream, "pid": pid, "line": line}
        if truncated:
            facts["truncated"] = True
        self.log("child.output", facts)

    def close(self) -> None:
        pass


class FileSink:
    """Each line becomes a JSON object in a rotating file of its own. Lines lost to a write
    error are counted and reported once, as `child.output_dropped`, when writing works again
    (or at close)."""

    def __init__(self, file: RotatingFile, log: Log) -> None:
        self.file, self.log = file, log
        self.limit: OutputLimit | None = None

    def __call__(self, stream: str, pid: int, line: str, truncated: bool) -> None:
        record: dict[str, Any] = {"ts": timestamp(), "stream": stream, "pid": pid, "line": line}
        if truncated:
            record["truncated"] = True
        text = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        if self.file.write_line(text) and self.file.dropped:
            self._report()

    def _report(self) -> None:
        count, error = self.file.take_dropped()
        self.log("child.output_dropped", {"count": count, "file": str(self.file.path),
                                          "error": error})

    def close(self) -> None:
        if self.file.dropped:
            self._report()
        self.file.close()


def open_sink(mode: str, log: Log, file: str | None = None, max_bytes: int = 1 << 20,
              keep: int = 3, burst: int = 0, interval: float = 10.0) -> Sink | None:
    """The sink for `log.child`: "events", "file" (needs `file`), or None for "inherit";
    with `burst` (lines per `interval`, `log.child_rate_limit_*`) its output limit."""
    sink: EventSink | FileSink
    if mode == "events":
        sink = EventSink(log)
    elif mode == "file":
        if file is None:
            raise ValueError("log.child = 'file' needs a file")
        sink = FileSink(RotatingFile(file, max_bytes, keep), log)
    else:
        return None
    sink.limit = OutputLimit(burst, interval, log) if burst > 0 else None
    return sink


# ---------------------------------------------------------------------------------------------
# The rotating file


class RotatingFile:
    """Appends whole lines to `path`; a line that would take it past `max_bytes` first moves it
    to `path.1` (`path.1` to `path.2`, and so on; what passes `path.KEEP` is gone). Each file
    stays within max_bytes (a single larger line gets a file to itself), so the total stays
    within (keep + 1) * max_bytes.

    Never raises: a line that cannot be written (a full disk, a missing directory) is counted
    in `dropped` and the next line tries again. A short write is undone, so the file never
    holds half a line. It also has `write` and `flush`, so an EventLog can write to it.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, keep: int) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError("max_bytes must be at least 1 and keep at least 0")
        self.path = str(path)
        self.max_bytes, self.keep = max_bytes, keep
        self.dropped = 0
        self.error: str | None = None  # the first error since the last report
        self.reopened: str | None = None  # why the file was last opened again, until taken
        self._fd = -1
        self._size = 0
        self._identity: tuple[int, int] | None = None  # (device, inode) of what we write to
        self._torn = False  # a partial line could not be cut off: start the next on its own

    def open(self) -> None:
        """Open the file now, so that a start-up check can report why it cannot be (raises
        OSError); writes open it anyway."""
        if self._fd < 0:
            self._open()

    def write_line(self, line: str) -> bool:
        """Append `line` and a newline; False if it was dropped."""
        return self._append((line + "\n").encode("utf-8", errors="replace"))

    def write(self, text: str) -> int:
        """For an EventLog's stream: `text` is whole lines."""
        self._append(text.encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass  # every write is a write(2): nothing is buffered here

    def take_dropped(self) -> tuple[int, str | None]:
        count, error = self.dropped, self.error
        self.dropped, self.error = 0, None
        return count, error

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def follow(self) -> str | None:
        """Open the path again if the file we write to was deleted or moved away (logrotate's
        `create` mode, or a person): writes must go where readers look, not to a lost inode.
        Returns why ("deleted" or "moved"), else None. Raises OSError if it cannot reopen."""
        if self._fd < 0:
            return None
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                return None
            reason = "moved"
        except FileNotFoundError:
            reason = "deleted"
        self.close()
        self._torn = False  # a half-written line stays in the file that went away
        self._open()
        self.reopened = reason
        return reason

    def _append(self, data: bytes) -> bool:
        try:
            self.follow()
            if self._fd < 0:
                self._open()
            if self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            if self._torn:
                data = b"\n" + data
            written = self._write_all(data)
            if self._torn:
                self._torn = False
                self._size = os.fstat(self._fd).st_size
            else:
                self._size += written
        except OSError as error:
            self.dropped += 1
            if self.error is None:
                self.error = error.strerror or str(error)
            return False
        return True

    def _write_all(self, data: bytes) -> int:
        """Write all of `data`, or none of it: a short write is retried, which names its cause
        (a full disk); a line left half written is cut off again."""
        written = 0
        try:
            while written < len(data):
                count = os.write(self._fd, data[written:])
                if count == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
        except OSError:
            if written:
                self._undo()
            raise
        return written

    def _open(self, truncate: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags | (os.O_TRUNC if truncate else 0), 0o640)
        info = os.fstat(self._fd)
        self._size, self._identity = info.st_size, (info.st_dev, info.st_ino)

    def _undo(self) -> None:
        """Cut a partly written line off again, so that every line in the file stays whole."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._torn = True

    def _rotate(self) -> None:
        self.close()
        try:
            if self.keep == 0:
                os.unlink(self.path)
            else:
                for number in range(self.keep - 1, 0, -1):
                    try:
                        os.replace(f"{self.path}.{number}", f"{self.path}.{number + 1}")
                    except FileNotFoundError:
                        pass
                os.replace(self.path, f"{self.path}.1")
        except FileNotFoundError:
            pass  # removed behind our back: nothing to keep
        except OSError:
            # Cannot rename (permissions on the directory): start the file over rather than
            # let it pass the cap.
            self._open(truncate=True)
            return
        self._open()
