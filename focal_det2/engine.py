"""
The trainer used by train_net.py: Detectron2's DefaultTrainer with COCO
evaluation, multi-process training on CPUs, checked training data and an
exact ``--resume``; :func:`setup_cfg`, which checks a config before a run
writes anything; and what the LazyConfig path (:mod:`.lazy`) shares with it:
the checkpoint and output-folder checks (:class:`RunKeys` names the keys),
:func:`load_fitting` and :func:`build_on_meta`.
"""

import contextlib
import difflib
import itertools
import json
import logging
import os
import re
import warnings
from typing import Callable, NamedTuple, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .class_balance import CHECKPOINT_KEY, ClassWeights, CountClassWeights
from .config import add_focal_config, check_finite, flat_keys, load_config
from .data.checks import (
    CheckedDatasetMapper,
    check_degenerate_boxes_option,
    load_checked_dataset_dicts,
)
from .registry import lookup
from .schedules import build_gamma_schedule, unfinished_warning

__all__ = [
    "AttributeState",
    "FocalTrainer",
    "ResumableTrainLoader",
    "ResumableTrainingSampler",
    "RunKeys",
    "ScalarHistory",
    "build_on_meta",
    "check_cfg",
    "check_checkpoint_fits",
    "check_cuda_device",
    "check_device",
    "check_output_dir_free",
    "check_run_inputs",
    "checkpoint_to_load",
    "create_ddp_model_by_device",
    "ddp_device_ids_by_device",
    "drop_metrics_from",
    "evaluation_output_dir",
    "extends_finished_run",
    "load_for_evaluation",
    "load_fitting",
    "setup_cfg",
    "YACS_KEYS",
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
    The training loader of :class:`FocalTrainer`: checked dataset dicts and a
    mapper, made into Detectron2's train loader when first iterated, from
    the iteration :attr:`start_iter` holds then. ``resume_or_load`` sets it
    after the checkpoint is read, so a resumed run builds (and checks its
    data) once.
    """

    def __init__(self, cfg, dataset, mapper, start_iter: int = 0):
        """
        Args:
            cfg (CfgNode): the training config (DATALOADER, SOLVER.IMS_PER_BATCH, SEED).
            dataset (list[dict]): checked dataset dicts.
            mapper (callable): maps a dataset dict to the model's input.
            start_iter (int): the first iteration the loader feeds, >= 0.
        """
        self.cfg, self.dataset, self.mapper = cfg, dataset, mapper
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
        cfg, start_iter = self.cfg, self.start_iter
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if start_iter:
                logger.warning(
                    f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: the resumed run restarts "
                    "its data order; only 'TrainingSampler' continues it."
                )
            return build_detection_train_loader(cfg, dataset=self.dataset, mapper=self.mapper)
        mixed = start_iter and cfg.DATALOADER.ASPECT_RATIO_GROUPING and _orientations(self.dataset)
        if mixed:
            logger.warning(
                f"DATALOADER.ASPECT_RATIO_GROUPING with {mixed}: the resumed run's batches differ "
                "from an uninterrupted run's where the images are of both orientations (the partly "
                "filled batch of each group at the checkpoint is not restored). Set it False for "
                "an exact resume."
            )
        # A loader with W workers deals batches round-robin from the workers, in
        # rounds of W; the sampler skips whole rounds, the loader the remainder.
        per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        workers = max(cfg.DATALOADER.NUM_WORKERS, 1)
        skipped_rounds = start_iter // workers
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        sampler = ResumableTrainingSampler(
            len(self.dataset), skip=skipped_rounds * workers * per_process, seed=seed
        )
        loader = build_detection_train_loader(
            cfg, dataset=self.dataset, mapper=self.mapper, sampler=sampler
        )
        remainder = start_iter - skipped_rounds * workers
        return itertools.islice(loader, remainder, None)


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


class AttributeState:
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


class RunKeys(NamedTuple):
    """How the errors about a run's checkpoint, output folder and model name their keys."""

    weights: str  # the checkpoint a run starts from
    output_dir: str
    loss: str  # the classification loss
    num_classes: str
    sep: str  # between a key and its value on train_net.py's command line
    extend: str  # how a finished run is extended, "" where a resume cannot


YACS_KEYS = RunKeys(
    "MODEL.WEIGHTS",
    "OUTPUT_DIR",
    "MODEL.FOCAL.LOSS",
    "NUM_CLASSES",
    " ",
    " (a larger SOLVER.MAX_ITER extends a finished run)",
)


# What a run's config may be (train_net.py's --config-file), never a checkpoint.
_CONFIG_SUFFIXES = (".yaml", ".yml", ".py", ".json")


def checkpoint_to_load(
    output_dir: str, weights: str, resume: bool, keys: RunKeys = YACS_KEYS
) -> str:
    """
    The checkpoint file a run loads, as Detectron2's checkpointer chooses it:
    with ``resume`` and a ``last_checkpoint`` file in ``output_dir``, the
    file it names; otherwise ``weights`` (MODEL.WEIGHTS; "" for none).
    Raises, naming the file, where Detectron2 would fail without naming it
    or name the folder: an empty ``last_checkpoint``, a checkpoint it names
    that does not exist, a local checkpoint file of 0 bytes, and ``weights``
    naming a config file (.yaml, .yml, .py, .json; torch.load's error for
    it is about unpickling).

    Args:
        output_dir (str): the output folder (OUTPUT_DIR), where ``last_checkpoint`` lives.
        weights (str): the checkpoint to start from (MODEL.WEIGHTS), a path or a URL.
        resume (bool): ``--resume``.
        keys (RunKeys): the config keys the errors name.
    """
    last = os.path.join(output_dir, "last_checkpoint")
    if resume and os.path.isfile(last):
        with open(last) as f:
            name = f.read().strip()
        if not name:
            raise ValueError(
                f"{last} is empty; it must hold the file name of a checkpoint in {output_dir} "
                f"(e.g. model_final.pth). Write one there, or delete it to start from {keys.weights}."
            )
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{last} names {name!r}, but {path} does not exist.")
        source, fix = (
            f"{path} (named by {last})",
            "write an earlier checkpoint's name into last_checkpoint",
        )
    else:
        if not weights or "://" in weights:
            return weights
        path, source, fix = weights, f"{keys.weights}={weights}", "pass a complete checkpoint"
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{source} is a folder; pass a checkpoint file in it "
                f"(e.g. {os.path.join(path, 'model_final.pth')})."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source}: the file does not exist.")
        if path.lower().endswith(_CONFIG_SUFFIXES):
            raise ValueError(
                f"{source} is a config file, not a checkpoint: pass it with --config-file, and "
                f"{keys.weights} a checkpoint (a .pth file torch.save wrote, or Detectron2's .pkl)."
            )
    if os.path.getsize(path) == 0:
        raise ValueError(f"{source} is empty (0 bytes), e.g. from an interrupted save: {fix}.")
    return path


