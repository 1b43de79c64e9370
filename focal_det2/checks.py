"""
Checks of a run's config and inputs before it writes anything
(:func:`.engine.setup_cfg` calls them before Detectron2's ``default_setup``):
the model built on the ``meta`` device (:func:`build_on_meta`, every check of
the constructors), non-finite floats, MODEL.FOCAL under one of Detectron2's own
meta-architectures, registered data sets with their files, a CUDA device that
exists, and a FOCAL_DET2_BACKEND the run can use.
"""

import difflib
import logging
import os
import re
from typing import Callable, Optional, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY

from .config import add_focal_config, check_finite, flat_keys
from .data.checks import check_degenerate_boxes_option
from .losses.backends import select_backend
from .registry import lookup

__all__ = [
    "build_on_meta",
    "check_backend",
    "check_cfg",
    "check_cuda_device",
    "check_dataset_files",
    "check_device",
    "check_processes",
    "check_registered",
    "check_run_inputs",
]

logger = logging.getLogger(__name__)


def check_cfg(cfg) -> Optional[torch.nn.Module]:
    """
    Raise for a config value a run would reject, before the run writes
    anything: a float key that is NaN or infinite, every check the model
    build makes, ``DATALOADER.DEGENERATE_BOXES``, and ``TEST.AUG.ENABLED``
    (Detectron2's train_net.py would evaluate with test-time augmentation;
    this one would silently not). Returns the model built
    on the meta device (None where it cannot be).

    The model build's checks are spread over Detectron2's backbone, anchor
    generator and RetinaNet and over our loss, gamma schedule and head, and
    some need the backbone's output shapes; so the whole meta-architecture is
    constructed, but on the ``meta`` device (:func:`build_on_meta`): modules
    and shapes without memory, weight initialisation or random draws, then
    dropped. That costs a small part of a real CPU build and leaves the run's
    own build (after ``default_setup`` seeds it) the only one that allocates.
    A model the meta device cannot build is left to the run's build, with a
    warning; MODEL.FOCAL moved from its defaults under one of Detectron2's own
    meta-architectures (which read none of it) is refused either way.
    """
    check_finite(cfg)
    check_degenerate_boxes_option(cfg.DATALOADER.DEGENERATE_BOXES)
    if cfg.TEST.AUG.ENABLED:
        raise ValueError(
            "TEST.AUG.ENABLED=True: train_net.py has no test-time augmentation (Detectron2's "
            "GeneralizedRCNNWithTTA is for GeneralizedRCNN models; RetinaNet and FocalRetinaNet "
            "have none); set TEST.AUG.ENABLED False."
        )
    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "cpu"  # a CUDA run is checked the same on a machine without one
    meta_arch = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
    model = build_on_meta(lambda: meta_arch(meta_cfg))
    if meta_arch.__module__.startswith("detectron2."):
        _check_focal_node_unset(cfg)  # a user's own model may read MODEL.FOCAL
    return model


def check_run_inputs(cfg, eval_only: bool):
    """
    Raise, naming the key, for what a run would fail on only after writing (a training run,
    after training): a data set name in DATASETS.TRAIN (training) or DATASETS.TEST that is not
    registered in Detectron2's ``DatasetCatalog`` (register your own before this check, as
    Detectron2's builtin ones are at import) or whose files are missing, a MODEL.DEVICE of
    CUDA where PyTorch sees no CUDA device, and to train, a ``FOCAL_DET2_BACKEND`` the loss
    cannot run on MODEL.DEVICE.
    """
    for key in ("DATASETS.TEST",) if eval_only else ("DATASETS.TRAIN", "DATASETS.TEST"):
        names = cfg.DATASETS.get(key.split(".")[1])
        check_registered(names, key)
        check_dataset_files(names, key)
    check_device(cfg)
    if not eval_only:
        check_backend(cfg.MODEL.DEVICE, "MODEL.DEVICE")


def check_backend(device: str, key: str):
    """
    Raise for a ``FOCAL_DET2_BACKEND`` (or the former ``FOCAL_DET2_COMPILE``) that the
    fused losses would refuse on ``device`` (``key``'s value) at the first training
    iteration, after the run has written its output (see :mod:`.losses.backends`).
    """
    try:
        select_backend(torch.device(device).type)
    except ValueError as e:
        raise ValueError(f"{e} The run trains on {key}={device}.") from None


