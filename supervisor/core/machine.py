r"""Every decision the supervisor makes: `decide(state, event) -> (state, actions)`.

Theory of operation
-------------------
Drivers (git poller, child monitor, builder, stats watcher, timers, signals) report facts as
events. This module alone decides what to do about them and answers with actions that the
service loop carries out. It performs no IO, reads no clock and imports nothing that could:
time arrives only as `TimerFired` for timers it asked for, so every rule can be tested by
calling a function with plain values.

    STARTING --first fetch--> UPDATING/BUILDING (tree behind or never built) --> RUNNING
        \------------------ tree up to date and built -------------------------/
    RUNNING --newer commit--> DRAINING --drained | drain timeout | child died--> UPDATING
    UPDATING --tree at commit--> BUILDING --built--> RESTARTING --old child gone--> RUNNING
                   (drain still unmet after the build: back to DRAINING, then RESTARTING)
    UPDATING/BUILDING --failed--> RUNNING (the old child was never touched)
    RUNNING --child died--> RUNNING (first death: at once) | BACKOFF --timer--> RUNNING
    RUNNING --restart requested--> DRAINING --> RESTARTING (no update, no build) --> RUNNING
    RUNNING | BACKOFF --stop-child--> HELD (nothing restarts it) --start-child--> RUNNING
    any --StopRequested--> SHUTTING_DOWN --child gone--> STOPPED

With a health gate, every start passes through PROBATION on its way to RUNNING:

    start --> PROBATION --probe passed and up `grace`--> RUNNING (a new release becomes good)
    PROBATION --died | deadline--> [ROLLING_BACK: stop it] --> start the newest good release
                                   (release mode, a release not yet good) | crash rules (else)

In release mode (`Settings.releases`) a deploy builds beside the live release and drains only
once the build is done; `head` is the release `current` points to, and StartChild moves it:

    RUNNING --newer commit--> UPDATING (check out releases/<commit>) --> BUILDING --> DRAINING
        --> RESTARTING --> PROBATION --> RUNNING | rollback

With `Settings.overlap` (release mode, a socket we hold) the new generation starts before the
old one stops, if memory allows: RESTARTING asks (CheckOverlap) and is answered at once.

    RESTARTING --fits--> PROBATION (old_child serves too) --healthy--> RUNNING, old one stopped
                                     --unhealthy--> new one stopped, old_child is the child again
    RESTARTING --does not fit--> stop-start as usual

Rules
1. At most one child: `StartChild` is only ever issued while no child is known to run, and the
   loop answers it at once with `ChildStarted` or `ChildStartFailed`.
2. A deploy stops the child only while the latest stats satisfy `drain.until`, after the drain
   timeout fired, or when no drain is configured; a child that died needs no drain.
3. Commits coalesce: a commit found while busy replaces any older one waiting, so the newest wins.
4. A commit whose tree update or build failed is not tried again until upstream moves on.
5. Events race. An event with no rule in the current phase changes nothing and is reported as
   ignored; this module never raises on an event.
6. Only a release that never proved healthy is rolled back, and only to one that did: a good
   release that fails later is a crashing child, not a bad deploy.
7. Two children only in an overlap: `old_child` is set exactly while the previous generation
   still runs beside `child`, and no third starts while it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from supervisor.core.events import (
    Action,
    BuildFailed,
    BuildSucceeded,
    CancelTimer,
    CheckOverlap,
    CheckRequested,
    ChildExited,
    ChildStarted,
    ChildStartFailed,
    Event,
    Exit,
    Fetch,
    FetchFailed,
    FetchSucceeded,
    HealthPassed,
    HealthProbeFailed,
    KillChild,
    Note,
    OverlapChecked,
    ProbeHealth,
    RestartRequested,
    RollbackRequested,
    SetAside,
    SettingsChanged,
    StartBuild,
    StartChild,
    StartChildRequested,
    StartTimer,
    StatsRead,
    StopChild,
    StopChildRequested,
    StopProbe,
    StopRequested,
    SwitchRelease,
    TimerFired,
    TreeUpdated,
    TreeUpdateFailed,
    UnwatchStats,
    UpdateTree,
    WatchStats,
)
from supervisor.core.settings import Settings

BACKOFF_TIMER = "backoff"
UPTIME_TIMER = "uptime"
STOP_TIMER = "stop"
DRAIN_TIMER = "drain"
HEALTH_TIMER = "health"  # the deadline for proving health
GRACE_TIMER = "grace"  # how long a new child must stay up
STOP_OLD_TIMER = "stop_old"  # the previous generation's stop timeout, after an overlap


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
    HELD = "held"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class State:
    settings: Settings = field(default_factory=Settings)
    phase: Phase = Phase.STARTING
    child: int | None = None  # pid of the running child, None while none runs
    child_commit: str | None = None
    head: str | None = None  # commit checked out in the working tree, as last seen
    built: str | None = None  # last commit built successfully
    target: str | None = None  # commit being deployed (draining, updating, building, restarting)
    target_reset: bool = False  # the target needs a reset, not a fast-forward
    pending: str | None = None  # newer commit found while busy with `target`
    pending_reset: bool = False
    failed: str | None = None  # last commit whose deploy failed: not tried again
    held: tuple[str, ...] = ()  # earlier failed (or rolled back) commits, newest last: nor these
    crashes: int = 0  # deaths in a row, each before the child stayed up `reset_after`
    reverting: bool = False  # moving the tree back to `built` after a failed build
    draining: bool = False  # the stats watcher is running for the current deploy
    stats_ok: bool = False  # latest stats satisfy the drain condition
    drain_expired: bool = False  # the drain timeout fired for the current deploy
    restart_requested: bool = False  # the current target is a requested restart, not a deploy
    deploys: int = 0  # deploy attempts so far: the log's correlation id of the current one
    good: tuple[str, ...] = ()  # release mode: releases that proved healthy, oldest first
    probe_ok: bool = False  # on probation: the probe passed
    grace_done: bool = False  # on probation: the child stayed up `grace`
    probe_error: str | None = None  # on probation: why the probe last failed
    rollback_to: str | None = None  # ROLLING_BACK: the good release to start once it stopped
    unhealthy: str | None = None  # ROLLING_BACK: why the child on probation failed
    old_child: int | None = None  # overlap: the previous generation, still running
    old_commit: str | None = None  # ... and the release it runs
    timers: frozenset[tuple[str, int]] = frozenset()  # armed (name, serial)
    serial: int = 0


HELD_KEPT = 10  # failed commits remembered besides the last one


def initial_state(settings: Settings, built: str | None = None, failed: str | None = None,
                  live: str | None = None, good: tuple[str, ...] = (),
                  held: tuple[str, ...] = ()) -> State:
    """`live` and `good` matter in release mode: the release `current` points to, and those
    known healthy."""
    return State(settings=settings, built=built, failed=failed, head=live, good=good,
                 held=held)


def _hold(state: State, commit: str | None) -> State:
    """Rule 4: `commit` is not deployed again until upstream names another one; nor is the
    commit held before it (a rollback by hand must not free a commit that failed on its own)."""
    if commit is None or commit == state.failed:
        return state
    held = state.held + ((state.failed,) if state.failed else ())
    held = tuple(c for c in held if c != commit)[-HELD_KEPT:]
    return replace(state, failed=commit, held=held)


def _is_held(state: State, commit: str) -> bool:
    return commit == state.failed or commit in state.held


Decision = tuple[State, list[Action]]


def decide(state: State, event: Event) -> Decision:
    """Apply one event. The `match` below is the table of contents of every rule."""
    phase = state.phase
    match phase, event:
        case Phase.STOPPED, _:
            return _ignored(state, event)
        case _, StopRequested():
            return _on_stop_requested(state)
        case _, ChildStarted(pid=pid, commit=commit):
            return _on_child_started(state, pid, commit)
        case Phase.PROBATION, ChildStartFailed(error=error):
            return _on_probation_failed(state, "cannot start: " + error)
        case Phase.UPDATING | Phase.BUILDING, ChildStartFailed(error=error):
            # A restart of the live release during a release-mode build failed: it waits
            # for the build, which starts the new release or, if it fails, the live one.
            return state, [Note("child.start_failed_during_deploy", {"reason": error})]
        case _, ChildStartFailed(error=error):
            return _on_crash(state, error)
        case _, ChildExited(pid=pid) if pid == state.old_child and pid is not None:
            return _on_old_child_exited(state)
        case _, ChildExited(pid=pid) if pid != state.child:
            return _ignored(state, event)
        case _, TimerFired(timer=name, serial=serial) if (name, serial) not in state.timers:
            return _ignored(state, event)
        case _, TimerFired(timer="uptime"):
            return _disarm(replace(state, crashes=0), UPTIME_TIMER, cancel=False)
        case Phase.SHUTTING_DOWN, ChildExited() if state.old_child is not None:
            return replace(state, child=None), []
        case Phase.SHUTTING_DOWN, ChildExited():
            return replace(state, phase=Phase.STOPPED, child=None), [Exit(0)]
        case _, TimerFired(timer="stop_old"):
            state, _ = _disarm(state, STOP_OLD_TIMER, cancel=False)
            reason = f"did not stop within {state.settings.stop_timeout:g}s"
            return state, [KillChild(state.old_child, reason)] if state.old_child else []
        case Phase.SHUTTING_DOWN | Phase.RESTARTING | Phase.HELD | Phase.ROLLING_BACK, \
                TimerFired(timer="stop"):
            return _kill_after_stop_timeout(state)
        case Phase.SHUTTING_DOWN, _:
            return _ignored(state, event)
        case _, SettingsChanged(settings=settings) if isinstance(settings, Settings):
            return replace(state, settings=settings), []
        case _, RestartRequested():
            return _on_restart_requested(state)
        case _, StopChildRequested():
            return _on_hold_requested(state)
        case _, StartChildRequested():
            return _on_start_requested(state)
        case _, RollbackRequested():
            return _on_rollback_requested(state)
        case Phase.HELD, ChildExited():
            return _disarm(replace(state, child=None), STOP_TIMER)
        case _, CheckRequested():
            return state, [Fetch()]
        case Phase.STARTING, FetchSucceeded() | FetchFailed():
            return _reconcile_at_start(state, event)
        case _, FetchSucceeded():
            return _on_fetch(state, event)
        case _, FetchFailed():
            return state, []
        case Phase.RUNNING, ChildExited(exit_code=code, signal=sig):
            return _on_crash(replace(state, child=None), _describe_exit(code, sig))
        case Phase.PROBATION, ChildExited(exit_code=code, signal=sig, tail=tail):
            return _on_probation_failed(replace(state, child=None),
                                        "exited on probation: " + _describe_exit(code, sig), tail)
        case Phase.PROBATION, HealthPassed(pid=pid) if pid == state.child:
            return _healthy_yet(replace(state, probe_ok=True))
        case Phase.PROBATION, HealthProbeFailed(pid=pid, error=error) if pid == state.child:
            return replace(state, probe_error=error), []
        case Phase.PROBATION, TimerFired(timer="grace"):
            state, _ = _disarm(replace(state, grace_done=True), GRACE_TIMER, cancel=False)
            return _healthy_yet(state)
        case Phase.PROBATION, TimerFired(timer="health"):
            state, _ = _disarm(state, HEALTH_TIMER, cancel=False)
            reason = f"not healthy within {state.settings.health_timeout:g}s"
            if state.probe_error:
                reason += f" (last probe: {state.probe_error})"
            return _on_probation_failed(state, reason)
        case Phase.RESTARTING, OverlapChecked(fits=fits, available=available, needed=needed):
            return _on_overlap_checked(state, fits, available, needed)
        case Phase.ROLLING_BACK, ChildExited(tail=tail):
            return _after_unhealthy_stopped(replace(state, child=None), tail)
        case Phase.BACKOFF, TimerFired(timer="backoff"):
            state, _ = _disarm(state, BACKOFF_TIMER, cancel=False)
            return _start_child(state, state.head, "crash restart")
        case Phase.DRAINING, StatsRead(values=values):
            return _on_stats(state, values)
        case Phase.UPDATING | Phase.BUILDING, StatsRead(values=values) if state.draining:
            return replace(state, stats_ok=_satisfied(state, values)), []
        case Phase.DRAINING | Phase.UPDATING | Phase.BUILDING, TimerFired(timer="drain"):
            return _on_drain_timeout(state)
        case Phase.DRAINING, ChildExited(exit_code=code, signal=sig):
            state = replace(state, child=None)
            notes = [Note("drain.child_exited", {"reason": _describe_exit(code, sig)})]
            state, actions = _end_drain(state)
            return _after_drain(state, notes + actions)
        case Phase.UPDATING | Phase.BUILDING, ChildExited(exit_code=code, signal=sig):
            return _on_exit_during_build(replace(state, child=None), _describe_exit(code, sig))
        case Phase.UPDATING, TreeUpdated(commit=commit) if (
                commit == state.target and state.reverting):
            return _on_reverted(replace(state, head=commit), None)
        case Phase.UPDATING, TreeUpdateFailed(commit=commit, error=error) if (
                commit == state.target and state.reverting):
            return _on_reverted(state, error)
        case Phase.UPDATING, TreeUpdated(commit=commit) if commit == state.target:
            # In release mode `head` is the live release; the new one is checked out beside it.
            return _on_tree_updated(state if state.settings.releases
                                    else replace(state, head=commit))
        case Phase.UPDATING, TreeUpdateFailed(commit=commit, error=error) if commit == state.target:
            return _on_deploy_failed(state, "tree update failed: " + error)
        case Phase.BUILDING, BuildSucceeded(commit=commit) if commit == state.target:
            return _on_built(replace(state, built=commit))
        case Phase.BUILDING, BuildFailed(commit=commit, reason=reason) if commit == state.target:
            return _on_deploy_failed(state, "build failed: " + reason)
        case Phase.RESTARTING, ChildExited():
            state, cancel = _disarm(replace(state, child=None), STOP_TIMER)
            reason = "restart requested" if state.restart_requested else "deploy"
            state = replace(state, crashes=0, restart_requested=False)
            state, actions = _start_child(state, state.target, reason)
            return state, cancel + actions
        case _:
            return _ignored(state, event)


# ---------------------------------------------------------------------------------------------
# Rules too long for one line of the match.


def _ignored(state: State, event: Event) -> Decision:
    return state, [Note("event.ignored", {"ignored": event.name, "phase": str(state.phase)})]


def _describe_exit(exit_code: int | None, signal: str | None) -> str:
    return f"killed by {signal}" if signal else f"exit code {exit_code}"


def _arm(state: State, name: str, seconds: float) -> Decision:
    serial = state.serial + 1
    timers = frozenset(t for t in state.timers if t[0] != name) | {(name, serial)}
    return replace(state, timers=timers, serial=serial), [StartTimer(name, seconds, serial)]


def _disarm(state: State, name: str, cancel: bool = True) -> Decision:
    """Forget a timer; `cancel=False` when it has just fired and there is nothing to cancel."""
    armed = [t for t in state.timers if t[0] == name]
    if not armed:
        return state, []
    state = replace(state, timers=state.timers - set(armed))
    return state, [CancelTimer(name)] if cancel else []


def backoff_delay(settings: Settings, crashes: int) -> float:
    """The first death restarts at once; each further quick death doubles the wait, capped."""
    if crashes <= 1:
        return 0.0
    return min(settings.backoff_min * 2 ** (crashes - 2), settings.backoff_max)


def _start_child(state: State, commit: str | None, reason: str) -> Decision:
    """In release mode, starting `commit` also points `current` at it, so it becomes `head`."""
    settings = state.settings
    if settings.releases:
        if commit is None:
            return replace(state, phase=Phase.RUNNING), [
                Note("child.nothing_to_run", {"reason": "no release has been built yet"})]
        state = replace(state, head=commit)
    phase = Phase.PROBATION if settings.health_gate else Phase.RUNNING
    return replace(state, phase=phase), [StartChild(commit, reason)]


def _on_child_started(state: State, pid: int, commit: str | None) -> Decision:
    state = replace(state, child=pid, child_commit=commit)
    state, actions = _arm(state, UPTIME_TIMER, state.settings.reset_after)
    if state.phase == Phase.PROBATION:
        state, more = _begin_probation(state)
        return state, actions + more
    state, more = _deploy_pending(state)
    return state, actions + more


def _deploy_pending(state: State) -> Decision:
    """A commit found while we were busy is deployed once the child is up and proven."""
    if state.pending is None or state.phase != Phase.RUNNING:
        return state, []
    target, reset = state.pending, state.pending_reset
    state = replace(state, pending=None, pending_reset=False)
    return _begin_deploy(state, target, reset)


# ---------------------------------------------------------------------------------------------
# Probation: a started child proves its health before anything builds on it.


def _begin_probation(state: State) -> Decision:
    settings = state.settings
    state = replace(state, probe_ok=False, grace_done=settings.grace <= 0, probe_error=None)
    if state.grace_done and not settings.probe:
        return _healthy_yet(state)
    state, actions = _arm(state, HEALTH_TIMER, settings.health_timeout)
    if settings.grace > 0:
        state, more = _arm(state, GRACE_TIMER, settings.grace)
        actions += more
    if settings.probe and state.child is not None:
        actions.append(ProbeHealth(state.child))
    return state, actions


def _end_probation(state: State) -> Decision:
    actions: list[Action] = []
    for name in (HEALTH_TIMER, GRACE_TIMER):
        state, cancel = _disarm(state, name)
        actions += cancel
    if state.settings.probe and not state.probe_ok:
        actions.append(StopProbe())
    return state, actions


def _healthy_yet(state: State) -> Decision:
    """Healthy once up `grace` and, with a probe, once it passed; a new release becomes good."""
    if not state.grace_done or (state.settings.probe and not state.probe_ok):
        return state, []
    state, actions = _end_probation(state)
    state = replace(state, phase=Phase.RUNNING, probe_error=None)
    facts: dict[str, object] = {"pid": state.child, "commit": state.child_commit}
    state, stop_old = _stop_old_child(state, f"replaced by {state.child_commit}")
    if state.settings.releases and state.head is not None:
        # Newest last, so a rollback goes back to the release that served last; only the
        # newest few stay on disk, so only those can be reused without a build.
        if state.head not in state.good:
            facts["new_good_release"] = True
        good = tuple(c for c in state.good if c != state.head) + (state.head,)
        state = replace(state, good=good[-state.settings.releases_kept:])
    actions.append(Note("health.passed", facts))
    state, more = _deploy_pending(state)
    return state, actions + stop_old + more


def _newest_good(state: State, other_than: str | None) -> str | None:
    """The release that proved healthy last, besides `other_than`: where a rollback goes."""
    return next((commit for commit in reversed(state.good) if commit != other_than), None)


def _rollback_target(state: State, bad: str | None) -> str | None:
    """Rule 6: the newest good release, if `bad` is a release that never proved healthy."""
    if not state.settings.releases or bad is None or bad in state.good:
        return None
    return _newest_good(state, other_than=bad)


def _on_probation_failed(state: State, reason: str, tail: str = "") -> Decision:
    state, actions = _end_probation(state)
    bad = state.head if state.settings.releases else state.child_commit
    target = _rollback_target(state, bad)
    if state.old_child is not None and bad not in state.good:
        target = state.old_commit  # the old generation still serves: back to it (rule 6)
    facts: dict[str, object] = {"commit": bad, "reason": reason,
                                "rollback_to": target}
    if tail:
        facts["tail"] = tail
    actions.append(Note("health.failed", facts))
    if target is not None and state.old_child is None:
        state = _hold(state, bad)
    state = replace(state, rollback_to=target, unhealthy=reason)
    if state.child is None:
        state, more = _after_unhealthy_stopped(state, "")
        return state, actions + more
    state, timer = _arm(replace(state, phase=Phase.ROLLING_BACK), STOP_TIMER,
                        state.settings.stop_timeout)
    return state, actions + [StopChild(state.child, reason)] + timer


def _after_unhealthy_stopped(state: State, tail: str) -> Decision:
    """The unhealthy child is gone: start the good release, or treat it as a crash."""
    state, actions = _disarm(state, STOP_TIMER)
    target, reason = state.rollback_to, state.unhealthy or "unhealthy"
    state = replace(state, rollback_to=None, unhealthy=None)
    if state.old_child is not None:
        return _back_to_old_child(state, reason, tail, actions)
    if target is None:
        state, more = _on_crash(state, reason)
        return state, actions + more
    bad = state.head
    facts: dict[str, object] = {"from": bad, "to": target, "reason": reason}
    if tail:
        facts["tail"] = tail
    actions += [Note("release.rolling_back", facts)]
    state, more = _start_child(replace(state, crashes=0), target, "rollback")
    # Set aside once `current` points away from it: the live release is never moved.
    return state, actions + more + ([SetAside(bad)] if bad is not None else [])


def _back_to_old_child(state: State, reason: str, tail: str,
                       actions: list[Action]) -> Decision:
    """A failed overlap: the previous generation never stopped serving; it is the child again
    and its release is live again. The new commit is held like any failed deploy."""
    bad, old = state.head if state.settings.releases else state.target, state.old_commit
    facts: dict[str, object] = {"from": bad, "to": old, "reason": reason,
                                "kept_pid": state.old_child}
    if tail:
        facts["tail"] = tail
    if bad != old and bad not in state.good:  # rule 6: a proven release is not held back
        state = _hold(state, bad)
    state = replace(state, child=state.old_child, child_commit=old, old_child=None,
                    old_commit=None, phase=Phase.RUNNING)
    if state.settings.releases and old is not None:
        state = replace(state, head=old)
        actions.append(SwitchRelease(old))  # before the note: it reports what is done
    actions.append(Note("release.rolling_back", facts))
    if state.settings.releases and bad is not None and bad != old and bad not in state.good:
        actions.append(SetAside(bad))
    state, more = _deploy_pending(state)
    return state, actions + more


def _on_exit_during_build(state: State, reason: str) -> Decision:
    notes: list[Action] = [Note("child.exited_during_deploy", {"reason": reason})]
    if not state.settings.releases or state.head is None:
        # In place, the tree is mid-update; starting it now would run half a release. The
        # new release starts when the build ends, or the old one if the build fails.
        return state, notes
    # The live release is untouched by a release-mode build: restart it at once, once. If it
    # dies again it waits for the build, which starts the new release or, failing, this one.
    state = replace(state, crashes=state.crashes + 1)
    if state.crashes > 1:
        return state, notes
    return state, notes + [StartChild(state.head, "crash restart")]


def _on_crash(state: State, reason: str) -> Decision:
    crashes = state.crashes + 1
    delay = backoff_delay(state.settings, crashes)
    state, actions = _disarm(replace(state, crashes=crashes), UPTIME_TIMER)
    facts: dict[str, object] = {"reason": reason, "crashes": crashes, "delay": delay}
    if state.phase != Phase.RUNNING:
        # A start that failed mid-deploy (the deploy target crashed at once) lands here too.
        state = replace(state, phase=Phase.RUNNING)
    if delay == 0:
        state, more = _start_child(state, state.head, "crash restart")
        return state, actions + [Note("child.restarting", facts)] + more
    if delay >= state.settings.backoff_max:
        actions.append(Note("child.crash_looping", facts))
    else:
        actions.append(Note("child.backing_off", facts))
    state, more = _arm(replace(state, phase=Phase.BACKOFF), BACKOFF_TIMER, delay)
    return state, actions + more


def _deploy_candidate(state: State, fetch: FetchSucceeded) -> tuple[str | None, bool, list[Action]]:
    """Which commit this fetch asks us to deploy, if any, and whether by reset. In release mode
    any other commit is deployed, force-pushed or not: no local work can be lost in a release
    the supervisor checked out itself."""
    facts: dict[str, object] = {"head": fetch.head, "upstream": fetch.upstream}
    if state.settings.releases:
        if fetch.upstream == state.head:
            return None, False, []
        if _is_held(state, fetch.upstream):
            return None, False, [Note("deploy.skipped", {"head": state.head,
                                                         "upstream": fetch.upstream,
                                                         "reason": "failed before"})]
        return fetch.upstream, False, []
    if fetch.relation == "same":
        return None, False, []
    if fetch.dirty:
        return None, False, [Note("git.dirty", facts)]
    reset = fetch.relation != "behind"
    if reset and not state.settings.reset_on_diverge:
        return None, False, [Note("git.diverged", facts | {"relation": fetch.relation})]
    if _is_held(state, fetch.upstream):
        return None, False, [Note("deploy.skipped", facts | {"reason": "failed before"})]
    return fetch.upstream, reset, []


def _reconcile_releases_at_start(state: State, event: FetchSucceeded | FetchFailed) -> Decision:
    """Start the live release (on probation if it never proved healthy: a supervisor killed
    mid-deploy converges here); a newer commit is deployed once it is up. With no release
    yet, the first one is built from upstream, or from the repository's HEAD."""
    candidate, notes = None, []
    if isinstance(event, FetchSucceeded):
        candidate, _, notes = _deploy_candidate(state, event)
    if state.head is not None and _is_held(state, state.head):
        # Killed while leaving a held release (a rollback, by hand or not, before `current`
        # moved): finish leaving it for the newest good one.
        previous = _newest_good(state, other_than=state.head)
        if previous is not None:
            note = Note("release.rollback_resumed", {"from": state.head, "to": previous})
            state, actions = _start_child(replace(state, pending=candidate), previous,
                                          "rollback")
            return state, notes + [note] + actions
    if state.head is not None:
        state, actions = _start_child(replace(state, pending=candidate), state.head, "startup")
        return state, notes + actions
    first = candidate or (event.head if event.head and not _is_held(state, event.head)
                          else None)
    if first is None:
        return replace(state, phase=Phase.RUNNING), notes + [
            Note("child.nothing_to_run", {"reason": "no release yet and no commit to build"})]
    state = replace(state, target=first, phase=Phase.UPDATING, deploys=state.deploys + 1)
    return state, notes + [Note("deploy.started", {"commit": first, "reset": False}),
                           UpdateTree(first, False)]


