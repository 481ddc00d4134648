"""How long one app's durable state write (state.json, fsync'd) holds up the event loop that
every app of a supervisor shares: a ticker on the loop measures its lateness while N apps save
their state in turn, as a burst of failed deploys or new good releases would make them.

    python3 bench/fsync_stall.py --dir /var/lib/x --apps 10 --rounds 20

Run it on the disk the state lives on (an SD card is the case that matters); /tmp is often a
tmpfs, where fsync costs nothing. Prints the median and worst save and the worst loop lag.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supervisor.drivers.statefile import StateStore

TICK = 0.005  # the ticker's period: its lateness is the loop's stall


async def measure(directory: str, apps: int, rounds: int) -> dict[str, float]:
    stores = []
    for index in range(apps):
        path = os.path.join(directory, f"app{index}")
        os.makedirs(path, exist_ok=True)
        stores.append(StateStore(path))
    lags: list[float] = []
    saves: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            expected = loop.time() + TICK
            await asyncio.sleep(TICK)
            lags.append(max(0.0, loop.time() - expected))

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.05)
    for round_ in range(rounds):
        for store in stores:
            began = time.perf_counter()
            store.save(failed=f"{round_:040x}", held=(), good=())  # durable: fsync'd
            saves.append(time.perf_counter() - began)
            await asyncio.sleep(0)  # the other apps' steps run in between, as in the loop
    stop.set()
    await task
    return {"saves": len(saves), "save_median_ms": statistics.median(saves) * 1000,
            "save_max_ms": max(saves) * 1000, "lag_max_ms": max(lags) * 1000,
            "lag_median_ms": statistics.median(lags) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the state directories go (default: a temp dir)")
    parser.add_argument("--apps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        result = asyncio.run(measure(directory, args.apps, args.rounds))
    print(" ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                   for key, value in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
