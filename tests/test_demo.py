"""`supervisor demo` and the shipped `supervisor.toml`, run the way a user runs them: as
commands, with real git, real processes and real ports; the demo runs two apps in one
supervisor. TMPDIR points the demo's temporary
directory into the test's own, so we can check that nothing is left behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "supervisor", "demo"]


def demo_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp_path)}


def processes_using(path: Path) -> list[str]:
    """Live processes whose command line or working directory lies in `path`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except (OSError, UnicodeDecodeError):
            continue  # gone meanwhile, a zombie, or not ours to read
        if str(path) in cmdline or cwd.startswith(str(path)):
            found.append(f"{entry} (cwd {cwd}): {cmdline}")
    return found


def log_events(output: str, app: str | None = None) -> list[str]:
    """Event names of the supervisor's text log lines (`TS EVENT ... app=NAME ...`) in order,
    of one app's lines if named."""
    events = []
    for line in output.splitlines():
        words = line.split()
        if len(words) > 1 and words[0][:4].isdigit() and words[0].endswith("Z") and (
                app is None or f"app={app}" in words):
            events.append(words[1])
    return events


def first_line(output: str, event: str, app: str) -> int:
    """The number of the first line of `event` of `app` in the output."""
    return next(number for number, line in enumerate(output.splitlines())
                if f" {event} " in line and f"app={app}" in line.split())


def in_order(events: list[str], expected: list[str]) -> bool:
    remaining = iter(events)
    return all(name in remaining for name in expected)


def assert_nothing_left(tmp_path: Path) -> None:
    assert os.listdir(tmp_path) == [], "the demo's temporary directory was not removed"
    assert processes_using(tmp_path) == []


def test_demo_runs_two_apps_one_drains_while_the_other_deploys_and_crashes(
        tmp_path: Path) -> None:
    result = subprocess.run(DEMO, cwd=ROOT, env=demo_env(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=60)
    output = result.stdout
    assert result.returncode == 0, output
    assert output.count('"hello from 1"') >= 2 and '"hello from 2"' in output
    assert in_order(log_events(output, "web"), [
        "supervisor.started", "child.started",
        "deploy.waiting_for_drain", "drain.satisfied", "git.tree_updated", "build.succeeded",
        "child.exited", "child.started",  # the restart into the new version
        "supervisor.stop_requested", "child.exited",
    ]), output
    assert in_order(log_events(output, "api"), [
        "supervisor.started", "child.started",
        "git.tree_updated", "child.exited", "child.started",  # deployed at once, no drain
        "child.exited", "child.restarting", "child.started",  # the crash restart
        "supervisor.stop_requested", "child.exited",
    ]), output
    # One process: a single pid started both, and one stop ends it.
    started = [line for line in output.splitlines() if " supervisor.started " in line]
    assert len(started) == 2 and len({w for line in started for w in line.split()
                                       if w.startswith("pid=")}) == 1, started
    assert log_events(output)[-1] == "supervisor.stopped"
    # api deployed and was restarted after its crash while web still waited for its client.
    assert first_line(output, "child.restarting", "api") < first_line(
        output, "drain.satisfied", "web"), output
    # For people (issue 14, rough edge 7): short commits, no machine actions without -v.
    log_lines = [line for line in output.splitlines() if line[:4].isdigit()]
    assert not [line for line in log_lines if " => " in line], output
    assert not re.search(r"=[0-9a-f]{40}\b", output), output
    assert_nothing_left(tmp_path)


def test_ctrl_c_during_the_drain_stops_everything_and_cleans_up(tmp_path: Path) -> None:
    process = subprocess.Popen(DEMO, cwd=ROOT, env=demo_env(tmp_path), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=30)
            assert line is not None, "".join(seen)
            seen.append(line)
            if " deploy.waiting_for_drain " in line:
                break
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    while (line := lines.get(timeout=5)) is not None:
        seen.append(line)
    output = "".join(seen)
    assert code == 130, output
    assert "demo: interrupted" in output
    assert " supervisor.stopped " in output, output  # it was stopped politely, not killed
    assert_nothing_left(tmp_path)


def test_the_shipped_config_is_valid(tmp_path: Path) -> None:
    installed = Path(sys.executable).parent / "supervisor"
    command = [str(installed)] if installed.exists() else [sys.executable, "-m", "supervisor"]
    # check refuses what run would, a branch without upstream too: so in a clone, as users have.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=60)
    (clone / "supervisor.toml").write_text((ROOT / "supervisor.toml").read_text())
    result = subprocess.run([*command, "check", "-c", "supervisor.toml"],
                            cwd=clone, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "[drain]" in result.stdout and "[build]" in result.stdout
