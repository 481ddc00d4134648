"""Rules for fleet mode (issue 15): what the group's word changes here. The group (through the
fleet agent, a driver) says *when* this box may take its app down and which commits it holds;
it never names what runs: a box deploys only a commit its own fetch found and it built.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import AwaitFleet, Note, NoteName, ReleaseSlot
from supervisor.core.rules_deploy import begin_deploy, on_deploy_failed, restart_into_target
from supervisor.core.state import Decision, Deploy, Phase, State, hold

# Built, not yet taken down: a commit the group holds is dropped like a failed one at once.
_BUILT_NOT_DOWN = (Phase.DRAINING, Phase.AWAITING_SLOT)
# Being checked out or built: held now, dropped once that is done (rules_deploy.held_by_fleet),
# so that no second checkout or build ever starts beside one still running.
_BEING_BUILT = (Phase.UPDATING, Phase.BUILDING)


def on_fleet_cleared(state: State, commit: str, why: str) -> Decision:
    """The commit waiting for the group's go may deploy: at once if the app rests, else once
    what happens now (a restart, a probation) is over."""
    target = state.awaiting
    if target is None or target.commit != commit:
        return state, []  # a go for a commit no longer waiting (upstream moved on)
    state = replace(state, cleared=commit, awaiting=None)
    facts = {"commit": commit, "why": why}
    if state.phase in (Phase.RUNNING, Phase.BACKOFF):
        state, actions = begin_deploy(state, target)
        return state, [Note(NoteName.FLEET_CLEARED, facts)] + actions
    return replace(state, queued=target), [Note(NoteName.FLEET_CLEARED, facts)]


def on_fleet_held(state: State, commit: str, box: str, reason: str) -> Decision:
    """A box of the group failed `commit`: it is not deployed here either (rule 4, for the
    group). The release that runs here is never left on the group's word alone: only this
    box's own health gate rolls it back."""
    facts = {"commit": commit, "box": box, "reason": reason}
    if commit == state.head or commit in state.good or commit in state.refused:
        return state, []
    note = Note(NoteName.FLEET_COMMIT_HELD, facts)
    if state.deploy is not None and state.target == commit:
        if state.phase in _BUILT_NOT_DOWN:
            return on_deploy_failed(state, f"held by the fleet: {box}: {reason}")
        if state.phase in _BEING_BUILT:
            return hold(state, commit), [note]
        return state, []  # restarting into it or on probation: its own gate decides
    if state.awaiting is not None and state.awaiting.commit == commit:
        return replace(hold(state, commit), awaiting=None), [note, AwaitFleet(None)]
    return hold(state, commit), [note]


def on_slot_granted(state: State) -> Decision:
    """Built, drained, and now one of the group's slots: take the app down for the target."""
    assert state.deploy is not None
    return restart_into_target(replace(state, deploy=replace(state.deploy, slot=True)))


def on_late_slot(state: State, commit: str) -> Decision:
    """A slot granted for a deploy that no longer waits for one (the app died meanwhile, the
    deploy ended): given back at once, so it does not keep another box waiting."""
    deploy: Deploy | None = state.deploy
    if deploy is not None and deploy.slot:
        return state, []  # holding the slot for this deploy already: that one is ours
    return state, [ReleaseSlot(commit)]
