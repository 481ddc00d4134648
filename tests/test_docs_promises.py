"""The promises the pages make about the tiny box (issue 12), pinned to the code that keeps them:
a figure quoted in a page is the constant the code uses, and every event a page names is one
docs/events.md documents. A change on one side only fails here.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from supervisor.core import config
from supervisor.drivers import build, child, gitrepo, statsfile

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name != "events.md")]
EVENT_PREFIXES = ("supervisor", "git", "build", "child", "deploy", "drain", "stats", "health",
                  "release", "restart", "control", "config", "trigger", "driver", "startup")
NAMED = re.compile(rf"`((?:{'|'.join(EVENT_PREFIXES)})\.[a-z_]+)`")
# What reads like an event name and is not: a config key (`build.min_free`), a file (`child.py`).
SECTIONS = {"app": config.AppConfig, "git": config.GitConfig, "build": config.BuildConfig,
            "drain": config.DrainConfig, "restart": config.RestartConfig,
            "log": config.LogConfig, "trigger": config.TriggerConfig,
            "deploy": config.DeployConfig, "health": config.HealthConfig}
NOT_EVENTS = {f"{section}.{item.name}" for section, kind in SECTIONS.items()
              for item in fields(kind)} | {"trigger.secret_file"}
FILE = re.compile(r"\.(py|toml|md|json|log|sock|lock|service|socket)$")


def text(name: str) -> str:
    return " ".join((DOCS / name).read_text().split())


def test_every_event_a_page_names_is_documented() -> None:
    documented = set(re.findall(r"^#### `([a-z_]+\.[a-z_]+)`", (DOCS / "events.md").read_text(),
                                re.M))
    named = {(page.name, name) for page in PAGES for name in NAMED.findall(page.read_text())
             if name not in NOT_EVENTS and not FILE.search(name)}
    assert {(page, name) for page, name in named if name not in documented} == set()
    assert len(named) > 50  # the pattern still finds what the pages name


def test_the_oom_scores_quoted_are_the_codes() -> None:
    assert build.BUILD_OOM_SCORE_ADJ == 1000 and child.SUPERVISOR_OOM_SCORE_ADJ == -900
    for page in ("troubleshooting.md", "architecture.md"):
        assert f"`oom_score_adj` {build.BUILD_OOM_SCORE_ADJ}" in text(page) or \
            f"builds run at {build.BUILD_OOM_SCORE_ADJ}" in text(page)
    assert f"tries {child.SUPERVISOR_OOM_SCORE_ADJ} for itself" in text("architecture.md")
    assert f'reason `{build.OUT_OF_MEMORY}`' in text("troubleshooting.md")


def test_hooks_are_off_as_the_page_says() -> None:
    assert "-c core.hooksPath=/dev/null" in text("configuration.md")
    assert " ".join(gitrepo.NO_HOOKS) == "-c core.hooksPath=/dev/null"


def test_the_stats_file_is_never_read_from_kernel_directories() -> None:
    assert statsfile.SYSTEM_DIRECTORIES == ("/proc", "/sys", "/dev")
    assert "Nothing under `/proc`, `/sys` or `/dev` is ever read" in text("configuration.md")


def test_releases_are_git_checkouts_in_every_page() -> None:
    for page in ("release-mode.md", "events.md"):
        assert "`git worktree`" in text(page)
    for page in [*PAGES, DOCS / "events.md"]:
        flat = " ".join(page.read_text().split())
        assert "without a `.git`" not in flat and "must do without" not in flat, page.name
