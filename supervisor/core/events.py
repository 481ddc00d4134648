"""The vocabulary between drivers and the machine: events are facts drivers report (past tense
or nouns), actions are what the machine asks the loop to do (imperatives). Frozen values only:
equality and repr come free, and `name` is the dotted name the event log uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import ClassVar, Literal

from supervisor.core.settings import Settings

# "unknown": release mode does not compare upstream with the repository's own HEAD.
Relation = Literal["same", "behind", "ahead", "diverged", "unknown"]


# ---------------------------------------------------------------------------------------------
# Names with meaning. Each is a StrEnum, so the log shows the plain string and code compares
# members, never literals.


class Timer(StrEnum):
    """The machine's timers; each is armed with a serial so a late fire is recognised."""

    __hash__ = str.__hash__  # ("stop", 3) and (Timer.STOP, 3) are the same armed timer

    BACKOFF = "backoff"  # the wait before a crash restart
    UPTIME = "uptime"  # a child up this long has stopped crash-looping
    STOP = "stop"  # the stop timeout of the child
    DRAIN = "drain"  # the drain timeout of a deploy
    HEALTH = "health"  # the deadline for proving health
    GRACE = "grace"  # how long a new child must stay up
    STOP_OLD = "stop_old"  # the previous generation's stop timeout, after an overlap


class StartReason(StrEnum):
    """Why a child is started: the log shows it, and the status counts some as deploys."""

    STARTUP = "startup"
    DEPLOY = "deploy"
    DEPLOY_OVERLAP = "deploy (overlap)"
    RESTART = "restart requested"
    RESTART_OVERLAP = "restart requested (overlap)"
    CRASH = "crash restart"
    START_REQUESTED = "start requested"
    ROLLBACK = "rollback"
    BACK_ON_GOOD = "deploy failed; back on the last good build"
    AS_IT_IS = "deploy failed; starting the tree as it is"

    @property
    def deploys(self) -> bool:
        """A new release starts: `supervisor status` records it as the last deploy."""
        return self in (StartReason.STARTUP, StartReason.DEPLOY, StartReason.DEPLOY_OVERLAP)


class NoteName(StrEnum):
    """Decisions the machine reports with a line of their own (docs/events.md has each)."""

    CHILD_BACKING_OFF = "child.backing_off"
    CHILD_CRASH_LOOPING = "child.crash_looping"
    CHILD_EXITED_DURING_DEPLOY = "child.exited_during_deploy"
    CHILD_NOTHING_TO_RUN = "child.nothing_to_run"
    CHILD_RESTARTING = "child.restarting"
    CHILD_START_FAILED_DURING_DEPLOY = "child.start_failed_during_deploy"
    CONTROL_IGNORED = "control.ignored"
    DEPLOY_CANCELLED = "deploy.cancelled"
    DEPLOY_FAILED = "deploy.failed"
    DEPLOY_REVERT_FAILED = "deploy.revert_failed"
    DEPLOY_REVERTED = "deploy.reverted"
    DEPLOY_REVERTING = "deploy.reverting"
    DEPLOY_SKIPPED = "deploy.skipped"
    DEPLOY_STARTED = "deploy.started"
    DEPLOY_SUPERSEDED = "deploy.superseded"
    DEPLOY_WAITING_FOR_DRAIN = "deploy.waiting_for_drain"
    DRAIN_CHILD_EXITED = "drain.child_exited"
    DRAIN_SATISFIED = "drain.satisfied"
    DRAIN_TIMED_OUT = "drain.timed_out"
    EVENT_IGNORED = "event.ignored"
    FLEET_CLEARED = "fleet.deploy.cleared"
    FLEET_COMMIT_HELD = "fleet.commit_held"
    FLEET_DEPLOY_WAITING = "fleet.deploy.waiting"
    GIT_DIRTY = "git.dirty"
    GIT_DIVERGED = "git.diverged"
    HEALTH_FAILED = "health.failed"
    HEALTH_PASSED = "health.passed"
    RELEASE_ROLLBACK_REQUESTED = "release.rollback_requested"
    RELEASE_ROLLBACK_RESUMED = "release.rollback_resumed"
    RELEASE_ROLLING_BACK = "release.rolling_back"
    RESTART_OVERLAP_FALLBACK = "restart.overlap_fallback"


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
    timer: Timer
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
    """What the box has for a second generation beside the first: the memory available and
    the running one's resident memory (bytes; None where unknown). The machine decides."""

    name: ClassVar[str] = "restart.overlap_checked"
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
    settings: Settings
    applied: tuple[str, ...] = ()  # keys whose new values are in use from now on
    not_applied: tuple[str, ...] = ()  # keys that only a restart of the supervisor changes


