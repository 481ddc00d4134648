"""`supervisor fleet status`: every box of every group, as etcd has them: phase, live commit,
health, what a deploy waits for, who holds the slots, which commits are proven or held. It
reads etcd (the main file's [fleet]) and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

from supervisor.core.fleet import VERSION, GroupView, Keys
from supervisor.core.hostconfig import HostConfig

EXIT_UNREACHABLE = 1


def fleet_status(host: HostConfig, as_json: bool) -> int:
    if host.fleet is None:
        print(f"supervisor: no [fleet] in {host.path}: this box is in no fleet group",
              file=sys.stderr)
        return 2
    try:
        groups = asyncio.run(_read(host))
    except Exception as error:  # EtcdError, and nothing else is expected: one line anyway
        reason = getattr(error, "reason", None) or str(error)
        print(f"supervisor: cannot read the fleet from etcd: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    policies = {app.fleet.group: app.fleet for app in host.apps if app.fleet is not None}
    if as_json:
        print(json.dumps({"box": host.fleet.box, "groups": {
            name: _as_json(view, policies.get(name)) for name, view in groups.items()}},
            indent=2, sort_keys=True))
        return 0
    if not groups:
        print(f"no fleet group in etcd under {host.fleet.prefix} yet")
    for name, view in groups.items():
        print("\n".join(_lines(name, view, policies.get(name), host.fleet.box)))
    return 0


async def _read(host: HostConfig) -> dict[str, GroupView]:
    from supervisor.drivers.etcd import EtcdClient

    assert host.fleet is not None
    fleet = host.fleet
    client = EtcdClient(fleet.endpoints, ca=fleet.ca, cert=fleet.cert, key=fleet.key,
                        user=fleet.user, password=fleet.password, timeout=3.0)
    root = f"{fleet.prefix}/v{VERSION}/groups/"
    try:
        _, kvs = await client.get_prefix(root)
    finally:
        await client.close()
    groups: dict[str, GroupView] = {}
    for kv in kvs:
        group = kv.key[len(root):].split("/", 1)[0]
        if not group:
            continue
        view = groups.setdefault(group, GroupView.empty())
        view.apply(Keys(fleet.prefix, group), kv.key, kv.value)
    return dict(sorted(groups.items()))


def _as_json(view: GroupView, policy: Any) -> dict[str, Any]:
    return {"boxes": {name: asdict(record) for name, record in sorted(view.boxes.items())},
            "slots": {str(i): asdict(r) for i, r in sorted(view.slots.items())},
            "proven": {c: asdict(v) for c, v in view.proven.items()},
            "held": {c: asdict(v) for c, v in view.held.items()},
            "unreadable": list(view.rejected),
            "policy": None if policy is None else {"max_parallel": policy.max_parallel,
                                                   "canary": policy.canary}}


def _shown(text: str) -> str:
    """What etcd holds is shown, never obeyed: no control character reaches the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _lines(name: str, view: GroupView, policy: Any, me: str) -> list[str]:
    rule = "" if policy is None else (f" (here: max_parallel {policy.max_parallel}, "
                                      f"canary {policy.canary})")
    lines = [f"group {name}{rule}"]
    holding = {record.box: index for index, record in view.slots.items()}
    for box, record in sorted(view.boxes.items()):
        slot = f"slot {holding[box]}" if box in holding else "-"
        health = "healthy" if record.healthy else "not healthy"
        commit = record.commit[:12] if record.commit else "-"
        mark = "*" if box == me else " "
        line = f" {mark}{box:<16} {record.phase:<14} {commit:<12}  {health:<11} {slot}"
        if record.waiting:
            line += f"  waiting for {record.waiting}"
        lines.append(line.rstrip())
    for index, record in sorted(view.slots.items()):
        if record.box not in view.boxes:
            lines.append(f"  slot {index}: {record.box} (not registered) for "
                         f"{record.commit[:12]}")
    for commit, verdict in view.held.items():
        lines.append(f"  held: {commit[:12]} by {verdict.box}: {verdict.reason}")
    proven = sorted(view.proven, key=lambda c: view.proven[c].at)  # the newest last
    if proven:
        lines.append("  proven (newest last): " + ", ".join(
            f"{c[:12]} ({view.proven[c].box})" for c in proven[-5:]))
    for key in view.rejected:
        lines.append(f"  unreadable record: {key}")
    return [_shown(line) for line in lines]
