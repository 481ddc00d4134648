r"""Every decision the supervisor makes: `decide(state, event) -> (state, actions)`.

Theory of operation
-------------------
Drivers (git poller, child monitor, builder, stats watcher, timers, signals) report facts as
events. The core alone decides what to do about them and answers with actions that the
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

    RESTARTING --fits--> PROBATION (the old generation serves too) --healthy--> RUNNING, old
                         one stopped | --unhealthy--> new one stopped, the old one is the child

Rules
1. At most one child: `StartChild` is only ever issued while no child is known to run, and the
   loop answers it at once with `ChildStarted` or `ChildStartFailed`.
2. A deploy stops the child only while the latest stats satisfy `drain.until`, after the drain
   timeout fired, or when no drain is configured; a child that died needs no drain.
3. Commits coalesce: a commit found while busy replaces any older one waiting, so the newest wins.
4. A commit whose tree update or build failed is not tried again until upstream moves on.
5. Events race. An event with no rule in the current phase changes nothing and is reported as
   ignored; the core never raises on an event.
6. Only a release that never proved healthy is rolled back, and only to one that did: a good
   release that fails later is a crashing child, not a bad deploy.
7. Two children only in an overlap: `State.old` is set exactly while the previous generation
   still runs beside the child, and no third starts while it does.

How to read it
--------------
`decide` first applies the prelude, the rules that hold in every phase (stale pids and timers,
a stop request, a child that started, the old generation of an overlap). Then the current
phase's handler below: one `match` per phase, naming each event that phase has a rule for.
What a phase does not handle itself falls to `_in_any_phase` (reloads, requests from the
shell, fetches); anything else is ignored (rule 5). The rules themselves live in the sibling
modules: rules_deploy (drain, update, build, restart, failed deploys), rules_health
(probation, rollback), rules_overlap, rules_crash; the state and its records in state.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from supervisor.core.events import (
    Action,
    BuildFailed,
    BuildSucceeded,
    CheckRequested,
    ChildExited,
    ChildStarted,
    ChildStartFailed,
    Event,
    Exit,
    Fetch,
    FetchFailed,
    FetchSucceeded,
    FleetCleared,
    FleetHeld,
    HealthPassed,
    HealthProbeFailed,
    KillChild,
    Note,
    NoteName,
    OverlapChecked,
    PruneReleases,
    ReleaseSlot,
    RestartRequested,
    RollbackRequested,
    SaveState,
    SettingsChanged,
    SlotGranted,
    StartChildRequested,
    StatsRead,
    StopChild,
    StopChildRequested,
    StopRequested,
    Timer,
    TimerFired,
    TreeUpdated,
    TreeUpdateFailed,
)
from supervisor.core.rules_control import (
    on_hold_requested,
    on_restart_requested,
    on_rollback_requested,
    on_start_requested,
)
from supervisor.core.rules_crash import (
    backoff_delay,
    on_backoff_over,
    on_backoff_over_during_build,
    on_crash,
    on_exit_during_build,
)
from supervisor.core.rules_deploy import (
    deploy_queued,
    end_drain,
    note_stats,
    on_built,
    on_deploy_failed,
    on_drain_timeout,
    on_exit_while_draining,
    on_fetch,
    on_stats,
    on_stopped_for_restart,
    on_tree_update_failed,
    on_tree_updated,
    reconcile_at_start,
)
from supervisor.core.rules_fleet import (
    on_fleet_cleared,
    on_fleet_held,
    on_late_slot,
    on_slot_granted,
)
from supervisor.core.rules_health import (
    after_unhealthy_stopped,
    begin_probation,
    end_probation,
    on_grace_over,
    on_health_deadline,
    on_probation_failed,
    on_probe_failed,
    on_probe_passed,
)
from supervisor.core.rules_overlap import (
    on_old_child_exited,
    on_old_stop_timeout,
    on_overlap_checked,
)
from supervisor.core.settings import Settings
from supervisor.core.state import (
    DEPLOYING,
    Decision,
    Generation,
    Phase,
    State,
    arm,
    describe_exit,
    disarm,
    initial_state,
    without_child,
)

__all__ = ["DEPLOYING", "Phase", "Settings", "State", "backoff_delay", "decide", "initial_state"]


def decide(state: State, event: Event) -> Decision:
    """Apply one event: the prelude, then the phase's own rules, then the durable record."""
    before = state
    if state.phase == Phase.STOPPED:
        return _ignored(state, event)
    decision = _prelude(state, event)
    if decision is None:
        decision = PHASES[state.phase](state, event)
    if decision is None:
        decision = _in_any_phase(state, event)
    state, actions = decision
    return state, _durable(before, state) + actions


