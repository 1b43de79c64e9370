#!/usr/bin/env python
"""
The paper's Table 1 ablation on the embedded digits data: every row trained
and evaluated with the same budget, seeds and data, one fresh process per run.

    python tools/ablate.py --preset digits-small
    python tools/ablate.py --preset digits-full --rows 'ce_*,fl_g2_a0.25'
    python tools/ablate.py --preset digits-small --list
    python tools/ablate.py --preset digits-full --jobs 8 MODEL.DEVICE cuda
    python tools/ablate.py --preset imbalance --jobs 8 MODEL.DEVICE cuda
    python tools/ablate.py --preset imbalance --canvases 512,768 --jobs 6 MODEL.DEVICE cuda
    python tools/ablate.py --preset longtail --jobs 7 MODEL.DEVICE cuda
    python tools/ablate.py --preset longtail10 --jobs 7 MODEL.DEVICE cuda

Each row is a digits config of ``configs/digits`` plus key/value overrides,
exactly what a user would type after ``train_net.py --config-file``; the
preset adds the budget (iterations, LR steps, warm-up) and the seed, and
key/value pairs after the options are added to every run (a device, say).
``--jobs N`` trains N runs at once, each process with its share of the CPU
threads (more than one job only pays with a GPU or many cores); after a
run fails nothing more starts, and the failure is raised. A run
trains with :class:`focal_det2.engine.FocalTrainer`, evaluates with
COCOEvaluator on the preset's test set and writes ``result.json`` into its
own directory ``<output-dir>/<row>/seed<k>/``. A run whose ``result.json``
exists is not trained again, so an interrupted ablation resumes where it
stopped. With ``--checkpoint-period P`` every run also checkpoints every P
iterations, and a run interrupted after a checkpoint continues from it
(``--resume``: the same result as an uninterrupted run; its ``result.json``
says the iteration it resumed from, and its training seconds add the
earlier attempts' up to that checkpoint); without it a run writes only
``model_final.pth``, so only a run interrupted during its final evaluation
resumes and any other trains again from the start. After each run the
tables are rewritten:

- ``runs.csv``: one line per (row, seed), with the number of detections
  the evaluation received;
- ``results.csv`` and ``results.md``: one line per row, the mean over seeds
  and, with several seeds, the sample standard deviation.

A metric COCO's evaluation gives no value for is shown as "–", and the
notes under the table in ``results.md`` (and the console line of the run)
say why: the model made no detection above ``MODEL.RETINANET.SCORE_THRESH_TEST``,
or the test set has no ground-truth box of that size.

A preset with canvases (``imbalance``) runs every row once per canvas side,
on ``digits_{train,val}_s<side>`` at that input size, into
``<output-dir>/s<side>/<row>/seed<k>/``. Before training it measures the
imbalance of each canvas from the model's own ``label_anchors``
(``tools/imbalance.py``: negatives per positive anchor, ignored anchors per
image, on the train split), stores it in ``imbalance.json`` and adds a table
by canvas to ``results.md``. Rows whose loss is not registered (or whose
keys do not exist) are reported and left out when the preset picks them,
and are an error when ``--rows`` asks for them. ``--canvases`` runs a subset
of the canvases (the tables then show that subset; a last call without it
tabulates everything finished; ``--tables`` tabulates the finished runs
without training the others); ``--seeds`` likewise runs a subset of the seeds.

The long-tail presets (``longtail``: imbalance factor 100, ``longtail10``: 10)
train on ``digits_train_lt<f>`` (digit 0 the most frequent class, digit 9 f
times rarer) and evaluate on the balanced ``digits_val_lt``. Every run stores
COCOEvaluator's per-class AP (``AP-<class>``) in ``result.json``; a preset with
class groups adds a column per group to the tables, the mean AP of its classes
(here the 3 rarest, 7-9, and the 3 most frequent, 0-2).
"""

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# First: importing focal_det2 registers the losses, head, schedules, meta-arch and data sets,
# with the deprecation noise of importing fvcore and Detectron2 hidden; hidden at run time too.
import focal_det2  # noqa: E402

focal_det2.hide_third_party_deprecations()

# isort: split

from imbalance import canvas_opts, format_table, measure_canvases  # noqa: E402  (tools/, beside this script)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("AP", "AP50", "AP75", "APs", "APm")
RESULT_FILE = "result.json"
RUN_FILE = "run.json"  # the settings, commit and checkpoint period of a run directory's attempt
CLOCK_KEY = "ablate_train_seconds"  # checkpoint key of a run's TrainingClock
IMBALANCE_FILE = "imbalance.json"


@dataclass(frozen=True)
class Row:
    """
    One line of the table.

    Attributes:
        name (str): identifier, used for ``--rows`` and as directory name.
        label (str): what the markdown table shows.
        config (str): file name in ``configs/digits`` without ``.yaml``.
        opts (tuple): key, value pairs as on train_net.py's command line.
        half_budget_keys (tuple[str]): keys set to half the preset's iterations.
        paper (tuple or None): (AP, AP50, AP75) of the same setting in the
            paper's Table 1 (COCO minival, ResNet-50-FPN, 600 px), if reported there.
        canvas (int or None): canvas side of a row that a canvas preset made
            from a row of :data:`ROWS` (its name is then ``s<side>/<setting>``).
    """

    name: str
    label: str
    config: str
    opts: Tuple = ()
    half_budget_keys: Tuple[str, ...] = ()
    paper: Optional[Tuple[float, float, float]] = None
    canvas: Optional[int] = None

    @property
    def setting(self) -> str:
        """The name of the row of :data:`ROWS` this row was made from (its own name otherwise)."""
        return self.name.split("/")[-1]

    def at_canvas(self, side: int) -> "Row":
        """This row on ``digits_{train,val}_s<side>`` at input size ``side``."""
        return replace(
            self,
            name=f"s{side}/{self.name}",
            label=f"{self.label}, {side} px",
            opts=tuple(self.opts) + tuple(canvas_opts(side)),
            canvas=side,
        )


# Rows' shared options: gamma 2 and alpha .25, and class-balanced weights at beta.
_G2_A25 = ("MODEL.FOCAL.GAMMA", 2.0, "MODEL.FOCAL.ALPHA", 0.25)


def _class_balanced(beta: float) -> tuple:
    return ("MODEL.FOCAL.CLASS_WEIGHTING", "effective_number", "MODEL.FOCAL.CB_BETA", beta)


