"""
The scripts in tools/: each runs on a tiny trained model (or synthetic input)
and writes what it promises. Tools are imported from their files and called
through ``main(argv)`` with the arguments a user would type.
"""

import argparse
import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, digits_cfg, load_script, metrics_records, tiny_cfg
from detectron2.config import get_cfg
from detectron2.engine.hooks import PeriodicCheckpointer
from PIL import Image

from focal_det2 import add_focal_config
from focal_det2.config import load_config
from focal_det2.engine import FocalTrainer
from focal_det2.losses import functional


def load_tool(name):
    """tools/<name>.py as a module."""
    return load_script(f"tools/{name}.py")


def png_size(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """
    A sigmoid-FL digits model trained 3 iterations on the tiny split with
    FocalTrainer. Returns (config file, weights, OUTPUT_DIR); the config file
    is the run's config as default_setup would have dumped it.
    """
    out = tmp_path_factory.mktemp("trained")
    cfg = digits_cfg("sigmoid_focal_R18_FPN_1x", out)
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    config_file = out / "config.yaml"
    config_file.write_text(cfg.dump())
    return str(config_file), str(out / "model_final.pth"), out


# --- plot_loss_curves --------------------------------------------------------------


def test_plot_loss_curves_writes_png_of_requested_size(tmp_path, monkeypatch):
    """Figure 1's panel draws CE against p_t: -log(p_t); the appendix's against x_t."""
    tool = load_tool("plot_loss_curves")
    figures = _captured_figures(tool, monkeypatch)
    output = tmp_path / "curves.png"
    tool.main(["--output", str(output), "--width", "6", "--height", "3", "--dpi", "50"])
    assert png_size(output) == (300, 150)
    left, right = figures[0].axes
    # Figure 1: CE and FL at the paper's gammas, FL* and softmax FL; the appendix: CE, gamma 2
    # and FL*
    star = ["FL*, γ = 2, β = 1", "FL*, γ = 4, β = 0"]
    softmax = "softmax FL (2-way), γ = 2"
    fl = [f"FL, γ = {g}" for g in ("0.5", "1", "2", "5")]
    assert [line.get_label() for line in left.lines] == ["CE (γ = 0)", *fl, *star, softmax]
    assert [line.get_label() for line in right.lines] == ["CE (γ = 0)", fl[2], *star, softmax]
    (ce,) = [line for line in left.lines if line.get_label().startswith("CE")]
    p_t = ce.get_xdata()
    np.testing.assert_allclose(ce.get_ydata(), -np.log(p_t), rtol=1e-6)
    # the appendix panel draws CE against x_t in [-5, 5]: log(1 + exp(-x_t))
    right = figures[0].axes[1]
    (ce,) = [line for line in right.lines if line.get_label().startswith("CE")]
    x_t = ce.get_xdata()
    assert (x_t[0], x_t[-1]) == (-5.0, 5.0)
    np.testing.assert_allclose(ce.get_ydata(), np.log1p(np.exp(-x_t)), rtol=1e-6)


def test_loss_curves_values_are_the_closed_forms():
    curves = load_tool("plot_loss_curves").loss_curves(np.array([-2.0, 0.0, 3.0]))
    p = 1 / (1 + np.exp(-np.array([-2.0, 0.0, 3.0])))
    np.testing.assert_allclose(curves["CE (γ = 0)"][0], -np.log(p), rtol=1e-10)
    np.testing.assert_allclose(curves["FL, γ = 2"][0], -((1 - p) ** 2) * np.log(p), rtol=1e-10)
    # a 2-way softmax focal loss is the sigmoid one
    np.testing.assert_allclose(
        curves["softmax FL (2-way), γ = 2"][0], curves["FL, γ = 2"][0], rtol=1e-10
    )
    star = 1 / (1 + np.exp(-(4 * np.array([-2.0, 0.0, 3.0]) + 0)))
    np.testing.assert_allclose(curves["FL*, γ = 4, β = 0"][0], -np.log(star) / 4, rtol=1e-10)
    star = 1 / (1 + np.exp(-(2 * np.array([-2.0, 0.0, 3.0]) + 1)))
    np.testing.assert_allclose(curves["FL*, γ = 2, β = 1"][0], -np.log(star) / 2, rtol=1e-10)


# --- plot_training -------------------------------------------------------------------


def _synthetic_metrics(path, gamma_ramp):
    """metrics.json as Detectron2's JSONWriter writes it, with an evaluation record at the end."""
    with open(path, "w") as f:
        for it in range(19, 200, 20):
            gamma = min(it / 100, 1.0) * 2.0 if gamma_ramp else 2.0
            f.write(
                json.dumps(
                    {
                        "iteration": it,
                        "loss_cls": 1.0 / (it + 1),
                        "loss_box_reg": 0.5,
                        "focal_gamma": gamma,
                        "lr": 0.01,
                    }
                )
                + "\n"
            )
        f.write(json.dumps({"iteration": 200, "bbox/AP": 1.0}) + "\n")


def test_plot_training_draws_runs_and_scheduled_gamma(tmp_path, trained, monkeypatch):
    _, _, trained_dir = trained
    ramp = tmp_path / "ramp"
    ramp.mkdir()
    _synthetic_metrics(ramp / "metrics.json", gamma_ramp=True)
    tool = load_tool("plot_training")
    figures = _captured_figures(tool, monkeypatch)

    output = tmp_path / "curves.png"
    keys = tool.plot([str(trained_dir), str(ramp)], str(output), width=6, height=2, dpi=50)
    assert keys == ["loss_cls", "loss_box_reg", "focal_gamma"]
    assert png_size(output) == (300, 100)
    ramp_line = figures[0].axes[2].get_lines()[1]  # the gamma panel's second run
    iterations = list(range(19, 200, 20))
    assert list(ramp_line.get_xdata()) == iterations
    assert list(ramp_line.get_ydata()) == [min(it / 100, 1.0) * 2.0 for it in iterations]

    constant = tmp_path / "constant.png"
    tool.main(
        [str(trained_dir), str(ramp / "metrics.json"), "--labels", "a,b", "--output", str(constant)]
    )
    assert png_size(constant) == (1200, 400)
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["a", "b"]
    assert tool.plot([str(trained_dir)], str(constant)) == ["loss_cls", "loss_box_reg"]


def test_plot_training_legend_names_the_runs(tmp_path, monkeypatch):
    """A run given as its folder or its metrics.json is named by its folder."""
    for run in ("fl", "ce"):
        (tmp_path / run).mkdir()
        _synthetic_metrics(tmp_path / run / "metrics.json", gamma_ramp=False)
    tool = load_tool("plot_training")
    figures = _captured_figures(tool, monkeypatch)
    runs = [str(tmp_path / "fl"), str(tmp_path / "ce" / "metrics.json")]
    tool.plot(runs, str(tmp_path / "curves.png"), dpi=20)
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["fl", "ce"]
    # against the iteration, the losses on a log scale (a constant gamma has no panel)
    loss_cls, loss_box_reg = figures[0].axes
    iterations = list(range(19, 200, 20))
    assert list(loss_cls.get_lines()[0].get_xdata()) == iterations
    assert list(loss_cls.get_lines()[0].get_ydata()) == [1.0 / (it + 1) for it in iterations]
    assert (loss_cls.get_yscale(), loss_box_reg.get_yscale()) == ("log", "log")
    # a scheduled gamma gets a panel on a linear scale: a ramp from 0 keeps its first points
    _synthetic_metrics(tmp_path / "ce" / "metrics.json", gamma_ramp=True)
    tool.plot(runs, str(tmp_path / "curves.png"), dpi=20)
    gamma = figures[1].axes[2]
    assert gamma.get_title() == "focal_gamma" and gamma.get_yscale() == "linear"


def test_plot_training_reads_training_records_only(tmp_path):
    _synthetic_metrics(tmp_path / "metrics.json", gamma_ramp=True)
    with open(tmp_path / "metrics.json", "a") as f:
        f.write("\n  \n")  # blank lines (a file edited by hand) are skipped
    series = load_tool("plot_training").read_series(
        str(tmp_path / "metrics.json"), ["loss_cls", "focal_gamma"]
    )
    assert series["loss_cls"].shape == (10, 2)
    assert series["focal_gamma"][0].tolist() == [19, 0.38]


def test_plot_training_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 19, "loss_cls": 1.0}\n{"iteration": 39, "loss_c\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a JSON record"):
        load_tool("plot_training").read_series(str(path), ["loss_cls"])


def test_plot_training_labels_must_match_the_runs(tmp_path):
    _synthetic_metrics(tmp_path / "metrics.json", gamma_ramp=False)
    runs, output = [str(tmp_path), str(tmp_path / "metrics.json")], tmp_path / "curves.png"
    with pytest.raises(ValueError, match="--labels: 1 labels for 2 runs"):
        load_tool("plot_training").plot(runs, str(output), labels=["a"])
    assert not output.exists()


def test_plot_training_default_labels_drop_the_folder_the_runs_share():
    short_names = load_tool("plot_training")._short_names
    assert short_names(["/o/runs/a/seed0", "/o/runs/b/seed0"]) == ["a/seed0", "b/seed0"]
    assert short_names(["/o/runs/a/seed0"]) == ["seed0"]


# --- plot_loss_cdf -------------------------------------------------------------------


def test_plot_loss_cdf_on_trained_model(tmp_path, trained, capsys):
    """--dataset is read before the config's test set; the summary counts the images read
    (the tiny split's 8, not --num-images' 300)."""
    config_file, weights, _ = trained
    output = tmp_path / "cdf.png"
    counts = load_tool("plot_loss_cdf").main(
        [
            *("--config-file", config_file, "--output", str(output), "--gammas", "0,2"),
            *("--dataset", "digits_val_tiny", "--width", "6", "--height", "3", "--dpi", "50"),
            *("MODEL.WEIGHTS", weights, "DATASETS.TEST", "('digits_not_registered',)"),
        ]
    )
    assert png_size(output) == (300, 150)
    assert 0 < 20 * counts["positive"] < counts["negative"]
    assert "negative anchors from 8 images of digits_val_tiny\n" in capsys.readouterr().out


def test_plot_loss_cdf_draws_the_gammas_and_images_asked_for(tmp_path, trained, capsys):
    """--gammas gives the curves and summary lines (no default gamma among them), and
    --num-images the first images read: the counts are those of the anchors of 5 images."""
    config_file, weights, _ = trained
    tool = load_tool("plot_loss_cdf")
    output = tmp_path / "cdf.png"
    counts = tool.main(
        [
            *("--config-file", config_file, "--output", str(output), "--gammas", "0,3"),
            *("--num-images", "5", "--dpi", "50", "MODEL.WEIGHTS", weights),
        ]
    )
    _, labels = tool.anchor_logits(
        load_config(config_file, ["MODEL.WEIGHTS", weights]), "digits_val_tiny", num_images=5
    )
    k = load_config(config_file).MODEL.RETINANET.NUM_CLASSES
    assert counts == {"positive": int((labels < k).sum()), "negative": int((labels == k).sum())}
    out = capsys.readouterr().out
    assert "anchors from 5 images of digits_val_tiny\n" in out
    summary = re.findall(r"  (positive|negative) γ=([\d.]+): hardest 1% carry", out)
    assert summary == [("positive", "0"), ("positive", "3"), ("negative", "0"), ("negative", "3")]


