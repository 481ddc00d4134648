"""docs/events.md documents the log's public interface, so it must name every event the code can
write and nothing the code no longer writes. Event names are collected from the code itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from supervisor import events

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "events.md"
NAME = r'"([a-z_]+\.[a-z_]+)"'
# Note("drain.satisfied", ...), log.write("supervisor.started", ...), self.log("build.output",
# ...), report("child.stale_found", ...), and a writer handed over with its name as an argument:
# add_signal_handler(SIGHUP, self.log.write, "supervisor.sighup_ignored", ...).
WRITES = re.compile(r'\b(?:Note|write|log|report)\(\s*' + NAME + r'|\.write,\s*' + NAME)


def logged_names() -> set[str]:
    names = set()
    for path in sorted((ROOT / "supervisor").glob("*.py")):
        for match in WRITES.finditer(path.read_text()):
            names.add(match.group(1) or match.group(2))
    return names


def event_class_names() -> set[str]:
    return {cls.name for cls in vars(events).values()
            if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event}


def action_names() -> set[str]:
    return {cls.name for cls in vars(events).values()
            if isinstance(cls, type) and issubclass(cls, events.Action)
            and cls not in (events.Action, events.Note)}  # notes are lines of their own


def documented_headings() -> set[str]:
    return set(re.findall(r"^#### `([a-z_.]+)`$", DOC.read_text(), re.MULTILINE))


def test_the_collector_sees_every_way_the_code_writes_a_line() -> None:
    found = logged_names()
    for name in ("drain.satisfied", "supervisor.started", "build.output", "child.stale_found",
                 "supervisor.sighup_ignored", "stats.lines_ignored", "event.ignored"):
        assert name in found


def test_every_event_class_is_registered() -> None:
    assert event_class_names() == set(events.EVENT_TYPES)


def test_every_event_the_code_writes_is_documented() -> None:
    documented = documented_headings()
    missing = sorted((event_class_names() | logged_names()) - documented)
    assert missing == [], f"add these to docs/events.md: {missing}"


def test_every_documented_event_still_exists() -> None:
    stale = sorted(documented_headings() - (event_class_names() | logged_names()))
    assert stale == [], f"docs/events.md names events the code no longer writes: {stale}"


def test_every_action_is_documented() -> None:
    text = DOC.read_text()
    missing = sorted(name for name in action_names() if f"| `{name}` |" not in text)
    assert missing == [], f"add these actions to docs/events.md: {missing}"


def test_every_phase_is_documented() -> None:
    from supervisor.machine import Phase

    text = DOC.read_text()
    assert [p.value for p in Phase if f"| `{p.value}` |" not in text] == []
