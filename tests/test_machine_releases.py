"""Named histories through the pure machine in release mode and with a health gate: build
beside the live release, drain after the build, probation, rollback to the newest good release.
No IO, no clock, no sleeps."""

from __future__ import annotations

from dataclasses import replace

from supervisor.core.events import (
    BuildFailed,
    BuildSucceeded,
    CancelTimer,
    CheckOverlap,
    ChildExited,
    FetchFailed,
    FetchSucceeded,
    HealthPassed,
    HealthProbeFailed,
    KillChild,
    OverlapChecked,
    ProbeHealth,
    RollbackRequested,
    SetAside,
    StartBuild,
    StartChild,
    StatsRead,
    StopChild,
    StopProbe,
    StopRequested,
    SwitchRelease,
    TreeUpdated,
    UpdateTree,
    WatchStats,
)
from supervisor.core.machine import Phase, Settings, initial_state
from tests.machine_harness import DRAIN, A, B, C, Harness, kinds, of_type

RELEASES = replace(DRAIN, releases=True, health_gate=True, grace=2.0, probe=True,
                   health_timeout=30.0)
IN_PLACE_GATED = replace(DRAIN, health_gate=True, grace=2.0, probe=False, health_timeout=30.0)
BUSY = StatsRead(values={"n_clients": "2"})
IDLE = StatsRead(values={"n_clients": "0"})


def upstream(commit: str) -> FetchSucceeded:
    """What the release-mode git driver reports: it does not compare with the repo's HEAD."""
    return FetchSucceeded(head="e" * 40, upstream=commit, relation="unknown")


def live(settings: Settings = RELEASES, good: tuple[str, ...] = (A,), commit: str = A) -> Harness:
    """Release `commit` live and proven (pid 101), in RUNNING."""
    harness = Harness(initial_state(settings, built=commit, live=commit, good=good))
    harness.feed(upstream(commit))
    prove(harness)
    harness.actions.clear()
    return harness


def prove(harness: Harness) -> list:
    """The child on probation passes its probe and stays up its grace."""
    assert harness.state.phase == Phase.PROBATION, harness.state.phase
    actions = harness.feed(HealthPassed(pid=harness.state.child))
    return actions + harness.fire("grace")


def deploy_to_probation(harness: Harness, commit: str) -> None:
    harness.feed(upstream(commit))
    harness.feed(TreeUpdated(commit=commit))
    harness.feed(BuildSucceeded(commit=commit))
    harness.feed(IDLE)
    harness.feed(ChildExited(pid=harness.state.child, signal="SIGTERM"))
    assert harness.state.phase == Phase.PROBATION


def test_a_release_is_built_while_the_live_one_serves_and_drained_only_then():
    harness = live()
    actions = harness.feed(upstream(B))
    assert kinds(actions) == ["deploy.started", "update_tree"]
    assert harness.state.phase == Phase.UPDATING and harness.state.head == A
    assert of_type(actions, WatchStats) == [], "drained before the build"
    harness.feed(TreeUpdated(commit=B))
    assert harness.state.head == A, "the live release is still A"
    assert of_type(harness.actions, StartBuild) == [StartBuild(B)]
    actions = harness.feed(BuildSucceeded(commit=B))
    assert harness.state.phase == Phase.DRAINING
    assert "watch_stats" in kinds(actions) and "start_timer" in kinds(actions)
    assert harness.feed(BUSY) == []
    actions = harness.feed(IDLE)
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {B}")]
    actions = harness.feed(ChildExited(pid=101, signal="SIGTERM"))
    assert of_type(actions, StartChild) == [StartChild(B, "deploy")]
    assert harness.state.phase == Phase.PROBATION and harness.state.head == B
    assert ProbeHealth(102) in actions
    assert harness.state.good == (A,), "good before it proved anything"
    actions = prove(harness)
    assert harness.state.phase == Phase.RUNNING and harness.state.good == (A, B)
    assert "health.passed" in kinds(actions)


