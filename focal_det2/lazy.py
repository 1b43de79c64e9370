"""
Training and evaluation from Detectron2's Python ("LazyConfig") configs,
for ``train_net.py --config-file <file>.py`` (or the ``config.yaml`` a lazy
run saved): the loop of Detectron2's ``tools/lazyconfig_train_net.py`` (a
script, not an API: some installs put it in a top-level ``tools`` package,
others not at all), built from Detectron2's own trainers, hooks and
evaluation. Where it differs from that script, on purpose, it does what
``train_net.py`` does for a yacs config: the config is checked before
anything is written (an override of a key the config lacks is refused
unless written ``+key=value``; an output folder that holds a run is refused
without ``--resume``; a checkpoint to load is named when it is missing or
empty; the model is built on the ``meta`` device first); ``--eval-only``
writes to ``train.output_dir/eval/<checkpoint name>`` and evaluates
``last_checkpoint`` with ``--resume``; it, and ``--resume`` of a run, refuse
a checkpoint that does not fit the model before writing; several processes
train on the CPU; the loss normaliser's moving average is checkpointed; class
weights (``model.focal_loss.class_weighting``) are counted from
``dataloader.train.dataset.names`` and checkpointed; ``--resume`` continues a
run exactly (:func:`lazy_train_loader`, the smoothed scalars checkpointed,
the metrics.json records of the iterations trained again dropped); the
training data is loaded and checked as a YAML run's (:func:`_train_records`); and
focal_det2's log lines reach the console and ``log.txt``. ``configs/lazy/`` holds FocalRetinaNet's configs of this kind.
"""

import difflib
import logging
import os
import re
from typing import List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import losses
from .checkpoint import (
    EVALUATING,
    RESUMING,
    AttributeState,
    RunKeys,
    check_checkpoint_fits,
    check_output_dir_free,
    checkpoint_to_load,
    evaluation_output_dir,
    fetch_url,
    load_fitting,
    naming_checkpoint,
)
from .checks import (
    build_on_meta,
    check_backend,
    check_cuda_device,
    check_dataset_files,
    check_registered,
)
from .class_balance import CHECKPOINT_KEY, LAZY_WEIGHT_KEYS, ClassWeights, CountClassWeights
from .config import check_finite, is_lazy_config
from .data.checks import (
    CheckedDatasetMapper,
    check_degenerate_boxes_option,
    load_checked_datasets,
)
from .engine import (
    ResumableTrainLoader,
    ScalarHistory,
    create_ddp_model_by_device,
    drop_metrics_from,
    extends_finished_run,
    finished_run,
)

__all__ = [
    "LAZY_KEYS",
    "check_model",
    "check_nodes",
    "check_override_keys",
    "check_run_values",
    "is_lazy_config",
    "lazy_evaluate",
    "lazy_test",
    "lazy_train",
    "lazy_train_loader",
    "setup_lazy_cfg",
]

logger = logging.getLogger(__name__)

# No extension advice: a LazyConfig lr_multiplier is a function of iteration / train.max_iter,
# so a larger train.max_iter rescales the schedule of the iterations already trained.
LAZY_KEYS = RunKeys(
    "train.init_checkpoint", "train.output_dir", "model.focal_loss", "model.num_classes", "=", ""
)

# The key of DATALOADER.DEGENERATE_BOXES (see _train_records): outside dataloader.train, whose
# nodes Detectron2 instantiates; and the arguments of get_detection_dataset_dicts it reads.
DEGENERATE_KEY = "dataloader.degenerate_boxes"
DATASET_ARGUMENTS = (
    "names",
    "filter_empty",
    "min_keypoints",
    "proposal_files",
    "check_consistency",
)

