"""Named histories through the pure machine: each test reads as a story of events and the
actions it must produce. No IO, no clock, no sleeps."""

from __future__ import annotations

import pytest

from supervisor.core.events import (
    BuildFailed,
    BuildSucceeded,
    CancelTimer,
    CheckRequested,
    ChildExited,
    ChildStartFailed,
    Exit,
    Fetch,
    FetchFailed,
    FetchSucceeded,
    KillChild,
    Note,
    RestartRequested,
    SettingsChanged,
    StartBuild,
    StartChild,
    StartChildRequested,
    StartTimer,
    StatsRead,
    StopChild,
    StopChildRequested,
    StopRequested,
    TimerFired,
    TreeUpdated,
    TreeUpdateFailed,
    UnwatchStats,
    UpdateTree,
    WatchStats,
)
from supervisor.core.machine import Phase, Settings, backoff_delay, decide, initial_state
from tests.machine_harness import DRAIN, NO_DRAIN, A, B, C, Harness, kinds, of_type

BACK_ON_GOOD = "deploy failed; back on the last good build"
AS_IT_IS = "deploy failed; starting the tree as it is"
BUSY = StatsRead(values={"n_clients": "2"})
IDLE = StatsRead(values={"n_clients": "0"})


def up_to_date(head: str = A) -> FetchSucceeded:
    return FetchSucceeded(head=head, upstream=head, relation="same")


def behind(upstream: str, head: str = A) -> FetchSucceeded:
    return FetchSucceeded(head=head, upstream=upstream, relation="behind")


def running(settings: Settings = DRAIN) -> Harness:
    """A supervisor serving commit A, built, with child pid 101."""
    harness = Harness.new(settings, built=A)
    harness.feed(up_to_date())
    assert harness.state.phase == Phase.RUNNING and harness.state.child == 101
    harness.actions.clear()
    return harness


# --- start-up: reconcile once, then start ----------------------------------------------------

def test_startup_with_a_built_tree_starts_the_child_at_once():
    harness = Harness.new(DRAIN, built=A)
    actions = harness.feed(up_to_date())
    assert of_type(actions, StartChild) == [StartChild(A, "startup")]
    assert harness.state.child == 101 and harness.state.phase == Phase.RUNNING


def test_startup_builds_a_tree_that_was_never_built_before_starting():
    harness = Harness.new(DRAIN, built=None)
    assert harness.feed(up_to_date()) == [StartBuild(A)]
    assert harness.state.phase == Phase.BUILDING
    actions = harness.feed(BuildSucceeded(commit=A))
    assert of_type(actions, StartChild) == [StartChild(A, "startup")]


def test_startup_behind_upstream_fast_forwards_and_builds_first():
    harness = Harness.new(DRAIN, built=A)
    assert kinds(harness.feed(behind(B))) == ["deploy.started", "update_tree"]
    assert of_type(harness.actions, UpdateTree) == [UpdateTree(B, False)]
    assert harness.feed(TreeUpdated(commit=B)) == [StartBuild(B)]
    actions = harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, StartChild) == [StartChild(B, "startup")]


def test_startup_with_an_unreachable_remote_still_starts_what_is_checked_out():
    harness = Harness.new(DRAIN, built=A)
    actions = harness.feed(FetchFailed(error="could not resolve host", head=A))
    assert of_type(actions, StartChild) == [StartChild(A, "startup")]


def test_startup_build_failure_still_starts_the_tree_as_it_is():
    harness = Harness.new(DRAIN, built=None)
    harness.feed(up_to_date())
    actions = harness.feed(BuildFailed(commit=A, reason="exit code 2"))
    assert "deploy.failed" in kinds(actions)
    assert len(of_type(actions, StartChild)) == 1
    assert harness.state.failed == A and harness.state.child is not None


def test_without_a_build_step_startup_never_builds():
    settings = Settings(has_build=False)
    harness = Harness.new(settings, built=None)
    assert kinds(harness.feed(up_to_date())) == ["start_child", "start_timer"]


# --- a deploy with a drain ---------------------------------------------------------------------

def test_a_deploy_waits_for_the_drain_then_updates_builds_and_restarts():
    harness = running()
    actions = harness.feed(behind(B))
    assert kinds(actions) == ["deploy.waiting_for_drain", "watch_stats", "start_timer"]
    assert harness.state.phase == Phase.DRAINING
    assert harness.feed(BUSY) == []
    assert kinds(harness.feed(IDLE)) == ["drain.satisfied", "deploy.started", "update_tree"]
    assert harness.feed(TreeUpdated(commit=B)) == [StartBuild(B)]
    actions = harness.feed(BuildSucceeded(commit=B))
    assert kinds(actions) == ["unwatch_stats", "cancel_timer", "stop_child", "start_timer"]
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {B}")]
    actions = harness.feed(ChildExited(pid=101, exit_code=0))
    assert of_type(actions, StartChild) == [StartChild(B, "deploy")]
    assert harness.state.phase == Phase.RUNNING and harness.state.child == 102
    assert harness.state.timers == {("uptime", harness.state.serial)}


