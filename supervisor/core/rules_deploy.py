"""Rules for deploying a commit: which commit a fetch asks for, the drain, the tree update, the
build, the restart into the target, and what a failed deploy leaves behind (rules 2, 3 and 4).
In place the drain comes first, then update and build; in release mode the build runs beside
the live release and the drain comes last, just before the restart.
"""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import (
    AcquireSlot,
    Action,
    AwaitFleet,
    CheckOverlap,
    FetchFailed,
    FetchSucceeded,
    Note,
    NoteName,
    ReleaseSlot,
    ReportFleet,
    SetAside,
    StartBuild,
    StartReason,
    StopChild,
    Timer,
    UnwatchStats,
    UpdateTree,
    WatchStats,
)
from supervisor.core.rules_crash import start_child
from supervisor.core.state import (
    Decision,
    Deploy,
    DeployKind,
    Phase,
    State,
    Target,
    arm,
    disarm,
    hold,
    is_held,
    newest_good,
    without_child,
)

# ---------------------------------------------------------------------------------------------
# What a fetch asks for


def deploy_candidate(state: State, fetch: FetchSucceeded) -> tuple[Target | None, list[Action]]:
    """Which commit this fetch asks us to deploy, if any, and how. In release mode any other
    commit is deployed, force-pushed or not: no local work can be lost in a release the
    supervisor checked out itself."""
    facts: dict[str, object] = {"head": fetch.head, "upstream": fetch.upstream}
    if state.settings.releases:
        if fetch.upstream == state.head:
            return None, []
        if is_held(state, fetch.upstream):
            return None, [Note(NoteName.DEPLOY_SKIPPED, {"head": state.head,
                                                         "upstream": fetch.upstream,
                                                         "reason": "failed before"})]
        return Target(fetch.upstream), []
    if fetch.relation == "same":
        return None, []
    if fetch.dirty:
        return None, [Note(NoteName.GIT_DIRTY, facts)]
    reset = fetch.relation != "behind"
    if reset and not state.settings.reset_on_diverge:
        return None, [Note(NoteName.GIT_DIVERGED, facts | {"relation": fetch.relation})]
    if is_held(state, fetch.upstream):
        return None, [Note(NoteName.DEPLOY_SKIPPED, facts | {"reason": "failed before"})]
    return Target(fetch.upstream, reset), []


def on_fetch(state: State, fetch: FetchSucceeded) -> Decision:
    releases = state.settings.releases
    if not releases:
        state = replace(state, head=fetch.head)
    target, notes = deploy_candidate(state, fetch)
    if target is None:
        at_head = fetch.upstream == state.head if releases else fetch.relation == "same"
        # A held commit that runs is being left on purpose (a rollback by hand): not a reason
        # to cancel the deploy away from it.
        upstream_went_back = (at_head and state.target != fetch.upstream
                              and not is_held(state, fetch.upstream))
        if at_head and state.awaiting is not None:
            # Upstream went back to what runs: the commit waiting for the fleet is gone.
            state = replace(state, awaiting=None)
            notes = notes + [Note(NoteName.DEPLOY_CANCELLED, {"upstream": fetch.upstream}),
                             AwaitFleet(None)]
        if upstream_went_back and state.phase == Phase.DRAINING:
            # Upstream went back to what runs: the deploy we were draining for is gone.
            state, actions = abandon_deploy(state)
            return state, notes + [Note(NoteName.DEPLOY_CANCELLED,
                                        {"upstream": fetch.upstream})] + actions
        return state, notes
    match state.phase:
        case Phase.RUNNING | Phase.BACKOFF:
            state, actions = begin_deploy(state, target)
            return state, notes + actions
        case Phase.DRAINING if (state.deploy and state.target != state.built
                                and may_go_straight_to(state, target)):
            # Nothing has been built for the old target yet: drain for the newest instead.
            return replace(state, deploy=replace(state.deploy, target=target)), notes
        case _ if target.commit != state.target:
            return replace(state, queued=target), notes  # rule 3: the newest wins
    return state, notes


# ---------------------------------------------------------------------------------------------
# At start: converge on what should run


