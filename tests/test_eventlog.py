"""The event log is a public interface: valid JSON per line, RFC 3339 times, bounded fields."""

from __future__ import annotations

import io
import json
import re

from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.events import (
    BuildFailed,
    CheckRequested,
    ChildExited,
    Fetch,
    Note,
    StartChild,
    StartTimer,
    StatsRead,
)
from supervisor.drivers.eventlog import MAX_ITEMS, MAX_TEXT, EventLog, timestamp


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_transition_is_one_json_line_with_event_phases_facts_and_actions():
    stream = io.StringIO()
    log = EventLog(stream)
    actions = [StartTimer("backoff", 2.0, 7), Note("child.backing_off", {"delay": 2.0}),
               StartChild("a" * 40, "crash restart")]
    log.transition(ChildExited(pid=42, exit_code=3), "running", "backoff", actions)
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["event"] == "child.exited"
    assert (record["pid"], record["exit_code"], record["signal"]) == (42, 3, None)
    assert (record["before"], record["after"]) == ("running", "backoff")
    assert record["actions"] == [
        {"action": "start_timer", "timer": "backoff", "seconds": 2.0, "serial": 7},
        {"action": "start_child", "commit": "a" * 40, "reason": "crash restart"},
    ]  # notes get lines of their own, written by the loop
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])


def test_timestamps_are_utc_with_milliseconds():
    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1700000000.25) == "2023-11-14T22:13:20.250Z"


def test_text_format_reads_as_one_line_per_event_for_people():
    stream = io.StringIO()
    log = EventLog(stream, format="text")
    log.transition(ChildExited(pid=42, signal="SIGKILL"), "running", "running",
                   [StartChild("abc", "crash restart")])
    log.verbose = True  # `supervisor run -v`: the actions too
    log.transition(ChildExited(pid=43, signal="SIGKILL"), "running", "running",
                   [StartChild("a" * 40, "crash restart")])
    quiet, verbose = lines(stream)
    assert quiet.endswith(" child.exited running pid=42 signal=SIGKILL")
    assert "exit_code" not in quiet  # empty facts are left out for people
    assert " => start_child(commit=" + "a" * 40 in verbose


def test_text_format_shows_commits_as_people_read_them():
    stream = io.StringIO()
    EventLog(stream, format="text").write("git.fetched", {"head": "a" * 40, "upstream": "b" * 40,
                                                          "good": ["c" * 40], "word": "d" * 41})
    (line,) = lines(stream)
    assert f"head={'a' * 12} upstream={'b' * 12}" in line and "c" * 13 not in line
    assert "d" * 41 in line  # not a commit: left whole


def test_huge_fields_are_cut_so_no_line_can_grow_without_bound():
    stream = io.StringIO()
    log = EventLog(stream)
    log.transition(BuildFailed(commit="c", reason="exit code 1", tail="x" * 100_000), "building",
                   "running", [])
    log.transition(StatsRead(values={f"k{i}": "v" * 50_000 for i in range(10_000)}), "draining",
                   "draining", [])
    build, stats = (json.loads(line) for line in lines(stream))
    assert len(build["tail"]) < MAX_TEXT + 100
    assert build["tail"].startswith("[91808 earlier characters cut] xxx")
    assert len(stats["values"]) == MAX_ITEMS + 1
    assert all(len(v) < MAX_TEXT + 100 for v in stats["values"].values())
    assert len(stream.getvalue()) < 400_000


@given(st.dictionaries(st.text(), st.one_of(st.text(), st.integers(), st.none(), st.floats())))
def test_any_facts_make_exactly_one_valid_json_line(facts):
    stream = io.StringIO()
    EventLog(stream).write("stats.lines_ignored", facts)
    (line,) = lines(stream)
    assert json.loads(line)["event"] == "stats.lines_ignored"


def test_a_closed_stream_never_raises():
    stream = io.StringIO()
    stream.close()
    EventLog(stream).write("supervisor.stopped", {"pid": 1})


