"""Draws bench/results/chart.png from results.json: one panel per figure, a bar per system
(median, with a min-max whisker; the seed at real settings: mean, whisker to the worst case).
Run by bench/run.py with the matplotlib of bench/.venv-tools.

    python chart.py RESULTS_JSON OUTPUT_PNG
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

NAMES = {"ours": "ours", "seed": "seed loop\n(short sleeps)",
         "seed_real": "seed loop\n(300 s/30 s)", "supervisord": "supervisord"}
COLOURS = {"ours": "#2b7bba", "seed": "#e08a2b", "seed_real": "#f3c38c",
           "supervisord": "#6a9f58"}
LOG_SCALE = {"crash", "drain", "drain_read", "storm_delay"}
AT_REAL_SETTINGS = {"pss", "rss", "private", "idle_cpu"}  # the seed ran with 300 s / 30 s


def main() -> None:
    with open(sys.argv[1]) as file:
        results = json.load(file)
    rows = [row for row in results["figures"] if row["key"] != "private"]
    columns = 3
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.6 * lines))
    for axis in axes.flat[len(rows):]:
        axis.axis("off")
    for axis, row in zip(axes.flat, rows, strict=False):
        names = [name for name, value in row["cells"].items()
                 if value is not None and "same" not in value]
        scale = row["scale"]
        medians = [row["cells"][name]["median"] * scale for name in names]
        low = [m - row["cells"][name]["min"] * scale for name, m in zip(names, medians,
                                                                        strict=True)]
        high = [row["cells"][name]["max"] * scale - m for name, m in zip(names, medians,
                                                                         strict=True)]
        positions = range(len(names))
        bars = axis.bar(positions, medians, color=[COLOURS[name] for name in names],
                        yerr=[[max(0, v) for v in low], [max(0, v) for v in high]], capsize=4)
        for bar, value in zip(bars, medians, strict=True):
            axis.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                          textcoords="offset points")
        labels = [NAMES[name] for name in names]
        if row["key"] in AT_REAL_SETTINGS:
            labels = [label.split("\n")[0] for label in labels]
        axis.set_xticks(list(positions), labels, fontsize=8)
        if row["key"] in LOG_SCALE and min(medians) > 0:
            axis.set_yscale("log")
            axis.yaxis.set_major_locator(LogLocator(base=10))
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_title(row["label"], fontsize=9)
        axis.set_ylabel(row["unit"])
        axis.margins(y=0.15)
    facts = results["machine"]
    figure.suptitle(f"supervisor benchmarks: {facts['cpu']}, {facts['cores']} cores, kernel "
                    f"{facts['kernel']}, {facts['python_ours']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
