"""The machine's state: one frozen value, with a sub-record for each thing that only some phases
have (a deploy under way, a probation, a rollback, the generation left serving in an overlap),
so that no field means something in one phase and is stale junk in another. Plus the few small
helpers every rule module shares (timers, held commits). No rules live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from supervisor.core.events import Action, CancelTimer, StartTimer, Timer
from supervisor.core.settings import Settings


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    DRAINING = "draining"
    UPDATING = "updating"
    BUILDING = "building"
    RESTARTING = "restarting"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"
    AWAITING_SLOT = "awaiting_slot"  # fleet: built and drained, waiting for a slot of the group
    HELD = "held"  # the operator stopped the app (`supervisor stop-child`)
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


# A deploy attempt is under way (the log's lines carry its id; status shows its target).
DEPLOYING = frozenset({Phase.DRAINING, Phase.UPDATING, Phase.BUILDING, Phase.RESTARTING,
                       Phase.PROBATION, Phase.ROLLING_BACK, Phase.AWAITING_SLOT})


@dataclass(frozen=True, slots=True)
class Target:
    """A commit to deploy and how the tree reaches it."""

    commit: str
    reset: bool = False  # by reset, not by fast-forward (upstream diverged or went back)


class DeployKind(StrEnum):
    DEPLOY = "deploy"  # a new commit
    RESTART = "restart"  # `supervisor restart`: the same release again, drained first
    REVERT = "revert"  # in place, after a failed build: the tree back to the last good build


@dataclass(frozen=True, slots=True)
class Deploy:
    """A deploy attempt from its start until the target runs (or the attempt ends), with how
    far its drain got."""

    target: Target
    kind: DeployKind = DeployKind.DEPLOY
    watching: bool = False  # the stats watcher runs for this deploy
    drained: bool = False  # the latest stats satisfy drain.until
    drain_expired: bool = False  # the drain timeout fired
    slot: bool = False  # fleet: a slot of the group is ours for this deploy


@dataclass(frozen=True, slots=True)
class Generation:
    """A started child: `pid` is None once it exited (its commit is still what last ran)."""

    pid: int | None
    commit: str | None


@dataclass(frozen=True, slots=True)
class Probation:
    """A new generation proving its health."""

    probe_passed: bool = False
    grace_done: bool = False
    last_error: str | None = None  # why the probe last failed


@dataclass(frozen=True, slots=True)
class Rollback:
    """A generation that failed its probation is being stopped; then `to` starts (or, with no
    good release to go back to, the crash rules apply)."""

    to: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class State:
    settings: Settings = field(default_factory=Settings)
    phase: Phase = Phase.STARTING
    generation: Generation | None = None  # the newest child started
    old: Generation | None = None  # overlap: the previous generation, still running beside it
    head: str | None = None  # in place: the tree's commit, as last seen; releases: the live one
    built: str | None = None  # last commit built successfully
    deploy: Deploy | None = None
    queued: Target | None = None  # a newer commit found while busy with the deploy
    awaiting: Target | None = None  # fleet: a commit waiting for the group's go (FleetCleared)
    cleared: str | None = None  # fleet: the commit the group last cleared this box to deploy
    refused: tuple[str, ...] = ()  # commits not deployed again until upstream moves, newest last
    good: tuple[str, ...] = ()  # release mode: releases that proved healthy, oldest first
    probation: Probation | None = None
    rollback: Rollback | None = None
    crashes: int = 0  # deaths in a row, each before the child stayed up `reset_after`
    deploys: int = 0  # deploy attempts so far: the log's correlation id of the current one
    timers: frozenset[tuple[Timer, int]] = frozenset()  # armed (name, serial)
    serial: int = 0

    # Derived views, for the status and for readable tests.
    @property
    def child(self) -> int | None:
        return self.generation.pid if self.generation else None

    @property
    def child_commit(self) -> str | None:
        return self.generation.commit if self.generation else None

    @property
    def old_child(self) -> int | None:
        return self.old.pid if self.old else None

    @property
    def target(self) -> str | None:
        return self.deploy.target.commit if self.deploy else None

    @property
    def pending(self) -> str | None:
        return self.queued.commit if self.queued else None

    @property
    def failed(self) -> str | None:
        """The commit that failed last."""
        return self.refused[-1] if self.refused else None

    @property
    def restart_requested(self) -> bool:
        return self.deploy is not None and self.deploy.kind == DeployKind.RESTART

    @property
    def draining(self) -> bool:
        return self.deploy is not None and self.deploy.watching


Decision = tuple[State, list[Action]]

HELD_KEPT = 10  # failed commits remembered besides the last one


def initial_state(settings: Settings, built: str | None = None, failed: str | None = None,
                  live: str | None = None, good: tuple[str, ...] = (),
                  held: tuple[str, ...] = ()) -> State:
    """`live` and `good` matter in release mode: the release `current` points to, and those
    known healthy. `held` are older refused commits, `failed` the newest."""
    refused = held + ((failed,) if failed else ())
    return State(settings=settings, built=built, head=live, good=good, refused=refused)


def without_child(state: State) -> State:
    """The child exited: no pid, but its commit is still what ran last."""
    if state.generation is None:
        return state
    return replace(state, generation=replace(state.generation, pid=None))


def arm(state: State, timer: Timer, seconds: float) -> Decision:
    serial = state.serial + 1
    timers = frozenset(t for t in state.timers if t[0] != timer) | {(timer, serial)}
    return replace(state, timers=timers, serial=serial), [StartTimer(timer, seconds, serial)]


def disarm(state: State, timer: Timer, cancel: bool = True) -> Decision:
    """Forget a timer; `cancel=False` when it has just fired and there is nothing to cancel."""
    armed = [t for t in state.timers if t[0] == timer]
    if not armed:
        return state, []
    state = replace(state, timers=state.timers - set(armed))
    return state, [CancelTimer(timer)] if cancel else []


def hold(state: State, commit: str | None) -> State:
    """Rule 4: `commit` is not deployed again until upstream names another one; nor is the
    commit held before it (a rollback by hand must not free a commit that failed on its own)."""
    if commit is None or commit == state.failed:
        return state
    refused = tuple(c for c in state.refused if c != commit)[-HELD_KEPT:] + (commit,)
    return replace(state, refused=refused)


def is_held(state: State, commit: str) -> bool:
    return commit in state.refused


def newest_good(state: State, other_than: str | None) -> str | None:
    """The release that proved healthy last, besides `other_than`: where a rollback goes."""
    return next((commit for commit in reversed(state.good) if commit != other_than), None)


def describe_exit(exit_code: int | None, signal: str | None) -> str:
    return f"killed by {signal}" if signal else f"exit code {exit_code}"
