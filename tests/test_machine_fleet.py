"""Named histories through the pure machine in fleet mode (issue 15): a deploy waits for the
group's go (FleetCleared) before it starts, and for one of the group's slots (SlotGranted)
before it takes the running app down; what a commit did here is reported to the group; the
group's hold is obeyed but never moves the release that runs. No IO, no clock, no etcd."""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import (
    AcquireSlot,
    AwaitFleet,
    BuildFailed,
    BuildSucceeded,
    ChildExited,
    FetchSucceeded,
    FleetCleared,
    FleetHeld,
    HealthProbeFailed,
    ReleaseSlot,
    ReportFleet,
    RollbackRequested,
    SetAside,
    SlotGranted,
    StartBuild,
    StartChild,
    StatsRead,
    StopChild,
    StopRequested,
    TreeUpdated,
    UpdateTree,
)
from supervisor.core.machine import Phase
from tests.machine_harness import A, B, C, Harness, kinds, of_type
from tests.test_machine_releases import RELEASES, live, prove, upstream

FLEET = replace(RELEASES, fleet=True)
IDLE = StatsRead(values={"n_clients": "0"})


def built_and_drained(harness: Harness, commit: str) -> list:
    """Cleared for `commit`: the release is checked out, built and drained."""
    actions = harness.feed(FleetCleared(commit=commit, why="canary"))
    actions += harness.feed(TreeUpdated(commit=commit))
    actions += harness.feed(BuildSucceeded(commit=commit))
    actions += harness.feed(IDLE)
    return actions


def on_probation_in_a_slot(harness: Harness, commit: str) -> None:
    """Upstream moved to `commit`: cleared, built, drained, granted a slot, restarted."""
    harness.feed(upstream(commit))
    built_and_drained(harness, commit)
    harness.feed(SlotGranted(commit=commit, slot=0))
    harness.feed(ChildExited(pid=harness.state.child, signal="SIGTERM"))
    assert harness.state.phase == Phase.PROBATION


def test_a_new_commit_waits_for_the_groups_go_and_touches_nothing_meanwhile():
    harness = live(FLEET)
    actions = harness.feed(upstream(B))
    assert kinds(actions) == ["fleet.deploy.waiting", "await_fleet"]
    assert of_type(actions, AwaitFleet) == [AwaitFleet(B)]
    assert harness.state.phase == Phase.RUNNING and harness.state.awaiting.commit == B
    assert harness.feed(upstream(B)) == [], "every poll finds it again: asked once"


def test_the_go_starts_the_deploy_and_a_slot_is_asked_only_once_built_and_drained():
    harness = live(FLEET)
    harness.feed(upstream(B))
    actions = harness.feed(FleetCleared(commit=B, why="canary"))
    assert of_type(actions, UpdateTree) == [UpdateTree(B)]
    actions = harness.feed(TreeUpdated(commit=B)) + harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, AcquireSlot) == [], "a slot only once drained"
    actions = harness.feed(IDLE)
    assert of_type(actions, AcquireSlot) == [AcquireSlot(B)]
    assert of_type(actions, StopChild) == [], "the app is not taken down without a slot"
    assert harness.state.phase == Phase.AWAITING_SLOT


def test_with_the_slot_the_app_restarts_and_once_healthy_the_commit_is_proven_and_slot_freed():
    harness = live(FLEET)
    harness.feed(upstream(B))
    built_and_drained(harness, B)
    actions = harness.feed(SlotGranted(commit=B, slot=0))
    assert [a.reason for a in of_type(actions, StopChild)] == [f"deploy {B}"]
    harness.feed(ChildExited(pid=harness.state.child, signal="SIGTERM"))
    assert harness.state.phase == Phase.PROBATION
    actions = prove(harness)
    assert of_type(actions, ReportFleet) == [ReportFleet(B, healthy=True)]
    assert of_type(actions, ReleaseSlot) == [ReleaseSlot()]
    assert harness.state.phase == Phase.RUNNING and harness.state.head == B


