"""Config nodes of focal_det2 and the checks that name a bad key."""

import contextlib
import difflib
import math
import os
import re
from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "CLASS_WEIGHTINGS",
    "DEFAULT_ALPHA",
    "DEFAULT_CB_BETA",
    "DEFAULT_GAMMA",
    "add_focal_config",
    "check_class_weighting_name",
    "check_finite",
    "check_retinanet_keys_unused",
    "flat_keys",
    "is_lazy_config",
    "load_config",
]

# Values of MODEL.FOCAL.CLASS_WEIGHTING.
CLASS_WEIGHTINGS = ("none", "effective_number")
# Defaults of the keys that a loss may leave unread (checked by the loss's constructor).
DEFAULT_GAMMA = 2.0
DEFAULT_ALPHA = 0.25
DEFAULT_CB_BETA = 0.999


def add_focal_config(cfg):
    """
    Add the ``MODEL.FOCAL`` node (with each registered loss's own keys) and
    ``DATALOADER.DEGENERATE_BOXES`` to ``cfg`` in place. Detectron2's global
    defaults are left untouched.

    Args:
        cfg (CfgNode): a config from :func:`detectron2.config.get_cfg`.
    """
    cfg.MODEL.FOCAL = CN()
    # Classification loss, a name in FOCAL_LOSS_REGISTRY:
    # "sigmoid_focal" | "softmax_focal" | "focal_star" | "cross_entropy" | "ohem".
    cfg.MODEL.FOCAL.LOSS = "sigmoid_focal"
    # Focusing parameter gamma (>= 0); the gamma schedule's end value.
    cfg.MODEL.FOCAL.GAMMA = DEFAULT_GAMMA
    # Foreground weight alpha_t (background weighs 1 - ALPHA); -1 turns weighting off.
    cfg.MODEL.FOCAL.ALPHA = DEFAULT_ALPHA
    # Optional per-class alpha in [0, 1], length NUM_CLASSES; replaces ALPHA class by class.
    cfg.MODEL.FOCAL.CLASS_ALPHA = []
    # Per-class loss weights counted from DATASETS.TRAIN: "none" | "effective_number" (Cui et al.,
    # CVPR 2019: w_c = (1 - CB_BETA) / (1 - CB_BETA^n_c), mean 1 over the classes).
    cfg.MODEL.FOCAL.CLASS_WEIGHTING = "none"
    # beta of the effective number of samples (1 - beta^n) / (1 - beta), in [0, 1); 0: equal weights.
    cfg.MODEL.FOCAL.CB_BETA = DEFAULT_CB_BETA
    # Label smoothing eps in [0, 1) for the losses that implement it (sigmoid_focal, cross_entropy,
    # softmax_focal): sigmoid targets 1 - eps/2 and eps/2, softmax (1 - eps) onehot + eps / (K + 1).
    cfg.MODEL.FOCAL.LABEL_SMOOTHING = 0.0
    # Foreground prior pi used to initialise the classifier bias, in (0, 1).
    cfg.MODEL.FOCAL.PRIOR_PROB = 0.01
    # Head, a name in FOCAL_HEAD_REGISTRY.
    cfg.MODEL.FOCAL.HEAD_NAME = "FocalRetinaNetHead"
    # Sum the foreground count over processes before the moving average, so that
    # N processes compute the gradient of one process over the whole batch.
    cfg.MODEL.FOCAL.SYNC_NORMALIZER = False

    cfg.MODEL.FOCAL.GAMMA_SCHEDULE = CN()
    # How gamma moves from START to GAMMA: "constant" | "linear" | "cosine" | "step".
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.NAME = "constant"
    # Gamma at iteration 0 (not read by "constant").
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.START = 0.0
    # Ramp length in iterations for "linear" and "cosine".
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.ITERS = 0
    # Increasing iterations at which "step" raises gamma by (GAMMA - START) / len(STEPS).
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.STEPS = []

    # Each loss's own keys (MODEL.FOCAL.STAR_BETA of focal_star, ...), added by its class.
    from .losses import registered_losses

    for loss_class in registered_losses().values():
        loss_class.add_config(cfg)

    # Training boxes with width or height <= 0: "error" stops with the data set, image and
    # box; "drop" drops them and logs how many (COCO's train2017 json has two).
    cfg.DATALOADER.DEGENERATE_BOXES = "error"


# yacs's error for a value of another type than the key's default.
_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
    r"for config key: (\S+)$",
    re.DOTALL,
)