ROWS = (
    # Table 1(a): alpha-balanced CE (gamma 0).
    Row(
        "ce_a0.25",
        "CE, α=.25",
        "cross_entropy_R18_FPN_1x",
        ("MODEL.FOCAL.ALPHA", 0.25),
        paper=(10.8, 16.0, 11.7),
    ),
    Row(
        "ce_a0.50",
        "CE, α=.50",
        "cross_entropy_R18_FPN_1x",
        ("MODEL.FOCAL.ALPHA", 0.5),
        paper=(30.2, 46.7, 32.8),
    ),
    Row(
        "ce_a0.75",
        "CE, α=.75",
        "cross_entropy_R18_FPN_1x",
        ("MODEL.FOCAL.ALPHA", 0.75),
        paper=(31.1, 49.4, 33.0),
    ),
    # Table 1(b): sigmoid FL at the paper's best alpha for each gamma.
    Row(
        "fl_g0.5_a0.50",
        "FL, γ=0.5, α=.50",
        "sigmoid_focal_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 0.5, "MODEL.FOCAL.ALPHA", 0.5),
        paper=(32.9, 51.7, 35.2),
    ),
    Row(
        "fl_g1_a0.25",
        "FL, γ=1, α=.25",
        "sigmoid_focal_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 1.0, "MODEL.FOCAL.ALPHA", 0.25),
        paper=(33.7, 52.0, 36.2),
    ),
    Row(
        "fl_g2_a0.25",
        "FL, γ=2, α=.25",
        "sigmoid_focal_R18_FPN_1x",
        _G2_A25,
        paper=(34.0, 52.5, 36.5),
    ),
    Row(
        "fl_g5_a0.25",
        "FL, γ=5, α=.25",
        "sigmoid_focal_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 5.0, "MODEL.FOCAL.ALPHA", 0.25),
        paper=(32.2, 49.6, 34.8),
    ),
    # Variants: softmax FL (Detectron v1), FL* (appendix A), soft gamma.
    Row(
        "softmax_fl_g2",
        "softmax FL, γ=2, α=.25",
        "softmax_focal_R18_FPN_1x",
        _G2_A25,
    ),
    Row(
        "fl_star_g2_b1",
        "FL*, γ=2, β=1, α=.25",
        "focal_star_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 2.0, "MODEL.FOCAL.STAR_BETA", 1.0),
    ),
    Row(
        "fl_star_g4_b0",
        "FL*, γ=4, β=0, α=.25",
        "focal_star_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 4.0, "MODEL.FOCAL.STAR_BETA", 0.0),
    ),
    Row(
        "soft_gamma_0to2",
        "FL, γ linear 0→2 over the first half, α=.25",
        "soft_gamma_R18_FPN_1x",
        ("MODEL.FOCAL.GAMMA", 2.0, "MODEL.FOCAL.GAMMA_SCHEDULE.START", 0.0),
        half_budget_keys=("MODEL.FOCAL.GAMMA_SCHEDULE.ITERS",),
    ),
    # ---- OHEM (Table 1d): the paper's best OHEM (ResNet-101: 32.8 AP against FL's 36.0) keeps 128
    # anchors per image after NMS at 0.5, with no positive:negative ratio (POS_FRACTION 0); the
    # SSD-style variant keeps 1:3 (POS_FRACTION 0.25). CE on the selected anchors, alpha-balanced
    # like the CE row (alpha .75, the best CE row of digits-full).
    Row(
        "ohem_b128_nms0.5",
        "OHEM, 128/image, NMS .5, α=.75",
        "ohem_R18_FPN_1x",
        (
            "MODEL.FOCAL.ALPHA",
            0.75,
            "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE",
            128,
            "MODEL.FOCAL.OHEM.NMS_THRESH",
            0.5,
            "MODEL.FOCAL.OHEM.POS_FRACTION",
            0.0,
        ),
    ),
    Row(
        "ohem_1to3_b128_nms0.5",
        "OHEM 1:3, 128/image, NMS .5, α=.75",
        "ohem_R18_FPN_1x",
        (
            "MODEL.FOCAL.ALPHA",
            0.75,
            "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE",
            128,
            "MODEL.FOCAL.OHEM.NMS_THRESH",
            0.5,
            "MODEL.FOCAL.OHEM.POS_FRACTION",
            0.25,
        ),
    ),
    # ---- Issue 14, the long tail: FL (gamma 2, alpha .25) with class-balanced weights (Cui et
    # al. 2019, class_balance.py) or label smoothing; softmax FL with class-balanced weights.
    *(
        Row(
            f"fl_cb{beta}",
            f"FL, γ=2, α=.25, class-balanced β={beta}",
            "sigmoid_focal_R18_FPN_1x",
            _G2_A25 + _class_balanced(beta),
        )
        for beta in (0.99, 0.999, 0.9999)
    ),
    Row(
        "softmax_fl_cb0.999",
        "softmax FL, γ=2, α=.25, class-balanced β=0.999",
        "softmax_focal_R18_FPN_1x",
        _G2_A25 + _class_balanced(0.999),
    ),
    Row(
        "fl_ls0.1",
        "FL, γ=2, α=.25, label smoothing 0.1",
        "sigmoid_focal_R18_FPN_1x",
        _G2_A25 + ("MODEL.FOCAL.LABEL_SMOOTHING", 0.1),
    ),
)


# The rows that only the long-tail presets run (the last of ROWS).
CLASS_IMBALANCE_ROWS = (
    "fl_cb0.99",
    "fl_cb0.999",
    "fl_cb0.9999",
    "softmax_fl_cb0.999",
    "fl_ls0.1",
)
# The rows of the paper's Table 1(a)/(b) and the variants, as measured by the digits presets.
TABLE1_ROWS = tuple(
    r.name for r in ROWS if not r.name.startswith("ohem") and r.name not in CLASS_IMBALANCE_ROWS
)
OHEM_ROWS = tuple(r.name for r in ROWS if r.name.startswith("ohem"))
# The long-tail presets: the best CE of digits-full, the paper's FL and softmax FL (the unweighted
# baseline of the softmax + class-balanced row) as baselines.
LONGTAIL_ROWS = ("ce_a0.75", "fl_g2_a0.25", "softmax_fl_g2", *CLASS_IMBALANCE_ROWS)


@dataclass(frozen=True)
class ClassGroup:
    """
    Classes whose APs a table averages into one column.

    Attributes:
        key (str): the column's name in the csv files.
        label (str): the column's header in results.md.
        classes (tuple[str]): class names (``thing_classes``), as COCOEvaluator
            reports their AP: ``results["bbox"]["AP-<name>"]``.
    """

    key: str
    label: str
    classes: Tuple[str, ...]


# Digit c is the c-th most frequent class of digits_train_lt<f> (focal_det2.data.longtail_shares).
LONGTAIL_GROUPS = (
    ClassGroup("AP_rare", "AP rarest 3 (7, 8, 9)", ("7", "8", "9")),
    ClassGroup("AP_frequent", "AP most frequent 3 (0, 1, 2)", ("0", "1", "2")),
)


def digits_schedule() -> Tuple[int, Tuple[int, ...], int]:
    """SOLVER.MAX_ITER, STEPS and WARMUP_ITERS of configs/digits/Base-Digits.yaml."""
    from focal_det2.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "digits", "Base-Digits.yaml"))
    return cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS


