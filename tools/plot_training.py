#!/usr/bin/env python
"""
Training curves of several runs on one figure, read from the
``metrics.json`` Detectron2's JSONWriter leaves in each OUTPUT_DIR.

    python tools/plot_training.py output/ablation/digits-small/{ce_a0.75,fl_g2_a0.25,soft_gamma_0to2}/seed0 \\
        --output docs/training_curves.png

Panels: ``loss_cls``, ``loss_box_reg`` and, when some run schedules gamma
(``focal_gamma`` not constant), ``focal_gamma``. Detectron2 writes each
value every 20 iterations as the median over the last 20 iterations.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from plotting import add_figure_arguments, save_figure  # noqa: E402  (tools/, beside this script)

LOSS_KEYS = ("loss_cls", "loss_box_reg")
GAMMA_KEY = "focal_gamma"


def metrics_path(run: str) -> str:
    """``run`` itself if it is a file, else ``run/metrics.json``."""
    path = run if os.path.isfile(run) else os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json at {path}")
    return path


def read_series(path: str, keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """
    Args:
        path (str): a metrics.json file (one JSON object per line).
        keys (sequence[str]): scalars to read.

    Returns:
        dict: key -> (M, 2) array of (iteration, value) for the records that have the key.
    """
    series = {k: [] for k in keys}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from e
            for key in keys:
                if key in record and "iteration" in record:
                    series[key].append((record["iteration"], record[key]))
    return {k: np.array(v, dtype=float).reshape(-1, 2) for k, v in series.items()}


def plot(
    runs: Sequence[str],
    output: str,
    labels: Optional[Sequence[str]] = None,
    width: float = 12.0,
    height: float = 4.0,
    dpi: int = 100,
) -> List[str]:
    """
    Draws the runs' curves into ``output`` (PNG of width*dpi x height*dpi pixels).

    Args:
        runs (sequence[str]): OUTPUT_DIRs or metrics.json files.
        labels (sequence[str] or None): legend entries; default: the runs' paths,
            shortened by their common prefix.

    Returns:
        list[str]: the keys drawn, one panel each.
    """
    paths = [metrics_path(r) for r in runs]
    if labels is None:
        labels = _short_names([os.path.dirname(os.path.abspath(p)) for p in paths])
    if len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} runs")
    data = [read_series(p, LOSS_KEYS + (GAMMA_KEY,)) for p in paths]
    keys = list(LOSS_KEYS)
    if any(len(np.unique(d[GAMMA_KEY][:, 1])) > 1 for d in data):
        keys.append(GAMMA_KEY)

    fig, axes = plt.subplots(1, len(keys), figsize=(width, height), dpi=dpi, layout="constrained")
    for ax, key in zip(axes, keys):
        for label, series in zip(labels, data):
            values = series[key]
            if len(values):
                ax.plot(values[:, 0], values[:, 1], label=label, lw=1.5)
        ax.set(title=key, xlabel="iteration")
        if key != GAMMA_KEY:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, output, dpi)
    return keys


def _short_names(dirs: Sequence[str]) -> List[str]:
    """Paths without the directory they all share."""
    if len(dirs) == 1:
        return [os.path.basename(dirs[0])]
    common = os.path.commonpath(dirs)
    return [os.path.relpath(d, common) for d in dirs]


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIRs or metrics.json files")
    parser.add_argument("--labels", help="comma-separated legend entries, one per run")
    add_figure_arguments(parser, "docs/training_curves.png", height=4.0)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    keys = plot(args.runs, args.output, labels, args.width, args.height, args.dpi)
    print(f"{args.output}: {', '.join(keys)}")


if __name__ == "__main__":
    main(sys.argv[1:])
