"""
The model-zoo path: Detectron2 RetinaNet checkpoints, in the ``.pkl`` format
of Detectron2's model zoo, load into FocalRetinaNet through Detectron2's own
DetectionCheckpointer (as train_net.py loads MODEL.WEIGHTS), and the COCO
configs are Detectron2's retinanet_R_50_FPN_1x with our loss.

Nothing is downloaded: the checkpoints are written here from a Detectron2
``RetinaNet`` with its own random weights.
"""

import contextlib
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGURED_LOSSES, LOSSES, REPO, tiny_cfg
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from focal_det2 import FocalRetinaNet, add_focal_config, build_focal_loss

COCO_CONFIGS = sorted((REPO / "configs" / "coco").glob("*.yaml"))
CLASSIFIER = {"head.cls_score.weight", "head.cls_score.bias"}


@contextlib.contextmanager
def checkpointer_log():
    """Collects the messages of Detectron2's and fvcore's checkpointers (whatever their propagate flag)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    loggers = [
        logging.getLogger(n)
        for n in ("fvcore.common.checkpoint", "detectron2.checkpoint.detection_checkpoint")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture
def incompatible(monkeypatch):
    """Records what DetectionCheckpointer._load_model reports (missing, unexpected, incorrect shapes)."""
    reports = []
    load_model = DetectionCheckpointer._load_model

    def spy(self, checkpoint):
        reports.append(load_model(self, checkpoint))
        return reports[-1]

    monkeypatch.setattr(DetectionCheckpointer, "_load_model", spy)
    return reports


def retinanet_cfg(cfg):
    """The same model as ``cfg`` with Detectron2's RetinaNet as meta-architecture."""
    cfg = cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    return cfg


def write_model_zoo_pkl(model, path, legacy_anchors=False):
    """
    Writes ``model`` as Detectron2's model zoo publishes checkpoints: a
    pickle of {"model": {name: ndarray}, "__author__": "Detectron2 Model Zoo"}.
    With ``legacy_anchors``, also the ``anchor_generator.cell_anchors.*``
    buffers that checkpoints published before they became non-persistent carry.
    """
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if legacy_anchors:
        state.update(
            {
                f"anchor_generator.cell_anchors.{i}": a.numpy()
                for i, a in enumerate(model.anchor_generator.cell_anchors)
            }
        )
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    return str(path)


def load_weights(model, path):
    """MODEL.WEIGHTS loading as in train_net.py --eval-only (and DefaultTrainer.resume_or_load)."""
    with checkpointer_log() as messages:
        DetectionCheckpointer(model).resume_or_load(path, resume=False)
    return messages


def assert_equal_except(model, source_state, skipped=()):
    state = model.state_dict()
    assert set(state) == set(source_state)
    for name, value in state.items():
        if name not in skipped:
            assert torch.equal(value, source_state[name]), name


def assert_classifier_skipped(report, messages, model, source):
    """Only the softmax classifier was skipped, the log says which tensors and why, and it keeps its prior init."""
    assert {k for k, _, _ in report.incorrect_shapes} == CLASSIFIER
    assert set(report.missing_keys) == CLASSIFIER and report.unexpected_keys == []
    for name, shape_ckpt, shape_model in report.incorrect_shapes:
        assert shape_ckpt == tuple(source.state_dict()[name].shape)
        assert shape_model == tuple(model.state_dict()[name].shape)
        expected = (
            f"Skip loading parameter '{name}' to the model due to incompatible shapes: "
            f"{shape_ckpt} in the checkpoint but {shape_model} in the model"
        )
        assert any(expected in m for m in messages), messages
    assert any(
        "not found in the checkpoint" in m and "head.cls_score.{bias, weight}" in m
        for m in messages
    )
    assert_equal_except(model, source.state_dict(), skipped=CLASSIFIER)
    # The softmax prior, written out: per anchor K foreground logits 0 and background log(K (1 - pi) / pi).
    bias, k, pi = model.head.cls_score.bias.detach(), model.num_classes, 0.01
    assert len(bias) == model.anchor_generator.num_cell_anchors[0] * (k + 1)
    expected = torch.tensor([0.0] * k + [math.log(k * (1 - pi) / pi)]).repeat(len(bias) // (k + 1))
    torch.testing.assert_close(bias, expected)


def small_cfg():
    """conftest's R18-FPN FocalRetinaNet, keeping every detection (the random head scores about 0.01)."""
    cfg = tiny_cfg()
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    return cfg


@pytest.fixture(scope="module")
def zoo_checkpoint(tmp_path_factory):
    """A Detectron2 RetinaNet (R18-FPN, GN, 10 classes) and its model-zoo .pkl."""
    torch.manual_seed(0)
    source = build_model(retinanet_cfg(small_cfg())).eval()
    path = write_model_zoo_pkl(
        source, tmp_path_factory.mktemp("zoo") / "model_final.pkl", legacy_anchors=True
    )
    return source, path


def test_sigmoid_loads_model_zoo_pkl_with_no_missing_or_unexpected_keys(
    zoo_checkpoint, incompatible
):
    source, path = zoo_checkpoint
    torch.manual_seed(1)
    model = build_model(small_cfg())
    assert isinstance(model, FocalRetinaNet)
    messages = load_weights(model, path)
    (report,) = incompatible
    assert (
        report.missing_keys == [] and report.unexpected_keys == [] and report.incorrect_shapes == []
    )
    assert_equal_except(model, source.state_dict())
    assert "Reading a file from 'Detectron2 Model Zoo'" in messages
    assert not any("Skip loading" in m or "not found" in m or "not used" in m for m in messages), (
        messages
    )


def test_softmax_loads_model_zoo_pkl_except_the_classifier(zoo_checkpoint, incompatible):
    source, path = zoo_checkpoint
    cfg = small_cfg()
    cfg.MODEL.FOCAL.LOSS = "softmax_focal"
    model = build_model(cfg)
    messages = load_weights(model, path)
    (report,) = incompatible
    assert_classifier_skipped(report, messages, model, source)


def test_sigmoid_pth_into_softmax_config_loads_everything_else(tmp_path, incompatible):
    torch.manual_seed(0)
    source = build_model(small_cfg())
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("model_final")
    cfg = small_cfg()
    cfg.MODEL.FOCAL.LOSS = "softmax_focal"
    model = build_model(cfg)
    messages = load_weights(model, str(tmp_path / "model_final.pth"))
    (report,) = incompatible
    assert_classifier_skipped(report, messages, model, source)


def test_loaded_model_zoo_weights_give_retinanet_detections(zoo_checkpoint):
    source, path = zoo_checkpoint
    model = build_model(small_cfg()).eval()
    load_weights(model, path)
    torch.manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128) * 255}]
    with torch.no_grad():
        ours, theirs = model(inputs)[0]["instances"], source(inputs)[0]["instances"]
    assert len(theirs) > 0
    assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    assert torch.equal(ours.scores, theirs.scores) and torch.equal(
        ours.pred_classes, theirs.pred_classes
    )


