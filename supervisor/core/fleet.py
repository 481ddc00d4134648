"""What the boxes of a fleet group agree on without a leader: where each record lives in etcd,
what a valid record is (anything else from etcd is ignored, never trusted), which boxes are a
commit's canaries, and whether this box may deploy a commit. Pure: the agent (drivers/fleet.py)
reads etcd and turns these answers into events for each app's machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

VERSION = 1  # of the records below; a record of another version is ignored (and reported)
_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # sha-1 or sha-256 object names
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
MAX_RECORD = 4096  # bytes: our records are a few hundred


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key of one group: prefix/v1/groups/GROUP/{boxes,slots,proven,held}/..."""

    prefix: str
    group: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/v{VERSION}/groups/{self.group}/"

    def box(self, box: str) -> str:
        return f"{self.root}boxes/{box}"

    def slot(self, index: int) -> str:
        return f"{self.root}slots/{index}"

    def proven(self, commit: str) -> str:
        return f"{self.root}proven/{commit}"

    def held(self, commit: str) -> str:
        return f"{self.root}held/{commit}"


@dataclass(frozen=True, slots=True)
class BoxRecord:
    """A box's word about its app, under its lease: gone when the box is."""

    box: str
    app: str
    phase: str
    commit: str | None
    healthy: bool
    waiting: str | None = None  # what its deploy waits for, in words
    rollout: str | None = None


@dataclass(frozen=True, slots=True)
class SlotRecord:
    box: str
    commit: str
    token: str = ""  # unique to one attempt: a box knows its own slot after a lost reply


@dataclass(frozen=True, slots=True)
class Verdict:
    """A box's word about a commit: proven healthy, or failed (held for the group)."""

    box: str
    reason: str = ""
    at: float = 0.0  # seconds since the epoch, by that box's clock (for ordering only)


@dataclass
class GroupView:
    """What this box knows of its group, rebuilt from a read of the group's keys and kept up
    to date by the watch. Records that do not parse are counted in `rejected`, never used."""

    boxes: dict[str, BoxRecord]
    slots: dict[int, SlotRecord]
    proven: dict[str, Verdict]
    held: dict[str, Verdict]
    rejected: list[str]

    @classmethod
    def empty(cls) -> GroupView:
        return cls({}, {}, {}, {}, [])

    def apply(self, keys: Keys, key: str, value: bytes | None) -> None:
        """One key's new value (None: deleted)."""
        if not key.startswith(keys.root):
            return
        kind, _, name = key[len(keys.root):].partition("/")
        table: dict = {"boxes": self.boxes, "slots": self.slots, "proven": self.proven,
                       "held": self.held}.get(kind, {})
        if kind == "slots":
            if not (name.isascii() and name.isdigit()) or len(name) > 4:
                self.rejected.append(key)
                return
            name = int(name)  # type: ignore[assignment]
        if value is None:
            table.pop(name, None)
            return
        record = parse_record(kind, name, value)
        if record is None:
            self.rejected.append(key)
            table.pop(name, None)
            return
        table[name] = record


def record_bytes(fields: dict[str, object]) -> bytes:
    return json.dumps({"v": VERSION, **fields}, separators=(",", ":"),
                      sort_keys=True).encode()


def parse_record(kind: str, name: object, value: bytes) -> object | None:
    """A record of ours, or None for anything else (another version, bad JSON, wrong types)."""
    if len(value) > MAX_RECORD:
        return None
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        return None
    box = data.get("box")
    if not isinstance(box, str) or not _NAME.match(box):
        return None
    if kind == "boxes":
        return _box_record(name, data)
    if kind == "slots":
        return _slot_record(box, data)
    if kind in ("proven", "held"):
        return _verdict(box, name, data)
    return None


def _slot_record(box: str, data: dict) -> SlotRecord | None:
    commit, token = data.get("commit"), data.get("token", "")
    if not is_commit(commit) or not isinstance(token, str):
        return None
    return SlotRecord(box, commit, token[:64])


def _verdict(box: str, commit: object, data: dict) -> Verdict | None:
    reason, at = data.get("reason", ""), data.get("at", 0.0)
    if not is_commit(commit) or not isinstance(reason, str):
        return None
    if isinstance(at, bool) or not isinstance(at, int | float):
        at = 0.0
    return Verdict(box, reason[:500], float(at))


def _box_record(name: object, data: dict) -> BoxRecord | None:
    box, app, phase, commit = (data.get(k) for k in ("box", "app", "phase", "commit"))
    healthy, waiting, rollout = data.get("healthy"), data.get("waiting"), data.get("rollout")
    if name != box or not isinstance(app, str) or not isinstance(phase, str):
        return None
    if not (commit is None or is_commit(commit)) or not isinstance(healthy, bool):
        return None
    if not (waiting is None or isinstance(waiting, str)):
        return None
    if not (rollout is None or isinstance(rollout, str)):
        return None
    return BoxRecord(box, app[:255], phase[:40], commit, healthy,
                     waiting[:300] if waiting else None, rollout[:80] if rollout else None)


def is_commit(value: object) -> bool:
    return isinstance(value, str) and bool(_COMMIT.match(value))


def canaries(boxes: list[str] | set[str], count: int) -> list[str]:
    """The boxes that take a new commit first: the first `count` names in sorted order, so
    every box computes the same answer from the same registrations, with no leader, and an
    operator knows in advance which box that is. A canary that is down is skipped: the next
    name takes its place."""
    return sorted(boxes)[:count]


@dataclass(frozen=True, slots=True)
class Go:
    """Whether this box may deploy a commit now: `held` (by `by`), `cleared` (`why`), or wait
    (`waiting` says for what)."""

    cleared: bool = False
    why: str = ""
    held: bool = False
    by: str = ""
    reason: str = ""
    waiting: str = ""


def go_for(view: GroupView, me: str, commit: str, canary: int) -> Go:
    """A held commit is never deployed; a proven one is; else only the canaries go first."""
    if commit in view.held:
        verdict = view.held[commit]
        return Go(held=True, by=verdict.box, reason=verdict.reason)
    if commit in view.proven:
        return Go(cleared=True, why="proven")
    first = canaries(set(view.boxes) | {me}, canary)
    if canary == 0 or me in first:
        return Go(cleared=True, why="canary")
    return Go(waiting=f"the canary ({', '.join(first)}) to prove {commit[:12]} healthy")


def rollout_id(group: str, commit: str) -> str:
    """The same on every box for one commit of one group: the log lines of a rollout are found
    across boxes by it."""
    return f"{group}@{commit[:12]}"