def _reconcile_at_start(state: State, event: FetchSucceeded | FetchFailed) -> Decision:
    if state.settings.releases:
        return _reconcile_releases_at_start(state, event)
    head = event.head
    state = replace(state, head=head)
    notes: list[Action] = []
    if isinstance(event, FetchSucceeded):
        commit, reset, notes = _deploy_candidate(state, event)
        if commit is not None:
            state = replace(state, target=commit, target_reset=reset, phase=Phase.UPDATING,
                            deploys=state.deploys + 1)
            return state, notes + [Note("deploy.started", {"commit": commit, "reset": reset}),
                                   UpdateTree(commit, reset)]
    if state.settings.has_build and head is not None and head != state.built:
        if head == state.failed and state.built is not None:
            # Killed before the tree went back after a failed build: finish going back.
            state = replace(state, target=state.built, target_reset=True, reverting=True,
                            phase=Phase.UPDATING)
            return state, notes + [Note("deploy.reverting", {"commit": state.built}),
                                   UpdateTree(state.built, True)]
        state = replace(state, target=head, phase=Phase.BUILDING, deploys=state.deploys + 1)
        return state, notes + [StartBuild(head)]
    state, actions = _start_child(state, head, "startup")
    return state, notes + actions


def _on_fetch(state: State, fetch: FetchSucceeded) -> Decision:
    releases = state.settings.releases
    if not releases:
        state = replace(state, head=fetch.head)
    commit, reset, notes = _deploy_candidate(state, fetch)
    if commit is None:
        at_head = fetch.upstream == state.head if releases else fetch.relation == "same"
        # A held commit that runs is being left on purpose (a rollback by hand): not a reason
        # to cancel the deploy away from it.
        upstream_went_back = (at_head and state.target != fetch.upstream
                              and not _is_held(state, fetch.upstream))
        if upstream_went_back and state.phase == Phase.DRAINING:
            # Upstream went back to what runs: the deploy we were draining for is gone.
            state, actions = _end_drain(replace(state, target=None, phase=Phase.RUNNING))
            return state, notes + [Note("deploy.cancelled", {"upstream": fetch.upstream})] + actions
        return state, notes
    match state.phase:
        case Phase.RUNNING | Phase.BACKOFF:
            state, actions = _begin_deploy(state, commit, reset)
            return state, notes + actions
        case Phase.DRAINING if state.target != state.built:
            # Nothing has been built for the old target yet: drain for the newest instead.
            return replace(state, target=commit, target_reset=reset), notes
        case _ if commit != state.target:
            return replace(state, pending=commit, pending_reset=reset), notes
    return state, notes


