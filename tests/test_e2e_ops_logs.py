"""End to end: logs that stay small and stay readable. A child that writes 50 MB cannot take its
own log file, or the event log, past (keep + 1) * max_bytes; every line stays one JSON object;
each deploy attempt carries one correlation id; `supervisor events` reads the real log.file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MIB = 1 << 20
KEEP = 3
LINES = 50 * MIB // 1000  # 50 MB in lines of 1000 bytes
DONE = "all written"
# Numbered lines, so that what the rotated files kept can be checked for gaps; then a last line,
# and the child stays up (an exit would start it, and its 50 MB, again).
CHATTY = f"""
import sys, time
out, filler = sys.stdout, "x" * 991
for number in range({LINES}):
    out.write(f"{{number:08d}} {{filler}}\\n")
out.write("{DONE}\\n")
out.flush()
time.sleep(3600)
"""


def log_files(path: Path) -> list[Path]:
    """path.N ... path.1, path: the oldest first."""
    rotated = sorted((p for p in path.parent.glob(path.name + ".*")
                      if p.name[len(path.name) + 1:].isdigit()),
                     key=lambda p: -int(p.name[len(path.name) + 1:]))
    return [*rotated, path] if path.exists() else rotated


def last_line(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, 2) - 4096))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def check_capped(path: Path) -> list[dict]:
    """The files of a rotating log: within the cap, each line whole JSON; returns the records."""
    files = log_files(path)
    assert [f.name for f in files] == [f"{path.name}.{n}" for n in range(KEEP, 0, -1)] + [
        path.name], "expected exactly KEEP rotated copies after 50 MB"
    sizes = [f.stat().st_size for f in files]
    assert all(size <= MIB for size in sizes), sizes
    assert sum(sizes) <= (KEEP + 1) * MIB + 8192, sizes
    assert sum(sizes) > KEEP * MIB, f"rotation threw away more than it had to: {sizes}"
    records = []
    for file in files:
        data = file.read_bytes()
        assert data.endswith(b"\n"), f"{file.name} ends in half a line"
        for number, line in enumerate(data.split(b"\n")[:-1]):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{file.name} line {number + 1}: {line[:200]!r}") from None
    return records


def check_numbered(lines: list[str]) -> None:
    """The kept lines are the newest ones, in order, none missing."""
    assert lines[-1] == DONE
    numbers = [int(line[:8]) for line in lines[:-1]]
    assert numbers == list(range(numbers[0], LINES)), "lines lost or reordered"
    assert all(line.endswith("x" * 991) for line in lines[:-1])


def test_child_output_in_its_own_file_rotates_under_the_cap(world):
    child_log = world.state_dir / "child.log"
    supervisor = world.start(app={"command": [sys.executable, "-c", CHATTY]}, drain=None,
                             git={"poll_interval": "1h"},
                             log={"child": "file", "max_bytes": "1MiB", "keep": KEEP,
                                  "child_rate_limit_burst": 0})  # rotation, not the limit
    started = supervisor.wait_for("child.started")
    world.wait_until(lambda: DONE in last_line(child_log), 30,
                     "the child's last line in child.log", supervisor.tail)

    records = check_capped(child_log)
    assert all(set(r) == {"ts", "stream", "pid", "line"} for r in records)
    assert {(r["stream"], r["pid"]) for r in records} == {("stdout", started["pid"])}
    check_numbered([r["line"] for r in records])
    assert not supervisor.select("child.output"), "log.child = file also wrote to the event log"
    assert not supervisor.select("child.output_dropped")
    assert supervisor.select("child.started") == [started], "the child was restarted"
    assert world.alive(started["pid"])


def test_child_output_in_the_event_log_rotates_under_the_cap(world):
    event_log = world.tmp / "events.log"
    supervisor = world.start(app={"command": [sys.executable, "-c", CHATTY]}, drain=None,
                             git={"poll_interval": "1h"}, log_file=event_log,
                             log={"file": str(event_log), "child": "events",
                                  "max_bytes": "1MiB", "keep": KEEP,
                                  "child_rate_limit_burst": 0})
    started = supervisor.wait_for("child.started")
    supervisor.wait_for("child.output", line=DONE, timeout=30)

    records = check_capped(event_log)
    output = [r for r in records if r["event"] == "child.output"]
    assert {(r["stream"], r["pid"]) for r in output} == {("stdout", started["pid"])}
    check_numbered([r["line"] for r in output])
    assert not world.cli("status").returncode  # the supervisor still runs and answers
    assert supervisor.proc.poll() is None and world.alive(started["pid"])


def test_one_correlation_id_per_deploy_attempt(world):
    supervisor, _ = world.start_serving()
    first = supervisor.select("child.started")[0]
    supervisor.wait_for("child.output", pid=first["pid"])  # its "listening" line

    ids = []
    for version in ("2", "3"):
        mark = supervisor.mark()
        commit = world.release(version)
        fetched = supervisor.wait_for("git.fetched", after=mark, upstream=commit,
                                      relation="behind")
        started = supervisor.wait_for("child.started", after=fetched, commit=commit)
        # The new child's first line comes after the deploy: it carries no id.
        after = supervisor.wait_for("child.output", pid=started["pid"], after=started)
        assert "deploy" not in after, after
        idle = supervisor.wait_for("git.fetched", after=started, relation="same")
        assert "deploy" not in idle, idle

        attempt = supervisor.select(after=fetched["_i"])[:started["_i"] - fetched["_i"] + 1]
        names = {r["event"] for r in attempt}
        assert {"deploy.waiting_for_drain", "drain.satisfied", "deploy.started",
                "git.tree_updated", "build.started", "build.output", "build.succeeded",
                "child.exited", "child.started"} <= names, names
        assert {r.get("deploy") for r in attempt} == {fetched["deploy"]}, [
            (r["event"], r.get("deploy")) for r in attempt if r.get("deploy") != fetched["deploy"]]
        before = supervisor.select(after=mark)[:fetched["_i"] - mark]
        assert all("deploy" not in r for r in before), before
        ids.append(fetched["deploy"])

    startup = first["deploy"]  # the first build at start-up was a deploy attempt too
    assert len({startup, *ids}) == 3, (startup, ids)
    run_ids = {i.split(".")[0] for i in (startup, *ids)}
    assert len(run_ids) == 1, "one supervisor run, one prefix"
    assert all(re.fullmatch(r"[0-9a-f]{6}\.\d+", i) for i in (startup, *ids))


def test_supervisor_events_prints_the_real_log_file_for_people_and_for_jq(world):
    event_log = world.tmp / "events.log"
    supervisor, pid = world.start_serving(log_file=event_log, log={"file": str(event_log)})
    commit = world.release("2")
    new = supervisor.wait_for("child.started", commit=commit)
    world.wait_http("hello from 2", supervisor)
    assert supervisor.stop() == 0
    file_lines = event_log.read_text().splitlines()
    records = [json.loads(line) for line in file_lines]
    assert records[-1]["event"] == "supervisor.stopped"

    people = world.cli("events")
    assert people.returncode == 0 and people.stderr == ""
    lines = people.stdout.splitlines()
    assert len(lines) == len(records)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    for line, record in zip(lines, records, strict=True):
        assert re.match(rf"{stamp} {re.escape(record['event'])}( |$)", line), line
    assert "\x1b" not in people.stdout, "colours on a pipe"
    started = lines[records.index(next(r for r in records if r.get("pid") == new["pid"]
                                       and r["event"] == "child.started"))]
    assert f"pid={new['pid']}" in started and f"commit={commit[:12]}" in started
    assert commit not in started, "commits are shortened for people"
    output = next(line for line in lines if " child.output " in line)
    assert re.search(rf"child\.output pid={pid} stderr: example app 1 listening on port "
                     rf"{world.port}", output), output

    only_child = world.cli("events", "--event", "child.*")
    assert only_child.returncode == 0
    child_lines = only_child.stdout.splitlines()
    assert child_lines == [line for line, r in zip(lines, records, strict=True)
                           if r["event"].startswith("child.")]
    assert {line.split(" ")[2] for line in child_lines} == {
        "child.started", "child.output", "child.exited"}

    as_json = world.cli("events", "--json")
    assert as_json.returncode == 0
    assert as_json.stdout.splitlines() == file_lines, "--json must pass lines through unchanged"
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == records
    both = world.cli("events", "--json", "--event", "child.*", "--event", "build.*")
    assert [json.loads(line)["event"].split(".")[0] for line in both.stdout.splitlines()] == [
        r["event"].split(".")[0] for r in records if r["event"].startswith(("child.", "build."))]