def reconcile_at_start(state: State, event: FetchSucceeded | FetchFailed) -> Decision:
    if state.settings.releases:
        return _reconcile_releases_at_start(state, event)
    head = event.head
    state = replace(state, head=head)
    notes: list[Action] = []
    if isinstance(event, FetchSucceeded):
        target, notes = deploy_candidate(state, event)
        if target is not None:
            state = replace(state, deploy=Deploy(target), phase=Phase.UPDATING,
                            deploys=state.deploys + 1)
            facts = {"commit": target.commit, "reset": target.reset}
            return state, notes + [Note(NoteName.DEPLOY_STARTED, facts),
                                   update_tree(state, target)]
    if state.settings.has_build and head is not None and head != state.built:
        if head == state.failed and state.built is not None:
            # Killed before the tree went back after a failed build: finish going back.
            return _revert(state, state.built, notes)
        state = replace(state, deploy=Deploy(Target(head)), phase=Phase.BUILDING,
                        deploys=state.deploys + 1)
        return state, notes + [StartBuild(head)]
    state, actions = start_child(state, head, StartReason.STARTUP)
    return state, notes + actions


def _reconcile_releases_at_start(state: State, event: FetchSucceeded | FetchFailed) -> Decision:
    """Start the live release (on probation if it never proved healthy: a supervisor killed
    mid-deploy converges here); a newer commit is deployed once it is up. With no release
    yet, the first one is built from upstream, or from the repository's HEAD."""
    candidate: Target | None = None
    notes: list[Action] = []
    if isinstance(event, FetchSucceeded):
        candidate, notes = deploy_candidate(state, event)
    if state.head is not None and is_held(state, state.head):
        # Killed while leaving a held release (a rollback, by hand or not, before `current`
        # moved): finish leaving it for the newest good one.
        previous = newest_good(state, other_than=state.head)
        if previous is not None:
            note = Note(NoteName.RELEASE_ROLLBACK_RESUMED, {"from": state.head, "to": previous})
            state, actions = start_child(replace(state, queued=candidate), previous,
                                         StartReason.ROLLBACK)
            return state, notes + [note] + actions
    if state.head is not None:
        state, actions = start_child(replace(state, queued=candidate), state.head,
                                     StartReason.STARTUP)
        return state, notes + actions
    first = candidate.commit if candidate else (
        event.head if event.head and not is_held(state, event.head) else None)
    if first is None:
        return replace(state, phase=Phase.RUNNING), notes + [
            Note(NoteName.CHILD_NOTHING_TO_RUN,
                 {"reason": "no release yet and no commit to build"})]
    if not may_go_straight_to(state, Target(first)):
        # Fleet mode: even a first release asks the group, which may hold the commit (a box
        # added after a bad push must not serve it); its go starts the deploy (begin_deploy).
        state, actions = begin_deploy(replace(state, phase=Phase.RUNNING), Target(first))
        return state, notes + actions
    state = replace(state, deploy=Deploy(Target(first)), phase=Phase.UPDATING,
                    deploys=state.deploys + 1)
    return state, notes + [Note(NoteName.DEPLOY_STARTED, {"commit": first, "reset": False}),
                           update_tree(state, Target(first))]


# ---------------------------------------------------------------------------------------------
# A deploy from its start to the restart


def update_tree(state: State, target: Target) -> UpdateTree:
    """In release mode a release kept on disk is reused only if it is live or proved healthy:
    any other leftover (a build cut short) is checked out again from scratch."""
    reuse = state.settings.releases and (target.commit in state.good
                                         or target.commit == state.head)
    return UpdateTree(target.commit, target.reset, reuse=reuse)


def may_go_straight_to(state: State, target: Target) -> bool:
    """Fleet mode: only a commit the group cleared for this box (or one proven healthy here
    before) is deployed without asking; any other waits for FleetCleared first."""
    return (not state.settings.fleet or target.commit == state.cleared
            or target.commit in state.good)