def test_lines_a_full_disk_lost_are_counted_in_the_next_line_that_is_written(full_disk):
    from supervisor.drivers.childlog import RotatingFile

    path = full_disk.directory / "events.log"
    stream = RotatingFile(path, 1 << 20, 1)
    stream.open()
    log = EventLog(stream)
    log.write("one", {})
    full_disk.fill()
    log.write("lost", {"text": "x" * 5000})  # more than the page the file has left
    log.write("lost too", {"text": "x" * 5000})
    full_disk.free()
    log.write("two", {})
    events = [json.loads(line) for line in path.read_text().splitlines()]
    # A short report line may still fit where the long lines did not: count them all.
    assert events[0]["event"] == "one" and events[-1]["event"] == "two"
    reports = [e for e in events[1:-1] if e["event"] == "log.lines_dropped"]
    assert len(reports) == len(events) - 2 and sum(e["count"] for e in reports) == 2
    assert all(e["error"] == "No space left on device" for e in reports)


# ---------------------------------------------------------------------------------------------
# Under pressure: repeats, and a log file deleted or moved away


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_identical_lines_collapse_into_one_summary_line():
    stream, clock = io.StringIO(), Clock()
    log = EventLog(stream, clock=clock)
    log.write("supervisor.started", {"pid": 1})
    for _ in range(100_000):
        clock.now += 0.00001
        log.transition(CheckRequested(), "running", "running", [Fetch()])
    log.write("git.fetched", {"upstream": "abc"})
    events = [json.loads(line) for line in lines(stream)]
    assert [e["event"] for e in events] == ["supervisor.started", "git.check_requested",
                                            "log.repeated", "git.fetched"]
    summary = events[2]
    assert (summary["of"], summary["count"]) == ("git.check_requested", 99_999)
    assert summary["first"] < summary["last"]


def test_lines_that_differ_in_any_field_are_all_written():
    stream = io.StringIO()
    log = EventLog(stream)
    for pid in (1, 1, 2, 1):
        log.write("child.output", {"pid": pid, "line": "same"})
    log.context = {"deploy": "x.1"}
    log.write("child.output", {"pid": 1, "line": "same"})
    assert [json.loads(line).get("pid") for line in lines(stream)] == [1, None, 2, 1, 1]
    assert json.loads(lines(stream)[1]) | {"ts": ""} == {
        "ts": "", "event": "log.repeated", "of": "child.output", "count": 1,
        "first": json.loads(lines(stream)[1])["first"],
        "last": json.loads(lines(stream)[1])["last"]}


def test_a_flood_that_never_ends_is_summed_up_every_ten_seconds():
    stream, clock = io.StringIO(), Clock()
    log = EventLog(stream, clock=clock)
    for _ in range(2500):  # 25 s of a line every 10 ms
        clock.now += 0.01
        log.write("git.check_requested", {})
    events = [json.loads(line)["event"] for line in lines(stream)]
    assert events == ["git.check_requested", "log.repeated", "log.repeated"]
    counts = [json.loads(line)["count"] for line in lines(stream)[1:]]
    assert all(1000 <= count <= 1002 for count in counts), counts  # 10 s, give or take a tick
    log.flush_repeats()
    assert sum(json.loads(line)["count"] for line in lines(stream)[1:]) == 2499


def test_a_deleted_log_file_is_created_again_and_says_so(tmp_path):
    from supervisor.drivers.childlog import RotatingFile

    path = tmp_path / "events.log"
    log = EventLog(RotatingFile(path, 1 << 20, 2))
    log.write("supervisor.started", {})
    path.unlink()
    log.write("git.fetched", {})
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["log.reopened", "git.fetched"]
    assert (events[0]["path"], events[0]["reason"]) == (str(path), "deleted")


def test_a_log_file_moved_away_by_logrotate_is_followed_to_the_new_one(tmp_path):
    """logrotate's default: rename the file, create an empty one in its place (`create`)."""
    from supervisor.drivers.childlog import RotatingFile

    path = tmp_path / "events.log"
    log = EventLog(RotatingFile(path, 1 << 20, 2))
    log.write("supervisor.started", {})
    path.rename(tmp_path / "events.log-20261206")
    path.touch()
    log.write("git.fetched", {})
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == [
        "log.reopened", "git.fetched"]
    assert [json.loads(line)["event"] for line in
            (tmp_path / "events.log-20261206").read_text().splitlines()] == ["supervisor.started"]
