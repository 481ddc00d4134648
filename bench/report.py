"""Turns the raw measurements of bench/run.py into figures (median, min, max; ratios against
ours; the seed's loop at its real 300 s / 30 s sleeps), the markdown table, and the chart."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

DASH, TIMES = "\u2013", "\u00d7"  # the table's range dash and ratio sign
SYSTEMS = ("ours", "seed", "seed_real", "supervisord")
HEADERS = {"ours": "ours",
           "seed": "seed loop, measured (sleeps {long:g} s / {short:g} s; "
                   "rows 1-2 at 300 s / 30 s)",
           "seed_real": "seed loop at its real 300 s / 30 s (computed)",
           "supervisord": "supervisord 4.3.0"}


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def real(overheads: list[float], residual: str | None, whole: list[list[str]],
         settings: dict[str, float]) -> dict[str, float] | None:
    """The seed at its real sleeps: its own work (median overhead) plus the sleeps. A sleep under
    way when the trigger came is left half on average and whole at worst; others count whole."""
    if not overheads:
        return None
    wait = {"long": settings["long"], "short": settings["short"]}
    whole_sleep = statistics.median([sum(wait[kind] for kind in kinds) for kinds in whole] or [0])
    part = wait[residual] if residual else 0.0
    mean = statistics.median(overheads) + part / 2 + whole_sleep
    return {"median": mean, "min": min(overheads) + whole_sleep,
            "max": max(overheads) + part + whole_sleep, "n": len(overheads), "real": True}


def figures(results: dict) -> list[dict]:
    raw, settings = results["raw"], results["real_settings"]
    rows: list[dict] = []

    def row(key: str, label: str, unit: str, scale: float, cells: dict, note: str = "") -> None:
        rows.append({"key": key, "label": label, "unit": unit, "scale": scale,
                     "cells": {name: cells.get(name) for name in SYSTEMS}, "note": note})

    idle = raw.get("idle", [])
    for measure, label in (("pss", "1. memory: PSS"), ("rss", "1. memory: RSS"),
                           ("private", "1. memory: private")):
        cells = {name: summary([run[name][measure] / 1024 for run in idle])
                 for name in ("ours", "seed", "supervisord")}
        cells["seed_real"] = {"same": "as measured"}
        row(measure, label, "MB", 1, cells, "after 60 s idle with one child, the three at once")

    # 2. Idle CPU per hour at the real 5-minute poll: the idle rate between polls, plus twelve
    # poll cycles an hour for the two that poll git (supervisord does not).
    cycles = {"ours": raw.get("ours", {}).get("cycle", []), "seed": raw.get("seed_cycle", [])}
    cells = {}
    for name in ("ours", "seed", "supervisord"):
        rates = [run[name]["cpu"] / run["seconds"] * 3600 for run in idle]
        if not rates:
            continue
        per_cycle = cycles.get(name) or [0.0]
        polls = 3600 / settings["long"]
        cells[name] = {"median": statistics.median(rates) + polls * statistics.median(per_cycle),
                       "min": min(rates) + polls * min(per_cycle),
                       "max": max(rates) + polls * max(per_cycle), "n": len(rates)}
    cells["seed_real"] = {"same": "as measured"}
    row("idle_cpu", "2. CPU while idle, per hour", "s", 1, cells,
        "idle rate x 3600 + 12 poll cycles")

    ours, seed = raw.get("ours", {}), raw.get("seed", {})
    sd = raw.get("supervisord", {})

    def seed_real(entries: list[dict]) -> dict | None:
        if not entries:
            return None
        residuals = [entry["residual"] for entry in entries if entry["residual"]]
        residual = max(set(residuals), key=residuals.count) if residuals else None
        return real([entry["overhead"] for entry in entries], residual,
                    [entry["whole"] for entry in entries], settings)

    row("crash", "3. crash to serving again", "s", 1,
        {"ours": summary([entry["seconds"] for entry in ours.get("crash", [])]),
         "seed": summary([entry["seconds"] for entry in seed.get("crash", [])]),
         "seed_real": seed_real(seed.get("crash", [])),
         "supervisord": summary([entry["seconds"] for entry in sd.get("crash", [])])})

    row("drain", '4. stats change to decision: "0" written until the restart begins', "ms", 1000,
        {"ours": summary([entry["restart"] for entry in ours.get("drain", [])]),
         "seed": summary([entry["seconds"] for entry in seed.get("drain", [])]),
         "seed_real": seed_real(seed.get("drain", []))})
    read_entries = [{**entry, "overhead": entry["read"] - (entry["seconds"] - entry["overhead"])}
                    for entry in seed.get("drain", [])]
    row("drain_read", '4b. stats change to decision: "0" written until it is read', "ms", 1000,
        {"ours": summary([entry["read"] for entry in ours.get("drain", [])]),
         "seed": summary([entry["read"] for entry in seed.get("drain", [])]),
         "seed_real": seed_real(read_entries)})

    row("deploy", "5. deploy overhead", "ms", 1000,
        {"ours": summary([entry["seconds"] - entry["build"] - entry["startup"]
                          for entry in ours.get("deploy", [])]),
         "seed": summary([entry["seconds"] - entry["build"] - entry["startup"]
                          for entry in seed.get("deploy", [])]),
         "seed_real": real([entry["overhead"] - entry["build"] - entry["startup"]
                            for entry in seed.get("deploy", [])], None,
                           [entry["whole"] for entry in seed.get("deploy", [])], settings)})

    storm_seconds = [entry["storm_seconds"]
                     for entry in ours.get("storm", []) + seed.get("storm", [])]
    span = statistics.median(storm_seconds) if storm_seconds else 10.0
    row("storm_cpu", f"6. stats-write storm: CPU used in its {span:.0f} s", "s", 1,
        {"ours": summary([entry["cpu"] for entry in ours.get("storm", [])]),
         "seed": summary([entry["cpu"] for entry in seed.get("storm", [])]),
         "seed_real": {"same": "less: it reads once per 30 s"}})
    row("storm_delay", '6. stats-write storm: final "0" until the restart begins', "ms", 1000,
        {"ours": summary([entry["restart"] for entry in ours.get("storm", [])]),
         "seed": summary([entry["seconds"] for entry in seed.get("storm", [])]),
         "seed_real": seed_real(seed.get("storm", []))})
    return rows


def number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(row: dict, name: str) -> str:
    value = row["cells"].get(name)
    if value is None:
        return "n/a"
    if "same" in value:
        return value["same"]
    scale = row["scale"]
    if value.get("real"):
        text = f"mean {number(value['median'] * scale)}, worst {number(value['max'] * scale)}"
    else:
        text = (f"{number(value['median'] * scale)} "
                f"({number(value['min'] * scale)}{DASH}{number(value['max'] * scale)})")
    ours = row["cells"].get("ours")
    if name != "ours" and ours and ours["median"] > 0:
        text += f" **{TIMES}{number(value['median'] / ours['median'])}**"
    return text


def markdown(results: dict, rows: list[dict]) -> str:
    settings = results["raw"].get("seed_settings") or {"long": 2, "short": 1}
    headers = [HEADERS[name].format(**settings) for name in SYSTEMS]
    lines = ["| figure | unit | " + " | ".join(headers) + " |",
             "|---|---|" + "---|" * len(SYSTEMS)]
    for row in rows:
        lines.append(f"| {row['label']} | {row['unit']} | "
                     + " | ".join(cell(row, name) for name in SYSTEMS) + " |")
    return "\n".join(lines)


def budget_line(results: dict, rows: list[dict]) -> str:
    by_key = {row["key"]: row for row in rows}
    pss, rss = by_key["pss"]["cells"]["ours"], by_key["rss"]["cells"]["ours"]
    if not pss or not rss:
        return "memory budget: not measured"
    budget = results["budget_kb"]
    ok = pss["median"] * 1024 <= budget["pss"] and rss["median"] * 1024 <= budget["rss"]
    line = (f"Memory budget (issue 6, Debian's python3), ours after 60 s idle: PSS "
            f"{pss['median']:.1f} MB of {budget['pss'] / 1024:.0f}, RSS {rss['median']:.1f} MB "
            f"of {budget['rss'] / 1024:.0f}: **{'PASS' if ok else 'FAIL'}**.")
    after = results["raw"].get("ours", {}).get("memory_after_first_deploy")
    if after:
        ok = after["rss"] <= budget["rss"]
        line += (f" After its first deploy with a drain: RSS {after['rss'] / 1024:.1f} MB of "
                 f"{budget['rss'] / 1024:.0f}: **{'PASS' if ok else 'FAIL'}**.")
    return line


def details(results: dict) -> list[str]:
    raw = results["raw"]
    out = []
    med = statistics.median
    if raw.get("load"):
        loads = [value for phase in raw["load"] for value in (phase["before"], phase["after"])]
        out.append(f"- Load average (1 min) at the start and end of the phases: "
                   f"{min(loads):.2f} to {max(loads):.2f} on {results['machine']['cores']} "
                   "cores. The suite itself keeps at most about one core busy (the storm); "
                   "anything above that is other work on the machine, and noise in the "
                   "timings.")
    if raw.get("app_startup"):
        out.append(f"- The app's own start-up (spawn until it answers HTTP), run alone: "
                   f"{med(raw['app_startup']) * 1000:.0f} ms; the build "
                   f"(`make clean && make install`, a py_compile) timed alone: "
                   f"{med(raw['make_build']) * 1000:.0f} ms. Figure 5 subtracts a start-up "
                   "and (for the seed) a build measured right before each deploy.")
    ours = raw.get("ours", {})
    if ours.get("cycle"):
        out.append(f"- One poll cycle (a fetch that finds nothing), CPU with children: ours "
                   f"{med(ours['cycle']) * 1000:.0f} ms, the seed's loop "
                   f"{med(raw.get('seed_cycle') or [0]) * 1000:.0f} ms (fetch, two rev-parse, "
                   "ps | grep | grep, date, sleep).")
    if raw.get("idle"):
        idle = raw["idle"]
        out.append("- Idle " + ", ".join(
            f"{name} {med([run[name]['cpu'] for run in idle]) * 1000:.0f} ms CPU"
            for name in ("ours", "seed", "supervisord"))
            + f" in {med([run['seconds'] for run in idle]):.0f} s (no poll falls in it: both "
            "pollers sleep 5 minutes); threads: ours "
            + f"{idle[0]['ours']['threads']}, supervisord {idle[0]['supervisord']['threads']}. "
            f"Other processes running Debian's python3 on the machine meanwhile (sharing its "
            f"pages, so lowering PSS): {max(run.get('other_debian_pythons', 0) for run in idle)}. "
            f"The seed's wrapper `bash server.sh` adds "
            f"{med([run['seed']['wrapper_pss'] for run in idle]) / 1024:.1f} MB PSS beside its "
            "loop.")
    if ours.get("deploy"):
        steps = ours["deploy"][0]["steps"].keys()
        out.append("- Ours, a deploy step by step (median ms after `git.fetched`): " + ", ".join(
            f"{name} {med([entry['steps'][name] for entry in ours['deploy']]) * 1000:.0f}"
            for name in sorted(steps, key=lambda n: med(
                [entry["steps"][n] for entry in ours["deploy"]]))) + "; build duration "
            f"{med([entry['build'] for entry in ours['deploy']]) * 1000:.0f} ms.")
    if ours.get("crash"):
        out.append(f"- Ours, crash: the exit is logged "
                   f"{med([e['exit_seen'] for e in ours['crash']]) * 1000:.1f} ms after the kill "
                   f"and the new child started at "
                   f"{med([e['child_started'] for e in ours['crash']]) * 1000:.1f} ms; the rest "
                   "is the app's own start-up.")
    if ours.get("storm"):
        storm = ours["storm"]
        out.append(f"- Storm: {med([s['writes'] for s in storm]):.0f} writes in "
                   f"{med([s['storm_seconds'] for s in storm]):.1f} s; ours logged "
                   f"{med([s['stats_read_lines'] for s in storm]):.0f} `stats.read` lines and "
                   f"read the final value after "
                   f"{med([s['read'] for s in storm]) * 1000:.0f} ms. Its CPU by thread: "
                   + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in sorted(
                       storm[0]["threads"].items(), key=lambda item: -item[1]))
                   + " (first storm).")
    if ours.get("memory_after_first_deploy"):
        before, first = ours["memory_before_deploys"], ours["memory_after_first_deploy"]
        last = ours["memory_after_deploys"]
        out.append(f"- Ours in the deploy phase (alone, so compare RSS and private, not PSS): "
                   f"RSS {before['rss'] / 1024:.1f} MB before any deploy, "
                   f"{first['rss'] / 1024:.1f} MB after the first (its drain is watched "
                   f"by the kernel's notification: no thread, no library), "
                   f"{last['rss'] / 1024:.1f} MB after all "
                   f"{len(ours['deploy']) + len(ours['drain']) + len(ours['storm'])}; private "
                   f"{before['private'] / 1024:.1f}, {first['private'] / 1024:.1f}, "
                   f"{last['private'] / 1024:.1f} MB; {last['threads']} thread(s) at the end.")
    seed = raw.get("seed", {})
    if seed.get("deploy"):
        failed = sum(1 for entry in seed["deploy"] if entry.get("bind_failed"))
        out.append(f"- The seed's loop kills the old server and starts the new one at once: in "
                   f"{failed} of {len(seed['deploy'])} deploys the new one found the port still "
                   "taken.")
    return out


def write_report(results: dict, directory: Path, tools_python: Path) -> str:
    rows = figures(results)
    results["figures"] = rows
    table = markdown(results, rows)
    budget = budget_line(results, rows)
    facts = results["machine"]
    settings = results["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"`python3 bench/run.py`, {results['seconds']:.0f} s in all. Median (min{DASH}max) over "
        f"repeated runs; **{TIMES}N** is the ratio to ours. Repetitions: idle "
        f"{settings['idle_reps']} x {settings['idle']:.0f} s; crash {settings['crash_reps']} (seed "
        f"{settings['seed_crash_reps']}); deploy and drain {settings['reps']} (seed "
        f"{settings['seed_reps']}); storm {settings['storm_reps']}.",
        "",
        table,
        "",
        budget,
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory']}, {facts['os']}, "
        f"kernel {facts['kernel']}. Ours: {facts['ours']}, run by {facts['python_ours']}; "
        f"{facts['supervisord']} run by the same python; {facts['bash']}; {facts['git']}; "
        f"harness {facts['python_harness']}.",
        "",
        "![benchmark chart](chart.png)",
        "",
        "What each figure measures, and how: [bench/README.md](../README.md#the-figures).",
        "",
        "Notes:",
        *details(results),
    ]
    if results["failures"]:
        lines += ["", "Failed phases:", *[f"- {failure}" for failure in results["failures"]]]
    text = "\n".join(lines) + "\n"
    (directory / "results.md").write_text(text)
    (directory / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    chart = subprocess.run([str(tools_python), str(Path(__file__).with_name("chart.py")),
                            str(directory / "results.json"), str(directory / "chart.png")],
                           capture_output=True, text=True, timeout=120)
    if chart.returncode != 0:
        print(f"chart failed: {chart.stderr}")
    return f"{table}\n\n{budget}"
