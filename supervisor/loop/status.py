"""What `supervisor status` and systemd's STATUS= line show. The machine knows no clock, so the
wall-clock facts (since when the child runs, since when a drain waits, when the next fetch is
due, how the last deploy ended, the last error) are gathered here from the events the loop
handles. It only observes: nothing here feeds back into a decision.
"""

from __future__ import annotations

import os
from typing import Any

from supervisor.core.events import (
    Action,
    BuildFailed,
    ChildStarted,
    ChildStartFailed,
    Event,
    FetchFailed,
    FetchSucceeded,
    Note,
    NoteName,
    StartChild,
    StartReason,
    StartTimer,
    StatsRead,
    Timer,
    TreeUpdateFailed,
    WatchStats,
)
from supervisor.core.machine import DEPLOYING, Phase, State
from supervisor.drivers.eventlog import timestamp
from supervisor.drivers.sdnotify import status_line


def deploying(state: State) -> str | None:
    """The commit a deploy under way is after: its target until it starts, then the
    generation proving itself (or being rolled back)."""
    if state.phase not in DEPLOYING:
        return None
    return state.target or state.child_commit


def facts(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot without what only moves with the clock (`updated`, the child's uptime, the
    drain's seconds so far): the file is rewritten when a fact changes, not as time passes.
    Readers bring the durations up to date themselves (control.refresh)."""
    stable = {k: v for k, v in snapshot.items() if k != "updated"}
    if stable.get("child"):
        stable["child"] = {k: v for k, v in stable["child"].items() if k != "uptime"}
    if stable.get("waiting"):
        stable["waiting"] = {k: v for k, v in stable["waiting"].items() if k != "seconds"}
    return stable


class StatusBoard:
    def __init__(self, app: str, poll_interval: float, drain_keys: tuple[str, ...] = (),
                 health_gate: bool = False) -> None:
        self.app, self.poll_interval, self.drain_keys = app, poll_interval, drain_keys
        self.health_gate = health_gate  # a deploy succeeds when healthy, not when started
        self.child_since: float | None = None
        self.start_reason: StartReason | None = None
        self.drain_since: float | None = None
        self.stats: dict[str, str] | None = None
        self.next_fetch: float | None = None
        self.last_fetch: dict[str, Any] | None = None
        self.last_deploy: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self.backoff_until: float | None = None
        self.backoff: float | None = None
        self.fleet_group: str | None = None  # fleet mode: the app's group
        self.fleet_reason: str | None = None  # ... and why its deploy waits, as the agent says
        self.fleet_since: float | None = None

    def observe(self, event: Event, actions: list[Action], now: float) -> None:
        self._observe_event(event, now)
        for action in actions:
            self._observe_action(action, now)

    def _observe_event(self, event: Event, now: float) -> None:
        match event:
            case FetchSucceeded() | FetchFailed():
                self.next_fetch = now + self.poll_interval
                ok = isinstance(event, FetchSucceeded)
                self.last_fetch = {"at": timestamp(now), "ok": ok,
                                   "error": None if ok else event.error}  # type: ignore[union-attr]
                if not ok:
                    self._error(event.name, event.error, now)  # type: ignore[union-attr]
            case ChildStarted(commit=commit):
                self.child_since = now
                if self.start_reason is not None and self.start_reason.deploys:
                    self.last_deploy = {"commit": commit, "at": timestamp(now),
                                        "result": "proving healthy" if self.health_gate
                                        else "succeeded"}
            case StatsRead(values=values):
                self.stats = values
            case BuildFailed(reason=reason) | TreeUpdateFailed(error=reason):
                self._error(event.name, reason, now)
            case ChildStartFailed(error=error):
                self._error(event.name, error, now)

    def _observe_action(self, action: Action, now: float) -> None:
        match action:
            case StartChild(reason=reason):
                self.start_reason = reason
            case WatchStats():
                self.drain_since, self.stats = now, None
            case Note(event=NoteName.FLEET_DEPLOY_WAITING):
                self.fleet_since = now
            case StartTimer(timer=Timer.BACKOFF, seconds=seconds):
                self.backoff, self.backoff_until = seconds, now + seconds
            case Note(event=NoteName.DEPLOY_FAILED, facts=facts):
                self.last_deploy = {"commit": facts.get("commit"), "result": "failed",
                                    "reason": facts.get("reason"), "at": timestamp(now)}
            case Note(event=NoteName.HEALTH_PASSED, facts=facts) if (
                    self.last_deploy and self.last_deploy["result"] == "proving healthy"):
                self.last_deploy = self.last_deploy | {"result": "succeeded",
                                                       "at": timestamp(now)}
            case Note(event=NoteName.HEALTH_FAILED, facts=facts):
                self._error(NoteName.HEALTH_FAILED, str(facts.get("reason")), now)
                if facts.get("rollback_to"):
                    self.last_deploy = {"commit": facts.get("commit"),
                                        "result": "rolled back",
                                        "reason": facts.get("reason"),
                                        "at": timestamp(now)}
            case Note(event=NoteName.CHILD_CRASH_LOOPING | NoteName.CHILD_BACKING_OFF,
                      facts=facts):
                self._error("child.exited", str(facts.get("reason")), now)

    def _error(self, event: str, message: str, now: float) -> None:
        self.last_error = {"event": event, "message": message, "at": timestamp(now)}

    def _drain_stats(self) -> dict[str, str] | None:
        if self.stats is None:
            return None
        keys = self.drain_keys or tuple(self.stats)
        return {k: self.stats[k] for k in keys if k in self.stats}

    def snapshot(self, state: State, now: float) -> dict[str, Any]:
        """The status file's content: plain values, times in RFC 3339."""
        draining = state.phase == Phase.DRAINING
        waiting = None
        if draining:
            why = ", ".join(f"{k}={v}" for k, v in (self._drain_stats() or {}).items())
            waited = now - self.drain_since if self.drain_since else 0.0
            waiting = {"reason": f"draining: {why or 'stats not known yet'}",
                       "since": timestamp(self.drain_since or now), "seconds": round(waited, 1)}
        fleet_waits = state.awaiting is not None or state.phase == Phase.AWAITING_SLOT
        if waiting is None and fleet_waits:
            what = "a slot" if state.phase == Phase.AWAITING_SLOT else "the group's go"
            since = self.fleet_since or now
            waiting = {"reason": f"fleet: waiting for {self.fleet_reason or what}",
                       "since": timestamp(since), "seconds": round(now - since, 1)}
        return {
            "app": self.app, "pid": os.getpid(), "updated": timestamp(now),
            "phase": str(state.phase),
            "child": None if state.child is None else {
                "pid": state.child, "commit": state.child_commit,
                "since": timestamp(self.child_since or now),
                "uptime": round(now - (self.child_since or now), 1)},
            "head": state.head, "built": state.built,
            "target": deploying(state),
            "pending": state.pending, "failed": state.failed, "waiting": waiting,
            "good": list(state.good) if state.settings.releases else None,
            "last_deploy": self.last_deploy, "last_fetch": self.last_fetch,
            "next_fetch": timestamp(self.next_fetch) if self.next_fetch else None,
            "crashes": state.crashes,
            "backoff_until": timestamp(self.backoff_until)
            if state.phase == Phase.BACKOFF and self.backoff_until else None,
            "last_error": self.last_error,
            "fleet": None if self.fleet_group is None else {
                "group": self.fleet_group, "waiting": self.fleet_reason if fleet_waits else None},
        }

    def line(self, state: State, now: float) -> str:
        """The one-line summary for systemd's STATUS=."""
        return status_line(
            str(state.phase), commit=state.child_commit, pid=state.child,
            stats=self._drain_stats(),
            next_fetch=None if self.next_fetch is None else self.next_fetch - now,
            target=deploying(state), pending=state.pending,
            waiting=None if self.drain_since is None else now - self.drain_since,
            crashes=state.crashes, backoff=self.backoff, failed=state.failed)