def test_healthy_needs_both_the_probe_and_the_grace():
    harness = live()
    deploy_to_probation(harness, B)
    harness.fire("grace")
    assert harness.state.phase == Phase.PROBATION, "healthy without the probe"
    harness.feed(HealthPassed(pid=102))
    assert harness.state.phase == Phase.RUNNING


def test_a_release_that_crashes_on_probation_is_rolled_back_to_the_newest_good():
    harness = live(good=(C, A))
    deploy_to_probation(harness, B)
    actions = harness.feed(ChildExited(pid=102, exit_code=3, tail="boom"))
    failed = next(a for a in actions if kinds([a]) == ["health.failed"])
    assert failed.facts["rollback_to"] == A and failed.facts["tail"] == "boom"
    starts = of_type(actions, StartChild)
    assert starts == [StartChild(A, "rollback")]
    # Set aside only after `current` moved away from it.
    assert kinds(actions).index("set_aside") > kinds(actions).index("start_child")
    assert of_type(actions, SetAside) == [SetAside(B)]
    assert harness.state.failed == B and harness.state.head == A
    assert harness.state.phase == Phase.PROBATION
    prove(harness)
    # The same bad commit upstream is not deployed again; a newer one is.
    assert kinds(harness.feed(upstream(B))) == ["deploy.skipped"]
    assert "update_tree" in kinds(harness.feed(upstream(C)))


def test_a_release_that_misses_its_deadline_is_stopped_then_rolled_back():
    harness = live()
    deploy_to_probation(harness, B)
    harness.feed(HealthProbeFailed(pid=102, error="HTTP 503"))
    actions = harness.fire("health")
    assert of_type(actions, StopChild) == [
        StopChild(102, "not healthy within 30s (last probe: HTTP 503)")]
    assert StopProbe() in actions
    assert harness.state.phase == Phase.ROLLING_BACK
    actions = harness.feed(ChildExited(pid=102, signal="SIGTERM", tail="last words"))
    rolling = next(a for a in actions if kinds([a]) == ["release.rolling_back"])
    assert rolling.facts == {"from": B, "to": A, "tail": "last words",
                             "reason": "not healthy within 30s (last probe: HTTP 503)"}
    assert of_type(actions, StartChild) == [StartChild(A, "rollback")]


def test_one_that_will_not_stop_is_killed_at_the_stop_timeout():
    harness = live()
    deploy_to_probation(harness, B)
    harness.fire("health")
    actions = harness.fire("stop")
    assert kinds(actions) == ["kill_child"]


def test_a_good_release_that_fails_later_is_a_crashing_child_not_a_bad_deploy():
    harness = live(good=(C, A))
    harness.feed(ChildExited(pid=101, exit_code=1))  # a crash: restarted at once, on probation
    assert harness.state.phase == Phase.PROBATION
    actions = harness.feed(ChildExited(pid=102, exit_code=1))
    assert of_type(actions, StartChild) == [], "a quick second crash backs off"
    assert harness.state.phase == Phase.BACKOFF and harness.state.head == A
    assert harness.state.failed is None


def test_with_no_good_release_to_go_back_to_a_failing_release_is_crash_restarted():
    harness = Harness(initial_state(RELEASES))
    actions = harness.feed(upstream(A))
    assert of_type(actions, UpdateTree) == [UpdateTree(A, False)]
    harness.feed(TreeUpdated(commit=A))
    actions = harness.feed(BuildSucceeded(commit=A))
    assert of_type(actions, StartChild) == [StartChild(A, "startup")]
    actions = harness.feed(ChildExited(pid=101, exit_code=3))
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]
    assert harness.state.failed is None


