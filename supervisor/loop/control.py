"""How the shell talks to a running supervisor, through its state directory only (no listener):
a flock on that directory (and one in the repository) with a record naming the holder, a
control directory of one-word requests signalled through a pidfd only to a proven holder, and
a status file replaced atomically on every change. Nothing here signals an unproven pid.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.display import duration, short_commit
from supervisor.drivers.procfs import boot_id, start_ticks

REQUESTS = ("deploy", "restart", "stop-child", "start-child", "rollback", "reload")
LOCK_NAME = "supervisor.lock"  # names the holder: "PID START_TICKS BOOT_ID"
REPO_LOCK_NAME = "tiny-supervisor.lock"  # in the repository's git directory
STATUS_NAME = "status.json"
CONTROL_DIR = "control"
# Nobody else may list, create, rename or delete in the state directory; traversal (x) stays,
# so a web server may still reach files it is told about (a release's static files).
OTHERS_RW = 0o066


class LockHeld(Exception):
    """Another supervisor runs this app (or on this repository); `pid` is its pid when known."""

    def __init__(self, pid: int | None, repository: str | None = None) -> None:
        super().__init__(pid)
        self.pid, self.repository = pid, repository


class NotRunning(LookupError):
    """No supervisor holds the lock of this state directory."""


class Unproven(LookupError):
    """A supervisor holds the lock, but no live pid is provably it: nothing is signalled."""


@dataclass
class Lock:
    """What a running supervisor holds for its life: the state directory's flock (and the
    repository's); `notes` are log lines about what acquiring it had to change."""

    fds: list[int]
    notes: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def acquire_lock(state_dir: str, repository: str | None = None) -> Lock:
    """Take the app's lock, and the repository's, for the life of this process; LockHeld if
    either is taken, OSError if the state directory cannot be made ours.

    The flock is on the state directory itself, not on a file in it: a lock file can be
    deleted, and a second supervisor would lock a new one; a directory that holds our files
    cannot be removed, whatever path reaches it is one inode, and whoever renames it away still
    meets the repository's lock. Others may neither read nor write it, so they cannot open it
    to take the lock first. The kernel drops the lock when we die, however we die; the fds are
    close-on-exec."""
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock = Lock([fd])
    try:
        _make_ours(fd, state_dir, lambda event, facts: lock.notes.append((event, facts)))
        _flock_or_raise(fd, state_dir)
        if repository is not None:
            _lock_repository(lock, repository)
        _write_holder(state_dir)
        make_control_dir(state_dir)
    except BaseException:
        lock.release()
        raise
    return lock


PROBE_RETRIES = 5  # 10 ms apart: `supervisor status` probing holds its shared lock for microseconds