# The config node that sets what the constructors' errors name by its yacs key.
LAZY_NAMES = {
    "MODEL.FOCAL.GAMMA": "model.focal_loss.gamma",
    "MODEL.FOCAL.ALPHA": "model.focal_loss.alpha",
    "MODEL.FOCAL.CLASS_ALPHA": "model.focal_loss.class_alpha",
    "MODEL.FOCAL.LABEL_SMOOTHING": "model.focal_loss.label_smoothing",
    "MODEL.FOCAL.CLASS_WEIGHTING": "model.focal_loss.class_weighting",
    "MODEL.FOCAL.CB_BETA": "model.focal_loss.cb_beta",
    "MODEL.FOCAL.STAR_BETA": "model.focal_loss.beta",
    "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE": "model.focal_loss.batch_per_image",
    "MODEL.FOCAL.OHEM.NMS_THRESH": "model.focal_loss.nms_thresh",
    "MODEL.FOCAL.OHEM.POS_FRACTION": "model.focal_loss.pos_fraction",
    "MODEL.FOCAL.PRIOR_PROB": "model.head.prior_prob",
    "MODEL.FOCAL.GAMMA_SCHEDULE.NAME": "model.gamma_schedule._target_",
    "MODEL.FOCAL.GAMMA_SCHEDULE.START": "model.gamma_schedule.start",
    "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS": "model.gamma_schedule.iters",
    "MODEL.FOCAL.GAMMA_SCHEDULE.STEPS": "model.gamma_schedule.steps",
    "MODEL.RETINANET.NUM_CLASSES": "model.num_classes",
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "model.box_reg_loss_type",
}


