#!/usr/bin/env python
"""
Export a FocalRetinaNet to TorchScript, following Detectron2's
``tools/deploy/export_model.py``, then run the saved file on a sample image
and report its agreement with the eager model.

    python tools/export_model.py --config-file configs/digits/sigmoid_focal_R18_FPN_1x.yaml \\
        --format torchscript --export-method scripting --output output/export \\
        MODEL.WEIGHTS output/digits/sigmoid_focal_R18_FPN_1x/model_final.pth

``--export-method scripting`` (``detectron2.export.scripting_with_instances``)
writes a model that takes ``List[Dict[str, Tensor]]`` inputs (``{"image": (3, H, W)}``)
and returns, per image, a dict of ``pred_boxes`` (R, 4), ``scores`` (R,) and
``pred_classes`` (R,), before Detectron2's ``detector_postprocess``.
``--export-method tracing`` (``detectron2.export.TracingAdapter``) writes a
model that takes one (3, H, W) image tensor and returns the flattened
boxes, classes, scores and image size; the input and output schemas are
logged. Tracing records one image's control flow; Detectron2 prints
TracerWarnings about it, which is why the tool checks the result.

The sample is ``--sample-image`` (resized as at test time) or the first
image of the config's first test set. Both the eager model and the file
reloaded with ``torch.jit.load`` run on it; the report gives the number of
detections of each, whether their classes are equal and the largest
absolute difference of their boxes and scores. Writes ``<output>/model.ts``;
the exit status is 1 when the two disagree, and 2 when neither detects anything on
the sample (nothing compared: lower MODEL.RETINANET.SCORE_THRESH_TEST, which the
exported model keeps, or pass another ``--sample-image``).
"""

import argparse
import logging
import os
import sys
from typing import Dict, List, Tuple

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden; hidden at run time too.
# torch.jit is deprecated in this torch but Detectron2's export needs it: its trace/save/load too.
import focal_det2  # noqa: E402

focal_det2.hide_third_party_deprecations(export=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import build_detection_test_loader, detection_utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.export import TracingAdapter, scripting_with_instances  # noqa: E402
from detectron2.modeling import build_model, detector_postprocess  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from focal_det2.checkpoint import load_for_evaluation  # noqa: E402
from focal_det2.checks import check_device  # noqa: E402
from focal_det2.config import load_config  # noqa: E402

logger = logging.getLogger("focal_det2.export")

FORMATS = ("torchscript",)
EXPORT_METHODS = ("scripting", "tracing")
# Largest absolute difference of boxes (pixels) and scores that counts as agreement.
TOLERANCE = 1e-4


class ScriptableAdapter(nn.Module):
    """
    The model with plain outputs, as Detectron2's export_model.py scripts
    RetinaNet: a list of images in, per image a dict of its detections' fields out.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        return [instances.get_fields() for instances in self.model(inputs)]


def export_scripting(model: nn.Module, path: str):
    """
    Script ``model`` with ``scripting_with_instances`` and save it to ``path``.

    Returns:
        callable: image (3, H, W) -> Instances of the reloaded file, postprocessed
        to the image's size as the eager model's are.
    """
    fields = {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
    torch.jit.save(scripting_with_instances(ScriptableAdapter(model), fields), path)
    loaded = torch.jit.load(path)

    def run(image: Tensor) -> Instances:
        fields = loaded([{"image": image}])[0]
        size = tuple(image.shape[1:])
        instances = Instances(
            size,
            pred_boxes=Boxes(fields["pred_boxes"]),
            scores=fields["scores"],
            pred_classes=fields["pred_classes"],
        )
        return detector_postprocess(instances, *size)

    return run


def export_tracing(model: nn.Module, image: Tensor, path: str):
    """
    Trace ``model`` through ``TracingAdapter`` on ``image`` (3, H, W) and save it to ``path``.

    Returns:
        callable: image (3, H, W) -> Instances of the reloaded file.
    """
    adapter = TracingAdapter(model, [{"image": image}])
    torch.jit.save(torch.jit.trace(adapter, (image,)), path)
    logger.info(f"Inputs schema: {adapter.inputs_schema}")
    logger.info(f"Outputs schema: {adapter.outputs_schema}")
    loaded = torch.jit.load(path)

    def run(image: Tensor) -> Instances:
        return adapter.outputs_schema(loaded(image))[0]["instances"]

    return run


def sample_image(cfg, sample_image: str = None) -> Tensor:
    """
    The (3, H, W) image the export is traced and checked on: ``sample_image``
    resized as at test time, or the first image of ``cfg.DATASETS.TEST[0]``.
    """
    if sample_image:
        image = detection_utils.read_image(sample_image, format=cfg.INPUT.FORMAT)
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = resize.get_transform(image).apply_image(image)
        return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))  # as DatasetMapper
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: pass --sample-image or a config with a test set.")
    return next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))[0]["image"]


def agreement(expected: Instances, actual: Instances) -> Dict[str, object]:
    """
    Returns:
        dict: ``detections`` (eager, exported), ``classes_equal``, ``max_box_diff``,
        ``max_score_diff`` (None when the counts differ) and ``agree``.
    """
    report = {
        "detections": (len(expected), len(actual)),
        "classes_equal": False,
        "max_box_diff": None,
        "max_score_diff": None,
    }
    if len(expected) == len(actual):
        report["classes_equal"] = torch.equal(
            expected.pred_classes, actual.pred_classes.to(torch.int64)
        )
        if len(expected):
            box = (expected.pred_boxes.tensor - actual.pred_boxes.tensor).abs().max().item()
            score = (expected.scores - actual.scores).abs().max().item()
        else:
            box = score = 0.0
        report["max_box_diff"], report["max_score_diff"] = box, score
    report["agree"] = (
        report["classes_equal"]
        and max(report["max_box_diff"] or 0, report["max_score_diff"] or 0) <= TOLERANCE
    )
    return report


def model_path(output: str, overwrite: bool = False) -> str:
    """
    ``<output>/model.ts``. Raises, naming ``--output``, for an output that is a file, and for
    a ``model.ts`` there (an earlier export) unless ``overwrite``.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise NotADirectoryError(
            f"--output {output} is a file; it must be a folder (model.ts is written into it)."
        )
    path = os.path.join(output, "model.ts")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"--output {output} holds model.ts (an earlier export): pass --overwrite to replace "
            "it, or choose another --output."
        )
    return path


