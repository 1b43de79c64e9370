"""
Exact resume: a run stopped after iteration k and continued with --resume
ends with the weights and metrics.json values of an uninterrupted run.
"""
import json

import pytest
import torch
from conftest import digits_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng

from focal_det2.engine import FocalTrainer
from focal_det2.modeling import FocalRetinaNet


MAX_ITER, STOP_AFTER = 6, 3
# Wall-clock metrics differ between any two runs.
TIMING_KEYS = {"time", "data_time", "rank_data_time", "eta_seconds"}


class _Interrupted(Exception):
    pass


class _StopAfter(HookBase):
    """Raises after iteration ``count - 1``, as a killed job would stop."""

    def __init__(self, count):
        self.count = count

    def after_step(self):
        if self.trainer.iter + 1 == self.count:
            raise _Interrupted


class _Trainer(FocalTrainer):
    """FocalTrainer that writes metrics.json every iteration and can be interrupted."""

    stop_after = None

    def build_hooks(self):
        ret = super().build_hooks()
        for h in ret:
            if isinstance(h, hooks.PeriodicWriter):
                h._period = 1
        if self.stop_after is not None:
            ret.append(_StopAfter(self.stop_after))  # after the checkpointer and the writers
        return ret


def _cfg(output_dir, *opts):
    cfg = digits_cfg(
        "soft_gamma_R18_FPN_1x",
        output_dir,
        [
            "SOLVER.MAX_ITER", MAX_ITER,
            "SOLVER.CHECKPOINT_PERIOD", STOP_AFTER,
            "SOLVER.WARMUP_ITERS", 2,
            "SOLVER.STEPS", (4,),
            "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS", MAX_ITER,  # gamma changes every iteration
            "DATASETS.TEST", (),
            "INPUT.MIN_SIZE_TRAIN", (64,),  # the digits canvases, downscaled: faster
            "INPUT.MAX_SIZE_TRAIN", 64,
            *opts,
        ],
    )
    cfg.freeze()
    return cfg


def _train(cfg, *, resume=False, stop_after=None):
    seed_all_rng(cfg.SEED)
    trainer = type("T", (_Trainer,), {"stop_after": stop_after})(cfg)
    trainer.resume_or_load(resume=resume)
    if stop_after is None:
        trainer.train()
    else:
        with pytest.raises(_Interrupted):
            trainer.train()
    return trainer


def _metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole, parts = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("parts")
    uninterrupted = _train(_cfg(whole))
    _train(_cfg(parts), stop_after=STOP_AFTER)
    resumed = _train(_cfg(parts), resume=True)
    return uninterrupted, resumed, whole, parts


def test_resumed_run_starts_after_the_checkpoint(runs):
    _, resumed, _, parts = runs
    assert resumed.start_iter == STOP_AFTER
    assert (parts / f"model_{STOP_AFTER - 1:07d}.pth").exists()


def test_resume_ends_with_the_same_weights(runs):
    uninterrupted, resumed, _, _ = runs
    a, b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    assert resumed.model.loss_normalizer == pytest.approx(uninterrupted.model.loss_normalizer, rel=1e-12)


def test_resume_writes_the_same_metrics(runs):
    _, _, whole, parts = runs
    expected, got = _metrics(whole), _metrics(parts)
    assert [r["iteration"] for r in expected] == list(range(MAX_ITER))
    assert [r["iteration"] for r in got] == list(range(MAX_ITER))
    gammas = [r["focal_gamma"] for r in expected]
    # gamma(i) = 2 i / MAX_ITER, logged unsmoothed.
    assert gammas == pytest.approx([2.0 * i / MAX_ITER for i in range(MAX_ITER)])
    for want, have in zip(expected, got):
        assert have.keys() == want.keys()
        assert {"focal_gamma", "loss_cls", "loss_box_reg", "lr", "num_pos_anchors"} <= want.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (want["iteration"], key)


def test_checkpoint_holds_the_normalizer_outside_the_model_state(runs):
    _, _, _, parts = runs
    checkpoint = torch.load(parts / f"model_{STOP_AFTER - 1:07d}.pth", weights_only=False)
    assert "loss_normalizer" in checkpoint["loss_normalizer"]
    assert not any("normalizer" in k for k in checkpoint["model"])
    assert "ScalarHistory" in checkpoint["trainer"]["hooks"]
    # The drop-in promise: the model's state_dict still loads strictly.
    model = FocalRetinaNet(digits_cfg())
    model.load_state_dict(checkpoint["model"], strict=True)


def test_loading_weights_does_not_restore_the_normalizer(runs, tmp_path):
    """MODEL.WEIGHTS without --resume starts a new run: fresh EMA, iteration 0."""
    _, _, _, parts = runs
    cfg = _cfg(tmp_path, "MODEL.WEIGHTS", str(parts / f"model_{STOP_AFTER - 1:07d}.pth"))
    trainer = FocalTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert not hasattr(trainer.model, "loss_normalizer")
    assert trainer.start_iter == 0


def test_digits_augmentations_are_deterministic():
    """The resume test relies on it: no random flip, one fixed size."""
    cfg = digits_cfg()
    mapper = DatasetMapper(cfg, is_train=True)
    record = DatasetCatalog.get("digits_train_tiny")[0]
    outputs = []
    for seed in (0, 1):
        seed_all_rng(seed)
        outputs.append(mapper(dict(record)))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["instances"].gt_boxes.tensor, outputs[1]["instances"].gt_boxes.tensor)
    assert outputs[0]["image"].shape[1:] == (record["height"], record["width"])


def _image_ids(loader, count):
    it = iter(loader)
    return [[d["image_id"] for d in next(it)] for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("start_iter", [3, 4])
def test_train_loader_resumes_the_data_order(workers, grouping, start_iter):
    cfg = digits_cfg(
        opts=[
            "DATALOADER.NUM_WORKERS", workers,
            "DATALOADER.ASPECT_RATIO_GROUPING", grouping,
            "SOLVER.IMS_PER_BATCH", 3,
            "INPUT.MIN_SIZE_TRAIN", (32,),
            "INPUT.MAX_SIZE_TRAIN", 32,
        ]
    )
    whole = _image_ids(FocalTrainer.build_train_loader(cfg), start_iter + 4)
    resumed = _image_ids(FocalTrainer.build_train_loader(cfg, start_iter=start_iter), 4)
    assert resumed == whole[start_iter:]
