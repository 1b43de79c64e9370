"""
Exact resume: a run stopped after iteration k and continued with --resume
ends with the weights and metrics.json values of an uninterrupted run, bit
for bit: with 1 process past the 20-iteration window of the smoothed
scalars and killed two iterations after its checkpoint, and with 2
processes (GLOO, CPU).
"""

import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import digits_cfg, logged, metrics_records
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase, hooks, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from focal_det2.data import ensure_generated
from focal_det2.engine import (
    FocalTrainer,
    ResumableTrainingSampler,
    ResumableTrainLoader,
    ScalarHistory,
    drop_metrics_from,
)
from focal_det2.modeling import FocalRetinaNet

# Checkpointed after more iterations than the writers' 20-iteration median window
# (Detectron2's default), so the resumed medians need the checkpointed history; killed
# 2 iterations later, after metrics.json has their records, which the resume trains again.
WINDOW = 20
MAX_ITER, STOP_AFTER, KILLED_AFTER = 25, 22, 24


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


def _cfg(output_dir, *opts, max_iter=MAX_ITER, stop_after=STOP_AFTER):
    cfg = digits_cfg(
        "soft_gamma_R18_FPN_1x",
        output_dir,
        [
            "SOLVER.MAX_ITER",
            max_iter,
            "SOLVER.CHECKPOINT_PERIOD",
            stop_after,
            "SOLVER.WARMUP_ITERS",
            2,
            "SOLVER.STEPS",
            (max_iter - 2,),  # the learning rate drops after the resume
            "MODEL.FOCAL.GAMMA_SCHEDULE.ITERS",
            max_iter,  # gamma changes every iteration
            "DATASETS.TEST",
            (),
            "INPUT.MIN_SIZE_TRAIN",
            (64,),  # the digits canvases, downscaled: faster
            "INPUT.MAX_SIZE_TRAIN",
            64,
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole, parts = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("parts")
    uninterrupted = _train(_cfg(whole))
    _train(_cfg(parts), stop_after=KILLED_AFTER)
    # the killed run wrote records past its checkpoint, which the resume trains again
    assert [r["iteration"] for r in metrics_records(parts)] == list(range(KILLED_AFTER))
    resumed = _train(_cfg(parts), resume=True)
    return uninterrupted, resumed, whole, parts


def test_resumed_run_starts_after_the_checkpoint(runs):
    _, resumed, _, parts = runs
    assert resumed.start_iter == STOP_AFTER
    assert (parts / f"model_{STOP_AFTER - 1:07d}.pth").exists()


def _assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_resume_ends_with_the_same_weights(runs):
    uninterrupted, resumed, _, _ = runs
    _assert_same_weights(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert resumed.model.loss_normalizer == uninterrupted.model.loss_normalizer


def _assert_same_metrics(got, expected, max_iter=MAX_ITER):
    assert [r["iteration"] for r in expected] == list(range(max_iter))
    assert [r["iteration"] for r in got] == list(range(max_iter))
    for want, have in zip(expected, got):
        assert {"focal_gamma", "loss_cls", "loss_box_reg", "lr", "num_pos_anchors"} <= want.keys()
        assert have == want, want["iteration"]


def test_resume_writes_the_same_metrics(runs):
    """
    Guards the mutant: ``ScalarHistory`` window 20 -> 3 (the medians written
    after a resume would lose the iterations before the last 3).
    """
    _, _, whole, parts = runs
    expected, got = metrics_records(whole), metrics_records(parts)
    gammas = [r["focal_gamma"] for r in expected]
    # gamma(i) = 2 i / MAX_ITER, logged unsmoothed.
    assert gammas == pytest.approx([2.0 * i / MAX_ITER for i in range(MAX_ITER)])
    _assert_same_metrics(got, expected)


def test_drop_metrics_from_keeps_earlier_records_and_the_open_writer_appends(tmp_path):
    """The records of iterations >= 2 and a last line cut short go; the writer appends after."""
    path = tmp_path / "metrics.json"
    records = [{"iteration": i, "loss": i / 10} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 4, "lo')
    writer = open(path, "a")  # as Detectron2's JSONWriter holds it
    drop_metrics_from(str(path), 2)
    writer.write(json.dumps({"iteration": 2, "loss": 0.5}) + "\n")
    writer.close()
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got == records[:2] + [{"iteration": 2, "loss": 0.5}]
    # every complete record kept: the cut-off line still goes
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 4, "lo')
    drop_metrics_from(str(path), 4)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records)
    drop_metrics_from(str(tmp_path / "absent.json"), 0)  # no file: nothing to do


@pytest.mark.parametrize("killed_attempt", [False, True])
def test_drop_metrics_from_keeps_the_final_evaluation_of_an_extended_run(tmp_path, killed_attempt):
    """A finished 3-iteration run's evaluation (at iteration 3) stays; an extension's records go."""
    path = tmp_path / "metrics.json"
    run = [{"iteration": i, "total_loss": 1.0} for i in range(3)] + [
        {"iteration": 3, "bbox/AP": 50.0}
    ]
    attempt = [{"iteration": i, "total_loss": 0.5} for i in (3, 4)] if killed_attempt else []
    path.write_text("".join(json.dumps(r) + "\n" for r in run + attempt))
    drop_metrics_from(str(path), 3, keep_final_evaluation=True)
    assert [json.loads(line) for line in path.read_text().splitlines()] == run
    drop_metrics_from(str(path), 3)  # resuming the finished run itself evaluates it again
    assert [json.loads(line) for line in path.read_text().splitlines()] == run[:3]
    path.write_text("".join(json.dumps(r) + "\n" for r in run[:3] + attempt))
    drop_metrics_from(str(path), 3, keep_final_evaluation=True)  # killed in its final evaluation
    assert [json.loads(line) for line in path.read_text().splitlines()] == run[:3]
    # evaluated again by a resume of the finished run, which Detectron2 writes at MAX_ITER + 1
    again = run[:3] + [{"iteration": 4, "bbox/AP": 50.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in again + attempt))
    drop_metrics_from(str(path), 3, keep_final_evaluation=True)
    assert [json.loads(line) for line in path.read_text().splitlines()] == again


def test_a_run_is_finished_when_its_final_evaluation_is_recorded(tmp_path):
    """A run resumed after its last iteration is finished once its final evaluation is in
    metrics.json (a record without total_loss at MAX_ITER or later), or when it evaluates
    nothing; killed during its final evaluation, it is not (the resume evaluates it)."""
    from focal_det2.engine import finished_run

    trained = [{"iteration": i, "total_loss": 1.0} for i in range(3)]
    path = tmp_path / "metrics.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in trained))
    assert not finished_run(str(tmp_path), 3, 3, evaluates=True)  # killed in its evaluation
    assert finished_run(str(tmp_path), 3, 3, evaluates=False)
    assert not finished_run(str(tmp_path), 2, 3, evaluates=False)  # one iteration left
    path.write_text(path.read_text() + '{"iteration": 3, "bbox/AP": 5.0')  # cut short
    assert not finished_run(str(tmp_path), 3, 3, evaluates=True)
    for iteration in (3, 4):  # Detectron2's MAX_ITER, or MAX_ITER + 1 after a resume
        evaluated = trained + [{"iteration": iteration, "bbox/AP": 5.0}]
        path.write_text("".join(json.dumps(r) + "\n" for r in evaluated))
        assert finished_run(str(tmp_path), 3, 3, evaluates=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in trained[:2] + [{"iteration": 2}]))
    assert not finished_run(str(tmp_path), 3, 3, evaluates=True)  # an earlier evaluation
    assert not finished_run(str(tmp_path / "none"), 3, 3, evaluates=True)  # no metrics.json
    longer = [{"iteration": i, "total_loss": 1.0} for i in range(5)]  # training, not evaluation
    path.write_text("".join(json.dumps(r) + "\n" for r in longer))
    assert not finished_run(str(tmp_path), 3, 3, evaluates=True)


def test_only_a_resume_from_model_final_to_a_larger_max_iter_extends_a_finished_run():
    from focal_det2.engine import extends_finished_run

    assert extends_finished_run("out/model_final.pth", 600, 1000)
    assert not extends_finished_run("out/model_final.pth", 600, 600)  # evaluates it again
    assert not extends_finished_run("out/model_0000599.pth", 600, 1000)  # an interrupted run
    assert not extends_finished_run("other/model_final.pth", 0, 1000)  # MODEL.WEIGHTS: a new run


def test_drop_metrics_from_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "metrics.json"
    for bad in ('{"loss": 1.0}', "{not json", '{"iteration": "two"}', '{"iteration": null}'):
        path.write_text('{"iteration": 0}\n' + bad + "\n")
        with pytest.raises(ValueError, match=r"metrics.json, line 2: not a metrics record"):
            drop_metrics_from(str(path), 0)


def test_resume_before_the_first_checkpoint_starts_metrics_afresh(tmp_path):
    """
    --resume without a checkpoint trains from iteration 0: the killed attempt's records go, and
    nothing is said of a resumed data order (SEED < 0 draws one anyway, from iteration 0).
    """
    (tmp_path / "metrics.json").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    trainer = FocalTrainer(_cfg(tmp_path, "SEED", -1))
    with logged(logging.getLogger("focal_det2.engine")) as warnings:
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0 and (tmp_path / "metrics.json").read_text() == ""
    assert [w.getMessage() for w in warnings] == []


def test_the_window_matters_after_the_resume(runs):
    """
    What makes the resume test above sensitive to the history: the loss
    written at the first resumed iteration is the median of the last 20
    raw values, which differs from the median of the values since the resume.
    """
    uninterrupted, _, whole, _ = runs
    raw = [v for v, _ in uninterrupted.storage.history("loss_cls").values()]
    assert len(raw) == MAX_ITER
    written = metrics_records(whole)[STOP_AFTER]["loss_cls"]
    assert written == pytest.approx(float(np.median(raw[STOP_AFTER + 1 - WINDOW : STOP_AFTER + 1])))
    assert written != pytest.approx(raw[STOP_AFTER])


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
    assert torch.equal(
        outputs[0]["instances"].gt_boxes.tensor, outputs[1]["instances"].gt_boxes.tensor
    )
    assert outputs[0]["image"].shape[1:] == (record["height"], record["width"])


def test_negative_skip_and_start_iter_are_refused_naming_them():
    """
    ``ResumableTrainingSampler(skip=-1)`` and ``ResumableTrainLoader(start_iter=-1)``
    raise at once, naming the argument, and so does setting ``start_iter`` to -1 later.
    Guards the mutants that drop the ``skip < 0`` and ``value < 0`` checks (islice's
    error on first iteration, or ``skip=-2`` named instead of start_iter).
    """
    with pytest.raises(ValueError, match=re.escape("skip=-1 must be >= 0")):
        ResumableTrainingSampler(10, skip=-1, seed=0)
    sizes = dict(batch_size=1, workers=0, grouping="")
    with pytest.raises(ValueError, match=re.escape("start_iter=-1 must be >= 0")):
        ResumableTrainLoader([], None, **sizes, start_iter=-1)
    loader = ResumableTrainLoader([], None, **sizes)
    with pytest.raises(ValueError, match=re.escape("start_iter=-3 must be >= 0")):
        loader.start_iter = -3
    assert loader.start_iter == 0


def test_start_iter_set_after_the_loader_was_iterated_is_refused():
    """
    The data order is fixed when the loader is first iterated: a ``start_iter`` set later
    (a ``resume_or_load`` after the first batch) would be silently unread, and the resumed
    run's batches would start at iteration 0. Guards the mutant that drops the check.
    """
    loader = FocalTrainer.build_train_loader(digits_cfg())
    loader.start_iter = 3  # before the first iteration: read
    iter(loader)
    with pytest.raises(RuntimeError, match="start_iter is read when the loader is first iterated"):
        loader.start_iter = 5
    assert loader.start_iter == 3


def test_scalar_history_keeps_exactly_the_last_window_iterations():
    """
    ``ScalarHistory(window_size=3)`` checkpoints each scalar's values of the last 3
    iterations (iteration > last - 3), and a fresh hook puts exactly those back into a
    resumed run's storage. Guards the mutant ``>=`` for ``>`` (a window of 4 iterations).
    """
    before = EventStorage(0)
    for it in range(10):
        before.iter = it
        before.put_scalar("loss_cls", float(it) / 2)
        if it % 2:
            before.put_scalar("odd", float(it))
    hook = ScalarHistory(window_size=3)
    hook.trainer = SimpleNamespace(storage=before)
    state = hook.state_dict()
    assert state == {
        "scalars": {"loss_cls": [(3.5, 7), (4.0, 8), (4.5, 9)], "odd": [(7.0, 7), (9.0, 9)]}
    }

    resumed = ScalarHistory(window_size=3)
    resumed.load_state_dict(state)
    resumed.trainer = SimpleNamespace(storage=EventStorage(10))
    resumed.before_train()
    histories = resumed.trainer.storage.histories()
    assert histories["loss_cls"].values() == [(3.5, 7), (4.0, 8), (4.5, 9)]
    assert histories["odd"].values() == [(7.0, 7), (9.0, 9)]


def _image_ids(loader, count):
    it = iter(loader)
    return [[d["image_id"] for d in next(it)] for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("start_iter", [3, 4])
def test_train_loader_resumes_the_data_order(workers, grouping, start_iter):
    cfg = digits_cfg(
        opts=[
            "DATALOADER.NUM_WORKERS",
            workers,
            "DATALOADER.ASPECT_RATIO_GROUPING",
            grouping,
            "SOLVER.IMS_PER_BATCH",
            3,
            "INPUT.MIN_SIZE_TRAIN",
            (32,),
            "INPUT.MAX_SIZE_TRAIN",
            32,
        ]
    )
    whole = _image_ids(FocalTrainer.build_train_loader(cfg), start_iter + 4)
    resumed = _image_ids(FocalTrainer.build_train_loader(cfg, start_iter=start_iter), 4)
    assert resumed == whole[start_iter:]


@pytest.mark.parametrize(
    "first, warning",
    [
        ({}, None),
        ({"height": 127}, "with landscape and portrait images"),  # the others are 128 x 128
        ({"height": None}, "with records without width and height"),
    ],
    ids=["square", "one landscape", "one without size"],
)
def test_resumed_loader_warns_when_grouping_mixes_orientations(first, warning, caplog):
    """A landscape image among the square digits: grouped batches cannot resume exactly."""
    cfg = digits_cfg(opts=["DATALOADER.ASPECT_RATIO_GROUPING", True])
    for start_iter in (2, 0):  # not resumed (0), there is no order to continue: no warning
        loader = FocalTrainer.build_train_loader(cfg, start_iter=start_iter)
        record = {**loader.dataset[0], **first}
        loader.dataset[0] = {k: v for k, v in record.items() if v is not None}
        caplog.clear()
        with caplog.at_level("WARNING", logger="focal_det2.engine"):
            loader._build()
        warned = [r.message for r in caplog.records if "ASPECT_RATIO_GROUPING" in r.message]
        assert len(warned) == (warning is not None and start_iter > 0), start_iter
        assert not warned or warning in warned[0]


def test_train_loader_from_iteration_0_is_detectron2s_seeded_stream():
    """
    Not resumed, the loader yields the batches of Detectron2's own train loader with a
    ``TrainingSampler(seed=SEED)``: the resume test above compares the loader with itself, so
    this guards the mutants that shift or reseed both alike (a remainder one too large, the
    sampler seeded with SEED + 1).
    """
    cfg = digits_cfg(
        opts=[
            "DATALOADER.NUM_WORKERS",
            0,
            "DATALOADER.ASPECT_RATIO_GROUPING",
            False,
            "SOLVER.IMS_PER_BATCH",
            3,
            "INPUT.MIN_SIZE_TRAIN",
            (32,),
            "INPUT.MAX_SIZE_TRAIN",
            32,
        ]
    )
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    detectron2_loader = build_detection_train_loader(
        cfg,
        dataset=dataset,
        mapper=DatasetMapper(cfg, is_train=True),
        sampler=TrainingSampler(len(dataset), seed=cfg.SEED),
    )
    assert _image_ids(FocalTrainer.build_train_loader(cfg), 6) == _image_ids(detectron2_loader, 6)


def test_another_sampler_is_detectron2s_and_its_resume_warns():
    """
    DATALOADER.SAMPLER_TRAIN other than TrainingSampler: the loader is Detectron2's own, with
    that sampler (here repeat-factor sampling, whose stream differs from TrainingSampler's);
    resumed, it says that its data order restarts.
    """
    opts = ["DATALOADER.NUM_WORKERS", 0, "DATALOADER.ASPECT_RATIO_GROUPING", False]
    opts += ["SOLVER.IMS_PER_BATCH", 3, "INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MAX_SIZE_TRAIN", 32]
    plain = digits_cfg(opts=opts)
    repeat = ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"]
    cfg = digits_cfg(opts=opts + repeat + ["DATALOADER.REPEAT_THRESHOLD", 1.0])
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    detectron2_loader = build_detection_train_loader(
        cfg, dataset=dataset, mapper=DatasetMapper(cfg, is_train=True)
    )
    with logged(logging.getLogger("focal_det2.engine")) as warnings:
        ours = _image_ids(FocalTrainer.build_train_loader(cfg), 6)
    assert [w.getMessage() for w in warnings] == []  # not resumed: nothing restarts
    assert ours == _image_ids(detectron2_loader, 6)
    assert ours != _image_ids(FocalTrainer.build_train_loader(plain), 6)
    with logged(logging.getLogger("focal_det2.engine")) as warnings:
        _image_ids(FocalTrainer.build_train_loader(cfg, start_iter=2), 1)
    assert any(
        "SAMPLER_TRAIN=RepeatFactorTrainingSampler: the resumed run restarts" in w.getMessage()
        for w in warnings
    )


# ----------------------------------------------------------------------------- 2 processes

TWO_PROCESS_MAX_ITER, TWO_PROCESS_STOP_AFTER = 6, 3


def _two_process_cfg(output_dir, sync_normalizer=True):
    return _cfg(
        output_dir,
        "SOLVER.IMS_PER_BATCH",
        4,  # 2 images a process
        "MODEL.FOCAL.SYNC_NORMALIZER",
        sync_normalizer,  # on: what an exact multi-process resume needs
        max_iter=TWO_PROCESS_MAX_ITER,
        stop_after=TWO_PROCESS_STOP_AFTER,
    )


def _resume_worker(out_dir):
    """
    Run in each process of a launch: an uninterrupted run, a stopped one, its resume; then
    the stopped run's resume (in a copy) without the synced normaliser, for its warning.
    """
    whole = _train(_two_process_cfg(out_dir / "whole"))
    _train(_two_process_cfg(out_dir / "parts"), stop_after=TWO_PROCESS_STOP_AFTER)
    comm.synchronize()  # process 0 has written the checkpoint
    if comm.is_main_process():
        shutil.copytree(out_dir / "parts", out_dir / "unsynced")  # the stopped run, to resume
    comm.synchronize()
    with logged(logging.getLogger("focal_det2.engine")) as synced_warnings:
        resumed = _train(_two_process_cfg(out_dir / "parts"), resume=True)
    with logged(logging.getLogger("focal_det2.engine")) as unsynced_warnings:
        _Trainer(_two_process_cfg(out_dir / "unsynced", False)).resume_or_load(resume=True)
    state = {
        "warnings": {
            "synced": [r.getMessage() for r in synced_warnings],
            "unsynced": [r.getMessage() for r in unsynced_warnings],
        }
    }
    for name, trainer in (("whole", whole), ("resumed", resumed)):
        model = trainer.checkpointer.model  # without the DDP wrapper
        state[name] = {
            "model": model.state_dict(),
            "loss_normalizer": model.loss_normalizer,
            "start_iter": trainer.start_iter,
            "world": comm.get_world_size(),
            "foreground": trainer.storage.history("num_pos_anchors").values(),
        }
    torch.save(state, out_dir / f"rank{comm.get_rank()}.pt")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("resume2")
    ensure_generated("digits_train_tiny")  # generated once, before the processes start
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")  # GLOO, the CPU path, even on a GPU machine
        launch(_resume_worker, num_gpus_per_machine=2, dist_url="auto", args=(out_dir,))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)], out_dir


def test_two_processes_resume_to_the_same_weights(two_process_runs):
    """
    Guards the mutants: the normaliser's checkpointable registered on the DDP
    wrapper (``self.model``) instead of the bare model (``loss_normalizer``
    silently not saved); ``ResumableTrainingSampler`` skip computed with
    ``per_process = IMS_PER_BATCH``, ignoring the world size (the resumed run
    continues at the wrong place in the data stream).
    """
    ranks, _ = two_process_runs
    for rank in ranks:
        whole, resumed = rank["whole"], rank["resumed"]
        assert whole["world"] == 2 and resumed["start_iter"] == TWO_PROCESS_STOP_AFTER
        _assert_same_weights(resumed["model"], whole["model"])
        assert resumed["loss_normalizer"] == whole["loss_normalizer"]
    # DDP keeps the processes' weights equal; the synced normaliser, their moving averages.
    _assert_same_weights(ranks[1]["resumed"]["model"], ranks[0]["resumed"]["model"])
    assert ranks[1]["resumed"]["loss_normalizer"] == ranks[0]["resumed"]["loss_normalizer"]


def test_two_process_resume_warns_only_without_the_synced_normalizer(two_process_runs):
    ranks, _ = two_process_runs
    for rank in ranks:
        said = {
            k: any("SYNC_NORMALIZER is off" in m for m in v) for k, v in rank["warnings"].items()
        }
        assert said == {"synced": False, "unsynced": True}


def test_two_processes_resume_to_the_same_metrics(two_process_runs):
    _, out_dir = two_process_runs
    _assert_same_metrics(
        metrics_records(out_dir / "parts"), metrics_records(out_dir / "whole"), TWO_PROCESS_MAX_ITER
    )


def test_two_process_checkpoint_holds_the_normalizer(two_process_runs):
    ranks, out_dir = two_process_runs
    checkpoint = torch.load(
        out_dir / "parts" / f"model_{TWO_PROCESS_STOP_AFTER - 1:07d}.pth", weights_only=False
    )
    saved = checkpoint["loss_normalizer"]["loss_normalizer"]
    # The synced moving average after the stopped run's iterations, from the initial 100 with
    # momentum 0.9, over the batch's foreground count: each process logs its own per-image count.
    per_image = [[v for v, _ in rank["whole"]["foreground"]] for rank in ranks]
    expected = 100.0
    for i in range(TWO_PROCESS_STOP_AFTER):
        count = sum(2 * rank_counts[i] for rank_counts in per_image)  # 2 images a process
        expected = 0.9 * expected + 0.1 * max(count, 1)
    assert saved == pytest.approx(expected, rel=1e-12)


def test_resume_checks_the_training_data_once(runs, tmp_path, monkeypatch):
    """
    Guards the old behaviour: DefaultTrainer built the train loader (loading and
    checking every record) and ``--resume`` built it again at the start iteration.
    """
    from focal_det2.data import checks

    _, _, _, parts = runs
    run = tmp_path / "run"
    shutil.copytree(parts, run)
    (run / "last_checkpoint").write_text(f"model_{STOP_AFTER - 1:07d}.pth")  # the interrupted run's
    calls = []
    load = checks.load_checked_dataset_dicts
    monkeypatch.setattr(
        checks, "load_checked_dataset_dicts", lambda *a, **k: calls.append(a) or load(*a, **k)
    )
    trainer = FocalTrainer(_cfg(run))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == STOP_AFTER
    assert len(calls) == 1 and trainer.data_loader.start_iter == STOP_AFTER
    next(iter(trainer.data_loader))
    with pytest.raises(RuntimeError, match="already"):
        trainer.data_loader.start_iter = 0


def test_ddp_replacement_is_undone_on_exit_and_on_error():
    """The one replacement of a Detectron2 function lives only inside ``ddp_device_ids_by_device``."""
    from detectron2.engine import defaults

    from focal_det2.engine import ddp_device_ids_by_device

    original = defaults.create_ddp_model
    with ddp_device_ids_by_device():
        assert defaults.create_ddp_model is not original
        model = torch.nn.Linear(2, 2)
        assert (
            defaults.create_ddp_model(model, broadcast_buffers=False) is model
        )  # 1 process: no wrapper
    assert defaults.create_ddp_model is original
    with pytest.raises(_Interrupted), ddp_device_ids_by_device():
        raise _Interrupted
    assert defaults.create_ddp_model is original


@pytest.mark.parametrize("seed", [-1, 0])
def test_resume_with_a_random_seed_warns_of_a_new_data_order(tmp_path, seed):
    """
    With SEED < 0 the resumed run draws a new shared random seed, so it cannot continue the
    checkpoint's data order, and ``resume_or_load`` says so; with a fixed SEED it does not.
    Guards the mutants that drop the warning or test ``SEED <= 0``.
    """
    from focal_det2 import engine

    cfg = digits_cfg(output_dir=tmp_path)
    cfg.SEED = seed
    saved = engine.FocalTrainer(cfg)
    saved.iter = 2
    saved.checkpointer.save("model_0000002")  # and last_checkpoint, as a run at iteration 2
    trainer = engine.FocalTrainer(cfg)
    with logged(engine.logger) as records:
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    warned = [r.getMessage() for r in records]
    assert warned == (["SEED < 0: the resumed run draws a new data order."] if seed < 0 else [])
