"""What must survive the supervisor: the last commit built successfully, the last commit whose
deploy failed, the releases that proved healthy (release mode), and the identity of the running
child. One small JSON file, replaced atomically
(write, fsync, rename), so a power cut leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace


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


class StateStore:
    def __init__(self, directory: str | os.PathLike[str],
                 report: Callable[[str, dict[str, object]], None] | None = None) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, "state.json")
        self.current = Persisted()
        self.report = report  # told when the file cannot be written (a full disk)
        self.failing: str | None = None

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
        """Only `built`, `failed` and `good` are written durably. The child's record needs no fsync:
        after a power cut that child is gone and the boot id tells, and a record naming a dead
        process is harmless, since its start time is checked. That keeps fsync off the path
        between a crash and the restart."""
        durable = bool({"built", "failed", "good", "held"} & set(changes))
        self.current = replace(self.current, **changes)  # type: ignore[arg-type]
        payload = {"built": self.current.built, "failed": self.current.failed,
                   "good": list(self.current.good), "held": list(self.current.held),
                   "child": asdict(self.current.child) if self.current.child else None,
                   "build": asdict(self.current.build) if self.current.build else None,
                   "old_child": asdict(self.current.old_child)
                   if self.current.old_child else None}
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_atomically(self.path, json.dumps(payload).encode() + b"\n", durable=durable)
            reserve(self.path)  # after the first save there is no old copy to be the spare
        except OSError as error:
            # The supervisor's job comes first: it goes on with what it knows in memory, and
            # the next save writes everything again.
            reason = error.strerror or str(error)
            if reason != self.failing and self.report is not None:
                self.report("state.save_failed", {"path": self.path, "error": reason})
            self.failing = reason
            return
        if self.failing is not None and self.report is not None:
            self.report("state.saved_again", {"path": self.path})
        self.failing = None