def test_clients_that_connect_during_the_build_are_drained_again_before_the_restart():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BUSY)  # the old child kept serving during the build
    actions = harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, StopChild) == []
    assert harness.state.phase == Phase.DRAINING
    actions = harness.feed(IDLE)
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {B}")]
    assert of_type(actions, UpdateTree) == []


def test_the_drain_timeout_lets_the_deploy_proceed_and_the_reason_says_so():
    harness = running()
    harness.feed(behind(B))
    harness.feed(BUSY)
    assert harness.armed()["drain"] == 60
    actions = harness.fire("drain")
    assert kinds(actions) == ["drain.timed_out", "deploy.started", "update_tree"]
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {B} (drain timed out)")]


def test_drain_timeout_zero_waits_forever():
    settings = Settings(drain_condition=DRAIN.drain_condition, drain_timeout=0, has_build=True)
    harness = running(settings)
    actions = harness.feed(behind(B))
    assert of_type(actions, StartTimer) == [] and "drain" not in harness.armed()


def test_a_child_that_dies_while_draining_is_drained():
    harness = running()
    harness.feed(behind(B))
    actions = harness.feed(ChildExited(pid=101, exit_code=1))
    assert kinds(actions) == ["drain.child_exited", "unwatch_stats", "cancel_timer",
                              "deploy.started", "update_tree"]
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, StopChild) == []
    assert of_type(actions, StartChild) == [StartChild(B, "deploy")]


def test_a_missing_or_unreadable_stats_file_means_keep_waiting():
    harness = running()
    harness.feed(behind(B))
    for unknown in (StatsRead(values=None, problem="missing"),
                    StatsRead(values=None, problem="larger than 65536 bytes"),
                    StatsRead(values={"other": "0"}),
                    StatsRead(values={"n_clients": "zero"})):
        assert harness.feed(unknown) == []
        assert harness.state.phase == Phase.DRAINING


def test_without_a_drain_a_deploy_restarts_as_soon_as_it_is_built():
    harness = running(NO_DRAIN)
    assert kinds(harness.feed(behind(B))) == ["deploy.started", "update_tree"]
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildSucceeded(commit=B))
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {B}")]


def test_without_a_build_step_the_updated_tree_restarts_at_once():
    harness = running(Settings(has_build=False))
    harness.feed(behind(B))
    actions = harness.feed(TreeUpdated(commit=B))
    assert of_type(actions, StartBuild) == [] and len(of_type(actions, StopChild)) == 1


# --- coalescing ----------------------------------------------------------------------------------

def test_commits_arriving_during_a_drain_coalesce_into_the_newest():
    harness = running()
    harness.feed(behind(B))
    harness.feed(BUSY)
    harness.feed(behind(C))
    actions = harness.feed(IDLE)
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False)]


def test_a_commit_arriving_during_a_build_is_built_next_without_a_second_drain():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    harness.feed(behind(C, head=B))
    actions = harness.feed(BuildSucceeded(commit=B))
    assert kinds(actions) == ["deploy.superseded", "update_tree"]
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False)]
    harness.feed(TreeUpdated(commit=C))
    actions = harness.feed(BuildSucceeded(commit=C))
    assert of_type(actions, StopChild) == [StopChild(101, f"deploy {C}")]
    harness.feed(ChildExited(pid=101, exit_code=0))
    assert harness.state.child_commit == C


def test_a_commit_found_while_restarting_is_deployed_once_the_new_child_runs():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildSucceeded(commit=B))
    harness.feed(behind(C, head=B))
    actions = harness.feed(ChildExited(pid=101, exit_code=0))
    assert of_type(actions, StartChild) == [StartChild(B, "deploy")]
    assert of_type(actions, WatchStats) == [WatchStats()]
    assert harness.state.phase == Phase.DRAINING and harness.state.target == C


def test_upstream_going_back_during_the_drain_cancels_the_deploy():
    harness = running()
    harness.feed(behind(B))
    actions = harness.feed(up_to_date(A))
    assert kinds(actions) == ["deploy.cancelled", "unwatch_stats", "cancel_timer"]
    assert harness.state.phase == Phase.RUNNING and harness.state.target is None