@contextlib.contextmanager
def _naming_type_mismatch(source: str):
    """
    Re-raise yacs's type-mismatch error as one that says what the key holds and how to write
    it: an int for a float key (``MODEL.FOCAL.ALPHA -1``) is refused by yacs, which keeps
    each key's type, so it must be written ``-1.0``. The value quoted is the one the config
    holds when the override is merged (after the config file: 1000 for the digits MAX_ITER).
    """
    try:
        yield
    except ValueError as e:
        found = _TYPE_MISMATCH.match(str(e))
        if not found:
            raise
        want, got, default, value, key = found.groups()
        if (want, got) == ("float", "int"):
            fix = f": write {float(value)}"
        elif want in ("float", "int") and got == "str":  # yacs reads nan, .nan, 1,5 as text
            fix = f": write {_a(want)} such as {default}"
        else:
            fix = ""
        raise ValueError(
            f"{key}={value} {source} is {_a(got)}, but {key} holds {_a(want)} "
            f"(the config has {default}){fix}."
        ) from e


# yacs's errors for a key the config lacks: merge_from_list's and merge_from_file's.
_UNKNOWN_KEY = re.compile(r"'?Non-existent (?:config )?key: ([^']+)'?")


@contextlib.contextmanager
def _naming_unknown_key(cfg, source: str):
    """
    Re-raise yacs's error for a key the config lacks (a typo: ``MODEL.FOCAL.GAMA``) as a
    ``KeyError`` that says where it was written and names the keys it may stand for.
    """
    try:
        yield
    except (AssertionError, KeyError) as e:
        found = _UNKNOWN_KEY.fullmatch(str(e))
        if not found:
            raise
        key = found.group(1)  # a leaf, or the first node missing on its path (from a file)
        close = _close_keys(cfg, key)
        raise KeyError(
            f"{key} {source}: the config has no such key"
            + (f"; did you mean {' or '.join(close)}?" if close else ".")
        ) from e


def _close_keys(cfg, key: str) -> list:
    """
    The config's names ``key`` may stand for: its siblings of a close name where its parent
    node exists (``MODEL.FOCAL.GAMA``: GAMMA), else names as deep of a close full name
    (``MODEL.FOCL.GAMMA``: MODEL.FOCAL.GAMMA).
    """
    parent, _, name = key.rpartition(".")
    prefix = parent + "." if parent else ""
    flat = [k for k in flat_keys(cfg) if k.count(".") >= key.count(".")]
    siblings = {k[len(prefix) :].split(".")[0] for k in flat if k.startswith(prefix)}
    if siblings:
        close = difflib.get_close_matches(name, sorted(siblings), n=3, cutoff=0.75)
        return [prefix + n for n in close]
    as_deep = {k.rsplit(".", k.count(".") - key.count("."))[0] for k in flat}
    return difflib.get_close_matches(key, sorted(as_deep), n=3, cutoff=0.8)


def check_override_list(opts: Sequence):
    """
    Raise, naming it, for a command-line override list that is not KEY VALUE pairs: a flag
    (``--resume``) after the overrides, which argparse leaves among them, a LazyConfig's
    ``a.b=value`` override, or an odd length.
    """
    flags = [o for o in map(str, opts) if o.startswith("--")]
    if flags:
        raise ValueError(
            f"{' '.join(flags)} among the KEY VALUE overrides: flags go before them, e.g. "
            f"train_net.py --config-file FILE {' '.join(flags)} KEY VALUE ..."
        )
    lazy = [str(o) for o in opts[::2] if "=" in str(o)]  # a key never holds "="
    if lazy:
        raise ValueError(
            f"{lazy[0]}: a YAML config takes KEY VALUE overrides (MODEL.FOCAL.GAMMA 1.0); "
            "a.b=value is how a LazyConfig (.py) is overridden."
        )
    if len(opts) % 2:
        raise ValueError(
            f"the overrides {' '.join(map(str, opts))} are not KEY VALUE pairs: an odd number "
            f"of words ({len(opts)}; a key without its value?)."
        )


