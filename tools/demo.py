#!/usr/bin/env python
"""
Run a trained model on images and write them with the detections drawn by
Detectron2's Visualizer.

    python tools/demo.py --config-file configs/digits/sigmoid_focal_R18_FPN_1x.yaml \\
        --dataset digits_val --num-images 8 --output output/demo \\
        --montage docs/demo_detections.png --confidence-threshold 0.5 \\
        MODEL.WEIGHTS output/digits/sigmoid_focal_R18_FPN_1x/model_final.pth

Inputs are image paths (``--input a.png b.jpg``, shell globs expanded) or the
first ``--num-images`` images of a registered data set (``--dataset``).
Each image is written as a PNG, ``scale`` times its size, at its path
relative to the inputs' common folder under ``--output`` (``dir1/a.png`` and
``dir2/a.png`` become ``<output>/dir1/a.png`` and ``<output>/dir2/a.png``;
``a.png`` and ``a.jpg`` of one folder ``a.png.png`` and ``a.jpg.png``), so no
output replaces another; nothing is written into a folder of input images,
and a file that exists is replaced only with ``--overwrite``.
``--montage`` also tiles them into one PNG. Class
names come from the data set's metadata (``--dataset``, else the config's
first test set).

Each box gets one label, its top class: RetinaNet scores every class of an
anchor apart, so one object can yield boxes of several classes; a detection
that overlaps a higher-scoring one (IoU > ``MODEL.RETINANET.NMS_THRESH_TEST``)
is not drawn, whatever its class. Each image's line on stdout says how many
detections were drawn.
"""

import argparse
import glob
import math
import os
import sys
from typing import List, Optional, Sequence

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden; hidden at run time too.
import focal_det2  # noqa: E402

focal_det2.hide_third_party_deprecations()

# isort: split

import numpy as np  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.layers import nms  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

from focal_det2.checkpoint import load_for_evaluation  # noqa: E402
from focal_det2.checks import check_device  # noqa: E402
from focal_det2.config import load_config  # noqa: E402

DEFAULT_THRESHOLD = 0.5
THRESHOLD_KEY = "MODEL.RETINANET.SCORE_THRESH_TEST"


def input_images(inputs: Sequence[str], dataset: Optional[str], num_images: int) -> List[str]:
    """Image paths from ``inputs`` (globs expanded) or the first ``num_images`` of ``dataset``."""
    if dataset:
        return [d["file_name"] for d in DatasetCatalog.get(dataset)[:num_images]]
    paths = []
    for pattern in inputs:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        paths += matches
    return paths


def output_paths(paths: Sequence[str], output: str) -> List[str]:
    """
    Where each input image is written: its path relative to the inputs'
    common folder, under ``output``, as PNG. The extension is kept
    (``a.jpg.png``) where two inputs of one folder share a name without it.
    An output into a folder of input images (``output`` an input's folder),
    where it could replace an input or a user's file, is an error naming it.
    """
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    stems = [os.path.splitext(p)[0] for p in absolute]
    outs = []
    for path, stem in zip(absolute, stems):
        name = path if stems.count(stem) > 1 else stem
        outs.append(os.path.join(output, os.path.relpath(name, common) + ".png"))
    folders = {os.path.dirname(p) for p in absolute}
    for out in outs:
        if os.path.dirname(os.path.abspath(out)) in folders:
            raise ValueError(
                f"--output {output} would write {out} among the input images, over an input or "
                "a file of yours; choose an --output folder that holds no input image."
            )
    return outs


def top_class_per_box(instances, iou_threshold: float):
    """
    The detections not overlapping a higher-scoring one by IoU > ``iou_threshold``,
    whatever the classes: one label per object, its top class.

    Args:
        instances (Instances): detections with ``pred_boxes``, ``scores``, ``pred_classes``.
        iou_threshold (float): MODEL.RETINANET.NMS_THRESH_TEST.

    Returns:
        Instances: the kept detections, highest score first.
    """
    keep = nms(instances.pred_boxes.tensor, instances.scores, iou_threshold)
    return instances[keep]


def draw(predictor, path: str, metadata, scale: float):
    """
    Returns:
        ndarray: (H * scale, W * scale, 3) uint8 RGB image with the detections drawn.
        int: the number of detections drawn.
    """
    image = read_image(path, format="BGR")
    instances = predictor(image)["instances"].to("cpu")
    instances = top_class_per_box(instances, predictor.cfg.MODEL.RETINANET.NMS_THRESH_TEST)
    visualizer = Visualizer(image[:, :, ::-1], metadata, scale=scale)
    return visualizer.draw_instance_predictions(instances).get_image(), len(instances)


