"""The writer thread at exit, end to end: a supervisor stopped while its log is behind (a pipe to
journald that is full) does not exit before the last line, `supervisor.stopped`, is written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests.conftest import BASE_ENV, wait_until

CHATTY = ("i=0; while [ $i -lt 900 ]; do echo \"line $i $(printf '%0200d' 0)\"; i=$((i+1)); "
          "done; touch printed; exec sleep 600")


def test_a_stop_waits_for_the_log_lines_still_queued(world):
    config = world.write_config(app={"command": ["sh", "-c", CHATTY]}, build=None, drain=None)
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "-c", str(config)], cwd=world.tmp,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, env=BASE_ENV)
    try:
        # 900 lines of 200 characters: far more than the pipe holds, and nobody reads it yet.
        wait_until(lambda: (world.app / "printed").exists(), 30, "the app printed its lines")
        process.send_signal(signal.SIGTERM)
        # Its lines are queued behind the full pipe: it must not exit without them. (Before it
        # drained the writer at exit, it was gone well within this second.)
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        assert process.returncode is None, "exited with its log lines unwritten"
        began = time.monotonic()
        assert process.stderr is not None
        output = process.stderr.read()  # to the end: it exits once all is written
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - began < 30
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    assert records[-1]["event"] == "supervisor.stopped"
    lines = [r["line"] for r in records if r["event"] == "child.output"]
    assert len(lines) == 900 and lines[-1].startswith("line 899 ")
