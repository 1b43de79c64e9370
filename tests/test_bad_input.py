"""
Bad input stops training with an error that names the file, the image id or
the key; valid corner cases (images without annotations, crowd boxes, a
batch with every anchor ignored) train.
"""

import copy
import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import (
    LOSSES,
    REPO,
    build_loss,
    cfg_value,
    digits_cfg,
    logged,
    reference_loss_cls,
    tiny_cfg,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image

from focal_det2.checkpoint import YACS_KEYS, checkpoint_to_load
from focal_det2.checks import check_cfg
from focal_det2.data.checks import check_dataset_dicts, load_checked_dataset_dicts
from focal_det2.engine import FocalTrainer

SIZE = 64


def _box(x, y, w, h, category=1, crowd=0):
    return dict(bbox=[x, y, w, h], category_id=category, iscrowd=crowd, area=w * h)


def _images(count):
    """``count`` image entries of a COCO json, with annotation lists to fill."""
    return [
        dict(id=i, file_name=f"{i:03d}.png", width=SIZE, height=SIZE) for i in range(1, count + 1)
    ]


@pytest.fixture
def coco(tmp_path, request):
    """
    Writes a COCO json and its images under tmp_path, registers them with
    register_coco_instances, and returns (name, json path, image dir).
    Call it with ``{image_id: [annotations]}`` and the number of images.
    """
    names = []

    def make(annotations_by_image, num_images=None, categories=(1, 2)):
        num_images = num_images or max(annotations_by_image, default=1)
        image_dir = tmp_path / "images"
        image_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        images = _images(num_images)
        for im in images:
            pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image_dir / im["file_name"])
        annotations = [
            dict(ann, id=len(names) * 1000 + i + 1, image_id=image_id)
            for i, (image_id, ann) in enumerate(
                (image_id, ann) for image_id, anns in annotations_by_image.items() for ann in anns
            )
        ]
        dataset = dict(
            images=images,
            annotations=annotations,
            categories=[dict(id=c, name=f"class{c}") for c in categories],
        )
        json_file = tmp_path / f"annotations{len(names)}.json"
        json_file.write_text(json.dumps(dataset))
        name = f"bad_input_{request.node.name}_{len(names)}"
        register_coco_instances(name, {}, str(json_file), str(image_dir))
        names.append(name)
        return name, json_file, image_dir

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(name, tmp_path, *opts):
    return digits_cfg(
        output_dir=tmp_path / "output",
        opts=[
            "DATASETS.TRAIN",
            (name,),
            "DATASETS.TEST",
            (),
            "INPUT.MIN_SIZE_TRAIN",
            (SIZE,),
            "INPUT.MAX_SIZE_TRAIN",
            SIZE,
            *opts,
        ],
    )


GOOD = [_box(4, 4, 20, 20)]


def test_category_not_in_the_json_names_json_annotation_and_image(coco, tmp_path):
    # annotation ids 1-3: the bad one's id (3) is not its image's id (2)
    name, json_file, _ = coco({1: GOOD + GOOD, 2: [_box(8, 8, 16, 16, category=7)]})
    with pytest.raises(ValueError) as error:
        FocalTrainer.build_train_loader(_cfg(name, tmp_path))
    message = str(error.value)
    assert str(json_file) in message and name in message
    assert "image id 2 (002.png)" in message
    assert "category_id 7" in message and "ids [1, 2]" in message


def test_class_beyond_num_classes_names_the_key(coco, tmp_path):
    name, json_file, _ = coco({1: [_box(4, 4, 20, 20, category=3)]}, categories=(1, 2, 3))
    with pytest.raises(ValueError) as error:
        FocalTrainer.build_train_loader(_cfg(name, tmp_path, "MODEL.RETINANET.NUM_CLASSES", 2))
    message = str(error.value)
    assert str(json_file) in message and "image id 1" in message and "001.png" in message
    assert "class 2 (category_id 3 in the json)" in message
    assert "MODEL.RETINANET.NUM_CLASSES=2" in message and "0..1" in message
    assert "3 thing_classes" in message  # the data set's count, against the key's 2


def test_negative_class_is_outside_the_classes(coco):
    """A record from a custom loader with contiguous class -1: the same error as for K and beyond."""
    name, _, _ = coco({1: GOOD})
    (record,) = DatasetCatalog.get(name)
    bad = dict(record, annotations=[dict(record["annotations"][0], category_id=-1)])
    with pytest.raises(
        ValueError, match=r"annotation 0: class -1 is outside the model's classes 0\.\.1"
    ):
        check_dataset_dicts([bad], dataset_name=name, num_classes=2)


NO_AREA = [(0, 10), (10, 0), (10, -3), (float("nan"), 10), (10, float("nan"))]


@pytest.mark.parametrize("crowd", [0, 1], ids=["box", "crowd box"])
@pytest.mark.parametrize("w, h", NO_AREA)
def test_box_without_positive_size(coco, tmp_path, w, h, crowd):
    name, json_file, _ = coco({1: GOOD, 3: [_box(8, 8, 16, 16), _box(30, 30, w, h, crowd=crowd)]})
    with pytest.raises(ValueError) as error:
        FocalTrainer.build_train_loader(_cfg(name, tmp_path))
    message = str(error.value)
    assert str(json_file) in message and "image id 3 (" in message and "003.png" in message
    assert "annotation 1" in message and "must be > 0" in message
    assert f"(XYWH_ABS) has width {w} and height {h};" in message  # XYWH: the size as given


def test_xyxy_box_size_is_its_corners_difference(coco):
    """
    A box in XYXY_ABS mode has width x1 - x0 and height y1 - y0: [30, 30, 20, 50] (valid as
    XYWH) has width -10 and raises; [4, 4, 24, 24] passes. Guards the mutant that reads
    every box as XYWH.
    """
    name, _, _ = coco({1: GOOD})
    (record,) = DatasetCatalog.get(name)
    ann = dict(record["annotations"][0], bbox_mode=BoxMode.XYXY_ABS)
    good = dict(record, annotations=[dict(ann, bbox=[4, 4, 24, 24])])
    check_dataset_dicts([good], dataset_name=name, num_classes=2)
    bad = dict(record, annotations=[dict(ann, bbox=[30, 30, 20, 50])])
    with pytest.raises(
        ValueError, match=r"\(XYXY_ABS\) has width -10 and height 20; both must be > 0"
    ):
        check_dataset_dicts([bad], dataset_name=name, num_classes=2)
    # the height from the y corners, whatever the x ones (x0 != y0)
    good = dict(record, annotations=[dict(ann, bbox=[20, 4, 30, 14])])
    check_dataset_dicts([good], dataset_name=name, num_classes=2)
    bad = dict(record, annotations=[dict(ann, bbox=[10, 40, 30, 35])])
    with pytest.raises(ValueError, match=r"\(XYXY_ABS\) has width 20 and height -5;"):
        check_dataset_dicts([bad], dataset_name=name, num_classes=2)
    # XYXY_REL too: corners in [0, 1], the width x1 - x0
    relative = dict(ann, bbox_mode=BoxMode.XYXY_REL)
    good = dict(record, annotations=[dict(relative, bbox=[0.1, 0.1, 0.4, 0.3])])
    check_dataset_dicts([good], dataset_name=name, num_classes=2)
    bad = dict(record, annotations=[dict(relative, bbox=[0.5, 0.5, 0.2, 0.9])])
    with pytest.raises(ValueError, match=r"\(XYXY_REL\) has width -0.3.* both must be > 0"):
        check_dataset_dicts([bad], dataset_name=name, num_classes=2)


