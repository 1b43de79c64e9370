"""Gamma schedules: gamma(iteration) from START to MODEL.FOCAL.GAMMA."""

import math
import random
import re

import pytest
import torch
from conftest import tiny_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import focal_det2
from focal_det2 import schedules

KEY = "MODEL.FOCAL.GAMMA_SCHEDULE"


def schedule(name, *, gamma=2.0, start=0.0, iters=0, steps=()):
    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.FOCAL.GAMMA = gamma
    node = cfg.MODEL.FOCAL.GAMMA_SCHEDULE
    node.NAME, node.START, node.ITERS, node.STEPS = name, start, iters, list(steps)
    return focal_det2.build_gamma_schedule(cfg)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("iteration", [0, 1, 50, 10**6])
def test_constant_is_gamma(iteration):
    assert schedule("constant", gamma=1.5)(iteration) == 1.5


@pytest.mark.parametrize(
    "iteration, expected", [(0, 0.0), (25, 0.5), (50, 1.0), (100, 2.0), (500, 2.0)]
)
def test_linear_from_0_to_2_over_100(iteration, expected):
    # gamma(t) = START + (GAMMA - START) * min(t / ITERS, 1)
    assert schedule("linear", gamma=2.0, start=0.0, iters=100)(iteration) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("iteration, expected", [(0, 1.0), (5, 2.0), (10, 3.0), (11, 3.0)])
def test_linear_from_start(iteration, expected):
    assert schedule("linear", gamma=3.0, start=1.0, iters=10)(iteration) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("iteration", [0, 10, 25, 50, 75, 100, 101, 1000])
def test_cosine_from_0_to_2_over_100(iteration):
    t = min(iteration / 100, 1.0)
    expected = 0.0 + (2.0 - 0.0) * 0.5 * (1 - math.cos(math.pi * t))
    assert schedule("cosine", gamma=2.0, start=0.0, iters=100)(iteration) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("iteration, expected", [(0, 0.0), (50, 1.0), (100, 2.0), (400, 2.0)])
def test_cosine_landmarks(iteration, expected):
    assert schedule("cosine", gamma=2.0, start=0.0, iters=100)(iteration) == pytest.approx(
        expected, abs=1e-12
    )


def test_cosine_starts_slower_than_linear():
    cos, lin = schedule("cosine", iters=100), schedule("linear", iters=100)
    assert cos(25) == pytest.approx(2.0 * 0.5 * (1 - math.cos(math.pi / 4)), abs=1e-12)
    assert cos(25) < lin(25)


@pytest.mark.parametrize(
    "iteration, expected", [(0, 0.5), (9, 0.5), (10, 1.5), (29, 1.5), (30, 2.5), (10**5, 2.5)]
)
def test_step_raises_gamma_at_steps(iteration, expected):
    # two steps share the rise GAMMA - START = 2 equally
    s = schedule("step", gamma=2.5, start=0.5, steps=[10, 30])
    assert s(iteration) == pytest.approx(expected, abs=1e-12)


