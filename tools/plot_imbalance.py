#!/usr/bin/env python
"""
AP against the foreground/background imbalance: the ``imbalance`` preset of
``tools/ablate.py``, one line per loss.

    python tools/plot_imbalance.py output/ablation/imbalance --output docs/imbalance_sweep.png
    python tools/plot_imbalance.py out/cpu out/gpu --output sweep.png   # runs made apart

Reads the preset's output folder: ``runs.csv`` (AP of every run, with its
canvas and setting) and ``imbalance.json`` (per canvas, the negatives per
positive anchor measured by ``tools/imbalance.py`` from the model's own
``label_anchors`` on the train split). Several folders (canvases, rows or
seeds run in separate calls or on other machines) are read as one: a run
(setting, canvas, seed) in two of them, or a canvas measured differently,
is an error naming both. The x axis is that ratio (log scale),
with the canvas sides on the top axis; each line joins a setting's mean AP
over seeds, the bar spans the lowest to the highest seed and the small
markers are the seeds themselves. A setting run at one canvas only (OHEM)
is a single point. A run whose evaluation received no detection (every
score below ``MODEL.RETINANET.SCORE_THRESH_TEST``: Detectron2 reports no AP,
``runs.csv`` has ``detections`` 0) counts as AP 0, drawn as an x.

The paper's COCO operating point is not marked: the paper gives about 100k
anchors per image and calls the imbalance "e.g. 1:1000" by way of example,
but no count of positive anchors per image, so its negatives per positive
cannot be derived from its own numbers (Figure 4's 10^7 negatives and 10^5
positives are a sample drawn for the plot, not a ratio per image).
"""

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from plotting import add_figure_arguments, save_figure  # noqa: E402  (tools/, beside this script)

RUNS_FILE = "runs.csv"
IMBALANCE_FILE = "imbalance.json"


def _labels() -> Dict[str, str]:
    """Row name -> label of tools/ablate.py's rows (ablate is imported only here)."""
    from ablate import ROWS

    return {row.name: row.label for row in ROWS}


def read_imbalance(folder: str) -> Dict[int, float]:
    """
    Returns:
        dict: canvas side -> negatives per positive anchor, from ``folder/imbalance.json``.
    """
    path = os.path.join(folder, IMBALANCE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: run `python tools/ablate.py --preset imbalance` "
            f"(it measures the imbalance before training), or pass the preset's output folder"
        )
    with open(path) as f:
        canvases = json.load(f)["canvases"]
    empty = sorted(int(side) for side, m in canvases.items() if m["negatives_per_positive"] is None)
    if empty:
        raise ValueError(
            f"{path}: canvas {empty} has no positive anchors, so no negatives per positive to "
            "plot it at"
        )
    return {int(side): float(m["negatives_per_positive"]) for side, m in canvases.items()}


def read_runs(folder: str) -> Dict[Tuple[str, int, int], float]:
    """
    Returns:
        dict: (setting, canvas side, seed) -> AP, of each run that has one, from
        ``folder/runs.csv``. A run whose evaluation received no detection at all
        (every score below ``MODEL.RETINANET.SCORE_THRESH_TEST``; Detectron2's
        COCOEvaluator then reports no AP) has AP 0: it recalls nothing.
    """
    path = os.path.join(folder, RUNS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: no run of the imbalance preset has finished there"
        )
    runs = {}
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            if not line.get("canvas"):
                raise ValueError(
                    f"{path}: row {line['row']!r} has no canvas; "
                    "this is not the output of a preset with canvases (--preset imbalance)"
                )
            key = (line["setting"], int(line["canvas"]), int(line["seed"]))
            if line["AP"] not in ("", "None"):
                runs[key] = float(line["AP"])
            elif line.get("detections") == "0":
                runs[key] = 0.0  # nothing detected: recall 0 at every IoU, COCO's AP is 0
    return runs


def _merged(folders: Sequence[str], read, what: str) -> Dict:
    """``read(folder)`` of every folder in one dict; a key in two folders must hold the same value."""
    merged, source = {}, {}
    for folder in folders:
        for key, value in read(folder).items():
            if key in merged and merged[key] != value:
                raise ValueError(
                    f"{what} {key} is in both {source[key]} and {folder}, with "
                    f"{merged[key]} and {value}: pass folders whose runs do not overlap"
                )
            merged[key], source[key] = value, folder
    return merged