@pytest.mark.parametrize("w, h", NO_AREA)
def test_degenerate_boxes_dropped_when_asked(coco, tmp_path, caplog, w, h):
    degenerate = _box(30, 30, w, h)
    name, _, _ = coco({1: GOOD + [degenerate], 3: [_box(8, 8, 16, 16), degenerate]})
    cfg = _cfg(name, tmp_path, "DATALOADER.DEGENERATE_BOXES", "drop", "SOLVER.IMS_PER_BATCH", 2)
    with caplog.at_level("WARNING"):
        batch = next(iter(FocalTrainer.build_train_loader(cfg)))
    assert {d["image_id"]: len(d["instances"]) for d in batch} == {1: 1, 3: 1}
    assert "dropped 2 boxes with width or height <= 0 or NaN" in caplog.text  # of both images


@pytest.mark.parametrize("filter_empty", [True, False])
def test_an_image_whose_boxes_are_all_dropped_is_filtered_as_an_empty_one(
    coco, tmp_path, filter_empty
):
    """
    With DATALOADER.FILTER_EMPTY_ANNOTATIONS (Detectron2's default), an image left without a
    box by the drop leaves the training set as an image without boxes does; without it, it
    stays as a background image. Every image emptied is an error naming the data set.
    """
    name, _, _ = coco({1: GOOD, 2: [_box(30, 30, 0, 10)], 3: []})
    records = load_checked_dataset_dicts(
        name, num_classes=2, filter_empty=filter_empty, degenerate_boxes="drop"
    )
    expected = {1: 1} if filter_empty else {1: 1, 2: 0, 3: 0}
    assert {r["image_id"]: len(r["annotations"]) for r in records} == expected
    name, _, _ = coco({1: [_box(30, 30, 0, 10)], 2: [_box(4, 4, 10, float("nan"))]})
    with pytest.raises(ValueError, match=re.escape(f"data set '{name}'") + ".*: no image is left"):
        load_checked_dataset_dicts(name, num_classes=2, degenerate_boxes="drop")


def test_the_classes_of_an_rcnn_model_are_its_roi_heads(coco, tmp_path):
    """
    Detectron2's GeneralizedRCNN trained by FocalTrainer: the data's classes must fit
    MODEL.ROI_HEADS.NUM_CLASSES, which the error names (not RetinaNet's key, which it does
    not read).
    """
    name, _, _ = coco({1: [_box(4, 4, 20, 20, category=3)]}, categories=(1, 2, 3))
    rcnn = ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.RETINANET.NUM_CLASSES", 2)
    FocalTrainer.build_train_loader(_cfg(name, tmp_path, *rcnn, "MODEL.ROI_HEADS.NUM_CLASSES", 3))
    with pytest.raises(ValueError, match=r"\(MODEL.ROI_HEADS.NUM_CLASSES=2; the data set has 3"):
        FocalTrainer.build_train_loader(
            _cfg(name, tmp_path, *rcnn, "MODEL.ROI_HEADS.NUM_CLASSES", 2)
        )


def test_the_loader_keeps_images_with_enough_keypoints_and_loads_proposals(coco, tmp_path):
    """
    As Detectron2's train loader: with MODEL.KEYPOINT_ON, an image with fewer visible
    keypoints than MIN_KEYPOINTS_PER_IMAGE is left out; with MODEL.LOAD_PROPOSALS, each
    record gets its proposals from its data set's DATASETS.PROPOSAL_FILES_TRAIN file, one
    file per data set.
    """
    two, one = [4, 4, 2, 8, 8, 2], [4, 4, 2, 8, 8, 0]  # visible keypoints: 2 and 1
    name, _, _ = coco(
        {
            1: [dict(_box(4, 4, 20, 20), keypoints=two, num_keypoints=2)],
            2: [dict(_box(4, 4, 20, 20), keypoints=one, num_keypoints=1)],
        }
    )
    MetadataCatalog.get(name).set(keypoint_names=["a", "b"], keypoint_flip_map=[("a", "b")])
    keypoints = ("MODEL.KEYPOINT_ON", True, "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE", 2)
    loader = FocalTrainer.build_train_loader(_cfg(name, tmp_path, *keypoints))
    assert [r["image_id"] for r in loader.dataset] == [1]
    proposals = tmp_path / "proposals.pkl"
    boxes = [np.array([[0, 0, 8, 8], [2, 2, 9, 9]], dtype=np.float32)] * 2
    scores = [np.array([0.1, 0.9], dtype=np.float32)] * 2
    proposals.write_bytes(
        pickle.dumps({"ids": [1, 2], "boxes": boxes, "objectness_logits": scores})
    )
    load = ("MODEL.LOAD_PROPOSALS", True, "DATASETS.PROPOSAL_FILES_TRAIN", (str(proposals),))
    loader = FocalTrainer.build_train_loader(_cfg(name, tmp_path, *load))
    assert [r["proposal_boxes"].tolist() for r in loader.dataset] == [
        [[2, 2, 9, 9], [0, 0, 8, 8]]
    ] * 2
    both = (*load[:3], (str(proposals), str(proposals)))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "DATASETS.PROPOSAL_FILES_TRAIN (MODEL.LOAD_PROPOSALS True) has 2 files for the 1 data sets "
            "of DATASETS.TRAIN: one each."
        ),
    ):
        FocalTrainer.build_train_loader(_cfg(name, tmp_path, *both))


def test_drop_takes_records_without_annotations(coco):
    """A custom loader's image-only record (no "annotations" key) passes the drop as it is."""
    name, _, _ = coco({1: GOOD})
    (record,) = DatasetCatalog.get(name)
    bare = {k: v for k, v in record.items() if k != "annotations"}
    check_dataset_dicts([bare], dataset_name=name, num_classes=2, degenerate_boxes="drop")
    assert "annotations" not in bare


def test_drop_without_degenerate_boxes_says_nothing(coco, tmp_path, caplog):
    name, _, _ = coco({1: GOOD, 2: GOOD})
    cfg = _cfg(name, tmp_path, "DATALOADER.DEGENERATE_BOXES", "drop")
    with caplog.at_level("WARNING"):
        FocalTrainer.build_train_loader(cfg)
    assert "dropped" not in caplog.text


def test_unknown_degenerate_boxes_option_names_the_key(coco, tmp_path):
    name, _, _ = coco({1: GOOD})
    with pytest.raises(
        ValueError, match=r"DATALOADER.DEGENERATE_BOXES='skip'; allowed: \['error', 'drop'\]"
    ):
        FocalTrainer.build_train_loader(_cfg(name, tmp_path, "DATALOADER.DEGENERATE_BOXES", "skip"))


