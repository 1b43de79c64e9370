from detectron2.utils.registry import Registry

from ..config import lookup

FOCAL_LOSS_REGISTRY = Registry("FOCAL_LOSS")
FOCAL_LOSS_REGISTRY.__doc__ = """
Registry for dense classification losses, chosen by ``MODEL.FOCAL.LOSS``.

The registered object is called with ``(cfg)`` and returns a loss with the
interface of :class:`focal_det2.losses.DenseClassificationLoss`.
"""


def build_focal_loss(cfg):
    """
    Build the loss named by ``cfg.MODEL.FOCAL.LOSS``. Calling it with
    ``(logits, labels)`` returns the sum over valid anchors at
    ``MODEL.FOCAL.GAMMA``; ``gamma=`` overrides the gamma.
    """
    return lookup(FOCAL_LOSS_REGISTRY, cfg.MODEL.FOCAL.LOSS, "MODEL.FOCAL.LOSS")(cfg)
