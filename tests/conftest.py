"""Shared test helpers: tiny CPU configs for FocalRetinaNet, the loss built from a config, the reference formulas, alpha-balanced CE written with torch ops."""

import contextlib
import importlib.util
import json
import logging
import os
import sys

import torch
import torch.nn.functional as TF

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (read when a kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest
from detectron2.config import get_cfg

import focal_det2
from focal_det2.losses import backends, fused, registered_losses
from focal_det2.losses.build import other_losses_keys

# Files named in FOCAL_DET2_EXTRA_LOSSES (a user's loss outside the package; test_registry.py's
# throwaway loss) registered their losses when focal_det2 was imported: the suites test them.


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


@contextlib.contextmanager
def logged(logger, level=logging.WARNING):
    """
    The records ``logger`` emits at ``level`` or above inside the block, taken by a handler
    on the logger itself: pytest's caplog sees only what propagates, and Detectron2's
    ``setup_logger`` (run by ``default_setup``) turns propagation off for the package logger.
    A logger whose level would drop them is set to ``level`` for the block.
    """
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger.addHandler(handler)
    own_level = logger.level
    if logger.getEffectiveLevel() > level:  # else the logger drops them before the handler
        logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(own_level)


@pytest.fixture
def loggers():
    """Puts back the handlers and propagation of the loggers that default_setup and setup_cfg configure."""
    names = ("detectron2", "fvcore", "focal_det2")
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names
    }
    yield
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate


# Wall-clock metrics differ between any two runs.
TIMING_KEYS = {"time", "data_time", "rank_data_time", "eta_seconds"}


