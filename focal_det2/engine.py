"""
The trainer used by train_net.py: Detectron2's DefaultTrainer with COCO
evaluation, multi-process training on CPUs, checked training data and an
exact ``--resume``; and :func:`setup_cfg`, which checks a config (:mod:`.checks`)
and the checkpoint a run loads (:mod:`.checkpoint`) before the run writes
anything. The LazyConfig path (:mod:`.lazy`) shares its DDP helpers and its resume
(:class:`ResumableTrainLoader`, :class:`ScalarHistory`, :func:`drop_metrics_from`).
"""

import contextlib
import itertools
import json
import logging
import os
from typing import Optional

import torch
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import (
    EVALUATING,
    RESUMING,
    AttributeState,
    check_checkpoint_fits,
    check_output_dir_free,
    checkpoint_to_load,
    evaluation_output_dir,
    fetch_url,
    focal_loss_of,
    naming_checkpoint,
)
from .checks import check_cfg, check_run_inputs
from .class_balance import CHECKPOINT_KEY, ClassWeights, CountClassWeights
from .config import load_config
from .data.checks import CheckedDatasetMapper, load_checked_datasets
from .registry import lookup
from .schedules import build_gamma_schedule, unfinished_warning

__all__ = [
    "FocalTrainer",
    "ResumableTrainLoader",
    "ResumableTrainingSampler",
    "ScalarHistory",
    "create_ddp_model_by_device",
    "ddp_device_ids_by_device",
    "drop_metrics_from",
    "extends_finished_run",
    "setup_cfg",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ddp_device_ids_by_device():
    """
    The one replacement of a Detectron2 function in focal_det2, active only
    while :class:`FocalTrainer` runs ``DefaultTrainer.__init__``.

    Why: ``DefaultTrainer.__init__`` wraps the model with the module-level
    ``detectron2.engine.defaults.create_ddp_model``, which passes
    ``device_ids=[local_rank]`` for every model, and DistributedDataParallel
    rejects ``device_ids`` for a CPU module ("device_ids and output_device
    arguments only work with ... GPU modules"); upstream has the same code.
    ``__init__`` takes no argument for it and offers no method to override
    between building and wrapping the model, so short of copying
    ``DefaultTrainer.__init__`` the call can only be changed here. Within
    this context it is :func:`create_ddp_model_by_device` (which the
    LazyConfig trainer calls directly); the original function is put back on
    exit, also on an error.
    """
    create_ddp_model = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = create_ddp_model_by_device
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create_ddp_model


def create_ddp_model_by_device(model, **kwargs):
    """
    Detectron2's ``create_ddp_model``, with ``device_ids=None`` for a CPU model
    (DistributedDataParallel takes ``device_ids`` for GPU modules only); a CUDA
    model is wrapped exactly as Detectron2 does.
    """
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


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


class ResumableTrainLoader:
    """
    The training loader of :class:`FocalTrainer` and of a LazyConfig run: loaded
    records made into Detectron2's train loader when first iterated, from the
    iteration :attr:`start_iter` holds then. A resume sets it after the checkpoint
    is read, so a resumed run loads (and checks) its data once.
    """

    def __init__(
        self,
        dataset,
        build,
        *,
        batch_size: int,
        workers: int,
        grouping: str,
        seed: Optional[int] = None,
        restarts: str = "",
        start_iter: int = 0,
    ):
        """
        Args:
            dataset (list[dict] or None): the records (None: ``build`` loads them).
            build (callable): ``build(sampler)``, Detectron2's train loader of ``dataset``
                drawing from ``sampler`` (None: the loader's own sampler).
            batch_size (int): images per batch of this process.
            workers (int): the loader's worker processes (0 for none).
            grouping (str): the config key that turns on the loader's grouping of images
                by aspect ratio, named in a resume's warning; "" where it is off.
            seed (int or None): the seed of the data order; None for a shared random seed.
            restarts (str): "" where the data order continues; otherwise the warning a
                resume logs as it restarts the order (with a sampler of another kind).
            start_iter (int): the first iteration the loader feeds, >= 0.
        """
        self.dataset, self._build_loader = dataset, build
        self._batch_size, self._workers, self._grouping = batch_size, workers, grouping
        self._seed, self.restarts = seed, restarts
        self._start_iter, self._started = 0, False
        self.start_iter = start_iter

    @property
    def start_iter(self) -> int:
        """The first iteration the loader feeds; set it before the first ``iter()``."""
        return self._start_iter

    @start_iter.setter
    def start_iter(self, value: int):
        if value < 0:
            raise ValueError(f"start_iter={value} must be >= 0.")
        if self._started:
            raise RuntimeError(
                "start_iter is read when the loader is first iterated; it already was."
            )
        self._start_iter = value

    def __iter__(self):
        self._started = True
        return iter(self._build())

    def _build(self):
        """Detectron2's train loader whose data order starts at :attr:`start_iter`."""
        start_iter = self.start_iter
        if self.restarts:
            if start_iter:
                logger.warning(self.restarts)
            return self._build_loader(None)
        mixed = start_iter and self._grouping and _orientations(self.dataset)
        if mixed:
            logger.warning(
                f"{self._grouping} with {mixed}: the resumed run's batches differ from an "
                "uninterrupted run's where the images are of both orientations (the partly "
                "filled batch of each group at the checkpoint is not restored). Set it False "
                "for an exact resume."
            )
        # A loader with W workers deals batches round-robin from the workers, in
        # rounds of W; the sampler skips whole rounds, the loader the remainder.
        workers = max(self._workers, 1)
        skipped_rounds = start_iter // workers
        sampler = ResumableTrainingSampler(
            len(self.dataset), skip=skipped_rounds * workers * self._batch_size, seed=self._seed
        )
        remainder = start_iter - skipped_rounds * workers
        return itertools.islice(self._build_loader(sampler), remainder, None)


def _orientations(dataset) -> str:
    """
    "" if Detectron2's aspect-ratio grouping (landscape ``width > height`` apart from the
    rest) puts every record of ``dataset`` in one group; otherwise what makes it two groups
    or may: "landscape and portrait images", or "records without width and height".
    """
    landscape = {
        d["width"] > d["height"] if "width" in d and "height" in d else None for d in dataset
    }
    if None in landscape:
        return "records without width and height"
    return "landscape and portrait images" if len(landscape) > 1 else ""


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
                kept = itertools.takewhile(
                    lambda value_iter: value_iter[1] > since, reversed(values)
                )
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


def _num_classes(cfg) -> dict:
    """
    The number of classes the model of ``cfg`` detects, which the training data's classes
    must fit, and its key, as :func:`load_checked_dataset_dicts` takes them:
    MODEL.ROI_HEADS.NUM_CLASSES for Detectron2's ``GeneralizedRCNN`` (and its subclasses),
    MODEL.RETINANET.NUM_CLASSES for the others (FocalRetinaNet, RetinaNet).
    """
    meta_arch = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
    if issubclass(meta_arch, GeneralizedRCNN):
        key, value = "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES
    else:
        key, value = "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    return {"num_classes": value, "num_classes_key": key}


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
    configs have none), and with ``DATALOADER.ASPECT_RATIO_GROUPING`` on
    data that mixes landscape and portrait images (COCO) the batches
    differ after the resume; a warning says so.

    With ``MODEL.FOCAL.CLASS_WEIGHTING`` other than ``none``, :attr:`class_weights`
    (checkpoint key ``"class_weights"``) holds the loss's class weights: read from the
    checkpoint on ``--resume``, otherwise counted from DATASETS.TRAIN before the first
    iteration (the hook :class:`~focal_det2.class_balance.CountClassWeights`).
    """

    class_weights = None

    def __init__(self, cfg):
        if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
            # N processes with all cores' threads each would oversubscribe the CPU.
            threads = max(1, (os.cpu_count() or 1) // comm.get_local_size())
            torch.set_num_threads(threads)
            logger.info(f"{comm.get_local_size()} processes on the CPU: {threads} threads each.")
        with ddp_device_ids_by_device():
            super().__init__(cfg)
        # checkpointer.model is the model without its DDP wrapper.
        self.checkpointer.add_checkpointable(
            "loss_normalizer", AttributeState(self.checkpointer.model, "loss_normalizer")
        )
        if cfg.MODEL.FOCAL.CLASS_WEIGHTING != "none":
            self.class_weights = ClassWeights(
                focal_loss_of(self.checkpointer.model), cfg.DATASETS.TRAIN
            )
            self.checkpointer.add_checkpointable(CHECKPOINT_KEY, self.class_weights)

    def build_hooks(self):
        hooks = [ScalarHistory()] + super().build_hooks()
        if self.cfg.MODEL.FOCAL.CLASS_WEIGHTING != "none":
            # reads self.class_weights in before_train; counts the records the loader holds
            loader = self.data_loader
            loaded = loader.dataset if isinstance(loader, ResumableTrainLoader) else None
            hooks.insert(0, CountClassWeights(loaded))
        return hooks

    finished = False  # set by resume_or_load: a resumed run with nothing left to do

    def resume_or_load(self, resume=True):
        """
        :meth:`DefaultTrainer.resume_or_load`, with errors that name the
        checkpoint file (see :func:`checkpoint_to_load`), and on a resume the
        data order and scalar history continued and the metrics.json records
        of the iterations it trains again dropped (:func:`drop_metrics_from`).
        A resume of a finished run (:meth:`_finished`) says so and leaves it as
        it is: :meth:`train` does nothing (Detectron2 would evaluate it again and
        append the record at MAX_ITER + 1).
        """
        checkpoint = checkpoint_to_load(self.cfg.OUTPUT_DIR, self.cfg.MODEL.WEIGHTS, resume)
        with naming_checkpoint(checkpoint):
            super().resume_or_load(resume=resume)
        self.finished = resume and self._finished()
        if self.finished:
            logger.info(
                f"The run in {self.cfg.OUTPUT_DIR} is finished: its last checkpoint is of "
                f"iteration {self.start_iter - 1}, SOLVER.MAX_ITER={self.cfg.SOLVER.MAX_ITER}. "
                "Nothing to train; --eval-only --resume evaluates it, a larger SOLVER.MAX_ITER "
                "extends it."
            )
            return
        if resume and comm.is_main_process():
            drop_metrics_from(
                os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"),
                self.start_iter,
                keep_final_evaluation=extends_finished_run(
                    checkpoint, self.start_iter, self.cfg.SOLVER.MAX_ITER
                ),
            )
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
        self.data_loader.start_iter = (
            self.start_iter
        )  # DefaultTrainer.data_loader: ours, not yet iterated

    def _finished(self) -> bool:
        """Whether the resumed run is finished (:func:`finished_run`)."""
        cfg = self.cfg
        return finished_run(
            cfg.OUTPUT_DIR, self.start_iter, cfg.SOLVER.MAX_ITER, bool(cfg.DATASETS.TEST)
        )

    def train(self):
        """:meth:`DefaultTrainer.train`; nothing for a finished run (see :meth:`resume_or_load`)."""
        return None if self.finished else super().train()

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

        Returns:
            ResumableTrainLoader: the data is loaded and checked now, the
            loader itself is built when first iterated.
        """
        dataset = load_checked_datasets(
            cfg.DATASETS.TRAIN,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
            proposals_key="DATASETS.PROPOSAL_FILES_TRAIN (MODEL.LOAD_PROPOSALS True)",
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            degenerate_boxes=cfg.DATALOADER.DEGENERATE_BOXES,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            **_num_classes(cfg),
        )
        mapper = CheckedDatasetMapper(cfg, is_train=True)
        kind = cfg.DATALOADER.SAMPLER_TRAIN
        return ResumableTrainLoader(
            dataset,
            lambda sampler: build_detection_train_loader(
                cfg, dataset=dataset, mapper=mapper, sampler=sampler
            ),
            batch_size=cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            workers=cfg.DATALOADER.NUM_WORKERS,
            grouping="DATALOADER.ASPECT_RATIO_GROUPING"
            if cfg.DATALOADER.ASPECT_RATIO_GROUPING
            else "",
            seed=cfg.SEED if cfg.SEED >= 0 else None,
            restarts=""
            if kind == "TrainingSampler"
            else f"DATALOADER.SAMPLER_TRAIN={kind}: the resumed run restarts its data order; "
            "only 'TrainingSampler' continues it.",
            start_iter=start_iter,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader whose errors reading an image name its id and file."""
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        json_file = MetadataCatalog.get(dataset_name).get("json_file")
        if json_file and not os.path.exists(json_file):
            # a lazily generated data set (the digits, any size) writes its json on first load
            DatasetCatalog.get(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def extends_finished_run(checkpoint: str, start_iter: int, max_iter: int) -> bool:
    """
    Whether a resume from ``checkpoint`` at ``start_iter`` extends a finished run to a
    larger ``max_iter`` (SOLVER.MAX_ITER): its final evaluation is not done again then.
    A run from MODEL.WEIGHTS (``start_iter`` 0) extends nothing, whatever the file's name.
    """
    return (
        start_iter > 0
        and os.path.basename(checkpoint) == "model_final.pth"
        and max_iter > start_iter
    )


def finished_run(output_dir: str, start_iter: int, max_iter: int, evaluates: bool) -> bool:
    """
    Whether a run resumed at ``start_iter`` is finished: its last iteration trained and,
    where it ``evaluates``, its final evaluation recorded in ``output_dir/metrics.json`` (a
    record without ``total_loss`` at iteration ``max_iter`` or later). A run killed during
    its final evaluation is not: the resume evaluates it. Decided by the main process,
    which writes metrics.json, for all.
    """
    finished = start_iter >= max_iter and (
        not evaluates or has_evaluation_from(os.path.join(output_dir, "metrics.json"), max_iter)
    )
    return comm.all_gather(finished)[0] if comm.get_world_size() > 1 else finished


def has_evaluation_from(path: str, iteration: int) -> bool:
    """Whether the metrics file ``path`` holds an evaluation record (no ``total_loss``) of
    ``iteration`` or later; False where it does not exist."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        lines = [line for line in f if line.endswith("\n")]  # not a line a kill cut short
    return any(
        _iteration(line, path, n) >= iteration and "total_loss" not in json.loads(line)
        for n, line in enumerate(lines, 1)
    )


def drop_metrics_from(path: str, iteration: int, keep_final_evaluation: bool = False):
    """
    Remove the records of ``iteration`` and later from Detectron2's
    ``metrics.json``. A run killed between two checkpoints has written
    records of iterations that its resume trains again; without this, the
    resumed run's records follow them and the file holds those iterations
    twice. A last line without its newline (cut short by the kill) goes too.
    The file is rewritten in place, so that the JSONWriter, which has it
    open for appending, appends after the kept records.

    Args:
        path (str): the file, one JSON object with an ``"iteration"`` key per
            line; nothing is done if it does not exist.
        iteration (int): the first iteration the resumed run trains.
        keep_final_evaluation (bool): the resume extends a finished run
            (from ``model_final.pth`` to a larger MAX_ITER): the evaluation
            records (no ``total_loss``) that come first among those of
            ``iteration`` and later stay, if at ``iteration`` or the next: the
            finished run's final evaluation, which Detectron2 writes at
            iteration MAX_ITER, the resume's first (MAX_ITER + 1 where a resume
            of the finished run evaluated it again).
    """
    if not os.path.exists(path):
        return
    with open(path, "r+") as f:
        lines = f.readlines()
        complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
        records = [(_iteration(line, path, n), line) for n, line in enumerate(complete, 1)]
        kept = [line for i, line in records if i < iteration]
        evaluations = []
        for i, line in (r for r in records if r[0] >= iteration):
            if not keep_final_evaluation or i > iteration + 1 or "total_loss" in json.loads(line):
                break
            evaluations.append(line)
        kept += evaluations
        if len(kept) == len(lines):
            return
        f.seek(0)
        f.writelines(kept)
        f.truncate()
    logger.info(
        f"{path}: dropped the records of iterations >= {iteration} ({len(complete) - len(kept)}), "
        f"written after the checkpoint the run resumes from"
        f"{', but the final evaluation of the run it extends' if evaluations else ''}"
        f"{'' if complete is lines else ', and a cut-off last line'}."
    )


def _iteration(line: str, path: str, number: int) -> int:
    """The ``"iteration"`` of line ``number`` of the metrics file ``path``; an error naming both otherwise."""
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}, line {number}: not a metrics record with an iteration ({e}); "
            "fix or remove the line to resume."
        ) from e