def _begin_deploy(state: State, commit: str, reset: bool, restart: bool = False) -> Decision:
    state, actions = _disarm(state, BACKOFF_TIMER)
    state = replace(state, target=commit, target_reset=reset, stats_ok=False, drain_expired=False,
                    restart_requested=restart, deploys=state.deploys + 1)
    if state.settings.releases and not restart:
        # Built beside the live release, which serves until the build is done.
        state = replace(state, phase=Phase.UPDATING)
        return state, actions + [Note("deploy.started", {"commit": commit, "reset": False}),
                                 UpdateTree(commit, False)]
    if state.child is None or state.settings.drain_condition is None:
        return _after_drain(state, actions)
    state = replace(state, phase=Phase.DRAINING, draining=True)
    actions += [Note("deploy.waiting_for_drain", {"commit": commit, "built": False}),
                WatchStats()]
    if state.settings.drain_timeout > 0:
        state, timer = _arm(state, DRAIN_TIMER, state.settings.drain_timeout)
        actions += timer
    return state, actions


def _satisfied(state: State, values: dict[str, str] | None) -> bool:
    condition = state.settings.drain_condition
    return values is not None and condition is not None and condition.holds(values)


def _drain_done(state: State) -> bool:
    return state.child is None or state.stats_ok or state.drain_expired