@dataclass(frozen=True)
class Preset:
    """
    The budget shared by every row.

    Attributes:
        iters (int): SOLVER.MAX_ITER; the LR steps and the warm-up keep the
            proportions of the digits configs' schedule (Base-Digits.yaml).
        seeds (tuple[int]): SEED values; every row runs once per seed.
        opts (tuple): further key, value pairs for every row.
        rows (tuple[str] or None): rows run when ``--rows`` is not given (None: all).
        cost (str): measured cost, shown by ``--list``.
        canvases (tuple[int]): canvas sides; if given, every row runs once per
            side (:meth:`Row.at_canvas`), with the same schedule at every side.
        row_canvases (tuple): (row name, tuple of sides) pairs: rows that run
            only at those of ``canvases``.
        class_groups (tuple[ClassGroup]): groups of classes whose mean AP the
            tables show in a column each, after :data:`METRICS`.
    """

    iters: int
    seeds: Tuple[int, ...] = (0,)
    opts: Tuple = ()
    rows: Optional[Tuple[str, ...]] = None
    cost: str = ""
    canvases: Tuple[int, ...] = ()
    row_canvases: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    class_groups: Tuple[ClassGroup, ...] = ()

    def expand(self, rows: Sequence[Row]) -> List[Row]:
        """
        ``rows`` as this preset runs them: unchanged without canvases, else
        each at every canvas, smallest first (the rows of ``row_canvases`` at
        their own canvases only).
        """
        if not self.canvases:
            return list(rows)
        only = dict(self.row_canvases)
        return [
            row.at_canvas(side)
            for side in sorted(self.canvases)
            for row in rows
            if side in only.get(row.name, self.canvases)
        ]

    def budget_opts(self) -> List:
        n = self.iters
        base_iters, base_steps, base_warmup = digits_schedule()
        steps = sorted({round(s * n / base_iters) for s in base_steps})
        return [
            "SOLVER.MAX_ITER",
            n,
            "SOLVER.STEPS",
            tuple(s for s in steps if 0 < s < n),
            "SOLVER.WARMUP_ITERS",
            max(1, round(base_warmup * n / base_iters)),
            "SOLVER.CHECKPOINT_PERIOD",
            n + 1,  # > MAX_ITER: only model_final.pth is written
        ]


def longtail_preset(factor: int) -> Preset:
    """
    The long-tail ablation: :data:`LONGTAIL_ROWS` trained on ``digits_train_lt<factor>``
    and evaluated on the balanced ``digits_val_lt``, with the digits configs' budget
    (1,000 iterations of batch 8), 2 seeds, and the AP of the rarest and most frequent
    classes (:data:`LONGTAIL_GROUPS`).
    """
    return Preset(
        iters=1000,
        seeds=(0, 1),
        opts=("DATASETS.TRAIN", (f"digits_train_lt{factor}",), "DATASETS.TEST", ("digits_val_lt",)),
        rows=LONGTAIL_ROWS,
        class_groups=LONGTAIL_GROUPS,
        cost="16 runs (8 rows x 2 seeds) of 1,000 iterations at 128 px: 45 min for 14 of them with "
        "--jobs 1 on 2 CPU cores (factor 100, measured at 32f2060: about 185 s of training and 7 s "
        "of evaluation a run); about 5-10 min on one GPU with --jobs 7 (estimated from digits-full: "
        "22 runs in 9 min on one H100 with --jobs 11)",
    )


PRESETS: Dict[str, Preset] = {
    # A smoke test: the tiny splits (16 train, 8 val images), 2 iterations, 2 rows.
    "tiny": Preset(
        iters=2,
        opts=(
            "DATASETS.TRAIN",
            ("digits_train_tiny",),
            "DATASETS.TEST",
            ("digits_val_tiny",),
            "SOLVER.IMS_PER_BATCH",
            2,
            "DATALOADER.NUM_WORKERS",
            0,
            "MODEL.FPN.OUT_CHANNELS",
            64,  # GroupNorm(32) needs >= 2 channels a group at 1x1 P7
        ),
        rows=("ce_a0.75", "soft_gamma_0to2"),
        cost="about 15-30 s per row",
    ),
    # digits_train (2,000 images) / digits_val (300), batch 8, 1 seed.
    "digits-small": Preset(
        iters=300,
        rows=TABLE1_ROWS,
        cost="about 1 min per row on 2 idle cores (0.185 s/iteration), 12 min in all (estimated)",
    ),
    # The default digits budget (1,000 iterations, batch 8), 2 seeds.
    "digits-full": Preset(
        iters=1000,
        seeds=(0, 1),
        rows=TABLE1_ROWS,
        cost="about 3 min per run on 2 idle cores, 22 runs: 70 min in all (estimated); "
        "about 9 min on one H100 with --jobs 11 (measured)",
    ),
    # Issue 11: when does focal loss matter? Digits drawn alike (12-40 px, 3-8 per image) on growing
    # canvases, so only the background per object grows. One schedule at every canvas (600
    # iterations of batch 8, LR steps 480 and 570, warm-up 60: Base-Digits.yaml's proportions), so
    # every run sees the same number of images and about the same number of objects (5.5 per image)
    # and the canvas is the only difference between columns. OHEM at the two largest canvases,
    # where the imbalance is COCO-like.
    "imbalance": Preset(
        iters=600,
        seeds=(0, 1),
        canvases=focal_det2.data.CANVAS_SIZES,
        rows=("ce_a0.75", "fl_g1_a0.25", "fl_g2_a0.25", "softmax_fl_g2", *OHEM_ROWS),
        row_canvases=tuple((name, (512, 768)) for name in OHEM_ROWS),
        cost="40 runs (4 rows x 4 canvases x 2 seeds, OHEM 2 rows x 2 canvases x 2 seeds); measured on "
        "2 CPU cores one at a time: about 2 min a 128 px run, 340 s a 256 px run, 20-24 min a 512 px "
        "run alone (40-67 min with 2-4 runs sharing the cores) and about 58 min a 768 px run alone "
        "(README); the issue reports 110 s per 512 px run with 6 at once on a GPU",
    ),
    # Issue 14, the long tail: class frequencies decaying exponentially from digit 0 to digit 9,
    # 100x (longtail) or 10x (longtail10) apart; evaluated on balanced classes.
    "longtail": longtail_preset(100),
    "longtail10": longtail_preset(10),
}


@dataclass
class Run:
    row: Row
    seed: int
    out_dir: str
    opts: List = field(default_factory=list)

    @property
    def config_file(self) -> str:
        return os.path.join("configs", "digits", f"{self.row.config}.yaml")

    def argv(self) -> List[str]:
        """train_net.py's arguments for this run (OUTPUT_DIR last)."""
        pairs = self.opts + ["OUTPUT_DIR", self.out_dir]
        return ["--config-file", self.config_file] + [_to_arg(v) for v in pairs]


def _to_arg(value) -> str:
    """A config value as Detectron2's ``merge_from_list`` reads it back (literal_eval)."""
    return value if isinstance(value, str) else repr(value)


def _shell_join(args: Sequence[str]) -> str:
    """Like shlex.join, but quotes Python literals such as ('a',) the way people type them."""
    return " ".join(
        f'"{a}"' if "'" in a and not any(c in a for c in '"$`\\') else shlex.quote(a) for a in args
    )