# Files of a training run in OUTPUT_DIR that a new run would overwrite or append to.
_RUN_FILE = re.compile(r"last_checkpoint|model_final\.pth|model_\d{7}\.pth|metrics\.json")


def check_output_dir_free(output_dir: str, keys: RunKeys = YACS_KEYS):
    """
    Raise ``FileExistsError``, naming the folder and what it holds, if
    ``output_dir`` holds a training run: a ``last_checkpoint``, Detectron2's
    ``model_final.pth`` or ``model_<iteration>.pth``, or a non-empty
    ``metrics.json``. A new run (not ``--resume``) would overwrite the
    checkpoints and append its metrics to the old ones; Detectron2 does so silently.
    """
    if not os.path.isdir(output_dir):
        return
    found = sorted(
        name
        for name in os.listdir(output_dir)
        if _RUN_FILE.fullmatch(name) and os.path.getsize(os.path.join(output_dir, name)) > 0
    )
    if found:
        raise FileExistsError(
            f"{keys.output_dir} {output_dir} holds a training run ({', '.join(found)}), which a "
            f"new run would overwrite. Pass --resume to continue it{keys.extend}, set "
            f"{keys.output_dir} to another folder, or delete this one."
        )


@contextlib.contextmanager
def _naming_checkpoint(path: str):
    """Add a note naming the checkpoint ``path`` to any error raised inside: torch.load's
    errors (a truncated file, say) do not name the file."""
    try:
        yield
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"while loading the checkpoint {path}")
        raise


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
            self.class_weights = ClassWeights(_focal_loss_of(self.checkpointer.model), cfg)
            self.checkpointer.add_checkpointable(CHECKPOINT_KEY, self.class_weights)

    def build_hooks(self):
        hooks = [ScalarHistory()] + super().build_hooks()
        if self.cfg.MODEL.FOCAL.CLASS_WEIGHTING != "none":
            # reads self.class_weights in before_train; counts the records the loader holds
            loader = self.data_loader
            loaded = loader.dataset if isinstance(loader, ResumableTrainLoader) else None
            hooks.insert(0, CountClassWeights(loaded))
        return hooks

    def resume_or_load(self, resume=True):
        """
        :meth:`DefaultTrainer.resume_or_load`, with errors that name the
        checkpoint file (see :func:`checkpoint_to_load`), and on a resume the
        data order and scalar history continued and the metrics.json records
        of the iterations it trains again dropped (:func:`drop_metrics_from`).
        """
        checkpoint = checkpoint_to_load(self.cfg.OUTPUT_DIR, self.cfg.MODEL.WEIGHTS, resume)
        with _naming_checkpoint(checkpoint):
            super().resume_or_load(resume=resume)
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
        names = cfg.DATASETS.TRAIN
        proposal_files = cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else ()
        if proposal_files and len(proposal_files) != len(names):
            raise ValueError(
                f"DATASETS.PROPOSAL_FILES_TRAIN has {len(proposal_files)} files for the "
                f"{len(names)} data sets of DATASETS.TRAIN (MODEL.LOAD_PROPOSALS True): one each."
            )
        dataset = [
            record
            for i, name in enumerate(names)
            for record in load_checked_dataset_dicts(
                name,
                **_num_classes(cfg),
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                degenerate_boxes=cfg.DATALOADER.DEGENERATE_BOXES,
                min_keypoints=(
                    cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                    if cfg.MODEL.KEYPOINT_ON
                    else 0
                ),
                proposal_file=proposal_files[i] if proposal_files else None,
            )
        ]
        if len(names) > 1:
            check_metadata_consistency("thing_classes", names)
        return ResumableTrainLoader(
            cfg, dataset, CheckedDatasetMapper(cfg, is_train=True), start_iter
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
            DatasetCatalog.get(
                dataset_name
            )  # a lazily generated data set writes its json on first load
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


def _focal_loss_of(model):
    """The loss of a FocalRetinaNet, or an error naming CLASS_WEIGHTING for other models."""
    loss = getattr(model, "focal_loss", None)
    if loss is None:
        raise ValueError(
            f"MODEL.FOCAL.CLASS_WEIGHTING needs MODEL.META_ARCHITECTURE FocalRetinaNet, "
            f"got {type(model).__name__}; set CLASS_WEIGHTING none."
        )
    return loss


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible keys of its last load in :attr:`incompatible`."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


# What a checkpoint that leaves model tensors at their initialisation would do, as
# :func:`_check_fits` says it.
EVALUATING = "Evaluating would score with those tensors at their random initialisation."
RESUMING = (
    "Resuming would go on from those tensors at their random initialisation, over the run's "
    "config.yaml, metrics and evaluation."
)


def _check_fits(path: str, incompatible, keys: RunKeys, consequence: str = EVALUATING):
    """
    Raise, naming the checkpoint and the tensors, if a load left parameters of the model at
    their initialisation (for evaluation, or to resume a run): Detectron2 skips a tensor of
    another shape (a softmax_focal checkpoint has K + 1 logits per anchor, a sigmoid one K)
    with a warning.
    """
    if incompatible is None:
        return
    shapes = [
        f"{name} is {tuple(ckpt)} in the checkpoint but {tuple(model)} in the model"
        for name, ckpt, model in incompatible.incorrect_shapes
    ]
    skipped = {name for name, _, _ in incompatible.incorrect_shapes}
    missing = [name for name in incompatible.missing_keys if name not in skipped]
    if not shapes and not missing:
        return
    if shapes:
        fix = (
            "Use the config the checkpoint was trained with (its run's config.yaml): the same "
            f"{keys.loss} (softmax_focal has {keys.num_classes} + 1 logits per anchor), "
            f"{keys.num_classes} and backbone."
        )
    else:
        fix = (
            "Pass a trained detector's checkpoint, not a backbone's (such as the ImageNet "
            f"weights a COCO config trains from), or {keys.weights}{keys.sep}'' for a random model."
        )
    missing = [f"missing from the checkpoint: {', '.join(missing)}"] if missing else []
    raise ValueError(
        f"{path} does not fit the model of this config: {'; '.join(shapes + missing)}. "
        f"{consequence} {fix}"
    )


def load_fitting(
    model,
    path: str,
    checkpointables: Optional[dict] = None,
    keys: RunKeys = YACS_KEYS,
    consequence: str = EVALUATING,
):
    """
    Load the checkpoint ``path`` (a file or a URL) into ``model``, and its entries
    named by the keys of ``checkpointables`` into their values. An error while
    loading (a truncated file) carries a note that names the checkpoint; a
    checkpoint that leaves model tensors at their initialisation is an error
    naming them (see :func:`_check_fits`, which says the ``consequence``) and the
    config ``keys`` to fix.
    """
    checkpointer = _RecordingCheckpointer(model)
    for key, value in (checkpointables or {}).items():
        checkpointer.add_checkpointable(key, value)
    with _naming_checkpoint(path):
        checkpointer.load(path, checkpointables=list(checkpointables or ()))
    _check_fits(path, checkpointer.incompatible, keys, consequence)


def check_checkpoint_fits(
    meta_model: Optional[torch.nn.Module], path: str, consequence: str, keys: RunKeys = YACS_KEYS
):
    """
    :func:`load_fitting` of ``path`` into ``meta_model``, the run's model as :func:`check_cfg`
    (or :func:`.lazy.check_model`) builds it on the meta device (nothing is copied), so that
    a checkpoint of another loss or NUM_CLASSES is refused, naming the config ``keys``,
    before the run writes anything. Nothing to check without a model (one the meta device
    cannot build: the run's own load checks it) or a checkpoint.
    """
    if meta_model is None or not path:
        return
    with warnings.catch_warnings():  # each tensor copied into a meta parameter is a no-op
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
        load_fitting(meta_model, path, keys=keys, consequence=consequence)


def load_for_evaluation(cfg, model):
    """
    Load ``cfg.MODEL.WEIGHTS`` into ``model`` for evaluation, as
    ``DetectionCheckpointer.resume_or_load(weights, resume=False)`` does, and, with
    ``MODEL.FOCAL.CLASS_WEIGHTING`` on, the checkpoint's class weights into the
    model's loss (never counted here). A checkpoint without them (trained with
    ``none``, or a Detectron2 checkpoint) leaves the loss without weights and says so:
    inference scores do not depend on the loss or its weights. An error while
    loading (a truncated file) carries a note that names the checkpoint. A checkpoint
    that leaves model tensors at their initialisation (another shape, or missing: one
    trained with another loss or NUM_CLASSES) is an error naming them, where Detectron2
    warns and evaluates a partly random model.
    """
    path = checkpoint_to_load(cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, resume=False)
    if cfg.MODEL.FOCAL.CLASS_WEIGHTING == "none":
        load_fitting(model, path)
        return
    weights = ClassWeights(_focal_loss_of(model), cfg, training=False)
    load_fitting(model, path, {CHECKPOINT_KEY: weights})
    if weights.source is None:
        logger.info(
            f"{cfg.MODEL.WEIGHTS} holds no class weights; the loss has none, which does not "
            "change inference scores (inference does not call the loss)."
        )


def check_cfg(cfg) -> Optional[torch.nn.Module]:
    """
    Raise for a config value a run would reject, before the run writes
    anything: a float key that is NaN or infinite, every check the model
    build makes, and ``DATALOADER.DEGENERATE_BOXES``. Returns the model built
    on the meta device (None where it cannot be).

    The model build's checks are spread over Detectron2's backbone, anchor
    generator and RetinaNet and over our loss, gamma schedule and head, and
    some need the backbone's output shapes; so the whole meta-architecture is
    constructed, but on the ``meta`` device (:func:`build_on_meta`): modules
    and shapes without memory, weight initialisation or random draws, then
    dropped. That costs a small part of a real CPU build and leaves the run's
    own build (after ``default_setup`` seeds it) the only one that allocates.
    A model the meta device cannot build is left to the run's build, with a
    warning; MODEL.FOCAL moved from its defaults under one of Detectron2's own
    meta-architectures (which read none of it) is refused either way.
    """
    check_finite(cfg)
    check_degenerate_boxes_option(cfg.DATALOADER.DEGENERATE_BOXES)
    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "cpu"  # a CUDA run is checked the same on a machine without one
    meta_arch = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")
    model = build_on_meta(lambda: meta_arch(meta_cfg))
    if meta_arch.__module__.startswith("detectron2."):
        _check_focal_node_unset(cfg)  # a user's own model may read MODEL.FOCAL
    return model


def check_run_inputs(cfg, eval_only: bool):
    """
    Raise, naming the key, for what a run would fail on only after writing (a training run,
    after training): a data set name in DATASETS.TRAIN (training) or DATASETS.TEST that is not
    registered in Detectron2's ``DatasetCatalog`` (register your own before this check, as
    Detectron2's builtin ones are at import), and a MODEL.DEVICE of CUDA where PyTorch sees
    no CUDA device.
    """
    registered = DatasetCatalog.list()
    for key in ("DATASETS.TEST",) if eval_only else ("DATASETS.TRAIN", "DATASETS.TEST"):
        for name in cfg.DATASETS.get(key.split(".")[1]):
            if name not in registered:
                close = difflib.get_close_matches(name, registered, n=3, cutoff=0.8)
                raise KeyError(
                    f"{key}: {name!r} is not a registered data set"
                    + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                    + " (register your own with DatasetCatalog before the run is set up)."
                )
    check_device(cfg)


def check_device(cfg):
    """
    Raise, naming MODEL.DEVICE, for a CUDA device where PyTorch sees none (torch's own error
    names no key); the tools that run a model check it after loading their config.
    """
    check_cuda_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")


def check_cuda_device(device: str, key: str, sep: str = " "):
    """
    Raise, naming ``key``, if ``device`` is CUDA where PyTorch sees no CUDA device.

    Args:
        device (str): the device a run would use ("cuda", "cuda:1", "cpu").
        key (str): its config key (MODEL.DEVICE; a LazyConfig's train.device).
        sep (str): between the key and a value on train_net.py's command line.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"{key}={device}, but PyTorch sees no CUDA device here "
            f"(torch.cuda.is_available() is False): set {key}{sep}cpu."
        )


def _check_focal_node_unset(cfg):
    """
    Raise, naming them, for MODEL.FOCAL keys moved from their defaults: the config's
    meta-architecture, one of Detectron2's own, reads none.
    """
    defaults = get_cfg()
    add_focal_config(defaults)
    default = flat_keys(defaults.MODEL.FOCAL, "MODEL.FOCAL.")
    changed = [
        f"{key}={value}"
        for key, value in flat_keys(cfg.MODEL.FOCAL, "MODEL.FOCAL.").items()
        if value != default[key]
    ]
    if changed:
        raise ValueError(
            f"{', '.join(changed)}: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} does not "
            "read MODEL.FOCAL. Leave it at its defaults, or set META_ARCHITECTURE FocalRetinaNet."
        )


def evaluation_output_dir(
    checkpoint: str, output_dir: str, resume: bool, keys: RunKeys = YACS_KEYS
) -> str:
    """
    Where ``--eval-only`` writes: ``output_dir/eval/<checkpoint name>``, beside
    and not over the training run's files. Raises, naming the keys, where there
    is no checkpoint to evaluate.

    Args:
        checkpoint (str): what :func:`checkpoint_to_load` chose ("" for none).
        output_dir (str): the run's output folder (OUTPUT_DIR).
        resume (bool): ``--resume``.
        keys (RunKeys): the config keys the error names.
    """
    if not checkpoint:
        raise ValueError(
            f"--eval-only needs a trained model: {keys.weights} is empty"
            + (f" and {output_dir} has no last_checkpoint" if resume else "")
            + f". Pass {keys.weights}{keys.sep}<file>.pth (e.g. {keys.output_dir}/model_final.pth), "
            f"or --resume to evaluate {keys.output_dir}'s last checkpoint."
        )
    return os.path.join(output_dir, "eval", os.path.splitext(os.path.basename(checkpoint))[0])


def build_on_meta(build: Callable[[], torch.nn.Module]) -> Optional[torch.nn.Module]:
    """
    ``build()`` on the ``meta`` device: modules and shapes without memory,
    weight initialisation or random draws, so that every check of the
    constructors runs before a run writes anything. None, with a log line, for
    a model whose constructor computes with tensors (Detectron2's ViT, MViT and
    Swin backbones call ``.item()``), which the meta device cannot run; its
    errors then come from the run's own build.
    """
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError) as e:
        if not re.search(r"\bmeta\b", str(e), re.IGNORECASE):  # "meta tensors", "'Meta' backend"
            raise
        logger.warning(
            f"The model is not checked before the run: it cannot be built on the meta device ({e})."
        )
        return None


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
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="focal_det2")
    if not eval_only:
        warning = unfinished_warning(build_gamma_schedule(cfg), cfg.SOLVER.MAX_ITER)
        if warning:
            logger.warning(warning)
    return cfg
