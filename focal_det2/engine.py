"""The trainer used by train_net.py: Detectron2's DefaultTrainer with COCO evaluation."""
import contextlib
import os

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator

from .config import add_focal_config

__all__ = ["FocalTrainer", "setup_cfg"]


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


class FocalTrainer(DefaultTrainer):
    """DefaultTrainer that evaluates with COCOEvaluator and runs multi-process on CPUs too."""

    def __init__(self, cfg):
        with _ddp_device_ids_by_device():
            super().__init__(cfg)

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
