"""
Benchmark of a whole training step: focal_det2's FocalRetinaNet against
Detectron2's own RetinaNet, same config, same weights, same inputs.

Inputs (``--inputs``):

* ``digits``: ``configs/digits/sigmoid_focal_R18_FPN_1x.yaml`` (ResNet-18-FPN
  GN, 10 classes) on the first batch of ``digits_train`` (8 images of 128 px),
  mapped by Detectron2's training ``DatasetMapper``;
* ``coco800``: ``configs/coco/sigmoid_focal_R50_FPN_1x.yaml`` (ResNet-50-FPN,
  80 classes; random weights, since nothing is downloaded, with the FrozenBN
  statistics calibrated on the batch as pretrained ones would be) on 2 synthetic
  800 x 1216 images with 7 random boxes each (a COCO-sized batch of one GPU:
  365k anchors x 80 classes, 29M logits).

Each (model, input) runs in a fresh subprocess, which builds Detectron2's
RetinaNet with seed 0 and, for ``focal``, loads its state_dict strictly into
FocalRetinaNet (the sigmoid loss with the defaults computes what RetinaNet
computes; the first step's losses are reported for both to show it). The
step is Detectron2's ``SimpleTrainer.run_step`` (forward, the loss dict's
sum, backward, the solver's SGD step, metrics) on the same batch every
iteration, so data loading is not timed; ``SOLVER.BASE_LR`` is 0, so the
weights, and with them the work of every iteration, stay the same. Timed with ``time.perf_counter``
(after ``torch.cuda.synchronize`` on a GPU): median seconds per iteration
after ``--warmup`` untimed iterations. Memory: on a GPU, the peak of
``torch.cuda.max_memory_allocated`` over the timed iterations; on the CPU,
the peak resident set size (VmHWM) of the timed iterations, and its rise
over the resident size before them (the step's temporaries). The models
alternate (stock, focal, focal, stock, ...) over ``--rounds`` rounds.

Usage::

    python benchmarks/bench_train.py                  # CPU, both inputs, ~25 min on 2 cores
    python benchmarks/bench_train.py --device cuda
    python benchmarks/bench_train.py --inputs digits --rounds 1 --iters 3 --warmup 1
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    REPO,
    machine_info,
    require_cuda,
    reset_peak_rss,
    rss_kb,
    run_child_once,
    wait_for_idle_cpu,
)

MODELS = {
    "stock": "Detectron2 RetinaNet (fvcore sigmoid_focal_loss_jit on one-hot targets)",
    "focal": "focal_det2 FocalRetinaNet, MODEL.FOCAL.LOSS sigmoid_focal (fused)",
}
INPUTS = {
    "digits": "configs/digits/sigmoid_focal_R18_FPN_1x.yaml",
    "coco800": "configs/coco/sigmoid_focal_R50_FPN_1x.yaml",
}
COCO_SIZE, COCO_IMAGES, COCO_BOXES = (800, 1216), 2, 7


# ----------------------------------------------------------------------------- child


def _cfg(inputs: str, device: str, amp: bool = False):
    from focal_det2.config import load_config

    # LR 0: the SGD step does the same arithmetic, and the weights stay fixed, so every
    # iteration does the same work (and random R-50 weights under FrozenBN do not diverge).
    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", 0.0]
    return load_config(str(REPO / INPUTS[inputs]), opts + ["SOLVER.AMP.ENABLED", amp])


def _batch(inputs: str, cfg):
    """The list of dicts one training step consumes, as Detectron2's data loader yields it."""
    import torch
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.structures import Boxes, Instances

    if inputs == "digits":
        mapper = DatasetMapper(cfg, is_train=True)
        dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: cfg.SOLVER.IMS_PER_BATCH]
        return [mapper(d) for d in dicts]
    g = torch.Generator().manual_seed(0)
    h, w = COCO_SIZE
    batch = []
    for _ in range(COCO_IMAGES):
        xy = torch.rand(COCO_BOXES, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(COCO_BOXES, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(
            0, cfg.MODEL.RETINANET.NUM_CLASSES, (COCO_BOXES,), generator=g
        )
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _calibrate_frozen_bn(model, batch):
    """
    Sets every FrozenBatchNorm2d's statistics to those of its input on ``batch``,
    layer after layer, as pretrained statistics would normalise it. Random
    weights under identity FrozenBN statistics blow activations up (loss_cls
    around 1e6 for ResNet-50); calibrated, the first step's losses look like
    those of a model started from ImageNet weights.
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.zero_()

    handles = [
        m.register_forward_pre_hook(set_stats)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    if handles:
        with torch.no_grad():
            model.backbone(model.preprocess_image(batch).tensor)
    for h in handles:
        h.remove()


def _build(model_name: str, cfg, batch):
    """
    Detectron2's RetinaNet with seed 0 (FrozenBN calibrated on ``batch``); for
    "focal", FocalRetinaNet with its weights.
    """
    import torch
    from detectron2.modeling import build_model

    import focal_det2  # noqa: F401  registers FocalRetinaNet

    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    torch.manual_seed(0)
    stock = build_model(stock_cfg)
    _calibrate_frozen_bn(stock, batch)
    if model_name == "stock":
        return stock
    model = build_model(cfg)
    model.load_state_dict(stock.state_dict(), strict=True)
    return model


def run_child(
    model_name: str, inputs: str, device: str, iters: int, warmup: int, amp: bool = False
) -> dict:
    """
    Times ``iters`` training steps of one model on one input in this (fresh)
    process; with ``amp``, Detectron2's ``AMPTrainer`` (SOLVER.AMP.ENABLED), as
    ``DefaultTrainer`` picks it.
    """
    import torch
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    cfg = _cfg(inputs, device, amp)
    batch = _batch(inputs, cfg)
    model = _build(model_name, cfg, batch)
    trainer = (AMPTrainer if amp else SimpleTrainer)(
        model, iter(lambda: batch, None), build_optimizer(cfg, model)
    )
    cuda = device.startswith("cuda")
    select_gpu(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    result = {
        "model": model_name,
        "inputs": inputs,
        "device": device,
        "amp": amp,
        "threads": torch.get_num_threads(),
    }
    times, losses = [], {}
    with EventStorage(0) as storage:
        for i in range(warmup + iters):
            if i == warmup:  # the timed iterations start: reset the memory peaks
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                baseline_kb = rss_kb("VmRSS")
                peak_reset = reset_peak_rss()
            sync()
            start = time.perf_counter()
            storage.iter = i
            trainer.iter = i
            trainer.run_step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if i == 0:
                losses = {
                    k: round(v.median(1), 6)
                    for k, v in storage.histories().items()
                    if k.startswith("loss")
                }
    result["first_step_losses"] = losses
    result["s_per_iter"] = statistics.median(times)
    result["times"] = [round(t, 4) for t in times]
    if cuda:
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = rss_kb("VmHWM") / 1024 if peak_reset else None
        result["step_extra_mb"] = (rss_kb("VmHWM") - baseline_kb) / 1024 if peak_reset else None
    return result


# ----------------------------------------------------------------------------- parent


def select_gpu(device: str):
    """
    ``cuda:N``: GPU N becomes the current device, whose syncs and memory peaks
    are measured; ``cuda`` keeps the current one (``set_device`` needs an
    index); ``cpu`` changes nothing.
    """
    import torch

    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)


def default_iters(inputs: str, device: str) -> int:
    """Timed iterations per process: 50 on a GPU; 20 (digits) or 5 (coco800) on the CPU."""
    return 50 if device.startswith("cuda") else 20 if inputs == "digits" else 5


def run_in_subprocess(model_name: str, inputs: str, args) -> dict:
    """Runs :func:`run_child` in a fresh process (after waiting for an idle CPU, on the CPU)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        model_name,
        "--inputs",
        inputs,
        "--device",
        args.device,
        "--iters",
        str(args.iters or default_iters(inputs, args.device)),
        "--warmup",
        str(args.warmup),
    ]
    cmd += ["--amp"] * args.amp
    if not args.device.startswith("cuda"):
        wait_for_idle_cpu(args.max_wait)
    return run_child_once(cmd, dict(os.environ))


def summarize(results, inputs_list):
    """Per input and model: median s/it over rounds, it/s, peak memory; stock/focal speed-up."""
    rows = []
    for inputs in inputs_list:
        per_model = {}
        for model in MODELS:
            runs = [r for r in results if r["inputs"] == inputs and r["model"] == model]
            if not runs:
                continue
            s = statistics.median(r["s_per_iter"] for r in runs)
            mem = [r["peak_mb"] for r in runs if r.get("peak_mb") is not None]
            extra = [r["step_extra_mb"] for r in runs if r.get("step_extra_mb") is not None]
            per_model[model] = {
                "inputs": inputs,
                "model": model,
                "s_per_iter": s,
                "it_per_s": 1 / s,
                "round_s_per_iter": [round(r["s_per_iter"], 4) for r in runs],
                "peak_mb": max(mem) if mem else None,
                "step_extra_mb": max(extra) if extra else None,
                "first_step_losses": runs[0]["first_step_losses"],
            }
        if set(per_model) == set(MODELS):
            stock, focal = per_model["stock"], per_model["focal"]
            focal["speedup_vs_stock"] = stock["s_per_iter"] / focal["s_per_iter"]
            if stock["peak_mb"] and focal["peak_mb"]:
                focal["peak_vs_stock"] = focal["peak_mb"] / stock["peak_mb"]
        rows += per_model.values()
    return rows


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def _iters(iters) -> str:
    """Timed iterations per input, as recorded: ``{"digits": 20, "coco800": 5}`` (older runs: one value)."""
    return (
        ", ".join(f"{v} ({k})" for k, v in iters.items()) if isinstance(iters, dict) else str(iters)
    )


def report(data) -> str:
    info, cfg = data["machine"], data["config"]
    device = (
        cfg["device"]
        if not cfg["device"].startswith("cuda")
        else f"{cfg['device']} ({info.get('gpu')})"
    )
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"device {device}{', AMP (AMPTrainer)' if cfg.get('amp') else ''}, commit {info['commit']}; median of {_iters(cfg['iters'])} iterations after {cfg['warmup']} "
        f"warm-up, {cfg['rounds']} rounds (a fresh process each).",
        "",
        "| input | model | s/it | it/s | speed-up vs stock | peak MB | step extra MB | loss_cls, loss_box_reg (1st step) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in data["summary"]:
        losses = r["first_step_losses"]
        lines.append(
            f"| {r['inputs']} | {r['model']} | {r['s_per_iter']:.3f} | {r['it_per_s']:.2f} | "
            f"{_fmt(r.get('speedup_vs_stock'), '.2f')}{'x' if r.get('speedup_vs_stock') else ''} | "
            f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r.get('step_extra_mb'), '.0f')} | "
            f"{losses.get('loss_cls', 0):.5f}, {losses.get('loss_box_reg', 0):.5f} |"
        )
    lines += ["", *(f"- `{k}`: {v}" for k, v in MODELS.items())]
    lines += [f"- `{k}`: {v}" for k, v in INPUTS.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--inputs", default="digits,coco800", help=f"comma-separated, from {', '.join(INPUTS)}"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed iterations per process "
        "(default: 20 for digits, 5 for coco800 on the CPU; 50 on a GPU)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations first (default 2; 10 on a GPU)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="processes per (model, input); models alternate"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=120.0,
        help="seconds to wait for an idle CPU before each run",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: SOLVER.AMP.ENABLED, Detectron2's AMPTrainer",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output (default benchmarks/results/bench_train_<device>[_amp].json)",
    )
    parser.add_argument("--report", metavar="JSON", help="print the table of a saved run and exit")
    parser.add_argument("--child", choices=sorted(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    inputs_list = args.inputs.split(",")
    unknown = [i for i in inputs_list if i not in INPUTS]
    if unknown:
        raise SystemExit(f"--inputs: unknown {unknown}; allowed: {', '.join(INPUTS)}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}")
    cuda = args.device.startswith("cuda")
    if args.amp and not cuda:
        raise SystemExit("--amp needs --device cuda: Detectron2's AMPTrainer requires CUDA")
    if cuda:
        require_cuda("bench_train.py")
    if args.warmup is None:
        args.warmup = 10 if cuda else 2
    if args.child:
        iters = args.iters or default_iters(inputs_list[0], args.device)
        print(
            json.dumps(
                run_child(args.child, inputs_list[0], args.device, iters, args.warmup, args.amp)
            )
        )
        return

    results, started = [], time.time()
    for inputs in inputs_list:
        for k in range(args.rounds):
            order = list(MODELS) if k % 2 == 0 else list(MODELS)[::-1]
            for model in order:
                r = run_in_subprocess(model, inputs, args)
                results.append(r)
                print(
                    f"[{time.time() - started:6.0f}s] {inputs:8s} {model:6s} round {k}: "
                    f"{r['s_per_iter']:.3f} s/it, peak {_fmt(r.get('peak_mb'), '.0f')} MB "
                    f"(other load {r.get('other_load', '-')})",
                    flush=True,
                )
    data = {
        "machine": machine_info(),
        "config": {
            "device": args.device,
            "amp": args.amp,
            "warmup": args.warmup,
            "iters": {k: args.iters or default_iters(k, args.device) for k in inputs_list},
            "rounds": args.rounds,
            "inputs": {k: INPUTS[k] for k in inputs_list},
        },
        "results": results,
        "summary": summarize(results, inputs_list),
    }
    print(report(data))
    name = f"bench_train_{args.device.split(':')[0]}{'_amp' * args.amp}.json"
    out = Path(args.out or REPO / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