def _on_stats(state: State, values: dict[str, str] | None) -> Decision:
    state = replace(state, stats_ok=_satisfied(state, values))
    if not state.stats_ok:
        return state, []
    return _after_drain(state, [Note("drain.satisfied", {"stats": values})])


def _on_drain_timeout(state: State) -> Decision:
    state, _ = _disarm(replace(state, drain_expired=True), DRAIN_TIMER, cancel=False)
    note = Note("drain.timed_out", {"timeout": state.settings.drain_timeout})
    if state.phase == Phase.DRAINING:
        return _after_drain(state, [note])
    return state, [note]


def _after_drain(state: State, actions: list[Action]) -> Decision:
    """Drained: update and build the target, or, if that is done already, restart into it.
    (In release mode the drain comes after the build.)"""
    if state.settings.releases:
        state, more = _restart_into_target(state)
        return state, actions + more
    already_built = state.target == state.built or (
        state.restart_requested and not state.settings.has_build)
    if already_built and state.target == state.head:
        state, more = _restart_into_target(state)
        return state, actions + more
    state = replace(state, phase=Phase.UPDATING)
    facts = {"commit": state.target, "reset": state.target_reset}
    return state, actions + [Note("deploy.started", facts),
                             UpdateTree(state.target, state.target_reset)]


