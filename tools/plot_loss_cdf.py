#!/usr/bin/env python
"""
The paper's Figure 4: cumulative distribution of the normalised loss over
positive and over negative anchors of a trained model, for several gamma.

    python tools/plot_loss_cdf.py --config-file configs/digits/sigmoid_focal_R18_FPN_1x.yaml \\
        --output docs/loss_cdf.png MODEL.WEIGHTS output/digits/sigmoid_focal_R18_FPN_1x/model_final.pth

The model runs on the images of ``--dataset`` (default: the config's first
test set), resized as at test time. Anchors are labelled by the model's own
``label_anchors`` (its anchor generator and IoU matcher), so positives,
negatives and ignored anchors are exactly those training sees; ignored
anchors are dropped. As in the paper, the trained logits are kept fixed and
only the gamma used to score them varies. The model's loss must score each
of its K logits by a sigmoid (:func:`sigmoid_losses`: sigmoid_focal,
cross_entropy, ohem).

The loss of an anchor is the sigmoid FL of its row of K logits, summed over
the K classes, without the alpha_t weight (it would only rescale each
group): the terms of :func:`focal_det2.losses.functional.sigmoid_focal_loss`
(``reduction="none"``), the definition the losses are tested against.
Within each group the losses are sorted, divided by their sum and
accumulated: a curve at (f, c) means the fraction f of the anchors with the
lowest loss carries the fraction c of the group's loss.
"""

import argparse
import sys
from typing import Dict, Sequence, Tuple

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
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.data.detection_utils import build_augmentation  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from plotting import add_figure_arguments, save_figure  # noqa: E402  (tools/, beside this script)

from focal_det2.checkpoint import load_for_evaluation  # noqa: E402
from focal_det2.checks import check_device  # noqa: E402
from focal_det2.config import load_config  # noqa: E402
from focal_det2.losses import DenseClassificationLoss, functional, registered_losses  # noqa: E402

GAMMAS = (0.0, 0.5, 1.0, 2.0)


def sigmoid_losses() -> list:
    """The registered losses whose scores are a sigmoid of each of K logits (the default ``score_module``)."""
    default = DenseClassificationLoss.score_module
    return [name for name, cls in registered_losses().items() if cls.score_module is default]


def check_sigmoid_model(cfg):
    """Raise unless the model of ``cfg`` was trained with a loss on K sigmoid logits."""
    if cfg.MODEL.FOCAL.LOSS not in sigmoid_losses():
        raise ValueError(
            f"MODEL.FOCAL.LOSS={cfg.MODEL.FOCAL.LOSS!r}: the figure scores sigmoid logits; "
            f"use a model trained with one of {sigmoid_losses()}"
        )


