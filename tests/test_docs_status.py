"""The `supervisor status` examples in docs/operations.md are what the code prints: the page's
JSON status file, rendered by the code that `supervisor status` runs, must give the page's two
texts (a supervisor that runs, and the same file once it has gone).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from supervisor.loop.control import describe_status, refresh

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
BLOCK = re.compile(r"^```\n(\$ supervisor status[^\n]*)\n(.*?)^```$", re.M | re.S)


def examples() -> dict[str, list[str]]:
    """{the command line shown: [each output shown after it]}."""
    found: dict[str, list[str]] = {}
    for command, output in BLOCK.findall(DOC.read_text()):
        found.setdefault(command, []).append(output.rstrip("\n"))
    return found


def test_the_status_texts_are_what_the_code_prints() -> None:
    shown = examples()
    (file,) = shown["$ supervisor status -c myapp.toml --json"]
    status = json.loads(file)
    running, gone = shown["$ supervisor status -c myapp.toml"]
    assert describe_status(copy.deepcopy(status)) == running
    assert describe_status(refresh(copy.deepcopy(status), running=False)) == gone
    assert status["running"] is True  # what `--json` adds to the file



def test_the_systemd_status_lines_are_what_the_code_sends() -> None:
    """docs/systemd.md lists the STATUS= lines of one deploy; each is status_line's own text
    for that moment."""
    from supervisor.drivers.sdnotify import status_line

    text = " ".join((DOC.parent / "systemd.md").read_text().split())
    listed = text.split("`STATUS=` a one-line summary on every change, shown by `systemctl "
                        "status`: ", 1)[1].split(". ", 1)[0]
    shown = re.findall(r"`([^`]+)`", listed)
    old = "54cbcb504a51257c2588969cda9ba27d2704db7b"
    new = "e0683bd9b8278f9a1b2a2e4b9e4c1c0de3a5a6f1"
    assert shown == [
        status_line("building", target=old),
        status_line("running", commit=old, pid=12908, next_fetch=240),
        status_line("draining", commit=old, pid=12908, target=new, stats={"n_clients": "1"},
                    waiting=0.0),
        status_line("restarting", target=new),
        status_line("running", commit=new, pid=12950, stats={"n_clients": "0"}, next_fetch=240),
        status_line("held"),
        status_line("shutting_down"),
    ]
