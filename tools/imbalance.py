#!/usr/bin/env python
"""
The foreground/background imbalance of the digits canvases, counted in the
anchors training sees: for each canvas side, the anchors the model's own
``label_anchors`` (its anchor generator and IoU matcher, Detectron2's
RetinaNet rule: IoU >= 0.5 positive, < 0.4 negative, in between ignored)
labels positive, negative and ignored, over the images of a split.

    python tools/imbalance.py                                  # every canvas, the whole train split
    python tools/imbalance.py --canvases 128,512 --num-images 200
    python tools/imbalance.py --output output/imbalance.json   # also write the numbers as json

No training and no weights are needed: the labels depend only on the anchors
and the ground-truth boxes. The model is built on the CPU from a digits
config put at the canvas (:func:`canvas_opts`: the canvas's data sets and
input size); each image's ground truth is what training's ``DatasetMapper``
makes of it (its augmentations and annotation transform, without decoding the
pixels, which the labels do not depend on), and the anchors come from the
model's anchor generator on its backbone's feature maps for the image's padded
size (all digits images of a canvas have one size, so the backbone runs once,
on zeros).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden; hidden at run time too.
import focal_det2  # noqa: E402

focal_det2.hide_third_party_deprecations()

# isort: split

from focal_det2.data import CANVAS_SIZES, canvas_dataset_name  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join("configs", "digits", "sigmoid_focal_R18_FPN_1x.yaml")


def canvas_opts(side: int) -> List:
    """
    The overrides that put a digits config at one canvas size: its train and
    test sets ``digits_{train,val}_s<side>`` and an input size equal to the
    canvas, so images are not resized.

    Args:
        side (int): canvas side in pixels, one of :data:`focal_det2.data.CANVAS_SIZES`.

    Returns:
        list: key, value pairs as on train_net.py's command line.
    """
    if side not in CANVAS_SIZES:
        raise ValueError(f"canvas side must be one of {CANVAS_SIZES}, got {side!r}")
    return [
        "DATASETS.TRAIN",
        (canvas_dataset_name("train", side),),
        "DATASETS.TEST",
        (canvas_dataset_name("val", side),),
        "INPUT.MIN_SIZE_TRAIN",
        (side,),
        "INPUT.MAX_SIZE_TRAIN",
        side,
        "INPUT.MIN_SIZE_TEST",
        side,
        "INPUT.MAX_SIZE_TEST",
        side,
    ]


def canvas_cfg(side: int, config_file: str = DEFAULT_CONFIG, opts: Sequence = ()):
    """
    ``config_file`` (relative to the repository) with :func:`canvas_opts` and
    then ``opts`` merged, as train_net.py would load it, on the CPU.
    """
    from focal_det2.config import load_config

    cfg = load_config(
        os.path.join(REPO, config_file), canvas_opts(side) + ["MODEL.DEVICE", "cpu"] + list(opts)
    )
    cfg.freeze()
    return cfg


def _anchors_for(model, image_size, cache: Dict):
    """
    The model's anchors (list[Boxes], one per feature level) for an image of
    ``image_size`` (H, W): padded by the model's ``preprocess_image``, then
    its anchor generator on its backbone's feature maps of that padded zero
    image; computed once per size.
    """
    import torch

    key = tuple(image_size)
    if key not in cache:
        images = model.preprocess_image([{"image": torch.zeros(3, *key, device=model.device)}])
        features = model.backbone(images.tensor)
        cache[key] = model.anchor_generator([features[f] for f in model.head_in_features])
    return cache[key]


def _training_instances(mapper, record: Dict):
    """
    The ground truth training's ``DatasetMapper`` makes of ``record``, without
    reading its pixels: the mapper's augmentations run on a zero image of the
    record's size, then its own annotation transform
    (``DatasetMapper._transform_annotations``: crowd boxes dropped, boxes
    transformed, empty ones filtered).

    Returns:
        Instances: ``gt_boxes`` and ``gt_classes`` of the image.
        tuple[int, int]: the image size (H, W) after the augmentations.
    """
    import copy

    import numpy as np
    from detectron2.data import transforms as T

    record = copy.deepcopy(record)
    aug_input = T.AugInput(np.zeros((record["height"], record["width"], 3), np.uint8))
    transforms = mapper.augmentations(aug_input)
    shape = aug_input.image.shape[:2]
    mapper._transform_annotations(record, transforms, shape)
    return record["instances"], shape


def measure_imbalance(cfg, dataset: str, num_images: Optional[int] = None) -> Dict:
    """
    Counts the anchors the model of ``cfg`` labels positive, negative and
    ignored on the first ``num_images`` images of ``dataset``: its
    ``label_anchors`` on the ground truth of training's ``DatasetMapper``
    (:func:`_training_instances`) and its anchors for each image's size, the
    image padded alone (a batch of equal-size images, as in the digits sets,
    pads to the same size).

    Args:
        cfg (CfgNode): a FocalRetinaNet config; its anchors, matcher and
            training input size are used.
        dataset (str): a name in ``DatasetCatalog``.
        num_images (int or None): the first images of the data set (None: all).

    Returns:
        dict: ``dataset``, ``images``, ``objects_per_image``, ``anchors_per_image``,
            ``positive_per_image``, ``negative_per_image``, ``ignored_per_image``
            (means over the images) and ``negatives_per_positive`` (all negatives
            over all positives of the images; None where there is no positive).
    """
    import torch
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model

    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1 or None, got {num_images!r}")
    model = build_model(cfg).eval()
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(dataset)[:num_images]
    if not dicts:
        raise ValueError(f"data set {dataset!r} has no images")
    K = model.num_classes
    totals = dict(objects=0, anchors=0, positive=0, negative=0, ignored=0)
    cache = {}
    with torch.no_grad():
        for record in dicts:
            instances, shape = _training_instances(mapper, record)
            anchors = _anchors_for(model, shape, cache)
            (labels,), _ = model.label_anchors(anchors, [instances.to(model.device)])
            totals["objects"] += len(instances)
            totals["anchors"] += labels.numel()
            totals["positive"] += int(((labels >= 0) & (labels < K)).sum())
            totals["negative"] += int((labels == K).sum())
            totals["ignored"] += int((labels == -1).sum())
    n = len(dicts)
    result = {"dataset": dataset, "images": n}
    result.update({f"{k}_per_image": v / n for k, v in totals.items()})
    positives = totals["positive"]
    result["negatives_per_positive"] = totals["negative"] / positives if positives else None
    return result


def measure_canvases(
    canvases: Sequence[int] = CANVAS_SIZES,
    split: str = "train",
    num_images: Optional[int] = None,
    config_file: str = DEFAULT_CONFIG,
    opts: Sequence = (),
) -> Dict[int, Dict]:
    """
    :func:`measure_imbalance` at each canvas side, on ``digits_<split>_s<side>``
    (generated first if it is not cached).

    Returns:
        dict: canvas side -> the measurement, with ``canvas`` added.
    """
    from focal_det2.data import ensure_generated

    results = {}
    for side in canvases:
        dataset = canvas_dataset_name(split, side)  # checks both
        ensure_generated(dataset)
        results[side] = dict(
            canvas=side,
            **measure_imbalance(canvas_cfg(side, config_file, opts), dataset, num_images),
        )
    return results


def format_table(measurements: Dict[int, Dict]) -> str:
    """The measurements as a markdown table, one line per canvas."""
    lines = [
        "| canvas | images | objects / image | anchors / image | positive / image | negative / image "
        "| ignored / image | negatives per positive |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, m in sorted(measurements.items()):
        ratio = m["negatives_per_positive"]
        lines.append(
            f"| {side} px | {m['images']:,} | {m['objects_per_image']:.2f} | {m['anchors_per_image']:,.0f} "
            f"| {m['positive_per_image']:.1f} | {m['negative_per_image']:,.0f} | {m['ignored_per_image']:.1f} "
            f"| {'no positives' if ratio is None else f'{ratio:,.0f}'} |"
        )
    return "\n".join(lines)


def parse_canvases(text: str) -> List[int]:
    """'128,512' -> [128, 512]; each must be one of :data:`focal_det2.data.CANVAS_SIZES`."""
    try:
        sides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--canvases must be comma-separated integers from {CANVAS_SIZES}, got {text!r}"
        ) from None
    bad = [s for s in sides if s not in CANVAS_SIZES]
    if bad or not sides:
        raise ValueError(
            f"--canvases must be comma-separated values from {CANVAS_SIZES}, got {text!r}"
        )
    return sides


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--canvases", default=",".join(map(str, CANVAS_SIZES)), help="comma-separated canvas sides"
    )
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument(
        "--num-images", type=int, help="the first images of each split (default: all)"
    )
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help="digits config whose anchors and matcher are used (relative to the repository)",
    )
    parser.add_argument("--output", help="also write the measurements to this json file")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides"
    )
    return parser


def main(argv=None) -> Dict[int, Dict]:
    """Measures, prints the table (and writes ``--output``); returns the measurements."""
    args = get_parser().parse_args(argv)
    measurements = measure_canvases(
        parse_canvases(args.canvases), args.split, args.num_images, args.config_file, args.opts
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({str(k): v for k, v in measurements.items()}, f, indent=1)
    print(format_table(measurements))
    return measurements


if __name__ == "__main__":
    main(sys.argv[1:])