def test_missing_image_file(coco, tmp_path):
    name, json_file, image_dir = coco({1: GOOD, 2: GOOD})
    (image_dir / "002.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        FocalTrainer.build_train_loader(_cfg(name, tmp_path))
    message = str(error.value)
    assert (
        str(json_file) in message
        and "image id 2" in message
        and str(image_dir / "002.png") in message
    )


def test_image_file_removed_after_the_check(coco, tmp_path):
    """
    Guards the mutant: ``CheckedDatasetMapper`` catches ``KeyError`` instead of
    ``FileNotFoundError`` (a file gone after the start-up check is reported as
    unreadable, or not with its id and file).
    """
    name, _, image_dir = coco({1: GOOD})
    loader = FocalTrainer.build_train_loader(_cfg(name, tmp_path, "SOLVER.IMS_PER_BATCH", 1))
    (image_dir / "001.png").unlink()  # after the loader checked that it exists
    expected = f"image id 1 ({image_dir / '001.png'}): the image file does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        next(iter(loader))


def test_unreadable_image_file(coco, tmp_path):
    name, _, image_dir = coco({1: GOOD})
    (image_dir / "001.png").write_bytes(b"this is not a png")
    loader = FocalTrainer.build_train_loader(_cfg(name, tmp_path, "SOLVER.IMS_PER_BATCH", 1))
    with pytest.raises(
        ValueError, match=re.escape(f"image id 1 ({image_dir / '001.png'}): cannot read")
    ):
        next(iter(loader))


def test_training_sets_with_other_classes_are_refused(coco, tmp_path):
    """
    Several DATASETS.TRAIN must share thing_classes (their contiguous ids mean the same
    classes): sets with classes (class1, class2) and (class1, class3) raise Detectron2's
    metadata error when the loader is built; two sets with the same classes build.
    Guards the mutant that drops ``check_metadata_consistency`` in build_train_loader.
    """
    first, _, _ = coco({1: GOOD}, categories=(1, 2))
    same, _, _ = coco({1: GOOD}, categories=(1, 2))
    other, _, _ = coco({1: GOOD}, categories=(1, 3))
    FocalTrainer.build_train_loader(_cfg(first, tmp_path, "DATASETS.TRAIN", (first, same)))
    with pytest.raises(ValueError, match="different metadata 'thing_classes'"):
        FocalTrainer.build_train_loader(_cfg(first, tmp_path, "DATASETS.TRAIN", (first, other)))


@pytest.mark.parametrize("filter_empty", [True, False])
def test_images_without_annotations_and_crowd_boxes_train(coco, tmp_path, filter_empty):
    crowd = _box(40, 40, 20, 20, category=2, crowd=1)
    name, _, _ = coco({1: GOOD, 2: [], 3: [crowd], 4: [_box(2, 30, 12, 30), crowd]}, num_images=4)
    # Image id -> boxes the model sees: crowd boxes are ignored.
    expected = {1: 1, 4: 1} if filter_empty else {1: 1, 2: 0, 3: 0, 4: 1}
    # One batch holds every kept image, so each of them goes through the model.
    opts = [
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
        filter_empty,
        "SOLVER.IMS_PER_BATCH",
        len(expected),
    ]
    cfg = _cfg(name, tmp_path, *opts, "SOLVER.MAX_ITER", 1)
    batch = next(iter(FocalTrainer.build_train_loader(cfg)))
    assert {d["image_id"]: len(d["instances"]) for d in batch} == expected
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = copy.deepcopy(trainer.model)
    trainer.train()
    # The one iteration's loss is the reference formula on the batch, with the weights it started from.
    ((loss_cls, iteration),) = trainer.storage.history("loss_cls").values()
    assert iteration == 0
    assert loss_cls == pytest.approx(
        reference_loss_cls(initial, batch, "sigmoid_focal", gamma=2.0), rel=1e-5
    )
    assert all(np.isfinite(v) for v, _ in trainer.storage.history("total_loss").values())


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bad", [-2, 4, 100])
def test_labels_outside_minus_one_to_k_raise(loss, bad):
    focal_loss = build_loss(loss, 3)
    logits = torch.zeros(4, focal_loss.num_logits)
    beyond = (  # a class id past K: the data's classes do not fit the model's
        ": the data has classes beyond the model's NUM_CLASSES=3 (MODEL.RETINANET.NUM_CLASSES; a "
        "LazyConfig's model.num_classes)."
    )
    expected = "labels must be in [-1, 3] (-1 ignored, 3 background), got values in " + (
        f"[-1, {bad}]{beyond}" if bad > 3 else f"[{bad}, 3]."
    )
    with pytest.raises(ValueError) as error:
        focal_loss(logits, torch.tensor([0, 3, -1, bad]))
    assert str(error.value) == expected
    focal_loss(logits, torch.tensor([0, 3, -1, 2]))  # the bounds themselves are valid


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("num_anchors", [0, 5])
def test_every_anchor_ignored_gives_zero_loss_on_the_graph(loss, num_anchors):
    focal_loss = build_loss(loss, 10)
    logits = torch.randn(num_anchors, focal_loss.num_logits, requires_grad=True)
    value = focal_loss(logits, torch.full((num_anchors,), -1))
    assert value.shape == () and value.item() == 0.0
    assert value.requires_grad
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("loss", ["sigmoid_focal", "softmax_focal"])  # K and K+1 logits
def test_model_with_every_anchor_ignored_gives_zero_loss_on_the_graph(loss):
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.LOSS = loss
    model = build_model(cfg)
    images = model.preprocess_image([{"image": torch.rand(3, SIZE, SIZE) * 255}])
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    pred_logits, pred_deltas = model._transpose_dense_predictions(
        model.head(features), [model.num_logits, 4]
    )
    anchors = model.anchor_generator(features)
    num_anchors = sum(len(a) for a in anchors)
    gt_labels = [torch.full((num_anchors,), -1)]
    gt_boxes = [torch.zeros(num_anchors, 4)]
    with EventStorage(0):
        losses = model.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
    total = sum(losses.values())
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    grad = model.head.cls_score.weight.grad
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


# --- a rejected run writes nothing; every mistake names its key or file -----------------


def _args(*argv):
    from detectron2.engine import default_argument_parser

    return default_argument_parser().parse_args([str(a) for a in argv])


def _trained_run_dir(tmp_path):
    """An OUTPUT_DIR as a finished training leaves it (config.yaml, inference/, weights), and its config file."""
    run = tmp_path / "run"
    (run / "inference").mkdir(parents=True)
    cfg = digits_cfg(output_dir=run)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    (run / "config.yaml").write_text(cfg.dump())
    (run / "inference" / "coco_instances_results.json").write_text("[]")
    torch.save({"model": build_model(cfg).state_dict(), "iteration": 2}, run / "model_final.pth")
    (run / "last_checkpoint").write_text("model_final.pth")
    return run, config


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.FOCAL.CLASS_ALPHA", "[-1,-1,-1,-1,-1,-1,-1,-1,-1,-1]"], "MODEL.FOCAL.CLASS_ALPHA"),
        (["MODEL.FOCAL.GAMMA", "-1.0"], "MODEL.FOCAL.GAMMA=-1.0"),
        (["DATALOADER.DEGENERATE_BOXES", "skip"], "DATALOADER.DEGENERATE_BOXES='skip'"),
        # Detectron2 would evaluate with TTA (GeneralizedRCNN) or refuse (RetinaNet): never silent
        (["TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED=True: train_net.py has no test-time"),
        # RetinaNet builds with these and fails at the first training step, after writing
        (
            ["MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2"],
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE='l2' is not one of ['smooth_l1', 'giou', 'diou', "
            "'ciou'].",
        ),  # fmt: skip
        (
            ["MODEL.ANCHOR_GENERATOR.NAME", "RotatedAnchorGenerator"],
            "MODEL.ANCHOR_GENERATOR.NAME=RotatedAnchorGenerator gives 5-value anchors; RetinaNet's "
            "matcher and box transform take 4-value (XYXY) boxes: use DefaultAnchorGenerator.",
        ),  # fmt: skip
        # a ZeroDivisionError in the head's build (RetinaNet: a conv error at the first step)
        (
            ["MODEL.RETINANET.NUM_CLASSES", "0"],
            "MODEL.RETINANET.NUM_CLASSES=0 must be an integer >= 1.",
        ),  # fmt: skip
        (
            ["MODEL.BACKBONE.NAME", "no_such_backbone"],
            "no_such_backbone",
        ),  # Detectron2 checks it when building
        (  # Detectron2 would find it after training, at the final evaluation
            ["DATASETS.TEST", "('digits_vall_tiny',)"],
            "DATASETS.TEST: 'digits_vall_tiny' is not a registered data set; did you mean "
            "'digits_val_tiny' or 'digits_val_lt'? (register your own with DatasetCatalog before "
            "the run is set up).",
        ),
        (
            ["DATASETS.TRAIN", "('no_such_set',)"],
            "DATASETS.TRAIN: 'no_such_set' is not a registered data set (register your own",
        ),
        pytest.param(
            ["MODEL.DEVICE", "cuda:1"],  # any CUDA device
            "MODEL.DEVICE=cuda:1, but PyTorch sees no CUDA device here (torch.cuda.is_available() "
            "is False): set MODEL.DEVICE cpu.",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA"),
        ),
    ],
)
def test_rejected_run_leaves_output_dir_as_it_was(tmp_path, loggers, opts, message):
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    before = _snapshot(run)
    with pytest.raises(Exception, match=re.escape(message)):
        setup_cfg(_args("--config-file", config, *opts))
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FOCAL_DET2_BACKEND": "eagr"}, "FOCAL_DET2_BACKEND='eagr': allowed values are eager, "
         "triton, compile. The run trains on MODEL.DEVICE=cpu."),
        ({"FOCAL_DET2_BACKEND": "triton"}, "FOCAL_DET2_BACKEND=triton: Triton kernels run on "
         "CUDA tensors, these are on cpu"),
        ({"FOCAL_DET2_COMPILE": "1"}, "FOCAL_DET2_COMPILE is no longer read"),
    ],
)  # fmt: skip
def test_a_backend_the_loss_would_refuse_is_named_before_writing(
    tmp_path, loggers, monkeypatch, env, message
):
    """The fused losses refused it at the first iteration, after config.yaml, log.txt and
    metrics.json (which then block the corrected run); an evaluation calls no loss."""
    from focal_det2.engine import setup_cfg

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(digits_cfg(output_dir=tmp_path / "run").dump())
    with pytest.raises(ValueError, match=re.escape(message)):
        setup_cfg(_args("--config-file", config))
    assert not (tmp_path / "run").exists()
    weights = tmp_path / "weights.pth"
    torch.save({"model": build_model(digits_cfg()).state_dict()}, weights)
    setup_cfg(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights))


