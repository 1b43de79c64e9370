"""The stock Detectron2 machinery on every config: load, train, evaluate, CLI."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import CONFIGURED_LOSSES, LOSSES, REPO, digits_cfg, load_script
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser

import focal_det2
from focal_det2.engine import FocalTrainer

ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DIGITS_CONFIGS = sorted(p.stem for p in (REPO / "configs" / "digits").glob("*_1x.yaml"))
AP_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_the_shipped_losses_have_digits_configs_of_registered_losses():
    losses = {digits_cfg(name).MODEL.FOCAL.LOSS for name in DIGITS_CONFIGS}
    assert losses == set(CONFIGURED_LOSSES) and losses <= set(LOSSES)
    assert any(digits_cfg(n).MODEL.FOCAL.GAMMA_SCHEDULE.NAME != "constant" for n in DIGITS_CONFIGS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_yaml_loads(path):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.META_ARCHITECTURE == "FocalRetinaNet"


@pytest.mark.parametrize("config", DIGITS_CONFIGS)
def test_digits_config_trains_and_evaluates(config, tmp_path):
    cfg = digits_cfg(config, tmp_path)
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates after the last iteration
    # Detectron2 writes metrics every 20 iterations and after the last one.
    *_, last_train, evaluation = map(
        json.loads, (tmp_path / "metrics.json").read_text().splitlines()
    )
    assert last_train["iteration"] == 2
    assert last_train["focal_gamma"] == trainer.model.gamma_schedule(2)  # not smoothed
    assert {f"bbox/{key}" for key in AP_KEYS} <= set(evaluation)
    assert (tmp_path / "model_final.pth").exists()


def train_net_command(*args):
    """``python train_net.py *args`` (each argument as a string)."""
    return [sys.executable, str(REPO / "train_net.py"), *map(str, args)]


def run_train_net(*args):
    cmd = train_net_command(*args)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_train_net_cli_trains_resumes_and_evaluates(tmp_path):
    cfg = digits_cfg(output_dir=tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    # key=value overrides on the command line; 2 iterations, then resume to 4.
    run_train_net("--config-file", config, "SOLVER.MAX_ITER", 2, "TEST.EVAL_PERIOD", 0)
    log = run_train_net("--config-file", config, "--resume", "SOLVER.MAX_ITER", 4)
    assert "Starting training from iteration 2" in log
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert 3 in [r["iteration"] for r in records]
    # each run's final evaluation, the first run's kept by the resume that extends it
    assert [r["iteration"] for r in records if "bbox/AP" in r] == [2, 4]
    # resumed again, finished: nothing trained, evaluated or written (Detectron2 evaluated it
    # again and appended the record at MAX_ITER + 1)
    run = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    log = run_train_net("--config-file", config, "--resume", "SOLVER.MAX_ITER", 4)
    assert f"The run in {tmp_path} is finished: its last checkpoint is of iteration 3" in log
    assert "Starting training" not in log and "Evaluation results" not in log
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == {
        **run,
        tmp_path / "log.txt": (tmp_path / "log.txt").read_bytes(),  # the only file written
    }
    weights = tmp_path / "model_final.pth"
    trained = {
        p: p.read_bytes() for p in [tmp_path / "config.yaml", *(tmp_path / "inference").iterdir()]
    }
    log = run_train_net("--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights)
    assert "Evaluation results for digits_val_tiny" in log
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    # the evaluation wrote into a folder of its own, the training run's config.yaml is intact
    assert (
        tmp_path / "eval" / "model_final" / "inference" / "coco_instances_results.json"
    ).exists()
    assert trained == {p: p.read_bytes() for p in trained}
    # no third-party deprecation noise on a model command (torch.jit.script at import, torch.meshgrid)
    assert "Warning" not in log, log


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_processes_on_cuda_without_cuda_are_refused_before_the_launch(tmp_path):
    """Each of the launched processes failed on its own, and which error came first (the
    device's, or a peer's lost connection) was a race."""
    cmd = train_net_command(
        "--config-file", REPO / "configs" / "digits" / f"{DIGITS_CONFIGS[0]}.yaml",
        "--num-gpus", 2, "MODEL.DEVICE", "cuda",
        "OUTPUT_DIR", tmp_path / "run",
    )  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.rstrip().endswith(
        "ValueError: MODEL.DEVICE=cuda, but PyTorch sees no CUDA device here "
        "(torch.cuda.is_available() is False): set MODEL.DEVICE cpu."
    )
    assert "Traceback" in done.stderr and "spawn" not in done.stderr  # raised in this process
    assert not (tmp_path / "run").exists()


def test_more_processes_than_cuda_devices_are_named(monkeypatch):
    from focal_det2.checks import check_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_processes("cuda", 2, "MODEL.DEVICE")
    check_processes("cpu", 8, "MODEL.DEVICE")  # GLOO: any number
    with pytest.raises(ValueError, match=r"^--num-gpus 3 with MODEL.DEVICE=cuda: PyTorch sees 2 "):
        check_processes("cuda", 3, "MODEL.DEVICE")
    with pytest.raises(ValueError) as error:
        check_processes("cuda", 8, "train.device", "=")
    assert str(error.value) == (
        "--num-gpus 8 with train.device=cuda: PyTorch sees 2 CUDA device(s) here; pass "
        "--num-gpus 2 or fewer (or train.device=cpu for 8 processes on the CPU)."
    )


ENTRY_POINTS = [
    ["train_net.py", "--help"],
    ["tools/demo.py", "--help"],
    ["tools/plot_loss_cdf.py", "--help"],
    ["tools/plot_loss_curves.py", "--help"],
    ["tools/ablate.py", "--preset", "tiny", "--list"],  # imports Detectron2
    ["tools/export_model.py", "--help"],
]
# A tool's sys.path[0] is tools/: this checkout's package, not whichever focal_det2 is installed.
TOOLS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}


def test_entry_points_start_without_third_party_warnings():
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=TOOLS_ENV,
        )
        for argv in ENTRY_POINTS
    ]
    for argv, proc in zip(ENTRY_POINTS, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (argv, err[-2000:])
        assert "Warning" not in err, (argv, err)
        if argv == ["train_net.py", "--help"]:  # our examples and rules, not Detectron2's
            assert "writes to OUTPUT_DIR/eval/<checkpoint name>/" in out
            assert "configs/lazy/focal_retinanet_R_50_FPN_1x.py train.max_iter=100" in out


def test_warning_filters_are_precise():
    """Only the third-party messages are hidden: a FutureWarning of ours, or one raised elsewhere, shows."""
    code = (
        "import runpy, sys, warnings; sys.argv = ['train_net.py', '--help']\n"
        "try:\n    runpy.run_path('train_net.py', run_name='not_main')\nexcept SystemExit:\n    pass\n"
        "warnings.warn('`torch.jit.script` is deprecated (raised by us)', FutureWarning)\n"
        "warnings.warn('torch.meshgrid: in an upcoming release (raised by us)', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert "(raised by us)" in done.stderr and done.stderr.count("Warning") == 2, done.stderr


def test_importing_the_package_leaves_the_warning_filters_as_they_were():
    """The import-time deprecation noise is hidden inside warnings.catch_warnings(): a library sets no filter."""
    code = (
        "import warnings; before = list(warnings.filters)\n"
        "import focal_det2\n"
        "assert warnings.filters == before, warnings.filters[:3]\n"
        "focal_det2.hide_third_party_deprecations()\n"
        "assert warnings.filters != before\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr  # and the import printed no noise


@pytest.mark.parametrize("export", [False, True])
def test_hidden_warnings_are_exactly_the_third_party_ones(export):
    """In process: the (message, category, module) triples hide_third_party_deprecations hides."""

    def shown(message, category, module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            focal_det2.hide_third_party_deprecations(export=export)
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
        return len(caught) == 1

    jit = "`torch.jit.{}` is deprecated. Please switch to `torch.compile` or `torch.export`."
    meshgrid = (
        "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument."
    )
    assert not shown(jit.format("script"), FutureWarning, "torch.jit._script")
    assert not shown(meshgrid, UserWarning, "torch.functional")
    # the export's calls: hidden only with export=True
    for name, module in [
        ("trace", "torch.jit._trace"),
        ("trace_method", "torch.jit._trace"),
        ("save", "torch.jit._serialization"),
        ("load", "torch.jit._serialization"),
    ]:
        assert shown(jit.format(name), FutureWarning, module) != export, name
    # the same messages raised by us, or of another category, show
    assert shown(jit.format("script"), FutureWarning, "focal_det2.engine")
    assert shown(jit.format("script"), DeprecationWarning, "torch.jit._script")
    assert shown(meshgrid, UserWarning, "focal_det2.engine")
    assert shown(meshgrid, FutureWarning, "torch.functional")
    # torch's other meshgrid warnings show
    assert shown("torch.meshgrid: indexing must be 'ij' or 'xy'", UserWarning, "torch.functional")


def test_train_net_eval_only_evaluates_the_checkpoints_weights(tmp_path, monkeypatch):
    """train_net.main with --eval-only hands FocalTrainer.test the model with MODEL.WEIGHTS loaded."""
    train_net = load_script("train_net.py")
    cfg = digits_cfg(output_dir=tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    model = FocalTrainer.build_model(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.5)  # no initialisation gives this
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("constant")
    evaluated = []
    monkeypatch.setattr(
        FocalTrainer, "test", classmethod(lambda cls, cfg, model: evaluated.append(model) or {})
    )
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(config),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(tmp_path / "constant.pth"),
        ]
    )
    assert train_net.main(args) == {}
    (model,) = evaluated
    assert all(bool((p == 0.5).all()) for p in model.parameters())
