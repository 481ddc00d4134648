"""docs/events.md documents the log's public interface, so it must name every event the code can
write and nothing the code no longer writes. Event names are collected from the code itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from supervisor.core import events

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "events.md"
EVENT_NAME = re.compile(r"[a-z_]+\.[a-z_]+")
# The callables that write a line: Note("drain.satisfied", ...) in machine.py;
# log.write("supervisor.started", ...) in service.py; the writer handed to a driver, called as
# self.log("build.output", ...) (build.py, childlog.py, trigger.py) or report("child.stale_found",
# ...) (child.py); and EventLog's own self.write(...) in eventlog.py.
WRITERS = {"Note", "log", "report"}
# Writer calls whose name is not a literal: each passes on names that are collected elsewhere.
PASSED_ON = {
    ("eventlog.py", "self.write(event.name, ...)"),  # transition lines: the Event classes
    ("service.py", "self.log.write(name, ...)"),  # a Note's line: the Note(...) calls
    ("host.py", "self.log.write(event, ...)"),  # an app's view of the log: names written by it
}


def _is_writer(module: str, func: ast.expr) -> bool:
    """`func` writes a line: Note, log or report by any receiver, or `write` of a log
    (`self.log.write`, `log.write`) or of the EventLog itself (`self.write` in eventlog.py).
    Other writes (`file.write`, `os.write`) are not log lines."""
    if isinstance(func, ast.Name):
        return func.id in WRITERS
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr in WRITERS:
        return True
    receiver = ast.unparse(func.value)
    return func.attr == "write" and (receiver.endswith("log") or (
        module == "eventlog.py" and receiver == "self"))


def _literal_name(node: ast.expr | None) -> str | None:
    """A name written out ("x.y") or a member of the machine's NoteName (NoteName.X_Y)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if EVENT_NAME.fullmatch(node.value) else None
    if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "NoteName":
        return events.NoteName[node.attr].value
    return None


def writes_in(module: str, source: str) -> tuple[set[str], set[tuple[str, str]]]:
    """(event names written with a literal name, writer calls whose name is computed).

    Seen: a writer called with the name first (or as Note's `event=`), and a writer handed to
    another callable together with a literal name (`add_signal_handler(SIGHUP, self.log.write,
    "x.y", ...)`, `partial(log, "x.y")`). Strings that are merely compared
    (`case Note(event="x.y")`) are no writes and are not collected."""
    names: set[str] = set()
    computed: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(source, module)):
        if not isinstance(node, ast.Call):
            continue
        if _is_writer(module, node.func):
            first = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "event"), None)
            name = _literal_name(first)
            if name is not None:
                names.add(name)
            elif first is not None:
                call = f"{ast.unparse(node.func)}({ast.unparse(first)}, ...)"
                computed.add((module, call))
        for writer, name_node in zip(node.args, node.args[1:], strict=False):
            name = _literal_name(name_node)
            if name is not None and _is_writer(module, writer):
                names.add(name)
    return names, computed


def writes() -> tuple[set[str], set[tuple[str, str]]]:
    names: set[str] = set()
    computed: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        found, passed_on = writes_in(path.name, path.read_text())
        names |= found
        computed |= passed_on
    return names, computed


def logged_names() -> set[str]:
    return writes()[0]


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
    for name in ("drain.satisfied", "control.ignored",  # Note(...)
                 "supervisor.started", "config.reload_failed", "status.write_failed",  # .write(
                 "build.output", "child.output", "trigger.rejected",  # self.log(...)
                 "child.stale_found"):  # report(...)
        assert name in found, name
    assert "supervisor.sighup_ignored" not in found  # no longer written: SIGHUP reloads


def test_every_computed_name_is_passed_on_from_a_collected_write() -> None:
    """A writer called with a name the collector cannot read would hide an event from it."""
    assert writes()[1] == PASSED_ON


WRITER_TYPE = re.compile(r"Log|Callable\[\[str, dict\[str, \w+\]\], None\]")


def test_every_writer_handed_to_a_driver_has_a_name_the_collector_knows() -> None:
    """A driver gets the log's writer as a parameter (`log`, `report`); one named otherwise
    (`emit("x.y", ...)`) would write lines the collector never sees."""
    names = []
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.arg) and node.annotation is not None and \
                    WRITER_TYPE.fullmatch(ast.unparse(node.annotation)):
                names.append((path.name, node.arg))
    assert {"build.py", "child.py", "childlog.py", "trigger.py"} <= {m for m, _ in names}
    assert [(module, name) for module, name in names if name not in WRITERS] == []


def test_the_collector_reads_each_form_and_nothing_else() -> None:
    source = """
loop.add_signal_handler(signal.SIGHUP, self.log.write, "a.handed_over", {})
loop.call_soon(functools.partial(report, "b.partial", {}))
actions.append(Note(event="c.keyword", facts={}))
self.log("d.driver", {})
file.write("e.not_a_log_line")
os.write(fd, "f.not_a_log_line")
match action:
    case Note(event="g.compared"):
        pass
self.log.write(computed, {})
"""
    names, computed = writes_in("example.py", source)
    assert names == {"a.handed_over", "b.partial", "c.keyword", "d.driver"}
    assert computed == {("example.py", "self.log.write(computed, ...)")}


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
    from supervisor.core.machine import Phase

    text = DOC.read_text()
    assert [p.value for p in Phase if f"| `{p.value}` |" not in text] == []


def documented_fields(name: str) -> set[str] | None:
    """The field names in the table under `#### \\`name\\``, or None when it has no table."""
    text = DOC.read_text()
    start = text.find(f"#### `{name}`\n")
    if start == -1:
        return None
    end = text.find("\n#### ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    return set(rows) if rows else None


def test_every_field_of_every_transition_event_is_in_its_table() -> None:
    """The field tables are checked against the code: a field added to an event class without
    a row in its table (or a row left after the field went) fails here."""
    from dataclasses import fields

    problems = []
    for name, cls in events.EVENT_TYPES.items():
        have = {f.name for f in fields(cls)} - {"settings"}  # config.reloaded: shown as a string
        documented = documented_fields(name)
        if documented is None:
            if have:
                problems.append(f"{name}: no field table for {sorted(have)}")
            continue
        missing, stale = have - documented, documented - have - COMMON_TABLE_ROWS
        if missing or stale:
            problems.append(f"{name}: missing {sorted(missing)}, no longer written {sorted(stale)}")
    assert problems == []


# Rows some event tables add beside the class's own fields: the transition line's own.
COMMON_TABLE_ROWS = {"before", "after", "actions", "settings"}
