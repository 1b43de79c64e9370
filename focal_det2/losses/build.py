import importlib.util
import os

from detectron2.config import CfgNode as CN
from detectron2.utils.registry import Registry

from ..config import flat_keys
from ..registry import lookup, register_as

__all__ = [
    "EXTRA_LOSSES_ENV",
    "FOCAL_LOSS_REGISTRY",
    "build_focal_loss",
    "check_keys_read",
    "loss_keys",
    "other_losses_keys",
    "load_extra_losses",
    "register_loss",
    "registered_losses",
]

# os.pathsep-separated files that register more losses (a loss outside the package), run by
# :func:`load_extra_losses` when focal_det2 is imported.
EXTRA_LOSSES_ENV = "FOCAL_DET2_EXTRA_LOSSES"
_extra_loaded = set()  # the files load_extra_losses has run

FOCAL_LOSS_REGISTRY = Registry("FOCAL_LOSS")
FOCAL_LOSS_REGISTRY.__doc__ = """
Registry for dense classification losses, chosen by ``MODEL.FOCAL.LOSS``.

The registered object is called with ``(cfg)`` and returns a loss with the
interface of :class:`focal_det2.losses.DenseClassificationLoss`; register a
loss class with :func:`register_loss`.
"""


def register_loss(name: str):
    """
    Class decorator: registers a :class:`DenseClassificationLoss` subclass as
    ``MODEL.FOCAL.LOSS name`` (:func:`~focal_det2.registry.register_as`); the class
    gets ``name``.
    """

    def register(cls):
        if name in FOCAL_LOSS_REGISTRY:
            other = FOCAL_LOSS_REGISTRY.get(name)
            other = getattr(other, "built_class", other)
            raise ValueError(
                f"MODEL.FOCAL.LOSS name {name!r} of {cls.__module__}.{cls.__qualname__} is already "
                f"registered by {other.__module__}.{other.__qualname__}: choose another name, or "
                "load the file once (a module of focal_det2/losses/ is imported with the package; "
                "do not also name it in FOCAL_DET2_EXTRA_LOSSES)."
            )
        return register_as(FOCAL_LOSS_REGISTRY, name)(cls)

    return register


def registered_losses() -> dict:
    """{name: loss class} of every loss registered with :func:`register_loss`, in name order."""
    return {
        name: build.built_class
        for name, build in sorted(FOCAL_LOSS_REGISTRY)
        if hasattr(build, "built_class")
    }


def load_extra_losses():
    """
    Run each file named in ``FOCAL_DET2_EXTRA_LOSSES`` (``os.pathsep``-separated) once,
    so that the losses it registers with :func:`register_loss` join the registry;
    ``import focal_det2`` calls it. An error in a file carries a note naming it
    (Python >= 3.11), and the losses it registered before the error are unregistered, so
    that the fixed file loads in the same process.
    """
    for path in filter(None, os.environ.get(EXTRA_LOSSES_ENV, "").split(os.pathsep)):
        path = os.path.abspath(path)
        if path in _extra_loaded:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{EXTRA_LOSSES_ENV} names {path}, which is not a file.")
        if os.path.dirname(path) == os.path.dirname(os.path.abspath(__file__)):
            raise ValueError(
                f"{EXTRA_LOSSES_ENV} names {path}, a module of focal_det2/losses/, which the "
                f"package imports itself: remove it from {EXTRA_LOSSES_ENV}."
            )
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path
        )
        before = {name for name, _ in FOCAL_LOSS_REGISTRY}
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as e:
            for name in {name for name, _ in FOCAL_LOSS_REGISTRY} - before:
                FOCAL_LOSS_REGISTRY._obj_map.pop(name)  # fvcore's Registry has no unregister
            note = f"while running {path}, named by {EXTRA_LOSSES_ENV}"
            if isinstance(e, ImportError) and "relative import" in str(e):
                note += (
                    "; a loss file outside the package imports it by name "
                    "(from focal_det2.losses import register_loss), not relatively"
                )
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(note)
            raise
        _extra_loaded.add(path)


def loss_keys(loss_class) -> dict:
    """{full key: default} of the keys that ``loss_class.add_config`` adds to ``MODEL.FOCAL``."""
    cfg = CN({"MODEL": CN({"FOCAL": CN()})})
    loss_class.add_config(cfg)
    return flat_keys(cfg.MODEL.FOCAL, "MODEL.FOCAL.")


def other_losses_keys(loss_class) -> dict:
    """
    {full key: (default, loss name)} of the keys that other registered losses add to
    ``MODEL.FOCAL`` and ``loss_class`` does not: the keys it would not read.
    """
    own = loss_keys(loss_class)
    return {
        key: (default, name)
        for name, other in registered_losses().items()
        for key, default in loss_keys(other).items()
        if key not in own
    }


def _value(cfg, key: str):
    """The value of the dotted ``key`` in ``cfg``, or None if ``cfg`` lacks it."""
    node = cfg
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_keys_read(cfg, loss_class):
    """
    Raise, naming the key, for a ``MODEL.FOCAL`` key that ``cfg`` moves from
    its default although ``loss_class`` would not read it: another loss's own
    key (``STAR_BETA`` of focal_star, ``OHEM.*`` of ohem). ``GAMMA`` for a loss without
    gamma, ``ALPHA`` beside ``CLASS_ALPHA`` for a loss that reads only the latter and
    ``CB_BETA`` without ``CLASS_WEIGHTING`` are refused by the loss's constructor
    (:class:`DenseClassificationLoss`), for a LazyConfig's loss node too.
    """
    name = getattr(loss_class, "name", loss_class.__name__)
    for key, (default, other_name) in other_losses_keys(loss_class).items():
        value = _value(cfg, key)
        if value is not None and value != default:
            raise ValueError(
                f"{key}={value} is read by MODEL.FOCAL.LOSS {other_name}, not by {name}; "
                f"leave it at {default}, or set MODEL.FOCAL.LOSS {other_name}."
            )


def build_focal_loss(cfg):
    """
    Build the loss named by ``cfg.MODEL.FOCAL.LOSS``. Calling it with
    ``(logits, labels)`` returns the sum over valid anchors at
    ``MODEL.FOCAL.GAMMA``; ``gamma=`` overrides the gamma. Losses that select
    anchors (``ohem``) take ``num_images=`` (a minibatch per image) and, where
    they select by the predicted boxes (``needs_boxes``: ``ohem`` with NMS),
    ``boxes=``, and sum over the anchors they keep.
    A key the loss would not read is an error (:func:`check_keys_read`).
    """
    build = lookup(
        FOCAL_LOSS_REGISTRY,
        cfg.MODEL.FOCAL.LOSS,
        "MODEL.FOCAL.LOSS",
        hint=f"A loss registers when its file runs: a module of focal_det2/losses/, or a file "
        f"named in {EXTRA_LOSSES_ENV}.",
    )
    if hasattr(build, "built_class"):
        check_keys_read(cfg, build.built_class)
    return build(cfg)
