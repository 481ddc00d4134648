"""A driver-free stand-in for the service loop, for feeding the pure machine event histories.

It answers StartChild at once with ChildStarted (new pids from 100 up), as the real loop does,
and remembers every action so that tests can assert on whole histories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.core.condition import parse_condition
from supervisor.core.events import (
    Action,
    ChildStarted,
    ChildStartFailed,
    Event,
    Note,
    StartChild,
    StartTimer,
    TimerFired,
)
from supervisor.core.machine import Settings, State, decide, initial_state

A, B, C, D = "a" * 40, "b" * 40, "c" * 40, "d" * 40

DRAIN = Settings(backoff_min=1, backoff_max=8, reset_after=10, stop_timeout=5,
                 drain_condition=parse_condition("n_clients == 0"), drain_timeout=60,
                 has_build=True)
NO_DRAIN = Settings(backoff_min=1, backoff_max=8, reset_after=10, stop_timeout=5, has_build=True)


@dataclass
class Harness:
    state: State
    actions: list[Action] = field(default_factory=list)
    next_pid: int = 100
    fail_starts: bool = False
    timer_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def new(cls, settings: Settings = DRAIN, built: str | None = None) -> Harness:
        return cls(initial_state(settings, built=built))

    def feed(self, event: Event) -> list[Action]:
        """Decide `event` and any events its actions are answered with at once."""
        produced: list[Action] = []
        queue = [event]
        while queue:
            self.state, actions = decide(self.state, queue.pop(0))
            produced += actions
            for action in actions:
                if isinstance(action, StartTimer):
                    self.timer_seconds[action.timer] = action.seconds
                if isinstance(action, StartChild):
                    queue.append(self._answer_start(action))
        self.actions += produced
        return produced

    def _answer_start(self, action: StartChild) -> Event:
        if self.fail_starts:
            return ChildStartFailed(error="no such file")
        self.next_pid += 1
        return ChildStarted(pid=self.next_pid, commit=action.commit)

    def fire(self, timer: str) -> list[Action]:
        """Fire the armed timer of that name, as the loop's call_later would."""
        serial = dict(self.state.timers)[timer]
        return self.feed(TimerFired(timer=timer, serial=serial))

    def armed(self) -> dict[str, float]:
        return {name: self.timer_seconds[name] for name, _ in self.state.timers}


def kinds(actions: list[Action]) -> list[str]:
    """Action names, with notes shown by their event name: a readable history."""
    return [a.event if isinstance(a, Note) else a.name for a in actions]


def of_type(actions: list[Action], cls: type) -> list:
    return [a for a in actions if isinstance(a, cls)]
