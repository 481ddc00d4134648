"""The shape of the code, checked: the tree shows the architecture and imports point one way,
core <- drivers <- loop <- cli, with no cycles; the decisions stay pure; heavy imports stay lazy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"
# Each layer may import its own and those to its left, never one to its right.
LAYERS = ("core", "drivers", "loop", "cli")
# The modules that decide: no IO, no clock, no asyncio, not even transitively.
PURE_PREFIXES = ("machine", "rules_", "state", "events", "condition", "settings")
PURE_IMPORTS = {"__future__", "dataclasses", "enum", "typing", "collections.abc", "re", "math",
                "operator"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package of `path`
                base = module_name(path).split(".")[: -node.level]
                names.add(".".join([*base, *(node.module or "").split(".")]).rstrip("."))
            else:
                names.add(node.module or "")
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "example_app" not in p.parts}


def internal_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    return {name for name in imported_modules(path) if name in modules}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    loose = [m for m in package_modules() if m.count(".") == 1 and layer_of(m) is None
             and m not in ("supervisor.__main__",)]
    assert not loose, f"modules outside core/, drivers/, loop/ and cli/: {loose}"


def test_imports_point_from_the_cli_through_the_loop_and_drivers_to_the_core():
    modules = package_modules()
    wrong = []
    for module, path in modules.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in internal_imports(path, modules):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    modules = package_modules()
    graph = {m: internal_imports(p, modules) - {m} for m, p in modules.items()}
    # Packages import nothing of their own here, so an edge to a package is no edge.
    graph = {m: {t for t in targets if modules[t].name != "__init__.py"}
             for m, targets in graph.items()}
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join([*trail, module])
        visiting.add(module)
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_decisions_import_nothing_that_does_io_or_reads_a_clock():
    modules = package_modules()
    pure = {m: p for m, p in modules.items()
            if m.startswith("supervisor.core.") and m.split(".")[-1].startswith(PURE_PREFIXES)}
    assert "supervisor.core.machine" in pure
    for module, path in pure.items():
        names = imported_modules(path)
        outside = {n for n in names if not n.startswith("supervisor.")
                   and not any(n == ok or n.startswith(ok + ".") for ok in PURE_IMPORTS)}
        # `from typing import TYPE_CHECKING` blocks name the config only for annotations.
        inside = {n for n in names if n.startswith("supervisor.") and n in modules
                  and n not in pure and not _only_for_type_checking(path, n)}
        assert not outside and not inside, f"{module} imports {sorted(outside | inside)}"


def _only_for_type_checking(path: Path, module: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module == module:
                    return True
    return False


def test_drivers_never_import_the_machine():
    modules = package_modules()
    for module, path in modules.items():
        if module.startswith("supervisor.drivers."):
            assert not any(n.startswith("supervisor.core.machine")
                           for n in imported_modules(path)), module


def loaded_after(imports: str, wanted: tuple[str, ...]) -> list[str]:
    """Which of the `wanted` modules (or top-level packages) a fresh interpreter holds once it
    has imported `imports`, with TLS left out as `supervisor run` starts."""
    code = ("import json, sys, supervisor.loop.footprint as f; f.without_tls(); "
            f"import {imports}; wanted = {wanted!r}; "
            "print(json.dumps(sorted(m for m, v in sys.modules.items() if v and "
            "(m in wanted or m.split('.')[0] in wanted))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)


def test_the_service_loads_no_tls_and_watchfiles_only_when_a_drain_needs_it():
    assert loaded_after("supervisor.loop.service", (
        "watchfiles", "anyio", "aiofiles", "ssl", "http", "email")) == []


def test_a_supervisor_without_fleet_imports_nothing_of_etcd():
    """Issue 15: without [fleet] nothing of etcd is imported (the agent and the client come with
    the first app in a group)."""
    assert loaded_after("supervisor.loop.host, supervisor.cli.commands", (
        "supervisor.drivers.etcd", "supervisor.drivers.fleet",
        "supervisor.cli.fleetstatus")) == []
