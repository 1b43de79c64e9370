from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.registry import Registry

from ..losses import DenseClassificationLoss, build_focal_loss
from ..registry import lookup
from ..schedules import build_gamma_schedule, initial_gamma

__all__ = ["FOCAL_HEAD_REGISTRY", "build_focal_head", "FocalRetinaNetHead"]

FOCAL_HEAD_REGISTRY = Registry("FOCAL_HEAD")
FOCAL_HEAD_REGISTRY.__doc__ = """
Registry for dense heads, chosen by ``MODEL.FOCAL.HEAD_NAME``.

The registered object is called with ``(cfg, input_shape: List[ShapeSpec],
loss=..., init_gamma=...)``, where ``loss`` is the model's
:class:`DenseClassificationLoss` and ``init_gamma`` the gamma at iteration 0,
and returns a module that maps per-level features to ``(logits, deltas)``,
each a list of (N, A * C, Hi, Wi) and (N, A * 4, Hi, Wi) tensors, where C
is the loss's ``num_logits``.
"""


def build_focal_head(
    cfg, input_shape: List[ShapeSpec], *, loss: DenseClassificationLoss, init_gamma: float
):
    """
    Build the head named by ``cfg.MODEL.FOCAL.HEAD_NAME``.

    Args:
        cfg (CfgNode): the model's config.
        input_shape (list[ShapeSpec]): the shapes of the features the head reads.
        loss (DenseClassificationLoss): the model's loss (the classifier's width and bias).
        init_gamma (float): gamma at iteration 0 (the gamma schedule's start).
    """
    name = cfg.MODEL.FOCAL.HEAD_NAME
    head = lookup(FOCAL_HEAD_REGISTRY, name, "MODEL.FOCAL.HEAD_NAME")
    return head(cfg, input_shape, loss=loss, init_gamma=init_gamma)


@FOCAL_HEAD_REGISTRY.register()
class FocalRetinaNetHead(RetinaNetHead):
    """
    Detectron2's RetinaNet head whose classifier predicts the number of
    logits the loss asks for (K for sigmoid losses, K+1 for softmax), with
    the bias the loss derives from the foreground prior. Parameter names and,
    for the sigmoid loss, shapes and initial bias equal RetinaNetHead's.
    """

    @configurable
    def __init__(
        self,
        *,
        loss: DenseClassificationLoss,
        prior_prob: float = 0.01,
        init_gamma: Optional[float] = None,
        **kwargs,
    ):
        """
        Args:
            loss (DenseClassificationLoss): decides the classifier's width and bias.
            prior_prob (float): foreground prior pi in (0, 1) (MODEL.FOCAL.PRIOR_PROB).
            init_gamma (float or None): gamma at iteration 0 (the gamma schedule's
                start); the bias gives the prior at that gamma. None: the loss's gamma.
            kwargs: the other arguments of :class:`RetinaNetHead`, without ``num_classes``.
        """
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.FOCAL.PRIOR_PROB={prior_prob} must be in (0, 1).")
        if init_gamma is not None:
            loss.check_gamma(init_gamma, "init_gamma (MODEL.FOCAL.GAMMA_SCHEDULE.START)")
        super().__init__(num_classes=loss.num_logits, prior_prob=prior_prob, **kwargs)
        num_anchors = self.cls_score.out_channels // loss.num_logits
        with torch.no_grad():
            self.cls_score.bias.copy_(
                loss.init_bias(prior_prob, gamma=init_gamma).repeat(num_anchors)
            )

    @classmethod
    def from_config(
        cls,
        cfg,
        input_shape: List[ShapeSpec],
        loss: Optional[DenseClassificationLoss] = None,
        init_gamma: Optional[float] = None,
    ):
        """
        ``loss`` and ``init_gamma`` are the model's (see :func:`build_focal_head`);
        the head built alone, ``FocalRetinaNetHead(cfg, input_shape)``, builds
        them from ``cfg``.
        """
        ret = super().from_config(cfg, input_shape)
        del ret["num_classes"]
        ret["loss"] = build_focal_loss(cfg) if loss is None else loss
        ret["prior_prob"] = cfg.MODEL.FOCAL.PRIOR_PROB
        if init_gamma is None:
            init_gamma = initial_gamma(build_gamma_schedule(cfg))
        ret["init_gamma"] = init_gamma
        return ret