def test_a_commit_that_fails_its_health_gate_is_held_and_the_slot_freed_once_rolled_back():
    harness = live(FLEET)
    on_probation_in_a_slot(harness, B)
    harness.feed(HealthProbeFailed(pid=harness.state.child, error="refused"))
    actions = harness.fire("health")
    assert [(r.commit, r.healthy) for r in of_type(actions, ReportFleet)] == [(B, False)]
    assert of_type(actions, ReleaseSlot) == []
    actions = harness.feed(ChildExited(pid=harness.state.child, signal="SIGTERM"))
    assert of_type(actions, StartChild) == [StartChild(A, "rollback")]
    assert of_type(actions, ReleaseSlot) == [], "out until the good release serves again"
    actions = prove(harness)
    assert of_type(actions, ReleaseSlot) == [ReleaseSlot()], "rolled back: the slot is free"


def test_a_commit_that_fails_its_build_is_reported_for_the_group():
    harness = live(FLEET)
    harness.feed(upstream(B))
    harness.feed(FleetCleared(commit=B, why="canary"))
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 2"))
    assert [(r.commit, r.healthy) for r in of_type(actions, ReportFleet)] == [(B, False)]
    assert harness.state.failed == B and harness.state.phase == Phase.RUNNING


def test_a_group_hold_of_the_waiting_commit_drops_it_and_it_is_never_deployed_here():
    harness = live(FLEET)
    harness.feed(upstream(B))
    actions = harness.feed(FleetHeld(commit=B, box="fra-1", reason="health failed"))
    assert kinds(actions)[:2] == ["save_state", "fleet.commit_held"]
    assert of_type(actions, AwaitFleet) == [AwaitFleet(None)]
    assert harness.state.awaiting is None and harness.state.failed == B
    assert harness.feed(upstream(B))[0].event == "deploy.skipped"
    assert harness.feed(FleetCleared(commit=B, why="proven")) == [], "a stale go is ignored"


def test_a_group_hold_during_the_checkout_ends_the_deploy_once_it_is_done():
    harness = live(FLEET)
    harness.feed(upstream(B))
    harness.feed(FleetCleared(commit=B, why="proven"))
    actions = harness.feed(FleetHeld(commit=B, box="fra-1", reason="health failed"))
    assert kinds(actions) == ["save_state", "fleet.commit_held"], "no second checkout beside it"
    actions = harness.feed(TreeUpdated(commit=B))
    assert "deploy.failed" in kinds(actions) and of_type(actions, StopChild) == []
    assert of_type(actions, StartBuild) == [], "nothing built for a held commit"
    assert of_type(actions, ReportFleet) == [], "the group's hold is not reported back to it"
    assert of_type(actions, SetAside) == [SetAside(B)]
    assert harness.state.phase == Phase.RUNNING and harness.state.head == A


def test_the_group_never_moves_the_release_that_runs():
    harness = live(FLEET)
    actions = harness.feed(FleetHeld(commit=A, box="fra-1", reason="health failed"))
    assert actions == [] and harness.state.refused == () and harness.state.head == A


def test_a_group_hold_of_a_commit_not_seen_yet_skips_it_when_it_comes():
    harness = live(FLEET)
    harness.feed(FleetHeld(commit=C, box="fra-1", reason="build failed"))
    assert harness.feed(upstream(C))[0].event == "deploy.skipped"


def test_the_app_dying_while_waiting_for_a_slot_restarts_the_live_release_and_keeps_waiting():
    harness = live(FLEET)
    harness.feed(upstream(B))
    built_and_drained(harness, B)
    actions = harness.feed(ChildExited(pid=harness.state.child, exit_code=1))
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]
    assert of_type(actions, ReleaseSlot) == [], "still waiting for its slot"
    assert harness.state.phase == Phase.AWAITING_SLOT
    actions = harness.feed(SlotGranted(commit=B, slot=0))
    assert [a.reason for a in of_type(actions, StopChild)] == [f"deploy {B}"]


def test_a_grant_that_comes_when_nothing_waits_for_it_is_given_back():
    harness = live(FLEET)
    late = harness.feed(SlotGranted(commit=B, slot=0))
    assert of_type(late, ReleaseSlot) == [ReleaseSlot(B)]