def test_in_place_a_failed_probation_counts_as_a_crash():
    harness = Harness.new(IN_PLACE_GATED, built=A)
    harness.feed(FetchSucceeded(head=A, upstream=A, relation="same"))
    assert harness.state.phase == Phase.PROBATION
    actions = harness.fire("health")
    assert of_type(actions, StopChild) == [StopChild(101, "not healthy within 30s")]
    actions = harness.feed(ChildExited(pid=101, signal="SIGTERM"))
    assert kinds(actions)[:2] == ["cancel_timer", "child.restarting"] or \
        "child.restarting" in kinds(actions)
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]


def test_a_supervisor_restarted_on_an_unproven_release_rolls_it_back_if_it_fails():
    # `current` points to B, which never proved healthy (killed during its probation).
    harness = Harness(initial_state(RELEASES, live=B, good=(A,)))
    harness.fail_starts = True  # B's directory is broken; A's start fails too, as a crash
    actions = harness.feed(upstream(B))
    assert of_type(actions, StartChild)[:2] == [StartChild(B, "startup"),
                                                StartChild(A, "rollback")]
    assert harness.state.failed == B and harness.state.head == A


def test_at_start_a_newer_commit_waits_for_the_live_release_to_prove_healthy():
    harness = Harness(initial_state(RELEASES, live=A, good=(A,)))
    harness.feed(upstream(B))
    assert harness.state.pending == B and harness.state.phase == Phase.PROBATION
    actions = prove(harness)
    assert of_type(actions, UpdateTree) == [UpdateTree(B, False)]


def test_a_fetch_failure_at_the_first_start_builds_the_repository_head():
    harness = Harness(initial_state(RELEASES))
    actions = harness.feed(FetchFailed(error="down", head=C))
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False)]


def test_the_live_release_keeps_its_crash_rules_during_a_build():
    """Its release is untouched by the build beside it: a death restarts it at once, a quick
    second one after the backoff, never waiting for the build (issue 12, section 8)."""
    harness = live()
    harness.feed(upstream(B))
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(ChildExited(pid=101, exit_code=1))
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]
    assert harness.state.phase == Phase.BUILDING and harness.state.child == 102
    actions = harness.feed(ChildExited(pid=102, exit_code=1))
    assert of_type(actions, StartChild) == [] and "child.backing_off" in kinds(actions)
    assert harness.state.phase == Phase.BUILDING and "backoff" in harness.armed()
    actions = harness.fire("backoff")
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]
    assert harness.state.phase == Phase.BUILDING and harness.state.child == 103
    harness.feed(BuildSucceeded(commit=B))
    assert harness.state.phase == Phase.DRAINING, "the restarted release is drained as usual"
    actions = harness.feed(IDLE)
    assert of_type(actions, StopChild) == [StopChild(103, f"deploy {B}")]


