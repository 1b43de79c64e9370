"""FocalRetinaNet from Detectron2's Python (LazyConfig) configs: configs/lazy/, train_net.py on a .py config."""

import argparse
import json

import pytest
import torch
from conftest import REPO, load_script
from detectron2.config import LazyConfig, instantiate
from detectron2.model_zoo import get_config
from test_train_net import run_train_net

import focal_det2  # noqa: F401  (registers the digits data sets)
from focal_det2.lazy import setup_lazy_cfg
from focal_det2.losses import OHEMLoss, SoftmaxFocalLoss

CONFIG = REPO / "configs" / "lazy" / "focal_retinanet_R_50_FPN_1x.py"


def digits_opts(output_dir, *extra):
    """Overrides that train the COCO config's R50 on the tiny digits sets at 128 px, on the CPU."""
    return [
        "train.device=cpu",
        'train.init_checkpoint=""',  # no ImageNet download
        "train.max_iter=2",
        "train.eval_period=0",
        "train.log_period=1",
        "train.seed=0",
        "optimizer.lr=0.001",  # R50 from scratch with frozen BatchNorm diverges at 0.01
        f"train.output_dir={output_dir}",
        "model.num_classes=10",
        "dataloader.train.dataset.names=digits_train_tiny",
        "dataloader.test.dataset.names=digits_val_tiny",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        *extra,
    ]


def load(*opts):
    return LazyConfig.apply_overrides(LazyConfig.load(str(CONFIG)), list(opts))


def args(output_dir, *extra, resume=False, eval_only=False):
    opts = digits_opts(output_dir, *extra)
    return argparse.Namespace(
        config_file=str(CONFIG), opts=opts, resume=resume, eval_only=eval_only, num_gpus=1
    )


def test_lazy_config_is_detectron2s_lazy_retinanet_with_the_same_weights():
    cfg = load()
    retinanet = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
    assert {k: cfg[k] for k in ("dataloader", "optimizer", "lr_multiplier", "train")} == {
        k: retinanet[k] for k in ("dataloader", "optimizer", "lr_multiplier", "train")
    }
    torch.manual_seed(0)
    ours = instantiate(cfg.model).state_dict()
    torch.manual_seed(0)
    theirs = instantiate(retinanet.model).state_dict()
    assert list(ours) == list(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    assert (
        cfg.model.backbone.bottom_up.freeze_at == retinanet.model.backbone.bottom_up.freeze_at == 2
    )


def test_lazy_loss_and_schedule_swap_on_the_command_line():
    model = instantiate(
        load(
            "model.num_classes=10",
            "model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss",
            "model.focal_loss.gamma=1.5",
            "model.gamma_schedule._target_=focal_det2.schedules.LinearGamma",
            "model.gamma_schedule.iters=100",
        ).model
    )
    assert type(model.focal_loss) is SoftmaxFocalLoss and model.focal_loss.gamma == 1.5
    assert model.head.cls_score.out_channels == 9 * 11  # K + 1 logits for each of 9 anchors
    assert [model.gamma_schedule(i) for i in (0, 50, 100)] == [0.0, 0.75, 1.5]
    ohem = instantiate(
        load(
            "model.focal_loss._target_=focal_det2.losses.OHEMLoss", "model.focal_loss.gamma=0"
        ).model
    )
    assert type(ohem.focal_loss) is OHEMLoss and ohem.head.cls_score.out_channels == 9 * 80


def test_train_net_trains_and_evaluates_a_lazy_config(tmp_path):
    swap = "model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss"
    log = run_train_net("--config-file", CONFIG, *digits_opts(tmp_path, swap))
    assert "Starting training from iteration 0" in log
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss_cls" in r] == [0, 1]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    log = run_train_net(
        "--config-file", CONFIG, "--resume", *digits_opts(tmp_path, swap, "train.max_iter=3")
    )
    assert "Starting training from iteration 2" in log  # Detectron2's resume: the next iteration
    weights = tmp_path / "model_final.pth"
    assert torch.load(weights, weights_only=False)["model"]["head.cls_score.bias"].shape == (
        9 * 11,
    )
    log = run_train_net(
        "--config-file",
        CONFIG,
        "--eval-only",
        *digits_opts(tmp_path, swap, f"train.init_checkpoint={weights}"),
    )
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert (tmp_path / "eval" / "model_final" / "config.yaml").is_file()  # not over the run's


def test_lazy_eval_only_refuses_a_checkpoint_of_another_loss(tmp_path):
    """The sigmoid model (K logits) from a softmax checkpoint (K + 1) would score with a random classifier."""
    model = instantiate(
        load(
            "model.num_classes=10", "model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss"
        ).model
    )
    weights = tmp_path / "softmax.pth"
    torch.save({"model": model.state_dict()}, weights)
    cmd = args(tmp_path / "out", f"train.init_checkpoint={weights}", eval_only=True)
    train_net = load_script("train_net.py")
    with pytest.raises(
        ValueError, match=r"softmax.pth does not fit .* head.cls_score.weight is \(99,"
    ):
        train_net.lazy_main(cmd)


def test_lazy_setup_names_what_is_missing_or_taken(tmp_path):
    with pytest.raises(
        ValueError, match=r"--eval-only needs a trained model: train.init_checkpoint is empty"
    ):
        setup_lazy_cfg(args(tmp_path, eval_only=True))
    with pytest.raises(
        FileNotFoundError, match=r"train.init_checkpoint=/nonexistent.pth: the file does not exist"
    ):
        setup_lazy_cfg(args(tmp_path, "train.init_checkpoint=/nonexistent.pth"))
    (tmp_path / "model_final.pth").write_bytes(b"a run")
    with pytest.raises(
        FileExistsError,
        match=r"train.output_dir .* holds a training run \(model_final.pth\).*a larger train.max_iter",
    ):
        setup_lazy_cfg(args(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth"]


def test_lazy_setup_checks_the_model_before_writing(tmp_path):
    weighting = "model.focal_loss.class_weighting=effective_number"
    with pytest.raises(
        ValueError, match=r"model.focal_loss.class_weighting=effective_number: class weights"
    ):
        setup_lazy_cfg(args(tmp_path, weighting))
    with pytest.raises(ValueError, match=r"MODEL.FOCAL.ALPHA=1.5 must be in \[0, 1\]"):
        setup_lazy_cfg(args(tmp_path, "model.focal_loss.alpha=1.5"))
    assert list(tmp_path.iterdir()) == []
