"""What must survive the supervisor: the last commit built successfully, the last commit whose
deploy failed, the releases that proved healthy (release mode), and the identity of the running
child. One small JSON file, replaced atomically (write, fsync, rename), so a power cut leaves
either the old or the new version, never half of one; durable writes go to the process's
writer thread when it has one, so an fsync never holds up the loop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.drivers.diskwriter import DiskWriter


@dataclass(frozen=True, slots=True)
class ChildRecord:
    """Enough to recognise our child later without trusting the pid alone."""

    pid: int
    start_ticks: int  # /proc/PID/stat field 22: start time since boot, in clock ticks
    boot_id: str
    commit: str | None = None


@dataclass(frozen=True, slots=True)
class Persisted:
    built: str | None = None
    child: ChildRecord | None = None
    failed: str | None = None  # not tried again, even after a restart, until upstream moves on
    good: tuple[str, ...] = ()  # release mode: releases that passed their health gate, oldest first
    build: ChildRecord | None = None  # a build in progress: stopped if we were killed during it
    old_child: ChildRecord | None = None  # the previous generation, during an overlap
    held: tuple[str, ...] = ()  # earlier failed commits, not tried again either


RESERVED = 8192  # bytes each copy of the state file keeps allocated (a few hundred are used)


def _write_all_at_start(fd: int, data: bytes) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)


def write_atomically(path: str, data: bytes, durable: bool = True) -> None:
    """Replace `path` in one rename, so a crash or power cut leaves the old or the new version,
    never half of one; `durable` also fsyncs (an SD card makes that cost milliseconds: only pay
    it where it matters).

    The new version is written into a spare file that already holds allocated room, and the old
    version becomes the next spare (a hard link keeps it through the rename): no step needs a
    free block, so the state still reaches the disk when the disk is full, and a supervisor
    killed then can still recognise the app it leaves. Raises OSError."""
    directory_name, name = os.path.split(path)
    spare = os.path.join(directory_name, f".{name}.spare")
    old = os.path.join(directory_name, f".{name}.old")
    fd = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        padded = data + b" " * (RESERVED - len(data))  # JSON readers skip the blanks
        _write_all_at_start(fd, padded)
        if os.fstat(fd).st_size > len(padded):
            os.ftruncate(fd, len(padded))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.unlink(old)
    except FileNotFoundError:
        pass
    try:
        os.link(path, old)
    except FileNotFoundError:
        pass  # the first save
    os.replace(spare, path)
    try:
        os.replace(old, spare)
    except FileNotFoundError:
        pass
    if not durable:
        return
    directory = os.open(directory_name or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def reserve(path: str) -> None:
    """Make sure the spare copy exists with its room allocated, while the disk has room: the
    first save after start-up then needs none either. Raises OSError."""
    directory_name, name = os.path.split(path)
    spare = os.path.join(directory_name, f".{name}.spare")
    if os.path.exists(spare) and os.path.getsize(spare) >= RESERVED:
        return
    fd = os.open(spare, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _write_all_at_start(fd, b" " * RESERVED)
    finally:
        os.close(fd)


def _child_record(data: object) -> ChildRecord | None:
    """Only a record with every field of the right type is trusted to name our child."""
    if not isinstance(data, dict):
        return None
    pid, ticks, boot, commit = (data.get(k) for k in ("pid", "start_ticks", "boot_id", "commit"))
    if (type(pid) is not int or type(ticks) is not int or pid <= 1 or not isinstance(boot, str)
            or not (commit is None or isinstance(commit, str))):
        return None
    return ChildRecord(pid, ticks, boot, commit)


DURABLE = frozenset({"built", "failed", "good", "held"})  # the fields worth an fsync


class StateStore:
    """The state of one app. `current` changes at once; the file follows, inline, or through
    `writer` (installed by the Host) where an fsync is needed or the writer is busy with this
    file. Either way one file's writes never overlap (they share the spare copy) and land in
    order, so the file always ends with the latest state; several pending saves are written
    once, fsync'd if any of them asked for it."""

    def __init__(self, directory: str | os.PathLike[str],
                 report: Callable[[str, dict[str, object]], None] | None = None) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, "state.json")
        self.current = Persisted()
        self.report = report  # told when the file cannot be written (a full disk)
        self.failing: str | None = None
        self.writer: DiskWriter | None = None
        # With a writer, under its lock: a job for this file is queued / being written, and
        # whether what is pending must be fsync'd.
        self._queued = False
        self._writing = False
        self._again = False  # saved while being written: write again right after
        self._durable = False

    def load(self) -> Persisted:
        """A missing or damaged file means nothing is known, which is always safe."""
        try:
            with open(self.path, "rb") as file:
                data = json.loads(file.read(1 << 20))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            data = {}
        built, failed, good = data.get("built"), data.get("failed"), data.get("good")
        held = data.get("held")
        if not isinstance(good, list):
            good = []
        if not isinstance(held, list):
            held = []
        self.current = Persisted(built=built if isinstance(built, str) else None,
                                 child=_child_record(data.get("child")),
                                 failed=failed if isinstance(failed, str) else None,
                                 good=tuple(c for c in good if isinstance(c, str)),
                                 build=_child_record(data.get("build")),
                                 old_child=_child_record(data.get("old_child")),
                                 held=tuple(c for c in held if isinstance(c, str)))
        return self.current

    def save(self, **changes: object) -> None:
        """Only `built`, `failed`, `good` and `held` are written durably. The child's record
        needs no fsync: after a power cut that child is gone and the boot id tells, and a record
        naming a dead process is harmless, since its start time is checked. So it is written at
        once, inline (a write and a rename, no fsync), unless the writer is writing this very
        file: the thread then writes it right after, ahead of other apps' files. That keeps the
        window in which a `kill -9` of the supervisor loses a just-started child as short as a
        write to the page cache, or the rest of this app's own write in progress."""
        durable = bool(DURABLE & set(changes))
        self.current = replace(self.current, **changes)  # type: ignore[arg-type]
        writer = self.writer
        if writer is None:
            error = self._write(self.current, durable)
            before, self.failing = self.failing, error
            self._tell(before, error)
            return
        with writer.lock:
            if self._writing:
                # Written as soon as the thread is done with this file, ahead of other files.
                self._again = True
                self._durable = self._durable or durable
                return
            if durable:
                self._durable = True
                if not self._queued:  # else that job writes the latest state, this one included
                    self._queued = True
                    writer.submit(self._write_pending)
                return
            # A job still queued for this file writes the latest state again when it runs.
            error = self._write(self.current, False)
            before, self.failing = self.failing, error
        self._tell(before, error)

    def _write_pending(self) -> None:
        """On the writer thread: the latest state, fsync'd if any save it covers asked for it.
        Saves made meanwhile are written right after, without fsync (a child's record must not
        wait behind other apps' fsyncs); an fsync they need is queued behind the others."""
        writer = self.writer
        assert writer is not None
        with writer.lock:
            self._queued, self._writing = False, True
            durable, self._durable = self._durable, False
            state = self.current
        while True:
            error = self._write(state, durable)
            with writer.lock:
                before, self.failing = self.failing, error
                again, self._again = self._again, False
                if not again:
                    self._writing = False
                    if self._durable and not self._queued:
                        self._queued = True
                        writer.submit(self._write_pending)
                state, durable = self.current, False
            if error != before:
                writer.on_loop(self._tell, before, error)
            if not again:
                return

    def _write(self, state: Persisted, durable: bool) -> str | None:
        """The reason it could not be written, else None."""
        payload = {"built": state.built, "failed": state.failed,
                   "good": list(state.good), "held": list(state.held),
                   "child": asdict(state.child) if state.child else None,
                   "build": asdict(state.build) if state.build else None,
                   "old_child": asdict(state.old_child) if state.old_child else None}
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_atomically(self.path, json.dumps(payload).encode() + b"\n", durable=durable)
            reserve(self.path)  # after the first save there is no old copy to be the spare
        except OSError as error:
            # The supervisor's job comes first: it goes on with what it knows in memory, and
            # the next save writes everything again.
            return error.strerror or str(error)
        return None

    def _tell(self, before: str | None, error: str | None) -> None:
        """On the loop: a new failure is reported, and the first success after one."""
        if self.report is None:
            return
        if error is not None and error != before:
            self.report("state.save_failed", {"path": self.path, "error": error})
        elif error is None and before is not None:
            self.report("state.saved_again", {"path": self.path})
