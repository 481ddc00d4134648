"""The event log: one JSON object per line (or a text line for people), written as it happens.
Its event names and fields are a public interface (docs/events.md). Writing never raises:
a closed stderr must not take the supervisor down; a flood of one identical line must not
rotate the history away, so repeats become one `log.repeated` line. Lines are formed on the
loop; with a writer thread installed only the write to the stream happens there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from typing import IO, TYPE_CHECKING, Any

from supervisor.core.events import Action, Event, Note

if TYPE_CHECKING:
    from supervisor.drivers.diskwriter import DiskWriter


def timestamp(now: float | None = None) -> str:
    """RFC 3339, UTC, milliseconds."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def parse_timestamp(value: object) -> float | None:
    """Seconds since the epoch of a `ts` written by `timestamp` (or any RFC 3339 time; one
    without an offset is UTC, as the log writes), else None: log readers meet foreign lines.
    The one reader of the format, beside its writer, for the viewer, the tests and the bench."""
    if not isinstance(value, str):
        return None
    from datetime import UTC, datetime  # only readers of the log pay for datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def event_fields(item: Event | Action) -> dict[str, Any]:
    return {f.name: getattr(item, f.name) for f in fields(item)}  # type: ignore[arg-type]


def describe_action(action: Action) -> dict[str, Any]:
    return {"action": action.name, **event_fields(action)}


MAX_TEXT = 8192  # characters of one string field (a build tail, a git error)
MAX_ITEMS = 32  # entries of one mapping field (the stats values)


def bounded(value: Any) -> Any:
    """Cap a field so that a hostile stats file or a noisy build cannot make a giant line."""
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return f"[{len(value) - MAX_TEXT} earlier characters cut] " + value[-MAX_TEXT:]
    if isinstance(value, dict) and len(value) > MAX_ITEMS:
        kept = dict(list(value.items())[:MAX_ITEMS])
        kept["..."] = f"{len(value) - MAX_ITEMS} more"
        return {k: bounded(v) for k, v in kept.items()}
    if isinstance(value, dict):
        return {k: bounded(v) for k, v in value.items()}
    return value


def priority(event: str) -> int:
    """The syslog priority journald files a line under: 3 err, 4 warning, 6 info."""
    if event.endswith(("crash_looping", "crashed", "reload_failed", "revert_failed", ".error")):
        return 3
    if event.endswith(("failed", "dirty", "diverged", "timed_out", "rejected", "dropped",
                       "stale_found", "lines_ignored", "backing_off", "suppressed")):
        return 4
    return 6


# A run of identical lines is summed up at least this often (seconds), so that a flood that
# never ends still shows in the log.
REPEAT_REPORT = 10.0