# --- failures ------------------------------------------------------------------------------------

def test_a_failed_build_leaves_the_child_alone_and_is_not_retried_until_a_newer_commit():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 2", exit_code=2))
    assert kinds(actions) == ["save_state", "deploy.failed", "unwatch_stats", "cancel_timer",
                              "deploy.reverting", "update_tree"]
    assert of_type(actions, Note)[0].facts["commit"] == B
    assert of_type(actions, UpdateTree) == [UpdateTree(A, True)]  # back to the last good build
    assert kinds(harness.feed(TreeUpdated(commit=A))) == ["deploy.reverted"]
    assert harness.state.phase == Phase.RUNNING and harness.state.child == 101
    assert harness.state.head == A
    assert kinds(harness.feed(behind(B))) == ["deploy.skipped"]
    assert "watch_stats" in kinds(harness.feed(behind(C)))


def test_a_crash_after_a_failed_build_restarts_the_last_good_build_not_the_broken_one():
    harness = running(NO_DRAIN)
    harness.feed(behind(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    actions = harness.feed(ChildExited(pid=101, exit_code=1))  # while the tree goes back
    assert of_type(actions, StartChild) == []
    actions = harness.feed(TreeUpdated(commit=A))
    assert of_type(actions, StartChild) == [StartChild(A, BACK_ON_GOOD)]
    harness.feed(ChildExited(pid=102, exit_code=1))
    assert of_type(harness.actions, StartChild)[-1] == StartChild(A, "crash restart")


def test_a_tree_that_cannot_go_back_is_started_as_it_is_and_says_why():
    harness = running(NO_DRAIN)
    harness.feed(behind(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    actions = harness.feed(TreeUpdateFailed(commit=A, error="local changes in the working tree"))
    assert kinds(actions)[0] == "deploy.revert_failed"
    assert of_type(actions, StartChild) == [StartChild(B, AS_IT_IS)]


def test_startup_goes_back_to_the_recorded_good_build_when_the_checked_out_commit_fails():
    harness = Harness.new(DRAIN, built=A)  # killed after a fast-forward, before the build ended
    assert harness.feed(up_to_date(B)) == [StartBuild(B)]
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 2"))
    assert of_type(actions, UpdateTree) == [UpdateTree(A, True)]
    actions = harness.feed(TreeUpdated(commit=A))
    assert of_type(actions, StartChild) == [StartChild(A, BACK_ON_GOOD)]


def test_a_restart_killed_before_going_back_finishes_going_back_instead_of_rebuilding():
    harness = Harness(initial_state(DRAIN, built=A, failed=B))
    actions = harness.feed(up_to_date(B))
    assert of_type(actions, StartBuild) == []
    assert of_type(actions, UpdateTree) == [UpdateTree(A, True)]
    harness.feed(TreeUpdated(commit=A))
    assert of_type(harness.actions, StartChild) == [StartChild(A, BACK_ON_GOOD)]


def test_a_newer_commit_found_while_going_back_is_deployed_next():
    harness = running(NO_DRAIN)
    harness.feed(behind(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    harness.feed(behind(C, head=B))
    actions = harness.feed(TreeUpdated(commit=A))
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False)]


def test_a_failed_tree_update_is_a_failed_deploy_too():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    actions = harness.feed(TreeUpdateFailed(commit=B, error="untracked file would be overwritten"))
    assert kinds(actions)[:2] == ["save_state", "deploy.failed"] and harness.state.failed == B
    assert of_type(actions, StopChild) == [] and harness.state.child == 101


def test_a_failed_build_with_a_newer_commit_waiting_goes_on_to_it_still_drained():
    harness = running()
    harness.feed(behind(B))
    harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    harness.feed(behind(C, head=B))
    actions = harness.feed(BuildFailed(commit=B, reason="exit code 1"))
    assert of_type(actions, UpdateTree) == [UpdateTree(C, False)]
    assert of_type(actions, UnwatchStats) == [] and harness.state.draining


def test_a_dirty_tree_is_reported_and_never_touched():
    harness = running()
    actions = harness.feed(FetchSucceeded(head=A, upstream=B, relation="behind", dirty=True))
    assert kinds(actions) == ["git.dirty"] and harness.state.phase == Phase.RUNNING


@pytest.mark.parametrize("relation", ["ahead", "diverged"])
def test_diverged_history_is_reported_and_never_touched(relation):
    harness = running()
    actions = harness.feed(FetchSucceeded(head=A, upstream=B, relation=relation))
    assert kinds(actions) == ["git.diverged"] and harness.state.phase == Phase.RUNNING


def test_diverged_history_is_reset_when_configured():
    harness = running(Settings(reset_on_diverge=True, has_build=True))
    actions = harness.feed(FetchSucceeded(head=A, upstream=B, relation="diverged"))
    assert of_type(actions, UpdateTree) == [UpdateTree(B, True)]


def test_a_fetch_failure_changes_nothing():
    harness = running()
    assert harness.feed(FetchFailed(error="timed out", head=A)) == []
    assert harness.state.phase == Phase.RUNNING and harness.state.child == 101


# --- crashes and back-off --------------------------------------------------------------------

def test_backoff_doubles_from_min_to_max_after_an_immediate_first_restart():
    delays = [backoff_delay(DRAIN, n) for n in range(1, 8)]
    assert delays == [0, 1, 2, 4, 8, 8, 8]


def test_a_crash_loop_backs_off_says_so_at_the_cap_and_never_gives_up():
    harness = running()
    history = []
    for _ in range(7):
        pid = harness.state.child
        actions = harness.feed(ChildExited(pid=pid, exit_code=3))
        note = of_type(actions, Note)[0]
        history.append((note.event, note.facts["delay"]))
        if harness.state.phase == Phase.BACKOFF:
            harness.fire("backoff")
        assert harness.state.child is not None
    assert history == [("child.restarting", 0.0), ("child.backing_off", 1),
                       ("child.backing_off", 2), ("child.backing_off", 4),
                       ("child.crash_looping", 8), ("child.crash_looping", 8),
                       ("child.crash_looping", 8)]


def test_staying_up_reset_after_resets_the_backoff():
    harness = running()
    harness.feed(ChildExited(pid=101, exit_code=3))
    harness.feed(ChildExited(pid=102, exit_code=3))
    harness.fire("backoff")
    harness.fire("uptime")
    assert harness.state.crashes == 0
    actions = harness.feed(ChildExited(pid=103, exit_code=3))
    assert of_type(actions, StartChild) == [StartChild(A, "crash restart")]


def test_a_child_that_cannot_even_start_backs_off_instead_of_spinning():
    harness = Harness.new(DRAIN, built=A)
    harness.fail_starts = True
    actions = harness.feed(up_to_date())
    assert len(of_type(actions, StartChild)) == 2
    assert harness.state.phase == Phase.BACKOFF and harness.armed()["backoff"] == 1


def test_a_new_commit_during_backoff_deploys_at_once_without_a_drain():
    harness = running()
    harness.feed(ChildExited(pid=101, exit_code=3))
    harness.feed(ChildExited(pid=102, exit_code=3))
    assert harness.state.phase == Phase.BACKOFF
    actions = harness.feed(behind(B))
    assert kinds(actions) == ["cancel_timer", "deploy.started", "update_tree"]


def test_exits_of_other_pids_and_stale_timers_are_ignored():
    harness = running()
    assert kinds(harness.feed(ChildExited(pid=999, exit_code=0))) == ["event.ignored"]
    assert kinds(harness.feed(TimerFired(timer="backoff", serial=1234))) == ["event.ignored"]
    assert harness.state.child == 101 and harness.state.phase == Phase.RUNNING


# --- stopping ------------------------------------------------------------------------------------

def test_sigterm_stops_the_child_then_exits():
    harness = running()
    actions = harness.feed(StopRequested(signal="SIGTERM"))
    assert of_type(actions, StopChild) == [StopChild(101, "shutdown")]
    assert harness.state.phase == Phase.SHUTTING_DOWN
    assert harness.feed(ChildExited(pid=101, signal="SIGTERM")) == [Exit(0)]
    assert harness.state.phase == Phase.STOPPED


def test_a_child_that_ignores_the_stop_signal_is_killed_at_the_stop_timeout():
    harness = running()
    harness.feed(StopRequested())
    assert harness.armed()["stop"] == 5
    assert harness.fire("stop") == [KillChild(101, "did not stop within 5s")]


def test_a_second_stop_request_kills_at_once():
    harness = running()
    harness.feed(StopRequested())
    assert harness.feed(StopRequested(signal="SIGINT")) == [KillChild(101, "second stop request")]


def test_stopping_with_no_child_exits_at_once():
    harness = running()
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(ChildExited(pid=102, exit_code=1))
    actions = harness.feed(StopRequested())
    assert kinds(actions) == ["cancel_timer", "exit"]


def test_stopping_mid_drain_stops_watching_and_the_child():
    harness = running()
    harness.feed(behind(B))
    actions = harness.feed(StopRequested())
    assert kinds(actions)[:2] == ["unwatch_stats", "cancel_timer"]
    assert of_type(actions, StopChild) == [StopChild(101, "shutdown")]


def test_a_deploy_restart_that_hangs_is_killed_at_the_stop_timeout():
    harness = running(NO_DRAIN)
    harness.feed(behind(B))
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildSucceeded(commit=B))
    assert harness.fire("stop") == [KillChild(101, "did not stop within 5s")]


def test_usr1_asks_for_a_fetch_in_any_working_phase():
    harness = running()
    assert harness.feed(CheckRequested()) == [Fetch()]


def test_nothing_happens_after_stopped():
    harness = running()
    harness.feed(StopRequested())
    harness.feed(ChildExited(pid=101, exit_code=0))
    for event in (behind(B), StopRequested(), CheckRequested()):
        assert kinds(harness.feed(event)) == ["event.ignored"]


def test_decide_is_pure_the_same_input_gives_the_same_output():
    harness = running()
    state = harness.state
    first = decide(state, behind(B))
    second = decide(state, behind(B))
    assert first == second and state == harness.state


def test_cancelled_timers_are_forgotten_so_a_late_fire_is_ignored():
    harness = running()
    harness.feed(behind(B))
    serial = dict(harness.state.timers)["drain"]
    actions = harness.feed(IDLE)
    harness.feed(TreeUpdated(commit=B))
    harness.feed(BuildSucceeded(commit=B))
    assert CancelTimer("drain") in harness.actions
    late = harness.feed(TimerFired(timer="drain", serial=serial))
    assert kinds(late) == ["event.ignored"] and actions
    assert of_type(harness.actions, ChildStartFailed) == []


# --- requests from the shell -------------------------------------------------------------------

def test_a_requested_restart_drains_then_restarts_without_updating_or_building():
    harness = running()
    actions = harness.feed(RestartRequested())
    assert kinds(actions) == ["deploy.waiting_for_drain", "watch_stats", "start_timer"]
    actions = harness.feed(IDLE)
    assert of_type(actions, UpdateTree) == [] and of_type(actions, StartBuild) == []
    assert of_type(actions, StopChild) == [StopChild(101, "restart requested")]
    actions = harness.feed(ChildExited(pid=101, exit_code=0))
    assert of_type(actions, StartChild) == [StartChild(A, "restart requested")]
    assert harness.state.deploys == 1 and not harness.state.restart_requested


def test_a_requested_restart_without_a_drain_or_build_restarts_at_once():
    harness = running(Settings(has_build=False))
    actions = harness.feed(RestartRequested())
    assert of_type(actions, StopChild) == [StopChild(101, "restart requested")]


def test_stop_child_holds_the_app_down_until_start_child():
    harness = running()
    actions = harness.feed(StopChildRequested())
    assert of_type(actions, StopChild) == [StopChild(101, "stop requested")]
    assert harness.state.phase == Phase.HELD
    assert kinds(harness.feed(ChildExited(pid=101, signal="SIGTERM"))) == ["cancel_timer"]
    harness.feed(behind(B))  # remembered, not deployed while held
    assert harness.state.pending == B and harness.state.child is None
    actions = harness.feed(StartChildRequested())
    assert of_type(actions, StartChild) == [StartChild(A, "start requested")]
    assert of_type(actions, WatchStats) == [WatchStats()]  # then the waiting commit deploys


def test_a_held_app_that_ignores_its_stop_signal_is_killed():
    harness = running()
    harness.feed(StopChildRequested())
    assert harness.fire("stop") == [KillChild(101, "did not stop within 5s")]


def test_start_child_during_backoff_starts_at_once():
    harness = running()
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(ChildExited(pid=102, exit_code=1))
    actions = harness.feed(StartChildRequested())
    assert kinds(actions) == ["cancel_timer", "start_child", "start_timer"]


def test_requests_during_a_deploy_are_refused_and_say_why():
    harness = running()
    harness.feed(behind(B))
    for request in (RestartRequested(), StopChildRequested(), StartChildRequested()):
        actions = harness.feed(request)
        assert kinds(actions) == ["control.ignored"]
        assert harness.state.phase == Phase.DRAINING


def test_a_reloaded_config_changes_the_rules_from_the_next_event_on():
    harness = running()
    faster = Settings(backoff_min=0.5, backoff_max=0.5, has_build=True)
    assert harness.feed(SettingsChanged(settings=faster)) == []
    harness.feed(ChildExited(pid=101, exit_code=1))
    harness.feed(ChildExited(pid=102, exit_code=1))
    assert harness.armed()["backoff"] == 0.5
