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

