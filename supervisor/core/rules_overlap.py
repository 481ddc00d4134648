"""Rules for `restart.style = "overlap"` (rule 7): the next generation starts beside the old one
if the box has the memory for both, and the old one stops only once the new one proved healthy;
if it does not, the old generation never stopped serving and is the child again.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import (
    Action,
    Exit,
    KillChild,
    Note,
    NoteName,
    SetAside,
    StartReason,
    StopChild,
    SwitchRelease,
    Timer,
)
from supervisor.core.rules_deploy import (
    deploy_queued,
    restart_into_target,
    start_target,
    stop_for_restart,
)
from supervisor.core.state import Decision, Generation, Phase, State, arm, disarm, hold


def fits_beside(state: State, available: int | None, needed: int | None) -> bool:
    """A second generation fits if the memory available covers what the running one holds,
    with restart.overlap_reserve to spare (a tiny box must not swap or OOM for a restart)."""
    return (available is not None and needed is not None
            and available - needed >= state.settings.overlap_reserve)


def on_overlap_checked(state: State, available: int | None, needed: int | None) -> Decision:
    if state.generation is None or state.child is None:
        return restart_into_target(state)  # unreachable: answered at once, nothing between
    if not fits_beside(state, available, needed):
        note = Note(NoteName.RESTART_OVERLAP_FALLBACK, {"available": available, "needed": needed})
        state, actions = stop_for_restart(state)
        return state, [note] + actions
    # Both serve on the socket we hold; the old one stops once the new one proved healthy.
    state = replace(state, old=state.generation,
                    generation=Generation(None, state.generation.commit))
    reason = (StartReason.RESTART_OVERLAP if state.restart_requested
              else StartReason.DEPLOY_OVERLAP)
    return start_target(state, reason)


def on_old_child_exited(state: State) -> Decision:
    state, actions = disarm(replace(state, old=None), Timer.STOP_OLD)
    if state.phase == Phase.SHUTTING_DOWN and state.child is None:
        return replace(state, phase=Phase.STOPPED), actions + [Exit(0)]
    return state, actions


def stop_old_child(state: State, reason: str) -> Decision:
    if state.old is None or state.old.pid is None:
        return state, []
    state, timer = arm(state, Timer.STOP_OLD, state.settings.stop_timeout)
    return state, [StopChild(state.old.pid, reason)] + timer


def on_old_stop_timeout(state: State) -> Decision:
    state, _ = disarm(state, Timer.STOP_OLD, cancel=False)
    reason = f"did not stop within {state.settings.stop_timeout:g}s"
    return state, [KillChild(state.old_child, reason)] if state.old_child else []


def back_to_old_child(state: State, reason: str, tail: str, actions: list[Action]) -> Decision:
    """A failed overlap: the previous generation never stopped serving; it is the child again
    and its release is live again. The new commit is held like any failed deploy."""
    assert state.old is not None
    bad = state.head if state.settings.releases else state.child_commit
    old = state.old.commit
    facts: dict[str, object] = {"from": bad, "to": old, "reason": reason,
                                "kept_pid": state.old_child}
    if tail:
        facts["tail"] = tail
    if bad != old and bad not in state.good:  # rule 6: a proven release is not held back
        state = hold(state, bad)
    state = replace(state, generation=state.old, old=None, phase=Phase.RUNNING)
    if state.settings.releases and old is not None:
        state = replace(state, head=old)
        actions.append(SwitchRelease(old))  # before the note: it reports what is done
    actions.append(Note(NoteName.RELEASE_ROLLING_BACK, facts))
    if state.settings.releases and bad is not None and bad != old and bad not in state.good:
        actions.append(SetAside(bad))
    state, more = deploy_queued(state)
    return state, actions + more

