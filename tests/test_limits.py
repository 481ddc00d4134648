"""The limits many apps share: a build queue in order of asking, and a cap on fetches at once."""

from __future__ import annotations

import asyncio

from supervisor.loop.limits import BuildQueue, FetchGate, stagger


def test_builds_beyond_the_slots_wait_in_line_and_start_as_slots_free():
    started: list[str] = []
    queue = BuildQueue(slots=1)
    assert queue.request("a", lambda: started.append("a")) is None
    assert queue.request("b", lambda: started.append("b")) == 1
    assert queue.request("c", lambda: started.append("c")) == 2
    assert started == ["a"] and queue.position("c") == 2
    queue.done("a")
    assert started == ["a", "b"] and queue.position("c") == 1
    queue.done("b")
    queue.done("c")
    assert started == ["a", "b", "c"] and not queue.running and not queue.waiting


def test_a_newer_request_of_the_same_app_replaces_its_waiting_one():
    started: list[str] = []
    queue = BuildQueue(slots=1)
    queue.request("a", lambda: started.append("a1"))
    queue.request("b", lambda: started.append("b1"))
    assert queue.request("b", lambda: started.append("b2")) == 1
    queue.done("a")
    assert started == ["a1", "b2"]


def test_a_cancelled_request_never_starts_and_two_slots_run_two():
    started: list[str] = []
    queue = BuildQueue(slots=2)
    for name in "abc":
        queue.request(name, lambda name=name: started.append(name))
    assert started == ["a", "b"]
    queue.cancel("c")
    queue.done("a")
    assert started == ["a", "b"] and queue.running == {"b"}


def test_the_fetch_gate_lets_no_more_than_its_slots_in_at_once():
    async def scenario() -> int:
        gate, inside, most = FetchGate(2), 0, 0

        async def fetch() -> None:
            nonlocal inside, most
            async with gate:
                inside += 1
                most = max(most, inside)
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                inside -= 1

        async with asyncio.timeout(5):
            await asyncio.gather(*(fetch() for _ in range(7)))
        return most

    assert asyncio.run(scenario()) == 2


def test_pollers_are_spread_over_the_interval():
    assert [stagger(i, 4, 60.0) for i in range(4)] == [0.0, 15.0, 30.0, 45.0]
    assert stagger(0, 1, 60.0) == 0.0
