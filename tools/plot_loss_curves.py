#!/usr/bin/env python
"""
The paper's Figure 1 (and its appendix Figure 5), drawn from the library's
loss functions rather than from re-typed formulas.

    python tools/plot_loss_curves.py --output docs/loss_curves.png

Left: loss against p_t, the probability of the ground-truth class, for
sigmoid FL at gamma in {0, 0.5, 1, 2, 5} (gamma 0 is CE), FL* at
(gamma 2, beta 1) and (gamma 4, beta 0), and the softmax focal loss at
gamma 2. Right: the same losses against x_t = y * x, as in the appendix.

Every point is one anchor with one foreground class passed to
:mod:`focal_det2.losses.functional` with ``alpha=-1`` (no alpha_t weight):

- sigmoid FL and CE: logit ``x_t = log(p_t / (1 - p_t))``, label 0;
- FL*: the same logit; FL* is plotted against ``sigmoid(x_t)``, its own
  ``p_t* = sigmoid(gamma * x_t + beta)`` differs;
- softmax FL: a 2-way softmax (one class plus background) with logits
  ``(x_t, 0)``, label 0, so ``softmax(x)[0] = p_t``. For two columns the
  softmax focal loss reduces to the sigmoid one, so its points fall on the
  sigmoid gamma 2 curve: the figure checks that reduction.
"""

import argparse
import sys
from typing import Callable, Dict, List, Tuple

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden; hidden at run time too.
import focal_det2  # noqa: E402

focal_det2.hide_third_party_deprecations()

# isort: split

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from plotting import add_figure_arguments, one_thread, save_figure  # noqa: E402  (tools/, beside this script)

from focal_det2.losses import functional  # noqa: E402

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
STAR_SETTINGS = ((2.0, 1.0), (4.0, 0.0))
SOFTMAX_GAMMA = 2.0


def _one_anchor_loss(fn: Callable, logits_row: List[float], **kwargs) -> float:
    """``fn`` on one anchor whose label is class 0, in float64."""
    logits = torch.tensor([logits_row], dtype=torch.float64)
    return float(fn(logits, torch.zeros(1, dtype=torch.long), alpha=-1, **kwargs))


def loss_curves(x_t: np.ndarray) -> Dict[str, Tuple[np.ndarray, dict]]:
    """
    Args:
        x_t (ndarray): (P,) logits of the ground-truth class.

    Returns:
        dict: label -> (loss at each x_t of shape (P,), matplotlib style).
    """
    curves = {}
    colors = iter(f"C{i}" for i in range(10))
    for gamma in GAMMAS:
        label = "CE (γ = 0)" if gamma == 0 else f"FL, γ = {gamma:g}"
        values = [_one_anchor_loss(functional.sigmoid_focal_loss, [x], gamma=gamma) for x in x_t]
        curves[label] = (np.array(values), dict(lw=2, color=next(colors)))
    for gamma, beta in STAR_SETTINGS:
        values = [
            _one_anchor_loss(functional.focal_star_loss, [x], gamma=gamma, beta=beta) for x in x_t
        ]
        curves[f"FL*, γ = {gamma:g}, β = {beta:g}"] = (
            np.array(values),
            dict(lw=2, ls="--", color=next(colors)),
        )
    values = [
        _one_anchor_loss(functional.softmax_focal_loss, [x, 0.0], gamma=SOFTMAX_GAMMA) for x in x_t
    ]
    style = dict(ls="none", marker="o", ms=4, mfc="none", color="black", markevery=12)
    curves[f"softmax FL (2-way), γ = {SOFTMAX_GAMMA:g}"] = (np.array(values), style)
    return curves


def plot(
    output: str, width: float = 12.0, height: float = 4.5, dpi: int = 100, points: int = 241
) -> str:
    """
    Draws both panels into ``output`` (PNG of width*dpi x height*dpi pixels).

    Returns:
        str: ``output``.
    """
    p_t = np.linspace(0.0, 1.0, points + 2)[1:-1]  # open interval (0, 1)
    x_t = np.linspace(-5.0, 5.0, points)
    with one_thread():
        by_p = loss_curves(np.log(p_t / (1 - p_t)))
        by_x = loss_curves(x_t)

    fig, (left, right) = plt.subplots(1, 2, figsize=(width, height), dpi=dpi, layout="constrained")
    for label, (values, style) in by_p.items():
        left.plot(p_t, values, label=label, **style)
    left.set(
        xlim=(0, 1),
        ylim=(0, 5),
        xlabel="probability of ground truth class  $p_t$",
        ylabel="loss",
        title="Figure 1: loss against $p_t$",
    )
    left.axvspan(0.6, 1.0, color="0.93", zorder=0)
    left.text(0.8, 4.0, "well-classified\nexamples", ha="center", fontsize=9)
    left.legend(fontsize=8)
    for label, (values, style) in by_x.items():
        if label.startswith("CE") or "γ = 2" in label or label.startswith("FL*"):
            right.plot(x_t, values, label=label, **style)
    right.set(
        xlim=(-5, 5),
        ylim=(0, 5),
        xlabel="$x_t = y\\,x$",
        ylabel="loss",
        title="Appendix, Figure 5: loss against $x_t$",
    )
    right.legend(fontsize=8)
    fig.supxlabel(
        "one anchor, one class, no α weight, computed with focal_det2.losses.functional; "
        "FL* drawn against sigmoid($x_t$); softmax FL: 2-way softmax with logits ($x_t$, 0), "
        "which reduces to sigmoid FL",
        fontsize=8,
        color="0.35",
    )
    save_figure(fig, output, dpi)
    return output


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_figure_arguments(parser, "docs/loss_curves.png", height=4.5)
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    print(plot(args.output, args.width, args.height, args.dpi))


if __name__ == "__main__":
    main(sys.argv[1:])
