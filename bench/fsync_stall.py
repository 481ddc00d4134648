"""How long one app's durable state write (state.json, fsync'd) holds up the event loop that
every app of a supervisor shares, written inline on the loop or by the writer thread the Host
installs: a ticker on the loop measures its lateness while N apps save their state in turn, as a
burst of failed deploys or new good releases would make them.

    python3 bench/fsync_stall.py --dir /var/lib/x --apps 10 --rounds 20
    python3 bench/fsync_stall.py --dir /var/tmp --pressure 600   # with a writer of dirty pages

Run it on the disk the state lives on (an SD card is the case that matters); /tmp is often a
tmpfs, where fsync costs nothing. `--pressure MB` runs `dd` beside it, writing MB of dirty pages
to the same file system again and again, so that each fsync waits for writeback as on a slow
card. Prints, for each mode, the save call's median and worst time (what the loop pays), the
save-to-durable latency (until its fsync is done), the time until a whole round of saves (one
per app) is durable, and the loop's median and worst lag; mode `none` is the lag without saves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from supervisor.drivers.diskwriter import DiskWriter
from supervisor.drivers.statefile import StateStore

TICK = 0.005  # the ticker's period: its lateness is the loop's stall


async def measure(directory: str, apps: int, rounds: int, mode: str,
                  pace: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    writer = DiskWriter(loop) if mode == "writer" else None
    rounds_taken: list[float] = []
    stores = []
    for index in range(apps):
        path = os.path.join(directory, f"{mode}{os.getpid()}-{time.monotonic_ns()}",
                            f"app{index}")
        os.makedirs(path, exist_ok=True)
        store = StateStore(path)
        store.save(built="0" * 40)  # the files exist, as in a running supervisor
        store.writer = writer
        stores.append(store)
    lags: list[float] = []
    calls: list[float] = []
    durable: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            expected = loop.time() + TICK
            await asyncio.sleep(TICK)
            lags.append(max(0.0, loop.time() - expected))

    task = loop.create_task(ticker())
    await asyncio.sleep(0.05)
    for round_ in range(rounds):
        round_began = time.perf_counter()
        for store in stores if mode != "none" else ():
            began = time.perf_counter()
            store.save(failed=f"{round_:040x}", held=(), good=())  # durable: fsync'd
            calls.append(time.perf_counter() - began)
            if writer is None:
                durable.append(calls[-1])
            else:  # behind this store's job in the queue: done once its fsync is
                writer.submit(lambda b=began: durable.append(time.perf_counter() - b))
            await asyncio.sleep(0)  # the other apps' steps run in between, as in the loop
        if writer is None:
            rounds_taken.append(time.perf_counter() - round_began)
        else:
            writer.submit(lambda b=round_began: rounds_taken.append(time.perf_counter() - b))
        await asyncio.sleep(pace)
    if writer is not None:
        await writer.drain()
        writer.stop(10)
    stop.set()
    await task
    result: dict[str, float] = {"saves": len(calls)}
    if calls:
        result.update({
            "call_median_ms": statistics.median(calls) * 1000, "call_max_ms": max(calls) * 1000,
            "durable_median_ms": statistics.median(durable) * 1000,
            "durable_max_ms": max(durable) * 1000,
            "round_median_ms": statistics.median(rounds_taken) * 1000,
            "round_max_ms": max(rounds_taken) * 1000})
    result.update({"lag_median_ms": statistics.median(lags) * 1000,
                   "lag_max_ms": max(lags) * 1000})
    return result


class Pressure:
    """`dd` writing dirty pages to the file system under test, over and over, until stopped:
    writeback then keeps the disk busy and each fsync waits its turn, as on an SD card."""

    def __init__(self, directory: str, megabytes: int) -> None:
        self.target = os.path.join(directory, "pressure")
        command = (f"while :; do dd if=/dev/zero of={self.target} bs=1M count={megabytes} "
                   f"conv=notrunc status=none; done")
        self.process = subprocess.Popen(["sh", "-c", command], start_new_session=True)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # our own group: sh and its dd
        self.process.wait()
        os.unlink(self.target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the state directories go (default: a temp dir)")
    parser.add_argument("--apps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pace", type=float, default=0.05,
                        help="seconds between rounds (each app saves once per round)")
    parser.add_argument("--mode", choices=("inline", "writer", "none", "all"), default="all",
                        help="none: the ticker alone, the loop's lag without any save")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the modes this many times, in alternating order (writeback "
                             "under pressure changes as it goes: no mode always comes first)")
    parser.add_argument("--pressure", type=int, default=0, metavar="MB",
                        help="dd this many MB of dirty pages, again and again, during the run")
    args = parser.parse_args()
    modes = ("none", "inline", "writer") if args.mode == "all" else (args.mode,)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        pressure = Pressure(directory, args.pressure) if args.pressure else None
        try:
            if pressure is not None:
                time.sleep(2.0)  # let the dirty pages pile up before measuring
            for index in range(args.repeat):
                for mode in modes if index % 2 == 0 else modes[::-1]:
                    result = asyncio.run(measure(directory, args.apps, args.rounds, mode,
                                                 args.pace))
                    print(f"mode={mode} pressure_mb={args.pressure} " + " ".join(
                        f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in result.items()), flush=True)
        finally:
            if pressure is not None:
                pressure.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
