"""What the kernel says about processes and memory, read from /proc: who a pid is (start time,
boot), who is in a process group, how much memory is left (the cgroup's limits counted).
Plain reads, no decisions; tests and benchmarks use these too: one reader of each file.
"""

from __future__ import annotations

import os

MEMINFO = "/proc/meminfo"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


def start_ticks(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of the whole line


def group_members(pgid: int, not_before: int) -> list[int]:
    """Live processes in group `pgid` started no earlier than its leader: ours by construction,
    since the kernel never reuses an id while a group or session still carries it."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields and int(fields[2]) == pgid and int(fields[19]) >= not_before and fields[0] != "Z":
            members.append(int(entry))
    return members


def available_memory(meminfo: str = MEMINFO) -> int | None:
    """What can still be used without swapping or meeting the OOM killer: the lower of the
    host's MemAvailable and what our memory cgroup and its parents still allow (in a 128 MB
    container on a big host, MemAvailable alone would promise gigabytes)."""
    from supervisor.drivers.cgroup import memory_headroom

    host = host_available_memory(meminfo)
    allowed = memory_headroom()
    if host is None or allowed is None:
        return allowed if host is None else host
    return min(host, allowed)


def host_available_memory(meminfo: str = MEMINFO) -> int | None:
    """MemAvailable in bytes: the kernel's estimate of what can be used without swapping."""
    try:
        with open(meminfo, "rb") as file:
            for line in file:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
