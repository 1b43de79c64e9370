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

from detectron2.engine import default_argument_parser, launch

from focal_det2.checkpoint import load_for_evaluation
from focal_det2.engine import FocalTrainer, setup_cfg
from focal_det2.lazy import is_lazy_config, lazy_evaluate, lazy_train, setup_lazy_cfg

focal_det2.hide_third_party_deprecations()  # and at run time (Detectron2's torch.meshgrid call)


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


def lazy_main(args):
    # a .py config, or the config.yaml a lazy run saved; with --eval-only, as for yacs above
    cfg = setup_lazy_cfg(args)
    if args.eval_only:
        return lazy_evaluate(cfg)
    return lazy_train(cfg, resume=args.resume)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
