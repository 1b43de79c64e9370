"""
The trainer used by train_net.py: Detectron2's DefaultTrainer with COCO
evaluation, multi-process training on CPUs, checked training data and an
exact ``--resume``.
"""
import contextlib
import itertools
import logging
import os

import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .config import add_focal_config
from .data.checks import CheckedDatasetMapper, load_checked_dataset_dicts

__all__ = ["FocalTrainer", "ResumableTrainingSampler", "ScalarHistory", "setup_cfg"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _ddp_device_ids_by_device():
    """
    DefaultTrainer wraps the model with ``create_ddp_model``, which passes
    ``device_ids=[local_rank]``; DistributedDataParallel rejects ``device_ids``
    for a CPU module. Within this context a CPU model is wrapped with
    ``device_ids=None`` and a CUDA model exactly as Detectron2 does.
    """
    create_ddp_model = d2_defaults.create_ddp_model

    def create_by_device(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create_ddp_model(model, **kwargs)

    d2_defaults.create_ddp_model = create_by_device
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create_ddp_model


class ResumableTrainingSampler(TrainingSampler):
    """
    Detectron2's :class:`TrainingSampler` (the same seeded infinite stream,
    sharded over processes) whose stream on this process starts ``skip``
    indices in, so that a resumed run continues the data order of the run it
    resumes instead of restarting it.
    """

    def __init__(self, size: int, *, skip: int = 0, shuffle: bool = True, seed: int = None):
        """
        Args:
            size (int): number of dataset dicts.
            skip (int): indices of this process's stream to drop, >= 0.
            shuffle, seed: as in :class:`TrainingSampler`.
        """
        super().__init__(size, shuffle=shuffle, seed=seed)
        if skip < 0:
            raise ValueError(f"skip={skip} must be >= 0.")
        self._skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self._skip, None)


class _DropFirstBatches:
    """An iterable over ``loader`` without its first ``count`` batches."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, count

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.count, None)


class _AttributeState:
    """
    A checkpointable (``state_dict`` / ``load_state_dict``) for plain
    attributes of an object, such as the loss normaliser EMA that
    Detectron2's DenseDetector keeps outside the model's state_dict.
    """

    def __init__(self, obj, *names: str):
        self.obj, self.names = obj, names

    def state_dict(self):
        return {n: getattr(self.obj, n) for n in self.names if hasattr(self.obj, n)}

    def load_state_dict(self, state):
        for name, value in state.items():
            setattr(self.obj, name, value)


class ScalarHistory(HookBase):
    """
    Checkpoints the scalars of the EventStorage from the last ``window_size``
    iterations, and puts them back before a resumed run starts, so that the
    median-smoothed values the writers report (metrics.json, TensorBoard,
    the console) continue exactly as in an uninterrupted run.
    """

    def __init__(self, window_size: int = 20):
        """
        Args:
            window_size (int): iterations of history kept; Detectron2's
                default writers smooth over 20.
        """
        self._window_size = window_size
        self._loaded = {}

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        if storage is None:
            return {}
        recent = {}
        for name, history in storage.histories().items():
            values = history.values()
            if values:
                since = values[-1][1] - self._window_size
                kept = itertools.takewhile(lambda value_iter: value_iter[1] > since, reversed(values))
                recent[name] = list(kept)[::-1]
        return {"scalars": recent}

    def load_state_dict(self, state):
        self._loaded = state.get("scalars", {})

    def before_train(self):
        histories = self.trainer.storage.histories()
        for name, values in self._loaded.items():
            for value, iteration in values:
                histories[name].update(value, iteration)
        self._loaded = {}


class FocalTrainer(DefaultTrainer):
    """
    DefaultTrainer that evaluates with COCOEvaluator, runs multi-process on
    CPUs too, checks the training data when it builds the loader, and
    resumes exactly.

    ``--resume`` continues an interrupted run as if it had not stopped (same
    weights and metrics.json values, given ``SEED >= 0``): on top of what
    Detectron2 checkpoints (model, optimizer, scheduler, iteration) it
    checkpoints the loss normaliser EMA (under the checkpoint key
    ``"loss_normalizer"``, not in the model's state_dict) and the recent
    scalar history, and continues the data order where it stopped.
    Random augmentations are drawn afresh after a resume (the digits
    configs have none).
    """

    def __init__(self, cfg):
        if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
            # N processes with all cores' threads each oversubscribe the CPU (8x slower, measured).
            threads = max(1, (os.cpu_count() or 1) // comm.get_local_size())
            torch.set_num_threads(threads)
            logger.info(f"{comm.get_local_size()} processes on the CPU: {threads} threads each.")
        with _ddp_device_ids_by_device():
            super().__init__(cfg)
        # checkpointer.model is the model without its DDP wrapper.
        self.checkpointer.add_checkpointable(
            "loss_normalizer", _AttributeState(self.checkpointer.model, "loss_normalizer")
        )

    def build_hooks(self):
        return [ScalarHistory()] + super().build_hooks()

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter == 0:
            return
        if self.cfg.SEED < 0:
            logger.warning("SEED < 0: the resumed run draws a new data order.")
        if comm.get_world_size() > 1 and not self.cfg.MODEL.FOCAL.SYNC_NORMALIZER:
            logger.warning(
                "MODEL.FOCAL.SYNC_NORMALIZER is off: every process keeps its own loss normaliser EMA "
                "and the checkpoint holds process 0's, which all processes resume from. Turn it on "
                "for an exact multi-process resume."
            )
        self._trainer.reset_data_loader(lambda: self.build_train_loader(self.cfg, start_iter=self.start_iter))

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        """
        Detectron2's train loader on checked data (see
        :func:`focal_det2.data.checks.check_dataset_dicts`) whose data order
        starts at iteration ``start_iter`` of the seeded stream.

        The stream is Detectron2's TrainingSampler seeded with ``cfg.SEED``
        (a shared random seed when ``SEED < 0``). The resumed order is exact
        when every batch comes out of the loader in stream order: always
        without ``DATALOADER.ASPECT_RATIO_GROUPING``, and with it when all
        images fall in one aspect-ratio group (landscape or portrait).

        Args:
            cfg (CfgNode): the training config.
            start_iter (int): the first iteration the loader feeds.
        """
        names = cfg.DATASETS.TRAIN
        dataset = [
            record
            for name in names
            for record in load_checked_dataset_dicts(
                name,
                num_classes=cfg.MODEL.RETINANET.NUM_CLASSES,
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                degenerate_boxes=cfg.DATALOADER.DEGENERATE_BOXES,
            )
        ]
        if len(names) > 1:
            check_metadata_consistency("thing_classes", names)
        mapper = CheckedDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if start_iter:
                logger.warning(
                    f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: the resumed run restarts "
                    "its data order; only 'TrainingSampler' continues it."
                )
            return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)
        # A loader with W workers deals batches round-robin from the workers, in
        # rounds of W; the sampler skips whole rounds, the loader the remainder.
        per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        workers = max(cfg.DATALOADER.NUM_WORKERS, 1)
        skipped_rounds = start_iter // workers
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        sampler = ResumableTrainingSampler(
            len(dataset), skip=skipped_rounds * workers * per_process, seed=seed
        )
        loader = build_detection_train_loader(cfg, dataset=dataset, mapper=mapper, sampler=sampler)
        remainder = start_iter - skipped_rounds * workers
        return _DropFirstBatches(loader, remainder) if remainder else loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        json_file = MetadataCatalog.get(dataset_name).get("json_file")
        if json_file and not os.path.exists(json_file):
            DatasetCatalog.get(dataset_name)  # a lazily generated data set writes its json on first load
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup_cfg(args):
    """
    Config from ``args.config_file`` and ``args.opts`` (key=value overrides),
    with the MODEL.FOCAL node, frozen, after Detectron2's ``default_setup``.
    """
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