def _end_drain(state: State) -> Decision:
    """Stop watching stats and forget the drain timer: the deploy stops waiting on clients."""
    actions: list[Action] = [UnwatchStats()] if state.draining else []
    state, cancel = _disarm(replace(state, draining=False), DRAIN_TIMER)
    return state, actions + cancel


def _on_tree_updated(state: State) -> Decision:
    proven = state.settings.releases and state.target in state.good  # built before: reuse it
    if state.settings.has_build and not proven:
        return replace(state, phase=Phase.BUILDING), [StartBuild(state.target)]
    return _on_built(replace(state, built=state.target))


def _on_built(state: State) -> Decision:
    if state.pending is not None:
        # Still drained from before: go straight on to the newest commit.
        target, reset = state.pending, state.pending_reset
        state = replace(state, target=target, target_reset=reset, pending=None,
                        pending_reset=False, phase=Phase.UPDATING)
        return state, [Note("deploy.superseded", {"commit": target}), UpdateTree(target, reset)]
    if state.settings.drain_condition is not None and not _drain_done(state):
        # Clients connected while we built (the old child kept serving): wait for them again.
        actions: list[Action] = [Note("deploy.waiting_for_drain",
                                      {"commit": state.target, "built": True})]
        if not state.draining:
            actions.append(WatchStats())
            if state.settings.drain_timeout > 0:  # release mode: the drain starts only now
                state, timer = _arm(state, DRAIN_TIMER, state.settings.drain_timeout)
                actions += timer
        return replace(state, phase=Phase.DRAINING, draining=True), actions
    return _restart_into_target(state)