def _a(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def is_lazy_config(path: str) -> bool:
    """
    True for a LazyConfig file: Python (``.py``), or the YAML a lazy run saves
    as its ``config.yaml`` (a top-level ``model`` or ``train`` node, lower
    case); False for a yacs config (upper-case ``MODEL``, ``_BASE_``, ...).
    """
    if path.endswith(".py"):
        return True
    try:
        with open(path) as f:  # the top-level keys (a saved config holds Python object tags)
            top = {m.group(1) for m in map(re.compile(r"([A-Za-z_]\w*):").match, f) if m}
    except (OSError, UnicodeDecodeError):
        return False  # the yacs loader names the file and the problem
    return bool({"model", "train"} & top)  # (a yacs key is upper case)


def load_config(config_file: str, opts: Sequence = (), *, need_weights: bool = False):
    """
    Detectron2's config with the ``MODEL.FOCAL`` node, merged with a YAML file
    and command-line overrides, not frozen: what train_net.py and the tools load.

    Args:
        config_file (str): a YAML config (``_BASE_`` allowed); a LazyConfig is refused,
            naming train_net.py, which takes both.
        opts (sequence): key, value pairs, e.g. ``["MODEL.WEIGHTS", "model_final.pth"]``.
        need_weights (bool): raise if MODEL.WEIGHTS is empty (tools that run a trained model).
    """
    if not config_file or not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"--config-file {config_file!r}: no such file"
            if config_file
            else "no config file: pass --config-file FILE, e.g. "
            "configs/digits/sigmoid_focal_R18_FPN_1x.yaml (or a LazyConfig .py)"
        )
    if is_lazy_config(config_file):
        raise ValueError(
            f"--config-file {config_file} is a LazyConfig (Python, or the config.yaml a LazyConfig "
            "run saved); this takes a YAML (yacs) config, as Detectron2's own tools do. "
            "train_net.py trains and evaluates both."
        )
    cfg = get_cfg()
    add_focal_config(cfg)
    check_override_list(opts)
    source = f"in {config_file} or its _BASE_"
    with _naming_type_mismatch(source), _naming_unknown_key(cfg, source):
        cfg.merge_from_file(config_file)
    with _naming_type_mismatch("on the command line"), _naming_unknown_key(
        cfg, "on the command line"
    ):
        cfg.merge_from_list(list(opts))
    if need_weights and not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: pass a trained model, e.g. MODEL.WEIGHTS output/.../model_final.pth"
        )
    return cfg


# Keys of Detectron2's RetinaNet that FocalRetinaNet does not read, and their replacements.
_RETINANET_KEYS_REPLACED = {
    "FOCAL_LOSS_GAMMA": "MODEL.FOCAL.GAMMA",
    "FOCAL_LOSS_ALPHA": "MODEL.FOCAL.ALPHA",
    "PRIOR_PROB": "MODEL.FOCAL.PRIOR_PROB",
}


# Float keys for which infinity means something: Detectron2's L-inf norm of gradient clipping.
INFINITY_ALLOWED = ("SOLVER.CLIP_GRADIENTS.NORM_TYPE",)


def _floats(value):
    """The floats in ``value``, a config value (nested lists and tuples included)."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _floats(item)


def flat_keys(node, prefix: str = "") -> dict:
    """
    {full key: value} of the leaves of a config node.

    Args:
        node (CfgNode or dict): a config, or one of its nodes whose full name is ``prefix``
            (a LazyConfig as nested dicts: ``OmegaConf.to_container``).
        prefix (str): the node's name followed by ".", "" for the whole config.
    """
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):  # a CfgNode is a dict
            out.update(flat_keys(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
            # a LazyConfig's list of nodes (augmentations): keys by index, as its overrides
            out.update(flat_keys(dict(enumerate(value)), f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_finite(cfg, prefix: str = ""):
    """
    Raise if a float of ``cfg`` (in a list or tuple too) is NaN or infinite,
    naming the key. Infinity is allowed only for the keys in :data:`INFINITY_ALLOWED`.

    Args:
        cfg (CfgNode or dict): a config, or one of its nodes whose full name is ``prefix``.
        prefix (str): the node's name followed by ".", "" for the whole config.
    """
    for name, value in flat_keys(cfg, prefix).items():
        for number in _floats(value):
            if math.isnan(number) or (math.isinf(number) and name not in INFINITY_ALLOWED):
                allowed = "a number or inf" if name in INFINITY_ALLOWED else "a finite number"
                raise ValueError(f"{name}={value} is not finite; it must be {allowed}.")


def check_class_weighting_name(weighting):
    """Raise, naming the key and what is allowed, for a CLASS_WEIGHTING not in :data:`CLASS_WEIGHTINGS`."""
    if weighting not in CLASS_WEIGHTINGS:
        raise ValueError(
            f"MODEL.FOCAL.CLASS_WEIGHTING={weighting!r} is not one of {list(CLASS_WEIGHTINGS)}."
        )


def check_retinanet_keys_unused(cfg):
    """
    Raise if a ``MODEL.RETINANET`` key that FocalRetinaNet ignores was changed
    from Detectron2's default, naming the ``MODEL.FOCAL`` key to use instead.
    """
    defaults = get_cfg().MODEL.RETINANET
    for key, replacement in _RETINANET_KEYS_REPLACED.items():
        value = cfg.MODEL.RETINANET[key]
        default = defaults[key]
        if value != default:
            raise ValueError(
                f"MODEL.RETINANET.{key}={value} is not read by FocalRetinaNet; "
                f"leave it at {default} and set {replacement} instead."
            )
