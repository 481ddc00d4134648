"""`supervisor events`: one line per event for people, filters by name and time, JSON passed
through unchanged for jq, and `-f` following a real file across appends, rotation and
truncation (in a real subprocess, every wait bounded).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from supervisor.cli.viewer import (
    CYAN,
    DIM,
    GREEN,
    RED,
    YELLOW,
    colour_of,
    format_record,
    main,
    parse_since,
    use_colour,
)
from supervisor.drivers.eventlog import EventLog, timestamp
from supervisor.drivers.procfs import stat_fields

PROJECT_ROOT = Path(__file__).resolve().parent.parent
C1 = "603184d3f2b0bf2e4c6435f6d30b066e3a7b3e92"
C2 = "f0c6a00635bca17d203e48d0f6309ccdfe19c8da"
TS = "2026-11-24T23:04:28.015Z"

FORMATS = [
    ({"ts": TS, "event": "git.fetched", "head": C1, "upstream": C2, "relation": "behind",
      "dirty": False, "before": "running", "after": "draining",
      "actions": [{"action": "watch_stats"},
                  {"action": "start_timer", "timer": "drain", "seconds": 30.0, "serial": 2}]},
     "2026-11-24 23:04:28.015Z git.fetched running->draining head=603184d3f2b0 "
     "upstream=f0c6a00635bc relation=behind dirty=false => watch_stats, "
     "start_timer(timer=drain, seconds=30.0, serial=2)"),
    ({"ts": TS, "event": "stats.read", "values": {"n_clients": "1"}, "problem": None,
      "before": "draining", "after": "draining", "actions": []},
     '2026-11-24 23:04:28.015Z stats.read draining values={"n_clients":"1"}'),
    ({"ts": TS, "event": "child.exited", "pid": 17066, "exit_code": None, "signal": "SIGKILL",
      "before": "running", "after": "running",
      "actions": [{"action": "start_child", "commit": C2, "reason": "crash restart"}]},
     "2026-11-24 23:04:28.015Z child.exited running pid=17066 signal=SIGKILL => "
     'start_child(commit=f0c6a00635bc, reason="crash restart")'),
    ({"ts": TS, "event": "child.restarting", "reason": "killed by SIGKILL", "crashes": 1,
      "delay": 0.0},
     '2026-11-24 23:04:28.015Z child.restarting reason="killed by SIGKILL" crashes=1 delay=0.0'),
    ({"ts": TS, "event": "build.failed", "commit": C2, "tail": "a\nb", "before": "building",
      "after": "running", "actions": []},
     '2026-11-24 23:04:28.015Z build.failed building->running commit=f0c6a00635bc '
     'tail="a\\nb"'),
    ({"ts": TS, "event": "child.output", "stream": "stderr", "pid": 42,
      "line": "listening on port 8080"},
     "2026-11-24 23:04:28.015Z child.output pid=42 stderr: listening on port 8080"),
    ({"ts": TS, "event": "child.output", "stream": "stdout", "pid": 42,
      "line": "\x1b[31mred\x1b[0m\ttab", "truncated": True},
     "2026-11-24 23:04:28.015Z child.output pid=42 stdout: \\x1b[31mred\\x1b[0m\ttab [cut]"),
    ({"ts": "not a time", "event": "x.y", "facts": [], "empty": ""},
     "- x.y"),
]


@pytest.mark.parametrize(("record", "expected"), FORMATS)
def test_one_line_per_event_for_people(record: dict[str, object], expected: str) -> None:
    assert format_record(record, utc=True) == expected


def test_local_time_is_the_default() -> None:
    line = format_record({"ts": "2026-01-01T12:00:00.250Z", "event": "x.y"})
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1767268800))
    assert line == f"{local}.250 x.y"


@pytest.mark.parametrize(("event", "colour"), [
    ("deploy.failed", RED), ("git.fetch_failed", RED), ("child.crash_looping", RED),
    ("child.output_dropped", RED), ("drain.timed_out", RED), ("git.dirty", RED),
    ("child.restarting", YELLOW), ("event.ignored", YELLOW), ("child.stale_found", YELLOW),
    ("child.started", GREEN), ("build.succeeded", GREEN), ("supervisor.stopped", GREEN),
    ("child.output", DIM), ("stats.read", DIM), ("child.exited", CYAN), ("git.fetched", CYAN),
])
def test_event_names_are_coloured_by_kind(event: str, colour: str) -> None:
    assert colour_of(event) == colour
    line = format_record({"ts": TS, "event": event}, colour=True, utc=True)
    assert line == f"2026-11-24 23:04:28.015Z \x1b[{colour}m{event}\x1b[0m"


def test_colours_only_on_a_terminal_and_never_with_no_color(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    primary, secondary = os.openpty()
    with open(secondary, "w") as terminal, open(tmp_path / "file", "w") as file:
        assert use_colour("auto", terminal)
        assert not use_colour("auto", file)
        assert use_colour("always", file)
        assert not use_colour("never", terminal)
        monkeypatch.setenv("NO_COLOR", "1")
        assert not use_colour("auto", terminal)
    os.close(primary)


def test_since_takes_rfc_3339_or_an_age() -> None:
    assert parse_since("2026-11-24T23:04:28Z") == 1795561468.0
    assert parse_since("2026-11-24T23:04:28+01:00") == 1795561468.0 - 3600
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h", now=10000.0) == 2800.0
    assert parse_since("1.5d", now=200000.0) == 200000.0 - 129600
    assert parse_since("500ms", now=10.0) == 9.5
    with pytest.raises(Exception, match="10m"):
        parse_since("yesterday")


# ---------------------------------------------------------------------------------------------
# The command on a file


def write_log(path: Path, records: list[dict[str, object]], extra: str = "") -> list[str]:
    lines = [json.dumps(r, separators=(",", ":")) for r in records]
    path.write_text("\n".join(lines) + "\n" + extra)
    return lines


def events_at(*offsets: float) -> list[dict[str, object]]:
    """Records `offsets` seconds ago, alternating between a few event names."""
    names = ["child.started", "git.fetched", "child.output", "deploy.failed"]
    now = time.time()
    return [{"ts": timestamp(now - offset), "event": names[i % 4], "n": i}
            for i, offset in enumerate(offsets)]


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_event_patterns_are_globs_and_repeatable(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    write_log(path, events_at(40, 30, 20, 10, 0), extra="plain output of the app\n")
    out = printed(capsys, str(path), "--event", "child.*")
    assert [line.split()[2] for line in out] == ["child.started", "child.output",
                                                 "child.started"]
    out = printed(capsys, str(path), "--event", "child.started", "--event", "*.failed")
    assert [line.split()[2] for line in out] == ["child.started", "deploy.failed",
                                                 "child.started"]
    # Without a filter, a line that is not an event is shown as it is.
    assert printed(capsys, str(path))[-1] == "plain output of the app"


def test_since_keeps_recent_events_and_the_lines_among_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    records = events_at(7200, 3600, 600, 60)
    lines = [json.dumps(r) for r in records]
    lines.insert(1, "old app output")
    lines.insert(4, "new app output")
    path.write_text("\n".join(lines) + "\n")
    out = printed(capsys, str(path), "--since", "30m")
    assert len(out) == 3
    assert [line.split()[-1] for line in out] == ["n=2", "output", "n=3"]
    since = records[1]["ts"]
    assert [line.split()[-1] for line in printed(capsys, str(path), "--since", str(since),
                                                 "--event", "*")] == ["n=1", "n=2", "n=3"]


def test_json_passes_matching_lines_through_unchanged(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    log_lines = write_log(path, events_at(3, 2, 1, 0) + [{"event": "x.y", "s": "\u00e9\n"}],
                          extra="not json\n{broken\n[1, 2]\n")
    out = printed(capsys, str(path), "--json")
    assert out == log_lines
    assert all(isinstance(json.loads(line), dict) for line in out)
    assert printed(capsys, str(path), "--json", "--event", "git.*") == [log_lines[1]]


def test_a_missing_file_is_one_line_on_stderr(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.log")]) == 2
    assert capsys.readouterr().err.startswith("supervisor events: cannot read ")


def test_standard_input_is_read_when_no_file_is_given(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log_lines = write_log(path, events_at(1, 0), extra="app line\n")
    with open(path, "rb") as stdin:
        # In a directory without a supervisor.toml, so no config names a log file.
        result = subprocess.run([sys.executable, "-m", "supervisor.cli.viewer", "--json"],
                                stdin=stdin, capture_output=True, text=True, timeout=10,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == log_lines


def test_a_real_event_log_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    with open(path, "w") as stream:
        log = EventLog(stream)
        log.write("child.output", {"stream": "stdout", "pid": 7, "line": "hello \u00e9"})
        log.write("child.output_dropped", {"count": 3, "file": "/x", "error": "No space"})
    out = printed(capsys, str(path), "--utc")
    assert out[0].endswith(" child.output pid=7 stdout: hello \u00e9")
    assert out[1].endswith(' child.output_dropped count=3 file=/x error="No space"')


# ---------------------------------------------------------------------------------------------
# Following


class Viewer:
    """`python -m supervisor.cli.viewer ARGS` with its output read line by line in a thread."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli.viewer", *argv],
                                     cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 5.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the viewer printed nothing within {timeout}s")

    def cpu_seconds(self) -> float:
        fields = stat_fields(self.proc.pid)
        assert fields is not None, "the viewer is gone"
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def event(n: int) -> str:
    return json.dumps({"ts": timestamp(), "event": "child.output", "stream": "stdout", "pid": 1,
                       "line": f"line {n}"})


