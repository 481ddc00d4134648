"""Socket handoff, end to end on loopback: the supervisor holds the listening socket, so a client
that connects while the app is being replaced waits in the kernel's backlog and is served by the
next generation instead of being refused."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

SLOW_START = "0.6"  # each app generation waits this long before it accepts: the restart window


def socket_config(world, **extra):
    return [{"listen": f"127.0.0.1:{world.port}", "name": "web", **extra}]


def serve_with_handoff(world, **overrides):
    app = {"env": {"STATS_FILE": str(world.stats), "START_DELAY": SLOW_START}}
    return world.start_serving(socket=socket_config(world), app=app, **overrides)


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        raw = file.read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_client_connecting_during_a_deploy_is_served_by_the_new_generation(world):
    supervisor, old_pid = serve_with_handoff(world)
    commit = world.release("2")
    exited = supervisor.wait_for("child.exited", pid=old_pid)
    # The old generation is gone and the new one sleeps before it accepts: without the
    # supervisor's socket this connection would be refused.
    assert world.http("/", timeout=10) == "hello from 2"
    started = supervisor.wait_for("child.started", commit=commit, after=exited)
    assert started["pid"] != old_pid


def test_a_crash_restart_keeps_the_socket_so_clients_wait_instead_of_failing(world):
    supervisor, old_pid = serve_with_handoff(world)
    os.kill(old_pid, signal.SIGKILL)
    supervisor.wait_for("child.exited", pid=old_pid)
    assert world.http("/", timeout=10) == "hello from 1"
    assert supervisor.select("child.started")[-1]["pid"] != old_pid


def test_the_child_gets_listen_pid_fds_and_names_and_nothing_else(world):
    supervisor = world.start(socket=socket_config(world), app={"command": ["sleep", "60"]},
                             drain=None)
    pid = supervisor.wait_for("child.started")["pid"]

    def exec_done() -> bool:  # until then the pid is the shell that sets LISTEN_PID
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().startswith(b"sleep\0")

    world.wait_until(exec_done, 10, "the app exec'd by the LISTEN_PID wrapper")
    environ = environ_of(pid)
    assert environ["LISTEN_PID"] == str(pid)
    assert (environ["LISTEN_FDS"], environ["LISTEN_FDNAMES"]) == ("1", "web")
    # Only the standard streams and the one socket: no pidfd, epoll, lock or log file leaks.
    # `sleep` opens and closes files of its own while it starts (locale, libraries), at fd 4
    # since 3 is taken: a leak is what stays, so wait for the set to settle, never forever.
    def fds() -> list[str]:
        return sorted(os.listdir(f"/proc/{pid}/fd"), key=int)

    world.wait_until(lambda: fds() == ["0", "1", "2", "3"], 10,
                     "the app to hold only fds 0-3", on_timeout=lambda: f"fds: {fds()}")
    assert os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
    listening = supervisor.wait_for("socket.listening")
    assert (listening["fd"], listening["name"], listening["from_systemd"]) == (3, "web", False)


def test_a_port_already_in_use_is_a_clear_error_and_exit_code_2(world):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", world.port))
        taken.listen()
        supervisor = world.start(socket=socket_config(world))
        assert supervisor.wait_exit() == 2
        lines = [line for line in supervisor.lines if line.strip()]
        assert lines == [f"supervisor: socket 127.0.0.1:{world.port}: cannot listen: "
                         "Address already in use"]
    assert not supervisor.select("child.started")


def test_a_unix_socket_keeps_its_mode_across_restarts_and_serves(world):
    path = world.tmp / "app.sock"
    supervisor = world.start(socket=[{"listen": str(path), "name": "web", "mode": "0600"}],
                             app={"env": {"STATS_FILE": str(world.stats)}})
    pid = supervisor.wait_for("child.started")["pid"]
    before = os.stat(path)
    assert stat.S_ISSOCK(before.st_mode) and stat.S_IMODE(before.st_mode) == 0o600

    def get() -> bytes:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return b"".join(iter(lambda: client.recv(4096), b""))

    assert get().endswith(b"hello from 1\n")
    os.kill(pid, signal.SIGKILL)
    supervisor.wait_for("child.exited", pid=pid)
    assert get().endswith(b"hello from 1\n")
    after = os.stat(path)
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o600)
    assert supervisor.stop() == 0
    assert not path.exists()  # ours to remove: the next run binds it afresh


def test_a_supervisor_started_by_socket_activation_passes_the_socket_on(world, tmp_path):
    config = world.write_config(socket=socket_config(world),
                                app={"env": {"STATS_FILE": str(world.stats)}})
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{world.port}", "--fdname=web",
         sys.executable, "-m", "supervisor", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, cwd=tmp_path)
    try:
        world.wait_until(lambda: world.listens_on(activator.pid, world.port), 10,
                         "systemd-socket-activate listening")
        # It starts its command at the first connection: this one.
        answer = world.http("/", timeout=20)
        if answer is None:
            activator.send_signal(signal.SIGTERM)
            pytest.fail(activator.communicate(timeout=20)[1].decode()[-3000:])
        assert answer == "hello from 1"
        activator.send_signal(signal.SIGTERM)
        _, errors = activator.communicate(timeout=20)
        assert activator.returncode == 0
        assert b'"event":"socket.listening"' in errors and b'"from_systemd":true' in errors
    finally:
        if activator.poll() is None:
            os.killpg(activator.pid, signal.SIGKILL)
            activator.wait()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.1:99999", "nowhere:80x"])
def test_bad_socket_addresses_are_config_errors(world, listen):
    result = world.cli("check", config=world.write_config(socket=[{"listen": listen}]))
    assert result.returncode == 2 and "socket" in result.stderr


def test_without_handoff_a_client_in_the_same_window_is_refused(world):
    """The contrast that makes the tests above mean something: the same restart, with the app
    binding its own port as the bash loop's server did, refuses the same connection."""
    app = {"env": {"STATS_FILE": str(world.stats), "PORT": str(world.port),
                   "START_DELAY": SLOW_START}}
    supervisor, old_pid = world.start_serving(app=app)
    world.release("2")
    supervisor.wait_for("child.exited", pid=old_pid)
    assert world.http("/", timeout=10) is None


