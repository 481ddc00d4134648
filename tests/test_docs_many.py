"""The many-apps docs against the code: the `[supervisor]` keys of docs/configuration.md are the
ones load_host reads, both ways; what the page says an app file may not set is what load_app
refuses; and every main file a page or contrib/many-apps/ shows loads with load_host, the app
files a page shows written next to it in a temporary directory.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from supervisor.core import hostconfig
from supervisor.core.config import ConfigError
from supervisor.core.hostconfig import Limits, load_host
from tests.test_docs_config import documented_keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
MANY = DOCS / "many-apps.md"
EXAMPLE = ROOT / "contrib" / "many-apps"
ENVIRON = {"HOME": "/nonexistent"}


def supervisor_keys_in_code() -> set[str]:
    """The keys load_host reads from the [supervisor] table."""
    return set(re.findall(r'table\.get\("([a-z_]+)"', inspect.getsource(load_host)))


def supervisor_section(text: str) -> str:
    return text.split("## `[supervisor]`", 1)[1].split("\n## ", 1)[0]


def main_file_problems(tmp_path: Path, key: str) -> list[str]:
    (tmp_path / "apps").mkdir(exist_ok=True)
    (tmp_path / "apps" / "a.toml").write_text('[app]\ncommand = "true"\n')
    main = tmp_path / "main.toml"
    value = '["apps/*.toml"]' if key == "apps" else '"x"'
    apps = "" if key == "apps" else 'apps = ["apps/*.toml"]\n'
    main.write_text(f"[supervisor]\n{apps}{key} = {value}\n")
    try:
        load_host(str(main), ENVIRON)
    except ConfigError as error:
        return error.problems
    return []


def test_every_supervisor_key_the_code_reads_is_documented() -> None:
    documented = documented_keys(CONFIGURATION.read_text())["supervisor"]
    code = supervisor_keys_in_code()
    assert {"apps", "state_dir", "max_builds", "max_fetches"} <= code  # the pattern still works
    assert code <= documented, sorted(code - documented)
    assert {item.name for item in fields(Limits)} <= documented


def test_every_documented_supervisor_key_is_accepted(tmp_path: Path) -> None:
    documented = documented_keys(CONFIGURATION.read_text())["supervisor"]
    assert documented == supervisor_keys_in_code(), "one side has a key the other lacks"
    for key in sorted(documented):
        assert f"supervisor.{key}: unknown key" not in main_file_problems(tmp_path, key), key
    # ... and the check can fail.
    assert "supervisor.colour: unknown key" in main_file_problems(tmp_path, "colour")


def test_the_documented_defaults_are_the_codes() -> None:
    section = supervisor_section(CONFIGURATION.read_text())
    for item in fields(Limits):
        assert re.search(rf"^\| `{item.name}` \| [^|]+ \| `{item.default}` \|", section, re.M), \
            item.name


def test_what_an_app_file_may_not_set_is_what_is_refused(tmp_path: Path) -> None:
    text = " ".join(supervisor_section(CONFIGURATION.read_text()).split())
    many = " ".join(MANY.read_text().split())
    for dotted in hostconfig.PROCESS_WIDE:
        named = f"`{dotted}`" if "." in dotted else f"`[{dotted}]`"  # a key, or a whole table
        assert named in text and named in many, dotted
    for key in hostconfig.MAIN_LOG_KEYS:
        assert f"`{key}`" in text, key
    # The refusal itself, in the words the pages quote.
    (tmp_path / "web.toml").write_text('[app]\ncommand = "true"\n[log]\nformat = "text"\n')
    with pytest.raises(ConfigError) as refused:
        hostconfig.load_app(str(tmp_path / "web.toml"), str(tmp_path), ENVIRON)
    assert refused.value.problems == ["log.format: belongs in the main file, once for all apps"]
    assert "belongs in the main file, once for all apps" in text


def toml_blocks(page: Path) -> list[dict]:
    return [tomllib.loads(block) for block in
            re.findall(r"^```toml\n(.*?)^```$", page.read_text(), re.M | re.S)]


def test_the_main_file_of_the_page_runs_the_app_files_of_the_page(tmp_path: Path) -> None:
    blocks = toml_blocks(MANY)
    (main,) = [b for b in blocks if "supervisor" in b]
    (web,) = [b for b in blocks if "app" in b]
    text = MANY.read_text()
    main_text = next(b for b in re.findall(r"^```toml\n(.*?)^```$", text, re.M | re.S)
                     if b.startswith("[supervisor]"))
    web_text = next(b for b in re.findall(r"^```toml\n(.*?)^```$", text, re.M | re.S)
                    if b.startswith("[app]"))
    (tmp_path / "apps").mkdir()
    (tmp_path / "supervisor.toml").write_text(main_text)
    (tmp_path / "apps" / "web.toml").write_text(web_text)
    (tmp_path / "apps" / "api.toml").write_text('[app]\ncommand = "./api"\n')
    host = load_host(str(tmp_path / "supervisor.toml"), ENVIRON)
    assert host.main and not host.broken
    assert [app.app.name for app in host.apps] == ["api", "web"]
    state = main["supervisor"]["state_dir"]
    assert host.app("web").app.state_dir == f"{state}/web"  # as the page's comment says
    assert host.app("web").git.repo == web["git"]["repo"]
    assert host.limits == Limits(main["supervisor"]["max_builds"],
                                 main["supervisor"]["max_fetches"])


def test_the_shipped_example_loads_as_the_unit_would_run_it() -> None:
    host = load_host(str(EXAMPLE / "supervisor.toml"), ENVIRON)
    assert not host.broken
    assert [app.app.name for app in host.apps] == ["api", "web"]
    for app in host.apps:
        assert app.app.state_dir == f"/var/lib/tiny-supervisor/{app.app.name}"
        assert app.git.repo == f"/srv/tiny-supervisor/{app.app.name}"
        # The unit's RuntimeDirectory= is /run/tiny-supervisor; the stats file lives there.
        if app.drain is not None:
            assert app.drain.stats_file.startswith("/run/tiny-supervisor/")
    # The same state directory with the unit's $STATE_DIRECTORY and no state_dir written out.
    text = (EXAMPLE / "supervisor.toml").read_text()
    assert 'state_dir = "/var/lib/tiny-supervisor"' in text


def test_a_page_that_names_two_apps_alike_would_be_refused(tmp_path: Path) -> None:
    """The page's rule, "two app files with one name are a mistake that names both files"."""
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "a.toml").write_text('[app]\nname = "web"\ncommand = "true"\n')
    (tmp_path / "apps" / "web.toml").write_text('[app]\ncommand = "true"\n')
    (tmp_path / "main.toml").write_text('[supervisor]\napps = ["apps/*.toml"]\n')
    with pytest.raises(ConfigError) as refused:
        load_host(str(tmp_path / "main.toml"), ENVIRON)
    (problem,) = refused.value.problems
    assert "a.toml" in problem and "web.toml" in problem
    assert "Two app files with one name are a mistake that names both" in " ".join(
        MANY.read_text().split())