def test_a_newer_commit_found_while_busy_waits_for_its_own_go():
    harness = live(FLEET)
    harness.feed(upstream(B))
    built_and_drained(harness, B)
    harness.feed(upstream(C))
    assert harness.state.pending == C
    harness.feed(SlotGranted(commit=B, slot=0))
    harness.feed(ChildExited(pid=harness.state.child, signal="SIGTERM"))
    actions = prove(harness)
    assert of_type(actions, AwaitFleet) == [AwaitFleet(C)]
    assert of_type(actions, UpdateTree) == [], "C is not cleared yet"


def test_a_go_that_comes_during_a_probation_deploys_once_healthy():
    harness = live(FLEET)
    on_probation_in_a_slot(harness, B)
    harness.feed(upstream(C))
    assert harness.state.phase == Phase.PROBATION
    harness.state = replace(harness.state, awaiting=harness.state.queued, queued=None)
    harness.feed(FleetCleared(commit=C, why="proven"))
    actions = prove(harness)
    assert of_type(actions, UpdateTree) == [UpdateTree(C)]


def test_upstream_going_back_cancels_the_wait():
    harness = live(FLEET)
    harness.feed(upstream(B))
    actions = harness.feed(upstream(A))
    assert of_type(actions, AwaitFleet) == [AwaitFleet(None)]
    assert harness.state.awaiting is None


def test_a_rollback_by_hand_is_reported_and_needs_a_slot_but_no_go():
    harness = live(FLEET, good=(C, A))
    on_probation_in_a_slot(harness, B)
    prove(harness)
    actions = harness.feed(RollbackRequested())
    assert ReportFleet(B, healthy=False, reason="rolled back by hand") in actions
    assert of_type(actions, AwaitFleet) == []
    actions = harness.feed(TreeUpdated(commit=A)) + harness.feed(IDLE)
    assert of_type(actions, AcquireSlot) == [AcquireSlot(A)]


def test_a_stop_gives_the_slot_back():
    harness = live(FLEET)
    harness.feed(upstream(B))
    built_and_drained(harness, B)
    actions = harness.feed(StopRequested(signal="SIGTERM"))
    assert ReleaseSlot() in actions and harness.state.phase == Phase.SHUTTING_DOWN


def test_without_fleet_nothing_waits():
    harness = live()
    actions = harness.feed(upstream(B))
    assert of_type(actions, UpdateTree) == [UpdateTree(B)]
    for cls in (AwaitFleet, AcquireSlot, ReleaseSlot, ReportFleet):
        assert of_type(harness.actions, cls) == []


def test_a_fetch_result_is_never_replaced_by_the_groups_word():
    """The group clears only the commit this box's own fetch found: a go for another commit
    starts nothing."""
    harness = live(FLEET)
    harness.feed(upstream(B))
    assert harness.feed(FleetCleared(commit=C, why="canary")) == []
    assert harness.state.phase == Phase.RUNNING and harness.state.awaiting.commit == B
    assert isinstance(upstream(B), FetchSucceeded)


def test_a_box_with_no_release_yet_asks_the_group_and_never_builds_a_held_commit():
    from supervisor.core.machine import initial_state

    fresh = Harness(initial_state(FLEET))
    actions = fresh.feed(upstream(B))
    assert of_type(actions, AwaitFleet) == [AwaitFleet(B)] and of_type(actions, UpdateTree) == []
    fresh.feed(FleetHeld(commit=B, box="fra-1", reason="exited on probation"))
    assert fresh.state.failed == B and fresh.state.child is None
    assert of_type(fresh.feed(upstream(B)), UpdateTree) == []

    cleared = Harness(initial_state(FLEET))
    cleared.feed(upstream(B))
    actions = cleared.feed(FleetCleared(commit=B, why="proven"))
    assert of_type(actions, UpdateTree) == [UpdateTree(B)]
    cleared.feed(TreeUpdated(commit=B))
    actions = cleared.feed(BuildSucceeded(commit=B))
    assert of_type(actions, AcquireSlot) == [], "nothing serves: no slot to take"
    assert [a.commit for a in of_type(actions, StartChild)] == [B]
