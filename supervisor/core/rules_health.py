"""Rules for the health gate and rollback (rule 6): every start passes probation (up `grace`,
and a passed probe if one is configured) before anything builds on it; a release that never
proved healthy and fails is rolled back to the one that proved healthy last.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import (
    Action,
    Note,
    NoteName,
    ProbeHealth,
    ReleaseSlot,
    ReportFleet,
    SetAside,
    StartReason,
    StopChild,
    StopProbe,
    Timer,
)
from supervisor.core.rules_crash import on_crash, start_child
from supervisor.core.rules_deploy import deploy_queued
from supervisor.core.rules_overlap import back_to_old_child, stop_old_child
from supervisor.core.state import (
    Decision,
    Phase,
    Probation,
    Rollback,
    State,
    arm,
    disarm,
    hold,
    newest_good,
)


def begin_probation(state: State) -> Decision:
    settings = state.settings
    state = replace(state, probation=Probation(grace_done=settings.grace <= 0))
    if settings.grace <= 0 and not settings.probe:
        return _healthy_yet(state)
    state, actions = arm(state, Timer.HEALTH, settings.health_timeout)
    if settings.grace > 0:
        state, more = arm(state, Timer.GRACE, settings.grace)
        actions += more
    if settings.probe and state.child is not None:
        actions.append(ProbeHealth(state.child))
    return state, actions


def end_probation(state: State) -> Decision:
    actions: list[Action] = []
    for timer in (Timer.HEALTH, Timer.GRACE):
        state, cancel = disarm(state, timer)
        actions += cancel
    if state.settings.probe and (state.probation is None or not state.probation.probe_passed):
        actions.append(StopProbe())
    return replace(state, probation=None), actions


def on_probe_passed(state: State) -> Decision:
    if state.probation is None:
        return state, []
    return _healthy_yet(replace(state, probation=replace(state.probation, probe_passed=True)))


def on_probe_failed(state: State, error: str) -> Decision:
    if state.probation is None:
        return state, []
    return replace(state, probation=replace(state.probation, last_error=error)), []


def on_grace_over(state: State) -> Decision:
    state, _ = disarm(state, Timer.GRACE, cancel=False)
    if state.probation is None:
        return state, []
    return _healthy_yet(replace(state, probation=replace(state.probation, grace_done=True)))


def on_health_deadline(state: State) -> Decision:
    state, _ = disarm(state, Timer.HEALTH, cancel=False)
    reason = f"not healthy within {state.settings.health_timeout:g}s"
    if state.probation is not None and state.probation.last_error:
        reason += f" (last probe: {state.probation.last_error})"
    return on_probation_failed(state, reason)


def _healthy_yet(state: State) -> Decision:
    """Healthy once up `grace` and, with a probe, once it passed; a new release becomes good."""
    probation = state.probation
    if probation is None or not probation.grace_done or (
            state.settings.probe and not probation.probe_passed):
        return state, []
    state, actions = end_probation(state)
    state = replace(state, phase=Phase.RUNNING)
    facts: dict[str, object] = {"pid": state.child, "commit": state.child_commit}
    state, stop_old = stop_old_child(state, f"replaced by {state.child_commit}")
    if state.settings.releases and state.head is not None:
        # Newest last, so a rollback goes back to the release that served last; only the
        # newest few stay on disk, so only those can be reused without a build.
        if state.head not in state.good:
            facts["new_good_release"] = True
        good = tuple(c for c in state.good if c != state.head) + (state.head,)
        state = replace(state, good=good[-state.settings.releases_kept:])
    actions.append(Note(NoteName.HEALTH_PASSED, facts))
    if state.settings.fleet and state.child_commit is not None:
        # The group's word that this commit works (what the boxes after the canaries wait
        # for), and the slot this box took to restart is free again.
        actions += [ReportFleet(state.child_commit, healthy=True), ReleaseSlot()]
    state, more = deploy_queued(state)
    return state, actions + stop_old + more


def _rollback_target(state: State, bad: str | None) -> str | None:
    """Rule 6: the newest good release, if `bad` is a release that never proved healthy."""
    if not state.settings.releases or bad is None or bad in state.good:
        return None
    return newest_good(state, other_than=bad)


def on_probation_failed(state: State, reason: str, tail: str = "") -> Decision:
    state, actions = end_probation(state)
    bad = state.head if state.settings.releases else state.child_commit
    target = _rollback_target(state, bad)
    if state.old is not None and bad not in state.good:
        target = state.old.commit  # the old generation still serves: back to it (rule 6)
    facts: dict[str, object] = {"commit": bad, "reason": reason, "rollback_to": target}
    if tail:
        facts["tail"] = tail
    actions.append(Note(NoteName.HEALTH_FAILED, facts))
    if state.settings.fleet and target is not None and bad is not None:
        actions.append(ReportFleet(bad, healthy=False, reason=reason))  # held group-wide
    if target is not None and state.old is None:
        state = hold(state, bad)
    state = replace(state, rollback=Rollback(target, reason))
    if state.child is None:
        state, more = after_unhealthy_stopped(state, "")
        return state, actions + more
    state, timer = arm(replace(state, phase=Phase.ROLLING_BACK), Timer.STOP,
                       state.settings.stop_timeout)
    return state, actions + [StopChild(state.child, reason)] + timer


def after_unhealthy_stopped(state: State, tail: str) -> Decision:
    """The unhealthy child is gone: start the good release, or treat it as a crash."""
    state, actions = disarm(state, Timer.STOP)
    rollback = state.rollback or Rollback(None, "unhealthy")
    state = replace(state, rollback=None)
    if state.settings.fleet and state.old is not None:
        # The old generation never stopped serving: the box is back in. (A rollback by restart
        # is out until the good release passes its probation, which gives the slot back.)
        actions = actions + [ReleaseSlot()]
    if state.old is not None:
        return back_to_old_child(state, rollback.reason, tail, actions)
    if rollback.to is None:
        state, more = on_crash(state, rollback.reason)
        return state, actions + more
    bad = state.head
    facts: dict[str, object] = {"from": bad, "to": rollback.to, "reason": rollback.reason}
    if tail:
        facts["tail"] = tail
    actions += [Note(NoteName.RELEASE_ROLLING_BACK, facts)]
    state, more = start_child(replace(state, crashes=0), rollback.to, StartReason.ROLLBACK)
    # Set aside once `current` points away from it: the live release is never moved.
    return state, actions + more + ([SetAside(bad)] if bad is not None else [])