def begin_deploy(state: State, target: Target, kind: DeployKind = DeployKind.DEPLOY) -> Decision:
    if kind == DeployKind.DEPLOY and not may_go_straight_to(state, target):
        if state.awaiting == target:
            return state, []  # asked already: every poll finds the same commit again
        state = replace(state, awaiting=target)
        return state, [Note(NoteName.FLEET_DEPLOY_WAITING, {"commit": target.commit,
                                                            "for": "go"}),
                       AwaitFleet(target.commit)]
    state = replace(state, awaiting=None)
    state, actions = disarm(state, Timer.BACKOFF)
    watching = state.deploy is not None and state.deploy.watching
    state = replace(state, deploy=Deploy(target, kind, watching=watching),
                    deploys=state.deploys + 1)
    if state.settings.releases and kind != DeployKind.RESTART:
        # Built beside the live release, which serves until the build is done.
        state = replace(state, phase=Phase.UPDATING)
        return state, actions + [
            Note(NoteName.DEPLOY_STARTED, {"commit": target.commit, "reset": False}),
            update_tree(state, Target(target.commit))]
    if state.child is None or state.settings.drain_condition is None:
        return after_drain(state, actions)
    state, more = _watch_drain(state, built=False)
    return state, actions + more


def deploy_queued(state: State) -> Decision:
    """A commit found while we were busy is deployed once the child is up and proven."""
    if state.queued is None or state.phase != Phase.RUNNING:
        return state, []
    target = state.queued
    return begin_deploy(replace(state, queued=None), target)


def _watch_drain(state: State, built: bool) -> Decision:
    """Wait in DRAINING until the stats satisfy drain.until (or the drain timeout fires)."""
    assert state.deploy is not None
    actions: list[Action] = [Note(NoteName.DEPLOY_WAITING_FOR_DRAIN,
                                  {"commit": state.target, "built": built})]
    if not state.deploy.watching:
        actions.append(WatchStats())
        if state.settings.drain_timeout > 0:
            state, timer = arm(state, Timer.DRAIN, state.settings.drain_timeout)
            actions += timer
    state = replace(state, phase=Phase.DRAINING,
                    deploy=replace(state.deploy, watching=True))
    return state, actions


def _satisfied(state: State, values: dict[str, str] | None) -> bool:
    condition = state.settings.drain_condition
    return values is not None and condition is not None and condition.holds(values)


def _drain_done(state: State) -> bool:
    deploy = state.deploy
    return state.child is None or (deploy is not None and (deploy.drained or deploy.drain_expired))


def note_stats(state: State, values: dict[str, str] | None) -> State:
    """Stats read while the deploy is not draining (in place: updating or building)."""
    if state.deploy is None:
        return state
    return replace(state, deploy=replace(state.deploy, drained=_satisfied(state, values)))


def on_stats(state: State, values: dict[str, str] | None) -> Decision:
    state = note_stats(state, values)
    if state.deploy is None or not state.deploy.drained:
        return state, []
    return after_drain(state, [Note(NoteName.DRAIN_SATISFIED, {"stats": values})])


def on_drain_timeout(state: State) -> Decision:
    if state.deploy is not None:
        state = replace(state, deploy=replace(state.deploy, drain_expired=True))
    state, _ = disarm(state, Timer.DRAIN, cancel=False)
    note = Note(NoteName.DRAIN_TIMED_OUT, {"timeout": state.settings.drain_timeout})
    if state.phase == Phase.DRAINING:
        return after_drain(state, [note])
    return state, [note]


def on_exit_while_draining(state: State, reason: str) -> Decision:
    """Rule 2: a child that died needs no drain."""
    notes: list[Action] = [Note(NoteName.DRAIN_CHILD_EXITED, {"reason": reason})]
    state, actions = end_drain(without_child(state))
    return after_drain(state, notes + actions)


def after_drain(state: State, actions: list[Action]) -> Decision:
    """Drained: update and build the target, or, if that is done already, restart into it.
    (In release mode the drain comes after the build.)"""
    assert state.deploy is not None
    if state.settings.releases:
        state, more = restart_into_target(state)
        return state, actions + more
    target = state.deploy.target
    already_built = target.commit == state.built or (
        state.restart_requested and not state.settings.has_build)
    if already_built and target.commit == state.head:
        state, more = restart_into_target(state)
        return state, actions + more
    state = replace(state, phase=Phase.UPDATING)
    facts = {"commit": target.commit, "reset": target.reset}
    return state, actions + [Note(NoteName.DEPLOY_STARTED, facts),
                             update_tree(state, target)]