def test_a_build_that_ends_during_the_backoff_starts_the_new_release():
    harness = live()
    harness.feed(upstream(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(ChildExited(pid=102, exit_code=1))
    actions = harness.feed(BuildSucceeded(commit=B))
    assert CancelTimer("backoff") in actions
    assert of_type(actions, StartChild) == [StartChild(B, "deploy")]


def test_a_build_that_fails_during_the_backoff_starts_the_live_release_at_once():
    harness = live()
    harness.feed(upstream(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(ChildExited(pid=102, exit_code=1))
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    assert CancelTimer("backoff") in actions
    assert of_type(actions, StartChild)[-1].commit == A
    assert "backoff" not in harness.armed()


def test_a_failed_build_is_set_aside_and_the_live_release_untouched():
    harness = live()
    harness.feed(upstream(B))
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    assert of_type(actions, SetAside) == [SetAside(B)]
    assert of_type(actions, StopChild) == [] and of_type(actions, UpdateTree) == []
    assert harness.state.phase == Phase.RUNNING and harness.state.child == 101


def test_the_rollback_request_deploys_the_previous_good_release_without_a_build():
    harness = live(good=(A, B), commit=B)
    actions = harness.feed(RollbackRequested())
    assert kinds(actions)[:3] == ["save_state", "prune_releases", "release.rollback_requested"]
    assert harness.state.failed == B and harness.state.good == (A,)
    actions = harness.feed(TreeUpdated(commit=A))
    assert of_type(actions, StartBuild) == [], "a proven release is not built again"
    harness.feed(IDLE)
    actions = harness.feed(ChildExited(pid=101, signal="SIGTERM"))
    assert of_type(actions, StartChild) == [StartChild(A, "deploy")]
    prove(harness)
    assert harness.state.good == (A,)
    actions = harness.feed(RollbackRequested())
    assert kinds(actions) == ["control.ignored"]
    assert actions[0].facts["reason"] == "no earlier good release"


def test_the_rollback_request_is_refused_in_place_and_while_busy():
    in_place = Harness.new(DRAIN, built=A)
    in_place.feed(FetchSucceeded(head=A, upstream=A, relation="same"))
    assert in_place.feed(RollbackRequested())[0].facts["reason"] == \
        'needs deploy.mode = "releases"'
    harness = live(good=(C, A))
    deploy_to_probation(harness, B)
    assert harness.feed(RollbackRequested())[0].facts["reason"] == "busy; ask again later"


def test_a_force_pushed_older_commit_is_deployed_in_release_mode():
    """Release mode has no local work to lose: whatever upstream names, it deploys."""
    harness = live(good=(C, A))
    actions = harness.feed(upstream(C))
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False, reuse=True)]
    actions = harness.feed(TreeUpdated(commit=C))
    assert of_type(actions, StartBuild) == [], "a release proven before is reused"


def test_a_stop_during_probation_ends_the_probe_and_its_timers():
    harness = live()
    deploy_to_probation(harness, B)
    actions = harness.feed(StopRequested())
    assert StopProbe() in actions
    assert {name for name, _ in harness.state.timers} == {"stop"}


# ---------------------------------------------------------------------------------------------
# restart.style = "overlap": the new generation starts before the old one stops.

OVERLAP = replace(RELEASES, overlap=True)


def overlapping(fits: bool = True) -> Harness:
    """Release A live (pid 101); B built and drained; the overlap check answered `fits`."""
    harness = live(OVERLAP)
    harness.feed(upstream(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildSucceeded(commit=B))
    actions = harness.feed(IDLE)
    assert of_type(actions, CheckOverlap) == [CheckOverlap(101)]
    assert of_type(actions, StopChild) == [], "stopped before asking"
    harness.feed(OverlapChecked(available=100, needed=50 if fits else 200))
    return harness


def test_an_overlap_starts_the_new_generation_then_stops_the_old_once_healthy():
    harness = overlapping()
    assert of_type(harness.actions, StartChild)[-1] == StartChild(B, "deploy (overlap)")
    assert harness.state.child == 102 and harness.state.old_child == 101
    assert harness.state.phase == Phase.PROBATION
    actions = prove(harness)
    assert of_type(actions, StopChild) == [StopChild(101, f"replaced by {B}")]
    assert harness.state.good == (A, B) and harness.state.old_child == 101
    assert harness.feed(ChildExited(pid=101, signal="SIGTERM")) == [CancelTimer("stop_old")]
    assert harness.state.old_child is None and harness.state.child == 102


def test_an_old_generation_that_will_not_stop_is_killed():
    harness = overlapping()
    prove(harness)
    assert harness.fire("stop_old") == [KillChild(101, "did not stop within 5s")]


def test_a_failed_overlap_keeps_the_old_generation_serving():
    harness = overlapping()
    actions = harness.feed(ChildExited(pid=102, exit_code=3, tail="boom"))
    assert of_type(actions, StartChild) == [], "the old generation never stopped"
    assert SwitchRelease(A) in actions and SetAside(B) in actions
    assert harness.state.child == 101 and harness.state.old_child is None
    assert harness.state.head == A and harness.state.failed == B
    assert harness.state.phase == Phase.RUNNING


def test_an_overlap_that_misses_its_deadline_stops_only_the_new_generation():
    harness = overlapping()
    actions = harness.fire("health")
    assert [a.pid for a in of_type(actions, StopChild)] == [102]
    harness.feed(ChildExited(pid=102, signal="SIGTERM"))
    assert harness.state.child == 101 and harness.state.head == A


def test_without_room_for_two_the_restart_falls_back_to_stop_start():
    harness = overlapping(fits=False)
    notes = [a for a in harness.actions if kinds([a]) == ["restart.overlap_fallback"]]
    assert notes and notes[0].facts == {"available": 100, "needed": 200}
    assert of_type(harness.actions, StopChild)[-1] == StopChild(101, f"deploy {B}")
    harness.feed(ChildExited(pid=101, signal="SIGTERM"))
    assert of_type(harness.actions, StartChild)[-1] == StartChild(B, "deploy")


def test_a_shutdown_during_an_overlap_stops_both_and_waits_for_both():
    harness = overlapping()
    actions = harness.feed(StopRequested())
    assert sorted(a.pid for a in of_type(actions, StopChild)) == [101, 102]
    harness.feed(ChildExited(pid=102, signal="SIGTERM"))
    assert harness.state.phase == Phase.SHUTTING_DOWN
    actions = harness.feed(ChildExited(pid=101, signal="SIGTERM"))
    assert harness.state.phase == Phase.STOPPED and "exit" in kinds(actions)


def test_a_rollback_by_hand_does_not_free_a_commit_that_failed_on_its_own():
    harness = live(good=(C, A))
    deploy_to_probation(harness, B)
    harness.feed(ChildExited(pid=102, exit_code=3))  # B fails: rolled back to A
    prove(harness)
    assert harness.state.failed == B
    harness.feed(RollbackRequested())  # A is left by hand for C; upstream still names B
    assert harness.state.failed == A and harness.state.refused == (B, A)
    assert kinds(harness.feed(upstream(B))) == ["deploy.skipped"]


def test_only_the_newest_good_releases_are_remembered():
    """Older ones are deleted from disk: a force push back to one must build it again."""
    harness = live(replace(RELEASES, releases_kept=2), good=(C, A))
    deploy_to_probation(harness, B)
    prove(harness)
    assert harness.state.good == (A, B)
    harness.feed(upstream(C))
    assert of_type(harness.feed(TreeUpdated(commit=C)), StartBuild) == [StartBuild(C)]


def test_a_fetch_does_not_cancel_a_rollback_by_hand_waiting_for_its_drain():
    """Found by the soak (seed 37): upstream still names the release being left, which looked
    like "upstream went back to what runs"."""
    harness = live(good=(A, B), commit=B)
    harness.feed(RollbackRequested())
    harness.feed(TreeUpdated(commit=A))
    harness.feed(BUSY)
    assert harness.state.phase == Phase.DRAINING
    assert harness.feed(upstream(B)) == []
    assert harness.state.phase == Phase.DRAINING and harness.state.target == A


def test_a_supervisor_killed_during_a_rollback_by_hand_finishes_it_at_start():
    """Found by the soak (seed 175): `current` still named the held release."""
    harness = Harness(initial_state(RELEASES, live=B, good=(A,), failed=B))
    actions = harness.feed(upstream(B))
    assert kinds(actions)[0] == "release.rollback_resumed"
    assert of_type(actions, StartChild) == [StartChild(A, "rollback")]


def test_a_release_proven_again_becomes_the_newest_good_one():
    """A rollback goes back to the release that served last, even one deployed again."""
    harness = live(good=(C, A), commit=A)
    deploy_to_probation(harness, C)  # upstream went back to C, proven before
    prove(harness)
    assert harness.state.good == (A, C)
    deploy_to_probation(harness, B)
    harness.feed(ChildExited(pid=harness.state.child, exit_code=3))
    assert of_type(harness.actions, StartChild)[-1] == StartChild(C, "rollback")