# ---------------------------------------------------------------------------------------------
# The prelude: rules that hold in every phase, before the phase's own. Order matters here and
# only here: a stale pid or timer must be dropped before any rule could act on it.


def _prelude(state: State, event: Event) -> Decision | None:
    match event:
        case StopRequested():
            return _on_stop_requested(state)
        case ChildStarted(pid=pid, commit=commit):
            return _on_child_started(state, pid, commit)
        case ChildExited(pid=pid) if pid is not None and pid == state.old_child:
            return on_old_child_exited(state)
        case ChildExited(pid=pid) if pid != state.child:
            return _ignored(state, event)
        case ChildStartFailed() if state.child is not None:
            return _ignored(state, event)  # answers a start only while no child runs (rule 1)
        case TimerFired(timer=timer, serial=serial) if (timer, serial) not in state.timers:
            return _ignored(state, event)
        case TimerFired(timer=Timer.UPTIME):
            return disarm(replace(state, crashes=0), Timer.UPTIME, cancel=False)
        case TimerFired(timer=Timer.STOP_OLD):
            return on_old_stop_timeout(state)
    return None


def _in_any_phase(state: State, event: Event) -> Decision:
    """What every phase but SHUTTING_DOWN does with an event it has no rule of its own for."""
    match event:
        case SettingsChanged(settings=settings) if isinstance(settings, Settings):
            return replace(state, settings=settings), []
        case RestartRequested():
            return on_restart_requested(state)
        case StopChildRequested():
            return on_hold_requested(state)
        case StartChildRequested():
            return on_start_requested(state)
        case RollbackRequested():
            return on_rollback_requested(state)
        case CheckRequested():
            return state, [Fetch()]
        case FetchSucceeded():
            return on_fetch(state, event)
        case FetchFailed():
            return state, []
        case ChildStartFailed(error=error):
            return on_crash(state, error)
        case FleetCleared(commit=commit, why=why):
            return on_fleet_cleared(state, commit, why)
        case FleetHeld(commit=commit, box=box, reason=reason):
            return on_fleet_held(state, commit, box, reason)
        case SlotGranted(commit=commit):
            return on_late_slot(state, commit)
    return _ignored(state, event)


# ---------------------------------------------------------------------------------------------
# One handler per phase. None means "no rule of this phase's own".

Handler = Callable[[State, Event], Decision | None]


def _starting(state: State, event: Event) -> Decision | None:
    match event:
        case FetchSucceeded() | FetchFailed():
            return reconcile_at_start(state, event)
    return None


def _running(state: State, event: Event) -> Decision | None:
    match event:
        case ChildExited(exit_code=code, signal=sig):
            return on_crash(without_child(state), describe_exit(code, sig))
    return None


def _backoff(state: State, event: Event) -> Decision | None:
    match event:
        case TimerFired(timer=Timer.BACKOFF):
            return on_backoff_over(state)
    return None


def _draining(state: State, event: Event) -> Decision | None:
    match event:
        case StatsRead(values=values):
            return on_stats(state, values)
        case TimerFired(timer=Timer.DRAIN):
            return on_drain_timeout(state)
        case ChildExited(exit_code=code, signal=sig):
            return on_exit_while_draining(state, describe_exit(code, sig))
    return None


