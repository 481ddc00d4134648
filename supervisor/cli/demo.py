"""`supervisor demo`: the whole cycle (drain, build, restart, crash restart) in a temporary
directory, narrated for someone who has just cloned the repository, with two apps in one
supervisor: one deploys and crashes and is restarted while the other waits for its client. It
runs the real supervisor as a child process and waits on its log and on HTTP answers, never on
fixed sleeps that could lie.
Only `supervisor demo` imports this module, so nothing here costs the service any memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from supervisor.drivers.sockets import free_port
from supervisor.drivers.statsfile import read_stats

EXAMPLE_APP = Path(os.path.abspath(__file__)).parent.parent / "example_app"
HOLD_SECONDS = 6  # how long the demo's client stays connected
READING_PAUSE = 1.5  # the one fixed pause: time to read the lines above before the push
STEP_TIMEOUT = 15.0  # every wait below is bounded; a step that takes longer fails the demo
STOP_TIMEOUT = 10.0  # Ctrl-C: how long the supervisor gets to stop its app before SIGKILL

MAIN = """\
# Written by `supervisor demo`: the main file. Paths are relative to this file.
[supervisor]
apps = ["apps/*.toml"]      # each file is one app, named after it: web, api
state_dir = "state"         # each app's state in state/NAME
max_builds = 1
"""

# The app "web": built, and deployed only once its clients have left. Paths are relative to
# its own file, in apps/.
WEB = """\
# Written by `supervisor demo`: the app "web". Paths are relative to this file.
[app]
command = [{python}, "server.py"]
env = {{ PORT = "{port}", STATS_FILE = {stats} }}
stop_timeout = "3s"

[git]
repo = "../web"
poll_interval = "1s"
timeout = "10s"

[build]
command = [{python}, "-m", "py_compile", "server.py"]
timeout = "30s"

[drain]
stats_file = {stats}
until = "n_clients == 0"
timeout = "30s"

[restart]
backoff_min = "500ms"
backoff_max = "4s"
reset_after = "2s"
"""

# The app "api", from its own clone of the same remote: no build, no drain, so a new commit is
# deployed at once, whatever "web" is doing.
API = """\
# Written by `supervisor demo`: the app "api". Paths are relative to this file.
[app]
command = [{python}, "server.py"]
env = {{ PORT = "{port}" }}
stop_timeout = "3s"

[git]
repo = "../api"
poll_interval = "1s"
timeout = "10s"

[restart]
backoff_min = "500ms"
backoff_max = "4s"
reset_after = "2s"
"""


class DemoFailed(Exception):
    """A step did not happen in time; the message says which."""


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


# Local requests must not go through an http_proxy the user may have set.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> str:
    with _opener.open(url, timeout=timeout) as response:
        return str(response.read().decode().strip())


def wait_for_answer(url: str, expected: str, alive: Callable[[], bool],
                    timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise DemoFailed(f'the supervisor exited before the app answered "{expected}"')
        try:
            last = http_get(url)
            if last == expected:
                return
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise DemoFailed(f'the app did not answer "{expected}" within {timeout:g}s (last: {last})')


class Client(threading.Thread):
    """A visitor that stays connected for a while, as a slow download or a game session would."""

    def __init__(self, url: str) -> None:
        super().__init__(name="demo-client", daemon=True)
        self.url, self.answer, self.error = url, "", ""

    def run(self) -> None:
        try:
            self.answer = http_get(self.url, timeout=HOLD_SECONDS + STEP_TIMEOUT)
        except OSError as error:
            self.error = str(error)


class LogFollower:
    """Copies the supervisor's log to our stderr and keeps its lines to wait on."""

    def __init__(self, stream: IO[str], alive: Callable[[], bool]) -> None:
        self.lines: list[str] = []
        self.alive = alive
        self.closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), name="demo-log", daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def wait_for(self, event: str, since: int, timeout: float = STEP_TIMEOUT,
                 app: str | None = None) -> int:
        """Index of the first `event` line at or after `since` (of `app`, if named); text lines
        read `TS EVENT ... app=NAME ...`."""
        deadline = time.monotonic() + timeout
        gone_at: float | None = None
        with self._changed:
            while True:
                for index in range(since, len(self.lines)):
                    words = self.lines[index].split()
                    if len(words) > 1 and words[1] == event and (
                            app is None or f"app={app}" in words):
                        return index
                since = max(since, len(self.lines))
                now = time.monotonic()
                if not self.closed and not self.alive():
                    # Its last lines may still be in the pipe, which an app that outlived it
                    # keeps open: give them a moment rather than wait for the end of the pipe.
                    gone_at = gone_at or now
                if self.closed or (gone_at is not None and now - gone_at > 1.0):
                    raise DemoFailed(f"the supervisor exited before its log showed {event}")
                if now >= deadline:
                    raise DemoFailed(f"the log did not show {event}"
                                     f"{f' of {app}' if app else ''} within {timeout:g}s")
                self._changed.wait(min(deadline - now, 0.2))

    def field(self, index: int, name: str) -> str:
        for word in self.lines[index].split():
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        raise DemoFailed(f"no {name}= in the log line: {self.lines[index]}")

    def child_pids(self) -> list[int]:
        with self._changed:
            lines = list(self.lines)
        return [int(word[4:]) for line in lines if " child.started " in line
                for word in line.split() if word.startswith("pid=") and word[4:].isdigit()]


@contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM both lead to the same clean-up, even if SIGINT was inherited ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.remote, self.dev = root / "remote.git", root / "dev"
        self.web, self.api = root / "web", root / "api"  # each app's deploy clone
        self.stats = root / "example.stats"
        self.config = root / "supervisor.toml"
        self.web_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "Demo Developer", "GIT_AUTHOR_EMAIL": "dev@example.invalid",
            "GIT_COMMITTER_NAME": "Demo Developer", "GIT_COMMITTER_EMAIL": "dev@example.invalid",
            # The user's own git config (signing, hooks, default branch) must not change the demo.
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        }
        self.process: subprocess.Popen[str] | None = None
        self.log: LogFollower | None = None

    def git(self, *args: str) -> None:
        try:
            subprocess.run(["git", *args], cwd=self.root, env=self.env, check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise DemoFailed("git is not installed (apt install git)") from None
        except subprocess.CalledProcessError as error:
            raise DemoFailed(f"git {args[0]} failed: {error.stderr.strip()}") from None
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"git {args[0]} did not finish within 30s") from None

    def make_repositories(self) -> None:
        self.git("init", "-q", "--bare", "-b", "main", str(self.remote))
        self.git("init", "-q", "-b", "main", str(self.dev))
        for name in ("server.py", "VERSION"):
            shutil.copy(EXAMPLE_APP / name, self.dev / name)
        (self.dev / "VERSION").write_text("1\n")
        self.git("-C", str(self.dev), "add", "server.py", "VERSION")
        self.git("-C", str(self.dev), "commit", "-q", "-m", "Example app, version 1")
        self.git("-C", str(self.dev), "remote", "add", "origin", str(self.remote))
        self.git("-C", str(self.dev), "push", "-q", "-u", "origin", "main")
        # One clone per app: a repository belongs to one app, which alone moves it.
        self.git("clone", "-q", str(self.remote), str(self.web))
        self.git("clone", "-q", str(self.remote), str(self.api))

    def write_config(self) -> None:
        python = json.dumps(sys.executable)  # a JSON string is a valid TOML basic string
        self.config.write_text(MAIN)
        (self.root / "apps").mkdir()
        (self.root / "apps" / "web.toml").write_text(WEB.format(
            python=python, port=self.web_port, stats=json.dumps(str(self.stats))))
        (self.root / "apps" / "api.toml").write_text(API.format(python=python,
                                                                port=self.api_port))

    def start_supervisor(self) -> LogFollower:
        env = dict(self.env)
        # Run this very copy of the package, installed or not.
        package_parent = str(EXAMPLE_APP.parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent,
                                                           env.get("PYTHONPATH")]))
        # Its own process group: Ctrl-C reaches only the demo, which then stops it in order.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "-c", str(self.config),
             "--log-format", "text"],
            cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        assert self.process.stdout is not None
        self.log = LogFollower(self.process.stdout, self.alive)
        return self.log

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_answer(self, expected: str, url: str | None = None) -> None:
        wait_for_answer((url or self.url) + "/", expected, self.alive)

    def push_version(self, version: str) -> None:
        (self.dev / "VERSION").write_text(version + "\n")
        self.git("-C", str(self.dev), "commit", "-q", "-a", "-m", f"Version {version}")
        self.git("-C", str(self.dev), "push", "-q")

    def wait_for_clients(self, count: int) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline and self.alive():
            values = read_stats(str(self.stats)).values or {}
            if values.get("n_clients") == str(count):
                return
            time.sleep(0.05)
        if not self.alive():
            raise DemoFailed("the supervisor exited while the demo waited for the client")
        raise DemoFailed(f"the stats file did not show n_clients={count} within {STEP_TIMEOUT:g}s")

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL, as watchfiles stops its process. Repeatable."""
        process = self.process
        if process is None:
            return None
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=STOP_TIMEOUT)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass  # a second Ctrl-C means "now"
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.kill_orphaned_app()
        return process.returncode

    def kill_orphaned_app(self) -> None:
        """A supervisor that died or was killed leaves its apps running. Ours are the pids its
        log named that still run in one of our deploy clones; a recycled pid would not have
        that directory."""
        if self.log is None:
            return
        clones = {os.path.realpath(self.web), os.path.realpath(self.api)}
        for pid in self.log.child_pids():
            try:
                if os.path.realpath(f"/proc/{pid}/cwd") in clones:
                    os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    def run(self) -> None:
        self.make_repositories()
        self.write_config()
        say(f"made a git remote, a developer clone and two deploy clones in {self.root}")
        say("two apps in one supervisor: web (built, drained) and api (neither), "
            "from apps/web.toml and apps/api.toml")
        say(f"starting: supervisor run -c {self.config} --log-format text")
        log = self.start_supervisor()
        self.wait_for_answer("hello from 1")
        self.wait_for_answer("hello from 1", self.api_url)
        say(f'web ({self.url}/) and api ({self.api_url}/) both answer "hello from 1"')
        client, pushed = self.drain_and_crash(log)
        self.finish_drain(log, client, pushed)
        self.stop_supervisor(log)

    def drain_and_crash(self, log: LogFollower) -> tuple[Client, int]:
        """A client holds web's deploy back, while api deploys at once and crashes. Returns
        the client and the log's mark at the push."""
        client = Client(f"{self.url}/hold?s={HOLD_SECONDS}")
        client.start()
        self.wait_for_clients(1)
        say(f"a client connects to web and stays for {HOLD_SECONDS}s "
            f"(GET /hold?s={HOLD_SECONDS})")
        time.sleep(READING_PAUSE)

        mark = log.mark()
        self.push_version("2")
        say("pushed a change (VERSION 1 -> 2) while the client is connected to web")
        log.wait_for("deploy.waiting_for_drain", mark, app="web")
        say("web fetched it and waits for n_clients == 0 before touching anything")
        api_started = log.wait_for("child.started", mark, app="api")
        self.wait_for_answer("hello from 2", self.api_url)
        say('api, with no drain, deployed it at once: it answers "hello from 2"')

        pid = int(log.field(api_started, "pid"))
        crash = log.mark()
        os.kill(pid, signal.SIGKILL)
        say(f"kill -9 {pid}: api crashes")
        restarted = log.wait_for("child.started",
                                 log.wait_for("child.restarting", crash, app="api"), app="api")
        self.wait_for_answer("hello from 2", self.api_url)
        say(f"api restarted at once as pid {log.field(restarted, 'pid')}, "
            + ("while web still waits for its client" if client.is_alive()
               else "while web finished its drain"))
        return client, mark

    def finish_drain(self, log: LogFollower, client: Client, mark: int) -> None:
        client.join(HOLD_SECONDS + STEP_TIMEOUT)
        if client.is_alive() or client.error:
            raise DemoFailed(f"the client did not get its answer: {client.error or 'timed out'}")
        say(f'the client got "{client.answer}" from web\'s old version, undisturbed, and left')
        satisfied = log.wait_for("drain.satisfied", mark, app="web")
        built = log.wait_for("build.succeeded", satisfied, app="web")
        log.wait_for("child.started", built, app="web")
        say("web: drained -> tree updated -> built -> old app stopped -> new app started")
        self.wait_for_answer("hello from 2")
        say(f'{self.url}/ answers "hello from 2"')

    def stop_supervisor(self, log: LogFollower) -> None:
        mark = log.mark()
        say("sending SIGTERM to the supervisor")
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"the supervisor did not exit within {STEP_TIMEOUT:g}s") from None
        if code != 0:
            raise DemoFailed(f"the supervisor exited with code {code}, not 0")
        log.wait_for("supervisor.stopped", mark, timeout=2.0)
        say("it stopped both apps and exited with code 0")


def run_demo(keep: bool = False) -> int:
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="supervisor-demo-")).resolve()
    demo: Demo | None = None
    code = 0
    with interrupts_as_keyboard_interrupt():
        try:
            demo = Demo(root)
            demo.run()
        except DemoFailed as error:
            print(f"demo: failed: {error}", file=sys.stderr, flush=True)
            code = 1
        except KeyboardInterrupt:
            say("interrupted; stopping the supervisor")
            code = 130
        finally:
            if demo is not None:
                demo.stop()
            if keep:
                say(f"kept {root}; run it again with: supervisor run -c {root / 'supervisor.toml'}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    if code == 0:
        say(f"done in {time.monotonic() - began:.1f}s")
    elif code == 130:
        say("stopped" + ("" if keep else f" and removed {root}"))
    elif not keep:
        say("the log above shows how far it got; `supervisor demo --keep` keeps the files")
    return code
