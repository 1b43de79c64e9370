import logging
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_anchor_generator, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..config import check_finite, check_retinanet_keys_unused
from ..losses import DenseClassificationLoss, build_focal_loss
from ..schedules import ConstantGamma, GammaSchedule, build_gamma_schedule, initial_gamma
from .head import build_focal_head

__all__ = ["BOX_REG_LOSS_TYPES", "FocalRetinaNet"]

logger = logging.getLogger(__name__)

# What Detectron2's dense box regression loss takes (box_regression._dense_box_regression_loss).
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")


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
            kwargs: arguments of :class:`RetinaNet` but its loss's ``focal_loss_alpha`` and
                ``focal_loss_gamma``, which ``focal_loss`` and ``gamma_schedule`` replace.
        """
        replaced = sorted(set(kwargs) & {"focal_loss_alpha", "focal_loss_gamma"})
        if replaced:
            raise ValueError(
                f"FocalRetinaNet does not read RetinaNet's {replaced}: pass focal_loss "
                "(MODEL.FOCAL.ALPHA, MODEL.FOCAL.GAMMA) and gamma_schedule instead."
            )
        super().__init__(**kwargs)
        self._check_boxes()
        # RetinaNet's defaults, which nothing here reads: code written for RetinaNet must not either.
        del self.focal_loss_alpha, self.focal_loss_gamma
        if focal_loss.num_classes != self.num_classes:
            raise ValueError(
                f"the loss has {focal_loss.num_classes} classes, the model {self.num_classes}; "
                "both must be MODEL.RETINANET.NUM_CLASSES."
            )
        if not focal_loss.uses_gamma and not isinstance(gamma_schedule, ConstantGamma):
            schedule = getattr(gamma_schedule, "name", type(gamma_schedule).__name__)
            loss = getattr(focal_loss, "name", type(focal_loss).__name__)
            raise ValueError(
                f"MODEL.FOCAL.GAMMA_SCHEDULE.NAME={schedule}: MODEL.FOCAL.LOSS={loss} has no "
                "gamma to schedule; use 'constant'."
            )
        # the key of the smallest gamma: the start's (a rising ramp) or the end's (a falling
        # ramp, a constant)
        rising = gamma_schedule(0) < gamma_schedule.end
        smallest = "MODEL.FOCAL.GAMMA_SCHEDULE.START" if rising else "MODEL.FOCAL.GAMMA"
        focal_loss.check_gamma(gamma_schedule.min_gamma, smallest)
        self.focal_loss = focal_loss
        self.gamma_schedule = gamma_schedule
        self.sync_normalizer = sync_normalizer
        # What inference needs of the loss, in TorchScript-able form: the classifier's
        # width and the scores (a module without parameters or state_dict entries).
        self.num_logits = focal_loss.num_logits
        self.class_scores = focal_loss.score_module()

    def _check_boxes(self):
        """
        Raise, naming the key, for box settings RetinaNet accepts but fails on at the first
        training step, after a run has written its output: anchors that are not 4-value boxes
        (RotatedAnchorGenerator's 5) and an unknown box regression loss.
        """
        box_dim = getattr(self.anchor_generator, "box_dim", 4)
        if box_dim != 4:
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.NAME={type(self.anchor_generator).__name__} gives "
                f"{box_dim}-value anchors; RetinaNet's matcher and box transform take 4-value "
                "(XYXY) boxes: use DefaultAnchorGenerator."
            )
        if self.box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE={self.box_reg_loss_type!r} is not one of "
                f"{list(BOX_REG_LOSS_TYPES)}."
            )

    @classmethod
    def from_config(cls, cfg):
        """
        RetinaNet's arguments, with our head, loss and gamma schedule, each
        built once. ``RetinaNet.from_config`` is not called: it builds a
        ``RetinaNetHead`` unconditionally, which this model would throw away
        (a test checks that the two give the same RetinaNet arguments).
        The backbone and the head are built in RetinaNet's order, so that
        with the same seed the sigmoid model starts from RetinaNet's weights.
        """
        check_finite(cfg.MODEL, "MODEL.")  # a run checks every key (checks.check_cfg)
        check_retinanet_keys_unused(cfg)
        node = cfg.MODEL.RETINANET
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        feature_shapes = [shapes[f] for f in node.IN_FEATURES]
        focal_loss = build_focal_loss(cfg)
        gamma_schedule = build_gamma_schedule(cfg)
        init_gamma = initial_gamma(gamma_schedule)
        head = build_focal_head(cfg, feature_shapes, loss=focal_loss, init_gamma=init_gamma)
        logger.info(f"FocalRetinaNet: loss {focal_loss}, gamma schedule {gamma_schedule}.")
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": node.IN_FEATURES,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=node.BBOX_REG_WEIGHTS),
            "anchor_matcher": Matcher(
                node.IOU_THRESHOLDS, node.IOU_LABELS, allow_low_quality_matches=True
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": node.NUM_CLASSES,
            "smooth_l1_beta": node.SMOOTH_L1_LOSS_BETA,
            "box_reg_loss_type": node.BBOX_REG_LOSS_TYPE,
            "test_score_thresh": node.SCORE_THRESH_TEST,
            "test_topk_candidates": node.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": node.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
            "focal_loss": focal_loss,
            "gamma_schedule": gamma_schedule,
            "sync_normalizer": cfg.MODEL.FOCAL.SYNC_NORMALIZER,
        }

    def forward_training(self, images, features, predictions, gt_instances):
        """
        :meth:`RetinaNet.forward_training` for a classifier of ``num_logits``
        (K or K + 1) per anchor; RetinaNet's transposes ``num_classes``.
        """
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_logits, 4]
        )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    @torch.no_grad()
    def anchor_logits(self, batched_inputs: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor]:
        """
        The classifier logits and anchor labels a training step on
        ``batched_inputs`` computes its classification loss from.

        Args:
            batched_inputs (list[dict]): as for :meth:`forward`, with "instances".

        Returns:
            Tensor: (N, R, num_logits) logits, anchors in Detectron2's order.
            Tensor: (N, R) int64 labels: 0..K-1 class, K background, -1 ignored.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        pred_logits, _ = self._transpose_dense_predictions(
            self.head(features), [self.num_logits, 4]
        )
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        gt_labels, _ = self.label_anchors(self.anchor_generator(features), gt_instances)
        return cat(pred_logits, dim=1), torch.stack(gt_labels)

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
        self.focal_loss.check_class_weights_set()  # before the normaliser's average moves
        storage = get_event_storage()
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / len(gt_labels))
        normalizer = self.normalizer(num_pos_anchors)

        gamma = self.gamma_schedule(storage.iter)
        storage.put_scalar("focal_gamma", gamma, smoothing_hint=False)  # the value, not a median
        selection = {"num_images": len(gt_labels)}  # OHEM takes a minibatch per image
        if self.focal_loss.needs_boxes:  # ranked by loss under NMS of their predicted boxes
            selection["boxes"] = self._predicted_boxes(anchors, pred_anchor_deltas)
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
            return self.box2box_transform.apply_deltas(
                deltas.flatten(0, 1), anchors.repeat(len(deltas), 1)
            )

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        """
        :meth:`RetinaNet.forward_inference` with the loss's scores
        (``self.class_scores``) instead of a sigmoid; scripts and traces.
        """
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_logits, 4]
        )
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores_per_image = [self.class_scores(x[img_idx]) for x in pred_logits]
            deltas_per_image = [x[img_idx] for x in pred_anchor_deltas]
            results.append(
                self.inference_single_image(anchors, scores_per_image, deltas_per_image, image_size)
            )
        return results