def montage(images: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tiles images of equal size into a grid with white gaps."""
    height, width = images[0].shape[:2]
    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    grid = np.full(
        (rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, np.uint8
    )
    for i, image in enumerate(images):
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"--montage needs images of one size: image {i + 1} is "
                f"{image.shape[1]}x{image.shape[0]} px, the first {width}x{height}"
            )
        r, c = divmod(i, columns)
        grid[
            r * (height + gap) : r * (height + gap) + height,
            c * (width + gap) : c * (width + gap) + width,
        ] = image
    return grid


def class_metadata(cfg, dataset: Optional[str]):
    """The metadata whose class names label the boxes: ``dataset``'s, else the config's first
    test set's (then training set's); none without any."""
    names = [dataset] if dataset else list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0] if names else "__unused")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image paths or globs")
    source.add_argument("--dataset", help="a registered data set name, e.g. digits_val")
    parser.add_argument("--num-images", type=int, default=8, help="images taken from --dataset")
    parser.add_argument("--output", required=True, help="directory for the drawn images")
    parser.add_argument("--montage", help="also tile all drawn images into this PNG")
    parser.add_argument("--columns", type=int, default=4, help="montage columns")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        help=f"score threshold; default {DEFAULT_THRESHOLD}, or {THRESHOLD_KEY} given as an override",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace drawings and a montage that exist"
    )
    parser.add_argument("--scale", type=float, default=2.0, help="output size / input size")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides"
    )
    return parser


def score_threshold(args) -> Optional[float]:
    """
    The score threshold ``--confidence-threshold`` sets (default 0.5), or None to keep the
    one given as ``MODEL.RETINANET.SCORE_THRESH_TEST`` among the overrides; both is an error.
    """
    if THRESHOLD_KEY in map(str, args.opts[::2]):
        if args.confidence_threshold is not None:
            raise ValueError(
                f"--confidence-threshold and {THRESHOLD_KEY} both set the score threshold; "
                "give one of them."
            )
        return None
    return DEFAULT_THRESHOLD if args.confidence_threshold is None else args.confidence_threshold


def check_outputs(outs: Sequence[str], montage_path: Optional[str], overwrite: bool):
    """
    Raise, naming them, for drawings or a montage that exist (a file of yours, or an earlier
    run's) unless ``overwrite``, and for a ``--montage`` PIL cannot write, before drawing.
    """
    if montage_path and os.path.splitext(montage_path)[1].lower() not in (
        Image.registered_extensions()
    ):
        raise ValueError(
            f"--montage {montage_path}: no image format has that extension; write e.g. a .png."
        )
    existing = [p for p in [*outs, montage_path] if p and os.path.exists(p)]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise FileExistsError(
            f"{shown} exist{'s' * (len(existing) == 1)} and would be replaced: pass --overwrite "
            "to replace them, or choose another --output (or --montage)."
        )


class CheckedPredictor(DefaultPredictor):
    """
    :class:`DefaultPredictor` whose model loads ``MODEL.WEIGHTS`` through
    :func:`~focal_det2.checkpoint.load_for_evaluation`: a checkpoint that does not fit the
    model (another loss's classifier) is an error, not a warning and random scores.
    """

    def __init__(self, cfg):
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""
        super().__init__(unloaded)
        load_for_evaluation(cfg, self.model)


def main(argv=None) -> List[str]:
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts, need_weights=True)
    check_device(cfg)
    threshold = score_threshold(args)
    if threshold is not None:
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = threshold
    cfg.freeze()
    metadata = class_metadata(cfg, args.dataset)
    paths = input_images(args.input or (), args.dataset, args.num_images)
    outs = output_paths(paths, args.output)
    if args.montage and os.path.abspath(args.montage) in map(os.path.abspath, paths):
        raise ValueError(f"--montage {args.montage} is an input image; choose another file.")
    check_outputs(outs, args.montage, args.overwrite)
    predictor = CheckedPredictor(cfg)
    written, drawn = [], []
    for path, out in zip(paths, outs):
        image, count = draw(predictor, path, metadata, args.scale)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        Image.fromarray(image).save(out)
        print(
            f"{path}: {count} detection{'s' * (count != 1)} "
            f"(score >= {cfg.MODEL.RETINANET.SCORE_THRESH_TEST}) -> {out}"
        )
        written.append(out)
        drawn.append(image)
    if args.montage and drawn:
        os.makedirs(os.path.dirname(os.path.abspath(args.montage)), exist_ok=True)
        Image.fromarray(montage(drawn, args.columns)).save(args.montage, optimize=True)
        print(f"montage -> {args.montage}")
        written.append(args.montage)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
