"""Memory cgroups, read and (where we may) made: how much the supervisor's own cgroup still
allows, and a capped cgroup of its own for a build (create, list, kill, remove). Reads and
writes under the cgroup mount only; never moves a process it did not start; decides nothing.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

SELF_CGROUP = "/proc/self/cgroup"
MOUNTINFO = "/proc/self/mountinfo"
BUILD_PREFIX = "supervisor-build."  # + our pid: a killed supervisor's are recognised by it
LEAF = "supervisor"  # cgroup v2: where the supervisor and its app live once it makes siblings
UNLIMITED = 1 << 62  # v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True, slots=True)
class Hierarchy:
    version: int  # 1 or 2
    mount: str  # where the hierarchy is mounted
    path: str  # our cgroup's directory under the mount


def memory_hierarchy(self_cgroup: str = SELF_CGROUP,
                     mountinfo: str = MOUNTINFO) -> Hierarchy | None:
    """The hierarchy holding our memory controller: v1's memory one, else v2's unified one
    (only if it has the memory controller)."""
    try:
        with open(self_cgroup) as file:
            lines = file.read().splitlines()
        with open(mountinfo) as file:
            mounts = file.read().splitlines()
    except OSError:
        return None
    own = {}
    for line in lines:
        number, controllers, path = line.split(":", 2)
        own["" if number == "0" else controllers] = path
    for mount in mounts:
        hierarchy = _mounted_hierarchy(mount, own)
        if hierarchy is not None:
            return hierarchy
    return None


def _mounted_hierarchy(mount: str, own: dict[str, str]) -> Hierarchy | None:
    """The hierarchy of one mountinfo line, if it holds our memory controller and our
    cgroup's directory is there; `own` maps controllers ("" for v2) to our cgroup's path."""
    fields = mount.split(" ")
    try:
        separator = fields.index("-")
    except ValueError:
        return None
    root, point = fields[3], _unescape(fields[4])
    fstype, options = fields[separator + 1], fields[separator + 3].split(",")
    found = _our_cgroup(fstype, options, own)
    if found is None:
        return None
    version, path = found
    inside = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    directory = os.path.normpath(os.path.join(point, inside))
    if version == 2 and "memory" not in _read(os.path.join(point, "cgroup.controllers")):
        return None
    if os.path.isdir(directory):
        return Hierarchy(version, point, directory)
    return None


def _our_cgroup(fstype: str, options: list[str], own: dict[str, str]
                ) -> tuple[int, str] | None:
    """The version of a cgroup mount and our cgroup's path in it, if it has our memory
    controller."""
    if fstype == "cgroup" and "memory" in options:
        controllers = next((c for c in own if "memory" in c.split(",")), None)
        path = own.get(controllers) if controllers else None
        return None if path is None else (1, path)
    if fstype == "cgroup2" and "" in own:
        return 2, own[""]
    return None


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def _number(path: str) -> int | None:
    text = _read(path).strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(directory: str, key: str) -> int:
    for line in _read(os.path.join(directory, "memory.stat")).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def headroom(directory: str, version: int) -> int | None:
    """What one cgroup still allows: its limit less what it uses, page cache that it could
    drop not counted as used (as MemAvailable does not count it either). None: no limit."""
    if version == 1:
        limit = _number(os.path.join(directory, "memory.limit_in_bytes"))
        usage = _number(os.path.join(directory, "memory.usage_in_bytes"))
        inactive = _stat(directory, "total_inactive_file")
        if limit is not None and limit >= UNLIMITED:
            limit = None
    else:
        limit = _number(os.path.join(directory, "memory.max"))
        usage = _number(os.path.join(directory, "memory.current"))
        inactive = _stat(directory, "inactive_file")
    if limit is None or usage is None:
        return None
    return max(0, limit - max(0, usage - inactive))


def memory_headroom(hierarchy: Hierarchy | None = None) -> int | None:
    """The least any cgroup from ours up to the mount still allows; None if none is limited."""
    hierarchy = hierarchy or memory_hierarchy()
    if hierarchy is None:
        return None
    least = None
    directory = hierarchy.path
    while True:
        room = headroom(directory, hierarchy.version)
        if room is not None and (least is None or room < least):
            least = room
        if os.path.normpath(directory) == os.path.normpath(hierarchy.mount):
            return least
        parent = os.path.dirname(directory)
        if parent == directory:
            return least
        directory = parent


def oom_kills(directory: str, version: int) -> int:
    """How many processes the OOM killer has killed for this cgroup's limit."""
    name = "memory.oom_control" if version == 1 else "memory.events"
    for line in _read(os.path.join(directory, name)).splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def oom_kills_above(hierarchy: Hierarchy) -> int:
    """The OOM kills of our cgroup and each one above it, added up."""
    total, directory = 0, hierarchy.path
    while True:
        total += oom_kills(directory, hierarchy.version)
        parent = os.path.dirname(directory)
        if os.path.normpath(directory) == os.path.normpath(hierarchy.mount) or parent == directory:
            return total
        directory = parent