def _restart_into_target(state: State) -> Decision:
    state, actions = _end_drain(state)
    if state.child is None:
        reason = "deploy" if state.child_commit is not None else "startup"
        state, more = _start_child(replace(state, crashes=0), state.target, reason)
        return state, actions + more
    if state.settings.overlap and state.old_child is None:
        return replace(state, phase=Phase.RESTARTING), actions + [CheckOverlap(state.child)]
    state, more = _stop_for_restart(state)
    return state, actions + more


def _on_overlap_checked(state: State, fits: bool, available: int | None,
                        needed: int | None) -> Decision:
    if state.child is None:  # unreachable: answered at once, with nothing in between
        return _restart_into_target(state)
    if not fits:
        note = Note("restart.overlap_fallback", {"available": available, "needed": needed})
        state, actions = _stop_for_restart(state)
        return state, [note] + actions
    # Both serve on the socket we hold; the old one stops once the new one proved healthy.
    state = replace(state, old_child=state.child, old_commit=state.child_commit, child=None,
                    crashes=0)
    reason = "restart requested" if state.restart_requested else "deploy"
    state = replace(state, restart_requested=False)
    return _start_child(state, state.target, reason + " (overlap)")


def _on_old_child_exited(state: State) -> Decision:
    state, actions = _disarm(replace(state, old_child=None, old_commit=None), STOP_OLD_TIMER)
    if state.phase == Phase.SHUTTING_DOWN and state.child is None:
        return replace(state, phase=Phase.STOPPED), actions + [Exit(0)]
    return state, actions


