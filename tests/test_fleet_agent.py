"""The fleet agent against a real etcd member: two or three "boxes" (agents with their own
leases) in one test loop, each with a member for the app "web". What each box's machine is told
(FleetCleared, FleetHeld, SlotGranted) is what the test reads; nothing of etcd is mocked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from supervisor.core.config import FleetPolicy
from supervisor.core.events import Event, FleetCleared, FleetHeld, SlotGranted
from supervisor.core.fleet import Keys
from supervisor.core.hostconfig import FleetConfig
from supervisor.drivers.etcd import EtcdClient
from supervisor.drivers.fleet import FleetAgent
from tests.etcdtest import TcpProxy, etcd_fixture

B, C = "b" * 40, "c" * 40
WAIT = 10.0


etcd = etcd_fixture(1, scope="module")


async def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """For what the agent reports to nobody (its view of the group, a record written)."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


class Box:
    """One supervisor's agent and the events its app's machine would get."""

    def __init__(self, name: str, endpoints: list[str], prefix: str, policy: FleetPolicy,
                 ttl: float = 2.0, solo_after: float | None = None) -> None:
        self.name = name
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.lines: list[tuple[str, dict]] = []
        config = FleetConfig(endpoints=tuple(endpoints), box=name, lease_ttl=ttl,
                             solo_after=solo_after, prefix=prefix)
        self.agent = FleetAgent(config, self._log)
        self.member = self.agent.join("web", policy, self.events.put_nowait, self._log)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.agent.work()),
                      loop.create_task(self.agent.keep_alive())]

    def _log(self, name: str, facts: dict) -> None:
        self.lines.append((name, facts))

    async def next(self) -> Event:
        return await asyncio.wait_for(self.events.get(), WAIT)

    async def line(self, name: str) -> dict:
        async def seen() -> dict:
            while True:
                for line, facts in self.lines:
                    if line == name:
                        return facts
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(seen(), WAIT)

    async def close(self, revoke: bool = True) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if not revoke:
            self.agent.lease = None  # a box killed -9: its lease runs out on its own
        await self.agent.close()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def prefix_for(request) -> str:
    return "/t/" + request.node.name.replace("[", "_").replace("]", "_")


def test_the_canary_goes_first_and_the_others_follow_once_it_proves_the_commit(etcd, request):
    async def scenario():
        policy = FleetPolicy("web", max_parallel=1, canary=1)
        boxes = [Box(n, etcd.endpoints, prefix_for(request), policy)
                 for n in ("fra-1", "fra-2", "fra-3")]
        for box in boxes:
            await box.line("fleet.started")
        # Everyone registered before asking (a box alone is its own canary).
        for box in boxes:
            box.member.publish("running", C, True, None)
        await until(lambda: all(len(b.agent.views["web"].boxes) == 3 for b in boxes),
                    "every box to see the three registered")
        for box in boxes:
            box.member.await_go(B)
        assert await boxes[0].next() == FleetCleared(commit=B, why="canary")
        waiting = await boxes[1].line("fleet.waiting")
        assert "fra-1" in waiting["reason"] and boxes[1].events.empty()
        boxes[0].member.record_outcome(B, True, "")
        assert await boxes[1].next() == FleetCleared(commit=B, why="proven")
        assert await boxes[2].next() == FleetCleared(commit=B, why="proven")
        for box in boxes:
            await box.close()

    run(scenario())


def test_slots_are_never_more_than_max_parallel_and_pass_on_when_given_back(etcd, request):
    async def scenario():
        policy = FleetPolicy("web", max_parallel=2, canary=0)
        boxes = [Box(n, etcd.endpoints, prefix_for(request), policy)
                 for n in ("a", "b", "c")]
        for box in boxes:
            box.member.acquire(B)
        granted = []
        for box in boxes:
            try:
                granted.append((box, await asyncio.wait_for(box.events.get(), 2.0)))
            except TimeoutError:
                waiting = box
        assert len(granted) == 2 and {e.slot for _, e in granted} == {0, 1}
        assert "all 2 taken" in (await waiting.line("fleet.waiting"))["reason"]
        granted[0][0].member.release()
        event = await waiting.next()
        assert event == SlotGranted(commit=B, slot=granted[0][1].slot)
        for box in boxes:
            await box.close()

    run(scenario())