def setup_lazy_cfg(args):
    """
    The LazyConfig ``args.config_file`` with ``args.opts`` (``a.b=value``
    overrides), after Detectron2's ``default_setup`` and with focal_det2's
    logger writing to the console and ``train.output_dir/log.txt``. As
    :func:`.engine.setup_cfg` does for yacs, before anything is written: the
    overrides' keys (:func:`check_override_keys`), the nodes the run reads
    (:func:`check_nodes`) and every float (NaN or infinity is named) are
    checked; so is the checkpoint a run loads
    (``train.init_checkpoint``, or with ``--resume`` the output folder's
    ``last_checkpoint``); ``--eval-only`` refuses to run without one and
    writes to ``train.output_dir/eval/<checkpoint name>``; a training run
    without ``--resume`` refuses an output folder that holds another run; the
    model is checked (:func:`check_model`), and so are the data set names and
    ``train`` values (:func:`check_run_values`); ``--eval-only``, and ``--resume``
    of a run, refuse a checkpoint that does not fit the model.

    Args:
        args: train_net.py's arguments (``config_file``, ``opts``, ``resume``, ``eval_only``).

    Returns:
        omegaconf.DictConfig: the config; for ``--eval-only``, ``train.init_checkpoint``
        is the checkpoint to evaluate and ``train.output_dir`` the evaluation's folder.
    """
    cfg = LazyConfig.load(args.config_file)
    check_override_keys(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_nodes(cfg, args.config_file, args.eval_only)
    # a NaN or infinite float, named (optimizer.lr=nan trained on with lr nan); ${...} stay str
    check_finite(OmegaConf.to_container(cfg, resolve=False))
    out = cfg.train.output_dir
    checkpoint = checkpoint_to_load(out, cfg.train.init_checkpoint, args.resume, LAZY_KEYS)
    if args.eval_only:
        cfg.train.output_dir = evaluation_output_dir(checkpoint, out, args.resume, LAZY_KEYS)
        cfg.train.init_checkpoint = checkpoint
    meta_model = check_model(cfg)
    check_run_values(cfg, args.eval_only)
    resumes_run = args.resume and os.path.isfile(os.path.join(out, "last_checkpoint"))
    if args.eval_only or resumes_run:
        consequence = EVALUATING if args.eval_only else RESUMING
        check_checkpoint_fits(meta_model, checkpoint, consequence, LAZY_KEYS)
    if not args.eval_only and not args.resume:
        check_output_dir_free(out, LAZY_KEYS)
    fetch_url(checkpoint, LAZY_KEYS)  # last: a download
    rescaled = _rescaled_schedule(cfg, out) if resumes_run and not args.eval_only else None
    default_setup(cfg, args)  # (writes the new config.yaml over the run's)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="focal_det2")
    if rescaled:
        logger.warning(rescaled)
    return cfg


def _rescaled_schedule(cfg, output_dir: str) -> Optional[str]:
    """
    A warning, or None: whether a resume with ``cfg`` changes the ``train.max_iter`` of the
    run in ``output_dir`` (its config.yaml's): a LazyConfig ``lr_multiplier`` is a function
    of ``iteration / train.max_iter``, so the resumed iterations follow another schedule.
    """
    saved = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(saved):
        return None
    before = OmegaConf.select(LazyConfig.load(saved), "train.max_iter", default=None)
    if before in (None, cfg.train.max_iter):
        return None
    return (
        f"train.max_iter={cfg.train.max_iter}, but the run in {output_dir} trained with "
        f"train.max_iter={before}: its lr_multiplier is a function of iteration / "
        "train.max_iter, so the resumed iterations follow the rescaled schedule (not the "
        "original's continued)."
    )


def check_nodes(cfg, config_file, eval_only):
    """
    Raise, naming ``config_file`` and the nodes, where ``cfg`` lacks a node
    the run reads: ``model``, ``dataloader``, the ``train`` keys and, with a
    ``dataloader.evaluator``, ``dataloader.test``; to train, also
    ``dataloader.train``, ``optimizer`` and ``lr_multiplier``.
    """
    train = ["output_dir", "init_checkpoint", "device"]
    if not eval_only:
        train += ["max_iter", "amp.enabled", "ddp", "checkpointer", "eval_period", "log_period"]
    needed = ["model", "dataloader", *(f"train.{key}" for key in train)]
    if OmegaConf.select(cfg, "dataloader.evaluator", default=None) is not None:
        needed.append("dataloader.test")
    if not eval_only:
        needed += ["dataloader.train", "optimizer", "lr_multiplier"]
    absent = object()
    missing = [key for key in needed if OmegaConf.select(cfg, key, default=absent) is absent]
    if missing:
        raise ValueError(
            f"{config_file} lacks {', '.join(missing)}: a LazyConfig run reads them. "
            "configs/lazy/focal_retinanet_R_50_FPN_1x.py has them all (its train node is "
            "Detectron2's common/train.py)."
        )


def check_run_values(cfg, eval_only: bool):
    """
    Raise, naming the node, for what a run would fail on only after writing (a misspelt test
    set, after training): data set names of ``dataloader.train`` (to train) and
    ``dataloader.test`` (with an evaluator) that are not registered or whose files are
    missing (:func:`.checks.check_dataset_files`), to train a ``FOCAL_DET2_BACKEND`` the
    loss cannot run on ``train.device``; the ``train`` numbers
    Detectron2's loop counts with (``max_iter``, ``checkpointer.period`` and ``log_period``
    integers >= 1, ``eval_period`` >= 0, 0 for the end only); a ``train.device`` torch does
    not know, or CUDA where there is none; and ``train.amp.enabled`` off CUDA (Detectron2's
    AMPTrainer needs it); a ``train.seed`` that is not an integer (Detectron2's ``default_setup``
    compares it with 0 after writing); an empty list of data set names; to train, a
    ``dataloader.degenerate_boxes`` other than "error" or "drop", or set where focal_det2 does
    not load the records (:func:`_train_records`), which would leave it unread.
    """
    device = str(cfg.train.device)
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"train.device={device} is not a torch device; e.g. cpu, cuda, cuda:1."
        ) from None
    check_cuda_device(device, "train.device", LAZY_KEYS.sep)
    seed = OmegaConf.select(cfg, "train.seed", default=-1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"train.seed={seed!r} must be an integer (< 0: a random seed).")
    loaders = ["test"] if "evaluator" in cfg.dataloader else []
    if not eval_only:
        loaders.insert(0, "train")
        check_backend(device, "train.device")
        if cfg.train.amp.enabled and not device.startswith("cuda"):
            raise ValueError(
                f"train.amp.enabled=True needs CUDA (Detectron2's AMPTrainer) and "
                f"train.device={device}: set train.amp.enabled=False."
            )
        for key, low in (("max_iter", 1), ("checkpointer.period", 1), ("log_period", 1)):
            _check_count(cfg, f"train.{key}", low)
        _check_count(cfg, "train.eval_period", 0)
    for loader in loaders:
        names = _dataset_names(cfg, loader)
        if names == []:
            raise ValueError(
                f"dataloader.{loader}.dataset.names is empty: name a registered data set."
            )
        if names is not None:
            check_registered(names, f"dataloader.{loader}.dataset.names")
            check_dataset_files(names, f"dataloader.{loader}.dataset.names")
    if not eval_only:
        _check_data_loading(cfg)
    weighting = OmegaConf.select(cfg, "model.focal_loss.class_weighting", default="none")
    if not eval_only and weighting != "none" and _dataset_names(cfg, "train") is None:
        raise ValueError(
            f"model.focal_loss.class_weighting={weighting} counts the instances of "
            "dataloader.train.dataset.names, which this config lacks (its dataloader.train "
            "takes its data another way); set model.focal_loss.class_weighting=none, or load "
            "the data with Detectron2's get_detection_dataset_dicts(names=...)."
        )