@torch.no_grad()
def anchor_logits(
    cfg, dataset: str, num_images: int, batch_size: int = 8
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Runs the model of ``cfg`` on the first ``num_images`` images of ``dataset``
    (:meth:`FocalRetinaNet.anchor_logits`, the logits and labels training sees).

    Returns:
        Tensor: (M, K) float32 logits of the M anchors not ignored by the matcher.
        Tensor: (M,) int64 labels: 0..K-1 foreground class, K background.
    """
    model = build_model(cfg)
    load_for_evaluation(cfg, model)  # a checkpoint that does not fit the model is an error
    model.eval()
    # Training's mapper (it keeps the annotations) with the test-time resize.
    mapper = DatasetMapper(
        True, augmentations=build_augmentation(cfg, is_train=False), image_format=cfg.INPUT.FORMAT
    )
    dicts = DatasetCatalog.get(dataset)[:num_images]
    all_logits, all_labels = [], []
    for start in range(0, len(dicts), batch_size):
        logits, labels = model.anchor_logits([mapper(d) for d in dicts[start : start + batch_size]])
        valid = labels >= 0
        all_logits.append(logits[valid].float().cpu())
        all_labels.append(labels[valid].cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def per_anchor_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """
    Eq. (5) per anchor, summed over its K sigmoid outputs, no alpha_t:
    ``sum_k -(1 - p_t)^gamma * log(p_t)`` (``functional.sigmoid_focal_loss``'s terms).

    Args:
        logits (Tensor): (M, K).
        labels (Tensor): (M,) in [0, K].

    Returns:
        Tensor: (M,) per-anchor losses.
    """
    terms = functional.sigmoid_focal_loss(logits, labels, gamma=gamma, alpha=-1, reduction="none")
    return terms.sum(dim=1)


def normalized_cdf(losses: np.ndarray) -> np.ndarray:
    """Sorted ascending, divided by the sum, accumulated: (n,) values rising to 1."""
    cumulative = np.cumsum(np.sort(losses.astype(np.float64)))
    return cumulative / cumulative[-1]


def loss_cdfs(logits, labels, gammas: Sequence[float]) -> Dict[str, Dict[float, np.ndarray]]:
    """{"positive" | "negative": {gamma: normalised CDF}}."""
    K = logits.shape[1]
    groups = {"positive": labels < K, "negative": labels == K}
    cdfs = {name: {} for name in groups}
    for gamma in gammas:
        losses = per_anchor_focal_loss(logits, labels, gamma)
        for name, mask in groups.items():
            if mask.any():
                cdfs[name][gamma] = normalized_cdf(losses[mask].numpy())
    return cdfs


def share_of_hardest(cdf: np.ndarray, fraction: float) -> float:
    """Share of the loss carried by the hardest ``fraction`` of the anchors."""
    n = len(cdf)
    keep = n - max(1, int(round(fraction * n)))
    return 1.0 - (cdf[keep - 1] if keep > 0 else 0.0)


def plot(
    cdfs,
    counts: Dict[str, int],
    output: str,
    width: float = 12.0,
    height: float = 4.5,
    dpi: int = 100,
    points: int = 1000,
) -> str:
    """Draws the CDFs into ``output`` (PNG of width*dpi x height*dpi pixels)."""
    fig, axes = plt.subplots(1, 2, figsize=(width, height), dpi=dpi, layout="constrained")
    for ax, name in zip(axes, ("positive", "negative")):
        for gamma, cdf in cdfs[name].items():
            fraction = np.arange(1, len(cdf) + 1) / len(cdf)
            grid = np.linspace(0, 1, points)
            ax.plot(grid, np.interp(grid, fraction, cdf, left=0.0), lw=2, label=f"γ = {gamma:g}")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel=f"fraction of {name} anchors",
            ylabel="cumulative normalized loss",
            title=f"{name} anchors ({counts[name]:,})",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.supxlabel(
        "sigmoid FL per anchor (sum over classes, no α), anchors labelled by the model's "
        "label_anchors, trained logits fixed, γ varied",
        fontsize=8,
        color="0.35",
    )
    save_figure(fig, output, dpi)
    return output


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", help="default: the config's first test set")
    parser.add_argument("--num-images", type=int, default=300, help="first images of the data set")
    parser.add_argument(
        "--gammas", default=",".join(f"{g:g}" for g in GAMMAS), help="comma-separated"
    )
    add_figure_arguments(parser, "docs/loss_cdf.png", height=4.5)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides"
    )
    return parser


def main(argv=None) -> Dict[str, int]:
    """Draws the figure and returns the number of positive and negative anchors."""
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts, need_weights=True)
    check_device(cfg)
    check_sigmoid_model(cfg)
    cfg.freeze()
    if not (args.dataset or cfg.DATASETS.TEST):
        raise ValueError("DATASETS.TEST is empty: pass --dataset NAME, or set DATASETS.TEST")
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    gammas = [float(g) for g in args.gammas.split(",")]
    logits, labels = anchor_logits(cfg, dataset, args.num_images)
    cdfs = loss_cdfs(logits, labels, gammas)
    K = logits.shape[1]
    counts = {"positive": int((labels < K).sum()), "negative": int((labels == K).sum())}
    plot(cdfs, counts, args.output, args.width, args.height, args.dpi)
    lines = [
        f"{args.output}: {counts['positive']} positive, {counts['negative']} negative anchors "
        f"from {min(args.num_images, len(DatasetCatalog.get(dataset)))} images of {dataset}"
    ]
    for name in ("positive", "negative"):
        for gamma, cdf in cdfs[name].items():
            lines.append(
                f"  {name} γ={gamma:g}: hardest 1% carry {100 * share_of_hardest(cdf, 0.01):.1f}%, "
                f"hardest 10% carry {100 * share_of_hardest(cdf, 0.10):.1f}% of the loss"
            )
    print("\n".join(lines))
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