def end_drain(state: State) -> Decision:
    """Stop watching stats and forget the drain timer: the deploy stops waiting on clients."""
    actions: list[Action] = [UnwatchStats()] if state.draining else []
    if state.deploy is not None:
        state = replace(state, deploy=replace(state.deploy, watching=False))
    state, cancel = disarm(state, Timer.DRAIN)
    return state, actions + cancel


def abandon_deploy(state: State) -> Decision:
    state, actions = end_drain(state)
    return replace(state, deploy=None, phase=Phase.RUNNING), actions


def held_by_fleet(state: State) -> bool:
    """Fleet mode: the group held the target while it was being checked out or built."""
    deploy = state.deploy
    return (state.settings.fleet and deploy is not None and deploy.kind == DeployKind.DEPLOY
            and is_held(state, deploy.target.commit))


def on_tree_updated(state: State, commit: str) -> Decision:
    if state.deploy is not None and state.deploy.kind == DeployKind.REVERT:
        return _on_reverted(replace(state, head=commit), None)
    if held_by_fleet(state):
        return on_deploy_failed(state, "held by the fleet")
    if not state.settings.releases:
        state = replace(state, head=commit)  # release mode: `head` stays the live release
    proven = state.settings.releases and commit in state.good  # built before: reuse it
    if state.settings.has_build and not proven:
        return replace(state, phase=Phase.BUILDING), [StartBuild(commit)]
    return on_built(replace(state, built=commit))


def on_tree_update_failed(state: State, error: str) -> Decision:
    if state.deploy is not None and state.deploy.kind == DeployKind.REVERT:
        return _on_reverted(state, error)
    return on_deploy_failed(state, "tree update failed: " + error, box_side=True)


def on_built(state: State) -> Decision:
    assert state.deploy is not None
    if held_by_fleet(state):
        return on_deploy_failed(state, "held by the fleet")
    if state.queued is not None and may_go_straight_to(state, state.queued):
        # Still drained from before: go straight on to the newest commit.
        target = state.queued
        state = replace(state, deploy=replace(state.deploy, target=target), queued=None,
                        phase=Phase.UPDATING)
        return state, [Note(NoteName.DEPLOY_SUPERSEDED, {"commit": target.commit}),
                       update_tree(state, target)]
    if state.settings.drain_condition is not None and not _drain_done(state):
        # Clients connected while we built (the old child kept serving): wait for them again.
        # (In release mode the drain starts only now.)
        return _watch_drain(state, built=True)
    return restart_into_target(state)


def restart_into_target(state: State) -> Decision:
    state, actions = end_drain(state)
    if state.child is None:
        reason = StartReason.DEPLOY if state.child_commit is not None else StartReason.STARTUP
        state, more = start_target(state, reason)
        return state, actions + more
    if _needs_slot(state):
        assert state.deploy is not None
        commit = state.deploy.target.commit
        state = replace(state, phase=Phase.AWAITING_SLOT)
        return state, actions + [Note(NoteName.FLEET_DEPLOY_WAITING, {"commit": commit,
                                                                      "for": "slot"}),
                                 AcquireSlot(commit)]
    if state.settings.overlap and state.old is None:
        return replace(state, phase=Phase.RESTARTING), actions + [CheckOverlap(state.child)]
    state, more = stop_for_restart(state)
    return state, actions + more


def _needs_slot(state: State) -> bool:
    """Fleet mode: a deploy takes the running app down only in one of the group's slots (a
    restart asked for by hand is the operator's call, and a dead child is down already)."""
    deploy = state.deploy
    return (state.settings.fleet and deploy is not None and deploy.kind == DeployKind.DEPLOY
            and not deploy.slot)


def start_target(state: State, reason: StartReason) -> Decision:
    """The deploy is done once its target starts; what follows (probation) is the start's. A
    crash restart of the live release still waiting (release mode) has nothing left to do."""
    commit = state.target
    state, cancel = disarm(replace(state, deploy=None, crashes=0), Timer.BACKOFF)
    state, actions = start_child(state, commit, reason)
    return state, cancel + actions


def stop_for_restart(state: State) -> Decision:
    assert state.child is not None
    state, timer = arm(replace(state, phase=Phase.RESTARTING), Timer.STOP,
                       state.settings.stop_timeout)
    reason = "restart requested" if state.restart_requested else f"deploy {state.target}"
    if state.deploy is not None and state.deploy.drain_expired:
        reason += " (drain timed out)"
    return state, [StopChild(state.child, reason)] + timer