# Fleet mode (issue 15): etcd says *when* a box may take its app down and which commits the
# group holds; git and the build still say *what* runs. The fleet agent (a driver) reports:


@dataclass(frozen=True, slots=True)
class FleetCleared(Event):
    """This box may deploy `commit`: it is one of the group's canaries for it, the commit was
    proven healthy on a canary, or etcd was out of reach longer than `fleet.solo_after`."""

    name: ClassVar[str] = "fleet.cleared"
    commit: str
    why: str = "proven"  # "canary" | "proven" | "solo"


@dataclass(frozen=True, slots=True)
class FleetHeld(Event):
    """A box of the group failed `commit` (its build, health gate, a rollback): held here too."""

    name: ClassVar[str] = "fleet.held"
    commit: str
    box: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SlotGranted(Event):
    """One of the group's `max_parallel` slots is ours: the app may be taken down for `commit`."""

    name: ClassVar[str] = "fleet.slot_granted"
    commit: str
    slot: int | None = None  # None: granted alone, etcd out of reach past `fleet.solo_after`


EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        FetchSucceeded, FetchFailed, CheckRequested, TreeUpdated, TreeUpdateFailed,
        BuildSucceeded, BuildFailed, ChildStarted, ChildStartFailed, ChildExited, StatsRead,
        TimerFired, StopRequested, RestartRequested, StopChildRequested, StartChildRequested,
        SettingsChanged, HealthPassed, HealthProbeFailed, RollbackRequested, OverlapChecked,
        FleetCleared, FleetHeld, SlotGranted,
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
    """Bring the tree (in place) or releases/<commit> (release mode) to `commit`. `reuse`: a
    release of it already on disk is whole and proven or live, so it is used as it is."""

    name: ClassVar[str] = "update_tree"
    commit: str
    reset: bool = False
    reuse: bool = False


@dataclass(frozen=True, slots=True)
class StartBuild(Action):
    name: ClassVar[str] = "start_build"
    commit: str


@dataclass(frozen=True, slots=True)
class StartChild(Action):
    name: ClassVar[str] = "start_child"
    commit: str | None
    reason: StartReason


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
    timer: Timer
    seconds: float
    serial: int


@dataclass(frozen=True, slots=True)
class CancelTimer(Action):
    name: ClassVar[str] = "cancel_timer"
    timer: Timer


@dataclass(frozen=True, slots=True)
class Note(Action):
    """A decision worth its own line in the event log (e.g. `drain.timed_out`)."""

    name: ClassVar[str] = "note"
    event: NoteName
    facts: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SaveState(Action):
    """Make the commits not to deploy again (`failed`, the newest; `held`, older ones) and the
    good releases durable, so a restarted supervisor decides as this one would have."""

    name: ClassVar[str] = "save_state"
    failed: str | None
    held: tuple[str, ...]
    good: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PruneReleases(Action):
    """Release mode: delete kept releases other than these (the good ones and those in use)."""

    name: ClassVar[str] = "prune_releases"
    keep: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AwaitFleet(Action):
    """Fleet mode: tell me (FleetCleared or FleetHeld) when this box may deploy `commit`; None:
    no commit waits any more."""

    name: ClassVar[str] = "await_fleet"
    commit: str | None


@dataclass(frozen=True, slots=True)
class AcquireSlot(Action):
    """Fleet mode: take one of the group's slots (answered by SlotGranted, perhaps much later)."""

    name: ClassVar[str] = "acquire_slot"
    commit: str


@dataclass(frozen=True, slots=True)
class ReleaseSlot(Action):
    """Fleet mode: give back the slot held or asked for (nothing, if neither); with `commit`,
    only one held or asked for that commit (a grant that came too late)."""

    name: ClassVar[str] = "release_slot"
    commit: str | None = None


@dataclass(frozen=True, slots=True)
class ReportFleet(Action):
    """Fleet mode: what `commit` did here. Healthy: proven for the group (the canaries' word
    the others wait for). Not healthy: held for the whole group."""

    name: ClassVar[str] = "report_fleet"
    commit: str
    healthy: bool
    reason: str = ""


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