def sweep(*folders: str) -> Dict[str, List[Tuple[float, float, float, float, List[float]]]]:
    """
    Returns:
        dict: setting -> list of (negatives per positive, mean AP, lowest AP,
            highest AP, AP of each seed), sorted by imbalance, over the runs of
            every folder.
    """
    return _points(folders, _merged(folders, read_imbalance, "the imbalance of canvas"))


def _points(folders: Sequence[str], ratio: Dict[int, float]) -> Dict:
    """:func:`sweep` of ``folders``, given their merged imbalance ``ratio`` (canvas -> ratio)."""
    by_setting = {}
    for (setting, side, _seed), ap in sorted(_merged(folders, read_runs, "run").items()):
        by_setting.setdefault(setting, {}).setdefault(side, []).append(ap)
    result = {}
    for setting, by_canvas in by_setting.items():
        missing = sorted(set(by_canvas) - set(ratio))
        if missing:
            files = ", ".join(os.path.join(f, IMBALANCE_FILE) for f in folders)
            raise ValueError(
                f"{files} has no measurement for canvas {missing} "
                f"of {setting!r}; measured: {sorted(ratio)}"
            )
        points = [
            (ratio[s], float(np.mean(ap)), min(ap), max(ap), ap) for s, ap in by_canvas.items()
        ]
        result[setting] = sorted(points)
    return result


def plot(
    folders: Sequence[str], output: str, width: float = 8.0, height: float = 5.0, dpi: int = 100
) -> Dict:
    """Draws the sweep of ``folders`` into ``output`` and returns :func:`sweep`'s result."""
    ratio = _merged(folders, read_imbalance, "the imbalance of canvas")
    data = _points(folders, ratio)
    labels = _labels()
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi, layout="constrained")
    for setting, points in data.items():
        x, mean, low, high, seeds = (list(v) for v in zip(*points))
        (line,) = ax.plot(x, mean, marker="o", lw=2, label=labels.get(setting, setting))
        spread = np.array([np.subtract(mean, low), np.subtract(high, mean)])  # (2, points)
        ax.errorbar(x, mean, yerr=spread, fmt="none", ecolor=line.get_color(), capsize=4, lw=1)
        for xi, values in zip(x, seeds):
            for zero, marker, size in ((False, ".", 5), (True, "x", 12)):
                ys = [v for v in values if (v == 0) == zero]
                ax.plot(
                    [xi] * len(ys),
                    ys,
                    ls="none",
                    marker=marker,
                    ms=size,
                    mew=2,
                    color="black" if zero else line.get_color(),
                    alpha=0.6,
                    zorder=3,
                )
    ax.set_xscale("log")
    ax.set(
        xlabel="negative anchors per positive anchor (model's label_anchors, train split)",
        ylabel="AP on the val split (%)",
        title="AP against foreground/background imbalance (digits canvases)",
    )
    top = ax.secondary_xaxis("top")
    top.set_xticks(
        sorted(ratio.values()),
        labels=[f"{s} px" for s, _ in sorted(ratio.items(), key=lambda t: t[1])],
    )
    top.minorticks_off()
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    fig.supxlabel(
        "line: mean over seeds; bar: lowest to highest seed; dots: seeds; "
        "x: a seed with AP 0 (no detection scored above the test threshold counts as 0)",
        fontsize=8,
        color="0.35",
    )
    save_figure(fig, output, dpi)
    return data


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", nargs="+", help="output folders of `tools/ablate.py --preset imbalance`"
    )
    add_figure_arguments(parser, "docs/imbalance_sweep.png", height=5.0)
    return parser


def main(argv=None) -> Dict:
    """Draws the figure, prints one line per setting and point, and returns :func:`sweep`'s result."""
    args = get_parser().parse_args(argv)
    data = plot(args.folders, args.output, args.width, args.height, args.dpi)
    print(f"{args.output}:")
    for setting, points in data.items():
        for x, mean, low, high, seeds in points:
            print(
                f"  {setting}: {x:,.0f} negatives per positive, AP {mean:.1f} "
                f"({len(seeds)} seeds, {low:.1f}-{high:.1f})"
            )
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
