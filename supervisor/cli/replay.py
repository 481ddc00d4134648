"""Replay a JSON event log through the pure machine: the same events must lead through the same
phases. Used by the tests, and by people turning an incident's log into a unit test:

    python -m supervisor.cli.replay -c supervisor.toml < events.log
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from supervisor.core.events import SettingsChanged, event_from_record
from supervisor.core.machine import Settings, State, decide, initial_state


def replay(records: Iterable[dict[str, object]], settings: Settings) -> Iterator[str]:
    """Yield one message per transition line whose phases the machine does not reproduce.

    The machine starts afresh at each `supervisor.started` line, with the `built` commit it
    reports (when a build step is configured)."""
    state: State | None = None
    for number, record in enumerate(records, 1):
        if record.get("event") == "supervisor.started":
            built = record.get("built") if settings.has_build else None
            failed = record.get("failed")
            state = initial_state(settings, built=built if isinstance(built, str) else None,
                                  failed=failed if isinstance(failed, str) else None)
            continue
        event = event_from_record(record)
        if event is None or state is None:
            continue
        if isinstance(event, SettingsChanged):
            # The log names the reloaded keys but not their values: replay keeps the settings
            # it has, so what follows may differ where a reloaded key matters.
            yield f"line {number}: config reloaded ({', '.join(event.applied) or 'nothing'}); " \
                  "replay goes on with the settings it has"
            state, _actions = decide(state, replace(event, settings=state.settings))
            continue
        if str(state.phase) != record["before"]:
            yield f"line {number}: {event.name} found the machine {state.phase}, " \
                  f"the log says {record['before']}"
        state, _actions = decide(state, event)
        if str(state.phase) != record["after"]:
            yield (f"line {number}: {event.name} led to {state.phase}, "
                   f"the log says {record['after']}")


def main(argv: list[str] | None = None) -> int:
    from supervisor.core.config import ConfigError, load_config
    from supervisor.core.settings import settings_from

    parser = argparse.ArgumentParser(prog="python -m supervisor.cli.replay", description=__doc__)
    parser.add_argument("-c", "--config", type=Path, default=Path("supervisor.toml"))
    args = parser.parse_args(argv)
    try:
        settings = settings_from(load_config(args.config))
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    records = []
    for line in sys.stdin:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # an app's line, or one torn by a full disk: not ours to replay
    mismatches = list(replay(records, settings))
    print("\n".join(mismatches) or "the machine reproduces every transition")
    return 1 if any("config reloaded" not in m for m in mismatches) else 0


if __name__ == "__main__":
    raise SystemExit(main())