def test_missing_data_set_files_are_named_before_writing(tmp_path, loggers):
    """Detectron2's loader named the file after config.yaml and log.txt; COCO's builtin sets
    add where Detectron2 looks for them."""
    from focal_det2.engine import setup_cfg

    name = "missing_files_set"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(tmp_path / "none.json"), str(tmp_path / "images"))
    config = tmp_path / "config.yaml"
    config.write_text(digits_cfg(output_dir=tmp_path / "run").dump())
    with pytest.raises(FileNotFoundError) as info:
        setup_cfg(_args("--config-file", config, "DATASETS.TEST", f"('{name}',)"))
    assert str(info.value).startswith(f"DATASETS.TEST: data set '{name}' reads its json_file ")
    assert str(info.value).endswith("none.json, which does not exist.")
    assert not (tmp_path / "run").exists()
    # a digits set not generated yet writes its files when first loaded: not missing
    from focal_det2.data.digits import register_digits

    fresh = f"digits_not_generated_{tmp_path.name}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FOCAL_DET2_DATASETS", str(tmp_path / "cache"))
        register_digits(fresh, split="val", num_images=2)
    assert not os.path.exists(MetadataCatalog.get(fresh).json_file)
    setup_cfg(_args("--config-file", config, "DATASETS.TEST", f"('{fresh}',)"))
    assert (tmp_path / "run").exists()  # set up: now written
    coco = MetadataCatalog.get("coco_2017_train").json_file
    if not os.path.exists(coco):  # a machine without COCO
        with pytest.raises(FileNotFoundError, match=r"set it to the folder that holds them"):
            setup_cfg(_args("--config-file", config, "DATASETS.TRAIN", "('coco_2017_train',)"))


def test_a_gamma_schedule_past_max_iter_is_a_warning_of_the_training_run(tmp_path, loggers):
    """A linear ramp of 500 iterations in a run of 2 would train at gamma 0.004 without a word."""
    import logging

    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    ramp = ["MODEL.FOCAL.GAMMA_SCHEDULE.NAME", "linear", "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS", 500]
    opts = ["SOLVER.MAX_ITER", 2, *ramp]
    with logged(logging.getLogger("focal_det2")) as records:
        setup_cfg(_args("--config-file", config, *opts, "OUTPUT_DIR", tmp_path / "short"))
    messages = [r.getMessage() for r in records]
    assert any(
        m.startswith("MODEL.FOCAL.GAMMA_SCHEDULE LinearGamma(")
        and "does not reach MODEL.FOCAL.GAMMA=2.0 by SOLVER.MAX_ITER=2: training ends at gamma 0.004."
        in m
        for m in messages
    ), messages
    with logged(logging.getLogger("focal_det2")) as records:  # evaluation trains nothing
        weights = ["MODEL.WEIGHTS", run / "model_final.pth"]
        setup_cfg(_args("--config-file", config, "--eval-only", *opts, *weights))
    assert not any("does not reach" in r.getMessage() for r in records)


def test_evaluation_reads_only_the_test_sets(tmp_path, loggers):
    """--eval-only builds no training loader: an unregistered DATASETS.TRAIN does not stop it."""
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    argv = ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", run / "model_final.pth"]
    cfg = setup_cfg(_args(*argv, "DATASETS.TRAIN", "('no_such_set',)"))
    assert cfg.DATASETS.TRAIN == ("no_such_set",)
    with pytest.raises(KeyError, match="DATASETS.TEST: 'no_such_set' is not a registered"):
        setup_cfg(_args(*argv, "DATASETS.TEST", "('no_such_set',)"))


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, loggers):
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    before = _snapshot(run)
    with pytest.raises(FileExistsError) as info:
        setup_cfg(_args("--config-file", config, "MODEL.FOCAL.LOSS", "softmax_focal"))
    assert str(info.value).startswith(
        f"OUTPUT_DIR {run} holds a training run (last_checkpoint, model_final.pth)"
    )
    assert (
        "Pass --resume to continue it (a larger SOLVER.MAX_ITER extends a finished run), "
        "set OUTPUT_DIR to another folder, or delete this one." in str(info.value)
    )
    assert _snapshot(run) == before
    # another folder trains
    cfg = setup_cfg(_args("--config-file", config, "OUTPUT_DIR", tmp_path / "other"))
    assert cfg.OUTPUT_DIR == str(tmp_path / "other")


RESUMABLE = "which a new run would overwrite. Pass --resume to continue it"
NO_CHECKPOINT = (
    "holds the metrics.json of a run that saved no checkpoint, which a new run would append to "
    "(--resume would too, from scratch). Delete metrics.json, or set OUTPUT_DIR to another folder."
)


@pytest.mark.parametrize(
    "files, refused",
    [
        # killed before its first checkpoint: nothing to resume
        ({"metrics.json": '{"iteration": 19}\n'}, NO_CHECKPOINT),
        ({"model_0000019.pth": "x"}, "(model_0000019.pth), " + RESUMABLE),
        ({"last_checkpoint": "model_0000019.pth"}, "(last_checkpoint), " + RESUMABLE),
        (
            {"metrics.json": '{"iteration": 19}\n', "model_0000019.pth": "x"},
            "(metrics.json, model_0000019.pth), " + RESUMABLE,
        ),
        ({"metrics.json": "", "config.yaml": "x", "log.txt": "x"}, None),  # stopped at once
        ({"weights.pth": "x", "model_best.pth": "x"}, None),  # not names Detectron2 writes
    ],
    ids=["metrics", "periodic-checkpoint", "last-checkpoint", "both", "no-iteration", "other"],
)
def test_the_files_that_make_a_folder_a_run(tmp_path, files, refused):
    from focal_det2.checkpoint import check_output_dir_free

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if refused:
        with pytest.raises(FileExistsError, match=re.escape(refused)):
            check_output_dir_free(str(tmp_path))
    else:
        check_output_dir_free(str(tmp_path))
    check_output_dir_free(str(tmp_path / "missing"))


