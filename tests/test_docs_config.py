"""docs/configuration.md against the code, both ways: every field of the config dataclasses is
in the page's table for its section, and every key the page documents is one the parser
accepts (it reports no "unknown key" for it). A key added, renamed or removed on one side only
fails here.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from supervisor.core import config as config_module
from supervisor.core.config import (
    AppConfig,
    BuildConfig,
    ConfigError,
    DeployConfig,
    DrainConfig,
    FleetPolicy,
    GitConfig,
    HealthConfig,
    LogConfig,
    RestartConfig,
    SocketConfig,
    TriggerConfig,
    parse_config,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
DATACLASSES = {"app": AppConfig, "git": GitConfig, "build": BuildConfig, "drain": DrainConfig,
               "restart": RestartConfig, "log": LogConfig, "trigger": TriggerConfig,
               "socket": SocketConfig, "deploy": DeployConfig, "health": HealthConfig,
               "fleet": FleetPolicy}  # the main file's half: tests/test_docs_fleet.py
# A section's heading: ## `[app]`: ... or ## `[[socket]]`: ...
HEADING = re.compile(r"^## `\[\[?([a-z_]+)\]?\]`")
ROW = re.compile(r"^\| `([a-z_]+)` \|")


def documented_keys(text: str) -> dict[str, set[str]]:
    """{section: keys in the first column of its tables}, from each section heading to the next
    heading of the same level."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            match = HEADING.match(line)
            section = match.group(1) if match else None
            if section is not None:
                keys.setdefault(section, set())
        elif section is not None and (row := ROW.match(line)):
            keys[section].add(row.group(1))
    return keys


def problems_for(section: str, key: str) -> list[str]:
    """What the parser says about a config that sets only this key (besides app.command)."""
    data: dict[str, object] = {"app": {"command": "true"}}
    if section == "socket":
        data["socket"] = [{"listen": "127.0.0.1:1", key: "x"}]
    elif section == "app":
        data["app"] = {"command": "true", key: "x"}
    else:
        data[section] = {key: "x"}
    try:
        parse_config(data, "/nonexistent/supervisor.toml", environ={"HOME": "/nonexistent"})
    except ConfigError as error:
        return error.problems
    return []


def test_every_section_has_a_heading() -> None:
    documented = documented_keys(DOC.read_text())
    sections = set(config_module._SECTIONS) | set(config_module._ARRAYS)
    assert sections == set(DATACLASSES), "a new section: add it to DATACLASSES and the page"
    assert sections <= set(documented), sorted(sections - set(documented))


def test_every_field_of_the_config_is_documented() -> None:
    documented = documented_keys(DOC.read_text())
    missing = sorted(f"{section}.{item.name}" for section, cls in DATACLASSES.items()
                     for item in fields(cls) if item.name not in documented.get(section, ()))
    assert not missing, f"keys in supervisor/core/config.py but not in {DOC.name}: {missing}"


def test_every_documented_key_is_accepted_by_the_parser() -> None:
    documented = documented_keys(DOC.read_text())
    unknown = sorted(f"{section}.{key}" for section, keys in documented.items()
                     for key in keys
                     if f"{section}.{key}: unknown key" in problems_for(section, key))
    assert not unknown, f"keys in {DOC.name} that the parser refuses: {unknown}"


def test_the_check_itself_can_fail() -> None:
    """A key the code lacks is caught, and a field the page lacks would be."""
    assert "app.colour: unknown key" in problems_for("app", "colour")
    without_stop = documented_keys(DOC.read_text().replace("| `stop_timeout` |", "| x |"))
    assert "stop_timeout" not in without_stop["app"]


def toml_blocks() -> list[tuple[str, str]]:
    pages = [DOC.parent.parent / "README.md", *sorted(DOC.parent.glob("*.md"))]
    return [(page.name, block) for page in pages
            for block in re.findall(r"^```toml\n(.*?)^```$", page.read_text(), re.M | re.S)]


def test_every_toml_example_uses_keys_the_code_knows() -> None:
    """A snippet may be a part of a config; its sections and keys must still all exist."""
    import tomllib

    assert len(toml_blocks()) > 10
    for page, block in toml_blocks():
        data = tomllib.loads(block)
        if "supervisor" in data:
            continue  # a main file of many apps: tests/test_docs_many.py loads it whole
        data.setdefault("app", {}).setdefault("command", "true")
        try:
            parse_config(data, "/srv/myapp/supervisor.toml", environ={"HOME": "/srv/myapp"})
        except ConfigError as error:
            unknown = [p for p in error.problems if "unknown" in p]
            assert not unknown, f"{page}:\n{block}\n{unknown}"


def test_the_readme_config_is_a_whole_valid_config() -> None:
    import tomllib

    (block,) = [b for page, b in toml_blocks() if page == "README.md"]
    config = parse_config(tomllib.loads(block), "/srv/myapp/supervisor.toml",
                          environ={"HOME": "/srv/myapp"})
    assert config.build is not None and config.drain is not None and config.sockets