def append(path: Path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


def test_follow_picks_up_appends_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    viewer = Viewer("-f", str(path), "--json")
    try:
        append(path, event(1) + "\n")  # the file appears after the viewer started
        assert json.loads(viewer.next())["line"] == "line 1"

        half = event(2)
        append(path, half[:20])  # a line written in two steps is printed once, whole
        before = viewer.cpu_seconds()
        time.sleep(0.6)
        assert viewer.lines.empty()
        append(path, half[20:] + "\n")
        assert viewer.next() == half
        assert viewer.cpu_seconds() - before < 0.3, "following must not busy-poll"

        # Rotation as RotatingFile does it: the last line of the old file, then the new file.
        append(path, event(3) + "\n")
        os.replace(path, f"{path}.1")
        append(path, event(4) + "\n")
        assert json.loads(viewer.next())["line"] == "line 3"
        assert json.loads(viewer.next())["line"] == "line 4"

        # Truncation in place (copytruncate): read again from the start.
        append(path, event(5) + "\n" + event(6) + "\n")
        assert [json.loads(viewer.next())["line"] for _ in range(2)] == ["line 5", "line 6"]
        with open(path, "w") as file:
            file.write(event(7) + "\n")
        assert json.loads(viewer.next())["line"] == "line 7"
        assert viewer.proc.poll() is None
    finally:
        viewer.close()


def test_follow_keeps_up_with_a_rotating_event_log(tmp_path: Path) -> None:
    from supervisor.drivers.childlog import RotatingFile

    path = tmp_path / "events.log"
    file = RotatingFile(path, max_bytes=400, keep=1)
    log = EventLog(file)  # type: ignore[arg-type]
    viewer = Viewer("-f", str(path), "--utc", "--color", "never")
    try:
        for n in range(6):  # about three records a file: rotates twice, waiting each time
            log.write("child.output", {"stream": "stderr", "pid": 9, "line": f"message {n}"})
            assert viewer.next().endswith(f" child.output pid=9 stderr: message {n}")
        assert Path(f"{path}.1").exists()
    finally:
        viewer.close()
        file.close()


def test_rotated_copies_are_read_first_oldest_first(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    records = events_at(50, 40, 30, 20, 10, 0)
    for name, part in ((f"{path}.2", records[0:2]), (f"{path}.1", records[2:4]),
                       (str(path), records[4:6])):
        write_log(Path(name), part)
    (tmp_path / "events.log.old").write_text("not a rotated copy\n")
    (tmp_path / "other.log.1").write_text("not ours\n")
    out = printed(capsys, str(path))
    assert [line.split()[-1] for line in out] == [f"n={n}" for n in range(6)]


def test_the_log_file_comes_from_the_config(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "supervisor.toml"
    config.write_text('[app]\ncommand = "true"\n[log]\nfile = "events.log"\n')
    log_lines = write_log(tmp_path / "events.log", events_at(1, 0))
    assert printed(capsys, "-c", str(config), "--json") == log_lines
    (tmp_path / "other.log").write_text(log_lines[0] + "\n")
    assert printed(capsys, "-c", str(config), "--file", str(tmp_path / "other.log"),
                   "--json") == log_lines[:1]
    config.write_text('[app]\ncommand = "true"\n[log]\nfile = 3\n')
    assert main(["-c", str(config)]) == 2
    assert capsys.readouterr().err.startswith("supervisor: log.file: ")


# ---------------------------------------------------------------------------------------------
# Many apps in one process: --app, and a main file's log


def many_apps_log(path: Path) -> None:
    """What one process of two apps writes: each app's lines through its own AppLog, and the
    process's lines (app null), some about an app (app_name)."""
    from supervisor.loop.host import AppLog

    with open(path, "w") as stream:
        log = EventLog(stream)
        process, web, api = AppLog(log, None), AppLog(log, "web"), AppLog(log, "api")
        process.write("supervisor.started", {"pid": 1})
        web.write("child.started", {"pid": 10, "commit": C1})
        api.write("child.started", {"pid": 11, "commit": C2})
        process.write("app.config_failed", {"app_name": "web", "problems": ["x"]})
        api.write("child.exited", {"pid": 11})
        process.write("app.removing", {"app_name": "api"})
        web.write("child.exited", {"pid": 10})
        process.write("supervisor.stopped", {"pid": 1})
        stream.write("plain output of an app\n")


def test_app_keeps_one_apps_lines_and_the_process_lines_about_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    many_apps_log(path)
    every = path.read_text().splitlines()
    web = printed(capsys, str(path), "--app", "web", "--json")
    assert [(json.loads(line)["event"], json.loads(line)["app"]) for line in web] == [
        ("child.started", "web"), ("app.config_failed", None), ("child.exited", "web")]
    assert all(line in every for line in web)  # passed through unchanged
    api = printed(capsys, str(path), "--app", "api", "--utc")
    assert [line.split()[2] for line in api] == ["child.started", "child.exited", "app.removing"]
    assert all("app=api" in line or "app_name=api" in line for line in api)
    both = printed(capsys, str(path), "--app", "web", "--app", "api", "--event", "child.*")
    assert len(both) == 4
    assert printed(capsys, str(path), "--app", "nobody") == []
    # Without --app, every line, the process's and the app's output among them.
    assert len(printed(capsys, str(path))) == len(every)


def test_app_never_matches_what_is_not_an_app_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.log"
    write_log(path, [{"event": "x.y", "app": ["web"]}, {"event": "x.y", "app": {"a": 1}},
                     {"event": "x.y", "app": None, "app_name": ["web"]},
                     {"event": "x.y", "app": "api", "app_name": "web"}])
    assert printed(capsys, str(path), "--app", "web") == []


def main_file(tmp_path: Path, log: str) -> Path:
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "broken.toml").write_text("[app]\ncommand = 3\n")
    main = tmp_path / "supervisor.toml"
    main.write_text(f'[supervisor]\napps = ["apps/*.toml"]\nstate_dir = "state"\n{log}')
    return main


def test_the_log_of_a_main_file_is_read_even_when_its_apps_are_broken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = main_file(tmp_path, '[log]\nfile = "logs/events.log"\n')
    (tmp_path / "logs").mkdir()
    many_apps_log(tmp_path / "logs" / "events.log")
    out = printed(capsys, "-c", str(config), "--app", "web", "--json")
    assert [json.loads(line)["event"] for line in out] == [
        "child.started", "app.config_failed", "child.exited"]
    config.write_text(config.read_text() + "colour = 1\n")
    assert main(["-c", str(config)]) == 2
    assert capsys.readouterr().err.startswith("supervisor: log.colour: ")


def test_a_main_file_without_a_log_file_names_the_main_unit(tmp_path: Path) -> None:
    config = main_file(tmp_path, "")
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "events", "-c", str(config)], cwd=tmp_path,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 2 and result.stdout == ""
    assert "journalctl -u tiny-supervisor -o cat | supervisor events --app NAME" in result.stderr