def test_the_readme_main_file_loads(tmp_path: Path) -> None:
    """The README's main file is a plain block (its one toml block is a whole single-app config,
    tests/test_docs_config.py); it still loads, with an app file in the format above it."""
    (block,) = re.findall(r"^```\n(# /etc/tiny-supervisor/supervisor\.toml.*?)^```$",
                          (ROOT / "README.md").read_text(), re.M | re.S)
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "web.toml").write_text('[app]\ncommand = "./server"\n')
    (tmp_path / "supervisor.toml").write_text(block)
    host = load_host(str(tmp_path / "supervisor.toml"), ENVIRON)
    assert [app.app.name for app in host.apps] == ["web"]
    assert host.app("web").app.state_dir == "/var/lib/tiny-supervisor/web"


def test_the_status_lines_of_the_page_are_what_the_code_prints(tmp_path: Path) -> None:
    from supervisor.cli.commands import _summary

    (shown,) = re.findall(r"^  \$ supervisor status -c \S+\n(.*?)^  ```$", MANY.read_text(),
                          re.M | re.S)
    lines = [line.strip() for line in shown.splitlines()]
    (tmp_path / "blog.toml").write_text("[app]\ncommand = 3\n")
    with pytest.raises(ConfigError) as broken:
        hostconfig.load_app(str(tmp_path / "blog.toml"), str(tmp_path), ENVIRON)
    assert lines == [
        _summary("api", {"phase": "running", "running": True,
                         "child": {"pid": 4121, "commit": "3d3dbb77bb45" + "0" * 28}}),
        _summary("web", {"phase": "draining", "running": True,
                         "child": {"pid": 4187, "commit": "54cbcb504a51" + "0" * 28},
                         "waiting": {"reason": "draining: n_clients=1"}}),
        _summary("blog", {"config_problems": broken.value.problems}),
    ]
