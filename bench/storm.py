"""Stands in for a busy server: rewrites a stats file RATE times a second for SECONDS, atomically
(write a temporary file, rename it over), with n_clients cycling through 1..9, so a deploy waiting
on the drain sees a fresh, non-zero value every time. Then it writes n_clients="0" once.

    python storm.py STATS_FILE [--rate 10000] [--seconds 10]

Prints two JSON lines on stdout: {"storm_done": WALL_TIME, "writes": N, "seconds": S} when the
storm is over, and {"final_write": WALL_TIME} right after the final n_clients="0" lands (it waits
PAUSE seconds in between, so the supervisor's CPU can be read for the storm alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def write(path: str, temporary: str, clients: int) -> None:
    with open(temporary, "w") as file:
        file.write(f'n_clients="{clients}"\nversion="storm"\npid={os.getpid()}\n')
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stats_file")
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=0.5)
    args = parser.parse_args()
    temporary = f"{args.stats_file}.storm-{os.getpid()}.tmp"
    start = time.monotonic()
    writes = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= args.seconds:
            break
        due = int(elapsed * args.rate) + 1
        if writes >= due:
            time.sleep(max(0.0, (writes + 1) / args.rate - elapsed))
            continue
        for _ in range(min(due - writes, 100)):
            writes += 1
            write(args.stats_file, temporary, writes % 9 + 1)
    seconds = time.monotonic() - start
    print(json.dumps({"storm_done": time.time(), "writes": writes, "seconds": round(seconds, 3)}),
          flush=True)
    time.sleep(args.pause)
    write(args.stats_file, temporary, 0)
    print(json.dumps({"final_write": time.time()}), flush=True)


if __name__ == "__main__":
    main()