def setup_cfg(args):
    """
    Config from ``args.config_file`` and ``args.opts`` (key=value overrides),
    with the MODEL.FOCAL node, frozen, after Detectron2's ``default_setup``,
    with focal_det2's log lines in Detectron2's console and ``log.txt``.

    The config is checked (:func:`check_cfg`, and the checkpoint that
    ``--resume`` or ``--eval-only`` loads, :func:`checkpoint_to_load`) before
    ``default_setup`` writes ``OUTPUT_DIR/config.yaml``, so a rejected run
    leaves OUTPUT_DIR as it was. ``--eval-only`` refuses to run without a
    checkpoint (MODEL.WEIGHTS, or ``--resume`` and a ``last_checkpoint``); its
    config sets MODEL.WEIGHTS to that file and OUTPUT_DIR to
    ``OUTPUT_DIR/eval/<checkpoint name>``, so that the evaluation writes its
    config.yaml, log.txt and inference/ there, not over the training run's.
    A training run without ``--resume`` refuses an OUTPUT_DIR that holds
    another run (:func:`check_output_dir_free`); ``--eval-only``, and ``--resume``
    of a run, refuse a checkpoint that does not fit the config's model (another
    loss or NUM_CLASSES: :func:`check_checkpoint_fits`), before writing.
    """
    cfg = load_config(args.config_file, args.opts)
    eval_only, resume = getattr(args, "eval_only", False), getattr(args, "resume", False)
    checkpoint = checkpoint_to_load(cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, resume)
    resumes_run = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if eval_only:
        cfg.OUTPUT_DIR = evaluation_output_dir(checkpoint, cfg.OUTPUT_DIR, resume)
        cfg.MODEL.WEIGHTS = checkpoint
    meta_model = check_cfg(cfg)
    check_run_inputs(cfg, eval_only)
    if eval_only or resumes_run:
        check_checkpoint_fits(meta_model, checkpoint, EVALUATING if eval_only else RESUMING)
    if not eval_only and not resume:
        check_output_dir_free(cfg.OUTPUT_DIR)
    fetch_url(checkpoint)  # last: a download
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="focal_det2")
    if not eval_only:
        warning = unfinished_warning(build_gamma_schedule(cfg), cfg.SOLVER.MAX_ITER)
        if warning:
            logger.warning(warning)
    return cfg
