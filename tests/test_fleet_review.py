"""Defects found by the review of fleet mode (issue 15), each shown by a test that failed on the
code reviewed. Those fixed since are plain tests; those still open are marked xfail(strict=True),
so a fix turns its test into an XPASS that fails the run until the mark is removed. The agent
runs against a real etcd member; where a fault must land at one exact moment (a reply lost, a
lease lost mid-step), a thin subclass of the real client injects it at the client's boundary;
etcd is never faked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from supervisor.core.config import FleetPolicy
from supervisor.core.events import (
    AwaitFleet,
    CheckRequested,
    ChildExited,
    FleetCleared,
    SlotGranted,
    TreeUpdateFailed,
    UpdateTree,
)
from supervisor.core.fleet import GroupView, Keys
from supervisor.core.hostconfig import FleetConfig
from supervisor.core.machine import Phase, initial_state
from supervisor.drivers.etcd import EtcdClient, EtcdUnavailable, KeyValue
from supervisor.drivers.fleet import FleetAgent
from tests.etcdtest import EtcdCluster, etcd_fixture, need_etcd
from tests.machine_harness import B, Harness
from tests.test_fleet_agent import Box, prefix_for, run, until
from tests.test_machine_fleet import FLEET, built_and_drained
from tests.test_machine_releases import live, upstream

C = "c" * 40
WAIT = 5.0


etcd = etcd_fixture(1, scope="module")


# ---------------------------------------------------------------------------------------------
# 1. A key from etcd that raises outside EtcdError: the agent's worker dies on every step


def test_a_slot_key_named_with_a_non_ascii_digit_is_rejected_not_raised():
    """Defect: `name.isdigit()` is true for '²' (and other Unicode digits that int() refuses),
    so GroupView.apply raises ValueError on a key `slots/²` instead of rejecting it."""
    keys = Keys("/p", "web")
    view = GroupView.empty()
    view.apply(keys, keys.root + "slots/²", b"{}")
    assert view.rejected == [keys.root + "slots/²"]


def test_one_odd_slot_key_in_etcd_does_not_stop_the_agent(etcd, request):
    """Defect: the ValueError above escapes `work()` (only EtcdError is caught), before
    `_read_group` clears the group from `stale`: under DriverTasks the agent crash-loops
    (driver.crashed, back off up to 60 s), and every deploy of the group waits forever. Any
    writer to the prefix (another version, a typo in etcdctl) stops the whole fleet."""
    async def scenario() -> None:
        prefix = prefix_for(request)
        etcd.put(0, f"{prefix}/v1/groups/web/slots/²", "x")
        box = Box("fra-1", etcd.endpoints, prefix, FleetPolicy("web", max_parallel=1, canary=0))
        try:
            box.member.await_go(B)
            try:
                event = await asyncio.wait_for(box.events.get(), WAIT)
            except TimeoutError:
                work = box.tasks[0]
                died = work.done() and not work.cancelled() and work.exception()
                raise AssertionError(f"no go; the agent's worker: {died!r}") from None
            assert event == FleetCleared(commit=B, why="canary")
        finally:
            await box.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# 2. A slot whose create reply was lost is never given back once the machine stops wanting it


class LosesOneSlotReply(EtcdClient):
    """The first slot create succeeds in etcd but its reply is lost (EtcdUnavailable, as when
    the member answered into a cut connection); `meanwhile` runs just before, as the machine's
    own events would (its app died while it waited for the slot)."""

    def __init__(self, endpoints: Sequence[str], meanwhile: Callable[[], None]) -> None:
        super().__init__(endpoints, timeout=0.6)
        self.meanwhile, self.lost = meanwhile, False

    async def create(self, key: str, value: bytes, lease: int = 0,
                     also_absent: Sequence[str] = ()) -> bool:
        created = await super().create(key, value, lease, also_absent)
        if created and not self.lost and "/slots/" in key:
            self.lost = True
            self.meanwhile()
            raise EtcdUnavailable("reply lost (injected after the create was applied)")
        return created


def test_a_slot_taken_with_a_lost_reply_is_given_back_when_no_longer_wanted(etcd, request):
    """Defect: after a lost create reply the slot exists in etcd under this box's lease, which
    keep_alive renews forever. `_adopt_lost_reply` only adopts it for the same commit still
    wanted; if the machine released meanwhile (ReleaseSlot from on_exit_awaiting_slot, a stop,
    a hold), nobody deletes it: with max_parallel = 1 the group, this box included, waits for a
    slot forever ("all 1 taken by fra-1 (bbbbbbbbbbbb)")."""
    async def scenario() -> None:
        config = FleetConfig(endpoints=tuple(etcd.endpoints), box="fra-1", lease_ttl=2.0,
                             prefix=prefix_for(request))
        lines: list[tuple[str, dict]] = []
        member_box: list = []
        client = LosesOneSlotReply(config.endpoints, lambda: member_box[0].release())
        agent = FleetAgent(config, lambda n, f: lines.append((n, f)), client)
        events: asyncio.Queue = asyncio.Queue()
        member = agent.join("web", FleetPolicy("web", max_parallel=1, canary=0),
                            events.put_nowait, lambda n, f: lines.append((n, f)))
        member_box.append(member)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(agent.work()), loop.create_task(agent.keep_alive())]
        try:
            member.acquire(B)
            await until(lambda: client.lost, "the slot create with the lost reply")
            member.acquire(C)  # the next deploy, for a newer commit
            try:
                event = await asyncio.wait_for(events.get(), WAIT)
            except TimeoutError:
                raise AssertionError(f"no slot; waiting for {member.waiting}") from None
            assert event == SlotGranted(commit=C, slot=0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await agent.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# 3. A lease lost while a step is in flight: the slot is written with no lease at all


class GatedReads(EtcdClient):
    """Holds a group read at a gate the test opens: a step of the agent in flight, as when
    etcd answers slowly, while keep_alive (its own task) finds the lease gone."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        super().__init__(endpoints, timeout=0.6)
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        return await super().get_prefix(prefix)