def test_plot_loss_cdf_reads_every_image_at_the_test_time_size(trained):
    """Batches of 3 give the anchors of batches of 8 (none dropped), and the training resize
    (here 96 px) is not used: the digits are measured as the model sees them at test time."""
    config_file, weights, _ = trained
    tool = load_tool("plot_loss_cdf")
    cfg = load_config(config_file, ["MODEL.WEIGHTS", weights])
    logits, labels = tool.anchor_logits(cfg, "digits_val_tiny", num_images=4)
    opts = ["MODEL.WEIGHTS", weights, "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 96]
    cfg = load_config(config_file, opts)
    small_logits, small_labels = tool.anchor_logits(
        cfg, "digits_val_tiny", num_images=4, batch_size=3
    )
    assert torch.equal(small_labels, labels)
    torch.testing.assert_close(small_logits, logits)


@pytest.mark.parametrize("tool", ["demo", "export_model", "plot_loss_cdf"])
def test_tools_refuse_a_checkpoint_of_another_loss(tmp_path, tool):
    """
    A sigmoid_focal checkpoint (K logits per anchor) under a softmax_focal config (K + 1):
    Detectron2 would skip the classifier with a warning and draw, export or plot a random
    one; each tool loads through load_for_evaluation, which names the tensor.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    DetectionCheckpointer(build_model(digits_cfg()), save_dir=str(tmp_path)).save("sigmoid")
    opts = ["MODEL.WEIGHTS", str(tmp_path / "sigmoid.pth"), "MODEL.FOCAL.LOSS", "softmax_focal"]
    cfg = digits_cfg(output_dir=tmp_path, opts=opts)
    module = load_tool(tool)
    with pytest.raises(ValueError, match=r"does not fit the model of this config: head.cls_score"):
        if tool == "demo":
            module.CheckedPredictor(cfg)
        elif tool == "export_model":
            module.export(cfg, "scripting", str(tmp_path / "export"))
        else:
            module.anchor_logits(cfg, "digits_val_tiny", num_images=1)
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("tool", ["demo", "export_model", "plot_loss_cdf"])
def test_tools_name_a_cuda_device_that_is_not_there(tmp_path, tool):
    """MODEL.DEVICE cuda (a COCO config's) on a machine without CUDA: named before any model."""
    config = str(REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml")
    argv = ["--config-file", config]
    argv += {
        "demo": ["--dataset", "digits_val_tiny", "--output", str(tmp_path / "drawn")],
        "export_model": ["--output", str(tmp_path / "out")],
        "plot_loss_cdf": [],
    }[tool]
    argv += ["MODEL.DEVICE", "cuda", "MODEL.WEIGHTS", str(tmp_path / "never_read.pth")]
    with pytest.raises(ValueError, match="MODEL.DEVICE=cuda, but PyTorch sees no CUDA device"):
        load_tool(tool).main(argv)
    assert list(tmp_path.iterdir()) == []


def test_per_anchor_loss_matches_functional_and_labels_come_from_the_matcher(trained):
    config_file, weights, _ = trained
    tool = load_tool("plot_loss_cdf")
    cfg = load_config(config_file, ["MODEL.WEIGHTS", weights])
    from detectron2.data import DatasetCatalog

    logits, labels = tool.anchor_logits(cfg, "digits_val_tiny", num_images=2)
    K = cfg.MODEL.RETINANET.NUM_CLASSES
    assert logits.shape[1] == K and labels.min() >= 0 and labels.max() <= K
    assert 0 < (labels < K).sum() < (labels == K).sum()
    # every object's class has its anchors (the matcher gives each box its best ones), class 0 too
    images = DatasetCatalog.get("digits_val_tiny")[:2]
    classes = {a["category_id"] for d in images for a in d["annotations"]}
    assert 0 in classes and set(labels.unique().tolist()) == classes | {K}
    for gamma in (0.0, 1.5):
        losses = tool.per_anchor_focal_loss(logits, labels, gamma)
        torch.testing.assert_close(
            losses.sum(), functional.sigmoid_focal_loss(logits, labels, gamma=gamma, alpha=-1)
        )


def test_loss_cdfs_split_positive_and_negative_anchors():
    """Positives are the anchors of a class (0 included), negatives the background (K)."""
    tool = load_tool("plot_loss_cdf")
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 3, generator=g), torch.tensor([0, 1, 2] + [3] * 9)
    cdfs = tool.loss_cdfs(logits, labels, [0.0, 2.0])
    for gamma in (0.0, 2.0):
        losses = tool.per_anchor_focal_loss(logits, labels, gamma).numpy()
        np.testing.assert_allclose(cdfs["positive"][gamma], tool.normalized_cdf(losses[:3]))
        np.testing.assert_allclose(cdfs["negative"][gamma], tool.normalized_cdf(losses[3:]))


def test_loss_cdfs_leave_out_a_group_without_anchors():
    tool = load_tool("plot_loss_cdf")
    cdfs = tool.loss_cdfs(torch.zeros(4, 3), torch.tensor([3, 3, 3, 3]), [2.0])
    assert cdfs["positive"] == {} and len(cdfs["negative"][2.0]) == 4


def test_normalized_cdf_and_share_of_hardest():
    tool = load_tool("plot_loss_cdf")
    cdf = tool.normalized_cdf(np.array([3.0, 1.0, 0.0, 6.0]))
    np.testing.assert_allclose(cdf, [0.0, 0.1, 0.4, 1.0])
    assert tool.share_of_hardest(cdf, 0.25) == pytest.approx(0.6)


def test_plot_loss_cdf_draws_the_cdf_against_the_fraction_of_anchors(tmp_path, monkeypatch):
    """Anchor i of n (sorted) at fraction i / n: [0, 0.1, 0.4, 1] is 0.1 at a half, 0 before
    the first quarter, 1 at the end."""
    tool = load_tool("plot_loss_cdf")
    figures = _captured_figures(tool, monkeypatch)
    cdf = tool.normalized_cdf(np.array([3.0, 1.0, 0.0, 6.0]))
    even = tool.normalized_cdf(np.ones(4))
    cdfs = {"positive": {2.0: cdf}, "negative": {2.0: even}}
    tool.plot(cdfs, {"positive": 4, "negative": 40}, str(tmp_path / "cdf.png"), points=5, dpi=20)
    positive, negative = figures[0].axes
    (line,) = positive.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(line.get_ydata(), [0.0, 0.0, 0.1, 0.4, 1.0])
    np.testing.assert_allclose(negative.get_lines()[0].get_ydata(), [0.0, 0.25, 0.5, 0.75, 1.0])
    assert (positive.get_title(), negative.get_title()) == (
        "positive anchors (4)",
        "negative anchors (40)",
    )


def test_share_of_hardest_counts_at_least_one_anchor():
    tool = load_tool("plot_loss_cdf")
    cdf = tool.normalized_cdf(np.array([3.0, 1.0, 0.0, 6.0]))  # [0, 0.1, 0.4, 1]
    assert tool.share_of_hardest(cdf, 0.01) == pytest.approx(0.6)  # the hardest one, not none
    assert tool.share_of_hardest(cdf, 0.5) == pytest.approx(0.9)
    assert tool.share_of_hardest(cdf, 1.0) == 1.0


def test_plot_loss_cdf_without_a_dataset_names_the_key(trained):
    config_file, weights, _ = trained
    with pytest.raises(ValueError, match="DATASETS.TEST is empty: pass --dataset NAME"):
        load_tool("plot_loss_cdf").main(
            ["--config-file", config_file, "MODEL.WEIGHTS", weights, "DATASETS.TEST", "()"]
        )


def test_plot_loss_cdf_rejects_a_softmax_model(trained):
    # the losses it takes are found by their scores, not listed: OHEM's are CE's sigmoid
    assert load_tool("plot_loss_cdf").sigmoid_losses() == ["cross_entropy", "ohem", "sigmoid_focal"]
    config_file, weights, _ = trained
    with pytest.raises(ValueError, match="MODEL.FOCAL.LOSS='softmax_focal'"):
        load_tool("plot_loss_cdf").main(
            [
                "--config-file",
                config_file,
                "MODEL.WEIGHTS",
                weights,
                "MODEL.FOCAL.LOSS",
                "softmax_focal",
            ]
        )


# --- demo ----------------------------------------------------------------------------


def _demo(tmp_path, trained, name, threshold, *source, montage=None):
    config_file, weights, _ = trained
    return load_tool("demo").main(
        [
            "--config-file",
            config_file,
            *source,
            "--output",
            str(tmp_path / name),
            "--montage",
            montage or str(tmp_path / f"{name}_montage.png"),
            "--columns",
            "2",
            "--scale",
            "2",
            "--confidence-threshold",
            str(threshold),
            "MODEL.WEIGHTS",
            weights,
        ]
    )


def test_demo_draws_dataset_images_and_montage(tmp_path, trained, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the montage named by a bare file name, in the current folder
    written = _demo(
        tmp_path,
        trained,
        "all",
        0.0,
        *("--dataset", "digits_val_tiny", "--num-images", "3"),
        montage="montage.png",
    )
    images, montage = written[:-1], written[-1]
    assert len(images) == 3 and montage == "montage.png"
    assert all(png_size(p) == (256, 256) for p in images)  # 128 px images, scale 2
    assert png_size(tmp_path / montage) == (2 * 256 + 4, 2 * 256 + 4)


@pytest.mark.parametrize("count, columns, grid", [(4, 2, (2, 2)), (3, 2, (2, 2)), (2, 4, (1, 2))])
def test_demo_montage_has_as_many_rows_as_needed(count, columns, grid):
    """Rows: ceil(count / columns), columns at most count; 4 px white gaps."""
    tiles = [np.full((10, 6, 3), i, np.uint8) for i in range(count)]
    image = load_tool("demo").montage(tiles, columns)
    rows, cols = grid
    assert image.shape == (rows * 10 + (rows - 1) * 4, cols * 6 + (cols - 1) * 4, 3)
    r, c = divmod(count - 1, cols)  # the last tile, in reading order
    assert (image[r * 14 : r * 14 + 10, c * 10 : c * 10 + 6] == count - 1).all()


def test_demo_defaults_are_the_documented_ones():
    """8 images of --dataset, score >= 0.5, drawn at twice their size, 4 montage columns."""
    args = (
        load_tool("demo")
        .get_parser()
        .parse_args(["--config-file", "c.yaml", "--dataset", "d", "--output", "o"])
    )
    assert (args.num_images, demo_threshold(args), args.scale, args.columns) == (8, 0.5, 2.0, 4)


def demo_threshold(args):
    return load_tool("demo").score_threshold(args)


def test_demo_threshold_from_the_flag_or_the_key_not_both():
    """SCORE_THRESH_TEST given as an override is kept (the flag's default replaced it)."""
    parse = load_tool("demo").get_parser().parse_args
    base = ["--config-file", "c.yaml", "--dataset", "d", "--output", "o"]
    assert demo_threshold(parse([*base, "--confidence-threshold", "0.0"])) == 0.0
    assert demo_threshold(parse([*base, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.1"])) is None
    both = parse(
        [*base, "--confidence-threshold", "0.2", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.1"]
    )
    with pytest.raises(ValueError, match="--confidence-threshold and MODEL.RETINANET.SCORE_THRESH"):
        demo_threshold(both)


def test_demo_replaces_no_file_without_overwrite_and_checks_the_montage_first(tmp_path):
    """A drawing's or the montage's path that exists (a file of yours) is refused before any
    model is built; --overwrite replaces them; a montage extension PIL cannot write is named."""
    demo = load_tool("demo")
    outs = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    demo.check_outputs(outs, str(tmp_path / "m.png"), overwrite=False)
    (tmp_path / "b.png").write_text("yours")
    with pytest.raises(FileExistsError) as error:
        demo.check_outputs(outs, str(tmp_path / "m.png"), overwrite=False)
    assert str(error.value) == (
        f"{outs[1]} exists and would be replaced: pass --overwrite to replace them, or choose "
        "another --output (or --montage)."
    )
    demo.check_outputs(outs, None, overwrite=True)
    with pytest.raises(ValueError, match=r"--montage .*notes.txt: no image format has that ext"):
        demo.check_outputs(outs, str(tmp_path / "notes.txt"), overwrite=True)
    config = REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml"
    argv = ["--config-file", str(config), "--input", str(REPO / "docs" / "demo_detections.png")]
    argv += ["--output", str(tmp_path / "drawn"), "--montage", str(tmp_path / "b.png")]
    with pytest.raises(FileExistsError, match="b.png exists"):  # before the weights are read
        demo.main([*argv, "MODEL.WEIGHTS", str(tmp_path / "never_read.pth")])
    assert (tmp_path / "b.png").read_text() == "yours" and not (tmp_path / "drawn").exists()


def test_demo_class_names_come_from_the_dataset_or_the_configs_test_set():
    """--input images are labelled with the config's first test set's class names (its
    training set's without one); --dataset with that data set's."""
    demo = load_tool("demo")
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("digits_train",), ("coco_2017_val",)
    assert demo.class_metadata(cfg, None).name == "coco_2017_val"
    assert demo.class_metadata(cfg, "digits_val").name == "digits_val"
    cfg.DATASETS.TEST = ()
    assert demo.class_metadata(cfg, None).name == "digits_train"


def test_demo_confidence_threshold_is_applied(tmp_path, trained):
    image = os.path.join(str(trained[2]), "input.png")
    reddish = np.full((128, 128, 3), 16, np.uint8)
    reddish[..., 0] = 60  # RGB: the output keeps the colours (no red and blue swapped)
    Image.fromarray(reddish).save(image)
    every = _demo(tmp_path, trained, "every", 0.0, "--input", image)[0]
    none = _demo(tmp_path, trained, "none", 1.0, "--input", image)[0]
    plain = np.kron(np.asarray(Image.open(image)), np.ones((2, 2, 1), np.uint8))
    assert not np.array_equal(np.asarray(Image.open(every)), plain)  # boxes drawn
    assert np.abs(np.asarray(Image.open(none)).astype(int) - plain).max() <= 1  # nothing drawn


def test_demo_inputs_with_one_name_are_all_written(tmp_path, trained):
    images = {}
    for i, name in enumerate(["dir1/a.png", "dir2/a.png", "dir2/a.jpg"]):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), np.uint8)).save(path)
        images[name] = str(path)
    written = _demo(tmp_path, trained, "out", 1.0, "--input", *images.values())[:-1]
    out = tmp_path / "out"
    assert written == [
        str(out / "dir1" / "a.png"),
        str(out / "dir2" / "a.png.png"),
        str(out / "dir2" / "a.jpg.png"),
    ]
    pixels = {tuple(np.asarray(Image.open(p))[0, 0]) for p in written}
    assert len(pixels) == 3  # three different images, none replaced another
    # inputs of one folder stay flat
    assert load_tool("demo").output_paths([images["dir1/a.png"]], "o") == [
        os.path.join("o", "a.png")
    ]


def test_demo_refuses_to_write_among_the_input_images(tmp_path):
    # --output an input's folder: 000004.png would replace the input itself, and 000005.jpg's
    # drawing (000005.png) a file of the user's
    demo = load_tool("demo")
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    for name in ["000004.png", "000005.jpg", "000005.png", "sub/a.png"]:
        (folder / name).write_bytes(b"mine")
    for inputs in (["000004.png"], ["000005.jpg"], ["sub/a.png", "000005.jpg"]):
        paths = [str(folder / name) for name in inputs]
        with pytest.raises(ValueError) as info:
            demo.output_paths(paths, str(folder))
        assert str(info.value).startswith(f"--output {folder} would write {folder}") and (
            "choose an --output folder that holds no input image." in str(info.value)
        ), inputs
    paths = [str(folder / "000004.png"), str(folder / "sub" / "a.png")]
    assert demo.output_paths(paths, str(tmp_path / "drawn")) == [
        str(tmp_path / "drawn" / "000004.png"),
        str(tmp_path / "drawn" / "sub" / "a.png"),
    ]
    assert {p.read_bytes() for p in folder.rglob("*.*")} == {b"mine"}
    # --montage an input image: refused before the model is loaded (MODEL.WEIGHTS need not exist)
    config = str(REPO / "configs" / "digits" / "sigmoid_focal_R18_FPN_1x.yaml")
    image = str(folder / "000004.png")
    argv = ["--config-file", config, "--input", image, "--output", str(tmp_path / "drawn")]
    with pytest.raises(ValueError, match=re.escape(f"--montage {image} is an input image")):
        demo.main([*argv, "--montage", image, "MODEL.WEIGHTS", str(tmp_path / "none.pth")])
    assert (folder / "000004.png").read_bytes() == b"mine"


def test_demo_top_class_per_box():
    from detectron2.structures import Boxes, Instances

    demo = load_tool("demo")
    instances = Instances((128, 128))
    instances.pred_boxes = Boxes(
        torch.tensor([[10.0, 10, 40, 40], [11, 10, 40, 41], [60, 60, 90, 90]])
    )
    instances.scores = torch.tensor([0.32, 0.9, 0.5])
    instances.pred_classes = torch.tensor([9, 5, 1])
    kept = demo.top_class_per_box(instances, 0.5)
    assert kept.pred_classes.tolist() == [5, 1] and kept.scores.tolist() == pytest.approx(
        [0.9, 0.5]
    )


def test_demo_draws_one_label_per_box_and_prints_counts(tmp_path, trained, capsys):
    from detectron2.data import DatasetCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.structures import pairwise_iou

    demo = load_tool("demo")
    config_file, weights, _ = trained
    written = _demo(
        tmp_path, trained, "labels", 0.0, "--dataset", "digits_val_tiny", "--num-images", "2"
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if " detection" in line]
    assert len(lines) == 2
    cfg = load_config(
        config_file, ["MODEL.WEIGHTS", weights, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0]
    )
    predictor = DefaultPredictor(cfg)
    for line, out, record in zip(lines, written, DatasetCatalog.get("digits_val_tiny")):
        raw = predictor(np.asarray(Image.open(record["file_name"]).convert("RGB"))[:, :, ::-1])[
            "instances"
        ]
        kept = demo.top_class_per_box(raw, cfg.MODEL.RETINANET.NMS_THRESH_TEST)
        assert 0 < len(kept) < len(raw)  # the untrained model scores many classes on one box
        iou = pairwise_iou(kept.pred_boxes, kept.pred_boxes).fill_diagonal_(0)
        assert iou.max() <= cfg.MODEL.RETINANET.NMS_THRESH_TEST
        assert line == f"{record['file_name']}: {len(kept)} detections (score >= 0.0) -> {out}"


def test_demo_montage_tiles_row_by_row_with_white_gaps():
    demo = load_tool("demo")
    images = [np.full((2, 3, 3), value, np.uint8) for value in (10, 20, 30)]
    expected = np.full((2 * 2 + 1, 2 * 3 + 1, 3), 255, np.uint8)
    expected[0:2, 0:3], expected[0:2, 4:7], expected[3:5, 0:3] = 10, 20, 30
    np.testing.assert_array_equal(demo.montage(images, columns=2, gap=1), expected)
    # fewer images than columns: no empty columns
    np.testing.assert_array_equal(demo.montage(images[:1], columns=4), images[0])
    with pytest.raises(ValueError, match="one size: image 2 is 4x3 px, the first 3x2"):
        demo.montage([images[0], np.zeros((3, 4, 3), np.uint8)], columns=2)


def test_demo_inputs_are_sorted_globs_and_a_pattern_matching_nothing_raises(tmp_path):
    demo = load_tool("demo")
    for name in ["b.png", "a.png", "c.jpg"]:
        (tmp_path / name).write_bytes(b"")
    paths = demo.input_images([str(tmp_path / "*.png"), str(tmp_path / "c.jpg")], None, 1)
    assert paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "c.jpg")]
    pattern = str(tmp_path / "*.gif")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--input {pattern!r} matches no file")):
        demo.input_images([pattern], None, 8)


def test_demo_inputs_expand_a_quoted_home(tmp_path, monkeypatch):
    """``--input '~/shots/*.png'`` (quoted, so the shell left the ~): the home folder's files."""
    demo = load_tool("demo")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "a.png").write_bytes(b"")
    assert demo.input_images(["~/shots/*.png"], None, 1) == [str(tmp_path / "shots" / "a.png")]


def test_save_figure_writes_a_bare_file_name_into_the_working_folder(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotting = load_tool("plotting")
    monkeypatch.chdir(tmp_path)
    figure = plt.figure(figsize=(2, 1))
    plotting.save_figure(figure, "figure.png", dpi=50)
    assert png_size(tmp_path / "figure.png") == (100, 50)
    assert not plt.fignum_exists(figure.number)  # closed: plotting in a loop leaks nothing
    parser = argparse.ArgumentParser()
    plotting.add_figure_arguments(parser, "docs/x.png", height=5.0)
    args = parser.parse_args([])
    assert (args.output, args.width, args.height, args.dpi) == ("docs/x.png", 12.0, 5.0, 100)


# --- ablate --------------------------------------------------------------------------


def test_ablate_presets_share_budget_and_seed():
    ablate = load_tool("ablate")
    preset = ablate.PRESETS["digits-small"]
    runs = ablate.plan(preset, ablate.select_rows(None, preset), "/out")
    assert len(runs) == 11
    # the digits configs' schedule, scaled to 300 iterations
    base_iters, base_steps, base_warmup = ablate.digits_schedule()
    steps = tuple(round(s * 300 / base_iters) for s in base_steps)
    budget = [
        "SOLVER.MAX_ITER",
        "300",
        "SOLVER.STEPS",
        repr(steps),
        "SOLVER.WARMUP_ITERS",
        str(round(base_warmup * 300 / base_iters)),
    ]
    for run in runs:
        argv = run.argv()
        start = argv.index("SOLVER.MAX_ITER")
        assert argv[start : start + 6] == budget and argv[argv.index("SEED") + 1] == "0"
    soft = next(r for r in runs if r.row.name == "soft_gamma_0to2").argv()
    assert soft[soft.index("MODEL.FOCAL.GAMMA_SCHEDULE.ITERS") + 1] == "150"
    full = ablate.PRESETS["digits-full"]
    assert len(ablate.plan(full, ablate.select_rows(None, full), "/out")) == 22


def test_ablate_rows_filter():
    ablate = load_tool("ablate")
    preset = ablate.PRESETS["digits-small"]
    names = [r.name for r in ablate.select_rows("ce_*,fl_g2_a0.25", preset)]
    assert names == ["ce_a0.25", "ce_a0.50", "ce_a0.75", "fl_g2_a0.25"]
    spaced = [r.name for r in ablate.select_rows(" ce_*, fl_g2_a0.25 ", preset)]
    assert spaced == names  # as typed after a comma
    with pytest.raises(ValueError, match="matches no row"):
        ablate.select_rows("nope", preset)


def test_ablate_records_the_commit_a_copy_of_the_tree_is_told(monkeypatch):
    # On a GPU machine the tree arrives without its repository: run.json and result.json
    # record FOCAL_DET2_COMMIT there, as the benchmarks do; here, git's own description.
    ablate = load_tool("ablate")
    monkeypatch.delenv("FOCAL_DET2_COMMIT", raising=False)
    described = ablate._git_commit()
    assert described and described != "unknown"
    monkeypatch.setenv("FOCAL_DET2_COMMIT", "abc1234 (sent to the GPU)")
    assert ablate._git_commit() == "abc1234 (sent to the GPU)"


def test_ablate_notes_say_why_a_metric_has_no_value(tmp_path):
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=10)
    runs = ablate.plan(preset, ablate.select_rows("ce_a0.25,ce_a0.50", preset), "/out")
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.DATASETS.TEST = ("digits_val",)
    metrics = dict(AP=20.0, AP50=30.0, AP75=None, APs=None, APm=25.0)
    timing = {"train_seconds": 1.0, "eval_seconds": 1.0, "iterations": 10}
    results = {
        ("ce_a0.25", 0): {
            "metrics": metrics,
            "notes": ablate._why_missing(metrics, 7, cfg),
            **timing,
        },
        ("ce_a0.50", 0): {
            "metrics": dict(metrics, AP75=1.0, APs=1.0),
            **timing,
        },  # or written before notes existed
    }
    ablate.write_tables(str(tmp_path), "x", preset, runs, results)
    markdown = (tmp_path / "results.md").read_text()
    assert (
        "- CE, α=.25, seed 0: AP75 –: digits_val has no ground-truth boxes; "
        "APs –: digits_val has no small (area < 32² px) ground-truth boxes" in markdown
    )
    assert "CE, α=.50, seed 0:" not in markdown
    assert ablate._why_missing(dict(metrics, APm=None), 7, cfg)["APm"] == (
        "digits_val has no medium (area 32²-96² px) ground-truth boxes"
    )


def test_ablate_summary_mean_and_spread_over_seeds():
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=10, seeds=(0, 1))
    runs = ablate.plan(preset, ablate.select_rows("ce_a0.25", preset), "/out")
    results = {
        ("ce_a0.25", s): {
            "metrics": dict(AP=ap, AP50=ap, AP75=ap, APs=None, APm=ap),
            "train_seconds": 10.0,
        }
        for s, ap in ((0, 20.0), (1, 22.0))
    }
    (line,) = ablate.summarize(runs, results)
    assert line["AP"] == 21.0 and line["AP_std"] == pytest.approx(np.sqrt(2.0))
    assert line["APs"] is None and line["seeds"] == 2 and line["paper_AP"] == 10.8


