"""The fleet agent: this box's member of each app's group in etcd. It registers the box under a
lease, publishes each app's state, takes and gives back slots, records what commits did here,
and tells each app's machine what the group says (FleetCleared, FleetHeld, SlotGranted). It
decides nothing about an app (core/rules_fleet.py does) and never names a commit to run: it only
answers about the commit the machine asked for. etcd trouble is a log line and a wait, never a
crash: the apps keep running and restarting without it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from supervisor.core.config import FleetPolicy
from supervisor.core.events import Event, FleetCleared, FleetHeld, SlotGranted
from supervisor.core.fleet import (
    GroupView,
    Keys,
    SlotRecord,
    Verdict,
    go_for,
    record_bytes,
    rollout_id,
)
from supervisor.core.hostconfig import FleetConfig
from supervisor.drivers.etcd import EtcdClient, EtcdError, EtcdUnavailable, LeaseLost

Log = Callable[[str, dict[str, Any]], None]
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between tries while etcd is out of reach
RESYNC = 30.0  # seconds: a full read of each group while something waits, besides the watch
SOLO = -1  # the "slot" of a box deploying alone (etcd out of reach past fleet.solo_after)


@dataclass
class Member:
    """One app's part in its group, as the app's Service sees it: each call only records what
    the machine asked for and wakes the agent, which does the IO."""

    agent: FleetAgent
    app: str
    policy: FleetPolicy
    post: Callable[[Event], None]
    log: Log
    keys: Keys = field(init=False)
    go_wanted: str | None = None  # a commit waiting for the group's go
    go_told: str | None = None  # ... already answered (FleetCleared or FleetHeld posted)
    held_told: set[str] = field(default_factory=set)  # commits FleetHeld was posted for
    slot_wanted: str | None = None  # a deploy waiting for a slot
    slot: tuple[int, str, bytes] | None = None  # (index, commit, the value we wrote)
    attempt: str = ""  # the token of our last slot attempt, to recognise it after a lost reply
    releasing: list[tuple[int, str, bytes]] = field(default_factory=list)
    reports: deque[tuple[str, bool, str]] = field(default_factory=deque)
    record: dict[str, Any] = field(default_factory=dict)
    published: dict[str, Any] | None = None
    waiting: str | None = None  # why a deploy waits, in words (status, fleet status)
    on_change: Callable[[], None] | None = None  # the Service's status, refreshed

    def __post_init__(self) -> None:
        self.keys = Keys(self.agent.config.prefix, self.policy.group)

    # What the machine asks (Service._perform): recorded now, carried out by the agent.
    def await_go(self, commit: str | None) -> None:
        self.go_wanted, self.go_told = commit, None
        self.set_waiting(None)
        if commit is not None:
            self.agent.stale.add(self.policy.group)  # its proof or hold is read by key
        self.agent.wake()

    def acquire(self, commit: str) -> None:
        self.slot_wanted = commit
        self.agent.wake()

    def release(self, commit: str | None = None) -> None:
        if commit is None or self.slot_wanted == commit:
            self.slot_wanted = None
        if self.slot is not None and (commit is None or self.slot[1] == commit):
            index, held_for, value = self.slot
            if index != SOLO:
                self.releasing.append((index, held_for, value))
            self.slot = None
        self.set_waiting(None)
        self.agent.wake()

    def record_outcome(self, commit: str, healthy: bool, reason: str) -> None:
        self.reports.append((commit, healthy, reason))
        self.agent.wake()

    def publish(self, phase: str, commit: str | None, healthy: bool,
                rollout: str | None) -> None:
        record = {"box": self.agent.config.box, "app": self.app, "phase": phase,
                  "commit": commit, "healthy": healthy, "waiting": self.waiting,
                  "rollout": rollout}
        if record != self.record:
            self.record = record
            self.agent.wake()

    def set_waiting(self, reason: str | None) -> None:
        if reason == self.waiting:
            return
        self.waiting = reason
        if reason is not None:
            commit = self.slot_wanted or self.go_wanted or ""
            self.log("fleet.waiting", {"group": self.policy.group, "commit": commit,
                                       "reason": reason,
                                       "rollout": rollout_id(self.policy.group, commit)})
        if self.on_change is not None:
            self.on_change()


class FleetAgent:
    """One per process: one etcd client, one lease for the box, one watch per group."""

    def __init__(self, config: FleetConfig, log: Log, client: EtcdClient | None = None) -> None:
        self.config, self.log = config, log
        self.client = client or EtcdClient(config.endpoints, ca=config.ca, cert=config.cert,
                                           key=config.key, user=config.user,
                                           password=config.password,
                                           timeout=min(2.0, config.lease_ttl / 3))
        self.members: list[Member] = []
        self.views: dict[str, GroupView] = {}
        self.watches: dict[str, asyncio.Task[None]] = {}
        self.stale: set[str] = set()  # groups to read again in full
        self.lease: int | None = None
        self.down_since: float | None = None  # monotonic: etcd out of reach since
        self.down_reason = ""
        self.refused_reason = ""  # the last error etcd answered with, logged once
        self.retry = RETRY_MIN
        self.reported_bad: set[str] = set()
        self._wake = asyncio.Event()
        self._forgotten: list[Member] = []  # apps removed by a reload: records to delete
        self._retry_handle: asyncio.TimerHandle | None = None
        self._last_read: dict[str, float] = {}

    # -----------------------------------------------------------------------------------------
    # Life

    def join(self, app: str, policy: FleetPolicy, post: Callable[[Event], None],
             log: Log) -> Member:
        member = Member(self, app, policy, post, log)
        self.members.append(member)
        if policy.group not in self.views:
            self.views[policy.group] = GroupView.empty()
            self.stale.add(policy.group)
        self.wake()
        return member

    def leave(self, member: Member) -> None:
        """An app removed by a reload: its slot is given back and its record deleted."""
        member.release()
        if member in self.members:
            self.members.remove(member)
        self._forgotten.append(member)
        self.wake()

    async def close(self) -> None:
        """At exit, once `work` and `keep_alive` are cancelled (the Host's driver tasks): the
        lease is revoked, so this box's records and slots vanish at once rather than after
        lease_ttl (if etcd is out of reach, the lease runs out on its own)."""
        watches = list(self.watches.values())
        for task in watches:
            task.cancel()
        if watches:
            await asyncio.wait(watches, timeout=1.0)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self.lease is not None:
            try:
                await self.client.revoke(self.lease)
            except EtcdError:
                pass
        await self.client.close()

    def wake(self) -> None:
        self._wake.set()

    # -----------------------------------------------------------------------------------------
    # The work: one step at a time, so etcd sees this box's writes in the order asked

    async def work(self) -> None:
        """The agent's one writer: runs until cancelled (under the Host's DriverTasks)."""
        self.log("fleet.started", {"box": self.config.box,
                                   "endpoints": list(self.config.endpoints),
                                   "groups": sorted(self.views)})
        self.wake()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._step()
            except EtcdUnavailable as error:
                self._unreachable(error)
            except EtcdError as error:
                # etcd answers but refuses (a full database, a permission): every box hears
                # the same, so none may go solo on it; the deploy waits and the log says why.
                self._refused(error)
            else:
                self._reachable()
            self._go_solo_if_due()

    async def _step(self) -> None:
        if self.lease is None:
            self.lease = await self.client.grant(max(2, round(self.config.lease_ttl)))
            for member in self.members:
                member.published = None  # registered again under the new lease
        now = time.monotonic()
        for group in list(self.views):
            waiting = any(m.go_wanted or m.slot_wanted for m in self.members
                          if m.policy.group == group)
            if group in self.stale or group not in self.watches or (
                    waiting and now - self._last_read.get(group, 0) > RESYNC):
                await self._read_group(group)
        for member in self._forgotten:
            await self._give_back(member)
            await self.client.delete(member.keys.box(self.config.box))
        self._forgotten.clear()
        for member in list(self.members):
            self._find_strays(member)
            await self._give_back(member)
            await self._send_reports(member)
            await self._publish(member)
            await self._take_slot(member)
            self._answer_go(member)

    async def _read_group(self, group: str) -> None:
        """The group's boxes and slots in full, and of the proofs and holds only those of the
        commits this box asks about: they pile up with every commit ever pushed, and a tiny box
        must not load them all. The watch (from the first read on) brings every later change."""
        keys = Keys(self.config.prefix, group)
        revision, kvs = await self.client.get_prefix(keys.root + "boxes/")
        kvs += (await self.client.get_prefix(keys.root + "slots/"))[1]
        for commit in sorted({c for m in self.members if m.policy.group == group
                              for c in (m.go_wanted, m.slot_wanted) if c is not None}):
            for key in (keys.proven(commit), keys.held(commit)):
                found = await self.client.get(key)
                if found is not None:
                    kvs.append(found)
        view = GroupView.empty()
        for kv in kvs:
            view.apply(keys, kv.key, kv.value)
        self.views[group] = view
        self._report_rejected(group, view)
        self.stale.discard(group)
        self._last_read[group] = time.monotonic()
        old = self.watches.pop(group, None)
        if old is not None:
            old.cancel()
        self.watches[group] = asyncio.get_running_loop().create_task(
            self._watch(group, keys, revision + 1))

    async def _watch(self, group: str, keys: Keys, revision: int) -> None:
        """Keeps the group's view current; when the stream breaks, the next step reads the
        whole group again and watches from there."""
        try:
            async for events in self.client.watch(keys.root, revision):
                view = self.views.get(group)
                if view is None:
                    return
                for event in events:
                    view.apply(keys, event.kv.key,
                               None if event.kind == "delete" else event.kv.value)
                self._report_rejected(group, view)
                self.wake()
        except EtcdError:
            pass
        finally:
            if self.watches.get(group) is asyncio.current_task():
                del self.watches[group]
            self.stale.add(group)
        self._retry_soon()

    def _report_rejected(self, group: str, view: GroupView) -> None:
        for key in view.rejected:
            if key not in self.reported_bad:
                self.reported_bad.add(key)
                self.log("fleet.bad_record", {"group": group, "key": key[:300]})
        view.rejected.clear()

    async def _give_back(self, member: Member) -> None:
        while member.releasing:
            index, commit, value = member.releasing[0]
            await self.client.delete_if(member.keys.slot(index), value)
            member.releasing.pop(0)
            self.views[member.policy.group].slots.pop(index, None)
            member.log("fleet.slot_released", {
                "group": member.policy.group, "slot": index, "commit": commit,
                "rollout": rollout_id(member.policy.group, commit)})

    async def _send_reports(self, member: Member) -> None:
        view = self.views[member.policy.group]
        while member.reports:
            commit, healthy, reason = member.reports[0]
            record: dict[str, Any] = {"box": self.config.box, "at": round(time.time(), 3)}
            if healthy:
                await self.client.create(member.keys.proven(commit), record_bytes(record))
            else:
                record["reason"] = reason[:300]
                await self.client.put(member.keys.held(commit), record_bytes(record))
            member.reports.popleft()
            table = view.proven if healthy else view.held
            table.setdefault(commit, Verdict(self.config.box, reason))
            facts = {"group": member.policy.group, "commit": commit,
                     "rollout": rollout_id(member.policy.group, commit)}
            if healthy:
                member.log("fleet.proven", facts)
            else:
                member.log("fleet.held_for_group", facts | {"reason": reason})

    async def _publish(self, member: Member) -> None:
        if not member.record or member.record == member.published or self.lease is None:
            return  # (no lease: lost during this step; the next step takes a new one)
        record = dict(member.record)
        await self.client.put(member.keys.box(self.config.box), record_bytes(record),
                              lease=self.lease)
        member.published = record

    async def _take_slot(self, member: Member) -> None:
        commit = member.slot_wanted
        if commit is None or member.slot is not None or self.lease is None:
            return  # a slot lives under the box's lease, or it could outlive the box
        view = self.views[member.policy.group]
        if self._adopt_lost_reply(member, view, commit):
            return
        if commit in view.held:
            return  # the machine hears of the hold (_answer_go) and gives up the deploy
        for index in range(member.policy.max_parallel):
            if index in view.slots:
                continue
            if self.lease is None:
                return  # lost while we asked for the slot before
            member.attempt = os.urandom(6).hex()
            value = _slot_value(self.config.box, commit, member.attempt)
            # Never a slot for a commit the group holds, even one held a moment ago.
            if await self.client.create(member.keys.slot(index), value, lease=self.lease,
                                        also_absent=(member.keys.held(commit),)):
                if member.slot_wanted != commit:  # the deploy stopped waiting meanwhile
                    member.releasing.append((index, commit, value))
                    await self._give_back(member)
                    return
                self._granted(member, index, commit, value)
                return
            self.stale.add(member.policy.group)  # someone was quicker: read again
        holders = sorted(f"{r.box} ({r.commit[:12]})" for r in view.slots.values())
        member.set_waiting(f"a slot (all {member.policy.max_parallel} taken by "
                            f"{', '.join(holders) or 'others'})")

    def _find_strays(self, member: Member) -> None:
        """A slot our last attempt took though its reply was lost, and that nothing wants any
        more (the deploy ended meanwhile): given back, or the group would wait on it."""
        view = self.views[member.policy.group]
        for index, record in list(view.slots.items()):
            ours = (record.box == self.config.box and record.token
                    and record.token == member.attempt)
            held = member.slot is not None and member.slot[0] == index
            if ours and not held and record.commit != member.slot_wanted:
                value = _slot_value(self.config.box, record.commit, record.token)
                if all(entry[0] != index for entry in member.releasing):
                    member.releasing.append((index, record.commit, value))

    def _adopt_lost_reply(self, member: Member, view: GroupView, commit: str) -> bool:
        """A create whose reply was lost (the outcome unknown) may have succeeded: the slot that
        holds our last attempt's token is ours."""
        for index, record in view.slots.items():
            if (record.box == self.config.box and record.token
                    and record.token == member.attempt and record.commit == commit):
                self._granted(member, index, commit,
                              _slot_value(self.config.box, commit, record.token))
                return True
        return False

    def _granted(self, member: Member, index: int, commit: str, value: bytes) -> None:
        member.slot = (index, commit, value)
        self.views[member.policy.group].slots[index] = SlotRecord(self.config.box, commit)
        member.set_waiting(None)
        member.log("fleet.slot_taken", {"group": member.policy.group, "slot": index,
                                        "commit": commit,
                                        "rollout": rollout_id(member.policy.group, commit)})
        member.post(SlotGranted(commit=commit, slot=index))

    def _answer_go(self, member: Member) -> None:
        view = self.views[member.policy.group]
        # A hold reaches the machine while the commit waits for the go, and also once cleared
        # (being built, drained, waiting for a slot): it ends the deploy if the app is still up.
        for wanted in (member.go_wanted, member.slot_wanted):
            if wanted is not None and wanted in view.held and wanted not in member.held_told:
                member.held_told.add(wanted)
                if wanted == member.go_wanted:
                    member.go_told = wanted
                member.set_waiting(None)
                verdict = view.held[wanted]
                member.post(FleetHeld(commit=wanted, box=verdict.box, reason=verdict.reason))
        commit = member.go_wanted
        if commit is None or member.go_told == commit:
            return
        go = go_for(view, self.config.box, commit, member.policy.canary)
        if go.cleared:
            member.go_told = commit
            member.set_waiting(None)
            member.post(FleetCleared(commit=commit, why=go.why))
        else:
            member.set_waiting(go.waiting)

    # -----------------------------------------------------------------------------------------
    # The lease, and etcd out of reach

    async def keep_alive(self) -> None:
        """Renews the box's lease every third of its TTL, until cancelled."""
        period = max(0.5, self.config.lease_ttl / 3)
        while True:
            await asyncio.sleep(period)
            if self.lease is None:
                continue
            try:
                await self.client.keep_alive(self.lease)
            except LeaseLost:
                self._lease_lost()
            except EtcdUnavailable as error:
                self._unreachable(error)
                self._retry_soon()
            except EtcdError as error:
                self._refused(error)

    def _lease_lost(self) -> None:
        """Out of reach longer than the lease: the group forgot this box and its slots. A slot
        in use is gone (`fleet.slot_lost`); the deploy it was for goes on, it cannot be undone."""
        self.log("fleet.lease_lost", {"box": self.config.box,
                                      "lease_ttl": self.config.lease_ttl})
        self.lease = None
        for member in self.members:
            if member.slot is not None and member.slot[0] != SOLO:
                index, commit, _ = member.slot
                member.log("fleet.slot_lost", {"group": member.policy.group, "slot": index,
                                               "commit": commit})
                member.slot = None
                member.slot_wanted = None
        self.stale.update(self.views)
        self.wake()

    def _unreachable(self, error: EtcdError) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.log("fleet.unreachable", {"error": error.reason})
        self.down_reason = error.reason
        self.stale.update(self.views)
        for member in self.members:
            if (member.go_wanted and member.go_told != member.go_wanted) or (
                    member.slot_wanted and member.slot is None):
                member.set_waiting("etcd, out of reach (see fleet.unreachable)")
        self._retry_soon()

    def _refused(self, error: EtcdError) -> None:
        self._reachable()
        if error.reason != self.refused_reason:
            self.refused_reason = error.reason
            self.log("fleet.refused", {"error": error.reason})
        self.stale.update(self.views)
        self._retry_soon()

    def _reachable(self) -> None:
        self.retry = RETRY_MIN
        if self.down_since is not None:
            self.log("fleet.reachable",
                     {"down_for": round(time.monotonic() - self.down_since, 1)})
            self.down_since = None

    def _retry_soon(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        delay = self.retry
        self.retry = min(RETRY_MAX, self.retry * 2)
        if self.config.solo_after is not None and self.down_since is not None:
            due = self.down_since + self.config.solo_after - time.monotonic()
            delay = max(0.0, min(delay, due))
        self._retry_handle = asyncio.get_running_loop().call_later(delay, self.wake)

    def _go_solo_if_due(self) -> None:
        """fleet.solo_after: a box cut off from etcd that long deploys on its own word."""
        after = self.config.solo_after
        if after is None or self.down_since is None:
            return
        if time.monotonic() - self.down_since < after:
            return
        for member in self.members:
            if member.go_wanted and member.go_told != member.go_wanted:
                member.go_told = member.go_wanted
                member.log("fleet.solo", {"group": member.policy.group,
                                          "commit": member.go_wanted, "for": "go"})
                member.post(FleetCleared(commit=member.go_wanted, why="solo"))
            if member.slot_wanted and member.slot is None:
                commit = member.slot_wanted
                member.slot = (SOLO, commit, b"")
                member.log("fleet.solo", {"group": member.policy.group, "commit": commit,
                                          "for": "slot"})
                member.post(SlotGranted(commit=commit, slot=None))
            member.set_waiting(None)


def _slot_value(box: str, commit: str, token: str) -> bytes:
    return record_bytes({"box": box, "commit": commit, "token": token})
