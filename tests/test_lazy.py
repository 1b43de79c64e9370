"""FocalRetinaNet from Detectron2's Python (LazyConfig) configs: configs/lazy/, train_net.py on a .py config."""

import argparse
import json
import logging
import math
import shutil
import socket
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, load_script, logged, metrics_records
from detectron2.config import LazyConfig, instantiate
from detectron2.model_zoo import get_config
from test_resume import _image_ids
from test_train_net import run_train_net, train_net_command

import focal_det2  # noqa: F401  (registers the digits data sets)
from focal_det2 import checks
from focal_det2.lazy import (
    check_model,
    check_nodes,
    check_run_values,
    is_lazy_config,
    lazy_evaluate,
    lazy_test,
    lazy_train,
    setup_lazy_cfg,
)
from focal_det2.losses import OHEMLoss, SoftmaxFocalLoss

# default_setup configures Detectron2's and focal_det2's loggers; each test puts them back
pytestmark = pytest.mark.usefixtures("loggers")

CONFIG = REPO / "configs" / "lazy" / "focal_retinanet_R_50_FPN_1x.py"
SOFTMAX = "model.focal_loss._target_=focal_det2.losses.SoftmaxFocalLoss"


def digits_opts(output_dir, *extra):
    """Overrides that train the COCO config's R50 on the tiny digits sets at 128 px, on the CPU."""
    return [
        "train.device=cpu",
        'train.init_checkpoint=""',  # no ImageNet download
        "train.max_iter=2",
        "train.eval_period=0",
        "train.log_period=1",
        "+train.seed=0",  # a key Detectron2's train node lacks: Hydra's +key=value
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


def run_two_machines(*args):
    """``train_net.py *args`` as machine rank 1 (in the background) and rank 0; rank 0's log."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    machine = ["--num-machines", 2, "--dist-url", f"tcp://127.0.0.1:{port}"]
    cmd = train_net_command(*machine, "--machine-rank", 1, *args)
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as rank1:
        try:
            log = run_train_net(*machine, "--machine-rank", 0, *args)
        except BaseException:
            rank1.kill()  # else it waits for rank 0 until the process group's timeout
            raise
        rank1_log = rank1.communicate(timeout=600)[0]
    assert rank1.returncode == 0, rank1_log[-3000:]
    return log


def test_lazy_config_is_detectron2s_lazy_retinanet_with_the_same_weights():
    cfg = load()
    retinanet = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
    assert cfg.dataloader.pop("degenerate_boxes") == "drop"  # focal_det2's key
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
            SOFTMAX,
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


def test_lazy_head_bias_is_the_prior_at_the_schedules_first_gamma():
    """FL* ramped from gamma 0.5: sigmoid(0.5 b + beta) = 0.01, b = (logit(0.01) - beta) / 0.5
    (the bias for the loss's final gamma, 2, would start at p* = 0.40)."""
    model = instantiate(
        load(
            "model.focal_loss._target_=focal_det2.losses.FocalStarLoss",
            "+model.focal_loss.beta=1.0",
            "model.gamma_schedule._target_=focal_det2.schedules.LinearGamma",
            "model.gamma_schedule.start=0.5",
            "model.gamma_schedule.iters=100",
        ).model
    )
    expected = (math.log(0.01 / 0.99) - 1.0) / 0.5
    torch.testing.assert_close(
        model.head.cls_score.bias, torch.full((9 * 80,), expected), rtol=1e-6, atol=0
    )


def test_train_net_trains_resumes_and_evaluates_a_lazy_config(tmp_path):
    """
    Trained in two processes on the CPU (GLOO; Detectron2's create_ddp_model would give the
    CPU model device_ids, which DistributedDataParallel refuses), then resumed and evaluated
    in this process (train_net.py's lazy_main).
    The two processes are two "machines" of one process each, joined by --dist-url: the
    --num-machines and --machine-rank flags reach Detectron2's launch (with every machine at
    rank 0, both host the process group and the second fails on the taken port).
    """
    opts = digits_opts(tmp_path, SOFTMAX, "train.eval_period=1", "train.checkpointer.period=1")
    opts += ["dataloader.train.total_batch_size=4"]  # 2 images a process
    log = run_two_machines("--config-file", CONFIG, *opts)
    assert "World size: 2" in log
    assert "Starting training from iteration 0" in log and "Total training time" in log
    assert "Model:\nFocalRetinaNet(" in log  # focal_det2's own log lines are shown, and kept
    assert "focal_det2.lazy INFO: Model:" in (tmp_path / "log.txt").read_text()
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    # lr_multiplier: warm-up from 0.001 x lr at iteration 0, then lr (the schedule on 2 iterations)
    assert [r["lr"] for r in records if "loss_cls" in r] == pytest.approx([1e-6, 1e-3])
    # eval_period 1: after iteration 0 (not after the last, 1: the final evaluation is that one,
    # recorded by Detectron2 at the iteration count, 2)
    assert [r["iteration"] for r in records if "bbox/AP" in r] == [0, 2]
    assert (tmp_path / "model_0000000.pth").is_file()  # checkpointer.period 1
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["model"]["head.cls_score.bias"].shape == (9 * 11,)
    # the normaliser's moving average (from 100, Detectron2's start), for an exact resume
    assert final["loss_normalizer"]["loss_normalizer"] != 100

    # resumed and evaluated in this process (train_net.py's lazy_main)
    train_net = load_script("train_net.py")
    with logged(logging.getLogger("detectron2"), logging.INFO) as records:
        with logged(logging.getLogger("focal_det2.lazy")) as warned:
            train_net.lazy_main(args(tmp_path, SOFTMAX, "train.max_iter=3", resume=True))
    # Detectron2's resume: the next iteration
    assert "Starting training from iteration 2" in [r.getMessage() for r in records]
    # a larger train.max_iter rescales the lr schedule of the resumed iterations: said
    rescaled = f"train.max_iter=3, but the run in {tmp_path} trained with train.max_iter=2: "
    assert [r.getMessage().startswith(rescaled) for r in warned] == [True]
    # resumed again, finished: nothing trained, evaluated or written again
    metrics = (tmp_path / "metrics.json").read_text()
    with logged(logging.getLogger("focal_det2.lazy"), logging.INFO) as records:
        train_net.lazy_main(args(tmp_path, SOFTMAX, "train.max_iter=3", resume=True))
    assert (tmp_path / "metrics.json").read_text() == metrics
    finished = f"The run in {tmp_path} is finished: its last checkpoint is of iteration 2, "
    assert any(r.getMessage().startswith(finished) for r in records)

    # the run's own config.yaml (LazyConfig's YAML, every override in it) evaluates its last checkpoint
    saved = tmp_path / "config.yaml"
    assert is_lazy_config(str(saved))
    cmd = argparse.Namespace(
        config_file=str(saved), opts=[], resume=True, eval_only=True, num_gpus=1
    )
    with logged(logging.getLogger("fvcore"), logging.INFO) as records:
        results = train_net.lazy_main(cmd)
    # what last_checkpoint names
    loaded = f"[Checkpointer] Loading from {tmp_path / 'model_final.pth'} ..."
    assert loaded in [r.getMessage() for r in records]
    assert list(results["bbox"])[:6] == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert (tmp_path / "eval" / "model_final" / "config.yaml").is_file()  # not over the run's


def test_is_lazy_config_tells_the_two_kinds_apart(tmp_path):
    assert is_lazy_config(str(CONFIG))
    hand_written = tmp_path / "model_only.yaml"  # a lowercase node: never a yacs key
    hand_written.write_text("model:\n  num_classes: 10\n")
    assert is_lazy_config(str(hand_written))
    assert not is_lazy_config(str(REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml"))
    assert not is_lazy_config(str(REPO / "configs" / "missing.yaml"))  # yacs names the file


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, AMP would train")
def test_lazy_training_with_amp_runs_detectron2s_amp_trainer(tmp_path):
    """``train.amp.enabled``: Detectron2's AMPTrainer, whose step asks for CUDA (setup_lazy_cfg
    refuses it off CUDA before writing, test_run_values_that_fail_after_writing_...)."""
    cfg = load(*digits_opts(tmp_path, "train.amp.enabled=True", "train.max_iter=1"))
    with pytest.raises(AssertionError, match=r"\[AMPTrainer\] CUDA is required for AMP training"):
        lazy_train(cfg)


def test_lazy_weights_at_a_url_that_cannot_be_fetched_say_what_to_pass_instead(tmp_path):
    url = "http://127.0.0.1:9/R-50.pkl"  # a refused local port stands for no network
    cfg = load(*digits_opts(tmp_path, f"train.init_checkpoint={url}"))
    with pytest.raises(OSError) as error:
        lazy_train(cfg)
    assert error.value.__notes__[1] == (
        f"{url} is a URL (train.init_checkpoint): without network, download it elsewhere and "
        'pass the file (train.init_checkpoint=<file>), or train.init_checkpoint="" to start '
        "from random weights."
    )


def test_lazy_test_without_an_evaluator_evaluates_nothing():
    cfg = load()
    del cfg.dataloader.evaluator
    assert lazy_test(cfg, model=None) is None


def misfit(consequence):
    """The error for the softmax checkpoint in the sigmoid model, with its ``consequence``."""
    return (
        r"softmax.pth does not fit .* head.cls_score.weight is \(99,.*\. "
        + consequence
        + r".* the same model.focal_loss \(softmax_focal has model.num_classes \+ 1 logits "
        r"per anchor\)"
    )


def test_lazy_eval_only_refuses_a_checkpoint_of_another_loss(tmp_path):
    """
    The sigmoid model (K logits) from a softmax checkpoint (K + 1) would score with a random
    classifier: refused before anything is written, and by the evaluation's own load.
    """
    model = instantiate(load("model.num_classes=10", SOFTMAX).model)
    weights = tmp_path / "softmax.pth"
    torch.save({"model": model.state_dict()}, weights)
    cmd = args(tmp_path / "out", f"train.init_checkpoint={weights}", eval_only=True)
    train_net = load_script("train_net.py")
    with pytest.raises(ValueError, match=misfit("Evaluating would score")):
        train_net.lazy_main(cmd)
    assert not (tmp_path / "out").exists()
    cfg = load(*digits_opts(tmp_path / "out", f"train.init_checkpoint={weights}"))
    with pytest.raises(ValueError, match=misfit("Evaluating would score")):
        lazy_evaluate(cfg)


def test_lazy_resume_refuses_a_checkpoint_of_another_loss_before_writing(tmp_path):
    """A run's last checkpoint of another loss would resume from a random classifier."""
    run = tmp_path / "run"
    run.mkdir()
    model = instantiate(load("model.num_classes=10", SOFTMAX).model)
    torch.save({"model": model.state_dict(), "iteration": 1}, run / "softmax.pth")
    (run / "last_checkpoint").write_text("softmax.pth")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=misfit("Resuming would go on")):
        setup_lazy_cfg(args(run, resume=True))
    assert sorted(p.name for p in run.iterdir()) == before


def test_lazy_setup_names_a_cuda_device_where_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"train.device=cuda, but PyTorch sees no CUDA device here .*set train.device=cpu\.",
    ):
        setup_lazy_cfg(args(tmp_path, "train.device=cuda"))
    assert list(tmp_path.iterdir()) == []


def test_lazy_setup_names_what_is_missing_or_taken(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"--eval-only needs a trained model: train.init_checkpoint is empty\. "
        r"Pass train.init_checkpoint=<file>.pth \(e.g. train.output_dir/model_final.pth\)",
    ):
        setup_lazy_cfg(args(tmp_path, eval_only=True))
    with pytest.raises(
        FileNotFoundError, match=r"train.init_checkpoint=/nonexistent.pth: the file does not exist"
    ):
        setup_lazy_cfg(args(tmp_path, "train.init_checkpoint=/nonexistent.pth"))
    (tmp_path / "last_checkpoint").write_text("")
    with pytest.raises(
        ValueError,
        match=r"last_checkpoint is empty.* delete it to start from train.init_checkpoint\.",
    ):
        setup_lazy_cfg(args(tmp_path, resume=True))
    (tmp_path / "last_checkpoint").unlink()
    (tmp_path / "model_final.pth").write_bytes(b"a run")
    # no "a larger train.max_iter extends it": a lazy lr_multiplier scales with train.max_iter
    with pytest.raises(
        FileExistsError,
        match=r"train.output_dir .* holds a training run \(model_final.pth\), which a new run would "
        r"overwrite. Pass --resume to continue it, set train.output_dir to another folder",
    ):
        setup_lazy_cfg(args(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth"]


def test_lazy_setup_names_the_nodes_a_config_lacks(tmp_path):
    """A hand-written YAML with a model alone; a .py config without optimizer and lr_multiplier
    trains no model, but evaluates one."""
    hand_written = tmp_path / "model_only.yaml"
    hand_written.write_text("model:\n  num_classes: 10\n")
    cmd = argparse.Namespace(
        config_file=str(hand_written), opts=[], resume=False, eval_only=False, num_gpus=1
    )
    with pytest.raises(
        ValueError,
        match=r"model_only.yaml lacks dataloader, train.output_dir, train.init_checkpoint, "
        r"train.device, train.max_iter, train.amp.enabled, train.ddp, train.checkpointer, "
        r"train.eval_period, train.log_period, dataloader.train, optimizer, lr_multiplier: "
        r"a LazyConfig run reads them\. configs/lazy/focal_retinanet_R_50_FPN_1x.py has them all",
    ):
        setup_lazy_cfg(cmd)
    partial = tmp_path / "partial.py"
    partial.write_text(
        f"from detectron2.config import LazyConfig\n"
        f"cfg = LazyConfig.load({str(CONFIG)!r})\n"
        "model, dataloader, train = cfg.model, cfg.dataloader, cfg.train\n"
    )
    opts = [o for o in digits_opts(tmp_path / "out") if not o.startswith("optimizer.")]
    cmd.config_file, cmd.opts = str(partial), opts
    with pytest.raises(ValueError, match=r"partial.py lacks optimizer, lr_multiplier: "):
        setup_lazy_cfg(cmd)
    weights = tmp_path / "weights.pth"
    torch.save({"model": instantiate(load("model.num_classes=10").model).state_dict()}, weights)
    cmd.opts += [f"train.init_checkpoint={weights}"]
    cmd.eval_only = True
    assert setup_lazy_cfg(cmd).train.init_checkpoint == str(weights)
    # a node set to None is there (Detectron2's checkpointer starts from scratch on None)
    null = setup_lazy_cfg(args(tmp_path / "null", "train.init_checkpoint=null"))
    assert null.train.init_checkpoint is None
    cfg = load()
    del cfg.dataloader.test
    with pytest.raises(ValueError, match=r"x.py lacks dataloader.test: "):
        check_nodes(cfg, "x.py", eval_only=True)
    del cfg.dataloader.evaluator
    check_nodes(cfg, "x.py", eval_only=True)  # no dataloader.test is read without an evaluator


def test_lazy_setup_checks_the_model_before_writing(tmp_path):
    with pytest.raises(
        ValueError, match=r"^MODEL.FOCAL.CB_BETA=0.9 is read only with class"
    ) as error:
        setup_lazy_cfg(args(tmp_path, "model.focal_loss.cb_beta=0.9"))
    assert error.value.__notes__ == [
        "In this LazyConfig: MODEL.FOCAL.CLASS_WEIGHTING is model.focal_loss.class_weighting, "
        "MODEL.FOCAL.CB_BETA is model.focal_loss.cb_beta."
    ]
    with pytest.raises(ValueError, match=r"MODEL.FOCAL.ALPHA=1.5 must be in \[0, 1\]") as error:
        setup_lazy_cfg(args(tmp_path, "model.focal_loss.alpha=1.5"))
    assert error.value.__notes__ == [
        "In this LazyConfig: MODEL.FOCAL.ALPHA is model.focal_loss.alpha."
    ]
    ce = "model.focal_loss._target_=focal_det2.losses.SigmoidCrossEntropyLoss"
    with pytest.raises(ValueError, match=r"MODEL.FOCAL.GAMMA=3.0: MODEL.FOCAL.LOSS cross_entropy "):
        setup_lazy_cfg(args(tmp_path, ce, "model.focal_loss.gamma=3.0"))  # it would be unread
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.eval_perod=1", "the config has no train.eval_perod; did you mean train.eval_period?"),
        # a typo in the middle of the key: the rest of it follows the suggestion
        ("train.checkpointr.period=1", "did you mean train.checkpointer.period?"),
        ("model.focal_los.gamma=1", "did you mean model.focal_loss.gamma?"),
        ("MODEL.FOCAL.GAMMA=1", "did you mean model.focal_loss.gamma?"),  # a yacs key
        ("train.brand_new=1", "the config has no train.brand_new. To add a new key, write "
         "+train.brand_new=1."),
        ("dataloader.train.mapper.augmentations.5.max_size=128",
         "dataloader.train.mapper.augmentations is a list of 2 items; 5 is not an index of it."),
    ],
)  # fmt: skip
def test_an_override_of_a_missing_key_names_the_keys_it_may_stand_for(tmp_path, override, expected):
    """A close key is suggested (and no new key, which would be added unread); without one, a
    new key is written +key=value."""
    with pytest.raises(KeyError) as error:
        setup_lazy_cfg(args(tmp_path, override))
    message = error.value.args[0]
    assert message.startswith(f"{override}: ") and message.endswith(expected)
    assert not ("To add a new key" in message and "did you mean" in message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "words, expected",
    [
        (["MODEL.FOCAL.GAMMA", "1"], "MODEL.FOCAL.GAMMA: a LazyConfig takes a.b=value overrides, "
         "not a yacs config's KEY VALUE pairs; MODEL.FOCAL.GAMMA is model.focal_loss.gamma here: "
         "write model.focal_loss.gamma=<value>."),
        (["model.focal_loss.gamma", "1"], "model.focal_loss.gamma: not an override; a "
         "LazyConfig's are written a.b=value, without spaces around = (a yacs config takes KEY "
         "VALUE pairs)."),
        (["--resume"], "--resume comes after the overrides (argparse gives them every word after "
         "the first one): put train_net.py's flags (--resume, --eval-only, --num-gpus N) before "
         "the a.b=value overrides."),
        ([""], "an empty override (''): remove it from the overrides."),
    ],
)  # fmt: skip
def test_a_word_that_is_not_an_override_is_named_with_how_to_write_it(tmp_path, words, expected):
    with pytest.raises(ValueError) as error:
        setup_lazy_cfg(args(tmp_path, *words))
    assert str(error.value) == expected
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override, error, expected",
    [
        ("dataloader.test.dataset.names=digits_val_tinny", KeyError,
         "dataloader.test.dataset.names: 'digits_val_tinny' is not a registered data set; did "
         "you mean 'digits_val_tiny'"),  # found after training, before
        ("dataloader.train.dataset.names=[digits_train_tiny,nowhere]", KeyError,
         "dataloader.train.dataset.names: 'nowhere' is not a registered data set"),
        # trained with lr nan to nan AP, and on with a nan size in the augmentation's choice
        ("optimizer.lr=nan", ValueError, "optimizer.lr=nan is not finite; it must be a finite "
         "number."),
        ("dataloader.train.mapper.augmentations.0.short_edge_length=[128,nan]", ValueError,
         "dataloader.train.mapper.augmentations.0.short_edge_length=[128, nan] is not finite"),
        # before the model's build, which met it as a bare AssertionError
        ("model.anchor_generator.offset=inf", ValueError, "model.anchor_generator.offset=inf is "
         "not finite"),
        ("train.max_iter=abc", ValueError, "train.max_iter='abc' must be an integer >= 1."),
        ("train.max_iter=0", ValueError, "train.max_iter=0 must be an integer >= 1."),
        ("train.checkpointer.period=0", ValueError,
         "train.checkpointer.period=0 must be an integer >= 1."),
        ("train.log_period=0", ValueError, "train.log_period=0 must be an integer >= 1."),
        ("train.log_period=True", ValueError, "train.log_period=True must be an integer >= 1."),
        ("train.eval_period=-1", ValueError, "train.eval_period=-1 must be an integer >= 0."),
        ("train.device=gpu", ValueError,
         "train.device=gpu is not a torch device; e.g. cpu, cuda, cuda:1."),
        ("train.amp.enabled=True", ValueError,
         "train.amp.enabled=True needs CUDA (Detectron2's AMPTrainer) and train.device=cpu: set "
         "train.amp.enabled=False."),
        # the sampler's "TrainingSampler(size=) expects a positive int" at the first batch
        ("dataloader.train.dataset.names=[]", ValueError,
         "dataloader.train.dataset.names is empty: name a registered data set."),
        # unread by focal_det2's checked loading of the records, or not "error" or "drop"
        ("+dataloader.train.dataset.colour=1", TypeError, "dataloader.train.dataset has colour: "
         "focal_det2 loads and checks the data itself and reads only these arguments of "
         "get_detection_dataset_dicts: names, filter_empty, min_keypoints, proposal_files, "
         "check_consistency."),
        ("dataloader.degenerate_boxes=skip", ValueError,
         "dataloader.degenerate_boxes='skip'; allowed: ['error', 'drop']."),
    ],
)  # fmt: skip
def test_run_values_that_fail_after_writing_are_refused_before(tmp_path, override, error, expected):
    """Each failed inside Detectron2's loop or PyTorch (division by 0, a comparison with a str,
    AMPTrainer's assertion), with an error naming no key, or trained on without a word (a NaN),
    after config.yaml, log.txt and metrics.json were written (which then block the corrected
    run)."""
    with pytest.raises(error) as info:
        setup_lazy_cfg(args(tmp_path, override))
    assert expected in (info.value.args[0] if error is KeyError else str(info.value))
    assert list(tmp_path.iterdir()) == []


def test_a_backend_the_loss_would_refuse_is_named_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("FOCAL_DET2_BACKEND", "eagr")
    with pytest.raises(ValueError, match=r"FOCAL_DET2_BACKEND='eagr': allowed values are eager, "
                       r"triton, compile\. The run trains on train\.device=cpu\."):  # fmt: skip
        setup_lazy_cfg(args(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_data_set_whose_files_are_missing_is_named_before_writing(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    name = f"lazy_missing_files_{tmp_path.name}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(tmp_path / "none.json"), str(tmp_path / "images"))
    with pytest.raises(FileNotFoundError) as error:
        setup_lazy_cfg(args(tmp_path / "run", f"dataloader.test.dataset.names={name}"))
    assert str(error.value) == (
        f"dataloader.test.dataset.names: data set '{name}' reads its json_file "
        f"{tmp_path / 'none.json'}, which does not exist."
    )
    assert not (tmp_path / "run").exists()


def test_an_evaluation_reads_no_training_values(tmp_path):
    """--eval-only: no train loader, max_iter or AMP; only the test set is checked."""
    weights = tmp_path / "weights.pth"
    torch.save({"model": instantiate(load("model.num_classes=10").model).state_dict()}, weights)
    overrides = ("train.max_iter=0", "dataloader.train.dataset.names=nowhere")
    cfg = setup_lazy_cfg(
        args(tmp_path, f"train.init_checkpoint={weights}", *overrides, eval_only=True)
    )
    assert cfg.train.max_iter == 0


def test_a_loss_target_that_does_not_exist_names_the_node_and_the_losses(tmp_path):
    with pytest.raises(ImportError) as error:
        setup_lazy_cfg(args(tmp_path, "model.focal_loss._target_=focal_det2.losses.FocalLos"))
    (note,) = error.value.__notes__
    assert note.startswith(
        "In this LazyConfig: model.focal_loss._target_ = focal_det2.losses.FocalLos. The "
        "registered losses are "
    )
    assert "focal_det2.losses.SigmoidFocalLoss" in note and "focal_det2.losses.OHEMLoss" in note
    assert list(tmp_path.iterdir()) == []


def test_lazy_class_weights_are_counted_checkpointed_and_read_back_on_resume(tmp_path):
    """
    model.focal_loss.class_weighting: the weights are counted from dataloader.train's data
    sets before the first iteration (training without them is an error), saved in the
    checkpoint, and read back on --resume (not counted again), where another cb_beta than the
    one they were counted with is named by its node. The count reads the records the train
    loader loaded (the data set is loaded once).
    """
    from detectron2.data import DatasetCatalog

    from focal_det2 import class_balance
    from focal_det2.class_balance import count_instances, effective_number_weights

    weighting = "model.focal_loss.class_weighting=effective_number"
    loads, get = [], DatasetCatalog.get
    with logged(class_balance.logger, logging.INFO) as records, pytest.MonkeyPatch.context() as m:
        m.setattr(DatasetCatalog, "get", lambda name: loads.append(name) or get(name))
        lazy_train(load(*digits_opts(tmp_path, weighting, "model.focal_loss.cb_beta=0.9")))
    assert loads.count("digits_train_tiny") == 1
    assert [r.getMessage().startswith("Class weights, effective number (beta 0.9) of ['digits_"
                                      "train_tiny']") for r in records] == [True]  # fmt: skip
    counts = count_instances(["digits_train_tiny"], 10)
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["class_weights"]
    assert state["counts"] == counts and state["beta"] == 0.9
    assert state["weights"] == pytest.approx(effective_number_weights(counts, 0.9).tolist())
    assert state["datasets"] == ["digits_train_tiny"]
    resumed = digits_opts(tmp_path, weighting, "model.focal_loss.cb_beta=0.99", "train.max_iter=3")
    with logged(class_balance.logger, logging.INFO) as records:
        lazy_train(load(*resumed), resume=True)
    messages = [r.getMessage() for r in records]
    assert messages[0] == (
        "model.focal_loss.cb_beta=0.99, but the checkpoint's class weights were counted with "
        "beta 0.9; the checkpoint's weights are used."
    )
    assert messages[1].startswith("Class weights from the checkpoint (not recounted):")
    assert len(messages) == 2


def test_lazy_class_weights_need_the_training_data_set_names():
    cfg = load(*digits_opts("unused", "model.focal_loss.class_weighting=effective_number"))
    del cfg.dataloader.train.dataset.names
    with pytest.raises(ValueError, match=r"^model.focal_loss.class_weighting=effective_number "
                       r"counts the instances of dataloader.train.dataset.names, which this "
                       r"config lacks"):  # fmt: skip
        check_run_values(cfg, eval_only=False)
    check_run_values(cfg, eval_only=True)  # an evaluation counts nothing


def test_a_new_key_is_added_with_a_plus(tmp_path):
    assert setup_lazy_cfg(args(tmp_path, "+train.note=7")).train.note == 7


def test_the_model_check_builds_on_the_meta_device():
    """100 million classes: 8 TB of classifier on the CPU, none on the meta device."""
    with logged(checks.logger) as records:
        check_model(load("model.num_classes=100000000"))
    assert records == []  # built, not skipped


def test_a_model_the_meta_device_cannot_build_is_run_unchecked():
    """Detectron2's ViTDet (its ViT calls .item() in __init__) is left to the run's own build,
    with a warning."""
    cfg = get_config("common/models/mask_rcnn_vitdet.py")
    with logged(checks.logger) as records:
        check_model(cfg)
    assert ["cannot be built on the meta device" in r.getMessage() for r in records] == [True]


def test_lazy_names_are_arguments_the_lazy_nodes_take():
    """
    Every node LAZY_NAMES points an error at exists: an argument of a registered loss
    (model.focal_loss.*), of the head, of a gamma schedule, or of FocalRetinaNet (its own or
    Detectron2's RetinaNet's, which it passes on).
    """
    import inspect

    from detectron2.modeling import RetinaNet

    from focal_det2.lazy import LAZY_NAMES
    from focal_det2.losses import registered_losses
    from focal_det2.modeling.head import FocalRetinaNetHead
    from focal_det2.modeling.meta_arch import FocalRetinaNet
    from focal_det2.schedules import GammaSchedule

    def arguments(*classes):
        return {p for cls in classes for p in inspect.signature(cls.__init__).parameters}

    takes = {
        "focal_loss": arguments(*registered_losses().values()),
        "head": arguments(FocalRetinaNetHead),
        "gamma_schedule": arguments(GammaSchedule) | {"_target_"},
    }
    for key, path in LAZY_NAMES.items():
        parts = path.split(".")
        assert parts[0] == "model", key
        if len(parts) == 2:
            assert parts[1] in arguments(FocalRetinaNet, RetinaNet), key
        else:
            assert len(parts) == 3 and parts[2] in takes[parts[1]], (key, path)


def _resume_cfg(output_dir, *extra):
    """5 iterations on the digits, checkpointed after 3, no evaluation: the exact-resume run."""
    opts = ["train.max_iter=5", "train.checkpointer.period=3", *extra]
    # GroupNorm: from scratch, FrozenBN's unnormalised activations diverge after 3 iterations
    opts += ["model.backbone.bottom_up.stem.norm=GN", "model.backbone.bottom_up.stages.norm=GN"]
    opts += ["dataloader.train.mapper.augmentations.1.prob=0.0"]  # no flips: drawn afresh
    cfg = load(*digits_opts(output_dir, *opts))
    del cfg.dataloader.evaluator
    return cfg


def test_lazy_resume_continues_the_run_exactly(tmp_path):
    """
    A LazyConfig run resumed from its checkpoint after iteration 2 (the files of a run killed
    after iteration 4, before its last checkpoint) ends with the weights and metrics.json
    values of the uninterrupted run, bit for bit: the data order continues (train.seed), the
    smoothed scalars continue from the checkpointed history, and the records of the
    iterations trained again are dropped. The normaliser's moving average is checkpointed.
    """
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    lazy_train(_resume_cfg(whole))
    shutil.copytree(whole, parts)
    (parts / "model_final.pth").unlink()
    (parts / "last_checkpoint").write_text("model_0000002.pth")
    with logged(logging.getLogger("focal_det2"), logging.INFO) as records:
        lazy_train(_resume_cfg(parts), resume=True)
    dropped = f"{parts / 'metrics.json'}: dropped the records of iterations >= 3 (2), written "
    assert [r.getMessage().startswith(dropped) for r in records].count(True) == 1
    assert {r.levelno for r in records} == {logging.INFO}  # no warning: the resume is exact
    expected = torch.load(whole / "model_final.pth", weights_only=False)
    got = torch.load(parts / "model_final.pth", weights_only=False)
    assert got["iteration"] == 4 and got["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["loss_normalizer"] == expected["loss_normalizer"]
    assert metrics_records(parts) == metrics_records(whole)
    assert [r["iteration"] for r in metrics_records(parts)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_train_loader_is_the_seeded_stream_and_continues_it(workers):
    """
    configs/lazy/'s dataloader.train from iteration 0 is Detectron2's loader of the same node
    with ``TrainingSampler(seed=train.seed)``; from iteration 3 it continues that stream (with
    2 workers, which deal the batches round-robin, too).
    """
    from detectron2.data.samplers import TrainingSampler

    from focal_det2.lazy import lazy_train_loader

    cfg = load(*digits_opts("unused", "+train.seed=3", f"dataloader.train.num_workers={workers}"))
    whole = _image_ids(lazy_train_loader(cfg), 7)
    resumed = lazy_train_loader(cfg)
    resumed.start_iter = 3
    assert _image_ids(resumed, 4) == whole[3:]
    node = cfg.dataloader.train
    dataset = instantiate(node.dataset)
    node.sampler = TrainingSampler(len(dataset), seed=3)
    assert _image_ids(instantiate(node), 7) == whole
    assert whole != _image_ids(lazy_train_loader(load(*digits_opts("unused", "+train.seed=4"))), 7)


def test_a_lazy_resume_says_what_keeps_it_from_being_exact(tmp_path, monkeypatch):
    """
    Without train.seed the resumed run draws a new data order; a dataloader.train with its own
    sampler (or not Detectron2's build_detection_train_loader) restarts its order; several
    processes without model.sync_normalizer resume from process 0's normaliser: each says so.
    """
    from detectron2.data.samplers import TrainingSampler

    from focal_det2.lazy import lazy_train_loader

    lazy_train(_resume_cfg(tmp_path, "train.max_iter=3"))
    cfg = _resume_cfg(tmp_path, "train.max_iter=4")
    del cfg.train.seed
    with logged(logging.getLogger("focal_det2.lazy")) as records:
        lazy_train(cfg, resume=True)
    assert [r.getMessage() for r in records] == [
        "train.seed is not set (or < 0): the resumed run draws a new data order; set "
        "+train.seed=N for an exact resume."
    ]
    cfg = load(*digits_opts("unused"))
    cfg.dataloader.train.sampler = TrainingSampler(4, seed=0)
    loader = lazy_train_loader(cfg)
    loader.start_iter = 2
    with logged(logging.getLogger("focal_det2.engine")) as records:
        next(iter(loader))
    assert [r.getMessage() for r in records] == [
        "dataloader.train.sampler: the resumed run restarts its data order; Detectron2's "
        "build_detection_train_loader of a list of records without a sampler continues it."
    ]
    from detectron2.utils import comm

    from focal_det2.lazy import _continue

    cfg = load(*digits_opts("unused"))
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    for synced in (True, False):
        with logged(logging.getLogger("focal_det2.lazy")) as records:
            _continue(cfg, lazy_train_loader(cfg), SimpleNamespace(sync_normalizer=synced), 3)
        assert ["model.sync_normalizer is off" in r.getMessage() for r in records] == (
            [] if synced else [True]
        )


@pytest.mark.parametrize("seed", ["'0'", "0.5", "null", "True"])
def test_a_train_seed_that_is_not_an_integer_is_refused_before_writing(tmp_path, seed):
    """Detectron2's default_setup compares train.seed with 0 after writing config.yaml and
    log.txt; a seed of another type is named first."""
    opts = [o for o in digits_opts(tmp_path / "run") if not o.startswith("+train.seed")]
    run = argparse.Namespace(
        config_file=str(CONFIG), opts=[*opts, f"+train.seed={seed}"], resume=False,
        eval_only=False, num_gpus=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^train\.seed=.* must be an integer \(< 0: a random"):
        setup_lazy_cfg(run)
    assert not (tmp_path / "run").exists()


def test_degenerate_boxes_where_focal_det2_does_not_load_the_data_is_refused_naming_it():
    """dataloader.degenerate_boxes is read only for Detectron2's
    get_detection_dataset_dicts and a model whose classes are known; elsewhere it would reach
    the node's _target_ as an unexpected argument, after writing."""
    from focal_det2.lazy import check_run_values

    cfg = load(*digits_opts("unused"))
    del cfg.model.num_classes
    where = r"^dataloader.degenerate_boxes=drop is read where focal_det2 loads the training data"
    with pytest.raises(ValueError, match=where):
        check_run_values(cfg, eval_only=False)
    cfg = load(*digits_opts("unused"))
    cfg.dataloader.train.dataset._target_ = "detectron2.data.DatasetCatalog.get"
    with pytest.raises(ValueError, match=where):
        check_run_values(cfg, eval_only=False)


def test_data_sets_without_class_names_train_together_as_in_detectron2():
    """get_detection_dataset_dicts skips the thing_classes check where a data set has none."""
    import copy

    from detectron2.data import DatasetCatalog

    from focal_det2.lazy import lazy_train_loader

    records = DatasetCatalog.get("digits_train_tiny")
    names = ["test_lazy_unnamed_a", "test_lazy_unnamed_b"]
    for name in names:
        if name not in DatasetCatalog:
            DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    cfg = load(*digits_opts("unused", f"dataloader.train.dataset.names=[{','.join(names)}]"))
    assert len(lazy_train_loader(cfg).dataset) == 2 * len(records)
