"""Which escaped process belongs to which owner, with real processes: a supervisor (a separate
Python process, so that pytest itself never becomes a subreaper) runs two generations side by
side, as an overlap does, and a build; each leaves an orphan in a session of its own that comes
back to the supervisor at once. Ending each owner must kill its orphan and no other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import asyncio, json, os, sys, time
from supervisor.drivers import orphans, proc
from supervisor.drivers.cgroup import join_command
from supervisor.drivers.procfs import start_ticks

here = sys.argv[1]

def until(condition):
    deadline = time.monotonic() + 10  # bounded: a broken run fails, it never hangs
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

def leaves_orphan(name, tag=None):
    # The subshell starts the daemon and exits: the daemon comes back to us at once.
    script = f'(setsid sleep 1000 & echo $! > {here}/{name}); exec sleep 1000'
    argv = join_command(None, tag, ("/bin/sh", "-c", script))
    process = proc.spawn(argv, cwd=here, env=None)
    until(lambda: os.path.exists(f"{here}/{name}") and open(f"{here}/{name}").read())
    orphan = int(open(f"{here}/{name}").read())
    until(lambda: orphans.processes()[orphan].ppid == os.getpid())
    owner = orphans.Owner(process.pid, start_ticks(process.pid), orphans.oom_score_adj(process.pid))
    orphans.started(owner)
    return process, owner, orphan

def tick():
    # Clock ticks are 10 ms: owners and orphans a tick apart can be told apart by start time.
    time.sleep(0.03)

async def end(process, owner):
    process.signal_group(9)
    await process.exited
    found = orphans.ended(owner)
    await orphans.gone(orphans.kill(found))
    return sorted(f.pid for f in found if f.pgid != owner.pid)

async def main():
    assert orphans.become_subreaper()
    old, old_owner, old_orphan = leaves_orphan("old")
    tick()
    new, new_owner, new_orphan = leaves_orphan("new")
    tick()
    build, build_owner, build_orphan = leaves_orphan("build", tag=1000)
    result = {"orphans": [old_orphan, new_orphan, build_orphan]}
    result["old ended"] = await end(old, old_owner)
    result["build ended"] = await end(build, build_owner)
    result["new ended"] = await end(new, new_owner)
    result["left"] = [p for p in result["orphans"] if p in orphans.processes()
                      and orphans.processes()[p].state not in "ZX"]
    print(json.dumps(result))

asyncio.run(main())
"""


def test_each_owner_takes_its_own_orphans_and_no_others(tmp_path: Path):
    output = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    result = json.loads(output.stdout)
    old_orphan, new_orphan, build_orphan = result["orphans"]
    # The old generation's orphan is older than the new generation: only the old one could
    # have started it. The new generation's orphan stays while the new generation runs.
    assert result["old ended"] == [old_orphan]
    # The build's orphan carries the build's oom_score_adj: the running app cannot own it.
    assert result["build ended"] == [build_orphan]
    assert result["new ended"] == [new_orphan]
    assert result["left"] == []
