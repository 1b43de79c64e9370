"""
Checkpoints of a run: which file a run loads (:func:`checkpoint_to_load`), the
checks that it exists (a URL is fetched, :func:`fetch_url`), is not empty and
fits the model before the run writes anything (:func:`check_checkpoint_fits`,
:func:`load_fitting`, where Detectron2 warns and goes on with tensors at their
initialisation), where ``--eval-only`` writes, the output folder a new run
refuses, and the plain attributes a checkpoint keeps beside the model
(:class:`AttributeState`). The yacs
(:mod:`.engine`) and LazyConfig (:mod:`.lazy`) runs share them; :class:`RunKeys`
names the config keys their errors name.
"""

import contextlib
import logging
import os
import re
import warnings
from typing import NamedTuple, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .class_balance import CHECKPOINT_KEY, ClassWeights

__all__ = [
    "EVALUATING",
    "RESUMING",
    "YACS_KEYS",
    "AttributeState",
    "RunKeys",
    "check_checkpoint_fits",
    "check_output_dir_free",
    "checkpoint_to_load",
    "evaluation_output_dir",
    "fetch_url",
    "focal_loss_of",
    "load_fitting",
    "load_for_evaluation",
    "naming_checkpoint",
]

logger = logging.getLogger(__name__)


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
    A ``metrics.json`` alone (a run that stopped before its first checkpoint) is
    named as such: there is nothing to resume.
    """
    if not os.path.isdir(output_dir):
        return
    found = sorted(
        name
        for name in os.listdir(output_dir)
        if _RUN_FILE.fullmatch(name) and os.path.getsize(os.path.join(output_dir, name)) > 0
    )
    if found == ["metrics.json"]:  # a run that stopped before its first checkpoint
        raise FileExistsError(
            f"{keys.output_dir} {output_dir} holds the metrics.json of a run that saved no "
            "checkpoint, which a new run would append to (--resume would too, from scratch). "
            f"Delete metrics.json, or set {keys.output_dir} to another folder."
        )
    if found:
        raise FileExistsError(
            f"{keys.output_dir} {output_dir} holds a training run ({', '.join(found)}), which a "
            f"new run would overwrite. Pass --resume to continue it{keys.extend}, set "
            f"{keys.output_dir} to another folder, or delete this one."
        )


def fetch_url(checkpoint: str, keys: RunKeys = YACS_KEYS):
    """
    Download a checkpoint at a URL (the configs' ImageNet weights) into iopath's cache,
    where Detectron2's checkpointer then reads it, so that a URL that cannot be fetched (no
    network) stops the run before it writes anything, naming the key and what to pass
    instead. A local path, "" or None (no checkpoint) is left alone.
    """
    if "://" not in (checkpoint or ""):
        return
    try:
        PathManager.get_local_path(checkpoint)
    except OSError as e:  # urllib's URLError, a refused socket
        raise OSError(f"{checkpoint} cannot be fetched ({e}). {_offline(checkpoint, keys)}") from e


def _offline(url: str, keys: RunKeys) -> str:
    """What to pass instead of ``url`` when it cannot be fetched."""
    return (
        f"{url} is a URL ({keys.weights}): without network, download it elsewhere "
        f"and pass the file ({keys.weights}{keys.sep}<file>), or "
        f'{keys.weights}{keys.sep}"" to start from random weights.'
    )


@contextlib.contextmanager
def naming_checkpoint(path: str, keys: RunKeys = YACS_KEYS):
    """
    Add a note naming the checkpoint ``path`` to any error raised inside: torch.load's
    errors (a truncated file, say) do not name the file. A URL that cannot be fetched
    (no network: the configs' ImageNet weights) also gets what to pass instead.
    """
    try:
        yield
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"while loading the checkpoint {path}")
            if "://" in path and isinstance(e, OSError):  # urllib's URLError, a refused socket
                e.add_note(_offline(path, keys))
        raise


def focal_loss_of(model):
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
    with naming_checkpoint(path, keys):
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
    weights = ClassWeights(focal_loss_of(model), cfg.DATASETS.TRAIN, training=False)
    load_fitting(model, path, {CHECKPOINT_KEY: weights})
    if weights.source is None:
        logger.info(
            f"{cfg.MODEL.WEIGHTS} holds no class weights; the loss has none, which does not "
            "change inference scores (inference does not call the loss)."
        )


def evaluation_output_dir(
    checkpoint: str, output_dir: str, resume: bool, keys: RunKeys = YACS_KEYS
) -> str:
    """
    Where ``--eval-only`` writes: ``output_dir/eval/<checkpoint name>``, beside
    and not over the training run's files; a checkpoint file outside ``output_dir``
    (another run's ``model_final.pth``) is ``eval/<its folder's name>-<checkpoint name>``,
    so that it does not replace the evaluation of this run's own. Raises, naming the
    keys, where there is no checkpoint to evaluate.

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
            + f". Pass {keys.weights}{keys.sep}<file>.pth (e.g. {keys.output_dir}/model_final.pth)"
            + (
                f", or set {keys.output_dir} to the folder of a training run."
                if resume
                else f", or --resume to evaluate {keys.output_dir}'s last checkpoint."
            )
        )
    name = os.path.splitext(os.path.basename(checkpoint))[0]
    folder = os.path.dirname(os.path.realpath(checkpoint))
    if "://" not in checkpoint and folder != os.path.realpath(output_dir):
        name = f"{os.path.basename(folder)}-{name}"  # another run's: not this run's eval folder
    return os.path.join(output_dir, "eval", name)