def test_eval_only_writes_into_its_own_folder_and_resume_still_works(tmp_path, loggers):
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    before = _snapshot(run)
    weights = run / "model_final.pth"
    cfg = setup_cfg(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights))
    assert cfg.OUTPUT_DIR == str(run / "eval" / "model_final") and cfg.MODEL.WEIGHTS == str(weights)
    assert cfg.is_frozen()  # as Detectron2's own setup returns it
    assert (run / "eval" / "model_final" / "config.yaml").exists()
    assert {p: b for p, b in _snapshot(run).items() if p.parts[0] != "eval"} == before
    # --resume --eval-only evaluates the checkpoint last_checkpoint names
    cfg = setup_cfg(_args("--config-file", config, "--eval-only", "--resume"))
    assert cfg.MODEL.WEIGHTS == str(weights)
    # another run's model_final.pth: a folder of its own, not this run's eval/model_final
    other = tmp_path / "other_run" / "model_final.pth"
    other.parent.mkdir()
    other.write_bytes(weights.read_bytes())
    cfg = setup_cfg(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", other))
    assert cfg.OUTPUT_DIR == str(run / "eval" / "other_run-model_final")
    # a training --resume writes its config into OUTPUT_DIR, as in Detectron2
    cfg = setup_cfg(_args("--config-file", config, "--resume", "SOLVER.MAX_ITER", 4))
    assert cfg.OUTPUT_DIR == str(run) and "MAX_ITER: 4" in (run / "config.yaml").read_text()


def test_eval_folder_of_a_relative_output_dirs_own_checkpoint_has_no_prefix(tmp_path, monkeypatch):
    """
    OUTPUT_DIR and MODEL.WEIGHTS given relative to the working directory (``output``,
    ``output/model_final.pth``) are this run's own checkpoint: ``eval/model_final``, not
    ``eval/output-model_final``. Guards the mutant that compares the checkpoint's real folder
    with OUTPUT_DIR as written (without ``realpath``).
    """
    from focal_det2.checkpoint import evaluation_output_dir

    monkeypatch.chdir(tmp_path)
    own = os.path.join("output", "model_final.pth")
    assert evaluation_output_dir(own, "output", resume=False) == os.path.join(
        "output", "eval", "model_final"
    )
    other = os.path.join("other_run", "model_0000009.pth")
    assert evaluation_output_dir(other, "output", resume=False) == os.path.join(
        "output", "eval", "other_run-model_0000009"
    )


def test_eval_folder_of_a_url_checkpoint_is_its_name(tmp_path):
    """
    A checkpoint at a URL has no local folder to name: ``eval/<checkpoint name>``. Guards the
    mutant that drops the URL check (the URL's last path segment, taken as a local folder
    relative to the working directory, would prefix the name).
    """
    from focal_det2.checkpoint import evaluation_output_dir

    url = "https://example.com/detectron2/models/model_final_5bd44e.pkl"
    assert evaluation_output_dir(url, str(tmp_path), resume=False) == str(
        tmp_path / "eval" / "model_final_5bd44e"
    )


@pytest.mark.parametrize("mode", ["--eval-only", "--resume"])
def test_a_checkpoint_of_another_loss_is_refused_before_writing(tmp_path, loggers, mode):
    """
    Evaluating or resuming a sigmoid_focal run with softmax_focal: Detectron2 would skip the
    classifier (another shape) with a warning, and write its config, log and results over the
    run's (a resumed run's config.yaml and metrics.json, an evaluation's eval/ folder).
    """
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    before = _snapshot(run)
    argv = ["--config-file", config, mode, "MODEL.FOCAL.LOSS", "softmax_focal"]
    if mode == "--eval-only":
        argv += ["MODEL.WEIGHTS", run / "model_final.pth"]
    with pytest.raises(ValueError) as error:
        setup_cfg(_args(*argv))
    message = str(error.value)
    assert message.startswith(
        f"{run / 'model_final.pth'} does not fit the model of this config: head.cls_score.weight"
    ), message
    consequence = "Evaluating would score" if mode == "--eval-only" else "Resuming would go on"
    assert "Use the config the checkpoint was trained with (its run's config.yaml)" in message
    assert consequence in message and "MODEL.FOCAL.LOSS (softmax_focal" in message
    assert _snapshot(run) == before and not (run / "eval").exists()
    # a fresh run's start (MODEL.WEIGHTS, no last_checkpoint) is not held to the model: a
    # backbone's weights train a new detector
    fresh = tmp_path / "fresh"
    argv = ["--config-file", config, "--resume", "OUTPUT_DIR", fresh, "MODEL.FOCAL.LOSS"]
    cfg = setup_cfg(_args(*argv, "softmax_focal", "MODEL.WEIGHTS", run / "model_final.pth"))
    assert cfg.OUTPUT_DIR == str(fresh)


@pytest.mark.parametrize("resume", [False, True])
def test_eval_only_without_weights_is_refused(tmp_path, loggers, resume):
    from focal_det2.engine import setup_cfg

    config = tmp_path / "config.yaml"
    config.write_text(digits_cfg(output_dir=tmp_path / "empty").dump())
    argv = ["--config-file", config, "--eval-only"] + (["--resume"] if resume else [])
    folder = f" and {tmp_path / 'empty'} has no last_checkpoint" if resume else ""
    other = (  # --resume given already: not suggested again
        "or set OUTPUT_DIR to the folder of a training run."
        if resume
        else "or --resume to evaluate OUTPUT_DIR's last checkpoint."
    )
    expected = (
        f"--eval-only needs a trained model: MODEL.WEIGHTS is empty{folder}. Pass MODEL.WEIGHTS "
        f"<file>.pth (e.g. OUTPUT_DIR/model_final.pth), {other}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        setup_cfg(_args(*argv))
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.FOCAL.GAMMA", float("nan")),
        ("MODEL.FOCAL.GAMMA", float("inf")),
        ("MODEL.FOCAL.STAR_BETA", float("-inf")),
        ("MODEL.FOCAL.PRIOR_PROB", float("nan")),
        ("MODEL.FOCAL.GAMMA_SCHEDULE.START", float("nan")),
        ("SOLVER.BASE_LR", float("nan")),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, float("inf"), 2.0]]),
        ("MODEL.RETINANET.BBOX_REG_WEIGHTS", (1.0, 1.0, float("nan"), 1.0)),  # a tuple key
    ],
)
def test_non_finite_float_keys_are_named(key, value):
    """A run refuses them all; the model's own build (build_model, DefaultPredictor) refuses
    those of MODEL, and leaves the others, which it does not read, to the run's check."""
    cfg = tiny_cfg()
    cfg.merge_from_list([key, value])
    assert type(cfg_value(cfg, key)) is type(value)  # a list stays a list, a tuple a tuple
    with pytest.raises(ValueError, match=re.escape(key) + r"=.* is not finite"):
        check_cfg(cfg)
    if key.startswith("MODEL."):
        with pytest.raises(ValueError, match=re.escape(key) + r"=.* is not finite"):
            build_model(cfg)
    else:
        build_model(cfg)