def _updating(state: State, event: Event) -> Decision | None:
    match event:
        case TreeUpdated(commit=commit) if commit == state.target:
            return on_tree_updated(state, commit)
        case TreeUpdateFailed(commit=commit, error=error) if commit == state.target:
            return on_tree_update_failed(state, error)
    return _while_building(state, event)


def _building(state: State, event: Event) -> Decision | None:
    match event:
        case BuildSucceeded(commit=commit) if commit == state.target:
            return on_built(replace(state, built=commit))
        case BuildFailed(commit=commit, reason=reason) if commit == state.target:
            return on_deploy_failed(state, "build failed: " + reason, for_the_fleet=True)
    return _while_building(state, event)


def _while_building(state: State, event: Event) -> Decision | None:
    """UPDATING and BUILDING alike, and AWAITING_SLOT: the old child serves (in place, perhaps
    drained already)."""
    match event:
        case StatsRead(values=values) if state.draining:
            return note_stats(state, values), []
        case TimerFired(timer=Timer.DRAIN):
            return on_drain_timeout(state)
        case ChildExited(exit_code=code, signal=sig):
            return on_exit_during_build(without_child(state), describe_exit(code, sig))
        case TimerFired(timer=Timer.BACKOFF):
            return on_backoff_over_during_build(state)
        case ChildStartFailed(error=error):
            # A restart of the live release during a release-mode build failed: it waits
            # for the build, which starts the new release or, if it fails, the live one.
            return state, [Note(NoteName.CHILD_START_FAILED_DURING_DEPLOY, {"reason": error})]
    return None


def _restarting(state: State, event: Event) -> Decision | None:
    match event:
        case OverlapChecked(available=available, needed=needed) if state.old is None:
            return on_overlap_checked(state, available, needed)
        case ChildExited():
            return on_stopped_for_restart(state)
        case TimerFired(timer=Timer.STOP):
            return _kill_after_stop_timeout(state)
    return None


def _probation(state: State, event: Event) -> Decision | None:
    match event:
        case HealthPassed(pid=pid) if pid == state.child:
            return on_probe_passed(state)
        case HealthProbeFailed(pid=pid, error=error) if pid == state.child:
            return on_probe_failed(state, error)
        case TimerFired(timer=Timer.GRACE):
            return on_grace_over(state)
        case TimerFired(timer=Timer.HEALTH):
            return on_health_deadline(state)
        case ChildExited(exit_code=code, signal=sig, tail=tail):
            reason = "exited on probation: " + describe_exit(code, sig)
            return on_probation_failed(without_child(state), reason, tail)
        case ChildStartFailed(error=error):
            return on_probation_failed(state, "cannot start: " + error)
    return None


def _awaiting_slot(state: State, event: Event) -> Decision | None:
    """The live release serves while the deploy waits for a slot: if it dies, it is restarted
    by the crash rules (as during a build), and the new release still waits for its slot."""
    match event:
        case SlotGranted(commit=commit) if commit == state.target:
            return on_slot_granted(state)
    return _while_building(state, event)  # the drain is over: only its crash rules apply


def _rolling_back(state: State, event: Event) -> Decision | None:
    match event:
        case ChildExited(tail=tail):
            return after_unhealthy_stopped(without_child(state), tail)
        case TimerFired(timer=Timer.STOP):
            return _kill_after_stop_timeout(state)
    return None


def _held(state: State, event: Event) -> Decision | None:
    match event:
        case ChildExited():
            return disarm(without_child(state), Timer.STOP)
        case TimerFired(timer=Timer.STOP):
            return _kill_after_stop_timeout(state)
    return None


def _shutting_down(state: State, event: Event) -> Decision:
    """Nothing but the children's exits matters any more: no fallback to `_in_any_phase`."""
    match event:
        case ChildExited() if state.old is not None:
            return without_child(state), []
        case ChildExited():
            return replace(without_child(state), phase=Phase.STOPPED), [Exit(0)]
        case TimerFired(timer=Timer.STOP):
            return _kill_after_stop_timeout(state)
    return _ignored(state, event)


