"""Rules for starting a child and for a child that dies on its own: restart at once the first
time, then back off, doubling up to the cap; a child that stays up `reset_after` is forgiven.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import Action, Note, NoteName, StartChild, StartReason, Timer
from supervisor.core.settings import Settings
from supervisor.core.state import Decision, Phase, State, arm, disarm


def backoff_delay(settings: Settings, crashes: int) -> float:
    """The first death restarts at once; each further quick death doubles the wait, capped."""
    if crashes <= 1:
        return 0.0
    return min(settings.backoff_min * 2 ** (crashes - 2), settings.backoff_max)


def start_child(state: State, commit: str | None, reason: StartReason) -> Decision:
    """Rule 1: only ever while no child runs; the loop answers at once (ChildStarted or
    ChildStartFailed). In release mode, starting `commit` also points `current` at it, so it
    becomes `head`; with a health gate the child starts on probation."""
    settings = state.settings
    if settings.releases:
        if commit is None:
            return replace(state, phase=Phase.RUNNING), [
                Note(NoteName.CHILD_NOTHING_TO_RUN, {"reason": "no release has been built yet"})]
        state = replace(state, head=commit)
    phase = Phase.PROBATION if settings.health_gate else Phase.RUNNING
    return replace(state, phase=phase), [StartChild(commit, reason)]


def on_crash(state: State, reason: str) -> Decision:
    crashes = state.crashes + 1
    delay = backoff_delay(state.settings, crashes)
    state, actions = disarm(replace(state, crashes=crashes), Timer.UPTIME)
    facts: dict[str, object] = {"reason": reason, "crashes": crashes, "delay": delay}
    if state.phase != Phase.RUNNING:
        # A start that failed mid-deploy (the deploy target crashed at once) lands here too.
        state = replace(state, phase=Phase.RUNNING)
    if delay == 0:
        state, more = start_child(state, state.head, StartReason.CRASH)
        return state, actions + [Note(NoteName.CHILD_RESTARTING, facts)] + more
    if delay >= state.settings.backoff_max:
        actions.append(Note(NoteName.CHILD_CRASH_LOOPING, facts))
    else:
        actions.append(Note(NoteName.CHILD_BACKING_OFF, facts))
    state, more = arm(replace(state, phase=Phase.BACKOFF), Timer.BACKOFF, delay)
    return state, actions + more


def on_backoff_over(state: State) -> Decision:
    state, _ = disarm(state, Timer.BACKOFF, cancel=False)
    return start_child(state, state.head, StartReason.CRASH)


def on_exit_during_build(state: State, reason: str) -> Decision:
    notes: list[Action] = [Note(NoteName.CHILD_EXITED_DURING_DEPLOY, {"reason": reason})]
    if not state.settings.releases or state.head is None:
        # In place, the tree is mid-update; starting it now would run half a release. The
        # new release starts when the build ends, or the old one if the build fails.
        return state, notes
    # The live release is untouched by a release-mode build beside it: it keeps its crash
    # rules (at once, then backing off) while the phase stays the build's. Whichever ends
    # first, the backoff or the build, starts a child; the other finds it running.
    crashes = state.crashes + 1
    delay = backoff_delay(state.settings, crashes)
    state, actions = disarm(replace(state, crashes=crashes), Timer.UPTIME)
    if delay == 0:
        return state, notes + actions + [StartChild(state.head, StartReason.CRASH)]
    facts: dict[str, object] = {"reason": reason, "crashes": crashes, "delay": delay}
    state, timer = arm(state, Timer.BACKOFF, delay)
    return state, notes + actions + [Note(NoteName.CHILD_BACKING_OFF, facts)] + timer


def on_backoff_over_during_build(state: State) -> Decision:
    state, _ = disarm(state, Timer.BACKOFF, cancel=False)
    if state.child is not None or state.head is None:
        return state, []
    return state, [StartChild(state.head, StartReason.CRASH)]
