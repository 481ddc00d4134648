"""The shape of the code, checked: a pure core, drivers that never decide, lazy heavy imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"
PURE = ("machine.py", "events.py", "condition.py")
PURE_IMPORTS = {"__future__", "dataclasses", "enum", "typing", "collections.abc", "re", "math",
                "operator", "supervisor.condition", "supervisor.events"}
DRIVERS = ("gitrepo.py", "child.py", "build.py", "statsfile.py", "proc.py", "eventlog.py",
           "statefile.py", "childlog.py", "trigger.py", "sdnotify.py", "control.py")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_core_imports_nothing_that_does_io_or_reads_a_clock():
    for name in PURE:
        extra = imported_modules(PACKAGE / name) - PURE_IMPORTS
        assert not extra, f"{name} imports {sorted(extra)}"


def test_drivers_never_import_the_machine():
    for name in DRIVERS:
        assert "supervisor.machine" not in imported_modules(PACKAGE / name), name


def test_the_service_loads_no_tls_and_watchfiles_only_when_a_drain_needs_it():
    code = ("import sys, supervisor.cli; supervisor.cli.without_tls(); import supervisor.service; "
            "print(sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in "
            "('watchfiles', 'anyio', 'aiofiles', 'ssl', 'http', 'email')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
