"""
Multi-process training on the CPU with Detectron2's launch (GLOO): with
MODEL.FOCAL.SYNC_NORMALIZER, 2 processes over halves of a batch compute the
gradient of 1 process over the whole batch; FocalTrainer trains (with class
weights) and evaluates with 2 processes.
"""

import json
import os

import pytest
import torch
from conftest import digits_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from focal_det2.data import ensure_generated
from focal_det2.engine import FocalTrainer

NUM_IMAGES = 4
# (SYNC_NORMALIZER, EMA state): "fresh" is the first iteration (EMA at its
# initial 100); "warm" an EMA equal to the foreground count, as later in training.
SETTINGS = [(sync, ema) for sync in (True, False) for ema in ("fresh", "warm")]


def _cfg(output_dir=None, opts=()):
    return digits_cfg(output_dir=output_dir, opts=["SOLVER.IMS_PER_BATCH", NUM_IMAGES, *opts])


def _gradients(model, images, warm_count):
    """
    The DDP-averaged gradient of one training step on ``images`` for every
    entry of SETTINGS, as one flat vector each.
    """
    world = comm.get_world_size()
    ddp = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    grads = {}
    for sync, ema in SETTINGS:
        model.sync_normalizer = sync
        if ema == "warm":
            # Synced, every process averages the global count; else its own share.
            model.loss_normalizer = warm_count if sync else warm_count / world
        elif hasattr(model, "loss_normalizer"):
            del model.loss_normalizer
        model.zero_grad(set_to_none=True)
        with EventStorage(0) as storage:
            losses = ddp(images)
        sum(losses.values()).backward()
        grads[f"{sync}-{ema}"] = torch.cat([p.grad.flatten() for p in model.parameters()])
        grads[f"{sync}-{ema}-foreground"] = storage.history("num_pos_anchors").latest() * len(
            images
        )
        grads[f"{sync}-{ema}-normalizer"] = model.loss_normalizer
    return grads


def _one_process_gradient(model, images, ema):
    """The gradient of one step of ``model`` alone on ``images``, its moving average starting at ``ema`` (None: fresh)."""
    if ema is None:
        if hasattr(model, "loss_normalizer"):
            del model.loss_normalizer
    else:
        model.loss_normalizer = ema
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        losses = model(images)
    sum(losses.values()).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _foreground_count(model, images):
    """The number of foreground anchors of ``images``."""
    with EventStorage(0) as storage, torch.no_grad():
        model(images)
    return round(storage.history("num_pos_anchors").latest() * len(images))


def _synced_normalizer_without_boxes(model, images):
    """The synced moving average after one fresh step on ``images`` with their boxes removed."""
    empty = []
    for image in images:
        instances = image["instances"]
        empty.append(
            {**image, "instances": instances[torch.zeros(len(instances), dtype=torch.bool)]}
        )
    model.sync_normalizer = True
    if hasattr(model, "loss_normalizer"):
        del model.loss_normalizer
    with EventStorage(0), torch.no_grad():
        model(empty)
    return model.loss_normalizer


def _worker(weights, batch_file, out_dir, warm_count):
    """Run in each process of a launch: gradients of this process's share, then a short training run."""
    torch.set_num_threads(1)  # 2 processes on 2 cores
    rank, world = comm.get_rank(), comm.get_world_size()
    model = build_model(_cfg())
    model.load_state_dict(torch.load(weights))
    images = torch.load(batch_file, weights_only=False)
    share = len(images) // world
    grads = _gradients(model, images[rank * share : (rank + 1) * share], warm_count)
    grads["True-fresh-empty-normalizer"] = _synced_normalizer_without_boxes(model, images[:share])
    torch.save(grads, out_dir / f"grads_world{world}_rank{rank}.pt")

    # class-weighted: the weights are counted for the loss of the model inside the DDP wrapper
    opts = ["SOLVER.MAX_ITER", 2, "MODEL.FOCAL.SYNC_NORMALIZER", True]
    cfg = _cfg(out_dir / "train", [*opts, "MODEL.FOCAL.CLASS_WEIGHTING", "effective_number"])
    torch.set_num_threads(7)  # FocalTrainer shares the cores among the processes of the machine
    trainer = FocalTrainer(cfg)
    threads = torch.get_num_threads()
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = FocalTrainer.test(cfg, trainer.model)
    if comm.is_main_process():
        summary = {"world": world, "bbox": results["bbox"], "threads": threads}
        (out_dir / "results.json").write_text(json.dumps(summary))


