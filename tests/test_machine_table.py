"""The table, exhaustively: states reached in every phase (under each kind of settings) meet a
sample of every event type, including stale pids and timers. `decide` must never raise, and the
state it returns must be one that can be written down: each sub-record only in the phases that
have it, and no action that breaks a rule."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import replace

import pytest

from supervisor.core.condition import parse_condition
from supervisor.core.events import (
    EVENT_TYPES,
    BuildFailed,
    BuildSucceeded,
    CheckRequested,
    ChildExited,
    ChildStarted,
    ChildStartFailed,
    Event,
    Exit,
    FetchFailed,
    FetchSucceeded,
    FleetCleared,
    FleetHeld,
    HealthPassed,
    HealthProbeFailed,
    OverlapChecked,
    RestartRequested,
    RollbackRequested,
    SaveState,
    SettingsChanged,
    SlotGranted,
    StartChild,
    StartChildRequested,
    StartReason,
    StatsRead,
    StopChild,
    StopChildRequested,
    StopRequested,
    Timer,
    TimerFired,
    TreeUpdated,
    TreeUpdateFailed,
)
from supervisor.core.machine import Phase, Settings, State, decide, initial_state
from supervisor.core.state import DEPLOYING, Generation

A, B, C = "a" * 40, "b" * 40, "c" * 40
DRAIN = parse_condition("n_clients == 0")
SETTINGS = {
    "in place, drained": Settings(drain_condition=DRAIN, drain_timeout=30, has_build=True,
                                  reset_on_diverge=True),
    "in place, no drain, health": Settings(has_build=True, health_gate=True, grace=1.0),
    "releases, probe": Settings(releases=True, has_build=True, health_gate=True, grace=1.0,
                                probe=True, drain_condition=DRAIN, drain_timeout=30),
    "releases, overlap": Settings(releases=True, has_build=True, health_gate=True, grace=1.0,
                                  overlap=True, overlap_reserve=10),
    "releases, fleet": Settings(releases=True, has_build=True, health_gate=True, grace=1.0,
                                probe=True, drain_condition=DRAIN, drain_timeout=30, fleet=True),
}
PER_PHASE = 12  # states kept per phase and settings
DEPTH = 9


def sample_events(state: State) -> list[Event]:
    """One or more of every event type, aimed at this state and beside it."""
    pids = {state.child, state.old_child, 999} - {None}
    timers = [TimerFired(timer=t, serial=s) for t, s in state.timers]
    timers += [TimerFired(timer=t, serial=state.serial + 50) for t in Timer]  # stale
    commits = (A, B, C)
    events: list[Event] = [
        *(FetchSucceeded(head=state.head or A, upstream=c, relation=r)
          for c in commits for r in ("behind", "same", "diverged")),
        FetchSucceeded(head=A, upstream=B, relation="behind", dirty=True),
        FetchFailed(error="down", head=state.head or A),
        CheckRequested(),
        *(TreeUpdated(commit=c) for c in commits),
        TreeUpdateFailed(commit=state.target or A, error="x"),
        BuildSucceeded(commit=state.target or A),
        BuildFailed(commit=state.target or A, reason="exit code 2"),
        *(ChildExited(pid=p, exit_code=1) for p in pids),
        ChildStartFailed(error="no such file"),
        *(HealthPassed(pid=p) for p in pids),
        HealthProbeFailed(pid=state.child or 999, error="refused"),
        StatsRead(values={"n_clients": "0"}), StatsRead(values={"n_clients": "2"}),
        StatsRead(values=None, problem="missing"),
        *timers,
        StopRequested(), RestartRequested(), StopChildRequested(), StartChildRequested(),
        RollbackRequested(),
        OverlapChecked(available=100, needed=10), OverlapChecked(available=None, needed=None),
        SettingsChanged(settings=state.settings),
        *(FleetCleared(commit=c, why="canary") for c in commits),
        *(FleetHeld(commit=c, box="fra-2", reason="build failed") for c in commits),
        SlotGranted(commit=state.target or A, slot=0), SlotGranted(commit=C, slot=1),
    ]
    assert {type(e) for e in events} >= set(EVENT_TYPES.values()) - {ChildStarted}
    return events


def answered(state: State, event: Event) -> tuple[State, list]:
    """As the loop does: a StartChild is answered at once."""
    state, actions = decide(state, event)
    for action in actions:
        if isinstance(action, StartChild):
            state, more = decide(state, ChildStarted(pid=state.serial + 200,
                                                     commit=action.commit))
            actions = actions + more
    return state, actions


def reachable(settings: Settings) -> dict[Phase, list[State]]:
    """A breadth-first walk from the start states, keeping a few states of each phase."""
    seen: dict[Phase, list[State]] = defaultdict(list)
    starts = [initial_state(settings, built=A),
              initial_state(settings, built=A, live=A, good=(A,)),
              initial_state(settings, built=A, live=B, good=(A,), failed=B),
              # Serving A, with B cleared by the group already (fleet mode's deep phases).
              replace(initial_state(settings, built=A, live=A, good=(A,)), cleared=B,
                      phase=Phase.RUNNING, generation=Generation(101, A))]
    queue = deque((s, 0) for s in starts)
    while queue:
        state, depth = queue.popleft()
        bucket = seen[state.phase]
        if state in bucket or len(bucket) >= PER_PHASE:
            continue
        bucket.append(state)
        if depth >= DEPTH:
            continue
        for event in sample_events(state):
            queue.append((answered(state, event)[0], depth + 1))
    return seen


def check_state(state: State) -> None:
    if state.phase in (Phase.DRAINING, Phase.UPDATING, Phase.BUILDING, Phase.RESTARTING):
        assert state.deploy is not None, "a deploy phase without a deploy"
    if state.draining:
        assert state.phase in DEPLOYING, "watching stats outside a deploy"
    if state.probation is not None:
        assert state.phase == Phase.PROBATION, "a probation record outside probation"
    if state.rollback is not None:
        assert state.phase == Phase.ROLLING_BACK
    if state.old is not None:
        assert state.old.pid is not None
        assert state.old.pid != state.child, "one process, two generations"
    assert all(isinstance(t, Timer) for t, _ in state.timers)
    assert len({t for t, _ in state.timers}) == len(state.timers), "a timer armed twice"


def check_decision(before: State, after: State, actions: list) -> None:
    check_state(after)
    starts = [a for a in actions if isinstance(a, StartChild)]
    assert len(starts) <= 1, "two starts in one step"
    if starts:
        assert after.child is None, "rule 1: a start while a child is known to run"
    saves = [i for i, a in enumerate(actions) if isinstance(a, SaveState)]
    assert saves in ([], [0]), "the durable state is saved first, once"
    if (after.refused, after.good) != (before.refused, before.good):
        assert saves == [0], "a durable change not saved"
    if after.phase == Phase.STOPPED and before.phase != Phase.STOPPED:
        assert any(isinstance(a, Exit) for a in actions)
    if after.settings.fleet:
        check_fleet(before, after, actions)


def check_fleet(before: State, after: State, actions: list) -> None:
    """The group decides when, never what: a new commit starts only once cleared (or proven
    here before), and a deploy takes the running app down only in a slot."""
    if after.phase == Phase.AWAITING_SLOT:
        assert after.deploy is not None and not after.deploy.slot
    for action in actions:
        if isinstance(action, StartChild) and action.reason in (StartReason.DEPLOY,
                                                               StartReason.DEPLOY_OVERLAP):
            assert (action.commit == after.cleared or action.commit in before.good
                    or before.head is None), "a deploy the group did not clear"
        if isinstance(action, StopChild) and action.reason.startswith("deploy"):
            assert before.deploy is not None and (
                before.deploy.slot or before.phase == Phase.AWAITING_SLOT), \
                "the app taken down for a deploy without a slot"


@pytest.mark.parametrize("name", SETTINGS)
def test_every_phase_meets_every_event_and_the_state_stays_writable(name):
    states = reachable(SETTINGS[name])
    assert len(states) >= 10, f"too few phases reached: {sorted(states)}"
    checked = 0
    for phase_states in states.values():
        for state in phase_states:
            for event in sample_events(state):
                after, actions = decide(state, event)
                check_decision(state, after, actions)
                checked += 1
    assert checked > 1000


def test_the_walk_reaches_every_phase_under_some_settings():
    reached = set()
    for settings in SETTINGS.values():
        reached |= set(reachable(settings))
    assert reached == set(Phase)


def test_a_state_that_breaks_the_records_rules_is_caught():
    """The checks above can fail: a probation record outside probation is refused."""
    from supervisor.core.state import Probation

    bad = replace(initial_state(SETTINGS["in place, drained"]), phase=Phase.RUNNING,
                  probation=Probation())
    with pytest.raises(AssertionError):
        check_state(bad)