class CgroupError(Exception):
    """A cgroup could not be made or set up; the message says which step and why."""


class BuildCgroup:
    """One build's cgroup, capped at `memory_max` bytes: its processes join it from a shell
    line before the build's command runs (so every child is inside), and everything in it is
    killed when the build ends."""

    def __init__(self, hierarchy: Hierarchy, memory_max: int) -> None:
        self.hierarchy = hierarchy
        self.path = os.path.join(hierarchy.path, f"{BUILD_PREFIX}{os.getpid()}")
        self.removed_with: int | None = None  # its OOM kill count, read before it went
        _remove_leftovers(hierarchy.path)
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            pass
        except OSError as error:
            raise CgroupError(f"cannot create {self.path}: {error.strerror}") from None
        try:
            if hierarchy.version == 1:
                self._write("memory.limit_in_bytes", str(memory_max))
            else:
                self._write("memory.max", str(memory_max))
                self._write("memory.swap.max", "0", optional=True)
                self._write("memory.oom.group", "1", optional=True)  # no half-killed build
        except CgroupError:
            self.remove()
            raise
        self.oom_kills_before = self.oom_kills()

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as file:
                file.write(value)
        except OSError as error:
            if not optional:
                raise CgroupError(f"cannot set {name} in {self.path}: "
                                  f"{error.strerror}") from None

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def oom_kills(self) -> int:
        if self.removed_with is not None:
            return self.removed_with
        return oom_kills(self.path, self.hierarchy.version)

    def out_of_memory(self) -> bool:
        return self.oom_kills() > self.oom_kills_before

    def members(self) -> list[int]:
        return [int(pid) for pid in _read(self.procs).split()]

    def kill(self) -> list[int]:
        """SIGKILL to everything in the cgroup (it is ours: we made it and put the build in
        it); the pids killed, once. Bounded: a fork bomb cannot keep us here."""
        killed: list[int] = []
        for _ in range(20):
            members = self.members()
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    continue
                if pid not in killed:
                    killed.append(pid)
        return killed

    def remove(self) -> bool:
        kills = self.oom_kills()
        try:
            os.rmdir(self.path)
            self.removed_with = kills
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _remove_leftovers(directory: str) -> None:
    """Empty build cgroups a killed supervisor left behind (a live build's stays)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(BUILD_PREFIX) and name != f"{BUILD_PREFIX}{os.getpid()}":
            try:
                os.rmdir(os.path.join(directory, name))
            except OSError:
                pass


def prepare_v2_siblings(hierarchy: Hierarchy) -> Hierarchy:
    """cgroup v2 lets a cgroup give its children the memory controller only while it holds no
    process itself: move the supervisor (before it starts any app) into a leaf of its own
    cgroup, then enable the controller. Returns the hierarchy the build cgroups go under."""
    if hierarchy.version != 2:
        return hierarchy
    leaf = os.path.join(hierarchy.path, LEAF)
    parent = hierarchy.path
    if os.path.basename(parent) == LEAF:  # already moved (a reload, a second builder)
        parent = os.path.dirname(parent)
    else:
        try:
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as file:
                file.write(str(os.getpid()))
        except OSError as error:
            raise CgroupError(f"cannot move the supervisor into {leaf}: "
                              f"{error.strerror}") from None
    try:
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as file:
            file.write("+memory")
    except OSError as error:
        raise CgroupError(f"cannot enable the memory controller in {parent}: "
                          f"{error.strerror}") from None
    return Hierarchy(2, hierarchy.mount, parent)


def join_command(procs: str | None, oom_score_adj: int | None,
                 command: tuple[str, ...]) -> tuple[str, ...]:
    """The command behind a shell line that joins the cgroup (its `cgroup.procs`) and sets
    the OOM score before exec: set first, so every process the command forks inherits them."""
    if procs is None and oom_score_adj is None:
        return command
    steps = []
    if oom_score_adj is not None:
        # Raising needs no privilege; lowering may be refused: the command runs regardless.
        steps.append(f"{{ echo {int(oom_score_adj)} > /proc/self/oom_score_adj; }} 2>/dev/null")
    if procs is not None:
        steps.append('{ echo $$ > "$0"; } || { echo "cannot join the cgroup $0" >&2; exit 126; }')
    script = "; ".join(steps) + '; exec "$@"'
    return ("/bin/sh", "-c", script, procs or "sh", *command)
