#!/usr/bin/env python
"""
Train and evaluate a focal_det2 model with Detectron2's stock machinery.

    python train_net.py --config-file configs/digits/sigmoid_focal_R18_FPN_1x.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python train_net.py --config-file ... --num-gpus 2 MODEL.FOCAL.LOSS softmax_focal
    python train_net.py --config-file configs/lazy/focal_retinanet_R_50_FPN_1x.py \
        model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss   # a Python (LazyConfig) config
    python train_net.py --config-file output/config.yaml --eval-only --resume  # a lazy run's own
"""

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden.
import focal_det2

# isort: split

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, launch

from focal_det2.checkpoint import load_for_evaluation
from focal_det2.checks import check_processes
from focal_det2.config import load_config
from focal_det2.engine import FocalTrainer, setup_cfg
from focal_det2.lazy import is_lazy_config, lazy_evaluate, lazy_train, setup_lazy_cfg

focal_det2.hide_third_party_deprecations()  # and at run time (Detectron2's torch.meshgrid call)


EPILOG = """
Examples:
  train_net.py --config-file configs/digits/sigmoid_focal_R18_FPN_1x.yaml MODEL.FOCAL.LOSS softmax_focal
  train_net.py --config-file ... --resume                  # continue OUTPUT_DIR's run
  train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
  train_net.py --config-file ... --num-gpus 2              # 2 processes (GLOO on the CPU)
  train_net.py --config-file configs/lazy/focal_retinanet_R_50_FPN_1x.py train.max_iter=100

A YAML config takes KEY VALUE overrides, a LazyConfig (.py) a.b=value ones (+a.b=value adds a
key). Before anything is written, the config, the data sets, the device and the checkpoint are
checked, and an OUTPUT_DIR that holds another run is refused without --resume. --eval-only
writes to OUTPUT_DIR/eval/<checkpoint name>/. README.md has the rest.
"""


def main(args):
    if is_lazy_config(args.config_file):
        return lazy_main(args)
    # with --eval-only: MODEL.WEIGHTS is the checkpoint, OUTPUT_DIR .../eval/<its name>
    cfg = setup_cfg(args)
    if args.eval_only:
        model = FocalTrainer.build_model(cfg)
        load_for_evaluation(cfg, model)  # and the class weights stored in it, not recounted
        return FocalTrainer.test(cfg, model)
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_launch(args):
    """
    Before Detectron2's launch starts ``--num-gpus`` processes: that many CUDA devices where
    the run is on CUDA (checks.check_processes). A config that does not load is left to the
    processes, which name what is wrong with it.
    """
    if args.num_gpus <= 1:
        return
    try:
        if is_lazy_config(args.config_file):
            cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
            device, key, sep = str(cfg.train.device), "train.device", "="
        else:
            device, key, sep = (
                load_config(args.config_file, args.opts).MODEL.DEVICE,
                "MODEL.DEVICE",
                " ",
            )
    except Exception:
        return
    check_processes(device, args.num_gpus, key, sep)


def lazy_main(args):
    # a .py config, or the config.yaml a lazy run saved; with --eval-only, as for yacs above
    cfg = setup_lazy_cfg(args)
    if args.eval_only:
        return lazy_evaluate(cfg)
    return lazy_train(cfg, resume=args.resume)


if __name__ == "__main__":
    args = default_argument_parser(epilog=EPILOG).parse_args()
    check_launch(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