def _flock_or_raise(fd: int, state_dir: str) -> None:
    for attempt in range(PROBE_RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pid = running_pid(state_dir)
            if pid is not None or attempt == PROBE_RETRIES - 1:
                raise LockHeld(pid) from None
        time.sleep(0.01)  # a probe, not a supervisor: it lets go at once


def _make_ours(fd: int, path: str,
               report: Callable[[str, dict[str, object]], None]) -> None:
    """The directory must belong to our user and be closed to others: anyone who can write it
    can swap our files, and anyone who can read it can flock it first."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"{path} belongs to uid {info.st_uid}, not to this "
                              f"supervisor's uid {os.geteuid()}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & OTHERS_RW:
        os.fchmod(fd, mode & ~OTHERS_RW)
        report("state.dir_secured", {"path": path, "mode_was": f"{mode:04o}",
                                     "mode": f"{mode & ~OTHERS_RW:04o}"})


def git_directory(repository: str) -> str | None:
    """The git directory a working tree's repository shares with its linked worktrees (where
    refs and objects live), read from the files git itself reads; None if it is not one."""
    dot_git = os.path.join(repository, ".git")
    if os.path.isdir(dot_git):
        directory = dot_git
    else:
        try:
            with open(dot_git, "rb") as file:
                text = file.read(4096).decode("utf-8", "replace").strip()
        except OSError:
            return None
        if not text.startswith("gitdir:"):
            return None
        directory = os.path.join(repository, text.removeprefix("gitdir:").strip())
    try:
        with open(os.path.join(directory, "commondir"), "rb") as file:
            directory = os.path.join(directory, file.read(4096).decode().strip())
    except (OSError, UnicodeDecodeError):
        pass
    return os.path.realpath(directory)


def _lock_repository(lock: Lock, repository: str) -> None:
    """One supervisor per repository, whatever configs name it: two would race on git's ref
    locks and never converge. A file inside the git directory, readable by its owner alone
    (git's directory is often world-readable, so the directory itself could be flocked by
    anyone); git never flocks."""
    directory = git_directory(repository)
    if directory is None:
        return  # not a repository: the git driver says so in its own words
    path = os.path.join(directory, REPO_LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return  # a git directory we cannot write: no fetch will work either, and git says why
    lock.fds.append(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockHeld(_holder_from_kernel(os.fstat(fd)), repository) from None
    try:  # who holds it, for people looking; the flock is what counts
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass


def _write_holder(state_dir: str) -> None:
    """Who holds the lock, written after taking it and replaced in one rename: a reader sees
    a whole record or none. Start time and boot let a reader prove the pid is still us."""
    pid = os.getpid()
    record = f"{pid} {start_ticks(pid)} {boot_id()}\n"
    path = os.path.join(state_dir, LOCK_NAME)
    temporary = f"{path}.{pid}.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644),
              "w") as file:
        file.write(record)
    os.replace(temporary, path)


def _read_holder(state_dir: str) -> tuple[int, int, str] | None:
    try:
        with open(os.path.join(state_dir, LOCK_NAME), "rb") as file:
            parts = file.read(256).decode("ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1]), parts[2]


def _flock_holders(info: os.stat_result) -> list[int] | None:
    """The pids /proc/locks names as holding the exclusive flock on this inode (0 for one in
    another pid namespace; a shared one is a probe): the kernel's own word, read without taking
    any lock. None if unreadable."""
    needle = _lock_needle(info)
    try:
        with open("/proc/locks") as file:
            return [int(fields[4]) for fields in map(str.split, file)
                    if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE"
                    and fields[5] == needle and fields[4].isdigit()]
    except OSError:
        return None


def _holder_from_kernel(info: os.stat_result) -> int | None:
    return next(iter(_flock_holders(info) or []), None)


def _lock_state(state_dir: str) -> tuple[bool | None, os.stat_result | None]:
    """(held?, the directory's stat); held is None when we cannot tell.

    /proc/locks first: a probe with a flock of our own, however short, could make a supervisor
    starting at that moment believe another one runs (see acquire_lock)."""
    try:
        info = os.stat(state_dir)
    except FileNotFoundError:
        return False, None
    except OSError:
        return None, None
    if _flock_holders(info):
        return True, info
    # None named (or /proc/locks is unreadable, or names another device, as on btrfs): probe.
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None, info
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True, info
    finally:
        os.close(fd)  # also releases the probe's own lock
    return False, info


def _lock_needle(info: os.stat_result) -> str:
    return f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"


def _holds(pid: int, info: os.stat_result) -> bool | None:
    """Whether `pid` has an fd open right now that carries the exclusive flock on this inode,
    from its fdinfo; None when we may not look (another user's process)."""
    needle = f" {_lock_needle(info)} "
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except FileNotFoundError:
        return False
    except OSError:
        return None
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as file:
                text = file.read(65536)
        except OSError:
            continue
        if any(line.startswith("lock:") and " FLOCK " in line and " WRITE " in line
               and needle in line for line in text.splitlines()):
            return True
    return False


def _is_holder(pid: int, state_dir: str, info: os.stat_result | None) -> bool:
    """Proof that `pid` is the supervisor holding the lock: its own open fds carry the lock
    (the kernel's word, now, not a remembered pid), or, where we may not look, the record
    names it with its start time and boot, as for the app."""
    if info is not None:
        holds = _holds(pid, info)
        if holds is not None:
            return holds
    record = _read_holder(state_dir)
    return (record is not None and record[0] == pid and record[2] == boot_id()
            and start_ticks(pid) == record[1])


def running_pid(state_dir: str) -> int | None:
    """The pid of the supervisor holding the app's lock, or None if none runs; 0 when one
    runs but its pid cannot be told (its record is gone and /proc/locks does not name it)."""
    held, info = _lock_state(state_dir)
    if held is False:
        return None
    record = _read_holder(state_dir)
    candidates = [record[0]] if record else []
    if info is not None and (kernel := _holder_from_kernel(info)) is not None:
        candidates.insert(0, kernel)
    for pid in candidates:
        if _is_holder(pid, state_dir, info):
            return pid
    return None if held is None else 0


def _claim(state_dir: str) -> tuple[int, int]:
    """(pid, pidfd) of the running supervisor, proven with the pidfd held: from then on the pid
    cannot be reused. NotRunning or Unproven otherwise."""
    pid = running_pid(state_dir)
    if pid is None:
        raise NotRunning(f"no supervisor is running for this app (state dir {state_dir})")
    if pid > 0:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            _, info = _lock_state(state_dir)
            if _is_holder(pid, state_dir, info):
                return pid, pidfd
            os.close(pidfd)
    raise Unproven(f"a supervisor holds the lock of {state_dir}, but no live pid is provably it; "
                   "nothing was signalled")


def send_request(state_dir: str, request: str) -> int:
    """Leave a request for the running supervisor and signal it; returns its pid.

    Raises NotRunning or Unproven (both LookupError) when no supervisor provably runs for
    this state directory: a pid alone is never signalled, it may have been reused."""
    return _send(state_dir, request)[0]


ANSWER_PREFIX = ".answer-"  # beside the request it answers; "." files are never requests


def ask(state_dir: str, request: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    """Send a request and wait, `timeout` seconds at most, for the supervisor's answer:
    {"ok": true, "phase": ...} or {"ok": false, "reason": ...}; None if none came in time."""
    pid, name = _send(state_dir, request)
    path = os.path.join(state_dir, CONTROL_DIR, ANSWER_PREFIX + name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as file:
                answer = json.loads(file.read(65536))
            os.unlink(path)
            return pid, answer if isinstance(answer, dict) else None
        except FileNotFoundError:
            time.sleep(0.02)
        except (OSError, ValueError):
            return pid, None
    return pid, None


def answer(state_dir: str, name: str, facts: dict[str, Any]) -> None:
    """The supervisor's answer to the request file `name`, for the command that waits on it."""
    path = os.path.join(state_dir, CONTROL_DIR, ANSWER_PREFIX + name)
    temporary = path + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    with open(os.open(temporary, flags, 0o600), "w") as file:
        json.dump(facts, file, default=str)
    os.replace(temporary, path)


def _send(state_dir: str, request: str) -> tuple[int, str]:
    if request not in REQUESTS:
        raise ValueError(request)
    pid, pidfd = _claim(state_dir)
    try:
        # The supervisor makes this directory at start-up, owned by its user: a request from
        # root then leaves a file the supervisor may still remove (removal needs the
        # directory's rights).
        directory = os.path.join(state_dir, CONTROL_DIR)
        name = f"{time.time_ns():020d}-{os.getpid()}-{request}"
        temporary = os.path.join(directory, "." + name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        with open(os.open(temporary, flags, 0o600), "w") as file:
            file.write(request + "\n")
        os.replace(temporary, os.path.join(directory, name))
        signal.pidfd_send_signal(pidfd, signal.SIGUSR2)
    finally:
        os.close(pidfd)
    return pid, name


def make_control_dir(state_dir: str) -> None:
    """Ours alone: whoever may create files in it can ask for deploys and stops."""
    path = os.path.join(state_dir, CONTROL_DIR)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"{path} belongs to uid {info.st_uid}, not to "
                                  f"this supervisor's uid {os.geteuid()}; remove it")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def take_requests(state_dir: str) -> list[str]:
    """Requests waiting in the control directory, oldest first; each is taken once.

    Only the known words count: whatever else is there is removed and ignored."""
    return [request for _, request in take_named_requests(state_dir)]


def take_named_requests(state_dir: str) -> list[tuple[str, str]]:
    """As take_requests, each with the name of its file, which its answer is named after."""
    directory = os.path.join(state_dir, CONTROL_DIR)
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []
    requests = []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # taken already
        parts = name.split("-", 2)  # TIME-PID-REQUEST, and a request may hold a "-"
        request = parts[2] if len(parts) == 3 else ""
        if request in REQUESTS:
            requests.append((name, request))
    return requests


def write_status(state_dir: str, status: dict[str, Any]) -> None:
    """Replace the status file in one rename. No fsync: it is rewritten on every change and
    only describes the present, so it should not wear out an SD card."""
    path = os.path.join(state_dir, STATUS_NAME)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(status, file, default=str)
    os.replace(temporary, path)


def read_status(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state_dir, STATUS_NAME), "rb") as file:
            data = json.loads(file.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _seconds_since(stamp: object, now: float) -> float:
    """Seconds from an RFC 3339 UTC stamp of the event log to `now`."""
    import calendar

    try:
        whole, _, fraction = str(stamp).rstrip("Z").partition(".")
        then = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        return max(0.0, now - then - float("0." + (fraction or "0")))
    except ValueError:
        return 0.0


def refresh(status: dict[str, Any], running: bool, now: float | None = None) -> dict[str, Any]:
    """Bring the durations up to the moment of reading: the file is written on changes only."""
    now = time.time() if now is None else now
    status["running"] = running
    if not running:
        for key in ("pid", "child", "target", "waiting", "next_fetch", "backoff_until"):
            status[key] = None
        return status
    if status.get("child"):
        status["child"]["uptime"] = round(_seconds_since(status["child"].get("since"), now), 1)
    if status.get("waiting"):
        status["waiting"]["seconds"] = round(_seconds_since(status["waiting"].get("since"), now),
                                             1)
    return status


def describe_status(status: dict[str, Any]) -> str:
    """The status file for people, one fact per line."""
    running = status.get("running", True)
    lines = [_headline(status, running), _app_line(status, running), _tree_line(status)]
    lines += _deploy_lines(status) + _trouble_lines(status, running)
    return "\n".join(lines)


def _headline(status: dict[str, Any], running: bool) -> str:
    """A supervisor that is gone has no pid worth naming: it may belong to anything by now."""
    if not running:
        return f"{status.get('app')}: not running (last: {status.get('phase')})"
    return f"{status.get('app')}: {status.get('phase')}, supervisor pid {status.get('pid')}"


def _app_line(status: dict[str, Any], running: bool) -> str:
    child = status.get("child")
    if not (child and running):
        return "app:       not running"
    return (f"app:       pid {child.get('pid')}, {short_commit(child.get('commit'))}, "
            f"up {duration(float(child.get('uptime') or 0))} (since {child.get('since')})")


def _tree_line(status: dict[str, Any]) -> str:
    good = status.get("good")
    if good is None:
        return (f"tree:      {short_commit(status.get('head'))}, "
                f"built {short_commit(status.get('built'))}")
    # release mode: `head` is the release `current` points to
    return (f"release:   {short_commit(status.get('head'))} live; good: "
            + (", ".join(short_commit(c) for c in reversed(good)) or "none yet"))


def _deploy_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    if status.get("target"):
        lines.append(f"deploying: {short_commit(status.get('target'))}")
    waiting = status.get("waiting")
    if waiting:
        lines.append(f"waiting:   {waiting.get('reason')} for "
                     f"{duration(waiting.get('seconds') or 0)}")
    if status.get("pending"):
        lines.append(f"next:      {short_commit(status.get('pending'))} (after this deploy)")
    deploy = status.get("last_deploy")
    if deploy:
        why = f": {deploy.get('reason')}" if deploy.get("reason") else ""
        lines.append(f"deployed:  {short_commit(deploy.get('commit'))} {deploy.get('result')} "
                     f"at {deploy.get('at')}{why}")
    return lines


def _trouble_lines(status: dict[str, Any], running: bool) -> list[str]:
    lines = []
    if status.get("failed"):
        lines.append(f"held back: {short_commit(status.get('failed'))} (failed; waits for a "
                     "newer commit)")
    if status.get("next_fetch") and running:
        lines.append(f"fetch:     next at {status.get('next_fetch')}")
    if status.get("crashes"):
        until = status.get("backoff_until")
        lines.append(f"crashes:   {status.get('crashes')} in a row"
                     + (f", next start at {until}" if until else ""))
    error = status.get("last_error")
    if error:
        lines.append(f"error:     {error.get('event')}: {error.get('message')} "
                     f"at {error.get('at')}")
    return lines