def _stop_old_child(state: State, reason: str) -> Decision:
    if state.old_child is None:
        return state, []
    state, timer = _arm(state, STOP_OLD_TIMER, state.settings.stop_timeout)
    return state, [StopChild(state.old_child, reason)] + timer


def _stop_for_restart(state: State) -> Decision:
    assert state.child is not None
    state, timer = _arm(replace(state, phase=Phase.RESTARTING), STOP_TIMER,
                        state.settings.stop_timeout)
    reason = "restart requested" if state.restart_requested else f"deploy {state.target}"
    if state.drain_expired:
        reason += " (drain timed out)"
    return state, [StopChild(state.child, reason)] + timer


def _on_deploy_failed(state: State, reason: str) -> Decision:
    failed = state.target
    state = _hold(state, failed)
    actions: list[Action] = [Note("deploy.failed", {"commit": failed, "reason": reason})]
    if state.settings.releases and failed is not None and failed != state.head \
            and failed not in state.good:
        actions.append(SetAside(failed))  # never the live release, nor one proven good
    if state.pending is not None:
        # Still draining for this deploy: keep watching and go on with the newer commit.
        target, reset = state.pending, state.pending_reset
        state = replace(state, target=target, target_reset=reset, pending=None,
                        pending_reset=False, phase=Phase.UPDATING)
        return state, actions + [UpdateTree(target, reset)]
    state, more = _end_drain(replace(state, target=None, phase=Phase.RUNNING))
    actions += more
    good = state.built
    if (not state.settings.releases and state.head == failed and good is not None
            and good != failed):
        # The tree now holds the commit that failed to build: a crash restart, or a restarted
        # supervisor, would run it. Go back to the last good build before anything starts.
        state = replace(state, target=good, target_reset=True, reverting=True,
                        phase=Phase.UPDATING)
        return state, actions + [Note("deploy.reverting", {"commit": good}),
                                 UpdateTree(good, True)]
    return _carry_on_after_failure(state, actions, "deploy failed; starting the tree as it is")