def _stopped(state: State, event: Event) -> Decision:
    return _ignored(state, event)


PHASES: dict[Phase, Handler] = {
    Phase.STARTING: _starting,
    Phase.RUNNING: _running,
    Phase.BACKOFF: _backoff,
    Phase.DRAINING: _draining,
    Phase.UPDATING: _updating,
    Phase.BUILDING: _building,
    Phase.RESTARTING: _restarting,
    Phase.PROBATION: _probation,
    Phase.ROLLING_BACK: _rolling_back,
    Phase.AWAITING_SLOT: _awaiting_slot,
    Phase.HELD: _held,
    Phase.SHUTTING_DOWN: _shutting_down,
    Phase.STOPPED: _stopped,
}


# ---------------------------------------------------------------------------------------------
# Rules the prelude applies


def _ignored(state: State, event: Event) -> Decision:
    return state, [Note(NoteName.EVENT_IGNORED, {"ignored": event.name,
                                                 "phase": str(state.phase)})]


def _on_child_started(state: State, pid: int, commit: str | None) -> Decision:
    state = replace(state, generation=Generation(pid, commit))
    state, actions = arm(state, Timer.UPTIME, state.settings.reset_after)
    if state.phase == Phase.PROBATION:
        state, more = begin_probation(state)
        return state, actions + more
    if state.settings.fleet and state.phase == Phase.RUNNING and not state.settings.health_gate:
        actions.append(ReleaseSlot())  # no health gate to wait for: the restart is over
    state, more = deploy_queued(state)
    return state, actions + more


def _on_stop_requested(state: State) -> Decision:
    if state.phase == Phase.SHUTTING_DOWN:
        return state, [KillChild(pid, "second stop request")
                       for pid in (state.child, state.old_child) if pid is not None]
    state, actions = end_drain(replace(state, rollback=None))  # nothing starts after a stop
    if state.settings.fleet:
        actions.append(ReleaseSlot())  # an app stopped for good holds no slot of its group
    if state.phase == Phase.PROBATION:
        state, more = end_probation(state)
        actions += more
    for timer in (Timer.BACKOFF, Timer.UPTIME, Timer.STOP_OLD):
        state, cancel = disarm(state, timer)
        actions += cancel
    if state.child is None and state.old_child is None:
        return replace(state, phase=Phase.STOPPED), actions + [Exit(0)]
    state, timer_actions = arm(replace(state, phase=Phase.SHUTTING_DOWN), Timer.STOP,
                               state.settings.stop_timeout)
    stops: list[Action] = [StopChild(pid, "shutdown") for pid in (state.old_child, state.child)
                           if pid is not None]
    return state, actions + stops + timer_actions


def _kill_after_stop_timeout(state: State) -> Decision:
    state, _ = disarm(state, Timer.STOP, cancel=False)
    reason = f"did not stop within {state.settings.stop_timeout:g}s"
    # A shutdown stops both generations of an overlap; the old one otherwise has its own timer.
    stopping = (state.child, state.old_child) if state.phase == Phase.SHUTTING_DOWN \
        else (state.child,)
    return state, [KillChild(pid, reason) for pid in stopping if pid is not None]


def _durable(before: State, after: State) -> list[Action]:
    """What must survive a restart of the supervisor, saved before anything else is done: the
    commits not to deploy again and the good releases; then releases no longer worth keeping
    are deleted (release mode)."""
    if (before.refused, before.good) == (after.refused, after.good):
        return []
    actions: list[Action] = [SaveState(failed=after.failed, held=after.refused[:-1],
                                       good=after.good)]
    if after.settings.releases and after.good != before.good:
        keep = (*after.good, after.head, after.target, after.pending)
        actions.append(PruneReleases(tuple(dict.fromkeys(c for c in keep if c is not None))))
    return actions