def on_stopped_for_restart(state: State) -> Decision:
    state, cancel = disarm(without_child(state), Timer.STOP)
    reason = StartReason.RESTART if state.restart_requested else StartReason.DEPLOY
    state, actions = start_target(state, reason)
    return state, cancel + actions


# ---------------------------------------------------------------------------------------------
# A failed deploy


def on_deploy_failed(state: State, reason: str, for_the_fleet: bool = False,
                     box_side: bool = False) -> Decision:
    """`for_the_fleet`: the commit itself failed (its build), not this box: the whole group
    holds it. `box_side`: this box failed (a checkout on a full disk), not the commit: in fleet
    mode it is tried again at the next fetch, since the group waits on it (a canary)."""
    failed = state.target
    if not (box_side and state.settings.fleet):
        state = hold(state, failed)
    actions: list[Action] = [Note(NoteName.DEPLOY_FAILED, {"commit": failed, "reason": reason})]
    if state.settings.fleet:
        if for_the_fleet and failed is not None:
            actions.append(ReportFleet(failed, healthy=False, reason=reason))
        actions.append(ReleaseSlot())
    if state.settings.releases and failed is not None and failed != state.head \
            and failed not in state.good:
        actions.append(SetAside(failed))  # never the live release, nor one proven good
    if (state.queued is not None and state.deploy is not None
            and may_go_straight_to(state, state.queued)):
        # Still draining for this deploy: keep watching and go on with the newer commit.
        target = state.queued
        state = replace(state, deploy=replace(state.deploy, target=target), queued=None,
                        phase=Phase.UPDATING)
        return state, actions + [update_tree(state, target)]
    state, more = abandon_deploy(state)
    actions += more
    good = state.built
    if (not state.settings.releases and state.head == failed and good is not None
            and good != failed):
        # The tree now holds the commit that failed to build: a crash restart, or a restarted
        # supervisor, would run it. Go back to the last good build before anything starts.
        return _revert(state, good, actions)
    return _carry_on_after_failure(state, actions, StartReason.AS_IT_IS)


def _revert(state: State, good: str, actions: list[Action]) -> Decision:
    state = replace(state, deploy=Deploy(Target(good, reset=True), DeployKind.REVERT),
                    phase=Phase.UPDATING)
    return state, actions + [Note(NoteName.DEPLOY_REVERTING, {"commit": good}),
                             update_tree(state, Target(good, reset=True))]


def _on_reverted(state: State, error: str | None) -> Decision:
    commit = state.target
    if error is None:
        note = Note(NoteName.DEPLOY_REVERTED, {"commit": commit})
        reason = StartReason.BACK_ON_GOOD
    else:
        note = Note(NoteName.DEPLOY_REVERT_FAILED, {"commit": commit, "error": error})
        reason = StartReason.AS_IT_IS
    state = replace(state, deploy=None, phase=Phase.RUNNING)
    return _carry_on_after_failure(state, [note], reason)


def _carry_on_after_failure(state: State, actions: list[Action],
                            reason: StartReason) -> Decision:
    """After a failed deploy: a newer commit found meanwhile goes next; else make sure a child
    runs (it may have died during the build)."""
    if state.queued is not None:
        target = state.queued
        state, more = begin_deploy(replace(state, queued=None), target)
        return state, actions + more
    if state.child is None:
        state, cancel = disarm(state, Timer.BACKOFF)  # the live release starts now
        state, more = start_child(state, state.head, reason)
        return state, actions + cancel + more
    return state, actions


def request_rollback(state: State, previous: str) -> Decision:
    """`supervisor rollback` to `previous`: the live release is held (rule 4) until upstream
    moves on, and no longer counts as good."""
    state = replace(hold(state, state.head), good=tuple(c for c in state.good if c != state.head))
    notes: list[Action] = [Note(NoteName.RELEASE_ROLLBACK_REQUESTED, {"from": state.head,
                                                                      "to": previous})]
    if state.settings.fleet and state.head is not None:
        notes.append(ReportFleet(state.head, healthy=False, reason="rolled back by hand"))
    state, actions = begin_deploy(state, Target(previous))
    return state, notes + actions
