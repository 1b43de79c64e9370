"""
Deployment: every loss's FocalRetinaNet scripts with Detectron2's
``scripting_with_instances`` and traces with ``TracingAdapter``; the file
saved with ``torch.jit.save`` and reloaded gives the eager model's
detections. And tools/export_model.py end to end on a tiny model.
"""

import logging

import numpy as np
import pytest
import torch
from conftest import LOSSES, REPO, build_loss, logged, tiny_cfg
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import build_model, detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.testing import convert_scripted_instances
from PIL import Image
from test_tools import load_tool

FIELDS = {"pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}


def closed_form_scores(loss, x):
    """
    (R, K) scores written out: softmax without the background column; FL*'s
    sigmoid(gamma x + beta) at gamma 1.5, beta 0.5; sigmoid for the others.
    """
    if loss == "softmax_focal":
        e = x.exp()
        return e[:, :-1] / e.sum(dim=1, keepdim=True)
    if loss == "focal_star":
        x = 1.5 * x + 0.5
    return 1 / (1 + (-x).exp())


@pytest.mark.parametrize("loss", LOSSES)
def test_score_module_equals_the_loss_scores_and_holds_no_state(loss):
    focal_loss = build_loss(loss, num_classes=3, gamma=1.5, beta=0.5)
    logits = torch.randn(7, focal_loss.num_logits, generator=torch.Generator().manual_seed(0))
    module = focal_loss.score_module()
    expected = closed_form_scores(loss, logits.double())
    torch.testing.assert_close(module(logits).double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module(logits), focal_loss.scores(logits), rtol=0, atol=0)
    assert not module.state_dict() and not list(module.parameters())
    torch.testing.assert_close(
        torch.jit.script(module)(logits), focal_loss.scores(logits), rtol=0, atol=0
    )


def _model_and_image(loss):
    """The tiny eval-mode model of ``loss`` keeping every candidate, and a seeded (3, 64, 96) image."""
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS = loss
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # untrained softmax scores lie far below 0.05
    torch.manual_seed(0)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    return build_model(cfg).eval(), image


def _assert_same_detections(expected, actual):
    assert len(expected) == len(actual) == 100  # the default detections per image
    assert torch.equal(actual.pred_classes.long(), expected.pred_classes)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-6, atol=1e-4
    )


def _reloaded(module, tmp_path):
    path = tmp_path / "model.ts"
    torch.jit.save(module, str(path))
    return torch.jit.load(str(path))


@pytest.mark.parametrize("loss", LOSSES)
def test_scripted_model_gives_the_eager_detections(loss, tmp_path):
    model, image = _model_and_image(loss)
    scripted = _reloaded(scripting_with_instances(model, FIELDS), tmp_path)
    with torch.no_grad():
        expected = model([{"image": image}])[0]["instances"]
        raw = convert_scripted_instances(scripted([{"image": image}])[0])
    _assert_same_detections(expected, detector_postprocess(raw, 64, 96))


@pytest.mark.parametrize("loss", LOSSES)
def test_traced_model_gives_the_eager_detections(loss, tmp_path):
    model, image = _model_and_image(loss)
    adapter = TracingAdapter(model, [{"image": image}])
    with torch.no_grad():
        traced = _reloaded(torch.jit.trace(adapter, (image,)), tmp_path)
        expected = model([{"image": image}])[0]["instances"]
        actual = adapter.outputs_schema(traced(image))[0]["instances"]
    _assert_same_detections(expected, actual)


def _landscape_png(path):
    """A 96 x 160 (H x W) noise image: not square, so H and W cannot be swapped unseen."""
    pixels = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize(
    "min_size, max_size, image_format, shape",
    [(64, 1000, "BGR", (3, 64, 107)), (128, 128, "RGB", (3, 77, 128))],  # short side, long side
)
def test_export_sample_image_is_detectron2s_test_time_input(
    tmp_path, min_size, max_size, image_format, shape
):
    """--sample-image is resized and read in INPUT.FORMAT as Detectron2's test-time
    DatasetMapper does it."""
    from detectron2.data import DatasetMapper

    tool = load_tool("export_model")
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min_size, max_size
    cfg.INPUT.FORMAT = image_format
    path = _landscape_png(tmp_path / "sample.png")
    image = tool.sample_image(cfg, path)
    record = {"file_name": path, "height": 96, "width": 160, "image_id": 0}
    assert image.shape == shape and image.dtype == torch.uint8
    assert torch.equal(image, DatasetMapper(cfg, is_train=False)(record)["image"])


