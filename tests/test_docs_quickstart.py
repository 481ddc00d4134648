"""docs/quickstart.md, run as a newcomer would: its ```sh blocks in order, in an empty directory,
against a real bare remote, with `supervisor run` started in the background (and restarted the
way the page says, with Ctrl-C) and stopped at the end. An HTML comment before a block may say
`skip`, `wait-log "TEXT"` (before the block, until the app's output in the supervisor's log
shows TEXT printed after the previous block began), `expect "TEXT"` (in the block's output) or
`under-load` (one client asks the server again and again from the block's start to the end of
the next block's waits: no request may fail). Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers_git import git_env

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
DIRECTIVE = re.compile(r"^<!-- quickstart-test: (.*) -->$")
OUTPUT = re.compile(r"\bchild\.output\b")
BLOCK_WAIT = 60  # seconds for one block, or one wait for the log


@dataclass
class Block:
    text: str
    skip: bool = False
    wait_log: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    under_load: bool = False


def blocks(markdown: str) -> list[Block]:
    """The ```sh blocks, each with the directives of the comment just above it."""
    found, directives, lines = [], "", markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := DIRECTIVE.match(line):
            directives = match.group(1)
        elif line == "```sh":
            end = lines.index("```", index + 1)
            block = Block("\n".join(lines[index + 1:end]))
            for part in (p.strip() for p in directives.split(";") if p.strip()):
                word, _, rest = part.partition(" ")
                if word == "skip":
                    block.skip = True
                elif word == "under-load":
                    block.under_load = True
                elif word in ("wait-log", "expect"):
                    getattr(block, word.replace("-", "_")).append(shlex.split(rest)[0])
                else:
                    raise AssertionError(f"unknown quickstart-test directive: {part}")
            found.append(block)
            directives, index = "", end
        elif line.strip():
            directives = ""  # a directive belongs to the block right below it
        index += 1
    return found


class Load(threading.Thread):
    """The page's `while true; do curl ...; done`: one request after another, each counted."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url, self.done = f"http://127.0.0.1:{port}/", threading.Event()
        self.answers: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    self.answers.append(answer.read().decode())
            except OSError as error:
                self.errors.append(repr(error))

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=BLOCK_WAIT)
        assert not self.is_alive()


class Supervisor:
    """`supervisor run` in the background, its log (stderr) read line by line as it comes."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def printed(self, text: str, after: int) -> bool:
        """The app printed `text`: a child.output line, not the tail quoted by child.exited."""
        return any(OUTPUT.search(line) and text in line for line in self.lines[after:])

    def wait_for(self, text: str, after: int) -> None:
        with self.changed:
            self.changed.wait_for(
                lambda: self.printed(text, after) or not self.reader.is_alive(),
                timeout=BLOCK_WAIT)
            if not self.printed(text, after):
                pytest.fail(f"the log never showed {text!r}:\n{''.join(self.lines[-40:])}")

    def stop(self) -> int:
        """Ctrl-C, as the page says; the supervisor stops the server, then exits."""
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout=BLOCK_WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail("the supervisor did not stop on Ctrl-C")
        self.reader.join(timeout=BLOCK_WAIT)
        return code


def test_the_quick_start_works_as_written(tmp_path: Path) -> None:
    port = free_port()
    page = DOC.read_text().replace("8080", str(port))
    env = git_env(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(name, None)
    cwd, supervisor, mark, load = tmp_path, None, 0, None
    ran = [b for b in blocks(page) if not b.skip]
    assert sum(b.text.startswith("supervisor run") for b in ran) == 2  # first run, and restart
    assert sum(b.under_load for b in ran) == 1
    try:
        for block in ran:
            for text in block.wait_log:
                assert supervisor is not None, "wait-log before any `supervisor run`"
                supervisor.wait_for(text, mark)
            if load is not None:
                load.finish()
                assert not load.errors, f"{len(load.errors)} failed: {load.errors[:5]}"
                # The client saw both generations: its requests spanned the restart.
                assert {a.split(" from")[0] for a in load.answers} == {"hi", "hello again"}
                load = None
            mark = len(supervisor.lines) if supervisor else 0
            if block.under_load:
                load = Load(port)
                load.start()
            if block.text.startswith("supervisor run"):
                if supervisor is not None:
                    assert supervisor.stop() == 0, "".join(supervisor.lines[-40:])
                supervisor, mark = Supervisor(block.text, cwd, env), 0
                continue
            where = tmp_path / ".cwd"
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", f'{block.text}\npwd > "{where}"'],
                cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_WAIT,
                check=False)
            log = "".join(supervisor.lines[-40:]) if supervisor else ""
            assert done.returncode == 0, f"{block.text}\n{done.stdout}{done.stderr}\n{log}"
            for text in block.expect:
                assert text in done.stdout, f"{block.text}\n{done.stdout}"
            cwd = Path(where.read_text().strip())
        assert supervisor is not None  # the second one, holding the socket: a start, a deploy
        assert any("socket.listening" in line for line in supervisor.lines)
        assert sum("child.started" in line for line in supervisor.lines) == 2
        assert supervisor.stop() == 0, "".join(supervisor.lines[-40:])
        with pytest.raises(ConnectionRefusedError):  # the server went with it, and the socket
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if load is not None:
            load.finish()
        if supervisor is not None and supervisor.process.poll() is None:
            supervisor.stop()