def test_a_slot_is_never_written_without_the_boxs_lease(etcd, request):
    """Defect: keep_alive's `_lease_lost` sets `agent.lease = None` while `_step` is awaiting
    etcd; the rest of that step writes `lease=self.lease or 0`, i.e. with no lease. A slot
    written so outlives the box: kill -9 it on probation and the slot is never freed, so with
    max_parallel = 1 the group's rollouts stop for good (issue: "a box that dies holding a
    slot frees it with its lease"). The likely moment is exactly after a partition longer
    than lease_ttl, when the retry step and keep_alive resume together."""
    async def scenario() -> None:
        config = FleetConfig(endpoints=tuple(etcd.endpoints), box="fra-1", lease_ttl=2.0,
                             prefix=prefix_for(request))
        client = GatedReads(config.endpoints)
        agent = FleetAgent(config, lambda n, f: None, client)
        events: asyncio.Queue = asyncio.Queue()
        member = agent.join("web", FleetPolicy("web", max_parallel=1, canary=0),
                            events.put_nowait, lambda n, f: None)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(agent.work()), loop.create_task(agent.keep_alive())]
        other = EtcdClient(etcd.endpoints)
        try:
            await until(lambda: agent.lease is not None and "web" in agent.watches,
                        "the first step: lease granted, group read")
            first_lease = agent.lease
            client.gate = asyncio.Event()
            agent.stale.add("web")
            agent.wake()
            await asyncio.wait_for(client.entered.wait(), WAIT)  # a step is now in flight
            await other.revoke(first_lease)
            await until(lambda: agent.lease is None, "keep_alive finding the lease gone")
            member.acquire(B)
            client.gate.set()
            assert await asyncio.wait_for(events.get(), WAIT) == SlotGranted(commit=B, slot=0)
            slot = await other.get(member.keys.slot(0))
            assert slot is not None and slot.lease != 0, "a slot with no lease outlives its box"
        finally:
            if client.gate is not None:
                client.gate.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await agent.close()
            await other.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# 4. The machine: a crash while waiting for a slot takes the box out without a slot


def test_a_crash_while_awaiting_a_slot_does_not_put_the_new_commit_on_probation_unslotted():
    """Defect: in AWAITING_SLOT the app's death makes the machine start the *new* commit at
    once and release its slot request (on_exit_awaiting_slot). The box is then on probation of
    a new commit with no slot: beside max_parallel boxes that hold one, the group has one more
    out than max_parallel (the issue counts probation as out). A crash restart of the live
    release, still waiting for the slot, keeps the bound (or: start the target only once
    SlotGranted)."""
    harness = live(FLEET)
    harness.feed(upstream(B))
    built_and_drained(harness, B)
    assert harness.state.phase == Phase.AWAITING_SLOT
    harness.feed(ChildExited(pid=harness.state.child, exit_code=1))
    on_probation_of_b = (harness.state.phase == Phase.PROBATION
                         and harness.state.child_commit == B)
    assert not on_probation_of_b, "a new commit on probation without a slot of the group"