# ---------------------------------------------------------------------------------------------
# restart.style = "overlap" (release mode): the next generation starts on the same socket, and
# the old one stops only once the new one proved healthy.


def serve_with_overlap(world, restart=None, health=None):
    # READY=1 from the new generation itself: an HTTP probe on the shared socket could be
    # answered by the old one (the config refuses it).
    health = {"notify": True, "timeout": "5s", **(health or {})}
    supervisor, pid = serve_with_handoff(
        world, deploy={"mode": "releases", "dir": str(world.tmp / "deploy")},
        restart={"style": "overlap", **(restart or {})}, health=health)
    supervisor.wait_for("health.passed", pid=pid)
    return supervisor, pid


def test_an_overlap_serves_from_both_generations_and_stops_the_old_one_last(world):
    supervisor, old_pid = serve_with_overlap(world)
    commit = world.release("2")

    checked = supervisor.wait_for("restart.overlap_checked")
    assert checked["needed"] > 0 and checked["available"] > checked["needed"]
    assert supervisor.action(checked, "start_child") == {
        "action": "start_child", "commit": commit, "reason": "deploy (overlap)"}
    started = supervisor.wait_for("child.started", commit=commit, after=checked)
    # The new generation sleeps before it accepts; the old one still answers meanwhile.
    assert world.alive(old_pid)
    assert world.http("/", timeout=10) in ("hello from 1", "hello from 2")
    passed = supervisor.wait_for("health.passed", pid=started["pid"], after=started)
    assert passed["_t"] - started["_t"] >= float(SLOW_START) * 0.9, "healthy before it served"
    stop = supervisor.wait_for(action="stop_child", after=started)
    # The old generation is stopped by the very step that found the new one healthy.
    assert stop["event"] == "health.probe_passed" and stop["pid"] == started["pid"]
    assert supervisor.action(stop, "stop_child") == {
        "action": "stop_child", "pid": old_pid, "reason": f"replaced by {commit}"}
    supervisor.wait_for("child.exited", pid=old_pid, after=passed)
    world.wait_http("hello from 2", supervisor)
    # `supervisor status` names the overlap deploy as the last one (it once kept the first).
    world.wait_status(lambda s: (s["last_deploy"] or {}).get("commit") == commit
                      and s["last_deploy"]["result"] == "succeeded",
                      "the overlap deploy as the last deploy", supervisor)


def test_a_failed_overlap_leaves_the_old_generation_serving_without_a_restart(world):
    supervisor, old_pid = serve_with_overlap(world, health={"timeout": "2s"})
    bad = world.commit({"CRASH": "yes\n"}, version="2", message="crashes at start")
    world.push()

    started = supervisor.wait_for("child.started", commit=bad)
    failed = supervisor.wait_for("health.failed", commit=bad, after=started)
    assert "CRASH file found" in failed["tail"]
    rolled = supervisor.wait_for("release.rolling_back", kept_pid=old_pid, after=failed)
    assert not world.alive(started["pid"])
    assert world.alive(old_pid), "the old generation was stopped"
    assert os.path.basename(os.readlink(world.tmp / "deploy" / "current")) == world.first
    assert not supervisor.select("child.started", after=rolled)
    world.wait_http("hello from 1", supervisor)


def test_an_overlap_falls_back_to_stop_start_when_memory_is_short(world):
    supervisor, old_pid = serve_with_overlap(world, restart={"overlap_reserve": "1000GiB"})
    commit = world.release("2")
    checked = supervisor.wait_for("restart.overlap_checked")
    fallback = supervisor.wait_for("restart.overlap_fallback", after=checked)
    assert fallback["needed"] > 0
    assert supervisor.action(checked, "stop_child")["pid"] == old_pid
    exited = supervisor.wait_for("child.exited", pid=old_pid, after=checked)
    # Stop-start on the held socket: this connection waits for the next generation.
    assert world.http("/", timeout=10) == "hello from 2"
    supervisor.wait_for("child.started", commit=commit, after=exited)