class EventLog:
    def __init__(self, stream: IO[str] | None = None, format: str = "json",
                 clock: Any = time.time) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.format = format
        self.context: dict[str, Any] = {}  # added to every line, e.g. the current deploy's id
        self.priority_prefix = False  # "<N>" before each line, for journald's priority
        self.verbose = False  # the text format shows each step's actions only when asked
        self.clock = clock
        self._last: dict[str, Any] | None = None  # the last line written, without its time
        self._repeats = 0  # identical lines since, not written
        self._repeats_since = 0.0
        self._repeated_at = 0.0
        # Installed by the Host: the stream is then written (and followed after logrotate) on
        # that thread alone, so a slow pipe to journald or a slow disk never holds up the loop.
        self.writer: DiskWriter | None = None

    def write(self, event: str, facts: dict[str, Any],
              context: dict[str, Any] | None = None) -> None:
        """`context` replaces `self.context` for this line (one app's view of a shared log);
        the log's own lines (log.repeated and the like) carry `self.context`."""
        record = {"ts": None, "event": event, **(self.context if context is None else context)}
        for key, value in facts.items():
            if key in record and record[key] == value:
                continue  # the context says it already (a rollout id a fleet line names too)
            record["fact_" + key if key in record else key] = bounded(value)
        now = self.clock()
        if record == self._last:
            # Only a count: the line says nothing the previous one did not. (A SIGUSR1 flood
            # once made 25,598 lines and rotated `supervisor.started` away.)
            if not self._repeats:
                self._repeats_since = now
            self._repeats += 1
            self._repeated_at = now
            if now - self._repeats_since >= REPEAT_REPORT:
                self.flush_repeats()
            return
        self.flush_repeats()
        self._last = record
        self._emit(dict(record, ts=timestamp(now)))

    def flush_repeats(self) -> None:
        """Write the summary of identical lines not written, if any (also at shut-down)."""
        if not self._repeats or self._last is None:
            return
        count, self._repeats = self._repeats, 0
        repeated = self._last
        self.write("log.repeated", {"of": repeated["event"], "count": count,
                                    "first": timestamp(self._repeats_since),
                                    "last": timestamp(self._repeated_at)})
        self._last = repeated  # a flood that goes on still collapses after its summary

    def _emit(self, record: dict[str, Any]) -> None:
        line = self._line(record)
        if self.writer is None:
            self._put(line)
        else:
            self.writer.submit_line(lambda: self._put(line))

    def _line(self, record: dict[str, Any]) -> str:
        event = record["event"]
        line = self._json(record) if self.format == "json" else self._text(record, self.verbose)
        return f"<{priority(event)}>{line}" if self.priority_prefix else line

    def _put(self, line: str) -> None:
        """Where the stream is written: on the loop, or on the writer thread, never both. What
        only the write can learn (lines dropped, a file reopened) is told in lines of the log's
        own, formed here: they never repeat, so they need nothing of the loop's."""
        self._report_dropped()
        self._report_reopened()
        self._write_stream(line)

    def _write_stream(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere left to report it; the supervisor's job goes on

    def report(self, event: str, facts: dict[str, Any]) -> None:
        """A line of the log about its own stream, written where the stream is written (on the
        writer thread, if there is one): past the repeat check, which such lines never need."""
        self._write_stream(self._line({"ts": timestamp(self.clock()), "event": event,
                                       **self.context, **facts}))

    def _report_reopened(self) -> None:
        """`log.file` was deleted or moved away (logrotate): the new file starts by saying so."""
        follow = getattr(self.stream, "follow", None)
        if follow is None:
            return
        try:
            reason = follow()
        except OSError:
            return  # the write that follows counts the line as dropped
        if reason is None:
            return
        self.stream.reopened = None  # type: ignore[attr-defined]
        self.report("log.reopened", {"path": str(getattr(self.stream, "path", "")),
                                     "reason": reason})

    def _report_dropped(self) -> None:
        """A log file that could not be written (a full disk) counts the lines it lost; the
        first line that can be written again is preceded by how many, and why."""
        if not getattr(self.stream, "dropped", 0):
            return
        count, error = self.stream.take_dropped()  # type: ignore[union-attr]
        self.report("log.lines_dropped", {"count": count, "error": error})
        if self.stream.dropped:  # type: ignore[union-attr]  # that failed too: keep counting
            self.stream.dropped += count - 1  # type: ignore[union-attr]  # not the report

    def transition(self, event: Event, before: str, after: str, actions: list[Action],
                   context: dict[str, Any] | None = None) -> None:
        """The step's line: the event's facts, the phase before and after, the actions taken."""
        facts = event_fields(event)
        facts.update(before=str(before), after=str(after),
                     actions=[describe_action(a) for a in actions if not isinstance(a, Note)])
        self.write(event.name, facts, context)

    @staticmethod
    def _json(record: dict[str, Any]) -> str:
        # ASCII only: U+2028, U+0085 and friends count as line breaks for some readers, and one
        # record must stay one line whatever a child or a commit message contains.
        return json.dumps(record, default=str, ensure_ascii=True, separators=(",", ":"))

    @staticmethod
    def _text(record: dict[str, Any], verbose: bool = False) -> str:
        """For people: commits cut to 12 characters, the machine's actions only with -v (the
        notes that matter have lines of their own), nothing empty."""
        parts = [record.pop("ts"), record.pop("event")]
        before, after = record.pop("before", None), record.pop("after", None)
        if before is not None:
            parts.append(before if before == after else f"{before}->{after}")
        actions = record.pop("actions", None)
        for key, value in record.items():
            if value is None or value == "" or value == {}:
                continue
            value = _short(value)
            plain = isinstance(value, str) and value.isprintable() and " " not in value
            text = value if plain else json.dumps(value, default=str)
            parts.append(f"{key}={text}")
        if actions and verbose:
            parts.append("=> " + ", ".join(_action_text(a) for a in actions))
        return " ".join(str(p) for p in parts)


def _short(value: Any) -> Any:
    """A commit (40 hexadecimal digits) as people read it; anything else as it is."""
    if isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if isinstance(value, list):
        return [_short(item) for item in value]
    return value


def _action_text(action: dict[str, Any]) -> str:
    name = action.pop("action")
    args = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                     for k, v in action.items() if v is not None)
    return f"{name}({args})" if args else name
