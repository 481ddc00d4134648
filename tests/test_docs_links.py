"""The README and docs/ link to each other by path and heading: every relative link must reach a
file that exists and, with a #fragment, a heading of that file (GitHub's anchor rules). The README
links every page in docs/, and stays short enough to read in five minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"^#{1,6} (.+)$", line):
            base = slug(match.group(1))
            count = counts.get(base, 0)
            counts[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", path.read_text()))
            if not re.match(r"^[a-z]+:", target)]


def broken(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        file, _, fragment = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            bad.append(f"{path.name}: {target} (no such file)")
        elif fragment and where.suffix == ".md" and fragment not in anchors(where):
            bad.append(f"{path.name}: {target} (no such heading)")
    return bad


def test_every_link_reaches_a_file_and_a_heading() -> None:
    problems = [problem for page in PAGES for problem in broken(page)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](#title) [b](#nowhere) [c](missing.md)\n```\n[d](x.md)\n```\n")
    assert broken(page) == ["page.md: #nowhere (no such heading)",
                            "page.md: missing.md (no such file)"]
    assert slug("`[[socket]]`: listening sockets") == "socket-listening-sockets"


def test_the_readme_links_every_page_and_stays_short() -> None:
    readme = ROOT / "README.md"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(readme)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"pages the README does not link: {unlinked}"
    assert len(readme.read_text().splitlines()) <= 200