def test_a_box_that_dies_holding_a_slot_frees_it_within_the_lease(etcd, request):
    async def scenario():
        policy = FleetPolicy("web", max_parallel=1, canary=0)
        first = Box("a", etcd.endpoints, prefix_for(request), policy, ttl=2.0)
        first.member.acquire(B)
        assert (await first.next()).slot == 0
        second = Box("b", etcd.endpoints, prefix_for(request), policy, ttl=2.0)
        second.member.acquire(B)
        await second.line("fleet.waiting")
        loop = asyncio.get_running_loop()
        died = loop.time()
        await first.close(revoke=False)
        assert (await second.next()).slot == 0
        assert loop.time() - died < 2.0 + 2.0, "freed within the TTL (and a little)"
        await second.close()

    run(scenario())


def test_a_failure_on_one_box_holds_the_commit_for_the_others(etcd, request):
    async def scenario():
        policy = FleetPolicy("web", max_parallel=1, canary=1)
        one = Box("fra-1", etcd.endpoints, prefix_for(request), policy)
        two = Box("fra-2", etcd.endpoints, prefix_for(request), policy)
        one.member.publish("running", C, True, None)
        two.member.publish("running", C, True, None)
        await until(lambda: "fra-1" in two.agent.views["web"].boxes, "fra-2 to see fra-1")
        two.member.await_go(B)
        await two.line("fleet.waiting")
        one.member.record_outcome(B, False, "not healthy within 5s")
        assert await two.next() == FleetHeld(commit=B, box="fra-1",
                                             reason="not healthy within 5s")
        await one.close()
        await two.close()

    run(scenario())


def test_a_box_cut_off_from_etcd_waits_says_why_and_goes_solo_after_the_set_time(etcd,
                                                                                request):
    async def scenario():
        host, port = etcd.endpoints[0].removeprefix("http://").split(":")
        with TcpProxy(host, int(port)) as proxy:
            policy = FleetPolicy("web", max_parallel=1, canary=1)
            other = Box("fra-0", etcd.endpoints, prefix_for(request), policy)
            other.member.publish("running", C, True, None)
            box = Box("fra-9", [f"http://{proxy.address}"], prefix_for(request), policy,
                      ttl=3.0, solo_after=2.0)
            await box.line("fleet.started")
            await until(lambda: "fra-0" in box.agent.views["web"].boxes,
                        "fra-9 to see fra-0 registered")
            proxy.mode = "blackhole"
            box.member.await_go(B)
            facts = await box.line("fleet.unreachable")
            assert facts["error"]
            assert box.member.waiting.startswith("etcd, out of reach")
            assert await box.next() == FleetCleared(commit=B, why="solo")
            box.member.acquire(B)
            assert await box.next() == SlotGranted(commit=B, slot=None)
            proxy.mode = "pass"
            await box.line("fleet.reachable")
            await box.close()
            await other.close()

    run(scenario())


def test_bad_records_from_etcd_are_reported_and_never_crash_the_agent(etcd, request):
    async def scenario():
        prefix = prefix_for(request)
        keys = Keys(prefix, "web")
        client = EtcdClient(etcd.endpoints)
        await client.put(keys.held(B), b"\xff not json")
        await client.put(keys.root + "slots/0", b'{"v": 99, "box": "x"}')
        await client.put(keys.box("evil"), b'{"v":1,"box":"evil","app":"web","phase":1}')
        box = Box("fra-1", etcd.endpoints, prefix, FleetPolicy("web", 1, 1))
        box.member.await_go(B)
        assert await box.next() == FleetCleared(commit=B, why="canary"), \
            "a spoiled hold is no hold"
        box.member.acquire(B)
        waiting = await box.line("fleet.waiting")
        assert "taken" in waiting["reason"], "a key that is not ours is never overwritten"
        bad = [f["key"] for n, f in box.lines if n == "fleet.bad_record"]
        assert sorted(bad) == sorted([keys.held(B), keys.root + "slots/0", keys.box("evil")])
        await box.close()
        await client.close()

    run(scenario())