def test_export_without_a_sample_image_or_test_set_is_refused():
    tool = load_tool("export_model")
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = ()
    with pytest.raises(ValueError, match="DATASETS.TEST is empty: pass --sample-image"):
        tool.sample_image(cfg)


@pytest.mark.parametrize("method", ["scripting", "tracing"])
def test_export_tool_end_to_end(method, tmp_path, capsys):
    """
    Freshly initialised weights (with the warning), seeded. Scripting on a landscape
    --sample-image (its postprocessing must not swap H and W), tracing on the first image of
    DATASETS.TEST.
    """
    tool = load_tool("export_model")
    config = str(REPO / "configs" / "digits" / "focal_star_R18_FPN_1x.yaml")
    sample = ["--sample-image", _landscape_png(tmp_path / "sample.png")]
    torch.manual_seed(0)
    with logged(logging.getLogger("focal_det2.export")) as warnings:
        report = tool.main(
            [
                *("--config-file", config, "--format", "torchscript"),
                *("--export-method", method, "--output", str(tmp_path)),
                *(sample if method == "scripting" else []),
                *("DATASETS.TEST", "('digits_val_tiny',)", "MODEL.FPN.OUT_CHANNELS", "64"),
                *("MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"),
            ]
        )
    assert [w.getMessage() for w in warnings] == [
        "MODEL.WEIGHTS is empty: exporting a freshly initialised model."
    ]
    assert (
        report["path"] == str(tmp_path / "model.ts") and (tmp_path / "model.ts").stat().st_size > 0
    )
    # the freshly initialised model at seed 0, SCORE_THRESH_TEST 0: DETECTIONS_PER_IMAGE after NMS
    assert report["detections"] == (100, 100)
    assert report["agree"] and report["classes_equal"]
    assert report["max_box_diff"] <= tool.TOLERANCE and report["max_score_diff"] <= tool.TOLERANCE
    out = capsys.readouterr().out
    assert f"(torchscript, {method}): 100 eager / 100 exported detections" in out
    assert out.rstrip().endswith("-> agree")
    # the file is the one the method writes: scripting takes the list of image dicts, tracing one tensor
    code = torch.jit.load(report["path"]).code
    assert ("inputs: List[Dict[str, Tensor]]" in code) == (method == "scripting"), code


def _detections(boxes, scores, classes):
    return Instances(
        (32, 32),
        pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float64)),
        scores=torch.tensor(scores, dtype=torch.float64),
        pred_classes=torch.tensor(classes, dtype=torch.int64),
    )


def test_export_tool_reports_disagreement():
    tool = load_tool("export_model")
    boxes = [[0.0, 0, 10, 10], [5, 5, 20, 20]]
    expected = _detections(boxes, [0.9, 0.5], [1, 2])
    assert tool.agreement(expected, expected)["agree"]
    report = tool.agreement(expected, _detections(boxes, [0.9, 0.4], [1, 2]))
    assert not report["agree"] and report["max_score_diff"] == pytest.approx(0.1)
    assert not tool.agreement(expected, expected[:1])["agree"]


