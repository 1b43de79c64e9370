"""Shared test helpers: tiny CPU configs for FocalRetinaNet, the loss built from a config, the reference formulas."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (read when a kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from detectron2.config import get_cfg

import focal_det2
from focal_det2.losses import functional


def tiny_cfg():
    """
    A fresh CPU config for FocalRetinaNet: ResNet-18 FPN with GroupNorm, 10
    classes, 64 FPN channels, no pretrained weights. Building the model from it
    takes well under a second on 2 cores.
    """
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.RETINANET.NUM_CLASSES = 10
    cfg.MODEL.RETINANET.NORM = "GN"
    return cfg


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def build_loss(name, num_classes=3, *, gamma=2.0, alpha=0.25, class_alpha=(), beta=1.0):
    """``focal_det2.build_focal_loss`` on a config with the given MODEL.FOCAL values."""
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.FOCAL.LOSS = name
    cfg.MODEL.FOCAL.GAMMA = gamma
    cfg.MODEL.FOCAL.ALPHA = alpha
    cfg.MODEL.FOCAL.CLASS_ALPHA = list(class_alpha)
    cfg.MODEL.FOCAL.STAR_BETA = beta
    return focal_det2.build_focal_loss(cfg)


def reference(name, logits, labels, *, gamma, alpha, class_alpha, beta):
    """The formula of loss ``name`` in focal_det2.losses.functional."""
    ca = torch.tensor(class_alpha, dtype=logits.dtype) if class_alpha else None
    if name == "sigmoid_focal":
        return functional.sigmoid_focal_loss(logits, labels, gamma=gamma, alpha=alpha, class_alpha=ca)
    if name == "cross_entropy":
        return functional.sigmoid_cross_entropy(logits, labels, alpha=alpha, class_alpha=ca)
    if name == "softmax_focal":
        return functional.softmax_focal_loss(logits, labels, gamma=gamma, alpha=alpha, class_alpha=ca)
    if name == "focal_star":
        return functional.focal_star_loss(logits, labels, gamma=gamma, beta=beta, alpha=alpha, class_alpha=ca)
    raise ValueError(f"unknown loss {name!r}")


def digits_cfg(config="sigmoid_focal_R18_FPN_1x", output_dir=None, opts=()):
    """
    A config loaded from ``configs/digits/<config>.yaml`` exactly as
    train_net.py loads it, switched to the tiny digits splits (16 train, 8 val
    images) and a short, seeded schedule, for tests that train and evaluate.

    Args:
        config (str): file name in configs/digits without ``.yaml``.
        output_dir (str or Path or None): OUTPUT_DIR (a pytest tmp_path).
        opts (sequence): extra key, value pairs as on train_net.py's command line.
    """
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "digits" / f"{config}.yaml"))
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", ("digits_train_tiny",),
            "DATASETS.TEST", ("digits_val_tiny",),
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.MAX_ITER", 3,
            "SOLVER.WARMUP_ITERS", 1,
            "SOLVER.STEPS", (),
            "DATALOADER.NUM_WORKERS", 0,
            "MODEL.FPN.OUT_CHANNELS", 64,  # GroupNorm(32) needs >= 2 channels a group at 1x1 P7
            "OUTPUT_DIR", str(output_dir or "output/tests"),
        ]
        + list(opts)
    )
    return cfg
