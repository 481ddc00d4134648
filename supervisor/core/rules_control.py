"""Rules for requests from the shell (`supervisor restart | stop-child | start-child |
rollback`): each applies only in the phases where it makes sense, and otherwise says why in a
`control.ignored` note instead of interrupting whatever is under way.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import Note, NoteName, StartReason, StopChild, Timer
from supervisor.core.rules_crash import start_child
from supervisor.core.rules_deploy import begin_deploy, request_rollback
from supervisor.core.state import (
    Decision,
    DeployKind,
    Phase,
    State,
    Target,
    arm,
    disarm,
    newest_good,
)


def _refused(request: str, reason: str) -> Note:
    return Note(NoteName.CONTROL_IGNORED, {"request": request, "reason": reason})


def _busy(state: State, request: str) -> Decision:
    facts = {"request": request, "phase": str(state.phase), "reason": "busy; ask again later"}
    return state, [Note(NoteName.CONTROL_IGNORED, facts)]


def on_restart_requested(state: State) -> Decision:
    match state.phase:
        case Phase.RUNNING if state.child is not None and state.head is not None:
            return begin_deploy(state, Target(state.head), DeployKind.RESTART)
        case Phase.BACKOFF:
            return on_start_requested(state)
        case Phase.HELD if state.child is None:
            return on_start_requested(state)
    return _busy(state, "restart")


def on_hold_requested(state: State) -> Decision:
    """Stop the app and keep it stopped: no crash restart, no deploy restart until start-child.
    New commits are remembered and deployed once the app is started again."""
    match state.phase:
        case Phase.RUNNING if state.child is not None:
            state, actions = disarm(state, Timer.UPTIME)
            state, timer = arm(replace(state, phase=Phase.HELD), Timer.STOP,
                               state.settings.stop_timeout)
            return state, actions + [StopChild(state.child, "stop requested")] + timer
        case Phase.BACKOFF:
            return disarm(replace(state, phase=Phase.HELD), Timer.BACKOFF)
        case Phase.HELD:
            return state, [_refused("stop-child", "already stopped")]
    return _busy(state, "stop-child")


def on_start_requested(state: State) -> Decision:
    match state.phase:
        case Phase.HELD if state.child is None:
            return start_child(replace(state, crashes=0), state.head,
                               StartReason.START_REQUESTED)
        case Phase.BACKOFF:
            state, actions = disarm(replace(state, crashes=0), Timer.BACKOFF)
            state, more = start_child(state, state.head, StartReason.START_REQUESTED)
            return state, actions + more
        case Phase.RUNNING if state.child is not None:
            return state, [_refused("start-child", "already running")]
    return _busy(state, "start-child")


def on_rollback_requested(state: State) -> Decision:
    """`supervisor rollback`: deploy the previous good release (release mode only)."""
    if not state.settings.releases:
        return state, [_refused("rollback", 'needs deploy.mode = "releases"')]
    if state.phase != Phase.RUNNING or state.child is None:
        return _busy(state, "rollback")
    previous = newest_good(state, other_than=state.head)
    if previous is None:
        return state, [_refused("rollback", "no earlier good release")]
    return request_rollback(state, previous)