def test_export_tool_agreement_needs_equal_classes_and_boxes_within_the_tolerance():
    tool = load_tool("export_model")
    boxes, tol = [[0.0, 0, 10, 10], [5, 5, 20, 20]], tool.TOLERANCE
    expected = _detections(boxes, [0.5, 0.0], [1, 2])
    report = tool.agreement(expected, _detections(boxes, [0.5, 0.0], [1, 3]))
    assert report == {
        "detections": (2, 2),
        "classes_equal": False,
        "max_box_diff": 0.0,
        "max_score_diff": 0.0,
        "agree": False,
    }
    moved = tool.agreement(
        expected, _detections([[0.0, 0, 10, 10], [5, 5, 20, 20.5]], [0.5, 0.0], [1, 2])
    )
    assert moved["classes_equal"] and moved["max_box_diff"] == 0.5 and not moved["agree"]
    # a score difference of exactly TOLERANCE agrees, twice it does not (exact in float64;
    # Boxes holds float32)
    at = tool.agreement(expected, _detections(boxes, [0.5, tol], [1, 2]))
    assert at["max_score_diff"] == tol and at["agree"]
    over = tool.agreement(expected, _detections(boxes, [0.5, 2 * tol], [1, 2]))
    assert over["max_score_diff"] == 2 * tol and not over["agree"]
    assert not tool.agreement(expected, _detections(boxes, [0.5, 1e-3], [1, 2]))["agree"]
    none = _detections([], [], [])
    assert tool.agreement(none, none) == {
        "detections": (0, 0),
        "classes_equal": True,
        "max_box_diff": 0.0,
        "max_score_diff": 0.0,
        "agree": True,
    }


def test_export_tool_exit_status_tells_nothing_compared_from_agreement():
    tool = load_tool("export_model")
    boxes = [[0.0, 0, 10, 10], [5, 5, 20, 20]]
    expected, none = _detections(boxes, [0.9, 0.5], [1, 2]), _detections([], [], [])
    assert tool.exit_status(tool.agreement(expected, expected)) == 0
    assert tool.exit_status(tool.agreement(expected, expected[:1])) == 1
    assert tool.exit_status(tool.agreement(expected, none)) == 1
    assert tool.exit_status(tool.agreement(none, none)) == 2  # no detection: nothing compared


def test_export_tool_says_when_nothing_was_compared(tmp_path, capsys):
    """Also: the default --export-method is scripting, and --output may be a new nested folder."""
    tool = load_tool("export_model")
    config = str(REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml")
    output = tmp_path / "new" / "export"
    report = tool.main(
        [
            *("--config-file", config, "--output", str(output)),
            *("DATASETS.TEST", "('digits_val_tiny',)", "MODEL.FPN.OUT_CHANNELS", "64"),
            *("MODEL.RETINANET.SCORE_THRESH_TEST", "1.0"),  # a sigmoid score never exceeds 1
        ]
    )
    assert report["detections"] == (0, 0) and tool.exit_status(report) == 2
    out = capsys.readouterr().out
    assert f"{report['path']} (torchscript, scripting): 0 eager / 0 exported" in out
    assert "-> nothing compared\n" in out and "agree" not in out  # not "agree" first
    assert report["path"].startswith(str(output))
    assert (
        "Nothing was compared: no detection on the sample at "
        "MODEL.RETINANET.SCORE_THRESH_TEST=1.0. Export again with a lower threshold"
    ) in out


def test_export_tool_refuses_an_unknown_export_method(tmp_path):
    with pytest.raises(
        ValueError, match=r"--export-method 'onnx': must be one of \['scripting', 'tracing'\]\."
    ):
        load_tool("export_model").export(tiny_cfg(), "onnx", str(tmp_path))
    assert not (tmp_path / "model.ts").exists()


def test_export_tool_replaces_no_model_without_overwrite(tmp_path):
    """An earlier export's model.ts is refused before the model is built; --output a file too."""
    tool = load_tool("export_model")
    (tmp_path / "model.ts").write_text("earlier")
    with pytest.raises(FileExistsError) as error:
        tool.export(tiny_cfg(), "scripting", str(tmp_path))
    assert str(error.value) == (
        f"--output {tmp_path} holds model.ts (an earlier export): pass --overwrite to replace "
        "it, or choose another --output."
    )
    assert (tmp_path / "model.ts").read_text() == "earlier"
    assert tool.model_path(str(tmp_path), overwrite=True) == str(tmp_path / "model.ts")
    with pytest.raises(NotADirectoryError, match=r"--output .*model.ts is a file; it must be a"):
        tool.model_path(str(tmp_path / "model.ts"))
    assert tool.get_parser().parse_args(["--config-file", "c", "--output", "o"]).overwrite is False