def test_nan_where_infinity_is_not_allowed_asks_for_a_finite_number():
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.GAMMA = float("nan")
    with pytest.raises(
        ValueError, match=r"MODEL.FOCAL.GAMMA=nan is not finite; it must be a finite number"
    ):
        build_model(cfg)


def test_infinity_where_detectron2_means_it():
    cfg = tiny_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = float("inf")  # the L-inf norm
    check_cfg(cfg)
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = float("nan")
    with pytest.raises(
        ValueError, match=r"NORM_TYPE=nan is not finite; it must be a number or inf"
    ):
        check_cfg(cfg)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int32])
def test_labels_of_another_dtype_are_named(loss, dtype):
    focal_loss = build_loss(loss, 10)
    with pytest.raises(
        TypeError, match=re.escape("labels must be an int64 tensor") + ".*" + re.escape(str(dtype))
    ):
        focal_loss(torch.zeros(2, focal_loss.num_logits), torch.tensor([0, 1]).to(dtype))


@pytest.mark.parametrize("loss", LOSSES)
def test_logits_of_another_width_are_named(loss):
    """
    Logits with one column too many or too few raise, naming the (N, num_logits) shape the
    loss expects. Guards the mutant that checks only ``logits.dim() != 2``.
    """
    focal_loss = build_loss(loss, 3)
    width = focal_loss.num_logits
    labels = torch.tensor([0, 3])
    for bad in (width - 1, width + 1):
        with pytest.raises(
            ValueError, match=re.escape(f"expects logits of shape (N, {width}), got (2, {bad})")
        ):
            focal_loss(torch.zeros(2, bad), labels)


@pytest.mark.parametrize("loss", LOSSES)
def test_logits_of_another_rank_and_labels_of_another_shape_are_named(loss):
    """(N, num_logits) logits and (N,) labels: 1-D or 3-D logits, and (N, 1) labels, raise
    naming the shape expected."""
    focal_loss = build_loss(loss, 3)
    width = focal_loss.num_logits
    labels = torch.tensor([0, 3])
    for shape in ((width,), (1, 2, width)):
        with pytest.raises(ValueError, match=re.escape(f"expects logits of shape (N, {width})")):
            focal_loss(torch.zeros(shape), labels)
    with pytest.raises(ValueError, match=re.escape("labels must have shape (2,), got (2, 1)")):
        focal_loss(torch.zeros(2, width), labels[:, None])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("num_labels", [1, 3])
def test_labels_of_another_length_are_named(loss, num_labels):
    """
    One label per logits row: a labels vector of another length raises, naming both
    lengths. Guards the mutant that drops the ``labels.shape != logits.shape[:1]`` check.
    """
    focal_loss = build_loss(loss, 3)
    labels = torch.tensor([0, 3, 1])[:num_labels]
    with pytest.raises(
        ValueError, match=re.escape(f"labels must have shape (2,), got ({num_labels},)")
    ):
        focal_loss(torch.zeros(2, focal_loss.num_logits), labels)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "gamma, error",
    [
        ("abc", TypeError),
        (None, None),
        (True, TypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
    ],
)
def test_gamma_override_must_be_a_finite_number(loss, gamma, error):
    focal_loss = build_loss(loss, 10)
    args = (torch.zeros(2, focal_loss.num_logits), torch.tensor([0, 1]))
    if error is None:
        focal_loss(*args, gamma=gamma)
        return
    with pytest.raises(
        error, match=re.escape(f"gamma={gamma!r}" if error is TypeError else f"gamma={gamma}")
    ):
        focal_loss(*args, gamma=gamma)


@pytest.mark.parametrize(
    "url", ["detectron2://ImageNetPretrained/MSRA/R-50.pkl", "https://example.com/model.pth"]
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_url_in_model_weights_is_loaded_as_given(tmp_path, url, resume):
    """
    MODEL.WEIGHTS that is a URL (the model zoo's ``detectron2://`` ImageNet weights) is
    not a local file: ``checkpoint_to_load`` returns it unchanged (Detectron2 downloads
    it), with or without --resume when there is no last_checkpoint. Guards the mutant
    that drops ``"://" in weights`` (a FileNotFoundError for every URL).
    """
    assert checkpoint_to_load(str(tmp_path), url, resume) == url


def test_weights_at_a_url_that_cannot_be_fetched_say_what_to_pass_instead(tmp_path):
    """
    The COCO configs start from Detectron2's ImageNet weights at a URL: without network,
    urllib's error names neither the key nor what to do. train_net.py's setup (YAML and
    LazyConfig) downloads it before anything is written; a trainer used on its own names it
    as it loads. (A refused local port stands for a machine without network.)
    """
    from focal_det2.engine import setup_cfg
    from focal_det2.lazy import setup_lazy_cfg

    url = "http://127.0.0.1:9/R-50.pth"
    advice = (
        f"{url} is a URL (MODEL.WEIGHTS): without network, download it elsewhere and pass the "
        'file (MODEL.WEIGHTS <file>), or MODEL.WEIGHTS "" to start from random weights.'
    )
    trainer = FocalTrainer(digits_cfg(output_dir=tmp_path, opts=["MODEL.WEIGHTS", url]))
    with pytest.raises(OSError) as error:
        trainer.resume_or_load(resume=False)
    assert error.value.__notes__ == [f"while loading the checkpoint {url}", advice]
    # train_net.py fetches it before writing anything
    fresh, config = tmp_path / "fresh", tmp_path / "config.yaml"
    config.write_text(digits_cfg(output_dir=fresh).dump())
    with pytest.raises(OSError) as error:
        setup_cfg(_args("--config-file", config, "MODEL.WEIGHTS", url))
    assert str(error.value) == f"{url} cannot be fetched ({error.value.__cause__}). {advice}"
    assert not fresh.exists()
    # a LazyConfig run too
    from test_lazy import args

    with pytest.raises(OSError) as error:
        setup_lazy_cfg(args(fresh, f"train.init_checkpoint={url}"))
    assert str(error.value).endswith(advice.replace("MODEL.WEIGHTS ", "train.init_checkpoint=")
                                     .replace("MODEL.WEIGHTS", "train.init_checkpoint"))  # fmt: skip
    assert not fresh.exists()


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_last_checkpoint_is_named(tmp_path, content):
    cfg = digits_cfg(output_dir=tmp_path)
    (tmp_path / "last_checkpoint").write_text(content)
    trainer = FocalTrainer(cfg)
    message = (
        f"{tmp_path / 'last_checkpoint'} is empty; it must hold the file name of a checkpoint in "
        f"{tmp_path} (e.g. model_final.pth). Write one there, or delete it to start from "
        "MODEL.WEIGHTS."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.resume_or_load(resume=True)


def test_loading_weights_without_resume_leaves_metrics_json_alone(tmp_path):
    """Only a resume trims metrics.json (the records it trains again); a Python caller
    starting from MODEL.WEIGHTS in a folder with old records keeps them."""
    cfg = digits_cfg(output_dir=tmp_path)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 0, "loss_cls": 1.0}\n{"iteration": 5, "loss_cls": 0.5}\n')
    before = metrics.read_text()
    FocalTrainer(cfg).resume_or_load(resume=False)
    assert metrics.read_text() == before


def test_missing_checkpoint_file_is_named_before_anything_is_written(tmp_path, loggers):
    """
    A MODEL.WEIGHTS file, or the file last_checkpoint names, that does not exist raises
    FileNotFoundError naming it, and OUTPUT_DIR is left as it was. Guards the mutants that
    drop either existence check in checkpoint_to_load.
    """
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    missing = run / "model_0000009.pth"
    before = _snapshot(run)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"MODEL.WEIGHTS={missing}: the file does not exist")
    ):
        setup_cfg(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", missing))
    assert _snapshot(run) == before
    fresh = tmp_path / "fresh"  # a new run from those weights: refused before its folder is made
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"MODEL.WEIGHTS={missing}: the file does not exist")
    ):
        setup_cfg(_args("--config-file", config, "MODEL.WEIGHTS", missing, "OUTPUT_DIR", fresh))
    assert not fresh.exists()
    expected = f"MODEL.WEIGHTS={run} is a folder; pass a checkpoint file in it (e.g. {run}/model_final.pth)."
    with pytest.raises(IsADirectoryError, match=re.escape(expected)):  # it exists: not 'missing'
        setup_cfg(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", run))
    assert _snapshot(run) == before
    (run / "last_checkpoint").write_text("model_0000009.pth")
    before = _snapshot(run)
    expected = f"{run / 'last_checkpoint'} names 'model_0000009.pth', but {missing} does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        setup_cfg(_args("--config-file", config, "--resume"))
    assert _snapshot(run) == before


@pytest.mark.parametrize("name", ["retinanet.yaml", "retinanet.YML", "retinanet.py", "run.json"])
def test_a_config_file_as_the_checkpoint_is_named(tmp_path, name):
    """
    A config file passed as MODEL.WEIGHTS (or train.init_checkpoint) is refused naming
    the key and what goes where; torch.load's own error is about unpickling and
    ``weights_only``.
    """
    from focal_det2.lazy import LAZY_KEYS

    config = tmp_path / name
    config.write_text("MODEL:\n  META_ARCHITECTURE: FocalRetinaNet\n")
    for keys, key in ((YACS_KEYS, "MODEL.WEIGHTS"), (LAZY_KEYS, "train.init_checkpoint")):
        expected = (
            f"{key}={config} is a config file, not a checkpoint: pass it with --config-file, "
            f"and {key} a checkpoint (a .pth file torch.save wrote, or Detectron2's .pkl)."
        )
        with pytest.raises(ValueError, match=re.escape(expected)):
            checkpoint_to_load(str(tmp_path), str(config), resume=False, keys=keys)
    checkpoint = tmp_path / "model.pth"  # a checkpoint's name is not a config's
    checkpoint.write_bytes(b"PK")
    assert checkpoint_to_load(str(tmp_path), str(checkpoint), resume=False) == str(checkpoint)


def test_a_config_file_as_model_weights_is_refused_before_anything_is_written(tmp_path):
    from focal_det2.engine import setup_cfg

    config = REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml"
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=re.escape(f"MODEL.WEIGHTS={config} is a config file")):
        setup_cfg(_args("--config-file", config, "MODEL.WEIGHTS", config, "OUTPUT_DIR", fresh))
    assert not fresh.exists()


