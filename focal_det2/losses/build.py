import importlib.util
import os

from detectron2.utils.registry import Registry

from ..config import check_class_weighting
from ..registry import lookup

__all__ = [
    "EXTRA_LOSSES_ENV",
    "FOCAL_LOSS_REGISTRY",
    "build_focal_loss",
    "load_extra_losses",
    "register_loss",
    "registered_losses",
]

# os.pathsep-separated files that register more losses (a loss outside the package), read by
# :func:`load_extra_losses`: the test suites and benchmarks/bench_loss.py call it.
EXTRA_LOSSES_ENV = "FOCAL_DET2_EXTRA_LOSSES"

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
    ``MODEL.FOCAL.LOSS name``. The registry entry, named ``name``, builds the
    loss from a config; the class is its ``loss_class`` and gets ``name``.
    """

    def register(cls):
        def build(cfg):
            return cls(cfg)

        build.__name__ = build.__qualname__ = name
        build.__doc__ = (
            f"Build :class:`{cls.__name__}` from a config (``MODEL.FOCAL.LOSS {name}``)."
        )
        build.loss_class = cls
        cls.name = name
        FOCAL_LOSS_REGISTRY.register(build)
        return cls

    return register


def registered_losses() -> dict:
    """{name: loss class} of every loss registered with :func:`register_loss`, in name order."""
    return {
        name: build.loss_class
        for name, build in sorted(FOCAL_LOSS_REGISTRY)
        if hasattr(build, "loss_class")
    }


def load_extra_losses():
    """
    Run each file named in ``FOCAL_DET2_EXTRA_LOSSES`` (``os.pathsep``-separated), so
    that the losses it registers with :func:`register_loss` join the registry.
    """
    for path in filter(None, os.environ.get(EXTRA_LOSSES_ENV, "").split(os.pathsep)):
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path
        )
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def build_focal_loss(cfg):
    """
    Build the loss named by ``cfg.MODEL.FOCAL.LOSS``. Calling it with
    ``(logits, labels)`` returns the sum over valid anchors at
    ``MODEL.FOCAL.GAMMA``; ``gamma=`` overrides the gamma. Losses that select
    anchors by their predicted boxes (``needs_boxes``: ``ohem`` with NMS)
    also take ``boxes=`` and ``num_images=`` and sum over the anchors they keep.
    """
    check_class_weighting(cfg)
    return lookup(FOCAL_LOSS_REGISTRY, cfg.MODEL.FOCAL.LOSS, "MODEL.FOCAL.LOSS")(cfg)