def test_a_late_grant_is_given_back_when_the_deploy_stopped_waiting(etcd, request):
    async def scenario():
        policy = FleetPolicy("web", max_parallel=1, canary=0)
        box = Box("a", etcd.endpoints, prefix_for(request), policy)
        box.member.acquire(B)
        assert (await box.next()).slot == 0
        box.member.release(B)
        await box.line("fleet.slot_released")
        client = EtcdClient(etcd.endpoints)
        assert await client.get(Keys(prefix_for(request), "web").slot(0)) is None
        await client.close()
        await box.close()

    run(scenario())


def test_records_vanish_when_the_box_stops(etcd, request):
    async def scenario():
        box = Box("a", etcd.endpoints, prefix_for(request), FleetPolicy("web", 1, 1))
        box.member.publish("running", C, True, None)
        keys = Keys(prefix_for(request), "web")
        client = EtcdClient(etcd.endpoints)
        await until(lambda: box.member.published is not None, "the box's record written")
        assert await client.get(keys.box("a")) is not None
        await box.close()
        assert await client.get(keys.box("a")) is None
        await client.close()

    run(scenario())




def test_a_hold_after_the_go_still_reaches_the_box_and_no_slot_is_taken_for_it(etcd, request):
    """Found by the fleet soak: a box cleared as canary (its neighbour's lease had run out) kept
    building and took a slot for a commit the group held meanwhile."""
    async def scenario():
        policy = FleetPolicy("web", max_parallel=1, canary=0)
        one = Box("fra-1", etcd.endpoints, prefix_for(request), policy)
        two = Box("fra-2", etcd.endpoints, prefix_for(request), policy)
        two.member.await_go(B)
        assert await two.next() == FleetCleared(commit=B, why="canary")
        one.member.record_outcome(B, False, "exited on probation: exit code 3")
        assert await two.next() == FleetHeld(commit=B, box="fra-1",
                                             reason="exited on probation: exit code 3")
        two.member.acquire(B)  # had the machine asked before hearing of the hold
        client = EtcdClient(etcd.endpoints)
        await asyncio.sleep(0.5)  # nothing to wait for: no slot is what is checked
        assert await client.get(Keys(prefix_for(request), "web").slot(0)) is None
        await client.close()
        await one.close()
        await two.close()

    run(scenario())


def test_the_slot_is_never_created_once_the_commit_is_held_in_etcd(etcd, request):
    """The slot's create and the hold's absence are one transaction."""
    async def scenario():
        keys = Keys(prefix_for(request), "web")
        client = EtcdClient(etcd.endpoints)
        assert await client.create(keys.slot(0), b"x", also_absent=(keys.held(B),))
        await client.delete(keys.slot(0))
        await client.put(keys.held(B), b"{}")
        assert not await client.create(keys.slot(0), b"x", also_absent=(keys.held(B),))
        assert await client.get(keys.slot(0)) is None
        await client.close()

    run(scenario())


def test_the_agent_loads_only_the_proofs_and_holds_of_the_commits_it_asks_about(etcd, request):
    """Review: every commit ever pushed leaves a proven/ or held/ record; a tiny box must not
    load them all on every read."""
    async def scenario():
        keys = Keys(prefix_for(request), "web")
        client = EtcdClient(etcd.endpoints)
        for number in range(60):
            commit = f"{number:040x}"
            await client.put(keys.proven(commit), b'{"v":1,"box":"old"}')
            await client.put(keys.held(commit), b'{"v":1,"box":"old","reason":"x"}')
        await client.put(keys.proven(B), b'{"v":1,"box":"fra-0"}')
        box = Box("fra-1", etcd.endpoints, prefix_for(request), FleetPolicy("web", 1, 1))
        box.member.publish("running", C, True, None)
        await client.put(keys.box("fra-0"), b'{"v":1,"box":"fra-0","app":"web",'
                                           b'"phase":"running","commit":null,"healthy":true}')
        box.member.await_go(B)
        assert await box.next() == FleetCleared(commit=B, why="proven")
        view = box.agent.views["web"]
        assert set(view.proven) == {B} and view.held == {}
        await box.close()
        await client.close()

    run(scenario())