def plan(
    preset: Preset, rows: Sequence[Row], output_dir: str, extra_opts: Sequence = ()
) -> List[Run]:
    """
    The runs of ``rows`` under ``preset``, in table order, seeds inner;
    ``extra_opts`` (key, value, ...) are added to every run after the preset's.
    A preset with canvases runs each row at each canvas (:meth:`Preset.expand`).
    """
    if len(extra_opts) % 2:
        raise ValueError(
            f"key/value pairs after the options must come in pairs, got {list(extra_opts)}"
        )
    given = {str(key) for key in extra_opts[::2]}
    for key, option in (("SEED", "--seeds"), ("OUTPUT_DIR", "--output-dir")):
        if key in given:
            raise ValueError(
                f"{key} among the key value pairs: ablate.py sets each run's {key} after them "
                f"(it would be ignored); use {option}."
            )
    runs = []
    for row in preset.expand(rows):
        halved = sorted(given.intersection(row.half_budget_keys))
        if halved:
            raise ValueError(
                f"{', '.join(halved)} among the key value pairs: row {row.name} sets it to half "
                f"the run's iterations after them (it would be ignored); leave it out, or "
                f"--rows without {row.name}."
            )
        for seed in preset.seeds:
            opts = list(row.opts) + list(preset.opts) + preset.budget_opts() + list(extra_opts)
            for key in row.half_budget_keys:
                opts += [key, max(1, preset.iters // 2)]
            opts += ["SEED", seed]
            out_dir = os.path.join(output_dir, row.name, f"seed{seed}")
            runs.append(Run(row, seed, out_dir, opts))
    return runs


def _cost_line(preset: Preset, count: int, iters: int) -> str:
    """
    ``--list``'s line on the cost of ``count`` runs of ``iters`` iterations: the preset's
    measured cost, which is for its own runs and iterations; where the plan differs
    (``--rows``, ``--seeds``, ``--canvases``, ``SOLVER.MAX_ITER``), the share of the
    preset's training iterations the plan trains.
    """
    own = len(preset.expand(select_rows(None, preset))) * len(preset.seeds)
    line = f"{count} runs of {iters} iterations; {preset.cost}"
    if (count, iters) == (own, preset.iters):
        return line
    share = count * iters / (own * preset.iters)
    return (
        f"{line}\n  (that cost is for the preset's own {own} runs of {preset.iters} iterations; "
        f"this plan trains {share:.2g}x their iterations)"
    )


def budget_override(opts: Sequence) -> Tuple[List, Optional[int]]:
    """
    ``opts`` without a ``SOLVER.MAX_ITER`` pair, and its value (None without one): the
    preset's budget then follows it (LR steps, warm-up, a soft-gamma row's ramp and the
    tables' "iterations per run"), where the pair alone would change MAX_ITER only.
    """
    opts = list(opts)
    keys = [str(key) for key in opts[::2]]
    if "SOLVER.MAX_ITER" not in keys:
        return opts, None
    i = 2 * keys.index("SOLVER.MAX_ITER")
    value = str(opts[i + 1]) if i + 1 < len(opts) else ""
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"SOLVER.MAX_ITER {value}: an integer >= 1 is needed.")
    return opts[:i] + opts[i + 2 :], int(value)


def select_rows(patterns: Optional[str], preset: Preset) -> List[Row]:
    """
    Rows matching comma-separated names or shell patterns (``'ce_*,fl_g2*'``);
    without patterns, the preset's rows.
    """
    if not patterns:
        names = preset.rows
        return [r for r in ROWS if names is None or r.name in names]
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatchcase(r.name, p) for r in ROWS):
            raise ValueError(f"--rows: {p!r} matches no row; rows are {[r.name for r in ROWS]}")
    return [r for r in ROWS if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]


def select_canvases(text: str, preset_name: str, preset: Preset) -> Tuple[int, ...]:
    """
    The canvas sides of ``--canvases`` (comma-separated), which must be
    among the canvases of ``preset``.
    """
    if not preset.canvases:
        with_canvases = sorted(name for name, p in PRESETS.items() if p.canvases)
        raise ValueError(
            f"--canvases: preset {preset_name!r} has no canvases; presets with canvases: {with_canvases}"
        )
    return _subset(text, preset.canvases, "--canvases", "sides")


def select_seeds(text: str, preset: Preset) -> Tuple[int, ...]:
    """The seeds of ``--seeds`` (comma-separated), which must be among the seeds of ``preset``."""
    return _subset(text, preset.seeds, "--seeds", "seeds")


def _subset(text: str, allowed: Sequence[int], option: str, what: str) -> Tuple[int, ...]:
    """The sorted integers of comma-separated ``text``; an error naming ``option`` unless a non-empty subset of ``allowed``."""
    try:
        values = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        values = ()
    if not values or not set(values) <= set(allowed):
        raise ValueError(
            f"{option} must be comma-separated {what} from {tuple(allowed)}, got {text!r}"
        )
    return values


