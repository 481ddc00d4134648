"""The state directory belongs to the supervisor alone (issue 12, section 6): a lock nobody else
can take or delete away, one supervisor per app and per repository whatever the paths, no signal
to an unproven pid, and a read-only directory refused in one line. Real processes, a real
second user, a real read-only mount."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys

import pytest

from supervisor.loop import control

HOLD_LOCK = """
import sys, time
from supervisor.loop import control
control.acquire_lock(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
print("locked", flush=True)
time.sleep(60)
"""

# Takes the lock, then hands it to a child of its own and exits: the lock lives on in a process
# whose pid no record and no /proc/locks line names.
HAND_OVER = """
import os, sys, time
from supervisor.loop import control
control.acquire_lock(sys.argv[1])
if os.fork() == 0:
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
os._exit(0)
"""

OTHER_USER = "sv-hardening-other"


def hold(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, *args], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline() == "locked\n"
    return process


@pytest.fixture
def holders():
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        started.append(hold(*args))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


def make_repository(path) -> str:
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    return str(path)


def test_deleting_the_lock_file_lets_no_second_supervisor_in(tmp_path, holders):
    holder = holders(str(tmp_path))
    os.unlink(tmp_path / control.LOCK_NAME)
    with pytest.raises(control.LockHeld) as held:
        control.acquire_lock(str(tmp_path))
    assert held.value.pid == holder.pid  # named by the kernel, the record being gone
    assert control.running_pid(str(tmp_path)) == holder.pid


def test_a_state_dir_reached_through_a_symlink_is_the_same_lock(tmp_path, holders):
    real = tmp_path / "state"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    holder = holders(str(real))
    with pytest.raises(control.LockHeld) as held:
        control.acquire_lock(str(tmp_path / "alias"))
    assert held.value.pid == holder.pid


def test_two_state_dirs_on_one_repository_admit_one_supervisor(tmp_path, holders):
    repository = make_repository(tmp_path / "repo")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "repo-alias").symlink_to(tmp_path / "repo")
    holder = holders(str(tmp_path / "a"), repository)
    with pytest.raises(control.LockHeld) as held:
        control.acquire_lock(str(tmp_path / "b"), str(tmp_path / "repo-alias"))
    assert held.value.repository == str(tmp_path / "repo-alias")
    assert held.value.pid == holder.pid
    # A linked worktree shares the repository's refs: it is the same repository.
    subprocess.run(["git", "-C", repository, "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    subprocess.run(["git", "-C", repository, "worktree", "add", "-q", "--detach",
                    str(tmp_path / "linked")], check=True)
    with pytest.raises(control.LockHeld):
        control.acquire_lock(str(tmp_path / "b"), str(tmp_path / "linked"))
    # The failed attempts left b free.
    assert control.running_pid(str(tmp_path / "b")) is None


def test_no_signal_reaches_a_pid_that_is_not_provably_the_supervisor(tmp_path):
    handing = subprocess.Popen([sys.executable, "-c", HAND_OVER, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    assert handing.stdout is not None
    keeper = int(handing.stdout.readline())
    assert handing.wait(timeout=30) == 0
    handing.stdout.close()
    # An unrelated process, standing for one that reused the pid the record names.
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / control.LOCK_NAME).write_text(f"{unrelated.pid} 1 whatever-boot\n")
        control.make_control_dir(str(tmp_path))
        with pytest.raises(control.Unproven):
            control.send_request(str(tmp_path), "deploy")
        assert unrelated.poll() is None  # SIGUSR2 would have ended it
        assert os.listdir(tmp_path / "control") == []
    finally:
        unrelated.kill()
        unrelated.wait()
        os.kill(keeper, signal.SIGKILL)


def test_the_state_and_control_dirs_are_closed_to_others(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    (state / "control").mkdir()
    os.chmod(state / "control", 0o777)
    lock = control.acquire_lock(str(state))
    try:
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(state / "control").st_mode) == 0o700
        assert ("state.dir_secured", {"path": str(state), "mode_was": "0777", "mode": "0711"}) \
            in lock.notes
    finally:
        lock.release()


def other_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to create and become a second user")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pass
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                             "/usr/sbin/nologin", OTHER_USER], capture_output=True, text=True)
    if result.returncode != 0 and "already exists" not in result.stderr:
        pytest.skip(f"useradd failed: {result.stderr.strip()}")
    return pwd.getpwnam(OTHER_USER)


ATTACK = """
import fcntl, os, sys
state = sys.argv[1]
outcomes = []
for what, attempt in [
    ("flock the state dir", lambda: fcntl.flock(os.open(state, os.O_RDONLY), fcntl.LOCK_EX)),
    ("flock the lock file", lambda: fcntl.flock(os.open(os.path.join(state, "supervisor.lock"),
                                                        os.O_RDONLY), fcntl.LOCK_EX)),
    ("list the state dir", lambda: os.listdir(state)),
    ("write a request", lambda: open(os.path.join(state, "control", "1-1-stop-child"), "w")),
    ("delete the lock record", lambda: os.unlink(os.path.join(state, "supervisor.lock"))),
]:
    try:
        attempt()
        outcomes.append(what + ": done")
    except OSError as error:
        outcomes.append(what + ": " + type(error).__name__)
print("\\n".join(outcomes))
"""


@pytest.fixture
def reachable():
    """A directory any user may reach, as /var/lib/tiny-supervisor is (pytest's own is not)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="sv-hardening-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_another_local_user_can_neither_take_the_lock_nor_ask_anything(reachable):
    user = other_user()
    state = reachable / "state"
    state.mkdir(mode=0o755)
    lock = control.acquire_lock(str(state))
    try:
        result = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             "/usr/bin/python3", "-c", ATTACK, str(state)],
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "flock the state dir: PermissionError",
            "flock the lock file: done",  # readable, but no longer the lock: harmless
            "list the state dir: PermissionError",
            "write a request: PermissionError",
            "delete the lock record: PermissionError",
        ]
        # What the other user did changed nothing: we still hold it, provably.
        assert control.running_pid(str(state)) == os.getpid()
        assert os.listdir(state / "control") == []
    finally:
        lock.release()


