import logging
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..config import check_finite, check_retinanet_keys_unused
from ..losses import DenseClassificationLoss, build_focal_loss
from ..schedules import ConstantGamma, GammaSchedule, build_gamma_schedule
from .head import build_focal_head

__all__ = ["FocalRetinaNet"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class FocalRetinaNet(RetinaNet):
    """
    Detectron2's RetinaNet with a swappable classification loss
    (``MODEL.FOCAL.LOSS``), head (``MODEL.FOCAL.HEAD_NAME``) and gamma schedule.

    With ``sigmoid_focal`` and default values it is a drop-in replacement for
    RetinaNet: same parameters, losses and detections.
    """

    @configurable
    def __init__(
        self,
        *,
        focal_loss: DenseClassificationLoss,
        gamma_schedule: GammaSchedule,
        sync_normalizer: bool = False,
        **kwargs,
    ):
        """
        Args:
            focal_loss (DenseClassificationLoss): the classification loss.
            gamma_schedule (GammaSchedule): gamma as a function of the iteration.
            sync_normalizer (bool): sum the foreground count over processes before
                the moving average (MODEL.FOCAL.SYNC_NORMALIZER).
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        if focal_loss.num_classes != self.num_classes:
            raise ValueError(
                f"the loss has {focal_loss.num_classes} classes, the model {self.num_classes}."
            )
        if not focal_loss.uses_gamma and not isinstance(gamma_schedule, ConstantGamma):
            raise ValueError(
                f"MODEL.FOCAL.GAMMA_SCHEDULE.NAME: {type(focal_loss).__name__} does not read gamma; "
                "use 'constant'."
            )
        focal_loss.check_gamma(gamma_schedule.min_gamma, "MODEL.FOCAL.GAMMA_SCHEDULE.START")
        self.focal_loss = focal_loss
        self.gamma_schedule = gamma_schedule
        self.sync_normalizer = sync_normalizer

    @classmethod
    def from_config(cls, cfg):
        check_finite(cfg)
        check_retinanet_keys_unused(cfg)
        ret = super().from_config(cfg)
        # RetinaNet's own focal-loss parameters are replaced by the loss object.
        del ret["focal_loss_alpha"], ret["focal_loss_gamma"]
        shapes = ret["backbone"].output_shape()
        ret["head"] = build_focal_head(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        ret["focal_loss"] = build_focal_loss(cfg)
        ret["gamma_schedule"] = build_gamma_schedule(cfg)
        ret["sync_normalizer"] = cfg.MODEL.FOCAL.SYNC_NORMALIZER
        logger.info(f"FocalRetinaNet: loss {ret['focal_loss']}, gamma schedule {ret['gamma_schedule']}.")
        return ret

    def _transpose_logits_and_deltas(self, predictions):
        return self._transpose_dense_predictions(predictions, [self.focal_loss.num_logits, 4])

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_anchor_deltas = self._transpose_logits_and_deltas(predictions)
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    def normalizer(self, num_pos_anchors: int) -> float:
        """
        Moving average of the foreground count, as in RetinaNet. With
        ``sync_normalizer`` the count is summed over processes first and the
        result divided by the number of processes, so that DDP's gradient
        average equals one process over the whole batch.

        The average lives in the plain attribute ``loss_normalizer``, outside
        the state_dict (so RetinaNet checkpoints load strictly);
        :class:`focal_det2.engine.FocalTrainer` checkpoints it separately.
        """
        if not self.sync_normalizer or comm.get_world_size() == 1:
            return self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)
        total = torch.tensor([num_pos_anchors], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        ema = self._ema_update("loss_normalizer", max(total.item(), 1), 100)
        return ema / comm.get_world_size()

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Same inputs and outputs as :meth:`RetinaNet.losses`; the classification
        term is ``self.focal_loss`` at the scheduled gamma, which is logged as
        the scalar ``focal_gamma``.
        """
        storage = get_event_storage()
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / len(gt_labels))
        normalizer = self.normalizer(num_pos_anchors)

        gamma = self.gamma_schedule(storage.iter)
        storage.put_scalar("focal_gamma", gamma, smoothing_hint=False)  # the value, not a median
        selection = {}
        if self.focal_loss.needs_boxes:  # OHEM ranks anchors by loss under NMS of their predicted boxes
            selection = {"boxes": self._predicted_boxes(anchors, pred_anchor_deltas), "num_images": len(gt_labels)}
        loss_cls = self.focal_loss(
            cat(pred_logits, dim=1).flatten(0, 1), gt_labels.flatten(), gamma=gamma, **selection
        )
        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}

    def _predicted_boxes(self, anchors: List[Boxes], pred_anchor_deltas: List[Tensor]) -> Tensor:
        """(N * R, 4) the boxes the anchors predict, image after image, without gradient."""
        with torch.no_grad():
            deltas = cat(pred_anchor_deltas, dim=1)  # (N, R, 4)
            anchors = Boxes.cat(anchors).tensor  # (R, 4)
            return self.box2box_transform.apply_deltas(deltas.flatten(0, 1), anchors.repeat(len(deltas), 1))

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]):
        pred_logits, pred_anchor_deltas = self._transpose_logits_and_deltas(predictions)
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores_per_image = [self.focal_loss.scores(x[img_idx]) for x in pred_logits]
            deltas_per_image = [x[img_idx] for x in pred_anchor_deltas]
            results.append(
                self.inference_single_image(anchors, scores_per_image, deltas_per_image, image_size)
            )
        return results