def _check_data_loading(cfg):
    """
    Raise, naming it, for a key :func:`_train_records` would not read: a key of
    ``dataloader.train.dataset`` where it loads the records, ``dataloader.degenerate_boxes``
    where it does not, and a ``dataloader.degenerate_boxes`` other than "error" or "drop".
    """
    loads = _checked_classes(cfg) is not None
    if loads:
        _dataset_args(cfg.dataloader.train.dataset)
    degenerate = OmegaConf.select(cfg, DEGENERATE_KEY, default=None)
    if degenerate is None:
        return
    check_degenerate_boxes_option(degenerate, DEGENERATE_KEY)
    if not loads:
        raise ValueError(
            f"{DEGENERATE_KEY}={degenerate} is read where focal_det2 loads the training data: "
            "where dataloader.train.dataset is Detectron2's get_detection_dataset_dicts and "
            "model.num_classes (model.roi_heads.num_classes for Detectron2's R-CNNs) is an "
            "integer, which this config's are not. Delete the key."
        )


def _dataset_names(cfg, loader: str) -> Optional[List[str]]:
    """The data set names of ``dataloader.<loader>.dataset.names``, None where there are none."""
    names = OmegaConf.select(cfg, f"dataloader.{loader}.dataset.names", default=None)
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


def _check_count(cfg, key: str, low: int):
    """Raise, naming ``key``, unless its value is an integer >= ``low``."""
    value = OmegaConf.select(cfg, key, default=None)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{key}={value!r} must be an integer >= {low}.")


_ABSENT = object()


def check_override_keys(cfg, overrides):
    """
    Raise, naming it, for an override that is not ``a.b=value`` (a flag after the
    overrides, a yacs ``KEY VALUE`` pair, spaces around ``=``) and for an override of a
    key ``cfg`` lacks (a typo, which Detectron2 would add unread), with the keys it may
    stand for: close names at the first part of the key that is not there, and the node
    of a yacs key (:data:`LAZY_NAMES`). A new key is written ``+key=value`` (Hydra's
    syntax), a list index must be within the list.
    """
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override and not key.startswith("~"):
            raise ValueError(_not_an_override(override))
        if key.startswith(("+", "~")) or OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            continue
        node, known, part = _deepest(cfg, key)
        if isinstance(node, ListConfig):
            raise KeyError(
                f"{override}: {known} is a list of {len(node)} items; {part} is not an index of it."
            )
        rest = key[len(known) + len(part) + bool(known) :]
        close = [LAZY_NAMES[key]] if key in LAZY_NAMES else []
        if isinstance(node, DictConfig):
            for name in difflib.get_close_matches(part, [str(k) for k in node], n=3, cutoff=0.8):
                close.append(".".join(p for p in (known, name, rest.lstrip(".")) if p))
        if close:
            raise KeyError(
                f"{override}: the config has no {key}; did you mean {' or '.join(close)}?"
            )
        raise KeyError(f"{override}: the config has no {key}. To add a new key, write +{override}.")