def row_problem(row: Row) -> Optional[str]:
    """
    Why ``row`` cannot run in this checkout, or None if it can: its
    ``MODEL.FOCAL.LOSS`` is not in ``FOCAL_LOSS_REGISTRY``, or one of its keys
    does not exist in the config (Detectron2's defaults plus ``add_focal_config``).
    """
    from focal_det2.config import load_config
    from focal_det2.losses import FOCAL_LOSS_REGISTRY

    cfg = load_config(os.path.join(REPO, "configs", "digits", f"{row.config}.yaml"))
    loss = dict(zip(row.opts[::2], row.opts[1::2])).get("MODEL.FOCAL.LOSS", cfg.MODEL.FOCAL.LOSS)
    names = sorted(name for name, _ in FOCAL_LOSS_REGISTRY)
    if loss not in names:
        return f"MODEL.FOCAL.LOSS {loss!r} is not registered in FOCAL_LOSS_REGISTRY (registered: {', '.join(names)})"
    for key in row.opts[::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return f"config key {key} does not exist (not in Detectron2's defaults or add_focal_config)"
            node = node[part]
    return None


def drop_rows_that_cannot_run(rows: Sequence[Row], asked: bool) -> Tuple[List[Row], Dict[str, str]]:
    """
    Splits ``rows`` by :func:`row_problem`. Rows asked for with ``--rows``
    (``asked``) must all run: a problem raises ``ValueError`` naming the rows
    and why. Rows a preset picked are left out and returned with the reason.

    Returns:
        list[Row]: the rows that can run.
        dict[str, str]: row name -> why it is left out.
    """
    problems = {row.name: why for row in rows for why in [row_problem(row)] if why}
    if problems and asked:
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        raise ValueError(f"--rows asks for rows that cannot run in this checkout:\n{lines}")
    return [row for row in rows if row.name not in problems], problems


def _left_out_lines(left_out: Dict[str, str]) -> List[str]:
    """What the console and results.md say about rows a preset left out."""
    if not left_out:
        return []
    lines = [f"Rows left out, they cannot run in this checkout ({len(left_out)}):", ""]
    lines += [f"- {name}: {why}" for name, why in left_out.items()]
    lines += [
        "",
        "Rerun the preset once they can run: finished runs are kept and only the missing ones train.",
    ]
    return lines


def _settings(argv: Sequence[str]) -> List[str]:
    """
    A run's train_net.py arguments without OUTPUT_DIR (last), which may differ if its folder
    was moved, and without a MODEL.DEVICE pair (where a run trains is not what it trains).
    """
    return _without_device(argv[:-2])


def _without_device(opts: Sequence) -> List:
    """``opts`` (arguments ending in key, value pairs) without a ``MODEL.DEVICE`` pair."""
    opts = list(opts)
    while "MODEL.DEVICE" in opts[:-1]:
        i = opts.index("MODEL.DEVICE")
        del opts[i : i + 2]
    return opts


def _write_json(path: str, obj):
    """Write ``obj`` to ``path`` whole or not at all (a temporary file, renamed)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_result(run: Run, tabulating: bool = False) -> Optional[dict]:
    """
    The stored result of ``run``, or None if it has not finished. Raises if
    it finished with other settings, so that a table never mixes budgets;
    ``tabulating`` (``--tables``, which trains nothing) changes the advice.
    """
    path = os.path.join(run.out_dir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    expected = _settings(run.argv())
    if _settings(result["argv"]) != expected:
        raise RuntimeError(
            f"{path} was trained with other settings:\n  {_shell_join(_settings(result['argv']))}\n"
            f"this preset asks for\n  {_shell_join(expected)}\n"
            + (
                "--tables reads the runs as they were trained: pass the key value pairs (and "
                "--canvases, --seeds) of the call that trained them."
                if tabulating
                else "Use another --output-dir, or delete that run's directory to retrain it."
            )
        )
    return result


def interrupted_attempt(run: Run) -> Optional[dict]:
    """
    The ``run.json`` of an interrupted attempt of ``run`` that can be
    resumed, or None: ``run.out_dir`` holds ``run.json`` with ``run``'s
    settings (only OUTPUT_DIR may differ) and the checkpoint that
    Detectron2's ``last_checkpoint`` names.
    """
    marker = os.path.join(run.out_dir, RUN_FILE)
    tag = os.path.join(run.out_dir, "last_checkpoint")
    if not (os.path.exists(marker) and os.path.exists(tag)):
        return None
    with open(tag) as f:
        checkpoint = os.path.join(run.out_dir, f.read().strip())
    with open(marker) as f:
        attempt = json.load(f)
    if _settings(attempt["argv"]) != _settings(run.argv()) or not os.path.isfile(checkpoint):
        return None
    return attempt


def start_attempt(run: Run, checkpoint_period: Optional[int] = None) -> Tuple[dict, bool]:
    """
    Starts the attempt of ``run`` about to train: an interrupted attempt
    (:func:`interrupted_attempt`) resumes, with its own checkpoint period unless
    ``checkpoint_period`` is given; otherwise whatever an attempt left in ``run.out_dir``
    is cleared and a new attempt begins. The attempt is written to ``run.json``.

    Returns:
        dict: the attempt (``argv``, ``commit``, ``checkpoint_period``).
        bool: whether it resumes.
    """
    attempt = interrupted_attempt(run)
    resume = attempt is not None
    if not resume:
        if os.path.isdir(run.out_dir):
            shutil.rmtree(run.out_dir)
        os.makedirs(run.out_dir)
        attempt = {"argv": run.argv(), "commit": _git_commit(), "checkpoint_period": None}
    if checkpoint_period is not None:
        attempt["checkpoint_period"] = checkpoint_period
    _write_json(os.path.join(run.out_dir, RUN_FILE), attempt)
    return attempt, resume


def run_environment(threads: Optional[int] = None) -> dict:
    """
    The environment of a run's process: this one's, with this checkout first on
    PYTHONPATH and OMP_NUM_THREADS ``threads`` unless the environment sets it.
    """
    env = dict(os.environ)
    # The child's sys.path[0] is tools/: without this it imports whichever focal_det2 is
    # installed (another checkout's, with another config schema), not this checkout's.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def train_run(
    run: Run,
    verbose: bool = False,
    threads: Optional[int] = None,
    checkpoint_period: Optional[int] = None,
) -> dict:
    """
    Trains and evaluates ``run`` in a fresh process and returns its result.
    An interrupted attempt is resumed (``--resume``: the same weights and
    metrics as an uninterrupted run; see :func:`start_attempt`).
    ``threads`` sets OMP_NUM_THREADS of the process unless the environment
    sets it; ``checkpoint_period`` (iterations) makes the run checkpoint
    that often.
    """
    attempt, resume = start_attempt(run, checkpoint_period)
    flags = ["--resume"] if resume else []
    if attempt.get("checkpoint_period") is not None:
        flags += ["--checkpoint-period", str(attempt["checkpoint_period"])]
    cmd = [sys.executable, os.path.abspath(__file__), "--train-one", *flags] + run.argv()
    log_path = os.path.join(run.out_dir, "stdout.log")
    with open(log_path, "a" if resume else "w") as log:
        if resume:
            log.write(f"\n[ablate.py] resuming the interrupted attempt at commit {_git_commit()}\n")
            log.flush()
        streams = {} if verbose else {"stdout": log, "stderr": subprocess.STDOUT}
        proc = subprocess.run(cmd, cwd=REPO, env=run_environment(threads), **streams)
    if proc.returncode != 0:
        tail = ""
        if not verbose:  # with --verbose the log went to the console
            with open(log_path) as f:
                tail = "\n" + "".join(f.readlines()[-30:])
        raise RuntimeError(
            f"run {run.row.name} seed {run.seed} failed (exit {proc.returncode}); "
            f"log: {log_path}{tail}"
        )
    return read_result(run)


def keep_latest_checkpoint(trainer_hooks: List) -> List:
    """``trainer_hooks`` with their PeriodicCheckpointer deleting each checkpoint once the next is saved."""
    from detectron2.engine import hooks

    for hook in trainer_hooks:
        if isinstance(hook, hooks.PeriodicCheckpointer):
            hook.max_to_keep = 1
    return trainer_hooks


class TrainingClock:
    """
    Seconds a run has spent training, evaluation excluded, over all its
    attempts: a checkpointable (checkpoint key :data:`CLOCK_KEY`) whose
    state is the seconds up to the checkpoint, so that a resumed attempt
    adds the earlier attempts' time up to the checkpoint it resumes from,
    which is what an uninterrupted run would have spent.
    """

    def __init__(self, eval_seconds: Callable[[], float]):
        """
        Args:
            eval_seconds: returns the seconds this attempt has spent evaluating so far.
        """
        self._eval_seconds = eval_seconds
        self.earlier = 0.0
        self.start()

    def start(self):
        """Count this attempt's training from now."""
        self._start = time.perf_counter()

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self._start - self._eval_seconds()

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict):
        self.earlier = state["seconds"]


