"""The vocabulary between drivers and the machine: events are facts drivers report (past tense
or nouns), actions are what the machine asks the loop to do (imperatives). Frozen values only:
equality and repr come free, and `name` is the dotted name the event log uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

# "unknown": release mode does not compare upstream with the repository's own HEAD.
Relation = Literal["same", "behind", "ahead", "diverged", "unknown"]


# ---------------------------------------------------------------------------------------------
# Events: facts reported by drivers. `name` is the dotted name used in the event log.


@dataclass(frozen=True, slots=True)
class Event:
    name: ClassVar[str] = "event"


@dataclass(frozen=True, slots=True)
class FetchSucceeded(Event):
    name: ClassVar[str] = "git.fetched"
    head: str
    upstream: str
    relation: Relation
    dirty: bool = False


@dataclass(frozen=True, slots=True)
class FetchFailed(Event):
    name: ClassVar[str] = "git.fetch_failed"
    error: str
    head: str | None = None


@dataclass(frozen=True, slots=True)
class CheckRequested(Event):
    name: ClassVar[str] = "git.check_requested"


@dataclass(frozen=True, slots=True)
class TreeUpdated(Event):
    name: ClassVar[str] = "git.tree_updated"
    commit: str


@dataclass(frozen=True, slots=True)
class TreeUpdateFailed(Event):
    name: ClassVar[str] = "git.tree_update_failed"
    commit: str
    error: str


@dataclass(frozen=True, slots=True)
class BuildSucceeded(Event):
    name: ClassVar[str] = "build.succeeded"
    commit: str
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class BuildFailed(Event):
    name: ClassVar[str] = "build.failed"
    commit: str
    reason: str
    exit_code: int | None = None
    duration: float = 0.0
    tail: str = ""


@dataclass(frozen=True, slots=True)
class ChildStarted(Event):
    name: ClassVar[str] = "child.started"
    pid: int
    commit: str | None = None


@dataclass(frozen=True, slots=True)
class ChildStartFailed(Event):
    name: ClassVar[str] = "child.start_failed"
    error: str


@dataclass(frozen=True, slots=True)
class ChildExited(Event):
    name: ClassVar[str] = "child.exited"
    pid: int
    exit_code: int | None = None
    signal: str | None = None
    tail: str = ""  # its last output lines, when the supervisor captures them


@dataclass(frozen=True, slots=True)
class HealthPassed(Event):
    """The child's health probe answered: connected, 2xx, exit 0 or READY=1."""

    name: ClassVar[str] = "health.probe_passed"
    pid: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HealthProbeFailed(Event):
    """A probe failed; reported when the reason changes, not on every try."""

    name: ClassVar[str] = "health.probe_failed"
    pid: int
    error: str


@dataclass(frozen=True, slots=True)
class StatsRead(Event):
    """The stats file as last read; `values` is None while it is missing or unreadable."""

    name: ClassVar[str] = "stats.read"
    values: dict[str, str] | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class TimerFired(Event):
    name: ClassVar[str] = "timer.fired"
    timer: str
    serial: int


@dataclass(frozen=True, slots=True)
class StopRequested(Event):
    name: ClassVar[str] = "supervisor.stop_requested"
    signal: str = "SIGTERM"


@dataclass(frozen=True, slots=True)
class RestartRequested(Event):
    """`supervisor restart`: drain and restart the current release."""

    name: ClassVar[str] = "control.restart"


@dataclass(frozen=True, slots=True)
class StopChildRequested(Event):
    """`supervisor stop-child`: stop the app and keep it stopped until start-child."""

    name: ClassVar[str] = "control.stop_child"


@dataclass(frozen=True, slots=True)
class StartChildRequested(Event):
    name: ClassVar[str] = "control.start_child"


@dataclass(frozen=True, slots=True)
class OverlapChecked(Event):
    """Whether a second generation of the app fits in memory beside the first: MemAvailable
    against the running one's resident memory (bytes; None where unknown)."""

    name: ClassVar[str] = "restart.overlap_checked"
    fits: bool
    available: int | None = None
    needed: int | None = None