def _relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    torch.save(model.state_dict(), out_dir / "weights.pth")
    mapper = DatasetMapper(cfg, is_train=True)
    images = [mapper(dict(d)) for d in DatasetCatalog.get("digits_train_tiny")[:NUM_IMAGES]]
    torch.save(images, out_dir / "batch.pth")
    ensure_generated("digits_val_tiny")  # generated once, before the processes start

    warm_count = _foreground_count(model, images)
    one = _gradients(model, images, warm_count)
    # What 2 processes without SYNC_NORMALIZER must average: each half alone, with its
    # own moving average (fresh, or the warm state's share warm_count / 2).
    halves = [images[: NUM_IMAGES // 2], images[NUM_IMAGES // 2 :]]
    one["halves"] = {
        ema: [_one_process_gradient(model, half, start) for half in halves]
        for ema, start in (("fresh", None), ("warm", warm_count / 2))
    }
    one["warm_count"] = warm_count
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")  # GLOO, the CPU path, even on a GPU machine
        launch(
            _worker,
            num_gpus_per_machine=2,
            dist_url="auto",  # tcp://127.0.0.1:<free port>
            args=(out_dir / "weights.pth", out_dir / "batch.pth", out_dir, warm_count),
        )
    two = [torch.load(out_dir / f"grads_world2_rank{r}.pt") for r in range(2)]
    return one, two, out_dir


def test_each_process_normalizes_by_the_closed_form(gradients):
    """
    The moving average (initial 100, momentum 0.9) each process ends the step
    with: of the batch's foreground count with SYNC_NORMALIZER, of its own
    half's without; the warm state starts at the count (synced) or its share.
    """
    one, ranks, _ = gradients
    batch = one["True-fresh-foreground"]
    halves = [rank["True-fresh-foreground"] for rank in ranks]
    assert sum(halves) == batch and halves[0] != halves[1]  # the halves split the batch unevenly
    warm = one["warm_count"]
    assert warm == batch
    for rank, own in zip(ranks, halves):
        assert rank["True-fresh-normalizer"] == pytest.approx(0.9 * 100 + 0.1 * batch, rel=1e-12)
        assert rank["False-fresh-normalizer"] == pytest.approx(0.9 * 100 + 0.1 * own, rel=1e-12)
        assert rank["True-warm-normalizer"] == pytest.approx(0.9 * warm + 0.1 * batch, rel=1e-12)
        assert rank["False-warm-normalizer"] == pytest.approx(0.9 * warm / 2 + 0.1 * own, rel=1e-12)


def test_synced_normalizer_without_foreground_counts_one_anchor(gradients):
    """
    With SYNC_NORMALIZER and no foreground anchor in any process, the synced count is
    taken as 1, as RetinaNet's: every process's fresh moving average is 0.9 * 100 + 0.1 * 1.
    Guards the mutant that drops ``max(total, 1)`` in the synced path (0.9 * 100).
    """
    _, ranks, _ = gradients
    for rank in ranks:
        assert rank["True-fresh-empty-normalizer"] == pytest.approx(0.9 * 100 + 0.1, rel=1e-12)


@pytest.mark.parametrize("ema", ["fresh", "warm"])
def test_synced_normalizer_gives_the_one_process_gradient(gradients, ema):
    one, (two, _), _ = gradients
    assert _relative_difference(two[f"True-{ema}"], one[f"True-{ema}"]) < 1e-5


@pytest.mark.parametrize("ema", ["fresh", "warm"])
def test_without_sync_each_process_normalizes_its_half(gradients, ema):
    """Off, DDP averages the gradients of the halves, each over its own moving average."""
    one, (two, _), _ = gradients
    expected = sum(one["halves"][ema]) / 2
    assert _relative_difference(two[f"False-{ema}"], expected) < 1e-5


def test_without_sync_two_processes_differ(gradients):
    """What SYNC_NORMALIZER changes: the README quotes these numbers."""
    one, (two, other), _ = gradients
    diff = {
        ema: _relative_difference(two[f"False-{ema}"], one[f"False-{ema}"])
        for ema in ("fresh", "warm")
    }
    synced = {
        ema: _relative_difference(two[f"True-{ema}"], one[f"True-{ema}"])
        for ema in ("fresh", "warm")
    }
    counts = [
        one["True-fresh-foreground"],
        two["True-fresh-foreground"],
        other["True-fresh-foreground"],
    ]
    print(f"\nforeground anchors: batch, process 0, process 1: {counts}")
    print(
        f"1 vs 2 processes, relative gradient difference: SYNC_NORMALIZER off {diff}, on {synced}"
    )
    assert counts == [137, 88, 49]
    # Off, one process's gradient does not depend on the setting: with 1 process there is nothing to sync.
    torch.testing.assert_close(one["False-fresh"], one["True-fresh"], rtol=0, atol=0)
    # README: 0.467 fresh (each process divides its half by ~100, a count made for the whole
    # batch: about half the gradient), 0.0208 warm (the foreground splits 88 / 49).
    assert diff["fresh"] == pytest.approx(0.467, abs=0.002)
    assert diff["warm"] == pytest.approx(0.0208, abs=0.0005)


def test_two_processes_train_and_evaluate(gradients):
    _, _, out_dir = gradients
    results = json.loads((out_dir / "results.json").read_text())
    assert results["world"] == 2
    assert results["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert {"AP", "AP50", "AP75"} <= results["bbox"].keys()
    final = torch.load(out_dir / "train" / "model_final.pth", weights_only=False)
    assert len(final["class_weights"]["weights"]) == 10  # one per digit class
    rows = [
        json.loads(line) for line in (out_dir / "train" / "metrics.json").read_text().splitlines()
    ]
    assert [r["iteration"] for r in rows if "loss_cls" in r][-1] == 1