def test_zero_byte_checkpoint_is_named(tmp_path, loggers):
    from focal_det2.engine import setup_cfg

    run, config = _trained_run_dir(tmp_path)
    (run / "model_final.pth").write_bytes(b"")
    trainer = FocalTrainer(digits_cfg(output_dir=run))
    with pytest.raises(ValueError, match=re.escape(f"{run / 'model_final.pth'} (named by")):
        trainer.resume_or_load(resume=True)
    with pytest.raises(
        ValueError, match=re.escape(f"{run / 'model_final.pth'} (named by") + r".*\(0 bytes\)"
    ):
        setup_cfg(_args("--config-file", config, "--resume"))
    with pytest.raises(
        ValueError, match=re.escape(f"MODEL.WEIGHTS={run / 'model_final.pth'} is empty")
    ):
        setup_cfg(
            _args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", run / "model_final.pth")
        )


@pytest.mark.parametrize(
    "load", ["resume", "eval_only", "eval_only_class_weighted"], ids=lambda load: load
)
def test_truncated_checkpoint_error_names_the_file(tmp_path, load):
    """
    A truncated checkpoint fails in torch.load, whose error does not name the file: the
    trainer's --resume and --eval-only's load_for_evaluation (its plain load and the one
    that also reads class weights) add a note that does.
    """
    from focal_det2.checkpoint import load_for_evaluation

    run, _ = _trained_run_dir(tmp_path)
    checkpoint = run / "model_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as error:
        if load == "resume":
            FocalTrainer(digits_cfg(output_dir=run)).resume_or_load(resume=True)
        else:
            weighting = "effective_number" if load == "eval_only_class_weighted" else "none"
            cfg = digits_cfg(
                output_dir=tmp_path / "eval",
                opts=["MODEL.WEIGHTS", str(checkpoint), "MODEL.FOCAL.CLASS_WEIGHTING", weighting],
            )
            load_for_evaluation(cfg, build_model(cfg))
    assert f"while loading the checkpoint {checkpoint}" in getattr(error.value, "__notes__", [])


@pytest.mark.parametrize("weighting", ["none", "effective_number"])
def test_evaluating_a_checkpoint_of_another_loss_is_an_error_naming_the_tensors(
    tmp_path, weighting
):
    """
    A sigmoid_focal checkpoint (K logits per anchor) evaluated with softmax_focal (K + 1):
    Detectron2 skips the classifier with a warning and would evaluate it random.
    """
    from focal_det2.checkpoint import load_for_evaluation

    run, _ = _trained_run_dir(tmp_path)
    checkpoint = run / "model_final.pth"
    cfg = digits_cfg(
        output_dir=tmp_path / "eval",
        opts=[
            *("MODEL.WEIGHTS", str(checkpoint), "MODEL.FOCAL.LOSS", "softmax_focal"),
            *("MODEL.FOCAL.CLASS_WEIGHTING", weighting),
        ],
    )
    model = build_model(cfg)
    anchors = model.anchor_generator.num_cell_anchors[0]
    with pytest.raises(ValueError) as error:
        load_for_evaluation(cfg, model)
    message = str(error.value)
    assert message.startswith(
        f"{checkpoint} does not fit the model of this config: head.cls_score.weight is "
        f"({anchors * 10}, 64, 3, 3) in the checkpoint but ({anchors * 11}, 64, 3, 3) in the model"
    ), message
    assert "head.cls_score.bias is" in message and "MODEL.FOCAL.LOSS (softmax_focal" in message
    assert "missing from the checkpoint" not in message  # in it, at another shape
    # with the loss it was trained with, it loads
    opts = ["MODEL.WEIGHTS", str(checkpoint), "MODEL.FOCAL.CLASS_WEIGHTING", weighting]
    trained_cfg = digits_cfg(output_dir=tmp_path / "eval", opts=opts)
    load_for_evaluation(trained_cfg, build_model(trained_cfg))


def test_evaluation_loads_model_weights_not_the_last_checkpoint(tmp_path):
    """load_for_evaluation (demo, export, plot_loss_cdf) loads MODEL.WEIGHTS even where
    OUTPUT_DIR's last_checkpoint names another file (a run that went on training)."""
    from focal_det2.checkpoint import load_for_evaluation

    run, _ = _trained_run_dir(tmp_path)
    cfg = digits_cfg(output_dir=run, opts=["MODEL.WEIGHTS", str(run / "model_final.pth")])
    later = build_model(cfg).state_dict()
    later["head.cls_score.bias"] = torch.full_like(later["head.cls_score.bias"], 7.0)
    torch.save({"model": later, "iteration": 9}, run / "model_0000009.pth")
    (run / "last_checkpoint").write_text("model_0000009.pth")
    model = build_model(cfg)
    load_for_evaluation(cfg, model)
    final = torch.load(run / "model_final.pth", weights_only=False)["model"]
    assert torch.equal(model.head.cls_score.bias, final["head.cls_score.bias"])