def test_ablate_extra_opts_come_in_pairs_and_jobs_is_positive(tmp_path):
    ablate = load_tool("ablate")
    with pytest.raises(ValueError, match="must come in pairs"):
        ablate.main(["--preset", "tiny", "--output-dir", str(tmp_path), "MODEL.DEVICE"])
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        ablate.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--jobs", "0"])
    with pytest.raises(ValueError, match="--checkpoint-period must be >= 1, got 0"):
        ablate.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--checkpoint-period", "0"])


def _run_with_result(ablate, tmp_path, result_of):
    """digits-small's CE alpha .25 run in tmp_path, with the result.json ``result_of(argv)`` gives."""
    preset = ablate.PRESETS["digits-small"]
    (run,) = ablate.plan(preset, ablate.select_rows("ce_a0.25", preset), str(tmp_path))
    os.makedirs(run.out_dir)
    result = result_of(run.argv())
    with open(os.path.join(run.out_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return run, result


def test_ablate_resumes_only_an_attempt_with_its_checkpoint_and_the_same_settings(tmp_path):
    """run.json with the run's settings (OUTPUT_DIR aside) and the checkpoint last_checkpoint names."""
    ablate = load_tool("ablate")
    run, _ = _run_with_result(ablate, tmp_path, lambda argv: {})
    marker, tag = (
        os.path.join(run.out_dir, "run.json"),
        os.path.join(run.out_dir, "last_checkpoint"),
    )
    checkpoint = os.path.join(run.out_dir, "model_0000049.pth")

    def attempt(argv, tagged=True, saved=True):
        for path in (marker, tag, checkpoint):
            if os.path.exists(path):
                os.remove(path)
        with open(marker, "w") as f:
            json.dump({"argv": argv, "commit": "abc", "checkpoint_period": 50}, f)
        if tagged:
            with open(tag, "w") as f:
                f.write("model_0000049.pth")
        if saved:
            open(checkpoint, "w").close()
        return ablate.interrupted_attempt(run)

    argv = run.argv()
    assert attempt(argv) == {"argv": argv, "commit": "abc", "checkpoint_period": 50}
    assert attempt(argv[:-1] + ["/where/it/was/trained"])  # the folder was moved
    assert attempt(argv, tagged=False, saved=False) is None  # killed before its first checkpoint
    assert attempt(argv, saved=False) is None  # its checkpoint deleted since
    other = list(argv)
    other[other.index("SOLVER.MAX_ITER") + 1] = "9"
    assert attempt(other) is None
    os.remove(marker)  # an attempt of an ablate.py without run.json
    assert ablate.interrupted_attempt(run) is None


def test_ablate_attempt_resumes_or_starts_in_a_cleared_folder(tmp_path):
    """
    An attempt killed before its first checkpoint left files: the next attempt starts in an
    emptied folder (train_net.py refuses an OUTPUT_DIR with metrics.json). An interrupted
    attempt resumes in its folder, with its checkpoint period unless one is given.
    """
    ablate = load_tool("ablate")
    run, _ = _run_with_result(ablate, tmp_path, lambda argv: {})
    folder = Path(run.out_dir)
    (folder / "metrics.json").write_text('{"iteration": 0}\n')
    attempt, resume = ablate.start_attempt(run)
    assert not resume and attempt["argv"] == run.argv() and attempt["checkpoint_period"] is None
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"]
    assert json.loads((folder / "run.json").read_text()) == attempt

    (folder / "run.json").write_text(json.dumps({**attempt, "checkpoint_period": 50}))
    (folder / "last_checkpoint").write_text("model_0000049.pth")
    (folder / "model_0000049.pth").touch()
    attempt, resume = ablate.start_attempt(run)
    assert resume and attempt["checkpoint_period"] == 50
    assert (folder / "model_0000049.pth").exists()
    attempt, resume = ablate.start_attempt(run, checkpoint_period=20)
    assert resume and json.loads((folder / "run.json").read_text())["checkpoint_period"] == 20


def test_ablate_run_environment_leaves_a_users_thread_count(monkeypatch):
    ablate = load_tool("ablate")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = ablate.run_environment(3)
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"] == os.pathsep.join([str(REPO), "/elsewhere"])
    assert "OMP_NUM_THREADS" not in ablate.run_environment()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ablate.run_environment(3)["OMP_NUM_THREADS"] == "1"


def test_training_clock_adds_the_seconds_of_the_checkpoint_and_leaves_out_evaluation():
    ablate = load_tool("ablate")
    evaluated = [0.0]
    clock = ablate.TrainingClock(lambda: evaluated[0])
    clock.load_state_dict({"seconds": 100.0})  # the earlier attempts, up to the checkpoint
    clock.start()
    assert 100.0 <= clock.seconds() < 101.0
    evaluated[0] = 30.0
    assert 70.0 <= clock.state_dict()["seconds"] < 71.0


# Loaded by the run's process through PYTHONPATH: it dies right after saving the checkpoint of
# iteration 1, as a killed job would (no after_train, no result).
KILL_AFTER_SECOND_CHECKPOINT = """
import os
from fvcore.common.checkpoint import PeriodicCheckpointer

_step = PeriodicCheckpointer.step


def _step_then_die(self, iteration, **kwargs):
    _step(self, iteration, **kwargs)
    if iteration == 1:
        os._exit(137)


PeriodicCheckpointer.step = _step_then_die
"""


def test_ablate_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    """
    A tiny run of 3 iterations with --checkpoint-period 1, its process killed after the
    checkpoint of iteration 1 (that of iteration 0 deleted by then): rerun without the
    option, it resumes at iteration 2 (keeping the attempt's period) and ends with an
    uninterrupted run's weights, metrics.json and result, its training seconds counting the
    first attempt's; then killed during its final evaluation (no result.json), it resumes
    from model_final.pth and trains nothing.
    """
    ablate = load_tool("ablate")
    args, iters = ["--preset", "tiny", "--rows", "ce_a0.75"], ["SOLVER.MAX_ITER", "3"]
    ablate.main(args + ["--output-dir", str(tmp_path / "whole")] + iters)
    whole = tmp_path / "whole" / "ce_a0.75" / "seed0"
    expected = json.loads((whole / "result.json").read_text())
    assert expected["resumed_from_iteration"] == 0 and "started_at_commit" not in expected

    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(KILL_AFTER_SECOND_CHECKPOINT)
    path = os.pathsep.join(filter(None, [str(killer), os.environ.get("PYTHONPATH")]))
    out = ["--output-dir", str(tmp_path / "parts")]
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", path)
        with pytest.raises(RuntimeError, match=r"failed \(exit 137\)"):
            ablate.main(args + out + ["--checkpoint-period", "1"] + iters)
    parts = tmp_path / "parts" / "ce_a0.75" / "seed0"
    assert (parts / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(p.name for p in parts.glob("*.pth")) == ["model_0000001.pth"]
    assert not (parts / "result.json").exists()
    first = torch.load(parts / "model_0000001.pth", weights_only=False)[ablate.CLOCK_KEY]["seconds"]

    ablate.main(args + out + iters)
    result = json.loads((parts / "result.json").read_text())
    assert result["resumed_from_iteration"] == 2 and result["started_at_commit"]
    assert result["train_seconds"] >= first > 0
    assert result["argv"][:-1] == expected["argv"][:-1]  # OUTPUT_DIR aside
    for key in ("metrics", "per_class_AP", "detections", "notes", "iterations"):
        assert result[key] == expected[key], key
    got = torch.load(parts / "model_final.pth", weights_only=False)["model"]
    want = torch.load(whole / "model_final.pth", weights_only=False)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert metrics_records(parts) == metrics_records(whole)
    assert "CHECKPOINT_PERIOD: 1\n" in (parts / "config.yaml").read_text()  # the attempt's period
    assert sorted(p.name for p in parts.glob("*.pth")) == ["model_final.pth"]
    log = (parts / "stdout.log").read_text()  # both attempts'
    assert "[ablate.py] resuming the interrupted attempt" in log
    assert "Starting training from iteration 0" in log and "from iteration 2" in log

    (parts / "result.json").unlink()
    ablate.main(args + out + iters)
    again = json.loads((parts / "result.json").read_text())
    assert again["resumed_from_iteration"] == 3
    assert again["metrics"] == result["metrics"] and again["detections"] == result["detections"]


def test_ablate_runs_keep_only_their_latest_periodic_checkpoint(tmp_path):
    """A run's PeriodicCheckpointer deletes a checkpoint when it saves the next (model_final stays)."""
    ablate = load_tool("ablate")
    cfg = digits_cfg(output_dir=tmp_path, opts=["SOLVER.CHECKPOINT_PERIOD", 1])
    trainer = FocalTrainer(cfg)
    (checkpointer,) = [
        h
        for h in ablate.keep_latest_checkpoint(trainer.build_hooks())
        if isinstance(h, PeriodicCheckpointer)
    ]
    checkpointer.max_iter = cfg.SOLVER.MAX_ITER  # 3, as before_train sets it
    saved = []
    for iteration in range(3):
        checkpointer.step(iteration)
        saved.append(sorted(p.name for p in tmp_path.glob("*.pth")))
    assert saved == [
        ["model_0000000.pth"],
        ["model_0000001.pth"],
        ["model_0000002.pth", "model_final.pth"],
    ]


def test_ablate_refuses_results_trained_with_other_settings(tmp_path):
    ablate = load_tool("ablate")

    def other_max_iter(argv):
        argv[argv.index("SOLVER.MAX_ITER") + 1] = "9"
        return {"argv": argv}

    run, _ = _run_with_result(ablate, tmp_path, other_max_iter)
    with pytest.raises(RuntimeError, match="trained with other settings") as error:
        ablate.read_result(run)
    assert str(error.value).endswith("delete that run's directory to retrain it.")
    # --tables trains nothing: no advice to delete finished results
    with pytest.raises(RuntimeError, match="trained with other settings") as error:
        ablate.read_result(run, tabulating=True)
    assert str(error.value).endswith(
        "--tables reads the runs as they were trained: pass the key value pairs (and "
        "--canvases, --seeds) of the call that trained them."
    )


def test_ablate_results_of_another_device_are_the_same_run(tmp_path):
    """Where a run trained (MODEL.DEVICE) is not what it trained: its result is read."""
    ablate = load_tool("ablate")

    def on_cuda(argv):
        return {"argv": argv[:-2] + ["MODEL.DEVICE", "cuda"] + argv[-2:]}

    run, result = _run_with_result(ablate, tmp_path, on_cuda)
    assert ablate.read_result(run) == result


def test_ablate_refuses_a_run_train_net_would_refuse_before_writing(tmp_path):
    ablate = load_tool("ablate")
    out = tmp_path / "ablation"
    for extra, expected in (
        (["SOLVER.MAX_ITR", "3"], "did you mean SOLVER.MAX_ITER?"),
        (["MODEL.FOCAL.PRIOR_PROB", "2.0"], "MODEL.FOCAL.PRIOR_PROB=2.0 must be in (0, 1)"),
    ):
        with pytest.raises((KeyError, ValueError), match=re.escape(expected)) as error:
            ablate.main(["--preset", "tiny", "--output-dir", str(out), *extra])
        assert error.value.__notes__ == ["In ablate.py's run ce_a0.75 seed 0."]
        assert not out.exists()


def test_ablate_tables_measure_no_imbalance(tmp_path, monkeypatch, capsys):
    """--tables trains and measures nothing: a canvas without a stored imbalance shows "–"."""
    ablate = load_tool("ablate")

    def measure(*args, **kwargs):
        raise AssertionError("--tables measured the imbalance")

    monkeypatch.setattr(ablate, "measure_canvases", measure)
    argv = ["--preset", "imbalance", "--canvases", "128", "--rows", "ce_a0.75", "--seeds", "0"]
    ablate.main(argv + ["--tables", "--output-dir", str(tmp_path)])
    assert "imbalance not measured at canvases 128 (--tables)" in capsys.readouterr().out
    assert not (tmp_path / "imbalance.json").exists()


def test_ablate_prints_the_checkpoint_period_its_runs_take(tmp_path, capsys):
    ablate = load_tool("ablate")
    ablate.main(["--preset", "tiny", "--list", "--checkpoint-period", "20"])
    commands = [line for line in capsys.readouterr().out.splitlines() if "train_net.py" in line]
    assert commands and all(c.endswith(" SOLVER.CHECKPOINT_PERIOD 20") for c in commands)


def test_ablate_list_says_what_its_cost_is_for(capsys):
    """--list shows the preset's measured cost, which is for its own runs; a plan of other rows
    or iterations is told its share of them (not a scaled estimate)."""
    ablate = load_tool("ablate")
    ablate.main(["--preset", "tiny", "--list"])
    assert capsys.readouterr().out.splitlines()[0] == (
        f"preset tiny: 2 runs of 2 iterations; {ablate.PRESETS['tiny'].cost}"
    )
    ablate.main(["--preset", "tiny", "--list", "--rows", "ce_a0.75", "SOLVER.MAX_ITER", "3"])
    assert capsys.readouterr().out.splitlines()[1] == (
        "  (that cost is for the preset's own 2 runs of 2 iterations; this plan trains 0.75x "
        "their iterations)"
    )


def test_ablate_tiny_preset_trains_tabulates_and_resumes(tmp_path, monkeypatch, capsys):
    ablate = load_tool("ablate")
    out = tmp_path / "ablation"
    # two runs at once; the trailing pair reaches every run
    # the threshold leaves the models no detection: the tables must say so
    extra = ["TEST.DETECTIONS_PER_IMAGE", "50", "MODEL.RETINANET.SCORE_THRESH_TEST", "1.0"]
    ablate.main(["--preset", "tiny", "--output-dir", str(out), "--jobs", "2", *extra])

    runs = {name: out / name / "seed0" for name in ("ce_a0.75", "soft_gamma_0to2")}
    for run_dir in runs.values():
        result = json.loads((run_dir / "result.json").read_text())
        assert set(result["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm"}
        assert result["train_seconds"] > 0 and result["iterations"] == 2
    # the overrides reached the runs' configs, as train_net.py would have read them
    configs = {}
    for name, run_dir in runs.items():
        configs[name] = get_cfg()
        add_focal_config(configs[name])
        configs[name].merge_from_file(str(run_dir / "config.yaml"))
    assert configs["ce_a0.75"].MODEL.FOCAL.LOSS == "cross_entropy"
    assert configs["ce_a0.75"].MODEL.FOCAL.ALPHA == 0.75
    assert configs["soft_gamma_0to2"].MODEL.FOCAL.GAMMA_SCHEDULE.ITERS == 1
    assert all(
        c.SOLVER.MAX_ITER == 2 and c.DATASETS.TEST == ("digits_val_tiny",) for c in configs.values()
    )
    assert all(c.TEST.DETECTIONS_PER_IMAGE == 50 for c in configs.values())

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [line["row"] for line in table] == ["ce_a0.75", "soft_gamma_0to2"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "train_s"} <= set(table[0])
    markdown = (out / "results.md").read_text()
    assert "| CE, α=.75 |" in markdown and "| AP | AP50 | AP75 | APs | APm | train s |" in markdown
    assert len((out / "runs.csv").read_text().splitlines()) == 3
    why = "no detections on digits_val_tiny: every score was below MODEL.RETINANET.SCORE_THRESH_TEST=1.0"
    assert f"- CE, α=.75, seed 0: AP, AP50, AP75, APs, APm –: {why}" in markdown
    assert all(
        json.loads((d / "result.json").read_text())["detections"] == 0 for d in runs.values()
    )

    # a second call trains nothing: finished runs are read back
    stamps = {name: (d / "result.json").stat().st_mtime_ns for name, d in runs.items()}

    def no_training(run, verbose=False, threads=None, checkpoint_period=None):
        raise AssertionError(f"retrained {run.row.name}")

    monkeypatch.setattr(ablate, "train_run", no_training)
    capsys.readouterr()
    ablate.main(["--preset", "tiny", "--output-dir", str(out), *extra])
    assert capsys.readouterr().out.count(f": done, AP – (AP, AP50, AP75, APs, APm –: {why})") == 2
    assert stamps == {name: (d / "result.json").stat().st_mtime_ns for name, d in runs.items()}


def _fake_result(ap, seed=0, detections=None, *, ap50=None, train_seconds=None):
    """
    A result.json of ablate.py: every metric ``ap`` (AP50 ``ap50`` where given), 10 + ``seed``
    s of training unless ``train_seconds`` is given, 1 s of evaluation.
    """
    metrics = dict(AP=ap, AP50=ap if ap50 is None else ap50, AP75=ap, APs=ap, APm=ap)
    result = {
        "metrics": metrics,
        "train_seconds": 10.0 + seed if train_seconds is None else train_seconds,
        "eval_seconds": 1.0,
        "iterations": 600,
    }
    return result if detections is None else {**result, "detections": detections}


def test_ablate_tables_of_three_seeds_mean_sample_std_and_train_seconds(tmp_path):
    """
    Three seeds with AP 10, 20, 60 (mean 30, median 20, sample std sqrt(700) = 26.5,
    population std 21.6) and 30, 60, 90 s of training (1 s of evaluation each); a row
    without a finished run has no line.
    """
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=10, seeds=(0, 1, 2))
    runs = ablate.plan(preset, ablate.select_rows("ce_a0.25,ce_a0.50", preset), "/out")
    results = {
        ("ce_a0.25", seed): _fake_result(ap, ap50=ap + 1.0, train_seconds=train_s)
        for seed, ap, train_s in ((0, 10.0, 30.0), (1, 20.0, 60.0), (2, 60.0, 90.0))
    }
    (line,) = ablate.summarize(runs, results)
    assert line["row"] == "ce_a0.25" and line["seeds"] == 3
    assert line["AP"] == pytest.approx(30.0) and line["AP_std"] == pytest.approx(np.sqrt(700.0))
    assert line["AP50"] == pytest.approx(31.0)
    assert line["train_s"] == pytest.approx(60.0) and line["train_s_std"] == pytest.approx(30.0)

    ablate.write_tables(str(tmp_path), "x", preset, runs, results)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith(
        "Preset `x`: 10 iterations per run, seeds 0, 1, 2 (mean ± sample std over seeds); "
    )
    header, rule, row = lines[2:5]
    assert header == (
        "| setting | AP | AP50 | AP75 | APs | APm | train s | paper AP / AP50 / AP75 |"
    )
    assert rule == "|" + " --- |" * 8  # one per column of the header
    assert row == (
        "| CE, α=.25 | 30.0 ± 26.5 | 31.0 ± 26.5 | 30.0 ± 26.5 | 30.0 ± 26.5 | 30.0 ± 26.5 "
        "| 60 | 10.8 / 16.0 / 11.7 |"
    )
    with open(tmp_path / "runs.csv") as f:
        runs_csv = list(csv.DictReader(f))
    # the iterations each run trained (its result's 600), not the preset's 10
    assert [(r["seed"], r["AP"], r["train_s"], r["eval_s"], r["iterations"]) for r in runs_csv] == [
        ("0", "10.0", "30.0", "1.0", "600"),
        ("1", "20.0", "60.0", "1.0", "600"),
        ("2", "60.0", "90.0", "1.0", "600"),
    ]
    assert lines[0].endswith("trained at commit `unknown`.")  # three runs, one commit, named once
    # one seed: the mean alone, and the first line says no spread
    one = ablate.Preset(iters=10)
    (run,) = ablate.plan(one, ablate.select_rows("ce_a0.25", one), "/out")
    ablate.write_tables(str(tmp_path), "x", one, [run], {("ce_a0.25", 0): results[("ce_a0.25", 0)]})
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("Preset `x`: 10 iterations per run, seeds 0; COCO-style AP")
    assert lines[4] == "| CE, α=.25 | 10.0 | 11.0 | 10.0 | 10.0 | 10.0 | 30 | 10.8 / 16.0 / 11.7 |"


def test_ablate_budget_of_a_two_iteration_preset():
    """
    Base-Digits.yaml's 1,000 iterations, steps 800 and 950 and warm-up 100, at 2 iterations:
    both steps round to 2, not below MAX_ITER, so none; the warm-up rounds to 0, kept at 1;
    checkpoints only after MAX_ITER. A half-budget key of a 1-iteration preset is 1, not 0.
    """
    ablate = load_tool("ablate")
    assert ablate.digits_schedule() == (1000, (800, 950), 100)
    assert ablate.Preset(iters=2).budget_opts() == [
        "SOLVER.MAX_ITER",
        2,
        "SOLVER.STEPS",
        (),
        "SOLVER.WARMUP_ITERS",
        1,
        "SOLVER.CHECKPOINT_PERIOD",
        3,
    ]
    # 15 iterations: the warm-up 100 x 15 / 1000 = 1.5 rounds to 2 (not floored to 1)
    fifteen = ablate.Preset(iters=15).budget_opts()
    assert fifteen[fifteen.index("SOLVER.WARMUP_ITERS") + 1] == 2
    one = ablate.Preset(iters=1)
    (run,) = ablate.plan(one, ablate.select_rows("soft_gamma_0to2", one), "/out")
    argv = run.argv()
    assert argv[argv.index("MODEL.FOCAL.GAMMA_SCHEDULE.ITERS") + 1] == "1"


def test_ablate_max_iter_among_the_pairs_sets_the_presets_budget():
    """SOLVER.MAX_ITER N after the options is the budget: steps, warm-up and ramps follow it."""
    ablate = load_tool("ablate")
    opts = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "8"]
    assert ablate.budget_override(opts) == (["MODEL.DEVICE", "cpu"], 8)
    assert ablate.budget_override(["MODEL.DEVICE", "cpu"]) == (["MODEL.DEVICE", "cpu"], None)
    for bad in ("0", "2.5", "x"):
        with pytest.raises(ValueError, match=f"SOLVER.MAX_ITER {bad}: an integer >= 1 is needed"):
            ablate.budget_override(["SOLVER.MAX_ITER", bad])
    preset = ablate.replace(ablate.Preset(iters=2), iters=8)
    (run,) = ablate.plan(preset, ablate.select_rows("soft_gamma_0to2", preset), "/out")
    argv = run.argv()
    assert argv.count("SOLVER.MAX_ITER") == 1 and argv[argv.index("SOLVER.MAX_ITER") + 1] == "8"
    assert argv[argv.index("MODEL.FOCAL.GAMMA_SCHEDULE.ITERS") + 1] == "4"


@pytest.mark.parametrize(
    "key, message",
    [
        ("SEED", "SEED among the key value pairs: ablate.py sets each run's SEED after them (it "
         "would be ignored); use --seeds."),
        ("OUTPUT_DIR", "OUTPUT_DIR among the key value pairs: ablate.py sets each run's OUTPUT_DIR "
         "after them (it would be ignored); use --output-dir."),
        ("MODEL.FOCAL.GAMMA_SCHEDULE.ITERS", "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS among the key value "
         "pairs: row soft_gamma_0to2 sets it to half the run's iterations after them (it would be "
         "ignored); leave it out, or --rows without soft_gamma_0to2."),
    ],
)  # fmt: skip
def test_ablate_refuses_overrides_it_would_replace(key, message):
    """Keys ablate.py sets after the user's key value pairs would be dropped without a word."""
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=4)
    rows = ablate.select_rows("ce_a0.25,soft_gamma_0to2", preset)
    with pytest.raises(ValueError) as error:
        ablate.plan(preset, rows, "/out", [key, "7"])
    assert str(error.value) == message
    # the ramp's key for rows without a ramp of their own is the user's
    (run,) = ablate.plan(preset, rows[:1], "/out", ["MODEL.FOCAL.GAMMA_SCHEDULE.ITERS", 3])
    assert run.opts[-4:-2] == ["MODEL.FOCAL.GAMMA_SCHEDULE.ITERS", 3]


def test_ablate_rows_canvases_and_seeds_of_hand_made_presets():
    ablate = load_tool("ablate")
    # a preset without rows runs every row
    assert ablate.select_rows(None, ablate.Preset(iters=2)) == list(ablate.ROWS)
    # canvases smallest first, whatever order the preset gives them in
    row = ablate.ROWS[0]
    expanded = ablate.Preset(iters=2, canvases=(256, 128)).expand([row])
    assert [(r.name, r.canvas, r.label) for r in expanded] == [
        ("s128/ce_a0.25", 128, f"{row.label}, 128 px"),
        ("s256/ce_a0.25", 256, f"{row.label}, 256 px"),
    ]
    # empty items are skipped, and nothing at all is an error
    preset = ablate.PRESETS["longtail"]
    assert ablate.select_seeds("1,,0,", preset) == (0, 1)
    assert ablate.select_seeds("0,1,1", preset) == (0, 1)  # a seed given twice runs once
    with pytest.raises(
        ValueError, match=r"--seeds must be comma-separated seeds from \(0, 1\), got ','"
    ):
        ablate.select_seeds(",", preset)


def test_ablate_reads_back_a_run_whose_folder_was_moved(tmp_path):
    """Only OUTPUT_DIR may differ from the preset's command line: the result is read back."""
    ablate = load_tool("ablate")

    def moved(argv):
        return {"argv": argv[:-1] + ["/where/it/was/trained"], "metrics": {}}

    run, result = _run_with_result(ablate, tmp_path, moved)
    assert run.argv()[-2:] == ["OUTPUT_DIR", run.out_dir]
    assert ablate.read_result(run) == result


def test_ablate_threads_per_job_and_checkpoint_period(tmp_path, monkeypatch):
    """
    --jobs 1 leaves the run's threads to torch; --jobs 2 gives each run half the cores and
    trains the tiny preset's two runs at once (each waits for the other).
    --checkpoint-period reaches every run.
    """
    import threading

    ablate = load_tool("ablate")
    assert len(ablate.PRESETS["tiny"].rows) == 2
    calls, both_running = [], threading.Barrier(2, timeout=10)

    def fake_train(run, verbose=False, threads=None, checkpoint_period=None):
        calls.append((run.row.name, threads, checkpoint_period))
        if threads is not None:
            both_running.wait()  # --jobs 2 trains the two runs at once
        return _fake_result(1.0)

    monkeypatch.setattr(ablate, "train_run", fake_train)
    given = {}
    for jobs, period in (("1", []), ("2", ["--checkpoint-period", "50"])):
        out = ["--output-dir", str(tmp_path / jobs)]
        ablate.main(["--preset", "tiny", *out, "--jobs", jobs, *period])
        given[jobs], calls[:] = set(calls), []
    half = max(1, (os.cpu_count() or 1) // 2)
    assert given == {
        "1": {("ce_a0.75", None, None), ("soft_gamma_0to2", None, None)},
        "2": {("ce_a0.75", half, 50), ("soft_gamma_0to2", half, 50)},
    }


def test_ablate_failed_run_starts_no_further_run(tmp_path, monkeypatch, capsys):
    """--jobs 1: the first run fails, the second is never started, the failure is raised."""
    ablate = load_tool("ablate")
    started = []

    def fake_train(run, verbose=False, threads=None, checkpoint_period=None):
        started.append(run.row.name)
        raise RuntimeError(f"run {run.row.name} failed")

    monkeypatch.setattr(ablate, "train_run", fake_train)
    with pytest.raises(RuntimeError, match="run ce_a0.75 failed"):
        ablate.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--jobs", "1"])
    assert started == ["ce_a0.75"]
    assert "soft_gamma_0to2 seed 0: training" not in capsys.readouterr().out


def test_ablate_run_training_when_another_fails_finishes_and_is_tabulated(monkeypatch):
    """--jobs 2: one run fails while the other trains; that one's result still reaches the
    tables, the run queued behind them never starts, and the failure is raised."""
    import threading

    ablate = load_tool("ablate")
    failure_seen, started, finished = threading.Event(), [], []
    real_wait = ablate.wait

    def wait(futures, **kwargs):  # the training run ends only after the failure was seen
        done, not_done = real_wait(futures, **kwargs)
        if any(future.exception() is not None for future in done):
            failure_seen.set()
        return done, not_done

    def train(i, name):
        started.append(name)
        if name == "fails":
            raise RuntimeError("fails failed")
        assert failure_seen.wait(timeout=10)
        return {"name": name}

    monkeypatch.setattr(ablate, "wait", wait)
    pending = [(1, "fails"), (2, "trains"), (3, "queued")]
    with pytest.raises(RuntimeError, match="fails failed"):
        ablate.train_pending(pending, 2, train, lambda run, result: finished.append((run, result)))
    assert sorted(started) == ["fails", "trains"]
    assert finished == [("trains", {"name": "trains"})]


def test_ablate_notes_of_class_groups_without_a_value():
    """
    A run of an older ablate.py (no per-class AP), and a run without detections (COCO's
    per-class APs absent, every metric None): each group says why, with the metrics.
    """
    ablate = load_tool("ablate")
    groups = ablate.LONGTAIL_GROUPS
    older = _fake_result(5.0)
    assert ablate._notes(older, groups) == (
        "AP_rare, AP_frequent –: the run's result.json has no per-class AP "
        "(trained before ablate.py stored it)"
    )
    why = "no detections on digits_val_lt: every score was below MODEL.RETINANET.SCORE_THRESH_TEST=0.05"
    nothing = {
        "metrics": dict.fromkeys(ablate.METRICS),
        "per_class_AP": {},
        "detections": 0,
        "notes": dict.fromkeys(ablate.METRICS, why),
    }
    assert (
        ablate._notes(nothing, groups) == f"AP, AP50, AP75, APs, APm, AP_rare, AP_frequent –: {why}"
    )


def test_ablate_canvas_table_averages_the_ap_column():
    """The table by canvas shows AP (not AP50, set 1 higher)."""
    ablate = load_tool("ablate")
    preset = ablate.replace(ablate.PRESETS["imbalance"], canvases=(128,))
    runs = ablate.plan(preset, ablate.select_rows("ce_a0.75", preset), "/out")
    results = {
        ("s128/ce_a0.75", s): _fake_result(ap, s, ap50=ap + 1.0) for s, ap in ((0, 40.0), (1, 44.0))
    }
    imbalance = {128: {"negatives_per_positive": 99.6, "ignored_per_image": 3.3}}
    assert ablate.canvas_table(runs, results, imbalance) == [
        "| | 128 px |",
        "| --- | ---: |",
        "| negatives per positive anchor | 100 |",
        "| ignored anchors per image | 3.3 |",
        "| AP, CE, α=.75 | 42.0 ± 2.8 |",
    ]
    imbalance[128]["negatives_per_positive"] = None  # images without a positive anchor
    assert ablate.canvas_table(runs, results, imbalance)[2] == (
        "| negatives per positive anchor | no positives |"
    )
    assert ablate.canvas_table(runs, results, {})[2:4] == [
        "| negatives per positive anchor | – |",
        "| ignored anchors per image | – |",
    ]


def test_ablate_shell_join_double_quotes_only_plain_literals():
    """('a',) is quoted as people type it; an argument with a quote and a $ keeps shlex's quoting."""
    ablate = load_tool("ablate")
    assert (
        ablate._shell_join(["--x", "('a',)", "it's $HOME", "a b"])
        == "--x \"('a',)\" 'it'\"'\"'s $HOME' 'a b'"
    )


# --- imbalance -----------------------------------------------------------------------


def _anchors_per_image(side, strides=(8, 16, 32, 64, 128), per_cell=9):
    """RetinaNet's anchors on a side x side canvas: 9 per cell of P3-P7 (side divisible by 128)."""
    return per_cell * sum((side // s) ** 2 for s in strides)


@pytest.fixture
def tiny_canvas(tmp_path, monkeypatch):
    """A 3-image digits split at 256 px, registered for one test under a tmp cache."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from focal_det2.data import digits as digits_module
    from focal_det2.data import register_digits

    monkeypatch.setenv("FOCAL_DET2_DATASETS", str(tmp_path / "datasets"))
    name = "digits_test_imbalance_s256"
    register_digits(name, split="train", num_images=3, image_size=256)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    digits_module._REGISTERED.pop(name, None)


@pytest.mark.parametrize("resized", [False, True], ids=["canvas size", "resized, two sizes"])
def test_imbalance_counts_are_those_of_label_anchors_on_the_real_images(tiny_canvas, resized):
    """
    Resized: training's input sizes are a random choice of two short sides, so the images
    are resized and of two sizes, with anchors for each (RNG seeded alike for both paths).
    """
    from conftest import head_logits
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model

    imbalance = load_tool("imbalance")
    resize = ["INPUT.MIN_SIZE_TRAIN", (160, 224), "INPUT.MAX_SIZE_TRAIN", 224]
    cfg = imbalance.canvas_cfg(256, opts=resize if resized else ())
    state = np.random.get_state()  # the augmentations draw from numpy's global generator
    try:
        np.random.seed(3)
        measured = imbalance.measure_imbalance(cfg, tiny_canvas)
        # independently: training's DatasetMapper on the real images, the backbone on them and
        # the model's label_anchors on each image (the mappers draw the same sizes and flips:
        # building a model draws nothing from numpy)
        np.random.seed(3)
        inputs = [DatasetMapper(cfg, is_train=True)(d) for d in DatasetCatalog.get(tiny_canvas)]
    finally:
        np.random.set_state(state)
    assert measured["images"] == 3 and measured["dataset"] == tiny_canvas
    model = build_model(cfg).eval()
    if resized:
        assert {x["image"].shape[1:] for x in inputs} == {(160, 160), (224, 224)}
    else:
        assert measured["anchors_per_image"] == _anchors_per_image(256) == 12276
    labels = torch.cat([head_logits(model, [x])[1] for x in inputs], dim=1)
    K = cfg.MODEL.RETINANET.NUM_CLASSES
    expected = {
        "positive": ((labels >= 0) & (labels < K)).sum(),
        "negative": (labels == K).sum(),
        "ignored": (labels == -1).sum(),
    }
    for key, count in expected.items():
        assert measured[f"{key}_per_image"] == pytest.approx(int(count) / 3)
    assert expected["positive"] > 0 and expected["ignored"] > 0
    assert measured["negatives_per_positive"] == pytest.approx(
        int(expected["negative"]) / int(expected["positive"])
    )
    assert measured["objects_per_image"] == sum(len(x["instances"]) for x in inputs) / 3


def test_imbalance_means_are_over_the_images_read_and_images_need_no_objects():
    """Asking for more images than the split has: the means are over the images read. An
    image without objects has no positives (no division by zero); a split without images is
    named."""
    from detectron2.data import DatasetCatalog

    imbalance = load_tool("imbalance")
    cfg = digits_cfg()
    everything = imbalance.measure_imbalance(cfg, "digits_val_tiny")
    assert imbalance.measure_imbalance(cfg, "digits_val_tiny", num_images=100) == everything
    assert everything["images"] == 8
    record = dict(DatasetCatalog.get("digits_val_tiny")[0], annotations=[])
    DatasetCatalog.register("digits_no_objects", lambda: [record])
    DatasetCatalog.register("digits_no_images", lambda: [])
    try:
        empty = imbalance.measure_imbalance(cfg, "digits_no_objects")
        assert empty["positive_per_image"] == 0 and empty["negative_per_image"] > 0
        assert empty["negatives_per_positive"] is None  # not the negative count
        line = imbalance.format_table({128: dict(empty, images=1)}).splitlines()[-1]
        assert line.startswith("| 128 px | 1 | 0.00 |") and line.endswith("| no positives |")
        with pytest.raises(ValueError, match="data set 'digits_no_images' has no images"):
            imbalance.measure_imbalance(cfg, "digits_no_images")
    finally:
        DatasetCatalog.remove("digits_no_objects")
        DatasetCatalog.remove("digits_no_images")


def test_imbalance_resizes_a_landscape_image_as_training_does():
    """The stand-in image has the record's height and width: a 96 x 160 image resized to the
    digits' long side of 128 (MAX_SIZE_TRAIN) is 77 x 128, as training's mapper makes it."""
    from detectron2.data import DatasetMapper

    imbalance = load_tool("imbalance")
    mapper = DatasetMapper(digits_cfg(), is_train=True)
    record = {"file_name": "unread.png", "height": 96, "width": 160, "image_id": 1}
    record["annotations"] = [
        {"bbox": [10, 20, 30, 40], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}
    ]
    instances, shape = imbalance._training_instances(mapper, record)
    assert shape == (77, 128)
    torch.testing.assert_close(
        instances.gt_boxes.tensor, torch.tensor([[x * 0.8 for x in (10.0, 20.0, 40.0, 60.0)]])
    )


def test_imbalance_canvas_options_and_errors():
    imbalance = load_tool("imbalance")
    cfg = imbalance.canvas_cfg(512)
    assert cfg.DATASETS.TRAIN == ("digits_train_s512",) and cfg.DATASETS.TEST == (
        "digits_val_s512",
    )
    assert cfg.INPUT.MIN_SIZE_TRAIN == (512,) and cfg.INPUT.MAX_SIZE_TRAIN == 512
    assert cfg.INPUT.MIN_SIZE_TEST == 512 and cfg.INPUT.MAX_SIZE_TEST == 512
    with pytest.raises(
        ValueError, match=r"canvas side must be one of \(128, 256, 512, 768\), got 100"
    ):
        imbalance.canvas_opts(100)
    with pytest.raises(ValueError, match="--canvases must be comma-separated values from"):
        imbalance.parse_canvases("128,100")
    with pytest.raises(ValueError, match="--canvases must be comma-separated integers"):
        imbalance.parse_canvases("big")
    assert imbalance.parse_canvases("768, 128") == [768, 128]
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        imbalance.measure_imbalance(cfg, "digits_val_tiny", num_images=0)


def test_imbalance_main_prints_and_writes_the_table(tmp_path, capsys):
    imbalance = load_tool("imbalance")
    out = tmp_path / "imbalance.json"
    # digits_val_s128: 300 images of 128 px, generated on first use (under a second)
    imbalance.main(
        ["--canvases", "128", "--split", "val", "--num-images", "4", "--output", str(out)]
    )
    stored = json.loads(out.read_text())["128"]
    assert (
        stored["dataset"] == "digits_val_s128" and stored["images"] == 4 and stored["canvas"] == 128
    )
    assert stored["anchors_per_image"] == _anchors_per_image(128) == 3069
    table = capsys.readouterr().out
    assert "| canvas | images | objects / image | anchors / image |" in table
    # the whole line, so that a column filled from another key fails
    assert (
        f"| 128 px | 4 | {stored['objects_per_image']:.2f} | 3,069 "
        f"| {stored['positive_per_image']:.1f} | {stored['negative_per_image']:,.0f} "
        f"| {stored['ignored_per_image']:.1f} | {stored['negatives_per_positive']:,.0f} |"
    ) in table.splitlines()


def test_imbalance_main_passes_its_overrides_and_tables_canvases_in_order(tmp_path, capsys):
    """Trailing KEY VALUE overrides reach the measurement (one aspect ratio: a third of the
    3,069 anchors), the table lists canvases smallest first, the split defaults to train."""
    imbalance = load_tool("imbalance")
    ratios = ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]"]
    measured = imbalance.main(["--canvases", "128", "--split", "val", "--num-images", "1", *ratios])
    assert measured[128]["anchors_per_image"] == 3069 / 3
    table = imbalance.format_table({256: measured[128], 128: measured[128]}).splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == ["| 128 px", "| 256 px"]
    assert imbalance.get_parser().parse_args([]).split == "train"


def test_imbalance_output_in_the_working_folder(tmp_path, monkeypatch):
    """``--output imbalance.json``, a bare file name: written into the working folder."""
    imbalance = load_tool("imbalance")
    monkeypatch.chdir(tmp_path)
    imbalance.main(
        ["--canvases", "128", "--split", "val", "--num-images", "1", "--output", "imbalance.json"]
    )
    assert json.loads((tmp_path / "imbalance.json").read_text())["128"]["images"] == 1


def test_imbalance_canvases_skip_empty_items_and_need_one():
    imbalance = load_tool("imbalance")
    assert imbalance.parse_canvases("128,") == [128]
    with pytest.raises(ValueError, match="--canvases must be comma-separated values from"):
        imbalance.parse_canvases(",")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val'\), got 'test'"):
        imbalance.measure_canvases([128], "test")


# --- ablate: the imbalance preset ----------------------------------------------------------


def _run_cfg(run):
    """The config train_net.py builds from a run's command line."""
    argv = run.argv()
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.merge_from_file(str(REPO / argv[1]))
    cfg.merge_from_list(argv[2:])
    return cfg


# Each Table 1 row's settings as its label states them: loss, gamma (None: CE has none),
# alpha, FL*'s beta and the gamma schedule's (NAME, START, ITERS as a share of MAX_ITER).
CONSTANT = ("constant", 0.0, 0.0)
TABLE1_SETTINGS = {
    "ce_a0.25": ("cross_entropy", None, 0.25, 1.0, CONSTANT),
    "ce_a0.50": ("cross_entropy", None, 0.5, 1.0, CONSTANT),
    "ce_a0.75": ("cross_entropy", None, 0.75, 1.0, CONSTANT),
    "fl_g0.5_a0.50": ("sigmoid_focal", 0.5, 0.5, 1.0, CONSTANT),
    "fl_g1_a0.25": ("sigmoid_focal", 1.0, 0.25, 1.0, CONSTANT),
    "fl_g2_a0.25": ("sigmoid_focal", 2.0, 0.25, 1.0, CONSTANT),
    "fl_g5_a0.25": ("sigmoid_focal", 5.0, 0.25, 1.0, CONSTANT),
    "softmax_fl_g2": ("softmax_focal", 2.0, 0.25, 1.0, CONSTANT),
    "fl_star_g2_b1": ("focal_star", 2.0, 0.25, 1.0, CONSTANT),
    "fl_star_g4_b0": ("focal_star", 4.0, 0.25, 0.0, CONSTANT),
    "soft_gamma_0to2": ("sigmoid_focal", 2.0, 0.25, 1.0, ("linear", 0.0, 0.5)),
}


@pytest.mark.parametrize("preset_name", ["digits-small", "digits-full"])
def test_ablate_table1_rows_train_what_their_labels_say(preset_name):
    """Every Table 1 row's runs get the loss, gamma, alpha, beta and schedule of its label."""
    ablate = load_tool("ablate")
    assert ablate.TABLE1_ROWS == tuple(TABLE1_SETTINGS)
    preset = ablate.PRESETS[preset_name]
    for row_name, (loss, gamma, alpha, beta, schedule) in TABLE1_SETTINGS.items():
        (run, *_) = ablate.plan(preset, ablate.select_rows(row_name, preset), "/out")
        cfg = _run_cfg(run)
        focal = cfg.MODEL.FOCAL
        assert (focal.LOSS, focal.ALPHA, focal.STAR_BETA) == (loss, alpha, beta), row_name
        assert gamma is None or focal.GAMMA == gamma, row_name
        name, start, share = schedule
        iters = int(cfg.SOLVER.MAX_ITER * share)
        assert (focal.GAMMA_SCHEDULE.NAME, focal.GAMMA_SCHEDULE.START) == (name, start), row_name
        assert focal.GAMMA_SCHEDULE.ITERS == iters, row_name


IMBALANCE_SETTINGS = {
    "ce_a0.75": ("cross_entropy", None, 0.75),
    "fl_g1_a0.25": ("sigmoid_focal", 1.0, 0.25),
    "fl_g2_a0.25": ("sigmoid_focal", 2.0, 0.25),
    "softmax_fl_g2": ("softmax_focal", 2.0, 0.25),
}


def test_ablate_imbalance_preset_config_of_every_row_and_canvas():
    from detectron2.data import DatasetCatalog

    ablate = load_tool("ablate")
    preset = ablate.PRESETS["imbalance"]
    rows, left_out = ablate.drop_rows_that_cannot_run(ablate.select_rows(None, preset), asked=False)
    runs = ablate.plan(preset, rows, "/out")
    main_runs = [r for r in runs if r.row.setting in IMBALANCE_SETTINGS]
    assert len(main_runs) == 4 * 4 * 2
    assert {(r.row.setting, r.row.canvas, r.seed) for r in main_runs} == {
        (s, c, k) for s in IMBALANCE_SETTINGS for c in (128, 256, 512, 768) for k in (0, 1)
    }
    for run in main_runs:
        cfg = _run_cfg(run)
        side = run.row.canvas
        assert cfg.DATASETS.TRAIN == (f"digits_train_s{side}",) and cfg.DATASETS.TEST == (
            f"digits_val_s{side}",
        )
        assert all(name in DatasetCatalog.list() for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN) == ((side,), side)
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (side, side)
        # one schedule at every canvas: Base-Digits.yaml's proportions at 600 iterations
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (
            600,
            (480, 570),
            60,
        )
        assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SEED == run.seed
        loss, gamma, alpha = IMBALANCE_SETTINGS[run.row.setting]
        assert (cfg.MODEL.FOCAL.LOSS, cfg.MODEL.FOCAL.ALPHA) == (loss, alpha)
        assert gamma is None or cfg.MODEL.FOCAL.GAMMA == gamma
        assert run.out_dir == f"/out/s{side}/{run.row.setting}/seed{run.seed}"
    ohem = ("ohem_b128_nms0.5", "ohem_1to3_b128_nms0.5")
    assert not left_out
    ohem_runs = [r for r in runs if r.row.setting in ohem]
    assert {(r.row.setting, r.row.canvas, r.seed) for r in ohem_runs} == {
        (s, c, k) for s in ohem for c in (512, 768) for k in (0, 1)
    }
    for run in ohem_runs:
        cfg = _run_cfg(run)
        side = run.row.canvas
        assert cfg.MODEL.FOCAL.LOSS == "ohem" and cfg.DATASETS.TRAIN == (f"digits_train_s{side}",)
        assert (cfg.MODEL.FOCAL.OHEM.BATCH_PER_IMAGE, cfg.MODEL.FOCAL.OHEM.NMS_THRESH) == (128, 0.5)
        assert cfg.MODEL.FOCAL.ALPHA == 0.75
    assert [_run_cfg(r).MODEL.FOCAL.OHEM.POS_FRACTION for r in ohem_runs] == [
        0.25 if "1to3" in r.row.setting else 0.0 for r in ohem_runs
    ]


def test_ablate_other_presets_keep_their_rows():
    ablate = load_tool("ablate")
    for name in ("digits-small", "digits-full"):
        preset = ablate.PRESETS[name]
        assert [r.name for r in ablate.select_rows(None, preset)] == list(ablate.TABLE1_ROWS)
        assert all(
            r.row.canvas is None
            for r in ablate.plan(preset, ablate.select_rows(None, preset), "/o")
        )
    assert len(ablate.TABLE1_ROWS) == 11 and ablate.OHEM_ROWS == (
        "ohem_b128_nms0.5",
        "ohem_1to3_b128_nms0.5",
    )


def test_ablate_rows_that_cannot_run_are_named_with_the_reason(tmp_path, capsys):
    ablate = load_tool("ablate")
    no_loss = ablate.Row(
        "x_loss", "x", "cross_entropy_R18_FPN_1x", ("MODEL.FOCAL.LOSS", "no_such_loss")
    )
    no_key = ablate.Row("x_key", "x", "cross_entropy_R18_FPN_1x", ("MODEL.FOCAL.NO_SUCH_KEY", 1))
    assert ablate.row_problem(ablate.ROWS[0]) is None
    assert ablate.row_problem(no_loss).startswith(
        "MODEL.FOCAL.LOSS 'no_such_loss' is not registered in FOCAL_LOSS_REGISTRY (registered: cross_entropy, "
    )
    assert ablate.row_problem(no_key) == (
        "config key MODEL.FOCAL.NO_SUCH_KEY does not exist "
        "(not in Detectron2's defaults or add_focal_config)"
    )
    rows, left_out = ablate.drop_rows_that_cannot_run(
        [ablate.ROWS[0], no_loss, no_key], asked=False
    )
    assert rows == [ablate.ROWS[0]] and list(left_out) == ["x_loss", "x_key"]
    with pytest.raises(
        ValueError, match=r"--rows asks for rows that cannot run in this checkout:\n  x_loss: "
    ):
        ablate.drop_rows_that_cannot_run([no_loss], asked=True)
    assert ablate._left_out_lines({"x_loss": "why"})[2:] == [
        "- x_loss: why",
        "",
        "Rerun the preset once they can run: finished runs are kept and only the missing ones train.",
    ]
    ablate.main(
        ["--preset", "imbalance", "--rows", "ohem*", "--list", "--output-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "Rows left out" not in out and "preset imbalance: 8 runs of 600 iterations;" in out


def test_ablate_imbalance_table_by_canvas(tmp_path):
    ablate = load_tool("ablate")
    preset = ablate.PRESETS["imbalance"]
    runs = ablate.plan(preset, ablate.select_rows("ce_a0.75,fl_g2_a0.25", preset), str(tmp_path))
    results = {
        ("s128/ce_a0.75", 0): _fake_result(80.0, 0),
        ("s128/ce_a0.75", 1): _fake_result(82.0, 1),
        ("s768/ce_a0.75", 0): _fake_result(None, 0, detections=0),
        ("s128/fl_g2_a0.25", 0): _fake_result(60.0, 0, detections=3000),
        ("s128/fl_g2_a0.25", 1): _fake_result(None, 1, detections=0),
        ("s768/fl_g2_a0.25", 0): _fake_result(70.0, 0, detections=3000),
    }
    imbalance = {
        side: {"negatives_per_positive": 100.0 * side / 128, "ignored_per_image": side / 2}
        for side in (128, 256, 512, 768)
    }
    left_out = {"ohem_b128_nms0.5": "MODEL.FOCAL.LOSS 'ohem' is not registered"}
    ablate.write_tables(
        str(tmp_path), "imbalance", preset, runs, results, "cmd", left_out, imbalance
    )
    markdown = (tmp_path / "results.md").read_text()
    assert "| | 128 px | 256 px | 512 px | 768 px |" in markdown
    assert "| negatives per positive anchor | 100 | 200 | 400 | 600 |" in markdown
    assert "| ignored anchors per image | 64.0 | 128.0 | 256.0 | 384.0 |" in markdown
    assert "| AP, CE, α=.75 | 81.0 ± 1.4 | – | – | no AP |" in markdown
    assert "| AP, FL, γ=2, α=.25 | 60.0 (1 of 2 seeds) | – | – | 70.0 |" in markdown
    assert "- ohem_b128_nms0.5: MODEL.FOCAL.LOSS 'ohem' is not registered" in markdown
    with open(tmp_path / "results.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(line["row"], line["canvas"]) for line in summary] == [
        ("s128/ce_a0.75", "128"),
        ("s128/fl_g2_a0.25", "128"),
        ("s768/ce_a0.75", "768"),
        ("s768/fl_g2_a0.25", "768"),
    ]
    with open(tmp_path / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert [
        (line["row"], line["canvas"], line["setting"], line["AP"], line["detections"])
        for line in lines
    ] == [
        ("s128/ce_a0.75", "128", "ce_a0.75", "80.0", ""),  # a result without the count
        ("s128/ce_a0.75", "128", "ce_a0.75", "82.0", ""),
        ("s128/fl_g2_a0.25", "128", "fl_g2_a0.25", "60.0", "3000"),
        ("s128/fl_g2_a0.25", "128", "fl_g2_a0.25", "", "0"),
        ("s768/ce_a0.75", "768", "ce_a0.75", "", "0"),
        ("s768/fl_g2_a0.25", "768", "fl_g2_a0.25", "70.0", "3000"),
    ]


def test_ablate_imbalance_is_measured_once_per_options(tmp_path, monkeypatch):
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=2, canvases=(128, 256))
    calls = []

    def measure(canvases, split, num_images, opts=()):
        calls.append((tuple(canvases), split, num_images, list(opts)))
        return {
            side: {
                "negatives_per_positive": float(side),
                "ignored_per_image": 1.0,
                "images": 1,
                "objects_per_image": 1.0,
                "anchors_per_image": 1.0,
                "positive_per_image": 1.0,
                "negative_per_image": float(side),
            }
            for side in canvases
        }

    monkeypatch.setattr(ablate, "measure_canvases", measure)
    offset = ["MODEL.ANCHOR_GENERATOR.OFFSET", "0.5"]
    small = ablate.preset_imbalance(
        str(tmp_path), ablate.Preset(iters=2, canvases=(128,)), offset + ["MODEL.DEVICE", "cpu"]
    )
    # the anchors do not depend on where the run trains: MODEL.DEVICE is not an option of it
    assert calls == [((128,), "train", None, offset)] and list(small) == [128]
    # --tables measures nothing: a canvas not stored has none
    assert ablate.preset_imbalance(str(tmp_path), preset, offset, measure=False)[256] is None
    assert len(calls) == 1
    both = ablate.preset_imbalance(str(tmp_path), preset, offset)  # only 256 is measured
    assert (
        calls[1] == ((256,), "train", None, offset) and both[256]["negatives_per_positive"] == 256
    )
    assert ablate.preset_imbalance(str(tmp_path), preset, offset) == both and len(calls) == 2
    # a preset of fewer canvases gets its own measurements only, read from the file
    fewer = ablate.Preset(iters=2, canvases=(128,))
    assert list(ablate.preset_imbalance(str(tmp_path), fewer, offset)) == [128]
    assert len(calls) == 2
    stored = json.loads((tmp_path / "imbalance.json").read_text())
    assert set(stored["canvases"]) == {"128", "256"} and stored["split"] == "train"
    ablate.preset_imbalance(str(tmp_path), preset, [])  # other options: everything measured again
    assert calls[2][0] == (128, 256)


def test_ablate_main_measures_with_its_overrides_and_keeps_the_imbalance_table(
    tmp_path, monkeypatch
):
    """
    Through main, with trailing overrides: the imbalance is measured with them, the tables
    written after the training keep the imbalance rows, and results.md records main's own
    arguments as the command (not the process's sys.argv).
    """
    ablate = load_tool("ablate")
    measured = []

    def measure(canvases, split, num_images, opts=()):
        measured.append(list(opts))
        keys = ("images", "objects_per_image", "anchors_per_image", "positive_per_image")
        return {
            side: dict(
                dict.fromkeys(keys, 1.0),
                negatives_per_positive=123.0,
                ignored_per_image=4.0,
                negative_per_image=123.0,
            )
            for side in canvases
        }

    monkeypatch.setattr(ablate, "measure_canvases", measure)
    monkeypatch.setattr(ablate, "train_run", lambda run, **kwargs: _fake_result(50.0))
    argv = ["--preset", "imbalance", "--rows", "ce_a0.75", "--canvases", "128", "--seeds", "0"]
    argv += ["--output-dir", str(tmp_path), "MODEL.ANCHOR_GENERATOR.ANGLES", "[[0]]"]
    ablate.main(argv)
    assert measured == [["MODEL.ANCHOR_GENERATOR.ANGLES", "[[0]]"]]
    markdown = (tmp_path / "results.md").read_text()
    assert "| negatives per positive anchor | 123 |" in markdown
    assert f"    python tools/ablate.py {ablate._shell_join(argv)}" in markdown.splitlines()


def test_ablate_main_refuses_rows_asked_for_that_cannot_run(monkeypatch):
    ablate = load_tool("ablate")
    monkeypatch.setattr(
        ablate, "row_problem", lambda row: "why" if row.name == "ce_a0.75" else None
    )
    with pytest.raises(
        ValueError, match=r"--rows asks for rows that cannot run .*\n  ce_a0.75: why"
    ):
        ablate.main(["--preset", "tiny", "--rows", "ce_a0.75", "--list"])


def test_ablate_failed_run_names_its_log_and_shows_its_tail(tmp_path, monkeypatch):
    """Not verbose, the run's output went to stdout.log: the error ends with its last lines;
    verbose, it went to the console and the error names the log alone."""
    ablate = load_tool("ablate")
    preset = ablate.Preset(iters=2)
    (run,) = ablate.plan(preset, ablate.select_rows("ce_a0.75", preset), str(tmp_path))

    def failing(cmd, cwd, env, stdout=None, stderr=None):
        if stdout is not None:
            stdout.write("Traceback: the run's own error\n")
        return SimpleNamespace(returncode=3)

    monkeypatch.setenv("FOCAL_DET2_COMMIT", "abc1234")  # no git call to stand in for
    monkeypatch.setattr(ablate.subprocess, "run", failing)
    with pytest.raises(RuntimeError) as error:
        ablate.train_run(run)
    log = os.path.join(run.out_dir, "stdout.log")
    assert f"failed (exit 3); log: {log}\n" in str(error.value)
    assert str(error.value).endswith("Traceback: the run's own error\n")
    with pytest.raises(RuntimeError) as error:
        ablate.train_run(run, verbose=True)
    assert str(error.value).endswith(f"failed (exit 3); log: {log}")


def test_ablate_console_line_of_a_finished_run_notes_its_class_groups(
    tmp_path, monkeypatch, capsys
):
    """A long-tail run read back without per-class AP: its console line says why its group APs
    are missing, as results.md does."""
    ablate = load_tool("ablate")
    monkeypatch.setattr(ablate, "read_result", lambda run, tabulating: _fake_result(5.0))
    ablate.main(
        [
            "--preset",
            "longtail",
            "--rows",
            "ce_a0.75",
            "--seeds",
            "0",
            "--tables",
            "--output-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "ce_a0.75 seed 0: done, AP 5.0 (AP_rare, AP_frequent –: the run's result.json" in out


def test_ablate_seeds_option_selects_a_subset(capsys):
    ablate = load_tool("ablate")
    assert ablate.select_seeds("1, 0", ablate.PRESETS["longtail"]) == (0, 1)
    with pytest.raises(
        ValueError, match=r"--seeds must be comma-separated seeds from \(0, 1\), got '2'"
    ):
        ablate.select_seeds("2", ablate.PRESETS["longtail"])
    ablate.main(["--preset", "longtail", "--seeds", "1", "--list", "--rows", "fl_ls0.1,ce_a0.75"])
    out = capsys.readouterr().out
    assert "preset longtail: 2 runs of 1000 iterations;" in out
    assert "fl_ls0.1 seed 1:" in out and "seed 0:" not in out


def test_ablate_tables_option_tabulates_without_training(tmp_path, capsys, monkeypatch):
    ablate = load_tool("ablate")
    monkeypatch.setattr(ablate, "train_run", lambda *a, **k: pytest.fail("--tables trained a run"))
    ablate.main(["--preset", "tiny", "--tables", "--output-dir", str(tmp_path)])
    assert "0 of 2 runs finished" in capsys.readouterr().out
    assert (tmp_path / "results.md").exists() and (tmp_path / "runs.csv").exists()


def test_ablate_canvases_option_selects_a_subset(capsys):
    ablate = load_tool("ablate")
    preset = ablate.PRESETS["imbalance"]
    assert ablate.select_canvases("768, 512", "imbalance", preset) == (512, 768)
    with pytest.raises(
        ValueError,
        match=r"--canvases must be comma-separated sides from \(128, 256, 512, 768\), got '100'",
    ):
        ablate.select_canvases("100", "imbalance", preset)
    with pytest.raises(
        ValueError, match="preset 'tiny' has no canvases; presets with canvases: \\['imbalance'\\]"
    ):
        ablate.main(["--preset", "tiny", "--canvases", "128", "--list"])
    ablate.main(
        [
            "--preset",
            "imbalance",
            "--canvases",
            "256,512",
            "--list",
            "--rows",
            "ce_a0.75,fl_g2_a0.25",
        ]
    )
    out = capsys.readouterr().out
    assert "preset imbalance: 8 runs of 600 iterations;" in out
    assert (
        "s256/ce_a0.75 seed 0:" in out and "s512/fl_g2_a0.25 seed 1:" in out and "s768/" not in out
    )
    # OHEM rows run at 512 and 768 px only, whatever the canvases chosen
    restricted = ablate.replace(preset, canvases=(128, 256, 512))
    ohem = [r for r in ablate.ROWS if r.name in ablate.OHEM_ROWS]
    assert [r.canvas for r in restricted.expand(ohem)] == [512, 512]
    assert [r.canvas for r in preset.expand(ohem)] == [512, 512, 768, 768]


# --- plot_imbalance ------------------------------------------------------------------


def _synthetic_sweep(folder, canvases=(128, 256, 512, 768)):
    """A results folder as the imbalance preset leaves it, with made-up numbers (tests only)."""
    folder.mkdir(parents=True, exist_ok=True)
    imbalance = {
        str(s): {"negatives_per_positive": 100.0 * (s / 128) ** 2, "ignored_per_image": 60.0}
        for s in canvases
    }
    (folder / "imbalance.json").write_text(
        json.dumps({"split": "train", "opts": [], "canvases": imbalance})
    )
    with open(folder / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "row",
                "seed",
                "AP",
                "AP50",
                "AP75",
                "APs",
                "APm",
                "train_s",
                "eval_s",
                "iterations",
                "canvas",
                "setting",
            ]
        )
        for i, side in enumerate(canvases):
            for seed in (0, 1):
                writer.writerow(
                    [
                        f"s{side}/ce_a0.75",
                        seed,
                        80 - 20 * i + 2 * seed,
                        "",
                        "",
                        "",
                        "",
                        1,
                        1,
                        600,
                        side,
                        "ce_a0.75",
                    ]
                )
                writer.writerow(
                    [
                        f"s{side}/fl_g2_a0.25",
                        seed,
                        78 - i + seed,
                        "",
                        "",
                        "",
                        "",
                        1,
                        1,
                        600,
                        side,
                        "fl_g2_a0.25",
                    ]
                )
        writer.writerow(
            ["s768/ohem_b128_nms0.5", 0, 50.0, "", "", "", "", 1, 1, 600, 768, "ohem_b128_nms0.5"]
        )
        writer.writerow(
            ["s768/ohem_b128_nms0.5", 1, "", "", "", "", "", 1, 1, 600, 768, "ohem_b128_nms0.5"]
        )
    return folder


def test_plot_imbalance_on_a_synthetic_folder(tmp_path, capsys):
    tool = load_tool("plot_imbalance")
    folder = _synthetic_sweep(tmp_path / "sweep")
    out = tmp_path / "sweep.png"
    data = tool.main(
        [str(folder), "--output", str(out), "--width", "6", "--height", "4", "--dpi", "50"]
    )
    assert png_size(out) == (300, 200)
    assert [p[:4] for p in data["ce_a0.75"]] == [
        (100.0, 81.0, 80.0, 82.0),
        (400.0, 61.0, 60.0, 62.0),
        (1600.0, 41.0, 40.0, 42.0),
        (3600.0, 21.0, 20.0, 22.0),
    ]
    assert data["fl_g2_a0.25"][-1][:4] == (3600.0, 75.5, 75.0, 76.0)
    assert data["ohem_b128_nms0.5"] == [
        (3600.0, 50.0, 50.0, 50.0, [50.0])
    ]  # a seed without AP is left out
    printed = capsys.readouterr().out
    assert "  ce_a0.75: 3,600 negatives per positive, AP 21.0 (2 seeds, 20.0-22.0)" in printed


def test_plot_imbalance_draws_the_mean_line_and_the_seed_range(tmp_path, monkeypatch):
    """
    The figure itself: each setting's line joins its mean AP over seeds at each canvas's
    negatives per positive, and its error bar spans the lowest to the highest seed. A third
    seed (AP 89 at 128 px: mean 251/3, median 82) tells the mean from the median. Guards the
    mutants that draw the line from another column or average with the median.
    """
    tool = load_tool("plot_imbalance")
    folder = _synthetic_sweep(tmp_path / "sweep")
    with open(folder / "runs.csv", "a", newline="") as f:
        csv.writer(f).writerow(
            ["s128/ce_a0.75", 2, 89.0, "", "", "", "", 1, 1, 600, 128, "ce_a0.75"]
        )
    figures = _captured_figures(tool, monkeypatch)
    data = tool.plot([str(folder)], str(tmp_path / "sweep.png"), dpi=20)
    assert data["ce_a0.75"][0][:4] == pytest.approx((100.0, 251 / 3, 80.0, 89.0))
    (ax,) = [a for a in figures[0].axes if a.get_legend() is not None]
    assert ax.get_xscale() == "log"  # negatives per positive span 100x to 10,000x
    lines = dict(zip(*reversed(ax.get_legend_handles_labels())))
    labels = tool._labels()
    bars = [c for c in ax.containers if c.get_label() is not None]
    assert len(lines) == len(data) == len(bars) == 3
    for (setting, points), bar in zip(data.items(), bars):
        line = lines[labels[setting]]
        assert list(line.get_xdata()) == [p[0] for p in points]
        assert list(line.get_ydata()) == pytest.approx([np.mean(p[4]) for p in points])
        np.testing.assert_allclose(
            np.array(bar.lines[2][0].get_segments()),
            [[[p[0], min(p[4])], [p[0], max(p[4])]] for p in points],
        )


def test_plot_imbalance_marks_the_canvases_and_seeds_of_ap_0(tmp_path, monkeypatch):
    """
    The top axis names each canvas at its measured imbalance (here 128 px is measured the
    most imbalanced, so the order of sides is not that of the ticks); a seed with AP 0 is a
    black x, every other seed a dot of its line's colour.
    """
    tool = load_tool("plot_imbalance")
    folder = _sweep_with_128_px_most_imbalanced(tmp_path / "sweep")
    _set_ap(folder, "s256/ce_a0.75", "1", "0.0")
    figures = _captured_figures(tool, monkeypatch)
    tool.plot([str(folder)], str(tmp_path / "sweep.png"), dpi=20)
    (ax,) = [a for a in figures[0].axes if a.get_legend() is not None]
    (top,) = ax.child_axes
    ticks = dict(zip(top.get_xticks(), (t.get_text() for t in top.get_xticklabels())))
    assert ticks == {400.0: "256 px", 1600.0: "512 px", 3600.0: "768 px", 90000.0: "128 px"}
    marks = [line for line in ax.lines if line.get_marker() in (".", "x") and len(line.get_ydata())]
    crosses = [line for line in marks if line.get_marker() == "x"]
    assert [(list(c.get_xdata()), list(c.get_ydata())) for c in crosses] == [([400.0], [0.0])]
    assert crosses[0].get_color() == "black"
    dots = [line for line in marks if line is not crosses[0]]
    assert dots  # a point's seeds other than AP 0
    for line in dots:
        assert line.get_color() != "black" and 0.0 not in line.get_ydata()


def test_plot_imbalance_counts_a_run_without_detections_as_ap_0(tmp_path, capsys):
    tool = load_tool("plot_imbalance")
    folder = _synthetic_sweep(tmp_path / "sweep", canvases=(128, 768))

    def count_detections(lines):
        for line in lines:
            line["detections"] = "3000"
            if line["row"] == "s768/ce_a0.75" and line["seed"] == "1":
                line["AP"], line["detections"] = "", "0"  # nothing scored above the threshold
        # no AP but detections (or no count, from an older ablate.py): left out, as before
        assert any(line["AP"] == "" and line["detections"] == "3000" for line in lines)
        return lines

    _rewrite_runs(folder, count_detections)
    out = tmp_path / "sweep.png"
    data = tool.main([str(folder), "--output", str(out), "--dpi", "20"])
    assert data["ce_a0.75"][-1] == (3600.0, 30.0, 0.0, 60.0, [60.0, 0.0])
    assert data["ohem_b128_nms0.5"] == [(3600.0, 50.0, 50.0, 50.0, [50.0])]
    assert "  ce_a0.75: 3,600 negatives per positive, AP 30.0 (2 seeds, 0.0-60.0)" in (
        capsys.readouterr().out
    )


def test_plot_imbalance_errors_name_the_file(tmp_path):
    tool = load_tool("plot_imbalance")
    with pytest.raises(
        FileNotFoundError,
        match="imbalance.json does not exist: run `python tools/ablate.py --preset imbalance`",
    ):
        tool.sweep(str(tmp_path))
    measured = _synthetic_sweep(tmp_path / "measured", canvases=(128,))
    (measured / "runs.csv").unlink()  # the imbalance measured, no run finished yet
    with pytest.raises(
        FileNotFoundError,
        match="runs.csv does not exist: no run of the imbalance preset has finished there",
    ):
        tool.sweep(str(measured))
    folder = _synthetic_sweep(tmp_path / "partial", canvases=(128, 256))
    data = json.loads((folder / "imbalance.json").read_text())
    del data["canvases"]["256"]
    (folder / "imbalance.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"has no measurement for canvas \[256\] of 'ce_a0.75'; measured: \[128\]"
    ):
        tool.sweep(str(folder))
    other = tmp_path / "table1"
    other.mkdir()
    (other / "imbalance.json").write_text((folder / "imbalance.json").read_text())
    (other / "runs.csv").write_text("row,seed,AP,canvas,setting\nce_a0.75,0,60.0,,ce_a0.75\n")
    with pytest.raises(
        ValueError,
        match="row 'ce_a0.75' has no canvas; this is not the output of a preset with canvases",
    ):
        tool.sweep(str(other))
    data["canvases"]["128"]["negatives_per_positive"] = None  # a split without positives
    (folder / "imbalance.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError,
        match=r"partial/imbalance.json: canvas \[128\] has no positive anchors, so no negatives "
        "per positive to plot it at",
    ):
        tool.sweep(str(folder))


def _rewrite_runs(folder, edit):
    """Replaces the lines of folder/runs.csv (dicts, as csv.DictReader reads them) by edit(lines)."""
    with open(folder / "runs.csv", newline="") as f:
        lines = edit(list(csv.DictReader(f)))
    with open(folder / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)


def _set_ap(folder, row, seed, ap):
    """Writes ``ap`` (a string, as in the CSV) as the AP of ``row``'s ``seed`` in folder/runs.csv."""

    def edit(lines):
        for line in lines:
            if line["row"] == row and line["seed"] == seed:
                line["AP"] = ap
        return lines

    _rewrite_runs(folder, edit)


def _sweep_with_128_px_most_imbalanced(folder):
    """A synthetic sweep whose 128 px canvas is measured the most imbalanced (90,000 : 1)."""
    folder = _synthetic_sweep(folder)
    data = json.loads((folder / "imbalance.json").read_text())
    data["canvases"]["128"]["negatives_per_positive"] = 90000.0
    (folder / "imbalance.json").write_text(json.dumps(data))
    return folder


def _captured_figures(tool, monkeypatch):
    """The figures the plotting ``tool`` saves from now on (still saved), in a list."""
    figures, save = [], tool.save_figure
    monkeypatch.setattr(
        tool, "save_figure", lambda fig, *args: (figures.append(fig), save(fig, *args))
    )
    return figures


def _keep_runs(folder, keep):
    """Leaves only the lines of folder/runs.csv for which keep(line) holds."""
    _rewrite_runs(folder, lambda lines: [line for line in lines if keep(line)])


def test_plot_imbalance_reads_several_folders_as_one(tmp_path):
    tool = load_tool("plot_imbalance")
    whole = tool.sweep(str(_synthetic_sweep(tmp_path / "whole")))
    # the same runs, made in three calls: 128 px; 256-768 px seed 0; 256-768 px seed 1
    small = _synthetic_sweep(tmp_path / "small", canvases=(128,))
    seed0 = _synthetic_sweep(tmp_path / "seed0", canvases=(256, 512, 768))
    seed1 = _synthetic_sweep(tmp_path / "seed1", canvases=(256, 512, 768))
    _keep_runs(seed0, lambda line: line["seed"] == "0")
    _keep_runs(seed1, lambda line: line["seed"] == "1")
    out = tmp_path / "merged.png"
    tool.main([str(small), str(seed0), str(seed1), "--output", str(out), "--dpi", "20"])
    merged = tool.sweep(str(small), str(seed0), str(seed1))
    assert [p[0] for p in merged["ce_a0.75"]] == [p[0] for p in whole["ce_a0.75"]]
    assert [len(p[4]) for p in merged["ce_a0.75"]] == [2, 2, 2, 2]  # each canvas has both seeds
    assert merged["ohem_b128_nms0.5"] == [(3600.0, 50.0, 50.0, 50.0, [50.0])]
    assert out.exists()
    # a run in two folders with two results is named with both folders
    other = _synthetic_sweep(tmp_path / "other", canvases=(128, 256))  # other APs at 256 px
    with pytest.raises(
        ValueError, match=r"run \('ce_a0.75', 256, 0\) is in both .*seed0 and .*other"
    ):
        tool.sweep(str(seed0), str(other))
    # a canvas measured differently in two folders
    data = json.loads((other / "imbalance.json").read_text())
    data["canvases"]["256"]["negatives_per_positive"] = 1.0
    (other / "imbalance.json").write_text(json.dumps(data))
    _keep_runs(other, lambda line: line["seed"] == "1")
    with pytest.raises(
        ValueError, match=r"the imbalance of canvas 256 is in both .*seed0 and .*other"
    ):
        tool.sweep(str(seed0), str(other))


def test_plot_imbalance_sorts_by_imbalance_and_reads_an_ap_of_none(tmp_path):
    """
    Points are sorted by the measured imbalance, not by canvas side (here 128 px is
    measured the more imbalanced), and an AP written as "None" is no AP.
    """
    tool = load_tool("plot_imbalance")
    folder = _sweep_with_128_px_most_imbalanced(tmp_path / "sweep")
    _set_ap(folder, "s768/ohem_b128_nms0.5", "1", "None")
    sweep = tool.sweep(str(folder))
    # ce_a0.75: AP 80 and 82 at 128 px, now the last point; 60 and 62 at 256 px, now the first
    assert [p[0] for p in sweep["ce_a0.75"]] == [400.0, 1600.0, 3600.0, 90000.0]
    assert sweep["ce_a0.75"][0][:4] == (400.0, 61.0, 60.0, 62.0)
    assert sweep["ce_a0.75"][-1][:4] == (90000.0, 81.0, 80.0, 82.0)
    assert sweep["ohem_b128_nms0.5"] == [(3600.0, 50.0, 50.0, 50.0, [50.0])]


# --- ablate: the long-tail presets ---------------------------------------------------------

# row -> (loss, gamma, alpha, class weighting, CB beta, label smoothing); gamma None: not read
LONGTAIL_SETTINGS = {
    "ce_a0.75": ("cross_entropy", None, 0.75, "none", None, None),
    "fl_g2_a0.25": ("sigmoid_focal", 2.0, 0.25, "none", None, None),
    "softmax_fl_g2": ("softmax_focal", 2.0, 0.25, "none", None, None),
    "fl_cb0.99": ("sigmoid_focal", 2.0, 0.25, "effective_number", 0.99, None),
    "fl_cb0.999": ("sigmoid_focal", 2.0, 0.25, "effective_number", 0.999, None),
    "fl_cb0.9999": ("sigmoid_focal", 2.0, 0.25, "effective_number", 0.9999, None),
    "softmax_fl_cb0.999": ("softmax_focal", 2.0, 0.25, "effective_number", 0.999, None),
    "fl_ls0.1": ("sigmoid_focal", 2.0, 0.25, "none", None, 0.1),
}


def test_ablate_longtail_presets_rows_and_groups():
    ablate = load_tool("ablate")
    assert ablate.LONGTAIL_ROWS == tuple(LONGTAIL_SETTINGS)
    for name in ("longtail", "longtail10"):
        preset = ablate.PRESETS[name]
        assert [r.name for r in ablate.select_rows(None, preset)] == list(LONGTAIL_SETTINGS)
        assert preset.seeds == (0, 1) and preset.iters == 1000
        assert preset.cost.startswith("16 runs")
    # the columns: the 3 rarest and the 3 most frequent digits of the long-tailed splits
    from focal_det2.data import DIGIT_CLASSES, longtail_shares

    assert list(longtail_shares(100).argsort()[::-1]) == list(range(10))  # digit 0 most frequent
    assert [(g.key, g.classes) for g in ablate.LONGTAIL_GROUPS] == [
        ("AP_rare", tuple(DIGIT_CLASSES[-3:])),
        ("AP_frequent", tuple(DIGIT_CLASSES[:3])),
    ]
    # the Table 1 presets keep their rows
    assert set(ablate.CLASS_IMBALANCE_ROWS).isdisjoint(ablate.TABLE1_ROWS)


@pytest.mark.parametrize("row_name", list(LONGTAIL_SETTINGS))
def test_ablate_longtail_row_config(row_name):
    from detectron2.data import DatasetCatalog

    from focal_det2.checks import check_cfg

    ablate = load_tool("ablate")
    defaults = get_cfg()
    add_focal_config(defaults)
    loss, gamma, alpha, weighting, beta, smoothing = LONGTAIL_SETTINGS[row_name]
    assert ablate.row_problem(next(r for r in ablate.ROWS if r.name == row_name)) is None
    for preset_name, factor in (("longtail", 100), ("longtail10", 10)):
        preset = ablate.PRESETS[preset_name]
        runs = ablate.plan(preset, ablate.select_rows(row_name, preset), "/out")
        assert [r.seed for r in runs] == [0, 1]
        for run in runs:
            cfg = _run_cfg(run)
            assert cfg.DATASETS.TRAIN == (f"digits_train_lt{factor}",)
            assert cfg.DATASETS.TEST == ("digits_val_lt",)
            assert all(n in DatasetCatalog.list() for n in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
            assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (
                1000,
                (800, 950),
                100,
            )
            assert cfg.SEED == run.seed and run.out_dir == f"/out/{row_name}/seed{run.seed}"
            assert (cfg.MODEL.FOCAL.LOSS, cfg.MODEL.FOCAL.ALPHA) == (loss, alpha)
            assert gamma is None or cfg.MODEL.FOCAL.GAMMA == gamma
            assert cfg.MODEL.FOCAL.CLASS_WEIGHTING == weighting
            assert beta is None or cfg.MODEL.FOCAL.CB_BETA == beta
            if smoothing is not None:
                assert cfg.MODEL.FOCAL.LABEL_SMOOTHING == smoothing
    check_cfg(cfg)  # the model builds from it


def _bbox_result(ap, per_class):
    """COCOEvaluator's results["bbox"]: the summary metrics and "AP-<class>" for every class."""
    bbox = dict(AP=ap, AP50=ap, AP75=ap, APs=ap, APm=ap)
    bbox.update({f"AP-{c}": v for c, v in zip("0123456789", per_class)})
    return bbox


def test_ablate_rare_and_frequent_ap_from_per_class_results(tmp_path):
    ablate = load_tool("ablate")
    nan = float("nan")
    bbox = _bbox_result(50.0, [90.0, 80.0, 70.0, 60.0, 50.0, nan, 40.0, 30.0, 20.0, 10.0])
    per_class = ablate.per_class_ap(bbox)
    assert per_class == {
        "0": 90.0,
        "1": 80.0,
        "2": 70.0,
        "3": 60.0,
        "4": 50.0,
        "5": None,
        "6": 40.0,
        "7": 30.0,
        "8": 20.0,
        "9": 10.0,
    }
    rare, frequent = ablate.LONGTAIL_GROUPS
    assert ablate.group_ap(per_class, rare.classes) == pytest.approx((30 + 20 + 10) / 3)
    assert ablate.group_ap(per_class, frequent.classes) == pytest.approx((90 + 80 + 70) / 3)
    assert ablate.group_ap(per_class, ("4", "5")) is None  # class 5 has no AP: no mean

    # the tables: mean and sample std over seeds of each group, notes for a missing one
    preset = ablate.replace(ablate.PRESETS["longtail"], iters=10)
    runs = ablate.plan(preset, ablate.select_rows("fl_cb0.999,ce_a0.75", preset), "/out")
    timing = {"train_seconds": 10.0, "eval_seconds": 1.0, "iterations": 10, "detections": 5}
    seed1 = [91.0, 81.0, 71.0, 0.0, 0.0, 0.0, 0.0, 40.0, 20.0, 12.0]
    no_nine = [1.0] * 9 + [nan]
    results = {}
    for key, values in (
        (("fl_cb0.999", 0), bbox),
        (("fl_cb0.999", 1), _bbox_result(52.0, seed1)),
        (("ce_a0.75", 0), _bbox_result(40.0, no_nine)),
    ):
        metrics = {k: values[k] for k in ablate.METRICS}
        results[key] = {"metrics": metrics, "per_class_AP": ablate.per_class_ap(values), **timing}
    ce_line, fl_line = ablate.summarize(runs, results, ablate.LONGTAIL_GROUPS)  # ROWS order
    assert fl_line["row"] == "fl_cb0.999" and fl_line["seeds"] == 2
    # rare: seed 0 (30 + 20 + 10) / 3 = 20, seed 1 (40 + 20 + 12) / 3 = 24
    assert fl_line["AP_rare"] == pytest.approx(22.0)
    assert fl_line["AP_rare_std"] == pytest.approx(np.sqrt(8.0))
    # frequent: 80 and 81
    assert fl_line["AP_frequent"] == pytest.approx(80.5)
    assert ce_line["AP_rare"] is None and ce_line["AP_frequent"] == pytest.approx(1.0)

    ablate.write_tables(str(tmp_path), "longtail", preset, runs, results)
    markdown = (tmp_path / "results.md").read_text()
    assert (
        "| setting | AP | AP50 | AP75 | APs | APm | AP rarest 3 (7, 8, 9) | "
        "AP most frequent 3 (0, 1, 2) | train s |" in markdown
    )
    assert "| 22.0 ± 2.8 | 80.5 ± 0.7 |" in markdown
    assert "| CE, α=.75 | 40.0 | 40.0 | 40.0 | 40.0 | 40.0 | – | 1.0 |" in markdown
    assert (
        "- CE, α=.75, seed 0: AP_rare –: no AP for class 9: COCO gives none to a class "
        "without ground-truth boxes in the test set" in markdown
    )
    with open(tmp_path / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert [line["AP_rare"] for line in lines] == ["", "20.0", "24.0"]
    with open(tmp_path / "results.csv") as f:
        assert [line["AP_frequent"] for line in csv.DictReader(f)] == ["1.0", "80.5"]


def test_ablate_longtail_preset_trains_and_stores_per_class_ap(tmp_path, monkeypatch):
    """One class-balanced run of 2 iterations on the tiny splits, through the real evaluation."""
    ablate = load_tool("ablate")
    tiny = ablate.PRESETS["tiny"]
    monkeypatch.setitem(
        ablate.PRESETS,
        "longtail",
        ablate.replace(ablate.PRESETS["longtail"], iters=2, seeds=(0,), opts=tiny.opts),
    )
    out = tmp_path / "longtail"
    # every score kept, so that the 2-iteration model has detections and COCO per-class APs
    extra = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "20"]
    ablate.main(["--preset", "longtail", "--rows", "fl_cb0.999", "--output-dir", str(out), *extra])
    result = json.loads((out / "fl_cb0.999" / "seed0" / "result.json").read_text())
    assert result["detections"] > 0
    assert sorted(result["per_class_AP"]) == [str(d) for d in range(10)]
    assert all(v is None or 0.0 <= v <= 100.0 for v in result["per_class_AP"].values())
    with open(out / "results.csv") as f:
        (line,) = list(csv.DictReader(f))
    per_class = result["per_class_AP"]
    expected = ablate.group_ap(per_class, ("7", "8", "9"))
    assert (line["AP_rare"] == "") if expected is None else float(line["AP_rare"]) == expected
    assert "AP rarest 3 (7, 8, 9)" in (out / "results.md").read_text()
