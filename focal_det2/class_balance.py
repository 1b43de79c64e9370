"""
Class-balanced weights from the effective number of samples (Cui et al., "Class-Balanced
Loss Based on Effective Number of Samples", CVPR 2019, eq. 3 and section 4):
``MODEL.FOCAL.CLASS_WEIGHTING effective_number`` with ``MODEL.FOCAL.CB_BETA`` (a LazyConfig's
``model.focal_loss.class_weighting`` and ``cb_beta``).

Class c with n_c training instances has the effective number ``E_c = (1 - beta^n_c) / (1 - beta)``
and the weight ``w_c = 1 / E_c = (1 - beta) / (1 - beta^n_c)``, normalised here to mean 1 over
the K classes. The loss weighs every term of an anchor whose label is c by ``w_c``
(:meth:`DenseClassificationLoss.set_class_weights`). The counts are taken once, before the
first training iteration, from the records the trainer's loader trains on (``DATASETS.TRAIN``
after ``FILTER_EMPTY_ANNOTATIONS`` and ``DEGENERATE_BOXES``; from Detectron2's
``DatasetCatalog`` where no records are given, as for a LazyConfig's
``dataloader.train.dataset.names``), and the weights are checkpointed under the key
``"class_weights"``, so that ``--resume`` and ``--eval-only`` use them without counting again.
"""

import logging
from typing import List, NamedTuple, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from tabulate import tabulate
from torch import Tensor

from .data.checks import has_area

__all__ = [
    "CHECKPOINT_KEY",
    "LAZY_WEIGHT_KEYS",
    "YACS_WEIGHT_KEYS",
    "ClassWeights",
    "WeightKeys",
    "count_instances",
    "effective_number_weights",
]

logger = logging.getLogger(__name__)

# The checkpoint's top-level key of the class weights (outside the model's state_dict).
CHECKPOINT_KEY = "class_weights"


def effective_number_weights(counts: Sequence[int], beta: float) -> Tensor:
    """
    Args:
        counts (sequence[int]): n_c >= 1, the training instances of each of the K classes.
        beta (float): in [0, 1) (MODEL.FOCAL.CB_BETA); 0 gives equal weights.

    Returns:
        Tensor: (K,) float64, ``w_c = (1 - beta) / (1 - beta^n_c)`` divided by its mean.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"MODEL.FOCAL.CB_BETA={beta} must be in [0, 1).")
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if not n.numel() or (n < 1).any():
        raise ValueError(f"class counts {list(counts)} must be >= 1 each.")
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return weights / weights.mean()


def _class_names(dataset_names: Sequence[str], num_classes: int) -> List[str]:
    """thing_classes of the first data set's metadata, or "" for each class when it has none."""
    names = (
        MetadataCatalog.get(dataset_names[0]).get("thing_classes", None) if dataset_names else None
    )
    return list(names) if names and len(names) == num_classes else [""] * num_classes


def count_instances(
    dataset_names: Sequence[str],
    num_classes: int,
    dataset_dicts: Optional[List[dict]] = None,
    num_classes_key: str = "MODEL.RETINANET.NUM_CLASSES",
) -> List[int]:
    """
    Instances of each class in the data sets, as Detectron2's ``DatasetCatalog`` loads
    them: the boxes training sees (crowd annotations, which training ignores, and boxes
    without area, which ``DATALOADER.DEGENERATE_BOXES drop`` drops, not counted).

    Args:
        dataset_names (sequence[str]): registered data sets (DATASETS.TRAIN).
        num_classes (int): K; every ``category_id`` must be in [0, K).
        dataset_dicts (list[dict] or None): the records of all of them, already loaded (the
            trainer's); None loads them through ``DatasetCatalog``.
        num_classes_key (str): the config key of K, for the error.

    Returns:
        list[int]: K counts.
    """
    counts = [0] * num_classes
    if dataset_dicts is None:
        sources = ((name, DatasetCatalog.get(name)) for name in dataset_names)
    else:
        sources = [(", ".join(dataset_names), dataset_dicts)]
    for name, records in sources:
        for record in records:
            for ann in record.get("annotations", ()):
                if ann.get("iscrowd", 0) or not has_area(ann["bbox"], ann["bbox_mode"]):
                    continue
                c = ann["category_id"]
                if not 0 <= c < num_classes:
                    raise ValueError(
                        f"data set {name!r}, image {record.get('image_id', record.get('file_name'))}: "
                        f"category_id {c} outside [0, {num_classes}) ({num_classes_key})."
                    )
                counts[c] += 1
    return counts


class WeightKeys(NamedTuple):
    """How the class weights' warnings and errors name their config keys."""

    beta: str
    datasets: str
    weighting: str
    num_classes: str