def test_evaluating_a_backbone_checkpoint_is_an_error_naming_what_to_pass(tmp_path):
    """A checkpoint of the backbone only (as the ImageNet weights COCO configs train from)."""
    from focal_det2.checkpoint import load_for_evaluation

    cfg = digits_cfg(output_dir=tmp_path)
    state = build_model(cfg).state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "backbone.pth")
    with pytest.raises(ValueError) as error:
        load_for_evaluation(cfg, build_model(cfg))
    message = str(error.value)
    assert "does not fit the model of this config: missing from the checkpoint: head." in message
    assert "Pass a trained detector's checkpoint, not a backbone's" in message


def test_truncated_image_in_evaluation_names_id_and_file(coco, tmp_path):
    name, _, image_dir = coco({1: GOOD, 2: GOOD})
    data = (image_dir / "002.png").read_bytes()
    (image_dir / "002.png").write_bytes(data[: len(data) // 2])
    loader = FocalTrainer.build_test_loader(_cfg(name, tmp_path), name)
    with pytest.raises(
        ValueError, match=re.escape(f"image id 2 ({image_dir / '002.png'}): cannot read")
    ):
        list(loader)


def test_package_log_lines_reach_console_and_log_txt(tmp_path, loggers, capsys):
    import logging

    from focal_det2.engine import setup_cfg

    _, config = _trained_run_dir(tmp_path)
    cfg = setup_cfg(_args("--config-file", config, "OUTPUT_DIR", tmp_path / "new"))
    logging.getLogger("focal_det2.data.checks").warning("dropped 3 boxes (test)")
    logging.getLogger("focal_det2.losses.fused").info("backend chosen (test)")
    for handler in logging.getLogger("focal_det2").handlers:
        handler.flush()
    log = (tmp_path / "new" / "log.txt").read_text()
    assert "dropped 3 boxes (test)" in log and "backend chosen (test)" in log
    captured = capsys.readouterr()
    assert "backend chosen (test)" in captured.out and "dropped 3 boxes (test)" in captured.out
    assert "dropped 3 boxes (test)" not in captured.err  # once, on Detectron2's console handler
    assert cfg.OUTPUT_DIR == str(tmp_path / "new")


@pytest.mark.parametrize(
    "name, values, error",
    [
        ("sigmoid_focal", {"alpha": True}, "MODEL.FOCAL.ALPHA=True must be a number, got bool"),
        (
            "sigmoid_focal",
            {"class_alpha": (True, 0.5, 0.5)},
            "MODEL.FOCAL.CLASS_ALPHA=True must be a number",
        ),
        (
            "softmax_focal",
            {"class_alpha": (0.5, float("nan"), 0.5)},
            "MODEL.FOCAL.CLASS_ALPHA=nan must be finite",
        ),
        ("focal_star", {"beta": float("nan")}, "MODEL.FOCAL.STAR_BETA=nan must be finite"),
    ],
)
def test_a_loss_built_alone_checks_its_numbers(name, values, error):
    """
    ``build_focal_loss`` without a model (as a LazyConfig or a user's own head builds it): a
    bool ALPHA (True would be alpha 1, every negative weighed 0) or CLASS_ALPHA entry, and a
    non-finite CLASS_ALPHA or STAR_BETA (a NaN loss), are errors naming the key.
    """
    with pytest.raises((TypeError, ValueError), match=re.escape(error)):
        build_loss(name, 3, **values)


def _lazy(name, tmp_path, *opts):
    """configs/lazy/'s config on the data set ``name`` (2 classes, 64 px), as the lazy tests train it."""
    from test_lazy import digits_opts, load

    size = ["dataloader.train.mapper.augmentations.0.short_edge_length=[64]"]
    size += ["dataloader.train.mapper.augmentations.0.max_size=64"]
    return load(
        *digits_opts(tmp_path, f"dataloader.train.dataset.names={name}", "model.num_classes=2"),
        *size,
        *opts,
    )


def test_a_lazy_run_loads_and_checks_its_training_data_as_a_yaml_run(coco, tmp_path):
    """
    A LazyConfig's dataloader.train (Detectron2's get_detection_dataset_dicts and DatasetMapper)
    is loaded and checked as a YAML config's training data, the errors naming the lazy nodes:
    a class outside model.num_classes, a box without area (dropped with
    dataloader.degenerate_boxes=drop, as configs/lazy/'s COCO config sets it),
    an image file that cannot be read (by the evaluation's loader too), and a key the data set
    node does not take.
    """
    from focal_det2.lazy import check_run_values, lazy_test, lazy_train_loader

    name, json_file, image_dir = coco(
        {1: GOOD, 2: [_box(4, 4, 10, 10, category=2)], 3: [_box(8, 8, 16, 16), _box(30, 30, 0, 10)]}
    )
    assert _lazy(name, tmp_path).dataloader.degenerate_boxes == "drop"
    with logged(logging.getLogger("focal_det2.data.checks")) as records:
        loader = lazy_train_loader(_lazy(name, tmp_path))
    assert [r.getMessage() for r in records] == [
        f"data set '{name}' (json {json_file}): dropped 1 boxes with width or height <= 0 or NaN "
        "(dataloader.degenerate_boxes=drop)."
    ]
    assert {r["image_id"]: len(r["annotations"]) for r in loader.dataset} == {1: 1, 2: 1, 3: 1}
    assert [len(d["instances"]) for d in next(iter(loader))] == [1, 1]  # (mapped, 2 a batch)
    unset = _lazy(name, tmp_path)
    del unset.dataloader.degenerate_boxes  # "error", as in a YAML config
    for cfg in (_lazy(name, tmp_path, "dataloader.degenerate_boxes=error"), unset):
        with pytest.raises(ValueError, match=re.escape("has width 0 and height 10; both must be "
                           "> 0 (or set dataloader.degenerate_boxes=drop).")):  # fmt: skip
            lazy_train_loader(cfg)
    skip = _lazy(name, tmp_path, "dataloader.degenerate_boxes=skip")
    with pytest.raises(ValueError, match=r"^dataloader.degenerate_boxes='skip'; "
                       r"allowed: \['error', 'drop'\].$"):  # fmt: skip
        check_run_values(skip, eval_only=False)
    with pytest.raises(ValueError, match=re.escape("class 1 (category_id 2 in the json) is "
                       "outside the model's classes 0..0 (model.num_classes=1;")):  # fmt: skip
        lazy_train_loader(_lazy(name, tmp_path, "model.num_classes=1"))
    other, _, _ = coco({1: GOOD}, categories=(1, 3))  # (class1, class3): other thing_classes
    with pytest.raises(ValueError, match="different metadata 'thing_classes'"):
        lazy_train_loader(_lazy(name, tmp_path, f"dataloader.train.dataset.names=[{name},{other}]"))
    with pytest.raises(
        TypeError,
        match=r"^dataloader.train.dataset has colour: focal_det2 loads and checks the data itself and reads only these arguments of get_detection_dataset_dicts: names, filter_empty",
    ):
        lazy_train_loader(_lazy(name, tmp_path, "+dataloader.train.dataset.colour=1"))
    (image_dir / "001.png").write_bytes(b"this is not a png")
    unreadable = re.escape(f"image id 1 ({image_dir / '001.png'}): cannot read the image file")
    with pytest.raises(ValueError, match=unreadable):
        next(iter(lazy_train_loader(_lazy(name, tmp_path))))
    with pytest.raises(ValueError, match=unreadable):  # the evaluation's loader too
        lazy_test(_lazy(name, tmp_path, f"dataloader.test.dataset.names={name}"), model=None)