@dataclass(frozen=True, slots=True)
class RollbackRequested(Event):
    """`supervisor rollback`: back to the previous good release; hold the live one."""

    name: ClassVar[str] = "control.rollback"


@dataclass(frozen=True, slots=True)
class SettingsChanged(Event):
    """SIGHUP re-read the config; `settings` are the machine's new Settings."""

    name: ClassVar[str] = "config.reloaded"
    settings: object
    applied: tuple[str, ...] = ()  # keys whose new values are in use from now on
    not_applied: tuple[str, ...] = ()  # keys that only a restart of the supervisor changes


EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        FetchSucceeded, FetchFailed, CheckRequested, TreeUpdated, TreeUpdateFailed,
        BuildSucceeded, BuildFailed, ChildStarted, ChildStartFailed, ChildExited, StatsRead,
        TimerFired, StopRequested, RestartRequested, StopChildRequested, StartChildRequested,
        SettingsChanged, HealthPassed, HealthProbeFailed, RollbackRequested, OverlapChecked,
    )
}


# ---------------------------------------------------------------------------------------------
# Actions: what the loop must do. `name` is how the log shows them.


@dataclass(frozen=True, slots=True)
class Action:
    name: ClassVar[str] = "action"


@dataclass(frozen=True, slots=True)
class Fetch(Action):
    name: ClassVar[str] = "fetch"


@dataclass(frozen=True, slots=True)
class UpdateTree(Action):
    name: ClassVar[str] = "update_tree"
    commit: str
    reset: bool = False


@dataclass(frozen=True, slots=True)
class StartBuild(Action):
    name: ClassVar[str] = "start_build"
    commit: str


@dataclass(frozen=True, slots=True)
class StartChild(Action):
    name: ClassVar[str] = "start_child"
    commit: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class StopChild(Action):
    name: ClassVar[str] = "stop_child"
    pid: int
    reason: str


@dataclass(frozen=True, slots=True)
class KillChild(Action):
    name: ClassVar[str] = "kill_child"
    pid: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProbeHealth(Action):
    """Probe the child until it passes (HealthPassed) or StopProbe."""

    name: ClassVar[str] = "probe_health"
    pid: int


@dataclass(frozen=True, slots=True)
class StopProbe(Action):
    name: ClassVar[str] = "stop_probe"


@dataclass(frozen=True, slots=True)
class CheckOverlap(Action):
    """Answered at once with OverlapChecked: may a second generation start beside `pid`?"""

    name: ClassVar[str] = "check_overlap"
    pid: int


@dataclass(frozen=True, slots=True)
class SwitchRelease(Action):
    """Point `current` at `commit` without starting anything: the generation that kept serving
    through a failed overlap is live again."""

    name: ClassVar[str] = "switch_release"
    commit: str


@dataclass(frozen=True, slots=True)
class SetAside(Action):
    """Release mode: move a failed release out of releases/ into failed/, for inspection."""

    name: ClassVar[str] = "set_aside"
    commit: str


@dataclass(frozen=True, slots=True)
class WatchStats(Action):
    name: ClassVar[str] = "watch_stats"


@dataclass(frozen=True, slots=True)
class UnwatchStats(Action):
    name: ClassVar[str] = "unwatch_stats"


@dataclass(frozen=True, slots=True)
class StartTimer(Action):
    name: ClassVar[str] = "start_timer"
    timer: str
    seconds: float
    serial: int


@dataclass(frozen=True, slots=True)
class CancelTimer(Action):
    name: ClassVar[str] = "cancel_timer"
    timer: str


@dataclass(frozen=True, slots=True)
class Note(Action):
    """A decision worth its own line in the event log (e.g. `drain.timed_out`)."""

    name: ClassVar[str] = "note"
    event: str
    facts: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Exit(Action):
    name: ClassVar[str] = "exit"
    code: int = 0


def event_from_record(record: dict[str, object]) -> Event | None:
    """The event of one transition line of the JSON log, or None for any other line. With
    `decide`, this turns a production log back into a unit test."""
    cls = EVENT_TYPES.get(str(record.get("event")))
    if cls is None or "before" not in record:
        return None
    return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