def metrics_records(output_dir):
    """The records of ``output_dir/metrics.json`` (one dict per line), without :data:`TIMING_KEYS`."""
    with open(output_dir / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def load_script(path):
    """The script ``REPO / path`` as a module, with its folder importable as when the script runs."""
    script = REPO / path
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(f"{script.parent.name}_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every registered loss: the suites iterate these, so that a new loss is tested for reference
# equality, gradients, bad input and training without editing them.
LOSSES = sorted(registered_losses())
# The losses this repository ships configs for (README's Configs table). A loss added as one
# file needs none: it runs on any config with MODEL.FOCAL.LOSS <name>.
CONFIGURED_LOSSES = ("cross_entropy", "focal_star", "ohem", "sigmoid_focal", "softmax_focal")
FOCUSING_LOSSES = [
    name for name in LOSSES if registered_losses()[name].uses_gamma
]  # losses that read gamma


def with_gammas(names, gammas):
    """
    (name, gamma) for each loss of ``names`` at each of ``gammas``, and a loss without gamma
    (which ignores it) at the first one only: the other cases would repeat it.
    """
    return [
        (name, gamma)
        for name in names
        for gamma in gammas
        if gamma == gammas[0] or registered_losses()[name].uses_gamma
    ]


# The (logits, labels) unit tests have no boxes: losses that select anchors by their predicted
# boxes (OHEM's NMS) are built with the NMS off there; tests/test_ohem.py covers the selection.
UNIT_OPTS = ("MODEL.FOCAL.OHEM.NMS_THRESH", 1.0)


def _keys_read(name, opts):
    """``opts`` (key, value, ...) without the pairs of keys that another loss than ``name`` owns
    (a loss's own keys left at their defaults, as build_focal_loss requires)."""
    others = other_losses_keys(registered_losses()[name])
    pairs = zip(opts[::2], opts[1::2])
    return [item for key, value in pairs if key not in others for item in (key, value)]


def build_loss(
    name, num_classes=3, *, gamma=2.0, alpha=0.25, class_alpha=(), beta=1.0, opts=UNIT_OPTS
):
    """
    ``focal_det2.build_focal_loss`` on a config with the given MODEL.FOCAL values and ``opts``;
    ``beta`` and the keys of ``opts`` that only other losses read are set only where the loss
    reads them, ``gamma`` only for losses with a gamma, and ``alpha`` beside ``class_alpha``
    only for losses that read both.
    """
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.FOCAL.LOSS = name
    loss_class = registered_losses()[name]
    if loss_class.uses_gamma:
        cfg.MODEL.FOCAL.GAMMA = gamma
    if not class_alpha or loss_class.reads_alpha_with_class_alpha:
        cfg.MODEL.FOCAL.ALPHA = alpha
    cfg.MODEL.FOCAL.CLASS_ALPHA = list(class_alpha)
    cfg.merge_from_list(_keys_read(name, ["MODEL.FOCAL.STAR_BETA", beta, *opts]))
    return focal_det2.build_focal_loss(cfg)


def num_logits_of(name, num_classes):
    """Logits per anchor loss ``name`` needs for K = ``num_classes`` (K, or K + 1 with a background column)."""
    return build_loss(name, num_classes).num_logits


def loss_for(name, logits, *, opts=UNIT_OPTS, **values):
    """Loss ``name`` built with ``values`` for ``logits`` (N, C): K = C, or C - 1 for losses with a background column."""
    cols = logits.shape[1]
    num_classes = cols if num_logits_of(name, cols) == cols else cols - 1
    return build_loss(name, num_classes, opts=opts, **values)


def reference(
    name, logits, labels, *, gamma, alpha, class_alpha, beta, opts=UNIT_OPTS, **selection
):
    """The definition of loss ``name`` (its ``reference_loss``, focal_det2.losses.functional) with these values."""
    loss = loss_for(
        name, logits, gamma=gamma, alpha=alpha, class_alpha=class_alpha, beta=beta, opts=opts
    )
    gamma = gamma if loss.uses_gamma else None  # a loss without gamma refuses another one
    return loss.reference_loss(logits, labels, gamma=gamma, **selection)


def alpha_weighted_bce(logits, labels, *, alpha, class_alpha):
    """sum of alpha_t * BCE(x, one-hot) over valid anchors, written out with torch ops."""
    valid = labels >= 0
    x, y = logits[valid], labels[valid]
    target = TF.one_hot(y, logits.shape[1] + 1)[:, :-1].to(logits)
    if class_alpha:
        a = torch.tensor(class_alpha, dtype=logits.dtype).expand_as(x)
    else:
        a = torch.full_like(x, alpha)
    weight = (
        torch.ones_like(x)
        if alpha == -1 and not class_alpha
        else target * a + (1 - target) * (1 - a)
    )
    return (weight * TF.binary_cross_entropy_with_logits(x, target, reduction="none")).sum()


def alpha_weighted_softmax_ce(logits, labels, *, alpha, class_alpha):
    """sum of alpha_t * CE(softmax(x), label) over valid anchors, alpha_t as in DESIGN.md."""
    valid = labels >= 0
    x, y = logits[valid], labels[valid]
    num_classes = logits.shape[1] - 1
    if class_alpha:
        fg = torch.tensor(class_alpha, dtype=torch.float64)
    else:
        fg = torch.full((num_classes,), 1.0 if alpha == -1 else alpha, dtype=torch.float64)
    weights = torch.cat(
        [fg, torch.tensor([1.0 if alpha == -1 else 1 - alpha], dtype=torch.float64)]
    )
    return (weights[y] * TF.cross_entropy(x, y, reduction="none")).sum()


TORCH_CE = {"sigmoid_focal": alpha_weighted_bce, "softmax_focal": alpha_weighted_softmax_ce}


def cfg_value(cfg, key):
    """The value of a dotted config key, ``cfg_value(cfg, "MODEL.FOCAL.GAMMA")``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


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
            "DATASETS.TRAIN",
            ("digits_train_tiny",),
            "DATASETS.TEST",
            ("digits_val_tiny",),
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.MAX_ITER",
            3,
            "SOLVER.WARMUP_ITERS",
            1,
            "SOLVER.STEPS",
            (),
            "DATALOADER.NUM_WORKERS",
            0,
            "MODEL.FPN.OUT_CHANNELS",
            64,  # GroupNorm(32) needs >= 2 channels a group at 1x1 P7
            "OUTPUT_DIR",
            str(output_dir or "output/tests"),
        ]
        + list(opts)
    )
    return cfg


def head_logits(model, inputs):
    """
    The classifier logits of ``model`` (a FocalRetinaNet) on ``inputs``, as
    one (N, R, C) tensor in Detectron2's anchor order (level, y, x, anchor),
    with C = K or K + 1, and Detectron2's anchor labels (N, R) from the
    model's own ``label_anchors`` (when the inputs have instances).
    Computed from the backbone and head modules, not through the model's
    forward, so the tests compare its forward with an independent path.
    """
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        logits, _ = model.head(features)
        per_anchor = logits[0].shape[1] // model.anchor_generator.num_cell_anchors[0]
        # (N, A * C, H, W) -> (N, H, W, A * C) -> (N, H * W * A, C), level after level
        logits = torch.cat(
            [x.permute(0, 2, 3, 1).reshape(len(inputs), -1, per_anchor) for x in logits], dim=1
        )
        if "instances" not in inputs[0]:
            return logits, None
        anchors = model.anchor_generator(features)
        labels, _ = model.label_anchors(anchors, [x["instances"] for x in inputs])
    return logits, torch.stack(labels)


def reference_loss_cls(
    model, inputs, name, *, gamma, alpha=0.25, beta=1.0, class_alpha=(), ema=100.0, opts=()
):
    """
    The ``loss_cls`` a FocalRetinaNet training step on ``inputs`` must report,
    computed without the model's ``losses``: the reference formula of loss
    ``name`` (focal_det2.losses.functional, in float64) on the model's
    logits and anchor labels, divided by Detectron2's normaliser
    ``0.9 * ema + 0.1 * max(number of foreground anchors, 1)``, where ``ema``
    is the moving average before the step (100 in a fresh model). ``opts``
    set further loss keys (as :func:`build_loss`'s).
    """
    logits, labels = head_logits(model, inputs)
    num_classes = model.num_classes
    foreground = int(((labels >= 0) & (labels != num_classes)).sum())
    normalizer = 0.9 * ema + 0.1 * max(foreground, 1)
    selection = {"num_images": len(inputs)}
    if model.focal_loss.needs_boxes:  # the model's own config (OHEM's NMS on): the predicted boxes
        selection["boxes"] = head_boxes(model, inputs).flatten(0, 1)
    total = reference(
        name,
        logits.flatten(0, 1).double(),
        labels.flatten(),
        gamma=gamma,
        alpha=alpha,
        class_alpha=class_alpha,
        beta=beta,
        opts=opts,
        **selection,
    )
    return total.item() / normalizer


def head_boxes(model, inputs):
    """(N, R, 4) the boxes ``model``'s head predicts for its anchors, in the order of :func:`head_logits`."""
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        _, deltas = model.head(features)
        deltas = torch.cat(
            [x.permute(0, 2, 3, 1).reshape(len(inputs), -1, 4) for x in deltas], dim=1
        )
        anchors = torch.cat([a.tensor for a in model.anchor_generator(features)])
        boxes = model.box2box_transform.apply_deltas(
            deltas.flatten(0, 1), anchors.repeat(len(inputs), 1)
        )
    return boxes.view(len(inputs), -1, 4)


def use_triton(monkeypatch):
    """
    Force the Triton kernels for the tests' CPU tensors: through Triton's interpreter
    (set by this file where there is no CUDA), or, on a CUDA machine, compiled, each
    launch's tensors moved to the GPU and its loss back (the gradient flows back through the
    moves). Skips where neither can run.
    """
    if not backends._triton_interpreting():
        if not torch.cuda.is_available():
            pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 or a CUDA device")
        from focal_det2.losses import triton_kernels

        monkeypatch.setattr(backends, "_triton_interpreting", lambda: True)  # CPU tensors in
        for family in ("sigmoid_family", "softmax_family"):
            monkeypatch.setattr(triton_kernels, family, _on_cuda(getattr(triton_kernels, family)))
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")


def _on_cuda(family):
    """``family`` (a Triton launch of triton_kernels) on CUDA copies of CPU tensors, its loss back on the CPU."""

    def moved(logits, labels, **params):
        params = {k: v.cuda() if torch.is_tensor(v) else v for k, v in params.items()}
        return family(logits.cuda(), labels.cuda(), **params).cpu()

    return moved


@pytest.fixture(params=["eager", "triton"])
def backend_name(request, monkeypatch):
    """
    Runs a test on the eager path and on the Triton kernels, each chosen
    afresh (the backend is otherwise chosen once per process, on first use).
    """
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    if request.param == "triton":
        use_triton(monkeypatch)
    backends._reset_backend()
    yield request.param
    backends._reset_backend()


@pytest.fixture
def paths(monkeypatch):
    """
    The logits' dtype of every call of the eager families (``"eager"``) and of
    the Triton launches (``"triton"``): which code computed the loss.
    """
    ran = {"eager": [], "triton": []}

    def spy(module, fn, path):
        real = getattr(module, fn)

        def recorded(logits, *args, **kwargs):
            ran[path].append(logits.dtype)
            return real(logits, *args, **kwargs)

        monkeypatch.setattr(module, fn, recorded)

    spy(fused, "_sigmoid_family", "eager")
    spy(fused, "_softmax_family", "eager")
    try:
        from focal_det2.losses import triton_kernels
    except ImportError:  # no Triton: nothing can launch
        return ran
    spy(triton_kernels, "_sigmoid_launch", "triton")
    spy(triton_kernels, "_softmax_launch", "triton")
    return ran