# Closed forms, gamma 0 -> 2: f(t) of each schedule, written out.
CLOSED_FORMS = {
    "constant": ({}, lambda t: 2.0),
    "linear": ({"iters": 100}, lambda t: 2.0 * min(t / 100, 1.0)),
    "cosine": ({"iters": 100}, lambda t: 2.0 * (1 - math.cos(math.pi * min(t / 100, 1.0))) / 2),
    # gamma rises by 2/3 at iterations 10, 30 and 70 themselves
    "step": ({"steps": [10, 30, 70]}, lambda t: 2.0 * ((t >= 10) + (t >= 30) + (t >= 70)) / 3),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_value_depends_only_on_iteration(name):
    """
    One schedule object, called in shuffled order (as after a resume, or by
    several models), gives the closed form at every iteration, the steps'
    own iterations and the ramp's end included: it keeps no state.
    """
    kwargs, closed_form = CLOSED_FORMS[name]
    iterations = list(range(0, 150, 7)) + [1, 9, 10, 11, 29, 30, 31, 69, 70, 71, 99, 100, 101]
    random.Random(0).shuffle(iterations)
    used = schedule(name, gamma=2.0, start=0.0, **kwargs)
    for it in iterations:
        assert used(it) == pytest.approx(closed_form(it), abs=1e-12), it


def _one_image_batch():
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    instances.gt_classes = torch.tensor([3])
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    return [{"image": image, "instances": instances}]


@pytest.fixture(scope="module")
def linear_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.NAME = "linear"
    cfg.MODEL.FOCAL.GAMMA_SCHEDULE.ITERS = 100
    return build_model(cfg).train()


@pytest.mark.parametrize("start_iter", [0, 30, 250])
def test_model_logs_the_scheduled_gamma_of_the_storage_iteration(linear_model, start_iter):
    # a resumed run's EventStorage starts at the checkpoint's iteration: the model must
    # read it, not count its own calls.
    with EventStorage(start_iter) as storage:
        linear_model(_one_image_batch())
        gamma, _ = storage.latest()["focal_gamma"]
    assert gamma == pytest.approx(2.0 * min(start_iter / 100, 1.0), abs=1e-12)


# ----------------------------------------------------------------------------- bad configs


def _raises_naming(key):
    return pytest.raises(ValueError, match=re.escape(key))


@pytest.mark.parametrize("name", ["linear", "cosine", "step"])
def test_negative_start_raises(name):
    kwargs = {"steps": [10]} if name == "step" else {"iters": 10}
    with _raises_naming(f"{KEY}.START"):
        schedule(name, start=-0.5, **kwargs)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("iters", [0, -5])
def test_ramp_needs_positive_iters(name, iters):
    with _raises_naming(f"{KEY}.ITERS"):
        schedule(name, iters=iters)


def test_step_needs_steps():
    with _raises_naming(f"{KEY}.STEPS"):
        schedule("step", steps=[])


@pytest.mark.parametrize("steps", [[20, 10], [10, 10], [10, 30, 20], [0, 10], [-5, 10]])
def test_step_needs_positive_increasing_steps(steps):
    with _raises_naming(f"{KEY}.STEPS"):
        schedule("step", steps=steps)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("constant", {"start": 0.5}, "START"),
        ("constant", {"start": -0.5}, "START=-0.5 is not read by ConstantGamma; leave it at 0.0"),
        ("constant", {"iters": 10}, "ITERS"),
        ("constant", {"steps": [5]}, "STEPS"),
        ("linear", {"iters": 10, "steps": [5]}, "STEPS"),
        ("cosine", {"iters": 10, "steps": [5]}, "STEPS"),
        ("step", {"steps": [5], "iters": 10}, "ITERS"),
    ],
)
def test_key_the_schedule_would_ignore_raises(name, kwargs, key):
    with _raises_naming(f"{KEY}.{key}"):
        schedule(name, **kwargs)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=re.escape(f"{KEY}.NAME")) as info:
        schedule("exponential")
    for valid in ["constant", "linear", "cosine", "step"]:
        assert valid in str(info.value)


@pytest.mark.parametrize(
    "schedule, first",
    [
        (schedules.ConstantGamma(end=2.0), 2.0),
        (schedules.LinearGamma(end=1.0, start=3.0, iters=10), 3.0),  # a falling ramp
        (schedules.CosineGamma(end=2.0, start=0.5, iters=10), 0.5),
        (schedules.StepGamma(end=0.5, start=2.0, steps=[5]), 2.0),
    ],
    ids=["constant", "linear down", "cosine up", "step down"],
)
def test_initial_gamma_is_the_schedules_gamma_at_iteration_0(schedule, first):
    """The gamma the head's prior is derived at: iteration 0's, not the smallest (a falling
    ramp ends below its start)."""
    assert schedules.initial_gamma(schedule) == schedule(0) == first


def test_a_schedules_repr_gives_its_settings():
    """Written out: the warnings that name a schedule by its repr build it the same way."""
    ramp = schedules.LinearGamma(end=2.0, start=0.5, iters=500)
    assert repr(ramp) == "LinearGamma(start=0.5, end=2.0, iters=500, steps=[])"
    steps = schedules.StepGamma(end=1.0, start=3.0, steps=[100, 200])
    assert repr(steps) == "StepGamma(start=3.0, end=1.0, iters=0, steps=[100, 200])"


@pytest.mark.parametrize(
    "schedule, max_iter, last",
    [
        (schedules.ConstantGamma(end=2.0), 1, None),
        (schedules.LinearGamma(end=2.0, iters=10), 10, None),  # the ramp ends with the run
        (schedules.LinearGamma(end=2.0, iters=500), 2, 0.004),
        (schedules.CosineGamma(end=1.0, start=3.0, iters=20), 10, 2.156),  # falling, at 9 of 20
        (schedules.StepGamma(end=2.0, steps=[100, 200]), 150, 1.0),
        (schedules.StepGamma(end=2.0, steps=[100, 200]), 200, 1.0),  # iteration 200 never trains
        (schedules.StepGamma(end=2.0, steps=[100, 200]), 201, None),
        (schedules.CosineGamma(end=2.0, iters=10), 10, None),
    ],
)
def test_a_schedule_that_ends_after_training_is_named(schedule, max_iter, last):
    """A ramp or steps past SOLVER.MAX_ITER (a shortened run) would end training below GAMMA."""
    warning = schedules.unfinished_warning(schedule, max_iter)
    if last is None:
        assert warning is None
        return
    assert warning == (
        f"MODEL.FOCAL.GAMMA_SCHEDULE {schedule!r} does not reach MODEL.FOCAL.GAMMA="
        f"{schedule.end} by SOLVER.MAX_ITER={max_iter}: training ends at gamma {last:.4g}. "
        "Shorten its ITERS or STEPS, or train longer."
    )
