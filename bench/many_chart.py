"""Draws bench/results/many.png from bench/results/many.json (bench/many.py): the memory each
tool takes for 1, 5 and 10 apps, side by side after 60 s idle, median of the runs with a min-max
whisker. Needs matplotlib (bench/run.py's bench/.venv-tools has it).

    python bench/many_chart.py bench/results/many.json bench/results/many.png
"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SYSTEMS = {"ours-one": "ours, one process", "ours-each": "ours, a process per app",
           "supervisord": "supervisord 4.3.0", "pm2": "pm2", "seed": "the seed's bash loops"}
COLOURS = {"ours-one": "#2b7bba", "ours-each": "#9cc3e4", "supervisord": "#6a9f58",
           "pm2": "#b04a4a", "seed": "#e08a2b"}
BOX_MB = 128


def main() -> None:
    with open(sys.argv[1]) as file:
        results = json.load(file)
    runs = [run for run in results["raw"]["memory"] if not run["alone"]]
    counts = results["settings"]["counts"]
    figure, axis = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(SYSTEMS)
    for offset, (key, label) in enumerate(SYSTEMS.items()):
        medians, lows, highs = [], [], []
        for count in counts:
            values = [run["idle"][key]["pss"] / 1024 for run in runs
                      if run["apps"] == count and key in run["idle"]]
            median = statistics.median(values) if values else 0.0
            medians.append(median)
            lows.append(median - min(values, default=0.0))
            highs.append(max(values, default=0.0) - median)
        places = [i + (offset - (len(SYSTEMS) - 1) / 2) * width for i in range(len(counts))]
        axis.bar(places, medians, width, label=label, color=COLOURS[key],
                 yerr=[lows, highs], capsize=2)
        for place, median in zip(places, medians, strict=True):
            axis.annotate(f"{median:.1f}", (place, median), ha="center", va="bottom",
                          fontsize=7, xytext=(0, 2), textcoords="offset points")
    axis.axhline(BOX_MB, color="grey", linestyle=":", linewidth=1)
    axis.annotate(f"a {BOX_MB} MB box", (len(counts) - 0.6, BOX_MB), fontsize=8,
                  va="bottom", color="grey")
    axis.set_xticks(range(len(counts)), [f"{n} app{'s' * (n != 1)}" for n in counts])
    axis.set_ylabel("PSS, MiB (the tool's own processes)")
    axis.set_title("Many apps on one box: memory after 60 s idle, side by side "
                   f"(median of {results['settings']['reps']})", fontsize=10)
    axis.legend(fontsize=8, loc="upper left")
    figure.text(0.01, 0.01, f"{results['command']}; {results['versions']}", fontsize=6,
                color="grey")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