def _on_reverted(state: State, error: str | None) -> Decision:
    commit = state.target
    if error is None:
        note = Note("deploy.reverted", {"commit": commit})
        reason = "deploy failed; back on the last good build"
    else:
        note = Note("deploy.revert_failed", {"commit": commit, "error": error})
        reason = "deploy failed; starting the tree as it is"
    state = replace(state, target=None, target_reset=False, reverting=False, phase=Phase.RUNNING)
    return _carry_on_after_failure(state, [note], reason)


def _carry_on_after_failure(state: State, actions: list[Action], reason: str) -> Decision:
    """After a failed deploy: a newer commit found meanwhile goes next; else make sure a child
    runs (it may have died during the build)."""
    if state.pending is not None:
        target, reset = state.pending, state.pending_reset
        state = replace(state, pending=None, pending_reset=False)
        state, more = _begin_deploy(state, target, reset)
        return state, actions + more
    if state.child is None:
        state, more = _start_child(state, state.head, reason)
        return state, actions + more
    return state, actions


def _kill_after_stop_timeout(state: State) -> Decision:
    state, _ = _disarm(state, STOP_TIMER, cancel=False)
    reason = f"did not stop within {state.settings.stop_timeout:g}s"
    # A shutdown stops both generations of an overlap; the old one otherwise has its own timer.
    stopping = (state.child, state.old_child) if state.phase == Phase.SHUTTING_DOWN \
        else (state.child,)
    return state, [KillChild(pid, reason) for pid in stopping if pid is not None]


def _on_stop_requested(state: State) -> Decision:
    if state.phase == Phase.SHUTTING_DOWN:
        return state, [KillChild(pid, "second stop request")
                       for pid in (state.child, state.old_child) if pid is not None]
    state, actions = _end_drain(state)
    if state.phase == Phase.PROBATION:
        state, more = _end_probation(state)
        actions += more
    for name in (BACKOFF_TIMER, UPTIME_TIMER, STOP_OLD_TIMER):
        state, cancel = _disarm(state, name)
        actions += cancel
    if state.child is None and state.old_child is None:
        return replace(state, phase=Phase.STOPPED), actions + [Exit(0)]
    state, timer = _arm(replace(state, phase=Phase.SHUTTING_DOWN), STOP_TIMER,
                        state.settings.stop_timeout)
    stops: list[Action] = [StopChild(pid, "shutdown") for pid in (state.old_child, state.child)
                           if pid is not None]
    return state, actions + stops + timer


# ---------------------------------------------------------------------------------------------
# Requests from the shell (`supervisor restart | stop-child | start-child`).


def _busy(state: State, request: str) -> Decision:
    facts = {"request": request, "phase": str(state.phase), "reason": "busy; ask again later"}
    return state, [Note("control.ignored", facts)]


def _on_restart_requested(state: State) -> Decision:
    match state.phase:
        case Phase.RUNNING if state.child is not None and state.head is not None:
            return _begin_deploy(state, state.head, False, restart=True)
        case Phase.BACKOFF:
            return _on_start_requested(state)
        case Phase.HELD if state.child is None:
            return _on_start_requested(state)
    return _busy(state, "restart")


def _on_hold_requested(state: State) -> Decision:
    """Stop the app and keep it stopped: no crash restart, no deploy restart until start-child.
    New commits are remembered and deployed once the app is started again."""
    match state.phase:
        case Phase.RUNNING if state.child is not None:
            state, actions = _disarm(state, UPTIME_TIMER)
            state, timer = _arm(replace(state, phase=Phase.HELD), STOP_TIMER,
                                state.settings.stop_timeout)
            return state, actions + [StopChild(state.child, "stop requested")] + timer
        case Phase.BACKOFF:
            state, actions = _disarm(replace(state, phase=Phase.HELD), BACKOFF_TIMER)
            return state, actions
        case Phase.HELD:
            return state, [Note("control.ignored", {"request": "stop-child",
                                                    "reason": "already stopped"})]
    return _busy(state, "stop-child")


def _on_start_requested(state: State) -> Decision:
    match state.phase:
        case Phase.HELD if state.child is None:
            return _start_child(replace(state, crashes=0), state.head, "start requested")
        case Phase.BACKOFF:
            state, actions = _disarm(replace(state, crashes=0), BACKOFF_TIMER)
            state, more = _start_child(state, state.head, "start requested")
            return state, actions + more
        case Phase.RUNNING if state.child is not None:
            return state, [Note("control.ignored", {"request": "start-child",
                                                    "reason": "already running"})]
    return _busy(state, "start-child")


def _on_rollback_requested(state: State) -> Decision:
    """`supervisor rollback`: deploy the previous good release; the live one is held (rule 4)
    until upstream moves on, and no longer counts as good."""
    if not state.settings.releases:
        return state, [Note("control.ignored", {"request": "rollback",
                                                "reason": 'needs deploy.mode = "releases"'})]
    if state.phase != Phase.RUNNING or state.child is None:
        return _busy(state, "rollback")
    previous = _newest_good(state, other_than=state.head)
    if previous is None:
        return state, [Note("control.ignored", {"request": "rollback",
                                                "reason": "no earlier good release"})]
    state = replace(_hold(state, state.head),
                    good=tuple(c for c in state.good if c != state.head))
    notes: list[Action] = [Note("release.rollback_requested", {"from": state.head,
                                                               "to": previous})]
    state, actions = _begin_deploy(state, previous, False)
    return state, notes + actions