def export(
    cfg, export_method: str, output: str, sample: str = None, overwrite: bool = False
) -> Tuple[str, Dict[str, object]]:
    """
    Export the model of ``cfg`` (weights from MODEL.WEIGHTS, a trained model's:
    one that does not fit the model is an error; freshly initialised when empty)
    to ``<output>/model.ts`` (an existing one only with ``overwrite``, see
    :func:`model_path`) and compare the reloaded file with the eager model on
    the sample image.

    Returns:
        str: the path of the saved model.
        dict: see :func:`agreement`.
    """
    if export_method not in EXPORT_METHODS:
        raise ValueError(
            f"--export-method {export_method!r}: must be one of {list(EXPORT_METHODS)}."
        )
    path = model_path(output, overwrite)
    model = build_model(cfg)
    load_for_evaluation(cfg, model)  # a checkpoint that does not fit the model is an error
    model.eval()
    image = sample_image(cfg, sample)
    os.makedirs(output, exist_ok=True)
    with torch.no_grad():
        if export_method == "scripting":
            run = export_scripting(model, path)
        else:
            run = export_tracing(model, image, path)
        expected = model([{"image": image}])[0]["instances"]
        actual = run(image)
    return path, agreement(expected, actual)


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="scripting")
    parser.add_argument(
        "--sample-image", default=None, help="default: the first image of DATASETS.TEST[0]"
    )
    parser.add_argument("--output", required=True, help="output directory for model.ts")
    parser.add_argument("--overwrite", action="store_true", help="replace a model.ts there")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides"
    )
    return parser


def exit_status(report: Dict[str, object]) -> int:
    """0 if the exported model agrees with the eager one, 1 if not, 2 if nothing was compared (no detections)."""
    if not report["agree"]:
        return 1
    return 2 if report["detections"] == (0, 0) else 0


def main(argv=None) -> Dict[str, object]:
    """Exports, prints the agreement report and returns it (with the model's ``path``)."""
    args = get_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg)
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: exporting a freshly initialised model.")
    path, report = export(cfg, args.export_method, args.output, args.sample_image, args.overwrite)
    eager, exported = report["detections"]
    status = exit_status(report)
    verdict = {0: "agree", 1: "DISAGREE", 2: "nothing compared"}[status]
    print(
        f"{path} ({args.format}, {args.export_method}): {eager} eager / {exported} exported detections, "
        f"classes equal: {report['classes_equal']}, max |box diff| {report['max_box_diff']}, "
        f"max |score diff| {report['max_score_diff']} -> {verdict}"
    )
    if status == 2:
        print(
            "Nothing was compared: no detection on the sample at MODEL.RETINANET.SCORE_THRESH_TEST="
            f"{cfg.MODEL.RETINANET.SCORE_THRESH_TEST}. Export again with a lower threshold (the "
            "exported model keeps it; 0.0 keeps every top-k detection) or another --sample-image."
        )
    return {"path": path, **report}


if __name__ == "__main__":
    setup_logger(name="focal_det2")  # the schemas and warnings on the console
    sys.exit(exit_status(main(sys.argv[1:])))