def _not_an_override(word: str) -> str:
    """The error for a word among the overrides without ``=``: what it is, and how to write it."""
    if not word.strip():
        return f"an empty override ({word!r}): remove it from the overrides."
    if word.startswith("-"):
        return (
            f"{word} comes after the overrides (argparse gives them every word after the "
            "first one): put train_net.py's flags (--resume, --eval-only, --num-gpus N) before "
            "the a.b=value overrides."
        )
    if word in LAZY_NAMES:
        return (
            f"{word}: a LazyConfig takes a.b=value overrides, not a yacs config's KEY VALUE "
            f"pairs; {word} is {LAZY_NAMES[word]} here: write {LAZY_NAMES[word]}=<value>."
        )
    return (
        f"{word}: not an override; a LazyConfig's are written a.b=value, without spaces "
        "around = (a yacs config takes KEY VALUE pairs)."
    )


def _deepest(cfg, key: str):
    """
    ``(node, known, part)`` for a ``key`` that ``cfg`` lacks: the deepest node of ``cfg``
    on its path, that node's own key (``known``, "" for the config), and the first part
    of ``key`` it lacks.
    """
    node, known = cfg, ""
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return node, known, part
        known = f"{known}.{part}" if known else part
    raise AssertionError(f"{key} is in the config")  # the caller checked it is not


def check_model(cfg) -> Optional[torch.nn.Module]:
    """
    Raise for a model config the run would reject: every check of the
    constructors, which run as ``cfg.model`` is built on the ``meta`` device
    (:func:`.checks.build_on_meta`). Their errors name yacs keys
    (MODEL.FOCAL.ALPHA); a note names the node this config sets instead
    (``model.focal_loss.alpha``, :data:`LAZY_NAMES`). Returns the model built on
    the meta device (None where it cannot be).
    """
    try:
        return build_on_meta(lambda: instantiate(cfg.model))
    except (ValueError, TypeError) as e:
        named = [k for k in LAZY_NAMES if re.search(re.escape(k) + r"\b(?!\.)", str(e))]
        if named and hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(
                "In this LazyConfig: " + ", ".join(f"{k} is {LAZY_NAMES[k]}" for k in named) + "."
            )
        raise
    except ImportError as e:
        if hasattr(e, "add_note"):
            e.add_note(_missing_target_note(cfg, str(e)))
        raise


def _missing_target_note(cfg, message: str) -> str:
    """
    What an ImportError of ``cfg.model``'s build names: the node whose ``_target_`` is the
    class it could not load, and for the loss node the losses there are.
    """
    found = re.search(r"Error loading '([^']+)'", message)
    target = found.group(1) if found else None
    tree = OmegaConf.to_container(cfg.model, resolve=False)  # a node set by ${...} is a str
    nodes = [f"model.{key}" for key, value in _targets(tree) if value == target]
    note = f"In this LazyConfig: {' and '.join(nodes) or 'a _target_'} = {target}."
    if "model.focal_loss._target_" in nodes:
        names = [
            f"focal_det2.losses.{c.__name__}"
            if getattr(losses, c.__name__, None) is c
            else f"{c.__module__}.{c.__qualname__}"
            for c in losses.registered_losses().values()
        ]
        note += f" The registered losses are {', '.join(names)}."
    return note


def _targets(tree: dict, prefix: str = ""):
    """(key, value) of every ``_target_`` in the nested dicts of ``tree``."""
    for key, value in tree.items():
        if key == "_target_":
            yield f"{prefix}{key}", value
        elif isinstance(value, dict):
            yield from _targets(value, f"{prefix}{key}.")