# --- COCO configs ------------------------------------------------------------------


def coco_cfg(path):
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def detectron2_retinanet_r50_1x():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def only_keys_of(cfg, reference):
    """``cfg`` without the keys ``reference`` lacks (those focal_det2 adds)."""
    return {
        k: only_keys_of(v, reference[k]) if isinstance(v, dict) else v
        for k, v in cfg.items()
        if k in reference
    }


def test_coco_configs_exist_for_the_shipped_losses():
    losses = {coco_cfg(p).MODEL.FOCAL.LOSS for p in COCO_CONFIGS}
    assert losses == set(CONFIGURED_LOSSES) and losses <= set(LOSSES)


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: p.stem)
def test_coco_config_is_detectron2_retinanet_r50_1x_with_our_loss(path):
    cfg, reference = coco_cfg(path), detectron2_retinanet_r50_1x()
    assert cfg.MODEL.META_ARCHITECTURE == "FocalRetinaNet"
    assert (
        cfg.MODEL.WEIGHTS
        == reference.MODEL.WEIGHTS
        == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    )
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert {"coco_2017_train", "coco_2017_val"} <= set(
        DatasetCatalog.list()
    )  # Detectron2's registration
    assert cfg.OUTPUT_DIR == f"output/coco/{path.stem}"
    if cfg.MODEL.FOCAL.GAMMA_SCHEDULE.NAME != "constant":
        assert cfg.MODEL.FOCAL.GAMMA_SCHEDULE.ITERS == cfg.SOLVER.MAX_ITER // 2
    # every key Detectron2 knows has Detectron2's value; anchor sizes are written rounded to 2 decimals
    ours, theirs = cfg.clone(), reference.clone()
    for c in (ours, theirs):
        c.MODEL.META_ARCHITECTURE = c.OUTPUT_DIR = ""
    np.testing.assert_allclose(
        ours.MODEL.ANCHOR_GENERATOR.SIZES, theirs.MODEL.ANCHOR_GENERATOR.SIZES, rtol=1e-4
    )
    ours.MODEL.ANCHOR_GENERATOR.SIZES = theirs.MODEL.ANCHOR_GENERATOR.SIZES
    assert only_keys_of(ours, theirs) == theirs
    model = build_model(cfg)
    assert isinstance(model, FocalRetinaNet) and model.device.type == "cpu"
    assert type(model.focal_loss) is type(build_focal_loss(cfg))


@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
def test_coco_r50_model_zoo_pkl_loads(name, tmp_path, incompatible):
    reference = detectron2_retinanet_r50_1x()
    reference.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    source = build_model(reference)
    path = write_model_zoo_pkl(source, tmp_path / "retinanet_R_50_FPN_1x.pkl")
    model = build_model(coco_cfg(REPO / "configs" / "coco" / f"{name}_R50_FPN_1x.yaml"))
    messages = load_weights(model, path)
    (report,) = incompatible
    if name == "sigmoid_focal":
        assert (
            report.missing_keys == []
            and report.unexpected_keys == []
            and report.incorrect_shapes == []
        )
        assert_equal_except(model, source.state_dict())
    else:
        assert_classifier_skipped(report, messages, model, source)
    assert Path(path).stat().st_size > 100e6  # the full R50 RetinaNet, not a stub