def test_a_state_dir_of_another_user_is_refused(tmp_path):
    user = other_user()
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, user.pw_uid, user.pw_gid)
    with pytest.raises(PermissionError, match=f"belongs to uid {user.pw_uid}"):
        control.acquire_lock(str(state))


@pytest.fixture
def read_only_dir(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_state_dir_is_one_line_and_exit_2(world, read_only_dir):
    config = world.write_config(app={"state_dir": str(read_only_dir)})
    result = world.cli("run", config=config)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"supervisor: app.state_dir: cannot take {read_only_dir} for this supervisor: "
        "Read-only file system"]


def test_two_configs_on_one_repository_run_one_supervisor(world):
    first, child_pid = world.start_serving(git={"poll_interval": "1h"})
    other = world.write_config("other.toml", app={"name": "other",
                                                  "state_dir": str(world.tmp / "other-state")})
    second = world.cli("run", config=other)
    assert (second.returncode, second.stdout) == (2, "")
    assert second.stderr.splitlines() == [
        f"supervisor: git.repo: pid {first.pid} already runs a supervisor on this repository "
        f"({world.app})"]
    assert first.proc.poll() is None and world.alive(child_pid)
    assert first.stop() == 0


def test_a_status_probe_at_the_moment_of_start_does_not_keep_the_supervisor_out(tmp_path):
    """`supervisor status` may probe with a shared flock of its own; a supervisor starting
    just then must not take it for a running one (exit 2, and systemd would not retry)."""
    import fcntl
    import threading

    probe = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    assert control.running_pid(str(tmp_path)) is None  # a shared lock is nobody's instance
    threading.Timer(0.02, os.close, [probe]).start()
    lock = control.acquire_lock(str(tmp_path))
    lock.release()