def lazy_evaluate(cfg):
    """
    ``--eval-only``: the model of ``cfg`` with ``train.init_checkpoint``
    loaded (refused, naming the tensors and keys, where it does not fit the
    model), evaluated by :func:`lazy_test`.
    """
    model = instantiate(cfg.model).to(cfg.train.device)
    load_fitting(model, cfg.train.init_checkpoint, keys=LAZY_KEYS)
    return lazy_test(cfg, model)


def lazy_test(cfg, model):
    """
    Evaluation of ``model`` on ``cfg.dataloader.test`` by
    ``cfg.dataloader.evaluator`` (COCO's, in configs/lazy/); a config without
    an evaluator is not evaluated (as in Detectron2's script).

    Returns:
        dict or None: the evaluator's results, None without an evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        logger.info("cfg.dataloader has no evaluator: nothing to evaluate.")
        return None
    node = cfg.dataloader.test
    # first: a generated data set writes its json
    loader = (
        instantiate(node)
        if "mapper" not in node
        else _call(node, mapper=_checked_mapper(node.mapper))
    )
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _class_weights(cfg, model, trainer, checkpointer) -> Optional[CountClassWeights]:
    """
    With ``model.focal_loss.class_weighting`` other than ``none``: the loss's class weights as
    ``trainer.class_weights``, checkpointed under :data:`.class_balance.CHECKPOINT_KEY` (read
    back on ``--resume``), and the hook that counts ``dataloader.train.dataset.names`` before
    the first iteration where the checkpoint held none (the records the train loader holds,
    not loaded again); None (no hook) otherwise.
    """
    loss = getattr(model, "focal_loss", None)  # None for a model of Detectron2's own
    if getattr(loss, "class_weighting", "none") == "none":
        return None
    trainer.class_weights = ClassWeights(loss, _dataset_names(cfg, "train"), keys=LAZY_WEIGHT_KEYS)
    checkpointer.add_checkpointable(CHECKPOINT_KEY, trainer.class_weights)
    return CountClassWeights(trainer.data_loader.dataset)  # (None: loaded by the count)


def lazy_train_loader(cfg) -> ResumableTrainLoader:
    """
    The loader of ``dataloader.train``, built when first iterated from the iteration its
    ``start_iter`` holds then. The node's records and mapper are made now, checked where
    they are Detectron2's (:func:`_train_records`, :func:`_checked_mapper`). Where the node
    is Detectron2's ``build_detection_train_loader`` of a list of records without a
    ``sampler`` (configs/lazy/, Detectron2's own LazyConfigs), the data order is Detectron2's
    ``TrainingSampler`` stream seeded with ``train.seed`` (a shared random seed without it),
    which a resume continues; any other loader restarts its order on a resume (a warning
    says so).
    """
    node = cfg.dataloader.train
    given = {}  # checked, for the node's own
    if "dataset" in node:
        given["dataset"] = _train_records(cfg)
    if "mapper" in node:
        given["mapper"] = _checked_mapper(node.mapper)
    restarts = _order_restarts(node, given.get("dataset"))
    if restarts:
        records = given.get("dataset")
        return ResumableTrainLoader(
            records if isinstance(records, list) else None,
            lambda sampler: _call(node, **given),
            batch_size=1,
            workers=0,
            grouping="",
            restarts=f"{restarts}: the resumed run restarts its data order; Detectron2's "
            "build_detection_train_loader of a list of records without a sampler continues it.",
        )
    return ResumableTrainLoader(
        given["dataset"],
        lambda sampler: _call(node, sampler=sampler, **given),
        batch_size=node.get("total_batch_size", 0) // comm.get_world_size(),
        workers=node.get("num_workers", 0),
        grouping="dataloader.train.aspect_ratio_grouping"
        if node.get("aspect_ratio_grouping", True)
        else "",
        seed=_seed(cfg),
    )


def _seed(cfg) -> Optional[int]:
    """``train.seed``, the data order's seed; None where it is unset or < 0 (a random seed)."""
    seed = OmegaConf.select(cfg, "train.seed", default=-1)
    return seed if seed >= 0 else None


def _order_restarts(node, dataset) -> str:
    """ "" where a resume continues the data order of the loader ``node`` makes of ``dataset``;
    otherwise what keeps it from it."""
    if _target(node) is not build_detection_train_loader:
        return "dataloader.train (not Detectron2's build_detection_train_loader)"
    if node.get("sampler") is not None:
        return "dataloader.train.sampler"
    if not isinstance(dataset, list):
        return f"dataloader.train.dataset (a {type(dataset).__name__}, not a list of records)"
    return ""


def _target(node):
    """The callable of a LazyConfig node's ``_target_`` (None for a node without one)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return locate(target) if isinstance(target, str) else target


def _train_records(cfg):
    """
    The records of ``dataloader.train.dataset``. Where the node is Detectron2's
    ``get_detection_dataset_dicts`` and the model's classes are known (``model.num_classes``,
    or ``model.roi_heads.num_classes`` for Detectron2's R-CNNs), each data set is loaded and
    checked as the YAML trainer loads it (:func:`.data.checks.load_checked_dataset_dicts`:
    classes outside the model's, missing image files, and boxes without area, refused or
    dropped by ``dataloader.degenerate_boxes``, "error" or "drop", a key focal_det2 adds);
    otherwise the node instantiated.
    """
    node = cfg.dataloader.train.dataset
    classes = _checked_classes(cfg)
    if classes is None:
        return instantiate(node)
    num_classes, num_classes_key = classes
    args = _dataset_args(node)
    return load_checked_datasets(
        _dataset_names(cfg, "train"),
        proposal_files=args.get("proposal_files") or None,
        check_consistency=args.get("check_consistency", True),
        names_key="dataloader.train.dataset.names",
        proposals_key="dataloader.train.dataset.proposal_files",
        num_classes=num_classes,
        num_classes_key=num_classes_key,
        filter_empty=args.get("filter_empty", True),
        min_keypoints=args.get("min_keypoints", 0),
        degenerate_boxes=OmegaConf.select(cfg, DEGENERATE_KEY, default="error"),
        degenerate_key=DEGENERATE_KEY,
    )


def _dataset_args(node) -> dict:
    """
    The arguments of the ``get_detection_dataset_dicts`` node ``dataloader.train.dataset``
    that :func:`_train_records` reads; a ``TypeError`` naming any other.
    """
    args = {key: value for key, value in node.items() if key != "_target_"}
    unknown = sorted(set(args) - set(DATASET_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"dataloader.train.dataset has {', '.join(unknown)}: focal_det2 loads and checks the "
            "data itself and reads only these arguments of get_detection_dataset_dicts: "
            f"{', '.join(DATASET_ARGUMENTS)}."
        )
    return args


def _checked_classes(cfg) -> Optional[Tuple[int, str]]:
    """
    ``(K, key)``, the model's number of classes and its node, where :func:`_train_records`
    loads and checks the records: ``dataloader.train.dataset`` is Detectron2's
    ``get_detection_dataset_dicts`` and ``model.num_classes`` (``model.roi_heads.num_classes``
    for Detectron2's R-CNNs) an integer; None otherwise.
    """
    if (
        _target(OmegaConf.select(cfg, "dataloader.train.dataset"))
        is not get_detection_dataset_dicts
    ):
        return None
    for key in ("model.num_classes", "model.roi_heads.num_classes"):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, key
    return None


def _checked_mapper(node):
    """
    A loader's ``mapper`` node: Detectron2's ``DatasetMapper`` made a
    :class:`.data.checks.CheckedDatasetMapper` (its errors reading an image name the image
    id and file), with the same arguments; another mapper as the node makes it.
    """
    return (
        _call(node, CheckedDatasetMapper) if _target(node) is DatasetMapper else instantiate(node)
    )


def _call(node, target=None, **given):
    """
    What ``instantiate(node)`` makes, by ``target`` (the node's ``_target_`` by default), with
    the arguments ``given`` instead of the node's.
    """
    kwargs = {k: instantiate(v) for k, v in node.items() if k != "_target_" and k not in given}
    return (target or _target(node))(**kwargs, **given)


def _continue(cfg, loader: ResumableTrainLoader, model, start_iter: int):
    """
    A resume at ``start_iter``: the loader's data order continued from there, and what keeps
    the resume from being exact said (no ``train.seed``; several processes without
    ``model.sync_normalizer``).
    """
    loader.start_iter = start_iter
    if _seed(cfg) is None and not loader.restarts:
        logger.warning(
            "train.seed is not set (or < 0): the resumed run draws a new data order; "
            "set +train.seed=N for an exact resume."
        )
    if comm.get_world_size() > 1 and not getattr(model, "sync_normalizer", True):
        logger.warning(
            "model.sync_normalizer is off: every process keeps its own loss normaliser EMA and "
            "the checkpoint holds process 0's, which all processes resume from. Set "
            "+model.sync_normalizer=True for an exact multi-process resume."
        )


def lazy_train(cfg, resume: bool = False):
    """
    Trains ``cfg.model`` as Detectron2's LazyConfig tool does: ``AMPTrainer``
    (``train.amp.enabled``) or ``SimpleTrainer``, ``cfg.lr_multiplier`` by
    iteration, checkpoints every ``train.checkpointer.period``, evaluation
    every ``train.eval_period`` and at the end, and Detectron2's writers; and
    the loss's class weights where it has them (:func:`_class_weights`). A resume
    is exact as :class:`.engine.FocalTrainer`'s: the data order continues
    (:func:`lazy_train_loader`), the smoothed scalars are checkpointed
    (:class:`.engine.ScalarHistory`) and the metrics.json records of the
    iterations trained again are dropped (:func:`.engine.drop_metrics_from`).

    Args:
        cfg: the config of :func:`setup_lazy_cfg`.
        resume (bool): continue from ``train.output_dir``'s ``last_checkpoint``
            (at the iteration after it) instead of loading ``train.init_checkpoint``;
            a finished run (its last checkpoint at ``train.max_iter - 1`` and, with an
            evaluator, its final evaluation recorded) is left as it is.
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = lazy_train_loader(cfg)
    unwrapped, model = model, create_ddp_model_by_device(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    # the normaliser's moving average lives outside the model's state_dict
    checkpointer.add_checkpointable("loss_normalizer", AttributeState(unwrapped, "loss_normalizer"))
    counting = _class_weights(cfg, unwrapped, trainer, checkpointer)
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            counting,
            ScalarHistory(),  # the smoothed scalars of the iterations before a resume
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: lazy_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main
            else None,
        ]
    )
    loaded = checkpoint_to_load(cfg.train.output_dir, cfg.train.init_checkpoint, resume, LAZY_KEYS)
    with naming_checkpoint(loaded or "", LAZY_KEYS):
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    evaluates = "evaluator" in cfg.dataloader
    if finished_run(cfg.train.output_dir, start_iter, cfg.train.max_iter, evaluates):
        # Detectron2 would evaluate it again and append the records at max_iter + 1
        logger.info(
            f"The run in {cfg.train.output_dir} is finished: its last checkpoint is of iteration "
            f"{trainer.iter}, train.max_iter={cfg.train.max_iter}. Nothing to train; "
            "--eval-only --resume evaluates it."
        )
        return
    if resume and main:  # the records of the iterations the resume trains again
        drop_metrics_from(
            os.path.join(cfg.train.output_dir, "metrics.json"),
            start_iter,
            keep_final_evaluation=extends_finished_run(
                loaded or "", start_iter, cfg.train.max_iter
            ),
        )
    if start_iter:
        _continue(cfg, loader, unwrapped, start_iter)
    trainer.train(start_iter, cfg.train.max_iter)
