"""What each way of writing off the loop costs a fresh interpreter: the import, then ten files
written and fsync'd. `none` is asyncio alone (the baseline), `rawthread` one daemon thread on a C
SimpleQueue, `thread` this tree's DiskWriter (which imports the supervisor package), `aiofiles`
the package this project was specified with (each call in the loop's default executor).

    /usr/bin/python3 -m venv /tmp/aiofiles-venv && /tmp/aiofiles-venv/bin/pip install aiofiles
    for mode in none rawthread thread aiofiles; do
        /tmp/aiofiles-venv/bin/python bench/writer_cost.py $mode --dir /var/tmp; done

Prints the import time and PSS, RSS, private (kB, /proc/self/smaps_rollup) and threads after the
import and after the writes. Run each mode in a fresh process, several times, in one sitting.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def memory() -> str:
    values: dict[str, int] = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts[0] in ("Pss:", "Rss:", "Private_Clean:", "Private_Dirty:"):
            values[parts[0][:-1]] = int(parts[1])
    count = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("Threads:"))
    return (f"pss={values['Pss']} rss={values['Rss']} "
            f"private={values['Private_Clean'] + values['Private_Dirty']} threads={count}")


def write_file(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"x" * 300)
        os.fsync(fd)
    finally:
        os.close(fd)


async def use(mode: str, directory: str, modules: dict[str, Any]) -> str:
    """The memory after the writes, read while the loop (and any executor) still runs."""
    paths = [os.path.join(directory, f"f{n}") for n in range(10)]
    if mode == "aiofiles":
        aiofiles = modules["aiofiles"]

        async def one(path: str) -> None:
            async with aiofiles.open(path, "wb") as file:
                await file.write(b"x" * 300)
                await file.flush()
                await aiofiles.os.wrap(os.fsync)(file.fileno())

        await asyncio.gather(*(one(path) for path in paths))
    elif mode == "rawthread":
        import threading
        from _queue import SimpleQueue

        queue: SimpleQueue[Any] = SimpleQueue()

        def run() -> None:
            while (job := queue.get()) is not None:
                job()

        threading.Thread(target=run, daemon=True).start()
        for path in paths:
            queue.put(lambda path=path: write_file(path))
    elif mode == "thread":
        writer = modules["DiskWriter"](asyncio.get_running_loop())
        for path in paths:
            writer.submit(lambda path=path: write_file(path))
        await writer.drain()
    await asyncio.sleep(0.2)  # the writes of `rawthread`, never awaited, are done by then
    return memory()


def main() -> int:
    # No argparse nor tempfile before the import measured: aiofiles needs tempfile, and an
    # interpreter that has it loaded already would hide part of aiofiles' cost.
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("none", "rawthread", "thread", "aiofiles"):
        print(__doc__)
        return 2
    directory_arg = sys.argv[sys.argv.index("--dir") + 1] if "--dir" in sys.argv else None
    modules: dict[str, Any] = {}
    began = time.perf_counter()
    if mode == "aiofiles":
        import aiofiles
        import aiofiles.os

        modules["aiofiles"] = aiofiles
    elif mode == "thread":
        sys.path.insert(0, str(REPO))
        from supervisor.drivers.diskwriter import DiskWriter

        modules["DiskWriter"] = DiskWriter
    imported = time.perf_counter() - began
    after_import = memory()
    import tempfile

    with tempfile.TemporaryDirectory(dir=directory_arg) as directory:
        after_use = asyncio.run(use(mode, directory, modules))
    print(f"mode={mode} import_ms={imported * 1000:.1f} after_import: {after_import} "
          f"after_use: {after_use}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
