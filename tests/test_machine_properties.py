"""Random event histories against the pure machine, with the promises it must keep checked after
every step. The world is modelled just enough to produce plausible facts (which pids are alive,
which build or tree update is outstanding), and junk facts (stale timers, unknown pids) are mixed
in because events race in the real loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.core.condition import parse_condition
from supervisor.core.events import (
    AcquireSlot,
    AwaitFleet,
    BuildFailed,
    BuildSucceeded,
    CheckOverlap,
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
    KillChild,
    Note,
    OverlapChecked,
    ReleaseSlot,
    ReportFleet,
    RestartRequested,
    RollbackRequested,
    SetAside,
    SlotGranted,
    StartBuild,
    StartChild,
    StartChildRequested,
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
from supervisor.core.machine import Phase, Settings, State, decide, initial_state

COMMITS = ["a" * 40, "b" * 40, "c" * 40, "d" * 40]
CONDITION = parse_condition("n_clients == 0")


@dataclass
class World:
    """What is true outside the machine, as far as the invariants need to know."""

    head: str = COMMITS[0]
    alive: set[int] = field(default_factory=set)
    next_pid: int = 100
    build: str | None = None  # commit of the build in progress
    update: str | None = None  # commit of the tree update in progress
    watching: bool = False
    stats_idle: bool = False  # the latest stats read says no client is connected
    drain_expired: bool = False  # the drain timer fired since the watch began
    exited: bool = False
    start_fails: bool = False
    overlap_fits: bool = True  # the answer to CheckOverlap
    # Fleet mode: what the machine asked the group for, and what the group said.
    go_asked: str | None = None
    cleared: set[str] = field(default_factory=set)
    slot_asked: str | None = None
    slot_held: str | None = None
    group_held: set[str] = field(default_factory=set)  # held before a restart into it began
    stopping_for: str | None = None  # the app was stopped for a deploy of this commit
    told_held: set[str] = field(default_factory=set)  # what the group holds: never cleared


def check_and_apply(world: World, before: State, after: State, actions: list, settings_: Settings
                    ) -> list[Event]:
    """Assert the invariants on one decision and let the world react; returns instant answers."""
    answers: list[Event] = []
    assert not world.exited, "a decision after Exit"
    for action in actions:
        match action:
            case StartChild(commit=commit, reason=reason) if settings_.fleet and reason in (
                    "deploy", "deploy (overlap)") and not (
                    commit in world.cleared or commit in before.good
                    or before.head in (None, commit)):  # the first release, or the live one
                raise AssertionError(f"deployed {commit} without the group's go")
            case StartChild(commit=commit, reason=reason) if settings_.fleet and reason in (
                    "deploy", "deploy (overlap)") and commit in world.group_held - set(
                    before.good) - {before.head}:  # the live one restarts: never left for etcd
                raise AssertionError(f"deployed {commit}, which the group holds")
            case StartChild(commit=commit, reason=reason):
                # Beside a previous generation still running (overlap), never beside our child.
                assert not world.alive or (
                    settings_.overlap and world.alive == {after.old_child}), \
                    f"another child while {world.alive} still run"
                if settings_.releases:
                    assert commit is not None, "release mode started no release"
                if reason == "rollback":
                    assert commit in before.good, "rolled back to a release never proven good"
                world.stopping_for = None
                if world.start_fails:
                    answers.append(ChildStartFailed(error="cannot start"))
                else:
                    world.next_pid += 1
                    world.alive.add(world.next_pid)
                    answers.append(ChildStarted(pid=world.next_pid, commit=action.commit))
            case StopChild(pid=pid, reason=reason):
                assert pid in world.alive, "stopping a process that is not our live child"
                if settings_.fleet and reason.startswith("deploy "):
                    assert world.slot_held == reason.split()[1], "taken down without a slot"
                    world.stopping_for = reason.split()[1]
                assert reason in ("shutdown", "stop requested") or reason.startswith(
                    ("deploy ", "restart requested", "not healthy within", "replaced by")), reason
                planned = reason.startswith(("deploy", "restart requested"))
                if planned and settings_.drain_condition is not None:
                    assert world.stats_idle or world.drain_expired, \
                        "restart while the stats file says a client is connected"
            case KillChild(pid=pid):
                assert pid in world.alive
            case StartBuild(commit=commit):
                assert world.build is None, "two builds at once"
                assert settings_.has_build
                world.build = commit
            case UpdateTree(commit=commit):
                assert world.update is None and world.build is None, "tree moved under a build"
                world.update = commit
            case WatchStats():
                assert not world.watching
                world.watching, world.stats_idle, world.drain_expired = True, False, False
            case UnwatchStats():
                assert world.watching
                world.watching = False
            case Exit():
                assert not world.alive, "exit with the child still running"
                assert world.slot_held is None, "stopped for good, still holding a slot"
                world.exited = True
            case Note(event="health.failed", facts=facts) if facts.get("rollback_to"):
                assert settings_.releases and facts["commit"] not in before.good, \
                    "a release that proved healthy was rolled back"
            case CheckOverlap(pid=pid):
                assert settings_.overlap and world.alive == {pid}
                answers.append(OverlapChecked(available=1 if world.overlap_fits else 0, needed=1))
            case AwaitFleet(commit=commit):
                assert settings_.fleet
                world.go_asked = commit
            case AcquireSlot(commit=commit):
                assert settings_.fleet and world.slot_held is None, "a second slot"
                world.slot_asked = commit
            case ReleaseSlot(commit=commit):
                if commit is None or world.slot_held == commit:
                    world.slot_held = None
                if commit is None or world.slot_asked == commit:
                    world.slot_asked = None
            case ReportFleet(commit=commit, healthy=True):
                assert commit == after.child_commit, "proved a commit that does not run"
            case SetAside(commit=commit):
                assert settings_.releases and commit != after.head, "set aside the live release"
    assert (after.phase == Phase.STOPPED) == world.exited
    if after.phase == Phase.BACKOFF:
        assert after.child is None and any(name == "backoff" for name, _ in after.timers)
    names = [name for name, _ in after.timers]
    assert len(names) == len(set(names)), "one timer armed twice under one name"
    return answers


@st.composite
def next_event(draw: st.DrawFn, world: World, state: State) -> Event:
    settings_ = state.settings
    # Weighted so that deep phases (draining, restarting) are reached often; a stop request
    # ends the history, so it stays rare.
    choices = ["fetch"] * 4 + ["fetch_failed", "check", "stats", "junk_exit", "junk_timer",
                               "restart", "hold", "start"]
    if world.watching:
        choices += ["stats"] * 4
    if world.alive:
        choices += ["exit"] * 2
    if state.timers:
        choices += ["timer"] * 2
    if world.go_asked is not None:
        choices += ["go"] * 3 + ["group_held"]
    if world.slot_asked is not None:
        choices += ["slot"] * 3
    if settings_.fleet:
        choices += ["group_held", "late_slot"]
    if state.phase == Phase.PROBATION and world.alive:
        choices += ["healthy"] * 2 + ["probe_failed"]
    if settings_.releases:
        choices += ["rollback"]
    if world.build is not None:
        choices += ["build"] * 3
    if world.update is not None:
        choices += ["update"] * 3
    kind = draw(st.sampled_from(choices))
    if kind == "check" and draw(st.integers(0, 3)) == 0:
        kind = "stop"
    match kind:
        case "fetch":
            upstream = draw(st.sampled_from(COMMITS))
            relation = "same" if upstream == world.head else draw(
                st.sampled_from(["behind", "behind", "behind", "ahead", "diverged"]))
            return FetchSucceeded(head=world.head, upstream=upstream, relation=relation,
                                  dirty=draw(st.booleans()) and draw(st.booleans()))
        case "fetch_failed":
            return FetchFailed(error="remote down", head=world.head)
        case "check":
            return CheckRequested()
        case "restart":
            return RestartRequested()
        case "rollback":
            return RollbackRequested()
        case "healthy":
            return HealthPassed(pid=draw(st.sampled_from(sorted(world.alive))))
        case "probe_failed":
            return HealthProbeFailed(pid=draw(st.sampled_from(sorted(world.alive))),
                                     error="connection refused")
        case "hold":
            return StopChildRequested()
        case "start":
            return StartChildRequested()
        case "stop":
            return StopRequested()
        case "stats":
            values = draw(st.one_of(st.none(), st.fixed_dictionaries(
                {"n_clients": st.sampled_from(["0", "1", "7", "x"])})))
            return StatsRead(values=values)
        case "exit":
            pid = draw(st.sampled_from(sorted(world.alive)))
            return ChildExited(pid=pid, exit_code=draw(st.sampled_from([0, 1, 137])))
        case "junk_exit":
            return ChildExited(pid=draw(st.integers(1, 99)), exit_code=0)
        case "timer":
            name, serial = draw(st.sampled_from(sorted(state.timers)))
            return TimerFired(timer=name, serial=serial)
        case "junk_timer":
            return TimerFired(timer=draw(st.sampled_from(["backoff", "uptime", "stop", "drain",
                                                          "health", "grace"])),
                              serial=draw(st.integers(-5, 0)))
        case "go" if world.go_asked in world.told_held:  # as the agent: a hold comes first
            return FleetHeld(commit=world.go_asked, box="b2", reason="x")
        case "go":
            return FleetCleared(commit=world.go_asked or COMMITS[1],
                                why=draw(st.sampled_from(["canary", "proven", "solo"])))
        case "group_held":
            return FleetHeld(commit=draw(st.sampled_from([world.go_asked or COMMITS[2],
                                                          *COMMITS])), box="b2", reason="x")
        case "slot":
            return SlotGranted(commit=world.slot_asked or COMMITS[1], slot=0)
        case "late_slot":
            return SlotGranted(commit=draw(st.sampled_from(COMMITS)), slot=1)
        case "build":
            commit = world.build
            return (BuildSucceeded(commit=commit) if draw(st.booleans())
                    else BuildFailed(commit=commit, reason="exit code 1"))
        case _:
            commit = world.update
            return (TreeUpdated(commit=commit) if draw(st.booleans())
                    else TreeUpdateFailed(commit=commit, error="refused"))


def record_fact(world: World, event: Event, state: State) -> None:
    """The world changes when a fact happens, before the machine hears of it."""
    match event:
        case FleetCleared(commit=commit):
            world.cleared.add(commit)
        case FleetHeld(commit=commit):
            world.told_held.add(commit)
            if commit != world.stopping_for:
                world.group_held.add(commit)
        case SlotGranted(commit=commit) if commit == world.slot_asked:
            world.slot_held, world.slot_asked = commit, None
        case ChildExited(pid=pid):
            world.alive.discard(pid)
        case BuildSucceeded() | BuildFailed():
            world.build = None
        case TreeUpdated(commit=commit):
            world.head, world.update = commit, None
        case TreeUpdateFailed():
            world.update = None
        case StatsRead(values=values) if world.watching:
            world.stats_idle = values is not None and CONDITION.holds(values)
        case TimerFired(timer="drain", serial=serial) if ("drain", serial) in state.timers:
            world.drain_expired = True


def deliver(world: World, state: State, event: Event, settings_: Settings) -> State:
    """Decide `event` and every answer the loop would give at once, checking each step."""
    queue = [event]
    while queue:
        current = queue.pop(0)
        record_fact(world, current, state)
        before = state
        state, actions = decide(before, current)
        queue += check_and_apply(world, before, state, actions, settings_)
    return state


SETTINGS = st.builds(
    Settings,
    backoff_min=st.just(1.0), backoff_max=st.sampled_from([1.0, 4.0, 60.0]),
    reset_after=st.just(10.0), stop_timeout=st.just(5.0),
    drain_condition=st.sampled_from([CONDITION, None]),
    drain_timeout=st.sampled_from([0.0, 30.0]),
    has_build=st.booleans(), reset_on_diverge=st.booleans(),
    releases=st.booleans(), health_gate=st.booleans(),
    grace=st.sampled_from([0.0, 5.0]), probe=st.booleans(), health_timeout=st.just(30.0),
    overlap=st.booleans(), fleet=st.booleans(),
).filter(lambda s: s.releases or not (s.overlap or s.fleet))  # as the config allows


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(settings_=SETTINGS, data=st.data(), built=st.sampled_from([None, COMMITS[0]]),
       start_fails=st.booleans())
def test_random_histories_keep_every_promise(settings_, data, built, start_fails):
    world = World(start_fails=start_fails and data.draw(st.booleans()),
                  overlap_fits=data.draw(st.booleans()))
    live = built if settings_.releases else None
    state = initial_state(settings_, built=built, live=live, good=(live,) if live else ())
    for _ in range(80):
        if world.exited:
            break
        event = data.draw(next_event(world, state))
        state = deliver(world, state, event, settings_)
        # The machine's view of its children always matches the world's (rule 7).
        assert len(world.alive) <= (2 if settings_.overlap else 1)
        assert world.alive == {p for p in (state.child, state.old_child) if p is not None}


@settings(max_examples=200, deadline=None)
@given(settings_=SETTINGS, data=st.data())
def test_every_history_ends_stopped_after_a_stop_request_and_child_exit(settings_, data):
    """Liveness: whatever happened before, SIGTERM plus the child's exit always ends the run."""
    world = World()
    state = initial_state(settings_, built=COMMITS[0])
    for _ in range(data.draw(st.integers(0, 30))):
        event = data.draw(next_event(world, state))
        if isinstance(event, StopRequested):
            continue
        state = deliver(world, state, event, settings_)
    state = deliver(world, state, StopRequested(), settings_)
    for pid in sorted(world.alive):
        state = deliver(world, state, ChildExited(pid=pid, signal="SIGTERM"), settings_)
    assert state.phase == Phase.STOPPED and world.exited


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), count=st.integers(2, 4))
def test_many_machines_fed_interleaved_events_never_affect_each_other(data, count):
    """One supervisor runs many apps, each its own machine: whatever the interleaving, each
    app ends exactly where the same events alone would have taken it (no shared state)."""
    apps = [data.draw(SETTINGS) for _ in range(count)]
    worlds = [World() for _ in apps]
    states = [initial_state(s, built=COMMITS[0]) for s in apps]
    histories: list[list[Event]] = [[] for _ in apps]
    for _ in range(60):
        index = data.draw(st.integers(0, count - 1))
        if worlds[index].exited:
            continue
        event = data.draw(next_event(worlds[index], states[index]))
        histories[index].append(event)
        states[index] = deliver(worlds[index], states[index], event, apps[index])
    for settings_, history, state in zip(apps, histories, states, strict=True):
        alone, world = initial_state(settings_, built=COMMITS[0]), World()
        for event in history:
            alone = deliver(world, alone, event, settings_)
        assert alone == state