# ---------------------------------------------------------------------------------------------
# 5. A box with no release yet deploys a commit the group holds


def test_a_box_with_no_release_yet_gives_the_group_a_chance_to_say_its_commit_is_held():
    """Defect (against the issue's "no other box deploys it" and fleet.md's "What it
    guarantees"): a box with no release deploys upstream at once, with no AwaitFleet, so the
    agent (which answers holds only for a commit asked about) can never tell it the commit is
    held. A box added to the pool after a bad push builds and serves the known-bad commit.
    Fix: ask the group about the first commit too, cleared unless held (no canary wait)."""
    harness = Harness(initial_state(FLEET))
    actions = harness.feed(upstream(B))
    asked = AwaitFleet(B) in actions
    deployed_at_once = any(isinstance(a, UpdateTree) and a.commit == B for a in actions)
    assert asked or not deployed_at_once, "deployed B without asking whether the group holds it"


# ---------------------------------------------------------------------------------------------
# 6. etcd that answers but refuses writes is taken for "out of reach": every box goes solo


def test_a_box_does_not_go_solo_while_etcd_answers_but_refuses_writes(tmp_path, request):
    """Defect: `work()` treats any EtcdError as etcd out of reach (`down_since`), and
    `_go_solo_if_due` then deploys alone. An etcd that answers but refuses every write (its
    quota full: "database space exceeded", or a permission taken away) refuses them to every
    box at once, so after solo_after every box goes solo together: the whole fleet deploys at
    once, the one thing fleet mode is for. Only EtcdUnavailable (no member answered) should
    start the solo clock."""
    need_etcd()
    quota = ("--quota-backend-bytes", str(4 << 20))
    with EtcdCluster(tmp_path / "etcd", 1, extra_args=quota) as cluster:
        async def scenario() -> None:
            prefix = prefix_for(request)
            policy = FleetPolicy("web", max_parallel=1, canary=1)
            canary = Box("fra-1", cluster.endpoints, prefix, policy)
            other = Box("fra-2", cluster.endpoints, prefix, policy, solo_after=1.0)
            try:
                for box in (canary, other):
                    box.member.publish("running", C, True, None)
                await until(lambda: len(other.agent.views["web"].boxes) == 2, "both registered")
                other.member.await_go(B)
                await other.line("fleet.waiting")  # for the canary fra-1
                for index in range(8):  # fill the store past its quota: the NOSPACE alarm
                    try:
                        cluster.put(0, f"/filler/{index}", "x" * (1 << 20), timeout=10.0)
                    except Exception:
                        break
                other.member.publish("running", C, True, "changed")  # a write: refused
                try:
                    event = await asyncio.wait_for(other.events.get(), 3.0)
                except TimeoutError:
                    return  # still waiting for the canary: right
                said = [facts for name, facts in other.lines if name == "fleet.unreachable"]
                raise AssertionError(f"{event} while etcd answered every request: {said}")
            finally:
                await canary.close()
                await other.close()

        run(scenario())


# ---------------------------------------------------------------------------------------------
# 7. A canary whose deploy failed for a reason of its own holds the whole group


def test_a_canary_that_failed_for_its_own_reason_deploys_again_when_asked():
    """Defect (liveness, and fleet.md "The deploy waits for the go" promises otherwise): a
    canary whose checkout failed for a reason of its own (a full disk) holds the commit
    locally (rule 4) though nothing is held for the group. fleet.md says "fix it there and
    `supervisor deploy`", but the fetch that request makes logs deploy.skipped "failed before":
    the canary never proves the commit, and every other box waits for it until someone pushes
    a new commit. Fix: in fleet mode, a failure not for_the_fleet should not hold the commit
    (or `supervisor deploy` should clear a local hold of a box-side failure)."""
    harness = live(FLEET)
    harness.feed(upstream(B))
    harness.feed(FleetCleared(commit=B, why="canary"))
    harness.feed(TreeUpdateFailed(commit=B, error="No space left on device"))
    harness.feed(CheckRequested())  # `supervisor deploy`, once the disk has room again
    actions = harness.feed(upstream(B))
    assert any(isinstance(a, UpdateTree | AwaitFleet) and a.commit == B for a in actions), \
        "the canary never deploys B again: the group waits for it forever"
