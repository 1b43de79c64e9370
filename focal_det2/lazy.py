"""
Training and evaluation from Detectron2's Python ("LazyConfig") configs,
for ``train_net.py --config-file <file>.py`` (or the ``config.yaml`` a lazy
run saved): the loop of Detectron2's ``tools/lazyconfig_train_net.py``, which
its pip package does not ship, rebuilt from Detectron2's own trainers, hooks
and evaluation. Where it differs from that tool, on purpose, it does what
``train_net.py`` does for a yacs config: the config is checked before
anything is written (an output folder that holds a run is refused without
``--resume``, a checkpoint to load is named when it is missing or empty, the
model is built on the ``meta`` device first); ``--eval-only`` writes to
``train.output_dir/eval/<checkpoint name>``, evaluates ``last_checkpoint``
with ``--resume`` and refuses a checkpoint that does not fit the model; and
focal_det2's log lines reach the console and ``log.txt``.
``configs/lazy/`` holds FocalRetinaNet's configs of this kind.
"""

import logging
import re

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_setup, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .engine import (
    LAZY_KEYS,
    build_on_meta,
    check_output_dir_free,
    checkpoint_to_load,
    evaluation_output_dir,
)

__all__ = ["check_model", "is_lazy_config", "lazy_test", "lazy_train", "setup_lazy_cfg"]

logger = logging.getLogger(__name__)


def is_lazy_config(path: str) -> bool:
    """
    True for a LazyConfig file: Python (``.py``), or the YAML a lazy run saves
    as its ``config.yaml`` (top-level ``model`` and ``train`` nodes, lower
    case); False for a yacs config (``MODEL``, ``_BASE_``, ...).
    """
    if path.endswith(".py"):
        return True
    try:
        with open(path) as f:  # the top-level keys (a saved config holds Python object tags)
            top = {m.group(1) for m in map(re.compile(r"([A-Za-z_]\w*):").match, f) if m}
    except (OSError, UnicodeDecodeError):
        return False  # the yacs loader names the file and the problem
    return {"model", "train"} <= top and "MODEL" not in top


def setup_lazy_cfg(args):
    """
    The LazyConfig ``args.config_file`` with ``args.opts`` (``a.b=value``
    overrides), after Detectron2's ``default_setup`` and with focal_det2's
    logger writing to the console and ``train.output_dir/log.txt``. As
    :func:`.engine.setup_cfg` does for yacs, before anything is written: the
    checkpoint a run loads (``train.init_checkpoint``, or with ``--resume`` the
    output folder's ``last_checkpoint``) is checked; ``--eval-only`` refuses to
    run without one and writes to ``train.output_dir/eval/<checkpoint name>``;
    a training run without ``--resume`` refuses an output folder that holds
    another run; and the model is checked (:func:`check_model`).

    Args:
        args: train_net.py's arguments (``config_file``, ``opts``, ``resume``, ``eval_only``).

    Returns:
        omegaconf.DictConfig: the config; for ``--eval-only``, ``train.init_checkpoint``
        is the checkpoint to evaluate and ``train.output_dir`` the evaluation's folder.
    """
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    out = cfg.train.output_dir
    checkpoint = checkpoint_to_load(out, cfg.train.init_checkpoint, args.resume, LAZY_KEYS)
    if args.eval_only:
        cfg.train.output_dir = evaluation_output_dir(checkpoint, out, args.resume, LAZY_KEYS)
        cfg.train.init_checkpoint = checkpoint
    elif not args.resume:
        check_output_dir_free(out, LAZY_KEYS)
    check_model(cfg)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="focal_det2")
    return cfg


def check_model(cfg):
    """
    Raise for a model config the run would reject: ``cfg.model`` is built on
    the ``meta`` device (:func:`.engine.build_on_meta`), which runs every check
    of its constructors; and a loss whose class weights a LazyConfig run cannot
    count (they are counted by the yacs trainer) is refused.
    """
    model = build_on_meta(lambda: instantiate(cfg.model))
    loss = getattr(model, "focal_loss", None)
    if loss is not None and loss.class_weighting != "none":
        raise ValueError(
            f"model.focal_loss.class_weighting={loss.class_weighting}: class weights are counted "
            "by the yacs trainer (train_net.py with a .yaml config); a LazyConfig run has no "
            "such step. Leave it at 'none', or use a .yaml config with MODEL.FOCAL.CLASS_WEIGHTING."
        )


def lazy_test(cfg, model):
    """
    COCO evaluation of ``model`` on ``cfg.dataloader.test`` by
    ``cfg.dataloader.evaluator``; a config without an evaluator is not
    evaluated (as in Detectron2's tool).

    Returns:
        dict or None: the evaluator's results, None without an evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        logger.info("cfg.dataloader has no evaluator: nothing to evaluate.")
        return None
    loader = instantiate(cfg.dataloader.test)  # first: a generated data set writes its json
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def lazy_train(cfg, resume: bool = False):
    """
    Trains ``cfg.model`` as Detectron2's LazyConfig tool does: ``AMPTrainer``
    (``train.amp.enabled``) or ``SimpleTrainer``, ``cfg.lr_multiplier`` by
    iteration, checkpoints every ``train.checkpointer.period``, evaluation
    every ``train.eval_period`` and at the end, and Detectron2's writers.

    Args:
        cfg: the config of :func:`setup_lazy_cfg`.
        resume (bool): continue from ``train.output_dir``'s ``last_checkpoint``
            (at the iteration after it) instead of loading ``train.init_checkpoint``.
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks(
        [
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