def check_dataset_files(names: Sequence[str], key: str):
    """
    Raise, naming ``key``, the data set and the file, for a registered data set whose
    metadata names a ``json_file`` or ``image_root`` that does not exist (Detectron2's
    COCO without COCO installed), except data sets generated on first load (the digits,
    metadata ``generated_on_load``), which write them then.
    """
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    for name in names:
        meta = MetadataCatalog.get(name)
        if meta.get("generated_on_load", False):
            continue
        for field in ("json_file", "image_root"):
            path = meta.get(field, None)
            if path and not os.path.exists(path):
                hint = (
                    f" Detectron2 finds its built-in data sets under $DETECTRON2_DATASETS (here "
                    f"{root!r}): set it to the folder that holds them (Detectron2's "
                    "datasets/README.md)."
                    if os.path.abspath(path).startswith(os.path.abspath(root) + os.sep)
                    else ""
                )
                raise FileNotFoundError(
                    f"{key}: data set {name!r} reads its {field} {path}, which does not exist."
                    + hint
                )


def check_registered(names: Sequence[str], key: str):
    """
    Raise, naming ``key`` and the close registered names, for a name among ``names`` that
    is not a data set in Detectron2's ``DatasetCatalog`` (register your own before this
    check, as Detectron2's builtin ones are at import).
    """
    registered = DatasetCatalog.list()
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3, cutoff=0.8)
            raise KeyError(
                f"{key}: {name!r} is not a registered data set"
                + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                + " (register your own with DatasetCatalog before the run is set up)."
            )


def check_device(cfg):
    """
    Raise, naming MODEL.DEVICE, for a CUDA device where PyTorch sees none (torch's own error
    names no key); the tools that run a model check it after loading their config.
    """
    check_cuda_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")


def check_cuda_device(device: str, key: str, sep: str = " "):
    """
    Raise, naming ``key``, if ``device`` is CUDA where PyTorch sees no CUDA device.

    Args:
        device (str): the device a run would use ("cuda", "cuda:1", "cpu").
        key (str): its config key (MODEL.DEVICE; a LazyConfig's train.device).
        sep (str): between the key and a value on train_net.py's command line.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"{key}={device}, but PyTorch sees no CUDA device here "
            f"(torch.cuda.is_available() is False): set {key}{sep}cpu."
        )


def check_processes(device: str, num_gpus: int, key: str, sep: str = " "):
    """
    Raise, naming ``--num-gpus`` and ``key``, for more processes on CUDA than PyTorch sees
    CUDA devices: checked before Detectron2's ``launch`` starts them (each would fail on
    its own, and which error surfaces first, the device's or a peer's lost connection, is
    a race). On the CPU any number of processes trains (GLOO).
    """
    if not device.startswith("cuda"):
        return
    check_cuda_device(device, key, sep)
    count = torch.cuda.device_count()
    if num_gpus > count:
        raise ValueError(
            f"--num-gpus {num_gpus} with {key}={device}: PyTorch sees {count} CUDA device(s) "
            f"here; pass --num-gpus {count} or fewer (or {key}{sep}cpu for {num_gpus} processes "
            "on the CPU)."
        )


def _check_focal_node_unset(cfg):
    """
    Raise, naming them, for MODEL.FOCAL keys moved from their defaults: the config's
    meta-architecture, one of Detectron2's own, reads none.
    """
    defaults = get_cfg()
    add_focal_config(defaults)
    default = flat_keys(defaults.MODEL.FOCAL, "MODEL.FOCAL.")
    changed = [
        f"{key}={value}"
        for key, value in flat_keys(cfg.MODEL.FOCAL, "MODEL.FOCAL.").items()
        if value != default[key]
    ]
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} does not "
            "read MODEL.FOCAL. Leave it at its defaults, or set META_ARCHITECTURE FocalRetinaNet."
        )


def build_on_meta(build: Callable[[], torch.nn.Module]) -> Optional[torch.nn.Module]:
    """
    ``build()`` on the ``meta`` device: modules and shapes without memory,
    weight initialisation or random draws, so that every check of the
    constructors runs before a run writes anything. None, with a log line, for
    a model whose constructor computes with tensors (Detectron2's ViT, MViT and
    Swin backbones call ``.item()``), which the meta device cannot run; its
    errors then come from the run's own build.
    """
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError) as e:
        if not re.search(r"\bmeta\b", str(e), re.IGNORECASE):  # "meta tensors", "'Meta' backend"
            raise
        logger.warning(
            f"The model is not checked before the run: it cannot be built on the meta device ({e})."
        )
        return None