def train_one(argv: List[str], resume: bool = False, checkpoint_period: Optional[int] = None):
    """
    Entry point of a run's process: train_net.py's parser, config and
    trainer on the run's arguments ``argv``; writes ``OUTPUT_DIR/result.json``
    with the bbox metrics, the seconds spent training (evaluation excluded,
    earlier attempts included, see :class:`TrainingClock`) and evaluating,
    and the iteration it resumed from. With ``resume``, continues from the
    last checkpoint in OUTPUT_DIR. With ``checkpoint_period``, checkpoints
    every that many iterations, keeping the latest, and deletes those
    checkpoints once the result is written (``model_final.pth`` stays).
    """
    from detectron2.engine import default_argument_parser

    from focal_det2.engine import FocalTrainer, setup_cfg

    class TimedTrainer(FocalTrainer):
        """FocalTrainer that times its training, remembers its last evaluation and its duration, and keeps one periodic checkpoint."""

        eval_seconds = 0.0
        eval_results = None

        def __init__(self, cfg):
            super().__init__(cfg)
            self.clock = TrainingClock(lambda: TimedTrainer.eval_seconds)
            self.checkpointer.add_checkpointable(CLOCK_KEY, self.clock)

        @classmethod
        def test(cls, cfg, model, evaluators=None):
            start = time.perf_counter()
            results = super().test(cfg, model, evaluators)
            cls.eval_seconds += time.perf_counter() - start
            cls.eval_results = results
            return results

        def build_hooks(self):
            return keep_latest_checkpoint(super().build_hooks())

        def _finished(self):
            # an ablate run is done when result.json is written: one resumed without it (killed
            # in or after its final evaluation) evaluates again, for the result
            return False

    args = default_argument_parser().parse_args(argv)
    args.resume = resume  # setup_cfg checks the checkpoint a resume loads, and OUTPUT_DIR otherwise
    if checkpoint_period is not None:
        args.opts = args.opts + ["SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period)]
    cfg = setup_cfg(args)
    trainer = TimedTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.clock.start()
    trainer.train()
    bbox = TimedTrainer.eval_results.get("bbox", {})
    metrics = {k: _finite_or_none(bbox.get(k)) for k in METRICS}
    detections = _count_detections(
        os.path.join(cfg.OUTPUT_DIR, "inference", "coco_instances_results.json")
    )
    result = {
        "argv": argv,
        "metrics": metrics,
        "per_class_AP": per_class_ap(bbox),
        "detections": detections,
        "notes": _why_missing(metrics, detections, cfg),
        "train_seconds": round(trainer.clock.seconds(), 1),
        "eval_seconds": round(TimedTrainer.eval_seconds, 1),
        "iterations": cfg.SOLVER.MAX_ITER,
        "resumed_from_iteration": trainer.start_iter,
        "commit": _git_commit(),
    }
    marker = os.path.join(cfg.OUTPUT_DIR, RUN_FILE)
    if trainer.start_iter and os.path.exists(marker):
        with open(marker) as f:
            result["started_at_commit"] = json.load(f).get("commit")
    _write_json(os.path.join(cfg.OUTPUT_DIR, RESULT_FILE), result)  # the file marks a finished run
    for name in os.listdir(cfg.OUTPUT_DIR):
        if re.fullmatch(r"model_\d{7,}\.pth", name):  # periodic checkpoints; model_final.pth stays
            os.remove(os.path.join(cfg.OUTPUT_DIR, name))


def _count_detections(path: str) -> int:
    """Detections in COCOEvaluator's ``coco_instances_results.json`` (0 if it wrote none)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(json.load(f))


def _why_missing(metrics: Dict[str, Optional[float]], detections: int, cfg) -> Dict[str, str]:
    """For each metric without a value, why COCO's evaluation gave none."""
    dataset = ", ".join(cfg.DATASETS.TEST)
    if detections == 0:
        why = (
            f"no detections on {dataset}: every score was below "
            f"MODEL.RETINANET.SCORE_THRESH_TEST={cfg.MODEL.RETINANET.SCORE_THRESH_TEST}"
        )
        return {k: why for k, v in metrics.items() if v is None}
    sizes = {"APs": "small (area < 32² px) ", "APm": "medium (area 32²-96² px) "}
    return {
        k: f"{dataset} has no {sizes.get(k, '')}ground-truth boxes"
        for k, v in metrics.items()
        if v is None
    }


def per_class_ap(bbox: Dict[str, float]) -> Dict[str, Optional[float]]:
    """
    Args:
        bbox (dict): COCOEvaluator's ``results["bbox"]``, with ``"AP-<class name>"``
            for every class (none when the model made no detection).

    Returns:
        dict: class name -> its AP, None where COCO gives NaN (no ground truth of that class).
    """
    return {k[len("AP-") :]: _finite_or_none(v) for k, v in bbox.items() if k.startswith("AP-")}


def group_ap(per_class: Dict[str, Optional[float]], classes: Sequence[str]) -> Optional[float]:
    """The mean AP of ``classes`` (names in ``per_class``), None unless each has a value."""
    values = [per_class.get(name) for name in classes]
    return None if any(v is None for v in values) else statistics.fmean(values)


def run_metrics(
    result: dict, class_groups: Sequence[ClassGroup] = ()
) -> Dict[str, Optional[float]]:
    """The :data:`METRICS` of a run's ``result``, then the mean AP of each class group."""
    per_class = result.get("per_class_AP", {})
    groups = {g.key: group_ap(per_class, g.classes) for g in class_groups}
    return {**{k: result["metrics"][k] for k in METRICS}, **groups}


def _group_notes(result: dict, class_groups: Sequence[ClassGroup]) -> Dict[str, str]:
    """For each class group without a value in ``result``, why."""
    notes = {}
    for group in class_groups:
        per_class = result.get("per_class_AP")
        missing = [name for name in group.classes if (per_class or {}).get(name) is None]
        if not missing:
            continue
        if per_class is None:
            why = "the run's result.json has no per-class AP (trained before ablate.py stored it)"
        elif result.get("detections") == 0 and "AP" in result.get("notes", {}):
            why = result["notes"]["AP"]  # no detections at all
        else:
            why = (
                f"no AP for class {', '.join(missing)}: COCO gives none to a class without "
                "ground-truth boxes in the test set"
            )
        notes[group.key] = why
    return notes


def _notes(result: dict, class_groups: Sequence[ClassGroup] = ()) -> str:
    """'AP, AP50: why' for the metrics of ``result`` without a value, '' if none."""
    by_reason = {}
    notes = {**result.get("notes", {}), **_group_notes(result, class_groups)}
    for key, why in notes.items():
        by_reason.setdefault(why, []).append(key)
    return "; ".join(f"{', '.join(keys)} –: {why}" for why, keys in by_reason.items())


def _finite_or_none(x):
    return None if x is None or math.isnan(x) else float(x)


def _mean_std(values: Sequence[Optional[float]]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def summarize(
    runs: Sequence[Run],
    results: Dict[Tuple[str, int], dict],
    class_groups: Sequence[ClassGroup] = (),
) -> List[dict]:
    """
    One dict per row with finished runs: mean and std over seeds of each metric
    (:func:`run_metrics`, with the mean AP of each of ``class_groups``) and train seconds.
    """
    table = []
    for row in dict.fromkeys(r.row for r in runs):
        done = [
            results[(row.name, r.seed)]
            for r in runs
            if r.row == row and (row.name, r.seed) in results
        ]
        if not done:
            continue
        line = {"row": row.name, "label": row.label, "canvas": row.canvas, "seeds": len(done)}
        metrics = [run_metrics(d, class_groups) for d in done]
        for key in metrics[0]:
            line[key], line[f"{key}_std"] = _mean_std([m[key] for m in metrics])
        line["train_s"], line["train_s_std"] = _mean_std([d["train_seconds"] for d in done])
        line["paper_AP"], line["paper_AP50"], line["paper_AP75"] = row.paper or (None, None, None)
        table.append(line)
    return table


def _fmt(mean, std=None, digits=1):
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _git_commit() -> str:
    """
    ``git describe --always --dirty`` of the repository ("-dirty": uncommitted changes), or
    ``FOCAL_DET2_COMMIT`` where set: a copy of the tree sent to another machine (a GPU's) has
    no repository and is told its commit, as the benchmarks are.
    """
    if os.environ.get("FOCAL_DET2_COMMIT"):
        return os.environ["FOCAL_DET2_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def canvas_table(
    runs: Sequence[Run],
    results: Dict[Tuple[str, int], dict],
    imbalance: Optional[Dict[int, dict]] = None,
) -> List[str]:
    """
    Markdown lines of the table by canvas: one column per canvas side, the
    measured imbalance first (negatives per positive anchor, ignored anchors
    per image, from ``imbalance``: side -> :func:`imbalance.measure_imbalance`),
    then the AP of each setting (:func:`_ap_cell`).
    """
    sides = sorted({run.row.canvas for run in runs})
    imbalance = imbalance or {}
    labels = {row.name: row.label for row in ROWS}
    lines = [
        "| | " + " | ".join(f"{side} px" for side in sides) + " |",
        "| --- |" + " ---: |" * len(sides),
    ]
    for title, key, digits in (
        ("negatives per positive anchor", "negatives_per_positive", 0),
        ("ignored anchors per image", "ignored_per_image", 1),
    ):
        cells = [_imbalance_cell(imbalance.get(side), key, digits) for side in sides]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    aps = {}  # (setting, side) -> AP of each finished seed
    for run in runs:
        result = results.get((run.row.name, run.seed))
        if result is not None:
            aps.setdefault((run.row.setting, run.row.canvas), []).append(result["metrics"]["AP"])
    for setting in dict.fromkeys(run.row.setting for run in runs):
        cells = [_ap_cell(aps.get((setting, side), [])) for side in sides]
        lines.append(f"| AP, {labels.get(setting, setting)} | " + " | ".join(cells) + " |")
    return lines


def _imbalance_cell(measured: Optional[dict], key: str, digits: int) -> str:
    """``measured[key]``: "–" for a canvas not measured, "no positives" for no ratio."""
    if measured is None:
        return "–"
    return "no positives" if measured[key] is None else _fmt(measured[key], digits=digits)


def _ap_cell(aps: Sequence[Optional[float]]) -> str:
    """
    Mean ± sample std of the finished seeds' ``aps``: "–" if none finished,
    "no AP" if none has a value (the notes say why); seeds without a value
    are counted, not averaged.
    """
    if not aps:
        return "–"
    values = [ap for ap in aps if ap is not None]
    if not values:
        return "no AP"
    cell = _fmt(*_mean_std(values))
    return cell if len(values) == len(aps) else f"{cell} ({len(values)} of {len(aps)} seeds)"


def write_tables(
    output_dir: str,
    preset_name: str,
    preset: Preset,
    runs: Sequence[Run],
    results: Dict[Tuple[str, int], dict],
    command: str = "",
    left_out: Optional[Dict[str, str]] = None,
    imbalance: Optional[Dict[int, dict]] = None,
):
    """
    Writes runs.csv, results.csv and results.md (made by ``command``) into
    ``output_dir``; results.md lists the rows ``left_out`` and, for a preset
    with canvases, the table by canvas with the measured ``imbalance``. A
    preset's class groups add a column each after :data:`METRICS`.
    """
    groups = preset.class_groups
    metrics = [*METRICS, *(g.key for g in groups)]
    with open(os.path.join(output_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "row",
                "seed",
                *metrics,
                "train_s",
                "eval_s",
                "iterations",
                "canvas",
                "setting",
                "detections",
            ]
        )
        for run in runs:
            res = results.get((run.row.name, run.seed))
            if res:
                writer.writerow(
                    [
                        run.row.name,
                        run.seed,
                        *run_metrics(res, groups).values(),
                        res["train_seconds"],
                        res["eval_seconds"],
                        res["iterations"],
                        "" if run.row.canvas is None else run.row.canvas,
                        run.row.setting,
                        res.get("detections", ""),  # absent from results of older commits
                    ]
                )
    table = summarize(runs, results, groups)
    if table:
        with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    seeds = ", ".join(map(str, preset.seeds))
    spread = " (mean ± sample std over seeds)" if len(preset.seeds) > 1 else ""
    commits = ", ".join(
        f"`{c}`" for c in sorted({r.get("commit", "unknown") for r in results.values()})
    )
    lines = [
        f"Preset `{preset_name}`: {preset.iters} iterations per run, seeds {seeds}{spread}; "
        f"COCO-style AP on the test set, in %; trained at commit {commits}.",
        "",
        *([f"    {command}", ""] if command else []),
        "| setting | "
        + " | ".join([*METRICS, *(g.label for g in groups)])
        + " | train s | paper AP / AP50 / AP75 |",
        "|" + " --- |" * (len(metrics) + 3),
    ]
    for line in table:
        paper = (
            "–"
            if line["paper_AP"] is None
            else f"{line['paper_AP']:.1f} / {line['paper_AP50']:.1f} / {line['paper_AP75']:.1f}"
        )
        cells = [_fmt(line[k], line[f"{k}_std"]) for k in metrics]
        lines.append(
            f"| {line['label']} | "
            + " | ".join(cells)
            + f" | {_fmt(line['train_s'], digits=0)} | {paper} |"
        )
    notes = [
        (run, _notes(results[(run.row.name, run.seed)], groups))
        for run in runs
        if (run.row.name, run.seed) in results
    ]
    notes = [f"- {run.row.label}, seed {run.seed}: {note}" for run, note in notes if note]
    if notes:
        lines += ["", "Metrics without a value (–):", "", *notes]
    if preset.canvases:
        lines += [
            "",
            "By canvas (AP: mean ± sample std over seeds; –: not run yet; no AP: finished "
            "without one, see above); the imbalance is measured by `tools/imbalance.py` on the "
            "train split (`imbalance.json`):",
            "",
            *canvas_table(runs, results, imbalance),
        ]
    if left_out:
        lines += ["", *_left_out_lines(left_out)]
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def preset_imbalance(
    output_dir: str, preset: Preset, extra_opts: Sequence = (), measure: bool = True
) -> Dict[int, Optional[dict]]:
    """
    The imbalance of each canvas of ``preset`` (:func:`imbalance.measure_canvases`
    on the whole train split, with the preset's and the extra options but MODEL.DEVICE),
    read from ``<output_dir>/imbalance.json`` when it was measured with the same
    options, else measured and stored there; without ``measure`` (``--tables``), None
    for a canvas not stored.

    Returns:
        dict: canvas side -> measurement (or None).
    """
    path = os.path.join(output_dir, IMBALANCE_FILE)
    opts = _without_device(_to_arg(v) for v in list(preset.opts) + list(extra_opts))
    measured = {}
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored["opts"] == opts:  # measured with other options: measure everything again
            measured = {int(side): m for side, m in stored["canvases"].items()}
    missing = [side for side in preset.canvases if side not in measured]
    if missing and not measure:
        print(f"imbalance not measured at canvases {', '.join(map(str, missing))} (--tables)")
    elif missing:
        print(
            f"measuring the anchors' imbalance at canvases {', '.join(map(str, missing))} "
            "on the train splits (tools/imbalance.py)",
            flush=True,
        )
        measured.update(measure_canvases(missing, "train", None, opts=opts))
        print(format_table(measured), flush=True)
        canvases = {str(k): v for k, v in sorted(measured.items())}
        _write_json(path, {"split": "train", "opts": opts, "canvases": canvases})
    return {side: measured.get(side) for side in preset.canvases}


def train_pending(
    pending: Sequence[Tuple[int, Run]],
    jobs: int,
    train: Callable[[int, Run], dict],
    finished: Callable[[Run, dict], None],
):
    """
    Train `pending` in order, at most `jobs` runs at once, calling `finished` with each result.
    A run starts only while none has failed: after the first failure the runs already training
    finish and keep their results, nothing more starts, and the failure is raised.
    """
    queue, running, failures = iter(pending), {}, []
    with ThreadPoolExecutor(max_workers=jobs) as pool:

        def start_next():
            item = None if failures else next(queue, None)
            if item is not None:
                running[pool.submit(train, *item)] = item[1]

        for _ in range(jobs):
            start_next()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                if future.exception() is None:
                    finished(run, future.result())
                else:
                    failures.append(future.exception())
                start_next()
    if failures:
        raise failures[0]


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits-small", choices=sorted(PRESETS))
    parser.add_argument(
        "--rows", help="comma-separated row names or shell patterns (default: the preset's rows)"
    )
    parser.add_argument("--output-dir", help="default: output/ablation/<preset>")
    parser.add_argument(
        "--canvases",
        help="comma-separated canvas sides, a subset of the preset's "
        "(presets with canvases; default: all of them)",
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated seeds, a subset of the preset's (default: all of them; "
        "a last call without it tabulates every seed finished)",
    )
    parser.add_argument(
        "--list", action="store_true", help="print the runs and their commands, train nothing"
    )
    parser.add_argument(
        "--tables",
        action="store_true",
        help="write the tables of the finished runs (results.md, results.csv, runs.csv), train nothing",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the runs' logs instead of writing stdout.log"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each in its own process"
    )
    parser.add_argument(
        "--checkpoint-period",
        type=int,
        help="checkpoint each run every this many iterations, so that an interrupted run "
        "resumes from its last checkpoint (default: the interrupted attempt's, else none: only "
        "model_final.pth, and an interrupted run trains again)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="key value pairs added to every run, as after train_net.py's --config-file",
    )
    return parser


def _train_one_args(argv: List[str]) -> Tuple[List[str], bool, Optional[int]]:
    """
    ``[--resume] [--checkpoint-period P] --config-file ...``, as :func:`train_run`
    calls ``--train-one``: the run's arguments (from ``--config-file`` on),
    ``resume`` and ``checkpoint_period``.
    """
    start = argv.index("--config-file")
    parser = argparse.ArgumentParser(prog="ablate.py --train-one")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-period", type=int)
    flags = parser.parse_args(argv[:start])
    return argv[start:], flags.resume, flags.checkpoint_period


def run_command(run: Run, checkpoint_period: Optional[int] = None) -> str:
    """The train_net.py command of ``run``, as :func:`train_one` runs it."""
    period = ["SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period)] if checkpoint_period else []
    return f"python train_net.py {_shell_join(run.argv() + period)}"


def check_runs(runs: Sequence[Run]):
    """
    Raise, naming the run, for a run whose config train_net.py would refuse (a misspelt key
    among the key value pairs, a bad value): before anything is written, as
    :func:`focal_det2.engine.setup_cfg` checks it in the run's own process after.
    """
    from focal_det2.checks import check_cfg
    from focal_det2.config import load_config

    for run in runs:
        try:
            check_cfg(load_config(os.path.join(REPO, run.config_file), run.argv()[2:]))
        except (KeyError, ValueError, TypeError) as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"In ablate.py's run {run.row.name} seed {run.seed}.")
            raise


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--train-one"]:
        return train_one(*_train_one_args(argv[1:]))
    args = get_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    output_dir = os.path.abspath(
        args.output_dir or os.path.join(REPO, "output", "ablation", args.preset)
    )
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.checkpoint_period is not None and args.checkpoint_period < 1:
        raise ValueError(f"--checkpoint-period must be >= 1, got {args.checkpoint_period}")
    if args.canvases:
        preset = replace(preset, canvases=select_canvases(args.canvases, args.preset, preset))
    if args.seeds:
        preset = replace(preset, seeds=select_seeds(args.seeds, preset))
    args.opts, iters = budget_override(args.opts)
    if iters is not None:
        preset = replace(preset, iters=iters)
    rows, left_out = drop_rows_that_cannot_run(
        select_rows(args.rows, preset), asked=bool(args.rows)
    )
    runs = plan(preset, rows, output_dir, args.opts)
    check_runs(runs)
    if left_out:
        print("\n".join(_left_out_lines(left_out)) + "\n", flush=True)
    if args.list:
        print(f"preset {args.preset}: {_cost_line(PRESETS[args.preset], len(runs), preset.iters)}")
        for run in runs:
            print(f"{run.row.name} seed {run.seed}:\n  {run_command(run, args.checkpoint_period)}")
        return
    os.makedirs(output_dir, exist_ok=True)
    imbalance = (
        preset_imbalance(output_dir, preset, args.opts, measure=not args.tables)
        if preset.canvases
        else None
    )
    command = "python tools/ablate.py " + _shell_join(argv)
    results, pending = {}, []
    for i, run in enumerate(runs, 1):
        result = read_result(run, tabulating=args.tables)
        if result is None:
            pending.append((i, run))
            continue
        note = _notes(result, preset.class_groups)
        print(
            f"[{i}/{len(runs)}] {run.row.name} seed {run.seed}: done, AP {_fmt(result['metrics']['AP'])}"
            + (f" ({note})" if note else "")
        )
        results[(run.row.name, run.seed)] = result
    write_tables(output_dir, args.preset, preset, runs, results, command, left_out, imbalance)
    if args.tables:
        print(f"{len(results)} of {len(runs)} runs finished; tables: {output_dir}/results.md")
        return

    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def train(i: int, run: Run) -> dict:
        print(
            f"[{i}/{len(runs)}] {run.row.name} seed {run.seed}: training\n"
            f"  {run_command(run, args.checkpoint_period)}",
            flush=True,
        )
        result = train_run(
            run, verbose=args.verbose, threads=threads, checkpoint_period=args.checkpoint_period
        )
        note = _notes(result, preset.class_groups)
        print(
            f"[{i}/{len(runs)}] {run.row.name} seed {run.seed}: AP {_fmt(result['metrics']['AP'])}, "
            f"{result['train_seconds']:.0f} s training, {result['eval_seconds']:.0f} s evaluation"
            + (f" ({note})" if note else ""),
            flush=True,
        )
        return result

    def finished(run: Run, result: dict):
        results[(run.row.name, run.seed)] = result
        write_tables(output_dir, args.preset, preset, runs, results, command, left_out, imbalance)

    train_pending(pending, args.jobs, train, finished)
    print(f"tables: {os.path.join(output_dir, 'results.md')}, results.csv, runs.csv")
    with open(os.path.join(output_dir, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