YACS_WEIGHT_KEYS = WeightKeys(
    "MODEL.FOCAL.CB_BETA",
    "DATASETS.TRAIN",
    "MODEL.FOCAL.CLASS_WEIGHTING",
    "MODEL.RETINANET.NUM_CLASSES",
)
LAZY_WEIGHT_KEYS = WeightKeys(
    "model.focal_loss.cb_beta",
    "dataloader.train.dataset.names",
    "model.focal_loss.class_weighting",
    "model.num_classes",
)


class ClassWeights:
    """
    The class weights of a loss as a checkpointable (registered with the trainer's
    checkpointer under :data:`CHECKPOINT_KEY`): ``state_dict`` holds the weights with the
    counts, beta and data sets they came from; ``load_state_dict`` sets them on the loss.
    """

    def __init__(
        self,
        loss,
        datasets: Sequence[str],
        training: bool = True,
        keys: WeightKeys = YACS_WEIGHT_KEYS,
    ):
        """
        Args:
            loss (DenseClassificationLoss): the loss whose weights these are; its ``cb_beta``
                (MODEL.FOCAL.CB_BETA) and ``num_classes`` are read.
            datasets (sequence[str]): the registered training data sets (DATASETS.TRAIN).
            training (bool): False for an evaluation, which loads the weights without the
                warnings about weights counted with another CB_BETA or DATASETS.TRAIN.
            keys (WeightKeys): the config keys the messages name.
        """
        self.loss, self.training, self.keys = loss, training, keys
        self.beta = float(loss.cb_beta)
        self.datasets = list(datasets)
        self.counts: Optional[List[int]] = None
        self.source: Optional[str] = None  # "counted", or "checkpoint" once loaded

    def state_dict(self):
        if self.loss.class_weights is None:
            return {}
        return {
            "weights": list(self.loss.class_weights),
            "counts": self.counts,
            "beta": self.beta,
            "datasets": self.datasets,
        }

    def load_state_dict(self, state):
        if not state:
            return
        self.loss.set_class_weights(state["weights"])
        self.counts, self.source = state.get("counts"), "checkpoint"
        if self.training and state.get("beta") != self.beta:
            logger.warning(
                f"{self.keys.beta}={self.beta}, but the checkpoint's class weights were counted "
                f"with beta {state.get('beta')}; the checkpoint's weights are used."
            )
        datasets = state.get("datasets")
        if self.training and datasets is not None and list(datasets) != self.datasets:
            logger.warning(
                f"{self.keys.datasets}={self.datasets}, but the checkpoint's class weights were counted "
                f"on {list(datasets)}; the checkpoint's weights are used (train without "
                "--resume to count the new sets)."
            )
        logger.info("Class weights from the checkpoint (not recounted):\n" + self.table())

    def count(self, dataset_dicts: Optional[List[dict]] = None):
        """
        Count DATASETS.TRAIN, set the loss's weights and log them; raises for a class with
        no instance. ``dataset_dicts``: its records, already loaded (see :func:`count_instances`).
        """
        num_classes = self.loss.num_classes
        counts = count_instances(self.datasets, num_classes, dataset_dicts, self.keys.num_classes)
        names = _class_names(self.datasets, num_classes)
        missing = [
            f"{c} ({names[c]!r})" if names[c] else str(c) for c, n in enumerate(counts) if n == 0
        ]
        if missing:
            raise ValueError(
                f"{self.keys.weighting} effective_number: class {', '.join(missing)} has no "
                f"instance in {self.keys.datasets}={self.datasets}; every class needs at least "
                f"one (or set {self.keys.weighting} none)."
            )
        self.loss.set_class_weights(effective_number_weights(counts, self.beta).tolist())
        self.counts, self.source = counts, "counted"
        logger.info(
            f"Class weights, effective number (beta {self.beta}) of {self.datasets}:\n"
            + self.table()
        )

    def table(self) -> str:
        names = _class_names(self.datasets, self.loss.num_classes)
        counts = self.counts or [None] * self.loss.num_classes
        rows = [(c, names[c], counts[c], f"{w:.4f}") for c, w in enumerate(self.loss.class_weights)]
        return tabulate(rows, headers=["class", "name", "instances", "weight"], tablefmt="pipe")


class CountClassWeights(HookBase):
    """
    Counts the trainer's ``class_weights`` (a :class:`ClassWeights`) before the first
    iteration, unless the checkpoint the trainer resumed from held them.
    """

    def __init__(self, dataset_dicts: Optional[List[dict]] = None):
        """
        Args:
            dataset_dicts (list[dict] or None): DATASETS.TRAIN's records as the trainer
                loaded them, counted instead of loading them again; None loads them.
        """
        self.dataset_dicts = dataset_dicts

    def before_train(self):
        weights = self.trainer.class_weights
        if weights.loss.class_weights is None:
            weights.count(self.dataset_dicts)
