"""
Training and evaluation from Detectron2's Python ("LazyConfig") configs,
for ``train_net.py --config-file <file>.py``: the loop of Detectron2's
``tools/lazyconfig_train_net.py`` (which its pip package does not ship),
built from Detectron2's own trainers, hooks and evaluation, with the checks
``train_net.py`` makes of a yacs run: an output folder that holds a run is
not overwritten, and a checkpoint to load is named when it is missing or
empty. ``configs/lazy/`` holds FocalRetinaNet's configs of this kind.
"""

import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_setup, hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .engine import LAZY_KEYS, check_output_dir_free, checkpoint_to_load

__all__ = ["check_model", "lazy_test", "lazy_train", "setup_lazy_cfg"]

logger = logging.getLogger(__name__)


def setup_lazy_cfg(args):
    """
    The LazyConfig ``args.config_file`` with ``args.opts`` (``a.b=value``
    overrides), after Detectron2's ``default_setup``. As :func:`.engine.setup_cfg`
    does for yacs: the checkpoint a run loads (``train.init_checkpoint``, or
    with ``--resume`` the output folder's ``last_checkpoint``) is checked
    first; ``--eval-only`` refuses to run without one and writes to
    ``train.output_dir/eval/<checkpoint name>``; a training run without
    ``--resume`` refuses an output folder that holds another run; and the
    model is built on the ``meta`` device (:func:`check_model`). All before
    ``default_setup`` writes the output folder's config.yaml and log.
    """
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    out = cfg.train.output_dir
    checkpoint = checkpoint_to_load(out, cfg.train.init_checkpoint, args.resume, LAZY_KEYS)
    if args.eval_only:
        if not checkpoint:
            raise ValueError(
                "--eval-only needs a trained model: train.init_checkpoint is empty"
                + (f" and {out} has no last_checkpoint" if args.resume else "")
                + ". Pass train.init_checkpoint=<file>.pth, or --resume to evaluate the output "
                "folder's last checkpoint."
            )
        cfg.train.init_checkpoint = checkpoint
        cfg.train.output_dir = os.path.join(
            out, "eval", os.path.splitext(os.path.basename(checkpoint))[0]
        )
    elif not args.resume:
        check_output_dir_free(out, LAZY_KEYS)
    check_model(cfg)
    default_setup(cfg, args)
    return cfg


def lazy_test(cfg, model) -> dict:
    """COCO evaluation of ``model`` on ``cfg.dataloader.test`` by ``cfg.dataloader.evaluator``."""
    loader = instantiate(cfg.dataloader.test)  # first: a generated data set writes its json
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def check_model(cfg):
    """
    Raise for a model config the run would reject: ``cfg.model`` is built on the
    ``meta`` device (modules and shapes without memory, initialisation or random
    draws, as :func:`.engine.check_cfg` does for yacs), which runs every check of
    its constructors, and a loss whose class weights a LazyConfig run cannot count.
    """
    with torch.device("meta"):
        model = instantiate(cfg.model)
    loss = getattr(model, "focal_loss", None)
    if loss is not None and loss.class_weighting != "none":
        raise ValueError(
            f"model.focal_loss.class_weighting={loss.class_weighting}: class weights are counted "
            "by the yacs trainer (train_net.py with a .yaml config); a LazyConfig run has no "
            "such step. Leave it at 'none', or use a .yaml config with MODEL.FOCAL.CLASS_WEIGHTING."
        )


def lazy_train(cfg, resume: bool = False):
    """
    Trains ``cfg.model`` as Detectron2's LazyConfig tool does: ``AMPTrainer``
    (``train.amp.enabled``) or ``SimpleTrainer``, ``cfg.lr_multiplier`` by
    iteration, checkpoints every ``train.checkpointer.period``, evaluation
    every ``train.eval_period`` and at the end, and Detectron2's writers.
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
